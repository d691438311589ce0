//! Request heads from clients of the proxy, and the head forwarded to origins.

use super::head::{self, Kind};
use super::{
    BodyFraming, HeadText, HeaderSlots, Headers, HttpError, Limits, Method, Version,
    connection_has, keep_alive, list_items, map_httparse, parse_content_length,
    write_end_to_end_headers,
};
use splicegate_addr::{Host, Target, parse_host, parse_port};

/// Where a request goes, in the form the request line gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestTarget {
    /// `CONNECT host:port`: open a tunnel (the port is always present).
    Authority(Target),
    /// `http://host[:port]/path?query`: forward the request (port 80 when the
    /// URI has none).
    Absolute {
        /// Host and port.
        target: Target,
        /// Path and query as sent (never decoded), `/` when the URI has none.
        path_and_query: HeadText,
    },
}

impl RequestTarget {
    /// The host and port, canonical.
    pub fn target(&self) -> &Target {
        match self {
            RequestTarget::Authority(target) | RequestTarget::Absolute { target, .. } => target,
        }
    }
}

/// A parsed, validated request head and the facts derived from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Request method.
    pub method: Method,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// Parsed request-target.
    pub target: RequestTarget,
    /// Bytes of the buffer taken by the head; what follows is body or the next
    /// request (or, after `CONNECT`, tunnel payload).
    pub head_len: usize,
    /// All header fields in order, as received.
    pub headers: Headers,
    /// How the request body is delimited.
    pub body: BodyFraming,
    /// Whether the client wants the connection kept after this exchange.
    pub keep_alive: bool,
    /// `Respond-With` items, lowercase and trimmed (`ip`, `country`, …).
    pub respond_with: Vec<String>,
    /// Which of `headers` is the `Proxy-Authorization` field, and which the
    /// `Host` field (checked to match the target).
    proxy_authorization_at: Option<usize>,
    host_at: Option<usize>,
}

impl Request {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.get(name)
    }

    /// The raw `Proxy-Authorization` value, for [`super::decode_basic`].
    pub fn proxy_authorization(&self) -> Option<&[u8]> {
        self.proxy_authorization_at
            .map(|i| self.headers.at(i).value)
    }

    /// The raw `Host` value, if any (it matches the target).
    pub fn host(&self) -> Option<&str> {
        // The scan admitted only ASCII reg-name or IP bytes in it.
        self.host_at
            .map(|i| std::str::from_utf8(self.headers.at(i).value).unwrap_or_default())
    }
}

/// Parses a request head at the start of `buf`.
///
/// `Ok(None)`: the head is not complete yet and no limit is crossed; read more
/// and call again with the grown buffer. Errors are final: answer and close.
/// See the module docs of [`crate::http`] and the tests for each rule.
pub fn parse_request(buf: &[u8], limits: &Limits) -> Result<Option<Request>, HttpError> {
    let Some(scanned) = head::scan(buf, limits, Kind::Request)? else {
        return Ok(None);
    };
    let head = &buf[..scanned.head_len];
    let mut slots = HeaderSlots::new();
    let mut parsed = httparse::Request::new(slots.get(scanned.header_count));
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Ok(_) => {
            return Err(HttpError::Malformed(
                "request head does not end where expected",
            ));
        }
        Err(httparse::Error::Version) => {
            let line = &head[scanned.start_line..];
            let line = &line[..line.iter().position(|b| *b == b'\r').unwrap_or(line.len())];
            let token = line.rsplit(|b| *b == b' ').next().unwrap_or_default();
            return Err(head::version_error(token));
        }
        Err(e) => return Err(map_httparse(e)),
    }
    let (Some(method), Some(path), Some(minor)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Err(HttpError::Malformed("incomplete request line"));
    };
    let version = match minor {
        0 => Version::Http10,
        1 => Version::Http11,
        _ => return Err(HttpError::UnsupportedVersion),
    };
    let method = Method::from_token(method);
    let target = parse_target(&method, path.as_bytes())?;
    let headers = Headers::from_parsed(parsed.headers);

    let mut content_length = None;
    let mut chunked = false;
    let mut host_at = None;
    let mut proxy_authorization_at = None;
    let mut respond_with = Vec::new();
    for (i, h) in headers.iter().enumerate() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            if content_length.is_some() {
                return Err(HttpError::Malformed("duplicate Content-Length"));
            }
            content_length = Some(parse_content_length(h.value)?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked {
                return Err(HttpError::Malformed("duplicate Transfer-Encoding"));
            }
            if !h.value.eq_ignore_ascii_case(b"chunked") {
                return Err(HttpError::Malformed(
                    "Transfer-Encoding other than exactly chunked",
                ));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("host") {
            if host_at.is_some() {
                return Err(HttpError::Malformed("duplicate Host header"));
            }
            host_at = Some(i);
        } else if name.eq_ignore_ascii_case("proxy-authorization") {
            if proxy_authorization_at.is_some() {
                return Err(HttpError::Malformed("duplicate Proxy-Authorization"));
            }
            proxy_authorization_at = Some(i);
        } else if name.eq_ignore_ascii_case("respond-with") {
            respond_with.extend(
                list_items(h.value).map(|item| String::from_utf8_lossy(item).to_ascii_lowercase()),
            );
        }
    }
    if chunked && content_length.is_some() {
        return Err(HttpError::Malformed(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    if chunked && version == Version::Http10 {
        return Err(HttpError::Malformed(
            "Transfer-Encoding in an HTTP/1.0 request",
        ));
    }
    if method == Method::Connect && (chunked || content_length.is_some()) {
        return Err(HttpError::Malformed(
            "CONNECT request with a body framing header",
        ));
    }
    if ["content-length", "transfer-encoding", "host"]
        .iter()
        .any(|framing| connection_has(&headers, framing))
    {
        return Err(HttpError::Malformed(
            "Connection header lists a framing header",
        ));
    }
    if let Some(i) = host_at {
        check_host_header(headers.at(i).value, target.target())?;
    }
    let body = match (chunked, content_length) {
        (true, _) => BodyFraming::Chunked,
        (false, Some(n)) => BodyFraming::ContentLength(n),
        (false, None) => BodyFraming::None,
    };
    Ok(Some(Request {
        keep_alive: keep_alive(version, &headers),
        method,
        version,
        target,
        head_len: scanned.head_len,
        headers,
        body,
        respond_with,
        proxy_authorization_at,
        host_at,
    }))
}

/// Validates a `Host` value against the target: same host, and the same port
/// when the header names one.
fn check_host_header(value: &[u8], target: &Target) -> Result<(), HttpError> {
    let (host, port) =
        parse_authority(value, false).map_err(|_| HttpError::Malformed("invalid Host header"))?;
    if host != target.host || port.is_some_and(|p| p != target.port) {
        return Err(HttpError::Malformed(
            "Host header does not match the request target",
        ));
    }
    Ok(())
}

fn parse_target(method: &Method, raw: &[u8]) -> Result<RequestTarget, HttpError> {
    if raw.contains(&b'#') {
        return Err(HttpError::Malformed("fragment in request target"));
    }
    if *method == Method::Connect {
        if raw.contains(&b'/') {
            return Err(HttpError::Malformed(
                "CONNECT target must be authority-form host:port",
            ));
        }
        let (host, port) = parse_authority(raw, true)?;
        let port = port.ok_or(HttpError::Malformed("CONNECT authority needs a port"))?;
        return Ok(RequestTarget::Authority(Target::new(host, port)));
    }
    if raw.starts_with(b"/") || raw == b"*" {
        return Err(HttpError::Malformed(
            "origin-form target: a proxy needs absolute-form (http://host/path) or CONNECT",
        ));
    }
    let Some(scheme_end) = raw.windows(3).position(|w| w == b"://") else {
        return Err(HttpError::Malformed(
            "request target is not absolute-form (http://host/path)",
        ));
    };
    let scheme = &raw[..scheme_end];
    if scheme.eq_ignore_ascii_case(b"https") {
        return Err(HttpError::Malformed(
            "https:// targets are not proxied: use CONNECT for https",
        ));
    }
    if !scheme.eq_ignore_ascii_case(b"http") {
        return Err(HttpError::UnsupportedScheme);
    }
    let rest = &raw[scheme_end + 3..];
    let authority_end = rest
        .iter()
        .position(|b| matches!(b, b'/' | b'?'))
        .unwrap_or(rest.len());
    let (host, port) = parse_authority(&rest[..authority_end], false)?;
    let tail = &rest[authority_end..];
    // The scan guarantees ASCII in the request line.
    let tail = String::from_utf8_lossy(tail);
    let path_and_query = match tail.as_bytes().first() {
        None => HeadText::new(&["/"]),
        Some(b'?') => HeadText::new(&["/", &tail]),
        Some(_) => HeadText::new(&[&tail]),
    };
    Ok(RequestTarget::Absolute {
        target: Target::new(host, port.unwrap_or(80)),
        path_and_query,
    })
}

/// Splits and validates `host[:port]`. The port is `None` when absent.
fn parse_authority(raw: &[u8], port_required: bool) -> Result<(Host, Option<u16>), HttpError> {
    if raw.contains(&b'@') {
        return Err(HttpError::Malformed("userinfo in authority"));
    }
    let (host_part, port_part) = if raw.first() == Some(&b'[') {
        let close = raw
            .iter()
            .position(|b| *b == b']')
            .ok_or(HttpError::Malformed("unterminated IPv6 literal"))?;
        match &raw[close + 1..] {
            [] => (&raw[..=close], None),
            [b':', port @ ..] => (&raw[..=close], Some(port)),
            _ => return Err(HttpError::Malformed("junk after IPv6 literal")),
        }
    } else {
        match raw.iter().filter(|b| **b == b':').count() {
            0 => (raw, None),
            1 => {
                let colon = raw.iter().position(|b| *b == b':').unwrap_or(raw.len());
                (&raw[..colon], Some(&raw[colon + 1..]))
            }
            _ => return Err(HttpError::Malformed("IPv6 literal must be in brackets")),
        }
    };
    let host = parse_host(host_part).map_err(|e| HttpError::Malformed(e.0))?;
    let port = match port_part {
        None if port_required => {
            return Err(HttpError::Malformed("CONNECT authority needs a port"));
        }
        None => None,
        Some(digits) => Some(
            parse_port(digits).ok_or(HttpError::Malformed("invalid port: 1-65535, digits only"))?,
        ),
    };
    Ok((host, port))
}

/// Writes the head forwarded to the origin: `METHOD origin-form HTTP/1.1`,
/// every header except hop-by-hop ones (`Connection` and what it lists,
/// `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`, `Upgrade`, `Respond-With`), and a
/// `Host` from the target when the client sent none. Framing headers are kept
/// as received, so the body bytes can be relayed unchanged.
///
/// For a `CONNECT` request the target is written in authority-form.
pub fn write_forward_head(req: &Request, out: &mut Vec<u8>) {
    use std::io::Write as _;
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    // The authority is written straight into `out` (writing to a `Vec`
    // cannot fail), never built as a string of its own first.
    let (target, absolute) = match &req.target {
        RequestTarget::Absolute {
            target,
            path_and_query,
        } => {
            out.extend_from_slice(path_and_query.as_bytes());
            (target, true)
        }
        RequestTarget::Authority(target) => {
            let _ = write!(out, "{target}");
            (target, false)
        }
    };
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if req.host_at.is_none() {
        out.extend_from_slice(b"Host: ");
        if absolute && target.port == 80 {
            let _ = write!(out, "{}", target.host);
        } else {
            let _ = write!(out, "{target}");
        }
        out.extend_from_slice(b"\r\n");
    }
    write_end_to_end_headers(&req.headers, out);
    out.extend_from_slice(b"\r\n");
}
