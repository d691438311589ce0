//! A network namespace joined to the host by a point-to-point link, for
//! tests that need a network they can cut or slow down: a device (an agent)
//! runs inside, the gateway on the host end.
//!
//! Each [`NetLink`] makes its own namespace and link, with addresses from
//! its own /30 of `10.201.0.0/16` (chosen from the process id and a counter,
//! skipping any address an interface already has), and removes both when
//! dropped. Two kinds of link:
//!
//! - [`NetLink::veth`]: a veth pair; delay, rate and loss come from qdiscs on
//!   its ends ([`NetLink::qdisc`], [`NetLink::cut`]).
//! - [`NetLink::delay_line`]: two TUN devices joined by
//!   `scripts/agents/delayline.py`, a user-space delay line (delay, rate and
//!   a drop-tail queue each way), for kernels built without `sch_netem`.
//!
//! Needs root. [`netns_ready`] says whether a test can run here, and prints
//! a visible `SKIPPED` line when it cannot.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::gateway::{signal, wait_child};
use crate::tools::require_tool;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Prints `SKIPPED <test>: <why>` on the process's stderr directly, past
/// the test harness's capture (which only takes `print!`/`eprint!`), so
/// that a skip shows in every `cargo test` run.
pub fn print_skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {why}");
}

/// Whether a test that needs network namespaces can run here. As root
/// (CI), `ip` and `tc` must be installed (`scripts/install-test-deps`
/// installs iproute2): a missing one fails the test. Not root: the test is
/// skipped with a visible line, unless `SPLICEGATE_REQUIRE_NETNS=1`.
pub fn netns_ready(test: &str) -> bool {
    if !crate::is_root() {
        if std::env::var_os("SPLICEGATE_REQUIRE_NETNS").is_some_and(|v| v == "1") {
            panic!("{test} needs root (network namespaces), and SPLICEGATE_REQUIRE_NETNS=1");
        }
        print_skip(test, "needs root (network namespaces, veth, tc)");
        return false;
    }
    require_tool("ip", "iproute2");
    require_tool("tc", "iproute2");
    true
}

/// Runs `program args`; panics with its output when it fails.
fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `program args`; whether it succeeded (its output dropped).
fn try_run(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The output of `program args`, empty when it failed.
fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// A sysctl's value in the host's (this process's) namespace, whitespace
/// squeezed.
pub fn host_sysctl(key: &str) -> String {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A /30 of 10.201.0.0/16 no interface here has: (host end, namespace end).
fn free_subnet() -> (Ipv4Addr, Ipv4Addr) {
    let have = output("ip", &["-o", "-4", "addr", "show"]);
    let start = std::process::id().wrapping_mul(131);
    for _ in 0..16_384 {
        let i = (start.wrapping_add(SEQ.fetch_add(1, Ordering::Relaxed))) % 16_384;
        let (a, b) = ((i / 64) as u8, ((i % 64) * 4) as u8);
        let host = Ipv4Addr::new(10, 201, a, b + 1);
        let ns = Ipv4Addr::new(10, 201, a, b + 2);
        if !have.contains(&format!(" {host}/")) && !have.contains(&format!(" {ns}/")) {
            return (host, ns);
        }
    }
    panic!("no free /30 in 10.201.0.0/16")
}

/// Whether this kernel has `sch_netem` (built in or loadable): a netem
/// qdisc can be added to a fresh veth of `link`.
fn probe_netem(dev: &str) -> bool {
    let ok = try_run(
        "tc",
        &["qdisc", "add", "dev", dev, "root", "netem", "delay", "0ms"],
    );
    if ok {
        let _ = try_run("tc", &["qdisc", "del", "dev", dev, "root"]);
    }
    ok
}

/// The user-space delay line's settings.
#[derive(Debug, Clone, Copy)]
pub struct DelayLine {
    /// One-way delay, each way.
    pub delay: Duration,
    /// Rate each way, in bits per second.
    pub rate_bps: u64,
    /// Packets a direction holds at most (in its delay line and its rate
    /// queue); more are dropped (drop-tail).
    pub limit: usize,
}

/// A namespace joined to the host by a link; removed when dropped.
#[derive(Debug)]
pub struct NetLink {
    /// The namespace's name.
    pub ns: String,
    /// The host end's interface.
    pub host_if: String,
    /// The namespace end's interface.
    pub ns_if: String,
    /// The host end's address.
    pub host_ip: Ipv4Addr,
    /// The namespace end's address.
    pub ns_ip: Ipv4Addr,
    /// The user-space delay line, when the link is one.
    line: Option<Child>,
    /// Its log.
    line_log: Option<PathBuf>,
}

impl NetLink {
    fn names(tag: &str) -> (String, String, String) {
        let n = SEQ.fetch_add(1, Ordering::Relaxed) % 100;
        let pid = std::process::id();
        // Interface names have at most 15 bytes: the pid in hex (at most
        // 0x400000 on Linux) keeps them at 11.
        (
            format!("sg-{tag}-{pid}-{n}"),
            format!("sg{pid:x}x{n}h"),
            format!("sg{pid:x}x{n}n"),
        )
    }

    /// Removes the namespaces of test processes that died without
    /// dropping their links (killed by a timeout): `sg-<tag>-<pid>-<n>`
    /// whose pid is gone. Their veths go with them.
    fn sweep() {
        for line in output("ip", &["netns", "list"]).lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            let mut parts = name.rsplitn(3, '-');
            let (Some(_n), Some(pid), Some(prefix)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if prefix.starts_with("sg-")
                && pid.parse::<u32>().is_ok()
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = try_run("ip", &["netns", "del", name]);
            }
        }
    }

    fn new(tag: &str) -> NetLink {
        NetLink::sweep();
        let (ns, host_if, ns_if) = NetLink::names(tag);
        let (host_ip, ns_ip) = free_subnet();
        run("ip", &["netns", "add", &ns]);
        NetLink {
            ns,
            host_if,
            ns_if,
            host_ip,
            ns_ip,
            line: None,
            line_log: None,
        }
    }

    /// Addresses both ends and brings them (and the namespace's loopback) up.
    fn address(&self) {
        let host = format!("{}/30", self.host_ip);
        let ns = format!("{}/30", self.ns_ip);
        run("ip", &["addr", "add", &host, "dev", &self.host_if]);
        run("ip", &["link", "set", &self.host_if, "up"]);
        run(
            "ip",
            &["-n", &self.ns, "addr", "add", &ns, "dev", &self.ns_if],
        );
        run("ip", &["-n", &self.ns, "link", "set", &self.ns_if, "up"]);
        run("ip", &["-n", &self.ns, "link", "set", "lo", "up"]);
    }

    /// A namespace joined by a veth pair.
    pub fn veth(tag: &str) -> NetLink {
        let link = NetLink::new(tag);
        run(
            "ip",
            &[
                "link",
                "add",
                &link.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &link.ns_if,
            ],
        );
        run("ip", &["link", "set", &link.ns_if, "netns", &link.ns]);
        link.address();
        link
    }

    /// A namespace joined by two TUN devices and the user-space delay line
    /// between them (`python3 scripts/agents/delayline.py`).
    pub fn delay_line(tag: &str, line: DelayLine) -> NetLink {
        let python = require_tool("python3", "python3");
        let mut link = NetLink::new(tag);
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/agents/delayline.py");
        let log = std::env::temp_dir().join(format!("{}-delayline.log", link.ns));
        let mut child = Command::new(python)
            .arg(&script)
            .args([&link.host_if, &link.ns_if])
            .arg(format!("{}", line.delay.as_secs_f64() * 1000.0))
            .arg(line.rate_bps.to_string())
            .arg(line.limit.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("delay line log"))
            .spawn()
            .expect("start the delay line");
        // It prints `ready` once both TUN devices exist.
        let mut first = String::new();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let _ = r.read_line(&mut first);
            let _ = tx.send(first);
            // Keep reading (and dropping) whatever else it prints.
            let mut sink = String::new();
            for _ in 0..1000 {
                sink.clear();
                if r.read_line(&mut sink).unwrap_or(0) == 0 {
                    break;
                }
            }
        });
        let ready = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        link.line = Some(child);
        link.line_log = Some(log.clone());
        assert_eq!(
            ready.trim(),
            "ready",
            "the delay line did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        run("ip", &["link", "set", &link.ns_if, "netns", &link.ns]);
        link.address();
        link
    }

    /// Whether the kernel has `sch_netem` (probed on this link's host end,
    /// which must be a veth).
    pub fn has_netem(&self) -> bool {
        probe_netem(&self.host_if)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`
    /// execs it: the child's PID is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Sets a sysctl inside the namespace (`net.ipv4.tcp_wmem` →
    /// `/proc/sys/net/ipv4/tcp_wmem`), and returns what it reads back.
    pub fn sysctl(&self, key: &str, value: &str) -> String {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.ns,
                "sh",
                "-c",
                "printf '%s' \"$1\" > \"$0\"",
                &path,
                value,
            ],
        );
        self.read_sysctl(key)
    }

    /// A sysctl's value inside the namespace.
    pub fn read_sysctl(&self, key: &str) -> String {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        output("ip", &["netns", "exec", &self.ns, "cat", &path])
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Replaces the root qdisc of both ends with `spec` (`netem delay 50ms
    /// ...`), or of the host end only.
    pub fn qdisc(&self, both: bool, spec: &[&str]) {
        let mut host = vec!["qdisc", "replace", "dev", &self.host_if, "root"];
        host.extend_from_slice(spec);
        run("tc", &host);
        if both {
            let mut ns = vec![
                "-n",
                &self.ns,
                "qdisc",
                "replace",
                "dev",
                &self.ns_if,
                "root",
            ];
            ns.extend_from_slice(spec);
            run("tc", &ns);
        }
    }

    /// Removes the root qdiscs of both ends.
    pub fn clear_qdiscs(&self) {
        let _ = try_run("tc", &["qdisc", "del", "dev", &self.host_if, "root"]);
        let _ = try_run(
            "tc",
            &["-n", &self.ns, "qdisc", "del", "dev", &self.ns_if, "root"],
        );
    }

    /// Cuts the link silently, both ends: every packet dropped, no RST, no
    /// ICMP, the interfaces up. `netem loss 100%` where the kernel has netem;
    /// else a token bucket whose bucket (1 byte) is smaller than any packet,
    /// which tbf drops. Returns the qdisc used, for the test's output.
    pub fn cut(&self) -> String {
        let spec: &[&str] = if self.has_netem() {
            &["netem", "loss", "100%"]
        } else {
            &["tbf", "rate", "8kbit", "burst", "1", "limit", "1"]
        };
        self.qdisc(true, spec);
        spec.join(" ")
    }

    /// Ends a [`NetLink::cut`].
    pub fn restore(&self) {
        self.clear_qdiscs();
    }

    /// The host end's qdisc with its counters (`tc -s qdisc show`).
    pub fn qdisc_stats(&self) -> String {
        output("tc", &["-s", "qdisc", "show", "dev", &self.host_if])
    }

    /// What the delay line logged (empty for a veth).
    pub fn line_log(&self) -> String {
        self.line_log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }
}

/// `splicegate-test-source` (a bulk source, `tests/src/bin`) running inside
/// a namespace; stopped by its PID when dropped.
#[derive(Debug)]
pub struct NsSource {
    child: Child,
    /// The port it listens on (every address of the namespace).
    pub port: u16,
}

impl NetLink {
    /// Starts a bulk source inside the namespace that sends each connection
    /// `bytes` bytes, and lives at most `lifetime`.
    pub fn source(&self, bytes: u64, lifetime: Duration) -> NsSource {
        let bin = crate::gateway::binary().with_file_name("splicegate-test-source");
        assert!(
            bin.is_file(),
            "{} is missing: run `cargo build --workspace --bins`",
            bin.display()
        );
        let mut child = self
            .command(&bin)
            .args(["0.0.0.0:0", &bytes.to_string()])
            .arg(lifetime.as_secs().max(1).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the source");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.port());
        let Some(port) = port else {
            let _ = child.kill();
            let _ = wait_child(&mut child, Duration::from_secs(3));
            panic!("the source did not start: {line:?}");
        };
        NsSource { child, port }
    }
}

impl Drop for NsSource {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = wait_child(&mut self.child, Duration::from_secs(3));
    }
}

impl Drop for NetLink {
    fn drop(&mut self) {
        if let Some(mut c) = self.line.take() {
            let _ = signal(c.id(), "TERM");
            if wait_child(&mut c, Duration::from_secs(3)).is_none() {
                let _ = c.kill();
                let _ = wait_child(&mut c, Duration::from_secs(3));
            }
        }
        if let Some(log) = self.line_log.take() {
            if std::thread::panicking() {
                eprintln!(
                    "--- delay line log ---\n{}\n---",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let _ = std::fs::remove_file(log);
        }
        // The host end first (a veth's peer goes with it), then the
        // namespace; its removal is asynchronous in the kernel, so wait
        // (bounded) until the name is gone.
        let _ = try_run("ip", &["link", "del", &self.host_if]);
        let _ = try_run("ip", &["netns", "del", &self.ns]);
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until && output("ip", &["netns", "list"]).contains(&self.ns) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
