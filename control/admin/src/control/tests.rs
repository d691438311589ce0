use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use splicegate_control::limits::MICRO;
use splicegate_control::nodes::NodeState;
use splicegate_control::policy::{Credentials, Hello};

use super::*;

fn clock() -> Now {
    Now::from_secs(1000)
}

fn temp_path(tag: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::env::temp_dir().join(format!(
        "splicegate-control-{tag}-{}-{nanos}.db",
        std::process::id()
    ))
}

fn cleanup(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// A file with org `acme` (`credits`) and package 7 at 1 credit per GB.
fn file(credits: i64) -> Declarations {
    let mut p = PackageDecl::new(7, "pk_file");
    p.org = Some("acme".into());
    p.price_per_gb = MICRO as u64;
    p.from_file = true;
    Declarations {
        orgs: vec![OrgDecl {
            id: "acme".into(),
            credits,
            from_file: true,
        }],
        packages: vec![p],
        ..Declarations::default()
    }
}

fn open(path: &std::path::Path, decls: Declarations) -> Control {
    Control::open(
        ControlOptions {
            gateway_id: "local".into(),
            store: crate::StoreLocation::Sqlite(path.to_path_buf()),
            session_capacity: 100,
            clock,
        },
        decls,
    )
    .unwrap()
}

fn totals(c: &Control, id: u64) -> UsageTotals {
    c.engine().policy().packages[&id].usage.totals()
}

fn balance(c: &Control, org: &str) -> i64 {
    c.engine().policy().orgs[org].account.balance()
}

fn authenticates(c: &Control, package: u64, key: &str) -> bool {
    let username = format!("package-{package}-country-any");
    c.engine()
        .policy()
        .authenticate(&Hello {
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            credentials: Credentials::Present {
                username: &username,
                password: key,
            },
            listener_package: None,
        })
        .is_ok()
}

#[test]
fn usage_and_balances_come_back_from_the_ledger() {
    let path = temp_path("restore");
    {
        let c = open(&path, file(10 * MICRO));
        assert_eq!(balance(&c, "acme"), 10 * MICRO);
        let p = c.engine().policy().packages[&7].clone();
        p.charge(1_000_000, 2_000_000); // 3 MB at 1 credit/GB: 3000 micro
        p.usage.count_request();
        assert_eq!(c.flush().unwrap().rows, 1);
        assert_eq!(c.flush().unwrap().rows, 0, "nothing new, nothing written");
        p.charge(500, 500);
        assert_eq!(c.flush().unwrap().rows, 1);
        // Not flushed: lost by the "crash" below, never counted twice.
        p.charge(7, 7);
    }
    // The file now says 999 credits: a file's credits are a first grant only.
    let c = open(&path, file(999 * MICRO));
    assert_eq!(
        totals(&c, 7),
        UsageTotals {
            bytes_up: 1_000_500,
            bytes_down: 2_000_500,
            requests: 1,
            charged: 3001,
        }
    );
    assert_eq!(balance(&c, "acme"), 10 * MICRO - 3001);
    assert_eq!(
        c.flush().unwrap().rows,
        0,
        "restored readings are not deltas"
    );
    let rows = c.with_store(|s| s.usage_rows(7).unwrap());
    let sum: u64 = rows.iter().map(|r| r.bytes_up).sum();
    assert_eq!(sum, 1_000_500);
    drop(c);
    cleanup(&path);
}

#[test]
fn api_objects_persist_and_file_objects_refuse_changes() {
    let path = temp_path("api");
    let key;
    {
        let c = open(&path, file(0));
        c.create_org("beta", 5 * MICRO).unwrap();
        assert!(matches!(
            c.create_org("beta", 1),
            Err(ControlError::Conflict(_))
        ));
        assert!(matches!(
            c.create_org("acme", 1),
            Err(ControlError::Conflict(_))
        ));
        assert!(matches!(
            c.create_org("bad id", 1),
            Err(ControlError::Invalid(_))
        ));
        let (id, k) = c
            .create_package(PackageFields {
                org: Some(Some("beta".into())),
                ..PackageFields::default()
            })
            .unwrap();
        assert_eq!(id, 8, "the next free id");
        assert!(k.starts_with("pk_") && k.len() == 27, "{k}");
        assert!(authenticates(&c, 8, &k));
        key = c.set_key(8, None).unwrap();
        assert!(!authenticates(&c, 8, &k), "the old key fails at once");
        assert!(authenticates(&c, 8, &key));
        assert!(matches!(
            c.patch_package(7, &PackageFields::default()),
            Err(ControlError::Conflict(m)) if m.contains(FROM_FILE)
        ));
        assert!(matches!(
            c.patch_package(9, &PackageFields::default()),
            Err(ControlError::NotFound(_))
        ));
        let bad = PackageFields {
            org: Some(Some("nobody".into())),
            ..PackageFields::default()
        };
        assert!(matches!(
            c.patch_package(8, &bad),
            Err(ControlError::Invalid(_))
        ));
        assert_eq!(
            c.engine().policy().packages[&8].decl.org.as_deref(),
            Some("beta"),
            "a refused change changes nothing"
        );
        c.add_credits("beta", 2 * MICRO).unwrap();
        c.add_credits("acme", MICRO).unwrap();
        let node: NodeFields = serde_json::from_str(
            r#"{"id": "n1", "kind": "direct", "bind": "127.0.1.9", "country": "us"}"#,
        )
        .unwrap();
        c.create_node(&node).unwrap();
        let offline: NodeFields = serde_json::from_str(r#"{"state": "offline"}"#).unwrap();
        c.patch_node("n1", &offline).unwrap();
        assert_eq!(c.engine().policy().nodes.online_count(), 0);
    }
    let c = open(&path, file(0));
    assert!(authenticates(&c, 8, &key));
    assert_eq!(balance(&c, "beta"), 7 * MICRO);
    assert_eq!(balance(&c, "acme"), MICRO);
    let policy = c.engine().policy();
    let (_, n) = policy.nodes.get("n1").unwrap();
    assert_eq!(n.state(), NodeState::Offline, "the state persisted");
    drop(policy);
    c.delete_node("n1").unwrap();
    assert!(c.engine().policy().nodes.get("n1").is_none());
    drop(c);
    let c = open(&path, file(0));
    assert!(c.engine().policy().nodes.get("n1").is_none());
    drop(c);
    cleanup(&path);
}

#[test]
fn a_bad_reload_keeps_the_running_policy_and_new_file_orgs_get_their_grant() {
    let c = open(std::path::Path::new(":memory:"), file(3 * MICRO));
    let mut broken = file(3 * MICRO);
    broken.packages[0].org = Some("gone".into());
    assert!(c.reload_file(broken).is_err());
    assert!(authenticates(&c, 7, "pk_file"));
    let mut more = file(50 * MICRO);
    more.orgs.push(OrgDecl {
        id: "gamma".into(),
        credits: 4 * MICRO,
        from_file: true,
    });
    more.packages[0].key = "pk_new".into();
    c.reload_file(more).unwrap();
    assert!(authenticates(&c, 7, "pk_new"));
    assert!(!authenticates(&c, 7, "pk_file"));
    assert_eq!(balance(&c, "acme"), 3 * MICRO, "the first grant stays");
    assert_eq!(
        balance(&c, "gamma"),
        4 * MICRO,
        "a new file org gets its grant"
    );
}

#[test]
fn a_usage_reset_starts_over_and_keeps_the_spending() {
    let path = temp_path("reset");
    {
        let c = open(&path, file(10 * MICRO));
        let p = c.engine().policy().packages[&7].clone();
        p.charge(1_000_000, 0);
        c.flush().unwrap();
        p.charge(1_000_000, 0); // flushed by the reset itself
        let left = c.reset_usage(7).unwrap();
        assert_eq!(left.bytes_up, 2_000_000);
        assert_eq!(totals(&c, 7), UsageTotals::default());
        assert_eq!(balance(&c, "acme"), 10 * MICRO - 2000);
        p.charge(3000, 0);
        c.flush().unwrap();
        assert_eq!(balance(&c, "acme"), 10 * MICRO - 2003);
    }
    let c = open(&path, file(10 * MICRO));
    assert_eq!(totals(&c, 7).bytes_up, 3000);
    assert_eq!(balance(&c, "acme"), 10 * MICRO - 2003);
    assert_eq!(c.with_store(|s| s.usage_rows(7).unwrap()).len(), 2);
    drop(c);
    cleanup(&path);
}
