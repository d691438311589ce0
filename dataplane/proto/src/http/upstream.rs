//! The gateway as a client of an upstream HTTP proxy node: `CONNECT` out,
//! status back.

use super::response::with_status_head;
use super::{HttpError, Limits, encode_basic, write_header};

/// The node's answer to `CONNECT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectResponse {
    /// Status code; 2xx means the tunnel is open.
    pub status: u16,
    /// Bytes of the buffer taken by the head; any bytes after it already
    /// belong to the tunnel.
    pub head_len: usize,
}

/// Writes `CONNECT host:port HTTP/1.1` with `Host` and, when credentials are
/// given, `Proxy-Authorization: Basic`. An IPv6 literal `host` is bracketed
/// if it is not already.
pub fn write_connect_request(
    host: &str,
    port: u16,
    basic_credentials: Option<(&str, &str)>,
    out: &mut Vec<u8>,
) {
    let authority = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    out.extend_from_slice(b"CONNECT ");
    out.extend_from_slice(authority.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    write_header(out, b"Host", authority.as_bytes());
    if let Some((user, pass)) = basic_credentials {
        write_header(
            out,
            b"Proxy-Authorization",
            encode_basic(user, pass).as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
}

/// Parses the node's response head to `CONNECT` with the default [`Limits`].
/// `Ok(None)`: need more bytes. Headers are validated but not kept; the body
/// of a non-2xx answer is not read (the caller closes the node connection).
pub fn parse_connect_response(buf: &[u8]) -> Result<Option<ConnectResponse>, HttpError> {
    let status = |parsed: &httparse::Response<'_, '_>| {
        parsed
            .code
            .ok_or(HttpError::Malformed("incomplete status line"))
    };
    Ok(with_status_head(buf, &Limits::default(), status)?
        .map(|(status, head_len)| ConnectResponse { status, head_len }))
}
