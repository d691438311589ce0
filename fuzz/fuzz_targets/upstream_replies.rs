//! What upstream nodes and origins send back: the HTTP `CONNECT` answer, a
//! response head (its request method chosen by the first byte), the SOCKS5
//! client-side replies, and the node handshake machines fed those bytes
//! whole and one byte at a time. Split invariant and lengths within the
//! input; a parsed response head is rewritten for the client without
//! panicking; a handshake reaches the same outcome however the bytes arrive.
#![no_main]

use libfuzzer_sys::fuzz_target;
use splicegate_proto::http::{
    Limits, Method, parse_connect_response, parse_response, write_response_head,
};
use splicegate_proto::node::{Event, Handshake, Outcome};
use splicegate_proto::socks5::client;
use splicegate_proto::{Host, Target};

mod common;

/// Feed a handshake `chunks`, as a driver would; the outcome and the bytes
/// left for the tunnel.
fn drive(mut hs: Handshake, chunks: &[&[u8]]) -> Option<(Outcome, Vec<u8>)> {
    let mut input = Vec::new();
    let mut chunks = chunks.iter();
    loop {
        let mut out = Vec::new();
        hs.poll_transmit(&mut out);
        let event = loop {
            if let Some(e) = hs.handle_input(&input) {
                break e;
            }
            input.extend_from_slice(chunks.next()?);
        };
        match event {
            Event::Continue { consumed } => {
                assert!(consumed <= input.len());
                input.drain(..consumed);
            }
            Event::Done { outcome, consumed } => {
                assert!(consumed <= input.len());
                input.drain(..consumed);
                // What follows the answer belongs to the tunnel only when
                // one is established; after a failure the connection closes.
                if outcome == Outcome::Established {
                    // Bytes that arrive later belong to the tunnel as well.
                    for rest in chunks {
                        input.extend_from_slice(rest);
                    }
                } else {
                    input.clear();
                }
                return Some((outcome, input));
            }
        }
    }
}

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

    let target = Target::new(Host::Domain("example.com".into()), 443);
    let creds = (selector & 4 != 0).then_some(("user", "pass"));
    let make = || {
        if selector & 8 != 0 {
            Handshake::socks5(&target, creds)
        } else {
            Handshake::http(&target, creds)
        }
    };
    let whole = drive(make(), &[rest]);
    let bytes: Vec<&[u8]> = rest.chunks(1).collect();
    assert_eq!(whole, drive(make(), &bytes));
});
