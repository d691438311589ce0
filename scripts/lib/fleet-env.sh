# Sourced by scripts/fleet-demo and scripts/fleet-bench: a redis-server and
# a PostgreSQL server of their own, on Unix sockets in a temporary
# directory (no TCP port), removed with everything else in `pids` on exit.
# Installs redis-server, PostgreSQL and curl when missing (Debian).
# Sets: dir (the directory), pgbin, pids (an array), as_pg (a function that
# runs a command as the postgres user when root).

sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v curl >/dev/null 2>&1 || need+=(curl)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # Debian starts their system services; these scripts run their own.
    $sudo systemctl disable --now redis-server >/dev/null 2>&1 || true
fi
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

dir=$(mktemp -d /tmp/splicegate-fleet.XXXXXX)
chmod 755 "$dir"
pids=()
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    as_pg "$pgbin/pg_ctl" -D "$dir/pg/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Redis, on a socket only.
redis-server --port 0 --unixsocket "$dir/redis.sock" --unixsocketperm 700 \
    --save "" --appendonly no --dir "$dir" >"$dir/redis.log" 2>&1 &
pids+=($!)

# PostgreSQL, on a socket only.
mkdir -p "$dir/pg"
[ "$(id -u)" -eq 0 ] && chown postgres:postgres "$dir/pg"
as_pg "$pgbin/initdb" -D "$dir/pg/data" -A trust -U postgres --no-sync -E UTF8 >/dev/null
as_pg "$pgbin/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/server.log" -w \
    -o "-k $dir/pg -c listen_addresses=" start >/dev/null

for _ in $(seq 100); do
    [ "$(redis-cli -s "$dir/redis.sock" ping 2>/dev/null)" = "PONG" ] && break
    sleep 0.05
done

field() { # field FILE KEY: the first address under KEY in a ready file
    python3 -c 'import json,sys; v=json.load(open(sys.argv[1]))[sys.argv[2]]; print(v[0] if isinstance(v, list) else v)' "$1" "$2"
}
