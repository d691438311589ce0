//! A bulk source for the end-to-end tests that need a target inside a
//! network namespace (a test thread cannot enter one): listens on `ADDR`
//! (port 0: one from the kernel), prints `listening <address>`, and sends
//! each connection `BYTES` bytes (a repeating pattern), then closes it.
//! Ends after `SECONDS` (bounded), or when stopped by its PID.
//!
//! ```text
//! splicegate-test-source ADDR BYTES SECONDS
//! ```
#![forbid(unsafe_code)]

use std::io::Write;
use std::net::{Shutdown, TcpListener};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: splicegate-test-source ADDR BYTES SECONDS");
        std::process::exit(1);
    }
    let addr = &args[1];
    let bytes: u64 = args[2].parse().expect("BYTES");
    let seconds: u64 = args[3].parse().expect("SECONDS");
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    println!("listening {}", listener.local_addr().expect("local_addr"));
    let _ = std::io::stdout().flush();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(seconds));
        std::process::exit(0);
    });
    let chunk: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        let chunk = chunk.clone();
        std::thread::spawn(move || {
            let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                if s.write_all(&chunk[..n]).is_err() {
                    return;
                }
                left -= n as u64;
            }
            let _ = s.shutdown(Shutdown::Write);
            // Let the peer read to the end before the socket closes.
            let mut rest = [0u8; 1024];
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
            for _ in 0..1000 {
                match std::io::Read::read(&mut s, &mut rest) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        });
    }
}
