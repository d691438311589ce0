//! Nodes that die, stall, or never answer (scripts/faults/nodes.sh,
//! scripts/faults/blackhole.sh).

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use splicegate_tests::canary::{Canary, percentile};
use splicegate_tests::faults::*;
use splicegate_tests::*;

/// A node killed mid-tunnel (its listener closed and every connection
/// dropped, as the kernel does for a killed process): every tunnel through
/// it ends within a second; afterwards each session's `onerror` decides
/// (replace → the other node, fail → 502 NODE_UNAVAILABLE, bind-node → 503
/// BOUND_NODE_FAILED, retry_2 → the other node after the retries), each
/// within the configured timeouts; a client on another node never notices.
#[test]
fn node_killed_mid_tunnel() {
    let _one = one_at_a_time();
    let source = Source::start(16 * 1024, Duration::from_millis(10), None);
    let mut n1 = TestNode::http(node_ip());
    let n2 = TestNode::http(node_ip());
    let lab = NodeLab::start(
        vec![
            (NodeDecl::http("n1", n1.addr()), 1001),
            (NodeDecl::http("n2", n2.addr()), 1002),
        ],
        "",
    );
    let (gw, src, echo) = (&lab.gw, &lab.src, &lab.echo);
    // Sessions that live on n1, one per onerror policy.
    let dallas = "country-us-city-dallas";
    let s_replace = session_on(gw, src.next(), echo.addr(), dallas, "n1", "r");
    let s_fail = session_on(
        gw,
        src.next(),
        echo.addr(),
        &format!("{dallas}-onerror-fail"),
        "n1",
        "f",
    );
    let s_bind = session_on(
        gw,
        src.next(),
        echo.addr(),
        &format!("{dallas}-bind-node"),
        "n1",
        "b",
    );
    let s_retry = session_on(
        gw,
        src.next(),
        echo.addr(),
        &format!("{dallas}-onerror-retry_2"),
        "n1",
        "t",
    );
    // 40 tunnels through n1 (asn 1001 is n1 alone), each streaming.
    let eofs: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(Vec::new()));
    let received = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..40 {
        let (mut c, r) = try_connect(
            gw,
            src.next(),
            source.addr(),
            &user("country-us-asn-1001"),
            KEY,
            &[],
        )
        .expect("tunnel");
        assert_eq!(r.status, 200, "{}", r.raw_head);
        let (eofs, received) = (eofs.clone(), received.clone());
        readers.push(std::thread::spawn(move || {
            c.set_timeout(Duration::from_secs(20));
            let mut buf = vec![0u8; 65536];
            let end = loop {
                match c.stream.read(&mut buf) {
                    Ok(0) | Err(_) => break Some(Instant::now()),
                    Ok(n) => {
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            };
            eofs.lock().unwrap().push(end);
        }));
    }
    let canary = Canary::start(lab.plan.clone());
    std::thread::sleep(Duration::from_millis(800));
    let before = received.load(Ordering::Relaxed);
    let killed = Instant::now();
    n1.stop();
    for r in readers {
        r.join().unwrap();
    }
    let ends: Vec<Duration> = eofs
        .lock()
        .unwrap()
        .iter()
        .map(|e| {
            e.map_or(Duration::from_secs(99), |t| {
                t.saturating_duration_since(killed)
            })
        })
        .collect();
    let worst = ends.iter().max().copied().unwrap_or_default();
    // Each policy, on the next request.
    let mut answers = Vec::new();
    for (what, rules) in [
        ("replace", &s_replace),
        ("fail", &s_fail),
        ("bind-node", &s_bind),
        ("retry_2", &s_retry),
        ("asn-1001, rotating", &"country-us-asn-1001".to_string()),
    ] {
        let (got, took) = outcome(gw, src.next(), echo.addr(), rules);
        answers.push((what, got, took));
    }
    std::thread::sleep(Duration::from_millis(500));
    let rep = canary.stop();
    figure(format!(
        "node killed mid-tunnel: 40 tunnels ({before} bytes streamed before the kill) all ended within {} of the kill (each: min {}, median {})",
        ms(worst),
        ms(*ends.iter().min().unwrap()),
        ms(percentile(&ends, 50.0))
    ));
    for (what, got, took) in &answers {
        figure(format!(
            "node killed: next request of a session with {what}: {got} in {}",
            ms(*took)
        ));
    }
    assert!(
        worst <= Duration::from_secs(1),
        "a tunnel outlived its node by {worst:?}"
    );
    let get = |w: &str| answers.iter().find(|a| a.0 == w).unwrap();
    assert_eq!(get("replace").1, "200 n2", "onerror replace");
    assert_eq!(get("fail").1, "NODE_UNAVAILABLE", "onerror fail");
    assert_eq!(get("bind-node").1, "BOUND_NODE_FAILED", "bind-node");
    assert_eq!(get("retry_2").1, "200 n2", "retry_2, then replaced");
    assert!(
        ["NODE_UNAVAILABLE", "NODE_NOT_FOUND"].contains(&get("asn-1001, rotating").1.as_str()),
        "the only node of asn 1001 is gone: {}",
        get("asn-1001, rotating").1
    );
    for (what, _, took) in &answers {
        // A refused connect is immediate; the retries of retry_2 too.
        assert!(*took < Duration::from_secs(2), "{what} took {took:?}");
    }
    lab.check_canary("node killed", &rep, 20, "a node kill");
}

/// A node that accepts and then stalls: an HTTP node that reads the CONNECT
/// and never answers is a slow target (504 GATEWAY_TIMEOUT at target_ms);
/// a SOCKS5 node that never answers the greeting is a node failure at
/// node_connect_ms, which onerror decides. 30 such requests at once block
/// no worker: a client on another node keeps its latency.
#[test]
fn node_accepts_then_stalls() {
    let _one = one_at_a_time();
    let stall_http = TestNode::http(node_ip());
    stall_http.set(Behavior::Stall);
    let stall_socks = TestNode::socks5(node_ip());
    stall_socks.set(Behavior::StallHandshake);
    let good = TestNode::socks5(node_ip());
    let lab = NodeLab::start(
        vec![
            (NodeDecl::http("stall-http", stall_http.addr()), 2001),
            (NodeDecl::socks5("stall-socks", stall_socks.addr()), 2002),
            (NodeDecl::socks5("good", good.addr()), 2003),
        ],
        "",
    );
    let canary = Canary::start(lab.plan.clone());
    // (what, rules, the outcomes it may have)
    let cases: [(&str, &str, &[&str]); 4] = [
        (
            "HTTP node stalls after the CONNECT",
            "country-us-asn-2001",
            &["GATEWAY_TIMEOUT"],
        ),
        (
            "SOCKS5 node stalls before its greeting, onerror-fail",
            "country-us-asn-2002-onerror-fail",
            &["NODE_UNAVAILABLE"],
        ),
        (
            "SOCKS5 node stalls, onerror-retry_1",
            "country-us-asn-2002-onerror-retry_1",
            &["RETRIES_EXHAUSTED", "NODE_NOT_FOUND", "NODE_UNAVAILABLE"],
        ),
        // Rotating requests over dallas: whichever node is picked, a stalled
        // SOCKS5 node is replaced; a stalled HTTP node is a slow target.
        (
            "rotating over all three",
            "country-us-city-dallas",
            &["200 good", "GATEWAY_TIMEOUT"],
        ),
    ];
    let rows: Vec<(&str, &str)> = cases.iter().map(|c| (c.0, c.1)).collect();
    let results = lab.at_once(&rows, 10);
    let rep = canary.stop();
    let mut bad = Vec::new();
    for (what, _, want) in &cases {
        let (n, gots, min, max) = summary(&results, what);
        figure(format!(
            "node stalls: {what}: {n} requests → {gots:?}, time min {} max {}",
            ms(min),
            ms(max)
        ));
        for got in gots.iter().filter(|g| !want.contains(&g.as_str())) {
            bad.push(format!("{what}: got {got}, want one of {want:?}"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    // Within the configured timeouts (node_connect 1 s, target 2 s; retry_1:
    // two connects of 1 s) plus scheduling slack: 2 s + 1 s + 0.8 s, the
    // same bound for every case.
    let bound = Duration::from_millis(2000 + 1000 + 800);
    for (what, got, took) in &results {
        assert!(
            *took <= bound,
            "{what}: {got} after {took:?} (bound {bound:?})"
        );
    }
    lab.check_canary("node stalls", &rep, 20, "stalled nodes");
}

/// A node behind a blackhole: SYNs to it are dropped. By default the hole
/// is a loopback listener whose accept queue is full ([`Blackhole`]);
/// scripts/faults/blackhole.sh makes a network namespace whose veth end
/// drops every packet and passes its address in `SG_BLACKHOLE_ADDR`, a
/// hole that also drops retransmissions and RSTs. Every policy's
/// answer comes within the configured timeouts; no worker blocks.
#[test]
fn blackholed_node() {
    let _one = one_at_a_time();
    let local = Blackhole::start();
    let hole: SocketAddr = std::env::var("SG_BLACKHOLE_ADDR")
        .map(|a| a.parse().expect("SG_BLACKHOLE_ADDR is ip:port"))
        .unwrap_or(local.addr());
    // The blackhole really drops: a connect does not complete.
    assert!(
        TcpStream::connect_timeout(&hole, Duration::from_millis(500)).is_err(),
        "{hole} answers: not a blackhole"
    );
    let good = TestNode::http(node_ip());
    let lab = NodeLab::start(
        vec![
            (NodeDecl::http("hole", hole), 3001),
            (NodeDecl::http("good", good.addr()), 3002),
        ],
        "[log]\nlevel = \"debug\"\n",
    );
    let canary = Canary::start(lab.plan.clone());
    // (what, rules, the outcomes it may have, the connect budget)
    let cases: [(&str, &str, &[&str], Duration); 5] = [
        (
            "only the blackholed node, onerror-fail",
            "country-us-asn-3001-onerror-fail",
            &["NODE_UNAVAILABLE", "NODE_NOT_FOUND"],
            Duration::from_millis(1000),
        ),
        (
            "only the blackholed node, replace",
            "country-us-asn-3001",
            &["NODE_NOT_FOUND", "NODE_UNAVAILABLE"],
            Duration::from_millis(1000),
        ),
        (
            "only the blackholed node, retry_2",
            "country-us-asn-3001-onerror-retry_2",
            &["RETRIES_EXHAUSTED", "NODE_NOT_FOUND", "NODE_UNAVAILABLE"],
            Duration::from_millis(3000),
        ),
        (
            "only the blackholed node, bind-node",
            "country-us-asn-3001-session-bh-bind-node",
            &["BOUND_NODE_FAILED", "NODE_NOT_FOUND"],
            Duration::from_millis(1000),
        ),
        (
            "both nodes, rotating (replace)",
            "country-us-city-dallas",
            &["200 good"],
            Duration::from_millis(1000),
        ),
    ];
    let rows: Vec<(&str, &str)> = cases.iter().map(|c| (c.0, c.1)).collect();
    let results = lab.at_once(&rows, 6);
    let rep = canary.stop();
    let mut bad = Vec::new();
    for (what, _, want, budget) in &cases {
        let (n, gots, min, max) = summary(&results, what);
        figure(format!(
            "blackholed node: {what}: {n} requests → {gots:?}, time min {} max {} (connect budget {})",
            ms(min),
            ms(max),
            ms(*budget)
        ));
        for (_, got, took) in results.iter().filter(|r| r.0 == *what) {
            if !want.contains(&got.as_str()) {
                bad.push(format!("{what}: got {got}, want one of {want:?}"));
            }
            if *took > *budget + Duration::from_millis(800) {
                bad.push(format!("{what}: {got} after {took:?}, budget {budget:?}"));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    lab.check_canary("blackholed node", &rep, 20, "a blackholed node");
}
