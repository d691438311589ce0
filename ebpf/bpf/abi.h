/* SPDX-License-Identifier: Apache-2.0 */
/*
 * splicegate kernel enforcement: the ABI between the BPF programs
 * (splicegate.bpf.c) and their loader (the splicegate-ebpf crate).
 *
 * This header is the single source of truth. The Rust types in
 * ebpf/src/abi.rs are checked against it by a test that parses this file
 * (`cargo test -p splicegate-ebpf abi`), so keep to the forms that parser
 * reads:
 *   - `#define SG_NAME <integer>` on one line (an optional trailing comment);
 *   - `struct sg_name { <type> <field>; <type> <field>[<N>]; ... };` with
 *     types __u8, __u16, __u32, __u64 and `struct sg_*` defined above;
 *   - comments in C89 style.
 * Change a layout here, then rebuild the object (ebpf/build.sh) and the Rust
 * side (ebpf/src/abi.rs): the test fails until the three agree.
 *
 * Integers are in host byte order unless a field says otherwise. Addresses
 * are in network byte order, as on the wire.
 */
#ifndef SPLICEGATE_ABI_H
#define SPLICEGATE_ABI_H

#include <linux/types.h>

/* Bumped whenever a map's key or value layout changes meaning. */
#define SG_ABI_VERSION 1

/* ---- verdicts: what the programs decide, and the index into sg_counters -- */
#define SG_VERDICT_PASS 0             /* policy evaluated, packet let through */
#define SG_VERDICT_DROP_RATE 1        /* SYN above the source's syn_rate/syn_burst */
#define SG_VERDICT_DROP_NOT_ALLOWED 2 /* ip_only port, source not on its allowlist */
#define SG_VERDICT_DROP_BANNED 3      /* source banned, ban not yet expired */
#define SG_VERDICT_COUNT 4

/* ---- sg_ports: __u16 port -> __u32 flags ----------------------------------
 * Only TCP packets whose destination port is in this map are evaluated (and
 * counted); everything else passes untouched and uncounted. */
#define SG_PORT_SYN_LIMIT 1 /* rate-limit new connections (SYN without ACK) */
#define SG_PORT_IP_ONLY 2   /* drop sources not on the port's allowlist (sg_allow) */

/* ---- address families as stored in sg_allow_key.family ------------------ */
#define SG_FAMILY_IPV4 4
#define SG_FAMILY_IPV6 6

/* The rate limiter and the ban list treat an IPv6 source as its /64: one
 * subscriber (a home, a phone, a VM) is handed a whole /64. */
#define SG_IPV6_SOURCE_PREFIX 64

/* ---- map sizes (max_entries) ---------------------------------------------- */
#define SG_PORTS_MAX 1024
#define SG_CONFIG_MAX 1
#define SG_BUCKETS_MAX 65536
#define SG_ALLOW_MAX 16384
#define SG_BANS_MAX 65536

/* LPM prefix length of sg_allow_key covering port, family and reserved: an
 * entry's prefixlen is SG_ALLOW_KEY_FIXED_BITS + its address prefix length. */
#define SG_ALLOW_KEY_FIXED_BITS 32

/* ---- sg_config: array, one entry at index 0 -------------------------------
 * The SYN limiter is a token bucket kept as its "theoretical arrival time"
 * (GCRA): one token costs syn_interval_ns (1e9 / syn_rate) and a bucket holds
 * syn_burst tokens, i.e. admits a SYN while the bucket's time is no more than
 * syn_tolerance_ns ((syn_burst - 1) * syn_interval_ns) ahead of now.
 * syn_interval_ns == 0 disables the limiter. */
struct sg_config {
	__u64 syn_interval_ns;
	__u64 syn_tolerance_ns;
};

/* ---- source key of sg_buckets and sg_bans ---------------------------------
 * IPv4: the IPv4-mapped IPv6 address ::ffff:a.b.c.d.
 * IPv6: the source's /64 prefix, the low 64 bits zero.
 * (The two never collide: a mapped address has non-zero low 64 bits.) */
struct sg_src_key {
	__u8 addr[16];
};

/* ---- sg_buckets value (LRU hash) ----------------------------------------- */
struct sg_bucket {
	__u64 tat_ns; /* bpf_ktime_get_ns() time at which the bucket is full again */
};

/* ---- sg_bans value (LRU hash, key sg_src_key) -----------------------------
 * A ban holds while bpf_ktime_get_ns() (CLOCK_MONOTONIC) < expires_ns. */
struct sg_ban {
	__u64 expires_ns;
};

/* ---- sg_allow: LPM trie, per-port allowlists for IPv4 and IPv6 ------------
 * prefixlen counts the bits after itself: SG_ALLOW_KEY_FIXED_BITS (port,
 * family, reserved, always matched whole) plus the address prefix length.
 * addr: IPv4 in its first 4 bytes, the rest zero. The value is unused (1). */
struct sg_allow_key {
	__u32 prefixlen;
	__u16 port;
	__u8 family;
	__u8 reserved;
	__u8 addr[16];
};

/* ---- sg_counters: per-CPU array indexed by verdict ------------------------ */
struct sg_counter {
	__u64 packets;
	__u64 bytes; /* frame length as the program sees it (from the L2 header) */
};

#endif /* SPLICEGATE_ABI_H */
