//! A fleet of gateways on Redis (SPEC section 11): this gateway's place in
//! it. One thread ("fleet", a Tokio runtime of its own, off the data plane
//! and off the admin API's runtime) keeps:
//! - the registry: `{prefix}:gw:{id}` holds this process's boot id and
//!   expires [`TTL`] after the last heartbeat, so a gateway refuses to start
//!   while another live one holds its `[fleet] id`, and a crashed one's id is
//!   free again within seconds; `{prefix}:gwinfo:{id}` holds what
//!   `GET /v1/gateways` shows (addresses, up since, load), with the same
//!   lifetime; `{prefix}:gateways` is the set of ids to look them up by;
//! - the change channel: every API change made here ([`Change`]) is
//!   published on `{prefix}:changes`; a change published by another gateway
//!   makes this one read the store back ([`Control::reload_store`]; a
//!   node's change, that node's row alone, [`Control::reload_node`]), so the
//!   change is in force here within a round trip and a store read. A
//!   re-subscription (Redis came back) and a periodic full reload heal
//!   what a lost message would miss.
//!
//! - sticky sessions (`sessions`): the one thing a request may wait for
//!   Redis for.
//!
//! When Redis is unreachable the gateway serves on, `splicegate_fleet_redis_up`
//! says 0, the log says so once, and changes made meanwhile are published
//! when it is back.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use prometheus_client::metrics::counter::Counter;
use redis::AsyncCommands as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use splicegate_control::stats::WorkerStats;
use tokio::sync::{Notify, mpsc, watch};

use crate::control::{Change, Control, unix_ms};

mod budgets;
mod errors;
mod sessions;
pub use sessions::{FleetSession, SessionEvent};

/// How often this gateway renews its registry entry, reads the fleet's,
/// and rebalances its shares of the packages' connection limits.
pub const HEARTBEAT: Duration = Duration::from_millis(250);

/// How often a heartbeat walks the node pool for the unhealthy nodes and
/// connected agents it lists.
const NODE_WALK_EVERY: Duration = Duration::from_secs(1);

/// How long a registry entry outlives its last heartbeat.
pub const TTL: Duration = Duration::from_secs(3);
/// Changes kept while Redis is unreachable; past this many, the oldest
/// are dropped and the others' periodic reload picks them up.
const PENDING_MAX: usize = 10_000;

/// How to join the fleet.
#[derive(Clone)]
pub struct FleetOptions {
    /// `[fleet] id`: unique among live gateways.
    pub id: String,
    /// `[fleet] redis`: `redis://host:port/db`, `rediss://…`, or
    /// `unix:///path/to/redis.sock`.
    pub redis: String,
    /// The prefix of every key and channel (`[fleet] prefix`), so that
    /// several fleets may share one Redis.
    pub prefix: String,
    /// The proxy address clients reach this gateway on (shown to the fleet).
    pub proxy: SocketAddr,
    /// The admin API's address (shown to the fleet).
    pub admin: Option<SocketAddr>,
    /// How often the whole policy is read back from the store even without
    /// an announced change.
    pub reload_every: Duration,
    /// `[fleet] lease_bytes`: a traffic-cap lease (a credit lease is that
    /// many bytes at the package's price).
    pub lease_bytes: u64,
}

impl std::fmt::Debug for FleetOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetOptions")
            .field("id", &self.id)
            .field("redis", &redact(&self.redis))
            .field("prefix", &self.prefix)
            .field("proxy", &self.proxy)
            .field("admin", &self.admin)
            .field("reload_every", &self.reload_every)
            .field("lease_bytes", &self.lease_bytes)
            .finish()
    }
}

/// A Redis URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// What a gateway reports about its load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Client connections open now.
    pub connections: u64,
    /// Tunnels open now.
    pub tunnels: u64,
    /// Client connections accepted per second (over the last heartbeat).
    pub accepted_per_s: f64,
    /// Bytes relayed per second, both ways (over the last heartbeat).
    pub bytes_per_s: f64,
}

/// One gateway as the fleet's registry shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayInfo {
    /// `[fleet] id`.
    pub id: String,
    /// This start's boot id.
    pub boot: String,
    /// Its proxy address.
    pub proxy: String,
    /// Its admin API's address.
    pub admin: Option<String>,
    /// When it started, ms since the Unix epoch.
    pub up_since_ms: u64,
    /// Its last heartbeat, ms since the Unix epoch.
    pub seen_ms: u64,
    /// Its load at that heartbeat.
    pub load: Load,
    /// Open connections of each package with `max_connections`, at that
    /// heartbeat.
    #[serde(default)]
    pub connections: BTreeMap<u64, u32>,
    /// Its share of each such package's `max_connections`, as it last
    /// computed it.
    #[serde(default)]
    pub shares: BTreeMap<u64, u32>,
    /// Requests per second checked against each package's `rps_limit`
    /// (admitted or not: its clients' demand), smoothed over heartbeats.
    #[serde(default)]
    pub demand: BTreeMap<u64, f64>,
    /// Its share of each such package's `rps_limit`, requests per second.
    #[serde(default)]
    pub rps_shares: BTreeMap<u64, f64>,
    /// Nodes its health checks judge unhealthy (at most [`NODES_SHOWN`]).
    #[serde(default)]
    pub unhealthy: Vec<String>,
    /// Agent nodes whose device is connected to it (at most
    /// [`NODES_SHOWN`]).
    #[serde(default)]
    pub agents: Vec<String>,
}

/// Node ids a gateway lists in its entry, of each kind.
pub const NODES_SHOWN: usize = 1000;

/// The nodes `policy`'s health checks judge unhealthy and the agent nodes
/// connected here, at most [`NODES_SHOWN`] of each.
fn node_health(policy: &splicegate_control::policy::Policy) -> (Vec<String>, Vec<String>) {
    let (mut unhealthy, mut agents) = (Vec::new(), Vec::new());
    for (_, n) in policy.nodes.iter() {
        if n.is_removed() {
            continue;
        }
        let list = if n.kind == splicegate_control::nodes::NodeKind::Agent {
            if !n.runtime.agent().is_connected() {
                continue;
            }
            &mut agents
        } else {
            if !n.runtime.is_unhealthy() {
                continue;
            }
            &mut unhealthy
        };
        if list.len() < NODES_SHOWN {
            list.push(n.id.to_string());
        }
    }
    (unhealthy, agents)
}

/// What this gateway knows of the fleet, shared with the admin API and
/// `/metrics`.
pub struct FleetView {
    /// This gateway's entry, as last reported.
    me: Mutex<GatewayInfo>,
    /// Every live gateway (this one included) at the last heartbeat that
    /// reached Redis.
    gateways: Mutex<Vec<GatewayInfo>>,
    redis_up: AtomicBool,
    /// The workers' counters, for the load this gateway reports (set once
    /// they run: the id is claimed before they accept anything).
    workers: Mutex<Vec<Arc<WorkerStats>>>,
    /// What waits to be published.
    events: mpsc::UnboundedSender<Event>,
    /// The workers' session requests, for the fleet thread.
    sessions: mpsc::UnboundedSender<sessions::Op>,
    /// The fleet thread's Redis connection, for the admin API's session
    /// listing.
    conn: Mutex<Option<ConnectionManager>>,
    /// `[fleet] prefix`.
    prefix: String,
    /// Where bans announced by others go.
    ban_applier: Mutex<Option<BanApplier>>,
    /// Bans announced by other gateways and applied here.
    pub bans_received: Counter,
    /// Changes made here and published to the fleet.
    pub changes_published: Counter,
    /// Changes other gateways published, received here.
    pub changes_received: Counter,
    /// Reloads from the store that changed something here.
    pub reloads_applied: Counter,
    /// Reloads from the store that failed (retried on the next change or
    /// period).
    pub reload_errors: Counter,
}

impl std::fmt::Debug for FleetView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetView")
            .field("me", &self.me())
            .field("redis_up", &self.redis_up())
            .finish_non_exhaustive()
    }
}

impl FleetView {
    fn new(
        me: GatewayInfo,
        events: mpsc::UnboundedSender<Event>,
        sessions: mpsc::UnboundedSender<sessions::Op>,
        prefix: String,
    ) -> FleetView {
        FleetView {
            events,
            sessions,
            conn: Mutex::new(None),
            prefix,
            ban_applier: Mutex::new(None),
            bans_received: Counter::default(),
            gateways: Mutex::new(vec![me.clone()]),
            me: Mutex::new(me),
            redis_up: AtomicBool::new(false),
            workers: Mutex::new(Vec::new()),
            changes_published: Counter::default(),
            changes_received: Counter::default(),
            reloads_applied: Counter::default(),
            reload_errors: Counter::default(),
        }
    }

    /// The workers whose counters make the load this gateway reports, and
    /// the admin API's address once it serves.
    pub fn serving(&self, workers: Vec<Arc<WorkerStats>>, admin: Option<SocketAddr>) {
        *lock(&self.workers) = workers;
        if let Some(a) = admin {
            lock(&self.me).admin = Some(a.to_string());
        }
    }

    /// Tell the fleet that `ip` was banned here for `ban` (call it from
    /// any thread: it never blocks).
    pub fn announce_ban(&self, ip: IpAddr, ban: Duration) {
        let _ = self.events.send(Event::Ban {
            ip,
            secs: ban.as_secs(),
        });
    }

    /// Where bans other gateways announce are applied.
    pub fn on_ban(&self, f: BanApplier) {
        *lock(&self.ban_applier) = Some(f);
    }

    /// This gateway's `[fleet] id`.
    pub fn id(&self) -> String {
        lock(&self.me).id.clone()
    }

    /// This gateway's own entry.
    pub fn me(&self) -> GatewayInfo {
        lock(&self.me).clone()
    }

    /// The live gateways, sorted by id: as Redis last listed them, or,
    /// while Redis is unreachable, those it listed last (this one with its
    /// current load).
    pub fn gateways(&self) -> Vec<GatewayInfo> {
        let me = self.me();
        let mut out = lock(&self.gateways).clone();
        match out.iter_mut().find(|g| g.id == me.id) {
            Some(g) => *g = me,
            None => out.push(me),
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Whether the last Redis command succeeded.
    pub fn redis_up(&self) -> bool {
        self.redis_up.load(Ordering::Relaxed)
    }

    /// Record whether Redis answered; log a change of state once.
    fn set_redis_up(&self, up: bool, why: &dyn std::fmt::Display) {
        let was = self.redis_up.swap(up, Ordering::Relaxed);
        match (was, up) {
            (true, false) => tracing::error!(
                error = %why,
                "fleet: Redis is unreachable; serving on local state until it is back"
            ),
            (false, true) => tracing::info!("fleet: Redis reachable"),
            _ => {}
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why this gateway cannot join.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// `[fleet] redis` is not a Redis URL.
    #[error("[fleet] redis {url}: {why}")]
    Url {
        /// The URL, without a password.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// Another live gateway holds the id.
    #[error(
        "another live gateway holds [fleet] id {id:?} (proxy {proxy}, up since {since} ms after the epoch, last seen {seen} ms after the epoch); stop it or give this gateway another id"
    )]
    Taken {
        /// The id.
        id: String,
        /// That gateway's proxy address, as it reported it.
        proxy: String,
        /// When it started.
        since: u64,
        /// Its last heartbeat.
        seen: u64,
    },
    /// The thread could not start.
    #[error("the fleet thread: {0}")]
    Thread(String),
}

/// What this gateway tells the others.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// An API change (the data is in the store).
    Change(Change),
    /// A sticky session moved or ended here.
    Session(SessionEvent),
    /// A source banned here after repeated `AUTH_FAILED`.
    Ban {
        /// The source address.
        ip: IpAddr,
        /// How long, from when it is received.
        secs: u64,
    },
}

/// A message on the change channel.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    /// The announcing gateway's id and boot.
    gateway: String,
    boot: String,
    #[serde(flatten)]
    event: Event,
}

/// Applies a ban another gateway announced (the guard, and the kernel's
/// map when the programs run).
pub type BanApplier = Arc<dyn Fn(IpAddr, Duration) + Send + Sync>;

/// The keys of one fleet.
#[derive(Debug, Clone)]
struct Keys {
    gw: String,
    info: String,
    set: String,
    changes: String,
    prefix: String,
}

impl Keys {
    fn new(prefix: &str, id: &str) -> Keys {
        Keys {
            gw: format!("{prefix}:gw:{id}"),
            info: format!("{prefix}:gwinfo:{id}"),
            set: format!("{prefix}:gateways"),
            changes: format!("{prefix}:changes"),
            prefix: prefix.to_string(),
        }
    }

    fn info_of(&self, id: &str) -> String {
        format!("{}:gwinfo:{id}", self.prefix)
    }
}

/// Renew this gateway's entry if it is still ours (1), take it again if it
/// expired meanwhile (2), or say another process holds it (0).
const HEARTBEAT_SCRIPT: &str = r"
local ttl = tonumber(ARGV[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ttl)
  redis.call('SADD', KEYS[3], ARGV[4])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ttl) then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ttl)
  redis.call('SADD', KEYS[3], ARGV[4])
  return 2
end
return 0
";

/// [`HEARTBEAT_SCRIPT`] with its SHA-1 computed once, not per beat.
static HEARTBEAT_RUN: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(HEARTBEAT_SCRIPT));

/// Remove this gateway's entry if it is still ours.
const LEAVE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('SREM', KEYS[3], ARGV[2])
  return 1
end
return 0
";

/// This gateway in the fleet: the thread and what it shares.
#[derive(Debug)]
pub struct Fleet {
    view: Arc<FleetView>,
    thread: crate::server::ThreadHandle,
}

impl Fleet {
    /// Join: claim the id (waiting up to [`TTL`] and a second for a
    /// crashed predecessor's entry to expire), then run the registry, the
    /// change channel and the reloads on the "fleet" thread. Redis being
    /// unreachable does not stop the start: the gateway serves on local
    /// state and claims its id when Redis is back.
    pub fn join(control: Arc<Control>, opts: FleetOptions) -> Result<Fleet, FleetError> {
        let client = redis::Client::open(opts.redis.as_str()).map_err(|e| FleetError::Url {
            url: redact(&opts.redis),
            why: e.to_string(),
        })?;
        let now = unix_ms();
        let me = GatewayInfo {
            id: opts.id.clone(),
            boot: boot_id(),
            proxy: opts.proxy.to_string(),
            admin: opts.admin.map(|a| a.to_string()),
            up_since_ms: now,
            seen_ms: now,
            load: Load::default(),
            connections: BTreeMap::new(),
            shares: BTreeMap::new(),
            demand: BTreeMap::new(),
            rps_shares: BTreeMap::new(),
            unhealthy: Vec::new(),
            agents: Vec::new(),
        };
        let (events, rx) = mpsc::unbounded_channel();
        let (session_ops, session_rx) = mpsc::unbounded_channel();
        let view = Arc::new(FleetView::new(me, events, session_ops, opts.prefix.clone()));
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread_view = view.clone();
        let thread = std::thread::Builder::new()
            .name("fleet".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(FleetError::Thread(e.to_string())));
                        return;
                    }
                };
                rt.block_on(run(
                    client,
                    control,
                    opts,
                    thread_view,
                    (rx, session_rx),
                    stop_rx,
                    ready_tx,
                ));
            })
            .map_err(|e| FleetError::Thread(e.to_string()))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Fleet {
                view,
                thread: crate::server::ThreadHandle::new(thread, stop),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(FleetError::Thread("ended before joining".into()))
            }
        }
    }

    /// What this gateway knows of the fleet.
    pub fn view(&self) -> Arc<FleetView> {
        self.view.clone()
    }

    /// Leave: stop the thread, which removes this gateway's entry (so the
    /// id is free at once, not after [`TTL`]).
    pub fn stop(mut self) {
        self.thread.stop();
    }
}

/// A boot id no other start shares: the clock's nanoseconds, the pid and
/// random bits.
fn boot_id() -> String {
    let mut r = [0u8; 8];
    let _ = getrandom::fill(&mut r);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "{:016x}{:08x}{:016x}",
        nanos,
        std::process::id(),
        u64::from_le_bytes(r)
    )
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(1000)))
        .set_response_timeout(Some(Duration::from_millis(1000)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(1000))
}

async fn run(
    client: redis::Client,
    control: Arc<Control>,
    opts: FleetOptions,
    view: Arc<FleetView>,
    (rx, session_rx): (
        mpsc::UnboundedReceiver<Event>,
        mpsc::UnboundedReceiver<sessions::Op>,
    ),
    stop: watch::Receiver<bool>,
    ready: std::sync::mpsc::Sender<Result<(), FleetError>>,
) {
    let keys = Keys::new(&opts.prefix, &opts.id);
    let mut conn = match client.get_connection_manager_lazy(manager_config()) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(FleetError::Url {
                url: redact(&opts.redis),
                why: e.to_string(),
            }));
            return;
        }
    };
    if let Err(e) = claim(&mut conn, &keys, &view).await {
        let _ = ready.send(Err(e));
        return;
    }
    view.set_conn(conn.clone());
    let reload = Arc::new(Notify::new());
    let tx = view.events.clone();
    control.on_change(Arc::new(move |c| {
        let _ = tx.send(Event::Change(c));
    }));
    let _ = ready.send(Ok(()));
    let tasks = [
        tokio::spawn(heartbeat(
            control.clone(),
            conn.clone(),
            keys.clone(),
            view.clone(),
            reload.clone(),
            rx,
            stop.clone(),
        )),
        tokio::spawn(budgets::serve(
            control.clone(),
            conn.clone(),
            opts.prefix.clone(),
            opts.lease_bytes,
            view.clone(),
            stop.clone(),
        )),
        tokio::spawn(errors::serve(
            control.clone(),
            conn.clone(),
            opts.prefix.clone(),
            view.clone(),
            HEARTBEAT,
            stop.clone(),
        )),
        tokio::spawn(sessions::serve(
            conn.clone(),
            opts.prefix.clone(),
            view.clone(),
            session_rx,
            stop.clone(),
        )),
        tokio::spawn(listen(
            client,
            control.clone(),
            keys.changes.clone(),
            view.clone(),
            reload.clone(),
            stop.clone(),
        )),
        tokio::spawn(reloads(
            control,
            view.clone(),
            reload,
            opts.reload_every,
            stop.clone(),
        )),
    ];
    let mut stop = stop;
    let _ = stop.wait_for(|s| *s).await;
    for t in tasks {
        t.abort();
    }
    let me = view.me();
    let left = tokio::time::timeout(
        Duration::from_secs(1),
        redis::Script::new(LEAVE_SCRIPT)
            .key(&keys.gw)
            .key(&keys.info)
            .key(&keys.set)
            .arg(&me.boot)
            .arg(&me.id)
            .invoke_async::<i64>(&mut conn),
    )
    .await;
    match left {
        Ok(Ok(1)) => tracing::info!(id = %me.id, "fleet: left"),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "fleet: could not remove this gateway's entry; it expires by itself")
        }
        Err(_) => {
            tracing::warn!("fleet: Redis did not answer the leave; the entry expires by itself")
        }
    }
}

/// Take the id: at once if free; a holder whose entry expires within
/// [`TTL`] and a second was a crashed predecessor; one that keeps renewing
/// it is alive, and the start is refused.
async fn claim(
    conn: &mut ConnectionManager,
    keys: &Keys,
    view: &FleetView,
) -> Result<(), FleetError> {
    let deadline = Instant::now() + TTL + Duration::from_secs(1);
    let mut waited = false;
    loop {
        match beat(conn, keys, &view.me()).await {
            Ok(0) => {}
            Ok(_) => {
                view.set_redis_up(true, &"joined");
                if waited {
                    tracing::info!(id = %view.id(), "fleet: the id's previous holder expired; joined");
                }
                return Ok(());
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    "fleet: Redis is unreachable at start; serving on local state, and the id is claimed when Redis is back"
                );
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            let held: Option<String> = conn.get(&keys.info).await.ok().flatten();
            let other = held.and_then(|j| serde_json::from_str::<GatewayInfo>(&j).ok());
            return Err(FleetError::Taken {
                id: view.id(),
                proxy: other.as_ref().map_or("?".into(), |o| o.proxy.clone()),
                since: other.as_ref().map_or(0, |o| o.up_since_ms),
                seen: other.as_ref().map_or(0, |o| o.seen_ms),
            });
        }
        if !waited {
            tracing::info!(
                id = %view.id(),
                "fleet: the id is held; waiting up to {} s to see whether its holder is alive",
                (TTL + Duration::from_secs(1)).as_secs()
            );
            waited = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One run of [`HEARTBEAT_SCRIPT`] with `me`.
async fn beat(
    conn: &mut ConnectionManager,
    keys: &Keys,
    me: &GatewayInfo,
) -> redis::RedisResult<i64> {
    let info = serde_json::to_string(me).unwrap_or_default();
    HEARTBEAT_RUN
        .key(&keys.gw)
        .key(&keys.info)
        .key(&keys.set)
        .arg(&me.boot)
        .arg(TTL.as_millis() as u64)
        .arg(info)
        .arg(&me.id)
        .invoke_async(conn)
        .await
}

/// Readings of the workers' counters, for rates between two heartbeats.
#[derive(Debug, Clone, Copy)]
struct Reading {
    at: Instant,
    accepted: u64,
    bytes: u64,
}

fn read(workers: &[Arc<WorkerStats>]) -> (Reading, u64, u64) {
    let sum = |f: fn(&WorkerStats) -> u64| workers.iter().map(|w| f(w)).sum::<u64>();
    (
        Reading {
            at: Instant::now(),
            accepted: sum(|w| w.accepted.load(Ordering::Relaxed)),
            bytes: sum(|w| {
                w.bytes_up.load(Ordering::Relaxed) + w.bytes_down.load(Ordering::Relaxed)
            }),
        },
        sum(|w| w.open_connections.load(Ordering::Relaxed)),
        sum(|w| w.open_tunnels.load(Ordering::Relaxed)),
    )
}

/// Every [`HEARTBEAT`]: report the load, renew the entry, publish what
/// waits, and read the fleet's registry.
async fn heartbeat(
    control: Arc<Control>,
    mut conn: ConnectionManager,
    keys: Keys,
    view: Arc<FleetView>,
    reload: Arc<Notify>,
    mut changes: mpsc::UnboundedReceiver<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last, _, _) = read(&lock(&view.workers));
    let mut pending: VecDeque<Event> = VecDeque::new();
    let mut conflict_logged = false;
    // Per rate-limited package: its attempts counter at the last heartbeat
    // and the smoothed demand.
    let mut demand: BTreeMap<u64, (u64, f64)> = BTreeMap::new();
    // When the nodes were last walked (none yet: the first beat walks).
    let mut walked: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(c) = changes.recv() => {
                if pending.len() >= PENDING_MAX {
                    pending.pop_front();
                }
                pending.push_back(c);
                publish(&mut conn, &keys, &view, &mut pending).await;
                continue;
            }
            _ = stop.changed() => return,
        }
        let (now, connections, tunnels) = read(&lock(&view.workers));
        let secs = now.at.duration_since(last.at).as_secs_f64().max(0.001);
        let policy = control.engine().policy_arc();
        {
            let mut me = lock(&view.me);
            me.connections = policy
                .packages
                .iter()
                .filter(|(_, p)| p.decl.max_connections > 0)
                .map(|(id, p)| (*id, p.usage.connections()))
                .collect();
            let mut next = BTreeMap::new();
            for (id, p) in policy.packages.iter().filter(|(_, p)| p.decl.rps_limit > 0) {
                let attempts = p.usage.rps_attempts();
                let (before, smoothed) = demand.get(id).copied().unwrap_or((attempts, 0.0));
                let now_rate = attempts.saturating_sub(before) as f64 / secs;
                next.insert(*id, (attempts, 0.5 * smoothed + 0.5 * now_rate));
            }
            demand = next;
            me.demand = demand.iter().map(|(id, (_, d))| (*id, *d)).collect();
            // A walk over every node: at the first beat, then once a
            // second, not every heartbeat.
            if walked.is_none_or(|t| t.elapsed() >= NODE_WALK_EVERY) {
                (me.unhealthy, me.agents) = node_health(&policy);
                walked = Some(Instant::now());
            }
            me.seen_ms = unix_ms();
            me.load = Load {
                connections,
                tunnels,
                accepted_per_s: now.accepted.saturating_sub(last.accepted) as f64 / secs,
                bytes_per_s: now.bytes.saturating_sub(last.bytes) as f64 / secs,
            };
        }
        last = now;
        let was_up = view.redis_up();
        match beat(&mut conn, &keys, &view.me()).await {
            Ok(0) => {
                if !conflict_logged {
                    tracing::error!(
                        id = %view.id(),
                        "fleet: another live gateway took this gateway's [fleet] id (while Redis was unreachable?); both serve, but the fleet shows one: give one of them another id"
                    );
                    conflict_logged = true;
                }
                view.set_redis_up(true, &"");
            }
            Ok(_) => {
                conflict_logged = false;
                view.set_redis_up(true, &"");
            }
            Err(e) => {
                view.set_redis_up(false, &e);
                continue;
            }
        }
        if !was_up {
            // Changes made elsewhere while this gateway could not hear them.
            reload.notify_one();
        }
        publish(&mut conn, &keys, &view, &mut pending).await;
        match list(&mut conn, &keys).await {
            Ok(all) => {
                let (mine, rps) = rebalance(&policy, &view.me(), &all);
                let mut me = lock(&view.me);
                me.shares = mine;
                me.rps_shares = rps;
                drop(me);
                *lock(&view.gateways) = all;
            }
            // Each package keeps its last share until Redis answers.
            Err(e) => view.set_redis_up(false, &e),
        }
    }
}

/// Set this gateway's share of each package's `max_connections` from the
/// open connections every live gateway reported: each keeps what it holds,
/// and what is free is split evenly (the remainder to the first ids), so
/// the shares add up to the limit and a gateway whose clients want more
/// gets more as others' connections close. Returns the shares.
fn rebalance(
    policy: &splicegate_control::policy::Policy,
    me: &GatewayInfo,
    all: &[GatewayInfo],
) -> (BTreeMap<u64, u32>, BTreeMap<u64, f64>) {
    let mut ids: Vec<&str> = all.iter().map(|g| g.id.as_str()).collect();
    if !ids.contains(&me.id.as_str()) {
        ids.push(&me.id);
    }
    ids.sort_unstable();
    let n = ids.len() as u32;
    let rank = ids.iter().position(|id| *id == me.id).unwrap_or(0) as u32;
    let mut shares = BTreeMap::new();
    let mut rps_shares = BTreeMap::new();
    for (id, p) in &policy.packages {
        let rps = p.decl.rps_limit;
        if rps == 0 {
            p.usage.set_rps_share_milli(None);
        } else {
            let mine = me.demand.get(id).copied().unwrap_or(0.0);
            let others: f64 = all
                .iter()
                .filter(|g| g.id != me.id)
                .map(|g| g.demand.get(id).copied().unwrap_or(0.0))
                .sum();
            let share = rps_share(f64::from(rps), mine, others, n);
            p.usage.set_rps_share_milli(Some((share * 1000.0) as u64));
            rps_shares.insert(*id, share);
        }
        let max = p.decl.max_connections;
        if max == 0 {
            p.usage.set_fleet_share(None);
            continue;
        }
        let mine = p.usage.connections();
        let others: u32 = all
            .iter()
            .filter(|g| g.id != me.id)
            .map(|g| g.connections.get(id).copied().unwrap_or(0))
            .sum();
        let share = share_of(max, mine, others, n, rank);
        p.usage.set_fleet_share(Some(share));
        shares.insert(*id, share);
    }
    (shares, rps_shares)
}

/// One gateway's share of a rate limit, from every gateway's demand
/// (requests per second its clients ask for, admitted or not): when the
/// fleet asks for less than the limit, each gets its demand and an even
/// part of the rest; when it asks for more, the limit is split in
/// proportion to demand. The shares add up to the limit either way.
fn rps_share(limit: f64, mine: f64, others: f64, n: u32) -> f64 {
    let total = mine + others;
    if total <= limit {
        mine + (limit - total) / f64::from(n.max(1))
    } else {
        limit * mine / total
    }
}

/// One gateway's share of `max`: what it holds (`mine`) and, of what no
/// gateway holds, its even part (`n` gateways, the remainder to the
/// first `rank`s).
fn share_of(max: u32, mine: u32, others: u32, n: u32, rank: u32) -> u32 {
    let n = n.max(1);
    let free = max.saturating_sub(mine.saturating_add(others));
    mine + free / n + u32::from(rank < free % n)
}

/// Publish the changes waiting, oldest first; stop at the first failure
/// (they wait for the next heartbeat).
async fn publish(
    conn: &mut ConnectionManager,
    keys: &Keys,
    view: &FleetView,
    pending: &mut VecDeque<Event>,
) {
    let me = view.me();
    while let Some(e) = pending.front() {
        let msg = Envelope {
            gateway: me.id.clone(),
            boot: me.boot.clone(),
            event: e.clone(),
        };
        let text = serde_json::to_string(&msg).unwrap_or_default();
        match conn.publish::<_, _, i64>(&keys.changes, text).await {
            Ok(_) => {
                view.changes_published.inc();
                pending.pop_front();
            }
            Err(e) => {
                view.set_redis_up(false, &e);
                return;
            }
        }
    }
}

/// The live gateways: the ids in the set whose entries still exist; the
/// others (expired) are taken out of the set.
async fn list(conn: &mut ConnectionManager, keys: &Keys) -> redis::RedisResult<Vec<GatewayInfo>> {
    let ids: Vec<String> = conn.smembers(&keys.set).await?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let info_keys: Vec<String> = ids.iter().map(|id| keys.info_of(id)).collect();
    let infos: Vec<Option<String>> = redis::cmd("MGET").arg(&info_keys).query_async(conn).await?;
    let mut out = Vec::new();
    let mut dead = Vec::new();
    for (id, info) in ids.iter().zip(infos) {
        match info.and_then(|j| serde_json::from_str::<GatewayInfo>(&j).ok()) {
            Some(g) => out.push(g),
            None => dead.push(id.clone()),
        }
    }
    if !dead.is_empty() {
        let _: i64 = conn.srem(&keys.set, &dead).await?;
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Subscribe to the change channel; a change from another gateway (or a
/// new subscription, which may have missed some) asks for a reload, but
/// for a node's change, which reads that node alone.
async fn listen(
    client: redis::Client,
    control: Arc<Control>,
    channel: String,
    view: Arc<FleetView>,
    reload: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let me = view.me();
    let (nodes, queued) = mpsc::unbounded_channel();
    tokio::spawn(node_changes(
        control.clone(),
        view.clone(),
        reload.clone(),
        queued,
        stop.clone(),
    ));
    loop {
        let subscribed = async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&channel).await?;
            redis::RedisResult::Ok(ps)
        };
        let ps = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(2), subscribed) => r,
            _ = stop.changed() => return,
        };
        match ps {
            Ok(Ok(ps)) => {
                reload.notify_one();
                let mut messages = ps.into_on_message();
                loop {
                    let msg = tokio::select! {
                        m = messages.next() => m,
                        _ = stop.changed() => return,
                    };
                    let Some(msg) = msg else { break };
                    let Ok(env) = serde_json::from_slice::<Envelope>(msg.get_payload_bytes())
                    else {
                        tracing::warn!("fleet: an unreadable message on the change channel");
                        continue;
                    };
                    if env.boot == me.boot {
                        continue;
                    }
                    match env.event {
                        Event::Change(Change::Node(id)) => {
                            // One node: its row alone, applied to the running
                            // pool (a full read of a million nodes takes
                            // seconds), one after another by one task.
                            view.changes_received.inc();
                            tracing::debug!(from = %env.gateway, node = %id, "fleet: node change announced");
                            let _ = nodes.send(id);
                        }
                        Event::Change(c) => {
                            view.changes_received.inc();
                            tracing::debug!(from = %env.gateway, change = ?c, "fleet: change announced");
                            reload.notify_one();
                        }
                        Event::Session(e) => sessions::apply(&control, e),
                        Event::Ban { ip, secs } => {
                            view.bans_received.inc();
                            let applier = lock(&view.ban_applier).clone();
                            if let Some(f) = applier {
                                tracing::info!(client = %ip, ban_s = secs, from = %env.gateway, "banned: another gateway of the fleet banned it");
                                f(ip, Duration::from_secs(secs));
                            }
                        }
                    }
                }
            }
            Ok(Err(e)) => view.set_redis_up(false, &e),
            Err(_) => view.set_redis_up(false, &"no answer to SUBSCRIBE within 2 s"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Node changes announced in one go past this many are left to one full
/// read back instead of being read one row at a time.
const NODE_CHANGES_ONE_BY_ONE: usize = 256;

/// Apply the node changes other gateways announce, one task for all of
/// them (each holds the control lock while it runs): a burst
/// (another gateway importing nodes) becomes one full read back; an error
/// asks for one too.
async fn node_changes(
    control: Arc<Control>,
    view: Arc<FleetView>,
    reload: Arc<Notify>,
    mut queued: mpsc::UnboundedReceiver<String>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let mut ids = Vec::new();
        let received = tokio::select! {
            n = queued.recv_many(&mut ids, usize::MAX) => n,
            _ = stop.changed() => return,
        };
        if received == 0 {
            return;
        }
        // Each is read back as its row is now, so their order does not
        // matter and a node announced twice is read once.
        ids.sort_unstable();
        ids.dedup();
        if ids.len() > NODE_CHANGES_ONE_BY_ONE {
            tracing::info!(
                nodes = ids.len(),
                "fleet: many node changes at once; reading the store"
            );
            reload.notify_one();
            continue;
        }
        let c = control.clone();
        let applied = tokio::task::spawn_blocking(move || {
            let mut changed = Vec::new();
            for id in ids {
                match c.reload_node(&id) {
                    Ok(true) => changed.push(id),
                    Ok(false) => {}
                    Err(e) => return Err((id, e)),
                }
            }
            Ok(changed)
        })
        .await;
        match applied {
            Ok(Ok(changed)) => {
                for id in changed {
                    view.reloads_applied.inc();
                    tracing::info!(node = %id, "fleet: a node changed elsewhere is in force");
                }
            }
            Ok(Err((id, e))) => {
                tracing::warn!(node = %id, error = %e, "fleet: cannot read one node back; reading the store");
                reload.notify_one();
            }
            Err(_) => reload.notify_one(),
        }
    }
}

/// Read the store back when asked, and every `every` regardless.
async fn reloads(
    control: Arc<Control>,
    view: Arc<FleetView>,
    asked: Arc<Notify>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = asked.notified() => {}
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let c = control.clone();
        let done = tokio::task::spawn_blocking(move || c.reload_store()).await;
        match done {
            Ok(Ok(r)) => {
                if failing {
                    tracing::info!("fleet: reading the store back works again");
                    failing = false;
                }
                if r.any() {
                    view.reloads_applied.inc();
                    tracing::info!(
                        policy = r.policy,
                        grants = r.grants,
                        resets = r.resets,
                        "fleet: changes made elsewhere are in force"
                    );
                }
            }
            Ok(Err(e)) => {
                view.reload_errors.inc();
                if !failing {
                    tracing::error!(error = %e, "fleet: cannot read the store back; retrying");
                    failing = true;
                }
            }
            Err(e) => {
                view.reload_errors.inc();
                tracing::error!(error = %e, "fleet: the reload task failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_limit_and_follow_what_is_held() {
        // Three gateways holding 5, 1 and 0 of a limit of 10: each keeps
        // what it holds and the 4 free go 2, 1, 1.
        let held = [5, 1, 0];
        let total: u32 = held.iter().sum();
        let shares: Vec<u32> = (0..3)
            .map(|r| share_of(10, held[r], total - held[r], 3, r as u32))
            .collect();
        assert_eq!(shares, [7, 2, 1]);
        assert_eq!(shares.iter().sum::<u32>(), 10);
        // Nothing held: 10 split 4, 3, 3.
        let idle: Vec<u32> = (0..3).map(|r| share_of(10, 0, 0, 3, r)).collect();
        assert_eq!(idle, [4, 3, 3]);
        // Over the limit (a transition): nobody gets more than it holds.
        assert_eq!(share_of(10, 6, 6, 3, 0), 6);
        // Alone: the whole limit.
        assert_eq!(share_of(10, 3, 0, 1, 0), 10);
    }

    #[test]
    fn rate_shares_follow_demand_and_add_up_to_the_limit() {
        // Each of three gateways' shares of a limit of 100, by demand.
        let shares = |d: [f64; 3]| {
            let total: f64 = d.iter().sum();
            d.map(|m| rps_share(100.0, m, total - m, 3))
        };
        // 80/15/5 % of three times the limit.
        assert_eq!(shares([240.0, 45.0, 15.0]), [80.0, 15.0, 5.0]);
        // Below the limit: demand met, the rest split evenly.
        let s = shares([30.0, 0.0, 10.0]);
        assert_eq!(s, [50.0, 20.0, 30.0]);
        assert!((s.iter().sum::<f64>() - 100.0).abs() < 1e-9);
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redact("redis://:s3cret@10.0.0.1:6379/0"),
            "redis://***@10.0.0.1:6379/0"
        );
        assert_eq!(redact("redis://10.0.0.1:6379"), "redis://10.0.0.1:6379");
        assert_eq!(redact("unix:///run/redis.sock"), "unix:///run/redis.sock");
    }

    #[test]
    fn a_change_crosses_the_channel_as_written() {
        let env = Envelope {
            gateway: "gw1".into(),
            boot: "b".into(),
            event: Event::Change(Change::Package(7)),
        };
        let text = serde_json::to_string(&env).unwrap();
        assert_eq!(
            text,
            r#"{"gateway":"gw1","boot":"b","change":{"kind":"package","id":7}}"#
        );
        let back: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(back.event, Event::Change(Change::Package(7)));
        let ban = Envelope {
            gateway: "gw1".into(),
            boot: "b".into(),
            event: Event::Ban {
                ip: "127.1.2.3".parse().unwrap(),
                secs: 600,
            },
        };
        let text = serde_json::to_string(&ban).unwrap();
        assert_eq!(
            text,
            r#"{"gateway":"gw1","boot":"b","ban":{"ip":"127.1.2.3","secs":600}}"#
        );
        let back: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(back.event, ban.event);
    }
}
