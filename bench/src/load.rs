//! The load modes. Each runs workers on plain threads with blocking sockets
//! (every call under a timeout), a warm-up, then a measured window in which
//! the proxy's CPU is read from /proc at both ends; latencies go to one
//! hdrhistogram per worker. Every loop stops at the window's end, at a hard
//! deadline, or at a count (bytes or operations), whichever comes first.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client::{Route, content_length, http_conn, http_request, open_tunnel, status_of};
use crate::procstat::{Others, ProcTree, Sample};
use crate::targets::{CHURN_BYTES, Targets, header_says_close, read_head};
use crate::tls::Pki;
use rustls::{ClientConfig, HandshakeKind};

/// A load mode and its shape.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub(crate) enum Mode {
    /// `streams` tunnels moving bytes one way as fast as they go.
    Bulk {
        streams: usize,
        /// Source → client (a download) instead of client → sink.
        down: bool,
        /// Bytes after which the run stops early.
        max_bytes: u64,
    },
    /// `conns` closed loops of connect + handshake + 100 bytes echoed + close.
    Connrate {
        conns: usize,
        /// Client source addresses 127.0.2.1..=N (0: the kernel's choice).
        sources: u8,
        /// Each loop keeps one sticky session (splicegate's `-session-`
        /// username), so every connection after its first is a session hit
        /// instead of a node pick.
        sticky: bool,
        max_ops: u64,
    },
    /// A stream's setup: `conns` closed loops as `Connrate` (default one,
    /// so nothing queues behind another), timing both the tunnel's opening
    /// (connect until the proxy's `200`; no proxy or an L4 relay: the TCP
    /// connect) and the first echo (connect until 100 bytes are back).
    Setup {
        conns: usize,
        sources: u8,
        max_ops: u64,
    },
    /// `tunnels` tunnels doing `size`-byte request/response.
    Pingpong {
        tunnels: usize,
        size: usize,
        max_ops: u64,
    },
    /// `conns` keep-alive connections doing GETs; sticky: one session per
    /// connection (splicegate's `-session-` username).
    Http {
        conns: usize,
        sticky: bool,
        max_ops: u64,
    },
    /// `conns` closed loops of connect + TLS 1.3 handshake (full, or
    /// resumed from a ticket) + the proxy's handshake inside TLS + 100 bytes
    /// echoed + close.
    TlsHandshake {
        conns: usize,
        /// Client source addresses 127.0.2.1..=N (0: the kernel's choice).
        sources: u8,
        /// The client keeps a session cache and resumes.
        resume: bool,
        max_ops: u64,
    },
    /// `streams` tunnels inside TLS downloading as fast as they go (no
    /// proxy: plain TCP).
    TlsBulk { streams: usize, max_bytes: u64 },
    /// `tunnels` mostly idle tunnels held for the window (1 % of them pinged
    /// each second).
    Idle {
        tunnels: usize,
        open_threads: usize,
        #[serde(skip)]
        open_timeout: Duration,
    },
}

impl Mode {
    /// Whether the mode counts bytes (rate in Gbit/s, CPU per GB).
    pub(crate) fn moves_bytes(&self) -> bool {
        matches!(self, Mode::Bulk { .. } | Mode::TlsBulk { .. })
    }

    /// What `rate` counts.
    pub(crate) fn rate_unit(&self) -> &'static str {
        match self {
            Mode::Bulk { .. } | Mode::TlsBulk { .. } => "Gbit/s",
            Mode::Connrate { .. } | Mode::Setup { .. } | Mode::TlsHandshake { .. } => "conn/s",
            Mode::Pingpong { .. } => "round trips/s",
            Mode::Http { .. } => "req/s",
            Mode::Idle { .. } => "tunnels held",
        }
    }

    /// What `cpu_per_unit` counts.
    pub(crate) fn cpu_unit(&self) -> &'static str {
        match self {
            Mode::Bulk { .. } | Mode::TlsBulk { .. } => "CPU-s/GB",
            Mode::Idle { .. } => "CPU-s in window",
            _ => "CPU-µs/op",
        }
    }
}

/// Timing of a run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub warmup: Duration,
    pub measure: Duration,
    /// Timeout of every connect, read and write.
    pub io_timeout: Duration,
    /// Print a progress line each second (stderr).
    pub progress: bool,
}

/// Latency percentiles, µs.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub(crate) struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub count: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Option<Latency> {
        (!h.is_empty()).then(|| {
            let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            Latency {
                p50: us(0.5),
                p90: us(0.9),
                p99: us(0.99),
                p999: us(0.999),
                max: h.max() as f64 / 1000.0,
                count: h.len(),
            }
        })
    }
}

/// The proxy's cost in the window, read from /proc.
#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct Cost {
    pub cpu_s: f64,
    /// s/GB (bulk), µs/op (connrate, pingpong, http), CPU seconds of the
    /// held window (idle).
    pub cpu_per_unit: f64,
    /// Sum of VmHWM over the tree at the end: the peak since the proxy
    /// started (it starts afresh for every run).
    pub peak_rss_kib: u64,
    /// Sum of VmRSS at the end.
    pub rss_kib: u64,
    pub threads: u64,
    /// Most threads seen in the once-a-second samples.
    pub max_threads: u64,
    pub procs: u64,
    /// idle: before the tunnels were opened.
    pub base_rss_kib: Option<u64>,
    pub base_threads: Option<u64>,
    pub rss_per_tunnel_kib: Option<f64>,
    /// The device of a reverse tunnel (splicegate-agent, rathole's client),
    /// measured apart: its CPU seconds in the window, per unit as
    /// `cpu_per_unit`, and its RSS at the end.
    pub device_cpu_s: Option<f64>,
    pub device_cpu_per_unit: Option<f64>,
    pub device_rss_kib: Option<u64>,
}

/// One run of one mode against one proxy.
#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct RunResult {
    pub ok: bool,
    pub error: Option<String>,
    pub secs: f64,
    /// Operations (or bytes, for bulk) in the window.
    pub ops: u64,
    pub errors: u64,
    pub error_classes: BTreeMap<String, u64>,
    /// http: requests that found their kept-alive connection closed by the
    /// proxy and went again on a new one.
    pub reconnects: u64,
    /// Gbit/s (bulk), operations/s, or tunnels held (idle).
    pub rate: f64,
    pub latency_us: Option<Latency>,
    /// setup: connect until the tunnel was open (the proxy's `200`).
    pub open_us: Option<Latency>,
    pub proxy: Option<Cost>,
    /// TLS cells: what the handshakes were.
    pub tls: Option<TlsSeen>,
    /// CPU that processes outside this harness and the proxy used during
    /// the window, in % of one CPU: above a few %, the machine was not
    /// quiet.
    pub others_cpu_pct: Option<f64>,
}

/// The TLS handshakes of a run's measured window, as the client saw them.
#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct TlsSeen {
    /// Connections whose handshake was full.
    pub full: u64,
    /// Connections resumed from a ticket.
    pub resumed: u64,
    /// Cipher suite and key exchange group of the first handshake.
    pub params: String,
}

/// State the workers and the coordinator share.
struct Shared {
    stop: AtomicBool,
    measuring: AtomicBool,
    /// Operations done, or bytes moved (bulk).
    count: Arc<AtomicU64>,
    /// `count` when the run started, and the most it may grow by.
    base: u64,
    limit: u64,
    deadline: Instant,
    errors: AtomicU64,
    /// Requests retried on a new connection after the proxy closed a
    /// kept-alive one (http).
    reconnects: AtomicU64,
    active: AtomicUsize,
    hists: Vec<Mutex<Histogram<u64>>>,
    /// setup: connect until the tunnel was open, per worker.
    open_hists: Vec<Mutex<Histogram<u64>>>,
    classes: Mutex<BTreeMap<String, u64>>,
    first_error: Mutex<Option<String>>,
    /// TLS handshakes in the window: full and resumed.
    tls_full: AtomicU64,
    tls_resumed: AtomicU64,
    tls_params: Mutex<Option<String>>,
}

fn histogram() -> Histogram<u64> {
    // 1 ns .. 100 s at 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("static bounds")
}

impl Shared {
    fn new(workers: usize, count: Arc<AtomicU64>, limit: u64, deadline: Instant) -> Shared {
        let base = count.load(Ordering::Relaxed);
        Shared {
            stop: AtomicBool::new(false),
            measuring: AtomicBool::new(false),
            count,
            base,
            limit,
            deadline,
            errors: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            hists: (0..workers.max(1))
                .map(|_| Mutex::new(histogram()))
                .collect(),
            open_hists: (0..workers.max(1))
                .map(|_| Mutex::new(histogram()))
                .collect(),
            classes: Mutex::new(BTreeMap::new()),
            first_error: Mutex::new(None),
            tls_full: AtomicU64::new(0),
            tls_resumed: AtomicU64::new(0),
            tls_params: Mutex::new(None),
        }
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
            && self.count.load(Ordering::Relaxed) - self.base < self.limit
            && Instant::now() < self.deadline
    }

    fn add(&self, n: u64) {
        self.count.fetch_add(n, Ordering::Relaxed);
    }

    fn record(&self, worker: usize, latency: Duration) {
        if self.measuring.load(Ordering::Relaxed)
            && let Ok(mut h) = self.hists[worker % self.hists.len()].lock()
        {
            h.saturating_record(latency.as_nanos().max(1) as u64);
        }
    }

    fn record_open(&self, worker: usize, latency: Duration) {
        if self.measuring.load(Ordering::Relaxed)
            && let Ok(mut h) = self.open_hists[worker % self.open_hists.len()].lock()
        {
            h.saturating_record(latency.as_nanos().max(1) as u64);
        }
    }

    fn done(&self, worker: usize, started: Instant) {
        self.record(worker, started.elapsed());
        self.add(1);
    }

    fn fail(&self, class: &str, e: &anyhow::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut c) = self.classes.lock() {
            *c.entry(class.to_string()).or_default() += 1;
        }
        if let Ok(mut f) = self.first_error.lock() {
            f.get_or_insert_with(|| format!("{class}: {e:#}"));
        }
        // A failing proxy must not turn a loop into a spin.
        std::thread::sleep(Duration::from_millis(20));
    }

    /// A TLS handshake's kind, counted in the window.
    fn handshake(&self, kind: Option<HandshakeKind>, conn: &rustls::ClientConnection) {
        if let Ok(mut p) = self.tls_params.lock() {
            p.get_or_insert_with(|| crate::tls::params(conn));
        }
        if self.measuring.load(Ordering::Relaxed) {
            let c = if kind == Some(HandshakeKind::Resumed) {
                &self.tls_resumed
            } else {
                &self.tls_full
            };
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn merged(&self) -> Histogram<u64> {
        merge(&self.hists)
    }
}

fn merge(hists: &[Mutex<Histogram<u64>>]) -> Histogram<u64> {
    let mut all = histogram();
    for h in hists {
        if let Ok(h) = h.lock() {
            let _ = all.add(&*h);
        }
    }
    all
}

/// Run `mode` over `route`, measuring `proxy` (none: no proxy process);
/// `pki`: the certificate the proxy serves (TLS modes); `device`: a reverse
/// tunnel's device, measured apart.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    mode: &Mode,
    route: &Route,
    targets: &Targets,
    pki: Option<&Pki>,
    proxy: Option<ProcTree>,
    device: Option<ProcTree>,
    w: Window,
    label: &str,
) -> RunResult {
    if let Mode::Idle {
        tunnels,
        open_threads,
        open_timeout,
    } = *mode
    {
        return idle(
            route,
            targets,
            tunnels,
            open_threads,
            open_timeout,
            proxy,
            w,
            label,
        );
    }
    let deadline = Instant::now() + w.warmup + w.measure + Duration::from_secs(5);
    let (workers, count, limit) = match *mode {
        Mode::Bulk {
            streams,
            down,
            max_bytes,
        } => (
            streams,
            if down {
                Arc::new(AtomicU64::new(0))
            } else {
                targets.sink_bytes.clone()
            },
            max_bytes,
        ),
        Mode::Connrate { conns, max_ops, .. } | Mode::Setup { conns, max_ops, .. } => {
            (conns, Arc::new(AtomicU64::new(0)), max_ops)
        }
        Mode::Pingpong {
            tunnels, max_ops, ..
        } => (tunnels, Arc::new(AtomicU64::new(0)), max_ops),
        Mode::Http { conns, max_ops, .. } => (conns, Arc::new(AtomicU64::new(0)), max_ops),
        Mode::TlsHandshake { conns, max_ops, .. } => (conns, Arc::new(AtomicU64::new(0)), max_ops),
        Mode::TlsBulk { streams, max_bytes } => (streams, Arc::new(AtomicU64::new(0)), max_bytes),
        Mode::Idle { .. } => unreachable!("idle has its own driver"),
    };
    // One client configuration (so one session cache) per run: tickets of
    // one peer are never offered to another.
    let tls_config = match (mode, pki) {
        (Mode::TlsHandshake { resume, .. }, Some(p)) => match p.client(*resume) {
            Ok(c) => Some(c),
            Err(e) => return failed_run(e),
        },
        (Mode::TlsBulk { .. }, Some(p)) => match p.client(true) {
            Ok(c) => Some(c),
            Err(e) => return failed_run(e),
        },
        (Mode::TlsHandshake { .. } | Mode::TlsBulk { .. }, None) => {
            return failed_run(anyhow!("a TLS mode without a certificate"));
        }
        _ => None,
    };
    let tls_config = tls_config.as_ref();
    let shared = Shared::new(workers, count, limit, deadline);
    let shared = &shared;
    std::thread::scope(|sc| {
        let mut spawn_error = None;
        for i in 0..workers.max(1) {
            shared.active.fetch_add(1, Ordering::SeqCst);
            let spawned = std::thread::Builder::new()
                .name(format!("load-{i}"))
                .stack_size(256 * 1024)
                .spawn_scoped(sc, move || {
                    match *mode {
                        Mode::Bulk { down, .. } => bulk_worker(i, down, route, targets, shared, w),
                        Mode::Connrate {
                            conns,
                            sources,
                            sticky,
                            ..
                        } => connrate_worker(
                            i,
                            conns,
                            sources,
                            Churn::Connrate { sticky },
                            route,
                            targets,
                            shared,
                            w,
                        ),
                        Mode::Setup { conns, sources, .. } => connrate_worker(
                            i,
                            conns,
                            sources,
                            Churn::Setup,
                            route,
                            targets,
                            shared,
                            w,
                        ),
                        Mode::Pingpong { size, .. } => {
                            pingpong_worker(i, size, route, targets, shared, w)
                        }
                        Mode::Http { sticky, .. } => {
                            http_worker(i, sticky, route, targets, shared, w)
                        }
                        Mode::TlsHandshake { conns, sources, .. } => {
                            if let Some(c) = tls_config {
                                tls_handshake_worker(
                                    i, conns, sources, route, targets, c, shared, w,
                                )
                            }
                        }
                        Mode::TlsBulk { .. } => {
                            tls_bulk_worker(i, route, targets, tls_config, shared, w)
                        }
                        Mode::Idle { .. } => {}
                    }
                    shared.active.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                shared.active.fetch_sub(1, Ordering::SeqCst);
                spawn_error = Some(anyhow!("spawning load thread {i}: {e}"));
                break;
            }
        }
        let mut r = match spawn_error {
            Some(e) => {
                shared.stop.store(true, Ordering::SeqCst);
                RunResult {
                    error: Some(format!("{e:#}")),
                    ..RunResult::default()
                }
            }
            None => coordinate(mode, shared, proxy, device, w, label),
        };
        shared.stop.store(true, Ordering::SeqCst);
        r.errors = shared.errors.load(Ordering::Relaxed);
        r.reconnects = shared.reconnects.load(Ordering::Relaxed);
        r.error_classes = shared.classes.lock().map(|c| c.clone()).unwrap_or_default();
        if r.error.is_none() {
            r.error = shared.first_error.lock().ok().and_then(|f| f.clone());
        }
        if !r.ok && r.error.is_none() {
            r.error = Some("no operation completed in the window".into());
        }
        if matches!(mode, Mode::Setup { .. }) {
            r.open_us = Latency::of(&merge(&shared.open_hists));
        }
        if matches!(mode, Mode::TlsHandshake { .. } | Mode::TlsBulk { .. }) {
            r.tls = Some(TlsSeen {
                full: shared.tls_full.load(Ordering::Relaxed),
                resumed: shared.tls_resumed.load(Ordering::Relaxed),
                params: shared
                    .tls_params
                    .lock()
                    .ok()
                    .and_then(|p| p.clone())
                    .unwrap_or_default(),
            });
        }
        r
    })
}

fn failed_run(e: anyhow::Error) -> RunResult {
    RunResult {
        error: Some(format!("{e:#}")),
        ..RunResult::default()
    }
}

fn fmt_rate(mode: &Mode, per_s: f64) -> String {
    if mode.moves_bytes() {
        format!("{:.2} Gbit/s", per_s * 8.0 / 1e9)
    } else {
        format!("{per_s:.0} {}", mode.rate_unit())
    }
}

/// Warm-up, then the measured window with a progress line each second.
fn coordinate(
    mode: &Mode,
    shared: &Shared,
    proxy: Option<ProcTree>,
    device: Option<ProcTree>,
    w: Window,
    label: &str,
) -> RunResult {
    let count = || shared.count.load(Ordering::Relaxed);
    let warm_end = Instant::now() + w.warmup;
    while Instant::now() < warm_end && shared.active.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Nothing got through in the warm-up: the proxy refuses; no window.
    if count() == shared.base && shared.errors.load(Ordering::Relaxed) > 0 {
        return RunResult::default();
    }
    let c0 = count();
    let others0 = Others::now();
    let s0 = proxy.and_then(|p| p.sample().ok());
    let d0 = device.and_then(|p| p.sample().ok());
    shared.measuring.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let end = t0 + w.measure;
    let (mut last_c, mut last_t) = (c0, t0);
    let mut max_threads = 0;
    loop {
        let now = Instant::now();
        if now >= end || shared.active.load(Ordering::SeqCst) == 0 || !shared.running() {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_secs(1)));
        let (c, t) = (count(), Instant::now());
        let sample = proxy.and_then(|p| p.sample().ok());
        if let Some(s) = sample {
            max_threads = max_threads.max(s.threads);
        }
        if w.progress {
            let p99 = shared.merged();
            let p99 = if p99.is_empty() {
                String::new()
            } else {
                format!(
                    "  p99 {:.0} µs",
                    p99.value_at_quantile(0.99) as f64 / 1000.0
                )
            };
            let cpu = match (s0, sample) {
                (Some(a), Some(b)) => format!(
                    "  proxy CPU {:.0} %",
                    (b.cpu_s - a.cpu_s) / (t - t0).as_secs_f64() * 100.0
                ),
                _ => String::new(),
            };
            eprintln!(
                "  [{label}] {:>4.1}s  {}{p99}  errors {}{cpu}",
                (t - t0).as_secs_f64(),
                fmt_rate(
                    mode,
                    (c - last_c) as f64 / (t - last_t).as_secs_f64().max(1e-9)
                ),
                shared.errors.load(Ordering::Relaxed)
            );
        }
        (last_c, last_t) = (c, t);
    }
    let c1 = count();
    let s1 = proxy.and_then(|p| p.sample().ok());
    let d1 = device.and_then(|p| p.sample().ok());
    let secs = t0.elapsed().as_secs_f64();
    let others = Others::now().since(&others0) / secs.max(1e-9) * 100.0;
    shared.measuring.store(false, Ordering::SeqCst);
    shared.stop.store(true, Ordering::SeqCst);
    let done = c1 - c0;
    let rate = if mode.moves_bytes() {
        done as f64 * 8.0 / secs / 1e9
    } else {
        done as f64 / secs
    };
    let mut proxy = match (s0, s1) {
        (Some(a), Some(b)) => Some(cost(mode, a, b, done, max_threads)),
        _ => None,
    };
    if let (Some(c), Some(a), Some(b)) = (proxy.as_mut(), d0, d1) {
        let d = cost(mode, a, b, done, 0);
        c.device_cpu_s = Some(d.cpu_s);
        c.device_cpu_per_unit = Some(d.cpu_per_unit);
        c.device_rss_kib = Some(d.rss_kib);
    }
    RunResult {
        ok: done > 0,
        secs,
        ops: done,
        rate,
        latency_us: if mode.moves_bytes() {
            None
        } else {
            Latency::of(&shared.merged())
        },
        proxy,
        others_cpu_pct: Some(others),
        ..RunResult::default()
    }
}

fn cost(mode: &Mode, a: Sample, b: Sample, done: u64, max_threads: u64) -> Cost {
    let cpu_s = (b.cpu_s - a.cpu_s).max(0.0);
    let per = match mode {
        m if m.moves_bytes() && done > 0 => cpu_s / (done as f64 / 1e9),
        Mode::Idle { .. } => cpu_s,
        _ if done > 0 => cpu_s * 1e6 / done as f64,
        _ => 0.0,
    };
    Cost {
        cpu_s,
        cpu_per_unit: per,
        peak_rss_kib: b.hwm_kib,
        rss_kib: b.rss_kib,
        threads: b.threads,
        max_threads: max_threads.max(b.threads),
        procs: b.procs,
        ..Cost::default()
    }
}

fn bulk_worker(i: usize, down: bool, route: &Route, t: &Targets, sh: &Shared, w: Window) {
    let target = if down { t.source } else { t.sink };
    let auth = route.user_for(i, false);
    let mut buf = vec![0x5au8; 256 * 1024];
    while sh.running() {
        let mut tun = match open_tunnel(route, target, None, auth.as_ref(), w.io_timeout) {
            Ok(t) => t,
            Err(e) => {
                sh.fail("open", &e);
                continue;
            }
        };
        if down {
            sh.add(tun.early as u64);
        }
        while sh.running() {
            let r = if down {
                match tun.stream.read(&mut buf) {
                    Ok(0) => Err(anyhow!("the source closed")),
                    Ok(n) => {
                        sh.add(n as u64);
                        Ok(())
                    }
                    Err(e) => Err(e.into()),
                }
            } else {
                // The sink counts what arrives.
                tun.stream.write_all(&buf).map_err(Into::into)
            };
            if let Err(e) = r {
                if sh.running() {
                    sh.fail("stream", &e);
                }
                break;
            }
        }
    }
}

/// One connection's life: connect (from `src`), handshake, 100 bytes out
/// and back, then wait for the server's close to arrive through the proxy
/// (the client closes last, so its ports are not held in TIME_WAIT).
/// Returns when the tunnel was open and when the echo was back.
fn churn_once(
    route: &Route,
    t: &Targets,
    src: Option<Ipv4Addr>,
    auth: Option<&crate::client::Auth>,
    io: Duration,
) -> std::result::Result<(Instant, Instant), (&'static str, anyhow::Error)> {
    let mut tun = open_tunnel(route, t.churn, src, auth, io).map_err(|e| ("handshake", e))?;
    let opened = Instant::now();
    let payload = [0x42u8; CHURN_BYTES];
    tun.stream
        .write_all(&payload)
        .map_err(|e| ("echo", e.into()))?;
    let mut back = [0u8; CHURN_BYTES];
    tun.stream
        .read_exact(&mut back)
        .map_err(|e| ("echo", e.into()))?;
    let echoed = Instant::now();
    let mut rest = [0u8; 64];
    match tun.stream.read(&mut rest) {
        Ok(0) => Ok((opened, echoed)),
        Ok(_) => Err(("close", anyhow!("bytes after the echo"))),
        Err(e) => Err((
            "close",
            anyhow::Error::from(e).context("waiting for the close"),
        )),
    }
}

/// What a churn loop records: `Setup` times the tunnel's opening too;
/// `Connrate` may keep a sticky session per loop.
#[derive(Clone, Copy)]
enum Churn {
    Connrate { sticky: bool },
    Setup,
}

#[allow(clippy::too_many_arguments)]
fn connrate_worker(
    i: usize,
    conns: usize,
    sources: u8,
    churn: Churn,
    route: &Route,
    t: &Targets,
    sh: &Shared,
    w: Window,
) {
    let setup = matches!(churn, Churn::Setup);
    let auth = route.user_for(i, matches!(churn, Churn::Connrate { sticky: true }));
    let mut n = i;
    while sh.running() {
        let src =
            (sources > 0).then(|| Ipv4Addr::new(127, 0, 2, 1 + (n % usize::from(sources)) as u8));
        n += conns.max(1);
        let start = Instant::now();
        match churn_once(route, t, src, auth.as_ref(), w.io_timeout) {
            Ok((opened, echoed)) => {
                if setup {
                    sh.record_open(i, opened - start);
                }
                sh.record(i, echoed - start);
                sh.add(1);
            }
            Err((class, e)) => {
                if sh.running() {
                    sh.fail(class, &e)
                }
            }
        }
    }
}

/// One TLS connection's life, as [`churn_once`]: connect, TLS handshake,
/// the proxy's handshake inside TLS, 100 bytes out and back, then the
/// server's close arriving through the proxy (close_notify, or a bare FIN).
fn tls_churn_once(
    route: &Route,
    t: &Targets,
    src: Option<Ipv4Addr>,
    auth: Option<&crate::client::Auth>,
    config: &Arc<ClientConfig>,
    sh: &Shared,
    io: Duration,
) -> std::result::Result<Instant, (&'static str, anyhow::Error)> {
    let mut tun =
        crate::tls::open(route, t.churn, src, auth, config, io).map_err(|e| ("handshake", e))?;
    sh.handshake(tun.kind, &tun.stream.conn);
    let payload = [0x42u8; CHURN_BYTES];
    tun.stream
        .write_all(&payload)
        .map_err(|e| ("echo", e.into()))?;
    let mut back = [0u8; CHURN_BYTES];
    tun.stream
        .read_exact(&mut back)
        .map_err(|e| ("echo", e.into()))?;
    let echoed = Instant::now();
    let mut rest = [0u8; 64];
    match tun.stream.read(&mut rest) {
        Ok(0) => Ok(echoed),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(echoed),
        Ok(_) => Err(("close", anyhow!("bytes after the echo"))),
        Err(e) => Err((
            "close",
            anyhow::Error::from(e).context("waiting for the close"),
        )),
    }
}

#[allow(clippy::too_many_arguments)]
fn tls_handshake_worker(
    i: usize,
    conns: usize,
    sources: u8,
    route: &Route,
    t: &Targets,
    config: &Arc<ClientConfig>,
    sh: &Shared,
    w: Window,
) {
    let auth = route.user_for(i, false);
    let mut n = i;
    while sh.running() {
        let src =
            (sources > 0).then(|| Ipv4Addr::new(127, 0, 2, 1 + (n % usize::from(sources)) as u8));
        n += conns.max(1);
        let start = Instant::now();
        match tls_churn_once(route, t, src, auth.as_ref(), config, sh, w.io_timeout) {
            Ok(echoed) => {
                sh.record(i, echoed - start);
                sh.add(1);
            }
            Err((class, e)) => {
                if sh.running() {
                    sh.fail(class, &e)
                }
            }
        }
    }
}

/// A download inside TLS from the source target (no proxy: in the clear,
/// the baseline). Bytes are counted as the client reads them, decrypted.
fn tls_bulk_worker(
    i: usize,
    route: &Route,
    t: &Targets,
    config: Option<&Arc<ClientConfig>>,
    sh: &Shared,
    w: Window,
) {
    let auth = route.user_for(i, false);
    let mut buf = vec![0u8; 256 * 1024];
    while sh.running() {
        let opened = match (route, config) {
            (Route::Direct, _) => open_tunnel(route, t.source, None, None, w.io_timeout)
                .map(|tun| (Box::new(tun.stream) as Box<dyn Read>, tun.early)),
            (_, Some(c)) => crate::tls::open(route, t.source, None, auth.as_ref(), c, w.io_timeout)
                .map(|tun| {
                    sh.handshake(tun.kind, &tun.stream.conn);
                    (Box::new(tun.stream) as Box<dyn Read>, tun.early)
                }),
            (_, None) => Err(anyhow!("a TLS mode without a client configuration")),
        };
        let (mut stream, early) = match opened {
            Ok(s) => s,
            Err(e) => {
                sh.fail("open", &e);
                continue;
            }
        };
        sh.add(early as u64);
        while sh.running() {
            let r = match stream.read(&mut buf) {
                Ok(0) => Err(anyhow!("the source closed")),
                Ok(n) => {
                    sh.add(n as u64);
                    Ok(())
                }
                Err(e) => Err(e.into()),
            };
            if let Err(e) = r {
                if sh.running() {
                    sh.fail("stream", &e);
                }
                break;
            }
        }
    }
}

fn pingpong_worker(i: usize, size: usize, route: &Route, t: &Targets, sh: &Shared, w: Window) {
    let auth = route.user_for(i, false);
    let msg = vec![0x33u8; size.max(1)];
    let mut back = vec![0u8; size.max(1)];
    while sh.running() {
        let mut tun = match open_tunnel(route, t.echo, None, auth.as_ref(), w.io_timeout) {
            Ok(t) => t,
            Err(e) => {
                sh.fail("open", &e);
                continue;
            }
        };
        while sh.running() {
            let start = Instant::now();
            let r = tun
                .stream
                .write_all(&msg)
                .and_then(|()| tun.stream.read_exact(&mut back));
            match r {
                Ok(()) => sh.done(i, start),
                Err(e) => {
                    if sh.running() {
                        sh.fail("round trip", &e.into());
                    }
                    break;
                }
            }
        }
    }
}

/// One response: head, then a Content-Length body. Returns (status, close).
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(u16, bool)> {
    let n = read_head(s, buf).context("reading the response head")?;
    let head = &buf[..n];
    let status = status_of(head).context("not an HTTP response")?;
    let close = header_says_close(head);
    let len = content_length(head).context("a response without Content-Length")?;
    let mut chunk = [0u8; 4096];
    while buf.len() < n + len {
        match s.read(&mut chunk)? {
            0 => anyhow::bail!("closed in the body"),
            k => buf.extend_from_slice(&chunk[..k]),
        }
    }
    buf.drain(..n + len);
    Ok((status, close))
}

fn http_worker(i: usize, sticky: bool, route: &Route, t: &Targets, sh: &Shared, w: Window) {
    let auth = route.user_for(i, sticky);
    let mut buf = Vec::with_capacity(8192);
    // The open connection, its request bytes, and how many responses it gave.
    let mut conn: Option<(TcpStream, Vec<u8>, u64)> = None;
    while sh.running() {
        let start = Instant::now();
        let mut retried = false;
        loop {
            if conn.is_none() {
                match http_conn(route, t.origin, auth.as_ref(), w.io_timeout) {
                    Ok((s, absolute)) => {
                        let req = http_request(t.origin, absolute, auth.as_ref());
                        buf.clear();
                        conn = Some((s, req, 0));
                    }
                    Err(e) => {
                        sh.fail("connect", &e);
                        break;
                    }
                }
            }
            let Some((s, req, served)) = conn.as_mut() else {
                break;
            };
            let r = s
                .write_all(req)
                .map_err(anyhow::Error::from)
                .and_then(|()| read_response(s, &mut buf));
            match r {
                Ok((status, close)) => {
                    *served += 1;
                    if status == 200 {
                        sh.done(i, start);
                    } else {
                        sh.fail(&format!("status {status}"), &anyhow!("HTTP {status}"));
                    }
                    if close {
                        conn = None;
                    }
                    break;
                }
                // A kept-alive connection the proxy closed after its last
                // response without saying so (tinyproxy does): a client
                // retries once on a new connection; the request's latency
                // includes that.
                Err(_) if *served > 0 && !retried && buf.is_empty() => {
                    sh.reconnects.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                    retried = true;
                }
                Err(e) => {
                    conn = None;
                    if sh.running() {
                        sh.fail("request", &e);
                    }
                    break;
                }
            }
        }
    }
}

/// Open `n` tunnels to the echo (each proven by one round trip), hold them
/// for the window pinging 1 % of them a second, and read the proxy's memory
/// and threads before and after.
#[allow(clippy::too_many_arguments)]
fn idle(
    route: &Route,
    t: &Targets,
    n: usize,
    open_threads: usize,
    open_timeout: Duration,
    proxy: Option<ProcTree>,
    w: Window,
    label: &str,
) -> RunResult {
    let base = proxy.and_then(|p| p.sample().ok());
    let open_deadline = Instant::now() + open_timeout;
    let shared = Shared::new(
        1,
        Arc::new(AtomicU64::new(0)),
        u64::MAX,
        open_deadline + w.measure + Duration::from_secs(5),
    );
    let sh = &shared;
    let opened_at = Instant::now();
    let mut tunnels = open_held(route, t, n, open_threads, open_deadline, w.io_timeout, sh);
    let open_secs = opened_at.elapsed().as_secs_f64();
    if w.progress {
        eprintln!(
            "  [{label}] opened {} of {n} tunnels in {open_secs:.1} s",
            tunnels.len()
        );
    }
    if tunnels.is_empty() {
        return RunResult {
            error: shared
                .first_error
                .lock()
                .ok()
                .and_then(|f| f.clone())
                .or_else(|| Some("no tunnel opened".into())),
            errors: shared.errors.load(Ordering::Relaxed),
            ..RunResult::default()
        };
    }
    let s0 = proxy.and_then(|p| p.sample().ok());
    sh.measuring.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let per_tick = (tunnels.len() / 100).max(1);
    let mut next = 0usize;
    let mut dead = vec![false; tunnels.len()];
    let mut max_threads = 0;
    while t0.elapsed() < w.measure {
        let tick = Instant::now();
        for _ in 0..per_tick {
            let k = next % tunnels.len();
            next += 1;
            if dead[k] {
                continue;
            }
            let start = Instant::now();
            match ping(&mut tunnels[k]) {
                Ok(()) => sh.done(0, start),
                Err(e) => {
                    dead[k] = true;
                    sh.fail("ping", &e);
                }
            }
        }
        let s = proxy.and_then(|p| p.sample().ok());
        if let Some(s) = s {
            max_threads = max_threads.max(s.threads);
        }
        if w.progress {
            let mem = s.map_or(String::new(), |s| {
                format!(
                    "  proxy RSS {:.1} MiB, {} threads",
                    s.rss_kib as f64 / 1024.0,
                    s.threads
                )
            });
            eprintln!(
                "  [{label}] {:>4.1}s  {} tunnels held{mem}  errors {}",
                t0.elapsed().as_secs_f64(),
                dead.iter().filter(|d| !**d).count(),
                sh.errors.load(Ordering::Relaxed)
            );
        }
        let left = w.measure.saturating_sub(t0.elapsed());
        std::thread::sleep(
            Duration::from_secs(1)
                .saturating_sub(tick.elapsed())
                .min(left),
        );
    }
    let s1 = proxy.and_then(|p| p.sample().ok());
    let held = dead.iter().filter(|d| !**d).count();
    let secs = t0.elapsed().as_secs_f64();
    tunnels.clear();
    let mode = Mode::Idle {
        tunnels: n,
        open_threads,
        open_timeout,
    };
    let proxy = match (s0, s1) {
        (Some(a), Some(b)) => {
            let mut c = cost(&mode, a, b, held as u64, max_threads);
            if let Some(base) = base {
                c.base_rss_kib = Some(base.rss_kib);
                c.base_threads = Some(base.threads);
                c.rss_per_tunnel_kib =
                    Some((b.rss_kib as f64 - base.rss_kib as f64) / held.max(1) as f64);
            }
            Some(c)
        }
        _ => None,
    };
    let mut classes = shared.classes.lock().map(|c| c.clone()).unwrap_or_default();
    if held < n {
        *classes.entry("not opened or lost".into()).or_default() += (n - held) as u64;
    }
    RunResult {
        ok: held > 0,
        error: (held < n).then(|| {
            shared
                .first_error
                .lock()
                .ok()
                .and_then(|f| f.clone())
                .unwrap_or_else(|| format!("{held} of {n} tunnels held"))
        }),
        secs,
        ops: held as u64,
        errors: shared.errors.load(Ordering::Relaxed),
        error_classes: classes,
        rate: held as f64,
        latency_us: Latency::of(&shared.merged()),
        proxy,
        ..RunResult::default()
    }
}

/// Open `n` tunnels to the echo from `threads` threads, each proven by one
/// round trip, until `deadline` or too many failures (counted in `sh`).
fn open_held(
    route: &Route,
    t: &Targets,
    n: usize,
    threads: usize,
    deadline: Instant,
    io: Duration,
    sh: &Shared,
) -> Vec<TcpStream> {
    let claimed = AtomicUsize::new(0);
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|k| {
                let claimed = &claimed;
                std::thread::Builder::new()
                    .name(format!("idle-open-{k}"))
                    .stack_size(256 * 1024)
                    .spawn_scoped(sc, move || {
                        let mut mine = Vec::new();
                        while Instant::now() < deadline
                            && sh.errors.load(Ordering::Relaxed) < 50 + n as u64 / 10
                        {
                            let i = claimed.fetch_add(1, Ordering::Relaxed);
                            if i >= n {
                                break;
                            }
                            let auth = route.user_for(i, false);
                            match open_tunnel(route, t.echo, None, auth.as_ref(), io).and_then(
                                |mut tun| {
                                    ping(&mut tun.stream)?;
                                    Ok(tun.stream)
                                },
                            ) {
                                Ok(s) => mine.push(s),
                                Err(e) => {
                                    claimed.fetch_sub(1, Ordering::Relaxed);
                                    sh.fail("open", &e);
                                }
                            }
                        }
                        mine
                    })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.ok()?.join().ok())
            .flatten()
            .collect()
    })
}

/// `n` tunnels to the echo, opened by 8 threads within `open_timeout` and
/// held by the caller (the growth runs measure other work beside them).
pub(crate) fn hold_tunnels(
    route: &Route,
    t: &Targets,
    n: usize,
    open_timeout: Duration,
    io: Duration,
) -> Result<Vec<TcpStream>> {
    let deadline = Instant::now() + open_timeout;
    let sh = Shared::new(1, Arc::new(AtomicU64::new(0)), u64::MAX, deadline);
    let held = open_held(route, t, n, 8, deadline, io, &sh);
    if held.len() < n {
        let first = sh.first_error.lock().ok().and_then(|f| f.clone());
        anyhow::bail!(
            "{} of {n} tunnels opened in {open_timeout:?}: {}",
            held.len(),
            first.unwrap_or_default()
        );
    }
    Ok(held)
}

fn ping(s: &mut TcpStream) -> Result<()> {
    let msg = *b"idle-png";
    s.write_all(&msg)?;
    let mut back = [0u8; 8];
    s.read_exact(&mut back)?;
    anyhow::ensure!(back == msg, "echo mismatch");
    Ok(())
}
