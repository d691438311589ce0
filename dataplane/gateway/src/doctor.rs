//! `splicegate doctor`: is this machine ready for the gateway? Reads
//! `/proc` and `/sys` (or the roots it is given, so that a test can show it
//! a machine that lacks something) and, on the real machine, tries the
//! io_uring operations the workers use. Each finding says what to do.
//! Exit status 0 when nothing fails, 1 otherwise.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use crate::config::{Config, DEFAULT_UDP_GATHER_US};

/// What the checks are told beyond the machine.
#[derive(Debug)]
pub(crate) struct Options {
    pub proc_root: PathBuf,
    pub sys_root: PathBuf,
    /// Open tunnels to plan for (each holds two sockets, and two pipes
    /// while it splices).
    pub tunnels: u64,
    /// New connections per second to one node address.
    pub connect_rate: u64,
    /// The configuration it would serve, if given.
    pub config: Option<Config>,
}

/// How a finding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Ok,
    Warn,
    Fail,
}

/// One finding: what was seen and, unless it is fine, what to do.
#[derive(Debug)]
pub(crate) struct Finding {
    pub level: Level,
    pub what: String,
    pub fix: Option<String>,
}

fn ok(what: impl Into<String>) -> Finding {
    Finding {
        level: Level::Ok,
        what: what.into(),
        fix: None,
    }
}

fn warn(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        level: Level::Warn,
        what: what.into(),
        fix: Some(fix.into()),
    }
}

fn fail(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        level: Level::Fail,
        what: what.into(),
        fix: Some(fix.into()),
    }
}

/// The first io_uring operations the workers need and the kernel that has
/// them all: multishot accept (5.19), POLL_ADD, ASYNC_CANCEL.
const MIN_KERNEL: (u32, u32) = (5, 19);

/// The kernel whose ring waits can gather completions
/// (`IORING_FEAT_MIN_TIMEOUT`), which `[proxy] udp_gather_us` needs: what
/// doctor assumes when it reads another machine's files.
const GATHER_KERNEL: (u32, u32) = (6, 12);

/// Capability bits of `CapEff`.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What splicing may hold at once: `DEFAULT_MAX_PIPES` pipes of
/// `DEFAULT_PIPE_SIZE` bytes, in 4 KiB pages.
const PIPE_PAGES: u64 =
    (splicegate_uring::DEFAULT_MAX_PIPES * splicegate_uring::DEFAULT_PIPE_SIZE / 4096) as u64;

/// The listen backlog the workers ask for.
const BACKLOG: u64 = 4096;

/// How long a closed connection's port stays in TIME_WAIT.
const TIME_WAIT_S: u64 = 60;

struct Machine<'a> {
    opts: &'a Options,
}

impl Machine<'_> {
    fn proc(&self, rel: &str) -> Option<String> {
        fs::read_to_string(self.opts.proc_root.join(rel))
            .ok()
            .map(|s| s.trim().to_string())
    }

    fn proc_num(&self, rel: &str) -> Option<u64> {
        self.proc(rel)?.split_whitespace().next()?.parse().ok()
    }

    fn sys(&self, rel: &str) -> PathBuf {
        self.opts.sys_root.join(rel)
    }

    /// A line of `/proc/self/status`, e.g. `CapEff`.
    fn status(&self, key: &str) -> Option<String> {
        self.proc("self/status")?.lines().find_map(|l| {
            l.strip_prefix(key)
                .and_then(|r| r.strip_prefix(':'))
                .map(|v| v.trim().to_string())
        })
    }

    fn has_cap(&self, bit: u32) -> bool {
        self.status("CapEff")
            .and_then(|h| u64::from_str_radix(&h, 16).ok())
            .is_some_and(|caps| caps & (1 << bit) != 0)
    }

    /// The soft limit of a `/proc/self/limits` row.
    fn soft_limit(&self, row: &str) -> Option<String> {
        let limits = self.proc("self/limits")?;
        let line = limits.lines().find(|l| l.starts_with(row))?;
        line[row.len()..]
            .split_whitespace()
            .next()
            .map(str::to_string)
    }

    fn is_live(&self) -> bool {
        self.opts.proc_root == Path::new("/proc")
    }
}

/// Kernel release "6.18.0-1-amd64" → (6, 18).
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// "0-3,8,10-11" → [0, 1, 2, 3, 8, 10, 11].
fn cpu_list(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    out.extend(a..=b);
                }
            }
            None => out.extend(part.parse::<usize>().ok()),
        }
    }
    out
}

fn kernel(m: &Machine<'_>, out: &mut Vec<Finding>) {
    let Some(release) = m.proc("sys/kernel/osrelease") else {
        out.push(fail(
            "the kernel release is unreadable (sys/kernel/osrelease)",
            "run doctor where /proc is mounted",
        ));
        return;
    };
    match kernel_version(&release) {
        Some(v) if v >= MIN_KERNEL => out.push(ok(format!(
            "kernel {release}: has multishot accept, POLL_ADD and ASYNC_CANCEL (5.19 or later)"
        ))),
        _ => out.push(fail(
            format!("kernel {release} is older than 5.19: no multishot accept on io_uring"),
            "run a 5.19 or later kernel (6.1 LTS or later recommended)",
        )),
    }
    match m.proc_num("sys/kernel/io_uring_disabled") {
        None | Some(0) => out.push(ok("io_uring is enabled (kernel.io_uring_disabled = 0 or absent)")),
        Some(1) => out.push(fail(
            "kernel.io_uring_disabled = 1: only members of kernel.io_uring_group (and CAP_SYS_ADMIN) may create rings",
            "sysctl -w kernel.io_uring_disabled=0, or add the service user to the group kernel.io_uring_group names",
        )),
        Some(n) => out.push(fail(
            format!("kernel.io_uring_disabled = {n}: io_uring is disabled for every process"),
            "sysctl -w kernel.io_uring_disabled=0 (and persist it in /etc/sysctl.d/)",
        )),
    }
    // On this machine the probe's ring says whether waits can gather; a
    // copy of another machine's files (--proc-root) gives only its
    // kernel's version.
    let mut can_gather = kernel_version(&release).map(|v| v >= GATHER_KERNEL);
    if m.is_live() {
        match probe_ring() {
            Ok((setup, gathers)) => {
                out.push(ok(format!(
                    "io_uring probe: a ring was created ({}) and a multishot accept completed",
                    ring_setup_text(setup)
                )));
                can_gather = Some(gathers);
            }
            Err(e) => {
                out.push(fail(
                    format!("io_uring probe failed: {e}"),
                    "check kernel.io_uring_disabled, seccomp (SystemCallFilter must allow io_uring_setup, io_uring_enter, io_uring_register) and RLIMIT_MEMLOCK on kernels before 5.12",
                ));
                can_gather = None;
            }
        }
    }
    let gather_us = m
        .opts
        .config
        .as_ref()
        .map_or(DEFAULT_UDP_GATHER_US, |c| c.proxy.udp_gather_us);
    match (gather_us, can_gather) {
        (0, _) => out.push(ok(
            "[proxy] udp_gather_us = 0: SOCKS5 UDP runs are not gathered",
        )),
        (_, Some(true)) => out.push(ok(format!(
            "ring waits can gather completions (IORING_FEAT_MIN_TIMEOUT): [proxy] udp_gather_us = {gather_us} applies"
        ))),
        (_, Some(false)) => out.push(warn(
            format!(
                "kernel {release}: ring waits cannot gather completions (IORING_FEAT_MIN_TIMEOUT, Linux 6.12), so [proxy] udp_gather_us has no effect and SOCKS5 UDP datagrams that arrive in runs cost a wake each"
            ),
            "run Linux 6.12 or later where SOCKS5 UDP carries much (measured here: about 1.7 × the datagrams per CPU-second with a core of its own; docs/PERFORMANCE.md, SOCKS5 UDP), or set udp_gather_us = 0 to silence this",
        )),
        (_, None) => {}
    }
}

/// Creates a ring and accepts one loopback connection through it, as a
/// worker does: the ring's task work mode, and whether its waits can
/// gather completions.
fn probe_ring() -> std::io::Result<(splicegate_uring::RingSetup, bool)> {
    let rt = splicegate_uring::Runtime::new(splicegate_uring::RuntimeConfig::default())?;
    let setup = (rt.ring_setup(), rt.can_gather());
    rt.block_on(async {
        let l = splicegate_uring::TcpListener::bind("127.0.0.1:0".parse().expect("literal"), 4)?;
        let addr = l.local_addr()?;
        let client = std::net::TcpStream::connect(addr)?;
        let accepted = splicegate_uring::timeout(std::time::Duration::from_secs(2), l.accept())
            .await
            .map_err(|_| std::io::Error::other("the accept did not complete within 2 s"))??;
        drop((client, accepted));
        Ok(setup)
    })?
}

/// What a ring's task work mode means for an operator.
fn ring_setup_text(setup: splicegate_uring::RingSetup) -> &'static str {
    use splicegate_uring::RingSetup;
    match setup {
        RingSetup::DeferTaskrun => "DEFER_TASKRUN + SINGLE_ISSUER, the best mode",
        RingSetup::CoopSingleIssuer => {
            "COOP_TASKRUN + SINGLE_ISSUER; DEFER_TASKRUN needs Linux 6.1"
        }
        RingSetup::Coop => "COOP_TASKRUN; DEFER_TASKRUN needs Linux 6.1",
        RingSetup::Plain => {
            "no COOP_TASKRUN (Linux 5.19): completions interrupt the worker; DEFER_TASKRUN needs Linux 6.1"
        }
    }
}

fn bpf(m: &Machine<'_>, out: &mut Vec<Finding>) {
    let enabled = m.opts.config.as_ref().is_some_and(|c| c.ebpf.enabled);
    let (bad, note): (fn(String, String) -> Finding, &str) = if enabled {
        (|w, f| fail(w, f), "[ebpf] enabled = true")
    } else {
        (|w, f| warn(w, f), "needed only with [ebpf] enabled = true")
    };
    if m.sys("kernel/btf/vmlinux").is_file() {
        out.push(ok("BTF: /sys/kernel/btf/vmlinux is present"));
    } else {
        out.push(bad(
            format!("BTF: /sys/kernel/btf/vmlinux is missing ({note})"),
            "run a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's are)".into(),
        ));
    }
    let caps = [
        ("CAP_BPF", CAP_BPF),
        ("CAP_NET_ADMIN", CAP_NET_ADMIN),
        ("CAP_PERFMON", CAP_PERFMON),
    ];
    let missing: Vec<&str> = caps
        .iter()
        .filter(|(_, bit)| !m.has_cap(*bit) && !m.has_cap(CAP_SYS_ADMIN))
        .map(|(n, _)| *n)
        .collect();
    if missing.is_empty() {
        out.push(ok(
            "BPF privileges: CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (or CAP_SYS_ADMIN)",
        ));
    } else {
        out.push(bad(
            format!("BPF privileges: missing {} ({note})", missing.join(", ")),
            "AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON in the unit (or run as root)"
                .into(),
        ));
    }
    match m.soft_limit("Max locked memory") {
        Some(v) => out.push(ok(format!(
            "RLIMIT_MEMLOCK {v}: BPF maps are charged to the memory cgroup since 5.11, so this limit no longer applies"
        ))),
        None => out.push(warn(
            "RLIMIT_MEMLOCK is unreadable",
            "nothing to do on 5.11 or later kernels",
        )),
    }
}

fn descriptors(m: &Machine<'_>, out: &mut Vec<Finding>) {
    let need = 2 * m.opts.tunnels + 1024;
    let soft = m
        .soft_limit("Max open files")
        .and_then(|v| v.parse::<u64>().ok());
    let nr_open = m.proc_num("sys/fs/nr_open");
    match soft {
        Some(n) if n >= need => out.push(ok(format!(
            "open files: soft limit {n} ≥ {need} ({} tunnels × 2 sockets + 1,024)",
            m.opts.tunnels
        ))),
        Some(n) => out.push(fail(
            format!(
                "open files: soft limit {n} < {need} ({} tunnels × 2 sockets + 1,024): accepts fail with EMFILE and clients get 503 OVERLOADED",
                m.opts.tunnels
            ),
            format!(
                "LimitNOFILE= of at least {need} in the unit (the packaged unit sets 1048576), or ulimit -n {need}{}",
                nr_open
                    .filter(|&o| o < need)
                    .map(|o| format!("; fs.nr_open is {o}: raise it first (sysctl -w fs.nr_open={need})"))
                    .unwrap_or_default()
            ),
        )),
        None => out.push(warn("open files: the limit is unreadable", "check ulimit -n")),
    }
}

fn network(m: &Machine<'_>, out: &mut Vec<Finding>) {
    match m.proc_num("sys/net/core/somaxconn") {
        Some(n) if n >= BACKLOG => out.push(ok(format!(
            "net.core.somaxconn {n} ≥ {BACKLOG} (the workers' listen backlog)"
        ))),
        Some(n) => out.push(warn(
            format!("net.core.somaxconn {n} < {BACKLOG}: bursts of new clients overflow the accept queue (SYNs dropped, retried after 1 s)"),
            format!("sysctl -w net.core.somaxconn={BACKLOG}"),
        )),
        None => out.push(warn("net.core.somaxconn is unreadable", "check sysctl net.core.somaxconn")),
    }
    let tw_reuse = m.proc_num("sys/net/ipv4/tcp_tw_reuse");
    let range = m.proc("sys/net/ipv4/ip_local_port_range").and_then(|r| {
        let mut it = r.split_whitespace().filter_map(|p| p.parse::<u64>().ok());
        Some((it.next()?, it.next()?))
    });
    let rate = m.opts.connect_rate;
    match range {
        Some((lo, hi)) if hi >= lo => {
            let ports = hi - lo + 1;
            // A port leaves TIME_WAIT after 60 s, or is reused for a new
            // outgoing connection after 1 s with tcp_tw_reuse = 1.
            let hold = if tw_reuse == Some(1) { 1 } else { TIME_WAIT_S };
            let need = rate * hold;
            if ports >= need {
                out.push(ok(format!(
                    "ip_local_port_range {lo}–{hi}: {ports} ports ≥ {need} for {rate} connections/s to one node address (ports held {hold} s)"
                )));
            } else {
                out.push(fail(
                    format!("ip_local_port_range {lo}–{hi}: {ports} ports < {need} for {rate} connections/s to one node address (ports held {hold} s in TIME_WAIT): dials fail with EADDRNOTAVAIL"),
                    "sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\" and net.ipv4.tcp_tw_reuse=1",
                ));
            }
        }
        _ => out.push(warn(
            "ip_local_port_range is unreadable",
            "check sysctl net.ipv4.ip_local_port_range",
        )),
    }
    match tw_reuse {
        Some(1) => out.push(ok("net.ipv4.tcp_tw_reuse = 1: outgoing connections reuse TIME_WAIT ports")),
        Some(v) => out.push(warn(
            format!("net.ipv4.tcp_tw_reuse = {v}: ports to nodes off loopback stay in TIME_WAIT for 60 s"),
            "sysctl -w net.ipv4.tcp_tw_reuse=1",
        )),
        None => out.push(warn("net.ipv4.tcp_tw_reuse is unreadable", "check sysctl net.ipv4.tcp_tw_reuse")),
    }
}

fn cpus(m: &Machine<'_>, out: &mut Vec<Finding>) {
    let allowed = m
        .status("Cpus_allowed_list")
        .map(|l| cpu_list(&l))
        .unwrap_or_default();
    if allowed.is_empty() {
        out.push(warn("the CPU mask is unreadable", "check taskset -p $$"));
        return;
    }
    let workers = m
        .opts
        .config
        .as_ref()
        .map_or(allowed.len(), |c| c.proxy.workers.resolve());
    let placed: Vec<String> = (0..workers)
        .map(|i| {
            crate::cpus::for_worker(Some(&allowed), i, workers)
                .map_or_else(|| "-".to_string(), |c| c.to_string())
        })
        .collect();
    if workers <= allowed.len() {
        out.push(ok(format!(
            "CPU mask {} CPUs; {workers} workers pinned to CPUs {}",
            allowed.len(),
            placed.join(",")
        )));
    } else {
        out.push(warn(
            format!(
                "{workers} workers for {} CPUs in the mask: workers share cores and are not pinned",
                allowed.len()
            ),
            "set [proxy] workers to the CPUs the process may use (or \"auto\")",
        ));
    }
    // NUMA: which nodes the mask spans.
    let mut nodes = Vec::new();
    if let Ok(dir) = fs::read_dir(m.sys("devices/system/node")) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_prefix("node")
                .and_then(|n| n.parse::<usize>().ok())
                && let Ok(list) = fs::read_to_string(e.path().join("cpulist"))
            {
                let cpus = cpu_list(list.trim());
                if allowed.iter().any(|c| cpus.contains(c)) {
                    nodes.push(n);
                }
            }
        }
    }
    nodes.sort_unstable();
    match nodes.len() {
        0 | 1 => out.push(ok(format!(
            "NUMA: the mask is on {}",
            nodes
                .first()
                .map_or("one node".to_string(), |n| format!("node {n} alone"))
        ))),
        _ => out.push(warn(
            format!("NUMA: the mask spans nodes {nodes:?}: a worker's sockets may live on the other node's memory"),
            "run one gateway per NUMA node (CPUAffinity= and a listen address each), its NIC queues' IRQs on the same node (docs/tuning.md)",
        )),
    }
}

fn pipes(m: &Machine<'_>, out: &mut Vec<Finding>) {
    let exempt = m.has_cap(CAP_SYS_RESOURCE) || m.has_cap(CAP_SYS_ADMIN);
    match m.proc_num("sys/fs/pipe-user-pages-soft") {
        Some(0) => out.push(ok("fs.pipe-user-pages-soft = 0: no limit on pipe pages")),
        Some(_) if exempt => out.push(ok(
            "fs.pipe-user-pages-soft does not apply: the process has CAP_SYS_RESOURCE",
        )),
        Some(n) if n >= PIPE_PAGES => out.push(ok(format!(
            "fs.pipe-user-pages-soft {n} ≥ {PIPE_PAGES} pages (4,096 pipes of 256 KiB splicing at once)"
        ))),
        Some(n) => out.push(warn(
            format!("fs.pipe-user-pages-soft {n} < {PIPE_PAGES} pages: past it new pipes get one page and splice moves 4 KiB per call"),
            format!("sysctl -w fs.pipe-user-pages-soft={PIPE_PAGES} (or 0), or grant CAP_SYS_RESOURCE"),
        )),
        None => out.push(warn(
            "fs.pipe-user-pages-soft is unreadable",
            "check sysctl fs.pipe-user-pages-soft",
        )),
    }
}

/// Every finding, in the order printed.
pub(crate) fn examine(opts: &Options) -> Vec<Finding> {
    let m = Machine { opts };
    let mut out = Vec::new();
    kernel(&m, &mut out);
    bpf(&m, &mut out);
    descriptors(&m, &mut out);
    network(&m, &mut out);
    cpus(&m, &mut out);
    pipes(&m, &mut out);
    out
}

/// The report and whether the machine is ready (no failure).
pub(crate) fn report(opts: &Options) -> (String, bool) {
    let findings = examine(opts);
    let mut text = format!(
        "splicegate doctor: {} and {} ({} tunnels, {} connections/s per node address)\n",
        opts.proc_root.display(),
        opts.sys_root.display(),
        opts.tunnels,
        opts.connect_rate
    );
    for f in &findings {
        let tag = match f.level {
            Level::Ok => "ok  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        let _ = writeln!(text, "  {tag}  {}", f.what);
        if let Some(fix) = &f.fix {
            let _ = writeln!(text, "        fix: {fix}");
        }
    }
    let failed = findings.iter().filter(|f| f.level == Level::Fail).count();
    let warned = findings.iter().filter(|f| f.level == Level::Warn).count();
    let _ = writeln!(
        text,
        "{}: {failed} problem(s), {warned} warning(s)",
        if failed == 0 { "ready" } else { "not ready" }
    );
    (text, failed == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions_and_cpu_lists() {
        assert_eq!(kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0"), Some((5, 4)));
        assert_eq!(kernel_version("x"), None);
        assert_eq!(cpu_list("0-3,8,10-11"), [0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(cpu_list(""), Vec::<usize>::new());
    }
}
