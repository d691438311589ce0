//! splicegate-bench: the gateway measured from outside, next to its peers.
//!
//! One binary holds the targets (sink/source, echo, close-after-echo, an
//! HTTP/1.1 origin), the load modes (`bulk`, `connrate`, `pingpong`, `http`,
//! `idle`, `setup`, and `tls`: handshakes and bulk inside TLS) through HTTP CONNECT,
//! SOCKS5, absolute-form forwarding, an L4 relay or no proxy, and `compare`, which starts splicegate and the Debian
//! peers one after another, round by round, and writes a report; and
//! `agents-idle`, thousands of idle devices connected to the agent listener
//! (the `agent-swarm` load processes speak the agent protocol); and
//! `growth`, the cost as tunnels, nodes and packages grow. The proxy
//! under test and this process are pinned to different CPUs with `taskset`.
//! Every loop is bounded in count and in time; nothing here is a test
//! assertion on timing.
#![forbid(unsafe_code)]

mod agents;
mod client;
mod growth;
mod load;
mod peers;
mod plan;
mod procstat;
mod report;
mod targets;
mod tls;
mod udp;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::load::{Mode, Window};
use crate::peers::{Env, Peer, PeerId, Want};
use crate::plan::{Cell, Plan};
use crate::targets::Targets;

/// The most idle tunnels one run holds: client and echo ends both live in
/// this process, and a process here may open 20,000 files.
const MAX_IDLE: usize = 5000;

#[derive(Debug, Parser)]
#[command(
    name = "splicegate-bench",
    about = "Load harness for splicegate and its peers (HAProxy, nginx, Squid, tinyproxy, Dante)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Args)]
struct Common {
    /// Measured seconds of each run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Warm-up seconds before each measured window.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Rounds; tables show medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Print the results as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
    /// The splicegate binary.
    #[arg(long, default_value = "target/release/splicegate")]
    gateway: PathBuf,
    /// The splicegate-agent binary (the device of the splicegate-agent peer).
    #[arg(long, default_value = "target/release/splicegate-agent")]
    agent: PathBuf,
    /// The rathole binary (default: found on PATH), for the rathole peer.
    #[arg(long)]
    rathole: Option<PathBuf>,
    /// splicegate workers (the `splicegate-w2` peer always has 2).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// `direct` nodes in splicegate's pool (127.0.1.1, then 127.1.0.1,
    /// 127.1.0.2, …; at most 60,000): a request without a session picks
    /// one of them.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// CPUs of the proxy under test (taskset list; default 0).
    #[arg(long)]
    proxy_cpus: Option<String>,
    /// CPUs of this process: load generator and targets (default: the rest).
    #[arg(long)]
    load_cpus: Option<String>,
    /// Do not pin anything.
    #[arg(long)]
    no_pin: bool,
    /// Timeout of every connect, read and write, ms.
    #[arg(long, default_value_t = 3000)]
    io_timeout_ms: u64,
    /// Body size of the HTTP origin's responses.
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
    /// Also write report.md, SVG plots and results.json here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
struct Vias {
    /// Peers to run: direct, splicegate, splicegate-http, splicegate-w2,
    /// splicegate-agent, rathole, haproxy, nginx, squid, tinyproxy, dante,
    /// or a proxy URL
    /// (connect://user:pass@127.0.0.1:5000, socks5://…, http://… for
    /// forwarding). Repeat for several.
    #[arg(long = "via", default_values = ["direct", "splicegate"])]
    via: Vec<String>,
    /// PID of the proxy behind a URL, to measure its CPU and memory.
    #[arg(long)]
    pid: Option<u32>,
}

/// What every single-mode command takes: the settings and the peers.
#[derive(Debug, Clone, Args)]
struct Run {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    vias: Vias,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Direction {
    /// Client → sink.
    Up,
    /// Source → client (a download).
    Down,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TunnelProto {
    Connect,
    Socks5,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum TlsCell {
    /// Full TLS 1.3 handshakes (no resumption).
    HandshakeFull,
    /// TLS 1.3 handshakes resumed from session tickets.
    HandshakeResumed,
    /// Downloads inside TLS.
    Bulk,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Sessions {
    /// One sticky session per client connection.
    Sticky,
    /// No session: a node picked for every request.
    Rotating,
    Both,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// P parallel tunnels streaming bytes: aggregate Gbit/s, proxy CPU-s/GB.
    Bulk {
        #[command(flatten)]
        run: Run,
        /// Parallel streams (repeat for several cells).
        #[arg(long, default_values_t = vec![1usize, 8])]
        streams: Vec<usize>,
        /// MiB after which a run stops early (0: time only).
        #[arg(long, default_value_t = 0)]
        mib: u64,
        #[arg(long, value_enum, default_value_t = Direction::Down)]
        direction: Direction,
    },
    /// Closed loops of connect + proxy handshake with auth + 100 bytes
    /// echoed + close: connections/s, proxy CPU-µs per connection.
    Connrate {
        #[command(flatten)]
        run: Run,
        /// Concurrent loops.
        #[arg(long, default_value_t = 8)]
        conns: usize,
        #[arg(long, value_enum, default_value_t = TunnelProto::Connect)]
        proto: TunnelProto,
        /// Client source addresses 127.0.2.1..=N, bound before connect (0: none).
        #[arg(long, default_value_t = 16)]
        sources: u8,
        #[arg(long, default_value_t = 10_000_000)]
        max_ops: u64,
    },
    /// A stream's setup: closed loops (default 1) of connect + proxy
    /// handshake + 100 bytes echoed + close, timing the tunnel's opening
    /// (until the proxy's 200) and the first echo.
    Setup {
        #[command(flatten)]
        run: Run,
        /// Concurrent loops.
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long, default_value_t = 16)]
        sources: u8,
        #[arg(long, default_value_t = 10_000_000)]
        max_ops: u64,
    },
    /// K established tunnels doing small request/response: round trips/s.
    Pingpong {
        #[command(flatten)]
        run: Run,
        #[arg(long, default_value_t = 8)]
        tunnels: usize,
        /// Message size, bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 100_000_000)]
        max_ops: u64,
    },
    /// Absolute-form GETs over keep-alive connections: requests/s.
    Http {
        #[command(flatten)]
        run: Run,
        #[arg(long, default_value_t = 8)]
        conns: usize,
        #[arg(long, value_enum, default_value_t = Sessions::Both)]
        sessions: Sessions,
        #[arg(long, default_value_t = 100_000_000)]
        max_ops: u64,
    },
    /// N mostly idle tunnels held open: the proxy's RSS and threads.
    Idle {
        #[command(flatten)]
        run: Run,
        /// Tunnels (at most 5000).
        #[arg(long, default_value_t = 1000)]
        tunnels: usize,
        #[arg(long, default_value_t = 8)]
        open_threads: usize,
        /// Most seconds to open them.
        #[arg(long, default_value_t = 30)]
        open_seconds: u64,
    },
    /// TLS to the proxy (splicegate's `[tls]`, HAProxy's `ssl crt`, one
    /// ECDSA P-256 certificate made at start): closed loops of connect + TLS
    /// 1.3 handshake (full or resumed) + CONNECT inside + 100 bytes echoed +
    /// close, and tunnels downloading inside TLS. Peers: splicegate,
    /// haproxy, and direct (plain TCP) for bulk.
    Tls {
        #[command(flatten)]
        run: Run,
        /// Cells (repeat; default all three).
        #[arg(long = "cell", value_enum)]
        cells: Vec<TlsCell>,
        /// Concurrent handshake loops.
        #[arg(long, default_value_t = 8)]
        conns: usize,
        /// Client source addresses 127.0.2.1..=N (0: none).
        #[arg(long, default_value_t = 16)]
        sources: u8,
        /// Tunnels of the bulk cell.
        #[arg(long, default_value_t = 8)]
        streams: usize,
        #[arg(long, default_value_t = 10_000_000)]
        max_ops: u64,
    },
    /// Every mode against direct, splicegate and the Debian peers, round by
    /// round; writes report.md, one SVG per cell and results.json.
    Compare {
        #[command(flatten)]
        common: Common,
        /// Peers (default: all).
        #[arg(long = "peer")]
        peers: Vec<String>,
        /// Modes or cell ids (default: all): bulk, connrate, pingpong, http,
        /// idle, tls, or e.g. connrate-socks5, tls-handshake-full.
        #[arg(long = "mode")]
        modes: Vec<String>,
        /// Do not apt-get install missing peers.
        #[arg(long)]
        no_install: bool,
        #[arg(long, default_values_t = vec![1usize, 8])]
        streams: Vec<usize>,
        #[arg(long, value_enum, default_value_t = Direction::Down)]
        direction: Direction,
        /// Concurrent connrate loops.
        #[arg(long, default_value_t = 8)]
        conns: usize,
        #[arg(long, default_value_t = 16)]
        sources: u8,
        #[arg(long, default_value_t = 8)]
        pingpong_tunnels: usize,
        #[arg(long, default_value_t = 8)]
        http_conns: usize,
        #[arg(long, default_value_t = MAX_IDLE)]
        idle_tunnels: usize,
        /// Concurrent loops of the TLS handshake cells.
        #[arg(long, default_value_t = 8)]
        tls_conns: usize,
        /// Tunnels of the TLS bulk cell.
        #[arg(long, default_value_t = 8)]
        tls_streams: usize,
    },
    /// N idle devices connected to splicegate's agent listener (from
    /// `--procs` load processes speaking the agent protocol) and one real
    /// splicegate-agent: the gateway's RSS per agent and its CPU over a held
    /// window (heartbeats), the device's idle RSS, the agent binary's size.
    AgentsIdle {
        /// Devices.
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
        /// Load processes the devices are spread over (a process may open
        /// 20,000 files).
        #[arg(long, default_value_t = 2)]
        procs: usize,
        /// `[agents] heartbeat_s`.
        #[arg(long, default_value_t = 25)]
        heartbeat_s: u64,
        /// Seconds the idle devices are held and the gateway's CPU read.
        #[arg(long, default_value_t = 60.0)]
        hold_seconds: f64,
        /// Seconds between the last connection and the RSS reading.
        #[arg(long, default_value_t = 5.0)]
        settle_seconds: f64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Most seconds to connect every device.
        #[arg(long, default_value_t = 180)]
        open_seconds: u64,
        /// Connections being set up at once, per load process.
        #[arg(long, default_value_t = 32)]
        conc: usize,
        #[arg(long, default_value = "target/release/splicegate")]
        gateway: PathBuf,
        #[arg(long, default_value = "target/release/splicegate-agent")]
        agent: PathBuf,
        /// CPUs of the gateway (taskset list; default 0).
        #[arg(long)]
        proxy_cpus: Option<String>,
        /// CPUs of the load processes and the real device (default: the rest).
        #[arg(long)]
        load_cpus: Option<String>,
        #[arg(long)]
        no_pin: bool,
        /// Also write agents-idle.md and agents-idle.json here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// (internal) A load process of agents-idle: devices a{first}.. held
    /// until stdin closes.
    #[command(hide = true)]
    AgentSwarm {
        #[arg(long)]
        gateway: std::net::SocketAddr,
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        first: usize,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 32)]
        conc: usize,
        #[arg(long, default_value_t = 600)]
        max_seconds: u64,
    },
    /// Cost as the work grows: proxy CPU per operation with 1 to 9,000
    /// tunnels held open and with 1,000 to 1,000,000 nodes in the pool
    /// (a pick, a session hit), start-up, one SIGHUP reload and one admin
    /// API change with 10 to 100,000 packages; a table and a plot per axis.
    Growth {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        growth: growth::GrowthArgs,
    },
    /// SOCKS5 UDP ASSOCIATE: K associations keeping W datagrams outstanding
    /// to a UDP echo, through splicegate, Dante and no proxy: datagrams/s,
    /// proxy CPU per million datagrams, p50/p99 and the p99 added.
    Udp(udp::UdpArgs),
    /// Serve only the targets (for driving a proxy by hand), for a bounded time.
    Targets {
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        #[arg(long, default_value_t = 100)]
        body_bytes: usize,
    },
}

fn bulk_cells(streams: &[usize], dir: Direction, mib: u64) -> Vec<Cell> {
    streams
        .iter()
        .map(|&p| Cell {
            id: format!("bulk-{p}"),
            title: format!(
                "bulk: {p} stream{}, {} (CONNECT; HAProxy and nginx L4; Dante SOCKS5)",
                if p == 1 { "" } else { "s" },
                match dir {
                    Direction::Up => "upload, client → sink",
                    Direction::Down => "download, source → client",
                }
            ),
            mode: Mode::Bulk {
                streams: p.max(1),
                down: matches!(dir, Direction::Down),
                max_bytes: if mib == 0 { u64::MAX } else { mib << 20 },
            },
            want: Want::Tunnel,
        })
        .collect()
}

fn connrate_cell(conns: usize, sources: u8, proto: TunnelProto, max_ops: u64) -> Cell {
    let (id, what, want) = match proto {
        TunnelProto::Connect => ("connrate-connect", "CONNECT with auth", Want::Connect),
        TunnelProto::Socks5 => ("connrate-socks5", "SOCKS5 with auth", Want::Socks5),
    };
    Cell {
        id: id.into(),
        title: format!("connrate: {conns} loops of new connection + {what} + 100 B echoed + close"),
        mode: Mode::Connrate {
            conns: conns.max(1),
            sources,
            sticky: false,
            max_ops,
        },
        want,
    }
}

fn setup_cell(conns: usize, sources: u8, max_ops: u64) -> Cell {
    Cell {
        id: "setup".into(),
        title: format!(
            "setup: {conns} loop{} of new connection + CONNECT with auth (L4: none) + 100 B \
             echoed + close; open = until the 200",
            if conns == 1 { "" } else { "s" }
        ),
        mode: Mode::Setup {
            conns: conns.max(1),
            sources,
            max_ops,
        },
        want: Want::Connect,
    }
}

fn pingpong_cell(tunnels: usize, size: usize, max_ops: u64) -> Cell {
    Cell {
        id: "pingpong".into(),
        title: format!("pingpong: {tunnels} tunnels, {size}-byte request/response"),
        mode: Mode::Pingpong {
            tunnels: tunnels.max(1),
            size,
            max_ops,
        },
        want: Want::Tunnel,
    }
}

fn http_cells(conns: usize, sessions: Sessions, max_ops: u64) -> Vec<Cell> {
    let mut cells = Vec::new();
    if sessions != Sessions::Rotating {
        cells.push(Cell {
            id: "http-sticky".into(),
            title: format!(
                "http: {conns} keep-alive connections, absolute-form GETs, sticky session each"
            ),
            mode: Mode::Http {
                conns: conns.max(1),
                sticky: true,
                max_ops,
            },
            want: Want::Forward,
        });
    }
    if sessions != Sessions::Sticky {
        cells.push(Cell {
            id: "http-rotating".into(),
            title: format!(
                "http: {conns} keep-alive connections, rotating (a node per request; its idle upstream connection to the origin, if any, reused)"
            ),
            mode: Mode::Http {
                conns: conns.max(1),
                sticky: false,
                max_ops,
            },
            want: Want::Rotating,
        });
    }
    cells
}

fn tls_cells(
    cells: &[TlsCell],
    conns: usize,
    sources: u8,
    streams: usize,
    max_ops: u64,
) -> Vec<Cell> {
    let all = [
        TlsCell::HandshakeFull,
        TlsCell::HandshakeResumed,
        TlsCell::Bulk,
    ];
    all.into_iter()
        .filter(|c| cells.is_empty() || cells.contains(c))
        .map(|c| {
            let (id, title, mode) = match c {
                TlsCell::HandshakeFull | TlsCell::HandshakeResumed => {
                    let resume = c == TlsCell::HandshakeResumed;
                    (
                        if resume {
                            "tls-handshake-resumed"
                        } else {
                            "tls-handshake-full"
                        },
                        format!(
                            "TLS handshake, {}: {conns} loops of new connection + TLS 1.3 ({}) + \
                             CONNECT with auth inside (L4: none) + 100 B echoed + close",
                            if resume { "resumed" } else { "full" },
                            if resume {
                                "resumed from a session ticket"
                            } else {
                                "full handshake, ECDSA P-256 certificate"
                            }
                        ),
                        Mode::TlsHandshake {
                            conns: conns.max(1),
                            sources,
                            resume,
                            max_ops,
                        },
                    )
                }
                TlsCell::Bulk => (
                    "tls-bulk",
                    format!(
                        "TLS bulk: {streams} streams downloading inside TLS 1.3 (CONNECT inside; \
                         HAProxy L4 terminating TLS; direct: plain TCP)"
                    ),
                    Mode::TlsBulk {
                        streams: streams.max(1),
                        max_bytes: u64::MAX,
                    },
                ),
            };
            Cell {
                id: id.into(),
                title,
                mode,
                want: Want::Tls,
            }
        })
        .collect()
}

fn idle_cell(tunnels: usize, open_threads: usize, open: Duration, seconds: f64) -> Cell {
    let n = tunnels.clamp(1, MAX_IDLE);
    if tunnels > MAX_IDLE {
        eprintln!("idle: {tunnels} tunnels asked, {MAX_IDLE} is the most one run holds");
    }
    Cell {
        id: "idle".into(),
        title: format!("idle: {n} tunnels held {seconds:.0} s (1 % pinged each second)"),
        mode: Mode::Idle {
            tunnels: n,
            open_threads: open_threads.max(1),
            open_timeout: open,
        },
        want: Want::Tunnel,
    }
}

/// The CPUs: the proxy on the first, this process on the others.
struct Pinning {
    /// CPUs of the machine (before this process pinned itself).
    cpus: usize,
    proxy: Option<String>,
    load: Option<String>,
    all: Option<String>,
    text: String,
}

fn pin(c: &Common) -> Pinning {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let taskset = peers::find_program("taskset");
    if c.no_pin || n < 2 || taskset.is_none() {
        let why = if c.no_pin {
            "--no-pin"
        } else if n < 2 {
            "one CPU"
        } else {
            "taskset (util-linux) missing"
        };
        return Pinning {
            cpus: n,
            proxy: None,
            load: None,
            all: None,
            text: format!("none ({why}): proxy and load generator share every CPU"),
        };
    }
    let proxy = c.proxy_cpus.clone().unwrap_or_else(|| "0".into());
    let load = c.load_cpus.clone().unwrap_or_else(|| {
        if n == 2 {
            "1".into()
        } else {
            format!("1-{}", n - 1)
        }
    });
    let all = format!("0-{}", n - 1);
    let me = std::process::id().to_string();
    let ok = Command::new("taskset")
        .args(["-a", "-cp", &load, &me])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let text = format!(
        "proxy under test on CPU {proxy} (`taskset -c {proxy}`; splicegate with `pin_workers = false` \
         so its workers stay there); this process (load generator and targets, all threads) on CPU \
         {load} (`taskset -a -cp {load}`{}); splicegate-http's tinyproxy exit node on CPU {load} \
         with the load; splicegate-w2 on CPUs {all}, shared with the load generator",
        if ok { "" } else { ", which FAILED" }
    );
    Pinning {
        cpus: n,
        proxy: Some(proxy),
        load: Some(load),
        all: Some(all),
        text,
    }
}

/// Raise this process's open-files limit to its hard limit (idle runs hold
/// two descriptors per tunnel here), with util-linux `prlimit`.
fn raise_nofile() {
    let hard = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
        });
    if let Some(h) = hard {
        let _ = Command::new("prlimit")
            .args([
                "--pid",
                &std::process::id().to_string(),
                &format!("--nofile={h}:{h}"),
            ])
            .status();
    }
}

fn now() -> String {
    report::sh("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"])
}

/// Run a plan and print (and maybe write) the report.
fn execute(
    c: &Common,
    cells: Vec<Cell>,
    peer_list: Vec<Peer>,
    mut notes: Vec<String>,
    out: Option<PathBuf>,
) -> Result<()> {
    if c.seconds <= 0.0 || c.rounds == 0 {
        bail!("--seconds and --rounds must be positive");
    }
    raise_nofile();
    let pinning = pin(c);
    let targets = Targets::start(c.body_bytes)?;
    let tmp = std::env::temp_dir().join(format!("splicegate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let reverse = peer_list
        .iter()
        .any(|p| matches!(p, Peer::Builtin(PeerId::SplicegateAgent | PeerId::Rathole)));
    if reverse {
        notes.push(
            "reverse tunnels: the gateway side (splicegate with an `agent` node, rathole's \
             server) runs where the proxy runs; the device (splicegate-agent, rathole's client) \
             stands for a machine of its own and runs on the load generator's CPUs, its CPU \
             reported apart (`device`); the link is TLS 1.3 with the run's certificate"
                .into(),
        );
    }
    let tls_cells = cells.iter().any(|c| c.want == Want::Tls);
    if tls_cells {
        notes.push(
            "TLS cells: one ECDSA P-256 certificate, self-signed for `localhost`, made at start \
             with rcgen and served by every peer (splicegate `[tls]`, HAProxy `bind … ssl crt \
             … alpn http/1.1`); the client is rustls (ring), TLS 1.3 only, ALPN http/1.1, SNI \
             `localhost`, verifying the certificate, one client configuration (so one session \
             cache) per run; `resumed` counts the client's `handshake_kind() == Resumed` in the \
             window"
                .into(),
        );
    }
    let pki = if reverse || tls_cells {
        Some(tls::Pki::make(&tmp)?)
    } else {
        None
    };
    let env = Env {
        targets,
        gateway: c.gateway.clone(),
        proxy_cpus: pinning.proxy.clone(),
        load_cpus: pinning.load.clone(),
        all_cpus: pinning.all.clone(),
        workers: c.workers.max(1),
        nodes: c.nodes.clamp(1, 60_000),
        tmp: tmp.clone(),
        pki,
        agent: c.agent.clone(),
        rathole: c.rathole.clone(),
    };
    let plan = Plan {
        cells,
        peers: peer_list,
        rounds: c.rounds,
        window: Window {
            warmup: Duration::from_secs_f64(c.warmup.max(0.0)),
            measure: Duration::from_secs_f64(c.seconds),
            io_timeout: Duration::from_millis(c.io_timeout_ms.max(10)),
            progress: !c.quiet,
        },
    };
    if plan
        .peers
        .iter()
        .any(|p| matches!(p, Peer::Builtin(PeerId::Dante)))
    {
        notes.push(format!(
            "Dante authenticates against system users: the harness created the system user `{}` \
             (`useradd --system`) if it was missing and set its password with `chpasswd -c MD5` (MD5-crypt, as Squid's APR1: Dante runs crypt(3) on every connection)",
            peers::PEER_USER
        ));
    }
    if plan
        .peers
        .iter()
        .any(|p| matches!(p, Peer::Builtin(PeerId::Squid)))
    {
        notes.push(
            "Squid: basic auth through `basic_ncsa_auth` and an htpasswd file with an APR1 hash \
             (`openssl passwd -apr1`), credentials cached by Squid; `cache deny all`, no access log"
                .into(),
        );
    }
    if plan.peers.iter().any(|p| {
        matches!(
            p,
            Peer::Builtin(PeerId::Tinyproxy | PeerId::Haproxy | PeerId::Nginx)
        )
    }) {
        notes.push(
            "tinyproxy, HAProxy and nginx run without authentication (HAProxy and nginx are L4 \
             relays to a fixed target: the best case a proxy can approach)"
                .into(),
        );
    }
    notes.push(format!(
        "workers: splicegate runs {} worker(s) unless the row says w2",
        env.workers
    ));
    let est = plan::estimate(&plan);
    eprintln!(
        "splicegate-bench: {} cells × {} peers × {} rounds, about {:.0} s; pinning: {}",
        plan.cells.len(),
        plan.peers.len(),
        plan.rounds,
        est,
        pinning.text
    );
    let started = now();
    let load_before = report::load_average();
    let results = plan::run(&plan, &env);
    let meta = report::Meta {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started,
        finished: now(),
        host: format!(
            "{} {}",
            report::sh("uname", &["-n"]),
            report::sh("uname", &["-r"])
        ),
        cpu_model: report::cpu_model(),
        cpus: pinning.cpus,
        load_before,
        load_after: report::load_average(),
        pinning: pinning.text,
        rounds: plan.rounds,
        warmup_s: plan.window.warmup.as_secs_f64(),
        window_s: plan.window.measure.as_secs_f64(),
        peers: plan
            .peers
            .iter()
            .map(|p| (p.name(), p.describe(), peers::version(p, &env)))
            .collect(),
        notes,
    };
    let _ = std::fs::remove_dir_all(&tmp);
    if let Some(dir) = &out {
        report::write(dir, &meta, &plan.cells, &results)?;
        eprintln!("report: {}", dir.join("report.md").display());
    }
    if c.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report::json(&meta, &plan.cells, &results))?
        );
    } else {
        println!("{}", report::markdown(&meta, &plan.cells, &results, false));
    }
    Ok(())
}

fn vias(v: &Vias) -> Result<Vec<Peer>> {
    v.via.iter().map(|s| Peer::parse(s, v.pid)).collect()
}

fn main() -> Result<()> {
    let (run, cells) = match Cli::parse().cmd {
        Cmd::Bulk {
            run,
            streams,
            mib,
            direction,
        } => (run, bulk_cells(&streams, direction, mib)),
        Cmd::Connrate {
            run,
            conns,
            proto,
            sources,
            max_ops,
        } => (run, vec![connrate_cell(conns, sources, proto, max_ops)]),
        Cmd::Setup {
            run,
            conns,
            sources,
            max_ops,
        } => (run, vec![setup_cell(conns, sources, max_ops)]),
        Cmd::Pingpong {
            run,
            tunnels,
            size,
            max_ops,
        } => (run, vec![pingpong_cell(tunnels, size, max_ops)]),
        Cmd::Http {
            run,
            conns,
            sessions,
            max_ops,
        } => (run, http_cells(conns, sessions, max_ops)),
        Cmd::Tls {
            run,
            cells,
            conns,
            sources,
            streams,
            max_ops,
        } => (run, tls_cells(&cells, conns, sources, streams, max_ops)),
        Cmd::Idle {
            run,
            tunnels,
            open_threads,
            open_seconds,
        } => {
            let open = Duration::from_secs(open_seconds);
            let seconds = run.common.seconds;
            (run, vec![idle_cell(tunnels, open_threads, open, seconds)])
        }
        Cmd::Compare {
            common,
            peers: names,
            modes,
            no_install,
            streams,
            direction,
            conns,
            sources,
            pingpong_tunnels,
            http_conns,
            idle_tunnels,
            tls_conns,
            tls_streams,
        } => {
            let peer_list: Vec<Peer> = if names.is_empty() {
                peers::ALL.into_iter().map(Peer::Builtin).collect()
            } else {
                names
                    .iter()
                    .map(|n| Peer::parse(n, None))
                    .collect::<Result<_>>()?
            };
            let mut cells = bulk_cells(&streams, direction, 0);
            for proto in [TunnelProto::Connect, TunnelProto::Socks5] {
                cells.push(connrate_cell(conns, sources, proto, 10_000_000));
            }
            cells.push(setup_cell(1, sources, 10_000_000));
            cells.push(pingpong_cell(pingpong_tunnels, 64, 100_000_000));
            cells.extend(http_cells(http_conns, Sessions::Both, 100_000_000));
            let open = Duration::from_secs(30);
            cells.push(idle_cell(idle_tunnels, 8, open, common.seconds));
            cells.extend(tls_cells(&[], tls_conns, sources, tls_streams, 10_000_000));
            // A mode names all its cells (`connrate`), a cell id one.
            let picks = |m: &str, c: &Cell| c.id == m || c.id.split('-').next() == Some(m);
            if let Some(m) = modes.iter().find(|m| !cells.iter().any(|c| picks(m, c))) {
                let known: Vec<&str> = cells.iter().map(|c| c.id.as_str()).collect();
                bail!("unknown mode {m:?} (cells: {})", known.join(", "));
            }
            if !modes.is_empty() {
                cells.retain(|c| modes.iter().any(|m| picks(m, c)));
            }
            let out = common
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from("bench-report"));
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let notes = if no_install {
                Vec::new()
            } else {
                peers::install_missing(&peer_list, &out.join("apt.log"))
            };
            return execute(&common, cells, peer_list, notes, Some(out));
        }
        Cmd::Targets {
            seconds,
            body_bytes,
        } => return serve_targets(seconds, body_bytes),
        Cmd::AgentSwarm {
            gateway,
            ca,
            first,
            count,
            conc,
            max_seconds,
        } => {
            return agents::swarm(agents::SwarmArgs {
                gateway,
                ca,
                first,
                count,
                conc,
                max_seconds,
            });
        }
        Cmd::AgentsIdle {
            agents: n,
            procs,
            heartbeat_s,
            hold_seconds,
            settle_seconds,
            rounds,
            open_seconds,
            conc,
            gateway,
            agent,
            proxy_cpus,
            load_cpus,
            no_pin,
            out,
        } => {
            raise_nofile();
            let (proxy_cpus, load_cpus) = if no_pin {
                (None, None)
            } else {
                let n = std::thread::available_parallelism().map_or(1, |n| n.get());
                let load = load_cpus.or_else(|| {
                    (n >= 2).then(|| {
                        if n == 2 {
                            "1".to_string()
                        } else {
                            format!("1-{}", n - 1)
                        }
                    })
                });
                (proxy_cpus.or_else(|| (n >= 2).then(|| "0".into())), load)
            };
            return agents::agents_idle(&agents::IdleOpts {
                agents: n,
                procs,
                heartbeat_s: heartbeat_s.clamp(1, 3600),
                hold_s: hold_seconds.max(1.0),
                settle_s: settle_seconds.max(0.0),
                rounds,
                open_s: open_seconds,
                conc,
                gateway,
                agent,
                proxy_cpus,
                load_cpus,
                out,
            });
        }
        Cmd::Udp(args) => return udp::main(args),
        Cmd::Growth { common, growth } => {
            raise_nofile();
            return growth::run(&common, &growth, &pin(&common));
        }
    };
    let out = run.common.out.clone();
    execute(&run.common, cells, vias(&run.vias)?, Vec::new(), out)
}

/// Only the targets, printed as `name address`, for a bounded time.
fn serve_targets(seconds: u64, body_bytes: usize) -> Result<()> {
    let t = Targets::start(body_bytes)?;
    for (name, addr) in t.all() {
        println!("{name} {addr}");
    }
    eprintln!("serving for {seconds} s");
    std::thread::sleep(Duration::from_secs(seconds));
    eprintln!(
        "sink received {} bytes, source sent {} bytes",
        t.sink_bytes.load(std::sync::atomic::Ordering::Relaxed),
        t.source_bytes.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}
