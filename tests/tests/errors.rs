//! The error codes of SPEC sections 2–4 that a request's credentials, rules
//! and target decide, each triggered by a real client and checked as the
//! client sees it: status line, `X-SOAX-Error`, a detail naming the rule,
//! `Proxy-Status`, a plain-text body, and `Proxy-Authenticate` on 407.
//! (Node, session, limit and malformed-input codes have their own files.)

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use splicegate_tests::*;

fn q(s: &str) -> String {
    format!("{s:?}")
}

/// Package 7 (active), 8 suspended, 9 paused, 10 in an org without credits,
/// 12 with networks `res` and no `city` feature, 13 `https` only, 14 `http`
/// only; one direct node.
fn conf(n1: Ipv4Addr) -> Conf {
    Conf::with_package(KEY)
        .org("broke", 0.0)
        .package(PkgDecl::new(8, "acme", "key8_suspended").set("status", &q("suspended")))
        .package(PkgDecl::new(9, "acme", "key9_paused").set("status", &q("paused")))
        .package(PkgDecl::new(10, "broke", "key10_broke"))
        .package(
            PkgDecl::new(12, "acme", "key12_plan")
                .set("networks", r#"["res"]"#)
                .set("features", r#"["isp"]"#),
        )
        .package(PkgDecl::new(13, "acme", "key13_https").set("protocols", r#"["https"]"#))
        .package(PkgDecl::new(14, "acme", "key14_http").set("protocols", r#"["http"]"#))
        .node(NodeDecl::direct("d1", n1))
}

/// A web target and a gateway on [`conf`]: both, and the target's address.
fn lab() -> (HttpTarget, Gateway, String) {
    let web = HttpTarget::start();
    let gw = Gateway::start_conf(&conf(node_ip()));
    let t = web.addr().to_string();
    (web, gw, t)
}

/// A CONNECT as `user`:`key` to `t`, and the error it must get.
type Refusal<'a> = (&'a str, &'a str, u16, &'a str, &'a [&'a str]);

/// Each row's CONNECT gets its error `(status, code, detail)`.
#[track_caller]
fn refused(gw: &Gateway, t: &str, rows: &[Refusal<'_>]) {
    for &(user, key, status, code, detail) in rows {
        assert_error(&connect(gw, t, user, key), status, code, detail);
    }
}

fn connect(gw: &Gateway, target: impl ToString, user: &str, key: &str) -> Resp {
    gw.connect_as(client_ip(), &target.to_string(), user, key, &[])
        .1
}

/// A gateway with package 15 of acme, `auth = "ip"` (`fields` added), one
/// client address its only allowed one, one direct node, and `raw` TOML:
/// the gateway, that address and the node's.
fn ip_gateway(fields: &[(&str, &str)], raw: &str) -> (Gateway, Ipv4Addr, Ipv4Addr) {
    let (allowed, n1) = (client_ip(), node_ip());
    let mut p = PkgDecl::new(15, "acme", "key15_ip")
        .set("auth", &q("ip"))
        .set(
            "ip_allowlist",
            &format!("[{}]", q(&format!("{allowed}/32"))),
        );
    for (k, v) in fields {
        p = p.set(k, v);
    }
    let conf = Conf::with_package(KEY)
        .package(p)
        .node(NodeDecl::direct("d1", n1))
        .raw(raw);
    (Gateway::start_conf(&conf), allowed, n1)
}

#[test]
fn no_credentials_is_err_auth_required_with_proxy_authenticate() {
    let (web, gw, _) = lab();
    let mut c = gw.conn();
    let r = c.connect(&web.addr().to_string(), None, &[]).unwrap();
    assert_error(&r, 407, "ERR_AUTH_REQUIRED", &["package"]);

    // curl without --proxy-user: the status line carries the code.
    let out = gw.curl().tunnel().get(&web.url("/ip"));
    assert_ne!(out.code, 0);
    assert_error_head(out.first(), 407, "ERR_AUTH_REQUIRED", &[]);

    // Forwarded request without credentials.
    let r = gw.conn().get(&web.url("/ip"), None, &[]).unwrap();
    assert_error(&r, 407, "ERR_AUTH_REQUIRED", &[]);
}

#[test]
fn bad_credentials_are_auth_failed() {
    let (web, gw, t) = lab();
    let cases: [(String, &str, &[&str]); 4] = [
        (user("country-us"), "wrong-key", &[]),
        ("package-99-country-us".into(), KEY, &[]),
        ("customer-7-country-us".into(), KEY, &["package-"]),
        (format!("package-7-country-us-{KEY}"), "x", &["password"]),
    ];
    for (u, k, needles) in &cases {
        refused(&gw, &t, &[(u, k, 407, "AUTH_FAILED", needles)]);
    }
    // A username that does not start with package-<digits> is AUTH_FAILED
    // even with the right key, before its rules are read.
    refused(
        &gw,
        &t,
        &[("package-x-contry-us", KEY, 407, "AUTH_FAILED", &[])],
    );

    // Malformed Basic values.
    for bad in [
        "Proxy-Authorization: Basic %%%not-base64%%%",
        "Proxy-Authorization: Basic bm9jb2xvbg==", // "nocolon"
    ] {
        let mut c = gw.conn();
        c.send(format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n{bad}\r\n\r\n").as_bytes())
            .unwrap();
        let r = c.read_response("CONNECT").unwrap();
        assert_error(&r, 407, "AUTH_FAILED", &[]);
    }

    // curl with a wrong key.
    let out = gw
        .curl()
        .user(&user("country-us"), "nope")
        .tunnel()
        .get(&web.url("/ip"));
    assert_error_head(out.first(), 407, "AUTH_FAILED", &[]);
}

#[test]
fn address_outside_the_allowlist_is_ip_not_allowed() {
    let allowed = client_ip();
    let outsider = client_ip();
    let web = HttpTarget::start();
    let gw = Gateway::start_conf(
        &conf(node_ip()).package(
            PkgDecl::new(11, "acme", "key11_pip")
                .set("auth", &q("password+ip"))
                .set(
                    "ip_allowlist",
                    &format!("[{}]", q(&format!("{allowed}/32"))),
                ),
        ),
    );
    let t = web.addr().to_string();
    let (_c, r) = gw.connect_as(outsider, &t, "package-11-country-us", "key11_pip", &[]);
    assert_error(&r, 407, "IP_NOT_ALLOWED", &[&outsider.to_string()]);
    let (_c, r) = gw.connect_as(allowed, &t, "package-11-country-us", "key11_pip", &[]);
    assert_eq!(r.status, 200, "{}{}", r.raw_head, r.text());
    // password+ip still needs the key.
    let (_c, r) = gw.connect_as(allowed, &t, "package-11-country-us", "bad", &[]);
    assert_error(&r, 407, "AUTH_FAILED", &[]);
}

#[test]
fn package_status_and_credits_are_407() {
    let (_web, gw, t) = lab();
    refused(
        &gw,
        &t,
        &[
            (
                "package-8-country-us",
                "key8_suspended",
                407,
                "PACKAGE_SUSPENDED",
                &["suspended"],
            ),
            (
                "package-9-country-us",
                "key9_paused",
                407,
                "PACKAGE_PAUSED",
                &["paused"],
            ),
            (
                "package-10-country-us",
                "key10_broke",
                407,
                "PACKAGE_NO_CREDITS",
                &["credits"],
            ),
            // Check order: a wrong key on a paused package is AUTH_FAILED.
            ("package-9-country-us", "wrong", 407, "AUTH_FAILED", &[]),
            // Status before rules: a paused package with a bad rule is still PAUSED.
            (
                "package-9-contry-us",
                "key9_paused",
                407,
                "PACKAGE_PAUSED",
                &[],
            ),
        ],
    );
}

#[test]
fn rule_faults_are_400_with_a_detail_naming_the_rule() {
    let (web, gw, t) = lab();
    let cases: &[(&str, &str, &[&str])] = &[
        ("", "ERR_MISSING_PARAMS", &["country-any"]),
        ("session-abc", "ERR_MISSING_PARAMS", &["country"]),
        ("contry-us", "ERR_UNKNOWN_PARAM", &["contry"]),
        (
            "country-us-city-los-angeles",
            "ERR_UNKNOWN_PARAM",
            &["angeles", "underscore"],
        ),
        ("country-us-country-gb", "ERR_DUPLICATE_PARAM", &["country"]),
        (
            "country-us-session-a-sessionid-b",
            "ERR_DUPLICATE_PARAM",
            &["session"],
        ),
        ("country-US", "ERR_INVALID_VALUE", &["country-us"]),
        ("country-usa", "ERR_INVALID_VALUE", &["usa"]),
        ("country-us-asn-x", "ERR_INVALID_VALUE", &["asn"]),
        (
            "country-us-session-s1-rotate-timed_0",
            "ERR_INVALID_VALUE",
            &["rotate"],
        ),
        (
            "country-us-city-atlantis",
            "ERR_INVALID_VALUE",
            &["atlantis"],
        ),
        ("country-us-network-sat", "ERR_INVALID_VALUE", &["network"]),
        (
            "country-us-onerror-retry_11",
            "ERR_INVALID_VALUE",
            &["onerror"],
        ),
        ("country", "ERR_INVALID_VALUE", &["country"]),
        (
            "country-us-session-x-bind-node-rotate-requests_5",
            "ERR_INVALID_COMBINATION",
            &["bind"],
        ),
        (
            "country-us-session-x-bind-node-onerror-replace",
            "ERR_INVALID_COMBINATION",
            &["bind"],
        ),
        (
            "country-us-session-x-bind-node-prefer-lookalike",
            "ERR_INVALID_COMBINATION",
            &["lookalike"],
        ),
        (
            "country-us-bind-node",
            "ERR_INVALID_COMBINATION",
            &["session"],
        ),
        (
            "country-us-rotate-requests_5",
            "ERR_INVALID_COMBINATION",
            &["session"],
        ),
        (
            "country-us-sessionlength-60",
            "ERR_INVALID_COMBINATION",
            &["session"],
        ),
        ("city-new_york", "ERR_INVALID_COMBINATION", &["country"]),
        // Order: reading left to right, the first token fault wins.
        (
            "contry-us-country-us-country-gb",
            "ERR_UNKNOWN_PARAM",
            &["contry"],
        ),
        // Combination before missing targeting.
        ("bind-node", "ERR_INVALID_COMBINATION", &[]),
    ];
    for (rules, code, needles) in cases {
        refused(&gw, &t, &[(&user(rules), KEY, 400, code, needles)]);
    }
    // Plan: a network or feature the package lacks.
    refused(
        &gw,
        &t,
        &[
            (
                "package-12-country-us-network-mob",
                "key12_plan",
                400,
                "ERR_PARAM_NOT_ALLOWED",
                &["mob"],
            ),
            (
                "package-12-country-us-city-new_york",
                "key12_plan",
                400,
                "ERR_PARAM_NOT_ALLOWED",
                &["city"],
            ),
            // Validation comes before the plan.
            (
                "package-12-network-mob-contry-x",
                "key12_plan",
                400,
                "ERR_UNKNOWN_PARAM",
                &[],
            ),
        ],
    );

    // A real client sees the code in the status line of the CONNECT answer.
    let out = gw
        .curl()
        .user(&user("city-los-angeles"), KEY)
        .tunnel()
        .get(&web.url("/ip"));
    assert_ne!(out.code, 0, "{out:#?}");
    assert_error_head(out.first(), 400, "ERR_UNKNOWN_PARAM", &[]);
    assert!(
        out.stderr.contains("400"),
        "curl shows the status: {}",
        out.stderr
    );
}

#[test]
fn disallowed_targets_and_protocols_are_403() {
    let (web, gw, _) = lab();
    let u = user("country-us");
    let r = connect(&gw, "127.0.0.1:25", &u, KEY);
    assert_error(&r, 403, "DISALLOWED", &["25"]);
    for private in [
        "10.1.2.3:80",
        "192.168.7.7:443",
        "169.254.169.254:80",
        "[fe80::1]:80",
    ] {
        let r = connect(&gw, private, &u, KEY);
        assert_error(&r, 403, "DISALLOWED", &[]);
    }
    // Forwarding to a private address too.
    let r = gw
        .conn()
        .get("http://10.9.9.9/", Some((&u, KEY)), &[])
        .unwrap();
    assert_error(&r, 403, "DISALLOWED", &["10.9.9.9"]);

    // Protocol not enabled: package 13 is https (CONNECT) only, 14 http only.
    let r = gw
        .conn()
        .get(
            &web.url("/ip"),
            Some(("package-13-country-us", "key13_https")),
            &[],
        )
        .unwrap();
    assert_error(&r, 403, "DISALLOWED", &["http"]);
    let (_c, ok) = gw.connect_as(
        client_ip(),
        &web.addr().to_string(),
        "package-13-country-us",
        "key13_https",
        &[],
    );
    assert_eq!(ok.status, 200);
    let r = connect(&gw, web.addr(), "package-14-country-us", "key14_http");
    assert_error(&r, 403, "DISALLOWED", &["https"]);
    let (_c, s) = gw.socks_as(
        client_ip(),
        "package-14-country-us",
        "key14_http",
        web.addr(),
    );
    assert_eq!(
        s,
        SocksOutcome::Reply(2),
        "socks5 not enabled: not allowed by ruleset"
    );
}

#[test]
fn a_refusing_target_is_target_unreachable_without_replacing_the_node() {
    let closed = ClosedPort::new();
    let target = closed.addr().to_string();
    let n1 = node_ip();
    let http_node = TestNode::http(node_ip());
    let socks_node = TestNode::socks5(node_ip());
    let tp = Tinyproxy::start(node_ip());
    let gw = Gateway::start_conf(
        &Conf::with_package(KEY)
            .node(NodeDecl::direct("d1", n1).s("city", "new_york"))
            .node(NodeDecl::http("h1", http_node.addr()).s("city", "chicago"))
            .node(NodeDecl::socks5("s1", socks_node.addr()).s("city", "boston"))
            .node(NodeDecl::http("tiny", tp.addr()).s("city", "dallas")),
    );
    for city in ["new_york", "chicago", "boston", "dallas"] {
        let rules = format!("country-us-city-{city}-session-tu_{city}-onerror-retry_3");
        let r = connect(&gw, &target, &user(&rules), KEY);
        assert_error(&r, 502, "TARGET_UNREACHABLE", &[]);
    }
    assert_eq!(
        http_node.requests_to_port(closed.port()),
        1,
        "no retry on a target fault"
    );
    assert_eq!(
        socks_node.requests_to_port(closed.port()),
        1,
        "no retry on a target fault"
    );
}

#[test]
fn a_silent_target_is_gateway_timeout() {
    let hole = Blackhole::start();
    let http504 = TestNode::http(node_ip());
    http504.set(Behavior::Answer(504));
    let socks06 = TestNode::socks5(node_ip());
    socks06.set(Behavior::Answer(6));
    let mut c = Conf::with_package(KEY)
        .node(NodeDecl::direct("d1", node_ip()))
        .node(NodeDecl::http("h504", http504.addr()).s("city", "chicago"))
        .node(NodeDecl::socks5("s06", socks06.addr()).s("city", "boston"));
    c.target_ms = 1000;
    let gw = Gateway::start_conf(&c);
    let t0 = Instant::now();
    let r = connect(&gw, hole.addr(), &user("country-us-city-new_york"), KEY);
    let took = t0.elapsed();
    assert_error(&r, 504, "GATEWAY_TIMEOUT", &[]);
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "answered after {took:?} with target_ms = 1000"
    );
    let web = HttpTarget::start();
    let r = connect(&gw, web.addr(), &user("country-us-city-chicago"), KEY);
    assert_error(&r, 504, "GATEWAY_TIMEOUT", &[]);
    let r = connect(&gw, web.addr(), &user("country-us-city-boston"), KEY);
    assert_error(&r, 504, "GATEWAY_TIMEOUT", &[]);
}

#[test]
fn ip_auth_package_serves_allowlisted_clients_without_credentials() {
    let web = HttpTarget::start();
    let (gw, allowed, n1) = ip_gateway(&[("default_rules", "\"country-us\"")], "");
    let mut c = gw.conn_from(allowed);
    let r = c.get(&web.url("/ip"), None, &[]).unwrap();
    assert_eq!(r.status, 200, "{}{}", r.raw_head, r.text());
    assert_eq!(r.text().trim(), n1.to_string());
    let mut c = gw.conn_from(allowed);
    let r = c.connect(&web.addr().to_string(), None, &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.raw_head);
    // SOCKS5 with "no authentication" from the allowlisted address.
    let mut c = gw.conn_from(allowed);
    let s = socks5(&mut c, None, 1, &SocksAddr::of(web.addr())).unwrap();
    assert_eq!(s, SocksOutcome::Reply(0));
    // Rules in the username are still read; the password is ignored.
    let mut c = gw.conn_from(allowed);
    let r = c
        .connect(
            &web.addr().to_string(),
            Some(("package-15-country-gb", "ignored")),
            &[],
        )
        .unwrap();
    assert_error(&r, 502, "NODE_NOT_FOUND", &["gb"]);
    // Anyone else without credentials.
    let r = gw.conn().get(&web.url("/ip"), None, &[]).unwrap();
    assert_error(&r, 407, "ERR_AUTH_REQUIRED", &[]);
    // …or with the username of the ip package.
    let r = connect(&gw, web.addr(), "package-15-country-us", "key15_ip");
    assert_error(&r, 407, "IP_NOT_ALLOWED", &[]);
}

#[test]
fn ip_only_listener_admits_only_its_allowlist() {
    let web = HttpTarget::start();
    let (gw, allowed, _) = ip_gateway(
        &[],
        "[[listener]]\nlisten = \"127.0.0.1:@PORT_L15@\"\npackage = 15\nip_only = true\n",
    );
    let port = gw.addr("L15");
    let ok = eventually(Duration::from_secs(3), Duration::from_millis(50), || {
        let mut c = Conn::open(allowed, port).ok()?;
        let r = c.connect(&web.addr().to_string(), None, &[]).ok()?;
        Some(r)
    })
    .expect("the allowlisted address gets an answer on the ip_only port");
    assert_eq!(ok.status, 200, "{}{}", ok.raw_head, ok.text());

    // Another address: accepted and closed at once, no answer.
    let outsider = client_ip();
    match Conn::open(outsider, port) {
        Err(_) => {}
        Ok(mut c) => {
            let _ = c.send(format!("CONNECT {} HTTP/1.1\r\n\r\n", web.addr()).as_bytes());
            let got = c.closed_within(Duration::from_secs(2));
            assert_eq!(got, Some(Vec::new()), "closed at once without an answer");
        }
    }
    // The port serves package 15 only.
    let mut c = Conn::open(allowed, port).unwrap();
    let r = c
        .connect(
            &web.addr().to_string(),
            Some((&user("country-us"), KEY)),
            &[],
        )
        .unwrap();
    assert_error(&r, 407, "AUTH_FAILED", &[]);
}

#[test]
fn keys_never_reach_the_log() {
    let web = HttpTarget::start();
    let echo = TcpEcho::start();
    let gw = Gateway::start_conf(&conf(node_ip()).raw("[log]\nlevel = \"debug\"\n"));
    let src = client_ip();
    let mut t = gw.tunnel(src, echo.addr(), "country-us");
    t.echo_round_trip(b"x").unwrap();
    let _ = gw.exit_ip(src, &web.url("/ip"), "country-us");
    let _ = gw.exit_ip(src, &web.url("/ip"), "contry-us");
    let _ = gw.forward(
        src,
        &web.url("/ip"),
        "package-7-country-us",
        &format!("{KEY}x"),
    );
    let _ = gw.forward(src, &web.url("/ip"), "package-9-country-us", "key9_paused");
    let mut c = gw.conn_from(src);
    let _ = socks5(
        &mut c,
        Some((&user("country-us"), KEY)),
        1,
        &SocksAddr::of(echo.addr()),
    );
    let mut c = gw.conn_from(src);
    let _ = socks5(
        &mut c,
        Some((&user("country-us"), "wrongkey")),
        1,
        &SocksAddr::of(echo.addr()),
    );
    drop(t);
    std::thread::sleep(Duration::from_millis(300));
    let log = gw.log();
    for k in [KEY, "key9_paused"] {
        let leaks: Vec<&str> = log.lines().filter(|l| l.contains(k)).collect();
        assert!(
            leaks.is_empty(),
            "the key {k} is in the log:\n{}",
            leaks.join("\n")
        );
    }

    // A client that puts the key in the username: that line is still a key.
    let _ = gw.forward(
        src,
        &web.url("/ip"),
        &format!("package-7-country-us-{KEY}"),
        "x",
    );
    std::thread::sleep(Duration::from_millis(300));
    let log = gw.log();
    let leaks: Vec<&str> = log.lines().filter(|l| l.contains(KEY)).collect();
    assert!(
        leaks.is_empty(),
        "a key sent in the username is logged:\n{}",
        leaks.join("\n")
    );
}

#[test]
fn loopback_in_any_spelling_is_disallowed_without_allow_targets() {
    // SPEC 7 with the default safety: no exit to loopback or private
    // addresses, whatever way the client spells them.
    let web = HttpTarget::start();
    let port = web.addr().port();
    let mut conf = Conf::with_package(KEY).node(NodeDecl::direct("d1", node_ip()));
    conf.allow_targets = Vec::new();
    let gw = Gateway::start_conf(&conf);
    let u = user("country-us");
    let must_disallow = [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("LOCALHOST:{port}"),
        format!("localhost.:{port}"),
        format!("[::1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("0.0.0.0:{port}"),
    ];
    for t in &must_disallow {
        let r = connect(&gw, t, &u, KEY);
        assert_error(&r, 403, "DISALLOWED", &[]);
    }
    // Numeric spellings that resolvers may read as 127.0.0.1: refused one
    // way or another, never connected.
    for t in [
        format!("2130706433:{port}"),
        format!("0x7f000001:{port}"),
        format!("017700000001:{port}"),
        format!("127.1:{port}"),
        format!("0177.0.0.1:{port}"),
    ] {
        let r = connect(&gw, &t, &u, KEY);
        assert_ne!(
            r.status, 200,
            "CONNECT {t} reached loopback: {}",
            r.raw_head
        );
    }
    let r = gw
        .conn()
        .get(&format!("http://localhost:{port}/ip"), Some((&u, KEY)), &[])
        .unwrap();
    assert_error(&r, 403, "DISALLOWED", &[]);
    let mut c = gw.conn();
    let s = socks5(
        &mut c,
        Some((&u, KEY)),
        1,
        &SocksAddr::Domain("localhost".into(), port),
    )
    .unwrap();
    assert_eq!(s, SocksOutcome::Reply(2));
    assert_eq!(
        web.connections(),
        0,
        "a loopback target was reached: {:?}",
        web.peers()
    );
}

#[test]
fn a_407_keeps_the_connection_for_the_retry_with_credentials() {
    let echo = TcpEcho::start();
    let gw = Gateway::start_conf(&conf(node_ip()));
    let mut c = gw.conn();
    let t = echo.addr().to_string();
    let r = c.connect(&t, None, &[]).unwrap();
    assert_error(&r, 407, "ERR_AUTH_REQUIRED", &[]);
    if r.header("Connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    {
        return; // closing is allowed; then the client reconnects
    }
    let r = c
        .connect(&t, Some((&user("country-us"), KEY)), &[])
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.raw_head);
    c.echo_round_trip(b"after the challenge").unwrap();
}

#[test]
fn the_basic_scheme_is_case_insensitive() {
    let (web, gw, _) = lab();
    let b = basic(&user("country-us"), KEY);
    let token = b.trim_start_matches("Basic ");
    for scheme in ["basic", "BASIC"] {
        let mut c = gw.conn();
        let r = c
            .get(
                &web.url("/ip"),
                None,
                &[&format!("Proxy-Authorization: {scheme} {token}")],
            )
            .unwrap();
        assert_eq!(r.status, 200, "scheme {scheme}: {}", r.raw_head);
    }
}
