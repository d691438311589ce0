//! The gateway as a SOCKS5 client of an upstream node.
//!
//! Flow: [`write_greeting`] → [`parse_method_reply`] → (if `USERPASS`)
//! [`write_userpass`] → [`parse_auth_reply`] → [`write_connect`] →
//! [`parse_connect_reply`].

use std::net::IpAddr;

use super::{Socks5Error, USERPASS_VERSION, VERSION, address_end, atyp, method};
use splicegate_addr::Host;

/// Writes the greeting offering exactly one method: username/password when
/// the node has credentials, else no authentication.
pub fn write_greeting(with_auth: bool, out: &mut Vec<u8>) {
    let offered = if with_auth {
        method::USERPASS
    } else {
        method::NO_AUTH
    };
    out.extend_from_slice(&[VERSION, 0x01, offered]);
}

/// Parses the node's `VER METHOD` (2 bytes); returns the chosen method, which
/// may be [`method::NO_ACCEPTABLE`].
pub fn parse_method_reply(buf: &[u8]) -> Result<Option<u8>, Socks5Error> {
    match buf {
        [] => Ok(None),
        [ver, ..] if *ver != VERSION => Err(Socks5Error::Version(*ver)),
        [_] => Ok(None),
        [_, chosen, ..] => Ok(Some(*chosen)),
    }
}

/// Writes the RFC 1929 request. Username 1..=255 bytes, password ≤ 255.
pub fn write_userpass(user: &str, pass: &str, out: &mut Vec<u8>) -> Result<(), Socks5Error> {
    if user.is_empty() {
        return Err(Socks5Error::EmptyUsername);
    }
    let (Ok(ulen), Ok(plen)) = (u8::try_from(user.len()), u8::try_from(pass.len())) else {
        return Err(Socks5Error::CredentialTooLong);
    };
    out.extend_from_slice(&[USERPASS_VERSION, ulen]);
    out.extend_from_slice(user.as_bytes());
    out.push(plen);
    out.extend_from_slice(pass.as_bytes());
    Ok(())
}

/// Parses the node's RFC 1929 status (2 bytes): `true` when accepted.
pub fn parse_auth_reply(buf: &[u8]) -> Result<Option<bool>, Socks5Error> {
    match buf {
        [] => Ok(None),
        [ver, ..] if *ver != USERPASS_VERSION => Err(Socks5Error::AuthVersion(*ver)),
        [_] => Ok(None),
        [_, status, ..] => Ok(Some(*status == 0x00)),
    }
}

/// Writes the CONNECT request for `host:port` (IPv4, IPv6 or domain).
pub fn write_connect(host: &Host, port: u16, out: &mut Vec<u8>) -> Result<(), Socks5Error> {
    write_request(0x01, host, port, out)
}

/// Writes a request with command `cmd` (1 CONNECT, 3 UDP ASSOCIATE) for
/// `host:port`.
pub fn write_request(
    cmd: u8,
    host: &Host,
    port: u16,
    out: &mut Vec<u8>,
) -> Result<(), Socks5Error> {
    out.extend_from_slice(&[VERSION, cmd, 0x00]);
    match host {
        Host::Ip(IpAddr::V4(v4)) => {
            out.push(atyp::IPV4);
            out.extend_from_slice(&v4.octets());
        }
        Host::Ip(IpAddr::V6(v6)) => {
            out.push(atyp::IPV6);
            out.extend_from_slice(&v6.octets());
        }
        Host::Domain(name) => {
            let len = u8::try_from(name.len()).map_err(|_| Socks5Error::DomainTooLong)?;
            if len == 0 {
                return Err(Socks5Error::EmptyDomain);
            }
            out.extend_from_slice(&[atyp::DOMAIN, len]);
            out.extend_from_slice(name.as_bytes());
        }
    }
    out.extend_from_slice(&port.to_be_bytes());
    Ok(())
}

/// The BND.ADDR and BND.PORT of a whole reply (as [`parse_connect_reply`]
/// framed it), when it names an IP address (a name gives `None`).
pub fn reply_bound(reply: &[u8]) -> Option<std::net::SocketAddr> {
    let end = address_end(reply, 3).ok()??;
    let addr = &reply[4..end - 2];
    let ip: IpAddr = match reply[3] {
        atyp::IPV4 => <[u8; 4]>::try_from(addr).ok().map(IpAddr::from)?,
        atyp::IPV6 => <[u8; 16]>::try_from(addr).ok().map(IpAddr::from)?,
        _ => return None,
    };
    Some(std::net::SocketAddr::new(
        ip,
        u16::from_be_bytes([reply[end - 2], reply[end - 1]]),
    ))
}

/// Parses the node's reply `VER REP RSV ATYP BND.ADDR BND.PORT`; returns the
/// reply code and the bytes consumed (what follows is tunnel data). The bound
/// address is skipped, not validated.
pub fn parse_connect_reply(buf: &[u8]) -> Result<Option<(u8, usize)>, Socks5Error> {
    if let Some(&ver) = buf.first()
        && ver != VERSION
    {
        return Err(Socks5Error::Version(ver));
    }
    let Some(end) = address_end(buf, 3)? else {
        return Ok(None);
    };
    Ok(Some((buf[1], end)))
}
