//! Hostile and malformed input. Each case is followed by a normal request
//! from another source address, which must succeed, and a tunnel opened
//! before the case must still carry bytes after it (SPEC 7: a malformed input
//! "disturbs no other connection").

use std::time::{Duration, Instant};

use splicegate_tests::*;

struct Bench {
    gw: Gateway,
    web: HttpTarget,
    echo: TcpEcho,
}

impl Bench {
    fn new(handshake_ms: u64) -> Bench {
        let web = HttpTarget::start();
        let echo = TcpEcho::start();
        let mut conf = Conf::with_package(KEY).node(NodeDecl::direct("d1", node_ip()));
        conf.max_head_bytes = 4096;
        conf.max_headers = 50;
        conf.handshake_ms = handshake_ms;
        Bench {
            gw: Gateway::start_conf(&conf),
            web,
            echo,
        }
    }

    /// Send `bytes` raw and read one answer (or the close).
    fn raw(&self, bytes: &[u8]) -> Result<Resp, Vec<u8>> {
        let mut c = self.gw.conn();
        let _ = c.send(bytes);
        c.set_timeout(Duration::from_secs(5));
        match c.read_response("GET") {
            Ok(r) => Ok(r),
            Err(_) => Err(c.buffered().to_vec()),
        }
    }

    /// A normal request from a fresh address works.
    #[track_caller]
    fn still_serves(&self, after: &str) {
        let r = self
            .gw
            .forward(client_ip(), &self.web.url("/ip"), &user("country-us"), KEY);
        assert_eq!(r.status, 200, "after {after}: {}{}", r.raw_head, r.text());
    }

    /// A tunnel opened before anything hostile, to check afterwards.
    fn bystander(&self) -> Conn {
        self.gw.tunnel(client_ip(), self.echo.addr(), "country-us")
    }

    /// The end of a test: a new client is served after `after`, and the
    /// bystander tunnel still carries bytes.
    #[track_caller]
    fn done(&self, mut bystander: Conn, after: &str) {
        self.still_serves(after);
        bystander.echo_round_trip(b"undisturbed").unwrap();
    }

    fn auth(&self) -> String {
        format!("Proxy-Authorization: {}", basic(&user("country-us"), KEY))
    }
}

#[track_caller]
fn expect(r: Result<Resp, Vec<u8>>, status: u16, code: &str, what: &str) {
    match r {
        Ok(r) => {
            assert_eq!(
                r.status_line,
                format!("HTTP/1.1 {status} {code}"),
                "{what}: {}",
                r.raw_head
            );
            assert_error(&r, status, code, &[]);
        }
        Err(got) => panic!(
            "{what}: no answer, closed after {:?}",
            String::from_utf8_lossy(&got)
        ),
    }
}

#[test]
fn malformed_http_heads_are_answered_and_disturb_no_one() {
    let b = Bench::new(3000);
    let bystander = b.bystander();
    let web = b.web.addr();
    let auth = b.auth();

    // Each: (what, the request, status, code); after each the gateway
    // still serves everyone.
    let mut many = format!("GET http://{web}/ip HTTP/1.1\r\nHost: {web}\r\n{auth}\r\n");
    for i in 0..60 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let post = |headers: &str, body: &str| {
        format!("POST http://{web}/echo HTTP/1.1\r\nHost: {web}\r\n{auth}\r\n{headers}\r\n{body}")
    };
    let cases = [
        // 1. Head over max_head_bytes (4096).
        (
            "oversized head",
            format!(
                "GET http://{web}/ip HTTP/1.1\r\nHost: {web}\r\n{auth}\r\nX-Big: {}\r\n\r\n",
                "a".repeat(5000)
            ),
            431,
            "HEADERS_TOO_LARGE",
        ),
        // 2. Request line over the head limit.
        (
            "oversized request line",
            format!(
                "GET http://{web}/{} HTTP/1.1\r\nHost: {web}\r\n\r\n",
                "p".repeat(9000)
            ),
            431,
            "HEADERS_TOO_LARGE",
        ),
        // 3. More header fields than max_headers (50).
        ("too many headers", many, 431, "HEADERS_TOO_LARGE"),
        // 4. Bare LF line endings.
        (
            "bare LF",
            format!("GET http://{web}/ip HTTP/1.1\nHost: {web}\n{auth}\n\n"),
            400,
            "BAD_REQUEST",
        ),
        // 5. NUL in a header value.
        (
            "NUL byte",
            format!("GET http://{web}/ip HTTP/1.1\r\nHost: {web}\r\n{auth}\r\nX-A: a\0b\r\n\r\n"),
            400,
            "BAD_REQUEST",
        ),
        // 6. Content-Length and Transfer-Encoding together (smuggling).
        (
            "CL + TE",
            post(
                "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
            400,
            "BAD_REQUEST",
        ),
        // 7. Two different Content-Lengths.
        (
            "two Content-Lengths",
            post("Content-Length: 3\r\nContent-Length: 5\r\n", "abcde"),
            400,
            "BAD_REQUEST",
        ),
        // 8. A non-numeric Content-Length.
        (
            "bad Content-Length",
            post("Content-Length: 12abc\r\n", ""),
            400,
            "BAD_REQUEST",
        ),
    ];
    for (what, req, status, code) in &cases {
        expect(b.raw(req.as_bytes()), *status, code, what);
        b.still_serves(what);
    }

    // 8b. Framing that RFC 9112 says a server must refuse with 400:
    // chunked not the final coding, an unknown coding, whitespace before
    // the colon of a field name.
    for (what, te) in [
        ("chunked not final", "Transfer-Encoding: chunked, gzip\r\n"),
        ("unknown coding", "Transfer-Encoding: xchunked\r\n"),
        ("space before colon", "Transfer-Encoding : chunked\r\n"),
    ] {
        let req = post(te, "5\r\nhello\r\n0\r\n\r\n");
        expect(b.raw(req.as_bytes()), 400, "BAD_REQUEST", what);
    }
    b.still_serves("bad transfer codings");

    // 9. Bad CONNECT authorities.
    for authority in [
        "nohostport",
        "127.0.0.1:99999",
        ":80",
        "127.0.0.1:",
        "[::1:80",
    ] {
        let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: x\r\n{auth}\r\n\r\n");
        expect(
            b.raw(req.as_bytes()),
            400,
            "BAD_REQUEST",
            &format!("CONNECT {authority}"),
        );
    }
    b.still_serves("bad CONNECT authorities");

    // 10. Origin-form to the proxy, and an unknown version.
    let origin = format!("GET /ip HTTP/1.1\r\nHost: {web}\r\n{auth}\r\n\r\n");
    expect(b.raw(origin.as_bytes()), 400, "BAD_REQUEST", "origin-form");
    let v = format!("GET http://{web}/ip HTTP/7.1\r\nHost: {web}\r\n{auth}\r\n\r\n");
    expect(b.raw(v.as_bytes()), 400, "BAD_REQUEST", "HTTP/7.1");
    b.still_serves("origin-form and bad version");

    // 11. Binary garbage: an error answer or a close, nothing else.
    let garbage: Vec<u8> = (0..512u32)
        .map(|i| (i.wrapping_mul(7919) % 251) as u8 | 0x80)
        .collect();
    match b.raw(&garbage) {
        Ok(r) => assert_eq!(r.status, 400, "{}", r.raw_head),
        Err(got) => assert!(got.is_empty(), "garbage got {got:?}"),
    }
    b.done(bystander, "garbage");
}

#[test]
fn hostile_usernames() {
    let b = Bench::new(3000);
    let web = b.web.addr().to_string();
    // 1000 dashes: not package-<id>, so AUTH_FAILED (407), rules unread.
    let dashes = "-".repeat(1000);
    let (_c, r) = b.gw.connect_as(client_ip(), &web, &dashes, KEY, &[]);
    assert_error(&r, 407, "AUTH_FAILED", &[]);
    b.still_serves("1000 dashes");
    // Over 255 bytes with the right key: ERR_INVALID_VALUE (400).
    let long = format!("package-7-country-us{}", "-".repeat(1000));
    let (_c, r) = b.gw.connect_as(client_ip(), &web, &long, KEY, &[]);
    assert_error(&r, 400, "ERR_INVALID_VALUE", &["255"]);
    let long = format!("package-7-country-us-session-{}", "s".repeat(300));
    let (_c, r) = b.gw.connect_as(client_ip(), &web, &long, KEY, &[]);
    assert_error(&r, 400, "ERR_INVALID_VALUE", &["255"]);
    // …and with a wrong key it is still AUTH_FAILED: the key first.
    let (_c, r) = b.gw.connect_as(client_ip(), &web, &long, "wrong", &[]);
    assert_error(&r, 407, "AUTH_FAILED", &[]);
    // Control characters and non-ASCII in the username.
    let (_c, r) =
        b.gw.connect_as(client_ip(), &web, "package-7-country-us\u{7}", KEY, &[]);
    assert!(r.status == 400 || r.status == 407, "{}", r.raw_head);
    let (_c, r) =
        b.gw.connect_as(client_ip(), &web, "package-7-country-ü", KEY, &[]);
    assert_error(&r, 400, "ERR_INVALID_VALUE", &[]);
    // A colon-less, 4 kB Basic value.
    let mut c = b.gw.conn();
    let huge = format!(
        "CONNECT {web} HTTP/1.1\r\nProxy-Authorization: Basic {}\r\n\r\n",
        "QUFB".repeat(800)
    );
    c.send(huge.as_bytes()).unwrap();
    let r = c.read_response("CONNECT").unwrap();
    assert!(
        r.status == 407 || r.status == 431,
        "huge Basic value: {}",
        r.raw_head
    );
    b.still_serves("hostile usernames");
}

#[test]
fn hostile_socks5_input_closes_the_connection() {
    let b = Bench::new(3000);
    let bystander = b.bystander();
    // SOCKS4 (first byte 0x04) is not SOCKS5: HTTP reads it and refuses.
    let mut c = b.gw.conn();
    c.send(&[4, 1, 0, 80, 127, 0, 0, 1, 0]).unwrap();
    let got = c.closed_within(Duration::from_secs(4));
    match got {
        Some(bytes) if !bytes.is_empty() => {
            assert!(
                bytes.starts_with(b"HTTP/1.1 400 BAD_REQUEST"),
                "{:?}",
                String::from_utf8_lossy(&bytes)
            )
        }
        Some(_) => {}
        None => panic!("a SOCKS4 request was neither answered nor closed"),
    }
    b.still_serves("SOCKS4");
    // Truncated greeting, then close.
    let mut c = b.gw.conn();
    c.send(&[5, 2]).unwrap();
    drop(c);
    b.still_serves("truncated greeting");
    // Greeting claims 255 methods, sends 3, then closes its side.
    let mut c = b.gw.conn();
    c.send(&[5, 255, 0, 1, 2]).unwrap();
    c.shutdown_write();
    assert!(c.closed_within(Duration::from_secs(4)).is_some());
    b.still_serves("short method list");
    // Wrong version inside the request: closed.
    let mut c = b.gw.conn();
    let u = user("country-us");
    let mut m = vec![5u8, 1, 2, 1, u.len() as u8];
    m.extend_from_slice(u.as_bytes());
    m.push(KEY.len() as u8);
    m.extend_from_slice(KEY.as_bytes());
    m.extend_from_slice(&[6, 1, 0, 1, 127, 0, 0, 1, 0, 80]);
    c.send(&m).unwrap();
    let got = c.closed_within(Duration::from_secs(4)).expect("closed");
    assert_eq!(
        got,
        vec![5, 2, 1, 0],
        "method and auth answered, then closed"
    );
    b.done(bystander, "wrong request version");
}

#[test]
fn slowloris_is_cut_by_handshake_ms() {
    let b = Bench::new(1000);
    let web = b.web.addr();
    let bystander = b.bystander();
    // Trickle a head one byte every 100 ms: the whole head must arrive
    // within handshake_ms (1 s), however steadily bytes come.
    let head = format!(
        "GET http://{web}/ip HTTP/1.1\r\nHost: {web}\r\nX-Slow: {}\r\n",
        "z".repeat(100)
    );
    let mut c = b.gw.conn();
    let t0 = Instant::now();
    let mut answer = Vec::new();
    for byte in head.as_bytes() {
        if c.send(&[*byte]).is_err() {
            break;
        }
        c.set_timeout(Duration::from_millis(100));
        let mut buf = [0u8; 4096];
        match c.try_read(&mut buf) {
            Some(0) => break,
            Some(n) => {
                answer.extend_from_slice(&buf[..n]);
                break;
            }
            None => {}
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "a slowloris head still open after 5 s"
        );
    }
    let took = t0.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "cut after {took:?}, handshake_ms = 1000"
    );
    if !answer.is_empty() {
        let rest = c.closed_within(Duration::from_secs(2)).unwrap_or_default();
        answer.extend_from_slice(&rest);
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.1 408 CLIENT_TIMEOUT\r\n"),
            "{text}"
        );
        assert!(text.contains("X-SOAX-Error: CLIENT_TIMEOUT"), "{text}");
    }
    b.done(bystander, "slowloris");
}

#[test]
fn silent_clients_are_timed_out() {
    let b = Bench::new(1000);
    let web = b.web.addr();
    // Connects and sends nothing.
    let mut silent = b.gw.conn();
    // Sends half a head and waits: 408 CLIENT_TIMEOUT.
    let mut half = b.gw.conn();
    half.send(format!("GET http://{web}/ip HTTP/1.1\r\nHost: {web}\r\n").as_bytes())
        .unwrap();
    // SOCKS5: greeting only.
    let mut socks = b.gw.conn();
    socks.send(&[5, 1, 2]).unwrap();
    let t0 = Instant::now();
    let got = silent.closed_within(Duration::from_secs(4));
    assert!(got.is_some(), "a silent connection is still open after 4 s");
    let got = got.unwrap();
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 408 CLIENT_TIMEOUT"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    let got = half
        .closed_within(Duration::from_secs(4))
        .expect("a half head is cut");
    assert!(
        got.starts_with(b"HTTP/1.1 408 CLIENT_TIMEOUT\r\n"),
        "a half head gets 408: {:?}",
        String::from_utf8_lossy(&got)
    );
    let got = socks
        .closed_within(Duration::from_secs(4))
        .expect("a stalled SOCKS5 handshake is cut");
    assert!(got == vec![5, 2] || got.is_empty(), "{got:?}");
    assert!(
        t0.elapsed() < Duration::from_millis(3000),
        "{:?}",
        t0.elapsed()
    );
    b.still_serves("silent clients");
}

#[test]
fn a_keep_alive_client_that_goes_quiet_between_requests() {
    let b = Bench::new(1000);
    let mut c = b.gw.conn();
    let r = c
        .get(&b.web.url("/ip"), Some((&user("country-us"), KEY)), &[])
        .unwrap();
    assert_eq!(r.status, 200);
    // Idle between requests (well within idle_s), then another request.
    std::thread::sleep(Duration::from_millis(300));
    let r = c
        .get(&b.web.url("/ip"), Some((&user("country-us"), KEY)), &[])
        .unwrap();
    assert_eq!(r.status, 200);
}
