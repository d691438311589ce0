//! Watching a gateway from outside: its logs for secrets, its process for
//! memory, descriptors and CPU time (`/proc`), and source addresses handed
//! out per case so the per-source guard never mixes two cases.

use std::fs;
use std::net::Ipv4Addr;

use base64::Engine as _;

/// Every line of `texts` (name, content) that contains one of `secrets`, or
/// the standard base64 of one of `basic_pairs` (`user:pass`, i.e. a
/// `Proxy-Authorization` blob). Each finding names the text and the line.
pub fn leaked_secrets(
    texts: &[(&str, &str)],
    secrets: &[&str],
    basic_pairs: &[(&str, &str)],
) -> Vec<String> {
    let mut needles: Vec<String> = secrets
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| s.to_string())
        .collect();
    for (u, p) in basic_pairs {
        needles.push(base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")));
    }
    let mut found = Vec::new();
    for (name, text) in texts {
        for (n, line) in text.lines().enumerate() {
            if let Some(needle) = needles.iter().find(|s| line.contains(s.as_str())) {
                found.push(format!("{name}:{}: contains {needle:?}: {line}", n + 1));
            }
        }
    }
    found
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Resident memory of `pid`, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS:").unwrap_or(0)
}

/// Open descriptors of `pid`.
pub fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// User + system CPU time of `pid`, clock ticks (usually 1/100 s).
pub fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces, in parentheses).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let get = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(14) + get(15)
}

/// Source addresses for one test's cases: `127.0.2.1`, `127.0.2.2`, …,
/// `127.0.3.250`, then around again. `127.0.3.251`–`127.0.3.254` are left
/// for canaries and bystanders ([`Sources::reserved`]).
#[derive(Debug, Default)]
pub struct Sources {
    next: std::sync::atomic::AtomicU32,
}

impl Sources {
    /// A fresh allocator.
    pub fn new() -> Sources {
        Sources::default()
    }

    /// The next case address.
    pub fn next(&self) -> Ipv4Addr {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 504;
        Ipv4Addr::new(127, 0, 2 + (n / 254) as u8, (n % 254 + 1) as u8)
    }

    /// One of the four reserved addresses (`i` in 0..4): `127.0.3.251 + i`.
    pub fn reserved(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, 3, 251 + (i % 4))
    }
}
