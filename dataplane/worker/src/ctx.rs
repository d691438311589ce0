//! What one worker's tasks share: the shared state, the pipe pool, the
//! tunnel registry, a random source and the name cache.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::sync::Arc;

use splicegate_control::catalog::Rejection;
use splicegate_control::nodes::Rng;
use splicegate_control::policy::Policy;
use splicegate_uring::PipePool;

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
}

impl Ctx {
    /// Record an answered error (recent-errors rings, counters, log).
    pub fn record(
        &self,
        policy: &Policy,
        peer: SocketAddr,
        package: Option<u64>,
        protocol: &'static str,
        rej: &Rejection,
    ) {
        WorkerStats::inc(&self.stats.errors);
        self.shared
            .engine
            .record_error(policy, clock::unix_ms(), package, protocol, rej);
        tracing::debug!(client = %peer, package, protocol, code = rej.code.as_str(), detail = %rej.detail, "request refused");
    }
}
