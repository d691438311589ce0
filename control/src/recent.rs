//! The recent-errors rings, per package and overall, for the admin API:
//! small bounded rings written only when a request fails (never on the
//! success path). The error codes themselves are in [`crate::catalog`].

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::catalog::{Code, Rejection};
use crate::policy::Protocol;

/// One answered error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorRecord {
    /// Wall-clock time, milliseconds since the Unix epoch (the caller's clock).
    pub unix_ms: u64,
    /// The package, when known.
    pub package: Option<u64>,
    /// The front end's protocol; `None` when the connection was closed
    /// before its first byte (the flood guard at accept).
    pub protocol: Option<Protocol>,
    /// The code.
    pub code: Code,
    /// The detail.
    pub detail: String,
}

/// A bounded ring of recent errors.
#[derive(Debug)]
pub struct RecentErrors {
    cap: usize,
    ring: Mutex<VecDeque<ErrorRecord>>,
    /// Errors recorded since the start (the ring keeps the last `cap`).
    pushed: AtomicU64,
}

impl RecentErrors {
    /// A ring keeping the last `cap` errors.
    pub fn new(cap: usize) -> Self {
        RecentErrors {
            cap,
            ring: Mutex::new(VecDeque::with_capacity(cap.min(1024))),
            pushed: AtomicU64::new(0),
        }
    }

    /// Record an error.
    pub fn push(
        &self,
        unix_ms: u64,
        package: Option<u64>,
        protocol: Option<Protocol>,
        rej: &Rejection,
    ) {
        let mut r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if r.len() == self.cap {
            r.pop_front();
        }
        r.push_back(ErrorRecord {
            unix_ms,
            package,
            protocol,
            code: rej.code,
            detail: rej.detail.clone(),
        });
        self.pushed.fetch_add(1, Ordering::Relaxed);
    }

    /// The errors recorded after the first `seen` (oldest first; those the
    /// ring no longer holds are gone), and how many were recorded in all.
    pub fn since(&self, seen: u64) -> (Vec<ErrorRecord>, u64) {
        let r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let pushed = self.pushed.load(Ordering::Relaxed);
        let new = (pushed.saturating_sub(seen) as usize).min(r.len());
        (r.iter().skip(r.len() - new).cloned().collect(), pushed)
    }

    /// The errors, newest first.
    pub fn recent(&self) -> Vec<ErrorRecord> {
        self.ring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .rev()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_within_its_bound() {
        let r = RecentErrors::new(3);
        for i in 0..5 {
            r.push(
                i,
                Some(7),
                Some(Protocol::Https),
                &Rejection::new(Code::NodeNotFound, format!("e{i}")),
            );
        }
        let v = r.recent();
        assert_eq!(
            v.iter().map(|e| e.detail.as_str()).collect::<Vec<_>>(),
            ["e4", "e3", "e2"]
        );
        let details = |v: Vec<ErrorRecord>| v.into_iter().map(|e| e.detail).collect::<Vec<_>>();
        let (new, seen) = r.since(3);
        assert_eq!((details(new), seen), (vec!["e3".into(), "e4".into()], 5));
        let (new, _) = r.since(0);
        assert_eq!(
            details(new),
            ["e2", "e3", "e4"],
            "what the ring dropped is gone"
        );
        assert!(r.since(5).0.is_empty());
    }
}
