//! The process as an operator places it: workers pinned inside the CPU mask
//! it was given, a proxy address another socket already holds refused at
//! start, and a stalled stderr that never stops a worker. Each test starts
//! the binary itself (a taskset prefix, a stderr pipe nobody reads) and
//! learns its ports from `--ready-file`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use splicegate_tests::client::connect_from;
use splicegate_tests::gateway::{binary, signal, temp_dir, wait_child, wait_ready};
use splicegate_tests::ops::http;

/// A minimal config: one worker, a direct node, package 1, and `extra`.
fn config(dir: &Path, listen: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"[proxy]
listen = "{listen}"
workers = 1
{extra}
[safety]
allow_targets = ["127.0.0.0/8"]

[[package]]
id = 1
key = "pk_process"

[[node]]
id = "d1"
kind = "direct"
bind = "127.0.1.91"
country = "us"
"#
    );
    let path = dir.join("splicegate.toml");
    std::fs::write(&path, text).expect("write the config");
    path
}

/// A gateway process that is killed when dropped, so a failing test leaves
/// none behind.
struct Running(Option<Child>);

impl Running {
    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `splicegate serve` on `config` behind `prefix` (e.g. `taskset -c 1`),
/// stderr as given; the child and its ready file.
fn spawn(prefix: &[&str], config: &Path, stderr: Stdio) -> (Running, serde_json::Value) {
    let dir = config.parent().expect("a directory");
    let ready = dir.join("ready.json");
    let bin = binary();
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    let mut child = cmd
        .arg("serve")
        .arg("--config")
        .arg(config)
        .arg("--ready-file")
        .arg(&ready)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn splicegate");
    let ready = wait_ready(&ready, Duration::from_secs(10), || {
        child.try_wait().ok().flatten()
    })
    .unwrap_or_else(|e| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("splicegate {e}")
    });
    (Running(Some(child)), ready)
}

/// SIGTERM, and wait for the exit (the drop kills it if it does not).
fn stop(mut running: Running) {
    if let Some(child) = running.0.as_mut() {
        signal(child.id(), "TERM");
        if wait_child(child, Duration::from_secs(10)).is_some() {
            running.0 = None;
        }
    }
}

fn addr(ready: &serde_json::Value, key: &str) -> SocketAddr {
    let v = if key == "proxy" {
        &ready["proxy"][0]
    } else {
        &ready[key]
    };
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in the ready file: {ready}"))
}

/// The `Cpus_allowed_list` of each thread of `pid`, by thread name.
fn thread_cpus(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir") {
        let t = t.expect("task").path();
        let name = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.join("status")).unwrap_or_default();
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or("")
            .trim()
            .to_string();
        out.push((name.trim().to_string(), cpus));
    }
    out
}

#[test]
fn workers_are_pinned_inside_the_cpu_mask_they_were_given() {
    // 1. Start the gateway under `taskset -c N`, N the last CPU this test
    //    may use (CPU 1 on a two-core machine), with pin_workers on.
    // 2. Worker 0 runs on N: the first CPU of its mask, not CPU 0.
    let mine = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = mine
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string();
    let last = list
        .split(',')
        .next_back()
        .and_then(|r| r.rsplit('-').next())
        .unwrap()
        .to_string();
    let dir = temp_dir("pin");
    let cfg = config(&dir, "127.0.0.1:0", "pin_workers = true\n");
    let (child, _ready) = spawn(&["taskset", "-c", &last], &cfg, Stdio::null());
    let threads = thread_cpus(child.id());
    let worker = threads
        .iter()
        .find(|(n, _)| n == "splicegate-w0")
        .unwrap_or_else(|| panic!("no worker thread: {threads:?}"));
    assert_eq!(worker.1, last, "worker 0's CPUs: {threads:?}");
    stop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_proxy_address_another_socket_holds_is_refused_at_start() {
    // 1. Another socket listens on 127.0.0.1:P with SO_REUSEPORT, as a second
    //    process of the same user could: the kernel would let the gateway
    //    share the address and split the clients between the two.
    // 2. The gateway refuses to start, and says why.
    use socket2::{Domain, Socket, Type};
    let other = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    other.set_reuse_port(true).unwrap();
    other
        .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
        .unwrap();
    other.listen(16).unwrap();
    let taken = other.local_addr().unwrap().as_socket().unwrap();
    let dir = temp_dir("portcheck");
    let cfg = config(&dir, &taken.to_string(), "");
    let out = Command::new(binary())
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .output()
        .expect("run splicegate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "it started on a taken address: {stderr}"
    );
    assert!(
        stderr.contains("another socket already listens"),
        "stderr: {stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stalled_stderr_never_stops_the_workers() {
    // 1. stderr is a pipe nobody reads, and every refused request logs a
    //    debug line: the pipe fills after a few hundred lines.
    // 2. 20,000 refused requests on keep-alive connections (more lines than
    //    the log queue holds) are all answered, each within five seconds.
    // 3. /metrics counts the log lines that were dropped instead.
    let dir = temp_dir("stderr");
    let cfg = config(
        &dir,
        "127.0.0.1:0",
        "\n[log]\nlevel = \"debug\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[store]\npath = \":memory:\"\n\n[ebpf]\nban_threshold = 0\n",
    );
    let (child, ready) = spawn(&[], &cfg, Stdio::piped());
    let proxy = addr(&ready, "proxy");
    let admin = addr(&ready, "admin");
    let started = Instant::now();
    let mut answered = 0;
    for c in 0..200 {
        let src = Ipv4Addr::new(127, 0, 4, 91 + (c % 4) as u8);
        let s = connect_from(src.into(), proxy).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut w = s.try_clone().expect("clone");
        let mut r = BufReader::new(s);
        for _ in 0..100 {
            // A rule that does not exist: 400 ERR_PARAMS, logged, keep-alive.
            let req = "GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\nProxy-Authorization: Basic cGFja2FnZS0xLWNvbnRyeS11czpwa19wcm9jZXNz\r\n\r\n";
            w.write_all(req.as_bytes()).expect("send");
            let mut status = String::new();
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                let n = r.read_line(&mut line).unwrap_or_else(|e| {
                    panic!("request {answered} was not answered: {e} (a worker blocked?)")
                });
                assert!(n > 0, "closed after {answered} answers");
                if status.is_empty() {
                    status = line.clone();
                } else if let Some(v) = line.strip_prefix("Content-Length: ") {
                    len = v.trim().parse().expect("a length");
                } else if line == "\r\n" {
                    break;
                }
            }
            assert!(status.starts_with("HTTP/1.1 400"), "{status}");
            let mut body = vec![0u8; len];
            r.read_exact(&mut body).expect("body");
            answered += 1;
        }
    }
    assert_eq!(answered, 20_000);
    let metrics = http(admin, "GET", "/metrics", None, None);
    let dropped = metrics
        .body
        .lines()
        .find_map(|l| l.strip_prefix("splicegate_log_dropped_lines_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no log-drop counter in /metrics:\n{}", metrics.body));
    assert!(dropped > 0.0, "nothing was dropped: was stderr read?");
    eprintln!(
        "20,000 refused requests in {:?} with stderr stalled; {dropped} log lines dropped",
        started.elapsed()
    );
    stop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

/// systemd's notify protocol (`Type=notify`): `READY=1` only once the
/// proxy port accepts, `RELOADING=1` then `READY=1` on SIGHUP, `STOPPING=1`
/// on SIGTERM, each from the gateway's own pid.
#[test]
fn tells_systemd_ready_reloading_and_stopping() {
    use splicegate_tests::gateway::Launch;
    use splicegate_tests::{Conf, Gateway, KEY, NodeDecl, node_ip};
    use std::os::unix::net::UnixDatagram;

    let dir = temp_dir("notify");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let conf = Conf::with_package(KEY).node(NodeDecl::direct("d1", node_ip()));
    let launch = Launch {
        env: vec![("NOTIFY_SOCKET".into(), sock_path.display().to_string())],
        ..Launch::default()
    };
    // Started on another thread: the first message is read while the
    // gateway starts, and the proxy port must already accept when it comes.
    let starter = std::thread::spawn(move || Gateway::start_with(&conf, launch));
    let mut buf = [0u8; 4096];
    let recv = |buf: &mut [u8]| -> String {
        let n = sock.recv(buf).expect("a notify message");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv(&mut buf);
    let gw = starter.join().unwrap();
    assert!(first.starts_with("READY=1\n"), "{first}");
    assert!(first.contains(&format!("MAINPID={}", gw.pid())), "{first}");
    // READY=1 is sent after the ready file, so the port accepts by now.
    assert!(std::net::TcpStream::connect(gw.proxy).is_ok());
    gw.signal("HUP");
    let reloading = recv(&mut buf);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    let again = recv(&mut buf);
    assert!(again.starts_with("READY=1\n"), "{again}");
    gw.signal("TERM");
    let stopping = recv(&mut buf);
    assert!(stopping.starts_with("STOPPING=1"), "{stopping}");
}
