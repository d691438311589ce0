//! The PROXY protocol on the proxy listeners (SPEC section 11): a gateway
//! behind a real HAProxy in TCP mode (`send-proxy-v2` and `send-proxy`, v1)
//! sees each client's own address, not HAProxy's, for IP authentication,
//! `ip_only` ports and bans; and raw connections to such a port with no
//! header, a malformed one, a header followed by the client's first bytes
//! in one segment, `UNKNOWN` and v2 `LOCAL` behave as specified; a SOCKS5
//! UDP association expects the header's client, not the load balancer.
//!
//! HAProxy gets its port from the kernel without a guess: the test listens
//! on `127.x:0` and hands the socket over (`Haproxy::start`, `bind fd@0`).
//! Each HAProxy connects to the gateway from an address of its own, so an
//! address check that passed on HAProxy's would show.

use std::net::{Ipv4Addr, SocketAddr};

use splicegate_proto::proxy_protocol::{Addresses, write_v1, write_v2};
use splicegate_tests::ops::sample;
use splicegate_tests::pki::TestCa;
use splicegate_tests::{
    Conf, Conn, Curl, Gateway, Haproxy, HttpTarget, KEY, NodeDecl, PkgDecl, client_ip, node_ip,
    user,
};

/// The package whose allowlist admits `allowed` by address alone (`ip`
/// auth), bound to the `ip_only` port.
const IP_PACKAGE: u32 = 8;

/// A gateway with package 7 ([`KEY`], password auth), package 8 (`ip` auth,
/// allowlist: `allowed`), a direct node, bans after 3 `AUTH_FAILED`, and
/// PROXY protocol ports: `PP` (every package) and `PPIPONLY` (package 8,
/// `ip_only`), beside the main port without it.
fn gateway(allowed: Ipv4Addr, tls: Option<(std::path::PathBuf, std::path::PathBuf)>) -> Gateway {
    Gateway::start_conf(&conf(allowed, tls))
}

/// The configuration of [`gateway`].
fn conf(allowed: Ipv4Addr, tls: Option<(std::path::PathBuf, std::path::PathBuf)>) -> Conf {
    let mut conf = Conf::with_package(KEY)
        .package(
            PkgDecl::new(IP_PACKAGE, "acme", "pk_ip_eight")
                .set("auth", "\"ip\"")
                .set("ip_allowlist", &format!("[\"{allowed}/32\"]"))
                .set("default_rules", "\"country-us\""),
        )
        .node(NodeDecl::direct("d1", node_ip()))
        .raw("[ebpf]\nenabled = false\nban_threshold = 3\nban_window_s = 60\nban_s = 600\n")
        .raw("[[listener]]\nlisten = \"127.0.0.1:@PORT_PP@\"\nproxy_protocol = true\n")
        .raw(&format!(
            "[[listener]]\nlisten = \"127.0.0.1:@PORT_PPIPONLY@\"\npackage = {IP_PACKAGE}\nip_only = true\nproxy_protocol = true\n"
        ));
    conf.tls = tls;
    conf
}

/// A forwarded `GET url` from `src` to `via`, with credentials or none.
fn get(src: Ipv4Addr, via: SocketAddr, url: &str, creds: Option<(&str, &str)>) -> (u16, String) {
    let mut c = Conn::open(src, via).unwrap_or_else(|e| panic!("connect {via} from {src}: {e}"));
    let r = c
        .get(url, creds, &["Connection: close"])
        .unwrap_or_else(|e| panic!("GET {url} from {src} via {via}: {e}"));
    (r.status, format!("{}{}", r.raw_head, r.text()))
}

/// Whether the peer closes `c` without answering a byte (EOF or reset,
/// within the connection's read timeout).
fn closed_without_answer(c: &mut Conn) -> bool {
    c.read_to_close(1 << 16).is_ok_and(|b| b.is_empty())
}

fn rejected(gw: &Gateway, reason: &str) -> f64 {
    sample(
        &gw.metrics(),
        &format!("splicegate_proxy_protocol_rejected_total{{reason=\"{reason}\"}}"),
    )
}

fn addrs(src: Ipv4Addr, dst: SocketAddr) -> Option<Addresses> {
    Some(Addresses {
        source: SocketAddr::from((src, 40_000)),
        destination: dst,
    })
}

/// Through HAProxy with `option`: the allowlisted client gets in by its
/// address alone on the shared and the `ip_only` PROXY port, another client
/// behind the same HAProxy does not, and HAProxy's own address would get
/// nowhere.
fn allowlists_see_the_client(option: &str) {
    let allowed = client_ip();
    let stranger = client_ip();
    let gw = gateway(allowed, None);
    let web = HttpTarget::start();
    let url = web.url("/ip");
    let shared = Haproxy::start(client_ip(), gw.addr("PP"), client_ip(), option);
    let ip_only = Haproxy::start(client_ip(), gw.addr("PPIPONLY"), client_ip(), option);

    let (status, text) = get(allowed, shared.addr(), &url, None);
    assert_eq!(status, 200, "{option}: {text}\n{}", shared.log());
    let (status, text) = get(stranger, shared.addr(), &url, None);
    assert_eq!(status, 407, "{option}: {text}");
    assert!(text.contains("ERR_AUTH_REQUIRED"), "{option}: {text}");
    // Password auth works as usual behind it.
    let (status, text) = get(
        stranger,
        shared.addr(),
        &url,
        Some((&user("country-us"), KEY)),
    );
    assert_eq!(status, 200, "{option}: {text}");

    // The ip_only port: served for the allowlisted client, closed at once
    // for the stranger (HAProxy then closes the client's side).
    let (status, text) = get(allowed, ip_only.addr(), &url, None);
    assert_eq!(status, 200, "{option}: {text}\n{}", ip_only.log());
    let mut c = Conn::open(stranger, ip_only.addr()).expect("connect to haproxy");
    c.send(format!("GET {url} HTTP/1.1\r\nHost: {}\r\n\r\n", web.addr()).as_bytes())
        .expect("send");
    assert!(
        closed_without_answer(&mut c),
        "{option}: the stranger was served"
    );
    let m = gw.metrics();
    assert_eq!(
        sample(
            &m,
            "splicegate_guard_closed_connections_total{reason=\"not_allowed\"}"
        ),
        1.0,
        "{option}"
    );
    for reason in ["missing", "malformed", "truncated", "timed_out"] {
        assert_eq!(rejected(&gw, reason), 0.0, "{option}: {reason}");
    }
}

#[test]
fn haproxy_send_proxy_v2_the_clients_address_is_the_one_allowlists_see() {
    allowlists_see_the_client("send-proxy-v2");
}

#[test]
fn haproxy_send_proxy_v1_the_clients_address_is_the_one_allowlists_see() {
    allowlists_see_the_client("send-proxy");
}

#[test]
fn a_ban_behind_haproxy_is_the_clients_not_the_load_balancers() {
    let gw = gateway(client_ip(), None);
    let web = HttpTarget::start();
    let url = web.url("/ip");
    let lb = Haproxy::start(client_ip(), gw.addr("PP"), client_ip(), "send-proxy-v2");
    let (guesser, neighbour) = (client_ip(), client_ip());
    // Threshold 3: the fourth AUTH_FAILED bans its source.
    for _ in 0..4 {
        let (status, text) = get(
            guesser,
            lb.addr(),
            &url,
            Some((&user("country-us"), "wrong")),
        );
        assert_eq!(status, 407, "{text}");
        assert!(text.contains("AUTH_FAILED"), "{text}");
    }
    // The guesser's next connection through HAProxy is closed at once...
    let mut c = Conn::open(guesser, lb.addr()).expect("connect to haproxy");
    c.send(format!("GET {url} HTTP/1.1\r\nHost: {}\r\n\r\n", web.addr()).as_bytes())
        .expect("send");
    assert!(
        closed_without_answer(&mut c),
        "the banned client was served"
    );
    assert_eq!(
        sample(
            &gw.metrics(),
            "splicegate_guard_closed_connections_total{reason=\"banned\"}"
        ),
        1.0
    );
    // ...while another client behind the same HAProxy is served.
    let (status, text) = get(neighbour, lb.addr(), &url, Some((&user("country-us"), KEY)));
    assert_eq!(status, 200, "{text}\n{}", lb.log());
    // The ban is the guesser's wherever it connects: the main port (no
    // PROXY protocol, its own source) closes it at accept too.
    let mut c = Conn::open(guesser, gw.proxy).expect("connect");
    c.send(format!("GET {url} HTTP/1.1\r\nHost: {}\r\n\r\n", web.addr()).as_bytes())
        .expect("send");
    assert!(closed_without_answer(&mut c), "banned on the main port too");
    assert_eq!(
        sample(
            &gw.metrics(),
            "splicegate_guard_closed_connections_total{reason=\"banned\"}"
        ),
        2.0
    );
}

#[test]
fn tls_behind_haproxy_reads_the_header_before_the_handshake() {
    let dir = splicegate_tests::gateway::temp_dir("pki");
    let ca = TestCa::new(&dir);
    let leaf = ca.leaf("gw", (2031, 7, 15));
    let allowed = client_ip();
    let gw = gateway(allowed, Some((leaf.cert.clone(), leaf.key.clone())));
    let web = HttpTarget::start();
    // curl names the proxy `localhost` (the certificate's name): HAProxy
    // listens on 127.0.0.1, on a port of its own from the kernel.
    let lb = Haproxy::start(
        Ipv4Addr::LOCALHOST,
        gw.addr("PP"),
        client_ip(),
        "send-proxy-v2",
    );
    let curl = |src: Ipv4Addr| {
        Curl::new(src)
            .arg("--proxy")
            .arg(&format!("https://localhost:{}", lb.addr().port()))
            .arg("--proxy-cacert")
            .arg(&ca.ca_pem().display().to_string())
    };
    // By address alone, inside TLS.
    let body = curl(allowed).get(&web.url("/ip")).ok_body();
    assert!(!body.is_empty());
    let out = curl(client_ip()).get(&web.url("/ip"));
    assert_eq!(out.last().status, 407, "{out:#?}");
    let m = gw.metrics();
    assert!(sample(&m, "splicegate_tls_handshakes_total{result=\"full\"}") >= 2.0);
}

#[test]
fn raw_headers_on_a_proxy_protocol_port() {
    let allowed = client_ip();
    let gw = gateway(allowed, None);
    let web = HttpTarget::start();
    let url = web.url("/ip");
    let pp = gw.addr("PP");
    let get_req = format!(
        "GET {url} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        web.addr()
    );

    // A header and the request in one segment (one write on a socket
    // without Nagle): the request is not lost. The header names the
    // allowlisted client; the socket's own source is a stranger's.
    for version in [1, 2] {
        let mut c = Conn::open(client_ip(), pp).expect("connect");
        let mut bytes = Vec::new();
        if version == 1 {
            write_v1(addrs(allowed, pp), &mut bytes);
        } else {
            write_v2(addrs(allowed, pp), &[0x04, 0x00, 0x02, 0, 0], &mut bytes).unwrap();
        }
        bytes.extend_from_slice(get_req.as_bytes());
        c.send(&bytes).expect("send");
        let r = c.read_response("GET").expect("an answer");
        assert_eq!(r.status, 200, "v{version}: {}{}", r.raw_head, r.text());
    }
    // SOCKS5 after a v2 header in one segment, no credentials: the
    // allowlisted client's package by address.
    let mut c = Conn::open(client_ip(), pp).expect("connect");
    let mut bytes = Vec::new();
    write_v2(addrs(allowed, pp), &[], &mut bytes).unwrap();
    bytes.extend_from_slice(&[0x05, 0x01, 0x00]);
    c.send(&bytes).expect("send");
    assert_eq!(c.read_n(2).expect("method reply"), [0x05, 0x00]);

    // v1 UNKNOWN and v2 LOCAL (a load balancer's health check) name no
    // client: the connection's own source counts (allowlisted here, then a
    // stranger's).
    let mut unknown = b"PROXY UNKNOWN\r\n".to_vec();
    let mut local = Vec::new();
    write_v2(None, &[], &mut local).unwrap();
    for header in [&mut unknown, &mut local] {
        header.extend_from_slice(get_req.as_bytes());
        for (src, want) in [(allowed, 200), (client_ip(), 407)] {
            let mut c = Conn::open(src, pp).expect("connect");
            c.send(header).expect("send");
            let r = c.read_response("GET").expect("an answer");
            assert_eq!(
                r.status,
                want,
                "{}: {}",
                String::from_utf8_lossy(header),
                r.raw_head
            );
        }
    }

    // The header arriving byte by byte, then the request.
    let mut c = Conn::open(client_ip(), pp).expect("connect");
    let mut header = Vec::new();
    write_v1(addrs(allowed, pp), &mut header);
    for b in &header {
        c.send(&[*b]).expect("send");
    }
    c.send(get_req.as_bytes()).expect("send");
    assert_eq!(c.read_response("GET").expect("an answer").status, 200);

    // Closed without an answer, counted by reason.
    let closed = |bytes: &[u8], finish: bool| {
        let mut c = Conn::open(client_ip(), pp).expect("connect");
        c.send(bytes).expect("send");
        if finish {
            c.shutdown_write();
        }
        closed_without_answer(&mut c)
    };
    // No header: a client reaching the port directly (HTTP, SOCKS5, TLS).
    assert!(closed(get_req.as_bytes(), false), "no header");
    assert!(
        closed(&[0x05, 0x01, 0x00], false),
        "SOCKS5 without a header"
    );
    assert!(
        closed(&[0x16, 0x03, 0x01, 0x00, 0x05], false),
        "TLS without a header"
    );
    // Not the v2 signature after all.
    assert!(
        closed(b"\r\n\r\n\0\r\nQUIX\n\x21\x11\x00\x0c", false),
        "bad signature"
    );
    assert_eq!(rejected(&gw, "missing"), 4.0);
    // Malformed: a v1 line past 107 bytes, a v2 version 1, a header too
    // short for its family, an unknown command, a TLV past the end.
    let mut long = b"PROXY UNKNOWN ".to_vec();
    long.resize(120, b'x');
    long.extend_from_slice(b"\r\n");
    assert!(closed(&long, false), "v1 too long");
    assert!(
        closed(b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n", false),
        "v1 short"
    );
    let sig = b"\r\n\r\n\0\r\nQUIT\n";
    let v2 = |tail: &[u8]| [&sig[..], tail].concat();
    assert!(closed(&v2(b"\x11\x11\x00\x00"), false), "v2 version 1");
    assert!(closed(&v2(b"\x23\x11\x00\x00"), false), "v2 command 3");
    assert!(
        closed(&v2(b"\x21\x11\x00\x04\x7f\0\0\x01"), false),
        "v2 too short"
    );
    let mut tlv = v2(b"\x21\x11\x00\x0e");
    tlv.extend_from_slice(&[127, 0, 0, 1, 127, 0, 0, 1, 0, 1, 0, 2, 0x04, 0x00]);
    assert!(closed(&tlv, false), "v2 TLV past the end");
    assert_eq!(rejected(&gw, "malformed"), 6.0);
    // Truncated: the client closes in the middle of a header.
    assert!(closed(b"PROXY TCP4 1.2.3.4", true), "v1 truncated");
    assert!(closed(&v2(b"\x21\x11\x00\x0c\x7f\0"), true), "v2 truncated");
    assert_eq!(rejected(&gw, "truncated"), 2.0);
    // A connection that closes before its first byte (a bare TCP check) is
    // not counted.
    assert!(closed(b"", true));
    assert_eq!(rejected(&gw, "truncated"), 2.0);

    // The main port has no PROXY protocol: a header there is the request's
    // first line, and HTTP says so.
    let mut c = Conn::open(allowed, gw.proxy).expect("connect");
    let mut bytes = Vec::new();
    write_v1(addrs(allowed, pp), &mut bytes);
    bytes.extend_from_slice(get_req.as_bytes());
    c.send(&bytes).expect("send");
    let r = c.read_response("GET").expect("an answer");
    assert_eq!(r.status, 400, "{}", r.raw_head);
}

#[test]
fn a_silent_connection_times_out_on_the_header() {
    let mut conf = Conf::with_package(KEY)
        .node(NodeDecl::direct("d1", node_ip()))
        .raw("[[listener]]\nlisten = \"127.0.0.1:@PORT_PP@\"\nproxy_protocol = true\n");
    conf.handshake_ms = 300;
    let gw = Gateway::start_conf(&conf);
    for bytes in [&b""[..], b"PROXY TCP4 "] {
        let mut c = Conn::open(client_ip(), gw.addr("PP")).expect("connect");
        if !bytes.is_empty() {
            c.send(bytes).expect("send");
        }
        assert!(closed_without_answer(&mut c), "{bytes:?}");
    }
    assert_eq!(rejected(&gw, "timed_out"), 2.0);
}

#[test]
fn a_udp_association_expects_the_headers_client() {
    use std::net::UdpSocket;
    let gw = gateway(client_ip(), None);
    let pp = gw.addr("PP");
    // A UDP echo target answering `<payload>|<sender ip>`.
    let echo = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the echo");
    let target = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        echo.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let mut out = buf[..n].to_vec();
            out.extend_from_slice(format!("|{}", from.ip()).as_bytes());
            let _ = echo.send_to(&out, from);
        }
    });
    // The load balancer's connection (source `lb`) names `client`.
    let (lb, client) = (client_ip(), client_ip());
    let mut c = Conn::open(lb, pp).expect("connect");
    let mut bytes = Vec::new();
    write_v2(addrs(client, pp), &[], &mut bytes).unwrap();
    bytes.extend_from_slice(&[0x05, 0x01, 0x02]);
    c.send(&bytes).expect("send");
    assert_eq!(c.read_n(2).unwrap(), [0x05, 0x02]);
    let (u, k) = (user("country-us"), KEY);
    let mut auth = vec![1, u.len() as u8];
    auth.extend_from_slice(u.as_bytes());
    auth.push(k.len() as u8);
    auth.extend_from_slice(k.as_bytes());
    c.send(&auth).unwrap();
    assert_eq!(c.read_n(2).unwrap(), [0x01, 0x00]);
    c.send(&[0x05, 0x03, 0x00, 0x01, 0, 0, 0, 0, 0, 0]).unwrap();
    let rep = c.read_n(10).unwrap();
    assert_eq!(rep[1], 0x00, "UDP ASSOCIATE refused: {rep:?}");
    let bnd = SocketAddr::from((
        Ipv4Addr::new(rep[4], rep[5], rep[6], rep[7]),
        u16::from_be_bytes([rep[8], rep[9]]),
    ));
    let SocketAddr::V4(t) = target else {
        panic!("an IPv4 target")
    };
    let datagram = |payload: &str| {
        let mut d = vec![0, 0, 0, 1];
        d.extend_from_slice(&t.ip().octets());
        d.extend_from_slice(&t.port().to_be_bytes());
        d.extend_from_slice(payload.as_bytes());
        d
    };
    // The load balancer's address is a stranger to the association (its
    // datagram goes first, so it is judged before the client's answer
    // comes back); the header's client is served.
    let from_lb = UdpSocket::bind((lb, 0)).unwrap();
    from_lb.send_to(&datagram("from-lb"), bnd).unwrap();
    let from_client = UdpSocket::bind((client, 0)).unwrap();
    from_client
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    from_client.send_to(&datagram("hello"), bnd).unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = from_client.recv_from(&mut buf).expect("the echo's answer");
    let answer = String::from_utf8_lossy(&buf[10..n]).into_owned();
    assert!(answer.starts_with("hello|"), "{answer}");
    assert_eq!(
        sample(
            &gw.metrics(),
            "splicegate_udp_dropped_total{reason=\"stranger\"}"
        ),
        1.0
    );
}

#[test]
fn a_reload_cannot_turn_the_proxy_protocol_off() {
    let allowed = client_ip();
    let conf = conf(allowed, None);
    let mut gw = Gateway::start_conf(&conf);
    let pp_on = "listen = \"127.0.0.1:@PORT_PP@\"\nproxy_protocol = true\n";
    let toml = conf.toml();
    assert!(toml.contains(pp_on));
    gw.reload(&toml.replace(pp_on, &pp_on.replace("true", "false")));
    let refused = splicegate_tests::eventually(
        std::time::Duration::from_secs(5),
        std::time::Duration::from_millis(50),
        || gw.log().contains("needs a restart").then_some(()),
    );
    assert!(refused.is_some(), "{}", gw.log_tail(10));
    // The port still reads the header.
    let web = HttpTarget::start();
    let pp = gw.addr("PP");
    let mut c = Conn::open(client_ip(), pp).expect("connect");
    let mut bytes = Vec::new();
    write_v1(addrs(allowed, pp), &mut bytes);
    bytes.extend_from_slice(
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            web.url("/ip"),
            web.addr()
        )
        .as_bytes(),
    );
    c.send(&bytes).expect("send");
    assert_eq!(c.read_response("GET").expect("an answer").status, 200);
}
