//! The real `splicegate` binary, started per test.

use std::collections::HashMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};

use crate::conf::Conf;

/// How long a gateway may take to write its ready file.
const START_TIMEOUT: Duration = Duration::from_secs(15);

static DIR_SEQ: AtomicU32 = AtomicU32::new(0);

/// The `splicegate` binary beside the test executable
/// (`target/debug/deps/<test>` → `target/debug/splicegate`), or
/// `$SPLICEGATE_BIN`.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SPLICEGATE_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "SPLICEGATE_BIN={} is not a file", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test executable has a directory");
    let dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent")
    } else {
        deps
    };
    let bin = dir.join("splicegate");
    assert!(
        bin.is_file(),
        "the splicegate binary is missing at {}: run `cargo build --workspace --bins` before `cargo test` (or set SPLICEGATE_BIN)",
        bin.display()
    );
    bin
}

/// A fresh, empty temporary directory for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "splicegate-test-{tag}-{}-{}-{nanos}",
        std::process::id(),
        DIR_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// Send `sig` (`TERM`, `KILL`, `HUP`, …) to `pid`, with the shell's `kill`
/// builtin (no procps needed, no unsafe code here). Whether it was
/// delivered.
pub fn signal(pid: u32, sig: &str) -> bool {
    Command::new("sh")
        .args(["-c", "kill -s \"$0\" \"$1\"", sig, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Wait for `child` to exit, at most `timeout`.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running gateway: its process, directory, ports and log. The directory
/// is removed when the test passes, unless `SPLICEGATE_TEST_KEEP` is set.
#[derive(Debug)]
pub struct Gateway {
    child: Child,
    exited: Option<ExitStatus>,
    /// Set by [`Gateway::restart`]: the next process uses the directory.
    keep_dir: bool,
    /// The test's temporary directory (config, store, log).
    pub dir: PathBuf,
    /// The proxy port's address.
    pub proxy: SocketAddr,
    /// What each placeholder got: `PROXY`, `ADMIN`, `ECHO` and every
    /// `@PORT_<NAME>@` of a `[[listener]]`, as the gateway bound them.
    ports: HashMap<String, SocketAddr>,
    /// The ready file, parsed (`serve --ready-file`).
    ready: serde_json::Value,
    config_path: PathBuf,
    log_path: PathBuf,
    /// How the process was started ([`Gateway::start_with`]); a restart
    /// starts it the same way.
    launch: Launch,
}

/// How to start the binary beyond its configuration.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// An open-files limit (soft and hard, as `ulimit -n` sets them before
    /// the exec).
    pub nofile: Option<u64>,
    /// Environment variables to add (`NOTIFY_SOCKET`, …).
    pub env: Vec<(String, String)>,
}

impl Gateway {
    /// Start the binary on `conf`; panics (with the gateway's stderr) if it
    /// does not serve within 10 s.
    pub fn start_conf(conf: &Conf) -> Gateway {
        Gateway::start(&conf.toml())
    }

    /// Start the binary on `toml` (with placeholders, see [`crate::conf`]).
    pub fn start(toml: &str) -> Gateway {
        match Gateway::try_start(toml) {
            Ok(g) => g,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// [`Gateway::start`], returning the failure instead of panicking.
    pub fn try_start(toml: &str) -> anyhow::Result<Gateway> {
        Gateway::try_start_in(temp_dir("gw"), HashMap::new(), toml, Launch::default())
    }

    /// [`Gateway::start_conf`], started as `launch` says.
    pub fn start_with(conf: &Conf, launch: Launch) -> Gateway {
        match Gateway::try_start_in(temp_dir("gw"), HashMap::new(), &conf.toml(), launch) {
            Ok(g) => g,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// [`Gateway::start_conf`] under an open-files limit of `nofile` (soft
    /// and hard, as `ulimit -n` sets them before the exec): for descriptor
    /// exhaustion. The limit must be in place from the start: io_uring
    /// reads it when an accept is armed, so a `prlimit` on the running
    /// process would not do.
    pub fn start_with_nofile(conf: &Conf, nofile: u64) -> Gateway {
        Gateway::start_with(
            conf,
            Launch {
                nofile: Some(nofile),
                ..Launch::default()
            },
        )
    }

    /// Start the binary on `toml` in `dir` (kept when the gateway drops),
    /// placeholders named in `ports` on those addresses' ports; panics (with
    /// the gateway's stderr) if it does not serve.
    pub fn start_in(dir: PathBuf, ports: HashMap<String, SocketAddr>, toml: &str) -> Gateway {
        match Gateway::try_start_in(dir, ports, toml, Launch::default()) {
            Ok(mut g) => {
                g.keep_dir = true;
                g
            }
            Err(e) => panic!("{e:#}"),
        }
    }

    /// What each placeholder got (see [`Gateway::addr`]).
    pub fn ports(&self) -> &HashMap<String, SocketAddr> {
        &self.ports
    }

    /// Stop this gateway (SIGTERM, wait up to 10 s) and start the binary
    /// again on the same directory (store), ports and config file.
    pub fn restart(self) -> Gateway {
        self.restart_after("TERM")
    }

    /// Send `sig` (`KILL` for a crash) unless the process already ended,
    /// wait up to 10 s for it to end, and start the binary again on the same
    /// directory (store), ports and config file.
    pub fn restart_after(mut self, sig: &str) -> Gateway {
        if self.try_exit().is_none() {
            self.signal(sig);
        }
        let st = self.wait_exit(Duration::from_secs(10));
        assert!(
            st.is_some(),
            "splicegate did not exit on SIG{sig} within 10 s"
        );
        let text = fs::read_to_string(&self.config_path).expect("config");
        self.keep_dir = true;
        let (dir, ports, launch) = (self.dir.clone(), self.ports.clone(), self.launch.clone());
        drop(self);
        match Gateway::try_start_in(dir, ports, &text, launch) {
            Ok(g) => g,
            Err(e) => panic!("restart after SIG{sig}: {e:#}"),
        }
    }

    /// Start the binary with `--ready-file`: placeholders not in `ports`
    /// get port 0, and the ports the gateway bound are read from the ready
    /// file (never guessed).
    fn try_start_in(
        dir: PathBuf,
        mut ports: HashMap<String, SocketAddr>,
        toml: &str,
        launch: Launch,
    ) -> anyhow::Result<Gateway> {
        let bin = binary();
        let text = render(toml, &dir, &ports);
        let config_path = dir.join("splicegate.toml");
        fs::write(&config_path, &text)?;
        let ready_path = dir.join("ready.json");
        let _ = fs::remove_file(&ready_path);
        let log_path = dir.join("stderr.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        // Under a limit, through the shell's `ulimit`, which then execs the
        // binary (same process, no unsafe `pre_exec` here).
        let mut cmd = match launch.nofile {
            None => Command::new(&bin),
            Some(n) => {
                let mut c = Command::new("sh");
                c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\"")])
                    .arg(&bin);
                c
            }
        };
        let spawned = cmd
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .arg("--ready-file")
            .arg(&ready_path)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .env("RUST_BACKTRACE", "1")
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e).with_context(|| format!("spawn {}", bin.display()));
            }
        };
        let mut gw = Gateway {
            child,
            exited: None,
            keep_dir: false,
            dir,
            proxy: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            ports: HashMap::new(),
            ready: serde_json::Value::Null,
            config_path,
            log_path,
            launch,
        };
        let ready = wait_ready(&ready_path, START_TIMEOUT, || gw.try_exit());
        let ready = match ready {
            Ok(v) => v,
            Err(why) => bail!("splicegate {why}; config:\n{text}\nstderr:\n{}", gw.log()),
        };
        ports.extend(bound_addrs(toml, &ready)?);
        // The file with the real ports, so that a restart binds them again.
        fs::write(&gw.config_path, render(toml, &gw.dir, &ports))?;
        gw.proxy = *ports
            .get("PROXY")
            .context("the ready file names no proxy")?;
        gw.ports = ports;
        gw.ready = ready;
        Ok(gw)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The port a `@PORT_<name>@` placeholder got.
    pub fn port(&self, name: &str) -> u16 {
        self.addr(name).port()
    }

    /// The address the gateway bound for a placeholder: `PROXY`, `ADMIN`,
    /// `ECHO` (`[demo] echo_listen`) or the `<name>` of a `[[listener]]`
    /// on `@PORT_<name>@`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        *self
            .ports
            .get(name)
            .unwrap_or_else(|| panic!("the gateway bound no address for @PORT_{name}@"))
    }

    /// The ready file the gateway wrote (`serve --ready-file`), parsed.
    pub fn ready(&self) -> &serde_json::Value {
        &self.ready
    }

    /// Send a signal by PID.
    pub fn signal(&self, sig: &str) {
        assert!(
            signal(self.pid(), sig),
            "could not send SIG{sig} to splicegate (pid {}); stderr:\n{}",
            self.pid(),
            self.log_tail(30)
        );
    }

    /// Write a new config (same placeholders, same ports) and send SIGHUP,
    /// then give the gateway a moment to swap its policy.
    pub fn reload(&mut self, toml: &str) {
        let text = render(toml, &self.dir, &self.ports);
        fs::write(&self.config_path, text).expect("write config");
        self.signal("HUP");
        std::thread::sleep(Duration::from_millis(300));
    }

    /// [`Gateway::reload`] from a [`Conf`].
    pub fn reload_conf(&mut self, conf: &Conf) {
        self.reload(&conf.toml());
    }

    /// The config file's path.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Everything the gateway wrote to stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The exit status, if it exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Wait for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = wait_child(&mut self.child, timeout);
        }
        self.exited
    }

    /// The process's thread count (`Threads:` of `/proc/PID/status`).
    pub fn threads(&self) -> usize {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("Threads: line")
    }

    /// The names of the process's threads (`/proc/PID/task/*/comm`).
    pub fn thread_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        if let Ok(rd) = fs::read_dir(format!("/proc/{}/task", self.pid())) {
            for e in rd.flatten().take(100_000) {
                if let Ok(n) = fs::read_to_string(e.path().join("comm")) {
                    names.push(n.trim().to_string());
                }
            }
        }
        names
    }

    /// The last `n` lines of the log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = wait_child(&mut self.child, Duration::from_secs(5));
        }
        // Whatever a test checked, the gateway must never have panicked.
        if !std::thread::panicking() && self.log().contains("panicked at") {
            let tail = self.log_tail(80);
            self.keep_dir = true;
            panic!(
                "splicegate panicked during this test (log kept in {}):\n{tail}",
                self.dir.display()
            );
        }
        if std::thread::panicking() {
            eprintln!(
                "--- splicegate stderr (last 60 lines; full log in {}) ---\n{}\n---",
                self.log_path.display(),
                self.log_tail(60)
            );
        } else if !self.keep_dir && std::env::var_os("SPLICEGATE_TEST_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Fill the placeholders: `@PROXY@`, `@ADMIN@` (`127.0.0.1:<port>`),
/// `@DIR@`, `@PORT_<NAME>@` (a port number). A name in `ports` gets its
/// port (a restart, a reload); any other gets 0, for the gateway to bind
/// and report in its ready file.
pub fn render(toml: &str, dir: &Path, ports: &HashMap<String, SocketAddr>) -> String {
    fill(toml, dir, |name| {
        ports.get(name).map_or(0, SocketAddr::port)
    })
}

/// `toml` with `@DIR@` replaced and every port placeholder replaced by
/// `port(name)`.
fn fill(toml: &str, dir: &Path, mut port: impl FnMut(&str) -> u16) -> String {
    let mut out = toml
        .replace("@PROXY@", &format!("127.0.0.1:{}", port("PROXY")))
        .replace("@ADMIN@", &format!("127.0.0.1:{}", port("ADMIN")))
        .replace("@DIR@", &dir.display().to_string());
    for _ in 0..1000 {
        let Some(start) = out.find("@PORT_") else {
            break;
        };
        let rest = &out[start + 6..];
        let Some(end) = rest.find('@') else {
            break;
        };
        let p = port(&rest[..end]);
        out.replace_range(start..start + 6 + end + 1, &p.to_string());
    }
    out
}

/// Wait for the ready file at `path`, at most `timeout`; `exited` says
/// whether the process ended meanwhile (then it never will be ready).
pub fn wait_ready(
    path: &Path,
    timeout: Duration,
    mut exited: impl FnMut() -> Option<ExitStatus>,
) -> Result<serde_json::Value, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = fs::read_to_string(path) {
            return serde_json::from_str(&text)
                .map_err(|e| format!("wrote a ready file that is not JSON ({e}): {text}"));
        }
        if let Some(st) = exited() {
            return Err(format!("exited with {st} before serving"));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "wrote no ready file ({}) within {timeout:?}",
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The placeholder names of the addresses the ready file reports: `PROXY`,
/// `ADMIN`, `ECHO`, and the `@PORT_<NAME>@` in the `listen` line of each
/// `[[listener]]` of `toml` (matched in file order).
fn bound_addrs(
    toml: &str,
    ready: &serde_json::Value,
) -> anyhow::Result<HashMap<String, SocketAddr>> {
    let parse = |v: &serde_json::Value| -> anyhow::Result<SocketAddr> {
        v.as_str()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not an address in the ready file: {v}"))
    };
    let mut out = HashMap::new();
    out.insert("PROXY".to_string(), parse(&ready["proxy"][0])?);
    if !ready["admin"].is_null() {
        out.insert("ADMIN".to_string(), parse(&ready["admin"])?);
    }
    if !ready["demo_echo"].is_null() {
        out.insert("ECHO".to_string(), parse(&ready["demo_echo"])?);
    }
    if !ready["agents"].is_null() {
        out.insert("AGENTS".to_string(), parse(&ready["agents"])?);
    }
    let listeners = ready["listeners"].as_array().cloned().unwrap_or_default();
    let names = listener_names(toml);
    if names.len() != listeners.len() {
        bail!(
            "the config has {} [[listener]] tables, the ready file {}",
            names.len(),
            listeners.len()
        );
    }
    for (name, l) in names.into_iter().zip(&listeners) {
        if let Some(name) = name {
            out.insert(name, parse(&l["addr"])?);
        }
    }
    Ok(out)
}

/// For each `[[listener]]` table of `toml`, in order: the `<NAME>` of the
/// `@PORT_<NAME>@` placeholder in its `listen` line, if it has one.
fn listener_names(toml: &str) -> Vec<Option<String>> {
    let mut names = Vec::new();
    let mut in_listener = false;
    for line in toml.lines().map(str::trim) {
        if line.starts_with('[') {
            in_listener = line == "[[listener]]";
            if in_listener {
                names.push(None);
            }
        } else if in_listener && line.starts_with("listen") {
            let name = line
                .split_once("@PORT_")
                .and_then(|(_, rest)| rest.split_once('@'))
                .map(|(name, _)| name.to_string());
            if let Some(last) = names.last_mut() {
                *last = name;
            }
        }
    }
    names
}

/// Run `splicegate check-config` on `toml` (placeholders filled); returns
/// the exit code and stderr.
pub fn check_config(toml: &str) -> (i32, String) {
    let dir = temp_dir("check");
    // Nothing is bound: each name gets a distinct port number, one name
    // the same one everywhere (so "the same address twice" stays so).
    let mut ports: HashMap<String, u16> = HashMap::new();
    let text = fill(toml, &dir, |name| {
        let next = 1024 + ports.len() as u16;
        *ports.entry(name.to_string()).or_insert(next)
    });
    let path = dir.join("check.toml");
    fs::write(&path, text).expect("write config");
    let mut child = Command::new(binary())
        .arg("check-config")
        .arg(&path)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn splicegate check-config");
    let status = wait_child(&mut child, Duration::from_secs(10));
    let status = match status {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("splicegate check-config did not finish in 10 s");
        }
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    let _ = fs::remove_dir_all(&dir);
    (status.code().unwrap_or(-1), err)
}
