//! HTTP framing (catalogue 2.1).

use splicegate_tests::catalog::*;
use splicegate_tests::*;

pub(crate) fn cases(lab: &Lab) -> Vec<Case> {
    let w = lab.w();
    let a = auth_line();
    let get = |extra: &str| format!("GET http://{w}/ip HTTP/1.1\r\nHost: {w}\r\n{a}{extra}\r\n");
    let post = |headers: &str, body: &str| {
        format!("POST http://{w}/echo HTTP/1.1\r\nHost: {w}\r\n{a}{headers}\r\n{body}")
    };
    let chunked = |body: &str| post("Transfer-Encoding: chunked\r\n", body);
    let mut v = Vec::new();

    // Sizes: the line limit is 8192 bytes, the head 16384, 100 fields.
    let prefix = format!("GET http://{w}/");
    let line_of = |n: usize| {
        let path = "A".repeat(n - prefix.len() - " HTTP/1.1".len());
        format!("{prefix}{path} HTTP/1.1\r\nHost: {w}\r\n{a}\r\n")
    };
    v.push(case(
        "H-01 request line of 70 kB",
        format!(
            "GET http://{w}/{} HTTP/1.1\r\nHost: {w}\r\n{a}\r\n",
            "A".repeat(70_000)
        ),
        too_large(),
    ));
    v.push(case(
        "H-02 request line of 8000 bytes",
        line_of(8000),
        Expect::Forwarded,
    ));
    v.push(case(
        "H-02b request line of exactly 8192 bytes",
        line_of(8192),
        Expect::Forwarded,
    ));
    v.push(case(
        "H-02c request line of 8193 bytes",
        line_of(8193),
        too_large(),
    ));
    v.push(case(
        "H-03 one header value of 70 kB",
        get(&format!("X-Big: {}\r\n", "a".repeat(70_000))),
        too_large(),
    ));
    let pads: String = (0..40)
        .map(|i| format!("X-Pad-{i:02}: {}\r\n", "b".repeat(1000)))
        .collect();
    v.push(case("H-04 header block of 40 kB", get(&pads), too_large()));
    let many: String = (0..1000).map(|_| "X-N: v\r\n").collect();
    v.push(case("H-05 1000 header fields", get(&many), too_large()));
    // Host and Proxy-Authorization are two of the fields.
    let fields = |n: usize| -> String { (0..n).map(|i| format!("X-F{i}: v\r\n")).collect() };
    v.push(case(
        "H-05b exactly 100 header fields",
        get(&fields(98)),
        Expect::Forwarded,
    ));
    v.push(case(
        "H-05c 101 header fields",
        get(&fields(99)),
        too_large(),
    ));

    // Line endings and folding.
    v.push(case(
        "H-06 bare LF everywhere",
        get("").replace("\r\n", "\n"),
        bad(),
    ));
    v.push(case(
        "H-06b one header ended by a bare LF",
        get("X-A: b\nX-C: d\r\n"),
        bad(),
    ));
    v.push(case(
        "H-07 bare CR inside the head",
        format!("GET http://{w}/ip HTTP/1.1\r\nHost: {w}\rX: y\r\n{a}\r\n"),
        bad(),
    ));
    v.push(case("H-08 obs-fold", get("X-Fold: a\r\n b\r\n"), bad()));
    v.push(case(
        "H-09 obs-fold inside the credentials",
        format!(
            "CONNECT {e} HTTP/1.1\r\nHost: {e}\r\nProxy-Authorization: Basic\r\n {}\r\n\r\n",
            b64(format!("{USER}:{KEY}").as_bytes()),
            e = lab.e()
        ),
        bad(),
    ));
    v.push(case(
        "H-10 whitespace between a field name and its colon",
        format!(
            "CONNECT {e} HTTP/1.1\r\nHost: {e}\r\nProxy-Authorization : {}\r\n\r\n",
            basic(USER, KEY),
            e = lab.e()
        ),
        bad(),
    ));
    v.push(case(
        "H-11 whitespace before the first field line",
        format!("GET http://{w}/ip HTTP/1.1\r\n Host: {w}\r\n{a}\r\n"),
        bad(),
    ));
    v.push(case(
        "H-12 empty field name",
        get(":\r\nContent-Length: 27\r\n"),
        bad(),
    ));

    // NUL, control and non-ASCII bytes.
    v.push(case("H-13 NUL in a field name", get("X\0Y: z\r\n"), bad()));
    v.push(case(
        "H-14 NUL in a field value",
        get("X-A: a\0b\r\n"),
        bad(),
    ));
    v.push(case(
        "H-15 control bytes 01 and 7f in a value",
        get("X-A: a\x01\x7fb\r\n"),
        bad(),
    ));
    v.push(case(
        "H-15b NUL in the request line",
        format!("GET http://{w}/\0 HTTP/1.1\r\nHost: {w}\r\n{a}\r\n"),
        bad(),
    ));
    v.push(case(
        "H-15c raw UTF-8 in the request-target",
        cat(&[
            format!("GET http://{w}/").as_bytes(),
            b"\xc3\xa9",
            format!(" HTTP/1.1\r\nHost: {w}\r\n{a}\r\n").as_bytes(),
        ]),
        bad(),
    ));
    v.push(case(
        "H-15d obs-text (UTF-8) in a field value is forwarded",
        cat(&[
            format!("GET http://{w}/ip HTTP/1.1\r\nHost: {w}\r\n{a}X-A: caf").as_bytes(),
            b"\xc3\xa9\r\n\r\n",
        ]),
        Expect::Forwarded,
    ));
    v.push(case(
        "H-15e non-ASCII in a field name",
        cat(&[
            format!("GET http://{w}/ip HTTP/1.1\r\nHost: {w}\r\n{a}X-").as_bytes(),
            b"\xc3\x9c: v\r\n\r\n",
        ]),
        bad(),
    ));
    v.push(case(
        "H-15f ESC (ANSI) in a field value",
        get("X-A: \x1b[31mred\r\n"),
        bad(),
    ));

    // Content-Length and Transfer-Encoding.
    v.push(case(
        "H-16 two different Content-Lengths",
        post("Content-Length: 5\r\nContent-Length: 6\r\n", "hello!"),
        bad(),
    ));
    v.push(case(
        "H-16b two equal Content-Lengths",
        post("Content-Length: 5\r\nContent-Length: 5\r\n", "hello"),
        bad(),
    ));
    v.push(case(
        "H-17 Content-Length list 5, 5",
        post("Content-Length: 5, 5\r\n", "hello"),
        bad(),
    ));
    v.push(case(
        "H-18 empty Content-Length",
        post("Content-Length: \r\n", ""),
        bad(),
    ));
    for cl in ["+5", "-1", "0x5", "5 5", "5a", " 5,"] {
        v.push(case(
            &format!("H-19 Content-Length {cl:?}"),
            post(&format!("Content-Length: {cl}\r\n"), "hello"),
            bad(),
        ));
    }
    v.push(case(
        "H-20 Content-Length of 23 digits",
        post("Content-Length: 99999999999999999999999\r\n", ""),
        bad(),
    ));
    v.push(case(
        "H-21 Content-Length and chunked, smuggling a request",
        post(
            "Content-Length: 37\r\nTransfer-Encoding: chunked\r\n",
            "0\r\n\r\nGET /smuggled HTTP/1.1\r\nX: y\r\n\r\n",
        ),
        bad(),
    ));
    for (id, te) in [
        ("H-22", "chunked, chunked"),
        ("H-23", "chunked, gzip"),
        ("H-24", "gzip, chunked"),
        ("H-25", "xchunked"),
        ("H-25b", "identity"),
    ] {
        v.push(case(
            &format!("{id} Transfer-Encoding: {te}"),
            post(&format!("Transfer-Encoding: {te}\r\n"), "0\r\n\r\n"),
            bad(),
        ));
    }
    v.push(case(
        "H-25c chunked then identity on two lines",
        post(
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            "0\r\n\r\n",
        ),
        bad(),
    ));
    v.push(case(
        "H-25d Transfer-Encoding: \\x0bchunked",
        post("Transfer-Encoding: \x0bchunked\r\n", "0\r\n\r\n"),
        bad(),
    ));
    v.push(case(
        "H-26 chunked in an HTTP/1.0 request",
        format!(
            "POST http://{w}/echo HTTP/1.0\r\nHost: {w}\r\n{a}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
        bad(),
    ));

    // Chunk sizes in a forwarded body. A well-formed one first.
    v.push(case(
        "H-27a a well-formed chunked body is forwarded",
        chunked("5\r\nhello\r\n0\r\n\r\n"),
        Expect::Forwarded,
    ));
    for (id, body) in [
        ("H-27 chunk size zz", "zz\r\nhello\r\n0\r\n\r\n".to_string()),
        (
            "H-28 chunk size of 17 hex digits",
            "FFFFFFFFFFFFFFFFF1\r\nA\r\n0\r\n\r\n".to_string(),
        ),
        (
            "H-29 garbage after the chunk size",
            "1these-bytes-never-get-validated\r\nZ\r\n0\r\n\r\n".to_string(),
        ),
        (
            "H-30 bare LF after a chunk extension",
            "1;ext\nZ\r\n0\r\n\r\n".to_string(),
        ),
        ("H-31 chunk size 0x1", "0x1\r\nZ\r\n0\r\n\r\n".to_string()),
        (
            "H-31b chunk size with a leading space",
            " 1\r\nZ\r\n0\r\n\r\n".to_string(),
        ),
        ("H-31c chunk size 0_0", "0_0\r\n\r\n".to_string()),
        ("H-31d chunk size -1", "-1\r\nZ\r\n0\r\n\r\n".to_string()),
        (
            "H-32 chunk data longer than its size",
            "3\r\nabcd\r\n0\r\n\r\n".to_string(),
        ),
        (
            "H-33 chunk extension of 10 kB",
            format!("1;{}\r\nZ\r\n0\r\n\r\n", "x".repeat(10_000)),
        ),
    ] {
        v.push(case(id, chunked(&body), bad()).bug(BUG_CHUNK));
    }

    // Versions and request-line shapes.
    for version in ["HTTP/1.2", "HTTP/2.0", "HTTP/1.1x", "HTTP/01.1", "http/1.1"] {
        v.push(case(
            &format!("H-34 version {version}"),
            format!("GET http://{w}/ip {version}\r\nHost: {w}\r\n{a}\r\n"),
            bad(),
        ));
    }
    v.push(case("H-35 HTTP/0.9", "GET /\r\n\r\n", bad()));
    v.push(case(
        "H-36 origin-form to the proxy",
        format!("GET /ip HTTP/1.1\r\nHost: {w}\r\n{a}\r\n"),
        bad(),
    ));
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    hello.extend((0..200u32).map(|i| (i * 37 % 256) as u8));
    // Without [tls] (this lab has none) the answer is TLS's own: a fatal
    // handshake_failure alert, then close (SPEC 1).
    v.push(case(
        "H-37 a TLS ClientHello on the proxy port",
        hello,
        Expect::TlsAlert(40),
    ));
    v.push(case(
        "H-38 the HTTP/2 preface",
        "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        bad(),
    ));
    v.push(case(
        "H-39 5000 empty lines before the request",
        format!("{}{}", "\r\n".repeat(5000), get("")),
        bad(),
    ));
    v.push(case(
        "H-39b two empty lines before the request",
        format!("\r\n\r\n{}", get("")),
        Expect::Forwarded,
    ));
    v.push(case(
        "H-40 Connection naming Content-Length",
        post(
            "Connection: close, Content-Length\r\nContent-Length: 5\r\n",
            "hello",
        ),
        bad(),
    ));
    v.push(case(
        "H-43 TRACE: the target never sees Proxy-Authorization",
        format!("TRACE http://{w}/head HTTP/1.1\r\nHost: {w}\r\n{a}\r\n"),
        Expect::ForwardedWithout("proxy-authorization"),
    ));
    v.push(case(
        "H-44 hop-by-hop and proxy headers never reach the target",
        format!(
            "GET http://{w}/head HTTP/1.1\r\nHost: {w}\r\n{a}Proxy-Connection: keep-alive\r\nRespond-With: ip\r\n\r\n"
        ),
        Expect::ForwardedWithout("proxy-connection"),
    ));
    v.push(case(
        "C-23 userinfo in an http URI",
        format!("GET http://user:pass@{w}/ip HTTP/1.1\r\nHost: {w}\r\n{a}\r\n"),
        bad(),
    ));
    v.push(case(
        "C-23b percent-encoded slash before an @",
        format!("GET http://{w}%2F@127.0.0.1/ HTTP/1.1\r\nHost: {w}\r\n{a}\r\n"),
        bad(),
    ));
    for scheme in ["ftp://", "gopher://", "ws://", "https://"] {
        v.push(case(
            &format!("C-24 scheme {scheme}"),
            format!("GET {scheme}{w}/ HTTP/1.1\r\nHost: {w}\r\n{a}\r\n"),
            bad(),
        ));
    }
    v.push(case(
        "C-24b file:///etc/passwd",
        format!("GET file:///etc/passwd HTTP/1.1\r\n{a}\r\n"),
        bad(),
    ));
    v.push(case(
        "C-26 the path is forwarded byte for byte",
        format!("GET http://{w}/%2e%2e/%00?x=%zz HTTP/1.1\r\nHost: {w}\r\n{a}\r\n"),
        Expect::ForwardedPath("/%2e%2e/%00?x=%zz".into()),
    ));
    v.push(case(
        "C-28 two Host fields",
        get("Host: evil.example\r\n"),
        bad(),
    ));
    v.push(case(
        "C-29 Host differs from the target",
        format!("GET http://{w}/ip HTTP/1.1\r\nHost: other.example\r\n{a}\r\n"),
        bad(),
    ));
    v.push(case(
        "A-20 two Proxy-Authorization fields",
        get(&auth_raw(format!("package-8-country-us:{KEY}").as_bytes())),
        bad(),
    ));
    v.push(case(
        "B-01b a head that never ends",
        format!("GET http://{w}/ip HTTP/1.1\r\nHost: {w}\r\n{a}"),
        Expect::Timeout408,
    ));
    v.push(case(
        "B-01 connect and send nothing",
        "",
        Expect::DeadlineClose,
    ));
    v
}

#[test]
fn http_framing_catalogue() {
    let lab = Lab::start();
    let cases = fixed(cases(&lab));
    run_table(&lab, &cases, "HTTP framing");
    let smuggled = lab
        .web
        .requests()
        .iter()
        .any(|r| r.head.contains("/smuggled"));
    assert!(!smuggled, "a smuggled request reached the target");
}
