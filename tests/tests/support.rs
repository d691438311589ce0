//! The harness checked on its own, without the gateway: our nodes, the
//! third-party nodes, the targets and the clients talk to each other as the
//! gateway's tests assume. When an end-to-end test fails, these passing says
//! the fault is not in the harness.

use std::time::{Duration, Instant};

use splicegate_tests::*;

#[test]
fn curl_through_our_http_node_sees_the_node_address() {
    let target = HttpTarget::start();
    let node = TestNode::with_creds(NodeKind::Http, node_ip(), "nu", "np");
    let out = Curl::new(client_ip())
        .proxy(node.addr())
        .user("nu", "np")
        .tunnel()
        .get(&target.url("/ip"));
    assert_eq!(out.ok_body().trim(), node.ip().to_string(), "{out:#?}");
    assert_eq!(out.first().status, 200);
    assert_eq!(node.requests_to_port(target.addr().port()), 1);

    // Wrong credentials: the node's 407; curl still prints the proxy's head.
    let out = Curl::new(client_ip())
        .proxy(node.addr())
        .user("nu", "wrong")
        .tunnel()
        .get(&target.url("/ip"));
    assert_ne!(out.code, 0);
    assert_eq!(out.first().status, 407, "{out:#?}");
}

#[test]
fn curl_through_our_socks5_node_and_behaviors() {
    let target = HttpTarget::start();
    let mut node = TestNode::with_creds(NodeKind::Socks5, node_ip(), "su", "sp");
    let out = Curl::new(client_ip())
        .socks5h(node.addr())
        .user("su", "sp")
        .get(&format!("http://localhost:{}/ip", target.addr().port()));
    assert_eq!(out.ok_body().trim(), node.ip().to_string());

    node.set(Behavior::Answer(5));
    let mut c = Conn::open(client_ip(), node.addr()).unwrap();
    let r = socks5(&mut c, Some(("su", "sp")), 1, &SocksAddr::of(target.addr())).unwrap();
    assert_eq!(r, SocksOutcome::Reply(5));

    node.set(Behavior::Normal);
    node.stop();
    // The listener closes once its thread has joined; allow the kernel a moment.
    let refused = (0..50).any(|_| {
        let r = Conn::open(client_ip(), node.addr()).is_err();
        if !r {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        r
    });
    assert!(refused, "a stopped node refuses");
    node.start();
    let mut c = Conn::open(client_ip(), node.addr()).unwrap();
    let r = socks5(&mut c, Some(("su", "sp")), 1, &SocksAddr::of(target.addr())).unwrap();
    assert_eq!(r, SocksOutcome::Reply(0));
}

#[test]
fn tinyproxy_and_microsocks_exit_from_their_address() {
    let target = HttpTarget::start();
    let tp = Tinyproxy::start(node_ip());
    let out = Curl::new(client_ip())
        .proxy(tp.addr())
        .tunnel()
        .get(&target.url("/ip"));
    assert_eq!(
        out.ok_body().trim(),
        tp.addr().ip().to_string(),
        "{}",
        tp.log()
    );

    let ms = Microsocks::start(node_ip(), Some(("mu", "mp")));
    let out = Curl::new(client_ip())
        .socks5h(ms.addr())
        .user("mu", "mp")
        .get(&target.url("/ip"));
    assert_eq!(out.ok_body().trim(), ms.addr().ip().to_string());
}

#[test]
fn http_target_framing_and_blackhole() {
    let target = HttpTarget::start();
    let mut c = Conn::new(std::net::TcpStream::connect(target.addr()).unwrap());
    c.send(b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let r = c.read_response("GET").unwrap();
    assert!(r.chunked);
    assert_eq!(r.text(), "hello, chunked world\n");
    c.send(b"HEAD /bytes/100 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let r = c.read_response("HEAD").unwrap();
    assert_eq!(r.header("content-length"), Some("100"));
    c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        .unwrap();
    let r = c.read_response("POST").unwrap();
    assert_eq!(r.text(), "abc");
    let r = c.get("http://x/ip", None, &[]).unwrap();
    assert_eq!(r.text().trim(), "127.0.0.1");

    let bh = Blackhole::start();
    let t = Instant::now();
    let r = std::net::TcpStream::connect_timeout(&bh.addr(), Duration::from_secs(1));
    assert!(r.is_err(), "a blackhole connect should not complete");
    assert!(t.elapsed() >= Duration::from_millis(900));
}
