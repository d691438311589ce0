//! Sticky sessions, rotation and the session table, seen through the exit
//! address an [`HttpTarget`] reports.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use splicegate_tests::*;

/// Four direct nodes, all us/new_york; their bind addresses.
fn four_nodes() -> (Conf, Vec<Ipv4Addr>) {
    let ips: Vec<Ipv4Addr> = (0..4).map(|_| node_ip()).collect();
    let mut c = Conf::with_package(KEY);
    for (i, ip) in ips.iter().enumerate() {
        c = c.node(NodeDecl::direct(&format!("d{i}"), ip));
    }
    (c, ips)
}

/// A web target and a gateway on [`four_nodes`], and one client address.
struct Four {
    web: HttpTarget,
    gw: Gateway,
    src: Ipv4Addr,
    ips: Vec<Ipv4Addr>,
}

impl Four {
    fn start() -> Four {
        let web = HttpTarget::start();
        let (conf, ips) = four_nodes();
        let gw = Gateway::start_conf(&conf);
        Four {
            web,
            gw,
            src: client_ip(),
            ips,
        }
    }

    /// The exit of a forwarded `GET /ip` with `rules`.
    fn exit(&self, rules: &str) -> String {
        self.gw.exit_ok(self.src, &self.web.url("/ip"), rules)
    }
}

/// `GET /ip` inside an established tunnel.
fn ip_over_tunnel(c: &mut Conn) -> String {
    c.send(b"GET /ip HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    c.read_response("GET").unwrap().text().trim().to_string()
}

#[test]
fn a_sticky_session_keeps_one_exit_across_protocols() {
    let f = Four::start();
    let (web, gw, src, ips) = (&f.web, &f.gw, f.src, &f.ips);
    let rules = "country-us-session-stick1";
    let first = f.exit(rules);
    assert!(
        ips.iter().any(|ip| ip.to_string() == first),
        "{first} is a node"
    );
    for _ in 0..8 {
        assert_eq!(f.exit(rules), first);
    }
    // The same session through CONNECT and SOCKS5.
    let mut t = gw.tunnel(src, web.addr(), rules);
    assert_eq!(ip_over_tunnel(&mut t), first);
    let (mut c, s) = gw.socks_as(src, &user(rules), KEY, web.addr());
    assert_eq!(s, SocksOutcome::Reply(0));
    assert_eq!(ip_over_tunnel(&mut c), first);
}

#[test]
fn different_session_ids_spread_over_nodes() {
    let f = Four::start();
    let (web, gw, src) = (&f.web, &f.gw, f.src);
    let exits: HashSet<String> = (0..16)
        .map(|i| {
            gw.exit_ok(
                src,
                &web.url("/ip"),
                &format!("country-us-session-spread{i}"),
            )
        })
        .collect();
    assert!(exits.len() >= 2, "16 sessions all on {exits:?}");
}

#[test]
fn rotating_mode_picks_a_node_per_request() {
    let f = Four::start();
    let (web, gw, src) = (&f.web, &f.gw, f.src);
    let exits: Vec<String> = (0..20).map(|_| f.exit("country-us")).collect();
    let distinct: HashSet<&String> = exits.iter().collect();
    assert!(
        distinct.len() >= 3,
        "20 rotating requests used only {distinct:?}"
    );

    // Rotating CONNECT tunnels too.
    let tunnels: HashSet<String> = (0..12)
        .map(|_| ip_over_tunnel(&mut gw.tunnel(src, web.addr(), "country-us")))
        .collect();
    assert!(
        tunnels.len() >= 2,
        "12 rotating tunnels used only {tunnels:?}"
    );
}

#[test]
fn rotate_requests_changes_node_every_n_requests() {
    let f = Four::start();
    let rules = "country-us-session-rot3-rotate-requests_3";
    let exits: Vec<String> = (0..9).map(|_| f.exit(rules)).collect();
    let blocks: Vec<&[String]> = exits.chunks(3).collect();
    for b in &blocks {
        assert!(
            b.iter().all(|e| *e == b[0]),
            "within 3 requests one node: {exits:?}"
        );
    }
    assert_ne!(
        blocks[0][0], blocks[1][0],
        "changed node after 3: {exits:?}"
    );
    assert_ne!(
        blocks[1][0], blocks[2][0],
        "changed node after 6: {exits:?}"
    );
}

#[test]
fn rotate_timed_and_sessionlength_move_to_a_new_node() {
    let f = Four::start();
    let timed = "country-us-session-rott-rotate-timed_1";
    let short = "country-us-session-short-sessionlength-1";
    let t1 = f.exit(timed);
    let s1 = f.exit(short);
    assert_eq!(f.exit(timed), t1);
    assert_eq!(f.exit(short), s1);
    std::thread::sleep(Duration::from_millis(1300));
    let t2 = f.exit(timed);
    assert_ne!(t2, t1, "rotate-timed_1 changed node after 1 s");
    let s2 = f.exit(short);
    assert_ne!(
        s2, s1,
        "a new session period (sessionlength-1) takes a new node"
    );
}

#[test]
fn same_session_with_other_rules_is_session_params_mismatch() {
    let f = Four::start();
    let (web, gw, src) = (&f.web, &f.gw, f.src);
    let first = f.exit("country-us-session-mm1");
    let r = gw
        .exit_ip(src, &web.url("/ip"), "country-any-session-mm1")
        .expect_err("other rules for a live session");
    assert_error(&r, 409, "SESSION_PARAMS_MISMATCH", &["mm1"]);
    let r = gw
        .exit_ip(src, &web.url("/ip"), "country-us-session-mm1-onerror-fail")
        .expect_err("other onerror for a live session");
    assert_error(&r, 409, "SESSION_PARAMS_MISMATCH", &[]);
    // Only sessionlength differs, or a default spelled out: same session.
    assert_eq!(
        gw.exit_ok(
            src,
            &web.url("/ip"),
            "country-us-session-mm1-sessionlength-600"
        ),
        first
    );
    assert_eq!(
        gw.exit_ok(
            src,
            &web.url("/ip"),
            "country-us-session-mm1-onerror-replace"
        ),
        first
    );
    // `sessionid` is the same key as `session`.
    assert_eq!(f.exit("country-us-sessionid-mm1"), first);
    // Over CONNECT too.
    let (_c, r) = gw.connect_as(
        src,
        &web.addr().to_string(),
        &user("network-res-session-mm1"),
        KEY,
        &[],
    );
    assert_error(&r, 409, "SESSION_PARAMS_MISMATCH", &[]);
}

#[test]
fn sessions_of_different_packages_never_mix() {
    let web = HttpTarget::start();
    let res = node_ip();
    let dc = node_ip();
    let gw = Gateway::start_conf(
        &Conf::with_package(KEY)
            .map_package(7, |p| p.set("networks", r#"["res"]"#))
            .package(PkgDecl::new(8, "acme", "key8").set("networks", r#"["dc"]"#))
            .node(NodeDecl::direct("res1", res))
            .node(NodeDecl::direct("dc1", dc).s("network", "dc")),
    );
    let src = client_ip();
    assert_eq!(
        gw.exit_ok(src, &web.url("/ip"), "country-any-session-shared"),
        res.to_string()
    );
    let r = gw.forward(
        src,
        &web.url("/ip"),
        "package-8-country-any-session-shared",
        "key8",
    );
    assert_eq!(r.status, 200, "{}{}", r.raw_head, r.text());
    assert_eq!(
        r.text().trim(),
        dc.to_string(),
        "package 8 got package 7's session node"
    );
    let r = gw.forward(
        src,
        &web.url("/ip"),
        "package-8-country-us-session-shared",
        "key8",
    );
    assert_error(&r, 409, "SESSION_PARAMS_MISMATCH", &[]);
    assert_eq!(
        gw.exit_ok(src, &web.url("/ip"), "country-any-session-shared"),
        res.to_string()
    );
}

#[test]
fn a_full_session_table_is_overloaded() {
    let web = HttpTarget::start();
    let (mut conf, _) = four_nodes();
    conf.session_capacity = 1;
    let gw = Gateway::start_conf(&conf);
    let src = client_ip();
    let mut overloaded = None;
    for i in 0..200 {
        match gw.exit_ip(src, &web.url("/ip"), &format!("country-us-session-full{i}")) {
            Ok(_) => {}
            Err(r) => {
                overloaded = Some((i, r));
                break;
            }
        }
    }
    let (i, r) = overloaded.expect("200 sessions in a table of capacity 1 never overloaded");
    assert!(i >= 1, "the first session fits");
    assert_error(&r, 503, "OVERLOADED", &["session"]);
    assert_eq!(r.header("Retry-After"), Some("1"), "{}", r.raw_head);
    // Rotating requests need no session slot.
    gw.exit_ok(src, &web.url("/ip"), "country-us");
}

#[test]
fn rotating_requests_on_one_keep_alive_connection_change_node() {
    let web = HttpTarget::start();
    let (conf, _) = four_nodes();
    let gw = Gateway::start_conf(&conf);
    let mut c = gw.conn();
    let exits: HashSet<String> = (0..20)
        .map(|_| {
            let r = c
                .get(&web.url("/ip"), Some((&user("country-us"), KEY)), &[])
                .unwrap();
            assert_eq!(r.status, 200);
            r.text().trim().to_string()
        })
        .collect();
    assert!(
        exits.len() >= 3,
        "20 rotating requests on one connection used {exits:?}"
    );
    // A session on a keep-alive connection stays put.
    let stuck: HashSet<String> = (0..6)
        .map(|_| {
            let r = c
                .get(
                    &web.url("/ip"),
                    Some((&user("country-us-session-Ka_1"), KEY)),
                    &[],
                )
                .unwrap();
            assert_eq!(r.status, 200, "{}", r.raw_head);
            r.text().trim().to_string()
        })
        .collect();
    assert_eq!(stuck.len(), 1, "{stuck:?}");
}

#[test]
fn a_draining_node_keeps_its_sessions_and_takes_no_new_ones() {
    let web = HttpTarget::start();
    let (a, b) = (node_ip(), node_ip());
    let conf = Conf::with_package(KEY)
        .node(NodeDecl::direct("a", a))
        .node(NodeDecl::direct("b", b));
    let mut gw = Gateway::start_conf(&conf);
    let src = client_ip();
    // A session on node a.
    let mut on_a = None;
    for s in 0..40 {
        let rules = format!("country-us-session-dr{s}");
        if gw.exit_ok(src, &web.url("/ip"), &rules) == a.to_string() {
            on_a = Some(rules);
            break;
        }
    }
    let rules = on_a.expect("no session on node a in 40 tries");
    let mut draining = conf.clone();
    draining.nodes[0] = NodeDecl::direct("a", a).s("state", "draining");
    gw.reload_conf(&draining);
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..4 {
        assert_eq!(
            gw.exit_ok(src, &web.url("/ip"), &rules),
            a.to_string(),
            "existing session runs on"
        );
    }
    for i in 0..10 {
        assert_eq!(
            gw.exit_ok(src, &web.url("/ip"), "country-us"),
            b.to_string(),
            "rotating"
        );
        assert_eq!(
            gw.exit_ok(src, &web.url("/ip"), &format!("country-us-session-new{i}")),
            b.to_string(),
            "new session"
        );
    }
}
