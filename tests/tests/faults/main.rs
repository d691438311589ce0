//! Fault scenarios with pass criteria (research/reliability.md §3): nodes
//! that die, stall or never answer; 10,000 idle connections and slowloris
//! attackers; descriptor exhaustion; SIGTERM under load; SIGKILL in a loop
//! with the ledger reconciled, alone and in a fleet of three; key rotation
//! and pause under load.
//!
//! Each runs in two sizes with the same pass criteria. The fast run
//! (`scripts/test`, and so CI) runs the bounded version of every scenario,
//! one at a time, each well under 60 s. The scripts in `scripts/faults/`
//! run the long versions (`SG_FAULTS_FULL=1`: 10,000 idle connections, 50
//! SIGKILL rounds, a blackhole in a network namespace) and collect the
//! figures. Each prints its measured figures on lines starting with
//! `FIGURE`, which `docs/RELIABILITY.md` quotes.
//!
//! One module per topic; the shared criteria and probes are in
//! `splicegate_tests::faults`. The scripts name a test by its path:
//! `cargo test -p splicegate-tests --test faults -- --exact nodes::node_killed_mid_tunnel`.

mod descriptors;
mod fleet;
mod load;
mod nodes;
mod reload;
mod signals;
