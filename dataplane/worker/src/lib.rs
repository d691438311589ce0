//! The splicegate worker: one per core, each with its own io_uring and its
//! own `SO_REUSEPORT` listeners. A connection lives and dies on one worker:
//! accept → detect the protocol by its first byte → read the handshake →
//! ask the control plane (authenticate, admit, route) → dial the node →
//! answer → relay with splice → close.
//!
//! Invariants: no lock is shared on the byte path (the policy is an
//! `arc-swap` snapshot, counters are per tunnel and flushed to the package's
//! atomics every 250 ms); the only blocking work (name resolution) runs on
//! resolver threads; every wait has a deadline. No unsafe code: the runtime
//! crate holds it.
#![forbid(unsafe_code)]

mod accept;
mod admission;
mod bufs;
mod client;
mod clock;
mod ctx;
mod dial;
mod http;
mod io;
mod resolve;
mod socks;
mod tunnels;
mod udp;
mod upstreams;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use splicegate_control::engine::Engine;

pub use clock::{now, unix_ms};
pub use resolve::Resolver;

/// Timeouts and sizes the worker applies.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A client must finish its request head or SOCKS5 handshake within this.
    pub handshake: Duration,
    /// Connecting to a node (and its handshake before the target is asked).
    pub node_connect: Duration,
    /// The target answering after the node accepted (→ `GATEWAY_TIMEOUT`).
    pub target: Duration,
    /// An open tunnel or keep-alive connection with no byte moving.
    pub idle: Duration,
    /// Resolving a target name for a `direct` node.
    pub resolve: Duration,
    /// Head size limits.
    pub limits: splicegate_proto::http::Limits,
    /// A SOCKS5 UDP association with no datagram either way ends after this.
    pub udp_idle: Duration,
    /// The address a UDP ASSOCIATE reply names (`[proxy] udp_advertise`);
    /// default: the local address of the client's TCP connection.
    pub udp_advertise: Option<std::net::IpAddr>,
    /// While an association's datagrams arrive in runs, its worker gathers
    /// completions for up to this long before waking (`[proxy]
    /// udp_gather_us`); zero: never.
    pub udp_gather: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            handshake: Duration::from_secs(10),
            node_connect: Duration::from_secs(3),
            target: Duration::from_secs(10),
            idle: Duration::from_secs(300),
            resolve: Duration::from_secs(2),
            limits: splicegate_proto::http::Limits::default(),
            udp_idle: Duration::from_secs(300),
            udp_advertise: None,
            udp_gather: Duration::from_micros(50),
        }
    }
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// The package the port is bound to, if any.
    pub package: Option<u64>,
    /// Admit only addresses on that package's allowlist.
    pub ip_only: bool,
    /// Admit only TLS: cleartext HTTP gets 400, cleartext SOCKS5 0xFF.
    pub tls_only: bool,
    /// Every connection starts with a PROXY protocol header (v1 or v2, from
    /// a load balancer): its source address is the client's for everything
    /// (authentication, allowlists, `ip_only`, per-source rates and bans,
    /// logs). A connection without a valid header is closed.
    pub proxy_protocol: bool,
}

pub use splicegate_control::stats::{LatencyHistogram, OK, SETUP_BUCKETS_US, WorkerStats};

/// Where access-log lines go: a bounded queue the control side drains, so a
/// slow disk never stalls a worker (lines are dropped and counted instead).
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: crossbeam_channel::Sender<String>,
}

impl AccessLog {
    /// A log and the receiving end for the writer.
    pub fn new(capacity: usize) -> (AccessLog, crossbeam_channel::Receiver<String>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        (AccessLog { tx }, rx)
    }

    fn send(&self, line: String, stats: &WorkerStats) {
        if self.tx.try_send(line).is_err() {
            WorkerStats::inc(&stats.access_dropped);
        }
    }
}

/// What every worker shares.
pub struct Shared {
    /// Policy, sessions, recent errors.
    pub engine: Arc<Engine>,
    /// Worker settings.
    pub settings: Settings,
    /// Name resolution off the worker threads.
    pub resolver: Resolver,
    /// The access log, when enabled.
    pub access_log: Option<AccessLog>,
    /// Per-source rate limits and bans (counts authentication failures always;
    /// refuses connections itself only when `guard_at_accept`).
    pub guard: Arc<splicegate_control::guard::Guard>,
    /// Whether the workers apply the guard at accept (no kernel programs).
    pub guard_at_accept: bool,
    /// Told of every new ban, to drop the source in the kernel too.
    pub ban_sink: Option<BanSink>,
    /// TLS to the proxy ports (`[tls]`); without it a ClientHello gets a
    /// handshake_failure alert.
    pub tls: Option<Arc<splicegate_tls::Acceptor>>,
    /// Streams through connected agents (`[agents]`); without it an agent
    /// node fails like an unreachable one.
    pub agents: Option<Arc<dyn AgentDialer>>,
    /// Sessions shared by the fleet (`[fleet]`); without it a session
    /// lives in this gateway's table alone.
    pub sessions: Option<Arc<dyn splicegate_control::session::SessionSync>>,
}

/// What opening a stream on an agent node came to.
#[derive(Debug)]
pub enum AgentAnswer {
    /// The device connected to the target: the gateway's end of the stream,
    /// relayed like any node's socket.
    Open(std::os::unix::net::UnixStream),
    /// The device answered that it could not (its reason and text).
    Refused(splicegate_proto::agent::OpenError, String),
    /// The node failed: its agent is not connected, went away, or did not
    /// answer within `node_connect_ms` (`onerror` decides).
    NodeFault(String),
    /// The device did not connect within `target_ms`.
    TargetTimeout(String),
    /// A UDP association on the device: the gateway's end of a datagram
    /// socket pair whose messages are `DATAGRAM` payloads (an address and
    /// the bytes; `splicegate_proto::agent::write_datagram_payload`), an
    /// empty message ending the association either way.
    Udp(std::os::unix::net::UnixDatagram),
}

/// Opens streams on agent nodes. Lives on the gateway's agent thread; a
/// worker asks and awaits the answer on its ring, so no lock of the agent
/// side is ever held on a worker.
pub trait AgentDialer: Send + Sync {
    /// Open a stream to `target` through agent node `node`, under the
    /// gateway's node and target deadlines; the answer goes to `reply`.
    fn open(
        &self,
        node: &str,
        target: &splicegate_addr::Target,
        reply: splicegate_uring::Sender<AgentAnswer>,
    );

    /// Open a UDP association through agent node `node`, under the node
    /// deadline; the answer ([`AgentAnswer::Udp`] or a failure) goes to `reply`.
    fn open_udp(&self, node: &str, reply: splicegate_uring::Sender<AgentAnswer>);
}

/// Receives bans (source, duration) for the kernel programs.
pub type BanSink = Arc<dyn Fn(std::net::IpAddr, Duration) + Send + Sync>;

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("settings", &self.settings)
            .field("guard_at_accept", &self.guard_at_accept)
            .finish()
    }
}

/// A message from the control side to a worker.
#[derive(Debug, Clone, Copy)]
pub enum Command {
    /// Stop accepting; let open connections finish within `grace`, then close them.
    Drain {
        /// How long open tunnels may run on.
        grace: Duration,
    },
}

/// A running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    /// The worker's thread.
    pub thread: JoinHandle<()>,
    /// Its command queue (wakes its ring).
    pub commands: splicegate_uring::Sender<Command>,
    /// Its counters.
    pub stats: Arc<WorkerStats>,
}

/// Start worker `index` on its own thread with its listeners (bound with
/// `SO_REUSEPORT` by the caller, so bind errors surface before any thread
/// starts). `cpu` pins the thread.
pub fn start(
    index: usize,
    cpu: Option<usize>,
    listeners: Vec<(std::net::TcpListener, Binding)>,
    shared: Arc<Shared>,
) -> std::io::Result<WorkerHandle> {
    let (tx, rx) = splicegate_uring::channel();
    let stats = Arc::new(WorkerStats::default());
    let thread_stats = stats.clone();
    let thread = std::thread::Builder::new()
        .name(format!("splicegate-w{index}"))
        .spawn(move || {
            if let Some(cpu) = cpu
                && let Err(e) = splicegate_uring::pin_current_thread(cpu)
            {
                tracing::warn!(worker = index, cpu, error = %e, "could not pin the worker thread");
            }
            // A worker that ends before it is told to drain is a fatal
            // fault (its ring failed): the binary sees the thread finished
            // (`WorkerHandle::thread.is_finished()`) and stops the process.
            if let Err(e) = accept::run(index, listeners, shared, rx, thread_stats) {
                tracing::error!(worker = index, error = %e, "worker failed; the gateway stops");
            }
        })?;
    Ok(WorkerHandle {
        thread,
        commands: tx,
        stats,
    })
}

/// Bind one `SO_REUSEPORT` listener on `addr` (one per worker and address).
pub fn bind_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}
