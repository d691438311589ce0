//! The hostile-input catalogue's runner (research/reliability.md §2), used
//! by `tests/tests/hostile_catalog/`: the lab (a gateway with a debug log
//! and an access log, an HTTP node with upstream credentials, targets on
//! `127.0.10.1`), the case types, and running a case whole and one byte at
//! a time beside a well-behaved client, then checking that nothing hostile
//! reached the node and no log line holds a secret.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::canary::{Canary, CanaryPlan, CanaryReport};
use crate::watch::{Sources, leaked_secrets};
use crate::*;

/// `[timeouts] handshake_ms` of every gateway here.
pub const HANDSHAKE: Duration = Duration::from_millis(1500);
/// The upstream credentials of the node (a secret the logs must not show).
pub const NODE_USER: &str = "node-user";
pub const NODE_PASS: &str = "np_N0de_s3cret_Z8";
/// Where the targets listen: the only non-public range allowed.
pub const TARGET_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 10, 1);
/// The well-behaved username.
pub const USER: &str = "package-7-country-us";
/// Inputs shorter than this also run one byte per write.
pub const SPLIT_MAX: usize = 300;
/// Cases run at once.
pub const PARALLEL: usize = 6;

// ---------------------------------------------------------------------------
// The lab: a gateway, an HTTP node with upstream credentials, two targets.

#[derive(Debug)]
pub struct Lab {
    pub gw: Gateway,
    pub web: HttpTarget,
    pub echo: TcpEcho,
    pub node: TestNode,
    pub src: Sources,
}

impl Lab {
    pub fn start() -> Lab {
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

    /// A lab, the well-behaved client running beside it, and a tunnel
    /// opened before anything hostile ([`Lab::finish`] checks both).
    pub fn watched() -> (Lab, Canary, Conn) {
        let lab = Lab::start();
        let (canary, bystander) = (lab.canary(), lab.bystander());
        (lab, canary, bystander)
    }

    /// The well-behaved user's CONNECT head to the echo target.
    pub fn connect_head(&self) -> Vec<u8> {
        let e = self.e();
        format!("CONNECT {e} HTTP/1.1\r\nHost: {e}\r\n{}\r\n", auth_line()).into_bytes()
    }

    pub fn w(&self) -> String {
        self.web.addr().to_string()
    }

    pub fn e(&self) -> String {
        self.echo.addr().to_string()
    }

    pub fn canary(&self) -> Canary {
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

    pub fn bystander(&self) -> Conn {
        self.gw
            .tunnel(Sources::reserved(1), self.echo.addr(), "country-us")
    }

    /// The end of every test: the canary never failed, the bystander tunnel
    /// still carries bytes, nothing hostile reached the node, no secret in
    /// any log line. Returns the canary's record and every problem found.
    pub fn check_after(
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
    pub fn finish(&self, canary: Canary, bystander: Conn, what: &str) -> CanaryReport {
        let (rep, problems) = self.check_after(canary, bystander, what);
        assert!(
            problems.is_empty(),
            "after {what}:\n{}",
            problems.join("\n")
        );
        rep
    }

    pub fn secrets_in_logs(&self) -> Vec<String> {
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
pub enum Step {
    /// Method selection `05 m`.
    Method(u8),
    /// RFC 1929 status `01 s`.
    Auth(u8),
    /// Request reply `05 r 00 ATYP BND.ADDR BND.PORT`.
    Reply(u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
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
pub enum Expect {
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
    /// A fatal TLS alert record with this description (SPEC 1: a
    /// ClientHello on a port without `[tls]` gets `handshake_failure`, 40),
    /// then close within a second.
    TlsAlert(u8),
    /// Any answer of the gateway's but `400` (a well-formed target the
    /// pool may not be able to reach).
    NotBadRequest,
    /// `408 CLIENT_TIMEOUT` at the handshake deadline, then close.
    Timeout408,
    /// Nothing at all, closed at the handshake deadline.
    DeadlineClose,
}

#[derive(Debug, Clone)]
pub struct Case {
    pub id: String,
    pub bytes: Vec<u8>,
    pub expect: Expect,
    /// A known gateway bug: the case runs only in `fixed_gateway_bugs_stay_fixed`.
    pub bug: Option<&'static str>,
}

pub fn case(id: &str, bytes: impl Into<Vec<u8>>, expect: Expect) -> Case {
    Case {
        id: id.into(),
        bytes: bytes.into(),
        expect,
        bug: None,
    }
}

impl Case {
    /// Mark a known gateway bug (the case moves to `known_gateway_bugs`).
    pub fn bug(mut self, why: &'static str) -> Case {
        self.bug = Some(why);
        self
    }
}

pub const BUG_CHUNK: &str = "a malformed chunk in a forwarded request body closes the connection without an answer; SPEC 4 wants 400 BAD_REQUEST";
pub const BUG_SCHEME: &str = "Proxy-Authorization with a scheme other than Basic answers AUTH_FAILED; docs/errors.md wants ERR_AUTH_REQUIRED";
pub const BUG_KEY_IN_RULES: &str = "the key inside the rules answers 400 ERR_UNKNOWN_PARAM whose detail (access log, debug log, recent errors) holds the key; SPEC 2/7 want AUTH_FAILED and no key logged";

pub fn bad() -> Expect {
    Expect::Error(400, "BAD_REQUEST")
}

pub fn too_large() -> Expect {
    Expect::Error(431, "HEADERS_TOO_LARGE")
}

pub fn disallowed() -> Expect {
    Expect::Error(403, "DISALLOWED")
}

pub fn auth_failed() -> Expect {
    Expect::Error(407, "AUTH_FAILED")
}

pub fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// `Proxy-Authorization: Basic …\r\n` of the well-behaved user.
pub fn auth_line() -> String {
    format!("Proxy-Authorization: {}\r\n", basic(USER, KEY))
}

/// `Proxy-Authorization` with arbitrary decoded bytes.
pub fn auth_raw(decoded: &[u8]) -> String {
    format!("Proxy-Authorization: Basic {}\r\n", b64(decoded))
}

pub fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

// ---------------------------------------------------------------------------
// SOCKS5 messages.

pub fn userpass(user: &[u8], pass: &[u8]) -> Vec<u8> {
    cat(&[&[1, user.len() as u8], user, &[pass.len() as u8], pass])
}

pub fn socks_addr_v4(ip: Ipv4Addr, port: u16) -> Vec<u8> {
    cat(&[&[1], &ip.octets(), &port.to_be_bytes()])
}

pub fn socks_domain(name: &[u8], port: u16) -> Vec<u8> {
    cat(&[&[3, name.len() as u8], name, &port.to_be_bytes()])
}

// ---------------------------------------------------------------------------
// Running a case.

/// Bytes read until the peer closed or a condition held, and when it closed.
#[derive(Debug)]
pub struct Got {
    pub bytes: Vec<u8>,
    pub closed: Option<Instant>,
}

/// Read into `got` until it closes, `enough(bytes)` holds, or `until`.
pub fn collect(c: &mut Conn, got: &mut Got, until: Instant, enough: impl Fn(&[u8]) -> bool) {
    let mut buf = [0u8; 65536];
    while got.closed.is_none() && !enough(&got.bytes) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let _ = c
            .stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match c.try_read(&mut buf) {
            Some(0) => got.closed = Some(Instant::now()),
            Some(n) => got.bytes.extend_from_slice(&buf[..n]),
            None => {}
        }
    }
}

/// The length of a complete HTTP response at the start of `b`, if there is one.
pub fn response_len(b: &[u8]) -> Option<usize> {
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

pub fn parse_response(b: &[u8]) -> Result<Resp, String> {
    let n = response_len(b)
        .ok_or_else(|| format!("no complete response in {:?}", String::from_utf8_lossy(b)))?;
    let end = b.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
    let mut r = Resp::parse_head(&b[..end]).map_err(|e| e.to_string())?;
    r.body = b[end..n].to_vec();
    Ok(r)
}

/// The checks of [`assert_error`], as a result.
pub fn check_error(r: &Resp, status: u16, code: &str) -> Result<(), String> {
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

pub fn show(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(300)]).to_string();
    if s.chars().all(|c| !c.is_control() || c == '\r' || c == '\n') && !b.starts_with(&[5]) {
        format!("{s:?}")
    } else {
        format!("{:02x?}", &b[..b.len().min(40)])
    }
}

/// Send `bytes`: in one write, or one byte per write with a pause. Stops at
/// a write error (the gateway closed).
pub fn send(c: &mut Conn, bytes: &[u8], split: bool) {
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

pub fn read_socks_step(
    c: &mut Conn,
    got: &mut Got,
    at: &mut usize,
    step: Step,
) -> Result<(), String> {
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
pub fn expect_close(
    c: &mut Conn,
    got: &mut Got,
    at: usize,
    by: Instant,
) -> Result<Instant, String> {
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

pub fn deadline_ok(t0: Instant, closed: Instant) -> Result<(), String> {
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

pub fn tunnel_after(c: &mut Conn, got: &mut Got, at: usize, after: &After) -> Result<(), String> {
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
pub fn run_once(lab: &Lab, case: &Case, split: bool) -> Result<String, String> {
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
        Expect::TlsAlert(description) => {
            collect(&mut c, &mut got, sent + Duration::from_millis(1500), |_| {
                false
            });
            let want = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, *description];
            if got.bytes != want {
                return Err(format!(
                    "want the alert {want:02x?}, got {}",
                    show(&got.bytes)
                ));
            }
            if got.closed.is_none() {
                return Err("still open after the alert".into());
            }
            Ok(format!("TLS alert {description}"))
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
pub fn run_case(lab: &Lab, case: &Case) -> Result<(), String> {
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
pub fn run_table(lab: &Lab, cases: &[Case], what: &str) {
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

pub fn unique_ids(cases: &[Case]) {
    let mut ids: Vec<&str> = cases.iter().map(|c| c.id.as_str()).collect();
    ids.sort_unstable();
    let n = ids.len();
    ids.dedup();
    assert_eq!(n, ids.len(), "case ids are unique");
}

pub fn fixed(cases: Vec<Case>) -> Vec<Case> {
    let cases: Vec<Case> = cases.into_iter().filter(|c| c.bug.is_none()).collect();
    unique_ids(&cases);
    cases
}
