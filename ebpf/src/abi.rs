//! The map keys, values, sizes and codes shared with the BPF programs.
//!
//! `bpf/abi.h` is the source of truth; this module mirrors it and
//! `tests::abi` checks, at test time, every constant's value and every
//! struct's size and field offsets against a parse of the header and against
//! the maps declared in the committed object. The `unsafe impl Pod` blocks
//! below are the crate's only `unsafe`.
#![allow(unsafe_code)]
// Mirrors all of abi.h; some items only the tests use.
#![cfg_attr(not(test), allow(dead_code))]

/// `SG_ABI_VERSION`.
pub(crate) const ABI_VERSION: u32 = 1;

/// `SG_VERDICT_PASS`.
pub(crate) const VERDICT_PASS: u32 = 0;
/// `SG_VERDICT_DROP_RATE`.
pub(crate) const VERDICT_DROP_RATE: u32 = 1;
/// `SG_VERDICT_DROP_NOT_ALLOWED`.
pub(crate) const VERDICT_DROP_NOT_ALLOWED: u32 = 2;
/// `SG_VERDICT_DROP_BANNED`.
pub(crate) const VERDICT_DROP_BANNED: u32 = 3;
/// `SG_VERDICT_COUNT`.
pub(crate) const VERDICT_COUNT: u32 = 4;

/// `SG_PORT_SYN_LIMIT`.
pub(crate) const PORT_SYN_LIMIT: u32 = 1;
/// `SG_PORT_IP_ONLY`.
pub(crate) const PORT_IP_ONLY: u32 = 2;

/// `SG_FAMILY_IPV4`.
pub(crate) const FAMILY_IPV4: u8 = 4;
/// `SG_FAMILY_IPV6`.
pub(crate) const FAMILY_IPV6: u8 = 6;

/// `SG_IPV6_SOURCE_PREFIX`.
pub(crate) const IPV6_SOURCE_PREFIX: u8 = 64;

/// `SG_PORTS_MAX`.
pub(crate) const PORTS_MAX: u32 = 1024;
/// `SG_CONFIG_MAX`.
pub(crate) const CONFIG_MAX: u32 = 1;
/// `SG_BUCKETS_MAX`.
pub(crate) const BUCKETS_MAX: u32 = 65536;
/// `SG_ALLOW_MAX`.
pub(crate) const ALLOW_MAX: u32 = 16384;
/// `SG_BANS_MAX`.
pub(crate) const BANS_MAX: u32 = 65536;

/// `SG_ALLOW_KEY_FIXED_BITS`.
pub(crate) const ALLOW_KEY_FIXED_BITS: u32 = 32;

/// Map names in the object (`SEC(".maps")` variables).
pub(crate) const MAP_PORTS: &str = "sg_ports";
pub(crate) const MAP_CONFIG: &str = "sg_config";
pub(crate) const MAP_BUCKETS: &str = "sg_buckets";
pub(crate) const MAP_ALLOW: &str = "sg_allow";
pub(crate) const MAP_BANS: &str = "sg_bans";
pub(crate) const MAP_COUNTERS: &str = "sg_counters";

/// Program names in the object.
pub(crate) const PROG_XDP: &str = "sg_xdp";
pub(crate) const PROG_TC: &str = "sg_tc";

/// `struct sg_config`, the single entry of `sg_config`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SgConfig {
    pub(crate) syn_interval_ns: u64,
    pub(crate) syn_tolerance_ns: u64,
}

/// `struct sg_src_key`, the key of `sg_buckets` and `sg_bans`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub(crate) struct SgSrcKey {
    pub(crate) addr: [u8; 16],
}

/// `struct sg_bucket`, the value of `sg_buckets`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SgBucket {
    pub(crate) tat_ns: u64,
}

/// `struct sg_ban`, the value of `sg_bans`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SgBan {
    pub(crate) expires_ns: u64,
}

/// `struct sg_allow_key` without its leading `prefixlen`, which aya's
/// `lpm_trie::Key` adds (`repr(C, packed)`: `u32` prefix length, then this).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub(crate) struct SgAllowData {
    pub(crate) port: u16,
    pub(crate) family: u8,
    pub(crate) reserved: u8,
    pub(crate) addr: [u8; 16],
}

/// `struct sg_counter`, the per-CPU value of `sg_counters`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SgCounter {
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
}

// SAFETY: repr(C), only u64 fields, no padding (16 bytes); every bit pattern is valid.
unsafe impl aya::Pod for SgConfig {}
// SAFETY: repr(C), a single [u8; 16], no padding; every bit pattern is valid.
unsafe impl aya::Pod for SgSrcKey {}
// SAFETY: repr(C), a single u64, no padding; every bit pattern is valid.
unsafe impl aya::Pod for SgBucket {}
// SAFETY: repr(C), a single u64, no padding; every bit pattern is valid.
unsafe impl aya::Pod for SgBan {}
// SAFETY: repr(C), u16 + u8 + u8 + [u8; 16] = 20 bytes, no padding; every bit pattern is valid.
unsafe impl aya::Pod for SgAllowData {}
// SAFETY: repr(C), two u64 fields, no padding (16 bytes); every bit pattern is valid.
unsafe impl aya::Pod for SgCounter {}
