//! The store on PostgreSQL: the same tables and transactions as SQLite, for
//! deployments that outgrow one file and for a fleet of gateways sharing one
//! source of truth.
//!
//! The control object calls its store under its own lock, one call at a
//! time, from the admin thread and the flusher; so one connection is all it
//! uses. The connection lives on a thread of its own (`splicegate-store`)
//! that runs `postgres`' blocking client — tokio-postgres driven by a
//! runtime of that thread, never inside the admin API's runtime — and each
//! call is a job sent there and waited for. A lost connection is opened
//! again on the next call.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::Duration;

use postgres::{Client, NoTls};
use splicegate_control::limits::UsageTotals;

use super::{FlushKey, GrantReason, MIGRATIONS, Migration, Store, UsageRow, i, u};

/// [`super::HISTORY_SQL`] with BIGINT sums (PostgreSQL's SUM of BIGINT is
/// NUMERIC).
const HISTORY_SQL: &str =
    "SELECT (minute / $4) * $4 AS bucket, SUM(bytes_up)::BIGINT, SUM(bytes_down)::BIGINT,
            SUM(requests)::BIGINT, SUM(charged)::BIGINT
     FROM usage WHERE package = $1 AND minute >= $2 AND minute < $3
     GROUP BY bucket ORDER BY bucket";
use crate::error::StoreError;

type Job = Box<dyn FnOnce(&mut Conn) + Send>;

/// The store thread's side: the connection string and, when connected, the
/// client.
struct Conn {
    url: String,
    client: Option<Client>,
}

impl Conn {
    /// The client, connecting (again) if there is none or it was closed.
    fn client(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let mut config: postgres::Config = self.url.parse().map_err(pg)?;
            config.connect_timeout(Duration::from_secs(5));
            config.application_name("splicegate");
            // NOTICEs ("relation already exists, skipping") are not news.
            config.options("-c client_min_messages=warning");
            self.client = Some(
                config
                    .connect(NoTls)
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?,
            );
        }
        Ok(self.client.as_mut().expect("connected above"))
    }
}

fn pg(e: postgres::Error) -> StoreError {
    // The server's own message ("relation … does not exist"), not only
    // the client's "db error".
    match e.as_db_error() {
        Some(db) => StoreError::Postgres(format!(
            "{}: {} ({})",
            db.severity(),
            db.message(),
            db.code().code()
        )),
        None => StoreError::Postgres(e.to_string()),
    }
}

/// `url` with its password replaced by `***`, for logs and errors.
pub(crate) fn redact(url: &str) -> String {
    // postgres://user:password@host/db
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((userinfo, host)) = rest.split_once('@')
        && let Some((user, _)) = userinfo.split_once(':')
    {
        return format!("{scheme}://{user}:***@{host}");
    }
    // key=value form: password=...
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The PostgreSQL store.
#[derive(Debug)]
pub struct PgStore {
    jobs: mpsc::Sender<Job>,
}

impl PgStore {
    /// Connects to `url` (on the store thread) and applies the migrations
    /// this build knows; a database written by a newer build is refused.
    pub fn connect(url: &str) -> Result<PgStore, StoreError> {
        let store = PgStore::lazy(url)?;
        store.migrate(MIGRATIONS)?;
        Ok(store)
    }

    /// The store thread for `url` without connecting: the first call
    /// connects (a gateway that starts while its database is down).
    pub fn lazy(url: &str) -> Result<PgStore, StoreError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let conn_url = url.to_string();
        std::thread::Builder::new()
            .name("splicegate-store".into())
            .spawn(move || {
                let mut conn = Conn {
                    url: conn_url,
                    client: None,
                };
                for job in rx {
                    job(&mut conn);
                }
            })
            .map_err(|e| StoreError::Postgres(format!("store thread: {e}")))?;
        Ok(PgStore { jobs: tx })
    }

    /// Runs `f` with the client on the store thread and waits for it.
    fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |conn: &mut Conn| {
            let mut r = conn.client().and_then(f);
            if r.is_err() && conn.client.as_ref().is_some_and(Client::is_closed) {
                // The connection went away under the call: the server is
                // down or restarting; the next call connects again.
                conn.client = None;
                if let Err(StoreError::Postgres(m)) = r {
                    r = Err(StoreError::Unavailable(m));
                }
            }
            let _ = tx.send(r);
        });
        self.jobs
            .send(job)
            .map_err(|_| StoreError::Unavailable("the store thread ended".into()))?;
        rx.recv()
            .map_err(|_| StoreError::Unavailable("the store thread ended".into()))?
    }

    /// Apply `steps[v..]` where `v` is the version the database holds, each
    /// step in its own transaction together with its new version number.
    /// Two gateways migrating at once take turns (an advisory lock, taken
    /// before anything is created: two concurrent `CREATE TABLE IF NOT
    /// EXISTS` of one table can fail in PostgreSQL, as a fleet's first
    /// start on an empty database found).
    pub fn migrate(&self, steps: &'static [Migration]) -> Result<(), StoreError> {
        self.call(move |c| {
            c.batch_execute("SELECT pg_advisory_lock(7413000001)")
                .map_err(pg)?;
            let result = (|| {
                c.batch_execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)",
                )
                .map_err(pg)?;
                let have = version(c)?;
                let known = steps.len() as i64;
                if have > known {
                    return Err(StoreError::TooNew { have, known });
                }
                for (v, step) in steps.iter().enumerate().skip(have as usize) {
                    let mut tx = c.transaction().map_err(pg)?;
                    tx.batch_execute(step.postgres).map_err(pg)?;
                    tx.execute("DELETE FROM schema_version", &[]).map_err(pg)?;
                    tx.execute(
                        "INSERT INTO schema_version (version) VALUES ($1)",
                        &[&(v as i64 + 1)],
                    )
                    .map_err(pg)?;
                    tx.commit().map_err(pg)?;
                }
                Ok(())
            })();
            let _ = c.batch_execute("SELECT pg_advisory_unlock(7413000001)");
            result
        })
    }
}

/// The version `schema_version` holds (0 when empty).
fn version(c: &mut Client) -> Result<i64, StoreError> {
    let row = c
        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
        .map_err(pg)?;
    Ok(row.get(0))
}

/// Sums as BIGINT (PostgreSQL's SUM of BIGINT is NUMERIC).
fn map<K: std::hash::Hash + Eq>(
    rows: Vec<postgres::Row>,
    key: impl Fn(&postgres::Row) -> K,
) -> HashMap<K, i64> {
    rows.iter().map(|r| (key(r), r.get::<_, i64>(1))).collect()
}

/// Columns 1–4 of a row: bytes up, bytes down, requests, charged.
fn totals(r: &postgres::Row) -> UsageTotals {
    UsageTotals {
        bytes_up: u(r.get(1)),
        bytes_down: u(r.get(2)),
        requests: u(r.get(3)),
        charged: u(r.get(4)),
    }
}

fn insert_grant(
    tx: &mut postgres::Transaction<'_>,
    org: &str,
    micro: i64,
    reason: GrantReason,
    unix_ms: u64,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO grants (org, micro, reason, unix_ms) VALUES ($1, $2, $3, $4)",
        &[&org, &micro, &reason.as_str(), &i(unix_ms)],
    )
    .map_err(pg)?;
    Ok(())
}

impl Store for PgStore {
    fn schema_version(&self) -> Result<i64, StoreError> {
        self.call(|c| {
            let exists: bool = c
                .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])
                .map_err(pg)?
                .get(0);
            if exists { version(c) } else { Ok(0) }
        })
    }

    fn api_orgs(&self) -> Result<Vec<String>, StoreError> {
        self.call(|c| {
            let rows = c
                .query("SELECT id FROM orgs ORDER BY id", &[])
                .map_err(pg)?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn create_org(&mut self, id: &str, credits: i64, unix_ms: u64) -> Result<(), StoreError> {
        let id = id.to_string();
        self.call(move |c| {
            let mut tx = c.transaction().map_err(pg)?;
            let n = tx
                .execute(
                    "INSERT INTO orgs (id, created_ms) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                    &[&id, &i(unix_ms)],
                )
                .map_err(pg)?;
            if n == 0 {
                return Err(StoreError::Exists(format!("org {id} exists")));
            }
            insert_grant(&mut tx, &id, credits, GrantReason::ApiOpening, unix_ms)?;
            tx.commit().map_err(pg)
        })
    }

    fn has_grants(&self, org: &str) -> Result<bool, StoreError> {
        let org = org.to_string();
        self.call(move |c| {
            Ok(
                c.query_opt("SELECT 1 FROM grants WHERE org = $1 LIMIT 1", &[&org])
                    .map_err(pg)?
                    .is_some(),
            )
        })
    }

    fn grant(
        &mut self,
        org: &str,
        micro: i64,
        reason: GrantReason,
        unix_ms: u64,
    ) -> Result<(), StoreError> {
        let org = org.to_string();
        self.call(move |c| {
            let mut tx = c.transaction().map_err(pg)?;
            insert_grant(&mut tx, &org, micro, reason, unix_ms)?;
            tx.commit().map_err(pg)
        })
    }

    fn first_grants(
        &mut self,
        orgs: &[(String, i64)],
        unix_ms: u64,
    ) -> Result<Vec<String>, StoreError> {
        let orgs = orgs.to_vec();
        self.call(move |c| {
            let mut tx = c.transaction().map_err(pg)?;
            // One gateway at a time decides what is "first".
            tx.batch_execute("LOCK TABLE grants IN SHARE ROW EXCLUSIVE MODE")
                .map_err(pg)?;
            let mut granted = Vec::new();
            for (id, micro) in &orgs {
                let seen = tx
                    .query_opt("SELECT 1 FROM grants WHERE org = $1 LIMIT 1", &[id])
                    .map_err(pg)?
                    .is_some();
                if !seen {
                    insert_grant(&mut tx, id, *micro, GrantReason::FileOpening, unix_ms)?;
                    granted.push(id.clone());
                }
            }
            tx.commit().map_err(pg)?;
            Ok(granted)
        })
    }

    fn granted(&self) -> Result<HashMap<String, i64>, StoreError> {
        self.call(|c| {
            let rows = c
                .query(
                    "SELECT org, SUM(micro)::BIGINT FROM grants GROUP BY org",
                    &[],
                )
                .map_err(pg)?;
            Ok(map(rows, |r| r.get::<_, String>(0)))
        })
    }

    fn spent(&self) -> Result<HashMap<String, i64>, StoreError> {
        self.call(|c| {
            let rows = c
                .query(
                    "SELECT org, SUM(charged)::BIGINT FROM usage WHERE org <> '' GROUP BY org",
                    &[],
                )
                .map_err(pg)?;
            Ok(map(rows, |r| r.get::<_, String>(0)))
        })
    }

    fn packages(&self) -> Result<Vec<(u64, String)>, StoreError> {
        self.call(|c| {
            let rows = c
                .query("SELECT id, spec FROM packages ORDER BY id", &[])
                .map_err(pg)?;
            Ok(rows.iter().map(|r| (u(r.get(0)), r.get(1))).collect())
        })
    }

    fn put_package(&mut self, id: u64, spec: &str, unix_ms: u64) -> Result<(), StoreError> {
        let spec = spec.to_string();
        self.call(move |c| {
            c.execute(
                "INSERT INTO packages (id, spec, updated_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET spec = excluded.spec, updated_ms = excluded.updated_ms",
                &[&i(id), &spec, &i(unix_ms)],
            )
            .map_err(pg)?;
            Ok(())
        })
    }

    fn insert_package(&mut self, id: u64, spec: &str, unix_ms: u64) -> Result<(), StoreError> {
        let spec = spec.to_string();
        self.call(move |c| {
            let n = c
                .execute(
                    "INSERT INTO packages (id, spec, updated_ms) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
                    &[&i(id), &spec, &i(unix_ms)],
                )
                .map_err(pg)?;
            if n == 0 {
                return Err(StoreError::Exists(format!("package {id} exists")));
            }
            Ok(())
        })
    }

    fn insert_node(&mut self, id: &str, spec: &str, unix_ms: u64) -> Result<(), StoreError> {
        let (id, spec) = (id.to_string(), spec.to_string());
        self.call(move |c| {
            let n = c
                .execute(
                    "INSERT INTO nodes (id, spec, updated_ms) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
                    &[&id, &spec, &i(unix_ms)],
                )
                .map_err(pg)?;
            if n == 0 {
                return Err(StoreError::Exists(format!("node {id} exists")));
            }
            Ok(())
        })
    }

    fn nodes(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.call(|c| {
            let rows = c
                .query("SELECT id, spec FROM nodes ORDER BY id", &[])
                .map_err(pg)?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn catalog_version(&self) -> Result<Option<i64>, StoreError> {
        self.call(|c| {
            let row = c
                .query_opt("SELECT version FROM catalog WHERE id = 0", &[])
                .map_err(pg)?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn node(&self, id: &str) -> Result<Option<String>, StoreError> {
        let id = id.to_string();
        self.call(move |c| {
            let row = c
                .query_opt("SELECT spec FROM nodes WHERE id = $1", &[&id])
                .map_err(pg)?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn put_node(&mut self, id: &str, spec: &str, unix_ms: u64) -> Result<(), StoreError> {
        let (id, spec) = (id.to_string(), spec.to_string());
        self.call(move |c| {
            c.execute(
                "INSERT INTO nodes (id, spec, updated_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET spec = excluded.spec, updated_ms = excluded.updated_ms",
                &[&id, &spec, &i(unix_ms)],
            )
            .map_err(pg)?;
            Ok(())
        })
    }

    fn delete_node(&mut self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.call(move |c| {
            Ok(c.execute("DELETE FROM nodes WHERE id = $1", &[&id])
                .map_err(pg)?
                > 0)
        })
    }

    fn delete_agent(&mut self, id: &str, unix_ms: u64) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.call(move |c| {
            let mut tx = c.transaction().map_err(pg)?;
            let deleted = tx
                .execute("DELETE FROM nodes WHERE id = $1", &[&id])
                .map_err(pg)?
                > 0;
            tx.execute(
                "INSERT INTO revoked_agents (id, unix_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&id, &i(unix_ms)],
            )
            .map_err(pg)?;
            tx.commit().map_err(pg)?;
            Ok(deleted)
        })
    }

    fn is_revoked(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.call(move |c| {
            Ok(
                c.query_opt("SELECT 1 FROM revoked_agents WHERE id = $1", &[&id])
                    .map_err(pg)?
                    .is_some(),
            )
        })
    }

    fn revoked_agents(&self) -> Result<Vec<String>, StoreError> {
        self.call(|c| {
            let rows = c
                .query("SELECT id FROM revoked_agents ORDER BY id", &[])
                .map_err(pg)?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn append_usage(&mut self, key: &FlushKey, rows: &[UsageRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let (rows, key) = (rows.to_vec(), key.clone());
        self.call(move |c| {
            let mut tx = c.transaction().map_err(pg)?;
            let new = tx
                .execute(
                    "INSERT INTO flushes (gateway, boot, seq, unix_ms, rows) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT DO NOTHING",
                    &[
                        &key.gateway,
                        &key.boot,
                        &key.seq,
                        &i(crate::control::unix_ms()),
                        &(rows.len() as i64),
                    ],
                )
                .map_err(pg)?;
            if new == 0 {
                // Written before: this is a retry of a committed flush.
                return Ok(());
            }
            // One statement for the whole flush (arrays, UNNEST): a round
            // trip per row cost 0.8 s per flush at 10,000 packages. Rows
            // with one key are summed first (one statement may not update a
            // row twice).
            let mut merged: HashMap<(u64, i64, i64, String), [u64; 4]> = HashMap::new();
            for r in &rows {
                let m = merged
                    .entry((r.package, r.epoch, r.minute, r.org.clone()))
                    .or_default();
                m[0] += r.bytes_up;
                m[1] += r.bytes_down;
                m[2] += r.requests;
                m[3] += r.charged;
            }
            let n = merged.len();
            let (mut package, mut epoch, mut minute, mut org) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            let mut sums: [Vec<i64>; 4] = Default::default();
            for ((p, e, m, o), v) in merged {
                package.push(i(p));
                epoch.push(e);
                minute.push(m);
                org.push(o);
                for (col, x) in sums.iter_mut().zip(v) {
                    col.push(i(x));
                }
            }
            tx.execute(
                "INSERT INTO usage (package, epoch, minute, org, bytes_up, bytes_down, requests, charged)
                 SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[],
                                      $5::BIGINT[], $6::BIGINT[], $7::BIGINT[], $8::BIGINT[])
                 ON CONFLICT (package, epoch, minute, org) DO UPDATE SET
                     bytes_up = usage.bytes_up + excluded.bytes_up,
                     bytes_down = usage.bytes_down + excluded.bytes_down,
                     requests = usage.requests + excluded.requests,
                     charged = usage.charged + excluded.charged",
                &[
                    &package, &epoch, &minute, &org, &sums[0], &sums[1], &sums[2], &sums[3],
                ],
            )
            .map_err(pg)?;
            tx.commit().map_err(pg)
        })
    }

    fn epochs(&self) -> Result<HashMap<u64, i64>, StoreError> {
        self.call(|c| {
            let rows = c
                .query(
                    "SELECT package, MAX(epoch) FROM usage_resets GROUP BY package",
                    &[],
                )
                .map_err(pg)?;
            Ok(map(rows, |r| u(r.get(0))))
        })
    }

    fn usage_totals(&self) -> Result<HashMap<u64, UsageTotals>, StoreError> {
        self.call(|c| {
            let rows = c
                .query(
                    "SELECT u.package, SUM(u.bytes_up)::BIGINT, SUM(u.bytes_down)::BIGINT,
                            SUM(u.requests)::BIGINT, SUM(u.charged)::BIGINT
                     FROM usage u
                     LEFT JOIN (SELECT package, MAX(epoch) AS epoch FROM usage_resets GROUP BY package) r
                         ON r.package = u.package
                     WHERE u.epoch = COALESCE(r.epoch, 0)
                     GROUP BY u.package",
                    &[],
                )
                .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| (u(r.get(0)), totals(r)))
                .collect())
        })
    }

    fn reset_usage(
        &mut self,
        package: u64,
        left: UsageTotals,
        unix_ms: u64,
    ) -> Result<i64, StoreError> {
        self.call(move |c| {
            let mut tx = c.transaction().map_err(pg)?;
            let current: Option<i64> = tx
                .query_one(
                    "SELECT MAX(epoch) FROM usage_resets WHERE package = $1",
                    &[&i(package)],
                )
                .map_err(pg)?
                .get(0);
            let epoch = current.unwrap_or(0) + 1;
            tx.execute(
                "INSERT INTO usage_resets (package, epoch, unix_ms, bytes_up, bytes_down, requests, charged)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &i(package),
                    &epoch,
                    &i(unix_ms),
                    &i(left.bytes_up),
                    &i(left.bytes_down),
                    &i(left.requests),
                    &i(left.charged),
                ],
            )
            .map_err(pg)?;
            tx.commit().map_err(pg)?;
            Ok(epoch)
        })
    }

    fn usage_rows(&self, package: u64) -> Result<Vec<UsageRow>, StoreError> {
        self.call(move |c| {
            let rows = c
                .query(
                    "SELECT package, epoch, minute, org, bytes_up, bytes_down, requests, charged
                     FROM usage WHERE package = $1 ORDER BY epoch, minute, org",
                    &[&i(package)],
                )
                .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| UsageRow {
                    package: u(r.get(0)),
                    epoch: r.get(1),
                    minute: r.get(2),
                    org: r.get(3),
                    bytes_up: u(r.get(4)),
                    bytes_down: u(r.get(5)),
                    requests: u(r.get(6)),
                    charged: u(r.get(7)),
                })
                .collect())
        })
    }

    fn usage_history(
        &self,
        package: u64,
        from_minute: i64,
        to_minute: i64,
        step_minutes: i64,
    ) -> Result<Vec<(i64, UsageTotals)>, StoreError> {
        self.call(move |c| {
            let rows = c
                .query(
                    HISTORY_SQL,
                    &[&i(package), &from_minute, &to_minute, &step_minutes.max(1)],
                )
                .map_err(pg)?;
            Ok(rows.iter().map(|r| (r.get(0), totals(r))).collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact("postgres://sg:secret@db.internal/splicegate"),
            "postgres://sg:***@db.internal/splicegate"
        );
        assert_eq!(
            redact("host=/run/postgresql user=sg password=secret dbname=x"),
            "host=/run/postgresql user=sg password=*** dbname=x"
        );
        assert_eq!(redact("postgres://sg@db/x"), "postgres://sg@db/x");
    }
}
