//! The agent link's frame codec on arbitrary bytes, read as a stream of
//! frames the way a driver reads them: each decode is split invariant,
//! takes at least a header and never more than the input, and every frame
//! decoded encodes back to exactly the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use splicegate_proto::agent::{HEADER, decode};

mod common;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while !rest.is_empty() {
        let extra = match decode(rest) {
            Ok(Some((_, n))) => [n, n - 1],
            _ => [0, 0],
        };
        let shown = |p: &[u8]| decode(p).map(|o| o.map(|(f, n)| (format!("{f:?}"), n)));
        let _ = common::assert_split_invariant(rest, &extra, shown);
        match decode(rest) {
            Ok(Some((frame, n))) => {
                assert!(n >= HEADER && n <= rest.len());
                let mut again = Vec::new();
                frame.encode(&mut again);
                assert_eq!(again, &rest[..n], "{frame:?} encodes back to its bytes");
                rest = &rest[n..];
            }
            Ok(None) | Err(_) => break,
        }
    }
});
