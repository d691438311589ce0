//! Table-driven byte tests for the HTTP codecs (rule IDs are the
//! hostile-input catalogue's, docs/RELIABILITY.md), and split/byte-at-a-time
//! properties.

#![allow(
    clippy::type_complexity,
    reason = "test tables spell out (input, expected) types inline"
)]

use proptest::prelude::*;

use super::*;
use crate::test_support::assert_split_invariant;
use crate::{Host, Target};

const AUTH: &str = "Proxy-Authorization: Basic cGFja2FnZS0xMjMtY291bnRyeS11czpzM2NyM3Qta2V5\r\n";

fn parse(input: &[u8]) -> Result<Option<Request>, HttpError> {
    parse_request(input, &Limits::default())
}

fn ok(input: &[u8]) -> Request {
    match parse(input) {
        Ok(Some(req)) => req,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(input)),
    }
}

fn post(extra: &str) -> Vec<u8> {
    format!("POST http://example.com/ HTTP/1.1\r\nHost: example.com\r\n{AUTH}{extra}\r\n")
        .into_bytes()
}

fn connect(line_target: &str) -> Vec<u8> {
    format!("CONNECT {line_target} HTTP/1.1\r\n{AUTH}\r\n").into_bytes()
}

fn malformed(reason: &'static str) -> Result<Option<Request>, HttpError> {
    Err(HttpError::Malformed(reason))
}

#[test]
fn request_rejections() {
    use HttpError::*;
    let not_decimal = "Content-Length is not a decimal number";
    let te_not_chunked = "Transfer-Encoding other than exactly chunked";
    let bad_port = "invalid port: 1-65535, digits only";
    let fold = "header line starts with whitespace (obs-fold is not accepted)";
    let many_headers = format!(
        "CONNECT example.com:443 HTTP/1.1\r\n{}\r\n",
        "X-N: v\r\n".repeat(101)
    );
    let cases: Vec<(&str, Vec<u8>, Result<Option<Request>, HttpError>)> = vec![
        ("H-06 bare LF", b"CONNECT example.com:443 HTTP/1.1\nHost: example.com:443\n\n".to_vec(), malformed("bare LF line ending (CRLF required)")),
        ("H-07 bare CR", b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\rX: y\r\n\r\n".to_vec(), malformed("bare CR in head")),
        ("H-08 obs-fold", post("X-Fold: a\r\n b\r\n"), malformed(fold)),
        ("H-09 fold in credential", b"CONNECT example.com:443 HTTP/1.1\r\nProxy-Authorization: Basic\r\n cGFja2FnZQ==\r\n\r\n".to_vec(), malformed(fold)),
        ("H-10 space before colon", b"CONNECT example.com:443 HTTP/1.1\r\nProxy-Authorization : Basic eDp5\r\n\r\n".to_vec(), malformed("whitespace between header name and colon")),
        ("H-11 space before first field", b"GET http://example.com/ HTTP/1.1\r\n Host: example.com\r\n\r\n".to_vec(), malformed(fold)),
        ("H-12 empty field name", post(":\r\nContent-Length: 27\r\n"), malformed("empty header name")),
        ("H-13 NUL in name", post("X\0Y: z\r\n"), malformed("NUL byte in head")),
        ("H-14 NUL in value", post("X-A: a\0b\r\n"), malformed("NUL byte in head")),
        ("H-15 control bytes", post("X-A: a\x01\x7fb\r\n"), malformed("control byte in head")),
        ("header without colon", post("Just-A-Name\r\n"), malformed("header line without a colon")),
        ("H-16 differing CL", post("Content-Length: 5\r\nContent-Length: 6\r\n"), malformed("duplicate Content-Length")),
        ("equal duplicate CL", post("Content-Length: 5\r\nContent-Length: 5\r\n"), malformed("duplicate Content-Length")),
        ("H-17 CL list", post("Content-Length: 5, 5\r\n"), malformed(not_decimal)),
        ("H-18 empty CL", post("Content-Length: \r\n"), malformed("empty Content-Length")),
        ("H-19 CL +5", post("Content-Length: +5\r\n"), malformed(not_decimal)),
        ("H-19 CL -1", post("Content-Length: -1\r\n"), malformed(not_decimal)),
        ("H-19 CL 0x5", post("Content-Length: 0x5\r\n"), malformed(not_decimal)),
        ("H-19 CL 5 5", post("Content-Length: 5 5\r\n"), malformed(not_decimal)),
        ("H-19 CL 5a", post("Content-Length: 5a\r\n"), malformed(not_decimal)),
        ("H-20 CL overflow", post("Content-Length: 99999999999999999999999\r\n"), malformed("Content-Length overflows")),
        ("H-21 CL and TE", post("Content-Length: 37\r\nTransfer-Encoding: chunked\r\n"), malformed("both Content-Length and Transfer-Encoding")),
        ("H-22 chunked, chunked", post("Transfer-Encoding: chunked, chunked\r\n"), malformed(te_not_chunked)),
        ("H-23 chunked, gzip", post("Transfer-Encoding: chunked, gzip\r\n"), malformed(te_not_chunked)),
        ("H-24 gzip, chunked", post("Transfer-Encoding: gzip, chunked\r\n"), malformed(te_not_chunked)),
        ("H-25 xchunked", post("Transfer-Encoding: xchunked\r\n"), malformed(te_not_chunked)),
        ("H-25 TE twice", post("Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n"), malformed("duplicate Transfer-Encoding")),
        ("H-25 VT before chunked", post("Transfer-Encoding: \x0bchunked\r\n"), malformed("control byte in head")),
        ("H-26 TE in HTTP/1.0", b"POST http://example.com/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(), malformed("Transfer-Encoding in an HTTP/1.0 request")),
        ("H-34 HTTP/1.2", b"GET http://example.com/ HTTP/1.2\r\n\r\n".to_vec(), Err(UnsupportedVersion)),
        ("H-34 HTTP/2.0", b"GET http://example.com/ HTTP/2.0\r\n\r\n".to_vec(), Err(UnsupportedVersion)),
        ("H-34 http/1.1", b"GET http://example.com/ http/1.1\r\n\r\n".to_vec(), malformed("invalid HTTP version")),
        ("H-34 HTTP/01.1", b"GET http://example.com/ HTTP/01.1\r\n\r\n".to_vec(), malformed("invalid HTTP version")),
        ("H-36 origin-form", format!("GET / HTTP/1.1\r\nHost: example.com\r\n{AUTH}\r\n").into_bytes(), malformed("origin-form target: a proxy needs absolute-form (http://host/path) or CONNECT")),
        ("asterisk-form", b"OPTIONS * HTTP/1.1\r\n\r\n".to_vec(), malformed("origin-form target: a proxy needs absolute-form (http://host/path) or CONNECT")),
        ("H-38 h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), Err(UnsupportedVersion)),
        ("H-39 many leading CRLFs", [b"\r\n".repeat(5), b"GET http://example.com/ HTTP/1.1\r\n\r\n".to_vec()].concat(), malformed("too many empty lines before the start line")),
        ("H-40 Connection lists CL", post("Connection: close, Content-Length\r\nContent-Length: 5\r\n"), malformed("Connection header lists a framing header")),
        ("H-05 101 headers", many_headers.into_bytes(), Err(HeadTooLarge("too many header fields"))),
        ("A-20 two Proxy-Authorization", format!("CONNECT example.com:443 HTTP/1.1\r\n{AUTH}{AUTH}\r\n").into_bytes(), malformed("duplicate Proxy-Authorization")),
        ("C-02 no port", connect("example.com"), malformed("CONNECT authority needs a port")),
        ("C-03 scheme in CONNECT", connect("http://example.com:443"), malformed("CONNECT target must be authority-form host:port")),
        ("C-03 slash", connect("/"), malformed("CONNECT target must be authority-form host:port")),
        ("C-03 path", connect("example.com:443/x"), malformed("CONNECT target must be authority-form host:port")),
        ("C-04 empty port", connect("example.com:"), malformed(bad_port)),
        ("C-04 port 0", connect("example.com:0"), malformed(bad_port)),
        ("C-04 port 65536", connect("example.com:65536"), malformed(bad_port)),
        ("C-04 port 99999", connect("example.com:99999"), malformed(bad_port)),
        ("C-04 port +443", connect("example.com:+443"), malformed(bad_port)),
        ("C-04 port 443abc", connect("example.com:443abc"), malformed(bad_port)),
        ("C-04 space before port", connect("example.com: 443"), malformed("invalid request line")),
        ("C-05 userinfo", connect("user:pw@example.com:443"), malformed("userinfo in authority")),
        ("C-06 Host mismatch", b"CONNECT example.com:443 HTTP/1.1\r\nHost: other.com:443\r\n\r\n".to_vec(), malformed("Host header does not match the request target")),
        ("C-11 bare IPv6", connect("::1:443"), malformed("IPv6 literal must be in brackets")),
        ("C-11 unterminated", connect("[::1:443"), malformed("unterminated IPv6 literal")),
        ("C-11 zone id", connect("[fe80::1%25eth0]:443"), malformed("IPv6 zone identifiers are not allowed")),
        ("C-15 percent", connect("example%2Ecom:443"), malformed("percent-encoding in host")),
        ("C-17 bracketed name", connect("[blocked.example]:443"), malformed("brackets hold only an IPv6 literal")),
        ("C-18 long label", connect(&format!("{}.com:443", "a".repeat(64))), malformed("host name label longer than 63 bytes")),
        ("C-18 raw UTF-8", connect("exämple.com:443"), malformed("non-ASCII byte in request line")),
        ("C-19 CONNECT with CL", format!("CONNECT example.com:443 HTTP/1.1\r\n{AUTH}Content-Length: 5\r\n\r\nhello").into_bytes(), malformed("CONNECT request with a body framing header")),
        ("C-23 userinfo in URI", b"GET http://user:pass@example.com/ HTTP/1.1\r\n\r\n".to_vec(), malformed("userinfo in authority")),
        ("C-23 encoded userinfo", b"GET http://example.com%2F@127.0.0.1/ HTTP/1.1\r\n\r\n".to_vec(), malformed("userinfo in authority")),
        ("C-24 ftp scheme", b"GET ftp://example.com/ HTTP/1.1\r\n\r\n".to_vec(), Err(UnsupportedScheme)),
        ("C-24 file scheme", b"GET file:///etc/passwd HTTP/1.1\r\n\r\n".to_vec(), Err(UnsupportedScheme)),
        ("C-25 https scheme", b"GET https://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n".to_vec(), malformed("https:// targets are not proxied: use CONNECT for https")),
        ("C-27 raw UTF-8 in path", b"GET http://example.com/\xc3\xa9 HTTP/1.1\r\n\r\n".to_vec(), malformed("non-ASCII byte in request line")),
        ("C-28 duplicate Host", b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nHost: evil.com\r\n\r\n".to_vec(), malformed("duplicate Host header")),
        ("C-29 Host differs", b"GET http://a.com/ HTTP/1.1\r\nHost: b.com\r\n\r\n".to_vec(), malformed("Host header does not match the request target")),
        ("Host port differs", b"GET http://a.com/ HTTP/1.1\r\nHost: a.com:8080\r\n\r\n".to_vec(), malformed("Host header does not match the request target")),
        ("invalid Host", b"GET http://a.com/ HTTP/1.1\r\nHost: a com\r\n\r\n".to_vec(), malformed("invalid Host header")),
        ("fragment", b"GET http://a.com/#x HTTP/1.1\r\n\r\n".to_vec(), malformed("fragment in request target")),
        ("not absolute-form", b"GET example.com/ HTTP/1.1\r\n\r\n".to_vec(), malformed("request target is not absolute-form (http://host/path)")),
    ];
    assert!(cases.len() >= 50);
    for (name, input, want) in cases {
        assert_eq!(parse(&input), want, "{name}");
    }
}

#[test]
fn request_size_limits() {
    // H-01: a 70 KB request line is refused before its CRLF arrives.
    let long = format!("GET http://example.com/{} HTTP/1.1\r\n", "A".repeat(70_000));
    assert_eq!(
        parse(&long.as_bytes()[..9000]),
        Err(HttpError::HeadTooLarge("start line exceeds the line limit"))
    );
    // H-02: a request line just under 8 KiB is accepted.
    let line = format!(
        "GET http://example.com/{} HTTP/1.1\r\nHost: example.com\r\n\r\n",
        "A".repeat(7950)
    );
    let req = ok(line.as_bytes());
    assert!(
        matches!(&req.target, RequestTarget::Absolute { path_and_query, .. } if path_and_query.len() == 7951)
    );
    // H-03/H-04: the whole head over 16 KiB, complete or not.
    let big = format!(
        "CONNECT example.com:443 HTTP/1.1\r\n{}\r\n",
        format!("X-Pad: {}\r\n", "b".repeat(1000)).repeat(40)
    );
    let too_large = Err(HttpError::HeadTooLarge("head exceeds the size limit"));
    assert_eq!(parse(big.as_bytes()), too_large);
    assert_eq!(parse(&big.as_bytes()[..16_385]), too_large);
    assert_eq!(parse(&big.as_bytes()[..16_384]), Ok(None));
    // Custom limits apply.
    let tight = Limits {
        max_head_bytes: 64,
        max_line_bytes: 32,
        max_headers: 1,
    };
    assert_eq!(
        parse_request(b"CONNECT a.b:1 HTTP/1.1\r\nA: b\r\nC: d\r\n\r\n", &tight),
        Err(HttpError::HeadTooLarge("too many header fields"))
    );
    assert!(
        parse_request(b"CONNECT a.b:1 HTTP/1.1\r\nA: b\r\n\r\n", &tight)
            .unwrap()
            .is_some()
    );
}

#[test]
fn connect_request_facts() {
    // C-01, C-20: the head ends before tunnel payload, which is not consumed.
    let head = format!(
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n{AUTH}Respond-With: IP, Country ,city,,\r\n\r\n"
    );
    let input = [head.as_bytes(), b"\x16\x03\x01\x02\x00"].concat();
    let req = ok(&input);
    assert_eq!(req.method, Method::Connect);
    assert_eq!(req.version, Version::Http11);
    assert_eq!(req.head_len, head.len());
    assert_eq!(
        req.target,
        RequestTarget::Authority(Target::new(Host::Domain("example.com".into()), 443))
    );
    assert_eq!(req.body, BodyFraming::None);
    assert!(req.keep_alive);
    assert_eq!(
        req.proxy_authorization(),
        Some(&b"Basic cGFja2FnZS0xMjMtY291bnRyeS11czpzM2NyM3Qta2V5"[..])
    );
    assert_eq!(req.respond_with, ["ip", "country", "city"]);
    assert_eq!(req.host(), Some("example.com:443"));
    assert_eq!(
        req.header("RESPOND-WITH"),
        Some(&b"IP, Country ,city,,"[..])
    );
}

#[test]
fn request_targets_accepted() {
    let target = |line: &str| ok(format!("{line} HTTP/1.1\r\n\r\n").as_bytes()).target;
    let abs = |host: Host, port, path: &str| RequestTarget::Absolute {
        target: Target::new(host, port),
        path_and_query: path.into(),
    };
    let dom = |s: &str| Host::Domain(s.into());
    assert_eq!(
        target("GET http://example.com"),
        abs(dom("example.com"), 80, "/")
    );
    assert_eq!(
        target("GET HTTP://Example.com:8080?q=1"),
        abs(dom("example.com"), 8080, "/?q=1")
    );
    // C-26: the path is kept byte-exact, never decoded.
    assert_eq!(
        target("GET http://example.com/%2e%2e/%00?x=%zz"),
        abs(dom("example.com"), 80, "/%2e%2e/%00?x=%zz")
    );
    assert_eq!(
        target("CONNECT [2606:4700:4700::1111]:443"),
        RequestTarget::Authority(Target::new(
            Host::Ip("2606:4700:4700::1111".parse().unwrap()),
            443
        ))
    );
    assert_eq!(
        target("CONNECT 127.0.0.1:443"),
        RequestTarget::Authority(Target::new(Host::Ip("127.0.0.1".parse().unwrap()), 443))
    );
    // C-12: numeric-looking names are read as resolvers read them
    // (inet_aton), so the policy judges the address they mean.
    assert_eq!(
        target("CONNECT 127.1:80"),
        RequestTarget::Authority(Target::new(Host::Ip("127.0.0.1".parse().unwrap()), 80))
    );
    assert_eq!(
        target("CONNECT 0x7f.1:80"),
        RequestTarget::Authority(Target::new(Host::Ip("127.0.0.1".parse().unwrap()), 80))
    );
    assert_eq!(
        target("CONNECT 0177.0.0.1:80"),
        RequestTarget::Authority(Target::new(Host::Ip("127.0.0.1".parse().unwrap()), 80))
    );
}

#[test]
fn request_framing_and_keep_alive() {
    let req = ok(&post("Content-Length: 5\r\n"));
    assert_eq!(req.body, BodyFraming::ContentLength(5));
    let req = ok(&post("transfer-encoding: Chunked\r\n"));
    assert_eq!(req.body, BodyFraming::Chunked);
    let req = ok(&post("Connection: close\r\n"));
    assert!(!req.keep_alive);
    let req = ok(b"GET http://a.com/ HTTP/1.0\r\n\r\n");
    assert!(!req.keep_alive);
    let req = ok(b"GET http://a.com/ HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
    assert!(req.keep_alive);
    assert_eq!(req.version, Version::Http10);
    // One leading CRLF is tolerated and counted in head_len.
    let input = b"\r\nGET http://a.com/ HTTP/1.1\r\n\r\nNEXT";
    assert_eq!(ok(input).head_len, input.len() - 4);
    // lowercase header names are recognised.
    let req = ok(b"CONNECT a.com:443 HTTP/1.1\r\nproxy-authorization: basic eDp5\r\n\r\n");
    assert_eq!(req.proxy_authorization(), Some(&b"basic eDp5"[..]));
}

#[test]
fn request_needs_more_bytes() {
    let full = format!("CONNECT example.com:443 HTTP/1.1\r\n{AUTH}\r\n");
    for k in 0..full.len() {
        assert_eq!(parse(&full.as_bytes()[..k]), Ok(None), "prefix {k}");
    }
}

#[test]
fn forward_head_strips_hop_by_hop() {
    let req = ok(format!(
        "GET http://example.com:8080/a?b HTTP/1.0\r\n{AUTH}Connection: keep-alive, X-Secret\r\n\
         Keep-Alive: 5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X\r\n\
         Upgrade: foo\r\nRespond-With: ip\r\nX-Secret: s\r\nAuthorization: Basic origin\r\n\
         Accept: */*\r\n\r\n"
    )
    .as_bytes());
    let mut out = Vec::new();
    write_forward_head(&req, &mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "GET /a?b HTTP/1.1\r\nHost: example.com:8080\r\nAuthorization: Basic origin\r\nAccept: */*\r\n\r\n"
    );
    // A client Host is kept as sent; the default port is not written.
    let req =
        ok(b"POST http://Example.com/ HTTP/1.1\r\nHost: Example.com\r\nContent-Length: 2\r\n\r\n");
    let mut out = Vec::new();
    write_forward_head(&req, &mut out);
    assert_eq!(
        out,
        b"POST / HTTP/1.1\r\nHost: Example.com\r\nContent-Length: 2\r\n\r\n"
    );
    let req = ok(b"GET http://[::1]/ HTTP/1.1\r\n\r\n");
    let mut out = Vec::new();
    write_forward_head(&req, &mut out);
    assert_eq!(out, b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n");
}

fn resp(input: &[u8], method: Method) -> Response {
    match parse_response(input, &Limits::default(), &method) {
        Ok(Some(r)) => r,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(input)),
    }
}

#[test]
fn response_framing_table() {
    use BodyFraming::*;
    let cases: Vec<(&[u8], Method, BodyFraming, bool)> = vec![
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            Method::Get,
            ContentLength(5),
            true,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            Method::Head,
            None,
            true,
        ),
        (b"HTTP/1.1 204 No Content\r\n\r\n", Method::Get, None, true),
        (
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            Method::Get,
            None,
            true,
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\n", Method::Post, None, true),
        (b"HTTP/1.1 200 OK\r\n\r\n", Method::Connect, None, true),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            Method::Get,
            Chunked,
            true,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            Method::Get,
            Chunked,
            true,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            Method::Get,
            UntilClose,
            false,
        ),
        (b"HTTP/1.1 200 OK\r\n\r\n", Method::Get, UntilClose, false),
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            Method::Get,
            ContentLength(0),
            false,
        ),
        (
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
            Method::Get,
            ContentLength(1),
            false,
        ),
        (
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
            Method::Get,
            ContentLength(1),
            true,
        ),
    ];
    for (input, method, body, keep_alive) in cases {
        let r = resp(input, method);
        assert_eq!(
            (r.body, r.keep_alive),
            (body, keep_alive),
            "{:?}",
            String::from_utf8_lossy(input)
        );
        assert_eq!(r.head_len, input.len());
    }
}

#[test]
fn response_rejections() {
    let cases: Vec<(&[u8], HttpError)> = vec![
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            HttpError::Malformed("both Content-Length and Transfer-Encoding"),
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            HttpError::Malformed("duplicate Content-Length"),
        ),
        (
            b"HTTP/1.1 200 OK\nContent-Length: 1\n\n",
            HttpError::Malformed("bare LF line ending (CRLF required)"),
        ),
        (
            b"HTTP/1.1 2000 OK\r\n\r\n",
            HttpError::Malformed("invalid status code"),
        ),
        (b"HTTP/2.0 200 OK\r\n\r\n", HttpError::UnsupportedVersion),
        (
            b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
            HttpError::Malformed("header line starts with whitespace (obs-fold is not accepted)"),
        ),
    ];
    for (input, want) in cases {
        assert_eq!(
            parse_response(input, &Limits::default(), &Method::Get),
            Err(want),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn response_head_rewrite() {
    let r = resp(
        b"HTTP/1.0 404 Not Found\r\nConnection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 1\r\n\
          Proxy-Authenticate: Basic\r\nContent-Length: 3\r\nServer: t\r\n\r\nabc",
        Method::Get,
    );
    assert_eq!((r.status, &*r.reason), (404, "Not Found"));
    let mut out = Vec::new();
    write_response_head(&r, &[("X-SOAX-Node", "n1")], &mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nServer: t\r\nX-SOAX-Node: n1\r\n\r\n"
    );
}

#[test]
fn upstream_connect_exchange() {
    let mut out = Vec::new();
    write_connect_request("example.com", 443, Some(("user", "pass")), &mut out);
    assert_eq!(
        out,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\n\r\n"
    );
    let mut out = Vec::new();
    write_connect_request("2001:db8::1", 80, None, &mut out);
    assert_eq!(
        out,
        b"CONNECT [2001:db8::1]:80 HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n"
    );

    let reply = b"HTTP/1.1 200 Connection established\r\nVia: n\r\n\r\n\x16\x03";
    assert_eq!(
        parse_connect_response(reply),
        Ok(Some(ConnectResponse {
            status: 200,
            head_len: reply.len() - 2
        }))
    );
    assert_eq!(parse_connect_response(&reply[..20]), Ok(None));
    assert_eq!(
        parse_connect_response(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"),
        Ok(Some(ConnectResponse {
            status: 407,
            head_len: 46
        }))
    );
    assert_eq!(
        parse_connect_response(b"SSH-2.0-OpenSSH\r\n\r\n"),
        Err(HttpError::Malformed("invalid HTTP version"))
    );
}

// ---- decode_basic ----

#[test]
fn basic_credentials_table() {
    use AuthError::*;
    let ok = |u: &str, p: &str| Ok((u.to_owned(), p.to_owned()));
    let cases: Vec<(&[u8], Result<(String, String), AuthError>)> = vec![
        (
            b"Basic cGFja2FnZS0xMjMtY291bnRyeS11czpzM2NyM3Qta2V5",
            ok("package-123-country-us", "s3cr3t-key"),
        ),
        (
            b"basic cGFja2FnZS0xMjMtY291bnRyeS11czpzM2NyM3Qta2V5",
            ok("package-123-country-us", "s3cr3t-key"),
        ),
        (b"BASIC  dXNlcjpwYXNz", ok("user", "pass")), // 1*SP
        (b"Basic dXNlcjo=", ok("user", "")),
        (b"Basic dTpwOnE=", ok("u", "p:q")),
        (b"Bearer abc", Err(NotBasic)),
        (b"Digest username=\"x\"", Err(NotBasic)),
        (b"Negotiate YII=", Err(NotBasic)),
        (b"Basicx dXNlcjpwYXNz", Err(NotBasic)),
        (b"Basic\tdXNlcjpwYXNz", Err(InvalidBase64)), // tab
        (b"Basic", Err(InvalidBase64)),
        (b"Basic ", Err(InvalidBase64)),
        (b"Basic !!!!", Err(InvalidBase64)),
        (b"Basic cGFja2FnZQ", Err(InvalidBase64)),
        (b"Basic cGFj a2Fn", Err(InvalidBase64)),
        (b"Basic cGFja2FnZS0xMjM_LWE-", Err(InvalidBase64)),
        (b"Basic dXNlcjpwYXNz=", Err(InvalidBase64)),
        (b"Basic dQ==dQ==", Err(InvalidBase64)),
        (b"Basic dR==", Err(InvalidBase64)), // non-zero unused bits
        (b"Basic ====", Err(InvalidBase64)),
        (b"Basic cGFja2FnZS0xMjM=", Err(MissingColon)),
        (b"Basic //46/w==", Err(NotUtf8)),
        (b"Basic OnBhc3M=", Err(EmptyUsername)),
    ];
    for (input, want) in cases {
        assert_eq!(
            decode_basic(input).map(|c| (c.username().to_owned(), c.password().to_owned())),
            want,
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
    // over-long credentials are refused, huge blobs before decoding.
    // A username of 256..=4096 bytes is decoded so the policy can answer
    // ERR_INVALID_VALUE after checking the key; a longer one is refused.
    let long_user = test_encode(format!("{}:k", "u".repeat(4097)).as_bytes());
    assert_eq!(
        decode_basic(format!("Basic {long_user}").as_bytes()),
        Err(TooLong)
    );
    let long_pass = test_encode(format!("u:{}", "k".repeat(256)).as_bytes());
    assert_eq!(
        decode_basic(format!("Basic {long_pass}").as_bytes()),
        Err(TooLong)
    );
    let ok_user = test_encode(format!("{}:k", "u".repeat(300)).as_bytes());
    assert_eq!(
        decode_basic(format!("Basic {ok_user}").as_bytes()).map(|c| c.username().len()),
        Ok(300)
    );
    let huge = format!("Basic {}", "A".repeat(64 * 1024));
    assert_eq!(decode_basic(huge.as_bytes()), Err(TooLong));
    let max = format!("{}:{}", "u".repeat(255), "p".repeat(255));
    assert_eq!(
        decode_basic(format!("Basic {}", test_encode(max.as_bytes())).as_bytes())
            .map(|c| (c.username().to_owned(), c.password().to_owned())),
        Ok(("u".repeat(255), "p".repeat(255)))
    );
    // Around the length kept inline (256 decoded bytes) and past it, with
    // every padding: the same credentials come back.
    for n in 248..=262 {
        let (user, pass) = ("u".repeat(n), format!("k{n}"));
        let header = format!("Basic {}", test_encode(format!("{user}:{pass}").as_bytes()));
        assert_eq!(
            decode_basic(header.as_bytes())
                .map(|c| (c.username().to_owned(), c.password().to_owned())),
            Ok((user, pass)),
            "username of {n} bytes"
        );
    }
}

/// An independent base64 encoder, so the decoder is not checked against itself.
fn test_encode(raw: &[u8]) -> String {
    let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = String::new();
    for &b in raw {
        bits = (bits << 8) | u32::from(b);
        nbits += 8;
        while nbits >= 6 {
            nbits -= 6;
            out.push(table[((bits >> nbits) & 63) as usize] as char);
        }
    }
    if nbits > 0 {
        out.push(table[((bits << (6 - nbits)) & 63) as usize] as char);
    }
    while !out.len().is_multiple_of(4) {
        out.push('=');
    }
    out
}

#[test]
fn encode_basic_matches_test_encoder() {
    for (u, p) in [("a", ""), ("ab", "c"), ("user", "pass"), ("ünï", "çødé")] {
        assert_eq!(
            encode_basic(u, p),
            format!("Basic {}", test_encode(format!("{u}:{p}").as_bytes()))
        );
    }
}

// ---- BodyTracker ----

/// Feeds `data` whole; returns bytes consumed and whether the body ended.
fn feed_whole(framing: BodyFraming, data: &[u8]) -> Result<(usize, bool), BodyError> {
    let mut t = BodyTracker::new(framing);
    let n = t.feed(data)?;
    Ok((n, t.is_done()))
}

fn feed_bytewise(framing: BodyFraming, data: &[u8]) -> Result<(usize, bool), BodyError> {
    let mut t = BodyTracker::new(framing);
    let mut total = 0;
    for b in data {
        total += t.feed(std::slice::from_ref(b))?;
    }
    Ok((total, t.is_done()))
}

#[test]
fn body_tracker_table() {
    use BodyError::*;
    use BodyFraming::Chunked as C;
    let long_ext = format!("1;{}\r\nZ\r\n0\r\n\r\n", "x".repeat(10_000));
    let big_trailer = format!("0\r\nX: {}\r\n\r\n", "t".repeat(9000));
    let cases: Vec<(BodyFraming, &[u8], Result<(usize, bool), BodyError>)> = vec![
        (BodyFraming::None, b"GET", Ok((0, true))),
        (BodyFraming::ContentLength(0), b"abc", Ok((0, true))),
        (BodyFraming::ContentLength(5), b"hello!", Ok((5, true))),
        (BodyFraming::ContentLength(5), b"hel", Ok((3, false))),
        (BodyFraming::UntilClose, b"anything", Ok((8, false))),
        (C, b"5\r\nhello\r\n0\r\n\r\nGET", Ok((15, true))),
        (
            C,
            b"A;name=val;x\r\n0123456789\r\n0\r\nX-T: 1\r\nY: 2\r\n\r\n",
            Ok((45, true)),
        ),
        (C, b"00000000000000000\r\n", Err(ChunkSizeTooLong)),
        (C, b"5\r\nhel", Ok((6, false))),
        (C, b"zz\r\nhello\r\n0\r\n\r\n", Err(InvalidChunkSize)), // H-27
        (
            C,
            b"FFFFFFFFFFFFFFFFF1\r\nA\r\n0\r\n\r\n",
            Err(ChunkSizeTooLong),
        ), // H-28
        (C, b"FFFFFFFFFFFFFFFF\r\n", Ok((18, false))),           // 16 digits: fine
        (
            C,
            b"1these-bytes-never-get-validated\r\nZ\r\n0\r\n\r\n",
            Err(InvalidChunkSize),
        ), // H-29
        (C, b"1;ext\nZ\r\n0\r\n\r\n", Err(BadLineEnding)),       // H-30
        (C, b"0x1\r\nZ\r\n0\r\n\r\n", Err(InvalidChunkSize)),    // H-31
        (C, b"0_0\r\n\r\n", Err(InvalidChunkSize)),
        (C, b" 1\r\nZ\r\n0\r\n\r\n", Err(InvalidChunkSize)),
        (C, b"\r\n", Err(InvalidChunkSize)),
        (C, b"3\r\nabcd\r\n0\r\n\r\n", Err(MissingChunkCrlf)), // H-32
        (C, b"3\r\nabc\n", Err(MissingChunkCrlf)),
        (C, b"1\rZ", Err(BadLineEnding)),
        (C, long_ext.as_bytes(), Err(ChunkExtensionTooLong)), // H-33
        (C, b"1;a\x00\r\nZ\r\n", Err(ControlByte)),
        (C, big_trailer.as_bytes(), Err(TrailersTooLarge)),
        (C, b"0\r\n folded\r\n\r\n", Err(TrailerFold)),
        (C, b"0\r\nX: 1\n\r\n", Err(BadLineEnding)),
        (C, b"0\r\n\rX", Err(BadLineEnding)),
    ];
    for (framing, input, want) in cases {
        let name = String::from_utf8_lossy(&input[..input.len().min(40)]).into_owned();
        assert_eq!(feed_whole(framing, input), want, "whole {name:?}");
        assert_eq!(feed_bytewise(framing, input), want, "bytewise {name:?}");
    }
}

#[test]
fn body_tracker_error_is_sticky_and_done_consumes_nothing() {
    let mut t = BodyTracker::new(BodyFraming::Chunked);
    assert_eq!(t.feed(b"g"), Err(BodyError::InvalidChunkSize));
    assert_eq!(t.feed(b"0\r\n\r\n"), Err(BodyError::InvalidChunkSize));
    let mut t = BodyTracker::new(BodyFraming::Chunked);
    assert_eq!(t.feed(b"0\r\n\r\n"), Ok(5));
    assert!(t.is_done());
    assert_eq!(t.feed(b"more"), Ok(0));
    assert!(BodyTracker::new(BodyFraming::UntilClose).ends_at_close());
}

// ---- properties ----

const SEED_REQUESTS: &[&[u8]] = &[
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nProxy-Authorization: Basic eDp5\r\n\r\nTUNNEL",
    b"GET http://example.com/a?b HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    b"POST http://[::1]:8080/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"\r\nPOST http://a.b/ HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc",
];

const SEED_RESPONSES: &[&[u8]] = &[
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 Connection established\r\n\r\n",
    b"HTTP/1.0 502 Bad Gateway\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
];

/// A seed with one byte replaced and some bytes appended.
fn mutated(seeds: &'static [&'static [u8]]) -> impl Strategy<Value = Vec<u8>> {
    (
        0..seeds.len(),
        any::<prop::sample::Index>(),
        any::<u8>(),
        prop::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(move |(s, at, byte, tail)| {
            let mut v = seeds[s].to_vec();
            let i = at.index(v.len());
            v[i] = byte;
            v.extend(tail);
            v
        })
}

fn chunked_body() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(prop::collection::vec(any::<u8>(), 1..40), 0..5),
        prop::collection::vec("[A-Za-z-]{1,8}: [ -~]{0,10}", 0..3),
        any::<bool>(),
    )
        .prop_map(|(chunks, trailers, ext)| {
            let mut v = Vec::new();
            for c in chunks {
                v.extend(format!("{:X}", c.len()).bytes());
                if ext {
                    v.extend(b";a=\"b\"");
                }
                v.extend(b"\r\n");
                v.extend(c);
                v.extend(b"\r\n");
            }
            v.extend(b"0\r\n");
            for t in trailers {
                v.extend(t.bytes());
                v.extend(b"\r\n");
            }
            v.extend(b"\r\nNEXT");
            v
        })
}

proptest! {
    #[test]
    fn request_parser_split_invariant(input in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        mutated(SEED_REQUESTS),
        prop::sample::select(SEED_REQUESTS).prop_map(<[u8]>::to_vec),
    ]) {
        assert_split_invariant(&input, parse);
    }

    #[test]
    fn response_parsers_split_invariant(input in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        mutated(SEED_RESPONSES),
    ]) {
        assert_split_invariant(&input, |b| parse_response(b, &Limits::default(), &Method::Get));
        assert_split_invariant(&input, |b| parse_response(b, &Limits::default(), &Method::Head));
        assert_split_invariant(&input, parse_connect_response);
    }

    #[test]
    fn parsed_requests_forward_without_panic(input in mutated(SEED_REQUESTS)) {
        if let Ok(Some(req)) = parse(&input) {
            let mut out = Vec::new();
            write_forward_head(&req, &mut out);
            prop_assert!(!out.windows(19).any(|w| w.eq_ignore_ascii_case(b"proxy-authorization")));
            // The forwarded head is origin-form: check it is one complete head.
            let mut slots = [httparse::EMPTY_HEADER; 128];
            let parsed = httparse::Request::new(&mut slots).parse(&out);
            prop_assert_eq!(parsed, Ok(httparse::Status::Complete(out.len())));
        }
    }

    #[test]
    fn body_tracker_bytewise_equals_whole(
        framing in prop_oneof![
            Just(BodyFraming::Chunked),
            Just(BodyFraming::UntilClose),
            Just(BodyFraming::None),
            (0u64..64).prop_map(BodyFraming::ContentLength),
        ],
        data in prop_oneof![prop::collection::vec(any::<u8>(), 0..120), chunked_body()],
    ) {
        prop_assert_eq!(feed_whole(framing, &data), feed_bytewise(framing, &data));
    }

    #[test]
    fn body_tracker_finds_end_of_valid_chunked(body in chunked_body(), cut in any::<prop::sample::Index>()) {
        // Any two-piece split finds the same end: just before `NEXT`.
        let mut t = BodyTracker::new(BodyFraming::Chunked);
        let at = cut.index(body.len() + 1);
        let n = t.feed(&body[..at]).unwrap() + t.feed(&body[at..]).unwrap();
        prop_assert!(t.is_done());
        prop_assert_eq!(n, body.len() - 4);
    }

    #[test]
    fn decode_basic_round_trips(
        user in "[^:\u{0}]{1,60}".prop_filter("≤255 bytes", |u| u.len() <= 255),
        pass in ".{0,60}".prop_filter("≤255 bytes", |p| p.len() <= 255),
    ) {
        let header = format!("Basic {}", test_encode(format!("{user}:{pass}").as_bytes()));
        let decoded = decode_basic(header.as_bytes())
            .map(|c| (c.username().to_owned(), c.password().to_owned()));
        prop_assert_eq!(decoded, Ok((user.clone(), pass.clone())));
        prop_assert_eq!(encode_basic(&user, &pass), header);
    }

    #[test]
    fn decode_basic_never_panics(value in prop::collection::vec(any::<u8>(), 0..100)) {
        let _ = decode_basic(&value);
    }
}

#[test]
fn heads_with_more_fields_than_the_stack_holds_keep_every_field_in_order() {
    // 40 fields (past the 32 httparse slots kept on the stack) in a
    // request and in a response: each comes back in order, names as sent,
    // values trimmed, and each survives into the forwarded head.
    let fields: String = (0..40)
        .map(|i| format!("X-Field-{i}: \t value {i} \r\n"))
        .collect();
    let head = format!("GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n{fields}\r\n");
    let req = ok(head.as_bytes());
    assert_eq!(req.headers.len(), 41);
    assert_eq!(req.host(), Some("example.com"));
    assert_eq!(req.proxy_authorization(), None);
    for (i, h) in req.headers.iter().skip(1).enumerate() {
        assert_eq!(h.name, format!("X-Field-{i}"));
        assert_eq!(h.value, format!("value {i}").as_bytes());
    }
    assert_eq!(req.header("x-field-39"), Some(&b"value 39"[..]));
    let mut out = Vec::new();
    write_forward_head(&req, &mut out);
    let out = String::from_utf8(out).unwrap();
    for i in 0..40 {
        assert!(
            out.contains(&format!("\r\nX-Field-{i}: value {i}\r\n")),
            "{out}"
        );
    }
    let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n{fields}\r\n");
    let resp = parse_response(resp.as_bytes(), &Limits::default(), &Method::Get)
        .unwrap()
        .unwrap();
    assert_eq!(resp.headers.len(), 41);
    assert_eq!(resp.headers.at(40).name, "X-Field-39");
    assert_eq!(resp.headers.at(40).value, b"value 39");
    assert_eq!(resp.body, BodyFraming::ContentLength(0));
}

/// A dropped head's field buffers serve the thread's next head: what the
/// next head reads is its own fields only, never the last one's.
#[test]
fn a_heads_field_buffers_are_reused_without_leftovers() {
    let first = b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\nX-Long: aaaaaaaaaaaaaaaaaaaa\r\nX-Three: 3\r\n\r\n";
    let req = parse_request(first, &Limits::default()).unwrap().unwrap();
    assert_eq!(req.headers.len(), 3);
    drop(req);
    let second = b"GET http://b.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n";
    let req = parse_request(second, &Limits::default()).unwrap().unwrap();
    assert_eq!(req.headers.len(), 1);
    assert_eq!(req.headers.get("host"), Some(&b"b.example"[..]));
    assert_eq!(req.headers.get("x-long"), None);
    let fields: Vec<_> = req.headers.iter().map(|h| (h.name, h.value)).collect();
    assert_eq!(fields, [("Host", &b"b.example"[..])]);
    // A clone owns its own buffers; both stay whole after the other drops.
    let copy = req.headers.clone();
    drop(req);
    assert_eq!(copy.get("host"), Some(&b"b.example"[..]));
}

/// A dropped head's path and reason buffers serve the thread's next head,
/// holding only the new text.
#[test]
fn a_heads_text_buffers_are_reused_without_leftovers() {
    let long = format!("GET http://a.example/{} HTTP/1.1\r\n\r\n", "p".repeat(300));
    let req = parse_request(long.as_bytes(), &Limits::default())
        .unwrap()
        .unwrap();
    drop(req);
    let path = |line: &[u8]| match parse(line).unwrap().unwrap().target {
        RequestTarget::Absolute { path_and_query, .. } => path_and_query.to_string(),
        other => panic!("{other:?}"),
    };
    assert_eq!(path(b"GET http://b.example HTTP/1.1\r\n\r\n"), "/");
    assert_eq!(path(b"GET http://b.example?q=1 HTTP/1.1\r\n\r\n"), "/?q=1");
    let long_reason = format!(
        "HTTP/1.1 200 {}\r\nContent-Length: 0\r\n\r\n",
        "R".repeat(200)
    );
    let r = parse_response(long_reason.as_bytes(), &Limits::default(), &Method::Get)
        .unwrap()
        .unwrap();
    drop(r);
    let r = parse_response(b"HTTP/1.1 204 \r\n\r\n", &Limits::default(), &Method::Get)
        .unwrap()
        .unwrap();
    assert_eq!(&*r.reason, "");
}
