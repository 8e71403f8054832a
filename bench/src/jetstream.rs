//! `ordo-bench jetstream` (feature `nats`): the peer of `ordo-bench groups`' backlog phase on
//! NATS JetStream, the comparison issue 14 names. For each member count a fresh stream (file
//! storage, `--replicas` copies) gets `--events` messages over `--subjects` subjects (Ordo's
//! shard keys), then that many pull consumers share one durable consumer (explicit acks, at
//! most `--credits` × members unacked: Ordo's credits per member), each acking every message at
//! once, as Ordo's plain acks (no confirmation awaited). Timed to the last ack sent, then until
//! the consumer reports nothing pending and nothing unacked (every ack applied). JetStream
//! keeps no per-subject order across pull consumers: the figures compare raw sharing only.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use async_nats::jetstream::{self, consumer, stream};
use async_nats::ServerAddr;
use bytes::Bytes;
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::args::parse_duration;
use crate::cpu::per_thousand_ops;
use crate::groups::server_cpu;
use crate::report::round3;

/// How long consumers may take to handle a backlog before the run fails.
const CONSUME_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the acks may take to be applied after the last one was sent.
const APPLIED_TIMEOUT: Duration = Duration::from_secs(30);
const APPLIED_POLL: Duration = Duration::from_millis(50);
/// How long stream creation is retried while the cluster elects its leaders.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Publishes whose acks are awaited together (a window of pipelined publishes).
const PUBLISH_WINDOW: usize = 256;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "ordo-bench jetstream",
    about = "The consumer-group backlog test on NATS JetStream (see bench/README.md)"
)]
pub struct JetStreamArgs {
    /// NATS server URLs, comma-separated (bench/nats.sh urls).
    #[arg(long, short = 's', value_delimiter = ',', required = true)]
    pub servers: Vec<String>,
    /// Member counts (pull consumers sharing one durable consumer), one stream each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub members: Vec<u32>,
    /// Messages written before the consumers start.
    #[arg(long, default_value_t = 20_000)]
    pub events: u64,
    /// Distinct subjects the messages are spread over (Ordo's shard keys).
    #[arg(long, default_value_t = 1_000)]
    pub subjects: u64,
    /// Unacked messages per consumer (the durable's max_ack_pending is this × members) and
    /// each pull's batch.
    #[arg(long, default_value_t = 64)]
    pub credits: u32,
    /// Copies of the stream.
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Bytes per message.
    #[arg(long, default_value_t = 128)]
    pub value_size: usize,
    /// Deadline of each publish and admin request.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// PIDs of the servers whose CPU time to report.
    #[arg(long, value_delimiter = ',')]
    pub server_pids: Vec<u32>,
    /// Write the JSON report to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct JetStreamResult {
    pub members: u32,
    pub events: u64,
    pub write_s: f64,
    pub consume_s: f64,
    pub events_per_s: f64,
    pub applied_s: f64,
    pub applied_events_per_s: f64,
    pub deliveries: u64,
    pub redeliveries: u64,
    pub cpu_s_per_1000: Option<f64>,
}

/// Distinct stream sequences acked, and when the last new one was.
#[derive(Default)]
struct Acked {
    seen: HashSet<u64>,
    deliveries: u64,
    redeliveries: u64,
    last: Option<Instant>,
}

pub fn main(argv: Vec<String>) -> anyhow::Result<()> {
    let args = JetStreamArgs::parse_from(argv);
    ensure!(
        args.members.iter().all(|&m| (1..=1024).contains(&m)),
        "--members: each count must be from 1 to 1024"
    );
    ensure!(
        args.subjects > 0 && args.credits > 0,
        "--subjects and --credits must be at least 1"
    );
    let results = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run(&args))?;
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("report: {}", path.display());
    }
    Ok(())
}

async fn run(args: &JetStreamArgs) -> anyhow::Result<Vec<JetStreamResult>> {
    let addrs: Vec<ServerAddr> = args
        .servers
        .iter()
        .map(|s| s.parse().with_context(|| format!("server URL {s:?}")))
        .collect::<anyhow::Result<_>>()?;
    let client = async_nats::ConnectOptions::new()
        .request_timeout(Some(args.timeout))
        .connect(addrs)
        .await
        .context("connecting to NATS")?;
    let js = jetstream::new(client);
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut results = Vec::new();
    for &members in &args.members {
        let name = format!("BENCH_{run_id}_M{members}");
        let subject = format!("bench.{run_id}.m{members}");
        let r = backlog(&js, args, &name, &subject, members).await?;
        println!(
            "jetstream backlog members {members}: {} events handled in {:.2} s: {:.0} events/s; \
             every ack applied after {:.2} s: {:.0} events/s ({} deliveries, {} redeliveries){}",
            r.events,
            r.consume_s,
            r.events_per_s,
            r.applied_s,
            r.applied_events_per_s,
            r.deliveries,
            r.redeliveries,
            r.cpu_s_per_1000.map_or_else(String::new, |c| format!(
                "; server CPU {c:.3} s per 1000 events"
            ))
        );
        js.delete_stream(&name)
            .await
            .with_context(|| format!("deleting stream {name}"))?;
        results.push(r);
    }
    Ok(results)
}

/// Creates the stream, retrying while the cluster has no leader for it yet (bounded).
async fn create_stream(
    js: &jetstream::Context,
    args: &JetStreamArgs,
    name: &str,
    subject: &str,
) -> anyhow::Result<stream::Stream> {
    let config = stream::Config {
        name: name.to_string(),
        subjects: vec![format!("{subject}.>")],
        storage: stream::StorageType::File,
        num_replicas: args.replicas,
        ..Default::default()
    };
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        match js.create_stream(config.clone()).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                eprintln!("creating stream {name}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => bail!("creating stream {name} for {SETUP_TIMEOUT:?}: {e}"),
        }
    }
}

/// Publishes `--events` messages, a window of acks awaited at a time.
async fn publish(
    js: &jetstream::Context,
    args: &JetStreamArgs,
    subject: &str,
) -> anyhow::Result<()> {
    let value = Bytes::from(vec![b'v'; args.value_size]);
    let mut window = Vec::with_capacity(PUBLISH_WINDOW);
    for i in 0..args.events {
        let to = format!("{subject}.k{}", i % args.subjects);
        window.push(js.publish(to, value.clone()).await.context("publishing")?);
        if window.len() == PUBLISH_WINDOW || i + 1 == args.events {
            for ack in window.drain(..) {
                ack.await.context("a publish's ack")?;
            }
        }
    }
    Ok(())
}

async fn backlog(
    js: &jetstream::Context,
    args: &JetStreamArgs,
    name: &str,
    subject: &str,
    members: u32,
) -> anyhow::Result<JetStreamResult> {
    let stream = create_stream(js, args, name, subject).await?;
    let written = Instant::now();
    publish(js, args, subject).await?;
    let write_s = written.elapsed().as_secs_f64();
    let mut durable: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("bench".to_string()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: i64::from(args.credits) * i64::from(members),
            ..Default::default()
        })
        .await
        .context("creating the durable consumer")?;
    let cpu_before = server_cpu(&args.server_pids)?;
    let acked = Arc::new(Mutex::new(Acked::default()));
    let (stop, stopped) = watch::channel(false);
    let started = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..members {
        set.spawn(consume(
            durable.clone(),
            args.credits,
            acked.clone(),
            stopped.clone(),
        ));
    }
    let deadline = started + CONSUME_TIMEOUT;
    while acked.lock().expect("acked lock").seen.len() < args.events as usize {
        if let Some(ended) = set.try_join_next() {
            match ended {
                Ok(Ok(())) => bail!("a consumer ended before the backlog was handled"),
                Ok(Err(e)) => bail!("a consumer failed: {e:#}"),
                Err(e) => bail!("a consumer panicked: {e}"),
            }
        }
        ensure!(
            Instant::now() < deadline,
            "the consumers did not handle {} events in {CONSUME_TIMEOUT:?}",
            args.events
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (consume_s, deliveries, redeliveries) = {
        let a = acked.lock().expect("acked lock");
        let last = a
            .last
            .map_or(0.0, |t| t.saturating_duration_since(started).as_secs_f64());
        (last, a.deliveries, a.redeliveries)
    };
    let applied_deadline = Instant::now() + APPLIED_TIMEOUT;
    loop {
        let info = durable.info().await.context("consumer info")?;
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        ensure!(
            Instant::now() < applied_deadline,
            "{APPLIED_TIMEOUT:?} after the last ack the consumer still has {} pending, {} unacked",
            info.num_pending,
            info.num_ack_pending
        );
        tokio::time::sleep(APPLIED_POLL).await;
    }
    let applied_s = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    while let Some(r) = set.join_next().await {
        r.context("a consumer panicked")??;
    }
    let cpu = server_cpu(&args.server_pids)?
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    let per_s = |s: f64| {
        if s > 0.0 {
            round3(args.events as f64 / s)
        } else {
            0.0
        }
    };
    Ok(JetStreamResult {
        members,
        events: args.events,
        write_s: round3(write_s),
        consume_s: round3(consume_s),
        events_per_s: per_s(consume_s),
        applied_s: round3(applied_s),
        applied_events_per_s: per_s(applied_s),
        deliveries,
        redeliveries,
        cpu_s_per_1000: cpu.and_then(|c| per_thousand_ops(c, args.events)),
    })
}

/// One pull consumer: pulls batches of `credits`, acks each message at once.
async fn consume(
    durable: consumer::PullConsumer,
    credits: u32,
    acked: Arc<Mutex<Acked>>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut messages = durable
        .stream()
        .max_messages_per_batch(credits as usize)
        .messages()
        .await
        .context("opening a pull stream")?
        .map_err(anyhow::Error::from);
    loop {
        let next = tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(()),
            next = messages.next() => next,
        };
        let Some(msg) = next else {
            return Ok(());
        };
        let msg = msg.context("a pulled message")?;
        let (seq, delivered) = {
            let info = msg
                .info()
                .map_err(|e| anyhow::anyhow!("message info: {e}"))?;
            (info.stream_sequence, info.delivered)
        };
        msg.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
        let mut a = acked.lock().expect("acked lock");
        a.deliveries += 1;
        if delivered > 1 {
            a.redeliveries += 1;
        }
        if a.seen.insert(seq) {
            a.last = Some(Instant::now());
        }
    }
}
