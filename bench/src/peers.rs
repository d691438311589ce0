//! The proxies under test: splicegate in three shapes, the Debian peers
//! (HAProxy, nginx stream, Squid, tinyproxy, Dante), a plain direct
//! connection, or any proxy given by URL. Each built-in one gets its config
//! written into a temporary directory, listens on 127.0.0.1, runs as a
//! foreground child pinned with `taskset`, and is stopped by its PID.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

use crate::client::{Auth, Proto, Route};
use crate::procstat::{ProcTree, comm};
use crate::targets::{Targets, listener};
use crate::tls::Pki;

/// The account the peers with authentication accept (Squid's htpasswd file,
/// Dante's system user).
pub(crate) const PEER_USER: &str = "sgbench";
pub(crate) const PEER_PASS: &str = "sgbench-Pw-7f3";
/// splicegate's package and key in the generated config.
const SG_USER: &str = "package-1-country-us";
pub(crate) const SG_KEY: &str = "bench";

/// A built-in proxy under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum PeerId {
    /// No proxy: the load generator talks to the target.
    Direct,
    /// splicegate, `direct` node, the configured worker count.
    Splicegate,
    /// splicegate with an `http` node (a local tinyproxy as the exit).
    SplicegateHttp,
    /// splicegate with 2 workers sharing the CPUs with the load generator.
    SplicegateW2,
    /// splicegate with one `agent` node: a `splicegate-agent` process (the
    /// device) dialled in over TLS, on the load generator's CPUs.
    SplicegateAgent,
    /// rathole (a reverse tunnel: its client dials the server), TLS
    /// transport, one service per target (an L4 relay), if installed.
    Rathole,
    Haproxy,
    Nginx,
    Squid,
    Tinyproxy,
    Dante,
}

pub(crate) const ALL: [PeerId; 11] = [
    PeerId::Direct,
    PeerId::Splicegate,
    PeerId::SplicegateHttp,
    PeerId::SplicegateW2,
    PeerId::SplicegateAgent,
    PeerId::Rathole,
    PeerId::Haproxy,
    PeerId::Nginx,
    PeerId::Squid,
    PeerId::Tinyproxy,
    PeerId::Dante,
];

impl PeerId {
    pub(crate) fn name(self) -> &'static str {
        match self {
            PeerId::Direct => "direct",
            PeerId::Splicegate => "splicegate",
            PeerId::SplicegateHttp => "splicegate-http",
            PeerId::SplicegateW2 => "splicegate-w2",
            PeerId::SplicegateAgent => "splicegate-agent",
            PeerId::Rathole => "rathole",
            PeerId::Haproxy => "haproxy",
            PeerId::Nginx => "nginx",
            PeerId::Squid => "squid",
            PeerId::Tinyproxy => "tinyproxy",
            PeerId::Dante => "dante",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<PeerId> {
        ALL.into_iter().find(|p| p.name() == s)
    }

    /// What it is, for the report.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            PeerId::Direct => "no proxy: the client talks to the target",
            PeerId::Splicegate => "splicegate, `direct` node",
            PeerId::SplicegateHttp => "splicegate, `http` node (a local tinyproxy is the exit)",
            PeerId::SplicegateW2 => {
                "splicegate, 2 workers, unpinned: shares both CPUs with the load generator"
            }
            PeerId::SplicegateAgent => {
                "splicegate, `agent` node: a splicegate-agent process dialled in over TLS 1.3 \
                 (the device, on the load generator's CPUs, its CPU reported apart)"
            }
            PeerId::Rathole => {
                "rathole, TLS transport (native-tls), one service per target (L4 reverse tunnel; \
                 its client, the device, on the load generator's CPUs)"
            }
            PeerId::Haproxy => "HAProxy, TCP mode, `option splice-auto`, 1 thread (L4 relay)",
            PeerId::Nginx => "nginx `stream` proxy_pass, 1 worker (L4 relay)",
            PeerId::Squid => {
                "Squid, CONNECT and forwarding, basic auth (basic_ncsa_auth), no cache"
            }
            PeerId::Tinyproxy => "tinyproxy, CONNECT and forwarding, no auth",
            PeerId::Dante => "Dante `danted`, SOCKS5 with username/password (system user)",
        }
    }

    fn caps(self) -> Caps {
        let proxy = |connect, socks5, forward, sessions| Caps {
            connect,
            socks5,
            forward,
            sessions,
            ..Caps::default()
        };
        match self {
            PeerId::Direct => Caps {
                direct: true,
                ..Caps::default()
            },
            PeerId::Splicegate => Caps {
                tls: true,
                ..proxy(true, true, true, true)
            },
            PeerId::SplicegateHttp | PeerId::SplicegateW2 | PeerId::SplicegateAgent => {
                proxy(true, true, true, true)
            }
            PeerId::Rathole => Caps {
                l4: true,
                ..Caps::default()
            },
            PeerId::Haproxy => Caps {
                l4: true,
                tls: true,
                ..Caps::default()
            },
            PeerId::Nginx => Caps {
                l4: true,
                ..Caps::default()
            },
            PeerId::Squid | PeerId::Tinyproxy => proxy(true, false, true, false),
            PeerId::Dante => proxy(false, true, false, false),
        }
    }

    /// (program, Debian package) pairs it needs.
    fn needs(self) -> &'static [(&'static str, &'static str)] {
        match self {
            // rathole is no Debian package: `--rathole PATH` (see `missing`).
            PeerId::Direct
            | PeerId::Splicegate
            | PeerId::SplicegateW2
            | PeerId::SplicegateAgent
            | PeerId::Rathole => &[],
            PeerId::SplicegateHttp | PeerId::Tinyproxy => &[("tinyproxy", "tinyproxy")],
            PeerId::Haproxy => &[("haproxy", "haproxy")],
            PeerId::Nginx => &[("nginx", "nginx"), (NGINX_STREAM, "libnginx-mod-stream")],
            PeerId::Squid => &[
                ("squid", "squid"),
                (NCSA_AUTH, "squid"),
                ("openssl", "openssl"),
            ],
            PeerId::Dante => &[("danted", "dante-server")],
        }
    }
}

const NGINX_STREAM: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
const NCSA_AUTH: &str = "/usr/lib/squid/basic_ncsa_auth";

/// What a proxy can carry.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Caps {
    pub direct: bool,
    pub l4: bool,
    pub connect: bool,
    pub socks5: bool,
    pub forward: bool,
    /// splicegate's `-session-` usernames (sticky vs rotating).
    pub sessions: bool,
    /// TLS to the proxy port (splicegate's `[tls]`, HAProxy's `ssl crt`).
    pub tls: bool,
}

/// What a cell asks of the way to its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Want {
    /// Any tunnel: CONNECT where the proxy has it, else SOCKS5, else L4.
    Tunnel,
    /// CONNECT (L4 relays and no proxy as baselines).
    Connect,
    /// SOCKS5 (no proxy as a baseline).
    Socks5,
    /// Absolute-form forwarding (L4 relays and no proxy as baselines).
    Forward,
    /// Forwarding where every request picks a node afresh (splicegate).
    Rotating,
    /// TLS to the proxy, CONNECT inside (TLS-terminating L4 relays and, in
    /// the clear, no proxy as baselines).
    Tls,
}

impl Caps {
    pub(crate) fn serves(&self, want: Want) -> bool {
        match want {
            Want::Tunnel => true,
            Want::Connect => self.connect || self.l4 || self.direct,
            Want::Socks5 => self.socks5 || self.direct,
            Want::Forward => self.forward || self.l4 || self.direct,
            Want::Rotating => self.sessions,
            Want::Tls => self.tls || self.direct,
        }
    }
}

/// A proxy to measure: built in, or any proxy by URL (its CPU measured when
/// its PID is given).
#[derive(Debug, Clone)]
pub(crate) enum Peer {
    Builtin(PeerId),
    External {
        name: String,
        route: Route,
        pid: Option<u32>,
    },
}

impl Peer {
    /// A peer name (`squid`) or a URL (`socks5://u:p@127.0.0.1:1080`).
    pub(crate) fn parse(s: &str, pid: Option<u32>) -> Result<Peer> {
        if let Some(id) = PeerId::parse(s) {
            return Ok(Peer::Builtin(id));
        }
        if s.contains("://") {
            // The name leaves the credentials out.
            let (scheme, rest) = s.split_once("://").unwrap_or(("", s));
            return Ok(Peer::External {
                name: format!("{scheme}://{}", rest.rsplit('@').next().unwrap_or(rest)),
                route: Route::parse_url(s)?,
                pid,
            });
        }
        bail!(
            "{s:?} is neither a peer ({}) nor a proxy URL",
            ALL.map(PeerId::name).join(", ")
        )
    }

    pub(crate) fn name(&self) -> String {
        match self {
            Peer::Builtin(id) => id.name().into(),
            Peer::External { name, .. } => name.clone(),
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Peer::Builtin(id) => id.describe().into(),
            Peer::External { route, pid, .. } => format!(
                "external proxy ({}){}",
                route.label(),
                if pid.is_some() {
                    ""
                } else {
                    ", CPU not measured (no --pid)"
                }
            ),
        }
    }

    pub(crate) fn caps(&self) -> Caps {
        match self {
            Peer::Builtin(id) => id.caps(),
            Peer::External { route, .. } => match route {
                Route::Direct => PeerId::Direct.caps(),
                Route::L4(_) => Caps {
                    l4: true,
                    ..Caps::default()
                },
                Route::Proxy { proto, .. } => Caps {
                    connect: *proto == Proto::Connect,
                    socks5: *proto == Proto::Socks5,
                    forward: *proto == Proto::Forward,
                    ..Caps::default()
                },
            },
        }
    }

    pub(crate) fn is_direct(&self) -> bool {
        matches!(self, Peer::Builtin(PeerId::Direct))
    }
}

/// Where the machine's programs are.
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    if name.starts_with('/') {
        return Path::new(name).exists().then(|| PathBuf::from(name));
    }
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

/// Why a peer cannot run here (a program missing), if it cannot.
pub(crate) fn missing(peer: &Peer, env: &Env) -> Option<String> {
    let Peer::Builtin(id) = peer else {
        return None;
    };
    let gateway = &env.gateway;
    if matches!(
        id,
        PeerId::Splicegate
            | PeerId::SplicegateHttp
            | PeerId::SplicegateW2
            | PeerId::SplicegateAgent
    ) && !gateway.is_file()
    {
        return Some(format!(
            "{} not found (cargo build --release -p splicegate, or --gateway PATH)",
            gateway.display()
        ));
    }
    if *id == PeerId::SplicegateAgent && !env.agent.is_file() {
        return Some(format!(
            "{} not found (cargo build --release -p splicegate-agent, or --agent PATH)",
            env.agent.display()
        ));
    }
    if *id == PeerId::Rathole && rathole_program(env).is_none() {
        return Some(
            "rathole not installed (no Debian package; `cargo install rathole --locked --root DIR`, \
             then --rathole DIR/bin/rathole)"
                .into(),
        );
    }
    let gone: Vec<String> = id
        .needs()
        .iter()
        .filter(|(prog, _)| find_program(prog).is_none())
        .map(|(prog, pkg)| format!("{prog} (Debian package {pkg})"))
        .collect();
    (!gone.is_empty()).then(|| format!("missing {}", gone.join(", ")))
}

/// Install the Debian packages of the peers that lack a program (root and
/// apt-get needed). Returns what it did, for the report.
pub(crate) fn install_missing(peers: &[Peer], log: &Path) -> Vec<String> {
    let mut pkgs: Vec<&str> = Vec::new();
    for p in peers {
        if let Peer::Builtin(id) = p {
            for (prog, pkg) in id.needs() {
                if find_program(prog).is_none() && !pkgs.contains(pkg) {
                    pkgs.push(pkg);
                }
            }
        }
    }
    if pkgs.is_empty() {
        return Vec::new();
    }
    if !is_root() || find_program("apt-get").is_none() {
        return vec![format!(
            "not installing {} (needs root and apt-get)",
            pkgs.join(" ")
        )];
    }
    eprintln!(
        "installing {} with apt-get (log: {})",
        pkgs.join(" "),
        log.display()
    );
    let apt = |args: &[&str]| -> bool {
        let Ok(out) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        else {
            return false;
        };
        let Ok(err) = out.try_clone() else {
            return false;
        };
        Command::new("timeout")
            .arg("900")
            .arg("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .is_ok_and(|s| s.success())
    };
    let install: Vec<&str> = ["install", "-y", "-q", "--no-install-recommends"]
        .into_iter()
        .chain(pkgs.iter().copied())
        .collect();
    let ok = apt(&install) || (apt(&["update", "-q"]) && apt(&install));
    vec![format!(
        "apt-get install {}: {}",
        pkgs.join(" "),
        if ok { "done" } else { "failed (see the log)" }
    )]
}

/// The environment every peer starts in.
#[derive(Debug)]
pub(crate) struct Env {
    pub targets: Targets,
    pub gateway: PathBuf,
    /// `taskset -c` lists; None: no pinning.
    pub proxy_cpus: Option<String>,
    pub load_cpus: Option<String>,
    pub all_cpus: Option<String>,
    /// splicegate's workers for `splicegate` and `splicegate-http`.
    pub workers: usize,
    /// `direct` nodes of the `splicegate` peer.
    pub nodes: usize,
    /// Parent of every peer's config directory.
    pub tmp: PathBuf,
    /// The certificate TLS cells serve, and the agent listener and
    /// rathole's TLS transport (made when a plan has one of them).
    pub pki: Option<Pki>,
    /// The device binary of `splicegate-agent`.
    pub agent: PathBuf,
    /// rathole, if given (else found on PATH).
    pub rathole: Option<PathBuf>,
}

/// The rathole program to run, if there is one.
pub(crate) fn rathole_program(env: &Env) -> Option<PathBuf> {
    match &env.rathole {
        Some(p) => p.is_file().then(|| p.clone()),
        None => find_program("rathole"),
    }
}

/// A started peer; stopping happens on drop.
#[derive(Debug)]
pub(crate) struct Running {
    /// (name, child): stopped last first.
    children: Vec<(String, Child)>,
    /// The process whose tree is the proxy's cost.
    pub measured: Option<ProcTree>,
    /// The device of a reverse tunnel (splicegate-agent, rathole's
    /// client): its cost is reported apart from the gateway's.
    pub device: Option<ProcTree>,
    base: Base,
    caps: Caps,
    dir: Option<PathBuf>,
}

impl Running {
    /// Start the proxy under test, `program args` pinned to `cpus` (its
    /// output in `dir/name.log`): the measured process, stopped with the
    /// others; an error unless it listens on `addr` within 15 s.
    fn launch(
        &mut self,
        name: &str,
        program: &Path,
        args: &[&str],
        cpus: Option<&str>,
        dir: &Path,
        addr: SocketAddr,
    ) -> Result<()> {
        let mut child = spawn(name, program, args, cpus, dir)?;
        let ready = wait_ready(name, &mut child, addr, dir);
        self.measured = Some(ProcTree { root: child.id() });
        self.children.push((name.into(), child));
        ready
    }
}

/// A proxy at `addr` that wants `user`:`pass`.
fn proxy_with_auth(addr: SocketAddr, user: &str, pass: &str) -> Base {
    Base::Proxy {
        addr,
        auth: Some(Auth {
            user: user.into(),
            pass: pass.into(),
        }),
    }
}

#[derive(Debug, Clone)]
enum Base {
    Direct,
    L4(Vec<(SocketAddr, SocketAddr)>),
    Proxy {
        addr: SocketAddr,
        auth: Option<Auth>,
    },
}

impl Running {
    /// The way to the targets for a cell.
    pub(crate) fn route(&self, want: Want) -> Route {
        match &self.base {
            Base::Direct => Route::Direct,
            Base::L4(map) => Route::L4(map.clone()),
            Base::Proxy { addr, auth } => {
                let proto = match want {
                    Want::Tunnel if self.caps.connect => Proto::Connect,
                    Want::Tunnel | Want::Socks5 => Proto::Socks5,
                    Want::Connect | Want::Tls => Proto::Connect,
                    Want::Forward | Want::Rotating => Proto::Forward,
                };
                Route::Proxy {
                    proto,
                    addr: *addr,
                    auth: auth.clone(),
                    sessions: self.caps.sessions,
                }
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        while let Some((name, child)) = self.children.pop() {
            stop(&name, child);
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// SIGTERM by PID, up to 5 s to exit, then SIGKILL; descendants that
/// outlive it (an nginx worker, a Dante child) are killed by their PIDs.
pub(crate) fn stop(name: &str, mut child: Child) {
    let pid = child.id();
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
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if matches!(child.try_wait(), Ok(None)) {
        eprintln!("  {name} (pid {pid}) ignored SIGTERM for 5 s: SIGKILL");
        let _ = child.kill();
    }
    let _ = child.wait();
    for (p, name) in family {
        if name.is_some() && comm(p) == name {
            let _ = Command::new("kill")
                .args(["-KILL", &p.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(listener(0)?.local_addr()?.port())
}

pub(crate) fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Start `program` with `args` under `taskset -c cpus`, output to
/// `dir/name.log`.
pub(crate) fn spawn(
    name: &str,
    program: &Path,
    args: &[&str],
    cpus: Option<&str>,
    dir: &Path,
) -> Result<Child> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut cmd = match (cpus, find_program("taskset")) {
        (Some(c), Some(ts)) => {
            let mut cmd = Command::new(ts);
            cmd.arg("-c").arg(c).arg(program);
            cmd
        }
        _ => Command::new(program),
    };
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    cmd.spawn()
        .with_context(|| format!("starting {}", program.display()))
}

pub(crate) fn log_tail(dir: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join(" | ")
}

/// Wait until `addr` accepts a connection (or the child exits, or 15 s).
pub(crate) fn wait_ready(
    name: &str,
    child: &mut Child,
    addr: SocketAddr,
    dir: &Path,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{name} exited ({status}): {}", log_tail(dir, name));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{name} did not listen on {addr} within 15 s: {}",
                log_tail(dir, name)
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn program(name: &str) -> Result<PathBuf> {
    find_program(name).ok_or_else(|| anyhow!("{name} is not installed"))
}

/// Start one peer; `tls`: with TLS on its port (or, for HAProxy, on every
/// frontend), serving `env.pki`.
pub(crate) fn start(peer: &Peer, env: &Env, tls: bool) -> Result<Running> {
    let pki = match (tls, &env.pki) {
        (false, _) => None,
        (true, Some(p)) => Some(p),
        (true, None) => bail!("a TLS cell without a certificate"),
    };
    let id = match peer {
        Peer::Builtin(id) => *id,
        Peer::External { route, pid, .. } => {
            let base = match route {
                Route::Direct => Base::Direct,
                Route::L4(m) => Base::L4(m.clone()),
                Route::Proxy { addr, auth, .. } => Base::Proxy {
                    addr: *addr,
                    auth: auth.clone(),
                },
            };
            return Ok(Running {
                children: Vec::new(),
                measured: pid.map(|root| ProcTree { root }),
                device: None,
                base,
                caps: peer.caps(),
                dir: None,
            });
        }
    };
    if id == PeerId::Direct {
        return Ok(Running {
            children: Vec::new(),
            measured: None,
            device: None,
            base: Base::Direct,
            caps: id.caps(),
            dir: None,
        });
    }
    let dir = env.tmp.join(format!("{}-{}", id.name(), free_port()?));
    std::fs::create_dir_all(&dir)?;
    let mut run = Running {
        children: Vec::new(),
        measured: None,
        device: None,
        base: Base::Direct,
        caps: id.caps(),
        dir: Some(dir.clone()),
    };
    let port = free_port()?;
    let addr = local(port);
    let pcpus = env.proxy_cpus.as_deref();
    match id {
        PeerId::Direct => unreachable!("handled above"),
        PeerId::Splicegate
        | PeerId::SplicegateHttp
        | PeerId::SplicegateW2
        | PeerId::SplicegateAgent => {
            let mut agents_section = String::new();
            let node = if id == PeerId::SplicegateAgent {
                let pki = env
                    .pki
                    .as_ref()
                    .context("the agent listener needs the run's certificate")?;
                let ap = free_port()?;
                agents_section = agents_section_toml(local(ap), pki, AGENT_HEARTBEAT_S);
                format!("kind = \"agent\"\nkey = \"{AGENT_KEY}\"")
            } else if id == PeerId::SplicegateHttp {
                // The exit node stands for a remote machine: it runs on the
                // load generator's CPUs and its cost is not the gateway's.
                let np = free_port()?;
                let mut child = spawn(
                    "node-tinyproxy",
                    &program("tinyproxy")?,
                    &["-d", "-c", &tinyproxy_conf(&dir, np, "node-tinyproxy")?],
                    env.load_cpus.as_deref(),
                    &dir,
                )?;
                let ready = wait_ready("node-tinyproxy", &mut child, local(np), &dir);
                run.children.push(("node-tinyproxy".into(), child));
                ready?;
                format!("kind = \"http\"\naddr = \"{}\"", local(np))
            } else {
                "kind = \"direct\"\nbind = \"127.0.1.1\"".to_string()
            };
            // More direct nodes, when asked (the first is n1).
            let mut more_nodes = String::new();
            if id == PeerId::Splicegate {
                for i in 1..env.nodes {
                    more_nodes.push_str(&direct_node(i + 1, i));
                }
            }
            let (workers, cpus) = if id == PeerId::SplicegateW2 {
                (2, env.all_cpus.as_deref())
            } else {
                (env.workers, pcpus)
            };
            let tls_section = pki.map_or(String::new(), |p| {
                format!(
                    "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                    p.cert.display(),
                    p.key.display()
                )
            });
            let conf = dir.join("splicegate.toml");
            std::fs::write(
                &conf,
                format!(
                    "# splicegate-bench: one package, one node, loopback targets.\n\
                     {}{tls_section}{agents_section}\
                     [[package]]\nid = 1\nkey = \"{SG_KEY}\"\n\
                     [[node]]\nid = \"n1\"\n{node}\ncountry = \"us\"\n{more_nodes}",
                    splicegate_head(addr, workers)
                ),
            )?;
            let gw = env.gateway.to_string_lossy().into_owned();
            let gw_path = std::fs::canonicalize(&env.gateway).with_context(|| {
                format!("{gw} not found (cargo build --release -p splicegate, or --gateway PATH)")
            })?;
            let conf = conf.to_string_lossy().into_owned();
            run.launch(
                "splicegate",
                &gw_path,
                &["serve", "--config", &conf],
                cpus,
                &dir,
                addr,
            )?;
            run.base = proxy_with_auth(addr, SG_USER, SG_KEY);
            if id == PeerId::SplicegateAgent {
                start_agent(&mut run, env, &dir)?;
            }
        }
        PeerId::Haproxy | PeerId::Nginx => {
            let mut map = Vec::new();
            let mut conf = String::new();
            if id == PeerId::Haproxy {
                conf.push_str(
                    "global\n    nbthread 1\n    maxconn 6000\n\
                     defaults\n    mode tcp\n    option splice-auto\n    timeout connect 5s\n    \
                     timeout client 600s\n    timeout server 600s\n",
                );
            } else {
                if Path::new(NGINX_STREAM).exists() {
                    writeln!(conf, "load_module {NGINX_STREAM};")?;
                }
                writeln!(
                    conf,
                    "daemon off;\nmaster_process on;\nworker_processes 1;\nworker_rlimit_nofile 20000;\n\
                     pid {pid};\nerror_log {log} warn;\nevents {{ worker_connections 12000; }}\nstream {{",
                    pid = dir.join("nginx.pid").display(),
                    log = dir.join("error.log").display()
                )?;
            }
            let mut echo_front = addr;
            for (i, (name, target)) in env.targets.all().into_iter().enumerate() {
                let front = if i == 0 { addr } else { local(free_port()?) };
                if name == "echo" {
                    echo_front = front;
                }
                map.push((target, front));
                if id == PeerId::Haproxy {
                    // TLS terminated on the frontend (TLS 1.2 and 1.3,
                    // tickets on: OpenSSL's defaults), as splicegate's port.
                    let ssl = pki.map_or(String::new(), |p| {
                        format!(" ssl crt {} alpn http/1.1", p.combined.display())
                    });
                    writeln!(
                        conf,
                        "listen {name}\n    bind {front}{ssl}\n    server t {target}"
                    )?;
                } else {
                    writeln!(
                        conf,
                        "    server {{ listen {front}; proxy_pass {target}; proxy_timeout 600s; }}"
                    )?;
                }
            }
            if id == PeerId::Nginx {
                conf.push_str("}\n");
            }
            let (name, file) = if id == PeerId::Haproxy {
                ("haproxy", "haproxy.cfg")
            } else {
                ("nginx", "nginx.conf")
            };
            let path = dir.join(file);
            std::fs::write(&path, conf)?;
            let path = path.to_string_lossy().into_owned();
            let err = dir.join("error.log").to_string_lossy().into_owned();
            let prefix = format!("{}/", dir.display());
            let args: Vec<&str> = if id == PeerId::Haproxy {
                vec!["-db", "-f", &path]
            } else {
                vec!["-e", &err, "-p", &prefix, "-c", &path]
            };
            run.launch(name, &program(name)?, &args, pcpus, &dir, echo_front)
                .map_err(|e| anyhow!("{e} {}", log_tail(&dir, "error")))?;
            run.base = Base::L4(map);
        }
        PeerId::Rathole => {
            let pki = env
                .pki
                .as_ref()
                .context("rathole's TLS transport needs the run's certificate")?;
            let rathole = rathole_program(env).context("rathole is not installed")?;
            // native-tls (OpenSSL) takes the server's identity as PKCS#12.
            let pfx = dir.join("identity.pfx");
            let made = Command::new(program("openssl")?)
                .args(["pkcs12", "-export", "-passout", "pass:bench", "-out"])
                .arg(&pfx)
                .arg("-inkey")
                .arg(&pki.key)
                .arg("-in")
                .arg(&pki.cert)
                .stdin(Stdio::null())
                .output()
                .context("openssl pkcs12")?;
            if !made.status.success() {
                bail!(
                    "openssl pkcs12: {}",
                    String::from_utf8_lossy(&made.stderr).trim()
                );
            }
            let mut server = format!(
                "[server]\nbind_addr = \"{addr}\"\ndefault_token = \"bench\"\n\
                 [server.transport]\ntype = \"tls\"\n\
                 [server.transport.tls]\npkcs12 = \"{}\"\npkcs12_password = \"bench\"\n",
                pfx.display()
            );
            let mut client = format!(
                "[client]\nremote_addr = \"{addr}\"\ndefault_token = \"bench\"\n\
                 [client.transport]\ntype = \"tls\"\n\
                 [client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"{}\"\n",
                pki.cert.display(),
                crate::tls::SERVER_NAME
            );
            let mut map = Vec::new();
            let mut echo_front = addr;
            for (name, target) in env.targets.all() {
                let front = local(free_port()?);
                if name == "echo" {
                    echo_front = front;
                }
                map.push((target, front));
                writeln!(server, "[server.services.{name}]\nbind_addr = \"{front}\"")?;
                writeln!(
                    client,
                    "[client.services.{name}]\nlocal_addr = \"{target}\""
                )?;
            }
            let (sconf, cconf) = (dir.join("server.toml"), dir.join("client.toml"));
            std::fs::write(&sconf, server)?;
            std::fs::write(&cconf, client)?;
            let sconf = sconf.to_string_lossy().into_owned();
            let cconf = cconf.to_string_lossy().into_owned();
            run.launch(
                "rathole-server",
                &rathole,
                &["--server", &sconf],
                pcpus,
                &dir,
                addr,
            )?;
            let child = spawn(
                "rathole-client",
                &rathole,
                &["--client", &cconf],
                env.load_cpus.as_deref(),
                &dir,
            )?;
            run.device = Some(ProcTree { root: child.id() });
            run.children.push(("rathole-client".into(), child));
            run.base = Base::L4(map);
            // A service listens once its client's control channel is up.
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let probe = crate::client::dial(echo_front, None, Duration::from_secs(2)).and_then(
                    |mut s| {
                        s.write_all(b"ready?")?;
                        let mut b = [0u8; 6];
                        std::io::Read::read_exact(&mut s, &mut b)?;
                        Ok(())
                    },
                );
                match probe {
                    Ok(()) => break,
                    Err(e) if Instant::now() > deadline => bail!(
                        "no echo through rathole within 15 s ({e:#}): {} | {}",
                        log_tail(&dir, "rathole-server"),
                        log_tail(&dir, "rathole-client")
                    ),
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        }
        PeerId::Squid => {
            open_dir(&dir)?;
            let hash = Command::new(program("openssl")?)
                .args(["passwd", "-apr1", PEER_PASS])
                .output()
                .context("openssl passwd")?;
            let hash = String::from_utf8(hash.stdout)?.trim().to_string();
            let pw = dir.join("htpasswd");
            std::fs::write(&pw, format!("{PEER_USER}:{hash}\n"))?;
            let d = dir.display();
            let conf = dir.join("squid.conf");
            std::fs::write(
                &conf,
                format!(
                    "http_port {addr}\n\
                     visible_hostname splicegate-bench\n\
                     auth_param basic program {NCSA_AUTH} {pw}\n\
                     auth_param basic children 5 startup=1 idle=1\n\
                     auth_param basic realm splicegate-bench\n\
                     auth_param basic credentialsttl 2 hours\n\
                     acl authed proxy_auth REQUIRED\n\
                     http_access allow authed\n\
                     http_access deny all\n\
                     cache deny all\n\
                     cache_mem 8 MB\n\
                     access_log none\n\
                     cache_store_log none\n\
                     cache_log {d}/cache.log\n\
                     pid_filename {d}/squid.pid\n\
                     coredump_dir {d}\n\
                     max_filedescriptors 16384\n\
                     shutdown_lifetime 0 seconds\n\
                     forwarded_for delete\n\
                     via off\n",
                    pw = pw.display()
                ),
            )?;
            let conf = conf.to_string_lossy().into_owned();
            run.launch(
                "squid",
                &program("squid")?,
                &["-N", "-f", &conf],
                pcpus,
                &dir,
                addr,
            )
            .map_err(|e| anyhow!("{e} {}", log_tail(&dir, "cache")))?;
            run.base = proxy_with_auth(addr, PEER_USER, PEER_PASS);
        }
        PeerId::Tinyproxy => {
            let conf = tinyproxy_conf(&dir, port, "tinyproxy")?;
            run.launch(
                "tinyproxy",
                &program("tinyproxy")?,
                &["-d", "-c", &conf],
                pcpus,
                &dir,
                addr,
            )?;
            run.base = Base::Proxy { addr, auth: None };
        }
        PeerId::Dante => {
            dante_user()?;
            let conf = dir.join("danted.conf");
            std::fs::write(
                &conf,
                format!(
                    "logoutput: stderr\n\
                     internal: 127.0.0.1 port = {port}\n\
                     external: 127.0.0.1\n\
                     clientmethod: none\n\
                     socksmethod: username\n\
                     user.privileged: root\n\
                     user.unprivileged: nobody\n\
                     timeout.negotiate: 10\n\
                     timeout.io: 600\n\
                     client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}\n\
                     socks pass {{\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n  command: connect\n  socksmethod: username\n}}\n"
                ),
            )?;
            let conf = conf.to_string_lossy().into_owned();
            let pid = dir.join("danted.pid").to_string_lossy().into_owned();
            run.launch(
                "danted",
                &program("danted")?,
                &["-f", &conf, "-p", &pid],
                pcpus,
                &dir,
                addr,
            )?;
            run.base = proxy_with_auth(addr, PEER_USER, PEER_PASS);
        }
    }
    Ok(run)
}

/// The top of every generated splicegate config: `[proxy]` on `listen`
/// (port 0 allowed, see `serve --ready-file`), loopback targets allowed, no
/// per-source limits (one load-generator address would be rate-limited or,
/// after a probe's refused key, banned otherwise), warnings only.
pub(crate) fn splicegate_head(listen: SocketAddr, workers: usize) -> String {
    format!(
        "[proxy]\nlisten = \"{listen}\"\nworkers = {workers}\n\
         # taskset pins the process; the workers must not re-pin themselves.\n\
         pin_workers = false\n\
         [safety]\nallow_targets = [\"127.0.0.0/8\"]\n\
         [ebpf]\nsyn_rate = 0\nban_threshold = 0\n\
         [log]\nlevel = \"warn\"\n"
    )
}

/// The `agent` node's key in the generated config.
const AGENT_KEY: &str = "bench-agent-key-0123456789";
/// `[agents] heartbeat_s` of the throughput and setup cells (the default).
const AGENT_HEARTBEAT_S: u64 = 25;

/// `[agents]` on `listen` with the run's certificate.
pub(crate) fn agents_section_toml(listen: SocketAddr, pki: &Pki, heartbeat_s: u64) -> String {
    format!(
        "[agents]\nlisten = \"{listen}\"\ncert = \"{}\"\nkey = \"{}\"\nheartbeat_s = {heartbeat_s}\n",
        pki.cert.display(),
        pki.key.display()
    )
}

/// The `[agents] listen` address written in a config file.
fn agents_listen(conf: &str) -> Option<SocketAddr> {
    let at = conf.find("[agents]")?;
    conf[at..]
        .lines()
        .find_map(|l| l.strip_prefix("listen = "))
        .and_then(|v| v.trim_matches('"').parse().ok())
}

/// The device: `splicegate-agent` for node `n1`, on the load generator's
/// CPUs (it stands for a machine of its own), allowed to reach loopback
/// targets. Ready once a CONNECT through the gateway reaches the echo
/// target (the node is selectable once its presence is published).
fn start_agent(run: &mut Running, env: &Env, dir: &Path) -> Result<()> {
    let pki = env.pki.as_ref().context("no certificate")?;
    let conf = std::fs::read_to_string(dir.join("splicegate.toml"))?;
    let listen = agents_listen(&conf).context("no [agents] listen in the config")?;
    let key = dir.join("agent.key");
    std::fs::write(&key, AGENT_KEY)?;
    let program = std::fs::canonicalize(&env.agent)
        .with_context(|| format!("{} not found (--agent PATH)", env.agent.display()))?;
    let (gw, key, ca) = (
        listen.to_string(),
        key.to_string_lossy().into_owned(),
        pki.cert.to_string_lossy().into_owned(),
    );
    let child = spawn(
        "splicegate-agent",
        &program,
        &[
            "--gateway",
            &gw,
            "--id",
            "n1",
            "--key-file",
            &key,
            "--ca",
            &ca,
            "--server-name",
            crate::tls::SERVER_NAME,
            "--allow-private",
            "--max-streams",
            "4096",
        ],
        env.load_cpus.as_deref(),
        dir,
    )?;
    run.device = Some(ProcTree { root: child.id() });
    run.children.push(("splicegate-agent".into(), child));
    let route = run.route(Want::Connect);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let probe = crate::client::open_tunnel(
            &route,
            env.targets.echo,
            None,
            route.user_for(0, false).as_ref(),
            Duration::from_secs(2),
        );
        match probe {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!(
                "no CONNECT through the agent within 15 s ({e:#}): {} | {}",
                log_tail(dir, "splicegate"),
                log_tail(dir, "splicegate-agent")
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Squid drops to user `proxy`: let it write its log and pid there.
fn open_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))?;
    Ok(())
}

fn tinyproxy_conf(dir: &Path, port: u16, name: &str) -> Result<String> {
    let conf = dir.join(format!("{name}.conf"));
    // No ConnectPort line: every CONNECT port is allowed. No logging below
    // errors, as the other peers.
    std::fs::write(
        &conf,
        format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 12000\n\
             Allow 127.0.0.0/8\nLogLevel Error\nDisableViaHeader Yes\n"
        ),
    )?;
    Ok(conf.to_string_lossy().into_owned())
}

/// Dante checks usernames against the system's: a dedicated system user
/// `sgbench` with a fixed password (created once, needs root).
fn dante_user() -> Result<()> {
    if !is_root() {
        bail!("Dante's username method uses system users: creating {PEER_USER} needs root");
    }
    let exists = Command::new("id")
        .arg(PEER_USER)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !exists {
        let ok = Command::new(program("useradd")?)
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                PEER_USER,
            ])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("useradd {PEER_USER} failed");
        }
    }
    // MD5-crypt, the family of Squid's APR1 hash: Dante runs crypt(3) on
    // every connection, and Debian's default (yescrypt) costs milliseconds
    // by design, which would measure the hash instead of the proxy.
    let mut c = Command::new(program("chpasswd")?)
        .args(["-c", "MD5"])
        .stdin(Stdio::piped())
        .spawn()
        .context("chpasswd")?;
    c.stdin
        .take()
        .context("chpasswd stdin")?
        .write_all(format!("{PEER_USER}:{PEER_PASS}\n").as_bytes())?;
    if !c.wait()?.success() {
        bail!("chpasswd for {PEER_USER} failed");
    }
    Ok(())
}

/// One line naming the peer's version, for the report.
pub(crate) fn version(peer: &Peer, env: &Env) -> String {
    let (prog, arg) = match peer {
        Peer::Builtin(PeerId::Direct) | Peer::External { .. } => return String::new(),
        Peer::Builtin(PeerId::Splicegate | PeerId::SplicegateHttp | PeerId::SplicegateW2) => {
            return format!("{} (this tree)", env.gateway.display());
        }
        Peer::Builtin(PeerId::SplicegateAgent) => {
            return format!(
                "{} and {} (this tree)",
                env.gateway.display(),
                env.agent.display()
            );
        }
        Peer::Builtin(PeerId::Rathole) => {
            return rathole_program(env)
                .and_then(|p| Command::new(p).arg("--version").output().ok())
                .map(|o| {
                    // Several lines: keep the version's.
                    let text = String::from_utf8_lossy(&o.stdout).into_owned();
                    text.lines()
                        .find_map(|l| l.strip_prefix("Build Version:"))
                        .map(|v| format!("rathole {}", v.trim()))
                        .unwrap_or_else(|| text.lines().next().unwrap_or("").trim().to_string())
                })
                .unwrap_or_default();
        }
        Peer::Builtin(PeerId::Haproxy) => ("haproxy", "-v"),
        Peer::Builtin(PeerId::Nginx) => ("nginx", "-v"),
        Peer::Builtin(PeerId::Squid) => ("squid", "-v"),
        Peer::Builtin(PeerId::Tinyproxy) => ("tinyproxy", "-v"),
        Peer::Builtin(PeerId::Dante) => ("danted", "-v"),
    };
    find_program(prog)
        .and_then(|p| Command::new(p).arg(arg).output().ok())
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

/// A `direct` node `n<id>` declared for the bench's gateways, leaving from
/// 127.1.0.0 + `i`: outside 127.0.x.y, where the load generator's clients
/// and the targets are.
pub(crate) fn direct_node(id: usize, i: usize) -> String {
    let addr = std::net::Ipv4Addr::from(0x7f01_0000u32 + i as u32);
    format!("[[node]]\nid = \"n{id}\"\nkind = \"direct\"\nbind = \"{addr}\"\ncountry = \"us\"\n")
}
