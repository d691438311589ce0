//! Third-party programs the tests drive: Debian's `tinyproxy` (an `http`
//! node), `microsocks` (a `socks5` node), `curl` (the client) and `haproxy`
//! (a load balancer sending the PROXY protocol). A missing
//! program fails the test with the apt package to install; it never skips.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::gateway::{signal, temp_dir, wait_child};

/// The path of `bin` on `$PATH`; panics naming the apt package otherwise.
pub fn require_tool(bin: &str, apt_package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]) {
        let p = dir.join(bin);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{bin}` is not installed; these tests need it: apt-get install -y {apt_package}");
}

/// A child process stopped by its PID: SIGTERM, then SIGKILL.
#[derive(Debug)]
struct Proc {
    child: Option<Child>,
    name: &'static str,
}

impl Proc {
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take()
            && c.try_wait().ok().flatten().is_none()
        {
            let _ = signal(c.id(), "TERM");
            if wait_child(&mut c, Duration::from_secs(2)).is_none() {
                let _ = c.kill();
                let _ = wait_child(&mut c, Duration::from_secs(2));
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `log`, opened for appending (created when missing), as a child's output.
fn log_to(log: &std::path::Path) -> Stdio {
    Stdio::from(
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log"),
    )
}

/// Wait until `addr` accepts, at most 5 s; an error (with the log) when
/// the process exits first, e.g. because another process took its port.
fn wait_listening(
    addr: SocketAddr,
    child: &mut Child,
    name: &str,
    log: &std::path::Path,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!(
                "{name} exited with {st} before listening on {addr}: {}",
                fs::read_to_string(log).unwrap_or_default()
            ));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not listen on {addr} within 5 s: {}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How many ports a third-party program is tried on: it cannot bind port 0
/// and report the port, so a port that was free when picked may be taken
/// by the time it binds; it then exits and gets another.
const PORT_ATTEMPTS: usize = 5;

/// Run `launch(port)` on fresh free ports of `ip` until one listens.
fn on_a_free_port(ip: Ipv4Addr, name: &str, mut launch: impl FnMut(u16) -> Result<(), String>) {
    let mut why = String::new();
    for _ in 0..PORT_ATTEMPTS {
        match launch(crate::addr::free_port(IpAddr::V4(ip))) {
            Ok(()) => return,
            Err(e) => why = e,
        }
    }
    panic!("{name} did not start on any of {PORT_ATTEMPTS} ports; the last: {why}");
}

/// `tinyproxy` in the foreground on `ip:port`, its outgoing connections
/// bound to `ip`, every CONNECT port allowed.
#[derive(Debug)]
pub struct Tinyproxy {
    proc: Proc,
    ip: Ipv4Addr,
    port: u16,
    dir: PathBuf,
}

impl Tinyproxy {
    /// Write the config and start it (on another port when the first is
    /// taken meanwhile).
    pub fn start(ip: Ipv4Addr) -> Tinyproxy {
        require_tool("tinyproxy", "tinyproxy");
        let mut t = Tinyproxy {
            proc: Proc {
                child: None,
                name: "tinyproxy",
            },
            ip,
            port: 0,
            dir: temp_dir("tinyproxy"),
        };
        on_a_free_port(ip, "tinyproxy", |port| {
            t.port = port;
            t.launch()
        });
        t
    }

    /// Start it again after [`Tinyproxy::stop`], on the same port.
    pub fn restart(&mut self) {
        if let Err(e) = self.launch() {
            panic!("restarting tinyproxy: {e}");
        }
    }

    fn launch(&mut self) -> Result<(), String> {
        if self.proc.child.is_some() {
            return Ok(());
        }
        let conf = self.dir.join("tinyproxy.conf");
        // No ConnectPort line: tinyproxy then allows CONNECT to every port.
        fs::write(
            &conf,
            format!(
                "Port {port}\nListen {ip}\nBind {ip}\nTimeout 60\nMaxClients 200\nAllow 127.0.0.0/8\nLogLevel Info\nDisableViaHeader Yes\n",
                port = self.port,
                ip = self.ip
            ),
        )
        .expect("write tinyproxy.conf");
        let log = self.dir.join("tinyproxy.log");
        let mut child = Command::new(require_tool("tinyproxy", "tinyproxy"))
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log_to(&log))
            .stderr(log_to(&log))
            .spawn()
            .expect("spawn tinyproxy");
        wait_listening(self.addr(), &mut child, self.proc.name, &log)?;
        self.proc.child = Some(child);
        Ok(())
    }

    /// Stop the process (by PID).
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), self.port)
    }

    /// Its log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("tinyproxy.log")).unwrap_or_default()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        self.proc.stop();
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// `microsocks -i ip -p port -b ip [-u user -P pass]`.
#[derive(Debug)]
pub struct Microsocks {
    proc: Proc,
    ip: Ipv4Addr,
    port: u16,
    dir: PathBuf,
}

impl Microsocks {
    /// Start it, with credentials if given (on another port when the first
    /// is taken meanwhile).
    pub fn start(ip: Ipv4Addr, creds: Option<(&str, &str)>) -> Microsocks {
        let bin = require_tool("microsocks", "microsocks");
        let dir = temp_dir("microsocks");
        let log = dir.join("microsocks.log");
        let mut started = None;
        on_a_free_port(ip, "microsocks", |port| {
            let mut cmd = Command::new(&bin);
            cmd.args([
                "-i",
                &ip.to_string(),
                "-p",
                &port.to_string(),
                "-b",
                &ip.to_string(),
            ]);
            if let Some((u, p)) = creds {
                cmd.args(["-u", u, "-P", p]);
            }
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(log_to(&log))
                .stderr(log_to(&log))
                .spawn()
                .expect("spawn microsocks");
            let addr = SocketAddr::new(IpAddr::V4(ip), port);
            wait_listening(addr, &mut child, "microsocks", &log)?;
            started = Some((child, port));
            Ok(())
        });
        let (child, port) = started.expect("on_a_free_port returns once started");
        Microsocks {
            proc: Proc {
                child: Some(child),
                name: "microsocks",
            },
            ip,
            port,
            dir,
        }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), self.port)
    }

    /// Stop the process (by PID).
    pub fn stop(&mut self) {
        self.proc.stop();
    }
}

impl Drop for Microsocks {
    fn drop(&mut self) {
        self.proc.stop();
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Dante (`danted`), a SOCKS5 server that serves UDP ASSOCIATE: internal
/// and external address `ip`, no authentication, loopback clients only.
#[derive(Debug)]
pub struct Dante {
    proc: Proc,
    ip: Ipv4Addr,
    port: u16,
    dir: PathBuf,
}

impl Dante {
    /// Start it (on another port when the first is taken meanwhile).
    pub fn start(ip: Ipv4Addr) -> Dante {
        let bin = require_tool("danted", "dante-server");
        let dir = temp_dir("dante");
        let log = dir.join("danted.log");
        let conf = dir.join("danted.conf");
        let mut started = None;
        on_a_free_port(ip, "danted", |port| {
            // Its privileged and unprivileged users only when it can switch.
            let users = if crate::is_root() {
                "user.privileged: root\nuser.unprivileged: nobody\n"
            } else {
                ""
            };
            fs::write(
                &conf,
                format!(
                    "logoutput: stderr\ninternal: {ip} port = {port}\nexternal: {ip}\n\
                     clientmethod: none\nsocksmethod: none\n{users}\
                     client pass {{\n from: 127.0.0.0/8 to: 0.0.0.0/0\n log: error\n}}\n\
                     socks pass {{\n from: 127.0.0.0/8 to: 0.0.0.0/0\n command: connect udpassociate\n log: error\n}}\n\
                     socks pass {{\n from: 0.0.0.0/0 to: 127.0.0.0/8\n command: udpreply\n log: error\n}}\n"
                ),
            )
            .map_err(|e| e.to_string())?;
            let mut child = Command::new(&bin)
                .arg("-f")
                .arg(&conf)
                .arg("-N")
                .arg("1")
                .stdin(Stdio::null())
                .stdout(log_to(&log))
                .stderr(log_to(&log))
                .spawn()
                .expect("spawn danted");
            let addr = SocketAddr::new(IpAddr::V4(ip), port);
            wait_listening(addr, &mut child, "danted", &log)?;
            started = Some((child, port));
            Ok(())
        });
        let (child, port) = started.expect("on_a_free_port returns once started");
        Dante {
            proc: Proc {
                child: Some(child),
                name: "danted",
            },
            ip,
            port,
            dir,
        }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), self.port)
    }

    /// What it logged.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("danted.log")).unwrap_or_default()
    }
}

impl Drop for Dante {
    fn drop(&mut self) {
        self.proc.stop();
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Debian's HAProxy in TCP mode in front of a gateway port, sending the
/// PROXY protocol header (`send-proxy` for v1, `send-proxy-v2` for v2) on
/// each connection it relays, from its own source address.
///
/// Its port comes from the kernel without a guess: the test binds and
/// listens on `ip:0` itself and hands the listening socket to HAProxy as
/// its standard input (`bind fd@0`, HAProxy's way of taking an inherited
/// socket). The port is known before HAProxy runs and never free in
/// between; connections that come before HAProxy accepts wait in the
/// socket's backlog.
#[derive(Debug)]
pub struct Haproxy {
    proc: Proc,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Haproxy {
    /// Listen on a kernel-chosen port of `ip` and relay each connection to
    /// `backend` from `source` (the load balancer's address as the gateway
    /// sees it), with `server_options` on its server line
    /// (`"send-proxy-v2"`, `"send-proxy"`).
    pub fn start(
        ip: Ipv4Addr,
        backend: SocketAddr,
        source: Ipv4Addr,
        server_options: &str,
    ) -> Haproxy {
        let bin = require_tool("haproxy", "haproxy");
        let dir = temp_dir("haproxy");
        let log = dir.join("haproxy.log");
        let conf = dir.join("haproxy.cfg");
        fs::write(
            &conf,
            format!(
                "global\n    nbthread 1\n    maxconn 512\n    log stderr format raw local0 info\n\n\
                 defaults\n    mode tcp\n    log global\n    option tcplog\n    timeout connect 5s\n    \
                 timeout client 30s\n    timeout server 30s\n\n\
                 frontend fe\n    bind fd@0\n    default_backend be\n\n\
                 backend be\n    server gw {backend} {server_options} source {source}\n"
            ),
        )
        .expect("write haproxy.cfg");
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&SocketAddr::from((ip, 0)).into())
            .expect("bind haproxy's port");
        socket.listen(128).expect("listen");
        let addr = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("haproxy's address");
        // The file checked first (with the socket it will get), so a
        // mistake shows as HAProxy's words, not as a test's closed connection.
        let check = Command::new(&bin)
            .arg("-c")
            .arg("-f")
            .arg(&conf)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(
                socket.try_clone().expect("dup the socket"),
            )))
            .output()
            .expect("run haproxy -c");
        assert!(
            check.status.success(),
            "haproxy -c refused {}: {}{}",
            conf.display(),
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new(&bin)
            .arg("-db")
            .arg("-f")
            .arg(&conf)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(socket)))
            .stdout(log_to(&log))
            .stderr(log_to(&log))
            .spawn()
            .expect("spawn haproxy");
        Haproxy {
            proc: Proc {
                child: Some(child),
                name: "haproxy",
            },
            addr,
            dir,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it logged (a line per relayed connection).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.proc.stop();
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
