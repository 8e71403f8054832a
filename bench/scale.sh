#!/usr/bin/env bash
# Issue 15, acceptance 3: Ordo with many records. One 3-group playground (its own process, so
# that its RSS and disk are the server's alone):
#   1. load RECORDS records of 256 bytes (load rate), then 100% updates for 20 s (throughput);
#   2. disk and RSS;
#   3. stop (SIGINT) and start again: time until the router serves, then 10 s of updates;
#   4. start a 4th group (3 `ordo node` processes), register it and rebalance onto it while
#      16 clients update for 60 s: time of the rebalance, then disk and RSS again.
#
#   bench/scale.sh OUT            env: RECORDS (1000000), CLIENTS (64), CACHE_MB (64, per
#                                 replica), COPY_BYTES_PER_SEC (33554432), PORT (17000)
# Needs target/release/{ordo,ordoctl,ordo-bench} (CARGO_TARGET_DIR honoured); writes OUT/scale.md.
set -euo pipefail
OUT=${1:?usage: bench/scale.sh OUT}
RECORDS=${RECORDS:-1000000}
CLIENTS=${CLIENTS:-64}
CACHE_MB=${CACHE_MB:-64}
COPY=${COPY_BYTES_PER_SEC:-33554432}
PORT=${PORT:-17000}
BIN=${CARGO_TARGET_DIR:-$(dirname "$0")/../target}/release
rm -rf "$OUT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
rss_mib() { ps -o rss= -p "$@" | awk '{s += $1} END {printf "%.0f", s / 1024}'; }
disk_mb() { du -sb "$1" | awk '{printf "%.0f", $1 / 1e6}'; }
md() { echo "$*" | tee -a "$OUT/scale.md"; }

# Starts the playground in the background; sets PG; waits (bounded) until its router serves.
start_playground() {
  "$BIN/ordo" playground --groups 3 --port "$PORT" --dir "$OUT/data" --cache-mb "$CACHE_MB" \
    >"$OUT/pg-$1.out" 2>"$OUT/pg-$1.log" &
  PG=$!
  PIDS+=("$PG")
  for _ in $(seq 1 1200); do
    grep -q '^Router:' "$OUT/pg-$1.out" 2>/dev/null && return 0
    kill -0 "$PG" 2>/dev/null || { echo "playground exited: see $OUT/pg-$1.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "playground did not serve within 120 s" >&2
  exit 1
}

# bench LABEL DURATION [args...]: 100% updates of 256 B over the RECORDS records.
bench() {
  local label=$1 dur=$2
  shift 2
  # Not --quiet: the load phase's "loaded N records in T s" line is wanted (no progress bars off a
  # terminal).
  "$BIN/ordo-bench" -e "127.0.0.1:$PORT" --workload a --mix update=100 --distribution uniform \
    --value-size 256 --records "$RECORDS" --duration "$dur" --warmup 2s \
    --server-pids "$(IFS=,; echo "${PIDS[*]}")" --json "$OUT/$label.json" "$@" >"$OUT/$label.txt" 2>&1
  python3 - "$OUT/$label.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); r = d["results"][0]
cpu = (d.get("cpu") or {}).get("server_cpu_s_per_1k_ops")
print(f"{r['ops'] / d['elapsed_s']:.0f} updates/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
      f"{cpu if cpu is None else round(cpu, 3)} cpu-s/1k, errors {r['errors']}")
PY
}

raw_mb=$((RECORDS * 256 * 3 / 1000000))
md "# Scale run: $RECORDS records of 256 B, 3 groups x 3 replicas, --cache-mb $CACHE_MB, $CLIENTS clients"
md ""
md "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(date -u +%FT%TZ); commit $(git -C "$(dirname "$0")" rev-parse --short HEAD)"
md ""
start_playground 1
md "- load + 20 s of updates: $(bench run1 20s --clients "$CLIENTS")"
grep -E '^loaded' "$OUT/run1.txt" | sed 's/^/  - /' | tee -a "$OUT/scale.md" || true
md "- disk $(disk_mb "$OUT/data") MB for $raw_mb MB of replicated values ($((RECORDS * 256 / 1000000)) MB x 3); RSS $(rss_mib "$PG") MiB"

kill -INT "$PG"
wait "$PG" || true
PIDS=()
t0=$(now)
start_playground 2
md "- restart: the router served $(since "$t0") s after the start"
md "- after the restart, 10 s of updates: $(bench run2 10s --clients "$CLIENTS" --no-load)"

for r in 1 2 3; do
  "$BIN/ordo" node --id "$r" --group 4 --listen "127.0.0.1:$((PORT + 40 + r))" \
    --peers "1=127.0.0.1:$((PORT + 41)),2=127.0.0.1:$((PORT + 42)),3=127.0.0.1:$((PORT + 43))" \
    --data-dir "$OUT/data/group-4/node-$r" --cache-mb "$CACHE_MB" >"$OUT/g4-$r.log" 2>&1 &
  PIDS+=("$!")
done
CFG="127.0.0.1:$((PORT + 1)),127.0.0.1:$((PORT + 2)),127.0.0.1:$((PORT + 3))"
G4="127.0.0.1:$((PORT + 41)),127.0.0.1:$((PORT + 42)),127.0.0.1:$((PORT + 43))"
added=
for _ in $(seq 1 100); do # the new group may not have elected its leader yet
  if "$BIN/ordoctl" -e "$CFG" group add --id 4 --replicas "$G4" >"$OUT/group-add.txt" 2>&1; then
    added=1
    break
  fi
  sleep 0.2
done
[[ -n $added ]] || { echo "group 4 was not registered in 20 s: see $OUT/group-add.txt" >&2; exit 1; }
bench during 60s --clients 16 --no-load >"$OUT/during.summary" &
BENCH_PID=$!
sleep 5
t0=$(now)
"$BIN/ordoctl" -e "$CFG" --timeout 60s rebalance --copy-bytes-per-sec "$COPY" >"$OUT/rebalance.txt" 2>&1
md "- rebalance onto a 4th group (copy bound $((COPY >> 20)) MiB/s, 16 clients updating): $(since "$t0") s"
# Its progress lines end in carriage returns; keep the final table (id, state, pause per move).
tr '\r' '\n' <"$OUT/rebalance.txt" | grep -vE '^ *task [0-9]+ \(' | grep -E '^ *(id|[0-9]+) ' \
  | sed 's/^/      /' | tee -a "$OUT/scale.md" || true
wait "$BENCH_PID" || true
md "- the 60 s of updates around it: $(cat "$OUT/during.summary")"
md "- after it: disk $(disk_mb "$OUT/data") MB; RSS $(rss_mib "${PIDS[@]}") MiB (playground + 3 nodes)"
