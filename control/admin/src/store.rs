//! The store: one trait ([`Store`]), two implementations — SQLite through
//! `rusqlite` (bundled; one file in WAL mode, or in memory for the demo: the
//! embedded default, [`SqliteStore`]) and PostgreSQL ([`PgStore`], for
//! deployments that outgrow one file and for a fleet). [`open`] picks one
//! from `[store] path` or `[store] url`.
//!
//! What it holds:
//! - the objects created through the admin API (orgs, packages, nodes), each
//!   as its declaration in JSON beside its id;
//! - the usage ledger: rows per package per minute (bytes each way, requests,
//!   micro-credits charged), appended in one transaction per flush; a row for
//!   the same package, minute, usage epoch and organisation only grows;
//! - credit grants per organisation (a file org's opening credits, API grants
//!   and top-ups), appended, never edited;
//! - the ids of agent nodes deleted through the API: revoked, so that no
//!   device can self-enrol under them again;
//! - usage resets: a marker row that starts a new usage epoch for a package,
//!   with the totals it left behind. Usage totals are the sum of the rows of
//!   the current epoch; an organisation's spending is the sum of `charged`
//!   over every epoch of every package that charged it.
//!
//! Balances are therefore derived (grants minus charges) and nothing is edited
//! in place. The schema is versioned: [`MIGRATIONS`] (one list, each step in
//! both dialects) are applied in order, each in its own transaction, and the
//! version is kept in `schema_version`; a store newer than the build is
//! refused with the version it needs.

use std::collections::HashMap;

use splicegate_control::limits::UsageTotals;

use crate::error::StoreError;

#[doc(hidden)]
pub mod conformance;
pub mod migrate;
mod postgres;
pub mod snapshot;
mod sqlite;

pub use self::postgres::PgStore;
pub use self::sqlite::SqliteStore;

/// Where the store lives: `[store] path` or `[store] url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// An SQLite file (or `":memory:"`).
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL connection string (`postgres://user@host/db`, or
    /// `host=/run/postgresql user=splicegate dbname=splicegate`).
    Postgres(String),
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Sqlite(p) => write!(f, "{}", p.display()),
            // Never the password.
            StoreLocation::Postgres(url) => f.write_str(&self::postgres::redact(url)),
        }
    }
}

/// Open (or create) the store and apply the migrations this build knows.
/// A PostgreSQL store that cannot be reached is opened from `snapshot`
/// (its last local snapshot) when there is one: the second value says so.
pub fn open(
    at: &StoreLocation,
    snapshot: Option<&std::path::Path>,
) -> Result<(Box<dyn Store>, bool), StoreError> {
    Ok(match at {
        StoreLocation::Sqlite(path) => (Box::new(SqliteStore::open(path)?), false),
        StoreLocation::Postgres(url) => match PgStore::connect(url) {
            Ok(pg) => (Box::new(pg), false),
            Err(StoreError::Unavailable(why)) => {
                let Some(path) = snapshot.filter(|p| p.exists()) else {
                    return Err(StoreError::Unavailable(why));
                };
                let snap = snapshot::Snapshot::read(path)?;
                tracing::warn!(
                    store = %at,
                    snapshot = %path.display(),
                    taken_unix_ms = snap.taken_unix_ms,
                    "the database is unreachable ({why}); serving from the last local snapshot: \
                     API writes answer store_unavailable and usage waits in memory until it is back"
                );
                (Box::new(snapshot::Degraded::new(url, snap)?), true)
            }
            Err(e) => return Err(e),
        },
    })
}

/// What the control object asks of a store. Every write is one
/// transaction; reads see committed data only.
pub trait Store: Send + std::fmt::Debug {
    /// The schema version the store holds.
    fn schema_version(&self) -> Result<i64, StoreError>;

    /// Whether reads answer from a local snapshot (the database was down
    /// at start and has not been reached since).
    fn serving_from_snapshot(&self) -> bool {
        false
    }
    /// Tries to reach the database of a store serving from its snapshot;
    /// whether it is reachable now.
    fn try_recover(&mut self) -> bool {
        true
    }

    /// Ids of the organisations created through the API.
    fn api_orgs(&self) -> Result<Vec<String>, StoreError>;
    /// Record an organisation created through the API, with its opening
    /// grant, in one transaction.
    fn create_org(&mut self, id: &str, credits: i64, unix_ms: u64) -> Result<(), StoreError>;
    /// Whether any grant was ever recorded for `org` (its id has been seen).
    fn has_grants(&self, org: &str) -> Result<bool, StoreError>;
    /// Append a grant (a negative amount is a correction).
    fn grant(
        &mut self,
        org: &str,
        micro: i64,
        reason: GrantReason,
        unix_ms: u64,
    ) -> Result<(), StoreError>;
    /// The opening grant of every config-file organisation not seen before,
    /// in one transaction: a file's `credits` is a first grant only.
    fn first_grants(
        &mut self,
        orgs: &[(String, i64)],
        unix_ms: u64,
    ) -> Result<Vec<String>, StoreError>;
    /// Total granted per organisation.
    fn granted(&self) -> Result<HashMap<String, i64>, StoreError>;
    /// Total charged per organisation, over every package and epoch.
    fn spent(&self) -> Result<HashMap<String, i64>, StoreError>;

    /// The API-created packages: id and declaration (JSON).
    fn packages(&self) -> Result<Vec<(u64, String)>, StoreError>;
    /// Insert or replace an API-created package.
    fn put_package(&mut self, id: u64, spec: &str, unix_ms: u64) -> Result<(), StoreError>;
    /// Insert a new API-created package; [`StoreError::Exists`] when the
    /// id is taken (another gateway of a fleet made it first).
    fn insert_package(&mut self, id: u64, spec: &str, unix_ms: u64) -> Result<(), StoreError>;
    /// The catalogue's version: it moves whenever an organisation, a
    /// package or a node is written (schema step 5); `None` when the store
    /// cannot tell (then every read back reads everything).
    fn catalog_version(&self) -> Result<Option<i64>, StoreError> {
        Ok(None)
    }
    /// The API-created nodes: id and declaration (JSON).
    fn nodes(&self) -> Result<Vec<(String, String)>, StoreError>;
    /// One API-created node's declaration (JSON), if it exists. The
    /// default reads them all; a store with an index reads one row.
    fn node(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .nodes()?
            .into_iter()
            .find(|(n, _)| n == id)
            .map(|(_, spec)| spec))
    }
    /// Insert or replace an API-created node.
    fn put_node(&mut self, id: &str, spec: &str, unix_ms: u64) -> Result<(), StoreError>;
    /// Insert a new API-created node; [`StoreError::Exists`] when the id
    /// is taken.
    fn insert_node(&mut self, id: &str, spec: &str, unix_ms: u64) -> Result<(), StoreError>;
    /// Delete an API-created node.
    fn delete_node(&mut self, id: &str) -> Result<bool, StoreError>;
    /// Delete an API-created agent node and revoke its id, in one
    /// transaction; revoking an id twice keeps the first time. Returns
    /// whether a node was deleted.
    fn delete_agent(&mut self, id: &str, unix_ms: u64) -> Result<bool, StoreError>;
    /// Whether an agent id is revoked.
    fn is_revoked(&self, id: &str) -> Result<bool, StoreError>;
    /// Every revoked agent id.
    fn revoked_agents(&self) -> Result<Vec<String>, StoreError>;

    /// Append one flush's ledger rows in one transaction, idempotently:
    /// `key` is recorded with them, and a flush whose key is already there
    /// (a retry of one that was committed but not confirmed) changes
    /// nothing. A row for the same package, epoch, minute and organisation
    /// grows by the new amounts.
    fn append_usage(&mut self, key: &FlushKey, rows: &[UsageRow]) -> Result<(), StoreError>;
    /// The current usage epoch of every package that was ever reset.
    fn epochs(&self) -> Result<HashMap<u64, i64>, StoreError>;
    /// Usage totals of every package in its current epoch: the sum of its rows.
    fn usage_totals(&self) -> Result<HashMap<u64, UsageTotals>, StoreError>;
    /// Start a new usage epoch for `package`, recording the totals it leaves
    /// behind; returns the new epoch.
    fn reset_usage(
        &mut self,
        package: u64,
        left: UsageTotals,
        unix_ms: u64,
    ) -> Result<i64, StoreError>;
    /// Ledger rows of one package (every epoch), oldest first, for tests and audits.
    fn usage_rows(&self, package: u64) -> Result<Vec<UsageRow>, StoreError>;
    /// One package's usage over every epoch, summed per `step_minutes`
    /// (60: hourly, 1440: daily, aligned to UTC) for minutes in
    /// `[from_minute, to_minute)`; buckets without usage are left out.
    fn usage_history(
        &self,
        package: u64,
        from_minute: i64,
        to_minute: i64,
        step_minutes: i64,
    ) -> Result<Vec<(i64, UsageTotals)>, StoreError>;
}

/// The roll-up query of [`Store::usage_history`] in SQLite (parameters:
/// package, from, to, step); PostgreSQL's is the same with `$n` and BIGINT
/// sums.
pub(crate) const HISTORY_SQL: &str =
    "SELECT (minute / ?4) * ?4 AS bucket, SUM(bytes_up), SUM(bytes_down), SUM(requests), SUM(charged)
     FROM usage WHERE package = ?1 AND minute >= ?2 AND minute < ?3
     GROUP BY bucket ORDER BY bucket";

/// What makes a flush unique: the gateway, its boot, and the flush's
/// sequence number in that boot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FlushKey {
    /// `[fleet] id`, or `"local"`.
    pub gateway: String,
    /// Drawn at each start.
    pub boot: i64,
    /// 1, 2, … within the boot.
    pub seq: i64,
}

/// One schema step, in each store's dialect.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// For SQLite.
    pub sqlite: &'static str,
    /// For PostgreSQL.
    pub postgres: &'static str,
}

/// The schema, one step per version: `MIGRATIONS[i]` takes version `i` to
/// `i + 1`, in both dialects (SQLite's INTEGER is 64-bit; PostgreSQL's is
/// BIGINT).
pub const MIGRATIONS: &[Migration] = &[
    // 1: objects, grants and the usage ledger.
    Migration {
        sqlite: "CREATE TABLE orgs (
         id TEXT PRIMARY KEY,
         created_ms INTEGER NOT NULL
     );
     CREATE TABLE grants (
         seq INTEGER PRIMARY KEY AUTOINCREMENT,
         org TEXT NOT NULL,
         micro INTEGER NOT NULL,
         reason TEXT NOT NULL,
         unix_ms INTEGER NOT NULL
     );
     CREATE INDEX grants_by_org ON grants (org);
     CREATE TABLE packages (
         id INTEGER PRIMARY KEY,
         spec TEXT NOT NULL,
         updated_ms INTEGER NOT NULL
     );
     CREATE TABLE nodes (
         id TEXT PRIMARY KEY,
         spec TEXT NOT NULL,
         updated_ms INTEGER NOT NULL
     );
     CREATE TABLE usage (
         package INTEGER NOT NULL,
         epoch INTEGER NOT NULL,
         minute INTEGER NOT NULL,
         org TEXT NOT NULL,
         bytes_up INTEGER NOT NULL,
         bytes_down INTEGER NOT NULL,
         requests INTEGER NOT NULL,
         charged INTEGER NOT NULL,
         PRIMARY KEY (package, epoch, minute, org)
     ) WITHOUT ROWID;
     CREATE INDEX usage_by_org ON usage (org);",
        postgres: "CREATE TABLE orgs (
         id TEXT PRIMARY KEY,
         created_ms BIGINT NOT NULL
     );
     CREATE TABLE grants (
         seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
         org TEXT NOT NULL,
         micro BIGINT NOT NULL,
         reason TEXT NOT NULL,
         unix_ms BIGINT NOT NULL
     );
     CREATE INDEX grants_by_org ON grants (org);
     CREATE TABLE packages (
         id BIGINT PRIMARY KEY,
         spec TEXT NOT NULL,
         updated_ms BIGINT NOT NULL
     );
     CREATE TABLE nodes (
         id TEXT PRIMARY KEY,
         spec TEXT NOT NULL,
         updated_ms BIGINT NOT NULL
     );
     CREATE TABLE usage (
         package BIGINT NOT NULL,
         epoch BIGINT NOT NULL,
         minute BIGINT NOT NULL,
         org TEXT NOT NULL,
         bytes_up BIGINT NOT NULL,
         bytes_down BIGINT NOT NULL,
         requests BIGINT NOT NULL,
         charged BIGINT NOT NULL,
         PRIMARY KEY (package, epoch, minute, org)
     );
     CREATE INDEX usage_by_org ON usage (org);",
    },
    // 2: usage resets start a new epoch; the marker keeps what was reset.
    Migration {
        sqlite: "CREATE TABLE usage_resets (
         seq INTEGER PRIMARY KEY AUTOINCREMENT,
         package INTEGER NOT NULL,
         epoch INTEGER NOT NULL,
         unix_ms INTEGER NOT NULL,
         bytes_up INTEGER NOT NULL,
         bytes_down INTEGER NOT NULL,
         requests INTEGER NOT NULL,
         charged INTEGER NOT NULL
     );
     CREATE INDEX usage_resets_by_package ON usage_resets (package);",
        postgres: "CREATE TABLE usage_resets (
         seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
         package BIGINT NOT NULL,
         epoch BIGINT NOT NULL,
         unix_ms BIGINT NOT NULL,
         bytes_up BIGINT NOT NULL,
         bytes_down BIGINT NOT NULL,
         requests BIGINT NOT NULL,
         charged BIGINT NOT NULL
     );
     CREATE INDEX usage_resets_by_package ON usage_resets (package);",
    },
    // 3: each flush's key, so that a retried flush is written once.
    Migration {
        sqlite: "CREATE TABLE flushes (
         gateway TEXT NOT NULL,
         boot INTEGER NOT NULL,
         seq INTEGER NOT NULL,
         unix_ms INTEGER NOT NULL,
         rows INTEGER NOT NULL,
         PRIMARY KEY (gateway, boot, seq)
     ) WITHOUT ROWID;",
        postgres: "CREATE TABLE flushes (
         gateway TEXT NOT NULL,
         boot BIGINT NOT NULL,
         seq BIGINT NOT NULL,
         unix_ms BIGINT NOT NULL,
         rows BIGINT NOT NULL,
         PRIMARY KEY (gateway, boot, seq)
     );",
    },
    // 4: ids of agent nodes deleted through the API, never to enrol again.
    Migration {
        sqlite: "CREATE TABLE revoked_agents (
         id TEXT PRIMARY KEY,
         unix_ms INTEGER NOT NULL
     ) WITHOUT ROWID;",
        postgres: "CREATE TABLE revoked_agents (
         id TEXT PRIMARY KEY,
         unix_ms BIGINT NOT NULL
     );",
    },
    // 5: a version of the catalogue (organisations, packages, nodes), moved
    // by every write to them however it is made, so that a gateway of a
    // fleet can tell that nothing changed without reading them all.
    Migration {
        sqlite: "CREATE TABLE catalog (
         id INTEGER PRIMARY KEY CHECK (id = 0),
         version INTEGER NOT NULL
     );
     INSERT INTO catalog (id, version) VALUES (0, 0);
     CREATE TRIGGER orgs_insert AFTER INSERT ON orgs BEGIN UPDATE catalog SET version = version + 1; END;
     CREATE TRIGGER orgs_update AFTER UPDATE ON orgs BEGIN UPDATE catalog SET version = version + 1; END;
     CREATE TRIGGER orgs_delete AFTER DELETE ON orgs BEGIN UPDATE catalog SET version = version + 1; END;
     CREATE TRIGGER packages_insert AFTER INSERT ON packages BEGIN UPDATE catalog SET version = version + 1; END;
     CREATE TRIGGER packages_update AFTER UPDATE ON packages BEGIN UPDATE catalog SET version = version + 1; END;
     CREATE TRIGGER packages_delete AFTER DELETE ON packages BEGIN UPDATE catalog SET version = version + 1; END;
     CREATE TRIGGER nodes_insert AFTER INSERT ON nodes BEGIN UPDATE catalog SET version = version + 1; END;
     CREATE TRIGGER nodes_update AFTER UPDATE ON nodes BEGIN UPDATE catalog SET version = version + 1; END;
     CREATE TRIGGER nodes_delete AFTER DELETE ON nodes BEGIN UPDATE catalog SET version = version + 1; END;",
        postgres: "CREATE TABLE catalog (
         id INTEGER PRIMARY KEY CHECK (id = 0),
         version BIGINT NOT NULL
     );
     INSERT INTO catalog (id, version) VALUES (0, 0);
     CREATE FUNCTION splicegate_catalog_changed() RETURNS trigger LANGUAGE plpgsql
     SET search_path FROM CURRENT AS $$
     BEGIN
         UPDATE catalog SET version = version + 1;
         RETURN NULL;
     END $$;
     CREATE TRIGGER orgs_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON orgs
         FOR EACH STATEMENT EXECUTE FUNCTION splicegate_catalog_changed();
     CREATE TRIGGER packages_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON packages
         FOR EACH STATEMENT EXECUTE FUNCTION splicegate_catalog_changed();
     CREATE TRIGGER nodes_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON nodes
         FOR EACH STATEMENT EXECUTE FUNCTION splicegate_catalog_changed();",
    },
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Where grants come from (kept in the `reason` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantReason {
    /// A config-file organisation's `credits`, the first time its id was seen.
    FileOpening,
    /// `POST /v1/orgs` with credits.
    ApiOpening,
    /// `POST /v1/orgs/{id}/credits`.
    TopUp,
}

impl GrantReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            GrantReason::FileOpening => "file-opening",
            GrantReason::ApiOpening => "api-opening",
            GrantReason::TopUp => "top-up",
        }
    }
}

/// One ledger row to append: a package's usage in one minute, charged to `org`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// The package.
    pub package: u64,
    /// Its usage epoch (0 until its first reset).
    pub epoch: i64,
    /// Minutes since the Unix epoch.
    pub minute: i64,
    /// The organisation charged (`""` for none).
    pub org: String,
    /// Client → target bytes.
    pub bytes_up: u64,
    /// Target → client bytes.
    pub bytes_down: u64,
    /// Requests.
    pub requests: u64,
    /// Micro-credits charged.
    pub charged: u64,
}

pub(crate) fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[cfg(test)]
mod tests;
