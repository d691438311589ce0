//! The SYN-flood measurement (`ebpf/flood.sh`; ignored by default): one
//! spoofed namespace address floods a listener with `hping3 --flood` for a few
//! seconds, with no program, with native XDP and with TC; a well-behaved
//! client from another address connects every 20 ms meanwhile. Reports the
//! listener process's CPU, the machine's CPU, and the client's connect latency.

use std::{
    io::Write as _,
    net::{SocketAddr, SocketAddrV4},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use super::{
    lab::{Lab, LabError, SRV_IF, connect_from},
    skip,
};
use crate::{AttachMode, Enforcer, EnforcerConfig, VerdictCounters};

const PORT: u16 = 5000;
const FLOOD_SECS: u64 = 5;

fn out(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// utime + stime of a process, in seconds.
fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    // After the command: state, ppid, ..., utime (14th field of the line), stime.
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (field(11) + field(12)) as f64 / 100.0
}

/// (busy, softirq, total) jiffies over all CPUs.
fn system_cpu() -> (u64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = cpu.iter().take(8).sum();
    let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
    (total - idle, cpu.get(6).copied().unwrap_or(0), total)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

struct Listener(Child);

impl Drop for Listener {
    fn drop(&mut self) {
        drop(self.0.kill());
        drop(self.0.wait());
    }
}

fn scenario(lab: &Lab, name: &str, enforcer: Option<&Enforcer>, flood: bool, listener_pid: u32) {
    let server = lab.server_addr();
    let good = lab.host(2);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let client = lab.cli.spawn(move || {
        let mut lat = Vec::new();
        let mut failed = 0u32;
        let deadline = Instant::now() + Duration::from_secs(FLOOD_SECS + 10);
        while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
            let dst = SocketAddr::V4(SocketAddrV4::new(server, PORT));
            match connect_from(good, dst, Duration::from_secs(3)) {
                Ok(d) => lat.push(d),
                Err(_) => failed += 1,
            }
            thread::sleep(Duration::from_millis(20));
        }
        (lat, failed)
    });
    let counters_before = enforcer.map(|e| e.counters().unwrap()).unwrap_or_default();
    let tx0 = lab.cli_stat("tx_packets");
    let lost0 = lab.cli_tx_dropped();
    let cpu0 = process_cpu(listener_pid);
    let sys0 = system_cpu();
    let t0 = Instant::now();
    if flood {
        let spoofed = lab.host(50).to_string();
        let target = server.to_string();
        let secs = FLOOD_SECS.to_string();
        let port = PORT.to_string();
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.cli.name,
                "timeout",
                "-s",
                "INT",
                &secs,
                "hping3",
                "-q",
                "-S",
                "-p",
                &port,
            ])
            .args(["--flood", "-a", &spoofed, &target])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("hping3");
    } else {
        thread::sleep(Duration::from_secs(FLOOD_SECS));
    }
    let secs = t0.elapsed().as_secs_f64();
    let sys1 = system_cpu();
    let cpu1 = process_cpu(listener_pid);
    let tx1 = lab.cli_stat("tx_packets");
    let lost = lab.cli_tx_dropped() - lost0;
    stop.store(true, Ordering::Relaxed);
    let (mut lat, failed) = client.join().unwrap();
    lat.sort_unstable();
    let counters: VerdictCounters = enforcer.map(|e| e.counters().unwrap()).unwrap_or_default();
    let dropped = counters.drop_rate.packets - counters_before.drop_rate.packets;
    let (busy, softirq, total) = (sys1.0 - sys0.0, sys1.1 - sys0.1, sys1.2 - sys0.2);
    out(&format!(
        "{name:<20} sent {:>7.0} pkt/s, veth lost {lost:>8} | listener CPU {:>5.2} s ({:>5.1}%) | all CPUs busy {:>5.1}% (softirq {:>5.1}%, {:>5.0} ns/pkt) | \
         good client: {} connects, {} failed, p50 {:>7.3} ms, p99 {:>7.3} ms, max {:>7.3} ms | drop_rate {}",
        (tx1 - tx0) as f64 / secs,
        cpu1 - cpu0,
        100.0 * (cpu1 - cpu0) / secs,
        100.0 * busy as f64 / total.max(1) as f64,
        100.0 * softirq as f64 / total.max(1) as f64,
        // softirq CPU time (jiffies of 10 ms over all CPUs) per packet sent
        softirq as f64 * 1e7 / ((tx1 - tx0).max(1) as f64),
        lat.len(),
        failed,
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        dropped,
    ));
}

#[test]
#[ignore = "a measurement, not a test: run ebpf/flood.sh"]
fn flood_measurement() {
    let test = "flood_measurement";
    if Command::new("hping3").arg("--version").output().is_err() {
        skip(test, "hping3 not installed (apt-get install -y hping3)");
        return;
    }
    let Some(_) = super::load_or_skip(test, &[], 0, 0) else {
        return;
    };
    let lab = match Lab::new("flood") {
        Ok(lab) => lab,
        Err(LabError::Unavailable(why)) => return skip(test, &why),
        Err(LabError::Failed(why)) => panic!("{why}"),
    };
    // The listener: a separate process (accept and close), so its CPU is its own.
    let py = format!(
        "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind(('0.0.0.0',{PORT}))\ns.listen(4096)\nwhile True:\n    c,_=s.accept()\n    c.close()\n"
    );
    let child = Command::new("ip")
        .args(["netns", "exec", &lab.srv.name, "python3", "-c", &py])
        .stdout(Stdio::null())
        .spawn()
        .expect("python3 listener");
    let listener = Listener(child);
    let pid = listener.0.id();
    thread::sleep(Duration::from_millis(500));

    let cpus = thread::available_parallelism().map_or(1, usize::from);
    out(&format!(
        "SYN flood: hping3 --flood -S from one spoofed address {} -> {}:{PORT} for {FLOOD_SECS} s; \
         good client {} connects every 20 ms; {cpus} CPUs; listener: python3 accept+close (pid {pid})",
        lab.host(50),
        lab.server_addr(),
        lab.host(2)
    ));
    scenario(&lab, "no flood, no program", None, false, pid);
    scenario(&lab, "flood, no program", None, true, pid);
    let cfg = |mode| EnforcerConfig {
        interface: SRV_IF.into(),
        mode,
        proxy_ports: vec![PORT],
        // Above the good client's 50 connects/s: only the flood is limited.
        syn_rate: 100,
        syn_burst: 100,
    };
    for (mode, what) in [
        (AttachMode::Xdp, "flood, native XDP"),
        (AttachMode::Tc, "flood, TC (tcx)"),
        (AttachMode::XdpGeneric, "flood, generic XDP"),
    ] {
        let e = lab
            .srv
            .run(move || Enforcer::attach(&cfg(mode)))
            .unwrap_or_else(|err| panic!("attach {mode:?}: {err:?}"));
        scenario(&lab, what, Some(&e), true, pid);
        drop(e);
    }
}
