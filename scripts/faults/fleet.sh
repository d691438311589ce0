#!/usr/bin/env bash
# SIGKILL during traffic in a fleet: three gateways on one PostgreSQL and one
# Redis, each killed 20 times in turn and restarted under its id (the shared
# ledger never double-counts, loses at most one flush window per kill).
# SG_FLEET_KILL_ROUNDS changes the 20. About 5 min (each restart waits for
# the dead gateway's registry entry to expire).
source "$(dirname "$0")/lib.sh"
build
run_faults fleet::each_gateway_sigkilled_during_traffic:900
