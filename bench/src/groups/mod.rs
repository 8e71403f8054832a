//! `ordo-bench groups`: consumer groups (issue 14, acceptance 6), through a router.
//!
//! For each member count of `--members` (and each `--phase`), a fresh `KEY_ORDERED` group is
//! created from now over a key prefix only this run writes, so nothing else in the cluster
//! reaches it:
//!
//! * **backlog**: write `--events` events (puts of `--batch` new items per `Txn`, one shard key
//!   per Txn, over `--shard-keys` shard keys), then start the members and time until every
//!   event was handled (acked on the stream, or its ack Txn succeeded): events/s. With plain
//!   acks the node applies them in flushes, so the run then polls `DescribeGroup` until the
//!   group's lag is 0 (`applied_s`: every ack applied).
//! * **live**: the members consume while an open-loop writer puts single items at `--rate`
//!   for `--warmup` + `--duration`; each write acknowledged after the warm-up is matched with
//!   its delivery (write acknowledged -> delivery received) and, with `--ack txn`, with its ack
//!   Txn's answer (write acknowledged -> ack applied).
//!
//! `--ack plain|txn` picks the members' acks (see [`member::AckMode`]); the cost of
//! transactional acks is the difference between two runs. Each group is deleted after its run.

mod member;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use clap::Parser;
use futures::future::join_all;
use ordo_proto::client::Client;
use ordo_proto::v1::watch_request::Start;
use ordo_proto::v1::{txn_op, CreateGroupRequest, PutRequest, TxnOp, TxnRequest};
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::args::parse_duration;
use crate::cpu::{per_thousand_ops, pid_cpu};
use crate::feed::Latency;
use crate::report::round3;
use member::{run_member, AckMode, Counts, MemberConfig, Tally};

/// How long the members may take to handle a backlog before the run fails.
const CONSUME_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a backlog run may handle nothing before it fails as stalled: longer than the
/// group's `ack_wait` (30 s), so that a redelivery is not taken for a stall.
const STALL_TIMEOUT: Duration = Duration::from_secs(45);
/// How long plain acks may take to be applied (the group's lag to reach 0) after the last one
/// was sent.
const APPLIED_TIMEOUT: Duration = Duration::from_secs(30);
/// Between two `DescribeGroup` polls while waiting for the acks to apply.
const APPLIED_POLL: Duration = Duration::from_millis(50);
/// How often a backlog run with no progress looks whether a member ended.
const MEMBERS_CHECK: Duration = Duration::from_millis(200);
/// Most puts one `Txn` holds (a Txn holds at most 128 ops).
const BATCH_MAX: u32 = 128;
/// Most live-phase writes in flight (the open-loop writer does not wait for answers).
const LIVE_WRITES_IN_FLIGHT_MAX: usize = 256;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "ordo-bench groups",
    about = "Consumer-group throughput and latency through a router (see bench/README.md)"
)]
pub struct GroupsArgs {
    /// Router addresses, comma-separated or repeated.
    #[arg(
        long,
        short = 'e',
        env = "ORDO_ENDPOINT",
        value_delimiter = ',',
        required = true
    )]
    pub endpoints: Vec<String>,
    /// Member counts to run, one group each, in this order.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub members: Vec<u32>,
    /// Which phases to run for each member count.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "backlog,live"
    )]
    pub phase: Vec<Phase>,
    /// How members acknowledge deliveries.
    #[arg(long, value_enum, default_value_t = AckMode::Plain)]
    pub ack: AckMode,
    /// Backlog phase: events written before the members start.
    #[arg(long, default_value_t = 20_000)]
    pub events: u64,
    /// Distinct shard keys (orders) the events are spread over: a KEY_ORDERED group has at most
    /// one event of each in flight.
    #[arg(long, default_value_t = 1_000)]
    pub shard_keys: u64,
    /// Backlog phase: puts per write Txn (all under one shard key).
    #[arg(long, default_value_t = 8)]
    pub batch: u32,
    /// Concurrent writers of the backlog.
    #[arg(long, default_value_t = 16)]
    pub writers: usize,
    /// Credits each member grants (events it may hold unacked).
    #[arg(long, default_value_t = 64)]
    pub credits: u32,
    /// Live phase: writes per second (one event each).
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Live phase: how long to measure, after the warm-up.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Live phase: how long to write before measuring.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Bytes per written value.
    #[arg(long, default_value_t = 128)]
    pub value_size: usize,
    /// Deadline of each request, the client's retries included.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// PIDs of the server processes whose CPU time to report.
    #[arg(long, value_delimiter = ',')]
    pub server_pids: Vec<u32>,
    /// Write the JSON report to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Backlog,
    Live,
}

impl GroupsArgs {
    pub fn check(&self) -> anyhow::Result<()> {
        ensure!(!self.members.is_empty(), "--members names no member count");
        ensure!(
            self.members.iter().all(|&m| (1..=1024).contains(&m)),
            "--members: each count must be from 1 to 1024"
        );
        ensure!(self.shard_keys > 0, "--shard-keys must be at least 1");
        ensure!(
            (1..=BATCH_MAX).contains(&self.batch),
            "--batch must be from 1 to {BATCH_MAX}"
        );
        ensure!(self.writers > 0, "--writers must be at least 1");
        ensure!(
            (1..=ordo_proto::FEED_GROUP_CREDITS_MAX).contains(&self.credits),
            "--credits must be from 1 to {}",
            ordo_proto::FEED_GROUP_CREDITS_MAX
        );
        ensure!(
            self.rate.is_finite() && self.rate > 0.0,
            "--rate must be a positive number"
        );
        ensure!(!self.duration.is_zero(), "--duration must be above zero");
        Ok(())
    }
}

/// The backlog phase of one member count.
#[derive(Clone, Debug, Serialize)]
pub struct BacklogResult {
    pub members: u32,
    pub events: u64,
    /// Writing the backlog (not measured as the group's).
    pub write_s: f64,
    /// From the members' start to the last event handled.
    pub consume_s: f64,
    pub events_per_s: f64,
    /// Plain acks: from the members' start to the group's lag reaching 0 (every ack applied).
    pub applied_s: Option<f64>,
    pub applied_events_per_s: Option<f64>,
    pub counts: Counts,
    /// Server CPU seconds per 1,000 events consumed (with --server-pids).
    pub cpu_s_per_1000: Option<f64>,
}

/// The live phase of one member count.
#[derive(Clone, Debug, Serialize)]
pub struct LiveResult {
    pub members: u32,
    pub rate: f64,
    /// Writes acknowledged (warm-up included).
    pub written: u64,
    pub write_errors: u64,
    /// Write acknowledged -> delivery received.
    pub delivered: Latency,
    /// Write acknowledged -> ack Txn answered (`--ack txn` only).
    pub ack_applied: Option<Latency>,
    pub counts: Counts,
}

#[derive(Clone, Debug, Serialize)]
pub struct GroupsReport {
    pub ack: AckMode,
    pub shard_keys: u64,
    pub credits: u32,
    pub value_size: usize,
    pub backlog: Vec<BacklogResult>,
    pub live: Vec<LiveResult>,
}

/// Parses `ordo-bench groups ...` (its first argument is `groups`), runs it and prints it.
pub fn main(argv: Vec<String>) -> anyhow::Result<()> {
    let args = GroupsArgs::parse_from(argv);
    args.check()?;
    let report = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run(&args))?;
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        println!("report: {}", path.display());
    }
    Ok(())
}

async fn run(args: &GroupsArgs) -> anyhow::Result<GroupsReport> {
    let client = Client::connect(args.endpoints.clone())?.with_timeout(args.timeout);
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut report = GroupsReport {
        ack: args.ack,
        shard_keys: args.shard_keys,
        credits: args.credits,
        value_size: args.value_size,
        backlog: Vec::new(),
        live: Vec::new(),
    };
    for &members in &args.members {
        for &phase in &args.phase {
            let tag = match phase {
                Phase::Backlog => "b",
                Phase::Live => "l",
            };
            let name = format!("bench-{run_id}-{tag}{members}");
            let prefix = format!("g{run_id}{tag}{members}/");
            create_group(&client, &name, &prefix).await?;
            let run = Run {
                client: &client,
                args,
                group: &name,
                prefix: &prefix,
                members,
            };
            match phase {
                Phase::Backlog => {
                    let r = run.backlog().await?;
                    println!("{}", backlog_line(&r, args.ack));
                    report.backlog.push(r);
                }
                Phase::Live => {
                    let r = run.live().await?;
                    println!("{}", live_line(&r, args.ack));
                    report.live.push(r);
                }
            }
            client
                .delete_group(&name)
                .await
                .with_context(|| format!("deleting group {name}"))?;
        }
    }
    Ok(report)
}

async fn create_group(client: &Client, name: &str, prefix: &str) -> anyhow::Result<()> {
    let req = CreateGroupRequest {
        group: name.to_string(),
        key_prefix: Bytes::from(prefix.to_string()),
        from: Start::FromNow as i32,
        ..CreateGroupRequest::default()
    };
    client
        .create_group(req)
        .await
        .with_context(|| format!("creating group {name}"))?;
    Ok(())
}

/// One member count's run over its own group.
struct Run<'a> {
    client: &'a Client,
    args: &'a GroupsArgs,
    group: &'a str,
    prefix: &'a str,
    members: u32,
}

impl Run<'_> {
    /// Starts the members; they run until the sender says stop.
    fn start_members(
        &self,
        tally: &Arc<Tally>,
    ) -> (watch::Sender<bool>, JoinSet<anyhow::Result<()>>) {
        let (stop, stopped) = watch::channel(false);
        let mut set = JoinSet::new();
        for m in 0..self.members {
            let cfg = MemberConfig {
                group: self.group.to_string(),
                name: format!("m{m}"),
                credits: self.args.credits,
                ack: self.args.ack,
            };
            set.spawn(run_member(
                self.client.clone(),
                cfg,
                tally.clone(),
                stopped.clone(),
            ));
        }
        (stop, set)
    }

    fn shard_key(&self, n: u64) -> Bytes {
        Bytes::from(format!("{}k{}", self.prefix, n % self.args.shard_keys))
    }

    async fn backlog(&self) -> anyhow::Result<BacklogResult> {
        let events = self.args.events;
        let written = Instant::now();
        self.write_backlog().await?;
        let write_s = written.elapsed().as_secs_f64();
        let cpu_before = server_cpu(&self.args.server_pids)?;
        let tally = Tally::new();
        let started = Instant::now();
        let (stop, mut set) = self.start_members(&tally);
        self.wait_handled(&tally, &mut set, started).await?;
        let counts = tally.counts();
        let consume_s = counts
            .last_done
            .map_or(0.0, |t| t.saturating_duration_since(started).as_secs_f64());
        let applied_s = match self.args.ack {
            AckMode::Plain => Some(self.wait_applied(started).await?),
            AckMode::Txn => None,
        };
        let _ = stop.send(true);
        stop_members(set).await?;
        let cpu = server_cpu(&self.args.server_pids)?
            .zip(cpu_before)
            .map(|(after, before)| after.saturating_sub(before));
        let per_s = |s: f64| {
            if s > 0.0 {
                round3(events as f64 / s)
            } else {
                0.0
            }
        };
        Ok(BacklogResult {
            members: self.members,
            events,
            write_s: round3(write_s),
            consume_s: round3(consume_s),
            events_per_s: per_s(consume_s),
            applied_s: applied_s.map(round3),
            applied_events_per_s: applied_s.map(per_s),
            counts,
            cpu_s_per_1000: cpu.and_then(|c| per_thousand_ops(c, events)),
        })
    }

    /// Waits until the members have handled every backlog event. Fails when a member ends, after
    /// `CONSUME_TIMEOUT`, or when nothing was handled for `STALL_TIMEOUT` (then it says on
    /// stderr which slots hold the events left).
    async fn wait_handled(
        &self,
        tally: &Tally,
        set: &mut JoinSet<anyhow::Result<()>>,
        started: Instant,
    ) -> anyhow::Result<()> {
        let events = self.args.events;
        let deadline = started + CONSUME_TIMEOUT;
        loop {
            let notified = tally.progress.notified();
            let counts = tally.counts();
            if counts.done >= events {
                return Ok(());
            }
            // A member that ends before it is told to stop leaves events nobody handles.
            if let Some(ended) = set.try_join_next() {
                match ended {
                    Ok(Ok(())) => bail!("a member's stream ended before the backlog was handled"),
                    Ok(Err(e)) => bail!("a member failed: {e:#}"),
                    Err(e) => bail!("a member panicked: {e}"),
                }
            }
            let idle = counts.last_done.unwrap_or(started).elapsed();
            if idle >= STALL_TIMEOUT {
                self.explain_missing(events - counts.done).await;
                bail!(
                    "stalled: nothing handled for {idle:.0?} with {} of {events} events left",
                    events - counts.done
                );
            }
            ensure!(
                Instant::now() < deadline,
                "after {CONSUME_TIMEOUT:?} the members had handled {} of {events} events",
                counts.done
            );
            // Woken by progress, or after a while to look at the members again.
            let _ = tokio::time::timeout(MEMBERS_CHECK, notified).await;
        }
    }

    /// Writes `--events` puts, `--batch` per Txn under one shard key, `--writers` at a time.
    async fn write_backlog(&self) -> anyhow::Result<()> {
        let (events, batch) = (self.args.events, u64::from(self.args.batch));
        let txns = events.div_ceil(batch);
        let value = Bytes::from(vec![b'v'; self.args.value_size]);
        let next = AtomicU64::new(0);
        let writer = |_| async {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= txns {
                    return Ok::<_, anyhow::Error>(());
                }
                let shard_key = self.shard_key(n);
                let puts = batch.min(events - n * batch);
                let success = (0..puts)
                    .map(|i| put_op(&shard_key, format!("{}e{n}-{i}", self.prefix), &value))
                    .collect();
                let req = TxnRequest {
                    success,
                    ..TxnRequest::default()
                };
                self.client
                    .txn(req)
                    .await
                    .with_context(|| format!("backlog Txn {n}"))?;
            }
        };
        join_all((0..self.args.writers).map(writer))
            .await
            .into_iter()
            .collect()
    }

    /// Polls `DescribeGroup` until no slot has lag (every ack applied); the time from `started`.
    async fn wait_applied(&self, started: Instant) -> anyhow::Result<f64> {
        let deadline = Instant::now() + APPLIED_TIMEOUT;
        loop {
            let g = self.client.describe_group(self.group).await?;
            if g.lag_events == 0 && g.pending == 0 {
                return Ok(started.elapsed().as_secs_f64());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{APPLIED_TIMEOUT:?} after the last ack group {} still lags {} events \
                     ({} pending)",
                    self.group,
                    g.lag_events,
                    g.pending
                );
            }
            tokio::time::sleep(APPLIED_POLL).await;
        }
    }

    async fn live(&self) -> anyhow::Result<LiveResult> {
        let tally = Tally::new();
        let (stop, set) = self.start_members(&tally);
        let start = Instant::now();
        let measure_from = start + self.args.warmup;
        tally.delivered.arm(measure_from);
        if self.args.ack == AckMode::Txn {
            tally.applied.arm(measure_from);
        }
        let (written, write_errors) = self.write_live(start, &tally).await;
        let delivered = tally.delivered.drain().await;
        if delivered.missing > 0 {
            self.explain_missing(delivered.missing).await;
        }
        let ack_applied = match self.args.ack {
            AckMode::Txn => Some(tally.applied.drain().await),
            AckMode::Plain => None,
        };
        let _ = stop.send(true);
        stop_members(set).await?;
        Ok(LiveResult {
            members: self.members,
            rate: self.args.rate,
            written,
            write_errors,
            delivered,
            ack_applied,
            counts: tally.counts(),
        })
    }

    /// Says on stderr where the group stands when writes' events never arrived: the slots with
    /// lag or deliveries in flight (a bench finding, not a bench failure).
    async fn explain_missing(&self, missing: u64) {
        let g = match self.client.describe_group(self.group).await {
            Ok(g) => g,
            Err(s) => return eprintln!("{missing} events not handled; describe failed: {s}"),
        };
        eprintln!(
            "{missing} events not handled in time; group {} lags {} events, {} pending, {} \
             parked",
            self.group, g.lag_events, g.pending, g.parked
        );
        for s in g.slots.iter().filter(|s| s.lag_events > 0 || s.pending > 0) {
            eprintln!(
                "  slot {}: committed {} lag {} ({} ms) pending {} redeliveries {}",
                s.slot, s.committed_seq, s.lag_events, s.lag_ms, s.pending, s.redeliveries
            );
        }
    }

    /// Open loop: put `i` is due `i / rate` after `start`, for warm-up + duration; each
    /// acknowledgement goes to the probes. Returns (acknowledged, failed).
    async fn write_live(&self, start: Instant, tally: &Arc<Tally>) -> (u64, u64) {
        let total = self.args.warmup + self.args.duration;
        let value = Bytes::from(vec![b'v'; self.args.value_size]);
        let room = Arc::new(Semaphore::new(LIVE_WRITES_IN_FLIGHT_MAX));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut puts = JoinSet::new();
        for i in 0u64.. {
            let due = start + Duration::from_secs_f64(i as f64 / self.args.rate);
            if due >= start + total {
                break;
            }
            tokio::time::sleep_until(due).await;
            let Ok(permit) = room.clone().acquire_owned().await else {
                break;
            };
            let (client, tally) = (self.client.clone(), tally.clone());
            let (shard_key, key) = (
                self.shard_key(i),
                Bytes::from(format!("{}l{i}", self.prefix)),
            );
            let (value, ok, failed) = (value.clone(), ok.clone(), failed.clone());
            puts.spawn(async move {
                match client
                    .put(shard_key.clone(), key.clone(), value, None)
                    .await
                {
                    Ok(r) => {
                        tally
                            .delivered
                            .acked(shard_key.clone(), key.clone(), r.version);
                        tally.applied.acked(shard_key, key, r.version);
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                drop(permit);
            });
            while puts.try_join_next().is_some() {}
        }
        while puts.join_next().await.is_some() {}
        (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
    }
}

fn put_op(shard_key: &Bytes, key: String, value: &Bytes) -> TxnOp {
    TxnOp {
        op: Some(txn_op::Op::Put(PutRequest {
            header: None,
            shard_key: shard_key.clone(),
            key: Bytes::from(key),
            value: value.clone(),
            if_version: None,
        })),
    }
}

/// Waits for the stopped members; the first failure is the run's.
async fn stop_members(mut set: JoinSet<anyhow::Result<()>>) -> anyhow::Result<()> {
    while let Some(r) = set.join_next().await {
        r.context("a member panicked")??;
    }
    Ok(())
}

/// The servers' CPU time so far, if --server-pids names them.
pub(crate) fn server_cpu(pids: &[u32]) -> anyhow::Result<Option<Duration>> {
    if pids.is_empty() {
        return Ok(None);
    }
    let mut total = Duration::ZERO;
    for &pid in pids {
        total += pid_cpu(pid)?;
    }
    Ok(Some(total))
}

fn ack_name(ack: AckMode) -> &'static str {
    match ack {
        AckMode::Plain => "plain",
        AckMode::Txn => "txn",
    }
}

fn backlog_line(r: &BacklogResult, ack: AckMode) -> String {
    let applied = match (r.applied_s, r.applied_events_per_s) {
        (Some(s), Some(per_s)) => {
            format!("; every ack applied after {s:.2} s: {per_s:.0} events/s")
        }
        _ => String::new(),
    };
    format!(
        "groups backlog members {} ack {}: {} events handled in {:.2} s: {:.0} events/s{applied} \
         ({} deliveries, {} redeliveries, {} refused, {} stale txn acks){}",
        r.members,
        ack_name(ack),
        r.events,
        r.consume_s,
        r.events_per_s,
        r.counts.deliveries,
        r.counts.redeliveries,
        r.counts.refused,
        r.counts.txn_stale,
        r.cpu_s_per_1000.map_or_else(String::new, |c| format!(
            "; server CPU {c:.3} s per 1000 events"
        ))
    )
}

fn latency_text(l: &Latency) -> String {
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    format!(
        "{} matched, p50 {} p90 {} p99 {} max {} ms, {} missing",
        l.matched,
        ms(l.p50_ms),
        ms(l.p90_ms),
        ms(l.p99_ms),
        ms(l.max_ms),
        l.missing
    )
}

fn live_line(r: &LiveResult, ack: AckMode) -> String {
    let mut line = format!(
        "groups live members {} ack {} at {}/s: {} written ({} failed); write acked -> \
         delivered: {}",
        r.members,
        ack_name(ack),
        r.rate,
        r.written,
        r.write_errors,
        latency_text(&r.delivered)
    );
    if let Some(a) = &r.ack_applied {
        line += &format!("; write acked -> ack applied: {}", latency_text(a));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse_and_are_checked() {
        let a = GroupsArgs::try_parse_from(["groups", "-e", "r:1"]).unwrap();
        a.check().unwrap();
        assert_eq!(a.members, [1, 4, 16]);
        assert_eq!(a.phase, [Phase::Backlog, Phase::Live]);
        assert_eq!(a.ack, AckMode::Plain);
        let a = GroupsArgs::try_parse_from([
            "groups",
            "-e",
            "r:1",
            "--members",
            "2",
            "--phase",
            "live",
            "--ack",
            "txn",
            "--rate",
            "50",
        ])
        .unwrap();
        a.check().unwrap();
        assert_eq!((a.members.as_slice(), a.ack), (&[2][..], AckMode::Txn));
        for bad in [
            &["groups", "-e", "r:1", "--members", "0"][..],
            &["groups", "-e", "r:1", "--batch", "129"],
            &["groups", "-e", "r:1", "--credits", "0"],
            &["groups", "-e", "r:1", "--rate", "0"],
        ] {
            let parsed = GroupsArgs::try_parse_from(bad);
            assert!(
                parsed.is_err() || parsed.unwrap().check().is_err(),
                "{bad:?}"
            );
        }
    }
}
