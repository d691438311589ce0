//! SOCKS5 UDP ASSOCIATE (SPEC section 12) end to end: a Python client
//! speaks RFC 1928 section 7 to the real gateway, which relays its
//! datagrams through a `direct` node to a UDP echo target; strangers,
//! fragments and blocked targets are dropped and counted; the association
//! ends with its TCP connection or after `udp_idle_s`; a package whose
//! nodes cannot carry UDP gets 0x03 and `NODE_NOT_FOUND`.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use splicegate_tests::ops::sample;
use splicegate_tests::*;

/// A UDP target that answers each datagram with `<payload>|<sender ip>`.
struct UdpEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl UdpEcho {
    fn start(ip: Ipv4Addr) -> UdpEcho {
        let sock = UdpSocket::bind((ip, 0)).expect("bind the UDP echo");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let mut out = buf[..n].to_vec();
                    out.extend_from_slice(format!("|{}", from.ip()).as_bytes());
                    let _ = sock.send_to(&out, from);
                }
            }
        });
        UdpEcho { addr, stop }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The client: associate from `src` (with `user`:`key`), then for each
/// `target|payload` argument send one datagram and print the answer (or
/// `TIMEOUT`). Special payloads: `@frag` sends FRAG=1; `@stranger` sends
/// from another socket; `@spoof:IP` from a socket on another address;
/// `@close` closes the TCP connection first; `@wait:S`
/// sleeps S seconds; `@eof` waits (≤ 5 s) for the gateway to close the TCP
/// connection and prints `EOF after <s>`.
const CLIENT: &str = r#"
import json, socket, struct, sys, time
proxy, port, user, key, src = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
t = socket.create_connection((proxy, port), timeout=5, source_address=(src, 0))
t.sendall(b"\x05\x01\x02")
assert t.recv(2) == b"\x05\x02"
t.sendall(bytes([1, len(user)]) + user.encode() + bytes([len(key)]) + key.encode())
assert t.recv(2) == b"\x01\x00", "auth"
t.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
rep = t.recv(10)
if rep[1] != 0:
    print(json.dumps({"reply": rep[1]}))
    sys.exit(0)
bnd = (socket.inet_ntoa(rep[4:8]), struct.unpack(">H", rep[8:10])[0])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((src, 0))
u.settimeout(1.5)
out = {"reply": 0, "bnd": "%s:%d" % bnd, "answers": []}
def header(host, port, frag=0):
    try:
        return bytes([0, 0, frag, 1]) + socket.inet_aton(host) + struct.pack(">H", port)
    except OSError:
        return bytes([0, 0, frag, 3, len(host)]) + host.encode() + struct.pack(">H", port)
for arg in sys.argv[6:]:
    target, payload = arg.split("|", 1)
    if payload.startswith("@wait:"):
        time.sleep(float(payload[6:])); continue
    if payload == "@close":
        t.close(); time.sleep(0.2); continue
    if payload == "@eof":
        t.settimeout(5); t0 = time.time()
        try:
            gone = t.recv(1) == b""
        except OSError:
            gone = True
        out["answers"].append("EOF after %.1f" % (time.time() - t0) if gone else "NO EOF"); continue
    host, tport = target.rsplit(":", 1)
    frag = 1 if payload == "@frag" else 0
    body = payload.encode() if not payload.startswith("@big:") else b"x" * int(payload[5:])
    sender = u
    if payload == "@stranger":
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); sender.bind((src, 0))
    if payload.startswith("@spoof:"):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); sender.bind((payload[7:], 0))
    sent_at = time.time()
    sender.sendto(header(host, int(tport), frag) + body, bnd)
    try:
        data, frm = u.recvfrom(70000)
        out.setdefault("rtt_ms", []).append(round((time.time() - sent_at) * 1000, 3))
        atyp = data[3]
        at = 4 + (4 if atyp == 1 else 16)
        ip = socket.inet_ntoa(data[4:8]) if atyp == 1 else "v6"
        port_from = struct.unpack(">H", data[at:at + 2])[0]
        payload_back = data[at + 2:]
        if len(payload_back) > 200:
            payload_back = b"%d bytes" % len(payload_back)
        out["answers"].append("%s:%d %s" % (ip, port_from, payload_back.decode()))
    except socket.timeout:
        out["answers"].append("TIMEOUT")
    except ConnectionRefusedError:
        out["answers"].append("REFUSED")
print(json.dumps(out))
"#;

fn run(gw: &Gateway, src: Ipv4Addr, user: &str, args: &[String]) -> serde_json::Value {
    let python = require_tool("python3", "python3");
    let out = Command::new(python)
        .arg("-c")
        .arg(CLIENT)
        .arg(gw.proxy.ip().to_string())
        .arg(gw.proxy.port().to_string())
        .arg(user)
        .arg(KEY)
        .arg(src.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run python3");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|_| {
        panic!(
            "the client failed: {text}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            gw.log_tail(20)
        )
    })
}

fn answers(v: &serde_json::Value) -> Vec<String> {
    v["answers"]
        .as_array()
        .unwrap_or_else(|| panic!("no answers: {v}"))
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn datagrams_go_through_a_direct_node_and_come_back_with_their_sender() {
    let bind = node_ip();
    let gw = Gateway::with_direct(bind);
    let echo = UdpEcho::start(Ipv4Addr::LOCALHOST);
    let t = echo.addr.to_string();
    let by_name = format!("localhost:{}", echo.addr.port());
    let mut args: Vec<String> = (0..20).map(|i| format!("{t}|ping {i}")).collect();
    args.push(format!("{by_name}|by name"));
    args.push(format!("{t}|@big:60000"));
    let v = run(&gw, client_ip(), &user("country-us"), &args);
    assert_eq!(v["reply"], 0, "{v}");
    assert!(
        v["bnd"].as_str().unwrap().starts_with("127.0.0.1:"),
        "BND is the TCP connection's local address: {v}"
    );
    let a = answers(&v);
    for (i, got) in a.iter().take(20).enumerate() {
        // Each answer names the target as its sender and shows the node's
        // source address as the echo saw it.
        assert_eq!(got, &format!("{t} ping {i}|{bind}"), "{v}");
    }
    assert_eq!(
        a[20],
        format!("{t} by name|{bind}"),
        "a name resolved by the gateway: {v}"
    );
    assert!(
        a[21].starts_with(&format!("{t} ")) && a[21].contains("bytes"),
        "a 60 KB datagram: {v}"
    );
    // Counted: datagrams both ways, and payload bytes as the package's traffic.
    let m = gw.metrics();
    assert!(
        sample(&m, "splicegate_udp_datagrams_total{direction=\"up\"}") >= 22.0,
        "{m}"
    );
    assert!(
        sample(&m, "splicegate_udp_datagrams_total{direction=\"down\"}") >= 22.0,
        "{m}"
    );
    let usage = eventually(Duration::from_secs(5), Duration::from_millis(100), || {
        let u = gw.package_usage(7).ok()?;
        (u.bytes_up >= 60_000).then_some(u)
    });
    assert!(
        usage.is_some(),
        "the payload bytes are the package's traffic"
    );
}

/// Datagrams from another address (spoofed: before the client's first and
/// after it) or another port of the client, fragments and datagrams to
/// blocked targets are dropped and counted; the association serves on.
#[test]
fn strangers_fragments_and_blocked_targets_are_dropped_and_counted() {
    let gw = Gateway::with_direct(node_ip());
    let echo = UdpEcho::start(Ipv4Addr::LOCALHOST);
    let t = echo.addr.to_string();
    let blocked = "127.0.0.1:25".to_string(); // [safety] blocked_ports = [25]
    // Another address sending to the association's port, before and after
    // the client's first datagram: a spoofed source.
    let spoofer = client_ip();
    let args = vec![
        format!("{t}|@spoof:{spoofer}"),
        format!("{t}|first"),
        format!("{t}|@stranger"),
        format!("{t}|@frag"),
        format!("{blocked}|to port 25"),
        format!("{t}|@spoof:{spoofer}"),
        format!("{t}|after"),
    ];
    let v = run(&gw, client_ip(), &user("country-us"), &args);
    let a = answers(&v);
    assert_eq!(
        a[0], "TIMEOUT",
        "a datagram from another address first: {v}"
    );
    // Had the spoofed datagram been taken, its port would be the client's,
    // and this one a stranger.
    assert!(
        a[1].contains("first|"),
        "the client's own first datagram: {v}"
    );
    assert_eq!(
        a[2], "TIMEOUT",
        "a datagram from another port of the client: {v}"
    );
    assert_eq!(a[3], "TIMEOUT", "a fragment: {v}");
    assert_eq!(a[4], "TIMEOUT", "a blocked target: {v}");
    assert_eq!(
        a[5], "TIMEOUT",
        "a datagram from another address later: {v}"
    );
    assert!(a[6].contains("after|"), "the association serves on: {v}");
    let m = gw.metrics();
    for (reason, at_least) in [
        ("stranger", 3.0),
        ("fragment", 1.0),
        ("blocked_target", 1.0),
    ] {
        assert!(
            sample(
                &m,
                &format!("splicegate_udp_dropped_total{{reason=\"{reason}\"}}")
            ) >= at_least,
            "{reason}: {m}"
        );
    }
}

/// A target's answer too long to go back with its SOCKS5 header (the
/// echo's 65,507 bytes, plus 10, over IPv4) is dropped and counted as
/// `oversized`, not as a full buffer, and the association serves on.
#[test]
fn an_answer_too_long_for_its_header_is_dropped_as_oversized() {
    let exit = node_ip();
    let gw = Gateway::with_direct(exit);
    let echo = UdpEcho::start(Ipv4Addr::LOCALHOST);
    let t = echo.addr.to_string();
    // The echo answers with the payload and "|<exit ip>"; the gateway puts
    // a 10-byte header in front. The longest answer that fits in a UDP
    // datagram over IPv4 (65,507 bytes), then one byte more.
    let fits = 65_507 - 10 - 1 - exit.to_string().len();
    let args = vec![
        format!("{t}|@big:{fits}"),
        format!("{t}|@big:{}", fits + 1),
        format!("{t}|after"),
    ];
    let v = run(&gw, client_ip(), &user("country-us"), &args);
    let a = answers(&v);
    assert!(
        a[0].ends_with(&format!("{} bytes", 65_507 - 10)),
        "the longest answer that fits comes back whole: {v}"
    );
    assert_eq!(a[1], "TIMEOUT", "an answer too long for its header: {v}");
    assert!(a[2].contains("after|"), "the association serves on: {v}");
    let m = gw.metrics();
    let series = |reason: &str| {
        sample(
            &m,
            &format!("splicegate_udp_dropped_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(series("oversized"), 1.0, "{m}");
    assert_eq!(series("buffer_full"), 0.0, "{m}");
}

#[test]
fn the_association_ends_with_its_tcp_connection_and_after_udp_idle_s() {
    let mut conf = Conf::with_package(KEY).node(NodeDecl::direct("d1", node_ip()));
    conf.udp_idle_s = 1;
    let gw = Gateway::start_conf(&conf);
    let echo = UdpEcho::start(Ipv4Addr::LOCALHOST);
    let t = echo.addr.to_string();
    // The TCP connection closes: datagrams to the association's port are
    // refused at once (its socket is gone).
    let v = run(
        &gw,
        client_ip(),
        &user("country-us"),
        &[
            format!("{t}|one"),
            format!("{t}|@close"),
            format!("{t}|two"),
        ],
    );
    let a = answers(&v);
    assert!(a[0].contains("one|"), "{v}");
    assert!(
        a[1] == "REFUSED" || a[1] == "TIMEOUT",
        "after the TCP close: {v}"
    );
    // Idle for longer than udp_idle_s: the gateway ends it and closes TCP.
    let v = run(
        &gw,
        client_ip(),
        &user("country-us"),
        &[format!("{t}|one"), format!("{t}|@eof")],
    );
    let a = answers(&v);
    assert!(a[0].contains("one|"), "{v}");
    assert!(a[1].starts_with("EOF after"), "{v}");
    let secs: f64 = a[1]["EOF after ".len()..].parse().unwrap();
    assert!(secs < 4.0, "closed after udp_idle_s (1 s): {v}");
    assert_eq!(
        sample(&gw.metrics(), "splicegate_open_tunnels{worker=\"0\"}"),
        0.0
    );
}

#[test]
fn a_package_without_a_node_that_carries_udp_gets_0x03_and_node_not_found() {
    let http_node = TestNode::http(node_ip());
    let gw =
        Gateway::start_conf(&Conf::with_package(KEY).node(NodeDecl::http("h1", http_node.addr())));
    let v = run(&gw, client_ip(), &user("country-us"), &[]);
    assert_eq!(v["reply"], 3, "{v}");
    let (_, errors) = splicegate_tests::admin::admin_request(
        gw.admin_addr(),
        "GET",
        "/v1/packages/7/errors",
        None,
    )
    .unwrap();
    assert!(errors.to_string().contains("NODE_NOT_FOUND"), "{errors}");
    assert!(
        errors.to_string().contains("UDP"),
        "the reason names UDP: {errors}"
    );
}

#[test]
fn datagrams_go_through_an_agent_and_the_association_ends_with_it() {
    use splicegate_tests::agent::{AgentProc, AgentSpec};
    use splicegate_tests::gateway::temp_dir;
    use splicegate_tests::pki::TestCa;
    const DEV_KEY: &str = "ak_udp_device_key_0123456789";
    let ca = TestCa::new(&temp_dir("udp-pki"));
    let leaf = ca.leaf("gw", (2031, 7, 15));
    let mut conf = Conf::with_package(KEY).node(NodeDecl::agent("dev-u", DEV_KEY));
    conf.tls = Some((leaf.cert.clone(), leaf.key.clone()));
    conf.extra
        .push_str("[agents]\nlisten = \"127.0.0.1:@PORT_AGENTS@\"\nheartbeat_s = 1\n");
    let gw = Gateway::start_conf(&conf);
    let mut agent = AgentProc::start(AgentSpec::new(
        "dev-u",
        DEV_KEY,
        gw.addr("AGENTS"),
        &ca.ca_pem(),
    ));
    let connected = eventually(Duration::from_secs(10), Duration::from_millis(50), || {
        let (_, n) =
            splicegate_tests::admin::admin_request(gw.admin_addr(), "GET", "/v1/nodes/dev-u", None)
                .ok()?;
        (n["connected"] == true).then_some(())
    });
    assert!(connected.is_some(), "{}", agent.log());
    let echo = UdpEcho::start(Ipv4Addr::LOCALHOST);
    let t = echo.addr.to_string();
    let by_name = format!("localhost:{}", echo.addr.port());
    let mut args: Vec<String> = (0..10).map(|i| format!("{t}|via agent {i}")).collect();
    args.push(format!("{by_name}|named on the device"));
    args.push(format!("{t}|@big:30000"));
    let v = run(&gw, client_ip(), &user("country-us"), &args);
    assert_eq!(v["reply"], 0, "{v}\n{}", agent.log());
    let a = answers(&v);
    for (i, got) in a.iter().take(10).enumerate() {
        assert_eq!(got, &format!("{t} via agent {i}|127.0.0.1"), "{v}");
    }
    assert_eq!(a[10], format!("{t} named on the device|127.0.0.1"), "{v}");
    assert!(a[11].contains("bytes"), "a 30 KB datagram: {v}");
    // The agent dies mid-association: the gateway ends it and closes TCP.
    let mut args = vec![
        format!("{t}|before"),
        format!("{t}|@wait:1.5"),
        format!("{t}|@eof"),
    ];
    let gwp = gw.proxy;
    let src = client_ip();
    let handle = std::thread::spawn(move || {
        let python = require_tool("python3", "python3");
        let out = Command::new(python)
            .arg("-c")
            .arg(CLIENT)
            .arg(gwp.ip().to_string())
            .arg(gwp.port().to_string())
            .arg(user("country-us"))
            .arg(KEY)
            .arg(src.to_string())
            .args(args.drain(..))
            .output()
            .expect("python3");
        String::from_utf8_lossy(&out.stdout).to_string()
    });
    std::thread::sleep(Duration::from_millis(700));
    agent.kill();
    let out = handle.join().unwrap();
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
    let a = answers(&v);
    assert!(a[0].contains("before|"), "{v}");
    assert!(
        a[1].starts_with("EOF after"),
        "the association ended with its agent: {v}"
    );
}

#[test]
fn datagrams_go_through_an_upstream_socks5_node_that_serves_udp() {
    // Dante as the node: it serves UDP ASSOCIATE; microsocks does not.
    let ip = node_ip();
    let dante = Dante::start(ip);
    let gw = Gateway::start_conf(
        &Conf::with_package(KEY).node(NodeDecl::socks5("s1", dante.addr()).set("udp", "true")),
    );
    let echo = UdpEcho::start(Ipv4Addr::LOCALHOST);
    let t = echo.addr.to_string();
    let args: Vec<String> = (0..10).map(|i| format!("{t}|via dante {i}")).collect();
    let v = run(&gw, client_ip(), &user("country-us"), &args);
    assert_eq!(v["reply"], 0, "{v}\n{}", dante.log());
    for (i, got) in answers(&v).iter().enumerate() {
        // Dante sends from its external address, and names the target as
        // the sender of each answer.
        assert_eq!(
            got,
            &format!("{t} via dante {i}|{ip}"),
            "{v}\n{}",
            dante.log()
        );
    }
    // A socks5 node not declared udp is never chosen for an association.
    let plain =
        Gateway::start_conf(&Conf::with_package(KEY).node(NodeDecl::socks5("s2", dante.addr())));
    let v = run(&plain, client_ip(), &user("country-us"), &[]);
    assert_eq!(v["reply"], 3, "{v}");
}

#[test]
fn only_the_addresses_the_client_sent_to_may_answer() {
    let bind = node_ip();
    let gw = Gateway::with_direct(bind);
    // A target that answers, learns the exit's address from what it
    // receives, and has a stranger spray that address: only the target's
    // answers may reach the client.
    let probe = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let exit_seen = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    let spy = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    spy.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let spy_addr = spy.local_addr().unwrap();
    {
        let (stop, seen) = (stop.clone(), exit_seen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = spy.recv_from(&mut buf) {
                    *seen.lock().unwrap() = Some(from);
                    let _ = spy.send_to(&buf[..n], from);
                    // And a stranger sprays the same exit port.
                    for _ in 0..5 {
                        let _ = probe.send_to(b"spray", from);
                    }
                }
            }
        });
    }
    let v = run(
        &gw,
        client_ip(),
        &user("country-us"),
        &[format!("{spy_addr}|first"), format!("{spy_addr}|second")],
    );
    stop.store(true, Ordering::Relaxed);
    let a = answers(&v);
    assert_eq!(a[0], format!("{spy_addr} first"), "{v}");
    assert_eq!(
        a[1],
        format!("{spy_addr} second"),
        "the spray never reached the client: {v}"
    );
    assert!(
        exit_seen
            .lock()
            .unwrap()
            .is_some_and(|e| e.ip() == std::net::IpAddr::V4(bind))
    );
    assert!(
        sample(
            &gw.metrics(),
            "splicegate_udp_dropped_total{reason=\"unsolicited\"}"
        ) >= 5.0,
        "{}",
        gw.metrics()
    );
}

/// A SOCKS5 UDP association from `src` as `user`: its TCP connection (the
/// association lives while it is open) and the relay address to send to.
fn associate(gw: &Gateway, src: Ipv4Addr, user: &str) -> (std::net::TcpStream, SocketAddr) {
    use std::io::{Read, Write};
    let mut t = splicegate_tests::client::connect_from(src.into(), gw.proxy).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut two = [0u8; 2];
    t.write_all(b"\x05\x01\x02").unwrap();
    t.read_exact(&mut two).unwrap();
    assert_eq!(two, [5, 2]);
    let mut auth = vec![1, user.len() as u8];
    auth.extend_from_slice(user.as_bytes());
    auth.push(KEY.len() as u8);
    auth.extend_from_slice(KEY.as_bytes());
    t.write_all(&auth).unwrap();
    t.read_exact(&mut two).unwrap();
    assert_eq!(two, [1, 0], "authentication");
    t.write_all(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
        .unwrap();
    let mut rep = [0u8; 10];
    t.read_exact(&mut rep).unwrap();
    assert_eq!(rep[1], 0, "UDP ASSOCIATE refused: {rep:?}");
    let ip = Ipv4Addr::new(rep[4], rep[5], rep[6], rep[7]);
    (
        t,
        SocketAddr::from((ip, u16::from_be_bytes([rep[8], rep[9]]))),
    )
}

/// Sends `rounds` runs of `run` datagrams back to back through the
/// association at `relay` (from `src`) to `target`, taking each run's
/// answers before the next; every answer must come back, in order.
fn runs_through(src: Ipv4Addr, relay: SocketAddr, target: SocketAddr, rounds: usize, run: usize) {
    let u = UdpSocket::bind((src, 0)).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let std::net::IpAddr::V4(ip) = target.ip() else {
        unreachable!()
    };
    let mut buf = vec![0u8; 2048];
    for r in 0..rounds {
        for i in 0..run {
            let mut d = vec![0, 0, 0, 1];
            d.extend_from_slice(&ip.octets());
            d.extend_from_slice(&target.port().to_be_bytes());
            d.extend_from_slice(format!("run {r} datagram {i}").as_bytes());
            u.send_to(&d, relay).unwrap();
        }
        for i in 0..run {
            let (n, _) = u
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("run {r}: answer {i} missing: {e}"));
            // 10 bytes of header (IPv4), then the echo's answer.
            let answer = String::from_utf8_lossy(&buf[10..n]);
            assert!(
                answer.starts_with(&format!("run {r} datagram {i}|")),
                "run {r}, answer {i}: {answer}"
            );
        }
    }
}

/// Datagrams that arrive in runs are gathered: the worker's ring waits a
/// moment for the rest of a run before waking (counted in
/// `splicegate_ring_gathered_waits_total`), and every datagram still comes
/// back, in order; `udp_gather_us = 0` turns it off.
#[test]
fn runs_of_datagrams_are_gathered_unless_udp_gather_us_is_0() {
    for gather in [None, Some(0)] {
        let bind = node_ip();
        let mut conf = Conf::with_package(KEY).node(NodeDecl::direct("d1", bind));
        conf.workers = "1".into();
        conf.udp_gather_us = gather;
        let gw = Gateway::start_conf(&conf);
        let echo = UdpEcho::start(Ipv4Addr::LOCALHOST);
        let src = client_ip();
        let (_tcp, relay) = associate(&gw, src, &user("country-us"));
        runs_through(src, relay, echo.addr, 20, 32);
        let series = "splicegate_ring_gathered_waits_total{worker=\"0\"}";
        let m = gw.metrics();
        assert!(
            sample(&m, "splicegate_udp_datagrams_total{direction=\"down\"}") >= 640.0,
            "{m}"
        );
        if gather.is_none() && kernel_has_min_timeout_waits() {
            // The default (50 µs): 20 runs of 32 cannot all be taken one
            // datagram per wake. (Counted at the worker's next tick.)
            let gathered = eventually(Duration::from_secs(3), Duration::from_millis(50), || {
                let m = gw.metrics();
                (sample(&m, series) > 0.0).then_some(())
            });
            assert!(gathered.is_some(), "no wait gathered: {}", gw.metrics());
        } else {
            // Off, or a kernel before 6.12 (the request is ignored).
            std::thread::sleep(Duration::from_millis(600));
            let m = gw.metrics();
            assert!(
                m.contains(&format!("{series} 0\n")),
                "nothing gathered: {m}"
            );
        }
    }
}

/// Linux 6.12 or later: io_uring waits with a minimum time
/// (`IORING_FEAT_MIN_TIMEOUT`), which gathering needs.
fn kernel_has_min_timeout_waits() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 12)
}

/// One client flooding its association as fast as it can send (to a sink
/// that reads and drops) starves no other client: another association's
/// datagrams, sent meanwhile, are all answered (SPEC section 12: bounded
/// per-association work per loop turn).
#[test]
fn a_flooding_client_starves_no_other_association() {
    let bind = node_ip();
    // One worker: both associations share its ring.
    let mut conf = Conf::with_package(KEY).node(NodeDecl::direct("d1", bind));
    conf.workers = "1".into();
    let gw = Gateway::start_conf(&conf);
    let echo = UdpEcho::start(Ipv4Addr::LOCALHOST);
    let sink = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    sink.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let drained = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut buf, mut n) = (vec![0u8; 2048], 0u64);
            while !stop.load(Ordering::Relaxed) {
                if sink.recv_from(&mut buf).is_ok() {
                    n += 1;
                }
            }
            n
        })
    };
    let t = echo.addr.to_string();
    let pings: Vec<String> = (0..30)
        .flat_map(|i| [format!("{t}|ping {i}"), format!("{t}|@wait:0.05")])
        .collect();
    let quiet = run(&gw, client_ip(), &user("country-us"), &pings);
    let flood_src = client_ip();
    let (tcp, relay) = associate(&gw, flood_src, &user("country-us"));
    let flooder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _association = tcp;
            let u = UdpSocket::bind((flood_src, 0)).unwrap();
            let std::net::IpAddr::V4(ip) = sink_addr.ip() else {
                unreachable!()
            };
            let mut d = vec![0, 0, 0, 1];
            d.extend_from_slice(&ip.octets());
            d.extend_from_slice(&sink_addr.port().to_be_bytes());
            d.extend_from_slice(&[b'f'; 512]);
            let started = std::time::Instant::now();
            let mut sent = 0u64;
            // Bounded: until told to stop, 20 s or 20 million datagrams.
            while !stop.load(Ordering::Relaxed)
                && started.elapsed() < Duration::from_secs(20)
                && sent < 20_000_000
            {
                if u.send_to(&d, relay).is_ok() {
                    sent += 1;
                }
            }
            (sent, started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let v = run(&gw, client_ip(), &user("country-us"), &pings);
    stop.store(true, Ordering::Relaxed);
    let (sent, took) = flooder.join().unwrap();
    let received = drained.join().unwrap();
    let a = answers(&v);
    for (i, got) in a.iter().enumerate() {
        assert_eq!(got, &format!("{t} ping {i}|{bind}"), "{v}");
    }
    assert_eq!(a.len(), 30, "{v}");
    let relayed = sample(
        &gw.metrics(),
        "splicegate_udp_datagrams_total{direction=\"up\"}",
    );
    let rtts = |v: &serde_json::Value| {
        let mut r: Vec<f64> = v["rtt_ms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        r.sort_by(f64::total_cmp);
        r
    };
    let (rtt, alone) = (rtts(&v), rtts(&quiet));
    eprintln!(
        "the flood sent {sent} datagrams in {took:?} ({:.0}/s); the gateway relayed {relayed} up, \
         the sink read {received}; the other association's 30 all answered, round trip median \
         {:.2} ms, max {:.2} ms (without the flood {:.2} ms, max {:.2} ms)",
        sent as f64 / took.as_secs_f64(),
        rtt[rtt.len() / 2],
        rtt[rtt.len() - 1],
        alone[alone.len() / 2],
        alone[alone.len() - 1]
    );
    assert!(received > 1000, "the flood did not flow: {received}");
}
