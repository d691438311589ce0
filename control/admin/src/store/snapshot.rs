//! The local snapshot of a PostgreSQL store: what a gateway needs to serve
//! when it starts while its database is down (SPEC section 11).
//!
//! A gateway on PostgreSQL writes, next to itself (`[store] snapshot`), a
//! JSON copy of everything it reads at start — the API's organisations,
//! packages and nodes, the grants and charges behind balances, the usage
//! epochs and totals, the revoked agent ids — after it starts, after every
//! change made through the API, and every five minutes for fresh usage
//! totals. Usage totals come from the gateway's own counters (which hold
//! what waits for the database too), not from the database.
//!
//! A gateway that cannot reach its database at start opens [`Degraded`]:
//! reads at start answer from the snapshot; API writes answer
//! `store_unavailable` until the database is back; usage waits in memory
//! (bounded, as in any outage) and is appended once it is. Nothing the
//! snapshot did not see is invented: traffic between the snapshot and the
//! stop is in the database, not in the restarted gateway's counters, so its
//! caps and balances lag by at most that much until it restarts on a
//! reachable database.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use splicegate_control::limits::UsageTotals;

use super::{FlushKey, GrantReason, PgStore, Store, UsageRow};
use crate::error::StoreError;

/// The snapshot file's format version.
const FORMAT: u32 = 1;

/// A package's cumulative usage, as the file writes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Totals {
    bytes_up: u64,
    bytes_down: u64,
    requests: u64,
    charged: u64,
}

impl From<UsageTotals> for Totals {
    fn from(t: UsageTotals) -> Totals {
        Totals {
            bytes_up: t.bytes_up,
            bytes_down: t.bytes_down,
            requests: t.requests,
            charged: t.charged,
        }
    }
}

impl From<Totals> for UsageTotals {
    fn from(t: Totals) -> UsageTotals {
        UsageTotals {
            bytes_up: t.bytes_up,
            bytes_down: t.bytes_down,
            requests: t.requests,
            charged: t.charged,
        }
    }
}

/// What the file holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    format: u32,
    /// The store's schema version when it was taken.
    schema: i64,
    /// When, in milliseconds since the Unix epoch.
    pub taken_unix_ms: u64,
    api_orgs: Vec<String>,
    granted: HashMap<String, i64>,
    spent: HashMap<String, i64>,
    packages: Vec<(u64, String)>,
    nodes: Vec<(String, String)>,
    epochs: HashMap<u64, i64>,
    totals: HashMap<u64, Totals>,
    revoked: Vec<String>,
}

impl Snapshot {
    /// Reads the objects from `store` and takes usage totals from
    /// `totals` (the gateway's counters).
    pub fn take(
        store: &dyn Store,
        totals: impl IntoIterator<Item = (u64, UsageTotals)>,
        unix_ms: u64,
    ) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            format: FORMAT,
            schema: store.schema_version()?,
            taken_unix_ms: unix_ms,
            api_orgs: store.api_orgs()?,
            granted: store.granted()?,
            spent: store.spent()?,
            packages: store.packages()?,
            nodes: store.nodes()?,
            epochs: store.epochs()?,
            totals: totals.into_iter().map(|(p, t)| (p, t.into())).collect(),
            revoked: store.revoked_agents()?,
        })
    }

    /// Writes the file atomically (a temporary file renamed over it),
    /// readable by its owner only: it holds the packages' keys, as the
    /// store does.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        let text = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Reads a snapshot file.
    pub fn read(path: &Path) -> Result<Snapshot, StoreError> {
        let text = std::fs::read(path)
            .map_err(|e| StoreError::Unavailable(format!("snapshot {}: {e}", path.display())))?;
        let s: Snapshot = serde_json::from_slice(&text)
            .map_err(|e| StoreError::Unavailable(format!("snapshot {}: {e}", path.display())))?;
        if s.format != FORMAT {
            return Err(StoreError::Unavailable(format!(
                "snapshot {}: format {} (this build reads {FORMAT})",
                path.display(),
                s.format
            )));
        }
        Ok(s)
    }
}

/// A PostgreSQL store that was down at start: until a write finds the
/// database back (and applies the migrations first), reads answer from the
/// snapshot and writes fail with `Unavailable`; from then on it is the
/// database, reads included.
#[derive(Debug)]
pub struct Degraded {
    pg: PgStore,
    snap: Snapshot,
    migrated: bool,
}

impl Degraded {
    /// A store on `url` (not reachable now) serving reads from `snap`.
    pub fn new(url: &str, snap: Snapshot) -> Result<Degraded, StoreError> {
        Ok(Degraded {
            pg: PgStore::lazy(url)?,
            snap,
            migrated: false,
        })
    }

    /// The database, once reachable and migrated.
    fn pg(&mut self) -> Result<&mut PgStore, StoreError> {
        if !self.migrated {
            self.pg.migrate(super::MIGRATIONS)?;
            self.migrated = true;
            tracing::info!("the PostgreSQL store is reachable again");
        }
        Ok(&mut self.pg)
    }

    fn pg_ref(&self) -> Result<&PgStore, StoreError> {
        if self.migrated {
            Ok(&self.pg)
        } else {
            Err(StoreError::Unavailable(
                "the database has been down since the gateway started (serving from its snapshot)"
                    .into(),
            ))
        }
    }
}

impl Store for Degraded {
    fn serving_from_snapshot(&self) -> bool {
        !self.migrated
    }
    fn try_recover(&mut self) -> bool {
        self.pg().is_ok()
    }
    fn schema_version(&self) -> Result<i64, StoreError> {
        match self.pg_ref() {
            Ok(pg) => pg.schema_version(),
            Err(_) => Ok(self.snap.schema),
        }
    }
    fn api_orgs(&self) -> Result<Vec<String>, StoreError> {
        match self.pg_ref() {
            Ok(pg) => pg.api_orgs(),
            Err(_) => Ok(self.snap.api_orgs.clone()),
        }
    }
    fn create_org(&mut self, id: &str, credits: i64, unix_ms: u64) -> Result<(), StoreError> {
        self.pg()?.create_org(id, credits, unix_ms)
    }
    fn has_grants(&self, org: &str) -> Result<bool, StoreError> {
        match self.pg_ref() {
            Ok(pg) => pg.has_grants(org),
            Err(_) => Ok(self.snap.granted.contains_key(org)),
        }
    }
    fn grant(
        &mut self,
        org: &str,
        micro: i64,
        reason: GrantReason,
        unix_ms: u64,
    ) -> Result<(), StoreError> {
        self.pg()?.grant(org, micro, reason, unix_ms)
    }
    fn first_grants(
        &mut self,
        orgs: &[(String, i64)],
        unix_ms: u64,
    ) -> Result<Vec<String>, StoreError> {
        // Organisations the snapshot has seen need nothing; a new one needs
        // its opening grant recorded, which only the database can do.
        if orgs.iter().all(|(o, _)| self.snap.granted.contains_key(o)) {
            return Ok(Vec::new());
        }
        self.pg()?.first_grants(orgs, unix_ms)
    }
    fn granted(&self) -> Result<HashMap<String, i64>, StoreError> {
        match self.pg_ref() {
            Ok(pg) => pg.granted(),
            Err(_) => Ok(self.snap.granted.clone()),
        }
    }
    fn spent(&self) -> Result<HashMap<String, i64>, StoreError> {
        match self.pg_ref() {
            Ok(pg) => pg.spent(),
            Err(_) => Ok(self.snap.spent.clone()),
        }
    }
    fn packages(&self) -> Result<Vec<(u64, String)>, StoreError> {
        match self.pg_ref() {
            Ok(pg) => pg.packages(),
            Err(_) => Ok(self.snap.packages.clone()),
        }
    }
    fn put_package(&mut self, id: u64, spec: &str, unix_ms: u64) -> Result<(), StoreError> {
        self.pg()?.put_package(id, spec, unix_ms)
    }
    fn insert_package(&mut self, id: u64, spec: &str, unix_ms: u64) -> Result<(), StoreError> {
        self.pg()?.insert_package(id, spec, unix_ms)
    }
    fn nodes(&self) -> Result<Vec<(String, String)>, StoreError> {
        match self.pg_ref() {
            Ok(pg) => pg.nodes(),
            Err(_) => Ok(self.snap.nodes.clone()),
        }
    }
    fn catalog_version(&self) -> Result<Option<i64>, StoreError> {
        match self.pg_ref() {
            Ok(pg) => pg.catalog_version(),
            Err(_) => Ok(None),
        }
    }
    fn node(&self, id: &str) -> Result<Option<String>, StoreError> {
        match self.pg_ref() {
            Ok(pg) => pg.node(id),
            Err(_) => Ok(self
                .snap
                .nodes
                .iter()
                .find(|(n, _)| n == id)
                .map(|(_, spec)| spec.clone())),
        }
    }
    fn put_node(&mut self, id: &str, spec: &str, unix_ms: u64) -> Result<(), StoreError> {
        self.pg()?.put_node(id, spec, unix_ms)
    }
    fn insert_node(&mut self, id: &str, spec: &str, unix_ms: u64) -> Result<(), StoreError> {
        self.pg()?.insert_node(id, spec, unix_ms)
    }
    fn delete_node(&mut self, id: &str) -> Result<bool, StoreError> {
        self.pg()?.delete_node(id)
    }
    fn delete_agent(&mut self, id: &str, unix_ms: u64) -> Result<bool, StoreError> {
        self.pg()?.delete_agent(id, unix_ms)
    }
    fn is_revoked(&self, id: &str) -> Result<bool, StoreError> {
        match self.pg_ref() {
            Ok(pg) => pg.is_revoked(id),
            Err(_) => Ok(self.snap.revoked.iter().any(|r| r == id)),
        }
    }
    fn revoked_agents(&self) -> Result<Vec<String>, StoreError> {
        match self.pg_ref() {
            Ok(pg) => pg.revoked_agents(),
            Err(_) => Ok(self.snap.revoked.clone()),
        }
    }
    fn append_usage(&mut self, key: &FlushKey, rows: &[UsageRow]) -> Result<(), StoreError> {
        self.pg()?.append_usage(key, rows)
    }
    fn epochs(&self) -> Result<HashMap<u64, i64>, StoreError> {
        match self.pg_ref() {
            Ok(pg) => pg.epochs(),
            Err(_) => Ok(self.snap.epochs.clone()),
        }
    }
    fn usage_totals(&self) -> Result<HashMap<u64, UsageTotals>, StoreError> {
        if let Ok(pg) = self.pg_ref() {
            return pg.usage_totals();
        }
        Ok(self
            .snap
            .totals
            .iter()
            .map(|(p, t)| (*p, (*t).into()))
            .collect())
    }
    fn reset_usage(
        &mut self,
        package: u64,
        left: UsageTotals,
        unix_ms: u64,
    ) -> Result<i64, StoreError> {
        self.pg()?.reset_usage(package, left, unix_ms)
    }
    fn usage_rows(&self, package: u64) -> Result<Vec<UsageRow>, StoreError> {
        self.pg_ref()?.usage_rows(package)
    }
    fn usage_history(
        &self,
        package: u64,
        from_minute: i64,
        to_minute: i64,
        step_minutes: i64,
    ) -> Result<Vec<(i64, UsageTotals)>, StoreError> {
        self.pg_ref()?
            .usage_history(package, from_minute, to_minute, step_minutes)
    }
}
