//! TLS to the proxy (SPEC section 1), end to end with real clients: curl
//! with an `https://` proxy (forwarding and CONNECT), Python `requests`,
//! SOCKS5 inside TLS, headless Chromium; every answer the same inside TLS
//! as in the clear; `tls_only`; no `[tls]`; hostile handshakes beside a
//! client that keeps working; the certificate reloaded under load.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use splicegate_tests::gateway::temp_dir;
use splicegate_tests::ops::sample;
use splicegate_tests::pki::{Leaf, TestCa};
use splicegate_tests::*;

/// A gateway with `[tls]` (a leaf of a test CA), package 7, one direct
/// node, and a second port that admits only TLS.
struct Lab {
    gw: Gateway,
    ca: TestCa,
    leaf: Leaf,
    web: HttpTarget,
    echo: TcpEcho,
    bind: Ipv4Addr,
}

impl Lab {
    fn start() -> Lab {
        let dir = temp_dir("pki");
        let ca = TestCa::new(&dir);
        let leaf = ca.leaf("gw", (2031, 7, 15));
        let bind = node_ip();
        let mut conf = Conf::with_package(KEY).node(NodeDecl::direct("d1", bind));
        conf.tls = Some((leaf.cert.clone(), leaf.key.clone()));
        conf.extra
            .push_str("[[listener]]\nlisten = \"127.0.0.1:@PORT_TLSONLY@\"\ntls_only = true\n");
        Lab {
            gw: Gateway::start_conf(&conf),
            ca,
            leaf,
            web: HttpTarget::start(),
            echo: TcpEcho::start(),
            bind,
        }
    }

    /// `https://localhost:<port>` of the proxy port.
    fn proxy_url(&self) -> String {
        format!("https://localhost:{}", self.gw.proxy.port())
    }

    fn tls_only(&self) -> SocketAddr {
        self.gw.addr("TLSONLY")
    }

    /// curl through the proxy port as an HTTPS proxy, trusting the test CA.
    fn curl(&self) -> Curl {
        Curl::new(client_ip())
            .arg("--proxy")
            .arg(&self.proxy_url())
            .arg("--proxy-cacert")
            .arg(&self.ca.ca_pem().display().to_string())
    }
}

fn python() -> std::path::PathBuf {
    require_tool("python3", "python3")
}

/// Runs a Python script with `args`; (exit code, stdout, stderr).
fn run_python(script: &str, args: &[String]) -> (i32, String, String) {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run python3");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a Python script given the proxy's host, port and the CA file as
/// its first three arguments.
fn run_python_at(lab: &Lab, script: &str) -> (i32, String, String) {
    run_python(
        script,
        &[
            "127.0.0.1".into(),
            lab.gw.proxy.port().to_string(),
            lab.ca.ca_pem().display().to_string(),
        ],
    )
}

#[test]
fn curl_forwards_and_tunnels_through_an_https_proxy() {
    let lab = Lab::start();
    let user = user("country-us");
    // Forwarding: an absolute-form GET inside TLS.
    let out = lab.curl().user(&user, KEY).get(&lab.web.url("/ip"));
    assert_eq!(out.ok_body().trim(), lab.bind.to_string(), "{out:#?}");
    // CONNECT inside TLS (-p), a body of 1 MB through the TLS relay.
    let out = lab
        .curl()
        .user(&user, KEY)
        .tunnel()
        .get(&lab.web.url("/bytes/1000000"));
    assert_eq!(out.code, 0, "{out:#?}");
    assert_eq!(out.first().status, 200);
    assert_eq!(out.body.len(), 1_000_000);
    assert!(
        out.body
            .iter()
            .enumerate()
            .all(|(i, &b)| b == b"abcdefghijklmnopqrstuvwxyz"[i % 26])
    );
    // The same port still speaks cleartext HTTP and SOCKS5.
    let out = lab.gw.curl().user(&user, KEY).get(&lab.web.url("/ip"));
    assert_eq!(out.ok_body().trim(), lab.bind.to_string());
    let m = lab.gw.metrics();
    assert!(
        sample(&m, "splicegate_tls_handshakes_total{result=\"full\"}") >= 2.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "splicegate_tls_certificate_expiry_timestamp_seconds") as i64,
        lab.leaf.not_after
    );
}

/// Python `requests` with an `https://` proxy URL: forwarding and a
/// CONNECT tunnel (an `https://` target would be TLS inside TLS; the test
/// target speaks HTTP, so `requests` forwards; the tunnel is checked with
/// a raw CONNECT inside `ssl`).
#[test]
fn python_requests_through_an_https_proxy() {
    let lab = Lab::start();
    let script = r#"
import sys, requests
proxy, ca, url = sys.argv[1], sys.argv[2], sys.argv[3]
s = requests.Session()
s.proxies = {"http": proxy, "https": proxy}
s.verify = ca
r = s.get(url, timeout=15)
print(r.status_code, r.text.strip())
bad = proxy.replace("pk_", "pk_wrong_")
r = requests.get(url, proxies={"http": bad}, verify=ca, timeout=15)
print(r.status_code, r.headers.get("X-SOAX-Error"))
"#;
    let proxy = format!(
        "https://{}:{KEY}@localhost:{}",
        user("country-us"),
        lab.gw.proxy.port()
    );
    let (code, out, err) = run_python(
        script,
        &[
            proxy,
            lab.ca.ca_pem().display().to_string(),
            lab.web.url("/ip"),
        ],
    );
    assert_eq!(code, 0, "python failed: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], format!("200 {}", lab.bind), "{out}");
    assert_eq!(lines[1], "407 AUTH_FAILED", "{out}");
}

/// A small SOCKS5 client inside TLS (stock curl cannot do this): greeting,
/// RFC 1929 credentials, CONNECT to an echo target, a round trip; then a
/// wrong key gets status 0x01 as in the clear.
const SOCKS_IN_TLS: &str = r#"
import socket, ssl, struct, sys
host, port, ca, user, key, thost, tport = sys.argv[1:8]
ctx = ssl.create_default_context(cafile=ca)
def socks(key):
    raw = socket.create_connection((host, int(port)), timeout=10)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    s.sendall(b"\x05\x01\x02")
    assert s.recv(2) == b"\x05\x02"
    u, k = user.encode(), key.encode()
    s.sendall(b"\x01" + bytes([len(u)]) + u + bytes([len(k)]) + k)
    auth = s.recv(2)
    if auth != b"\x01\x00":
        return s, auth.hex()
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(thost) + struct.pack(">H", int(tport)))
    rep = s.recv(10)
    return s, rep[:2].hex()
s, rep = socks(key)
print("connect", rep, s.version(), s.selected_alpn_protocol())
payload = bytes(range(256)) * 64
s.sendall(payload)
got = b""
while len(got) < len(payload):
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
print("echo", got == payload)
s.close()
s, rep = socks(key + "x")
print("wrong key", rep)
"#;

#[test]
fn socks5_inside_tls() {
    let lab = Lab::start();
    let (code, out, err) = run_python(
        SOCKS_IN_TLS,
        &[
            "127.0.0.1".into(),
            lab.gw.proxy.port().to_string(),
            lab.ca.ca_pem().display().to_string(),
            user("country-us"),
            KEY.into(),
            lab.echo.addr().ip().to_string(),
            lab.echo.addr().port().to_string(),
        ],
    );
    assert_eq!(code, 0, "python failed: {err}\n{out}");
    let lines: Vec<&str> = out.lines().collect();
    // Python's default context offers no ALPN: none is chosen.
    assert!(lines[0].starts_with("connect 0500 TLSv1.3"), "{out}");
    assert_eq!(lines[1], "echo True", "{out}");
    assert_eq!(lines[2], "wrong key 0101", "{out}");
}

/// Every answer inside TLS is byte for byte what the same request gets in
/// the clear (apart from the request id): the codes, `X-SOAX-Error`,
/// `X-SOAX-Detail` and the body.
#[test]
fn every_answer_is_the_same_inside_tls() {
    let lab = Lab::start();
    let closed = ClosedPort::new();
    let web = lab.web.url("/ip");
    let cases: Vec<(&str, String, String, bool)> = vec![
        ("no credentials", String::new(), String::new(), false),
        ("wrong key", user("country-us"), "pk_nope".into(), false),
        ("unknown parameter", user("colour-red"), KEY.into(), false),
        ("bad value", user("country-usa"), KEY.into(), false),
        ("no such node", user("country-fr"), KEY.into(), false),
        ("closed target", user("country-us"), KEY.into(), true),
    ];
    for (what, u, k, to_closed) in cases {
        let url = if to_closed {
            format!("http://{}/", closed.addr())
        } else {
            web.clone()
        };
        let answer = |tls: bool| {
            let mut c = if tls { lab.curl() } else { lab.gw.curl() };
            if !u.is_empty() {
                c = c.user(&u, &k);
            }
            c.tunnel().get(&url)
        };
        let (clear, inside) = (answer(false), answer(true));
        let key = |o: &CurlOut| {
            let h = o.first();
            (
                h.status,
                h.header("X-SOAX-Error").map(str::to_string),
                h.header("X-SOAX-Detail").map(str::to_string),
                h.header("Proxy-Authenticate").map(str::to_string),
            )
        };
        assert!(
            key(&clear).1.is_some(),
            "{what}: an error in the clear: {clear:#?}"
        );
        assert_eq!(key(&inside), key(&clear), "{what}");
    }
}

#[test]
fn tls_only_refuses_cleartext_without_reading_credentials() {
    let lab = Lab::start();
    let port = lab.tls_only();
    // Cleartext HTTP with credentials: 400, never a 407.
    let out = Curl::new(client_ip())
        .proxy(port)
        .user(&user("country-us"), KEY)
        .get(&lab.web.url("/ip"));
    let h = out.last();
    assert_eq!(h.status, 400, "{out:#?}");
    assert_eq!(h.header("X-SOAX-Error"), Some("BAD_REQUEST"));
    assert_eq!(h.header("X-SOAX-Detail"), Some("this port requires TLS"));
    // Cleartext SOCKS5: method 0xFF.
    let mut s = TcpStream::connect(port).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"\x05\x01\x02").unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [0x05, 0xff]);
    // TLS there works.
    let out = Curl::new(client_ip())
        .arg("--proxy")
        .arg(&format!("https://localhost:{}", port.port()))
        .arg("--proxy-cacert")
        .arg(&lab.ca.ca_pem().display().to_string())
        .user(&user("country-us"), KEY)
        .get(&lab.web.url("/ip"));
    assert_eq!(out.ok_body().trim(), lab.bind.to_string());
    // The credentials sent in the clear were never logged.
    assert!(!lab.gw.log().contains(KEY), "the key is in the log");
}

/// A ClientHello (the first bytes of curl's) as a test can send it: made
/// by Python's ssl module against a socket pair, so the bytes are real.
/// With `tls12`, TLS 1.2 only (its alerts are in the clear; TLS 1.3
/// encrypts every alert after the ServerHello).
fn client_hello(alpn: &[&str], tls12: bool) -> Vec<u8> {
    let script = r#"
import ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
if sys.argv[1]:
    ctx.set_alpn_protocols(sys.argv[1].split(","))
if sys.argv[2] == "12":
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
o = ctx.wrap_bio(inc, out, server_hostname="localhost")
try:
    o.do_handshake()
except ssl.SSLWantReadError:
    pass
sys.stdout.write(out.read().hex())
"#;
    let v = if tls12 { "12" } else { "13" };
    let (code, out, err) = run_python(script, &[alpn.join(","), v.into()]);
    assert_eq!(code, 0, "{err}");
    (0..out.len() / 2)
        .map(|i| u8::from_str_radix(&out[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// Without `[tls]`, a ClientHello gets a fatal handshake_failure alert;
/// `tls_only` without `[tls]` is a config error.
#[test]
fn without_tls_a_client_hello_gets_an_alert() {
    let gw = Gateway::with_direct(node_ip());
    let hello = client_hello(&["http/1.1"], false);
    let mut s = TcpStream::connect(gw.proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&hello).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert_eq!(got, [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]);
    let m = gw.metrics();
    assert_eq!(
        sample(
            &m,
            "splicegate_tls_handshakes_total{result=\"not_configured\"}"
        ),
        1.0
    );
    let mut conf = Conf::with_package(KEY).node(NodeDecl::direct("d1", node_ip()));
    conf.tls_only = true;
    let e = Gateway::try_start(&conf.toml()).expect_err("tls_only without [tls]");
    assert!(
        format!("{e:#}").contains("proxy.tls_only needs [tls]"),
        "{e:#}"
    );
}

/// A well-behaved client under test: curl through the HTTPS proxy at
/// `port` (trusting `ca_pem`) in a loop from its own address until the
/// returned flag is set; the thread returns (ok, failed).
fn curl_loop(
    port: u16,
    ca_pem: std::path::PathBuf,
    url: String,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<(u32, u32)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let src = client_ip();
    let thread = std::thread::spawn(move || {
        let (mut ok, mut failed) = (0u32, 0u32);
        while !flag.load(Ordering::SeqCst) {
            let out = Curl::new(src)
                .arg("--proxy")
                .arg(&format!("https://localhost:{port}"))
                .arg("--proxy-cacert")
                .arg(&ca_pem.display().to_string())
                .user(&user("country-us"), KEY)
                .get(&url);
            if out.code == 0 && out.last().status == 200 {
                ok += 1;
            } else {
                failed += 1;
            }
        }
        (ok, failed)
    });
    (stop, thread)
}

/// What a hostile handshake came to: the bytes the gateway sent back, and
/// how long until it closed.
fn hostile(addr: SocketAddr, bytes: &[u8], then_close: bool) -> (Vec<u8>, Duration) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = Instant::now();
    s.write_all(bytes).unwrap();
    if then_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    (got, t.elapsed())
}

/// Truncated ClientHellos, garbage after 0x16, a handshake that never
/// completes, a ClientHello offering only h2, a TLS 1.2 renegotiation:
/// each answered (an alert or a close) within the handshake timeout, while
/// a well-behaved TLS client keeps being served.
#[test]
fn hostile_handshakes_harm_no_one() {
    let dir = temp_dir("pki");
    let ca = TestCa::new(&dir);
    let leaf = ca.leaf("gw", (2031, 7, 15));
    let mut conf = Conf::with_package(KEY).node(NodeDecl::direct("d1", node_ip()));
    conf.tls = Some((leaf.cert.clone(), leaf.key.clone()));
    conf.handshake_ms = 1500;
    conf.workers = "1".into();
    let gw = Gateway::start_conf(&conf);
    let web = HttpTarget::start();
    // The well-behaved client: curl through the HTTPS proxy in a loop.
    let (stop, canary) = curl_loop(gw.proxy.port(), ca.ca_pem(), web.url("/ip"));
    let hello = client_hello(&["http/1.1"], false);
    let h2_only = client_hello(&["h2"], true);
    let budget = Duration::from_millis(1500 + 1000);
    // Truncated: the record header promises more than comes, then EOF.
    let (got, took) = hostile(gw.proxy, &hello[..hello.len() / 2], true);
    assert!(got.is_empty() || got[0] == 0x15, "truncated: {got:?}");
    assert!(took < budget, "truncated took {took:?}");
    // Garbage after 0x16: a record longer than TLS allows, and a
    // handshake message of no known type: an alert each.
    for garbage in [
        &b"\x16\x03\x01\xff\xffgarbage"[..],
        &b"\x16\x03\x01\x00\x04\x63\x00\x00\x00"[..],
    ] {
        let (got, took) = hostile(gw.proxy, garbage, false);
        assert_eq!(
            got.first(),
            Some(&0x15),
            "garbage {garbage:02x?}: {got:02x?}"
        );
        assert!(took < budget, "garbage took {took:?}");
    }
    // A handshake that never completes: closed at the handshake timeout.
    let (got, took) = hostile(gw.proxy, &hello[..10], false);
    assert!(got.is_empty(), "stalled: {got:?}");
    assert!(
        took >= Duration::from_millis(1400) && took < budget,
        "stalled closed after {took:?}"
    );
    // Only h2 offered: alert no_application_protocol (120), fatal.
    let (got, _) = hostile(gw.proxy, &h2_only, false);
    assert_eq!(got, [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 120], "h2 only");
    // Renegotiation: openssl s_client over TLS 1.2 asks for it ("R"); the
    // gateway refuses (rustls never renegotiates) and the connection ends
    // or stays usable, never hangs a worker.
    let s_client = Command::new(require_tool("openssl", "openssl"))
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", gw.proxy.port()),
            "-tls1_2",
            "-CAfile",
            &ca.ca_pem().display().to_string(),
            "-servername",
            "localhost",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start openssl s_client");
    {
        let mut child = s_client;
        std::thread::sleep(Duration::from_millis(500));
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(b"R\n");
            std::thread::sleep(Duration::from_millis(500));
        }
        let t = Instant::now();
        let out = loop {
            if let Ok(Some(_)) = child.try_wait() {
                break child.wait_with_output().ok();
            }
            if t.elapsed() > Duration::from_secs(5) {
                let _ = child.kill();
                break child.wait_with_output().ok();
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let text = out
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_default();
        // s_client asked ("RENEGOTIATING") and the gateway refused
        // (OpenSSL reports the no_renegotiation alert it got).
        assert!(
            text.contains("RENEGOTIATING") && text.contains("no renegotiation"),
            "{text}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = canary.join().unwrap();
    assert!(
        ok >= 5 && failed == 0,
        "the well-behaved client: {ok} ok, {failed} failed"
    );
    let m = gw.metrics();
    assert!(
        sample(&m, "splicegate_tls_handshakes_total{result=\"failed\"}") >= 2.0,
        "{m}"
    );
    assert!(
        sample(&m, "splicegate_tls_handshakes_total{result=\"timed_out\"}") >= 1.0,
        "{m}"
    );
}

/// The certificate reloaded by SIGHUP while clients keep connecting: no
/// request fails, new handshakes get the new certificate (its expiry in
/// `/metrics`), a broken certificate file is refused and the running one
/// stays, and resumption survives the reload.
#[test]
fn certificate_reload_under_load() {
    let lab = Lab::start();
    let cfg_path = lab.gw.dir.join("splicegate.toml");
    let load: Vec<_> = (0..2)
        .map(|_| curl_loop(lab.gw.proxy.port(), lab.ca.ca_pem(), lab.web.url("/ip")))
        .collect();
    let expiry = || {
        sample(
            &lab.gw.metrics(),
            "splicegate_tls_certificate_expiry_timestamp_seconds",
        ) as i64
    };
    assert_eq!(expiry(), lab.leaf.not_after);
    // A tunnel inside TLS, open across every reload below.
    let mut held = splicegate_tests::pki::tls_connect(lab.gw.proxy, &lab.ca.ca_pem()).unwrap();
    let round_trip = |s: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
                      what: &[u8]| {
        s.write_all(what).unwrap();
        let mut back = vec![0u8; what.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, what);
    };
    write!(
        held,
        "CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\nProxy-Authorization: {}\r\n\r\n",
        basic(&user("country-us"), KEY),
        echo = lab.echo.addr()
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        held.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    round_trip(&mut held, b"before the reload");
    // A new certificate in the same files.
    let next = lab.ca.leaf("next", (2033, 1, 1));
    std::fs::copy(&next.cert, &lab.leaf.cert).unwrap();
    std::fs::copy(&next.key, &lab.leaf.key).unwrap();
    lab.gw.signal("HUP");
    let seen = eventually(Duration::from_secs(5), Duration::from_millis(50), || {
        (expiry() == next.not_after).then_some(())
    });
    assert!(seen.is_some(), "the new certificate's expiry: {}", expiry());
    assert_eq!(
        peer_not_after(&lab),
        next.not_after,
        "new handshakes get the new certificate"
    );
    // A broken key file: the reload is refused, the running certificate stays.
    std::fs::write(&lab.leaf.key, "not a key\n").unwrap();
    lab.gw.signal("HUP");
    let refused = eventually(Duration::from_secs(5), Duration::from_millis(50), || {
        lab.gw.log().contains("reload of").then_some(())
    });
    assert!(refused.is_some(), "{}", lab.gw.log());
    assert_eq!(expiry(), next.not_after);
    // Removing [tls] by reload is refused (it needs a restart).
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    let without: String =
        text.split("[tls]").next().unwrap().to_string() + &text[text.find("[admin]").unwrap()..];
    std::fs::write(&cfg_path, without).unwrap();
    lab.gw.signal("HUP");
    let said = eventually(Duration::from_secs(5), Duration::from_millis(50), || {
        // (The tls_only port may be what names the missing [tls].)
        let log = lab.gw.log();
        (log.contains("removing TLS needs a restart") || log.contains("tls_only needs [tls]"))
            .then_some(())
    });
    assert!(said.is_some(), "{}", lab.gw.log());
    std::thread::sleep(Duration::from_millis(500));
    let (mut ok, mut failed) = (0, 0);
    for (stop, t) in load {
        stop.store(true, Ordering::SeqCst);
        let (o, f) = t.join().unwrap();
        (ok, failed) = (ok + o, failed + f);
    }
    assert!(
        ok >= 10 && failed == 0,
        "under reloads: {ok} ok, {failed} failed"
    );
    // Resumption: two connections sharing a session, the second resumed.
    let script = r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[3])
ctx.maximum_version = ssl.TLSVersion.TLSv1_2
sess = None
for i in range(2):
    s = ctx.wrap_socket(socket.create_connection((sys.argv[1], int(sys.argv[2]))), server_hostname="localhost", session=sess)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    s.recv(100)
    print(s.session_reused)
    sess = s.session
    s.close()
"#;
    let (code, out, err) = run_python_at(&lab, script);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["False", "True"],
        "{out}"
    );
    let m = lab.gw.metrics();
    assert!(
        sample(&m, "splicegate_tls_handshakes_total{result=\"resumed\"}") >= 1.0,
        "{m}"
    );
}

/// The `notAfter` of the certificate a new handshake gets.
fn peer_not_after(lab: &Lab) -> i64 {
    let script = r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[3])
s = ctx.wrap_socket(socket.create_connection((sys.argv[1], int(sys.argv[2]))), server_hostname="localhost")
print(int(ssl.cert_time_to_seconds(s.getpeercert()["notAfter"])))
"#;
    let (code, out, err) = run_python_at(lab, script);
    assert_eq!(code, 0, "{err}");
    out.trim().parse().expect("a timestamp")
}

/// Headless Chromium with `--proxy-server=https://localhost:PORT`, trusting
/// the gateway's certificate: the page it loads is the target's answer
/// (the exit address), fetched through the gateway inside TLS.
#[test]
fn chromium_through_an_https_proxy() {
    let Some(chromium) = chromium() else {
        panic!("chromium is not installed: apt-get install -y chromium");
    };
    let dir = temp_dir("pki");
    let ca = TestCa::new(&dir);
    let leaf = ca.leaf("gw", (2031, 7, 15));
    let bind = node_ip();
    // Chromium cannot answer a proxy's 407 without a prompt: an ip_only
    // port bound to the package admits it by address instead (Chromium
    // connects from 127.0.0.1).
    let mut conf = Conf::with_package(KEY).node(NodeDecl::direct("d1", bind));
    conf.packages[0] = conf.packages[0]
        .clone()
        .set("auth", "\"ip\"")
        .set("ip_allowlist", "[\"127.0.0.1/32\"]");
    conf.tls = Some((leaf.cert.clone(), leaf.key.clone()));
    conf.extra.push_str(
        "[[listener]]\nlisten = \"127.0.0.1:@PORT_CHROME@\"\npackage = 7\nip_only = true\n",
    );
    let gw = Gateway::start_conf(&conf);
    let web = HttpTarget::start();
    let port = gw.addr("CHROME").port();
    let profile = temp_dir("chromium");
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            &format!("--user-data-dir={}", profile.display()),
            &format!("--proxy-server=https://localhost:{port}"),
            "--proxy-bypass-list=<-loopback>",
            &format!("--ignore-certificate-errors-spki-list={}", leaf.spki_sha256),
            "--dump-dom",
            &web.url("/ip"),
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains(&bind.to_string()),
        "chromium's page: {dom}\nstderr: {}\ngateway: {}",
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
    let m = gw.metrics();
    assert!(sample(&m, "splicegate_tls_handshakes_total{result=\"full\"}") >= 1.0);
}

fn chromium() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|d| [d.join("chromium"), d.join("chromium-browser")])
        .find(|p| p.is_file())
}
