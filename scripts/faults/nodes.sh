#!/usr/bin/env bash
# Nodes that fail: killed mid-tunnel, accepting then stalling. Bounded: about
# 15 s. Pass criteria in tests/tests/faults/nodes.rs (node_killed_mid_tunnel,
# node_accepts_then_stalls).
source "$(dirname "$0")/lib.sh"
build
run_faults nodes::node_killed_mid_tunnel:120 nodes::node_accepts_then_stalls:120
