//! A start-up check that no other socket already listens on a proxy
//! address. Listeners use `SO_REUSEPORT` (one per worker), so the kernel
//! would let another process of the same user bind the same address and
//! take a share of the clients, silently. The gateway refuses to start
//! instead. The sockets are read from `/proc/net/tcp` and `/proc/net/tcp6`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Listening sockets of the machine (this network namespace).
pub(crate) fn listening() -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        if let Ok(text) = std::fs::read_to_string(path) {
            out.extend(parse(&text, v6));
        }
    }
    out
}

/// The listening sockets in one `/proc/net/tcp{,6}` table.
pub(crate) fn parse(table: &str, v6: bool) -> Vec<SocketAddr> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let local = f.nth(1)?;
            let state = f.nth(1)?;
            if state != "0A" {
                return None; // not LISTEN
            }
            let (ip, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let ip = if v6 {
                v6_from_hex(ip)?
            } else {
                v4_from_hex(ip)?
            };
            Some(SocketAddr::new(ip, port))
        })
        .collect()
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
pub(crate) fn taken(addr: SocketAddr, sockets: &[SocketAddr]) -> Option<SocketAddr> {
    if addr.port() == 0 {
        return None;
    }
    sockets.iter().copied().find(|s| overlaps(addr, *s))
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

    #[test]
    fn tables_read_as_the_kernel_writes_them() {
        assert_eq!(
            parse(TCP, false),
            [
                "127.0.0.1:5000".parse().unwrap(),
                "0.0.0.0:9090".parse().unwrap()
            ],
            "established connections are not listeners"
        );
        assert_eq!(
            parse(TCP6, true),
            [
                "[::1]:80".parse().unwrap(),
                "127.0.0.1:8080".parse().unwrap()
            ]
        );
    }

    #[test]
    fn same_port_same_or_wildcard_address_overlaps() {
        let sockets = parse(TCP, false);
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            taken(a("127.0.0.1:5000"), &sockets),
            Some(a("127.0.0.1:5000"))
        );
        assert_eq!(
            taken(a("0.0.0.0:5000"), &sockets),
            Some(a("127.0.0.1:5000"))
        );
        assert_eq!(
            taken(a("127.0.0.2:9090"), &sockets),
            Some(a("0.0.0.0:9090"))
        );
        assert_eq!(taken(a("127.0.0.2:5000"), &sockets), None);
        assert_eq!(taken(a("127.0.0.1:5001"), &sockets), None);
        assert_eq!(taken(a("127.0.0.1:0"), &sockets), None);
    }

    #[test]
    fn a_real_listener_is_seen() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(taken(addr, &listening()), Some(addr));
        drop(l);
    }
}
