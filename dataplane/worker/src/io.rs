//! Reading with deadlines into growable buffers, and parsing as bytes arrive.

use std::io;
use std::time::Instant;

use splicegate_uring::timeout_at;

use crate::client::Stream;

/// Why a read for a message stopped.
#[derive(Debug)]
pub(crate) enum ReadError<E> {
    /// The peer closed; `partial` says whether it had sent part of a message.
    Closed { partial: bool },
    /// The deadline passed; `partial` as above.
    Timeout { partial: bool },
    /// A socket error.
    Io(io::Error),
    /// The bytes cannot be parsed.
    Parse(E),
}

/// Read more bytes into `buf` (appending) before `deadline`. Ok(0) = EOF.
pub(crate) async fn read_some(
    stream: &impl Stream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> io::Result<Option<usize>> {
    let start = buf.len();
    if buf.capacity() - start < 512 {
        buf.reserve(buf.capacity().max(1024));
    }
    let cap = buf.capacity();
    buf.resize(cap, 0);
    let r = timeout_at(deadline, stream.read(&mut buf[start..])).await;
    match r {
        Ok(Ok(n)) => {
            buf.truncate(start + n);
            Ok(Some(n))
        }
        Ok(Err(e)) => {
            buf.truncate(start);
            Err(e)
        }
        Err(_) => {
            buf.truncate(start);
            Ok(None)
        }
    }
}

/// Read until `parse` gives a message, an error, or the deadline passes.
/// `parse` runs on the whole buffer; with `line_based: Some(max)` it only
/// runs again once new bytes hold a line feed (a head cannot end without
/// one) or the buffer passes `max` (so the parser reports the size), and a
/// client dribbling one byte at a time costs no quadratic rescans.
pub(crate) async fn read_message<T, E>(
    stream: &impl Stream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    line_based: Option<usize>,
    mut parse: impl FnMut(&[u8]) -> Result<Option<T>, E>,
) -> Result<T, ReadError<E>> {
    if !buf.is_empty()
        && let Some(m) = parse(buf).map_err(ReadError::Parse)?
    {
        return Ok(m);
    }
    if buf.is_empty() {
        // Nothing of the message yet: the peer answers what we just sent,
        // or a keep-alive client has not sent its next request. A read now
        // would almost always say EAGAIN; wait on the ring first (a poll on a
        // ready socket completes at once, without a syscall of its own).
        match timeout_at(deadline, stream.readable()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(ReadError::Io(e)),
            Err(_) => return Err(ReadError::Timeout { partial: false }),
        }
    }
    loop {
        let before = buf.len();
        match read_some(stream, buf, deadline).await {
            Ok(Some(0)) => {
                return Err(ReadError::Closed {
                    partial: !buf.is_empty(),
                });
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(ReadError::Timeout {
                    partial: !buf.is_empty(),
                });
            }
            Err(e) => return Err(ReadError::Io(e)),
        }
        if let Some(max) = line_based
            && buf.len() <= max
            && !buf[before..].contains(&b'\n')
        {
            continue;
        }
        if let Some(m) = parse(buf).map_err(ReadError::Parse)? {
            return Ok(m);
        }
    }
}
