//! Counters of the data plane, one set per worker: plain relaxed atomics,
//! each written by one worker and read by the control thread for `/metrics`.
//! No I/O; kept here so the admin side reads them without importing the
//! data plane.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::policy::Protocol;

/// Index of successful answers in [`WorkerStats::answers`] (after every code).
pub const OK: usize = crate::Code::ALL.len();

/// Upper bounds of the setup-latency buckets, microseconds.
pub const SETUP_BUCKETS_US: [u64; 14] = [
    250, 500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 10_000_000,
];

/// A latency histogram of atomics (one writer, any reader).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Counts per bucket of [`SETUP_BUCKETS_US`], plus one for larger values.
    pub buckets: [AtomicU64; SETUP_BUCKETS_US.len() + 1],
    /// Sum of the observations, microseconds.
    pub sum_us: AtomicU64,
}

impl LatencyHistogram {
    /// Record one observation.
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros() as u64;
        let i = SETUP_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(SETUP_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// Counters of one worker, written by that worker alone (relaxed atomics so
/// the control thread reads them without a race and without contention).
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Client connections open now.
    pub open_connections: AtomicU64,
    /// Tunnels (CONNECT, SOCKS5) open now.
    pub open_tunnels: AtomicU64,
    /// Answers by protocol ([`Protocol::index`]) and code ([`crate::Code::index`], or [`OK`]).
    pub answers: [[AtomicU64; OK + 1]; Protocol::ALL.len()],
    /// Bytes relayed client → target.
    pub bytes_up: AtomicU64,
    /// Bytes relayed target → client.
    pub bytes_down: AtomicU64,
    /// Time from a request's head to its established tunnel or upstream connection.
    pub setup: LatencyHistogram,
    /// Access-log lines dropped because the writer fell behind.
    pub access_dropped: AtomicU64,
    /// Connections closed at accept by the user-space guard: above the
    /// source's rate, banned source, not on an `ip_only` port's allowlist.
    pub guard_drops: [AtomicU64; 3],
    /// TLS handshakes to the proxy ports by result ([`TLS_FULL`], …).
    pub tls_handshakes: [AtomicU64; 5],
    /// Connections to a `proxy_protocol` port closed without a valid PROXY
    /// protocol header, by reason ([`PROXY_PROTOCOL_REJECT_REASONS`]).
    pub proxy_protocol_rejected: [AtomicU64; 4],
    /// SOCKS5 UDP datagrams relayed: client → target, target → client.
    pub udp_datagrams: [AtomicU64; 2],
    /// SOCKS5 UDP datagrams dropped by reason ([`UDP_DROP_REASONS`]).
    pub udp_dropped: [AtomicU64; UDP_DROP_REASONS.len()],
    /// Forwarded requests without a session that took an idle upstream
    /// connection instead of dialling (counted as it happens).
    pub upstreams_reused: AtomicU64,
    /// The worker's runtime, as of its last tick (every 250 ms).
    pub runtime: RuntimeGauges,
}

/// What a worker's io_uring runtime and pipe pool report, copied at each
/// tick (the runtime's own counters live on its thread).
#[derive(Debug, Default)]
pub struct RuntimeGauges {
    /// Pipes of this worker holding bytes now.
    pub pipes_in_use: AtomicU64,
    /// Reads copied because no pipe could be had (over the cap, or `pipe2`
    /// failing); cumulative.
    pub pipe_copy_fallbacks: AtomicU64,
    /// `pipe2` calls that failed; cumulative.
    pub pipe_failures: AtomicU64,
    /// Turns that found completions held back by a full completion queue;
    /// cumulative.
    pub cq_backlogs: AtomicU64,
    /// Completions the kernel dropped; cumulative (any is fatal).
    pub cq_dropped: AtomicU64,
    /// Ring waits that gathered completions for a moment before waking (a
    /// UDP association's runs, `[proxy] udp_gather_us`); cumulative.
    pub gathered_waits: AtomicU64,
    /// Ring operations in flight now.
    pub ops_in_flight: AtomicU64,
    /// Tasks alive now.
    pub tasks: AtomicU64,
    /// Idle upstream connections kept for session-less HTTP forwarding now.
    pub upstreams_idle: AtomicU64,
}

/// Index of [`WorkerStats::guard_drops`] per verdict.
pub const GUARD_DROP_RATE: usize = 0;
/// Banned source.
pub const GUARD_DROP_BANNED: usize = 1;
/// Not on an `ip_only` listener's allowlist.
pub const GUARD_DROP_NOT_ALLOWED: usize = 2;

/// Index of [`WorkerStats::tls_handshakes`]: a full handshake.
pub const TLS_FULL: usize = 0;
/// A resumed handshake (ticket or session id).
pub const TLS_RESUMED: usize = 1;
/// A handshake that failed (bad record, no common protocol or version, an
/// alert from the client).
pub const TLS_FAILED: usize = 2;
/// A handshake not finished within the handshake timeout (or the client
/// closed during it).
pub const TLS_TIMED_OUT: usize = 3;
/// A ClientHello on a gateway without `[tls]` (answered with an alert).
pub const TLS_NOT_CONFIGURED: usize = 4;
/// The `result` label of each index.
pub const TLS_RESULTS: [&str; 5] = ["full", "resumed", "failed", "timed_out", "not_configured"];

/// Index of [`WorkerStats::proxy_protocol_rejected`]: the first bytes are
/// not a PROXY protocol header at all.
pub const PP_MISSING: usize = 0;
/// A header that breaks the format (too long, bad signature, version,
/// command, family, length, address or TLV).
pub const PP_MALFORMED: usize = 1;
/// The connection closed in the middle of a header.
pub const PP_TRUNCATED: usize = 2;
/// No complete header within `[timeouts] handshake_ms`.
pub const PP_TIMED_OUT: usize = 3;
/// The `reason` label of each index.
pub const PROXY_PROTOCOL_REJECT_REASONS: [&str; 4] =
    ["missing", "malformed", "truncated", "timed_out"];

/// Index of [`WorkerStats::udp_dropped`]: a fragment (FRAG ≠ 0).
pub const UDP_DROP_FRAGMENT: usize = 0;
/// A target the safety rules block.
pub const UDP_DROP_BLOCKED: usize = 1;
/// From an address that is not the association's client.
pub const UDP_DROP_STRANGER: usize = 2;
/// A header that does not parse.
pub const UDP_DROP_MALFORMED: usize = 3;
/// A target name that does not resolve (in time), or of a family the exit
/// cannot reach.
pub const UDP_DROP_UNREACHABLE: usize = 4;
/// A socket buffer full (the sender outpaces the path).
pub const UDP_DROP_FULL: usize = 5;
/// At the exit, from an address the client never sent to (or before its
/// first datagram): answers only come from where the client went.
pub const UDP_DROP_UNSOLICITED: usize = 6;
/// Too long for a UDP datagram on the next hop once its header is added
/// (an answer) or kept (a datagram to a chained SOCKS5 node), `EMSGSIZE`:
/// for one, an answer of more than 65,497 bytes from an IPv4 target to an
/// IPv4 client (65,507 bytes, less the 10-byte header).
pub const UDP_DROP_OVERSIZED: usize = 7;
/// The `reason` label of each index.
pub const UDP_DROP_REASONS: [&str; 8] = [
    "fragment",
    "blocked_target",
    "stranger",
    "malformed",
    "unreachable",
    "buffer_full",
    "unsolicited",
    "oversized",
];

impl WorkerStats {
    /// Add one.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    /// Take one away.
    pub fn dec(c: &AtomicU64) {
        c.fetch_sub(1, Ordering::Relaxed);
    }
    /// Count an answer (`None` = success).
    pub fn answer(&self, protocol: Protocol, code: Option<crate::Code>) {
        let c = code.map_or(OK, |c| c.index());
        self.answers[protocol.index()][c].fetch_add(1, Ordering::Relaxed);
    }
    /// Count relayed bytes.
    pub fn bytes(&self, up: u64, down: u64) {
        self.bytes_up.fetch_add(up, Ordering::Relaxed);
        self.bytes_down.fetch_add(down, Ordering::Relaxed);
    }
}
