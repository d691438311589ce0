//! The target host shared by the HTTP and SOCKS5 codecs, and its strict syntax.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest DNS name accepted, in bytes (RFC 1035, without the trailing dot).
pub const MAX_DOMAIN_LEN: usize = 253;
/// Longest DNS label accepted, in bytes (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;

/// A target host: an IP literal or a DNS name.
///
/// `Domain` is always lowercase ASCII from the reg-name alphabet (letters,
/// digits, `-`, `.`, `_`). Numeric-looking names that are not canonical
/// dotted quads (`127.1`, `0x7f.1`, `0177.0.0.1`) stay `Domain`: deciding
/// what such a name means (inet_aton style) is the egress-policy's job.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IPv4 dotted-quad literal or a bracketed IPv6 literal.
    Ip(IpAddr),
    /// A DNS name, lowercased; a trailing dot is kept as sent.
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

/// A host that failed the strict syntax; the reason is fit for a client-facing
/// detail line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid host: {0}")]
pub struct InvalidHost(pub &'static str);

/// Parses the host part of an authority (no port, no userinfo).
///
/// Accepts `[IPv6]` (no zone id), a canonical IPv4 dotted quad, or a reg-name
/// of letters, digits, `-`, `.` and `_` (≤ 253 bytes, labels 1..=63 bytes, one
/// optional trailing dot). Rejects percent-encoding, userinfo, raw UTF-8 and
/// control bytes.
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
    if let Ok(v4) = text.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(v4)));
    }
    let name = text.strip_suffix('.').unwrap_or(text);
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
    Ok(Host::Domain(text.to_ascii_lowercase()))
}

fn is_reg_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')
}

/// Parses a decimal port `1..=65535`: digits only, no sign, at most 5 digits.
pub(crate) fn parse_port(bytes: &[u8]) -> Option<u16> {
    if bytes.is_empty() || bytes.len() > 5 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value = bytes
        .iter()
        .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
    u16::try_from(value).ok().filter(|p| *p != 0)
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
            (b"blocked.example.", dom("blocked.example.")),
            (b"_srv.a-b.example", dom("_srv.a-b.example")),
            (b"127.0.0.1", v4(127, 0, 0, 1)),
            (b"127.1", dom("127.1")),
            (b"0x7f.1", dom("0x7f.1")),
            (b"0177.0.0.1", dom("0177.0.0.1")),
            (b"2130706433", dom("2130706433")),
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
        assert_eq!(
            Host::Ip("2606:4700::1111".parse().unwrap()).to_string(),
            "[2606:4700::1111]"
        );
        assert_eq!(
            Host::Ip("10.0.0.1".parse().unwrap()).to_string(),
            "10.0.0.1"
        );
        assert_eq!(Host::Domain("a.example".into()).to_string(), "a.example");
    }
}
