//! Cost as the work grows (issue 12): the gateway's CPU per operation, its
//! start-up, a reload and an admin API change, measured while one thing
//! grows: tunnels held open, nodes in the pool, packages.
//!
//! Every point starts a fresh gateway from a generated config file (port 0,
//! `serve --ready-file`: nothing guesses a port), pinned as in `compare`, with
//! `[admin]` on (an in-memory store, health probes once an hour) so that an
//! API change can be timed, and one package created through the API (file
//! packages answer 409 to changes). Rounds are outermost, so the drift of a
//! shared machine hits every point alike; tables show medians over rounds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::client::{Auth, Proto, Route, open_tunnel, status_of};
use crate::load::{self, Mode, Window};
use crate::peers::{self, SG_KEY};
use crate::plan::median;
use crate::procstat::ProcTree;
use crate::report::{self, Bar, Panel};
use crate::targets::Targets;

/// What grows.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Axis {
    /// Idle tunnels held open beside the measured load.
    Tunnels,
    /// `direct` nodes in the pool (all `country = "us"`, so every pick
    /// chooses among all of them).
    Nodes,
    /// Packages in the config file.
    Packages,
}

impl Axis {
    fn name(self) -> &'static str {
        match self {
            Axis::Tunnels => "tunnels",
            Axis::Nodes => "nodes",
            Axis::Packages => "packages",
        }
    }

    /// (nodes, file packages) of the config at point `n`.
    fn shape(self, n: usize) -> (usize, usize) {
        match self {
            Axis::Tunnels => (1, 1),
            Axis::Nodes => (n, 1),
            Axis::Packages => (1, n),
        }
    }

    fn figures(self) -> &'static [Figure] {
        match self {
            Axis::Tunnels => &[Figure::Pingpong, Figure::Connrate, Figure::Rss],
            Axis::Nodes => &[
                Figure::Pick,
                Figure::SessionHit,
                Figure::Startup,
                Figure::ApiChange,
                Figure::NodeCreate,
                Figure::NodePatch,
                Figure::NodeDelete,
                Figure::Rss,
            ],
            Axis::Packages => &[
                Figure::Connrate,
                Figure::Startup,
                Figure::Reload,
                Figure::ApiChange,
            ],
        }
    }
}

/// One measured figure of a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Figure {
    /// Proxy CPU per 64-byte round trip over established tunnels.
    Pingpong,
    /// Proxy CPU per connection: connect + CONNECT with auth + 100 bytes
    /// echoed + close, a node picked for each.
    Connrate,
    /// As `Connrate`, named for the nodes axis: the pick among N nodes.
    Pick,
    /// As `Connrate`, each loop keeping a sticky session: a session hit.
    SessionHit,
    /// From exec to the ready file.
    Startup,
    /// From SIGHUP to the first CONNECT passing with the file's new key.
    Reload,
    /// `PATCH /v1/packages/{id}` with a new key, until the answer.
    ApiChange,
    /// `POST /v1/nodes` of one `direct` node, until the answer.
    NodeCreate,
    /// `PATCH /v1/nodes/{id}` of that node's city (not its state, which
    /// never rebuilt anything), until the answer.
    NodePatch,
    /// `DELETE /v1/nodes/{id}` of that node, until the answer.
    NodeDelete,
    /// The gateway's RSS at the point's end.
    Rss,
}

impl Figure {
    fn title(self) -> &'static str {
        match self {
            Figure::Pingpong => "pingpong CPU-µs/round trip",
            Figure::Connrate => "connrate CPU-µs/conn",
            Figure::Pick => "CONNECT, node picked: CPU-µs/conn",
            Figure::SessionHit => "CONNECT, session hit: CPU-µs/conn",
            Figure::Startup => "start-up s (exec → ready file)",
            Figure::Reload => "SIGHUP reload ms (until in force)",
            Figure::ApiChange => "API change ms (PATCH a key)",
            Figure::NodeCreate => "node create ms (POST)",
            Figure::NodePatch => "node patch ms (PATCH city)",
            Figure::NodeDelete => "node delete ms (DELETE)",
            Figure::Rss => "gateway RSS MiB",
        }
    }

    /// Per-request cost: the issue wants it flat (within 20 %) over a range.
    fn per_request(self) -> bool {
        matches!(
            self,
            Figure::Pingpong | Figure::Connrate | Figure::Pick | Figure::SessionHit
        )
    }

    fn text(self, v: f64) -> String {
        match self {
            Figure::Startup => format!("{v:.3}"),
            Figure::Rss => format!("{v:.0}"),
            _ => format!("{v:.1}"),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub(crate) struct GrowthArgs {
    /// What grows (repeat; default all three).
    #[arg(long = "axis", value_enum)]
    axes: Vec<Axis>,
    /// Idle tunnels held open (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 100, 1000, 9000])]
    tunnels: Vec<usize>,
    /// Nodes in the pool.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1000usize, 100_000, 1_000_000])]
    nodes: Vec<usize>,
    /// Packages in the config file.
    #[arg(long, value_delimiter = ',', default_values_t = vec![10usize, 10_000, 100_000])]
    packages: Vec<usize>,
    /// Concurrent connrate loops.
    #[arg(long, default_value_t = 8)]
    conns: usize,
    /// Tunnels of the pingpong load (beside the idle ones).
    #[arg(long, default_value_t = 8)]
    pingpong_tunnels: usize,
    /// Most seconds for the gateway to start, and for the idle tunnels to
    /// open.
    #[arg(long, default_value_t = 120)]
    start_seconds: u64,
}

/// The node created, patched and deleted through the API at every point,
/// bound beyond the file's nodes' addresses (127.1.0.0 + 1M ends at
/// 127.16.66.64).
const API_NODE: &str = "api-node";
const API_NODE_BODY: &str =
    "{\"id\": \"api-node\", \"kind\": \"direct\", \"bind\": \"127.200.0.1\", \"country\": \"us\"}";

/// The package made through the API at every point (file packages are the
/// file's: the API answers 409 to changing them).
const API_PACKAGE: u64 = 999_999_999;

/// One point of one round.
#[derive(Debug, Clone, Serialize)]
struct Point {
    axis: Axis,
    n: usize,
    round: usize,
    figures: BTreeMap<Figure, f64>,
    /// CPU that programs outside the harness and the gateway used in each
    /// CPU figure's window, % of one CPU.
    others_pct: BTreeMap<Figure, f64>,
    error: Option<String>,
}

/// A window in which other programs used this much of a CPU is noted.
const NOISY_PCT: f64 = 5.0;

/// What every point shares.
struct Ctx<'a> {
    c: &'a crate::Common,
    g: &'a GrowthArgs,
    targets: Targets,
    proxy_cpus: Option<String>,
    tmp: PathBuf,
    window: Window,
    io: Duration,
    /// Timeout of an admin API request (a change may rebuild the policy).
    admin_io: Duration,
}

/// A gateway started from a config file, stopped on drop.
struct Gateway {
    child: Option<Child>,
    pid: u32,
    proxy: SocketAddr,
    admin: SocketAddr,
    startup_s: f64,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            peers::stop("splicegate", c);
        }
    }
}

impl Gateway {
    /// The route through it as package `id` with `key` (sessions allowed).
    fn route(&self, id: u64, key: &str) -> Route {
        let user = format!("package-{id}-country-us");
        Route::Proxy {
            proto: Proto::Connect,
            addr: self.proxy,
            auth: Some(Auth {
                user,
                pass: key.into(),
            }),
            sessions: true,
        }
    }
}

/// The key of file package `i`, `version` times changed.
fn key_of(i: usize, version: usize) -> String {
    if i == 1 && version == 0 {
        SG_KEY.into()
    } else {
        format!("k{i}-v{version}")
    }
}

/// The config of a point: `nodes` `direct` nodes on distinct loopback
/// addresses (127.1.0.0 up), `packages` file packages (package 1's key is
/// the load's), the last one's key at `last_version`.
fn config(workers: usize, nodes: usize, packages: usize, last_version: usize) -> String {
    let mut s = peers::splicegate_head(peers::local(0), workers);
    s.push_str(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[store]\npath = \":memory:\"\n\
         [health]\ninterval_s = 3600\n[timeouts]\ndrain_grace_s = 1\n",
    );
    for i in 1..=packages {
        let v = if i == packages { last_version } else { 0 };
        let _ = writeln!(s, "[[package]]\nid = {i}\nkey = \"{}\"", key_of(i, v));
    }
    for i in 0..nodes {
        s.push_str(&peers::direct_node(i, i));
    }
    s
}

/// Start the gateway on `conf` and wait for its ready file.
fn start(ctx: &Ctx<'_>, dir: &Path, conf: &Path) -> Result<Gateway> {
    let ready = dir.join("ready.json");
    let _ = std::fs::remove_file(&ready);
    let program = std::fs::canonicalize(&ctx.c.gateway).with_context(|| {
        format!(
            "{} not found (cargo build --release -p splicegate, or --gateway PATH)",
            ctx.c.gateway.display()
        )
    })?;
    let (conf, ready_arg) = (
        conf.to_string_lossy().into_owned(),
        ready.to_string_lossy().into_owned(),
    );
    let t0 = Instant::now();
    let child = peers::spawn(
        "splicegate",
        &program,
        &["serve", "--config", &conf, "--ready-file", &ready_arg],
        ctx.proxy_cpus.as_deref(),
        dir,
    )?;
    let mut gw = Gateway {
        pid: child.id(),
        child: Some(child),
        proxy: peers::local(0),
        admin: peers::local(0),
        startup_s: 0.0,
    };
    let deadline = t0 + Duration::from_secs(ctx.g.start_seconds);
    let text = loop {
        if let Ok(t) = std::fs::read_to_string(&ready) {
            break t;
        }
        if let Some(Ok(Some(status))) = gw.child.as_mut().map(Child::try_wait) {
            bail!(
                "splicegate exited ({status}): {}",
                peers::log_tail(dir, "splicegate")
            );
        }
        ensure!(
            Instant::now() < deadline,
            "no ready file within {} s: {}",
            ctx.g.start_seconds,
            peers::log_tail(dir, "splicegate")
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    gw.startup_s = t0.elapsed().as_secs_f64();
    let v: serde_json::Value = serde_json::from_str(&text).context("the ready file")?;
    let addr = |x: &serde_json::Value| -> Result<SocketAddr> {
        x.as_str()
            .context("an address in the ready file")?
            .parse()
            .context("the ready file's address")
    };
    gw.proxy = addr(&v["proxy"][0])?;
    gw.admin = addr(&v["admin"])?;
    Ok(gw)
}

/// One HTTP/1.1 request to the admin API: its status.
fn admin(addr: SocketAddr, method: &str, path: &str, body: &str, io: Duration) -> Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, io)?;
    s.set_read_timeout(Some(io))?;
    s.set_write_timeout(Some(io))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    status_of(&answer).with_context(|| {
        format!(
            "{method} {path}: no status in {:?}",
            String::from_utf8_lossy(&answer)
        )
    })
}

/// Whether a CONNECT as package `id` with `key` passes now.
fn passes(ctx: &Ctx<'_>, gw: &Gateway, id: u64, key: &str) -> bool {
    let route = gw.route(id, key);
    let Route::Proxy { auth, .. } = &route else {
        return false;
    };
    open_tunnel(&route, ctx.targets.echo, None, auth.as_ref(), ctx.io).is_ok()
}

/// Proxy CPU per operation of `mode` through `gw`, and what other
/// programs used in the window (% of a CPU).
fn cpu_per_op(ctx: &Ctx<'_>, gw: &Gateway, mode: &Mode, label: &str) -> Result<(f64, f64)> {
    let r = load::run(
        mode,
        &gw.route(1, SG_KEY),
        &ctx.targets,
        None,
        Some(ProcTree { root: gw.pid }),
        None,
        ctx.window,
        label,
    );
    match (&r.error, r.ok) {
        (Some(e), false) => bail!("{label}: {e}"),
        (Some(e), true) => eprintln!("  [{label}] note: {} errors; first: {e}", r.errors),
        _ => {}
    }
    let cpu = r.proxy.context("no CPU reading of the gateway")?;
    Ok((cpu.cpu_per_unit, r.others_cpu_pct.unwrap_or(0.0)))
}

/// Measure one point: a fresh gateway, then the axis's figures (into
/// `p`).
fn point(ctx: &Ctx<'_>, p: &mut Point, label: &str) -> Result<()> {
    let (axis, n) = (p.axis, p.n);
    let dir = ctx.tmp.join(format!("{}-{n}", axis.name()));
    std::fs::create_dir_all(&dir)?;
    let (nodes, packages) = axis.shape(n);
    let conf = dir.join("splicegate.toml");
    let workers = ctx.c.workers.max(1);
    std::fs::write(&conf, config(workers, nodes, packages, 0))?;
    let gw = start(ctx, &dir, &conf)?;
    let created = admin(
        gw.admin,
        "POST",
        "/v1/packages",
        &format!("{{\"id\": {API_PACKAGE}, \"key\": \"api-v0\"}}"),
        ctx.admin_io,
    )?;
    ensure!(created == 201, "POST /v1/packages answered {created}");
    // The tunnels axis's idle tunnels are opened once for the point and
    // held through every figure: beside the load, and while the RSS is read.
    let idle = idle_tunnels(ctx, &gw, axis, n)?;
    for &f in axis.figures() {
        let label = format!("{label} {}", f.title());
        let mut others = None;
        let v = match f {
            Figure::Pingpong | Figure::Connrate | Figure::Pick | Figure::SessionHit => {
                let mode = match f {
                    Figure::Pingpong => Mode::Pingpong {
                        tunnels: ctx.g.pingpong_tunnels.max(1),
                        size: 64,
                        max_ops: 100_000_000,
                    },
                    _ => Mode::Connrate {
                        conns: ctx.g.conns.max(1),
                        sources: 16,
                        sticky: f == Figure::SessionHit,
                        max_ops: 10_000_000,
                    },
                };
                let (v, o) = cpu_per_op(ctx, &gw, &mode, &label)?;
                others = Some(o);
                v
            }
            Figure::Startup => gw.startup_s,
            Figure::ApiChange => {
                let t = Instant::now();
                let status = admin(
                    gw.admin,
                    "PATCH",
                    &format!("/v1/packages/{API_PACKAGE}"),
                    "{\"key\": \"api-v1\"}",
                    ctx.admin_io,
                )?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                ensure!(status == 200, "PATCH answered {status}");
                // The answer comes once the new policy is published: the
                // new key passes at once.
                ensure!(
                    passes(ctx, &gw, API_PACKAGE, "api-v1"),
                    "the new key did not pass right after the API's answer"
                );
                ms
            }
            Figure::NodeCreate | Figure::NodePatch | Figure::NodeDelete => {
                let path = format!("/v1/nodes/{API_NODE}");
                let (method, path, body, want) = match f {
                    Figure::NodeCreate => ("POST", "/v1/nodes", API_NODE_BODY, 201),
                    Figure::NodePatch => ("PATCH", path.as_str(), "{\"city\": \"boston\"}", 200),
                    _ => ("DELETE", path.as_str(), "", 204),
                };
                let t = Instant::now();
                let status = admin(gw.admin, method, path, body, ctx.admin_io)?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                ensure!(status == want, "{method} {path} answered {status}");
                // The answer comes once the new policy is published: the
                // node is there (or gone) at once.
                let seen = admin(
                    gw.admin,
                    "GET",
                    &format!("/v1/nodes/{API_NODE}"),
                    "",
                    ctx.admin_io,
                )?;
                let expect = if f == Figure::NodeDelete { 404 } else { 200 };
                ensure!(
                    seen == expect,
                    "GET of the node answered {seen} after {method}"
                );
                ms
            }
            Figure::Reload => {
                std::fs::write(&conf, config(workers, nodes, packages, 1))?;
                let (id, key) = (packages as u64, key_of(packages, 1));
                let t = Instant::now();
                let sent = Command::new("kill")
                    .args(["-HUP", &gw.pid.to_string()])
                    .stderr(Stdio::null())
                    .status()?;
                ensure!(sent.success(), "kill -HUP {} failed", gw.pid);
                let deadline = t + Duration::from_secs(ctx.g.start_seconds);
                while !passes(ctx, &gw, id, &key) {
                    ensure!(
                        Instant::now() < deadline,
                        "the reloaded key did not pass within {} s: {}",
                        ctx.g.start_seconds,
                        peers::log_tail(&dir, "splicegate")
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
                t.elapsed().as_secs_f64() * 1e3
            }
            Figure::Rss => {
                let s = ProcTree { root: gw.pid }.sample()?;
                s.rss_kib as f64 / 1024.0
            }
        };
        if ctx.window.progress {
            eprintln!("  [{label}] {}", f.text(v));
        }
        p.figures.insert(f, v);
        if let Some(o) = others {
            p.others_pct.insert(f, o);
        }
    }
    drop(idle);
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The tunnels axis's `n` idle tunnels (none on the other axes).
fn idle_tunnels(ctx: &Ctx<'_>, gw: &Gateway, axis: Axis, n: usize) -> Result<Vec<TcpStream>> {
    if axis != Axis::Tunnels {
        return Ok(Vec::new());
    }
    let open = Duration::from_secs(ctx.g.start_seconds);
    load::hold_tunnels(&gw.route(1, SG_KEY), &ctx.targets, n, open, ctx.io)
}

/// Medians over rounds: (axis, n) → figure → (median, min, max).
type Medians = BTreeMap<(Axis, usize), BTreeMap<Figure, (f64, f64, f64)>>;

fn medians(points: &[Point]) -> Medians {
    let mut all: BTreeMap<(Axis, usize), BTreeMap<Figure, Vec<f64>>> = BTreeMap::new();
    for p in points {
        for (f, v) in &p.figures {
            all.entry((p.axis, p.n))
                .or_default()
                .entry(*f)
                .or_default()
                .push(*v);
        }
    }
    all.into_iter()
        .map(|(k, figs)| {
            let figs = figs
                .into_iter()
                .filter_map(|(f, v)| {
                    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = v.iter().copied().fold(0.0, f64::max);
                    median(v).map(|m| (f, (m, lo, hi)))
                })
                .collect();
            (k, figs)
        })
        .collect()
}

/// `n` with thousands separators.
fn thousands(n: usize) -> String {
    crate::udp::thousands(n as f64)
}

/// The report: a table per axis, the flatness of each per-request figure
/// (largest median over smallest), and the failures.
fn markdown(head: &str, axes: &[(Axis, Vec<usize>)], med: &Medians, points: &[Point]) -> String {
    let mut md = format!("# splicegate-bench growth: cost as the work grows\n\n{head}\n");
    for (axis, counts) in axes {
        let figs = axis.figures();
        let _ = writeln!(
            md,
            "\n## {}\n\n| {} | {} |\n|---:|{}",
            axis.name(),
            axis.name(),
            figs.iter()
                .map(|f| f.title())
                .collect::<Vec<_>>()
                .join(" | "),
            "---:|".repeat(figs.len())
        );
        for &n in counts {
            let row = med.get(&(*axis, n));
            let cells: Vec<String> = figs
                .iter()
                .map(|f| match row.and_then(|r| r.get(f)) {
                    Some(&(m, lo, hi)) => {
                        format!("{} ({}–{})", f.text(m), f.text(lo), f.text(hi))
                    }
                    None => "–".into(),
                })
                .collect();
            let _ = writeln!(md, "| {} | {} |", thousands(n), cells.join(" | "));
        }
        for f in figs.iter().filter(|f| f.per_request()) {
            let vals: Vec<f64> = counts
                .iter()
                .filter_map(|n| med.get(&(*axis, *n))?.get(f).map(|v| v.0))
                .collect();
            if vals.len() >= 2 {
                let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = vals.iter().copied().fold(0.0, f64::max);
                let spread = (hi / lo - 1.0) * 100.0;
                let _ = writeln!(
                    md,
                    "\n{}: largest median {:.1} % above the smallest (goal ≤ 20 %: {})",
                    f.title(),
                    spread,
                    if spread <= 20.0 { "met" } else { "**missed**" }
                );
            }
        }
        let noisy: Vec<String> = points
            .iter()
            .filter(|p| p.axis == *axis)
            .flat_map(|p| {
                p.others_pct
                    .iter()
                    .filter(|(_, o)| **o >= NOISY_PCT)
                    .map(move |(f, o)| {
                        format!(
                            "{} {}, round {}, {}: {o:.0} %",
                            thousands(p.n),
                            axis.name(),
                            p.round + 1,
                            f.title()
                        )
                    })
            })
            .collect();
        if !noisy.is_empty() {
            let _ = writeln!(
                md,
                "\nOther programs used at least {NOISY_PCT:.0} % of a CPU in these windows \
                 (the machine was not quiet): {}",
                noisy.join("; ")
            );
        }
        let _ = writeln!(md, "\n![{}](growth-{}.svg)", axis.name(), axis.name());
    }
    let failed: Vec<&Point> = points.iter().filter(|p| p.error.is_some()).collect();
    if !failed.is_empty() {
        let _ = writeln!(md, "\nFailures:");
        for p in failed {
            let _ = writeln!(
                md,
                "- round {} {} {}: {}",
                p.round + 1,
                p.axis.name(),
                p.n,
                p.error.as_deref().unwrap_or_default()
            );
        }
    }
    md
}

/// An axis's chart: one panel per figure, one bar per point.
fn chart(axis: Axis, counts: &[usize], med: &Medians) -> String {
    let panels: Vec<Panel> = axis
        .figures()
        .iter()
        .map(|f| Panel {
            title: f.title().into(),
            bars: counts
                .iter()
                .map(|n| {
                    let v = med.get(&(axis, *n)).and_then(|r| r.get(f)).map(|v| v.0);
                    Bar {
                        label: format!("{} {}", thousands(*n), axis.name()),
                        value: v,
                        text: v.map_or(String::new(), |v| f.text(v)),
                        color: "#d9480f",
                    }
                })
                .collect(),
        })
        .collect();
    report::bar_chart(
        &format!("splicegate as {} grow (medians over rounds)", axis.name()),
        &panels,
        "proxy CPU from /proc (utime + stime) over the measured window",
    )
}

/// Run every axis's points, round by round; print (and maybe write) the
/// report.
pub(crate) fn run(c: &crate::Common, g: &GrowthArgs, pinning: &crate::Pinning) -> Result<()> {
    ensure!(
        c.seconds > 0.0 && c.rounds > 0,
        "--seconds and --rounds must be positive"
    );
    let axes: Vec<(Axis, Vec<usize>)> = [
        (Axis::Tunnels, &g.tunnels),
        (Axis::Nodes, &g.nodes),
        (Axis::Packages, &g.packages),
    ]
    .into_iter()
    .filter(|(a, _)| g.axes.is_empty() || g.axes.contains(a))
    .map(|(a, v)| (a, v.clone()))
    .collect();
    let tmp = std::env::temp_dir().join(format!("splicegate-growth-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let io = Duration::from_millis(c.io_timeout_ms.max(10));
    let ctx = Ctx {
        c,
        g,
        targets: Targets::start(c.body_bytes)?,
        proxy_cpus: pinning.proxy.clone(),
        tmp: tmp.clone(),
        window: Window {
            warmup: Duration::from_secs_f64(c.warmup.max(0.0)),
            measure: Duration::from_secs_f64(c.seconds),
            io_timeout: io,
            progress: !c.quiet,
        },
        io,
        admin_io: Duration::from_secs(g.start_seconds),
    };
    let started = crate::now();
    let mut points = Vec::new();
    for round in 0..c.rounds {
        for (axis, counts) in &axes {
            for &n in counts {
                let label = format!("r{}/{} {} {n}", round + 1, c.rounds, axis.name());
                eprintln!("{label}");
                let mut p = Point {
                    axis: *axis,
                    n,
                    round,
                    figures: BTreeMap::new(),
                    others_pct: BTreeMap::new(),
                    error: None,
                };
                if let Err(e) = point(&ctx, &mut p, &label) {
                    eprintln!("  [{label}] FAILED: {e:#}");
                    p.error = Some(format!("{e:#}"));
                }
                points.push(p);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let head = format!(
        "- command: `{}`\n- machine: {} {} ({} CPUs, {})\n- run: {} – {}; {} round(s); \
         CPU figures: {:.1} s warm-up + {:.1} s measured, {} connrate loops, {} pingpong \
         tunnels\n- pinning: {}\n- every point: a fresh gateway ({} worker(s)) from a generated \
         file: `direct` nodes, `country = \"us\"`, each bound to its own 127.1.x.y; `[admin]` \
         with `[store] path = \":memory:\"` and `[health] interval_s = 3600`; one package made \
         through the API after start (the one the API change re-keys)",
        std::env::args().collect::<Vec<_>>().join(" "),
        report::sh("uname", &["-n"]),
        report::sh("uname", &["-r"]),
        pinning.cpus,
        report::cpu_model(),
        started,
        crate::now(),
        c.rounds,
        c.warmup,
        c.seconds,
        g.conns,
        g.pingpong_tunnels,
        pinning.text,
        c.workers.max(1)
    );
    let med = medians(&points);
    let md = markdown(&head, &axes, &med, &points);
    if let Some(dir) = &c.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("growth.md"), &md)?;
        for (axis, counts) in &axes {
            std::fs::write(
                dir.join(format!("growth-{}.svg", axis.name())),
                chart(*axis, counts, &med),
            )?;
        }
        std::fs::write(
            dir.join("growth.json"),
            serde_json::to_string_pretty(&points)?,
        )?;
        eprintln!("report: {}", dir.join("growth.md").display());
    }
    println!("{md}");
    Ok(())
}
