//! Kernel enforcement, wired: attach the XDP/TC programs when `[ebpf]
//! enabled` and the process has the privileges, keep their maps in step with
//! the policy (ip_only allowlists, bans), and report their verdict counters.
//! Anything short of an attached program leaves the same rules to the
//! workers in user space, with one warning.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use splicegate_control::engine::Engine;
use splicegate_control::policy::Policy;
use splicegate_ebpf::{AttachMode, Enforcer, EnforcerConfig, Verdict};
use splicegate_worker::BanSink;

use crate::config::{Config, EbpfMode};

/// Bans waiting for the main thread; past this, a ban is dropped, counted
/// and logged.
pub(crate) const BAN_QUEUE: usize = 4096;

/// A source to ban, and for how long.
type Ban = (IpAddr, Duration);

/// The attached programs and what they enforce.
pub(crate) struct Kernel {
    enforcer: Mutex<Enforcer>,
    /// `ip_only` listener ports and their packages.
    ip_only: Vec<(u16, u64)>,
    /// A listener without `proxy_protocol` got a port number a
    /// `proxy_protocol` listener has too, so the programs do not judge it:
    /// the workers must apply the per-source rules at accept as well.
    pub(crate) user_space_too: bool,
    /// Bans from the workers, written to the kernel by the main thread so a
    /// worker never waits on the enforcer's lock (a scrape or a reload may
    /// hold it across bpf syscalls).
    bans: (Sender<Ban>, Receiver<Ban>),
    /// Bans dropped because the queue was full.
    bans_dropped: AtomicU64,
    /// The policy generation the allowlists were last written from.
    synced: AtomicU64,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("ip_only", &self.ip_only)
            .finish()
    }
}

/// Attach the programs if configured and possible; `None` leaves enforcement
/// to user space (and says why, once). `bound`: the proxy's address, then
/// each `[[listener]]`'s, as bound (a port 0 in the file is the kernel's
/// choice here).
pub(crate) fn start(cfg: &Config, bound: &[SocketAddr]) -> Option<Arc<Kernel>> {
    if !cfg.ebpf.enabled {
        tracing::info!(
            "[ebpf] disabled: per-source rates, bans and ip_only ports are enforced in user space (accepted, then closed at once)"
        );
        return None;
    }
    let (ports, behind_lb) = kernel_ports(cfg, bound);
    let pp = std::iter::once(cfg.proxy.proxy_protocol)
        .chain(cfg.listener.iter().map(|l| l.proxy_protocol));
    let user_space_too = bound
        .iter()
        .zip(pp)
        .any(|(at, pp)| !pp && !ports.contains(&at.port()));
    if user_space_too {
        tracing::warn!(
            ports = ?behind_lb,
            "a listener without proxy_protocol shares a port number with a proxy_protocol listener: the kernel programs judge neither, the workers apply the per-source rules to both"
        );
    }
    if !behind_lb.is_empty() {
        tracing::info!(
            ports = ?behind_lb,
            "proxy_protocol ports are left to user space: their per-source rates, bans and ip_only allowlists apply to the address in each connection's PROXY header, which the kernel cannot read"
        );
    }
    let mode = match cfg.ebpf.mode {
        EbpfMode::Xdp => AttachMode::Xdp,
        EbpfMode::XdpGeneric => AttachMode::XdpGeneric,
        EbpfMode::Tc => AttachMode::Tc,
    };
    let ec = EnforcerConfig {
        interface: cfg.ebpf.interface.clone(),
        mode,
        proxy_ports: ports.clone(),
        syn_rate: cfg.ebpf.syn_rate,
        syn_burst: cfg.ebpf.syn_burst.max(1),
    };
    match Enforcer::attach(&ec) {
        Ok(enforcer) => {
            tracing::info!(interface = %ec.interface, mode = %mode, "kernel programs attached: rates, bans and ip_only ports are enforced before a socket exists");
            let ip_only = cfg
                .listener
                .iter()
                .zip(bound.iter().skip(1))
                .filter(|(l, at)| l.ip_only && ports.contains(&at.port()))
                .filter_map(|(l, at)| l.package.map(|p| (at.port(), p)))
                .collect();
            Some(Arc::new(Kernel {
                enforcer: Mutex::new(enforcer),
                ip_only,
                user_space_too,
                bans: crossbeam_channel::bounded(BAN_QUEUE),
                bans_dropped: AtomicU64::new(0),
                synced: AtomicU64::new(u64::MAX),
            }))
        }
        Err(e) => {
            tracing::warn!(
                "[ebpf] enabled, but the kernel programs could not be attached ({e}); the same rules run in user space (connections are accepted and closed at once)"
            );
            None
        }
    }
}

/// The ports the kernel programs judge: every bound proxy port but the
/// `proxy_protocol` ones, whose packets all come from a load balancer (the
/// clients' addresses are in the PROXY headers, read in user space). A
/// port number that a `proxy_protocol` listener bound is left out even
/// where another address binds it without (the programs see the port, not
/// the address; the file cannot say so, but two port-0 listeners on
/// different addresses may get one number); the second list names the
/// ports left out.
fn kernel_ports(cfg: &Config, bound: &[SocketAddr]) -> (Vec<u16>, Vec<u16>) {
    let pp = std::iter::once(cfg.proxy.proxy_protocol)
        .chain(cfg.listener.iter().map(|l| l.proxy_protocol));
    let (mut behind_lb, mut direct): (Vec<u16>, Vec<u16>) = (Vec::new(), Vec::new());
    for (at, pp) in bound.iter().zip(pp) {
        if pp {
            behind_lb.push(at.port());
        } else {
            direct.push(at.port());
        }
    }
    behind_lb.sort_unstable();
    behind_lb.dedup();
    direct.sort_unstable();
    direct.dedup();
    direct.retain(|p| !behind_lb.contains(p));
    (direct, behind_lb)
}

impl Kernel {
    fn enforcer(&self) -> std::sync::MutexGuard<'_, Enforcer> {
        self.enforcer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Write every ip_only port's allowlist from the policy.
    fn sync_allowlists(&self, policy: &Policy) {
        let mut e = self.enforcer();
        for &(port, package) in &self.ip_only {
            let allow = policy
                .packages
                .get(&package)
                .map(|p| p.decl.ip_allowlist.clone())
                .unwrap_or_default();
            if let Err(err) = e.set_ip_only(port, &allow) {
                tracing::error!(port, package, error = %err, "could not write the ip_only allowlist to the kernel");
            }
        }
    }

    /// Where the workers send bans: a bounded queue, never a lock.
    pub(crate) fn ban_sink(self: &Arc<Self>) -> BanSink {
        let me = self.clone();
        Arc::new(move |ip: IpAddr, d: Duration| {
            if me.bans.0.try_send((ip, d)).is_err() {
                me.bans_dropped.fetch_add(1, Ordering::Relaxed);
            }
        })
    }

    /// The main thread's turn (at least every 250 ms): queued bans go to the
    /// kernel, and the allowlists are rewritten when a new policy was
    /// published since the last turn (a reload, an API change), so a change
    /// is in force in the kernel within a second.
    pub(crate) fn upkeep(&self, engine: &Engine) {
        let dropped = self.bans_dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "ban queue full: these bans were not written to the kernel"
            );
        }
        let queued: Vec<_> = self.bans.1.try_iter().collect();
        if !queued.is_empty() {
            let mut e = self.enforcer();
            for (ip, d) in queued {
                if let Err(err) = e.ban(ip, d) {
                    tracing::error!(client = %ip, error = %err, "could not write a ban to the kernel");
                }
            }
        }
        let generation = engine.generation();
        if self.synced.swap(generation, Ordering::Relaxed) != generation {
            self.sync_allowlists(&engine.policy());
        }
    }

    /// Packets per verdict, summed over CPUs.
    pub(crate) fn counters(&self) -> Vec<(&'static str, u64)> {
        match self.enforcer().counters() {
            Ok(c) => Verdict::ALL
                .iter()
                .map(|v| (v.name(), c.get(*v).packets))
                .collect(),
            Err(err) => {
                tracing::warn!(error = %err, "could not read the kernel verdict counters");
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_protocol_ports_are_never_the_kernels() {
        let cfg = Config::parse(
            "[proxy]\nlisten = \"127.0.0.1:5000\"\nproxy_protocol = true\n\n\
             [[listener]]\nlisten = \"127.0.0.1:0\"\n\n\
             [[listener]]\nlisten = \"127.0.0.2:0\"\nproxy_protocol = true\n\n\
             [[listener]]\nlisten = \"127.0.0.3:0\"\n",
        )
        .unwrap();
        let bound: Vec<SocketAddr> = [
            "127.0.0.1:5000",
            "127.0.0.1:6001",
            "127.0.0.2:6002",
            "127.0.0.3:6002",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        // 6002: one listener with, one without; the kernel must not judge it.
        assert_eq!(kernel_ports(&cfg, &bound), (vec![6001], vec![5000, 6002]));
    }
}
