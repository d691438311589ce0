#!/usr/bin/env bash
# Descriptor exhaustion: the gateway under `ulimit -n ${SG_GATEWAY_NOFILE:-256}`
# (the test starts it so). Pass criteria in tests/tests/faults/descriptors.rs.
source "$(dirname "$0")/lib.sh"
build
run_fault descriptors::descriptor_exhaustion 120
