//! `splicegate store migrate --from splicegate.db --to postgres://…`: moves
//! an embedded store into PostgreSQL — organisations, grants, packages
//! (their declarations as stored: keys as they are), nodes, revoked agent
//! ids, the usage ledger, usage resets and flush keys. Each table goes over in chunks,
//! each chunk one transaction (`COPY` into a temporary table, then an
//! `INSERT … ON CONFLICT` into the real one), so it is re-runnable: a
//! second run finds every row there and changes nothing. Afterwards the
//! counts of both sides and every package's usage totals are compared.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use postgres::{Client, NoTls};
use rusqlite::Connection;

use super::{PgStore, SqliteStore, Store};
use crate::error::StoreError;

/// Rows per chunk (one transaction on the PostgreSQL side).
const CHUNK: usize = 50_000;

/// One table: its name, its columns, what makes a row unique, and what a
/// row already there gets (`DO NOTHING`, or the source's values).
struct Table {
    name: &'static str,
    columns: &'static [&'static str],
    key: &'static [&'static str],
    /// Whether a row already there takes the source's values (declarations
    /// may have been edited in the file since an earlier run).
    update: bool,
    /// An identity column whose sequence must pass the copied values.
    identity: Option<&'static str>,
}

const TABLES: &[Table] = &[
    Table {
        name: "orgs",
        columns: &["id", "created_ms"],
        key: &["id"],
        update: false,
        identity: None,
    },
    Table {
        name: "grants",
        columns: &["seq", "org", "micro", "reason", "unix_ms"],
        key: &["seq"],
        update: false,
        identity: Some("seq"),
    },
    Table {
        name: "packages",
        columns: &["id", "spec", "updated_ms"],
        key: &["id"],
        update: true,
        identity: None,
    },
    Table {
        name: "nodes",
        columns: &["id", "spec", "updated_ms"],
        key: &["id"],
        update: true,
        identity: None,
    },
    Table {
        name: "revoked_agents",
        columns: &["id", "unix_ms"],
        key: &["id"],
        update: false,
        identity: None,
    },
    Table {
        name: "usage",
        columns: &[
            "package",
            "epoch",
            "minute",
            "org",
            "bytes_up",
            "bytes_down",
            "requests",
            "charged",
        ],
        key: &["package", "epoch", "minute", "org"],
        update: true,
        identity: None,
    },
    Table {
        name: "usage_resets",
        columns: &[
            "seq",
            "package",
            "epoch",
            "unix_ms",
            "bytes_up",
            "bytes_down",
            "requests",
            "charged",
        ],
        key: &["seq"],
        update: false,
        identity: Some("seq"),
    },
    Table {
        name: "flushes",
        columns: &["gateway", "boot", "seq", "unix_ms", "rows"],
        key: &["gateway", "boot", "seq"],
        update: false,
        identity: None,
    },
];

/// A value as PostgreSQL's text `COPY` format wants it.
fn copy_field(out: &mut String, v: &rusqlite::types::ValueRef<'_>) {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => out.push_str("\\N"),
        ValueRef::Integer(i) => {
            let _ = write!(out, "{i}");
        }
        ValueRef::Real(f) => {
            let _ = write!(out, "{f}");
        }
        ValueRef::Text(t) | ValueRef::Blob(t) => {
            for c in String::from_utf8_lossy(t).chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\t' => out.push_str("\\t"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    c => out.push(c),
                }
            }
        }
    }
}

fn pg(e: postgres::Error) -> StoreError {
    StoreError::Postgres(e.to_string())
}

/// Writes one chunk (`COPY` text) into `table` on `c`, in one transaction.
fn write_chunk(c: &mut Client, t: &Table, data: &str) -> Result<(), StoreError> {
    let cols = t.columns.join(", ");
    let mut tx = c.transaction().map_err(pg)?;
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE migrate_chunk (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP",
        t.name
    ))
    .map_err(pg)?;
    {
        use std::io::Write as _;
        let mut w = tx
            .copy_in(&format!("COPY migrate_chunk ({cols}) FROM STDIN"))
            .map_err(pg)?;
        w.write_all(data.as_bytes())
            .map_err(|e| StoreError::Postgres(e.to_string()))?;
        w.finish().map_err(pg)?;
    }
    let action = if t.update {
        let set: Vec<String> = t
            .columns
            .iter()
            .filter(|c| !t.key.contains(c))
            .map(|c| format!("{c} = excluded.{c}"))
            .collect();
        format!("DO UPDATE SET {}", set.join(", "))
    } else {
        "DO NOTHING".to_string()
    };
    tx.batch_execute(&format!(
        "INSERT INTO {name} ({cols}) SELECT {cols} FROM migrate_chunk ON CONFLICT ({key}) {action}",
        name = t.name,
        key = t.key.join(", ")
    ))
    .map_err(pg)?;
    tx.commit().map_err(pg)
}

/// What a migration found on each side.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Rows per table in the SQLite file.
    pub source: Vec<(&'static str, u64)>,
    /// Rows per table in PostgreSQL afterwards.
    pub target: Vec<(&'static str, u64)>,
}

impl std::fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{:<14} {:>12} {:>12}", "table", "sqlite", "postgres")?;
        for ((name, s), (_, t)) in self.source.iter().zip(&self.target) {
            writeln!(f, "{name:<14} {s:>12} {t:>12}")?;
        }
        Ok(())
    }
}

/// Moves the SQLite store at `from` into the PostgreSQL store at `to`
/// (migrated to this build's schema first), telling `progress` about each
/// table; then checks that PostgreSQL holds every row (at least as many per
/// table: it may hold other gateways' too) and the same usage totals per
/// package.
pub fn sqlite_to_postgres(
    from: &Path,
    to: &str,
    mut progress: impl FnMut(&str),
) -> Result<MigrationReport, StoreError> {
    if !from.is_file() {
        return Err(StoreError::Corrupt {
            what: "file",
            id: from.display().to_string(),
            reason: "no such SQLite store".into(),
        });
    }
    // Both sides at this build's schema.
    let source_store = SqliteStore::open(from)?;
    let target_store = PgStore::connect(to)?;
    let src = Connection::open(from)?;
    let mut config: postgres::Config = to.parse().map_err(pg)?;
    config.options("-c client_min_messages=warning");
    let mut c = config.connect(NoTls).map_err(pg)?;
    let mut report = MigrationReport::default();
    for t in TABLES {
        let cols = t.columns.join(", ");
        let mut st = src.prepare(&format!(
            "SELECT {cols} FROM {} ORDER BY {}",
            t.name,
            t.key.join(", ")
        ))?;
        let mut rows = st.query([])?;
        let (mut data, mut in_chunk, mut total) = (String::new(), 0usize, 0u64);
        while let Some(r) = rows.next()? {
            for i in 0..t.columns.len() {
                if i > 0 {
                    data.push('\t');
                }
                copy_field(&mut data, &r.get_ref(i)?);
            }
            data.push('\n');
            in_chunk += 1;
            total += 1;
            if in_chunk == CHUNK {
                write_chunk(&mut c, t, &data)?;
                data.clear();
                in_chunk = 0;
            }
        }
        if in_chunk > 0 {
            write_chunk(&mut c, t, &data)?;
        }
        if let Some(col) = t.identity {
            c.batch_execute(&format!(
                "SELECT setval(pg_get_serial_sequence('{name}', '{col}'),
                               GREATEST((SELECT COALESCE(MAX({col}), 0) FROM {name}), 1))",
                name = t.name
            ))
            .map_err(pg)?;
        }
        progress(&format!("{}: {total} rows", t.name));
        report.source.push((t.name, total));
    }
    for t in TABLES {
        let n: i64 = c
            .query_one(&format!("SELECT COUNT(*) FROM {}", t.name), &[])
            .map_err(pg)?
            .get(0);
        report.target.push((t.name, n as u64));
    }
    let short: Vec<String> = report
        .source
        .iter()
        .zip(&report.target)
        .filter(|((_, s), (_, t))| t < s)
        .map(|((name, s), (_, t))| format!("{name}: {s} in the file, {t} in PostgreSQL"))
        .collect();
    if !short.is_empty() {
        return Err(StoreError::Corrupt {
            what: "migration",
            id: "check".into(),
            reason: format!("rows missing after the copy: {}", short.join("; ")),
        });
    }
    let (a, b): (HashMap<_, _>, HashMap<_, _>) =
        (source_store.usage_totals()?, target_store.usage_totals()?);
    let differ: Vec<String> = a
        .iter()
        .filter(|(p, t)| b.get(p) != Some(t))
        .take(5)
        .map(|(p, t)| {
            format!(
                "package {p}: {t:?} in the file, {:?} in PostgreSQL",
                b.get(p)
            )
        })
        .collect();
    if !differ.is_empty() {
        return Err(StoreError::Corrupt {
            what: "migration",
            id: "check".into(),
            reason: format!("usage differs: {}", differ.join("; ")),
        });
    }
    Ok(report)
}
