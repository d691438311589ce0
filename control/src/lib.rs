//! splicegate's policy brain: what a request may do, which exit serves it, and
//! why not.
//!
//! Sans-IO: no sockets, no clock reads, no files. Time is an argument
//! ([`Now`]); the data plane asks, this crate answers. Everything here is safe
//! to share between worker threads: the policy is an immutable snapshot, and
//! what changes per request (sessions, limits, node load) uses sharded locks
//! or atomics, never one global lock.
#![forbid(unsafe_code)]

/// Names for an enum's values in files, the API and rules: `ALL` (in
/// declaration order), `as_str` and `parse`, from one list. Display,
/// `FromStr` and serde come from [`decl`].
macro_rules! names {
    ($t:ident { $($v:ident => $s:literal),+ $(,)? }) => {
        impl $t {
            /// Every value, in declaration order.
            pub const ALL: [$t; [$($s),+].len()] = [$($t::$v),+];

            /// The value's name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($t::$v => $s,)+
                }
            }

            /// The value of a name.
            pub fn parse(s: &str) -> Option<$t> {
                match s {
                    $($s => Some($t::$v),)+
                    _ => None,
                }
            }
        }
    };
}

pub mod catalog;
pub mod decl;
pub mod engine;
pub mod geo;
pub mod guard;
pub mod ledger;
pub mod limits;
pub mod nodes;
pub mod policy;
pub mod recent;
pub mod rules;
pub mod safety;
pub mod session;
pub mod stats;

pub use catalog::{Code, Rejection};

/// Monotonic time in nanoseconds since an arbitrary origin, read by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Now(pub u64);

impl Now {
    /// From whole seconds.
    pub const fn from_secs(s: u64) -> Now {
        Now(s * 1_000_000_000)
    }
    /// From milliseconds.
    pub const fn from_millis(ms: u64) -> Now {
        Now(ms * 1_000_000)
    }
    /// Whole seconds.
    pub const fn secs(self) -> u64 {
        self.0 / 1_000_000_000
    }
    /// Milliseconds.
    pub const fn millis(self) -> u64 {
        self.0 / 1_000_000
    }
}
