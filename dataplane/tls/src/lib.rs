//! TLS on the io_uring workers: rustls driven as a sans-IO state machine
//! over the ring's sockets, with no thread of its own.
//!
//! - [`Acceptor`]: the certificate and key (PEM), ALPN, resumption, reload.
//! - [`TlsStream`]: a handshake, then reads and writes of decrypted bytes,
//!   for the HTTP and SOCKS5 front ends inside TLS (and the agent listener).
//! - [`relay`]: a tunnel whose client side is TLS, with the same control,
//!   counters and half-close as the splice relay.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod acceptor;
pub mod cert;
mod relay;
mod stream;

#[cfg(test)]
mod tests;

pub use acceptor::{Acceptor, HANDSHAKE_FAILURE_ALERT, LoadError, ServerStream};
pub use relay::relay;
/// rustls, as this crate uses it (its types appear in this API).
pub use rustls;
pub use stream::{TlsStream, feed};
