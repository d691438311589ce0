//! One worker runtime, two relays: one moves bulk flat out, the other
//! carries a ping-pong. Prints the ping-pong's round-trip times (how long a
//! small message waits behind the bulk tunnel) and the bulk throughput.
//!
//! ```text
//! cargo run --release -p splicegate-uring --example fairness -- [round trips]
//! ```
//!
//! The peers are blocking threads: a writer and a reader for the bulk tunnel
//! (client → a ==relay== b → sink), a client timing 1-byte round trips and
//! an echo server for the other. Bounded: the round trips (default 2,000)
//! or 30 s, whichever comes first; the bulk writer stops with them.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use splicegate_uring::{PipePool, RelayCtl, Runtime, RuntimeConfig, TcpListener, relay, spawn};

fn main() -> std::io::Result<()> {
    let round_trips: usize = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let rt = Runtime::new(RuntimeConfig::default())?;
    let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    let listeners: Vec<TcpListener> = (0..4)
        .map(|_| TcpListener::bind(any, 16))
        .collect::<Result<_, _>>()?;
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<Result<_, _>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let bulk_bytes = Arc::new(AtomicU64::new(0));

    // Bulk peers.
    let (writer_stop, bulk_front) = (stop.clone(), addrs[0]);
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut c = std::net::TcpStream::connect(bulk_front)?;
        let buf = vec![0x5au8; 256 * 1024];
        let mut sent = 0u64;
        while !writer_stop.load(Ordering::Relaxed) && sent < (64u64 << 30) {
            c.write_all(&buf)?;
            sent += buf.len() as u64;
        }
        c.shutdown(std::net::Shutdown::Write)
    });
    let (reader_bytes, bulk_back) = (bulk_bytes.clone(), addrs[1]);
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = std::net::TcpStream::connect(bulk_back)?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(()),
                n => reader_bytes.fetch_add(n as u64, Ordering::Relaxed),
            };
        }
    });
    // Ping-pong peers.
    let echo_back = addrs[3];
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = std::net::TcpStream::connect(echo_back)?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(()),
                n => s.write_all(&buf[..n])?,
            }
        }
    });
    let (pinger_stop, ping_front) = (stop.clone(), addrs[2]);
    let pinger = std::thread::spawn(move || -> std::io::Result<Vec<Duration>> {
        let mut c = std::net::TcpStream::connect(ping_front)?;
        c.set_nodelay(true)?;
        // Let the bulk tunnel reach full speed first.
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let mut rtts = Vec::with_capacity(round_trips);
        let mut byte = [0u8; 1];
        while rtts.len() < round_trips && started.elapsed() < Duration::from_secs(30) {
            let t = Instant::now();
            c.write_all(b"?")?;
            c.read_exact(&mut byte)?;
            rtts.push(t.elapsed());
        }
        pinger_stop.store(true, Ordering::Relaxed);
        c.shutdown(std::net::Shutdown::Write)?;
        Ok(rtts)
    });

    let bulk_start = Instant::now();
    rt.block_on(async move {
        let mut streams = Vec::new();
        for l in &listeners {
            streams.push(l.accept().await?.0);
        }
        let (bulk_b, bulk_a) = (streams.remove(1), streams.remove(0));
        let (ping_b, ping_a) = (streams.remove(1), streams.remove(0));
        let pipes = std::rc::Rc::new(PipePool::new(16));
        let bulk_pipes = pipes.clone();
        spawn(async move {
            let _ = relay(&bulk_a, &bulk_b, &bulk_pipes, &RelayCtl::new()).await;
        });
        let _ = relay(&ping_a, &ping_b, &pipes, &RelayCtl::new()).await;
        std::io::Result::Ok(())
    })??;
    let mut rtts = pinger.join().expect("pinger")?;
    let bulk_secs = bulk_start.elapsed().as_secs_f64();
    echo.join().expect("echo")?;
    stop.store(true, Ordering::Relaxed);
    drop(rt); // closes the bulk tunnel's sockets
    let _ = writer.join();
    let _ = reader.join();

    rtts.sort();
    let pct = |p: f64| rtts[((rtts.len() as f64 * p) as usize).min(rtts.len() - 1)];
    println!(
        "ping-pong beside a bulk relay: {} round trips, p50 {:?}, p99 {:?}, max {:?}; bulk {:.2} Gbit/s",
        rtts.len(),
        pct(0.50),
        pct(0.99),
        rtts[rtts.len() - 1],
        bulk_bytes.load(Ordering::Relaxed) as f64 * 8.0 / bulk_secs / 1e9,
    );
    Ok(())
}
