//! The per-thread executor: tasks, wakers and the loop that drives the ring.
//!
//! A [`Runtime`] belongs to one OS thread (it is `!Send`). Tasks are `!Send`
//! futures in a slab; a waker is an `Arc` holding the task's key and a handle
//! to the runtime's remote queue. Waking on the runtime's own thread pushes
//! the key on a local ready queue (no lock, no syscall); waking from any
//! other thread locks the remote queue and writes the runtime's eventfd,
//! on which the ring keeps a multishot poll armed. Wakers are therefore
//! sound to send anywhere, and cheap on the common path.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Wake, Waker};

use crate::driver::Driver;
use crate::recycle::{self, BoxCache, BoxedTask};
use crate::slab::Slab;
use crate::sys;
pub use crate::sys::RingSetup;

/// How a [`Runtime`] is built.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Submission queue size. Ops beyond it are still accepted: a full
    /// queue is flushed to the kernel.
    pub entries: u32,
    /// Completion queue size (`IORING_SETUP_CQSIZE`); 0 means 4 x
    /// `entries`. Every op in flight may complete between two turns (a
    /// relay holds two polls, a listener its accepts), so size it for the
    /// ops a worker keeps in flight; completions beyond it are buffered by
    /// the kernel (counted in [`RuntimeStats::cq_backlogs`]) and, if even
    /// that fails, dropped ([`RuntimeStats::cq_dropped`]). Clamped to the
    /// kernel's maximum (65,536 on Linux 6).
    pub cq_entries: u32,
    /// Tasks polled between two looks at the ring, so I/O completions and
    /// timers are not starved by a long ready queue.
    pub tasks_per_tick: usize,
    /// The ring's task work mode to try first; a kernel without it falls
    /// back to the next tier ([`RingSetup`]). Default: the best.
    pub setup: RingSetup,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            entries: 256,
            cq_entries: 0,
            tasks_per_tick: 64,
            setup: RingSetup::DeferTaskrun,
        }
    }
}

/// Key of a task in the slab; the generation tells a reused slot apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TaskKey {
    idx: usize,
    generation: u64,
}

/// The `block_on` future is not in the slab; it has this key.
const MAIN: TaskKey = TaskKey {
    idx: usize::MAX,
    generation: 0,
};

/// What other threads may touch: the queue of keys they woke, and the
/// eventfd that tells the ring about it.
#[derive(Debug)]
struct Remote {
    queue: Mutex<Vec<TaskKey>>,
    eventfd: Arc<OwnedFd>,
}

impl Remote {
    /// Wakes the runtime's loop.
    fn signal(&self) {
        sys::eventfd_signal(self.eventfd.as_fd());
    }
}

/// The waker of one task (or of the `block_on` future).
#[derive(Debug)]
struct TaskWaker {
    runtime_id: u64,
    key: TaskKey,
    /// Set while the key sits in a ready queue, so a burst of wakes queues
    /// the task once.
    scheduled: AtomicBool,
    remote: Arc<Remote>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let queued_locally = CURRENT
            .try_with(|current| match &*current.borrow() {
                Some(cx) if cx.id == self.runtime_id => {
                    cx.schedule(self.key);
                    true
                }
                _ => false,
            })
            .unwrap_or(false);
        if !queued_locally {
            self.remote
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(self.key);
            self.remote.signal();
        }
    }
}

struct Task {
    generation: u64,
    /// `None` while the task is being polled (taken out so that it may spawn).
    future: Option<BoxedTask>,
    waker: Arc<TaskWaker>,
}

/// Finished tasks' wakers kept at most for the next tasks.
const MAX_FREE_WAKERS: usize = 1024;

/// Everything one runtime owns; shared (`Rc`) by the runtime, its ops and timers.
pub(crate) struct Context {
    id: u64,
    pub(crate) driver: RefCell<Driver>,
    ready: RefCell<VecDeque<TaskKey>>,
    /// Wakers of tasks that yielded (budget spent, `yield_now`): woken after
    /// the next ring turn, so they do not run again before I/O is looked at.
    deferred: RefCell<Vec<Waker>>,
    /// Set by a turn that failed: the ring is unusable.
    failed: RefCell<Option<(io::ErrorKind, String)>>,
    main_woken: Cell<bool>,
    tasks: RefCell<Slab<Task>>,
    /// Finished tasks' future memory, for the next tasks of their layouts.
    boxes: RefCell<BoxCache>,
    /// Finished tasks' wakers that nothing else held, for the next tasks.
    free_wakers: RefCell<Vec<Arc<TaskWaker>>>,
    next_generation: Cell<u64>,
    remote: Arc<Remote>,
    config: RuntimeConfig,
}

#[cfg(test)]
impl Context {
    /// Finished tasks' future blocks kept.
    pub(crate) fn kept_blocks(&self) -> usize {
        self.boxes.borrow().blocks()
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("id", &self.id)
            .field("tasks", &self.tasks.borrow().len())
            .field("ready", &self.ready.borrow().len())
            .finish()
    }
}

thread_local! {
    /// The runtime whose `block_on` is running on this thread.
    static CURRENT: RefCell<Option<Rc<Context>>> = const { RefCell::new(None) };
}

static NEXT_RUNTIME_ID: AtomicU64 = AtomicU64::new(1);

impl Context {
    fn schedule(&self, key: TaskKey) {
        if key == MAIN {
            self.main_woken.set(true);
        } else {
            self.ready.borrow_mut().push_back(key);
        }
    }

    /// Spawns `future`, in the memory of a finished task of its layout
    /// when one is kept.
    fn spawn_future<F: Future<Output = ()> + 'static>(&self, future: F) {
        let boxed = self.boxes.borrow_mut().boxed(future);
        self.spawn(boxed);
    }

    fn spawn(&self, future: BoxedTask) {
        let generation = self.next_generation.get();
        self.next_generation.set(generation + 1);
        let mut tasks = self.tasks.borrow_mut();
        let key = TaskKey {
            idx: tasks.next_key(),
            generation,
        };
        let mut kept = self.free_wakers.borrow_mut().pop();
        // Nothing else holds a kept waker (`finish` kept it alone), so no
        // wake meant for the task it served can reach this one.
        let reused = kept.as_mut().and_then(Arc::get_mut).map(|w| {
            w.key = key;
            *w.scheduled.get_mut() = true;
        });
        let waker = match kept {
            Some(waker) if reused.is_some() => waker,
            _ => Arc::new(TaskWaker {
                runtime_id: self.id,
                key,
                scheduled: AtomicBool::new(true),
                remote: self.remote.clone(),
            }),
        };
        let idx = tasks.insert(Task {
            generation,
            future: Some(future),
            waker,
        });
        debug_assert_eq!(idx, key.idx);
        drop(tasks);
        self.ready.borrow_mut().push_back(key);
    }

    /// Polls one ready task; returns false when the ready queue is empty.
    fn run_one(&self) -> bool {
        let Some(key) = self.ready.borrow_mut().pop_front() else {
            return false;
        };
        let (mut future, waker) = {
            let mut tasks = self.tasks.borrow_mut();
            let Some(task) = tasks
                .get_mut(key.idx)
                .filter(|t| t.generation == key.generation)
            else {
                return true; // stale wake of a finished task
            };
            let Some(future) = task.future.take() else {
                return true;
            };
            task.waker.scheduled.store(false, Ordering::Release);
            (future, Waker::from(task.waker.clone()))
        };
        let done = crate::coop::budgeted(|| {
            future
                .as_mut()
                .poll(&mut TaskContext::from_waker(&waker))
                .is_ready()
        });
        drop(waker);
        let mut tasks = self.tasks.borrow_mut();
        if done {
            let task = tasks.remove(key.idx);
            drop(tasks);
            self.finish(task, future);
        } else if let Some(task) = tasks.get_mut(key.idx) {
            task.future = Some(future);
        }
        true
    }

    /// Drops a finished task's future, outside every borrow (its drop may
    /// cancel ops, wake or spawn tasks), and keeps its memory and its
    /// waker for the next tasks when they fit and nothing else holds the
    /// waker (a clone left in a timer or an op would wake the next task).
    fn finish(&self, task: Option<Task>, future: BoxedTask) {
        let emptied = recycle::empty(future);
        if let Some(block) = emptied {
            self.boxes.borrow_mut().keep(block);
        }
        if let Some(mut task) = task
            && Arc::get_mut(&mut task.waker).is_some()
        {
            let mut free = self.free_wakers.borrow_mut();
            if free.len() < MAX_FREE_WAKERS {
                free.push(task.waker);
            }
        }
    }

    fn drain_remote(&self) {
        let keys =
            std::mem::take(&mut *self.remote.queue.lock().unwrap_or_else(|e| e.into_inner()));
        for key in keys {
            self.schedule(key);
        }
    }

    /// One I/O turn, then wake what completed. An error is fatal: the ring
    /// itself failed (`io_uring_enter` returned `EBADF`, `EFAULT`, `EBADR`
    /// after dropped completions, ...), and the runtime refuses to run again.
    fn turn(&self, may_block: bool) -> io::Result<()> {
        let mut woken = {
            let mut driver = self.driver.borrow_mut();
            if let Err(e) = driver.turn(may_block) {
                let message = format!(
                    "splicegate-uring: io_uring_enter failed: {e}; this runtime cannot run again"
                );
                *self.failed.borrow_mut() = Some((e.kind(), message.clone()));
                return Err(io::Error::new(e.kind(), message));
            }
            std::mem::take(&mut driver.woken)
        };
        for waker in woken.drain(..) {
            waker.wake();
        }
        let mut driver = self.driver.borrow_mut();
        if driver.woken.is_empty() {
            driver.woken = woken; // keep the allocation
        }
        if std::mem::take(&mut driver.remote_signalled) {
            drop(driver);
            self.drain_remote();
        }
        self.wake_deferred();
        Ok(())
    }

    /// The error of a failed turn, again.
    fn failure(&self) -> Option<io::Error> {
        self.failed
            .borrow()
            .as_ref()
            .map(|(kind, message)| io::Error::new(*kind, message.clone()))
    }

    fn stats(&self) -> RuntimeStats {
        let mut driver = self.driver.borrow_mut();
        let (sq_entries, cq_entries, cq_backlogs, cq_dropped, pending_cancels) =
            driver.ring_stats();
        RuntimeStats {
            sq_entries,
            cq_entries,
            cq_backlogs,
            cq_dropped,
            ops_in_flight: driver.ops_in_flight(),
            pending_cancels,
            tasks: self.tasks.borrow().len(),
            ring_setup: driver.ring_setup(),
            gathered_waits: driver.gathered(),
        }
    }

    /// Wakes the tasks that yielded before this turn.
    fn wake_deferred(&self) {
        let deferred = std::mem::take(&mut *self.deferred.borrow_mut());
        for waker in deferred {
            waker.wake();
        }
    }
}

/// Wakes `waker` after the next ring turn of the runtime running on this
/// thread (at once when none is).
pub(crate) fn defer_wake(waker: &Waker) {
    let deferred = CURRENT
        .try_with(|current| match &*current.borrow() {
            Some(cx) => {
                cx.deferred.borrow_mut().push(waker.clone());
                true
            }
            None => false,
        })
        .unwrap_or(false);
    if !deferred {
        waker.wake_by_ref();
    }
}

/// Counters of one runtime, for a worker to export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuntimeStats {
    /// Submission queue size the kernel gave.
    pub sq_entries: u32,
    /// Completion queue size the kernel gave.
    pub cq_entries: u32,
    /// Turns that found the kernel holding completions back because the CQ
    /// was full (`IORING_SQ_CQ_OVERFLOW`): nothing is lost, but the CQ is
    /// too small for the ops in flight. Cumulative.
    pub cq_backlogs: u64,
    /// Completions the kernel dropped (its CQ overflow counter): the CQ was
    /// full and it could not buffer them. Each is an op that will never
    /// complete; recent kernels then fail a wait with `EBADR`, which
    /// [`Runtime::block_on`] returns as a fatal error. Cumulative.
    pub cq_dropped: u32,
    /// Ops in flight or with unconsumed completions.
    pub ops_in_flight: usize,
    /// Cancels of dropped ops waiting for room in the submission queue.
    pub pending_cancels: usize,
    /// Spawned tasks not finished.
    pub tasks: usize,
    /// The task work mode the kernel gave the ring.
    pub ring_setup: RingSetup,
    /// Waits that gathered completions for a moment before waking, at a
    /// task's request ([`crate::gather_next_wait`]). Cumulative.
    pub gathered_waits: u64,
}

/// The counters of the runtime running on this thread.
///
/// # Panics
/// Outside [`Runtime::block_on`].
pub fn runtime_stats() -> RuntimeStats {
    with_current(|cx| cx.stats())
}

/// Runs `f` with the runtime of the current `block_on`.
///
/// # Panics
/// Outside [`Runtime::block_on`].
pub(crate) fn with_current<R>(f: impl FnOnce(&Rc<Context>) -> R) -> R {
    CURRENT.with(|current| {
        let current = current.borrow();
        let cx = current
            .as_ref()
            .expect("splicegate-uring: must be called inside Runtime::block_on");
        f(cx)
    })
}

/// A single-threaded io_uring runtime: one per worker thread.
///
/// `!Send`: it stays on the thread that created it, as do its tasks.
#[derive(Debug)]
pub struct Runtime {
    cx: Rc<Context>,
}

impl Runtime {
    /// Creates the ring (with `config.entries` SQ slots) and the eventfd
    /// used for cross-thread wakes.
    pub fn new(config: RuntimeConfig) -> io::Result<Runtime> {
        let eventfd = Arc::new(sys::eventfd()?);
        let entries = config.entries.max(8);
        let cq_entries = match config.cq_entries {
            0 => entries.saturating_mul(4),
            n => n,
        };
        let driver = Driver::new(entries, cq_entries, config.setup, eventfd.clone())?;
        Ok(Runtime {
            cx: Rc::new(Context {
                id: NEXT_RUNTIME_ID.fetch_add(1, Ordering::Relaxed),
                driver: RefCell::new(driver),
                ready: RefCell::new(VecDeque::new()),
                deferred: RefCell::new(Vec::new()),
                failed: RefCell::new(None),
                main_woken: Cell::new(false),
                tasks: RefCell::new(Slab::new()),
                boxes: RefCell::new(BoxCache::default()),
                free_wakers: RefCell::new(Vec::new()),
                next_generation: Cell::new(0),
                remote: Arc::new(Remote {
                    queue: Mutex::new(Vec::new()),
                    eventfd,
                }),
                config,
            }),
        })
    }

    /// The task work mode the kernel gave this runtime's ring.
    pub fn ring_setup(&self) -> RingSetup {
        self.cx.driver.borrow().ring_setup()
    }

    /// Whether the ring's waits can gather completions
    /// (`IORING_FEAT_MIN_TIMEOUT`; see [`crate::gather_next_wait`]).
    pub fn can_gather(&self) -> bool {
        self.cx.driver.borrow().can_gather()
    }

    /// Runs `future` to completion on this thread, together with every task
    /// [`spawn`]ed onto this runtime, and returns its output. Spawned tasks
    /// that are still pending when it returns stay queued for the next
    /// `block_on`.
    ///
    /// # Errors
    /// When the ring itself fails (`io_uring_enter` returns an error other
    /// than a timeout, a signal or a busy queue: `EBADF`, `EFAULT`, `EBADR`
    /// after the kernel dropped completions, ...). **The caller must treat
    /// this as fatal**: the future and every task are stalled, their
    /// sockets unserved, and this runtime returns the same error from every
    /// later `block_on` without running anything. Log it and exit the
    /// process (or rebuild the worker); never serve on with a dead worker.
    ///
    /// # Panics
    /// When called from inside another `block_on` on the same thread.
    pub fn block_on<F: Future>(&self, future: F) -> io::Result<F::Output> {
        if let Some(e) = self.cx.failure() {
            return Err(e);
        }
        let _enter = Enter::new(self.cx.clone());
        let cx = &*self.cx;
        let main = Arc::new(TaskWaker {
            runtime_id: cx.id,
            key: MAIN,
            scheduled: AtomicBool::new(false),
            remote: cx.remote.clone(),
        });
        let waker = Waker::from(main.clone());
        let mut task_cx = TaskContext::from_waker(&waker);
        let mut future = pin!(future);
        cx.main_woken.set(true);
        loop {
            if cx.main_woken.replace(false) {
                main.scheduled.store(false, Ordering::Release);
                if let Poll::Ready(out) =
                    crate::coop::budgeted(|| future.as_mut().poll(&mut task_cx))
                {
                    return Ok(out);
                }
            }
            let mut budget = cx.config.tasks_per_tick.max(1);
            while budget > 0 && cx.run_one() {
                budget -= 1;
            }
            let idle = cx.ready.borrow().is_empty()
                && !cx.main_woken.get()
                && cx.deferred.borrow().is_empty();
            cx.turn(idle)?;
        }
    }

    /// Spawns a `!Send` task onto this runtime; it first runs inside the
    /// next [`Runtime::block_on`]. Inside a task, use the free [`spawn`].
    pub fn spawn<F: Future<Output = ()> + 'static>(&self, future: F) {
        self.cx.spawn_future(future);
    }

    /// Ops whose slot is still held: in flight in the kernel, or completed
    /// and not yet consumed. Useful to check that cancellation settles.
    pub fn ops_in_flight(&self) -> usize {
        self.cx.driver.borrow().ops_in_flight()
    }

    /// Number of spawned tasks that have not finished.
    pub fn tasks(&self) -> usize {
        self.cx.tasks.borrow().len()
    }

    /// Tests: the runtime's context.
    #[cfg(test)]
    pub(crate) fn cx_for_tests(&self) -> &Context {
        &self.cx
    }

    /// The runtime's counters; inside a task, use [`runtime_stats`].
    pub fn stats(&self) -> RuntimeStats {
        self.cx.stats()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // Drop the tasks with the runtime current, so that their ops can
        // submit cancellations. The ring itself closes once the last op
        // or timer referencing the context is gone.
        let _enter = Enter::try_new(self.cx.clone());
        let tasks = self.cx.tasks.borrow_mut().drain();
        drop(tasks);
        self.cx.ready.borrow_mut().clear();
        self.cx.deferred.borrow_mut().clear();
        let _ = self.cx.driver.borrow_mut().turn(false);
    }
}

/// Makes a runtime current for the duration of a `block_on`.
struct Enter {
    entered: bool,
}

impl Enter {
    fn new(cx: Rc<Context>) -> Enter {
        let enter = Enter::try_new(cx);
        assert!(
            enter.entered,
            "splicegate-uring: block_on called while a runtime is already running on this thread"
        );
        enter
    }

    fn try_new(cx: Rc<Context>) -> Enter {
        CURRENT.with(|current| {
            let mut current = current.borrow_mut();
            if current.is_some() {
                Enter { entered: false }
            } else {
                *current = Some(cx);
                Enter { entered: true }
            }
        })
    }
}

impl Drop for Enter {
    fn drop(&mut self) {
        if self.entered {
            let cx = CURRENT.with(|current| current.borrow_mut().take());
            drop(cx); // outside the TLS borrow
        }
    }
}

/// Spawns a `!Send` task on the runtime running on this thread.
///
/// # Panics
/// Outside [`Runtime::block_on`].
pub fn spawn<F: Future<Output = ()> + 'static>(future: F) {
    with_current(|cx| cx.spawn_future(future));
}

/// Yields once to the scheduler: the task runs again after the other ready
/// tasks and the next look at the ring (I/O completions, timers).
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            crate::coop::defer(cx.waker());
            Poll::Pending
        }
    })
    .await;
}
