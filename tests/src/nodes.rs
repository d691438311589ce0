//! Our own exit nodes: a minimal HTTP CONNECT proxy and a minimal SOCKS5
//! proxy (threads, blocking std sockets), each on its own `127.0.1.x`, whose
//! outgoing connections leave from that same address (so a target sees which
//! node was used). They can be stopped and started again on the same port
//! (a stopped node refuses connections and drops its tunnels, as a killed
//! process would) and switched to misbehave.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use socket2::{Domain, SockAddr, Socket, Type};

use crate::client::Conn;
use crate::targets::{Acceptor, listen};

/// What a test node does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    /// Work as a proxy.
    Normal,
    /// HTTP node: answer the CONNECT with this status (502, 504, 407, …) and
    /// close. SOCKS5 node: answer the request with this reply code.
    Answer(u16),
    /// Read the request and never answer (until stopped, at most 60 s): for
    /// an HTTP node this looks like a slow target.
    Stall,
    /// Accept and never answer the first message (a SOCKS5 node's greeting;
    /// for an HTTP node the same as [`Behavior::Stall`] before reading).
    StallHandshake,
    /// Close the connection right after accepting it, reading nothing.
    CloseImmediately,
    /// Read the request (it is recorded), then close without answering.
    CloseAfterRequest,
}

/// Which protocol a test node speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// HTTP CONNECT proxy.
    Http,
    /// SOCKS5 proxy (CONNECT only).
    Socks5,
}

struct NodeState {
    kind: NodeKind,
    ip: Ipv4Addr,
    behavior: Mutex<Behavior>,
    creds: Option<(String, String)>,
    /// Target authority (`host:port`) of every request read.
    requests: Mutex<Vec<String>>,
    accepted: AtomicUsize,
    stopped: AtomicBool,
}

/// A test node.
pub struct TestNode {
    state: Arc<NodeState>,
    port: u16,
    acceptor: Option<Acceptor>,
}

impl std::fmt::Debug for TestNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNode")
            .field("kind", &self.state.kind)
            .field("addr", &self.addr())
            .finish()
    }
}

impl TestNode {
    /// An HTTP CONNECT node on `ip` (port from the kernel), started.
    pub fn http(ip: Ipv4Addr) -> TestNode {
        TestNode::new(NodeKind::Http, ip, None)
    }

    /// A SOCKS5 node on `ip`, started.
    pub fn socks5(ip: Ipv4Addr) -> TestNode {
        TestNode::new(NodeKind::Socks5, ip, None)
    }

    /// A node that requires these credentials (HTTP Basic / RFC 1929).
    pub fn with_creds(kind: NodeKind, ip: Ipv4Addr, user: &str, pass: &str) -> TestNode {
        TestNode::new(kind, ip, Some((user.into(), pass.into())))
    }

    fn new(kind: NodeKind, ip: Ipv4Addr, creds: Option<(String, String)>) -> TestNode {
        let state = Arc::new(NodeState {
            kind,
            ip,
            behavior: Mutex::new(Behavior::Normal),
            creds,
            requests: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
        });
        let mut n = TestNode {
            state,
            port: 0,
            acceptor: None,
        };
        n.start();
        n
    }

    /// Start listening (again, on the same port).
    pub fn start(&mut self) {
        if self.acceptor.is_some() {
            return;
        }
        self.state.stopped.store(false, Ordering::SeqCst);
        let listener = listen(IpAddr::V4(self.state.ip), self.port);
        self.port = listener.local_addr().expect("local_addr").port();
        let st = self.state.clone();
        self.acceptor = Some(Acceptor::spawn(
            listener,
            Arc::new(move |s| {
                st.accepted.fetch_add(1, Ordering::Relaxed);
                let _ = handle(s, &st);
            }),
        ));
    }

    /// Stop: the port refuses connections and every open connection is
    /// closed.
    pub fn stop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        if let Some(mut a) = self.acceptor.take() {
            a.shutdown();
        }
    }

    /// Change behaviour (takes effect for the next connection).
    pub fn set(&self, b: Behavior) {
        *self.state.behavior.lock().unwrap() = b;
    }

    /// The node's address (`127.0.1.x:port`).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.state.ip), self.port)
    }

    /// The node's IP, which targets see as the exit.
    pub fn ip(&self) -> Ipv4Addr {
        self.state.ip
    }

    /// Target authorities of the requests read so far.
    pub fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }

    /// How many requests were for a target on `port` (health probes of the
    /// gateway go elsewhere and are not counted).
    pub fn requests_to_port(&self, port: u16) -> usize {
        let suffix = format!(":{port}");
        self.requests()
            .iter()
            .filter(|t| t.ends_with(&suffix))
            .count()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.stop();
    }
}

fn handle(s: TcpStream, st: &NodeState) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    let behavior = *st.behavior.lock().unwrap();
    if behavior == Behavior::CloseImmediately {
        let _ = s.shutdown(Shutdown::Both);
        return Ok(());
    }
    let mut c = Conn::new(s);
    if behavior == Behavior::StallHandshake {
        stall(st, &c);
        return Ok(());
    }
    match st.kind {
        NodeKind::Http => http_node(&mut c, st, behavior),
        NodeKind::Socks5 => socks_node(&mut c, st, behavior),
    }
}

/// What `Stall` and `CloseAfterRequest` do once the request is read (the
/// same for both kinds of node); whether the connection is done with.
fn after_request(behavior: Behavior, st: &NodeState, c: &mut Conn) -> bool {
    match behavior {
        Behavior::Stall => stall(st, c),
        Behavior::CloseAfterRequest => {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        _ => return false,
    }
    true
}

fn stall(st: &NodeState, c: &Conn) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && !st.stopped.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.stream.shutdown(Shutdown::Both);
}

fn http_node(c: &mut Conn, st: &NodeState, behavior: Behavior) -> io::Result<()> {
    let Some(head) = c.read_until(b"\r\n\r\n", 65536)? else {
        return Ok(());
    };
    let head = String::from_utf8_lossy(&head).to_string();
    let mut lines = head.split("\r\n");
    let reqline = lines.next().unwrap_or("");
    let mut parts = reqline.split(' ');
    let method = parts.next().unwrap_or("");
    let authority = parts.next().unwrap_or("").to_string();
    st.requests.lock().unwrap().push(authority.clone());
    let answer = |c: &mut Conn, status: u16, reason: &str| -> io::Result<()> {
        let extra = if status == 407 {
            "Proxy-Authenticate: Basic realm=\"node\"\r\n"
        } else {
            ""
        };
        c.send(
            format!("HTTP/1.1 {status} {reason}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )?;
        let _ = c.stream.shutdown(Shutdown::Both);
        Ok(())
    };
    if let Behavior::Answer(code) = behavior {
        return answer(c, code, "Test Node Says So");
    }
    if after_request(behavior, st, c) {
        return Ok(());
    }
    if let Some((u, p)) = &st.creds {
        let want = format!(
            "basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        );
        let ok = lines.any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("proxy-authorization")
                    && v.trim().eq_ignore_ascii_case(&want)
            })
        });
        if !ok {
            return answer(c, 407, "Proxy Authentication Required");
        }
    }
    if !method.eq_ignore_ascii_case("CONNECT") {
        return answer(c, 405, "Only CONNECT");
    }
    let Some(upstream) = dial(st.ip, &authority) else {
        return answer(c, 502, "Bad Gateway");
    };
    c.send(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    let early = c.buffered().to_vec();
    relay(c.stream.try_clone()?, upstream, &early);
    Ok(())
}

fn socks_node(c: &mut Conn, st: &NodeState, behavior: Behavior) -> io::Result<()> {
    let greet = c.read_n(2)?;
    if greet[0] != 5 {
        return Ok(());
    }
    let methods = c.read_n(greet[1] as usize)?;
    let want = if st.creds.is_some() { 2u8 } else { 0u8 };
    if !methods.contains(&want) {
        c.send(&[5, 0xFF])?;
        return Ok(());
    }
    c.send(&[5, want])?;
    if let Some((u, p)) = &st.creds {
        let v = c.read_n(2)?;
        let user = c.read_n(v[1] as usize)?;
        let pl = c.read_n(1)?;
        let pass = c.read_n(pl[0] as usize)?;
        if v[0] != 1 || user != u.as_bytes() || pass != p.as_bytes() {
            c.send(&[1, 1])?;
            return Ok(());
        }
        c.send(&[1, 0])?;
    }
    let req = c.read_n(4)?;
    let (host, port) = match req[3] {
        1 => {
            let a = c.read_n(4)?;
            (Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string(), 0)
        }
        4 => {
            let a = c.read_n(16)?;
            let mut o = [0u8; 16];
            o.copy_from_slice(&a);
            (format!("[{}]", Ipv6Addr::from(o)), 0)
        }
        3 => {
            let l = c.read_n(1)?;
            let d = c.read_n(l[0] as usize)?;
            (String::from_utf8_lossy(&d).to_string(), 0)
        }
        _ => {
            c.send(&[5, 8, 0, 1, 0, 0, 0, 0, 0, 0])?;
            return Ok(());
        }
    };
    let _ = port;
    let p = c.read_n(2)?;
    let port = u16::from_be_bytes([p[0], p[1]]);
    let authority = format!("{host}:{port}");
    st.requests.lock().unwrap().push(authority.clone());
    let reply =
        |c: &mut Conn, code: u8| -> io::Result<()> { c.send(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0]) };
    if let Behavior::Answer(code) = behavior {
        reply(c, code as u8)?;
        let _ = c.stream.shutdown(Shutdown::Both);
        return Ok(());
    }
    if after_request(behavior, st, c) {
        return Ok(());
    }
    if req[1] != 1 {
        return reply(c, 7);
    }
    let Some(upstream) = dial(st.ip, &authority) else {
        return reply(c, 5);
    };
    reply(c, 0)?;
    let early = c.buffered().to_vec();
    relay(c.stream.try_clone()?, upstream, &early);
    Ok(())
}

/// Connect to `authority` (`host:port`, `[v6]:port`), from `src` when the
/// families match. A test node stays on the machine: it dials loopback
/// addresses only (a literal, or `localhost`) and resolves no other name;
/// anything else is answered as unreachable.
fn dial(src: Ipv4Addr, authority: &str) -> Option<TcpStream> {
    let addrs: Vec<SocketAddr> = match authority.parse::<SocketAddr>() {
        Ok(a) => vec![a],
        Err(_) if authority.starts_with("localhost:") => {
            authority.to_socket_addrs().ok()?.collect()
        }
        Err(_) => return None,
    };
    let local = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    };
    for a in addrs.into_iter().filter(|a| local(a.ip())) {
        let Ok(sock) = Socket::new(Domain::for_address(a), Type::STREAM, None) else {
            continue;
        };
        if a.is_ipv4()
            && sock
                .bind(&SockAddr::from(SocketAddr::new(IpAddr::V4(src), 0)))
                .is_err()
        {
            continue;
        }
        if sock
            .connect_timeout(&SockAddr::from(a), Duration::from_secs(3))
            .is_ok()
        {
            let s: TcpStream = sock.into();
            let _ = s.set_nodelay(true);
            return Some(s);
        }
    }
    None
}

/// Copy both ways until both sides are done; `early` is what the client sent
/// after its request, already read.
pub fn relay(client: TcpStream, upstream: TcpStream, early: &[u8]) {
    let _ = client.set_read_timeout(None);
    let _ = upstream.set_read_timeout(None);
    let mut up_w = match upstream.try_clone() {
        Ok(u) => u,
        Err(_) => return,
    };
    if !early.is_empty() && up_w.write_all(early).is_err() {
        return;
    }
    let mut client_r = match client.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    };
    let t = std::thread::Builder::new()
        .stack_size(crate::targets::CONN_STACK)
        .spawn(move || {
            copy(&mut client_r, &mut up_w);
            let _ = up_w.shutdown(Shutdown::Write);
        });
    let mut up_r = upstream;
    let mut client_w = client;
    copy(&mut up_r, &mut client_w);
    let _ = client_w.shutdown(Shutdown::Write);
    if let Ok(t) = t {
        let _ = t.join();
    }
    let _ = up_r.shutdown(Shutdown::Both);
    let _ = client_w.shutdown(Shutdown::Both);
}

fn copy(r: &mut TcpStream, w: &mut TcpStream) {
    let mut buf = vec![0u8; 32768];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if w.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}
