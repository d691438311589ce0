//! The worker's loop: accept on every listener, hand each connection to the
//! protocol its first byte names, tick the tunnel registry, obey commands.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use splicegate_control::nodes::Rng;
use splicegate_control::{Code, Rejection};
use splicegate_uring::{
    Notifier, PipePool, Receiver, Runtime, RuntimeConfig, TcpListener, TcpStream, sleep, spawn,
    timeout, timeout_at,
};

use crate::bufs::Buf;
use crate::client::Client;
use crate::ctx::Ctx;
use crate::io::read_some;
use crate::resolve::DnsCache;
use crate::tunnels::Tunnels;
use crate::{Binding, Command, Shared, WorkerStats, http, socks};

/// Which of two futures finished first.
pub(crate) enum Either<A, B> {
    Left(A),
    Right(B),
}

/// Poll two futures, `a` first; the other is dropped.
pub(crate) async fn select2<A: Future, B: Future>(a: A, b: B) -> Either<A::Output, B::Output> {
    let mut a = pin!(a);
    let mut b = pin!(b);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = a.as_mut().poll(cx) {
            return Poll::Ready(Either::Left(v));
        }
        if let Poll::Ready(v) = b.as_mut().poll(cx) {
            return Poll::Ready(Either::Right(v));
        }
        Poll::Pending
    })
    .await
}

/// Counts a client connection while it is open.
pub(crate) struct OpenGuard(Arc<WorkerStats>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        WorkerStats::dec(&self.0.open_connections);
    }
}

pub(crate) fn run(
    index: usize,
    listeners: Vec<(std::net::TcpListener, Binding)>,
    shared: Arc<Shared>,
    mut commands: Receiver<Command>,
    stats: Arc<WorkerStats>,
) -> std::io::Result<()> {
    let rt = Runtime::new(RuntimeConfig {
        entries: 1024,
        // Two polls per tunnel: room for about 8,000 busy tunnels per worker
        // before the kernel has to hold completions back (256 KiB of CQEs).
        cq_entries: 16_384,
        ..RuntimeConfig::default()
    })?;
    tracing::debug!(
        worker = index,
        ring = rt.ring_setup().as_str(),
        "worker ring set up"
    );
    rt.block_on(async move {
        let seed = (index as u64 + 1).wrapping_mul(0x9E37_79B9) ^ crate::clock::unix_ms();
        let ctx = Rc::new(Ctx {
            shared,
            stats,
            pipes: PipePool::new(256),
            tunnels: Tunnels::default(),
            rng: RefCell::new(Rng::new(seed)),
            dns: DnsCache::default(),
            draining: Cell::new(false),
            guard_records: Cell::new((0, 0)),
            udp_buffers: RefCell::new(Vec::new()),
            upstreams: RefCell::new(Default::default()),
        });
        let stop = Notifier::new();
        let mut stoppers = Vec::new();
        for (std_listener, binding) in listeners {
            let listener = TcpListener::from_std(std_listener)?;
            let stop = Notifier::new();
            stoppers.push(stop.clone());
            spawn(accept_loop(ctx.clone(), listener, binding, stop));
        }
        spawn(ticker(ctx.clone(), stop.clone()));
        let grace = match commands.recv().await {
            Some(Command::Drain { grace }) => grace,
            None => Duration::ZERO,
        };
        // Drain: no new connections; open ones may finish within the grace.
        ctx.draining.set(true);
        for s in &stoppers {
            s.notify();
        }
        let deadline = Instant::now() + grace;
        while ctx
            .stats
            .open_connections
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
            && Instant::now() < deadline
        {
            sleep(Duration::from_millis(20)).await;
        }
        ctx.tunnels.stop_all();
        sleep(Duration::from_millis(20)).await;
        ctx.tunnels.tick(&ctx.shared.engine.policy(), &ctx.stats);
        stop.notify();
        Ok(())
    })?
}

async fn accept_loop(ctx: Rc<Ctx>, listener: TcpListener, binding: Binding, stop: Notifier) {
    let mut last_warn: Option<Instant> = None;
    let mut failures = 0u64;
    loop {
        let (stream, peer) = match select2(listener.accept(), stop.notified()).await {
            Either::Right(()) => return,
            Either::Left(Ok(conn)) => conn,
            Either::Left(Err(e)) => {
                // Out of descriptors and the like: stop accepting briefly (the
                // backlog holds the clients), keep serving, and say so at most
                // once every 5 s with how often it happened.
                failures += 1;
                if last_warn.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(5)) {
                    tracing::warn!(error = %e, failures, "accept failed; retrying every 10 ms");
                    last_warn = Some(Instant::now());
                    failures = 0;
                }
                sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        WorkerStats::inc(&ctx.stats.accepted);
        // On a PROXY protocol port the peer is the load balancer: the
        // per-source rules wait for the client's address in the header.
        if ctx.shared.guard_at_accept && !binding.proxy_protocol && !admitted(&ctx, binding, peer) {
            continue;
        }
        WorkerStats::inc(&ctx.stats.open_connections);
        let guard = OpenGuard(ctx.stats.clone());
        spawn(serve(ctx.clone(), stream, peer, binding, guard));
    }
}

/// The per-source rules (flood guard rate, bans for repeated
/// `AUTH_FAILED`, `ip_only` allowlists) in user space: `false` when the
/// connection is to be closed at once, counted and recorded.
fn admitted(ctx: &Ctx, binding: Binding, peer: SocketAddr) -> bool {
    use splicegate_control::guard::Verdict;
    use splicegate_control::stats::{GUARD_DROP_BANNED, GUARD_DROP_NOT_ALLOWED, GUARD_DROP_RATE};
    let ip = peer.ip();
    let dropped = match ctx.shared.guard.on_connect(ip, crate::clock::now()) {
        Verdict::Pass if binding.ip_only && !allowed_on_ip_only(ctx, binding, peer) => Some((
            GUARD_DROP_NOT_ALLOWED,
            Code::IpNotAllowed,
            format!("{ip} is not on the allowlist of this ip_only port; closed at accept"),
        )),
        Verdict::Pass => None,
        Verdict::DropRate => Some((
            GUARD_DROP_RATE,
            Code::RateLimitExceeded,
            format!(
                "{ip} opened connections faster than the flood guard allows ([ebpf] syn_rate, syn_burst); closed at accept"
            ),
        )),
        Verdict::DropBanned => Some((
            GUARD_DROP_BANNED,
            Code::AuthFailed,
            format!("{ip} is banned after repeated AUTH_FAILED; closed at accept"),
        )),
    };
    match dropped {
        Some((i, code, detail)) => {
            WorkerStats::inc(&ctx.stats.guard_drops[i]);
            ctx.record_guard(peer, Rejection::new(code, detail));
            false
        }
        None => true,
    }
}

fn allowed_on_ip_only(ctx: &Ctx, binding: Binding, peer: SocketAddr) -> bool {
    let policy = ctx.shared.engine.policy();
    let ip = match peer.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer.ip(), std::net::IpAddr::V4),
        v4 => v4,
    };
    binding
        .package
        .and_then(|id| policy.packages.get(&id))
        .is_some_and(|p| p.decl.ip_allowlist.iter().any(|n| n.contains(&ip)))
}

async fn serve(
    ctx: Rc<Ctx>,
    stream: TcpStream,
    peer: SocketAddr,
    binding: Binding,
    _open: OpenGuard,
) {
    let _ = stream.set_nodelay(true);
    let mut buf = Buf::take();
    let deadline = Instant::now() + ctx.shared.settings.handshake;
    // Behind a load balancer: the header names the client, and the same
    // handshake deadline covers it. The kernel programs never see these
    // ports (the load balancer's address is every packet's source), so the
    // per-source rules run here, on the header's address, with or without
    // them.
    let peer = if binding.proxy_protocol {
        let Some(client) = read_proxy_header(&ctx, &stream, peer, &mut buf, deadline).await else {
            return;
        };
        if !admitted(&ctx, binding, client) {
            return;
        }
        client
    } else {
        peer
    };
    // The header's segment often carries the client's first bytes too.
    if buf.is_empty() {
        match read_some(&stream, &mut buf, deadline).await {
            Ok(Some(n)) if n > 0 => {}
            _ => return, // closed, timed out or failed before its first byte
        }
    }
    let client = if buf[0] == TLS_HANDSHAKE_RECORD {
        // The client's first bytes inside TLS take the place of the sniffed
        // ones (the handshake deadline covers both).
        let Some(client) = start_tls(&ctx, stream, &buf, deadline).await else {
            return;
        };
        buf.clear();
        match read_some(&client, &mut buf, deadline).await {
            Ok(Some(n)) if n > 0 => {}
            _ => return,
        }
        client
    } else if binding.tls_only {
        refuse_cleartext(&ctx, stream, peer, &buf).await;
        return;
    } else {
        Client::Plain(stream)
    };
    let tunnel = if buf[0] == 0x05 {
        socks::serve(&ctx, client, peer, binding, buf, deadline).await
    } else {
        http::serve(&ctx, client, peer, binding, buf, deadline).await
    };
    // The relay gets a task of its own: this handshake task's state (heads,
    // routing, dialing) ends here, so an idle tunnel holds only what it uses.
    if let Some(t) = tunnel {
        spawn(crate::tunnels::run(ctx, t, _open));
    }
}

/// Read the PROXY protocol header at the start of a connection from `lb`
/// into `buf`, leaving in `buf` only the bytes after it. The client's
/// address: the header's source, or `lb` itself for a header that names no
/// client (v2 `LOCAL`, a load balancer's health check; v1 `UNKNOWN`).
/// `None`: no valid header in time; counted (a connection closed before its
/// first byte, a bare TCP check, is not), and a missing or malformed one
/// recorded in the recent errors, so a load balancer that does not send
/// the header shows there.
async fn read_proxy_header(
    ctx: &Ctx,
    stream: &TcpStream,
    lb: SocketAddr,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Option<SocketAddr> {
    use crate::io::{ReadError, read_message};
    use splicegate_control::stats::{PP_MALFORMED, PP_MISSING, PP_TIMED_OUT, PP_TRUNCATED};
    use splicegate_proto::proxy_protocol;
    let count = |i: usize| WorkerStats::inc(&ctx.stats.proxy_protocol_rejected[i]);
    match read_message(stream, buf, deadline, None, proxy_protocol::parse).await {
        Ok(header) => {
            buf.drain(..header.consumed);
            Some(
                header
                    .addresses
                    .map_or(lb, |a| like_the_socket(a.source, lb)),
            )
        }
        Err(ReadError::Parse(e)) => {
            count(if e == proxy_protocol::Error::Missing {
                PP_MISSING
            } else {
                PP_MALFORMED
            });
            tracing::debug!(lb = %lb, error = %e, "PROXY protocol header refused");
            let detail = format!("from {lb} on a proxy_protocol port: {e}; closed");
            ctx.record_guard(lb, Rejection::new(Code::BadRequest, detail));
            None
        }
        Err(ReadError::Closed { partial: true }) => {
            count(PP_TRUNCATED);
            None
        }
        Err(ReadError::Timeout { .. }) => {
            count(PP_TIMED_OUT);
            None
        }
        Err(ReadError::Closed { partial: false } | ReadError::Io(_)) => None,
    }
}

/// The header's client in the form the listening socket gives its own
/// peers (`lb`): an IPv4 client as `::ffff:a.b.c.d` on a dual-stack socket,
/// an IPv4-mapped one as IPv4 on an IPv4 socket. Every later comparison of
/// addresses (a UDP association's datagrams, which arrive on a socket of
/// the listener's family) then sees one form, as for a direct client.
fn like_the_socket(client: SocketAddr, lb: SocketAddr) -> SocketAddr {
    use std::net::IpAddr;
    let ip = match (client.ip(), lb.ip()) {
        (IpAddr::V4(v4), IpAddr::V6(_)) => IpAddr::V6(v4.to_ipv6_mapped()),
        (IpAddr::V6(v6), IpAddr::V4(_)) => v6.to_ipv4_mapped().map_or(client.ip(), IpAddr::V4),
        (ip, _) => ip,
    };
    SocketAddr::new(ip, client.port())
}

/// A TLS record of type handshake: the first byte of a ClientHello.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// How long a refused client may keep sending before the close: its alert
/// or answer must not be lost to a reset.
const LINGER: Duration = Duration::from_millis(500);

/// TLS on a connection whose first bytes (`first`) began a ClientHello:
/// the handshake within `deadline`, counted by result. Without `[tls]`, a
/// handshake_failure alert. `None` when the connection ends here.
async fn start_tls(
    ctx: &Ctx,
    stream: TcpStream,
    first: &[u8],
    deadline: Instant,
) -> Option<Client> {
    use splicegate_control::stats::{
        TLS_FAILED, TLS_FULL, TLS_NOT_CONFIGURED, TLS_RESUMED, TLS_TIMED_OUT,
    };
    let count = |i: usize| WorkerStats::inc(&ctx.stats.tls_handshakes[i]);
    let Some(acceptor) = &ctx.shared.tls else {
        count(TLS_NOT_CONFIGURED);
        let alert = splicegate_tls::HANDSHAKE_FAILURE_ALERT;
        let _ = timeout(LINGER, stream.write_all(&alert)).await;
        linger(&stream).await;
        return None;
    };
    let tls = acceptor.accept(stream).ok()?;
    let handshake = async {
        tls.feed(first)?;
        tls.handshake().await
    };
    match timeout_at(deadline, handshake).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            count(TLS_FAILED);
            tracing::debug!(error = %e, "TLS handshake failed");
            // The alert rustls chose, then a lingering close.
            let _ = timeout(LINGER, tls.flush()).await;
            tls.linger(LINGER).await;
            return None;
        }
        Err(_) => {
            count(TLS_TIMED_OUT);
            return None;
        }
    }
    let resumed = tls.with_conn(|c| c.handshake_kind() == Some(rustls::HandshakeKind::Resumed));
    count(if resumed { TLS_RESUMED } else { TLS_FULL });
    Some(Client::Tls(Box::new(tls)))
}

/// Cleartext on a TLS-only port: HTTP gets 400 BAD_REQUEST, SOCKS5 gets
/// method 0xFF. Nothing the client sent is parsed (its credentials are
/// neither read nor logged).
async fn refuse_cleartext(ctx: &Ctx, stream: TcpStream, peer: SocketAddr, first: &[u8]) {
    use splicegate_control::policy::Protocol;
    let rejection = Rejection::new(Code::BadRequest, "this port requires TLS");
    let (protocol, answer) = if first[0] == 0x05 {
        (Protocol::Socks5, vec![0x05, 0xff])
    } else {
        let mut out = Vec::with_capacity(256);
        splicegate_control::catalog::write_http_error(&rejection, false, &mut out);
        (Protocol::Http, out)
    };
    ctx.record(
        peer,
        protocol,
        &crate::admission::Refusal::anonymous(rejection),
    );
    let _ = timeout(LINGER, stream.write_all(&answer)).await;
    linger(&stream).await;
}

/// FIN, then read and drop what the client still sends, briefly, so the
/// close does not reset the connection under the answer.
async fn linger(stream: &TcpStream) {
    let _ = stream.shutdown_write();
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 4096];
    while let Ok(Ok(n)) = timeout_at(deadline, stream.read(&mut sink)).await {
        if n == 0 {
            break;
        }
    }
}

async fn ticker(ctx: Rc<Ctx>, stop: Notifier) {
    loop {
        match select2(sleep(Duration::from_millis(250)), stop.notified()).await {
            Either::Left(()) => {
                ctx.tunnels.tick(&ctx.shared.engine.policy(), &ctx.stats);
                ctx.upstreams.borrow_mut().sweep(std::time::Instant::now());
                gauges(&ctx);
            }
            Either::Right(()) => return,
        }
    }
}

/// Copy the runtime's and the pipe pool's counters where `/metrics` reads.
fn gauges(ctx: &Ctx) {
    use std::sync::atomic::Ordering::Relaxed;
    let g = &ctx.stats.runtime;
    let p = ctx.pipes.stats();
    let r = splicegate_uring::runtime_stats();
    g.pipes_in_use.store(p.in_use as u64, Relaxed);
    g.pipe_copy_fallbacks.store(p.copy_fallbacks, Relaxed);
    g.pipe_failures.store(p.pipe_failures, Relaxed);
    g.cq_backlogs.store(r.cq_backlogs, Relaxed);
    g.cq_dropped.store(u64::from(r.cq_dropped), Relaxed);
    g.gathered_waits.store(r.gathered_waits, Relaxed);
    g.ops_in_flight.store(r.ops_in_flight as u64, Relaxed);
    g.tasks.store(r.tasks as u64, Relaxed);
    g.upstreams_idle
        .store(ctx.upstreams.borrow().len() as u64, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::like_the_socket;

    #[test]
    fn a_header_client_takes_the_sockets_form() {
        let sa = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let v4_lb = sa("10.0.0.5:40000");
        let v6_lb = sa("[::ffff:10.0.0.5]:40000");
        assert_eq!(like_the_socket(sa("1.2.3.4:5"), v4_lb), sa("1.2.3.4:5"));
        assert_eq!(
            like_the_socket(sa("1.2.3.4:5"), v6_lb),
            sa("[::ffff:1.2.3.4]:5")
        );
        assert_eq!(
            like_the_socket(sa("[::ffff:1.2.3.4]:5"), v4_lb),
            sa("1.2.3.4:5")
        );
        assert_eq!(
            like_the_socket(sa("[::ffff:1.2.3.4]:5"), v6_lb),
            sa("[::ffff:1.2.3.4]:5")
        );
        // A real IPv6 client stays one whatever the socket.
        assert_eq!(
            like_the_socket(sa("[2001:db8::1]:5"), v4_lb),
            sa("[2001:db8::1]:5")
        );
        assert_eq!(
            like_the_socket(sa("[2001:db8::1]:5"), v6_lb),
            sa("[2001:db8::1]:5")
        );
    }
}
