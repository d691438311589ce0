//! Idle upstream connections of session-less HTTP forwarding, per worker:
//! a request that picks a node for a target takes a connection that an
//! earlier request of the same package left through that node to that
//! target, instead of dialling. This is what an HTTP proxy's server-side
//! persistent connections are (Squid's, nginx's `keepalive`); the exit is
//! still the node the request picked, so a rotating request still leaves
//! from whichever node it drew.
//!
//! - Keyed by package, node and target: a connection never carries another
//!   customer's request (a target may tie state to a connection: NTLM).
//! - Bounded: [`PER_KEY`] per key, [`PER_TARGET`] per target (an origin
//!   that serves a connection per thread is not starved of threads by
//!   idle connections, whatever the number of nodes and packages), [`MAX`]
//!   per worker, each kept at most [`IDLE`] (below the 5 s keep-alive
//!   timeout common among origins) and swept by the worker's 250 ms
//!   ticker; a connection let go is closed with a reset, leaving no
//!   TIME_WAIT behind.
//! - Checked when taken: one that has ended (the target closed it) or holds
//!   unasked bytes is closed, and the next is tried. A reused connection
//!   that fails before its answer starts is dialled afresh, as a kept
//!   session connection is; only requests without a body take one.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use splicegate_addr::Target;
use splicegate_control::nodes::{Node, NodeIdx};
use splicegate_uring::TcpStream;

/// Longest a connection waits for its next request.
pub(crate) const IDLE: Duration = Duration::from_secs(4);
/// Most idle connections per package, node and target.
pub(crate) const PER_KEY: usize = 4;
/// Most idle connections per target (host and port), over every package
/// and node.
pub(crate) const PER_TARGET: usize = 16;
/// Most idle connections per worker.
pub(crate) const MAX: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub package: u64,
    pub node: NodeIdx,
    pub target: Target,
}

struct Idle {
    stream: TcpStream,
    node: Arc<Node>,
    since: Instant,
}

#[derive(Default)]
pub(crate) struct Upstreams {
    idle: HashMap<Key, Vec<Idle>>,
    /// Idle connections per target (their sum is the pool's size).
    targets: HashMap<Target, usize>,
}

/// Lets a connection go without leaving TIME_WAIT.
fn reset(stream: TcpStream) {
    let _ = stream.socket().set_linger(Some(Duration::ZERO));
}

/// Whether an idle connection can carry a request: nothing to read (an
/// end or unasked bytes would be).
fn usable(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

impl Upstreams {
    /// `n` idle connections to `target` fewer.
    fn gone(&mut self, target: &Target, n: usize) {
        if let Some(c) = self.targets.get_mut(target) {
            *c -= n;
            if *c == 0 {
                self.targets.remove(target);
            }
        }
    }

    /// The most recently left usable connection for `key`, with its node.
    /// Only one made through `node` as it is now: a node patched since
    /// (another source address, say) lets its old connections go.
    pub(crate) fn take(
        &mut self,
        key: &Key,
        node: &Arc<Node>,
        now: Instant,
    ) -> Option<(TcpStream, Arc<Node>)> {
        let list = self.idle.get_mut(key)?;
        let (mut found, mut taken) = (None, 0);
        while let Some(i) = list.pop() {
            taken += 1;
            if now.duration_since(i.since) < IDLE && Arc::ptr_eq(&i.node, node) && usable(&i.stream)
            {
                found = Some((i.stream, i.node));
                break;
            }
            reset(i.stream);
        }
        // An emptied list stays (with its memory) for the connection this
        // request will leave; the sweep removes lists left empty.
        self.gone(&key.target, taken);
        found
    }

    /// Keeps `stream` (idle, its answer read whole) for the next request
    /// of `key`; lets it go when the bounds are full.
    pub(crate) fn put(&mut self, key: Key, stream: TcpStream, node: Arc<Node>, now: Instant) {
        let per_target = self.targets.get(&key.target).copied().unwrap_or(0);
        let per_key = self.idle.get(&key).map_or(0, Vec::len);
        // Full: the worker's bound, or the target's (unless this key's own
        // oldest makes room).
        if self.len() >= MAX || (per_target >= PER_TARGET && per_key < PER_KEY) {
            reset(stream);
            return;
        }
        if per_key >= PER_KEY {
            let oldest = self.idle.get_mut(&key).map(|list| list.remove(0));
            if let Some(oldest) = oldest {
                reset(oldest.stream);
                self.gone(&key.target, 1);
            }
        }
        *self.targets.entry(key.target.clone()).or_default() += 1;
        self.idle.entry(key).or_default().push(Idle {
            stream,
            node,
            since: now,
        });
    }

    /// Lets go of every connection idle for [`IDLE`] or more, and of the
    /// lists left empty.
    pub(crate) fn sweep(&mut self, now: Instant) {
        let mut gone = Vec::new();
        self.idle.retain(|key, list| {
            // Oldest first: the expired ones lead.
            let n = list
                .iter()
                .take_while(|i| now.duration_since(i.since) >= IDLE)
                .count();
            if n > 0 {
                for i in list.drain(..n) {
                    reset(i.stream);
                }
                gone.push((key.target.clone(), n));
            }
            !list.is_empty()
        });
        for (target, n) in gone {
            self.gone(&target, n);
        }
    }

    /// Idle connections held.
    pub(crate) fn len(&self) -> usize {
        self.targets.values().sum()
    }
}
