#!/usr/bin/env bash
# The gateway at its descriptor limit: started under `ulimit -n 256` (through
# a wrapper given as SPLICEGATE_BIN; prlimit on a running gateway would not
# bind the accepts io_uring already armed). While every descriptor is taken
# it stops accepting or answers OVERLOADED, never crashes, and serves again
# within a second once descriptors free up. Bounded: about 20 s.
source "$(dirname "$0")/lib.sh"
NOFILE="${SG_GATEWAY_NOFILE:-256}"
build
WRAP="$OUT/splicegate-nofile-$NOFILE"
cat >"$WRAP" <<WRAPPER
#!/bin/sh
ulimit -n $NOFILE
exec "$ROOT/target/debug/splicegate" "\$@"
WRAPPER
chmod +x "$WRAP"
export SPLICEGATE_BIN="$WRAP"
run_fault descriptors::descriptor_exhaustion 120
