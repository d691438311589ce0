//! Raw-socket clients for byte-exact tests: a buffered connection, HTTP/1.1
//! heads and bodies, SOCKS5, and the check of a gateway error answer.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use base64::Engine as _;
use socket2::{Domain, SockAddr, Socket, Type};

/// Default read/write timeout of test sockets.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest head a test reads.
const MAX_HEAD: usize = 1 << 20;

/// Connect to `dst` from the source address `src` (port chosen by the
/// kernel), with connect, read and write timeouts.
pub fn connect_from(src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    if src.is_ipv4() == dst.is_ipv4() {
        sock.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
    }
    sock.connect_timeout(&SockAddr::from(dst), Duration::from_secs(5))?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A request head up to its end: `start HTTP/1.1`, `Host`,
/// `Proxy-Authorization` when there are credentials, and `extra` lines; the
/// caller adds the blank line (and a body).
fn head(start: &str, host: &str, creds: Option<(&str, &str)>, extra: &[&str]) -> String {
    let mut req = format!("{start} HTTP/1.1\r\nHost: {host}\r\n");
    if let Some((u, p)) = creds {
        req.push_str(&format!("Proxy-Authorization: {}\r\n", basic(u, p)));
    }
    for h in extra {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req
}

/// `Basic base64(user:pass)`.
pub fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// A TCP stream with a read buffer, so that bytes read past a head stay
/// available for the body or the tunnel.
#[derive(Debug)]
pub struct Conn {
    /// The socket.
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Wrap a connected stream.
    pub fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connect from `src` to `dst` (see [`connect_from`]).
    pub fn open(src: Ipv4Addr, dst: SocketAddr) -> io::Result<Conn> {
        Ok(Conn::new(connect_from(IpAddr::V4(src), dst)?))
    }

    /// Set the read timeout.
    pub fn set_timeout(&self, t: Duration) {
        let _ = self.stream.set_read_timeout(Some(t));
    }

    /// Send bytes.
    pub fn send(&mut self, b: &[u8]) -> io::Result<()> {
        self.stream.write_all(b)?;
        self.stream.flush()
    }

    /// Half-close: no more bytes from us.
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// One read from the socket into `buf` (past [`Conn::buffered`]):
    /// `Some(n)` bytes, `Some(0)` when the peer closed or the connection
    /// failed, `None` when the read timed out with nothing.
    pub fn try_read(&mut self, buf: &mut [u8]) -> Option<usize> {
        match self.stream.read(buf) {
            Ok(n) => Some(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(_) => Some(0),
        }
    }

    /// Bytes already read but not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Read once more into the buffer; 0 means EOF.
    fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 16384];
        let n = self.stream.read(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    /// Read up to and including `delim`; `None` if the peer closed first.
    pub fn read_until(&mut self, delim: &[u8], max: usize) -> io::Result<Option<Vec<u8>>> {
        let mut searched: usize = 0;
        loop {
            if let Some(p) = find(&self.buf[searched.saturating_sub(delim.len())..], delim) {
                let end = searched.saturating_sub(delim.len()) + p + delim.len();
                let out: Vec<u8> = self.buf.drain(..end).collect();
                return Ok(Some(out));
            }
            searched = self.buf.len();
            if self.buf.len() > max {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "head too long"));
            }
            if self.fill()? == 0 {
                return Ok(None);
            }
        }
    }

    /// Exactly `n` bytes.
    pub fn read_n(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {} of {n} bytes", self.buf.len()),
                ));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Everything until the peer closes (or resets, or `limit` bytes).
    pub fn read_to_close(&mut self, limit: usize) -> io::Result<Vec<u8>> {
        loop {
            if self.buf.len() >= limit {
                break;
            }
            match self.fill() {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e) => return Err(e),
            }
        }
        Ok(std::mem::take(&mut self.buf))
    }

    /// Whether the peer closes the connection within `within` (EOF or reset,
    /// after possibly some bytes). Returns the bytes that came before.
    pub fn closed_within(&mut self, within: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.set_timeout(left.max(Duration::from_millis(1)));
            match self.fill() {
                Ok(0) => return Some(std::mem::take(&mut self.buf)),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return Some(std::mem::take(&mut self.buf)),
            }
        }
    }

    /// Read one response: head, then the body by its framing. `method` is the
    /// request's method (a `HEAD` answer and a 2xx answer to `CONNECT` carry
    /// no body).
    pub fn read_response(&mut self, method: &str) -> io::Result<Resp> {
        let head = self.read_until(b"\r\n\r\n", MAX_HEAD)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed before a response head (got {:?})",
                    String::from_utf8_lossy(&self.buf)
                ),
            )
        })?;
        let mut resp = Resp::parse_head(&head)?;
        let no_body = method.eq_ignore_ascii_case("HEAD")
            || (method.eq_ignore_ascii_case("CONNECT") && (200..300).contains(&resp.status))
            || (100..200).contains(&resp.status)
            || resp.status == 204
            || resp.status == 304;
        if no_body {
            return Ok(resp);
        }
        if resp
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            resp.body = self.read_chunked()?;
            resp.chunked = true;
        } else if let Some(cl) = resp.header("content-length") {
            let n: usize = cl.trim().parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad Content-Length {cl}"),
                )
            })?;
            resp.body = self.read_n(n)?;
        } else {
            resp.body = self.read_to_close(64 << 20)?;
        }
        Ok(resp)
    }

    /// A chunked body, decoded; trailers are read and dropped.
    pub fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        for _ in 0..1_000_000 {
            let line = self
                .read_until(b"\r\n", 4096)?
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "EOF in chunk size"))?;
            let line = String::from_utf8_lossy(&line);
            let size_hex = line
                .trim()
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            let size = usize::from_str_radix(&size_hex, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size {line:?}"),
                )
            })?;
            if size == 0 {
                // Trailers until the empty line.
                for _ in 0..100 {
                    let t = self.read_until(b"\r\n", 8192)?.ok_or_else(|| {
                        io::Error::new(io::ErrorKind::UnexpectedEof, "EOF in trailers")
                    })?;
                    if t == b"\r\n" {
                        return Ok(body);
                    }
                }
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "too many trailers",
                ));
            }
            body.extend_from_slice(&self.read_n(size)?);
            let crlf = self.read_n(2)?;
            if crlf != b"\r\n" {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "chunk without CRLF",
                ));
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many chunks",
        ))
    }

    /// Send `CONNECT target` with optional credentials and extra header lines
    /// (each `Name: value`), and read the answer's head.
    pub fn connect(
        &mut self,
        target: &str,
        creds: Option<(&str, &str)>,
        extra: &[&str],
    ) -> io::Result<Resp> {
        let mut req = head(&format!("CONNECT {target}"), target, creds, extra);
        req.push_str("\r\n");
        self.send(req.as_bytes())?;
        self.read_response("CONNECT")
    }

    /// Send an absolute-form `GET url` with optional credentials and extra
    /// header lines, and read the whole response.
    pub fn get(
        &mut self,
        url: &str,
        creds: Option<(&str, &str)>,
        extra: &[&str],
    ) -> io::Result<Resp> {
        self.request("GET", url, creds, extra, None)
    }

    /// Send an absolute-form request with an optional `Content-Length` body.
    pub fn request(
        &mut self,
        method: &str,
        url: &str,
        creds: Option<(&str, &str)>,
        extra: &[&str],
        body: Option<&[u8]>,
    ) -> io::Result<Resp> {
        let host = url
            .split("://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or("");
        let mut req = head(&format!("{method} {url}"), host, creds, extra);
        if let Some(b) = body {
            req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        if let Some(b) = body {
            bytes.extend_from_slice(b);
        }
        self.send(&bytes)?;
        self.read_response(method)
    }

    /// Round trip `payload` through an established tunnel to an echo target.
    pub fn echo_round_trip(&mut self, payload: &[u8]) -> io::Result<()> {
        self.send(payload)?;
        let got = self.read_n(payload.len())?;
        if got != payload {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the echo came back different",
            ));
        }
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A parsed HTTP response.
#[derive(Debug, Clone, Default)]
pub struct Resp {
    /// The status line as received, without CRLF.
    pub status_line: String,
    /// The status code.
    pub status: u16,
    /// Header fields in order.
    pub headers: Vec<(String, String)>,
    /// The decoded body.
    pub body: Vec<u8>,
    /// Whether the body came chunked.
    pub chunked: bool,
    /// The head as received.
    pub raw_head: String,
}

impl Resp {
    /// Parse a head (status line and fields, ending with the empty line).
    pub fn parse_head(head: &[u8]) -> io::Result<Resp> {
        let text = String::from_utf8_lossy(head).to_string();
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or("").to_string();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/1.") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not an HTTP response: {status_line:?}"),
            ));
        }
        let status = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line {status_line:?}"),
            )
        })?;
        let headers = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| {
                l.split_once(':')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            })
            .collect();
        Ok(Resp {
            status_line,
            status,
            headers,
            body: Vec::new(),
            chunked: false,
            raw_head: text,
        })
    }

    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

/// Assert that `resp` is the gateway's error answer `status CODE` as SPEC
/// section 4 describes it, with a detail containing each of `detail_has`
/// (case-insensitive).
#[track_caller]
pub fn assert_error(resp: &Resp, status: u16, code: &str, detail_has: &[&str]) {
    assert_error_head(resp, status, code, detail_has);
    assert!(
        resp.text().contains(code),
        "the body names the code; response was:\n{}{}",
        resp.raw_head,
        resp.text()
    );
}

/// [`assert_error`] for a head alone (curl prints no body of a refused
/// CONNECT).
#[track_caller]
pub fn assert_error_head(resp: &Resp, status: u16, code: &str, detail_has: &[&str]) {
    let ctx = format!("response was:\n{}{}", resp.raw_head, resp.text());
    assert_eq!(
        resp.status_line,
        format!("HTTP/1.1 {status} {code}"),
        "status line; {ctx}"
    );
    assert_eq!(
        resp.header("X-SOAX-Error"),
        Some(code),
        "X-SOAX-Error; {ctx}"
    );
    let detail = resp
        .header("X-SOAX-Detail")
        .unwrap_or_else(|| panic!("no X-SOAX-Detail; {ctx}"));
    assert!(!detail.trim().is_empty(), "empty X-SOAX-Detail; {ctx}");
    for needle in detail_has {
        assert!(
            detail
                .to_ascii_lowercase()
                .contains(&needle.to_ascii_lowercase()),
            "X-SOAX-Detail {detail:?} should mention {needle:?}; {ctx}"
        );
    }
    let ps = resp
        .header("Proxy-Status")
        .unwrap_or_else(|| panic!("no Proxy-Status; {ctx}"));
    assert!(
        ps.starts_with("splicegate; error=") && ps.contains(&format!("details=\"{code}\"")),
        "Proxy-Status {ps:?}; {ctx}"
    );
    assert!(
        resp.header("Content-Type")
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("text/plain")),
        "Content-Type text/plain; {ctx}"
    );
    if status == 407 {
        assert_eq!(
            resp.header("Proxy-Authenticate"),
            Some("Basic realm=\"splicegate\""),
            "407 asks for credentials; {ctx}"
        );
    }
}

/// A SOCKS5 destination.
#[derive(Debug, Clone)]
pub enum SocksAddr {
    /// ATYP 0x01.
    V4(Ipv4Addr, u16),
    /// ATYP 0x04.
    V6(Ipv6Addr, u16),
    /// ATYP 0x03.
    Domain(String, u16),
}

impl From<SocketAddr> for SocksAddr {
    fn from(a: SocketAddr) -> SocksAddr {
        SocksAddr::of(a)
    }
}

impl SocksAddr {
    /// From a socket address.
    pub fn of(a: SocketAddr) -> SocksAddr {
        match a {
            SocketAddr::V4(v) => SocksAddr::V4(*v.ip(), v.port()),
            SocketAddr::V6(v) => SocksAddr::V6(*v.ip(), v.port()),
        }
    }

    /// ATYP, address and port as on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let port = match self {
            SocksAddr::V4(ip, p) => {
                out.push(1);
                out.extend_from_slice(&ip.octets());
                p
            }
            SocksAddr::V6(ip, p) => {
                out.push(4);
                out.extend_from_slice(&ip.octets());
                p
            }
            SocksAddr::Domain(d, p) => {
                out.push(3);
                out.push(d.len() as u8);
                out.extend_from_slice(d.as_bytes());
                p
            }
        };
        out.extend_from_slice(&port.to_be_bytes());
        out
    }
}

/// How a SOCKS5 exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocksOutcome {
    /// The method reply was 0xFF: no acceptable method.
    NoMethod,
    /// The method reply selected this (unexpected) method.
    Method(u8),
    /// RFC 1929 status (non-zero: failure).
    AuthStatus(u8),
    /// The request's reply field (0x00 = succeeded).
    Reply(u8),
    /// The gateway closed the connection at this stage.
    Closed(&'static str),
}

/// SOCKS5 handshake and one request (`cmd` 1 = CONNECT, 2 = BIND, 3 = UDP).
/// With `creds` the client offers only username/password (0x02); without, only
/// "no authentication" (0x00).
pub fn socks5(
    conn: &mut Conn,
    creds: Option<(&str, &str)>,
    cmd: u8,
    target: &SocksAddr,
) -> io::Result<SocksOutcome> {
    let method = if creds.is_some() { 2u8 } else { 0u8 };
    conn.send(&[5, 1, method])?;
    let Some(sel) = read_or_closed(conn, 2)? else {
        return Ok(SocksOutcome::Closed("method reply"));
    };
    if sel[0] != 5 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("method reply {sel:?}"),
        ));
    }
    if sel[1] == 0xFF {
        return Ok(SocksOutcome::NoMethod);
    }
    if sel[1] != method {
        return Ok(SocksOutcome::Method(sel[1]));
    }
    if let Some((u, p)) = creds {
        let mut m = vec![1u8, u.len() as u8];
        m.extend_from_slice(u.as_bytes());
        m.push(p.len() as u8);
        m.extend_from_slice(p.as_bytes());
        conn.send(&m)?;
        let Some(st) = read_or_closed(conn, 2)? else {
            return Ok(SocksOutcome::Closed("auth status"));
        };
        if st[1] != 0 {
            return Ok(SocksOutcome::AuthStatus(st[1]));
        }
    }
    socks5_request(conn, cmd, &target.encode())
}

/// The request part alone: `05 cmd 00` + `addr` (ATYP, address, port), then
/// the reply.
pub fn socks5_request(conn: &mut Conn, cmd: u8, addr: &[u8]) -> io::Result<SocksOutcome> {
    let mut req = vec![5u8, cmd, 0];
    req.extend_from_slice(addr);
    conn.send(&req)?;
    let Some(head) = read_or_closed(conn, 4)? else {
        return Ok(SocksOutcome::Closed("reply"));
    };
    // Consume the bound address so the tunnel starts clean.
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let Some(l) = read_or_closed(conn, 1)? else {
                return Ok(SocksOutcome::Closed("reply address"));
            };
            l[0] as usize + 2
        }
        _ => 0,
    };
    if read_or_closed(conn, rest)?.is_none() {
        return Ok(SocksOutcome::Closed("reply address"));
    }
    Ok(SocksOutcome::Reply(head[1]))
}

fn read_or_closed(conn: &mut Conn, n: usize) -> io::Result<Option<Vec<u8>>> {
    match conn.read_n(n) {
        Ok(v) => Ok(Some(v)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
