//! Per-test addresses: node exits on `127.0.1.x`, client sources on
//! `127.0.2.x` – `127.0.9.x`, ports from the kernel.
//!
//! Linux routes all of `127.0.0.0/8` to `lo`, so any of these can be bound
//! without configuring an interface. The counters start at an offset derived
//! from the process id, so that two test binaries run at once (e.g. by a
//! parallel runner) are unlikely to hand out the same address at the same time.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

static NODE: AtomicU32 = AtomicU32::new(0);
static CLIENT: AtomicU32 = AtomicU32::new(0);

/// How many client source addresses the counter cycles through.
const CLIENT_SPACE: u32 = 254 * 8;

/// A fresh node address `127.0.1.x` (x in 1..=254, cycling).
pub fn node_ip() -> Ipv4Addr {
    let n = (NODE.fetch_add(1, Ordering::Relaxed) + std::process::id().wrapping_mul(37)) % 254;
    Ipv4Addr::new(127, 0, 1, (n + 1) as u8)
}

/// A fresh client source address in `127.0.2.1` – `127.0.9.254` (cycling).
pub fn client_ip() -> Ipv4Addr {
    let n = (CLIENT.fetch_add(1, Ordering::Relaxed) + std::process::id().wrapping_mul(13))
        % CLIENT_SPACE;
    Ipv4Addr::new(127, 0, 2 + (n / 254) as u8, (n % 254 + 1) as u8)
}

/// A port free on `ip` right now, never handed out twice by this process:
/// only for third-party programs (tinyproxy, microsocks), which cannot bind
/// port 0 and report the port; they retry on another one when it is taken
/// by the time they bind ([`crate::tools`]). Everything of ours binds port 0.
///
/// Ports come from 20000–32767, below the kernel's ephemeral range (so
/// neither a client socket nor a port-0 bind takes one meanwhile), one after
/// another from a per-process start, and each is checked by binding it.
pub fn free_port(ip: IpAddr) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const BASE: u32 = 20_000;
    const SPAN: u32 = 12_768;
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let port = (BASE + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on {ip} in {BASE}..{}", BASE + SPAN)
}
