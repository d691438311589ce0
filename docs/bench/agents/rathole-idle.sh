#!/bin/bash
# rathole's idle cost per connected client control channel, for comparison
# with splicegate-bench agents-idle: one rathole client with N services (one
# control channel each, TCP transport — TLS needs a PKCS#12 identity, see
# bench/src/peers.rs) to one server; the server's RSS before the client
# connects and once every channel is up (the server also keeps a pool of
# data channels per service, opened ahead by the client: counted too). Usage: rathole-idle.sh RATHOLE [N]
set -eu
RH=$1; N=${2:-4000}; HB=${HB:-30}
D=$(mktemp -d); trap 'kill $SP $CP 2>/dev/null; cp $D/*.log /tmp/agb/ 2>/dev/null; rm -rf $D' EXIT
ulimit -n 20000
base=20000   # below the ephemeral range: the client's own connections use it
{ echo "[server]"; echo "bind_addr = \"127.0.0.1:39999\""; echo "default_token = \"bench\""; echo "heartbeat_interval = $HB"
  for i in $(seq 1 $N); do echo "[server.services.s$i]"; echo "bind_addr = \"127.0.0.1:$((base+i))\""; done; } > $D/server.toml
{ echo "[client]"; echo "remote_addr = \"127.0.0.1:39999\""; echo "default_token = \"bench\""
  for i in $(seq 1 $N); do echo "[client.services.s$i]"; echo "local_addr = \"127.0.0.1:9\""; done; } > $D/client.toml
taskset -c 0 $RH --server $D/server.toml > $D/server.log 2>&1 & SP=$!
sleep 2; b=$(awk '/VmRSS/{print $2}' /proc/$SP/status)
taskset -c 1 $RH --client $D/client.toml > $D/client.log 2>&1 & CP=$!
for t in $(seq 1 120); do
  up=$(grep -c "Control channel established" $D/client.log || true)
  [ "$up" -ge "$N" ] && break; sleep 1
done
sleep 5
r=$(awk '/VmRSS/{print $2}' /proc/$SP/status)
c0=$(awk '{print $14+$15}' /proc/$SP/stat); sleep 60; c1=$(awk '{print $14+$15}' /proc/$SP/stat)
conns=$(ss -Htn state established '( sport = :39999 )' | wc -l)
echo "rathole server: $up control channels ($conns connections with the pooled data channels); RSS before ${b} KiB, with them ${r} KiB: $(( (r-b)/up )) KiB per service (its control channel and pooled data channels); CPU over 60 s: $(( c1-c0 )) ticks (heartbeat_interval $HB s); client RSS $(awk '/VmRSS/{print $2}' /proc/$CP/status) KiB"
