//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, versions 1 and 2): the
//! header a load balancer writes at the start of a TCP connection to say
//! whose connection it is relaying.
//!
//! [`parse`] takes the first bytes of a connection and says "need more"
//! (`Ok(None)`), "done" ([`Header`]: the bytes the header took and the
//! addresses it carries) or [`Error`]. Both versions are accepted on one
//! port: a v1 header starts with `PROXY `, a v2 header with its 12-byte
//! signature, and any other first byte is [`Error::Missing`] at once.
//!
//! What counts as the client:
//! - v1 `TCP4`/`TCP6` and v2 `PROXY` over TCP (`0x11`, `0x21`): the header's
//!   source address ([`Header::addresses`] is `Some`);
//! - v1 `UNKNOWN`, v2 `LOCAL` (a load balancer's own health check), and v2
//!   `PROXY` for a family or transport other than TCP over IP (UNSPEC, UNIX,
//!   UDP): the connection's own peer (`addresses` is `None`), as the
//!   specification asks.
//!
//! Strictness: a v1 line must end in CRLF within [`V1_MAX_LEN`] bytes and
//! hold exactly one space between fields, addresses of the named family,
//! ports in decimal without sign or leading zero; a v2 header must carry
//! version 2, a known command, family and transport, an address block as
//! long as its family needs, well-formed TLVs (skipped, not interpreted) and
//! at most [`V2_MAX_LEN`] bytes in all. Split-invariant like every parser of
//! this crate: a prefix gives `Ok(None)` or the whole input's answer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The longest v1 header, CRLF included (the specification's worst case:
/// `UNKNOWN` followed by the longest IPv6 addresses and ports).
pub const V1_MAX_LEN: usize = 107;
/// The v2 signature: the first 12 bytes of every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The fixed part of a v2 header: signature, version and command, family
/// and transport, length.
pub const V2_FIXED_LEN: usize = 16;
/// The longest v2 header accepted, fixed part included. The format allows
/// 16 + 65,535 bytes; HAProxy itself reads a header into one buffer of
/// 16 KiB by default, and real senders' TLVs (TLS details, a cloud's
/// endpoint id) take a few hundred bytes.
pub const V2_MAX_LEN: usize = V2_FIXED_LEN + 16 * 1024;

const V1_PREFIX: &[u8] = b"PROXY ";
/// Address block lengths of v2 families.
const V2_INET_LEN: usize = 12;
const V2_INET6_LEN: usize = 36;
const V2_UNIX_LEN: usize = 216;

/// Which version the header was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The text line.
    V1,
    /// The binary header.
    V2,
}

/// The relayed connection's endpoints, as the load balancer saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The client.
    pub source: SocketAddr,
    /// The address the client connected to (the load balancer's).
    pub destination: SocketAddr,
}

/// A complete header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// v1 or v2.
    pub version: Version,
    /// Bytes the header took; what follows is the client's.
    pub consumed: usize,
    /// The relayed endpoints; `None`: use the connection's own (v1
    /// `UNKNOWN`, v2 `LOCAL`, a v2 family or transport other than TCP/IP).
    pub addresses: Option<Addresses>,
}

/// Why the first bytes are not a PROXY protocol header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Neither `PROXY ` nor the v2 signature: the sender speaks no PROXY
    /// protocol (a client reaching the port directly, a load balancer not
    /// configured to send it).
    #[error("no PROXY protocol header (neither \"PROXY \" nor the v2 signature)")]
    Missing,
    /// No CRLF within the first 107 bytes of a v1 header.
    #[error("PROXY v1 line longer than 107 bytes")]
    V1TooLong,
    /// A v1 line that does not follow the grammar.
    #[error("malformed PROXY v1 line: {0}")]
    V1Malformed(&'static str),
    /// A v2 version other than 2.
    #[error("PROXY v2 header with version {0} (only 2 exists)")]
    V2Version(u8),
    /// A v2 command other than LOCAL (0) and PROXY (1).
    #[error("PROXY v2 header with unknown command {0}")]
    V2Command(u8),
    /// A v2 family/transport byte with an unassigned family or transport.
    #[error("PROXY v2 header with unknown family/transport 0x{0:02x}")]
    V2Family(u8),
    /// A v2 length shorter than its family's address block.
    #[error(
        "PROXY v2 header of {len} bytes after the fixed part, too short for its family (0x{family:02x})"
    )]
    V2TooShort {
        /// The family/transport byte.
        family: u8,
        /// The header's length field.
        len: u16,
    },
    /// A v2 header longer than [`V2_MAX_LEN`].
    #[error("PROXY v2 header of {0} bytes after the fixed part, over the limit")]
    V2TooLong(u16),
    /// A TLV after the addresses that runs past the header's end.
    #[error("PROXY v2 TLV runs past the header's end")]
    V2BadTlv,
}

impl Error {
    /// The metric label of this error: `missing` (no header at all) or
    /// `malformed` (a header that breaks the format).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Missing => "missing",
            _ => "malformed",
        }
    }
}

/// Parse a PROXY protocol header (v1 or v2) at the start of `input`.
/// `Ok(None)`: a header has begun (or nothing has come) and needs more bytes.
pub fn parse(input: &[u8]) -> Result<Option<Header>, Error> {
    match input.first() {
        None => Ok(None),
        Some(b'P') => parse_v1(input),
        Some(b'\r') => parse_v2(input),
        Some(_) => Err(Error::Missing),
    }
}

/// Whether `input`'s first bytes agree with `signature` as far as they go.
fn agrees(input: &[u8], signature: &[u8]) -> bool {
    let n = input.len().min(signature.len());
    input[..n] == signature[..n]
}

fn parse_v1(input: &[u8]) -> Result<Option<Header>, Error> {
    if !agrees(input, V1_PREFIX) {
        return Err(Error::Missing);
    }
    let window = &input[..input.len().min(V1_MAX_LEN)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if input.len() >= V1_MAX_LEN {
            Err(Error::V1TooLong)
        } else {
            Ok(None)
        };
    };
    if lf < V1_PREFIX.len() || input[lf - 1] != b'\r' {
        return Err(Error::V1Malformed("the line does not end in CRLF"));
    }
    let line = &input[V1_PREFIX.len()..lf - 1];
    if line.contains(&b'\r') {
        return Err(Error::V1Malformed("a CR inside the line"));
    }
    let consumed = lf + 1;
    if line == b"UNKNOWN" || line.starts_with(b"UNKNOWN ") {
        // The rest of an UNKNOWN line is to be ignored (section 2.1).
        return Ok(Some(Header {
            version: Version::V1,
            consumed,
            addresses: None,
        }));
    }
    let mut fields = line.split(|&b| b == b' ');
    let mut next = || fields.next().filter(|f| !f.is_empty());
    let proto = next().ok_or(Error::V1Malformed("no protocol"))?;
    let v6 = match proto {
        b"TCP4" => false,
        b"TCP6" => true,
        _ => return Err(Error::V1Malformed("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let src = next().ok_or(Error::V1Malformed("no source address"))?;
    let dst = next().ok_or(Error::V1Malformed("no destination address"))?;
    let sport = next().ok_or(Error::V1Malformed("no source port"))?;
    let dport = next().ok_or(Error::V1Malformed("no destination port"))?;
    if fields.next().is_some() {
        return Err(Error::V1Malformed("fields after the destination port"));
    }
    let (src, dst) = (v1_ip(src, v6)?, v1_ip(dst, v6)?);
    let (sport, dport) = (v1_port(sport)?, v1_port(dport)?);
    Ok(Some(Header {
        version: Version::V1,
        consumed,
        addresses: Some(Addresses {
            source: SocketAddr::new(src, sport),
            destination: SocketAddr::new(dst, dport),
        }),
    }))
}

fn v1_ip(field: &[u8], v6: bool) -> Result<IpAddr, Error> {
    let text = std::str::from_utf8(field).map_err(|_| Error::V1Malformed("address not ASCII"))?;
    if v6 {
        text.parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| Error::V1Malformed("not an IPv6 address"))
    } else {
        text.parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| Error::V1Malformed("not an IPv4 address"))
    }
}

fn v1_port(field: &[u8]) -> Result<u16, Error> {
    let bad = Error::V1Malformed("port is not a decimal 0-65535 without leading zeros");
    if field.len() > 5
        || !field.iter().all(u8::is_ascii_digit)
        || (field.len() > 1 && field[0] == b'0')
    {
        return Err(bad);
    }
    field
        .iter()
        .try_fold(0u32, |n, &d| {
            let n = n * 10 + u32::from(d - b'0');
            (n <= u32::from(u16::MAX)).then_some(n)
        })
        .map(|n| n as u16)
        .ok_or(bad)
}

fn parse_v2(input: &[u8]) -> Result<Option<Header>, Error> {
    if !agrees(input, &V2_SIGNATURE) {
        return Err(Error::Missing);
    }
    let Some(&ver_cmd) = input.get(12) else {
        return Ok(None);
    };
    if ver_cmd >> 4 != 2 {
        return Err(Error::V2Version(ver_cmd >> 4));
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        cmd => return Err(Error::V2Command(cmd)),
    };
    let Some(&fam) = input.get(13) else {
        return Ok(None);
    };
    let (family, transport) = (fam >> 4, fam & 0x0f);
    if family > 3 || transport > 2 {
        return Err(Error::V2Family(fam));
    }
    let Some(len) = input.get(14..16) else {
        return Ok(None);
    };
    let len = u16::from_be_bytes([len[0], len[1]]);
    let total = V2_FIXED_LEN + usize::from(len);
    if total > V2_MAX_LEN {
        return Err(Error::V2TooLong(len));
    }
    // The address block's length, for a PROXY command (LOCAL discards the
    // whole block, family included).
    let block = match (local, family) {
        (true, _) | (false, 0) => None,
        (false, 1) => Some(V2_INET_LEN),
        (false, 2) => Some(V2_INET6_LEN),
        (false, _) => Some(V2_UNIX_LEN),
    };
    if let Some(need) = block
        && usize::from(len) < need
    {
        return Err(Error::V2TooShort { family: fam, len });
    }
    let Some(body) = input.get(V2_FIXED_LEN..total) else {
        return Ok(None);
    };
    if let Some(need) = block {
        check_tlvs(&body[need..])?;
    }
    let tcp = transport == 1;
    let addresses = match (block, family) {
        (Some(_), 1) if tcp => {
            let ip = |at: usize| Ipv4Addr::new(body[at], body[at + 1], body[at + 2], body[at + 3]);
            Some(Addresses {
                source: SocketAddr::new(IpAddr::V4(ip(0)), be16(&body[8..10])),
                destination: SocketAddr::new(IpAddr::V4(ip(4)), be16(&body[10..12])),
            })
        }
        (Some(_), 2) if tcp => {
            let ip = |at: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&body[at..at + 16]);
                Ipv6Addr::from(b)
            };
            Some(Addresses {
                source: SocketAddr::new(IpAddr::V6(ip(0)), be16(&body[32..34])),
                destination: SocketAddr::new(IpAddr::V6(ip(16)), be16(&body[34..36])),
            })
        }
        _ => None,
    };
    Ok(Some(Header {
        version: Version::V2,
        consumed: total,
        addresses,
    }))
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// TLVs (type, 16-bit length, value) fill the rest of the header exactly.
fn check_tlvs(mut rest: &[u8]) -> Result<(), Error> {
    while !rest.is_empty() {
        if rest.len() < 3 {
            return Err(Error::V2BadTlv);
        }
        let len = usize::from(be16(&rest[1..3]));
        rest = rest.get(3 + len..).ok_or(Error::V2BadTlv)?;
    }
    Ok(())
}

/// Write a v1 line for `addresses` (`None`: `PROXY UNKNOWN`). A source and
/// destination of different families are written as `UNKNOWN` too.
pub fn write_v1(addresses: Option<Addresses>, out: &mut Vec<u8>) {
    let line = match addresses {
        Some(a) if a.source.is_ipv4() == a.destination.is_ipv4() => format!(
            "PROXY {} {} {} {} {}\r\n",
            if a.source.is_ipv4() { "TCP4" } else { "TCP6" },
            a.source.ip(),
            a.destination.ip(),
            a.source.port(),
            a.destination.port()
        ),
        _ => "PROXY UNKNOWN\r\n".to_owned(),
    };
    out.extend_from_slice(line.as_bytes());
}

/// Write a v2 header: `PROXY` over TCP for `addresses` (`None`: `LOCAL`),
/// followed by `tlvs` (already encoded). Addresses of different families
/// are written as `PROXY` with family UNSPEC. `None` when `tlvs` would make
/// the header longer than [`V2_MAX_LEN`].
pub fn write_v2(addresses: Option<Addresses>, tlvs: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let mut block = Vec::with_capacity(V2_INET6_LEN);
    let (cmd, fam) = match addresses {
        None => (0x20, 0x00),
        Some(a) => match (a.source.ip(), a.destination.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                block.extend_from_slice(&s.octets());
                block.extend_from_slice(&d.octets());
                (0x21, 0x11)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                block.extend_from_slice(&s.octets());
                block.extend_from_slice(&d.octets());
                (0x21, 0x21)
            }
            _ => (0x21, 0x00),
        },
    };
    if let (Some(a), false) = (addresses, block.is_empty()) {
        block.extend_from_slice(&a.source.port().to_be_bytes());
        block.extend_from_slice(&a.destination.port().to_be_bytes());
    }
    let len = block.len() + tlvs.len();
    if V2_FIXED_LEN + len > V2_MAX_LEN {
        return None;
    }
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(cmd);
    out.push(fam);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&block);
    out.extend_from_slice(tlvs);
    Some(())
}

#[cfg(test)]
mod tests;
