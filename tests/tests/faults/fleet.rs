//! A fleet under SIGKILL (issue 15): three gateways on one PostgreSQL and
//! one Redis, each killed in turn during traffic and restarted under its
//! `[fleet] id`; the shared ledger never counts a byte twice and loses at
//! most a flush interval of the killed gateway's traffic per kill
//! (scripts/faults/fleet.sh).

use std::time::{Duration, Instant};

use splicegate_tests::faults::*;
use splicegate_tests::fleet::{Fleet, account, within};
use splicegate_tests::watch::Sources;
use splicegate_tests::*;

const IDS: [&str; 3] = ["gw1", "gw2", "gw3"];
/// Echo tunnels per gateway, and the bytes each writes a second (the echo
/// sends them back: twice that crosses the gateway).
const TUNNELS: usize = 2;
const RATE: u64 = 1_000_000;
/// What a crash may lose: the traffic since the last flush (1 s) of the
/// counters as the workers last published them (their 250 ms tick).
const FLUSH_WINDOW: Duration = Duration::from_millis(1250);
/// Bytes in socket buffers when a gateway dies, which the client counts
/// as sent and the gateway may never have read.
const IN_FLIGHT: u64 = 256 << 10;

/// Package 7's total in the shared ledger once every gateway has flushed
/// what its clients moved: read through `gw` until two readings a flush
/// window apart agree.
fn settled_ledger(gw: &Gateway) -> u64 {
    let mut last = None;
    for _ in 0..10 {
        std::thread::sleep(FLUSH_WINDOW + Duration::from_millis(100));
        let now = gw
            .ledger_usage(7)
            .unwrap_or_else(|e| panic!("{e}\n{}", gw.log_tail(20)))
            .total();
        if last == Some(now) {
            return now;
        }
        last = Some(now);
    }
    panic!("the ledger did not settle: {last:?}");
}

/// Through every gateway, a tunnel that moves 256 KiB each way and closes;
/// then the ledger must have grown by exactly their bytes, however often
/// the gateways were killed before. The ledger after them.
fn exactly_counted(gws: &[Gateway], src: &Sources, echo: &TcpEcho, ledger: u64, when: &str) -> u64 {
    let moved: u64 = gws
        .iter()
        .map(|gw| echo_round_trip(gw, src.next(), echo.addr(), 256 * 1024))
        .sum();
    let after = settled_ledger(&gws[0]);
    figure(format!(
        "fleet SIGKILL loop: {when}: closed tunnels through the 3 gateways moved {moved} bytes; the ledger grew by {}",
        after as i64 - ledger as i64
    ));
    assert_eq!(after, ledger + moved, "{when}: the ledger is not exact");
    after
}

/// One kill: what the killed gateway's clients moved in the flush window
/// and in the one second before it, and how long the restart took.
struct Kill {
    window: u64,
    second: u64,
    restart: Duration,
}

/// Each gateway of a fleet of three SIGKILLed during traffic, one at a
/// time, round after round, each restarted under its id (it waits up to
/// ~4 s for the dead one's registry entry to expire) while the others
/// carry on. Every gateway has 2 echo tunnels of package 7 pumping 1 MB/s
/// each way throughout; the clients count what they moved. At the end the
/// shared ledger (summed over the fleet by `GET /v1/packages/7/usage`)
/// holds at most what crossed (never a double count) and at least what
/// certainly crossed minus, per kill, what crossed the killed gateway in
/// its last flush window (plus what was in flight). That window is 1.25 s,
/// not the one second the fleet promises: one second holds on average
/// (0.61 and 0.67 s per kill in two runs of 60 kills), not for each kill. Then every
/// gateway's `GET /v1/packages/7` shows the ledger's total, and before and
/// after the loop a closed tunnel through each gateway is counted exactly.
///
/// 2 rounds (6 kills, about 40 s) in the bounded run; 20 per gateway (60
/// kills, about 4.5 min) with `SG_FAULTS_FULL=1` (`scripts/faults/fleet.sh`)
/// or `SG_FLEET_KILL_ROUNDS`:
///
/// ```text
/// SG_FLEET_KILL_ROUNDS=20 cargo test -p splicegate-tests --test faults -- \
///     --exact fleet::each_gateway_sigkilled_during_traffic --nocapture
/// ```
#[test]
fn each_gateway_sigkilled_during_traffic() {
    let _one = one_at_a_time();
    let rounds = count_from_env("SG_FLEET_KILL_ROUNDS", 2, 20);
    let fleet = Fleet::start();
    let (setups, mut gws): (Vec<_>, Vec<_>) = IDS.iter().map(|id| fleet.gateway(id)).unzip();
    account(
        &gws[0],
        &node_ip().to_string(),
        &format!(r#"{{"id": 7, "org": "acme", "key": "{KEY}"}}"#),
    );
    let echo = TcpEcho::start();
    let src = Sources::new();
    for gw in &gws {
        let serves = within(Duration::from_secs(5), || {
            try_connect(gw, src.next(), echo.addr(), &user("country-us"), KEY, &[])
                .is_ok_and(|(_, r)| r.status == 200)
        });
        assert!(serves.is_some(), "{}", gw.log_tail(20));
    }
    let before = exactly_counted(&gws, &src, &echo, 0, "before the kills");

    let pump = |gw: &Gateway| {
        let p = Pump::start(gw, &src, echo.addr(), TUNNELS, RATE);
        assert_eq!(p.tunnels(), TUNNELS, "{}", gw.log_tail(20));
        p
    };
    let mut pumps: Vec<Pump> = gws.iter().map(pump).collect();
    let (mut sent, mut received) = (0u64, 0u64);
    let mut kills = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..rounds {
        for i in 0..IDS.len() {
            std::thread::sleep(before_the_kill(&mut seed));
            let t_kill = Instant::now();
            gws[i].kill9();
            gws[i] = setups[i].start(&fleet.toml(IDS[i]));
            let restart = t_kill.elapsed();
            let dead = std::mem::replace(&mut pumps[i], pump(&gws[i]));
            kills.push(Kill {
                window: dead.moved_before(t_kill, FLUSH_WINDOW) + IN_FLIGHT,
                second: dead.moved_before(t_kill, Duration::from_secs(1)),
                restart,
            });
            let (s, r) = dead.finish();
            sent += s;
            received += r;
        }
    }
    for p in pumps {
        let (s, r) = p.finish();
        sent += s;
        received += r;
    }
    let after = settled_ledger(&gws[0]);
    let stored = after.saturating_sub(before);
    // Each byte the clients received crossed the gateway twice (up, then
    // down); the echo returns at most what it got, at most what was sent.
    let (lo, hi) = (2 * received, 2 * sent);
    let lost = lo.saturating_sub(stored);
    let bound: u64 = kills.iter().map(|k| k.window).sum();
    let one_second: u64 = kills.iter().map(|k| k.second).sum();
    let n = kills.len() as u64;
    figure(format!(
        "fleet SIGKILL loop: {n} kills ({rounds} of each of 3 gateways) during traffic ({TUNNELS} echo tunnels per gateway at {} MB/s each way); each restart waited for its id and served within {}",
        RATE / 1_000_000,
        ms(kills.iter().map(|k| k.restart).max().unwrap_or_default())
    ));
    figure(format!(
        "fleet SIGKILL loop: relayed: certainly {lo} bytes, at most {hi}; stored {stored} ({:.2} % of the certain bytes); double count: {}",
        100.0 * stored as f64 / lo.max(1) as f64,
        if stored > hi { "YES" } else { "none" }
    ));
    figure(format!(
        "fleet SIGKILL loop: lost {lost} bytes, {} per kill = {:.2} s of the killed gateway's traffic (one second of it: {} bytes per kill on average); bound {bound} (per kill {} flush window + {IN_FLIGHT} in flight)",
        lost / n.max(1),
        lost as f64 / one_second.max(1) as f64,
        one_second / n.max(1),
        ms(FLUSH_WINDOW)
    ));
    assert!(
        stored <= hi,
        "stored {stored} > {hi} bytes that crossed the fleet: a double count"
    );
    assert!(
        lost <= bound,
        "lost {lost} bytes in {n} kills, more than a flush window each ({bound})"
    );
    // Every gateway's API shows the fleet's total, restarted ones
    // included: what the store holds, as nothing is left to write.
    for gw in &gws {
        let shown = within(Duration::from_secs(3), || {
            gw.package_usage(7).is_ok_and(|u| u.total() == after)
        });
        assert!(
            shown.is_some(),
            "{} shows {:?} for package 7; the ledger holds {after}",
            gw.proxy,
            gw.package_usage(7)
        );
    }
    let fleet_size = within(Duration::from_secs(5), || {
        gws[0].get_json("/v1/gateways").as_array().map(Vec::len) == Some(IDS.len())
    });
    assert!(fleet_size.is_some(), "{}", gws[0].get_json("/v1/gateways"));
    exactly_counted(&gws, &src, &echo, after, "after the kills");
}
