//! Cells (a mode with its shape and the way it wants to reach the target)
//! times peers times rounds. Within a round every cell runs against every
//! peer that can serve it, each peer started afresh for the run and stopped
//! after it, the peers' order turned by one each round, so the drift of a
//! shared machine hits all of them alike. Medians over rounds.

use serde::Serialize;

use crate::client::Route;
use crate::load::{self, Latency, Mode, RunResult, Window};
use crate::peers::{self, Env, Peer, PeerId, Want};

/// One row group of the report: a mode, its shape, and what it asks of the
/// way to the target.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Cell {
    pub id: String,
    pub title: String,
    pub mode: Mode,
    pub want: Want,
}

impl Cell {
    /// Whether `peer` runs in this cell.
    pub(crate) fn admits(&self, peer: &Peer) -> bool {
        if !peer.caps().serves(self.want) {
            return false;
        }
        match (peer, &self.mode) {
            // Nothing to measure without a proxy process (no TLS, no
            // handshake).
            (p, Mode::Idle { .. } | Mode::TlsHandshake { .. }) if p.is_direct() => false,
            // Two workers are about connection setup (the workers row).
            (Peer::Builtin(PeerId::SplicegateW2), m) => matches!(m, Mode::Connrate { .. }),
            // Reverse tunnels: one device holds thousands of idle tunnels
            // badly (the agents-idle command measures idle devices instead).
            (Peer::Builtin(PeerId::SplicegateAgent | PeerId::Rathole), Mode::Idle { .. }) => false,
            _ => true,
        }
    }
}

/// Everything to run.
#[derive(Debug)]
pub(crate) struct Plan {
    pub cells: Vec<Cell>,
    pub peers: Vec<Peer>,
    pub rounds: usize,
    pub window: Window,
}

/// One run's outcome.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Outcome {
    pub cell: String,
    pub peer: String,
    pub round: usize,
    pub route: String,
    pub result: RunResult,
}

/// Medians of one (cell, peer) over its rounds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Summary {
    pub cell: String,
    pub peer: String,
    pub route: String,
    pub rounds: usize,
    pub rounds_ok: usize,
    pub rate: Option<f64>,
    pub rate_min: Option<f64>,
    pub rate_max: Option<f64>,
    pub latency_us: Option<Latency>,
    /// setup: connect until the tunnel was open.
    pub open_us: Option<Latency>,
    pub cpu_per_unit: Option<f64>,
    /// The rounds' lowest and highest proxy CPU per unit.
    pub cpu_min: Option<f64>,
    pub cpu_max: Option<f64>,
    pub peak_rss_kib: Option<f64>,
    pub threads: Option<f64>,
    pub max_threads: Option<u64>,
    pub base_rss_kib: Option<f64>,
    pub base_threads: Option<f64>,
    pub rss_kib: Option<f64>,
    pub rss_per_tunnel_kib: Option<f64>,
    /// A reverse tunnel's device (splicegate-agent, rathole's client):
    /// median CPU per unit, the rounds' range, and its RSS.
    pub device_cpu_per_unit: Option<f64>,
    pub device_cpu_min: Option<f64>,
    pub device_cpu_max: Option<f64>,
    pub device_rss_kib: Option<f64>,
    pub errors: u64,
    pub reconnects: u64,
    /// TLS handshake cells: the share of the window's handshakes that
    /// resumed, over every round, and the negotiated suite and group.
    pub tls_resumed_share: Option<f64>,
    pub tls_handshakes: Option<u64>,
    pub tls_params: Option<String>,
    /// The most CPU (% of one CPU) other processes used in a round's window.
    pub others_cpu_pct_max: Option<f64>,
    /// The first failure, if a round failed.
    pub note: Option<String>,
}

/// What a whole plan produced.
#[derive(Debug, Serialize)]
pub(crate) struct Results {
    pub runs: Vec<Outcome>,
    pub summaries: Vec<Summary>,
    /// Peers left out, and why.
    pub skipped: Vec<(String, String)>,
}

/// Seconds a plan takes, roughly (runs × (warm-up + window + start/stop)).
pub(crate) fn estimate(plan: &Plan) -> f64 {
    let runs: usize = plan
        .cells
        .iter()
        .map(|c| plan.peers.iter().filter(|p| c.admits(p)).count())
        .sum();
    let per = plan.window.warmup.as_secs_f64() + plan.window.measure.as_secs_f64() + 1.0;
    (runs * plan.rounds) as f64 * per
}

/// Run the plan.
pub(crate) fn run(plan: &Plan, env: &Env) -> Results {
    let mut skipped = Vec::new();
    let peers: Vec<&Peer> = plan
        .peers
        .iter()
        .filter(|p| match peers::missing(p, env) {
            Some(why) => {
                eprintln!("skipping {}: {why}", p.name());
                skipped.push((p.name(), why));
                false
            }
            None => true,
        })
        .collect();
    let mut runs = Vec::new();
    for round in 0..plan.rounds {
        for cell in &plan.cells {
            let mut order: Vec<&Peer> = peers.iter().copied().filter(|p| cell.admits(p)).collect();
            if !order.is_empty() {
                let k = round % order.len();
                order.rotate_left(k);
            }
            for peer in order {
                let label = format!("r{}/{} {} {}", round + 1, plan.rounds, cell.id, peer.name());
                if plan.window.progress {
                    eprintln!("{label}");
                }
                let tls = cell.want == Want::Tls;
                let (route, result) = match peers::start(peer, env, tls) {
                    Ok(running) => {
                        let route = running.route(cell.want);
                        let r = load::run(
                            &cell.mode,
                            &route,
                            &env.targets,
                            env.pki.as_ref(),
                            running.measured,
                            running.device,
                            plan.window,
                            &label,
                        );
                        drop(running);
                        let text = match (&route, tls) {
                            (Route::Direct, true) => "no proxy, plain TCP".to_string(),
                            (r, true) => format!("TLS 1.3 + {}", r.label()),
                            (r, false) => r.label(),
                        };
                        (text, r)
                    }
                    Err(e) => (
                        String::new(),
                        RunResult {
                            error: Some(format!("start: {e:#}")),
                            ..RunResult::default()
                        },
                    ),
                };
                if let Some(e) = &result.error {
                    eprintln!(
                        "  [{label}] {}: {e}",
                        if result.ok { "note" } else { "FAILED" }
                    );
                } else if plan.window.progress {
                    eprintln!(
                        "  [{label}] {:.3} {}{}",
                        result.rate,
                        cell.mode.rate_unit(),
                        result
                            .others_cpu_pct
                            .filter(|&p| p >= 5.0)
                            .map_or(String::new(), |p| format!(
                                " (other programs: {p:.0} % of a CPU)"
                            ))
                    );
                }
                runs.push(Outcome {
                    cell: cell.id.clone(),
                    peer: peer.name(),
                    round,
                    route,
                    result,
                });
            }
        }
    }
    let summaries = summarize(plan, &runs);
    Results {
        runs,
        summaries,
        skipped,
    }
}

/// The median (the mean of the middle two for an even count).
pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// (resumed, all) TLS handshakes counted over `runs`, if they are TLS runs.
fn tls_total(runs: &[&RunResult]) -> Option<(u64, u64)> {
    let seen: Vec<_> = runs.iter().filter_map(|r| r.tls.as_ref()).collect();
    (!seen.is_empty()).then(|| {
        seen.iter()
            .fold((0, 0), |(r, n), t| (r + t.resumed, n + t.resumed + t.full))
    })
}

fn summarize(plan: &Plan, runs: &[Outcome]) -> Vec<Summary> {
    let mut out = Vec::new();
    for cell in &plan.cells {
        for peer in &plan.peers {
            let mine: Vec<&Outcome> = runs
                .iter()
                .filter(|o| o.cell == cell.id && o.peer == peer.name())
                .collect();
            if mine.is_empty() {
                continue;
            }
            let ok: Vec<&RunResult> = mine.iter().map(|o| &o.result).filter(|r| r.ok).collect();
            let m = |f: &dyn Fn(&RunResult) -> Option<f64>| {
                median(ok.iter().filter_map(|r| f(r)).collect())
            };
            let lat = |f: &dyn Fn(&Latency) -> f64| m(&|r| r.latency_us.as_ref().map(f));
            let open = |f: &dyn Fn(&Latency) -> f64| m(&|r| r.open_us.as_ref().map(f));
            let device: Vec<f64> = ok
                .iter()
                .filter_map(|r| r.proxy.as_ref()?.device_cpu_per_unit)
                .collect();
            let rates: Vec<f64> = ok.iter().map(|r| r.rate).collect();
            let latency = lat(&|l| l.p50).map(|p50| Latency {
                p50,
                p90: lat(&|l| l.p90).unwrap_or(0.0),
                p99: lat(&|l| l.p99).unwrap_or(0.0),
                p999: lat(&|l| l.p999).unwrap_or(0.0),
                max: lat(&|l| l.max).unwrap_or(0.0),
                count: ok
                    .iter()
                    .filter_map(|r| r.latency_us.map(|l| l.count))
                    .sum(),
            });
            out.push(Summary {
                cell: cell.id.clone(),
                peer: peer.name(),
                route: mine
                    .iter()
                    .map(|o| o.route.clone())
                    .find(|r| !r.is_empty())
                    .unwrap_or_default(),
                rounds: mine.len(),
                rounds_ok: ok.len(),
                rate: median(rates.clone()),
                rate_min: rates.iter().copied().reduce(f64::min),
                rate_max: rates.iter().copied().reduce(f64::max),
                latency_us: latency,
                open_us: open(&|l| l.p50).map(|p50| Latency {
                    p50,
                    p90: open(&|l| l.p90).unwrap_or(0.0),
                    p99: open(&|l| l.p99).unwrap_or(0.0),
                    p999: open(&|l| l.p999).unwrap_or(0.0),
                    max: open(&|l| l.max).unwrap_or(0.0),
                    count: ok.iter().filter_map(|r| r.open_us.map(|l| l.count)).sum(),
                }),
                cpu_per_unit: m(&|r| r.proxy.as_ref().map(|c| c.cpu_per_unit)),
                cpu_min: ok
                    .iter()
                    .filter_map(|r| r.proxy.as_ref().map(|c| c.cpu_per_unit))
                    .reduce(f64::min),
                cpu_max: ok
                    .iter()
                    .filter_map(|r| r.proxy.as_ref().map(|c| c.cpu_per_unit))
                    .reduce(f64::max),
                peak_rss_kib: m(&|r| r.proxy.as_ref().map(|c| c.peak_rss_kib as f64)),
                threads: m(&|r| r.proxy.as_ref().map(|c| c.threads as f64)),
                max_threads: ok
                    .iter()
                    .filter_map(|r| r.proxy.as_ref().map(|c| c.max_threads))
                    .max(),
                base_rss_kib: m(&|r| r.proxy.as_ref()?.base_rss_kib.map(|v| v as f64)),
                base_threads: m(&|r| r.proxy.as_ref()?.base_threads.map(|v| v as f64)),
                rss_kib: m(&|r| r.proxy.as_ref().map(|c| c.rss_kib as f64)),
                rss_per_tunnel_kib: m(&|r| r.proxy.as_ref()?.rss_per_tunnel_kib),
                device_cpu_per_unit: median(device.clone()),
                device_cpu_min: device.iter().copied().reduce(f64::min),
                device_cpu_max: device.iter().copied().reduce(f64::max),
                device_rss_kib: m(&|r| r.proxy.as_ref()?.device_rss_kib.map(|v| v as f64)),
                errors: mine.iter().map(|o| o.result.errors).sum(),
                reconnects: mine.iter().map(|o| o.result.reconnects).sum(),
                tls_resumed_share: tls_total(&ok)
                    .filter(|&(_, n)| n > 0)
                    .map(|(r, n)| r as f64 / n as f64),
                tls_handshakes: tls_total(&ok).map(|(_, n)| n),
                others_cpu_pct_max: mine
                    .iter()
                    .filter_map(|o| o.result.others_cpu_pct)
                    .reduce(f64::max),
                tls_params: ok
                    .iter()
                    .filter_map(|r| r.tls.as_ref().map(|t| t.params.clone()))
                    .find(|p| !p.is_empty()),
                note: mine.iter().find_map(|o| o.result.error.clone()),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn cells_admit_the_peers_that_fit() {
        let cell = |mode, want| Cell {
            id: "x".into(),
            title: "x".into(),
            mode,
            want,
        };
        let socks = cell(
            Mode::Connrate {
                conns: 1,
                sources: 0,
                sticky: false,
                max_ops: 1,
            },
            Want::Socks5,
        );
        let p = |id| Peer::Builtin(id);
        assert!(socks.admits(&p(PeerId::Dante)));
        assert!(socks.admits(&p(PeerId::SplicegateW2)));
        assert!(!socks.admits(&p(PeerId::Squid)));
        assert!(!socks.admits(&p(PeerId::Haproxy)));
        let idle = cell(
            Mode::Idle {
                tunnels: 1,
                open_threads: 1,
                open_timeout: std::time::Duration::from_secs(1),
            },
            Want::Tunnel,
        );
        assert!(!idle.admits(&p(PeerId::Direct)));
        assert!(!idle.admits(&p(PeerId::SplicegateW2)));
        assert!(idle.admits(&p(PeerId::Dante)));
        let rotating = cell(
            Mode::Http {
                conns: 1,
                sticky: false,
                max_ops: 1,
            },
            Want::Rotating,
        );
        assert!(rotating.admits(&p(PeerId::SplicegateHttp)));
        assert!(!rotating.admits(&p(PeerId::Squid)));
        // TLS: splicegate and HAProxy; no proxy only as bulk's baseline.
        let handshake = cell(
            Mode::TlsHandshake {
                conns: 1,
                sources: 0,
                resume: true,
                max_ops: 1,
            },
            Want::Tls,
        );
        let bulk = cell(
            Mode::TlsBulk {
                streams: 1,
                max_bytes: 1,
            },
            Want::Tls,
        );
        for c in [&handshake, &bulk] {
            assert!(c.admits(&p(PeerId::Splicegate)));
            assert!(c.admits(&p(PeerId::Haproxy)));
            for other in [
                PeerId::SplicegateHttp,
                PeerId::SplicegateW2,
                PeerId::Nginx,
                PeerId::Squid,
                PeerId::Tinyproxy,
                PeerId::Dante,
            ] {
                assert!(!c.admits(&p(other)), "{other:?}");
            }
        }
        assert!(!handshake.admits(&p(PeerId::Direct)));
        assert!(bulk.admits(&p(PeerId::Direct)));
        let url = Peer::parse("connect://127.0.0.1:1", None).unwrap();
        assert!(!handshake.admits(&url));
    }
}
