#!/usr/bin/env bash
# A 3-member etcd cluster on loopback, for comparing Ordo with etcd in ordo-bench.
#
#   bench/etcd.sh [start]   install Debian's etcd-server if missing, start 3 members in the
#                           background, wait until they serve, print the client endpoints
#   bench/etcd.sh stop      kill the members and remove their data
#   bench/etcd.sh status    show the members' pids and endpoints
#
# Member i (1..3) listens for clients on 127.0.0.1:$((BASE_PORT + 2*(i-1))) and for peers on the
# next port (defaults: clients 23791, 23793, 23795; peers 23792, 23794, 23796). Data and logs live
# in $ETCD_BENCH_DIR (default: a fresh temp dir, remembered in /tmp/ordo-bench-etcd.state).
#
# Then, for example:
#   cargo run --release -p ordo-bench -- --target etcd://$(bench/etcd.sh endpoints) \
#       --workload a --clients 16 --duration 5s --server-pids $(bench/etcd.sh pids)
set -euo pipefail

BASE_PORT=${ETCD_BENCH_BASE_PORT:-23791}
STATE=${ETCD_BENCH_STATE:-/tmp/ordo-bench-etcd.state}
TOKEN=ordo-bench-etcd

client_port() { echo $((BASE_PORT + 2 * ($1 - 1))); }
peer_port() { echo $((BASE_PORT + 2 * ($1 - 1) + 1)); }

endpoints() {
    local eps=()
    for i in 1 2 3; do eps+=("127.0.0.1:$(client_port "$i")"); done
    (IFS=,; echo "${eps[*]}")
}

state_dir() {
    [[ -f $STATE ]] && cat "$STATE"
}

pids() {
    local dir
    dir=$(state_dir) || return 0
    local out=()
    for i in 1 2 3; do
        if [[ -f $dir/etcd-$i.pid ]]; then
            local pid
            pid=$(cat "$dir/etcd-$i.pid")
            kill -0 "$pid" 2>/dev/null && out+=("$pid")
        fi
    done
    (IFS=,; echo "${out[*]}")
}

install() {
    local missing=()
    command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    if [[ ${#missing[@]} -eq 0 ]]; then
        return
    fi
    echo "installing Debian's ${missing[*]}" >&2
    local sudo=
    [[ $(id -u) -eq 0 ]] || sudo=sudo
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
}

start() {
    install
    if [[ -n $(pids) ]]; then
        echo "already running (pids $(pids)); '$0 stop' first" >&2
        exit 1
    fi
    local dir=${ETCD_BENCH_DIR:-$(mktemp -d /tmp/ordo-bench-etcd.XXXXXX)}
    mkdir -p "$dir"
    echo "$dir" >"$STATE"
    local cluster=()
    for i in 1 2 3; do cluster+=("m$i=http://127.0.0.1:$(peer_port "$i")"); done
    cluster=$(IFS=,; echo "${cluster[*]}")
    for i in 1 2 3; do
        local cp pp
        cp=$(client_port "$i")
        pp=$(peer_port "$i")
        # setsid: the members outlive this script and its terminal.
        setsid etcd \
            --name "m$i" \
            --data-dir "$dir/m$i" \
            --listen-client-urls "http://127.0.0.1:$cp" \
            --advertise-client-urls "http://127.0.0.1:$cp" \
            --listen-peer-urls "http://127.0.0.1:$pp" \
            --initial-advertise-peer-urls "http://127.0.0.1:$pp" \
            --initial-cluster "$cluster" \
            --initial-cluster-token "$TOKEN" \
            --initial-cluster-state new \
            >"$dir/etcd-$i.log" 2>&1 </dev/null &
        echo $! >"$dir/etcd-$i.pid"
    done
    # Wait until every member answers its health endpoint (a leader is elected).
    for i in 1 2 3; do
        local ok=
        for _ in $(seq 1 100); do
            if curl -fsS "http://127.0.0.1:$(client_port "$i")/health" 2>/dev/null | grep -q '"health":"true"'; then
                ok=1
                break
            fi
            sleep 0.2
        done
        if [[ -z $ok ]]; then
            echo "member m$i did not become healthy; log: $dir/etcd-$i.log" >&2
            tail -n 20 "$dir/etcd-$i.log" >&2 || true
            exit 1
        fi
    done
    echo "etcd cluster up: pids $(pids), data and logs in $dir" >&2
    echo "client endpoints: $(endpoints)" >&2
    endpoints
}

stop() {
    local dir
    if ! dir=$(state_dir); then
        echo "not running (no $STATE)" >&2
        return 0
    fi
    for i in 1 2 3; do
        if [[ -f $dir/etcd-$i.pid ]]; then
            local pid
            pid=$(cat "$dir/etcd-$i.pid")
            kill "$pid" 2>/dev/null || true
        fi
    done
    for i in 1 2 3; do
        if [[ -f $dir/etcd-$i.pid ]]; then
            local pid
            pid=$(cat "$dir/etcd-$i.pid")
            for _ in $(seq 1 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$dir"
    rm -f "$STATE"
    echo "etcd cluster stopped, $dir removed" >&2
}

case ${1:-start} in
start) start ;;
stop) stop ;;
status)
    if [[ -n $(pids) ]]; then
        echo "running: pids $(pids), endpoints $(endpoints), dir $(state_dir)"
    else
        echo "not running"
    fi
    ;;
endpoints) endpoints ;;
pids) pids ;;
*)
    echo "usage: $0 [start|stop|status|endpoints|pids]" >&2
    exit 2
    ;;
esac
