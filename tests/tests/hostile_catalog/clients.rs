//! Clients that misbehave in time rather than in bytes: every prefix of a
//! handshake, slowloris, clients that never read, half-open clients.

use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use splicegate_tests::catalog::*;
use splicegate_tests::watch::rss_kib;
use splicegate_tests::*;

/// Every prefix of a valid SOCKS5 exchange and of a valid CONNECT head:
/// with the client then silent, the gateway answers the complete messages
/// only and closes at the handshake deadline (a partial HTTP head gets 408);
/// with the client's FIN after the prefix, it closes at once. No other byte.
#[test]
fn truncated_at_every_byte() {
    use Step::*;
    let (lab, canary, bystander) = Lab::watched();
    let socks = cat(&[
        &[5, 1, 2],
        &userpass(USER.as_bytes(), KEY.as_bytes()),
        &[5, 1, 0],
        &socks_addr_v4(TARGET_IP, lab.echo.addr().port()),
    ]);
    let head = lab.connect_head();
    let auth_end = 3 + 2 + USER.len() + 1 + KEY.len();
    let mut cases = Vec::new();
    for n in 0..socks.len() {
        let mut steps = Vec::new();
        if n >= 3 {
            steps.push(Method(2));
        }
        if n >= auth_end {
            steps.push(Auth(0));
        }
        cases.push((
            format!("SOCKS5 prefix {n}/{} then silence", socks.len()),
            socks[..n].to_vec(),
            false,
            Expect::Socks(steps.clone(), After::Deadline),
        ));
        cases.push((
            format!("SOCKS5 prefix {n}/{} then FIN", socks.len()),
            socks[..n].to_vec(),
            true,
            Expect::Socks(steps, After::Close),
        ));
    }
    for n in 0..head.len() {
        let silent = if n == 0 {
            Expect::DeadlineClose
        } else {
            Expect::Timeout408
        };
        cases.push((
            format!("CONNECT head prefix {n}/{} then silence", head.len()),
            head[..n].to_vec(),
            false,
            silent,
        ));
        cases.push((
            format!("CONNECT head prefix {n}/{} then FIN", head.len()),
            head[..n].to_vec(),
            true,
            Expect::Close,
        ));
    }
    let t0 = Instant::now();
    let failures = Mutex::new(Vec::new());
    let next = AtomicUsize::new(0);
    // Most of these wait for the deadline: many at once.
    std::thread::scope(|s| {
        for _ in 0..48 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((id, bytes, fin, expect)) = cases.get(i) else {
                        break;
                    };
                    let c = Case {
                        id: id.clone(),
                        bytes: bytes.clone(),
                        expect: expect.clone(),
                        bug: None,
                    };
                    let r = if *fin {
                        run_with_fin(&lab, &c)
                    } else {
                        run_once(&lab, &c, false).map(|_| ())
                    };
                    if let Err(e) = r {
                        failures.lock().unwrap().push(format!("{id}: {e}"));
                    }
                }
            });
        }
    });
    let rep = lab.finish(canary, bystander, "truncated messages");
    let failures = failures.into_inner().unwrap();
    eprintln!(
        "truncated messages: {} prefixes in {:.1} s, {} failed; the well-behaved client made {} requests, p99 {:?}",
        cases.len(),
        t0.elapsed().as_secs_f64(),
        failures.len(),
        rep.ok(),
        rep.percentile(99.0)
    );
    assert!(
        failures.is_empty(),
        "{} of {} truncations misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Send the prefix, then FIN; the expected replies, then a close within 1 s.
fn run_with_fin(lab: &Lab, case: &Case) -> Result<(), String> {
    let mut c = Conn::open(lab.src.next(), lab.gw.proxy).map_err(|e| format!("connect: {e}"))?;
    send(&mut c, &case.bytes, false);
    c.shutdown_write();
    let sent = Instant::now();
    let mut got = Got {
        bytes: Vec::new(),
        closed: None,
    };
    let mut at = 0;
    if let Expect::Socks(steps, _) = &case.expect {
        for s in steps {
            read_socks_step(&mut c, &mut got, &mut at, *s)?;
        }
    }
    let closed = expect_close(&mut c, &mut got, at, sent + Duration::from_millis(1500))?;
    if closed - sent > Duration::from_secs(1) {
        return Err(format!("closed only after {:?}", closed - sent));
    }
    Ok(())
}

/// One byte per second: the whole head (or handshake) must arrive within
/// handshake_ms, however steadily the bytes come (not reset per byte).
#[test]
fn slowloris_one_byte_per_second() {
    let (lab, canary, bystander) = Lab::watched();
    let head = lab.connect_head();
    let socks = cat(&[&[5, 1, 2], &userpass(USER.as_bytes(), KEY.as_bytes())]);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for (what, bytes) in [("HTTP", head), ("SOCKS5", socks)] {
            let (lab, results) = (&lab, &results);
            s.spawn(move || {
                let mut c = Conn::open(lab.src.next(), lab.gw.proxy).expect("connect");
                let t0 = Instant::now();
                let mut got = Got {
                    bytes: Vec::new(),
                    closed: None,
                };
                for b in &bytes {
                    if c.stream.write_all(&[*b]).is_err() {
                        break;
                    }
                    collect(
                        &mut c,
                        &mut got,
                        Instant::now() + Duration::from_secs(1),
                        |_| false,
                    );
                    if got.closed.is_some() || t0.elapsed() > Duration::from_secs(6) {
                        break;
                    }
                }
                let took = got.closed.map(|t| t - t0);
                results.lock().unwrap().push((what, took, got.bytes));
            });
        }
    });
    for (what, took, bytes) in results.into_inner().unwrap() {
        let took = took.unwrap_or_else(|| panic!("a {what} slowloris was never cut"));
        assert!(
            took >= HANDSHAKE - Duration::from_millis(100)
                && took <= HANDSHAKE + Duration::from_millis(1500),
            "a {what} slowloris was cut after {took:?} (handshake_ms {})",
            HANDSHAKE.as_millis()
        );
        if what == "HTTP" {
            let r = parse_response(&bytes).expect("an answer");
            check_error(&r, 408, "CLIENT_TIMEOUT").unwrap();
        } else {
            assert!(bytes.is_empty(), "SOCKS5 slowloris got {bytes:?}");
        }
        eprintln!("slowloris ({what}, 1 byte/s): cut after {took:?}");
    }
    lab.finish(canary, bystander, "slowloris");
}

/// Clients that never read: a tunnel into which the client pushes 64 MB
/// that the echo target sends back, and a forwarded 50 MB answer, neither
/// read. The gateway stops
/// reading from the target (backpressure), its memory stays flat, and no
/// one else waits.
#[test]
fn clients_that_never_read() {
    let (lab, canary, bystander) = Lab::watched();
    let pid = lab.gw.pid();
    let rss0 = rss_kib(pid);
    // A forwarded 50 MB answer that the client never reads.
    let mut lazy = lab.gw.conn_from(lab.src.next());
    let w = lab.w();
    lazy.send(
        format!(
            "GET http://{w}/bytes/50000000 HTTP/1.1\r\nHost: {w}\r\n{}\r\n",
            auth_line()
        )
        .as_bytes(),
    )
    .unwrap();
    // A tunnel whose far end streams to a client that never reads.
    let mut lazy_tunnel = lab.gw.conn_from(lab.src.next());
    lazy_tunnel.send(&lab.connect_head()).unwrap();
    // The echo target sends back what it gets: push 64 MB into the tunnel
    // and never read the echo (the writes block once buffers are full).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pushed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let pusher = {
        let mut s = lazy_tunnel.stream.try_clone().unwrap();
        let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
        let (stop, pushed) = (stop.clone(), pushed.clone());
        std::thread::spawn(move || {
            let block = vec![b'x'; 65536];
            // At most 1 GB, however the buffers behave.
            while !stop.load(Ordering::SeqCst) && pushed.load(Ordering::SeqCst) < 1 << 30 {
                match s.write(&block) {
                    Ok(n) => {
                        pushed.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
        })
    };
    // Every buffer on the path fills within a moment; after that the
    // client's writes must stall (backpressure all the way back).
    std::thread::sleep(Duration::from_millis(2500));
    let pushed_early = pushed.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(1));
    let rss1 = rss_kib(pid);
    let pushed_late = pushed.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    pusher.join().unwrap();
    let pushed = pushed_late;
    let rep = lab.finish(canary, bystander, "clients that never read");
    eprintln!(
        "never-reading clients: pushed {pushed} bytes into an unread echo tunnel ({} in the last second), a 50 MB answer unread; gateway RSS {rss0} KiB → {rss1} KiB; the well-behaved client made {} requests, p99 {:?}",
        pushed_late - pushed_early,
        rep.ok(),
        rep.percentile(99.0)
    );
    assert!(
        pushed_late - pushed_early < 1 << 20,
        "the tunnel still took {} bytes in the last second after {pushed_early} (no backpressure)",
        pushed_late - pushed_early
    );
    assert!(
        rss1 < rss0 + 32 * 1024,
        "the gateway's RSS grew from {rss0} KiB to {rss1} KiB with clients that never read"
    );
    drop(lazy);
    drop(lazy_tunnel);
}

/// Half-open clients: FIN right after a request, inside a tunnel, before
/// the answer; the answers still arrive and every connection ends.
#[test]
fn half_open_clients() {
    let (lab, canary, bystander) = Lab::watched();
    let (w, e) = (lab.w(), lab.e());
    let a = auth_line();
    // `bytes` on `c`, then FIN: everything that came back until the close
    // (within `secs`), or a failure naming `what`.
    let fin_after = |mut c: Conn, bytes: &[u8], secs: u64, what: &str| -> Vec<u8> {
        c.send(bytes).unwrap();
        c.shutdown_write();
        c.closed_within(Duration::from_secs(secs))
            .unwrap_or_else(|| panic!("{what}: not closed within {secs} s"))
    };
    let fresh = || lab.gw.conn_from(lab.src.next());
    // 1. A forwarded GET, then FIN: the whole answer, then the close.
    let get = format!("GET http://{w}/bytes/100000 HTTP/1.1\r\nHost: {w}\r\n{a}\r\n");
    let got = fin_after(fresh(), get.as_bytes(), 5, "closed after the answer");
    let r = parse_response(&got).expect("an answer");
    assert_eq!(r.status, 200, "{}", r.raw_head);
    assert_eq!(
        r.body.len(),
        100_000,
        "the whole body after the client's FIN"
    );
    // 2. A tunnel: bytes, then FIN; the echo of those bytes, then the close.
    let tunnel = lab.gw.tunnel(lab.src.next(), lab.echo.addr(), "country-us");
    let said = b"half-closed but still listening";
    let got = fin_after(tunnel, said, 5, "the tunnel ends after the echo");
    assert_eq!(got, said);
    // 3. CONNECT and FIN before the 200: the 200 (or nothing), then the close.
    let connect = format!("CONNECT {e} HTTP/1.1\r\nHost: {e}\r\n{a}\r\n");
    let got = fin_after(fresh(), connect.as_bytes(), 5, "a CONNECT then FIN ends");
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 200 "),
        "{}",
        show(&got)
    );
    // 4. SOCKS5 handshake then FIN: the replies, then the close.
    let socks = cat(&[
        &[5, 1, 2],
        &userpass(USER.as_bytes(), KEY.as_bytes()),
        &[5, 1, 0],
        &socks_addr_v4(TARGET_IP, lab.echo.addr().port()),
    ]);
    let got = fin_after(fresh(), &socks, 5, "a SOCKS5 tunnel with a FIN ends");
    assert!(got.starts_with(&[5, 2, 1, 0, 5, 0, 0]), "{got:?}");
    // 5. Connect, FIN at once.
    let got = fin_after(fresh(), b"", 2, "closed");
    assert!(got.is_empty(), "{got:?}");
    // Let the well-behaved client run a little longer beside them.
    std::thread::sleep(Duration::from_millis(500));
    lab.finish(canary, bystander, "half-open clients");
}
