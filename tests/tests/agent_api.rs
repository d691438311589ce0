//! Agent nodes through the admin API of the real binary (SPEC 6 and 10):
//! a file's and the API's agent nodes, a generated key shown once and never
//! again, a new key, presence in the node JSON (an agent without its device
//! is offline and never chosen), the agent gauges, deletion revoking the id
//! in the store while the API may create it again, and nothing of a key in
//! any answer, the log or the store.

use std::net::Ipv4Addr;

use serde_json::Value;
use splicegate_admin::store::{PgStore, SqliteStore, Store};
use splicegate_tests::Gateway;
use splicegate_tests::ops::*;

const NO_PROBES: &str = "interval_s = 3600";
const FILE_KEY: &str = "ak_file_device_key_0123456789";

/// Package 7 (`pk_7`), a direct node in New York on `node`, and the file's
/// agent node `file-dev` in Paris with [`FILE_KEY`].
fn conf(s: &Setup, node: Ipv4Addr) -> String {
    [
        s.head(NO_PROBES),
        org_and_package("acme", 100.0, 7, "pk_7", ""),
        direct_node("file-1", node, "country = \"us\"\ncity = \"new_york\""),
        format!(
            "[[node]]\nid = \"file-dev\"\nkind = \"agent\"\nkey = {FILE_KEY:?}\ncountry = \"fr\"\ncity = \"paris\"\n\n"
        ),
    ]
    .concat()
}

/// The hex SHA-256 of `key` (computed here with ring, not the gateway's code).
fn sha256_hex(key: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, key.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The store the gateway of `s` wrote (open it once the gateway stopped).
fn store(s: &Setup) -> Box<dyn Store> {
    match &s.pg {
        Some(pg) => Box::new(PgStore::connect(&pg.url()).unwrap()),
        None => Box::new(SqliteStore::open(&s.dir.join("splicegate.db")).unwrap()),
    }
}

/// Whether `text` carries `key` or its hash.
fn leaks(text: &str, key: &str) -> bool {
    text.contains(key) || text.contains(&sha256_hex(key))
}

fn assert_no_secret(v: &Value, keys: &[&str]) {
    let text = v.to_string();
    assert!(!text.contains("key_hash"), "{text}");
    for k in keys {
        assert!(!leaks(&text, k), "a key shows in {text}");
    }
}

#[test]
fn agent_nodes_through_the_api_keys_once_presence_and_revocation() {
    let s = Setup::new("agent-api");
    let mut gw = s.start(&conf(&s, Ipv4Addr::new(127, 0, 5, 1)));

    // 1. The file's agent node: no device yet, so offline; never a key.
    let f = gw.get_json("/v1/nodes/file-dev");
    assert_eq!(f["kind"], "agent");
    assert_eq!(f["state"], "offline", "{f}");
    assert_eq!(f["admin_state"], "online");
    assert_eq!(f["connected"], false);
    assert_eq!(f["agent"], Value::Null);
    assert_eq!(f["healthy"], false, "an agent's health is its presence");
    assert_eq!(f["from_file"], true);
    assert_eq!(f["addr"], Value::Null);
    assert!(f.get("key").is_none(), "{f}");
    assert_no_secret(&f, &[FILE_KEY]);
    let direct = gw.get_json("/v1/nodes/file-1");
    assert!(
        direct.get("connected").is_none() && direct.get("agent").is_none(),
        "only agents carry presence: {direct}"
    );

    // 2. Created without a key: one is generated and shown this once.
    let created = gw.created(
        "/v1/nodes",
        r#"{"id": "dev-api", "kind": "agent", "country": "fr", "city": "paris", "isp": "orange", "asn": 3215}"#,
    );
    let key = created["key"]
        .as_str()
        .expect("a generated key")
        .to_string();
    assert!(key.starts_with("ak_") && key.len() == 46, "{key}");
    assert_eq!(created["state"], "offline");
    assert_eq!(created["connected"], false);
    assert_eq!(created["agent"], Value::Null);
    let got = gw.get_json("/v1/nodes/dev-api");
    assert!(got.get("key").is_none(), "{got}");
    assert_no_secret(&got, &[&key]);
    assert_eq!(got["city"], "paris");
    let list = gw.get_json("/v1/nodes");
    assert_eq!(list.as_array().unwrap().len(), 3);
    assert_no_secret(&list, &[&key, FILE_KEY]);

    // A key given by the operator is not echoed.
    let given = gw.created(
        "/v1/nodes",
        r#"{"id": "dev-given", "kind": "agent", "key": "ak_given_by_the_operator", "country": "de"}"#,
    );
    assert!(given.get("key").is_none(), "{given}");
    assert_no_secret(&given, &["ak_given_by_the_operator"]);

    // What an agent node must not have, and what it needs, is a 422.
    for body in [
        r#"{"id": "bad", "kind": "agent", "addr": "127.0.0.1:1"}"#,
        r#"{"id": "bad", "kind": "agent", "bind": "127.0.0.1"}"#,
        r#"{"id": "bad", "kind": "agent", "key": "k", "key_hash": "00"}"#,
        r#"{"id": "bad", "kind": "direct", "bind": "127.0.0.1", "key": "k"}"#,
    ] {
        let e = gw.expect("POST", "/v1/nodes", Some(body), 422);
        assert_eq!(e["error"], "invalid", "{body}: {e}");
    }
    gw.expect(
        "POST",
        "/v1/nodes",
        Some(r#"{"id": "dev-api", "kind": "agent"}"#),
        409,
    );

    // 3. A new key: generated or given; 404, and 409 for the file's nodes
    //    and for a node that is not an agent.
    let k2 = gw.expect("POST", "/v1/nodes/dev-api/key", None, 200);
    assert_eq!(k2["id"], "dev-api");
    let k2 = k2["key"].as_str().unwrap().to_string();
    assert!(k2.starts_with("ak_") && k2 != key, "{k2}");
    let k3 = gw.expect(
        "POST",
        "/v1/nodes/dev-given/key",
        Some(r#"{"key": "ak_chosen_again"}"#),
        200,
    );
    assert_eq!(k3["key"], "ak_chosen_again");
    assert_eq!(
        gw.expect("POST", "/v1/nodes/nobody/key", None, 404)["error"],
        "not_found"
    );
    let e = gw.expect("POST", "/v1/nodes/file-1/key", None, 409);
    assert_eq!(e["error"], "conflict");
    assert!(
        e["message"].as_str().unwrap().contains("config file"),
        "{e}"
    );
    gw.expect("POST", "/v1/nodes/file-dev/key", None, 409);
    let api_direct = gw.created(
        "/v1/nodes",
        r#"{"id": "api-direct", "kind": "direct", "bind": "127.0.5.2"}"#,
    );
    assert!(api_direct.get("key").is_none());
    let e = gw.expect("POST", "/v1/nodes/api-direct/key", None, 409);
    assert!(
        e["message"].as_str().unwrap().contains("only an agent"),
        "{e}"
    );
    gw.expect(
        "POST",
        "/v1/nodes/dev-api/key",
        Some(r#"{"key": "a:b"}"#),
        422,
    );
    gw.expect("POST", "/v1/nodes/dev-api/key", Some("{"), 400);

    // 4. The operator's state: offline stays offline whatever the device.
    let off = gw.patched("/v1/nodes/dev-given", r#"{"state": "offline"}"#);
    assert_eq!(
        (&off["state"], &off["admin_state"]),
        (&"offline".into(), &"offline".into())
    );
    let drain = gw.patched("/v1/nodes/dev-api", r#"{"state": "draining"}"#);
    assert_eq!(drain["admin_state"], "draining");
    assert_eq!(
        drain["state"], "offline",
        "no device: offline whatever the operator set"
    );
    gw.patched("/v1/nodes/dev-api", r#"{"state": "online"}"#);

    // 5. An agent without its device is never chosen.
    let e = gw.get_json("/v1/explain?username=package-7-country-fr");
    assert_eq!(e["matching_nodes"], 0, "{e}");
    assert_eq!(e["answer"]["code"], "NODE_NOT_FOUND", "{e}");
    let t = connect(
        gw.proxy,
        Ipv4Addr::new(127, 0, 6, 1),
        local(9),
        "package-7-country-fr",
        "pk_7",
    );
    assert_eq!(t.status, 502);
    assert_eq!(t.code.as_deref(), Some("NODE_NOT_FOUND"));
    let fr = gw.get_json("/v1/geo/countries");
    assert!(
        fr.as_array()
            .unwrap()
            .iter()
            .any(|c| c["country"] == "fr" && c["online_nodes"] == 0),
        "{fr}"
    );

    // 6. Metrics.
    let m = gw.metrics();
    for line in [
        "splicegate_agents_connected 0",
        "splicegate_agent_streams 0",
        "splicegate_nodes{state=\"online\"} 2",
        "splicegate_nodes{state=\"offline\"} 3",
        "splicegate_nodes_unhealthy 0",
    ] {
        assert!(m.lines().any(|l| l == line), "no {line:?} in\n{m}");
    }

    // 7. Deleting an agent node revokes its id; the operator may create it
    //    again (with a new key). A deleted direct node revokes nothing.
    gw.expect("DELETE", "/v1/nodes/dev-given", None, 204);
    gw.expect("GET", "/v1/nodes/dev-given", None, 404);
    let again = gw.created("/v1/nodes", r#"{"id": "dev-given", "kind": "agent"}"#);
    let k4 = again["key"].as_str().unwrap().to_string();
    assert_eq!(again["state"], "offline");
    gw.expect("DELETE", "/v1/nodes/api-direct", None, 204);

    // 8. A restart keeps the nodes and their hashed keys; the store holds
    //    the revocation and no key in plaintext; the log never had one.
    let st = gw.term();
    assert!(st.success(), "{st}");
    let log = gw.log();
    for k in [
        &key,
        &k2,
        &k4,
        FILE_KEY,
        "ak_given_by_the_operator",
        "ak_chosen_again",
    ] {
        assert!(!leaks(&log, k), "a key in the log:\n{log}");
    }
    drop(gw);
    {
        let st = store(&s);
        assert!(
            st.is_revoked("dev-given").unwrap(),
            "the deletion revoked it"
        );
        assert!(!st.is_revoked("api-direct").unwrap(), "not an agent");
        assert!(!st.is_revoked("dev-api").unwrap());
        let nodes = st.nodes().unwrap();
        let spec = |id: &str| {
            nodes
                .iter()
                .find(|(i, _)| i == id)
                .map(|(_, s)| s.clone())
                .unwrap_or_else(|| panic!("no stored node {id}: {nodes:?}"))
        };
        assert!(
            spec("dev-api").contains(&sha256_hex(&k2)),
            "the current key's SHA-256: {}",
            spec("dev-api")
        );
        assert!(spec("dev-given").contains(&sha256_hex(&k4)));
        for (_, sp) in &nodes {
            for k in [
                &key,
                &k2,
                &k4,
                "ak_given_by_the_operator",
                "ak_chosen_again",
            ] {
                assert!(!sp.contains(k), "a key in plaintext in the store: {sp}");
            }
        }
        assert!(
            nodes.iter().all(|(id, _)| id != "file-dev"),
            "file nodes are the file's"
        );
    }
    let gw = s.start(&conf(&s, Ipv4Addr::new(127, 0, 5, 1)));
    let after = gw.get_json("/v1/nodes/dev-api");
    assert_eq!(after["kind"], "agent");
    assert_eq!(
        after["state"], "offline",
        "absent until its device connects"
    );
    assert_eq!(after["connected"], false);
    assert_eq!(after["isp"], "orange");
    assert_no_secret(&after, &[&key, &k2]);
    assert_eq!(gw.get_json("/v1/nodes/dev-given")["kind"], "agent");
    assert_eq!(gw.get_json("/v1/nodes").as_array().unwrap().len(), 4);
    stop(gw);
}

fn stop(mut gw: Gateway) {
    let st = gw.term();
    assert!(st.success(), "{st}");
}

/// The store's revocations on PostgreSQL: the conformance body the SQLite
/// unit tests run (`splicegate_admin::store::conformance`).
#[test]
fn postgres_keeps_deleted_agents_revoked() {
    let pg = splicegate_tests::pg::Postgres::start();
    pg.sql("CREATE DATABASE revoked");
    let url = format!(
        "host={} user=postgres dbname=revoked",
        pg.socket_dir().display()
    );
    let mut s = PgStore::connect(&url).unwrap();
    splicegate_admin::store::conformance::deleted_agents_stay_revoked(&mut s);
    drop(s);
    let s = PgStore::connect(&url).unwrap();
    assert!(s.is_revoked("dev-1").unwrap(), "after reconnecting too");
}
