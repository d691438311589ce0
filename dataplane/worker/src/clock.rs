//! The worker's clock: monotonic time for the control plane's sans-IO
//! functions, wall time for error records.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use splicegate_control::Now;

static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Monotonic time since the process's first reading.
pub fn now() -> Now {
    let origin = *ORIGIN.get_or_init(Instant::now);
    Now(origin.elapsed().as_nanos() as u64 + 1_000_000_000)
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
