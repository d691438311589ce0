//! Packages, organisations and the check order: one immutable snapshot of
//! everything a request is judged by, and the functions that judge it.
//!
//! [`Policy::authenticate`] runs checks 1–5 of the contract (credentials,
//! address, status, credits); [`Policy::admit`] runs 6–9 (rules, protocol and
//! target, traffic cap, rate and connections). Sessions and nodes (10–11) are
//! [`crate::engine::Engine::route`]. Each returns the first failing check.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use subtle::ConstantTimeEq;

use crate::Now;
use crate::catalog::{Code, Rejection};
use crate::decl::DeclError;
use crate::geo::GeoCatalog;
use crate::limits::{ConnGuard, OrgAccount, PackageUsage};
use crate::nodes::{Filter, NodeDecl, NodeIdx, NodePool};
use crate::recent::RecentErrors;
use crate::rules::{self, FeatureSet, NetworkRule, NetworkSet, Rules};
use crate::safety::TargetPolicy;
use splicegate_addr::{Host, Target};

/// A protocol a package may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Absolute-form HTTP forwarding.
    Http,
    /// CONNECT tunnels.
    Https,
    /// SOCKS5 CONNECT.
    Socks5,
}

names!(Protocol {
    Http => "http",
    Https => "https",
    Socks5 => "socks5",
});

impl Protocol {
    /// Position in [`Protocol::ALL`] (for per-protocol counters).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A set of protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProtocolSet(pub u8);

impl ProtocolSet {
    /// Every protocol.
    pub const ALL: ProtocolSet = ProtocolSet(0b111);

    /// The set of the given protocols.
    pub fn of(ps: impl IntoIterator<Item = Protocol>) -> Self {
        ProtocolSet(ps.into_iter().fold(0, |a, p| a | (1 << p as u8)))
    }

    /// Whether `p` is in the set.
    pub fn contains(self, p: Protocol) -> bool {
        self.0 & (1 << p as u8) != 0
    }

    /// The protocols in the set.
    pub fn iter(self) -> impl Iterator<Item = Protocol> {
        Protocol::ALL.into_iter().filter(move |p| self.contains(*p))
    }
}

/// A package's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PackageStatus {
    /// Serves.
    Active,
    /// Paused by its owner: `PACKAGE_PAUSED`.
    Paused,
    /// Suspended by the operator: `PACKAGE_SUSPENDED`.
    Suspended,
}

names!(PackageStatus {
    Active => "active",
    Paused => "paused",
    Suspended => "suspended",
});

/// How a package authenticates its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthMode {
    /// The key as password.
    Password,
    /// The client's address on the allowlist; the password is ignored.
    Ip,
    /// Both.
    PasswordIp,
}

names!(AuthMode {
    Password => "password",
    Ip => "ip",
    PasswordIp => "password+ip",
});

/// Longest package key (as a SOCKS5 password).
pub const MAX_KEY: usize = 255;

/// A key buffer as little-endian 64-bit words (no branch on the content).
fn words(bytes: &[u8; MAX_KEY + 1]) -> [u64; (MAX_KEY + 1) / 8] {
    let mut w = [0u64; (MAX_KEY + 1) / 8];
    for (word, chunk) in w.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *word = u64::from_le_bytes(b);
    }
    w
}

/// A package's key, compared in constant time; never printed.
#[derive(Clone)]
pub struct Key {
    bytes: [u8; MAX_KEY + 1],
    len: u8,
}

impl Key {
    /// A key from its text (1–255 bytes).
    pub fn new(key: &str) -> Option<Key> {
        let b = key.as_bytes();
        if b.is_empty() || b.len() > MAX_KEY {
            return None;
        }
        let mut bytes = [0u8; MAX_KEY + 1];
        bytes[..b.len()].copy_from_slice(b);
        Some(Key {
            bytes,
            len: b.len() as u8,
        })
    }

    /// Constant-time comparison with a candidate (time depends on neither
    /// the key nor the candidate's content, only on the fixed buffer size).
    /// The buffers are compared as 64-bit words: 32 constant-time steps
    /// (each behind an optimisation barrier) instead of 256.
    pub fn matches(&self, candidate: &str) -> bool {
        let c = candidate.as_bytes();
        let mut padded = [0u8; MAX_KEY + 1];
        let len_ok = c.len() <= MAX_KEY;
        let n = c.len().min(MAX_KEY);
        padded[..n].copy_from_slice(&c[..n]);
        let same_len = (n as u8).ct_eq(&self.len);
        let same_bytes = words(&padded)[..].ct_eq(&words(&self.bytes)[..]);
        bool::from(same_len & same_bytes) && len_ok
    }

    /// The key's text, for the admin API that returns a generated key once.
    pub fn expose(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("")
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(***)")
    }
}

/// An organisation as declared (config file or API).
#[derive(Debug, Clone, PartialEq)]
pub struct OrgDecl {
    /// Its id.
    pub id: String,
    /// The opening grant, micro-credits (a file's `credits` is a first grant only).
    pub credits: i64,
    /// Declared in the config file.
    pub from_file: bool,
}

/// A package as declared (config file or API), defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct PackageDecl {
    /// Numeric id.
    pub id: u64,
    /// Organisation whose credits it spends (none: no credit check).
    pub org: Option<String>,
    /// The key (password).
    pub key: String,
    /// Status.
    pub status: PackageStatus,
    /// Allowed protocols.
    pub protocols: ProtocolSet,
    /// Enabled networks.
    pub networks: NetworkSet,
    /// Plan features.
    pub features: FeatureSet,
    /// Authentication mode.
    pub auth: AuthMode,
    /// Allowed client ranges.
    pub ip_allowlist: Vec<IpNet>,
    /// Rules for an address-authenticated client that sends no username,
    /// without the `package-<id>-` prefix (`country-any`).
    pub default_rules: String,
    /// Requests per second (0 = unlimited).
    pub rps_limit: u32,
    /// Concurrent client connections (0 = unlimited).
    pub max_connections: u32,
    /// Lifetime traffic cap in bytes (0 = unlimited).
    pub traffic_limit_bytes: u64,
    /// Price in micro-credits per GB.
    pub price_per_gb: u64,
    /// Declared in the config file.
    pub from_file: bool,
}

impl PackageDecl {
    /// A package with the contract's defaults.
    pub fn new(id: u64, key: &str) -> Self {
        PackageDecl {
            id,
            org: None,
            key: key.into(),
            status: PackageStatus::Active,
            protocols: ProtocolSet::ALL,
            networks: NetworkSet::ALL,
            features: FeatureSet::ALL,
            auth: AuthMode::Password,
            ip_allowlist: Vec::new(),
            default_rules: "country-any".into(),
            rps_limit: 0,
            max_connections: 0,
            traffic_limit_bytes: 0,
            price_per_gb: 0,
            from_file: false,
        }
    }
}

/// An organisation in the snapshot.
#[derive(Debug)]
pub struct Org {
    /// Declaration.
    pub decl: OrgDecl,
    /// Balance, shared across snapshots.
    pub account: Arc<OrgAccount>,
}

/// A package in the snapshot.
#[derive(Debug)]
pub struct Package {
    /// Declaration.
    pub decl: PackageDecl,
    /// The key.
    pub key: Key,
    /// Its organisation.
    pub org: Option<Arc<Org>>,
    /// Usage and limits state, shared across snapshots.
    pub usage: Arc<PackageUsage>,
    /// Recent errors, shared across snapshots.
    pub errors: Arc<RecentErrors>,
}

impl Package {
    /// Charge relayed bytes to the package and its organisation.
    pub fn charge(&self, up: u64, down: u64) {
        self.usage.add_traffic(
            up,
            down,
            self.decl.price_per_gb,
            self.org.as_ref().map(|o| &*o.account),
        );
    }

    /// The package id.
    pub fn id(&self) -> u64 {
        self.decl.id
    }

    fn ip_allowed(&self, ip: IpAddr) -> bool {
        let ip = canonical_client(ip);
        self.decl.ip_allowlist.iter().any(|n| n.contains(&ip))
    }
}

/// IPv4-mapped client addresses (dual-stack sockets) are judged as IPv4.
fn canonical_client(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Everything a request is judged by, swapped whole on every change.
#[derive(Debug)]
pub struct Policy {
    /// Packages by id.
    pub packages: HashMap<u64, Arc<Package>>,
    /// Organisations by id.
    pub orgs: HashMap<String, Arc<Org>>,
    /// `ip`-auth allowlists: range → package (non-overlapping).
    ip_auth: Vec<(IpNet, u64)>,
    /// The node pool; an API change to packages or organisations shares it
    /// with the policy before ([`Policy::build_keeping_nodes`]).
    pub nodes: Arc<NodePool>,
    /// The catalogue of names.
    pub geo: GeoCatalog,
    /// Target safety.
    pub targets: TargetPolicy,
}

/// The declarations a policy is built from.
#[derive(Debug, Clone, Default)]
pub struct Declarations {
    /// Organisations.
    pub orgs: Vec<OrgDecl>,
    /// Packages.
    pub packages: Vec<PackageDecl>,
    /// Nodes.
    pub nodes: Vec<NodeDecl>,
    /// Operator's extra catalogue names: (country, kind, name).
    pub geo: Vec<(crate::geo::Country, crate::geo::GeoKind, String)>,
    /// Target safety.
    pub targets: TargetPolicy,
}

/// An API change of one node ([`Policy::build_changing_node`]).
#[derive(Debug, Clone, Copy)]
pub enum NodeChange<'a> {
    /// Create the node this declares, or replace the node of its id.
    Put(&'a NodeDecl),
    /// Delete the node of this id (it stays a tombstone, as in a build).
    Remove(&'a str),
}

/// Credentials as the client sent them.
#[derive(Debug, Clone, Copy)]
pub enum Credentials<'a> {
    /// None at all.
    Absent,
    /// Present but unreadable (bad base64, no colon, too long).
    Malformed,
    /// Username and password.
    Present {
        /// The rules.
        username: &'a str,
        /// The package key.
        password: &'a str,
    },
}

/// The client's side of authentication.
#[derive(Debug, Clone, Copy)]
pub struct Hello<'a> {
    /// The client's address.
    pub client_ip: IpAddr,
    /// What it sent.
    pub credentials: Credentials<'a>,
    /// The package the listener is bound to, if any.
    pub listener_package: Option<u64>,
}

/// A client that passed checks 1–5.
#[derive(Debug, Clone)]
pub struct Authenticated<'a> {
    /// Its package.
    pub package: Arc<Package>,
    /// The username to read rules from, borrowed from the credentials;
    /// `None` = the package's default rules.
    pub username: Option<&'a str>,
}

/// A request that passed checks 1–9.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// Its package.
    pub package: Arc<Package>,
    /// Its rules.
    pub rules: Rules,
    /// The target, canonical and checked.
    pub target: Target,
    /// The node filter the rules and the package's networks give.
    pub filter: Filter,
}

fn auth_failed(detail: &str) -> Rejection {
    Rejection::new(Code::AuthFailed, detail)
}

impl Policy {
    /// Build a snapshot from declarations, keeping the live state (usage,
    /// balances, node load, recent errors, catalogue names) of `previous`.
    pub fn build(decls: &Declarations, previous: Option<&Policy>) -> Result<Policy, DeclError> {
        let mut geo = previous.map(|p| p.geo.clone()).unwrap_or_default();
        for (c, k, name) in &decls.geo {
            geo.add(*c, *k, name);
        }
        let mut seen = std::collections::HashSet::new();
        for n in &decls.nodes {
            n.validate()
                .map_err(|e| e.within(format_args!("node {}", n.id)))?;
            if !seen.insert(n.id.as_str()) {
                return Err(DeclError::Duplicate(format!("node {}", n.id)));
            }
        }
        let nodes = NodePool::build(&decls.nodes, previous.map(|p| &*p.nodes), &mut geo);
        Self::with_accounts(decls, previous, Arc::new(nodes), geo)
    }

    /// A policy for `decls` whose nodes are `previous`'s, shared, not built
    /// again (`decls.nodes` is not read): an API change to packages or
    /// organisations costs what those cost, not what a million nodes do.
    pub fn build_keeping_nodes(
        decls: &Declarations,
        previous: &Policy,
    ) -> Result<Policy, DeclError> {
        let mut geo = previous.geo.clone();
        for (c, k, name) in &decls.geo {
            geo.add(*c, *k, name);
        }
        Self::with_accounts(decls, Some(previous), previous.nodes.clone(), geo)
    }

    /// A policy for `decls` whose pool is `previous`'s with one node put or
    /// removed ([`NodePool::with_node`], [`NodePool::without_node`]):
    /// the other nodes are shared, not built again, and `decls.nodes` is
    /// not read. An API change of one node costs what the accounts cost,
    /// not what a million nodes do.
    ///
    /// Returns the node's index. Nothing live changes until the caller
    /// commits the change (once it is stored): for a put,
    /// `nodes.set_admin_state(idx, decl.state)` on the new policy; for a
    /// removal, `nodes.remove(idx)` on the new policy and the current one.
    /// Committed, the pool is what [`Policy::build`] of the same
    /// declarations on `previous` gives.
    pub fn build_changing_node(
        decls: &Declarations,
        previous: &Policy,
        change: NodeChange<'_>,
    ) -> Result<(Policy, Option<NodeIdx>), DeclError> {
        let mut geo = previous.geo.clone();
        for (c, k, name) in &decls.geo {
            geo.add(*c, *k, name);
        }
        let (nodes, idx) = match change {
            NodeChange::Put(d) => {
                d.validate()
                    .map_err(|e| e.within(format_args!("node {}", d.id)))?;
                let (pool, idx) = previous.nodes.with_node(d, &mut geo);
                (Arc::new(pool), Some(idx))
            }
            NodeChange::Remove(id) => match previous.nodes.without_node(id) {
                Some((pool, idx)) => (Arc::new(pool), Some(idx)),
                None => (previous.nodes.clone(), None),
            },
        };
        let policy = Self::with_accounts(decls, Some(previous), nodes, geo)?;
        Ok((policy, idx))
    }

    /// The organisations and packages of `decls` on `nodes` and `geo`.
    fn with_accounts(
        decls: &Declarations,
        previous: Option<&Policy>,
        nodes: Arc<NodePool>,
        geo: GeoCatalog,
    ) -> Result<Policy, DeclError> {
        let mut orgs = HashMap::new();
        for o in &decls.orgs {
            if o.id.is_empty() {
                return Err(DeclError::Missing("id").within("an organisation"));
            }
            let account = previous
                .and_then(|p| p.orgs.get(&o.id))
                .map(|x| x.account.clone())
                .unwrap_or_else(|| Arc::new(OrgAccount::new(o.credits)));
            if orgs
                .insert(
                    o.id.clone(),
                    Arc::new(Org {
                        decl: o.clone(),
                        account,
                    }),
                )
                .is_some()
            {
                return Err(DeclError::Duplicate(format!("organisation {}", o.id)));
            }
        }
        let mut packages = HashMap::new();
        let mut ip_auth: Vec<(IpNet, u64)> = Vec::new();
        for d in &decls.packages {
            let within = |e: DeclError| e.within(format_args!("package {}", d.id));
            let key = Key::new(&d.key)
                .ok_or_else(|| within(DeclError::field("key", format!("1 to {MAX_KEY} bytes"))))?;
            let org = match &d.org {
                Some(id) => Some(orgs.get(id).cloned().ok_or_else(|| {
                    within(DeclError::field("org", format!("no organisation {id}")))
                })?),
                None => None,
            };
            if d.auth != AuthMode::Password && d.ip_allowlist.is_empty() {
                return Err(within(DeclError::field(
                    "auth",
                    format!("{} needs an ip_allowlist", d.auth.as_str()),
                )));
            }
            if d.auth == AuthMode::Ip {
                for net in &d.ip_allowlist {
                    if let Some((other, owner)) = ip_auth
                        .iter()
                        .find(|(o, _)| o.contains(net) || net.contains(o))
                    {
                        return Err(within(DeclError::field(
                            "ip_allowlist",
                            format!(
                                "{net} overlaps {other} of ip-auth package {owner}; an address may name one package"
                            ),
                        )));
                    }
                    ip_auth.push((*net, d.id));
                }
            }
            let prefixed = format!("package-{}-{}", d.id, d.default_rules);
            rules::parse(&prefixed, &geo)
                .map_err(|e| within(DeclError::field("default_rules", e.to_string())))?;
            let prev = previous.and_then(|p| p.packages.get(&d.id));
            let package = Package {
                decl: d.clone(),
                key,
                org,
                usage: prev.map(|p| p.usage.clone()).unwrap_or_default(),
                errors: prev
                    .map(|p| p.errors.clone())
                    .unwrap_or_else(|| Arc::new(RecentErrors::new(100))),
            };
            if packages.insert(d.id, Arc::new(package)).is_some() {
                return Err(DeclError::Duplicate(format!("package {}", d.id)));
            }
        }
        Ok(Policy {
            packages,
            orgs,
            ip_auth,
            nodes,
            geo,
            targets: decls.targets.clone(),
        })
    }

    /// The `ip`-auth package whose allowlist holds `ip`.
    pub fn ip_auth_package(&self, ip: IpAddr) -> Option<&Arc<Package>> {
        let ip = canonical_client(ip);
        self.ip_auth
            .iter()
            .find(|(n, _)| n.contains(&ip))
            .and_then(|(_, id)| self.packages.get(id))
    }

    /// Checks 1–5: credentials, address, status, credits.
    pub fn authenticate<'a>(&self, hello: &Hello<'a>) -> Result<Authenticated<'a>, Rejection> {
        let (package, username) = match hello.credentials {
            Credentials::Absent => {
                let by_port = hello.listener_package.and_then(|id| self.packages.get(&id));
                let package = match by_port {
                    Some(p) if p.decl.auth == AuthMode::Ip => Some(p),
                    Some(_) => None,
                    None => self.ip_auth_package(hello.client_ip),
                };
                let Some(package) = package else {
                    return Err(Rejection::new(
                        Code::ErrAuthRequired,
                        "send credentials: username package-<id>-<rules>, password the package key",
                    ));
                };
                (package, None)
            }
            Credentials::Malformed => {
                return Err(auth_failed(
                    "the credentials are malformed; send Basic base64(username:password)",
                ));
            }
            Credentials::Present { username, password } => {
                let Some((id, _)) = rules::split_package(username) else {
                    return Err(auth_failed("the username must start with package-<id>"));
                };
                if hello.listener_package.is_some_and(|p| p != id) {
                    return Err(auth_failed("this port serves another package"));
                }
                let Some(package) = self.packages.get(&id) else {
                    return Err(auth_failed("unknown package or wrong key"));
                };
                // A key inside the rules would be echoed in details and logs:
                // refuse it before the rules are ever read, right password or not.
                let key = package.key.expose();
                if key.len() >= 4 && username.contains(key) {
                    return Err(auth_failed(
                        "the package key goes in the password, not the username",
                    ));
                }
                if package.decl.auth != AuthMode::Ip && !package.key.matches(password) {
                    return Err(auth_failed("unknown package or wrong key"));
                }
                (package, Some(username))
            }
        };
        if package.decl.auth != AuthMode::Password && !package.ip_allowed(hello.client_ip) {
            return Err(Rejection::new(
                Code::IpNotAllowed,
                format!(
                    "{} is not on package {}'s allowlist; ask its owner to add it",
                    canonical_client(hello.client_ip),
                    package.id()
                ),
            ));
        }
        status_check(package)?;
        Ok(Authenticated {
            package: package.clone(),
            username,
        })
    }

    /// The package an authentication refusal belongs to, for its recent-errors
    /// list: only refusals that come after the key (or address) was verified
    /// (`IP_NOT_ALLOWED`, status, credits), so a stranger cannot fill another
    /// package's list with wrong-key attempts.
    pub fn refused_package(&self, hello: &Hello<'_>, rej: &Rejection) -> Option<u64> {
        if !matches!(
            rej.code,
            Code::IpNotAllowed
                | Code::PackageSuspended
                | Code::PackagePaused
                | Code::PackageNoCredits
        ) {
            return None;
        }
        match hello.credentials {
            Credentials::Present { username, .. } => {
                rules::split_package(username).map(|(id, _)| id)
            }
            _ => hello
                .listener_package
                .or_else(|| self.ip_auth_package(hello.client_ip).map(|p| p.id())),
        }
    }

    /// Checks 6–9 for one request: rules, protocol and target, traffic cap,
    /// rate and connections. `conn` holds the client connection's slot of the
    /// package's connection limit (taken on its first request).
    pub fn admit(
        &self,
        auth: &Authenticated<'_>,
        protocol: Protocol,
        target: &Target,
        conn: &mut Option<ConnGuard>,
        now: Now,
    ) -> Result<Admitted, Rejection> {
        self.admit_to(auth, protocol, Some(target), conn, now)
    }

    /// Checks 6–9 for a SOCKS5 UDP association (SPEC section 12): as
    /// [`Policy::admit`], with no target yet (each datagram's is checked on
    /// its own) and a node filter that keeps only nodes that carry UDP. It
    /// counts as one request and one open connection.
    pub fn admit_association(
        &self,
        auth: &Authenticated<'_>,
        conn: &mut Option<ConnGuard>,
        now: Now,
    ) -> Result<Admitted, Rejection> {
        self.admit_to(auth, Protocol::Socks5, None, conn, now)
    }

    fn admit_to(
        &self,
        auth: &Authenticated<'_>,
        protocol: Protocol,
        target: Option<&Target>,
        conn: &mut Option<ConnGuard>,
        now: Now,
    ) -> Result<Admitted, Rejection> {
        let package = &auth.package;
        // 6: rules.
        let rules = match &auth.username {
            Some(u) => rules::parse(u, &self.geo)?,
            None => rules::parse(
                &format!("package-{}-{}", package.id(), package.decl.default_rules),
                &self.geo,
            )?,
        };
        rules.check_plan(package.decl.networks, package.decl.features)?;
        // 7: protocol and target.
        if !package.decl.protocols.contains(protocol) {
            return Err(Rejection::new(
                Code::Disallowed,
                format!(
                    "protocol {} is not enabled for package {}",
                    protocol.as_str(),
                    package.id()
                ),
            ));
        }
        if let Some(target) = target {
            self.targets.check_target(target)?;
        }
        // 8: traffic cap.
        if package.usage.over_cap(package.decl.traffic_limit_bytes) {
            return Err(Rejection::new(
                Code::TrafficLimitExceeded,
                format!(
                    "package {} used its traffic cap of {} bytes",
                    package.id(),
                    package.decl.traffic_limit_bytes
                ),
            ));
        }
        // 9: rate, then connections.
        if !package.usage.try_request(package.decl.rps_limit, now) {
            return Err(Rejection::new(
                Code::RateLimitExceeded,
                format!(
                    "package {} is over its limit of {} requests per second",
                    package.id(),
                    package.decl.rps_limit
                ),
            ));
        }
        if !conn.as_ref().is_some_and(|g| g.is_for(&package.usage)) {
            *conn = None;
            *conn = Some(
                package
                    .usage
                    .try_connect(package.decl.max_connections)
                    .ok_or_else(|| {
                        Rejection::new(
                            Code::RateLimitExceeded,
                            match package.usage.fleet_share() {
                                Some(share) if share < package.decl.max_connections => format!(
                                    "package {} is at its limit of {} open connections across the fleet ({} of them on this gateway, its share now)",
                                    package.id(),
                                    package.decl.max_connections,
                                    share
                                ),
                                _ => format!(
                                    "package {} has {} open connections, its limit",
                                    package.id(),
                                    package.decl.max_connections
                                ),
                            },
                        )
                    })?,
            );
        }
        let mut filter = filter_for(&rules, package.decl.networks);
        filter.udp = target.is_none();
        Ok(Admitted {
            package: package.clone(),
            rules,
            target: target.cloned().unwrap_or_else(|| {
                Target::new(Host::Ip(std::net::Ipv4Addr::UNSPECIFIED.into()), 0)
            }),
            filter,
        })
    }

    /// Whether an open tunnel or keep-alive connection of `package` may go
    /// on (status, credits, traffic cap), for the periodic re-check: a
    /// paused or suspended package, an organisation out of credits, or a
    /// crossed cap closes them. The key is not looked at: a rotation closes
    /// nothing.
    pub fn may_continue(package: &Package) -> Result<(), Rejection> {
        status_check(package)?;
        if package.usage.over_cap(package.decl.traffic_limit_bytes) {
            return Err(Rejection::new(
                Code::TrafficLimitExceeded,
                "the package's traffic cap was reached",
            ));
        }
        Ok(())
    }
}

/// Checks 4–5 for a package: status, then the organisation's credits.
pub fn status_check(package: &Package) -> Result<(), Rejection> {
    match package.decl.status {
        PackageStatus::Active => {}
        PackageStatus::Paused => {
            return Err(Rejection::new(
                Code::PackagePaused,
                format!("package {} is paused", package.id()),
            ));
        }
        PackageStatus::Suspended => {
            return Err(Rejection::new(
                Code::PackageSuspended,
                format!(
                    "package {} is suspended; contact the operator",
                    package.id()
                ),
            ));
        }
    }
    if let Some(org) = &package.org
        && !org.account.has_credits()
    {
        return Err(Rejection::new(
            Code::PackageNoCredits,
            format!(
                "organisation {} has no credits left; add credits to continue",
                org.decl.id
            ),
        ));
    }
    Ok(())
}

/// The node filter for rules within a package's networks.
pub fn filter_for(rules: &Rules, networks: NetworkSet) -> Filter {
    Filter {
        country: rules.country_code(),
        region: rules.region,
        city: rules.city,
        isp: rules.isp,
        asn: rules.asn,
        networks: Some(match rules.network {
            Some(NetworkRule::Is(n)) => NetworkSet::of([n]),
            _ => networks,
        }),
        udp: false,
    }
}

#[cfg(test)]
pub(crate) mod tests;
