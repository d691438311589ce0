//! The one admission path of every front end (HTTP CONNECT, HTTP forwarding,
//! SOCKS5, and those to come): a front end reads its handshake into
//! credentials and a [`Target`], asks a [`Gate`], and writes its own answer
//! from what comes back — an [`Established`] route or a [`Refusal`].
//!
//! 1. [`Gate::authenticate`]: checks 1–5 (credentials, package, status).
//! 2. [`Gate::admit`]: checks 6–11 (rules, protocol and target, cap, rate
//!    and connections, session and first node) into an [`Admission`].
//! 3. [`Admission::dial`]: the route's nodes, in the `onerror` order, until
//!    one establishes or the policy gives the answer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use splicegate_addr::Target;
use splicegate_control::catalog::Rejection;
use splicegate_control::engine::Route;
use splicegate_control::limits::ConnGuard;
use splicegate_control::nodes::Node;
use splicegate_control::policy::{
    Admitted, Authenticated, Credentials, Hello, Package, Policy, Protocol,
};
use splicegate_control::session::Step;

use crate::Binding;
use crate::clock;
use crate::ctx::Ctx;
use crate::dial::{DialFailure, Upstream, dial};

/// A request the gateway refused: what to answer, and whose package it
/// counts against (for the recent-errors rings and the access log).
#[derive(Debug)]
pub(crate) struct Refusal {
    /// The package, when the credentials named one.
    pub package: Option<u64>,
    /// The code and its detail.
    pub rejection: Rejection,
}

impl Refusal {
    /// A refusal before any package is known (a malformed handshake).
    pub(crate) fn anonymous(rejection: Rejection) -> Self {
        Refusal {
            package: None,
            rejection,
        }
    }
}

/// One client's requests on one front end, on the policy snapshot current
/// when its request arrived.
#[derive(Debug)]
pub(crate) struct Gate {
    /// The snapshot every check of this request reads.
    pub policy: Arc<Policy>,
    /// The client's address.
    pub peer: SocketAddr,
    /// The listener it came in on.
    pub binding: Binding,
    /// The front end's protocol (a package may enable only some).
    pub protocol: Protocol,
}

/// A request that passed checks 1–11: where it goes, and the node to try
/// first.
#[derive(Debug)]
pub(crate) struct Admission {
    /// What the policy admitted (package, rules, target, node filter).
    pub admitted: Admitted,
    /// The session and the `onerror` machine; owns its policy snapshot.
    pub route: Route,
    /// When the request's head was read.
    pub started: Instant,
}

/// A connection to the target through a node, ready to relay.
#[derive(Debug)]
pub(crate) struct Established {
    /// The node connection and what the node sent past its answer.
    pub up: Upstream,
    /// The node that carries it.
    pub node: Arc<Node>,
    /// The package it is charged to.
    pub package: Arc<Package>,
    /// Where it goes.
    pub target: Target,
    /// The front end's protocol.
    pub protocol: Protocol,
    /// When the request's head was read.
    pub started: Instant,
    /// From the request's head to the established connection.
    pub setup: Duration,
}

impl Gate {
    /// A gate for one request on the current policy snapshot.
    pub(crate) fn new(ctx: &Ctx, peer: SocketAddr, binding: Binding, protocol: Protocol) -> Self {
        Gate {
            policy: ctx.shared.engine.policy_arc(),
            peer,
            binding,
            protocol,
        }
    }

    /// Checks 1–5: who the client is.
    pub(crate) fn authenticate<'c>(
        &self,
        credentials: Credentials<'c>,
    ) -> Result<Authenticated<'c>, Refusal> {
        let hello = Hello {
            client_ip: self.peer.ip(),
            credentials,
            listener_package: self.binding.package,
        };
        self.policy
            .authenticate(&hello)
            .map_err(|rejection| Refusal {
                package: self.policy.refused_package(&hello, &rejection),
                rejection,
            })
    }

    /// Checks 6–11: what the request may do and which node serves it first.
    /// `conn` holds the client connection's slot of the package's
    /// connection limit (taken on its first request, kept for the next).
    pub(crate) async fn admit(
        &self,
        ctx: &Ctx,
        auth: &Authenticated<'_>,
        target: &Target,
        conn: &mut Option<ConnGuard>,
        started: Instant,
    ) -> Result<Admission, Refusal> {
        let refuse = |rejection| Refusal {
            package: Some(auth.package.id()),
            rejection,
        };
        let admitted = self
            .policy
            .admit(auth, self.protocol, target, conn, clock::now())
            .map_err(refuse)?;
        share_session(ctx, &self.policy, &admitted)
            .await
            .map_err(refuse)?;
        let now = clock::now();
        let route = ctx
            .shared
            .engine
            .route(&self.policy, &admitted, now, &mut ctx.rng.borrow_mut())
            .map_err(refuse)?;
        Ok(Admission {
            admitted,
            route,
            started,
        })
    }
}

impl Admission {
    /// The package the request is charged to.
    pub(crate) fn package_id(&self) -> u64 {
        self.admitted.package.id()
    }

    /// Dial the route's nodes until one establishes, or the `onerror`
    /// machine gives the answer.
    pub(crate) async fn dial(
        &mut self,
        ctx: &Ctx,
        protocol: Protocol,
    ) -> Result<Established, Refusal> {
        let engine = &ctx.shared.engine;
        let refuse = |rejection| Refusal {
            package: Some(self.admitted.package.id()),
            rejection,
        };
        let mut step = engine.first_step(&mut self.route, &mut ctx.rng.borrow_mut());
        loop {
            let idx = match step {
                Step::Fail(rej) => return Err(refuse(rej)),
                Step::Dial(idx) => idx,
            };
            let policy = self.route.policy.clone();
            let node = policy.nodes.node(idx).clone();
            match dial(ctx, &policy, &node, &self.admitted.target).await {
                Ok(up) => {
                    engine.established(&self.route, clock::now());
                    announce_move(ctx, &self.route, &node);
                    return Ok(Established {
                        up,
                        node,
                        package: self.admitted.package.clone(),
                        target: self.admitted.target.clone(),
                        protocol,
                        started: self.started,
                        setup: self.started.elapsed(),
                    });
                }
                Err(DialFailure::Answer(rej)) => return Err(refuse(rej)),
                Err(DialFailure::Node(why)) => {
                    tracing::info!(node = %node.id, reason = %why, "node failure");
                    step = engine.after_failure(
                        &mut self.route,
                        &mut ctx.rng.borrow_mut(),
                        clock::now(),
                    );
                }
            }
        }
    }
}

/// How long a request waits for the fleet's answer about its session
/// before it goes on with this gateway's table (as while Redis is away).
const SESSION_WAIT: Duration = Duration::from_millis(500);

/// In a fleet, a session request this gateway cannot serve alone (see
/// [`splicegate_control::session::Session::serves_alone`]) asks the fleet
/// first and follows its answer. Without `[fleet]`, or with no answer,
/// nothing changes.
pub(crate) async fn share_session(
    ctx: &Ctx,
    policy: &Arc<Policy>,
    admitted: &Admitted,
) -> Result<(), Rejection> {
    let Some(sync) = &ctx.shared.sessions else {
        return Ok(());
    };
    let engine = &ctx.shared.engine;
    let Some(claim) =
        engine.session_claim(policy, admitted, clock::now(), &mut ctx.rng.borrow_mut())
    else {
        return Ok(());
    };
    let (tx, mut rx) = splicegate_uring::channel();
    sync.claim(
        claim,
        Box::new(move |answer| {
            let _ = tx.send(answer);
        }),
    );
    match splicegate_uring::timeout(SESSION_WAIT, rx.recv()).await {
        Ok(Some(Some(shared))) => engine.adopt_session(
            policy,
            admitted,
            &shared,
            clock::now(),
            &mut ctx.rng.borrow_mut(),
        ),
        _ => Ok(()),
    }
}

/// In a fleet, a session that moved to a replacement here moves for every
/// gateway.
pub(crate) fn announce_move(ctx: &Ctx, route: &Route, node: &Node) {
    if let (Some(sync), Some(key)) = (&ctx.shared.sessions, route.session)
        && route.node() != route.first
    {
        sync.moved(key, route.first_id(), &node.id);
    }
}
