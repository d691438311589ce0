//! Targets the gateway's nodes reach: an HTTP server that answers with the
//! peer address it sees (and echoes heads and bodies), a raw TCP echo, a
//! byte source and sink, and a blackhole whose connects never complete.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::client::Conn;

/// Stack size of per-connection threads (they hold little).
pub const CONN_STACK: usize = 128 * 1024;
/// How long a server thread waits for a silent peer.
const SERVER_READ_TIMEOUT: Duration = Duration::from_secs(60);

type Handler = Arc<dyn Fn(TcpStream) + Send + Sync>;

/// An accept loop on its own thread, one thread per connection. Dropping or
/// [`Acceptor::shutdown`] closes the listener and every accepted socket.
#[derive(Debug)]
pub struct Acceptor {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    live: Arc<Mutex<HashMap<u64, TcpStream>>>,
}

impl Acceptor {
    /// Run `handler` for every connection `listener` accepts.
    pub fn spawn(listener: TcpListener, handler: Handler) -> Acceptor {
        let addr = listener.local_addr().expect("local_addr");
        let stop = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<HashMap<u64, TcpStream>>> = Arc::new(Mutex::new(HashMap::new()));
        let (stop2, live2) = (stop.clone(), live.clone());
        let handle = std::thread::Builder::new()
            .name(format!("accept-{addr}"))
            .spawn(move || {
                let mut seq: u64 = 0;
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(s) = conn else { continue };
                    seq += 1;
                    let id = seq;
                    if let Ok(c) = s.try_clone() {
                        live2.lock().unwrap().insert(id, c);
                    }
                    let h = handler.clone();
                    let live3 = live2.clone();
                    let spawned =
                        std::thread::Builder::new()
                            .stack_size(CONN_STACK)
                            .spawn(move || {
                                h(s);
                                // Dropping the clone closes the socket for good.
                                live3.lock().unwrap().remove(&id);
                            });
                    if spawned.is_err() {
                        // Out of threads: the connection is closed.
                        live2.lock().unwrap().remove(&id);
                    }
                }
            })
            .expect("spawn acceptor");
        Acceptor {
            addr,
            stop,
            handle: Some(handle),
            live,
        }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Close the listener (new connects are refused) and every accepted
    /// connection, as a process that exits would.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            // Wake the blocking accept.
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
            let _ = h.join();
        }
        for (_, s) in self.live.lock().unwrap().drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Bind a listener on `ip:port` (port 0: any).
pub fn listen(ip: IpAddr, port: u16) -> TcpListener {
    TcpListener::bind((ip, port)).unwrap_or_else(|e| panic!("bind {ip}:{port}: {e}"))
}

fn localhost() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

/// A server on `ip` (port from the kernel) with state `S` that `handle`
/// gets with every connection: its acceptor and the state.
fn serve<S: Default + Send + Sync + 'static>(
    ip: IpAddr,
    handle: impl Fn(TcpStream, &S) + Send + Sync + 'static,
) -> (Acceptor, Arc<S>) {
    let state = Arc::new(S::default());
    let st = state.clone();
    (
        Acceptor::spawn(listen(ip, 0), Arc::new(move |s| handle(s, &st))),
        state,
    )
}

/// One request as the HTTP target read it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Peer address of the connection it came on.
    pub peer: SocketAddr,
    /// The head as received.
    pub head: String,
    /// The decoded body.
    pub body: Vec<u8>,
    /// Whether the body came chunked.
    pub chunked: bool,
}

#[derive(Debug, Default)]
struct HttpState {
    requests: Mutex<Vec<SeenRequest>>,
    connections: AtomicUsize,
}

/// An HTTP/1.1 server with keep-alive. By path:
/// - `/head`: the body is the request head as received;
/// - `/echo`: the body is the request body (chunked if the request was);
/// - `/chunked`: a chunked body `hello, chunked world\n` in three chunks;
/// - `/bytes/N`: N bytes of `abcd…`;
/// - `/close`: the peer address, no `Content-Length`, then close;
/// - anything else: the peer IP and `\n` (the exit address it sees).
///
/// `HEAD` gets the `GET` headers without a body.
#[derive(Debug)]
pub struct HttpTarget {
    acceptor: Acceptor,
    state: Arc<HttpState>,
}

impl HttpTarget {
    /// On `127.0.0.1`, port from the kernel.
    pub fn start() -> HttpTarget {
        HttpTarget::start_on(localhost())
    }

    /// On `ip`, port from the kernel.
    pub fn start_on(ip: IpAddr) -> HttpTarget {
        let (acceptor, state) = serve(ip, move |s: TcpStream, st: &HttpState| {
            st.connections.fetch_add(1, Ordering::Relaxed);
            let _ = serve_http(s, st);
        });
        HttpTarget { acceptor, state }
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.acceptor.addr()
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    /// The peer IPs of every request so far.
    pub fn peers(&self) -> Vec<IpAddr> {
        self.requests().iter().map(|r| r.peer.ip()).collect()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::Relaxed)
    }
}

fn serve_http(s: TcpStream, st: &HttpState) -> io::Result<()> {
    s.set_read_timeout(Some(SERVER_READ_TIMEOUT))?;
    let peer = s.peer_addr()?;
    let mut c = Conn::new(s);
    for _ in 0..10_000 {
        let Some(head) = c.read_until(b"\r\n\r\n", 1 << 20)? else {
            return Ok(());
        };
        let head = String::from_utf8_lossy(&head).to_string();
        let mut lines = head.split("\r\n");
        let reqline = lines.next().unwrap_or("").to_string();
        let mut parts = reqline.split(' ');
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("/").to_string();
        let version = parts.next().unwrap_or("").to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let h = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let chunked =
            h("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let body = if chunked {
            c.read_chunked()?
        } else if let Some(cl) = h("content-length") {
            c.read_n(cl.trim().parse().unwrap_or(0))?
        } else {
            Vec::new()
        };
        st.requests.lock().unwrap().push(SeenRequest {
            peer,
            head: head.clone(),
            body: body.clone(),
            chunked,
        });
        let close = h("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
            || version == "HTTP/1.0";
        let path = target
            .split("://")
            .nth(1)
            .map(|r| {
                r.find('/')
                    .map(|i| r[i..].to_string())
                    .unwrap_or("/".into())
            })
            .unwrap_or(target.clone());
        let is_head = method == "HEAD";
        let conn_hdr = if close { "close" } else { "keep-alive" };
        let mut out: Vec<u8> = Vec::new();
        if path == "/chunked" {
            out.extend_from_slice(
                format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\nConnection: {conn_hdr}\r\n\r\n").as_bytes(),
            );
            if !is_head {
                out.extend_from_slice(
                    b"7\r\nhello, \r\n8\r\nchunked \r\n6\r\nworld\n\r\n0\r\nX-Trailer: t\r\n\r\n",
                );
            }
        } else if path == "/echo" && chunked {
            out.extend_from_slice(
                format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: {conn_hdr}\r\n\r\n").as_bytes(),
            );
            for piece in body.chunks(1000) {
                out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                out.extend_from_slice(piece);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
        } else if path == "/then-close" {
            // Says keep-alive, then closes: an origin whose keep-alive
            // timeout ends just after its answer.
            let ip = format!("{}\n", peer.ip());
            out.extend_from_slice(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n{ip}",
                    ip.len()
                )
                .as_bytes(),
            );
            c.send(&out)?;
            let _ = c.stream.shutdown(Shutdown::Both);
            return Ok(());
        } else if path == "/close" {
            out.extend_from_slice(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
            if !is_head {
                out.extend_from_slice(format!("{}\n", peer.ip()).as_bytes());
            }
            c.send(&out)?;
            let _ = c.stream.shutdown(Shutdown::Both);
            return Ok(());
        } else {
            let payload: Vec<u8> = if path == "/head" {
                head.clone().into_bytes()
            } else if path == "/echo" {
                body.clone()
            } else if let Some(n) = path.strip_prefix("/bytes/") {
                let n: usize = n.parse().unwrap_or(0);
                (0..n).map(|i| b'a' + (i % 26) as u8).collect()
            } else {
                format!("{}\n", peer.ip()).into_bytes()
            };
            out.extend_from_slice(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {conn_hdr}\r\n\r\n",
                    payload.len()
                )
                .as_bytes(),
            );
            if !is_head {
                out.extend_from_slice(&payload);
            }
        }
        c.send(&out)?;
        if close {
            let _ = c.stream.shutdown(Shutdown::Write);
            return Ok(());
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
struct CountState {
    peers: Mutex<Vec<IpAddr>>,
    bytes: AtomicU64,
}

/// A raw TCP echo server; remembers the peer address of each connection.
#[derive(Debug)]
pub struct TcpEcho {
    acceptor: Acceptor,
    state: Arc<CountState>,
}

impl TcpEcho {
    /// On `127.0.0.1`.
    pub fn start() -> TcpEcho {
        TcpEcho::start_on(localhost())
    }

    /// On `ip` (e.g. `::1`).
    pub fn start_on(ip: IpAddr) -> TcpEcho {
        let (acceptor, state) = serve(ip, move |mut s: TcpStream, st: &CountState| {
            if let Ok(p) = s.peer_addr() {
                st.peers.lock().unwrap().push(p.ip());
            }
            let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
            let mut buf = vec![0u8; 16384];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        st.bytes.fetch_add(n as u64, Ordering::Relaxed);
                        if s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = s.shutdown(Shutdown::Write);
        });
        TcpEcho { acceptor, state }
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.acceptor.addr()
    }

    /// Peer IPs of the connections so far.
    pub fn peers(&self) -> Vec<IpAddr> {
        self.state.peers.lock().unwrap().clone()
    }
}

/// A target that sends `chunk` bytes every `every` until the peer goes away
/// (or `total` bytes, if set), then closes.
#[derive(Debug)]
pub struct Source {
    acceptor: Acceptor,
    state: Arc<CountState>,
}

impl Source {
    /// Start; `total` of `None` streams until the peer closes (at most 10 min).
    pub fn start(chunk: usize, every: Duration, total: Option<u64>) -> Source {
        let (acceptor, state) = serve(localhost(), move |mut s: TcpStream, st: &CountState| {
            let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
            let data: Vec<u8> = (0..chunk).map(|i| (i % 251) as u8).collect();
            let mut sent: u64 = 0;
            let deadline = std::time::Instant::now() + Duration::from_secs(600);
            while std::time::Instant::now() < deadline {
                let n = match total {
                    Some(t) if sent >= t => break,
                    Some(t) => (t - sent).min(chunk as u64) as usize,
                    None => chunk,
                };
                if s.write_all(&data[..n]).is_err() {
                    break;
                }
                sent += n as u64;
                st.bytes.fetch_add(n as u64, Ordering::Relaxed);
                if !every.is_zero() {
                    std::thread::sleep(every);
                }
            }
            let _ = s.shutdown(Shutdown::Both);
        });
        Source { acceptor, state }
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.acceptor.addr()
    }

    /// Bytes written so far, all connections.
    pub fn sent(&self) -> u64 {
        self.state.bytes.load(Ordering::Relaxed)
    }
}

/// A target that reads and counts everything, and answers nothing.
#[derive(Debug)]
pub struct Sink {
    acceptor: Acceptor,
    state: Arc<CountState>,
}

impl Sink {
    /// Start on `127.0.0.1`.
    pub fn start() -> Sink {
        let (acceptor, state) = serve(localhost(), move |mut s: TcpStream, st: &CountState| {
            let _ = s.set_read_timeout(Some(SERVER_READ_TIMEOUT));
            let mut buf = vec![0u8; 65536];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        st.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
        });
        Sink { acceptor, state }
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.acceptor.addr()
    }

    /// Bytes received so far, all connections.
    pub fn received(&self) -> u64 {
        self.state.bytes.load(Ordering::Relaxed)
    }
}

/// A listener with a backlog of 0 that never accepts, its queue filled, so
/// that further connects get no answer (the SYN is dropped): a target that
/// "does not answer".
#[derive(Debug)]
pub struct Blackhole {
    _listener: Socket,
    _fillers: Vec<TcpStream>,
    addr: SocketAddr,
}

impl Blackhole {
    /// Start on `127.0.0.1`; checks that a further connect indeed hangs.
    pub fn start() -> Blackhole {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        sock.bind(&SockAddr::from(SocketAddr::new(localhost(), 0)))
            .expect("bind");
        sock.listen(0).expect("listen");
        let addr = sock
            .local_addr()
            .expect("local_addr")
            .as_socket()
            .expect("inet");
        let mut fillers = Vec::new();
        for _ in 0..8 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => fillers.push(s),
                Err(_) => {
                    return Blackhole {
                        _listener: sock,
                        _fillers: fillers,
                        addr,
                    };
                }
            }
        }
        panic!("Blackhole: connects to a full backlog still complete on this kernel");
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A port that refuses connections (RST): a socket bound on `127.0.0.1:0`
/// that never listens, holding the port so that nothing else takes it
/// while the test runs.
#[derive(Debug)]
pub struct ClosedPort {
    _sock: Socket,
    addr: SocketAddr,
}

impl ClosedPort {
    /// Bind one.
    pub fn new() -> ClosedPort {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        sock.bind(&SockAddr::from(SocketAddr::new(localhost(), 0)))
            .expect("bind");
        let addr = sock
            .local_addr()
            .expect("local_addr")
            .as_socket()
            .expect("inet");
        ClosedPort { _sock: sock, addr }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        ClosedPort::new()
    }
}
