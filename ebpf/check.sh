#!/bin/sh
# Checks that the committed ebpf/bpf/splicegate.bpf.o is what its sources
# build to (CI runs this after installing clang-19, llvm-19, libbpf-dev and
# bpftool). Byte for byte is the first test; when the bytes differ (another
# point release of the toolchain), the programs' instructions and
# relocations, the section list and the BTF types (maps included) must be
# the same, and what differs is shown -- a stale object (rerun
# ebpf/build.sh and commit) fails.
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

# Bytes differ. A Debian point release of clang-19 may lay out the same
# object differently (string tables, section order, padding): what the
# kernel loads is the programs' instructions and relocations, the maps and
# the BTF types. When each of those matches, the object is the same program.
OBJDUMP=${LLVM_OBJDUMP:-llvm-objdump-19}
READELF=${LLVM_READELF:-llvm-readelf-19}
same=1
compare() { # name, then a command to run on each object
    name=$1
    shift
    "$@" "$committed" 2>&1 | sed "s|$committed|OBJ|g" >"$work/committed.$name" || true
    "$@" "$work/rebuilt.o" 2>&1 | sed "s|$work/rebuilt.o|OBJ|g" >"$work/rebuilt.$name" || true
    if ! diff -u "$work/committed.$name" "$work/rebuilt.$name" >"$work/diff.$name"; then
        same=0
        echo "--- $name differs (committed vs rebuilt)" >&2
        cat "$work/diff.$name" >&2
    fi
}
# Section names and types (not offsets or sizes, which move with layout).
sections() { "$READELF" -S -W "$1" | sed -n 's/^ *\[ *[0-9]*\] *//p' | awk '{print $1, $2}' | sort; }
if command -v "$OBJDUMP" >/dev/null 2>&1 && command -v "$READELF" >/dev/null 2>&1; then
    compare programs "$OBJDUMP" -d --no-show-raw-insn -r
    compare sections sections
else
    same=0
    echo "check.sh: $OBJDUMP or $READELF missing: cannot compare programs" >&2
fi
if command -v bpftool >/dev/null 2>&1; then
    compare btf bpftool btf dump file
else
    same=0
    echo "check.sh: bpftool missing: cannot compare BTF (apt-get install bpftool)" >&2
fi
if [ "$same" = 1 ]; then
    echo "check.sh: ok, $committed differs in bytes from a clang-19 rebuild, but its programs, relocations, sections, maps and BTF types are the same"
    exit 0
fi
echo "check.sh: FAIL: rebuilding $committed gives a different program" >&2
echo "check.sh: if the sources changed, run ebpf/build.sh and commit the object" >&2
exit 1
