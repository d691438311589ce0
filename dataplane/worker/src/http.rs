//! HTTP/1.1 on the proxy port: CONNECT tunnels and absolute-form forwarding
//! with keep-alive. Every request passes the checks again; errors are
//! answered in the catalogue's format.

use std::sync::Arc;
use std::time::{Duration, Instant};

use splicegate_control::catalog::{Rejection, write_http_error, write_http_ok};
use splicegate_control::engine::Route;
use splicegate_control::limits::ConnGuard;
use splicegate_control::nodes::{Node, NodeIdx};
use splicegate_control::policy::{Admitted, Credentials, Hello, Policy, Protocol};
use splicegate_control::rules::Rules;
use splicegate_control::{Code, Now};
use splicegate_proto::Host;
use splicegate_proto::http::{
    BodyFraming, BodyTracker, HttpError, Method, Request, Response, Target, decode_basic,
    parse_request, parse_response, write_forward_head, write_response_head,
};
use splicegate_uring::{TcpStream, timeout, timeout_at};

use crate::ctx::Ctx;
use crate::dial::{Upstream, connect_route};
use crate::io::{ReadError, read_message, read_some};
use crate::tunnels::Tunnel;
use crate::{Binding, clock};

/// Whether the client connection goes on after a request.
enum Next {
    KeepAlive,
    Close,
    /// A CONNECT was answered 200: its relay runs in a task of its own.
    Tunnel(Box<Established>),
}

/// A CONNECT tunnel established by [`request`]; `serve` adds the client.
struct Established {
    up: Upstream,
    node: Arc<Node>,
    package: Arc<splicegate_control::policy::Package>,
    early: Vec<u8>,
    host: String,
    port: u16,
    protocol: &'static str,
    started: Instant,
    setup: Duration,
}

/// An upstream connection kept for a session's next request to the same target.
struct Kept {
    node: NodeIdx,
    node_arc: Arc<Node>,
    host: String,
    port: u16,
    stream: TcpStream,
}

pub(crate) async fn serve(
    ctx: &Ctx,
    client: TcpStream,
    peer: std::net::SocketAddr,
    binding: Binding,
    mut buf: Vec<u8>,
    first_deadline: Instant,
) -> Option<Box<Tunnel>> {
    let limits = ctx.shared.settings.limits;
    let mut conn: Option<ConnGuard> = None;
    let mut kept: Option<Kept> = None;
    let mut deadline = first_deadline;
    loop {
        let parsed = read_message(
            &client,
            &mut buf,
            deadline,
            Some(limits.max_head_bytes),
            |b| parse_request(b, &limits),
        )
        .await;
        let req = match parsed {
            Ok(r) => r,
            Err(ReadError::Closed { .. } | ReadError::Io(_)) => return None,
            Err(ReadError::Timeout { partial }) => {
                if partial {
                    let rej = Rejection::new(
                        Code::ClientTimeout,
                        format!(
                            "the request head was not complete within {} ms",
                            ctx.shared.settings.handshake.as_millis()
                        ),
                    );
                    answer(ctx, &client, peer, None, "http", &rej, false).await;
                    linger_close(&client).await;
                }
                return None;
            }
            Err(ReadError::Parse(e)) => {
                answer(ctx, &client, peer, None, "http", &parse_rejection(e), false).await;
                linger_close(&client).await;
                return None;
            }
        };
        if ctx.draining.get() {
            return None;
        }
        let next = request(
            ctx, &client, peer, binding, &req, &mut buf, &mut conn, &mut kept,
        )
        .await;
        drop(req);
        match next {
            Next::KeepAlive => deadline = Instant::now() + ctx.shared.settings.idle,
            Next::Close => return None,
            Next::Tunnel(e) => {
                let e = *e;
                return Some(Box::new(Tunnel {
                    client,
                    up: e.up,
                    node: e.node,
                    package: e.package,
                    early: e.early,
                    host: e.host,
                    port: e.port,
                    protocol: e.protocol,
                    peer,
                    started: e.started,
                    setup: e.setup,
                    conn,
                }));
            }
        }
    }
}

fn parse_rejection(e: HttpError) -> Rejection {
    match e {
        HttpError::HeadTooLarge(why) => Rejection::new(
            Code::HeadersTooLarge,
            format!("{why}; send a smaller request head"),
        ),
        HttpError::UnsupportedVersion => {
            Rejection::new(Code::BadRequest, "only HTTP/1.0 and HTTP/1.1 are served")
        }
        HttpError::UnsupportedScheme => Rejection::new(
            Code::BadRequest,
            "only http:// targets are forwarded; use CONNECT for anything else",
        ),
        HttpError::Malformed(why) => Rejection::new(Code::BadRequest, why),
    }
}

fn host_text(target: &Target) -> String {
    match target.host() {
        Host::Ip(ip) => ip.to_string(),
        Host::Domain(d) => d.clone(),
    }
}

/// Answer an error in the catalogue's format and record it.
async fn answer(
    ctx: &Ctx,
    client: &TcpStream,
    peer: std::net::SocketAddr,
    package: Option<u64>,
    protocol: &'static str,
    rej: &Rejection,
    keep_alive: bool,
) {
    let policy = ctx.shared.engine.policy();
    ctx.record(&policy, peer, package, protocol, rej);
    let mut out = Vec::with_capacity(512);
    write_http_error(rej, keep_alive, &mut out);
    let _ = timeout(Duration::from_secs(5), client.write_all(&out)).await;
}

/// Close after an error without resetting the connection under the answer:
/// stop writing, then read and drop what the client still sends, briefly.
async fn linger_close(client: &TcpStream) {
    let _ = client.shutdown_write();
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut sink = vec![0u8; 16 * 1024];
    let mut total = 0usize;
    while total < 256 * 1024 {
        match timeout_at(deadline, client.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => total += n,
            _ => return,
        }
    }
}

/// The `Respond-With` facts of the exit.
fn facts(
    policy: &Policy,
    node: &Node,
    rules: &Rules,
    wanted: &[String],
    out: &mut Vec<(&'static str, String)>,
) {
    for w in wanted {
        let fact = match w.as_str() {
            "ip" => node.exit_ip().map(|ip| ("X-SOAX-Ip", ip.to_string())),
            "country" => node.country.map(|c| ("X-SOAX-Country", c.to_string())),
            "city" => node
                .city
                .map(|c| ("X-SOAX-City", policy.geo.name(c).to_string())),
            "region" => node
                .region
                .map(|c| ("X-SOAX-Region", policy.geo.name(c).to_string())),
            "isp" => node
                .isp
                .map(|c| ("X-SOAX-Isp", policy.geo.name(c).to_string())),
            "asn" => node.asn.map(|a| ("X-SOAX-Asn", a.to_string())),
            "node" => Some(("X-SOAX-Node", node.id.to_string())),
            "session" => rules
                .session
                .map(|s| ("X-SOAX-Session", s.as_str().to_string())),
            _ => None,
        };
        if let Some(f) = fact
            && !out.iter().any(|(k, _)| *k == f.0)
        {
            out.push(f);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn request(
    ctx: &Ctx,
    client: &TcpStream,
    peer: std::net::SocketAddr,
    binding: Binding,
    req: &Request,
    buf: &mut Vec<u8>,
    conn: &mut Option<ConnGuard>,
    kept: &mut Option<Kept>,
) -> Next {
    let started = Instant::now();
    let connect = req.method == Method::Connect;
    let (protocol, label) = if connect {
        (Protocol::Https, "https")
    } else {
        (Protocol::Http, "http")
    };
    let decoded = req.proxy_authorization.as_deref().map(decode_basic);
    let credentials = match &decoded {
        None => Credentials::Absent,
        Some(Ok((username, password))) => Credentials::Present { username, password },
        // Another scheme (Bearer, Digest, …) offers no credentials we read.
        Some(Err(splicegate_proto::http::AuthError::NotBasic)) => Credentials::Absent,
        Some(Err(_)) => Credentials::Malformed,
    };
    let policy = ctx.shared.engine.policy_arc();
    let hello = Hello {
        client_ip: peer.ip(),
        credentials,
        listener_package: binding.package,
    };
    let now: Now = clock::now();
    let host = host_text(&req.target);
    let port = req.target.port();
    // An error may keep the connection when the request carried no body.
    let can_continue = req.keep_alive && req.body == BodyFraming::None;
    macro_rules! fail {
        ($package:expr, $rej:expr) => {{
            answer(ctx, client, peer, $package, label, &$rej, can_continue).await;
            return if can_continue {
                buf.drain(..req.head_len);
                Next::KeepAlive
            } else {
                linger_close(client).await;
                Next::Close
            };
        }};
    }
    let auth = match policy.authenticate(&hello) {
        Ok(a) => a,
        Err(rej) => fail!(policy.refused_package(&hello, &rej), rej),
    };
    let package_id = auth.package.id();
    let adm = match policy.admit(&auth, protocol, &host, port, conn, now) {
        Ok(a) => a,
        Err(rej) => fail!(Some(package_id), rej),
    };
    let routed = ctx
        .shared
        .engine
        .route(&policy, &adm, now, &mut ctx.rng.borrow_mut());
    let mut route = match routed {
        Ok(r) => r,
        Err(rej) => fail!(Some(package_id), rej),
    };
    if connect {
        let (up, node) = match connect_route(ctx, &policy, &adm, &mut route).await {
            Ok(x) => x,
            Err(rej) => fail!(Some(package_id), rej),
        };
        let mut extra = Vec::new();
        facts(&policy, &node, &adm.rules, &req.respond_with, &mut extra);
        let extra_ref: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut out = Vec::with_capacity(128);
        write_http_ok(&extra_ref, &mut out);
        if timeout(ctx.shared.settings.idle, client.write_all(&out))
            .await
            .is_err()
        {
            return Next::Close;
        }
        let early = buf[req.head_len..].to_vec();
        return Next::Tunnel(Box::new(Established {
            up,
            node,
            package: adm.package.clone(),
            early,
            host,
            port,
            protocol: label,
            started,
            setup: started.elapsed(),
        }));
    }
    forward(
        ctx,
        client,
        peer,
        &policy,
        req,
        &adm,
        &mut route,
        buf,
        kept,
        can_continue,
        started,
    )
    .await
}

/// Why one exchange with the target failed.
enum ExchangeError {
    /// Nothing reached the client yet: answer this.
    Answer(Rejection),
    /// A reused connection failed before the target answered: dial afresh.
    Stale,
    /// The client or the target broke off mid-message: close.
    Abort,
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    ctx: &Ctx,
    client: &TcpStream,
    peer: std::net::SocketAddr,
    policy: &Arc<Policy>,
    req: &Request,
    adm: &Admitted,
    route: &mut Route,
    buf: &mut Vec<u8>,
    kept: &mut Option<Kept>,
    can_continue: bool,
    started: Instant,
) -> Next {
    let host = host_text(&req.target);
    let port = req.target.port();
    let package_id = adm.package.id();
    let sticky = adm.rules.session.is_some();
    let mut reuse = sticky
        && kept
            .as_ref()
            .is_some_and(|k| k.node == route.node() && k.host == host && k.port == port);
    if !reuse {
        *kept = None;
    }
    let mut head = Vec::with_capacity(req.head_len + 64);
    write_forward_head(req, &mut head);
    buf.drain(..req.head_len);
    for _attempt in 0..2 {
        let (stream, node_arc, leftover) = if reuse {
            let k = kept.take().expect("checked above");
            (k.stream, k.node_arc, Vec::new())
        } else {
            match connect_route(ctx, policy, adm, route).await {
                Ok((Upstream { stream, leftover }, node)) => (stream, node, leftover),
                Err(rej) => {
                    answer(
                        ctx,
                        client,
                        peer,
                        Some(package_id),
                        "http",
                        &rej,
                        can_continue,
                    )
                    .await;
                    return if can_continue {
                        Next::KeepAlive
                    } else {
                        Next::Close
                    };
                }
            }
        };
        let _load = node_arc.runtime.open_tunnel();
        let setup = started.elapsed();
        let exchanged = exchange(
            ctx, client, policy, req, adm, &node_arc, &stream, leftover, &head, buf, reuse,
        )
        .await;
        match exchanged {
            Ok((keep_client, reusable, up, down)) => {
                ctx.stats.setup.observe(setup);
                ctx.log(&crate::ctx::Outcome {
                    peer,
                    package: Some(package_id),
                    protocol: "http",
                    target: Some((&host, port)),
                    node: Some(&node_arc.id),
                    error: None,
                    up,
                    down,
                    started,
                    setup: Some(setup),
                });
                if sticky && reusable {
                    *kept = Some(Kept {
                        node: route.node(),
                        node_arc: node_arc.clone(),
                        host,
                        port,
                        stream,
                    });
                } else if reusable {
                    // The answer is complete and the connection idle, but no
                    // session will use it again: close it with a reset so it
                    // leaves no TIME_WAIT behind. Rotating mode opens one
                    // connection per request from the node's address, and
                    // TIME_WAITs by the ten thousand make every new connect
                    // search the port range.
                    let _ = stream.socket().set_linger(Some(Duration::ZERO));
                }
                return if keep_client {
                    Next::KeepAlive
                } else {
                    Next::Close
                };
            }
            Err(ExchangeError::Stale) if req.body == BodyFraming::None => {
                reuse = false;
                continue;
            }
            Err(ExchangeError::Stale) => {
                let rej = Rejection::new(
                    Code::TargetUnreachable,
                    "the target closed the kept connection; send the request again",
                );
                answer(ctx, client, peer, Some(package_id), "http", &rej, false).await;
                return Next::Close;
            }
            Err(ExchangeError::Answer(rej)) => {
                answer(ctx, client, peer, Some(package_id), "http", &rej, false).await;
                linger_close(client).await;
                return Next::Close;
            }
            Err(ExchangeError::Abort) => return Next::Close,
        }
    }
    Next::Close
}

/// Send one request to the target and relay its answer. Returns whether the
/// client connection and the upstream connection may carry another request.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    ctx: &Ctx,
    client: &TcpStream,
    policy: &Policy,
    req: &Request,
    adm: &Admitted,
    node: &Node,
    upstream: &TcpStream,
    mut ubuf: Vec<u8>,
    head: &[u8],
    buf: &mut Vec<u8>,
    reused: bool,
) -> Result<(bool, bool, u64, u64), ExchangeError> {
    let s = &ctx.shared.settings;
    let package = &adm.package;
    let mut meter = Meter::new(package, &ctx.stats);
    // 1. The head, then the body as framed.
    match timeout(s.idle, upstream.write_all(head)).await {
        Ok(Ok(())) => {}
        _ if reused => return Err(ExchangeError::Stale),
        _ => {
            return Err(ExchangeError::Answer(Rejection::new(
                Code::TargetUnreachable,
                "the target closed the connection",
            )));
        }
    }
    meter.up(head.len() as u64);
    let mut body = BodyTracker::new(req.body);
    while !body.is_done() {
        if buf.is_empty() {
            match read_some(client, buf, Instant::now() + s.idle).await {
                Ok(Some(n)) if n > 0 => {}
                _ => return Err(ExchangeError::Abort),
            }
        }
        let n = body.feed(buf).map_err(|e| {
            ExchangeError::Answer(Rejection::new(
                Code::BadRequest,
                format!("the request body's framing is malformed: {e}"),
            ))
        })?;
        if timeout(s.idle, upstream.write_all(&buf[..n]))
            .await
            .map_or(true, |r| r.is_err())
        {
            return Err(ExchangeError::Abort);
        }
        buf.drain(..n);
        meter.up(n as u64);
        meter.check()?;
    }
    // 2. The answer's head (interim 1xx answers are passed on).
    let mut answered = false;
    let resp: Response = loop {
        let got = read_message(
            upstream,
            &mut ubuf,
            Instant::now() + s.target,
            Some(s.limits.max_head_bytes),
            |b| parse_response(b, &s.limits, &req.method),
        )
        .await;
        let resp = match got {
            Ok(r) => r,
            Err(ReadError::Closed { partial: false } | ReadError::Io(_)) if reused && !answered => {
                return Err(ExchangeError::Stale);
            }
            Err(_) if answered => return Err(ExchangeError::Abort),
            Err(ReadError::Timeout { .. }) => {
                return Err(ExchangeError::Answer(Rejection::new(
                    Code::GatewayTimeout,
                    format!(
                        "the target did not answer within {} ms",
                        s.target.as_millis()
                    ),
                )));
            }
            Err(ReadError::Parse(e)) => {
                return Err(ExchangeError::Answer(Rejection::new(
                    Code::TargetUnreachable,
                    format!("the target's answer is malformed: {e}"),
                )));
            }
            Err(_) => {
                return Err(ExchangeError::Answer(Rejection::new(
                    Code::TargetUnreachable,
                    "the target closed the connection without answering",
                )));
            }
        };
        if (100..200).contains(&resp.status) && resp.status != 101 {
            let mut out = Vec::with_capacity(resp.head_len);
            write_response_head(&resp, &[], &mut out);
            if timeout(s.idle, client.write_all(&out))
                .await
                .map_or(true, |r| r.is_err())
            {
                return Err(ExchangeError::Abort);
            }
            meter.down(out.len() as u64);
            ubuf.drain(..resp.head_len);
            answered = true;
            continue;
        }
        break resp;
    };
    let keep_client = req.keep_alive
        && resp.keep_alive
        && resp.body != BodyFraming::UntilClose
        && resp.status != 101;
    let mut extra = Vec::new();
    facts(policy, node, &adm.rules, &req.respond_with, &mut extra);
    if !keep_client {
        extra.push(("Connection", "close".to_string()));
    }
    let extra_ref: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut out = Vec::with_capacity(resp.head_len + 128);
    write_response_head(&resp, &extra_ref, &mut out);
    if timeout(s.idle, client.write_all(&out))
        .await
        .map_or(true, |r| r.is_err())
    {
        return Err(ExchangeError::Abort);
    }
    meter.down(out.len() as u64);
    ubuf.drain(..resp.head_len);
    // 3. The answer's body.
    let framing = if resp.status == 101 {
        BodyFraming::UntilClose
    } else {
        resp.body
    };
    let mut body = BodyTracker::new(framing);
    while !body.is_done() {
        if ubuf.is_empty() {
            match read_some(upstream, &mut ubuf, Instant::now() + s.idle).await {
                Ok(Some(n)) if n > 0 => {}
                Ok(Some(_)) if body.ends_at_close() => break,
                _ => return Err(ExchangeError::Abort),
            }
        }
        let n = body.feed(&ubuf).map_err(|_| ExchangeError::Abort)?;
        if timeout(s.idle, client.write_all(&ubuf[..n]))
            .await
            .map_or(true, |r| r.is_err())
        {
            return Err(ExchangeError::Abort);
        }
        ubuf.drain(..n);
        meter.down(n as u64);
        meter.check()?;
    }
    let reusable = resp.keep_alive && framing != BodyFraming::UntilClose && ubuf.is_empty();
    meter.flush();
    Ok((keep_client, reusable, meter.total_up, meter.total_down))
}

/// Charges forwarded bytes to the package in batches and stops an exchange
/// that crossed the cap or emptied the credits.
struct Meter<'a> {
    package: &'a Arc<splicegate_control::policy::Package>,
    stats: &'a crate::WorkerStats,
    up: u64,
    down: u64,
    total_up: u64,
    total_down: u64,
}

impl<'a> Meter<'a> {
    fn new(
        package: &'a Arc<splicegate_control::policy::Package>,
        stats: &'a crate::WorkerStats,
    ) -> Self {
        Meter {
            package,
            stats,
            up: 0,
            down: 0,
            total_up: 0,
            total_down: 0,
        }
    }
    fn up(&mut self, n: u64) {
        self.up += n;
    }
    fn down(&mut self, n: u64) {
        self.down += n;
    }
    fn flush(&mut self) {
        self.package.charge(self.up, self.down);
        self.stats.bytes(self.up, self.down);
        self.total_up += self.up;
        self.total_down += self.down;
        self.up = 0;
        self.down = 0;
    }
    fn check(&mut self) -> Result<(), ExchangeError> {
        if self.up + self.down >= 64 * 1024 {
            self.flush();
            if Policy::may_continue(self.package).is_err() {
                return Err(ExchangeError::Abort);
            }
        }
        Ok(())
    }
}

impl Drop for Meter<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}
