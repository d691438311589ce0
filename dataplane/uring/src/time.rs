//! Timers: [`sleep`], [`sleep_until`], [`timeout`].
//!
//! Timers live in a userspace heap in the driver; only the nearest deadline
//! is handed to the kernel, as the timeout of the wait. A timer costs no
//! ring op, so thousands of idle-connection timers cost a heap entry each.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use crate::driver::TimerKey;
use crate::runtime::{Context, with_current};

/// A timer that completes at its deadline. Created by [`sleep`] or [`sleep_until`].
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub struct Sleep {
    deadline: Instant,
    /// Registered with the driver on the first poll that had to wait.
    registration: Option<(Rc<Context>, TimerKey)>,
}

/// Completes after `duration`.
pub fn sleep(duration: Duration) -> Sleep {
    sleep_until(Instant::now() + duration)
}

/// Completes at `deadline` (immediately if it has passed).
pub fn sleep_until(deadline: Instant) -> Sleep {
    Sleep {
        deadline,
        registration: None,
    }
}

impl Sleep {
    /// The instant this timer completes at.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Moves the deadline; the timer becomes pending again if it had fired.
    pub fn reset(&mut self, deadline: Instant) {
        self.unregister();
        self.deadline = deadline;
    }

    fn unregister(&mut self) {
        if let Some((cx, key)) = self.registration.take() {
            cx.driver.borrow_mut().remove_timer(key);
        }
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, task: &mut TaskContext<'_>) -> Poll<()> {
        let this = self.get_mut();
        match &this.registration {
            Some((cx, key)) => {
                let fired = cx.driver.borrow_mut().poll_timer(*key, task.waker());
                if fired != Some(false) {
                    this.unregister();
                    return Poll::Ready(());
                }
                Poll::Pending
            }
            None => {
                if Instant::now() >= this.deadline {
                    return Poll::Ready(());
                }
                let deadline = this.deadline;
                this.registration = Some(with_current(|cx| {
                    let key = cx
                        .driver
                        .borrow_mut()
                        .insert_timer(deadline, task.waker().clone());
                    (cx.clone(), key)
                }));
                Poll::Pending
            }
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        self.unregister();
    }
}

/// The deadline of a [`timeout`] passed before its future completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("deadline elapsed")]
pub struct Elapsed(pub(crate) ());

/// Runs `future` with a time limit; the future is dropped (cancelled) when
/// the limit passes first.
pub async fn timeout<F: Future>(duration: Duration, future: F) -> Result<F::Output, Elapsed> {
    timeout_at(Instant::now() + duration, future).await
}

/// Like [`timeout`] with an absolute deadline.
pub async fn timeout_at<F: Future>(deadline: Instant, future: F) -> Result<F::Output, Elapsed> {
    let mut future = std::pin::pin!(future);
    let mut timer = sleep_until(deadline);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = future.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        match Pin::new(&mut timer).poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed(()))),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}
