//! The embedded store: SQLite through `rusqlite` (bundled), one file in WAL
//! mode, or in memory for the demo.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use splicegate_control::limits::UsageTotals;

use super::{FlushKey, GrantReason, HISTORY_SQL, MIGRATIONS, Migration, Store, UsageRow, i, u};
use crate::error::StoreError;

/// The embedded store.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    /// A store over `conn`, migrations not applied (tests of the migrations).
    #[cfg(test)]
    pub(crate) fn with_connection(conn: Connection) -> SqliteStore {
        SqliteStore { conn }
    }

    /// The connection (tests).
    #[cfg(test)]
    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Open (or create) the store at `path`; `":memory:"` keeps it in memory.
    /// Applies the migrations this build knows.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = if path.as_os_str() == ":memory:" {
            Connection::open_in_memory()?
        } else {
            Connection::open(path)?
        };
        // WAL: readers never block the flush; NORMAL: a committed flush
        // survives the process dying (SIGKILL), only a power cut may take the
        // last transactions.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut store = SqliteStore { conn };
        store.migrate(MIGRATIONS)?;
        Ok(store)
    }

    /// Apply `steps[v..]` where `v` is the version the file holds, each step
    /// in its own transaction together with its new version number.
    pub fn migrate(&mut self, steps: &[Migration]) -> Result<(), StoreError> {
        self.conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
        )?;
        let have = self.schema_version()?;
        let known = steps.len() as i64;
        if have > known {
            return Err(StoreError::TooNew { have, known });
        }
        for (v, step) in steps.iter().enumerate().skip(have as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(step.sqlite)?;
            tx.execute("DELETE FROM schema_version", [])?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                [v as i64 + 1],
            )?;
            tx.commit()?;
        }
        Ok(())
    }
}

impl Store for SqliteStore {
    /// The schema version the file holds.
    fn schema_version(&self) -> Result<i64, StoreError> {
        let exists: Option<String> = self
            .conn
            .query_row(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if exists.is_none() {
            return Ok(0);
        }
        Ok(self
            .conn
            .query_row("SELECT MAX(version) FROM schema_version", [], |r| {
                r.get::<_, Option<i64>>(0)
            })?
            .unwrap_or(0))
    }

    // ---- organisations and grants ----

    /// Ids of the organisations created through the API.
    fn api_orgs(&self) -> Result<Vec<String>, StoreError> {
        let mut st = self.conn.prepare("SELECT id FROM orgs ORDER BY id")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Record an organisation created through the API, with its opening grant,
    /// in one transaction.
    fn create_org(&mut self, id: &str, credits: i64, unix_ms: u64) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let n = tx.execute(
            "INSERT INTO orgs (id, created_ms) VALUES (?1, ?2) ON CONFLICT (id) DO NOTHING",
            params![id, i(unix_ms)],
        )?;
        if n == 0 {
            return Err(StoreError::Exists(format!("org {id} exists")));
        }
        insert_grant(&tx, id, credits, GrantReason::ApiOpening, unix_ms)?;
        tx.commit()?;
        Ok(())
    }

    /// Whether any grant was ever recorded for `org` (its id has been seen).
    fn has_grants(&self, org: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT 1 FROM grants WHERE org = ?1 LIMIT 1", [org], |_| {
                Ok(())
            })
            .optional()?
            .is_some())
    }

    /// Append a grant (a negative amount is a correction).
    fn grant(
        &mut self,
        org: &str,
        micro: i64,
        reason: GrantReason,
        unix_ms: u64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        insert_grant(&tx, org, micro, reason, unix_ms)?;
        tx.commit()?;
        Ok(())
    }

    /// The opening grant of every config-file organisation not seen before,
    /// in one transaction: a file's `credits` is a first grant only.
    fn first_grants(
        &mut self,
        orgs: &[(String, i64)],
        unix_ms: u64,
    ) -> Result<Vec<String>, StoreError> {
        let tx = self.conn.transaction()?;
        let mut granted = Vec::new();
        for (id, micro) in orgs {
            let seen = tx
                .query_row("SELECT 1 FROM grants WHERE org = ?1 LIMIT 1", [id], |_| {
                    Ok(())
                })
                .optional()?
                .is_some();
            if !seen {
                insert_grant(&tx, id, *micro, GrantReason::FileOpening, unix_ms)?;
                granted.push(id.clone());
            }
        }
        tx.commit()?;
        Ok(granted)
    }

    /// Total granted per organisation.
    fn granted(&self) -> Result<HashMap<String, i64>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT org, SUM(micro) FROM grants GROUP BY org")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Total charged per organisation, over every package and epoch.
    fn spent(&self) -> Result<HashMap<String, i64>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT org, SUM(charged) FROM usage WHERE org <> '' GROUP BY org")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- packages and nodes ----

    /// The API-created packages: id and declaration (JSON).
    fn packages(&self) -> Result<Vec<(u64, String)>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT id, spec FROM packages ORDER BY id")?;
        let rows = st.query_map([], |r| Ok((u(r.get(0)?), r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Insert or replace an API-created package.
    fn put_package(&mut self, id: u64, spec: &str, unix_ms: u64) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO packages (id, spec, updated_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET spec = excluded.spec, updated_ms = excluded.updated_ms",
            params![i(id), spec, i(unix_ms)],
        )?;
        Ok(())
    }

    fn insert_package(&mut self, id: u64, spec: &str, unix_ms: u64) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "INSERT INTO packages (id, spec, updated_ms) VALUES (?1, ?2, ?3) ON CONFLICT (id) DO NOTHING",
            params![i(id), spec, i(unix_ms)],
        )?;
        if n == 0 {
            return Err(StoreError::Exists(format!("package {id} exists")));
        }
        Ok(())
    }

    /// The API-created nodes: id and declaration (JSON).
    fn nodes(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT id, spec FROM nodes ORDER BY id")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The catalogue's version (moved by the schema's triggers).
    fn catalog_version(&self) -> Result<Option<i64>, StoreError> {
        use rusqlite::OptionalExtension as _;
        Ok(self
            .conn
            .query_row("SELECT version FROM catalog WHERE id = 0", [], |r| r.get(0))
            .optional()?)
    }

    /// One API-created node's declaration, by its primary key.
    fn node(&self, id: &str) -> Result<Option<String>, StoreError> {
        use rusqlite::OptionalExtension as _;
        Ok(self
            .conn
            .query_row("SELECT spec FROM nodes WHERE id = ?1", params![id], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Insert or replace an API-created node.
    fn put_node(&mut self, id: &str, spec: &str, unix_ms: u64) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO nodes (id, spec, updated_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET spec = excluded.spec, updated_ms = excluded.updated_ms",
            params![id, spec, i(unix_ms)],
        )?;
        Ok(())
    }

    fn insert_node(&mut self, id: &str, spec: &str, unix_ms: u64) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "INSERT INTO nodes (id, spec, updated_ms) VALUES (?1, ?2, ?3) ON CONFLICT (id) DO NOTHING",
            params![id, spec, i(unix_ms)],
        )?;
        if n == 0 {
            return Err(StoreError::Exists(format!("node {id} exists")));
        }
        Ok(())
    }

    /// Delete an API-created node.
    fn delete_node(&mut self, id: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute("DELETE FROM nodes WHERE id = ?1", [id])? > 0)
    }

    /// Delete an API-created agent node and revoke its id, in one transaction.
    fn delete_agent(&mut self, id: &str, unix_ms: u64) -> Result<bool, StoreError> {
        let tx = self.conn.transaction()?;
        let deleted = tx.execute("DELETE FROM nodes WHERE id = ?1", [id])? > 0;
        tx.execute(
            "INSERT INTO revoked_agents (id, unix_ms) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            params![id, i(unix_ms)],
        )?;
        tx.commit()?;
        Ok(deleted)
    }

    /// Whether an agent id is revoked.
    fn is_revoked(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT 1 FROM revoked_agents WHERE id = ?1", [id], |_| {
                Ok(())
            })
            .optional()?
            .is_some())
    }

    /// Every revoked agent id.
    fn revoked_agents(&self) -> Result<Vec<String>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT id FROM revoked_agents ORDER BY id")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- the usage ledger ----

    /// Append ledger rows in one transaction: a row for the same package,
    /// epoch, minute and organisation grows by the new amounts.
    fn append_usage(&mut self, key: &FlushKey, rows: &[UsageRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        let new = tx.execute(
            "INSERT INTO flushes (gateway, boot, seq, unix_ms, rows) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT DO NOTHING",
            params![
                key.gateway,
                key.boot,
                key.seq,
                i(crate::control::unix_ms()),
                rows.len() as i64
            ],
        )?;
        if new == 0 {
            // Written before: this is a retry of a committed flush.
            return Ok(());
        }
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO usage (package, epoch, minute, org, bytes_up, bytes_down, requests, charged)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (package, epoch, minute, org) DO UPDATE SET
                     bytes_up = bytes_up + excluded.bytes_up,
                     bytes_down = bytes_down + excluded.bytes_down,
                     requests = requests + excluded.requests,
                     charged = charged + excluded.charged",
            )?;
            for r in rows {
                st.execute(params![
                    i(r.package),
                    r.epoch,
                    r.minute,
                    r.org,
                    i(r.bytes_up),
                    i(r.bytes_down),
                    i(r.requests),
                    i(r.charged)
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The current usage epoch of every package that was ever reset.
    fn epochs(&self) -> Result<HashMap<u64, i64>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT package, MAX(epoch) FROM usage_resets GROUP BY package")?;
        let rows = st.query_map([], |r| Ok((u(r.get(0)?), r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Usage totals of every package in its current epoch: the sum of its rows.
    fn usage_totals(&self) -> Result<HashMap<u64, UsageTotals>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT u.package, SUM(u.bytes_up), SUM(u.bytes_down), SUM(u.requests), SUM(u.charged)
             FROM usage u
             LEFT JOIN (SELECT package, MAX(epoch) AS epoch FROM usage_resets GROUP BY package) r
                 ON r.package = u.package
             WHERE u.epoch = COALESCE(r.epoch, 0)
             GROUP BY u.package",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                u(r.get(0)?),
                UsageTotals {
                    bytes_up: u(r.get(1)?),
                    bytes_down: u(r.get(2)?),
                    requests: u(r.get(3)?),
                    charged: u(r.get(4)?),
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Start a new usage epoch for `package`, recording the totals it leaves
    /// behind; returns the new epoch.
    fn reset_usage(
        &mut self,
        package: u64,
        left: UsageTotals,
        unix_ms: u64,
    ) -> Result<i64, StoreError> {
        let tx = self.conn.transaction()?;
        let current: Option<i64> = tx.query_row(
            "SELECT MAX(epoch) FROM usage_resets WHERE package = ?1",
            [i(package)],
            |r| r.get(0),
        )?;
        let epoch = current.unwrap_or(0) + 1;
        tx.execute(
            "INSERT INTO usage_resets (package, epoch, unix_ms, bytes_up, bytes_down, requests, charged)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                i(package),
                epoch,
                i(unix_ms),
                i(left.bytes_up),
                i(left.bytes_down),
                i(left.requests),
                i(left.charged)
            ],
        )?;
        tx.commit()?;
        Ok(epoch)
    }

    /// Ledger rows of one package (every epoch), oldest first, for tests and audits.
    fn usage_rows(&self, package: u64) -> Result<Vec<UsageRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT package, epoch, minute, org, bytes_up, bytes_down, requests, charged
             FROM usage WHERE package = ?1 ORDER BY epoch, minute, org",
        )?;
        let rows = st.query_map([i(package)], |r| {
            Ok(UsageRow {
                package: u(r.get(0)?),
                epoch: r.get(1)?,
                minute: r.get(2)?,
                org: r.get(3)?,
                bytes_up: u(r.get(4)?),
                bytes_down: u(r.get(5)?),
                requests: u(r.get(6)?),
                charged: u(r.get(7)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn usage_history(
        &self,
        package: u64,
        from_minute: i64,
        to_minute: i64,
        step_minutes: i64,
    ) -> Result<Vec<(i64, UsageTotals)>, StoreError> {
        let mut st = self.conn.prepare_cached(HISTORY_SQL)?;
        let rows = st.query_map(
            params![i(package), from_minute, to_minute, step_minutes.max(1)],
            |r| {
                Ok((
                    r.get(0)?,
                    UsageTotals {
                        bytes_up: u(r.get(1)?),
                        bytes_down: u(r.get(2)?),
                        requests: u(r.get(3)?),
                        charged: u(r.get(4)?),
                    },
                ))
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn insert_grant(
    tx: &Transaction<'_>,
    org: &str,
    micro: i64,
    reason: GrantReason,
    unix_ms: u64,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO grants (org, micro, reason, unix_ms) VALUES (?1, ?2, ?3, ?4)",
        params![org, micro, reason.as_str(), i(unix_ms)],
    )?;
    Ok(())
}
