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
    let mut s = PgStore::connect(&database(&pg, "taken")).unwrap();
    conformance::a_new_objects_id_is_taken_once(&mut s);
    let mut s = PgStore::connect(&database(&pg, "history")).unwrap();
    conformance::usage_history_rolls_up_by_hour_and_day(&mut s);
    let mut s = PgStore::connect(&database(&pg, "retries")).unwrap();
    conformance::a_retried_flush_is_written_once(&mut s);
    let mut s = PgStore::connect(&database(&pg, "catalog")).unwrap();
    conformance::the_catalog_version_moves_with_every_object_write(&mut s);
    let url = database(&pg, "reopen");
    conformance::write_for_reopen(&mut PgStore::connect(&url).unwrap());
    conformance::check_after_reopen(&PgStore::connect(&url).unwrap());
}

/// An operator's own writes, made in `psql` and not through a gateway,
/// move the catalogue version too (statement triggers, `TRUNCATE`
/// included), so a fleet's periodic read back still finds them.
#[test]
fn writes_made_outside_the_gateway_move_the_catalog_version() {
    let pg = Postgres::start();
    let url = database(&pg, "outside");
    let s = PgStore::connect(&url).unwrap();
    let version = || s.catalog_version().unwrap().expect("PostgreSQL keeps one");
    let v0 = version();
    // A statement that touches no row is still a write to the table.
    pg.sql_in("outside", "UPDATE nodes SET id = id WHERE false");
    let v1 = version();
    assert!(v1 > v0, "an UPDATE in psql: {v0} -> {v1}");
    pg.sql_in("outside", "TRUNCATE nodes");
    let v2 = version();
    assert!(v2 > v1, "a TRUNCATE of nodes: {v1} -> {v2}");
    pg.sql_in("outside", "TRUNCATE packages CASCADE");
    let v3 = version();
    assert!(v3 > v2, "a TRUNCATE of packages: {v2} -> {v3}");
    // An operator's session with another search path: the trigger
    // function still finds its table.
    pg.sql_in(
        "outside",
        "SET search_path TO pg_catalog; DELETE FROM public.orgs WHERE false",
    );
    let v4 = version();
    assert!(v4 > v3, "a DELETE under another search path: {v3} -> {v4}");
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

/// A fleet's gateways started together on an empty database all migrate
/// it (one after the other), none fails.
#[test]
fn gateways_starting_together_on_an_empty_database_all_migrate_it() {
    let pg = Postgres::start();
    let url = database(&pg, "together");
    let starts: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || PgStore::connect(&url).map(|_| ()))
        })
        .collect();
    for s in starts {
        s.join().unwrap().expect("a concurrent first start");
    }
    assert_eq!(
        pg.sql_in("together", "SELECT version FROM schema_version"),
        MIGRATIONS.len().to_string()
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

/// `splicegate store migrate` on a store of 10,000 packages, 100,000 nodes
/// and a month of ledger rows (a daily row per package and an hourly row
/// for 100 of them), run twice: every table arrives whole, the second run
/// changes nothing, and both stores answer the same (declarations, usage
/// totals, hourly history).
#[test]
fn store_migrate_moves_a_large_store_and_can_run_again() {
    use std::process::Command;
    use std::time::Instant;

    use splicegate_admin::store::SqliteStore;
    use splicegate_tests::gateway::{binary, temp_dir};

    let dir = temp_dir("migrate");
    let file = dir.join("splicegate.db");
    drop(SqliteStore::open(&file).unwrap()); // the schema
    let t0 = Instant::now();
    {
        let mut c = rusqlite::Connection::open(&file).unwrap();
        let tx = c.transaction().unwrap();
        tx.execute("INSERT INTO orgs VALUES ('acme', 1)", [])
            .unwrap();
        tx.execute(
            "INSERT INTO grants (org, micro, reason, unix_ms) VALUES ('acme', 1000000000, 'api-opening', 1)",
            [],
        )
        .unwrap();
        {
            let mut p = tx
                .prepare("INSERT INTO packages VALUES (?1, ?2, 1)")
                .unwrap();
            for id in 1..=10_000u32 {
                // Tabs, newlines and backslashes in stored text survive
                // COPY's escaping (every other package carries some: a
                // backslash in its key, whitespace after its JSON).
                let odd = id % 2 == 0;
                let mut spec = format!(
                    r#"{{"id":{id},"org":"acme","key":"pk_migrate_{id}{}"}}"#,
                    if odd { r"\\" } else { "" }
                );
                if odd {
                    spec.push_str("\t\n\r ");
                }
                p.execute(rusqlite::params![id, spec]).unwrap();
            }
            let mut n = tx.prepare("INSERT INTO nodes VALUES (?1, ?2, 1)").unwrap();
            for i in 0..100_000u32 {
                let id = format!("n{i}");
                let spec = format!(
                    r#"{{"id":"{id}","kind":"http","addr":"127.0.{}.{}:{}","country":"us"}}"#,
                    i / 250 % 250,
                    i % 250 + 1,
                    1024 + i % 60_000
                );
                n.execute(rusqlite::params![id, spec]).unwrap();
            }
            let mut u = tx
                .prepare("INSERT INTO usage VALUES (?1, 0, ?2, 'acme', ?3, ?4, 1, ?5)")
                .unwrap();
            let month_start = 29_000_000i64; // minutes since the epoch
            for id in 1..=10_000i64 {
                for day in 0..30i64 {
                    u.execute(rusqlite::params![
                        id,
                        month_start + day * 1440,
                        id + day,
                        2 * id,
                        3
                    ])
                    .unwrap();
                }
            }
            for id in 1..=100i64 {
                for hour in 0..720i64 {
                    u.execute(rusqlite::params![
                        id,
                        month_start + hour * 60 + 7,
                        hour,
                        1,
                        1
                    ])
                    .unwrap();
                }
            }
            tx.execute(
                "INSERT INTO usage_resets (package, epoch, unix_ms, bytes_up, bytes_down, requests, charged)
                 VALUES (42, 1, 5, 1, 2, 3, 4)",
                [],
            )
            .unwrap();
            let mut f = tx
                .prepare("INSERT INTO flushes VALUES ('gw1', 7, ?1, 1, 10)")
                .unwrap();
            for seq in 1..=1000 {
                f.execute([seq]).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    eprintln!(
        "FIGURE store migrate: SQLite store written in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let pg = Postgres::start();
    let url = database(&pg, "migrated");
    let run = || {
        let t = Instant::now();
        let out = Command::new(binary())
            .args(["store", "migrate", "--from"])
            .arg(&file)
            .args(["--to", &url])
            .output()
            .expect("run splicegate store migrate");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "migrate failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (text, t.elapsed())
    };
    let (first, took) = run();
    eprintln!(
        "FIGURE store migrate: 10,000 packages, 100,000 nodes, 372,000 ledger rows moved in {:.1} s",
        took.as_secs_f64()
    );
    for (table, n) in [
        ("orgs", 1),
        ("grants", 1),
        ("packages", 10_000),
        ("nodes", 100_000),
        ("usage", 372_000),
        ("usage_resets", 1),
        ("flushes", 1000),
    ] {
        let line = first
            .lines()
            .find(|l| l.split_whitespace().next() == Some(table))
            .unwrap_or_else(|| panic!("no {table} line in:\n{first}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[1..], [n.to_string(), n.to_string()], "{first}");
    }
    let (second, took) = run();
    eprintln!(
        "FIGURE store migrate: the second run (nothing new) in {:.1} s",
        took.as_secs_f64()
    );
    let table = |t: &str| {
        t.lines()
            .filter(|l| !l.starts_with("ok:"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        table(&first),
        table(&second),
        "a second run changes nothing"
    );
    // Both stores answer the same.
    let (a, b) = (
        SqliteStore::open(&file).unwrap(),
        PgStore::connect(&url).unwrap(),
    );
    assert_eq!(a.packages().unwrap(), b.packages().unwrap());
    assert_eq!(a.nodes().unwrap(), b.nodes().unwrap());
    assert_eq!(a.usage_totals().unwrap(), b.usage_totals().unwrap());
    assert_eq!(a.epochs().unwrap(), b.epochs().unwrap());
    assert_eq!(a.granted().unwrap(), b.granted().unwrap());
    assert_eq!(a.spent().unwrap(), b.spent().unwrap());
    for id in [1u64, 50, 100, 9_999] {
        assert_eq!(
            a.usage_history(id, 0, i64::MAX, 60).unwrap(),
            b.usage_history(id, 0, i64::MAX, 60).unwrap(),
            "package {id}"
        );
    }
    drop(a);
    // The API answers the same on a gateway on each store.
    let conf = |store: String| {
        format!(
            "[proxy]\nlisten = \"@PROXY@\"\nworkers = 1\npin_workers = false\n\
             [admin]\nlisten = \"@ADMIN@\"\ntoken = \"test-admin-token\"\n\
             [store]\n{store}\n[health]\ninterval_s = 3600\n"
        )
    };
    let on_sqlite =
        splicegate_tests::Gateway::start(&conf(format!("path = {:?}", file.display().to_string())));
    let on_pg = splicegate_tests::Gateway::start(&conf(format!(
        "url = {url:?}\nsnapshot = {:?}",
        dir.join("snapshot.json").display().to_string()
    )));
    // Listings of 100,000 nodes take more than the usual 5 s to serve.
    let get = |gw: &splicegate_tests::Gateway, path: &str| {
        let mut c =
            splicegate_tests::Conn::open(std::net::Ipv4Addr::LOCALHOST, gw.admin_addr()).unwrap();
        c.set_timeout(std::time::Duration::from_secs(120));
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer test-admin-token\r\nConnection: close\r\n\r\n"
        );
        c.send(req.as_bytes()).unwrap();
        let r = c.read_response("GET").unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()
    };
    let month = 29_000_000u64 * 60; // seconds
    let mut paths = vec![
        "/v1/packages".to_string(),
        "/v1/orgs/acme".to_string(),
        "/v1/nodes/n0".to_string(),
        "/v1/nodes/n99999".to_string(),
    ];
    for id in [1u64, 2, 50, 100, 9_999, 10_000] {
        paths.push(format!("/v1/packages/{id}"));
        for step in ["hour", "day"] {
            paths.push(format!(
                "/v1/packages/{id}/usage?from={month}&to={}&step={step}",
                month + 31 * 86_400
            ));
        }
    }
    for path in &paths {
        assert_eq!(get(&on_sqlite, path), get(&on_pg, path), "{path}");
    }
    let listed = get(&on_pg, "/v1/packages");
    assert_eq!(listed.as_array().map(Vec::len), Some(10_000));
    let nodes = get(&on_pg, "/v1/nodes");
    assert_eq!(nodes.as_array().map(Vec::len), Some(100_000));
    assert_eq!(nodes, get(&on_sqlite, "/v1/nodes"));
    drop((on_sqlite, on_pg));
    // A grant made in PostgreSQL after the migration gets a new seq.
    let mut b = b;
    b.grant("acme", 5, splicegate_admin::store::GrantReason::TopUp, 9)
        .unwrap();
    assert_eq!(b.granted().unwrap()["acme"], 1_000_000_005);
}

/// A gateway on PostgreSQL keeps a local snapshot; restarted while the
/// database is down, it serves from it (the API's package and node
/// included): reads answer, writes get 503 `store_unavailable`, usage
/// waits; when the database is back the usage of the outage is written and
/// nothing is lost. Without a snapshot it refuses to start and says why.
#[test]
fn a_gateway_starts_from_its_snapshot_while_postgresql_is_down() {
    use std::time::Duration;

    use splicegate_tests::eventually;
    use splicegate_tests::ops::*;

    let mut s = Setup::on_postgres("pg-snapshot");
    let toml = [
        s.head("interval_s = 3600"),
        org_and_package("acme", 1_000.0, 7, "pk_file", "price_per_gb = 1.0\n"),
        direct_node("sn-1", "127.0.3.95", "country = \"us\""),
    ]
    .concat();
    let snapshot = s.dir.join("splicegate-snapshot.json");
    let mut gw = s.start(&toml);
    // Objects made through the API: they live only in the database (and
    // its snapshot).
    gw.created(
        "/v1/packages",
        r#"{"id": 8, "org": "acme", "key": "pk_api_made"}"#,
    );
    gw.created(
        "/v1/nodes",
        r#"{"id": "sn-gb", "kind": "direct", "bind": "127.0.3.96", "country": "gb"}"#,
    );
    let target = IpEcho::start(local(0)).unwrap();
    let through = |gw: &splicegate_tests::Gateway, src: &str| {
        curl_connect(
            gw.proxy,
            src.parse().unwrap(),
            target.addr,
            "package-8-country-gb",
            "pk_api_made",
        )
    };
    let (status, body) = through(&gw, "127.0.4.95");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "127.0.3.96");
    let written = eventually(Duration::from_secs(10), Duration::from_millis(100), || {
        let text = std::fs::read_to_string(&snapshot).ok()?;
        (text.contains("\"sn-gb\"") && text.contains("[8,")).then_some(())
    });
    assert!(
        written.is_some(),
        "no snapshot with the API's objects at {}",
        snapshot.display()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&snapshot).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the snapshot holds package keys: owner only");
    let before = gw.get_json("/v1/packages/8")["requests"].as_u64().unwrap();
    gw.term();

    // The database goes down; the gateway starts anyway, from the snapshot.
    s.pg.as_mut().unwrap().stop();
    let gw = s.start(&toml);
    assert!(
        gw.log().contains("serving from the last local snapshot"),
        "{}",
        gw.log_tail(20)
    );
    let p = gw.get_json("/v1/packages/8");
    assert_eq!(p["requests"].as_u64().unwrap(), before, "{p}");
    for i in 0..5 {
        let (status, body) = through(&gw, &format!("127.0.4.{}", 100 + i));
        assert_eq!(status, 200, "through the API's package and node: {body}");
        assert_eq!(body, "127.0.3.96");
    }
    let w = gw.api(
        "POST",
        "/v1/orgs",
        Some(r#"{"id": "while-down", "credits": 1.0}"#),
    );
    assert_eq!(w.status, 503, "{}", w.body);
    assert_eq!(w.json()["error"], "store_unavailable", "{}", w.body);
    let backlog = eventually(Duration::from_secs(5), Duration::from_millis(100), || {
        (sample(&gw.metrics(), "splicegate_store_backlog_rows") > 0.0).then_some(())
    });
    assert!(backlog.is_some(), "the outage's usage waits in memory");

    // The database is back: the backlog is written, writes work again.
    s.pg.as_mut().unwrap().start_again();
    let drained = eventually(Duration::from_secs(30), Duration::from_millis(200), || {
        (sample(&gw.metrics(), "splicegate_store_backlog_rows") == 0.0).then_some(())
    });
    assert!(
        drained.is_some(),
        "the backlog was not written\n{}",
        gw.log_tail(20)
    );
    let w = gw.api(
        "POST",
        "/v1/orgs",
        Some(r#"{"id": "after", "credits": 1.0}"#),
    );
    assert_eq!(w.status, 201, "{}", w.body);
    let mut gw = gw;
    gw.term();
    // A restart on the database reads the outage's requests back.
    let gw = s.start(&toml);
    let p = gw.get_json("/v1/packages/8");
    assert_eq!(
        p["requests"].as_u64().unwrap(),
        before + 5,
        "nothing lost: {p}"
    );
    let mut gw = gw;
    gw.term();

    // No snapshot and no database (a fresh directory): the start fails,
    // saying why.
    s.pg.as_mut().unwrap().stop();
    match splicegate_tests::Gateway::try_start(&toml) {
        Ok(_) => panic!("started without a database or a snapshot"),
        Err(e) => assert!(format!("{e:#}").contains("store"), "{e:#}"),
    }
}
