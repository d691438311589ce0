//! SOCKS5 UDP ASSOCIATE (RFC 1928 section 7, SPEC section 12) on the
//! worker: the association's two sockets live on the ring beside its TCP
//! connection, and one task relays datagrams between the client and the
//! exit until the TCP connection closes, `udp_idle_s` passes without a
//! datagram either way, or the 250 ms tick stops it (package paused, over
//! its cap, out of credits).
//!
//! - The client's side: a socket of the association's own on the local
//!   address of its TCP connection (the reply's BND.PORT; BND.ADDR is
//!   `[proxy] udp_advertise` when set). Only datagrams from the client's
//!   address are taken — its IP from the start, its port from its first
//!   datagram on — the rest are dropped as strangers.
//! - The exit's side: for a `direct` node, a socket bound to the node's
//!   source address; datagrams go out from it, and answers from the
//!   addresses the client sent to (no others: a port restricted cone) are
//!   returned to the client with the RFC's header naming their sender. An
//!   agent's device does the same on its own socket; an upstream SOCKS5
//!   node gets the datagrams with their header, from and to its relay.
//! - Each datagram's target is checked as a CONNECT's is (names resolved
//!   off the worker, with the cache); a blocked one is dropped and counted,
//!   as are fragments (FRAG ≠ 0), malformed headers and datagrams a full
//!   socket buffer cannot take. Payload bytes count as traffic.
//! - A turn takes at most [`BATCH`] datagrams each way, so a flood from
//!   one client never starves the other tasks of its worker.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use splicegate_addr::Host;
use splicegate_control::Code;
use splicegate_control::catalog::Rejection;
use splicegate_control::nodes::{Node, NodeKind};
use splicegate_control::policy::{Authenticated, Policy, Protocol};
use splicegate_control::session::Step;
use splicegate_control::stats::{
    UDP_DROP_BLOCKED, UDP_DROP_FRAGMENT, UDP_DROP_FULL, UDP_DROP_MALFORMED, UDP_DROP_OVERSIZED,
    UDP_DROP_STRANGER, UDP_DROP_UNREACHABLE, UDP_DROP_UNSOLICITED,
};
use splicegate_proto::socks5::{reply, server};
use splicegate_uring::{Direction, RelayCtl, UdpSocket, UnixDatagram};

use crate::admission::{Gate, Refusal};
use crate::client::{Client, Stream};
use crate::ctx::Ctx;
use crate::{WorkerStats, clock};

/// Datagrams taken each way per turn.
const BATCH: usize = 64;

/// Largest UDP payload (and so any datagram) the relay takes.
const MAX_DATAGRAM: usize = 65_535;

/// The exit of an association.
enum Exit {
    /// A socket on a `direct` node's source address.
    Direct(UdpSocket),
    /// An association on an agent's device, through the agent thread: each
    /// message is a `DATAGRAM` payload; an empty one ends it.
    Agent(UnixDatagram),
    /// An association on an upstream SOCKS5 node: datagrams keep their RFC
    /// 1928 header both ways, to and from the node's relay address; the
    /// association lives as long as the control connection.
    Socks5 {
        control: splicegate_uring::TcpStream,
        sock: UdpSocket,
        relay: SocketAddr,
    },
}

impl Exit {
    async fn readable(&self) -> std::io::Result<()> {
        match self {
            Exit::Direct(s) => s.readable().await,
            Exit::Agent(s) => s.readable().await,
            Exit::Socks5 { sock, .. } => sock.readable().await,
        }
    }

    /// Completes when the exit's own control connection has something to
    /// say (its end); never for exits without one.
    async fn control(&self) -> std::io::Result<()> {
        match self {
            Exit::Socks5 { control, .. } => control.readable().await,
            _ => std::future::pending().await,
        }
    }
}

impl Drop for Exit {
    fn drop(&mut self) {
        // Tell the agent thread the association is over.
        if let Exit::Agent(s) = self {
            let _ = s.try_send(&[]);
        }
    }
}

/// Opens the exit for `node`, or says why the node failed.
async fn open_exit(ctx: &Ctx, node: &Node) -> Result<Exit, String> {
    match node.kind {
        NodeKind::Direct => {
            let Some(bind) = node.bind else {
                return Err("has no source address".into());
            };
            UdpSocket::bind(SocketAddr::new(bind, 0))
                .map(Exit::Direct)
                .map_err(|e| format!("cannot use source address {bind} for UDP: {e}"))
        }
        NodeKind::Agent => {
            let Some(agents) = &ctx.shared.agents else {
                return Err("this gateway takes no agents ([agents] is not configured)".into());
            };
            let (tx, mut rx) = splicegate_uring::channel();
            agents.open_udp(&node.id, tx);
            let wait = ctx.shared.settings.node_connect + std::time::Duration::from_secs(1);
            match splicegate_uring::timeout(wait, rx.recv()).await {
                Ok(Some(crate::AgentAnswer::Udp(sock))) => UnixDatagram::from_std(sock)
                    .map(Exit::Agent)
                    .map_err(|e| format!("association socket: {e}")),
                Ok(Some(
                    crate::AgentAnswer::Refused(_, text) | crate::AgentAnswer::NodeFault(text),
                )) => Err(format!("agent {}: {text}", node.id)),
                Ok(Some(_)) => Err(format!("agent {}: an unexpected answer", node.id)),
                Ok(None) | Err(_) => {
                    Err(format!("agent {} did not answer the association", node.id))
                }
            }
        }
        NodeKind::Socks5 if node.udp => {
            let (control, relay) = crate::dial::associate_socks5(ctx, node).await?;
            let any: IpAddr = if relay.is_ipv4() {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            };
            let sock = UdpSocket::bind(SocketAddr::new(any, 0))
                .map_err(|e| format!("no UDP socket towards the node: {e}"))?;
            Ok(Exit::Socks5 {
                control,
                sock,
                relay,
            })
        }
        _ => Err(format!("a {} node carries no UDP", node.kind.as_str())),
    }
}

fn no_udp_node(detail: String) -> Rejection {
    Rejection::new(Code::NodeNotFound, detail)
}

/// Whether a direct exit's socket, bound to `local` (read once when the
/// association starts: a `getsockname` per datagram cost about 4 % of a
/// relay's CPU), can send to `ip` (its family).
fn reachable(local: Option<SocketAddr>, ip: IpAddr) -> bool {
    local.is_some_and(|a| a.is_ipv6() || ip.is_ipv4())
}

/// Serves one `UDP ASSOCIATE` after authentication; returns when the
/// association ends (the reply and any refusal are written here).
pub(crate) async fn associate(
    ctx: &Ctx,
    client: Client,
    peer: SocketAddr,
    gate: &Gate,
    auth: &Authenticated<'_>,
    started: Instant,
) {
    let refuse = |rejection: Rejection| Refusal {
        package: Some(auth.package.id()),
        rejection,
    };
    let local = match &client {
        Client::Plain(tcp) => tcp.local_addr(),
        Client::Tls(tls) => tls.tcp().local_addr(),
    };
    let Ok(local) = local else { return };
    // Checks 6–9 and the node; an association is one request and one
    // open connection of its package.
    let mut conn = None;
    let now = clock::now();
    let policy = gate.policy.clone();
    let admitted = policy
        .admit_association(auth, &mut conn, now)
        .map_err(refuse);
    let admitted = match admitted {
        Ok(a) => crate::admission::share_session(ctx, &policy, &a)
            .await
            .map(|()| a)
            .map_err(refuse),
        Err(r) => Err(r),
    };
    let route = admitted.and_then(|a| {
        ctx.shared
            .engine
            .route(&policy, &a, clock::now(), &mut ctx.rng.borrow_mut())
            .map(|r| (a, r))
            .map_err(refuse)
    });
    let (admitted, mut route) = match route {
        Ok(x) => x,
        Err(refusal) => return crate::socks::refuse(ctx, &client, peer, &refusal).await,
    };
    let engine = &ctx.shared.engine;
    let mut step = engine.first_step(&mut route, &mut ctx.rng.borrow_mut());
    let (node, exit) = loop {
        let idx = match step {
            Step::Fail(rej) => return crate::socks::refuse(ctx, &client, peer, &refuse(rej)).await,
            Step::Dial(idx) => idx,
        };
        let node = route.policy.nodes.node(idx).clone();
        if !node.udp {
            // A session keeps its node; one that cannot carry UDP cannot
            // serve an association.
            let rej = no_udp_node(format!(
                "the session's node {} ({}) cannot carry UDP; the session keeps its node",
                node.id,
                node.kind.as_str()
            ));
            return crate::socks::refuse(ctx, &client, peer, &refuse(rej)).await;
        }
        match open_exit(ctx, &node).await {
            Ok(exit) => break (node, exit),
            Err(why) => {
                tracing::info!(node = %node.id, reason = %why, "node failure (UDP)");
                step = engine.after_failure(&mut route, &mut ctx.rng.borrow_mut(), clock::now());
            }
        }
    };
    // The client's side, on the address its TCP connection came to.
    let near = match UdpSocket::bind(SocketAddr::new(local.ip(), 0)) {
        Ok(s) => s,
        Err(e) => {
            let rej = Rejection::new(
                Code::Overloaded,
                format!("no UDP socket for the association: {e}"),
            );
            return crate::socks::refuse(ctx, &client, peer, &refuse(rej)).await;
        }
    };
    let Ok(near_addr) = near.local_addr() else {
        return;
    };
    let advertised = SocketAddr::new(
        ctx.shared.settings.udp_advertise.unwrap_or(near_addr.ip()),
        near_addr.port(),
    );
    let mut out = Vec::with_capacity(32);
    server::write_reply(reply::SUCCEEDED, Some(advertised), &mut out);
    if client.write_all(&out).await.is_err() {
        return;
    }
    engine.established(&route, clock::now());
    crate::admission::announce_move(ctx, &route, &node);
    ctx.stats.answer(Protocol::Socks5, None);
    ctx.stats.setup.observe(started.elapsed());
    let _load = node.runtime.open_tunnel();
    WorkerStats::inc(&ctx.stats.open_tunnels);
    let ctl = RelayCtl::new();
    let id = ctx.tunnels.register(admitted.package.clone(), ctl.clone());
    let mut relay = Relay {
        ctx,
        policy: &route.policy,
        peer_ip: peer.ip(),
        client_addr: None,
        near: &near,
        exit: &exit,
        exit_local: match &exit {
            Exit::Direct(sock) => sock.local_addr().ok(),
            _ => None,
        },
        ctl: &ctl,
        gone: false,
        contacted: std::collections::HashSet::new(),
    };
    let end = relay.run(&client).await;
    ctx.tunnels.finish(id, &ctx.stats);
    WorkerStats::dec(&ctx.stats.open_tunnels);
    drop(conn);
    tracing::debug!(package = admitted.package.id(), node = %node.id, up = ctl.a_to_b(), down = ctl.b_to_a(), end, "UDP association closed");
    ctx.log(&crate::ctx::Outcome {
        peer,
        package: Some(admitted.package.id()),
        protocol: Protocol::Socks5,
        target: None,
        node: Some(&node.id),
        error: None,
        up: ctl.a_to_b(),
        down: ctl.b_to_a(),
        started,
        setup: None,
    });
}

/// Slots one `recvmmsg` fills: a turn takes [`BATCH`] datagrams in
/// batches of this many.
const SLOTS: usize = 16;

/// One slot: room for any datagram, after [`HEADROOM`] bytes for the
/// header an answer gets in front of it.
const SLOT: usize = HEADROOM + MAX_DATAGRAM + 300;

/// Where an exit's answer is received in its slot: its header is then
/// written in front of it, in place.
const HEADROOM: usize = server::UDP_HEADER_MAX;

/// A turn's datagrams: [`SLOTS`] slots of [`SLOT`] bytes (1 MiB of address
/// space, touched only as far as datagrams fill it), what `recvmmsg` said
/// of each, and the datagrams to send with one `sendmmsg`.
pub(crate) struct Buffers {
    slots: Vec<u8>,
    got: Vec<(usize, SocketAddr)>,
    /// `(start, len, to)` in `slots`, and the payload bytes of each (what
    /// is counted as traffic once it is queued).
    sends: Vec<(usize, usize, SocketAddr)>,
    payloads: Vec<usize>,
    /// An agent's `DATAGRAM` payload being framed.
    out: Vec<u8>,
}

impl Buffers {
    fn new() -> Buffers {
        let unspecified = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0);
        Buffers {
            slots: vec![0u8; SLOTS * SLOT],
            got: vec![(0, unspecified); SLOTS],
            sends: Vec::with_capacity(SLOTS),
            payloads: Vec::with_capacity(SLOTS),
            out: Vec::new(),
        }
    }
}

/// Buffers lent from the worker's pool for one turn of one association,
/// given back on drop.
struct Lease<'a> {
    ctx: &'a Ctx,
    bufs: Option<Buffers>,
}

impl<'a> Lease<'a> {
    fn take(ctx: &'a Ctx) -> Lease<'a> {
        let bufs = ctx
            .udp_buffers
            .borrow_mut()
            .pop()
            .unwrap_or_else(Buffers::new);
        Lease {
            ctx,
            bufs: Some(bufs),
        }
    }

    fn bufs(&mut self) -> &mut Buffers {
        self.bufs.as_mut().expect("lent until dropped")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.bufs.take() {
            let mut pool = self.ctx.udp_buffers.borrow_mut();
            // A burst of resolutions in flight may have grown the pool;
            // keep a couple, not the burst.
            if pool.len() < 2 {
                pool.push(b);
            }
        }
    }
}

/// What woke the relay: a set of these bits (several waits can be ready
/// at one wake, and each is served in the same turn).
struct Wake;

impl Wake {
    const CONTROL: u8 = 1;
    const EXIT_CONTROL: u8 = 2;
    const NEAR: u8 = 4;
    const FAR: u8 = 8;
    const IDLE: u8 = 16;
    const STOP: u8 = 32;
}

struct Relay<'a> {
    ctx: &'a Ctx,
    policy: &'a Arc<Policy>,
    peer_ip: IpAddr,
    client_addr: Option<SocketAddr>,
    near: &'a UdpSocket,
    exit: &'a Exit,
    /// A direct exit's local address (its family says what it reaches).
    exit_local: Option<SocketAddr>,
    ctl: &'a RelayCtl,
    /// The agent thread ended the association (its agent went away).
    gone: bool,
    /// Where a direct exit sent (bounded): only these may answer.
    contacted: std::collections::HashSet<SocketAddr>,
}

/// Addresses an association remembers having sent to; past it the oldest
/// half is forgotten (a scan of thousands of targets answers only its
/// most recent ones).
const MAX_CONTACTED: usize = 4096;

impl Relay<'_> {
    fn drop_one(&self, reason: usize) {
        WorkerStats::inc(&self.ctx.stats.udp_dropped[reason]);
    }

    async fn run(&mut self, client: &Client) -> &'static str {
        let idle = self.ctx.shared.settings.udp_idle;
        let mut last_active = Instant::now();
        // The waits live across turns: only the one that fired is armed
        // again (a readiness poll on the ring is one SQE to arm and one to
        // cancel; re-arming all of them after every wake cost 3–13 % of the
        // datagrams per CPU-second, docs/PERFORMANCE.md), and the idle
        // timer moves only when it fires.
        let (near_sock, exit) = (self.near, self.exit);
        let mut control = std::pin::pin!(client.readable());
        let mut near = std::pin::pin!(near_sock.readable());
        let mut far = std::pin::pin!(exit.readable());
        let mut exit_control = std::pin::pin!(exit.control());
        let mut timer = splicegate_uring::sleep_until(last_active + idle);
        let ctl = self.ctl;
        loop {
            if ctl.is_stopped() {
                return "stopped";
            }
            let wake = std::future::poll_fn(|cx| {
                if ctl.is_stopped() {
                    return Poll::Ready(Wake::STOP);
                }
                ctl.wake_on_stop(cx.waker());
                let mut wake = 0;
                if control.as_mut().poll(cx).is_ready() {
                    wake |= Wake::CONTROL;
                }
                if near.as_mut().poll(cx).is_ready() {
                    wake |= Wake::NEAR;
                }
                if far.as_mut().poll(cx).is_ready() {
                    wake |= Wake::FAR;
                }
                if exit_control.as_mut().poll(cx).is_ready() {
                    wake |= Wake::EXIT_CONTROL;
                }
                if std::pin::Pin::new(&mut timer).poll(cx).is_ready() {
                    wake |= Wake::IDLE;
                }
                if wake == 0 {
                    Poll::Pending
                } else {
                    Poll::Ready(wake)
                }
            })
            .await;
            if wake & Wake::STOP != 0 {
                return "stopped";
            }
            if wake & Wake::CONTROL != 0 {
                // The TCP connection only keeps the association alive:
                // its end (or anything unexpected on it) ends it.
                let mut scratch = [0u8; 512];
                match client.read(&mut scratch).await {
                    Ok(0) | Err(_) => return "the client closed its TCP connection",
                    Ok(_) => {}
                }
                control.set(client.readable());
            }
            if wake & Wake::EXIT_CONTROL != 0 {
                if let Exit::Socks5 { control, .. } = exit {
                    let mut scratch = [0u8; 512];
                    match control.read(&mut scratch).await {
                        Ok(0) | Err(_) => return "the node ended the association",
                        Ok(_) => {}
                    }
                }
                exit_control.set(exit.control());
            }
            if wake & Wake::NEAR != 0 {
                let (relayed, taken) = self.relay_up().await;
                if relayed {
                    last_active = Instant::now();
                }
                self.gather_runs(taken);
                // Armed after the socket was read: a poll armed on a socket
                // still holding datagrams (the turn's cap was reached)
                // completes at once.
                near.set(near_sock.readable());
            }
            if wake & Wake::FAR != 0 {
                let (relayed, taken) = self.relay_down();
                if relayed {
                    last_active = Instant::now();
                }
                self.gather_runs(taken);
                if self.gone {
                    return "the agent ended the association";
                }
                far.set(exit.readable());
            }
            if wake & Wake::IDLE != 0 {
                let deadline = last_active + idle;
                if Instant::now() >= deadline {
                    return "idle";
                }
                timer.reset(deadline);
            }
            splicegate_uring::consume_budget().await;
        }
    }

    /// After a turn that took `taken` datagrams from one socket: several
    /// means they arrive in runs (a QUIC transfer, a burst), and the next
    /// run is gathered before the worker wakes — one wake, one `recvmmsg`
    /// and one GSO send for it rather than one each per datagram or two —
    /// for up to `[proxy] udp_gather_us`. A lone datagram (DNS, a game's
    /// tick) is never held, nor a socket the turn left datagrams on (it
    /// took [`BATCH`]): its poll completes at once, and waiting would only
    /// idle the worker.
    fn gather_runs(&self, taken: usize) {
        let gather = self.ctx.shared.settings.udp_gather;
        if (2..BATCH).contains(&taken) && !gather.is_zero() {
            splicegate_uring::gather_next_wait(gather);
        }
    }

    /// Queues `b.sends` on `sock` in order, with as few `sendmmsg` calls
    /// as the socket allows; one it cannot take is dropped and counted
    /// (`oversized` when it is too long for a datagram, `buffer_full`
    /// otherwise). Counts what was queued; whether anything was.
    fn flush(&self, sock: &UdpSocket, b: &mut Buffers, dir: Direction) -> bool {
        let (mut i, mut queued, mut bytes) = (0, 0u64, 0usize);
        while i < b.sends.len() {
            match sock.try_send_many(&b.slots, &b.sends[i..]) {
                Ok(k) if k > 0 => {
                    bytes += b.payloads[i..i + k].iter().sum::<usize>();
                    queued += k as u64;
                    i += k;
                }
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                    self.drop_one(UDP_DROP_OVERSIZED);
                    i += 1;
                }
                _ => {
                    self.drop_one(UDP_DROP_FULL);
                    i += 1;
                }
            }
        }
        b.sends.clear();
        b.payloads.clear();
        self.counted(dir, queued, bytes)
    }

    /// Counts `datagrams` relayed with `bytes` of payload in `dir` (once
    /// per batch: one atomic add, not one per datagram); whether any was.
    fn counted(&self, dir: Direction, datagrams: u64, bytes: usize) -> bool {
        if datagrams == 0 {
            return false;
        }
        self.ctl.count(dir, bytes);
        let i = match dir {
            Direction::AToB => 0,
            Direction::BToA => 1,
        };
        self.ctx.stats.udp_datagrams[i].fetch_add(datagrams, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Client → target: up to [`BATCH`] datagrams, taken [`SLOTS`] at a
    /// time with one `recvmmsg` and sent on with one `sendmmsg` (one
    /// message each to an agent). Whether any was relayed, and how many
    /// were taken.
    async fn relay_up(&mut self) -> (bool, usize) {
        let mut lease = Lease::take(self.ctx);
        let b = lease.bufs();
        let exit = self.exit;
        let mut relayed = false;
        let mut taken = 0;
        while taken < BATCH {
            let want = SLOTS.min(BATCH - taken);
            let k = match self
                .near
                .try_recv_many(&mut b.slots, SLOT, 0, &mut b.got[..want])
            {
                Ok(k) => k,
                Err(_) => break,
            };
            taken += k;
            let (mut to_agent, mut agent_bytes) = (0u64, 0usize);
            for i in 0..k {
                let (n, from) = b.got[i];
                let at = i * SLOT;
                if from.ip() != self.peer_ip || self.client_addr.is_some_and(|c| c != from) {
                    self.drop_one(UDP_DROP_STRANGER);
                    continue;
                }
                let d = match server::parse_udp_datagram(&b.slots[at..at + n]) {
                    Ok(d) => d,
                    Err(_) => {
                        self.drop_one(UDP_DROP_MALFORMED);
                        continue;
                    }
                };
                // The client's port is known from its first datagram on.
                self.client_addr.get_or_insert(from);
                if d.frag != 0 {
                    self.drop_one(UDP_DROP_FRAGMENT);
                    continue;
                }
                let payload_at = n - d.payload.len();
                match exit {
                    Exit::Direct(_) => {
                        let local = self.exit_local;
                        let port = d.target.port;
                        let ip = match &d.target.host {
                            Host::Ip(ip) => Some(*ip),
                            Host::Domain(name) => {
                                let name = name.clone();
                                let s = &self.ctx.shared.settings;
                                match self
                                    .ctx
                                    .dns
                                    .resolve(&self.ctx.shared.resolver, &name, s.resolve)
                                    .await
                                {
                                    Ok(ips) => ips.into_iter().find(|ip| reachable(local, *ip)),
                                    Err(_) => None,
                                }
                            }
                        };
                        let Some(ip) = ip.filter(|ip| reachable(local, *ip)) else {
                            self.drop_one(UDP_DROP_UNREACHABLE);
                            continue;
                        };
                        if self.policy.targets.check_ip(ip, port).is_err() {
                            self.drop_one(UDP_DROP_BLOCKED);
                            continue;
                        }
                        let to = SocketAddr::new(ip, port);
                        self.contact(to);
                        b.sends.push((at + payload_at, n - payload_at, to));
                        b.payloads.push(n - payload_at);
                    }
                    Exit::Socks5 { relay, .. } => {
                        // The node resolves names; the gateway judges what
                        // it can (ports, literal addresses), then forwards
                        // the datagram with its header as the client wrote it.
                        if self.policy.targets.check_target(&d.target).is_err() {
                            self.drop_one(UDP_DROP_BLOCKED);
                            continue;
                        }
                        b.sends.push((at, n, *relay));
                        b.payloads.push(n - payload_at);
                    }
                    Exit::Agent(sock) => {
                        // The device resolves names itself and refuses its
                        // own networks; what the gateway can judge (ports,
                        // literal addresses) it judges here.
                        if self.policy.targets.check_target(&d.target).is_err() {
                            self.drop_one(UDP_DROP_BLOCKED);
                            continue;
                        }
                        let addr = d.target.to_string();
                        let payload = &b.slots[at + payload_at..at + n];
                        if splicegate_proto::agent::datagram_len(&addr, payload).is_none() {
                            self.drop_one(UDP_DROP_MALFORMED);
                            continue;
                        }
                        b.out.clear();
                        splicegate_proto::agent::write_datagram_payload(&addr, payload, &mut b.out);
                        match sock.try_send(&b.out) {
                            Ok(_) => {
                                to_agent += 1;
                                agent_bytes += n - payload_at;
                            }
                            Err(_) => self.drop_one(UDP_DROP_FULL),
                        }
                    }
                }
            }
            relayed |= match exit {
                Exit::Direct(sock) | Exit::Socks5 { sock, .. } => {
                    self.flush(sock, b, Direction::AToB)
                }
                Exit::Agent(_) => self.counted(Direction::AToB, to_agent, agent_bytes),
            };
            if k < want {
                break;
            }
        }
        (relayed, taken)
    }

    /// Remembers that the client sent to `to` (so `to` may answer).
    fn contact(&mut self, to: SocketAddr) {
        if self.contacted.len() >= MAX_CONTACTED {
            self.contacted.clear();
        }
        self.contacted.insert(to);
    }

    /// Target → client: up to [`BATCH`] datagrams, each with the RFC's
    /// header naming its sender, written in place in front of it; taken
    /// [`SLOTS`] at a time (one `recvmmsg` from a socket) and sent with one
    /// `sendmmsg`. Whether any was relayed, and how many were taken.
    fn relay_down(&mut self) -> (bool, usize) {
        let mut lease = Lease::take(self.ctx);
        let b = lease.bufs();
        let exit = self.exit;
        let mut relayed = false;
        let mut taken = 0;
        while taken < BATCH {
            let want = SLOTS.min(BATCH - taken);
            let k = match exit {
                Exit::Direct(sock) => {
                    match sock.try_recv_many(&mut b.slots, SLOT, HEADROOM, &mut b.got[..want]) {
                        Ok(k) => k,
                        Err(_) => break,
                    }
                }
                Exit::Socks5 { sock, .. } => {
                    match sock.try_recv_many(&mut b.slots, SLOT, 0, &mut b.got[..want]) {
                        Ok(k) => k,
                        Err(_) => break,
                    }
                }
                Exit::Agent(sock) => {
                    let mut k = 0;
                    while k < want {
                        match sock.try_recv(&mut b.slots[k * SLOT..(k + 1) * SLOT]) {
                            Ok(0) => {
                                self.gone = true;
                                break;
                            }
                            Ok(n) => {
                                b.got[k].0 = n;
                                k += 1;
                            }
                            Err(_) => break,
                        }
                    }
                    k
                }
            };
            taken += k;
            for i in 0..k {
                let (n, from) = b.got[i];
                let at = i * SLOT;
                match exit {
                    Exit::Direct(_) => {
                        // Answers only from where the client went (a port
                        // restricted cone): anyone else spraying the exit's
                        // port never reaches the client.
                        if !self.contacted.contains(&from) {
                            self.drop_one(UDP_DROP_UNSOLICITED);
                            continue;
                        }
                        let Some(client) = self.client_addr else {
                            // Nothing was sent yet: nobody to answer.
                            self.drop_one(UDP_DROP_UNSOLICITED);
                            continue;
                        };
                        let (header, len) = server::udp_header(from);
                        let start = at + HEADROOM - len;
                        b.slots[start..at + HEADROOM].copy_from_slice(&header[..len]);
                        b.sends.push((start, len + n, client));
                        b.payloads.push(n);
                    }
                    Exit::Socks5 { relay, .. } => {
                        if from != *relay {
                            self.drop_one(UDP_DROP_UNSOLICITED);
                            continue;
                        }
                        // The node's datagram already has the client's
                        // format: check it, count its payload, pass it on
                        // whole.
                        let payload = match server::parse_udp_datagram(&b.slots[at..at + n]) {
                            Ok(d) if d.frag == 0 => d.payload.len(),
                            _ => {
                                self.drop_one(UDP_DROP_MALFORMED);
                                continue;
                            }
                        };
                        let Some(client) = self.client_addr else {
                            self.drop_one(UDP_DROP_UNSOLICITED);
                            continue;
                        };
                        b.sends.push((at, n, client));
                        b.payloads.push(payload);
                    }
                    Exit::Agent(_) => {
                        let Some((addr, bytes)) =
                            splicegate_proto::agent::split_datagram(&b.slots[at..at + n])
                        else {
                            continue;
                        };
                        let Ok(from) = addr.parse::<SocketAddr>() else {
                            continue;
                        };
                        let Some(client) = self.client_addr else {
                            self.drop_one(UDP_DROP_UNSOLICITED);
                            continue;
                        };
                        // The header goes in front of the bytes, which move
                        // to just behind it.
                        let (header, len) = server::udp_header(from);
                        let (from_at, bytes_len) = (at + n - bytes.len(), bytes.len());
                        b.slots.copy_within(from_at..from_at + bytes_len, at + len);
                        b.slots[at..at + len].copy_from_slice(&header[..len]);
                        b.sends.push((at, len + bytes_len, client));
                        b.payloads.push(bytes_len);
                    }
                }
            }
            relayed |= self.flush(self.near, b, Direction::BToA);
            if self.gone || k < want {
                break;
            }
        }
        (relayed, taken)
    }
}
