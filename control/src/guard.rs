//! Per-address connection rate limits and bans for repeated authentication
//! failures: the user-space twin of the kernel programs. Which connections
//! get through never depends on where the rules run, only the cost: where
//! the kernel cannot drop a packet, the worker accepts and closes at once
//! what this guard refuses.
//!
//! IPv4 sources are keyed by address, IPv6 sources by their /64 (one host
//! usually owns a whole /64). Memory is bounded: each of the 16 shards keeps
//! at most `max_tracked / 16` sources, evicting idle ones first; a full
//! shard is swept at most every [`SWEEP_EVERY`], so a flood from many
//! sources costs one scan per interval, not one per new source (between
//! sweeps a new source passes untracked: the guard fails open).

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::Now;

const NS: u64 = 1_000_000_000;
/// Least time between two sweeps of one full shard.
pub const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// The guard's settings (`[ebpf]` keys: the same rules hold in the kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardConfig {
    /// New connections per second one source may open (0 = unlimited).
    pub syn_rate: u32,
    /// Connections one source may open at once above the rate.
    pub syn_burst: u32,
    /// Authentication failures within `ban_window_s` that ban a source (0 = never).
    pub ban_threshold: u32,
    /// The window failures are counted in, seconds.
    pub ban_window_s: u64,
    /// How long a ban lasts, seconds.
    pub ban_s: u64,
    /// Most sources tracked at once.
    pub max_tracked: usize,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            syn_rate: 2_000,
            syn_burst: 4_000,
            ban_threshold: 20,
            ban_window_s: 60,
            ban_s: 600,
            max_tracked: 1 << 20,
        }
    }
}

/// What the guard says of a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let it in.
    Pass,
    /// Above the source's connection rate.
    DropRate,
    /// The source is banned.
    DropBanned,
}

/// A source: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    /// IPv4 (and IPv4-mapped IPv6).
    V4(u32),
    /// The upper 64 bits of an IPv6 address.
    V6(u64),
}

impl SourceKey {
    /// The key of an address.
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip {
            IpAddr::V4(v4) => SourceKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(u32::from(v4)),
                None => SourceKey::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Token bucket, in units of 1/NS token (so refill is integer math).
    tokens: u64,
    last: Now,
    failures: u32,
    window_start: Now,
    banned_until: Now,
}

/// One shard: its sources and when it was last swept for room.
#[derive(Debug, Default)]
struct Shard {
    map: HashMap<SourceKey, Entry>,
    swept: Option<Now>,
}

/// Rate limits and bans per source, shared by every worker.
#[derive(Debug)]
pub struct Guard {
    cfg: GuardConfig,
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    /// Sweeps of full shards so far.
    sweeps: AtomicU64,
}

impl Guard {
    /// A guard with these settings.
    pub fn new(cfg: GuardConfig) -> Self {
        Guard {
            cfg,
            shards: (0..16).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            sweeps: AtomicU64::new(0),
        }
    }

    /// The settings.
    pub fn config(&self) -> GuardConfig {
        self.cfg
    }

    /// Sweeps of full shards so far (each scans one shard).
    pub fn sweeps(&self) -> u64 {
        self.sweeps.load(Ordering::Relaxed)
    }

    fn shard(&self, k: &SourceKey) -> std::sync::MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(k) as usize) % self.shards.len();
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn capacity(&self) -> u64 {
        u64::from(self.cfg.syn_burst.max(1)) * NS
    }

    fn fresh(&self, now: Now) -> Entry {
        Entry {
            tokens: self.capacity(),
            last: now,
            failures: 0,
            window_start: now,
            banned_until: Now(0),
        }
    }

    /// Make room in a full shard: drop sources with nothing to remember, at
    /// most once per [`SWEEP_EVERY`].
    fn make_room(&self, shard: &mut Shard, now: Now) -> bool {
        let per_shard = (self.cfg.max_tracked / self.shards.len()).max(1);
        if shard.map.len() < per_shard {
            return true;
        }
        if shard
            .swept
            .is_some_and(|t| now.0.saturating_sub(t.0) < SWEEP_EVERY.as_nanos() as u64)
        {
            return false;
        }
        shard.swept = Some(now);
        self.sweeps.fetch_add(1, Ordering::Relaxed);
        let cap = self.capacity();
        let rate = u64::from(self.cfg.syn_rate);
        let map = &mut shard.map;
        map.retain(|_, e| {
            let refilled = e
                .tokens
                .saturating_add(now.0.saturating_sub(e.last.0).saturating_mul(rate));
            e.banned_until > now
                || (e.failures > 0 && now.0 - e.window_start.0 < self.cfg.ban_window_s * NS)
                || refilled < cap
        });
        map.len() < per_shard
    }

    /// A new connection from `ip`.
    pub fn on_connect(&self, ip: IpAddr, now: Now) -> Verdict {
        let key = SourceKey::of(ip);
        let mut shard = self.shard(&key);
        if let Some(e) = shard.map.get(&key)
            && e.banned_until > now
        {
            return Verdict::DropBanned;
        }
        if self.cfg.syn_rate == 0 {
            return Verdict::Pass;
        }
        if !shard.map.contains_key(&key) && !self.make_room(&mut shard, now) {
            return Verdict::Pass; // too many sources to track: fail open, never closed
        }
        let cap = self.capacity();
        let e = shard.map.entry(key).or_insert_with(|| self.fresh(now));
        let elapsed = now.0.saturating_sub(e.last.0);
        e.tokens = e
            .tokens
            .saturating_add(elapsed.saturating_mul(u64::from(self.cfg.syn_rate)))
            .min(cap);
        e.last = now;
        if e.tokens < NS {
            return Verdict::DropRate;
        }
        e.tokens -= NS;
        Verdict::Pass
    }

    /// An authentication failure (`AUTH_FAILED`, unknown package) from `ip`.
    /// Returns how long the source is now banned for when this one crossed
    /// the threshold.
    pub fn on_auth_failure(&self, ip: IpAddr, now: Now) -> Option<std::time::Duration> {
        if self.cfg.ban_threshold == 0 {
            return None;
        }
        let key = SourceKey::of(ip);
        let mut shard = self.shard(&key);
        if !shard.map.contains_key(&key) && !self.make_room(&mut shard, now) {
            return None;
        }
        let e = shard.map.entry(key).or_insert_with(|| self.fresh(now));
        if now.0.saturating_sub(e.window_start.0) >= self.cfg.ban_window_s * NS {
            e.window_start = now;
            e.failures = 0;
        }
        e.failures += 1;
        if e.failures > self.cfg.ban_threshold && e.banned_until <= now {
            e.banned_until = Now(now.0 + self.cfg.ban_s * NS);
            e.failures = 0;
            e.window_start = now;
            return Some(std::time::Duration::from_secs(self.cfg.ban_s));
        }
        None
    }

    /// A ban decided elsewhere (another gateway of the fleet): `ip`'s
    /// source is banned for `secs` from `now`, or longer if it already is.
    /// Returns whether it was not banned before. A full table still takes
    /// it (a sweep makes room, else the ban is not kept: fail open).
    pub fn ban(&self, ip: IpAddr, secs: u64, now: Now) -> bool {
        let key = SourceKey::of(ip);
        let mut shard = self.shard(&key);
        if !shard.map.contains_key(&key) && !self.make_room(&mut shard, now) {
            return false;
        }
        let e = shard.map.entry(key).or_insert_with(|| self.fresh(now));
        let was = e.banned_until > now;
        e.banned_until = e.banned_until.max(Now(now.0 + secs.saturating_mul(NS)));
        !was
    }

    /// Whether `ip`'s source is tracked (has an entry).
    #[cfg(test)]
    fn is_tracked(&self, ip: IpAddr) -> bool {
        let key = SourceKey::of(ip);
        self.shard(&key).map.contains_key(&key)
    }

    /// Whether `ip` is banned now.
    pub fn is_banned(&self, ip: IpAddr, now: Now) -> bool {
        let key = SourceKey::of(ip);
        self.shard(&key)
            .map
            .get(&key)
            .is_some_and(|e| e.banned_until > now)
    }

    /// Lift a ban.
    pub fn unban(&self, ip: IpAddr) {
        let key = SourceKey::of(ip);
        if let Some(e) = self.shard(&key).map.get_mut(&key) {
            e.banned_until = Now(0);
            e.failures = 0;
        }
    }

    /// Sources banned now, with the seconds left.
    pub fn bans(&self, now: Now) -> Vec<(SourceKey, u64)> {
        let mut out = Vec::new();
        for s in self.shards.iter() {
            let m = s.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(
                m.map
                    .iter()
                    .filter(|(_, e)| e.banned_until > now)
                    .map(|(k, e)| (*k, (e.banned_until.0 - now.0).div_ceil(NS))),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A guard with this rate and burst, the rest as by default.
    fn rated(syn_rate: u32, syn_burst: u32) -> Guard {
        Guard::new(GuardConfig {
            syn_rate,
            syn_burst,
            ..GuardConfig::default()
        })
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let g = rated(10, 5);
        let t = Now::from_secs(100);
        let passed = (0..20)
            .filter(|_| g.on_connect(ip("10.0.0.1"), t) == Verdict::Pass)
            .count();
        assert_eq!(passed, 5);
        assert_eq!(
            g.on_connect(ip("10.0.0.2"), t),
            Verdict::Pass,
            "another source is not affected"
        );
        assert_eq!(
            g.on_connect(ip("10.0.0.1"), Now(t.0 + 50_000_000)),
            Verdict::DropRate,
            "half a token"
        );
        assert_eq!(
            g.on_connect(ip("10.0.0.1"), Now(t.0 + 100_000_000)),
            Verdict::Pass,
            "one token per 100 ms"
        );
        // One second at 10/s: about ten more.
        let mut n = 0;
        for ms in (0..1000).step_by(10) {
            if g.on_connect(ip("10.0.0.1"), Now(t.0 + 200_000_000 + ms * 1_000_000))
                == Verdict::Pass
            {
                n += 1;
            }
        }
        assert!((9..=11).contains(&n), "{n}");
        let unlimited = Guard::new(GuardConfig {
            syn_rate: 0,
            ..GuardConfig::default()
        });
        assert!((0..10_000).all(|_| unlimited.on_connect(ip("10.0.0.1"), t) == Verdict::Pass));
    }

    #[test]
    fn ipv6_sources_share_their_64() {
        let g = rated(1, 2);
        let t = Now::from_secs(1);
        assert_eq!(g.on_connect(ip("2001:db8:1:2::1"), t), Verdict::Pass);
        assert_eq!(g.on_connect(ip("2001:db8:1:2::ffff"), t), Verdict::Pass);
        assert_eq!(
            g.on_connect(ip("2001:db8:1:2:aaaa::1"), t),
            Verdict::DropRate
        );
        assert_eq!(g.on_connect(ip("2001:db8:1:3::1"), t), Verdict::Pass);
        assert_eq!(
            SourceKey::of(ip("::ffff:10.1.2.3")),
            SourceKey::of(ip("10.1.2.3"))
        );
    }

    #[test]
    fn a_ban_from_elsewhere_holds_and_never_shortens_one() {
        let g = Guard::new(GuardConfig::default());
        let t = Now::from_secs(1000);
        assert!(g.ban(ip("10.0.0.7"), 30, t), "newly banned");
        assert_eq!(
            g.on_connect(ip("10.0.0.7"), Now::from_secs(1029)),
            Verdict::DropBanned
        );
        assert_eq!(
            g.on_connect(ip("10.0.0.8"), Now::from_secs(1029)),
            Verdict::Pass
        );
        assert!(
            !g.ban(ip("10.0.0.7"), 5, Now::from_secs(1010)),
            "already banned"
        );
        assert!(
            g.is_banned(ip("10.0.0.7"), Now::from_secs(1029)),
            "a shorter ban does not shorten it"
        );
        assert!(!g.is_banned(ip("10.0.0.7"), Now::from_secs(1031)));
    }

    #[test]
    fn repeated_failures_ban_until_it_expires() {
        let g = Guard::new(GuardConfig {
            ban_threshold: 3,
            ban_window_s: 60,
            ban_s: 10,
            ..GuardConfig::default()
        });
        let t = Now::from_secs(1000);
        for i in 0..3 {
            assert_eq!(g.on_auth_failure(ip("10.0.0.9"), Now(t.0 + i)), None);
        }
        assert_eq!(
            g.on_auth_failure(ip("10.0.0.9"), Now(t.0 + 5)),
            Some(std::time::Duration::from_secs(10))
        );
        assert_eq!(
            g.on_connect(ip("10.0.0.9"), Now::from_secs(1005)),
            Verdict::DropBanned
        );
        assert!(g.is_banned(ip("10.0.0.9"), Now::from_secs(1009)));
        assert_eq!(g.bans(Now::from_secs(1005)).len(), 1);
        assert_eq!(
            g.on_connect(ip("10.0.0.9"), Now::from_secs(1011)),
            Verdict::Pass,
            "the ban expired"
        );
        // Failures spread beyond the window never ban.
        for i in 0..10 {
            assert_eq!(
                g.on_auth_failure(ip("10.0.0.10"), Now::from_secs(2000 + i * 61)),
                None
            );
        }
        g.on_auth_failure(ip("10.0.0.11"), t);
        for _ in 0..4 {
            g.on_auth_failure(ip("10.0.0.11"), t);
        }
        assert!(g.is_banned(ip("10.0.0.11"), t));
        g.unban(ip("10.0.0.11"));
        assert!(!g.is_banned(ip("10.0.0.11"), t));
    }

    #[test]
    fn memory_is_bounded_and_fails_open() {
        let g = Guard::new(GuardConfig {
            syn_rate: 1,
            syn_burst: 1,
            max_tracked: 64,
            ..GuardConfig::default()
        });
        let t = Now::from_secs(5);
        for i in 0..10_000u32 {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            g.on_connect(a, t);
        }
        let tracked: usize = g.shards.iter().map(|s| s.lock().unwrap().map.len()).sum();
        assert!(tracked <= 64, "{tracked}");
        // Sources it could not track pass rather than being refused.
        assert_eq!(g.on_connect(ip("11.0.0.1"), t), Verdict::Pass);
        // 10,000 new sources against full shards at one instant: each shard
        // was swept once, not once per source.
        assert!(g.sweeps() <= 16, "{} sweeps", g.sweeps());
        // Time passes: a full shard may be swept again, and the idle
        // sources (their bucket refilled) make room for new ones.
        let later = Now(t.0 + 2 * SWEEP_EVERY.as_nanos() as u64 + 2 * NS);
        let before = g.sweeps();
        assert_eq!(g.on_connect(ip("10.255.0.1"), later), Verdict::Pass);
        assert_eq!(g.sweeps(), before + 1);
        assert!(g.is_tracked(ip("10.255.0.1")), "room was made");
    }
}
