#!/usr/bin/env bash
# Consumer groups' benchmarks (issue 14, acceptance 6), as recorded in bench/RESULTS.md: events/s
# through one group with 1, 4 and 16 members (a backlog consumed), latency from a write's
# acknowledgement to its delivery and to its ack applied (a live open-loop writer), and the cost
# of transactional acks (plain and txn runs as interleaved pairs, so that the shared machine's
# background load hits both alike). Each run gets its own `ordo playground` process (3 groups x 3
# replicas + 3 config + router), whose CPU the bench reads (--server-pids).
#
#   bench/groups.sh [OUT]     # PARTS="backlog live jetstream" narrows it
#
# jetstream: the backlog test on NATS JetStream (bench/nats.sh, `ordo-bench --features nats`),
# pull consumers sharing one durable consumer; the default PARTS leave it out.
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
if [[ " $PARTS " == *" jetstream "* ]]; then
    cargo build --release --quiet -p ordo-bench --features nats
else
    cargo build --release --quiet -p ordo-bench
fi
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

# jetstream <name>: the backlog test on a fresh 3-node NATS JetStream cluster (bench/nats.sh).
jetstream() {
    local name=$1
    stop_playground
    NATS_BENCH_DIR="$OUT/nats" bench/nats.sh start >/dev/null
    local cmd="$BENCH jetstream -s $(bench/nats.sh urls) --server-pids $(bench/nats.sh pids) \
--members $MEMBERS --events $EVENTS --subjects $SHARD_KEYS --credits $CREDITS --json $OUT/$name.json"
    echo "+ $cmd" | tee -a "$OUT/commands.txt" >&2
    $cmd >"$OUT/$name.txt" 2>&1 || { cat "$OUT/$name.txt" >&2; bench/nats.sh stop; exit 1; }
    bench/nats.sh stop 2>/dev/null
    grep -E '^jetstream ' "$OUT/$name.txt" >&2 || true
}

# Repetitions outermost, so that every part and ack mode of one repetition runs close in time.
for rep in $(seq 1 "$REPS"); do
    for part in $PARTS; do
        case $part in
            backlog)
                for ack in $ACKS; do
                    bench "backlog-$ack-$rep" --phase backlog --ack "$ack" --events "$EVENTS"
                done ;;
            live)
                for ack in $ACKS; do
                    bench "live-$ack-$rep" --phase live --ack "$ack" --rate "$RATE" \
                        --duration "$DURATION" --warmup "$WARMUP"
                done ;;
            jetstream) jetstream "jetstream-$rep" ;;
            *) echo "unknown part $part" >&2; exit 1 ;;
        esac
    done
done
stop_playground
grep -h '^groups \|^jetstream ' "$OUT"/*.txt >"$OUT/summary.txt"
python3 bench/groups-table.py "$OUT" | tee "$OUT/tables.md"
echo "reports in $OUT" >&2
