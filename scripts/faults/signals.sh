#!/usr/bin/env bash
# SIGTERM under load (tunnels finish in the grace period, exit 0, usage
# flushed) and SIGKILL during traffic 50 times with restarts (the ledger
# never double-counts, loses at most one flush interval). SG_KILL_ROUNDS
# changes the 50. Bounded: about 3 min.
source "$(dirname "$0")/lib.sh"
build
run_faults signals::sigterm_under_load:120 signals::sigkill_loop_reconciles_the_ledger:600
