#!/usr/bin/env bash
# The comparison behind bench/RESULTS.md: Ordo (one group of 3 behind a router), the Ordo
# playground (3 groups x 3 behind a router), etcd (3 members) and NATS JetStream KV (3 servers, a
# bucket of 3 replicas, `sync_interval: always`), all on loopback on this machine, each an
# ordinary process, measured in one session with the same ordo-bench client.
#
#   bench/compare.sh [OUT_DIR]
#   WRITE_BENCH=1 bench/compare.sh [OUT_DIR]   issue 15's write path (below)
#
# Runs are interleaved (for each workload and client count: every target back to back) so that
# a change in the machine's background load hits all alike. Every row's command is printed with
# it. Tunables: DURATION (8s), WARMUP (2s), WORKLOADS ("update a c f orders"), CLIENTS
# ("1 16 64"), TARGETS ("ordo playground etcd"; `nats` is the fourth; `before` is an earlier
# build's ordo binary, ORDO_BEFORE=<path>, as one group), DISTRIBUTION (each
# workload's own), VALUE_SIZE (the bench's 128). The nats target runs the update workload only
# (a KV bucket has no scan or transaction, and its gets are direct gets any replica answers);
# with it, ordo-bench is built with --features nats. Binaries go to $CARGO_TARGET_DIR (target).
#
# WRITE_BENCH=1: issue 15's table, 100% puts of 256-byte values on uniform keys with 1/64/256
# clients against Ordo (one group), etcd and NATS; besides table.md it writes write-path.md
# with Ordo's throughput over each peer's and server CPU seconds per 1,000 writes. The same
# tunables still override the preset (e.g. TARGETS=nats CLIENTS="1 8" for a smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ${WRITE_BENCH:-} == 1 ]]; then
    WORKLOADS=${WORKLOADS:-update}
    CLIENTS=${CLIENTS:-"1 64 256"}
    TARGETS=${TARGETS:-"ordo etcd nats"}
    DISTRIBUTION=${DISTRIBUTION:-uniform}
    VALUE_SIZE=${VALUE_SIZE:-256}
fi
OUT=${1:-bench/out/compare-$(date -u +%Y%m%d-%H%M%S)}
DURATION=${DURATION:-8s}
WARMUP=${WARMUP:-2s}
WORKLOADS=${WORKLOADS:-"update a c f orders"}
CLIENTS=${CLIENTS:-"1 16 64"}
TARGETS=${TARGETS:-"ordo playground etcd"}
DISTRIBUTION=${DISTRIBUTION:-}
VALUE_SIZE=${VALUE_SIZE:-}
ORDO_PORT=${ORDO_PORT:-17000}
PG_PORT=${PG_PORT:-18000}
BEFORE_PORT=${BEFORE_PORT:-19000}
mkdir -p "$OUT"

has_target() { [[ " $TARGETS " == *" $1 "* ]]; }
BIN=${CARGO_TARGET_DIR:-target}/release
if has_target ordo || has_target playground; then
    cargo build --release --quiet -p ordo --bin ordo
fi
if has_target nats; then
    cargo build --release --quiet -p ordo-bench --features nats
else
    cargo build --release --quiet -p ordo-bench
fi
BENCH=$BIN/ordo-bench
ORDO=$BIN/ordo

PIDS=()
NATS_STARTED=
cleanup() {
    for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if has_target etcd; then bench/etcd.sh stop >/dev/null 2>&1 || true; fi
    # Only a cluster this run started: `nats.sh start` refuses to start over a running one.
    if [[ -n $NATS_STARTED ]]; then bench/nats.sh stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

# Starts `ordo playground` with the given groups on the given port; sets REPLY to its pid once its
# router serves (it prints the "Router:" line then).
start_playground() {
    local groups=$1 port=$2 bin=${3:-$ORDO} dir=$OUT/data-$1g-$2
    rm -rf "$dir"
    "$bin" playground --groups "$groups" --port "$port" --dir "$dir" \
        >"$OUT/playground-$port.out" 2>"$OUT/playground-$port.log" &
    local pid=$!
    PIDS+=("$pid")
    for _ in $(seq 1 600); do
        grep -q '^Router:' "$OUT/playground-$port.out" 2>/dev/null && { REPLY=$pid; return; }
        kill -0 "$pid" 2>/dev/null || { cat "$OUT/playground-$port.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "playground with $groups groups did not start" >&2
    exit 1
}

declare -A ENDPOINT SERVER_PIDS
for t in $TARGETS; do
    case $t in
        ordo) start_playground 1 "$ORDO_PORT"; ENDPOINT[$t]="-e 127.0.0.1:$ORDO_PORT"; SERVER_PIDS[$t]=$REPLY ;;
        playground) start_playground 3 "$PG_PORT"; ENDPOINT[$t]="-e 127.0.0.1:$PG_PORT"; SERVER_PIDS[$t]=$REPLY ;;
        # An earlier build's `ordo` (ORDO_BEFORE=path) as one group, for before/after figures.
        before)
            [[ -x ${ORDO_BEFORE:-} ]] || { echo "target before needs ORDO_BEFORE=<an ordo binary>" >&2; exit 1; }
            start_playground 1 "$BEFORE_PORT" "$ORDO_BEFORE"
            ENDPOINT[$t]="-e 127.0.0.1:$BEFORE_PORT"; SERVER_PIDS[$t]=$REPLY ;;
        etcd)
            bench/etcd.sh stop >/dev/null 2>&1 || true
            bench/etcd.sh start >&2
            ENDPOINT[$t]="--target etcd://$(bench/etcd.sh endpoints)"
            SERVER_PIDS[$t]=$(bench/etcd.sh pids)
            ;;
        nats)
            bench/nats.sh start >/dev/null
            NATS_STARTED=1
            urls=$(bench/nats.sh urls)
            ENDPOINT[$t]="--target nats://${urls//nats:\/\//}"
            SERVER_PIDS[$t]=$(bench/nats.sh pids)
            ;;
        *) echo "unknown target $t" >&2; exit 1 ;;
    esac
done

TABLE=$OUT/table.md
echo "| workload | clients | target | ops/s | p50 ms | p99 ms | p99.9 ms | cpu-s / 1k ops | errors |" >"$TABLE"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" >>"$TABLE"
for w in $WORKLOADS; do
    case $w in
        update) args="--workload a --mix update=100" ;;
        *) args="--workload $w" ;;
    esac
    [[ -z $DISTRIBUTION ]] || args+=" --distribution $DISTRIBUTION"
    [[ -z $VALUE_SIZE ]] || args+=" --value-size $VALUE_SIZE"
    if [[ $w != update ]] && has_target nats; then
        echo "skipping nats for workload $w: the NATS KV backend compares puts only (no scan or" \
            "txn, and its gets are direct gets that any replica may answer)" >&2
    fi
    for c in $CLIENTS; do
        for t in $TARGETS; do
            [[ $t != nats || $w == update ]] || continue
            json=$OUT/$w-$c-$t.json
            cmd="$BENCH ${ENDPOINT[$t]} $args --clients $c --duration $DURATION --warmup $WARMUP --server-pids ${SERVER_PIDS[$t]} --quiet --out $OUT --json $json"
            echo "+ $cmd" >&2
            $cmd >"$OUT/$w-$c-$t.txt" 2>&1 || { cat "$OUT/$w-$c-$t.txt" >&2; exit 1; }
            python3 - "$json" "$w" "$c" "$t" >>"$TABLE" <<'EOF'
import json, sys
path, w, c, t = sys.argv[1:]
d = json.load(open(path))
ops = sum(r["ops"] for r in d["results"])
failed = sum(r["failed"] for r in d["results"])
# The run's latency over all ops: the op with the most requests stands for the mix's percentiles
# only when there is one op; otherwise report the slowest op's figures.
rs = d["results"]
if len(rs) == 1:
    r = rs[0]
    p50, p99, p999 = r["p50_ms"], r["p99_ms"], r["p99_9_ms"]
else:
    p50 = max(r["p50_ms"] for r in rs)
    p99 = max(r["p99_ms"] for r in rs)
    p999 = max(r["p99_9_ms"] for r in rs)
cpu = d.get("cpu", {}) or {}
per_k = cpu.get("server_cpu_s_per_1k_ops") or cpu.get("cpu_s_per_1k_ops") or cpu.get("per_1k_ops")
per_k = f"{per_k:.3f}" if isinstance(per_k, (int, float)) else "?"
errs = {}
for r in rs:
    for k, v in r["errors"].items():
        errs[k] = errs.get(k, 0) + v
err = ", ".join(f"{k}={v}" for k, v in sorted(errs.items())) or "0"
print(f"| {w} | {c} | {t} | {ops / d['elapsed_s']:.0f} | {p50:.2f} | {p99:.2f} | {p999:.2f} | {per_k} | {err} |")
EOF
            tail -n 1 "$TABLE" >&2
        done
    done
done
echo "table: $TABLE" >&2
cat "$TABLE"
[[ ${WRITE_BENCH:-} == 1 ]] || exit 0

# Issue 15's table: per client count, each target's writes/s, Ordo's over it, latency and CPU.
WRITE_TABLE=$OUT/write-path.md
python3 - "$OUT" "$CLIENTS" "$TARGETS" "$VALUE_SIZE" "$DISTRIBUTION" >"$WRITE_TABLE" <<'EOF'
import json, os, sys
out, clients, targets, value_size, distribution = sys.argv[1:]
names = {"ordo": "Ordo (1 group x 3)", "playground": "Ordo (3 groups x 3)",
         "before": "Ordo before (1 group x 3, $ORDO_BEFORE)",
         "etcd": "etcd (3 members)", "nats": "NATS KV (3 replicas)"}
print(f"100% puts, {value_size or 128}-byte values, {distribution or 'zipfian'} keys, closed loop.\n")
print("| clients | target | writes/s | Ordo / target | p50 ms | p99 ms | server cpu-s / 1k writes | errors |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for c in clients.split():
    rows = {}
    for t in targets.split():
        path = f"{out}/update-{c}-{t}.json"
        if os.path.exists(path):
            d = json.load(open(path))
            r = d["results"][0]
            cpu = (d.get("cpu") or {}).get("server_cpu_s_per_1k_ops")
            rows[t] = (r["ops"] / d["elapsed_s"], r, cpu, sum(r["errors"].values()))
    ordo = rows["ordo"][0] if "ordo" in rows else None
    for t, (rate, r, cpu, errs) in rows.items():
        ratio = f"{ordo / rate:.2f}" if ordo and rate else "-"
        cpu = f"{cpu:.3f}" if isinstance(cpu, (int, float)) else "?"
        print(f"| {c} | {names.get(t, t)} | {rate:.0f} | {ratio} | {r['p50_ms']:.2f} "
              f"| {r['p99_ms']:.2f} | {cpu} | {errs} |")
EOF
echo "write-path table: $WRITE_TABLE" >&2
cat "$WRITE_TABLE"
