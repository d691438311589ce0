//! Signals: SIGTERM under load, SIGKILL in a loop with the ledger
//! reconciled (scripts/faults/signals.sh).

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use splicegate_tests::faults::*;
use splicegate_tests::watch::Sources;
use splicegate_tests::*;

/// A tunnel that downloads exactly `total` bytes from `source`; returns the
/// bytes received.
fn download(
    gw: &Gateway,
    src: Ipv4Addr,
    target: SocketAddr,
) -> std::thread::JoinHandle<Result<u64, String>> {
    let res = try_connect(gw, src, target, &user("country-us"), KEY, &[]);
    std::thread::spawn(move || {
        let (mut c, r) = res?;
        if r.status != 200 {
            return Err(r.status_line);
        }
        c.set_timeout(Duration::from_secs(30));
        let mut n = c.buffered().len() as u64;
        let mut buf = vec![0u8; 65536];
        loop {
            match c.stream.read(&mut buf) {
                Ok(0) => return Ok(n),
                Ok(k) => n += k as u64,
                Err(e) => return Err(format!("after {n} bytes: {e}")),
            }
        }
    })
}

/// SIGTERM under load: 20 tunnels in the middle of a 2 MB download each and
/// a stream of forwarded requests of another package. The tunnels finish
/// within drain_grace_s, the process exits 0, and after a restart the
/// ledger holds exactly the bytes the tunnels moved (usage flushed).
#[test]
fn sigterm_under_load() {
    let _one = one_at_a_time();
    const TOTAL: u64 = 2_000_000;
    let source = Source::start(32 * 1024, Duration::from_millis(20), Some(TOTAL));
    let web = HttpTarget::start();
    let mut conf = Conf::with_package(KEY)
        .package(PkgDecl::new(8, "acme", "pk_E2E_other_P8x"))
        .node(NodeDecl::direct("d1", node_ip()));
    conf.drain_grace_s = 5;
    let mut gw = Gateway::start_conf(&conf);
    let src = Sources::new();
    let tunnels: Vec<_> = (0..20)
        .map(|_| download(&gw, src.next(), source.addr()))
        .collect();
    // Forwarded requests of package 8, in a loop, until refused.
    let stop = Arc::new(AtomicBool::new(false));
    let fwd = {
        let (proxy, url, stop) = (gw.proxy, web.url("/bytes/1000"), stop.clone());
        let a = src.next();
        std::thread::spawn(move || {
            let (mut ok, mut refused) = (0u32, 0u32);
            while !stop.load(Ordering::SeqCst) {
                let Ok(mut c) = Conn::open(a, proxy) else {
                    refused += 1;
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                match c.get(
                    &url,
                    Some(("package-8-country-us", "pk_E2E_other_P8x")),
                    &["Connection: close"],
                ) {
                    Ok(r) if r.status == 200 => ok += 1,
                    _ => {
                        refused += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
            (ok, refused)
        })
    };
    std::thread::sleep(Duration::from_millis(600));
    let t0 = Instant::now();
    gw.signal("TERM");
    let results: Vec<Result<u64, String>> =
        tunnels.into_iter().map(|t| t.join().unwrap()).collect();
    let tunnels_done = t0.elapsed();
    let st = gw.wait_exit(Duration::from_secs(15));
    let exited = t0.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (fwd_ok, fwd_refused) = fwd.join().unwrap();
    let complete = results
        .iter()
        .filter(|r| matches!(r, Ok(n) if *n == TOTAL))
        .count();
    let st = st.expect("exit after SIGTERM");
    // Usage flushed: a restart reads it back from the store.
    let gw = gw.restart_after("TERM");
    let usage = usage_of(&gw);
    figure(format!(
        "SIGTERM under load: {complete}/20 tunnels finished their {TOTAL}-byte download {} after SIGTERM; exit code {:?} after {} (drain_grace_s 5); {fwd_ok} forwarded requests served, {fwd_refused} refused once draining",
        ms(tunnels_done),
        st.code(),
        ms(exited)
    ));
    figure(format!(
        "SIGTERM under load: ledger after restart: package 7 bytes_down {} (the tunnels received {}), bytes_up {}",
        usage.bytes_down,
        20 * TOTAL,
        usage.bytes_up
    ));
    assert_eq!(complete, 20, "tunnels cut by the drain: {results:?}");
    assert_eq!(st.code(), Some(0), "exit status {st}");
    assert!(exited <= Duration::from_secs(7), "exit took {exited:?}");
    assert_eq!(usage.bytes_down, 20 * TOTAL, "usage flushed at exit");
}

/// Package 7's usage from the admin API, which may start listening a moment
/// after the proxy port.
fn usage_of(gw: &Gateway) -> admin::Usage {
    let mut last = String::new();
    for _ in 0..100 {
        match gw.package_usage(7) {
            Ok(u) => return u,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("usage of package 7: {last}");
}

/// SIGKILL during traffic, 50 times (8 bounded, `SG_KILL_ROUNDS` to choose), restarting each time on the same
/// store. Each round: a tunnel moves 256 KiB each way and closes, and one
/// flush interval later the store holds exactly its bytes; then 4 echo
/// tunnels pump for 0.5–2 s and the gateway is killed. Across the kill the
/// ledger may grow by at most the bytes that crossed the gateway (never a
/// double count) and by at least those minus what moved during the last
/// flush interval before the kill (1 s store flush + 250 ms counter tick).
#[test]
fn sigkill_loop_reconciles_the_ledger() {
    let _one = one_at_a_time();
    let rounds = count_from_env("SG_KILL_ROUNDS", 8, 50);
    const RATE: u64 = 1_000_000; // bytes per second per tunnel, each way
    const TUNNELS: usize = 4;
    let echo = TcpEcho::start();
    let conf = Conf::with_package(KEY).node(NodeDecl::direct("d1", node_ip()));
    let mut gw = Gateway::start_conf(&conf);
    let src = Sources::new();
    let mut ledger = usage_of(&gw).total();
    // The store flush (1 s) plus the tunnels' counter tick (250 ms).
    let (mut truth_lo, mut truth_hi, mut counted) = (0u64, 0u64, 0u64);
    let mut settled_total = 0u64;
    let mut losses = Vec::new();
    let mut bad = Vec::new();
    let mut restart_times = Vec::new();
    let flush_window = Duration::from_millis(1250);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..rounds {
        let run_for = before_the_kill(&mut seed);
        // A tunnel that moves 256 KiB each way and closes: after one flush
        // interval its bytes are in the store, exactly.
        let settled = echo_round_trip(&gw, src.next(), echo.addr(), 256 * 1024);
        std::thread::sleep(Duration::from_millis(1600));
        let flushed = usage_of(&gw).total();
        if flushed != ledger + settled {
            bad.push(format!(
                "round {round}: a closed tunnel's {settled} bytes: the ledger went from {ledger} to {flushed} after a flush interval"
            ));
        }
        settled_total += settled;
        ledger = flushed;
        let pump = Pump::start(&gw, &src, echo.addr(), TUNNELS, RATE);
        std::thread::sleep(run_for);
        let t_kill = Instant::now();
        gw = gw.restart_after("KILL");
        restart_times.push(t_kill.elapsed());
        // What crossed in the last flush window before the kill, which a
        // crash may lose (plus 256 kB of socket buffers in flight).
        let window = pump.moved_before(t_kill, flush_window) + (256 << 10);
        let (sent, received) = pump.finish();
        // Each byte received came through the gateway twice (up and down);
        // the echo sends back at most what it got, and what it got is at
        // most what was sent.
        let lo = 2 * received;
        let hi = 2 * sent;
        let after = usage_of(&gw).total();
        let grew = after.saturating_sub(ledger);
        if after < ledger {
            bad.push(format!(
                "round {round}: the ledger went down from {ledger} to {after}"
            ));
        }
        if grew > hi {
            bad.push(format!(
                "round {round}: counted {grew} > {hi} bytes that crossed (double count)"
            ));
        }
        if grew + window < lo {
            bad.push(format!(
                "round {round}: counted {grew}, at least {lo} crossed: lost {} > one flush window {window}",
                lo - grew
            ));
        }
        losses.push((lo.saturating_sub(grew), window));
        truth_lo += lo;
        truth_hi += hi;
        counted += grew;
        ledger = after;
    }
    // A clean restart changes nothing (no replay).
    let gw = gw.restart_after("TERM");
    let final_ledger = usage_of(&gw).total();
    let max_loss = losses.iter().map(|l| l.0).max().unwrap_or(0);
    let max_window = losses.iter().map(|l| l.1).max().unwrap_or(0);
    let max_restart = restart_times.iter().max().copied().unwrap_or_default();
    figure(format!(
        "SIGKILL loop: {rounds} kills during traffic ({TUNNELS} echo tunnels at {} MB/s each way); every restart served again within {}",
        RATE / 1_000_000,
        ms(max_restart)
    ));
    figure(format!(
        "SIGKILL loop: bytes that certainly crossed {truth_lo}, at most {truth_hi}; ledger counted {counted} ({:.2} % of the certain bytes); largest loss in one crash {max_loss} bytes (largest flush window measured: {max_window} bytes); double counts: {}",
        100.0 * counted as f64 / truth_lo.max(1) as f64,
        bad.iter().filter(|b| b.contains("double")).count()
    ));
    figure(format!(
        "SIGKILL loop: closed tunnels before each kill moved {settled_total} bytes; all of them were in the store one flush interval after they closed ({} rounds short)",
        bad.iter().filter(|b| b.contains("closed tunnel")).count()
    ));
    figure(format!(
        "SIGKILL loop: ledger after a final clean restart {final_ledger} (before {ledger})"
    ));
    assert_eq!(final_ledger, ledger, "a clean restart changed the ledger");
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
