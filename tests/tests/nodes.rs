//! Node failures and what `onerror` does with them: nodes stopped mid-test
//! (our test nodes, tinyproxy and microsocks processes), misbehaving nodes,
//! `replace`, `fail`, `retry_N`, `bind-node`, `prefer-lookalike`, and
//! `NODE_NOT_FOUND`.

use std::collections::HashSet;
use std::time::Duration;

use splicegate_tests::*;

/// Two of our HTTP nodes, both us/new_york/verizon_wireless/701.
fn two_http_nodes() -> (TestNode, TestNode, Conf) {
    let a = TestNode::http(node_ip());
    let b = TestNode::http(node_ip());
    let conf = Conf::with_package(KEY)
        .node(NodeDecl::http("na", a.addr()))
        .node(NodeDecl::http("nb", b.addr()));
    (a, b, conf)
}

/// Which of `nodes` has `ip`.
fn which(nodes: &[&TestNode], ip: &str) -> usize {
    nodes
        .iter()
        .position(|n| n.ip().to_string() == ip)
        .unwrap_or_else(|| panic!("{ip} is none of the nodes"))
}

#[test]
fn onerror_replace_moves_the_session_to_another_node() {
    let web = HttpTarget::start();
    let echo = TcpEcho::start();
    let (a, b, conf) = two_http_nodes();
    let mut nodes = [a, b];
    let gw = Gateway::start_conf(&conf);
    let src = client_ip();
    let rules = "country-us-session-rep1";
    let first = gw.exit_ok(src, &web.url("/ip"), rules);
    let i = which(&[&nodes[0], &nodes[1]], &first);
    let mut tunnel = gw.tunnel(src, echo.addr(), rules);
    tunnel.echo_round_trip(b"before").unwrap();

    nodes[i].stop();
    // The tunnel through the stopped node ends.
    assert!(
        tunnel.closed_within(Duration::from_secs(3)).is_some(),
        "a tunnel through a dead node is closed"
    );
    let second = gw.exit_ok(src, &web.url("/ip"), rules);
    assert_eq!(
        second,
        nodes[1 - i].ip().to_string(),
        "replaced by the other node"
    );
    // The replacement is bound to the session, even once the old node is back.
    nodes[i].start();
    for _ in 0..3 {
        assert_eq!(gw.exit_ok(src, &web.url("/ip"), rules), second);
    }
}

#[test]
fn onerror_replace_with_no_other_node_is_node_not_found() {
    let web = HttpTarget::start();
    let mut a = TestNode::http(node_ip());
    let gw = Gateway::start_conf(&Conf::with_package(KEY).node(NodeDecl::http("lonely", a.addr())));
    let src = client_ip();
    gw.exit_ok(src, &web.url("/ip"), "country-us-session-alone");
    a.stop();
    let r = gw
        .exit_ip(src, &web.url("/ip"), "country-us-session-alone")
        .expect_err("its only node is down");
    assert_error(&r, 502, "NODE_NOT_FOUND", &[]);
}

#[test]
fn onerror_fail_answers_node_unavailable_and_keeps_the_node() {
    let web = HttpTarget::start();
    let (a, b, conf) = two_http_nodes();
    let mut nodes = [a, b];
    let gw = Gateway::start_conf(&conf);
    let src = client_ip();
    let rules = "country-us-session-fail1-onerror-fail";
    let first = gw.exit_ok(src, &web.url("/ip"), rules);
    let i = which(&[&nodes[0], &nodes[1]], &first);
    nodes[i].stop();
    let r = gw
        .exit_ip(src, &web.url("/ip"), rules)
        .expect_err("node down, onerror-fail");
    assert_error(
        &r,
        502,
        "NODE_UNAVAILABLE",
        &[if i == 0 { "na" } else { "nb" }],
    );
    assert_eq!(
        nodes[1 - i].requests_to_port(web.addr().port()),
        0,
        "onerror-fail never tries another node"
    );
    nodes[i].start();
    assert_eq!(
        gw.exit_ok(src, &web.url("/ip"), rules),
        first,
        "the session kept its node"
    );
}

#[test]
fn onerror_retry_tries_the_same_node_n_more_times_then_replaces() {
    let web = HttpTarget::start();
    let (a, b, conf) = two_http_nodes();
    let nodes = [a, b];
    let gw = Gateway::start_conf(&conf);
    let src = client_ip();
    let port = web.addr().port();

    // 1. A session on some node X; X starts dropping requests.
    let rules = "country-us-session-retry1-onerror-retry_2";
    let first = gw.exit_ok(src, &web.url("/ip"), rules);
    let x = which(&[&nodes[0], &nodes[1]], &first);
    let before = nodes[x].requests_to_port(port);
    nodes[x].set(Behavior::CloseAfterRequest);
    // 2. The next request: X three times (1 + 2 retries), then Y, which works.
    let second = gw.exit_ok(src, &web.url("/ip"), rules);
    assert_eq!(second, nodes[1 - x].ip().to_string());
    assert_eq!(
        nodes[x].requests_to_port(port) - before,
        3,
        "1 try + 2 retries on X"
    );

    // 3. Another session: both nodes drop requests → RETRIES_EXHAUSTED.
    nodes[x].set(Behavior::Normal);
    let rules = "country-us-session-retry2-onerror-retry_1";
    let first = gw.exit_ok(src, &web.url("/ip"), rules);
    let x = which(&[&nodes[0], &nodes[1]], &first);
    let (bx, by) = (
        nodes[x].requests_to_port(port),
        nodes[1 - x].requests_to_port(port),
    );
    nodes[0].set(Behavior::CloseAfterRequest);
    nodes[1].set(Behavior::CloseAfterRequest);
    let r = gw
        .exit_ip(src, &web.url("/ip"), rules)
        .expect_err("both nodes fail");
    assert_error(&r, 502, "RETRIES_EXHAUSTED", &[]);
    assert_eq!(
        nodes[x].requests_to_port(port) - bx,
        2,
        "1 try + 1 retry on X"
    );
    assert_eq!(
        nodes[1 - x].requests_to_port(port) - by,
        1,
        "the replacement is tried once"
    );
}

#[test]
fn bind_node_never_replaces_its_node() {
    let web = HttpTarget::start();
    let (a, b, conf) = two_http_nodes();
    let mut nodes = [a, b];
    let gw = Gateway::start_conf(&conf);
    let src = client_ip();
    let port = web.addr().port();

    let rules = "country-us-session-bound1-bind-node";
    let first = gw.exit_ok(src, &web.url("/ip"), rules);
    let x = which(&[&nodes[0], &nodes[1]], &first);
    let other_before = nodes[1 - x].requests_to_port(port);
    nodes[x].stop();
    let r = gw
        .exit_ip(src, &web.url("/ip"), rules)
        .expect_err("bound node down");
    assert_error(&r, 503, "BOUND_NODE_FAILED", &["session"]);
    assert_eq!(
        nodes[1 - x].requests_to_port(port),
        other_before,
        "never replaced"
    );
    // A new session id gets a new node. Selection may still pick the dead
    // node for a fresh bound session (then that session fails the same
    // way), but a few new ids must find the working one.
    let mut ok = 0;
    for s in 0..6 {
        match gw.exit_ip(
            src,
            &web.url("/ip"),
            &format!("country-us-session-bnew{s}-bind-node"),
        ) {
            Ok(ip) => {
                assert_eq!(ip, nodes[1 - x].ip().to_string());
                ok += 1;
            }
            Err(r) => assert_error(&r, 503, "BOUND_NODE_FAILED", &[]),
        }
    }
    assert!(ok >= 1, "6 new session ids all landed on the dead node");
    // Back up: the bound session works again on its node.
    nodes[x].start();
    assert_eq!(gw.exit_ok(src, &web.url("/ip"), rules), first);

    // bind-node with retries: 1 + 2 attempts on the node, then 503.
    let rules = "country-us-session-bound3-bind-node-onerror-retry_2";
    let first = gw.exit_ok(src, &web.url("/ip"), rules);
    let x = which(&[&nodes[0], &nodes[1]], &first);
    let before = nodes[x].requests_to_port(port);
    nodes[x].set(Behavior::CloseAfterRequest);
    let r = gw
        .exit_ip(src, &web.url("/ip"), rules)
        .expect_err("bound node drops requests");
    assert_error(&r, 503, "BOUND_NODE_FAILED", &[]);
    assert_eq!(
        nodes[x].requests_to_port(port) - before,
        3,
        "1 try + 2 retries"
    );
}

#[test]
fn rotating_requests_replace_failed_nodes_transparently_up_to_two_more() {
    let web = HttpTarget::start();
    let mut down1 = TestNode::http(node_ip());
    let mut down2 = TestNode::socks5(node_ip());
    let good = TestNode::http(node_ip());
    let gw = Gateway::start_conf(
        &Conf::with_package(KEY)
            .node(NodeDecl::http("down1", down1.addr()))
            .node(NodeDecl::socks5("down2", down2.addr()))
            .node(NodeDecl::http("good", good.addr())),
    );
    down1.stop();
    down2.stop();
    let src = client_ip();
    for _ in 0..8 {
        assert_eq!(
            gw.exit_ok(src, &web.url("/ip"), "country-us"),
            good.ip().to_string(),
            "a failed node is replaced before any byte reached the target"
        );
    }
    // Over CONNECT and SOCKS5 as well.
    for _ in 0..3 {
        let mut t = gw.tunnel(src, web.addr(), "country-us");
        t.send(b"GET /ip HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        assert_eq!(
            t.read_response("GET").unwrap().text().trim(),
            good.ip().to_string()
        );
    }
    let (_c, s) = gw.socks_as(src, &user("country-us"), KEY, web.addr());
    assert_eq!(s, SocksOutcome::Reply(0));

    // All three down: NODE_UNAVAILABLE after three nodes.
    let mut good = good;
    good.stop();
    let r = gw
        .exit_ip(src, &web.url("/ip"), "country-us")
        .expect_err("every node down");
    assert_error(&r, 502, "NODE_UNAVAILABLE", &[]);
}

#[test]
fn what_a_node_answers_maps_to_node_failure_or_target_codes() {
    use Behavior::*;
    use NodeKind::*;
    let web = HttpTarget::start();
    let cases: Vec<(NodeKind, Behavior, &str)> = vec![
        (Http, Answer(502), "TARGET_UNREACHABLE"),
        (Http, Answer(503), "TARGET_UNREACHABLE"),
        (Http, Answer(500), "TARGET_UNREACHABLE"),
        (Http, Answer(504), "GATEWAY_TIMEOUT"),
        (Http, Answer(407), "NODE_UNAVAILABLE"),
        (Http, Answer(403), "NODE_UNAVAILABLE"),
        (Http, CloseImmediately, "NODE_UNAVAILABLE"),
        (Http, CloseAfterRequest, "NODE_UNAVAILABLE"),
        // The node accepted and the CONNECT gets no answer: for an HTTP node
        // that is the target not answering (SPEC 5: "no answer within
        // target_ms after the node accepted").
        (Http, Stall, "GATEWAY_TIMEOUT"),
        (Socks5, Answer(3), "TARGET_UNREACHABLE"),
        (Socks5, Answer(4), "TARGET_UNREACHABLE"),
        (Socks5, Answer(5), "TARGET_UNREACHABLE"),
        (Socks5, Answer(6), "GATEWAY_TIMEOUT"),
        (Socks5, Answer(1), "NODE_UNAVAILABLE"),
        (Socks5, Answer(2), "NODE_UNAVAILABLE"),
        (Socks5, Answer(7), "NODE_UNAVAILABLE"),
        (Socks5, Answer(8), "NODE_UNAVAILABLE"),
        (Socks5, CloseImmediately, "NODE_UNAVAILABLE"),
        // No answer to the greeting within node_connect_ms: a node failure.
        (Socks5, StallHandshake, "NODE_UNAVAILABLE"),
        // The request read, no reply within target_ms: the target is slow.
        (Socks5, Stall, "GATEWAY_TIMEOUT"),
    ];
    // A node whose TCP connect never completes: failure after node_connect_ms.
    let hole = Blackhole::start();
    let mut conf = Conf::with_package(KEY)
        .node(NodeDecl::http("blackholed", hole.addr()).s("city", "city_bh"));
    conf.node_connect_ms = 500;
    conf.target_ms = 1000;
    let mut nodes = Vec::new();
    for (i, (kind, behavior, _)) in cases.iter().enumerate() {
        let n = match kind {
            Http => TestNode::http(node_ip()),
            Socks5 => TestNode::socks5(node_ip()),
        };
        n.set(*behavior);
        let decl = match kind {
            Http => NodeDecl::http(&format!("n{i}"), n.addr()),
            Socks5 => NodeDecl::socks5(&format!("n{i}"), n.addr()),
        };
        conf = conf.node(decl.s("city", &format!("city_{i}")));
        nodes.push(n);
    }
    let gw = Gateway::start_conf(&conf);
    let src = client_ip();
    for (i, (kind, behavior, code)) in cases.iter().enumerate() {
        let rules = format!("country-us-city-city_{i}-onerror-fail");
        let (_c, r) = gw.connect_as(src, &web.addr().to_string(), &user(&rules), KEY, &[]);
        let status = match *code {
            "GATEWAY_TIMEOUT" => 504,
            _ => 502,
        };
        assert_eq!(
            r.status_line,
            format!("HTTP/1.1 {status} {code}"),
            "{kind:?} node answering {behavior:?}: {}{}",
            r.raw_head,
            r.text()
        );
        assert_error(&r, status, code, &[]);
    }
    let t0 = std::time::Instant::now();
    let rules = "country-us-city-city_bh-onerror-fail";
    let (_c, r) = gw.connect_as(src, &web.addr().to_string(), &user(rules), KEY, &[]);
    assert_error(&r, 502, "NODE_UNAVAILABLE", &["blackholed"]);
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "node_connect_ms = 500, answered after {:?}",
        t0.elapsed()
    );
}

#[test]
fn node_not_found_names_the_filter() {
    let web = HttpTarget::start();
    let gw = Gateway::start_conf(
        &Conf::with_package(KEY)
            .node(NodeDecl::direct("d1", node_ip()))
            .node(
                NodeDecl::direct("off", node_ip())
                    .s("city", "boston")
                    .s("state", "offline"),
            )
            .node(
                NodeDecl::direct("drain", node_ip())
                    .s("city", "denver")
                    .s("state", "draining"),
            ),
    );
    let src = client_ip();
    let t = web.addr().to_string();
    let cases: &[(&str, &[&str])] = &[
        ("country-gb", &["gb"]),
        // In the [geo] catalogue, no node there.
        ("country-us-city-chicago", &["chicago"]),
        ("country-us-asn-9999", &["9999"]),
        ("network-mob", &["mob"]),
        // Known from an offline node: NODE_NOT_FOUND, not a 400.
        ("country-us-city-boston", &["boston"]),
        // A draining node takes no new session or rotating request.
        ("country-us-city-denver", &["denver"]),
        ("country-us-city-denver-session-dr1", &["denver"]),
    ];
    for (rules, needles) in cases {
        let (_c, r) = gw.connect_as(src, &t, &user(rules), KEY, &[]);
        assert_error(&r, 502, "NODE_NOT_FOUND", needles);
    }
}

#[test]
fn prefer_lookalike_replaces_with_a_node_of_the_same_city_and_isp() {
    let web = HttpTarget::start();
    let mut twins = [TestNode::http(node_ip()), TestNode::http(node_ip())];
    let mut conf = Conf::with_package(KEY)
        .node(NodeDecl::http("twin0", twins[0].addr()))
        .node(NodeDecl::http("twin1", twins[1].addr()));
    for i in 0..6 {
        conf = conf.node(
            NodeDecl::direct(&format!("other{i}"), node_ip())
                .s("city", "chicago")
                .s("isp", "comcast")
                .set("asn", "7922"),
        );
    }
    let gw = Gateway::start_conf(&conf);
    let src = client_ip();
    let twin_ips: Vec<String> = twins.iter().map(|t| t.ip().to_string()).collect();
    // Three rounds: with 6 unlike nodes, a random replacement would be the
    // twin in 1 of 7 rounds.
    for round in 0..3 {
        // 1. Find a session that starts on a twin.
        let mut found = None;
        for s in 0..80 {
            let rules = format!("country-us-session-look{round}x{s}-prefer-lookalike");
            let ip = gw.exit_ok(src, &web.url("/ip"), &rules);
            if let Some(i) = twin_ips.iter().position(|t| *t == ip) {
                found = Some((rules, i));
                break;
            }
        }
        let (rules, i) = found.expect("no session landed on a twin in 80 tries");
        // 2. Its node dies: the replacement is the other twin.
        twins[i].stop();
        let ip = gw.exit_ok(src, &web.url("/ip"), &rules);
        assert_eq!(
            ip,
            twin_ips[1 - i],
            "round {round}: the lookalike replaces the node"
        );
        twins[i].start();
    }
}

#[test]
fn third_party_node_processes_stopped_mid_test_are_replaced() {
    let web = HttpTarget::start();
    let mut tp = Tinyproxy::start(node_ip());
    let mut ms = Microsocks::start(node_ip(), Some(("mu", "mp")));
    let gw = Gateway::start_conf(
        &Conf::with_package(KEY)
            .node(NodeDecl::http("tiny", tp.addr()))
            .node(NodeDecl::socks5("micro", ms.addr()).creds("mu", "mp")),
    );
    let src = client_ip();
    let rules = "country-us-session-third1";
    let first = gw.exit_ok(src, &web.url("/ip"), rules);
    let (tp_ip, ms_ip) = (tp.addr().ip().to_string(), ms.addr().ip().to_string());
    let expected = if first == tp_ip {
        tp.stop();
        ms_ip
    } else {
        assert_eq!(first, ms_ip);
        ms.stop();
        tp_ip
    };
    assert_eq!(gw.exit_ok(src, &web.url("/ip"), rules), expected);
    let all: HashSet<String> = (0..4)
        .map(|_| gw.exit_ok(src, &web.url("/ip"), "country-us"))
        .collect();
    assert_eq!(
        all,
        HashSet::from([expected]),
        "rotating requests avoid the dead node"
    );
}

#[test]
fn every_targeting_rule_selects_only_matching_nodes() {
    let web = HttpTarget::start();
    let ny = node_ip();
    let la = node_ip();
    let gb = node_ip();
    let dc = node_ip();
    let gw = Gateway::start_conf(
        &Conf::with_package(KEY)
            .node(NodeDecl::direct("ny", ny).s("region", "new_york"))
            .node(
                NodeDecl::direct("la", la)
                    .s("region", "california")
                    .s("city", "los_angeles")
                    .s("isp", "t_mobile")
                    .set("asn", "21928")
                    .s("network", "mob"),
            )
            .node(
                NodeDecl::direct("gb", gb)
                    .s("country", "gb")
                    .s("city", "london")
                    .s("isp", "bt")
                    .set("asn", "2856"),
            )
            .node(
                NodeDecl::direct("dc", dc)
                    .s("country", "de")
                    .s("city", "frankfurt")
                    .s("isp", "hetzner")
                    .set("asn", "24940")
                    .s("network", "dc"),
            ),
    );
    let src = client_ip();
    let cases: Vec<(&str, HashSet<String>)> = vec![
        (
            "country-us",
            HashSet::from([ny.to_string(), la.to_string()]),
        ),
        ("country-gb", HashSet::from([gb.to_string()])),
        (
            "country-us-region-california",
            HashSet::from([la.to_string()]),
        ),
        ("country-us-city-new_york", HashSet::from([ny.to_string()])),
        ("country-gb-city-london", HashSet::from([gb.to_string()])),
        ("isp-bt", HashSet::from([gb.to_string()])),
        ("country-us-isp-t_mobile", HashSet::from([la.to_string()])),
        ("asn-24940", HashSet::from([dc.to_string()])),
        ("network-mob", HashSet::from([la.to_string()])),
        ("network-dc", HashSet::from([dc.to_string()])),
        (
            "country-any-network-res",
            HashSet::from([ny.to_string(), gb.to_string()]),
        ),
    ];
    for (rules, allowed) in &cases {
        for _ in 0..6 {
            let ip = gw.exit_ok(src, &web.url("/ip"), rules);
            assert!(
                allowed.contains(&ip),
                "{rules} exited from {ip}, allowed {allowed:?}"
            );
        }
    }
    // A name known in another country only.
    let r = gw
        .exit_ip(src, &web.url("/ip"), "country-us-city-london")
        .expect_err("london is in gb");
    assert_eq!(r.status, 400, "{}", r.raw_head);
    // Uppercase letters are allowed in a session id.
    gw.exit_ok(src, &web.url("/ip"), "country-us-session-MiXeD_Case9");
}
