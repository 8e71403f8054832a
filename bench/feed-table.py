#!/usr/bin/env python3
"""The tables of bench/RESULTS.md's change-feed section, from the JSON reports bench/feed.sh
wrote into OUT (one per run, named <part>-...-<rep>.json)."""
import glob
import json
import os
import sys

out = sys.argv[1]
WRITES = {"order_create", "order_advance", "update", "insert", "rmw", "txn1", "txn2"}


def load(name):
    return json.load(open(os.path.join(out, name + ".json")))


def runs(prefix):
    paths = sorted(glob.glob(os.path.join(out, prefix + "*.json")), key=os.path.getmtime)
    return [(os.path.basename(p)[: -len(".json")], json.load(open(p))) for p in paths]


def summary(d):
    rs = {r["op"]: r for r in d["results"]}
    total = rs.get("all") or next(iter(rs.values()))
    writes = sum(r["ops"] for op, r in rs.items() if op in WRITES)
    cpu = d["cpu"].get("server_cpu_s")
    slowest = [r for op, r in rs.items() if op != "all"]
    return {
        "ops_s": total["ops"] / d["elapsed_s"],
        "writes_s": writes / d["elapsed_s"],
        "p50": max(r["p50_ms"] for r in slowest),
        "p99": max(r["p99_ms"] for r in slowest),
        "cpu_per_1k_writes": cpu * 1000 / writes if cpu and writes else None,
        "cpu_per_1k_ops": d["cpu"].get("server_cpu_s_per_1k_ops"),
        "rss": d.get("memory"),
        "feed": d.get("feed"),
    }


def table(header):
    """A markdown table's header row and its separator."""
    print(header)
    print("|" + " --- |" * header.count("|", 1))


def fmt(v, spec=".0f"):
    return "-" if v is None else format(v, spec)


parts = sys.argv[2:] or ["capture", "latency", "follower", "catchup", "stall"]
if "capture" in parts:
    table("| run | workload | capture | ops/s | writes/s | p50 ms | p99 ms | server cpu-s / 1k writes | cpu-s / 1k ops |")
    for name, d in runs("capture-"):
        _, w, *cap, rep = name.split("-")
        s = summary(d)
        print(f"| {rep} | {w} | {'-'.join(cap)} | {fmt(s['ops_s'])} | {fmt(s['writes_s'])} | "
              f"{s['p50']:.2f} | {s['p99']:.2f} | {fmt(s['cpu_per_1k_writes'], '.3f')} | "
              f"{fmt(s['cpu_per_1k_ops'], '.3f')} |")
    print()
if "latency" in parts:
    table("| run | pacing | ops/s | events matched | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | before ack | missing |")
    for name, d in runs("latency-"):
        s = summary(d)
        l = s["feed"]["latency"]
        print(f"| {name} | {d['config']['pacing']} {fmt(d['config']['rate_ops_s'])} | {fmt(s['ops_s'])} | "
              f"{l['matched']} | {fmt(l['p50_ms'], '.1f')} | {fmt(l['p90_ms'], '.1f')} | "
              f"{fmt(l['p99_ms'], '.1f')} | {fmt(l['p99_9_ms'], '.1f')} | {fmt(l['max_ms'], '.1f')} | "
              f"{l['before_ack']} | {l['missing']} |")
    print()
if "follower" in parts:
    table("| run | latency watcher | ops/s | p50 ms | p99 ms | server cpu-s / 1k ops | event p50 / p99 ms |")
    for name, d in runs("follower-"):
        s = summary(d)
        l = (s["feed"] or {}).get("latency") if s["feed"] else None
        ev = f"{fmt(l['p50_ms'], '.1f')} / {fmt(l['p99_ms'], '.1f')}" if l else "-"
        print(f"| {name} | {'yes' if l else 'no'} | {fmt(s['ops_s'])} | {s['p50']:.2f} | "
              f"{s['p99']:.2f} | {fmt(s['cpu_per_1k_ops'], '.3f')} | {ev} |")
    print()
if "catchup" in parts:
    table("| run | backlog events (written in s) | events read | MB | seconds | events/s | MB/s | first event ms |")
    for name, d in runs("catchup-"):
        f = d["feed"]
        c = f["catch_up"]
        print(f"| {name} | {f['backlog_events']} ({f['backlog_s']:.0f} s) | {c['events']} | "
              f"{c['bytes'] / 1e6:.0f} | {c['seconds']:.1f} | {c['events_per_s']:.0f} | "
              f"{c['mb_per_s']:.2f} | {c['first_event_ms']:.0f} |")
    print()
if "stall" in parts:
    table("| run | stalled watcher | ops/s | p50 ms | p99 ms | RSS start / max / end MiB | stalled stream open at end |")
    for name, d in runs("stall-"):
        s = summary(d)
        m = s["rss"] or {}
        st = (s["feed"] or {}).get("stalled") if s["feed"] else None
        kind = "backlog" if "backlog" in name else ("yes" if st else "no")
        print(f"| {name} | {kind} | {fmt(s['ops_s'])} | {s['p50']:.2f} | {s['p99']:.2f} | "
              f"{m.get('start_mib')} / {m.get('max_mib')} / {m.get('end_mib')} | "
              f"{st['open_at_end'] if st else '-'} |")
