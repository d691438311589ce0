//! End-to-end test support: starting the real binary, targets, test nodes.
//!
//! Nothing here mocks what a user meets: the gateway is the real `splicegate`
//! binary, clients are `curl` or raw sockets, nodes are real proxies (our own
//! small ones, Debian's `tinyproxy` and `microsocks`), targets are real TCP
//! servers. Every address a test uses is its own: ports come from the kernel
//! (`bind 0`; the gateway is configured with port 0 and reports what it bound
//! in its `--ready-file`), node addresses from `127.0.1.0/24` and client
//! source addresses from `127.0.2.0/24`… through counters ([`addr`]), so the
//! test functions of one file can run in parallel threads.
//!
//! Invariants: every loop is bounded in count and time, every socket has a
//! timeout, every process started here is stopped by its PID when its owner
//! drops.
#![forbid(unsafe_code)]

pub mod addr;
pub mod admin;
pub mod agent;
pub mod browser;
pub mod canary;
pub mod catalog;
pub mod client;
pub mod conf;
pub mod curl;
pub mod faults;
pub mod fixtures;
pub mod fleet;
pub mod gateway;
pub mod netns;
pub mod nodes;
pub mod ops;
pub mod pg;
pub mod pki;
pub mod redis;
pub mod targets;
pub mod tools;
pub mod watch;

pub use addr::{client_ip, node_ip};
pub use client::{
    Conn, Resp, SocksAddr, SocksOutcome, assert_error, assert_error_head, basic, connect_from,
    socks5,
};
pub use conf::{Conf, NodeDecl, PkgDecl};
pub use curl::{Curl, CurlOut};
pub use fixtures::{KEY, user};
pub use gateway::Gateway;
pub use nodes::{Behavior, NodeKind, TestNode};
pub use targets::{Blackhole, ClosedPort, HttpTarget, Sink, Source, TcpEcho};
pub use tools::{Dante, Haproxy, Microsocks, Tinyproxy, require_tool};

use std::time::{Duration, Instant};

/// Whether the tests run as root (`Uid:` of `/proc/self/status`).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

/// Poll `f` until it returns `Some`, at most `timeout`, every `every`.
pub fn eventually<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}
