//! Absolute-form HTTP forwarding: keep-alive, bodies in both framings, HEAD,
//! what never reaches the target, `Respond-With`, and forwarding through
//! `http` and `socks5` nodes.

use std::time::Duration;

use splicegate_tests::*;

fn gateway_with_direct(n1: std::net::Ipv4Addr) -> Gateway {
    Gateway::start_conf(&Conf::with_package(KEY).node(NodeDecl::direct("us-ny-1", n1)))
}

/// A web target, a gateway with one direct node, a connection to it, and
/// the node's address.
fn lab() -> (HttpTarget, Gateway, Conn, std::net::Ipv4Addr) {
    let n1 = node_ip();
    let web = HttpTarget::start();
    let gw = gateway_with_direct(n1);
    let c = gw.conn();
    (web, gw, c, n1)
}

#[test]
fn curl_forwards_a_get_and_the_target_sees_the_node() {
    let n1 = node_ip();
    let web = HttpTarget::start();
    let gw = gateway_with_direct(n1);
    let out = gw
        .curl()
        .user(&user("country-us"), KEY)
        .get(&web.url("/ip"));
    assert_eq!(out.ok_body().trim(), n1.to_string(), "{out:#?}");
    assert_eq!(
        out.heads.len(),
        1,
        "forwarding: no CONNECT answer; {out:#?}"
    );
}

#[test]
fn keep_alive_carries_several_requests_on_one_client_connection() {
    let n1 = node_ip();
    let web = HttpTarget::start();
    let web2 = HttpTarget::start();
    let gw = gateway_with_direct(n1);
    let mut c = gw.conn();
    let u = user("country-us");
    for i in 0..5 {
        let r = c.get(&web.url("/ip"), Some((&u, KEY)), &[]).unwrap();
        assert_eq!(r.status, 200, "request {i}: {}", r.raw_head);
        assert_eq!(r.text().trim(), n1.to_string());
    }
    // Another origin on the same client connection.
    let r = c.get(&web2.url("/ip"), Some((&u, KEY)), &[]).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text().trim(), n1.to_string());
    let r = c.get(&web.url("/bytes/10"), Some((&u, KEY)), &[]).unwrap();
    assert_eq!(r.text(), "abcdefghij");
    assert_eq!(web.requests().len(), 6);
    assert_eq!(web2.requests().len(), 1);
}

#[test]
fn content_length_and_chunked_bodies_both_ways() {
    let (web, _gw, mut c, _) = lab();
    let u = user("country-us");
    let auth = format!("Proxy-Authorization: {}", basic(&u, KEY));

    // Content-Length request body, Content-Length response.
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let r = c
        .request("POST", &web.url("/echo"), Some((&u, KEY)), &[], Some(&body))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.raw_head);
    assert!(
        r.body == body,
        "CL body came back different ({} bytes)",
        r.body.len()
    );

    // Chunked request body, chunked response.
    let mut req = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\n{auth}\r\nTransfer-Encoding: chunked\r\n\r\n",
        web.url("/echo"),
        web.addr()
    )
    .into_bytes();
    req.extend_from_slice(b"5\r\nhello\r\n1;ext=1\r\n,\r\n6\r\n world\r\n0\r\n\r\n");
    c.send(&req).unwrap();
    let r = c.read_response("POST").unwrap();
    assert_eq!(r.status, 200, "{}", r.raw_head);
    assert!(r.chunked, "the target answered chunked: {}", r.raw_head);
    assert_eq!(r.text(), "hello, world");
    let seen = web.requests();
    let last = seen.last().unwrap();
    assert!(last.chunked && last.body == b"hello, world", "{last:?}");

    // Chunked response to a GET, with a trailer.
    let r = c.get(&web.url("/chunked"), Some((&u, KEY)), &[]).unwrap();
    assert_eq!(r.text(), "hello, chunked world\n");

    // The framing held: the connection still works.
    let r = c.get(&web.url("/ip"), Some((&u, KEY)), &[]).unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn head_gets_no_body_and_the_connection_stays_usable() {
    let (web, _gw, mut c, _) = lab();
    let u = user("country-us");
    let r = c
        .request("HEAD", &web.url("/bytes/5000"), Some((&u, KEY)), &[], None)
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Length"), Some("5000"));
    let r = c.get(&web.url("/bytes/3"), Some((&u, KEY)), &[]).unwrap();
    assert_eq!(r.text(), "abc", "the HEAD answer carried no body bytes");
}

#[test]
fn a_response_framed_by_close_is_relayed_whole() {
    let (web, _gw, mut c, n1) = lab();
    let r = c
        .get(&web.url("/close"), Some((&user("country-us"), KEY)), &[])
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text().trim(), n1.to_string());
}

#[test]
fn proxy_and_hop_by_hop_headers_never_reach_the_target() {
    let (web, _gw, mut c, _) = lab();
    let u = user("country-us-session-hdr1");
    let r = c
        .get(
            &web.url("/head"),
            Some((&u, KEY)),
            &[
                "Proxy-Connection: keep-alive",
                "Respond-With: ip,node",
                "Connection: keep-alive, X-Hop-Secret",
                "X-Hop-Secret: hop",
                "Keep-Alive: timeout=5",
                "X-End-To-End: kept",
            ],
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.raw_head);
    let seen = web.requests().last().unwrap().head.to_ascii_lowercase();
    for name in [
        "proxy-authorization",
        "proxy-connection",
        "respond-with",
        "x-hop-secret",
        "keep-alive:",
    ] {
        assert!(!seen.contains(name), "{name} reached the target:\n{seen}");
    }
    assert!(
        !seen.contains(&KEY.to_ascii_lowercase()),
        "the key reached the target:\n{seen}"
    );
    assert!(
        seen.contains("x-end-to-end: kept"),
        "an end-to-end header was lost:\n{seen}"
    );
    assert!(
        seen.starts_with("get /head http/1.1\r\n"),
        "the target gets origin-form:\n{seen}"
    );
    // The Respond-With answer came back to the client.
    assert!(r.header("X-SOAX-Ip").is_some(), "{}", r.raw_head);
}

#[test]
fn respond_with_headers_on_a_forwarded_response() {
    let (web, _gw, mut c, n1) = lab();
    let r = c
        .get(
            &web.url("/ip"),
            Some((&user("country-us-session-fw9"), KEY)),
            &["Respond-With: ip,country,city,isp,asn,node,session"],
        )
        .unwrap();
    assert_eq!(r.status, 200);
    let ip = n1.to_string();
    assert_eq!(r.text().trim(), ip);
    for (h, v) in [
        ("X-SOAX-Ip", ip.as_str()),
        ("X-SOAX-Country", "us"),
        ("X-SOAX-City", "new_york"),
        ("X-SOAX-Isp", "verizon_wireless"),
        ("X-SOAX-Asn", "701"),
        ("X-SOAX-Node", "us-ny-1"),
        ("X-SOAX-Session", "fw9"),
    ] {
        assert_eq!(r.header(h), Some(v), "{h}: {}", r.raw_head);
    }
}

#[test]
fn every_forwarded_request_on_keep_alive_passes_the_checks_again() {
    let (web, _gw, mut c, _) = lab();
    let r = c
        .get(&web.url("/ip"), Some((&user("country-us"), KEY)), &[])
        .unwrap();
    assert_eq!(r.status, 200);
    // Same connection, now a bad rule: a 400 for this request only.
    let r = c
        .get(&web.url("/ip"), Some((&user("contry-us"), KEY)), &[])
        .unwrap();
    assert_error(&r, 400, "ERR_UNKNOWN_PARAM", &["contry"]);
}

#[test]
fn forwarding_through_an_http_node_and_a_socks5_node() {
    let tp = Tinyproxy::start(node_ip());
    let ms = Microsocks::start(node_ip(), None);
    let web = HttpTarget::start();
    let gw = Gateway::start_conf(
        &Conf::with_package(KEY)
            .node(NodeDecl::http("tiny", tp.addr()).s("city", "chicago"))
            .node(NodeDecl::socks5("micro", ms.addr())),
    );
    let src = client_ip();
    let via_http = gw.exit_ok(src, &web.url("/ip"), "country-us-city-chicago");
    assert_eq!(via_http, tp.addr().ip().to_string(), "{}", tp.log());
    let via_socks = gw.exit_ok(src, &web.url("/ip"), "country-us-city-new_york");
    assert_eq!(via_socks, ms.addr().ip().to_string());
    assert_eq!(
        web.peers(),
        vec![tp.addr().ip(), ms.addr().ip()],
        "each request left from its node"
    );
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let web = HttpTarget::start();
    let gw = gateway_with_direct(node_ip());
    let auth = format!("Proxy-Authorization: {}", basic(&user("country-us"), KEY));
    let mut batch = String::new();
    for n in [3, 5, 7] {
        batch.push_str(&format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\n{auth}\r\n\r\n",
            web.url(&format!("/bytes/{n}")),
            web.addr()
        ));
    }
    let mut c = gw.conn();
    c.send(batch.as_bytes()).unwrap();
    for want in ["abc", "abcde", "abcdefg"] {
        let r = c.read_response("GET").unwrap();
        assert_eq!(r.status, 200, "{}", r.raw_head);
        assert_eq!(r.text(), want);
    }
}

#[test]
fn a_large_forwarded_response_arrives_intact() {
    let (web, _gw, mut c, _) = lab();
    let n = 8_000_000usize;
    let r = c
        .get(
            &web.url(&format!("/bytes/{n}")),
            Some((&user("country-us"), KEY)),
            &[],
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), n);
    assert!(
        r.body
            .iter()
            .enumerate()
            .all(|(i, b)| *b == b'a' + (i % 26) as u8)
    );
    let r = c
        .get(&web.url("/bytes/2"), Some((&user("country-us"), KEY)), &[])
        .unwrap();
    assert_eq!(r.text(), "ab");
}

#[test]
fn errors_on_keep_alive_leave_the_connection_usable_when_it_says_so() {
    let web = HttpTarget::start();
    let closed = ClosedPort::new();
    let gw = gateway_with_direct(node_ip());
    let mut c = gw.conn();
    let u = user("country-us");
    let r = c
        .get(&format!("http://{}/", closed.addr()), Some((&u, KEY)), &[])
        .unwrap();
    assert_error(&r, 502, "TARGET_UNREACHABLE", &[]);
    let bad = c.get(&web.url("/ip"), Some((&user("contry-us"), KEY)), &[]);
    let r = match (r.header("Connection"), bad) {
        (Some(v), Ok(bad)) if v.eq_ignore_ascii_case("keep-alive") => bad,
        (Some(v), Err(e)) if v.eq_ignore_ascii_case("keep-alive") => {
            panic!("the error said keep-alive but the connection was closed: {e}")
        }
        _ => return,
    };
    assert_error(&r, 400, "ERR_UNKNOWN_PARAM", &[]);
    if r.header("Connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("keep-alive"))
    {
        let ok = c.get(&web.url("/ip"), Some((&u, KEY)), &[]).unwrap();
        assert_eq!(ok.status, 200, "{}", ok.raw_head);
    }
}

#[test]
fn an_http_1_0_client_is_served_and_closed() {
    let (web, _gw, mut c, n1) = lab();
    c.send(
        format!(
            "GET {} HTTP/1.0\r\nProxy-Authorization: {}\r\n\r\n",
            web.url("/ip"),
            basic(&user("country-us"), KEY)
        )
        .as_bytes(),
    )
    .unwrap();
    let r = c.read_response("GET").unwrap();
    assert_eq!(r.status, 200, "{}", r.raw_head);
    assert_eq!(r.text().trim(), n1.to_string());
    assert!(
        c.closed_within(std::time::Duration::from_secs(3)).is_some(),
        "HTTP/1.0 without keep-alive closes"
    );
}

/// A per-worker series of `/metrics`, summed over the workers.
fn summed(gw: &Gateway, name: &str) -> u64 {
    let prefix = format!("{name}{{");
    gw.metrics()
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Requests without a session leave their upstream connection idle for
/// the next request of the same package through the same node to the same
/// target; another package never gets it, and one the target closed is
/// not used.
#[test]
fn a_rotating_requests_upstream_connection_serves_its_package_again_and_only_it() {
    let n1 = node_ip();
    let web = HttpTarget::start();
    let gw = Gateway::start_conf(
        &Conf::with_package(KEY)
            .package(PkgDecl::new(8, "acme", "pk_E2E_other_8"))
            .node(NodeDecl::direct("us-ny-1", n1)),
    );
    // One client connection, so one worker (each has its own idle set).
    let mut c = gw.conn();
    let seven = user("country-us");
    let get = |c: &mut Conn, path: &str, who: (&str, &str)| {
        let r = c.get(&web.url(path), Some(who), &[]).unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.raw_head);
        assert_eq!(r.text().trim(), n1.to_string(), "{path} left from the node");
    };
    for _ in 0..5 {
        get(&mut c, "/ip", (&seven, KEY));
    }
    assert_eq!(
        web.connections(),
        1,
        "five requests of package 7, one connection"
    );
    // Package 8 through the same node to the same target: its own.
    for _ in 0..3 {
        get(&mut c, "/ip", ("package-8-country-us", "pk_E2E_other_8"));
    }
    assert_eq!(web.connections(), 2, "package 8 never takes package 7's");
    // The target closes package 7's connection after this answer; the next
    // request of package 7 still gets through, on a new connection.
    get(&mut c, "/then-close", (&seven, KEY));
    get(&mut c, "/ip", (&seven, KEY));
    get(&mut c, "/ip", (&seven, KEY));
    assert_eq!(web.connections(), 3, "one new connection after the close");
    assert_eq!(
        web.requests().len(),
        11,
        "every request reached the target once"
    );
    // `/metrics` counts the reuses: 6 for package 7 (4 of its first five
    // requests, the `/then-close` one and the last), 2 for package 8's
    // three. Each is counted just after its answer is written, so the last
    // may trail the client by a moment.
    let reuses = eventually(Duration::from_secs(3), Duration::from_millis(20), || {
        Some(summed(&gw, "splicegate_upstream_reuses_total")).filter(|&n| n >= 8)
    });
    assert_eq!(reuses, Some(8), "{}", gw.metrics());
}

/// However many nodes a package draws from, a worker keeps at most 16
/// idle connections to one target: an origin that serves a connection per
/// thread is never starved by connections waiting in the gateway.
#[test]
fn idle_upstream_connections_to_one_target_are_bounded() {
    let web = HttpTarget::start();
    let mut conf = Conf::with_package(KEY);
    for i in 0..24 {
        conf = conf.node(NodeDecl::direct(&format!("n{i}"), node_ip()));
    }
    let gw = Gateway::start_conf(&conf);
    let mut c = gw.conn();
    let u = user("country-us");
    for i in 0..72 {
        let r = c.get(&web.url("/ip"), Some((&u, KEY)), &[]).unwrap();
        assert_eq!(r.status, 200, "request {i}: {}", r.raw_head);
    }
    // The gauge is published on the workers' 250 ms tick: read it after
    // two, so it holds what the last request left.
    std::thread::sleep(Duration::from_millis(600));
    let held = summed(&gw, "splicegate_upstreams_idle");
    assert!(held > 0, "some connections kept: {}", gw.metrics());
    assert!(held <= 16, "{held} idle connections to one target");
    assert!(
        web.connections() < 72,
        "some requests reused a connection: {}",
        web.connections()
    );
}

/// A node patched to another source address lets its idle connections
/// go: the next request leaves from the new address.
#[test]
fn a_patched_nodes_idle_connections_are_not_reused() {
    let (a, b) = (node_ip(), node_ip());
    let web = HttpTarget::start();
    let gw = Gateway::start_conf(&Conf::with_package(KEY));
    gw.created(
        "/v1/nodes",
        &format!(r#"{{"id": "api-n", "kind": "direct", "bind": "{a}", "country": "us"}}"#),
    );
    let mut c = gw.conn();
    let u = user("country-us");
    let exit = |c: &mut Conn| {
        let r = c.get(&web.url("/ip"), Some((&u, KEY)), &[]).unwrap();
        assert_eq!(r.status, 200, "{}", r.raw_head);
        r.text().trim().to_string()
    };
    assert_eq!(exit(&mut c), a.to_string());
    assert_eq!(exit(&mut c), a.to_string());
    assert_eq!(
        web.connections(),
        1,
        "the second request reused the first's"
    );
    gw.patched("/v1/nodes/api-n", &format!(r#"{{"bind": "{b}"}}"#));
    assert_eq!(
        exit(&mut c),
        b.to_string(),
        "the patched node's new address"
    );
    assert_eq!(web.connections(), 2);
}
