//! A start-up check that no other socket already listens on a proxy
//! address. Listeners use `SO_REUSEPORT` (one per worker), so the kernel
//! would let another process of the same user bind the same address and
//! take a share of the clients, silently. The gateway refuses to start
//! instead. The sockets are read from `/proc/net/tcp` and `/proc/net/tcp6`,
//! their owners from `/proc/*/fd`.
//!
//! A listener no process holds is one whose process has just ended: after a
//! crash the kernel tears an io_uring instance down in the background, and
//! the sockets its requests referenced stay listed for a moment after the
//! process is gone. A restart (systemd's `Restart=on-failure`, a test that
//! kills and starts again) waits for such a socket instead of refusing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

/// How long an ownerless listener may take to go away.
const ORPHAN_WAIT: Duration = Duration::from_secs(3);

/// A listening socket of this network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Listener {
    pub addr: SocketAddr,
    pub inode: u64,
}

/// Another socket listening where the gateway would, and who holds it.
#[derive(Debug)]
pub(crate) struct Rival {
    pub addr: SocketAddr,
    /// Process id and command name, when a process visibly holds it.
    pub holder: Option<(u32, String)>,
}

impl std::fmt::Display for Rival {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.holder {
            Some((pid, comm)) => write!(f, "{} (pid {pid}, {comm})", self.addr),
            None => write!(f, "{} (held by no process this user can see)", self.addr),
        }
    }
}

/// The socket already listening where `addr` would, if any: at once when a
/// process holds it, after up to [`ORPHAN_WAIT`] when none does and it is
/// still there.
pub(crate) fn rival(addr: SocketAddr) -> Option<Rival> {
    let deadline = Instant::now() + ORPHAN_WAIT;
    let mut logged = false;
    loop {
        let other = taken(addr, &listening())?;
        let holder = holder(other.inode);
        if holder.is_some() || Instant::now() >= deadline {
            return Some(Rival {
                addr: other.addr,
                holder,
            });
        }
        if !logged {
            tracing::info!(%addr, other = %other.addr, "a listener no process holds is still listed (a predecessor's, going away): waiting up to 3 s");
            logged = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Listening sockets of the machine (this network namespace).
pub(crate) fn listening() -> Vec<Listener> {
    let mut out = Vec::new();
    for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        if let Ok(text) = std::fs::read_to_string(path) {
            out.extend(parse(&text, v6));
        }
    }
    out
}

/// The listening sockets in one `/proc/net/tcp{,6}` table.
pub(crate) fn parse(table: &str, v6: bool) -> Vec<Listener> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
            if *state != "0A" {
                return None; // not LISTEN
            }
            let (ip, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let ip = if v6 {
                v6_from_hex(ip)?
            } else {
                v4_from_hex(ip)?
            };
            Some(Listener {
                addr: SocketAddr::new(ip, port),
                inode: inode.parse().ok()?,
            })
        })
        .collect()
}

/// The first process (pid, command) with socket `inode` among its open
/// files, of those whose `/proc/<pid>/fd` this user may read.
fn holder(inode: u64) -> Option<(u32, String)> {
    let want = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let held = fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()));
        if held {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            return Some((pid, comm.trim().to_string()));
        }
    }
    None
}

/// The kernel prints each 32-bit word in host order (little-endian here).
fn v4_from_hex(h: &str) -> Option<IpAddr> {
    let n = u32::from_str_radix(h, 16).ok()?;
    Some(IpAddr::V4(Ipv4Addr::from(n.to_le_bytes())))
}

fn v6_from_hex(h: &str) -> Option<IpAddr> {
    if h.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, chunk) in bytes.chunks_mut(4).enumerate() {
        let word = u32::from_str_radix(h.get(i * 8..i * 8 + 8)?, 16).ok()?;
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    let v6 = Ipv6Addr::from(bytes);
    Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
}

/// Whether a socket listening on `other` would share clients with a
/// listener on `ours`: same port, and the same address or a wildcard on
/// either side.
pub(crate) fn overlaps(ours: SocketAddr, other: SocketAddr) -> bool {
    ours.port() == other.port()
        && (ours.ip() == other.ip() || ours.ip().is_unspecified() || other.ip().is_unspecified())
}

/// The first socket already listening where `addr` would; port 0 (the
/// kernel picks) never collides.
pub(crate) fn taken(addr: SocketAddr, sockets: &[Listener]) -> Option<Listener> {
    if addr.port() == 0 {
        return None;
    }
    sockets.iter().copied().find(|s| overlaps(addr, s.addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1388 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 00000000:2382 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0100007F:1388 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5 1 0 100 0 0 10 0
";

    fn at(addr: &str, inode: u64) -> Listener {
        Listener {
            addr: addr.parse().unwrap(),
            inode,
        }
    }

    #[test]
    fn tables_read_as_the_kernel_writes_them() {
        assert_eq!(
            parse(TCP, false),
            [at("127.0.0.1:5000", 1), at("0.0.0.0:9090", 2)],
            "established connections are not listeners"
        );
        assert_eq!(
            parse(TCP6, true),
            [at("[::1]:80", 4), at("127.0.0.1:8080", 5)]
        );
    }

    #[test]
    fn same_port_same_or_wildcard_address_overlaps() {
        let sockets = parse(TCP, false);
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let hit = |s: &str| taken(a(s), &sockets).map(|l| l.addr);
        assert_eq!(hit("127.0.0.1:5000"), Some(a("127.0.0.1:5000")));
        assert_eq!(hit("0.0.0.0:5000"), Some(a("127.0.0.1:5000")));
        assert_eq!(hit("127.0.0.2:9090"), Some(a("0.0.0.0:9090")));
        assert_eq!(hit("127.0.0.2:5000"), None);
        assert_eq!(hit("127.0.0.1:5001"), None);
        assert_eq!(hit("127.0.0.1:0"), None);
    }

    #[test]
    fn a_real_listener_is_seen_with_its_holder() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let found = taken(addr, &listening()).expect("listed");
        assert_eq!(found.addr, addr);
        let r = rival(addr).expect("a rival");
        assert_eq!(r.holder.map(|h| h.0), Some(std::process::id()));
        drop(l);
        assert!(rival(addr).is_none(), "a closed socket is no rival");
    }
}
