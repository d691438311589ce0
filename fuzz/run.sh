#!/usr/bin/env bash
# Build every cargo-fuzz target and run each for a while; CI calls this.
#
#   fuzz/run.sh [seconds]     (default 60 per target)
#
# Stable toolchain: `-s none` builds without a sanitizer (ASan needs nightly's
# -Zsanitizer); libFuzzer's coverage instrumentation, debug assertions and
# overflow checks stay on. The seed corpus in corpus/<target>/ is read only:
# inputs libFuzzer finds go to target/corpus/<target>/ (ignored by git), and a
# crashing input to artifacts/<target>/. Exits non-zero when a target crashes,
# leaks past the RSS limit, or hangs past the per-input timeout.
set -euo pipefail

seconds="${1:-60}"
case "$seconds" in
'' | *[!0-9]*)
	echo "usage: $0 [seconds]" >&2
	exit 2
	;;
esac

cd "$(dirname "$0")"
command -v cargo-fuzz >/dev/null || {
	echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
	exit 2
}

cargo fuzz build -s none

failed=()
for target in $(cargo fuzz list); do
	found="target/corpus/$target"
	mkdir -p "$found"
	echo "=== $target: ${seconds}s"
	if ! cargo fuzz run -s none "$target" "$found" "corpus/$target" -- \
		-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then
		failed+=("$target")
	fi
done

if ((${#failed[@]})); then
	echo "fuzz targets failed: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
	exit 1
fi
echo "all fuzz targets ran ${seconds}s without a crash"
