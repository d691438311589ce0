//! Reaching a target through a node, and reading the node's answer as the
//! contract's node table says: a node failure (the `onerror` policy decides),
//! `TARGET_UNREACHABLE`, `GATEWAY_TIMEOUT`, or an established tunnel.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use splicegate_addr::{Host, Target};
use splicegate_control::Code;
use splicegate_control::catalog::Rejection;
use splicegate_control::nodes::{Node, NodeKind};
use splicegate_control::policy::Policy;
use splicegate_proto::node::{Event, Handshake, MAX_ANSWER_HEAD, Outcome, Phase};
use splicegate_uring::{TcpStream, timeout_at};

use crate::ctx::Ctx;
use crate::io::{ReadError, read_message};

/// A connection to the target through a node.
#[derive(Debug)]
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

/// What a node's answer (read by the handshake machine) means for the
/// client: the one place node outcomes become codes (the table in
/// docs/errors.md, "What a node's answer means").
fn judge(node: &Node, outcome: Outcome, target_ms: u128) -> Result<(), DialFailure> {
    match outcome {
        Outcome::Established => Ok(()),
        Outcome::TargetRefused(answer) => Err(target_unreachable(format!(
            "the target refused or does not exist (node {} {answer})",
            node.id
        ))),
        Outcome::TargetTimeout(Some(answer)) => Err(gateway_timeout(format!(
            "the target did not answer in time (node {} {answer})",
            node.id
        ))),
        Outcome::TargetTimeout(None) => Err(gateway_timeout(format!(
            "the target did not answer within {target_ms} ms"
        ))),
        Outcome::NodeFault(why) => Err(DialFailure::Node(why)),
    }
}

/// One attempt through one node.
pub(crate) async fn dial(
    ctx: &Ctx,
    policy: &Policy,
    node: &Node,
    target: &Target,
) -> Result<Upstream, DialFailure> {
    let s = &ctx.shared.settings;
    let creds = node.credentials.as_ref().map(|(u, p)| (&**u, &**p));
    let hs = match node.kind {
        NodeKind::Direct => return dial_direct(ctx, policy, node.bind, target).await,
        NodeKind::Agent => return dial_agent(ctx, node, target).await,
        NodeKind::Http => Handshake::http(target, creds),
        NodeKind::Socks5 => Handshake::socks5(target, creds),
    };
    let node_deadline = Instant::now() + s.node_connect;
    let stream = connect_node(node, node_deadline).await?;
    let mut hs = hs;
    let (outcome, leftover) = drive(&stream, &mut hs, node_deadline, s.target).await;
    judge(node, outcome, s.target.as_millis())?;
    Ok(Upstream { stream, leftover })
}

/// Move a node handshake's bytes until it ends: sends what it has, waits for
/// the node's answer under the deadline of its phase (the node's own before
/// the target is asked, `target` from then on), and returns the outcome and
/// the bytes the node sent past its answer.
async fn drive(
    stream: &TcpStream,
    hs: &mut Handshake,
    node_deadline: Instant,
    target: std::time::Duration,
) -> (Outcome, Vec<u8>) {
    let mut out = Vec::with_capacity(300);
    let mut buf = Vec::with_capacity(1024);
    let mut target_deadline = None;
    loop {
        out.clear();
        hs.poll_transmit(&mut out);
        if !out.is_empty() {
            match timeout_at(node_deadline, stream.write_all(&out)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return (Outcome::NodeFault(format!("write: {e}")), buf),
                Err(_) => return (Outcome::NodeFault("write timed out".into()), buf),
            }
        }
        let deadline = match hs.phase() {
            Phase::Node => node_deadline,
            Phase::Target => *target_deadline.get_or_insert_with(|| Instant::now() + target),
        };
        let line_based = hs.reads_lines().then_some(MAX_ANSWER_HEAD);
        let read = read_message(stream, &mut buf, deadline, line_based, |b| {
            Ok::<_, std::convert::Infallible>(hs.handle_input(b))
        })
        .await;
        match read {
            Ok(Event::Continue { consumed }) => {
                buf.drain(..consumed);
            }
            Ok(Event::Done { outcome, consumed }) => {
                buf.drain(..consumed.min(buf.len()));
                return (outcome, buf);
            }
            Err(ReadError::Timeout { .. }) => return (hs.on_timeout(), buf),
            Err(ReadError::Closed { .. }) => return (hs.on_closed(), buf),
            Err(ReadError::Io(e)) => return (Outcome::NodeFault(format!("read: {e}")), buf),
            Err(ReadError::Parse(never)) => match never {},
        }
    }
}

/// A UDP association on a `socks5` node declared `udp = true`: its TCP
/// control connection (the association lives as long as it does) and its
/// relay address, or why the node failed.
pub(crate) async fn associate_socks5(
    ctx: &Ctx,
    node: &Node,
) -> Result<(TcpStream, std::net::SocketAddr), String> {
    let s = &ctx.shared.settings;
    let creds = node.credentials.as_ref().map(|(u, p)| (&**u, &**p));
    let mut hs = Handshake::socks5_udp(creds);
    let deadline = Instant::now() + s.node_connect;
    let stream = match connect_node(node, deadline).await {
        Ok(st) => st,
        Err(DialFailure::Node(why)) => return Err(why),
        Err(DialFailure::Answer(rej)) => return Err(rej.detail.to_string()),
    };
    // The node answers UDP ASSOCIATE itself: its own deadline throughout.
    let (outcome, _) = drive(&stream, &mut hs, deadline, s.node_connect).await;
    match outcome {
        Outcome::Established => {}
        Outcome::NodeFault(why) => return Err(why),
        other => return Err(format!("refused the association: {other:?}")),
    }
    let Some(bound) = hs.bound() else {
        return Err("named no relay address".into());
    };
    // 0.0.0.0 (or ::) means "the address you reached me on".
    let relay = if bound.ip().is_unspecified() {
        match node.addr {
            Some(a) => std::net::SocketAddr::new(a.ip(), bound.port()),
            None => return Err("has no address".into()),
        }
    } else {
        bound
    };
    Ok((stream, relay))
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

/// An `agent` node: a stream on the device's connection, opened on the
/// agent thread; the device connects to the target from its own network.
/// What it answers means what the node table says (SPEC section 10).
async fn dial_agent(ctx: &Ctx, node: &Node, target: &Target) -> Result<Upstream, DialFailure> {
    use crate::AgentAnswer;
    use splicegate_proto::agent::OpenError;
    let Some(agents) = &ctx.shared.agents else {
        return Err(DialFailure::Node(
            "this gateway takes no agents ([agents] is not configured)".into(),
        ));
    };
    let s = &ctx.shared.settings;
    let (tx, mut rx) = splicegate_uring::channel();
    agents.open(&node.id, target, tx);
    // The agent thread applies the node and target deadlines; this one only
    // guards against an answer that never comes.
    let deadline = Instant::now() + s.node_connect + s.target + std::time::Duration::from_secs(1);
    let answer = match timeout_at(deadline, rx.recv()).await {
        Ok(Some(a)) => a,
        Ok(None) | Err(_) => {
            return Err(DialFailure::Node(format!(
                "agent {} did not answer the stream",
                node.id
            )));
        }
    };
    let id = &node.id;
    match answer {
        AgentAnswer::Open(sock) => match TcpStream::from_unix(sock) {
            Ok(stream) => Ok(Upstream {
                stream,
                leftover: Vec::new(),
            }),
            Err(e) => {
                Err(overloaded(&e).unwrap_or_else(|| DialFailure::Node(format!("stream: {e}"))))
            }
        },
        AgentAnswer::Refused(OpenError::Refused | OpenError::Unresolved, text) => {
            Err(target_unreachable(format!(
                "the target refused or does not exist (agent {id}: {text})"
            )))
        }
        AgentAnswer::Refused(OpenError::Timeout, text) => Err(gateway_timeout(format!(
            "the target did not answer in time (agent {id}: {text})"
        ))),
        AgentAnswer::Refused(OpenError::Disallowed, text) => {
            Err(DialFailure::Answer(Rejection::new(
                Code::Disallowed,
                format!("the exit device refuses the target: {text}"),
            )))
        }
        AgentAnswer::Refused(OpenError::Capacity | OpenError::Fault, text) => {
            Err(DialFailure::Node(format!("agent {id}: {text}")))
        }
        AgentAnswer::NodeFault(text) => Err(DialFailure::Node(format!("agent {id}: {text}"))),
        AgentAnswer::Udp(_) => Err(DialFailure::Node(format!(
            "agent {id} answered a stream with an association"
        ))),
        AgentAnswer::TargetTimeout(text) => Err(gateway_timeout(format!(
            "the target did not answer within {} ms (agent {id}: {text})",
            s.target.as_millis()
        ))),
    }
}

/// A `direct` node: the gateway connects itself, from the node's source
/// address (`bind`), after resolving a name off the worker.
async fn dial_direct(
    ctx: &Ctx,
    policy: &Policy,
    bind: Option<IpAddr>,
    target: &Target,
) -> Result<Upstream, DialFailure> {
    let s = &ctx.shared.settings;
    let port = target.port;
    // A literal address is used where it lies (no list to allocate).
    let one;
    let resolved;
    let ips: &[IpAddr] = match &target.host {
        Host::Ip(ip) => {
            one = [*ip];
            &one
        }
        Host::Domain(name) => match ctx.dns.resolve(&ctx.shared.resolver, name, s.resolve).await {
            Ok(ips) => {
                resolved = ips;
                &resolved
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(gateway_timeout(format!(
                    "resolving {name} took over {} ms",
                    s.resolve.as_millis()
                )));
            }
            Err(e) => return Err(target_unreachable(format!("{name} does not resolve: {e}"))),
        },
    };
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
                target.host.bare()
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

#[cfg(test)]
mod tests {
    //! A node's answer, from its bytes to what the client meets, with no
    //! socket: the handshake machine reads scripted bytes, [`judge`] gives
    //! the code or a node failure, and a node failure goes to the route's
    //! `onerror` machine.

    use std::net::SocketAddr;

    use splicegate_addr::{Host, Target};
    use splicegate_control::decl::NodeFields;
    use splicegate_control::engine::Engine;
    use splicegate_control::geo::Country;
    use splicegate_control::nodes::{NodeDecl, NodeKind, Rng};
    use splicegate_control::policy::{
        Credentials, Declarations, Hello, PackageDecl, Policy, Protocol,
    };
    use splicegate_control::session::Step;
    use splicegate_control::{Code, Now};
    use splicegate_proto::node::{Event, Handshake, Outcome};

    use super::{DialFailure, judge};

    fn http_node(id: &str, port: u16) -> NodeDecl {
        let fields = NodeFields {
            id: Some(id.into()),
            kind: Some(NodeKind::Http),
            addr: Some(Some(SocketAddr::from(([127, 0, 1, 1], port)))),
            country: Some(Country::parse("us")),
            ..NodeFields::default()
        };
        fields.to_decl().unwrap()
    }

    fn target() -> Target {
        Target::new(Host::Domain("example.com".into()), 443)
    }

    /// What an HTTP node's scripted answer ends in.
    fn outcome(answer: &[u8]) -> Outcome {
        let mut hs = Handshake::http(&target(), None);
        hs.poll_transmit(&mut Vec::new());
        match hs.handle_input(answer) {
            Some(Event::Done { outcome, .. }) => outcome,
            other => panic!("no outcome from {answer:?}: {other:?}"),
        }
    }

    /// The client meets `Ok(code)` from the node's answer itself, or
    /// `Err(step)` from the `onerror` machine after a node failure.
    fn through(engine: &Engine, rules: &str, answer: &[u8]) -> Result<Code, Step> {
        let policy = engine.policy_arc();
        let hello = Hello {
            client_ip: "10.0.0.1".parse().unwrap(),
            credentials: Credentials::Present {
                username: &format!("package-7-{rules}"),
                password: "pk_7",
            },
            listener_package: None,
        };
        let auth = policy.authenticate(&hello).unwrap();
        let now = Now::from_secs(1);
        let adm = policy
            .admit(&auth, Protocol::Https, &target(), &mut None, now)
            .unwrap();
        let mut rng = Rng::new(3);
        let mut route = engine.route(&policy, &adm, now, &mut rng).unwrap();
        let node = policy.nodes.node(route.node()).clone();
        match judge(&node, outcome(answer), 5000) {
            Ok(()) => panic!("{answer:?} established a tunnel"),
            Err(DialFailure::Answer(rej)) => Ok(rej.code),
            Err(DialFailure::Node(_)) => {
                Err(engine.after_failure(&mut route, &mut rng, Now::from_secs(1)))
            }
        }
    }

    #[test]
    fn node_answers_reach_the_client_or_the_onerror_machine() {
        let mut package = PackageDecl::new(7, "pk_7");
        package.default_rules = "country-us".into();
        let decls = Declarations {
            orgs: vec![],
            packages: vec![package],
            nodes: vec![http_node("a", 8001), http_node("b", 8002)],
            geo: vec![],
            targets: Default::default(),
        };
        let e = Engine::new(Policy::build(&decls, None).unwrap(), 100);
        // The target's fault: the node is fine, onerror is not asked.
        assert_eq!(
            through(&e, "country-us", b"HTTP/1.1 502 Bad Gateway\r\n\r\n"),
            Ok(Code::TargetUnreachable)
        );
        assert_eq!(
            through(&e, "country-us", b"HTTP/1.1 504 Timeout\r\n\r\n"),
            Ok(Code::GatewayTimeout)
        );
        // The node's fault: onerror decides.
        let fault = b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n";
        match through(&e, "country-us-onerror-fail", fault) {
            Err(Step::Fail(rej)) => assert_eq!(rej.code, Code::NodeUnavailable),
            other => panic!("onerror-fail: {other:?}"),
        }
        assert!(
            matches!(
                through(&e, "country-us-onerror-replace", fault),
                Err(Step::Dial(_))
            ),
            "onerror-replace dials the other node"
        );
        assert!(
            matches!(
                through(&e, "country-us-onerror-retry_1", fault),
                Err(Step::Dial(_))
            ),
            "retry_1 dials again"
        );
        assert!(
            matches!(
                through(&e, "country-us", b"garbage\r\n\r\n"),
                Err(Step::Dial(_))
            ),
            "a malformed answer is a node failure; the default onerror replaces"
        );
    }
}
