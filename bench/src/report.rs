//! Recording results while the load runs, and turning them into the final table and JSON.
//!
//! Each task owns a [`Recorder`] (no sharing, no locks on the hot path); at the end they are
//! merged and summarised into a [`Report`], which prints as a table and serialises as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use tonic::Code;

use crate::workload::Op;

/// Significant decimal digits the latency histograms keep (0.1% relative error).
const SIGFIG: u8 = 3;
/// Highest latency the histograms track, in microseconds (one hour); longer ones count as this.
const LATENCY_US_MAX: u64 = 3_600 * 1_000_000;

/// Results of one op type: latencies of the successful requests, failures by gRPC code.
#[derive(Clone, Debug)]
pub struct OpStats {
    /// Microseconds per successful request.
    pub latency_us: Histogram<u64>,
    /// Failed requests by gRPC code name (`Unavailable`, `DeadlineExceeded`, ...).
    pub errors: BTreeMap<String, u64>,
}

impl OpStats {
    pub fn new() -> OpStats {
        OpStats {
            // Fixed bounds: `saturating_record` clamps rather than resizes, so the range must be
            // set up front.
            latency_us: Histogram::new_with_bounds(1, LATENCY_US_MAX, SIGFIG)
                .expect("valid histogram bounds"),
            errors: BTreeMap::new(),
        }
    }

    pub fn record_ok(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        self.latency_us.saturating_record(us);
    }

    pub fn record_err(&mut self, code: Code) {
        *self.errors.entry(format!("{code:?}")).or_default() += 1;
    }

    pub fn merge(&mut self, other: &OpStats) {
        self.latency_us
            .add(&other.latency_us)
            .expect("histograms of equal bounds merge");
        for (code, n) in &other.errors {
            *self.errors.entry(code.clone()).or_default() += n;
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

/// The parameters of a run, echoed in the report so that results carry their context.
#[derive(Clone, Debug)]
pub struct RunInfo {
    pub workload: String,
    pub endpoints: Vec<String>,
    pub clients: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub value_size: usize,
    pub keys: u64,
    pub seed: u64,
}

/// One line of the result table.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub op: String,
    /// Successful requests.
    pub ops: u64,
    pub throughput: f64,
    /// Latency percentiles in milliseconds; `None` when no request succeeded.
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub errors: BTreeMap<String, u64>,
}

impl Row {
    fn new(op: &str, stats: &OpStats, elapsed: Duration) -> Row {
        let h = &stats.latency_us;
        let ops = h.len();
        let ms = |us: u64| (ops > 0).then(|| us as f64 / 1000.0);
        let secs = elapsed.as_secs_f64();
        Row {
            op: op.to_string(),
            ops,
            throughput: if secs > 0.0 { ops as f64 / secs } else { 0.0 },
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            errors: stats.errors.clone(),
        }
    }
}

/// The summary of a run.
#[derive(Clone, Debug)]
pub struct Report {
    pub info: RunInfo,
    /// Time from the end of the warm-up until the last task stopped.
    pub elapsed: Duration,
    /// One row per op type that ran, plus `all` when there were several.
    pub rows: Vec<Row>,
}

impl Report {
    pub fn new(info: RunInfo, elapsed: Duration, merged: &Recorder) -> Report {
        let mut rows: Vec<Row> = Op::ALL
            .iter()
            .filter_map(|op| merged.ops.get(op).map(|s| Row::new(op.name(), s, elapsed)))
            .collect();
        if rows.len() > 1 {
            let mut all = OpStats::new();
            for stats in merged.ops.values() {
                all.merge(stats);
            }
            rows.push(Row::new("all", &all, elapsed));
        }
        Report {
            info,
            elapsed,
            rows,
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let i = &self.info;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "workload {}, {} clients, {:.2} s measured after {:.2} s warm-up, {}-byte values, \
             {} keys, seed {}",
            i.workload,
            i.clients,
            self.elapsed.as_secs_f64(),
            i.warmup.as_secs_f64(),
            i.value_size,
            i.keys,
            i.seed
        );
        let _ = writeln!(
            out,
            "{:<5} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}  errors",
            "op", "ops", "ops/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        );
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
        for r in &self.rows {
            let errors = if r.errors.is_empty() {
                "0".to_string()
            } else {
                r.errors
                    .iter()
                    .map(|(code, n)| format!("{code}={n}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let _ = writeln!(
                out,
                "{:<5} {:>10} {:>10.1} {:>9} {:>9} {:>9} {:>9} {:>9}  {}",
                r.op,
                r.ops,
                r.throughput,
                ms(r.p50_ms),
                ms(r.p90_ms),
                ms(r.p99_ms),
                ms(r.p999_ms),
                ms(r.max_ms),
                errors
            );
        }
        out
    }

    /// The same content as [`Report::table`], as a JSON document.
    pub fn json(&self) -> String {
        let i = &self.info;
        let endpoints = i
            .endpoints
            .iter()
            .map(|e| json_str(e))
            .collect::<Vec<_>>()
            .join(", ");
        let mut out = String::new();
        let _ = write!(
            out,
            "{{\n  \"config\": {{\"workload\": {}, \"endpoints\": [{}], \"clients\": {}, \
             \"duration_s\": {}, \"warmup_s\": {}, \"value_size\": {}, \"keys\": {}, \
             \"seed\": {}}},\n  \"elapsed_s\": {},\n  \"results\": [",
            json_str(&i.workload),
            endpoints,
            i.clients,
            json_f64(i.duration.as_secs_f64()),
            json_f64(i.warmup.as_secs_f64()),
            i.value_size,
            i.keys,
            i.seed,
            json_f64(self.elapsed.as_secs_f64()),
        );
        let opt = |v: Option<f64>| v.map_or_else(|| "null".to_string(), json_f64);
        for (n, r) in self.rows.iter().enumerate() {
            let errors = r
                .errors
                .iter()
                .map(|(code, n)| format!("{}: {n}", json_str(code)))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = write!(
                out,
                "{}\n    {{\"op\": {}, \"ops\": {}, \"throughput_ops_s\": {}, \"p50_ms\": {}, \
                 \"p90_ms\": {}, \"p99_ms\": {}, \"p99_9_ms\": {}, \"max_ms\": {}, \
                 \"errors\": {{{}}}}}",
                if n == 0 { "" } else { "," },
                json_str(&r.op),
                r.ops,
                json_f64(r.throughput),
                opt(r.p50_ms),
                opt(r.p90_ms),
                opt(r.p99_ms),
                opt(r.p999_ms),
                opt(r.max_ms),
                errors
            );
        }
        out.push_str("\n  ]\n}\n");
        out
    }
}

/// A JSON number (JSON has no NaN or infinity; those become `null`).
fn json_f64(v: f64) -> String {
    if v.is_finite() {
        format!("{}", (v * 1000.0).round() / 1000.0)
    } else {
        "null".to_string()
    }
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> RunInfo {
        RunInfo {
            workload: "mixed".into(),
            endpoints: vec!["127.0.0.1:1".into(), "a\"b".into()],
            clients: 2,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            value_size: 128,
            keys: 100,
            seed: 1,
        }
    }

    #[test]
    fn recorders_merge_and_summarise() {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        for ms in 1..=100 {
            a.op(Op::Put).record_ok(Duration::from_millis(ms));
        }
        b.op(Op::Put).record_err(Code::Unavailable);
        b.op(Op::Put).record_err(Code::Unavailable);
        b.op(Op::Get).record_ok(Duration::from_micros(500));
        b.op(Op::Get).record_err(Code::DeadlineExceeded);
        a.merge(&b);

        let report = Report::new(info(), Duration::from_secs(10), &a);
        let names: Vec<&str> = report.rows.iter().map(|r| r.op.as_str()).collect();
        assert_eq!(names, ["put", "get", "all"]);
        let put = &report.rows[0];
        assert_eq!(put.ops, 100);
        assert!((put.throughput - 10.0).abs() < 1e-9);
        assert!((put.p50_ms.unwrap() - 50.0).abs() < 0.1, "{put:?}");
        assert!((put.p99_ms.unwrap() - 99.0).abs() < 0.1, "{put:?}");
        assert!((put.max_ms.unwrap() - 100.0).abs() < 0.1, "{put:?}");
        assert_eq!(put.errors.get("Unavailable"), Some(&2));
        let all = &report.rows[2];
        assert_eq!(all.ops, 101);
        assert_eq!(all.errors.values().sum::<u64>(), 3);

        let table = report.table();
        assert!(table.contains("Unavailable=2"), "{table}");
        assert!(table.contains("DeadlineExceeded=1"), "{table}");

        let json = report.json();
        assert!(json.contains("\"op\": \"put\", \"ops\": 100"), "{json}");
        assert!(json.contains("\"errors\": {\"Unavailable\": 2}"), "{json}");
        assert!(json.contains("\"a\\\"b\""), "{json}");
    }

    #[test]
    fn a_run_without_successes_has_no_percentiles() {
        let mut r = Recorder::default();
        r.op(Op::Get).record_err(Code::Unavailable);
        let report = Report::new(info(), Duration::from_secs(1), &r);
        assert_eq!(report.rows.len(), 1);
        assert_eq!(report.rows[0].p50_ms, None);
        assert!(report.json().contains("\"p50_ms\": null"));
        assert!(report.table().contains(" - "));
    }
}
