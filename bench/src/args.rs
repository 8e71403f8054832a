//! The command line: what `ordo-bench --help` documents, and the checks a run needs before it
//! starts.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use clap::Parser;
use ordo::node::Capture;

use crate::workload::{self, Distribution, Mix, Op, Workload};

#[derive(Parser, Debug)]
#[command(
    name = "ordo-bench",
    version,
    about = "Load generator for the Ordo key-value store: YCSB A-F and an order-system workload, \
             closed or open loop, against Ordo, an in-process playground, etcd or NATS \
             JetStream KV",
    after_help = "\
Examples:
  ordo-bench --playground --workload orders --clients 16 --duration 20s
  ordo-bench -e 127.0.0.1:7000 --workload a --rate 2000 --clients 64
  ordo-bench --target etcd://127.0.0.1:2379,127.0.0.1:22379 --workload a --server-pids 11,12,13
  ordo-bench --target nats://127.0.0.1:24221,127.0.0.1:24223 --mix update=100 (--features nats)

Durations take a unit (us, ms, s, m, h, or another humantime spelling such as 1m30s); a bare \
number is seconds. Error kinds in the table are gRPC codes, or Conflict (a version compare \
failed), NotFound (the chosen record or order is missing), Terminal (the order is already \
delivered), NoRecords (nothing to choose from yet), MissingItems (an order read without all its \
line items)."
)]
pub struct Args {
    /// Ordo addresses (a router, or the nodes of one group), comma-separated or repeated.
    #[arg(
        long,
        short = 'e',
        alias = "endpoint",
        env = "ORDO_ENDPOINT",
        value_delimiter = ','
    )]
    pub endpoints: Vec<String>,

    /// Another target instead of --endpoints: `etcd://host:port[,host:port...]` (etcd v3 gRPC),
    /// `nats://host:port[,...]` (a NATS JetStream KV bucket; gets, updates and inserts only;
    /// needs a build with `--features nats`) or `ordo://host:port[,...]`.
    #[arg(long, conflicts_with_all = ["endpoints", "playground"])]
    pub target: Option<String>,

    /// Start a local Ordo cluster in-process (temp dir, free ports) and run against its router.
    #[arg(long, conflicts_with = "endpoints")]
    pub playground: bool,

    /// Shard groups of the --playground cluster (`--groups 1`: one group behind a router).
    #[arg(long, default_value_t = 3)]
    pub groups: u64,

    /// Replicas per group of the --playground cluster; with a nats:// target, the replicas of
    /// the KV bucket the bench creates.
    #[arg(long, default_value_t = 3)]
    pub replicas: u64,

    /// With a nats:// target: the KV bucket (created if missing: history 1, --replicas copies,
    /// file storage).
    #[arg(long, default_value = "ordo_bench")]
    pub nats_bucket: String,

    /// The workload: YCSB core a-f, orders, or txn (2-record Txns in one group and across two).
    #[arg(long, short = 'w', value_enum, default_value_t = Workload::A)]
    pub workload: Workload,

    /// Override the workload's op mix, e.g. `read=90,update=10` or, for orders,
    /// `create=20,advance=50,read=30`. Ops: read, update, insert, scan, rmw, order_create,
    /// order_advance, order_read.
    #[arg(long)]
    pub mix: Option<Mix>,

    /// Override the workload's key distribution.
    #[arg(long, value_enum)]
    pub distribution: Option<Distribution>,

    /// Concurrent workers (closed loop: clients, each with one request in flight; open loop:
    /// senders the rate is spread over).
    #[arg(long, short = 'c', default_value_t = 16)]
    pub clients: usize,

    /// Open loop: send this many requests per second in total, on a fixed schedule, and measure
    /// latency from each request's intended start. Without it: closed loop.
    #[arg(long)]
    pub rate: Option<f64>,

    /// How long to measure, after the warm-up.
    #[arg(long, short = 'd', default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// With --playground: this long into the measurement, start one more group, register it
    /// and rebalance onto it (online resharding) while the load runs; the moves, their pauses
    /// and the rebalance window are printed with the report.
    #[arg(long, requires = "playground", value_parser = parse_duration)]
    pub rebalance_at: Option<Duration>,

    /// With --playground: what the cluster's change feed captures (off, new, old-and-new), as
    /// `ordo playground --feed-capture` [default: new].
    #[arg(long)]
    pub feed_capture: Option<Capture>,

    /// Before the run (after the load phase): write this many change-feed events' worth of puts
    /// (new items, Txns of 64 puts of --value-size bytes under one shard key), so that the feed
    /// holds a log to catch up on or to stall behind.
    #[arg(long, default_value_t = 0)]
    pub feed_backlog: u64,

    /// Before the run: one watcher reads the feed from its oldest event until it has every
    /// event committed before it opened; reports events/s and MB/s.
    #[arg(long)]
    pub feed_catch_up: bool,

    /// During the run: hold a watcher opened from the oldest event that reads its first
    /// response and then nothing (a stalled reader, as far behind as the log is long).
    #[arg(long)]
    pub feed_stall: bool,

    /// During the run: a watcher from now matches every acknowledged write to its event by
    /// (shard key, key, version); reports the latency from acknowledgement to event received.
    #[arg(long)]
    pub feed_latency: bool,

    /// How long to send load before measuring; these requests are not reported.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Records (YCSB) or orders loaded before the run [default: 10000, orders: 1000].
    #[arg(long, alias = "keys")]
    pub records: Option<u64>,

    /// Skip the load phase: the records of an earlier run with the same --records and
    /// --items-per-shard are assumed present (orders need --order-prefix of that run).
    #[arg(long)]
    pub no_load: bool,

    /// Bytes per written value (records, order line items, order root payload).
    #[arg(long, default_value_t = 128)]
    pub value_size: usize,

    /// YCSB records per shard key (consecutive records share one; scans stay inside it).
    #[arg(long, default_value_t = 10)]
    pub items_per_shard: u64,

    /// Most items one scan asks for (drawn uniformly from 1 to this).
    #[arg(long, default_value_t = 10)]
    pub scan_length: u32,

    /// Line items per new order.
    #[arg(long, default_value_t = 3)]
    pub order_items: u32,

    /// Prefix of this run's order IDs [default: derived from the start time, so runs against one
    /// cluster do not collide].
    #[arg(long)]
    pub order_prefix: Option<String>,

    /// Read with stale consistency (Ordo) / serializable (etcd) instead of linearizable.
    #[arg(long)]
    pub stale_reads: bool,

    /// Seed of the key and value generators; the same seed draws the same requests.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Deadline of each request, the client's retries included.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Runtime worker threads (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,

    /// PIDs of the server processes (comma-separated) whose CPU time to report; with
    /// --playground the bench's own CPU time covers the cluster.
    #[arg(long, value_delimiter = ',')]
    pub server_pids: Vec<u32>,

    /// Directory for the JSON report and the SVG plot [default: bench/out].
    #[arg(long)]
    pub out: Option<PathBuf>,

    /// Also write the JSON report to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// No progress bar or progress lines.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Where the requests go.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    Ordo(Vec<String>),
    Playground,
    Etcd(Vec<String>),
    Nats(Vec<String>),
}

impl Args {
    pub fn target(&self) -> anyhow::Result<Target> {
        if self.playground {
            return Ok(Target::Playground);
        }
        if let Some(t) = &self.target {
            let (scheme, rest) = t.split_once("://").with_context(|| {
                format!("--target {t:?}: expected etcd://…, nats://… or ordo://…")
            })?;
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
                "nats" => Ok(Target::Nats(addrs)),
                other => bail!("--target scheme {other:?} is not supported (etcd, nats or ordo)"),
            };
        }
        ensure!(
            !self.endpoints.is_empty(),
            "no target: pass --endpoints (or ORDO_ENDPOINT), --playground or --target"
        );
        Ok(Target::Ordo(self.endpoints.clone()))
    }

    pub fn mix(&self) -> anyhow::Result<Mix> {
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

    pub fn records(&self) -> u64 {
        self.records
            .unwrap_or_else(|| self.workload.default_records())
    }

    pub fn check(&self) -> anyhow::Result<()> {
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
        let target = self.target()?;
        let feed =
            self.feed_backlog > 0 || self.feed_catch_up || self.feed_stall || self.feed_latency;
        ensure!(
            !feed || matches!(target, Target::Ordo(_) | Target::Playground),
            "the --feed-* options need an Ordo target (a router or --playground)"
        );
        if let Target::Nats(_) = target {
            check_nats(&self.mix()?)?;
        }
        // (`requires` cannot say it: a flag that is not given still has its default, false.)
        ensure!(
            self.feed_capture.is_none() || self.playground,
            "--feed-capture sets the --playground's capture; start another cluster with \
             `ordo playground --feed-capture` (or `ordo node`)"
        );
        self.mix()?;
        Ok(())
    }
}

/// A nats:// target: the bench is built with it, and the mix only gets and puts (a KV bucket has
/// no scan and no transaction).
fn check_nats(mix: &Mix) -> anyhow::Result<()> {
    ensure!(
        cfg!(feature = "nats"),
        "--target nats:// needs the NATS client: build ordo-bench with --features nats \
         (cargo build --release -p ordo-bench --features nats)"
    );
    let unsupported: Vec<&str> = mix
        .ops()
        .filter(|op| !matches!(op, Op::Read | Op::Update | Op::Insert))
        .map(Op::name)
        .collect();
    ensure!(
        unsupported.is_empty(),
        "--mix {mix}: {} not supported by the NATS KV backend (it runs read, update and insert: \
         workloads a-d, or a --mix of those)",
        unsupported.join(", ")
    );
    Ok(())
}

/// Parses a duration as `humantime` does (`10s`, `500ms`, `250us`, `1.5s`, `2m`, `1h`,
/// `1h 30m`); a bare number is seconds (`10`, `0.5`).
pub fn parse_duration(raw: &str) -> anyhow::Result<Duration> {
    let s = raw.trim();
    let bare = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    let with_unit = if bare { format!("{s}s") } else { s.to_string() };
    humantime::parse_duration(&with_unit).with_context(|| format!("duration {raw:?}"))
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
    fn every_spelling_of_the_earlier_grammar_still_parses() {
        for (raw, want) in [
            ("10 s", Duration::from_secs(10)),
            ("5sec", Duration::from_secs(5)),
            ("5secs", Duration::from_secs(5)),
            ("3min", Duration::from_secs(180)),
            ("250µs", Duration::from_micros(250)),
            ("0.5", Duration::from_millis(500)),
            ("1.5m", Duration::from_secs(90)),
        ] {
            assert_eq!(parse_duration(raw).unwrap(), want, "{raw:?}");
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
        let etcd_feed = [
            "ordo-bench",
            "--target",
            "etcd://127.0.0.1:2379",
            "--feed-latency",
        ];
        assert!(Args::try_parse_from(etcd_feed).unwrap().check().is_err());
        let pg_feed = Args::try_parse_from([
            "ordo-bench",
            "--playground",
            "--feed-capture",
            "old-and-new",
            "--feed-backlog",
            "1000",
            "--feed-stall",
        ])
        .unwrap();
        pg_feed.check().unwrap();
        assert_eq!(pg_feed.feed_capture, Some(Capture::OldAndNew));
        let capture_elsewhere = ["ordo-bench", "-e", "a:1", "--feed-capture", "new"];
        assert!(Args::try_parse_from(capture_elsewhere)
            .unwrap()
            .check()
            .is_err());
        let none = Args::try_parse_from(["ordo-bench"]).unwrap();
        if std::env::var_os("ORDO_ENDPOINT").is_none() {
            assert!(none.check().is_err());
        }
    }

    #[test]
    fn nats_targets_parse_and_take_gets_and_puts_only() {
        let nats = |extra: &[&str]| {
            let mut argv = vec![
                "ordo-bench",
                "--target",
                "nats://127.0.0.1:24221,127.0.0.1:24223",
            ];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv).unwrap()
        };
        assert_eq!(
            nats(&[]).target().unwrap(),
            Target::Nats(vec!["127.0.0.1:24221".into(), "127.0.0.1:24223".into()])
        );
        assert_eq!(nats(&[]).nats_bucket, "ordo_bench");
        let writes = nats(&["--mix", "update=100", "--distribution", "uniform"]);
        let checked = writes.check();
        if cfg!(feature = "nats") {
            checked.unwrap();
        } else {
            let e = checked.unwrap_err().to_string();
            assert!(e.contains("--features nats"), "{e}");
        }
        for unsupported in [
            &["--workload", "e"][..],
            &["--workload", "f"],
            &["--workload", "orders"],
        ] {
            assert!(nats(unsupported).check().is_err(), "{unsupported:?}");
        }
        assert!(nats(&["--feed-latency"]).check().is_err());
    }
}
