//! The SOCKS5 server parsers (greeting, RFC 1929 username/password, request)
//! on arbitrary bytes: split invariant, consumed within the input, and a
//! parsed request's address written by the client side parses back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use splicegate_proto::socks5::{client, server};

mod common;

fuzz_target!(|data: &[u8]| {
    let within = |consumed: usize| {
        assert!(consumed <= data.len());
        [consumed, consumed.saturating_sub(1)]
    };

    let extra = match server::parse_greeting(data) {
        Ok(Some(g)) => within(g.consumed),
        _ => [0, 0],
    };
    if let Ok(Some(g)) = common::assert_split_invariant(data, &extra, server::parse_greeting) {
        assert!(!g.methods.is_empty() && g.methods.len() <= 255);
    }

    let extra = match server::parse_userpass(data) {
        Ok(Some(u)) => within(u.consumed),
        _ => [0, 0],
    };
    if let Ok(Some(u)) = common::assert_split_invariant(data, &extra, server::parse_userpass) {
        assert!(!u.username.is_empty() && u.username.len() <= 255 && u.password.len() <= 255);
    }

    let extra = match server::parse_request(data) {
        Ok(Some(r)) => within(r.consumed),
        _ => [0, 0],
    };
    if let Ok(Some(r)) = common::assert_split_invariant(data, &extra, server::parse_request) {
        let mut out = Vec::new();
        client::write_connect(&r.target.host, r.target.port, &mut out).expect("a parsed host is writable");
        let again = server::parse_request(&out)
            .expect("a written request parses")
            .expect("a written request is complete");
        assert_eq!(again.target, r.target);
        assert_eq!(again.consumed, out.len());
    }
});
