//! The node pool: exits with their kind, address, attributes and state, an
//! index of roaring bitmaps per attribute value, and selection.
//!
//! A pick among millions of nodes is a bitmap intersection (smallest first,
//! then the selectable set), then two random choices, the less loaded winning
//! (load = active tunnels, plus a penalty per recent failure). State changes
//! update one selectable bitmap; the index is not rebuilt. Node indices are
//! stable for the life of the process: removal leaves a tombstone.
//!
//! A pool is immutable once published, apart from state. Its big parts are
//! shared between pools behind `Arc`s (the nodes in segments, the id and
//! subnet maps in shards, each attribute value's bitmap), so an API change
//! of one node derives the next pool from the current one by copying only
//! what that node touches ([`NodePool::with_node`],
//! [`NodePool::without_node`]), in about a millisecond at a million nodes,
//! and gives the pool a full build of the same declarations gives.
//!
//! Nodes of kind `agent` are devices that dialled out to the gateway: such a
//! node is selectable only while its device is connected
//! ([`NodePool::agent_up`], [`NodePool::agent_down`]); its presence and live
//! figures ([`AgentPresence`]) live on its [`NodeRuntime`], so they survive
//! rebuilds. Its key is kept as a SHA-256 ([`hash_agent_key`]), never in
//! plaintext.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use roaring::RoaringBitmap;
use subtle::ConstantTimeEq;

use crate::Now;
use crate::catalog::{Code, Rejection};
use crate::decl::{DeclError, MAX_NAME};
use crate::geo::{Country, GeoCatalog, GeoKind, NameId};
use crate::rules::{Network, NetworkSet};

/// A node's position in the pool; stable while the process runs.
pub type NodeIdx = u32;

/// How the gateway reaches a target through a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeKind {
    /// An upstream HTTP proxy, asked with CONNECT.
    Http,
    /// An upstream SOCKS5 proxy.
    Socks5,
    /// The gateway connects itself, from the node's `bind` address.
    Direct,
    /// A device that dialled out to the gateway (an agent): the gateway
    /// opens a stream over the device's connection and the device connects
    /// to the target from its own network. No address, no bind, never
    /// probed: selectable while its device is connected.
    Agent,
}

names!(NodeKind {
    Http => "http",
    Socks5 => "socks5",
    Direct => "direct",
    Agent => "agent",
});

/// The SHA-256 of an agent key: what a node, its declaration and the store
/// keep instead of the key.
pub fn hash_agent_key(key: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(key.as_bytes()).into()
}

/// A key hash as lowercase hex (the store's form).
pub(crate) fn hash_to_hex(h: &[u8; 32]) -> String {
    let mut s = String::with_capacity(64);
    for b in h {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A key hash from 64 hex digits.
pub(crate) fn hash_from_hex(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// A node's state as selection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeState {
    /// Takes new sessions and rotating requests.
    Online,
    /// Serves its existing sessions, takes no new ones.
    Draining,
    /// Takes nothing (operator, failed health checks, or removed).
    Offline,
}

names!(NodeState {
    Online => "online",
    Draining => "draining",
    Offline => "offline",
});

const ADMIN_ONLINE: u8 = 0;
const ADMIN_DRAINING: u8 = 1;
const ADMIN_OFFLINE: u8 = 2;
const ADMIN_REMOVED: u8 = 3;

/// The runtime's value of an operator's state.
fn admin_of(state: NodeState) -> u8 {
    match state {
        NodeState::Online => ADMIN_ONLINE,
        NodeState::Draining => ADMIN_DRAINING,
        NodeState::Offline => ADMIN_OFFLINE,
    }
}

/// What changes about a node while it serves; shared by every worker and
/// kept across pool rebuilds.
#[derive(Debug, Default)]
pub struct NodeRuntime {
    /// The operator's state (online, draining, offline, removed).
    admin: AtomicU8,
    /// 1 when health checks (or passive failures) took the node out.
    unhealthy: AtomicU8,
    /// Open tunnels through the node.
    active: AtomicU32,
    /// Failures since the last success (weights selection away), forgotten
    /// after [`FAILURE_MEMORY`] without another one.
    recent_failures: AtomicU32,
    /// When the last failure was seen ([`Now`] nanoseconds).
    failed_at: AtomicU64,
    /// An agent node's device: connected or not, and its live figures.
    agent: AgentPresence,
}

impl NodeRuntime {
    /// An agent node's presence and live figures (never connected for
    /// other kinds).
    pub fn agent(&self) -> &AgentPresence {
        &self.agent
    }

    /// Open tunnels through the node.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Count a tunnel opened; the guard counts it closed.
    pub fn open_tunnel(self: &Arc<Self>) -> TunnelGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        TunnelGuard(self.clone())
    }

    /// Record a failure seen by real traffic.
    pub fn record_failure(&self, now: Now) {
        self.failed_at.store(now.0, Ordering::Relaxed);
        self.recent_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Record a success: of real traffic, or a passing health probe. The
    /// node's failures are forgotten, so it gets its share of new traffic
    /// at once.
    pub fn record_success(&self) {
        if self.recent_failures.load(Ordering::Relaxed) != 0 {
            self.recent_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Failures since the last success.
    pub fn recent_failures(&self) -> u32 {
        self.recent_failures.load(Ordering::Relaxed)
    }

    /// Whether health checks took the node out.
    pub fn is_unhealthy(&self) -> bool {
        self.unhealthy.load(Ordering::Relaxed) != 0
    }

    /// Forget failures older than `memory` (none since): a node that failed
    /// once and was never tried again would otherwise be avoided for good.
    /// Returns whether it forgot any.
    fn forget_failures(&self, now: Now, memory: Duration) -> bool {
        if self.recent_failures.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let at = self.failed_at.load(Ordering::Relaxed);
        if now.0.saturating_sub(at) < memory.as_nanos() as u64 {
            return false;
        }
        self.recent_failures.store(0, Ordering::Relaxed);
        true
    }

    fn load_score(&self) -> u64 {
        u64::from(self.active()) + 4 * u64::from(self.recent_failures().min(1000))
    }
}

/// Keeps a node's tunnel count while a tunnel is open.
#[derive(Debug)]
pub struct TunnelGuard(Arc<NodeRuntime>);

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Generations of agent connections: one number per connection, unique in
/// the process (so a late `agent_down` of an old connection can never match
/// a new one, even across pool rebuilds or a node deleted and created
/// again).
static AGENT_GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// Longest agent version string kept (the device announces it).
pub const MAX_AGENT_VERSION: usize = 64;

/// One connection of an agent's device.
#[derive(Debug)]
struct AgentConn {
    generation: u64,
    since_unix_ms: u64,
    addr: SocketAddr,
    version: Box<str>,
}

/// An agent node's device as the gateway sees it: whether it is connected
/// (and since when, from where, which version), and live figures the
/// gateway's threads update without locks: open streams, bytes each way on
/// the current connection, the last heartbeat round trip.
///
/// Connecting and disconnecting go through [`NodePool::agent_up`] and
/// [`NodePool::agent_down`], which also update selection.
#[derive(Debug, Default)]
pub struct AgentPresence {
    /// The current connection; readers never block.
    conn: ArcSwapOption<AgentConn>,
    /// Serialises connect and disconnect (rare); readers never take it.
    writer: Mutex<()>,
    /// Streams open now (every connection's: an old connection's streams
    /// close after a reconnect).
    streams: AtomicU64,
    /// Client → target bytes on the current connection.
    bytes_up: AtomicU64,
    /// Target → client bytes on the current connection.
    bytes_down: AtomicU64,
    /// The last heartbeat round trip, microseconds (0: none yet).
    rtt_us: AtomicU64,
}

/// What [`AgentPresence::snapshot`] shows of a connected agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSnapshot {
    /// When the current connection came up (Unix milliseconds).
    pub since_unix_ms: u64,
    /// The address the device connected from.
    pub addr: SocketAddr,
    /// Streams open now.
    pub streams: u64,
    /// Client → target bytes on this connection.
    pub bytes_up: u64,
    /// Target → client bytes on this connection.
    pub bytes_down: u64,
    /// The last heartbeat round trip in milliseconds (0 before the first).
    pub rtt_ms: f64,
    /// The version the device announced.
    pub version: String,
}

impl AgentPresence {
    /// Count bytes relayed through the device (`up`: client to target).
    pub fn add_bytes(&self, up: u64, down: u64) {
        if up != 0 {
            self.bytes_up.fetch_add(up, Ordering::Relaxed);
        }
        if down != 0 {
            self.bytes_down.fetch_add(down, Ordering::Relaxed);
        }
    }

    /// Count a stream opened to the device.
    pub fn stream_opened(&self) {
        self.streams.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a stream closed (never below zero).
    pub fn stream_closed(&self) {
        let _ = self
            .streams
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Set the open streams to what the connection counts now.
    pub fn set_streams(&self, n: u64) {
        self.streams.store(n, Ordering::Relaxed);
    }

    /// Record a heartbeat's round trip.
    pub fn set_rtt_us(&self, us: u64) {
        self.rtt_us.store(us, Ordering::Relaxed);
    }

    /// Streams open now (what [`AgentPresence::snapshot`] shows, without
    /// copying the rest).
    pub fn streams(&self) -> u64 {
        self.streams.load(Ordering::Relaxed)
    }

    /// Whether the device is connected now.
    pub fn is_connected(&self) -> bool {
        self.conn.load().is_some()
    }

    /// The address the device connected from, while it is connected.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.conn.load().as_ref().map(|c| c.addr)
    }

    /// The connection's figures, or `None` while the device is not connected.
    pub fn snapshot(&self) -> Option<AgentSnapshot> {
        let conn = self.conn.load_full()?;
        Some(AgentSnapshot {
            since_unix_ms: conn.since_unix_ms,
            addr: conn.addr,
            streams: self.streams.load(Ordering::Relaxed),
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            rtt_ms: self.rtt_us.load(Ordering::Relaxed) as f64 / 1000.0,
            version: conn.version.to_string(),
        })
    }

    /// A new connection replaces whatever was there; its byte counts and
    /// round trip start over. Returns its generation.
    fn up(&self, addr: SocketAddr, version: &str, unix_ms: u64) -> u64 {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let generation = AGENT_GENERATIONS.fetch_add(1, Ordering::Relaxed);
        // Announced by the device: printable, bounded.
        let mut v = String::new();
        for c in version.chars().filter(|c| !c.is_control()) {
            if v.len() + c.len_utf8() > MAX_AGENT_VERSION {
                break;
            }
            v.push(c);
        }
        self.bytes_up.store(0, Ordering::Relaxed);
        self.bytes_down.store(0, Ordering::Relaxed);
        self.rtt_us.store(0, Ordering::Relaxed);
        self.conn.store(Some(Arc::new(AgentConn {
            generation,
            since_unix_ms: unix_ms,
            addr: SocketAddr::new(addr.ip().to_canonical(), addr.port()),
            version: v.into(),
        })));
        generation
    }

    /// The connection of `generation` ended: disconnected, unless another
    /// connection replaced it already. Returns whether it was the current one.
    fn down(&self, generation: u64) -> bool {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let current = self
            .conn
            .load()
            .as_ref()
            .is_some_and(|c| c.generation == generation);
        if current {
            self.conn.store(None);
        }
        current
    }

    /// The node is gone: whatever connection it had no longer counts (a
    /// node created again under its id starts absent).
    fn clear(&self) {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.conn.store(None);
    }
}

/// One exit.
pub struct Node {
    /// The operator's id (`us-ny-1`).
    pub id: Box<str>,
    /// How to reach targets through it.
    pub kind: NodeKind,
    /// The upstream proxy's address (`http`, `socks5`).
    pub addr: Option<SocketAddr>,
    /// Source address for `direct` nodes.
    pub bind: Option<IpAddr>,
    /// Credentials the upstream proxy wants.
    pub credentials: Option<(Box<str>, Box<str>)>,
    /// Exit country.
    pub country: Option<Country>,
    /// Exit region.
    pub region: Option<NameId>,
    /// Exit city.
    pub city: Option<NameId>,
    /// Exit ISP.
    pub isp: Option<NameId>,
    /// Exit AS number.
    pub asn: Option<u32>,
    /// Residential, mobile or datacenter.
    pub network: Network,
    /// Whether the config file declares it (the API may not change it).
    pub from_file: bool,
    /// An agent node's key, hashed ([`hash_agent_key`]).
    pub key_hash: Option<[u8; 32]>,
    /// Whether it carries UDP (SOCKS5 UDP ASSOCIATE): `direct` and `agent`
    /// nodes always, `socks5` nodes declared `udp = true`, `http` never.
    pub udp: bool,
    /// Live state, shared across rebuilds.
    pub runtime: Arc<NodeRuntime>,
}

/// Neither the upstream password nor the key hash.
impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("addr", &self.addr)
            .field("bind", &self.bind)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(u, _)| (u, "***")),
            )
            .field("country", &self.country)
            .field("region", &self.region)
            .field("city", &self.city)
            .field("isp", &self.isp)
            .field("asn", &self.asn)
            .field("network", &self.network)
            .field("from_file", &self.from_file)
            .field("key_hash", &self.key_hash.map(|_| "***"))
            .field("runtime", &self.runtime)
            .finish()
    }
}

impl Node {
    /// The address targets see: the bind address of a direct node, the
    /// address an agent connected from (while it is connected), else the
    /// proxy's.
    pub fn exit_ip(&self) -> Option<IpAddr> {
        match self.kind {
            NodeKind::Agent => self.runtime.agent.addr().map(|a| a.ip()),
            _ => self.bind.or(self.addr.map(|a| a.ip())),
        }
    }

    /// The node's state as selection sees it: the operator's offline wins,
    /// then health (for an agent node: whether its device is connected),
    /// then the operator's draining.
    pub fn state(&self) -> NodeState {
        let admin = self.runtime.admin.load(Ordering::Relaxed);
        if matches!(admin, ADMIN_OFFLINE | ADMIN_REMOVED) {
            return NodeState::Offline;
        }
        let out = match self.kind {
            NodeKind::Agent => !self.runtime.agent.is_connected(),
            _ => self.runtime.is_unhealthy(),
        };
        if out {
            NodeState::Offline
        } else if admin == ADMIN_DRAINING {
            NodeState::Draining
        } else {
            NodeState::Online
        }
    }

    /// The state the operator set (what `PATCH` changes).
    pub fn admin_state(&self) -> NodeState {
        match self.runtime.admin.load(Ordering::Relaxed) {
            ADMIN_ONLINE => NodeState::Online,
            ADMIN_DRAINING => NodeState::Draining,
            _ => NodeState::Offline,
        }
    }

    /// Whether the node was deleted.
    pub fn is_removed(&self) -> bool {
        self.runtime.admin.load(Ordering::Relaxed) == ADMIN_REMOVED
    }

    /// Whether an existing session may keep using the node.
    pub fn serves_sessions(&self) -> bool {
        self.state() != NodeState::Offline
    }

    /// Whether `presented` is this agent node's key, compared in constant
    /// time (as hashes). False for a node that is not an agent, has no key,
    /// or was deleted.
    pub fn agent_key_matches(&self, presented: &str) -> bool {
        match (self.kind, &self.key_hash) {
            (NodeKind::Agent, Some(h)) if !self.is_removed() => {
                bool::from(hash_agent_key(presented).ct_eq(h))
            }
            _ => false,
        }
    }
}

/// What a rule set asks of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Filter {
    /// Exit country, if one.
    pub country: Option<Country>,
    /// Exit region.
    pub region: Option<NameId>,
    /// Exit city.
    pub city: Option<NameId>,
    /// Exit ISP.
    pub isp: Option<NameId>,
    /// Exit ASN.
    pub asn: Option<u32>,
    /// Networks allowed (the rule's, within the package's).
    pub networks: Option<NetworkSet>,
    /// Only nodes that carry UDP (a SOCKS5 UDP association).
    pub udp: bool,
}

/// A small, fast random source (wyrand); callers own and seed it.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        (t as u64) ^ ((t >> 64) as u64)
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Nodes per segment of [`Slots`] (a power of two).
const SEGMENT_BITS: u32 = 12;
const SEGMENT: usize = 1 << SEGMENT_BITS;

/// The pool's nodes by index, in segments of [`SEGMENT`] shared between
/// pools: a derived pool copies the one segment a change touches, not a
/// million `Arc`s.
#[derive(Debug, Clone, Default)]
struct Slots {
    segments: Vec<Arc<[Arc<Node>]>>,
    len: usize,
}

impl Slots {
    fn from_vec(nodes: Vec<Arc<Node>>) -> Slots {
        Slots {
            len: nodes.len(),
            segments: nodes.chunks(SEGMENT).map(Arc::from).collect(),
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn iter(&self) -> impl Iterator<Item = &Arc<Node>> {
        self.segments.iter().flat_map(|s| s.iter())
    }

    /// Put `node` at `i` (< len): its segment is copied.
    fn set(&mut self, i: usize, node: Arc<Node>) {
        let seg = &mut self.segments[i >> SEGMENT_BITS];
        let mut v = seg.to_vec();
        v[i & (SEGMENT - 1)] = node;
        *seg = v.into();
    }

    /// Append `node`: the last segment is copied, or a new one started.
    fn push(&mut self, node: Arc<Node>) {
        match self.segments.last_mut() {
            Some(seg) if seg.len() < SEGMENT => {
                let mut v = Vec::with_capacity(seg.len() + 1);
                v.extend_from_slice(seg);
                v.push(node);
                *seg = v.into();
            }
            _ => self.segments.push(Arc::from(vec![node])),
        }
        self.len += 1;
    }
}

impl std::ops::Index<usize> for Slots {
    type Output = Arc<Node>;

    #[inline]
    fn index(&self, i: usize) -> &Arc<Node> {
        &self.segments[i >> SEGMENT_BITS][i & (SEGMENT - 1)]
    }
}

/// The hash that picks a key's shard (FxHash's step): fixed, so a shard
/// is the same in every pool.
#[derive(Default)]
struct ShardHasher(u64);

impl Hasher for ShardHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A map in shards shared between pools: a derived pool copies the one
/// shard a change touches. About 2,048 keys a shard at build time.
#[derive(Debug, Clone)]
struct Sharded<K, V> {
    shards: Vec<Arc<HashMap<K, V>>>,
    /// log2 of the number of shards.
    bits: u32,
}

impl<K: Hash + Eq + Clone, V: Clone> Sharded<K, V> {
    fn for_keys(n: usize) -> Self {
        let count = (n / 2048).next_power_of_two().clamp(1, 4096);
        Sharded {
            shards: (0..count).map(|_| Arc::new(HashMap::new())).collect(),
            bits: count.trailing_zeros(),
        }
    }

    fn shard<Q: Hash + ?Sized>(&self, k: &Q) -> usize {
        if self.bits == 0 {
            return 0;
        }
        let mut h = ShardHasher::default();
        k.hash(&mut h);
        (h.finish() >> (64 - self.bits)) as usize
    }

    fn get<Q>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[self.shard(k)].get(k)
    }

    /// The shard of `k`, to change (copied if another pool shares it).
    fn shard_mut<Q>(&mut self, k: &Q) -> &mut HashMap<K, V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = self.shard(k);
        Arc::make_mut(&mut self.shards[i])
    }

    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }
}

/// Attribute value → its nodes. The map is copied when a change touches it
/// (one `Arc` per value), a bitmap only when its value's nodes change.
type AttrIndex<K> = HashMap<K, Arc<RoaringBitmap>>;

/// The node pool and its index.
#[derive(Debug)]
pub struct NodePool {
    nodes: Slots,
    by_id: Sharded<Box<str>, NodeIdx>,
    country: AttrIndex<Country>,
    region: AttrIndex<NameId>,
    city: AttrIndex<NameId>,
    isp: AttrIndex<NameId>,
    asn: AttrIndex<u32>,
    /// Union of the network bitmaps, per set of networks (8 sets).
    networks: Vec<RoaringBitmap>,
    /// Exit /24 (IPv4) or /48 (IPv6), for lookalikes.
    subnet: Sharded<u64, RoaringBitmap>,
    /// Nodes that take new sessions and rotating requests now.
    selectable: ArcSwap<RoaringBitmap>,
    /// Serialises writers of `selectable`.
    state_lock: Mutex<()>,
    /// Nodes of kind `agent` (their exit address moves with their
    /// connection, so they are not in `subnet`).
    agents: RoaringBitmap,
    /// Nodes that carry UDP ([`Node::udp`]).
    udp: RoaringBitmap,
    /// For a pool derived from another: the selectable set it started
    /// from, until [`NodePool::catch_up`] compares it with the other
    /// pool's.
    derived_from: Mutex<Option<Arc<RoaringBitmap>>>,
}

fn subnet_key(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => u64::from(u32::from(v4) >> 8),
        IpAddr::V6(v6) => (1 << 63) | (u128::from(v6) >> 80) as u64,
    }
}

/// Draws per pick before the fast path gives way to a full intersection.
const SAMPLE_TRIES: usize = 64;
/// Extra draws looking for a node without recent failures.
const FRESH_DRAWS: usize = 6;
/// How long a node's failures weigh on selection when no other follows.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(10);
/// Agent nodes a lookalike pick looks at for the old node's exit subnet
/// (their addresses are read one by one, so the look is bounded).
const LOOKALIKE_AGENT_SCAN: usize = 4096;

/// The declaration of a node, as the config file and the admin API give it.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeDecl {
    /// The operator's id.
    pub id: String,
    /// How to reach targets through it.
    pub kind: NodeKind,
    /// Upstream proxy address (`http`, `socks5`).
    pub addr: Option<SocketAddr>,
    /// Source address (`direct`).
    pub bind: Option<IpAddr>,
    /// Upstream proxy credentials.
    pub credentials: Option<(String, String)>,
    /// Exit country.
    pub country: Option<Country>,
    /// Catalogue names.
    pub region: Option<String>,
    /// Exit city.
    pub city: Option<String>,
    /// Exit ISP.
    pub isp: Option<String>,
    /// Exit ASN.
    pub asn: Option<u32>,
    /// Network type (default residential).
    pub network: Network,
    /// Initial operator state.
    pub state: NodeState,
    /// Declared in the config file.
    pub from_file: bool,
    /// An agent node's key, hashed ([`hash_agent_key`]); the plaintext is
    /// never kept.
    pub key_hash: Option<[u8; 32]>,
    /// A `socks5` node's upstream serves UDP ASSOCIATE.
    pub udp: bool,
}

/// Neither the upstream password nor the key hash.
impl std::fmt::Debug for NodeDecl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeDecl")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("addr", &self.addr)
            .field("bind", &self.bind)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(u, _)| (u, "***")),
            )
            .field("country", &self.country)
            .field("region", &self.region)
            .field("city", &self.city)
            .field("isp", &self.isp)
            .field("asn", &self.asn)
            .field("network", &self.network)
            .field("state", &self.state)
            .field("from_file", &self.from_file)
            .field("key_hash", &self.key_hash.map(|_| "***"))
            .finish()
    }
}

impl NodeDecl {
    /// Check what a kind needs: `http`/`socks5` an address, `direct` a bind
    /// address, `agent` a key and neither address nor upstream credentials;
    /// only an agent has a key.
    pub fn validate(&self) -> Result<(), DeclError> {
        if self.id.is_empty() || self.id.len() > MAX_NAME {
            return Err(DeclError::field(
                "id",
                format!("a node id is 1 to {MAX_NAME} bytes"),
            ));
        }
        if self.kind != NodeKind::Agent && self.key_hash.is_some() {
            return Err(DeclError::field("key", "only an agent node has a key"));
        }
        if self.udp && self.kind != NodeKind::Socks5 {
            return Err(DeclError::field(
                "udp",
                match self.kind {
                    NodeKind::Http => "an http node cannot carry UDP",
                    _ => "only a socks5 node says udp (direct and agent nodes always carry UDP)",
                },
            ));
        }
        match self.kind {
            NodeKind::Http | NodeKind::Socks5 if self.addr.is_none() => Err(DeclError::field(
                "addr",
                format!("a {} node needs addr", self.kind.as_str()),
            )),
            NodeKind::Direct if self.bind.is_none() => {
                Err(DeclError::field("bind", "a direct node needs bind"))
            }
            NodeKind::Agent if self.addr.is_some() => Err(DeclError::field(
                "addr",
                "an agent node has no addr: its device dials out to the gateway",
            )),
            NodeKind::Agent if self.bind.is_some() => Err(DeclError::field(
                "bind",
                "an agent node has no bind: its device connects from its own network",
            )),
            NodeKind::Agent if self.credentials.is_some() => Err(DeclError::field(
                "username",
                "an agent node has no upstream credentials",
            )),
            NodeKind::Agent if self.key_hash.is_none() => Err(DeclError::field(
                "key",
                "an agent node needs a key (the admin API generates one when none is given)",
            )),
            _ => Ok(()),
        }
    }
}

impl NodePool {
    /// Build a pool from declarations, keeping the runtime state of nodes that
    /// `previous` already had (same id), so reloads keep load and health.
    /// Every attribute name is added to `geo` for its country.
    pub fn build(
        decls: &[NodeDecl],
        previous: Option<&NodePool>,
        geo: &mut GeoCatalog,
    ) -> NodePool {
        // Keep every index the previous pool gave out: nodes it had stay where
        // they were (a node no longer declared becomes a tombstone), new ones
        // are appended. Sessions hold indices across rebuilds.
        let mut slots: Vec<Arc<Node>> = Vec::with_capacity(decls.len());
        let mut declared: Vec<bool> = Vec::new();
        let mut position: HashMap<Box<str>, usize> = HashMap::new();
        if let Some(prev) = previous {
            for (i, n) in prev.nodes.iter().enumerate() {
                slots.push(n.clone());
                declared.push(false);
                position.insert(n.id.clone(), i);
            }
        }
        for d in decls {
            let node = Arc::new(Self::node_from(d, previous, geo));
            node.runtime
                .admin
                .store(admin_of(d.state), Ordering::Relaxed);
            match position.get(d.id.as_str()) {
                Some(&i) => {
                    slots[i] = node;
                    declared[i] = true;
                }
                None => {
                    position.insert(d.id.as_str().into(), slots.len());
                    slots.push(node);
                    declared.push(true);
                }
            }
        }
        for (n, declared) in slots.iter().zip(declared) {
            if !declared {
                n.runtime.admin.store(ADMIN_REMOVED, Ordering::Relaxed);
                n.runtime.agent.clear();
            }
        }
        Self::index(slots)
    }

    /// `self` with the node `d` declares put in: a node of that id (a
    /// tombstone too) is replaced at its index, keeping its runtime state;
    /// a new id is appended. Everything else is shared with `self`, not
    /// copied: the cost does not grow with the pool. `d`'s names are added
    /// to `geo` as [`NodePool::build`] adds them.
    ///
    /// Nothing live changes (a node's runtime is shared with `self`): the
    /// node takes `d.state` once [`NodePool::set_admin_state`] is called on
    /// the new pool, which the caller does when the change is committed
    /// (stored). Until then a new or re-created node is not selectable and
    /// a replaced one stays as it was. Committed, the pool is the one
    /// [`NodePool::build`] gives for the same declarations on `self`.
    pub fn with_node(&self, d: &NodeDecl, geo: &mut GeoCatalog) -> (NodePool, NodeIdx) {
        let node = Arc::new(Self::node_from(d, Some(self), geo));
        let mut next = self.derive();
        let idx = match self.by_id.get(d.id.as_str()) {
            Some(&i) => {
                next.reindex(i, Some(&self.nodes[i as usize]), &node);
                next.nodes.set(i as usize, node);
                i
            }
            None => {
                let i = next.nodes.len() as NodeIdx;
                next.by_id
                    .shard_mut(d.id.as_str())
                    .insert(d.id.as_str().into(), i);
                next.reindex(i, None, &node);
                next.nodes.push(node);
                i
            }
        };
        (next, idx)
    }

    /// `self` with the node `id` left as a tombstone, as [`NodePool::build`]
    /// leaves a node no longer declared: it keeps its index and its place
    /// in the attribute index, and leaves selection. Shares everything
    /// else with `self`. Nothing live changes until
    /// [`NodePool::remove`] is called (on this pool and the one before):
    /// the caller does that when the deletion is committed. `None` for an
    /// id the pool does not have.
    pub fn without_node(&self, id: &str) -> Option<(NodePool, NodeIdx)> {
        let &idx = self.by_id.get(id)?;
        let next = self.derive();
        {
            let _writer = next.state_lock.lock().unwrap_or_else(|e| e.into_inner());
            let current = next.selectable.load();
            if current.contains(idx) {
                let mut b = RoaringBitmap::clone(&current);
                b.remove(idx);
                next.selectable.store(Arc::new(b));
            }
        }
        Some((next, idx))
    }

    /// For a pool derived from `previous` ([`NodePool::with_node`],
    /// [`NodePool::without_node`]), once it is published: bring into
    /// selection what changed on `previous` since (a node taken out by a
    /// health check, an agent that connected), which went to `previous`'s
    /// selectable set, not this one's. Only the nodes whose place differs
    /// are looked at; nothing for a built pool, or a second time. Returns
    /// how many were.
    pub fn catch_up(&self, previous: &NodePool) -> usize {
        let base = self
            .derived_from
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(base) = base else { return 0 };
        let now = previous.selectable.load_full();
        if Arc::ptr_eq(&base, &now) {
            return 0;
        }
        let changed = &*base ^ &*now;
        for i in &changed {
            if (i as usize) < self.len() {
                self.refresh(i);
            }
        }
        changed.len() as usize
    }

    /// A pool that shares this one's parts (the attribute maps and the
    /// small bitmaps copied, the big parts behind `Arc`s), to change.
    fn derive(&self) -> NodePool {
        let selectable = {
            let _writer = self.state_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.selectable.load_full()
        };
        NodePool {
            derived_from: Mutex::new(Some(selectable.clone())),
            nodes: self.nodes.clone(),
            by_id: self.by_id.clone(),
            country: self.country.clone(),
            region: self.region.clone(),
            city: self.city.clone(),
            isp: self.isp.clone(),
            asn: self.asn.clone(),
            networks: self.networks.clone(),
            subnet: self.subnet.clone(),
            selectable: ArcSwap::new(selectable),
            state_lock: Mutex::new(()),
            agents: self.agents.clone(),
            udp: self.udp.clone(),
        }
    }

    /// Move node `i` in the attribute index (not in selection) from where
    /// `old` had it (none: a new index) to where `new` goes: only the
    /// values that differ are touched (their bitmaps copied), and a value
    /// no node has any more is dropped, as a build never makes it.
    fn reindex(&mut self, i: NodeIdx, old: Option<&Node>, new: &Node) {
        fn attr<K: Hash + Eq + Copy>(
            map: &mut AttrIndex<K>,
            old: Option<Option<K>>,
            new: Option<K>,
            i: NodeIdx,
        ) {
            let old = old.flatten();
            if old == new {
                return;
            }
            if let Some(k) = old
                && let Some(b) = map.get_mut(&k)
            {
                Arc::make_mut(b).remove(i);
                if b.is_empty() {
                    map.remove(&k);
                }
            }
            if let Some(k) = new {
                Arc::make_mut(map.entry(k).or_default()).insert(i);
            }
        }
        attr(&mut self.country, old.map(|o| o.country), new.country, i);
        attr(&mut self.region, old.map(|o| o.region), new.region, i);
        attr(&mut self.city, old.map(|o| o.city), new.city, i);
        attr(&mut self.isp, old.map(|o| o.isp), new.isp, i);
        attr(&mut self.asn, old.map(|o| o.asn), new.asn, i);
        // Agents by their current address; the others by their fixed exit.
        let place = |n: &Node| match n.kind {
            NodeKind::Agent => (true, None),
            _ => (false, n.exit_ip().map(subnet_key)),
        };
        let before = old.map(place);
        let after = place(new);
        if before != Some(after) {
            if let Some((agent, subnet)) = before {
                if agent {
                    self.agents.remove(i);
                }
                if let Some(key) = subnet {
                    let shard = self.subnet.shard_mut(&key);
                    if let Some(b) = shard.get_mut(&key) {
                        b.remove(i);
                        if b.is_empty() {
                            shard.remove(&key);
                        }
                    }
                }
            }
            if after.0 {
                self.agents.insert(i);
            }
            if let Some(key) = after.1 {
                self.subnet
                    .shard_mut(&key)
                    .entry(key)
                    .or_default()
                    .insert(i);
            }
        }
        if old.map(|o| o.udp) != Some(new.udp) {
            if new.udp {
                self.udp.insert(i);
            } else {
                self.udp.remove(i);
            }
        }
        if old.map(|o| o.network) != Some(new.network) {
            for (set, b) in self.networks.iter_mut().enumerate() {
                let set = NetworkSet(set as u8);
                if old.is_some_and(|o| set.contains(o.network)) {
                    b.remove(i);
                }
                if set.contains(new.network) {
                    b.insert(i);
                }
            }
        }
    }

    /// The node `d` declares, with the runtime state `previous` has for its
    /// id (or a fresh one). The operator's state is not set here: see
    /// [`admin_of`].
    fn node_from(d: &NodeDecl, previous: Option<&NodePool>, geo: &mut GeoCatalog) -> Node {
        let runtime = previous
            .and_then(|p| {
                p.by_id
                    .get(d.id.as_str())
                    .map(|&i| p.nodes[i as usize].runtime.clone())
            })
            .unwrap_or_default();
        let mut name = |kind, v: &Option<String>| {
            v.as_deref().map(|v| match d.country {
                Some(c) => geo.add(c, kind, v),
                None => geo.intern(v),
            })
        };
        Node {
            id: d.id.as_str().into(),
            kind: d.kind,
            addr: d.addr,
            bind: d.bind,
            credentials: d
                .credentials
                .as_ref()
                .map(|(u, p)| (u.as_str().into(), p.as_str().into())),
            country: d.country,
            region: name(GeoKind::Region, &d.region),
            city: name(GeoKind::City, &d.city),
            isp: name(GeoKind::Isp, &d.isp),
            asn: d.asn,
            network: d.network,
            from_file: d.from_file,
            key_hash: d.key_hash,
            udp: match d.kind {
                NodeKind::Direct | NodeKind::Agent => true,
                NodeKind::Socks5 => d.udp,
                NodeKind::Http => false,
            },
            runtime,
        }
    }

    fn index(nodes: Vec<Arc<Node>>) -> NodePool {
        let mut pool = NodePool {
            by_id: Sharded::for_keys(nodes.len()),
            country: HashMap::new(),
            region: HashMap::new(),
            city: HashMap::new(),
            isp: HashMap::new(),
            asn: HashMap::new(),
            networks: vec![RoaringBitmap::new(); 8],
            subnet: Sharded::for_keys(nodes.len()),
            selectable: ArcSwap::from_pointee(RoaringBitmap::new()),
            state_lock: Mutex::new(()),
            agents: RoaringBitmap::new(),
            udp: RoaringBitmap::new(),
            derived_from: Mutex::new(None),
            nodes: Slots::default(),
        };
        let mut per_net = [Vec::new(), Vec::new(), Vec::new()];
        let mut selectable = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let i = i as NodeIdx;
            pool.by_id.shard_mut(&*n.id).insert(n.id.clone(), i);
            if let Some(c) = n.country {
                Arc::make_mut(pool.country.entry(c).or_default()).insert(i);
            }
            for (map, v) in [
                (&mut pool.region, n.region),
                (&mut pool.city, n.city),
                (&mut pool.isp, n.isp),
            ] {
                if let Some(v) = v {
                    Arc::make_mut(map.entry(v).or_default()).insert(i);
                }
            }
            if let Some(a) = n.asn {
                Arc::make_mut(pool.asn.entry(a).or_default()).insert(i);
            }
            if n.kind == NodeKind::Agent {
                pool.agents.insert(i);
            } else if let Some(ip) = n.exit_ip() {
                let key = subnet_key(ip);
                pool.subnet
                    .shard_mut(&key)
                    .entry(key)
                    .or_default()
                    .insert(i);
            }
            if n.udp {
                pool.udp.insert(i);
            }
            per_net[n.network as usize].push(i);
            if n.state() == NodeState::Online {
                selectable.push(i);
            }
        }
        let per_net: Vec<RoaringBitmap> = per_net
            .iter()
            .map(|v| v.iter().copied().collect())
            .collect();
        for set in 0..8u8 {
            let mut b = RoaringBitmap::new();
            for n in NetworkSet(set).iter() {
                b |= &per_net[n as usize];
            }
            pool.networks[set as usize] = b;
        }
        pool.selectable
            .store(Arc::new(selectable.into_iter().collect()));
        pool.nodes = Slots::from_vec(nodes);
        pool
    }

    /// Number of nodes (tombstones included).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the pool has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A node by index.
    pub fn node(&self, idx: NodeIdx) -> &Arc<Node> {
        &self.nodes[idx as usize]
    }

    /// A node by id.
    pub fn get(&self, id: &str) -> Option<(NodeIdx, &Arc<Node>)> {
        self.by_id
            .get(id)
            .map(|&i| (i, &self.nodes[i as usize]))
            .filter(|(_, n)| !n.is_removed())
    }

    /// Every node that is not removed.
    pub fn iter(&self) -> impl Iterator<Item = (NodeIdx, &Arc<Node>)> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (i as NodeIdx, n))
            .filter(|(_, n)| !n.is_removed())
    }

    /// Forget node failures older than [`FAILURE_MEMORY`]; returns how many
    /// nodes it cleared. Cheap enough to run once a second over a million
    /// nodes (one atomic load each).
    pub fn forget_failures(&self, now: Now) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.runtime.forget_failures(now, FAILURE_MEMORY))
            .count()
    }

    /// Nodes selectable now.
    pub fn online_count(&self) -> u64 {
        self.selectable.load().len()
    }

    fn refresh(&self, idx: NodeIdx) {
        let _writer = self.state_lock.lock().unwrap_or_else(|e| e.into_inner());
        let online = self.nodes[idx as usize].state() == NodeState::Online;
        let current = self.selectable.load();
        if current.contains(idx) == online {
            return;
        }
        let mut next = RoaringBitmap::clone(&current);
        if online {
            next.insert(idx);
        } else {
            next.remove(idx);
        }
        self.selectable.store(Arc::new(next));
    }

    /// Set the operator's state of a node. Returns the state before.
    pub fn set_admin_state(&self, idx: NodeIdx, state: NodeState) -> NodeState {
        let node = &self.nodes[idx as usize];
        let before = node.state();
        node.runtime.admin.store(admin_of(state), Ordering::Relaxed);
        self.refresh(idx);
        before
    }

    /// Remove a node from selection for good; its tunnels run out. An agent
    /// node's connection no longer counts (the gateway sees the node
    /// removed and closes it).
    pub fn remove(&self, idx: NodeIdx) {
        let runtime = &self.nodes[idx as usize].runtime;
        runtime.admin.store(ADMIN_REMOVED, Ordering::Relaxed);
        runtime.agent.clear();
        self.refresh(idx);
    }

    /// Health checks: take a node out (false) or bring it back (true).
    pub fn set_healthy(&self, idx: NodeIdx, healthy: bool) {
        self.nodes[idx as usize]
            .runtime
            .unhealthy
            .store(u8::from(!healthy), Ordering::Relaxed);
        self.refresh(idx);
    }

    /// An agent node's device connected (from `addr`, announcing
    /// `version`, at `unix_ms`): the node is selectable unless the operator
    /// set it offline or draining. Returns the connection's generation, for
    /// [`NodePool::agent_down`]; a node that is not an agent, or was
    /// removed, records nothing and gets 0 (close the connection). Call it on the current snapshot's pool
    /// (`engine.policy().nodes`); a snapshot published meanwhile is brought
    /// in line by `Engine::publish` and `Engine::housekeeping`.
    pub fn agent_up(&self, idx: NodeIdx, addr: SocketAddr, version: &str, unix_ms: u64) -> u64 {
        let node = &self.nodes[idx as usize];
        if node.kind != NodeKind::Agent || node.is_removed() {
            return 0;
        }
        let generation = node.runtime.agent.up(addr, version, unix_ms);
        self.refresh(idx);
        generation
    }

    /// The agent connection of `generation` ended: the node leaves selection,
    /// unless a newer connection of its device replaced that one already.
    pub fn agent_down(&self, idx: NodeIdx, generation: u64) {
        if self.nodes[idx as usize].runtime.agent.down(generation) {
            self.refresh(idx);
        }
    }

    /// Bring every agent node's place in selection in line with its
    /// presence; returns how many changed. A device that connects while a
    /// new snapshot is being built is marked on the old pool: the engine
    /// runs this on each snapshot it publishes and once a second, so no
    /// connection is missed for long. One atomic load per agent node.
    pub fn sync_agents(&self) -> usize {
        if self.agents.is_empty() {
            return 0;
        }
        let _writer = self.state_lock.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.selectable.load();
        let mut next: Option<RoaringBitmap> = None;
        let mut changed = 0;
        for i in &self.agents {
            let online = self.nodes[i as usize].state() == NodeState::Online;
            if current.contains(i) != online {
                let b = next.get_or_insert_with(|| RoaringBitmap::clone(&current));
                if online {
                    b.insert(i);
                } else {
                    b.remove(i);
                }
                changed += 1;
            }
        }
        if let Some(b) = next {
            self.selectable.store(Arc::new(b));
        }
        changed
    }

    /// Agent nodes connected now.
    pub fn agents_connected(&self) -> u64 {
        self.agents
            .iter()
            .filter(|&i| {
                let n = &self.nodes[i as usize];
                !n.is_removed() && n.runtime.agent.is_connected()
            })
            .count() as u64
    }

    /// The bitmaps a filter names, or `None` for a value no node has.
    fn filter_sets(&self, f: &Filter) -> Option<FilterSets<'_>> {
        fn get<'a, K: Hash + Eq>(m: &'a AttrIndex<K>, k: &K) -> Option<&'a RoaringBitmap> {
            m.get(k).map(|b| &**b)
        }
        // Every attribute named here, so a new one cannot be added to
        // `Filter` without this list and `MAX_FILTER_SETS` seeing it.
        let Filter {
            country,
            region,
            city,
            isp,
            asn,
            networks,
            udp,
        } = f;
        // The unused places hold any of the pool's sets; they are never read.
        let mut sets = FilterSets {
            sets: [&self.udp; MAX_FILTER_SETS],
            len: 0,
        };
        if let Some(c) = country {
            sets.push(get(&self.country, c)?);
        }
        for (map, v) in [(&self.region, region), (&self.city, city), (&self.isp, isp)] {
            if let Some(v) = v {
                sets.push(get(map, v)?);
            }
        }
        if let Some(a) = asn {
            sets.push(get(&self.asn, a)?);
        }
        if let Some(n) = networks
            && *n != NetworkSet::ALL
        {
            sets.push(&self.networks[n.0 as usize]);
        }
        if *udp {
            sets.push(&self.udp);
        }
        Some(sets)
    }

    /// The selectable nodes matching `f`.
    pub fn candidates(&self, f: &Filter) -> RoaringBitmap {
        let Some(mut sets) = self.filter_sets(f) else {
            return RoaringBitmap::new();
        };
        let online = self.selectable.load();
        let mut iter = sets.smallest_first().iter().copied();
        let mut acc = match iter.next() {
            Some(first) => first & &**online,
            None => return RoaringBitmap::clone(&online),
        };
        for b in iter {
            if acc.is_empty() {
                break;
            }
            acc &= b;
        }
        acc
    }

    /// How many nodes match `f` now.
    pub fn count(&self, f: &Filter) -> u64 {
        self.candidates(f).len()
    }

    /// Pick a node for `f`, avoiding `exclude`: two random choices, the less
    /// loaded wins. `NODE_NOT_FOUND` names the filter that emptied the set.
    pub fn pick(
        &self,
        f: &Filter,
        exclude: &[NodeIdx],
        rng: &mut Rng,
        geo: &GeoCatalog,
    ) -> Result<NodeIdx, Rejection> {
        if let Some(i) = self.sample(f, exclude, rng) {
            return Ok(i);
        }
        let mut cands = self.candidates(f);
        for x in exclude {
            cands.remove(*x);
        }
        self.choose(&cands, rng)
            .ok_or_else(|| self.not_found(f, !exclude.is_empty(), geo))
    }

    /// The fast path of [`NodePool::pick`]: draw ids uniformly from the
    /// smallest filter set and keep the first that is in every other set,
    /// selectable and not excluded (rejection sampling stays uniform over the
    /// matches). Two such draws, the less loaded wins. Gives up after
    /// [`SAMPLE_TRIES`] misses per draw, so a sparse intersection falls back
    /// to computing it.
    fn sample(&self, f: &Filter, exclude: &[NodeIdx], rng: &mut Rng) -> Option<NodeIdx> {
        let mut sets = self.filter_sets(f)?;
        let online = self.selectable.load();
        let (base, rest): (&RoaringBitmap, &[&RoaringBitmap]) =
            match sets.smallest_first().split_first() {
                Some((first, rest)) => (first, rest),
                None => (&online, &[]),
            };
        let n = base.len();
        if n == 0 {
            return None;
        }
        let draw = |rng: &mut Rng| {
            for _ in 0..SAMPLE_TRIES {
                let i = base.select(rng.below(n) as u32)?;
                if online.contains(i) && !exclude.contains(&i) && rest.iter().all(|b| b.contains(i))
                {
                    return Some(i);
                }
            }
            None
        };
        let a = draw(rng)?;
        let Some(b) = draw(rng) else { return Some(a) };
        let (la, lb) = (
            self.nodes[a as usize].runtime.load_score(),
            self.nodes[b as usize].runtime.load_score(),
        );
        let best = if lb < la { b } else { a };
        if self.nodes[best as usize].runtime.recent_failures() == 0 {
            return Some(best);
        }
        // Both draws failed recently: a few more draws for a node that has
        // not, so a new session rarely lands on a node that just failed.
        for _ in 0..FRESH_DRAWS {
            match draw(rng) {
                Some(c) if self.nodes[c as usize].runtime.recent_failures() == 0 => return Some(c),
                _ => {}
            }
        }
        Some(best)
    }

    fn choose(&self, cands: &RoaringBitmap, rng: &mut Rng) -> Option<NodeIdx> {
        let n = cands.len();
        if n == 0 {
            return None;
        }
        let a = cands.select(rng.below(n) as u32)?;
        if n == 1 {
            return Some(a);
        }
        let b = cands.select(rng.below(n) as u32)?;
        let (la, lb) = (
            self.nodes[a as usize].runtime.load_score(),
            self.nodes[b as usize].runtime.load_score(),
        );
        let best = if lb < la { b } else { a };
        if self.nodes[best as usize].runtime.recent_failures() == 0 {
            return Some(best);
        }
        for _ in 0..FRESH_DRAWS {
            let c = cands.select(rng.below(n) as u32)?;
            if self.nodes[c as usize].runtime.recent_failures() == 0 {
                return Some(c);
            }
        }
        Some(best)
    }

    /// A replacement resembling `old` (same city, ISP, ASN, exit subnet) when
    /// one matches `f`, else any match; never a node in `exclude`.
    pub fn pick_lookalike(
        &self,
        f: &Filter,
        old: NodeIdx,
        exclude: &[NodeIdx],
        rng: &mut Rng,
        geo: &GeoCatalog,
    ) -> Result<NodeIdx, Rejection> {
        let mut cands = self.candidates(f);
        cands.remove(old);
        for x in exclude {
            cands.remove(*x);
        }
        let o = &self.nodes[old as usize];
        let sets: [Option<&RoaringBitmap>; 3] = [
            o.city.and_then(|c| self.city.get(&c)).map(|b| &**b),
            o.isp.and_then(|c| self.isp.get(&c)).map(|b| &**b),
            o.asn.and_then(|c| self.asn.get(&c)).map(|b| &**b),
        ];
        let subnet = o.exit_ip().map(subnet_key);
        // Most alike first: all four, then dropping the subnet, the ASN, the ISP.
        for keep in (1..=4).rev() {
            let mut tier = cands.clone();
            let mut usable = true;
            for s in &sets[..keep.min(3)] {
                match s {
                    Some(b) => tier &= *b,
                    None => usable = false,
                }
            }
            if usable && keep == 4 {
                match subnet {
                    Some(key) => tier = self.in_subnet(&tier, key),
                    None => usable = false,
                }
            }
            if usable && let Some(i) = self.choose(&tier, rng) {
                return Ok(i);
            }
        }
        self.choose(&cands, rng)
            .ok_or_else(|| self.not_found(f, true, geo))
    }

    /// The nodes of `among` whose exit address is in the subnet `key`: the
    /// index for fixed addresses, and agents by their current address (at
    /// most [`LOOKALIKE_AGENT_SCAN`] of them looked at).
    fn in_subnet(&self, among: &RoaringBitmap, key: u64) -> RoaringBitmap {
        let mut out = match self.subnet.get(&key) {
            Some(b) => among & b,
            None => RoaringBitmap::new(),
        };
        let agents = among & &self.agents;
        for i in agents.iter().take(LOOKALIKE_AGENT_SCAN) {
            if self.nodes[i as usize].exit_ip().map(subnet_key) == Some(key) {
                out.insert(i);
            }
        }
        out
    }

    /// The detail of `NODE_NOT_FOUND`: the filter that emptied the set and
    /// how many nodes the broader filter has.
    pub fn not_found(&self, f: &Filter, replacing: bool, geo: &GeoCatalog) -> Rejection {
        let online = self.selectable.load();
        let mut steps: Vec<(String, Option<&RoaringBitmap>)> = Vec::new();
        if let Some(c) = f.country {
            steps.push((format!("country={c}"), self.country.get(&c).map(|b| &**b)));
        }
        for (name, map, v) in [
            ("region", &self.region, f.region),
            ("city", &self.city, f.city),
            ("isp", &self.isp, f.isp),
        ] {
            if let Some(v) = v {
                steps.push((format!("{name}={}", geo.name(v)), map.get(&v).map(|b| &**b)));
            }
        }
        if let Some(a) = f.asn {
            steps.push((format!("asn={a}"), self.asn.get(&a).map(|b| &**b)));
        }
        if let Some(n) = f.networks.filter(|n| *n != NetworkSet::ALL) {
            steps.push((
                format!("network={}", n.to_string().replace(", ", "|")),
                Some(&self.networks[n.0 as usize]),
            ));
        }
        if f.udp {
            steps.push(("carrying UDP".to_string(), Some(&self.udp)));
        }
        let mut acc: RoaringBitmap = RoaringBitmap::clone(&online);
        let mut applied: Vec<&str> = Vec::new();
        let mut detail = String::new();
        for (label, set) in &steps {
            let next = match set {
                Some(b) => &acc & *b,
                None => RoaringBitmap::new(),
            };
            if next.is_empty() {
                let broader = if applied.is_empty() {
                    "in the pool".to_string()
                } else {
                    format!("for {}", applied.join(" "))
                };
                applied.push(label);
                let _ = write!(
                    detail,
                    "no online node for {}; {} online {}",
                    applied.join(" "),
                    acc.len(),
                    broader
                );
                break;
            }
            acc = next;
            applied.push(label);
        }
        if detail.is_empty() {
            let what = if applied.is_empty() {
                "these rules".to_string()
            } else {
                applied.join(" ")
            };
            detail = if replacing {
                format!(
                    "no other online node for {what} ({} online match, all tried)",
                    acc.len()
                )
            } else {
                format!("no online node for {what}")
            };
        }
        Rejection::new(Code::NodeNotFound, detail)
    }

    /// Online node counts per country, sorted by country.
    pub fn country_counts(&self) -> Vec<(Country, u64)> {
        let online = self.selectable.load();
        let mut v: Vec<_> = self
            .country
            .iter()
            .map(|(c, b)| (*c, b.intersection_len(&online)))
            .collect();
        v.sort_unstable();
        v
    }

    /// Online node counts per name of one kind that nodes of `country` carry.
    pub fn name_counts(&self, country: Country, kind: GeoKind) -> Vec<(NameId, u64)> {
        let online = self.selectable.load();
        let Some(cb) = self.country.get(&country).map(|b| &**b) else {
            return Vec::new();
        };
        let map = match kind {
            GeoKind::Region => &self.region,
            GeoKind::City => &self.city,
            GeoKind::Isp => &self.isp,
        };
        let scoped = cb & &**online;
        let mut v: Vec<_> = map
            .iter()
            .filter(|(_, b)| b.intersection_len(cb) > 0)
            .map(|(id, b)| (*id, b.intersection_len(&scoped)))
            .collect();
        v.sort_unstable();
        v
    }
}

/// Attributes a filter can name at once: country, region, city, ISP, ASN,
/// networks and UDP (`NodePool::filter_sets` names each field of `Filter`,
/// so a new attribute cannot be added without passing by it and here).
const MAX_FILTER_SETS: usize = 7;

/// The node sets a filter intersects, one per attribute it names, kept
/// inline: a pick allocates nothing to gather them.
struct FilterSets<'a> {
    sets: [&'a RoaringBitmap; MAX_FILTER_SETS],
    len: usize,
}

impl<'a> FilterSets<'a> {
    /// Adds one attribute's set; a filter names each attribute once.
    fn push(&mut self, set: &'a RoaringBitmap) {
        self.sets[self.len] = set;
        self.len += 1;
    }

    /// The sets, the smallest first (the cheapest to draw from or start an
    /// intersection with).
    fn smallest_first(&mut self) -> &[&'a RoaringBitmap] {
        let sets = &mut self.sets[..self.len];
        sets.sort_by_key(|b| b.len());
        sets
    }
}

#[cfg(test)]
pub(crate) mod tests;
