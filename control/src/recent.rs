//! The recent-errors rings, per package and overall, for the admin API:
//! small bounded rings written only when a request fails (never on the
//! success path). The error codes themselves are in [`crate::catalog`].

use std::collections::VecDeque;
use std::sync::Mutex;

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
}

impl RecentErrors {
    /// A ring keeping the last `cap` errors.
    pub fn new(cap: usize) -> Self {
        RecentErrors {
            cap,
            ring: Mutex::new(VecDeque::with_capacity(cap.min(1024))),
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
    }
}
