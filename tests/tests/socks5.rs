//! SOCKS5 on the proxy port: IPv4, IPv6 and domain targets, unsupported
//! commands and address types, authentication, the reply code of every error
//! class (SPEC 4), and malformed messages.

use std::net::IpAddr;
use std::time::Duration;

use splicegate_tests::*;

fn ip_over_tunnel(c: &mut Conn) -> String {
    c.send(b"GET /ip HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    c.read_response("GET").unwrap().text().trim().to_string()
}

#[test]
fn socks5_connect_to_an_ipv4_target() {
    let n1 = node_ip();
    let echo = TcpEcho::start();
    let web = HttpTarget::start();
    let gw = Gateway::with_direct(n1);
    let (mut c, s) = gw.socks_as(client_ip(), &user("country-us"), KEY, echo.addr());
    assert_eq!(s, SocksOutcome::Reply(0));
    c.echo_round_trip(b"socks5 payload \x00\x01\x02").unwrap();
    assert_eq!(echo.peers(), vec![IpAddr::V4(n1)]);
    // curl --socks5 (curl resolves, sends IPv4).
    let out = Curl::new(client_ip())
        .socks5(gw.proxy)
        .user(&user("country-us"), KEY)
        .get(&web.url("/ip"));
    assert_eq!(out.ok_body().trim(), n1.to_string(), "{out:#?}");
}

#[test]
fn socks5_domain_target_resolved_by_the_gateway() {
    let n1 = node_ip();
    let web = HttpTarget::start();
    let gw = Gateway::with_direct(n1);
    let url = format!("http://localhost:{}/ip", web.addr().port());
    let out = Curl::new(client_ip())
        .socks5h(gw.proxy)
        .user(&user("country-us"), KEY)
        .get(&url);
    assert_eq!(out.ok_body().trim(), n1.to_string(), "{out:#?}");
    let mut c = gw.conn();
    let s = socks5(
        &mut c,
        Some((&user("country-us"), KEY)),
        1,
        &SocksAddr::Domain("localhost".into(), web.addr().port()),
    )
    .unwrap();
    assert_eq!(s, SocksOutcome::Reply(0));
    assert_eq!(ip_over_tunnel(&mut c), n1.to_string());
    // A name that does not resolve: the target is unreachable.
    let mut c = gw.conn();
    let s = socks5(
        &mut c,
        Some((&user("country-us"), KEY)),
        1,
        &SocksAddr::Domain("no-such-host.invalid".into(), 80),
    )
    .unwrap();
    assert_eq!(
        s,
        SocksOutcome::Reply(5),
        "unresolvable name: TARGET_UNREACHABLE"
    );
}

#[test]
fn socks5_to_an_ipv6_target() {
    let echo6 = TcpEcho::start_on("::1".parse().unwrap());
    let node = TestNode::socks5(node_ip());
    let gw = Gateway::start_conf(
        &Conf::with_package(KEY)
            .node(NodeDecl::direct("d6", "::1").s("city", "new_york"))
            .node(NodeDecl::socks5("s1", node.addr()).s("city", "chicago")),
    );
    let target = SocksAddr::of(echo6.addr());
    for city in ["new_york", "chicago"] {
        let (mut c, s) = gw.socks_as(
            client_ip(),
            &user(&format!("country-us-city-{city}")),
            KEY,
            target.clone(),
        );
        assert_eq!(s, SocksOutcome::Reply(0), "via {city}");
        c.echo_round_trip(b"v6").unwrap();
    }
    assert_eq!(
        node.requests(),
        vec![format!("[::1]:{}", echo6.addr().port())]
    );
}

#[test]
fn bind_gets_07_udp_associate_00_unknown_address_type_08() {
    let echo = TcpEcho::start();
    let gw = Gateway::with_direct(node_ip());
    // UDP ASSOCIATE is served (tests/tests/socks5_udp.rs has the datagrams).
    let mut c = gw.conn();
    let s = socks5(
        &mut c,
        Some((&user("country-us"), KEY)),
        3,
        &SocksAddr::of(echo.addr()),
    )
    .unwrap();
    assert_eq!(s, SocksOutcome::Reply(0), "UDP ASSOCIATE");
    let mut c = gw.conn();
    let s = socks5(
        &mut c,
        Some((&user("country-us"), KEY)),
        2,
        &SocksAddr::of(echo.addr()),
    )
    .unwrap();
    assert_eq!(s, SocksOutcome::Reply(7), "BIND");
    let mut c = gw.conn();
    let u = user("country-us");
    let mut hello = vec![5u8, 1, 2, 1, u.len() as u8];
    hello.extend_from_slice(u.as_bytes());
    hello.push(KEY.len() as u8);
    hello.extend_from_slice(KEY.as_bytes());
    c.send(&hello).unwrap();
    assert_eq!(c.read_n(4).unwrap(), vec![5, 2, 1, 0]);
    let s = socks5_request_raw(&mut c, &[9, 1, 2, 3, 4, 0, 80]);
    assert_eq!(s, SocksOutcome::Reply(8));
}

fn socks5_request_raw(c: &mut Conn, addr: &[u8]) -> SocksOutcome {
    splicegate_tests::client::socks5_request(c, 1, addr).unwrap()
}

#[test]
fn socks5_authentication_failures() {
    let allowed = client_ip();
    let web = HttpTarget::start();
    let gw = Gateway::start_conf(
        &Conf::with_package(KEY)
            .package(PkgDecl::new(9, "acme", "key9").set("status", "\"paused\""))
            .package(
                PkgDecl::new(11, "acme", "key11")
                    .set("auth", "\"password+ip\"")
                    .set("ip_allowlist", &format!("[\"{allowed}/32\"]")),
            )
            .node(NodeDecl::direct("d1", node_ip())),
    );
    let t = SocksAddr::of(web.addr());
    for (u, k) in [
        (user("country-us"), "wrong"),
        ("package-99-country-us".to_string(), KEY),
        ("customer-7".to_string(), KEY),
        ("package-9-country-us".to_string(), "key9"),
        ("package-11-country-us".to_string(), "key11"),
    ] {
        let mut c = gw.conn();
        let s = socks5(&mut c, Some((&u, k)), 1, &t).unwrap();
        assert_eq!(s, SocksOutcome::AuthStatus(1), "{u}");
        assert!(
            c.closed_within(Duration::from_secs(2)).is_some(),
            "{u}: closed after a failed auth"
        );
    }
    // No username/password offered where one is required: method 0xFF.
    let mut c = gw.conn();
    assert_eq!(socks5(&mut c, None, 1, &t).unwrap(), SocksOutcome::NoMethod);
    // The allowlisted address with the key is in.
    let mut c = gw.conn_from(allowed);
    assert_eq!(
        socks5(&mut c, Some(("package-11-country-us", "key11")), 1, &t).unwrap(),
        SocksOutcome::Reply(0)
    );
}

#[test]
fn every_error_class_has_its_socks5_reply() {
    let web = HttpTarget::start();
    let hole = Blackhole::start();
    let mut dead = TestNode::http(node_ip());
    let mut conf = Conf::with_package(KEY)
        .package(PkgDecl::new(8, "acme", "key8").set("rps_limit", "1"))
        .node(NodeDecl::direct("d1", node_ip()))
        .node(NodeDecl::http("dead", dead.addr()).s("city", "chicago"));
    conf.target_ms = 1000;
    let gw = Gateway::start_conf(&conf);
    dead.stop();
    let closed = ClosedPort::new();
    let web_t = SocksAddr::of(web.addr());
    let ask = |rules: &str, target: &SocksAddr| -> SocksOutcome {
        let mut c = gw.conn();
        socks5(&mut c, Some((&user(rules), KEY)), 1, target).unwrap()
    };
    let cases: Vec<(&str, &str, SocksAddr, u8)> = vec![
        ("ERR_UNKNOWN_PARAM", "contry-us", web_t.clone(), 2),
        ("ERR_MISSING_PARAMS", "", web_t.clone(), 2),
        (
            "ERR_INVALID_COMBINATION",
            "country-us-bind-node",
            web_t.clone(),
            2,
        ),
        (
            "DISALLOWED",
            "country-us",
            SocksAddr::V4("127.0.0.1".parse().unwrap(), 25),
            2,
        ),
        (
            "DISALLOWED private",
            "country-us",
            SocksAddr::V4("10.0.0.1".parse().unwrap(), 80),
            2,
        ),
        ("NODE_NOT_FOUND", "country-gb", web_t.clone(), 3),
        (
            "NODE_UNAVAILABLE",
            "country-us-city-chicago-onerror-fail",
            web_t.clone(),
            4,
        ),
        (
            "TARGET_UNREACHABLE",
            "country-us-city-new_york",
            SocksAddr::of(closed.addr()),
            5,
        ),
        (
            "GATEWAY_TIMEOUT",
            "country-us-city-new_york",
            SocksAddr::of(hole.addr()),
            6,
        ),
    ];
    for (what, rules, target, reply) in &cases {
        assert_eq!(ask(rules, target), SocksOutcome::Reply(*reply), "{what}");
    }
    // SESSION_PARAMS_MISMATCH → 2.
    assert_eq!(
        ask("country-us-city-new_york-session-sm", &web_t),
        SocksOutcome::Reply(0)
    );
    assert_eq!(
        ask("country-any-session-sm", &web_t),
        SocksOutcome::Reply(2),
        "SESSION_PARAMS_MISMATCH"
    );
    // BOUND_NODE_FAILED → 4: a session bound to the dead node (the only
    // node in chicago, so the session cannot land anywhere else).
    assert_eq!(
        ask("country-us-city-chicago-session-bd-bind-node", &web_t),
        SocksOutcome::Reply(4),
        "BOUND_NODE_FAILED"
    );
    // RATE_LIMIT_EXCEEDED → 2.
    let mut replies = Vec::new();
    for _ in 0..5 {
        let mut c = gw.conn();
        replies.push(socks5(&mut c, Some(("package-8-country-us", "key8")), 1, &web_t).unwrap());
    }
    assert!(replies.contains(&SocksOutcome::Reply(0)), "{replies:?}");
    assert!(
        replies.contains(&SocksOutcome::Reply(2)),
        "rps 1: {replies:?}"
    );
}

#[test]
fn a_full_session_table_is_socks5_general_failure() {
    let web = HttpTarget::start();
    let mut conf = Conf::with_package(KEY).node(NodeDecl::direct("d1", node_ip()));
    conf.session_capacity = 1;
    let gw = Gateway::start_conf(&conf);
    let t = SocksAddr::of(web.addr());
    let mut last = None;
    for i in 0..200 {
        let (_c, s) = gw.socks_as(
            client_ip(),
            &user(&format!("country-us-session-f{i}")),
            KEY,
            t.clone(),
        );
        if s != SocksOutcome::Reply(0) {
            last = Some(s);
            break;
        }
    }
    assert_eq!(last, Some(SocksOutcome::Reply(1)), "OVERLOADED");
}

#[test]
fn malformed_socks5_messages_close_the_connection() {
    let web = HttpTarget::start();
    let gw = Gateway::with_direct(node_ip());
    let u = user("country-us");
    let mut auth = vec![1u8, u.len() as u8];
    auth.extend_from_slice(u.as_bytes());
    auth.push(KEY.len() as u8);
    auth.extend_from_slice(KEY.as_bytes());
    let mut addr = vec![1u8, 127, 0, 0, 1];
    addr.extend_from_slice(&web.addr().port().to_be_bytes());

    // Request with version 4 after a good handshake.
    let mut c = gw.conn();
    c.send(&[5, 1, 2]).unwrap();
    assert_eq!(c.read_n(2).unwrap(), vec![5, 2]);
    c.send(&auth).unwrap();
    assert_eq!(c.read_n(2).unwrap(), vec![1, 0]);
    let mut req = vec![4u8, 1, 0];
    req.extend_from_slice(&addr);
    c.send(&req).unwrap();
    assert!(
        c.closed_within(Duration::from_secs(2)).is_some(),
        "request version 4"
    );

    // Sub-negotiation version 2.
    let mut c = gw.conn();
    c.send(&[5, 1, 2]).unwrap();
    assert_eq!(c.read_n(2).unwrap(), vec![5, 2]);
    let mut bad = auth.clone();
    bad[0] = 2;
    c.send(&bad).unwrap();
    let got = c.closed_within(Duration::from_secs(2));
    assert!(
        matches!(got.as_deref(), Some([]) | Some([_, 1])),
        "sub-negotiation version 2: {got:?}"
    );

    // A greeting with no methods.
    let mut c = gw.conn();
    c.send(&[5, 0]).unwrap();
    let got = c.closed_within(Duration::from_secs(2));
    assert!(
        matches!(got.as_deref(), Some([]) | Some([5, 0xFF])),
        "no methods: {got:?}"
    );

    // After all that, a good client.
    let (_c, s) = gw.socks_as(client_ip(), &u, KEY, web.addr());
    assert_eq!(s, SocksOutcome::Reply(0));
}

#[test]
fn socks5_request_and_payload_in_one_write() {
    let echo = TcpEcho::start();
    let gw = Gateway::with_direct(node_ip());
    let u = user("country-us");
    let mut m = vec![5u8, 1, 2, 1, u.len() as u8];
    m.extend_from_slice(u.as_bytes());
    m.push(KEY.len() as u8);
    m.extend_from_slice(KEY.as_bytes());
    m.extend_from_slice(&[5, 1, 0]);
    m.extend_from_slice(&SocksAddr::of(echo.addr()).encode());
    m.extend_from_slice(b"pipelined payload");
    let mut c = gw.conn();
    c.send(&m).unwrap();
    assert_eq!(c.read_n(2).unwrap(), vec![5, 2]);
    assert_eq!(c.read_n(2).unwrap(), vec![1, 0]);
    let reply = c.read_n(10).unwrap();
    assert_eq!(reply[..2], [5, 0], "{reply:?}");
    assert_eq!(c.read_n(17).unwrap(), b"pipelined payload");
}
