//! The device's side: `splicegate agent` (and the standalone
//! `splicegate-agent`). Keeps one connection to each gateway it was given,
//! reconnecting with exponential backoff and jitter (1 s up to 60 s);
//! answers the gateway's streams by connecting to their targets from its own
//! network, refusing its own machine and networks unless allowed.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use splicegate_proto::agent::{Frame, OpenError, Refusal, VERSION};
use splicegate_proto::{Host, parse_host};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::link::{self, Config, Incoming, Link, RateLimit, Role};
use crate::safety;

/// The ALPN name of the agent protocol.
pub const ALPN: &[u8] = b"splicegate-agent/1";

/// `splicegate agent`: run this device as an exit of the gateways given.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "splicegate-agent",
    version,
    about = "Run this device as an exit node of a splicegate gateway: dial out, serve its streams"
)]
pub struct Args {
    /// A gateway's agent address, `host:port`; repeat for several (one
    /// connection to each).
    #[arg(long = "gateway", required = true, value_name = "HOST:PORT")]
    pub gateways: Vec<String>,
    /// This device's node id.
    #[arg(long)]
    pub id: String,
    /// The device key (shows in `ps`: prefer --key-file or SPLICEGATE_AGENT_KEY).
    #[arg(long, env = "SPLICEGATE_AGENT_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// A file holding the device key.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// The fleet's enrolment secret: become node `--id` and keep the key
    /// issued in --state-dir.
    #[arg(
        long,
        env = "SPLICEGATE_AGENT_ENROL_KEY",
        hide_env_values = true,
        requires = "state_dir"
    )]
    pub enrol_key: Option<String>,
    /// Where an enrolled device keeps its key.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// CA certificate(s) to verify the gateway with (PEM); default: the system roots.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// The name the gateway's certificate must carry; default: the host of --gateway.
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// Announced exit country (ISO 3166 alpha-2).
    #[arg(long)]
    pub country: Option<String>,
    /// Announced region.
    #[arg(long)]
    pub region: Option<String>,
    /// Announced city.
    #[arg(long)]
    pub city: Option<String>,
    /// Announced ISP.
    #[arg(long)]
    pub isp: Option<String>,
    /// Announced AS number.
    #[arg(long)]
    pub asn: Option<u32>,
    /// Announced network type (residential, mobile, datacenter).
    #[arg(long)]
    pub network: Option<String>,
    /// Streams served at once; more are refused (the gateway tries another node).
    #[arg(long, default_value_t = 64)]
    pub max_streams: usize,
    /// Cap on relayed megabits per second, each way (default: none).
    #[arg(long, value_name = "MBPS")]
    pub max_mbps: Option<f64>,
    /// Let streams reach this device's own machine and private networks.
    #[arg(long)]
    pub allow_private: bool,
    /// How long the device waits for a target's connect, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub connect_ms: u64,
}

/// Exit status for a refused key: retrying cannot help.
pub const EXIT_REFUSED: i32 = 2;

/// What the device presents.
#[derive(Debug, Clone)]
enum Secret {
    Key(String),
    Enrol(String),
}

struct Device {
    args: Args,
    tls: tokio_rustls::TlsConnector,
    secret: tokio::sync::Mutex<Secret>,
    rate: Option<Arc<RateLimit>>,
}

/// Runs the agent until a signal (status 0), a refused key (status 2) or
/// a configuration error (status 1). Builds its own runtime.
pub fn main_with(args: Args) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return 1;
        }
    };
    rt.block_on(run(args))
}

async fn run(args: Args) -> i32 {
    let device = match Device::new(args) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("splicegate agent: {e}");
            return 1;
        }
    };
    let (stop_tx, mut stop_rx) = mpsc::channel::<i32>(4);
    for gw in device.args.gateways.clone() {
        let device = device.clone();
        let stop = stop_tx.clone();
        tokio::spawn(async move {
            if let Some(code) = device.keep_connected(&gw).await {
                let _ = stop.send(code).await;
            }
        });
    }
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            return 1;
        }
    };
    tokio::select! {
        code = stop_rx.recv() => code.unwrap_or(1),
        _ = term.recv() => { tracing::info!("SIGTERM: stopping"); 0 }
        _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted: stopping"); 0 }
    }
}

fn read_secret(args: &Args) -> Result<Secret, String> {
    if let Some(k) = &args.key {
        return Ok(Secret::Key(k.trim().to_string()));
    }
    if let Some(f) = &args.key_file {
        let k = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        return Ok(Secret::Key(k.trim().to_string()));
    }
    if let Some(dir) = &args.state_dir
        && let Ok(k) = std::fs::read_to_string(dir.join("key"))
    {
        return Ok(Secret::Key(k.trim().to_string()));
    }
    match &args.enrol_key {
        Some(e) => Ok(Secret::Enrol(e.clone())),
        None => Err(
            "no key: give --key, --key-file, SPLICEGATE_AGENT_KEY, or --enrol-key with --state-dir"
                .into(),
        ),
    }
}

fn tls_config(ca: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            for c in certs {
                let c = c.map_err(|e| format!("{}: {e}", path.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    if roots.is_empty() {
        return Err("no CA certificate to verify the gateway with (give --ca)".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

impl Device {
    fn new(args: Args) -> Result<Device, String> {
        if args.id.is_empty() || args.id.len() > 128 {
            return Err("--id is 1 to 128 bytes".into());
        }
        let secret = read_secret(&args)?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_config(args.ca.as_deref())?));
        let rate = match args.max_mbps {
            Some(m) if m > 0.0 && m.is_finite() => Some(Arc::new(RateLimit::mbps(m))),
            Some(m) => return Err(format!("--max-mbps {m}: a positive number")),
            None => None,
        };
        Ok(Device {
            args,
            tls,
            secret: tokio::sync::Mutex::new(secret),
            rate,
        })
    }

    /// Keeps a connection to `gw`; returns an exit status when the agent
    /// must stop (its key was refused).
    async fn keep_connected(&self, gw: &str) -> Option<i32> {
        let mut backoff = Duration::from_secs(1);
        let mut rng = seed(gw);
        loop {
            let started = Instant::now();
            match self.session(gw).await {
                Ok(why) => tracing::warn!(gateway = gw, "connection ended: {why}"),
                Err(Stop::Refused(reason, text)) if reason.is_final() => {
                    tracing::error!(
                        gateway = gw,
                        ?reason,
                        "the gateway refused this device: {text}"
                    );
                    return Some(EXIT_REFUSED);
                }
                Err(Stop::Refused(reason, text)) => {
                    tracing::warn!(gateway = gw, ?reason, "the gateway refused for now: {text}")
                }
                Err(Stop::Io(e)) => tracing::warn!(gateway = gw, "cannot connect: {e}"),
            }
            // A connection that lived a while starts the backoff over.
            if started.elapsed() > Duration::from_secs(60) {
                backoff = Duration::from_secs(1);
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let jitter = 0.5 + (rng % 1000) as f64 / 1000.0;
            let wait = backoff.mul_f64(jitter);
            tracing::info!(gateway = gw, "reconnecting in {:.1} s", wait.as_secs_f64());
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
    }

    fn hello(&self, secret: &Secret) -> splicegate_proto::agent::FieldsBuf {
        let a = &self.args;
        let asn = a.asn.map(|n| n.to_string());
        let max = a.max_streams.to_string();
        let software = concat!("splicegate-agent/", env!("CARGO_PKG_VERSION"));
        let mut pairs: Vec<(&str, &str)> =
            vec![("id", &a.id), ("software", software), ("max_streams", &max)];
        match secret {
            Secret::Key(k) => pairs.push(("key", k)),
            Secret::Enrol(e) => pairs.push(("enrol_key", e)),
        }
        for (k, v) in [
            ("country", &a.country),
            ("region", &a.region),
            ("city", &a.city),
            ("isp", &a.isp),
            ("asn", &asn),
            ("network", &a.network),
        ] {
            if let Some(v) = v {
                pairs.push((k, v));
            }
        }
        link::fields(&pairs)
    }

    /// One connection, from connect to its end.
    async fn session(&self, gw: &str) -> Result<String, Stop> {
        let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(gw))
            .await
            .map_err(|_| {
                Stop::Io(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
            })??;
        let _ = tcp.set_nodelay(true);
        let name = self
            .args
            .server_name
            .clone()
            .unwrap_or_else(|| host_of(gw).to_string());
        let name = ServerName::try_from(name)
            .map_err(|e| Stop::Io(io::Error::new(io::ErrorKind::InvalidInput, e.to_string())))?;
        let mut tls = tokio::time::timeout(Duration::from_secs(10), self.tls.connect(name, tcp))
            .await
            .map_err(|_| {
                Stop::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                ))
            })??;
        let secret = self.secret.lock().await.clone();
        let fields = self.hello(&secret);
        link::write_frame(
            &mut tls,
            Frame::Hello {
                version: VERSION,
                fields: fields.fields(),
            },
        )
        .await?;
        let mut buf = Vec::new();
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            link::read_frame(&mut tls, &mut buf),
        )
        .await
        .map_err(|_| {
            Stop::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                "no answer to the hello",
            ))
        })??;
        let heartbeat = match splicegate_proto::agent::decode(&answer) {
            Ok(Some((Frame::Welcome { fields, .. }, _))) => {
                if let Secret::Enrol(_) = secret {
                    let Some(key) = fields.get("key") else {
                        return Err(Stop::Io(io::Error::other(
                            "enrolled, but the gateway sent no key",
                        )));
                    };
                    self.keep_key(key).await.map_err(Stop::Io)?;
                    tracing::info!(id = %self.args.id, "enrolled; the device key is kept in the state directory");
                }
                fields
                    .get("heartbeat_s")
                    .and_then(|s| s.parse::<u64>().ok())
                    .filter(|&s| (1..=3600).contains(&s))
                    .map(Duration::from_secs)
                    .unwrap_or(Duration::from_secs(25))
            }
            Ok(Some((Frame::Refuse { reason, text }, _))) => {
                return Err(Stop::Refused(reason, text.to_string()));
            }
            other => {
                return Err(Stop::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected answer to the hello: {other:?}"),
                )));
            }
        };
        tracing::info!(gateway = gw, id = %self.args.id, "connected");
        let config = Config {
            role: Role::Device,
            heartbeat,
            max_streams: self.args.max_streams,
            rate: self.rate.clone(),
        };
        let (link, mut incoming, task) = link::spawn(tls, buf, config);
        let serve = async {
            while let Some(inc) = incoming.recv().await {
                let link = link.clone();
                let args = self.args.clone();
                let rate = self.rate.clone();
                tokio::spawn(async move { serve_stream(&args, &link, inc, rate).await });
            }
        };
        tokio::select! {
            _ = serve => {}
            _ = link.closed() => {}
        }
        Ok(task.await.unwrap_or_else(|e| format!("link task: {e}")))
    }

    async fn keep_key(&self, key: &str) -> io::Result<()> {
        let dir = self
            .args
            .state_dir
            .as_ref()
            .ok_or_else(|| io::Error::other("no --state-dir"))?;
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join("key.tmp");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(key.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, dir.join("key"))?;
        *self.secret.lock().await = Secret::Key(key.to_string());
        Ok(())
    }
}

enum Stop {
    Refused(Refusal, String),
    Io(io::Error),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Stop {
        Stop::Io(e)
    }
}

fn host_of(gw: &str) -> &str {
    let host = gw.rsplit_once(':').map(|(h, _)| h).unwrap_or(gw);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn seed(s: &str) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    s.bytes().fold(t ^ u64::from(std::process::id()), |h, b| {
        h.wrapping_mul(0x100000001b3).wrapping_add(u64::from(b))
    }) | 1
}

/// Why a target may not be reached, or where it is.
async fn resolve(args: &Args, target: &str) -> Result<Vec<SocketAddr>, (OpenError, String)> {
    let bad = |why: &str| (OpenError::Fault, format!("bad target {target:?}: {why}"));
    let (host, port) = target.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
    let host = parse_host(host.as_bytes()).map_err(|e| bad(e.0))?;
    let addrs: Vec<SocketAddr> = match &host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, port)],
        Host::Domain(name) => {
            let lookup = tokio::net::lookup_host((name.as_str(), port));
            match tokio::time::timeout(Duration::from_millis(args.connect_ms), lookup).await {
                Ok(Ok(it)) => it.collect(),
                Ok(Err(e)) => return Err((OpenError::Unresolved, format!("{name}: {e}"))),
                Err(_) => return Err((OpenError::Timeout, format!("resolving {name} timed out"))),
            }
        }
    };
    if addrs.is_empty() {
        return Err((
            OpenError::Unresolved,
            format!("{} has no address", host.bare()),
        ));
    }
    if args.allow_private {
        return Ok(addrs);
    }
    let public: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|a| !is_local(a.ip()))
        .collect();
    if public.is_empty() {
        return Err((
            OpenError::Disallowed,
            format!(
                "{} is on the device's own network ({})",
                host.bare(),
                addrs[0].ip()
            ),
        ));
    }
    Ok(public)
}

fn is_local(ip: IpAddr) -> bool {
    safety::is_local(ip)
}

async fn serve_stream(args: &Args, link: &Link, inc: Incoming, rate: Option<Arc<RateLimit>>) {
    let Incoming {
        stream,
        target,
        window,
        udp,
    } = inc;
    if udp {
        return serve_udp(args, link, stream, rate).await;
    }
    let addrs = match resolve(args, &target).await {
        Ok(a) => a,
        Err((reason, text)) => {
            if reason == OpenError::Disallowed {
                tracing::warn!(%target, "refused: {text}");
            }
            link.refuse(stream, reason, text).await;
            return;
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(args.connect_ms);
    let mut last = (OpenError::Refused, String::new());
    for addr in addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                let (r, w) = tcp.into_split();
                link.accept(stream, window, r, w).await;
                return;
            }
            Ok(Err(e)) => last = (OpenError::Refused, format!("{addr}: {e}")),
            Err(_) => {
                last = (OpenError::Timeout, format!("{addr} did not answer in time"));
                break;
            }
        }
    }
    link.refuse(stream, last.0, last.1).await;
}

/// Serves UDP association `stream`: one socket of its own, each datagram
/// to the target its header names (resolved here, refused when on the
/// device's own networks), each answer back with its sender. Ends when the
/// gateway ends it (or the link does).
async fn serve_udp(args: &Args, link: &Link, stream: u32, rate: Option<Arc<RateLimit>>) {
    use splicegate_proto::agent::{split_datagram, write_datagram_payload};
    let sock = match tokio::net::UdpSocket::bind("[::]:0").await {
        Ok(s) => s,
        Err(_) => match tokio::net::UdpSocket::bind("0.0.0.0:0").await {
            Ok(s) => s,
            Err(e) => {
                link.refuse(stream, OpenError::Fault, format!("no UDP socket: {e}"))
                    .await;
                return;
            }
        },
    };
    let dual = sock.local_addr().is_ok_and(|a| a.is_ipv6());
    let Some(mut assoc) = link.accept_udp(stream).await else {
        return;
    };
    let mut names: std::collections::HashMap<String, Option<SocketAddr>> = Default::default();
    // Only where the client went may answer (a port restricted cone).
    let mut contacted: std::collections::HashSet<SocketAddr> = Default::default();
    let mut buf = vec![0u8; 65_536];
    loop {
        tokio::select! {
            m = assoc.rx.recv() => {
                let Some(p) = m else { return };
                let Some((addr, bytes)) = split_datagram(&p) else { continue };
                if names.len() > 256 {
                    names.clear();
                }
                let to = match names.get(addr) {
                    Some(t) => *t,
                    None => {
                        let t = match resolve(args, addr).await {
                            Ok(list) => list.first().copied(),
                            Err((reason, text)) => {
                                if reason == OpenError::Disallowed {
                                    tracing::warn!(target = addr, "refused a datagram: {text}");
                                }
                                None
                            }
                        };
                        names.insert(addr.to_string(), t);
                        t
                    }
                };
                let Some(mut to) = to else { continue };
                if let Some(r) = &rate {
                    r.take(0, bytes.len()).await;
                }
                if dual && let IpAddr::V4(v4) = to.ip() {
                    to = SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), to.port());
                }
                if contacted.len() >= 4096 {
                    contacted.clear();
                }
                contacted.insert(to);
                let _ = sock.send_to(bytes, to).await;
            }
            r = sock.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                if !contacted.contains(&from) {
                    continue;
                }
                let from = match from.ip() {
                    IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                        Some(v4) => SocketAddr::new(IpAddr::V4(v4), from.port()),
                        None => from,
                    },
                    IpAddr::V4(_) => from,
                };
                if let Some(r) = &rate {
                    r.take(1, n).await;
                }
                let mut payload = Vec::with_capacity(n + 48);
                write_datagram_payload(&from.to_string(), &buf[..n], &mut payload);
                link.send_datagram(stream, &payload);
            }
        }
    }
}
