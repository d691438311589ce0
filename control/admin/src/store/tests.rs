use std::path::Path;

use rusqlite::Connection;

use super::conformance;
use super::*;

fn temp_path(tag: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::env::temp_dir().join(format!(
        "splicegate-store-{tag}-{}-{nanos}.db",
        std::process::id()
    ))
}

#[test]
fn migrations_are_versioned_and_resume_where_the_file_stopped() {
    let mut s = SqliteStore::with_connection(Connection::open_in_memory().unwrap());
    assert_eq!(s.schema_version().unwrap(), 0);
    s.migrate(&MIGRATIONS[..1]).unwrap();
    assert_eq!(s.schema_version().unwrap(), 1);
    assert!(s.epochs().is_err(), "version 1 has no usage_resets table");
    // A row written by a version-1 build.
    s.connection()
        .execute(
            "INSERT INTO usage VALUES (7, 0, 1, 'acme', 10, 20, 1, 1)",
            [],
        )
        .unwrap();
    s.migrate(MIGRATIONS).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    assert!(s.epochs().unwrap().is_empty());
    assert_eq!(s.usage_totals().unwrap()[&7].bytes_up, 10, "data kept");
    s.migrate(MIGRATIONS).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION, "idempotent");
    let one: i64 = s
        .connection()
        .query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(one, 1);
    match s.migrate(&MIGRATIONS[..1]) {
        Err(StoreError::TooNew { have, known }) => assert_eq!((have, known), (SCHEMA_VERSION, 1)),
        other => panic!("an older build must refuse a newer file: {other:?}"),
    }
}

#[test]
fn the_ledger_sums_rows_per_package_epoch_and_org() {
    let mut s = SqliteStore::open(Path::new(":memory:")).unwrap();
    conformance::the_ledger_sums_rows_per_package_epoch_and_org(&mut s);
}

#[test]
fn usage_history_rolls_up_by_hour_and_day() {
    let mut s = SqliteStore::open(Path::new(":memory:")).unwrap();
    conformance::usage_history_rolls_up_by_hour_and_day(&mut s);
}

#[test]
fn a_retried_flush_is_written_once() {
    let mut s = SqliteStore::open(Path::new(":memory:")).unwrap();
    conformance::a_retried_flush_is_written_once(&mut s);
}

#[test]
fn a_version_3_store_gains_the_revoked_agents_table_and_keeps_its_nodes() {
    let mut s = SqliteStore::with_connection(Connection::open_in_memory().unwrap());
    s.migrate(&MIGRATIONS[..3]).unwrap();
    s.put_node("n1", r#"{"id":"n1"}"#, 1).unwrap();
    assert!(
        s.is_revoked("n1").is_err(),
        "version 3 has no revoked_agents"
    );
    s.migrate(&MIGRATIONS[..4]).unwrap();
    assert_eq!(s.schema_version().unwrap(), 4);
    assert!(!s.is_revoked("n1").unwrap());
    assert_eq!(s.nodes().unwrap().len(), 1);
}

#[test]
fn a_version_4_store_gains_a_catalog_version_that_moves_from_then_on() {
    let mut s = SqliteStore::with_connection(Connection::open_in_memory().unwrap());
    s.migrate(&MIGRATIONS[..4]).unwrap();
    s.put_node("n1", r#"{"id":"n1"}"#, 1).unwrap();
    assert!(s.catalog_version().is_err(), "version 4 has no catalog");
    s.migrate(MIGRATIONS).unwrap();
    assert_eq!(s.schema_version().unwrap(), 5);
    assert_eq!(s.catalog_version().unwrap(), Some(0));
    assert_eq!(s.nodes().unwrap().len(), 1, "nodes kept");
    s.put_node("n1", r#"{"id":"n1","country":"us"}"#, 2)
        .unwrap();
    assert_eq!(s.catalog_version().unwrap(), Some(1));
}

#[test]
fn deleted_agents_stay_revoked() {
    let mut s = SqliteStore::open(Path::new(":memory:")).unwrap();
    conformance::deleted_agents_stay_revoked(&mut s);
}

#[test]
fn the_catalog_version_moves_with_every_object_write() {
    let mut s = SqliteStore::open(Path::new(":memory:")).unwrap();
    conformance::the_catalog_version_moves_with_every_object_write(&mut s);
}

#[test]
fn a_new_objects_id_is_taken_once() {
    let mut s = SqliteStore::open(Path::new(":memory:")).unwrap();
    conformance::a_new_objects_id_is_taken_once(&mut s);
}

#[test]
fn a_file_orgs_credits_are_its_first_grant_only() {
    let mut s = SqliteStore::open(Path::new(":memory:")).unwrap();
    conformance::a_file_orgs_credits_are_its_first_grant_only(&mut s);
}

#[test]
fn everything_survives_reopening_the_file() {
    let path = temp_path("reopen");
    conformance::write_for_reopen(&mut SqliteStore::open(&path).unwrap());
    conformance::check_after_reopen(&SqliteStore::open(&path).unwrap());
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
