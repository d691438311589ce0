//! Kernel enforcement for splicegate (docs/configuration.md, `[ebpf]`).
//!
//! BPF programs written in C (`bpf/splicegate.bpf.c`, layouts in `bpf/abi.h`,
//! built reproducibly by `build.sh` into the committed `bpf/splicegate.bpf.o`)
//! drop, before any socket exists, TCP packets to the gateway's ports that
//!
//! - come from a **banned** source, until the ban expires ([`Enforcer::ban`]);
//! - go to an **`ip_only`** port from a source not on that port's allowlist
//!   ([`Enforcer::set_ip_only`]);
//! - open a **new connection** (SYN without ACK) to a proxy port above the
//!   source's `syn_rate`/`syn_burst` ([`EnforcerConfig`]).
//!
//! Checks run in that order; the first that matches decides. A "source" is an
//! IPv4 address or an IPv6 /64 for bans and rates ([`source_prefix`]), and the
//! exact address for allowlists. Only TCP packets whose destination port is a
//! configured proxy or `ip_only` port are judged and counted; everything else —
//! other ports, non-TCP, non-IP, IP fragments, packets too short or malformed
//! to parse, IPv6 with more than six extension headers — passes untouched.
//!
//! The same program runs as XDP (native on a NIC, generic on `lo`) or as a TC
//! ingress classifier ([`AttachMode`]). This crate is the only one that uses
//! aya; its public API has no aya types.
//!
//! Without CAP_BPF and CAP_NET_ADMIN, [`Enforcer::attach`] fails with
//! [`Error::NoPrivileges`], and the gateway falls back to applying the same
//! rules in user space (accept and close at once).
//!
//! ```no_run
//! use std::{net::IpAddr, time::Duration};
//! use splicegate_ebpf::{AttachMode, Enforcer, EnforcerConfig, Error};
//!
//! let cfg = EnforcerConfig {
//!     interface: "eth0".into(),
//!     mode: AttachMode::Xdp,
//!     proxy_ports: vec![5000, 10007],
//!     syn_rate: 20,
//!     syn_burst: 40,
//! };
//! match Enforcer::attach(&cfg) {
//!     Ok(mut enforcer) => {
//!         enforcer.set_ip_only(10007, &["203.0.113.0/24".parse().unwrap()])?;
//!         enforcer.ban("198.51.100.7".parse::<IpAddr>().unwrap(), Duration::from_secs(600))?;
//!         println!("{:?}", enforcer.counters()?);
//!     }
//!     Err(Error::NoPrivileges(reason)) => eprintln!("enforcing in user space: {reason}"),
//!     Err(e) => return Err(e),
//! }
//! # Ok::<(), Error>(())
//! ```
// Unsafe code is denied by the workspace; `abi` allows it for its `Pod` impls
// alone (forbid would not let it).
#![deny(unsafe_code)]

mod abi;
mod netlink;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashSet},
    error::Error as StdError,
    fmt, io,
    net::IpAddr,
    str::FromStr,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, lpm_trie::Key, lpm_trie::LpmTrie},
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcError},
        xdp::XdpLinkId,
    },
    util::KernelVersion,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::abi::{SgAllowData, SgBan, SgConfig, SgCounter, SgSrcKey};

/// The compiled BPF object (`bpf/splicegate.bpf.o`, rebuilt by `build.sh`).
static OBJECT: &[u8] = include_bytes_aligned!("../bpf/splicegate.bpf.o");

/// What the kernel programs decide for a packet they judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Let the packet through to the socket layer.
    Pass,
    /// New connection above the source's rate.
    DropRate,
    /// Source not on an `ip_only` listener's allowlist.
    DropNotAllowed,
    /// Source banned (for repeated authentication failures) and the ban has
    /// not expired.
    DropBanned,
}

impl Verdict {
    /// All verdicts, in the order of their codes in `abi.h`.
    pub const ALL: [Self; 4] = [
        Self::Pass,
        Self::DropRate,
        Self::DropNotAllowed,
        Self::DropBanned,
    ];

    /// The verdict's code in `abi.h` (`SG_VERDICT_*`), also its counter index.
    pub const fn code(self) -> u32 {
        match self {
            Self::Pass => abi::VERDICT_PASS,
            Self::DropRate => abi::VERDICT_DROP_RATE,
            Self::DropNotAllowed => abi::VERDICT_DROP_NOT_ALLOWED,
            Self::DropBanned => abi::VERDICT_DROP_BANNED,
        }
    }

    /// A short name, fit for a metrics label: `pass`, `drop_rate`,
    /// `drop_not_allowed`, `drop_banned`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::DropRate => "drop_rate",
            Self::DropNotAllowed => "drop_not_allowed",
            Self::DropBanned => "drop_banned",
        }
    }
}

/// Where and how the program hooks into the interface's receive path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AttachMode {
    /// Native XDP, run by the driver before an skb exists (a NIC, veth).
    /// Fails on interfaces whose driver has no XDP support, such as `lo`.
    #[default]
    Xdp,
    /// Generic XDP, run by the kernel on the skb: any interface, `lo` too.
    XdpGeneric,
    /// TC ingress classifier: a TCX link on kernels from 6.6, else a `clsact`
    /// qdisc filter (the qdisc created if absent and removed on detach if this
    /// created it and no other filter uses it).
    Tc,
}

impl AttachMode {
    /// The configuration spelling: `xdp`, `xdp-generic` or `tc`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Xdp => "xdp",
            Self::XdpGeneric => "xdp-generic",
            Self::Tc => "tc",
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AttachMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "xdp" => Ok(Self::Xdp),
            "xdp-generic" => Ok(Self::XdpGeneric),
            "tc" => Ok(Self::Tc),
            other => Err(Error::InvalidConfig(format!(
                "unknown eBPF mode {other:?} (expected xdp, xdp-generic or tc)"
            ))),
        }
    }
}

/// What [`Enforcer::attach`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnforcerConfig {
    /// Interface to attach to (`[ebpf] interface`).
    pub interface: String,
    /// How to attach.
    pub mode: AttachMode,
    /// Ports whose new connections are rate-limited per source. An `ip_only`
    /// listener's port belongs here too if its SYNs should be limited.
    pub proxy_ports: Vec<u16>,
    /// New connections (SYNs) per second admitted from one source; 0 turns
    /// the limiter off.
    pub syn_rate: u32,
    /// SYNs one source may send at once before `syn_rate` applies; at least 1
    /// when `syn_rate` is set.
    pub syn_burst: u32,
}

/// Packets and bytes counted for one verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes, as frames from their L2 header.
    pub bytes: u64,
}

/// Counters per verdict, summed over CPUs, since the program was loaded.
/// Only judged packets (TCP to a configured port) count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerdictCounters {
    /// [`Verdict::Pass`].
    pub pass: Counter,
    /// [`Verdict::DropRate`].
    pub drop_rate: Counter,
    /// [`Verdict::DropNotAllowed`].
    pub drop_not_allowed: Counter,
    /// [`Verdict::DropBanned`].
    pub drop_banned: Counter,
}

impl VerdictCounters {
    /// The counter of one verdict.
    pub const fn get(&self, verdict: Verdict) -> Counter {
        match verdict {
            Verdict::Pass => self.pass,
            Verdict::DropRate => self.drop_rate,
            Verdict::DropNotAllowed => self.drop_not_allowed,
            Verdict::DropBanned => self.drop_banned,
        }
    }

    const fn get_mut(&mut self, verdict: Verdict) -> &mut Counter {
        match verdict {
            Verdict::Pass => &mut self.pass,
            Verdict::DropRate => &mut self.drop_rate,
            Verdict::DropNotAllowed => &mut self.drop_not_allowed,
            Verdict::DropBanned => &mut self.drop_banned,
        }
    }
}

/// Boxed cause of an [`Error`].
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why an [`Enforcer`] operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The kernel refused for lack of privileges (EPERM: CAP_BPF, CAP_NET_ADMIN
    /// or CAP_SYS_ADMIN missing). The caller should enforce in user space.
    #[error("eBPF enforcement needs CAP_BPF and CAP_NET_ADMIN: {0}")]
    NoPrivileges(String),
    /// The interface does not exist (in this network namespace).
    #[error("network interface {0:?} not found")]
    UnknownInterface(String),
    /// A configuration value the programs cannot take.
    #[error("invalid eBPF configuration: {0}")]
    InvalidConfig(String),
    /// A map is full (`SG_*_MAX` in `abi.h`).
    #[error("the {map} map is full ({max} entries)")]
    Full {
        /// The map's name in the object.
        map: &'static str,
        /// Its capacity.
        max: u32,
    },
    /// Anything else the kernel or the loader reported.
    #[error("{context}")]
    Kernel {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// Wraps `source`, classifying EPERM as [`Error::NoPrivileges`].
    fn kernel(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        let context = context.into();
        let source = source.into();
        if is_eperm(source.as_ref()) {
            return Self::NoPrivileges(format!("{context}: {}", chain(source.as_ref())));
        }
        Self::Kernel { context, source }
    }
}

/// Whether `err` or one of its causes is EPERM.
fn is_eperm(err: &(dyn StdError + 'static)) -> bool {
    let eperm = rustix::io::Errno::PERM.raw_os_error();
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(eperm)
        {
            return true;
        }
        if let Some(nl) = e.downcast_ref::<aya::sys::NetlinkError>()
            && nl.raw_os_error() == Some(eperm)
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// `err: cause: cause` on one line.
fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

/// The unit that bans and rates apply to: the address itself for IPv4
/// (`/32`), its `/64` for IPv6. IPv4-mapped IPv6 addresses count as IPv4.
/// A user-space fallback must key its rules the same way.
pub fn source_prefix(ip: IpAddr) -> IpNet {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpNet::V4(Ipv4Net::from(v4)),
        IpAddr::V6(v6) => IpNet::V6(
            Ipv6Net::new(v6, abi::IPV6_SOURCE_PREFIX)
                .map(|n| n.trunc())
                .unwrap_or_else(|_| Ipv6Net::from(v6)),
        ),
    }
}

/// `struct sg_src_key` for a source address.
fn src_key(ip: IpAddr) -> SgSrcKey {
    let addr = match source_prefix(ip) {
        IpNet::V4(n) => n.addr().to_ipv6_mapped().octets(),
        IpNet::V6(n) => n.addr().octets(),
    };
    SgSrcKey { addr }
}

/// An allowlist entry of `sg_allow`: its LPM prefix length and data.
/// IPv4-mapped IPv6 networks become IPv4; host bits go.
fn allow_key(port: u16, net: &IpNet) -> KeyBytes {
    let net = match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.addr().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, n.prefix_len() - 96).map_or(*net, IpNet::V4),
            None => *net,
        },
        _ => *net,
    }
    .trunc();
    let mut data = SgAllowData {
        port,
        ..SgAllowData::default()
    };
    match net {
        IpNet::V4(n) => {
            data.family = abi::FAMILY_IPV4;
            data.addr[..4].copy_from_slice(&n.addr().octets());
        }
        IpNet::V6(n) => {
            data.family = abi::FAMILY_IPV6;
            data.addr = n.addr().octets();
        }
    }
    KeyBytes(
        abi::ALLOW_KEY_FIXED_BITS + u32::from(net.prefix_len()),
        data,
    )
}

/// `bpf_ktime_get_ns()`'s clock.
fn monotonic_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// `sg_config` for a rate and burst.
fn syn_config(syn_rate: u32, syn_burst: u32) -> Result<SgConfig, Error> {
    if syn_rate == 0 {
        return Ok(SgConfig::default());
    }
    if syn_burst == 0 {
        return Err(Error::InvalidConfig(
            "syn_burst must be at least 1 when syn_rate is set".into(),
        ));
    }
    let interval = (1_000_000_000 / u64::from(syn_rate)).max(1);
    Ok(SgConfig {
        syn_interval_ns: interval,
        syn_tolerance_ns: interval * u64::from(syn_burst - 1),
    })
}

fn map_error(op: &str, map: &'static str, max: u32, e: MapError) -> Error {
    let full = matches!(&e, MapError::SyscallError(s)
        if matches!(s.io_error.raw_os_error(), Some(c) if c == rustix::io::Errno::TOOBIG.raw_os_error()
            || c == rustix::io::Errno::NOSPC.raw_os_error()));
    if full {
        return Error::Full { map, max };
    }
    Error::kernel(format!("{op} in {map}"), e)
}

fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => {
            s.io_error.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error())
        }
        _ => false,
    }
}

/// How the program was attached, for detaching.
#[derive(Debug)]
enum Attachment {
    Xdp(XdpLinkId),
    Tc {
        link: SchedClassifierLinkId,
        /// Set when the program hangs off a clsact qdisc this attachment
        /// created: the interface index, to remove it on detach.
        created_clsact: Option<u32>,
    },
}

/// Which TC attachment to use; tests force the legacy one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TcBackend {
    /// TCX from kernel 6.6, else netlink.
    Auto,
    /// A cls_bpf filter on a clsact qdisc.
    #[cfg_attr(not(test), allow(dead_code))]
    Netlink,
}

/// The loaded programs and their maps, attached to one interface. Dropping it
/// detaches the program (and removes a `clsact` qdisc that attaching
/// created); the maps go with it. XDP and TCX attachments are kernel links
/// held by file descriptors, so they also go if the process dies.
///
/// `Send`: it may move to another thread; the writes take `&mut self`, so the
/// gateway keeps it behind a mutex with its control state.
pub struct Enforcer {
    bpf: Ebpf,
    ports: HashMap<MapData, u16, u32>,
    config: Array<MapData, SgConfig>,
    allow: LpmTrie<MapData, SgAllowData, u32>,
    bans: HashMap<MapData, SgSrcKey, SgBan>,
    counters: PerCpuArray<MapData, SgCounter>,
    /// Mirror of `sg_ports`.
    port_flags: BTreeMap<u16, u32>,
    /// The `sg_allow` keys of each `ip_only` port.
    allowlists: BTreeMap<u16, HashSet<KeyBytes>>,
    interface: String,
    mode: AttachMode,
    attachment: Option<Attachment>,
}

impl fmt::Debug for Enforcer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enforcer")
            .field("interface", &self.interface)
            .field("mode", &self.mode)
            .field("port_flags", &self.port_flags)
            .field("ip_only_ports", &self.allowlists.keys().collect::<Vec<_>>())
            .field("attachment", &self.attachment)
            .finish_non_exhaustive()
    }
}

/// An `sg_allow` key as (prefix length, data): aya's `Key` has no Hash/Eq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct KeyBytes(u32, SgAllowData);

impl Enforcer {
    /// Loads the programs, writes the configuration and attaches to
    /// `cfg.interface` in `cfg.mode`.
    ///
    /// # Errors
    /// [`Error::NoPrivileges`] without CAP_BPF/CAP_NET_ADMIN (fall back to user
    /// space); [`Error::UnknownInterface`]; [`Error::InvalidConfig`]; or
    /// [`Error::Kernel`] (e.g. native XDP on a driver without XDP support, or
    /// another XDP program already attached).
    pub fn attach(cfg: &EnforcerConfig) -> Result<Self, Error> {
        Self::attach_with(cfg, TcBackend::Auto)
    }

    fn attach_with(cfg: &EnforcerConfig, backend: TcBackend) -> Result<Self, Error> {
        if cfg.interface.is_empty() || cfg.interface.contains('\0') {
            return Err(Error::InvalidConfig(format!(
                "bad interface name {:?}",
                cfg.interface
            )));
        }
        let mut enforcer = Self::load(&cfg.proxy_ports, cfg.syn_rate, cfg.syn_burst)?;
        enforcer.interface.clone_from(&cfg.interface);
        enforcer.mode = cfg.mode;
        let ifindex = ifindex(&cfg.interface)?;
        enforcer.attachment = Some(match cfg.mode {
            AttachMode::Xdp => enforcer.attach_xdp(ifindex, XdpMode::Driver)?,
            AttachMode::XdpGeneric => enforcer.attach_xdp(ifindex, XdpMode::Skb)?,
            AttachMode::Tc => enforcer.attach_tc(ifindex, backend)?,
        });
        Ok(enforcer)
    }

    /// Loads the object and writes the configuration, attaching nothing.
    fn load(proxy_ports: &[u16], syn_rate: u32, syn_burst: u32) -> Result<Self, Error> {
        let config = syn_config(syn_rate, syn_burst)?;
        // The object has no CO-RE relocations: no need to parse the kernel's BTF.
        let mut bpf = EbpfLoader::new()
            .btf(None)
            .load(OBJECT)
            .map_err(|e| Error::kernel("loading the BPF object", e))?;
        let mut take = |name: &'static str| {
            bpf.take_map(name).ok_or_else(|| Error::Kernel {
                context: format!("the BPF object has no map {name}"),
                source: "missing map".into(),
            })
        };
        let ports = take(abi::MAP_PORTS)?;
        let config_map = take(abi::MAP_CONFIG)?;
        let allow = take(abi::MAP_ALLOW)?;
        let bans = take(abi::MAP_BANS)?;
        let counters = take(abi::MAP_COUNTERS)?;
        let typed =
            |name: &str, e: MapError| Error::kernel(format!("map {name} does not match abi.rs"), e);
        let mut enforcer = Self {
            ports: HashMap::try_from(ports).map_err(|e| typed(abi::MAP_PORTS, e))?,
            config: Array::try_from(config_map).map_err(|e| typed(abi::MAP_CONFIG, e))?,
            allow: LpmTrie::try_from(allow).map_err(|e| typed(abi::MAP_ALLOW, e))?,
            bans: HashMap::try_from(bans).map_err(|e| typed(abi::MAP_BANS, e))?,
            counters: PerCpuArray::try_from(counters).map_err(|e| typed(abi::MAP_COUNTERS, e))?,
            bpf,
            port_flags: BTreeMap::new(),
            allowlists: BTreeMap::new(),
            interface: String::new(),
            mode: AttachMode::default(),
            attachment: None,
        };
        enforcer
            .config
            .set(0, config, 0)
            .map_err(|e| map_error("writing the SYN limit", abi::MAP_CONFIG, abi::CONFIG_MAX, e))?;
        enforcer.set_proxy_ports(proxy_ports)?;
        Ok(enforcer)
    }

    fn program_xdp(&mut self) -> Result<&mut Xdp, Error> {
        let prog = self
            .bpf
            .program_mut(abi::PROG_XDP)
            .ok_or_else(|| Error::Kernel {
                context: format!("the BPF object has no program {}", abi::PROG_XDP),
                source: "missing program".into(),
            })?;
        let prog: &mut Xdp = prog.try_into().map_err(|e| Error::kernel("sg_xdp", e))?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|e| Error::kernel("loading sg_xdp", e))?;
        }
        Ok(prog)
    }

    fn program_tc(&mut self) -> Result<&mut SchedClassifier, Error> {
        let prog = self
            .bpf
            .program_mut(abi::PROG_TC)
            .ok_or_else(|| Error::Kernel {
                context: format!("the BPF object has no program {}", abi::PROG_TC),
                source: "missing program".into(),
            })?;
        let prog: &mut SchedClassifier = prog.try_into().map_err(|e| Error::kernel("sg_tc", e))?;
        if prog.fd().is_err() {
            prog.load().map_err(|e| Error::kernel("loading sg_tc", e))?;
        }
        Ok(prog)
    }

    fn attach_xdp(&mut self, ifindex: u32, mode: XdpMode) -> Result<Attachment, Error> {
        let iface = self.interface.clone();
        let prog = self.program_xdp()?;
        let link = prog
            .attach_to_if_index(ifindex, mode)
            .map_err(|e| Error::kernel(format!("attaching XDP ({mode:?}) to {iface}"), e))?;
        Ok(Attachment::Xdp(link))
    }

    fn attach_tc(&mut self, ifindex: u32, backend: TcBackend) -> Result<Attachment, Error> {
        let iface = self.interface.clone();
        let tcx = backend == TcBackend::Auto
            && KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        if tcx {
            // First in the chain: a drop should not depend on what runs before.
            let prog = self.program_tc()?;
            let link = prog
                .attach_with_options(
                    &iface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .map_err(|e| Error::kernel(format!("attaching TCX ingress to {iface}"), e))?;
            return Ok(Attachment::Tc {
                link,
                created_clsact: None,
            });
        }
        let created = match tc::qdisc_add_clsact(&iface) {
            Ok(()) => true,
            Err(TcError::NetlinkError(e))
                if e.raw_os_error() == Some(rustix::io::Errno::EXIST.raw_os_error()) =>
            {
                false
            }
            Err(e) => {
                return Err(Error::kernel(
                    format!("adding a clsact qdisc to {iface}"),
                    e,
                ));
            }
        };
        let created_clsact = created.then_some(ifindex);
        let attached = self.program_tc().and_then(|prog| {
            prog.attach_with_options(
                &iface,
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(NlOptions::default()),
            )
            .map_err(|e| Error::kernel(format!("attaching a TC ingress filter to {iface}"), e))
        });
        match attached {
            Ok(link) => Ok(Attachment::Tc {
                link,
                created_clsact,
            }),
            Err(e) => {
                if let Some(ifindex) = created_clsact {
                    remove_clsact_if_unused(ifindex);
                }
                Err(e)
            }
        }
    }

    /// The interface the program is attached to.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// How the program is attached.
    pub const fn mode(&self) -> AttachMode {
        self.mode
    }

    fn write_port(&mut self, port: u16, flags: u32) -> Result<(), Error> {
        if flags == 0 {
            match self.ports.remove(&port) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    return Err(map_error(
                        "removing a port",
                        abi::MAP_PORTS,
                        abi::PORTS_MAX,
                        e,
                    ));
                }
            }
            self.port_flags.remove(&port);
        } else {
            self.ports
                .insert(port, flags, 0)
                .map_err(|e| map_error("writing a port", abi::MAP_PORTS, abi::PORTS_MAX, e))?;
            self.port_flags.insert(port, flags);
        }
        Ok(())
    }

    /// Replaces the set of ports whose new connections are rate-limited.
    pub fn set_proxy_ports(&mut self, ports: &[u16]) -> Result<(), Error> {
        if ports.contains(&0) {
            return Err(Error::InvalidConfig("port 0 cannot be a proxy port".into()));
        }
        let wanted: HashSet<u16> = ports.iter().copied().collect();
        let mut all: Vec<u16> = self
            .port_flags
            .keys()
            .copied()
            .chain(wanted.iter().copied())
            .collect();
        all.sort_unstable();
        all.dedup();
        for port in all {
            let old = self.port_flags.get(&port).copied().unwrap_or(0);
            let new = if wanted.contains(&port) {
                old | abi::PORT_SYN_LIMIT
            } else {
                old & !abi::PORT_SYN_LIMIT
            };
            if new != old {
                self.write_port(port, new)?;
            }
        }
        Ok(())
    }

    /// Changes the per-source SYN rate and burst (0 rate: no limit). Buckets
    /// already filled keep their state.
    pub fn set_syn_limit(&mut self, syn_rate: u32, syn_burst: u32) -> Result<(), Error> {
        let config = syn_config(syn_rate, syn_burst)?;
        self.config
            .set(0, config, 0)
            .map_err(|e| map_error("writing the SYN limit", abi::MAP_CONFIG, abi::CONFIG_MAX, e))
    }

    /// Makes `port` an `ip_only` listener admitting only sources in `allow`
    /// (IPv4 and IPv6 networks; host bits are ignored), replacing its previous
    /// allowlist. An empty `allow` drops every source. Entries are added
    /// before old ones are removed, so an address on both lists is never
    /// dropped in between.
    pub fn set_ip_only(&mut self, port: u16, allow: &[IpNet]) -> Result<(), Error> {
        if port == 0 {
            return Err(Error::InvalidConfig(
                "port 0 cannot be an ip_only port".into(),
            ));
        }
        let new: HashSet<KeyBytes> = allow.iter().map(|net| allow_key(port, net)).collect();
        let old = self.allowlists.get(&port).cloned().unwrap_or_default();
        let in_use: usize = self.allowlists.values().map(HashSet::len).sum();
        let added = new.difference(&old).count();
        if in_use + added > abi::ALLOW_MAX as usize {
            return Err(Error::Full {
                map: abi::MAP_ALLOW,
                max: abi::ALLOW_MAX,
            });
        }
        for k in new.difference(&old) {
            self.allow.insert(&Key::new(k.0, k.1), 1, 0).map_err(|e| {
                map_error(
                    "adding an allowlist entry",
                    abi::MAP_ALLOW,
                    abi::ALLOW_MAX,
                    e,
                )
            })?;
            self.allowlists.entry(port).or_default().insert(*k);
        }
        let flags = self.port_flags.get(&port).copied().unwrap_or(0);
        if flags & abi::PORT_IP_ONLY == 0 {
            self.write_port(port, flags | abi::PORT_IP_ONLY)?;
        }
        self.remove_allow_entries(port, old.difference(&new).copied().collect())?;
        self.allowlists.entry(port).or_default();
        Ok(())
    }

    fn remove_allow_entries(&mut self, port: u16, keys: Vec<KeyBytes>) -> Result<(), Error> {
        for k in keys {
            match self.allow.remove(&Key::new(k.0, k.1)) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    return Err(map_error(
                        "removing an allowlist entry",
                        abi::MAP_ALLOW,
                        abi::ALLOW_MAX,
                        e,
                    ));
                }
            }
            if let Some(set) = self.allowlists.get_mut(&port) {
                set.remove(&k);
            }
        }
        Ok(())
    }

    /// Makes `port` admit every source again and forgets its allowlist.
    pub fn clear_ip_only(&mut self, port: u16) -> Result<(), Error> {
        let flags = self.port_flags.get(&port).copied().unwrap_or(0);
        if flags & abi::PORT_IP_ONLY != 0 {
            self.write_port(port, flags & !abi::PORT_IP_ONLY)?;
        }
        let keys: Vec<KeyBytes> = self
            .allowlists
            .get(&port)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        self.remove_allow_entries(port, keys)?;
        self.allowlists.remove(&port);
        Ok(())
    }

    /// Drops every packet from `ip`'s source unit ([`source_prefix`]: the
    /// IPv4 address, or the IPv6 /64) to the configured ports for `for_`,
    /// replacing an earlier ban of it. The program compares the expiry with
    /// its clock, so a ban lapses by itself. Beyond `SG_BANS_MAX` (65 536)
    /// bans, the least recently used give way.
    pub fn ban(&mut self, ip: IpAddr, for_: Duration) -> Result<(), Error> {
        let expires_ns =
            monotonic_ns().saturating_add(u64::try_from(for_.as_nanos()).unwrap_or(u64::MAX));
        self.bans
            .insert(src_key(ip), SgBan { expires_ns }, 0)
            .map_err(|e| map_error("writing a ban", abi::MAP_BANS, abi::BANS_MAX, e))
    }

    /// Lifts a ban at once (no error if there was none).
    pub fn unban(&mut self, ip: IpAddr) -> Result<(), Error> {
        match self.bans.remove(&src_key(ip)) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(map_error("removing a ban", abi::MAP_BANS, abi::BANS_MAX, e)),
        }
    }

    /// The verdict counters, summed over CPUs.
    pub fn counters(&self) -> Result<VerdictCounters, Error> {
        let mut out = VerdictCounters::default();
        for verdict in Verdict::ALL {
            let per_cpu = self.counters.get(&verdict.code(), 0).map_err(|e| {
                map_error("reading counters", abi::MAP_COUNTERS, abi::VERDICT_COUNT, e)
            })?;
            let c = out.get_mut(verdict);
            for v in per_cpu.iter() {
                c.packets = c.packets.wrapping_add(v.packets);
                c.bytes = c.bytes.wrapping_add(v.bytes);
            }
        }
        Ok(out)
    }

    /// Detaches, reporting what went wrong (dropping detaches silently).
    pub fn detach(mut self) -> Result<(), Error> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<(), Error> {
        let Some(attachment) = self.attachment.take() else {
            return Ok(());
        };
        match attachment {
            Attachment::Xdp(link) => {
                let prog: &mut Xdp = self
                    .bpf
                    .program_mut(abi::PROG_XDP)
                    .ok_or_else(|| Error::InvalidConfig("sg_xdp vanished".into()))?
                    .try_into()
                    .map_err(|e: ProgramError| Error::kernel("sg_xdp", e))?;
                prog.detach(link)
                    .map_err(|e| Error::kernel("detaching XDP", e))
            }
            Attachment::Tc {
                link,
                created_clsact,
            } => {
                let result = self
                    .bpf
                    .program_mut(abi::PROG_TC)
                    .ok_or_else(|| Error::InvalidConfig("sg_tc vanished".into()))
                    .and_then(|p| {
                        let prog: &mut SchedClassifier =
                            p.try_into().map_err(|e| Error::kernel("sg_tc", e))?;
                        prog.detach(link)
                            .map_err(|e| Error::kernel("detaching TC", e))
                    });
                if let Some(ifindex) = created_clsact {
                    remove_clsact_if_unused(ifindex);
                }
                result
            }
        }
    }
}

impl Drop for Enforcer {
    fn drop(&mut self) {
        // Errors here mean the interface is already gone; nothing to undo.
        drop(self.detach_inner());
    }
}

/// Removes the clsact qdisc this crate created, unless other filters use it.
fn remove_clsact_if_unused(ifindex: u32) {
    if let Ok(0) = netlink::clsact_filter_count(ifindex) {
        drop(netlink::clsact_delete(ifindex));
    }
}

/// Interface index in the calling thread's network namespace.
fn ifindex(name: &str) -> Result<u32, Error> {
    let sock = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        None,
    )
    .map_err(|e| Error::kernel("opening a socket for SIOCGIFINDEX", io::Error::from(e)))?;
    rustix::net::netdevice::name_to_index(&sock, name)
        .map_err(|_| Error::UnknownInterface(name.to_owned()))
}

#[cfg(test)]
impl Enforcer {
    /// Loaded, configured, attached nowhere: for `BPF_PROG_TEST_RUN`.
    pub(crate) fn load_detached(
        proxy_ports: &[u16],
        syn_rate: u32,
        syn_burst: u32,
    ) -> Result<Self, Error> {
        Self::load(proxy_ports, syn_rate, syn_burst)
    }

    pub(crate) fn attach_netlink_tc(cfg: &EnforcerConfig) -> Result<Self, Error> {
        Self::attach_with(cfg, TcBackend::Netlink)
    }

    pub(crate) fn xdp_program(&mut self) -> Result<&mut Xdp, Error> {
        self.program_xdp()
    }

    pub(crate) fn tc_program(&mut self) -> Result<&mut SchedClassifier, Error> {
        self.program_tc()
    }

    pub(crate) fn ban_until_ns(&mut self, ip: IpAddr, expires_ns: u64) -> Result<(), Error> {
        self.bans
            .insert(src_key(ip), SgBan { expires_ns }, 0)
            .map_err(|e| map_error("writing a ban", abi::MAP_BANS, abi::BANS_MAX, e))
    }
}
