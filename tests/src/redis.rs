//! A real `redis-server` for one test, listening on a Unix socket in a
//! temporary directory only (`--port 0`: no TCP port, so nothing is
//! guessed and nothing is reachable from elsewhere). Killed and removed
//! when dropped; [`Redis::kill`] and [`Redis::start_again`] make an outage.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::gateway::temp_dir;
use crate::tools::require_tool;

/// A running server.
#[derive(Debug)]
pub struct Redis {
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    /// Start one; panics with its log if it does not answer within 10 s.
    pub fn start() -> Redis {
        let mut r = Redis {
            dir: temp_dir("redis"),
            child: None,
        };
        r.start_again();
        r
    }

    /// The socket's path.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    /// The URL for `[fleet] redis`.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// Start the server (again, after [`Redis::kill`]) on the same socket
    /// and wait until it answers PING.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        let bin = require_tool("redis-server", "redis-server");
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::File::create(self.dir.join("redis.log")).expect("redis log");
        let child = Command::new(bin)
            .args(["--port", "0", "--unixsocket"])
            .arg(self.socket())
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
            ])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let answered =
            crate::eventually(Duration::from_secs(10), Duration::from_millis(20), || {
                (self.cli(&["PING"]) == "PONG").then_some(())
            });
        assert!(
            answered.is_some(),
            "redis-server did not answer: {}",
            self.log()
        );
    }

    /// SIGKILL the server (its data goes with it: no persistence).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// One command through `redis-cli`; its output, trimmed ("" when the
    /// server does not answer).
    pub fn cli(&self, args: &[&str]) -> String {
        cli(&self.socket(), args)
    }
}

fn cli(socket: &Path, args: &[&str]) -> String {
    Command::new("redis-cli")
        .arg("-s")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
