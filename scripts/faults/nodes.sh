#!/usr/bin/env bash
# Nodes that fail: killed mid-tunnel, accepting then stalling. Bounded: about
# 15 s. Pass criteria in tests/tests/faults/nodes.rs (node_killed_mid_tunnel,
# node_accepts_then_stalls).
source "$(dirname "$0")/lib.sh"
build
rc=0
run_fault nodes::node_killed_mid_tunnel 120 || rc=1
run_fault nodes::node_accepts_then_stalls 120 || rc=1
exit $rc
