//! The configuration file: read once, at the edge, validated, and turned into
//! typed values for the inner crates. Unknown keys are errors that name the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use ipnet::IpNet;
use serde::Deserialize;
use splicegate_admin::StoreLocation;
use splicegate_control::decl::{NodeFields, PackageFields, catalogue_name};
use splicegate_control::geo::{Country, GeoKind};
use splicegate_control::limits::credits_to_micro;
use splicegate_control::policy::{Declarations, OrgDecl};
use splicegate_control::safety::TargetPolicy;

/// The embedded demo, served when no `--config` is given.
pub(crate) const DEMO: &str = include_str!("demo.toml");

/// The whole file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    #[serde(default)]
    pub proxy: ProxySection,
    /// The admin API; absent: no API, no store, no health checks.
    pub admin: Option<AdminSection>,
    /// The embedded store (used with `[admin]`).
    pub store: Option<StoreSection>,
    /// A fleet of gateways sharing Redis and the PostgreSQL store.
    pub fleet: Option<FleetSection>,
    #[serde(default)]
    pub safety: SafetySection,
    #[serde(default)]
    pub timeouts: TimeoutsSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub ebpf: EbpfSection,
    /// TLS to the proxy ports; absent: a ClientHello gets an alert.
    pub tls: Option<TlsSection>,
    /// The listener agents (devices behind NAT) dial; absent: no agents.
    pub agents: Option<AgentsSection>,
    #[serde(default)]
    pub health: HealthSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub geo: GeoSection,
    #[serde(default)]
    pub demo: DemoSection,
    #[serde(default)]
    pub listener: Vec<ListenerEntry>,
    #[serde(default)]
    pub org: Vec<OrgEntry>,
    #[serde(default)]
    pub package: Vec<PackageFields>,
    #[serde(default)]
    pub node: Vec<NodeFields>,
    /// The file's orgs, packages, nodes, catalogue and safety, converted and
    /// checked once by [`Config::parse`].
    #[serde(skip)]
    decls: Declarations,
}

/// `workers = 2` or `workers = "auto"`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(untagged)]
pub(crate) enum Workers {
    Count(usize),
    Auto(AutoWord),
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum AutoWord {
    Auto,
}

impl Workers {
    pub(crate) fn resolve(self) -> usize {
        match self {
            Workers::Count(n) => n.max(1),
            Workers::Auto(_) => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ProxySection {
    pub listen: SocketAddr,
    pub workers: Workers,
    /// Pin worker i to CPU i.
    pub pin_workers: bool,
    /// The main port admits only TLS.
    pub tls_only: bool,
    /// Every connection to the main port starts with a PROXY protocol
    /// header (v1 or v2) from a load balancer, whose source address is the
    /// client's.
    pub proxy_protocol: bool,
    /// The address a SOCKS5 UDP ASSOCIATE reply names (behind NAT or a
    /// load balancer); default: the local address of the client's TCP
    /// connection.
    pub udp_advertise: Option<std::net::IpAddr>,
    /// While an association's datagrams arrive in runs, its worker gathers
    /// completions for up to this many microseconds before waking; 0: never.
    pub udp_gather_us: u64,
}

/// `[proxy] udp_gather_us` when the file does not set it.
pub(crate) const DEFAULT_UDP_GATHER_US: u64 = 50;

/// `[tls]`: the certificate (PEM chain, leaf first) and its key (PEM),
/// re-read on SIGHUP.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsSection {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[agents]`: where devices dial in (TLS 1.3), with `[tls]`'s certificate
/// or their own, and how they enrol.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentsSection {
    pub listen: SocketAddr,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    #[serde(default = "default_heartbeat_s")]
    pub heartbeat_s: u64,
    /// The fleet's enrolment secret (a device presenting it becomes a node).
    pub enrol_key: Option<String>,
    /// MaxMind-format databases (City, Country, ASN, ISP) that give an
    /// enrolling device the attributes of the address it connected from.
    #[serde(default)]
    pub geoip: Vec<PathBuf>,
}

fn default_heartbeat_s() -> u64 {
    25
}

impl AgentsSection {
    /// The certificate and key: `[agents]`'s own, else `[tls]`'s.
    pub(crate) fn cert_and_key(&self, tls: Option<&TlsSection>) -> Result<(PathBuf, PathBuf)> {
        match (&self.cert, &self.key, tls) {
            (Some(c), Some(k), _) => Ok((c.clone(), k.clone())),
            (None, None, Some(t)) => Ok((t.cert.clone(), t.key.clone())),
            (None, None, None) => bail!("[agents] needs a certificate: cert and key, or [tls]"),
            _ => bail!("[agents] takes cert and key together"),
        }
    }
}

impl Default for ProxySection {
    fn default() -> Self {
        ProxySection {
            listen: "127.0.0.1:5000".parse().expect("literal"),
            workers: Workers::Auto(AutoWord::Auto),
            pin_workers: true,
            tls_only: false,
            proxy_protocol: false,
            udp_advertise: None,
            udp_gather_us: DEFAULT_UDP_GATHER_US,
        }
    }
}

/// `[admin]`: its presence turns on the API, the store and the health checks.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct AdminSection {
    /// Default `127.0.0.1:9090`.
    pub listen: Option<SocketAddr>,
    /// Bearer token for every endpoint but `/healthz` (and the dashboard page).
    pub token: Option<String>,
}

impl AdminSection {
    /// The API's address.
    pub(crate) fn listen(&self) -> SocketAddr {
        self.listen
            .unwrap_or_else(|| "127.0.0.1:9090".parse().expect("literal"))
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct StoreSection {
    /// SQLite file (relative to the working directory), or `":memory:"`.
    pub path: Option<PathBuf>,
    /// PostgreSQL instead (`postgres://user@host/db`); not with `path`.
    pub url: Option<String>,
    /// The local snapshot of a PostgreSQL store (default
    /// `splicegate-snapshot.json` in the working directory).
    pub snapshot: Option<PathBuf>,
}

/// `[fleet]`: this gateway is one of several sharing Redis and the
/// PostgreSQL store (SPEC section 11).
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct FleetSection {
    /// Unique among live gateways; default: the host name.
    pub id: Option<String>,
    /// `redis://host:port/db`, `rediss://…` or `unix:///path/redis.sock`.
    pub redis: String,
    /// The prefix of the fleet's Redis keys and channel.
    #[serde(default = "default_fleet_prefix")]
    pub prefix: String,
    /// The proxy address the fleet shows for this gateway; default: the
    /// `[proxy] listen` address as bound.
    pub advertise: Option<SocketAddr>,
    /// Seconds between full reads of the shared store (changes announced
    /// on the channel are read at once).
    #[serde(default = "default_fleet_reload_s")]
    pub reload_s: u64,
    /// Bytes of a traffic-cap lease (a credit lease is that many bytes at
    /// the package's price); default 1 MB.
    #[serde(default = "default_fleet_lease_bytes")]
    pub lease_bytes: u64,
}

fn default_fleet_lease_bytes() -> u64 {
    1_000_000
}

fn default_fleet_prefix() -> String {
    "splicegate".into()
}

fn default_fleet_reload_s() -> u64 {
    30
}

impl FleetSection {
    /// `[fleet] id`, else the host name.
    pub(crate) fn id(&self) -> Result<String> {
        match &self.id {
            Some(id) => Ok(id.clone()),
            None => {
                let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .context("[fleet] id is not set and the host name cannot be read")?;
                Ok(name.trim().to_string())
            }
        }
    }
}

/// An id for Redis keys, logs and the `gateway` label: 1 to 64 of
/// `A-Z a-z 0-9 . _ -`.
fn valid_fleet_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct SafetySection {
    pub allow_targets: Vec<IpNet>,
    pub blocked_ports: Vec<u16>,
}

impl Default for SafetySection {
    fn default() -> Self {
        SafetySection {
            allow_targets: Vec::new(),
            blocked_ports: vec![25],
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct TimeoutsSection {
    pub node_connect_ms: u64,
    pub target_ms: u64,
    pub idle_s: u64,
    pub handshake_ms: u64,
    pub resolve_ms: u64,
    pub drain_grace_s: u64,
    /// A SOCKS5 UDP association with no datagram either way ends after this.
    pub udp_idle_s: u64,
}

impl Default for TimeoutsSection {
    fn default() -> Self {
        TimeoutsSection {
            node_connect_ms: 3000,
            target_ms: 10_000,
            idle_s: 300,
            handshake_ms: 10_000,
            resolve_ms: 2000,
            drain_grace_s: 30,
            udp_idle_s: 300,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct LimitsSection {
    pub max_head_bytes: usize,
    pub max_line_bytes: usize,
    pub max_headers: usize,
    pub session_capacity: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_head_bytes: 16 * 1024,
            max_line_bytes: 8 * 1024,
            max_headers: 100,
            session_capacity: 1_000_000,
        }
    }
}

/// Kernel enforcement settings (the programs arrive with the eBPF work; the
/// keys are accepted and validated now so files need not change).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct EbpfSection {
    pub enabled: bool,
    pub interface: String,
    pub mode: EbpfMode,
    pub syn_rate: u32,
    pub syn_burst: u32,
    pub ban_threshold: u32,
    pub ban_window_s: u64,
    pub ban_s: u64,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum EbpfMode {
    Xdp,
    XdpGeneric,
    Tc,
}

impl Default for EbpfSection {
    fn default() -> Self {
        EbpfSection {
            enabled: false,
            interface: "lo".into(),
            mode: EbpfMode::XdpGeneric,
            syn_rate: 2_000,
            syn_burst: 4_000,
            ban_threshold: 20,
            ban_window_s: 60,
            ban_s: 600,
        }
    }
}

/// Node health probing (with `[admin]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct HealthSection {
    /// `host:port` reached through each node; none: a TCP connect to the node.
    pub probe_target: Option<String>,
    /// Seconds between probes of a node (jittered by ±20 %).
    pub interval_s: u64,
    /// Consecutive failures that take a node out.
    pub failures: u32,
}

impl Default for HealthSection {
    fn default() -> Self {
        HealthSection {
            probe_target: None,
            interval_s: 10,
            failures: 3,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct LogSection {
    /// `info`, `debug`, … or a tracing filter.
    pub level: String,
    /// Access log: "off", "stderr", "stdout" or a file path.
    pub access: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: "info".into(),
            access: "off".into(),
        }
    }
}

/// Extra catalogue names per country: `cities = { us = ["new_york"] }`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct GeoSection {
    pub regions: BTreeMap<String, Vec<String>>,
    pub cities: BTreeMap<String, Vec<String>>,
    pub isps: BTreeMap<String, Vec<String>>,
}

/// The built-in target that answers with the address it sees.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct DemoSection {
    pub echo_listen: Option<SocketAddr>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListenerEntry {
    pub listen: SocketAddr,
    pub package: Option<u64>,
    #[serde(default)]
    pub ip_only: bool,
    /// Admit only TLS on this port.
    #[serde(default)]
    pub tls_only: bool,
    /// Connections start with a PROXY protocol header (as `[proxy]`'s).
    #[serde(default)]
    pub proxy_protocol: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OrgEntry {
    pub id: String,
    #[serde(default)]
    pub credits: f64,
}

fn country(owner: &str, c: &str) -> Result<Country> {
    c.parse::<Country>().map_err(|e| anyhow!("{owner}: {e}"))
}

impl Config {
    /// Parse a file's text.
    pub(crate) fn parse(text: &str) -> Result<Config> {
        let mut cfg: Config =
            toml::from_str(text).map_err(|e| anyhow!("{}", e.to_string().trim_end()))?;
        cfg.decls = cfg.convert()?;
        if cfg.proxy.workers == Workers::Count(0) {
            bail!("proxy.workers must be at least 1 (or \"auto\")");
        }
        if cfg.proxy.udp_gather_us > 1000 {
            bail!("proxy.udp_gather_us must be 0 to 1000 (microseconds)");
        }
        if cfg.proxy.tls_only && cfg.tls.is_none() {
            bail!("proxy.tls_only needs [tls] (cert and key)");
        }
        let mut seen = std::collections::HashSet::from([cfg.proxy.listen]);
        // The kernel programs tell ports apart by number alone, and must
        // not apply per-source rules to a PROXY protocol port (every packet
        // there comes from the load balancer).
        let mut by_port = std::collections::HashMap::new();
        let ports = std::iter::once((cfg.proxy.listen, cfg.proxy.proxy_protocol))
            .chain(cfg.listener.iter().map(|l| (l.listen, l.proxy_protocol)));
        for (at, pp) in ports.filter(|(at, _)| at.port() != 0) {
            if cfg.ebpf.enabled && *by_port.entry(at.port()).or_insert(pp) != pp {
                bail!(
                    "port {}: with [ebpf] enabled, a port number is either a proxy_protocol port or not on every address (the kernel programs see the port, not the address)",
                    at.port()
                );
            }
        }
        for l in &cfg.listener {
            if l.tls_only && cfg.tls.is_none() {
                bail!("listener {}: tls_only needs [tls] (cert and key)", l.listen);
            }
            if l.ip_only && l.package.is_none() {
                bail!("listener {}: ip_only needs a package", l.listen);
            }
            // SO_REUSEPORT would let two listeners share one address and split
            // its clients between them at random. Port 0 is a new port each
            // time it is bound, never a shared one.
            if l.listen.port() != 0 && !seen.insert(l.listen) {
                bail!(
                    "listener {}: the address is already used by [proxy] listen or another [[listener]]",
                    l.listen
                );
            }
        }
        if let Some(StoreSection {
            path: Some(_),
            url: Some(_),
            ..
        }) = &cfg.store
        {
            bail!("[store] takes path (SQLite) or url (PostgreSQL), not both");
        }
        if let Some(a) = &cfg.agents {
            a.cert_and_key(cfg.tls.as_ref())?;
            if a.heartbeat_s == 0 || a.heartbeat_s > 3600 {
                bail!("agents.heartbeat_s must be 1 to 3600");
            }
            if a.enrol_key.as_deref().is_some_and(|k| k.len() < 16) {
                bail!("agents.enrol_key must be at least 16 characters");
            }
            if a.enrol_key.is_some() && cfg.admin.is_none() {
                bail!("agents.enrol_key needs [admin] (enrolled devices are kept in the store)");
            }
        }
        cfg.check_operations()?;
        Ok(cfg)
    }

    /// `[admin]`, `[store]` and `[health]` values.
    fn check_operations(&self) -> Result<()> {
        if let Some(a) = &self.admin
            && a.token.as_deref().is_some_and(|t| t.trim().is_empty())
        {
            bail!("admin.token is empty: remove it to serve the API without a token");
        }
        if let Some(s) = &self.store {
            if s.path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                bail!("store.path is empty");
            }
            if s.url.as_ref().is_some_and(|u| u.trim().is_empty()) {
                bail!("store.url is empty");
            }
        }
        if let Some(f) = &self.fleet {
            self.check_fleet(f)?;
        }
        let h = &self.health;
        if h.interval_s == 0 {
            bail!("health.interval_s must be at least 1");
        }
        if h.failures == 0 {
            bail!("health.failures must be at least 1");
        }
        if let Some(t) = &h.probe_target {
            let port = t.rsplit_once(':').map(|(host, p)| (host, p.parse::<u16>()));
            if !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p != 0) {
                bail!("health.probe_target {t:?} is not host:port");
            }
        }
        Ok(())
    }

    /// `[fleet]` needs the API and the PostgreSQL store, and keeps accounts
    /// out of the file.
    fn check_fleet(&self, f: &FleetSection) -> Result<()> {
        let id = f.id()?;
        if !valid_fleet_id(&id) {
            bail!(
                "fleet.id {id:?} must be 1 to 64 letters, digits, '.', '_' or '-' (it names Redis keys and the gateway label)"
            );
        }
        if f.redis.trim().is_empty() {
            bail!("fleet.redis is empty");
        }
        if !valid_fleet_id(&f.prefix) {
            bail!(
                "fleet.prefix {:?} must be 1 to 64 letters, digits, '.', '_' or '-'",
                f.prefix
            );
        }
        if f.reload_s == 0 || f.reload_s > 3600 {
            bail!("fleet.reload_s must be 1 to 3600");
        }
        if !(1_000..=1_000_000_000_000).contains(&f.lease_bytes) {
            bail!("fleet.lease_bytes must be 1000 (1 kB) to 10^12 (1 TB)");
        }
        if self.admin.is_none() {
            bail!(
                "[fleet] needs [admin]: the fleet's accounts and nodes are managed through the API"
            );
        }
        if !matches!(self.store, Some(StoreSection { url: Some(_), .. })) {
            bail!(
                "[fleet] needs [store] url (PostgreSQL): the gateways of a fleet share one store"
            );
        }
        if !self.org.is_empty() || !self.package.is_empty() {
            bail!(
                "in a fleet, accounts live in PostgreSQL: remove [[org]] and [[package]] from the file and create them through the admin API (or move an embedded store there with `splicegate store migrate`)"
            );
        }
        Ok(())
    }

    /// Where a PostgreSQL store's local snapshot goes (`[store] snapshot`,
    /// default `splicegate-snapshot.json`); none for SQLite.
    pub(crate) fn store_snapshot(&self) -> Option<PathBuf> {
        match &self.store {
            Some(StoreSection {
                url: Some(_),
                snapshot,
                ..
            }) => Some(
                snapshot
                    .clone()
                    .unwrap_or_else(|| "splicegate-snapshot.json".into()),
            ),
            _ => None,
        }
    }

    /// Where the store lives: `[store] url` (PostgreSQL), else `[store]
    /// path` (SQLite, default `splicegate.db`).
    pub(crate) fn store_location(&self) -> StoreLocation {
        match &self.store {
            Some(StoreSection { url: Some(url), .. }) => StoreLocation::Postgres(url.clone()),
            Some(StoreSection {
                path: Some(path), ..
            }) => StoreLocation::Sqlite(path.clone()),
            _ => StoreLocation::Sqlite("splicegate.db".into()),
        }
    }

    /// Read and parse a file.
    pub(crate) fn load(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// The per-source connection rate and ban rules (`[ebpf]` keys; they
    /// hold in user space when the kernel programs are not attached).
    pub(crate) fn guard_config(&self) -> splicegate_control::guard::GuardConfig {
        let e = &self.ebpf;
        splicegate_control::guard::GuardConfig {
            syn_rate: e.syn_rate,
            syn_burst: e.syn_burst,
            ban_threshold: e.ban_threshold,
            ban_window_s: e.ban_window_s,
            ban_s: e.ban_s,
            ..splicegate_control::guard::GuardConfig::default()
        }
    }

    /// The worker settings.
    pub(crate) fn settings(&self) -> splicegate_worker::Settings {
        let t = &self.timeouts;
        splicegate_worker::Settings {
            handshake: Duration::from_millis(t.handshake_ms.max(1)),
            node_connect: Duration::from_millis(t.node_connect_ms.max(1)),
            target: Duration::from_millis(t.target_ms.max(1)),
            idle: Duration::from_secs(t.idle_s.max(1)),
            resolve: Duration::from_millis(t.resolve_ms.max(1)),
            limits: splicegate_proto::http::Limits {
                max_head_bytes: self.limits.max_head_bytes,
                max_line_bytes: self.limits.max_line_bytes,
                max_headers: self.limits.max_headers,
            },
            udp_idle: Duration::from_secs(t.udp_idle_s.max(1)),
            udp_advertise: self.proxy.udp_advertise,
            udp_gather: Duration::from_micros(self.proxy.udp_gather_us),
        }
    }

    /// The policy declarations (orgs, packages, nodes, catalogue, safety),
    /// each value checked. Whether they make a policy (organisations that
    /// exist, allowlists that do not overlap, default rules that parse) is
    /// known when the policy is built: once, by whoever serves it, or by
    /// [`Config::check_policy`].
    pub(crate) fn declarations(&self) -> &Declarations {
        &self.decls
    }

    /// Build the policy once to report what only a whole policy can tell
    /// (`check-config`; serving builds its own).
    pub(crate) fn check_policy(&self) -> Result<()> {
        splicegate_control::policy::Policy::build(&self.decls, None).map_err(|e| anyhow!(e))?;
        Ok(())
    }

    fn convert(&self) -> Result<Declarations> {
        let mut d = Declarations {
            targets: TargetPolicy {
                allow: self.safety.allow_targets.clone(),
                blocked_ports: self.safety.blocked_ports.clone(),
            },
            ..Declarations::default()
        };
        for (kind, map) in [
            (GeoKind::Region, &self.geo.regions),
            (GeoKind::City, &self.geo.cities),
            (GeoKind::Isp, &self.geo.isps),
        ] {
            for (c, list) in map {
                let c = country("[geo]", c)?;
                for n in list {
                    catalogue_name("name", n).map_err(|e| anyhow!("[geo]: {e}"))?;
                    d.geo.push((c, kind, n.clone()));
                }
            }
        }
        for o in &self.org {
            let credits = credits_to_micro(o.credits)
                .ok_or_else(|| anyhow!("org {}: credits out of range", o.id))?;
            d.orgs.push(OrgDecl {
                id: o.id.clone(),
                credits,
                from_file: true,
            });
        }
        // Packages and nodes: the schema the admin API reads too.
        for p in &self.package {
            let mut decl = p.to_decl()?;
            decl.from_file = true;
            d.packages.push(decl);
        }
        for n in &self.node {
            let mut decl = n.to_decl()?;
            decl.from_file = true;
            d.nodes.push(decl);
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_is_on_only_with_its_section() {
        let c = Config::parse("[proxy]\nworkers = 1\n").unwrap();
        assert!(c.admin.is_none(), "old configs: no API, no store");
        let c = Config::parse("[admin]\n").unwrap();
        assert_eq!(
            c.admin.as_ref().unwrap().listen(),
            "127.0.0.1:9090".parse().unwrap()
        );
        assert_eq!(
            c.store_location(),
            StoreLocation::Sqlite("splicegate.db".into())
        );
        let c = Config::parse(
            "[admin]\nlisten = \"127.0.0.1:9\"\ntoken = \"t\"\n[store]\npath = \"x.db\"\n[health]\nprobe_target = \"example.com:80\"\n",
        )
        .unwrap();
        assert_eq!(
            c.admin.as_ref().unwrap().listen(),
            "127.0.0.1:9".parse().unwrap()
        );
        assert_eq!(c.store_location(), StoreLocation::Sqlite("x.db".into()));
        let c = Config::parse("[admin]\n[store]\nurl = \"postgres://sg@db/sg\"\n").unwrap();
        assert_eq!(
            c.store_location(),
            StoreLocation::Postgres("postgres://sg@db/sg".into())
        );
        let e = Config::parse("[store]\npath = \"x.db\"\nurl = \"postgres://db/sg\"\n")
            .err()
            .unwrap();
        assert!(e.to_string().contains("not both"), "{e}");
    }

    #[test]
    fn a_fleet_needs_the_api_postgresql_and_no_file_accounts() {
        let ok = "[admin]\n[store]\nurl = \"host=/tmp\"\n[fleet]\nid = \"gw-1\"\nredis = \"redis://127.0.0.1:6379/0\"\n";
        let c = Config::parse(ok).unwrap();
        let f = c.fleet.as_ref().unwrap();
        assert_eq!(f.id().unwrap(), "gw-1");
        assert_eq!(f.prefix, "splicegate");
        assert_eq!(f.reload_s, 30);
        assert_eq!(f.lease_bytes, 1_000_000);
        let refused = |text: &str, says: &str| {
            let e = Config::parse(text).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        };
        refused(
            "[store]\nurl = \"host=/tmp\"\n[fleet]\nredis = \"redis://h\"\nid = \"a\"\n",
            "[fleet] needs [admin]",
        );
        refused(
            "[admin]\n[fleet]\nredis = \"redis://h\"\nid = \"a\"\n",
            "[fleet] needs [store] url",
        );
        refused(
            &format!("{ok}[[org]]\nid = \"acme\"\n"),
            "accounts live in PostgreSQL",
        );
        refused(&ok.replace("gw-1", "gw 1"), "fleet.id \"gw 1\" must be");
        refused(
            &ok.replace("redis://127.0.0.1:6379/0", " "),
            "fleet.redis is empty",
        );
        refused(&format!("{ok}reload_s = 0\n"), "fleet.reload_s");
        refused(&format!("{ok}lease_bytes = 10\n"), "fleet.lease_bytes");
        // The file's direct nodes stay: they belong to this gateway.
        let with_node =
            format!("{ok}[[node]]\nid = \"d1\"\nkind = \"direct\"\nbind = \"127.0.0.2\"\n");
        assert!(Config::parse(&with_node).is_ok());
    }

    #[test]
    fn the_demo_parses() {
        let c = Config::parse(DEMO).unwrap();
        assert!(c.admin.is_some(), "the demo serves the admin API");
        assert_eq!(c.store_location(), StoreLocation::Sqlite(":memory:".into()));
        assert!(c.demo.echo_listen.is_some());
        assert!(c.node.len() >= 3);
        assert!(!c.safety.allow_targets.is_empty());
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::parse("[proxy]\nlisten = \"127.0.0.1:1\"\nworkerz = 2\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("workerz"), "{e}");
        let e = Config::parse("[timeouts]\nnode_conect_ms = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("node_conect_ms"), "{e}");
        let e = Config::parse("[[package]]\nid = 1\nkey = \"k\"\nrps = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rps"), "{e}");
    }

    #[test]
    fn values_are_checked() {
        for (text, needle) in [
            (
                "[[package]]\nid = 1\nkey = \"k\"\nstatus = \"on\"\n",
                "status",
            ),
            (
                "[[package]]\nid = 1\nkey = \"k\"\nprotocols = [\"ftp\"]\n",
                "ftp",
            ),
            (
                "[[package]]\nid = 1\nkey = \"k\"\norg = \"x\"\n",
                "no organisation x",
            ),
            ("[[node]]\nid = \"n\"\nkind = \"http\"\n", "needs addr"),
            (
                "[[node]]\nid = \"n\"\nkind = \"direct\"\nbind = \"127.0.0.1\"\ncountry = \"USA\"\n",
                "ISO",
            ),
            (
                "[[node]]\nid = \"n\"\nkind = \"direct\"\nbind = \"127.0.0.1\"\ncity = \"New York\"\n",
                "catalogue name",
            ),
            ("[proxy]\nworkers = 0\n", "at least 1"),
            ("[proxy]\nworkers = \"many\"\n", "workers"),
            (
                "[proxy]\nudp_gather_us = 1001\n",
                "udp_gather_us must be 0 to 1000",
            ),
            (
                "[[listener]]\nlisten = \"127.0.0.1:1\"\nip_only = true\n",
                "needs a package",
            ),
            ("[admin]\ntoken = \"\"\n", "admin.token"),
            ("[admin]\nlisen = \"127.0.0.1:1\"\n", "lisen"),
            ("[health]\nfailures = 0\n", "health.failures"),
            ("[health]\ninterval_s = 0\n", "health.interval_s"),
            ("[health]\nprobe_target = \"example.com\"\n", "host:port"),
        ] {
            let checked = Config::parse(text).and_then(|c| c.check_policy());
            let e = format!("{:#}", checked.unwrap_err());
            assert!(e.contains(needle), "{text}: {e}");
        }
        let gather = |text: &str| Config::parse(text).unwrap().settings().udp_gather;
        assert_eq!(gather(""), Duration::from_micros(50));
        assert_eq!(gather("[proxy]\nudp_gather_us = 0\n"), Duration::ZERO);
        assert_eq!(
            Config::parse("[proxy]\nworkers = \"auto\"\n")
                .unwrap()
                .proxy
                .workers,
            Workers::Auto(AutoWord::Auto)
        );
    }

    #[test]
    fn port_zero_may_be_listed_twice_a_real_port_may_not() {
        let zero = "[proxy]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nlisten = \"127.0.0.1:0\"\n";
        assert!(Config::parse(zero).is_ok());
        let twice = "[proxy]\nlisten = \"127.0.0.1:7\"\n[[listener]]\nlisten = \"127.0.0.1:7\"\n";
        let e = format!("{:#}", Config::parse(twice).unwrap_err());
        assert!(e.contains("already used"), "{e}");
    }

    #[test]
    fn proxy_protocol_on_the_main_port_and_per_listener() {
        let cfg = Config::parse(
            "[proxy]\nproxy_protocol = true\n[[listener]]\nlisten = \"127.0.0.1:0\"\npackage = 7\nip_only = true\nproxy_protocol = true\n[[listener]]\nlisten = \"127.0.0.1:0\"\n",
        )
        .unwrap();
        assert!(cfg.proxy.proxy_protocol);
        assert!(cfg.listener[0].proxy_protocol);
        assert!(!cfg.listener[1].proxy_protocol);
        assert!(!Config::parse("").unwrap().proxy.proxy_protocol);
        // Two addresses on one port number, one behind a load balancer: fine
        // in user space, refused where the kernel programs (which see only
        // the port) would judge both.
        let shared = "[proxy]\nlisten = \"127.0.0.1:5000\"\nproxy_protocol = true\n[[listener]]\nlisten = \"127.0.0.2:5000\"\n";
        assert!(Config::parse(shared).is_ok());
        let e = format!(
            "{:#}",
            Config::parse(&format!("{shared}[ebpf]\nenabled = true\n")).unwrap_err()
        );
        assert!(
            e.contains("port 5000") && e.contains("proxy_protocol"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            Config::parse("[[listener]]\nlisten = \"127.0.0.1:1\"\nproxy_protocl = true\n")
                .unwrap_err()
        );
        assert!(e.contains("proxy_protocl"), "{e}");
    }
}
