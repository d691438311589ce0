//! TCP sockets on the ring: a multishot-accepting listener and a stream whose
//! reads and writes try the syscall first and wait for readiness on EAGAIN.
//!
//! Readiness waits are `POLL_ADD` ops; reads and writes are plain
//! non-blocking syscalls into borrowed buffers, so every future here is
//! cancel-safe: the kernel never holds a pointer to the caller's buffer.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::op::{Op, ready, ready_gatherable};
use crate::sys;

const POLLIN: u32 = libc::POLLIN as u32;
const POLLOUT: u32 = libc::POLLOUT as u32;

/// A listening socket whose connections arrive through one multishot accept.
#[derive(Debug)]
pub struct TcpListener {
    inner: std::net::TcpListener,
    /// The multishot accept, armed by the first `accept` and kept across
    /// calls, so connections the kernel accepts between two calls queue in
    /// its slot instead of needing a new op each.
    accept_op: RefCell<Option<Op>>,
}

impl TcpListener {
    /// Binds with `SO_REUSEADDR` and `SO_REUSEPORT` (one listener per worker
    /// on the same port; the kernel spreads connections) and listens.
    pub fn bind(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        socket.listen(backlog)?;
        Ok(TcpListener {
            inner: socket.into(),
            accept_op: RefCell::new(None),
        })
    }

    /// Adopts a listener bound elsewhere (e.g. inherited); makes it non-blocking.
    pub fn from_std(listener: std::net::TcpListener) -> io::Result<TcpListener> {
        listener.set_nonblocking(true)?;
        Ok(TcpListener {
            inner: listener,
            accept_op: RefCell::new(None),
        })
    }

    /// The next connection, as a non-blocking stream and its peer address.
    ///
    /// Cancel-safe: dropping the future loses no connection (they stay queued
    /// in the listener's multishot op). Accept from one task at a time; a
    /// second concurrent caller may not be woken. Errors (`EMFILE`,
    /// `ECONNABORTED`, ...) end the multishot op; the next call re-arms it.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        std::future::poll_fn(|cx| {
            if crate::coop::poll_proceed(cx).is_pending() {
                return Poll::Pending;
            }
            let mut slot = self.accept_op.borrow_mut();
            loop {
                let op = match &mut *slot {
                    Some(op) => op,
                    None => slot.insert(Op::accept_multi(self.inner.as_raw_fd())?),
                };
                match op.poll_next(cx) {
                    Poll::Pending => return Poll::Pending,
                    // The kernel ended the multishot (e.g. after an error): re-arm.
                    Poll::Ready(None) => *slot = None,
                    Poll::Ready(Some(c)) => {
                        let Some(fd) = c.fd else {
                            return Poll::Ready(Err(c.into_result().err().unwrap_or_else(|| {
                                io::Error::other("accept completed without a descriptor")
                            })));
                        };
                        let stream = std::net::TcpStream::from(fd);
                        // A peer that already reset has no address; skip it.
                        if let Ok(peer) = stream.peer_addr() {
                            return Poll::Ready(Ok((TcpStream { inner: stream }, peer)));
                        }
                    }
                }
            }
        })
        .await
    }

    /// The bound address (with the actual port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

impl AsRawFd for TcpListener {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl AsFd for TcpListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

/// A connected, non-blocking TCP socket. Closed on drop.
#[derive(Debug)]
pub struct TcpStream {
    inner: std::net::TcpStream,
}

impl TcpStream {
    /// Connects to `addr` from a fresh non-blocking socket with
    /// `TCP_NODELAY`. With `bind_ip`, binds that source address first, with
    /// `IP_BIND_ADDRESS_NO_PORT` so the port is chosen at connect time (the
    /// same port can then serve many destinations).
    ///
    /// Cancel-safe: dropping the future cancels the wait and closes the socket.
    pub async fn connect(addr: SocketAddr, bind_ip: Option<IpAddr>) -> io::Result<TcpStream> {
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )?;
        socket.set_tcp_nodelay(true)?;
        if let Some(ip) = bind_ip {
            sys::set_bind_address_no_port(socket.as_fd())?;
            socket.bind(&SocketAddr::new(ip, 0).into())?;
        }
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                ready(socket.as_raw_fd(), POLLOUT).await?;
                if let Some(e) = socket.take_error()? {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
        Ok(TcpStream {
            inner: socket.into(),
        })
    }

    /// Adopts a connected std stream; makes it non-blocking.
    pub fn from_std(stream: std::net::TcpStream) -> io::Result<TcpStream> {
        stream.set_nonblocking(true)?;
        Ok(TcpStream { inner: stream })
    }

    /// Adopts one end of a connected Unix stream socket pair, which then
    /// reads, writes, splices and half-closes like a TCP socket (an agent
    /// stream's end on the gateway); makes it non-blocking. Its addresses
    /// are not IP addresses: `peer_addr`/`local_addr` return errors.
    pub fn from_unix(stream: std::os::unix::net::UnixStream) -> io::Result<TcpStream> {
        stream.set_nonblocking(true)?;
        Ok(TcpStream {
            inner: std::net::TcpStream::from(std::os::fd::OwnedFd::from(stream)),
        })
    }

    /// Gives the socket back as a std stream (still non-blocking).
    pub fn into_std(self) -> std::net::TcpStream {
        self.inner
    }

    /// Waits until the socket is readable (data, EOF or an error pending).
    pub async fn readable(&self) -> io::Result<()> {
        ready(self.inner.as_raw_fd(), POLLIN).await.map(drop)
    }

    /// Waits until the socket is writable (or an error is pending).
    pub async fn writable(&self) -> io::Result<()> {
        ready(self.inner.as_raw_fd(), POLLOUT).await.map(drop)
    }

    /// One non-blocking `recv`: `WouldBlock` when nothing is available.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.inner).read(buf)
    }

    /// One non-blocking `send`: `WouldBlock` when the send buffer is full.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.inner).write(buf)
    }

    /// One non-blocking `writev`/`sendmsg` of several buffers in order:
    /// `WouldBlock` when the send buffer is full.
    pub fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&self.inner).write_vectored(bufs)
    }

    /// Reads what is available (at least one byte, or 0 at EOF): tries
    /// `recv` first and waits for readability only on EAGAIN. Cancel-safe.
    /// Spends one operation of the task's budget: a task that has spent it
    /// yields here once, even if bytes are waiting.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        crate::coop::proceed().await;
        loop {
            match self.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                res => return res,
            }
        }
    }

    /// Writes some of `buf` (at least one byte unless `buf` is empty).
    /// Cancel-safe: if dropped, nothing was written by the pending wait.
    /// Spends one operation of the task's budget, as [`TcpStream::read`].
    pub async fn write(&self, buf: &[u8]) -> io::Result<usize> {
        crate::coop::proceed().await;
        loop {
            match self.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                res => return res,
            }
        }
    }

    /// Writes all of `buf`. If the future is dropped midway, an unknown
    /// prefix of `buf` has been written (as with any partial write).
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write(buf).await? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => buf = &buf[n..],
            }
        }
        Ok(())
    }

    /// Sends FIN (`shutdown(SHUT_WR)`); reading stays possible.
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.inner.shutdown(Shutdown::Write)
    }

    /// The remote address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.peer_addr()
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Sets `TCP_NODELAY` (set by default on streams from [`TcpStream::connect`]).
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.inner.set_nodelay(nodelay)
    }

    /// A socket2 view, for options this type does not wrap (keepalive, buffers).
    pub fn socket(&self) -> SockRef<'_> {
        SockRef::from(&self.inner)
    }
}

impl AsRawFd for TcpStream {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl AsFd for TcpStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl From<TcpStream> for OwnedFd {
    fn from(stream: TcpStream) -> OwnedFd {
        stream.inner.into()
    }
}

/// A non-blocking UDP socket: readiness on the ring, datagrams moved by
/// `recvfrom`/`sendto` (or `recvmmsg`/`sendmmsg`, many at once) on borrowed
/// buffers (the kernel never holds a
/// pointer into user memory). Closed on drop.
#[derive(Debug)]
pub struct UdpSocket {
    inner: std::net::UdpSocket,
    /// A GSO send failed on this socket: send datagrams one by one.
    pub(crate) no_gso: AtomicBool,
}

impl UdpSocket {
    /// Binds `addr` (port 0: the kernel picks) on a fresh non-blocking socket.
    pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::DGRAM.nonblocking().cloexec(),
            Some(Protocol::UDP),
        )?;
        if addr.is_ipv6() {
            socket.set_only_v6(false)?;
        }
        socket.bind(&addr.into())?;
        Ok(UdpSocket {
            inner: socket.into(),
            no_gso: AtomicBool::new(false),
        })
    }

    /// The address it is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Waits until a datagram (or an error) is pending.
    pub async fn readable(&self) -> io::Result<()> {
        ready_gatherable(self.inner.as_raw_fd(), POLLIN)
            .await
            .map(drop)
    }

    /// Waits until a datagram can be queued.
    pub async fn writable(&self) -> io::Result<()> {
        ready(self.inner.as_raw_fd(), POLLOUT).await.map(drop)
    }

    /// One pending datagram and its sender, or `WouldBlock`. A datagram
    /// longer than `buf` is cut to it (give 64 KiB to take any).
    pub fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.inner.recv_from(buf)
    }

    /// Queues one datagram to `to`, or `WouldBlock` when the socket's
    /// buffer is full.
    pub fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.inner.send_to(buf, to)
    }

    /// Up to `got.len()` pending datagrams (at most [`UdpSocket::BATCH`])
    /// with one `recvmmsg`: datagram `i` lands in `buf[i * stride + at..(i
    /// + 1) * stride]` (cut to it: give 64 KiB to take any) and `got[i]` is
    /// its length and sender. How many were taken (fewer than asked: the
    /// socket is drained); `WouldBlock` when none was pending.
    pub fn try_recv_many(
        &self,
        buf: &mut [u8],
        stride: usize,
        at: usize,
        got: &mut [(usize, SocketAddr)],
    ) -> io::Result<usize> {
        sys::recvmmsg(self.inner.as_fd(), buf, stride, at, got)
    }

    /// Queues datagrams in order with one `sendmmsg`: `(start, len, to)`
    /// sends `buf[start..start + len]` to `to`; at most
    /// [`UdpSocket::BATCH`] are tried. How many were queued (at least one:
    /// the next one, if any, could not be, and calling again says why);
    /// the error of the first when it could not be queued.
    ///
    /// A run of datagrams of one size (up to 1,452 bytes) to one address
    /// goes as one UDP GSO send (the kernel cuts it into the datagrams:
    /// one pass through routing and the IP layer for the run; receivers
    /// see the same datagrams); a socket whose path refuses GSO sends one
    /// by one from then on.
    pub fn try_send_many(
        &self,
        buf: &[u8],
        out: &[(usize, usize, SocketAddr)],
    ) -> io::Result<usize> {
        let fd = self.inner.as_fd();
        if self.no_gso.load(Ordering::Relaxed) {
            return sys::sendmmsg(fd, buf, out, false);
        }
        match sys::sendmmsg(fd, buf, out, true) {
            // The first message was a run, and the path cannot take it:
            // no checksum offload on the way (EIO), a path MTU below the
            // run's size (EINVAL), or a kernel without UDP GSO.
            Err(e)
                if sys::gso_run(out) > 1
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
                    ) =>
            {
                self.no_gso.store(true, Ordering::Relaxed);
                sys::sendmmsg(fd, buf, out, false)
            }
            r => r,
        }
    }

    /// Most datagrams [`UdpSocket::try_recv_many`] and
    /// [`UdpSocket::try_send_many`] move in one call.
    pub const BATCH: usize = sys::MMSG_MAX;

    /// Sends one datagram to `to`, waiting while the socket's buffer is full.
    pub async fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        loop {
            match self.inner.send_to(buf, to) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                r => return r,
            }
        }
    }
}

impl AsRawFd for UdpSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

/// One end of a connected Unix datagram socket pair (a worker's side of an
/// agent's UDP association): whole messages, readiness on the ring,
/// non-blocking `recv`/`send` on borrowed buffers. Closed on drop.
#[derive(Debug)]
pub struct UnixDatagram {
    inner: std::os::unix::net::UnixDatagram,
}

impl UnixDatagram {
    /// Adopts a connected end; makes it non-blocking.
    pub fn from_std(inner: std::os::unix::net::UnixDatagram) -> io::Result<UnixDatagram> {
        inner.set_nonblocking(true)?;
        Ok(UnixDatagram { inner })
    }

    /// Waits until a message (or an error) is pending.
    pub async fn readable(&self) -> io::Result<()> {
        ready_gatherable(self.inner.as_raw_fd(), POLLIN)
            .await
            .map(drop)
    }

    /// One pending message, or `WouldBlock`.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.recv(buf)
    }

    /// Queues one message, or `WouldBlock` when the peer's queue is full.
    pub fn try_send(&self, buf: &[u8]) -> io::Result<usize> {
        self.inner.send(buf)
    }
}
