//! `http::BodyTracker` on a chunked body: fed in two parts split at a byte
//! chosen by the input, or byte by byte, it ends (or fails) exactly where it
//! does fed the whole body at once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use splicegate_proto::http::{BodyError, BodyFraming, BodyTracker};

/// Feeds `parts` in order as a relay would: once the tracker reports fewer
/// bytes than given (the message ended) or an error, nothing more is fed.
fn feed(parts: &[&[u8]]) -> (Result<usize, BodyError>, BodyTracker) {
    let mut t = BodyTracker::new(BodyFraming::Chunked);
    let mut used = 0;
    for part in parts {
        match t.feed(part) {
            Ok(n) => {
                used += n;
                if n < part.len() {
                    break;
                }
            }
            Err(e) => return (Err(e), t),
        }
    }
    (Ok(used), t)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let at = usize::from(selector) * body.len() / 255;
    let whole = feed(&[body]);
    let (a, b) = body.split_at(at);
    assert_eq!(feed(&[a, b]), whole, "split at {at} of {}", body.len());
    if body.len() <= 4096 {
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(feed(&bytes), whole, "fed byte by byte");
    }
    // Once done, a tracker takes no more bytes.
    let (_, mut t) = whole;
    if t.is_done() {
        assert_eq!(t.feed(b"0\r\n\r\n"), Ok(0));
    }
});
