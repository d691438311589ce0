//! `splicegate`: the binary. Reads the configuration, builds the policy,
//! starts one worker per core, and turns signals into drains and reloads.
#![forbid(unsafe_code)]

mod admin;
mod agents;
mod config;
mod cpus;
mod doctor;
mod echo;
mod geoip;
mod kernel;
mod notify;
mod portcheck;
mod ready;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use splicegate_control::engine::Engine;
use splicegate_control::policy::Policy;
use splicegate_worker::{Binding, Command, Resolver, Shared};

use crate::config::Config;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A residential-proxy gateway: HTTP CONNECT, HTTP forwarding and SOCKS5 on
/// one port, exits chosen by the rules in the proxy username.
#[derive(Debug, Parser)]
#[command(
    name = "splicegate",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("SPLICEGATE_COMMIT"), ")"),
    about
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve. Without --config, serves the embedded demo (loopback exits and a
    /// built-in target) and prints a curl line to try.
    Serve {
        /// The configuration file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Once serving, write every bound address (the real ports when a
        /// listen address has port 0) to this file as JSON, atomically.
        #[arg(long, value_name = "PATH")]
        ready_file: Option<PathBuf>,
    },
    /// Check a configuration file and exit: 0 when it is valid.
    CheckConfig {
        /// The configuration file (TOML).
        file: PathBuf,
    },
    /// Check whether this machine is ready for the gateway (kernel and
    /// io_uring, BPF, open files, sysctls, CPU mask and NUMA, pipe limits)
    /// and say how to fix what is not. Exit status 0 when ready, 1 when not.
    Doctor {
        /// Judge against this configuration (workers, [ebpf]).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Where /proc is (a copy of another machine's, for a test).
        #[arg(long, default_value = "/proc", value_name = "DIR")]
        proc_root: PathBuf,
        /// Where /sys is.
        #[arg(long, default_value = "/sys", value_name = "DIR")]
        sys_root: PathBuf,
        /// Open tunnels to plan for.
        #[arg(long, default_value_t = 10_000)]
        tunnels: u64,
        /// New connections per second to one node address to plan for.
        #[arg(long, default_value_t = 500)]
        connect_rate: u64,
    },
    /// Run this device as an exit node: dial out to the gateways given and
    /// serve their streams (the same code as the standalone splicegate-agent).
    Agent(Box<splicegate_agent::Args>),
    /// Operate on a store.
    #[command(subcommand)]
    Store(StoreCmd),
    /// Print the manual page (roff, for `man -l -` or packaging).
    Man,
    /// Print a shell completion script.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum StoreCmd {
    /// Move an embedded SQLite store into PostgreSQL: organisations,
    /// grants, packages, nodes, the usage ledger. Re-runnable: rows already
    /// there stay (declarations take the file's values). Prints the rows of
    /// each table on both sides and checks every package's usage.
    Migrate {
        /// The SQLite store (`[store] path`).
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The PostgreSQL store (`[store] url`).
        #[arg(long, value_name = "URL")]
        to: String,
    },
}

fn main() -> ExitCode {
    // A bad command line exits 1, not clap's 2: status 2 is the agent's
    // "the gateway refused this key" (SPEC section 10), which a supervisor
    // must be able to tell apart.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Cmd::CheckConfig { file } => match Config::load(&file).and_then(|c| {
            c.check_policy()
                .with_context(|| format!("in {}", file.display()))?;
            Ok(c)
        }) {
            Ok(c) => {
                let d = c.declarations();
                let (packages, nodes) = (d.packages.len(), d.nodes.len());
                println!(
                    "{}: ok ({packages} packages, {nodes} nodes)",
                    file.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("splicegate: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Doctor {
            config,
            proc_root,
            sys_root,
            tunnels,
            connect_rate,
        } => {
            let config = match config.map(|p| Config::load(&p)).transpose() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("splicegate: {e:#}");
                    return ExitCode::from(2);
                }
            };
            let (text, ready) = doctor::report(&doctor::Options {
                proc_root,
                sys_root,
                tunnels,
                connect_rate,
                config,
            });
            print!("{text}");
            if ready {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::Store(StoreCmd::Migrate { from, to }) => {
            let started = std::time::Instant::now();
            match splicegate_admin::store::migrate::sqlite_to_postgres(&from, &to, |line| {
                eprintln!("copied {line}")
            }) {
                Ok(report) => {
                    print!("{report}");
                    println!(
                        "ok: {} moved into {} and checked in {:.1} s",
                        from.display(),
                        splicegate_admin::StoreLocation::Postgres(to),
                        started.elapsed().as_secs_f64()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("splicegate: store migrate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Man => {
            use clap::CommandFactory;
            let mut out = std::io::stdout().lock();
            match clap_mangen::Man::new(Cli::command()).render(&mut out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("splicegate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "splicegate",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Cmd::Agent(args) => {
            let _logging = init_logging("info");
            match splicegate_agent::main_with(*args) {
                0 => ExitCode::SUCCESS,
                code => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            }
        }
        Cmd::Serve { config, ready_file } => match serve(config, ready_file) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("splicegate: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Log lines waiting for stderr; past this they are dropped and counted.
const LOG_QUEUE_LINES: usize = 16_384;

/// Logging to stderr through a bounded queue and a writer thread of its
/// own: a stalled stderr (a full pipe, a stopped journal) costs dropped
/// lines, counted, never a blocked worker. Keep the guard alive until exit:
/// dropping it flushes what is queued.
fn init_logging(level: &str) -> Logging {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("splicegate-log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
    Logging {
        _guard: guard,
        dropped,
    }
}

/// The log writer's guard and its count of dropped lines.
struct Logging {
    _guard: tracing_appender::non_blocking::WorkerGuard,
    dropped: tracing_appender::non_blocking::ErrorCounter,
}

fn serve(path: Option<PathBuf>, ready_file: Option<PathBuf>) -> Result<()> {
    let (cfg, demo) = match &path {
        Some(p) => (Config::load(p)?, false),
        None => (
            Config::parse(config::DEMO).context("the embedded demo")?,
            true,
        ),
    };
    // Block the signals before any thread exists (the log writer's
    // included), so every thread inherits the mask and only this one
    // receives them.
    let signals = splicegate_uring::SignalSet::block(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP])?;
    let logging = init_logging(&cfg.log.level);
    let systemd = notify::Notifier::from_env();

    let (engine, control) = admin::engine(&cfg)?;
    let (access_log, access_rx) = match cfg.log.access.as_str() {
        "off" | "" => (None, None),
        _ => {
            let (log, rx) = splicegate_worker::AccessLog::new(65_536);
            (Some(log), Some(rx))
        }
    };
    let tls = load_tls(&cfg)?;
    let workers = cfg.proxy.workers.resolve();
    let mut listen = vec![(
        cfg.proxy.listen,
        Binding {
            package: None,
            ip_only: false,
            tls_only: cfg.proxy.tls_only,
            proxy_protocol: cfg.proxy.proxy_protocol,
        },
    )];
    for l in &cfg.listener {
        listen.push((
            l.listen,
            Binding {
                package: l.package,
                ip_only: l.ip_only,
                tls_only: l.tls_only,
                proxy_protocol: l.proxy_protocol,
            },
        ));
    }
    // SO_REUSEPORT would let us share an address another process already
    // listens on, and each would get a share of the clients: refuse.
    for (addr, _) in &listen {
        if let Some(other) = portcheck::rival(*addr) {
            bail!(
                "listening on {addr}: another socket already listens on {other}; stop it or choose another address"
            );
        }
    }
    // Bind everything first: a port in use fails the start, not a worker.
    // Worker 0 binds each address as configured; the others bind the address
    // it got, so port 0 means one kernel-chosen port all workers share.
    let mut bound: Vec<std::net::SocketAddr> = Vec::with_capacity(listen.len());
    let mut per_worker = Vec::with_capacity(workers);
    for w in 0..workers {
        let mut mine = Vec::new();
        for (i, (addr, binding)) in listen.iter().enumerate() {
            let at = if w == 0 { *addr } else { bound[i] };
            let l = splicegate_worker::bind_listener(at)
                .with_context(|| format!("listening on {at}"))?;
            if w == 0 {
                bound.push(
                    l.local_addr()
                        .with_context(|| format!("listening on {at}"))?,
                );
            }
            mine.push((l, *binding));
        }
        per_worker.push(mine);
    }
    // The fleet's id is claimed before anything is accepted: a gateway
    // that may not join exits with the listeners never served.
    let fleet = admin::join_fleet(&cfg, control.as_ref(), bound[0])?;
    let kernel = kernel::start(&cfg, &bound);
    let proxy_protocol = running_proxy_protocol(&cfg, &bound);
    if let Some(k) = &kernel {
        k.upkeep(&engine);
    }
    let agents = match &cfg.agents {
        Some(a) => {
            let acceptor = agent_tls(&cfg, a)?;
            let settings = agents::Settings {
                listen: a.listen,
                heartbeat: Duration::from_secs(a.heartbeat_s.max(1)),
                enrol_key: a.enrol_key.clone(),
                geoip: if a.geoip.is_empty() {
                    None
                } else {
                    Some(Arc::new(geoip::GeoIp::open(&a.geoip)?))
                },
                handshake: Duration::from_millis(cfg.timeouts.handshake_ms.max(1)),
                node_connect: Duration::from_millis(cfg.timeouts.node_connect_ms.max(1)),
                target: Duration::from_millis(cfg.timeouts.target_ms.max(1)),
            };
            let (hub, addr) = agents::start(
                settings,
                acceptor.clone(),
                engine.clone(),
                control.clone(),
                cfg.guard_config(),
            )?;
            Some((hub, addr, acceptor))
        }
        None => None,
    };
    let guard = Arc::new(splicegate_control::guard::Guard::new(cfg.guard_config()));
    let kernel_bans = kernel.as_ref().map(kernel::Kernel::ban_sink);
    // A ban decided here goes to the kernel's map and to the fleet; one
    // another gateway decided comes back through the guard and the kernel.
    let ban_sink: Option<splicegate_worker::BanSink> = match (&kernel_bans, &fleet) {
        (None, None) => None,
        (k, f) => {
            let (k, view) = (k.clone(), f.as_ref().map(|f| f.view()));
            Some(Arc::new(move |ip, ban| {
                if let Some(k) = &k {
                    k(ip, ban);
                }
                if let Some(v) = &view {
                    v.announce_ban(ip, ban);
                }
            }))
        }
    };
    if let Some(f) = &fleet {
        let (g, k) = (guard.clone(), kernel_bans.clone());
        f.view().on_ban(Arc::new(move |ip, ban| {
            g.ban(ip, ban.as_secs(), splicegate_worker::now());
            if let Some(k) = &k {
                k(ip, ban);
            }
        }));
    }
    let shared = Arc::new(Shared {
        engine: engine.clone(),
        settings: cfg.settings(),
        resolver: Resolver::start(2)?,
        access_log,
        guard,
        guard_at_accept: kernel.as_ref().is_none_or(|k| k.user_space_too),
        ban_sink,
        tls: tls.clone(),
        agents: agents
            .as_ref()
            .map(|(hub, _, _)| -> Arc<dyn splicegate_worker::AgentDialer> { hub.clone() }),
        sessions: fleet
            .as_ref()
            .map(|f| -> Arc<dyn splicegate_control::session::SessionSync> { f.view() }),
    });
    let mut access = match access_rx {
        Some(rx) => Some(AccessWriter::open(&cfg.log.access, rx)?),
        None => None,
    };

    let echo = match cfg.demo.echo_listen {
        Some(addr) => {
            Some(echo::start(addr).with_context(|| format!("the built-in target on {addr}"))?)
        }
        None => None,
    };

    // Pin within the process's affinity mask (taskset, CPUAffinity=,
    // cpusets), never to a CPU outside it.
    let mask = cfg.proxy.pin_workers.then(cpus::allowed).flatten();
    let mut handles = Vec::with_capacity(workers);
    let mut pinned = Vec::with_capacity(workers);
    for (i, mine) in per_worker.into_iter().enumerate() {
        let cpu = cpus::for_worker(mask.as_deref(), i, workers);
        pinned.push(cpu.map_or_else(|| "-".to_string(), |c| c.to_string()));
        handles.push(splicegate_worker::start(i, cpu, mine, shared.clone())?);
    }
    tracing::info!(cpus = %pinned.join(","), "workers pinned (worker i on the i-th CPU of the affinity mask; - = not pinned)");
    let addrs: Vec<String> = bound.iter().map(ToString::to_string).collect();
    tracing::info!(listen = %addrs.join(", "), workers, "splicegate serving");
    let verdicts = kernel
        .clone()
        .map(|k| -> splicegate_admin::VerdictFn { Arc::new(move || k.counters()) });
    let log_dropped = logging.dropped.clone();
    let mut counters = vec![splicegate_admin::ProcessCounter {
        name: "splicegate_log_dropped_lines",
        help: "Log lines dropped because stderr could not take them (the writer never blocks a worker)",
        gauge: false,
        read: Arc::new(move || i64::try_from(log_dropped.dropped_lines()).ok()),
    }];
    if let Some(tls) = &tls {
        let tls = tls.clone();
        counters.push(splicegate_admin::ProcessCounter {
            name: "splicegate_tls_certificate_expiry_timestamp_seconds",
            help: "When the proxy's TLS certificate ([tls] cert) expires, in seconds since the Unix epoch (re-read on SIGHUP)",
            gauge: true,
            read: Arc::new(move || tls.not_after()),
        });
    }
    let admin = admin::start(
        &cfg,
        control.as_ref(),
        &handles,
        verdicts,
        counters,
        fleet.as_ref(),
    )?;
    if let Some(f) = &fleet {
        f.view().serving(
            handles.iter().map(|h| h.stats.clone()).collect(),
            admin.as_ref().map(|a| a.addr),
        );
    }
    let ready = ready::Bound {
        proxy: vec![bound[0]],
        listeners: listen
            .iter()
            .zip(&bound)
            .skip(1)
            .map(|((_, b), addr)| (*addr, *b))
            .collect(),
        admin: admin.as_ref().map(|a| a.addr),
        demo_echo: echo,
        agents: agents.as_ref().map(|(_, addr, _)| *addr),
    };
    if let Some(p) = &ready_file {
        ready::write(p, &ready)?;
    }
    systemd.ready(&format!("serving on {}", addrs.join(", ")));
    if demo {
        print_demo(&cfg, bound[0], echo, ready.admin);
    }

    let grace = Duration::from_secs(cfg.timeouts.drain_grace_s);
    loop {
        let wait = if access.is_some() {
            Duration::from_millis(100)
        } else if kernel.is_some() {
            // Policy changes reach the kernel's maps within a second.
            Duration::from_millis(250)
        } else {
            Duration::from_secs(1)
        };
        let signal = signals.wait(wait)?;
        if let Some(k) = &kernel {
            k.upkeep(&engine);
        }
        if let Some(a) = access.as_mut() {
            a.drain();
        }
        match signal {
            Some(libc::SIGHUP) => {
                systemd.reloading();
                match &path {
                    Some(p) => reload(
                        p,
                        &proxy_protocol,
                        &engine,
                        control.as_deref(),
                        tls.as_deref(),
                        agents.as_ref().map(|(_, _, a)| &**a),
                    ),
                    None => tracing::info!("SIGHUP: the embedded demo has no file to reload"),
                }
                // A refused reload leaves the gateway serving as before.
                systemd.ready(&format!("serving on {}", addrs.join(", ")));
            }
            Some(sig) => {
                tracing::info!(
                    signal = sig,
                    grace_s = grace.as_secs(),
                    "draining: no new connections"
                );
                systemd.stopping();
                for h in &handles {
                    let _ = h.commands.send(Command::Drain { grace });
                }
                for h in handles {
                    let _ = h.thread.join();
                }
                // Tunnels through agents drained with the workers' ones.
                if let Some((hub, _, _)) = &agents {
                    hub.stop();
                }
                if let Some(a) = access.as_mut() {
                    a.drain();
                }
                admin::stop(admin, control.as_ref());
                // Leave last: the final flush is written under this id.
                if let Some(f) = fleet {
                    f.stop();
                }
                if let Some(p) = &ready_file {
                    let _ = std::fs::remove_file(p);
                }
                tracing::info!("drained; exiting");
                return Ok(());
            }
            None => {
                engine.housekeeping(splicegate_worker::now());
                // Never serve on with a dead worker: its listeners would
                // keep their share of new connections and never accept them.
                if let Some(dead) = handles.iter().position(|h| h.thread.is_finished()) {
                    tracing::error!(
                        worker = dead,
                        "a worker stopped; draining the others and exiting"
                    );
                    for h in &handles {
                        let _ = h.commands.send(Command::Drain { grace });
                    }
                    for h in handles {
                        let _ = h.thread.join();
                    }
                    admin::stop(admin, control.as_ref());
                    bail!("worker {dead} stopped (see the log); the gateway exited");
                }
            }
        }
    }
}

/// Writes access-log lines the workers queued: to stdout, stderr or a file.
struct AccessWriter {
    rx: crossbeam_channel::Receiver<String>,
    out: Box<dyn std::io::Write + Send>,
}

impl AccessWriter {
    fn open(dest: &str, rx: crossbeam_channel::Receiver<String>) -> Result<Self> {
        let out: Box<dyn std::io::Write + Send> = match dest {
            "stdout" => Box::new(std::io::stdout()),
            "stderr" => Box::new(std::io::stderr()),
            path => Box::new(std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening the access log {path}"))?,
            )),
        };
        Ok(AccessWriter { rx, out })
    }

    fn drain(&mut self) {
        use std::io::Write;
        let mut wrote = false;
        while let Ok(line) = self.rx.try_recv() {
            let _ = writeln!(self.out, "{line}");
            wrote = true;
        }
        if wrote {
            let _ = self.out.flush();
        }
    }
}

/// The agent listener's certificate: `[agents] cert`/`key`, else `[tls]`'s;
/// TLS 1.3 only, ALPN `splicegate-agent/1`.
fn agent_tls(cfg: &Config, a: &config::AgentsSection) -> Result<Arc<splicegate_tls::Acceptor>> {
    let (cert, key) = a.cert_and_key(cfg.tls.as_ref())?;
    let acceptor = splicegate_tls::Acceptor::load_tls13(&cert, &key, &[splicegate_agent::ALPN])
        .context("[agents]")?;
    Ok(Arc::new(acceptor))
}

/// `[tls]`'s certificate and key, loaded (an error names the file).
fn load_tls(cfg: &Config) -> Result<Option<Arc<splicegate_tls::Acceptor>>> {
    let Some(t) = &cfg.tls else {
        return Ok(None);
    };
    let acceptor =
        splicegate_tls::Acceptor::load(&t.cert, &t.key, &[b"http/1.1"]).context("[tls]")?;
    log_certificate(&acceptor, &t.cert);
    Ok(Some(Arc::new(acceptor)))
}

/// Says when the certificate expires; warns within 14 days of it.
fn log_certificate(acceptor: &splicegate_tls::Acceptor, cert: &std::path::Path) {
    let now = splicegate_worker::unix_ms() as i64 / 1000;
    match acceptor.not_after() {
        Some(t) if t - now < 14 * 86_400 => tracing::warn!(
            cert = %cert.display(),
            days_left = (t - now) / 86_400,
            "the TLS certificate expires soon (or has expired)"
        ),
        Some(t) => {
            tracing::info!(cert = %cert.display(), days_left = (t - now) / 86_400, "TLS certificate loaded")
        }
        None => {
            tracing::warn!(cert = %cert.display(), "TLS certificate loaded; its expiry could not be read")
        }
    }
}

/// Re-read the file and publish a new policy (through the control object
/// when the admin API runs, so the API's objects stay) and the TLS
/// certificate; a bad file or certificate changes nothing.
/// Each proxy address of the file, as written, and whether it reads the
/// PROXY protocol.
fn proxy_protocol_flags(cfg: &Config) -> Vec<(std::net::SocketAddr, bool)> {
    std::iter::once((cfg.proxy.listen, cfg.proxy.proxy_protocol))
        .chain(cfg.listener.iter().map(|l| (l.listen, l.proxy_protocol)))
        .collect()
}

/// A running proxy address: as the file wrote it, as bound (a port 0
/// written is the kernel's port here), and whether it reads the PROXY
/// protocol.
type RunningListener = (std::net::SocketAddr, std::net::SocketAddr, bool);

fn running_proxy_protocol(cfg: &Config, bound: &[std::net::SocketAddr]) -> Vec<RunningListener> {
    proxy_protocol_flags(cfg)
        .into_iter()
        .zip(bound)
        .map(|((written, pp), at)| (written, *at, pp))
        .collect()
}

/// Why a reloaded file cannot take effect without a restart as far as the
/// PROXY protocol goes: listeners are not rebound on SIGHUP, and a port
/// that silently kept (or lacked) the header would refuse every client.
/// A new file names a running listener by its written or its bound address.
fn proxy_protocol_change(running: &[RunningListener], new: &Config) -> Option<String> {
    proxy_protocol_flags(new).into_iter().find_map(|(at, pp)| {
        running
            .iter()
            .find(|(written, bound, _)| *written == at || *bound == at)
            .filter(|(_, _, was)| *was != pp)
            .map(|_| format!("proxy_protocol of {at} changed: it needs a restart"))
    })
}

fn reload(
    path: &std::path::Path,
    proxy_protocol: &[RunningListener],
    engine: &Engine,
    control: Option<&splicegate_admin::Control>,
    tls: Option<&splicegate_tls::Acceptor>,
    agents: Option<&splicegate_tls::Acceptor>,
) {
    let result = Config::load(path).and_then(|c| {
        if let Some(why) = proxy_protocol_change(proxy_protocol, &c) {
            anyhow::bail!(why);
        }
        match (&c.agents, agents) {
            (Some(_), None) => anyhow::bail!("[agents] was added: it needs a restart"),
            (None, Some(_)) => anyhow::bail!("[agents] was removed: it needs a restart"),
            (Some(a), Some(acceptor)) => {
                let (cert, key) = a.cert_and_key(c.tls.as_ref())?;
                acceptor.reload(&cert, &key).context("[agents]")?;
            }
            (None, None) => {}
        }
        match (&c.tls, tls) {
            (Some(_), None) => anyhow::bail!("[tls] was added: adding TLS needs a restart"),
            (None, Some(_)) => anyhow::bail!("[tls] was removed: removing TLS needs a restart"),
            (Some(t), Some(acceptor)) => {
                acceptor.reload(&t.cert, &t.key).context("[tls]")?;
                log_certificate(acceptor, &t.cert);
            }
            (None, None) => {}
        }
        Ok(c)
    });
    let result = result.and_then(|c| match control {
        Some(control) => admin::reload(control, &c),
        None => {
            let p = Policy::build(c.declarations(), Some(&engine.policy()))
                .map_err(anyhow::Error::msg)?;
            engine.publish(p);
            Ok(())
        }
    });
    match result {
        Ok(()) => {
            let p = engine.policy();
            let (packages, nodes) = (p.packages.len(), p.nodes.online_count());
            tracing::info!(
                packages,
                online_nodes = nodes,
                "reloaded {}",
                path.display()
            );
        }
        Err(e) => tracing::error!(
            "reload of {} rejected, the running policy stays: {e:#}",
            path.display()
        ),
    }
}

fn print_demo(
    cfg: &Config,
    proxy: std::net::SocketAddr,
    echo: Option<std::net::SocketAddr>,
    admin: Option<std::net::SocketAddr>,
) {
    let Some(target) = echo else { return };
    let decls = cfg.declarations();
    let pkg = decls.packages.first();
    let (id, key) = pkg.map_or((1, "pk_demo"), |p| (p.id, p.key.as_str()));
    println!(
        "splicegate demo: proxy on {proxy} (HTTP CONNECT, HTTP, SOCKS5); built-in target on http://{target}/"
    );
    println!(
        "package {id}, key {key}; exits: {}",
        decls
            .nodes
            .iter()
            .map(|n| format!(
                "{} ({})",
                n.id,
                n.bind.map(|b| b.to_string()).unwrap_or_default()
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    println!("  curl -x http://{proxy} -U package-{id}-country-us:{key} http://{target}/");
    println!();
    println!(
        "Run it again: the exit address changes. Add -session-abc to the username to keep one exit;"
    );
    println!("try country-gb, city-london, or a mistake like contry-us to see the error codes.");
    if let Some(a) = admin {
        println!();
        println!(
            "Admin API: curl http://{a}/v1/packages/{id}  (also /v1/nodes, /v1/explain?username=..., /metrics)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_that_changes_proxy_protocol_is_refused() {
        let file = |pp: bool, extra: &str| {
            Config::parse(&format!(
                "[proxy]\nlisten = \"127.0.0.1:5000\"\n[[listener]]\nlisten = \"127.0.0.1:5001\"\nproxy_protocol = {pp}\n{extra}"
            ))
            .unwrap()
        };
        let first = file(true, "");
        let bound: Vec<std::net::SocketAddr> = vec![
            "127.0.0.1:5000".parse().unwrap(),
            "127.0.0.1:5001".parse().unwrap(),
        ];
        let running = running_proxy_protocol(&first, &bound);
        assert_eq!(proxy_protocol_change(&running, &file(true, "")), None);
        let why = proxy_protocol_change(&running, &file(false, "")).unwrap();
        assert!(
            why.contains("127.0.0.1:5001") && why.contains("restart"),
            "{why}"
        );
        // A port 0 in the file is the bound port in the next one.
        let zero =
            Config::parse("[proxy]\nlisten = \"127.0.0.1:0\"\nproxy_protocol = true\n").unwrap();
        let running = running_proxy_protocol(&zero, &["127.0.0.1:40123".parse().unwrap()]);
        let next = Config::parse("[proxy]\nlisten = \"127.0.0.1:40123\"\n").unwrap();
        assert!(proxy_protocol_change(&running, &next).is_some());
        let running = running_proxy_protocol(&first, &bound);
        // A listener the running gateway does not have is not this check's.
        let more = "[[listener]]\nlisten = \"127.0.0.1:5002\"\nproxy_protocol = true\n";
        assert_eq!(proxy_protocol_change(&running, &file(true, more)), None);
    }
}
