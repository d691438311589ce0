//! splicegate's per-core io_uring runtime: executor, socket ops, splice relay.
//!
//! **Responsibility.** Everything a data-plane worker needs to move bytes on
//! one core: a single-threaded executor driving one io_uring ([`Runtime`],
//! [`spawn`]), TCP sockets ([`TcpListener`] with multishot accept,
//! [`TcpStream`]), userspace timers ([`sleep`], [`timeout`]), the
//! splice-based [`relay`] with its [`PipePool`], and cross-thread wake-ups
//! ([`Notifier`], [`channel`]).
//!
//! **Invariants.**
//! - Thread-per-core: a [`Runtime`], its tasks and its I/O objects never leave
//!   the thread that made them (`!Send`); only wakers, [`Notifier`] and
//!   [`Sender`] cross threads, through a mutex-guarded queue plus the
//!   runtime's eventfd.
//! - The ring runs the kernel's task work only when its thread enters it
//!   ([`RingSetup`]: `DEFER_TASKRUN` where the kernel has it, lesser tiers
//!   below); a turn enters whenever the ring's `TASKRUN` flag says
//!   completions wait.
//! - The kernel never holds a pointer into user memory: the only ring ops are
//!   `POLL_ADD`, multishot `ACCEPT` without an address, and `ASYNC_CANCEL`.
//!   Data moves through synchronous non-blocking syscalls (`recv`, `send`,
//!   `recvmmsg`/`sendmmsg` for UDP batches, `splice`) on borrowed buffers.
//!   Every future is therefore cancel-safe.
//! - An op's slot (its `user_data`) is kept until the kernel posts the op's
//!   final CQE, even when its future was dropped (the drop submits a cancel,
//!   or queues it for the next turn when the submission queue is full);
//!   descriptors accepted for a dropped op are closed.
//! - No op runs in io-wq: splice is never submitted to the ring, so idle
//!   tunnels cost no kernel threads.
//! - Cooperative: one poll of a task may complete at most 128 ready
//!   operations (reads, writes, accepts, channel messages, relay transfers);
//!   then its I/O futures return `Pending` once and the task runs again after
//!   the next look at the ring, so a task whose sockets stay ready cannot
//!   starve the other tasks, timers and accepts of its worker.
//! - Bounded pipes: at most [`PipeLimit::max`] pipes hold bytes at once per
//!   process (bytes in pipes escape TCP memory accounting); past it, or
//!   when `pipe2` fails, a relay copies through a 16 KiB buffer instead. A
//!   tunnel never ends for want of a pipe.
//! - A failed ring is fatal and loud: [`Runtime::block_on`] returns the
//!   `io_uring_enter` error (never panics on it), and the caller must stop
//!   the worker and exit (or rebuild it), never serve on without it.
//! - Every raw syscall and SQE push goes through the `sys` module, which
//!   holds all `unsafe` blocks but the one that adopts the descriptor an
//!   accept CQE returns (in the driver) and the `recycle` module's, which
//!   keep a finished task's future memory for the next task of its layout.
#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod coop;
mod driver;
mod net;
mod notify;
mod op;
mod recycle;
mod relay;
mod runtime;
mod signals;
mod slab;
mod sys;
mod time;

#[cfg(test)]
mod tests;

pub use net::{TcpListener, TcpStream, UdpSocket, UnixDatagram};
pub use notify::{Notifier, Receiver, SendError, Sender, channel};
pub use relay::{
    DEFAULT_MAX_PIPES, DEFAULT_PIPE_SIZE, Direction, PipeLimit, PipePool, PipeStats, RelayCtl,
    RelayEnd, RelayOutcome, Side, copy_relay, relay,
};
pub use runtime::{
    RingSetup, Runtime, RuntimeConfig, RuntimeStats, runtime_stats, spawn, yield_now,
};
pub use signals::SignalSet;

/// Waits until the current task may complete one more ready operation and
/// spends it (the executor gives each poll of a task a budget, as tokio's
/// coop does). A byte path built outside this crate (a TLS relay) calls it
/// once per transfer so that it cannot starve its worker.
pub async fn consume_budget() {
    coop::proceed().await;
}
pub use time::{Elapsed, Sleep, sleep, sleep_until, timeout, timeout_at};

/// Asks the worker's next blocking wait for completions to gather them
/// for `d` before waking, rather than waking at the first (the ring's form
/// of a NIC's interrupt coalescing; `IORING_FEAT_MIN_TIMEOUT`, Linux 6.12).
/// Once anything has completed, the wait lasts `d` (it would end earlier
/// only if every op in flight completed), and never later than the
/// nearest timer; with nothing completed it goes on until the first
/// completion, as any wait. A task that has just found several
/// completions' worth of work waiting (a run of datagrams) calls it after
/// each such turn: its next run then costs one wake, and goes out as one
/// batch. The request is refused within 2 ms of an urgent completion
/// (every op but waiting for a datagram to read: a TCP connection's bytes,
/// an accept) and while an urgent op is queued, so a worker's TCP traffic
/// does not wait behind it, except a connection's first completion after
/// a quiet spell (up to `d`, once); wakes from other threads may wait up
/// to `d` during a gathered wait. Whether this kernel can (if not, the
/// request is ignored).
///
/// # Panics
/// Outside [`Runtime::block_on`].
pub fn gather_next_wait(d: std::time::Duration) -> bool {
    runtime::with_current(|cx| cx.driver.borrow_mut().gather(d))
}

/// `CLOCK_MONOTONIC` now, in microseconds (what systemd's notify protocol
/// and journal timestamps use).
pub fn monotonic_usec() -> u64 {
    sys::monotonic_usec()
}

/// Pins the calling thread to CPU `cpu` (`sched_setaffinity`), for
/// one-worker-per-core deployments.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    sys::pin_current_thread(cpu)
}
