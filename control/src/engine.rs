//! The engine: the current policy snapshot, the session table and the recent
//! errors, and the last two checks of the contract (session, node) as a
//! [`Route`] whose `onerror` machine the data plane drives.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use crate::Now;
use crate::catalog::{Code, Rejection};
use crate::geo::GeoCatalog;
use crate::nodes::{Filter, NodeIdx, NodePool, Rng};
use crate::policy::{Admitted, Policy, filter_for};
use crate::recent::RecentErrors;
use crate::rules::{self, OnError, Rules};
use crate::session::{
    Attempts, NodePicker, SessionClaim, SessionKey, SessionTable, SharedSession, Step,
};

/// Shared by every worker and the control thread.
#[derive(Debug)]
pub struct Engine {
    policy: ArcSwap<Policy>,
    /// Sticky sessions.
    pub sessions: SessionTable,
    /// Recent errors of every package.
    pub errors: RecentErrors,
    /// When node failures were last aged ([`Now`] nanoseconds).
    last_upkeep: AtomicU64,
    /// Snapshots published so far; a reader that remembers it knows when
    /// to look again (the kernel's allowlists).
    generation: AtomicU64,
}

/// Node selection as the session table asks for it.
struct PoolPicker<'a> {
    pool: &'a NodePool,
    geo: &'a GeoCatalog,
    filter: &'a Filter,
    rng: &'a mut Rng,
    lookalike: bool,
}

impl NodePicker for PoolPicker<'_> {
    fn pick(&mut self, avoid: Option<NodeIdx>) -> Result<NodeIdx, Rejection> {
        let Some(old) = avoid else {
            return self.pool.pick(self.filter, &[], self.rng, self.geo);
        };
        let fresh = if self.lookalike {
            self.pool
                .pick_lookalike(self.filter, old, &[], self.rng, self.geo)
        } else {
            self.pool.pick(self.filter, &[old], self.rng, self.geo)
        };
        // The node left behind may come back when it is the only match.
        fresh.or_else(|_| self.pool.pick(self.filter, &[], self.rng, self.geo))
    }

    fn usable(&self, node: NodeIdx) -> bool {
        self.pool.node(node).serves_sessions()
    }
}

/// Where a request goes, and what happens when its node fails. A route owns
/// the policy snapshot it was made on, so its node indices stay valid
/// whatever is published meanwhile.
#[derive(Debug, Clone)]
pub struct Route {
    /// The snapshot the route was made on.
    pub policy: Arc<Policy>,
    /// The session, if the rules name one.
    pub session: Option<SessionKey>,
    /// The onerror machine.
    pub attempts: Attempts,
    /// The node the request started on.
    pub first: NodeIdx,
    node_down: bool,
    /// The session's node when another gateway of the fleet has it and
    /// this one does not (`first` stands in).
    away: Option<Arc<str>>,
    lookalike: bool,
    filter: Filter,
}

impl Route {
    /// The node to dial now.
    pub fn node(&self) -> NodeIdx {
        self.attempts.current()
    }

    /// The id of the node the request started on.
    pub fn first_id(&self) -> &str {
        self.away
            .as_deref()
            .unwrap_or(&self.policy.nodes.node(self.first).id)
    }
}

/// What `GET /v1/explain` shows.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The rules as parsed, defaults applied, when they parse.
    pub rules: Option<Rules>,
    /// The canonical username of the rules.
    pub canonical: Option<String>,
    /// The first failing check, if any.
    pub rejection: Option<Rejection>,
    /// Online nodes matching the rules now.
    pub matching_nodes: u64,
}

impl Engine {
    /// An engine on a first policy, with a session table of `session_capacity`.
    pub fn new(policy: Policy, session_capacity: usize) -> Self {
        Engine {
            policy: ArcSwap::from_pointee(policy),
            sessions: SessionTable::new(session_capacity),
            errors: RecentErrors::new(1000),
            last_upkeep: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }
    }

    /// The current snapshot (cheap; readers never block).
    pub fn policy(&self) -> arc_swap::Guard<Arc<Policy>> {
        self.policy.load()
    }

    /// The current snapshot as an owned pointer.
    pub fn policy_arc(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Publish a new snapshot; the next request sees it. Agent nodes whose
    /// device connected or left while the snapshot was built are brought in
    /// line at once, and so is what changed on the pool before since a
    /// pool derived from it was ([`crate::nodes::NodePool::catch_up`]).
    pub fn publish(&self, policy: Policy) {
        let before = self.policy.swap(Arc::new(policy));
        self.generation.fetch_add(1, Ordering::Release);
        let policy = self.policy();
        if !Arc::ptr_eq(&policy.nodes, &before.nodes) {
            policy.nodes.catch_up(&before.nodes);
        }
        policy.nodes.sync_agents();
    }

    /// How many snapshots were published (a file reload, an API change, and
    /// later a fleet event each publish one).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Record an answered error in the package's and the global rings.
    pub fn record_error(
        &self,
        policy: &Policy,
        unix_ms: u64,
        package: Option<u64>,
        protocol: Option<crate::policy::Protocol>,
        rej: &Rejection,
    ) {
        if let Some(p) = package.and_then(|id| policy.packages.get(&id)) {
            p.errors.push(unix_ms, package, protocol, rej);
        }
        self.errors.push(unix_ms, package, protocol, rej);
    }

    /// Checks 10–11: the session (mismatch, rotation) and the first node.
    pub fn route(
        &self,
        policy: &Arc<Policy>,
        adm: &Admitted,
        now: Now,
        rng: &mut Rng,
    ) -> Result<Route, Rejection> {
        let rules = &adm.rules;
        let lookalike = rules.prefer_lookalike;
        let (session, first, node_down, away) = match rules.session {
            Some(id) => {
                let key = SessionKey {
                    package: adm.package.id(),
                    id,
                };
                let mut picker = PoolPicker {
                    pool: &policy.nodes,
                    geo: &policy.geo,
                    filter: &adm.filter,
                    rng,
                    lookalike,
                };
                let lease = self.sessions.acquire(key, rules, now, &mut picker)?;
                (Some(key), lease.node, lease.node_down, lease.away)
            }
            None => (
                None,
                policy.nodes.pick(&adm.filter, &[], rng, &policy.geo)?,
                false,
                None,
            ),
        };
        adm.package.usage.count_request();
        Ok(Route {
            policy: policy.clone(),
            session,
            attempts: Attempts::new(first, rules),
            first,
            node_down,
            away,
            lookalike,
            filter: adm.filter,
        })
    }

    /// In a fleet: what to ask the fleet before [`Engine::route`] serves a
    /// session request, or `None` when this gateway's table serves it alone
    /// (or the request names no session).
    pub fn session_claim(
        &self,
        policy: &Policy,
        adm: &Admitted,
        now: Now,
        rng: &mut Rng,
    ) -> Option<SessionClaim> {
        let rules = &adm.rules;
        let key = SessionKey {
            package: adm.package.id(),
            id: rules.session?,
        };
        let held = self.sessions.get(&key, now);
        // A node gone offline here is replaced, but the fleet may have
        // replaced it already: ask, so that every gateway moves to one node.
        if let Some(s) = &held
            && s.serves_alone(rules, now)
            && policy.nodes.node(s.node).serves_sessions()
        {
            return None;
        }
        // Its node offline here, under an `onerror` that replaces it: the
        // fleet moves the session in the same round trip, so that a request
        // on another gateway right after finds the replacement, not the
        // node this gateway left.
        let replaces = !rules.bind_node && rules.on_error() != OnError::Fail;
        let replace = held
            .as_ref()
            .filter(|s| {
                replaces && s.away.is_none() && !policy.nodes.node(s.node).serves_sessions()
            })
            .map(|s| policy.nodes.node(s.node).id.to_string());
        let held = held.map(|s| s.node);
        let mut picker = PoolPicker {
            pool: &policy.nodes,
            geo: &policy.geo,
            filter: &adm.filter,
            rng,
            lookalike: rules.prefer_lookalike,
        };
        // No node matching here still asks: the session may live on a
        // node another gateway serves (an agent connected there), and its
        // request is then a failure of that node.
        let one = picker.pick(held).ok();
        let two = one.and_then(|o| picker.pick(Some(o)).ok()).or(one);
        let id = |n: Option<NodeIdx>| {
            n.map_or_else(String::new, |n| policy.nodes.node(n).id.to_string())
        };
        Some(SessionClaim {
            key,
            rules: session_rules(policy, adm),
            nodes: [id(one), id(two)],
            replace,
            length_s: rules.session_length(),
            rotate: rules.rotate,
        })
    }

    /// Take the fleet's answer to a [`SessionClaim`] into the session
    /// table, so that [`Engine::route`] follows it; rules other than the
    /// session's first are `SESSION_PARAMS_MISMATCH`, as on one gateway.
    pub fn adopt_session(
        &self,
        policy: &Policy,
        adm: &Admitted,
        shared: &SharedSession,
        now: Now,
        rng: &mut Rng,
    ) -> Result<(), Rejection> {
        let rules = &adm.rules;
        let Some(id) = rules.session else {
            return Ok(());
        };
        let key = SessionKey {
            package: adm.package.id(),
            id,
        };
        if shared.rules != session_rules(policy, adm) {
            let ends = shared.started_ms + u64::from(shared.length_s) * 1000;
            return Err(Rejection::new(
                Code::SessionParamsMismatch,
                format!(
                    "session {} was started with other rules and lives {} s more; use its first rules or a new session id",
                    id.as_str(),
                    ends.saturating_sub(shared.now_ms).div_ceil(1000)
                ),
            ));
        }
        let (node, away) = self.local_node(policy, adm, &shared.node, rng)?;
        self.sessions.adopt(key, rules, shared, node, away, now)
    }

    /// Node `id` of the fleet as this gateway holds it: its index, or (it
    /// is another gateway's) a matching node to stand in and the id.
    fn local_node(
        &self,
        policy: &Policy,
        adm: &Admitted,
        id: &str,
        rng: &mut Rng,
    ) -> Result<(NodeIdx, Option<Arc<str>>), Rejection> {
        match policy.nodes.get(id) {
            Some((idx, _)) => Ok((idx, None)),
            None => {
                let stand_in = policy.nodes.pick(&adm.filter, &[], rng, &policy.geo)?;
                Ok((stand_in, Some(Arc::from(id))))
            }
        }
    }

    /// Another gateway moved session `key` to node `id` after its node
    /// failed there; this gateway follows.
    pub fn session_moved(&self, key: SessionKey, id: &str, now: Now) {
        let policy = self.policy();
        let Some(held) = self.sessions.get(&key, now) else {
            return;
        };
        match policy.nodes.get(id) {
            Some((idx, _)) => self.sessions.moved_elsewhere(&key, idx, None, now),
            None => self
                .sessions
                .moved_elsewhere(&key, held.node, Some(Arc::from(id)), now),
        }
    }

    /// The first step of a route: dial its node, or (its session's node went
    /// offline) go straight to the onerror decision.
    pub fn first_step(&self, route: &mut Route, rng: &mut Rng) -> Step {
        if route.node_down {
            route.node_down = false;
            let name = route.away.clone();
            return Self::after_failure_inner(route, rng, false, name.as_deref());
        }
        Step::Dial(route.node())
    }

    /// The route's current node failed before the tunnel was established:
    /// retry, replace, or answer (per `onerror`).
    pub fn after_failure(&self, route: &mut Route, rng: &mut Rng, now: Now) -> Step {
        let node = route.policy.nodes.node(route.node());
        node.runtime.record_failure(now);
        let usable = node.serves_sessions();
        Self::after_failure_inner(route, rng, usable, None)
    }

    /// `away`: the failed node is another gateway's, named so.
    fn after_failure_inner(
        route: &mut Route,
        rng: &mut Rng,
        usable: bool,
        away: Option<&str>,
    ) -> Step {
        let policy = route.policy.clone();
        let current = route.node();
        let name: Box<str> = away.map_or_else(|| policy.nodes.node(current).id.clone(), Box::from);
        let (filter, lookalike) = (route.filter, route.lookalike);
        let mut replace = |tried: &[NodeIdx]| {
            if lookalike {
                policy
                    .nodes
                    .pick_lookalike(&filter, current, tried, rng, &policy.geo)
            } else {
                policy.nodes.pick(&filter, tried, rng, &policy.geo)
            }
        };
        route.attempts.on_failure(usable, &name, &mut replace)
    }

    /// The tunnel is established on the route's current node: a session that
    /// moved to a replacement stays there.
    pub fn established(&self, route: &Route, now: Now) {
        let node = route.node();
        route.policy.nodes.node(node).runtime.record_success();
        if let Some(key) = route.session
            && node != route.first
        {
            self.sessions.rebind(key, route.first, node, now);
        }
    }

    /// Periodic upkeep, called about once a second by the binary: expired
    /// sessions leave the table, node failures with none after them for
    /// [`crate::nodes::FAILURE_MEMORY`] are forgotten, and agent nodes'
    /// selection is checked against their presence
    /// ([`NodePool::sync_agents`]). Returns the live sessions.
    pub fn housekeeping(&self, now: Now) -> usize {
        let last = self.last_upkeep.swap(now.0, Ordering::Relaxed);
        if now.0.saturating_sub(last) >= 1_000_000_000 {
            let policy = self.policy();
            policy.nodes.forget_failures(now);
            policy.nodes.sync_agents();
        } else {
            self.last_upkeep.store(last, Ordering::Relaxed);
        }
        self.sessions.sweep(now)
    }

    /// A dry run of the checks that need no key, address or protocol.
    pub fn explain(&self, username: &str) -> Explanation {
        let policy = self.policy();
        let mut out = Explanation {
            rules: None,
            canonical: None,
            rejection: None,
            matching_nodes: 0,
        };
        let Some((id, _)) = rules::split_package(username) else {
            out.rejection = Some(Rejection::new(
                Code::AuthFailed,
                "the username must start with package-<id>",
            ));
            return out;
        };
        let Some(package) = policy.packages.get(&id) else {
            out.rejection = Some(Rejection::new(Code::AuthFailed, format!("no package {id}")));
            return out;
        };
        let parsed = rules::parse(username, &policy.geo);
        if let Ok(r) = &parsed {
            let filter = filter_for(r, package.decl.networks);
            out.matching_nodes = policy.nodes.count(&filter);
            out.canonical = Some(r.to_username(&policy.geo));
            if out.matching_nodes == 0 {
                out.rejection = Some(policy.nodes.not_found(&filter, false, &policy.geo));
            }
            out.rules = Some(r.clone());
        }
        let early = crate::policy::status_check(package)
            .and(parsed.map(|_| ()))
            .and_then(|_| {
                out.rules.as_ref().map_or(Ok(()), |r| {
                    r.check_plan(package.decl.networks, package.decl.features)
                })
            })
            .and_then(|_| {
                if package.usage.over_cap(package.decl.traffic_limit_bytes) {
                    Err(Rejection::new(
                        Code::TrafficLimitExceeded,
                        "the package's traffic cap was reached",
                    ))
                } else {
                    Ok(())
                }
            });
        if let Err(e) = early {
            out.rejection = Some(e);
        }
        out
    }
}

/// A session's rules as the fleet compares and lists them: the canonical
/// username of what the first request fixes (no session id, no length).
fn session_rules(policy: &Policy, adm: &Admitted) -> String {
    adm.rules
        .fingerprint()
        .to_listed_rules(adm.package.id())
        .to_username(&policy.geo)
}

/// The effective `onerror` name, for listings.
pub fn on_error_name(r: &Rules) -> String {
    match r.on_error() {
        OnError::Replace => "replace".into(),
        OnError::Fail => "fail".into(),
        OnError::Retry(n) => format!("retry_{n}"),
    }
}

#[cfg(test)]
mod tests;
