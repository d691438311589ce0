#!/usr/bin/env bash
# Key rotation and package pause by SIGHUP under load: the next request
# sees the change; another package's tunnels are never cut. About 10 s.
source "$(dirname "$0")/lib.sh"
build
run_fault reload::rotation_and_pause_under_load 120
