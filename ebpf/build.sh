#!/bin/sh
# Rebuilds the committed BPF object ebpf/bpf/splicegate.bpf.o from
# ebpf/bpf/splicegate.bpf.c and abi.h, reproducibly (ebpf/check.sh compares).
#
#   ebpf/build.sh [OUTPUT]      default OUTPUT: ebpf/bpf/splicegate.bpf.o
#
# Needs Debian 12's clang-19 and llvm-19 (llvm-strip-19) and libbpf-dev
# (bpf_helpers.h): apt-get install -y clang-19 llvm-19 libbpf-dev
# Override the tools with CLANG=... LLVM_STRIP=... (the committed object was
# built with the versions printed below; another version may emit other bytes).
#
# Reproducibility: the compiler sees only paths relative to ebpf/bpf (and the
# system include directories), -ffile-prefix-map maps the directory to "." in
# what remains, -fno-ident leaves out the compiler's version string, and the
# DWARF sections are stripped (aya needs only .BTF/.BTF.ext, and DWARF would
# record line numbers of the system headers). The result depends only on the
# sources, clang-19, and the libbpf-dev and linux-libc-dev headers.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
src="$here/bpf"
out=${1:-"$src/splicegate.bpf.o"}
case "$out" in /*) ;; *) out="$(pwd)/$out" ;; esac
CLANG=${CLANG:-clang-19}
LLVM_STRIP=${LLVM_STRIP:-llvm-strip-19}

for tool in "$CLANG" "$LLVM_STRIP"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "build.sh: $tool not found (apt-get install -y clang-19 llvm-19 libbpf-dev)" >&2
        exit 2
    fi
done

tmp=$(mktemp "${TMPDIR:-/tmp}/splicegate.bpf.XXXXXX")
trap 'rm -f "$tmp"' EXIT

cd "$src"
"$CLANG" -O2 -g -target bpf -D__TARGET_ARCH_x86 \
    -I/usr/include/x86_64-linux-gnu \
    -Wall -Wextra -Werror \
    -fno-ident \
    -ffile-prefix-map="$src"=. -fdebug-prefix-map="$src"=. \
    -c splicegate.bpf.c -o "$tmp"
"$LLVM_STRIP" --strip-debug "$tmp"
chmod 0644 "$tmp"
mv "$tmp" "$out"
trap - EXIT

echo "built $out with $("$CLANG" --version | head -n1)" >&2
