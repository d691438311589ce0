//! The store contract, as test bodies over `&mut dyn Store`: the SQLite
//! unit tests and the PostgreSQL end-to-end tests (tests/tests/store.rs) run
//! the same ones. Each panics on a failed check.

use splicegate_control::limits::UsageTotals;

use std::sync::atomic::{AtomicI64, Ordering};

use super::{FlushKey, GrantReason, Store, UsageRow};
use crate::error::StoreError;

static SEQ: AtomicI64 = AtomicI64::new(1);

/// A new flush key of a test gateway.
fn key() -> FlushKey {
    FlushKey {
        gateway: "test".into(),
        boot: 1,
        seq: SEQ.fetch_add(1, Ordering::Relaxed),
    }
}

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

/// Rows per package, epoch, minute and org; totals; spending; resets.
pub fn the_ledger_sums_rows_per_package_epoch_and_org(s: &mut dyn Store) {
    s.append_usage(
        &key(),
        &[row(7, 0, 100, "acme", 10, 1), row(8, 0, 100, "", 5, 0)],
    )
    .unwrap();
    s.append_usage(&key(), &[row(7, 0, 100, "acme", 20, 2)])
        .unwrap();
    s.append_usage(&key(), &[row(7, 0, 101, "acme", 30, 3)])
        .unwrap();
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
    s.append_usage(&key(), &[row(7, 1, 101, "acme", 4, 1)])
        .unwrap();
    assert_eq!(s.usage_totals().unwrap()[&7].bytes_up, 4);
    assert_eq!(s.spent().unwrap()["acme"], 7);
    assert_eq!(s.usage_rows(7).unwrap().len(), 3);
    assert_eq!(s.epochs().unwrap()[&7], 1);
    assert_eq!(s.reset_usage(7, UsageTotals::default(), 2).unwrap(), 2);
}

/// A file org's `credits` is its first grant only; API orgs; grants.
pub fn a_file_orgs_credits_are_its_first_grant_only(s: &mut dyn Store) {
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
    assert!(
        matches!(s.create_org("api", 7, 6), Err(StoreError::Exists(_))),
        "an id is created once"
    );
    assert_eq!(
        s.granted().unwrap()["api"],
        7,
        "the failed create granted nothing"
    );
}

/// Creating a package or node whose id is taken (another gateway of a
/// fleet made it a moment ago) is refused and leaves the first one as it
/// was; replacing one is not creating it.
pub fn a_new_objects_id_is_taken_once(s: &mut dyn Store) {
    s.insert_package(7, r#"{"id":7,"key":"first"}"#, 1).unwrap();
    assert!(matches!(
        s.insert_package(7, r#"{"id":7,"key":"second"}"#, 2),
        Err(StoreError::Exists(_))
    ));
    assert_eq!(
        s.packages().unwrap(),
        [(7, r#"{"id":7,"key":"first"}"#.to_string())]
    );
    s.put_package(7, r#"{"id":7,"key":"third"}"#, 3).unwrap();
    assert_eq!(s.packages().unwrap()[0].1, r#"{"id":7,"key":"third"}"#);
    s.insert_node("n1", r#"{"id":"n1","bind":"a"}"#, 1).unwrap();
    assert!(matches!(
        s.insert_node("n1", r#"{"id":"n1","bind":"b"}"#, 2),
        Err(StoreError::Exists(_))
    ));
    assert_eq!(
        s.nodes().unwrap(),
        [("n1".to_string(), r#"{"id":"n1","bind":"a"}"#.to_string())]
    );
}

/// What one store writes, a store opened again on the same data reads:
/// call [`write_for_reopen`], reopen, then [`check_after_reopen`].
pub fn write_for_reopen(s: &mut dyn Store) {
    s.create_org("acme", 1_000, 1).unwrap();
    s.put_package(7, r#"{"id":7,"key":"k"}"#, 1).unwrap();
    s.put_package(7, r#"{"id":7,"key":"k2"}"#, 2).unwrap();
    s.put_node("n1", r#"{"id":"n1"}"#, 1).unwrap();
    s.put_node("n2", r#"{"id":"n2"}"#, 1).unwrap();
    assert!(s.delete_node("n2").unwrap());
    assert!(!s.delete_node("n2").unwrap());
    s.put_node("dev-1", r#"{"id":"dev-1","kind":"agent"}"#, 1)
        .unwrap();
    assert!(s.delete_agent("dev-1", 2).unwrap());
    s.append_usage(&key(), &[row(7, 0, 5, "acme", 100, 10)])
        .unwrap();
}

/// See [`write_for_reopen`].
pub fn check_after_reopen(s: &dyn Store) {
    assert_eq!(s.schema_version().unwrap(), super::SCHEMA_VERSION);
    assert_eq!(
        s.packages().unwrap(),
        [(7, r#"{"id":7,"key":"k2"}"#.to_string())]
    );
    assert_eq!(s.nodes().unwrap().len(), 1);
    assert!(s.is_revoked("dev-1").unwrap(), "a revocation survives");
    assert_eq!(s.revoked_agents().unwrap(), ["dev-1"]);
    assert_eq!(s.usage_totals().unwrap()[&7].bytes_up, 100);
    assert_eq!(
        s.granted().unwrap()["acme"] - s.spent().unwrap()["acme"],
        990
    );
}

/// A flush written twice with one key (a retry of a committed flush that
/// was not confirmed) is counted once; another key counts again.
pub fn a_retried_flush_is_written_once(s: &mut dyn Store) {
    let k = key();
    let rows = [row(9, 0, 200, "acme", 1000, 5)];
    s.append_usage(&k, &rows).unwrap();
    s.append_usage(&k, &rows).unwrap();
    assert_eq!(
        s.usage_totals().unwrap()[&9].bytes_up,
        1000,
        "a retry counts once"
    );
    s.append_usage(&key(), &rows).unwrap();
    assert_eq!(
        s.usage_totals().unwrap()[&9].bytes_up,
        2000,
        "a new flush counts"
    );
    let other_boot = FlushKey { boot: 2, ..k };
    s.append_usage(&other_boot, &rows).unwrap();
    assert_eq!(
        s.usage_totals().unwrap()[&9].bytes_up,
        3000,
        "the same seq of another boot counts"
    );
}

/// Hourly and daily roll-ups of the minute rows, over every epoch.
pub fn usage_history_rolls_up_by_hour_and_day(s: &mut dyn Store) {
    // Minutes 1440*10 + {0, 59, 60, 61}: hours 240 and 241 of day 10.
    let day = 1440 * 10;
    s.append_usage(
        &key(),
        &[
            row(5, 0, day, "acme", 1, 1),
            row(5, 0, day + 59, "acme", 2, 1),
            row(5, 0, day + 60, "acme", 4, 1),
            row(6, 0, day + 60, "acme", 1000, 1),
        ],
    )
    .unwrap();
    s.reset_usage(5, UsageTotals::default(), 1).unwrap();
    s.append_usage(&key(), &[row(5, 1, day + 61, "acme", 8, 1)])
        .unwrap();
    let hours = s.usage_history(5, day, day + 1440, 60).unwrap();
    let ups: Vec<(i64, u64)> = hours.iter().map(|(b, t)| (*b, t.bytes_up)).collect();
    assert_eq!(
        ups,
        [(day, 3), (day + 60, 12)],
        "every epoch counts in history"
    );
    assert_eq!(hours[1].1.bytes_down, 24);
    let days = s.usage_history(5, 0, day + 1440, 1440).unwrap();
    assert_eq!(days.len(), 1);
    assert_eq!(
        (days[0].0, days[0].1.bytes_up, days[0].1.requests),
        (day, 15, 4)
    );
    // The range is half-open and other packages stay out.
    assert!(
        s.usage_history(5, day + 62, day + 1440, 60)
            .unwrap()
            .is_empty()
    );
}

/// Deleting an agent node revokes its id in the same transaction; a
/// revoked id stays revoked (a second revocation changes nothing), and an
/// id revoked without a node row (a file node's) is revoked all the same.
pub fn deleted_agents_stay_revoked(s: &mut dyn Store) {
    assert!(s.revoked_agents().unwrap().is_empty());
    assert!(!s.is_revoked("dev-1").unwrap());
    s.put_node("dev-1", r#"{"id":"dev-1","kind":"agent"}"#, 1)
        .unwrap();
    s.put_node("n1", r#"{"id":"n1"}"#, 1).unwrap();
    assert!(s.delete_agent("dev-1", 10).unwrap());
    assert!(s.is_revoked("dev-1").unwrap());
    assert!(!s.is_revoked("n1").unwrap());
    assert!(!s.is_revoked("dev-").unwrap(), "exact ids only");
    assert_eq!(s.nodes().unwrap().len(), 1, "the node row went");
    // Created again (the operator may) and deleted again: still revoked once.
    s.put_node("dev-1", r#"{"id":"dev-1","kind":"agent"}"#, 11)
        .unwrap();
    assert!(s.delete_agent("dev-1", 12).unwrap());
    assert!(!s.delete_agent("dev-2", 13).unwrap(), "no such node");
    assert_eq!(s.revoked_agents().unwrap(), ["dev-1", "dev-2"]);
    // A plain delete revokes nothing.
    assert!(s.delete_node("n1").unwrap());
    assert!(!s.is_revoked("n1").unwrap());
}

/// The catalogue's version moves with every write of an organisation, a
/// package or a node, and with nothing else (grants, usage).
pub fn the_catalog_version_moves_with_every_object_write(s: &mut dyn Store) {
    let mut last = s.catalog_version().unwrap().expect("a version");
    let mut moved = |s: &mut dyn Store, what: &str| {
        let now = s.catalog_version().unwrap().expect("a version");
        assert!(now > last, "{what}: the version stayed at {now}");
        last = now;
    };
    s.create_org("acme", 0, 1).unwrap();
    moved(s, "an organisation created");
    s.insert_package(1, r#"{"id":1}"#, 1).unwrap();
    moved(s, "a package created");
    s.put_package(1, r#"{"id":1,"key":"k"}"#, 2).unwrap();
    moved(s, "a package changed");
    s.insert_node("n1", r#"{"id":"n1"}"#, 1).unwrap();
    moved(s, "a node created");
    s.put_node("n1", r#"{"id":"n1","country":"us"}"#, 2)
        .unwrap();
    moved(s, "a node changed");
    assert!(s.delete_node("n1").unwrap());
    moved(s, "a node deleted");
    // Money and usage are not the catalogue.
    let before = s.catalog_version().unwrap();
    s.grant("acme", 5, GrantReason::TopUp, 3).unwrap();
    s.append_usage(&key(), &[row(1, 0, 1, "acme", 10, 1)])
        .unwrap();
    assert_eq!(s.catalog_version().unwrap(), before, "grants and usage");
}
