//! The ring, its op slots and the timer heap: what one loop turn submits,
//! waits for and dispatches.
//!
//! Invariant: an op slot (keyed by the SQE `user_data`) lives until the
//! kernel posts its final CQE (one without `IORING_CQE_F_MORE`), even when
//! the future that owned it was dropped; so a `user_data` is never reused
//! while the kernel may still complete it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use io_uring::cqueue;

use crate::slab::Slab;
use crate::sys::{self, Ring, RingSetup, SqFull};

/// `user_data` of the multishot poll on the runtime's eventfd.
const WAKE_TOKEN: u64 = u64::MAX;
/// `user_data` of cancel requests; their own CQEs carry nothing we need.
const CANCEL_TOKEN: u64 = u64::MAX - 1;
/// Tries of a push (each reaping completions in between) before it fails.
pub(crate) const PUSH_ATTEMPTS: usize = 64;
/// The longest wait while the eventfd poll could not be re-armed.
const UNARMED_WAIT: Duration = Duration::from_millis(10);

/// How long after an urgent completion no wait gathers. Beside a busy TCP
/// connection, whose completions keep coming, that is always; a TCP
/// ping-pong beside a UDP stream on one worker keeps its round trips with
/// it (docs/PERFORMANCE.md, "SOCKS5 UDP"; a window of 16 reaps instead
/// still cost it 7–33 %).
pub(crate) const QUIET: Duration = Duration::from_millis(2);

/// One CQE as delivered to an op.
#[derive(Debug)]
pub(crate) struct Completion {
    /// The CQE `res`: a value, or `-errno`.
    pub(crate) result: i32,
    /// For ops that create descriptors (accept), the new descriptor, owned
    /// from the moment the CQE is reaped so that it is closed if dropped.
    pub(crate) fd: Option<OwnedFd>,
}

impl Completion {
    pub(crate) fn into_result(self) -> io::Result<u32> {
        if self.result < 0 {
            Err(io::Error::from_raw_os_error(-self.result))
        } else {
            Ok(self.result as u32)
        }
    }
}

/// The state of one submitted request.
#[derive(Debug)]
struct OpSlot {
    /// The task to wake on the next CQE.
    waker: Option<Waker>,
    /// CQEs not yet consumed by the owner (multishot ops can queue several).
    completions: Completions,
    /// The final CQE arrived; the kernel will not touch this slot again.
    finished: bool,
    /// The owning future is gone; free the slot at the final CQE.
    orphaned: bool,
    /// Successful results are new file descriptors (accept): close them
    /// when nobody will take them.
    yields_fds: bool,
    /// A completion stops waits from gathering for a while (every op but
    /// waiting for a datagram to read: see [`QUIET`]).
    urgent: bool,
}

/// A FIFO of completions that keeps the first one inline, so one-shot ops
/// (every readiness wait of the relay) allocate nothing.
#[derive(Debug, Default)]
struct Completions {
    head: Option<Completion>,
    rest: VecDeque<Completion>,
}

impl Completions {
    fn push(&mut self, c: Completion) {
        if self.head.is_none() && self.rest.is_empty() {
            self.head = Some(c);
        } else {
            self.rest.push_back(c);
        }
    }

    fn pop(&mut self) -> Option<Completion> {
        self.head.take().or_else(|| self.rest.pop_front())
    }

    fn clear(&mut self) {
        self.head = None;
        self.rest.clear();
    }
}

/// Identifies a timer; the generation guards against reused slab keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TimerKey {
    idx: usize,
    generation: u64,
}

#[derive(Debug)]
struct TimerSlot {
    generation: u64,
    waker: Option<Waker>,
    fired: bool,
}

/// Userspace timers: a slab plus a min-heap of deadlines with lazy deletion.
/// Only the nearest deadline reaches the kernel, as the wait timeout.
#[derive(Debug)]
struct Timers {
    slots: Slab<TimerSlot>,
    heap: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    next_generation: u64,
    /// Slots registered and not yet fired (each has exactly one live heap entry).
    armed: usize,
}

impl Timers {
    fn insert(&mut self, deadline: Instant, waker: Waker) -> TimerKey {
        let generation = self.next_generation;
        self.next_generation += 1;
        let idx = self.slots.insert(TimerSlot {
            generation,
            waker: Some(waker),
            fired: false,
        });
        self.heap.push(Reverse((deadline, generation, idx)));
        self.armed += 1;
        self.compact();
        TimerKey { idx, generation }
    }

    fn slot(&mut self, key: TimerKey) -> Option<&mut TimerSlot> {
        self.slots
            .get_mut(key.idx)
            .filter(|s| s.generation == key.generation)
    }

    fn remove(&mut self, key: TimerKey) {
        if self.slot(key).is_some()
            && let Some(slot) = self.slots.remove(key.idx)
            && !slot.fired
        {
            self.armed -= 1;
        }
    }

    /// Stale heap entries (removed timers) are dropped when they reach the top;
    /// if they pile up (many short-lived timeouts), rebuild from the live set.
    fn compact(&mut self) {
        if self.heap.len() > 64 && self.heap.len() > 2 * self.armed {
            // In place: the heap keeps its allocation.
            let slots = &self.slots;
            self.heap.retain(|Reverse((_, generation, idx))| {
                slots
                    .get(*idx)
                    .is_some_and(|s| s.generation == *generation && !s.fired)
            });
        }
    }

    fn fire_expired(&mut self, now: Instant, woken: &mut Vec<Waker>) {
        while let Some(Reverse((deadline, generation, idx))) = self.heap.peek().copied() {
            if deadline > now {
                break;
            }
            self.heap.pop();
            if let Some(slot) = self.slots.get_mut(idx)
                && slot.generation == generation
                && !slot.fired
            {
                slot.fired = true;
                self.armed -= 1;
                woken.extend(slot.waker.take());
            }
        }
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((deadline, generation, idx))) = self.heap.peek().copied() {
            match self.slots.get(idx) {
                Some(s) if s.generation == generation && !s.fired => return Some(deadline),
                _ => {
                    self.heap.pop();
                }
            }
        }
        None
    }
}

/// The I/O half of a runtime.
#[derive(Debug)]
pub(crate) struct Driver {
    ring: Ring,
    ops: Slab<OpSlot>,
    timers: Timers,
    /// Wakers collected during dispatch, woken by the runtime once the driver
    /// is no longer borrowed.
    pub(crate) woken: Vec<Waker>,
    /// The eventfd poll fired: the runtime must drain its remote queue.
    /// Set by any reap, including one inside a push that found the queue
    /// full, so a turn must not block while it is set (the eventfd was
    /// already drained: no further completion would end the wait).
    pub(crate) remote_signalled: bool,
    /// The multishot poll on the eventfd is armed. Cleared when the kernel
    /// ends it; re-armed at the next turn (never from inside a reap).
    wake_armed: bool,
    /// Ops released whose cancel could not be queued (the submission queue
    /// stayed full); retried at every turn until queued.
    pending_cancels: Vec<usize>,
    /// Reaps that found the kernel holding completions back (CQ full).
    cq_backlogs: u64,
    /// A task asked the next wait to gather completions for this long
    /// ([`Driver::gather`]).
    gather: Option<Duration>,
    /// Waits that gathered completions.
    gathered: u64,
    /// When a reap last took an urgent completion.
    last_urgent: Option<Instant>,
    /// An urgent op was queued since the ring was last entered: it may
    /// complete inside the next wait, which must not gather then.
    urgent_queued: bool,
    /// The eventfd the runtime keeps a multishot poll armed on (shared with
    /// the runtime's remote-wake handle, which writes to it).
    wake_fd: Arc<OwnedFd>,
}

impl Driver {
    pub(crate) fn new(
        entries: u32,
        cq_entries: u32,
        setup: RingSetup,
        wake_fd: Arc<OwnedFd>,
    ) -> io::Result<Driver> {
        let mut driver = Driver {
            ring: Ring::with_setup(entries, cq_entries, setup)?,
            ops: Slab::new(),
            timers: Timers {
                slots: Slab::new(),
                heap: BinaryHeap::new(),
                next_generation: 0,
                armed: 0,
            },
            woken: Vec::new(),
            remote_signalled: false,
            wake_armed: false,
            pending_cancels: Vec::new(),
            cq_backlogs: 0,
            gather: None,
            gathered: 0,
            last_urgent: None,
            urgent_queued: false,
            wake_fd,
        };
        driver.arm_wake()?;
        Ok(driver)
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let fd = self.wake_fd.as_raw_fd();
        self.push(|ring| ring.push_poll(fd, libc::POLLIN as u32, true, WAKE_TOKEN))?;
        self.wake_armed = true;
        Ok(())
    }

    /// Pushes one entry, reaping completions if the queues are backed up.
    fn push(&mut self, mut f: impl FnMut(&mut Ring) -> Result<(), SqFull>) -> io::Result<()> {
        for _ in 0..PUSH_ATTEMPTS {
            if f(&mut self.ring).is_ok() {
                return Ok(());
            }
            self.reap();
        }
        Err(io::Error::other(
            "io_uring submission queue stays full; completions are not being consumed",
        ))
    }

    /// Registers a new op; `push` builds and pushes its SQE with the given `user_data`.
    pub(crate) fn submit_op(
        &mut self,
        yields_fds: bool,
        urgent: bool,
        mut push: impl FnMut(&mut Ring, u64) -> Result<(), SqFull>,
    ) -> io::Result<usize> {
        let idx = self.ops.insert(OpSlot {
            waker: None,
            completions: Completions::default(),
            finished: false,
            orphaned: false,
            yields_fds,
            urgent,
        });
        self.urgent_queued |= urgent;
        match self.push(|ring| push(ring, idx as u64)) {
            Ok(()) => Ok(idx),
            Err(e) => {
                self.ops.remove(idx);
                Err(e)
            }
        }
    }

    /// Takes the next completion of op `idx`, or registers `waker`.
    /// `Ready(None)`: the op is finished and every completion was taken.
    pub(crate) fn poll_op(
        &mut self,
        idx: usize,
        waker: &Waker,
    ) -> std::task::Poll<Option<Completion>> {
        let slot = self.ops.get_mut(idx).expect("op slot of a live Op");
        if let Some(c) = slot.completions.pop() {
            return std::task::Poll::Ready(Some(c));
        }
        if slot.finished {
            return std::task::Poll::Ready(None);
        }
        match &mut slot.waker {
            Some(w) if w.will_wake(waker) => {}
            w => *w = Some(waker.clone()),
        }
        std::task::Poll::Pending
    }

    /// The owner of op `idx` is gone: free it now if the kernel is done with
    /// it, otherwise cancel it and free it at its final CQE.
    pub(crate) fn release_op(&mut self, idx: usize) {
        let Some(slot) = self.ops.get_mut(idx) else {
            return;
        };
        // Unconsumed results (accepted sockets) are closed here.
        slot.completions.clear();
        if slot.finished {
            self.ops.remove(idx);
            return;
        }
        slot.orphaned = true;
        slot.waker = None;
        if self.push_cancel(idx).is_err() {
            // The queue stays full: a poll on an idle socket would otherwise
            // stay in the kernel, holding its slot, for as long as the
            // socket stays quiet. Retry at the next turn.
            self.pending_cancels.push(idx);
        }
    }

    fn push_cancel(&mut self, idx: usize) -> io::Result<()> {
        self.push(|ring| ring.push_cancel(idx as u64, CANCEL_TOKEN))
    }

    /// Queues the cancels that could not be queued before, oldest first,
    /// stopping at the first that still cannot be.
    fn retry_cancels(&mut self) {
        let mut done = 0;
        while let Some(&idx) = self.pending_cancels.get(done) {
            // Skip ops that ended meanwhile; a reused slot belongs to an op
            // that is not orphaned (or was released again and queued anew).
            let live = self
                .ops
                .get(idx)
                .is_some_and(|slot| slot.orphaned && !slot.finished);
            if live && self.push_cancel(idx).is_err() {
                break;
            }
            done += 1;
        }
        self.pending_cancels.drain(..done);
    }

    pub(crate) fn insert_timer(&mut self, deadline: Instant, waker: Waker) -> TimerKey {
        self.timers.insert(deadline, waker)
    }

    /// `Some(true)` fired, `Some(false)` pending (waker refreshed), `None` unknown key.
    pub(crate) fn poll_timer(&mut self, key: TimerKey, waker: &Waker) -> Option<bool> {
        let slot = self.timers.slot(key)?;
        if slot.fired {
            return Some(true);
        }
        match &mut slot.waker {
            Some(w) if w.will_wake(waker) => {}
            w => *w = Some(waker.clone()),
        }
        Some(false)
    }

    pub(crate) fn remove_timer(&mut self, key: TimerKey) {
        self.timers.remove(key);
    }

    /// Tests: the ring's descriptor.
    #[cfg(test)]
    pub(crate) fn ring_fd(&self) -> std::os::fd::RawFd {
        self.ring.fd()
    }

    /// Tests: cancel the eventfd's multishot poll, as the kernel ends a
    /// multishot it cannot post to (e.g. on a full CQ).
    #[cfg(test)]
    pub(crate) fn cancel_wake_poll(&mut self) -> io::Result<()> {
        self.push(|ring| ring.push_cancel(WAKE_TOKEN, CANCEL_TOKEN))
    }

    /// Tests: whether the eventfd poll is armed.
    #[cfg(test)]
    pub(crate) fn wake_armed(&self) -> bool {
        self.wake_armed
    }

    /// Tests: make the next `n` SQE pushes fail as if the queue stayed full.
    #[cfg(test)]
    pub(crate) fn refuse_pushes(&mut self, n: usize) {
        self.ring.refuse_pushes(n);
    }

    /// `(sq, cq)` sizes, CQ backlogs seen, CQEs the kernel dropped, and
    /// cancels waiting to be queued.
    pub(crate) fn ring_stats(&mut self) -> (u32, u32, u64, u32, usize) {
        let (sq, cq) = self.ring.sizes();
        (
            sq,
            cq,
            self.cq_backlogs,
            self.ring.cq_dropped(),
            self.pending_cancels.len(),
        )
    }

    /// The ring's task work mode.
    pub(crate) fn ring_setup(&self) -> RingSetup {
        self.ring.setup()
    }

    /// Number of ops the kernel still owns or whose results are unconsumed.
    pub(crate) fn ops_in_flight(&self) -> usize {
        self.ops.len()
    }

    /// Asks the next blocking wait to gather completions for `d` (the
    /// longest of the requests since the last such wait) before waking;
    /// see [`crate::gather_next_wait`]. Whether the kernel can (the wait
    /// may still refuse: see [`QUIET`]).
    pub(crate) fn gather(&mut self, d: Duration) -> bool {
        self.gather = Some(self.gather.map_or(d, |g| g.max(d)));
        self.ring.can_gather()
    }

    /// Whether the kernel can gather completions in a wait.
    pub(crate) fn can_gather(&self) -> bool {
        self.ring.can_gather()
    }

    /// Waits that gathered completions.
    pub(crate) fn gathered(&self) -> u64 {
        self.gathered
    }

    /// One turn of I/O: fire expired timers, submit, optionally wait (until a
    /// completion or the nearest timer), then dispatch every CQE.
    pub(crate) fn turn(&mut self, may_block: bool) -> io::Result<()> {
        if !self.wake_armed {
            // If even this cannot be queued, the wait below is bounded.
            let _ = self.arm_wake();
        }
        if !self.pending_cancels.is_empty() {
            self.retry_cancels();
        }
        let now = Instant::now();
        self.timers.fire_expired(now, &mut self.woken);
        // Never wait with work already known: tasks to wake, or a remote
        // wake reaped outside a turn (by a push that found the queue full).
        if may_block && self.woken.is_empty() && !self.remote_signalled {
            let mut timeout = self
                .timers
                .next_deadline()
                .map(|d| d.saturating_duration_since(now));
            if !self.wake_armed {
                // Remote wakes cannot reach the ring: look again soon.
                timeout = Some(timeout.map_or(UNARMED_WAIT, |t| t.min(UNARMED_WAIT)));
            }
            match timeout {
                Some(Duration::ZERO) => self.ring.submit()?,
                t => {
                    // A request applies to one wait: the one after it; and
                    // only while nothing urgent (a TCP connection's bytes,
                    // an accept) has completed for a while or may complete
                    // in this very wait, so that the worker's TCP traffic
                    // does not wait behind it.
                    let quiet = !self.urgent_queued
                        && self
                            .last_urgent
                            .is_none_or(|t| now.saturating_duration_since(t) >= QUIET);
                    // `want` is everything in flight, so in practice the
                    // gathering lasts its whole time once anything has
                    // completed; never past the nearest timer.
                    let want = self.ops.len().min(self.ring.sizes().1 as usize);
                    let gather = self
                        .gather
                        .take()
                        .filter(|_| quiet && want > 1 && self.ring.can_gather())
                        .map(|d| (t.map_or(d, |t| d.min(t)), want))
                        .filter(|(d, _)| !d.is_zero());
                    self.gathered += u64::from(gather.is_some());
                    self.ring.submit_and_wait(t, gather)?
                }
            }
        } else {
            self.ring.submit()?;
        }
        // Whatever was queued is with the kernel now.
        self.urgent_queued = false;
        self.reap();
        self.timers.fire_expired(Instant::now(), &mut self.woken);
        Ok(())
    }

    /// Dispatches every available CQE to its slot, and notes when one was
    /// urgent (see [`QUIET`]).
    fn reap(&mut self) {
        if self.ring.cq_backlogged() {
            self.cq_backlogs += 1;
        }
        let mut wake_seen = false;
        let mut urgent = false;
        for cqe in self.ring.completions() {
            let (user_data, result, more) =
                (cqe.user_data(), cqe.result(), cqueue::more(cqe.flags()));
            match user_data {
                WAKE_TOKEN => {
                    wake_seen = true;
                    if !more {
                        self.wake_armed = false;
                    }
                }
                CANCEL_TOKEN => {}
                idx => {
                    let idx = idx as usize;
                    let Some(slot) = self.ops.get_mut(idx) else {
                        debug_assert!(false, "CQE for unknown op {idx}");
                        continue;
                    };
                    let fd = (slot.yields_fds && result >= 0).then(|| {
                        // SAFETY: for a descriptor-creating op (accept) a
                        // non-negative result is a descriptor the kernel just
                        // installed for us, and each CQE is reaped once.
                        unsafe { sys::adopt_fd(result) }
                    });
                    if slot.orphaned {
                        // Nobody will take the result: `fd` is closed here.
                        if !more {
                            self.ops.remove(idx);
                        }
                        continue;
                    }
                    urgent |= slot.urgent;
                    slot.completions.push(Completion { result, fd });
                    slot.finished |= !more;
                    self.woken.extend(slot.waker.take());
                }
            }
        }
        if urgent {
            self.last_urgent = Some(Instant::now());
        }
        if wake_seen {
            // Reset the count first, then let the runtime drain its queue:
            // a sender that pushes after this read signals again.
            sys::eventfd_drain(self.wake_fd.as_fd());
            self.remote_signalled = true;
        }
    }
}
