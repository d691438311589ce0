//! SOCKS5 (RFC 1928) with username/password sub-negotiation (RFC 1929): the
//! server side that clients of the gateway speak to ([`server`]), and the
//! client side the gateway speaks to upstream SOCKS5 nodes ([`client`]).
//!
//! Every parser returns `Ok(None)` until its message is complete and then the
//! number of bytes it consumed, so bytes that follow (the next message, or
//! optimistic tunnel data) stay with the caller.

pub mod client;
pub mod server;

/// Protocol version byte of SOCKS5 messages.
pub const VERSION: u8 = 0x05;
/// Version byte of the RFC 1929 username/password sub-negotiation.
pub const USERPASS_VERSION: u8 = 0x01;

/// Authentication method codes (RFC 1928 §3).
pub mod method {
    /// No authentication required.
    pub const NO_AUTH: u8 = 0x00;
    /// GSSAPI (never selected by splicegate).
    pub const GSSAPI: u8 = 0x01;
    /// Username/password (RFC 1929).
    pub const USERPASS: u8 = 0x02;
    /// No acceptable method: the reply before closing.
    pub const NO_ACCEPTABLE: u8 = 0xff;
}

/// Reply codes of the CONNECT reply (RFC 1928 §6).
pub mod reply {
    /// Succeeded.
    pub const SUCCEEDED: u8 = 0x00;
    /// General SOCKS server failure.
    pub const GENERAL_FAILURE: u8 = 0x01;
    /// Connection not allowed by ruleset.
    pub const NOT_ALLOWED: u8 = 0x02;
    /// Network unreachable.
    pub const NETWORK_UNREACHABLE: u8 = 0x03;
    /// Host unreachable.
    pub const HOST_UNREACHABLE: u8 = 0x04;
    /// Connection refused.
    pub const CONNECTION_REFUSED: u8 = 0x05;
    /// TTL expired.
    pub const TTL_EXPIRED: u8 = 0x06;
    /// Command not supported.
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x07;
    /// Address type not supported.
    pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;
}

/// Address type codes.
pub(crate) mod atyp {
    pub(crate) const IPV4: u8 = 0x01;
    pub(crate) const DOMAIN: u8 = 0x03;
    pub(crate) const IPV6: u8 = 0x04;
}

/// Why a SOCKS5 message was rejected. Each variant says what the server side
/// answers before it closes; on the client side (a node's answer) every
/// variant is a node failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Socks5Error {
    /// VER is not 5. Close without a reply.
    #[error("not SOCKS version 5 (version byte {0:#04x})")]
    Version(u8),
    /// Greeting with NMETHODS = 0. Reply `method_reply(NO_ACCEPTABLE)`, close.
    #[error("greeting offers no methods")]
    NoMethods,
    /// Sub-negotiation VER is not 1. Reply `auth_reply(false)`, close.
    #[error("username/password version is not 1 (got {0:#04x})")]
    AuthVersion(u8),
    /// ULEN = 0 (RFC 1929 requires 1..=255). Reply `auth_reply(false)`, close.
    #[error("empty username")]
    EmptyUsername,
    /// Username or password not UTF-8. Reply `auth_reply(false)`, close.
    #[error("username or password is not UTF-8")]
    CredentialsNotUtf8,
    /// Username or password over 255 bytes (client side only).
    #[error("username or password longer than 255 bytes")]
    CredentialTooLong,
    /// The RSV byte of a request is not 0. Close without a reply.
    #[error("reserved byte is not zero")]
    ReservedNonZero,
    /// ATYP is not 1, 3 or 4; the address length is unknown. Reply
    /// `write_reply(reply::ADDRESS_TYPE_NOT_SUPPORTED, None, ..)`, close.
    #[error("unsupported address type {0:#04x}")]
    UnsupportedAddressType(u8),
    /// Domain address of length 0. Reply `reply::GENERAL_FAILURE`, close.
    #[error("empty domain name")]
    EmptyDomain,
    /// Domain address that fails the host syntax (NUL, percent, non-ASCII…).
    /// Reply `reply::GENERAL_FAILURE`, close.
    #[error("invalid domain name: {0}")]
    InvalidDomain(&'static str),
    /// A domain longer than 255 bytes cannot be encoded (client side only).
    #[error("domain name longer than 255 bytes")]
    DomainTooLong,
    /// A UDP datagram shorter than its own header. Drop it.
    #[error("datagram shorter than its header")]
    Truncated,
}

/// Length of the address and port starting at `buf[at]` (the ATYP byte):
/// `Ok(None)` when more bytes are needed to know or to hold it.
pub(crate) fn address_end(buf: &[u8], at: usize) -> Result<Option<usize>, Socks5Error> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let addr_len = match kind {
        atyp::IPV4 => 4,
        atyp::IPV6 => 16,
        atyp::DOMAIN => match buf.get(at + 1) {
            None => return Ok(None),
            Some(0) => return Err(Socks5Error::EmptyDomain),
            Some(&n) => 1 + usize::from(n),
        },
        other => return Err(Socks5Error::UnsupportedAddressType(other)),
    };
    let end = at + 1 + addr_len + 2;
    Ok((buf.len() >= end).then_some(end))
}

#[cfg(test)]
mod tests;
