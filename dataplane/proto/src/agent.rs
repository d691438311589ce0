//! The agent link: how a device that dialled out to the gateway (an
//! `agent` node) and the gateway talk over one TLS connection.
//!
//! One connection carries many streams, one per client tunnel. Every frame
//! is a 10-byte header and a payload:
//!
//! ```text
//! kind u8 | flags u8 | stream u32 (big-endian) | length u32 (big-endian) | payload
//! ```
//!
//! | kind | stream | payload | who sends it |
//! |---|---|---|---|
//! | `HELLO` | 0 | version u16, then `key=value` lines | the agent, first |
//! | `WELCOME` | 0 | version u16, then `key=value` lines | the gateway, in answer |
//! | `REFUSE` | 0 | reason u8, then a UTF-8 text; the gateway closes | the gateway |
//! | `OPEN` | n | receive window u32, then the target `host:port` | the gateway only |
//! | `OPENED` | n | receive window u32 | the agent, after its own connect |
//! | `OPEN_FAILED` | n | reason u8, then a UTF-8 text | the agent |
//! | `DATA` | n | bytes; flag `FIN`: the sender writes no more | both |
//! | `WINDOW` | n | increment u32 | both |
//! | `RESET` | n | a UTF-8 text; the stream is gone both ways | both |
//! | `PING` | 0 | opaque u64; flag `ACK` in the answer | both |
//! | `GOAWAY` | 0 | a UTF-8 text; no new streams | both |
//!
//! Rules the codec checks (a violation is a [`FrameError`]; the link is
//! closed, since nothing after it can be trusted): a payload is at most
//! [`MAX_PAYLOAD`] bytes, known kinds only, link frames on stream 0 and stream
//! frames on other streams, no flags a kind does not define, texts UTF-8.
//! Rules of the conversation (windows, who opens, what follows what) live
//! in the drivers and in [`SendWindow`]/[`RecvWindow`].
//!
//! Flow control: each side grants the other a window per stream (the
//! initial one in `OPEN`/`OPENED`, then `WINDOW` increments). A sender
//! never has more unacknowledged `DATA` bytes in flight than granted, so a
//! stream whose reader stalls fills its window and stops, and never holds up
//! another stream. The receiver's window grows with the link's measured
//! bandwidth-delay product ([`RecvWindow`]).

use std::fmt;

/// The protocol version this build speaks.
pub const VERSION: u16 = 1;

/// Bytes of a frame header.
pub const HEADER: usize = 10;

/// Largest payload of any frame.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Largest payload of a `HELLO`/`WELCOME`, `REFUSE`, `OPEN_FAILED`, `RESET`,
/// `GOAWAY` or `OPEN` frame.
pub const MAX_CONTROL: usize = 4096;

/// Largest UDP payload a `DATAGRAM` carries.
pub const MAX_UDP_PAYLOAD: usize = 65_535;

/// Largest `DATAGRAM` payload: an address (a length byte and up to 255
/// bytes of `host:port`) and a UDP payload.
pub const MAX_DATAGRAM_FRAME: usize = 1 + 255 + MAX_UDP_PAYLOAD;

/// A stream's first receive window.
pub const INITIAL_WINDOW: u32 = 256 * 1024;

/// The largest a receive window grows to.
pub const MAX_WINDOW: u32 = 16 * 1024 * 1024;

/// Flag of `DATA`: the sender's last bytes on the stream.
pub const FIN: u8 = 0x01;
/// Flag of `PING`: an answer.
pub const ACK: u8 = 0x01;

/// Frame kinds on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// The agent's first frame.
    Hello = 1,
    /// The gateway accepted the agent.
    Welcome = 2,
    /// The gateway refused the agent.
    Refuse = 3,
    /// Open a stream to a target.
    Open = 4,
    /// The device connected.
    Opened = 5,
    /// The device could not connect.
    OpenFailed = 6,
    /// Stream bytes.
    Data = 7,
    /// More window.
    Window = 8,
    /// Abort a stream.
    Reset = 9,
    /// Liveness and round trip.
    Ping = 10,
    /// No new streams.
    GoAway = 11,
    /// Open a UDP association on the device.
    OpenUdp = 12,
    /// One datagram of a UDP association.
    Datagram = 13,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Refuse,
            4 => Kind::Open,
            5 => Kind::Opened,
            6 => Kind::OpenFailed,
            7 => Kind::Data,
            8 => Kind::Window,
            9 => Kind::Reset,
            10 => Kind::Ping,
            11 => Kind::GoAway,
            12 => Kind::OpenUdp,
            13 => Kind::Datagram,
            _ => return None,
        })
    }

    fn on_link(self) -> bool {
        matches!(
            self,
            Kind::Hello | Kind::Welcome | Kind::Refuse | Kind::Ping | Kind::GoAway
        )
    }

    fn flags(self) -> u8 {
        match self {
            Kind::Data => FIN,
            Kind::Ping => ACK,
            _ => 0,
        }
    }

    fn max_payload(self) -> usize {
        match self {
            Kind::Data => MAX_PAYLOAD,
            Kind::Datagram => MAX_DATAGRAM_FRAME,
            Kind::OpenUdp => 0,
            Kind::Window | Kind::Opened => 4,
            Kind::Ping => 8,
            _ => MAX_CONTROL,
        }
    }
}

/// Why the gateway refused an agent (`REFUSE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Unknown id, wrong key, or a revoked id: retrying cannot help (the
    /// agent exits with status 2).
    Key = 1,
    /// The gateway does not speak the agent's version.
    Version = 2,
    /// The id is taken by a node of another kind, or enrolment is off.
    Enrolment = 3,
    /// The gateway cannot take the agent now (stopping, overloaded); retry.
    Busy = 4,
    /// The hello was malformed.
    Malformed = 5,
}

impl Refusal {
    fn from_u8(b: u8) -> Option<Refusal> {
        Some(match b {
            1 => Refusal::Key,
            2 => Refusal::Version,
            3 => Refusal::Enrolment,
            4 => Refusal::Busy,
            5 => Refusal::Malformed,
            _ => return None,
        })
    }

    /// Whether the agent should stop for good (exit status 2) rather than retry.
    pub fn is_final(self) -> bool {
        matches!(self, Refusal::Key | Refusal::Enrolment)
    }
}

/// Why a device could not open a stream (`OPEN_FAILED`), which is what the
/// client is told (the contract's node table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// The target refused or does not exist (→ `TARGET_UNREACHABLE`).
    Refused = 1,
    /// No connect within the device's deadline (→ `GATEWAY_TIMEOUT`).
    Timeout = 2,
    /// The target is on the device's own network (→ `403 DISALLOWED`).
    Disallowed = 3,
    /// The device is at `--max-streams` (→ node failure, `onerror` decides).
    Capacity = 4,
    /// The target's name does not resolve on the device (→ `TARGET_UNREACHABLE`).
    Unresolved = 5,
    /// Anything else wrong on the device (→ node failure).
    Fault = 6,
}

impl OpenError {
    fn from_u8(b: u8) -> Option<OpenError> {
        Some(match b {
            1 => OpenError::Refused,
            2 => OpenError::Timeout,
            3 => OpenError::Disallowed,
            4 => OpenError::Capacity,
            5 => OpenError::Unresolved,
            6 => OpenError::Fault,
            _ => return None,
        })
    }
}

/// A decoded frame, borrowing its payload from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// The agent introduces itself.
    Hello {
        /// Its protocol version.
        version: u16,
        /// `key=value` fields (see [`Fields`]).
        fields: Fields<'a>,
    },
    /// The gateway accepts the agent.
    Welcome {
        /// The gateway's protocol version.
        version: u16,
        /// `key=value` fields.
        fields: Fields<'a>,
    },
    /// The gateway refuses the agent and closes.
    Refuse {
        /// Why.
        reason: Refusal,
        /// For the agent's log.
        text: &'a str,
    },
    /// Open stream `stream` to `target`.
    Open {
        /// The new stream.
        stream: u32,
        /// The gateway's receive window for it.
        window: u32,
        /// `host:port` (a bracketed IPv6 literal, a name or an IPv4 address).
        target: &'a str,
    },
    /// The device connected to the target.
    Opened {
        /// The stream.
        stream: u32,
        /// The device's receive window for it.
        window: u32,
    },
    /// The device could not connect.
    OpenFailed {
        /// The stream.
        stream: u32,
        /// Why.
        reason: OpenError,
        /// For logs and the client's detail.
        text: &'a str,
    },
    /// Stream bytes.
    Data {
        /// The stream.
        stream: u32,
        /// The sender writes nothing more after these bytes.
        fin: bool,
        /// The bytes.
        bytes: &'a [u8],
    },
    /// The sender may send `increment` more bytes on `stream`.
    Window {
        /// The stream.
        stream: u32,
        /// Bytes granted.
        increment: u32,
    },
    /// The stream is aborted both ways.
    Reset {
        /// The stream.
        stream: u32,
        /// Why, for logs.
        text: &'a str,
    },
    /// A liveness check, or (`ack`) its answer.
    Ping {
        /// An answer to a ping.
        ack: bool,
        /// Echoed in the answer.
        opaque: u64,
    },
    /// The sender opens no new streams and takes none.
    GoAway {
        /// Why, for logs.
        text: &'a str,
    },
    /// Open UDP association `stream` on the device (answered by `OPENED`
    /// or `OPEN_FAILED`; ended by `RESET`).
    OpenUdp {
        /// The association.
        stream: u32,
    },
    /// One datagram: to `addr` (gateway → device) or from it (device →
    /// gateway).
    Datagram {
        /// The association.
        stream: u32,
        /// `host:port`: the target, or the sender of an answer.
        addr: &'a str,
        /// The UDP payload.
        bytes: &'a [u8],
    },
}

/// Why bytes are not a frame. The link is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// An unknown kind byte.
    UnknownKind(u8),
    /// A payload longer than its kind allows.
    TooLong {
        /// The kind.
        kind: Kind,
        /// Its length field.
        len: u32,
    },
    /// A link frame on a stream, or a stream frame on stream 0.
    WrongStream {
        /// The kind.
        kind: Kind,
        /// Its stream field.
        stream: u32,
    },
    /// Flags the kind does not define.
    BadFlags {
        /// The kind.
        kind: Kind,
        /// Its flags.
        flags: u8,
    },
    /// A payload of the wrong shape (short, not UTF-8, a bad field line).
    Malformed {
        /// The kind.
        kind: Kind,
        /// What is wrong.
        what: &'static str,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            FrameError::TooLong { kind, len } => {
                write!(f, "{kind:?} frame of {len} bytes is too long")
            }
            FrameError::WrongStream { kind, stream } => {
                write!(f, "{kind:?} frame on stream {stream}")
            }
            FrameError::BadFlags { kind, flags } => {
                write!(f, "{kind:?} frame with flags {flags:#04x}")
            }
            FrameError::Malformed { kind, what } => write!(f, "{kind:?} frame: {what}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// `key=value` lines of a `HELLO` or `WELCOME`: keys are lowercase ASCII
/// letters, digits and `_`; values printable ASCII without spaces' ends
/// trimmed; each line ends in `\n`. Unknown keys are kept (and ignored by
/// whoever does not know them), so either side can add fields.
#[derive(Clone, PartialEq, Eq)]
pub struct Fields<'a>(&'a str);

impl fmt::Debug for Fields<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets (`key`, `enrol_key`) never reach a log.
        let mut list = f.debug_list();
        for (k, v) in self.iter() {
            if k.contains("key") {
                list.entry(&format_args!("{k}=***"));
            } else {
                list.entry(&format_args!("{k}={v}"));
            }
        }
        list.finish()
    }
}

impl<'a> Fields<'a> {
    fn parse(text: &'a str) -> Result<Fields<'a>, &'static str> {
        if !text.is_empty() && !text.ends_with('\n') {
            return Err("a field line does not end in a newline");
        }
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                return Err("a field line has no '='");
            };
            if k.is_empty()
                || !k
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err("a field name is not lowercase ASCII");
            }
            if !v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                return Err("a field value is not printable ASCII");
            }
        }
        Ok(Fields(text))
    }

    /// Every field in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.0.lines().filter_map(|l| l.split_once('='))
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Decodes the first frame of `buf`: `Ok(None)` when more bytes are needed,
/// else the frame and the bytes it took. Split-invariant, never panics, and
/// refuses an oversized length from the header alone (before its payload
/// arrives).
pub fn decode<'a>(buf: &'a [u8]) -> Result<Option<(Frame<'a>, usize)>, FrameError> {
    if buf.len() < HEADER {
        // A bad kind byte is known from the first byte on.
        if let Some(&k) = buf.first()
            && Kind::from_u8(k).is_none()
        {
            return Err(FrameError::UnknownKind(k));
        }
        return Ok(None);
    }
    let kind = Kind::from_u8(buf[0]).ok_or(FrameError::UnknownKind(buf[0]))?;
    let flags = buf[1];
    let stream = be32(&buf[2..6]);
    let len = be32(&buf[6..10]);
    if len as usize > kind.max_payload() {
        return Err(FrameError::TooLong { kind, len });
    }
    if kind.on_link() != (stream == 0) {
        return Err(FrameError::WrongStream { kind, stream });
    }
    if flags & !kind.flags() != 0 {
        return Err(FrameError::BadFlags { kind, flags });
    }
    let total = HEADER + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let p = &buf[HEADER..total];
    let bad = |what| FrameError::Malformed { kind, what };
    let text = |b: &'a [u8]| std::str::from_utf8(b).map_err(|_| bad("the text is not UTF-8"));
    let frame = match kind {
        Kind::Hello | Kind::Welcome => {
            if p.len() < 2 {
                return Err(bad("no version"));
            }
            let version = u16::from_be_bytes([p[0], p[1]]);
            let fields = Fields::parse(text(&p[2..])?).map_err(bad)?;
            if kind == Kind::Hello {
                Frame::Hello { version, fields }
            } else {
                Frame::Welcome { version, fields }
            }
        }
        Kind::Refuse => {
            let (&r, rest) = p.split_first().ok_or(bad("no reason"))?;
            Frame::Refuse {
                reason: Refusal::from_u8(r).ok_or(bad("an unknown reason"))?,
                text: text(rest)?,
            }
        }
        Kind::Open => {
            if p.len() < 5 {
                return Err(bad("no window or target"));
            }
            Frame::Open {
                stream,
                window: be32(&p[..4]),
                target: text(&p[4..])?,
            }
        }
        Kind::Opened => {
            if p.len() != 4 {
                return Err(bad("a window is 4 bytes"));
            }
            Frame::Opened {
                stream,
                window: be32(p),
            }
        }
        Kind::OpenFailed => {
            let (&r, rest) = p.split_first().ok_or(bad("no reason"))?;
            Frame::OpenFailed {
                stream,
                reason: OpenError::from_u8(r).ok_or(bad("an unknown reason"))?,
                text: text(rest)?,
            }
        }
        Kind::Data => Frame::Data {
            stream,
            fin: flags & FIN != 0,
            bytes: p,
        },
        Kind::Window => {
            if p.len() != 4 {
                return Err(bad("an increment is 4 bytes"));
            }
            let increment = be32(p);
            if increment == 0 {
                return Err(bad("an increment of zero"));
            }
            Frame::Window { stream, increment }
        }
        Kind::Reset => Frame::Reset {
            stream,
            text: text(p)?,
        },
        Kind::Ping => {
            if p.len() != 8 {
                return Err(bad("an opaque value is 8 bytes"));
            }
            Frame::Ping {
                ack: flags & ACK != 0,
                opaque: u64::from_be_bytes(p.try_into().expect("8 bytes")),
            }
        }
        Kind::GoAway => Frame::GoAway { text: text(p)? },
        Kind::OpenUdp => Frame::OpenUdp { stream },
        Kind::Datagram => {
            let (addr, bytes) = split_datagram(p).ok_or(bad("a datagram's address"))?;
            if bytes.len() > MAX_UDP_PAYLOAD {
                return Err(bad("a datagram over 65535 bytes"));
            }
            Frame::Datagram {
                stream,
                addr,
                bytes,
            }
        }
    };
    Ok(Some((frame, total)))
}

fn header(out: &mut Vec<u8>, kind: Kind, flags: u8, stream: u32, len: usize) {
    out.push(kind as u8);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
}

/// Truncates a text to what a control frame holds, on a char boundary.
fn clip(text: &str, room: usize) -> &str {
    if text.len() <= room {
        return text;
    }
    let mut end = room;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl Frame<'_> {
    /// Appends the frame's bytes to `out`. Texts longer than a control
    /// frame holds are cut; a `DATA` payload over [`MAX_PAYLOAD`] or fields
    /// over [`MAX_CONTROL`] are the caller's bug and panic.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Frame::Hello {
                version,
                ref fields,
            }
            | Frame::Welcome {
                version,
                ref fields,
            } => {
                let kind = if matches!(self, Frame::Hello { .. }) {
                    Kind::Hello
                } else {
                    Kind::Welcome
                };
                assert!(2 + fields.0.len() <= MAX_CONTROL, "fields too long");
                header(out, kind, 0, 0, 2 + fields.0.len());
                out.extend_from_slice(&version.to_be_bytes());
                out.extend_from_slice(fields.0.as_bytes());
            }
            Frame::Refuse { reason, text } => {
                let text = clip(text, MAX_CONTROL - 1);
                header(out, Kind::Refuse, 0, 0, 1 + text.len());
                out.push(reason as u8);
                out.extend_from_slice(text.as_bytes());
            }
            Frame::Open {
                stream,
                window,
                target,
            } => {
                assert!(4 + target.len() <= MAX_CONTROL, "target too long");
                header(out, Kind::Open, 0, stream, 4 + target.len());
                out.extend_from_slice(&window.to_be_bytes());
                out.extend_from_slice(target.as_bytes());
            }
            Frame::Opened { stream, window } => {
                header(out, Kind::Opened, 0, stream, 4);
                out.extend_from_slice(&window.to_be_bytes());
            }
            Frame::OpenFailed {
                stream,
                reason,
                text,
            } => {
                let text = clip(text, MAX_CONTROL - 1);
                header(out, Kind::OpenFailed, 0, stream, 1 + text.len());
                out.push(reason as u8);
                out.extend_from_slice(text.as_bytes());
            }
            Frame::Data { stream, fin, bytes } => {
                assert!(bytes.len() <= MAX_PAYLOAD, "data frame too long");
                header(
                    out,
                    Kind::Data,
                    if fin { FIN } else { 0 },
                    stream,
                    bytes.len(),
                );
                out.extend_from_slice(bytes);
            }
            Frame::Window { stream, increment } => {
                header(out, Kind::Window, 0, stream, 4);
                out.extend_from_slice(&increment.to_be_bytes());
            }
            Frame::Reset { stream, text } => {
                let text = clip(text, MAX_CONTROL);
                header(out, Kind::Reset, 0, stream, text.len());
                out.extend_from_slice(text.as_bytes());
            }
            Frame::Ping { ack, opaque } => {
                header(out, Kind::Ping, if ack { ACK } else { 0 }, 0, 8);
                out.extend_from_slice(&opaque.to_be_bytes());
            }
            Frame::OpenUdp { stream } => header(out, Kind::OpenUdp, 0, stream, 0),
            Frame::Datagram {
                stream,
                addr,
                bytes,
            } => {
                let len = datagram_len(addr, bytes).expect("a datagram's address and payload fit");
                header(out, Kind::Datagram, 0, stream, len);
                write_datagram_payload(addr, bytes, out);
            }
            Frame::GoAway { text } => {
                let text = clip(text, MAX_CONTROL);
                header(out, Kind::GoAway, 0, 0, text.len());
                out.extend_from_slice(text.as_bytes());
            }
        }
    }
}

/// A `DATAGRAM` payload's length, or `None` when the address is longer
/// than 255 bytes or the payload than [`MAX_UDP_PAYLOAD`].
pub fn datagram_len(addr: &str, bytes: &[u8]) -> Option<usize> {
    (addr.len() <= 255 && bytes.len() <= MAX_UDP_PAYLOAD).then(|| 1 + addr.len() + bytes.len())
}

/// Writes a `DATAGRAM` payload: the address's length, the address, the
/// bytes (also the message format of the gateway's socket pair between a
/// worker and its agent thread).
pub fn write_datagram_payload(addr: &str, bytes: &[u8], out: &mut Vec<u8>) {
    out.push(addr.len() as u8);
    out.extend_from_slice(addr.as_bytes());
    out.extend_from_slice(bytes);
}

/// Appends a whole `DATAGRAM` frame for `stream` whose payload is already
/// encoded (as [`write_datagram_payload`] writes it: a worker's socket-pair
/// message), without splitting it first. `false` (nothing written) when the
/// payload is empty or longer than a frame holds.
pub fn encode_datagram_frame(stream: u32, payload: &[u8], out: &mut Vec<u8>) -> bool {
    if payload.is_empty() || payload.len() > MAX_DATAGRAM_FRAME {
        return false;
    }
    header(out, Kind::Datagram, 0, stream, payload.len());
    out.extend_from_slice(payload);
    true
}

/// Splits a `DATAGRAM` payload into its address and bytes.
pub fn split_datagram(p: &[u8]) -> Option<(&str, &[u8])> {
    let (&n, rest) = p.split_first()?;
    let n = usize::from(n);
    if rest.len() < n || n == 0 {
        return None;
    }
    let addr = std::str::from_utf8(&rest[..n]).ok()?;
    Some((addr, &rest[n..]))
}

/// Builds the text of [`Fields`]: values with a newline, `=` in the key, or
/// non-printable bytes are refused (returns `false`), so a field can never
/// forge another.
#[derive(Debug, Default, Clone)]
pub struct FieldsBuf(String);

impl FieldsBuf {
    /// An empty field list.
    pub fn new() -> FieldsBuf {
        FieldsBuf::default()
    }

    /// Adds `key=value`; `false` (and nothing added) when either is not allowed.
    pub fn push(&mut self, key: &str, value: &str) -> bool {
        let key_ok = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        let value_ok = value.bytes().all(|b| (0x20..0x7f).contains(&b));
        if !key_ok || !value_ok {
            return false;
        }
        self.0.push_str(key);
        self.0.push('=');
        self.0.push_str(value);
        self.0.push('\n');
        true
    }

    /// The fields, for a frame.
    pub fn fields(&self) -> Fields<'_> {
        Fields(&self.0)
    }
}

/// What a sender may still send on a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendWindow(u64);

impl SendWindow {
    /// The peer's initial grant.
    pub fn new(initial: u32) -> SendWindow {
        SendWindow(u64::from(initial))
    }

    /// Bytes that may be sent now.
    pub fn available(&self) -> u64 {
        self.0
    }

    /// `n` bytes were sent (at most [`SendWindow::available`]).
    pub fn spend(&mut self, n: usize) {
        self.0 = self.0.saturating_sub(n as u64);
    }

    /// The peer granted more. `false` when the window would pass any sane
    /// bound (a peer flooding `WINDOW` frames): the stream is reset.
    pub fn grant(&mut self, increment: u32) -> bool {
        self.0 += u64::from(increment);
        self.0 <= 2 * u64::from(MAX_WINDOW)
    }
}

/// A receiver's side of a stream's flow control: checks that the peer stays
/// within what was granted, and decides when to grant more and how much —
/// the window doubles (up to [`MAX_WINDOW`]) while the reader drains it
/// faster than about two round trips, so one stream can fill a long, fat
/// link, and stays small on a stream whose reader is slow.
#[derive(Debug, Clone)]
pub struct RecvWindow {
    /// The current window size.
    size: u32,
    /// Bytes the peer may still send.
    remaining: u64,
    /// Bytes consumed (delivered to the reader) since the last grant.
    consumed: u32,
    /// When the last grant was sent, in microseconds of the caller's clock.
    granted_at: Option<u64>,
}

impl RecvWindow {
    /// A receive window of `size` granted to the peer at the start.
    pub fn new(size: u32) -> RecvWindow {
        RecvWindow {
            size,
            remaining: u64::from(size),
            consumed: 0,
            granted_at: None,
        }
    }

    /// The current window size.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// `n` bytes arrived. `false` when the peer sent past its window (the
    /// stream is reset).
    pub fn receive(&mut self, n: usize) -> bool {
        match self.remaining.checked_sub(n as u64) {
            Some(left) => {
                self.remaining = left;
                true
            }
            None => false,
        }
    }

    /// The reader took `n` bytes at `now_us` (a monotonic clock in
    /// microseconds); `rtt_us` is the link's round trip (0 when unknown).
    /// Returns the increment to grant, when one is due (half the window
    /// consumed).
    pub fn consume(&mut self, n: usize, now_us: u64, rtt_us: u64) -> Option<u32> {
        self.consumed = self
            .consumed
            .saturating_add(n.min(u32::MAX as usize) as u32);
        if self.consumed < self.size / 2 {
            return None;
        }
        // Half a window drained within two round trips: the window, not the
        // reader, limits the stream. Double it.
        if let Some(at) = self.granted_at
            && rtt_us > 0
            && now_us.saturating_sub(at) < 2 * rtt_us
            && self.size < MAX_WINDOW
        {
            let grown = (self.size * 2).min(MAX_WINDOW);
            self.consumed += grown - self.size;
            self.size = grown;
        }
        let inc = self.consumed;
        self.consumed = 0;
        self.remaining += u64::from(inc);
        self.granted_at = Some(now_us);
        Some(inc)
    }
}

#[cfg(test)]
mod tests;
