//! One run, as named steps: set up the target and the world, load, measure (after a warm-up),
//! tear down, report.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use ordo::node::FeedConfig;
use ordo::playground::{Playground, PlaygroundConfig};
use ordo_proto::client::Client;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Streaming;

use crate::args::{Args, Target};
use crate::backend::{Backend, Etcd};
use crate::cpu;
use crate::feed::{self, FeedReport, Probe};
use crate::load::load;
use crate::ops::{self, World};
use crate::progress::show_progress;
use crate::rebalance::{rebalance_during_run, Rebalance};
use crate::report::{CpuInfo, Memory, Recorder, Report, RunInfo, Timeline};
use crate::schedule::Pacing;
use crate::worker::worker;
use crate::workload::{self, Distribution, Layout, Mix};

/// Counters and a one-second latency window the progress display reads while the tasks run
/// (warm-up included).
pub struct Live {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub window: Mutex<Histogram<u64>>,
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
pub struct Plan {
    pub backend: Backend,
    pub world: World,
    pub mix: Mix,
    pub distribution: Distribution,
    pub pacing: Pacing,
    pub workers: u64,
    pub seed: u64,
    pub start: Instant,
    pub measure_from: Instant,
    pub stop_at: Instant,
    pub live: Live,
    pub timeline: Mutex<Timeline>,
    /// Set by Ctrl-C: the workers stop early and the run reports what it measured.
    pub interrupted: AtomicBool,
}

/// The in-process cluster of `--playground`, with its data directory and the configuration
/// `--rebalance-at` starts one more group with.
struct LocalCluster {
    playground: Playground,
    dir: tempfile::TempDir,
    config: PlaygroundConfig,
}

/// What [`set_up`] prepared.
struct Setup {
    backend: Backend,
    cluster: Option<LocalCluster>,
    target_name: &'static str,
    world: World,
    mix: Mix,
    distribution: Distribution,
    records: u64,
}

/// What the measured part of the run produced.
struct Measured {
    merged: Recorder,
    /// Open loop: requests that were due but never sent before the end.
    unsent: u64,
    elapsed: Duration,
    /// CPU time of (the bench process, the `--server-pids`) when the measurement began and ended.
    cpu_before: (Duration, Duration),
    cpu_after: (Duration, Duration),
    rebalancer: Option<JoinHandle<anyhow::Result<Rebalance>>>,
    memory: Option<Memory>,
}

/// How often the server's resident memory is sampled during the measurement.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

/// The change-feed watchers that run beside the workers (`--feed-stall`, `--feed-latency`).
#[derive(Default)]
struct Watchers {
    /// The stalled watcher's stream, never read during the run.
    stalled: Option<Streaming<ordo_proto::v1::WatchResponse>>,
    /// The latency watcher's probe and the task reading its stream into it.
    follower: Option<(Arc<Probe>, JoinHandle<anyhow::Result<()>>)>,
    /// The watchers' own clients, kept while their streams are read (or held).
    clients: Vec<Client>,
}

/// Runs the benchmark `args` describe and reports it.
pub async fn run(args: &Args) -> anyhow::Result<Report> {
    let setup = set_up(args).await?;
    // Load phase.
    if args.no_load {
        setup.world.existing.store(setup.records, Ordering::Relaxed);
        setup.world.loaded(setup.records);
    } else if setup.records > 0 {
        let orders = setup.mix.is_orders();
        load(args, &setup.backend, &setup.world, setup.records, orders).await?;
    }
    let (mut feed_report, mut watchers) = feed_before_run(args, &setup).await?;
    let Setup {
        backend,
        cluster,
        target_name,
        world,
        mix,
        distribution,
        records,
    } = setup;
    let plan = Arc::new(plan(args, backend, world, mix, distribution));
    let mut measured = measure(
        args,
        &plan,
        cluster.as_ref(),
        &mut watchers,
        &mut feed_report,
    )
    .await?;
    let rebalance = tear_down(cluster, measured.rebalancer.take()).await?;
    if let Some(r) = &rebalance {
        println!("{}", r.summary);
    }
    if measured.merged.ops.is_empty() {
        bail!("no request was measured (is --duration too short?)");
    }
    let mut report = report(args, &plan, target_name, records, &measured);
    report.feed = feed_report;
    Ok(report)
}

/// The `--feed-*` steps before the run: the backlog, the catch-up, and opening the watchers that
/// run beside the workers (all with the load phase done and nothing else writing).
async fn feed_before_run(
    args: &Args,
    setup: &Setup,
) -> anyhow::Result<(Option<FeedReport>, Watchers)> {
    let mut watchers = Watchers::default();
    let Backend::Ordo { client, probe, .. } = &setup.backend else {
        return Ok((None, watchers));
    };
    if args.feed_backlog == 0 && !args.feed_catch_up && !args.feed_stall && probe.is_none() {
        return Ok((None, watchers));
    }
    // Each watcher has its own connection, as a separate consumer would: an unread stream holds
    // its connection's HTTP/2 window, which the workers' requests must not share.
    let own_client = || -> anyhow::Result<Client> {
        Ok(Client::connect(client.endpoints().to_vec())?.with_timeout(args.timeout))
    };
    let mut report = FeedReport::default();
    if args.feed_backlog > 0 {
        let took = feed::backlog(
            &setup.backend,
            &setup.world.order_prefix,
            &setup.world.value,
            args.feed_backlog,
            args.clients,
            args.quiet,
        )
        .await?;
        report.backlog_events = args.feed_backlog;
        report.backlog_s = took.as_secs_f64();
    }
    if args.feed_catch_up {
        report.catch_up = Some(feed::catch_up(&own_client()?).await?);
    }
    if args.feed_stall {
        let own = own_client()?;
        let (stream, first) = feed::stall(&own).await?;
        watchers.clients.push(own);
        watchers.stalled = Some(stream);
        report.stalled = Some(feed::Stalled {
            first_response_events: first,
            open_at_end: false,
        });
    }
    if let Some(probe) = probe {
        let own = own_client()?;
        let stream = feed::open_follower(&own).await?;
        watchers.clients.push(own);
        let task = tokio::spawn(feed::follow(stream, probe.clone()));
        watchers.follower = Some((probe.clone(), task));
    }
    if !args.quiet {
        eprint!("{}", report.lines());
    }
    Ok((Some(report), watchers))
}

/// After the workers: the latency watcher's figures (once it has the events of every
/// acknowledged write, or `feed::DRAIN_TIMEOUT` passed) and whether the stalled watcher's stream
/// is still open.
async fn feed_after_run(watchers: &mut Watchers, report: &mut Option<FeedReport>) {
    let Some(report) = report else {
        return;
    };
    if let Some((probe, task)) = watchers.follower.take() {
        report.latency = Some(probe.drain().await);
        task.abort();
    }
    if let (Some(stream), Some(s)) = (watchers.stalled.as_mut(), report.stalled.as_mut()) {
        s.open_at_end = feed::still_open(stream).await;
    }
    watchers.stalled = None;
    watchers.clients.clear();
}

/// Samples the server's resident memory every `RSS_SAMPLE_INTERVAL` from `from` until `until`:
/// the bench process with `--playground`, else the `--server-pids`; `None` without either.
async fn sample_memory(
    pids: Vec<u32>,
    playground: bool,
    from: Instant,
    until: Instant,
) -> Option<Memory> {
    let (pids, source) = if playground {
        (
            vec![std::process::id()],
            "bench process, which runs the playground".to_string(),
        )
    } else if !pids.is_empty() {
        let list: Vec<String> = pids.iter().map(u32::to_string).collect();
        (pids, format!("pids {}", list.join(",")))
    } else {
        return None;
    };
    let rss = || {
        pids.iter()
            .filter_map(|&p| cpu::pid_rss(p).ok())
            .sum::<u64>() as f64
            / (1 << 20) as f64
    };
    tokio::time::sleep_until(from).await;
    let start = rss();
    let mut max = start;
    let mut now = start;
    while Instant::now() < until {
        tokio::time::sleep(RSS_SAMPLE_INTERVAL).await;
        now = rss();
        max = max.max(now);
    }
    let round = |v: f64| (v * 10.0).round() / 10.0;
    Some(Memory {
        source,
        start_mib: round(start),
        max_mib: round(max),
        end_mib: round(now),
    })
}

/// Connects to the target (starting the playground) and builds the world the workload draws
/// from.
async fn set_up(args: &Args) -> anyhow::Result<Setup> {
    let mix = args.mix()?;
    let distribution = args
        .distribution
        .unwrap_or_else(|| args.workload.default_distribution());
    let records = args.records();
    let (backend, cluster) = connect(args).await?;
    let target_name = match (&backend, &cluster) {
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
        let admin = ordo_proto::client::ClusterClient::connect(endpoints_of(&backend))?
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
    Ok(Setup {
        backend,
        cluster,
        target_name,
        world,
        mix,
        distribution,
        records,
    })
}

/// The shared plan of the measured run, whose clock starts now: `--warmup`, then `--duration`.
fn plan(args: &Args, backend: Backend, world: World, mix: Mix, distribution: Distribution) -> Plan {
    let start = Instant::now();
    let measure_from = start + args.warmup;
    Plan {
        backend,
        world,
        mix,
        distribution,
        pacing: match args.rate {
            Some(rate) => Pacing::Open { rate },
            None => Pacing::Closed,
        },
        workers: args.clients as u64,
        seed: args.seed,
        start,
        measure_from,
        stop_at: measure_from + args.duration,
        live: Live::new(),
        timeline: Mutex::new(Timeline::default()),
        interrupted: AtomicBool::new(false),
    }
}

/// Runs the workers through the warm-up and the measurement (with the progress display, Ctrl-C
/// and `--rebalance-at` beside them) and collects what they measured.
async fn measure(
    args: &Args,
    plan: &Arc<Plan>,
    cluster: Option<&LocalCluster>,
    watchers: &mut Watchers,
    feed_report: &mut Option<FeedReport>,
) -> anyhow::Result<Measured> {
    if let Some((probe, _)) = &watchers.follower {
        probe.arm(plan.measure_from);
    }
    let memory = tokio::spawn(sample_memory(
        args.server_pids.clone(),
        cluster.is_some(),
        plan.measure_from,
        plan.stop_at,
    ));
    let ctrl_c = {
        let plan = plan.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: stopping the workers and reporting what was measured");
                plan.interrupted.store(true, Ordering::Relaxed);
            }
        })
    };
    let tasks: Vec<_> = (0..plan.workers)
        .map(|id| tokio::spawn(worker(plan.clone(), id)))
        .collect();
    let progress = tokio::spawn(show_progress(
        plan.clone(),
        args.warmup + args.duration,
        args.quiet,
    ));
    let rebalancer = match (cluster, args.rebalance_at) {
        (Some(c), Some(at)) => Some(tokio::spawn(rebalance_during_run(
            c.config.clone(),
            c.playground.config_addrs.clone(),
            args.groups + 1,
            args.replicas,
            plan.measure_from,
            at,
        ))),
        _ => None,
    };

    tokio::select! {
        _ = tokio::time::sleep_until(plan.measure_from) => {}
        _ = wait_interrupted(plan) => {}
    }
    let cpu_before = (cpu::self_cpu(), server_cpu(&args.server_pids));
    let mut merged = Recorder::default();
    let mut unsent = 0;
    for task in tasks {
        let (recorder, missed) = task.await.context("a worker task panicked")?;
        merged.merge(&recorder);
        unsent += missed;
    }
    let elapsed = Instant::now().saturating_duration_since(plan.measure_from);
    let cpu_after = (cpu::self_cpu(), server_cpu(&args.server_pids));
    progress.abort();
    let _ = progress.await;
    ctrl_c.abort();
    feed_after_run(watchers, feed_report).await;
    let memory = memory.await.context("the memory sampler panicked")?;
    Ok(Measured {
        memory,
        merged,
        unsent,
        elapsed,
        cpu_before,
        cpu_after,
        rebalancer,
    })
}

/// Waits for `--rebalance-at` to end, then stops its nodes and the playground.
async fn tear_down(
    cluster: Option<LocalCluster>,
    rebalancer: Option<JoinHandle<anyhow::Result<Rebalance>>>,
) -> anyhow::Result<Option<Rebalance>> {
    let mut rebalance = match rebalancer {
        Some(task) => Some(task.await.context("the rebalance task panicked")??),
        None => None,
    };
    if let Some(LocalCluster {
        playground, dir, ..
    }) = cluster
    {
        if let Some(r) = &mut rebalance {
            for n in r.nodes.drain(..) {
                n.shutdown().await;
            }
        }
        playground.shutdown().await;
        drop(dir);
    }
    Ok(rebalance)
}

/// The report of the run: its configuration, what was measured, and CPU per 1,000 ops.
fn report(
    args: &Args,
    plan: &Plan,
    target_name: &str,
    records: u64,
    measured: &Measured,
) -> Report {
    let info = RunInfo {
        workload: args.workload.name().to_string(),
        mix: plan.mix.to_string(),
        distribution: plan.distribution.name().to_string(),
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
        measured.elapsed,
        &measured.merged,
        &timeline,
        CpuInfo::default(),
        measured.unsent,
    );
    report.cpu = cpu_info(args, target_name, measured, report.total_ops());
    report.memory = measured.memory.clone();
    report
}

/// CPU seconds of the bench and of the servers (when known) over the measurement, for `ops`.
fn cpu_info(args: &Args, target_name: &str, measured: &Measured, ops: u64) -> CpuInfo {
    let (before, after) = (measured.cpu_before, measured.cpu_after);
    let bench_cpu = after.0.saturating_sub(before.0);
    let (server_cpu, server_source) = if target_name == "ordo-playground" {
        (
            Some(bench_cpu),
            "bench process, which runs the playground in-process".to_string(),
        )
    } else if !args.server_pids.is_empty() {
        let list: Vec<String> = args.server_pids.iter().map(u32::to_string).collect();
        (
            Some(after.1.saturating_sub(before.1)),
            format!("pids {}", list.join(",")),
        )
    } else {
        (None, "unknown".to_string())
    };
    CpuInfo {
        bench_cpu_s: bench_cpu.as_secs_f64(),
        server_cpu_s: server_cpu.map(|c| c.as_secs_f64()),
        server_source,
        server_cpu_s_per_1k_ops: server_cpu.and_then(|c| cpu::per_thousand_ops(c, ops)),
        bench_cpu_s_per_1k_ops: cpu::per_thousand_ops(bench_cpu, ops),
    }
}

/// The backend for the target; with `--playground`, the cluster behind it too.
async fn connect(args: &Args) -> anyhow::Result<(Backend, Option<LocalCluster>)> {
    Ok(match args.target()? {
        Target::Ordo(addrs) => {
            let client = Client::connect(addrs)?.with_timeout(args.timeout);
            (
                Backend::Ordo {
                    client,
                    stale: args.stale_reads,
                    probe: probe(args),
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
                feed: FeedConfig {
                    capture: args.feed_capture.unwrap_or_default(),
                    ..FeedConfig::default()
                },
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
                    probe: probe(args),
                },
                Some(LocalCluster {
                    playground: pg,
                    dir,
                    config: cfg,
                }),
            )
        }
        Target::Etcd(addrs) => (
            Backend::Etcd(Etcd::connect(addrs, args.timeout, args.stale_reads)?),
            None,
        ),
        #[cfg(feature = "nats")]
        Target::Nats(addrs) => {
            let replicas = usize::try_from(args.replicas).context("--replicas")?;
            let nats =
                crate::backend::Nats::connect(addrs, &args.nats_bucket, replicas, args.timeout)
                    .await?;
            (Backend::Nats(nats), None)
        }
        #[cfg(not(feature = "nats"))]
        Target::Nats(_) => bail!("--target nats:// needs a build with --features nats"),
    })
}

/// With `--feed-latency`, the probe the backend tells of every acknowledged write.
fn probe(args: &Args) -> Option<Arc<Probe>> {
    args.feed_latency.then(|| Arc::new(Probe::default()))
}

fn endpoints_of(backend: &Backend) -> Vec<String> {
    match backend {
        Backend::Ordo { client, .. } => client.endpoints().to_vec(),
        Backend::Etcd(e) => e.endpoints().to_vec(),
        #[cfg(feature = "nats")]
        Backend::Nats(n) => n.endpoints().to_vec(),
    }
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
