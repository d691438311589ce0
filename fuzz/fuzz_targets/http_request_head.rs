//! `http::parse_request` with the default limits on arbitrary bytes: the split
//! invariant holds, and a parsed head is forwarded without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use splicegate_proto::http::{Limits, parse_request, write_forward_head};

mod common;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let parse = |b: &[u8]| parse_request(b, &limits);
    let extra = match parse(data) {
        Ok(Some(req)) => [req.head_len, req.head_len.saturating_sub(1)],
        _ => [0, 0],
    };
    if let Ok(Some(req)) = common::assert_split_invariant(data, &extra, parse) {
        assert!(req.head_len <= data.len());
        let mut out = Vec::new();
        write_forward_head(&req, &mut out);
        assert!(
            out.ends_with(b"\r\n\r\n"),
            "forwarded head is not terminated"
        );
    }
});
