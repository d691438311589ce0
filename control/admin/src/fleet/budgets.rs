//! Traffic caps and organisation credits shared by the fleet (SPEC
//! section 11), on leases.
//!
//! `{prefix}:cap:{package}:{epoch}` (bytes) and `{prefix}:credits:{org}`
//! (micro-credits) count what the fleet has taken of a limit. The first
//! lease creates the count with the taking gateway's counter (the store's
//! total when it started plus what it relayed since); every lease raises
//! it, and no lease takes it past the limit. A gateway may take its own
//! counter as far as its leases reach ([`FleetBudget`]); every [`TICK`] it
//! looks at each limit its clients use and, when what is left of its leases
//! is below half of what it will need (`[fleet] lease_bytes`, or one second
//! of its traffic when that is more, up to a quarter of its even share of
//! the limit), takes the next lease in one script.
//! A counter past its allowance goes on while the fleet has more to lease;
//! once the fleet has nothing left, the allowance is a hard stop, and the
//! one-second re-check of open tunnels closes them. So a limit is overshot,
//! per gateway, by at most the traffic of one [`TICK`] and that re-check.
//!
//! Redis unreachable: each limit in use gets one provisional lease of the
//! fleet's last known remainder divided by the live gateways, and stops
//! there. When Redis is back, what was used beyond the leases Redis granted
//! is added to the fleet's count before the next lease.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use splicegate_control::limits::{FleetBudget, GB};
use tokio::sync::watch;

use super::FleetView;
use crate::control::{Control, StoredUsage};

/// How often each limit in use is looked at.
pub(super) const TICK: Duration = Duration::from_millis(100);

/// How long a gateway whose limit the fleet has used up waits before it
/// asks again (a raised cap or a grant is seen sooner: the limit changed).
const EXHAUSTED_RETRY: Duration = Duration::from_secs(2);

/// Create the count at ARGV[2] if there is none; else add what was used
/// beyond the leases while Redis was away (ARGV[4]: a new count's start
/// holds it already). Then grant up to ARGV[3] of what the limit (ARGV[1])
/// leaves. Returns the grant and what is left.
const LEASE_SCRIPT: &str = r"
local taken
if redis.call('SET', KEYS[1], ARGV[2], 'NX') then
  taken = tonumber(ARGV[2])
else
  taken = redis.call('INCRBY', KEYS[1], ARGV[4])
end
local left = tonumber(ARGV[1]) - taken
local grant = 0
if left > 0 then grant = math.min(left, tonumber(ARGV[3])) end
if grant > 0 then taken = redis.call('INCRBY', KEYS[1], grant) end
return {grant, tonumber(ARGV[1]) - taken}
";

/// [`LEASE_SCRIPT`] with its SHA-1 computed once, not per lease.
static LEASE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(LEASE_SCRIPT));

/// How long the store's totals are reused for counts Redis may not hold.
const STORED_FOR: Duration = Duration::from_secs(1);

/// A limit the fleet shares.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Limit {
    /// A package's traffic cap, in one usage epoch.
    Cap { package: u64, epoch: i64 },
    /// An organisation's credits.
    Credits(String),
}

impl Limit {
    fn key(&self, prefix: &str) -> String {
        match self {
            Limit::Cap { package, epoch } => format!("{prefix}:cap:{package}:{epoch}"),
            Limit::Credits(org) => format!("{prefix}:credits:{org}"),
        }
    }
}

/// This gateway's leases of one limit.
#[derive(Debug)]
struct Lease {
    /// The counter when this gateway began leasing.
    origin: u64,
    /// What Redis granted (and what was used on a provisional lease, once
    /// counted).
    granted: u64,
    /// Granted without Redis, during an outage.
    provisional: Option<u64>,
    /// The fleet's remainder at the last answer (`None`: never asked).
    remaining: Option<i64>,
    /// The limit when last asked.
    limit: u64,
    /// The counter at the last look, and its rate per second, smoothed.
    last: u64,
    rate: f64,
    /// No asking before this (the fleet was out).
    quiet_until: Option<Instant>,
}

impl Lease {
    fn new(used: u64) -> Lease {
        Lease {
            origin: used,
            granted: 0,
            provisional: None,
            remaining: None,
            limit: 0,
            last: used,
            rate: 0.0,
            quiet_until: None,
        }
    }

    fn allowance(&self) -> u64 {
        self.origin + self.granted + self.provisional.unwrap_or(0)
    }
}

/// One limit as this tick sees it.
struct InUse<'a> {
    limit: Limit,
    used: u64,
    max: u64,
    /// A lease's size in the limit's unit.
    unit: u64,
    /// Where the fleet's count starts if Redis has none: the larger of the
    /// local counter and the store's total.
    start: u64,
    budget: &'a FleetBudget,
}

/// Keep the leases of every limit in use until told to stop.
pub(super) async fn serve(
    control: Arc<Control>,
    mut conn: ConnectionManager,
    prefix: String,
    lease_bytes: u64,
    view: Arc<FleetView>,
    mut stop: watch::Receiver<bool>,
) {
    let mut leases: HashMap<Limit, Lease> = HashMap::new();
    let mut stored: Option<(Instant, StoredUsage)> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let policy = control.engine().policy_arc();
        let capped: Vec<u64> = policy
            .packages
            .iter()
            .filter(|(_, p)| p.decl.traffic_limit_bytes > 0)
            .map(|(id, _)| *id)
            .collect();
        // The epochs are behind the control lock: asked only when a cap
        // is in force.
        let epochs = if capped.is_empty() {
            Vec::new()
        } else {
            let (c, ids) = (control.clone(), capped.clone());
            match tokio::task::spawn_blocking(move || c.usage_epochs(&ids)).await {
                Ok(e) => e,
                Err(_) => continue,
            }
        };
        let mut in_use = Vec::new();
        for (id, epoch) in capped.iter().zip(epochs) {
            let p = &policy.packages[id];
            in_use.push(InUse {
                limit: Limit::Cap {
                    package: *id,
                    epoch,
                },
                used: p.usage.totals().bytes(),
                max: p.decl.traffic_limit_bytes,
                unit: lease_bytes,
                start: 0,
                budget: &p.usage.cap_budget,
            });
        }
        // A credit lease is `lease_bytes` at the dearest price among the
        // organisation's packages.
        let mut price: HashMap<&str, u64> = HashMap::new();
        for p in policy.packages.values() {
            if let Some(org) = &p.org {
                let e = price.entry(org.decl.id.as_str()).or_default();
                *e = (*e).max(p.decl.price_per_gb);
            }
        }
        for (id, org) in &policy.orgs {
            let Some(&per_gb) = price.get(id.as_str()).filter(|p| **p > 0) else {
                continue;
            };
            in_use.push(InUse {
                limit: Limit::Credits(id.clone()),
                used: org.account.spent().max(0) as u64,
                max: org.account.granted().max(0) as u64,
                unit: (u128::from(lease_bytes) * u128::from(per_gb) / u128::from(GB)).max(1) as u64,
                start: 0,
                budget: &org.account.budget,
            });
        }
        // A count Redis may not hold (never leased here, or Redis was
        // away and may have lost it) starts from the store's total.
        let unsure = view.redis_up()
            && in_use.iter().any(|u| {
                leases.get(&u.limit).is_some_and(|l| {
                    (l.remaining.is_none() && u.used != l.origin) || l.provisional.is_some()
                })
            });
        if unsure
            && stored
                .as_ref()
                .is_none_or(|(at, _)| at.elapsed() > STORED_FOR)
        {
            let c = control.clone();
            if let Ok(Ok(s)) = tokio::task::spawn_blocking(move || c.stored_usage()).await {
                stored = Some((Instant::now(), s));
            }
        }
        let gateways = view.gateways().len().max(1) as u64;
        let mut seen = HashSet::with_capacity(in_use.len());
        for u in &mut in_use {
            seen.insert(u.limit.clone());
            if let Some((_, s)) = &stored {
                let total = match &u.limit {
                    Limit::Cap { package, .. } => s.packages.get(package).map(|t| t.bytes()),
                    Limit::Credits(org) => s.spent.get(org).map(|s| (*s).max(0) as u64),
                };
                u.start = u.used.max(total.unwrap_or(0));
            }
            let lease = leases
                .entry(u.limit.clone())
                .or_insert_with(|| Lease::new(u.used));
            look(lease, u, &mut conn, &prefix, &view, gateways).await;
        }
        leases.retain(|k, _| seen.contains(k));
    }
}

/// One limit, one look: take a lease when the leases run low.
async fn look(
    lease: &mut Lease,
    u: &InUse<'_>,
    conn: &mut ConnectionManager,
    prefix: &str,
    view: &FleetView,
    gateways: u64,
) {
    if u.used < lease.last {
        // The counter went back (a usage reset): start over.
        *lease = Lease::new(u.used);
    }
    // Smoothed over about a second, so that a burst filling the sockets'
    // buffers does not read as a second of traffic.
    let secs = TICK.as_secs_f64();
    lease.rate = 0.9 * lease.rate + 0.1 * (u.used - lease.last) as f64 / secs;
    lease.last = u.used;
    if lease.remaining.is_none() && u.used == lease.origin {
        // Never used here since this gateway began: no budget yet, the
        // local counter answers (the first use asks within a tick).
        return;
    }
    // A lease, or a second of traffic when that is more, but no more than
    // a quarter of the limit's even share, so that near the limit no
    // gateway holds much that others' clients could use.
    let fair = u.max / (4 * gateways);
    let need = u.unit.max((lease.rate as u64).min(fair));
    let headroom = lease.allowance().saturating_sub(u.used);
    let limit_moved = u.max != lease.limit;
    if headroom >= need / 2 && !limit_moved {
        return;
    }
    if !limit_moved && lease.quiet_until.is_some_and(|t| Instant::now() < t) {
        return;
    }
    if !view.redis_up() {
        provisional(lease, u, gateways);
        return;
    }
    // What was used beyond Redis's grants during an outage.
    let owed = if lease.provisional.is_some() {
        u.used.saturating_sub(lease.origin + lease.granted)
    } else {
        0
    };
    let want = need + u.used.saturating_sub(lease.allowance());
    let answer = LEASE
        .key(u.limit.key(prefix))
        .arg(u.max)
        .arg(u.start.max(u.used))
        .arg(want)
        .arg(owed)
        .invoke_async::<(u64, i64)>(conn)
        .await;
    match answer {
        Ok((grant, left)) => {
            lease.granted += owed + grant;
            lease.provisional = None;
            lease.remaining = Some(left);
            lease.limit = u.max;
            let out = left <= 0;
            lease.quiet_until = out.then(|| Instant::now() + EXHAUSTED_RETRY);
            u.budget.set(Some(lease.allowance()), out);
        }
        Err(e) => {
            view.set_redis_up(false, &e);
            provisional(lease, u, gateways);
        }
    }
}

/// Redis is away: one provisional lease of the last known remainder split
/// among the live gateways, and a hard stop at it.
fn provisional(lease: &mut Lease, u: &InUse<'_>, gateways: u64) {
    if lease.provisional.is_some() {
        return;
    }
    let left = lease
        .remaining
        .unwrap_or_else(|| i64::try_from(u.max.saturating_sub(u.used)).unwrap_or(i64::MAX))
        .max(0) as u64;
    let part = left / gateways;
    lease.provisional = Some(part);
    u.budget.set(Some(lease.allowance()), true);
    tracing::warn!(
        limit = ?u.limit,
        provisional = part,
        "fleet: Redis is away; this gateway holds one provisional lease of the limit, and stops there"
    );
}
