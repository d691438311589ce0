//! The one target type of splicegate: a [`Host`] (an address literal or a DNS
//! name) and a port, as [`Target`]. The codecs parse a client's target into it
//! once, the policy judges it, the node handshakes write it and the access log
//! prints it; nobody converts it to text and back.
//!
//! Invariants:
//! - **Parsed strictly, canonical once.** [`parse_host`] accepts only the
//!   reg-name alphabet, canonical or bracketed literals, and bounded lengths;
//!   what it returns is canonical: a name that any C resolver reads as an
//!   address (`127.1`, `0x7f.1`, `0177.0.0.1`, `2130706433`, the `inet_aton`
//!   forms) is [`Host::Ip`], and a [`Host::Domain`] is lowercase ASCII without
//!   a trailing dot. Two spellings of one destination compare equal.
//! - **Sans-IO and panic-free**: no resolver, no allocation beyond the name.
#![forbid(unsafe_code)]

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest DNS name accepted, in bytes (RFC 1035, without the trailing dot).
pub const MAX_DOMAIN_LEN: usize = 253;
/// Longest DNS label accepted, in bytes (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;

/// A target host, canonical: an address, or a DNS name to resolve.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// An address literal in any of its spellings.
    Ip(IpAddr),
    /// A DNS name: lowercase ASCII from the reg-name alphabet, no trailing
    /// dot, never a numeric form that resolvers read as an address.
    Domain(String),
}

impl fmt::Display for Host {
    /// Writes the host as it appears in an authority: IPv6 in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
            Host::Ip(IpAddr::V4(v4)) => write!(f, "{v4}"),
            Host::Domain(name) => f.write_str(name),
        }
    }
}

impl From<IpAddr> for Host {
    fn from(ip: IpAddr) -> Self {
        Host::Ip(ip)
    }
}

impl Host {
    /// The host without brackets: an address as `IpAddr` prints it, or the
    /// name (what an upstream HTTP `CONNECT` line and a log field carry
    /// before `:port` is added by [`Target`]).
    pub fn bare(&self) -> String {
        match self {
            Host::Ip(ip) => ip.to_string(),
            Host::Domain(name) => name.clone(),
        }
    }
}

/// Where a client wants to go: a canonical host and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// The host, canonical.
    pub host: Host,
    /// The port (1–65535 from the HTTP codec; SOCKS5 may carry 0, which the
    /// policy refuses).
    pub port: u16,
}

impl Target {
    /// A target of `host` and `port`.
    pub fn new(host: Host, port: u16) -> Self {
        Target { host, port }
    }
}

impl fmt::Display for Target {
    /// `host:port`, IPv6 in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// A host that failed the strict syntax; the reason is fit for a client-facing
/// detail line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid host: {0}")]
pub struct InvalidHost(pub &'static str);

/// Parses the host part of an authority (no port, no userinfo) into its
/// canonical form.
///
/// Accepts `[IPv6]` (no zone id), an IPv4 literal in any `inet_aton`
/// spelling, or a reg-name of letters, digits, `-`, `.` and `_` (≤ 253 bytes,
/// labels 1..=63 bytes, one optional trailing dot). Rejects percent-encoding,
/// userinfo, raw UTF-8 and control bytes.
pub fn parse_host(bytes: &[u8]) -> Result<Host, InvalidHost> {
    if bytes.is_empty() {
        return Err(InvalidHost("empty host"));
    }
    if bytes[0] == b'[' {
        let Some(inner) = bytes[1..].strip_suffix(b"]") else {
            return Err(InvalidHost("unterminated IPv6 literal"));
        };
        if inner.contains(&b'%') {
            return Err(InvalidHost("IPv6 zone identifiers are not allowed"));
        }
        return std::str::from_utf8(inner)
            .ok()
            .and_then(|s| s.parse::<Ipv6Addr>().ok())
            .map(|ip| Host::Ip(IpAddr::V6(ip)))
            .ok_or(InvalidHost("brackets hold only an IPv6 literal"));
    }
    if let Some(&bad) = bytes.iter().find(|b| !is_reg_name_byte(**b)) {
        return Err(InvalidHost(match bad {
            b'%' => "percent-encoding in host",
            b'@' => "userinfo in authority",
            b':' => "IPv6 literal must be in brackets",
            0x80.. => "non-ASCII byte in host (send IDNs as xn-- A-labels)",
            0x00..=0x1f | 0x7f => "control byte in host",
            _ => "character not allowed in host name",
        }));
    }
    // All bytes are ASCII from here on.
    let text = std::str::from_utf8(bytes).map_err(|_| InvalidHost("non-ASCII byte in host"))?;
    let name = text.strip_suffix('.').unwrap_or(text);
    if let Some(v4) = inet_aton(name) {
        return Ok(Host::Ip(IpAddr::V4(v4)));
    }
    if name.len() > MAX_DOMAIN_LEN {
        return Err(InvalidHost("host name longer than 253 bytes"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(InvalidHost("empty label in host name"));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(InvalidHost("host name label longer than 63 bytes"));
        }
    }
    Ok(Host::Domain(name.to_ascii_lowercase()))
}

fn is_reg_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')
}

/// Parses a decimal port `1..=65535`: digits only, no sign, at most 5 digits.
pub fn parse_port(bytes: &[u8]) -> Option<u16> {
    if bytes.is_empty() || bytes.len() > 5 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value = bytes
        .iter()
        .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
    u16::try_from(value).ok().filter(|p| *p != 0)
}

fn parse_part(p: &str) -> Option<u64> {
    if p.is_empty() {
        return None;
    }
    let (digits, radix) = if let Some(x) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
        (x, 16)
    } else if p.len() > 1 && p.starts_with('0') {
        (&p[1..], 8)
    } else {
        (p, 10)
    };
    if digits.is_empty() {
        return (radix == 16).then_some(0); // "0x" alone reads as 0 in glibc
    }
    if digits.len() > 12 {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// `inet_aton`: a.b.c.d, a.b.c (c 16 bits), a.b (b 24 bits), a (32 bits),
/// each part decimal, octal (leading 0) or hex (0x).
pub fn inet_aton(s: &str) -> Option<Ipv4Addr> {
    let mut nums = [0u64; 4];
    let mut count = 0;
    for part in s.split('.') {
        if count == 4 {
            return None;
        }
        nums[count] = parse_part(part)?;
        count += 1;
    }
    let (last, init) = nums[..count].split_last()?;
    if init.iter().any(|&n| n > 255) {
        return None;
    }
    let last_bits = 8 * (5 - count) as u32;
    if *last >= 1u64 << last_bits {
        return None;
    }
    let mut v: u64 = 0;
    for (i, n) in init.iter().enumerate() {
        v |= n << (24 - 8 * i);
    }
    Some(Ipv4Addr::from((v | last) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_table() {
        let v4 = |a, b, c, d| Ok(Host::Ip(IpAddr::V4(Ipv4Addr::new(a, b, c, d))));
        let dom = |s: &str| Ok(Host::Domain(s.to_owned()));
        let err = |r| Err(InvalidHost(r));
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = format!("{}.com", vec!["a".repeat(60); 5].join("."));
        let cases: Vec<(&[u8], Result<Host, InvalidHost>)> = vec![
            (b"example.com", dom("example.com")),
            (b"Example.COM", dom("example.com")),
            (b"blocked.example.", dom("blocked.example")),
            (b"_srv.a-b.example", dom("_srv.a-b.example")),
            (b"127.0.0.1", v4(127, 0, 0, 1)),
            (b"127.0.0.1.", v4(127, 0, 0, 1)),
            (b"127.1", v4(127, 0, 0, 1)),
            (b"127.0.1", v4(127, 0, 0, 1)),
            (b"0x7f.1", v4(127, 0, 0, 1)),
            (b"0x7f.0.0.1", v4(127, 0, 0, 1)),
            (b"0177.0.0.1", v4(127, 0, 0, 1)),
            (b"0x7f000001", v4(127, 0, 0, 1)),
            (b"017700000001", v4(127, 0, 0, 1)),
            (b"2130706433", v4(127, 0, 0, 1)),
            (b"256.1.1.1", dom("256.1.1.1")),
            (b"1.2.3.4.5", dom("1.2.3.4.5")),
            (b"0x", v4(0, 0, 0, 0)),
            (b"[::1]", Ok(Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)))),
            (
                b"[::ffff:127.0.0.1]",
                Ok(Host::Ip("::ffff:127.0.0.1".parse().unwrap())),
            ),
            (b"", err("empty host")),
            (b"[::1", err("unterminated IPv6 literal")),
            (
                b"[fe80::1%25eth0]",
                err("IPv6 zone identifiers are not allowed"),
            ),
            (
                b"[blocked.example]",
                err("brackets hold only an IPv6 literal"),
            ),
            (b"::1", err("IPv6 literal must be in brackets")),
            (b"example%2Ecom", err("percent-encoding in host")),
            (b"user@example.com", err("userinfo in authority")),
            (
                "exämple.com".as_bytes(),
                err("non-ASCII byte in host (send IDNs as xn-- A-labels)"),
            ),
            (b"127.0.0.1\0.example.com", err("control byte in host")),
            (b"a..b", err("empty label in host name")),
            (b".a", err("empty label in host name")),
            (
                long_label.as_bytes(),
                err("host name label longer than 63 bytes"),
            ),
            (long_name.as_bytes(), err("host name longer than 253 bytes")),
            (b"a b", err("character not allowed in host name")),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse_host(input),
                want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn port_table() {
        let cases: &[(&[u8], Option<u16>)] = &[
            (b"443", Some(443)),
            (b"1", Some(1)),
            (b"65535", Some(65535)),
            (b"00080", Some(80)),
            (b"", None),
            (b"0", None),
            (b"65536", None),
            (b"99999", None),
            (b"+443", None),
            (b"-1", None),
            (b"443abc", None),
            (b" 443", None),
            (b"123456", None),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse_port(input),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn display_brackets_ipv6() {
        let v6 = Host::Ip("2606:4700::1111".parse().unwrap());
        assert_eq!(v6.to_string(), "[2606:4700::1111]");
        assert_eq!(v6.bare(), "2606:4700::1111");
        assert_eq!(Target::new(v6, 443).to_string(), "[2606:4700::1111]:443");
        assert_eq!(
            Host::Ip("10.0.0.1".parse().unwrap()).to_string(),
            "10.0.0.1"
        );
        assert_eq!(Host::Domain("a.example".into()).to_string(), "a.example");
    }

    #[test]
    fn inet_aton_matches_glibc_forms() {
        assert_eq!(inet_aton("1.2.3.4"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(inet_aton("1.2.772"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(inet_aton("1.131844"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(inet_aton("16909060"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(
            inet_aton("0x1.0x2.0x3.0x4"),
            Some(Ipv4Addr::new(1, 2, 3, 4))
        );
        assert_eq!(inet_aton("01.02.03.04"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(inet_aton("1.2.3.256"), None);
        assert_eq!(inet_aton("1.2.65536"), None);
        assert_eq!(inet_aton("4294967296"), None);
        assert_eq!(inet_aton("1..2"), None);
        assert_eq!(inet_aton("a.b.c.d"), None);
        assert_eq!(inet_aton("08.1.1.1"), None, "8 is not octal");
    }

    #[test]
    fn spellings_of_one_destination_compare_equal() {
        let all = [
            &b"127.0.0.1"[..],
            b"127.1",
            b"0x7f.1",
            b"0177.0.0.1",
            b"2130706433",
        ];
        let first = parse_host(all[0]).unwrap();
        for s in all {
            assert_eq!(parse_host(s).unwrap(), first);
        }
        assert_eq!(
            parse_host(b"Example.COM.").unwrap(),
            parse_host(b"example.com").unwrap()
        );
    }
}
