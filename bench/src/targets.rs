//! The servers the load modes aim at, all in this process on 127.0.0.1:
//! a sink that counts what it receives, a source that sends until the peer
//! goes, an echo, a close-after-echo for connection churn, and an HTTP/1.1
//! origin with keep-alive. They run on the load generator's CPUs, so their
//! cost never lands on the proxy under test.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

/// Bytes a churn client sends and gets back before the server closes.
pub(crate) const CHURN_BYTES: usize = 100;
/// Stack of a per-connection server thread: the handlers need a buffer on
/// the heap and little else, and the idle mode holds thousands of them.
const STACK: usize = 128 * 1024;
/// Threads blocked in `accept` for the churn and origin servers. A thread
/// serves one connection to its end, then accepts the next, so no thread is
/// spawned per connection on the hot path of `connrate` or rotating `http`.
const POOL: usize = 192;
/// Bulk buffer size for sink and source.
const BULK_BUF: usize = 256 * 1024;

/// Where each target listens, and the byte counters of sink and source.
#[derive(Debug, Clone)]
pub(crate) struct Targets {
    pub sink: SocketAddr,
    pub source: SocketAddr,
    pub echo: SocketAddr,
    pub churn: SocketAddr,
    pub origin: SocketAddr,
    /// Bytes the sink has received, over all connections, ever.
    pub sink_bytes: Arc<AtomicU64>,
    /// Bytes the source has written, over all connections, ever.
    pub source_bytes: Arc<AtomicU64>,
}

impl Targets {
    /// Bind every target on 127.0.0.1 (ephemeral ports) and serve them on
    /// background threads for the life of the process.
    pub(crate) fn start(body_bytes: usize) -> Result<Targets> {
        let sink_bytes = Arc::new(AtomicU64::new(0));
        let source_bytes = Arc::new(AtomicU64::new(0));
        let sink = {
            let counter = sink_bytes.clone();
            per_connection("sink", move |s| sink(s, &counter))?
        };
        let source = {
            let counter = source_bytes.clone();
            per_connection("source", move |s| source(s, &counter))?
        };
        let echo = per_connection("echo", echo)?;
        let churn = pool("churn", churn)?;
        let response = Arc::new(origin_response(body_bytes));
        let origin = pool("origin", move |s| origin(s, &response))?;
        Ok(Targets {
            sink,
            source,
            echo,
            churn,
            origin,
            sink_bytes,
            source_bytes,
        })
    }

    /// Every target with its name (for L4 relays: one frontend each).
    pub(crate) fn all(&self) -> [(&'static str, SocketAddr); 5] {
        [
            ("sink", self.sink),
            ("source", self.source),
            ("echo", self.echo),
            ("churn", self.churn),
            ("origin", self.origin),
        ]
    }
}

/// A listener on 127.0.0.1 with a deep backlog (std's is 128, too short for
/// connection-churn bursts).
pub(crate) fn listener(port: u16) -> Result<TcpListener> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// One thread per connection (sink, source, echo: long-lived connections).
fn per_connection<F>(name: &'static str, handler: F) -> Result<SocketAddr>
where
    F: Fn(TcpStream) + Send + Sync + Clone + 'static,
{
    let l = listener(0)?;
    let addr = l.local_addr()?;
    std::thread::Builder::new()
        .name(format!("{name}-accept"))
        .spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else {
                    // EMFILE and friends: back off instead of spinning.
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let h = handler.clone();
                // A failed spawn drops (closes) the connection: the client
                // sees an error, the server stays up.
                let _ = std::thread::Builder::new()
                    .name(name.into())
                    .stack_size(STACK)
                    .spawn(move || h(s));
            }
        })
        .with_context(|| format!("starting the {name} target"))?;
    Ok(addr)
}

/// A fixed pool of threads, each accepting and serving one connection at a
/// time (churn and origin: many short connections).
fn pool<F>(name: &'static str, handler: F) -> Result<SocketAddr>
where
    F: Fn(TcpStream) + Send + Sync + 'static,
{
    let l = Arc::new(listener(0)?);
    let addr = l.local_addr()?;
    let handler = Arc::new(handler);
    for _ in 0..POOL {
        let (l, h) = (l.clone(), handler.clone());
        std::thread::Builder::new()
            .name(name.into())
            .stack_size(STACK)
            .spawn(move || {
                loop {
                    match l.accept() {
                        Ok((s, _)) => h(s),
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
            .with_context(|| format!("starting the {name} target"))?;
    }
    Ok(addr)
}

fn sink(mut s: TcpStream, counter: &AtomicU64) {
    let mut buf = vec![0u8; BULK_BUF];
    while let Ok(n @ 1..) = s.read(&mut buf) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

fn source(mut s: TcpStream, counter: &AtomicU64) {
    let buf = vec![0xa5u8; BULK_BUF];
    while let Ok(n @ 1..) = s.write(&buf) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

fn echo(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n @ 1..) = s.read(&mut buf) {
        if s.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// Read `CHURN_BYTES`, send them back, close: the server closes first, so
/// the TIME_WAIT state stays on this side and client ports are not used up.
fn churn(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = [0u8; CHURN_BYTES];
    if s.read_exact(&mut buf).is_ok() {
        let _ = s.write_all(&buf);
    }
}

fn origin_response(body_bytes: usize) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {body_bytes}\r\n\r\n"
    )
    .into_bytes();
    r.resize(r.len() + body_bytes, b'x');
    r
}

/// HTTP/1.1 with keep-alive: every request (origin-form or absolute-form,
/// no body) gets the same response; `Connection: close` ends it.
fn origin(mut s: TcpStream, response: &[u8]) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(600)));
    let mut buf = Vec::with_capacity(4096);
    loop {
        let head_len = match read_head(&mut s, &mut buf) {
            Ok(n) => n,
            Err(_) => return,
        };
        let close = header_says_close(&buf[..head_len]);
        buf.drain(..head_len);
        if s.write_all(response).is_err() || close {
            return;
        }
    }
}

/// Read until `buf` holds a whole head (ending in an empty line); returns its
/// length. Bytes past the head stay in `buf`.
pub(crate) fn read_head<R: Read>(s: &mut R, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut scanned = 0usize;
    loop {
        if let Some(i) = find(&buf[scanned.saturating_sub(3)..], b"\r\n\r\n") {
            return Ok(scanned.saturating_sub(3) + i + 4);
        }
        scanned = buf.len();
        if buf.len() > 64 * 1024 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too long"));
        }
        let old = buf.len();
        buf.resize(old + 4096, 0);
        match s.read(&mut buf[old..]) {
            Ok(0) => {
                buf.truncate(old);
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            Ok(n) => buf.truncate(old + n),
            Err(e) => {
                buf.truncate(old);
                return Err(e);
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether a head carries `Connection: close` (or is HTTP/1.0 without
/// keep-alive).
pub(crate) fn header_says_close(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    let http10 = text.lines().next().is_some_and(|l| l.contains("http/1.0"));
    let mut close = http10;
    for line in text.lines().skip(1) {
        if let Some(v) = line
            .strip_prefix("connection:")
            .or_else(|| line.strip_prefix("proxy-connection:"))
        {
            if v.contains("close") {
                close = true;
            } else if v.contains("keep-alive") {
                close = false;
            }
        }
    }
    close
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_header_decides_keep_alive() {
        assert!(!header_says_close(b"HTTP/1.1 200 OK\r\n\r\n"));
        assert!(header_says_close(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
        ));
        assert!(header_says_close(b"HTTP/1.0 200 OK\r\n\r\n"));
        assert!(!header_says_close(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n"
        ));
    }

    #[test]
    fn targets_answer() {
        let t = Targets::start(10).unwrap();
        let mut s = TcpStream::connect(t.churn).unwrap();
        s.write_all(&[7u8; CHURN_BYTES]).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        assert_eq!(back, vec![7u8; CHURN_BYTES]);

        let mut s = TcpStream::connect(t.origin).unwrap();
        for _ in 0..2 {
            s.write_all(b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut buf = Vec::new();
            let n = read_head(&mut s, &mut buf).unwrap();
            assert!(buf.starts_with(b"HTTP/1.1 200"));
            while buf.len() < n + 10 {
                let mut b = [0u8; 64];
                let k = s.read(&mut b).unwrap();
                buf.extend_from_slice(&b[..k]);
            }
            assert_eq!(&buf[n..], b"xxxxxxxxxx");
        }
    }
}
