//! The worker's open tunnels and idle keep-alive connections, by package.
//! Tunnels' byte counters are flushed to their package (and its
//! organisation's credits) every 250 ms and when they end. At each tick,
//! a tunnel or keep-alive connection whose package may not go on (paused,
//! suspended, removed, over its traffic cap, out of credits) is stopped, so
//! within one second; a key rotation stops nothing.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;

use splicegate_control::policy::{Package, Policy};
use splicegate_uring::{Notifier, RelayCtl};

/// How the registry reaches what it holds.
enum Held {
    /// A relaying tunnel (a = client, b = upstream) and what of its bytes
    /// was already charged.
    Tunnel {
        ctl: RelayCtl,
        flushed_up: u64,
        flushed_down: u64,
    },
    /// An HTTP client connection waiting for its next request.
    KeepAlive(Notifier),
}

struct Entry {
    package: Arc<Package>,
    held: Held,
    stopped: bool,
}

/// The registry.
#[derive(Default)]
pub(crate) struct Tunnels {
    open: RefCell<HashMap<u64, Entry>>,
    next: Cell<u64>,
}

impl Tunnels {
    fn insert(&self, package: Arc<Package>, held: Held) -> u64 {
        let id = self.next.get();
        self.next.set(id + 1);
        self.open.borrow_mut().insert(
            id,
            Entry {
                package,
                held,
                stopped: false,
            },
        );
        id
    }

    /// Register a tunnel about to relay.
    pub(crate) fn register(&self, package: Arc<Package>, ctl: RelayCtl) -> u64 {
        let held = Held::Tunnel {
            ctl,
            flushed_up: 0,
            flushed_down: 0,
        };
        self.insert(package, held)
    }

    /// Register a keep-alive connection waiting for its next request; the
    /// notifier fires when its package may not go on.
    pub(crate) fn register_keepalive(&self, package: Arc<Package>, stop: Notifier) -> u64 {
        self.insert(package, Held::KeepAlive(stop))
    }

    /// The tunnel or keep-alive wait ended: charge what was not yet flushed.
    pub(crate) fn finish(&self, id: u64, stats: &WorkerStats) {
        if let Some(mut e) = self.open.borrow_mut().remove(&id) {
            let (up, down) = flush(&mut e);
            stats.bytes(up, down);
        }
    }

    /// Flush counters and stop what may not go on.
    pub(crate) fn tick(&self, policy: &Policy, stats: &WorkerStats) {
        for e in self.open.borrow_mut().values_mut() {
            let (up, down) = flush(e);
            stats.bytes(up, down);
            if e.stopped {
                continue;
            }
            let verdict = match policy.packages.get(&e.package.id()) {
                Some(p) => Policy::may_continue(p),
                None => Err(splicegate_control::Rejection::new(
                    splicegate_control::Code::AuthFailed,
                    "the package was removed",
                )),
            };
            if let Err(why) = verdict {
                tracing::info!(package = e.package.id(), code = why.code.as_str(), detail = %why.detail, "closing a connection");
                e.stop();
            }
        }
    }

    /// Stop everything (end of a drain).
    pub(crate) fn stop_all(&self) {
        for e in self.open.borrow_mut().values_mut() {
            e.stop();
        }
    }
}

impl Entry {
    fn stop(&mut self) {
        self.stopped = true;
        match &self.held {
            Held::Tunnel { ctl, .. } => ctl.stop(),
            Held::KeepAlive(n) => n.notify(),
        }
    }
}

/// Charge what a tunnel moved since the last flush; returns it.
fn flush(e: &mut Entry) -> (u64, u64) {
    let Held::Tunnel {
        ctl,
        flushed_up,
        flushed_down,
    } = &mut e.held
    else {
        return (0, 0);
    };
    let (up, down) = (ctl.a_to_b(), ctl.b_to_a());
    let (du, dd) = (up - *flushed_up, down - *flushed_down);
    if du != 0 || dd != 0 {
        e.package.charge(du, dd);
        *flushed_up = up;
        *flushed_down = down;
    }
    (du, dd)
}

use std::rc::Rc;
use std::time::Instant;

use splicegate_uring::{relay, timeout_at};

use crate::bufs::Buf;
use crate::client::{Client, Stream};

use crate::WorkerStats;
use crate::admission::Established;
use crate::ctx::Ctx;

/// An established tunnel, ready to relay: everything it needs and nothing
/// of the handshake that made it, so an idle tunnel costs its sockets and a
/// small task.
pub(crate) struct Tunnel {
    pub client: Client,
    pub peer: std::net::SocketAddr,
    /// The node connection and what the request was admitted as.
    pub route: Established,
    /// Bytes the client sent after its request, before our answer.
    pub early: Buf,
    /// The client connection's slot of the package's connection limit.
    pub conn: Option<splicegate_control::limits::ConnGuard>,
}

/// Relay an established tunnel (a = client, b = upstream) until either side
/// ends, the idle timeout passes, or the tick stops it; `open` (the client
/// connection's count) is let go at the end.
///
/// The tunnel task's own future: it is spawned as is, and it reads the
/// tunnel's fields in place rather than moving them into locals, so an
/// idle tunnel's task holds one copy of them (a future keeps the room of
/// its arguments, and of anything an async block captures, for its whole
/// life).
pub(crate) async fn run(ctx: Rc<Ctx>, mut t: Tunnel, open: crate::accept::OpenGuard) {
    let ctx = &*ctx;
    let route = &t.route;
    let _load = route.node.runtime.open_tunnel();
    WorkerStats::inc(&ctx.stats.open_tunnels);
    ctx.stats.setup.observe(route.setup);
    let (mut total_up, mut total_down) = (0, 0);
    let idle = ctx.shared.settings.idle;
    let early_ok = async {
        if !t.early.is_empty() {
            route.up.stream.write_all(&t.early).await?;
        }
        if !route.up.leftover.is_empty() {
            t.client.write_all(&route.up.leftover).await?;
        }
        std::io::Result::Ok(())
    };
    if matches!(
        timeout_at(Instant::now() + idle, early_ok).await,
        Ok(Ok(()))
    ) {
        let (eu, ed) = (t.early.len() as u64, t.route.up.leftover.len() as u64);
        drop(std::mem::take(&mut t.early));
        let route = &t.route;
        let package = &route.package;
        package.charge(eu, ed);
        ctx.stats.bytes(eu, ed);
        let ctl = RelayCtl::new();
        ctl.set_idle_timeout(Some(idle));
        let id = ctx.tunnels.register(package.clone(), ctl.clone());
        let outcome = match &t.client {
            Client::Plain(tcp) => relay(tcp, &route.up.stream, &ctx.pipes, &ctl).await,
            // Bytes inside TLS cannot be spliced: one copy each way.
            Client::Tls(tls) => splicegate_tls::relay(tls, &route.up.stream, &ctl).await,
        };
        ctx.tunnels.finish(id, &ctx.stats);
        (total_up, total_down) = (eu + outcome.a_to_b, ed + outcome.b_to_a);
        tracing::debug!(package = package.id(), node = %route.node.id, up = outcome.a_to_b, down = outcome.b_to_a, end = ?outcome.end, "tunnel closed");
    }
    WorkerStats::dec(&ctx.stats.open_tunnels);
    drop(t.conn.take());
    let route = &t.route;
    ctx.log(&crate::ctx::Outcome {
        peer: t.peer,
        package: Some(route.package.id()),
        protocol: route.protocol,
        target: Some(&route.target),
        node: Some(&route.node.id),
        error: None,
        up: total_up,
        down: total_down,
        started: route.started,
        setup: Some(route.setup),
    });
    drop(open);
}
