//! End-to-end support for the admin tests: the real `splicegate` binary
//! (`target/debug/splicegate`, built by `cargo build --workspace --bins`),
//! an HTTP/1.1 client for the admin API over raw TCP, raw CONNECT clients
//! and curl through the proxy, and small targets.
//!
//! Addresses: nodes bind `127.0.3.x`, clients `127.0.4.x` (the other test
//! suites use `127.0.1.x` and `127.0.2.x`); each test names its own. Ports
//! come from binding port 0. Every loop is bounded, every socket has a
//! timeout, every process started here is stopped by its PID.
#![allow(dead_code)] // each test file uses a part

use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use socket2::{Domain, SockAddr, Socket, Type};

/// The admin token every test config carries.
pub const TOKEN: &str = "t0ken-admin";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// `target/debug/splicegate`, found from this test executable
/// (`target/debug/deps/<test>`), or `$SPLICEGATE_BIN`.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SPLICEGATE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("the test executable has a directory");
    let dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent")
    } else {
        deps
    };
    let bin = dir.join("splicegate");
    assert!(
        bin.is_file(),
        "the splicegate binary is missing at {}: run `cargo build --workspace --bins` (or scripts/test) first",
        bin.display()
    );
    bin
}

/// A fresh temporary directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "splicegate-admin-{tag}-{}-{}-{nanos}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).expect("create the test directory");
    dir
}

/// A port free on 127.0.0.1 now.
pub fn free_port() -> u16 {
    // Below the ephemeral range, never the same twice in this process: with
    // `bind :0` two tests at once could get one port, and two gateways'
    // SO_REUSEPORT listeners would share it silently.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % 12_768;
    for _ in 0..12_768 {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (20_000 + (start + n) % 12_768) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32768")
}

/// `127.0.0.1:port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

/// Poll `f` until it returns `Some`, at most `timeout`.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Send a signal by PID with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -s {sig} {pid}");
}

/// What a test gateway is made of: its directory (config, store, log) and
/// its ports, kept across restarts.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The directory.
    pub dir: PathBuf,
    /// The proxy port.
    pub proxy: SocketAddr,
    /// The admin API.
    pub admin: SocketAddr,
}

impl Setup {
    /// A new directory and two free ports.
    pub fn new(tag: &str) -> Setup {
        Setup {
            dir: temp_dir(tag),
            proxy: local(free_port()),
            admin: local(free_port()),
        }
    }

    /// The common head of a config: proxy, admin (with [`TOKEN`]), store in
    /// the directory, loopback targets allowed, short timeouts, and
    /// `[health]` as given.
    pub fn head(&self, health: &str) -> String {
        format!(
            r#"[proxy]
listen = "{proxy}"
workers = 1
pin_workers = false

[admin]
listen = "{admin}"
token = "{TOKEN}"

[store]
path = "{dir}/splicegate.db"

[health]
{health}

[safety]
allow_targets = ["127.0.0.0/8"]

[timeouts]
node_connect_ms = 1000
target_ms = 3000
drain_grace_s = 1
"#,
            proxy = self.proxy,
            admin = self.admin,
            dir = self.dir.display(),
        )
    }

    /// Start the binary on `toml`.
    pub fn start(&self, toml: &str) -> Gw {
        let path = self.dir.join("splicegate.toml");
        fs::write(&path, toml).expect("write the config");
        let log_path = self.dir.join(format!(
            "stderr-{}.log",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let log = fs::File::create(&log_path).expect("create the log");
        let child = Command::new(binary())
            .args(["serve", "--config"])
            .arg(&path)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn splicegate");
        let mut gw = Gw {
            child,
            exited: None,
            setup: self.clone(),
            log_path,
        };
        let up = eventually(Duration::from_secs(15), || {
            if let Some(st) = gw.try_exit() {
                panic!("splicegate exited with {st} before serving:\n{}", gw.log());
            }
            // The proxy port opens before the admin API: ask /healthz only
            // once the admin port accepts, so a refused connect is a retry.
            let up =
                |a: &SocketAddr| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok();
            (up(&self.proxy) && up(&self.admin) && gw.get("/healthz").0 == 200).then_some(())
        });
        assert!(
            up.is_some(),
            "splicegate did not serve within 15 s:\n{}",
            gw.log()
        );
        gw
    }

    /// Remove the directory.
    pub fn remove(&self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A running gateway.
#[derive(Debug)]
pub struct Gw {
    child: Child,
    exited: Option<ExitStatus>,
    /// Its setup.
    pub setup: Setup,
    log_path: PathBuf,
}

/// An admin API answer.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Head lines after the status line, lowercased names.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl Answer {
    /// The body as JSON (`Null` when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Answer {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .expect("connect to the admin API");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s.set_write_timeout(Some(Duration::from_secs(10))).ok();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    s.write_all(req.as_bytes()).expect("send the request");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    for _ in 0..100_000 {
        let Some((size, rest)) = s.split_once("\r\n") else {
            break;
        };
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

impl Gw {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The admin API's address.
    pub fn admin(&self) -> SocketAddr {
        self.setup.admin
    }

    /// The proxy's address.
    pub fn proxy(&self) -> SocketAddr {
        self.setup.proxy
    }

    /// A request with the token.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> Answer {
        http(self.setup.admin, method, path, Some(TOKEN), body)
    }

    /// GET with the token: (status, JSON).
    pub fn get(&self, path: &str) -> (u16, Value) {
        let a = self.api("GET", path, None);
        (a.status, a.json())
    }

    /// A request with the token that must answer `want`; its JSON.
    pub fn expect(&self, method: &str, path: &str, body: Option<&str>, want: u16) -> Value {
        let a = self.api(method, path, body);
        assert_eq!(
            a.status,
            want,
            "{method} {path} {body:?}: {} {}\n{}",
            a.status,
            a.body,
            self.log_tail(20)
        );
        a.json()
    }

    /// `/metrics`.
    pub fn metrics(&self) -> String {
        let a = self.api("GET", "/metrics", None);
        assert_eq!(a.status, 200, "{}", a.body);
        a.body
    }

    /// The exit status, if it exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// SIGTERM, then wait (at most 20 s) for the exit status.
    pub fn term(&mut self) -> ExitStatus {
        signal(self.pid(), "TERM");
        self.wait(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("no exit within 20 s of SIGTERM:\n{}", self.log_tail(30)))
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        signal(self.pid(), "KILL");
        let _ = self.wait(Duration::from_secs(10));
    }

    /// SIGHUP.
    pub fn hup(&self) {
        signal(self.pid(), "HUP");
    }

    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything the gateway logged.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `n` log lines.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The process's thread count.
    pub fn threads(&self) -> usize {
        fs::read_dir(format!("/proc/{}/task", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            signal(self.pid(), "KILL");
            let _ = self.wait(Duration::from_secs(5));
        }
        if std::thread::panicking() {
            eprintln!(
                "--- splicegate log ({}) ---\n{}\n---",
                self.log_path.display(),
                self.log_tail(40)
            );
        }
    }
}

// ---- clients ----

/// A TCP connection to `dst` from the source address `src`.
pub fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    sock.bind(&SockAddr::from(SocketAddr::new(IpAddr::V4(src), 0)))?;
    sock.connect_timeout(&SockAddr::from(dst), Duration::from_secs(5))?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in input.chunks(3) {
        let b = [
            c[0],
            c.get(1).copied().unwrap_or(0),
            c.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= c.len() {
                T[((n >> (18 - 6 * i)) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

/// The gateway's answer to a CONNECT.
#[derive(Debug)]
pub struct Tunnel {
    /// The status.
    pub status: u16,
    /// `X-SOAX-Error`, if any.
    pub code: Option<String>,
    /// The whole head.
    pub head: String,
    /// The connection (the tunnel when 200).
    pub stream: TcpStream,
    /// Bytes read past the head.
    pub extra: Vec<u8>,
}

/// Send `CONNECT target` with `user:key` from `src`, read the answer head.
pub fn connect(
    proxy: SocketAddr,
    src: Ipv4Addr,
    target: SocketAddr,
    user: &str,
    key: &str,
) -> Tunnel {
    let mut s = connect_from(src, proxy).expect("connect to the proxy");
    let req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {}\r\n\r\n",
        base64(format!("{user}:{key}").as_bytes())
    );
    s.write_all(req.as_bytes()).expect("send CONNECT");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            break buf.len();
        }
        buf.extend_from_slice(&chunk[..n]);
        assert!(buf.len() < 65_536, "an endless head");
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let code = head
        .lines()
        .find_map(|l| l.strip_prefix("X-SOAX-Error:"))
        .map(|v| v.trim().to_string());
    Tunnel {
        status,
        code,
        head,
        stream: s,
        extra: buf[end..].to_vec(),
    }
}

/// A CONNECT to an [`IpEcho`] target: the exit address the target saw, or
/// the error code.
pub fn exit_ip(
    proxy: SocketAddr,
    src: Ipv4Addr,
    target: SocketAddr,
    user: &str,
    key: &str,
) -> Result<String, String> {
    let mut t = connect(proxy, src, target, user, key);
    if t.status != 200 {
        return Err(t.code.unwrap_or_else(|| format!("status {}", t.status)));
    }
    t.stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut rest = t.extra;
    let _ = t.stream.read_to_end(&mut rest);
    let text = String::from_utf8_lossy(&rest).to_string();
    Ok(text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string())
}

/// curl through the proxy with CONNECT (`-p`) from `src`: (CONNECT status,
/// body).
pub fn curl_connect(
    proxy: SocketAddr,
    src: Ipv4Addr,
    target: SocketAddr,
    user: &str,
    key: &str,
) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-p", "--max-time", "10", "--interface"])
        .arg(src.to_string())
        .arg("-x")
        .arg(format!("http://{proxy}"))
        .arg("-U")
        .arg(format!("{user}:{key}"))
        .args(["-w", "\n%{http_connect}"])
        .arg(format!("http://{target}/"))
        .stdin(Stdio::null())
        .output()
        .expect("run curl (apt-get install curl)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.trim().to_string())
}

// ---- targets ----

/// An HTTP target that answers every request with the address it sees.
#[derive(Debug)]
pub struct IpEcho {
    /// Its address.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl IpEcho {
    /// Listen on `addr` (port 0: any).
    pub fn start(addr: SocketAddr) -> io::Result<IpEcho> {
        let l = TcpListener::bind(addr)?;
        let addr = l.local_addr()?;
        l.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, peer)) => {
                        std::thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                            let mut buf = [0u8; 4096];
                            let mut got = Vec::new();
                            while !got.windows(4).any(|w| w == b"\r\n\r\n") && got.len() < 65_536 {
                                match s.read(&mut buf) {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => got.extend_from_slice(&buf[..n]),
                                }
                            }
                            let ip = peer.ip().to_string();
                            let _ = write!(
                                s,
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{ip}",
                                ip.len()
                            );
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(IpEcho {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Stop listening (the port closes).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for IpEcho {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A target that streams bytes to every connection at a steady rate
/// (`chunk` bytes every `every`) until the connection closes, for at most
/// `limit`.
#[derive(Debug)]
pub struct Source {
    /// Its address.
    pub addr: SocketAddr,
    /// Bytes written so far, all connections.
    pub written: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Source {
    /// Start on 127.0.0.1.
    pub fn start(chunk: usize, every: Duration, limit: Duration) -> Source {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the source");
        let addr = l.local_addr().expect("addr");
        l.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), written.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let (flag, count) = (flag.clone(), count.clone());
                        std::thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                            let data = vec![0x5a_u8; chunk];
                            let end = Instant::now() + limit;
                            let mut next = Instant::now();
                            while Instant::now() < end && !flag.load(Ordering::Relaxed) {
                                if s.write_all(&data).is_err() {
                                    return;
                                }
                                count.fetch_add(chunk as u64, Ordering::Relaxed);
                                next += every;
                                if let Some(d) = next.checked_duration_since(Instant::now()) {
                                    std::thread::sleep(d);
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Source {
            addr,
            written,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Read a tunnel until EOF or error; the bytes received.
pub fn drain(mut s: TcpStream, already: usize) -> u64 {
    let mut total = already as u64;
    let mut buf = vec![0u8; 256 * 1024];
    for _ in 0..10_000_000 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n as u64,
        }
    }
    total
}

/// The value of a Prometheus sample (`name{labels}` exactly as rendered), or 0.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Wait until `path` exists (for files the gateway writes).
pub fn wait_file(path: &Path, timeout: Duration) -> bool {
    eventually(timeout, || path.exists().then_some(())).is_some()
}
