//! The byte path of a tunnel whose client speaks TLS: decrypted bytes from
//! the client go to the node, bytes from the node are encrypted to the
//! client. Bytes inside TLS cannot be spliced: each direction copies once,
//! in reads of up to 64 KiB (one TLS record is at most 16 KiB of them).
//!
//! Same contract as [`splicegate_uring::relay`]: the counters and chunk
//! hook of a [`RelayCtl`], its idle timeout and stop, half-close each way
//! (the client's close_notify or FIN becomes the node's FIN; the node's FIN
//! becomes close_notify and FIN to the client), and a [`RelayOutcome`].
//! One task, one state machine: it does every transfer that does not
//! block, then waits on the ring for the readiness it lacks. Its waits stay
//! armed across turns, so a busy tunnel does not cancel and re-arm polls.

use std::future::{Future, poll_fn};
use std::io::{self, Read, Write};
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::task::Poll;
use std::time::Instant;

use rustls::{ConnectionCommon, SideData};
use splicegate_uring::{
    Direction, RelayCtl, RelayEnd, RelayOutcome, Side, TcpStream, consume_budget, sleep_until,
};

use crate::stream::{TlsStream, TryRead, TryWrite, tls_error};

/// The plaintext buffer of each direction.
const BUF: usize = 64 * 1024;

/// Where node bytes start in their buffer. rustls copies each record's
/// plaintext (up to 16 KiB) from our buffer to 5 bytes into a fresh,
/// page-aligned one: with our buffer page-aligned too, destination and
/// source sit 5 bytes apart modulo 4 KiB, the case where glibc's `rep
/// movsb` copy is slow (glibc bug 30994; measured at 31 % of the gateway's
/// CPU in bulk inside TLS). Starting 64 bytes in puts the destination
/// behind the source instead.
const DOWN_OFFSET: usize = 64;

/// Transfers between two looks at the ring, as the splice relay does.
const BUDGET: u32 = 16;

type Wait<'a> = Option<Pin<Box<dyn Future<Output = io::Result<()>> + 'a>>>;

/// What the relay waits for when nothing moves.
#[derive(Default)]
struct Needs {
    client_read: bool,
    client_write: bool,
    node_read: bool,
    node_write: bool,
}

/// How one pass of transfers went.
enum Pass {
    /// Bytes moved (or state changed): run again.
    Progress,
    /// Nothing can move until a socket is ready.
    Blocked(Needs),
    /// Both directions are done, or a socket failed.
    End(RelayEnd),
}

/// One tunnel's state between passes.
struct State {
    /// Decrypted client bytes not yet written to the node.
    up: Box<[u8]>,
    up_start: usize,
    up_end: usize,
    /// Node bytes, read and handed to rustls at once.
    down: Box<[u8]>,
    /// The client's socket reached EOF.
    client_eof: bool,
    /// The client sent close_notify or FIN, and rustls has handed over
    /// everything it decrypted before.
    client_done: bool,
    /// FIN sent to the node.
    node_shut: bool,
    /// The node sent FIN.
    node_done: bool,
    /// close_notify queued for the client.
    notified: bool,
    /// FIN sent to the client (after close_notify was written).
    client_shut: bool,
}

/// Relays `tls` (A, the client) ⇄ `node` (B) until both directions ended,
/// a socket fails, a TLS record is bad, the idle timeout passes, or
/// `ctl.stop()`. The streams are borrowed and stay open. Bytes already
/// read (after a CONNECT head, the node's leftover) must be written first.
pub async fn relay<C, S>(tls: &TlsStream<C>, node: &TcpStream, ctl: &RelayCtl) -> RelayOutcome
where
    C: Deref<Target = ConnectionCommon<S>> + DerefMut,
    S: SideData,
{
    let mut st = State {
        up: vec![0; BUF].into_boxed_slice(),
        up_start: 0,
        up_end: 0,
        down: vec![0; DOWN_OFFSET + BUF].into_boxed_slice(),
        client_eof: false,
        client_done: false,
        node_shut: false,
        node_done: false,
        notified: false,
        client_shut: false,
    };
    // The relay bounds what it queues itself (it reads from the node only
    // when rustls has nothing left to send), so rustls need not.
    tls.with_conn(|c| c.set_buffer_limit(None));
    let (a0, b0) = (ctl.a_to_b(), ctl.b_to_a());
    let outcome = |ctl: &RelayCtl, end| RelayOutcome {
        a_to_b: ctl.a_to_b() - a0,
        b_to_a: ctl.b_to_a() - b0,
        end,
    };
    let client = tls.tcp();
    let (mut client_r, mut client_w, mut node_r, mut node_w): (
        Wait<'_>,
        Wait<'_>,
        Wait<'_>,
        Wait<'_>,
    ) = (None, None, None, None);
    let mut last_activity = Instant::now();
    let mut transfers = 0u32;
    loop {
        if ctl.is_stopped() {
            return outcome(ctl, RelayEnd::Stopped);
        }
        let before = (ctl.a_to_b(), ctl.b_to_a());
        let pass = tls.with_conn(|c| st.pass(c, client, node, ctl));
        if (ctl.a_to_b(), ctl.b_to_a()) != before {
            last_activity = Instant::now();
        }
        let needs = match pass {
            Pass::End(end) => {
                if matches!(end, RelayEnd::Error { side: Side::A, .. }) {
                    // A bad record: its alert, if rustls queued one.
                    let _ = tls.with_conn(|c| c.write_tls(&mut TryWrite(client)));
                }
                return outcome(ctl, end);
            }
            Pass::Progress => {
                transfers += 1;
                if transfers >= BUDGET {
                    transfers = 0;
                    splicegate_uring::yield_now().await;
                } else {
                    consume_budget().await;
                }
                continue;
            }
            Pass::Blocked(needs) => needs,
        };
        transfers = 0;
        let idle_at = ctl.idle_timeout().map(|idle| last_activity + idle);
        let mut idle_timer = idle_at.map(|at| Box::pin(sleep_until(at)));
        let waited = poll_fn(|cx| {
            ctl.wake_on_stop(cx.waker());
            if ctl.is_stopped() {
                return Poll::Ready(false);
            }
            let mut ready = false;
            for (want, slot, sock, write) in [
                (needs.client_read, &mut client_r, client, false),
                (needs.client_write, &mut client_w, client, true),
                (needs.node_read, &mut node_r, node, false),
                (needs.node_write, &mut node_w, node, true),
            ] {
                if want && slot.is_none() {
                    *slot = Some(if write {
                        Box::pin(sock.writable())
                    } else {
                        Box::pin(sock.readable())
                    });
                }
                if let Some(f) = slot.as_mut()
                    && f.as_mut().poll(cx).is_ready()
                {
                    // Ready, or failed: the next pass's syscall says which.
                    *slot = None;
                    ready |= want;
                }
            }
            if ready {
                return Poll::Ready(false);
            }
            if let Some(t) = idle_timer.as_mut()
                && t.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(true);
            }
            Poll::Pending
        })
        .await;
        if waited {
            return outcome(ctl, RelayEnd::Idle);
        }
    }
}

/// A socket error of `side`, or `None` for `WouldBlock`.
fn failed(side: Side, e: io::Error) -> Option<RelayEnd> {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => None,
        _ => Some(RelayEnd::Error { side, error: e }),
    }
}

impl State {
    /// Every transfer that does not block, once each.
    fn pass<S: SideData>(
        &mut self,
        conn: &mut ConnectionCommon<S>,
        client: &TcpStream,
        node: &TcpStream,
        ctl: &RelayCtl,
    ) -> Pass {
        let mut needs = Needs::default();
        let mut progress = false;
        // 1. Client records into rustls, while it has room for them.
        if !self.client_eof && conn.wants_read() {
            match conn.read_tls(&mut TryRead(client)) {
                Ok(0) => {
                    // What rustls decrypted before is still delivered (step
                    // 2 reads it to the end), then the node gets FIN. A
                    // truncated record at EOF is the client's loss.
                    self.client_eof = true;
                    let _ = conn.process_new_packets();
                    progress = true;
                }
                Ok(_) => {
                    if let Err(e) = conn.process_new_packets() {
                        return Pass::End(RelayEnd::Error {
                            side: Side::A,
                            error: tls_error(e),
                        });
                    }
                    progress = true;
                }
                Err(e) => match failed(Side::A, e) {
                    Some(end) => return Pass::End(end),
                    None => needs.client_read = true,
                },
            }
        }
        // 2. Decrypted bytes to the node.
        if self.up_start == self.up_end && !self.client_done {
            match conn.reader().read(&mut self.up) {
                Ok(0) => self.client_done = true,
                Ok(n) => (self.up_start, self.up_end) = (0, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => self.client_done = true,
            }
        }
        if self.up_start < self.up_end {
            match node.try_write(&self.up[self.up_start..self.up_end]) {
                Ok(n) => {
                    self.up_start += n;
                    ctl.count(Direction::AToB, n);
                    progress = true;
                }
                Err(e) => match failed(Side::B, e) {
                    Some(end) => return Pass::End(end),
                    None => needs.node_write = true,
                },
            }
        }
        if self.client_done && self.up_start == self.up_end && !self.node_shut {
            self.node_shut = true;
            let _ = node.shutdown_write();
            progress = true;
        }
        // 3. Node bytes into rustls, only when it has sent all it had.
        if !self.node_done && !conn.wants_write() {
            match node.try_read(&mut self.down[DOWN_OFFSET..]) {
                Ok(0) => {
                    self.node_done = true;
                    progress = true;
                }
                Ok(n) => {
                    let plain = &self.down[DOWN_OFFSET..DOWN_OFFSET + n];
                    if let Err(e) = conn.writer().write_all(plain) {
                        return Pass::End(RelayEnd::Local(e));
                    }
                    ctl.count(Direction::BToA, n);
                    progress = true;
                }
                Err(e) => match failed(Side::B, e) {
                    Some(end) => return Pass::End(end),
                    None => needs.node_read = true,
                },
            }
        }
        if self.node_done && !self.notified {
            self.notified = true;
            conn.send_close_notify();
        }
        // 4. Records to the client.
        while conn.wants_write() {
            match conn.write_tls(&mut TryWrite(client)) {
                Ok(_) => progress = true,
                Err(e) => match failed(Side::A, e) {
                    Some(end) => return Pass::End(end),
                    None => {
                        needs.client_write = true;
                        break;
                    }
                },
            }
        }
        if self.notified && !conn.wants_write() && !self.client_shut {
            self.client_shut = true;
            let _ = client.shutdown_write();
            progress = true;
        }
        if self.node_shut && self.client_shut {
            return Pass::End(RelayEnd::Closed);
        }
        if progress {
            Pass::Progress
        } else {
            Pass::Blocked(needs)
        }
    }
}
