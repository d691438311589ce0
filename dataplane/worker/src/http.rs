//! HTTP/1.1 on the proxy port: CONNECT tunnels and absolute-form forwarding
//! with keep-alive. Every request passes the checks again; errors are
//! answered in the catalogue's format.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use splicegate_addr::Target;
use splicegate_control::Code;
use splicegate_control::catalog::{Rejection, write_http_error, write_http_ok};
use splicegate_control::limits::ConnGuard;
use splicegate_control::nodes::{Node, NodeIdx};
use splicegate_control::policy::{Credentials, Package, Policy, Protocol};
use splicegate_control::rules::Rules;
use splicegate_proto::http::{
    AuthError, BasicCredentials, BodyFraming, BodyTracker, HttpError, Method, Request, Response,
    decode_basic, parse_request, parse_response, write_forward_head, write_response_head,
};
use splicegate_uring::{Notifier, TcpStream, timeout, timeout_at};

use crate::Binding;
use crate::accept::{Either, select2};
use crate::admission::{Admission, Established, Gate, Refusal};
use crate::bufs::Buf;
use crate::client::{Client, Stream};
use crate::ctx::Ctx;
use crate::io::{ReadError, read_message, read_some};
use crate::tunnels::Tunnel;

/// Whether the client connection goes on after a request.
enum Next {
    KeepAlive,
    Close,
    /// A CONNECT was answered 200: its relay runs in a task of its own.
    Tunnel(Established),
}

/// An upstream connection kept for a session's next request to the same target.
struct Kept {
    node: NodeIdx,
    node_arc: Arc<Node>,
    target: Target,
    stream: TcpStream,
}

/// One client connection speaking HTTP/1.1 to the proxy: its buffer, its
/// slot of the package's connection limit, and an upstream connection kept
/// for its session. Requests run one after another.
struct HttpConn<'c> {
    ctx: &'c Ctx,
    client: Client,
    peer: SocketAddr,
    binding: Binding,
    /// Bytes read from the client and not yet consumed.
    buf: Buf,
    /// The connection's slot of its package's connection limit.
    conn: Option<ConnGuard>,
    kept: Option<Kept>,
    /// The package of the last admitted request: while the connection
    /// waits for its next request, the tunnel registry may close it when
    /// this package may not go on (paused, out of credits, ...).
    package: Option<Arc<Package>>,
    /// Fires when the registry closes the waiting connection.
    stop: Option<Notifier>,
    /// Room for what is read from a kept upstream connection: kept across
    /// requests, so a kept-alive request does not allocate it again. (The
    /// heads this connection writes take a buffer from the worker's pool
    /// each time and give it back, so an idle connection holds none.)
    ubuf: Vec<u8>,
}

/// Largest scratch buffer a connection keeps between requests; a bigger
/// one (a long head, a big answer read) is let go.
const SCRATCH_KEPT: usize = 4096;

/// Empties `v` for the next request, or lets it go if it grew large.
fn keep_scratch(mut v: Vec<u8>) -> Vec<u8> {
    if v.capacity() > SCRATCH_KEPT {
        return Vec::new();
    }
    v.clear();
    v
}

pub(crate) async fn serve(
    ctx: &Ctx,
    client: Client,
    peer: SocketAddr,
    binding: Binding,
    buf: Buf,
    first_deadline: Instant,
) -> Option<Tunnel> {
    let mut c = HttpConn {
        ctx,
        client,
        peer,
        binding,
        buf,
        conn: None,
        kept: None,
        package: None,
        stop: None,
        ubuf: Vec::new(),
    };
    let limits = ctx.shared.settings.limits;
    let mut deadline = first_deadline;
    loop {
        let read = read_message(
            &c.client,
            &mut c.buf,
            deadline,
            Some(limits.max_head_bytes),
            |b| parse_request(b, &limits),
        );
        let parsed = match &c.package {
            // Between requests: closed at once if the package stops.
            Some(package) => {
                let stop = c.stop.get_or_insert_with(Notifier::new).clone();
                let id = ctx
                    .tunnels
                    .register_keepalive(package.clone(), stop.clone());
                let r = select2(read, stop.notified()).await;
                ctx.tunnels.finish(id, &ctx.stats);
                match r {
                    Either::Left(r) => r,
                    Either::Right(()) => return None,
                }
            }
            None => read.await,
        };
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
                    c.answer(Protocol::Http, &Refusal::anonymous(rej), false)
                        .await;
                    c.linger_close().await;
                }
                return None;
            }
            Err(ReadError::Parse(e)) => {
                c.answer(
                    Protocol::Http,
                    &Refusal::anonymous(parse_rejection(e)),
                    false,
                )
                .await;
                c.linger_close().await;
                return None;
            }
        };
        if ctx.draining.get() {
            return None;
        }
        let next = c.request(&req).await;
        drop(req);
        match next {
            Next::KeepAlive => deadline = Instant::now() + ctx.shared.settings.idle,
            Next::Close => return None,
            Next::Tunnel(route) => {
                let early = std::mem::take(&mut c.buf);
                return Some(Tunnel {
                    client: c.client,
                    peer,
                    route,
                    early,
                    conn: c.conn,
                });
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

/// Credentials as the request carried them.
fn credentials(decoded: &Option<Result<BasicCredentials, AuthError>>) -> Credentials<'_> {
    match decoded {
        None => Credentials::Absent,
        Some(Ok(c)) => Credentials::Present {
            username: c.username(),
            password: c.password(),
        },
        // Another scheme (Bearer, Digest, …) offers no credentials we read.
        Some(Err(AuthError::NotBasic)) => Credentials::Absent,
        Some(Err(_)) => Credentials::Malformed,
    }
}

impl HttpConn<'_> {
    /// Answer a refusal in the catalogue's format and record it.
    async fn answer(&self, protocol: Protocol, refusal: &Refusal, keep_alive: bool) {
        self.ctx.record(self.peer, protocol, refusal);
        let mut out = Vec::with_capacity(512);
        write_http_error(&refusal.rejection, keep_alive, &mut out);
        let _ = timeout(Duration::from_secs(5), self.client.write_all(&out)).await;
    }

    /// Close after an error without resetting the connection under the
    /// answer: stop writing, then read and drop what the client still sends,
    /// briefly.
    async fn linger_close(&self) {
        self.client.shutdown_write().await;
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut sink = vec![0u8; 16 * 1024];
        let mut total = 0usize;
        while total < 256 * 1024 {
            match timeout_at(deadline, self.client.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => total += n,
                _ => return,
            }
        }
    }

    /// Answer a refusal of `req` and say whether the connection goes on: it
    /// may when the request carried no body to skip.
    async fn refuse(&mut self, req: &Request, protocol: Protocol, refusal: Refusal) -> Next {
        let can_continue = req.keep_alive && req.body == BodyFraming::None;
        self.answer(protocol, &refusal, can_continue).await;
        if can_continue {
            self.buf.drain(..req.head_len);
            Next::KeepAlive
        } else {
            self.linger_close().await;
            Next::Close
        }
    }

    async fn request(&mut self, req: &Request) -> Next {
        let started = Instant::now();
        let protocol = if req.method == Method::Connect {
            Protocol::Https
        } else {
            Protocol::Http
        };
        let decoded = req.proxy_authorization().map(decode_basic);
        let gate = Gate::new(self.ctx, self.peer, self.binding, protocol);
        let target = req.target.target();
        let auth = match gate.authenticate(credentials(&decoded)) {
            Ok(a) => a,
            Err(refusal) => return self.refuse(req, protocol, refusal).await,
        };
        let mut admission = match gate
            .admit(self.ctx, &auth, target, &mut self.conn, started)
            .await
        {
            Ok(a) => a,
            Err(refusal) => return self.refuse(req, protocol, refusal).await,
        };
        self.package = Some(admission.admitted.package.clone());
        if protocol == Protocol::Https {
            let route = match admission.dial(self.ctx, protocol).await {
                Ok(r) => r,
                Err(refusal) => return self.refuse(req, protocol, refusal).await,
            };
            let mut extra = Vec::new();
            let rules = &admission.admitted.rules;
            facts(
                &gate.policy,
                &route.node,
                rules,
                &req.respond_with,
                &mut extra,
            );
            let extra_ref: Vec<(&str, &str)> =
                extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let mut out = Buf::take();
            write_http_ok(&extra_ref, &mut out);
            if timeout(self.ctx.shared.settings.idle, self.client.write_all(&out))
                .await
                .is_err()
            {
                return Next::Close;
            }
            drop(out); // back to the pool
            self.buf.drain(..req.head_len);
            return Next::Tunnel(route);
        }
        self.forward(req, &mut admission).await
    }
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

impl HttpConn<'_> {
    /// Forward one absolute-form request: on the session's kept upstream
    /// connection when it goes to the same node and target, else through a
    /// fresh dial; a kept connection that turns out stale is dialled afresh
    /// once when the request has no body.
    async fn forward(&mut self, req: &Request, admission: &mut Admission) -> Next {
        let ctx = self.ctx;
        let can_continue = req.keep_alive && req.body == BodyFraming::None;
        let target = &admission.admitted.target;
        let package_id = admission.package_id();
        let sticky = admission.admitted.rules.session.is_some();
        let node_now = admission.route.node();
        let mut reuse = sticky
            && self
                .kept
                .as_ref()
                .is_some_and(|k| k.node == node_now && k.target == *target);
        if !reuse {
            self.kept = None;
        }
        // Without a session: an idle connection an earlier request of this
        // package left through the node just picked to this target (for
        // requests that may be sent again, so a stale one can be retried:
        // idempotent and without a body, RFC 9112 §9.3.1).
        let retriable = req.body == BodyFraming::None && req.method.is_idempotent();
        let mut pooled = match sticky {
            false if retriable => {
                let key = crate::upstreams::Key {
                    package: package_id,
                    node: node_now,
                    target: target.clone(),
                };
                let node = admission.route.policy.nodes.node(node_now);
                ctx.upstreams.borrow_mut().take(&key, node, Instant::now())
            }
            _ => None,
        };
        reuse |= pooled.is_some();
        let mut from_pool;
        self.buf.drain(..req.head_len);
        let refused = |rejection| Refusal {
            package: Some(package_id),
            rejection,
        };
        for _attempt in 0..2 {
            from_pool = false;
            let (stream, node_arc, leftover) = if let Some((stream, node)) = pooled.take() {
                from_pool = true;
                (stream, node, std::mem::take(&mut self.ubuf))
            } else if reuse {
                let k = self.kept.take().expect("checked above");
                (k.stream, k.node_arc, std::mem::take(&mut self.ubuf))
            } else {
                match admission.dial(ctx, Protocol::Http).await {
                    // What the dial read past the node's answer, if
                    // anything, else the connection's own buffer.
                    Ok(e) if e.up.leftover.is_empty() => {
                        (e.up.stream, e.node, std::mem::take(&mut self.ubuf))
                    }
                    Ok(e) => (e.up.stream, e.node, e.up.leftover),
                    Err(refusal) => {
                        self.answer(Protocol::Http, &refusal, can_continue).await;
                        return if can_continue {
                            Next::KeepAlive
                        } else {
                            Next::Close
                        };
                    }
                }
            };
            let _load = node_arc.runtime.open_tunnel();
            let setup = admission.started.elapsed();
            let exchanged = self
                .exchange(req, admission, &node_arc, &stream, leftover, reuse)
                .await;
            match exchanged {
                Ok((keep_client, reusable, up, down)) => {
                    ctx.stats.setup.observe(setup);
                    ctx.log(&crate::ctx::Outcome {
                        peer: self.peer,
                        package: Some(package_id),
                        protocol: Protocol::Http,
                        target: Some(&admission.admitted.target),
                        node: Some(&node_arc.id),
                        error: None,
                        up,
                        down,
                        started: admission.started,
                        setup: Some(setup),
                    });
                    if sticky && reusable {
                        self.kept = Some(Kept {
                            node: admission.route.node(),
                            node_arc: node_arc.clone(),
                            target: admission.admitted.target.clone(),
                            stream,
                        });
                    } else if reusable {
                        // No session will use it again, but the next request
                        // of this package that picks the node it went
                        // through (the one the route ended on, after any
                        // failover) for this target may (the pool closes
                        // what it lets go with a reset, leaving no TIME_WAIT
                        // behind).
                        let key = crate::upstreams::Key {
                            package: package_id,
                            node: admission.route.node(),
                            target: admission.admitted.target.clone(),
                        };
                        ctx.upstreams.borrow_mut().put(
                            key,
                            stream,
                            node_arc.clone(),
                            Instant::now(),
                        );
                    }
                    if from_pool {
                        crate::WorkerStats::inc(&ctx.stats.upstreams_reused);
                    }
                    return if keep_client {
                        Next::KeepAlive
                    } else {
                        Next::Close
                    };
                }
                Err(ExchangeError::Stale) if retriable => {
                    reuse = false;
                    continue;
                }
                Err(ExchangeError::Stale) => {
                    let rej = Rejection::new(
                        Code::TargetUnreachable,
                        "the target closed the kept connection; send the request again",
                    );
                    self.answer(Protocol::Http, &refused(rej), false).await;
                    return Next::Close;
                }
                Err(ExchangeError::Answer(rej)) => {
                    self.answer(Protocol::Http, &refused(rej), false).await;
                    self.linger_close().await;
                    return Next::Close;
                }
                Err(ExchangeError::Abort) => return Next::Close,
            }
        }
        Next::Close
    }

    /// Send one request to the target and relay its answer. Returns whether the
    /// client connection and the upstream connection may carry another request.
    async fn exchange(
        &mut self,
        req: &Request,
        admission: &Admission,
        node: &Node,
        upstream: &TcpStream,
        mut ubuf: Vec<u8>,
        reused: bool,
    ) -> Result<(bool, bool, u64, u64), ExchangeError> {
        let ctx = self.ctx;
        let client = &self.client;
        let buf = &mut self.buf;
        let s = &ctx.shared.settings;
        let adm = &admission.admitted;
        let policy = &admission.route.policy;
        let package = &adm.package;
        let mut meter = Meter::new(package, &ctx.stats);
        let mut head = Buf::take();
        head.reserve(req.head_len + 64);
        write_forward_head(req, &mut head);
        // 1. The head, then the body as framed. Body bytes the client sent
        // with its head go out in the same send.
        let head_len = head.len();
        let mut body = BodyTracker::new(req.body);
        let n = coalesce(&mut body, buf, &mut head).map_err(|e| {
            ExchangeError::Answer(Rejection::new(
                Code::BadRequest,
                format!("the request body's framing is malformed: {e}"),
            ))
        })?;
        match timeout(s.idle, upstream.write_all(&head)).await {
            Ok(Ok(())) => {}
            _ if reused => return Err(ExchangeError::Stale),
            _ => {
                return Err(ExchangeError::Answer(Rejection::new(
                    Code::TargetUnreachable,
                    "the target closed the connection",
                )));
            }
        }
        meter.up(head_len as u64);
        if n > 0 {
            buf.drain(..n);
            meter.up(n as u64);
            meter.check()?;
        }
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
            relay_write(upstream, &buf[..n], s.idle).await?;
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
                Err(ReadError::Closed { partial: false } | ReadError::Io(_))
                    if reused && !answered =>
                {
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
                relay_write(client, &out, s.idle).await?;
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
        // The request's head is out: its room takes the answer's head.
        let mut out = head;
        out.clear();
        out.reserve(resp.head_len + 128);
        write_response_head(&resp, &extra_ref, &mut out);
        ubuf.drain(..resp.head_len);
        // 3. The answer's body; what came with the head goes out with it,
        // in one send.
        let framing = if resp.status == 101 {
            BodyFraming::UntilClose
        } else {
            resp.body
        };
        let mut body = BodyTracker::new(framing);
        let n = coalesce(&mut body, &ubuf, &mut out).map_err(|_| ExchangeError::Abort)?;
        ubuf.drain(..n);
        relay_write(client, &out, s.idle).await?;
        meter.down(out.len() as u64);
        meter.check()?;
        while !body.is_done() {
            if ubuf.is_empty() {
                match read_some(upstream, &mut ubuf, Instant::now() + s.idle).await {
                    Ok(Some(n)) if n > 0 => {}
                    Ok(Some(_)) if body.ends_at_close() => break,
                    _ => return Err(ExchangeError::Abort),
                }
            }
            let n = body.feed(&ubuf).map_err(|_| ExchangeError::Abort)?;
            relay_write(client, &ubuf[..n], s.idle).await?;
            ubuf.drain(..n);
            meter.down(n as u64);
            meter.check()?;
        }
        let reusable = resp.keep_alive && framing != BodyFraming::UntilClose && ubuf.is_empty();
        meter.flush();
        drop(out); // back to the pool
        if reusable {
            self.ubuf = keep_scratch(ubuf);
        }
        Ok((keep_client, reusable, meter.total_up, meter.total_down))
    }
}

/// Body bytes at most this long that arrived with a head are copied behind
/// the head and sent with it: one send instead of two. Longer ones are
/// sent on their own, where a copy would cost more than the send it saves.
const COALESCE_MAX: usize = 16 * 1024;

/// Appends to `out` the body bytes at the start of `read` (as `body` frames
/// them, at most [`COALESCE_MAX`]) and returns how many it took.
fn coalesce(
    body: &mut BodyTracker,
    read: &[u8],
    out: &mut Vec<u8>,
) -> Result<usize, splicegate_proto::http::BodyError> {
    if body.is_done() || read.is_empty() || read.len() > COALESCE_MAX {
        return Ok(0);
    }
    let n = body.feed(read)?;
    out.extend_from_slice(&read[..n]);
    Ok(n)
}

/// Write relayed bytes within the idle timeout; a peer that cannot take
/// them ends the exchange.
async fn relay_write(to: &impl Stream, bytes: &[u8], idle: Duration) -> Result<(), ExchangeError> {
    match timeout(idle, to.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(ExchangeError::Abort),
    }
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

#[cfg(test)]
mod tests {
    use super::{COALESCE_MAX, coalesce};
    use splicegate_proto::http::{BodyFraming, BodyTracker};

    #[test]
    fn only_this_messages_body_goes_out_with_its_head() {
        // Content-Length 5, and the next request already behind it.
        let mut body = BodyTracker::new(BodyFraming::ContentLength(5));
        let mut out = b"HEAD\r\n\r\n".to_vec();
        let n = coalesce(&mut body, b"hello GET / HTTP/1.1\r\n", &mut out).unwrap();
        assert_eq!(n, 5);
        assert_eq!(out, b"HEAD\r\n\r\nhello");
        assert!(body.is_done());
        // A chunked body ends at its last chunk.
        let mut body = BodyTracker::new(BodyFraming::Chunked);
        let mut out = Vec::new();
        let n = coalesce(&mut body, b"3\r\nabc\r\n0\r\n\r\nNEXT", &mut out).unwrap();
        assert_eq!(&out[..], b"3\r\nabc\r\n0\r\n\r\n");
        assert_eq!(n, out.len());
        // No body: nothing taken, whatever was read.
        let mut body = BodyTracker::new(BodyFraming::None);
        let mut out = Vec::new();
        assert_eq!(coalesce(&mut body, b"GET /", &mut out).unwrap(), 0);
        assert!(out.is_empty());
        // A malformed chunk size is the framing's error, not bytes sent.
        let mut body = BodyTracker::new(BodyFraming::Chunked);
        let mut out = Vec::new();
        assert!(coalesce(&mut body, b"zz\r\n", &mut out).is_err());
    }

    #[test]
    fn a_long_body_is_not_copied_behind_the_head() {
        let mut body = BodyTracker::new(BodyFraming::ContentLength(1 << 20));
        let mut out = Vec::new();
        let read = vec![7u8; COALESCE_MAX + 1];
        assert_eq!(coalesce(&mut body, &read, &mut out).unwrap(), 0);
        assert!(out.is_empty());
        let read = vec![7u8; COALESCE_MAX];
        assert_eq!(coalesce(&mut body, &read, &mut out).unwrap(), COALESCE_MAX);
        assert_eq!(out.len(), COALESCE_MAX);
    }
}
