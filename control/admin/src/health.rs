//! Node health: probes on an interval with jitter, and passive failures from
//! real traffic, turned into `NodePool::set_healthy`.
//!
//! A probe is, per kind:
//! - `http` / `socks5`: with a probe target, a tunnel through the node to it
//!   (CONNECT answered 2xx; SOCKS5 reply 0x00), else a TCP connect to the node;
//! - `direct`: with a probe target, a TCP connect to it from the node's source
//!   address, else a check that the source address can still be bound.
//!
//! - `agent`: none. An agent node's health is its device's presence (the
//!   gateway's agent listener marks it connected or not, heartbeats
//!   included), so it is never probed and never taken out here.
//!
//! `failures` consecutive failed probes take a node out; one successful probe
//! brings it back and clears its failures, so selection gives it its share
//! at once. `failures` failures seen by real traffic since the node's last
//! success (`NodeRuntime::recent_failures`, forgotten after ten seconds
//! without another) also take it out, until a probe succeeds — except an
//! agent node, which no probe could bring back: its recent failures only
//! weigh selection away from it. Every probe runs as a task on the admin thread's runtime,
//! at most [`CONCURRENCY`] at a time, each bounded by a timeout; no thread is
//! started and no name is resolved here (the probe target's address is
//! resolved once, at start, by the binary).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use splicegate_control::nodes::{Node, NodeIdx, NodeKind, Rng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};

use crate::control::Control;

/// Probes in flight at once.
pub const CONCURRENCY: usize = 64;

/// How to probe.
#[derive(Debug, Clone)]
pub struct HealthOptions {
    /// `host:port` to reach through `http` and `socks5` nodes, as sent to them.
    pub probe_target: Option<String>,
    /// The probe target's address, for `direct` nodes (resolved at start).
    pub probe_addr: Option<SocketAddr>,
    /// Time between rounds (each round is jittered by ±20 %).
    pub interval: Duration,
    /// Consecutive failures that take a node out.
    pub failures: u32,
    /// A probe's deadline.
    pub timeout: Duration,
}

impl Default for HealthOptions {
    fn default() -> Self {
        HealthOptions {
            probe_target: None,
            probe_addr: None,
            interval: Duration::from_secs(10),
            failures: 3,
            timeout: Duration::from_secs(3),
        }
    }
}

/// Health counters for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct HealthStats {
    /// State changes, labelled `to="out"` or `to="in"`.
    pub changes: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Probes that failed.
    pub probes_failed: Counter,
    /// Probes that ran to an answer (passed or failed; skipped ones not).
    pub probes: Counter,
}

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The node works.
    Up,
    /// It does not, and why.
    Down(String),
    /// Nothing to probe (a node without the address its kind needs).
    Skipped,
}

/// What the checker remembers of a node between rounds.
#[derive(Debug, Default, Clone, Copy)]
struct Tracked {
    /// Consecutive failed probes.
    failed: u32,
    /// Passive failures already answered (by taking the node out, then
    /// bringing it back on a probe): only failures beyond this count again.
    baseline: u32,
}

/// Run the checker until `stop` turns true.
pub async fn run(
    control: Arc<Control>,
    opts: HealthOptions,
    stats: HealthStats,
    mut stop: watch::Receiver<bool>,
) {
    let mut tracked: HashMap<Box<str>, Tracked> = HashMap::new();
    let mut rng = Rng::new(seed());
    let failures = opts.failures.max(1);
    // The first round comes within one interval, spread like the rest.
    let mut next_round = Instant::now() + jitter(&mut rng, opts.interval) / 2;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        passive(&control, &mut tracked, failures, &stats);
        if Instant::now() < next_round {
            continue;
        }
        tokio::select! {
            _ = round(&control, &opts, &mut tracked, failures, &stats) => {}
            _ = stop.changed() => return,
        }
        next_round = Instant::now() + jitter(&mut rng, opts.interval);
    }
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    u64::from_le_bytes(b) ^ u64::from(std::process::id())
}

/// `interval` ± 20 %.
fn jitter(rng: &mut Rng, interval: Duration) -> Duration {
    let ms = interval.as_millis().max(1) as u64;
    let spread = ms / 5;
    Duration::from_millis(ms - spread + rng.below(2 * spread + 1))
}

fn take_out(control: &Control, idx: NodeIdx, node: &Node, why: &str, stats: &HealthStats) {
    control.engine().policy().nodes.set_healthy(idx, false);
    stats.changes.get_or_create(&vec![("to", "out")]).inc();
    tracing::warn!(node = %node.id, reason = why, "node taken out of selection");
}

fn bring_back(control: &Control, idx: NodeIdx, node: &Node, stats: &HealthStats) {
    control.engine().policy().nodes.set_healthy(idx, true);
    stats.changes.get_or_create(&vec![("to", "in")]).inc();
    tracing::info!(node = %node.id, "node healthy again, back in selection");
}

/// Passive failures: real traffic's failures since the node's last success.
fn passive(
    control: &Control,
    tracked: &mut HashMap<Box<str>, Tracked>,
    failures: u32,
    stats: &HealthStats,
) {
    let policy = control.engine().policy();
    for (idx, node) in policy.nodes.iter() {
        if node.kind == NodeKind::Agent {
            // Presence is an agent's health. A node that became an agent
            // while taken out (its runtime stays) is not left out for good.
            if node.runtime.is_unhealthy() {
                policy.nodes.set_healthy(idx, true);
            }
            continue;
        }
        let recent = node.runtime.recent_failures();
        let t = tracked.get(&node.id).copied().unwrap_or_default();
        // A success resets the runtime's count; the baseline goes with it.
        let baseline = if recent < t.baseline { 0 } else { t.baseline };
        if baseline != t.baseline {
            tracked.entry(node.id.clone()).or_default().baseline = baseline;
        }
        if !node.runtime.is_unhealthy() && recent >= baseline.saturating_add(failures) {
            tracked.entry(node.id.clone()).or_default().baseline = recent;
            take_out(
                control,
                idx,
                node,
                &format!("{recent} failures of real traffic since its last success"),
                stats,
            );
        }
    }
}

/// One round: probe every node, then apply the results.
async fn round(
    control: &Arc<Control>,
    opts: &HealthOptions,
    tracked: &mut HashMap<Box<str>, Tracked>,
    failures: u32,
    stats: &HealthStats,
) {
    let policy = control.engine().policy_arc();
    let gate = Arc::new(Semaphore::new(CONCURRENCY));
    let mut set = JoinSet::new();
    for (idx, node) in policy.nodes.iter() {
        if node.kind == NodeKind::Agent {
            continue;
        }
        let Ok(permit) = gate.clone().acquire_owned().await else {
            break;
        };
        let node = node.clone();
        let opts = opts.clone();
        set.spawn(async move {
            let result = match timeout(opts.timeout, probe(&node, &opts)).await {
                Ok(r) => r,
                Err(_) => Probe::Down(format!("no answer within {:?}", opts.timeout)),
            };
            drop(permit);
            (idx, node, result)
        });
    }
    let mut seen = std::collections::HashSet::new();
    while let Some(done) = set.join_next().await {
        let Ok((idx, node, result)) = done else {
            continue;
        };
        seen.insert(node.id.clone());
        let t = tracked.entry(node.id.clone()).or_default();
        match result {
            Probe::Up => {
                stats.probes.inc();
                // A passing probe clears the node's failures: once back, it
                // gets its share of new traffic at once.
                t.failed = 0;
                t.baseline = 0;
                node.runtime.record_success();
                if node.runtime.is_unhealthy() {
                    bring_back(control, idx, &node, stats);
                }
            }
            Probe::Down(why) => {
                stats.probes.inc();
                stats.probes_failed.inc();
                t.failed = t.failed.saturating_add(1);
                tracing::debug!(node = %node.id, failed = t.failed, reason = %why, "probe failed");
                if t.failed >= failures && !node.runtime.is_unhealthy() {
                    let why = format!("{} probes failed in a row, the last: {why}", t.failed);
                    take_out(control, idx, &node, &why, stats);
                }
            }
            Probe::Skipped => {}
        }
    }
    // Forget nodes that left the pool.
    tracked.retain(|id, _| seen.contains(id));
}

/// Probe one node (without the deadline; the caller adds it).
pub async fn probe(node: &Node, o: &HealthOptions) -> Probe {
    let result = match node.kind {
        NodeKind::Agent => return Probe::Skipped,
        NodeKind::Http | NodeKind::Socks5 => {
            let Some(addr) = node.addr else {
                return Probe::Skipped;
            };
            match (&o.probe_target, node.kind) {
                (None, _) => TcpStream::connect(addr).await.map(|_| ()),
                (Some(t), NodeKind::Http) => http_connect(addr, t, node.credentials.as_ref()).await,
                (Some(t), _) => socks5_connect(addr, t, node.credentials.as_ref()).await,
            }
        }
        NodeKind::Direct => {
            let Some(bind) = node.bind else {
                return Probe::Skipped;
            };
            let socket = match bind {
                IpAddr::V4(_) => TcpSocket::new_v4(),
                IpAddr::V6(_) => TcpSocket::new_v6(),
            };
            match (socket, o.probe_addr) {
                (Err(e), _) => Err(e),
                (Ok(s), target) => match s.bind(SocketAddr::new(bind, 0)) {
                    Err(e) => Err(e),
                    Ok(()) => match target {
                        Some(t) => s.connect(t).await.map(|_| ()),
                        None => Ok(()),
                    },
                },
            }
        }
    };
    match result {
        Ok(()) => Probe::Up,
        Err(e) => Probe::Down(e.to_string()),
    }
}

fn other(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::other(msg.into())
}

async fn http_connect(
    addr: SocketAddr,
    target: &str,
    credentials: Option<&(Box<str>, Box<str>)>,
) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((u, p)) = credentials {
        head.push_str("Proxy-Authorization: Basic ");
        head.push_str(&base64_encode(format!("{u}:{p}").as_bytes()));
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(other("the node closed before answering"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 8192 {
            return Err(other("the node's answer head is too long"));
        }
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let status = line.split(' ').nth(1).unwrap_or("");
    if status.len() == 3 && status.starts_with('2') {
        Ok(())
    } else {
        Err(other(format!("the node answered {}", line.trim())))
    }
}

async fn socks5_connect(
    addr: SocketAddr,
    target: &str,
    credentials: Option<&(Box<str>, Box<str>)>,
) -> std::io::Result<()> {
    let (host, port) = split_target(target).ok_or_else(|| other("bad probe target"))?;
    let mut s = TcpStream::connect(addr).await?;
    let method = if credentials.is_some() { 0x02 } else { 0x00 };
    s.write_all(&[0x05, 0x01, method]).await?;
    let mut two = [0u8; 2];
    s.read_exact(&mut two).await?;
    if two != [0x05, method] {
        return Err(other(format!("the node chose method {:#04x}", two[1])));
    }
    if let Some((u, p)) = credentials {
        let (u, p) = (u.as_bytes(), p.as_bytes());
        if u.len() > 255 || p.len() > 255 {
            return Err(other("credentials too long for SOCKS5"));
        }
        let mut m = vec![0x01, u.len() as u8];
        m.extend_from_slice(u);
        m.push(p.len() as u8);
        m.extend_from_slice(p);
        s.write_all(&m).await?;
        s.read_exact(&mut two).await?;
        if two[1] != 0 {
            return Err(other("the node refused the credentials"));
        }
    }
    let mut req = vec![0x05, 0x01, 0x00];
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            req.push(0x01);
            req.extend_from_slice(&v4.octets());
        }
        Ok(IpAddr::V6(v6)) => {
            req.push(0x04);
            req.extend_from_slice(&v6.octets());
        }
        Err(_) => {
            if host.len() > 255 {
                return Err(other("probe target name too long"));
            }
            req.push(0x03);
            req.push(host.len() as u8);
            req.extend_from_slice(host.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await?;
    if head[1] == 0 {
        Ok(())
    } else {
        Err(other(format!("the node replied {:#04x}", head[1])))
    }
}

/// `host:port` or `[v6]:port` → (host, port).
pub fn split_target(t: &str) -> Option<(&str, u16)> {
    let (host, port) = t.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then_some((host, port))
}

fn base64_encode(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use splicegate_control::nodes::NodeState;

    #[test]
    fn targets_split() {
        assert_eq!(split_target("example.com:80"), Some(("example.com", 80)));
        assert_eq!(split_target("[::1]:443"), Some(("::1", 443)));
        assert_eq!(split_target("127.0.0.1:9"), Some(("127.0.0.1", 9)));
        assert_eq!(split_target("nohost"), None);
        assert_eq!(split_target(":80"), None);
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("u:p", "dTpw"),
        ] {
            assert_eq!(base64_encode(i.as_bytes()), o);
        }
    }

    /// A control object on an in-memory store with a direct node and an
    /// agent node, both online (the agent connected).
    fn control_with_an_agent() -> Arc<Control> {
        use splicegate_control::decl::NodeFields;
        let c = Control::open(
            crate::ControlOptions {
                store: crate::StoreLocation::Sqlite(":memory:".into()),
                session_capacity: 10,
                clock: || splicegate_control::Now::from_secs(1),
                gateway_id: "local".into(),
                snapshot: None,
            },
            Default::default(),
        )
        .unwrap();
        for json in [
            r#"{"id": "d1", "kind": "direct", "bind": "127.0.0.1"}"#,
            r#"{"id": "a1", "kind": "agent", "key": "k"}"#,
        ] {
            let f: NodeFields = serde_json::from_str(json).unwrap();
            c.create_node(&f).unwrap();
        }
        let policy = c.engine().policy();
        let (a1, _) = policy.nodes.get("a1").unwrap();
        policy
            .nodes
            .agent_up(a1, "192.0.2.1:1".parse().unwrap(), "v", 1);
        drop(policy);
        Arc::new(c)
    }

    #[test]
    fn passive_failures_take_out_other_nodes_but_never_an_agent() {
        let c = control_with_an_agent();
        let stats = HealthStats::default();
        let mut tracked = HashMap::new();
        let policy = c.engine().policy_arc();
        let (d1, direct) = policy.nodes.get("d1").unwrap();
        let (a1, agent) = policy.nodes.get("a1").unwrap();
        for _ in 0..10 {
            direct
                .runtime
                .record_failure(splicegate_control::Now::from_secs(1));
            agent
                .runtime
                .record_failure(splicegate_control::Now::from_secs(1));
        }
        passive(&c, &mut tracked, 3, &stats);
        assert!(
            direct.runtime.is_unhealthy(),
            "the direct node is taken out"
        );
        assert!(!agent.runtime.is_unhealthy(), "the agent is not");
        assert_eq!(agent.state(), NodeState::Online);
        assert_eq!(
            agent.runtime.recent_failures(),
            10,
            "they still weigh selection"
        );
        assert_eq!(policy.nodes.node(d1).state(), NodeState::Offline);

        // An agent marked unhealthy (it was another kind when taken out) is
        // brought back: no probe ever would.
        policy.nodes.set_healthy(a1, false);
        passive(&c, &mut tracked, 3, &stats);
        assert!(!agent.runtime.is_unhealthy());
    }

    #[test]
    fn agents_are_never_probed() {
        let c = control_with_an_agent();
        let policy = c.engine().policy_arc();
        let (_, agent) = policy.nodes.get("a1").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let opts = HealthOptions {
            probe_target: Some("127.0.0.1:9".into()),
            probe_addr: Some("127.0.0.1:9".parse().unwrap()),
            ..HealthOptions::default()
        };
        assert_eq!(rt.block_on(probe(agent, &opts)), Probe::Skipped);
        let stats = HealthStats::default();
        let mut tracked = HashMap::new();
        let (_, agent) = policy.nodes.get("a1").unwrap();
        rt.block_on(round(&c, &opts, &mut tracked, 1, &stats));
        assert!(!tracked.contains_key("a1"), "no probe ran for the agent");
        assert!(!agent.runtime.is_unhealthy());
        assert!(tracked.contains_key("d1"), "the direct node was probed");
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            let d = jitter(&mut rng, Duration::from_secs(10)).as_millis();
            assert!((8000..=12000).contains(&d), "{d}");
        }
    }
}
