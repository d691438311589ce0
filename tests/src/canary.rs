//! A well-behaved client that runs beside hostile ones and faults: from its
//! own source address it opens a tunnel to an echo target and round-trips a
//! few bytes, then forwards a `GET`, again and again, and records every
//! failure and every latency. A hostile input that "disturbs no other
//! connection" (SPEC 7) leaves it with no failure.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::client::Conn;

/// What the canary talks to, and as whom.
#[derive(Debug, Clone)]
pub struct CanaryPlan {
    /// The gateway's proxy port.
    pub proxy: SocketAddr,
    /// The canary's source address (keep it apart from the hostile ones).
    pub src: Ipv4Addr,
    /// A [`crate::TcpEcho`] the package may reach.
    pub echo: SocketAddr,
    /// A [`crate::HttpTarget`] URL answering 200.
    pub url: String,
    /// Proxy username.
    pub user: String,
    /// Package key.
    pub key: String,
    /// Pause between two probes.
    pub every: Duration,
}

/// One probe: a CONNECT tunnel with a 64-byte echo round trip on a new
/// connection (`tunnel`), or a forwarded `GET` on a new connection.
pub fn probe(plan: &CanaryPlan, tunnel: bool) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut c = Conn::open(plan.src, plan.proxy).map_err(|e| format!("connect: {e}"))?;
    c.set_timeout(Duration::from_secs(5));
    if tunnel {
        let r = c
            .connect(&plan.echo.to_string(), Some((&plan.user, &plan.key)), &[])
            .map_err(|e| format!("CONNECT: {e}"))?;
        if r.status != 200 {
            return Err(format!("CONNECT answered {}", r.status_line));
        }
        let payload: Vec<u8> = (0..64u8).collect();
        c.echo_round_trip(&payload)
            .map_err(|e| format!("echo: {e}"))?;
    } else {
        let r = c
            .get(
                &plan.url,
                Some((&plan.user, &plan.key)),
                &["Connection: close"],
            )
            .map_err(|e| format!("GET: {e}"))?;
        if r.status != 200 {
            return Err(format!("GET answered {}", r.status_line));
        }
    }
    Ok(t0.elapsed())
}

/// The canary's record.
#[derive(Debug, Clone, Default)]
pub struct CanaryReport {
    /// Latencies of the probes that succeeded.
    pub latencies: Vec<Duration>,
    /// Failures, with the time since the canary started.
    pub failures: Vec<String>,
}

impl CanaryReport {
    /// Probes that succeeded.
    pub fn ok(&self) -> usize {
        self.latencies.len()
    }

    /// The `p`-th percentile (0–100) of the latencies; zero when there are none.
    pub fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }

    /// Panic unless at least `min_ok` probes ran and none failed.
    #[track_caller]
    pub fn assert_clean(&self, min_ok: usize, what: &str) {
        assert!(
            self.failures.is_empty(),
            "the well-behaved client failed during {what} ({} ok): {:#?}",
            self.ok(),
            self.failures
        );
        assert!(
            self.ok() >= min_ok,
            "the well-behaved client ran only {} probes during {what} (want ≥ {min_ok})",
            self.ok()
        );
    }
}

/// The `p`-th percentile (0–100) of `samples` (nearest rank).
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut v = samples.to_vec();
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// `n` probes in a row (alternating tunnel and GET), with `plan.every`
/// between them: a latency baseline.
pub fn sample(plan: &CanaryPlan, n: usize) -> CanaryReport {
    let mut rep = CanaryReport::default();
    let t0 = Instant::now();
    for i in 0..n {
        match probe(plan, i.is_multiple_of(2)) {
            Ok(d) => rep.latencies.push(d),
            Err(e) => rep
                .failures
                .push(format!("{:.3}s: {e}", t0.elapsed().as_secs_f64())),
        }
        std::thread::sleep(plan.every);
    }
    rep
}

/// A canary running on its own thread until [`Canary::stop`] (at most 10 min).
#[derive(Debug)]
pub struct Canary {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<CanaryReport>>,
}

impl Canary {
    /// Start probing.
    pub fn start(plan: CanaryPlan) -> Canary {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("canary".into())
            .spawn(move || {
                let mut rep = CanaryReport::default();
                let t0 = Instant::now();
                let mut i = 0usize;
                while !flag.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(600) {
                    match probe(&plan, i.is_multiple_of(2)) {
                        Ok(d) => rep.latencies.push(d),
                        Err(e) => rep
                            .failures
                            .push(format!("{:.3}s: {e}", t0.elapsed().as_secs_f64())),
                    }
                    i += 1;
                    std::thread::sleep(plan.every);
                }
                rep
            })
            .expect("spawn the canary");
        Canary {
            stop,
            handle: Some(handle),
        }
    }

    /// Stop and return the record.
    pub fn stop(mut self) -> CanaryReport {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
