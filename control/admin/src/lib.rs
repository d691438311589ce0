//! splicegate's operations side, run on the control thread: the admin API
//! (axum on a current-thread tokio runtime), the durable store and its usage
//! ledger (SQLite), node health checks, and Prometheus metrics.
//!
//! [`Control`] is the only writer of the policy: it merges the config file's
//! objects with those created through the API, publishes a new snapshot on
//! every change, and flushes the packages' cumulative counters into the store
//! once a second. [`AdminServer`] runs the API, the flush and the health
//! checks on one thread and never starts another (no blocking pool, no
//! resolver): the process keeps to its workers plus main, admin and the two
//! resolver threads.
//!
//! Invariants: workers never touch the store; balances and usage are derived
//! from the ledger and never edited in place; objects declared in the config
//! file are never changed through the API (409).
//!
//! With `[fleet]`, [`fleet::Fleet`] adds one thread of its own ("fleet"):
//! the registry of live gateways and the change channel on Redis, and the
//! reads of the shared store that keep this gateway's policy in line.
#![forbid(unsafe_code)]

pub mod api;
pub mod control;
pub mod error;
pub mod fleet;
pub mod health;
pub mod metrics;
pub mod server;
pub mod store;
mod time;

pub use control::{
    Announcer, Change, Clock, Control, ControlOptions, FileObject, Flushed, Reloaded,
};
pub use error::{ControlError, EnrolError, StoreError};
pub use fleet::{Fleet, FleetError, FleetOptions, FleetView, GatewayInfo};
pub use health::HealthOptions;
pub use metrics::ProcessCounter;
pub use server::{AdminHandle, AdminOptions, AdminServer, VerdictFn};
pub use store::{PgStore, SqliteStore, Store, StoreLocation};
