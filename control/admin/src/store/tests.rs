use super::*;

fn row(package: u64, epoch: i64, minute: i64, org: &str, up: u64, ch: u64) -> UsageRow {
    UsageRow {
        package,
        epoch,
        minute,
        org: org.into(),
        bytes_up: up,
        bytes_down: 2 * up,
        requests: 1,
        charged: ch,
    }
}

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
    let mut s = Store {
        conn: Connection::open_in_memory().unwrap(),
    };
    assert_eq!(s.schema_version().unwrap(), 0);
    s.migrate(&MIGRATIONS[..1]).unwrap();
    assert_eq!(s.schema_version().unwrap(), 1);
    assert!(s.epochs().is_err(), "version 1 has no usage_resets table");
    s.append_usage(&[row(7, 0, 1, "acme", 10, 1)]).unwrap();
    s.migrate(MIGRATIONS).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    assert!(s.epochs().unwrap().is_empty());
    assert_eq!(s.usage_totals().unwrap()[&7].bytes_up, 10, "data kept");
    s.migrate(MIGRATIONS).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION, "idempotent");
    let one: i64 = s
        .conn
        .query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(one, 1);
    match s.migrate(&MIGRATIONS[..1]) {
        Err(StoreError::TooNew { have, known }) => assert_eq!((have, known), (2, 1)),
        other => panic!("an older build must refuse a newer file: {other:?}"),
    }
}

#[test]
fn the_ledger_sums_rows_per_package_epoch_and_org() {
    let mut s = Store::open(Path::new(":memory:")).unwrap();
    s.append_usage(&[row(7, 0, 100, "acme", 10, 1), row(8, 0, 100, "", 5, 0)])
        .unwrap();
    s.append_usage(&[row(7, 0, 100, "acme", 20, 2)]).unwrap();
    s.append_usage(&[row(7, 0, 101, "acme", 30, 3)]).unwrap();
    assert_eq!(
        s.usage_rows(7).unwrap().len(),
        2,
        "one row per package, minute, epoch and org"
    );
    let t = s.usage_totals().unwrap();
    assert_eq!(
        t[&7],
        UsageTotals {
            bytes_up: 60,
            bytes_down: 120,
            requests: 3,
            charged: 6
        }
    );
    assert_eq!(t[&8].bytes_up, 5);
    assert_eq!(s.spent().unwrap()["acme"], 6);
    assert!(!s.spent().unwrap().contains_key(""), "no org, no spending");

    // A reset starts epoch 1: the package's totals start over, the org's
    // spending keeps every epoch, and the old rows stay.
    assert_eq!(s.reset_usage(7, t[&7], 1).unwrap(), 1);
    assert!(!s.usage_totals().unwrap().contains_key(&7));
    s.append_usage(&[row(7, 1, 101, "acme", 4, 1)]).unwrap();
    assert_eq!(s.usage_totals().unwrap()[&7].bytes_up, 4);
    assert_eq!(s.spent().unwrap()["acme"], 7);
    assert_eq!(s.usage_rows(7).unwrap().len(), 3);
    assert_eq!(s.epochs().unwrap()[&7], 1);
    assert_eq!(s.reset_usage(7, UsageTotals::default(), 2).unwrap(), 2);
}

#[test]
fn a_file_orgs_credits_are_its_first_grant_only() {
    let mut s = Store::open(Path::new(":memory:")).unwrap();
    let first = s
        .first_grants(&[("acme".into(), 100), ("zero".into(), 0)], 1)
        .unwrap();
    assert_eq!(first, ["acme", "zero"]);
    let again = s
        .first_grants(&[("acme".into(), 500), ("zero".into(), 50)], 2)
        .unwrap();
    assert!(again.is_empty(), "a later file edit grants nothing");
    s.grant("acme", 25, GrantReason::TopUp, 3).unwrap();
    s.grant("acme", -5, GrantReason::TopUp, 4).unwrap();
    let g = s.granted().unwrap();
    assert_eq!(g["acme"], 120);
    assert_eq!(g["zero"], 0);
    assert!(s.has_grants("zero").unwrap());
    s.create_org("api", 7, 5).unwrap();
    assert_eq!(s.api_orgs().unwrap(), ["api"]);
    assert_eq!(s.granted().unwrap()["api"], 7);
    assert!(s.create_org("api", 7, 6).is_err(), "an id is created once");
    assert_eq!(
        s.granted().unwrap()["api"],
        7,
        "the failed create granted nothing"
    );
}

#[test]
fn everything_survives_reopening_the_file() {
    let path = temp_path("reopen");
    {
        let mut s = Store::open(&path).unwrap();
        s.create_org("acme", 1_000, 1).unwrap();
        s.put_package(7, r#"{"id":7,"key":"k"}"#, 1).unwrap();
        s.put_package(7, r#"{"id":7,"key":"k2"}"#, 2).unwrap();
        s.put_node("n1", r#"{"id":"n1"}"#, 1).unwrap();
        s.put_node("n2", r#"{"id":"n2"}"#, 1).unwrap();
        assert!(s.delete_node("n2").unwrap());
        assert!(!s.delete_node("n2").unwrap());
        s.append_usage(&[row(7, 0, 5, "acme", 100, 10)]).unwrap();
    }
    let s = Store::open(&path).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(
        s.packages().unwrap(),
        [(7, r#"{"id":7,"key":"k2"}"#.to_string())]
    );
    assert_eq!(s.nodes().unwrap().len(), 1);
    assert_eq!(s.usage_totals().unwrap()[&7].bytes_up, 100);
    assert_eq!(
        s.granted().unwrap()["acme"] - s.spent().unwrap()["acme"],
        990
    );
    drop(s);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
