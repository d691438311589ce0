//! SOCKS5 UDP ASSOCIATE measured (issue 17): K associations (SOCKS5
//! handshake over TCP, then datagrams to BND) each keep W datagrams of S
//! bytes outstanding to a UDP echo in this process, in closed loops,
//! through splicegate (one `direct` node), through Dante (`danted` with
//! `udpassociate`), and straight to the echo (no proxy: the baseline), in
//! the same run. Figures: datagrams/s, the proxy's CPU per million
//! datagrams (its whole process tree, from /proc), round-trip p50/p99 and
//! the p99 added over the direct path, medians over rounds, and splicegate's
//! datagrams per CPU-second over Dante's.
//!
//! A "datagram" is one relayed by the proxy: each round trip is two (the
//! client's to the echo and the echo's answer). Only round trips that came
//! back are counted; a datagram not back within `--loss-ms` is lost (and
//! reported), and its slot in the window is reused.
//!
//! Every loop is bounded: the window, a hard deadline 5 s past it, a count
//! (`--max-ops` round trips), timeouts on every socket call, 15 s for a
//! peer to listen and 5 s for it to stop.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client::{Auth, Proto, Route, dial};
use crate::load::Latency;
use crate::peers::{self, Env, Peer, PeerId, Want};
use crate::procstat::{Others, ProcTree, comm, steal_s, steal_ticks};
use crate::report;
use crate::targets::{Targets, listener};

/// `splicegate-bench udp`.
#[derive(Debug, Clone, Args)]
pub(crate) struct UdpArgs {
    #[command(flatten)]
    common: crate::Common,
    /// Ways to the echo: direct, splicegate, dante, or
    /// socks5://[user:pass@]ip:port (its CPU measured with --pid). Repeat.
    #[arg(long = "via", default_values = ["direct", "splicegate", "dante"])]
    via: Vec<String>,
    /// PID of the proxy behind a URL.
    #[arg(long)]
    pid: Option<u32>,
    /// Payload bytes of each datagram (at least 16; repeat for several cells).
    #[arg(long = "size", default_values_t = vec![64usize, 1200])]
    sizes: Vec<usize>,
    /// Associations, one load thread each.
    #[arg(long, default_value_t = 8)]
    assocs: usize,
    /// Datagrams each association keeps outstanding (repeat for several cells).
    #[arg(long = "window", default_values_t = vec![8usize])]
    windows: Vec<usize>,
    /// Round trips after which a run stops early.
    #[arg(long, default_value_t = 100_000_000)]
    max_ops: u64,
    /// A datagram not back after this many ms is counted lost.
    #[arg(long, default_value_t = 200)]
    loss_ms: u64,
}

/// A way to the echo.
#[derive(Debug, Clone)]
enum Via {
    Direct,
    Splicegate,
    Dante,
    External {
        name: String,
        addr: SocketAddr,
        auth: Option<Auth>,
        pid: Option<u32>,
    },
}

impl Via {
    fn parse(s: &str, pid: Option<u32>) -> Result<Via> {
        Ok(match s {
            "direct" => Via::Direct,
            "splicegate" => Via::Splicegate,
            "dante" => Via::Dante,
            url if url.contains("://") => match Route::parse_url(url)? {
                Route::Proxy {
                    proto: Proto::Socks5,
                    addr,
                    auth,
                    ..
                } => Via::External {
                    name: format!("socks5://{addr}"),
                    addr,
                    auth,
                    pid,
                },
                _ => bail!("{url}: UDP ASSOCIATE needs a socks5:// proxy"),
            },
            other => bail!("{other:?}: expected direct, splicegate, dante or socks5://…"),
        })
    }

    fn name(&self) -> String {
        match self {
            Via::Direct => "direct".into(),
            Via::Splicegate => "splicegate".into(),
            Via::Dante => "dante".into(),
            Via::External { name, .. } => name.clone(),
        }
    }

    fn describe(&self, workers: usize) -> String {
        match self {
            Via::Direct => "no proxy: datagrams straight to the echo".into(),
            Via::Splicegate => format!(
                "splicegate, `direct` node bound to 127.0.1.1, {workers} worker(s), \
                 SOCKS5 username/password"
            ),
            Via::Dante => "Dante `danted -N 1`, `udpassociate` + `udpreply`, no authentication \
                           (`socksmethod: none`: authentication is once per association, \
                           before the window)"
                .into(),
            Via::External { pid, .. } => format!(
                "external SOCKS5 proxy{}",
                if pid.is_some() {
                    ""
                } else {
                    ", CPU not measured (no --pid)"
                }
            ),
        }
    }
}

/// One cell: a datagram size and a window.
#[derive(Debug, Clone, Copy, Serialize)]
struct Cell {
    size: usize,
    window: usize,
    assocs: usize,
}

impl Cell {
    fn id(&self) -> String {
        format!("udp-{}-w{}", self.size, self.window)
    }
}

/// One run of one cell against one way.
#[derive(Debug, Clone, Serialize, Default)]
struct UdpRun {
    cell: String,
    via: String,
    round: usize,
    ok: bool,
    error: Option<String>,
    secs: f64,
    /// Round trips completed in the window.
    round_trips: u64,
    /// Datagrams the proxy relayed for them: 2 per round trip.
    datagrams: u64,
    datagrams_per_s: f64,
    /// Sent in the window and not back within the loss timeout.
    lost: u64,
    sent: u64,
    errors: u64,
    latency_us: Option<Latency>,
    /// The proxy's tree over the window (none for the direct path).
    cpu_s: Option<f64>,
    cpu_s_per_million: Option<f64>,
    datagrams_per_cpu_s: Option<f64>,
    /// The proxy's CPU over the window, % of one CPU.
    proxy_cpu_pct: Option<f64>,
    /// Processes in the proxy's tree at the end, and those that used CPU
    /// in the window.
    procs: Option<u64>,
    busy_procs: Option<u64>,
    threads: Option<u64>,
    /// CPU of programs outside this harness and the proxy, % of one CPU.
    others_cpu_pct: f64,
    /// Time the hypervisor stole from the machine's CPUs over the window,
    /// % of one CPU (all CPUs summed): a VM's noise, which the CPU figures
    /// do not see.
    steal_pct: Option<f64>,
}

/// Medians of one (cell, way) over its rounds.
#[derive(Debug, Clone, Serialize, Default)]
struct Summary {
    cell: String,
    via: String,
    rounds_ok: usize,
    datagrams_per_s: Option<f64>,
    datagrams_per_s_min: Option<f64>,
    datagrams_per_s_max: Option<f64>,
    cpu_s_per_million: Option<f64>,
    cpu_min: Option<f64>,
    cpu_max: Option<f64>,
    datagrams_per_cpu_s: Option<f64>,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    /// p99 minus the direct path's p99 of the same round, median.
    added_p99_us: Option<f64>,
    lost: u64,
    sent: u64,
    errors: u64,
    proxy_cpu_pct: Option<f64>,
    procs: Option<f64>,
    busy_procs: Option<f64>,
    others_cpu_pct_max: Option<f64>,
    steal_pct_max: Option<f64>,
    note: Option<String>,
}

/// splicegate over Dante in one cell.
#[derive(Debug, Clone, Serialize)]
struct Ratio {
    cell: String,
    /// splicegate's datagrams per CPU-second over Dante's, from the medians.
    of_medians: f64,
    /// The same ratio round by round (the two run back to back).
    paired_median: f64,
    paired_min: f64,
    paired_max: f64,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// A started way: the proxy's address and credentials, the tree to
/// measure, and what stops it.
struct Started {
    proxy: Option<(SocketAddr, Option<Auth>)>,
    measured: Option<ProcTree>,
    /// splicegate, stopped by the harness's own peer code on drop.
    _running: Option<peers::Running>,
    /// Dante, stopped on drop.
    _dante: Option<Dante>,
}

fn start(via: &Via, env: &Env) -> Result<Started> {
    Ok(match via {
        Via::Direct => Started {
            proxy: None,
            measured: None,
            _running: None,
            _dante: None,
        },
        Via::Splicegate => {
            let running = peers::start(&Peer::Builtin(PeerId::Splicegate), env, false)?;
            let Route::Proxy { addr, auth, .. } = running.route(Want::Socks5) else {
                bail!("splicegate started without a proxy address");
            };
            Started {
                proxy: Some((addr, auth)),
                measured: running.measured,
                _running: Some(running),
                _dante: None,
            }
        }
        Via::Dante => {
            let d = Dante::start(env)?;
            Started {
                proxy: Some((d.addr, None)),
                measured: Some(ProcTree { root: d.child.id() }),
                _running: None,
                _dante: Some(d),
            }
        }
        Via::External {
            addr, auth, pid, ..
        } => Started {
            proxy: Some((*addr, auth.clone())),
            measured: pid.map(|root| ProcTree { root }),
            _running: None,
            _dante: None,
        },
    })
}

/// How many ports Dante is tried on: it cannot bind port 0 and say which
/// port it got, so a port free when picked may be taken when it binds.
const PORT_ATTEMPTS: usize = 5;

/// `danted -N 1` in the foreground on 127.0.0.1 (a free port, retried),
/// pinned to the proxy's CPUs, serving CONNECT and UDP ASSOCIATE.
struct Dante {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Dante {
    fn start(env: &Env) -> Result<Dante> {
        let bin = peers::find_program("danted")
            .ok_or_else(|| anyhow!("danted is not installed (apt-get install dante-server)"))?;
        let root = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .map(|v| v.split_whitespace().next() == Some("0"))
            })
            .unwrap_or(false);
        let users = if root {
            "user.privileged: root\nuser.unprivileged: nobody\n"
        } else {
            ""
        };
        let mut why = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = listener(0)?.local_addr()?.port();
            let dir = env.tmp.join(format!("dante-udp-{port}"));
            std::fs::create_dir_all(&dir)?;
            let conf = dir.join("danted.conf");
            std::fs::write(
                &conf,
                format!(
                    "logoutput: stderr\n\
                     internal: 127.0.0.1 port = {port}\n\
                     external: 127.0.0.1\n\
                     clientmethod: none\n\
                     socksmethod: none\n\
                     {users}\
                     timeout.negotiate: 10\n\
                     timeout.io: 600\n\
                     client pass {{\n from: 127.0.0.0/8 to: 0.0.0.0/0\n log: error\n}}\n\
                     socks pass {{\n from: 127.0.0.0/8 to: 0.0.0.0/0\n command: connect udpassociate\n log: error\n}}\n\
                     socks pass {{\n from: 0.0.0.0/0 to: 127.0.0.0/8\n command: udpreply\n log: error\n}}\n"
                ),
            )?;
            let log = std::fs::File::create(dir.join("danted.log"))?;
            let mut cmd = match (env.proxy_cpus.as_deref(), peers::find_program("taskset")) {
                (Some(c), Some(ts)) => {
                    let mut cmd = Command::new(ts);
                    cmd.arg("-c").arg(c).arg(&bin);
                    cmd
                }
                _ => Command::new(&bin),
            };
            cmd.arg("-f")
                .arg(&conf)
                .args(["-N", "1"])
                .current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            let child = cmd.spawn().context("starting danted")?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut d = Dante { child, addr, dir };
            match d.wait_listening() {
                Ok(()) => return Ok(d),
                Err(e) => why = format!("{e:#}"),
            }
            // Dropping `d` stops it and removes its directory.
        }
        bail!("danted did not start on any of {PORT_ATTEMPTS} ports; the last: {why}")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("danted.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(6)..].join(" | ")
    }

    /// Until it accepts on its port (15 s at most), or it exits.
    fn wait_listening(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                bail!("danted exited ({st}): {}", self.log_tail());
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "danted did not listen on {} within 15 s: {}",
                    self.addr,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Dante {
    /// SIGTERM by PID, 5 s to exit, then SIGKILL; its children that outlive
    /// it are killed by their PIDs (when the PID still names them).
    fn drop(&mut self) {
        let pid = self.child.id();
        let family: Vec<(u32, Option<String>)> = ProcTree { root: pid }
            .pids()
            .into_iter()
            .skip(1)
            .map(|p| (p, comm(p)))
            .collect();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            eprintln!("  danted (pid {pid}) ignored SIGTERM for 5 s: SIGKILL");
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        for (p, name) in family {
            if name.is_some() && comm(p) == name {
                let _ = Command::new("kill")
                    .args(["-KILL", &p.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A UDP echo on 127.0.0.1: each datagram goes back to its sender as it
/// came. One thread, on the load generator's CPUs; it stops with the flag.
struct Echo {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start() -> Result<Echo> {
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the UDP echo")?;
        let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(4 << 20);
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let addr = sock.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("udp-echo".into())
            .spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !s.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            })?;
        Ok(Echo {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// State the load threads and the coordinator share.
struct Shared {
    stop: AtomicBool,
    measuring: AtomicBool,
    round_trips: AtomicU64,
    sent: AtomicU64,
    lost: AtomicU64,
    errors: AtomicU64,
    active: AtomicUsize,
    limit: u64,
    deadline: Instant,
    hists: Vec<Mutex<Histogram<u64>>>,
    first_error: Mutex<Option<String>>,
}

fn histogram() -> Histogram<u64> {
    // 1 ns .. 100 s at 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("static bounds")
}

impl Shared {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
            && self.round_trips.load(Ordering::Relaxed) < self.limit
            && Instant::now() < self.deadline
    }

    fn fail(&self, e: &anyhow::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut f) = self.first_error.lock() {
            f.get_or_insert_with(|| format!("{e:#}"));
        }
        // A failing proxy must not turn a loop into a spin.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The client side of one association: its TCP connection (kept for the
/// association's life), and a UDP socket connected to BND (or to the echo
/// for the direct path), with the header each datagram carries.
struct Assoc {
    _control: Option<TcpStream>,
    sock: UdpSocket,
    header: Vec<u8>,
}

/// RFC 1928 greeting, RFC 1929 username/password when `auth`, then UDP
/// ASSOCIATE for 0.0.0.0:0; the reply's BND (0.0.0.0 means the proxy's
/// address).
fn associate(
    proxy: SocketAddr,
    auth: Option<&Auth>,
    io: Duration,
) -> Result<(TcpStream, SocketAddr)> {
    let mut s = dial(proxy, None, io)?;
    let method = if auth.is_some() { 2u8 } else { 0u8 };
    s.write_all(&[5, 1, method])?;
    let mut r = [0u8; 2];
    s.read_exact(&mut r).context("reading the SOCKS5 method")?;
    if r != [5, method] {
        bail!("SOCKS5 method refused: {r:?}");
    }
    if let Some(a) = auth {
        let (u, p) = (a.user.as_bytes(), a.pass.as_bytes());
        if u.len() > 255 || p.len() > 255 {
            bail!("SOCKS5 credentials longer than 255 bytes");
        }
        let mut m = vec![1, u.len() as u8];
        m.extend_from_slice(u);
        m.push(p.len() as u8);
        m.extend_from_slice(p);
        s.write_all(&m)?;
        s.read_exact(&mut r)
            .context("reading the SOCKS5 auth reply")?;
        if r != [1, 0] {
            bail!("SOCKS5 authentication refused: {r:?}");
        }
    }
    s.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0])?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head)
        .context("reading the UDP ASSOCIATE reply")?;
    if head[1] != 0 {
        bail!("UDP ASSOCIATE refused: reply {}", head[1]);
    }
    let ip: IpAddr = match head[3] {
        1 => {
            let mut a = [0u8; 4];
            s.read_exact(&mut a)?;
            IpAddr::from(a)
        }
        4 => {
            let mut a = [0u8; 16];
            s.read_exact(&mut a)?;
            IpAddr::from(a)
        }
        t => bail!("UDP ASSOCIATE reply with address type {t}"),
    };
    let mut p = [0u8; 2];
    s.read_exact(&mut p)?;
    let ip = if ip.is_unspecified() { proxy.ip() } else { ip };
    Ok((s, SocketAddr::new(ip, u16::from_be_bytes(p))))
}

impl Assoc {
    fn open(
        proxy: Option<&(SocketAddr, Option<Auth>)>,
        echo: SocketAddr,
        io: Duration,
    ) -> Result<Assoc> {
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(1 << 20);
        // Short, so lost datagrams are noticed and the window refilled.
        sock.set_read_timeout(Some(Duration::from_millis(20)))?;
        sock.set_write_timeout(Some(io))?;
        let Some((addr, auth)) = proxy else {
            sock.connect(echo)?;
            return Ok(Assoc {
                _control: None,
                sock,
                header: Vec::new(),
            });
        };
        let (control, bnd) = associate(*addr, auth.as_ref(), io)?;
        sock.connect(bnd)?;
        let SocketAddr::V4(e) = echo else {
            bail!("the echo is IPv4");
        };
        let mut header = vec![0, 0, 0, 1];
        header.extend_from_slice(&e.ip().octets());
        header.extend_from_slice(&e.port().to_be_bytes());
        Ok(Assoc {
            _control: Some(control),
            sock,
            header,
        })
    }

    /// Where the payload starts in an answer (the RFC's header skipped).
    fn payload_at(&self, d: &[u8]) -> Option<usize> {
        if self.header.is_empty() {
            return Some(0);
        }
        let at = match d.get(3)? {
            1 => 10,
            4 => 22,
            3 => 7 + usize::from(*d.get(4)?),
            _ => return None,
        };
        (d.len() >= at).then_some(at)
    }
}

/// One association's closed loop: keep `window` datagrams of `size` payload
/// bytes outstanding; each answer (matched by the sequence number in its
/// first 8 bytes) records its round trip and sends the next.
fn worker(
    i: usize,
    cell: Cell,
    proxy: Option<&(SocketAddr, Option<Auth>)>,
    echo: SocketAddr,
    sh: &Shared,
    io: Duration,
    loss: Duration,
) {
    let mut buf = vec![0u8; 65536 + 64];
    while sh.running() {
        let a = match Assoc::open(proxy, echo, io) {
            Ok(a) => a,
            Err(e) => {
                sh.fail(&e.context("associating"));
                continue;
            }
        };
        let mut out = a.header.clone();
        let at = out.len();
        out.resize(at + cell.size.max(16), 0x5a);
        let mut seq = 0u64;
        let mut outstanding: VecDeque<(u64, Instant)> = VecDeque::with_capacity(cell.window);
        let mut broken = None;
        while sh.running() && broken.is_none() {
            while outstanding.len() < cell.window.max(1) {
                seq += 1;
                out[at..at + 8].copy_from_slice(&seq.to_be_bytes());
                match a.sock.send(&out) {
                    Ok(_) => {
                        outstanding.push_back((seq, Instant::now()));
                        if sh.measuring.load(Ordering::Relaxed) {
                            sh.sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        broken = Some(anyhow!(e).context("sending a datagram"));
                        break;
                    }
                }
            }
            match a.sock.recv(&mut buf) {
                Ok(n) => {
                    let got = a
                        .payload_at(&buf[..n])
                        .filter(|p| n >= p + 8)
                        .map(|p| u64::from_be_bytes(buf[p..p + 8].try_into().unwrap_or([0; 8])));
                    if let Some(s) = got
                        && let Some(k) = outstanding.iter().position(|(q, _)| *q == s)
                        && let Some((_, t)) = outstanding.remove(k)
                    {
                        if sh.measuring.load(Ordering::Relaxed)
                            && let Ok(mut h) = sh.hists[i % sh.hists.len()].lock()
                        {
                            h.saturating_record(t.elapsed().as_nanos().max(1) as u64);
                        }
                        sh.round_trips.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => broken = Some(anyhow!(e).context("receiving a datagram")),
            }
            // Datagrams not back in time are lost; their slots go again.
            let now = Instant::now();
            while outstanding
                .front()
                .is_some_and(|(_, t)| now.duration_since(*t) > loss)
            {
                outstanding.pop_front();
                if sh.measuring.load(Ordering::Relaxed) {
                    sh.lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if let Some(e) = broken {
            sh.fail(&e);
        }
    }
}

/// Per-process CPU ticks (utime + stime) of a tree, to tell how many of
/// its processes worked in a window.
fn own_ticks(tree: ProcTree) -> BTreeMap<u32, u64> {
    tree.pids()
        .into_iter()
        .filter_map(|pid| {
            let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let rest = text.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
            Some((pid, n(11)? + n(12)?))
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    cell: Cell,
    via: &Via,
    env: &Env,
    echo: SocketAddr,
    c: &crate::Common,
    max_ops: u64,
    loss: Duration,
    label: &str,
) -> UdpRun {
    let mut r = UdpRun {
        cell: cell.id(),
        via: via.name(),
        ..UdpRun::default()
    };
    let started = match start(via, env) {
        Ok(s) => s,
        Err(e) => {
            r.error = Some(format!("start: {e:#}"));
            return r;
        }
    };
    let io = Duration::from_millis(c.io_timeout_ms.max(10));
    let warmup = Duration::from_secs_f64(c.warmup.max(0.0));
    let measure = Duration::from_secs_f64(c.seconds);
    let sh = Shared {
        stop: AtomicBool::new(false),
        measuring: AtomicBool::new(false),
        round_trips: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        active: AtomicUsize::new(0),
        limit: max_ops,
        deadline: Instant::now() + warmup + measure + Duration::from_secs(5),
        hists: (0..cell.assocs.max(1))
            .map(|_| Mutex::new(histogram()))
            .collect(),
        first_error: Mutex::new(None),
    };
    let sh = &sh;
    let proxy = started.proxy.as_ref();
    std::thread::scope(|sc| {
        for i in 0..cell.assocs.max(1) {
            sh.active.fetch_add(1, Ordering::SeqCst);
            let spawned = std::thread::Builder::new()
                .name(format!("udp-load-{i}"))
                .stack_size(256 * 1024)
                .spawn_scoped(sc, move || {
                    worker(i, cell, proxy, echo, sh, io, loss);
                    sh.active.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                sh.active.fetch_sub(1, Ordering::SeqCst);
                r.error = Some(format!("spawning load thread {i}: {e}"));
                sh.stop.store(true, Ordering::SeqCst);
                return;
            }
        }
        let count = || sh.round_trips.load(Ordering::Relaxed);
        let warm_end = Instant::now() + warmup;
        while Instant::now() < warm_end && sh.active.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        if count() == 0 && sh.errors.load(Ordering::Relaxed) > 0 {
            sh.stop.store(true, Ordering::SeqCst);
            return;
        }
        let tree = started.measured;
        let c0 = count();
        let others0 = Others::now();
        let steal0 = steal_ticks();
        let s0 = tree.and_then(|p| p.sample().ok());
        let t0_procs = tree.map(own_ticks);
        sh.measuring.store(true, Ordering::SeqCst);
        let t0 = Instant::now();
        let end = t0 + measure;
        let (mut last_c, mut last_t) = (c0, t0);
        loop {
            let now = Instant::now();
            if now >= end || sh.active.load(Ordering::SeqCst) == 0 || !sh.running() {
                break;
            }
            std::thread::sleep((end - now).min(Duration::from_secs(1)));
            if c.quiet {
                continue;
            }
            let (cn, t) = (count(), Instant::now());
            let cpu = match (s0, tree.and_then(|p| p.sample().ok())) {
                (Some(a), Some(b)) => format!(
                    "  proxy CPU {:.0} %",
                    (b.cpu_s - a.cpu_s) / (t - t0).as_secs_f64() * 100.0
                ),
                _ => String::new(),
            };
            eprintln!(
                "  [{label}] {:>4.1}s  {:.0} datagrams/s  lost {}  errors {}{cpu}",
                (t - t0).as_secs_f64(),
                2.0 * (cn - last_c) as f64 / (t - last_t).as_secs_f64().max(1e-9),
                sh.lost.load(Ordering::Relaxed),
                sh.errors.load(Ordering::Relaxed),
            );
            (last_c, last_t) = (cn, t);
        }
        let c1 = count();
        let s1 = tree.and_then(|p| p.sample().ok());
        let t1_procs = tree.map(own_ticks);
        let secs = t0.elapsed().as_secs_f64();
        r.others_cpu_pct = Others::now().since(&others0) / secs.max(1e-9) * 100.0;
        r.steal_pct = steal_s(steal0, steal_ticks()).map(|s| s / secs.max(1e-9) * 100.0);
        sh.measuring.store(false, Ordering::SeqCst);
        sh.stop.store(true, Ordering::SeqCst);
        r.secs = secs;
        r.round_trips = c1 - c0;
        r.datagrams = 2 * r.round_trips;
        r.datagrams_per_s = r.datagrams as f64 / secs.max(1e-9);
        r.ok = r.round_trips > 0;
        if let (Some(a), Some(b)) = (s0, s1) {
            let cpu = (b.cpu_s - a.cpu_s).max(0.0);
            r.cpu_s = Some(cpu);
            r.proxy_cpu_pct = Some(cpu / secs.max(1e-9) * 100.0);
            if r.datagrams > 0 {
                r.cpu_s_per_million = Some(cpu / (r.datagrams as f64 / 1e6));
            }
            if cpu > 0.0 {
                r.datagrams_per_cpu_s = Some(r.datagrams as f64 / cpu);
            }
            r.procs = Some(b.procs);
            r.threads = Some(b.threads);
        }
        if let (Some(a), Some(b)) = (t0_procs, t1_procs) {
            r.busy_procs = Some(
                b.iter()
                    .filter(|(pid, t)| **t > a.get(pid).copied().unwrap_or(0))
                    .count() as u64,
            );
        }
    });
    sh.stop.store(true, Ordering::SeqCst);
    r.sent = sh.sent.load(Ordering::Relaxed);
    r.lost = sh.lost.load(Ordering::Relaxed);
    r.errors = sh.errors.load(Ordering::Relaxed);
    let mut all = histogram();
    for h in &sh.hists {
        if let Ok(h) = h.lock() {
            let _ = all.add(&*h);
        }
    }
    if !all.is_empty() {
        let us = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
        r.latency_us = Some(Latency {
            p50: us(0.5),
            p90: us(0.9),
            p99: us(0.99),
            p999: us(0.999),
            max: all.max() as f64 / 1000.0,
            count: all.len(),
        });
    }
    if r.error.is_none() {
        r.error = sh.first_error.lock().ok().and_then(|f| f.clone());
    }
    if !r.ok && r.error.is_none() {
        r.error = Some("no round trip completed in the window".into());
    }
    drop(started);
    r
}

fn summarize(cells: &[Cell], vias: &[Via], runs: &[UdpRun]) -> (Vec<Summary>, Vec<Ratio>) {
    let mut out = Vec::new();
    let mut ratios = Vec::new();
    for cell in cells {
        let id = cell.id();
        let direct_p99 = |round: usize| {
            runs.iter()
                .find(|r| r.cell == id && r.via == "direct" && r.round == round && r.ok)
                .and_then(|r| r.latency_us.map(|l| l.p99))
        };
        for via in vias {
            let name = via.name();
            let mine: Vec<&UdpRun> = runs
                .iter()
                .filter(|r| r.cell == id && r.via == name)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let ok: Vec<&UdpRun> = mine.iter().copied().filter(|r| r.ok).collect();
            let m = |f: &dyn Fn(&UdpRun) -> Option<f64>| {
                median(ok.iter().filter_map(|r| f(r)).collect())
            };
            let rates: Vec<f64> = ok.iter().map(|r| r.datagrams_per_s).collect();
            let cpus: Vec<f64> = ok.iter().filter_map(|r| r.cpu_s_per_million).collect();
            out.push(Summary {
                cell: id.clone(),
                via: name.clone(),
                rounds_ok: ok.len(),
                datagrams_per_s: median(rates.clone()),
                datagrams_per_s_min: rates.iter().copied().reduce(f64::min),
                datagrams_per_s_max: rates.iter().copied().reduce(f64::max),
                cpu_s_per_million: median(cpus.clone()),
                cpu_min: cpus.iter().copied().reduce(f64::min),
                cpu_max: cpus.iter().copied().reduce(f64::max),
                datagrams_per_cpu_s: m(&|r| r.datagrams_per_cpu_s),
                p50_us: m(&|r| r.latency_us.map(|l| l.p50)),
                p99_us: m(&|r| r.latency_us.map(|l| l.p99)),
                added_p99_us: (name != "direct")
                    .then(|| m(&|r| Some(r.latency_us?.p99 - direct_p99(r.round)?)))
                    .flatten(),
                lost: ok.iter().map(|r| r.lost).sum(),
                sent: ok.iter().map(|r| r.sent).sum(),
                errors: mine.iter().map(|r| r.errors).sum(),
                proxy_cpu_pct: m(&|r| r.proxy_cpu_pct),
                procs: m(&|r| r.procs.map(|v| v as f64)),
                busy_procs: m(&|r| r.busy_procs.map(|v| v as f64)),
                others_cpu_pct_max: mine.iter().map(|r| r.others_cpu_pct).reduce(f64::max),
                steal_pct_max: mine.iter().filter_map(|r| r.steal_pct).reduce(f64::max),
                note: mine.iter().find_map(|r| r.error.clone()),
            });
        }
        let of = |name: &str| out.iter().find(|s| s.cell == id && s.via == name);
        if let (Some(sg), Some(d)) = (of("splicegate"), of("dante"))
            && let (Some(a), Some(b)) = (sg.datagrams_per_cpu_s, d.datagrams_per_cpu_s)
        {
            let per_round = |round: usize, name: &str| {
                runs.iter()
                    .find(|r| r.cell == id && r.via == name && r.round == round && r.ok)
                    .and_then(|r| r.datagrams_per_cpu_s)
            };
            let rounds = runs.iter().map(|r| r.round).max().map_or(0, |m| m + 1);
            let paired: Vec<f64> = (0..rounds)
                .filter_map(|k| Some(per_round(k, "splicegate")? / per_round(k, "dante")?))
                .collect();
            ratios.push(Ratio {
                cell: id.clone(),
                of_medians: a / b,
                paired_median: median(paired.clone()).unwrap_or(f64::NAN),
                paired_min: paired.iter().copied().reduce(f64::min).unwrap_or(f64::NAN),
                paired_max: paired.iter().copied().reduce(f64::max).unwrap_or(f64::NAN),
            });
        }
    }
    (out, ratios)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

pub(crate) fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v.round());
    let (neg, digits) = s
        .strip_prefix('-')
        .map_or((false, s.as_str()), |d| (true, d));
    let mut out = String::new();
    for (k, ch) in digits.chars().enumerate() {
        if k > 0 && (digits.len() - k) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if neg { format!("-{out}") } else { out }
}

/// How, where and when.
#[derive(Debug, Serialize)]
struct Meta {
    command: String,
    started: String,
    finished: String,
    host: String,
    cpu_model: String,
    cpus: usize,
    load_before: String,
    load_after: String,
    pinning: String,
    rounds: usize,
    warmup_s: f64,
    window_s: f64,
    workers: usize,
    assocs: usize,
    loss_ms: u64,
    vias: Vec<(String, String, String)>,
}

fn markdown(meta: &Meta, cells: &[Cell], sums: &[Summary], ratios: &[Ratio]) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "# splicegate-bench udp: SOCKS5 UDP ASSOCIATE\n");
    let _ = writeln!(t, "- command: `{}`", meta.command);
    let _ = writeln!(t, "- {} → {}", meta.started, meta.finished);
    let _ = writeln!(
        t,
        "- host: {}, {} ({} CPUs); load average before {}, after {}",
        meta.host, meta.cpu_model, meta.cpus, meta.load_before, meta.load_after
    );
    let _ = writeln!(t, "- pinning: {}", meta.pinning);
    let _ = writeln!(
        t,
        "- {} rounds × ({} s warm-up + {} s measured); {} associations per run, one load thread \
         each; a datagram not back within {} ms is lost; splicegate {} worker(s)",
        meta.rounds, meta.warmup_s, meta.window_s, meta.assocs, meta.loss_ms, meta.workers
    );
    for (name, what, version) in &meta.vias {
        let _ = writeln!(
            t,
            "- `{name}`: {what}{}",
            if version.is_empty() {
                String::new()
            } else {
                format!(" ({version})")
            }
        );
    }
    let _ = writeln!(
        t,
        "\nDatagrams: relayed by the proxy, 2 per round trip (up and down), only round trips \
         that came back. CPU: the proxy's process tree, utime + stime over the window. Medians \
         over the rounds, min–max in brackets; added p99 = the run's p99 minus the direct path's \
         p99 in the same round, median over rounds.\n"
    );
    for cell in cells {
        let id = cell.id();
        let _ = writeln!(
            t,
            "## {id}: {} associations × {} outstanding, {}-byte payloads\n",
            cell.assocs, cell.window, cell.size
        );
        let _ = writeln!(
            t,
            "| via | datagrams/s | proxy CPU-s per 10^6 datagrams | datagrams per CPU-s | p50 µs | p99 µs | added p99 µs | lost / sent | proxy CPU % | processes (busy) | others' CPU % max | steal % max |"
        );
        let _ = writeln!(
            t,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for s in sums.iter().filter(|s| s.cell == id) {
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} |",
                s.via,
                match (
                    s.datagrams_per_s,
                    s.datagrams_per_s_min,
                    s.datagrams_per_s_max
                ) {
                    (Some(m), Some(lo), Some(hi)) => {
                        format!("{} ({}–{})", thousands(m), thousands(lo), thousands(hi))
                    }
                    _ => "–".into(),
                },
                match (s.cpu_s_per_million, s.cpu_min, s.cpu_max) {
                    (Some(m), Some(lo), Some(hi)) => format!("{m:.2} ({lo:.2}–{hi:.2})"),
                    _ => "–".into(),
                },
                s.datagrams_per_cpu_s.map_or("–".into(), thousands),
                opt(s.p50_us, 0),
                opt(s.p99_us, 0),
                opt(s.added_p99_us, 0),
                s.lost,
                s.sent,
                opt(s.proxy_cpu_pct, 0),
                match (s.procs, s.busy_procs) {
                    (Some(p), Some(b)) => format!("{p:.0} ({b:.0})"),
                    _ => "–".into(),
                },
                opt(s.others_cpu_pct_max, 0),
                opt(s.steal_pct_max, 1),
            );
        }
        for s in sums.iter().filter(|s| s.cell == id) {
            if let Some(n) = &s.note {
                let _ = writeln!(t, "\n- {}: {n}", s.via);
            }
        }
        if let Some(r) = ratios.iter().find(|r| r.cell == id) {
            let _ = writeln!(
                t,
                "\nsplicegate / Dante, datagrams per CPU-second: **{:.2}** (medians); paired \
                 round by round {:.2} ({:.2}–{:.2}); goal ≥ 2: {}\n",
                r.of_medians,
                r.paired_median,
                r.paired_min,
                r.paired_max,
                if r.of_medians >= 2.0 {
                    "met"
                } else {
                    "**not met**"
                }
            );
        } else {
            let _ = writeln!(t);
        }
    }
    t
}

/// `splicegate-bench udp`: every cell against every way, round by round.
pub(crate) fn main(a: UdpArgs) -> Result<()> {
    let c = &a.common;
    if c.seconds <= 0.0 || c.rounds == 0 {
        bail!("--seconds and --rounds must be positive");
    }
    if a.sizes.iter().any(|&s| s < 16) {
        bail!("--size: at least 16 bytes (a sequence number and room)");
    }
    let vias: Vec<Via> = a
        .via
        .iter()
        .map(|s| Via::parse(s, a.pid))
        .collect::<Result<_>>()?;
    let cells: Vec<Cell> = a
        .sizes
        .iter()
        .flat_map(|&size| {
            a.windows.iter().map(move |&window| Cell {
                size,
                window: window.max(1),
                assocs: a.assocs.max(1),
            })
        })
        .collect();
    crate::raise_nofile();
    let pinning = crate::pin(c);
    let echo = Echo::start()?;
    let tmp = std::env::temp_dir().join(format!("splicegate-bench-udp-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let env = Env {
        targets: Targets::start(c.body_bytes)?,
        gateway: c.gateway.clone(),
        proxy_cpus: pinning.proxy.clone(),
        load_cpus: pinning.load.clone(),
        all_cpus: pinning.all.clone(),
        workers: c.workers.max(1),
        nodes: 1,
        tmp: tmp.clone(),
        pki: None,
        agent: c.agent.clone(),
        rathole: c.rathole.clone(),
    };
    let loss = Duration::from_millis(a.loss_ms.max(1));
    let runs_n = cells.len() * vias.len() * c.rounds;
    eprintln!(
        "splicegate-bench udp: {} cells × {} ways × {} rounds, about {:.0} s; pinning: {}",
        cells.len(),
        vias.len(),
        c.rounds,
        runs_n as f64 * (c.warmup + c.seconds + 1.0),
        pinning.text
    );
    let started = crate::now();
    let load_before = report::load_average();
    let mut runs = Vec::new();
    for round in 0..c.rounds {
        for cell in &cells {
            let mut order: Vec<&Via> = vias.iter().collect();
            let k = round % order.len().max(1);
            order.rotate_left(k);
            for via in order {
                let label = format!("r{}/{} {} {}", round + 1, c.rounds, cell.id(), via.name());
                if !c.quiet {
                    eprintln!("{label}");
                }
                let mut r = run_one(*cell, via, &env, echo.addr, c, a.max_ops, loss, &label);
                r.round = round;
                match &r.error {
                    Some(e) => {
                        eprintln!("  [{label}] {}: {e}", if r.ok { "note" } else { "FAILED" })
                    }
                    None if !c.quiet => eprintln!(
                        "  [{label}] {:.0} datagrams/s, {} CPU-s per 10^6, p99 {} µs{}{}",
                        r.datagrams_per_s,
                        opt(r.cpu_s_per_million, 2),
                        opt(r.latency_us.map(|l| l.p99), 0),
                        if r.others_cpu_pct >= 5.0 {
                            format!(" (other programs: {:.0} % of a CPU)", r.others_cpu_pct)
                        } else {
                            String::new()
                        },
                        r.steal_pct
                            .filter(|&p| p >= 1.0)
                            .map_or(String::new(), |p| format!(" (steal: {p:.1} % of a CPU)"))
                    ),
                    None => {}
                }
                runs.push(r);
            }
        }
    }
    let (sums, ratios) = summarize(&cells, &vias, &runs);
    let meta = Meta {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started,
        finished: crate::now(),
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
        rounds: c.rounds,
        warmup_s: c.warmup,
        window_s: c.seconds,
        workers: env.workers,
        assocs: a.assocs,
        loss_ms: a.loss_ms,
        vias: vias
            .iter()
            .map(|v| {
                let version = match v {
                    Via::Dante => peers::version(&Peer::Builtin(PeerId::Dante), &env),
                    Via::Splicegate => peers::version(&Peer::Builtin(PeerId::Splicegate), &env),
                    _ => String::new(),
                };
                (v.name(), v.describe(env.workers), version)
            })
            .collect(),
    };
    let _ = std::fs::remove_dir_all(&tmp);
    drop(echo);
    let md = markdown(&meta, &cells, &sums, &ratios);
    let json = serde_json::json!({
        "meta": meta,
        "cells": cells,
        "summaries": sums,
        "ratios": ratios,
        "runs": runs,
    });
    if let Some(dir) = &c.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_file(&dir.join("report.md"), &md)?;
        write_file(
            &dir.join("results.json"),
            &serde_json::to_string_pretty(&json)?,
        )?;
        eprintln!("report: {}", dir.join("report.md").display());
    }
    if c.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!("{md}");
    }
    Ok(())
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ways_parse() {
        assert!(matches!(Via::parse("dante", None), Ok(Via::Dante)));
        assert!(matches!(
            Via::parse("socks5://u:p@127.0.0.1:1080", Some(7)),
            Ok(Via::External { pid: Some(7), .. })
        ));
        assert!(Via::parse("connect://127.0.0.1:1", None).is_err());
        assert!(Via::parse("squid", None).is_err());
    }

    #[test]
    fn numbers_read() {
        assert_eq!(thousands(1_234_567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
    }

    /// The load loop against the echo alone: round trips come back and
    /// none is lost (bounded: 300 ms).
    #[test]
    fn the_loop_runs_against_the_echo() {
        let echo = Echo::start().unwrap();
        let cell = Cell {
            size: 64,
            window: 4,
            assocs: 1,
        };
        let sh = Shared {
            stop: AtomicBool::new(false),
            measuring: AtomicBool::new(true),
            round_trips: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            limit: 1000,
            deadline: Instant::now() + Duration::from_millis(300),
            hists: vec![Mutex::new(histogram())],
            first_error: Mutex::new(None),
        };
        let io = Duration::from_secs(1);
        worker(0, cell, None, echo.addr, &sh, io, Duration::from_secs(1));
        assert!(sh.round_trips.load(Ordering::Relaxed) > 0);
        assert_eq!(sh.errors.load(Ordering::Relaxed), 0);
        assert_eq!(sh.lost.load(Ordering::Relaxed), 0);
    }
}
