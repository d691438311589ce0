//! A handle on one submitted ring request, and the readiness (`POLL_ADD`) op.
//!
//! Dropping an [`Op`] before its final CQE cancels it (`ASYNC_CANCEL`) and
//! leaves the slot to the driver until the kernel reports the end.

use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::task::{Context as TaskContext, Poll};

use crate::driver::Completion;
use crate::runtime::{Context, with_current};
use crate::sys::{Ring, SqFull};

/// An in-flight request owned by a future (or a listener). `!Send`.
#[derive(Debug)]
pub(crate) struct Op {
    cx: Rc<Context>,
    idx: usize,
}

impl Op {
    fn submit(
        yields_fds: bool,
        urgent: bool,
        push: impl FnMut(&mut Ring, u64) -> Result<(), SqFull>,
    ) -> io::Result<Op> {
        with_current(|cx| {
            let idx = cx.driver.borrow_mut().submit_op(yields_fds, urgent, push)?;
            Ok(Op {
                cx: cx.clone(),
                idx,
            })
        })
    }

    /// One-shot `POLL_ADD` for `events` (`libc::POLLIN`, `POLLOUT`, ...).
    /// An `urgent` one's completion stops waits from gathering for a while
    /// (every poll but a datagram socket's read readiness).
    pub(crate) fn poll_add(fd: RawFd, events: u32, urgent: bool) -> io::Result<Op> {
        Op::submit(false, urgent, |ring, ud| {
            ring.push_poll(fd, events, false, ud)
        })
    }

    /// Multishot accept; completions carry the accepted descriptor.
    pub(crate) fn accept_multi(fd: RawFd) -> io::Result<Op> {
        Op::submit(true, true, |ring, ud| ring.push_accept_multi(fd, ud))
    }

    /// The next completion; `Ready(None)` once the op ended and all were taken.
    pub(crate) fn poll_next(&mut self, cx: &mut TaskContext<'_>) -> Poll<Option<Completion>> {
        self.cx.driver.borrow_mut().poll_op(self.idx, cx.waker())
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        self.cx.driver.borrow_mut().release_op(self.idx);
    }
}

/// Waits until `fd` is ready for `events`; returns the revents mask.
/// Cancel-safe: dropping the future cancels the poll.
pub(crate) async fn ready(fd: RawFd, events: u32) -> io::Result<u32> {
    ready_as(fd, events, true).await
}

/// [`ready`] for a socket whose traffic may be gathered (datagrams; see
/// [`crate::gather_next_wait`]).
pub(crate) async fn ready_gatherable(fd: RawFd, events: u32) -> io::Result<u32> {
    ready_as(fd, events, false).await
}

async fn ready_as(fd: RawFd, events: u32, urgent: bool) -> io::Result<u32> {
    let mut op = Op::poll_add(fd, events, urgent)?;
    let completion = std::future::poll_fn(|cx| op.poll_next(cx)).await;
    match completion {
        Some(c) => c.into_result(),
        None => Err(io::Error::other("poll op ended without a completion")),
    }
}
