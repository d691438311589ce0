//! Tests. Those needing the kernel (program runs, namespaces) detect the
//! privileges by trying: on EPERM they print why they skip, to the real
//! stderr so that `cargo test` shows it without `--nocapture`. CI sets
//! `SPLICEGATE_REQUIRE_BPF=1` to turn a skip into a failure.

mod abi;
mod api;
mod flood;
mod lab;
mod netns;
mod packets;
mod test_run;

use std::io::Write as _;

use crate::{Enforcer, Error};

/// Prints that `test` is skipped and why, or panics under
/// `SPLICEGATE_REQUIRE_BPF=1`.
pub(crate) fn skip(test: &str, reason: &str) {
    if std::env::var_os("SPLICEGATE_REQUIRE_BPF").is_some_and(|v| v == "1") {
        panic!("{test}: cannot run ({reason}) and SPLICEGATE_REQUIRE_BPF=1");
    }
    // Straight to fd 2: the test harness captures only print!/eprint!.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

/// A detached enforcer, or `None` after printing why the test skips.
pub(crate) fn load_or_skip(
    test: &str,
    proxy_ports: &[u16],
    syn_rate: u32,
    syn_burst: u32,
) -> Option<Enforcer> {
    match Enforcer::load_detached(proxy_ports, syn_rate, syn_burst) {
        Ok(e) => Some(e),
        Err(Error::NoPrivileges(reason)) => {
            skip(
                test,
                &format!("no privileges to load BPF programs ({reason})"),
            );
            None
        }
        Err(e) => panic!("{test}: loading failed: {e:?}"),
    }
}
