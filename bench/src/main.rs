//! `ordo-bench`: a closed-loop load generator for Ordo's KV API.
//!
//! `--clients` tasks share one [`ordo::client::Client`] (which finds and follows the leader) and
//! each sends requests back to back for `--warmup` plus `--duration`. Only requests that start
//! after the warm-up are measured; a request still running when the duration ends is waited for
//! and counted, and the measured time runs until the last one finished. Latencies of successful
//! requests go into per-task HDR histograms (microseconds) that are merged at the end; failed
//! requests are counted by gRPC code.
//!
//! Layout: [`workload`] decides what to send (op mix, keys, values), [`report`] records and
//! summarises, and this file parses arguments and drives the tasks.

mod report;
mod workload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use clap::Parser;
use ordo::client::Client;
use tokio::time::Instant;

use report::{Recorder, Report, RunInfo};
use workload::{KeyChooser, Op, Workload, XorShift64};

#[derive(Parser, Debug)]
#[command(
    name = "ordo-bench",
    version,
    about = "Closed-loop load generator for the Ordo key-value store",
    after_help = "\
Every request touches the root item (key \"\") of shard key order-<n>, n uniform in 0..--keys. \
Durations take a unit (us, ms, s, m, h); a bare number is seconds."
)]
struct Args {
    /// Node addresses (host:port or http://host:port), comma-separated or repeated. The leader is
    /// found from any of them.
    #[arg(
        long,
        short = 'e',
        env = "ORDO_ENDPOINT",
        value_delimiter = ',',
        required = true
    )]
    endpoints: Vec<String>,

    /// Concurrent closed-loop clients (tasks), each with one request in flight.
    #[arg(long, short = 'c', default_value_t = 16)]
    clients: usize,

    /// How long to measure, after the warm-up.
    #[arg(long, short = 'd', default_value = "10s", value_parser = parse_duration)]
    duration: Duration,

    /// How long to send load before measuring; these requests are not reported.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,

    /// Bytes per written value.
    #[arg(long, default_value_t = 128)]
    value_size: usize,

    /// Number of distinct records (shard keys order-0 .. order-<keys-1>).
    #[arg(long, default_value_t = 100_000)]
    keys: u64,

    /// Request mix: put, get (linearizable) or mixed (50% each).
    #[arg(long, short = 'w', value_enum, default_value_t = Workload::Put)]
    workload: Workload,

    /// Seed of the key and value generators; the same seed sends the same requests.
    #[arg(long, default_value_t = 1)]
    seed: u64,

    /// Deadline of each request, the client's retries included.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,

    /// Runtime worker threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,

    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,

    /// Do not print the per-second progress lines on stderr.
    #[arg(long, short = 'q')]
    quiet: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.clients > 0, "--clients must be at least 1");
    ensure!(!args.duration.is_zero(), "--duration must be above zero");
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = args.threads {
        ensure!(threads > 0, "--threads must be at least 1");
        runtime.worker_threads(threads);
    }
    let report = runtime
        .build()
        .context("starting the runtime")?
        .block_on(run(&args))?;

    print!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, report.json())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Counters the progress printer reads while the tasks run.
#[derive(Default)]
struct Progress {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// What every task needs, shared.
struct Plan {
    client: Client,
    workload: Workload,
    keys: KeyChooser,
    value: Bytes,
    seed: u64,
    measure_from: Instant,
    stop_at: Instant,
    progress: Progress,
}

async fn run(args: &Args) -> anyhow::Result<Report> {
    let client = Client::connect(args.endpoints.clone())?.with_timeout(args.timeout);
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let plan = Arc::new(Plan {
        client,
        workload: args.workload,
        keys: KeyChooser::uniform(args.keys)?,
        value: workload::value(args.value_size, args.seed),
        seed: args.seed,
        measure_from,
        stop_at: measure_from + args.duration,
        progress: Progress::default(),
    });

    let tasks: Vec<_> = (0..args.clients)
        .map(|id| tokio::spawn(client_loop(plan.clone(), id as u64)))
        .collect();
    let printer = (!args.quiet).then(|| tokio::spawn(print_progress(plan.clone(), start)));

    let mut merged = Recorder::default();
    for task in tasks {
        merged.merge(&task.await.context("a client task panicked")?);
    }
    let elapsed = Instant::now().saturating_duration_since(measure_from);
    if let Some(printer) = printer {
        printer.abort();
    }
    if let Some(leader) = plan.client.leader() {
        eprintln!("leader at the end: {leader}");
    }
    if merged.ops.is_empty() {
        bail!("no request was measured (is --duration too short?)");
    }

    let info = RunInfo {
        workload: args.workload.name().to_string(),
        endpoints: plan.client.endpoints().to_vec(),
        clients: args.clients,
        duration: args.duration,
        warmup: args.warmup,
        value_size: args.value_size,
        keys: args.keys,
        seed: args.seed,
    };
    Ok(Report::new(info, elapsed, &merged))
}

/// One closed-loop client: sends the next request as soon as the previous one answered.
async fn client_loop(plan: Arc<Plan>, id: u64) -> Recorder {
    let mut rng = XorShift64::new(plan.seed, id);
    let mut recorder = Recorder::default();
    loop {
        let began = Instant::now();
        if began >= plan.stop_at {
            break;
        }
        let op = plan.workload.next_op(&mut rng);
        let shard_key = workload::shard_key(plan.keys.next(&mut rng));
        let result = match op {
            Op::Put => plan
                .client
                .put(shard_key, Bytes::new(), plan.value.clone(), None)
                .await
                .map(drop),
            Op::Get => plan
                .client
                .get(shard_key, Bytes::new(), false)
                .await
                .map(drop),
        };
        if began < plan.measure_from {
            continue;
        }
        let latency = began.elapsed();
        let stats = recorder.op(op);
        match result {
            Ok(()) => {
                stats.record_ok(latency);
                plan.progress.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(status) => {
                stats.record_err(status.code());
                plan.progress.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    recorder
}

/// Prints the measured successes and failures of every second to stderr.
async fn print_progress(plan: Arc<Plan>, start: Instant) {
    let mut tick = tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    let (mut ok_before, mut failed_before) = (0, 0);
    loop {
        let now = tick.tick().await;
        let ok = plan.progress.ok.load(Ordering::Relaxed);
        let failed = plan.progress.failed.load(Ordering::Relaxed);
        let phase = if now <= plan.measure_from {
            "warm-up"
        } else {
            "measure"
        };
        eprintln!(
            "[{:>4}s {phase}] {} ok/s, {} failed/s",
            now.duration_since(start).as_secs(),
            ok - ok_before,
            failed - failed_before
        );
        (ok_before, failed_before) = (ok, failed);
    }
}

/// Parses `10s`, `500ms`, `250us`, `2m`, `1h`, `1.5s`; a bare number is seconds.
fn parse_duration(raw: &str) -> anyhow::Result<Duration> {
    let s = raw.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    ensure!(!number.is_empty(), "duration {raw:?} has no number");
    let value: f64 = number
        .parse()
        .with_context(|| format!("duration {raw:?}: {number:?} is not a number"))?;
    let seconds_per_unit = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => bail!("duration {raw:?}: unknown unit {other:?} (use us, ms, s, m or h)"),
    };
    Duration::try_from_secs_f64(value * seconds_per_unit)
        .with_context(|| format!("duration {raw:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_and_without_units() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration(" 2s ").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        for bad in ["", "s", "ten", "10x", "-1s", "1.2.3s", "1e400"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn arguments_parse() {
        let args = Args::try_parse_from([
            "ordo-bench",
            "--endpoints",
            "127.0.0.1:7101,127.0.0.1:7102",
            "--clients",
            "4",
            "--duration",
            "20s",
            "--warmup",
            "0",
            "--workload",
            "mixed",
            "--json",
            "/tmp/out.json",
        ])
        .unwrap();
        assert_eq!(args.endpoints, ["127.0.0.1:7101", "127.0.0.1:7102"]);
        assert_eq!(args.clients, 4);
        assert_eq!(args.duration, Duration::from_secs(20));
        assert_eq!(args.warmup, Duration::ZERO);
        assert_eq!(args.workload, Workload::Mixed);
        assert_eq!(args.keys, 100_000);
        assert_eq!(args.value_size, 128);
        assert!(Args::try_parse_from(["ordo-bench", "--workload", "scan", "-e", "a:1"]).is_err());
    }
}
