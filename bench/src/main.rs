//! splicegate-bench: load generators and targets for measuring the gateway
//! from outside. This first mode is `bulk`: P parallel streams through an
//! HTTP CONNECT proxy (or none), aggregate Gbit/s, and the proxy process's
//! CPU seconds per GiB relayed. Every loop is bounded in bytes and time.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "splicegate-bench",
    about = "Load harness for splicegate and its peers"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Bulk streams: a direct connection and splicegate (direct node) side by
    /// side, round by round, medians reported.
    Bulk {
        /// The splicegate binary to start.
        #[arg(long, default_value = "target/release/splicegate")]
        gateway: String,
        /// Parallel streams per run (repeat for several cells).
        #[arg(long, default_values_t = vec![1usize, 8])]
        streams: Vec<usize>,
        /// MiB sent per run (split across the streams).
        #[arg(long, default_value_t = 4096)]
        mib: u64,
        /// Rounds; the table shows medians.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Gateway workers.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Bulk {
            gateway,
            streams,
            mib,
            rounds,
            workers,
            json,
        } => bulk(&gateway, &streams, mib, rounds, workers, json),
    }
}

/// A sink that counts and drops what it receives, one thread per connection.
fn start_sink() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = vec![0u8; 256 * 1024];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    Ok(addr)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Gateway {
    child: Child,
    addr: SocketAddr,
    dir: std::path::PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_gateway(bin: &str, workers: usize) -> Result<Gateway> {
    let port = free_port()?;
    let dir = std::env::temp_dir().join(format!("splicegate-bench-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("bench.toml");
    std::fs::write(
        &conf,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{port}\"\nworkers = {workers}\n[safety]\nallow_targets = [\"127.0.0.0/8\"]\n\
             [log]\nlevel = \"warn\"\n[[package]]\nid = 1\nkey = \"bench\"\n\
             [[node]]\nid = \"d1\"\nkind = \"direct\"\nbind = \"127.0.1.1\"\ncountry = \"us\"\n"
        ),
    )?;
    let child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&conf)
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| {
            format!("starting {bin} (build it with cargo build --release -p splicegate)")
        })?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("the gateway did not start listening");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Gateway { child, addr, dir })
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat
        .rsplit_once(')')
        .map(|x| x.1)
        .context("malformed stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / 100.0) // USER_HZ is 100 on Linux
}

fn connect_through(proxy: Option<SocketAddr>, target: SocketAddr) -> Result<TcpStream> {
    let Some(proxy) = proxy else {
        return Ok(TcpStream::connect(target)?);
    };
    let mut s = TcpStream::connect(proxy)?;
    let cred = base64::engine::general_purpose::STANDARD.encode("package-1-country-us:bench");
    write!(
        s,
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {cred}\r\n\r\n"
    )?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 || head.len() > 8192 {
            bail!("the proxy closed during CONNECT");
        }
        head.push(b[0]);
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        bail!("CONNECT refused: {}", String::from_utf8_lossy(&head));
    }
    Ok(s)
}

/// Send `total` bytes over `streams` connections; returns (seconds, bytes).
fn run_bulk(
    proxy: Option<SocketAddr>,
    target: SocketAddr,
    streams: usize,
    total: u64,
) -> Result<(f64, u64)> {
    let per = total / streams as u64;
    let conns: Vec<TcpStream> = (0..streams)
        .map(|_| connect_through(proxy, target))
        .collect::<Result<_>>()?;
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            let sent = sent.clone();
            std::thread::spawn(move || {
                let buf = vec![0x5au8; 256 * 1024];
                let mut left = per;
                let deadline = Instant::now() + Duration::from_secs(120);
                while left > 0 && Instant::now() < deadline {
                    let n = (left as usize).min(buf.len());
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    left -= n as u64;
                    sent.fetch_add(n as u64, Ordering::Relaxed);
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
                let mut sink = [0u8; 64];
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = s.read(&mut sink); // wait for the far side to close: all bytes delivered
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Ok((start.elapsed().as_secs_f64(), sent.load(Ordering::Relaxed)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bulk(
    bin: &str,
    streams: &[usize],
    mib: u64,
    rounds: usize,
    workers: usize,
    json: bool,
) -> Result<()> {
    let sink = start_sink()?;
    let gw = start_gateway(bin, workers)?;
    let pid = gw.child.id();
    let total = mib * 1024 * 1024;
    if !json {
        println!(
            "bulk: {mib} MiB per run, {rounds} rounds (medians), gateway workers {workers}, sink and client in this process"
        );
        println!("| streams | path | Gbit/s | gateway CPU-s/GiB |");
        println!("|---:|---|---:|---:|");
    }
    for &p in streams {
        let (mut direct, mut proxied, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            // Alternate within the round so drift hits both alike.
            let (secs, bytes) = run_bulk(None, sink, p, total)?;
            direct.push(bytes as f64 * 8.0 / secs / 1e9);
            let before = cpu_seconds(pid)?;
            let (secs, bytes) = run_bulk(Some(gw.addr), sink, p, total)?;
            let used = cpu_seconds(pid)? - before;
            proxied.push(bytes as f64 * 8.0 / secs / 1e9);
            cpu.push(used / (bytes as f64 / (1u64 << 30) as f64));
        }
        let (d, g, c) = (median(direct), median(proxied), median(cpu));
        if json {
            println!(
                "{}",
                serde_json::json!({"mode": "bulk", "streams": p, "direct_gbps": d, "gateway_gbps": g, "gateway_cpu_s_per_gib": c})
            );
        } else {
            println!("| {p} | direct | {d:.1} | – |");
            println!("| {p} | splicegate (direct node) | {g:.1} | {c:.3} |");
        }
    }
    Ok(())
}
