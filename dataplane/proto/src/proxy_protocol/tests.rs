//! Every branch of the PROXY protocol parser, byte by byte, and the
//! split-invariance and never-panics properties.

use std::net::SocketAddr;

use proptest::prelude::*;

use super::*;
use crate::test_support::assert_split_invariant;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn addrs(src: &str, dst: &str) -> Option<Addresses> {
    Some(Addresses {
        source: sa(src),
        destination: sa(dst),
    })
}

fn v1(addresses: Option<Addresses>, consumed: usize) -> Result<Option<Header>, Error> {
    Ok(Some(Header {
        version: Version::V1,
        consumed,
        addresses,
    }))
}

fn v2(addresses: Option<Addresses>, consumed: usize) -> Result<Option<Header>, Error> {
    Ok(Some(Header {
        version: Version::V2,
        consumed,
        addresses,
    }))
}

/// A v2 header from its parts: version/command, family/transport, and the
/// bytes after the fixed part (its length field is their length).
fn v2_bytes(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
    let mut v = V2_SIGNATURE.to_vec();
    v.push(ver_cmd);
    v.push(fam);
    v.extend_from_slice(&(body.len() as u16).to_be_bytes());
    v.extend_from_slice(body);
    v
}

const INET_BODY: [u8; 12] = [127, 0, 3, 7, 127, 0, 0, 1, 0x30, 0x39, 0x13, 0x88];

#[test]
fn empty_input_needs_more() {
    assert_eq!(parse(b""), Ok(None));
}

#[test]
fn other_first_bytes_are_missing_at_once() {
    for input in [
        &b"\x05\x01\x00"[..],
        b"\x16\x03\x01",
        b"GET / HTTP/1.1\r\n",
        b"CONNECT a:1 HTTP/1.1\r\n",
    ] {
        assert_eq!(parse(input), Err(Error::Missing), "{input:?}");
    }
    // Starts like one of the two and then departs from it.
    assert_eq!(parse(b"POST / HTTP/1.1\r\n"), Err(Error::Missing));
    assert_eq!(parse(b"PROXY\r\n"), Err(Error::Missing));
    assert_eq!(parse(b"\r\n\r\n\0\r\nQUIX"), Err(Error::Missing));
    assert_eq!(parse(b"\r\n\r\n\r\n"), Err(Error::Missing));
    assert_eq!(Error::Missing.reason(), "missing");
    assert_eq!(Error::V1TooLong.reason(), "malformed");
}

#[test]
fn v1_tcp4_and_what_follows() {
    let line = b"PROXY TCP4 127.0.3.7 127.0.0.1 12345 5000\r\n";
    let mut input = line.to_vec();
    assert_eq!(
        parse(&input),
        v1(addrs("127.0.3.7:12345", "127.0.0.1:5000"), line.len())
    );
    // The client's first bytes in the same segment are not the header's.
    input.extend_from_slice(b"CONNECT x:1 HTTP/1.1\r\n\r\n");
    assert_eq!(
        parse(&input),
        v1(addrs("127.0.3.7:12345", "127.0.0.1:5000"), line.len())
    );
    assert_split_invariant(&input, parse);
}

#[test]
fn v1_tcp6() {
    let line = b"PROXY TCP6 2001:db8::7 ::1 65535 0\r\n";
    assert_eq!(
        parse(line),
        v1(addrs("[2001:db8::7]:65535", "[::1]:0"), line.len())
    );
    let mapped = b"PROXY TCP6 ::ffff:127.0.3.7 ::1 1 2\r\n";
    assert_eq!(
        parse(mapped),
        v1(addrs("[::ffff:127.0.3.7]:1", "[::1]:2"), mapped.len())
    );
}

#[test]
fn v1_unknown_uses_the_connection() {
    assert_eq!(parse(b"PROXY UNKNOWN\r\n"), v1(None, 15));
    // Whatever follows UNKNOWN on its line is ignored.
    let line = b"PROXY UNKNOWN ffff:f...f:ffff 1.2.3.4 x y\r\nGET";
    assert_eq!(parse(line), v1(None, line.len() - 3));
    assert_eq!(
        parse(b"PROXY UNKNOWNX\r\n"),
        Err(Error::V1Malformed("protocol is not TCP4, TCP6 or UNKNOWN"))
    );
}

#[test]
fn v1_longest_line_is_accepted_and_one_more_byte_is_not() {
    // The specification's worst case: UNKNOWN with the longest addresses.
    let longest = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    assert_eq!(longest.len(), V1_MAX_LEN);
    assert_eq!(parse(longest), v1(None, V1_MAX_LEN));
    let tcp6 = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    let a = addrs(
        "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
    );
    assert_eq!(parse(tcp6), v1(a, tcp6.len()));
    // UNKNOWN padded to 108 bytes: the CRLF comes too late.
    let mut long = b"PROXY UNKNOWN ".to_vec();
    long.resize(V1_MAX_LEN - 1, b'x');
    long.extend_from_slice(b"\r\n");
    assert_eq!(long.len(), V1_MAX_LEN + 1);
    assert_eq!(parse(&long), Err(Error::V1TooLong));
    // And 107 bytes without a line feed are enough to say so.
    assert_eq!(parse(&long[..V1_MAX_LEN]), Err(Error::V1TooLong));
    assert_eq!(parse(&long[..V1_MAX_LEN - 1]), Ok(None));
    assert_split_invariant(&long, parse);
}

#[test]
fn v1_truncated_needs_more() {
    let line = b"PROXY TCP4 127.0.3.7 127.0.0.1 12345 5000\r\n";
    for k in 0..line.len() {
        assert_eq!(parse(&line[..k]), Ok(None), "prefix {k}");
    }
}

#[test]
fn v1_malformed_lines() {
    let m = Error::V1Malformed;
    let cases: &[(&[u8], Error)] = &[
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            m("the line does not end in CRLF"),
        ),
        (b"PROXY \n", m("the line does not end in CRLF")),
        (
            b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n",
            m("a CR inside the line"),
        ),
        (b"PROXY \r\n", m("no protocol")),
        (
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            m("protocol is not TCP4, TCP6 or UNKNOWN"),
        ),
        (
            b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
            m("protocol is not TCP4, TCP6 or UNKNOWN"),
        ),
        (b"PROXY TCP4\r\n", m("no source address")),
        (
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            m("no source address"),
        ),
        (b"PROXY TCP4 1.2.3.4\r\n", m("no destination address")),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8\r\n", m("no source port")),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            m("no destination port"),
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
            m("fields after the destination port"),
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            m("fields after the destination port"),
        ),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", m("not an IPv4 address")),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.256 1 2\r\n",
            m("not an IPv4 address"),
        ),
        (
            b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
            m("not an IPv4 address"),
        ),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", m("not an IPv6 address")),
        (
            b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n",
            m("address not ASCII"),
        ),
    ];
    for (input, want) in cases {
        assert_eq!(
            parse(input),
            Err(*want),
            "{:?}",
            String::from_utf8_lossy(input)
        );
        assert_split_invariant(input, parse);
    }
    let port = m("port is not a decimal 0-65535 without leading zeros");
    for p in ["65536", "99999", "012", "+1", "-1", "1a", "123456", "0x10"] {
        let line = format!("PROXY TCP4 1.2.3.4 5.6.7.8 {p} 2\r\n");
        assert_eq!(parse(line.as_bytes()), Err(port), "{p}");
        let line = format!("PROXY TCP4 1.2.3.4 5.6.7.8 2 {p}\r\n");
        assert_eq!(parse(line.as_bytes()), Err(port), "{p}");
    }
    assert_eq!(
        parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 0 65535\r\n"),
        v1(addrs("1.2.3.4:0", "5.6.7.8:65535"), 36)
    );
}

#[test]
fn v2_proxy_tcp4_with_tlvs_skipped() {
    let mut body = INET_BODY.to_vec();
    // A TLV (PP2_TYPE_AUTHORITY) and an empty one (PP2_TYPE_NOOP).
    body.extend_from_slice(&[0x02, 0x00, 0x03, b'a', b'.', b'b', 0x04, 0x00, 0x00]);
    let mut input = v2_bytes(0x21, 0x11, &body);
    let len = input.len();
    assert_eq!(len, 16 + 12 + 9);
    input.extend_from_slice(b"\x05\x01\x02");
    assert_eq!(
        parse(&input),
        v2(addrs("127.0.3.7:12345", "127.0.0.1:5000"), len)
    );
    assert_split_invariant(&input, parse);
}

#[test]
fn v2_proxy_tcp6() {
    let mut body = Vec::new();
    body.extend_from_slice(
        &"2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    body.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    body.extend_from_slice(&[0xff, 0xff, 0x00, 0x50]);
    let input = v2_bytes(0x21, 0x21, &body);
    assert_eq!(
        parse(&input),
        v2(addrs("[2001:db8::7]:65535", "[::1]:80"), 52)
    );
}

#[test]
fn v2_local_uses_the_connection_and_skips_its_block() {
    assert_eq!(parse(&v2_bytes(0x20, 0x00, &[])), v2(None, 16));
    // A LOCAL header may carry a block (and any family): discarded whole.
    assert_eq!(parse(&v2_bytes(0x20, 0x11, &INET_BODY)), v2(None, 28));
    assert_eq!(parse(&v2_bytes(0x20, 0x21, &[1, 2, 3])), v2(None, 19));
}

#[test]
fn v2_proxy_without_tcp_over_ip_uses_the_connection() {
    // UNSPEC family, TCP over IP with an unspecified or datagram transport,
    // and UNIX sockets: no client address to take.
    assert_eq!(parse(&v2_bytes(0x21, 0x00, &[])), v2(None, 16));
    assert_eq!(parse(&v2_bytes(0x21, 0x10, &INET_BODY)), v2(None, 28));
    assert_eq!(parse(&v2_bytes(0x21, 0x12, &INET_BODY)), v2(None, 28));
    assert_eq!(parse(&v2_bytes(0x21, 0x31, &[0; 216])), v2(None, 232));
    assert_eq!(parse(&v2_bytes(0x21, 0x32, &[0; 216])), v2(None, 232));
}

#[test]
fn v2_bad_version_command_family() {
    assert_eq!(
        parse(&v2_bytes(0x11, 0x11, &INET_BODY)),
        Err(Error::V2Version(1))
    );
    assert_eq!(
        parse(&v2_bytes(0x31, 0x11, &INET_BODY)),
        Err(Error::V2Version(3))
    );
    assert_eq!(
        parse(&v2_bytes(0x22, 0x11, &INET_BODY)),
        Err(Error::V2Command(2))
    );
    assert_eq!(
        parse(&v2_bytes(0x2f, 0x11, &INET_BODY)),
        Err(Error::V2Command(15))
    );
    assert_eq!(
        parse(&v2_bytes(0x21, 0x41, &INET_BODY)),
        Err(Error::V2Family(0x41))
    );
    assert_eq!(
        parse(&v2_bytes(0x21, 0x13, &INET_BODY)),
        Err(Error::V2Family(0x13))
    );
    // Found as soon as the byte arrives.
    let bad = v2_bytes(0x31, 0x11, &INET_BODY);
    assert_eq!(parse(&bad[..13]), Err(Error::V2Version(3)));
    assert_eq!(parse(&bad[..12]), Ok(None));
}

#[test]
fn v2_lengths() {
    // Too short for the family's addresses.
    assert_eq!(
        parse(&v2_bytes(0x21, 0x11, &INET_BODY[..11])),
        Err(Error::V2TooShort {
            family: 0x11,
            len: 11
        })
    );
    assert_eq!(
        parse(&v2_bytes(0x21, 0x21, &[0; 35])),
        Err(Error::V2TooShort {
            family: 0x21,
            len: 35
        })
    );
    assert_eq!(
        parse(&v2_bytes(0x21, 0x31, &[0; 215])),
        Err(Error::V2TooShort {
            family: 0x31,
            len: 215
        })
    );
    // Known from the fixed part alone.
    let short = v2_bytes(0x21, 0x11, &INET_BODY[..11]);
    assert_eq!(
        parse(&short[..16]),
        Err(Error::V2TooShort {
            family: 0x11,
            len: 11
        })
    );
    // The limit, and one byte over it (known from the length field).
    let tlv_len = V2_MAX_LEN - 16 - 12 - 3;
    let mut body = INET_BODY.to_vec();
    body.push(0xee);
    body.extend_from_slice(&(tlv_len as u16).to_be_bytes());
    body.resize(body.len() + tlv_len, 0);
    let max = v2_bytes(0x21, 0x11, &body);
    assert_eq!(max.len(), V2_MAX_LEN);
    assert_eq!(
        parse(&max),
        v2(addrs("127.0.3.7:12345", "127.0.0.1:5000"), V2_MAX_LEN)
    );
    let mut over = v2_bytes(0x21, 0x11, &body);
    over[15] += 1;
    let over_len = u16::from_be_bytes([over[14], over[15]]);
    assert_eq!(parse(&over[..16]), Err(Error::V2TooLong(over_len)));
    let mut huge = V2_SIGNATURE.to_vec();
    huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    assert_eq!(parse(&huge), Err(Error::V2TooLong(0xffff)));
}

#[test]
fn v2_truncated_needs_more() {
    let input = v2_bytes(0x21, 0x11, &INET_BODY);
    for k in 0..input.len() {
        assert_eq!(parse(&input[..k]), Ok(None), "prefix {k}");
    }
}

#[test]
fn v2_bad_tlvs() {
    for tail in [&[0x01][..], &[0x01, 0x00], &[0x01, 0x00, 0x02, 0xaa]] {
        let mut body = INET_BODY.to_vec();
        body.extend_from_slice(tail);
        assert_eq!(
            parse(&v2_bytes(0x21, 0x11, &body)),
            Err(Error::V2BadTlv),
            "{tail:?}"
        );
    }
    let mut body = vec![0; 216];
    body.push(0x01);
    assert_eq!(parse(&v2_bytes(0x21, 0x31, &body)), Err(Error::V2BadTlv));
    // LOCAL discards its block unread, TLVs included.
    assert_eq!(parse(&v2_bytes(0x20, 0x11, &body)), v2(None, 16 + 217));
}

#[test]
fn writers_round_trip() {
    for a in [
        addrs("127.0.3.7:1", "127.0.0.1:2"),
        addrs("[2001:db8::1]:443", "[::1]:5000"),
        None,
    ] {
        let mut out = Vec::new();
        write_v1(a, &mut out);
        assert_eq!(parse(&out), v1(a, out.len()));
        let mut out = Vec::new();
        write_v2(a, &[0x04, 0x00, 0x01, 0x00], &mut out).unwrap();
        assert_eq!(parse(&out), v2(a, out.len()));
    }
    // Mixed families: UNKNOWN / UNSPEC.
    let mixed = addrs("1.2.3.4:1", "[::1]:2");
    let mut out = Vec::new();
    write_v1(mixed, &mut out);
    assert_eq!(out, b"PROXY UNKNOWN\r\n");
    let mut out = Vec::new();
    write_v2(mixed, &[], &mut out).unwrap();
    assert_eq!(parse(&out), v2(None, 16));
    assert_eq!(out[12..14], [0x21, 0x00]);
    // Too long to write.
    assert_eq!(write_v2(None, &vec![0; V2_MAX_LEN], &mut Vec::new()), None);
}

const SEEDS: &[&[u8]] = &[
    b"PROXY TCP4 127.0.3.7 127.0.0.1 12345 5000\r\n",
    b"PROXY TCP6 2001:db8::7 ::1 65535 0\r\n",
    b"PROXY UNKNOWN\r\n",
    b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\x7f\x00\x03\x07\x7f\x00\x00\x01\x30\x39\x13\x88",
    b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00",
    b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x10\x7f\x00\x03\x07\x7f\x00\x00\x01\x30\x39\x13\x88\x01\x00\x01\x00",
];

proptest! {
    #[test]
    fn split_invariant_and_bounded(input in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..160),
        (0..SEEDS.len(), any::<prop::sample::Index>(), any::<u8>(), prop::collection::vec(any::<u8>(), 0..8))
            .prop_map(|(s, at, byte, tail)| {
                let mut v = SEEDS[s].to_vec();
                let i = at.index(v.len());
                v[i] = byte;
                v.extend(tail);
                v
            }),
    ]) {
        assert_split_invariant(&input, parse);
        if let Ok(Some(h)) = parse(&input) {
            prop_assert!(h.consumed <= input.len());
            let max = if h.version == Version::V1 { V1_MAX_LEN } else { V2_MAX_LEN };
            prop_assert!(h.consumed <= max);
        }
    }
}
