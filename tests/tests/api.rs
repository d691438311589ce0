//! The admin API against the real binary: every endpoint, the token, the
//! error format and the 409 rule, persistence across a restart, and changes
//! that hold from the next request (keys, status, node state), metrics that
//! move with traffic.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::Value;
use splicegate_tests::ops::*;
use splicegate_tests::{Gateway, eventually};

/// The file every test starts from: org `acme` (100 credits), package 7
/// (1 credit per GB), and a `direct` node `file-1` in New York on `node`.
fn conf(s: &Setup, node: Ipv4Addr, health: &str, acme_credits: f64) -> String {
    let place = "country = \"us\"\nregion = \"new_york\"\ncity = \"new_york\"\nisp = \"verizon_wireless\"\nasn = 701";
    [
        s.head(health),
        org_and_package("acme", acme_credits, 7, "pk_file_7", "price_per_gb = 1.0\n"),
        direct_node("file-1", node, place),
    ]
    .concat()
}

const NO_PROBES: &str = "interval_s = 3600";

/// A setup named `tag`, a target, and a gateway on [`conf`] without
/// probes, its node on `ip(node)` and acme with 100 credits.
fn start(tag: &str, node: u8) -> (Setup, IpEcho, Gateway) {
    let s = Setup::new(tag);
    let target = IpEcho::start(local(0)).unwrap();
    let gw = s.start(&conf(&s, ip(node), NO_PROBES, 100.0));
    (s, target, gw)
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 3, last)
}

fn client(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 4, last)
}

fn ids(v: &Value, key: &str) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x[key].to_string().trim_matches('"').to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_endpoint_answers_as_documented() {
    let s = Setup::new("endpoints");
    let gw = s.start(&conf(&s, ip(1), NO_PROBES, 100.0));
    let target = IpEcho::start(local(0)).unwrap();

    // 1. Open endpoints, the token, and the error format.
    let a = http(gw.admin_addr(), "GET", "/healthz", None, None);
    assert_eq!(a.status, 200);
    let a = http(gw.admin_addr(), "GET", "/", None, None);
    assert_eq!(a.status, 200);
    assert!(a.header("content-type").unwrap().starts_with("text/html"));
    for token in [None, Some("wrong")] {
        let a = http(gw.admin_addr(), "GET", "/v1/orgs", token, None);
        assert_eq!(a.status, 401, "{token:?}");
        assert_eq!(a.json()["error"], "unauthorized");
        assert!(a.json()["message"].as_str().unwrap().contains("Bearer"));
    }
    assert_eq!(
        http(gw.admin_addr(), "GET", "/metrics", None, None).status,
        401
    );
    let nf = gw.expect("GET", "/v1/nothing", None, 404);
    assert_eq!(nf["error"], "not_found");
    gw.expect("PUT", "/v1/orgs", Some("{}"), 405);

    // 2. Organisations.
    let beta = gw.created("/v1/orgs", r#"{"id": "beta", "credits": 50.5}"#);
    assert_eq!(beta["balance"], 50.5);
    assert_eq!(beta["from_file"], false);
    gw.expect("POST", "/v1/orgs", Some(r#"{"id": "beta"}"#), 409);
    gw.expect("POST", "/v1/orgs", Some(r#"{"id": "acme"}"#), 409);
    assert_eq!(
        gw.expect("POST", "/v1/orgs", Some("{not json"), 400)["error"],
        "bad_request"
    );
    assert_eq!(
        gw.expect("POST", "/v1/orgs", Some(r#"{"id": "x", "credit": 1}"#), 422)["error"],
        "invalid"
    );
    gw.expect("POST", "/v1/orgs", Some(r#"{"id": "has space"}"#), 422);
    let orgs = gw.get_json("/v1/orgs");
    assert_eq!(ids(&orgs, "id"), ["acme", "beta"]);
    assert_eq!(orgs[0]["from_file"], true);
    assert_eq!(orgs[0]["packages"], serde_json::json!([7]));
    gw.expect("GET", "/v1/orgs/nobody", None, 404);
    let beta = gw.expect(
        "POST",
        "/v1/orgs/beta/credits",
        Some(r#"{"amount": 25}"#),
        200,
    );
    assert_eq!(beta["balance"], 75.5);
    let acme = gw.expect(
        "POST",
        "/v1/orgs/acme/credits",
        Some(r#"{"amount": 1.5}"#),
        200,
    );
    assert_eq!(
        acme["balance"], 101.5,
        "a grant to a file org is ledger, not declaration"
    );
    gw.expect(
        "POST",
        "/v1/orgs/beta/credits",
        Some(r#"{"amount": 0}"#),
        422,
    );
    gw.expect(
        "POST",
        "/v1/orgs/nobody/credits",
        Some(r#"{"amount": 1}"#),
        404,
    );
    assert_eq!(gw.get_json("/v1/orgs/beta")["balance"], 75.5);

    // 3. Packages: a missing key is generated and returned once.
    let p = gw.created("/v1/packages", r#"{"org": "beta", "protocols": ["https", "http"], "price_per_gb": 2.5, "traffic_limit_bytes": 1000000}"#);
    assert_eq!(p["id"], 8, "the next free id");
    let key = p["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("pk_") && key.len() == 27, "{key}");
    assert_eq!(p["price_per_gb"], 2.5);
    assert_eq!(p["balance"], 75.5);
    assert_eq!(p["protocols"], serde_json::json!(["http", "https"]));
    let m = gw.expect(
        "POST",
        "/v1/packages",
        Some(r#"{"id": 7, "key": "x"}"#),
        409,
    );
    assert_eq!(m["error"], "conflict");
    let m = gw.expect(
        "POST",
        "/v1/packages",
        Some(r#"{"id": 9, "org": "nobody"}"#),
        422,
    );
    assert!(m["message"].as_str().unwrap().contains("nobody"), "{m}");
    gw.expect(
        "POST",
        "/v1/packages",
        Some(r#"{"id": 9, "status": "on"}"#),
        422,
    );
    let list = gw.get_json("/v1/packages");
    assert_eq!(ids(&list, "id"), ["7", "8"]);
    assert!(
        list[0].get("key").is_none(),
        "keys are shown once, at creation"
    );
    let p8 = gw.get_json("/v1/packages/8");
    for field in [
        "bytes_up",
        "bytes_down",
        "requests",
        "balance",
        "connections",
    ] {
        assert!(p8.get(field).is_some(), "{field}: {p8}");
    }
    gw.expect("GET", "/v1/packages/99", None, 404);
    gw.expect("GET", "/v1/packages/abc", None, 404);
    let p8 = gw.patched(
        "/v1/packages/8",
        r#"{"rps_limit": 50, "default_rules": "country-us"}"#,
    );
    assert_eq!(p8["rps_limit"], 50);
    assert_eq!(p8["org"], "beta", "untouched fields stay");
    let m = gw.expect("PATCH", "/v1/packages/7", Some(r#"{"rps_limit": 1}"#), 409);
    assert!(
        m["message"]
            .as_str()
            .unwrap()
            .contains("declared in the config file"),
        "{m}"
    );
    gw.expect(
        "PATCH",
        "/v1/packages/8",
        Some(r#"{"default_rules": "contry-us"}"#),
        422,
    );
    gw.expect("PATCH", "/v1/packages/8", Some(r#"{"id": 9}"#), 422);
    let k = gw.expect("POST", "/v1/packages/8/key", None, 200);
    assert_ne!(k["key"], key.as_str());
    let k = gw.expect(
        "POST",
        "/v1/packages/8/key",
        Some(r#"{"key": "pk_custom_8"}"#),
        200,
    );
    assert_eq!(k["key"], "pk_custom_8");
    gw.expect("POST", "/v1/packages/7/key", None, 409);

    // 4. Traffic, so usage, errors and sessions have something to show.
    let user = "package-8-country-us-session-s1";
    let seen = exit_ip(gw.proxy, client(1), target.addr, user, "pk_custom_8");
    assert_eq!(seen.as_deref(), Ok("127.0.3.1"));
    assert_eq!(
        exit_ip(
            gw.proxy,
            client(1),
            target.addr,
            "package-8-country-gb",
            "pk_custom_8"
        ),
        Err("NODE_NOT_FOUND".to_string())
    );
    let p8 = gw.get_json("/v1/packages/8");
    assert_eq!(p8["requests"], 1);
    assert!(p8["bytes_down"].as_u64().unwrap() > 0, "{p8}");
    let errs = gw.get_json("/v1/packages/8/errors");
    assert_eq!(errs[0]["code"], "NODE_NOT_FOUND", "{errs}");
    assert_eq!(errs[0]["status"], 502);
    assert_eq!(errs[0]["protocol"], "https");
    assert!(errs[0]["time"].as_str().unwrap().ends_with('Z'));
    let all = gw.get_json("/v1/errors?limit=5");
    assert_eq!(all[0]["package"], 8);
    gw.expect("GET", "/v1/errors?limit=x", None, 400);
    gw.expect("GET", "/v1/packages/99/errors", None, 404);

    let sessions = gw.get_json("/v1/sessions?package=8");
    assert_eq!(sessions.as_array().unwrap().len(), 1, "{sessions}");
    let s1 = &sessions[0];
    assert_eq!(s1["id"], "s1");
    assert_eq!(s1["node"], "file-1");
    assert_eq!(s1["rules"], "package-8-country-us");
    assert_eq!(s1["requests"], 1);
    assert!(s1["expires_in_s"].as_u64().unwrap() > 300, "{s1}");
    assert_eq!(gw.get_json("/v1/sessions?package=7"), serde_json::json!([]));
    gw.expect("GET", "/v1/sessions?package=x", None, 400);
    gw.expect("DELETE", "/v1/sessions/8/s1", None, 204);
    gw.expect("DELETE", "/v1/sessions/8/s1", None, 404);

    let reset = gw.expect("POST", "/v1/packages/8/usage/reset", None, 200);
    assert_eq!(reset["bytes_down"], 0);
    assert_eq!(reset["requests"], 0);
    assert!(reset["reset"]["bytes_down"].as_u64().unwrap() > 0);
    gw.expect("POST", "/v1/packages/99/usage/reset", None, 404);

    // Billing history from the ledger: the reset starts the cap over, not
    // the bill, so the usage before it is still there.
    for step in ["hour", "day"] {
        let h = gw.get_json(&format!("/v1/packages/8/usage?step={step}"));
        assert_eq!(h["step"], step, "{h}");
        let buckets = h["buckets"].as_array().unwrap();
        let down: u64 = buckets
            .iter()
            .map(|b| b["bytes_down"].as_u64().unwrap())
            .sum();
        let requests: u64 = buckets
            .iter()
            .map(|b| b["requests"].as_u64().unwrap())
            .sum();
        assert_eq!(down, p8["bytes_down"].as_u64().unwrap(), "{h}");
        assert_eq!(requests, 1, "{h}");
        assert!(
            buckets[0]["start"]
                .as_str()
                .unwrap()
                .ends_with(":00:00.000Z"),
            "{h}"
        );
    }
    let empty = gw.get_json("/v1/packages/8/usage?from=2020-01-01&to=2020-01-02T00:00:00Z");
    assert_eq!(empty["buckets"], serde_json::json!([]), "{empty}");
    gw.expect("GET", "/v1/packages/8/usage?step=minute", None, 422);
    gw.expect("GET", "/v1/packages/8/usage?from=yesterday", None, 422);
    gw.expect("GET", "/v1/packages/8/usage?from=2000-01-01", None, 422);
    gw.expect("GET", "/v1/packages/99/usage", None, 404);

    // 5. Nodes.
    let n = gw.created("/v1/nodes", r#"{"id": "api-1", "kind": "direct", "bind": "127.0.3.2", "country": "gb", "city": "london", "isp": "bt", "network": "mob"}"#);
    assert_eq!(n["state"], "online");
    assert_eq!(n["healthy"], true);
    assert_eq!(n["from_file"], false);
    gw.expect(
        "POST",
        "/v1/nodes",
        Some(r#"{"id": "api-1", "kind": "direct", "bind": "127.0.3.2"}"#),
        409,
    );
    gw.expect(
        "POST",
        "/v1/nodes",
        Some(r#"{"id": "file-1", "kind": "direct", "bind": "127.0.3.2"}"#),
        409,
    );
    gw.expect(
        "POST",
        "/v1/nodes",
        Some(r#"{"id": "x", "kind": "ftp"}"#),
        422,
    );
    gw.expect(
        "POST",
        "/v1/nodes",
        Some(r#"{"id": "x", "kind": "http"}"#),
        422,
    );
    let nodes = gw.get_json("/v1/nodes");
    assert_eq!(ids(&nodes, "id"), ["api-1", "file-1"]);
    for field in [
        "state",
        "admin_state",
        "healthy",
        "active_tunnels",
        "recent_failures",
    ] {
        assert!(nodes[1].get(field).is_some(), "{field}");
    }
    assert_eq!(nodes[1]["from_file"], true);
    assert_eq!(gw.get_json("/v1/nodes/api-1")["city"], "london");
    let d = gw.patched("/v1/nodes/api-1", r#"{"state": "draining"}"#);
    assert_eq!(
        (d["state"].as_str(), d["admin_state"].as_str()),
        (Some("draining"), Some("draining"))
    );
    gw.expect(
        "PATCH",
        "/v1/nodes/api-1",
        Some(r#"{"state": "asleep"}"#),
        422,
    );
    let moved = gw.patched(
        "/v1/nodes/api-1",
        r#"{"city": "manchester", "state": "online"}"#,
    );
    assert_eq!(moved["city"], "manchester");
    assert_eq!(
        gw.expect(
            "PATCH",
            "/v1/nodes/file-1",
            Some(r#"{"state": "offline"}"#),
            409
        )["error"],
        "conflict"
    );
    gw.expect(
        "PATCH",
        "/v1/nodes/nope",
        Some(r#"{"state": "offline"}"#),
        404,
    );

    // 6. The catalogue with node counts.
    let countries = gw.get_json("/v1/geo/countries");
    assert!(
        countries
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({"country": "us", "online_nodes": 1})),
        "{countries}"
    );
    let cities = gw.get_json("/v1/geo/cities?country=gb");
    assert!(
        cities.as_array().unwrap().contains(
            &serde_json::json!({"country": "gb", "name": "manchester", "online_nodes": 1})
        ),
        "{cities}"
    );
    let isps = gw.get_json("/v1/geo/isps?country=us");
    assert_eq!(isps[0]["name"], "verizon_wireless");
    assert_eq!(
        gw.get_json("/v1/geo/regions?country=us")[0]["name"],
        "new_york"
    );
    assert!(gw.get_json("/v1/geo/cities").as_array().unwrap().len() >= 3);
    gw.expect("GET", "/v1/geo/cities?country=USA", None, 400);

    // 7. Explain: rules with defaults, the code, matching nodes.
    let ex = gw.get_json("/v1/explain?username=package-7-country-us");
    assert_eq!(ex["answer"]["code"], "OK");
    assert_eq!(ex["matching_nodes"], 1);
    assert_eq!(ex["rules"]["onerror"], "replace");
    assert_eq!(ex["rules"]["network"], "any");
    let ex = gw.get_json("/v1/explain?username=package-7-contry-us");
    assert_eq!(ex["answer"]["code"], "ERR_UNKNOWN_PARAM");
    assert_eq!(ex["answer"]["status"], 400);
    let ex = gw.get_json("/v1/explain?username=package-7-country-gb-city-manchester");
    assert_eq!(ex["matching_nodes"], 1);
    assert_eq!(ex["rules"]["city"], "manchester");
    gw.expect("GET", "/v1/explain", None, 400);

    // 8. Delete a node: gone from selection and listings.
    gw.expect("DELETE", "/v1/nodes/api-1", None, 204);
    gw.expect("GET", "/v1/nodes/api-1", None, 404);
    gw.expect("DELETE", "/v1/nodes/api-1", None, 404);
    gw.expect("DELETE", "/v1/nodes/file-1", None, 409);
    let ex = gw.get_json("/v1/explain?username=package-7-country-gb");
    assert_eq!(ex["answer"]["code"], "NODE_NOT_FOUND");

    // 9. Metrics (text exposition, behind the token).
    let a = gw.api("GET", "/metrics", None);
    assert!(a.header("content-type").unwrap().starts_with("text/plain"));
    assert!(
        a.body
            .contains("splicegate_requests_total{protocol=\"https\",code=\"OK\"} 1"),
        "{}",
        a.body
    );

    // 10. Workers + main + log writer + admin + 2 resolver threads (and
    // PostgreSQL's store thread).
    let store_thread = usize::from(splicegate_tests::ops::store_is_postgres());
    assert_eq!(
        gw.threads(),
        1 + 5 + store_thread,
        "threads of a one-worker gateway"
    );
}

#[test]
fn changes_and_usage_survive_a_restart_and_file_credits_are_a_first_grant() {
    let (s, target, mut gw) = start("restart", 10);
    gw.created("/v1/orgs", r#"{"id": "beta", "credits": 10}"#);
    gw.expect(
        "POST",
        "/v1/orgs/beta/credits",
        Some(r#"{"amount": 5}"#),
        200,
    );
    let p = gw.created(
        "/v1/packages",
        r#"{"id": 20, "org": "beta", "price_per_gb": 1000}"#,
    );
    let key = p["key"].as_str().unwrap().to_string();
    gw.created(
        "/v1/nodes",
        r#"{"id": "api-off", "kind": "direct", "bind": "127.0.3.11", "country": "de"}"#,
    );
    gw.patched("/v1/nodes/api-off", r#"{"state": "offline"}"#);
    gw.expect(
        "POST",
        "/v1/orgs/acme/credits",
        Some(r#"{"amount": 7}"#),
        200,
    );
    for _ in 0..3 {
        assert_eq!(
            exit_ip(
                gw.proxy,
                client(10),
                target.addr,
                "package-20-country-us",
                &key
            )
            .as_deref(),
            Ok("127.0.3.10")
        );
        assert!(
            exit_ip(
                gw.proxy,
                client(10),
                target.addr,
                "package-7-country-us",
                "pk_file_7"
            )
            .is_ok()
        );
    }
    // Tunnels charge their package when they close: wait until usage settles.
    let settled = |id: u64| {
        let path = format!("/v1/packages/{id}");
        let mut last = Value::Null;
        eventually(Duration::from_secs(5), Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_millis(300));
            let now = gw.get_json(&path);
            let same =
                now["bytes_down"] == last["bytes_down"] && now["bytes_up"] == last["bytes_up"];
            last = now.clone();
            same.then_some(now)
        })
        .expect("usage settles")
    };
    let before20 = settled(20);
    let before7 = settled(7);
    let beta_before = gw.get_json("/v1/orgs/beta");
    assert!(
        beta_before["balance"].as_f64().unwrap() < 15.0,
        "1000 credits/GB charged: {beta_before}"
    );
    let st = gw.term();
    assert!(st.success(), "SIGTERM exits 0: {st}\n{}", gw.log_tail(10));
    assert!(gw.log().contains("usage flushed to the store"));
    drop(gw);

    // The file now grants acme 500: a file's credits are its first grant only.
    let gw = s.start(&conf(&s, ip(10), NO_PROBES, 500.0));
    let after20 = gw.get_json("/v1/packages/20");
    let after7 = gw.get_json("/v1/packages/7");
    for f in [
        "bytes_up",
        "bytes_down",
        "requests",
        "charged",
        "balance",
        "org",
        "price_per_gb",
    ] {
        assert_eq!(after20[f], before20[f], "package 20 {f}");
        assert_eq!(after7[f], before7[f], "package 7 {f}");
    }
    assert_eq!(after20["requests"], 3);
    assert_eq!(
        gw.get_json("/v1/orgs/beta")["balance"],
        beta_before["balance"]
    );
    let acme = gw.get_json("/v1/orgs/acme");
    assert_eq!(
        acme["granted"], 107.0,
        "100 first + 7 granted; the file's 500 ignored: {acme}"
    );
    let node = gw.get_json("/v1/nodes/api-off");
    assert_eq!(node["state"], "offline");
    assert_eq!(
        exit_ip(
            gw.proxy,
            client(11),
            target.addr,
            "package-20-country-us",
            &key
        )
        .as_deref(),
        Ok("127.0.3.10"),
        "the API's key survived"
    );
}

#[test]
fn a_new_key_works_and_the_old_fails_at_once() {
    let (_s, target, gw) = start("keys", 20);
    let p = gw.created("/v1/packages", r#"{"id": 30, "org": "acme"}"#);
    let old = p["key"].as_str().unwrap().to_string();
    let user = "package-30-country-us";
    assert_eq!(
        curl_connect(gw.proxy, client(20), target.addr, user, &old),
        (200, "127.0.3.20".to_string())
    );
    let new = gw.expect("POST", "/v1/packages/30/key", None, 200)["key"]
        .as_str()
        .unwrap()
        .to_string();
    // No wait: the next request sees the new policy.
    assert_eq!(
        curl_connect(gw.proxy, client(20), target.addr, user, &old).0,
        407
    );
    assert_eq!(
        curl_connect(gw.proxy, client(20), target.addr, user, &new),
        (200, "127.0.3.20".to_string())
    );
    let t = connect(gw.proxy, client(21), target.addr, user, &old);
    assert_eq!((t.status, t.code.as_deref()), (407, Some("AUTH_FAILED")));
}

#[test]
fn a_paused_package_answers_package_paused() {
    let (_s, target, gw) = start("paused", 30);
    gw.created(
        "/v1/packages",
        r#"{"id": 31, "org": "acme", "key": "pk_31_key"}"#,
    );
    let user = "package-31-country-any";
    assert!(exit_ip(gw.proxy, client(30), target.addr, user, "pk_31_key").is_ok());
    gw.patched("/v1/packages/31", r#"{"status": "paused"}"#);
    let t = connect(gw.proxy, client(30), target.addr, user, "pk_31_key");
    assert_eq!(
        (t.status, t.code.as_deref()),
        (407, Some("PACKAGE_PAUSED")),
        "{}",
        t.head
    );
    gw.patched("/v1/packages/31", r#"{"status": "suspended"}"#);
    let t = connect(gw.proxy, client(30), target.addr, user, "pk_31_key");
    assert_eq!(t.code.as_deref(), Some("PACKAGE_SUSPENDED"));
    gw.patched("/v1/packages/31", r#"{"status": "active"}"#);
    assert!(exit_ip(gw.proxy, client(30), target.addr, user, "pk_31_key").is_ok());
    // The data plane records checks 1-5 without their package: the global list has them.
    let errs = gw.get_json("/v1/errors");
    assert_eq!(errs[0]["code"], "PACKAGE_SUSPENDED", "{errs}");
    assert_eq!(errs[1]["code"], "PACKAGE_PAUSED");
}

#[test]
fn a_node_set_offline_gets_no_new_tunnels() {
    let (_s, target, gw) = start("offline", 40);
    for (id, last) in [("de-a", 41), ("de-b", 42)] {
        let body = format!(
            r#"{{"id": "{id}", "kind": "direct", "bind": "127.0.3.{last}", "country": "de"}}"#
        );
        gw.created("/v1/nodes", &body);
    }
    let user = "package-7-country-de";
    let exits = |n: usize| -> Vec<String> {
        (0..n)
            .map(|_| exit_ip(gw.proxy, client(40), target.addr, user, "pk_file_7").unwrap())
            .collect()
    };
    gw.patched("/v1/nodes/de-a", r#"{"state": "offline"}"#);
    let seen = exits(20);
    assert!(seen.iter().all(|e| e == "127.0.3.42"), "{seen:?}");
    assert_eq!(gw.get_json("/v1/nodes/de-a")["state"], "offline");
    let m = gw.metrics();
    assert_eq!(
        sample(&m, "splicegate_nodes{state=\"offline\"}"),
        1.0,
        "{m}"
    );
    gw.patched("/v1/nodes/de-a", r#"{"state": "draining"}"#);
    assert!(
        exits(10).iter().all(|e| e == "127.0.3.42"),
        "draining takes no new tunnels"
    );
    gw.patched("/v1/nodes/de-a", r#"{"state": "online"}"#);
    let seen = exits(30);
    assert!(
        seen.iter().any(|e| e == "127.0.3.41"),
        "back online: {seen:?}"
    );
}

#[test]
fn metrics_move_with_traffic() {
    let (_s, target, gw) = start("metrics", 50);
    let before = gw.metrics();
    for series in [
        "splicegate_requests_total{protocol=\"https\",code=\"OK\"}",
        "splicegate_open_tunnels{worker=\"0\"}",
        "splicegate_open_connections{worker=\"0\"}",
        "splicegate_tunnel_setup_seconds_count",
        "splicegate_sessions",
        "splicegate_nodes{state=\"online\"}",
        "splicegate_store_flush_seconds_count",
        "splicegate_access_log_dropped_total",
        "splicegate_node_health_changes_total",
    ] {
        assert!(
            before.contains(series) || series.ends_with("changes_total"),
            "{series} missing:\n{before}"
        );
    }
    for _ in 0..5 {
        exit_ip(
            gw.proxy,
            client(50),
            target.addr,
            "package-7-country-us-session-m1",
            "pk_file_7",
        )
        .unwrap();
    }
    let t = connect(
        gw.proxy,
        client(50),
        target.addr,
        "package-7-country-us",
        "wrong",
    );
    assert_eq!(t.status, 407);
    let after = eventually(Duration::from_secs(5), Duration::from_millis(50), || {
        let m = gw.metrics();
        (sample(&m, "splicegate_relayed_bytes_total{direction=\"down\"}") > 0.0).then_some(m)
    })
    .expect("bytes counted");
    let d = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(
        d("splicegate_requests_total{protocol=\"https\",code=\"OK\"}"),
        5.0,
        "{after}"
    );
    assert_eq!(
        d("splicegate_requests_total{protocol=\"https\",code=\"AUTH_FAILED\"}"),
        1.0
    );
    assert_eq!(d("splicegate_tunnel_setup_seconds_count"), 5.0);
    assert!(d("splicegate_relayed_bytes_total{direction=\"up\"}") >= 5.0 * 40.0);
    assert!(d("splicegate_relayed_bytes_total{direction=\"down\"}") >= 5.0 * 60.0);
    assert!(d("splicegate_accepted_connections_total{worker=\"0\"}") >= 6.0);
    assert_eq!(sample(&after, "splicegate_sessions"), 1.0);
    assert!(sample(&after, "splicegate_store_flush_seconds_count") >= 1.0);
    assert!(
        !after.contains("package=") && !after.contains("session="),
        "no ids as labels"
    );
}

#[test]
fn a_reload_keeps_the_apis_objects_and_refuses_a_bad_file() {
    let (s, target, mut gw) = start("reload", 60);
    gw.created("/v1/packages", r#"{"id": 61, "key": "pk_61_key"}"#);
    // A broken file: refused, the running policy stays.
    gw.reload(&conf(&s, ip(60), NO_PROBES, 100.0).replace("org = \"acme\"", "org = \"gone\""));
    assert!(
        eventually(Duration::from_secs(5), Duration::from_millis(50), || gw
            .log()
            .contains("rejected")
            .then_some(()))
        .is_some(),
        "{}",
        gw.log_tail(5)
    );
    assert!(
        exit_ip(
            gw.proxy,
            client(60),
            target.addr,
            "package-7-country-us",
            "pk_file_7"
        )
        .is_ok()
    );
    // A good file with a new key for 7 and a new org: the API's package 61 stays.
    let good = conf(&s, ip(60), NO_PROBES, 100.0).replace("pk_file_7", "pk_file_7b")
        + "\n[[org]]\nid = \"delta\"\ncredits = 3.0\n";
    gw.reload(&good);
    let swapped = eventually(Duration::from_secs(5), Duration::from_millis(50), || {
        exit_ip(
            gw.proxy,
            client(60),
            target.addr,
            "package-7-country-us",
            "pk_file_7b",
        )
        .is_ok()
        .then_some(())
    });
    assert!(swapped.is_some(), "{}", gw.log_tail(5));
    assert!(
        exit_ip(
            gw.proxy,
            client(60),
            target.addr,
            "package-61-country-us",
            "pk_61_key"
        )
        .is_ok()
    );
    assert_eq!(gw.get_json("/v1/orgs/delta")["balance"], 3.0);
}
