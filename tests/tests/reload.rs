//! The process as an operator runs it: SIGHUP reloads (key regeneration,
//! pausing a package, nodes, a bad file), `check-config`, SIGTERM draining,
//! and usage surviving a restart.

use std::time::{Duration, Instant};

use splicegate_tests::gateway::check_config;
use splicegate_tests::*;

const NEW_KEY: &str = "pk_E2E_rotated_K2m8";

fn base(n1: std::net::Ipv4Addr) -> Conf {
    Conf::with_package(KEY).node(NodeDecl::direct("d1", n1))
}

/// A web target, the base config, a gateway on it and a client address
/// that was served once.
fn serving() -> (HttpTarget, Conf, Gateway, std::net::Ipv4Addr) {
    let web = HttpTarget::start();
    let conf = base(node_ip());
    let gw = Gateway::start_conf(&conf);
    let src = client_ip();
    gw.exit_ok(src, &web.url("/ip"), "country-us");
    (web, conf, gw, src)
}

#[test]
fn key_regeneration_by_reload_stops_the_old_key_at_once() {
    let web = HttpTarget::start();
    let n1 = node_ip();
    let conf = base(n1);
    let mut gw = Gateway::start_conf(&conf);
    let src = client_ip();
    // A keep-alive connection that used the old key.
    let mut ka = gw.conn_from(src);
    let r = ka
        .get(&web.url("/ip"), Some((&user("country-us"), KEY)), &[])
        .unwrap();
    assert_eq!(r.status, 200);

    gw.reload_conf(&conf.clone().map_package(7, |p| PkgDecl {
        key: NEW_KEY.into(),
        ..p
    }));
    let swapped = eventually(Duration::from_secs(3), Duration::from_millis(50), || {
        let r = gw.forward(src, &web.url("/ip"), &user("country-us"), NEW_KEY);
        (r.status == 200).then_some(())
    });
    assert!(
        swapped.is_some(),
        "the new key never worked; log:\n{}",
        gw.log_tail(20)
    );
    let r = gw.forward(src, &web.url("/ip"), &user("country-us"), KEY);
    assert_error(&r, 407, "AUTH_FAILED", &[]);
    // The next request on the old keep-alive connection fails too.
    let r = ka
        .get(&web.url("/ip"), Some((&user("country-us"), KEY)), &[])
        .unwrap();
    assert_error(&r, 407, "AUTH_FAILED", &[]);
    // SOCKS5 and CONNECT see the new key.
    let (_c, s) = gw.socks_as(src, &user("country-us"), KEY, web.addr());
    assert_eq!(s, SocksOutcome::AuthStatus(1));
    let (_c, r) = gw.connect_as(
        src,
        &web.addr().to_string(),
        &user("country-us"),
        NEW_KEY,
        &[],
    );
    assert_eq!(r.status, 200);
    // Neither key is in the log.
    let log = gw.log();
    assert!(
        !log.contains(KEY) && !log.contains(NEW_KEY),
        "a key is in the log:\n{log}"
    );
}

#[test]
fn pausing_and_resuming_a_package_by_reload() {
    let (web, conf, mut gw, src) = serving();
    gw.reload_conf(
        &conf
            .clone()
            .map_package(7, |p| p.set("status", "\"paused\"")),
    );
    let r = eventually(Duration::from_secs(3), Duration::from_millis(50), || {
        gw.exit_ip(src, &web.url("/ip"), "country-us").err()
    })
    .expect("the package was never paused");
    assert_error(&r, 407, "PACKAGE_PAUSED", &["paused"]);
    gw.reload_conf(
        &conf
            .clone()
            .map_package(7, |p| p.set("status", "\"suspended\"")),
    );
    let r = eventually(Duration::from_secs(3), Duration::from_millis(50), || {
        gw.exit_ip(src, &web.url("/ip"), "country-us")
            .err()
            .filter(|r| r.header("X-SOAX-Error") == Some("PACKAGE_SUSPENDED"))
    })
    .expect("the package was never suspended");
    assert_error(&r, 407, "PACKAGE_SUSPENDED", &[]);
    gw.reload_conf(&conf);
    let back = eventually(Duration::from_secs(3), Duration::from_millis(50), || {
        gw.exit_ip(src, &web.url("/ip"), "country-us").ok()
    });
    assert!(back.is_some(), "the package never came back");
}

#[test]
fn nodes_added_and_taken_offline_by_reload() {
    let web = HttpTarget::start();
    let n1 = node_ip();
    let n2 = node_ip();
    let conf = base(n1);
    let mut gw = Gateway::start_conf(&conf);
    let src = client_ip();
    let r = gw
        .exit_ip(src, &web.url("/ip"), "country-us-city-chicago")
        .expect_err("no node yet");
    assert_error(&r, 502, "NODE_NOT_FOUND", &["chicago"]);

    let with_chicago = conf
        .clone()
        .node(NodeDecl::direct("chi", n2).s("city", "chicago"));
    gw.reload_conf(&with_chicago);
    let ip = eventually(Duration::from_secs(3), Duration::from_millis(50), || {
        gw.exit_ip(src, &web.url("/ip"), "country-us-city-chicago")
            .ok()
    });
    assert_eq!(ip, Some(n2.to_string()), "the new node serves");

    let mut offline = with_chicago.clone();
    offline.nodes[1] = NodeDecl::direct("chi", n2)
        .s("city", "chicago")
        .s("state", "offline");
    gw.reload_conf(&offline);
    let r = eventually(Duration::from_secs(3), Duration::from_millis(50), || {
        gw.exit_ip(src, &web.url("/ip"), "country-us-city-chicago")
            .err()
    })
    .expect("the offline node still served");
    assert_error(&r, 502, "NODE_NOT_FOUND", &["chicago"]);
    // Other rules are untouched.
    assert_eq!(
        gw.exit_ok(src, &web.url("/ip"), "country-us-city-new_york"),
        n1.to_string()
    );
}

#[test]
fn a_bad_file_on_reload_keeps_the_running_policy_and_is_logged() {
    let (web, conf, mut gw, src) = serving();
    let before = gw.log().len();
    // A misspelt key, and a key change in the same file: nothing applies.
    let bad = conf
        .clone()
        .map_package(7, |p| PkgDecl {
            key: NEW_KEY.into(),
            ..p
        })
        .toml()
        .replace("workers = 2", "workers = 2\nworkerz = 3");
    gw.reload(&bad);
    let logged = eventually(Duration::from_secs(3), Duration::from_millis(50), || {
        let log = gw.log();
        log[before..].contains("workerz").then_some(())
    });
    assert!(
        logged.is_some(),
        "the reload error naming `workerz` is not in the log:\n{}",
        gw.log_tail(10)
    );
    assert!(
        gw.try_exit().is_none(),
        "a bad reload must not stop the gateway"
    );
    assert_eq!(
        gw.exit_ip(src, &web.url("/ip"), "country-us")
            .map(|_| ())
            .map_err(|r| r.raw_head),
        Ok(())
    );
    let r = gw.forward(src, &web.url("/ip"), &user("country-us"), NEW_KEY);
    assert_error(&r, 407, "AUTH_FAILED", &[]);
    // Syntax error too.
    gw.reload("[proxy\nlisten = ");
    std::thread::sleep(Duration::from_millis(200));
    gw.exit_ok(src, &web.url("/ip"), "country-us");
}

#[test]
fn check_config_accepts_a_good_file_and_names_what_is_wrong() {
    let good = base(node_ip()).toml();
    let (code, err) = check_config(&good);
    assert_eq!(code, 0, "a good file: {err}");

    let cases: Vec<(String, &str)> = vec![
        (
            good.replace("workers = 2", "workers = 2\nworkerz = 3"),
            "workerz",
        ),
        (
            good.replace("key = ", "prise_per_gb = 1.0\nkey = "),
            "prise_per_gb",
        ),
        (
            good.replace("[timeouts]", "[timeouts]\nhandshake_sec = 3"),
            "handshake_sec",
        ),
        (
            good.replace("kind = \"direct\"", "kind = \"telepathy\""),
            "telepathy",
        ),
        (good.replace("[proxy]", "[proxy\n"), ""),
        (good.replace("workers = 2", "workers = "), ""),
        (good.replace("workers = 2", "workers = 0"), "workers"),
        (
            good.replace("max_head_bytes = 16384", "max_head_bytes = -1"),
            "max_head_bytes",
        ),
    ];
    for (text, needle) in cases {
        let (code, err) = check_config(&text);
        assert_eq!(code, 1, "should be refused ({needle}): stderr {err}");
        assert!(err.contains(needle), "stderr should name {needle:?}: {err}");
        assert!(!err.trim().is_empty());
    }
    // Overlapping ip allowlists of two ip-auth packages.
    let overlap = Conf::with_package(KEY)
        .package(
            PkgDecl::new(8, "acme", "k8")
                .set("auth", "\"ip\"")
                .set("ip_allowlist", "[\"127.0.5.0/24\"]"),
        )
        .package(
            PkgDecl::new(9, "acme", "k9")
                .set("auth", "\"ip\"")
                .set("ip_allowlist", "[\"127.0.5.7/32\"]"),
        )
        .toml();
    let (code, err) = check_config(&overlap);
    assert_eq!(code, 1, "overlapping allowlists: {err}");
    // A package of an organisation that does not exist.
    let orphan = Conf::new().package(PkgDecl::new(8, "ghost", "k8")).toml();
    let (code, err) = check_config(&orphan);
    assert_eq!(code, 1, "unknown org: {err}");
    assert!(err.contains("ghost"), "{err}");
    // No key in check-config's output either.
    let (_, err) = check_config(&good.replace("workers = 2", "workerz = 2"));
    assert!(!err.contains(KEY), "check-config printed the key: {err}");
}

#[test]
fn sigterm_drains_open_tunnels_then_exits_zero() {
    let echo = TcpEcho::start();
    let mut conf = base(node_ip());
    conf.drain_grace_s = 2;
    let mut gw = Gateway::start_conf(&conf);
    let mut t = gw.tunnel(client_ip(), echo.addr(), "country-us");
    t.echo_round_trip(b"before").unwrap();
    let t0 = Instant::now();
    gw.signal("TERM");
    // New connections are no longer served.
    let refused = eventually(
        Duration::from_secs(2),
        Duration::from_millis(50),
        || match Conn::open(client_ip(), gw.proxy) {
            Err(_) => Some(()),
            Ok(mut c) => {
                let _ = c.send(format!("CONNECT {} HTTP/1.1\r\n\r\n", echo.addr()).as_bytes());
                c.closed_within(Duration::from_millis(500))
                    .filter(|b| b.is_empty() || !b.starts_with(b"HTTP/1.1 200"))
                    .map(|_| ())
            }
        },
    );
    assert!(
        refused.is_some(),
        "new connections still served after SIGTERM"
    );
    // The open tunnel goes on during the grace period.
    t.echo_round_trip(b"during the drain").unwrap();
    let st = gw.wait_exit(Duration::from_secs(8));
    let took = t0.elapsed();
    let st = st.unwrap_or_else(|| panic!("no exit within 8 s of SIGTERM (drain_grace_s = 2)"));
    assert_eq!(
        st.code(),
        Some(0),
        "exit status after SIGTERM: {st}\n{}",
        gw.log_tail(20)
    );
    assert!(
        took < Duration::from_secs(5),
        "drain took {took:?} with drain_grace_s = 2"
    );
    assert!(
        t.closed_within(Duration::from_secs(1)).is_some(),
        "the tunnel ends with the process"
    );
}

/// `serve --ready-file`: every listen address on port 0, two workers; the
/// file names each address as bound, each accepts, the two workers share
/// the proxy's one port, and a clean exit removes the file.
#[test]
fn the_ready_file_names_every_address_bound_on_port_0() {
    let web = HttpTarget::start();
    let mut conf =
        base(node_ip()).raw("[[listener]]\nlisten = \"127.0.0.1:@PORT_L7@\"\npackage = 7\n");
    conf.demo_echo = true;
    let mut gw = Gateway::start_conf(&conf);
    let ready = gw.ready().clone();
    assert_eq!(ready["pid"], gw.pid(), "{ready}");
    assert_eq!(ready["proxy"], serde_json::json!([gw.proxy.to_string()]));
    assert_eq!(ready["admin"], gw.addr("ADMIN").to_string());
    assert_eq!(ready["demo_echo"], gw.addr("ECHO").to_string());
    assert_eq!(ready["listeners"][0]["addr"], gw.addr("L7").to_string());
    assert_eq!(ready["listeners"][0]["package"], 7);
    assert_eq!(ready["listeners"][0]["ip_only"], false);
    for name in ["PROXY", "ADMIN", "ECHO", "L7"] {
        assert_ne!(gw.port(name), 0, "{name}: {ready}");
    }
    // Both workers serve the one kernel-chosen port: many connections all
    // get through (a worker listening elsewhere would leave some hanging).
    for _ in 0..8 {
        gw.exit_ok(client_ip(), &web.url("/ip"), "country-us");
    }
    let mut c = Conn::open(client_ip(), gw.addr("L7")).expect("the listener accepts");
    let r = c
        .connect(
            &web.addr().to_string(),
            Some((&user("country-us"), KEY)),
            &[],
        )
        .expect("CONNECT on the listener");
    assert_eq!(r.status, 200, "{}", r.raw_head);
    let ready_path = gw.dir.join("ready.json");
    assert!(ready_path.is_file());
    gw.signal("TERM");
    let st = gw
        .wait_exit(Duration::from_secs(5))
        .expect("exit after SIGTERM");
    assert_eq!(st.code(), Some(0), "{st}");
    assert!(!ready_path.exists(), "the ready file outlived a clean exit");
}

#[test]
fn sigterm_when_idle_exits_promptly() {
    let mut gw = Gateway::start_conf(&base(node_ip()));
    let t0 = Instant::now();
    gw.signal("TERM");
    let st = gw
        .wait_exit(Duration::from_secs(5))
        .expect("exit after SIGTERM");
    assert_eq!(st.code(), Some(0), "{st}");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "idle drain took {:?}",
        t0.elapsed()
    );
}

/// Package 8 with a 200 kB cap, org `small` (2 credits = 200 kB at
/// package 9's price); both used up through tunnels.
fn used_up() -> (Conf, Gateway, HttpTarget) {
    const CAP: u64 = 200_000;
    let source = Source::start(16 * 1024, Duration::from_millis(5), None);
    let web = HttpTarget::start();
    let conf = Conf::with_package(KEY)
        .org("small", 2.0)
        .package(PkgDecl::new(8, "acme", "key8").set("traffic_limit_bytes", &CAP.to_string()))
        .package(PkgDecl::new(9, "small", "key9").set("price_per_gb", "10000.0"))
        .node(NodeDecl::direct("d1", node_ip()));
    let gw = Gateway::start_conf(&conf);
    for (u, k) in [
        ("package-8-country-us", "key8"),
        ("package-9-country-us", "key9"),
    ] {
        let (mut c, r) = gw.connect_as(client_ip(), &source.addr().to_string(), u, k, &[]);
        assert_eq!(r.status, 200, "{u}: {}", r.raw_head);
        c.set_timeout(Duration::from_secs(5));
        let _ = c.read_to_close(64 << 20);
    }
    check_used_up(&gw, &web, "after use");
    (conf, gw, web)
}

#[track_caller]
fn check_used_up(gw: &Gateway, web: &HttpTarget, when: &str) {
    let t = web.addr().to_string();
    let (_c, r) = gw.connect_as(client_ip(), &t, "package-8-country-us", "key8", &[]);
    assert_eq!(
        r.header("X-SOAX-Error"),
        Some("TRAFFIC_LIMIT_EXCEEDED"),
        "{when}: {}",
        r.raw_head
    );
    assert_error(&r, 429, "TRAFFIC_LIMIT_EXCEEDED", &[]);
    let (_c, r) = gw.connect_as(client_ip(), &t, "package-9-country-us", "key9", &[]);
    assert_eq!(
        r.header("X-SOAX-Error"),
        Some("PACKAGE_NO_CREDITS"),
        "{when}: {}",
        r.raw_head
    );
    assert_error(&r, 407, "PACKAGE_NO_CREDITS", &[]);
}

#[test]
fn a_reload_keeps_usage_and_file_credits_are_a_first_grant() {
    let (conf, mut gw, web) = used_up();
    // Reloading the same file neither resets usage nor grants credits again.
    gw.reload_conf(&conf);
    check_used_up(&gw, &web, "after a reload");
    gw.exit_ok(client_ip(), &web.url("/ip"), "country-us");
}

#[test]
fn usage_and_balances_survive_a_restart() {
    let (_conf, gw, web) = used_up();
    let gw = gw.restart();
    check_used_up(&gw, &web, "after a restart");
    gw.exit_ok(client_ip(), &web.url("/ip"), "country-us");
}

#[test]
fn a_listen_address_used_twice_is_refused() {
    // With SO_REUSEPORT both sockets would bind, and connections would land
    // on one or the other at random: the package-bound ip_only port would eat
    // a share of the general proxy port's clients.
    let allowlist = "[\"127.0.9.9/32\"]";
    let conf = Conf::with_package(KEY)
        .package(
            PkgDecl::new(15, "acme", "k15")
                .set("auth", "\"ip\"")
                .set("ip_allowlist", allowlist),
        )
        .node(NodeDecl::direct("d1", node_ip()));
    let same_as_proxy = conf
        .clone()
        .raw("[[listener]]\nlisten = \"@PROXY@\"\npackage = 15\nip_only = true\n")
        .toml();
    let (code, err) = check_config(&same_as_proxy);
    assert_eq!(
        code, 1,
        "a [[listener]] on the proxy's own address was accepted: {err}"
    );
    let twice = conf
        .clone()
        .raw("[[listener]]\nlisten = \"127.0.0.1:@PORT_L@\"\npackage = 15\n")
        .raw("[[listener]]\nlisten = \"127.0.0.1:@PORT_L@\"\npackage = 7\n")
        .toml();
    let (code, err) = check_config(&twice);
    assert_eq!(
        code, 1,
        "two [[listener]]s on one address were accepted: {err}"
    );
    // The harness gives `@PROXY@` port 0, a new port at each bind: name
    // one real address twice (the start fails before binding anything).
    let literal = same_as_proxy.replace("@PROXY@", "127.0.0.1:9");
    match Gateway::try_start(&literal) {
        Err(_) => {}
        Ok(gw) => panic!(
            "serve started with one address listened on twice:\n{}",
            gw.log_tail(5)
        ),
    }
}

#[test]
fn open_tunnels_survive_reloads_even_of_their_node() {
    let echo = TcpEcho::start();
    let (n1, n2) = (node_ip(), node_ip());
    let conf = Conf::with_package(KEY)
        .node(NodeDecl::direct("d1", n1))
        .node(NodeDecl::direct("d2", n2).s("city", "chicago"));
    let mut gw = Gateway::start_conf(&conf);
    let mut t = gw.tunnel(client_ip(), echo.addr(), "country-us-city-new_york");
    t.echo_round_trip(b"before").unwrap();
    // Same file again, then a file without the tunnel's node.
    gw.reload_conf(&conf);
    t.echo_round_trip(b"after a reload").unwrap();
    let mut without = conf.clone();
    without.nodes.remove(0);
    gw.reload_conf(&without);
    t.echo_round_trip(b"its node was removed; it runs out")
        .unwrap();
    let r = eventually(Duration::from_secs(3), Duration::from_millis(50), || {
        let (_c, r) = gw.connect_rules(echo.addr(), "country-us-city-new_york");
        (r.status != 200).then_some(r)
    })
    .expect("the removed node still takes new tunnels");
    assert_error(&r, 502, "NODE_NOT_FOUND", &[]);
}

#[test]
fn pausing_a_package_closes_its_tunnels_and_keep_alive_connections() {
    // 1. Package 7 holds an open CONNECT tunnel and a keep-alive connection
    //    that forwarded one request.
    // 2. A key rotation leaves both open (only new requests need the key).
    // 3. A pause closes both within a second of the reload being applied.
    let web = HttpTarget::start();
    let echo = TcpEcho::start();
    let conf = base(node_ip());
    let mut gw = Gateway::start_conf(&conf);
    let src = client_ip();
    let mut tunnel = gw.tunnel(src, echo.addr(), "country-us");
    tunnel.echo_round_trip(b"before").unwrap();
    let mut ka = gw.conn_from(src);
    let r = ka
        .get(&web.url("/ip"), Some((&user("country-us"), KEY)), &[])
        .unwrap();
    assert_eq!(r.status, 200);

    let rotated = conf.clone().map_package(7, |p| PkgDecl {
        key: NEW_KEY.into(),
        ..p
    });
    gw.reload_conf(&rotated);
    let applied = eventually(Duration::from_secs(3), Duration::from_millis(20), || {
        let r = gw.forward(src, &web.url("/ip"), &user("country-us"), NEW_KEY);
        (r.status == 200).then_some(())
    });
    assert!(applied.is_some(), "the rotation never applied");
    std::thread::sleep(Duration::from_millis(1200));
    tunnel.echo_round_trip(b"after the rotation").unwrap();
    assert!(
        ka.closed_within(Duration::from_millis(10)).is_none(),
        "a key rotation closed a keep-alive connection"
    );

    gw.reload_conf(&rotated.map_package(7, |p| p.set("status", "\"paused\"")));
    let paused = eventually(Duration::from_secs(3), Duration::from_millis(20), || {
        let r = gw.forward(src, &web.url("/ip"), &user("country-us"), NEW_KEY);
        (r.status == 407).then_some(Instant::now())
    });
    let paused = paused.expect("the pause never applied");
    assert!(
        tunnel.closed_within(Duration::from_millis(1500)).is_some(),
        "the paused package's tunnel is still open"
    );
    assert!(
        ka.closed_within(Duration::from_millis(1500)).is_some(),
        "the paused package's keep-alive connection is still open"
    );
    assert!(
        paused.elapsed() < Duration::from_millis(1500),
        "closed {:?} after the pause applied",
        paused.elapsed()
    );
}
