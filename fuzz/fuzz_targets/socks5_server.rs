//! The SOCKS5 server parsers (greeting, RFC 1929 username/password, request)
//! on arbitrary bytes: split invariant, consumed within the input, and a
//! parsed request's address written by the client side parses back the same;
//! a UDP datagram's header written back parses to the same sender.
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

    // A client's UDP datagram: the payload is the tail of the input, and a
    // datagram from an IP sender written back parses to the same sender.
    if let Ok(d) = server::parse_udp_datagram(data) {
        assert!(data.ends_with(d.payload));
        if let splicegate_proto::Host::Ip(ip) = d.target.host {
            let from = std::net::SocketAddr::new(ip, d.target.port);
            let mut out = Vec::new();
            server::write_udp_header(from, &mut out);
            out.extend_from_slice(d.payload);
            let back = server::parse_udp_datagram(&out).expect("a written header parses");
            assert_eq!(back.target, d.target);
            assert_eq!(back.payload, d.payload);
        }
    }
});
