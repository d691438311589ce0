//! Response heads from origins, and the head forwarded to the client.

use super::head::{self, Kind};
use super::{
    BodyFraming, HeadText, HeaderSlots, Headers, HttpError, Limits, Method, Version, keep_alive,
    list_items, map_httparse, parse_content_length, write_end_to_end_headers, write_header,
};

/// A parsed response head and the facts derived from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP/1.0 or HTTP/1.1 as the origin sent it.
    pub version: Version,
    /// Status code, 100..=999 as httparse admits.
    pub status: u16,
    /// Reason phrase; empty when absent or not UTF-8.
    pub reason: HeadText,
    /// Bytes of the buffer taken by the head.
    pub head_len: usize,
    /// All header fields in order, as received.
    pub headers: Headers,
    /// How the body is delimited (RFC 9112 §6.3).
    pub body: BodyFraming,
    /// Whether the origin connection may carry another request afterwards.
    pub keep_alive: bool,
}

/// Parses a response head at the start of `buf`; `request_method` is the
/// method of the request it answers (a `HEAD` response has no body).
///
/// Body framing follows RFC 9112 §6.3: `HEAD`, 1xx, 204, 304 and a 2xx to
/// `CONNECT` have none; `Transfer-Encoding` whose final coding is `chunked`
/// is chunked, any other `Transfer-Encoding` runs until close; else
/// `Content-Length`; else until close. A response with both
/// `Transfer-Encoding` and `Content-Length`, or several `Content-Length`s, is
/// rejected: the gateway answers 502 rather than guess.
pub fn parse_response(
    buf: &[u8],
    limits: &Limits,
    request_method: &Method,
) -> Result<Option<Response>, HttpError> {
    let read = |parsed: &httparse::Response<'_, '_>| {
        let (Some(minor), Some(status)) = (parsed.version, parsed.code) else {
            return Err(HttpError::Malformed("incomplete status line"));
        };
        let version = match minor {
            0 => Version::Http10,
            1 => Version::Http11,
            _ => return Err(HttpError::UnsupportedVersion),
        };
        let reason = HeadText::new(&[parsed.reason.unwrap_or_default()]);
        Ok((
            version,
            status,
            reason,
            Headers::from_parsed(parsed.headers),
        ))
    };
    let Some(((version, status, reason, headers), head_len)) = with_status_head(buf, limits, read)?
    else {
        return Ok(None);
    };

    let mut content_length = None;
    let mut transfer_encoding: Option<&[u8]> = None;
    for h in headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            if content_length.is_some() {
                return Err(HttpError::Malformed("duplicate Content-Length"));
            }
            content_length = Some(parse_content_length(h.value)?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if transfer_encoding.is_some() {
                return Err(HttpError::Malformed("duplicate Transfer-Encoding"));
            }
            transfer_encoding = Some(h.value);
        }
    }
    if transfer_encoding.is_some() && content_length.is_some() {
        return Err(HttpError::Malformed(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    let no_body = *request_method == Method::Head
        || (100..200).contains(&status)
        || status == 204
        || status == 304
        || (*request_method == Method::Connect && (200..300).contains(&status));
    let body = if no_body {
        BodyFraming::None
    } else if let Some(te) = transfer_encoding {
        match list_items(te).last() {
            Some(last) if last.eq_ignore_ascii_case(b"chunked") => BodyFraming::Chunked,
            _ => BodyFraming::UntilClose,
        }
    } else if let Some(n) = content_length {
        BodyFraming::ContentLength(n)
    } else {
        BodyFraming::UntilClose
    };
    Ok(Some(Response {
        keep_alive: body != BodyFraming::UntilClose && keep_alive(version, &headers),
        version,
        status,
        reason,
        head_len,
        headers,
        body,
    }))
}

/// Scans a status head at the start of `buf` (strictly: CRLF only, no
/// obs-fold, bounded) and tokenises it; `read` takes what its caller needs
/// from httparse's view. Returns that and the head's length, or `None` for
/// more bytes. Shared by the origin reader ([`parse_response`]) and the
/// upstream-node reader ([`super::parse_connect_response`]).
pub(super) fn with_status_head<T>(
    buf: &[u8],
    limits: &Limits,
    read: impl FnOnce(&httparse::Response<'_, '_>) -> Result<T, HttpError>,
) -> Result<Option<(T, usize)>, HttpError> {
    let Some(scanned) = head::scan(buf, limits, Kind::Response)? else {
        return Ok(None);
    };
    let head = &buf[..scanned.head_len];
    let mut slots = HeaderSlots::new();
    let mut parsed = httparse::Response::new(slots.get(scanned.header_count));
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Ok(_) => {
            return Err(HttpError::Malformed(
                "response head does not end where expected",
            ));
        }
        Err(httparse::Error::Version) => {
            let line = &head[scanned.start_line..];
            let token = line.split(|b| *b == b' ').next().unwrap_or_default();
            return Err(head::version_error(token));
        }
        Err(e) => return Err(map_httparse(e)),
    }
    Ok(Some((read(&parsed)?, scanned.head_len)))
}

/// Writes the response head for the client: `HTTP/1.1 <status> <reason>`, the
/// origin's headers minus hop-by-hop ones, then `extra_headers` (the gateway's
/// own, e.g. `X-SOAX-*`, or `Connection: close` when the client connection
/// will close).
pub fn write_response_head(resp: &Response, extra_headers: &[(&str, &str)], out: &mut Vec<u8>) {
    use std::io::Write as _;
    out.extend_from_slice(b"HTTP/1.1 ");
    // Straight into `out` (a `Vec` takes every write), no string between.
    let _ = write!(out, "{}", resp.status);
    out.push(b' ');
    out.extend_from_slice(resp.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    write_end_to_end_headers(&resp.headers, out);
    for (name, value) in extra_headers {
        write_header(out, name.as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}
