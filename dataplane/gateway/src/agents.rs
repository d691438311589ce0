//! The gateway's side of agents (`[agents]`): the listener devices dial,
//! their authentication and enrolment, presence as node state, and the
//! streams the workers open through them.
//!
//! Everything here runs on one thread of its own ("splicegate-agents", a
//! tokio runtime): the link driver of `splicegate-agent`, the same code the
//! devices run. A worker that picks an agent node asks this thread for a
//! stream ([`Hub::open`]) and awaits the answer on its ring; the answer
//! carries one end of a Unix socket pair, the other end being the stream's
//! local side here. The worker then relays that socket like any node's
//! (splice, counters, caps, idle, half-close), and nothing of this thread
//! is locked on its byte path: the socket pair's kernel buffers are the
//! bounded channel between the two threads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use splicegate_addr::Target;
use splicegate_agent::link::{self, Config as LinkConfig, Link, Opened, Role};
use splicegate_control::engine::Engine;
use splicegate_control::guard::{Guard, Verdict};
use splicegate_control::nodes::NodeKind;
use splicegate_proto::agent::{Frame, Refusal, VERSION};
use splicegate_worker::{AgentAnswer, AgentDialer};
use tokio::net::TcpStream;

/// What `[agents]` sets.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub listen: SocketAddr,
    pub heartbeat: Duration,
    pub enrol_key: Option<String>,
    pub geoip: Option<Arc<crate::geoip::GeoIp>>,
    pub handshake: Duration,
    pub node_connect: Duration,
    pub target: Duration,
}

/// An agent past its hello: id, link, where it connected from, its
/// software, the key hash it proved, and the link task.
type Admitted = (
    String,
    Link,
    SocketAddr,
    String,
    Option<[u8; 32]>,
    tokio::task::JoinHandle<String>,
);

/// Handshakes (TLS and hello) in progress at once; past it new
/// connections are closed at once.
const MAX_PENDING: u64 = 4096;

struct Connected {
    link: Link,
    generation: u64,
    /// The key hash it proved; a new key (or a deleted node) ends the link.
    key_hash: Option<[u8; 32]>,
    /// Byte counts already copied to the node's presence.
    copied: Copied,
}

#[derive(Debug, Clone, Copy, Default)]
struct Copied {
    up: u64,
    down: u64,
}

/// The agent thread's state, shared with the workers (through
/// [`AgentDialer`]) and the main thread.
pub(crate) struct Hub {
    engine: Arc<Engine>,
    control: Option<Arc<splicegate_admin::Control>>,
    settings: Settings,
    tls: Arc<splicegate_tls::Acceptor>,
    /// Failed keys per source, on the agent port only (carrier NAT puts
    /// many devices behind one address: a ban here never touches the proxy
    /// ports).
    guard: Guard,
    links: Mutex<HashMap<Box<str>, Connected>>,
    pending: AtomicU64,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("settings", &self.settings.listen)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the agent thread, bound to `settings.listen`; returns the hub and
/// the address bound.
pub(crate) fn start(
    settings: Settings,
    tls: Arc<splicegate_tls::Acceptor>,
    engine: Arc<Engine>,
    control: Option<Arc<splicegate_admin::Control>>,
    guard: splicegate_control::guard::GuardConfig,
) -> Result<(Arc<Hub>, SocketAddr)> {
    let listener = std::net::TcpListener::bind(settings.listen)
        .with_context(|| format!("[agents] listening on {}", settings.listen))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("the agent thread's runtime")?;
    let hub = Arc::new(Hub {
        engine,
        control,
        settings,
        tls,
        guard: Guard::new(guard),
        links: Mutex::new(HashMap::new()),
        pending: AtomicU64::new(0),
        rt: rt.handle().clone(),
    });
    let h = hub.clone();
    std::thread::Builder::new()
        .name("splicegate-agents".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "the agent listener failed");
                        return;
                    }
                };
                tokio::spawn(h.clone().presence_loop());
                h.accept_loop(listener).await;
            });
        })?;
    tracing::info!(listen = %bound, "agents listening");
    Ok((hub, bound))
}

impl Hub {
    async fn accept_loop(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors: wait rather than spin.
                    tracing::warn!(error = %e, "accepting an agent");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let now = splicegate_worker::now();
            match self.guard.on_connect(peer.ip(), now) {
                Verdict::Pass => {}
                _ => continue,
            }
            if self.pending.fetch_add(1, Ordering::AcqRel) >= MAX_PENDING {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            let hub = self.clone();
            tokio::spawn(async move {
                // Boxed: the handshake's state (the TLS stream mid-handshake) is
                // freed once it is done instead of sizing this task for the
                // connection's whole life.
                let admitted = Box::pin(hub.admit(tcp, peer)).await;
                hub.pending.fetch_sub(1, Ordering::AcqRel);
                if let Some(a) = admitted {
                    hub.run(a).await;
                }
            });
        }
    }

    /// TLS, the hello, and the answer; `None` when the agent was refused or failed.
    async fn admit(&self, tcp: TcpStream, peer: SocketAddr) -> Option<Admitted> {
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.config());
        let deadline = tokio::time::Instant::now() + self.settings.handshake;
        let mut tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "agent TLS handshake failed");
                return None;
            }
            Err(_) => {
                tracing::debug!(%peer, "agent TLS handshake timed out");
                return None;
            }
        };
        let mut buf = Vec::new();
        let hello =
            match tokio::time::timeout_at(deadline, link::read_frame(&mut tls, &mut buf)).await {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "an agent's hello was unreadable");
                    let _ = refuse(
                        &mut tls,
                        Refusal::Malformed,
                        &format!("unreadable hello: {e}"),
                    )
                    .await;
                    return None;
                }
                Err(_) => {
                    tracing::debug!(%peer, "no hello in time");
                    return None;
                }
            };
        let (version, fields) = match splicegate_proto::agent::decode(&hello) {
            Ok(Some((Frame::Hello { version, fields }, _))) => (version, fields),
            _ => {
                let _ = refuse(
                    &mut tls,
                    Refusal::Malformed,
                    "the first frame must be a hello",
                )
                .await;
                return None;
            }
        };
        if version != VERSION {
            let text = format!(
                "this gateway speaks agent protocol version {VERSION}; the agent speaks {version}"
            );
            tracing::warn!(%peer, "{text}");
            let _ = refuse(&mut tls, Refusal::Version, &text).await;
            return None;
        }
        let id = fields.get("id").unwrap_or_default().to_string();
        let software = fields.get("software").unwrap_or("unknown").to_string();
        let now = splicegate_worker::now();
        let mut issued = None;
        if let Some(key) = fields.get("key") {
            let policy = self.engine.policy();
            let ok = matches!(
                policy.nodes.get(&id),
                Some((_, n)) if n.kind == NodeKind::Agent && !n.is_removed() && n.agent_key_matches(key)
            );
            if !ok {
                self.failed(peer, &id, now);
                let _ = refuse(&mut tls, Refusal::Key, "unknown node id or wrong key").await;
                return None;
            }
        } else if let Some(secret) = fields.get("enrol_key") {
            let right = self
                .settings
                .enrol_key
                .as_deref()
                .is_some_and(|k| constant_time_eq(k.as_bytes(), secret.as_bytes()));
            if !right {
                self.failed(peer, &id, now);
                let _ = refuse(&mut tls, Refusal::Key, "wrong enrolment secret").await;
                return None;
            }
            match self.enrol(&id, peer, &fields).await {
                Ok(key) => issued = Some(key),
                Err((reason, text)) => {
                    tracing::warn!(%peer, id, "enrolment refused: {text}");
                    let _ = refuse(&mut tls, reason, &text).await;
                    return None;
                }
            }
        } else {
            let _ = refuse(
                &mut tls,
                Refusal::Malformed,
                "the hello has no key or enrol_key",
            )
            .await;
            return None;
        }
        let key_hash = match self.engine.policy().nodes.get(&id) {
            Some((_, node)) => node.key_hash,
            None => {
                let _ = refuse(
                    &mut tls,
                    Refusal::Busy,
                    "the node is not in force yet; retry",
                )
                .await;
                return None;
            }
        };
        let hb = self.settings.heartbeat.as_secs().max(1).to_string();
        let mut pairs = vec![("heartbeat_s", hb.as_str()), ("node", id.as_str())];
        if let Some(k) = &issued {
            pairs.push(("key", k.as_str()));
        }
        let welcome = link::fields(&pairs);
        let sent = link::write_frame(
            &mut tls,
            Frame::Welcome {
                version: VERSION,
                fields: welcome.fields(),
            },
        )
        .await;
        if let Err(e) = sent {
            tracing::info!(%peer, id, error = %e, "the agent left during its welcome");
            return None;
        }
        let config = LinkConfig {
            role: Role::Gateway,
            heartbeat: self.settings.heartbeat,
            max_streams: usize::MAX,
            rate: None,
        };
        let (link, _incoming, task) = link::spawn(tls, buf, config);
        tracing::info!(%peer, id, software, "agent connected");
        Some((id, link, peer, software, key_hash, task))
    }

    fn failed(&self, peer: SocketAddr, id: &str, now: splicegate_control::Now) {
        tracing::warn!(%peer, id, "agent refused: wrong key");
        if let Some(ban) = self.guard.on_auth_failure(peer.ip(), now) {
            tracing::warn!(%peer, ban_s = ban.as_secs(), "banned from the agent port after repeated wrong keys");
        }
    }

    /// Self-enrolment: the node is created through the store, then waited
    /// for in the policy.
    async fn enrol(
        &self,
        id: &str,
        peer: SocketAddr,
        fields: &splicegate_proto::agent::Fields<'_>,
    ) -> Result<String, (Refusal, String)> {
        let Some(control) = self.control.clone() else {
            return Err((
                Refusal::Enrolment,
                "this gateway has no store ([admin]) to enrol devices in".into(),
            ));
        };
        let attrs: Vec<(String, String)> = ["country", "region", "city", "isp", "asn", "network"]
            .iter()
            .filter_map(|k| fields.get(k).map(|v| (k.to_string(), v.to_string())))
            .collect();
        // The databases' facts about the address win over what it announces.
        let attrs = match &self.settings.geoip {
            Some(g) => crate::geoip::merge(g.lookup(peer.ip()), attrs),
            None => attrs,
        };
        let id_owned = id.to_string();
        let made = tokio::task::spawn_blocking(move || control.enrol_agent(&id_owned, &attrs))
            .await
            .map_err(|e| (Refusal::Busy, format!("enrolment: {e}")))?;
        let key = made.map_err(enrol_refusal)?;
        // The node is in force once the policy that has it is published.
        let until = Instant::now() + Duration::from_secs(5);
        while self.engine.policy().nodes.get(id).is_none() {
            if Instant::now() > until {
                return Err((
                    Refusal::Busy,
                    "the new node did not come into force; retry".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(id, "device enrolled");
        Ok(key)
    }

    /// Serves a connected agent until its link ends.
    async fn run(&self, admitted: Admitted) {
        let (id, link, peer, software, key_hash, task) = admitted;
        // Registered before the node is marked present: a worker that sees
        // the node online always finds its link.
        let (replaced, generation) = {
            let mut links = lock(&self.links);
            let replaced = links.insert(
                id.clone().into_boxed_str(),
                Connected {
                    link: link.clone(),
                    generation: 0,
                    key_hash,
                    copied: Copied::default(),
                },
            );
            let policy = self.engine.policy();
            let generation = policy.nodes.get(&id).map_or(0, |(idx, _)| {
                policy
                    .nodes
                    .agent_up(idx, peer, &software, splicegate_worker::unix_ms())
            });
            if let Some(c) = links.get_mut(id.as_str()) {
                c.generation = generation;
            }
            (replaced, generation)
        };
        if generation == 0 {
            // The node was deleted (or changed kind) since the key check.
            lock(&self.links).remove(id.as_str());
            link.close("the node is gone").await;
            let _ = task.await;
            return;
        }
        if let Some(old) = replaced {
            // The device reconnected (its old connection may be half-dead):
            // the newest connection serves.
            old.link
                .close("replaced by a newer connection of the same agent")
                .await;
        }
        let why = task.await.unwrap_or_else(|e| format!("link task: {e}"));
        tracing::info!(id, "agent disconnected: {why}");
        let mut links = lock(&self.links);
        if links
            .get(id.as_str())
            .is_some_and(|c| c.generation == generation)
        {
            let c = links.remove(id.as_str()).expect("present");
            drop(links);
            self.copy_presence(&id, &c);
        } else {
            drop(links);
        }
        self.down(&id, generation);
    }

    fn down(&self, id: &str, generation: u64) {
        let policy = self.engine.policy();
        if let Some((idx, _)) = policy.nodes.get(id) {
            policy.nodes.agent_down(idx, generation);
        }
    }

    fn copy_presence(&self, id: &str, c: &Connected) -> Copied {
        let s = c.link.stats();
        let now = Copied {
            up: s.bytes_out.load(Ordering::Relaxed),
            down: s.bytes_in.load(Ordering::Relaxed),
        };
        let policy = self.engine.policy();
        if let Some((_, node)) = policy.nodes.get(id) {
            let p = node.runtime.agent();
            p.add_bytes(now.up - c.copied.up, now.down - c.copied.down);
            p.set_streams(s.streams.load(Ordering::Relaxed));
            p.set_rtt_us(s.rtt_us.load(Ordering::Relaxed));
        }
        now
    }

    /// Once a second: copies each link's figures to its node (the API and
    /// `/metrics` read them there), and ends the links whose node was
    /// deleted, is no longer an agent, or has a new key (the device must
    /// prove the new one).
    async fn presence_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let ids: Vec<Box<str>> = lock(&self.links).keys().cloned().collect();
            let mut ended = Vec::new();
            for id in ids {
                let mut links = lock(&self.links);
                let Some(c) = links.get_mut(&id) else {
                    continue;
                };
                c.copied = self.copy_presence(&id, c);
                let policy = self.engine.policy();
                let why = match policy.nodes.get(&id) {
                    None => Some("the node was deleted"),
                    Some((_, n)) if n.is_removed() => Some("the node was deleted"),
                    Some((_, n)) if n.kind != NodeKind::Agent => {
                        Some("the node is no longer an agent")
                    }
                    Some((_, n)) if n.key_hash != c.key_hash => Some("the node has a new key"),
                    Some(_) => None,
                };
                if let Some(why) = why {
                    ended.push((id.clone(), c.link.clone(), why));
                }
            }
            for (id, link, why) in ended {
                tracing::info!(id = %id, "closing the agent's connection: {why}");
                link.close(why).await;
            }
        }
    }

    /// Ends every agent connection (the gateway is stopping).
    pub(crate) fn stop(&self) {
        let links: Vec<Link> = lock(&self.links).values().map(|c| c.link.clone()).collect();
        for l in links {
            self.rt
                .spawn(async move { l.close("the gateway is stopping").await });
        }
    }
}

fn enrol_refusal(e: splicegate_admin::EnrolError) -> (Refusal, String) {
    use splicegate_admin::EnrolError;
    match e {
        e @ EnrolError::Taken(_) => (Refusal::Enrolment, e.to_string()),
        e @ EnrolError::Revoked(_) => (Refusal::Key, e.to_string()),
        EnrolError::Invalid(why) => (Refusal::Enrolment, why),
        EnrolError::Unavailable(why) => (Refusal::Busy, why),
    }
}

async fn refuse<S: tokio::io::AsyncWrite + Unpin>(
    io: &mut S,
    reason: Refusal,
    text: &str,
) -> std::io::Result<()> {
    link::write_frame(io, Frame::Refuse { reason, text }).await?;
    tokio::io::AsyncWriteExt::shutdown(io).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

impl AgentDialer for Hub {
    fn open_udp(&self, node: &str, reply: splicegate_uring::Sender<AgentAnswer>) {
        let link = lock(&self.links).get(node).map(|c| c.link.clone());
        let Some(link) = link else {
            let _ = reply.send(AgentAnswer::NodeFault("its agent is not connected".into()));
            return;
        };
        let node_connect = self.settings.node_connect;
        self.rt.spawn(async move {
            let sent = Instant::now();
            let opener = link.clone();
            let opening = opener.open_udp();
            tokio::pin!(opening);
            let answer = match tokio::time::timeout(node_connect, &mut opening).await {
                Ok(a) => a,
                Err(_) if !link.stats().heard_since(sent) => {
                    let _ = reply.send(AgentAnswer::NodeFault(format!(
                        "the device said nothing within {} ms",
                        node_connect.as_millis()
                    )));
                    return;
                }
                // Alive but slow to open a socket: give it the same again.
                Err(_) => match tokio::time::timeout(node_connect, &mut opening).await {
                    Ok(a) => a,
                    Err(_) => {
                        let _ = reply.send(AgentAnswer::NodeFault(
                            "the device did not open the association in time".into(),
                        ));
                        return;
                    }
                },
            };
            let assoc = match answer {
                Ok(a) => a,
                Err(Opened::Failed(reason, text)) => {
                    let _ = reply.send(AgentAnswer::Refused(reason, text));
                    return;
                }
                Err(Opened::Gone(why)) => {
                    let _ = reply.send(AgentAnswer::NodeFault(format!(
                        "the agent went away: {why}"
                    )));
                    return;
                }
                Err(Opened::Ok) => return,
            };
            let pair = std::os::unix::net::UnixDatagram::pair().and_then(|(ours, theirs)| {
                theirs.set_nonblocking(true)?;
                Ok((ours, tokio::net::UnixDatagram::from_std(theirs)?))
            });
            match pair {
                Ok((ours, theirs)) => {
                    if reply.send(AgentAnswer::Udp(ours)).is_ok() {
                        bridge_udp(link, assoc, theirs).await;
                    } else {
                        link.close_udp(assoc.stream).await;
                    }
                }
                Err(e) => {
                    link.close_udp(assoc.stream).await;
                    let _ = reply.send(AgentAnswer::NodeFault(format!("socket pair: {e}")));
                }
            }
        });
    }

    fn open(&self, node: &str, target: &Target, reply: splicegate_uring::Sender<AgentAnswer>) {
        let link = lock(&self.links).get(node).map(|c| c.link.clone());
        let Some(link) = link else {
            let _ = reply.send(AgentAnswer::NodeFault("its agent is not connected".into()));
            return;
        };
        let (ours, theirs) = match std::os::unix::net::UnixStream::pair() {
            Ok(p) => p,
            Err(e) => {
                let _ = reply.send(AgentAnswer::NodeFault(format!("socket pair: {e}")));
                return;
            }
        };
        let target = target.to_string();
        let node_connect = self.settings.node_connect;
        let target_wait = self.settings.target;
        self.rt.spawn(async move {
            let answer = open_stream(&link, &target, theirs, node_connect, target_wait)
                .await
                .map(|()| AgentAnswer::Open(ours));
            let _ = reply.send(answer.unwrap_or_else(|a| a));
        });
    }
}

/// Bridges one UDP association: messages from the worker's end of the
/// socket pair go out as `DATAGRAM` frames, the device's come back; an
/// empty message, from either side, ends it.
async fn bridge_udp(
    link: Link,
    mut assoc: splicegate_agent::link::UdpAssociation,
    local: tokio::net::UnixDatagram,
) {
    let mut buf = vec![0u8; splicegate_proto::agent::MAX_DATAGRAM_FRAME + 1];
    loop {
        tokio::select! {
            r = local.recv(&mut buf) => match r {
                Ok(n) if n > 0 => {
                    // Dropped when the link cannot take it now: UDP's promise.
                    link.send_datagram(assoc.stream, &buf[..n]);
                }
                _ => break,
            },
            m = assoc.rx.recv() => match m {
                Some(p) => {
                    let _ = local.try_send(&p);
                }
                None => {
                    // The link or the device ended it: tell the worker.
                    let _ = local.try_send(&[]);
                    return;
                }
            },
        }
    }
    link.close_udp(assoc.stream).await;
}

/// Opens a stream whose local side is `local`, under the node deadline (the
/// device must say anything at all within `node_connect`) and the target
/// deadline (it must have connected within `target`).
async fn open_stream(
    link: &Link,
    target: &str,
    local: std::os::unix::net::UnixStream,
    node_connect: Duration,
    target_wait: Duration,
) -> Result<(), AgentAnswer> {
    let fault = |e: std::io::Error| AgentAnswer::NodeFault(format!("socket pair: {e}"));
    local.set_nonblocking(true).map_err(fault)?;
    let local = tokio::net::UnixStream::from_std(local).map_err(fault)?;
    let (r, w) = local.into_split();
    let sent = Instant::now();
    let opening = link.open(target, r, w);
    tokio::pin!(opening);
    let first = tokio::select! {
        a = &mut opening => Some(a),
        _ = tokio::time::sleep(node_connect) => None,
    };
    let answer = match first {
        Some(a) => a,
        None if !link.stats().heard_since(sent) => {
            return Err(AgentAnswer::NodeFault(format!(
                "the device said nothing within {} ms",
                node_connect.as_millis()
            )));
        }
        None => {
            let left = target_wait.saturating_sub(sent.elapsed());
            match tokio::time::timeout(left, &mut opening).await {
                Ok(a) => a,
                Err(_) => {
                    return Err(AgentAnswer::TargetTimeout(
                        "the device did not connect in time".into(),
                    ));
                }
            }
        }
    };
    match answer {
        Opened::Ok => Ok(()),
        Opened::Failed(reason, text) => Err(AgentAnswer::Refused(reason, text)),
        Opened::Gone(why) => Err(AgentAnswer::NodeFault(format!(
            "the agent went away: {why}"
        ))),
    }
}
