//! The client's side of a connection: the socket as it came, or TLS over
//! it. The HTTP and SOCKS5 front ends speak to either the same way; only
//! the relay differs (splice in the clear, one copy inside TLS).

use std::io;
use std::time::Duration;

use splicegate_tls::ServerStream;
use splicegate_uring::{TcpStream, timeout};

/// What the front ends read from and write to.
pub(crate) trait Stream {
    /// Reads what is available (at least one byte, or 0 at the end).
    async fn read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Waits until a read would not wait.
    async fn readable(&self) -> io::Result<()>;
    /// Writes all of `bytes`.
    async fn write_all(&self, bytes: &[u8]) -> io::Result<()>;
}

impl Stream for TcpStream {
    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        TcpStream::read(self, buf).await
    }

    async fn readable(&self) -> io::Result<()> {
        TcpStream::readable(self).await
    }

    async fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        TcpStream::write_all(self, bytes).await
    }
}

/// A client connection.
pub(crate) enum Client {
    /// In the clear.
    Plain(TcpStream),
    /// Inside TLS, handshake done.
    Tls(Box<ServerStream>),
}

impl Client {
    /// No more bytes to the client: FIN (after close_notify inside TLS,
    /// written within 1 s or not at all).
    pub(crate) async fn shutdown_write(&self) {
        match self {
            Client::Plain(s) => {
                let _ = s.shutdown_write();
            }
            Client::Tls(t) => {
                if timeout(Duration::from_secs(1), t.shutdown()).await.is_err() {
                    let _ = t.tcp().shutdown_write();
                }
            }
        }
    }
}

impl Stream for Client {
    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Client::Plain(s) => s.read(buf).await,
            Client::Tls(t) => t.read(buf).await,
        }
    }

    async fn readable(&self) -> io::Result<()> {
        match self {
            Client::Plain(s) => s.readable().await,
            Client::Tls(t) => t.readable().await,
        }
    }

    async fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Client::Plain(s) => s.write_all(bytes).await,
            Client::Tls(t) => t.write_all(bytes).await,
        }
    }
}
