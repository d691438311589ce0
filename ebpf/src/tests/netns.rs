//! Real connects between two network namespaces the tests create and delete
//! (veth pair, 10.200.x.0/24 on its two ends only), the program attached to
//! the server end: native XDP, TC (TCX and the legacy clsact filter), and
//! generic XDP on the namespace's own `lo`.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use super::{
    lab::{Lab, LabError, SRV_IF},
    load_or_skip, skip,
};
use crate::{AttachMode, Enforcer, EnforcerConfig, Error, Verdict, VerdictCounters};

const P_PROXY: u16 = 5000;
const P_IP_ONLY: u16 = 10008;
/// Ethernet + IPv4 + TCP without options: what a raw SYN weighs on the wire.
const SYN_FRAME: u64 = 14 + 20 + 20;

/// The lab, or `None` after printing why the test skips. Checks the BPF
/// privileges first by loading the programs for real.
fn lab_or_skip(test: &str, tag: &str) -> Option<Lab> {
    drop(load_or_skip(test, &[], 0, 0)?);
    match Lab::new(tag) {
        Ok(lab) => Some(lab),
        Err(LabError::Unavailable(why)) => {
            skip(test, &format!("cannot create network namespaces: {why}"));
            None
        }
        Err(LabError::Failed(why)) => panic!("{test}: building the lab: {why}"),
    }
}

fn attach_in(lab: &Lab, cfg: EnforcerConfig) -> Enforcer {
    lab.srv
        .run(move || Enforcer::attach(&cfg))
        .expect("attach inside the server namespace")
}

fn cfg(
    interface: &str,
    mode: AttachMode,
    proxy_ports: &[u16],
    syn_rate: u32,
    syn_burst: u32,
) -> EnforcerConfig {
    EnforcerConfig {
        interface: interface.into(),
        mode,
        proxy_ports: proxy_ports.to_vec(),
        syn_rate,
        syn_burst,
    }
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

fn delta(before: VerdictCounters, after: VerdictCounters, v: Verdict) -> (u64, u64) {
    let (b, a) = (before.get(v), after.get(v));
    (a.packets - b.packets, a.bytes - b.bytes)
}

/// Lets in-flight packets of earlier steps land before a counted window.
fn settle() {
    thread::sleep(Duration::from_millis(300));
}

/// The lab with a listener on `port` of every server address, and the
/// server's address; `None` after printing why the test skips.
fn serving_lab(test: &str, tag: &str, port: u16) -> Option<(Lab, Ipv4Addr)> {
    let mut lab = lab_or_skip(test, tag)?;
    let server = lab.server_addr();
    lab.serve(sa(Ipv4Addr::UNSPECIFIED, port));
    Some((lab, server))
}

/// `n` raw SYNs as the counters see them: (packets, bytes).
const fn syns(n: u64) -> (u64, u64) {
    (n, n * SYN_FRAME)
}

/// The counters before and after `send` (with in-flight packets settled on
/// both sides), checking that the veth lost none of what was sent.
fn counted(lab: &Lab, e: &Enforcer, send: impl FnOnce(&Lab)) -> (VerdictCounters, VerdictCounters) {
    settle();
    let before = e.counters().unwrap();
    let dropped_before = lab.cli_tx_dropped();
    send(lab);
    settle();
    let after = e.counters().unwrap();
    assert_eq!(
        lab.cli_tx_dropped(),
        dropped_before,
        "the veth lost frames; the counts below would be off"
    );
    (before, after)
}

/// A connect from `src` to `server:port` completes within 3 s.
fn connects(lab: &Lab, src: Ipv4Addr, server: Ipv4Addr, port: u16, why: &str) {
    if let Err(e) = lab.connect(src, sa(server, port), Duration::from_secs(3)) {
        panic!("{why}: connect from {src} to {server}:{port}: {e}");
    }
}

/// A connect from `src` to `server:port` gets no answer within `within`
/// (its SYN vanished).
fn vanishes(lab: &Lab, src: Ipv4Addr, server: Ipv4Addr, port: u16, within: Duration, why: &str) {
    match lab.connect(src, sa(server, port), within) {
        Ok(_) => panic!("{why}: {src} connected to {server}:{port}"),
        Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{why}: {err}"),
    }
}

#[test]
fn netns_xdp_flood_is_cut_to_its_rate_while_another_source_connects() {
    let test = "netns_xdp_flood_is_cut_to_its_rate_while_another_source_connects";
    let Some((lab, server)) = serving_lab(test, "rate", P_PROXY) else {
        return;
    };
    // 10 new connections/s per source, burst 10.
    let e = attach_in(&lab, cfg(SRV_IF, AttachMode::Xdp, &[P_PROXY], 10, 10));
    let flooder = lab.host(50);
    let good = lab.host(2);
    settle();
    let before = e.counters().unwrap();
    let dropped_before = lab.cli_tx_dropped();

    // 20 000 SYNs from one address over about a second, while the other
    // source opens 10 connections, one every 120 ms (under its own rate).
    let flood = {
        let dst = server;
        lab.cli
            .spawn(move || super::lab::send_syns(flooder, dst, P_PROXY, 20_000, 20))
    };
    let mut latencies = Vec::new();
    for _ in 0..10 {
        let r = lab.connect(good, sa(server, P_PROXY), Duration::from_secs(3));
        latencies.push(r.expect("the well-behaved source connects during the flood"));
        thread::sleep(Duration::from_millis(120));
    }
    let flood_time = flood.join().unwrap();
    settle();
    let after = e.counters().unwrap();
    let lost_on_veth = lab.cli_tx_dropped() - dropped_before;
    let half_open = lab.syn_recv_from(flooder, P_PROXY) as u64;

    let delivered = 20_000 - lost_on_veth;
    let (drop_rate, drop_rate_bytes) = delta(before, after, Verdict::DropRate);
    let max_pass = 10 + (flood_time.as_secs_f64() * 10.0).ceil() as u64 + 1;
    let worst = latencies.iter().max().unwrap();
    eprintln!(
        "flood: {delivered} SYNs delivered in {flood_time:?}, {half_open} admitted, {drop_rate} dropped; \
         good source: 10 connects, worst {worst:?}"
    );
    // A SYN the program dropped would have cost the client a 1 s retransmit.
    assert!(
        *worst < Duration::from_millis(900),
        "a well-behaved connect was delayed: {latencies:?}"
    );
    assert!(
        (10..=max_pass).contains(&half_open),
        "admitted {half_open} flood SYNs, want 10..={max_pass}"
    );
    assert_eq!(
        drop_rate + half_open,
        delivered,
        "every delivered flood SYN is either dropped or admitted"
    );
    assert_eq!((drop_rate, drop_rate_bytes), syns(drop_rate));
    assert_eq!(delta(before, after, Verdict::DropBanned).0, 0);
    assert_eq!(delta(before, after, Verdict::DropNotAllowed).0, 0);
    // Passed: the admitted flood SYNs and the good source's packets.
    assert!(delta(before, after, Verdict::Pass).0 >= half_open + 10 * 3);
}

#[test]
fn netns_xdp_ip_only_port_admits_its_allowlist_only() {
    let test = "netns_xdp_ip_only_port_admits_its_allowlist_only";
    let Some((lab, server)) = serving_lab(test, "iponly", P_IP_ONLY) else {
        return;
    };
    let mut e = attach_in(&lab, cfg(SRV_IF, AttachMode::Xdp, &[P_PROXY], 0, 0));
    let (allowed, stranger, ghost) = (lab.host(2), lab.host(3), lab.host(60));
    e.set_ip_only(
        P_IP_ONLY,
        &[
            format!("{allowed}/32").parse().unwrap(),
            format!("{ghost}/32").parse().unwrap(),
        ],
    )
    .unwrap();

    connects(
        &lab,
        allowed,
        server,
        P_IP_ONLY,
        "an allowlisted address connects",
    );
    let ms700 = Duration::from_millis(700);
    vanishes(
        &lab,
        stranger,
        server,
        P_IP_ONLY,
        ms700,
        "a stranger's SYN vanishes",
    );

    let (before, after) = counted(&lab, &e, |lab| {
        lab.send_syns(stranger, P_IP_ONLY, 25, 1);
        lab.send_syns(ghost, P_IP_ONLY, 25, 1);
    });
    assert_eq!(
        delta(before, after, Verdict::DropNotAllowed),
        syns(25),
        "strangers' SYNs"
    );
    assert_eq!(
        delta(before, after, Verdict::Pass),
        syns(25),
        "allowlisted SYNs"
    );
    assert_eq!(
        lab.syn_recv_from(ghost, P_IP_ONLY),
        25,
        "the allowlisted SYNs reached the listener"
    );

    // Clearing the allowlist opens the port.
    e.clear_ip_only(P_IP_ONLY).unwrap();
    connects(
        &lab,
        stranger,
        server,
        P_IP_ONLY,
        "open after clear_ip_only",
    );
}

#[test]
fn netns_xdp_ban_drops_then_expires() {
    let test = "netns_xdp_ban_drops_then_expires";
    let Some((lab, server)) = serving_lab(test, "ban", P_PROXY) else {
        return;
    };
    let mut e = attach_in(&lab, cfg(SRV_IF, AttachMode::Xdp, &[P_PROXY], 0, 0));
    let (banned, other) = (lab.host(4), lab.host(2));

    let ban = Duration::from_millis(2500);
    let banned_at = Instant::now();
    e.ban(banned.into(), ban).unwrap();
    let ms500 = Duration::from_millis(500);
    vanishes(&lab, banned, server, P_PROXY, ms500, "banned");
    connects(&lab, other, server, P_PROXY, "others are not banned");

    let (before, after) = counted(&lab, &e, |lab| {
        lab.send_syns(banned, P_PROXY, 15, 1);
    });
    assert_eq!(delta(before, after, Verdict::DropBanned), syns(15));
    assert_eq!(delta(before, after, Verdict::Pass).0, 0);
    assert!(
        banned_at.elapsed() < ban,
        "the test ran too slowly to see the ban in force"
    );

    // Expiry is the program's own clock comparison: no unban call.
    thread::sleep((ban + Duration::from_millis(300)).saturating_sub(banned_at.elapsed()));
    connects(&lab, banned, server, P_PROXY, "the ban expired");
}

#[test]
fn netns_tc_tcx_drops_and_detaches() {
    let test = "netns_tc_tcx_drops_and_detaches";
    let Some((lab, server)) = serving_lab(test, "tcx", P_PROXY) else {
        return;
    };
    let banned = lab.host(4);
    let mut e = attach_in(&lab, cfg(SRV_IF, AttachMode::Tc, &[P_PROXY], 0, 0));
    e.ban(banned.into(), Duration::from_secs(600)).unwrap();
    connects(&lab, lab.host(2), server, P_PROXY, "TC passes the others");
    let (before, after) = counted(&lab, &e, |lab| {
        lab.send_syns(banned, P_PROXY, 10, 1);
    });
    assert_eq!(delta(before, after, Verdict::DropBanned), syns(10));
    let ms500 = Duration::from_millis(500);
    vanishes(&lab, banned, server, P_PROXY, ms500, "banned under TC");
    // Detached on drop: an attached program would keep its maps, and the ban.
    drop(e);
    connects(&lab, banned, server, P_PROXY, "detached");
}

fn has_clsact(lab: &Lab) -> bool {
    lab.srv
        .exec(&["tc", "qdisc", "show", "dev", SRV_IF])
        .unwrap()
        .contains("clsact")
}

#[test]
fn netns_tc_legacy_clsact_is_created_and_removed_only_if_ours() {
    let test = "netns_tc_legacy_clsact_is_created_and_removed_only_if_ours";
    let Some((lab, server)) = serving_lab(test, "clsact", P_PROXY) else {
        return;
    };
    let banned = lab.host(4);

    for preexisting in [false, true] {
        if preexisting {
            lab.srv
                .exec(&["tc", "qdisc", "add", "dev", SRV_IF, "clsact"])
                .unwrap();
        }
        assert_eq!(has_clsact(&lab), preexisting);
        // Attach and detach on the same thread, inside the namespace: the
        // netlink requests go to the namespace of the calling thread.
        let c = cfg(SRV_IF, AttachMode::Tc, &[P_PROXY], 0, 0);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let holder = lab.srv.spawn(move || {
            let mut e = Enforcer::attach_netlink_tc(&c).expect("legacy TC attach");
            e.ban(banned.into(), Duration::from_secs(600)).unwrap();
            ready_tx.send(e.counters().unwrap()).unwrap();
            rx.recv_timeout(Duration::from_secs(60)).ok();
            let counters = e.counters().unwrap();
            drop(e);
            counters
        });
        let before = ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("attached");
        assert!(has_clsact(&lab), "clsact present while attached");
        let filters = lab
            .srv
            .exec(&["tc", "filter", "show", "dev", SRV_IF, "ingress"])
            .unwrap();
        assert!(
            filters.contains("sg_tc"),
            "our filter is on ingress: {filters}"
        );
        lab.send_syns(banned, P_PROXY, 10, 1);
        settle();
        tx.send(()).unwrap();
        let after = holder.join().unwrap();
        assert_eq!(delta(before, after, Verdict::DropBanned), syns(10));
        assert_eq!(
            has_clsact(&lab),
            preexisting,
            "clsact removed only if this crate added it"
        );
        let filters = lab
            .srv
            .exec(&["tc", "filter", "show", "dev", SRV_IF, "ingress"])
            .unwrap();
        assert!(!filters.contains("sg_tc"), "our filter is gone: {filters}");
        connects(&lab, banned, server, P_PROXY, "detached");
    }
}

#[test]
fn netns_xdp_generic_on_lo_and_attach_errors() {
    let test = "netns_xdp_generic_on_lo_and_attach_errors";
    let Some(lab) = lab_or_skip(test, "lo") else {
        return;
    };
    let report = lab.srv.run(|| {
        let lo = Ipv4Addr::LOCALHOST;
        let listener = std::net::TcpListener::bind(sa(lo, P_PROXY)).unwrap();
        let mut e = Enforcer::attach(&cfg("lo", AttachMode::XdpGeneric, &[P_PROXY], 0, 0))
            .expect("generic XDP on lo");
        super::lab::connect_from(lo, sa(lo, P_PROXY), Duration::from_secs(3))
            .expect("loopback passes");
        e.ban(lo.into(), Duration::from_secs(600)).unwrap();
        let banned = super::lab::connect_from(lo, sa(lo, P_PROXY), Duration::from_millis(500));
        let counters = e.counters().unwrap();
        e.unban(lo.into()).unwrap();
        let unbanned = super::lab::connect_from(lo, sa(lo, P_PROXY), Duration::from_secs(3));
        drop(e);
        drop(listener);
        // Native XDP needs driver support, which lo lacks: a kernel error,
        // not a privilege problem (the caller must not fall back silently).
        let native = Enforcer::attach(&cfg("lo", AttachMode::Xdp, &[P_PROXY], 0, 0)).map(drop);
        let missing = Enforcer::attach(&cfg(
            "sg-nonesuch0",
            AttachMode::XdpGeneric,
            &[P_PROXY],
            0,
            0,
        ))
        .map(drop);
        (
            banned.map(drop).map_err(|e| e.kind()),
            counters,
            unbanned.map(drop).map_err(|e| e.kind()),
            native,
            missing,
        )
    });
    let (banned, counters, unbanned, native, missing) = report;
    assert_eq!(banned, Err(std::io::ErrorKind::TimedOut));
    assert!(counters.drop_banned.packets >= 1, "{counters:?}");
    assert!(
        counters.pass.packets >= 3,
        "the first connect's packets: {counters:?}"
    );
    assert_eq!(unbanned, Ok(()));
    assert!(matches!(native, Err(Error::Kernel { .. })), "{native:?}");
    assert!(
        matches!(missing, Err(Error::UnknownInterface(ref n)) if n == "sg-nonesuch0"),
        "{missing:?}"
    );
}

#[test]
fn without_capabilities_attach_reports_no_privileges() {
    let test = "without_capabilities_attach_reports_no_privileges";
    // Detect aya's kernel features while privileged: the probe result is
    // cached for the whole process.
    let _ = aya::features();
    let Some(lab) = lab_or_skip(test, "caps") else {
        return;
    };
    let result = lab.srv.run(|| {
        use rustix::thread::{CapabilitySet, capabilities, set_capabilities};
        // Capabilities are per thread: this one alone loses them.
        let mut caps = capabilities(None).expect("capget");
        let gone = CapabilitySet::BPF
            | CapabilitySet::SYS_ADMIN
            | CapabilitySet::NET_ADMIN
            | CapabilitySet::PERFMON;
        caps.effective.remove(gone);
        caps.permitted.remove(gone);
        set_capabilities(None, caps).expect("capset");
        Enforcer::attach(&cfg("lo", AttachMode::XdpGeneric, &[P_PROXY], 1, 1)).map(drop)
    });
    assert!(matches!(result, Err(Error::NoPrivileges(_))), "{result:?}");
}
