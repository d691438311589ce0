#!/usr/bin/env bash
# 10,000 idle client connections and 200 slowloris attackers while a
# well-behaved client keeps its p99 within 2 x its unloaded value. The test
# process holds ~10,300 sockets: raise its soft limit (the hard limit here
# is 20,000). Bounded: about 60 s.
source "$(dirname "$0")/lib.sh"
ulimit -n 20000
build
run_fault load::ten_thousand_idle_and_slowloris 300
