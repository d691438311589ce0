#!/usr/bin/env bash
# Runs the agents' flow-control test on purpose, RUNS times in a row (default
# 5), and prints its FIGURE lines: one stream through an agent over a
# 100 ms-RTT, 100 Mbit/s link (tc netem on a veth, or the user-space delay
# line where the kernel has no netem) against one plain TCP connection over
# the same link, and the link's settings (qdisc, limit, socket buffer
# sysctls). Needs root (network namespaces). Each run is bounded (120 s).
#
#   scripts/agents/netem.sh [RUNS]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUNS="${1:-5}"
TEST=one_stream_through_an_agent_over_a_100ms_link_reaches_90_percent_of_plain_tcp
[ "$(id -u)" -eq 0 ] || { echo "netem.sh needs root (network namespaces)"; exit 2; }
cd "$ROOT"
cargo build --workspace --bins -q
cargo test -q -p splicegate-tests --test agents --no-run
export SPLICEGATE_REQUIRE_NETNS=1
failed=0
for i in $(seq 1 "$RUNS"); do
    log="$(mktemp)"
    rc=0
    timeout --kill-after=10 120 cargo test -q -p splicegate-tests --test agents -- \
        --exact "$TEST" --nocapture --test-threads=1 >"$log" 2>&1 || rc=$?
    if [ "$i" -eq 1 ]; then
        grep -a '^FIGURE agents flow control settings' "$log" | sed 's/^FIGURE /   /' || true
    fi
    line="$(grep -a '^FIGURE agents flow control, ' "$log" | sed 's/^FIGURE agents flow control, //' || true)"
    if [ "$rc" -eq 0 ]; then
        echo "run $i: PASS $line"
    else
        echo "run $i: FAIL (exit $rc) $line"
        grep -a -A6 'panicked at' "$log" | head -12 | sed 's/^/   | /'
        failed=$((failed + 1))
    fi
    rm -f "$log"
done
echo "$((RUNS - failed)) of $RUNS runs passed"
[ "$failed" -eq 0 ]
