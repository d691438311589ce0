//! Node handshakes: the gateway asking an upstream node (an HTTP proxy or a
//! SOCKS5 server) to connect to a target, as sans-IO state machines that end
//! in what the node's answer means.
//!
//! Call order (the driver owns the socket, the buffer and the clock):
//! 1. Make a [`Handshake`] for the node's kind.
//! 2. Send what [`Handshake::poll_transmit`] writes (it may write nothing).
//! 3. Wait for the node's bytes until the deadline of [`Handshake::phase`]:
//!    [`Phase::Node`] while the node itself answers (a timeout there is the
//!    node's fault), [`Phase::Target`] once the node is asking the target (a
//!    timeout there is the target's).
//! 4. Feed everything received and not yet consumed to
//!    [`Handshake::handle_input`]: `None` asks for more bytes;
//!    [`Event::Continue`] consumed a message and has more to send (back to 2);
//!    [`Event::Done`] ends with an [`Outcome`]. When the wait ends without an
//!    answer, [`Handshake::on_timeout`] or [`Handshake::on_closed`] gives it.
//!
//! `handle_input` is split-invariant: fed any prefix of the node's bytes it
//! returns `None` or what it returns for the whole, and it never panics.
//! Which product error code each outcome becomes is decided by the caller's
//! error catalogue, not here.

use std::fmt;

use splicegate_addr::Target;

use crate::http::{parse_connect_response, write_connect_request};
use crate::socks5::{client, method, reply};

/// Longest answer head accepted from an HTTP node.
pub const MAX_ANSWER_HEAD: usize = 16 * 1024;

/// How a handshake ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The tunnel is open; input after the consumed bytes belongs to it.
    Established,
    /// The target refused or does not exist; the node did its job.
    TargetRefused(Answer),
    /// The target did not answer in time; the node did its job. `None` when
    /// our own deadline passed rather than the node saying so.
    TargetTimeout(Option<Answer>),
    /// The node failed: it is the node's fault, and the caller's `onerror`
    /// policy decides what happens next. The text says how, for the log.
    NodeFault(String),
}

/// What the node said, for details and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// An HTTP node's status to `CONNECT`.
    Status(u16),
    /// A SOCKS5 node's reply field.
    Reply(u8),
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Status(s) => write!(f, "answered {s}"),
            Answer::Reply(r) => write!(f, "replied {r:#04x}"),
        }
    }
}

/// Whose deadline applies to the current wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The node itself must answer (greeting, authentication).
    Node,
    /// The node is connecting to the target.
    Target,
}

/// A step of [`Handshake::handle_input`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message of `consumed` bytes was read; send what
    /// [`Handshake::poll_transmit`] has now and wait again.
    Continue {
        /// Bytes of the input taken.
        consumed: usize,
    },
    /// The handshake is over.
    Done {
        /// What it means.
        outcome: Outcome,
        /// Bytes of the input taken; any after them belong to the tunnel.
        consumed: usize,
    },
}

/// A node handshake in progress.
#[derive(Debug)]
pub struct Handshake {
    state: State,
    /// Bytes to send before the next wait.
    pending: Vec<u8>,
    target: Target,
    /// The node's credentials, for SOCKS5 username/password.
    credentials: Option<(String, String)>,
    /// The SOCKS5 command: 1 CONNECT, 3 UDP ASSOCIATE.
    command: u8,
    /// The SOCKS5 reply's BND address, once read.
    bound: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// HTTP: `CONNECT` sent, waiting for the status head.
    HttpAwaitStatus,
    /// SOCKS5: greeting sent, waiting for the chosen method.
    Socks5AwaitMethod,
    /// SOCKS5: username/password sent, waiting for the verdict.
    Socks5AwaitAuth,
    /// SOCKS5: `CONNECT` sent, waiting for the reply.
    Socks5AwaitReply,
    /// Over (an event with an outcome was returned).
    Done,
}

impl Handshake {
    /// `CONNECT target` to an HTTP proxy node, with Basic credentials when
    /// the node has them.
    pub fn http(target: &Target, credentials: Option<(&str, &str)>) -> Self {
        let mut pending = Vec::with_capacity(256);
        write_connect_request(&target.host.bare(), target.port, credentials, &mut pending);
        Handshake {
            state: State::HttpAwaitStatus,
            pending,
            target: target.clone(),
            credentials: None,
            command: 0x01,
            bound: None,
        }
    }

    /// RFC 1928 `CONNECT target` to a SOCKS5 node, offering RFC 1929
    /// username/password when the node has credentials and no
    /// authentication otherwise.
    pub fn socks5(target: &Target, credentials: Option<(&str, &str)>) -> Self {
        let mut pending = Vec::with_capacity(300);
        client::write_greeting(credentials.is_some(), &mut pending);
        Handshake {
            state: State::Socks5AwaitMethod,
            pending,
            target: target.clone(),
            credentials: credentials.map(|(u, p)| (u.to_owned(), p.to_owned())),
            command: 0x01,
            bound: None,
        }
    }

    /// A SOCKS5 node asked for a UDP association (`UDP ASSOCIATE` with
    /// DST `0.0.0.0:0`); once established, [`Handshake::bound`] is the
    /// node's relay address (its `0.0.0.0` meaning the node's own).
    pub fn socks5_udp(credentials: Option<(&str, &str)>) -> Self {
        let any = Target::new(
            splicegate_addr::Host::Ip(std::net::Ipv4Addr::UNSPECIFIED.into()),
            0,
        );
        let mut hs = Handshake::socks5(&any, credentials);
        hs.command = 0x03;
        hs
    }

    /// The BND address of the node's SOCKS5 reply, once read.
    pub fn bound(&self) -> Option<std::net::SocketAddr> {
        self.bound
    }

    /// Appends the bytes to send now to `out` (nothing while waiting).
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.pending);
    }

    /// Whose deadline applies while waiting for the next answer.
    pub fn phase(&self) -> Phase {
        match self.state {
            State::HttpAwaitStatus | State::Socks5AwaitReply | State::Done => Phase::Target,
            State::Socks5AwaitMethod | State::Socks5AwaitAuth => Phase::Node,
        }
    }

    /// Whether the awaited answer is a line-based head (HTTP), so a driver
    /// may skip parsing until new bytes hold a line feed.
    pub fn reads_lines(&self) -> bool {
        self.state == State::HttpAwaitStatus
    }

    /// Reads the node's next message from the front of `input` (everything
    /// received and not yet consumed). `None`: more bytes are needed.
    pub fn handle_input(&mut self, input: &[u8]) -> Option<Event> {
        let done = |outcome, consumed| Some(Event::Done { outcome, consumed });
        let fault = |why: String| {
            Some(Event::Done {
                outcome: Outcome::NodeFault(why),
                consumed: 0,
            })
        };
        let event = match self.state {
            State::Done => return None,
            State::HttpAwaitStatus => match parse_connect_response(input) {
                Ok(None) if input.len() > MAX_ANSWER_HEAD => {
                    fault("its answer head passed 16 KiB".into())
                }
                Ok(None) => None,
                Err(e) => fault(format!("malformed answer: {e}")),
                Ok(Some(r)) => {
                    let outcome = match r.status {
                        200..=299 => Outcome::Established,
                        500 | 502 | 503 => Outcome::TargetRefused(Answer::Status(r.status)),
                        504 => Outcome::TargetTimeout(Some(Answer::Status(504))),
                        other => Outcome::NodeFault(format!("answered CONNECT with {other}")),
                    };
                    done(outcome, r.head_len)
                }
            },
            State::Socks5AwaitMethod => match client::parse_method_reply(input) {
                Ok(None) => None,
                Err(e) => fault(format!("malformed answer: {e}")),
                Ok(Some(chosen)) => match (chosen, &self.credentials) {
                    (method::NO_AUTH, _) => self.send_connect(2),
                    (method::USERPASS, Some((u, p))) => {
                        match client::write_userpass(u, p, &mut self.pending) {
                            Ok(()) => {
                                self.state = State::Socks5AwaitAuth;
                                Some(Event::Continue { consumed: 2 })
                            }
                            Err(e) => fault(format!("credentials: {e}")),
                        }
                    }
                    (m, _) => fault(format!("chose method {m:#04x}")),
                },
            },
            State::Socks5AwaitAuth => match client::parse_auth_reply(input) {
                Ok(None) => None,
                Err(e) => fault(format!("malformed answer: {e}")),
                Ok(Some(true)) => self.send_connect(2),
                Ok(Some(false)) => fault("rejected our credentials".into()),
            },
            State::Socks5AwaitReply => match client::parse_connect_reply(input) {
                Ok(None) => None,
                Err(e) => fault(format!("malformed answer: {e}")),
                Ok(Some((code, consumed))) => {
                    self.bound = client::reply_bound(&input[..consumed]);
                    let outcome = match code {
                        reply::SUCCEEDED => Outcome::Established,
                        reply::NETWORK_UNREACHABLE
                        | reply::HOST_UNREACHABLE
                        | reply::CONNECTION_REFUSED => Outcome::TargetRefused(Answer::Reply(code)),
                        reply::TTL_EXPIRED => Outcome::TargetTimeout(Some(Answer::Reply(code))),
                        other => Outcome::NodeFault(format!("replied {other:#04x}")),
                    };
                    done(outcome, consumed)
                }
            },
        };
        if matches!(event, Some(Event::Done { .. })) {
            self.state = State::Done;
            self.pending.clear();
        }
        event
    }

    /// The wait for the node's answer reached its deadline.
    pub fn on_timeout(&self) -> Outcome {
        match self.phase() {
            Phase::Node => Outcome::NodeFault("no answer in time".into()),
            Phase::Target => Outcome::TargetTimeout(None),
        }
    }

    /// The node closed the connection before its answer was complete.
    pub fn on_closed(&self) -> Outcome {
        Outcome::NodeFault(match self.state {
            State::HttpAwaitStatus => "closed before answering CONNECT".into(),
            _ => "closed the connection".into(),
        })
    }

    fn send_connect(&mut self, consumed: usize) -> Option<Event> {
        match client::write_request(
            self.command,
            &self.target.host,
            self.target.port,
            &mut self.pending,
        ) {
            Ok(()) => {
                self.state = State::Socks5AwaitReply;
                Some(Event::Continue { consumed })
            }
            // A canonical host is at most 253 bytes and never empty; a
            // target that cannot be written is not the node's fault, but no
            // node could take it either.
            Err(e) => Some(Event::Done {
                outcome: Outcome::NodeFault(format!("cannot ask for this target: {e}")),
                consumed,
            }),
        }
    }
}

#[cfg(test)]
mod tests;
