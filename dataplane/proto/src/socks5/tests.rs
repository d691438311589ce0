//! Table-driven byte tests for SOCKS5 (IDs are the hostile-input catalogue's,
//! docs/RELIABILITY.md) and split-invariance properties.

#![allow(
    clippy::type_complexity,
    reason = "test tables spell out (input, expected) types inline"
)]

use std::net::{IpAddr, SocketAddr};

use proptest::prelude::*;

use crate::test_support::assert_split_invariant;

use super::client::*;
use super::server::*;
use super::{Socks5Error, method, reply};
use crate::{Host, Target};

#[test]
fn greeting_table() {
    let all: Vec<u8> = [&[5u8, 255][..], &(0u8..255).collect::<Vec<_>>()].concat();
    let cases: Vec<(Vec<u8>, Result<Option<Greeting>, Socks5Error>)> = vec![
        (
            b"\x05\x01\x02".to_vec(),
            Ok(Some(Greeting {
                methods: MethodSet::from_codes(&[2]),
                consumed: 3,
            })),
        ), // S-00
        (
            b"\x05\x02\x00\x02\x01".to_vec(),
            Ok(Some(Greeting {
                methods: MethodSet::from_codes(&[0, 2]),
                consumed: 4,
            })),
        ),
        (b"\x05\x02\x00".to_vec(), Ok(None)),
        (b"\x05".to_vec(), Ok(None)),
        (b"".to_vec(), Ok(None)),
        (b"\x04\x01\x00\x50".to_vec(), Err(Socks5Error::Version(4))), // S-01
        (b"\x06\x01\x00".to_vec(), Err(Socks5Error::Version(6))),     // S-02
        (
            b"GET / HTTP/1.1\r\n".to_vec(),
            Err(Socks5Error::Version(b'G')),
        ),
        (b"\x05\x00".to_vec(), Err(Socks5Error::NoMethods)), // S-03
        (
            [all.clone(), b"\x01".to_vec()].concat(),
            Ok(Some(Greeting {
                methods: MethodSet::from_codes(&all[2..]),
                consumed: 257,
            })),
        ), // S-04
    ];
    for (input, want) in cases {
        assert_eq!(parse_greeting(&input), want, "{input:?}");
    }
    let g = parse_greeting(b"\x05\x02\x00\x02").unwrap().unwrap();
    assert!(g.offers(method::USERPASS) && g.offers(method::NO_AUTH) && !g.offers(method::GSSAPI));
    // The edges of the code space, and a code sent twice: a set.
    let g = parse_greeting(b"\x05\x03\xff\x00\xff").unwrap().unwrap();
    assert!(g.offers(255) && g.offers(0) && !g.offers(2), "{g:?}");
    assert_eq!((g.methods.len(), g.consumed), (2, 5));
    // Every code against a plain list, for sets of every code of a kind.
    for step in [1usize, 2, 3, 7, 64, 255] {
        let codes: Vec<u8> = (0..=255u8).step_by(step).collect();
        let set = MethodSet::from_codes(&codes);
        assert_eq!(set.len(), codes.len(), "step {step}");
        for c in 0..=255u8 {
            assert_eq!(set.contains(c), codes.contains(&c), "code {c}, step {step}");
        }
    }
}

#[test]
fn userpass_table() {
    let up = |u: &str, p: &str, consumed| {
        Ok(Some(UserPass {
            username: AuthField::new(u).unwrap(),
            password: AuthField::new(p).unwrap(),
            consumed,
        }))
    };
    let long_user = format!("package-123-country-us-session-{}", "a".repeat(224));
    let s13 = [&[1u8, 255][..], long_user.as_bytes(), b"\x0as3cr3t-key"].concat();
    let cases: Vec<(Vec<u8>, Result<Option<UserPass>, Socks5Error>)> = vec![
        (
            b"\x01\x16package-123-country-us\x0as3cr3t-key".to_vec(),
            up("package-123-country-us", "s3cr3t-key", 35),
        ), // S-00
        (
            b"\x01\x16package-123-country-us\x0as3cr3t-keyTAIL".to_vec(),
            up("package-123-country-us", "s3cr3t-key", 35),
        ),
        (
            b"\x05\x16package-123-country-us\x0as3cr3t-key".to_vec(),
            Err(Socks5Error::AuthVersion(5)),
        ), // S-10, S-28
        (
            b"\x01\x00\x0as3cr3t-key".to_vec(),
            Err(Socks5Error::EmptyUsername),
        ), // S-11
        (
            b"\x01\x16package-123-country-us\x00".to_vec(),
            up("package-123-country-us", "", 25),
        ), // S-12
        (s13, up(&long_user, "s3cr3t-key", 268)),    // S-13
        (b"\x01\xc8package-123".to_vec(), Ok(None)), // S-14
        (b"\x01\x02ab".to_vec(), Ok(None)),
        (b"\x01\x02ab\x03xy".to_vec(), Ok(None)),
        (
            b"\x01\x02\xff\xfe\x01x".to_vec(),
            Err(Socks5Error::CredentialsNotUtf8),
        ),
    ];
    for (input, want) in cases {
        assert_eq!(parse_userpass(&input), want, "{input:?}");
    }
}

#[test]
fn request_table() {
    let req = |command, host: Host, port, consumed| {
        Ok(Some(Request {
            command,
            target: Target::new(host, port),
            consumed,
        }))
    };
    let ip = |s: &str| Host::Ip(s.parse::<IpAddr>().unwrap());
    let v6 = [&b"\x05\x01\x00\x04"[..], &[0; 15], b"\x01\x01\xbb"].concat();
    let cases: Vec<(Vec<u8>, Result<Option<Request>, Socks5Error>)> = vec![
        (
            b"\x05\x01\x00\x03\x0bexample.com\x01\xbb".to_vec(),
            req(
                Command::Connect,
                Host::Domain("example.com".into()),
                443,
                18,
            ),
        ), // S-00
        (
            b"\x05\x01\x00\x03\x0bexample.com\x01\xbbGET /".to_vec(),
            req(
                Command::Connect,
                Host::Domain("example.com".into()),
                443,
                18,
            ),
        ), // S-27
        (
            b"\x05\x01\x00\x03\x0bExample.COM\x01\xbb".to_vec(),
            req(
                Command::Connect,
                Host::Domain("example.com".into()),
                443,
                18,
            ),
        ),
        (
            b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50".to_vec(),
            req(Command::Connect, ip("127.0.0.1"), 80, 10),
        ), // S-20
        (v6, req(Command::Connect, ip("::1"), 443, 22)), // S-21
        (
            b"\x05\x01\x00\x03\x09127.0.0.1\x00\x50".to_vec(),
            req(Command::Connect, ip("127.0.0.1"), 80, 16),
        ), // S-19
        (
            b"\x05\x01\x00\x03\x0bexample.com\x00\x00".to_vec(),
            req(Command::Connect, Host::Domain("example.com".into()), 0, 18),
        ), // S-22
        (
            b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00".to_vec(),
            req(Command::Bind, ip("0.0.0.0"), 0, 10),
        ), // S-23
        (
            b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00".to_vec(),
            req(Command::UdpAssociate, ip("0.0.0.0"), 0, 10),
        ), // S-24
        (
            b"\x05\x09\x00\x01\x00\x00\x00\x00\x00\x00".to_vec(),
            req(Command::Other(9), ip("0.0.0.0"), 0, 10),
        ), // S-25
        (
            b"\x05\x01\x00\x02\x00\x00\x00\x00\x00\x50".to_vec(),
            Err(Socks5Error::UnsupportedAddressType(2)),
        ), // S-16
        (
            b"\x05\x01\x00\x03\x00\x01\xbb".to_vec(),
            Err(Socks5Error::EmptyDomain),
        ), // S-17
        (
            b"\x05\x01\x00\x03\x0cexample\x00.com\x01\xbb".to_vec(),
            Err(Socks5Error::InvalidDomain("control byte in host")),
        ), // S-18
        (
            b"\x05\x01\x00\x03\x05a%2eb\x01\xbb".to_vec(),
            Err(Socks5Error::InvalidDomain("percent-encoding in host")),
        ),
        (
            b"\x05\x01\x07\x03\x0bexample.com\x01\xbb".to_vec(),
            Err(Socks5Error::ReservedNonZero),
        ), // S-26
        (b"\x04\x01\x00\x01".to_vec(), Err(Socks5Error::Version(4))),
        (b"\x05\x01\x00\x03\x0bexample.com\x01".to_vec(), Ok(None)),
        (b"\x05\x01\x00\x03".to_vec(), Ok(None)),
        (b"\x05\x01\x00\x01\x7f\x00\x00".to_vec(), Ok(None)),
    ];
    for (input, want) in cases {
        assert_eq!(parse_request(&input), want, "{input:?}");
    }
}

#[test]
fn server_replies() {
    assert_eq!(method_reply(method::USERPASS), [5, 2]);
    assert_eq!(method_reply(method::NO_ACCEPTABLE), [5, 0xff]);
    assert_eq!(auth_reply(true), [1, 0]);
    assert_eq!(auth_reply(false), [1, 1]);
    let mut out = Vec::new();
    write_reply(reply::ADDRESS_TYPE_NOT_SUPPORTED, None, &mut out); // S-16
    assert_eq!(out, b"\x05\x08\x00\x01\x00\x00\x00\x00\x00\x00");
    out.clear();
    write_reply(
        reply::SUCCEEDED,
        Some("10.1.2.3:8080".parse::<SocketAddr>().unwrap()),
        &mut out,
    );
    assert_eq!(out, b"\x05\x00\x00\x01\x0a\x01\x02\x03\x1f\x90");
    out.clear();
    write_reply(
        reply::SUCCEEDED,
        Some("[::1]:443".parse::<SocketAddr>().unwrap()),
        &mut out,
    );
    assert_eq!(
        out,
        [&b"\x05\x00\x00\x04"[..], &[0; 15], b"\x01\x01\xbb"].concat()
    );
}

#[test]
fn client_messages() {
    let mut out = Vec::new();
    write_greeting(true, &mut out);
    assert_eq!(out, b"\x05\x01\x02");
    out.clear();
    write_greeting(false, &mut out);
    assert_eq!(out, b"\x05\x01\x00");

    assert_eq!(parse_method_reply(b""), Ok(None));
    assert_eq!(parse_method_reply(b"\x05"), Ok(None));
    assert_eq!(parse_method_reply(b"\x05\x02"), Ok(Some(method::USERPASS)));
    assert_eq!(
        parse_method_reply(b"\x05\xff"),
        Ok(Some(method::NO_ACCEPTABLE))
    );
    assert_eq!(
        parse_method_reply(b"\x04\x00"),
        Err(Socks5Error::Version(4))
    );

    out.clear();
    write_userpass("user", "pw", &mut out).unwrap();
    assert_eq!(out, b"\x01\x04user\x02pw");
    assert_eq!(
        write_userpass("", "pw", &mut out),
        Err(Socks5Error::EmptyUsername)
    );
    assert_eq!(
        write_userpass(&"u".repeat(256), "", &mut out),
        Err(Socks5Error::CredentialTooLong)
    );
    assert_eq!(
        write_userpass("u", &"p".repeat(256), &mut out),
        Err(Socks5Error::CredentialTooLong)
    );

    assert_eq!(parse_auth_reply(b"\x01"), Ok(None));
    assert_eq!(parse_auth_reply(b"\x01\x00"), Ok(Some(true)));
    assert_eq!(parse_auth_reply(b"\x01\x01"), Ok(Some(false)));
    assert_eq!(
        parse_auth_reply(b"\x05\x00"),
        Err(Socks5Error::AuthVersion(5))
    );

    out.clear();
    write_connect(&Host::Domain("example.com".into()), 443, &mut out).unwrap();
    assert_eq!(out, b"\x05\x01\x00\x03\x0bexample.com\x01\xbb");
    out.clear();
    write_connect(&Host::Ip("1.2.3.4".parse().unwrap()), 80, &mut out).unwrap();
    assert_eq!(out, b"\x05\x01\x00\x01\x01\x02\x03\x04\x00\x50");
    out.clear();
    write_connect(&Host::Ip("::1".parse().unwrap()), 80, &mut out).unwrap();
    assert_eq!(
        out,
        [&b"\x05\x01\x00\x04"[..], &[0; 15], b"\x01\x00\x50"].concat()
    );
    assert_eq!(
        write_connect(&Host::Domain("a".repeat(256)), 1, &mut Vec::new()),
        Err(Socks5Error::DomainTooLong)
    );
    // The server parses what the client writes.
    out.clear();
    write_connect(&Host::Domain("example.com".into()), 443, &mut out).unwrap();
    assert_eq!(
        parse_request(&out).unwrap().unwrap().target.host,
        Host::Domain("example.com".into())
    );
}

#[test]
fn connect_reply_table() {
    let v6 = [&b"\x05\x00\x00\x04"[..], &[0; 16], b"\x00\x00DATA"].concat();
    let cases: Vec<(Vec<u8>, Result<Option<(u8, usize)>, Socks5Error>)> = vec![
        (
            b"\x05\x00\x00\x01\x0a\x00\x00\x01\x1f\x90TLS".to_vec(),
            Ok(Some((0, 10))),
        ),
        (v6, Ok(Some((0, 22)))),
        (
            b"\x05\x05\x00\x03\x04node\x00\x00".to_vec(),
            Ok(Some((5, 11))),
        ),
        (b"\x05\x04\x00\x01\x00\x00".to_vec(), Ok(None)),
        (b"\x05\x00\x00".to_vec(), Ok(None)),
        (
            b"\x05\x00\x00\x07".to_vec(),
            Err(Socks5Error::UnsupportedAddressType(7)),
        ),
        (b"HTTP/1.1 200".to_vec(), Err(Socks5Error::Version(b'H'))),
    ];
    for (input, want) in cases {
        assert_eq!(parse_connect_reply(&input), want, "{input:?}");
    }
}

const SEEDS: &[&[u8]] = &[
    b"\x05\x02\x00\x02",
    b"\x01\x04user\x02pw",
    b"\x05\x01\x00\x03\x0bexample.com\x01\xbb",
    b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
    b"\x05\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x01\xbb",
];

proptest! {
    #[test]
    fn socks5_parsers_split_invariant(input in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        (0..SEEDS.len(), any::<prop::sample::Index>(), any::<u8>(), prop::collection::vec(any::<u8>(), 0..4))
            .prop_map(|(s, at, byte, tail)| {
                let mut v = SEEDS[s].to_vec();
                let i = at.index(v.len());
                v[i] = byte;
                v.extend(tail);
                v
            }),
    ]) {
        assert_split_invariant(&input, parse_greeting);
        assert_split_invariant(&input, parse_userpass);
        assert_split_invariant(&input, parse_request);
        assert_split_invariant(&input, parse_method_reply);
        assert_split_invariant(&input, parse_auth_reply);
        assert_split_invariant(&input, parse_connect_reply);
    }

    #[test]
    fn userpass_round_trips(user in "[ -~]{1,255}", pass in "[ -~]{0,255}") {
        let mut out = Vec::new();
        write_userpass(&user, &pass, &mut out).unwrap();
        let parsed = parse_userpass(&out).unwrap().unwrap();
        prop_assert_eq!(
            (parsed.username.as_str(), parsed.password.as_str(), parsed.consumed),
            (user.as_str(), pass.as_str(), out.len())
        );
    }
}

#[test]
fn udp_datagrams_parse_and_their_headers_round_trip() {
    use crate::socks5::server::{parse_udp_datagram, udp_header, write_udp_header};
    let mut d = vec![0, 0, 0, 1, 192, 0, 2, 7, 0x01, 0xbb];
    d.extend_from_slice(b"quic");
    let p = parse_udp_datagram(&d).unwrap();
    assert_eq!(p.frag, 0);
    assert_eq!(p.target.to_string(), "192.0.2.7:443");
    assert_eq!(p.payload, b"quic");
    // A name, a fragment, an empty payload.
    let mut n = vec![0, 0, 2, 3, 11];
    n.extend_from_slice(b"example.com");
    n.extend_from_slice(&53u16.to_be_bytes());
    let p = parse_udp_datagram(&n).unwrap();
    assert_eq!(
        (p.frag, p.target.to_string(), p.payload),
        (2, "example.com:53".to_string(), &b""[..])
    );
    // Refused: RSV not zero, truncated, an unknown ATYP.
    assert_eq!(
        parse_udp_datagram(&[0, 1, 0, 1]),
        Err(Socks5Error::ReservedNonZero)
    );
    assert_eq!(
        parse_udp_datagram(&[0, 0, 0, 1, 1, 2]),
        Err(Socks5Error::Truncated)
    );
    assert_eq!(parse_udp_datagram(&[0, 0]), Err(Socks5Error::Truncated));
    assert!(matches!(
        parse_udp_datagram(&[0, 0, 0, 9, 1, 2, 3]),
        Err(Socks5Error::UnsupportedAddressType(9))
    ));
    // What the gateway writes back parses as a datagram from that sender.
    for from in ["203.0.113.9:5353", "[2001:db8::1]:443"] {
        let from: std::net::SocketAddr = from.parse().unwrap();
        let mut out = Vec::new();
        write_udp_header(from, &mut out);
        out.extend_from_slice(b"answer");
        let p = parse_udp_datagram(&out).unwrap();
        assert_eq!(p.target.to_string(), from.to_string());
        assert_eq!(p.payload, b"answer");
        // The in-place header is the same bytes.
        let (h, len) = udp_header(from);
        assert_eq!(&h[..len], &out[..out.len() - 6]);
    }
}

proptest! {
    #[test]
    fn udp_datagram_parsing_never_panics(input in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(d) = crate::socks5::server::parse_udp_datagram(&input) {
            prop_assert!(d.payload.len() <= input.len());
        }
    }
}
