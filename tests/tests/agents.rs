//! Agents (SPEC section 10) end to end: real `splicegate agent` processes
//! dial a real gateway over TLS 1.3 and serve curl's HTTP, CONNECT and
//! SOCKS5 through streams; sessions stay on an agent; a killed agent goes
//! offline and its traffic fails over per `onerror`; a restarted one comes
//! back; a wrong key ends the agent with status 2 and is counted on the
//! agent port only; the device refuses its own networks.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use splicegate_tests::admin::admin_request;
use splicegate_tests::agent::{AgentProc, AgentSpec};
use splicegate_tests::gateway::temp_dir;
use splicegate_tests::pki::TestCa;
use splicegate_tests::*;

/// Device keys of the file's agent nodes.
const KEY_A: &str = "ak_test_device_a_0123456789abcdef";
const KEY_B: &str = "ak_test_device_b_0123456789abcdef";

struct Lab {
    gw: Gateway,
    ca: TestCa,
    web: HttpTarget,
}

impl Lab {
    /// A gateway with `[agents]` (heartbeat 1 s) on the `[tls]` certificate,
    /// package 7, and agent nodes `dev-a` and `dev-b`.
    fn start() -> Lab {
        Lab::start_with(|c| c)
    }

    fn start_with(f: impl FnOnce(Conf) -> Conf) -> Lab {
        Lab::start_at("127.0.0.1:@PORT_AGENTS@", f)
    }

    /// [`Lab::start_with`], the agent listener on `listen` (a placeholder
    /// port: the gateway binds port 0 and reports it).
    fn start_at(listen: &str, f: impl FnOnce(Conf) -> Conf) -> Lab {
        let dir = temp_dir("agents-pki");
        let ca = TestCa::new(&dir);
        let conf = f(agents_conf(&ca, "gw", listen));
        Lab {
            gw: Gateway::start_conf(&conf),
            ca,
            web: HttpTarget::start(),
        }
    }

    /// Waits until node `id` is (or is not) connected per the admin API
    /// of `gw` (another gateway than the lab's).
    fn wait_connected_on(gw: &Gateway, id: &str, connected: bool, within: Duration) -> Value {
        let until = Instant::now() + within;
        loop {
            let (status, v) =
                admin_request(gw.admin_addr(), "GET", &format!("/v1/nodes/{id}"), None)
                    .expect("admin API");
            assert_eq!(status, 200, "{v}");
            if v["connected"] == Value::Bool(connected) {
                return v;
            }
            assert!(
                Instant::now() < until,
                "node {id} not connected={connected} within {within:?}: {v}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn agents_addr(&self) -> SocketAddr {
        self.gw.addr("AGENTS")
    }

    fn agent(&self, id: &str, key: &str) -> AgentProc {
        AgentProc::start(AgentSpec::new(
            id,
            key,
            self.agents_addr(),
            &self.ca.ca_pem(),
        ))
    }

    fn node(&self, id: &str) -> Value {
        let (status, v) = admin_request(
            self.gw.admin_addr(),
            "GET",
            &format!("/v1/nodes/{id}"),
            None,
        )
        .expect("admin API");
        assert_eq!(status, 200, "{v}");
        v
    }

    /// Waits until node `id` exists and is connected (an enrolling device's
    /// node does not exist before).
    fn wait_connected_new(&self, id: &str, within: Duration) {
        let until = Instant::now() + within;
        loop {
            let (status, v) = node_status(self, id);
            if status == 200 && v["connected"] == Value::Bool(true) {
                return;
            }
            assert!(
                Instant::now() < until,
                "node {id} not there and connected within {within:?}: {status} {v}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until node `id` is (or is not) connected, per the admin API.
    fn wait_connected(&self, id: &str, connected: bool, within: Duration) {
        let until = Instant::now() + within;
        loop {
            let v = self.node(id);
            if v["connected"] == Value::Bool(connected) {
                return;
            }
            assert!(
                Instant::now() < until,
                "node {id} not connected={connected} within {within:?}: {v}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// A gateway's configuration with `[agents]` on `listen` (heartbeat 1 s),
/// the `[tls]` certificate `name` from `ca`, package 7, and agent nodes
/// `dev-a` and `dev-b`.
fn agents_conf(ca: &TestCa, name: &str, listen: &str) -> Conf {
    let leaf = ca.leaf(name, (2031, 7, 15));
    let mut conf = Conf::with_package(KEY)
        .node(NodeDecl::agent("dev-a", KEY_A))
        .node(NodeDecl::agent("dev-b", KEY_B));
    conf.tls = Some((leaf.cert.clone(), leaf.key.clone()));
    conf.extra.push_str(&format!(
        "[agents]\nlisten = \"{listen}\"\nheartbeat_s = 1\n"
    ));
    conf
}

#[test]
fn curl_reaches_targets_through_an_agent_by_http_connect_and_socks5() {
    let lab = Lab::start();
    let _a = lab.agent("dev-a", KEY_A);
    lab.wait_connected("dev-a", true, Duration::from_secs(10));
    let node = lab.node("dev-a");
    assert_eq!(node["state"], "online", "{node}");
    assert_eq!(node["kind"], "agent", "{node}");
    assert!(
        node.to_string().find(KEY_A).is_none(),
        "the key never leaves: {node}"
    );

    let u = user("country-us");
    // HTTP forwarding through the agent.
    let out = Curl::new(client_ip())
        .proxy(lab.gw.proxy)
        .user(&u, KEY)
        .get(&lab.web.url("/ip"));
    assert_eq!(out.code, 0, "{out:#?}");
    assert_eq!(out.last().status, 200, "{out:#?}");
    // CONNECT with a body of 2 MB, checked byte for byte.
    let out = Curl::new(client_ip())
        .proxy(lab.gw.proxy)
        .user(&u, KEY)
        .tunnel()
        .get(&lab.web.url("/bytes/2000000"));
    assert_eq!(out.code, 0, "{out:#?}");
    assert_eq!(out.body.len(), 2_000_000);
    assert!(
        out.body
            .iter()
            .enumerate()
            .all(|(i, &b)| b == b"abcdefghijklmnopqrstuvwxyz"[i % 26]),
        "the body arrived intact"
    );
    // SOCKS5 with the name resolved by the device (socks5h).
    let out = Curl::new(client_ip())
        .socks5h(lab.gw.proxy)
        .user(&u, KEY)
        .get(&format!("http://localhost:{}/ip", lab.web.addr().port()));
    assert_eq!(out.code, 0, "{out:#?}");
    assert_eq!(out.last().status, 200, "{out:#?}");

    // The API shows the traffic on the agent.
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let n = lab.node("dev-a");
        if n["agent"]["bytes_down"].as_u64().unwrap_or(0) >= 2_000_000 {
            assert!(
                n["agent"]["addr"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("127.")),
                "{n}"
            );
            assert!(
                n["agent"]["version"]
                    .as_str()
                    .is_some_and(|v| v.contains("splicegate-agent")),
                "{n}"
            );
            break;
        }
        assert!(Instant::now() < until, "bytes never reached the API: {n}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_node_whose_agent_is_not_connected_is_offline_and_never_chosen() {
    let lab = Lab::start();
    let n = lab.node("dev-a");
    assert_eq!(n["connected"], false, "{n}");
    assert_eq!(n["state"], "offline", "{n}");
    assert_eq!(n["admin_state"], "online", "{n}");
    // No agent connected: no node matches.
    let out = Curl::new(client_ip())
        .proxy(lab.gw.proxy)
        .user(&user("country-us"), KEY)
        .get(&lab.web.url("/ip"));
    assert_ne!(out.last().status, 200, "{out:#?}");
}

#[test]
fn a_killed_agent_goes_offline_its_traffic_fails_over_and_a_restart_brings_it_back() {
    let lab = Lab::start();
    let mut agents = std::collections::HashMap::from([
        ("dev-a", lab.agent("dev-a", KEY_A)),
        ("dev-b", lab.agent("dev-b", KEY_B)),
    ]);
    lab.wait_connected("dev-a", true, Duration::from_secs(10));
    lab.wait_connected("dev-b", true, Duration::from_secs(10));
    // A session sticks to one agent.
    let u = user("country-us-session-s1-sessionlength-600");
    let mut held: Option<String> = None;
    for _ in 0..4 {
        let out = Curl::new(client_ip())
            .proxy(lab.gw.proxy)
            .user(&u, KEY)
            .get(&lab.web.url("/ip"));
        assert_eq!(out.last().status, 200, "{out:#?}");
        let node = session_node(&lab, "s1");
        assert!(
            held.is_none() || held == node,
            "the session moved: {node:?}"
        );
        held = node;
    }
    let victim = held.expect("the session has a node");
    let (victim, other) = if victim == "dev-a" {
        ("dev-a", "dev-b")
    } else {
        ("dev-b", "dev-a")
    };
    // Kill the session's agent: its node goes offline at once (the
    // connection closes), and the session fails over (onerror default:
    // replace).
    agents.get_mut(victim).expect("started").kill();
    lab.wait_connected(victim, false, Duration::from_secs(5));
    assert_eq!(lab.node(victim)["state"], "offline");
    let out = Curl::new(client_ip())
        .proxy(lab.gw.proxy)
        .user(&u, KEY)
        .get(&lab.web.url("/ip"));
    assert_eq!(
        out.last().status,
        200,
        "fails over to the other agent: {out:#?}"
    );
    assert_eq!(session_node(&lab, "s1").as_deref(), Some(other));
    // Restart the victim: online again and chosen again.
    let key = if victim == "dev-a" { KEY_A } else { KEY_B };
    agents.insert(victim, lab.agent(victim, key));
    lab.wait_connected(victim, true, Duration::from_secs(10));
    let mut chosen = false;
    for i in 0..40 {
        let u = user(&format!("country-us-session-r{i}"));
        let out = Curl::new(client_ip())
            .proxy(lab.gw.proxy)
            .user(&u, KEY)
            .get(&lab.web.url("/ip"));
        assert_eq!(out.last().status, 200, "{out:#?}");
        if session_node(&lab, &format!("r{i}")).as_deref() == Some(victim) {
            chosen = true;
            break;
        }
    }
    assert!(chosen, "the restarted agent is chosen again");
}

/// The node of session `name` of package 7, per `GET /v1/sessions`.
fn session_node(lab: &Lab, name: &str) -> Option<String> {
    let (_, v) = admin_request(lab.gw.admin_addr(), "GET", "/v1/sessions?package=7", None).unwrap();
    v.as_array()?
        .iter()
        .find(|s| s["id"] == name)
        .and_then(|s| s["node"].as_str().map(str::to_string))
}

#[test]
fn a_wrong_key_ends_the_agent_with_status_2_and_the_proxy_port_never_notices() {
    let lab = Lab::start();
    let mut bad = lab.agent("dev-a", "ak_wrong");
    let st = bad
        .wait_exit(Duration::from_secs(15))
        .expect("the agent exits");
    assert_eq!(st.code(), Some(2), "{}", bad.log());
    assert!(bad.log().contains("refused"), "{}", bad.log());
    // An unknown id is the same refusal.
    let mut unknown = lab.agent("dev-zz", KEY_A);
    let st = unknown
        .wait_exit(Duration::from_secs(15))
        .expect("the agent exits");
    assert_eq!(st.code(), Some(2), "{}", unknown.log());
    // The right key still gets in.
    let _good = lab.agent("dev-a", KEY_A);
    lab.wait_connected("dev-a", true, Duration::from_secs(10));
}

#[test]
fn the_device_refuses_its_own_networks_with_403_disallowed() {
    let lab = Lab::start();
    let strict = AgentSpec::new("dev-a", KEY_A, lab.agents_addr(), &lab.ca.ca_pem()).strict();
    let a = AgentProc::start(strict);
    lab.wait_connected("dev-a", true, Duration::from_secs(10));
    let u = user("country-us");
    // A loopback address, a name that resolves to loopback on the device,
    // and the gateway's own admin port: all refused by the device.
    for url in [
        lab.web.url("/ip"),
        format!("http://localhost:{}/ip", lab.web.addr().port()),
        format!("http://{}/v1/nodes", lab.gw.admin_addr()),
    ] {
        let out = Curl::new(client_ip())
            .proxy(lab.gw.proxy)
            .user(&u, KEY)
            .get(&url);
        let r = out.last();
        assert_eq!(r.status, 403, "{url}: {out:#?}");
        assert_eq!(
            r.header("X-SOAX-Error"),
            Some("DISALLOWED"),
            "{url}: {out:#?}"
        );
    }
    assert!(lab.web.requests().is_empty(), "nothing reached the target");
    assert!(
        a.log().contains("refused"),
        "the device logs what it refuses: {}",
        a.log()
    );
}

/// A device speaking the link by hand, over TLS from `src`.
struct RawAgent {
    tls: rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    buf: Vec<u8>,
}

impl RawAgent {
    fn connect(lab: &Lab) -> RawAgent {
        let tls = splicegate_tests::pki::tls_connect(lab.agents_addr(), &lab.ca.ca_pem())
            .expect("TLS to the agent port");
        RawAgent {
            tls,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.tls.write_all(bytes)?;
        self.tls.flush()
    }

    fn frame(&mut self, f: splicegate_proto::agent::Frame<'_>) -> std::io::Result<()> {
        let mut out = Vec::new();
        f.encode(&mut out);
        self.send(&out)
    }

    /// The next frame's bytes, or `None` when the gateway closed (or the
    /// read timed out: see [`RawAgent::read_next`]).
    fn next(&mut self) -> Option<Vec<u8>> {
        self.read_next().ok().flatten()
    }

    /// `Ok(Some(frame))`, `Ok(None)` when the gateway closed, `Err` when
    /// the read timed out.
    fn read_next(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        use std::io::Read;
        loop {
            if let Ok(Some((_, n))) = splicegate_proto::agent::decode(&self.buf) {
                return Ok(Some(self.buf.drain(..n).collect()));
            }
            let mut chunk = [0u8; 16384];
            match self.tls.read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(e);
                }
                // A reset or a TLS error: the connection is gone.
                Err(_) => return Ok(None),
            }
        }
    }

    /// Says hello as `id` with `key`; the answer frame's bytes.
    fn hello(&mut self, id: &str, key: &str) -> Option<Vec<u8>> {
        let mut f = splicegate_proto::agent::FieldsBuf::new();
        f.push("id", id);
        f.push("key", key);
        self.frame(splicegate_proto::agent::Frame::Hello {
            version: splicegate_proto::agent::VERSION,
            fields: f.fields(),
        })
        .ok()?;
        self.next()
    }

    /// Whether the gateway closes the connection within `within` (frames it
    /// sends meanwhile are read and dropped).
    fn closed_within(&mut self, within: Duration) -> bool {
        self.tls.sock.set_read_timeout(Some(within)).unwrap();
        let until = Instant::now() + within;
        while Instant::now() < until {
            match self.read_next() {
                Ok(Some(_)) => {}
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
        false
    }
}

fn is_welcome(b: &[u8]) -> bool {
    matches!(
        splicegate_proto::agent::decode(b),
        Ok(Some((splicegate_proto::agent::Frame::Welcome { .. }, _)))
    )
}

#[test]
fn hostile_agents_are_closed_without_harm_to_other_agents_or_clients() {
    use splicegate_proto::agent::Frame;
    let lab = Lab::start();
    let _a = lab.agent("dev-a", KEY_A);
    lab.wait_connected("dev-a", true, Duration::from_secs(10));
    let u = user("country-us");
    let works = |what: &str| {
        let out = Curl::new(client_ip())
            .proxy(lab.gw.proxy)
            .user(&u, KEY)
            .get(&lab.web.url("/ip"));
        assert_eq!(out.last().status, 200, "after {what}: {out:#?}");
    };
    works("start");

    // A version the gateway does not speak: refused with a reason.
    let mut v = RawAgent::connect(&lab);
    let mut f = splicegate_proto::agent::FieldsBuf::new();
    f.push("id", "dev-b");
    f.push("key", KEY_B);
    v.frame(Frame::Hello {
        version: 99,
        fields: f.fields(),
    })
    .unwrap();
    let answer = v.next().expect("an answer");
    match splicegate_proto::agent::decode(&answer) {
        Ok(Some((Frame::Refuse { reason, text }, _))) => {
            assert_eq!(reason, splicegate_proto::agent::Refusal::Version);
            assert!(text.contains("version 1"), "{text}");
        }
        other => panic!("{other:?}"),
    }

    // An oversized frame after a good hello: the link is closed, the node
    // goes offline, the other agent serves on.
    let mut big = RawAgent::connect(&lab);
    assert!(is_welcome(&big.hello("dev-b", KEY_B).expect("welcome")));
    lab.wait_connected("dev-b", true, Duration::from_secs(5));
    let mut header = vec![7u8, 0, 0, 0, 0, 1];
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    big.send(&header).unwrap();
    assert!(
        big.closed_within(Duration::from_secs(5)),
        "an oversized frame closes the link"
    );
    lab.wait_connected("dev-b", false, Duration::from_secs(5));
    works("an oversized frame");

    // A device may not open streams; garbage is a protocol error.
    for bad in [
        {
            let mut out = Vec::new();
            Frame::Open {
                stream: 2,
                window: 1000,
                target: "127.0.0.1:9",
            }
            .encode(&mut out);
            out
        },
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(),
        {
            let mut out = Vec::new();
            Frame::Hello {
                version: 1,
                fields: splicegate_proto::agent::FieldsBuf::new().fields(),
            }
            .encode(&mut out);
            out
        },
    ] {
        let mut r = RawAgent::connect(&lab);
        assert!(is_welcome(&r.hello("dev-b", KEY_B).expect("welcome")));
        r.send(&bad).unwrap();
        assert!(
            r.closed_within(Duration::from_secs(5)),
            "{bad:?} closes the link"
        );
    }
    works("protocol errors");

    // Floods of pings and window updates for streams that do not exist:
    // answered or ignored; the link lives and the node stays online.
    let mut flood = RawAgent::connect(&lab);
    assert!(is_welcome(&flood.hello("dev-b", KEY_B).expect("welcome")));
    let mut burst = Vec::new();
    for i in 0..20_000u64 {
        Frame::Ping {
            ack: false,
            opaque: i,
        }
        .encode(&mut burst);
        Frame::Window {
            stream: 1 + 2 * (i as u32 % 500),
            increment: u32::MAX,
        }
        .encode(&mut burst);
    }
    flood.send(&burst).unwrap();
    assert!(
        !flood.closed_within(Duration::from_millis(500)),
        "floods are not protocol errors"
    );
    assert_eq!(lab.node("dev-b")["connected"], true);
    works("a flood");
    drop(flood);

    // A stalled TLS handshake is closed after handshake_ms.
    let mut stalled = std::net::TcpStream::connect(lab.agents_addr()).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t0 = Instant::now();
    let mut one = [0u8; 1];
    let n = std::io::Read::read(&mut stalled, &mut one).unwrap_or(0);
    assert_eq!(n, 0, "the gateway sends nothing and closes");
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "closed after the handshake deadline: {:?}",
        t0.elapsed()
    );
    works("a stalled handshake");
}

#[test]
fn wrong_keys_ban_a_source_on_the_agent_port_only() {
    let lab = Lab::start_with(|mut c| {
        c.extra
            .push_str("[ebpf]\nban_threshold = 3\nban_window_s = 60\nban_s = 60\n");
        c
    });
    let src = client_ip();
    let attempt = || -> bool {
        // From `src`: TLS, then a hello with a wrong key.
        let sock = splicegate_tests::connect_from(src.into(), lab.agents_addr());
        let Ok(sock) = sock else { return false };
        let _ = sock.set_read_timeout(Some(Duration::from_secs(5)));
        let mut raw = match tls_over(sock, &lab.ca.ca_pem()) {
            Some(t) => RawAgent {
                tls: t,
                buf: Vec::new(),
            },
            None => return false,
        };
        raw.hello("dev-a", "ak_wrong").is_some()
    };
    // More than ban_threshold wrong keys within the window ban the source.
    for i in 0..4 {
        assert!(attempt(), "attempt {i} is answered (with a refusal)");
    }
    // Banned now: the agent port closes at once.
    assert!(!attempt(), "the source is banned on the agent port");
    // The proxy port from the same source is untouched.
    let out = Curl::new(src)
        .proxy(lab.gw.proxy)
        .user(&user("country-us"), "wrong")
        .get(&lab.web.url("/ip"));
    assert_eq!(
        out.last().status,
        407,
        "the proxy port still answers this source: {out:#?}"
    );
    // Another source still gets in with the right key.
    let _a = lab.agent("dev-a", KEY_A);
    lab.wait_connected("dev-a", true, Duration::from_secs(10));
}

/// TLS (trusting `ca`, as `localhost`) over a connected socket.
fn tls_over(
    sock: std::net::TcpStream,
    ca: &std::path::Path,
) -> Option<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).ok()? {
        roots.add(c.ok()?).ok()?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .ok()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").ok()?;
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).ok()?;
    let mut sock = sock;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).ok()?;
    }
    Some(rustls::StreamOwned::new(conn, sock))
}

#[test]
fn a_new_key_or_a_deleted_node_ends_the_agents_connection() {
    let lab = Lab::start();
    let admin = lab.gw.admin_addr();
    // An agent node made through the API: its key is shown once.
    let (status, made) = admin_request(
        admin,
        "POST",
        "/v1/nodes",
        Some(r#"{"id": "dev-api", "kind": "agent", "country": "us"}"#),
    )
    .unwrap();
    assert_eq!(status, 201, "{made}");
    let key = made["key"].as_str().expect("a generated key").to_string();
    let mut a = lab.agent("dev-api", &key);
    lab.wait_connected("dev-api", true, Duration::from_secs(10));
    // A new key: the connected device must prove it, so its connection
    // ends; with the old key it is refused and stops (status 2).
    let (status, rotated) = admin_request(admin, "POST", "/v1/nodes/dev-api/key", None).unwrap();
    assert_eq!(status, 200, "{rotated}");
    let new_key = rotated["key"].as_str().expect("the new key").to_string();
    assert_ne!(new_key, key);
    lab.wait_connected("dev-api", false, Duration::from_secs(5));
    let st = a
        .wait_exit(Duration::from_secs(15))
        .expect("the agent stops");
    assert_eq!(st.code(), Some(2), "{}", a.log());
    // The new key gets in; deleting the node ends that connection too.
    let mut b = lab.agent("dev-api", &new_key);
    lab.wait_connected("dev-api", true, Duration::from_secs(10));
    let (status, _) = admin_request(admin, "DELETE", "/v1/nodes/dev-api", None).unwrap();
    assert!(status == 200 || status == 204, "{status}");
    let st = b
        .wait_exit(Duration::from_secs(15))
        .expect("the agent stops");
    assert_eq!(
        st.code(),
        Some(2),
        "a deleted node's key is refused: {}",
        b.log()
    );
}

/// The fleet's enrolment secret in the enrolment tests (at least 16
/// characters, as `[agents] enrol_key` requires).
const ENROL: &str = "enrol-secret-0123456789";

/// Node `id` per the admin API: the status and the JSON (404 while it does
/// not exist).
fn node_status(lab: &Lab, id: &str) -> (u16, Value) {
    admin_request(lab.gw.admin_addr(), "GET", &format!("/v1/nodes/{id}"), None).expect("admin API")
}

/// A temporary directory removed when dropped (a device's `--state-dir`,
/// which outlives one agent process).
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn a_device_enrols_keeps_its_key_reconnects_with_it_and_taken_or_revoked_ids_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::start_with(|mut c| {
        // Still in [agents] (the last table of the file).
        c.extra.push_str(&format!("enrol_key = \"{ENROL}\"\n"));
        c
    });
    let state = TempDir(temp_dir("agent-state"));
    let enrol = |id: &str, dir: &std::path::Path, secret: &str| {
        AgentProc::start(
            AgentSpec::enrol(id, secret, dir, lab.agents_addr(), &lab.ca.ca_pem()).args(&[
                "--country",
                "de",
                "--city",
                "berlin",
            ]),
        )
    };

    // Enrolment: the device becomes node dev-new with what it announced.
    assert_eq!(node_status(&lab, "dev-new").0, 404, "no such node yet");
    let mut dev = enrol("dev-new", &state.0, ENROL);
    lab.wait_connected_new("dev-new", Duration::from_secs(10));
    let n = lab.node("dev-new");
    assert_eq!(n["kind"], "agent", "{n}");
    assert_eq!(n["state"], "online", "{n}");
    assert_eq!(n["country"], "de", "{n}");
    assert_eq!(n["city"], "berlin", "{n}");
    // The device's log reaches its file after the gateway saw it connect.
    assert!(
        dev.wait_log("enrolled", Duration::from_secs(5)),
        "{}",
        dev.log()
    );
    // It keeps the key it was issued, readable by its owner only, and that
    // key is not the fleet's secret.
    let key_file = state.0.join("key");
    let meta = std::fs::metadata(&key_file).expect("the device keeps its key in --state-dir");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{meta:?}");
    let key = std::fs::read_to_string(&key_file).expect("key");
    assert!(key.trim().len() >= 16, "a real key: {key:?}");
    assert!(
        !key.contains(ENROL),
        "the enrolment secret is never a device's key"
    );
    assert!(
        !n.to_string().contains(key.trim()),
        "the API never shows the key: {n}"
    );

    // Traffic for Germany goes through it.
    let out = Curl::new(client_ip())
        .proxy(lab.gw.proxy)
        .user(&user("country-de"), KEY)
        .get(&lab.web.url("/ip"));
    assert_eq!(out.code, 0, "{out:#?}");
    assert_eq!(out.last().status, 200, "{out:#?}");
    assert_eq!(
        lab.web.requests().len(),
        1,
        "the request reached the target"
    );
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let n = lab.node("dev-new");
        if n["agent"]["bytes_down"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < until, "no bytes through dev-new: {n}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Restarted with only its state directory (no secret, no key): it
    // connects with the key it kept.
    let st = dev.terminate().expect("SIGTERM ends the agent");
    assert_eq!(st.code(), Some(0), "{}", dev.log());
    lab.wait_connected("dev-new", false, Duration::from_secs(5));
    let mut dev = AgentProc::start(
        AgentSpec::new("dev-new", "", lab.agents_addr(), &lab.ca.ca_pem())
            .keyless()
            .state_dir(&state.0),
    );
    lab.wait_connected("dev-new", true, Duration::from_secs(10));
    assert!(!dev.log().contains("enrolled"), "{}", dev.log());
    assert_eq!(
        std::fs::read_to_string(&key_file).expect("key"),
        key,
        "the kept key is unchanged"
    );

    // A wrong secret, and a taken id (dev-a is the file's), end an agent
    // with status 2: retrying cannot help.
    let wrong_dir = TempDir(temp_dir("agent-state-wrong"));
    let mut wrong = enrol("dev-other", &wrong_dir.0, "not-the-enrolment-secret");
    let st = wrong
        .wait_exit(Duration::from_secs(15))
        .expect("a wrong secret ends the agent");
    assert_eq!(st.code(), Some(2), "{}", wrong.log());
    assert!(
        !wrong_dir.0.join("key").exists(),
        "no key for a wrong secret"
    );
    assert_eq!(node_status(&lab, "dev-other").0, 404);
    let taken_dir = TempDir(temp_dir("agent-state-taken"));
    let mut taken = enrol("dev-a", &taken_dir.0, ENROL);
    let st = taken
        .wait_exit(Duration::from_secs(15))
        .expect("a taken id ends the agent");
    assert_eq!(st.code(), Some(2), "{}", taken.log());
    assert!(taken.log().contains("taken"), "{}", taken.log());
    assert!(!taken_dir.0.join("key").exists(), "no key for a taken id");
    let a = lab.node("dev-a");
    assert_eq!(a["country"], "us", "the file's node is untouched: {a}");

    // Deleting the node revokes the id: the connected agent is dropped
    // (it reconnects with its key, which is refused: status 2) ...
    let (status, v) =
        admin_request(lab.gw.admin_addr(), "DELETE", "/v1/nodes/dev-new", None).expect("admin API");
    assert!((200..300).contains(&status), "{status} {v}");
    assert_eq!(node_status(&lab, "dev-new").0, 404);
    // The gateway checks once a second; the agent retries after its first
    // backoff (at most 1.5 s) and is refused: 10 s is ample.
    let st = dev
        .wait_exit(Duration::from_secs(10))
        .expect("the deleted node's agent is dropped and stops");
    assert_eq!(st.code(), Some(2), "{}", dev.log());
    // ... and a device enrolling as dev-new again is refused for good.
    let again_dir = TempDir(temp_dir("agent-state-again"));
    let mut again = enrol("dev-new", &again_dir.0, ENROL);
    let st = again
        .wait_exit(Duration::from_secs(15))
        .expect("a revoked id ends the agent");
    assert_eq!(st.code(), Some(2), "{}", again.log());
    assert!(again.log().contains("revoked"), "{}", again.log());
    assert_eq!(node_status(&lab, "dev-new").0, 404);
}

/// The waits (in seconds) the agent's log announces before reconnecting to
/// `gw` ("reconnecting in 1.3 s"), in order.
fn backoffs(log: &str, gw: SocketAddr) -> Vec<f64> {
    let tag = format!("gateway=\"{gw}\"");
    log.lines()
        .filter(|l| l.contains(&tag))
        .filter_map(|l| l.split("reconnecting in ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn an_agent_keeps_a_connection_to_each_gateway_and_the_second_serves_while_the_first_is_down() {
    let lab = Lab::start();
    // A second gateway: its own store and ports, a certificate from the
    // same CA, the same agent nodes.
    let gw2 = Gateway::start_conf(&agents_conf(&lab.ca, "gw2", "127.0.0.1:@PORT_AGENTS@"));
    let (gw1_agents, gw2_agents) = (lab.agents_addr(), gw2.addr("AGENTS"));
    let mut agent = AgentProc::start(
        AgentSpec::new("dev-a", KEY_A, gw1_agents, &lab.ca.ca_pem())
            .gateways(&[gw1_agents, gw2_agents]),
    );
    // One connection to each: both gateways' APIs show it connected.
    lab.wait_connected("dev-a", true, Duration::from_secs(10));
    let on2 = Lab::wait_connected_on(&gw2, "dev-a", true, Duration::from_secs(10));
    let since2 = on2["agent"]["since"].clone();
    assert!(!since2.is_null(), "{on2}");
    let url = lab.web.url("/ip");
    let get = |proxy: SocketAddr, what: &str| {
        let out = Curl::new(client_ip())
            .proxy(proxy)
            .user(&user("country-us"), KEY)
            .get(&url);
        assert_eq!(out.code, 0, "{what}: {out:#?}");
        assert_eq!(out.last().status, 200, "{what}: {out:#?}");
    };
    get(lab.gw.proxy, "through gateway 1");
    get(gw2.proxy, "through gateway 2");

    // Gateway 1 stops (SIGTERM): gateway 2 keeps serving through the same
    // agent, whose connection to it is untouched.
    let Lab { mut gw, ca, web } = lab;
    gw.signal("TERM");
    let st = gw.wait_exit(Duration::from_secs(10));
    assert!(st.is_some_and(|s| s.success()), "gateway 1 stops: {st:?}");
    let down_at = Instant::now();
    for i in 0..5 {
        get(
            gw2.proxy,
            &format!("request {i} through gateway 2, gateway 1 down"),
        );
    }
    let on2 = Lab::wait_connected_on(&gw2, "dev-a", true, Duration::from_secs(1));
    assert_eq!(
        on2["agent"]["since"], since2,
        "the connection to gateway 2 never dropped: {on2}"
    );
    assert!(agent.running(), "{}", agent.log());
    // Gateway 1 stays down until the agent's first retry failed.
    let refused = "cannot connect";
    let tag = format!("gateway=\"{gw1_agents}\"");
    assert!(
        eventually(Duration::from_secs(10), Duration::from_millis(50), || {
            agent
                .log()
                .lines()
                .any(|l| l.contains(refused) && l.contains(&tag))
                .then_some(())
        })
        .is_some(),
        "the agent retries gateway 1: {}",
        agent.log()
    );
    get(gw2.proxy, "through gateway 2, gateway 1 still down");

    // Gateway 1 again, on the same ports: the agent comes back to it
    // within its backoff. Bound: the last wait it announced for gateway 1
    // before connecting, plus 2 s for TCP, TLS, the hello and the API's
    // poll; that wait is the second backoff (2 s x at most 1.5 jitter), or
    // the third (6 s) if a retry hit the restart.
    let gw = gw.restart();
    let up_at = Instant::now();
    let lab = Lab { gw, ca, web };
    lab.wait_connected("dev-a", true, Duration::from_secs(30));
    let back = up_at.elapsed();
    let waits = backoffs(&agent.log(), gw1_agents);
    let last = *waits.last().expect("the agent announced its backoff");
    assert!(
        waits.len() >= 2,
        "a failed retry, then a longer wait: {waits:?}"
    );
    eprintln!(
        "gateway 1 down {:.1} s; the agent's waits {waits:?} s; back {:.2} s after the restart",
        (up_at - down_at).as_secs_f64(),
        back.as_secs_f64()
    );
    assert!(last <= 6.0, "backoff past the third step: {waits:?}");
    assert!(
        back.as_secs_f64() <= last + 2.0,
        "reconnected {back:?} after the restart, its last wait {last} s: {waits:?}"
    );
    get(lab.gw.proxy, "through gateway 1 after its restart");
    get(gw2.proxy, "through gateway 2 after gateway 1's restart");
    let on2 = Lab::wait_connected_on(&gw2, "dev-a", true, Duration::from_secs(1));
    assert_eq!(on2["agent"]["since"], since2, "{on2}");
    assert!(agent.running(), "{}", agent.log());
    let st = agent.terminate().expect("SIGTERM ends the agent");
    assert_eq!(st.code(), Some(0), "{}", agent.log());
}

/// Prints a `FIGURE` line on the process's stderr directly, past the test
/// harness's capture, so that every run shows it.
fn figure(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "FIGURE {text}");
}

#[test]
fn an_agent_whose_network_is_cut_silently_goes_offline_within_three_heartbeats() {
    use splicegate_tests::netns::{NetLink, netns_ready};
    if !netns_ready("an_agent_whose_network_is_cut_silently_goes_offline_within_three_heartbeats") {
        return;
    }
    // The device in a namespace of its own, behind a veth; the gateway's
    // agent listener on the host end.
    let link = NetLink::veth("cut");
    let lab = Lab::start_at(&format!("{}:@PORT_AGENTS@", link.host_ip), |mut c| {
        c.allow_targets.push(format!("{}/32", link.host_ip));
        c
    });
    assert_eq!(lab.agents_addr().ip(), link.host_ip);
    // A target the device reaches across the link.
    let web = HttpTarget::start_on(link.host_ip.into());
    let agent = AgentProc::start(
        AgentSpec::new("dev-a", KEY_A, lab.agents_addr(), &lab.ca.ca_pem()).in_netns(&link.ns),
    );
    lab.wait_connected("dev-a", true, Duration::from_secs(10));
    let n = lab.node("dev-a");
    assert_eq!(
        n["agent"]["addr"].as_str().map(|a| a.split(':').next()),
        Some(Some(link.ns_ip.to_string().as_str())),
        "connected from the namespace: {n}"
    );
    // The status of a request through the agent (curl gives up after 5 s).
    let status = || {
        let out = Curl::new(client_ip())
            .proxy(lab.gw.proxy)
            .user(&user("country-us"), KEY)
            .arg("--max-time")
            .arg("5")
            .get(&web.url("/ip"));
        out.last().status
    };
    assert_eq!(status(), 200, "before the cut");
    // A few heartbeats both ways first.
    std::thread::sleep(Duration::from_millis(1500));

    // Cut silently, both ends: no RST, no ICMP, the interfaces stay up.
    // Only the missing heartbeats can tell.
    let how = link.cut();
    let cut_at = Instant::now();
    let heartbeat = Duration::from_secs(1);
    // The gateway checks once a heartbeat for silence longer than three:
    // offline between 3 heartbeats after the last bytes heard (at most
    // ~1 s before the cut) and 4 after the cut; slack: one heartbeat for
    // that check's period and 0.5 s for the API's poll.
    let bound = heartbeat * 3 + heartbeat + Duration::from_millis(500);
    let offline = eventually(Duration::from_secs(15), Duration::from_millis(20), || {
        (lab.node("dev-a")["connected"] == false).then(|| cut_at.elapsed())
    })
    .unwrap_or_else(|| panic!("still connected 15 s after the cut ({how})"));
    let n = lab.node("dev-a");
    assert_eq!(n["state"], "offline", "{n}");
    assert!(
        offline <= bound,
        "offline {offline:?} after the cut; three heartbeats + slack is {bound:?}"
    );
    // Not at once: a reset or an error would end the link at once; silence
    // takes heartbeats (at least two after the cut, one kept as margin for
    // a loaded machine delaying the device's pings before it).
    assert!(
        offline >= heartbeat,
        "offline after {offline:?}: before heartbeats could have told (a reset?)"
    );
    // The device notices too (it hears no answers to its pings).
    assert!(
        agent.wait_log("no heartbeat", Duration::from_secs(6)),
        "{}",
        agent.log()
    );
    // Offline, the node is not chosen: nothing else matches.
    assert_ne!(status(), 200, "during the cut");

    // The network returns: the device reconnects on its own. Bound: its
    // connect attempt (SYN retransmits, a 10 s timeout) and one backoff.
    link.restore();
    let restored_at = Instant::now();
    lab.wait_connected("dev-a", true, Duration::from_secs(25));
    let back = restored_at.elapsed();
    assert_eq!(status(), 200, "after the cut");
    figure(&format!(
        "agents: a silent network cut ({how}) → node offline after {:.2} s (heartbeat_s = 1, bound {:.1} s); online again {:.2} s after the network returned",
        offline.as_secs_f64(),
        bound.as_secs_f64(),
        back.as_secs_f64()
    ));
}

/// Reads from `conn` (past `already` bytes it buffered) until `total`
/// bytes, EOF or `until`; the bytes read.
fn drain(conn: &mut splicegate_tests::Conn, already: usize, total: u64, until: Instant) -> u64 {
    let mut got = already as u64;
    let mut buf = vec![0u8; 1 << 20];
    conn.set_timeout(Duration::from_secs(5));
    while got < total && Instant::now() < until {
        match conn.try_read(&mut buf) {
            Some(0) | None => break,
            Some(n) => got += n as u64,
        }
    }
    got
}

/// One stream through an agent over a long, fat link (100 ms round trip,
/// 100 Mbit/s: a bandwidth-delay product of 1.25 MB, five times the
/// stream's first window, so a fixed window would cap it near 20 %) against
/// one plain TCP connection over the same link, in the same run, the same
/// size: the agent's stream must reach 90 % of it.
///
/// The device and a bulk source share a namespace behind the link; the
/// plain connection goes from the host to the source across the link, the
/// agent's stream from the gateway on the host through the agent's link
/// to the source on the device's loopback. The link is `tc netem` on both
/// veth ends where the kernel has netem, else the user-space delay line
/// (`scripts/agents/delayline.py`), with the same delay, rate and limit;
/// the output says which. `scripts/agents/netem.sh` runs it on purpose.
#[test]
fn one_stream_through_an_agent_over_a_100ms_link_reaches_90_percent_of_plain_tcp() {
    use splicegate_tests::netns::{DelayLine, NetLink, host_sysctl, netns_ready};
    if !netns_ready("one_stream_through_an_agent_over_a_100ms_link_reaches_90_percent_of_plain_tcp")
    {
        return;
    }
    // 50 ms each way, 100 Mbit/s each way; the queue of each direction
    // holds 1,250 packets (delay line and rate queue together, as netem
    // counts): 417 are in flight in 50 ms at 100 Mbit/s, the rest is one
    // bandwidth-delay product of queue.
    const BYTES: u64 = 100_000_000;
    const MAX_TRANSFER: Duration = Duration::from_secs(20);
    let line = DelayLine {
        delay: Duration::from_millis(50),
        rate_bps: 100_000_000,
        limit: 1250,
    };
    let veth = NetLink::veth("fat");
    let (link, how) = if veth.has_netem() {
        let limit = line.limit.to_string();
        let spec = ["netem", "delay", "50ms", "rate", "100mbit", "limit", &limit];
        veth.qdisc(true, &spec);
        (
            veth,
            format!("tc qdisc {} on both veth ends", spec.join(" ")),
        )
    } else {
        drop(veth);
        (
            NetLink::delay_line("fat", line),
            format!(
                "the kernel has no sch_netem: user-space delay line (scripts/agents/delayline.py), delay {} ms, rate {} bit/s, limit {} packets each way",
                line.delay.as_millis(),
                line.rate_bps,
                line.limit
            ),
        )
    };
    // Senders (the source, the agent) are in the namespace: their buffers
    // may grow past the path's bandwidth-delay product.
    let ns_rmem = link.sysctl("net.ipv4.tcp_rmem", "4096 131072 33554432");
    let ns_wmem = link.sysctl("net.ipv4.tcp_wmem", "4096 16384 33554432");
    let settings = format!(
        "link: {how}; namespace: tcp_rmem {ns_rmem}, tcp_wmem {ns_wmem}, congestion control {}; host (unchanged): tcp_rmem {}, tcp_wmem {}, congestion control {}",
        link.read_sysctl("net.ipv4.tcp_congestion_control"),
        host_sysctl("net.ipv4.tcp_rmem"),
        host_sysctl("net.ipv4.tcp_wmem"),
        host_sysctl("net.ipv4.tcp_congestion_control"),
    );
    figure(&format!("agents flow control settings: {settings}"));

    let lab = Lab::start_at(&format!("{}:@PORT_AGENTS@", link.host_ip), |c| c);
    let source = link.source(BYTES, Duration::from_secs(300));
    let _agent = AgentProc::start(
        AgentSpec::new("dev-a", KEY_A, lab.agents_addr(), &lab.ca.ca_pem()).in_netns(&link.ns),
    );
    lab.wait_connected("dev-a", true, Duration::from_secs(10));

    // One plain TCP connection from the host to the source.
    let t = Instant::now();
    let sock = std::net::TcpStream::connect_timeout(
        &SocketAddr::from((link.ns_ip, source.port)),
        Duration::from_secs(5),
    )
    .expect("connect to the source across the link");
    let mut plain = splicegate_tests::Conn::new(sock);
    let plain_bytes = drain(&mut plain, 0, BYTES, t + MAX_TRANSFER);
    let plain_s = t.elapsed().as_secs_f64();
    drop(plain);

    // One stream through the agent: CONNECT to the source on the device's
    // own loopback (the agent allows private targets here).
    let t = Instant::now();
    let mut conn = splicegate_tests::Conn::open(client_ip(), lab.gw.proxy).expect("the proxy");
    conn.set_timeout(Duration::from_secs(10));
    let target = format!("127.0.0.1:{}", source.port);
    let r = conn
        .connect(&target, Some((&user("country-us"), KEY)), &[])
        .expect("CONNECT");
    assert_eq!(r.status, 200, "{r:?}");
    let already = conn.buffered().len();
    let agent_bytes = drain(&mut conn, already, BYTES, t + MAX_TRANSFER);
    let agent_s = t.elapsed().as_secs_f64();
    drop(conn);

    let mb_s = |bytes: u64, s: f64| bytes as f64 / s / 1e6;
    let (plain_rate, agent_rate) = (mb_s(plain_bytes, plain_s), mb_s(agent_bytes, agent_s));
    let ratio = agent_rate / plain_rate;
    figure(&format!(
        "agents flow control, 100 ms RTT at 100 Mbit/s: plain TCP {plain_rate:.2} MB/s ({plain_bytes} B in {plain_s:.2} s), one stream through the agent {agent_rate:.2} MB/s ({agent_bytes} B in {agent_s:.2} s), ratio {ratio:.3}"
    ));
    assert_eq!(plain_bytes, BYTES, "the plain transfer completed");
    assert!(
        ratio >= 0.9,
        "one stream through the agent reached {:.1} % of plain TCP ({settings})\n{}",
        ratio * 100.0,
        link.line_log()
    );
}

/// `[agents] geoip` with MaxMind's test databases: a device enrolling from
/// 81.2.69.142 (London in `GeoIP2-City-Test.mmdb`) becomes a node in gb /
/// england / london whatever it announces. The device runs in a namespace
/// that owns that address (nothing leaves the machine).
#[test]
fn an_enrolled_device_takes_its_addresss_attributes_from_geoip() {
    use splicegate_tests::netns::{NetLink, netns_ready};
    if !netns_ready("an_enrolled_device_takes_its_addresss_attributes_from_geoip") {
        return;
    }
    const SECRET: &str = "fleet-enrol-secret-0123456789";
    const LONDON: &str = "81.2.69.142";
    let link = NetLink::veth("geo");
    // The namespace's connections to the gateway leave from LONDON; the
    // host routes the answers back to it over the veth.
    let ns_run = |args: &[&str]| {
        let st = std::process::Command::new("ip")
            .arg("-n")
            .arg(&link.ns)
            .args(args)
            .status()
            .expect("ip");
        assert!(st.success(), "ip -n {} {args:?}", link.ns);
    };
    ns_run(&["addr", "add", &format!("{LONDON}/32"), "dev", &link.ns_if]);
    ns_run(&[
        "route",
        "replace",
        &format!("{}/32", link.host_ip),
        "dev",
        &link.ns_if,
        "src",
        LONDON,
    ]);
    let st = std::process::Command::new("ip")
        .args([
            "route",
            "replace",
            &format!("{LONDON}/32"),
            "dev",
            &link.host_if,
        ])
        .status()
        .expect("ip");
    assert!(st.success());
    let testdata = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dataplane/gateway/testdata/maxmind");
    let lab = Lab::start_at(&format!("{}:@PORT_AGENTS@", link.host_ip), |mut c| {
        c.extra.push_str(&format!(
            "enrol_key = {SECRET:?}\ngeoip = [{:?}, {:?}]\n",
            testdata.join("GeoIP2-City-Test.mmdb").display().to_string(),
            testdata
                .join("GeoLite2-ASN-Test.mmdb")
                .display()
                .to_string(),
        ));
        c
    });
    let state = temp_dir("geo-state");
    let spec = AgentSpec::enrol(
        "dev-geo",
        SECRET,
        &state,
        lab.agents_addr(),
        &lab.ca.ca_pem(),
    )
    .args(&["--country", "us", "--city", "new_york", "--network", "mob"])
    .in_netns(&link.ns);
    let agent = AgentProc::start(spec);
    let n = eventually(Duration::from_secs(15), Duration::from_millis(50), || {
        let (status, v) =
            admin_request(lab.gw.admin_addr(), "GET", "/v1/nodes/dev-geo", None).ok()?;
        (status == 200 && v["connected"] == true).then_some(v)
    })
    .unwrap_or_else(|| panic!("never enrolled:\n{}\n{}", agent.log(), lab.gw.log_tail(20)));
    assert!(
        n["agent"]["addr"]
            .as_str()
            .is_some_and(|a| a.starts_with(LONDON)),
        "connected from {LONDON}: {n}"
    );
    assert_eq!(
        n["country"], "gb",
        "the database wins over the announced us: {n}"
    );
    assert_eq!(n["region"], "england", "{n}");
    assert_eq!(n["city"], "london", "{n}");
    assert_eq!(
        n["network"], "mob",
        "what the database lacks comes from the device: {n}"
    );
}
