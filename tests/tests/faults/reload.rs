//! Key rotation and pause by SIGHUP under load (scripts/faults/reload.sh).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use splicegate_tests::faults::*;
use splicegate_tests::watch::Sources;
use splicegate_tests::*;

/// Key rotation and pause by SIGHUP under load: package 7's next request
/// after the reload sees the change; package 8's open tunnels never notice.
#[test]
fn rotation_and_pause_under_load() {
    let _one = one_at_a_time();
    const NEW_KEY: &str = "pk_E2E_rotated_K2m8";
    const KEY8: &str = "pk_E2E_other_P8x";
    let (echo, web) = (TcpEcho::start(), HttpTarget::start());
    let conf = Conf::with_package(KEY)
        .package(PkgDecl::new(8, "acme", KEY8))
        .node(NodeDecl::direct("d1", node_ip()));
    let gw = Gateway::start_conf(&conf);
    let src = Sources::new();
    // Package 8: 8 tunnels doing round trips every 10 ms all along.
    let stop = Arc::new(AtomicBool::new(false));
    let p8 = {
        let mut v = Vec::new();
        for _ in 0..8 {
            let (mut c, r) = try_connect(
                &gw,
                src.next(),
                echo.addr(),
                "package-8-country-us",
                KEY8,
                &[],
            )
            .expect("tunnel");
            assert_eq!(r.status, 200);
            let stop = stop.clone();
            v.push(std::thread::spawn(move || {
                let mut n = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    if let Err(e) = c.echo_round_trip(b"package 8 keeps going") {
                        return Err(format!("after {n} round trips: {e}"));
                    }
                    n += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(n)
            }));
        }
        v
    };
    // Package 7: a stream of requests with the old key, each on a new
    // connection, with its start time and answer.
    let log: Arc<Mutex<Vec<(Instant, u16, String)>>> = Arc::new(Mutex::new(Vec::new()));
    let p7 = {
        let (proxy, url, stop, log) = (gw.proxy, web.url("/ip"), stop.clone(), log.clone());
        let a = src.next();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                let Ok(mut c) = Conn::open(a, proxy) else {
                    continue;
                };
                let r = c.get(
                    &url,
                    Some((&user("country-us"), KEY)),
                    &["Connection: close"],
                );
                let (st, code) = match r {
                    Ok(r) => (r.status, r.header("X-SOAX-Error").unwrap_or("").to_string()),
                    Err(e) => (0, e.to_string()),
                };
                log.lock().unwrap().push((t, st, code));
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    // Package 7's own open tunnel, to see what a rotation and a pause do to it.
    let (mut own, r) =
        try_connect(&gw, src.next(), echo.addr(), &user("country-us"), KEY, &[]).expect("tunnel");
    assert_eq!(r.status, 200);
    std::thread::sleep(Duration::from_millis(500));
    // 1. Rotate package 7's key: rewrite the file, SIGHUP, and watch the
    // log for the reload (gw.reload would add a sleep to the figures).
    let path = gw.config_path().to_path_buf();
    let text = std::fs::read_to_string(&path).expect("config");
    let rotated = text.replace(&format!("key = \"{KEY}\""), &format!("key = \"{NEW_KEY}\""));
    assert_ne!(rotated, text, "the key line is in the file");
    // Write `text` and SIGHUP: when the signal went, and when the reload was
    // logged.
    let hup = |text: &str| -> (Instant, Instant) {
        let reloads = || gw.log().matches("reloaded").count();
        let before = reloads();
        std::fs::write(&path, text).expect("write config");
        let sent = Instant::now();
        gw.signal("HUP");
        let logged = eventually(Duration::from_secs(5), Duration::from_millis(2), || {
            (reloads() > before).then(Instant::now)
        })
        .expect("the reload is logged");
        (sent, logged)
    };
    let (t_hup, reloaded) = hup(&rotated);
    std::thread::sleep(Duration::from_millis(500));
    let new_key_ok = gw
        .forward(src.next(), &web.url("/ip"), &user("country-us"), NEW_KEY)
        .status;
    let own_after_rotation = own.echo_round_trip(b"own tunnel after rotation").is_ok();
    // 2. Pause package 7.
    let paused = rotated.replace(
        &format!("key = \"{NEW_KEY}\"\n"),
        &format!("key = \"{NEW_KEY}\"\nstatus = \"paused\"\n"),
    );
    assert_ne!(paused, rotated);
    let (t_pause, reloaded2) = hup(&paused);
    let paused_answer = gw.forward(src.next(), &web.url("/ip"), &user("country-us"), NEW_KEY);
    std::thread::sleep(Duration::from_millis(1500));
    let own_after_pause = own.echo_round_trip(b"own tunnel after pause").is_ok();
    stop.store(true, Ordering::SeqCst);
    p7.join().unwrap();
    let p8: Vec<Result<u32, String>> = p8.into_iter().map(|t| t.join().unwrap()).collect();
    let log = log.lock().unwrap().clone();
    // The old key: fine before the SIGHUP, refused for every request that
    // started after the reload was logged.
    let first_refused = log
        .iter()
        .find(|(t, st, _)| *t >= t_hup && *st == 407)
        .map(|x| x.0);
    let late_ok: Vec<_> = log
        .iter()
        .filter(|(t, st, _)| *t >= reloaded && *st == 200)
        .collect();
    let before_ok = log
        .iter()
        .filter(|(t, st, _)| *t < t_hup && *st == 200)
        .count();
    let p8_ok = p8.iter().filter(|r| r.is_ok()).count();
    let p8_trips: u32 = p8.iter().filter_map(|r| r.as_ref().ok()).sum();
    figure(format!(
        "reload under load: SIGHUP → reload logged in {}; the old key's first 407 {} after SIGHUP; requests with the old key after the reload that still passed: {}; {} passed before",
        ms(reloaded - t_hup),
        first_refused.map_or("never".into(), |t| ms(t - t_hup)),
        late_ok.len(),
        before_ok
    ));
    figure(format!(
        "reload under load: the new key: {new_key_ok}; pause → reload logged in {}, next request {} {}",
        ms(reloaded2 - t_pause),
        paused_answer.status,
        paused_answer.header("X-SOAX-Error").unwrap_or("")
    ));
    figure(format!(
        "reload under load: package 8's 8 tunnels: {p8_ok}/8 uninterrupted, {p8_trips} round trips; package 7's own open tunnel after rotation: {}, after pause: {}",
        if own_after_rotation { "open" } else { "closed" },
        if own_after_pause { "open" } else { "closed" }
    ));
    assert!(
        late_ok.is_empty(),
        "the old key passed after the reload: {late_ok:?}"
    );
    assert!(first_refused.is_some(), "the old key was never refused");
    assert_eq!(new_key_ok, 200, "the new key");
    assert_error(&paused_answer, 407, "PACKAGE_PAUSED", &[]);
    assert_eq!(p8_ok, 8, "package 8's tunnels: {p8:?}");
    // A key rotation closes nothing; a pause closes the package's tunnels
    // within a second (the round trip above ran 1.5 s after it).
    assert!(
        own_after_rotation,
        "a key rotation closed package 7's tunnel"
    );
    assert!(!own_after_pause, "package 7's tunnel outlived its pause");
}
