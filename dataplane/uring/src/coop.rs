//! Cooperative scheduling: an operation budget per task poll.
//!
//! An I/O future that completes without waiting (a `recv` that found bytes,
//! a `send` that found room, a queued accept or message) never returns
//! `Pending`, so a task whose sockets stay ready would otherwise run forever
//! and starve every other task, timer and accept of its worker. The
//! executor gives each poll of a task [`TASK_BUDGET`] operations; the I/O
//! futures spend one each, and once it is spent they return `Pending` once
//! and ask to be polled again after the next ring turn ([`defer`]), as
//! tokio's coop budget does.

use std::cell::Cell;
use std::task::{Context, Poll, Waker};

/// Ready operations one poll of a task may complete (tokio uses 128).
pub(crate) const TASK_BUDGET: u32 = 128;

thread_local! {
    /// What is left of the budget of the task being polled; `None` outside
    /// a poll by this crate's executor (unconstrained).
    static BUDGET: Cell<Option<u32>> = const { Cell::new(None) };
}

/// Runs `f` (one poll of a task) with a fresh budget.
pub(crate) fn budgeted<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(Option<u32>);
    impl Drop for Reset {
        fn drop(&mut self) {
            BUDGET.with(|b| b.set(self.0));
        }
    }
    let _reset = Reset(BUDGET.with(|b| b.replace(Some(TASK_BUDGET))));
    f()
}

/// Whether the current task may still complete an operation.
pub(crate) fn has_budget() -> bool {
    BUDGET.with(|b| b.get().is_none_or(|left| left > 0))
}

/// Spends one operation of the current task's budget.
pub(crate) fn spend() {
    BUDGET.with(|b| {
        if let Some(left) = b.get() {
            b.set(Some(left.saturating_sub(1)));
        }
    });
}

/// `Ready` and one operation spent, or `Pending` (and a deferred wake)
/// when the budget is spent.
pub(crate) fn poll_proceed(cx: &mut Context<'_>) -> Poll<()> {
    if has_budget() {
        spend();
        Poll::Ready(())
    } else {
        defer(cx.waker());
        Poll::Pending
    }
}

/// Waits until the task may complete one more operation, and spends it.
pub(crate) async fn proceed() {
    std::future::poll_fn(poll_proceed).await;
}

/// Wakes `waker` after the next ring turn rather than now, so a task that
/// yields lets I/O completions and timers be seen before it runs again.
pub(crate) fn defer(waker: &Waker) {
    crate::runtime::defer_wake(waker);
}
