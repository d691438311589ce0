#!/usr/bin/env bash
# A node that never answers SYN: its address lives in a network namespace
# with no route back, behind a veth whose far end drops every frame. Needs
# root (ip netns). Always removes the namespace and the veth.
# Bounded: about 20 s.
source "$(dirname "$0")/lib.sh"
NS="sg-blackhole-$$"
HOST_IF="sgbh$$"
NS_IF="sgbn$$"
NET="10.250.$(( $$ % 250 ))"
cleanup() {
    ip netns del "$NS" 2>/dev/null || true
    ip link del "$HOST_IF" 2>/dev/null || true
}
trap cleanup EXIT INT TERM
[ "$(id -u)" -eq 0 ] || { echo "blackhole.sh needs root (network namespaces)"; exit 2; }
build
ip netns add "$NS"
ip link add "$HOST_IF" type veth peer name "$NS_IF"
ip link set "$NS_IF" netns "$NS"
ip addr add "$NET.1/30" dev "$HOST_IF"
ip link set "$HOST_IF" up
# Inside: the node's address as a /32 with no route back, so nothing there
# can answer (not even a RST) ...
ip -n "$NS" addr add "$NET.2/32" dev "$NS_IF"
ip -n "$NS" link set "$NS_IF" up
# ... and the host sends its frames to a MAC no one has, so the far end of
# the veth drops them: SYNs vanish, no RST, no ICMP, no ARP failure.
ip neigh replace "$NET.2" lladdr 02:00:5e:00:53:01 dev "$HOST_IF" nud permanent
export SG_BLACKHOLE_ADDR="$NET.2:8080"
echo "   blackhole: $SG_BLACKHOLE_ADDR in namespace $NS ($HOST_IF <-> $NS_IF)"
run_fault nodes::blackholed_node 180
