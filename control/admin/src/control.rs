//! The control object: the one writer of the policy. It owns the store, the
//! config file's declarations and the engine, merges the file's objects with
//! those created through the API into one set of declarations, builds a new
//! policy snapshot on every change and publishes it, so the next request sees
//! the change. It also turns the packages' cumulative counters into ledger
//! rows once a second.
//!
//! Invariants:
//! - every change is validated by building the new policy before anything is
//!   written; a refused change leaves the store and the running policy as
//!   they were;
//! - balances and usage are only ever restored from the store (grants minus
//!   charges, sums of ledger rows), at start and when an object enters the
//!   policy; they are never written back as totals;
//! - the ledger appends the difference of two readings of cumulative counters,
//!   all packages in one transaction, so a crash loses at most what came after
//!   the last flush and nothing is counted twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use splicegate_control::Now;
use splicegate_control::engine::Engine;
use splicegate_control::geo::Country;
use splicegate_control::ledger::Ledger;
use splicegate_control::limits::UsageTotals;
use splicegate_control::nodes::{NodeDecl, NodeIdx, NodeKind};
use splicegate_control::policy::{Declarations, NodeChange, OrgDecl, PackageDecl, Policy};
use splicegate_control::rules::Network;

use crate::error::{ControlError, EnrolError, FROM_FILE, StoreError};
use crate::store::{GrantReason, Store, StoreLocation, UsageRow};
use splicegate_control::decl::{NodeFields, PackageFields, catalogue_name, normalise_name};

/// The monotonic clock the data plane uses (sessions expire by it).
pub type Clock = fn() -> Now;

/// How to open the control object.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// The store: an SQLite file (or `":memory:"`), or PostgreSQL.
    pub store: StoreLocation,
    /// Sessions the engine's table holds.
    pub session_capacity: usize,
    /// The data plane's monotonic clock.
    pub clock: Clock,
    /// This gateway's id in the ledger's flush keys (`[fleet] id`, else
    /// `"local"`).
    pub gateway_id: String,
    /// Where a PostgreSQL store's local snapshot lives (`[store]
    /// snapshot`): written while the database is up, served from when it
    /// is down at start. Ignored for SQLite.
    pub snapshot: Option<std::path::PathBuf>,
}

/// How often the local snapshot is written without an API change (for
/// fresh usage totals). A snapshot reads every API object from the store
/// under the control lock (about 3 s for a million nodes): rare on purpose.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(300);

/// Where the local snapshot goes and when it was last written.
#[derive(Debug)]
struct SnapshotState {
    path: std::path::PathBuf,
    /// An API change asked for a new one.
    due: AtomicBool,
    /// When it was last written (or the database last tried).
    written: Mutex<Option<Instant>>,
}

/// The store's usage totals ([`Control::stored_usage`]).
#[derive(Debug, Clone, Default)]
pub struct StoredUsage {
    /// Each package's usage in its current epoch.
    pub packages: HashMap<u64, UsageTotals>,
    /// Micro-credits each organisation spent.
    pub spent: HashMap<String, i64>,
}

impl StoredUsage {
    fn read(store: &dyn Store) -> Result<StoredUsage, StoreError> {
        Ok(StoredUsage {
            packages: store.usage_totals()?,
            spent: store.spent()?,
        })
    }
}

/// Usage as the whole fleet relayed it ([`Control::fleet_usage`]).
#[derive(Debug, Clone, Default)]
pub struct FleetUsage {
    stored: Arc<StoredUsage>,
    /// This gateway's readings last handed to the store.
    written: Arc<HashMap<u64, UsageTotals>>,
    /// Each organisation's spending when it was read.
    spent: Arc<HashMap<String, i64>>,
}

impl FleetUsage {
    /// What this gateway relayed for `package` since it last wrote, from
    /// its counters now (`local`).
    fn unwritten(&self, package: u64, local: UsageTotals) -> UsageTotals {
        let w = self.written.get(&package).copied().unwrap_or_default();
        UsageTotals {
            bytes_up: local.bytes_up.saturating_sub(w.bytes_up),
            bytes_down: local.bytes_down.saturating_sub(w.bytes_down),
            requests: local.requests.saturating_sub(w.requests),
            charged: local.charged.saturating_sub(w.charged),
        }
    }

    /// A package's fleet-wide usage in its current epoch.
    pub fn package(&self, package: u64, local: UsageTotals) -> UsageTotals {
        let s = self
            .stored
            .packages
            .get(&package)
            .copied()
            .unwrap_or_default();
        let u = self.unwritten(package, local);
        UsageTotals {
            bytes_up: s.bytes_up + u.bytes_up,
            bytes_down: s.bytes_down + u.bytes_down,
            requests: s.requests + u.requests,
            charged: s.charged + u.charged,
        }
    }

    /// An organisation's fleet-wide spending (micro-credits).
    pub fn spent(&self, org: &str) -> i64 {
        self.spent.get(org).copied().unwrap_or(0)
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What one flush wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Ledger rows appended (packages with usage since the last flush).
    pub rows: usize,
}

/// The control object (see the module doc). `Send + Sync`: shared as
/// `Arc<Control>` by the admin thread, the binary's main thread and the
/// gateway's agent listener.
#[derive(Debug)]
pub struct Control {
    engine: Arc<Engine>,
    inner: Mutex<Inner>,
    /// The local snapshot of a PostgreSQL store, when configured.
    snapshot: Option<SnapshotState>,
    /// Agent ids revoked (deleted agent nodes): loaded at start, added to by
    /// deletions here and by what enrolment finds in the store. Its own
    /// lock, never held across the store, so a look-up never waits for one.
    revoked: Mutex<HashSet<String>>,
    /// Told of every API change (the fleet), when set.
    announcer: sync::AnnouncerSlot,
    /// The last [`Control::fleet_usage`] and when it was read.
    fleet_usage: Mutex<Option<(std::time::Instant, FleetUsage)>>,
    clock: Clock,
    /// Store flush latency, seconds.
    pub flush_seconds: Histogram,
    /// Flushes that failed (their deltas are retried by the next one).
    pub flush_errors: Counter,
    /// Ledger rows waiting in memory for the store (an outage).
    pub backlog_rows: Gauge,
}

/// A flush as written: its key and rows.
#[derive(Debug)]
struct Batch {
    key: crate::store::FlushKey,
    rows: Vec<UsageRow>,
}

/// The keys of this process's flushes: the gateway's id, a boot id drawn
/// at start, and a sequence.
#[derive(Debug)]
struct FlushKeys {
    gateway: String,
    boot: i64,
    seq: i64,
}

impl FlushKeys {
    fn new(gateway: &str) -> FlushKeys {
        // A boot id no other start of this gateway shares: the clock's
        // nanoseconds and the pid.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let boot = (nanos ^ (u64::from(std::process::id()) << 32)) & (i64::MAX as u64);
        FlushKeys {
            gateway: gateway.to_string(),
            boot: boot as i64,
            seq: 0,
        }
    }

    fn next(&mut self) -> crate::store::FlushKey {
        self.seq += 1;
        crate::store::FlushKey {
            gateway: self.gateway.clone(),
            boot: self.boot,
            seq: self.seq,
        }
    }
}

#[derive(Debug)]
struct Inner {
    store: Box<dyn Store>,
    /// What the config file declares (objects with `from_file: true`,
    /// catalogue names, target safety).
    file: Declarations,
    /// Organisations created through the API.
    orgs: BTreeMap<String, OrgDecl>,
    /// Packages created through the API.
    packages: BTreeMap<u64, PackageDecl>,
    /// Nodes created through the API.
    nodes: BTreeMap<String, NodeDecl>,
    /// Turns readings into deltas.
    ledger: Ledger,
    /// A flush the store did not confirm: retried as it was, with its key,
    /// before anything else is written (it may have been committed).
    attempted: Option<Batch>,
    /// Usage read while an unconfirmed flush blocks the way, by package,
    /// epoch, minute and organisation: bounded by those, not by time.
    waiting: BTreeMap<(u64, i64, i64, String), UsageRow>,
    /// This process's flush keys.
    flush_key: FlushKeys,
    /// Usage epoch per package (0 until its first reset).
    epochs: HashMap<u64, i64>,
    /// The store's catalogue version when the objects above were last
    /// read whole ([`Store::catalog_version`]): a read back that finds it
    /// unchanged skips reading them.
    catalog_seen: Option<i64>,
}

/// The ids an object set has, to find what is new in a snapshot.
struct Present {
    orgs: HashSet<String>,
    packages: HashSet<u64>,
}

impl Present {
    fn of(p: Option<&Policy>) -> Present {
        Present {
            orgs: p
                .map(|p| p.orgs.keys().cloned().collect())
                .unwrap_or_default(),
            packages: p
                .map(|p| p.packages.keys().copied().collect())
                .unwrap_or_default(),
        }
    }
}

/// A declaration the store keeps as JSON fields, read back; a row that no
/// longer reads is a corrupt store, named.
fn stored<F: serde::de::DeserializeOwned, D>(
    what: &'static str,
    id: &dyn std::fmt::Display,
    spec: &str,
    to_decl: impl Fn(&F) -> Result<D, splicegate_control::decl::DeclError>,
) -> Result<D, StoreError> {
    serde_json::from_str::<F>(spec)
        .map_err(|e| e.to_string())
        .and_then(|f| to_decl(&f).map_err(|e| e.to_string()))
        .map_err(|reason| StoreError::Corrupt {
            what,
            id: id.to_string(),
            reason,
        })
}

fn valid_org_id(id: &str) -> Result<(), ControlError> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
    {
        return Err(ControlError::Invalid(format!(
            "org id {id:?}: 1 to 128 of letters, digits, '_', '-', '.'"
        )));
    }
    Ok(())
}

/// A new package key: `pk_` and 24 url-safe characters from the kernel's
/// random source (144 bits).
pub fn generate_key() -> std::io::Result<String> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut raw = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    let mut key = String::from("pk_");
    key.extend(raw.iter().map(|b| ALPHABET[(b & 63) as usize] as char));
    Ok(key)
}

/// A new agent key: `ak_` and 32 bytes from the kernel's random source in
/// base64url without padding (43 characters, 256 bits).
pub fn generate_agent_key() -> std::io::Result<String> {
    use base64::Engine as _;
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(format!(
        "ak_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    ))
}

/// Longest id a device may enrol under (a node id's limit).
const MAX_ENROL_ID: usize = splicegate_control::decl::MAX_NAME;

/// The node a device asks to enrol as: kind `agent`, its id, and the
/// attributes it announces (`country`, `region`, `city`, `isp`, `asn`,
/// `network`), names put in the catalogue's form.
fn enrolment(id: &str, attrs: &[(String, String)]) -> Result<NodeFields, EnrolError> {
    if id.is_empty()
        || id.len() > MAX_ENROL_ID
        || !id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
    {
        return Err(EnrolError::Invalid(format!(
            "id {id:?}: 1 to {MAX_ENROL_ID} of letters, digits, '_', '-', '.'"
        )));
    }
    let mut f = NodeFields {
        id: Some(id.to_string()),
        kind: Some(NodeKind::Agent),
        ..NodeFields::default()
    };
    let mut seen: HashSet<String> = HashSet::new();
    for (name, value) in attrs {
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim();
        if !seen.insert(name.clone()) {
            return Err(EnrolError::Invalid(format!("{name} is announced twice")));
        }
        if value.is_empty() {
            continue;
        }
        let bad = |why: String| EnrolError::Invalid(why);
        match name.as_str() {
            "country" => {
                let c = Country::parse(&value.to_ascii_lowercase()).ok_or_else(|| {
                    bad(format!(
                        "country {value:?} is not an ISO 3166-1 alpha-2 code"
                    ))
                })?;
                f.country = Some(Some(c));
            }
            "region" | "city" | "isp" => {
                let field: &'static str = match name.as_str() {
                    "region" => "region",
                    "city" => "city",
                    _ => "isp",
                };
                let n = normalise_name(value);
                catalogue_name(field, &n).map_err(|e| bad(e.to_string()))?;
                let slot = match field {
                    "region" => &mut f.region,
                    "city" => &mut f.city,
                    _ => &mut f.isp,
                };
                *slot = Some(Some(n));
            }
            "asn" => {
                let v = value.to_ascii_lowercase();
                let digits = v.strip_prefix("as").unwrap_or(&v);
                let asn = digits
                    .parse::<u32>()
                    .map_err(|_| bad(format!("asn {value:?} is not an AS number")))?;
                f.asn = Some(Some(asn));
            }
            "network" => {
                let n = value
                    .to_ascii_lowercase()
                    .parse::<Network>()
                    .map_err(|e| bad(e.to_string()))?;
                f.network = Some(n);
            }
            other => {
                return Err(bad(format!(
                    "unknown attribute {other:?} (country, region, city, isp, asn or network)"
                )));
            }
        }
    }
    Ok(f)
}

impl Inner {
    /// File objects, then API objects whose id the file does not declare.
    /// [`Inner::merged`] without the nodes, for a change that leaves them
    /// as they are ([`Policy::build_keeping_nodes`]).
    fn merged_accounts(&self) -> Declarations {
        self.merged_with(false)
    }

    fn merged(&self) -> Declarations {
        self.merged_with(true)
    }

    /// The file's declarations and the API's, the nodes (the file's and
    /// the API's) only `with_nodes`.
    fn merged_with(&self, with_nodes: bool) -> Declarations {
        let f = &self.file;
        let mut d = Declarations {
            orgs: f.orgs.clone(),
            packages: f.packages.clone(),
            nodes: if with_nodes {
                f.nodes.clone()
            } else {
                Vec::new()
            },
            geo: f.geo.clone(),
            targets: f.targets.clone(),
        };
        let orgs: HashSet<&str> = self.file.orgs.iter().map(|o| o.id.as_str()).collect();
        let pkgs: HashSet<u64> = self.file.packages.iter().map(|p| p.id).collect();
        d.orgs.extend(
            self.orgs
                .values()
                .filter(|o| !orgs.contains(o.id.as_str()))
                .cloned(),
        );
        d.packages.extend(
            self.packages
                .values()
                .filter(|p| !pkgs.contains(&p.id))
                .cloned(),
        );
        if with_nodes {
            let nodes: HashSet<&str> = self.file.nodes.iter().map(|n| n.id.as_str()).collect();
            d.nodes.extend(
                self.nodes
                    .values()
                    .filter(|n| !nodes.contains(n.id.as_str()))
                    .cloned(),
            );
        }
        d
    }

    fn shadowed(&self) -> Vec<String> {
        let mut out = Vec::new();
        for o in &self.file.orgs {
            if self.orgs.contains_key(&o.id) {
                out.push(format!("org {}", o.id));
            }
        }
        for p in &self.file.packages {
            if self.packages.contains_key(&p.id) {
                out.push(format!("package {}", p.id));
            }
        }
        for n in &self.file.nodes {
            if self.nodes.contains_key(&n.id) {
                out.push(format!("node {}", n.id));
            }
        }
        out
    }

    /// Give objects that are new in `policy` (not in `before`) their usage
    /// and balances from the store.
    fn restore_new(&mut self, policy: &Policy, before: &Present) -> Result<(), StoreError> {
        let new_orgs: Vec<_> = policy
            .orgs
            .values()
            .filter(|o| !before.orgs.contains(&o.decl.id))
            .collect();
        if !new_orgs.is_empty() {
            let granted = self.store.granted()?;
            let spent = self.store.spent()?;
            for o in new_orgs {
                o.account.restore(
                    granted.get(&o.decl.id).copied().unwrap_or(0),
                    spent.get(&o.decl.id).copied().unwrap_or(0),
                );
            }
        }
        let new_pkgs: Vec<_> = policy
            .packages
            .values()
            .filter(|p| !before.packages.contains(&p.id()))
            .collect();
        if !new_pkgs.is_empty() {
            let totals = self.store.usage_totals()?;
            for p in new_pkgs {
                let t = totals.get(&p.id()).copied().unwrap_or_default();
                p.usage.restore(t);
                self.ledger.set(p.id(), t);
            }
        }
        Ok(())
    }

    fn is_file_org(&self, id: &str) -> bool {
        self.file.orgs.iter().any(|o| o.id == id)
    }

    fn is_file_package(&self, id: u64) -> bool {
        self.file.packages.iter().any(|p| p.id == id)
    }
}

impl Control {
    /// Open the store, record the opening grants of file organisations seen
    /// for the first time, build the first policy from the file's and the
    /// store's objects, and restore usage and balances from the ledger.
    pub fn open(opts: ControlOptions, file: Declarations) -> Result<Control, ControlError> {
        let snapshot = match opts.store {
            StoreLocation::Postgres(_) => opts.snapshot.clone(),
            StoreLocation::Sqlite(_) => None,
        };
        let (mut store, degraded) = crate::store::open(&opts.store, snapshot.as_deref())?;
        let now_ms = unix_ms();
        let opening: Vec<(String, i64)> = file
            .orgs
            .iter()
            .map(|o| (o.id.clone(), o.credits))
            .collect();
        store.first_grants(&opening, now_ms)?;
        // Read before the objects: a change made while they are read moves
        // it past what is kept, and the next read back reads them again.
        let catalog_seen = store.catalog_version()?;
        let orgs = store
            .api_orgs()?
            .into_iter()
            .map(|id| {
                (
                    id.clone(),
                    OrgDecl {
                        id,
                        credits: 0,
                        from_file: false,
                    },
                )
            })
            .collect();
        let packages = store
            .packages()?
            .into_iter()
            .map(|(id, spec)| Ok((id, stored("package", &id, &spec, PackageFields::to_decl)?)))
            .collect::<Result<BTreeMap<_, _>, StoreError>>()?;
        let nodes = store
            .nodes()?
            .into_iter()
            .map(|(id, spec)| Ok((id.clone(), stored("node", &id, &spec, NodeFields::to_decl)?)))
            .collect::<Result<BTreeMap<_, _>, StoreError>>()?;
        let epochs = store.epochs()?;
        let revoked = store.revoked_agents()?.into_iter().collect();
        let mut inner = Inner {
            store,
            file,
            orgs,
            packages,
            nodes,
            ledger: Ledger::default(),
            attempted: None,
            waiting: BTreeMap::new(),
            flush_key: FlushKeys::new(&opts.gateway_id),
            epochs,
            catalog_seen,
        };
        for s in inner.shadowed() {
            tracing::warn!(
                "{s} is declared in the config file and was also created through the API; the file's declaration wins"
            );
        }
        let policy = Policy::build(&inner.merged(), None).map_err(ControlError::from)?;
        // Every package's ledger reading starts at what the store holds.
        inner.restore_new(&policy, &Present::of(None))?;
        let engine = Arc::new(Engine::new(policy, opts.session_capacity.max(1)));
        let control = Control {
            engine,
            inner: Mutex::new(inner),
            revoked: Mutex::new(revoked),
            announcer: sync::AnnouncerSlot::default(),
            fleet_usage: Mutex::new(None),
            clock: opts.clock,
            flush_seconds: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
            flush_errors: Counter::default(),
            backlog_rows: Gauge::default(),
            snapshot: snapshot.map(|path| SnapshotState {
                path,
                due: AtomicBool::new(!degraded),
                written: Mutex::new(degraded.then(Instant::now)),
            }),
        };
        control.snapshot_if_due();
        Ok(control)
    }

    /// Whether the gateway serves from its local snapshot: the database
    /// was down at start and has not been reached since.
    pub fn serving_from_snapshot(&self) -> bool {
        self.lock().store.serving_from_snapshot()
    }

    /// Writes the local snapshot when an API change asked for one or the
    /// last is [`SNAPSHOT_EVERY`] old (usage totals). While the gateway serves from
    /// the snapshot, it only tries (every 10 s) whether the database is
    /// back, and never overwrites the file until it is.
    fn snapshot_if_due(&self) {
        let Some(s) = &self.snapshot else { return };
        let mut written = s.written.lock().unwrap_or_else(|e| e.into_inner());
        let age = written.map(|t: Instant| t.elapsed());
        let mut inner = self.lock();
        if inner.store.serving_from_snapshot() {
            if age.is_some_and(|a| a < Duration::from_secs(10)) {
                return;
            }
            *written = Some(Instant::now());
            if !inner.store.try_recover() {
                return;
            }
            s.due.store(true, Ordering::Relaxed);
        }
        if !s.due.swap(false, Ordering::AcqRel) && age.is_some_and(|a| a < SNAPSHOT_EVERY) {
            return;
        }
        let policy = self.engine.policy();
        let totals: Vec<(u64, UsageTotals)> = policy
            .packages
            .iter()
            .map(|(id, p)| (*id, p.usage.totals()))
            .collect();
        let taken = crate::store::snapshot::Snapshot::take(&*inner.store, totals, unix_ms());
        drop(inner);
        *written = Some(Instant::now());
        match taken.map(|snap| snap.write(&s.path).map_err(|e| e.to_string())) {
            Ok(Ok(())) => tracing::debug!(path = %s.path.display(), "store snapshot written"),
            Ok(Err(e)) => {
                tracing::warn!(path = %s.path.display(), error = %e, "cannot write the store snapshot")
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the store for its snapshot"),
        }
    }

    /// The engine the workers share.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The data plane's monotonic time now.
    pub fn now(&self) -> Now {
        (self.clock)()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the config file declares node `id`: the running pool's node
    /// of that id (a tombstone is no node) is the file's. Every policy
    /// published is built on the file `Inner` holds, so under the control
    /// lock this is the file's answer, without a walk over the file's
    /// nodes (a million of them cost 8 ms a walk, and `GET /v1/nodes`
    /// asked once per node).
    fn is_file_node(&self, id: &str) -> bool {
        self.engine
            .policy()
            .nodes
            .get(id)
            .is_some_and(|(_, n)| n.from_file)
    }

    /// Build a policy from `decls` on the current one, or say why not.
    fn build(&self, decls: &Declarations) -> Result<Policy, ControlError> {
        Policy::build(decls, Some(&self.engine.policy())).map_err(ControlError::from)
    }

    /// Build a policy for a change of organisations or packages only: the
    /// current one's nodes, shared.
    fn build_accounts(&self, inner: &Inner) -> Result<Policy, ControlError> {
        Policy::build_keeping_nodes(&inner.merged_accounts(), &self.engine.policy())
            .map_err(ControlError::from)
    }

    /// Build a policy for an API change of one node on `current`: the
    /// other nodes shared, not built again
    /// ([`Policy::build_changing_node`]; the caller commits the change).
    fn build_node(
        &self,
        inner: &Inner,
        current: &Policy,
        change: NodeChange<'_>,
    ) -> Result<(Policy, Option<NodeIdx>), ControlError> {
        Policy::build_changing_node(&inner.merged_accounts(), current, change)
            .map_err(ControlError::from)
    }

    /// Restore what is new in `policy` and publish it.
    fn publish(&self, inner: &mut Inner, policy: Policy) -> Result<(), ControlError> {
        let before = Present::of(Some(&self.engine.policy()));
        inner.restore_new(&policy, &before)?;
        self.engine.publish(policy);
        if let Some(s) = &self.snapshot {
            s.due.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// SIGHUP: the config file's new declarations. A file that does not make a
    /// valid policy (with the API's objects) is refused; the old policy stays.
    pub fn reload_file(&self, file: Declarations) -> Result<(), ControlError> {
        let mut inner = self.lock();
        let old = std::mem::replace(&mut inner.file, file);
        let policy = match self.build(&inner.merged()) {
            Ok(p) => p,
            Err(e) => {
                inner.file = old;
                return Err(e);
            }
        };
        let opening: Vec<(String, i64)> = inner
            .file
            .orgs
            .iter()
            .map(|o| (o.id.clone(), o.credits))
            .collect();
        match inner.store.first_grants(&opening, unix_ms()) {
            Ok(granted) => {
                for g in granted {
                    tracing::info!(org = %g, "opening grant of a config-file organisation recorded");
                }
            }
            Err(e) => {
                inner.file = old;
                return Err(e.into());
            }
        }
        for s in inner.shadowed() {
            tracing::warn!(
                "{s} is declared in the config file and was also created through the API; the file's declaration wins"
            );
        }
        self.publish(&mut inner, policy)
    }

    // ---- organisations ----

    /// `POST /v1/orgs`: a new organisation with an opening grant.
    pub fn create_org(&self, id: &str, credits: i64) -> Result<(), ControlError> {
        valid_org_id(id)?;
        let mut inner = self.lock();
        if inner.is_file_org(id) || inner.orgs.contains_key(id) {
            return Err(ControlError::Conflict(format!("org {id} exists")));
        }
        let decl = OrgDecl {
            id: id.to_string(),
            credits,
            from_file: false,
        };
        inner.orgs.insert(id.to_string(), decl);
        let built = self.build_accounts(&inner);
        let policy = match built {
            Ok(p) => p,
            Err(e) => {
                inner.orgs.remove(id);
                return Err(e);
            }
        };
        if let Err(e) = inner.store.create_org(id, credits, unix_ms()) {
            inner.orgs.remove(id);
            return Err(e.into());
        }
        self.publish(&mut inner, policy)?;
        self.announce(Change::Org(id.to_string()));
        Ok(())
    }

    /// `POST /v1/orgs/{id}/credits`: a grant (negative: a correction). Allowed
    /// for file organisations too: a grant is ledger, not declaration.
    pub fn add_credits(&self, id: &str, micro: i64) -> Result<(), ControlError> {
        let mut inner = self.lock();
        let policy = self.engine.policy();
        let Some(org) = policy.orgs.get(id) else {
            return Err(ControlError::NotFound(format!("no org {id}")));
        };
        inner
            .store
            .grant(id, micro, GrantReason::TopUp, unix_ms())?;
        org.account.grant(micro);
        self.announce(Change::Credits(id.to_string()));
        Ok(())
    }

    // ---- packages ----

    /// `POST /v1/packages`: returns the id and the key (generated when absent).
    pub fn create_package(&self, mut fields: PackageFields) -> Result<(u64, String), ControlError> {
        let mut inner = self.lock();
        let auto = fields.id.is_none();
        let mut id = match fields.id {
            Some(id) => id,
            None => {
                let policy = self.engine.policy();
                inner
                    .packages
                    .keys()
                    .copied()
                    .chain(policy.packages.keys().copied())
                    .max()
                    .map_or(1, |m| m + 1)
            }
        };
        if inner.is_file_package(id) || inner.packages.contains_key(&id) {
            return Err(ControlError::Conflict(format!("package {id} exists")));
        }
        let key = match fields.key.take() {
            Some(k) => k,
            None => generate_key()
                .map_err(|e| ControlError::Invalid(format!("generating a key: {e}")))?,
        };
        fields.key = Some(key.clone());
        // In a fleet another gateway may have taken the id a moment ago:
        // the store says so, and a chosen id moves on to the next one.
        let mut tries = 0;
        loop {
            let mut decl = PackageDecl::new(id, &key);
            fields.apply(&mut decl).map_err(ControlError::from)?;
            match self.put_package(&mut inner, decl, None) {
                Err(ControlError::Conflict(_)) if auto && tries < 16 => {
                    id += 1;
                    tries += 1;
                }
                r => break r?,
            }
        }
        self.announce(Change::Package(id));
        Ok((id, key))
    }

    fn put_package(
        &self,
        inner: &mut Inner,
        decl: PackageDecl,
        old: Option<PackageDecl>,
    ) -> Result<(), ControlError> {
        let id = decl.id;
        let old_is_none = old.is_none();
        let spec = serde_json::to_string(&PackageFields::from_decl(&decl))
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        self.put(
            inner,
            |i| &mut i.packages,
            id,
            decl,
            old,
            |i| Ok((self.build_accounts(i)?, ())),
            |store| match old_is_none {
                true => store.insert_package(id, &spec, unix_ms()),
                false => store.put_package(id, &spec, unix_ms()),
            },
            |_, ()| {},
        )
    }

    /// Put `decl` at `key` in the map `slot` selects, build the policy
    /// (`build`: from the map changed; it gives what `commit` needs), store
    /// the object, commit and publish; on any failure the map is as before
    /// (a failure after the store write is healed by the next read back of
    /// the store, which finds the object new).
    #[allow(clippy::too_many_arguments)]
    fn put<K: Ord + Clone, V, T>(
        &self,
        inner: &mut Inner,
        slot: fn(&mut Inner) -> &mut BTreeMap<K, V>,
        key: K,
        decl: V,
        old: Option<V>,
        build: impl FnOnce(&Inner) -> Result<(Policy, T), ControlError>,
        store: impl FnOnce(&mut dyn Store) -> Result<(), StoreError>,
        commit: impl FnOnce(&Policy, T),
    ) -> Result<(), ControlError> {
        slot(inner).insert(key.clone(), decl);
        let done = build(inner)
            .and_then(|built| {
                store(inner.store.as_mut())?;
                Ok(built)
            })
            .and_then(|(policy, t)| {
                commit(&policy, t);
                self.publish(inner, policy)
            });
        if done.is_err() {
            // Stored but not published counts as a failure too: the map
            // goes back with the running policy, and the next read back of
            // the store finds the object new and applies it.
            match old {
                Some(o) => slot(inner).insert(key, o),
                None => slot(inner).remove(&key),
            };
        }
        done
    }

    fn api_package(&self, inner: &Inner, id: u64) -> Result<PackageDecl, ControlError> {
        if inner.is_file_package(id) {
            return Err(ControlError::Conflict(format!(
                "package {id} is {FROM_FILE}"
            )));
        }
        inner
            .packages
            .get(&id)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("no package {id}")))
    }

    /// `PATCH /v1/packages/{id}`.
    pub fn patch_package(&self, id: u64, fields: &PackageFields) -> Result<(), ControlError> {
        if fields.id.is_some_and(|x| x != id) {
            return Err(ControlError::Invalid("a package's id cannot change".into()));
        }
        let mut inner = self.lock();
        let old = self.api_package(&inner, id)?;
        let mut decl = old.clone();
        fields.apply(&mut decl).map_err(ControlError::from)?;
        self.put_package(&mut inner, decl, Some(old))?;
        self.announce(Change::Package(id));
        Ok(())
    }

    /// `POST /v1/packages/{id}/key`: a new key (given or generated); the old
    /// one fails from the next request.
    pub fn set_key(&self, id: u64, key: Option<String>) -> Result<String, ControlError> {
        let key = match key {
            Some(k) => k,
            None => generate_key()
                .map_err(|e| ControlError::Invalid(format!("generating a key: {e}")))?,
        };
        let fields = PackageFields {
            key: Some(key.clone()),
            ..PackageFields::default()
        };
        self.patch_package(id, &fields)?;
        Ok(key)
    }

    /// `POST /v1/packages/{id}/usage/reset`: the package's usage starts over
    /// (the traffic cap counts from zero). The ledger keeps every row; the
    /// reset is a marker that starts a new usage epoch. The organisation's
    /// spending is not touched. Allowed for file packages: usage is ledger,
    /// not declaration.
    pub fn reset_usage(&self, id: u64) -> Result<UsageTotals, ControlError> {
        let mut inner = self.lock();
        self.flush_locked(&mut inner)?;
        let policy = self.engine.policy();
        let Some(pkg) = policy.packages.get(&id) else {
            return Err(ControlError::NotFound(format!("no package {id}")));
        };
        let left = pkg.usage.totals();
        let epoch = inner.store.reset_usage(id, left, unix_ms())?;
        pkg.usage.restore(UsageTotals::default());
        inner.epochs.insert(id, epoch);
        inner.ledger.set(id, UsageTotals::default());
        self.announce(Change::Usage(id));
        Ok(left)
    }

    /// The usage epoch of each of `ids` (0 until its first reset): a
    /// fleet's traffic-cap leases are per epoch.
    pub fn usage_epochs(&self, ids: &[u64]) -> Vec<i64> {
        let inner = self.lock();
        ids.iter()
            .map(|id| inner.epochs.get(id).copied().unwrap_or(0))
            .collect()
    }

    /// What the store holds of every package's traffic in its current
    /// epoch and of every organisation's spending: the whole fleet's, as
    /// each gateway flushed it.
    pub fn stored_usage(&self) -> Result<StoredUsage, ControlError> {
        Ok(StoredUsage::read(&*self.lock().store)?)
    }

    /// In a fleet: usage as the whole fleet relayed it, for the API (the
    /// store's totals, read at most once a second, and what this gateway
    /// relayed since it last wrote). `None` while the store cannot be read.
    pub fn fleet_usage(&self) -> Option<FleetUsage> {
        let mut cache = self.fleet_usage.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, u)) = cache.as_ref()
            && at.elapsed() < std::time::Duration::from_secs(1)
        {
            return Some(u.clone());
        }
        let mut usage = {
            let inner = self.lock();
            FleetUsage {
                stored: Arc::new(StoredUsage::read(&*inner.store).ok()?),
                written: Arc::new(inner.ledger.readings().clone()),
                spent: Arc::default(),
            }
        };
        let mut spent = usage.stored.spent.clone();
        for p in self.engine.policy().packages.values() {
            if let Some(org) = &p.decl.org {
                let charged = usage.unwritten(p.id(), p.usage.totals()).charged;
                *spent.entry(org.clone()).or_default() += charged as i64;
            }
        }
        usage.spent = Arc::new(spent);
        *cache = Some((std::time::Instant::now(), usage.clone()));
        Some(usage)
    }

    // ---- nodes ----

    /// `POST /v1/nodes`: returns the id and, for an agent node created
    /// without a key, the key generated for it (to be shown once; only its
    /// hash is kept). A revoked agent id may be created again here: the
    /// operator decides; revocation only stops self-enrolment.
    pub fn create_node(
        &self,
        fields: &NodeFields,
    ) -> Result<(String, Option<String>), ControlError> {
        let mut fields = fields.clone();
        let generated = if fields.kind == Some(NodeKind::Agent)
            && fields.key.is_none()
            && fields.key_hash.is_none()
        {
            let key = generate_agent_key()
                .map_err(|e| ControlError::Invalid(format!("generating a key: {e}")))?;
            fields.key = Some(key.clone());
            Some(key)
        } else {
            None
        };
        let decl = fields.to_decl().map_err(ControlError::from)?;
        let id = decl.id.clone();
        let mut inner = self.lock();
        if self.is_file_node(&id) || inner.nodes.contains_key(&id) {
            return Err(ControlError::Conflict(format!("node {id} exists")));
        }
        self.put_node(&mut inner, decl, None)?;
        self.announce(Change::Node(id.clone()));
        Ok((id, generated))
    }

    /// `POST /v1/nodes/{id}/key`: a new key for an agent node (given, or
    /// generated), returned once; the old key stops authenticating at once
    /// (a device connected with it stays connected until the gateway closes
    /// its connection). 404 for no such node, 409 for the file's nodes and
    /// for a node that is not an agent.
    pub fn new_agent_key(&self, id: &str, key: Option<String>) -> Result<String, ControlError> {
        let mut inner = self.lock();
        let old = self.api_node(&inner, id)?;
        if old.kind != NodeKind::Agent {
            return Err(ControlError::Conflict(format!(
                "node {id} is of kind {}; only an agent node has a key",
                old.kind.as_str()
            )));
        }
        let key = match key {
            Some(k) => k,
            None => generate_agent_key()
                .map_err(|e| ControlError::Invalid(format!("generating a key: {e}")))?,
        };
        let fields = NodeFields {
            key: Some(key.clone()),
            ..NodeFields::default()
        };
        let mut decl = old.clone();
        fields.apply(&mut decl).map_err(ControlError::from)?;
        self.put_node(&mut inner, decl, Some(old))?;
        self.announce(Change::Node(id.to_string()));
        tracing::info!(node = id, "agent node key replaced");
        Ok(key)
    }

    /// Self-enrolment (SPEC 10): a device that presented the fleet's
    /// enrolment secret becomes agent node `id` with the attributes it
    /// announces (`country`, `region`, `city`, `isp`, `asn`, `network`;
    /// region, city and ISP names put in the catalogue's form with
    /// [`normalise_name`], a country lowercased, `AS7922` read as 7922).
    /// The node is an API node (persisted, shown, deletable like one);
    /// returns the device's own key, generated here and never kept in
    /// plaintext. Refused for an id any node has, a revoked id, or an
    /// unacceptable id or attribute; nothing is created then.
    ///
    /// Blocking: it takes the control lock (an API change or the
    /// once-a-second flush may hold it) and writes the store (an SQLite
    /// transaction, or a round trip to PostgreSQL on the store thread). Call
    /// it from a thread that may block — a plain thread, or
    /// `tokio::task::spawn_blocking` on the agent listener's runtime with a
    /// clone of the `Arc<Control>` — never on a worker, and never on the
    /// admin thread's runtime (it has no blocking pool). The node's
    /// declaration is published before it returns: once the gateway has the
    /// key, `engine().policy().nodes.get(id)` finds the node.
    pub fn enrol_agent(&self, id: &str, attrs: &[(String, String)]) -> Result<String, EnrolError> {
        let mut fields = enrolment(id, attrs)?;
        let key = generate_agent_key()
            .map_err(|e| EnrolError::Unavailable(format!("generating a key: {e}")))?;
        fields.key = Some(key.clone());
        let decl = fields
            .to_decl()
            .map_err(|e| EnrolError::Invalid(e.to_string()))?;
        let mut inner = self.lock();
        if self.is_revoked(id) {
            return Err(EnrolError::Revoked(id.to_string()));
        }
        // Another gateway of the fleet may have revoked it: the store says.
        match inner.store.is_revoked(id) {
            Ok(false) => {}
            Ok(true) => {
                self.revoked_set().insert(id.to_string());
                return Err(EnrolError::Revoked(id.to_string()));
            }
            Err(e) => return Err(EnrolError::Unavailable(e.to_string())),
        }
        if self.is_file_node(id)
            || inner.nodes.contains_key(id)
            || self.engine.policy().nodes.get(id).is_some()
        {
            return Err(EnrolError::Taken(id.to_string()));
        }
        let where_ = [&decl.country.map(|c| c.to_string()), &decl.city, &decl.isp]
            .iter()
            .filter_map(|v| v.as_deref())
            .collect::<Vec<_>>()
            .join(" ");
        self.put_node(&mut inner, decl, None).map_err(|e| match e {
            ControlError::Invalid(m) => EnrolError::Invalid(m),
            ControlError::Conflict(_) => EnrolError::Taken(id.to_string()),
            ControlError::NotFound(m) => EnrolError::Unavailable(m),
            ControlError::Store(e) => EnrolError::Unavailable(e.to_string()),
        })?;
        self.announce(Change::Node(id.to_string()));
        tracing::info!(node = id, place = %where_, "agent enrolled");
        Ok(key)
    }

    /// Whether `id` is a revoked agent id (a deleted agent node's): as this
    /// gateway knows it — what the store held at start, deletions made here,
    /// and revocations [`Control::enrol_agent`] found in the store since.
    /// Never waits for the store.
    pub fn is_revoked(&self, id: &str) -> bool {
        self.revoked_set().contains(id)
    }

    fn revoked_set(&self) -> MutexGuard<'_, HashSet<String>> {
        self.revoked.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn put_node(
        &self,
        inner: &mut Inner,
        decl: NodeDecl,
        old: Option<NodeDecl>,
    ) -> Result<(), ControlError> {
        let id = decl.id.clone();
        let old_is_none = old.is_none();
        let spec = serde_json::to_string(&NodeFields::from_decl(&decl))
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        self.apply_node(inner, decl, old, |store| match old_is_none {
            true => store.insert_node(&id, &spec, unix_ms()),
            false => store.put_node(&id, &spec, unix_ms()),
        })
    }

    /// Put `decl` in place of `old`: the next pool derived from the running
    /// one, `store` run (the API's write; nothing for a change read back
    /// from the store), then published; on a failure nothing changed.
    fn apply_node(
        &self,
        inner: &mut Inner,
        decl: NodeDecl,
        old: Option<NodeDecl>,
        store: impl FnOnce(&mut dyn Store) -> Result<(), StoreError>,
    ) -> Result<(), ControlError> {
        let change = decl.clone();
        let state = decl.state;
        self.put(
            inner,
            |i| &mut i.nodes,
            change.id.clone(),
            decl,
            old,
            |i| self.build_node(i, &self.engine.policy(), NodeChange::Put(&change)),
            store,
            |policy, idx| {
                if let Some(idx) = idx {
                    policy.nodes.set_admin_state(idx, state);
                }
            },
        )
    }

    fn api_node(&self, inner: &Inner, id: &str) -> Result<NodeDecl, ControlError> {
        if self.is_file_node(id) {
            return Err(ControlError::Conflict(format!("node {id} is {FROM_FILE}")));
        }
        inner
            .nodes
            .get(id)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("no node {id}")))
    }

    /// `PATCH /v1/nodes/{id}`: a state alone changes the live pool without a
    /// rebuild (and is persisted); other fields derive the next pool from
    /// the current one with this node replaced at its index, the others
    /// shared ([`Policy::build_changing_node`]).
    pub fn patch_node(&self, id: &str, fields: &NodeFields) -> Result<(), ControlError> {
        if fields.id.as_deref().is_some_and(|x| x != id) {
            return Err(ControlError::Invalid("a node's id cannot change".into()));
        }
        let mut inner = self.lock();
        let old = self.api_node(&inner, id)?;
        let mut decl = old.clone();
        fields.apply(&mut decl).map_err(ControlError::from)?;
        if fields.only_state() {
            let spec = serde_json::to_string(&NodeFields::from_decl(&decl))
                .map_err(|e| ControlError::Invalid(e.to_string()))?;
            inner.store.put_node(id, &spec, unix_ms())?;
            let state = decl.state;
            inner.nodes.insert(id.to_string(), decl);
            let policy = self.engine.policy();
            if let Some((idx, _)) = policy.nodes.get(id) {
                let before = policy.nodes.set_admin_state(idx, state);
                if before != state {
                    tracing::info!(
                        node = id,
                        from = before.as_str(),
                        to = state.as_str(),
                        "node state set"
                    );
                }
            }
            self.announce(Change::Node(id.to_string()));
            return Ok(());
        }
        self.put_node(&mut inner, decl, Some(old))?;
        self.announce(Change::Node(id.to_string()));
        Ok(())
    }

    /// `DELETE /v1/nodes/{id}`: out of selection at once; its tunnels run
    /// out. An agent node's id is revoked with it (in the same store
    /// transaction): no device enrols under it again. The next pool is the
    /// current one with the node left a tombstone, the others shared; the
    /// removal is marked once the store has it.
    pub fn delete_node(&self, id: &str) -> Result<(), ControlError> {
        let mut inner = self.lock();
        let old = self.api_node(&inner, id)?;
        let agent = old.kind == NodeKind::Agent;
        self.remove_node(&mut inner, id, old, |store| match agent {
            true => store.delete_agent(id, unix_ms()).map(drop),
            false => store.delete_node(id).map(drop),
        })?;
        if agent {
            self.revoked_set().insert(id.to_string());
            tracing::info!(node = id, "agent node deleted; its id is revoked");
        }
        self.announce(Change::Node(id.to_string()));
        Ok(())
    }

    /// Take node `id` (declared as `old`) out: the next pool derived from
    /// the running one with it a tombstone, `store` run (the API's
    /// deletion; nothing for one read back from the store), then the node
    /// out of selection on the running pool at once and the new one
    /// published; on a failure the map is as before (a failure after the
    /// store write is healed by the next read back of the store).
    fn remove_node(
        &self,
        inner: &mut Inner,
        id: &str,
        old: NodeDecl,
        store: impl FnOnce(&mut dyn Store) -> Result<(), StoreError>,
    ) -> Result<(), ControlError> {
        inner.nodes.remove(id);
        let current = self.engine.policy_arc();
        let mut stored = false;
        let done = self
            .build_node(inner, &current, NodeChange::Remove(id))
            .and_then(|built| {
                store(inner.store.as_mut())?;
                stored = true;
                Ok(built)
            })
            .and_then(|(policy, idx)| {
                if let Some(idx) = idx {
                    current.nodes.remove(idx);
                    policy.nodes.remove(idx);
                }
                self.publish(inner, policy)
            });
        if done.is_err() && !stored {
            // Nothing changed but the map. Once stored, the store and the
            // running pool (its node marked removed above) both lack the
            // node, and so does the map.
            inner.nodes.insert(id.to_string(), old);
        }
        done
    }

    // ---- the usage ledger ----

    /// Append the usage since the last flush (one transaction). On failure
    /// the deltas stay pending and the next flush writes them.
    pub fn flush(&self) -> Result<Flushed, ControlError> {
        let flushed = {
            let mut inner = self.lock();
            self.flush_locked(&mut inner)
        };
        self.snapshot_if_due();
        flushed
    }

    fn flush_locked(&self, inner: &mut Inner) -> Result<Flushed, ControlError> {
        let started = Instant::now();
        let policy = self.engine.policy();
        let readings: Vec<(u64, UsageTotals)> = policy
            .packages
            .iter()
            .map(|(id, p)| (*id, p.usage.totals()))
            .collect();
        // The ledger always moves on: what it hands out is either written
        // below or waits in memory, never read twice.
        let deltas = inner.ledger.deltas(readings.iter().copied());
        let minute = (unix_ms() / 60_000) as i64;
        for d in deltas {
            let epoch = inner.epochs.get(&d.package).copied().unwrap_or(0);
            let org = policy
                .packages
                .get(&d.package)
                .and_then(|p| p.decl.org.clone())
                .unwrap_or_default();
            let row = inner
                .waiting
                .entry((d.package, epoch, minute, org.clone()))
                .or_insert_with(|| UsageRow {
                    package: d.package,
                    epoch,
                    minute,
                    org,
                    bytes_up: 0,
                    bytes_down: 0,
                    requests: 0,
                    charged: 0,
                });
            row.bytes_up += d.bytes_up;
            row.bytes_down += d.bytes_down;
            row.requests += d.requests;
            row.charged += d.charged;
        }
        // An unconfirmed flush first, exactly as it was: if it was committed
        // after all, its key makes this a no-op.
        if let Some(batch) = inner.attempted.take()
            && let Err(e) = inner.store.append_usage(&batch.key, &batch.rows)
        {
            inner.attempted = Some(batch);
            return Err(self.failed(inner, started, e));
        }
        if inner.waiting.is_empty() {
            self.backlog_rows.set(0);
            self.flush_seconds.observe(started.elapsed().as_secs_f64());
            return Ok(Flushed { rows: 0 });
        }
        let batch = Batch {
            key: inner.flush_key.next(),
            rows: std::mem::take(&mut inner.waiting).into_values().collect(),
        };
        let rows = batch.rows.len();
        match inner.store.append_usage(&batch.key, &batch.rows) {
            Ok(()) => {
                self.backlog_rows.set(0);
                self.flush_seconds.observe(started.elapsed().as_secs_f64());
                Ok(Flushed { rows })
            }
            Err(e) => {
                inner.attempted = Some(batch);
                Err(self.failed(inner, started, e))
            }
        }
    }

    /// Count a failed flush and what waits in memory since.
    fn failed(&self, inner: &Inner, started: Instant, e: StoreError) -> ControlError {
        self.flush_errors.inc();
        self.flush_seconds.observe(started.elapsed().as_secs_f64());
        let backlog = inner.waiting.len() + inner.attempted.as_ref().map_or(0, |b| b.rows.len());
        self.backlog_rows
            .set(i64::try_from(backlog).unwrap_or(i64::MAX));
        e.into()
    }

    /// `GET /v1/packages/{id}/usage`: the package's usage over every epoch
    /// in `[from_ms, to_ms)`, per `step_minutes`, flushed first so that
    /// the last second is in it (when the store can be written).
    pub fn usage_history(
        &self,
        id: u64,
        from_ms: u64,
        to_ms: u64,
        step_minutes: i64,
    ) -> Result<Vec<(i64, UsageTotals)>, ControlError> {
        let mut inner = self.lock();
        let _ = self.flush_locked(&mut inner);
        // Minutes overlapping [from_ms, to_ms): the one `to_ms` falls in
        // counts (the ledger keeps minutes, not milliseconds).
        let (from, to) = ((from_ms / 60_000) as i64, to_ms.div_ceil(60_000) as i64);
        Ok(inner.store.usage_history(id, from, to, step_minutes)?)
    }

    /// Whether an organisation, package or node (by kind) is the file's.
    pub fn declared_in_file(&self, what: FileObject<'_>) -> bool {
        let inner = self.lock();
        match what {
            FileObject::Org(id) => inner.is_file_org(id),
            FileObject::Package(id) => inner.is_file_package(id),
            FileObject::Node(id) => self.is_file_node(id),
        }
    }

    /// Run `f` on the store (tests and audits).
    pub fn with_store<T>(&self, f: impl FnOnce(&dyn Store) -> T) -> T {
        f(self.lock().store.as_ref())
    }
}

/// An object that may be declared in the config file.
#[derive(Debug, Clone, Copy)]
pub enum FileObject<'a> {
    /// An organisation.
    Org(&'a str),
    /// A package.
    Package(u64),
    /// A node.
    Node(&'a str),
}

mod sync;
pub use sync::{Announcer, Change, Reloaded};

#[cfg(test)]
mod tests;
