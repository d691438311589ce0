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
    let mut s = PgStore::connect(&database(&pg, "history")).unwrap();
    conformance::usage_history_rolls_up_by_hour_and_day(&mut s);
    let mut s = PgStore::connect(&database(&pg, "retries")).unwrap();
    conformance::a_retried_flush_is_written_once(&mut s);
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

/// PostgreSQL stopped under traffic, then started again (SPEC section 11):
/// the gateway keeps serving; usage waits in memory (`/metrics` shows the
/// backlog) and is written when the database returns; API writes answer
/// `503 store_unavailable` meanwhile and reads keep working; after a
/// clean stop the ledger holds exactly the bytes the tunnel moved. The
/// outage lasts 10 s here, 60 s with `SG_FAULTS_FULL=1`.
#[test]
fn a_postgres_outage_loses_nothing() {
    use std::io::Read;
    use std::time::{Duration, Instant};

    use splicegate_tests::ops::*;
    use splicegate_tests::{Source, eventually};

    const TOTAL: u64 = 6_000_000;
    let outage = if std::env::var_os("SG_FAULTS_FULL").is_some_and(|v| v == "1") {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(10)
    };
    let mut s = Setup::on_postgres("pg-outage");
    let toml = [
        s.head("interval_s = 3600"),
        org_and_package("acme", 1_000.0, 7, "pk_outage", "price_per_gb = 1.0\n"),
        direct_node("o-1", "127.0.3.91", "country = \"us\""),
    ]
    .concat();
    let mut gw = s.start(&toml);
    // A download paced over the outage: 64 KiB every 100 ms.
    let source = Source::start(64 * 1024, Duration::from_millis(100), Some(TOTAL));
    let mut t = connect(
        gw.proxy,
        "127.0.4.91".parse().unwrap(),
        source.addr(),
        "package-7-country-us",
        "pk_outage",
    );
    assert_eq!(t.status, 200, "{}", t.head);
    let reader = std::thread::spawn(move || {
        let mut got = t.extra.len() as u64;
        let mut buf = vec![0u8; 65536];
        let _ = t.stream.set_read_timeout(Some(Duration::from_secs(120)));
        while let Ok(n) = t.stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        got
    });
    std::thread::sleep(Duration::from_secs(2));
    let pg = s.pg.as_mut().unwrap();
    pg.stop();
    let down = Instant::now();
    // During the outage: writes refused with 503, reads answered, the
    // backlog visible, health green.
    std::thread::sleep(Duration::from_millis(1500));
    let w = gw.api(
        "POST",
        "/v1/orgs",
        Some(r#"{"id": "during-outage", "credits": 1.0}"#),
    );
    assert_eq!(w.status, 503, "{}", w.body);
    assert_eq!(w.json()["error"], "store_unavailable", "{}", w.body);
    let r = gw.api("GET", "/v1/packages/7", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let backlog = eventually(Duration::from_secs(5), Duration::from_millis(200), || {
        let v = sample(&gw.metrics(), "splicegate_store_backlog_rows");
        (v > 0.0).then_some(v)
    });
    assert!(backlog.is_some(), "the backlog is not in /metrics");
    assert_eq!(gw.api("GET", "/healthz", None).status, 200);
    std::thread::sleep(outage.saturating_sub(down.elapsed()));
    s.pg.as_mut().unwrap().start_again();
    // Written once the database is back.
    let drained = eventually(Duration::from_secs(15), Duration::from_millis(200), || {
        (sample(&gw.metrics(), "splicegate_store_backlog_rows") == 0.0).then_some(())
    });
    assert!(drained.is_some(), "the backlog was not written");
    let w = gw.api(
        "POST",
        "/v1/orgs",
        Some(r#"{"id": "after-outage", "credits": 1.0}"#),
    );
    assert_eq!(w.status, 201, "{}", w.body);
    let got = reader.join().unwrap();
    assert_eq!(got, TOTAL, "the download completed through the outage");
    // A clean stop flushes the rest; a restart reads the ledger back.
    gw.term();
    let gw = s.start(&toml);
    let p = gw.get_json("/v1/packages/7");
    assert_eq!(
        p["bytes_down"].as_u64().unwrap(),
        TOTAL,
        "the ledger after the outage: {p}"
    );
}
