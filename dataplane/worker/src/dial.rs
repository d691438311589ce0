//! Reaching a target through a node, and reading the node's answer as the
//! contract's node table says: a node failure (the `onerror` policy decides),
//! `TARGET_UNREACHABLE`, `GATEWAY_TIMEOUT`, or an established tunnel.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use splicegate_control::Code;
use splicegate_control::catalog::Rejection;
use splicegate_control::engine::Route;
use splicegate_control::nodes::{Node, NodeKind};
use splicegate_control::policy::{Admitted, Policy};
use splicegate_control::safety::CanonicalHost;
use splicegate_control::session::Step;
use splicegate_proto::Host;
use splicegate_proto::http::{parse_connect_response, write_connect_request};
use splicegate_proto::socks5::{client, method, reply};
use splicegate_uring::{TcpStream, timeout_at};

use crate::ctx::Ctx;
use crate::io::{ReadError, read_message};

/// A connection to the target through a node.
pub(crate) struct Upstream {
    pub stream: TcpStream,
    /// Bytes the node sent after its answer (they belong to the client).
    pub leftover: Vec<u8>,
}

/// How an attempt through one node ended badly.
pub(crate) enum DialFailure {
    /// The node failed; `onerror` decides. The text says how (for the log).
    Node(String),
    /// Answer the client with this (the node is fine).
    Answer(Rejection),
}

/// Out of descriptors or memory for the upstream socket: the gateway is
/// overloaded; neither the node nor the target is to blame.
fn overloaded(e: &io::Error) -> Option<DialFailure> {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
    .then(|| {
        DialFailure::Answer(Rejection::new(
            Code::Overloaded,
            "the gateway is out of connections right now; retry shortly",
        ))
    })
}

fn target_unreachable(detail: String) -> DialFailure {
    DialFailure::Answer(Rejection::new(Code::TargetUnreachable, detail))
}

fn gateway_timeout(detail: String) -> DialFailure {
    DialFailure::Answer(Rejection::new(Code::GatewayTimeout, detail))
}

fn host_text(target: &CanonicalHost) -> String {
    match target {
        CanonicalHost::Ip(ip) => ip.to_string(),
        CanonicalHost::Name(n) => n.clone(),
    }
}

/// Dial the route's nodes until one establishes, or the `onerror` machine
/// gives the answer.
pub(crate) async fn connect_route(
    ctx: &Ctx,
    policy: &Policy,
    adm: &Admitted,
    route: &mut Route,
) -> Result<(Upstream, std::sync::Arc<Node>), Rejection> {
    let engine = &ctx.shared.engine;
    let mut step = engine.first_step(policy, route, &mut ctx.rng.borrow_mut());
    loop {
        let idx = match step {
            Step::Fail(rej) => return Err(rej),
            Step::Dial(idx) => idx,
        };
        let node = policy.nodes.node(idx).clone();
        match dial(ctx, policy, &node, &adm.target, adm.port).await {
            Ok(up) => {
                engine.established(policy, route, crate::clock::now());
                return Ok((up, node));
            }
            Err(DialFailure::Answer(rej)) => return Err(rej),
            Err(DialFailure::Node(why)) => {
                tracing::info!(node = %node.id, reason = %why, "node failure");
                step = engine.after_failure(policy, route, &mut ctx.rng.borrow_mut());
            }
        }
    }
}

/// One attempt through one node.
pub(crate) async fn dial(
    ctx: &Ctx,
    policy: &Policy,
    node: &Node,
    target: &CanonicalHost,
    port: u16,
) -> Result<Upstream, DialFailure> {
    let s = &ctx.shared.settings;
    match node.kind {
        NodeKind::Direct => dial_direct(ctx, policy, node, target, port).await,
        NodeKind::Http => {
            let stream = connect_node(node, Instant::now() + s.node_connect).await?;
            let mut out = Vec::with_capacity(256);
            let creds = node.credentials.as_ref().map(|(u, p)| (&**u, &**p));
            write_connect_request(&host_text(target), port, creds, &mut out);
            timeout_at(Instant::now() + s.node_connect, stream.write_all(&out))
                .await
                .map_err(|_| DialFailure::Node("timed out sending CONNECT".into()))?
                .map_err(|e| DialFailure::Node(format!("sending CONNECT: {e}")))?;
            let mut buf = Vec::with_capacity(1024);
            let answer = read_message(
                &stream,
                &mut buf,
                Instant::now() + s.target,
                Some(16 * 1024),
                parse_connect_response,
            )
            .await;
            let resp = match answer {
                Ok(r) => r,
                Err(ReadError::Timeout { .. }) => {
                    return Err(gateway_timeout(format!(
                        "the target did not answer within {} ms",
                        s.target.as_millis()
                    )));
                }
                Err(ReadError::Closed { .. }) => {
                    return Err(DialFailure::Node("closed before answering CONNECT".into()));
                }
                Err(ReadError::Io(e)) => {
                    return Err(DialFailure::Node(format!("reading its answer: {e}")));
                }
                Err(ReadError::Parse(e)) => {
                    return Err(DialFailure::Node(format!("malformed answer: {e}")));
                }
            };
            match resp.status {
                200..=299 => Ok(Upstream {
                    stream,
                    leftover: buf.split_off(resp.head_len),
                }),
                500 | 502 | 503 => Err(target_unreachable(format!(
                    "the target refused or does not exist (node {} answered {})",
                    node.id, resp.status
                ))),
                504 => Err(gateway_timeout(format!(
                    "the target did not answer in time (node {} answered 504)",
                    node.id
                ))),
                other => Err(DialFailure::Node(format!("answered CONNECT with {other}"))),
            }
        }
        NodeKind::Socks5 => {
            let deadline = Instant::now() + s.node_connect;
            let stream = connect_node(node, deadline).await?;
            let mut out = Vec::with_capacity(300);
            let creds = node.credentials.as_ref();
            client::write_greeting(creds.is_some(), &mut out);
            send(&stream, &out, deadline).await?;
            let mut buf = Vec::with_capacity(512);
            let chosen = read_node(
                &stream,
                &mut buf,
                deadline,
                client::parse_method_reply,
                false,
            )
            .await?;
            match (chosen, creds) {
                (method::NO_AUTH, _) => {}
                (method::USERPASS, Some((u, p))) => {
                    out.clear();
                    client::write_userpass(u, p, &mut out)
                        .map_err(|e| DialFailure::Node(format!("credentials: {e}")))?;
                    send(&stream, &out, deadline).await?;
                    buf.clear();
                    if !read_node(&stream, &mut buf, deadline, client::parse_auth_reply, false)
                        .await?
                    {
                        return Err(DialFailure::Node("rejected our credentials".into()));
                    }
                }
                (m, _) => return Err(DialFailure::Node(format!("chose method {m:#04x}"))),
            }
            buf.clear();
            out.clear();
            let host = match target {
                CanonicalHost::Ip(ip) => Host::Ip(*ip),
                CanonicalHost::Name(n) => Host::Domain(n.clone()),
            };
            client::write_connect(&host, port, &mut out).map_err(|e| {
                DialFailure::Answer(Rejection::new(Code::BadRequest, e.to_string()))
            })?;
            send(&stream, &out, deadline).await?;
            let (code, consumed) = read_node(
                &stream,
                &mut buf,
                Instant::now() + s.target,
                client::parse_connect_reply,
                true,
            )
            .await?;
            match code {
                reply::SUCCEEDED => Ok(Upstream {
                    stream,
                    leftover: buf.split_off(consumed),
                }),
                reply::NETWORK_UNREACHABLE
                | reply::HOST_UNREACHABLE
                | reply::CONNECTION_REFUSED => Err(target_unreachable(format!(
                    "the target refused or is unreachable (node {} replied {code:#04x})",
                    node.id
                ))),
                reply::TTL_EXPIRED => Err(gateway_timeout(format!(
                    "the target did not answer in time (node {} replied 0x06)",
                    node.id
                ))),
                other => Err(DialFailure::Node(format!("replied {other:#04x}"))),
            }
        }
    }
}

async fn send(stream: &TcpStream, bytes: &[u8], deadline: Instant) -> Result<(), DialFailure> {
    match timeout_at(deadline, stream.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(DialFailure::Node(format!("write: {e}"))),
        Err(_) => Err(DialFailure::Node("write timed out".into())),
    }
}

/// Read one SOCKS5 answer of a node. A timeout is a node failure before the
/// target was asked, and `GATEWAY_TIMEOUT` after (`target_phase`).
async fn read_node<T, E: std::fmt::Display>(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    parse: impl FnMut(&[u8]) -> Result<Option<T>, E>,
    target_phase: bool,
) -> Result<T, DialFailure> {
    match read_message(stream, buf, deadline, None, parse).await {
        Ok(v) => Ok(v),
        Err(ReadError::Timeout { .. }) if target_phase => {
            Err(gateway_timeout("the target did not answer in time".into()))
        }
        Err(ReadError::Timeout { .. }) => Err(DialFailure::Node("no answer in time".into())),
        Err(ReadError::Closed { .. }) => Err(DialFailure::Node("closed the connection".into())),
        Err(ReadError::Io(e)) => Err(DialFailure::Node(format!("read: {e}"))),
        Err(ReadError::Parse(e)) => Err(DialFailure::Node(format!("malformed answer: {e}"))),
    }
}

async fn connect_node(node: &Node, deadline: Instant) -> Result<TcpStream, DialFailure> {
    let Some(addr) = node.addr else {
        return Err(DialFailure::Node("has no address".into()));
    };
    match timeout_at(deadline, TcpStream::connect(addr, None)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => {
            Err(overloaded(&e)
                .unwrap_or_else(|| DialFailure::Node(format!("connect to {addr}: {e}"))))
        }
        Err(_) => Err(DialFailure::Node(format!("connect to {addr} timed out"))),
    }
}

async fn dial_direct(
    ctx: &Ctx,
    policy: &Policy,
    node: &Node,
    target: &CanonicalHost,
    port: u16,
) -> Result<Upstream, DialFailure> {
    let s = &ctx.shared.settings;
    let ips: Vec<IpAddr> = match target {
        CanonicalHost::Ip(ip) => vec![*ip],
        CanonicalHost::Name(name) => {
            match ctx.dns.resolve(&ctx.shared.resolver, name, s.resolve).await {
                Ok(ips) => ips,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err(gateway_timeout(format!(
                        "resolving {name} took over {} ms",
                        s.resolve.as_millis()
                    )));
                }
                Err(e) => return Err(target_unreachable(format!("{name} does not resolve: {e}"))),
            }
        }
    };
    let bind = node.bind;
    let same_family = |ip: &IpAddr| bind.is_none_or(|b| b.is_ipv4() == ip.is_ipv4());
    let mut blocked = None;
    let mut chosen = None;
    for ip in ips.iter().filter(|ip| same_family(ip)) {
        match policy.targets.check_ip(*ip, port) {
            Ok(()) => {
                chosen = Some(*ip);
                break;
            }
            Err(rej) => blocked = Some(rej),
        }
    }
    let Some(ip) = chosen else {
        return Err(match blocked {
            Some(rej) => DialFailure::Answer(rej),
            None => target_unreachable(format!(
                "{} has no address this node can reach",
                host_text(target)
            )),
        });
    };
    let addr = SocketAddr::new(ip, port);
    match timeout_at(Instant::now() + s.target, TcpStream::connect(addr, bind)).await {
        Ok(Ok(stream)) => Ok(Upstream {
            stream,
            leftover: Vec::new(),
        }),
        Ok(Err(e)) if overloaded(&e).is_some() => Err(overloaded(&e).expect("checked")),
        Ok(Err(e)) => match e.raw_os_error() {
            Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) | Some(libc::EINVAL) => Err(
                DialFailure::Node(format!("cannot use source address {bind:?}: {e}")),
            ),
            Some(libc::ETIMEDOUT) => Err(gateway_timeout(format!("{addr} did not answer in time"))),
            _ => Err(target_unreachable(format!("{addr}: {e}"))),
        },
        Err(_) => Err(gateway_timeout(format!(
            "{addr} did not answer within {} ms",
            s.target.as_millis()
        ))),
    }
}
