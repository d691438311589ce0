//! Process signals for the binary's control thread: block a set in the
//! calling thread (threads spawned afterwards inherit the mask, so no worker
//! is ever interrupted) and wait for one with a timeout (`sigtimedwait`).

use std::io;
use std::time::Duration;

/// A blocked set of signals that the owning thread waits for.
#[derive(Debug)]
pub struct SignalSet {
    set: libc::sigset_t,
}

impl SignalSet {
    /// Block `signals` in the calling thread and return the set to wait on.
    /// Call it before spawning other threads.
    pub fn block(signals: &[i32]) -> io::Result<SignalSet> {
        crate::sys::block_signals(signals).map(|set| SignalSet { set })
    }

    /// Wait up to `timeout` for one of the set; `None` when none came.
    pub fn wait(&self, timeout: Duration) -> io::Result<Option<i32>> {
        crate::sys::wait_signal(&self.set, timeout)
    }
}
