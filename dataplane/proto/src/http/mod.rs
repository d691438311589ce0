//! HTTP/1.x codecs: request heads from clients ([`parse_request`]), the head
//! forwarded to an origin ([`write_forward_head`]), response heads from origins
//! ([`parse_response`], [`write_response_head`]), body framing
//! ([`BodyTracker`]), `Proxy-Authorization: Basic` ([`decode_basic`]) and the
//! `CONNECT` exchange with an upstream HTTP proxy node
//! ([`write_connect_request`], [`parse_connect_response`]).
//!
//! Heads are scanned strictly before `httparse` sees them: CRLF only, no
//! obs-fold, no control bytes, no whitespace before a colon, bounded sizes.
//! `httparse` then tokenises the head that passed.

mod auth;
mod body;
mod head;
mod request;
mod response;
mod upstream;

pub use auth::{
    AuthError, BasicCredentials, MAX_CREDENTIAL_LEN, MAX_USERNAME_LEN, decode_basic, encode_basic,
};
pub use body::{
    BodyError, BodyTracker, MAX_CHUNK_EXT_BYTES, MAX_CHUNK_SIZE_DIGITS, MAX_TRAILER_BYTES,
};
pub use request::{Request, RequestTarget, parse_request, write_forward_head};
pub use response::{Response, parse_response, write_response_head};
pub use upstream::{ConnectResponse, parse_connect_response, write_connect_request};

/// Size limits for a head. The defaults follow RFC 9112 §3 (request lines of
/// at least 8000 octets must be supported).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest head (request or status line, header lines, final CRLF), bytes.
    pub max_head_bytes: usize,
    /// Largest request or status line, bytes (without its CRLF).
    pub max_line_bytes: usize,
    /// Most header fields in one head.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: 16 * 1024,
            max_line_bytes: 8 * 1024,
            max_headers: 100,
        }
    }
}

/// Why a head was rejected.
///
/// `Malformed` reasons are short, fixed, human-readable sentences meant for
/// the `X-SOAX-Detail` header; they never echo client bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The head, the request line or the header count is over its [`Limits`]
    /// (431 for a request).
    #[error("head too large: {0}")]
    HeadTooLarge(&'static str),
    /// A well-formed `HTTP/x.y` version other than 1.0 and 1.1 (505).
    #[error("unsupported HTTP version")]
    UnsupportedVersion,
    /// An absolute-form target with a scheme other than `http`/`https`, such as
    /// `ftp://` (policy may answer 403 rather than 400).
    #[error("unsupported scheme in request target: only http:// is proxied")]
    UnsupportedScheme,
    /// Anything else that is not a valid, unambiguous head (400).
    #[error("malformed HTTP head: {0}")]
    Malformed(&'static str),
}

/// HTTP version of a parsed head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0
    Http10,
    /// HTTP/1.1
    Http11,
}

/// How the body of a message is delimited (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body follows the head.
    None,
    /// Exactly this many bytes follow.
    ContentLength(u64),
    /// `Transfer-Encoding: chunked`; the message ends with the last chunk and
    /// trailers.
    Chunked,
    /// Responses only: the body runs until the origin closes the connection.
    UntilClose,
}

/// One header field as received: the name as sent (compare it
/// case-insensitively) and the value with surrounding whitespace trimmed.
/// Values may hold obs-text (bytes ≥ 0x80), hence bytes, not `str`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// Field name, a token, case preserved.
    pub name: &'a str,
    /// Field value, without leading or trailing whitespace.
    pub value: &'a [u8],
}

/// A head's header fields, in order, as received ([`Header`]), copied
/// into one buffer. Its two buffers (the bytes, the field index) go back to
/// a per-thread pool when it is dropped and serve the thread's next head,
/// so a warm thread parses heads without allocating.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    /// Each field's name, then its value, one field after another.
    bytes: Vec<u8>,
    /// Per field: where its name starts, where its value starts, where it
    /// ends, in `bytes`.
    fields: Vec<[u32; 3]>,
}

/// Buffer pairs a thread keeps for its next heads.
const KEPT_HEADERS: usize = 64;
/// Larger buffers (a head with long fields) are freed, not kept.
const KEPT_BYTES: usize = 8192;
const KEPT_FIELDS: usize = 128;

/// A [`Headers`]' two buffers, emptied.
type HeaderBuffers = (Vec<u8>, Vec<[u32; 3]>);

thread_local! {
    /// Emptied buffers of dropped [`Headers`].
    static FREE_HEADERS: std::cell::RefCell<Vec<HeaderBuffers>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl Drop for Headers {
    fn drop(&mut self) {
        if self.bytes.capacity() == 0
            || self.bytes.capacity() > KEPT_BYTES
            || self.fields.capacity() > KEPT_FIELDS
        {
            return;
        }
        let mut pair = (
            std::mem::take(&mut self.bytes),
            std::mem::take(&mut self.fields),
        );
        pair.0.clear();
        pair.1.clear();
        crate::pool::give(&FREE_HEADERS, pair, KEPT_HEADERS);
    }
}

impl Headers {
    /// Copies httparse's borrowed fields (values trimmed), into kept
    /// buffers when the thread has them.
    pub(crate) fn from_parsed(parsed: &[httparse::Header<'_>]) -> Headers {
        let len = parsed
            .iter()
            .map(|h| h.name.len() + h.value.trim_ascii().len())
            .sum();
        let (mut bytes, mut fields) = crate::pool::take(&FREE_HEADERS).unwrap_or_default();
        bytes.reserve(len);
        fields.reserve(parsed.len());
        let mut headers = Headers { bytes, fields };
        for h in parsed {
            // A head is at most `Limits::max_head_bytes`, far below 4 GiB.
            let start = headers.bytes.len() as u32;
            headers.bytes.extend_from_slice(h.name.as_bytes());
            let value = headers.bytes.len() as u32;
            headers.bytes.extend_from_slice(h.value.trim_ascii());
            headers
                .fields
                .push([start, value, headers.bytes.len() as u32]);
        }
        headers
    }

    /// Field `i`.
    ///
    /// # Panics
    /// If there are not that many fields.
    pub fn at(&self, i: usize) -> Header<'_> {
        let [start, value, end] = self.fields[i].map(|x| x as usize);
        Header {
            // Names were `str`s (httparse admits only token bytes).
            name: std::str::from_utf8(&self.bytes[start..value]).unwrap_or_default(),
            value: &self.bytes[value..end],
        }
    }

    /// The fields in order.
    pub fn iter(&self) -> impl Iterator<Item = Header<'_>> + Clone {
        (0..self.fields.len()).map(|i| self.at(i))
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The value of the first field named `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

/// Text kept apart from a head's fields (a request's path and query, an
/// answer's reason phrase). Its buffer comes from a per-thread pool and
/// goes back to it when dropped, as a [`Headers`]' buffers do, so a warm
/// thread parses heads without allocating. Reads as a `str`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct HeadText(String);

/// Text buffers a thread keeps for its next heads.
const KEPT_TEXTS: usize = 64;

thread_local! {
    /// Emptied buffers of dropped [`HeadText`]s.
    static FREE_TEXTS: std::cell::RefCell<Vec<String>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl HeadText {
    /// The concatenation of `parts`, in a kept buffer when the thread has
    /// one.
    pub fn new(parts: &[&str]) -> HeadText {
        let mut s = crate::pool::take(&FREE_TEXTS).unwrap_or_default();
        for p in parts {
            s.push_str(p);
        }
        HeadText(s)
    }
}

impl Drop for HeadText {
    fn drop(&mut self) {
        if self.0.capacity() == 0 || self.0.capacity() > KEPT_BYTES {
            return;
        }
        let mut s = std::mem::take(&mut self.0);
        s.clear();
        crate::pool::give(&FREE_TEXTS, s, KEPT_TEXTS);
    }
}

impl std::ops::Deref for HeadText {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for HeadText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl From<&str> for HeadText {
    fn from(s: &str) -> HeadText {
        HeadText::new(&[s])
    }
}

/// Header lines whose httparse slots live on the stack ([`HeaderSlots`]):
/// every ordinary head.
const STACK_HEADERS: usize = 32;

/// httparse's slots for a head: on the stack for up to [`STACK_HEADERS`]
/// lines, else on the heap.
pub(crate) struct HeaderSlots<'b> {
    stack: [httparse::Header<'b>; STACK_HEADERS],
    heap: Vec<httparse::Header<'b>>,
}

impl<'b> HeaderSlots<'b> {
    pub(crate) fn new() -> HeaderSlots<'b> {
        HeaderSlots {
            stack: [httparse::EMPTY_HEADER; STACK_HEADERS],
            heap: Vec::new(),
        }
    }

    /// Exactly `n` slots.
    pub(crate) fn get(&mut self, n: usize) -> &mut [httparse::Header<'b>] {
        if n <= STACK_HEADERS {
            &mut self.stack[..n]
        } else {
            self.heap.resize(n, httparse::EMPTY_HEADER);
            &mut self.heap[..]
        }
    }
}

/// A request method. Methods are case-sensitive: `get` is `Other("get")`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    /// `GET`
    Get,
    /// `HEAD`: its response never has a body.
    Head,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `DELETE`
    Delete,
    /// `CONNECT`: authority-form target, opens a tunnel.
    Connect,
    /// `OPTIONS`
    Options,
    /// `TRACE`
    Trace,
    /// `PATCH`
    Patch,
    /// Any other token.
    Other(String),
}

impl Method {
    /// The method from its token (case-sensitive).
    pub fn from_token(token: &str) -> Method {
        match token {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "CONNECT" => Method::Connect,
            "OPTIONS" => Method::Options,
            "TRACE" => Method::Trace,
            "PATCH" => Method::Patch,
            other => Method::Other(other.to_owned()),
        }
    }

    /// Idempotent (RFC 9110 §9.2.2): a request a proxy may send again on
    /// its own when a connection fails before the answer starts.
    pub fn is_idempotent(&self) -> bool {
        matches!(
            self,
            Method::Get
                | Method::Head
                | Method::Put
                | Method::Delete
                | Method::Options
                | Method::Trace
        )
    }

    /// The token as sent on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Connect => "CONNECT",
            Method::Options => "OPTIONS",
            Method::Trace => "TRACE",
            Method::Patch => "PATCH",
            Method::Other(token) => token,
        }
    }
}

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1),
/// plus the proxy's own `Respond-With`.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "respond-with",
];

/// Comma-separated list elements of a header value, trimmed, empty ones
/// skipped.
pub(crate) fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(|item| item.trim_ascii())
        .filter(|item| !item.is_empty())
}

/// Whether `name` must not be forwarded: a fixed hop-by-hop header or one that
/// a `Connection` header lists.
pub(crate) fn is_hop_by_hop(name: &str, headers: &Headers) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        || headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .flat_map(|h| list_items(h.value))
            .any(|token| token.eq_ignore_ascii_case(name.as_bytes()))
}

/// Whether some `Connection` header lists `token`.
pub(crate) fn connection_has(headers: &Headers, token: &str) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| list_items(h.value))
        .any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether a message of this version and these headers keeps the connection
/// open: HTTP/1.1 unless `Connection: close`, HTTP/1.0 only with
/// `Connection: keep-alive`.
pub(crate) fn keep_alive(version: Version, headers: &Headers) -> bool {
    if connection_has(headers, "close") {
        return false;
    }
    match version {
        Version::Http11 => true,
        Version::Http10 => connection_has(headers, "keep-alive"),
    }
}

/// Parses a Content-Length value: decimal digits only, no sign, no list, no
/// overflow of `u64`.
pub(crate) fn parse_content_length(value: &[u8]) -> Result<u64, HttpError> {
    if value.is_empty() {
        return Err(HttpError::Malformed("empty Content-Length"));
    }
    if !value.iter().all(u8::is_ascii_digit) {
        return Err(HttpError::Malformed(
            "Content-Length is not a decimal number",
        ));
    }
    value.iter().try_fold(0u64, |acc, d| {
        acc.checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(d - b'0')))
            .ok_or(HttpError::Malformed("Content-Length overflows"))
    })
}

/// Writes the headers that survive hop-by-hop removal.
pub(crate) fn write_end_to_end_headers(headers: &Headers, out: &mut Vec<u8>) {
    for h in headers.iter() {
        if !is_hop_by_hop(h.name, headers) {
            write_header(out, h.name.as_bytes(), h.value);
        }
    }
}

pub(crate) fn write_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Maps an httparse error on a head that already passed [`head::scan`].
pub(crate) fn map_httparse(err: httparse::Error) -> HttpError {
    HttpError::Malformed(match err {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status code",
        httparse::Error::Token => "invalid token in the start line",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version",
    })
}

#[cfg(test)]
mod tests;
