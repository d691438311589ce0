//! The gateway as a SOCKS5 server: greeting, username/password, request, and
//! the replies.
//!
//! Flow: [`parse_greeting`] → [`method_reply`] → (if `USERPASS`)
//! [`parse_userpass`] → [`auth_reply`] → [`parse_request`] → [`write_reply`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{Socks5Error, USERPASS_VERSION, VERSION, address_end, atyp};
use splicegate_addr::{Host, Target, parse_host};

/// The client's greeting: the methods it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// Offered method codes (1..=255 of them sent; a set, since the server
    /// picks whatever the order).
    pub methods: MethodSet,
    /// Bytes consumed from the buffer.
    pub consumed: usize,
}

impl Greeting {
    /// Whether the client offers `method` (see [`super::method`]).
    pub fn offers(&self, method: u8) -> bool {
        self.methods.contains(method)
    }
}

/// A set of SOCKS5 method codes, kept inline (parsing a greeting allocates
/// nothing).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct MethodSet([u64; 4]);

impl MethodSet {
    /// The set of `codes`.
    pub fn from_codes(codes: &[u8]) -> MethodSet {
        let mut set = MethodSet::default();
        for &c in codes {
            set.0[usize::from(c >> 6)] |= 1 << (c & 63);
        }
        set
    }

    /// Whether `code` is in the set.
    pub fn contains(&self, code: u8) -> bool {
        self.0[usize::from(code >> 6)] & (1 << (code & 63)) != 0
    }

    /// Distinct codes in the set.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }
}

impl std::fmt::Debug for MethodSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set()
            .entries((0..=255u8).filter(|c| self.contains(*c)))
            .finish()
    }
}

/// RFC 1929 credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct UserPass {
    /// Username, 1..=255 bytes.
    pub username: AuthField,
    /// Password, 0..=255 bytes (an empty one simply fails the key check).
    pub password: AuthField,
    /// Bytes consumed from the buffer.
    pub consumed: usize,
}

impl std::fmt::Debug for UserPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password is a package key: never printed.
        f.debug_struct("UserPass")
            .field("username", &self.username)
            .field("password", &"***")
            .field("consumed", &self.consumed)
            .finish()
    }
}

/// One RFC 1929 field: at most 255 bytes of UTF-8, kept inline (parsing
/// credentials allocates nothing). Reads as a `str`.
#[derive(Clone)]
pub struct AuthField {
    bytes: [u8; 255],
    len: u8,
}

impl AuthField {
    /// `s` as a field; `None` when it is longer than 255 bytes.
    pub fn new(s: &str) -> Option<AuthField> {
        let len = u8::try_from(s.len()).ok()?;
        let mut bytes = [0u8; 255];
        bytes[..s.len()].copy_from_slice(s.as_bytes());
        Some(AuthField { bytes, len })
    }

    /// The field's text.
    pub fn as_str(&self) -> &str {
        // Built only from a `str`, so always UTF-8.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::ops::Deref for AuthField {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for AuthField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

impl PartialEq for AuthField {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for AuthField {}

impl PartialEq<str> for AuthField {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for AuthField {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for AuthField {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

/// The CMD byte of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// CONNECT (0x01): the only command splicegate serves.
    Connect,
    /// BIND (0x02): reply `reply::COMMAND_NOT_SUPPORTED`.
    Bind,
    /// UDP ASSOCIATE (0x03): reply `reply::COMMAND_NOT_SUPPORTED`.
    UdpAssociate,
    /// Any other code: reply `reply::COMMAND_NOT_SUPPORTED`.
    Other(u8),
}

impl From<u8> for Command {
    fn from(code: u8) -> Self {
        match code {
            0x01 => Command::Connect,
            0x02 => Command::Bind,
            0x03 => Command::UdpAssociate,
            other => Command::Other(other),
        }
    }
}

/// A request whose address parsed. Any command parses, so that an unsupported
/// one can get reply 0x07 rather than a bare close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The command; only [`Command::Connect`] is served.
    pub command: Command,
    /// Destination: IPv4, IPv6, or a domain read by [`crate::parse_host`]
    /// (so an IP literal sent as a domain, in any spelling, becomes
    /// [`Host::Ip`] and meets the same egress policy). The port is as sent
    /// (0 included; the policy decides).
    pub target: Target,
    /// Bytes consumed from the buffer; what follows is tunnel payload.
    pub consumed: usize,
}

/// Parses the greeting `VER NMETHODS METHODS…`.
pub fn parse_greeting(buf: &[u8]) -> Result<Option<Greeting>, Socks5Error> {
    if let Some(&ver) = buf.first()
        && ver != VERSION
    {
        return Err(Socks5Error::Version(ver));
    }
    let Some(&count) = buf.get(1) else {
        return Ok(None);
    };
    if count == 0 {
        return Err(Socks5Error::NoMethods);
    }
    let end = 2 + usize::from(count);
    let Some(methods) = buf.get(2..end) else {
        return Ok(None);
    };
    Ok(Some(Greeting {
        methods: MethodSet::from_codes(methods),
        consumed: end,
    }))
}

/// Parses the RFC 1929 request `VER ULEN UNAME PLEN PASSWD`.
pub fn parse_userpass(buf: &[u8]) -> Result<Option<UserPass>, Socks5Error> {
    if let Some(&ver) = buf.first()
        && ver != USERPASS_VERSION
    {
        return Err(Socks5Error::AuthVersion(ver));
    }
    let Some(&ulen) = buf.get(1) else {
        return Ok(None);
    };
    if ulen == 0 {
        return Err(Socks5Error::EmptyUsername);
    }
    let user_end = 2 + usize::from(ulen);
    let Some(&plen) = buf.get(user_end) else {
        return Ok(None);
    };
    let pass_end = user_end + 1 + usize::from(plen);
    if buf.len() < pass_end {
        return Ok(None);
    }
    let username = std::str::from_utf8(&buf[2..user_end]);
    let password = std::str::from_utf8(&buf[user_end + 1..pass_end]);
    let (Ok(username), Ok(password)) = (username, password) else {
        return Err(Socks5Error::CredentialsNotUtf8);
    };
    // Each is at most 255 bytes: its length came in one byte.
    let (Some(username), Some(password)) = (AuthField::new(username), AuthField::new(password))
    else {
        return Err(Socks5Error::CredentialsNotUtf8);
    };
    Ok(Some(UserPass {
        username,
        password,
        consumed: pass_end,
    }))
}

/// Parses the request `VER CMD RSV ATYP DST.ADDR DST.PORT`.
///
/// A non-zero RSV is rejected ([`Socks5Error::ReservedNonZero`]): no client
/// sends one, and refusing it keeps one reading of the bytes.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, Socks5Error> {
    if let Some(&ver) = buf.first()
        && ver != VERSION
    {
        return Err(Socks5Error::Version(ver));
    }
    if buf.get(2).is_some_and(|rsv| *rsv != 0) {
        return Err(Socks5Error::ReservedNonZero);
    }
    let Some(end) = address_end(buf, 3)? else {
        return Ok(None);
    };
    let command = Command::from(buf[1]);
    let target = target_at(buf, end)?;
    Ok(Some(Request {
        command,
        target,
        consumed: end,
    }))
}

/// The address and port whose ATYP is `buf[3]` and which end at `end`.
fn target_at(buf: &[u8], end: usize) -> Result<Target, Socks5Error> {
    let addr = &buf[4..end - 2];
    let host = match buf[3] {
        atyp::IPV4 => {
            let octets: [u8; 4] = addr
                .try_into()
                .map_err(|_| Socks5Error::UnsupportedAddressType(buf[3]))?;
            Host::Ip(IpAddr::V4(Ipv4Addr::from(octets)))
        }
        atyp::IPV6 => {
            let octets: [u8; 16] = addr
                .try_into()
                .map_err(|_| Socks5Error::UnsupportedAddressType(buf[3]))?;
            Host::Ip(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => parse_host(&addr[1..]).map_err(|e| Socks5Error::InvalidDomain(e.0))?,
    };
    let port = u16::from_be_bytes([buf[end - 2], buf[end - 1]]);
    Ok(Target::new(host, port))
}

/// A client's UDP datagram to relay (RFC 1928 section 7): `RSV RSV FRAG
/// ATYP DST.ADDR DST.PORT DATA`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpDatagram<'a> {
    /// The fragment number; the gateway relays only 0 (whole datagrams).
    pub frag: u8,
    /// Where it goes.
    pub target: Target,
    /// What it carries.
    pub payload: &'a [u8],
}

/// Parses one whole UDP datagram from a client. Non-zero RSV bytes, an
/// unknown ATYP and a datagram too short for its header are errors (the
/// datagram is dropped); FRAG is returned for the caller to judge.
pub fn parse_udp_datagram(buf: &[u8]) -> Result<UdpDatagram<'_>, Socks5Error> {
    if buf.len() >= 2 && (buf[0] != 0 || buf[1] != 0) {
        return Err(Socks5Error::ReservedNonZero);
    }
    let Some(end) = address_end(buf, 3)? else {
        return Err(Socks5Error::Truncated);
    };
    Ok(UdpDatagram {
        frag: buf[2],
        target: target_at(buf, end)?,
        payload: &buf[end..],
    })
}

/// Writes the header of a datagram relayed back to the client: `0 0 0`
/// then the address it came from.
pub fn write_udp_header(from: SocketAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(&[0, 0, 0]);
    write_addr(from, out);
}

/// The longest header [`udp_header`] writes: `0 0 0`, ATYP, an IPv6
/// address and a port.
pub const UDP_HEADER_MAX: usize = 22;

/// The header [`write_udp_header`] writes, in an array (for a relay that
/// writes it in place in front of a datagram): the bytes and how many.
pub fn udp_header(from: SocketAddr) -> ([u8; UDP_HEADER_MAX], usize) {
    let mut h = [0u8; UDP_HEADER_MAX];
    let len = match from.ip() {
        IpAddr::V4(v4) => {
            h[3] = atyp::IPV4;
            h[4..8].copy_from_slice(&v4.octets());
            8
        }
        IpAddr::V6(v6) => {
            h[3] = atyp::IPV6;
            h[4..20].copy_from_slice(&v6.octets());
            20
        }
    };
    h[len..len + 2].copy_from_slice(&from.port().to_be_bytes());
    (h, len + 2)
}

/// `ATYP ADDR PORT` of an IP address and port.
fn write_addr(addr: SocketAddr, out: &mut Vec<u8>) {
    match addr.ip() {
        IpAddr::V4(v4) => {
            out.push(atyp::IPV4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(atyp::IPV6);
            out.extend_from_slice(&v6.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// The method selection reply `VER METHOD`.
pub fn method_reply(method: u8) -> [u8; 2] {
    [VERSION, method]
}

/// The RFC 1929 status reply: `01 00` on success, `01 01` on failure.
pub fn auth_reply(ok: bool) -> [u8; 2] {
    [USERPASS_VERSION, if ok { 0x00 } else { 0x01 }]
}

/// Writes the reply `VER REP RSV ATYP BND.ADDR BND.PORT`; `None` as the bound
/// address writes `0.0.0.0:0` (as for every failure reply).
pub fn write_reply(code: u8, bound: Option<SocketAddr>, out: &mut Vec<u8>) {
    let bound = bound.unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
    out.extend_from_slice(&[VERSION, code, 0x00]);
    write_addr(bound, out);
}
