//! The node pool: exits with their kind, address, attributes and state, an
//! index of roaring bitmaps per attribute value, and selection.
//!
//! A pick among millions of nodes is a bitmap intersection (smallest first,
//! then the selectable set), then two random choices, the less loaded winning
//! (load = active tunnels, plus a penalty per recent failure). State changes
//! update one selectable bitmap; the index is not rebuilt. Node indices are
//! stable for the life of the process: removal leaves a tombstone.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use roaring::RoaringBitmap;

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
}

names!(NodeKind {
    Http => "http",
    Socks5 => "socks5",
    Direct => "direct",
});

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
}

impl NodeRuntime {
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

/// One exit.
#[derive(Debug)]
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
    /// Live state, shared across rebuilds.
    pub runtime: Arc<NodeRuntime>,
}

impl Node {
    /// The address targets see: the bind address of a direct node, else the proxy's.
    pub fn exit_ip(&self) -> Option<IpAddr> {
        self.bind.or(self.addr.map(|a| a.ip()))
    }

    /// The node's state as selection sees it.
    pub fn state(&self) -> NodeState {
        match self.runtime.admin.load(Ordering::Relaxed) {
            ADMIN_OFFLINE | ADMIN_REMOVED => NodeState::Offline,
            _ if self.runtime.is_unhealthy() => NodeState::Offline,
            ADMIN_DRAINING => NodeState::Draining,
            _ => NodeState::Online,
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

/// The node pool and its index.
#[derive(Debug)]
pub struct NodePool {
    nodes: Vec<Arc<Node>>,
    by_id: HashMap<Box<str>, NodeIdx>,
    country: HashMap<Country, RoaringBitmap>,
    region: HashMap<NameId, RoaringBitmap>,
    city: HashMap<NameId, RoaringBitmap>,
    isp: HashMap<NameId, RoaringBitmap>,
    asn: HashMap<u32, RoaringBitmap>,
    /// Union of the network bitmaps, per set of networks (8 sets).
    networks: Vec<RoaringBitmap>,
    /// Exit /24 (IPv4) or /48 (IPv6), for lookalikes.
    subnet: HashMap<u64, RoaringBitmap>,
    /// Nodes that take new sessions and rotating requests now.
    selectable: ArcSwap<RoaringBitmap>,
    /// Serialises writers of `selectable`.
    state_lock: Mutex<()>,
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

/// The declaration of a node, as the config file and the admin API give it.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

impl NodeDecl {
    /// Check what a kind needs: `http`/`socks5` an address, `direct` a bind address.
    pub fn validate(&self) -> Result<(), DeclError> {
        if self.id.is_empty() || self.id.len() > MAX_NAME {
            return Err(DeclError::field(
                "id",
                format!("a node id is 1 to {MAX_NAME} bytes"),
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
            }
        }
        Self::index(slots)
    }

    fn node_from(d: &NodeDecl, previous: Option<&NodePool>, geo: &mut GeoCatalog) -> Node {
        let runtime = previous
            .and_then(|p| {
                p.by_id
                    .get(d.id.as_str())
                    .map(|&i| p.nodes[i as usize].runtime.clone())
            })
            .unwrap_or_default();
        let admin = match d.state {
            NodeState::Online => ADMIN_ONLINE,
            NodeState::Draining => ADMIN_DRAINING,
            NodeState::Offline => ADMIN_OFFLINE,
        };
        runtime.admin.store(admin, Ordering::Relaxed);
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
            runtime,
        }
    }

    fn index(nodes: Vec<Arc<Node>>) -> NodePool {
        let mut pool = NodePool {
            by_id: HashMap::with_capacity(nodes.len()),
            country: HashMap::new(),
            region: HashMap::new(),
            city: HashMap::new(),
            isp: HashMap::new(),
            asn: HashMap::new(),
            networks: vec![RoaringBitmap::new(); 8],
            subnet: HashMap::new(),
            selectable: ArcSwap::from_pointee(RoaringBitmap::new()),
            state_lock: Mutex::new(()),
            nodes: Vec::new(),
        };
        let mut per_net = [Vec::new(), Vec::new(), Vec::new()];
        let mut selectable = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let i = i as NodeIdx;
            pool.by_id.insert(n.id.clone(), i);
            if let Some(c) = n.country {
                pool.country.entry(c).or_default().insert(i);
            }
            for (map, v) in [
                (&mut pool.region, n.region),
                (&mut pool.city, n.city),
                (&mut pool.isp, n.isp),
            ] {
                if let Some(v) = v {
                    map.entry(v).or_default().insert(i);
                }
            }
            if let Some(a) = n.asn {
                pool.asn.entry(a).or_default().insert(i);
            }
            if let Some(ip) = n.exit_ip() {
                pool.subnet.entry(subnet_key(ip)).or_default().insert(i);
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
        pool.nodes = nodes;
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
        let v = match state {
            NodeState::Online => ADMIN_ONLINE,
            NodeState::Draining => ADMIN_DRAINING,
            NodeState::Offline => ADMIN_OFFLINE,
        };
        node.runtime.admin.store(v, Ordering::Relaxed);
        self.refresh(idx);
        before
    }

    /// Remove a node from selection for good; its tunnels run out.
    pub fn remove(&self, idx: NodeIdx) {
        self.nodes[idx as usize]
            .runtime
            .admin
            .store(ADMIN_REMOVED, Ordering::Relaxed);
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

    /// The bitmaps a filter names, or `None` for a value no node has.
    fn filter_sets<'a>(
        &'a self,
        f: &Filter,
        out: &mut Vec<(&'static str, &'a RoaringBitmap)>,
    ) -> bool {
        fn get<'a, K: std::hash::Hash + Eq>(
            m: &'a HashMap<K, RoaringBitmap>,
            k: &K,
        ) -> Option<&'a RoaringBitmap> {
            m.get(k)
        }
        let empty_ok = |o: Option<&'a RoaringBitmap>, name, out: &mut Vec<_>| match o {
            Some(b) => {
                out.push((name, b));
                true
            }
            None => false,
        };
        if let Some(c) = &f.country
            && !empty_ok(get(&self.country, c), "country", out)
        {
            return false;
        }
        for (name, map, v) in [
            ("region", &self.region, f.region),
            ("city", &self.city, f.city),
            ("isp", &self.isp, f.isp),
        ] {
            if let Some(v) = v
                && !empty_ok(get(map, &v), name, out)
            {
                return false;
            }
        }
        if let Some(a) = f.asn
            && !empty_ok(get(&self.asn, &a), "asn", out)
        {
            return false;
        }
        if let Some(n) = f.networks
            && n != NetworkSet::ALL
        {
            out.push(("network", &self.networks[n.0 as usize]));
        }
        true
    }

    /// The selectable nodes matching `f`.
    pub fn candidates(&self, f: &Filter) -> RoaringBitmap {
        let mut sets = Vec::with_capacity(6);
        if !self.filter_sets(f, &mut sets) {
            return RoaringBitmap::new();
        }
        let online = self.selectable.load();
        sets.sort_by_key(|(_, b)| b.len());
        let mut iter = sets.into_iter();
        let mut acc = match iter.next() {
            Some((_, first)) => first & &**online,
            None => return RoaringBitmap::clone(&online),
        };
        for (_, b) in iter {
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
        let mut sets = Vec::with_capacity(6);
        if !self.filter_sets(f, &mut sets) {
            return None;
        }
        let online = self.selectable.load();
        sets.sort_by_key(|(_, b)| b.len());
        let (base, rest): (&RoaringBitmap, &[(&str, &RoaringBitmap)]) = match sets.split_first() {
            Some(((_, first), rest)) => (first, rest),
            None => (&online, &[]),
        };
        let n = base.len();
        if n == 0 {
            return None;
        }
        let draw = |rng: &mut Rng| {
            for _ in 0..SAMPLE_TRIES {
                let i = base.select(rng.below(n) as u32)?;
                if online.contains(i)
                    && !exclude.contains(&i)
                    && rest.iter().all(|(_, b)| b.contains(i))
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
        let sets: [Option<&RoaringBitmap>; 4] = [
            o.city.and_then(|c| self.city.get(&c)),
            o.isp.and_then(|c| self.isp.get(&c)),
            o.asn.and_then(|c| self.asn.get(&c)),
            o.exit_ip().and_then(|ip| self.subnet.get(&subnet_key(ip))),
        ];
        // Most alike first: all four, then dropping the subnet, the ASN, the ISP.
        for keep in (1..=4).rev() {
            let mut tier = cands.clone();
            let mut usable = true;
            for s in &sets[..keep] {
                match s {
                    Some(b) => tier &= *b,
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

    /// The detail of `NODE_NOT_FOUND`: the filter that emptied the set and
    /// how many nodes the broader filter has.
    pub fn not_found(&self, f: &Filter, replacing: bool, geo: &GeoCatalog) -> Rejection {
        let online = self.selectable.load();
        let mut steps: Vec<(String, Option<&RoaringBitmap>)> = Vec::new();
        if let Some(c) = f.country {
            steps.push((format!("country={c}"), self.country.get(&c)));
        }
        for (name, map, v) in [
            ("region", &self.region, f.region),
            ("city", &self.city, f.city),
            ("isp", &self.isp, f.isp),
        ] {
            if let Some(v) = v {
                steps.push((format!("{name}={}", geo.name(v)), map.get(&v)));
            }
        }
        if let Some(a) = f.asn {
            steps.push((format!("asn={a}"), self.asn.get(&a)));
        }
        if let Some(n) = f.networks.filter(|n| *n != NetworkSet::ALL) {
            steps.push((
                format!("network={}", n.to_string().replace(", ", "|")),
                Some(&self.networks[n.0 as usize]),
            ));
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
        let Some(cb) = self.country.get(&country) else {
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

#[cfg(test)]
pub(crate) mod tests;
