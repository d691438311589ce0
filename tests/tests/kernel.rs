//! The kernel rules through the real binary: `[ebpf] enabled = true` on
//! `lo` (generic XDP), as root. An `ip_only` port's allowlist from the file
//! and from the admin API (a change in force within a second), bans after
//! repeated `AUTH_FAILED` and their expiry, the per-source rate cutting one
//! address while another connects, the programs gone after exit; and the
//! same rules with `enabled = false` (accepted, then closed at once).
//!
//! A kernel drop shows as a connect that times out (no SYN-ACK); the
//! user-space guard shows as a connection accepted and closed at once.
//! Only one XDP program fits on `lo`: the tests of this file run one at a
//! time. Without root or BPF they skip, unless `SPLICEGATE_REQUIRE_BPF=1`
//! (CI), where a skip is a failure.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use splicegate_tests::client::connect_from;
use splicegate_tests::ops::*;
use splicegate_tests::{Gateway, HttpTarget, eventually, user};

static LO: Mutex<()> = Mutex::new(());

/// What a SYN from `src` to `dst` met.
#[derive(Debug, PartialEq, Eq)]
enum Syn {
    /// Accepted, and still open 150 ms later (served).
    Open,
    /// Accepted and closed at once (the user-space guard).
    Closed,
    /// No answer within the connect timeout (dropped by the kernel).
    Dropped,
    /// Refused or another error.
    Failed(String),
}

fn syn(src: Ipv4Addr, dst: SocketAddr) -> Syn {
    syn_within(src, dst, Duration::from_millis(300), true)
}

/// A SYN that counts as dropped after `timeout` (a loopback SYN-ACK takes
/// microseconds); with `watch`, an accepted connection is watched 150 ms
/// for a close.
fn syn_within(src: Ipv4Addr, dst: SocketAddr, timeout: Duration, watch: bool) -> Syn {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::from((src, 0)).into())
        .expect("bind the source");
    match s.connect_timeout(&dst.into(), timeout) {
        Ok(()) if !watch => Syn::Open,
        Ok(()) => {
            let mut t: TcpStream = s.into();
            t.set_read_timeout(Some(Duration::from_millis(150)))
                .unwrap();
            match t.read(&mut [0u8; 1]) {
                Ok(0) => Syn::Closed,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Syn::Closed,
                _ => Syn::Open,
            }
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) =>
        {
            Syn::Dropped
        }
        Err(e) => Syn::Failed(e.to_string()),
    }
}

/// Whether the gateway closed `s` (EOF or reset) within 100 ms; an open,
/// served connection times out the read.
fn closed_at_once(mut s: &TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    match s.read(&mut [0u8; 1]) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Assert that `src` is served on `dst` within `limit` of now (an API
/// change reaching the kernel's allowlist).
#[track_caller]
fn served_within(src: Ipv4Addr, dst: SocketAddr, limit: Duration) {
    let t = Instant::now();
    let served = eventually(Duration::from_secs(3), Duration::from_millis(100), || {
        (syn(src, dst) == Syn::Open).then_some(t.elapsed())
    });
    let took = served.unwrap_or_else(|| panic!("{src} was never served on {dst}"));
    assert!(took < limit, "{src} served on {dst} only after {took:?}");
}

/// Whether the kernel tests can run here; `None` means skip.
fn can_attach() -> Option<()> {
    if splicegate_tests::is_root() {
        return Some(());
    }
    if std::env::var_os("SPLICEGATE_REQUIRE_BPF").is_some_and(|v| v == "1") {
        panic!("the kernel tests need root, and SPLICEGATE_REQUIRE_BPF=1");
    }
    eprintln!("skipped: the kernel tests need root");
    None
}

/// A gateway with `[ebpf] enabled` as given, package 7 (password), package
/// 8 (ip auth, allowlist 127.0.5.1 in the file) on the `ip_only` port
/// IPONLY, and package 9 (from the API) on the `ip_only` port APIONLY.
fn start(s: &Setup, enabled: bool) -> Gateway {
    let toml = format!(
        r#"{}
[ebpf]
enabled = {enabled}
interface = "lo"
mode = "xdp-generic"
syn_rate = 20
syn_burst = 20
ban_threshold = 3
ban_window_s = 60
ban_s = 2

[[listener]]
listen = "127.0.0.1:@PORT_IPONLY@"
package = 8
ip_only = true

[[listener]]
listen = "127.0.0.1:@PORT_APIONLY@"
package = 9
ip_only = true

[[package]]
id = 7
key = "pk_kernel"

[[package]]
id = 8
key = "pk_kernel8"
auth = "ip"
ip_allowlist = ["127.0.5.1/32"]
default_rules = "country-us"

{}"#,
        s.head("interval_s = 60"),
        direct_node("d1", "127.0.1.95", "country = \"us\"")
    );
    s.start(&toml)
}

fn attached(gw: &Gateway) -> bool {
    gw.log().contains("kernel programs attached")
}

#[test]
fn kernel_rules_through_the_binary() {
    let Some(()) = can_attach() else { return };
    let _lo = LO.lock().unwrap_or_else(|e| e.into_inner());
    let s = Setup::new("kernel");
    let mut gw = start(&s, true);
    assert!(
        attached(&gw),
        "the programs did not attach:\n{}",
        gw.log_tail(20)
    );
    let ip_only = gw.addr("IPONLY");
    let api_only = gw.addr("APIONLY");
    let a = |d: u8| Ipv4Addr::new(127, 0, 5, d);

    // 1. The file's allowlist: the allowlisted address is served, a
    //    stranger's SYN is dropped.
    assert_eq!(syn(a(1), ip_only), Syn::Open);
    assert_eq!(syn(a(2), ip_only), Syn::Dropped);

    // 2. The API's: package 9 created with 127.0.5.21, then 127.0.5.22
    //    added; each change is in force in the kernel within a second.
    gw.created(
        "/v1/packages",
        r#"{"id": 9, "key": "pk_kernel9", "auth": "ip", "ip_allowlist": ["127.0.5.21/32"], "default_rules": "country-us"}"#,
    );
    served_within(a(21), api_only, Duration::from_millis(1500));
    assert_eq!(syn(a(22), api_only), Syn::Dropped);
    gw.patched(
        "/v1/packages/9",
        r#"{"ip_allowlist": ["127.0.5.21/32", "127.0.5.22/32"]}"#,
    );
    served_within(a(22), api_only, Duration::from_millis(1500));

    // 3. Bans: four wrong keys from 127.0.5.3 ban it (threshold 3); another
    //    address is unaffected; the ban expires after ban_s.
    let web = HttpTarget::start();
    for _ in 0..4 {
        let r = gw.forward(a(3), &web.url("/ip"), &user("country-us"), "wrong");
        assert_eq!(r.status, 407);
    }
    let banned = eventually(Duration::from_secs(2), Duration::from_millis(50), || {
        (syn(a(3), gw.proxy) == Syn::Dropped).then_some(())
    });
    assert!(banned.is_some(), "127.0.5.3 was never banned in the kernel");
    assert_eq!(
        syn(a(4), gw.proxy),
        Syn::Open,
        "another address is unaffected"
    );
    let lifted = eventually(Duration::from_secs(6), Duration::from_millis(200), || {
        (syn(a(3), gw.proxy) == Syn::Open).then_some(())
    });
    assert!(lifted.is_some(), "the ban did not expire");

    // 4. The per-source rate (20/s, burst 20): a burst of 40 SYNs from one
    //    address is cut; another address connects meanwhile.
    let quick = Duration::from_millis(100);
    let outcomes: Vec<Syn> = (0..40)
        .map(|_| syn_within(a(5), gw.proxy, quick, false))
        .collect();
    let dropped = outcomes.iter().filter(|o| **o == Syn::Dropped).count();
    assert!(dropped > 0, "no SYN of the burst was dropped: {outcomes:?}");
    assert_eq!(syn(a(6), gw.proxy), Syn::Open);
    let metrics = gw.metrics();
    assert!(
        metrics.contains("splicegate_ebpf_verdicts_total"),
        "{metrics}"
    );

    // 5. After exit, no program is left on lo.
    gw.term();
    let link = std::process::Command::new("ip")
        .args(["-d", "link", "show", "dev", "lo"])
        .output()
        .expect("ip link");
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(
        !link.contains("prog/xdp"),
        "a program is left on lo:\n{link}"
    );
}

#[test]
fn the_same_rules_without_the_kernel() {
    let Some(()) = can_attach() else { return };
    let _lo = LO.lock().unwrap_or_else(|e| e.into_inner());
    let s = Setup::new("kernel-off");
    let gw = start(&s, false);
    assert!(!attached(&gw));
    let ip_only = gw.addr("IPONLY");
    let a = |d: u8| Ipv4Addr::new(127, 0, 5, d);
    // The stranger is accepted and closed at once; the allowlisted served.
    assert_eq!(syn(a(1), ip_only), Syn::Open);
    assert_eq!(syn(a(12), ip_only), Syn::Closed);
    // A ban: accepted and closed at once, another address served.
    let web = HttpTarget::start();
    for _ in 0..4 {
        let r = gw.forward(a(13), &web.url("/ip"), &user("country-us"), "wrong");
        assert_eq!(r.status, 407);
    }
    assert_eq!(syn(a(13), gw.proxy), Syn::Closed);
    assert_eq!(syn(a(14), gw.proxy), Syn::Open);
    // The rate: of a burst of 40 connections from one address, those past
    // the burst are closed at once; another address connects meanwhile.
    let burst: Vec<TcpStream> = (0..40)
        .filter_map(|_| connect_from(a(15).into(), gw.proxy).ok())
        .collect();
    let closed = burst.iter().filter(|s| closed_at_once(s)).count();
    assert!(closed > 0, "no connection of the burst was closed");
    assert_eq!(syn(a(16), gw.proxy), Syn::Open);
}
