//! Packet fixtures: Ethernet frames for `BPF_PROG_TEST_RUN`, IP packets for
//! raw sockets, with correct checksums.

use std::net::IpAddr;

pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86DD;
pub(crate) const ETH_P_ARP: u16 = 0x0806;
pub(crate) const ETH_P_8021Q: u16 = 0x8100;

pub(crate) const SYN: u8 = 0x02;
pub(crate) const ACK: u8 = 0x10;
pub(crate) const RST: u8 = 0x04;

pub(crate) const PROTO_TCP: u8 = 6;
pub(crate) const PROTO_UDP: u8 = 17;
pub(crate) const PROTO_ICMP: u8 = 1;

/// Ones' complement sum over 16-bit words, folded.
fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP segment (header only, or with `payload`), checksummed for src/dst.
pub(crate) fn tcp_segment(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut seg = Vec::with_capacity(20 + payload.len());
    seg.extend_from_slice(&sport.to_be_bytes());
    seg.extend_from_slice(&dport.to_be_bytes());
    seg.extend_from_slice(&(u32::from(sport) * 7919).to_be_bytes()); // seq
    seg.extend_from_slice(&0u32.to_be_bytes()); // ack
    seg.push(5 << 4); // data offset
    seg.push(flags);
    seg.extend_from_slice(&64240u16.to_be_bytes()); // window
    seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
    seg.extend_from_slice(payload);
    let len = u32::try_from(seg.len()).unwrap();
    let mut sum = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => csum_add(csum_add(0, &s.octets()), &d.octets()),
        (IpAddr::V6(s), IpAddr::V6(d)) => csum_add(csum_add(0, &s.octets()), &d.octets()),
        _ => panic!("mixed address families"),
    };
    sum += u32::from(PROTO_TCP) + len;
    sum = csum_add(sum, &seg);
    let c = csum_fold(sum);
    seg[16..18].copy_from_slice(&c.to_be_bytes());
    seg
}

/// An IPv4 header (no options unless `ihl_words` > 5) around `payload`.
pub(crate) fn ipv4(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    frag: u16,
    ihl_words: u8,
    payload: &[u8],
) -> Vec<u8> {
    let hlen = usize::from(ihl_words.max(5)) * 4;
    let mut p = vec![0u8; hlen];
    p[0] = 0x40 | (ihl_words & 0x0F);
    let total = u16::try_from(hlen + payload.len()).unwrap();
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    p[6..8].copy_from_slice(&frag.to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    let c = csum_fold(csum_add(0, &p));
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// An IPv6 header with `next` as next header around `payload`.
pub(crate) fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
    p[6] = next;
    p[7] = 64;
    p[8..24].copy_from_slice(&src);
    p[24..40].copy_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

/// An Ethernet frame.
pub(crate) fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IP packet carrying a TCP segment (no Ethernet), for raw sockets.
pub(crate) fn ip_tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let seg = tcp_segment(src, dst, sport, dport, flags, &[]);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s.octets(), d.octets(), PROTO_TCP, 0, 5, &seg),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s.octets(), d.octets(), PROTO_TCP, &seg),
        _ => panic!("mixed address families"),
    }
}

/// An Ethernet frame carrying IPv4 or IPv6 and a TCP segment.
pub(crate) fn tcp_frame(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let ethertype = if src.is_ipv4() { ETH_P_IP } else { ETH_P_IPV6 };
    eth(ethertype, &ip_tcp(src, dst, sport, dport, flags))
}

/// An IPv6 frame whose TCP segment follows the given extension headers
/// (each `(type, length in 8-octet units beyond the first)`).
pub(crate) fn ipv6_ext_tcp_frame(
    src: IpAddr,
    dst: IpAddr,
    dport: u16,
    exts: &[(u8, u8)],
) -> Vec<u8> {
    let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) else {
        panic!("IPv6 only")
    };
    let seg = tcp_segment(src, dst, 40000, dport, SYN, &[]);
    let mut chain = Vec::new();
    for (i, &(_, len)) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(PROTO_TCP, |e| e.0);
        let mut h = vec![0u8; (usize::from(len) + 1) * 8];
        h[0] = next;
        h[1] = len;
        chain.extend_from_slice(&h);
    }
    chain.extend_from_slice(&seg);
    eth(
        ETH_P_IPV6,
        &ipv6(
            s.octets(),
            d.octets(),
            exts.first().map_or(PROTO_TCP, |e| e.0),
            &chain,
        ),
    )
}

/// An IPv6 frame with a fragment header (first fragment) before TCP.
pub(crate) fn ipv6_fragment_tcp_frame(src: IpAddr, dst: IpAddr, dport: u16) -> Vec<u8> {
    let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) else {
        panic!("IPv6 only")
    };
    let seg = tcp_segment(src, dst, 40000, dport, SYN, &[]);
    let mut payload = vec![PROTO_TCP, 0, 0, 1, 0, 0, 0, 42]; // offset 0, M=1, id 42
    payload.extend_from_slice(&seg);
    eth(ETH_P_IPV6, &ipv6(s.octets(), d.octets(), 44, &payload))
}

/// A VLAN-tagged (802.1Q) IPv4 TCP frame.
pub(crate) fn vlan_tcp_frame(src: IpAddr, dst: IpAddr, dport: u16, flags: u8) -> Vec<u8> {
    let inner = ip_tcp(src, dst, 40000, dport, flags);
    let mut tagged = vec![0x00, 0x64]; // VID 100
    tagged.extend_from_slice(&ETH_P_IP.to_be_bytes());
    tagged.extend_from_slice(&inner);
    eth(ETH_P_8021Q, &tagged)
}

/// A minimal ARP request frame.
pub(crate) fn arp_frame() -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    a.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 10, 0, 0, 2]);
    a.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, 1]);
    eth(ETH_P_ARP, &a)
}
