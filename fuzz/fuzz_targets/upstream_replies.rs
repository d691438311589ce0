//! What upstream nodes and origins send back: the HTTP `CONNECT` answer, a
//! response head (its request method chosen by the first byte), and the
//! SOCKS5 client-side replies. Split invariant and lengths within the input;
//! a parsed response head is rewritten for the client without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use splicegate_proto::http::{
    Limits, Method, parse_connect_response, parse_response, write_response_head,
};
use splicegate_proto::socks5::client;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };

    let extra = match parse_connect_response(rest) {
        Ok(Some(r)) => [r.head_len, r.head_len.saturating_sub(1)],
        _ => [0, 0],
    };
    if let Ok(Some(r)) = common::assert_split_invariant(rest, &extra, parse_connect_response) {
        assert!(r.head_len <= rest.len());
    }

    let method = match selector % 4 {
        0 => Method::Get,
        1 => Method::Head,
        2 => Method::Connect,
        _ => Method::Post,
    };
    let limits = Limits::default();
    let parse = |b: &[u8]| parse_response(b, &limits, &method);
    let extra = match parse(rest) {
        Ok(Some(r)) => [r.head_len, r.head_len.saturating_sub(1)],
        _ => [0, 0],
    };
    if let Ok(Some(resp)) = common::assert_split_invariant(rest, &extra, parse) {
        assert!(resp.head_len <= rest.len());
        let mut out = Vec::new();
        write_response_head(&resp, &[("X-Splicegate-Fuzz", "1")], &mut out);
        assert!(out.ends_with(b"\r\n\r\n"));
    }

    let _ = common::assert_split_invariant(rest, &[], client::parse_method_reply);
    let _ = common::assert_split_invariant(rest, &[], client::parse_auth_reply);
    let extra = match client::parse_connect_reply(rest) {
        Ok(Some((_, n))) => [n, n.saturating_sub(1)],
        _ => [0, 0],
    };
    if let Ok(Some((_, n))) =
        common::assert_split_invariant(rest, &extra, client::parse_connect_reply)
    {
        assert!(n <= rest.len());
    }
});
