//! How a load generator reaches a target: straight, through an L4 relay's
//! frontend for that target, or through a proxy speaking HTTP CONNECT,
//! SOCKS5 (RFC 1928/1929) or absolute-form HTTP forwarding.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use socket2::{Domain, Protocol, Socket, Type};

use crate::targets::read_head;

/// A proxy protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Proto {
    Connect,
    Socks5,
    Forward,
}

impl Proto {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Proto::Connect => "CONNECT",
            Proto::Socks5 => "SOCKS5",
            Proto::Forward => "HTTP forward",
        }
    }
}

/// Username and password for the proxy.
#[derive(Debug, Clone)]
pub(crate) struct Auth {
    pub user: String,
    pub pass: String,
}

/// The way to a target.
#[derive(Debug, Clone)]
pub(crate) enum Route {
    /// No proxy.
    Direct,
    /// An L4 relay with one frontend per target: (target, frontend).
    L4(Vec<(SocketAddr, SocketAddr)>),
    Proxy {
        proto: Proto,
        addr: SocketAddr,
        auth: Option<Auth>,
        /// The username takes splicegate's `-session-ID` suffix (sticky
        /// sessions in the `http` mode).
        sessions: bool,
    },
}

impl Route {
    /// A short label for reports.
    pub(crate) fn label(&self) -> String {
        match self {
            Route::Direct => "no proxy".into(),
            Route::L4(_) => "L4 relay".into(),
            Route::Proxy { proto, auth, .. } => format!(
                "{}{}",
                proto.label(),
                if auth.is_some() { " + auth" } else { "" }
            ),
        }
    }

    /// Parse `connect://user:pass@host:port`, `socks5://…` or `http://…`
    /// (forwarding); user and password are optional.
    pub(crate) fn parse_url(url: &str) -> Result<Route> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| anyhow!("{url}: expected scheme://[user:pass@]host:port"))?;
        let proto = match scheme {
            "connect" => Proto::Connect,
            "socks5" | "socks5h" => Proto::Socks5,
            "http" => Proto::Forward,
            s => bail!("{url}: scheme {s:?} is not connect, socks5 or http"),
        };
        let rest = rest.trim_end_matches('/');
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((cred, hp)) => {
                let (u, p) = cred
                    .split_once(':')
                    .ok_or_else(|| anyhow!("{url}: credentials are user:pass"))?;
                (
                    Some(Auth {
                        user: u.into(),
                        pass: p.into(),
                    }),
                    hp,
                )
            }
            None => (None, rest),
        };
        let addr: SocketAddr = hostport
            .parse()
            .with_context(|| format!("{url}: {hostport} is not ip:port"))?;
        Ok(Route::Proxy {
            proto,
            addr,
            auth,
            sessions: false,
        })
    }

    /// The username for client connection `i` (sticky: its own session).
    pub(crate) fn user_for(&self, i: usize, sticky: bool) -> Option<Auth> {
        let Route::Proxy { auth, sessions, .. } = self else {
            return None;
        };
        let mut a = auth.clone()?;
        if sticky && *sessions {
            a.user = format!("{}-session-b{i}", a.user);
        }
        Some(a)
    }
}

/// Connect with a timeout, optionally from `src`, TCP_NODELAY on, and read
/// and write timeouts of `io` (no blocking call may hang a run).
pub(crate) fn dial(addr: SocketAddr, src: Option<Ipv4Addr>, io: Duration) -> Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    if let Some(ip) = src {
        s.bind(&SocketAddr::new(IpAddr::V4(ip), 0).into())
            .with_context(|| format!("binding {ip}"))?;
    }
    s.set_tcp_nodelay(true)?;
    s.connect_timeout(&addr.into(), io)
        .with_context(|| format!("connecting to {addr}"))?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(io))?;
    s.set_write_timeout(Some(io))?;
    Ok(s)
}

/// A byte stream to `target` (handshake done), plus any bytes of the target
/// that arrived with the proxy's reply.
#[derive(Debug)]
pub(crate) struct Tunnel {
    pub stream: TcpStream,
    pub early: usize,
}

/// Open a tunnel to `target` over `route`. A forwarding proxy cannot tunnel:
/// for it the caller speaks HTTP itself (see [`http_conn`]).
pub(crate) fn open_tunnel(
    route: &Route,
    target: SocketAddr,
    src: Option<Ipv4Addr>,
    auth: Option<&Auth>,
    io: Duration,
) -> Result<Tunnel> {
    let stream = match route {
        Route::Direct => dial(target, src, io)?,
        Route::L4(map) => dial(l4_frontend(map, target)?, src, io)?,
        Route::Proxy {
            proto: Proto::Connect,
            addr,
            ..
        } => {
            let mut s = dial(*addr, src, io)?;
            let early = connect_handshake(&mut s, target, auth)?;
            return Ok(Tunnel { stream: s, early });
        }
        Route::Proxy {
            proto: Proto::Socks5,
            addr,
            ..
        } => {
            let mut s = dial(*addr, src, io)?;
            socks5_handshake(&mut s, target, auth)?;
            s
        }
        Route::Proxy {
            proto: Proto::Forward,
            ..
        } => bail!("a forwarding proxy carries HTTP requests, not tunnels"),
    };
    Ok(Tunnel { stream, early: 0 })
}

pub(crate) fn l4_frontend(
    map: &[(SocketAddr, SocketAddr)],
    target: SocketAddr,
) -> Result<SocketAddr> {
    map.iter()
        .find(|(t, _)| *t == target)
        .map(|(_, f)| *f)
        .ok_or_else(|| anyhow!("the L4 relay has no frontend for {target}"))
}

/// A connection that carries HTTP requests to `origin`, and whether requests
/// on it use the absolute form (a forwarding proxy) or the origin form.
pub(crate) fn http_conn(
    route: &Route,
    origin: SocketAddr,
    auth: Option<&Auth>,
    io: Duration,
) -> Result<(TcpStream, bool)> {
    match route {
        Route::Proxy {
            proto: Proto::Forward,
            addr,
            ..
        } => Ok((dial(*addr, None, io)?, true)),
        _ => Ok((open_tunnel(route, origin, None, auth, io)?.stream, false)),
    }
}

/// A GET request for `origin`, absolute-form with Proxy-Authorization when
/// `absolute`, origin-form otherwise.
pub(crate) fn http_request(origin: SocketAddr, absolute: bool, auth: Option<&Auth>) -> Vec<u8> {
    let mut r = if absolute {
        format!("GET http://{origin}/bench HTTP/1.1\r\nHost: {origin}\r\n")
    } else {
        format!("GET /bench HTTP/1.1\r\nHost: {origin}\r\n")
    };
    if let (true, Some(a)) = (absolute, auth) {
        r.push_str(&format!("Proxy-Authorization: Basic {}\r\n", basic(a)));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

fn basic(a: &Auth) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", a.user, a.pass))
}

/// The status code of a response head.
pub(crate) fn status_of(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\r').next()?;
    let mut parts = line.split(|&b| b == b' ');
    let version = parts.next()?;
    if !version.starts_with(b"HTTP/1.") {
        return None;
    }
    std::str::from_utf8(parts.next()?).ok()?.parse().ok()
}

/// The Content-Length of a head, if any.
pub(crate) fn content_length(head: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(head).ok()?;
    text.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

/// Send CONNECT, read the reply head; returns how many target bytes came
/// after the head (a source target starts sending at once). In the clear or
/// inside TLS.
pub(crate) fn connect_handshake<S: Read + Write>(
    s: &mut S,
    target: SocketAddr,
    auth: Option<&Auth>,
) -> Result<usize> {
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(a) = auth {
        req.push_str(&format!("Proxy-Authorization: Basic {}\r\n", basic(a)));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).context("sending CONNECT")?;
    let mut buf = Vec::with_capacity(512);
    let n = read_head(s, &mut buf).context("reading the CONNECT reply")?;
    match status_of(&buf[..n]) {
        Some(200) => Ok(buf.len() - n),
        _ => bail!(
            "CONNECT refused: {}",
            String::from_utf8_lossy(&buf[..n.min(200)])
                .lines()
                .next()
                .unwrap_or("")
        ),
    }
}

/// RFC 1928 greeting, RFC 1929 username/password when `auth`, then CONNECT
/// to an IPv4 target. One round trip per step, as common clients do.
fn socks5_handshake(s: &mut TcpStream, target: SocketAddr, auth: Option<&Auth>) -> Result<()> {
    let method = if auth.is_some() { 2u8 } else { 0u8 };
    s.write_all(&[5, 1, method])?;
    let mut r = [0u8; 2];
    s.read_exact(&mut r).context("reading the SOCKS5 method")?;
    if r != [5, method] {
        bail!("SOCKS5 method refused: {r:?}");
    }
    if let Some(a) = auth {
        let (u, p) = (a.user.as_bytes(), a.pass.as_bytes());
        if u.len() > 255 || p.len() > 255 {
            bail!("SOCKS5 credentials longer than 255 bytes");
        }
        let mut m = Vec::with_capacity(3 + u.len() + p.len());
        m.push(1);
        m.push(u.len() as u8);
        m.extend_from_slice(u);
        m.push(p.len() as u8);
        m.extend_from_slice(p);
        s.write_all(&m)?;
        s.read_exact(&mut r)
            .context("reading the SOCKS5 auth reply")?;
        if r != [1, 0] {
            bail!("SOCKS5 authentication refused: {r:?}");
        }
    }
    let SocketAddr::V4(t) = target else {
        bail!("SOCKS5 here: IPv4 targets only");
    };
    let mut m = vec![5, 1, 0, 1];
    m.extend_from_slice(&t.ip().octets());
    m.extend_from_slice(&t.port().to_be_bytes());
    s.write_all(&m)?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head)
        .context("reading the SOCKS5 reply")?;
    if head[1] != 0 {
        bail!("SOCKS5 CONNECT refused: reply {}", head[1]);
    }
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l)?;
            usize::from(l[0]) + 2
        }
        a => bail!("SOCKS5 reply with address type {a}"),
    };
    let mut skip = [0u8; 258];
    s.read_exact(&mut skip[..rest])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let r = Route::parse_url("socks5://u:p@127.0.0.1:1080").unwrap();
        assert!(matches!(
            r,
            Route::Proxy { proto: Proto::Socks5, auth: Some(ref a), .. } if a.user == "u" && a.pass == "p"
        ));
        let r = Route::parse_url("http://127.0.0.1:3128/").unwrap();
        assert!(matches!(
            r,
            Route::Proxy {
                proto: Proto::Forward,
                auth: None,
                ..
            }
        ));
        assert!(Route::parse_url("ftp://127.0.0.1:1").is_err());
        assert!(Route::parse_url("connect://localhost:1").is_err());
    }

    #[test]
    fn heads_read() {
        assert_eq!(
            status_of(b"HTTP/1.0 200 Connection established\r\n\r\n"),
            Some(200)
        );
        assert_eq!(status_of(b"SSH-2.0\r\n"), None);
        assert_eq!(
            content_length(b"HTTP/1.1 200 OK\r\ncontent-length:  12 \r\n\r\n"),
            Some(12)
        );
        assert_eq!(content_length(b"HTTP/1.1 200 OK\r\n\r\n"), None);
    }

    #[test]
    fn sticky_users_get_a_session() {
        let r = Route::Proxy {
            proto: Proto::Forward,
            addr: "127.0.0.1:1".parse().unwrap(),
            auth: Some(Auth {
                user: "package-1".into(),
                pass: "k".into(),
            }),
            sessions: true,
        };
        assert_eq!(r.user_for(3, true).unwrap().user, "package-1-session-b3");
        assert_eq!(r.user_for(3, false).unwrap().user, "package-1");
    }
}
