//! Recording results while the load runs, and turning them into the final table and JSON.
//!
//! Each task owns a [`Recorder`] (no sharing on the hot path for the totals); per-second results
//! go into one shared [`Timeline`] (a short lock per request). At the end the recorders are
//! merged and summarised into a [`Report`], which prints as a table, serialises as JSON and feeds
//! the plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::feed::FeedReport;
use crate::workload::Op;

/// Significant decimal digits the latency histograms keep (0.1% relative error).
const SIGFIG: u8 = 3;
/// The per-second histograms are coarser (1%): there are many of them.
const TIMELINE_SIGFIG: u8 = 2;
/// Highest latency the histograms track, in microseconds (one hour); longer ones count as this.
const LATENCY_US_MAX: u64 = 3_600 * 1_000_000;
/// The percentiles of the distribution plot and of the JSON `percentiles`.
pub const SPECTRUM: [f64; 13] = [
    0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0,
];

fn histogram(sigfig: u8) -> Histogram<u64> {
    // Fixed bounds: `saturating_record` clamps rather than resizes.
    Histogram::new_with_bounds(1, LATENCY_US_MAX, sigfig).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Results of one op type.
#[derive(Clone, Debug)]
pub struct OpStats {
    /// Microseconds per successful request: from the intended start in open loop (corrected for
    /// coordinated omission), the service time in closed loop.
    pub latency_us: Histogram<u64>,
    /// Microseconds per successful request from when it was actually sent.
    pub service_us: Histogram<u64>,
    /// Failed requests by kind (gRPC code name or bench outcome, see `ops`).
    pub errors: BTreeMap<String, u64>,
}

impl OpStats {
    pub fn new() -> OpStats {
        OpStats {
            latency_us: histogram(SIGFIG),
            service_us: histogram(SIGFIG),
            errors: BTreeMap::new(),
        }
    }

    pub fn record_ok(&mut self, latency: Duration, service: Duration) {
        self.latency_us.saturating_record(micros(latency));
        self.service_us.saturating_record(micros(service));
    }

    pub fn record_err(&mut self, kind: &str) {
        *self.errors.entry(kind.to_string()).or_default() += 1;
    }

    pub fn merge(&mut self, other: &OpStats) {
        self.latency_us
            .add(&other.latency_us)
            .expect("histograms of equal bounds merge");
        self.service_us
            .add(&other.service_us)
            .expect("histograms of equal bounds merge");
        for (kind, n) in &other.errors {
            *self.errors.entry(kind.clone()).or_default() += n;
        }
    }
}

impl Default for OpStats {
    fn default() -> Self {
        OpStats::new()
    }
}

/// What one task measured, per op type.
#[derive(Clone, Debug, Default)]
pub struct Recorder {
    pub ops: BTreeMap<Op, OpStats>,
}

impl Recorder {
    pub fn op(&mut self, op: Op) -> &mut OpStats {
        self.ops.entry(op).or_default()
    }

    pub fn merge(&mut self, other: &Recorder) {
        for (op, stats) in &other.ops {
            self.op(*op).merge(stats);
        }
    }
}

/// One op type in one second: a histogram while the second may still get results, then only its
/// summary (so a long run keeps a few numbers per second, not a histogram).
#[derive(Clone, Debug)]
enum Slot {
    Live {
        latency_us: Box<Histogram<u64>>,
        errors: u64,
    },
    Done(Point),
}

impl Slot {
    fn summary(&self, t: u64) -> Point {
        match self {
            Slot::Done(p) => p.clone(),
            Slot::Live { latency_us, errors } => {
                let h = latency_us;
                let ms = |us: u64| (!h.is_empty()).then(|| round3(us as f64 / 1000.0));
                Point {
                    t,
                    ops: h.len(),
                    errors: *errors,
                    p50_ms: ms(h.value_at_quantile(0.5)),
                    p99_ms: ms(h.value_at_quantile(0.99)),
                    max_ms: ms(h.max()),
                }
            }
        }
    }
}

/// Per-second results of the measured period, by op, keyed by the second the request finished.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    seconds: Vec<BTreeMap<Op, Slot>>,
    /// Seconds before this one are summarised.
    summarised: usize,
}

/// One op type in one second, summarised.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Point {
    /// Seconds since the measurement started (the second `[t, t+1)`).
    pub t: u64,
    pub ops: u64,
    pub errors: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// Seconds the timeline keeps at most (a day); later results land in the last second.
const TIMELINE_SECONDS_MAX: usize = 86_400;
/// A second is summarised once results arrive this many seconds after it (requests are recorded
/// as they finish, so late arrivals for an older second are a matter of microseconds).
const SUMMARISE_AFTER: usize = 3;

impl Timeline {
    /// Records one request that finished during second `second`; `latency` is `None` on failure.
    pub fn record(&mut self, second: u64, op: Op, latency: Option<Duration>) {
        let i = (second as usize).min(TIMELINE_SECONDS_MAX - 1);
        if self.seconds.len() <= i {
            self.seconds.resize_with(i + 1, BTreeMap::new);
        }
        while self.summarised + SUMMARISE_AFTER <= i {
            let t = self.summarised;
            for slot in self.seconds[t].values_mut() {
                *slot = Slot::Done(slot.summary(t as u64));
            }
            self.summarised += 1;
        }
        let slot = self.seconds[i].entry(op).or_insert_with(|| Slot::Live {
            latency_us: Box::new(histogram(TIMELINE_SIGFIG)),
            errors: 0,
        });
        match slot {
            Slot::Live { latency_us, errors } => match latency {
                Some(l) => latency_us.saturating_record(micros(l)),
                None => *errors += 1,
            },
            // A straggler for a summarised second: count it, its latency is left out.
            Slot::Done(p) => match latency {
                Some(_) => p.ops += 1,
                None => p.errors += 1,
            },
        }
    }

    /// Per op, one point per second (seconds without that op's requests included as zeros).
    pub fn points(&self) -> BTreeMap<Op, Vec<Point>> {
        let mut out: BTreeMap<Op, Vec<Point>> = BTreeMap::new();
        let ops: Vec<Op> = Op::ALL
            .into_iter()
            .filter(|op| self.seconds.iter().any(|s| s.contains_key(op)))
            .collect();
        for (t, second) in self.seconds.iter().enumerate() {
            let t = t as u64;
            for &op in &ops {
                let point = match second.get(&op) {
                    Some(slot) => slot.summary(t),
                    None => Point {
                        t,
                        ops: 0,
                        errors: 0,
                        p50_ms: None,
                        p99_ms: None,
                        max_ms: None,
                    },
                };
                out.entry(op).or_default().push(point);
            }
        }
        out
    }
}

/// The parameters of a run, echoed in the report so that results carry their context.
#[derive(Clone, Debug, Serialize)]
pub struct RunInfo {
    pub workload: String,
    pub mix: String,
    pub distribution: String,
    /// `ordo`, `ordo-playground` or `etcd`.
    pub target: String,
    pub endpoints: Vec<String>,
    pub clients: usize,
    /// `closed` or `open`.
    pub pacing: String,
    /// Requests per second asked for (open loop).
    pub rate_ops_s: Option<f64>,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub value_size: usize,
    pub records: u64,
    pub items_per_shard: u64,
    pub order_items: u32,
    /// Prefix of the order IDs (`<prefix>o<n>`), for `--no-load --order-prefix` reruns.
    pub order_prefix: String,
    pub seed: u64,
}

/// CPU time spent during the measured period.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CpuInfo {
    /// This process (the bench, plus the cluster when it runs in-process with `--playground`).
    pub bench_cpu_s: f64,
    /// The server's CPU: the bench process itself with `--playground`, the `--server-pids`
    /// otherwise; `None` when unknown.
    pub server_cpu_s: Option<f64>,
    /// Where `server_cpu_s` comes from.
    pub server_source: String,
    /// `server_cpu_s` per 1,000 successful requests.
    pub server_cpu_s_per_1k_ops: Option<f64>,
    /// `bench_cpu_s` per 1,000 successful requests.
    pub bench_cpu_s_per_1k_ops: Option<f64>,
}

/// One line of the result table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    pub op: String,
    /// Successful requests.
    pub ops: u64,
    /// Failed requests (every kind).
    pub failed: u64,
    pub throughput_ops_s: f64,
    /// Latency percentiles in milliseconds; `None` when no request succeeded.
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p99_9_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub mean_ms: Option<f64>,
    /// p50 / p99 of the service time (from the actual send), which equals the latency in closed
    /// loop and shows what coordinated omission would have hidden in open loop.
    pub service_p50_ms: Option<f64>,
    pub service_p99_ms: Option<f64>,
    pub errors: BTreeMap<String, u64>,
    /// The latency distribution: the latency at each percentile of [`SPECTRUM`].
    pub percentiles: Vec<Percentile>,
}

/// One point of a latency distribution.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Percentile {
    pub percentile: f64,
    pub ms: f64,
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

impl Row {
    fn new(op: &str, stats: &OpStats, elapsed: Duration) -> Row {
        let h = &stats.latency_us;
        let s = &stats.service_us;
        let ops = h.len();
        let ms = |us: u64| (ops > 0).then(|| round3(us as f64 / 1000.0));
        let secs = elapsed.as_secs_f64();
        let percentiles = if ops > 0 {
            SPECTRUM
                .iter()
                .map(|&p| {
                    let us = if p >= 100.0 {
                        h.max()
                    } else {
                        h.value_at_percentile(p)
                    };
                    Percentile {
                        percentile: p,
                        ms: round3(us as f64 / 1000.0),
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        Row {
            op: op.to_string(),
            ops,
            failed: stats.errors.values().sum(),
            throughput_ops_s: if secs > 0.0 {
                round3(ops as f64 / secs)
            } else {
                0.0
            },
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p99_9_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: (ops > 0).then(|| round3(h.mean() / 1000.0)),
            service_p50_ms: ms(s.value_at_quantile(0.50)),
            service_p99_ms: ms(s.value_at_quantile(0.99)),
            errors: stats.errors.clone(),
            percentiles,
        }
    }
}

/// The summary of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub config: RunInfo,
    /// Seconds from the end of the warm-up until the last task stopped.
    pub elapsed_s: f64,
    /// One row per op type that ran, plus `all` when there were several.
    pub results: Vec<Row>,
    pub cpu: CpuInfo,
    /// Open loop: requests that were due before the end but never sent because the workers were
    /// that far behind (a sign that `--clients` is too low for `--rate`, or the target saturated).
    pub unsent: u64,
    /// Per op, per second of the measured period.
    pub timeline: BTreeMap<String, Vec<Point>>,
    /// Resident memory of the server over the measured period, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    /// What the `--feed-*` options measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feed: Option<FeedReport>,
}

/// Resident set size (VmRSS) of the server, sampled every `RSS_SAMPLE_INTERVAL` of the
/// measured period.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Memory {
    /// The bench process with `--playground`, else the `--server-pids` (summed).
    pub source: String,
    pub start_mib: f64,
    pub max_mib: f64,
    pub end_mib: f64,
}

impl Report {
    pub fn new(
        config: RunInfo,
        elapsed: Duration,
        merged: &Recorder,
        timeline: &Timeline,
        cpu: CpuInfo,
        unsent: u64,
    ) -> Report {
        let mut results: Vec<Row> = Op::ALL
            .iter()
            .filter_map(|op| merged.ops.get(op).map(|s| Row::new(op.name(), s, elapsed)))
            .collect();
        if results.len() > 1 {
            let mut all = OpStats::new();
            for stats in merged.ops.values() {
                all.merge(stats);
            }
            results.push(Row::new("all", &all, elapsed));
        }
        Report {
            config,
            elapsed_s: round3(elapsed.as_secs_f64()),
            results,
            cpu,
            unsent,
            timeline: timeline
                .points()
                .into_iter()
                .map(|(op, points)| (op.name().to_string(), points))
                .collect(),
            memory: None,
            feed: None,
        }
    }

    /// Successful requests over all ops.
    pub fn total_ops(&self) -> u64 {
        self.results
            .iter()
            .filter(|r| r.op != "all")
            .map(|r| r.ops)
            .sum()
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let i = &self.config;
        let mut out = String::new();
        let pacing = match i.rate_ops_s {
            Some(rate) => format!("open loop at {rate} ops/s over {} workers", i.clients),
            None => format!("closed loop, {} clients", i.clients),
        };
        let _ = writeln!(
            out,
            "workload {} ({}, {}) against {} {}",
            i.workload,
            i.mix,
            i.distribution,
            i.target,
            i.endpoints.join(",")
        );
        let _ = writeln!(
            out,
            "{pacing}; {:.2} s measured after {:.2} s warm-up; {} records, {}-byte values, seed {}",
            self.elapsed_s, i.warmup_s, i.records, i.value_size, i.seed
        );
        let _ = writeln!(
            out,
            "{:<13} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}  errors",
            "op", "ops", "ops/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        );
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
        for r in &self.results {
            let errors = if r.errors.is_empty() {
                "0".to_string()
            } else {
                r.errors
                    .iter()
                    .map(|(kind, n)| format!("{kind}={n}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let _ = writeln!(
                out,
                "{:<13} {:>9} {:>10.1} {:>9} {:>9} {:>9} {:>9} {:>9}  {}",
                r.op,
                r.ops,
                r.throughput_ops_s,
                ms(r.p50_ms),
                ms(r.p90_ms),
                ms(r.p99_ms),
                ms(r.p99_9_ms),
                ms(r.max_ms),
                errors
            );
        }
        let c = &self.cpu;
        let per_k = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
        match c.server_cpu_s {
            Some(server) => {
                let _ = writeln!(
                    out,
                    "cpu: server {server:.2} s ({}), {} cpu-s per 1,000 ops; bench process {:.2} s",
                    c.server_source,
                    per_k(c.server_cpu_s_per_1k_ops),
                    c.bench_cpu_s
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "cpu: bench process {:.2} s, {} cpu-s per 1,000 ops (server unknown: pass \
                     --server-pids)",
                    c.bench_cpu_s,
                    per_k(c.bench_cpu_s_per_1k_ops)
                );
            }
        }
        if let Some(m) = &self.memory {
            let _ = writeln!(
                out,
                "memory: server RSS {:.1} MiB at the start, {:.1} MiB max, {:.1} MiB at the end ({})",
                m.start_mib, m.max_mib, m.end_mib, m.source
            );
        }
        if let Some(f) = &self.feed {
            out.push_str(&f.lines());
        }
        if i.rate_ops_s.is_some() {
            let _ = writeln!(
                out,
                "latency is measured from each request's intended start (coordinated-omission \
                 corrected); {} due requests were never sent",
                self.unsent
            );
        }
        out
    }

    /// The report as JSON.
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serialises") + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn info() -> RunInfo {
        RunInfo {
            workload: "a".into(),
            mix: "read=50,update=50".into(),
            distribution: "zipfian".into(),
            target: "ordo".into(),
            endpoints: vec!["127.0.0.1:1".into(), "a\"b".into()],
            clients: 2,
            pacing: "closed".into(),
            rate_ops_s: None,
            duration_s: 10.0,
            warmup_s: 2.0,
            value_size: 128,
            records: 100,
            items_per_shard: 10,
            order_items: 3,
            order_prefix: "r1-".into(),
            seed: 1,
        }
    }

    fn json_percentile(ps: &[Percentile], p: f64) -> f64 {
        ps.iter().find(|x| x.percentile == p).unwrap().ms
    }

    fn sample() -> Report {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        let mut timeline = Timeline::default();
        for ms in 1..=100 {
            let d = Duration::from_millis(ms);
            a.op(Op::Update).record_ok(d, d / 2);
            timeline.record(ms / 50, Op::Update, Some(d));
        }
        b.op(Op::Update).record_err("Unavailable");
        b.op(Op::Update).record_err("Unavailable");
        b.op(Op::Read)
            .record_ok(Duration::from_micros(500), Duration::from_micros(500));
        b.op(Op::Read).record_err("NotFound");
        timeline.record(1, Op::Read, None);
        a.merge(&b);
        let cpu = CpuInfo {
            bench_cpu_s: 3.0,
            server_cpu_s: Some(3.0),
            server_source: "in-process playground".into(),
            server_cpu_s_per_1k_ops: Some(29.7),
            bench_cpu_s_per_1k_ops: Some(29.7),
        };
        Report::new(info(), Duration::from_secs(10), &a, &timeline, cpu, 0)
    }

    #[test]
    fn recorders_merge_and_summarise() {
        let report = sample();
        let names: Vec<&str> = report.results.iter().map(|r| r.op.as_str()).collect();
        assert_eq!(names, ["read", "update", "all"]);
        let update = &report.results[1];
        assert_eq!(update.ops, 100);
        assert_eq!(update.failed, 2);
        assert!((update.throughput_ops_s - 10.0).abs() < 1e-9);
        assert!((update.p50_ms.unwrap() - 50.0).abs() < 0.1, "{update:?}");
        assert!((update.p99_ms.unwrap() - 99.0).abs() < 0.1, "{update:?}");
        assert!((update.max_ms.unwrap() - 100.0).abs() < 0.1, "{update:?}");
        assert!(
            (update.service_p50_ms.unwrap() - 25.0).abs() < 0.1,
            "{update:?}"
        );
        assert_eq!(update.errors.get("Unavailable"), Some(&2));
        assert_eq!(update.percentiles.len(), SPECTRUM.len());
        assert!(update.percentiles.windows(2).all(|w| w[0].ms <= w[1].ms));
        assert_eq!(
            json_percentile(&update.percentiles, 50.0),
            update.p50_ms.unwrap()
        );
        let all = &report.results[2];
        assert_eq!(all.ops, 101);
        assert_eq!(all.errors.values().sum::<u64>(), 3);
        assert_eq!(report.total_ops(), 101);
    }

    #[test]
    fn the_table_has_a_row_per_op() {
        let table = sample().table();
        let rows: Vec<&str> = table
            .lines()
            .filter(|l| {
                ["read ", "update ", "all "]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
            .collect();
        assert_eq!(rows.len(), 3, "{table}");
        assert!(table.contains("p99.9 ms"), "{table}");
        assert!(table.contains("Unavailable=2"), "{table}");
        assert!(table.contains("NotFound=1"), "{table}");
        assert!(table.contains("cpu-s per 1,000 ops"), "{table}");
    }

    #[test]
    fn the_json_parses_and_has_the_expected_fields() {
        let json: serde_json::Value = serde_json::from_str(&sample().json()).unwrap();
        assert_eq!(json["config"]["workload"], "a");
        assert_eq!(json["config"]["endpoints"][1], "a\"b");
        assert_eq!(json["elapsed_s"], 10.0);
        let results = json["results"].as_array().unwrap();
        assert_eq!(results.len(), 3);
        for field in [
            "op",
            "ops",
            "throughput_ops_s",
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "p99_9_ms",
            "max_ms",
            "errors",
            "percentiles",
        ] {
            assert!(results[1].get(field).is_some(), "missing {field}");
        }
        assert_eq!(results[1]["op"], "update");
        assert_eq!(results[1]["errors"]["Unavailable"], 2);
        assert_eq!(results[1]["percentiles"][0]["percentile"], 0.0);
        assert!(results[1]["percentiles"][12]["ms"].as_f64().unwrap() > 99.0);
        assert_eq!(json["cpu"]["server_cpu_s_per_1k_ops"], 29.7);
        let update = json["timeline"]["update"].as_array().unwrap();
        assert_eq!(update.len(), 3); // seconds 0, 1, 2
        assert_eq!(update[0]["ops"], 49);
        assert_eq!(json["timeline"]["read"][1]["errors"], 1);
        assert_eq!(
            json["timeline"]["read"][0]["p50_ms"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn old_seconds_are_summarised_without_changing_them() {
        let mut t = Timeline::default();
        for ms in 1..=100 {
            t.record(0, Op::Read, Some(Duration::from_millis(ms)));
        }
        t.record(0, Op::Read, None);
        let before = t.points()[&Op::Read][0].clone();
        assert_eq!(before.ops, 100);
        t.record(10, Op::Read, Some(Duration::from_millis(1)));
        assert_eq!(t.summarised, 8);
        assert!(matches!(t.seconds[0][&Op::Read], Slot::Done(_)));
        let points = &t.points()[&Op::Read];
        assert_eq!(points[0], before);
        assert_eq!(points.len(), 11);
        assert_eq!(points[5].ops, 0);
        // A straggler for a summarised second is still counted.
        t.record(0, Op::Read, None);
        assert_eq!(t.points()[&Op::Read][0].errors, 2);
    }

    #[test]
    fn a_run_without_successes_has_no_percentiles() {
        let mut r = Recorder::default();
        r.op(Op::Read).record_err("Unavailable");
        let report = Report::new(
            info(),
            Duration::from_secs(1),
            &r,
            &Timeline::default(),
            CpuInfo::default(),
            0,
        );
        assert_eq!(report.results.len(), 1);
        assert_eq!(report.results[0].p50_ms, None);
        assert!(report.json().contains("\"p50_ms\": null"));
        assert!(report.table().contains(" - "));
    }
}
