//! Finding where a message body ends, without decoding it.

use super::BodyFraming;

/// Most hex digits in a chunk size (16 digits fit a `u64`, so no overflow).
pub const MAX_CHUNK_SIZE_DIGITS: u8 = 16;
/// Most bytes of chunk extensions on one chunk-size line.
pub const MAX_CHUNK_EXT_BYTES: usize = 1024;
/// Most bytes of trailer section (all trailer lines together).
pub const MAX_TRAILER_BYTES: usize = 8 * 1024;

/// Why a body's framing is invalid. After an error the message boundary is
/// unknown: the connection must close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// A chunk-size line does not start with a hex digit, or has a byte other
    /// than a hex digit, `;` or CR after the size.
    #[error("invalid chunk size")]
    InvalidChunkSize,
    /// More than [`MAX_CHUNK_SIZE_DIGITS`] hex digits.
    #[error("chunk size has too many digits")]
    ChunkSizeTooLong,
    /// Chunk extensions longer than [`MAX_CHUNK_EXT_BYTES`].
    #[error("chunk extension too long")]
    ChunkExtensionTooLong,
    /// A control byte inside a chunk extension or a trailer line.
    #[error("control byte in chunk extension or trailer")]
    ControlByte,
    /// CR not followed by LF, or LF without CR, in chunk framing.
    #[error("chunk framing requires CRLF")]
    BadLineEnding,
    /// Chunk data not followed by CRLF (data longer than its size).
    #[error("chunk data not followed by CRLF")]
    MissingChunkCrlf,
    /// Trailer section longer than [`MAX_TRAILER_BYTES`].
    #[error("trailer section too large")]
    TrailersTooLarge,
    /// A trailer line starting with whitespace (obs-fold).
    #[error("obs-fold in trailer section")]
    TrailerFold,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// Reading the hex size; `digits` so far.
    Size { value: u64, digits: u8 },
    /// Inside `;ext`, `len` bytes so far.
    Ext { value: u64, len: usize },
    /// Saw the CR ending the size line.
    SizeLf { value: u64 },
    /// Inside chunk data.
    Data { remaining: u64 },
    /// Expecting the CR after chunk data.
    DataCr,
    /// Expecting the LF after chunk data.
    DataLf,
    /// At the start of a trailer line or the final CRLF.
    TrailerStart,
    /// Inside a trailer line.
    Trailer,
    /// Saw the CR ending a trailer line.
    TrailerLf,
    /// Saw the CR of the final empty line.
    FinalLf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length { remaining: u64 },
    Chunked(Chunked),
    UntilClose,
    Done,
    Failed(BodyError),
}

/// A sans-IO scanner that finds where a message body ends.
///
/// It never decodes or copies: the gateway relays body bytes as they are and
/// feeds them here to learn how many belong to the current message. Results
/// do not depend on how the bytes are split across calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyTracker {
    state: State,
    /// Trailer bytes seen, bounded by [`MAX_TRAILER_BYTES`].
    trailer_bytes: usize,
}

impl BodyTracker {
    /// A tracker for a body with this framing.
    pub fn new(framing: BodyFraming) -> Self {
        let state = match framing {
            BodyFraming::None | BodyFraming::ContentLength(0) => State::Done,
            BodyFraming::ContentLength(n) => State::Length { remaining: n },
            BodyFraming::Chunked => State::Chunked(Chunked::Size {
                value: 0,
                digits: 0,
            }),
            BodyFraming::UntilClose => State::UntilClose,
        };
        BodyTracker {
            state,
            trailer_bytes: 0,
        }
    }

    /// Whether the whole body has been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether the body ends only when the peer closes; EOF then completes
    /// the message instead of truncating it.
    pub fn ends_at_close(&self) -> bool {
        self.state == State::UntilClose
    }

    /// Feeds the next bytes of the stream. Returns how many of them belong to
    /// this message (a prefix of `data`); the rest, if any, is the next
    /// message. Returns 0 once done. An error is sticky.
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, BodyError> {
        let mut used = 0;
        while used < data.len() {
            match self.state {
                State::Done => break,
                State::Failed(e) => return Err(e),
                State::UntilClose => return Ok(data.len()),
                State::Length { remaining } => {
                    let take = clamp(remaining, data.len() - used);
                    used += take;
                    let remaining = remaining - take as u64;
                    self.state = if remaining == 0 {
                        State::Done
                    } else {
                        State::Length { remaining }
                    };
                }
                State::Chunked(Chunked::Data { remaining }) => {
                    let take = clamp(remaining, data.len() - used);
                    used += take;
                    let remaining = remaining - take as u64;
                    self.state = State::Chunked(if remaining == 0 {
                        Chunked::DataCr
                    } else {
                        Chunked::Data { remaining }
                    });
                }
                State::Chunked(chunked) => {
                    let byte = data[used];
                    used += 1;
                    match self.step(chunked, byte) {
                        Ok(next) => self.state = next,
                        Err(e) => {
                            self.state = State::Failed(e);
                            return Err(e);
                        }
                    }
                }
            }
        }
        match self.state {
            State::Failed(e) => Err(e),
            _ => Ok(used),
        }
    }

    fn step(&mut self, state: Chunked, b: u8) -> Result<State, BodyError> {
        use Chunked::*;
        let next = match state {
            Size { value, digits } => match (hex_value(b), b) {
                (Some(d), _) => {
                    if digits >= MAX_CHUNK_SIZE_DIGITS {
                        return Err(BodyError::ChunkSizeTooLong);
                    }
                    Size {
                        value: (value << 4) | u64::from(d),
                        digits: digits + 1,
                    }
                }
                (None, b';') if digits > 0 => Ext { value, len: 0 },
                (None, b'\r') if digits > 0 => SizeLf { value },
                _ => return Err(BodyError::InvalidChunkSize),
            },
            Ext { value, len } => match b {
                b'\r' => SizeLf { value },
                0x00..=0x08 | 0x0a..=0x1f | 0x7f => return Err(ctl_error(b)),
                _ => ext_byte(value, len)?,
            },
            SizeLf { value } => match (b, value) {
                (b'\n', 0) => TrailerStart,
                (b'\n', remaining) => Data { remaining },
                _ => return Err(BodyError::BadLineEnding),
            },
            // `feed` consumes data in bulk; it never steps a `Data` state.
            Data { .. } => state,
            DataCr => match b {
                b'\r' => DataLf,
                _ => return Err(BodyError::MissingChunkCrlf),
            },
            DataLf => match b {
                b'\n' => Size {
                    value: 0,
                    digits: 0,
                },
                _ => return Err(BodyError::MissingChunkCrlf),
            },
            TrailerStart => match b {
                b'\r' => FinalLf,
                b' ' | b'\t' => return Err(BodyError::TrailerFold),
                _ => self.trailer_byte(b)?,
            },
            Trailer => match b {
                b'\r' => TrailerLf,
                _ => self.trailer_byte(b)?,
            },
            TrailerLf => match b {
                b'\n' => TrailerStart,
                _ => return Err(BodyError::BadLineEnding),
            },
            FinalLf => match b {
                b'\n' => return Ok(State::Done),
                _ => return Err(BodyError::BadLineEnding),
            },
        };
        Ok(State::Chunked(next))
    }

    fn trailer_byte(&mut self, b: u8) -> Result<Chunked, BodyError> {
        if matches!(b, 0x00..=0x08 | 0x0a..=0x1f | 0x7f) {
            return Err(ctl_error(b));
        }
        self.trailer_bytes += 1;
        if self.trailer_bytes > MAX_TRAILER_BYTES {
            return Err(BodyError::TrailersTooLarge);
        }
        Ok(Chunked::Trailer)
    }
}

fn ext_byte(value: u64, len: usize) -> Result<Chunked, BodyError> {
    if len >= MAX_CHUNK_EXT_BYTES {
        return Err(BodyError::ChunkExtensionTooLong);
    }
    Ok(Chunked::Ext {
        value,
        len: len + 1,
    })
}

fn ctl_error(b: u8) -> BodyError {
    if b == b'\n' {
        BodyError::BadLineEnding
    } else {
        BodyError::ControlByte
    }
}

fn clamp(remaining: u64, available: usize) -> usize {
    usize::try_from(remaining).map_or(available, |r| r.min(available))
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}
