//! Sticky sessions and the `onerror` state machine.
//!
//! The session table is keyed by (package, session id), split into shards
//! each behind its own lock and chosen by a randomly seeded hash, so workers
//! never share one lock and an attacker cannot aim every id at one shard.
//! Memory is bounded: expired sessions are evicted, and a full table answers
//! `OVERLOADED`.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

use crate::Now;
use crate::catalog::{Code, Rejection};
use crate::nodes::NodeIdx;
use crate::rules::{Fingerprint, OnError, Rotate, Rules, SessionId};

const NS: u64 = 1_000_000_000;

/// A session's key: sessions of different packages never mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// The package.
    pub package: u64,
    /// The client's session id.
    pub id: SessionId,
}

/// One live session.
#[derive(Debug, Clone)]
pub struct Session {
    /// The rules fixed by the first request.
    pub fingerprint: Fingerprint,
    /// The node serving it.
    pub node: NodeIdx,
    /// When the session period started.
    pub started: Now,
    /// Its length.
    pub length_s: u32,
    /// When the current node took over (timed rotation).
    pub node_since: Now,
    /// Requests in this session period.
    pub requests: u64,
    /// Requests on the current node (request rotation).
    pub requests_on_node: u32,
    /// In a fleet: the session's node as another gateway chose it, when
    /// this gateway has no such node (another gateway's `direct` node);
    /// `node` then only stands in, and each request starts as a failure of
    /// the named node (`onerror` decides).
    pub away: Option<Arc<str>>,
}

impl Session {
    /// When it ends.
    pub fn expires(&self) -> Now {
        Now(self.started.0 + u64::from(self.length_s) * NS)
    }

    /// Whether, in a fleet, a request under `rules` can be served from this
    /// gateway's copy alone: the session is live, no timed rotation is due,
    /// it does not count requests (a `rotate-requests_N` count is the
    /// fleet's), and its node is not another gateway's.
    pub fn serves_alone(&self, rules: &Rules, now: Now) -> bool {
        now < self.expires()
            && self.away.is_none()
            && match rules.rotate {
                Some(Rotate::Timed(n)) => now.0 - self.node_since.0 < u64::from(n) * NS,
                Some(Rotate::Requests(_)) => false,
                None => true,
            }
    }
}

/// A session as listed by the admin API.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// The key.
    pub key: SessionKey,
    /// The state.
    pub session: Session,
}

type Shard = Mutex<HashMap<SessionKey, Session>>;

/// The shared session table.
#[derive(Debug)]
pub struct SessionTable {
    shards: Box<[Shard]>,
    hasher: RandomState,
    per_shard: usize,
}

/// What [`SessionTable::acquire`] needs from node selection.
pub trait NodePicker {
    /// A new node for the session, or the code to answer. `avoid` is the node
    /// the session leaves (rotation, a new period): another one is preferred,
    /// but `avoid` itself may come back when it is the only match.
    fn pick(&mut self, avoid: Option<NodeIdx>) -> Result<NodeIdx, Rejection>;
    /// Whether a session may keep using `node` (not offline, not removed).
    fn usable(&self, node: NodeIdx) -> bool;
}

/// The node a session request should use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The node.
    pub node: NodeIdx,
    /// Whether the node went offline since the session chose it (the request
    /// starts as a node failure).
    pub node_down: bool,
    /// The session's node is one this gateway does not have (see
    /// [`Session::away`]); `node` stands in and `node_down` is set.
    pub away: Option<Arc<str>>,
}

impl SessionTable {
    /// A table holding at most `capacity` sessions.
    pub fn new(capacity: usize) -> Self {
        let shards = 64usize;
        SessionTable {
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            per_shard: capacity.div_ceil(shards).max(1),
        }
    }

    fn shard(&self, key: &SessionKey) -> &Shard {
        let h = self.hasher.hash_one(key);
        &self.shards[(h as usize) % self.shards.len()]
    }

    /// Find or start the session for a request, applying rotation, and count
    /// the request. The first request fixes the rules; another request with
    /// different rules while it lives is `SESSION_PARAMS_MISMATCH`.
    pub fn acquire(
        &self,
        key: SessionKey,
        rules: &Rules,
        now: Now,
        picker: &mut dyn NodePicker,
    ) -> Result<Lease, Rejection> {
        let fingerprint = rules.fingerprint();
        let mut map = self.shard(&key).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get_mut(&key) {
            if now < s.expires() {
                if s.fingerprint != fingerprint {
                    return Err(Rejection::new(
                        Code::SessionParamsMismatch,
                        format!(
                            "session {} was started with other rules and lives {} s more; use its first rules or a new session id",
                            key.id.as_str(),
                            (s.expires().0 - now.0).div_ceil(NS)
                        ),
                    ));
                }
                let due = match rules.rotate {
                    Some(Rotate::Timed(n)) => now.0 - s.node_since.0 >= u64::from(n) * NS,
                    Some(Rotate::Requests(n)) => s.requests_on_node >= n,
                    None => false,
                };
                if due {
                    let node = picker.pick(Some(s.node))?;
                    s.node = node;
                    s.node_since = now;
                    s.requests_on_node = 0;
                }
                s.requests += 1;
                s.requests_on_node += 1;
                return Ok(Lease {
                    node: s.node,
                    node_down: s.away.is_some() || !picker.usable(s.node),
                    away: s.away.clone(),
                });
            }
            let old = s.node;
            map.remove(&key);
            return self.start(&mut map, key, fingerprint, rules, now, picker, Some(old));
        }
        self.start(&mut map, key, fingerprint, rules, now, picker, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        &self,
        map: &mut HashMap<SessionKey, Session>,
        key: SessionKey,
        fingerprint: Fingerprint,
        rules: &Rules,
        now: Now,
        picker: &mut dyn NodePicker,
        previous: Option<NodeIdx>,
    ) -> Result<Lease, Rejection> {
        if map.len() >= self.per_shard {
            map.retain(|_, s| now < s.expires());
            if map.len() >= self.per_shard {
                return Err(Rejection::new(
                    Code::Overloaded,
                    "the session table is full; try again shortly",
                ));
            }
        }
        let node = picker.pick(previous)?;
        map.insert(
            key,
            Session {
                fingerprint,
                node,
                started: now,
                length_s: rules.session_length(),
                node_since: now,
                requests: 1,
                requests_on_node: 1,
                away: None,
            },
        );
        Ok(Lease {
            node,
            node_down: false,
            away: None,
        })
    }

    /// Move a session to `new` after its node `old` failed and was replaced.
    pub fn rebind(&self, key: SessionKey, old: NodeIdx, new: NodeIdx, now: Now) {
        let mut map = self.shard(&key).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get_mut(&key)
            && s.node == old
        {
            s.node = new;
            s.node_since = now;
            s.requests_on_node = 1;
            s.away = None;
        }
    }

    /// End a session now. Returns whether it existed.
    pub fn remove(&self, key: &SessionKey) -> bool {
        self.shard(key)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key)
            .is_some()
    }

    /// Drop expired sessions; returns how many live.
    pub fn sweep(&self, now: Now) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let mut m = s.lock().unwrap_or_else(|e| e.into_inner());
                m.retain(|_, s| now < s.expires());
                m.len()
            })
            .sum()
    }

    /// Live sessions of one package (or all), for the admin API.
    pub fn list(&self, package: Option<u64>, now: Now) -> Vec<SessionInfo> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let m = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (k, s) in m.iter() {
                if package.is_none_or(|p| p == k.package) && now < s.expires() {
                    out.push(SessionInfo {
                        key: *k,
                        session: s.clone(),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.id.as_str().cmp(b.key.id.as_str()));
        out
    }

    /// A session's state, if live.
    pub fn get(&self, key: &SessionKey, now: Now) -> Option<Session> {
        let m = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        m.get(key).filter(|s| now < s.expires()).cloned()
    }
}

/// A session as the fleet holds it (SPEC section 11): the gateway that saw
/// its first request started it, and every gateway follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedSession {
    /// The rules its first request fixed, as a canonical username.
    pub rules: String,
    /// Its node's id.
    pub node: String,
    /// When its period started (the fleet's clock, Unix ms).
    pub started_ms: u64,
    /// The period's length.
    pub length_s: u32,
    /// When its node took over (Unix ms).
    pub node_since_ms: u64,
    /// Requests on its node, this one included.
    pub requests_on_node: u32,
    /// The fleet's clock when it answered (Unix ms).
    pub now_ms: u64,
}

/// What a gateway asks the fleet for a request of a session it cannot
/// serve from its own table: one it has not seen, one whose timed rotation
/// is due, and every request of a `rotate-requests_N` session.
#[derive(Debug, Clone)]
pub struct SessionClaim {
    /// The session.
    pub key: SessionKey,
    /// The request's rules, canonical.
    pub rules: String,
    /// The node this gateway would start the session on, and another for a
    /// rotation whose session is already on the first; empty when no node
    /// matches here (the fleet then only says what the session is).
    pub nodes: [String; 2],
    /// The session's node, offline here, that this request's `onerror`
    /// would replace: the fleet moves the session off it to the first of
    /// `nodes`, unless another gateway moved it already.
    pub replace: Option<String>,
    /// The request's `sessionlength`.
    pub length_s: u32,
    /// The request's rotation.
    pub rotate: Option<Rotate>,
}

/// Where the fleet's answer to a [`SessionClaim`] goes: the session, or
/// `None` when the fleet could not answer (the gateway serves the request
/// on its own table).
pub type ClaimReply = Box<dyn FnOnce(Option<SharedSession>) + Send>;

/// Sessions shared by a fleet; implemented by the fleet thread, asked by
/// the workers. Nothing here blocks.
pub trait SessionSync: Send + Sync {
    /// Start the session, or say what it is (rotating it when due).
    fn claim(&self, claim: SessionClaim, reply: ClaimReply);
    /// The session left node `from` for `to` after `from` failed here.
    fn moved(&self, key: SessionKey, from: &str, to: &str);
}

impl SessionTable {
    /// Take the fleet's state of a session into this table, on `node`
    /// (`away`: the fleet's node is one this gateway does not have, and
    /// `node` stands in). The next [`SessionTable::acquire`] counts the
    /// request and finds no rotation due.
    pub fn adopt(
        &self,
        key: SessionKey,
        rules: &Rules,
        shared: &SharedSession,
        node: NodeIdx,
        away: Option<Arc<str>>,
        now: Now,
    ) -> Result<(), Rejection> {
        let ago = |ms: u64| {
            Now(now
                .0
                .saturating_sub(shared.now_ms.saturating_sub(ms) * 1_000_000))
        };
        let started = ago(shared.started_ms);
        let mut map = self.shard(&key).lock().unwrap_or_else(|e| e.into_inner());
        let requests = map
            .get(&key)
            .filter(|s| s.started.0.abs_diff(started.0) < NS)
            .map_or(0, |s| s.requests);
        if !map.contains_key(&key) && map.len() >= self.per_shard {
            map.retain(|_, s| now < s.expires());
            if map.len() >= self.per_shard {
                return Err(Rejection::new(
                    Code::Overloaded,
                    "the session table is full; try again shortly",
                ));
            }
        }
        map.insert(
            key,
            Session {
                fingerprint: rules.fingerprint(),
                node,
                started,
                length_s: shared.length_s,
                node_since: ago(shared.node_since_ms),
                requests,
                requests_on_node: shared.requests_on_node.saturating_sub(1),
                away,
            },
        );
        Ok(())
    }

    /// Another gateway moved the session to `node` (see [`SessionTable::adopt`]
    /// for `away`); a session not held here is left alone.
    pub fn moved_elsewhere(
        &self,
        key: &SessionKey,
        node: NodeIdx,
        away: Option<Arc<str>>,
        now: Now,
    ) {
        let mut map = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get_mut(key) {
            s.node = node;
            s.away = away;
            s.node_since = now;
            s.requests_on_node = 1;
        }
    }
}

/// What to do next after a node attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Dial this node (the same one again, or a replacement).
    Dial(NodeIdx),
    /// Answer the client with this.
    Fail(Rejection),
}

/// The `onerror` state machine of one request: after each node failure it
/// decides whether to retry the same node, replace it, or answer which code.
#[derive(Debug, Clone)]
pub struct Attempts {
    policy: OnError,
    bound: bool,
    session: bool,
    current: NodeIdx,
    retries_left: u8,
    replacements_left: u8,
    replaced: bool,
    /// The nodes tried, first first: the first and at most
    /// [`MAX_REPLACEMENTS`] replacements (kept inline: no allocation per
    /// request).
    tried: [NodeIdx; 1 + MAX_REPLACEMENTS as usize],
    tried_len: u8,
    /// Failures of the first node (retries stop early when it goes offline).
    first_failures: u32,
}

/// Replacements allowed after the first node fails (`replace`).
pub const MAX_REPLACEMENTS: u8 = 2;

impl Attempts {
    /// Start with `first`, under the request's rules.
    pub fn new(first: NodeIdx, rules: &Rules) -> Self {
        let policy = rules.on_error();
        Attempts {
            policy,
            bound: rules.bind_node,
            session: rules.session.is_some(),
            current: first,
            retries_left: if let OnError::Retry(n) = policy { n } else { 0 },
            replacements_left: MAX_REPLACEMENTS,
            replaced: false,
            tried: [first; 1 + MAX_REPLACEMENTS as usize],
            tried_len: 1,
            first_failures: 0,
        }
    }

    /// The node being tried.
    pub fn current(&self) -> NodeIdx {
        self.current
    }

    /// Every node tried so far.
    pub fn tried(&self) -> &[NodeIdx] {
        &self.tried[..usize::from(self.tried_len)]
    }

    /// The current node failed (`node_usable`: whether it may still be tried,
    /// i.e. not offline). `replace` picks a replacement avoiding every node
    /// tried, or says why none.
    pub fn on_failure(
        &mut self,
        node_usable: bool,
        node_name: &str,
        replace: &mut dyn FnMut(&[NodeIdx]) -> Result<NodeIdx, Rejection>,
    ) -> Step {
        if self.tried_len == 1 {
            self.first_failures += 1;
        }
        if self.retries_left > 0 && node_usable {
            self.retries_left -= 1;
            return Step::Dial(self.current);
        }
        let retried = matches!(self.policy, OnError::Retry(_));
        if self.bound {
            let how = if retried { " after its retries" } else { "" };
            return Step::Fail(Rejection::new(
                Code::BoundNodeFailed,
                format!(
                    "the session's bound node {node_name} failed{how}; a new session id gets a new node"
                ),
            ));
        }
        match self.policy {
            OnError::Fail => {
                let keep = if self.session {
                    "; the session keeps its node"
                } else {
                    ""
                };
                Step::Fail(Rejection::new(
                    Code::NodeUnavailable,
                    format!("node {node_name} failed and onerror-fail is set{keep}"),
                ))
            }
            OnError::Retry(_) => {
                if self.replaced {
                    return Step::Fail(Rejection::new(
                        Code::RetriesExhausted,
                        format!(
                            "the first node failed {} times and its replacement {node_name} failed too",
                            self.first_failures
                        ),
                    ));
                }
                match replace(self.tried()) {
                    Ok(next) => {
                        self.replaced = true;
                        self.switch(next);
                        Step::Dial(next)
                    }
                    Err(e) => Step::Fail(Rejection::new(
                        Code::RetriesExhausted,
                        format!(
                            "node {node_name} failed {} times and no other node matches ({})",
                            self.first_failures, e.detail
                        ),
                    )),
                }
            }
            OnError::Replace => {
                if self.replacements_left == 0 {
                    return Step::Fail(Rejection::new(
                        Code::NodeUnavailable,
                        format!(
                            "{} nodes failed in turn (last {node_name}); try again",
                            self.tried_len
                        ),
                    ));
                }
                match replace(self.tried()) {
                    Ok(next) => {
                        self.replacements_left -= 1;
                        self.switch(next);
                        Step::Dial(next)
                    }
                    Err(mut e) => {
                        e.detail = format!("node {node_name} failed; {}", e.detail);
                        Step::Fail(e)
                    }
                }
            }
        }
    }

    fn switch(&mut self, next: NodeIdx) {
        self.current = next;
        // A request switches at most once in retry mode and
        // `MAX_REPLACEMENTS` times otherwise, so the array has room.
        let i = usize::from(self.tried_len);
        debug_assert!(i < self.tried.len(), "more switches than replacements");
        if let Some(slot) = self.tried.get_mut(i) {
            *slot = next;
            self.tried_len += 1;
        }
        // A replacement in retry mode is tried once.
        self.retries_left = 0;
    }
}

#[cfg(test)]
mod tests;
