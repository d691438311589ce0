//! HTTP/3 through SOCKS5 UDP ASSOCIATE (SPEC section 12, issue 17): a real
//! QUIC client and server (Python's `aioquic`) talk through the real
//! gateway's association and a `direct` node. The client does the SOCKS5
//! handshake itself, then drives `aioquic`'s sans-IO `QuicConnection` over
//! a plain UDP socket, wrapping each datagram in RFC 1928's header to
//! BND and unwrapping the answers; the server (TLS with a leaf of the test
//! CA, which the client verifies) answers `/bytes/N` with N bytes of a
//! known sequence and names, in `x-peers`, every address its datagrams
//! came from. Shown: the handshake, a 200 KB and a small body byte for
//! byte on two concurrent streams, the node's source address as the only
//! peer the server ever saw, every datagram counted both ways in
//! `/metrics`, none dropped, and the payload bytes as the package's
//! traffic — with the server named by address and by name.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use splicegate_tests::gateway::{signal, temp_dir, wait_child};
use splicegate_tests::ops::sample;
use splicegate_tests::pki::{Leaf, TestCa};
use splicegate_tests::*;

/// The server: HTTP/3 on UDP 127.0.0.1:0, printing `PORT <n>` once bound,
/// exiting by itself after `lifetime` seconds should nobody stop it.
/// `/bytes/N` answers N bytes of [`body`]'s sequence; every answer carries
/// `x-peers`, the addresses the connection's datagrams came from so far.
const SERVER: &str = r#"
import asyncio, hashlib, sys
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ProtocolNegotiated

cert, key, lifetime = sys.argv[1], sys.argv[2], float(sys.argv[3])


def body(n):
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d:%d" % (n, i)).digest()
        i += 1
    return bytes(out[:n])


class H3Server(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = None
        self.peers = set()

    def datagram_received(self, data, addr):
        self.peers.add("%s:%d" % (addr[0], addr[1]))
        super().datagram_received(data, addr)

    def quic_event_received(self, event):
        if isinstance(event, ProtocolNegotiated) and event.alpn_protocol in H3_ALPN:
            self.h3 = H3Connection(self._quic)
        if self.h3 is None:
            return
        for ev in self.h3.handle_event(event):
            if not isinstance(ev, HeadersReceived):
                continue
            path = dict(ev.headers).get(b":path", b"").decode()
            peers = ",".join(sorted(self.peers))
            print("request %s from %s" % (path, peers), file=sys.stderr, flush=True)
            if path.startswith("/bytes/") and path[7:].isdigit():
                status, data = b"200", body(int(path[7:]))
            else:
                status, data = b"404", b"no such path\n"
            self.h3.send_headers(ev.stream_id, [
                (b":status", status),
                (b"content-length", str(len(data)).encode()),
                (b"x-peers", peers.encode()),
            ])
            self.h3.send_data(ev.stream_id, data, end_stream=True)
        self.transmit()


async def main():
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    config.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: QuicServer(configuration=config, create_protocol=H3Server),
        local_addr=("127.0.0.1", 0),
    )
    print("PORT %d" % transport.get_extra_info("sockname")[1], flush=True)
    await asyncio.sleep(lifetime)


asyncio.run(main())
"#;

/// The client: from `src`, a SOCKS5 handshake (username/password, UDP
/// ASSOCIATE) with the proxy, then HTTP/3 to `server` (its real address,
/// which answers must name as their sender) written in each datagram's
/// header as `via` (an address or a name the gateway resolves), trusting
/// `ca` for `localhost`; one GET per path on concurrent streams, bodies
/// written to `outdir`. Gives up after `limit` seconds. Prints one JSON
/// object: the reply, BND, datagrams and payload bytes each way, datagrams
/// that were not the server's answers through BND (`foreign`), the
/// responses, timings and an `error` (null when all went well).
const CLIENT: &str = r#"
import json, os, select, socket, struct, sys, time
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted

proxy, pport, user, key, src, server, via, ca, outdir, limit = sys.argv[1:11]
paths = sys.argv[11:]
started = time.monotonic()
deadline = started + float(limit)
out = {"reply": None, "sent": 0, "received": 0, "sent_bytes": 0, "received_bytes": 0,
       "foreign": 0, "responses": []}


def finish(error=None):
    out["error"] = error
    out["elapsed_ms"] = int((time.monotonic() - started) * 1000)
    print(json.dumps(out))
    sys.exit(0)


def recv_exactly(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            finish("the gateway closed the TCP connection in the handshake")
        data += chunk
    return data


# The SOCKS5 handshake: username/password, then UDP ASSOCIATE.
t = socket.create_connection((proxy, int(pport)), timeout=5, source_address=(src, 0))
t.sendall(b"\x05\x01\x02")
if recv_exactly(t, 2) != b"\x05\x02":
    finish("no username/password method")
t.sendall(bytes([1, len(user)]) + user.encode() + bytes([len(key)]) + key.encode())
if recv_exactly(t, 2) != b"\x01\x00":
    finish("authentication refused")
t.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
rep = recv_exactly(t, 4)
out["reply"] = rep[1]
if rep[1] != 0 or rep[3] != 1:
    finish("UDP ASSOCIATE refused")
rest = recv_exactly(t, 6)
bnd = (socket.inet_ntoa(rest[:4]), struct.unpack(">H", rest[4:])[0])
out["bnd"] = "%s:%d" % bnd

# Each datagram goes to BND behind 0 0 FRAG=0 ATYP DST.ADDR DST.PORT.
host, port = server.rsplit(":", 1)
target = (host, int(port))
vhost, vport = via.rsplit(":", 1)
try:
    dst = b"\x01" + socket.inet_aton(vhost)
except OSError:
    dst = b"\x03" + bytes([len(vhost)]) + vhost.encode()
header = b"\x00\x00\x00" + dst + struct.pack(">H", int(vport))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((src, 0))
u.setblocking(False)

config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="localhost")
config.load_verify_locations(cafile=ca)
quic = QuicConnection(configuration=config)
quic.connect(target, now=time.monotonic())
h3 = H3Connection(quic)
streams = {}


def transmit():
    for data, _ in quic.datagrams_to_send(now=time.monotonic()):
        u.sendto(header + data, bnd)
        out["sent"] += 1
        out["sent_bytes"] += len(data)


def unwrap(data):
    # 0 0 FRAG ATYP SRC.ADDR SRC.PORT DATA, from the server's address.
    if len(data) < 10 or data[:4] != b"\x00\x00\x00\x01":
        return None
    if (socket.inet_ntoa(data[4:8]), struct.unpack(">H", data[8:10])[0]) != target:
        return None
    return data[10:]


def done():
    return len(streams) == len(paths) and all(s["ended"] for s in streams.values())


while not done():
    transmit()
    now = time.monotonic()
    if now >= deadline:
        finish("no complete answer within %s s" % limit)
    wait = deadline - now
    timer = quic.get_timer()
    if timer is not None:
        wait = max(0.0, min(wait, timer - now))
    readable, _, _ = select.select([u, t], [], [], wait)
    if t in readable:
        t.setblocking(False)
        try:
            gone = t.recv(1) == b""
        except BlockingIOError:
            gone = False
        if gone:
            finish("the gateway closed the association's TCP connection")
    if u in readable:
        while True:
            try:
                data, frm = u.recvfrom(70000)
            except BlockingIOError:
                break
            payload = unwrap(data) if frm == bnd else None
            if payload is None:
                out["foreign"] += 1
                continue
            out["received"] += 1
            out["received_bytes"] += len(payload)
            quic.receive_datagram(payload, target, now=time.monotonic())
    timer = quic.get_timer()
    if timer is not None and time.monotonic() >= timer:
        quic.handle_timer(now=time.monotonic())
    event = quic.next_event()
    while event is not None:
        if isinstance(event, ConnectionTerminated):
            finish("QUIC connection closed: %s %s" % (event.error_code, event.reason_phrase))
        if isinstance(event, HandshakeCompleted):
            out["handshake_ms"] = int((time.monotonic() - started) * 1000)
            out["alpn"] = event.alpn_protocol
            for path in paths:
                sid = quic.get_next_available_stream_id()
                h3.send_headers(sid, [
                    (b":method", b"GET"),
                    (b":scheme", b"https"),
                    (b":authority", b"localhost"),
                    (b":path", path.encode()),
                ], end_stream=True)
                streams[sid] = {"path": path, "headers": {}, "body": bytearray(), "ended": False}
        for ev in h3.handle_event(event):
            s = streams.get(ev.stream_id)
            if s is None:
                continue
            if isinstance(ev, HeadersReceived):
                s["headers"].update({k.decode(): v.decode() for k, v in ev.headers})
            elif isinstance(ev, DataReceived):
                s["body"] += ev.data
            if ev.stream_ended:
                s["ended"] = True
        event = quic.next_event()

out["fetched_ms"] = int((time.monotonic() - started) * 1000)
quic.close()
transmit()
for i, s in enumerate(streams.values()):
    name = os.path.join(outdir, "%d.body" % i)
    with open(name, "wb") as f:
        f.write(s["body"])
    out["responses"].append({"path": s["path"], "headers": s["headers"],
                             "length": len(s["body"]), "file": name})
finish()
"#;

/// How long the client tries before it gives up, seconds.
const CLIENT_LIMIT_S: u64 = 20;

/// The large body: enough datagrams (~170) for congestion control,
/// acknowledgements and flow control to matter.
const BIG: usize = 200 * 1024;

/// The small body.
const SMALL: usize = 13;

/// What `/bytes/n` answers: SHA-256 of `"n:i"` for i = 0, 1, …, cut to n.
fn body(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 32);
    let mut i = 0u64;
    while out.len() < n {
        let d = ring::digest::digest(&ring::digest::SHA256, format!("{n}:{i}").as_bytes());
        out.extend_from_slice(d.as_ref());
        i += 1;
    }
    out.truncate(n);
    out
}

/// python3, with `aioquic` importable; panics saying how to install it.
fn python_with_aioquic() -> PathBuf {
    let python = require_tool("python3", "python3");
    let ok = Command::new(&python)
        .args(["-c", "import aioquic.h3.connection"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "Python's aioquic is not installed; these tests need it: scripts/install-test-deps \
         (python3 -m pip install aioquic)"
    );
    python
}

/// The HTTP/3 server process, stopped by its PID when dropped.
struct H3Server {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl H3Server {
    /// Start it with `leaf` and wait (≤ 20 s) for the port it bound.
    fn start(python: &Path, dir: &Path, leaf: &Leaf) -> H3Server {
        let log = dir.join("server.log");
        let mut child = Command::new(python)
            .arg("-c")
            .arg(SERVER)
            .arg(&leaf.cert)
            .arg(&leaf.key)
            .arg("120")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(fs::File::create(&log).expect("server log")))
            .spawn()
            .expect("spawn the HTTP/3 server");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok());
        let mut server = H3Server {
            child,
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port.unwrap_or(0)),
            log,
        };
        if port.is_none() {
            server.stop();
            panic!(
                "the HTTP/3 server reported no port ({line:?}):\n{}",
                server.log()
            );
        }
        server
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            signal(self.child.id(), "TERM");
            if wait_child(&mut self.child, Duration::from_secs(2)).is_none() {
                let _ = self.child.kill();
                let _ = wait_child(&mut self.child, Duration::from_secs(2));
            }
        }
    }
}

impl Drop for H3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A test's world: the server, a gateway with one `direct` node on `bind`,
/// the CA the client trusts, a directory for the logs and bodies.
struct Lab {
    python: PathBuf,
    dir: PathBuf,
    ca: TestCa,
    server: H3Server,
    bind: Ipv4Addr,
    gw: Gateway,
}

impl Lab {
    fn start() -> Lab {
        let python = python_with_aioquic();
        let dir = temp_dir("udp-quic");
        let ca = TestCa::new(&dir.join("pki"));
        let leaf = ca.leaf("h3", (2031, 7, 15));
        let server = H3Server::start(&python, &dir, &leaf);
        let bind = node_ip();
        let gw = Gateway::with_direct(bind);
        Lab {
            python,
            dir,
            ca,
            server,
            bind,
            gw,
        }
    }

    /// Runs the client from `src` (bounded: it gives up after
    /// [`CLIENT_LIMIT_S`], and is killed 10 s after that); its JSON.
    fn fetch(&self, src: Ipv4Addr, via: &str, paths: &[String]) -> serde_json::Value {
        let (stdout, stderr) = (self.dir.join("client.out"), self.dir.join("client.err"));
        let mut child = Command::new(&self.python)
            .arg("-c")
            .arg(CLIENT)
            .arg(self.gw.proxy.ip().to_string())
            .arg(self.gw.proxy.port().to_string())
            .arg(user("country-us"))
            .arg(KEY)
            .arg(src.to_string())
            .arg(self.server.addr.to_string())
            .arg(via)
            .arg(self.ca.ca_pem())
            .arg(&self.dir)
            .arg(CLIENT_LIMIT_S.to_string())
            .args(paths)
            .stdin(Stdio::null())
            .stdout(Stdio::from(fs::File::create(&stdout).expect("client.out")))
            .stderr(Stdio::from(fs::File::create(&stderr).expect("client.err")))
            .spawn()
            .expect("spawn the HTTP/3 client");
        if wait_child(&mut child, Duration::from_secs(CLIENT_LIMIT_S + 10)).is_none() {
            let _ = child.kill();
            let _ = wait_child(&mut child, Duration::from_secs(2));
            panic!("the client did not exit within {} s", CLIENT_LIMIT_S + 10);
        }
        let text = fs::read_to_string(&stdout).unwrap_or_default();
        serde_json::from_str(text.trim()).unwrap_or_else(|_| {
            panic!(
                "the client failed: {text}\n{}\n{}",
                fs::read_to_string(&stderr).unwrap_or_default(),
                self.logs()
            )
        })
    }

    fn logs(&self) -> String {
        format!(
            "server:\n{}\ngateway:\n{}",
            self.server.log(),
            self.gw.log_tail(20)
        )
    }
}

fn num(v: &serde_json::Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {key} in {v}"))
}

/// HTTP/3 GETs of a 200 KB and a small body through an association of a
/// `direct` node, the server written in the datagrams' headers as `via`
/// (given its port); what the test shows is in the module's comment.
fn http3_through_a_direct_node(via: impl Fn(u16) -> String) {
    let lab = Lab::start();
    let (gw, bind) = (&lab.gw, lab.bind);
    let paths = [format!("/bytes/{BIG}"), format!("/bytes/{SMALL}")];
    let started = Instant::now();
    let v = lab.fetch(client_ip(), &via(lab.server.addr.port()), &paths);
    let took = started.elapsed();
    let context = || format!("{v}\n{}", lab.logs());
    assert_eq!(v["error"], serde_json::Value::Null, "{}", context());
    assert_eq!(v["reply"], 0, "{}", context());
    assert!(
        v["bnd"].as_str().unwrap_or("").starts_with("127.0.0.1:"),
        "BND is the TCP connection's local address: {}",
        context()
    );
    assert_eq!(v["alpn"], "h3", "{}", context());
    assert_eq!(
        num(&v, "foreign"),
        0.0,
        "every datagram came from BND naming the server: {}",
        context()
    );
    let responses = v["responses"].as_array().expect("responses");
    assert_eq!(responses.len(), 2, "{}", context());
    for (r, n) in responses.iter().zip([BIG, SMALL]) {
        assert_eq!(r["path"], format!("/bytes/{n}"), "{}", context());
        assert_eq!(r["headers"][":status"], "200", "{}", context());
        let got = fs::read(r["file"].as_str().expect("file")).expect("the body");
        assert!(
            got == body(n),
            "/bytes/{n}: {} bytes, not the {n} expected ones: {}",
            got.len(),
            context()
        );
        // The server saw one peer: the node's source address (one exit
        // socket for the association, so one port too).
        let peers = r["headers"]["x-peers"].as_str().unwrap_or("");
        let peer: Vec<SocketAddr> = peers.split(',').filter_map(|p| p.parse().ok()).collect();
        assert!(
            peer.len() == 1 && peer[0].ip() == IpAddr::V4(bind),
            "the server saw {peers:?}, not one address of the node ({bind}): {}",
            context()
        );
    }
    let (sent, received) = (num(&v, "sent"), num(&v, "received"));
    assert!(
        received >= (BIG / 1500) as f64,
        "the 200 KB body came in ≥ {} datagrams: {}",
        BIG / 1500,
        context()
    );
    // Every datagram counted both ways: all the client sent went up (the
    // last, its CONNECTION_CLOSE, may still be on its way: eventually),
    // at least all it received came down; none dropped for a reason that
    // would be the gateway's fault.
    let counted = eventually(Duration::from_secs(5), Duration::from_millis(100), || {
        let m = gw.metrics();
        let up = sample(&m, "splicegate_udp_datagrams_total{direction=\"up\"}");
        let down = sample(&m, "splicegate_udp_datagrams_total{direction=\"down\"}");
        (up >= sent && down >= received).then_some(m)
    });
    let m = counted.unwrap_or_else(|| {
        panic!(
            "the client sent {sent} and received {received} datagrams; /metrics:\n{}\n{}",
            gw.metrics(),
            context()
        )
    });
    for reason in [
        "fragment",
        "blocked_target",
        "stranger",
        "malformed",
        "unreachable",
        "oversized",
    ] {
        let series = format!("splicegate_udp_dropped_total{{reason=\"{reason}\"}}");
        assert_eq!(sample(&m, &series), 0.0, "{series}: {m}");
    }
    // The payload bytes are the package's traffic (the ledger flushes
    // within a few seconds).
    let (sent_bytes, received_bytes) = (num(&v, "sent_bytes"), num(&v, "received_bytes"));
    let usage = eventually(Duration::from_secs(10), Duration::from_millis(100), || {
        let u = gw.package_usage(7).ok()?;
        (u.bytes_up as f64 >= sent_bytes && u.bytes_down as f64 >= received_bytes).then_some(u)
    });
    assert!(
        usage.is_some(),
        "the package's usage {:?} counts the payload bytes ({sent_bytes} up, {received_bytes} \
         down)",
        gw.package_usage(7)
    );
    eprintln!(
        "HTTP/3 through the association: handshake {} ms, both bodies {} ms, client {} ms, \
         {sent} datagrams up, {received} down; whole fetch {} ms",
        num(&v, "handshake_ms"),
        num(&v, "fetched_ms"),
        num(&v, "elapsed_ms"),
        took.as_millis()
    );
    let dir = lab.dir.clone();
    drop(lab);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn http3_goes_through_the_association_to_a_server_named_by_address() {
    http3_through_a_direct_node(|port| format!("127.0.0.1:{port}"));
}

#[test]
fn http3_goes_through_the_association_to_a_server_named_by_name() {
    // The gateway resolves `localhost`; answers name the address.
    http3_through_a_direct_node(|port| format!("localhost:{port}"));
}
