//! Fault scenarios with pass criteria (research/reliability.md §3): nodes
//! that die, stall or never answer; 10,000 idle connections and slowloris
//! attackers; descriptor exhaustion; SIGTERM under load; SIGKILL in a loop
//! with the ledger reconciled; key rotation and pause under load.
//!
//! None of these is part of the fast run: each is `#[ignore]`d and run by
//! its script in `scripts/faults/`, which sets what it needs (open-file
//! limits, a network namespace) and cleans up. Each prints its measured
//! figures on lines starting with `FIGURE`, which `docs/RELIABILITY.md`
//! quotes.
//!
//! One module per topic; the shared criteria and probes are in
//! `splicegate_tests::faults`. The scripts name a test by its path:
//! `cargo test -p splicegate-tests --test faults -- --ignored --exact nodes::node_killed_mid_tunnel`.

mod descriptors;
mod load;
mod nodes;
mod reload;
mod signals;
