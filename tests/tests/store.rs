//! The store contract on PostgreSQL: the same test bodies as the SQLite
//! unit tests (`splicegate_admin::store::conformance`), run on a real
//! PostgreSQL 15 server started for each test, and the schema's versioning
//! (a database newer than the build is refused, saying what it needs).
//! Run by `scripts/test` with `SPLICEGATE_TEST_STORE=postgres`; without it
//! these tests start their own server all the same.

use splicegate_admin::store::{MIGRATIONS, PgStore, Store, conformance};
use splicegate_tests::pg::Postgres;

/// A fresh database `name` on `pg` and its connection string.
fn database(pg: &Postgres, name: &str) -> String {
    pg.sql(&format!("CREATE DATABASE {name}"));
    format!(
        "host={} user=postgres dbname={name}",
        pg.socket_dir().display()
    )
}

#[test]
fn postgres_keeps_the_store_contract() {
    let pg = Postgres::start();
    let mut s = PgStore::connect(&database(&pg, "ledger")).unwrap();
    conformance::the_ledger_sums_rows_per_package_epoch_and_org(&mut s);
    let mut s = PgStore::connect(&database(&pg, "grants")).unwrap();
    conformance::a_file_orgs_credits_are_its_first_grant_only(&mut s);
    let url = database(&pg, "reopen");
    conformance::write_for_reopen(&mut PgStore::connect(&url).unwrap());
    conformance::check_after_reopen(&PgStore::connect(&url).unwrap());
}

#[test]
fn postgres_schema_is_versioned_and_a_newer_one_is_refused() {
    let pg = Postgres::start();
    let url = database(&pg, "versions");
    let s = PgStore::connect(&url).unwrap();
    assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
    // Applying again changes nothing.
    s.migrate(MIGRATIONS).unwrap();
    drop(s);
    assert_eq!(
        pg.sql_in("versions", "SELECT COUNT(*) FROM schema_version"),
        "1"
    );
    // Written by a newer build.
    pg.sql_in("versions", "UPDATE schema_version SET version = 99");
    let e = PgStore::connect(&url).expect_err("a newer schema");
    let text = e.to_string();
    assert!(
        text.contains("schema version 99") && text.contains("a splicegate that knows version 99"),
        "{text}"
    );
}

#[test]
fn postgres_reconnects_after_a_restart_of_the_server() {
    let mut pg = Postgres::start();
    let url = database(&pg, "restart");
    let mut s = PgStore::connect(&url).unwrap();
    s.put_package(7, r#"{"id":7}"#, 1).unwrap();
    pg.stop();
    assert!(s.packages().is_err(), "the server is down");
    pg.start_again();
    // The next call opens a new connection.
    assert_eq!(s.packages().unwrap().len(), 1);
    s.put_package(8, r#"{"id":8}"#, 2).unwrap();
    assert_eq!(s.packages().unwrap().len(), 2);
}
