//! Node health against the real binary: probes take a failing node out of
//! selection and bring it back when it recovers; failures of real traffic
//! take a node out until a probe succeeds.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use splicegate_tests::nodes::TestNode;
use splicegate_tests::ops::*;
use splicegate_tests::targets::Acceptor;
use splicegate_tests::{Gateway, eventually};

/// A TCP listener that accepts and closes every connection at once: enough
/// for a TCP-connect probe, and a node failure for real traffic.
struct Closer {
    addr: SocketAddr,
    _acceptor: Acceptor,
}

impl Closer {
    fn start(addr: SocketAddr) -> Closer {
        let l = TcpListener::bind(addr).expect("bind the node's listener");
        let acceptor = Acceptor::spawn(l, Arc::new(drop));
        Closer {
            addr: acceptor.addr(),
            _acceptor: acceptor,
        }
    }
}

/// [`Setup::head`] with `health`, package 7 (`pk_health`) and one node
/// (`node`: its lines of TOML).
fn conf(s: &Setup, health: &str, node: &str) -> String {
    format!(
        "{}\n[[package]]\nid = 7\nkey = \"pk_health\"\n\n[[node]]\n{node}",
        s.head(health)
    )
}

fn healthy(gw: &Gateway, node: &str) -> Option<bool> {
    let (st, v) = gw.get(&format!("/v1/nodes/{node}"));
    (st == 200).then(|| v["healthy"].as_bool().unwrap_or(false))
}

fn wait_health(gw: &Gateway, node: &str, want: bool, within: Duration) {
    let ok = eventually(within, Duration::from_millis(50), || {
        (healthy(gw, node) == Some(want)).then_some(())
    });
    assert!(
        ok.is_some(),
        "node {node} not healthy={want} within {within:?}:\n{}",
        gw.log_tail(15)
    );
}

#[test]
fn a_direct_node_whose_probe_target_dies_goes_offline_and_comes_back() {
    let s = Setup::new("health-direct");
    let mut canary = IpEcho::start(local(0)).unwrap();
    let port = canary.addr.port();
    let target = IpEcho::start(local(0)).unwrap();
    let toml = conf(
        &s,
        &format!("probe_target = \"127.0.0.1:{port}\"\ninterval_s = 1\nfailures = 2"),
        "id = \"h-direct\"\nkind = \"direct\"\nbind = \"127.0.3.70\"\ncountry = \"fr\"\n",
    );
    let gw = s.start(&toml);
    let user = "package-7-country-fr";
    let src = Ipv4Addr::new(127, 0, 4, 70);
    assert_eq!(
        exit_ip(gw.proxy, src, target.addr, user, "pk_health").as_deref(),
        Ok("127.0.3.70")
    );
    // A probe ran (healthy is also the state before any probe).
    let probed = eventually(Duration::from_secs(4), Duration::from_millis(50), || {
        (sample(&gw.metrics(), "splicegate_health_probes_total") >= 1.0).then_some(())
    });
    assert!(probed.is_some(), "no probe ran:\n{}", gw.log_tail(10));
    assert_eq!(
        sample(&gw.metrics(), "splicegate_health_probes_failed_total"),
        0.0,
        "probes pass while the canary lives"
    );
    assert_eq!(healthy(&gw, "h-direct"), Some(true));

    // 1. The probe target dies: two failed probes take the node out.
    canary.stop();
    wait_health(&gw, "h-direct", false, Duration::from_secs(10));
    assert_eq!(gw.get("/v1/nodes/h-direct").1["state"], "offline");
    assert_eq!(
        exit_ip(gw.proxy, src, target.addr, user, "pk_health"),
        Err("NODE_NOT_FOUND".into())
    );
    let m = gw.metrics();
    assert_eq!(
        sample(&m, "splicegate_node_health_changes_total{to=\"out\"}"),
        1.0,
        "{m}"
    );
    assert!(sample(&m, "splicegate_health_probes_failed_total") >= 2.0);
    assert!(gw.log().contains("node taken out of selection"));

    // 2. It comes back: one good probe brings the node back.
    let _canary = IpEcho::start(local(port)).expect("rebind the canary's port");
    wait_health(&gw, "h-direct", true, Duration::from_secs(10));
    assert_eq!(
        exit_ip(gw.proxy, src, target.addr, user, "pk_health").as_deref(),
        Ok("127.0.3.70")
    );
    let m = gw.metrics();
    assert_eq!(
        sample(&m, "splicegate_node_health_changes_total{to=\"in\"}"),
        1.0
    );
    assert!(gw.log().contains("node healthy again"));
}

#[test]
fn an_http_node_that_stops_listening_is_taken_out_and_brought_back() {
    let s = Setup::new("health-http");
    let node = Closer::start(SocketAddr::from(([127, 0, 3, 71], 0)));
    let node_addr = node.addr;
    let toml = conf(
        &s,
        "interval_s = 1\nfailures = 2",
        &format!("id = \"h-http\"\nkind = \"http\"\naddr = \"{node_addr}\"\ncountry = \"it\"\n"),
    );
    let gw = s.start(&toml);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(healthy(&gw, "h-http"), Some(true));
    drop(node);
    wait_health(&gw, "h-http", false, Duration::from_secs(10));
    let _node = Closer::start(node_addr);
    wait_health(&gw, "h-http", true, Duration::from_secs(10));
}

#[test]
fn failures_of_real_traffic_take_a_node_out_until_a_probe_succeeds() {
    let s = Setup::new("health-passive");
    // Accepts, then closes before answering: a node failure for traffic,
    // a success for a TCP-connect probe.
    let node = Closer::start(SocketAddr::from(([127, 0, 3, 72], 0)));
    let target = IpEcho::start(local(0)).unwrap();
    let toml = conf(
        &s,
        "interval_s = 3\nfailures = 2",
        &format!(
            "id = \"h-flaky\"\nkind = \"http\"\naddr = \"{addr}\"\ncountry = \"es\"\n",
            addr = node.addr
        ),
    );
    let gw = s.start(&toml);
    let src = Ipv4Addr::new(127, 0, 4, 72);
    for _ in 0..2 {
        let r = exit_ip(
            gw.proxy,
            src,
            target.addr,
            "package-7-country-es-onerror-fail",
            "pk_health",
        );
        assert_eq!(r, Err("NODE_UNAVAILABLE".into()));
    }
    let out = eventually(Duration::from_secs(5), Duration::from_millis(50), || {
        gw.log().contains("failures of real traffic").then_some(())
    });
    assert!(out.is_some(), "{}", gw.log_tail(10));
    let back = eventually(Duration::from_secs(10), Duration::from_millis(50), || {
        let m = gw.metrics();
        (sample(&m, "splicegate_node_health_changes_total{to=\"in\"}") >= 1.0).then_some(())
    });
    assert!(
        back.is_some(),
        "a passing probe brings it back:\n{}",
        gw.log_tail(10)
    );
    assert_eq!(healthy(&gw, "h-flaky"), Some(true));
    // The failures already answered do not take it out again by themselves.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(healthy(&gw, "h-flaky"), Some(true));
}

/// How many of `n` rotating CONNECTs left through `node_ip`.
fn share(gw: &Gateway, src: Ipv4Addr, target: SocketAddr, node_ip: &str, n: usize) -> usize {
    (0..n)
        .filter(|_| {
            exit_ip(gw.proxy, src, target, "package-7-country-us", "pk_health").as_deref()
                == Ok(node_ip)
        })
        .count()
}

#[test]
fn a_node_that_failed_once_gets_its_share_back() {
    // 1. Two HTTP nodes; probes every second (a TCP connect to the node).
    // 2. Node A stops: rotating requests fail over to B until one has
    //    recorded a failure of A.
    // 3. A starts again on its port; a probe passes.
    // 4. A's share of 1,000 rotating requests is 50 % ± 5 %: an old failure
    //    never starves a node that probes healthy.
    let s = Setup::new("health-share");
    let mut a = TestNode::http(Ipv4Addr::new(127, 0, 1, 81));
    let b = TestNode::http(Ipv4Addr::new(127, 0, 1, 82));
    let target = IpEcho::start(local(0)).unwrap();
    let node = |id: &str, n: &TestNode| {
        format!(
            "id = \"{id}\"\nkind = \"http\"\naddr = \"{}\"\ncountry = \"us\"\n",
            n.addr()
        )
    };
    let nodes = format!("{}\n[[node]]\n{}", node("share-a", &a), node("share-b", &b));
    let toml = conf(&s, "interval_s = 1\nfailures = 3", &nodes);
    let gw = s.start(&toml);
    let src = Ipv4Addr::new(127, 0, 4, 81);
    a.stop();
    let failed = eventually(Duration::from_secs(10), Duration::from_millis(10), || {
        assert_eq!(
            exit_ip(
                gw.proxy,
                src,
                target.addr,
                "package-7-country-us",
                "pk_health"
            )
            .as_deref(),
            Ok("127.0.1.82"),
            "B serves while A is down"
        );
        let (_, v) = gw.get("/v1/nodes/share-a");
        (v["recent_failures"].as_u64() > Some(0)).then_some(())
    });
    assert!(failed.is_some(), "no request ever tried A");
    a.start();
    // A probe round passes within two intervals.
    let probed = eventually(Duration::from_secs(5), Duration::from_millis(100), || {
        let (_, v) = gw.get("/v1/nodes/share-a");
        (v["recent_failures"].as_u64() == Some(0)).then_some(())
    });
    assert!(
        probed.is_some(),
        "A's failure was never cleared:\n{}",
        gw.log_tail(10)
    );
    let n = 1000;
    let through_a = share(&gw, src, target.addr, "127.0.1.81", n);
    assert!(
        (450..=550).contains(&through_a),
        "A carried {through_a} of {n} rotating requests after it recovered"
    );
    drop(b);
}
