//! The byte path: relay two connected sockets in both directions at once.
//!
//! [`relay`] moves bytes socket → pipe → socket with non-blocking `splice(2)`
//! (`SPLICE_F_NONBLOCK | SPLICE_F_MOVE`), inline on the worker thread, and
//! waits with `POLL_ADD` on the ring only when a side would block. It never
//! uses `IORING_OP_SPLICE` on sockets (that runs in io-wq kernel threads, one
//! per blocked splice). [`copy_relay`] is the same state machine with a
//! userspace buffer (`recv`/`send`), kept to measure small-message latency
//! against splice.
//!
//! Pipes come from a per-worker [`PipePool`]: a direction takes one only to
//! try a transfer and gives it back as soon as it is empty, so an idle
//! tunnel holds no pipe, and the pool only ever caches empty pipes. When no
//! pipe can be had (`pipe2` fails with `EMFILE`/`ENFILE`), the direction
//! copies through its buffer instead: a tunnel never ends for want of a pipe.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant};

use crate::coop;
use crate::net::TcpStream;
use crate::op::Op;
use crate::sys;
use crate::time::{Sleep, sleep_until};

/// Transfers (syscalls that moved bytes) per direction and poll, so one
/// direction cannot starve the other. Each transfer also spends one
/// operation of the task's budget (`coop`); the relay yields when either
/// runs out, and runs again after the next ring turn.
const BUDGET: u32 = 16;

/// Default pipe capacity asked for with `F_SETPIPE_SZ`.
pub const DEFAULT_PIPE_SIZE: usize = 256 * 1024;

/// Which way bytes flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the first socket passed to the relay to the second.
    AToB,
    /// From the second socket to the first.
    BToA,
}

/// One of the two sockets of a relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The first socket passed to the relay.
    A,
    /// The second socket passed to the relay.
    B,
}

/// Why a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both directions saw EOF, drained, and forwarded it (`shutdown(SHUT_WR)`).
    Closed,
    /// No byte moved in either direction for the idle timeout.
    Idle,
    /// [`RelayCtl::stop`] was called.
    Stopped,
    /// A socket failed (`ECONNRESET`, `EPIPE`, ...); `side` says which one.
    Error {
        /// The socket whose syscall failed.
        side: Side,
        /// The error it returned.
        error: io::Error,
    },
    /// A local resource failed: the ring refused a readiness wait. (A pipe
    /// that cannot be had is not one: the direction copies instead.)
    Local(io::Error),
}

/// What a relay did: bytes delivered each way and why it ended. Bytes read
/// but not yet written when the relay ended are not counted (and are lost).
#[derive(Debug)]
pub struct RelayOutcome {
    /// Bytes written to B that were read from A.
    pub a_to_b: u64,
    /// Bytes written to A that were read from B.
    pub b_to_a: u64,
    /// Why the relay ended.
    pub end: RelayEnd,
}

type ChunkHook = Box<dyn FnMut(Direction, usize)>;

struct CtlInner {
    a_to_b: Cell<u64>,
    b_to_a: Cell<u64>,
    idle_timeout: Cell<Option<Duration>>,
    stopped: Cell<bool>,
    /// The relay task, woken by `stop`.
    waker: RefCell<Option<Waker>>,
    hook: RefCell<Option<ChunkHook>>,
}

/// Control and observation of one running relay, from the same thread.
///
/// Cheap to clone (`Rc`); keep a clone in the task that may stop the relay or
/// read its counters. Counters are the bytes delivered to the destination so
/// far, updated after every transfer; they only grow (use one `RelayCtl`
/// per relay). The optional chunk hook sees the same transfers: it is called
/// with each write's direction and size (it must not call
/// [`RelayCtl::on_chunk`] itself).
#[derive(Clone)]
pub struct RelayCtl {
    inner: Rc<CtlInner>,
}

impl fmt::Debug for RelayCtl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayCtl")
            .field("a_to_b", &self.a_to_b())
            .field("b_to_a", &self.b_to_a())
            .field("idle_timeout", &self.inner.idle_timeout.get())
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

impl Default for RelayCtl {
    fn default() -> Self {
        Self::new()
    }
}

/// Control blocks kept at most per thread for the next relays.
const MAX_FREE_CTLS: usize = 1024;

thread_local! {
    /// Control blocks of ended relays that nothing else held, reset: a
    /// worker starts a relay per tunnel, and reuses their memory.
    static FREE_CTLS: RefCell<Vec<Rc<CtlInner>>> = const { RefCell::new(Vec::new()) };
}

impl Drop for RelayCtl {
    fn drop(&mut self) {
        // The last handle of a block that no weak reference watches: reset
        // it and keep it for the next relay on this thread. Nothing else
        // can observe it any more, so the reuse is invisible.
        if Rc::strong_count(&self.inner) != 1 || Rc::weak_count(&self.inner) != 0 {
            return;
        }
        let inner = &self.inner;
        inner.a_to_b.set(0);
        inner.b_to_a.set(0);
        inner.idle_timeout.set(None);
        inner.stopped.set(false);
        // Dropped before the pool is borrowed: a hook's drop may drop
        // another relay's control.
        let waker = inner.waker.take();
        let hook = inner.hook.take();
        drop((waker, hook));
        let _ = FREE_CTLS.try_with(|free| {
            let mut free = free.borrow_mut();
            if free.len() < MAX_FREE_CTLS {
                free.push(self.inner.clone());
            }
        });
    }
}

impl RelayCtl {
    /// No idle timeout, no hook, not stopped.
    pub fn new() -> RelayCtl {
        let kept = FREE_CTLS
            .try_with(|free| free.borrow_mut().pop())
            .ok()
            .flatten();
        RelayCtl {
            inner: kept.unwrap_or_else(|| {
                Rc::new(CtlInner {
                    a_to_b: Cell::new(0),
                    b_to_a: Cell::new(0),
                    idle_timeout: Cell::new(None),
                    stopped: Cell::new(false),
                    waker: RefCell::new(None),
                    hook: RefCell::new(None),
                })
            }),
        }
    }

    /// Ends the relay with [`RelayEnd::Idle`] once no byte moved in either
    /// direction for `idle`. Takes effect from the relay's next wake-up when
    /// changed while it runs.
    pub fn set_idle_timeout(&self, idle: Option<Duration>) {
        self.inner.idle_timeout.set(idle);
    }

    /// Calls `hook(direction, bytes)` after every transfer to a destination.
    pub fn on_chunk(&self, hook: impl FnMut(Direction, usize) + 'static) {
        *self.inner.hook.borrow_mut() = Some(Box::new(hook));
    }

    /// Ends the relay promptly with [`RelayEnd::Stopped`] (wakes it). Stays
    /// stopped: a relay started later with this `RelayCtl` ends at once.
    pub fn stop(&self) {
        self.inner.stopped.set(true);
        let waker = self.inner.waker.borrow_mut().take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Whether [`RelayCtl::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.get()
    }

    /// Bytes delivered from A to B so far.
    pub fn a_to_b(&self) -> u64 {
        self.inner.a_to_b.get()
    }

    /// Bytes delivered from B to A so far.
    pub fn b_to_a(&self) -> u64 {
        self.inner.b_to_a.get()
    }

    /// The idle timeout set with [`RelayCtl::set_idle_timeout`].
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.inner.idle_timeout.get()
    }

    /// For a relay built outside this crate (a TLS relay): count `n` bytes
    /// delivered in direction `dir` (and call the chunk hook).
    pub fn count(&self, dir: Direction, n: usize) {
        self.record(dir, n);
    }

    /// For a relay built outside this crate: `waker` is woken by
    /// [`RelayCtl::stop`].
    pub fn wake_on_stop(&self, waker: &Waker) {
        self.register(waker);
    }

    fn record(&self, dir: Direction, n: usize) {
        let counter = match dir {
            Direction::AToB => &self.inner.a_to_b,
            Direction::BToA => &self.inner.b_to_a,
        };
        counter.set(counter.get() + n as u64);
        if let Some(hook) = self.inner.hook.borrow_mut().as_mut() {
            hook(dir, n);
        }
    }

    fn register(&self, waker: &Waker) {
        let mut slot = self.inner.waker.borrow_mut();
        match &*slot {
            Some(w) if w.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
    }
}

/// A pipe, always empty while it sits in the pool.
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

/// Pipes of a process (every worker's pool) that [`PipePool::new`] lets
/// hold bytes at once: 4,096 pipes of up to [`DEFAULT_PIPE_SIZE`], 1 GiB.
pub const DEFAULT_MAX_PIPES: usize = 4096;

/// A cap on the pipes that hold bytes at once, shared by the [`PipePool`]s
/// of every worker of a process (`Send + Sync`, cheap to clone).
///
/// Bytes in a pipe escape TCP memory accounting (`tcp_mem`): without a cap,
/// thousands of stalled tunnels would each pin a full pipe. Past the cap a
/// direction copies through a 16 KiB buffer instead, as HAProxy does past
/// `maxpipes`. Only pipes holding bytes count; the empty pipes a pool caches
/// do not.
#[derive(Clone, Debug)]
pub struct PipeLimit {
    inner: Arc<LimitInner>,
}

#[derive(Debug)]
struct LimitInner {
    max: usize,
    in_use: AtomicUsize,
}

impl PipeLimit {
    /// At most `max_in_use` pipes hold bytes at once (0: never splice).
    pub fn new(max_in_use: usize) -> PipeLimit {
        PipeLimit {
            inner: Arc::new(LimitInner {
                max: max_in_use,
                in_use: AtomicUsize::new(0),
            }),
        }
    }

    /// The limit every [`PipePool::new`] shares: [`DEFAULT_MAX_PIPES`].
    pub fn process_default() -> PipeLimit {
        static DEFAULT: OnceLock<PipeLimit> = OnceLock::new();
        DEFAULT
            .get_or_init(|| PipeLimit::new(DEFAULT_MAX_PIPES))
            .clone()
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.inner.max
    }

    /// Pipes holding bytes now, in every pool sharing this limit.
    pub fn in_use(&self) -> usize {
        self.inner.in_use.load(Ordering::Relaxed)
    }

    fn try_acquire(&self) -> bool {
        let max = self.inner.max;
        self.inner
            .in_use
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        self.inner.in_use.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A snapshot of a pool's counters, for a worker to export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipeStats {
    /// Pipes of this pool holding bytes now.
    pub in_use: usize,
    /// Empty pipes cached by this pool.
    pub cached: usize,
    /// Pipes holding bytes now in every pool sharing the limit.
    pub limit_in_use: usize,
    /// The shared cap.
    pub limit_max: usize,
    /// Reads copied through a buffer because no pipe could be had (over
    /// the cap, or `pipe2` failing); cumulative.
    pub copy_fallbacks: u64,
    /// `pipe2` calls that failed (`EMFILE`, `ENFILE`, ...); cumulative.
    pub pipe_failures: u64,
}

/// The pipes of one worker, reused across relays.
///
/// A pipe leaves the pool while a direction moves bytes and comes back when
/// drained; a pipe that still holds bytes when its relay ends is closed, not
/// cached. At most `max_cached` empty pipes are kept, and at most
/// [`PipeLimit::max`] pipes hold bytes at once across the pools sharing the
/// limit; past it, and whenever `pipe2` fails, relays copy instead.
#[derive(Debug)]
pub struct PipePool {
    cached: RefCell<Vec<Pipe>>,
    max_cached: usize,
    pipe_size: usize,
    in_use: Cell<usize>,
    limit: PipeLimit,
    copy_fallbacks: Cell<u64>,
    pipe_failures: Cell<u64>,
    /// Small-message buffers ([`COPY_BUF`] bytes), lent like the pipes: only
    /// while bytes are in flight.
    bufs: RefCell<Vec<Box<[u8]>>>,
    /// After a failed `pipe2`, this many more attempts to create a pipe are
    /// skipped (served from the cache only), so a process out of descriptors
    /// does not pay a failing syscall per chunk.
    create_backoff: Cell<u32>,
    /// Tests: how many more pipes `pipe2` may create (`None`: unlimited);
    /// past it creation fails with `EMFILE`, as in a process out of descriptors.
    #[cfg(test)]
    create_allowance: Cell<Option<usize>>,
}

/// Creation attempts skipped after a failed `pipe2`.
const CREATE_BACKOFF: u32 = 64;

impl PipePool {
    /// A pool caching up to `max_cached` pipes of [`DEFAULT_PIPE_SIZE`],
    /// under the process-wide [`PipeLimit::process_default`].
    pub fn new(max_cached: usize) -> PipePool {
        PipePool::with_pipe_size(max_cached, DEFAULT_PIPE_SIZE)
    }

    /// A pool whose pipes ask for `pipe_size` bytes (`F_SETPIPE_SZ`); when
    /// the kernel refuses (`pipe-max-size`, per-user pipe budget), pipes keep
    /// their default capacity.
    pub fn with_pipe_size(max_cached: usize, pipe_size: usize) -> PipePool {
        PipePool {
            cached: RefCell::new(Vec::new()),
            max_cached,
            pipe_size,
            in_use: Cell::new(0),
            limit: PipeLimit::process_default(),
            copy_fallbacks: Cell::new(0),
            pipe_failures: Cell::new(0),
            bufs: RefCell::new(Vec::new()),
            create_backoff: Cell::new(0),
            #[cfg(test)]
            create_allowance: Cell::new(None),
        }
    }

    /// The same pool under `limit` instead (share one [`PipeLimit`] between
    /// the pools of all workers to cap the process).
    pub fn with_limit(mut self, limit: PipeLimit) -> PipePool {
        self.limit = limit;
        self
    }

    /// The limit this pool counts against.
    pub fn limit(&self) -> &PipeLimit {
        &self.limit
    }

    /// The pool's counters.
    pub fn stats(&self) -> PipeStats {
        PipeStats {
            in_use: self.in_use(),
            cached: self.cached(),
            limit_in_use: self.limit.in_use(),
            limit_max: self.limit.max(),
            copy_fallbacks: self.copy_fallbacks.get(),
            pipe_failures: self.pipe_failures.get(),
        }
    }

    /// Tests: let `pipe2` succeed `n` more times, then fail with `EMFILE`.
    #[cfg(test)]
    pub(crate) fn fail_pipe_creation_after(&self, n: usize) {
        self.create_allowance.set(Some(n));
    }

    /// Empty pipes cached for reuse.
    pub fn cached(&self) -> usize {
        self.cached.borrow().len()
    }

    /// Pipes currently held by relays (holding bytes in flight).
    pub fn in_use(&self) -> usize {
        self.in_use.get()
    }

    /// Reads copied because no pipe could be had; cumulative.
    pub fn copy_fallbacks(&self) -> u64 {
        self.copy_fallbacks.get()
    }

    fn take_buf(&self) -> Box<[u8]> {
        self.bufs
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0u8; COPY_BUF].into_boxed_slice())
    }

    fn give_buf(&self, buf: Box<[u8]>) {
        let mut bufs = self.bufs.borrow_mut();
        if bufs.len() < self.max_cached {
            bufs.push(buf);
        }
    }

    /// A pipe to splice through, or `None` when none can be had (the limit
    /// is reached, or `pipe2` failed with `EMFILE`/`ENFILE`/`ENOMEM` now or
    /// recently): the caller copies through a buffer instead, as HAProxy
    /// does past `maxpipes`. A tunnel never ends for want of a pipe.
    pub(crate) fn take(&self) -> Option<Pipe> {
        if !self.limit.try_acquire() {
            self.copy_fallbacks.set(self.copy_fallbacks.get() + 1);
            return None;
        }
        let cached = self.cached.borrow_mut().pop();
        let pipe = match cached.or_else(|| self.create()) {
            Some(pipe) => pipe,
            None => {
                self.limit.release();
                self.copy_fallbacks.set(self.copy_fallbacks.get() + 1);
                return None;
            }
        };
        self.in_use.set(self.in_use.get() + 1);
        Some(pipe)
    }

    fn create(&self) -> Option<Pipe> {
        let backoff = self.create_backoff.get();
        if backoff > 0 {
            self.create_backoff.set(backoff - 1);
            return None;
        }
        match self.pipe2() {
            Ok((read, write)) => {
                let capacity = sys::set_pipe_size(write.as_fd(), self.pipe_size);
                Some(Pipe {
                    read,
                    write,
                    capacity,
                })
            }
            Err(_) => {
                self.pipe_failures.set(self.pipe_failures.get() + 1);
                self.create_backoff.set(CREATE_BACKOFF);
                None
            }
        }
    }

    fn pipe2(&self) -> io::Result<(OwnedFd, OwnedFd)> {
        #[cfg(test)]
        if let Some(n) = self.create_allowance.get() {
            if n == 0 {
                return Err(io::Error::from_raw_os_error(libc::EMFILE));
            }
            self.create_allowance.set(Some(n - 1));
        }
        sys::pipe()
    }

    /// Returns an empty pipe.
    pub(crate) fn give(&self, pipe: Pipe) {
        self.in_use.set(self.in_use.get() - 1);
        self.limit.release();
        let mut cached = self.cached.borrow_mut();
        if cached.len() < self.max_cached {
            cached.push(pipe);
        }
    }

    /// Closes a pipe that may still hold bytes.
    fn discard(&self, pipe: Pipe) {
        self.in_use.set(self.in_use.get() - 1);
        self.limit.release();
        drop(pipe);
    }
}

/// Where one direction keeps bytes between reading them and writing them.
trait Stage {
    /// Bytes read and not yet written.
    fn staged(&self) -> usize;
    /// Reads from `src` into the (empty) stage; `Ok(0)` is EOF.
    fn fill(&mut self, src: &TcpStream) -> io::Result<usize>;
    /// How many bytes the last `fill` asked for (a read that got fewer left
    /// the socket's receive queue empty, most likely).
    fn asked(&self) -> usize;
    /// Writes staged bytes to `dst`.
    fn drain(&mut self, dst: &TcpStream) -> io::Result<usize>;
}

/// Splice through a pipe borrowed from the pool only while bytes are in it.
struct PipeStage<'p> {
    pool: &'p PipePool,
    pipe: Option<Pipe>,
    staged: usize,
    asked: usize,
}

impl PipeStage<'_> {
    /// Splices from `src` into a pipe from the pool; `None` when the pool
    /// has no pipe to give (the caller copies instead).
    fn fill(&mut self, src: &TcpStream) -> Option<io::Result<usize>> {
        debug_assert_eq!(self.staged, 0);
        let pipe = match self.pipe.take() {
            Some(pipe) => pipe,
            None => self.pool.take()?,
        };
        self.asked = pipe.capacity;
        Some(
            match sys::splice(src.as_fd(), pipe.write.as_fd(), pipe.capacity) {
                Ok(n) if n > 0 => {
                    self.staged = n;
                    self.pipe = Some(pipe);
                    Ok(n)
                }
                other => {
                    // EOF, EAGAIN or an error: nothing entered the pipe.
                    self.pool.give(pipe);
                    other
                }
            },
        )
    }

    fn drain(&mut self, dst: &TcpStream) -> io::Result<usize> {
        let pipe = self.pipe.as_ref().expect("staged bytes live in a pipe");
        let n = sys::splice(pipe.read.as_fd(), dst.as_fd(), self.staged)?;
        self.staged -= n;
        if self.staged == 0
            && let Some(pipe) = self.pipe.take()
        {
            self.pool.give(pipe);
        }
        Ok(n)
    }
}

impl Drop for PipeStage<'_> {
    fn drop(&mut self) {
        if let Some(pipe) = self.pipe.take() {
            if self.staged == 0 {
                self.pool.give(pipe);
            } else {
                self.pool.discard(pipe);
            }
        }
    }
}

/// Small reads are copied, large ones spliced (as HAProxy's `splice-auto`):
/// a direction starts with `recv`/`send` through a pooled buffer of
/// [`COPY_BUF`] bytes, which costs no pipe for a small message; once a read
/// fills that buffer (bulk traffic) the next reads splice through a pipe, and
/// a short splice read brings the direction back to copying.
struct AutoStage<'p> {
    pipe: PipeStage<'p>,
    /// The copy buffer while it holds bytes (or was just filled).
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    /// Read the next bytes with splice.
    splice: bool,
}

/// Bytes of a copy-mode read; a read that fills it switches to splice.
pub(crate) const COPY_BUF: usize = 16 * 1024;

impl AutoStage<'_> {
    fn release_buf(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pipe.pool.give_buf(buf);
        }
        self.start = 0;
        self.end = 0;
    }
}

impl Stage for AutoStage<'_> {
    fn staged(&self) -> usize {
        self.pipe.staged + (self.end - self.start)
    }

    fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        if self.splice {
            match self.pipe.fill(src) {
                Some(res) => {
                    let n = res?;
                    if n < COPY_BUF {
                        self.splice = false;
                    }
                    return Ok(n);
                }
                // No pipe to be had: copy this read; the next full one
                // asks the pool again.
                None => self.splice = false,
            }
        }
        let mut buf = self.buf.take().unwrap_or_else(|| self.pipe.pool.take_buf());
        match src.try_read(&mut buf) {
            Ok(n) if n > 0 => {
                self.splice = n == buf.len();
                self.buf = Some(buf);
                self.start = 0;
                self.end = n;
                Ok(n)
            }
            other => {
                self.pipe.pool.give_buf(buf);
                other
            }
        }
    }

    fn asked(&self) -> usize {
        if self.pipe.staged > 0 || (self.splice && self.buf.is_none()) {
            self.pipe.asked
        } else {
            COPY_BUF
        }
    }

    fn drain(&mut self, dst: &TcpStream) -> io::Result<usize> {
        if self.end > self.start {
            let buf = self.buf.as_ref().expect("copied bytes live in the buffer");
            let n = dst.try_write(&buf[self.start..self.end])?;
            self.start += n;
            if self.start == self.end {
                self.release_buf();
            }
            return Ok(n);
        }
        self.pipe.drain(dst)
    }
}

impl Drop for AutoStage<'_> {
    fn drop(&mut self) {
        self.release_buf();
    }
}

/// recv/send through a userspace buffer.
struct BufStage {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Stage for BufStage {
    fn staged(&self) -> usize {
        self.end - self.start
    }

    fn asked(&self) -> usize {
        self.buf.len()
    }

    fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        let n = src.try_read(&mut self.buf)?;
        self.start = 0;
        self.end = n;
        Ok(n)
    }

    fn drain(&mut self, dst: &TcpStream) -> io::Result<usize> {
        let n = dst.try_write(&self.buf[self.start..self.end])?;
        self.start += n;
        Ok(n)
    }
}

/// One direction of a relay.
struct Half<S> {
    dir: Direction,
    stage: S,
    /// The source returned EOF; forward it once the stage is drained.
    eof: bool,
    /// EOF forwarded: this direction is finished.
    done: bool,
    /// The last read got less than it asked for: the source is probably
    /// drained, so wait for readiness on the ring instead of trying a read
    /// that would only say EAGAIN (one syscall fewer per small message).
    short: bool,
    /// The readiness wait this direction is blocked on.
    wait: Option<Op>,
}

/// How one poll of a direction went.
enum Step {
    /// Finished (EOF forwarded).
    Done,
    /// Waiting on the ring; the waker is registered.
    Blocked,
    /// Out of budget; must be polled again soon.
    Yield,
}

impl<S: Stage> Half<S> {
    fn new(dir: Direction, stage: S) -> Half<S> {
        Half {
            dir,
            stage,
            eof: false,
            done: false,
            short: false,
            wait: None,
        }
    }

    fn sides(&self) -> (Side, Side) {
        match self.dir {
            Direction::AToB => (Side::A, Side::B),
            Direction::BToA => (Side::B, Side::A),
        }
    }

    /// Moves bytes until blocked, finished or out of budget; returns the
    /// bytes delivered in `moved`.
    fn poll(
        &mut self,
        cx: &mut TaskContext<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        ctl: &RelayCtl,
        moved: &mut u64,
    ) -> Result<Step, RelayEnd> {
        let (src_side, dst_side) = self.sides();
        let mut budget = BUDGET;
        loop {
            if self.done {
                return Ok(Step::Done);
            }
            if let Some(op) = &mut self.wait {
                match op.poll_next(cx) {
                    Poll::Pending => return Ok(Step::Blocked),
                    Poll::Ready(Some(c)) if c.result < 0 => {
                        return Err(RelayEnd::Local(io::Error::from_raw_os_error(-c.result)));
                    }
                    Poll::Ready(_) => self.wait = None,
                }
            }
            if budget == 0 || !coop::has_budget() {
                return Ok(Step::Yield);
            }
            if self.stage.staged() > 0 {
                match self.stage.drain(dst) {
                    Ok(n) => {
                        budget -= 1;
                        coop::spend();
                        *moved += n as u64;
                        ctl.record(self.dir, n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.wait = Some(wait_for(dst, libc::POLLOUT)?);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(error) => {
                        return Err(RelayEnd::Error {
                            side: dst_side,
                            error,
                        });
                    }
                }
                continue;
            }
            if self.eof {
                match dst.shutdown_write() {
                    Err(e) if e.raw_os_error() != Some(libc::ENOTCONN) => {
                        return Err(RelayEnd::Error {
                            side: dst_side,
                            error: e,
                        });
                    }
                    // ENOTCONN: the peer is gone already; the other direction reports it.
                    _ => self.done = true,
                }
                continue;
            }
            if self.short {
                self.short = false;
                self.wait = Some(wait_for(src, libc::POLLIN)?);
                continue;
            }
            match self.stage.fill(src) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    budget -= 1;
                    coop::spend();
                    self.short = n < self.stage.asked();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait = Some(wait_for(src, libc::POLLIN)?);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    return Err(RelayEnd::Error {
                        side: src_side,
                        error,
                    });
                }
            }
        }
    }
}

fn wait_for(stream: &TcpStream, events: libc::c_short) -> Result<Op, RelayEnd> {
    Op::poll_add(stream.as_raw_fd(), events as u32, true).map_err(RelayEnd::Local)
}

/// Both directions of one relay, polled together.
struct Relay<'a, S> {
    a: &'a TcpStream,
    b: &'a TcpStream,
    ctl: &'a RelayCtl,
    ab: Half<S>,
    ba: Half<S>,
    a_to_b: u64,
    b_to_a: u64,
    /// When a byte last moved (only tracked with an idle timeout).
    last_activity: Instant,
    idle_timer: Option<Sleep>,
}

impl<S: Stage> Relay<'_, S> {
    fn outcome(&self, end: RelayEnd) -> Poll<RelayOutcome> {
        Poll::Ready(RelayOutcome {
            a_to_b: self.a_to_b,
            b_to_a: self.b_to_a,
            end,
        })
    }

    /// True when the idle timeout passed; otherwise the timer is armed.
    ///
    /// The timer is not moved on every transfer: when it fires at a stale
    /// deadline it is re-armed at `last_activity + idle`, so a busy tunnel
    /// costs one timer update per idle period, not one per chunk.
    fn idle_expired(&mut self, cx: &mut TaskContext<'_>, idle: Duration) -> bool {
        let deadline = self.last_activity + idle;
        let timer = self.idle_timer.get_or_insert_with(|| sleep_until(deadline));
        if timer.deadline() > deadline {
            timer.reset(deadline); // the timeout was shortened
        }
        loop {
            if Pin::new(&mut *timer).poll(cx).is_pending() {
                return false;
            }
            if timer.deadline() >= deadline {
                return true;
            }
            timer.reset(deadline);
        }
    }
}

impl<S: Stage + Unpin> Future for Relay<'_, S> {
    type Output = RelayOutcome;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<RelayOutcome> {
        let this = self.get_mut();
        if this.ctl.is_stopped() {
            return this.outcome(RelayEnd::Stopped);
        }
        this.ctl.register(cx.waker());
        let (before_ab, before_ba) = (this.a_to_b, this.b_to_a);
        let ab = match this.ab.poll(cx, this.a, this.b, this.ctl, &mut this.a_to_b) {
            Ok(step) => step,
            Err(end) => return this.outcome(end),
        };
        let ba = match this.ba.poll(cx, this.b, this.a, this.ctl, &mut this.b_to_a) {
            Ok(step) => step,
            Err(end) => return this.outcome(end),
        };
        if matches!((&ab, &ba), (Step::Done, Step::Done)) {
            return this.outcome(RelayEnd::Closed);
        }
        // A hook may have stopped the relay.
        if this.ctl.is_stopped() {
            return this.outcome(RelayEnd::Stopped);
        }
        if let Some(idle) = this.ctl.inner.idle_timeout.get() {
            if (this.a_to_b, this.b_to_a) != (before_ab, before_ba) {
                this.last_activity = Instant::now();
            }
            if this.idle_expired(cx, idle) {
                return this.outcome(RelayEnd::Idle);
            }
        }
        if matches!(ab, Step::Yield) || matches!(ba, Step::Yield) {
            // Run again after the ring is looked at, not before.
            coop::defer(cx.waker());
        }
        Poll::Pending
    }
}

/// Relays `a` ⇄ `b` with `splice(2)` through pipes from `pipes` until both
/// directions ended (EOF forwarded each way), a socket fails, the idle
/// timeout passes, or `ctl.stop()`.
///
/// Half-close: EOF from one side is forwarded as `shutdown(SHUT_WR)` to the
/// other once everything read before it was delivered; the other direction
/// keeps running. The sockets are borrowed and stay open. Bytes the caller
/// already read (e.g. after a CONNECT head) must be flushed with
/// [`TcpStream::write_all`] first. Dropping the future is sound: pending
/// polls are cancelled, pipes holding bytes are closed.
///
/// The process must not die of `SIGPIPE` (Rust binaries ignore it by
/// default): `splice` into a reset socket has no `MSG_NOSIGNAL`.
pub async fn relay(a: &TcpStream, b: &TcpStream, pipes: &PipePool, ctl: &RelayCtl) -> RelayOutcome {
    let stage = || AutoStage {
        pipe: PipeStage {
            pool: pipes,
            pipe: None,
            staged: 0,
            asked: 0,
        },
        buf: None,
        start: 0,
        end: 0,
        splice: false,
    };
    run(a, b, ctl, stage(), stage()).await
}

/// [`relay`] with `recv`/`send` through two userspace buffers of
/// `buf_size` bytes (clamped to 4 KiB..=1 MiB), for comparison with splice.
pub async fn copy_relay(
    a: &TcpStream,
    b: &TcpStream,
    buf_size: usize,
    ctl: &RelayCtl,
) -> RelayOutcome {
    let buf_size = buf_size.clamp(4096, 1 << 20);
    let stage = || BufStage {
        buf: vec![0; buf_size].into_boxed_slice(),
        start: 0,
        end: 0,
    };
    run(a, b, ctl, stage(), stage()).await
}

fn run<'a, S: Stage + Unpin>(
    a: &'a TcpStream,
    b: &'a TcpStream,
    ctl: &'a RelayCtl,
    ab: S,
    ba: S,
) -> Relay<'a, S> {
    Relay {
        a,
        b,
        ctl,
        ab: Half::new(Direction::AToB, ab),
        ba: Half::new(Direction::BToA, ba),
        a_to_b: 0,
        b_to_a: 0,
        last_activity: Instant::now(),
        idle_timer: None,
    }
}
