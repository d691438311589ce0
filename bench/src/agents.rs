//! Idle agents: how much a connected, idle device costs the gateway.
//!
//! `agents-idle` starts splicegate with `[agents]` and N `agent` nodes,
//! then connects N devices to it from `--procs` load processes (this binary
//! again, as the hidden `agent-swarm` command: a process may open 20,000
//! files, and the gateway holds one socket per device too). Each device of
//! the swarm speaks the real protocol: TCP, TLS 1.3 (rustls, ALPN
//! `splicegate-agent/1`, the gateway verified), `HELLO` with its id and
//! key, the gateway's `WELCOME`, then the link driver the devices run
//! (`splicegate_agent::link`, role device): it answers the gateway's pings
//! and sends its own every `heartbeat_s`, as a real device does. One real
//! `splicegate-agent` process connects too, for the device's own idle
//! memory. The gateway's RSS is read before the first device and after
//! all are connected and settled; its CPU over a held window of idle
//! devices is the heartbeat cost.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use splicegate_agent::link::{self, Config, Role};
use splicegate_proto::agent::{Frame, VERSION};

use crate::peers::{self, free_port, local};
use crate::procstat::{Others, ProcTree, Sample};
use crate::tls::{Pki, SERVER_NAME};

/// What the swarm command takes.
#[derive(Debug, Clone)]
pub(crate) struct SwarmArgs {
    pub gateway: SocketAddr,
    pub ca: PathBuf,
    /// Devices `a{first}` .. `a{first + count - 1}`, key [`key_of`].
    pub first: usize,
    pub count: usize,
    /// Connections being set up at once.
    pub conc: usize,
    /// The most the swarm lives, whatever its parent does.
    pub max_seconds: u64,
}

/// Node id of device `i`.
fn id_of(i: usize) -> String {
    format!("a{i}")
}

/// Key of device `i`.
fn key_of(i: usize) -> String {
    format!("bench-agent-{i}-key")
}

fn client_config(ca: &Path) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).context("the CA file")? {
        roots.add(c.context("the CA file")?)?;
    }
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    c.alpn_protocols = vec![splicegate_agent::ALPN.to_vec()];
    Ok(c)
}

/// Counts the swarm reports.
#[derive(Default)]
struct Counts {
    connected: AtomicUsize,
    failed: AtomicUsize,
    lost: AtomicUsize,
    first_error: std::sync::Mutex<Option<String>>,
}

/// One device: TCP, TLS, hello, welcome; then the link runs until it ends.
async fn device(
    i: usize,
    a: &SwarmArgs,
    tls: &tokio_rustls::TlsConnector,
) -> Result<(
    link::Link,
    tokio::sync::mpsc::Receiver<link::Incoming>,
    tokio::task::JoinHandle<String>,
)> {
    let io = Duration::from_secs(10);
    let tcp = tokio::time::timeout(io, tokio::net::TcpStream::connect(a.gateway))
        .await
        .map_err(|_| anyhow!("connect timed out"))??;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(SERVER_NAME)?;
    let mut s = tokio::time::timeout(io, tls.connect(name, tcp))
        .await
        .map_err(|_| anyhow!("TLS handshake timed out"))??;
    let (id, key) = (id_of(i), key_of(i));
    let hello = link::fields(&[
        ("id", &id),
        ("key", &key),
        ("software", "splicegate-bench/agent-swarm"),
        ("max_streams", "64"),
    ]);
    link::write_frame(
        &mut s,
        Frame::Hello {
            version: VERSION,
            fields: hello.fields(),
        },
    )
    .await?;
    let mut buf = Vec::new();
    let answer = tokio::time::timeout(io, link::read_frame(&mut s, &mut buf))
        .await
        .map_err(|_| anyhow!("no answer to the hello"))??;
    let heartbeat = match splicegate_proto::agent::decode(&answer) {
        Ok(Some((Frame::Welcome { fields, .. }, _))) => fields
            .get("heartbeat_s")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(25),
        Ok(Some((Frame::Refuse { text, .. }, _))) => bail!("refused: {text}"),
        other => bail!("unexpected answer: {other:?}"),
    };
    let config = Config {
        role: Role::Device,
        heartbeat: Duration::from_secs(heartbeat.max(1)),
        max_streams: 64,
        rate: None,
    };
    Ok(link::spawn(s, buf, config))
}

/// The hidden `agent-swarm` command: `count` devices connected and held
/// until stdin closes (or `max_seconds`). Prints `ready CONNECTED FAILED`
/// once every device tried, and `end CONNECTED LOST FAILED` at the end.
pub(crate) fn swarm(a: SwarmArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client_config(&a.ca)?));
    let counts = Arc::new(Counts::default());
    let stdin_closed = Arc::new(AtomicBool::new(false));
    {
        let flag = stdin_closed.clone();
        std::thread::spawn(move || {
            let mut sink = String::new();
            let stdin = std::io::stdin();
            while stdin.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
            flag.store(true, Ordering::SeqCst);
        });
    }
    let deadline = Instant::now() + Duration::from_secs(a.max_seconds);
    rt.block_on(async {
        let a = Arc::new(a);
        let sem = Arc::new(tokio::sync::Semaphore::new(a.conc.max(1)));
        let mut held = Vec::with_capacity(a.count);
        for i in a.first..a.first + a.count {
            let permit = sem.clone().acquire_owned().await?;
            let (a, tls, counts) = (a.clone(), tls.clone(), counts.clone());
            held.push(tokio::spawn(async move {
                let r = device(i, &a, &tls).await;
                drop(permit);
                match r {
                    Ok((link, incoming, task)) => {
                        counts.connected.fetch_add(1, Ordering::SeqCst);
                        let _why = task.await;
                        counts.lost.fetch_add(1, Ordering::SeqCst);
                        drop((link, incoming));
                    }
                    Err(e) => {
                        counts.failed.fetch_add(1, Ordering::SeqCst);
                        if let Ok(mut f) = counts.first_error.lock() {
                            f.get_or_insert_with(|| format!("{e:#}"));
                        }
                    }
                }
            }));
        }
        while counts.connected.load(Ordering::SeqCst) + counts.failed.load(Ordering::SeqCst)
            < a.count
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let first = counts
            .first_error
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .unwrap_or_default();
        println!(
            "ready {} {} {first}",
            counts.connected.load(Ordering::SeqCst),
            counts.failed.load(Ordering::SeqCst)
        );
        let _ = std::io::stdout().flush();
        while !stdin_closed.load(Ordering::SeqCst) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "end {} {} {}",
            counts.connected.load(Ordering::SeqCst),
            counts.lost.load(Ordering::SeqCst),
            counts.failed.load(Ordering::SeqCst)
        );
        let _ = std::io::stdout().flush();
        anyhow::Ok(())
    })?;
    // Leave without closing thousands of links one by one.
    std::process::exit(0);
}

/// What `agents-idle` takes.
#[derive(Debug, Clone)]
pub(crate) struct IdleOpts {
    pub agents: usize,
    pub procs: usize,
    pub heartbeat_s: u64,
    pub hold_s: f64,
    pub settle_s: f64,
    pub rounds: usize,
    pub open_s: u64,
    pub conc: usize,
    pub gateway: PathBuf,
    pub agent: PathBuf,
    pub proxy_cpus: Option<String>,
    pub load_cpus: Option<String>,
    pub out: Option<PathBuf>,
}

/// One round's figures.
#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct IdleRound {
    /// Swarm devices connected, and still connected at the end.
    pub connected: usize,
    pub failed: usize,
    pub lost: usize,
    /// Every device held at the end, the real agent included.
    pub held: usize,
    pub open_s: f64,
    pub base: Sample,
    pub settled: Sample,
    pub end: Sample,
    /// (settled RSS − base RSS) / held.
    pub kib_per_agent: f64,
    /// The gateway's CPU over the hold.
    pub hold_s: f64,
    pub cpu_s: f64,
    pub cpu_pct: f64,
    /// CPU per device per heartbeat interval: the gateway sends one ping,
    /// answers one, per device per interval.
    pub cpu_us_per_agent_heartbeat: f64,
    /// The gateway's CPU while the devices connected (TLS handshakes).
    pub connect_cpu_s: f64,
    pub device_rss_kib: u64,
    pub device_hwm_kib: u64,
    pub device_cpu_s: f64,
    pub others_cpu_pct: f64,
    pub load_before: String,
}

fn cpus_cmd(cpus: Option<&str>, program: &Path) -> Command {
    match (cpus, peers::find_program("taskset")) {
        (Some(c), Some(ts)) => {
            let mut cmd = Command::new(ts);
            cmd.arg("-c").arg(c).arg(program);
            cmd
        }
        _ => Command::new(program),
    }
}

/// A process stopped by PID (SIGTERM, then SIGKILL after 5 s) when dropped.
struct Kid(Option<Child>);

impl Drop for Kid {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn round(o: &IdleOpts, r: usize, tmp: &Path) -> Result<IdleRound> {
    let dir = tmp.join(format!("round-{r}"));
    std::fs::create_dir_all(&dir)?;
    let pki = Pki::make(&dir)?;
    let (port, aport) = (free_port()?, free_port()?);
    let listen = local(aport);
    let mut conf = format!(
        "# splicegate-bench agents-idle: {n} agent nodes and one for a real device.\n\
         [proxy]\nlisten = \"{proxy}\"\nworkers = 1\npin_workers = false\n\
         [safety]\nallow_targets = [\"127.0.0.0/8\"]\n\
         [ebpf]\nsyn_rate = 0\n[log]\nlevel = \"warn\"\n{agents}\
         [[package]]\nid = 1\nkey = \"bench\"\n\
         [[node]]\nid = \"dev\"\nkind = \"agent\"\nkey = \"bench-device-key\"\ncountry = \"us\"\n",
        n = o.agents,
        proxy = local(port),
        agents = peers::agents_section_toml(listen, &pki, o.heartbeat_s),
    );
    for i in 0..o.agents {
        let _ = write!(
            conf,
            "[[node]]\nid = \"{}\"\nkind = \"agent\"\nkey = \"{}\"\ncountry = \"us\"\n",
            id_of(i),
            key_of(i)
        );
    }
    let conf_path = dir.join("splicegate.toml");
    std::fs::write(&conf_path, conf)?;
    let gw_path = std::fs::canonicalize(&o.gateway)
        .with_context(|| format!("{} not found (--gateway)", o.gateway.display()))?;
    let conf_s = conf_path.to_string_lossy().into_owned();
    let mut child = peers::spawn(
        "splicegate",
        &gw_path,
        &["serve", "--config", &conf_s],
        o.proxy_cpus.as_deref(),
        &dir,
    )?;
    let ready = peers::wait_ready("splicegate", &mut child, listen, &dir);
    let gw = Kid(Some(child));
    ready?;
    let tree = ProcTree {
        root: gw.0.as_ref().map(|c| c.id()).unwrap_or(0),
    };
    std::thread::sleep(Duration::from_secs(2));
    let load_before = crate::report::load_average();
    let base = tree.sample()?;
    // The real device, for its own idle RSS.
    let dev_key = dir.join("device.key");
    std::fs::write(&dev_key, "bench-device-key")?;
    let agent = std::fs::canonicalize(&o.agent)
        .with_context(|| format!("{} not found (--agent)", o.agent.display()))?;
    let dev_log = std::fs::File::create(dir.join("splicegate-agent.log"))?;
    let dev = Kid(Some(
        cpus_cmd(o.load_cpus.as_deref(), &agent)
            .arg("--gateway")
            .arg(listen.to_string())
            .args(["--id", "dev", "--key-file"])
            .arg(&dev_key)
            .arg("--ca")
            .arg(&pki.cert)
            .args(["--server-name", SERVER_NAME])
            .stdin(Stdio::null())
            .stdout(dev_log.try_clone()?)
            .stderr(dev_log)
            .spawn()
            .context("starting splicegate-agent")?,
    ));
    let dev_tree = ProcTree {
        root: dev.0.as_ref().map(|c| c.id()).unwrap_or(0),
    };
    // The swarm.
    let me = std::env::current_exe()?;
    let procs = o.procs.max(1);
    let per = o.agents.div_ceil(procs);
    let (tx, rx) = std::sync::mpsc::channel::<(usize, String)>();
    let mut swarms = Vec::new();
    let mut stdins = Vec::new();
    let opened_at = Instant::now();
    let cpu_before_connect = tree.sample()?.cpu_s;
    for p in 0..procs {
        let first = p * per;
        let count = per.min(o.agents.saturating_sub(first));
        if count == 0 {
            continue;
        }
        let mut c = cpus_cmd(o.load_cpus.as_deref(), &me)
            .args(["agent-swarm", "--gateway", &listen.to_string(), "--ca"])
            .arg(&pki.cert)
            .args([
                "--first",
                &first.to_string(),
                "--count",
                &count.to_string(),
                "--conc",
                &o.conc.to_string(),
                "--max-seconds",
                &(o.open_s as f64 + o.hold_s + o.settle_s + 120.0)
                    .ceil()
                    .to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join(format!("swarm-{p}.log")))?)
            .spawn()
            .context("starting an agent swarm")?;
        stdins.push(c.stdin.take());
        let out = c.stdout.take().context("swarm stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((p, line)).is_err() {
                    break;
                }
            }
        });
        swarms.push(Kid(Some(c)));
    }
    let nswarm = swarms.len();
    let mut res = IdleRound {
        load_before,
        base,
        ..IdleRound::default()
    };
    let until = Instant::now() + Duration::from_secs(o.open_s);
    let mut readies = 0;
    while readies < nswarm {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok((p, line)) => {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.first() == Some(&"ready") {
                    readies += 1;
                    let n = |k: usize| f.get(k).and_then(|v| v.parse::<usize>().ok());
                    res.connected += n(1).unwrap_or(0);
                    res.failed += n(2).unwrap_or(0);
                    eprintln!("  swarm {p}: {line}");
                }
            }
            Err(_) => bail!(
                "the swarms did not connect within {} s ({readies} of {nswarm} ready)",
                o.open_s
            ),
        }
    }
    res.open_s = opened_at.elapsed().as_secs_f64();
    res.connect_cpu_s = tree.sample()?.cpu_s - cpu_before_connect;
    eprintln!(
        "  round {}: {} devices connected in {:.1} s ({} failed); settling {:.0} s",
        r + 1,
        res.connected,
        res.open_s,
        res.failed,
        o.settle_s
    );
    std::thread::sleep(Duration::from_secs_f64(o.settle_s));
    let settled = tree.sample()?;
    let others0 = Others::now();
    let t0 = Instant::now();
    let hold = Duration::from_secs_f64(o.hold_s);
    while t0.elapsed() < hold {
        std::thread::sleep(Duration::from_secs(10).min(hold.saturating_sub(t0.elapsed())));
        if let Ok(s) = tree.sample() {
            eprintln!(
                "  {:>5.0} s  gateway RSS {:.1} MiB, CPU {:.2} s since settled, {} threads",
                t0.elapsed().as_secs_f64(),
                s.rss_kib as f64 / 1024.0,
                s.cpu_s - settled.cpu_s,
                s.threads
            );
        }
    }
    let end = tree.sample()?;
    let dev_s = dev_tree.sample().ok();
    res.hold_s = t0.elapsed().as_secs_f64();
    res.others_cpu_pct = Others::now().since(&others0) / res.hold_s * 100.0;
    // Let the swarms go and count what they lost.
    drop(stdins);
    let until = Instant::now() + Duration::from_secs(20);
    let mut ends = 0;
    while ends < nswarm {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok((_, line)) if line.starts_with("end ") => {
                ends += 1;
                let f: Vec<&str> = line.split_whitespace().collect();
                res.lost += f.get(2).and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    drop(swarms);
    drop(dev);
    drop(gw);
    // The real device counts as one more connected agent.
    let dev_up = dev_s.is_some();
    res.held = res.connected - res.lost.min(res.connected) + usize::from(dev_up);
    res.settled = settled;
    res.end = end;
    res.kib_per_agent = (settled.rss_kib as f64 - base.rss_kib as f64) / res.held.max(1) as f64;
    res.cpu_s = end.cpu_s - settled.cpu_s;
    res.cpu_pct = res.cpu_s / res.hold_s * 100.0;
    let beats = res.held as f64 * res.hold_s / o.heartbeat_s as f64;
    res.cpu_us_per_agent_heartbeat = res.cpu_s * 1e6 / beats.max(1.0);
    if let Some(d) = dev_s {
        res.device_rss_kib = d.rss_kib;
        res.device_hwm_kib = d.hwm_kib;
        res.device_cpu_s = d.cpu_s;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(res)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The binary's size as built and stripped (`strip` of binutils), bytes.
fn sizes(binary: &Path, tmp: &Path) -> (u64, Option<u64>) {
    let built = std::fs::metadata(binary).map(|m| m.len()).unwrap_or(0);
    let out = tmp.join("agent.stripped");
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(&out)
        .arg(binary)
        .status()
        .ok()
        .filter(|s| s.success())
        .and_then(|_| std::fs::metadata(&out).ok())
        .map(|m| m.len());
    (built, stripped)
}

/// `agents-idle`: rounds of N idle devices; prints (and writes) a report.
pub(crate) fn agents_idle(o: &IdleOpts) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("splicegate-bench-agents-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let started = crate::report::sh("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]);
    let mut rounds = Vec::new();
    for r in 0..o.rounds.max(1) {
        eprintln!("round {}/{}: {} devices", r + 1, o.rounds, o.agents);
        match round(o, r, &tmp) {
            Ok(x) => {
                eprintln!(
                    "  round {}: {} held, {:.2} KiB per agent, gateway CPU {:.3} s over {:.0} s \
                     ({:.3} %), {:.1} µs per agent heartbeat",
                    r + 1,
                    x.held,
                    x.kib_per_agent,
                    x.cpu_s,
                    x.hold_s,
                    x.cpu_pct,
                    x.cpu_us_per_agent_heartbeat
                );
                rounds.push(x);
            }
            Err(e) => eprintln!("  round {} FAILED: {e:#}", r + 1),
        }
    }
    let (built, stripped) = sizes(&o.agent, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    if rounds.is_empty() {
        bail!("no round completed");
    }
    let m = |f: &dyn Fn(&IdleRound) -> f64| median(rounds.iter().map(f).collect());
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# splicegate-bench agents-idle\n\n- command: `{command}`\n- started {started}; {} \
         round(s); {} devices per round from {} load process(es), `heartbeat_s = {}`, settled \
         {:.0} s, held {:.0} s\n- machine: {} ({} CPUs); gateway on CPU {}, load processes and the \
         real device on CPU {}\n",
        rounds.len(),
        o.agents,
        o.procs,
        o.heartbeat_s,
        o.settle_s,
        o.hold_s,
        crate::report::cpu_model(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        o.proxy_cpus.as_deref().unwrap_or("(any)"),
        o.load_cpus.as_deref().unwrap_or("(any)"),
    );
    let _ = writeln!(
        md,
        "| round | held | connect s | gateway CPU while connecting (s) | RSS before (MiB) | RSS \
         settled (MiB) | RSS end (MiB) | peak RSS (MiB) | KiB per agent | threads | CPU over \
         hold (s) | CPU % | µs per agent heartbeat | device RSS (KiB) | others % | load before \
         |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for (i, x) in rounds.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {} → {} | {:.3} \
             | {:.3} | {:.2} | {} | {:.0} | {} |",
            i + 1,
            x.held,
            x.open_s,
            x.connect_cpu_s,
            x.base.rss_kib as f64 / 1024.0,
            x.settled.rss_kib as f64 / 1024.0,
            x.end.rss_kib as f64 / 1024.0,
            x.end.hwm_kib as f64 / 1024.0,
            x.kib_per_agent,
            x.base.threads,
            x.end.threads,
            x.cpu_s,
            x.cpu_pct,
            x.cpu_us_per_agent_heartbeat,
            x.device_rss_kib,
            x.others_cpu_pct,
            x.load_before
        );
    }
    let _ = writeln!(
        md,
        "\nMedians: **{:.2} KiB per connected agent** (goal ≤ 16), gateway CPU **{:.3} %** of one \
         CPU with {} idle agents at `heartbeat_s = {}` ({:.2} µs per agent per heartbeat), the \
         real device's RSS {:.0} KiB (goal ≤ 10 MiB).\n\nsplicegate-agent binary: {} bytes as \
         built{}.",
        m(&|x| x.kib_per_agent),
        m(&|x| x.cpu_pct),
        o.agents,
        o.heartbeat_s,
        m(&|x| x.cpu_us_per_agent_heartbeat),
        m(&|x| x.device_rss_kib as f64),
        built,
        stripped.map_or(String::new(), |s| format!(", {s} bytes stripped")),
    );
    println!("{md}");
    if let Some(dir) = &o.out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("agents-idle.md"), &md)?;
        std::fs::write(
            dir.join("agents-idle.json"),
            serde_json::to_string_pretty(&serde_json::json!({
                "command": command,
                "started": started,
                "agents": o.agents,
                "procs": o.procs,
                "heartbeat_s": o.heartbeat_s,
                "hold_s": o.hold_s,
                "settle_s": o.settle_s,
                "agent_binary_bytes": built,
                "agent_binary_stripped_bytes": stripped,
                "rounds": rounds,
            }))?,
        )?;
        eprintln!("report: {}", dir.join("agents-idle.md").display());
    }
    Ok(())
}
