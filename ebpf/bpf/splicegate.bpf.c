// SPDX-License-Identifier: Apache-2.0
/*
 * splicegate kernel enforcement: drop, before a socket exists,
 *   - packets from banned sources (until the ban expires),
 *   - packets to an ip_only port from sources not on its allowlist,
 *   - new connections (SYN without ACK) above a source's rate,
 * for TCP packets to the ports in sg_ports. Everything else -- other ports,
 * non-TCP, non-IP, IP fragments, and packets too short or malformed to parse --
 * passes untouched and uncounted.
 *
 * Two entry points share the policy: sg_xdp (XDP, native or generic) and
 * sg_tc (TC ingress, clsact/tcx). Maps and layouts: abi.h. Build: ../build.sh.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "abi.h"

/* No GPL-only helper is used; the kernel only needs the string. */
char LICENSE[] SEC("license") = "Apache-2.0";

/* ---- maps (names <= 15 characters; the loader looks them up by name) ---- */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SG_PORTS_MAX);
	__type(key, __u16);
	__type(value, __u32);
} sg_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SG_CONFIG_MAX);
	__type(key, __u32);
	__type(value, struct sg_config);
} sg_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SG_BUCKETS_MAX);
	__type(key, struct sg_src_key);
	__type(value, struct sg_bucket);
} sg_buckets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SG_ALLOW_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sg_allow_key);
	__type(value, __u32);
} sg_allow SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SG_BANS_MAX);
	__type(key, struct sg_src_key);
	__type(value, struct sg_ban);
} sg_bans SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SG_VERDICT_COUNT);
	__type(key, __u32);
	__type(value, struct sg_counter);
} sg_counters SEC(".maps");

/* ---- packet parsing ------------------------------------------------------ */

/* Wire constants, spelled out: the kernel headers needed stay linux/bpf.h and
 * linux/pkt_cls.h, which keeps the object's BTF small and stable. */
#define ETH_HLEN_ 14
#define ETH_P_IP_ 0x0800
#define ETH_P_IPV6_ 0x86DD
#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8
#define VLAN_HLEN_ 4
#define IPPROTO_TCP_ 6
#define IPV6_HLEN_ 40
#define NEXTHDR_HOP_ 0
#define NEXTHDR_ROUTING_ 43
#define NEXTHDR_FRAGMENT_ 44
#define NEXTHDR_AUTH_ 51
#define NEXTHDR_DEST_ 60
#define TCP_HLEN_MIN_ 20
#define TCP_FLAG_SYN_ 0x02
#define TCP_FLAG_ACK_ 0x10
#define IP_FRAG_MASK_ 0x3FFF /* MF flag and fragment offset */

/* VLAN tags skipped (802.1Q, 802.1ad; a NIC usually strips them already). */
#define SG_VLAN_MAX 2
/* IPv6 extension headers walked before giving up (and passing). */
#define SG_IPV6_EXT_MAX 6
/* Bytes the TC program asks to have linear before parsing. */
#define SG_TC_PULL_LEN 256

/* A result outside the verdicts: not ours to judge, pass uncounted. */
#define SG_NOT_OURS 0xFF

struct sg_pkt {
	__u8 family;      /* SG_FAMILY_IPV4 or SG_FAMILY_IPV6 */
	__u8 syn;         /* SYN set, ACK clear */
	__u16 dport;      /* host byte order */
	__u8 saddr[16];   /* IPv4 in the first 4 bytes */
};

static __always_inline __u16 sg_load_be16(const __u8 *p)
{
	return ((__u16)p[0] << 8) | p[1];
}

/* Parses Ethernet / [VLAN] / IPv4|IPv6 / TCP. Returns 1 and fills *pkt for a
 * complete, unfragmented TCP header; 0 for anything else. */
static __always_inline int sg_parse(void *data, void *data_end, struct sg_pkt *pkt)
{
	__u8 *p = data;
	__u8 *end = data_end;
	__u8 *l4;
	__u16 proto;

	if (p + ETH_HLEN_ > end)
		return 0;
	proto = sg_load_be16(p + 12);
	p += ETH_HLEN_;

#pragma unroll
	for (int i = 0; i < SG_VLAN_MAX; i++) {
		if (proto != ETH_P_8021Q_ && proto != ETH_P_8021AD_)
			break;
		if (p + VLAN_HLEN_ > end)
			return 0;
		proto = sg_load_be16(p + 2);
		p += VLAN_HLEN_;
	}

	if (proto == ETH_P_IP_) {
		__u32 ihl;

		if (p + 20 > end)
			return 0;
		if ((p[0] >> 4) != 4)
			return 0;
		ihl = (__u32)(p[0] & 0x0F) * 4;
		if (ihl < 20)
			return 0;
		if (sg_load_be16(p + 6) & IP_FRAG_MASK_)
			return 0;
		if (p[9] != IPPROTO_TCP_)
			return 0;
		pkt->family = SG_FAMILY_IPV4;
		__builtin_memcpy(pkt->saddr, p + 12, 4);
		l4 = p + ihl;
	} else if (proto == ETH_P_IPV6_) {
		__u8 next;
		__u32 off = IPV6_HLEN_;

		if (p + IPV6_HLEN_ > end)
			return 0;
		if ((p[0] >> 4) != 6)
			return 0;
		next = p[6];
		pkt->family = SG_FAMILY_IPV6;
		__builtin_memcpy(pkt->saddr, p + 8, 16);

#pragma unroll
		for (int i = 0; i < SG_IPV6_EXT_MAX; i++) {
			__u8 *ext;

			if (next == IPPROTO_TCP_)
				break;
			if (next != NEXTHDR_HOP_ && next != NEXTHDR_ROUTING_ &&
			    next != NEXTHDR_DEST_ && next != NEXTHDR_AUTH_)
				return 0; /* fragment, no next header, UDP, ICMPv6, ... */
			ext = p + off;
			if (ext + 2 > end)
				return 0;
			if (next == NEXTHDR_AUTH_)
				off += ((__u32)ext[1] + 2) * 4;
			else
				off += ((__u32)ext[1] + 1) * 8;
			next = ext[0];
			/* Keeps the offset bounded for the verifier; longer chains pass. */
			if (off > 1024)
				return 0;
		}
		if (next != IPPROTO_TCP_)
			return 0; /* more extension headers than SG_IPV6_EXT_MAX */
		l4 = p + off;
	} else {
		return 0;
	}

	if (l4 + TCP_HLEN_MIN_ > end)
		return 0;
	pkt->dport = sg_load_be16(l4 + 2);
	pkt->syn = (l4[13] & (TCP_FLAG_SYN_ | TCP_FLAG_ACK_)) == TCP_FLAG_SYN_;
	return 1;
}

/* ---- policy -------------------------------------------------------------- */

static __always_inline void sg_source_key(const struct sg_pkt *pkt, struct sg_src_key *key)
{
	__builtin_memset(key, 0, sizeof(*key));
	if (pkt->family == SG_FAMILY_IPV4) {
		key->addr[10] = 0xFF;
		key->addr[11] = 0xFF;
		__builtin_memcpy(&key->addr[12], pkt->saddr, 4);
	} else {
		__builtin_memcpy(key->addr, pkt->saddr, SG_IPV6_SOURCE_PREFIX / 8);
	}
}

static __always_inline int sg_allowed(const struct sg_pkt *pkt)
{
	struct sg_allow_key key;

	__builtin_memset(&key, 0, sizeof(key));
	key.port = pkt->dport;
	key.family = pkt->family;
	if (pkt->family == SG_FAMILY_IPV4) {
		key.prefixlen = SG_ALLOW_KEY_FIXED_BITS + 32;
		__builtin_memcpy(key.addr, pkt->saddr, 4);
	} else {
		key.prefixlen = SG_ALLOW_KEY_FIXED_BITS + 128;
		__builtin_memcpy(key.addr, pkt->saddr, 16);
	}
	return bpf_map_lookup_elem(&sg_allow, &key) != 0;
}

/* Token bucket as GCRA: admit while the bucket's time is at most
 * syn_tolerance_ns ahead of now, and push it one syn_interval_ns further.
 * Two CPUs updating one bucket at once may both admit: the limit is
 * approximate by at most one SYN per concurrent CPU. */
static __always_inline int sg_syn_admit(const struct sg_src_key *src, __u64 now)
{
	__u32 zero = 0;
	struct sg_config *cfg = bpf_map_lookup_elem(&sg_config, &zero);
	struct sg_bucket *bucket;
	__u64 interval, tat;

	if (!cfg)
		return 1;
	interval = cfg->syn_interval_ns;
	if (interval == 0)
		return 1;

	bucket = bpf_map_lookup_elem(&sg_buckets, src);
	if (!bucket) {
		struct sg_bucket fresh = { .tat_ns = now + interval };

		bpf_map_update_elem(&sg_buckets, src, &fresh, BPF_NOEXIST);
		return 1;
	}
	tat = bucket->tat_ns;
	if (tat < now)
		tat = now;
	if (tat - now > cfg->syn_tolerance_ns)
		return 0;
	bucket->tat_ns = tat + interval;
	return 1;
}

static __always_inline __u32 sg_decide(const struct sg_pkt *pkt)
{
	__u16 port = pkt->dport;
	__u32 *flags = bpf_map_lookup_elem(&sg_ports, &port);
	struct sg_src_key src;
	struct sg_ban *ban;
	__u64 now;

	if (!flags)
		return SG_NOT_OURS;

	now = bpf_ktime_get_ns();
	sg_source_key(pkt, &src);

	ban = bpf_map_lookup_elem(&sg_bans, &src);
	if (ban && now < ban->expires_ns)
		return SG_VERDICT_DROP_BANNED;

	if ((*flags & SG_PORT_IP_ONLY) && !sg_allowed(pkt))
		return SG_VERDICT_DROP_NOT_ALLOWED;

	if ((*flags & SG_PORT_SYN_LIMIT) && pkt->syn && !sg_syn_admit(&src, now))
		return SG_VERDICT_DROP_RATE;

	return SG_VERDICT_PASS;
}

static __always_inline void sg_count(__u32 verdict, __u64 bytes)
{
	struct sg_counter *c = bpf_map_lookup_elem(&sg_counters, &verdict);

	if (c) {
		c->packets += 1;
		c->bytes += bytes;
	}
}

/* Parses, decides and counts: a verdict, or SG_NOT_OURS. */
static __always_inline __u32 sg_classify(void *data, void *data_end, __u64 len)
{
	struct sg_pkt pkt;
	__u32 verdict;

	__builtin_memset(&pkt, 0, sizeof(pkt));
	if (!sg_parse(data, data_end, &pkt))
		return SG_NOT_OURS;
	verdict = sg_decide(&pkt);
	if (verdict != SG_NOT_OURS)
		sg_count(verdict, len);
	return verdict;
}

/* ---- entry points -------------------------------------------------------- */

SEC("xdp")
int sg_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 verdict = sg_classify(data, data_end, bpf_xdp_get_buff_len(ctx));

	if (verdict == SG_NOT_OURS || verdict == SG_VERDICT_PASS)
		return XDP_PASS;
	return XDP_DROP;
}

SEC("classifier")
int sg_tc(struct __sk_buff *skb)
{
	__u32 want = skb->len < SG_TC_PULL_LEN ? skb->len : SG_TC_PULL_LEN;
	__u32 verdict;

	/* Headers may sit in paged data: ask for the first bytes to be linear. */
	if ((void *)(long)skb->data + want > (void *)(long)skb->data_end)
		bpf_skb_pull_data(skb, want);

	verdict = sg_classify((void *)(long)skb->data, (void *)(long)skb->data_end, skb->len);
	/* TC_ACT_UNSPEC: no opinion, later filters and the stack carry on. */
	if (verdict == SG_NOT_OURS || verdict == SG_VERDICT_PASS)
		return TC_ACT_UNSPEC;
	return TC_ACT_SHOT;
}
