//! systemd's readiness protocol (`sd_notify(3)`): with `Type=notify`,
//! systemd passes `NOTIFY_SOCKET` and waits for `READY=1` before it calls
//! the service started. The gateway says `READY=1` once every listener
//! accepts (the moment it writes its ready file), `RELOADING=1` when a
//! SIGHUP starts a reload and `READY=1` when it is done, `STOPPING=1` when
//! a drain starts. A few datagrams on a Unix socket; without
//! `NOTIFY_SOCKET` (not under systemd) every call does nothing.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The notify socket, if systemd gave one.
#[derive(Debug)]
pub(crate) struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET` (a path, or `@name` for the abstract
    /// namespace). The gateway starts no child process that could inherit it.
    pub(crate) fn from_env() -> Notifier {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { socket: None };
        };
        let addr = {
            use std::os::linux::net::SocketAddrExt;
            use std::os::unix::ffi::OsStrExt;
            let bytes = path.as_bytes();
            match bytes.strip_prefix(b"@") {
                Some(name) => SocketAddr::from_abstract_name(name),
                None => SocketAddr::from_pathname(&path),
            }
        };
        let socket = match (UnixDatagram::unbound(), addr) {
            (Ok(s), Ok(a)) => Some((s, a)),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "NOTIFY_SOCKET is set but unusable; systemd will not hear READY=1");
                None
            }
        };
        Notifier { socket }
    }

    /// Sends `state` (newline-separated `KEY=value` lines).
    fn send(&self, state: &str) {
        if let Some((s, addr)) = &self.socket
            && let Err(e) = s.send_to_addr(state.as_bytes(), addr)
        {
            tracing::warn!(error = %e, state, "sd_notify failed");
        }
    }

    /// Serving: every listener accepts.
    pub(crate) fn ready(&self, status: &str) {
        self.send(&format!(
            "READY=1\nMAINPID={}\nSTATUS={status}",
            std::process::id()
        ));
    }

    /// A reload (SIGHUP) starts.
    pub(crate) fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    /// A drain starts.
    pub(crate) fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=draining");
    }
}

/// `CLOCK_MONOTONIC` in microseconds, which `RELOADING=1` carries
/// (systemd ≥ 253 wants it for `Type=notify-reload`).
fn monotonic_usec() -> u64 {
    splicegate_uring::monotonic_usec()
}
