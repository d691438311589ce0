#!/bin/sh
# Fails if rebuilding the BPF object from its sources changes a single byte of
# the committed ebpf/bpf/splicegate.bpf.o (CI runs this after installing
# clang-19, llvm-19 and libbpf-dev). On a difference it shows what differs --
# sections, instructions, BTF -- to tell a stale object (rerun ebpf/build.sh
# and commit) from a toolchain that emits other bytes.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
committed="$here/bpf/splicegate.bpf.o"
work=$(mktemp -d "${TMPDIR:-/tmp}/splicegate-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

"$here/build.sh" "$work/rebuilt.o"

if cmp -s "$committed" "$work/rebuilt.o"; then
    echo "check.sh: ok, $committed is reproduced byte for byte"
    exit 0
fi

echo "check.sh: FAIL: rebuilding $committed gives different bytes" >&2
OBJDUMP=${LLVM_OBJDUMP:-llvm-objdump-19}
if command -v "$OBJDUMP" >/dev/null 2>&1; then
    for what in "-h" "-d --no-show-raw-insn -r"; do
        # shellcheck disable=SC2086
        "$OBJDUMP" $what "$committed" >"$work/committed.txt" 2>&1 || true
        # shellcheck disable=SC2086
        "$OBJDUMP" $what "$work/rebuilt.o" >"$work/rebuilt.txt" 2>&1 || true
        sed -i 1,2d "$work/committed.txt" "$work/rebuilt.txt"
        echo "--- $OBJDUMP $what (committed vs rebuilt)" >&2
        diff -u "$work/committed.txt" "$work/rebuilt.txt" >&2 || true
    done
fi
if command -v bpftool >/dev/null 2>&1; then
    bpftool btf dump file "$committed" >"$work/committed.btf" 2>&1 || true
    bpftool btf dump file "$work/rebuilt.o" >"$work/rebuilt.btf" 2>&1 || true
    echo "--- bpftool btf dump (committed vs rebuilt)" >&2
    diff -u "$work/committed.btf" "$work/rebuilt.btf" >&2 || true
fi
echo "check.sh: if the sources changed, run ebpf/build.sh and commit the object" >&2
exit 1
