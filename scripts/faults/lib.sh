# Shared by the fault scripts: run the long version (SG_FAULTS_FULL=1) of one
# test of tests/tests/faults/
# (module::name, e.g. nodes::node_killed_mid_tunnel) with a time limit, keep
# its output in <name>.log, print its FIGURE lines.
# Usage (sourced): run_fault <module::test name> <seconds>
#                 run_faults <module::name:seconds>...  (each; fails if any did)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${SG_FAULTS_OUT:-$ROOT/target/faults}"
mkdir -p "$OUT"
# The long versions; scripts/test (and CI) runs the same tests bounded.
export SG_FAULTS_FULL="${SG_FAULTS_FULL:-1}"

build() {
    (cd "$ROOT" && cargo build --workspace --bins -q && cargo test -p splicegate-tests --test faults --no-run -q)
}

run_fault() {
    local name="$1" limit="$2" rc=0
    local log="$OUT/${name##*::}.log"
    echo "== $name (at most ${limit} s; log $log)"
    (cd "$ROOT" && timeout --kill-after=10 "$limit" \
        cargo test -q -p splicegate-tests --test faults -- \
        --exact "$name" --nocapture --test-threads=1) >"$log" 2>&1 || rc=$?
    grep -a '^FIGURE ' "$log" | sed 's/^FIGURE /   /' || true
    if [ "$rc" -eq 0 ]; then
        echo "   PASS $name"
    else
        echo "   FAIL $name (exit $rc):"
        grep -a -A12 'panicked at' "$log" | grep -av '^ *[0-9]*: \|^ *at ' | head -20 | sed 's/^/   | /'
    fi
    return "$rc"
}

run_faults() {
    local spec rc=0
    for spec in "$@"; do
        run_fault "${spec%:*}" "${spec##*:}" || rc=1
    done
    return "$rc"
}
