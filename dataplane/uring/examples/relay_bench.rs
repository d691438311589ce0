//! Relays N MiB from a client to a sink through the runtime, in one process,
//! and prints the throughput and the relay thread's CPU time.
//!
//! ```text
//! cargo run --release -p splicegate-uring --example relay_bench -- [MiB] [splice|copy] [buf KiB]
//! ```
//!
//! The client and the sink are plain blocking threads; the relay runs on the
//! main thread's runtime: client → a ==relay== b → sink.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use splicegate_uring::{
    PipePool, RelayCtl, Runtime, RuntimeConfig, TcpListener, copy_relay, relay,
};

/// User + system CPU time of the calling thread, from /proc (clock ticks of 10 ms).
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // Fields after the ")" closing the command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().and_then(|v| v.parse().ok()).unwrap_or(4096);
    let mode = args.next().unwrap_or_else(|| "splice".into());
    let buf_kib: usize = args.next().and_then(|v| v.parse().ok()).unwrap_or(64);
    let total = mib << 20;

    let rt = Runtime::new(RuntimeConfig::default())?;
    let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    let front = TcpListener::bind(any, 16)?;
    let back = TcpListener::bind(any, 16)?;
    let (front_addr, back_addr) = (front.local_addr()?, back.local_addr()?);

    let sink = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut s = std::net::TcpStream::connect(back_addr)?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(got),
                n => got += n as u64,
            }
        }
    });
    let client = std::thread::spawn(move || -> std::io::Result<()> {
        let mut c = std::net::TcpStream::connect(front_addr)?;
        let buf = vec![0x5au8; 256 * 1024];
        let mut sent = 0u64;
        while sent < total {
            let n = (total - sent).min(buf.len() as u64) as usize;
            c.write_all(&buf[..n])?;
            sent += n as u64;
        }
        c.shutdown(std::net::Shutdown::Write)?;
        // Wait for the relay's FIN so the socket is not reset early.
        let mut rest = [0u8; 16];
        while c.read(&mut rest)? > 0 {}
        Ok(())
    });

    let (outcome, elapsed, cpu) = rt.block_on(async {
        let (a, _) = front.accept().await?;
        let (b, _) = back.accept().await?;
        let pipes = PipePool::new(16);
        let ctl = RelayCtl::new();
        let (start, cpu0) = (Instant::now(), thread_cpu());
        let outcome = match mode.as_str() {
            "copy" => copy_relay(&a, &b, buf_kib * 1024, &ctl).await,
            _ => relay(&a, &b, &pipes, &ctl).await,
        };
        std::io::Result::Ok((outcome, start.elapsed(), thread_cpu() - cpu0))
    })??;
    let received = sink.join().expect("sink thread")?;
    client.join().expect("client thread")?;

    assert_eq!(received, total, "sink got {received} of {total} bytes");
    let secs = elapsed.as_secs_f64();
    let gib = total as f64 / (1u64 << 30) as f64;
    println!(
        "{mode}: {mib} MiB in {secs:.3} s = {:.2} Gbit/s; relay thread CPU {:.2} s = {:.2} CPU-s/GiB; end {:?}, a->b {} b->a {}",
        total as f64 * 8.0 / secs / 1e9,
        cpu.as_secs_f64(),
        cpu.as_secs_f64() / gib,
        outcome.end,
        outcome.a_to_b,
        outcome.b_to_a,
    );
    Ok(())
}
