#!/usr/bin/env bash
# Every fault scenario in turn; the FIGURE lines go to target/faults/figures.txt.
# blackhole.sh needs root; the others do not. About 11 min in all.
set -uo pipefail
DIR="$(cd "$(dirname "$0")" && pwd)"
OUT="${SG_FAULTS_OUT:-$DIR/../../target/faults}"
mkdir -p "$OUT"
(
    rc=0
    for s in nodes blackhole load fd_exhaustion signals fleet reload; do
        "$DIR/$s.sh" || rc=1
    done
    exit $rc
) 2>&1 | tee "$OUT/summary.txt"
rc=${PIPESTATUS[0]}
grep -a '^FIGURE ' "$OUT"/*.log > "$OUT/figures.txt" || true
exit "$rc"
