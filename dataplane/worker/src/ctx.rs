//! What one worker's tasks share: the shared state, the pipe pool, the
//! tunnel registry, a random source and the name cache; and the one place
//! that counts and logs every answer.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use splicegate_addr::Target;
use splicegate_control::catalog::Rejection;
use splicegate_control::nodes::Rng;
use splicegate_control::policy::Protocol;
use splicegate_uring::PipePool;

use crate::admission::Refusal;
use crate::resolve::DnsCache;
use crate::tunnels::Tunnels;
use crate::{Shared, WorkerStats, clock};

/// Per-worker context (one thread; `Rc`-shared by its tasks).
pub(crate) struct Ctx {
    pub shared: Arc<Shared>,
    pub stats: Arc<WorkerStats>,
    pub pipes: PipePool,
    pub tunnels: Tunnels,
    pub rng: RefCell<Rng>,
    pub dns: DnsCache,
    pub draining: Cell<bool>,
    /// Guard records this second: (unix second, count).
    pub guard_records: Cell<(u64, u32)>,
    /// Datagram buffers of the worker's UDP associations, lent for one turn
    /// (see `udp::Lease`): the pool holds as many as turns were ever in
    /// flight at once, not one pair per association.
    pub udp_buffers: RefCell<Vec<crate::udp::Buffers>>,
    /// Idle upstream connections of session-less HTTP forwarding.
    pub upstreams: RefCell<crate::upstreams::Upstreams>,
}

/// Most flood-guard closes one worker writes to the recent errors a second.
pub(crate) const GUARD_RECORDS_PER_S: u32 = 10;

/// One finished request or tunnel, for the counters and the access log.
pub(crate) struct Outcome<'a> {
    pub peer: SocketAddr,
    pub package: Option<u64>,
    pub protocol: Protocol,
    pub target: Option<&'a Target>,
    pub node: Option<&'a str>,
    /// `None` for success.
    pub error: Option<&'a Rejection>,
    pub up: u64,
    pub down: u64,
    pub started: Instant,
    pub setup: Option<Duration>,
}

impl Ctx {
    /// Record an answered refusal (recent-errors rings, counters, bans for
    /// repeated `AUTH_FAILED`, access log).
    pub(crate) fn record(&self, peer: SocketAddr, protocol: Protocol, refusal: &Refusal) {
        let (package, rej) = (refusal.package, &refusal.rejection);
        let policy = self.shared.engine.policy();
        self.shared
            .engine
            .record_error(&policy, clock::unix_ms(), package, Some(protocol), rej);
        if rej.code == splicegate_control::Code::AuthFailed {
            let banned = self.shared.guard.on_auth_failure(peer.ip(), clock::now());
            if let Some(ban) = banned {
                tracing::warn!(client = %peer.ip(), ban_s = ban.as_secs(), "banned after repeated authentication failures");
                if let Some(sink) = &self.shared.ban_sink {
                    sink(peer.ip(), ban);
                }
            }
        }
        tracing::debug!(client = %peer, package, protocol = protocol.as_str(), code = rej.code.as_str(), detail = %rej.detail, "request refused");
        self.log(&Outcome {
            peer,
            package,
            protocol,
            target: None,
            node: None,
            error: Some(rej),
            up: 0,
            down: 0,
            started: Instant::now(),
            setup: None,
        });
    }

    /// A connection the user-space flood guard closed at accept: always
    /// counted (the caller), and recorded in the recent errors at most
    /// [`GUARD_RECORDS_PER_S`] times a second per worker, so a flood cannot
    /// make the ring's lock its bottleneck.
    pub(crate) fn record_guard(&self, peer: SocketAddr, rej: Rejection) {
        let second = clock::unix_ms() / 1000;
        let (at, n) = self.guard_records.get();
        let n = if at == second { n + 1 } else { 1 };
        self.guard_records.set((second, n));
        if n > GUARD_RECORDS_PER_S {
            return;
        }
        tracing::debug!(client = %peer, code = rej.code.as_str(), detail = %rej.detail, "closed at accept");
        let policy = self.shared.engine.policy();
        self.shared
            .engine
            .record_error(&policy, clock::unix_ms(), None, None, &rej);
    }

    /// Count an outcome and write its access-log line (never a key or password).
    pub(crate) fn log(&self, o: &Outcome<'_>) {
        self.stats.answer(o.protocol, o.error.map(|r| r.code));
        if let Some(log) = &self.shared.access_log {
            let line = serde_json::json!({
                "ts": clock::unix_ms(),
                "client": o.peer.to_string(),
                "package": o.package,
                "protocol": o.protocol.as_str(),
                "target": o.target.map(|t| t.to_string()),
                "node": o.node,
                "code": o.error.map_or("OK", |r| r.code.as_str()),
                "detail": o.error.map(|r| r.detail.as_str()),
                "bytes_up": o.up,
                "bytes_down": o.down,
                "duration_ms": o.started.elapsed().as_secs_f64() * 1000.0,
                "setup_ms": o.setup.map(|d| d.as_secs_f64() * 1000.0),
            });
            log.send(line.to_string(), &self.stats);
        }
    }
}
