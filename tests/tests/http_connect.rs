//! HTTP CONNECT tunnels through every kind of node: `direct`, `http` (our
//! node and tinyproxy) and `socks5` (our node and microsocks), with payload
//! round trips and the exit address the target sees.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::time::Duration;

use splicegate_tests::*;

const RESPOND_WITH: &str = "Respond-With: ip,country,city,isp,asn,node,session";

/// A gateway whose only node is `node`: a tunnel carries `payload` to an
/// echo target and back, and curl -p fetches the web target's `/ip`.
/// Both targets and curl's output (the exit address in its body).
fn through(node: NodeDecl, payload: &[u8]) -> (TcpEcho, HttpTarget, CurlOut) {
    let echo = TcpEcho::start();
    let web = HttpTarget::start();
    let gw = Gateway::start_conf(&Conf::with_package(KEY).node(node));
    let mut c = gw.tunnel(client_ip(), echo.addr(), "country-us");
    c.echo_round_trip(payload).unwrap();
    let out = gw
        .curl()
        .user(&user("country-us"), KEY)
        .tunnel()
        .get(&web.url("/ip"));
    (echo, web, out)
}

#[test]
fn connect_through_direct_node_round_trips_bytes_and_exits_from_bind() {
    let n1 = node_ip();
    let echo = TcpEcho::start();
    let web = HttpTarget::start();
    let gw = Gateway::with_direct(n1);

    let mut c = gw.tunnel(client_ip(), echo.addr(), "country-us");
    c.echo_round_trip(b"hello through splicegate\n").unwrap();
    let all_bytes: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    c.echo_round_trip(&all_bytes).unwrap();
    assert_eq!(
        echo.peers(),
        vec![IpAddr::V4(n1)],
        "the target sees the node's bind address"
    );

    // A real client: curl -p (CONNECT) to the HTTP target.
    let out = gw
        .curl()
        .user(&user("country-us"), KEY)
        .tunnel()
        .get(&web.url("/ip"));
    assert_eq!(out.ok_body().trim(), n1.to_string(), "{out:#?}");
    assert!(
        out.first().status_line.starts_with("HTTP/1.1 200"),
        "{:?}",
        out.first().status_line
    );
}

#[test]
fn connect_carries_a_megabyte_each_way_intact() {
    let echo = TcpEcho::start();
    let gw = Gateway::with_direct(node_ip());
    let c = gw.tunnel(client_ip(), echo.addr(), "country-any");
    let data: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut w = c.stream.try_clone().unwrap();
    let d2 = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&d2));
    let mut got = vec![0u8; data.len()];
    let mut r = c.stream.try_clone().unwrap();
    r.read_exact(&mut got).unwrap();
    writer.join().unwrap().unwrap();
    assert!(got == data, "the echoed megabyte differs");
}

#[test]
fn bulk_upload_and_download_through_a_tunnel() {
    const N: u64 = 16 << 20;
    let sink = Sink::start();
    let source = Source::start(256 * 1024, Duration::ZERO, Some(N));
    let gw = Gateway::with_direct(node_ip());

    let mut up = gw.tunnel(client_ip(), sink.addr(), "country-any");
    let block = vec![0x5au8; 1 << 20];
    for _ in 0..16 {
        up.send(&block).unwrap();
    }
    up.shutdown_write();
    let got = eventually(Duration::from_secs(10), Duration::from_millis(20), || {
        (sink.received() == N).then_some(())
    });
    assert!(
        got.is_some(),
        "the sink got {} of {N} bytes",
        sink.received()
    );

    let mut down = gw.tunnel(client_ip(), source.addr(), "country-any");
    down.set_timeout(Duration::from_secs(10));
    let body = down.read_to_close(64 << 20).unwrap();
    assert_eq!(body.len() as u64, N, "downloaded bytes");
}

#[test]
fn connect_through_our_http_node_with_upstream_credentials() {
    let node = TestNode::with_creds(NodeKind::Http, node_ip(), "nodeuser", "nodepass");
    let decl = NodeDecl::http("h1", node.addr()).creds("nodeuser", "nodepass");
    let (echo, web, out) = through(decl, b"via an http node");
    assert_eq!(echo.peers(), vec![IpAddr::V4(node.ip())]);
    assert_eq!(out.ok_body().trim(), node.ip().to_string());
    assert_eq!(
        node.requests_to_port(web.addr().port()),
        1,
        "{:?}",
        node.requests()
    );
}

#[test]
fn connect_through_tinyproxy_node() {
    let tp = Tinyproxy::start(node_ip());
    let (_echo, _web, out) = through(NodeDecl::http("tiny", tp.addr()), b"via tinyproxy");
    let exit = tp.addr().ip().to_string();
    assert_eq!(out.ok_body().trim(), exit, "{}", tp.log());
}

#[test]
fn connect_through_our_socks5_node_with_upstream_credentials() {
    let node = TestNode::with_creds(NodeKind::Socks5, node_ip(), "su", "sp");
    let decl = NodeDecl::socks5("s1", node.addr()).creds("su", "sp");
    let (_echo, _web, out) = through(decl, b"via a socks5 node");
    assert_eq!(out.ok_body().trim(), node.ip().to_string());
}

#[test]
fn connect_through_microsocks_node() {
    let ms = Microsocks::start(node_ip(), Some(("msu", "msp")));
    let decl = NodeDecl::socks5("ms", ms.addr()).creds("msu", "msp");
    let (_echo, _web, out) = through(decl, b"via microsocks");
    assert_eq!(out.ok_body().trim(), ms.addr().ip().to_string());
}

#[test]
fn respond_with_headers_on_the_connect_answer() {
    let n1 = node_ip();
    let web = HttpTarget::start();
    let gw = Gateway::start_conf(&Conf::with_package(KEY).node(NodeDecl::direct("us-ny-1", n1)));
    let out = gw
        .curl()
        .user(&user("country-us-session-abc123"), KEY)
        .tunnel()
        .proxy_header(RESPOND_WITH)
        .get(&web.url("/ip"));
    assert_eq!(out.ok_body().trim(), n1.to_string());
    let h = out.first();
    assert_eq!(h.status, 200, "{h:#?}");
    assert_eq!(
        h.header("X-SOAX-Ip"),
        Some(n1.to_string().as_str()),
        "{}",
        h.raw_head
    );
    assert_eq!(h.header("X-SOAX-Country"), Some("us"), "{}", h.raw_head);
    assert_eq!(h.header("X-SOAX-City"), Some("new_york"), "{}", h.raw_head);
    assert_eq!(
        h.header("X-SOAX-Isp"),
        Some("verizon_wireless"),
        "{}",
        h.raw_head
    );
    assert_eq!(h.header("X-SOAX-Asn"), Some("701"), "{}", h.raw_head);
    assert_eq!(h.header("X-SOAX-Node"), Some("us-ny-1"), "{}", h.raw_head);
    assert_eq!(h.header("X-SOAX-Session"), Some("abc123"), "{}", h.raw_head);

    // Without Respond-With, none of them.
    let (_c, r) = gw.connect_rules(web.addr(), "country-us");
    assert_eq!(r.status, 200);
    assert!(
        !r.raw_head.to_ascii_lowercase().contains("x-soax-"),
        "{}",
        r.raw_head
    );
}

#[test]
fn connect_to_a_domain_target_resolved_by_the_gateway() {
    let n1 = node_ip();
    let echo = TcpEcho::start();
    let gw = Gateway::with_direct(n1);
    let target = format!("localhost:{}", echo.addr().port());
    let (mut c, r) = gw.connect_as(client_ip(), &target, &user("country-us"), KEY, &[]);
    assert_eq!(r.status, 200, "{}{}", r.raw_head, r.text());
    c.echo_round_trip(b"named target").unwrap();
    assert_eq!(echo.peers(), vec![IpAddr::V4(n1)]);
}

#[test]
fn connect_to_ipv6_loopback_target() {
    let echo6 = TcpEcho::start_on("::1".parse().unwrap());
    let gw = Gateway::start_conf(&Conf::with_package(KEY).node(NodeDecl::direct("d6", "::1")));
    let target = format!("[::1]:{}", echo6.addr().port());
    let (mut c, r) = gw.connect_as(client_ip(), &target, &user("country-us"), KEY, &[]);
    assert_eq!(r.status, 200, "{}{}", r.raw_head, r.text());
    c.echo_round_trip(b"over ipv6").unwrap();
}

#[test]
fn demo_echo_target_answers_with_the_exit_address() {
    let n1 = node_ip();
    let mut conf = Conf::with_package(KEY).node(NodeDecl::direct("d1", n1));
    conf.demo_echo = true;
    let gw = Gateway::start_conf(&conf);
    let url = format!("http://{}/", gw.addr("ECHO"));
    let ip = eventually(Duration::from_secs(3), Duration::from_millis(50), || {
        gw.exit_ip(client_ip(), &url, "country-any").ok()
    });
    assert_eq!(ip, Some(n1.to_string()), "{}", gw.log_tail(20));
    // Keep-alive on the built-in target: two requests, one connection.
    let mut c = gw.conn();
    for _ in 0..2 {
        let r = c.get(&url, Some((&user("country-any"), KEY)), &[]).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text().trim(), n1.to_string());
    }
}

#[test]
fn bytes_sent_right_after_connect_are_not_lost() {
    let echo = TcpEcho::start();
    let node = TestNode::http(node_ip());
    let gw = Gateway::start_conf(
        &Conf::with_package(KEY)
            .node(NodeDecl::direct("d1", node_ip()).s("city", "new_york"))
            .node(NodeDecl::http("h1", node.addr()).s("city", "chicago")),
    );
    for city in ["new_york", "chicago"] {
        // CONNECT and the first payload bytes in one write, before the 200.
        let t = echo.addr().to_string();
        let mut c = gw.conn();
        let req = format!(
            "CONNECT {t} HTTP/1.1\r\nHost: {t}\r\nProxy-Authorization: {}\r\n\r\nearly bytes!",
            basic(&user(&format!("country-us-city-{city}")), KEY)
        );
        c.send(req.as_bytes()).unwrap();
        let r = c.read_response("CONNECT").unwrap();
        assert_eq!(r.status, 200, "{city}: {}", r.raw_head);
        assert_eq!(c.read_n(12).unwrap(), b"early bytes!", "{city}");
        c.echo_round_trip(b"and more").unwrap();
    }
}

#[test]
fn half_close_delivers_everything_then_eof() {
    let echo = TcpEcho::start();
    let gw = Gateway::with_direct(node_ip());
    let mut c = gw.tunnel(client_ip(), echo.addr(), "country-us");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
    c.send(&data).unwrap();
    c.shutdown_write();
    let got = c.read_to_close(1 << 20).unwrap();
    assert_eq!(got.len(), data.len(), "bytes echoed before EOF");
    assert!(got == data);
}

#[test]
fn an_idle_tunnel_is_closed_after_idle_s() {
    let echo = TcpEcho::start();
    let mut conf = Conf::with_package(KEY).node(NodeDecl::direct("d1", node_ip()));
    conf.idle_s = 1;
    let gw = Gateway::start_conf(&conf);
    let mut busy = gw.tunnel(client_ip(), echo.addr(), "country-us");
    let mut idle = gw.tunnel(client_ip(), echo.addr(), "country-us");
    idle.echo_round_trip(b"once").unwrap();
    // Keep one tunnel busy while the other idles.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(300));
        busy.echo_round_trip(b"tick").unwrap();
    }
    assert!(
        idle.closed_within(Duration::from_secs(2)).is_some(),
        "a tunnel idle for over idle_s = 1 is still open"
    );
    busy.echo_round_trip(b"still busy").unwrap();
}
