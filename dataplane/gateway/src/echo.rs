//! The built-in target of the demo: an HTTP/1.1 server that answers every
//! request with the address it sees, so a client can watch its exit change.
//! Small and blocking on purpose (a thread per connection, bounded).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const MAX_CONNECTIONS: usize = 256;

/// Serve on `addr` from a background thread.
pub(crate) fn start(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("splicegate-echo".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                    continue;
                }
                open.fetch_add(1, Ordering::Relaxed);
                let open = open.clone();
                let _ = std::thread::Builder::new()
                    .name("splicegate-echo-conn".into())
                    .spawn(move || {
                        let _ = serve(stream);
                        open.fetch_sub(1, Ordering::Relaxed);
                    });
            }
        })?;
    Ok(local)
}

fn serve(stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let peer = stream.peer_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let http10 = line.trim_end().ends_with("HTTP/1.0");
        let mut close = http10;
        let mut length = 0usize;
        let mut head = line.len();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            head += h.len();
            if head > 64 * 1024 {
                return Ok(());
            }
            let t = h.trim_end();
            if t.is_empty() {
                break;
            }
            if let Some((k, v)) = t.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
                if k == "content-length" {
                    length = v.parse().unwrap_or(0);
                } else if k == "connection" {
                    close = v.contains("close") || (http10 && !v.contains("keep-alive"));
                }
            }
        }
        std::io::copy(&mut (&mut reader).take(length as u64), &mut std::io::sink())?;
        let body = format!("{}\n", peer.ip());
        write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{}",
            body.len(),
            if close { "close" } else { "keep-alive" },
            body
        )?;
        if close {
            return Ok(());
        }
    }
}
