//! Descriptor exhaustion (scripts/faults/fd_exhaustion.sh).

use std::io::{self};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use splicegate_tests::canary::sample;
use splicegate_tests::faults::*;
use splicegate_tests::watch::{Sources, cpu_ticks, fd_count};
use splicegate_tests::*;

/// The soft open-files limit of `pid`.
fn nofile_of(pid: u32) -> Option<usize> {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// Whether a CONNECT through the gateway is answered within `within`, and
/// with what.
fn probe_answer(gw: &Gateway, src: Ipv4Addr, target: SocketAddr, within: Duration) -> String {
    probe_answer_as(gw, src, target, within, "country-us-city-new_york", false)
}

/// [`probe_answer`] with `rules`; `detail` adds the X-SOAX-Detail of an error.
fn probe_answer_as(
    gw: &Gateway,
    src: Ipv4Addr,
    target: SocketAddr,
    within: Duration,
    rules: &str,
    detail: bool,
) -> String {
    let Ok(mut c) = Conn::open(src, gw.proxy) else {
        return "connect refused".into();
    };
    let req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {}\r\n\r\n",
        basic(&user(rules), KEY)
    );
    if c.send(req.as_bytes()).is_err() {
        return "send failed".into();
    }
    c.set_timeout(within);
    match c.read_response("CONNECT") {
        Ok(r) if r.status == 200 => match c.echo_round_trip(b"fd probe") {
            Ok(()) => "200".into(),
            Err(e) => format!("200 then {e}"),
        },
        Ok(r) => {
            let code = r
                .header("X-SOAX-Error")
                .unwrap_or(&r.status_line)
                .to_string();
            match r.header("X-SOAX-Detail") {
                Some(d) if detail => format!("{code} ({d})"),
                _ => code,
            }
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            "no answer".into()
        }
        Err(e) => format!("closed ({e})"),
    }
}

/// The gateway under `ulimit -n 256` (`SG_GATEWAY_NOFILE` to choose):
/// while every descriptor is taken it stops accepting (or answers
/// OVERLOADED), never crashes, and serves again within a second once
/// descriptors free up. One free descriptor (a client accepted, no socket
/// left for the node) must get 503 OVERLOADED (SPEC 4).
#[test]
fn descriptor_exhaustion() {
    let _one = one_at_a_time();
    let (echo, web) = (TcpEcho::start(), HttpTarget::start());
    let h1 = TestNode::http(node_ip());
    let mut conf = Conf::with_package(KEY)
        .node(NodeDecl::direct("d1", node_ip()))
        .node(NodeDecl::http("h1", h1.addr()).s("city", "dallas"));
    conf.geo = vec![r#"cities = { us = ["new_york", "chicago", "dallas"] }"#.into()];
    conf.handshake_ms = 60_000;
    conf.workers = "1".into();
    let nofile = std::env::var("SG_GATEWAY_NOFILE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let gw = Gateway::start_with_nofile(&conf, nofile);
    let pid = gw.pid();
    let src = Sources::new();
    let limit = nofile_of(pid).expect("the gateway's limits");
    assert_eq!(limit as u64, nofile, "the gateway's open-files limit");
    assert_eq!(
        probe_answer(&gw, src.next(), echo.addr(), Duration::from_secs(3)),
        "200"
    );
    let fds0 = fd_count(pid);
    // Fill every descriptor with silent clients (open more than the limit:
    // the rest wait in the accept queue).
    let mut hogs = open_idle(&gw, Ipv4Addr::new(127, 0, 7, 1), 50, limit + 50);
    let full = eventually(Duration::from_secs(5), Duration::from_millis(50), || {
        (fd_count(pid) >= limit - 1).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let fds_full = fd_count(pid);
    let log_lines0 = gw.log().lines().count();
    let cpu0 = cpu_ticks(pid);
    let t_sat = Instant::now();
    let at_limit = probe_answer(&gw, src.next(), echo.addr(), Duration::from_secs(2));
    std::thread::sleep(Duration::from_secs(2));
    let sat = t_sat.elapsed();
    let cpu_sat = cpu_ticks(pid) - cpu0;
    let log_lines = gw.log().lines().count() - log_lines0;
    let alive_at_limit = std::fs::metadata(format!("/proc/{pid}")).is_ok();
    // Keep one hog fewer than the gateway accepted; close the rest (those
    // still queued are accepted, read as closed and dropped). The gateway
    // settles one descriptor under its limit.
    let accepted = fds_full.saturating_sub(fds0);
    drop(hogs.split_off(accepted.saturating_sub(1).min(hogs.len())));
    let settled = eventually(Duration::from_secs(5), Duration::from_millis(100), || {
        let n = fd_count(pid);
        std::thread::sleep(Duration::from_millis(300));
        (fd_count(pid) == n).then_some(n)
    });
    // Top up to one under the limit: the client takes the last descriptor
    // and none is left for the target.
    let now_used = fd_count(pid);
    let _top = open_idle(
        &gw,
        Ipv4Addr::new(127, 0, 7, 100),
        10,
        limit.saturating_sub(now_used + 1),
    );
    let settled = eventually(Duration::from_secs(3), Duration::from_millis(20), || {
        let n = fd_count(pid);
        (n + 1 >= limit).then_some(n)
    })
    .or(settled);
    // A CONNECT with `rules` while one descriptor is free, and its detail.
    let with_one_free = |rules: &str| {
        probe_answer_as(
            &gw,
            src.next(),
            echo.addr(),
            Duration::from_secs(3),
            rules,
            true,
        )
    };
    let one_free = with_one_free("country-us-city-new_york");
    // Again through an HTTP node (its probe's descriptor is free again once
    // the gateway closed it).
    let _ = eventually(Duration::from_secs(3), Duration::from_millis(20), || {
        (fd_count(pid) + 1 == limit).then_some(())
    });
    let one_free_http = with_one_free("country-us-city-dallas");
    let h1_state = admin::admin_request(gw.admin_addr(), "GET", "/v1/nodes/h1", None)
        .map(|(_, v)| v.to_string())
        .unwrap_or_default();
    // Free everything: serving again within a second.
    drop(hogs);
    let t_free = Instant::now();
    let recovered = eventually(Duration::from_secs(5), Duration::from_millis(20), || {
        (probe_answer(&gw, src.next(), echo.addr(), Duration::from_millis(500)) == "200")
            .then_some(())
    });
    let recovered_in = t_free.elapsed();
    let canary_after = sample(
        &plan(&gw, Sources::reserved(0), &echo, &web, "country-us"),
        50,
    );
    let alive = std::fs::metadata(format!("/proc/{pid}")).is_ok();
    figure(format!(
        "fd exhaustion: limit {limit}, {fds0} descriptors at rest, {fds_full} when full ({})",
        if full.is_some() {
            "reached"
        } else {
            "not reached"
        }
    ));
    figure(format!(
        "fd exhaustion: a CONNECT at the limit: {at_limit}; over {:.1} s saturated the gateway used {cpu_sat} CPU ticks and wrote {log_lines} log lines",
        sat.as_secs_f64()
    ));
    figure(format!(
        "fd exhaustion: with one descriptor free (settled at {settled:?}): via a direct node {one_free}; via an HTTP node {one_free_http}"
    ));
    figure(format!(
        "fd exhaustion: the HTTP node afterwards: {h1_state}"
    ));
    figure(format!(
        "fd exhaustion: after freeing, serving again in {}; then {} of 50 requests ok; process alive: {}",
        ms(recovered_in),
        canary_after.ok(),
        alive && alive_at_limit
    ));
    assert!(
        alive_at_limit && alive,
        "the gateway died at the descriptor limit"
    );
    assert!(
        ["no answer", "OVERLOADED", "connect refused"].contains(&at_limit.as_str()),
        "at the limit: {at_limit}"
    );
    assert!(
        recovered.is_some() && recovered_in <= Duration::from_secs(1),
        "recovery took {recovered_in:?}"
    );
    canary_after.assert_clean(50, "recovery from descriptor exhaustion");
    assert!(
        one_free.starts_with("OVERLOADED") && one_free_http.starts_with("OVERLOADED"),
        "SPEC 4: out of file descriptors → 503 OVERLOADED; got {one_free} (direct), {one_free_http} (HTTP node)"
    );
}
