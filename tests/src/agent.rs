//! Real `splicegate agent` processes for end-to-end tests: each runs the
//! binary under test with its own log file, and is stopped by its PID when
//! dropped.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::gateway::{binary, signal, temp_dir, wait_child};
use crate::tools::require_tool;

/// How to start an agent.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// Its node id.
    pub id: String,
    /// Its key (written to a key file), if it has one.
    pub key: Option<String>,
    /// The gateways' agent addresses.
    pub gateways: Vec<SocketAddr>,
    /// The CA file that verifies the gateway.
    pub ca: PathBuf,
    /// Extra arguments (`--allow-private`, `--country us`, …).
    pub args: Vec<String>,
    /// Environment (`SPLICEGATE_AGENT_ENROL_KEY`, …).
    pub env: Vec<(String, String)>,
    /// The network namespace to run in (`ip netns exec`), if any.
    pub netns: Option<String>,
}

impl AgentSpec {
    /// An agent `id` with `key` for `gateway`, verifying it with `ca`,
    /// allowed to reach private addresses (every test target is on loopback).
    pub fn new(id: &str, key: &str, gateway: SocketAddr, ca: &Path) -> AgentSpec {
        AgentSpec {
            id: id.into(),
            key: Some(key.into()),
            gateways: vec![gateway],
            ca: ca.to_path_buf(),
            args: vec!["--allow-private".into()],
            env: Vec::new(),
            netns: None,
        }
    }

    /// An agent `id` without a key that enrols with `secret` (given as
    /// `--enrol-key`) and keeps the key it is issued in `state_dir`.
    pub fn enrol(
        id: &str,
        secret: &str,
        state_dir: &Path,
        gateway: SocketAddr,
        ca: &Path,
    ) -> AgentSpec {
        AgentSpec {
            key: None,
            ..AgentSpec::new(id, "", gateway, ca)
        }
        .args(&["--enrol-key", secret])
        .state_dir(state_dir)
    }

    /// With `--state-dir dir`.
    pub fn state_dir(mut self, dir: &Path) -> AgentSpec {
        self.args.push("--state-dir".into());
        self.args.push(dir.display().to_string());
        self
    }

    /// Without a key of its own (a state directory's, or none).
    pub fn keyless(mut self) -> AgentSpec {
        self.key = None;
        self
    }

    /// Dialling these gateways (one connection to each).
    pub fn gateways(mut self, gateways: &[SocketAddr]) -> AgentSpec {
        self.gateways = gateways.to_vec();
        self
    }

    /// Run inside network namespace `ns`.
    pub fn in_netns(mut self, ns: &str) -> AgentSpec {
        self.netns = Some(ns.into());
        self
    }

    /// Adds arguments.
    pub fn args(mut self, args: &[&str]) -> AgentSpec {
        self.args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Without `--allow-private`.
    pub fn strict(mut self) -> AgentSpec {
        self.args.retain(|a| a != "--allow-private");
        self
    }
}

/// A running agent process.
#[derive(Debug)]
pub struct AgentProc {
    child: Child,
    /// Its directory (key file, state, log).
    pub dir: PathBuf,
    log: PathBuf,
    /// What started it.
    pub spec: AgentSpec,
}

impl AgentProc {
    /// Starts `splicegate agent` as `spec` says.
    pub fn start(spec: AgentSpec) -> AgentProc {
        let dir = temp_dir(&format!("agent-{}", spec.id));
        AgentProc::start_in(spec, dir)
    }

    /// Starts it in `dir` (a restart keeps its state directory).
    pub fn start_in(spec: AgentSpec, dir: PathBuf) -> AgentProc {
        let log = dir.join("agent.log");
        // `ip netns exec` execs the binary: the child's PID is the agent's.
        let mut cmd = match &spec.netns {
            None => Command::new(binary()),
            Some(ns) => {
                let mut c = Command::new(require_tool("ip", "iproute2"));
                c.args(["netns", "exec", ns]).arg(binary());
                c
            }
        };
        cmd.arg("agent").arg("--id").arg(&spec.id);
        for g in &spec.gateways {
            cmd.arg("--gateway").arg(g.to_string());
        }
        cmd.arg("--ca")
            .arg(&spec.ca)
            .arg("--server-name")
            .arg("localhost");
        if let Some(k) = &spec.key {
            let f = dir.join("key");
            fs::write(&f, k).expect("write the key file");
            cmd.arg("--key-file").arg(f);
        }
        cmd.args(&spec.args);
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        let child = cmd
            .env("SPLICEGATE_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("agent log"))
            .spawn()
            .expect("start splicegate agent");
        AgentProc {
            child,
            dir,
            log,
            spec,
        }
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it logged.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until it exits, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, timeout)
    }

    /// Sends it SIGTERM and waits (at most 10 s) for its exit status.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        signal(self.child.id(), "TERM");
        wait_child(&mut self.child, Duration::from_secs(10))
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        signal(self.child.id(), "KILL");
        let _ = wait_child(&mut self.child, Duration::from_secs(5));
    }

    /// Waits until its log contains `text`, at most `timeout`.
    pub fn wait_log(&self, text: &str, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if self.log().contains(text) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill();
        }
        if std::thread::panicking() {
            eprintln!("--- agent {} log ---\n{}\n---", self.spec.id, self.log());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
