#!/usr/bin/env bash
# Consumer groups' benchmarks (issue 14, acceptance 6), as recorded in bench/RESULTS.md: events/s
# through one group with 1, 4 and 16 members (a backlog consumed), latency from a write's
# acknowledgement to its delivery and to its ack applied (a live open-loop writer), and the cost
# of transactional acks (plain and txn runs as interleaved pairs, so that the shared machine's
# background load hits both alike). Each run gets its own `ordo playground` process (3 groups x 3
# replicas + 3 config + router), whose CPU the bench reads (--server-pids).
#
#   bench/groups.sh [OUT]     # PARTS="backlog live" narrows it
#
# Knobs: REPS (2), MEMBERS (1,4,16), EVENTS (20000), SHARD_KEYS (1000), CREDITS (64), RATE (the
# live phase's writes/s: 200), DURATION (10s), WARMUP (2s), ACKS ("plain txn").
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-bench/out/groups-$(date -u +%Y%m%d-%H%M%S)}
REPS=${REPS:-2}
MEMBERS=${MEMBERS:-1,4,16}
EVENTS=${EVENTS:-20000}
SHARD_KEYS=${SHARD_KEYS:-1000}
CREDITS=${CREDITS:-64}
RATE=${RATE:-200}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
ACKS=${ACKS:-"plain txn"}
PARTS=${PARTS:-"backlog live"}
PORT=${PORT:-19100}
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

# start_playground: a fresh playground on $PORT; its pid in $PG.
start_playground() {
    stop_playground
    "$ORDO" playground --port "$PORT" --dir "$OUT/data" \
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

# bench <name> <args...>: one run against a fresh playground, its report in $OUT/<name>.{json,txt}.
bench() {
    local name=$1
    shift
    start_playground
    local cmd="$BENCH groups -e 127.0.0.1:$PORT --server-pids $PG --members $MEMBERS \
--shard-keys $SHARD_KEYS --credits $CREDITS --json $OUT/$name.json $*"
    echo "+ $cmd" | tee -a "$OUT/commands.txt" >&2
    $cmd >"$OUT/$name.txt" 2>&1 || { cat "$OUT/$name.txt" >&2; exit 1; }
    grep -E '^groups ' "$OUT/$name.txt" >&2 || true
}

for part in $PARTS; do
    for rep in $(seq 1 "$REPS"); do
        for ack in $ACKS; do
            case $part in
                backlog)
                    bench "backlog-$ack-$rep" --phase backlog --ack "$ack" --events "$EVENTS" ;;
                live)
                    bench "live-$ack-$rep" --phase live --ack "$ack" --rate "$RATE" \
                        --duration "$DURATION" --warmup "$WARMUP" ;;
                *) echo "unknown part $part" >&2; exit 1 ;;
            esac
        done
    done
done
stop_playground
grep -h '^groups ' "$OUT"/*.txt | tee "$OUT/summary.txt"
echo "reports in $OUT" >&2
