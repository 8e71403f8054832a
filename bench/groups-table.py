#!/usr/bin/env python3
"""The tables of bench/RESULTS.md's consumer-group section, from the JSON reports bench/groups.sh
wrote into OUT (backlog-<ack>-<rep>.json, live-<ack>-<rep>.json, jetstream-<rep>.json). Each
cell lists every repetition's figure, then their median."""
import glob
import json
import os
import statistics
import sys

out = sys.argv[1]


def runs(prefix):
    return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, prefix + "-*.json")))]


def cell(values, fmt="{:.0f}"):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    each = " / ".join(fmt.format(v) for v in values)
    if len(values) == 1:
        return each
    return f"{each} (median {fmt.format(statistics.median(values))})"


def table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()


def members_of(reports, key):
    return sorted({r["members"] for d in reports for r in d[key]})


def backlog():
    rows = []
    for ack in ("plain", "txn"):
        reports = runs(f"backlog-{ack}")
        for m in members_of(reports, "backlog"):
            rs = [r for d in reports for r in d["backlog"] if r["members"] == m]
            rows.append([
                ack, str(m),
                cell([r["events_per_s"] for r in rs]),
                cell([r["applied_events_per_s"] for r in rs]),
                cell([r["counts"]["redeliveries"] for r in rs]),
                cell([r["cpu_s_per_1000"] for r in rs], "{:.2f}"),
            ])
    for d in [runs("jetstream")]:
        for m in sorted({r["members"] for rep in d for r in rep}):
            rs = [r for rep in d for r in rep if r["members"] == m]
            rows.append([
                "JetStream", str(m),
                cell([r["events_per_s"] for r in rs]),
                cell([r["applied_events_per_s"] for r in rs]),
                cell([r["redeliveries"] for r in rs]),
                cell([r["cpu_s_per_1000"] for r in rs], "{:.2f}"),
            ])
    table(["acks", "members", "events/s (to the last ack)", "events/s (every ack applied)",
           "redeliveries", "server CPU s / 1000 events"], rows)


def live():
    rows = []
    for ack in ("plain", "txn"):
        reports = runs(f"live-{ack}")
        for m in members_of(reports, "live"):
            rs = [r for d in reports for r in d["live"] if r["members"] == m]
            applied = [r["ack_applied"] for r in rs if r["ack_applied"]]
            rows.append([
                ack, str(m),
                cell([r["delivered"]["p50_ms"] for r in rs], "{:.1f}"),
                cell([r["delivered"]["p99_ms"] for r in rs], "{:.1f}"),
                cell([a["p50_ms"] for a in applied], "{:.1f}"),
                cell([a["p99_ms"] for a in applied], "{:.1f}"),
                cell([r["delivered"]["missing"] for r in rs]),
            ])
    table(["acks", "members", "delivered p50 ms", "delivered p99 ms", "ack applied p50 ms",
           "ack applied p99 ms", "never delivered"], rows)


if __name__ == "__main__":
    backlog()
    live()
