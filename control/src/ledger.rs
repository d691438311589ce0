//! Usage accounting for the ledger: the difference between two readings of
//! the cumulative counters, which is what the store appends once a second.
//! Appending differences of cumulative readings means a reading is never
//! counted twice, and a crash loses at most what came after the last append.

use crate::limits::UsageTotals;

/// One package's usage since the previous reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsageDelta {
    /// The package.
    pub package: u64,
    /// Client → target bytes.
    pub bytes_up: u64,
    /// Target → client bytes.
    pub bytes_down: u64,
    /// Requests.
    pub requests: u64,
    /// Micro-credits charged.
    pub charged: u64,
}

impl UsageDelta {
    /// Whether nothing happened.
    pub fn is_zero(&self) -> bool {
        self.bytes_up == 0 && self.bytes_down == 0 && self.requests == 0 && self.charged == 0
    }
}

/// Keeps the last reading per package and turns new readings into deltas.
#[derive(Debug, Default)]
pub struct Ledger {
    last: std::collections::HashMap<u64, UsageTotals>,
}

impl Ledger {
    /// A ledger whose last readings are `restored` (what the store already holds).
    pub fn new(restored: impl IntoIterator<Item = (u64, UsageTotals)>) -> Self {
        Ledger {
            last: restored.into_iter().collect(),
        }
    }

    /// Sets the last reading of `package` (what the store holds for it, or
    /// zero after a usage reset).
    pub fn set(&mut self, package: u64, reading: UsageTotals) {
        self.last.insert(package, reading);
    }

    /// Every package's last reading: what was handed out to be written.
    pub fn readings(&self) -> &std::collections::HashMap<u64, UsageTotals> {
        &self.last
    }

    /// The deltas since the last call, for the packages read now; zero deltas
    /// are left out. A counter that went backwards (usage reset by the
    /// operator) starts over from its new value.
    pub fn deltas(&mut self, now: impl IntoIterator<Item = (u64, UsageTotals)>) -> Vec<UsageDelta> {
        let mut out = Vec::new();
        for (package, cur) in now {
            let prev = self.last.insert(package, cur).unwrap_or_default();
            let d = |c: u64, p: u64| c.checked_sub(p).unwrap_or(c);
            let delta = UsageDelta {
                package,
                bytes_up: d(cur.bytes_up, prev.bytes_up),
                bytes_down: d(cur.bytes_down, prev.bytes_down),
                requests: d(cur.requests, prev.requests),
                charged: d(cur.charged, prev.charged),
            };
            if !delta.is_zero() {
                out.push(delta);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(up: u64, down: u64, req: u64, ch: u64) -> UsageTotals {
        UsageTotals {
            bytes_up: up,
            bytes_down: down,
            requests: req,
            charged: ch,
        }
    }

    #[test]
    fn deltas_sum_to_the_totals() {
        let mut l = Ledger::default();
        let readings = [
            t(10, 20, 1, 0),
            t(10, 20, 1, 0),
            t(110, 220, 3, 5),
            t(1000, 2000, 9, 7),
        ];
        let mut sum = UsageDelta::default();
        let mut rows = 0;
        for r in readings {
            for d in l.deltas([(7, r)]) {
                rows += 1;
                sum.bytes_up += d.bytes_up;
                sum.bytes_down += d.bytes_down;
                sum.requests += d.requests;
                sum.charged += d.charged;
            }
        }
        assert_eq!(rows, 3, "an unchanged reading writes nothing");
        assert_eq!(
            (sum.bytes_up, sum.bytes_down, sum.requests, sum.charged),
            (1000, 2000, 9, 7)
        );
    }

    #[test]
    fn restored_readings_are_not_counted_again_and_resets_start_over() {
        let mut l = Ledger::new([(7, t(500, 500, 5, 1))]);
        assert!(l.deltas([(7, t(500, 500, 5, 1))]).is_empty());
        assert_eq!(l.deltas([(7, t(600, 500, 5, 1))])[0].bytes_up, 100);
        assert_eq!(l.deltas([(7, t(50, 0, 0, 0))])[0].bytes_up, 50, "reset");
    }
}
