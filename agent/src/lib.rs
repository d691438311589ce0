//! splicegate's agent: the device side of an `agent` node, and the link
//! driver both ends share.
//!
//! A residential exit is a device behind NAT: it cannot be reached, so it
//! dials out to the gateway over TLS 1.3 and keeps the connection; the
//! gateway opens a stream on it for each client tunnel, and the device
//! connects to the target from its own network ([`device`]). The framing is
//! `splicegate_proto::agent`; [`link`] drives it on tokio for the device
//! and for the gateway's agent thread alike.
//!
//! This crate stays small for devices: no io_uring, eBPF, SQLite or admin
//! API. `splicegate agent` and the standalone `splicegate-agent` binary run
//! the same [`device::main_with`].
#![forbid(unsafe_code)]

pub mod device;
pub mod link;
pub mod safety;

pub use device::{ALPN, Args, EXIT_REFUSED, main_with};
