//! Target safety: no exit to loopback, private, link-local, multicast,
//! metadata or otherwise non-public addresses, nor to blocked ports, unless the
//! operator allows a range.
//!
//! Targets arrive canonical ([`splicegate_addr::parse_host`] reads `127.1`,
//! `0177.0.0.1`, `0x7f000001` and `2130706433` as 127.0.0.1, the way C
//! resolvers do), and IPv6 forms that embed an IPv4 address (mapped,
//! compatible, NAT64, 6to4) are judged by that address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use splicegate_addr::{Host, Target};

use crate::catalog::{Code, Rejection};

/// The operator's target policy.
#[derive(Debug, Clone)]
pub struct TargetPolicy {
    /// Ranges exempt from the non-public block (`safety.allow_targets`).
    pub allow: Vec<IpNet>,
    /// Ports no one may reach (`safety.blocked_ports`, 25 by default).
    pub blocked_ports: Vec<u16>,
}

impl Default for TargetPolicy {
    fn default() -> Self {
        TargetPolicy {
            allow: Vec::new(),
            blocked_ports: vec![25],
        }
    }
}

/// Why an address is not a public destination, if it is not.
pub fn non_public_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(v6) {
                return v4_reason(v4);
            }
            let s = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if s[0] & 0xffc0 == 0xfec0 {
                Some("site-local")
            } else if s[0] == 0x2001 && s[1] == 0x0db8 {
                Some("documentation")
            } else if s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0 {
                Some("discard-only")
            } else {
                None
            }
        }
    }
}

/// IPv4 carried inside IPv6: mapped ::ffff:a.b.c.d, compatible ::a.b.c.d,
/// NAT64 64:ff9b::/96, and 6to4 2002:AABB:CCDD::/48.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let o = v6.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if s[..5] == [0; 5] && (s[5] == 0xffff || (s[5] == 0 && (s[6] != 0 || s[7] > 1))) {
        return Some(tail);
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4] {
        return Some(tail);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if o[0] == 0 {
        Some("unspecified (0.0.0.0/8)")
    } else if ip.is_private() {
        Some("private")
    } else if o[0] == 169 && o[1] == 254 {
        Some("link-local or cloud metadata")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("shared address space (100.64.0.0/10)")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() || o[0] >= 240 {
        Some("reserved")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignments")
    } else if (o[0] == 192 && o[1] == 0 && o[2] == 2)
        || (o[0] == 198 && o[1] == 51 && o[2] == 100)
        || (o[0] == 203 && o[1] == 0 && o[2] == 113)
    {
        Some("documentation")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking (198.18.0.0/15)")
    } else {
        None
    }
}

impl TargetPolicy {
    /// Whether a port may be reached.
    pub fn check_port(&self, port: u16) -> Result<(), Rejection> {
        if port == 0 || self.blocked_ports.contains(&port) {
            return Err(Rejection::new(
                Code::Disallowed,
                format!("port {port} is blocked by the gateway"),
            ));
        }
        Ok(())
    }

    /// Whether an address (a literal, or what a name resolved to) may be reached.
    pub fn check_ip(&self, ip: IpAddr, port: u16) -> Result<(), Rejection> {
        self.check_port(port)?;
        let ip = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        if let Some(reason) = non_public_reason(ip) {
            return Err(Rejection::new(
                Code::Disallowed,
                format!("destination {ip} is not publicly routable ({reason})"),
            ));
        }
        Ok(())
    }

    /// Check a target before any node is asked: its port, its address when
    /// it is one, and loopback names (a name's addresses are checked again
    /// where it is resolved, on a `direct` node).
    pub fn check_target(&self, target: &Target) -> Result<(), Rejection> {
        let port = target.port;
        self.check_port(port)?;
        match &target.host {
            Host::Ip(ip) => self.check_ip(*ip, port)?,
            Host::Domain(name) => {
                let loopback_name = name == "localhost" || name.ends_with(".localhost");
                let loopback_allowed = self
                    .allow
                    .iter()
                    .any(|n| n.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
                if loopback_name && !loopback_allowed {
                    return Err(Rejection::new(
                        Code::Disallowed,
                        format!("destination {name} is not publicly routable (loopback)"),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host as a client would send it: unbracketed IPv6 is read as an
    /// address too (SOCKS5 carries addresses without brackets).
    fn target(host: &str, port: u16) -> Target {
        let h = match host.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => splicegate_addr::parse_host(host.as_bytes()).expect("host parses"),
        };
        Target::new(h, port)
    }

    fn check(p: &TargetPolicy, host: &str, port: u16) -> Result<(), Rejection> {
        p.check_target(&target(host, port))
    }

    fn blocked(host: &str) -> bool {
        check(&TargetPolicy::default(), host, 443).is_err()
    }

    #[test]
    fn loopback_in_every_spelling_is_blocked() {
        for h in [
            "127.0.0.1",
            "127.1",
            "127.0.1",
            "0177.0.0.1",
            "0x7f.0.0.1",
            "0x7f000001",
            "2130706433",
            "017700000001",
            "127.0.0.1.",
            "[::1]",
            "::1",
            "[::ffff:127.0.0.1]",
            "[::ffff:7f00:1]",
            "[64:ff9b::7f00:1]",
            "[2002:7f00:1::]",
            "localhost",
            "LOCALHOST",
            "api.localhost",
            "0",
            "0.0.0.0",
        ] {
            assert!(blocked(h), "{h} must be blocked");
        }
    }

    #[test]
    fn private_metadata_and_reserved_are_blocked() {
        for h in [
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "[fe80::1]",
            "[fd00:ec2::254]",
            "[ff02::1]",
            "[::]",
            "[::ffff:10.0.0.1]",
            "0xa.0.0.1",
            "012.0.0.1",
        ] {
            assert!(blocked(h), "{h} must be blocked");
        }
    }

    #[test]
    fn public_addresses_and_names_pass() {
        let p = TargetPolicy::default();
        assert!(check(&p, "93.184.216.34", 443).is_ok());
        assert!(check(&p, "Example.COM.", 80).is_ok());
        assert!(check(&p, "[2606:2800:220:1::1]", 443).is_ok());
        assert!(check(&p, "8.8.8.8", 53).is_ok());
        // Not inet_aton forms: names, resolved where the node is.
        assert!(check(&p, "1.2.3.4.5", 443).is_ok());
        assert!(check(&p, "256.1.1.1", 443).is_ok());
        assert!(check(&p, "08.1.1.1", 443).is_ok(), "8 is not octal");
    }

    #[test]
    fn ports_and_allow_ranges() {
        let p = TargetPolicy::default();
        let e = check(&p, "93.184.216.34", 25).unwrap_err();
        assert_eq!(e.code, Code::Disallowed);
        assert!(e.detail.contains("port 25"));
        assert!(check(&p, "93.184.216.34", 0).is_err());
        let allow = TargetPolicy {
            allow: vec!["127.0.0.0/8".parse().unwrap()],
            blocked_ports: vec![],
        };
        assert!(check(&allow, "127.0.0.1", 25).is_ok());
        assert!(check(&allow, "127.1", 8080).is_ok());
        assert!(
            check(&allow, "[::ffff:127.0.0.1]", 8080).is_ok(),
            "mapped forms follow the v4 allow"
        );
        assert!(check(&allow, "localhost", 8080).is_ok());
        assert!(check(&allow, "10.0.0.1", 80).is_err());
        assert!(
            allow.check_ip("::1".parse().unwrap(), 80).is_err(),
            "v6 loopback needs ::1 allowed"
        );
    }
}
