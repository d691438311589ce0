//! The PROXY protocol header parser (v1 and v2) on arbitrary bytes: split
//! invariant, a header within the input and within its version's bound, and
//! a header's addresses written back (either version) parse to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use splicegate_proto::proxy_protocol::{self, V1_MAX_LEN, V2_MAX_LEN, Version};

mod common;

fuzz_target!(|data: &[u8]| {
    let extra = match proxy_protocol::parse(data) {
        Ok(Some(h)) => [h.consumed, h.consumed.saturating_sub(1)],
        _ => [0, 0],
    };
    let Ok(Some(h)) = common::assert_split_invariant(data, &extra, proxy_protocol::parse) else {
        return;
    };
    assert!(h.consumed <= data.len());
    let bound = match h.version {
        Version::V1 => V1_MAX_LEN,
        Version::V2 => V2_MAX_LEN,
    };
    assert!(h.consumed <= bound);
    // What follows the header is the client's: the header parses alone.
    assert_eq!(proxy_protocol::parse(&data[..h.consumed]), Ok(Some(h)));

    let mut out = Vec::new();
    proxy_protocol::write_v1(h.addresses, &mut out);
    let back = proxy_protocol::parse(&out)
        .expect("a written v1 line parses")
        .expect("complete");
    assert_eq!((back.addresses, back.consumed), (h.addresses, out.len()));
    let mut out = Vec::new();
    proxy_protocol::write_v2(h.addresses, &[], &mut out).expect("no TLVs fit");
    let back = proxy_protocol::parse(&out)
        .expect("a written v2 header parses")
        .expect("complete");
    assert_eq!((back.addresses, back.consumed), (h.addresses, out.len()));
});
