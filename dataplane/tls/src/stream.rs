//! A TLS connection driven on the ring: rustls is sans-IO (`read_tls`,
//! `process_new_packets`, `write_tls` on buffers), so this type only moves
//! its records between the rustls state and a non-blocking
//! [`TcpStream`], waiting on the ring when the socket would block. No
//! thread, no extra copy beyond the one TLS needs.
//!
//! Generic over the side (`rustls::ServerConnection` for the proxy port and
//! the agent listener, `rustls::ClientConnection` for the agent itself).
//! Every method takes `&self` and borrows the rustls state only between
//! awaits; one task uses a stream at a time (a handshake, then an HTTP or
//! SOCKS5 exchange, then [`crate::relay`]).

use std::cell::RefCell;
use std::fmt;
use std::io::{self, Read, Write};
use std::ops::{Deref, DerefMut};

use rustls::{ConnectionCommon, SideData};
use splicegate_uring::{TcpStream, consume_budget};

/// Reads from the socket without waiting (`WouldBlock` when empty).
pub(crate) struct TryRead<'a>(pub(crate) &'a TcpStream);

impl Read for TryRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

/// Writes to the socket without waiting (`WouldBlock` when full).
pub(crate) struct TryWrite<'a>(pub(crate) &'a TcpStream);

impl Write for TryWrite<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    /// rustls hands every queued record at once: one `writev` for all of
    /// them instead of a `send` per 16 KiB record.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A TLS connection over a ring socket.
pub struct TlsStream<C> {
    tcp: TcpStream,
    conn: RefCell<C>,
}

impl<C> fmt::Debug for TlsStream<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

/// A TLS failure as an `io::Error` (`InvalidData`), with rustls's words.
pub(crate) fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Hands `bytes` (records read from the peer) to `conn` and processes
/// them: the sans-IO part of [`TlsStream::feed`], fuzzed on its own.
pub fn feed<S: SideData>(conn: &mut ConnectionCommon<S>, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        if conn.read_tls(&mut bytes)? == 0 {
            break;
        }
        conn.process_new_packets().map_err(tls_error)?;
    }
    Ok(())
}

impl<C, S> TlsStream<C>
where
    C: Deref<Target = ConnectionCommon<S>> + DerefMut,
    S: SideData,
{
    /// Wraps `tcp` and the rustls connection `conn` (not yet handshaken).
    pub fn new(tcp: TcpStream, conn: C) -> TlsStream<C> {
        TlsStream {
            tcp,
            conn: RefCell::new(conn),
        }
    }

    /// The socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Runs `f` on the rustls connection (ALPN, handshake kind, SNI, …).
    pub fn with_conn<R>(&self, f: impl FnOnce(&mut C) -> R) -> R {
        f(&mut self.conn.borrow_mut())
    }

    /// Feeds records that were already read from the socket (a protocol
    /// sniff that saw the first bytes of a ClientHello). A record that does
    /// not parse is an error; its alert is queued for the next flush.
    pub fn feed(&self, bytes: &[u8]) -> io::Result<()> {
        feed(&mut self.conn.borrow_mut(), bytes)
    }

    /// Completes the handshake (the caller bounds it with a deadline). On
    /// a TLS error the alert rustls chose is sent before the error returns.
    pub async fn handshake(&self) -> io::Result<()> {
        loop {
            let (handshaking, wants_write, wants_read) = {
                let c = self.conn.borrow();
                (c.is_handshaking(), c.wants_write(), c.wants_read())
            };
            if wants_write {
                self.flush().await?;
                continue;
            }
            if !handshaking {
                return Ok(());
            }
            if !wants_read {
                return Err(io::Error::other("TLS handshake stalled"));
            }
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let processed = self.conn.borrow_mut().process_new_packets();
            if let Err(e) = processed {
                let _ = self.flush().await;
                return Err(tls_error(e));
            }
        }
    }

    /// Reads records from the socket into rustls until it took some bytes
    /// (waiting on the ring while the socket is empty); 0 at EOF.
    async fn fill(&self) -> io::Result<usize> {
        consume_budget().await;
        loop {
            let r = self.conn.borrow_mut().read_tls(&mut TryRead(&self.tcp));
            match r {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.tcp.readable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    /// Writes every record rustls has queued to the socket.
    pub async fn flush(&self) -> io::Result<()> {
        loop {
            let r = {
                let mut c = self.conn.borrow_mut();
                if !c.wants_write() {
                    return Ok(());
                }
                c.write_tls(&mut TryWrite(&self.tcp))
            };
            match r {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.tcp.writable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads decrypted bytes: at least one, or 0 at the end (close_notify,
    /// or the socket's EOF: many clients close without close_notify, and a
    /// truncation is no risk to a proxy that relays the bytes as they came).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let r = self.conn.borrow_mut().reader().read(buf);
            match r {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            // Session tickets, key updates and alerts go out before we wait.
            self.flush().await?;
            if self.fill().await? == 0 {
                // The socket's EOF: what is buffered is read first, then 0.
                let r = self.conn.borrow_mut().process_new_packets();
                r.map_err(tls_error)?;
                let r = self.conn.borrow_mut().reader().read(buf);
                return match r {
                    Ok(n) => Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
                    Err(_) => Ok(0),
                };
            }
            let processed = self.conn.borrow_mut().process_new_packets();
            if let Err(e) = processed {
                let _ = self.flush().await;
                return Err(tls_error(e));
            }
        }
    }

    /// Waits until [`TlsStream::read`] would not wait: decrypted bytes are
    /// buffered, or the socket has something.
    pub async fn readable(&self) -> io::Result<()> {
        if !self.conn.borrow().wants_read() {
            return Ok(());
        }
        self.tcp.readable().await
    }

    /// Encrypts and writes all of `bytes`.
    pub async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = self.conn.borrow_mut().writer().write(bytes)?;
            bytes = &bytes[n..];
            self.flush().await?;
        }
        Ok(())
    }

    /// After a failed handshake (its alert sent): FIN, then read and drop
    /// what the client still sends until its EOF or `within`, so that the
    /// close does not reset the connection and lose the alert before the
    /// client read it (a lingering close, as HAProxy and nginx do).
    pub async fn linger(&self, within: std::time::Duration) {
        let _ = self.tcp.shutdown_write();
        let deadline = std::time::Instant::now() + within;
        let mut sink = [0u8; 4096];
        while let Ok(Ok(n)) = splicegate_uring::timeout_at(deadline, self.tcp.read(&mut sink)).await
        {
            if n == 0 {
                break;
            }
        }
    }

    /// Sends close_notify, then FIN; reading stays possible.
    pub async fn shutdown(&self) -> io::Result<()> {
        self.conn.borrow_mut().send_close_notify();
        self.flush().await?;
        self.tcp.shutdown_write()
    }
}
