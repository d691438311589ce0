//! The strict pre-scan of an HTTP head, done before `httparse` tokenises it.
//!
//! It reads the bytes once, front to back, and decides from the bytes seen so
//! far only, which is what makes every head parser split-invariant.

use super::{HttpError, Limits};

/// Blank lines tolerated before a request or status line (RFC 9112 §2.2).
const MAX_LEADING_EMPTY_LINES: usize = 4;

/// Which start line the head has: request-targets must be ASCII, reason
/// phrases may carry obs-text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Request,
    Response,
}

/// A complete head that passed the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scanned {
    /// Bytes from the start of the buffer through the blank line's LF.
    pub head_len: usize,
    /// Header lines counted (sizes httparse's header array exactly).
    pub header_count: usize,
    /// Where the start line begins (after tolerated blank lines).
    pub start_line: usize,
}

/// Scans `buf` for a complete head. `Ok(None)`: no complete head yet and no
/// limit crossed.
pub(crate) fn scan(buf: &[u8], limits: &Limits, kind: Kind) -> Result<Option<Scanned>, HttpError> {
    use HttpError::{HeadTooLarge, Malformed};

    let mut line_start = 0usize;
    let mut line_no = 0usize; // 0 = start line, then header lines
    let mut leading_empty = 0usize;
    let mut start_line = 0usize;
    let mut prev_cr = false;
    let mut in_name = false; // header line, before its colon

    for (i, &b) in buf.iter().enumerate() {
        if i >= limits.max_head_bytes {
            return Err(HeadTooLarge("head exceeds the size limit"));
        }
        if prev_cr {
            if b != b'\n' {
                return Err(Malformed("bare CR in head"));
            }
            prev_cr = false;
            let content_len = i - 1 - line_start;
            if content_len == 0 {
                if line_no == 0 {
                    leading_empty += 1;
                    if leading_empty > MAX_LEADING_EMPTY_LINES {
                        return Err(Malformed("too many empty lines before the start line"));
                    }
                    line_start = i + 1;
                    start_line = i + 1;
                    continue;
                }
                return Ok(Some(Scanned {
                    head_len: i + 1,
                    header_count: line_no - 1,
                    start_line,
                }));
            }
            if in_name {
                return Err(Malformed("header line without a colon"));
            }
            line_no += 1;
            if line_no - 1 > limits.max_headers {
                return Err(HeadTooLarge("too many header fields"));
            }
            line_start = i + 1;
            in_name = true;
            continue;
        }
        match b {
            b'\r' => {
                prev_cr = true;
                continue;
            }
            b'\n' => return Err(Malformed("bare LF line ending (CRLF required)")),
            0 => return Err(Malformed("NUL byte in head")),
            b'\t' => {}
            0x01..=0x1f | 0x7f => return Err(Malformed("control byte in head")),
            _ => {}
        }
        if line_no == 0 {
            if i - line_start + 1 > limits.max_line_bytes {
                return Err(HeadTooLarge("start line exceeds the line limit"));
            }
            if kind == Kind::Request && b >= 0x80 {
                return Err(Malformed("non-ASCII byte in request line"));
            }
            continue;
        }
        if i == line_start {
            match b {
                b' ' | b'\t' => {
                    return Err(Malformed(
                        "header line starts with whitespace (obs-fold is not accepted)",
                    ));
                }
                b':' => return Err(Malformed("empty header name")),
                _ => {}
            }
        }
        if in_name {
            match b {
                b':' => in_name = false,
                b' ' | b'\t' => {
                    return Err(Malformed("whitespace between header name and colon"));
                }
                _ => {}
            }
        }
    }
    Ok(None)
}

/// Classifies a version token httparse refused: `HTTP/d.d` is well-formed but
/// unsupported (505), anything else is malformed (400).
pub(crate) fn version_error(token: &[u8]) -> HttpError {
    match token {
        // A supported version in the last position: the line's shape is wrong
        // (extra spaces, a space inside the target), not the version.
        b"HTTP/1.0" | b"HTTP/1.1" => HttpError::Malformed("invalid request line"),
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            HttpError::UnsupportedVersion
        }
        _ => HttpError::Malformed("invalid HTTP version"),
    }
}
