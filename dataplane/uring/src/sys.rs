//! The crate's one door to the kernel: every raw syscall and every SQE push.
//!
//! Everything `unsafe` in the crate lives in this file. Each helper is a thin,
//! safe wrapper whose argument types make the call sound (borrowed fds are open
//! for the duration of the call, slices bound the lengths). Submission entries
//! are built here too, and only from constructors that carry **no pointer into
//! user memory** (poll, multishot accept without an address, cancel): the kernel
//! therefore never writes into our memory except the CQ ring, which is what
//! makes dropping an in-flight op trivially sound.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

/// `IP_BIND_ADDRESS_NO_PORT` from `<linux/in.h>`; neither libc nor socket2 export it.
const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;

/// Turns a libc `-1`-means-error return into an `io::Result`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The submission queue is full even after a submit; the caller must reap
/// completions (the kernel may be holding back on a CQ overflow) and retry.
#[derive(Debug)]
pub(crate) struct SqFull;

/// How a ring runs the kernel's task work (the completion side of a poll
/// or an accept), best first. Each tier needs a newer kernel than the next.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RingSetup {
    /// `DEFER_TASKRUN` + `SINGLE_ISSUER` (Linux 6.1): completions are run
    /// only when the worker enters the ring to look for them, in one batch,
    /// never by interrupting it (the `TASKRUN` flag tells it they wait).
    #[default]
    DeferTaskrun,
    /// `COOP_TASKRUN` + `TASKRUN_FLAG` + `SINGLE_ISSUER` (Linux 6.0): no
    /// interrupt to run task work; it runs at the worker's next syscall.
    CoopSingleIssuer,
    /// `COOP_TASKRUN` + `TASKRUN_FLAG` (Linux 5.19).
    Coop,
    /// None of these: task work may interrupt the worker (an IPI).
    Plain,
}

impl RingSetup {
    fn next(self) -> RingSetup {
        match self {
            RingSetup::DeferTaskrun => RingSetup::CoopSingleIssuer,
            RingSetup::CoopSingleIssuer => RingSetup::Coop,
            RingSetup::Coop | RingSetup::Plain => RingSetup::Plain,
        }
    }

    /// The name the worker's start-up log line gives.
    pub fn as_str(self) -> &'static str {
        match self {
            RingSetup::DeferTaskrun => "defer_taskrun",
            RingSetup::CoopSingleIssuer => "coop_taskrun_single_issuer",
            RingSetup::Coop => "coop_taskrun",
            RingSetup::Plain => "plain",
        }
    }
}

/// One io_uring instance. Only pointer-free entries can be pushed into it.
pub(crate) struct Ring {
    ring: IoUring,
    setup: RingSetup,
    /// The kernel can wait for a batch of completions for a bounded time
    /// (`IORING_FEAT_MIN_TIMEOUT`, Linux 6.12).
    min_timeout: bool,
    /// Tests: this many more pushes fail as if the queue stayed full after
    /// a submit (the kernel holding back, e.g. on a CQ overflow).
    #[cfg(test)]
    refuse_pushes: usize,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("fd", &self.ring.as_raw_fd())
            .finish()
    }
}

impl Ring {
    /// Creates a ring with `entries` SQ slots and `cq_entries` CQ slots
    /// (`IORING_SETUP_CQSIZE`; at least `entries`; both clamped to the
    /// kernel's maximum rather than refused), in task work mode `first`
    /// ([`RingSetup`]) or, on a kernel that refuses it, the best tier
    /// below it that the kernel accepts.
    pub(crate) fn with_setup(entries: u32, cq_entries: u32, first: RingSetup) -> io::Result<Ring> {
        let cq = cq_entries.max(entries);
        let mut tier = first;
        loop {
            let mut builder = IoUring::builder();
            builder.setup_cqsize(cq).setup_clamp();
            match tier {
                RingSetup::DeferTaskrun => {
                    builder
                        .setup_defer_taskrun()
                        .setup_single_issuer()
                        .setup_taskrun_flag();
                }
                RingSetup::CoopSingleIssuer => {
                    builder
                        .setup_coop_taskrun()
                        .setup_taskrun_flag()
                        .setup_single_issuer();
                }
                RingSetup::Coop => {
                    builder.setup_coop_taskrun().setup_taskrun_flag();
                }
                RingSetup::Plain => {}
            }
            match builder.build(entries) {
                Ok(ring) => {
                    return Ok(Ring {
                        min_timeout: ring.params().is_feature_min_timeout(),
                        ring,
                        setup: tier,
                        #[cfg(test)]
                        refuse_pushes: 0,
                    });
                }
                // EINVAL: a flag this kernel does not know; try the next tier.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && tier != RingSetup::Plain => {
                    tier = tier.next();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The task work mode this ring was set up with.
    pub(crate) fn setup(&self) -> RingSetup {
        self.setup
    }

    /// Tests: the ring's descriptor.
    #[cfg(test)]
    pub(crate) fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Tests: make the next `n` pushes fail with [`SqFull`] (each still
    /// enters the kernel once, as a real full queue does).
    #[cfg(test)]
    pub(crate) fn refuse_pushes(&mut self, n: usize) {
        self.refuse_pushes = n;
    }

    /// Pushes a one-shot (or multishot) `POLL_ADD` on `fd` for `events`.
    pub(crate) fn push_poll(
        &mut self,
        fd: RawFd,
        events: u32,
        multi: bool,
        user_data: u64,
    ) -> Result<(), SqFull> {
        let entry = opcode::PollAdd::new(types::Fd(fd), events)
            .multi(multi)
            .build()
            .user_data(user_data);
        self.push(&entry)
    }

    /// Pushes a multishot `ACCEPT` on `fd`; accepted sockets are created
    /// non-blocking and close-on-exec. No address buffer is passed.
    pub(crate) fn push_accept_multi(&mut self, fd: RawFd, user_data: u64) -> Result<(), SqFull> {
        let entry = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data);
        self.push(&entry)
    }

    /// Pushes an `ASYNC_CANCEL` of the request tagged `target`.
    pub(crate) fn push_cancel(&mut self, target: u64, user_data: u64) -> Result<(), SqFull> {
        let entry = opcode::AsyncCancel::new(target)
            .build()
            .user_data(user_data);
        self.push(&entry)
    }

    fn push(&mut self, entry: &squeue::Entry) -> Result<(), SqFull> {
        #[cfg(test)]
        if self.refuse_pushes > 0 {
            self.refuse_pushes -= 1;
            let _ = self.ring.submit();
            return Err(SqFull);
        }
        for _ in 0..2 {
            // SAFETY: every entry reaching here comes from the constructors above,
            // which take only fds and integers: the kernel is given no pointer to
            // user memory, so no buffer has to outlive the request.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            // Full: hand what is queued to the kernel and try once more.
            if self.ring.submit().is_err() {
                break;
            }
        }
        Err(SqFull)
    }

    /// Submits queued entries without waiting. Skips the syscall when there
    /// is nothing to submit and the kernel signals no pending completions.
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        let sq = self.ring.submission();
        if sq.is_empty() && !sq.cq_overflow() && !sq.taskrun() {
            return Ok(());
        }
        drop(sq);
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e) if benign_enter_error(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether [`Ring::submit_and_wait`] can gather completions (the
    /// kernel has `IORING_FEAT_MIN_TIMEOUT`).
    pub(crate) fn can_gather(&self) -> bool {
        self.min_timeout
    }

    /// Submits queued entries and waits for at least one completion, or until
    /// `timeout` passes (`None`: no limit). Timeouts and signals are not errors.
    ///
    /// With `gather = Some((d, want))` (`d` > 0, `want` > 1, only on a
    /// kernel that [can](Ring::can_gather)), the wait first lasts until `want` completions are there or `d` has
    /// passed, and only then ends on the first: completions arriving within
    /// `d` of each other are taken with one wake. `d` should not exceed
    /// `timeout`. (Without a timeout the kernel would end the wait at `d`
    /// even with nothing completed, a wasted wake: a gathered wait is given
    /// one of [`GATHER_IDLE_LIMIT`].)
    pub(crate) fn submit_and_wait(
        &mut self,
        timeout: Option<Duration>,
        gather: Option<(Duration, usize)>,
    ) -> io::Result<()> {
        debug_assert!(gather.is_none() || self.min_timeout);
        let res = match (timeout, gather) {
            (None, None) => self.ring.submit_and_wait(1),
            (timeout, gather) => {
                let mut args = types::SubmitArgs::new();
                let mut want = 1;
                if let Some((d, w)) = gather {
                    let usec = u32::try_from(d.as_micros()).unwrap_or(u32::MAX).max(1);
                    args = args.min_wait_usec(usec);
                    want = w;
                }
                let submitter = self.ring.submitter();
                let timeout = timeout.or(gather.map(|_| GATHER_IDLE_LIMIT));
                match timeout {
                    Some(t) => {
                        let ts = types::Timespec::new()
                            .sec(t.as_secs())
                            .nsec(t.subsec_nanos());
                        submitter.submit_with_args(want, &args.timespec(&ts))
                    }
                    None => submitter.submit_with_args(want, &args),
                }
            }
        };
        match res {
            Ok(_) => Ok(()),
            Err(e) if benign_enter_error(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The sizes the kernel gave the queues: `(sq, cq)`.
    pub(crate) fn sizes(&self) -> (u32, u32) {
        let params = self.ring.params();
        (params.sq_entries(), params.cq_entries())
    }

    /// The kernel is holding completions back because the CQ was full
    /// (`IORING_SQ_CQ_OVERFLOW`); they reach the CQ at the next enter.
    pub(crate) fn cq_backlogged(&mut self) -> bool {
        self.ring.submission().cq_overflow()
    }

    /// The kernel's count of completions it had to drop (the CQ was full
    /// and it could not even buffer them).
    pub(crate) fn cq_dropped(&mut self) -> u32 {
        self.ring.completion().overflow()
    }

    /// The completion queue, for the driver to drain.
    pub(crate) fn completions(&mut self) -> cqueue::CompletionQueue<'_> {
        self.ring.completion()
    }
}

/// The timeout a gathered wait is given when the caller set none: with no
/// timeout the kernel ends a minimum wait at its end, completions or not.
const GATHER_IDLE_LIMIT: Duration = Duration::from_secs(60);

/// `io_uring_enter` results that just mean "look at the CQ and go on":
/// the wait timed out, a signal arrived, or completions are backed up.
fn benign_enter_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
    )
}

/// Tests: makes descriptor `fd` refer to `/dev/null` (`dup2`), so that the
/// object behind it (a ring) fails every later syscall made through it.
#[cfg(test)]
pub(crate) fn clobber_fd(fd: RawFd) -> io::Result<()> {
    let null = std::fs::File::open("/dev/null")?;
    // SAFETY: dup2 takes integers; `null` is open for the call, and `fd`
    // stays owned by its owner, which closes it (now /dev/null) as before.
    cvt(unsafe { libc::dup2(null.as_raw_fd(), fd) })?;
    Ok(())
}

/// Takes ownership of a descriptor the kernel just created for us.
///
/// # Safety
/// `fd` must be an open descriptor that nothing else owns or will close
/// (e.g. the result of an accept CQE, consumed exactly once).
pub(crate) unsafe fn adopt_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller guarantees `fd` is open and exclusively ours.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `splice(2)` of up to `len` bytes between a pipe and another descriptor,
/// non-blocking on both ends.
pub(crate) fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are borrowed, hence open for the call; null
    // offsets are valid for pipes and sockets; no user memory is passed.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A non-blocking, close-on-exec pipe: `(read end, write end)`.
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid, writable array of two ints as pipe2 requires.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by no one else.
    Ok(unsafe { (adopt_fd(fds[0]), adopt_fd(fds[1])) })
}

/// Asks for a pipe capacity of `size` bytes (`F_SETPIPE_SZ`); returns the
/// capacity the pipe now has, whether or not the request was granted.
pub(crate) fn set_pipe_size(fd: BorrowedFd<'_>, size: usize) -> usize {
    let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: fcntl on a borrowed (open) fd with integer arguments only.
    let set = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
    if set > 0 {
        return set as usize;
    }
    // SAFETY: as above; F_GETPIPE_SZ takes no argument.
    let got = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if got > 0 { got as usize } else { 64 * 1024 }
}

/// A non-blocking, close-on-exec eventfd with a zero count.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes integers only.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: eventfd succeeded, the descriptor is new and owned by no one else.
    Ok(unsafe { adopt_fd(fd) })
}

/// Adds one to an eventfd's count (makes it readable). Never blocks: a
/// saturated counter (EAGAIN) is already readable, which is all we need.
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local u64 to a borrowed, open fd.
    let _ = unsafe {
        libc::write(
            fd.as_raw_fd(),
            (&one as *const u64).cast::<libc::c_void>(),
            std::mem::size_of::<u64>(),
        )
    };
}

/// Resets an eventfd's count to zero (non-blocking; EAGAIN means already zero).
pub(crate) fn eventfd_drain(fd: BorrowedFd<'_>) {
    let mut count: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live, writable local u64.
    let _ = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut count as *mut u64).cast::<libc::c_void>(),
            std::mem::size_of::<u64>(),
        )
    };
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` so that binding a source IP before connect
/// defers port choice to connect time (4-tuple sharing of ephemeral ports).
pub(crate) fn set_bind_address_no_port(fd: BorrowedFd<'_>) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: passes a pointer to a live c_int and its exact size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IP,
            IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Pins the calling thread to one CPU (`sched_setaffinity`).
pub(crate) fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` < CPU_SETSIZE was checked above, so CPU_SET stays in bounds.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 = calling thread; `set` is a live cpu_set_t of the given size.
    cvt(unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) })?;
    Ok(())
}

/// Block `signals` in the calling thread; returns the set.
pub(crate) fn block_signals(signals: &[i32]) -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in signals {
        // SAFETY: `set` was initialised by sigemptyset; `s` is checked by the kernel call.
        if unsafe { libc::sigaddset(&mut set, s) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

/// Wait for a signal of `set` for at most `timeout`.
pub(crate) fn wait_signal(
    set: &libc::sigset_t,
    timeout: std::time::Duration,
) -> io::Result<Option<i32>> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` and `ts` are valid for the call; a null siginfo pointer is allowed.
    let rc = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    if rc >= 0 {
        return Ok(Some(rc));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
        _ => Err(err),
    }
}

/// `clock_gettime(CLOCK_MONOTONIC)` in microseconds.
pub(crate) fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// Most datagrams one [`recvmmsg`] or [`sendmmsg`] call moves.
pub(crate) const MMSG_MAX: usize = 64;

/// Room for the address of a UDP peer (IPv4 or IPv6).
#[repr(C)]
#[derive(Clone, Copy)]
union SockAddrIn {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

const SOCKADDR_IN_LEN: libc::socklen_t = std::mem::size_of::<SockAddrIn>() as libc::socklen_t;

fn sockaddr_in(addr: &SocketAddr) -> (SockAddrIn, libc::socklen_t) {
    match addr {
        SocketAddr::V4(a) => (
            SockAddrIn {
                v4: libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                },
            },
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ),
        SocketAddr::V6(a) => (
            SockAddrIn {
                v6: libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                },
            },
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        ),
    }
}

/// The address the kernel wrote into `sa` (`len` bytes of it), if it is
/// an IPv4 or IPv6 one.
fn socket_addr(sa: &std::mem::MaybeUninit<SockAddrIn>, len: libc::socklen_t) -> Option<SocketAddr> {
    let family_len = std::mem::size_of::<libc::sa_family_t>() as libc::socklen_t;
    if len < family_len {
        return None;
    }
    // SAFETY: the kernel wrote `len` ≥ 2 bytes from the start, and every
    // member of the union begins with its family.
    let family = unsafe { sa.as_ptr().cast::<libc::sa_family_t>().read() };
    match i32::from(family) {
        libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the kernel wrote a whole `sockaddr_in` (checked above).
            let a = unsafe { sa.assume_init_ref().v4 };
            Some(SocketAddr::new(
                Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes()).into(),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the kernel wrote a whole `sockaddr_in6` (checked above).
            let a = unsafe { sa.assume_init_ref().v6 };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// `recvmmsg(2)`, non-blocking, of up to `got.len()` (at most [`MMSG_MAX`],
/// and as many as `buf` has slots) datagrams: datagram `i` is written to
/// `buf[i * stride + at..(i + 1) * stride]` and described in `got[i]`
/// (length and sender; a sender that is not an IP address reads as
/// `0.0.0.0:0`). How many were taken; `WouldBlock` when none was pending.
pub(crate) fn recvmmsg(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    stride: usize,
    at: usize,
    got: &mut [(usize, SocketAddr)],
) -> io::Result<usize> {
    assert!(at < stride, "the offset lies inside a slot");
    let n = got.len().min(MMSG_MAX).min(buf.len() / stride);
    if n == 0 {
        return Ok(0);
    }
    let mut names = [std::mem::MaybeUninit::<SockAddrIn>::uninit(); MMSG_MAX];
    let mut iovs = [std::mem::MaybeUninit::<libc::iovec>::uninit(); MMSG_MAX];
    let mut hdrs = [std::mem::MaybeUninit::<libc::mmsghdr>::uninit(); MMSG_MAX];
    // Every slot's pointer comes from this one, so no slot's borrow
    // invalidates another's.
    let base = buf.as_mut_ptr();
    for i in 0..n {
        iovs[i].write(libc::iovec {
            iov_base: base.wrapping_add(i * stride + at).cast(),
            iov_len: stride - at,
        });
        // SAFETY: `msghdr` is plain data; all-zero is a valid (empty) one.
        let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
        h.msg_name = names[i].as_mut_ptr().cast();
        h.msg_namelen = SOCKADDR_IN_LEN;
        h.msg_iov = iovs[i].as_mut_ptr();
        h.msg_iovlen = 1;
        hdrs[i].write(libc::mmsghdr {
            msg_hdr: h,
            msg_len: 0,
        });
    }
    // SAFETY: the descriptor is borrowed (open for the call); the first
    // `n` headers are initialised, each pointing at its own name buffer of
    // the size it says and one iovec inside `buf` (`n * stride ≤ buf.len()`,
    // `at < stride`), all of which outlive the call; the kernel keeps no
    // pointer after it returns.
    let r = unsafe {
        libc::recvmmsg(
            fd.as_raw_fd(),
            hdrs.as_mut_ptr().cast::<libc::mmsghdr>(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    let r = cvt(r)? as usize;
    let unspecified = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0);
    for i in 0..r {
        // SAFETY: written above, before the call.
        let h = unsafe { hdrs[i].assume_init_ref() };
        got[i] = (
            h.msg_len as usize,
            socket_addr(&names[i], h.msg_hdr.msg_namelen).unwrap_or(unspecified),
        );
    }
    Ok(r)
}

/// `UDP_SEGMENT` from `<linux/udp.h>`: a cmsg (level `SOL_UDP`) asking the
/// kernel to cut one send into datagrams of the given size (UDP GSO).
const UDP_SEGMENT: libc::c_int = 103;

/// Most datagrams one GSO send carries (the kernel's `UDP_MAX_SEGMENTS`
/// was 64 before 6.x).
const GSO_MAX_SEGMENTS: usize = 64;

/// Longest datagram sent as part of a GSO send: it must fit the path's MTU
/// whole (here a 1,500-byte path in IPv6: 1500 − 40 − 8). Longer ones go
/// alone.
const GSO_MAX_SIZE: usize = 1452;

/// Most payload bytes of one GSO send (a UDP datagram's limit, less room).
const GSO_MAX_BYTES: usize = 65_000;

/// A control message carrying the GSO segment size.
#[repr(C)]
#[derive(Clone, Copy)]
struct GsoCmsg {
    hdr: libc::cmsghdr,
    size: u16,
}

/// How many datagrams from the first of `out` on [`sendmmsg`] with `gso`
/// sends as one message: a run of one size (at most [`GSO_MAX_SIZE`]) to
/// one address, or just the first.
pub(crate) fn gso_run(out: &[(usize, usize, SocketAddr)]) -> usize {
    let Some(&(_, len, to)) = out.first() else {
        return 0;
    };
    let mut k = 1;
    if len > 0 && len <= GSO_MAX_SIZE {
        while k < out.len()
            && k < GSO_MAX_SEGMENTS
            && (k + 1) * len <= GSO_MAX_BYTES
            && out[k].1 == len
            && out[k].2 == to
        {
            k += 1;
        }
    }
    k
}

/// `sendmmsg(2)`, non-blocking, of up to [`MMSG_MAX`] datagrams in order:
/// `buf[start..start + len]` to `to` each. With `gso`, a run of datagrams
/// of one size (at most [`GSO_MAX_SIZE`]) to one address goes as one
/// message the kernel cuts into them (UDP GSO: one pass through routing
/// and the IP layer for the run). How many datagrams were queued (at
/// least one); an error when the first message could not be (the rest
/// were not tried).
pub(crate) fn sendmmsg(
    fd: BorrowedFd<'_>,
    buf: &[u8],
    out: &[(usize, usize, SocketAddr)],
    gso: bool,
) -> io::Result<usize> {
    let n = out.len().min(MMSG_MAX);
    if n == 0 {
        return Ok(0);
    }
    let mut names = [std::mem::MaybeUninit::<SockAddrIn>::uninit(); MMSG_MAX];
    let mut iovs = [std::mem::MaybeUninit::<libc::iovec>::uninit(); MMSG_MAX];
    let mut hdrs = [std::mem::MaybeUninit::<libc::mmsghdr>::uninit(); MMSG_MAX];
    let mut cmsgs = [std::mem::MaybeUninit::<GsoCmsg>::uninit(); MMSG_MAX];
    let mut counts = [0usize; MMSG_MAX];
    let (mut i, mut m) = (0, 0);
    while i < n {
        let (_, len, to) = out[i];
        let k = if gso { gso_run(&out[i..n]) } else { 1 };
        for (j, &(start, len, _)) in out[i..i + k].iter().enumerate() {
            let bytes = &buf[start..start + len];
            iovs[i + j].write(libc::iovec {
                // The kernel only reads through it (a send).
                iov_base: bytes.as_ptr().cast_mut().cast(),
                iov_len: bytes.len(),
            });
        }
        let (name, name_len) = sockaddr_in(&to);
        names[m].write(name);
        // SAFETY: `msghdr` is plain data; all-zero is a valid (empty) one.
        let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
        h.msg_name = names[m].as_mut_ptr().cast();
        h.msg_namelen = name_len;
        h.msg_iov = iovs[i].as_mut_ptr();
        h.msg_iovlen = k as _;
        if k > 1 {
            // SAFETY: `cmsghdr` is plain data; all-zero is a valid one.
            let mut c: libc::cmsghdr = unsafe { std::mem::zeroed() };
            c.cmsg_len = (std::mem::size_of::<libc::cmsghdr>() + 2) as _;
            c.cmsg_level = libc::SOL_UDP;
            c.cmsg_type = UDP_SEGMENT;
            cmsgs[m].write(GsoCmsg {
                hdr: c,
                size: len as u16,
            });
            h.msg_control = cmsgs[m].as_mut_ptr().cast();
            h.msg_controllen = std::mem::size_of::<GsoCmsg>() as _;
        }
        hdrs[m].write(libc::mmsghdr {
            msg_hdr: h,
            msg_len: 0,
        });
        counts[m] = k;
        m += 1;
        i += k;
    }
    // SAFETY: the descriptor is borrowed (open for the call); the first
    // `m` headers are initialised, each pointing at an initialised address
    // of the length it says, at its own run of initialised iovecs over
    // checked ranges of `buf`, and (for a run) at an initialised control
    // message of the length it says (the header, then the `u16` right
    // behind it, where CMSG_DATA points: the header is 8-byte aligned),
    // all of which outlive the call; the kernel only reads them.
    let r = unsafe {
        libc::sendmmsg(
            fd.as_raw_fd(),
            hdrs.as_mut_ptr().cast::<libc::mmsghdr>(),
            m as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    let r = cvt(r)? as usize;
    Ok(counts[..r].iter().sum())
}
