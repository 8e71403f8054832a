//! `ordo-bench`: a load generator for Ordo (and, for comparison, etcd).
//!
//! * Workloads: YCSB core A–F and `orders` (an order system's aggregate creates, status CAS and
//!   reads), see [`workload`] and [`ops`].
//! * Pacing: closed loop (`--clients` workers, one request in flight each) or open loop at
//!   `--rate` ops/s with latency measured from each request's intended start, see [`schedule`].
//! * Targets: an Ordo router or group (`--endpoints`), an in-process cluster (`--playground`), or
//!   etcd (`--target etcd://host:port,...`), see [`backend`].
//! * Output: a live progress bar, a table per op, a JSON report and an SVG plot, see [`report`]
//!   and [`plot`]; CPU seconds per 1,000 ops, see [`cpu`].
//!
//! A run: optional load phase (inserts `--records` records, or creates that many orders; not
//! measured), then `--warmup` of load that is not measured, then `--duration` measured. A request
//! still running when the duration ends is waited for and counted; the measured time runs until
//! the last one finished.

mod backend;
mod cpu;
mod ops;
mod plot;
mod report;
mod schedule;
mod workload;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use ordo::client::Client;
use ordo::playground::{Playground, PlaygroundConfig};
use tokio::time::Instant;

use backend::{Backend, Etcd};
use ops::{Draw, World};
use report::{CpuInfo, Recorder, Report, RunInfo, Timeline};
use schedule::Pacing;
use workload::{Distribution, KeyChooser, Layout, Mix, Workload, XorShift64};

#[derive(Parser, Debug)]
#[command(
    name = "ordo-bench",
    version,
    about = "Load generator for the Ordo key-value store: YCSB A-F and an order-system workload, \
             closed or open loop, against Ordo, an in-process playground or etcd",
    after_help = "\
Examples:
  ordo-bench --playground --workload orders --clients 16 --duration 20s
  ordo-bench -e 127.0.0.1:7000 --workload a --rate 2000 --clients 64
  ordo-bench --target etcd://127.0.0.1:2379,127.0.0.1:22379 --workload a --server-pids 11,12,13

Durations take a unit (us, ms, s, m, h); a bare number is seconds. Error kinds in the table are \
gRPC codes, or Conflict (a version compare failed), NotFound (the chosen record or order is \
missing), Terminal (the order is already delivered), NoRecords (nothing to choose from yet), \
MissingItems (an order read without all its line items)."
)]
struct Args {
    /// Ordo addresses (a router, or the nodes of one group), comma-separated or repeated.
    #[arg(
        long,
        short = 'e',
        alias = "endpoint",
        env = "ORDO_ENDPOINT",
        value_delimiter = ','
    )]
    endpoints: Vec<String>,

    /// Another target instead of --endpoints: `etcd://host:port[,host:port...]` (etcd v3 gRPC)
    /// or `ordo://host:port[,...]`.
    #[arg(long, conflicts_with_all = ["endpoints", "playground"])]
    target: Option<String>,

    /// Start a local Ordo cluster in-process (temp dir, free ports) and run against its router.
    #[arg(long, conflicts_with = "endpoints")]
    playground: bool,

    /// Shard groups of the --playground cluster (`--groups 1`: one group behind a router).
    #[arg(long, default_value_t = 3)]
    groups: u64,

    /// Replicas per group of the --playground cluster.
    #[arg(long, default_value_t = 3)]
    replicas: u64,

    /// The workload: YCSB core a-f, orders, or txn (2-record Txns in one group and across two).
    #[arg(long, short = 'w', value_enum, default_value_t = Workload::A)]
    workload: Workload,

    /// Override the workload's op mix, e.g. `read=90,update=10` or, for orders,
    /// `create=20,advance=50,read=30`. Ops: read, update, insert, scan, rmw, order_create,
    /// order_advance, order_read.
    #[arg(long)]
    mix: Option<Mix>,

    /// Override the workload's key distribution.
    #[arg(long, value_enum)]
    distribution: Option<Distribution>,

    /// Concurrent workers (closed loop: clients, each with one request in flight; open loop:
    /// senders the rate is spread over).
    #[arg(long, short = 'c', default_value_t = 16)]
    clients: usize,

    /// Open loop: send this many requests per second in total, on a fixed schedule, and measure
    /// latency from each request's intended start. Without it: closed loop.
    #[arg(long)]
    rate: Option<f64>,

    /// How long to measure, after the warm-up.
    #[arg(long, short = 'd', default_value = "10s", value_parser = parse_duration)]
    duration: Duration,

    /// With --playground: this long into the measurement, start one more group, register it
    /// and rebalance onto it (online resharding) while the load runs; the moves, their pauses
    /// and the rebalance window are printed with the report.
    #[arg(long, requires = "playground", value_parser = parse_duration)]
    rebalance_at: Option<Duration>,

    /// How long to send load before measuring; these requests are not reported.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,

    /// Records (YCSB) or orders loaded before the run [default: 10000, orders: 1000].
    #[arg(long, alias = "keys")]
    records: Option<u64>,

    /// Skip the load phase: the records of an earlier run with the same --records and
    /// --items-per-shard are assumed present (orders need --order-prefix of that run).
    #[arg(long)]
    no_load: bool,

    /// Bytes per written value (records, order line items, order root payload).
    #[arg(long, default_value_t = 128)]
    value_size: usize,

    /// YCSB records per shard key (consecutive records share one; scans stay inside it).
    #[arg(long, default_value_t = 10)]
    items_per_shard: u64,

    /// Most items one scan asks for (drawn uniformly from 1 to this).
    #[arg(long, default_value_t = 10)]
    scan_length: u32,

    /// Line items per new order.
    #[arg(long, default_value_t = 3)]
    order_items: u32,

    /// Prefix of this run's order IDs [default: derived from the start time, so runs against one
    /// cluster do not collide].
    #[arg(long)]
    order_prefix: Option<String>,

    /// Read with stale consistency (Ordo) / serializable (etcd) instead of linearizable.
    #[arg(long)]
    stale_reads: bool,

    /// Seed of the key and value generators; the same seed draws the same requests.
    #[arg(long, default_value_t = 1)]
    seed: u64,

    /// Deadline of each request, the client's retries included.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,

    /// Runtime worker threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,

    /// PIDs of the server processes (comma-separated) whose CPU time to report; with
    /// --playground the bench's own CPU time covers the cluster.
    #[arg(long, value_delimiter = ',')]
    server_pids: Vec<u32>,

    /// Directory for the JSON report and the SVG plot [default: bench/out].
    #[arg(long)]
    out: Option<PathBuf>,

    /// Also write the JSON report to this file.
    #[arg(long)]
    json: Option<PathBuf>,

    /// No progress bar or progress lines.
    #[arg(long, short = 'q')]
    quiet: bool,
}

/// Where the requests go.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Ordo(Vec<String>),
    Playground,
    Etcd(Vec<String>),
}

impl Args {
    fn target(&self) -> anyhow::Result<Target> {
        if self.playground {
            return Ok(Target::Playground);
        }
        if let Some(t) = &self.target {
            let (scheme, rest) = t
                .split_once("://")
                .with_context(|| format!("--target {t:?}: expected etcd://… or ordo://…"))?;
            let addrs: Vec<String> = rest
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(String::from)
                .collect();
            ensure!(!addrs.is_empty(), "--target {t:?} has no address");
            return match scheme {
                "etcd" => Ok(Target::Etcd(addrs)),
                "ordo" => Ok(Target::Ordo(addrs)),
                other => bail!("--target scheme {other:?} is not supported (etcd or ordo)"),
            };
        }
        ensure!(
            !self.endpoints.is_empty(),
            "no target: pass --endpoints (or ORDO_ENDPOINT), --playground or --target"
        );
        Ok(Target::Ordo(self.endpoints.clone()))
    }

    fn mix(&self) -> anyhow::Result<Mix> {
        let mix = self
            .mix
            .clone()
            .unwrap_or_else(|| self.workload.default_mix());
        ensure!(
            mix.is_orders() == self.workload.is_orders(),
            "--mix {mix} does not fit workload {} (order ops go with --workload orders only)",
            self.workload.name()
        );
        Ok(mix)
    }

    fn records(&self) -> u64 {
        self.records
            .unwrap_or_else(|| self.workload.default_records())
    }

    fn check(&self) -> anyhow::Result<()> {
        ensure!(self.clients > 0, "--clients must be at least 1");
        ensure!(!self.duration.is_zero(), "--duration must be above zero");
        ensure!(
            self.records() <= workload::RECORDS_MAX,
            "--records must be at most {}",
            workload::RECORDS_MAX
        );
        ensure!(
            self.items_per_shard > 0,
            "--items-per-shard must be at least 1"
        );
        ensure!(self.scan_length > 0, "--scan-length must be at least 1");
        ensure!(
            self.order_items <= 120,
            "--order-items must be at most 120 (a Txn holds at most 128 ops)"
        );
        if let Some(rate) = self.rate {
            ensure!(
                rate.is_finite() && rate > 0.0,
                "--rate must be a positive number"
            );
        }
        self.target()?;
        self.mix()?;
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.check()?;
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

    println!();
    print!("{}", report.table());
    let out_dir = args.out.clone().unwrap_or_else(default_out_dir);
    let paths = write_outputs(&report, &out_dir, args.json.as_deref())?;
    for p in paths {
        println!("report: {}", p.display());
    }
    Ok(())
}

/// `bench/out` of this source tree when it exists (the `cargo run` case), else `./ordo-bench-out`.
fn default_out_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    if manifest.is_dir() {
        manifest.join("out")
    } else {
        PathBuf::from("ordo-bench-out")
    }
}

/// Writes `<out>/<name>.json` and `<out>/<name>.svg` (and `--json`), returning the paths.
fn write_outputs(
    report: &Report,
    out_dir: &Path,
    extra_json: Option<&Path>,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let stem = format!(
        "{}-{}-{}",
        report.config.workload,
        report.config.target,
        utc_stamp(SystemTime::now())
    );
    let json = report.json();
    let json_path = out_dir.join(format!("{stem}.json"));
    let svg_path = out_dir.join(format!("{stem}.svg"));
    std::fs::write(&json_path, &json)
        .with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(&svg_path, plot::svg(report))
        .with_context(|| format!("writing {}", svg_path.display()))?;
    let mut paths = vec![json_path, svg_path];
    if let Some(p) = extra_json {
        std::fs::write(p, &json).with_context(|| format!("writing {}", p.display()))?;
        paths.push(p.to_path_buf());
    }
    Ok(paths)
}

/// `YYYYMMDD-HHMMSS` in UTC.
fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Counters and a one-second latency window the progress display reads while the tasks run
/// (warm-up included).
struct Live {
    ok: AtomicU64,
    failed: AtomicU64,
    window: Mutex<Histogram<u64>>,
}

impl Live {
    fn new() -> Live {
        Live {
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            window: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("bounds")),
        }
    }
}

/// What every task needs, shared.
struct Plan {
    backend: Backend,
    world: World,
    mix: Mix,
    distribution: Distribution,
    pacing: Pacing,
    workers: u64,
    seed: u64,
    start: Instant,
    measure_from: Instant,
    stop_at: Instant,
    live: Live,
    timeline: Mutex<Timeline>,
    /// Set by Ctrl-C: the workers stop early and the run reports what it measured.
    interrupted: AtomicBool,
}

/// The backend for the target; with `--playground`, the cluster behind it too.
async fn connect(
    args: &Args,
) -> anyhow::Result<(
    Backend,
    Option<(Playground, tempfile::TempDir, PlaygroundConfig)>,
)> {
    Ok(match args.target()? {
        Target::Ordo(addrs) => {
            let client = Client::connect(addrs)?.with_timeout(args.timeout);
            (
                Backend::Ordo {
                    client,
                    stale: args.stale_reads,
                },
                None,
            )
        }
        Target::Playground => {
            let dir = tempfile::Builder::new()
                .prefix("ordo-bench-playground-")
                .tempdir()
                .context("creating the playground's temp dir")?;
            if !args.quiet {
                eprintln!(
                    "starting an in-process playground: {} group(s) x {} replicas + 3 config \
                     replicas + a router, data in {}",
                    args.groups,
                    args.replicas,
                    dir.path().display()
                );
            }
            let cfg = PlaygroundConfig {
                port: None,
                groups: args.groups,
                replicas: args.replicas,
                ..PlaygroundConfig::new(dir.path())
            };
            let pg = Playground::start(cfg.clone())
                .await
                .context("starting the playground")?;
            let client = Client::connect(vec![pg.router_addr()])?.with_timeout(args.timeout);
            (
                Backend::Ordo {
                    client,
                    stale: args.stale_reads,
                },
                Some((pg, dir, cfg)),
            )
        }
        Target::Etcd(addrs) => (
            Backend::Etcd(Etcd::connect(addrs, args.timeout, args.stale_reads)?),
            None,
        ),
    })
}

fn endpoints_of(backend: &Backend) -> Vec<String> {
    match backend {
        Backend::Ordo { client, .. } => client.endpoints().to_vec(),
        Backend::Etcd(e) => e.endpoints().to_vec(),
    }
}

fn bar(len: u64, quiet: bool, template: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

async fn run(args: &Args) -> anyhow::Result<Report> {
    let mix = args.mix()?;
    let distribution = args
        .distribution
        .unwrap_or_else(|| args.workload.default_distribution());
    let records = args.records();
    let (backend, playground) = connect(args).await?;
    let target_name = match (&backend, &playground) {
        (_, Some(_)) => "ordo-playground",
        (b, None) => b.kind(),
    };
    let order_prefix = args.order_prefix.clone().unwrap_or_else(|| {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("r{secs}-")
    });
    let mut world = World::new(
        Layout {
            items_per_shard: args.items_per_shard,
            scan_length_max: args.scan_length,
        },
        workload::value(args.value_size, args.seed),
        args.order_items,
        order_prefix,
    );
    // txn1/txn2 pick records by the groups that own them.
    if let Backend::Ordo { .. } = &backend {
        let admin = ordo::client::ClusterClient::connect(endpoints_of(&backend))?
            .with_timeout(args.timeout);
        if let Ok(map) = admin.get_shard_map(false).await {
            if map.version > 0 {
                world.groups = Some(ops::Groups {
                    slot_count: map.slot_count,
                    slot_owner: map.slot_owner,
                });
            }
        }
    }
    for &pid in &args.server_pids {
        cpu::pid_cpu(pid).with_context(|| format!("--server-pids: process {pid}"))?;
    }

    // Load phase.
    if args.no_load {
        world.existing.store(records, Ordering::Relaxed);
        world.loaded(records);
    } else if records > 0 {
        load(args, &backend, &world, records, mix.is_orders()).await?;
    }

    // Measured run.
    let workers = args.clients as u64;
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let plan = Arc::new(Plan {
        backend,
        world,
        mix,
        distribution,
        pacing: match args.rate {
            Some(rate) => Pacing::Open { rate },
            None => Pacing::Closed,
        },
        workers,
        seed: args.seed,
        start,
        measure_from,
        stop_at: measure_from + args.duration,
        live: Live::new(),
        timeline: Mutex::new(Timeline::default()),
        interrupted: AtomicBool::new(false),
    });
    let ctrl_c = {
        let plan = plan.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: stopping the workers and reporting what was measured");
                plan.interrupted.store(true, Ordering::Relaxed);
            }
        })
    };
    let tasks: Vec<_> = (0..workers)
        .map(|id| tokio::spawn(worker(plan.clone(), id)))
        .collect();
    let progress = tokio::spawn(show_progress(
        plan.clone(),
        args.warmup + args.duration,
        args.quiet,
    ));
    let rebalancer = match (&playground, args.rebalance_at) {
        (Some((pg, _, cfg)), Some(at)) => Some(tokio::spawn(rebalance_during_run(
            cfg.clone(),
            pg.config_addrs.clone(),
            args.groups + 1,
            args.replicas,
            measure_from,
            at,
        ))),
        _ => None,
    };

    tokio::select! {
        _ = tokio::time::sleep_until(measure_from) => {}
        _ = wait_interrupted(&plan) => {}
    }
    let cpu_before = (cpu::self_cpu(), server_cpu(&args.server_pids));
    let mut merged = Recorder::default();
    let mut unsent = 0;
    for task in tasks {
        let (recorder, missed) = task.await.context("a worker task panicked")?;
        merged.merge(&recorder);
        unsent += missed;
    }
    let elapsed = Instant::now().saturating_duration_since(measure_from);
    let cpu_after = (cpu::self_cpu(), server_cpu(&args.server_pids));
    progress.abort();
    let _ = progress.await;
    ctrl_c.abort();

    let mut rebalance = match rebalancer {
        Some(task) => Some(task.await.context("the rebalance task panicked")??),
        None => None,
    };
    if let Some((pg, dir, _)) = playground {
        if let Some(r) = &mut rebalance {
            for n in r.nodes.drain(..) {
                n.shutdown().await;
            }
        }
        pg.shutdown().await;
        drop(dir);
    }
    if let Some(r) = &rebalance {
        println!("{}", r.summary);
    }
    if merged.ops.is_empty() {
        bail!("no request was measured (is --duration too short?)");
    }

    let info = RunInfo {
        workload: args.workload.name().to_string(),
        mix: plan.mix.to_string(),
        distribution: distribution.name().to_string(),
        target: target_name.to_string(),
        endpoints: endpoints_of(&plan.backend),
        clients: args.clients,
        pacing: if args.rate.is_some() {
            "open"
        } else {
            "closed"
        }
        .to_string(),
        rate_ops_s: args.rate,
        duration_s: args.duration.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        value_size: args.value_size,
        records,
        items_per_shard: args.items_per_shard,
        order_items: args.order_items,
        order_prefix: plan.world.order_prefix.clone(),
        seed: args.seed,
    };
    let timeline = plan.timeline.lock().expect("timeline lock").clone();
    let mut report = Report::new(
        info,
        elapsed,
        &merged,
        &timeline,
        CpuInfo::default(),
        unsent,
    );
    let ops = report.total_ops();
    let bench_cpu = cpu_after.0.saturating_sub(cpu_before.0);
    let (server_cpu, server_source) = if target_name == "ordo-playground" {
        (
            Some(bench_cpu),
            "bench process, which runs the playground in-process".to_string(),
        )
    } else if !args.server_pids.is_empty() {
        let list: Vec<String> = args.server_pids.iter().map(u32::to_string).collect();
        (
            Some(cpu_after.1.saturating_sub(cpu_before.1)),
            format!("pids {}", list.join(",")),
        )
    } else {
        (None, "unknown".to_string())
    };
    report.cpu = CpuInfo {
        bench_cpu_s: bench_cpu.as_secs_f64(),
        server_cpu_s: server_cpu.map(|c| c.as_secs_f64()),
        server_source,
        server_cpu_s_per_1k_ops: server_cpu.and_then(|c| cpu::per_thousand_ops(c, ops)),
        bench_cpu_s_per_1k_ops: cpu::per_thousand_ops(bench_cpu, ops),
    };
    Ok(report)
}

/// What `--rebalance-at` did.
struct Rebalance {
    /// The new group's nodes, stopped with the playground.
    nodes: Vec<ordo::node::Node>,
    summary: String,
}

/// Waits until `at` into the measurement, starts group `group`, registers it and rebalances
/// onto it; reports the window (seconds since the measurement started) and each move.
async fn rebalance_during_run(
    cfg: PlaygroundConfig,
    config_addrs: Vec<String>,
    group: u64,
    replicas: u64,
    measure_from: Instant,
    at: Duration,
) -> anyhow::Result<Rebalance> {
    tokio::time::sleep_until(measure_from + at).await;
    let since = |t: Instant| t.saturating_duration_since(measure_from).as_secs_f64();
    let began = Instant::now();
    let (nodes, spec) = ordo::playground::start_extra_group(&cfg, group, replicas).await?;
    let cc =
        ordo::client::ClusterClient::connect(config_addrs)?.with_timeout(Duration::from_secs(300));
    let mut added = None;
    for _ in 0..60 {
        match cc
            .add_group(ordo_proto::v1::AddGroupRequest {
                group: Some(spec.clone()),
            })
            .await
        {
            Ok(m) => {
                added = Some(m);
                break;
            }
            // The new group may not have elected its leader yet.
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    ensure!(added.is_some(), "group {group} could not be registered");
    let moving = Instant::now();
    let r = cc
        .rebalance(ordo_proto::v1::RebalanceRequest::default())
        .await
        .context("rebalance")?;
    let done = Instant::now();
    let mut summary = format!(
        "rebalance onto group {group}: group started at {:.1}s, moves from {:.1}s to {:.1}s ({} moves)",
        since(began),
        since(moving),
        since(done),
        r.migrations.len()
    );
    let mut pauses: Vec<u64> = r.migrations.iter().map(|m| m.pause_ms).collect();
    for m in &r.migrations {
        summary.push_str(&format!(
            "\n  migration {}: {} slots {}->{}, {} items + {} log records, pause {} ms, {} cleaned",
            m.id,
            m.slots.len(),
            m.from_group,
            m.to_group,
            m.items_copied,
            m.log_records,
            m.pause_ms,
            m.items_cleaned
        ));
    }
    pauses.sort_unstable();
    if let Some(max) = pauses.last() {
        summary.push_str(&format!("\n  pause max {max} ms"));
    }
    Ok(Rebalance { nodes, summary })
}

/// Returns once Ctrl-C was pressed.
async fn wait_interrupted(plan: &Plan) {
    while !plan.interrupted.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Total CPU of the `pids` (a process that exited counts as zero from then on).
fn server_cpu(pids: &[u32]) -> Duration {
    pids.iter().filter_map(|&p| cpu::pid_cpu(p).ok()).sum()
}

/// Inserts records `0..records` (or creates orders `0..records`) with `--clients` tasks.
async fn load(
    args: &Args,
    backend: &Backend,
    world: &World,
    records: u64,
    orders: bool,
) -> anyhow::Result<()> {
    let what = if orders { "orders" } else { "records" };
    let progress = bar(
        records,
        args.quiet,
        &format!(
            "load  [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {what} {{per_sec}} {{msg}}"
        ),
    );
    let failed = AtomicU64::new(0);
    let first_error = Mutex::new(None::<String>);
    let task = |_: usize| async {
        loop {
            let n = world.next_new.fetch_add(1, Ordering::Relaxed);
            if n >= records {
                break;
            }
            let result = if orders {
                ops::create_order(backend, world, n).await
            } else {
                ops::insert_record(backend, world, n).await
            };
            if let Err(kind) = result {
                failed.fetch_add(1, Ordering::Relaxed);
                first_error.lock().expect("lock").get_or_insert(kind);
            }
            progress.inc(1);
        }
    };
    let started = Instant::now();
    futures_join_all((0..args.clients.max(1)).map(task).collect()).await;
    progress.finish_and_clear();
    world.loaded(records);
    world.existing.store(records, Ordering::Relaxed);
    let failed = failed.load(Ordering::Relaxed);
    if !args.quiet {
        eprintln!(
            "loaded {} {what} in {:.1} s{}",
            records - failed,
            started.elapsed().as_secs_f64(),
            if failed > 0 {
                format!(", {failed} failed")
            } else {
                String::new()
            }
        );
    }
    if failed == records {
        bail!(
            "every load request failed (first error: {}); is the target up?",
            first_error
                .lock()
                .expect("lock")
                .clone()
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Polls all `futures` concurrently on the current task until every one finished.
async fn futures_join_all<F: std::future::Future<Output = ()>>(futures: Vec<F>) {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut done = vec![false; futures.len()];
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, d) in futures.iter_mut().zip(done.iter_mut()) {
            if !*d {
                if f.as_mut().poll(cx).is_ready() {
                    *d = true;
                } else {
                    pending = true;
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await
}

/// One worker: closed loop (next request when the previous answered) or open loop (requests due
/// on the schedule of [`Pacing::due`]). Returns what it measured and, in open loop, how many due
/// requests it never got to send before the end.
async fn worker(plan: Arc<Plan>, id: u64) -> (Recorder, u64) {
    let mut draw = Draw {
        rng: XorShift64::new(plan.seed, id),
        chooser: KeyChooser::new(
            plan.distribution,
            plan.world.existing.load(Ordering::Relaxed),
        ),
    };
    let mut recorder = Recorder::default();
    let mut unsent = 0;
    let mut k = 0;
    loop {
        let due = plan.pacing.due(k, id, plan.workers).map(|d| plan.start + d);
        k += 1;
        let now = Instant::now();
        if plan.interrupted.load(Ordering::Relaxed) {
            break;
        }
        match due {
            Some(due) if due >= plan.stop_at => break,
            Some(due) if now >= plan.stop_at => {
                // Behind schedule at the end: count what was due but never sent.
                let mut due = due;
                let mut k2 = k;
                while due < plan.stop_at {
                    unsent += 1;
                    due = plan.start + plan.pacing.due(k2, id, plan.workers).expect("open");
                    k2 += 1;
                }
                break;
            }
            Some(due) => tokio::time::sleep_until(due).await,
            None if now >= plan.stop_at => break,
            None => {}
        }
        let sent = Instant::now();
        let op = plan.mix.pick(&mut draw.rng);
        let result = ops::execute(&plan.backend, &plan.world, op, &mut draw).await;
        let done = Instant::now();
        let latency = schedule::latency(
            due.map(|d| d - plan.start),
            sent - plan.start,
            done - plan.start,
        );
        let service = done - sent;
        match &result {
            Ok(()) => {
                plan.live.ok.fetch_add(1, Ordering::Relaxed);
                plan.live
                    .window
                    .lock()
                    .expect("window lock")
                    .saturating_record(latency.as_micros().max(1) as u64);
            }
            Err(_) => {
                plan.live.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        if due.unwrap_or(sent) < plan.measure_from {
            continue;
        }
        let second = done.saturating_duration_since(plan.measure_from).as_secs();
        let stats = recorder.op(op);
        match result {
            Ok(()) => {
                stats.record_ok(latency, service);
                plan.timeline
                    .lock()
                    .expect("timeline lock")
                    .record(second, op, Some(latency));
            }
            Err(kind) => {
                stats.record_err(&kind);
                plan.timeline
                    .lock()
                    .expect("timeline lock")
                    .record(second, op, None);
            }
        }
    }
    (recorder, unsent)
}

/// The live progress bar (or, when stderr is not a terminal, a line per second): phase, ops/s and
/// p99 of the last second.
async fn show_progress(plan: Arc<Plan>, total: Duration, quiet: bool) {
    let progress = bar(
        total.as_secs().max(1),
        quiet,
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len}s {msg}",
    );
    let lines = !quiet && progress.is_hidden();
    let mut tick =
        tokio::time::interval_at(plan.start + Duration::from_secs(1), Duration::from_secs(1));
    let (mut ok_before, mut failed_before) = (0, 0);
    loop {
        let now = tick.tick().await;
        let ok = plan.live.ok.load(Ordering::Relaxed);
        let failed = plan.live.failed.load(Ordering::Relaxed);
        let p99 = {
            let mut w = plan.live.window.lock().expect("window lock");
            let p = (!w.is_empty()).then(|| w.value_at_quantile(0.99) as f64 / 1000.0);
            w.reset();
            p
        };
        let phase = if now <= plan.measure_from {
            "warm-up"
        } else {
            "measure"
        };
        let msg = format!(
            "{phase}: {} ops/s, p99 {}, {} failed/s",
            ok - ok_before,
            p99.map_or_else(|| "-".to_string(), |p| format!("{p:.2} ms")),
            failed - failed_before
        );
        let secs = now.saturating_duration_since(plan.start).as_secs();
        progress.set_position(secs.min(total.as_secs()));
        progress.set_message(msg.clone());
        if lines {
            eprintln!("[{secs:>4}s] {msg}");
        }
        (ok_before, failed_before) = (ok, failed);
        if now >= plan.stop_at {
            progress.finish_and_clear();
        }
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
            "--endpoint",
            "127.0.0.1:7101,127.0.0.1:7102",
            "--clients",
            "4",
            "--duration",
            "20s",
            "--warmup",
            "0",
            "--workload",
            "f",
            "--rate",
            "500",
        ])
        .unwrap();
        args.check().unwrap();
        assert_eq!(args.endpoints, ["127.0.0.1:7101", "127.0.0.1:7102"]);
        assert_eq!(
            args.target().unwrap(),
            Target::Ordo(vec!["127.0.0.1:7101".into(), "127.0.0.1:7102".into()])
        );
        assert_eq!(args.clients, 4);
        assert_eq!(args.duration, Duration::from_secs(20));
        assert_eq!(args.warmup, Duration::ZERO);
        assert_eq!(args.workload, Workload::F);
        assert_eq!(args.rate, Some(500.0));
        assert_eq!(args.records(), 10_000);
        assert_eq!(args.value_size, 128);
        assert!(Args::try_parse_from(["ordo-bench", "--workload", "g", "-e", "a:1"]).is_err());

        let pg = Args::try_parse_from([
            "ordo-bench",
            "--playground",
            "--groups",
            "1",
            "--workload",
            "orders",
        ])
        .unwrap();
        pg.check().unwrap();
        assert_eq!(pg.target().unwrap(), Target::Playground);
        assert_eq!(pg.groups, 1);
        assert_eq!(pg.records(), 1_000);
        assert!(pg.mix().unwrap().is_orders());

        let etcd = Args::try_parse_from([
            "ordo-bench",
            "--target",
            "etcd://127.0.0.1:2379,127.0.0.1:22379",
            "--server-pids",
            "10,11",
        ])
        .unwrap();
        assert_eq!(
            etcd.target().unwrap(),
            Target::Etcd(vec!["127.0.0.1:2379".into(), "127.0.0.1:22379".into()])
        );
        assert_eq!(etcd.server_pids, [10, 11]);

        let bad_mix = Args::try_parse_from([
            "ordo-bench",
            "--playground",
            "--workload",
            "a",
            "--mix",
            "create=1,advance=1",
        ])
        .unwrap();
        assert!(bad_mix.check().is_err());
        let bad_target = Args::try_parse_from(["ordo-bench", "--target", "redis://x:1"]).unwrap();
        assert!(bad_target.check().is_err());
        let none = Args::try_parse_from(["ordo-bench"]).unwrap();
        if std::env::var_os("ORDO_ENDPOINT").is_none() {
            assert!(none.check().is_err());
        }
    }

    #[test]
    fn utc_stamps_are_calendar_dates() {
        let t = UNIX_EPOCH + Duration::from_secs(1_764_149_405); // 2025-11-26 09:30:05 UTC
        assert_eq!(utc_stamp(t), "20251126-093005");
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101-000000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(utc_stamp(leap), "20000229-000000");
    }
}
