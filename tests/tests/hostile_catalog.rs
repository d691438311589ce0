//! The hostile-input catalogue (research/reliability.md §2), byte by byte,
//! against the real binary, with the SPEC's answer for each (sections 3, 4
//! and 7).
//!
//! Every case runs twice: its bytes in one write, and (inputs under 300
//! bytes) one byte per write with a short pause, which must give the same
//! result. Each run comes from its own source address (`127.0.2.x`,
//! `127.0.3.x`), so the per-source guard never sees two cases as one client.
//! While the cases run, a well-behaved client on `127.0.3.251` tunnels and
//! forwards without a single failure, a tunnel opened before the cases
//! still carries bytes after them, no hostile target ever reaches the node,
//! and neither the gateway's debug log nor its access log holds the package
//! key or the node's upstream password.
//!
//! The gateway under test keeps the default target policy except for
//! `127.0.10.0/24`, where the targets listen: loopback in any other spelling
//! (`127.1`, octal, hex, IPv4-mapped IPv6) must be `403 DISALLOWED`.

// Each table reads as one `push` per case, whatever comes first.
#![allow(clippy::vec_init_then_push)]

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use splicegate_tests::canary::{Canary, CanaryPlan, CanaryReport};
use splicegate_tests::watch::{Sources, leaked_secrets, rss_kib};
use splicegate_tests::*;

/// `[timeouts] handshake_ms` of every gateway here.
const HANDSHAKE: Duration = Duration::from_millis(1500);
/// The upstream credentials of the node (a secret the logs must not show).
const NODE_USER: &str = "node-user";
const NODE_PASS: &str = "np_N0de_s3cret_Z8";
/// Where the targets listen: the only non-public range allowed.
const TARGET_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 10, 1);
/// The well-behaved username.
const USER: &str = "package-7-country-us";
/// Inputs shorter than this also run one byte per write.
const SPLIT_MAX: usize = 300;
/// Cases run at once.
const PARALLEL: usize = 6;

// ---------------------------------------------------------------------------
// The lab: a gateway, an HTTP node with upstream credentials, two targets.

struct Lab {
    gw: Gateway,
    web: HttpTarget,
    echo: TcpEcho,
    node: TestNode,
    src: Sources,
}

impl Lab {
    fn new() -> Lab {
        let node = TestNode::with_creds(NodeKind::Http, node_ip(), NODE_USER, NODE_PASS);
        let web = HttpTarget::start_on(IpAddr::V4(TARGET_IP));
        let echo = TcpEcho::start_on(IpAddr::V4(TARGET_IP));
        let mut conf = Conf::with_package(KEY)
            .node(NodeDecl::http("n1", node.addr()).creds(NODE_USER, NODE_PASS))
            .raw("[log]\nlevel = \"debug\"\naccess = \"@DIR@/access.log\"\n")
            .raw("[ebpf]\nban_threshold = 0\n");
        conf.allow_targets = vec!["127.0.10.0/24".into()];
        conf.handshake_ms = HANDSHAKE.as_millis() as u64;
        Lab {
            gw: Gateway::start_conf(&conf),
            web,
            echo,
            node,
            src: Sources::new(),
        }
    }

    fn w(&self) -> String {
        self.web.addr().to_string()
    }

    fn e(&self) -> String {
        self.echo.addr().to_string()
    }

    fn canary(&self) -> Canary {
        Canary::start(CanaryPlan {
            proxy: self.gw.proxy,
            src: Sources::reserved(0),
            echo: self.echo.addr(),
            url: self.web.url("/ip"),
            user: USER.into(),
            key: KEY.into(),
            every: Duration::from_millis(25),
        })
    }

    fn bystander(&self) -> Conn {
        self.gw
            .tunnel(Sources::reserved(1), self.echo.addr(), "country-us")
    }

    /// The end of every test: the canary never failed, the bystander tunnel
    /// still carries bytes, nothing hostile reached the node, no secret in
    /// any log line. Returns the canary's record and every problem found.
    fn check_after(
        &self,
        canary: Canary,
        mut bystander: Conn,
        what: &str,
    ) -> (CanaryReport, Vec<String>) {
        let rep = canary.stop();
        let mut problems = Vec::new();
        if !rep.failures.is_empty() || rep.ok() < 5 {
            problems.push(format!(
                "the well-behaved client made {} requests (want ≥ 5) and failed {} times during {what}: {:?}",
                rep.ok(),
                rep.failures.len(),
                rep.failures
            ));
        }
        if let Err(e) = bystander.echo_round_trip(b"the bystander tunnel is undisturbed") {
            problems.push(format!("the tunnel opened before {what} broke: {e}"));
        }
        let allowed = [self.w(), self.e(), "[2606:4700:4700::1111]:443".to_string()];
        let strays: Vec<String> = self
            .node
            .requests()
            .into_iter()
            .filter(|r| !allowed.contains(r))
            .collect();
        if !strays.is_empty() {
            problems.push(format!(
                "refused targets reached the node during {what}: {strays:?}"
            ));
        }
        problems.extend(self.secrets_in_logs());
        (rep, problems)
    }

    /// [`Lab::check_after`], asserting no problem.
    fn finish(&self, canary: Canary, bystander: Conn, what: &str) -> CanaryReport {
        let (rep, problems) = self.check_after(canary, bystander, what);
        assert!(
            problems.is_empty(),
            "after {what}:\n{}",
            problems.join("\n")
        );
        rep
    }

    fn secrets_in_logs(&self) -> Vec<String> {
        // The access log is written by the control thread every 100 ms.
        std::thread::sleep(Duration::from_millis(300));
        let stderr = self.gw.log();
        let path = self.gw.dir.join("access.log");
        let access = std::fs::read_to_string(&path).unwrap_or_default();
        let mut problems = Vec::new();
        if access.is_empty() {
            problems.push(format!("the access log {} is empty", path.display()));
        }
        for (name, text) in [("stderr.log", &stderr), ("access.log", &access)] {
            for line in text.lines() {
                if line.starts_with("INJECTED") || line.contains('\x1b') || line.contains('\r') {
                    problems.push(format!(
                        "{name}: a client string was logged unescaped: {line:?}"
                    ));
                }
            }
        }
        for leak in leaked_secrets(
            &[("stderr.log", &stderr), ("access.log", &access)],
            &[KEY, NODE_PASS],
            &[(USER, KEY), (NODE_USER, NODE_PASS)],
        ) {
            problems.push(format!("secret in a log line: {leak}"));
        }
        problems
    }
}

// ---------------------------------------------------------------------------
// Cases and what they expect.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Method selection `05 m`.
    Method(u8),
    /// RFC 1929 status `01 s`.
    Auth(u8),
    /// Request reply `05 r 00 ATYP BND.ADDR BND.PORT`.
    Reply(u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum After {
    /// The gateway closes within a second, sending nothing more.
    Close,
    /// The gateway sends nothing more and closes at the handshake deadline.
    Deadline,
    /// The tunnel carries a round trip to the echo target.
    RoundTrip,
    /// These bytes, sent with the request, come back from the echo target.
    EchoBack(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// The gateway's error answer (SPEC 4); BAD_REQUEST, CLIENT_TIMEOUT and
    /// HEADERS_TOO_LARGE then close (the others may keep the connection).
    Error(u16, &'static str),
    /// The target's `200` to a forwarded request.
    Forwarded,
    /// `200` from the target's `/head` (the head as it arrived), which must
    /// not contain this text (case-insensitive).
    ForwardedWithout(&'static str),
    /// `200`, and the target saw this request-target byte for byte.
    ForwardedPath(String),
    /// `200` to CONNECT, then the tunnel works as `After` says.
    Tunnel(After),
    /// SOCKS5 replies in order, then `After`.
    Socks(Vec<Step>, After),
    /// Nothing at all, closed within a second of the last byte.
    Close,
    /// `400 BAD_REQUEST` or nothing at all; closed within a second.
    BadOrClose,
    /// Any answer of the gateway's but `400` (a well-formed target the
    /// pool may not be able to reach).
    NotBadRequest,
    /// `408 CLIENT_TIMEOUT` at the handshake deadline, then close.
    Timeout408,
    /// Nothing at all, closed at the handshake deadline.
    DeadlineClose,
}

#[derive(Debug, Clone)]
struct Case {
    id: String,
    bytes: Vec<u8>,
    expect: Expect,
    /// A known gateway bug: the case runs only in `known_gateway_bugs`.
    bug: Option<&'static str>,
}

fn case(id: &str, bytes: impl Into<Vec<u8>>, expect: Expect) -> Case {
    Case {
        id: id.into(),
        bytes: bytes.into(),
        expect,
        bug: None,
    }
}

impl Case {
    /// Mark a known gateway bug (the case moves to `known_gateway_bugs`).
    fn bug(mut self, why: &'static str) -> Case {
        self.bug = Some(why);
        self
    }
}

const BUG_CHUNK: &str = "a malformed chunk in a forwarded request body closes the connection without an answer; SPEC 4 wants 400 BAD_REQUEST";
const BUG_SCHEME: &str = "Proxy-Authorization with a scheme other than Basic answers AUTH_FAILED; docs/errors.md wants ERR_AUTH_REQUIRED";
const BUG_KEY_IN_RULES: &str = "the key inside the rules answers 400 ERR_UNKNOWN_PARAM whose detail (access log, debug log, recent errors) holds the key; SPEC 2/7 want AUTH_FAILED and no key logged";

fn bad() -> Expect {
    Expect::Error(400, "BAD_REQUEST")
}

fn too_large() -> Expect {
    Expect::Error(431, "HEADERS_TOO_LARGE")
}

fn disallowed() -> Expect {
    Expect::Error(403, "DISALLOWED")
}

fn auth_failed() -> Expect {
    Expect::Error(407, "AUTH_FAILED")
}

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// `Proxy-Authorization: Basic …\r\n` of the well-behaved user.
fn auth_line() -> String {
    format!("Proxy-Authorization: {}\r\n", basic(USER, KEY))
}

/// `Proxy-Authorization` with arbitrary decoded bytes.
fn auth_raw(decoded: &[u8]) -> String {
    format!("Proxy-Authorization: Basic {}\r\n", b64(decoded))
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

// ---------------------------------------------------------------------------
// HTTP framing (catalogue 2.1).

fn http_cases(lab: &Lab) -> Vec<Case> {
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
    v.push(case(
        "H-37 a TLS ClientHello on the proxy port",
        hello,
        Expect::BadOrClose,
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

// ---------------------------------------------------------------------------
// Targets: CONNECT authorities and the egress policy (catalogue 2.2, SPEC 7).

fn target_cases(lab: &Lab) -> Vec<Case> {
    let a = auth_line();
    let e = lab.e();
    let connect = |auth: &str| format!("CONNECT {auth} HTTP/1.1\r\nHost: {auth}\r\n{a}\r\n");
    let connect_nohost = |auth: &str| format!("CONNECT {auth} HTTP/1.1\r\n{a}\r\n");
    let mut v = Vec::new();
    v.push(case(
        "C-01 baseline CONNECT",
        connect(&e),
        Expect::Tunnel(After::RoundTrip),
    ));
    v.push(case(
        "C-02 CONNECT without a port",
        connect_nohost(&TARGET_IP.to_string()),
        bad(),
    ));
    for t in [
        format!("http://{e}"),
        "/".to_string(),
        format!("{e}/x"),
        format!("{TARGET_IP}:"),
        format!("{TARGET_IP}:0"),
        format!("{TARGET_IP}:65536"),
        format!("{TARGET_IP}:99999"),
        format!("{TARGET_IP}:+443"),
        format!("{TARGET_IP}:443abc"),
        format!("{TARGET_IP}: 443"),
        format!("user:pw@{e}"),
        "::1:443".to_string(),
        "[::1:443".to_string(),
        "[fe80::1%25eth0]:443".to_string(),
        "[%3A%3A1]:443".to_string(),
        "example%2Ecom:443".to_string(),
        "127.0.0.1%00.example.com:443".to_string(),
        "[blocked.example]:443".to_string(),
        format!("{}.com:443", "a".repeat(64)),
        format!("{}:443", vec!["a".repeat(59); 5].join(".")),
        ":80".to_string(),
        "nohostport".to_string(),
    ] {
        v.push(case(
            &format!("C-03 CONNECT {t}"),
            connect_nohost(&t),
            bad(),
        ));
    }
    v.push(case(
        "C-18 CONNECT to raw UTF-8 exämple.com",
        cat(&[
            b"CONNECT ex",
            b"\xc3\xa4",
            format!("mple.com:443 HTTP/1.1\r\n{a}\r\n").as_bytes(),
        ]),
        bad(),
    ));
    v.push(case(
        "C-06 Host differs from the CONNECT authority",
        format!("CONNECT {e} HTTP/1.1\r\nHost: other.example:443\r\n{a}\r\n"),
        bad(),
    ));
    v.push(case(
        "C-19 CONNECT with a Content-Length",
        format!("CONNECT {e} HTTP/1.1\r\nHost: {e}\r\n{a}Content-Length: 5\r\n\r\nhello"),
        bad(),
    ));
    // Blocked ports and non-public addresses (no allow_targets covers them).
    for t in [
        format!("{TARGET_IP}:25"),
        "smtp.example.com:25".to_string(),
        "127.0.0.1:443".into(),
        "10.0.0.1:443".into(),
        "172.16.0.1:443".into(),
        "192.168.1.1:443".into(),
        "169.254.169.254:80".into(),
        "100.64.0.1:443".into(),
        "0.0.0.0:443".into(),
        "255.255.255.255:443".into(),
        "224.0.0.1:443".into(),
        "198.18.0.1:443".into(),
        "[::1]:443".into(),
        "[::]:443".into(),
        "[fc00::1]:443".into(),
        "[fe80::1]:443".into(),
        "[::ffff:127.0.0.1]:443".into(),
        "[::ffff:a9fe:a9fe]:80".into(),
        "[64:ff9b::7f00:1]:443".into(),
        "[2002:7f00:1::]:443".into(),
        "2130706433:80".into(),
        "0x7f000001:80".into(),
        "0177.0.0.1:80".into(),
        "127.1:80".into(),
        "127.000.000.001:80".into(),
        "0x7f.1:80".into(),
        "017700000001:80".into(),
        "localhost:443".into(),
        "LOCALHOST.:443".into(),
        "foo.localhost:443".into(),
    ] {
        v.push(case(
            &format!("C-08 CONNECT {t} is DISALLOWED"),
            connect(&t),
            disallowed(),
        ));
    }
    for t in [
        "127.0.0.1:80",
        "[::1]:80",
        "127.1:80",
        "169.254.169.254:80",
        "0x7f000001:80",
    ] {
        v.push(case(
            &format!("C-08b GET http://{t}/ is DISALLOWED"),
            format!("GET http://{t}/ HTTP/1.1\r\nHost: {t}\r\n{a}\r\n"),
            disallowed(),
        ));
    }
    v.push(case(
        "C-08c GET to a blocked port",
        format!("GET http://{TARGET_IP}:25/ HTTP/1.1\r\nHost: {TARGET_IP}:25\r\n{a}\r\n"),
        disallowed(),
    ));
    v.push(case(
        "C-10 a public IPv6 literal is not a bad request",
        connect("[2606:4700:4700::1111]:443"),
        Expect::NotBadRequest,
    ));
    let early: Vec<u8> = cat(&[
        &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc],
        &(0..508u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>(),
    ]);
    v.push(case(
        "C-20 a ClientHello right behind the CONNECT is tunnel payload",
        cat(&[connect(&e).as_bytes(), &early]),
        Expect::Tunnel(After::EchoBack(early.clone())),
    ));
    let second = format!("CONNECT other.example:443 HTTP/1.1\r\n{a}\r\n");
    v.push(case(
        "C-21 a second CONNECT before the 200 is tunnel payload",
        cat(&[connect(&e).as_bytes(), second.as_bytes()]),
        Expect::Tunnel(After::EchoBack(second.clone().into_bytes())),
    ));
    v
}

// ---------------------------------------------------------------------------
// Credentials and usernames (catalogue 2.3).

fn auth_cases(lab: &Lab) -> Vec<Case> {
    let e = lab.e();
    let with = |auth: &str| format!("CONNECT {e} HTTP/1.1\r\nHost: {e}\r\n{auth}\r\n");
    let creds = |u: &str, p: &str| with(&format!("Proxy-Authorization: {}\r\n", basic(u, p)));
    let raw = |decoded: &[u8]| with(&auth_raw(decoded));
    let rule = |rules: &str| creds(&format!("package-7-{rules}"), KEY);
    let blob = b64(format!("{USER}:{KEY}").as_bytes());
    let mut v = Vec::new();
    v.push(case(
        "A-01 no credentials",
        with(""),
        Expect::Error(407, "ERR_AUTH_REQUIRED"),
    ));
    for (id, value) in [
        ("A-03 Bearer", "Bearer abc"),
        ("A-03b Digest", "Digest username=\"x\""),
        ("A-03c Negotiate", "Negotiate YII="),
    ] {
        v.push(
            case(
                &format!("{id}: a scheme other than Basic"),
                with(&format!("Proxy-Authorization: {value}\r\n")),
                Expect::Error(407, "ERR_AUTH_REQUIRED"),
            )
            .bug(BUG_SCHEME),
        );
    }
    v.push(case(
        "A-23 only an origin Authorization",
        with(&format!("Authorization: Basic {blob}\r\n")),
        Expect::Error(407, "ERR_AUTH_REQUIRED"),
    ));
    for (id, value) in [
        ("A-04 Basic !!!!", "Basic !!!!".to_string()),
        (
            "A-04b base64 without padding",
            "Basic cGFja2FnZQ".to_string(),
        ),
        (
            "A-04c base64 with an inner space",
            "Basic cGFj a2Fn".to_string(),
        ),
        (
            "A-04d URL-safe base64",
            "Basic cGFja2FnZS0xMjM_LWE-".to_string(),
        ),
        ("A-04e Basic and nothing", "Basic".to_string()),
        ("A-04f Basic and spaces", "Basic    ".to_string()),
        ("A-22b a tab after Basic", format!("Basic\t{blob}")),
    ] {
        v.push(case(
            id,
            with(&format!("Proxy-Authorization: {value}\r\n")),
            auth_failed(),
        ));
    }
    v.push(case(
        "A-05 no colon",
        raw(b"package-7-country-us"),
        auth_failed(),
    ));
    // The key is right, so the rules are read: "us\0" is not a country.
    v.push(case(
        "A-06 NUL before the colon",
        raw(format!("{USER}\0:{KEY}").as_bytes()),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v.push(case(
        "A-07 the key and a newline",
        raw(format!("{USER}:{KEY}\n").as_bytes()),
        auth_failed(),
    ));
    v.push(case(
        "A-08 credentials that are not UTF-8",
        raw(b"\xff\xfe:\xff"),
        auth_failed(),
    ));
    v.push(case(
        "A-09 wrong key",
        creds(USER, "wrong-key"),
        auth_failed(),
    ));
    v.push(case(
        "A-10 a package id of 23 digits",
        creds("package-99999999999999999999999-country-us", KEY),
        auth_failed(),
    ));
    v.push(case(
        "A-10b empty username",
        raw(format!(":{KEY}").as_bytes()),
        auth_failed(),
    ));
    v.push(case(
        "A-11 a username of 1000 dashes",
        creds(&"-".repeat(1000), KEY),
        auth_failed(),
    ));
    v.push(case(
        "A-11b package-7- and 1000 dashes, right key",
        creds(&format!("package-7-{}", "-".repeat(1000)), KEY),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v.push(case(
        "A-11c package-7- and 1000 dashes, wrong key",
        creds(&format!("package-7-{}", "-".repeat(1000)), "wrong-key"),
        auth_failed(),
    ));
    v.push(case(
        "A-11d a password of 1000 bytes",
        creds(USER, &"k".repeat(1000)),
        auth_failed(),
    ));
    v.push(case(
        "A-12 a Basic value of 64 kB",
        with(&format!(
            "Proxy-Authorization: Basic {}\r\n",
            "QUFB".repeat(16_384)
        )),
        too_large(),
    ));
    v.push(case(
        "A-13 country twice",
        rule("country-us-country-gb"),
        Expect::Error(400, "ERR_DUPLICATE_PARAM"),
    ));
    v.push(case(
        "A-14 country-US",
        rule("country-US"),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v.push(case(
        "A-16 bind-node with onerror-replace",
        rule("country-us-session-x-bind-node-onerror-replace"),
        Expect::Error(400, "ERR_INVALID_COMBINATION"),
    ));
    v.push(case(
        "A-17 session id ☃",
        rule("country-us-session-\u{2603}"),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v.push(case(
        "A-18 session id with a Cyrillic а",
        rule("country-us-session-\u{430}bc"),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v.push(case(
        "A-18b a non-ASCII value",
        rule("country-\u{fc}s"),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v.push(case(
        "A-18c a non-ASCII username",
        creds("\u{43f}\u{430}\u{43a}\u{435}\u{442}-7-country-us", KEY),
        auth_failed(),
    ));
    v.push(case(
        "A-19 city-new%20york",
        rule("country-us-city-new%20york"),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v.push(case(
        "A-19b a key with no value",
        rule("country-"),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v.push(case(
        "A-19c no targeting rule",
        creds("package-7", KEY),
        Expect::Error(400, "ERR_MISSING_PARAMS"),
    ));
    v.push(case(
        "A-19d a username of 256 bytes",
        rule(&format!("country-us-session-{}", "s".repeat(228))),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v.push(case(
        "A-21 lowercase field name and scheme",
        with(&format!("proxy-authorization: basic {blob}\r\n")),
        Expect::Tunnel(After::RoundTrip),
    ));
    v.push(case(
        "A-22 two spaces after Basic",
        with(&format!("Proxy-Authorization: Basic  {blob}\r\n")),
        Expect::Tunnel(After::RoundTrip),
    ));
    v.push(case(
        "A-26 the key as the username",
        creds(KEY, KEY),
        auth_failed(),
    ));
    v.push(
        case(
            "A-27 the key inside the rules",
            creds(&format!("package-7-country-us-{KEY}"), KEY),
            auth_failed(),
        )
        .bug(BUG_KEY_IN_RULES),
    );
    v.push(case(
        "A-28 CR LF and ESC in the rules (log injection)",
        raw(
            format!("package-7-country-us-session-x\r\nINJECTED fake log line \x1b[31m:{KEY}")
                .as_bytes(),
        ),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v
}

// ---------------------------------------------------------------------------
// SOCKS5 (catalogue 2.4).

fn userpass(user: &[u8], pass: &[u8]) -> Vec<u8> {
    cat(&[&[1, user.len() as u8], user, &[pass.len() as u8], pass])
}

fn socks_addr_v4(ip: Ipv4Addr, port: u16) -> Vec<u8> {
    cat(&[&[1], &ip.octets(), &port.to_be_bytes()])
}

fn socks_domain(name: &[u8], port: u16) -> Vec<u8> {
    cat(&[&[3, name.len() as u8], name, &port.to_be_bytes()])
}

fn socks_cases(lab: &Lab) -> Vec<Case> {
    use Step::*;
    let greet: &[u8] = &[5, 1, 2];
    let good = userpass(USER.as_bytes(), KEY.as_bytes());
    let echo = lab.echo.addr();
    let echo_addr = socks_addr_v4(TARGET_IP, echo.port());
    let req = |cmd: u8, addr: &[u8]| cat(&[&[5, cmd, 0], addr]);
    let full = |addr: &[u8]| cat(&[greet, &good, &req(1, addr)]);
    let ok = || Expect::Socks(vec![Method(2), Auth(0), Reply(0)], After::RoundTrip);
    let refused = |code: u8| Expect::Socks(vec![Method(2), Auth(0), Reply(code)], After::Close);
    let mut v = Vec::new();
    v.push(case("S-00 baseline", full(&echo_addr), ok()));
    v.push(case(
        "S-01 SOCKS4 CONNECT",
        b"\x04\x01\x00\x50\x5d\xb8\xd8\x22\x00".to_vec(),
        Expect::BadOrClose,
    ));
    v.push(case(
        "S-02 version 6",
        b"\x06\x01\x00".to_vec(),
        Expect::BadOrClose,
    ));
    v.push(case(
        "S-02b a single NUL",
        b"\x00".to_vec(),
        Expect::BadOrClose,
    ));
    v.push(case(
        "S-03 zero methods",
        b"\x05\x00".to_vec(),
        Expect::Socks(vec![], After::Close),
    ));
    let all_methods: Vec<u8> = (0..=254u8).collect();
    v.push(case(
        "S-04 255 methods, 0x02 among them",
        cat(&[&[5, 255], &all_methods, &good, &req(1, &echo_addr)]),
        ok(),
    ));
    v.push(case(
        "S-04b both no-auth and username/password offered",
        cat(&[&[5, 2, 0, 2], &good, &req(1, &echo_addr)]),
        ok(),
    ));
    v.push(case(
        "S-05 three methods announced, one sent",
        b"\x05\x03\x00".to_vec(),
        Expect::Socks(vec![], After::Deadline),
    ));
    v.push(case(
        "S-06 only the version",
        b"\x05".to_vec(),
        Expect::Socks(vec![], After::Deadline),
    ));
    v.push(case(
        "S-07 only no-auth, from an address on no allowlist",
        b"\x05\x01\x00".to_vec(),
        Expect::Socks(vec![Method(0xff)], After::Close),
    ));
    v.push(case(
        "S-09 only GSSAPI",
        b"\x05\x01\x01".to_vec(),
        Expect::Socks(vec![Method(0xff)], After::Close),
    ));
    v.push(case(
        "S-10 auth version 5",
        cat(&[greet, &[5], &good[1..]]),
        Expect::Socks(vec![Method(2)], After::Close),
    ));
    v.push(case(
        "S-11 empty username",
        cat(&[greet, &userpass(b"", KEY.as_bytes())]),
        Expect::Socks(vec![Method(2)], After::Close),
    ));
    v.push(case(
        "S-12 empty password",
        cat(&[greet, &userpass(USER.as_bytes(), b"")]),
        Expect::Socks(vec![Method(2), Auth(1)], After::Close),
    ));
    let long_user = format!("{USER}-session-{}", "s".repeat(255 - USER.len() - 9));
    assert_eq!(long_user.len(), 255);
    v.push(case(
        "S-13 a username of 255 bytes (session id too long)",
        cat(&[
            greet,
            &userpass(long_user.as_bytes(), KEY.as_bytes()),
            &req(1, &echo_addr),
        ]),
        refused(2),
    ));
    v.push(case(
        "S-14 username announced 200 bytes, 9 sent",
        cat(&[greet, b"\x01\xc8package-7"]),
        Expect::Socks(vec![Method(2)], After::Deadline),
    ));
    v.push(case(
        "S-15 wrong key",
        cat(&[greet, &userpass(USER.as_bytes(), b"wrong-key!")]),
        Expect::Socks(vec![Method(2), Auth(1)], After::Close),
    ));
    v.push(case(
        "S-15b unknown package",
        cat(&[
            greet,
            &userpass(b"package-99999-country-us", KEY.as_bytes()),
        ]),
        Expect::Socks(vec![Method(2), Auth(1)], After::Close),
    ));
    v.push(case(
        "S-15c a username of 255 dashes",
        cat(&[greet, &userpass(&[b'-'; 255], KEY.as_bytes())]),
        Expect::Socks(vec![Method(2), Auth(1)], After::Close),
    ));
    v.push(case(
        "S-15d the key as the username",
        cat(&[greet, &userpass(KEY.as_bytes(), KEY.as_bytes())]),
        Expect::Socks(vec![Method(2), Auth(1)], After::Close),
    ));
    v.push(case(
        "S-15e a non-ASCII username",
        cat(&[
            greet,
            &userpass("package-7-country-\u{fc}s".as_bytes(), KEY.as_bytes()),
            &req(1, &echo_addr),
        ]),
        refused(2),
    ));
    v.push(case(
        "S-16 address type 0x02",
        full(b"\x02\x00\x00\x00\x00\x00\x50"),
        refused(8),
    ));
    v.push(case(
        "S-16b address type 0x08",
        full(b"\x08\x7f\x00\x00\x01\x00\x50"),
        refused(8),
    ));
    v.push(case(
        "S-17 a domain of length 0",
        full(b"\x03\x00\x01\xbb"),
        Expect::Socks(vec![Method(2), Auth(0)], After::Close),
    ));
    v.push(case(
        "S-18 NUL in the domain",
        full(&socks_domain(b"example\0.com", 443)),
        Expect::Socks(vec![Method(2), Auth(0)], After::Close),
    ));
    v.push(case(
        "S-18b a domain label of 255 bytes",
        full(&socks_domain(&[b'a'; 255], 443)),
        Expect::Socks(vec![Method(2), Auth(0)], After::Close),
    ));
    v.push(case(
        "S-18c raw UTF-8 in the domain",
        full(&socks_domain("ex\u{e4}mple.com".as_bytes(), 443)),
        Expect::Socks(vec![Method(2), Auth(0)], After::Close),
    ));
    for name in [
        "127.0.0.1",
        "127.1",
        "0x7f000001",
        "localhost",
        "0177.0.0.1",
    ] {
        v.push(case(
            &format!("S-19 domain {name}"),
            full(&socks_domain(name.as_bytes(), 80)),
            refused(2),
        ));
    }
    for ip in [
        Ipv4Addr::new(127, 0, 0, 1),
        Ipv4Addr::new(169, 254, 169, 254),
        Ipv4Addr::new(10, 0, 0, 1),
        Ipv4Addr::new(0, 0, 0, 0),
    ] {
        v.push(case(
            &format!("S-20 IPv4 {ip}"),
            full(&socks_addr_v4(ip, 80)),
            refused(2),
        ));
    }
    for ip in ["::1", "::ffff:169.254.169.254", "fe80::1"] {
        let ip: std::net::Ipv6Addr = ip.parse().unwrap();
        v.push(case(
            &format!("S-21 IPv6 {ip}"),
            full(&cat(&[&[4], &ip.octets(), &80u16.to_be_bytes()])),
            refused(2),
        ));
    }
    v.push(case(
        "S-22 port 25",
        full(&socks_addr_v4(TARGET_IP, 25)),
        refused(2),
    ));
    v.push(case(
        "S-22b port 25 of a name",
        full(&socks_domain(b"smtp.example.com", 25)),
        refused(2),
    ));
    v.push(case(
        "S-22c port 0",
        full(&socks_addr_v4(TARGET_IP, 0)),
        refused(2),
    ));
    for (id, cmd) in [
        ("S-23 BIND", 2u8),
        ("S-24 UDP ASSOCIATE", 3),
        ("S-25 CMD 0x09", 9),
    ] {
        v.push(case(
            id,
            cat(&[
                greet,
                &good,
                &req(cmd, &socks_addr_v4(TARGET_IP, echo.port())),
            ]),
            refused(7),
        ));
    }
    v.push(case(
        "S-26 RSV not zero",
        cat(&[greet, &good, &[5, 1, 7], &echo_addr]),
        Expect::Socks(vec![Method(2), Auth(0)], After::Close),
    ));
    let payload = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n".to_vec();
    v.push(case(
        "S-27 greeting, auth, request and payload in one write",
        cat(&[&full(&echo_addr), &payload]),
        Expect::Socks(
            vec![Method(2), Auth(0), Reply(0)],
            After::EchoBack(payload.clone()),
        ),
    ));
    v.push(case(
        "S-28 the request where the auth belongs",
        cat(&[greet, &req(1, &echo_addr)]),
        Expect::Socks(vec![Method(2)], After::Close),
    ));
    v.push(case(
        "S-28b request version 6",
        cat(&[greet, &good, &[6, 1, 0], &echo_addr]),
        Expect::Socks(vec![Method(2), Auth(0)], After::Close),
    ));
    v
}

// ---------------------------------------------------------------------------
// Running a case.

/// Bytes read until the peer closed or a condition held, and when it closed.
struct Got {
    bytes: Vec<u8>,
    closed: Option<Instant>,
}

/// Read into `got` until it closes, `enough(bytes)` holds, or `until`.
fn collect(c: &mut Conn, got: &mut Got, until: Instant, enough: impl Fn(&[u8]) -> bool) {
    let mut buf = [0u8; 65536];
    while got.closed.is_none() && !enough(&got.bytes) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let _ = c
            .stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match c.stream.read(&mut buf) {
            Ok(0) => got.closed = Some(Instant::now()),
            Ok(n) => got.bytes.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => got.closed = Some(Instant::now()),
        }
    }
}

/// The length of a complete HTTP response at the start of `b`, if there is one.
fn response_len(b: &[u8]) -> Option<usize> {
    let end = b.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&b[..end]).to_ascii_lowercase();
    if head.starts_with("http/1.1 200 connection established") {
        return Some(end);
    }
    let cl = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    (b.len() >= end + cl).then_some(end + cl)
}

fn parse_response(b: &[u8]) -> Result<Resp, String> {
    let n = response_len(b)
        .ok_or_else(|| format!("no complete response in {:?}", String::from_utf8_lossy(b)))?;
    let end = b.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
    let mut r = Resp::parse_head(&b[..end]).map_err(|e| e.to_string())?;
    r.body = b[end..n].to_vec();
    Ok(r)
}

/// The checks of [`assert_error`], as a result.
fn check_error(r: &Resp, status: u16, code: &str) -> Result<(), String> {
    let want = format!("HTTP/1.1 {status} {code}");
    if r.status_line != want {
        return Err(format!("got {:?}, want {want:?}", r.status_line));
    }
    if r.header("X-SOAX-Error") != Some(code) {
        return Err(format!("X-SOAX-Error {:?}", r.header("X-SOAX-Error")));
    }
    if r.header("X-SOAX-Detail")
        .is_none_or(|d| d.trim().is_empty())
    {
        return Err("no X-SOAX-Detail".into());
    }
    if !r
        .header("Proxy-Status")
        .is_some_and(|p| p.contains(&format!("details=\"{code}\"")))
    {
        return Err(format!("Proxy-Status {:?}", r.header("Proxy-Status")));
    }
    if status == 407 && r.header("Proxy-Authenticate") != Some("Basic realm=\"splicegate\"") {
        return Err("407 without Proxy-Authenticate".into());
    }
    if !r.text().contains(code) {
        return Err("the body does not name the code".into());
    }
    Ok(())
}

fn show(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(300)]).to_string();
    if s.chars().all(|c| !c.is_control() || c == '\r' || c == '\n') && !b.starts_with(&[5]) {
        format!("{s:?}")
    } else {
        format!("{:02x?}", &b[..b.len().min(40)])
    }
}

/// Send `bytes`: in one write, or one byte per write with a pause. Stops at
/// a write error (the gateway closed).
fn send(c: &mut Conn, bytes: &[u8], split: bool) {
    if !split {
        let _ = c.stream.write_all(bytes);
        return;
    }
    for b in bytes {
        if c.stream.write_all(&[*b]).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_micros(700));
    }
}

fn read_socks_step(c: &mut Conn, got: &mut Got, at: &mut usize, step: Step) -> Result<(), String> {
    let until = Instant::now() + Duration::from_secs(3);
    let need = |n: usize| move |b: &[u8]| b.len() >= n;
    let start = *at;
    collect(c, got, until, need(start + 2));
    let b = &got.bytes;
    if b.len() < start + 2 {
        return Err(format!(
            "wanted {step:?}, the connection {} after {}",
            if got.closed.is_some() {
                "closed"
            } else {
                "stalled"
            },
            show(&b[start..])
        ));
    }
    let (want0, want1) = match step {
        Step::Method(m) => (5, m),
        Step::Auth(s) => (1, s),
        Step::Reply(r) => (5, r),
    };
    if b[start] != want0 || b[start + 1] != want1 {
        return Err(format!("wanted {step:?}, got {}", show(&b[start..])));
    }
    *at = start + 2;
    if let Step::Reply(_) = step {
        collect(c, got, until, need(start + 4));
        let Some(&atyp) = got.bytes.get(start + 3) else {
            return Err("a truncated reply".into());
        };
        let len = match atyp {
            1 => 4 + 2,
            4 => 16 + 2,
            _ => return Err(format!("reply ATYP {atyp}")),
        };
        collect(c, got, until, need(start + 4 + len));
        if got.bytes.len() < start + 4 + len {
            return Err("a truncated reply address".into());
        }
        *at = start + 4 + len;
    }
    Ok(())
}

/// Wait for the close: nothing more may arrive. `by`: the latest close.
fn expect_close(c: &mut Conn, got: &mut Got, at: usize, by: Instant) -> Result<Instant, String> {
    collect(c, got, by, |_| false);
    if got.bytes.len() > at {
        return Err(format!(
            "more bytes before the close: {}",
            show(&got.bytes[at..])
        ));
    }
    got.closed
        .ok_or_else(|| "the connection stayed open".to_string())
}

fn deadline_ok(t0: Instant, closed: Instant) -> Result<(), String> {
    let took = closed - t0;
    let lo = HANDSHAKE - Duration::from_millis(100);
    let hi = HANDSHAKE + Duration::from_millis(1500);
    if took < lo || took > hi {
        return Err(format!(
            "closed after {took:?}, handshake_ms is {}",
            HANDSHAKE.as_millis()
        ));
    }
    Ok(())
}

fn tunnel_after(c: &mut Conn, got: &mut Got, at: usize, after: &After) -> Result<(), String> {
    let until = Instant::now() + Duration::from_secs(5);
    match after {
        After::RoundTrip => {
            if got.bytes.len() > at {
                return Err(format!("unexpected bytes: {}", show(&got.bytes[at..])));
            }
            let ping = b"ping through the tunnel";
            c.stream
                .write_all(ping)
                .map_err(|e| format!("tunnel write: {e}"))?;
            collect(c, got, until, |b| b.len() >= at + ping.len());
            if got.bytes.get(at..) != Some(&ping[..]) {
                return Err(format!("the echo gave {}", show(&got.bytes[at..])));
            }
            Ok(())
        }
        After::EchoBack(want) => {
            collect(c, got, until, |b| b.len() >= at + want.len());
            if got.bytes.get(at..) != Some(&want[..]) {
                return Err(format!(
                    "the early bytes came back as {}",
                    show(&got.bytes[at..])
                ));
            }
            Ok(())
        }
        After::Close => {
            expect_close(c, got, at, Instant::now() + Duration::from_secs(1)).map(|_| ())
        }
        After::Deadline => Err("a tunnel has no deadline".into()),
    }
}

/// Run `case` once; the outcome in words (equal for equal behaviour).
fn run_once(lab: &Lab, case: &Case, split: bool) -> Result<String, String> {
    let src = lab.src.next();
    let mut c = Conn::open(src, lab.gw.proxy).map_err(|e| format!("connect: {e}"))?;
    let t0 = Instant::now();
    send(&mut c, &case.bytes, split);
    let sent = Instant::now();
    let mut got = Got {
        bytes: Vec::new(),
        closed: None,
    };
    let soon = sent + Duration::from_secs(5);
    match &case.expect {
        Expect::Error(status, code) => {
            collect(&mut c, &mut got, soon, |b| response_len(b).is_some());
            let r = parse_response(&got.bytes)?;
            check_error(&r, *status, code)?;
            if matches!(
                *code,
                "BAD_REQUEST" | "CLIENT_TIMEOUT" | "HEADERS_TOO_LARGE"
            ) {
                let n = response_len(&got.bytes).unwrap_or(0);
                expect_close(&mut c, &mut got, n, Instant::now() + Duration::from_secs(2))?;
                return Ok(format!("{status} {code}, closed"));
            }
            Ok(format!("{status} {code}"))
        }
        Expect::Forwarded | Expect::ForwardedWithout(_) | Expect::ForwardedPath(_) => {
            collect(&mut c, &mut got, soon, |b| response_len(b).is_some());
            let r = parse_response(&got.bytes)?;
            if r.status != 200 {
                return Err(format!("got {:?}: {}", r.status_line, r.text()));
            }
            if let Expect::ForwardedWithout(needle) = &case.expect {
                let body = r.text().to_ascii_lowercase();
                if body.contains(needle)
                    || body.contains(&b64(format!("{USER}:{KEY}").as_bytes()).to_ascii_lowercase())
                {
                    return Err(format!("the target saw {needle:?}: {}", r.text()));
                }
            }
            if let Expect::ForwardedPath(path) = &case.expect {
                let seen = lab
                    .web
                    .requests()
                    .iter()
                    .any(|q| q.head.starts_with(&format!("GET {path} HTTP/1.1\r\n")));
                if !seen {
                    return Err(format!("the target never saw GET {path}"));
                }
            }
            Ok("200 forwarded".into())
        }
        Expect::Tunnel(after) => {
            collect(&mut c, &mut got, soon, |b| response_len(b).is_some());
            let r = parse_response(&got.bytes)?;
            if r.status != 200 {
                return Err(format!("got {:?}: {}", r.status_line, r.text()));
            }
            let at = response_len(&got.bytes).unwrap_or(0);
            tunnel_after(&mut c, &mut got, at, after)?;
            Ok(format!("tunnel {after:?}"))
        }
        Expect::Socks(steps, after) => {
            let mut at = 0usize;
            for s in steps {
                read_socks_step(&mut c, &mut got, &mut at, *s)?;
            }
            let words = format!("socks {steps:?} then {after:?}");
            match after {
                After::Deadline => {
                    let closed = expect_close(
                        &mut c,
                        &mut got,
                        at,
                        t0 + HANDSHAKE + Duration::from_secs(2),
                    )?;
                    deadline_ok(t0, closed)?;
                }
                After::Close => {
                    let closed =
                        expect_close(&mut c, &mut got, at, sent + Duration::from_millis(1500))?;
                    if closed - sent > Duration::from_secs(1) {
                        return Err(format!("closed only after {:?}", closed - sent));
                    }
                }
                other => tunnel_after(&mut c, &mut got, at, other)?,
            }
            Ok(words)
        }
        Expect::Close => {
            let closed = expect_close(&mut c, &mut got, 0, sent + Duration::from_millis(1500))?;
            if closed - sent > Duration::from_secs(1) {
                return Err(format!("closed only after {:?}", closed - sent));
            }
            Ok("closed".into())
        }
        Expect::BadOrClose => {
            collect(&mut c, &mut got, sent + Duration::from_millis(1500), |_| {
                false
            });
            if got.closed.is_none() {
                return Err(format!("still open, got {}", show(&got.bytes)));
            }
            if got.bytes.is_empty() {
                return Ok("400 or closed".into());
            }
            let r = parse_response(&got.bytes)?;
            check_error(&r, 400, "BAD_REQUEST")?;
            Ok("400 or closed".into())
        }
        Expect::NotBadRequest => {
            collect(&mut c, &mut got, soon, |b| response_len(b).is_some());
            let r = parse_response(&got.bytes)?;
            if r.status == 400 {
                return Err(format!("got {:?}: {}", r.status_line, r.text()));
            }
            Ok("not 400".into())
        }
        Expect::Timeout408 => {
            collect(
                &mut c,
                &mut got,
                t0 + HANDSHAKE + Duration::from_secs(2),
                |_| false,
            );
            let closed = got.closed.ok_or("the connection stayed open")?;
            deadline_ok(t0, closed)?;
            let r = parse_response(&got.bytes)?;
            check_error(&r, 408, "CLIENT_TIMEOUT")?;
            Ok("408 at the deadline".into())
        }
        Expect::DeadlineClose => {
            let closed =
                expect_close(&mut c, &mut got, 0, t0 + HANDSHAKE + Duration::from_secs(2))?;
            deadline_ok(t0, closed)?;
            Ok("closed at the deadline".into())
        }
    }
}

/// Run a case whole and (if short) one byte at a time; `Err` names what broke.
fn run_case(lab: &Lab, case: &Case) -> Result<(), String> {
    let whole = run_once(lab, case, false).map_err(|e| format!("in one write: {e}"))?;
    if case.bytes.len() < SPLIT_MAX {
        let split = run_once(lab, case, true).map_err(|e| format!("one byte at a time: {e}"))?;
        if split != whole {
            return Err(format!(
                "one byte at a time gave {split:?}, in one write {whole:?}"
            ));
        }
    }
    Ok(())
}

/// Run `cases` (in parallel) with the canary and bystander watching.
fn run_table(lab: &Lab, cases: &[Case], what: &str) {
    let canary = lab.canary();
    let bystander = lab.bystander();
    let t0 = Instant::now();
    let failures = Mutex::new(Vec::new());
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..PARALLEL {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(c) = cases.get(i) else { break };
                    if let Err(e) = run_case(lab, c) {
                        failures.lock().unwrap().push(format!("{}: {e}", c.id));
                    }
                }
            });
        }
    });
    // Let the well-behaved client run beside the cases for a while at least.
    if let Some(rest) = Duration::from_secs(1).checked_sub(t0.elapsed()) {
        std::thread::sleep(rest);
    }
    let (rep, problems) = lab.check_after(canary, bystander, what);
    let mut failures = failures.into_inner().unwrap();
    failures.sort();
    let split = cases.iter().filter(|c| c.bytes.len() < SPLIT_MAX).count();
    eprintln!(
        "{what}: {} cases ({} also one byte at a time) in {:.1} s, {} failed; the well-behaved client made {} requests, p99 {:?}",
        cases.len(),
        split,
        t0.elapsed().as_secs_f64(),
        failures.len(),
        rep.ok(),
        rep.percentile(99.0)
    );
    failures.extend(problems);
    assert!(
        failures.is_empty(),
        "{what}: {} problems in {} cases:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn unique_ids(cases: &[Case]) {
    let mut ids: Vec<&str> = cases.iter().map(|c| c.id.as_str()).collect();
    ids.sort_unstable();
    let n = ids.len();
    ids.dedup();
    assert_eq!(n, ids.len(), "case ids are unique");
}

fn fixed(cases: Vec<Case>) -> Vec<Case> {
    let cases: Vec<Case> = cases.into_iter().filter(|c| c.bug.is_none()).collect();
    unique_ids(&cases);
    cases
}

// ---------------------------------------------------------------------------
// The tests.

#[test]
fn http_framing_catalogue() {
    let lab = Lab::new();
    let cases = fixed(http_cases(&lab));
    run_table(&lab, &cases, "HTTP framing");
    let smuggled = lab
        .web
        .requests()
        .iter()
        .any(|r| r.head.contains("/smuggled"));
    assert!(!smuggled, "a smuggled request reached the target");
}

#[test]
fn targets_and_egress_catalogue() {
    let lab = Lab::new();
    let cases = fixed(target_cases(&lab));
    run_table(&lab, &cases, "targets and egress");
}

#[test]
fn credentials_catalogue() {
    let lab = Lab::new();
    let cases = fixed(auth_cases(&lab));
    run_table(&lab, &cases, "credentials");
    // an unknown package and a wrong key get the same bytes (no
    // oracle for which package ids exist).
    let e = lab.e();
    let answer = |user: &str, key: &str| {
        let mut c = lab.gw.conn_from(lab.src.next());
        let r = c.connect(&e, Some((user, key)), &[]).expect("answer");
        (r.raw_head, r.body)
    };
    assert_eq!(
        answer(USER, "wrong-key"),
        answer("package-99999-country-us", KEY),
        "a wrong key and an unknown package are told apart"
    );
}

#[test]
fn socks5_catalogue() {
    let lab = Lab::new();
    let cases = fixed(socks_cases(&lab));
    run_table(&lab, &cases, "SOCKS5");
}

/// Every prefix of a valid SOCKS5 exchange and of a valid CONNECT head:
/// with the client then silent, the gateway answers the complete messages
/// only and closes at the handshake deadline (a partial HTTP head gets 408);
/// with the client's FIN after the prefix, it closes at once. No other byte.
#[test]
fn truncated_at_every_byte() {
    use Step::*;
    let lab = Lab::new();
    let canary = lab.canary();
    let bystander = lab.bystander();
    let e = lab.e();
    let socks = cat(&[
        &[5, 1, 2],
        &userpass(USER.as_bytes(), KEY.as_bytes()),
        &[5, 1, 0],
        &socks_addr_v4(TARGET_IP, lab.echo.addr().port()),
    ]);
    let head = format!("CONNECT {e} HTTP/1.1\r\nHost: {e}\r\n{}\r\n", auth_line()).into_bytes();
    let auth_end = 3 + 2 + USER.len() + 1 + KEY.len();
    let mut cases = Vec::new();
    for n in 0..socks.len() {
        let mut steps = Vec::new();
        if n >= 3 {
            steps.push(Method(2));
        }
        if n >= auth_end {
            steps.push(Auth(0));
        }
        cases.push((
            format!("SOCKS5 prefix {n}/{} then silence", socks.len()),
            socks[..n].to_vec(),
            false,
            Expect::Socks(steps.clone(), After::Deadline),
        ));
        cases.push((
            format!("SOCKS5 prefix {n}/{} then FIN", socks.len()),
            socks[..n].to_vec(),
            true,
            Expect::Socks(steps, After::Close),
        ));
    }
    for n in 0..head.len() {
        let silent = if n == 0 {
            Expect::DeadlineClose
        } else {
            Expect::Timeout408
        };
        cases.push((
            format!("CONNECT head prefix {n}/{} then silence", head.len()),
            head[..n].to_vec(),
            false,
            silent,
        ));
        cases.push((
            format!("CONNECT head prefix {n}/{} then FIN", head.len()),
            head[..n].to_vec(),
            true,
            Expect::Close,
        ));
    }
    let t0 = Instant::now();
    let failures = Mutex::new(Vec::new());
    let next = AtomicUsize::new(0);
    // Most of these wait for the deadline: many at once.
    std::thread::scope(|s| {
        for _ in 0..48 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((id, bytes, fin, expect)) = cases.get(i) else {
                        break;
                    };
                    let c = Case {
                        id: id.clone(),
                        bytes: bytes.clone(),
                        expect: expect.clone(),
                        bug: None,
                    };
                    let r = if *fin {
                        run_with_fin(&lab, &c)
                    } else {
                        run_once(&lab, &c, false).map(|_| ())
                    };
                    if let Err(e) = r {
                        failures.lock().unwrap().push(format!("{id}: {e}"));
                    }
                }
            });
        }
    });
    let rep = lab.finish(canary, bystander, "truncated messages");
    let failures = failures.into_inner().unwrap();
    eprintln!(
        "truncated messages: {} prefixes in {:.1} s, {} failed; the well-behaved client made {} requests, p99 {:?}",
        cases.len(),
        t0.elapsed().as_secs_f64(),
        failures.len(),
        rep.ok(),
        rep.percentile(99.0)
    );
    assert!(
        failures.is_empty(),
        "{} of {} truncations misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Send the prefix, then FIN; the expected replies, then a close within 1 s.
fn run_with_fin(lab: &Lab, case: &Case) -> Result<(), String> {
    let mut c = Conn::open(lab.src.next(), lab.gw.proxy).map_err(|e| format!("connect: {e}"))?;
    send(&mut c, &case.bytes, false);
    c.shutdown_write();
    let sent = Instant::now();
    let mut got = Got {
        bytes: Vec::new(),
        closed: None,
    };
    let mut at = 0;
    if let Expect::Socks(steps, _) = &case.expect {
        for s in steps {
            read_socks_step(&mut c, &mut got, &mut at, *s)?;
        }
    }
    let closed = expect_close(&mut c, &mut got, at, sent + Duration::from_millis(1500))?;
    if closed - sent > Duration::from_secs(1) {
        return Err(format!("closed only after {:?}", closed - sent));
    }
    Ok(())
}

/// One byte per second: the whole head (or handshake) must arrive within
/// handshake_ms, however steadily the bytes come (not reset per byte).
#[test]
fn slowloris_one_byte_per_second() {
    let lab = Lab::new();
    let canary = lab.canary();
    let bystander = lab.bystander();
    let e = lab.e();
    let head = format!("CONNECT {e} HTTP/1.1\r\nHost: {e}\r\n{}\r\n", auth_line()).into_bytes();
    let socks = cat(&[&[5, 1, 2], &userpass(USER.as_bytes(), KEY.as_bytes())]);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for (what, bytes) in [("HTTP", head), ("SOCKS5", socks)] {
            let (lab, results) = (&lab, &results);
            s.spawn(move || {
                let mut c = Conn::open(lab.src.next(), lab.gw.proxy).expect("connect");
                let t0 = Instant::now();
                let mut got = Got {
                    bytes: Vec::new(),
                    closed: None,
                };
                for b in &bytes {
                    if c.stream.write_all(&[*b]).is_err() {
                        break;
                    }
                    collect(
                        &mut c,
                        &mut got,
                        Instant::now() + Duration::from_secs(1),
                        |_| false,
                    );
                    if got.closed.is_some() || t0.elapsed() > Duration::from_secs(6) {
                        break;
                    }
                }
                let took = got.closed.map(|t| t - t0);
                results.lock().unwrap().push((what, took, got.bytes));
            });
        }
    });
    for (what, took, bytes) in results.into_inner().unwrap() {
        let took = took.unwrap_or_else(|| panic!("a {what} slowloris was never cut"));
        assert!(
            took >= HANDSHAKE - Duration::from_millis(100)
                && took <= HANDSHAKE + Duration::from_millis(1500),
            "a {what} slowloris was cut after {took:?} (handshake_ms {})",
            HANDSHAKE.as_millis()
        );
        if what == "HTTP" {
            let r = parse_response(&bytes).expect("an answer");
            check_error(&r, 408, "CLIENT_TIMEOUT").unwrap();
        } else {
            assert!(bytes.is_empty(), "SOCKS5 slowloris got {bytes:?}");
        }
        eprintln!("slowloris ({what}, 1 byte/s): cut after {took:?}");
    }
    lab.finish(canary, bystander, "slowloris");
}

/// Clients that never read: a tunnel into which the client pushes 64 MB
/// that the echo target sends back, and a forwarded 50 MB answer, neither
/// read. The gateway stops
/// reading from the target (backpressure), its memory stays flat, and no
/// one else waits.
#[test]
fn clients_that_never_read() {
    let lab = Lab::new();
    let canary = lab.canary();
    let bystander = lab.bystander();
    let pid = lab.gw.pid();
    let rss0 = rss_kib(pid);
    // A forwarded 50 MB answer that the client never reads.
    let mut lazy = lab.gw.conn_from(lab.src.next());
    let w = lab.w();
    lazy.send(
        format!(
            "GET http://{w}/bytes/50000000 HTTP/1.1\r\nHost: {w}\r\n{}\r\n",
            auth_line()
        )
        .as_bytes(),
    )
    .unwrap();
    // A tunnel whose far end streams to a client that never reads.
    let mut lazy_tunnel = lab.gw.conn_from(lab.src.next());
    let e = lab.e();
    lazy_tunnel
        .send(format!("CONNECT {e} HTTP/1.1\r\nHost: {e}\r\n{}\r\n", auth_line()).as_bytes())
        .unwrap();
    // The echo target sends back what it gets: push 64 MB into the tunnel
    // and never read the echo (the writes block once buffers are full).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pushed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let pusher = {
        let mut s = lazy_tunnel.stream.try_clone().unwrap();
        let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
        let (stop, pushed) = (stop.clone(), pushed.clone());
        std::thread::spawn(move || {
            let block = vec![b'x'; 65536];
            // At most 1 GB, however the buffers behave.
            while !stop.load(Ordering::SeqCst) && pushed.load(Ordering::SeqCst) < 1 << 30 {
                match s.write(&block) {
                    Ok(n) => {
                        pushed.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
        })
    };
    // Every buffer on the path fills within a moment; after that the
    // client's writes must stall (backpressure all the way back).
    std::thread::sleep(Duration::from_millis(2500));
    let pushed_early = pushed.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(1));
    let rss1 = rss_kib(pid);
    let pushed_late = pushed.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    pusher.join().unwrap();
    let pushed = pushed_late;
    let rep = lab.finish(canary, bystander, "clients that never read");
    eprintln!(
        "never-reading clients: pushed {pushed} bytes into an unread echo tunnel ({} in the last second), a 50 MB answer unread; gateway RSS {rss0} KiB → {rss1} KiB; the well-behaved client made {} requests, p99 {:?}",
        pushed_late - pushed_early,
        rep.ok(),
        rep.percentile(99.0)
    );
    assert!(
        pushed_late - pushed_early < 1 << 20,
        "the tunnel still took {} bytes in the last second after {pushed_early} (no backpressure)",
        pushed_late - pushed_early
    );
    assert!(
        rss1 < rss0 + 32 * 1024,
        "the gateway's RSS grew from {rss0} KiB to {rss1} KiB with clients that never read"
    );
    drop(lazy);
    drop(lazy_tunnel);
}

/// Half-open clients: FIN right after a request, inside a tunnel, before
/// the answer; the answers still arrive and every connection ends.
#[test]
fn half_open_clients() {
    let lab = Lab::new();
    let canary = lab.canary();
    let bystander = lab.bystander();
    let (w, e) = (lab.w(), lab.e());
    let a = auth_line();
    // 1. A forwarded GET, then FIN: the whole answer, then the close.
    let mut c = lab.gw.conn_from(lab.src.next());
    c.send(format!("GET http://{w}/bytes/100000 HTTP/1.1\r\nHost: {w}\r\n{a}\r\n").as_bytes())
        .unwrap();
    c.shutdown_write();
    let got = c
        .closed_within(Duration::from_secs(5))
        .expect("closed after the answer");
    let r = parse_response(&got).expect("an answer");
    assert_eq!(r.status, 200, "{}", r.raw_head);
    assert_eq!(
        r.body.len(),
        100_000,
        "the whole body after the client's FIN"
    );
    // 2. A tunnel: bytes, then FIN; the echo of those bytes, then the close.
    let mut c = lab.gw.tunnel(lab.src.next(), lab.echo.addr(), "country-us");
    c.send(b"half-closed but still listening").unwrap();
    c.shutdown_write();
    let got = c
        .closed_within(Duration::from_secs(5))
        .expect("the tunnel ends after the echo");
    assert_eq!(got, b"half-closed but still listening");
    // 3. CONNECT and FIN before the 200: the 200 (or nothing), then the close.
    let mut c = lab.gw.conn_from(lab.src.next());
    c.send(format!("CONNECT {e} HTTP/1.1\r\nHost: {e}\r\n{a}\r\n").as_bytes())
        .unwrap();
    c.shutdown_write();
    let got = c
        .closed_within(Duration::from_secs(5))
        .expect("a CONNECT then FIN ends");
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 200 "),
        "{}",
        show(&got)
    );
    // 4. SOCKS5 handshake then FIN: the replies, then the close.
    let mut c = lab.gw.conn_from(lab.src.next());
    c.send(&cat(&[
        &[5, 1, 2],
        &userpass(USER.as_bytes(), KEY.as_bytes()),
        &[5, 1, 0],
        &socks_addr_v4(TARGET_IP, lab.echo.addr().port()),
    ]))
    .unwrap();
    c.shutdown_write();
    let got = c
        .closed_within(Duration::from_secs(5))
        .expect("a SOCKS5 tunnel with a FIN ends");
    assert!(got.starts_with(&[5, 2, 1, 0, 5, 0, 0]), "{got:?}");
    // 5. Connect, FIN at once.
    let mut c = lab.gw.conn_from(lab.src.next());
    c.shutdown_write();
    let got = c.closed_within(Duration::from_secs(2)).expect("closed");
    assert!(got.is_empty(), "{got:?}");
    // Let the well-behaved client run a little longer beside them.
    std::thread::sleep(Duration::from_millis(500));
    lab.finish(canary, bystander, "half-open clients");
}

/// The cases the gateway once got wrong (each case's `bug` says how; see
/// docs/RELIABILITY.md): the SPEC's answer, asserted, so they stay fixed.
#[test]
fn fixed_gateway_bugs_stay_fixed() {
    let lab = Lab::new();
    let mut cases = Vec::new();
    cases.extend(http_cases(&lab));
    cases.extend(target_cases(&lab));
    cases.extend(auth_cases(&lab));
    cases.extend(socks_cases(&lab));
    let cases: Vec<Case> = cases.into_iter().filter(|c| c.bug.is_some()).collect();
    run_table(&lab, &cases, "known gateway bugs");
}

#[test]
fn the_catalogue_has_at_least_60_cases() {
    // Counted without starting anything: the builders need a lab only for
    // addresses.
    let lab = Lab::new();
    let n = http_cases(&lab).len()
        + target_cases(&lab).len()
        + auth_cases(&lab).len()
        + socks_cases(&lab).len();
    eprintln!("hostile catalogue: {n} table cases");
    assert!(n >= 60, "{n} cases");
}
