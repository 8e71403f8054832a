#!/usr/bin/env bash
# The change feed's benchmarks (issue 13, acceptance 5 and 7), as recorded in bench/RESULTS.md.
# Every comparison runs as interleaved pairs (A, B, A, B, ...) so that the shared machine's
# background load hits both sides alike. Each run gets its own `ordo playground` process (3 groups
# x 3 replicas + 3 config + router), whose CPU and RSS the bench reads (--server-pids).
#
#   bench/feed.sh [OUT]      # all parts; PARTS="capture latency follower catchup stall" narrows it
#
# Knobs: DURATION (10s), WARMUP (2s), CLIENTS (16), REPS (2), BACKLOG (1000000 events), RATE (the
# open-loop latency runs' ops/s: 100, below what the shared 2-core machine sustains).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-bench/out/feed-$(date -u +%Y%m%d-%H%M%S)}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CLIENTS=${CLIENTS:-16}
REPS=${REPS:-2}
BACKLOG=${BACKLOG:-1000000}
RATE=${RATE:-100}
PARTS=${PARTS:-"capture latency follower catchup stall"}
PORT=${PORT:-19000}
mkdir -p "$OUT"

cargo build --release --quiet -p ordo --bin ordo
cargo build --release --quiet -p ordo-bench
BENCH=${CARGO_TARGET_DIR:-target}/release/ordo-bench
ORDO=${CARGO_TARGET_DIR:-target}/release/ordo

PG=""
stop_playground() {
    if [[ -n $PG ]]; then
        kill -INT "$PG" 2>/dev/null || true
        wait "$PG" 2>/dev/null || true
        PG=""
    fi
    rm -rf "$OUT/data"
}
trap stop_playground EXIT

# start_playground <capture>: a fresh playground on $PORT; its pid in $PG.
start_playground() {
    stop_playground
    "$ORDO" playground --port "$PORT" --dir "$OUT/data" --feed-capture "$1" \
        >"$OUT/playground.out" 2>"$OUT/playground.log" &
    PG=$!
    for _ in $(seq 1 600); do
        grep -q '^Router:' "$OUT/playground.out" 2>/dev/null && return
        kill -0 "$PG" 2>/dev/null || { cat "$OUT/playground.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "the playground did not start" >&2
    exit 1
}

# bench <name> <clients> <args...>: one run against the playground, its report in
# $OUT/<name>.{json,txt}.
bench() {
    local name=$1 clients=$2
    shift 2
    local timing=""
    [[ " $* " == *" --duration "* ]] || timing="--duration $DURATION"
    [[ " $* " == *" --warmup "* ]] || timing="$timing --warmup $WARMUP"
    local cmd="$BENCH -e 127.0.0.1:$PORT --server-pids $PG --clients $clients $timing --quiet --out $OUT/plots --json $OUT/$name.json $*"
    echo "+ $cmd" | tee -a "$OUT/commands.txt" >&2
    $cmd >"$OUT/$name.txt" 2>&1 || { cat "$OUT/$name.txt" >&2; exit 1; }
    grep -E '^(all|order_|update|read) |^cpu:|^memory:|^feed' "$OUT/$name.txt" >&2 || true
}

for part in $PARTS; do
    case $part in
        capture)
            # Write cost of capture: off, new, old-and-new, interleaved, per workload.
            for w in orders a; do
                for rep in $(seq 1 "$REPS"); do
                    for c in off new old-and-new; do
                        start_playground "$c"
                        bench "capture-$w-$c-$rep" "$CLIENTS" --workload "$w"
                    done
                done
            done
            ;;
        latency)
            # Write acknowledged -> event received through the router's Feed.Watch.
            for rep in $(seq 1 "$REPS"); do
                start_playground new
                bench "latency-orders-closed-$rep" "$CLIENTS" --workload orders --feed-latency
                start_playground new
                bench "latency-orders-rate$RATE-$rep" "$CLIENTS" --workload orders --feed-latency \
                    --rate "$RATE"
            done
            ;;
        follower)
            # Orders with and without the latency watcher (one Watch of every slot, from now,
            # read as fast as it comes): what an active reader costs the writers.
            for rep in $(seq 1 "$REPS"); do
                start_playground new
                bench "follower-without-$rep" "$CLIENTS" --workload orders
                start_playground new
                bench "follower-with-$rep" "$CLIENTS" --workload orders --feed-latency
            done
            ;;
        catchup)
            # One watcher reading a log of $BACKLOG events from the oldest.
            for rep in $(seq 1 "$REPS"); do
                start_playground new
                bench "catchup-$rep" 64 --workload orders --feed-backlog "$BACKLOG" --feed-catch-up \
                    --duration 2s --warmup 0s
            done
            ;;
        stall)
            # Orders with and without a watcher stalled $BACKLOG events behind, one playground.
            start_playground new
            bench "stall-backlog" 64 --workload orders --feed-backlog "$BACKLOG" \
                --duration 2s --warmup 0s
            for rep in $(seq 1 "$REPS"); do
                bench "stall-without-$rep" "$CLIENTS" --workload orders
                bench "stall-with-$rep" "$CLIENTS" --workload orders --feed-stall
            done
            ;;
        *) echo "unknown part $part" >&2; exit 1 ;;
    esac
done
stop_playground
python3 bench/feed-table.py "$OUT" $PARTS | tee "$OUT/tables.md"
echo "reports in $OUT" >&2
