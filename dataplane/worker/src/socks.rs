//! SOCKS5 on the proxy port (RFC 1928 CONNECT, RFC 1929 username/password).
//! Codes map to reply fields through the catalogue; the code and its detail
//! go to the recent-errors list.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use splicegate_control::Code;
use splicegate_control::catalog::{Rejection, Socks5Answer};
use splicegate_control::policy::{Credentials, Protocol};
use splicegate_proto::socks5::{Socks5Error, method, reply, server};
use splicegate_uring::timeout;

use crate::Binding;
use crate::admission::{Gate, Refusal};
use crate::bufs::Buf;
use crate::client::{Client, Stream};
use crate::ctx::Ctx;
use crate::io::{ReadError, read_message};
use crate::tunnels::Tunnel;

async fn send(client: &Client, bytes: &[u8]) -> bool {
    matches!(
        timeout(Duration::from_secs(5), client.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

/// Record a refusal after the request and answer it with the reply field the
/// catalogue gives its code.
pub(crate) async fn refuse(ctx: &Ctx, client: &Client, peer: SocketAddr, refusal: &Refusal) {
    ctx.record(peer, Protocol::Socks5, refusal);
    let code = match refusal.rejection.code.socks5() {
        Socks5Answer::Reply(c) => c,
        Socks5Answer::AuthFailure => reply::NOT_ALLOWED,
    };
    let mut out = Vec::with_capacity(16);
    server::write_reply(code, None, &mut out);
    send(client, &out).await;
}

pub(crate) async fn serve(
    ctx: &Ctx,
    client: Client,
    peer: SocketAddr,
    binding: Binding,
    mut buf: Buf,
    deadline: Instant,
) -> Option<Tunnel> {
    // Greeting.
    let Ok(greeting) =
        read_message(&client, &mut buf, deadline, None, server::parse_greeting).await
    else {
        return None; // malformed, truncated or slow: the connection closes
    };
    buf.drain(..greeting.consumed);
    let gate = Gate::new(ctx, peer, binding, Protocol::Socks5);
    // Method and authentication (checks 1–5), answered in SOCKS5's own terms.
    // The credentials outlive the authentication: its rules are read from
    // the username.
    let userpass;
    let auth = if greeting.offers(method::USERPASS) {
        if !send(&client, &server::method_reply(method::USERPASS)).await {
            return None;
        }
        let Ok(up) = read_message(&client, &mut buf, deadline, None, server::parse_userpass).await
        else {
            return None;
        };
        buf.drain(..up.consumed);
        userpass = up;
        let verdict = gate.authenticate(Credentials::Present {
            username: &userpass.username,
            password: &userpass.password,
        });
        if let Err(refusal) = &verdict {
            ctx.record(peer, Protocol::Socks5, refusal);
        }
        if !send(&client, &server::auth_reply(verdict.is_ok())).await {
            return None;
        }
        verdict.ok()?
    } else {
        let verdict = if greeting.offers(method::NO_AUTH) {
            gate.authenticate(Credentials::Absent)
        } else {
            Err(Refusal::anonymous(no_method()))
        };
        let chosen = match &verdict {
            Ok(_) => method::NO_AUTH,
            Err(refusal) => {
                ctx.record(peer, Protocol::Socks5, refusal);
                method::NO_ACCEPTABLE
            }
        };
        if !send(&client, &server::method_reply(chosen)).await {
            return None;
        }
        verdict.ok()?
    };
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
    if request.command == server::Command::UdpAssociate {
        // The association runs here until its TCP connection closes.
        crate::udp::associate(ctx, client, peer, &gate, &auth, started).await;
        return None;
    }
    if request.command != server::Command::Connect {
        let mut out = Vec::new();
        server::write_reply(reply::COMMAND_NOT_SUPPORTED, None, &mut out);
        send(&client, &out).await;
        return None;
    }
    // Checks 6–11 and the dial.
    let mut conn = None;
    let admitted = gate
        .admit(ctx, &auth, &request.target, &mut conn, started)
        .await;
    let established = match admitted {
        Ok(mut admission) => admission.dial(ctx, Protocol::Socks5).await,
        Err(refusal) => Err(refusal),
    };
    let route = match established {
        Ok(e) => e,
        Err(refusal) => {
            refuse(ctx, &client, peer, &refusal).await;
            return None;
        }
    };
    let bound = route.up.stream.local_addr().ok();
    let mut out = Buf::take();
    server::write_reply(reply::SUCCEEDED, bound, &mut out);
    if !send(&client, &out).await {
        return None;
    }
    Some(Tunnel {
        client,
        peer,
        route,
        early: buf, // what the client sent past its request, usually nothing
        conn,
    })
}

fn no_method() -> Rejection {
    Rejection::new(
        Code::ErrAuthRequired,
        "the client offered neither username/password nor (for an allowlisted address) no authentication",
    )
}
