//! Load: 10,000 idle connections and slowloris attackers
//! (scripts/faults/load.sh).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use splicegate_tests::canary::{CanaryPlan, CanaryReport, sample};
use splicegate_tests::faults::*;
use splicegate_tests::watch::{Sources, cpu_ticks, fd_count, rss_kib};
use splicegate_tests::*;

/// The size of one round's attack: (idle connections, the sources they
/// come from, slowloris connections). 10,000 from 100 sources and 200 in
/// the long version; 2,000 from 20 and 50 bounded.
fn attack_size() -> (usize, u32, usize) {
    scaled((2_000, 20, 50), (10_000, 100, 200))
}

/// The attackers of one round: idle connections and slowloris.
struct Attack {
    idle: Vec<TcpStream>,
    stop: Arc<AtomicBool>,
    trickler: std::thread::JoinHandle<(Vec<TcpStream>, usize)>,
}

impl Attack {
    /// Silent connections (10,000 from 100 sources in the long version,
    /// see [`attack_size`]) and slowloris connections from 20 more sources, each sending one byte of a CONNECT head per
    /// second, never finishing it.
    fn start(gw: &Gateway, target: SocketAddr) -> Attack {
        let (n_idle, idle_sources, n_slow) = attack_size();
        let idle = open_idle(gw, Ipv4Addr::new(127, 0, 5, 1), idle_sources, n_idle);
        let head = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nX-Slow: {}\r\n",
            "z".repeat(400)
        )
        .into_bytes();
        let mut slow = open_idle(gw, Ipv4Addr::new(127, 0, 6, 1), 20, n_slow);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let trickler = std::thread::spawn(move || {
            let mut alive = slow.len();
            for i in 0..head.len() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                alive = 0;
                for s in &mut slow {
                    if s.write_all(&head[i..i + 1]).is_ok() {
                        alive += 1;
                    }
                }
                // One byte per second, checking the stop flag meanwhile.
                for _ in 0..20 {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            (slow, alive)
        });
        Attack {
            idle,
            stop,
            trickler,
        }
    }

    /// Close everything; (idle connections still open, slowloris still open).
    fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        let (slow, slow_alive) = self.trickler.join().unwrap();
        let still_open = self
            .idle
            .iter()
            .filter(|s| {
                let _ = s.set_nonblocking(true);
                let mut b = [0u8; 1];
                let mut r: &TcpStream = s;
                matches!(r.read(&mut b), Err(ref e) if e.kind() == io::ErrorKind::WouldBlock)
            })
            .count();
        drop(self.idle);
        drop(slow);
        (still_open, slow_alive)
    }
}

/// 10,000 idle client connections (from 100 sources) and 200 slowloris
/// attackers (bounded: 2,000, 20 sources, 50; see [`attack_size`]) (1 byte per second each) while a well-behaved client keeps its
/// p99 within 2 × its unloaded value (asserted in the full run; reported
/// in the bounded one). The machine is shared, so unloaded
/// and loaded probes alternate in 5 rounds (noise hits both alike) and each
/// condition's p99 is taken over all its rounds.
#[test]
fn ten_thousand_idle_and_slowloris() {
    let _one = one_at_a_time();
    let (rounds, probes) = scaled((2, 100), (5, 200));
    let (n_idle, idle_sources, n_slow) = attack_size();
    let (echo, web) = (TcpEcho::start(), HttpTarget::start());
    let mut conf = Conf::with_package(KEY).node(NodeDecl::direct("d1", node_ip()));
    // The idle connections must outlive each round.
    conf.handshake_ms = 120_000;
    let gw = Gateway::start_conf(&conf);
    let pid = gw.pid();
    let canary_plan = CanaryPlan {
        every: Duration::from_millis(10),
        ..plan(&gw, Sources::reserved(0), &echo, &web, "country-us")
    };
    let _ = sample(&canary_plan, 50); // warm up
    let (mut unloaded, mut loaded) = (CanaryReport::default(), CanaryReport::default());
    let (rss0, fds0) = (rss_kib(pid), fd_count(pid));
    let (mut rss1, mut fds1, mut opened_in, mut cpu, mut measured) =
        (0, 0, Duration::ZERO, 0, Duration::ZERO);
    let mut reclaimed = Vec::new();
    let mut kept = Vec::new();
    for round in 0..rounds {
        let before = sample(&canary_plan, probes);
        unloaded.latencies.extend(before.latencies);
        unloaded.failures.extend(before.failures);
        let t0 = Instant::now();
        let attack = Attack::start(&gw, echo.addr());
        if round == 0 {
            opened_in = t0.elapsed();
            std::thread::sleep(Duration::from_millis(500));
            (rss1, fds1) = (rss_kib(pid), fd_count(pid));
        }
        let (c0, t1) = (cpu_ticks(pid), Instant::now());
        let during = sample(&canary_plan, probes);
        cpu += cpu_ticks(pid) - c0;
        measured += t1.elapsed();
        loaded.latencies.extend(during.latencies);
        loaded.failures.extend(during.failures);
        kept.push(attack.stop());
        let t2 = Instant::now();
        let back = eventually(Duration::from_secs(10), Duration::from_millis(20), || {
            (fd_count(pid) <= fds0 + 5).then_some(())
        });
        assert!(
            back.is_some(),
            "descriptors not reclaimed: {} vs {fds0}",
            fd_count(pid)
        );
        reclaimed.push(t2.elapsed());
    }
    let us = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
    figure(format!(
        "{n_idle} idle: {rounds} rounds; each opened {n_idle} idle connections from {idle_sources} sources (first in {}) and {n_slow} slowloris at 1 byte/s; still open when closed (idle, slowloris): {kept:?}",
        ms(opened_in)
    ));
    figure(format!(
        "{n_idle} idle: gateway RSS {rss0} KiB → {rss1} KiB ({:.1} KiB per connection), descriptors {fds0} → {fds1}; gateway CPU {cpu} ticks over {:.1} s of loaded probing",
        (rss1.saturating_sub(rss0)) as f64 / (n_idle + n_slow) as f64,
        measured.as_secs_f64()
    ));
    figure(format!(
        "{n_idle} idle: well-behaved client p50/p99 unloaded {}/{}, loaded {}/{} ({} + {} probes; failures {} + {})",
        us(unloaded.percentile(50.0)),
        us(unloaded.percentile(99.0)),
        us(loaded.percentile(50.0)),
        us(loaded.percentile(99.0)),
        unloaded.ok(),
        loaded.ok(),
        unloaded.failures.len(),
        loaded.failures.len()
    ));
    figure(format!(
        "{n_idle} idle: descriptors back to ≤ baseline + 5 within {} of the close (worst round)",
        ms(reclaimed.iter().max().copied().unwrap_or_default())
    ));
    assert!(
        kept.iter().all(|k| *k == (n_idle, n_slow)),
        "attackers were dropped early: {kept:?}"
    );
    unloaded.assert_clean(rounds * probes, "the unloaded rounds");
    loaded.assert_clean(rounds * probes, "idle connections and slowloris");
    let (p0, p1) = (unloaded.percentile(99.0), loaded.percentile(99.0));
    figure(format!("canary p99: unloaded {p0:?}, loaded {p1:?}"));
    // A latency criterion: held in the on-purpose run (SG_FAULTS_FULL=1,
    // 5 rounds of 200 probes), reported in the bounded one, where 200
    // probes on a shared two-core machine make the p99 one sample's noise.
    if full() {
        assert!(p1 <= p0 * 2, "loaded p99 {p1:?} > 2 × unloaded p99 {p0:?}");
    }
}
