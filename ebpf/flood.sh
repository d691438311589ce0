#!/bin/sh
# SYN-flood measurement for the kernel enforcement (issue 6): in two network
# namespaces this creates and deletes (veth pair, 10.200.x.0/24 on its ends
# only), hping3 floods a listener from one spoofed address for 5 s per
# scenario -- no program, native XDP, TC (tcx), generic XDP -- while a
# well-behaved client from another address connects every 20 ms. Prints, per
# scenario, the flood rate, the listener process's CPU, the machine's CPU
# (softirq included), and the client's p50/p99/max connect latency.
#
#   sudo ebpf/flood.sh            (root; needs hping3, python3, iproute2)
#
# Bounded: about 30 s of measurement; the whole run is cut at 10 minutes.
set -eu
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "flood.sh: run as root (namespaces, raw sockets, BPF)" >&2
    exit 2
fi
if ! command -v hping3 >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hping3 >/dev/null
fi
for tool in hping3 python3 ip ss; do
    command -v "$tool" >/dev/null 2>&1 || { echo "flood.sh: $tool not found (apt-get install -y hping3 python3 iproute2)" >&2; exit 2; }
done
exec timeout 600 cargo test -p splicegate-ebpf --release --lib -- \
    --ignored --exact tests::flood::flood_measurement --nocapture --test-threads=1
