//! SOCKS5 on the proxy port (RFC 1928 CONNECT, RFC 1929 username/password).
//! Codes map to reply fields through the catalogue; the code and its detail
//! go to the recent-errors list.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use splicegate_control::Code;
use splicegate_control::catalog::{Rejection, Socks5Answer};
use splicegate_control::policy::{Authenticated, Credentials, Hello, Protocol};
use splicegate_proto::Host;
use splicegate_proto::socks5::{Socks5Error, method, reply, server};
use splicegate_uring::{TcpStream, timeout};

use crate::ctx::Ctx;
use crate::dial::connect_route;
use crate::io::{ReadError, read_message};
use crate::tunnels::Tunnel;
use crate::{Binding, clock};

async fn send(client: &TcpStream, bytes: &[u8]) -> bool {
    matches!(
        timeout(Duration::from_secs(5), client.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

async fn refuse(
    ctx: &Ctx,
    client: &TcpStream,
    peer: SocketAddr,
    package: Option<u64>,
    rej: &Rejection,
) {
    let policy = ctx.shared.engine.policy();
    ctx.record(&policy, peer, package, "socks5", rej);
    let code = match rej.code.socks5() {
        Socks5Answer::Reply(c) => c,
        Socks5Answer::AuthFailure => reply::NOT_ALLOWED,
    };
    let mut out = Vec::with_capacity(16);
    server::write_reply(code, None, &mut out);
    send(client, &out).await;
}

pub(crate) async fn serve(
    ctx: &Ctx,
    client: TcpStream,
    peer: SocketAddr,
    binding: Binding,
    mut buf: Vec<u8>,
    deadline: Instant,
) -> Option<Box<Tunnel>> {
    // Greeting.
    let Ok(greeting) =
        read_message(&client, &mut buf, deadline, None, server::parse_greeting).await
    else {
        return None; // malformed, truncated or slow: the connection closes
    };
    buf.drain(..greeting.consumed);
    let policy = ctx.shared.engine.policy_arc();
    let auth: Authenticated = if greeting.offers(method::USERPASS) {
        if !send(&client, &server::method_reply(method::USERPASS)).await {
            return None;
        }
        let Ok(up) = read_message(&client, &mut buf, deadline, None, server::parse_userpass).await
        else {
            return None;
        };
        buf.drain(..up.consumed);
        let hello = Hello {
            client_ip: peer.ip(),
            credentials: Credentials::Present {
                username: &up.username,
                password: &up.password,
            },
            listener_package: binding.package,
        };
        match policy.authenticate(&hello) {
            Ok(a) => {
                if !send(&client, &server::auth_reply(true)).await {
                    return None;
                }
                a
            }
            Err(rej) => {
                let package = policy.refused_package(&hello, &rej);
                ctx.record(&policy, peer, package, "socks5", &rej);
                send(&client, &server::auth_reply(false)).await;
                return None;
            }
        }
    } else {
        let hello = Hello {
            client_ip: peer.ip(),
            credentials: Credentials::Absent,
            listener_package: binding.package,
        };
        let allowed = if greeting.offers(method::NO_AUTH) {
            policy.authenticate(&hello)
        } else {
            Err(no_method())
        };
        match allowed {
            Ok(a) => {
                if !send(&client, &server::method_reply(method::NO_AUTH)).await {
                    return None;
                }
                a
            }
            Err(rej) => {
                let package = policy.refused_package(&hello, &rej);
                ctx.record(&policy, peer, package, "socks5", &rej);
                send(&client, &server::method_reply(method::NO_ACCEPTABLE)).await;
                return None;
            }
        }
    };
    let package_id = auth.package.id();
    // Request.
    let request = match read_message(&client, &mut buf, deadline, None, server::parse_request).await
    {
        Ok(r) => r,
        Err(ReadError::Parse(Socks5Error::UnsupportedAddressType(_))) => {
            let mut out = Vec::new();
            server::write_reply(reply::ADDRESS_TYPE_NOT_SUPPORTED, None, &mut out);
            send(&client, &out).await;
            return None;
        }
        Err(_) => return None,
    };
    buf.drain(..request.consumed);
    let started = Instant::now();
    if request.command != server::Command::Connect {
        let mut out = Vec::new();
        server::write_reply(reply::COMMAND_NOT_SUPPORTED, None, &mut out);
        send(&client, &out).await;
        return None;
    }
    let host = match &request.host {
        Host::Ip(ip) => ip.to_string(),
        Host::Domain(d) => d.clone(),
    };
    let now = clock::now();
    let mut conn = None;
    let adm = match policy.admit(&auth, Protocol::Socks5, &host, request.port, &mut conn, now) {
        Ok(a) => a,
        Err(rej) => {
            refuse(ctx, &client, peer, Some(package_id), &rej).await;
            return None;
        }
    };
    let routed = ctx
        .shared
        .engine
        .route(&policy, &adm, now, &mut ctx.rng.borrow_mut());
    let mut route = match routed {
        Ok(r) => r,
        Err(rej) => {
            refuse(ctx, &client, peer, Some(package_id), &rej).await;
            return None;
        }
    };
    let (up, node) = match connect_route(ctx, &policy, &adm, &mut route).await {
        Ok(x) => x,
        Err(rej) => {
            refuse(ctx, &client, peer, Some(package_id), &rej).await;
            return None;
        }
    };
    let bound = up.stream.local_addr().ok();
    let mut out = Vec::with_capacity(32);
    server::write_reply(reply::SUCCEEDED, bound, &mut out);
    if !send(&client, &out).await {
        return None;
    }
    Some(Box::new(Tunnel {
        client,
        up,
        node,
        package: adm.package.clone(),
        early: buf.to_vec(), // exact size, usually empty
        host,
        port: request.port,
        protocol: "socks5",
        peer,
        started,
        setup: started.elapsed(),
        conn,
    }))
}

fn no_method() -> Rejection {
    Rejection::new(
        Code::ErrAuthRequired,
        "the client offered neither username/password nor (for an allowlisted address) no authentication",
    )
}
