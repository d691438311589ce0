//! A two-namespace lab: `srv` and `cli` joined by a veth pair, with private
//! addresses on both ends and nowhere else; nothing is routed out of it.
//! Code runs inside a namespace on a fresh thread that `setns`es into it.
//! Dropping the lab stops its servers and deletes both namespaces.

use std::{
    fs::File,
    io::{self, ErrorKind},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener},
    os::fd::AsFd as _,
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::packets as pk;

pub(crate) const SRV_IF: &str = "sgs0";
pub(crate) const CLI_IF: &str = "sgc0";
const SRV_MAC: &str = "02:53:47:00:00:01";
const CLI_MAC: &str = "02:53:47:00:00:02";
/// Client-side addresses configured on `sgc0`.
pub(crate) const CLIENT_HOSTS: [u8; 3] = [2, 3, 4];
/// Addresses nobody holds: the server's replies to them go to the client
/// namespace's MAC and die there, so a raw SYN from one draws no RST.
pub(crate) const GHOST_HOSTS: [u8; 2] = [50, 60];
/// Upper bound on any single thing the lab waits for.
const LAB_DEADLINE: Duration = Duration::from_secs(120);

static NEXT_LAB: AtomicU64 = AtomicU64::new(0);

/// Why a lab could not be built.
#[derive(Debug)]
pub(crate) enum LabError {
    /// Not allowed to create namespaces, or `ip` missing: the test skips.
    Unavailable(String),
    /// Anything else: the test fails.
    Failed(String),
}

fn run(cmd: &str, args: &[&str]) -> Result<Output, LabError> {
    let out = Command::new(cmd).args(args).output().map_err(|e| {
        if e.kind() == ErrorKind::NotFound {
            LabError::Unavailable(format!("{cmd} not found (install iproute2)"))
        } else {
            LabError::Failed(format!("{cmd} {args:?}: {e}"))
        }
    })?;
    if out.status.success() {
        return Ok(out);
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if stderr.contains("Operation not permitted") || stderr.contains("Permission denied") {
        return Err(LabError::Unavailable(format!(
            "{cmd} {}: {stderr}",
            args.join(" ")
        )));
    }
    Err(LabError::Failed(format!(
        "{cmd} {}: {stderr}",
        args.join(" ")
    )))
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub(crate) struct Netns {
    pub(crate) name: String,
}

impl Netns {
    fn create(name: String) -> Result<Self, LabError> {
        // Left over from a killed run of the same pid: remove it first.
        drop(
            Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(std::process::Stdio::null())
                .status(),
        );
        run("ip", &["netns", "add", &name])?;
        Ok(Self { name })
    }

    /// `ip -n NAME args...`
    pub(crate) fn ip(&self, args: &[&str]) -> Result<Output, LabError> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip netns exec NAME cmd...`, stdout as text.
    pub(crate) fn exec(&self, cmd: &[&str]) -> Result<String, LabError> {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(cmd);
        run("ip", &all).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Runs `f` on a new thread inside this namespace and returns its result
    /// (a panic in `f` is resumed here).
    pub(crate) fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let path = format!("/run/netns/{}", self.name);
        let handle = thread::spawn(move || {
            enter(&path);
            f()
        });
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Like [`Netns::run`] but returns at once with the thread's handle.
    pub(crate) fn spawn<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> JoinHandle<R> {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            enter(&path);
            f()
        })
    }
}

fn enter(path: &str) {
    let ns = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    rustix::thread::move_into_link_name_space(
        ns.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .unwrap_or_else(|e| panic!("setns {path}: {e}"));
}

impl Drop for Netns {
    fn drop(&mut self) {
        drop(
            Command::new("ip")
                .args(["netns", "del", &self.name])
                .status(),
        );
    }
}

/// A TCP listener inside a namespace that accepts and closes, until dropped.
#[derive(Debug)]
pub(crate) struct Server {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            drop(h.join());
        }
    }
}

#[derive(Debug)]
pub(crate) struct Lab {
    // Servers first: they stop before the namespaces go.
    servers: Vec<Server>,
    pub(crate) srv: Netns,
    pub(crate) cli: Netns,
    pub(crate) net: u8,
}

impl Lab {
    pub(crate) fn new(tag: &str) -> Result<Self, LabError> {
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let net = u8::try_from(10 + n % 200).unwrap_or(10);
        let pid = std::process::id();
        let srv = Netns::create(format!("sgt-{tag}-{pid}-s"))?;
        let cli = Netns::create(format!("sgt-{tag}-{pid}-c"))?;
        let lab = Self {
            servers: Vec::new(),
            srv,
            cli,
            net,
        };
        let cli_ns = lab.cli.name.clone();
        lab.srv.ip(&[
            "link", "add", SRV_IF, "address", SRV_MAC, "type", "veth", "peer", "name", CLI_IF,
            "address", CLI_MAC, "netns", &cli_ns,
        ])?;
        let srv_addr = format!("{}/24", lab.host(1));
        lab.srv.ip(&["addr", "add", &srv_addr, "dev", SRV_IF])?;
        for h in CLIENT_HOSTS {
            lab.cli
                .ip(&["addr", "add", &format!("{}/24", lab.host(h)), "dev", CLI_IF])?;
        }
        for (ns, dev) in [(&lab.srv, SRV_IF), (&lab.cli, CLI_IF)] {
            ns.ip(&["link", "set", "lo", "up"])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        // Static neighbours: no ARP in what the tests count.
        for h in CLIENT_HOSTS.iter().chain(GHOST_HOSTS.iter()) {
            lab.srv.ip(&[
                "neigh",
                "replace",
                &lab.host(*h).to_string(),
                "lladdr",
                CLI_MAC,
                "dev",
                SRV_IF,
                "nud",
                "permanent",
            ])?;
        }
        lab.cli.ip(&[
            "neigh",
            "replace",
            &lab.host(1).to_string(),
            "lladdr",
            SRV_MAC,
            "dev",
            CLI_IF,
            "nud",
            "permanent",
        ])?;
        Ok(lab)
    }

    /// `10.200.<net>.<h>`.
    pub(crate) const fn host(&self, h: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.net, h)
    }

    pub(crate) fn server_addr(&self) -> Ipv4Addr {
        self.host(1)
    }

    /// Starts a listener on `addr` in the server namespace.
    pub(crate) fn serve(&mut self, addr: SocketAddr) -> &Server {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let s = Arc::clone(&stop);
        let handle = self.srv.spawn(move || {
            let listener = TcpListener::bind(addr).expect("bind in the server namespace");
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            let deadline = Instant::now() + LAB_DEADLINE;
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((conn, _)) => drop(conn),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(1))
                    }
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server ready");
        self.servers.push(Server {
            stop,
            handle: Some(handle),
        });
        self.servers.last().unwrap()
    }

    /// Connects from `src` (a client host) to `dst`; the time it took, or why not.
    pub(crate) fn connect(
        &self,
        src: Ipv4Addr,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<Duration, io::Error> {
        self.cli.run(move || connect_from(src, dst, timeout))
    }

    /// Sends `count` raw SYNs from `src` to the server's `dport`, `per_ms`
    /// per millisecond at most; returns how long sending took.
    pub(crate) fn send_syns(&self, src: Ipv4Addr, dport: u16, count: u32, per_ms: u32) -> Duration {
        let dst = self.server_addr();
        self.cli
            .run(move || send_syns(src, dst, dport, count, per_ms))
    }

    /// Frames the client's veth failed to hand over (its `tx_dropped`).
    pub(crate) fn cli_tx_dropped(&self) -> u64 {
        self.cli_stat("tx_dropped")
    }

    /// A counter of the client's veth (`/sys/class/net/IF/statistics/NAME`).
    pub(crate) fn cli_stat(&self, name: &str) -> u64 {
        let path = format!("/sys/class/net/{CLI_IF}/statistics/{name}");
        self.cli
            .exec(&["cat", &path])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Half-open connections the server holds from `src`.
    pub(crate) fn syn_recv_from(&self, src: Ipv4Addr, port: u16) -> usize {
        let filter = format!("( dst {src} and sport = :{port} )");
        self.srv
            .exec(&["ss", "-Htn", "state", "syn-recv", &filter])
            .map(|s| s.lines().filter(|l| !l.trim().is_empty()).count())
            .unwrap_or(0)
    }
}

pub(crate) fn connect_from(
    src: Ipv4Addr,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<Duration, io::Error> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    sock.bind(&SockAddr::from(SocketAddrV4::new(src, 0)))?;
    let start = Instant::now();
    sock.connect_timeout(&SockAddr::from(dst), timeout)?;
    Ok(start.elapsed())
}

pub(crate) fn send_syns(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    count: u32,
    per_ms: u32,
) -> Duration {
    // IPPROTO_RAW: we write the IP header (and may use any source).
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255))).expect("raw socket");
    let to = SockAddr::from(SocketAddrV4::new(dst, 0));
    let packets: Vec<Vec<u8>> = (0..count)
        .map(|i| {
            let sport = u16::try_from(1024 + i % 64000).unwrap();
            pk::ip_tcp(IpAddr::V4(src), IpAddr::V4(dst), sport, dport, pk::SYN)
        })
        .collect();
    let start = Instant::now();
    let per_ms = per_ms.max(1) as usize;
    for (i, chunk) in packets.chunks(per_ms).enumerate() {
        for p in chunk {
            sock.send_to(p, &to).expect("raw send");
        }
        // Pace against the clock, not by sleeping a fixed time per chunk.
        let due = Duration::from_millis(u64::try_from(i + 1).unwrap());
        let el = start.elapsed();
        if due > el {
            thread::sleep(due - el);
        }
    }
    start.elapsed()
}
