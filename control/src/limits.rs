//! Per-package limits and accounting: RPS (GCRA on one atomic), concurrent
//! connections (a guard released on drop), the traffic cap, and organisation
//! credits charged at the package's price. Zero means unlimited. Credits are
//! integer micro-credits; a GB is 10^9 bytes. Safe for every worker at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};

use crate::Now;

/// Micro-credits per credit.
pub const MICRO: i64 = 1_000_000;
/// Bytes per GB.
pub const GB: u64 = 1_000_000_000;

/// Convert a credit amount given as a decimal (API, config) to micro-credits,
/// rounding to the nearest micro-credit.
pub fn credits_to_micro(credits: f64) -> Option<i64> {
    let m = (credits * MICRO as f64).round();
    (m.is_finite() && m.abs() < 9.0e18).then_some(m as i64)
}

/// Micro-credits as a decimal credit amount for display.
pub fn micro_to_credits(micro: i64) -> f64 {
    micro as f64 / MICRO as f64
}

/// In a fleet, a limit every gateway shares (a package's traffic cap, an
/// organisation's credits): how far this gateway's counter may go on the
/// leases it took from the fleet. Set by the fleet thread; without it the
/// whole limit holds against the local counter.
#[derive(Debug, Default)]
pub struct FleetBudget {
    /// What the local counter may reach, plus one (0: no budget).
    allowance: AtomicU64,
    /// Whether the fleet has nothing left to lease: the allowance is then
    /// a hard stop. Before that, a counter past its allowance goes on
    /// while the fleet thread takes the next lease.
    exhausted: AtomicBool,
}

impl FleetBudget {
    /// Set the allowance (`None`: no budget) and whether the fleet is out.
    pub fn set(&self, allowance: Option<u64>, exhausted: bool) {
        self.exhausted.store(exhausted, Ordering::Relaxed);
        self.allowance.store(
            allowance.map_or(0, |a| a.saturating_add(1)),
            Ordering::Relaxed,
        );
    }

    /// The allowance, if any, and whether the fleet is out.
    pub fn get(&self) -> Option<(u64, bool)> {
        match self.allowance.load(Ordering::Relaxed) {
            0 => None,
            a => Some((a - 1, self.exhausted.load(Ordering::Relaxed))),
        }
    }

    /// Whether a counter at `used` may go on under `limit`: below the
    /// limit without a budget; with one, below the allowance, or past it
    /// while the fleet still has some to lease.
    pub fn allows(&self, used: u64, limit: u64) -> bool {
        match self.get() {
            None => used < limit,
            Some((allowance, exhausted)) => used < allowance || !exhausted,
        }
    }
}

/// An organisation's account: what was granted, what was spent.
#[derive(Debug, Default)]
pub struct OrgAccount {
    granted: AtomicI64,
    spent: AtomicI64,
    /// In a fleet, the part of the credits this gateway may spend.
    pub budget: FleetBudget,
}

impl OrgAccount {
    /// An account with an opening grant.
    pub fn new(granted_micro: i64) -> Self {
        OrgAccount {
            granted: AtomicI64::new(granted_micro),
            spent: AtomicI64::new(0),
            budget: FleetBudget::default(),
        }
    }

    /// Whether there are credits to spend: a positive balance, or in a
    /// fleet what [`FleetBudget::allows`].
    pub fn has_credits(&self) -> bool {
        let spent = self.spent().max(0) as u64;
        self.budget.allows(spent, self.granted().max(0) as u64)
    }

    /// Balance in micro-credits.
    pub fn balance(&self) -> i64 {
        self.granted.load(Ordering::Relaxed) - self.spent.load(Ordering::Relaxed)
    }

    /// Add credits (a grant or a top-up).
    pub fn grant(&self, micro: i64) {
        self.granted.fetch_add(micro, Ordering::Relaxed);
    }

    /// Total granted.
    pub fn granted(&self) -> i64 {
        self.granted.load(Ordering::Relaxed)
    }

    /// Total spent.
    pub fn spent(&self) -> i64 {
        self.spent.load(Ordering::Relaxed)
    }

    /// Restore totals (from the store at start-up).
    pub fn restore(&self, granted: i64, spent: i64) {
        self.granted.store(granted, Ordering::Relaxed);
        self.spent.store(spent, Ordering::Relaxed);
    }
}

/// Cumulative usage of one package, shared by every worker.
#[derive(Debug, Default)]
pub struct PackageUsage {
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    requests: AtomicU64,
    /// Micro-credits charged so far.
    charged: AtomicU64,
    /// Bytes × price not yet billed (below one micro-credit, scaled by 10^9).
    remainder: AtomicU64,
    /// Open client connections.
    connections: AtomicU32,
    /// In a fleet, this gateway's share of `max_connections`, plus one
    /// (0: no share, the whole limit holds here).
    fleet_share: AtomicU32,
    /// In a fleet, this gateway's share of `rps_limit` in thousandths of a
    /// request per second, plus one (0: no share).
    rps_share_milli: AtomicU64,
    /// Requests checked against `rps_limit` so far (the demand a fleet
    /// shares the limit by).
    rps_attempts: AtomicU64,
    /// GCRA theoretical arrival time, ns.
    tat: AtomicU64,
    /// In a fleet, the part of the traffic cap this gateway may relay.
    pub cap_budget: FleetBudget,
}

/// A snapshot of a package's cumulative usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsageTotals {
    /// Client → target bytes.
    pub bytes_up: u64,
    /// Target → client bytes.
    pub bytes_down: u64,
    /// Requests that passed every check and went to a node.
    pub requests: u64,
    /// Micro-credits charged.
    pub charged: u64,
}

impl UsageTotals {
    /// Both directions.
    pub fn bytes(&self) -> u64 {
        self.bytes_up + self.bytes_down
    }
}

/// Holds one of a package's concurrent connections; released on drop.
#[derive(Debug)]
pub struct ConnGuard {
    usage: Arc<PackageUsage>,
}

impl ConnGuard {
    /// Whether this guard counts against `usage`.
    pub fn is_for(&self, usage: &Arc<PackageUsage>) -> bool {
        Arc::ptr_eq(&self.usage, usage)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.usage.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PackageUsage {
    /// Totals now.
    pub fn totals(&self) -> UsageTotals {
        UsageTotals {
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            charged: self.charged.load(Ordering::Relaxed),
        }
    }

    /// Restore totals (from the store at start-up).
    pub fn restore(&self, t: UsageTotals) {
        self.bytes_up.store(t.bytes_up, Ordering::Relaxed);
        self.bytes_down.store(t.bytes_down, Ordering::Relaxed);
        self.requests.store(t.requests, Ordering::Relaxed);
        self.charged.store(t.charged, Ordering::Relaxed);
    }

    /// Open client connections.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }

    /// In a fleet: how many of `max_connections` this gateway may hold now
    /// (set by the fleet thread as demand moves); `None` lifts it.
    pub fn set_fleet_share(&self, share: Option<u32>) {
        let v = share.map_or(0, |s| s.saturating_add(1));
        self.fleet_share.store(v, Ordering::Relaxed);
    }

    /// This gateway's share of `max_connections`, when in a fleet.
    pub fn fleet_share(&self) -> Option<u32> {
        self.fleet_share.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Take a connection slot, unless `max` (0 = unlimited) are open, or
    /// this gateway's fleet share of it.
    pub fn try_connect(self: &Arc<Self>, max: u32) -> Option<ConnGuard> {
        let limit = match (max, self.fleet_share()) {
            (0, _) => None,
            (max, Some(share)) => Some(share.min(max)),
            (max, None) => Some(max),
        };
        let prev = self.connections.fetch_add(1, Ordering::Relaxed);
        let guard = ConnGuard {
            usage: self.clone(),
        };
        if limit.is_some_and(|l| prev >= l) {
            return None; // the guard's drop gives the slot back
        }
        Some(guard)
    }

    /// In a fleet: this gateway's share of `rps_limit`, in thousandths of
    /// a request per second; `None` lifts it.
    pub fn set_rps_share_milli(&self, share: Option<u64>) {
        let v = share.map_or(0, |s| s.saturating_add(1));
        self.rps_share_milli.store(v, Ordering::Relaxed);
    }

    /// This gateway's share of `rps_limit` (thousandths per second).
    pub fn rps_share_milli(&self) -> Option<u64> {
        self.rps_share_milli.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Requests checked against `rps_limit` so far.
    pub fn rps_attempts(&self) -> u64 {
        self.rps_attempts.load(Ordering::Relaxed)
    }

    /// One request against `rps` (0 = unlimited), or this gateway's fleet
    /// share of it: GCRA with a one-second burst.
    pub fn try_request(&self, rps: u32, now: Now) -> bool {
        if rps == 0 {
            return true;
        }
        self.rps_attempts.fetch_add(1, Ordering::Relaxed);
        let milli = match self.rps_share_milli() {
            Some(share) => share.min(u64::from(rps) * 1000),
            None => u64::from(rps) * 1000,
        };
        if milli == 0 {
            return false;
        }
        // One request every `interval`; a burst of one second's worth.
        let interval = 1_000_000_000_000 / milli;
        let tolerance = 1_000_000_000u64.saturating_sub(interval);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let start = tat.max(now.0);
            if start - now.0 > tolerance {
                return false;
            }
            match self.tat.compare_exchange_weak(
                tat,
                start + interval,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(t) => tat = t,
            }
        }
    }

    /// Count a request that went to a node.
    pub fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the traffic cap (0 = unlimited) is reached.
    pub fn over_cap(&self, cap: u64) -> bool {
        cap != 0
            && !self.cap_budget.allows(
                self.bytes_up.load(Ordering::Relaxed) + self.bytes_down.load(Ordering::Relaxed),
                cap,
            )
    }

    /// Charge relayed bytes to the package and its organisation at
    /// `price_per_gb` micro-credits. Each charge carries the fraction of a
    /// micro-credit it could not bill to the next one, so no fraction is ever
    /// lost, and a price change applies to the bytes that follow it only.
    pub fn add_traffic(&self, up: u64, down: u64, price_per_gb: u64, org: Option<&OrgAccount>) {
        if up == 0 && down == 0 {
            return;
        }
        self.bytes_up.fetch_add(up, Ordering::Relaxed);
        self.bytes_down.fetch_add(down, Ordering::Relaxed);
        let Some(org) = org.filter(|_| price_per_gb != 0) else {
            return;
        };
        let owed_scaled = u128::from(up + down) * u128::from(price_per_gb);
        let mut rem = self.remainder.load(Ordering::Relaxed);
        loop {
            let total = owed_scaled + u128::from(rem);
            let bill = (total / u128::from(GB)) as u64;
            let left = (total % u128::from(GB)) as u64;
            match self.remainder.compare_exchange_weak(
                rem,
                left,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    if bill != 0 {
                        self.charged.fetch_add(bill, Ordering::Relaxed);
                        org.spent.fetch_add(bill as i64, Ordering::Relaxed);
                    }
                    return;
                }
                Err(r) => rem = r,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_budget_stops_at_its_allowance_only_once_the_fleet_is_out() {
        let u = PackageUsage::default();
        u.add_traffic(500, 500, 0, None);
        assert!(u.over_cap(1000), "no budget: the whole cap holds here");
        u.cap_budget.set(Some(2000), false);
        assert!(!u.over_cap(1000), "a lease reaches past the local view");
        u.cap_budget.set(Some(800), false);
        assert!(!u.over_cap(1000), "past the allowance, the fleet has more");
        u.cap_budget.set(Some(800), true);
        assert!(u.over_cap(1000), "the fleet is out: a hard stop");
        u.cap_budget.set(Some(1001), true);
        assert!(!u.over_cap(1000));
        let org = OrgAccount::new(10);
        assert!(org.has_credits());
        org.budget.set(Some(0), true);
        assert!(!org.has_credits());
        org.budget.set(None, false);
        assert!(org.has_credits());
    }

    #[test]
    fn gcra_allows_a_second_of_burst_then_the_rate() {
        let u = PackageUsage::default();
        let t0 = Now::from_secs(100);
        let allowed = (0..20).filter(|_| u.try_request(10, t0)).count();
        assert_eq!(allowed, 10, "burst of one second");
        assert!(
            !u.try_request(10, Now(t0.0 + 50_000_000)),
            "50 ms later: still none"
        );
        assert!(
            u.try_request(10, Now(t0.0 + 100_000_000)),
            "100 ms later: one"
        );
        assert!(!u.try_request(10, Now(t0.0 + 100_000_000)));
        let later = Now::from_secs(200);
        assert_eq!(
            (0..20).filter(|_| u.try_request(10, later)).count(),
            10,
            "idle refills the burst"
        );
        assert!((0..1000).all(|_| u.try_request(0, later)), "0 is unlimited");
    }

    #[test]
    fn connection_guard_releases_on_drop() {
        let u = Arc::new(PackageUsage::default());
        let a = u.try_connect(2).unwrap();
        let b = u.try_connect(2).unwrap();
        assert!(u.try_connect(2).is_none());
        assert_eq!(u.connections(), 2, "a refused attempt leaves no slot taken");
        drop(a);
        let c = u.try_connect(2).unwrap();
        assert!(c.is_for(&u));
        drop((b, c));
        assert_eq!(u.connections(), 0);
        let many: Vec<_> = (0..100).map(|_| u.try_connect(0).unwrap()).collect();
        drop(many);
        // A fleet share narrows the limit, never widens it; 0 admits none.
        u.set_fleet_share(Some(1));
        let one = u.try_connect(2).unwrap();
        assert!(u.try_connect(2).is_none(), "the share is 1");
        u.set_fleet_share(Some(5));
        let two = u.try_connect(2).unwrap();
        assert!(u.try_connect(2).is_none(), "the package's own limit is 2");
        drop((one, two));
        u.set_fleet_share(Some(0));
        assert!(u.try_connect(2).is_none(), "a share of 0 admits none");
        assert!(
            u.try_connect(0).is_some(),
            "an unlimited package has no share"
        );
        u.set_fleet_share(None);
        assert!(u.try_connect(2).is_some());
        let many: Vec<_> = (0..100).map(|_| u.try_connect(0).unwrap()).collect();
        assert_eq!(u.connections(), 100);
        drop(many);
    }

    #[test]
    fn traffic_cap_and_credits_are_exact() {
        let org = OrgAccount::new(credits_to_micro(10.0).unwrap());
        let u = PackageUsage::default();
        // 1 credit per GB: 1 micro-credit per 1000 bytes.
        for _ in 0..1000 {
            u.add_traffic(300, 400, 1_000_000, Some(&org)); // 700 bytes a time
        }
        assert_eq!(u.totals().bytes(), 700_000);
        assert_eq!(
            u.totals().charged,
            700,
            "no fraction lost across 1000 small charges"
        );
        assert_eq!(org.balance(), 10_000_000 - 700);
        assert!(!u.over_cap(0));
        assert!(!u.over_cap(700_001));
        assert!(u.over_cap(700_000));
        // A price change applies to the bytes after it, not to past ones.
        let repriced = PackageUsage::default();
        let org2 = OrgAccount::new(0);
        repriced.add_traffic(GB, 0, 1_000_000, Some(&org2));
        repriced.add_traffic(GB, 0, 3_000_000, Some(&org2));
        assert_eq!(org2.spent(), 4_000_000);
        assert_eq!(repriced.totals().charged, 4_000_000);
        // Free traffic charges nothing.
        let free = PackageUsage::default();
        free.add_traffic(GB, GB, 0, Some(&org));
        assert_eq!(org.balance(), 10_000_000 - 700);
        assert_eq!(credits_to_micro(0.000_001), Some(1));
        assert_eq!(micro_to_credits(2_500_000), 2.5);
    }

    #[test]
    fn concurrent_charges_add_up() {
        let org = Arc::new(OrgAccount::new(0));
        let u = Arc::new(PackageUsage::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (org, u) = (org.clone(), u.clone());
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        u.add_traffic(1000, 0, 2_000_000, Some(&org));
                        u.count_request();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(u.totals().bytes_up, 40_000_000);
        assert_eq!(u.totals().requests, 40_000);
        assert_eq!(u.totals().charged, 80_000);
        assert_eq!(org.spent(), 80_000);
    }
}
