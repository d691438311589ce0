//! `GET /metrics`: Prometheus text (0.0.4) through `prometheus-client`.
//!
//! Two kinds of series: metrics this crate owns and updates (store flush
//! latency, health state changes), registered once; and values read at
//! scrape time from where they live (the workers' counters, the node pool,
//! the session table, the eBPF verdicts), by a [`Collector`]. Label sets are
//! bounded: protocol × code, direction, worker index, node state, verdict;
//! never a package, session or node id.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use splicegate_control::Code;
use splicegate_control::nodes::{NodeKind, NodeState};
use splicegate_control::policy::Protocol;
use splicegate_control::stats::{
    GUARD_DROP_BANNED, GUARD_DROP_NOT_ALLOWED, GUARD_DROP_RATE, OK, SETUP_BUCKETS_US, WorkerStats,
};

use crate::control::Control;
use crate::fleet::FleetView;
use crate::health::HealthStats;

/// The eBPF programs' verdict counters, read at scrape time:
/// `(verdict, count)` pairs rendered as `splicegate_ebpf_verdicts_total{verdict}`.
pub type VerdictFn = Arc<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>;

/// A value the binary keeps outside the workers (log lines dropped, the
/// TLS certificate's expiry), read at scrape time.
#[derive(Clone)]
pub struct ProcessCounter {
    /// The metric's name (a counter's without `_total`).
    pub name: &'static str,
    /// Its help line.
    pub help: &'static str,
    /// A gauge rather than a counter; a gauge reading `None` is left out.
    pub gauge: bool,
    /// Reads it (`None`: nothing to report now).
    pub read: Arc<dyn Fn() -> Option<i64> + Send + Sync>,
}

impl fmt::Debug for ProcessCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// The registry `/metrics` renders.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

impl Metrics {
    /// Register everything.
    pub fn new(
        control: Arc<Control>,
        workers: Vec<Arc<WorkerStats>>,
        health: &HealthStats,
        ebpf: Option<VerdictFn>,
        process: Vec<ProcessCounter>,
        fleet: Option<Arc<FleetView>>,
    ) -> Metrics {
        // In a fleet every series carries the gateway's id, so that one
        // Prometheus can scrape them all and tell them apart.
        let mut registry = match &fleet {
            Some(f) => Registry::with_labels(std::iter::once((
                std::borrow::Cow::Borrowed("gateway"),
                std::borrow::Cow::Owned(f.id()),
            ))),
            None => Registry::default(),
        };
        if let Some(f) = &fleet {
            registry.register(
                "splicegate_fleet_changes_published",
                "API changes made on this gateway and published to the fleet",
                f.changes_published.clone(),
            );
            registry.register(
                "splicegate_fleet_changes_received",
                "API changes other gateways published, received here",
                f.changes_received.clone(),
            );
            registry.register(
                "splicegate_fleet_reloads",
                "Reads of the shared store that changed this gateway's policy, grants or usage epochs",
                f.reloads_applied.clone(),
            );
            registry.register(
                "splicegate_fleet_bans_received",
                "Sources other gateways banned after repeated AUTH_FAILED, banned here too",
                f.bans_received.clone(),
            );
            registry.register(
                "splicegate_fleet_reload_errors",
                "Reads of the shared store that failed (retried)",
                f.reload_errors.clone(),
            );
        }
        registry.register(
            "splicegate_store_flush_seconds",
            "Time to append one flush of usage to the store (one transaction)",
            control.flush_seconds.clone(),
        );
        registry.register(
            "splicegate_store_flush_errors",
            "Flushes that failed (their usage is written by the next one)",
            control.flush_errors.clone(),
        );
        registry.register(
            "splicegate_store_backlog_rows",
            "Ledger rows waiting in memory because the store could not be written (written when it returns)",
            control.backlog_rows.clone(),
        );
        registry.register(
            "splicegate_node_health_changes",
            "Nodes taken out of selection (to=out) or brought back (to=in) by health checks or passive failures",
            health.changes.clone(),
        );
        registry.register(
            "splicegate_health_probes",
            "Health probes that ran (passed or failed)",
            health.probes.clone(),
        );
        registry.register(
            "splicegate_health_probes_failed",
            "Health probes that failed",
            health.probes_failed.clone(),
        );
        registry.register_collector(Box::new(Live {
            control,
            workers,
            ebpf,
            process,
            fleet,
        }));
        Metrics { registry }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry).is_err() {
            out.push_str("# encoding failed\n");
        }
        out
    }
}

/// Values read at scrape time.
struct Live {
    control: Arc<Control>,
    workers: Vec<Arc<WorkerStats>>,
    ebpf: Option<VerdictFn>,
    process: Vec<ProcessCounter>,
    fleet: Option<Arc<FleetView>>,
}

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Live")
            .field("workers", &self.workers.len())
            .field("ebpf", &self.ebpf.is_some())
            .finish()
    }
}

fn sum(workers: &[Arc<WorkerStats>], f: impl Fn(&WorkerStats) -> u64) -> u64 {
    workers.iter().map(|w| f(w)).sum()
}

fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: &[(&[(&str, &str)], u64)],
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        m.encode_family(labels)?
            .encode_counter::<NoLabelSet, u64, u64>(v, None)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: &[(&[(&str, &str)], i64)],
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        m.encode_family(labels)?.encode_gauge(v)?;
    }
    Ok(())
}

impl Collector for Live {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        if let Some(f) = &self.fleet {
            gauge(
                &mut enc,
                "splicegate_fleet_redis_up",
                "Whether the fleet's Redis answered this gateway's last command (0: serving on local state)",
                &[(&[], i64::from(f.redis_up()))],
            )?;
            gauge(
                &mut enc,
                "splicegate_fleet_gateways",
                "Live gateways in the fleet's registry (this one included), as last read",
                &[(&[], f.gateways().len() as i64)],
            )?;
        }
        let w = &self.workers;
        let rd = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);

        // Answers by protocol and code.
        let codes: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).chain(["OK"]).collect();
        let mut labels: Vec<[(&str, &str); 2]> = Vec::with_capacity(Protocol::ALL.len() * (OK + 1));
        let mut values = Vec::with_capacity(labels.capacity());
        for proto in Protocol::ALL {
            for (c, code) in codes.iter().enumerate() {
                labels.push([("protocol", proto.as_str()), ("code", code)]);
                values.push(sum(w, |s| rd(&s.answers[proto.index()][c])));
            }
        }
        let series: Vec<(&[(&str, &str)], u64)> = labels
            .iter()
            .zip(&values)
            .map(|(l, v)| (l.as_slice(), *v))
            .collect();
        counter(
            &mut enc,
            "splicegate_requests",
            "Answers by protocol and code: OK for an established tunnel or forwarded request, else the error code",
            &series,
        )?;

        counter(
            &mut enc,
            "splicegate_relayed_bytes",
            "Bytes relayed between clients and targets (up: client to target)",
            &[
                (&[("direction", "up")], sum(w, |s| rd(&s.bytes_up))),
                (&[("direction", "down")], sum(w, |s| rd(&s.bytes_down))),
            ],
        )?;

        counter(
            &mut enc,
            "splicegate_guard_closed_connections",
            "Connections the user-space flood guard closed at accept, by reason (the kernel's drops are splicegate_ebpf_verdicts)",
            &[
                (
                    &[("reason", "rate")],
                    sum(w, |s| rd(&s.guard_drops[GUARD_DROP_RATE])),
                ),
                (
                    &[("reason", "banned")],
                    sum(w, |s| rd(&s.guard_drops[GUARD_DROP_BANNED])),
                ),
                (
                    &[("reason", "not_allowed")],
                    sum(w, |s| rd(&s.guard_drops[GUARD_DROP_NOT_ALLOWED])),
                ),
            ],
        )?;

        let tls: Vec<([(&str, &str); 1], u64)> = splicegate_control::stats::TLS_RESULTS
            .iter()
            .enumerate()
            .map(|(i, r)| ([("result", *r)], sum(w, |s| rd(&s.tls_handshakes[i]))))
            .collect();
        let tls: Vec<(&[(&str, &str)], u64)> =
            tls.iter().map(|(l, v)| (l.as_slice(), *v)).collect();
        counter(
            &mut enc,
            "splicegate_tls_handshakes",
            "TLS handshakes on the proxy ports by result: full, resumed, failed, timed_out, not_configured (a ClientHello without [tls])",
            &tls,
        )?;

        let pp: Vec<([(&str, &str); 1], u64)> =
            splicegate_control::stats::PROXY_PROTOCOL_REJECT_REASONS
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    (
                        [("reason", *r)],
                        sum(w, |s| rd(&s.proxy_protocol_rejected[i])),
                    )
                })
                .collect();
        let pp: Vec<(&[(&str, &str)], u64)> = pp.iter().map(|(l, v)| (l.as_slice(), *v)).collect();
        counter(
            &mut enc,
            "splicegate_proxy_protocol_rejected",
            "Connections to proxy_protocol ports closed without a valid PROXY protocol header, by reason: missing, malformed, truncated, timed_out",
            &pp,
        )?;

        counter(
            &mut enc,
            "splicegate_udp_datagrams",
            "SOCKS5 UDP datagrams relayed, by direction: up (client to target) and down",
            &[
                (&[("direction", "up")], sum(w, |s| rd(&s.udp_datagrams[0]))),
                (
                    &[("direction", "down")],
                    sum(w, |s| rd(&s.udp_datagrams[1])),
                ),
            ],
        )?;
        let udp: Vec<([(&str, &str); 1], u64)> = splicegate_control::stats::UDP_DROP_REASONS
            .iter()
            .enumerate()
            .map(|(i, r)| ([("reason", *r)], sum(w, |s| rd(&s.udp_dropped[i]))))
            .collect();
        let udp: Vec<(&[(&str, &str)], u64)> =
            udp.iter().map(|(l, v)| (l.as_slice(), *v)).collect();
        counter(
            &mut enc,
            "splicegate_udp_dropped",
            "SOCKS5 UDP datagrams dropped, by reason: fragment (FRAG not 0), blocked_target, stranger (not the association's client), malformed, unreachable, buffer_full, unsolicited (at the exit, from an address the client never sent to), oversized (too long for a datagram on the next hop with its header added or kept)",
            &udp,
        )?;

        let idx: Vec<String> = (0..w.len()).map(|i| i.to_string()).collect();
        let per_worker = |f: &dyn Fn(&WorkerStats) -> u64| -> Vec<([(&str, &str); 1], u64)> {
            w.iter()
                .zip(&idx)
                .map(|(s, i)| ([("worker", i.as_str())], f(s)))
                .collect()
        };
        // Per-worker series: (name, help, counter or gauge, reader).
        type Read = fn(&WorkerStats) -> u64;
        let per_worker_series: [(&str, &str, bool, Read); 13] = [
            (
                "splicegate_upstream_reuses",
                "Forwarded requests without a session that took an idle upstream connection of their package, node and target instead of dialling, per worker",
                true,
                |s| s.upstreams_reused.load(Ordering::Relaxed),
            ),
            (
                "splicegate_upstreams_idle",
                "Idle upstream connections kept for session-less HTTP forwarding now, per worker",
                false,
                |s| s.runtime.upstreams_idle.load(Ordering::Relaxed),
            ),
            (
                "splicegate_accepted_connections",
                "Client connections accepted, per worker",
                true,
                |s| s.accepted.load(Ordering::Relaxed),
            ),
            (
                "splicegate_pipe_copy_fallbacks",
                "Reads copied because no pipe could be had (over the pipe cap, or pipe2 failing), per worker",
                true,
                |s| s.runtime.pipe_copy_fallbacks.load(Ordering::Relaxed),
            ),
            (
                "splicegate_pipe_failures",
                "pipe2 calls that failed (out of descriptors), per worker",
                true,
                |s| s.runtime.pipe_failures.load(Ordering::Relaxed),
            ),
            (
                "splicegate_ring_cq_backlogs",
                "Ring turns that found completions held back by a full completion queue, per worker",
                true,
                |s| s.runtime.cq_backlogs.load(Ordering::Relaxed),
            ),
            (
                "splicegate_ring_gathered_waits",
                "Ring waits asked to gather completions for proxy.udp_gather_us before waking (UDP associations whose datagrams arrive in runs), per worker",
                true,
                |s| s.runtime.gathered_waits.load(Ordering::Relaxed),
            ),
            (
                "splicegate_ring_cq_dropped",
                "Completions the kernel dropped (fatal for the worker), per worker",
                true,
                |s| s.runtime.cq_dropped.load(Ordering::Relaxed),
            ),
            (
                "splicegate_pipes_in_use",
                "Pipes holding spliced bytes now, per worker",
                false,
                |s| s.runtime.pipes_in_use.load(Ordering::Relaxed),
            ),
            (
                "splicegate_ring_ops_in_flight",
                "io_uring operations in flight now, per worker",
                false,
                |s| s.runtime.ops_in_flight.load(Ordering::Relaxed),
            ),
            (
                "splicegate_worker_tasks",
                "Tasks alive on the worker's runtime now",
                false,
                |s| s.runtime.tasks.load(Ordering::Relaxed),
            ),
            (
                "splicegate_open_connections",
                "Client connections open now, per worker",
                false,
                |s| s.open_connections.load(Ordering::Relaxed),
            ),
            (
                "splicegate_open_tunnels",
                "Tunnels (CONNECT, SOCKS5) open now, per worker",
                false,
                |s| s.open_tunnels.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, is_counter, f) in per_worker_series {
            let v = per_worker(&f);
            if is_counter {
                let series: Vec<_> = v.iter().map(|(l, v)| (l.as_slice(), *v)).collect();
                counter(&mut enc, name, help, &series)?;
            } else {
                let series: Vec<_> = v.iter().map(|(l, v)| (l.as_slice(), *v as i64)).collect();
                gauge(&mut enc, name, help, &series)?;
            }
        }

        // Setup latency: the workers' buckets, in seconds.
        let mut buckets: Vec<(f64, u64)> = SETUP_BUCKETS_US
            .iter()
            .enumerate()
            .map(|(i, b)| (*b as f64 / 1e6, sum(w, |s| rd(&s.setup.buckets[i]))))
            .collect();
        buckets.push((
            f64::INFINITY,
            sum(w, |s| rd(&s.setup.buckets[SETUP_BUCKETS_US.len()])),
        ));
        let count: u64 = buckets.iter().map(|b| b.1).sum();
        let sum_s = sum(w, |s| rd(&s.setup.sum_us)) as f64 / 1e6;
        enc.encode_descriptor(
            "splicegate_tunnel_setup_seconds",
            "Time from a request's head to its established tunnel or upstream connection",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(sum_s, count, &buckets, None)?;

        // Nodes by state, sessions.
        let engine = self.control.engine();
        let policy = engine.policy();
        let (mut online, mut draining, mut offline, mut unhealthy) = (0i64, 0i64, 0i64, 0i64);
        let (mut agents, mut streams) = (0i64, 0i64);
        for (_, n) in policy.nodes.iter() {
            match n.state() {
                NodeState::Online => online += 1,
                NodeState::Draining => draining += 1,
                NodeState::Offline => offline += 1,
            }
            if n.kind == NodeKind::Agent {
                let a = n.runtime.agent();
                if a.is_connected() {
                    agents += 1;
                    streams += i64::try_from(a.streams()).unwrap_or(i64::MAX);
                }
            } else if n.runtime.is_unhealthy() {
                unhealthy += 1;
            }
        }
        gauge(
            &mut enc,
            "splicegate_nodes",
            "Nodes by state as selection sees it (offline includes unhealthy)",
            &[
                (&[("state", "online")], online),
                (&[("state", "draining")], draining),
                (&[("state", "offline")], offline),
            ],
        )?;
        gauge(
            &mut enc,
            "splicegate_nodes_unhealthy",
            "Nodes that health checks or passive failures took out",
            &[(&[], unhealthy)],
        )?;
        gauge(
            &mut enc,
            "splicegate_agents_connected",
            "Agent nodes whose device is connected now",
            &[(&[], agents)],
        )?;
        gauge(
            &mut enc,
            "splicegate_agent_streams",
            "Streams open now to connected agents' devices",
            &[(&[], streams)],
        )?;
        let live = engine.sessions.sweep(self.control.now());
        gauge(
            &mut enc,
            "splicegate_sessions",
            "Sticky sessions live now",
            &[(&[], live as i64)],
        )?;
        gauge(
            &mut enc,
            "splicegate_packages",
            "Packages in the policy",
            &[(&[], policy.packages.len() as i64)],
        )?;
        counter(
            &mut enc,
            "splicegate_access_log_dropped",
            "Access-log lines dropped because the writer fell behind",
            &[(&[], sum(w, |s| rd(&s.access_dropped)))],
        )?;
        for p in &self.process {
            match ((p.read)(), p.gauge) {
                (Some(v), true) => gauge(&mut enc, p.name, p.help, &[(&[], v)])?,
                (v, false) => counter(
                    &mut enc,
                    p.name,
                    p.help,
                    &[(&[], u64::try_from(v.unwrap_or(0)).unwrap_or(0))],
                )?,
                (None, true) => {}
            }
        }

        if let Some(f) = &self.ebpf {
            let verdicts = f();
            let labels: Vec<[(&str, &str); 1]> =
                verdicts.iter().map(|(v, _)| [("verdict", *v)]).collect();
            let series: Vec<(&[(&str, &str)], u64)> = labels
                .iter()
                .zip(&verdicts)
                .map(|(l, (_, n))| (l.as_slice(), *n))
                .collect();
            counter(
                &mut enc,
                "splicegate_ebpf_verdicts",
                "Packets judged by the kernel programs, per verdict",
                &series,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use splicegate_control::decl::NodeFields;

    fn line<'a>(text: &'a str, name: &str) -> Option<&'a str> {
        text.lines()
            .find(|l| l.split([' ', '{']).next() == Some(name))
    }

    #[test]
    fn connected_agents_and_their_streams_are_counted() {
        let c = Control::open(
            crate::ControlOptions {
                store: crate::StoreLocation::Sqlite(":memory:".into()),
                session_capacity: 10,
                clock: || splicegate_control::Now::from_secs(1),
                gateway_id: "local".into(),
                snapshot: None,
            },
            Default::default(),
        )
        .unwrap();
        for id in ["a1", "a2", "a3"] {
            let f: NodeFields =
                serde_json::from_str(&format!(r#"{{"id": "{id}", "kind": "agent"}}"#)).unwrap();
            c.create_node(&f).unwrap();
        }
        let c = Arc::new(c);
        let m = Metrics::new(
            c.clone(),
            Vec::new(),
            &HealthStats::default(),
            None,
            Vec::new(),
            None,
        );
        let text = m.render();
        assert_eq!(
            line(&text, "splicegate_agents_connected"),
            Some("splicegate_agents_connected 0"),
            "{text}"
        );
        let policy = c.engine().policy();
        for (id, streams) in [("a1", 2), ("a2", 3)] {
            let (idx, n) = policy.nodes.get(id).unwrap();
            policy
                .nodes
                .agent_up(idx, "192.0.2.1:1".parse().unwrap(), "v", 1);
            for _ in 0..streams {
                n.runtime.agent().stream_opened();
            }
        }
        let text = m.render();
        assert_eq!(
            line(&text, "splicegate_agents_connected"),
            Some("splicegate_agents_connected 2")
        );
        assert_eq!(
            line(&text, "splicegate_agent_streams"),
            Some("splicegate_agent_streams 5")
        );
        assert!(
            text.contains("splicegate_nodes{state=\"online\"} 2"),
            "{text}"
        );
        assert!(text.contains("splicegate_nodes_unhealthy 0"), "{text}");
    }
}
