//! Waking a worker from another thread: [`Notifier`] and [`channel`].
//!
//! Both park the waiting task's waker; a wake from a foreign thread goes
//! through the runtime's remote queue and eventfd, on which the ring keeps a
//! multishot poll armed, so an idle worker (blocked in `io_uring_enter`
//! with no timer) wakes at once.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves no broken invariant.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Default)]
struct NotifyState {
    pending: AtomicBool,
    waiter: Mutex<Option<Waker>>,
}

/// A wake-up flag shared across threads (`Send + Sync + Clone`).
///
/// [`Notifier::notify`] from any thread completes the [`Notifier::notified`]
/// being awaited on a worker; notifications coalesce (several `notify`
/// calls before the waiter runs complete it once), and one given while
/// nobody waits is kept for the next `notified`. One waiter at a time.
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    state: Arc<NotifyState>,
}

impl Notifier {
    /// A fresh notifier with no pending notification.
    pub fn new() -> Notifier {
        Notifier::default()
    }

    /// Wakes the waiter (or the next one). Callable from any thread.
    pub fn notify(&self) {
        self.state.pending.store(true, Ordering::Release);
        let waiter = lock(&self.state.waiter).take();
        if let Some(waker) = waiter {
            waker.wake();
        }
    }

    /// Completes when a notification is pending, consuming it.
    pub async fn notified(&self) {
        std::future::poll_fn(|cx| {
            if self.state.pending.swap(false, Ordering::AcqRel) {
                return Poll::Ready(());
            }
            *lock(&self.state.waiter) = Some(cx.waker().clone());
            // A notify between the check and the registration took no waker.
            if self.state.pending.swap(false, Ordering::AcqRel) {
                return Poll::Ready(());
            }
            Poll::Pending
        })
        .await;
    }
}

struct ChanState<T> {
    queue: VecDeque<T>,
    waiter: Option<Waker>,
}

struct Chan<T> {
    state: Mutex<ChanState<T>>,
    senders: AtomicUsize,
    receiver_alive: AtomicBool,
}

/// An unbounded multi-producer, single-consumer channel whose receiver is
/// awaited on a worker and whose senders may live on any thread.
pub fn channel<T: Send>() -> (Sender<T>, Receiver<T>) {
    let chan = Arc::new(Chan {
        state: Mutex::new(ChanState {
            queue: VecDeque::new(),
            waiter: None,
        }),
        senders: AtomicUsize::new(1),
        receiver_alive: AtomicBool::new(true),
    });
    (Sender { chan: chan.clone() }, Receiver { chan })
}

/// The sending half of [`channel`]; `Send + Sync + Clone`.
pub struct Sender<T> {
    chan: Arc<Chan<T>>,
}

/// The receiver was dropped; the message is given back.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SendError<T>(pub T);

impl<T> fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SendError(..)")
    }
}

impl<T> fmt::Display for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the receiver of the channel was dropped")
    }
}

impl<T> std::error::Error for SendError<T> {}

impl<T: Send> Sender<T> {
    /// Queues `value` and wakes the receiver. Never blocks.
    pub fn send(&self, value: T) -> Result<(), SendError<T>> {
        if !self.chan.receiver_alive.load(Ordering::Acquire) {
            return Err(SendError(value));
        }
        let waiter = {
            let mut state = lock(&self.chan.state);
            state.queue.push_back(value);
            state.waiter.take()
        };
        if let Some(waker) = waiter {
            waker.wake();
        }
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.chan.senders.fetch_add(1, Ordering::Relaxed);
        Sender {
            chan: self.chan.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.chan.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            let waiter = lock(&self.chan.state).waiter.take();
            if let Some(waker) = waiter {
                waker.wake();
            }
        }
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

/// The receiving half of [`channel`], awaited on the worker.
pub struct Receiver<T> {
    chan: Arc<Chan<T>>,
}

impl<T> Receiver<T> {
    /// The next message; `None` once every sender is dropped and the queue is empty.
    /// Cancel-safe: a message is only removed when returned.
    pub async fn recv(&mut self) -> Option<T> {
        std::future::poll_fn(|cx| {
            if crate::coop::poll_proceed(cx).is_pending() {
                return Poll::Pending;
            }
            let mut state = lock(&self.chan.state);
            if let Some(value) = state.queue.pop_front() {
                return Poll::Ready(Some(value));
            }
            if self.chan.senders.load(Ordering::Acquire) == 0 {
                return Poll::Ready(None);
            }
            match &state.waiter {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => state.waiter = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// The next message if one is queued.
    pub fn try_recv(&mut self) -> Option<T> {
        lock(&self.chan.state).queue.pop_front()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.chan.receiver_alive.store(false, Ordering::Release);
        lock(&self.chan.state).queue.clear();
    }
}

impl<T> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}
