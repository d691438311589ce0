//! The operations side end to end (the admin API, health checks, the
//! ledger, the dashboard): a [`Setup`] that starts the binary more than
//! once on one directory (store) and one set of ports, each time with a
//! file of its own; raw HTTP to the admin API with its head
//! ([`http`], [`Answer`]); CONNECT clients that name the proxy and the key
//! ([`connect`], [`exit_ip`], [`curl_connect`]); a target answering with
//! the address it sees ([`IpEcho`]); Prometheus samples ([`sample`]).
//!
//! Addresses: these tests' nodes bind `127.0.3.x` and their clients use
//! `127.0.4.x`, each test naming its own; they take none from the counters
//! of [`crate::addr`], so within one test binary no two tests share one.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::client::{basic, connect_from};
use crate::gateway::{Gateway, temp_dir};
use crate::targets::Acceptor;

/// The admin token [`Setup::head`] configures (the one of [`crate::Conf`]).
pub const TOKEN: &str = crate::admin::ADMIN_TOKEN;

/// A gateway's directory (config, store, log) and the ports it bound,
/// kept across starts: each [`Setup::start`] after the first binds the
/// same proxy and admin ports on the same store.
#[derive(Debug)]
pub struct Setup {
    /// The directory.
    pub dir: PathBuf,
    ports: Mutex<HashMap<String, SocketAddr>>,
    /// The PostgreSQL server of this setup's store, when the tests run on
    /// PostgreSQL ([`store_is_postgres`]).
    pub pg: Option<crate::pg::Postgres>,
}

/// Whether the operations tests run on PostgreSQL
/// (`SPLICEGATE_TEST_STORE=postgres`, which `scripts/test` sets for a
/// second run of them) rather than on the SQLite file: one test body, two
/// stores.
pub fn store_is_postgres() -> bool {
    std::env::var("SPLICEGATE_TEST_STORE").is_ok_and(|v| v == "postgres")
}

impl Setup {
    /// A new directory; ports come from the first start (port 0). On
    /// PostgreSQL, a server of its own, started now.
    pub fn new(tag: &str) -> Setup {
        Setup::with_store(tag, store_is_postgres())
    }

    /// A setup on PostgreSQL whatever `SPLICEGATE_TEST_STORE` says.
    pub fn on_postgres(tag: &str) -> Setup {
        Setup::with_store(tag, true)
    }

    fn with_store(tag: &str, postgres: bool) -> Setup {
        Setup {
            dir: temp_dir(tag),
            ports: Mutex::new(HashMap::new()),
            pg: postgres.then(crate::pg::Postgres::start),
        }
    }

    /// The `[store]` table: the file in the directory, or this setup's
    /// PostgreSQL.
    pub fn store(&self) -> String {
        match &self.pg {
            Some(pg) => pg.store_table(),
            None => "[store]\npath = \"@DIR@/splicegate.db\"\n".to_string(),
        }
    }

    /// The common head of a config: proxy, admin (with [`TOKEN`]), store in
    /// the directory, loopback targets allowed, short timeouts, and
    /// `[health]` as given.
    pub fn head(&self, health: &str) -> String {
        head(&self.store(), health)
    }

    /// Start the binary on `toml` (placeholders as [`crate::conf`]) in this
    /// directory, on this setup's ports once it has some.
    pub fn start(&self, toml: &str) -> Gateway {
        let ports = self.ports.lock().unwrap().clone();
        let gw = Gateway::start_in(self.dir.clone(), ports, toml);
        *self.ports.lock().unwrap() = gw.ports().clone();
        gw
    }
}

/// The common head of a config ([`Setup::head`]) on the `[store]` table
/// `store`: proxy (one worker) and admin (with [`TOKEN`]) on placeholders,
/// loopback targets allowed, short timeouts, and `[health]` as given.
pub fn head(store: &str, health: &str) -> String {
    format!(
        r#"[proxy]
listen = "@PROXY@"
workers = 1
pin_workers = false

[admin]
listen = "@ADMIN@"
token = "{TOKEN}"

{store}
[health]
{health}

[safety]
allow_targets = ["127.0.0.0/8"]

[timeouts]
node_connect_ms = 1000
target_ms = 3000
drain_grace_s = 1
"#
    )
}

/// `[[org]]` `org` with `credits`, and its `[[package]]` `id` with `key`
/// and `more` lines (`price_per_gb = 1.0\n`, …), as TOML.
pub fn org_and_package(org: &str, credits: f64, id: u32, key: &str, more: &str) -> String {
    format!(
        "[[org]]\nid = {org:?}\ncredits = {credits:?}\n\n[[package]]\nid = {id}\norg = {org:?}\nkey = {key:?}\n{more}\n"
    )
}

/// A `[[node]]` of kind `direct` exiting from `bind`, placed by `place`
/// (`country = "us"\ncity = "new_york"`, …), as TOML.
pub fn direct_node(id: &str, bind: impl std::fmt::Display, place: &str) -> String {
    format!("[[node]]\nid = {id:?}\nkind = \"direct\"\nbind = \"{bind}\"\n{place}\n\n")
}

impl Drop for Setup {
    /// Remove the directory, unless the test failed or
    /// `SPLICEGATE_TEST_KEEP` is set (then the logs stay).
    fn drop(&mut self) {
        if !std::thread::panicking() && std::env::var_os("SPLICEGATE_TEST_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
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
/// Panics when the API does not accept.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Answer {
    let failed = |e: io::Error| -> ! { panic!("{method} {path} on the admin API {addr}: {e}") };
    let mut s = connect_from(IpAddr::V4(Ipv4Addr::LOCALHOST), addr).unwrap_or_else(|e| failed(e));
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
    s.write_all(req.as_bytes()).unwrap_or_else(|e| failed(e));
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

impl Gateway {
    /// An admin request with the token.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> Answer {
        http(self.admin_addr(), method, path, Some(TOKEN), body)
    }

    /// GET with the token: (status, JSON).
    pub fn get(&self, path: &str) -> (u16, Value) {
        let a = self.api("GET", path, None);
        (a.status, a.json())
    }

    /// GET with the token that must answer 200; its JSON.
    pub fn get_json(&self, path: &str) -> Value {
        self.expect("GET", path, None, 200)
    }

    /// POST `body` with the token that must answer 201; its JSON.
    pub fn created(&self, path: &str, body: &str) -> Value {
        self.expect("POST", path, Some(body), 201)
    }

    /// PATCH `body` with the token that must answer 200; its JSON.
    pub fn patched(&self, path: &str, body: &str) -> Value {
        self.expect("PATCH", path, Some(body), 200)
    }

    /// An admin request with the token that must answer `want`; its JSON.
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

    /// SIGTERM, then wait (at most 20 s) for the exit status.
    pub fn term(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("no exit within 20 s of SIGTERM:\n{}", self.log_tail(30)))
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        self.signal("KILL");
        let _ = self.wait_exit(Duration::from_secs(10));
    }
}

// ---- clients ----

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
    let mut s = connect_from(IpAddr::V4(src), proxy).expect("connect to the proxy");
    let req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {}\r\n\r\n",
        basic(user, key)
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
/// 0 when there was no answer; body).
pub fn curl_connect(
    proxy: SocketAddr,
    src: Ipv4Addr,
    target: SocketAddr,
    user: &str,
    key: &str,
) -> (u16, String) {
    let out = crate::Curl::new(src)
        .proxy(proxy)
        .user(user, key)
        .tunnel()
        .get(&format!("http://{target}/"));
    let status = out.heads.first().map_or(0, |h| h.status);
    (status, out.text().trim().to_string())
}

/// Read a tunnel until EOF or error; the bytes received (plus `already`).
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

// ---- targets ----

/// An HTTP target that answers every request with the address it sees.
#[derive(Debug)]
pub struct IpEcho {
    /// Its address.
    pub addr: SocketAddr,
    acceptor: Acceptor,
}

impl IpEcho {
    /// Listen on `addr` (port 0: the kernel's choice).
    pub fn start(addr: SocketAddr) -> io::Result<IpEcho> {
        let acceptor = Acceptor::spawn(
            TcpListener::bind(addr)?,
            Arc::new(|mut s: TcpStream| {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let peer = match s.peer_addr() {
                    Ok(p) => p,
                    Err(_) => return,
                };
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
            }),
        );
        Ok(IpEcho {
            addr: acceptor.addr(),
            acceptor,
        })
    }

    /// Stop listening (the port refuses connections).
    pub fn stop(&mut self) {
        self.acceptor.shutdown();
    }
}

/// `127.0.0.1:port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}
