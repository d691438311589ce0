//! `BPF_PROG_TEST_RUN` of both programs on packet fixtures: each verdict, for
//! IPv4 and IPv6, and what must pass untouched and uncounted.

use std::{net::IpAddr, thread, time::Duration};

use aya::{TestRun as _, TestRunOptions};

use super::{load_or_skip, packets as pk};
use crate::{Counter, Enforcer, Verdict, VerdictCounters, monotonic_ns};

const PROXY: u16 = 5000;
const IP_ONLY: u16 = 10007;
const OTHER: u16 = 7777;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prog {
    Xdp,
    Tc,
}

const PROGS: [Prog; 2] = [Prog::Xdp, Prog::Tc];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    Pass,
    Drop,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn v4_server() -> IpAddr {
    ip("192.0.2.1")
}

fn v6_server() -> IpAddr {
    ip("2001:db8:ffff::1")
}

fn server_for(src: IpAddr) -> IpAddr {
    if src.is_ipv4() {
        v4_server()
    } else {
        v6_server()
    }
}

/// Runs `frame` through the program; checks a passed frame is unchanged.
fn run(e: &mut Enforcer, prog: Prog, frame: &[u8]) -> Out {
    let mut out = vec![0u8; frame.len() + 256];
    let (ret, size) = match prog {
        Prog::Xdp => {
            let p = e.xdp_program().unwrap();
            let r = p
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ..TestRunOptions::default()
                })
                .expect("BPF_PROG_TEST_RUN (xdp)");
            (r.return_value, r.data_size_out)
        }
        Prog::Tc => {
            let p = e.tc_program().unwrap();
            let r = p
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ..TestRunOptions::default()
                })
                .expect("BPF_PROG_TEST_RUN (tc)");
            (r.return_value, r.data_size_out)
        }
    };
    let verdict = match (prog, ret) {
        (Prog::Xdp, 2) | (Prog::Tc, u32::MAX) => Out::Pass, // XDP_PASS, TC_ACT_UNSPEC
        (Prog::Xdp, 1) | (Prog::Tc, 2) => Out::Drop,        // XDP_DROP, TC_ACT_SHOT
        other => panic!("unexpected return {other:?}"),
    };
    if verdict == Out::Pass {
        assert_eq!(size as usize, frame.len(), "{prog:?}: size out");
        assert_eq!(
            &out[..frame.len()],
            frame,
            "{prog:?}: a passed frame must be untouched"
        );
    }
    verdict
}

fn syn(src: &str, dport: u16) -> Vec<u8> {
    with_flags(src, dport, pk::SYN)
}

fn with_flags(src: &str, dport: u16, flags: u8) -> Vec<u8> {
    let s = ip(src);
    pk::tcp_frame(s, server_for(s), 40000, dport, flags)
}

/// One packet: from `src` to port `dport` with TCP `flags`, and the verdict
/// it must get; `what` names it in a failure.
type Row<'a> = (&'a str, u16, u8, Out, &'a str);

/// Run every row through `prog`, each against its verdict.
fn check(e: &mut Enforcer, prog: Prog, rows: &[Row<'_>]) {
    for &(src, dport, flags, want, what) in rows {
        assert_eq!(
            run(e, prog, &with_flags(src, dport, flags)),
            want,
            "{prog:?} {what}: {src} -> :{dport} flags {flags:#x}"
        );
    }
}

/// `rows`, `n` times over.
fn repeat<'a>(n: usize, rows: &[Row<'a>]) -> Vec<Row<'a>> {
    rows.iter().cycle().take(n * rows.len()).copied().collect()
}

/// Run `body` for each program on a fresh detached enforcer (proxy port
/// [`PROXY`], SYN rate and burst as given); skips when BPF cannot load.
fn each_prog(test: &str, syn_rate: u32, syn_burst: u32, mut body: impl FnMut(&mut Enforcer, Prog)) {
    for prog in PROGS {
        let Some(mut e) = load_or_skip(test, &[PROXY], syn_rate, syn_burst) else {
            return;
        };
        body(&mut e, prog);
    }
}

fn delta(before: VerdictCounters, after: VerdictCounters, v: Verdict) -> Counter {
    let (b, a) = (before.get(v), after.get(v));
    Counter {
        packets: a.packets - b.packets,
        bytes: a.bytes - b.bytes,
    }
}

/// Packets counted under each verdict between two readings, in the order
/// Pass, DropRate, DropNotAllowed, DropBanned.
fn packets(before: VerdictCounters, after: VerdictCounters) -> [u64; 4] {
    [
        Verdict::Pass,
        Verdict::DropRate,
        Verdict::DropNotAllowed,
        Verdict::DropBanned,
    ]
    .map(|v| delta(before, after, v).packets)
}

const P: Out = Out::Pass;
const D: Out = Out::Drop;

#[test]
fn test_run_pass_counts_packets_and_bytes() {
    each_prog("test_run_pass_counts_packets_and_bytes", 0, 0, |e, prog| {
        let before = e.counters().unwrap();
        let frames = [
            syn("198.51.100.10", PROXY),
            syn("2001:db8:10::1", PROXY),
            with_flags("2001:db8:10::1", PROXY, pk::ACK),
        ];
        for f in &frames {
            assert_eq!(run(e, prog, f), Out::Pass, "{prog:?}");
        }
        let after = e.counters().unwrap();
        assert_eq!(packets(before, after), [3, 0, 0, 0], "{prog:?}");
        let bytes: usize = frames.iter().map(Vec::len).sum();
        assert_eq!(
            delta(before, after, Verdict::Pass).bytes,
            bytes as u64,
            "{prog:?}"
        );
        for v in [
            Verdict::DropRate,
            Verdict::DropNotAllowed,
            Verdict::DropBanned,
        ] {
            assert_eq!(
                delta(before, after, v),
                Counter::default(),
                "{prog:?} {v:?}"
            );
        }
    });
}

#[test]
fn test_run_syn_rate_per_source_ipv4_and_ipv6_64() {
    // 1 SYN/s, burst 3: the 4th SYN in a row is dropped.
    each_prog(
        "test_run_syn_rate_per_source_ipv4_and_ipv6_64",
        1,
        3,
        |e, prog| {
            let before = e.counters().unwrap();
            let src = "198.51.100.20";
            let mut rows = repeat(3, &[(src, PROXY, pk::SYN, P, "SYN within the burst")]);
            rows.extend_from_slice(&[
                (src, PROXY, pk::SYN, D, "4th SYN"),
                // Not SYNs: the handshake's ACK, data, SYN-ACK, RST are never limited.
                (src, PROXY, pk::ACK, P, "ACK"),
                (src, PROXY, pk::SYN | pk::ACK, P, "SYN-ACK"),
                (src, PROXY, pk::RST, P, "RST"),
                // Another source has its own bucket; another port is not limited.
                ("198.51.100.21", PROXY, pk::SYN, P, "another source"),
                (src, OTHER, pk::SYN, P, "another port"),
                // IPv6: one bucket per /64.
                ("2001:db8:5:6::1", PROXY, pk::SYN, P, "v6 SYN 0"),
                ("2001:db8:5:6::2", PROXY, pk::SYN, P, "v6 SYN 1"),
                ("2001:db8:5:6::3", PROXY, pk::SYN, P, "v6 SYN 2"),
                ("2001:db8:5:6:ffff::9", PROXY, pk::SYN, D, "same /64"),
                ("2001:db8:5:7::1", PROXY, pk::SYN, P, "other /64"),
            ]);
            check(e, prog, &rows);
            // 3 + 3 non-SYN + 1 + 3 + 1 passes; the OTHER port is not counted.
            assert_eq!(
                packets(before, e.counters().unwrap()),
                [11, 2, 0, 0],
                "{prog:?}"
            );

            // The bucket refills: one token per second.
            thread::sleep(Duration::from_millis(1100));
            check(
                e,
                prog,
                &[
                    (src, PROXY, pk::SYN, P, "refilled"),
                    (src, PROXY, pk::SYN, D, "one token only"),
                ],
            );
            // A new limit applies at once; rate 0 turns the limiter off.
            e.set_syn_limit(0, 0).unwrap();
            check(
                e,
                prog,
                &repeat(5, &[(src, PROXY, pk::SYN, P, "limiter off")]),
            );
            // Removing the port from the proxy ports stops judging it.
            e.set_syn_limit(1, 1).unwrap();
            e.set_proxy_ports(&[]).unwrap();
            let before = e.counters().unwrap();
            check(
                e,
                prog,
                &repeat(3, &[("198.51.100.30", PROXY, pk::SYN, P, "unconfigured")]),
            );
            assert_eq!(
                e.counters().unwrap(),
                before,
                "{prog:?}: an unconfigured port is not counted"
            );
        },
    );
}

#[test]
fn test_run_ip_only_allowlists_per_port() {
    each_prog("test_run_ip_only_allowlists_per_port", 0, 0, |e, prog| {
        let allow = [
            "10.1.0.0/16".parse().unwrap(),
            "2001:db8:1::/48".parse().unwrap(),
        ];
        e.set_ip_only(IP_ONLY, &allow).unwrap();
        // Another ip_only port with its own list: lists do not leak across ports.
        e.set_ip_only(IP_ONLY + 1, &["10.2.0.0/16".parse().unwrap()])
            .unwrap();
        let before = e.counters().unwrap();
        check(
            e,
            prog,
            &[
                ("10.1.2.3", IP_ONLY, pk::SYN, P, "listed"),
                ("10.1.2.3", IP_ONLY, pk::ACK, P, "listed ACK"),
                ("2001:db8:1:2::3", IP_ONLY, pk::SYN, P, "listed v6"),
                // Strangers: every packet, not only SYNs.
                ("10.2.0.1", IP_ONLY, pk::SYN, D, "stranger"),
                ("10.2.0.1", IP_ONLY, pk::ACK, D, "stranger ACK"),
                ("2001:db8:2::1", IP_ONLY, pk::SYN, D, "stranger v6"),
                ("10.1.2.3", IP_ONLY + 1, pk::SYN, D, "other port's list"),
                ("10.2.0.1", IP_ONLY + 1, pk::SYN, P, "its own port"),
                // The proxy port is open to all.
                ("10.2.0.1", PROXY, pk::SYN, P, "proxy port"),
            ],
        );
        assert_eq!(
            packets(before, e.counters().unwrap()),
            [5, 0, 4, 0],
            "{prog:?}"
        );

        // Replacing the list drops the old entries.
        e.set_ip_only(IP_ONLY, &["::ffff:10.9.0.0/112".parse().unwrap()])
            .unwrap();
        check(
            e,
            prog,
            &[
                ("10.9.8.7", IP_ONLY, pk::SYN, P, "mapped entry"),
                ("10.1.2.3", IP_ONLY, pk::SYN, D, "old entry gone"),
                ("2001:db8:1:2::3", IP_ONLY, pk::SYN, D, "old v6 entry gone"),
            ],
        );
        // An empty list drops everyone; clearing admits everyone.
        e.set_ip_only(IP_ONLY, &[]).unwrap();
        check(e, prog, &[("10.9.8.7", IP_ONLY, pk::SYN, D, "empty list")]);
        e.clear_ip_only(IP_ONLY).unwrap();
        check(e, prog, &[("10.2.0.1", IP_ONLY, pk::SYN, P, "cleared")]);
    });
}

#[test]
fn test_run_bans_drop_until_they_expire() {
    each_prog("test_run_bans_drop_until_they_expire", 0, 0, |e, prog| {
        e.set_ip_only(IP_ONLY, &["10.5.0.0/16".parse().unwrap()])
            .unwrap();
        let before = e.counters().unwrap();
        e.ban(ip("10.5.0.1"), Duration::from_secs(60)).unwrap();
        // IPv6 bans cover the /64.
        e.ban(ip("2001:db8:9:9::1"), Duration::from_secs(60))
            .unwrap();
        check(
            e,
            prog,
            &[
                ("10.5.0.1", PROXY, pk::SYN, D, "banned"),
                ("10.5.0.1", PROXY, pk::ACK, D, "all packets"),
                // A ban beats the allowlist.
                ("10.5.0.1", IP_ONLY, pk::SYN, D, "banned, listed"),
                ("10.5.0.2", PROXY, pk::SYN, P, "neighbour"),
                // Traffic to other ports is not the gateway's business.
                ("10.5.0.1", OTHER, pk::SYN, P, "other port"),
                ("2001:db8:9:9:abcd::1", PROXY, pk::SYN, D, "same /64"),
                ("2001:db8:9:a::1", PROXY, pk::SYN, P, "other /64"),
            ],
        );
        assert_eq!(
            packets(before, e.counters().unwrap()),
            [2, 0, 0, 4],
            "{prog:?}"
        );

        // Expiry is the program's comparison with bpf_ktime_get_ns().
        e.ban_until_ns(ip("10.5.0.1"), monotonic_ns() - 1).unwrap();
        e.ban(ip("10.5.0.3"), Duration::from_millis(150)).unwrap();
        check(
            e,
            prog,
            &[
                ("10.5.0.1", PROXY, pk::SYN, P, "expired"),
                ("10.5.0.3", PROXY, pk::SYN, D, "fresh"),
            ],
        );
        thread::sleep(Duration::from_millis(250));
        check(
            e,
            prog,
            &[("10.5.0.3", PROXY, pk::SYN, P, "expired by time")],
        );
        // Unban lifts at once; unbanning twice is fine.
        e.unban(ip("2001:db8:9:9::77")).unwrap();
        e.unban(ip("2001:db8:9:9::77")).unwrap();
        check(
            e,
            prog,
            &[("2001:db8:9:9::1", PROXY, pk::SYN, P, "unbanned")],
        );
    });
}

#[test]
fn test_run_parses_vlan_and_ipv6_extension_headers() {
    each_prog(
        "test_run_parses_vlan_and_ipv6_extension_headers",
        0,
        0,
        |e, prog| {
            e.ban(ip("10.7.0.1"), Duration::from_secs(60)).unwrap();
            e.ban(ip("2001:db8:7::1"), Duration::from_secs(60)).unwrap();
            let v4 = ip("10.7.0.1");
            let v6 = ip("2001:db8:7::1");
            assert_eq!(
                run(
                    e,
                    prog,
                    &pk::vlan_tcp_frame(v4, v4_server(), PROXY, pk::SYN)
                ),
                Out::Drop,
                "{prog:?} vlan"
            );
            // Hop-by-hop, destination options and routing headers are walked.
            let exts = [(0u8, 0u8), (60, 1), (43, 0)];
            let f = pk::ipv6_ext_tcp_frame(v6, v6_server(), PROXY, &exts);
            assert_eq!(run(e, prog, &f), Out::Drop, "{prog:?} v6 ext headers");
            // IPv4 with options.
            let seg = pk::tcp_segment(v4, v4_server(), 40000, PROXY, pk::SYN, &[]);
            let f = v4_frame([10, 7, 0, 1], pk::PROTO_TCP, 0, 8, &seg);
            assert_eq!(run(e, prog, &f), Out::Drop, "{prog:?} v4 options");
        },
    );
}

#[test]
fn test_run_passes_what_it_does_not_judge_untouched_and_uncounted() {
    let test = "test_run_passes_what_it_does_not_judge_untouched_and_uncounted";
    // Everything configured to drop: a banned source, an ip_only port with
    // an empty list, a limiter with burst 1 already used.
    each_prog(test, 1, 1, |e, prog| {
        let v4 = ip("10.8.0.1");
        let v6 = ip("2001:db8:8::1");
        e.ban(v4, Duration::from_secs(60)).unwrap();
        e.ban(v6, Duration::from_secs(60)).unwrap();
        e.set_ip_only(IP_ONLY, &[]).unwrap();
        let before = e.counters().unwrap();

        let syn4 = pk::ip_tcp(v4, v4_server(), 40000, PROXY, pk::SYN);
        let seg4 = pk::tcp_segment(v4, v4_server(), 40000, PROXY, pk::SYN, &[]);
        let mut udp = vec![0x9c, 0x40, 0x13, 0x88, 0, 8, 0, 0]; // 40000 -> 5000
        udp.truncate(8);
        let mut fixtures: Vec<(&str, Vec<u8>)> = vec![
            (
                "udp to the proxy port",
                v4_frame([10, 8, 0, 1], pk::PROTO_UDP, 0, 5, &udp),
            ),
            (
                "udp over ipv6",
                pk::eth(
                    pk::ETH_P_IPV6,
                    &pk::ipv6(v6_bytes(v6), v6_bytes(v6_server()), pk::PROTO_UDP, &udp),
                ),
            ),
            (
                "icmp",
                v4_frame(
                    [10, 8, 0, 1],
                    pk::PROTO_ICMP,
                    0,
                    5,
                    &[8, 0, 0, 0, 0, 0, 0, 0],
                ),
            ),
            ("arp", pk::arp_frame()),
            (
                "ipv4 first fragment (MF)",
                v4_frame([10, 8, 0, 1], pk::PROTO_TCP, 0x2000, 5, &seg4),
            ),
            (
                "ipv4 later fragment",
                v4_frame([10, 8, 0, 1], pk::PROTO_TCP, 0x0003, 5, &seg4),
            ),
            (
                "ipv6 fragment header",
                pk::ipv6_fragment_tcp_frame(v6, v6_server(), PROXY),
            ),
            (
                "ipv6 seven extension headers",
                pk::ipv6_ext_tcp_frame(v6, v6_server(), PROXY, &[(60, 0); 7]),
            ),
            (
                "tcp header cut short",
                pk::eth(pk::ETH_P_IP, &syn4[..20 + 12]),
            ),
            ("tcp header cut short over ipv6", {
                let syn6 = pk::ip_tcp(v6, v6_server(), 40000, PROXY, pk::SYN);
                pk::eth(pk::ETH_P_IPV6, &syn6[..40 + 12])
            }),
            ("ipv4 ihl below 5", {
                let mut p = syn4.clone();
                p[0] = 0x44;
                pk::eth(pk::ETH_P_IP, &p)
            }),
            ("ipv4 ihl past the end", {
                let mut p = syn4.clone();
                p[0] = 0x4F;
                pk::eth(pk::ETH_P_IP, &p)
            }),
            ("version 6 in an ipv4 ethertype", {
                let mut p = syn4.clone();
                p[0] = 0x65;
                pk::eth(pk::ETH_P_IP, &p)
            }),
            ("unknown ethertype", pk::eth(0x88B5, &syn4)),
            ("vlan tag cut short", pk::eth(pk::ETH_P_8021Q, &[0x00])),
            (
                "tcp to an unconfigured port",
                pk::tcp_frame(v4, v4_server(), 40000, OTHER, pk::SYN),
            ),
            (
                "tcp over ipv6 to an unconfigured port",
                pk::tcp_frame(v6, v6_server(), 40000, OTHER, pk::SYN),
            ),
        ];
        // BPF_PROG_TEST_RUN refuses to build an skb whose IPv4/IPv6 header is
        // cut short (EINVAL), so these run through XDP only; both programs
        // share the parser.
        if prog == Prog::Xdp {
            fixtures.push(("ethernet header only", pk::eth(pk::ETH_P_IP, &[])));
            fixtures.push((
                "ethernet header and one byte",
                pk::eth(pk::ETH_P_IP, &[0x45]),
            ));
            fixtures.push(("ipv4 header cut short", pk::eth(pk::ETH_P_IP, &syn4[..12])));
            let syn6 = pk::ip_tcp(v6, v6_server(), 40000, PROXY, pk::SYN);
            fixtures.push((
                "ipv6 header cut short",
                pk::eth(pk::ETH_P_IPV6, &syn6[..30]),
            ));
        }
        // A frame as long as an MTU, TCP to an unconfigured port.
        fixtures.push(("full-size frame", {
            let seg = pk::tcp_segment(v4, v4_server(), 40000, OTHER, pk::ACK, &[0xAB; 1460]);
            v4_frame([10, 8, 0, 1], pk::PROTO_TCP, 0, 5, &seg)
        }));
        for (what, frame) in &fixtures {
            assert_eq!(run(e, prog, frame), Out::Pass, "{prog:?}: {what}");
        }
        assert_eq!(
            e.counters().unwrap(),
            before,
            "{prog:?}: nothing above may be counted"
        );
        // ... while the same source's well-formed SYN is judged.
        assert_eq!(
            run(
                e,
                prog,
                &pk::tcp_frame(v4, v4_server(), 40000, PROXY, pk::SYN)
            ),
            Out::Drop,
            "{prog:?}"
        );
    });
}

/// An Ethernet frame of an IPv4 packet from `src` to the IPv4 server.
fn v4_frame(src: [u8; 4], proto: u8, frag: u16, ihl: u8, payload: &[u8]) -> Vec<u8> {
    pk::eth(
        pk::ETH_P_IP,
        &pk::ipv4(src, [192, 0, 2, 1], proto, frag, ihl, payload),
    )
}

fn v6_bytes(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V6(v) => v.octets(),
        IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
    }
}
