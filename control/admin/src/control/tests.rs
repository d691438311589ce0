use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use splicegate_control::limits::MICRO;
use splicegate_control::nodes::{NodeKind, NodeState};
use splicegate_control::policy::{Credentials, Hello};
use splicegate_control::rules::Network;

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
            snapshot: None,
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

fn agent_file() -> Declarations {
    let mut d = file(0);
    let f: NodeFields =
        serde_json::from_str(r#"{"id": "file-dev", "kind": "agent", "key": "ak_file_key"}"#)
            .unwrap();
    let mut n = f.to_decl().unwrap();
    n.from_file = true;
    d.nodes.push(n);
    d
}

fn stored_spec(c: &Control, id: &str) -> String {
    c.with_store(|s| s.nodes().unwrap())
        .into_iter()
        .find(|(i, _)| i == id)
        .map(|(_, spec)| spec)
        .unwrap_or_else(|| panic!("no stored node {id}"))
}

fn key_matches(c: &Control, id: &str, key: &str) -> bool {
    c.engine()
        .policy()
        .nodes
        .get(id)
        .is_some_and(|(_, n)| n.agent_key_matches(key))
}

#[test]
fn control_is_shared_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<Control>();
    shared::<Arc<Control>>();
    shared::<EnrolError>();
}

#[test]
fn agent_nodes_get_a_key_once_and_the_store_keeps_its_hash_only() {
    let path = temp_path("agent-keys");
    let key = {
        let c = open(&path, agent_file());
        let f: NodeFields =
            serde_json::from_str(r#"{"id": "dev-1", "kind": "agent", "country": "us"}"#).unwrap();
        let (id, key) = c.create_node(&f).unwrap();
        assert_eq!(id, "dev-1");
        let key = key.expect("a generated key");
        assert!(key.starts_with("ak_") && key.len() == 46, "{key}");
        assert!(
            key[3..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert!(key_matches(&c, "dev-1", &key));
        let spec = stored_spec(&c, "dev-1");
        assert!(!spec.contains(&key), "{spec}");
        assert!(spec.contains("key_hash"), "{spec}");

        // A given key is not returned; another create of the id is 409.
        let given: NodeFields = serde_json::from_str(
            r#"{"id": "dev-2", "kind": "agent", "key": "ak_given_by_operator"}"#,
        )
        .unwrap();
        assert_eq!(c.create_node(&given).unwrap(), ("dev-2".into(), None));
        assert!(!stored_spec(&c, "dev-2").contains("ak_given_by_operator"));
        assert!(matches!(
            c.create_node(&given),
            Err(ControlError::Conflict(_))
        ));
        let direct: NodeFields =
            serde_json::from_str(r#"{"id": "d1", "kind": "direct", "bind": "127.0.0.1"}"#).unwrap();
        assert_eq!(c.create_node(&direct).unwrap(), ("d1".into(), None));

        // A new key: the old one stops at once.
        let k2 = c.new_agent_key("dev-1", None).unwrap();
        assert_ne!(k2, key);
        assert!(key_matches(&c, "dev-1", &k2));
        assert!(!key_matches(&c, "dev-1", &key));
        assert_eq!(
            c.new_agent_key("dev-2", Some("ak_chosen".into())).unwrap(),
            "ak_chosen"
        );
        assert!(key_matches(&c, "dev-2", "ak_chosen"));
        assert!(matches!(
            c.new_agent_key("nobody", None),
            Err(ControlError::NotFound(_))
        ));
        match c.new_agent_key("d1", None) {
            Err(ControlError::Conflict(m)) => assert!(m.contains("only an agent"), "{m}"),
            other => panic!("{other:?}"),
        }
        match c.new_agent_key("file-dev", None) {
            Err(ControlError::Conflict(m)) => assert!(m.contains(FROM_FILE), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            c.new_agent_key("dev-1", Some("a:b".into())),
            Err(ControlError::Invalid(_))
        ));
        assert!(
            key_matches(&c, "dev-1", &k2),
            "a refused key changes nothing"
        );
        assert!(key_matches(&c, "file-dev", "ak_file_key"));
        k2
    };
    let c = open(&path, agent_file());
    assert!(key_matches(&c, "dev-1", &key), "the hash persisted");
    assert!(key_matches(&c, "dev-2", "ak_chosen"));
    let (_, n) = c
        .engine()
        .policy()
        .nodes
        .get("dev-1")
        .map(|(i, n)| (i, n.clone()))
        .unwrap();
    assert_eq!(n.state(), NodeState::Offline, "absent after a restart");
    drop(c);
    cleanup(&path);
}

#[test]
fn devices_enrol_once_and_a_deleted_agents_id_never_again() {
    let path = temp_path("enrol");
    {
        let c = Arc::new(open(&path, agent_file()));
        let attrs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        // From another thread, as the gateway's agent listener calls it.
        let c2 = c.clone();
        let key = std::thread::spawn(move || {
            c2.enrol_agent(
                "dev-8f3a",
                &attrs(&[
                    ("country", "US"),
                    ("city", "New York"),
                    ("isp", "Comcast Cable"),
                    ("asn", "AS7922"),
                    ("network", "mob"),
                    ("region", ""),
                ]),
            )
        })
        .join()
        .unwrap()
        .unwrap();
        assert!(key.starts_with("ak_"));
        assert!(key_matches(&c, "dev-8f3a", &key));
        assert!(!stored_spec(&c, "dev-8f3a").contains(&key));
        let policy = c.engine().policy();
        let (idx, n) = policy.nodes.get("dev-8f3a").unwrap();
        assert_eq!(n.kind, NodeKind::Agent);
        assert_eq!(n.country.map(|c| c.to_string()).as_deref(), Some("us"));
        assert_eq!(policy.geo.name(n.city.unwrap()), "new_york");
        assert_eq!(policy.geo.name(n.isp.unwrap()), "comcast_cable");
        assert_eq!(n.asn, Some(7922));
        assert_eq!(n.network, Network::Mob);
        assert_eq!(n.region, None);
        assert!(!n.from_file);
        assert!(!c.declared_in_file(FileObject::Node("dev-8f3a")));
        // It serves once its device connects.
        policy
            .nodes
            .agent_up(idx, "192.0.2.7:1".parse().unwrap(), "1", 1);
        assert_eq!(n.state(), NodeState::Online);
        drop(policy);

        // Taken: by itself, by a file node, by a node of another kind.
        assert_eq!(
            c.enrol_agent("dev-8f3a", &[]),
            Err(EnrolError::Taken("dev-8f3a".into()))
        );
        assert_eq!(
            c.enrol_agent("file-dev", &[]),
            Err(EnrolError::Taken("file-dev".into()))
        );
        let direct: NodeFields =
            serde_json::from_str(r#"{"id": "d1", "kind": "direct", "bind": "127.0.0.1"}"#).unwrap();
        c.create_node(&direct).unwrap();
        assert_eq!(
            c.enrol_agent("d1", &[]),
            Err(EnrolError::Taken("d1".into()))
        );

        // Invalid ids and attributes create nothing.
        for (id, a, needle) in [
            ("", vec![], "id"),
            ("dev 1", vec![], "id"),
            ("x", vec![("country", "usa")], "country"),
            ("x", vec![("asn", "seven")], "asn"),
            ("x", vec![("network", "wifi")], "network"),
            ("x", vec![("colour", "red")], "unknown attribute"),
            ("x", vec![("city", "東京")], "city"),
            ("x", vec![("city", "a"), ("City", "b")], "twice"),
        ] {
            match c.enrol_agent(id, &attrs(&a)) {
                Err(EnrolError::Invalid(m)) => assert!(m.contains(needle), "{id} {a:?}: {m}"),
                other => panic!("{id} {a:?}: {other:?}"),
            }
        }
        assert!(c.engine().policy().nodes.get("x").is_none());

        // Deleting it revokes its id; the device's connection stops counting.
        assert!(!c.is_revoked("dev-8f3a"));
        c.delete_node("dev-8f3a").unwrap();
        assert!(c.is_revoked("dev-8f3a"));
        assert_eq!(
            c.enrol_agent("dev-8f3a", &[]),
            Err(EnrolError::Revoked("dev-8f3a".into()))
        );
        // Deleting another kind revokes nothing.
        c.delete_node("d1").unwrap();
        assert!(!c.is_revoked("d1"));
        assert!(c.enrol_agent("d1", &[]).is_ok(), "d1 was no agent");
    }
    let c = open(&path, agent_file());
    assert!(c.is_revoked("dev-8f3a"), "a revocation survives a restart");
    assert_eq!(
        c.enrol_agent("dev-8f3a", &[]),
        Err(EnrolError::Revoked("dev-8f3a".into()))
    );
    // The operator may create the id again; enrolment stays refused.
    let again: NodeFields = serde_json::from_str(r#"{"id": "dev-8f3a", "kind": "agent"}"#).unwrap();
    let (_, key) = c.create_node(&again).unwrap();
    assert!(key_matches(&c, "dev-8f3a", &key.unwrap()));
    assert!(c.is_revoked("dev-8f3a"));
    c.delete_node("dev-8f3a").unwrap();
    assert!(c.is_revoked("dev-8f3a"));
    drop(c);
    cleanup(&path);
}

#[test]
fn enrolment_asks_the_store_about_revocations_made_elsewhere() {
    let path = temp_path("enrol-fleet");
    let c = open(&path, file(0));
    // Another gateway sharing the store deletes an agent node.
    {
        let mut other = crate::store::SqliteStore::open(&path).unwrap();
        other.delete_agent("dev-elsewhere", 1).unwrap();
    }
    assert!(!c.is_revoked("dev-elsewhere"), "not known here yet");
    assert_eq!(
        c.enrol_agent("dev-elsewhere", &[]),
        Err(EnrolError::Revoked("dev-elsewhere".into()))
    );
    assert!(c.is_revoked("dev-elsewhere"), "known from now on");
    drop(c);
    cleanup(&path);
}

/// Two gateways on one store (as a fleet shares PostgreSQL; here one
/// SQLite file): what one's API changes, the other reads back; each change
/// is announced; an unchanged store changes nothing.
#[test]
fn a_second_gateway_reads_the_first_ones_changes_back() {
    let path = temp_path("fleet");
    let a = open(&path, Declarations::default());
    let b = open(&path, Declarations::default());
    let announced = Arc::new(Mutex::new(Vec::new()));
    let sink = announced.clone();
    a.on_change(Arc::new(move |c| sink.lock().unwrap().push(c)));

    a.create_org("acme", 10 * MICRO).unwrap();
    let (id, key) = a
        .create_package(PackageFields {
            org: Some(Some("acme".into())),
            ..PackageFields::default()
        })
        .unwrap();
    let node: NodeFields = serde_json::from_str(
        r#"{"id": "n1", "kind": "direct", "bind": "127.0.0.2", "country": "us"}"#,
    )
    .unwrap();
    a.create_node(&node).unwrap();
    assert!(!b.engine().policy().packages.contains_key(&id));

    let r = b.reload_store().unwrap();
    assert!(r.policy, "{r:?}");
    let policy = b.engine().policy();
    let p = policy.packages.get(&id).expect("the package, read back");
    assert_eq!(p.decl.key, key);
    assert!(policy.nodes.get("n1").is_some());
    assert_eq!(
        policy.orgs["acme"].account.granted(),
        10 * MICRO,
        "the opening grant"
    );
    drop(policy);
    assert_eq!(
        b.reload_store().unwrap(),
        Reloaded::default(),
        "nothing new, and nothing read whole: the catalogue did not move"
    );

    // A grant, a state, a deletion and a reset through the first.
    a.add_credits("acme", 5 * MICRO).unwrap();
    let offline: NodeFields = serde_json::from_str(r#"{"state": "offline"}"#).unwrap();
    a.patch_node("n1", &offline).unwrap();
    a.reset_usage(id).unwrap();
    let r = b.reload_store().unwrap();
    assert_eq!((r.policy, r.grants, r.resets), (true, 1, 1), "{r:?}");
    let policy = b.engine().policy();
    assert_eq!(policy.orgs["acme"].account.granted(), 15 * MICRO);
    let (_, n1) = policy.nodes.get("n1").unwrap();
    assert_eq!(n1.admin_state(), NodeState::Offline);
    drop(policy);
    a.delete_node("n1").unwrap();
    b.reload_store().unwrap();
    assert!(b.engine().policy().nodes.get("n1").is_none());

    assert_eq!(
        *announced.lock().unwrap(),
        [
            Change::Org("acme".into()),
            Change::Package(id),
            Change::Node("n1".into()),
            Change::Credits("acme".into()),
            Change::Node("n1".into()),
            Change::Usage(id),
            Change::Node("n1".into()),
        ]
    );
    drop((a, b));
    cleanup(&path);
}

/// A node changed through one gateway is applied on another from its one
/// row (`reload_node`, what the fleet does on `Change::Node`): created,
/// patched, its state set and deleted, each in force at once, the other
/// nodes keeping their indices, and a full read afterwards finding nothing
/// new.
#[test]
fn a_node_changed_elsewhere_is_read_back_alone() {
    let path = temp_path("fleet-node");
    let a = open(&path, Declarations::default());
    let b = open(&path, Declarations::default());
    let n1: NodeFields = serde_json::from_str(
        r#"{"id": "n1", "kind": "direct", "bind": "127.0.0.2", "country": "us"}"#,
    )
    .unwrap();
    a.create_node(&n1).unwrap();
    b.reload_store().unwrap();
    let (n1_idx, _) = b.engine().policy().nodes.get("n1").unwrap();

    // Unknown here and absent from the store: nothing to do.
    assert!(!b.reload_node("n9").unwrap());
    // Created.
    let n2: NodeFields = serde_json::from_str(
        r#"{"id": "n2", "kind": "direct", "bind": "127.0.0.3", "country": "de"}"#,
    )
    .unwrap();
    a.create_node(&n2).unwrap();
    assert!(b.reload_node("n2").unwrap());
    let policy = b.engine().policy();
    let (_, n2_now) = policy.nodes.get("n2").expect("n2 read back");
    assert_eq!(n2_now.country.map(|c| c.to_string()).as_deref(), Some("de"));
    assert_eq!(
        policy.nodes.get("n1").unwrap().0,
        n1_idx,
        "n1 kept its index"
    );
    drop(policy);
    assert!(!b.reload_node("n2").unwrap(), "read again: nothing new");
    // Patched (another field), then its state alone.
    a.patch_node("n2", &node_fields(r#"{"country": "fr"}"#))
        .unwrap();
    assert!(b.reload_node("n2").unwrap());
    let country = b.engine().policy().nodes.get("n2").unwrap().1.country;
    assert_eq!(country.map(|c| c.to_string()).as_deref(), Some("fr"));
    a.patch_node("n2", &node_fields(r#"{"state": "offline"}"#))
        .unwrap();
    assert!(b.reload_node("n2").unwrap());
    let state = b.engine().policy().nodes.get("n2").unwrap().1.admin_state();
    assert_eq!(state, NodeState::Offline);
    // Deleted: out of the pool, the running policy's too.
    let running = b.engine().policy_arc();
    a.delete_node("n2").unwrap();
    assert!(b.reload_node("n2").unwrap());
    assert!(b.engine().policy().nodes.get("n2").is_none());
    assert!(
        running.nodes.get("n2").is_none(),
        "out of the running pool at once"
    );
    assert!(!b.reload_node("n2").unwrap());
    // The incremental reads left b where a full read would: the
    // catalogue moved, so it reads everything, and finds nothing new.
    let r = b.reload_store().unwrap();
    assert!(r.read_whole && !r.any(), "{r:?}");
    assert_eq!(
        b.reload_store().unwrap(),
        Reloaded::default(),
        "and then does not read it again"
    );
    assert_eq!(b.engine().policy().nodes.get("n1").unwrap().0, n1_idx);
    drop(running);
    drop((a, b));
    cleanup(&path);
}

/// Two gateways that have not read each other's changes yet create objects
/// with the same ids: the second is refused (409), never overwrites the
/// first; a package created without an id takes the next free one.
#[test]
fn a_stale_gateway_never_overwrites_what_another_created() {
    let path = temp_path("fleet-ids");
    let a = open(&path, Declarations::default());
    let b = open(&path, Declarations::default());
    a.create_org("acme", MICRO).unwrap();
    assert!(matches!(
        b.create_org("acme", MICRO),
        Err(ControlError::Conflict(_))
    ));
    b.reload_store().unwrap();
    let fields = |id: Option<u64>, key: &str| PackageFields {
        id,
        org: Some(Some("acme".into())),
        key: Some(key.into()),
        ..PackageFields::default()
    };
    a.create_package(fields(Some(1), "pk_from_a")).unwrap();
    assert!(matches!(
        b.create_package(fields(Some(1), "pk_from_b")),
        Err(ControlError::Conflict(_))
    ));
    // b does not know package 1: its next id would be 1, and becomes 2.
    let (id, _) = b.create_package(fields(None, "pk_auto_b")).unwrap();
    assert_eq!(id, 2);
    let node: NodeFields =
        serde_json::from_str(r#"{"id": "n1", "kind": "direct", "bind": "127.0.0.2"}"#).unwrap();
    a.create_node(&node).unwrap();
    assert!(matches!(
        b.create_node(&node),
        Err(ControlError::Conflict(_))
    ));
    a.reload_store().unwrap();
    let policy = a.engine().policy();
    assert_eq!(policy.packages[&1].decl.key, "pk_from_a", "not overwritten");
    assert_eq!(policy.packages[&2].decl.key, "pk_auto_b");
    drop(policy);
    drop((a, b));
    cleanup(&path);
}

fn node_fields(json: &str) -> NodeFields {
    serde_json::from_str(json).unwrap()
}

/// Every node's index by id, and the ids selectable now.
fn pool_view(c: &Control) -> (Vec<(String, u32)>, Vec<String>) {
    let policy = c.engine().policy();
    let mut idx: Vec<_> = policy
        .nodes
        .iter()
        .map(|(i, n)| (n.id.to_string(), i))
        .collect();
    idx.sort();
    let mut online: Vec<_> = policy
        .nodes
        .iter()
        .filter(|(_, n)| n.state() == NodeState::Online)
        .map(|(_, n)| n.id.to_string())
        .collect();
    online.sort();
    (idx, online)
}

fn city_count(c: &Control, city: &str) -> u64 {
    let policy = c.engine().policy();
    let us = splicegate_control::geo::Country::parse("us");
    let Some(city) = policy
        .geo
        .lookup(us, splicegate_control::geo::GeoKind::City, city)
    else {
        return 0;
    };
    policy.nodes.count(&splicegate_control::nodes::Filter {
        country: us,
        city: Some(city),
        ..Default::default()
    })
}

/// A node change through the API derives the pool from the current one:
/// indices kept, a create appended, a delete a tombstone whose slot a
/// re-creation takes again; the result is what a full build (a reload of
/// the same file) gives. A store write that fails changes nothing, not
/// even the live state of the node.
#[test]
fn node_changes_keep_indices_and_a_failed_store_write_changes_nothing() {
    let path = temp_path("node-changes");
    let mut decls = file(0);
    for i in 0..3 {
        decls.nodes.push(NodeDecl {
            from_file: true,
            ..node_fields(&format!(
                r#"{{"id": "f{i}", "kind": "direct", "bind": "127.0.2.{i}", "country": "us", "city": "denver"}}"#
            ))
            .to_decl()
            .unwrap()
        });
    }
    let c = open(&path, decls.clone());
    for i in 0..3 {
        c.create_node(&node_fields(&format!(
            r#"{{"id": "a{i}", "kind": "direct", "bind": "127.0.3.{i}", "country": "us", "city": "austin"}}"#
        )))
        .unwrap();
    }
    assert!(matches!(
        c.create_node(&node_fields(
            r#"{"id": "f1", "kind": "direct", "bind": "127.0.9.1"}"#
        )),
        Err(ControlError::Conflict(_))
    ));
    assert!(matches!(
        c.create_node(&node_fields(
            r#"{"id": "a1", "kind": "direct", "bind": "127.0.9.1"}"#
        )),
        Err(ControlError::Conflict(_))
    ));
    let before = pool_view(&c);
    assert_eq!(before.0.len(), 6);
    assert_eq!(before.1.len(), 6);

    // Every write to the nodes table fails.
    let db = rusqlite::Connection::open(&path).unwrap();
    db.execute_batch(
        "CREATE TRIGGER no_insert BEFORE INSERT ON nodes BEGIN SELECT RAISE(ABORT, 'injected'); END;
         CREATE TRIGGER no_update BEFORE UPDATE ON nodes BEGIN SELECT RAISE(ABORT, 'injected'); END;
         CREATE TRIGGER no_delete BEFORE DELETE ON nodes BEGIN SELECT RAISE(ABORT, 'injected'); END;",
    )
    .unwrap();
    let generation = c.engine().generation();
    assert!(matches!(
        c.create_node(&node_fields(
            r#"{"id": "x", "kind": "direct", "bind": "127.0.4.1", "country": "us", "city": "boston"}"#
        )),
        Err(ControlError::Store(_))
    ));
    assert!(matches!(
        c.patch_node(
            "a1",
            &node_fields(r#"{"city": "boston", "state": "offline"}"#)
        ),
        Err(ControlError::Store(_))
    ));
    assert!(matches!(c.delete_node("a2"), Err(ControlError::Store(_))));
    assert_eq!(c.engine().generation(), generation, "nothing published");
    assert_eq!(pool_view(&c), before, "nothing changed, live state neither");
    assert_eq!(city_count(&c, "boston"), 0);
    assert_eq!(city_count(&c, "austin"), 3);
    db.execute_batch("DROP TRIGGER no_insert; DROP TRIGGER no_update; DROP TRIGGER no_delete;")
        .unwrap();

    let idx = |c: &Control, id: &str| c.engine().policy().nodes.get(id).map(|(i, _)| i);
    let a1 = idx(&c, "a1").unwrap();
    let a2 = idx(&c, "a2").unwrap();
    c.create_node(&node_fields(
        r#"{"id": "x", "kind": "direct", "bind": "127.0.4.1", "country": "us", "city": "boston"}"#,
    ))
    .unwrap();
    assert_eq!(idx(&c, "x"), Some(6), "appended");
    c.patch_node("a1", &node_fields(r#"{"city": "boston"}"#))
        .unwrap();
    assert_eq!(idx(&c, "a1"), Some(a1), "a patch keeps the index");
    assert_eq!(city_count(&c, "boston"), 2);
    assert_eq!(city_count(&c, "austin"), 2);
    c.delete_node("a2").unwrap();
    assert_eq!(idx(&c, "a2"), None);
    assert_eq!(city_count(&c, "austin"), 1);
    c.create_node(&node_fields(
        r#"{"id": "a2", "kind": "direct", "bind": "127.0.3.2", "country": "us", "city": "austin", "state": "draining"}"#,
    ))
    .unwrap();
    assert_eq!(
        idx(&c, "a2"),
        Some(a2),
        "a re-created id takes its slot again"
    );
    assert_eq!(city_count(&c, "austin"), 1, "draining: not selectable");
    c.patch_node("a2", &node_fields(r#"{"state": "online"}"#))
        .unwrap();
    assert_eq!(city_count(&c, "austin"), 2);
    let after = pool_view(&c);
    // A full build of the same declarations gives the same pool.
    c.reload_file(decls).unwrap();
    assert_eq!(pool_view(&c), after);
    assert_eq!(city_count(&c, "boston"), 2);
    assert_eq!(city_count(&c, "austin"), 2);
    drop(c);
    // And so does a start from the store.
    let c = open(&path, file(0));
    let (ids, online) = pool_view(&c);
    let api: Vec<_> = after
        .1
        .iter()
        .filter(|id| !id.starts_with('f'))
        .cloned()
        .collect();
    assert_eq!(online, api);
    assert_eq!(ids.len(), 4);
    cleanup(&path);
}

/// What a fleet peer pays to apply another gateway's node change with many
/// API nodes in the store: the full read (`reload_store`) against the one
/// row (`reload_node`). Run on purpose, it prints its figures:
/// `SG_FLEET_NODES=1000000 cargo test --release -p splicegate-admin --lib
/// -- --ignored --nocapture a_peer_applies_a_node_change`.
#[test]
#[ignore = "a measurement: run it on purpose"]
fn a_peer_applies_a_node_change_at_scale() {
    let n: usize = std::env::var("SG_FLEET_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let path = temp_path("fleet-scale");
    drop(open(&path, Declarations::default()));
    {
        // The rows straight into the shared store (as many API calls would
        // have left them), in one transaction.
        let mut db = rusqlite::Connection::open(&path).unwrap();
        let tx = db.transaction().unwrap();
        {
            let mut st = tx
                .prepare("INSERT INTO nodes (id, spec, updated_ms) VALUES (?1, ?2, 0)")
                .unwrap();
            for i in 0..n {
                let id = format!("n{i}");
                let spec = format!(
                    r#"{{"id": "{id}", "kind": "direct", "bind": "127.0.{}.{}", "country": "us"}}"#,
                    1 + i / 250 % 250,
                    1 + i % 250
                );
                st.execute(rusqlite::params![id, spec]).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let started = Instant::now();
    let a = open(&path, Declarations::default());
    let b = open(&path, Declarations::default());
    println!(
        "{n} API nodes: two gateways opened in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let timed = |f: &dyn Fn()| {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64() * 1e3
    };
    let create = |id: &str| {
        a.create_node(&node_fields(&format!(
            r#"{{"id": "{id}", "kind": "direct", "bind": "127.0.0.9", "country": "de"}}"#
        )))
        .unwrap()
    };
    create("new-full");
    let full = timed(&|| assert!(b.reload_store().unwrap().policy));
    // The first allocations after a full build pay for the allocator
    // consolidating the old pool's freed memory (about 0.1 s at a million
    // nodes), whichever path comes next: one change first, not timed.
    create("warm");
    let first = timed(&|| assert!(b.reload_node("warm").unwrap()));
    let here = timed(&|| {
        create("new-one");
    });
    let one = timed(&|| assert!(b.reload_node("new-one").unwrap()));
    a.patch_node("new-one", &node_fields(r#"{"country": "fr"}"#))
        .unwrap();
    let patch = timed(&|| assert!(b.reload_node("new-one").unwrap()));
    a.delete_node("new-one").unwrap();
    let delete = timed(&|| assert!(b.reload_node("new-one").unwrap()));
    println!(
        "a node created elsewhere ({here:.2} ms there), read back: the whole store {full:.1} ms; its row alone {one:.2} ms (the first after the full read {first:.1} ms; patch {patch:.2} ms, delete {delete:.2} ms)"
    );
    // The periodic read back: once whole (the catalogue moved), then with
    // nothing changed since.
    let whole = timed(&|| assert!(b.reload_store().unwrap().read_whole));
    let quiet = timed(&|| assert!(!b.reload_store().unwrap().read_whole));
    println!("the periodic read back: {whole:.1} ms after a change, {quiet:.2} ms with none");
    assert!(b.engine().policy().nodes.get("new-full").is_some());
    assert!(b.engine().policy().nodes.get("new-one").is_none());
    drop((a, b));
    cleanup(&path);
}
