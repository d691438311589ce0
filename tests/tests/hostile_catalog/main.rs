//! The hostile-input catalogue (research/reliability.md §2), byte by byte,
//! against the real binary, with the SPEC's answer for each (sections 3, 4
//! and 7).
//!
//! Every case runs twice: its bytes in one write, and (inputs under 300
//! bytes) one byte per write with a short pause, which must give the same
//! result. Each run comes from its own source address (`127.0.2.x`,
//! `127.0.3.x`), so the per-source guard never sees two cases as one client.
//! While the cases run, a well-behaved client on `127.0.3.251` tunnels and
//! forwards without a single failure, a tunnel opened before the cases
//! still carries bytes after them, no hostile target ever reaches the node,
//! and neither the gateway's debug log nor its access log holds the package
//! key or the node's upstream password.
//!
//! The gateway under test keeps the default target policy except for
//! `127.0.10.0/24`, where the targets listen: loopback in any other spelling
//! (`127.1`, octal, hex, IPv4-mapped IPv6) must be `403 DISALLOWED`.

// Each table reads as one `push` per case, whatever comes first.
#![allow(clippy::vec_init_then_push)]

mod auth;
mod clients;
mod http;
mod socks;
mod targets;

use splicegate_tests::catalog::*;

/// Every table's cases, the fixed gateway bugs' among them.
fn all_cases(lab: &Lab) -> Vec<Case> {
    let mut cases = http::cases(lab);
    cases.extend(targets::cases(lab));
    cases.extend(auth::cases(lab));
    cases.extend(socks::cases(lab));
    cases
}

/// The cases the gateway once got wrong (each case's `bug` says how; see
/// docs/RELIABILITY.md): the SPEC's answer, asserted, so they stay fixed.
#[test]
fn fixed_gateway_bugs_stay_fixed() {
    let lab = Lab::start();
    let cases: Vec<Case> = all_cases(&lab)
        .into_iter()
        .filter(|c| c.bug.is_some())
        .collect();
    run_table(&lab, &cases, "known gateway bugs");
}

#[test]
fn the_catalogue_has_at_least_60_cases() {
    // Counted without starting anything: the builders need a lab only for
    // addresses.
    let lab = Lab::start();
    let n = all_cases(&lab).len();
    eprintln!("hostile catalogue: {n} table cases");
    assert!(n >= 60, "{n} cases");
}
