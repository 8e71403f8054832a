//! `ordo`: the server binary. `node` runs one replica of a shard group, `config` one config
//! server, `router` a query router, and `playground` a whole local cluster in one process.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use ordo::limits::{
    CACHE_BYTES_DEFAULT, CACHE_BYTES_MIN, COMPACT_LOG_ENTRIES_DEFAULT, DEDUP_WINDOW_SECS_DEFAULT,
    FEED_PROTECT_BYTES_DEFAULT, FEED_PROTECT_SECS_DEFAULT, FEED_RETENTION_BYTES_DEFAULT,
    FEED_RETENTION_SECS_DEFAULT, PLAYGROUND_CACHE_BYTES_DEFAULT, SLOT_COUNT_DEFAULT,
};
use ordo::node::{check_dedup_window, parse_peers, Capture, FeedConfig, Node, NodeConfig};

use ordo::playground::{Playground, PlaygroundConfig};
use ordo_config::migration::COPY_BYTES_PER_SEC;
use ordo_proto::serve::{ServeLimits, CONNECTIONS_MAX_DEFAULT, REQUEST_BYTES_BUDGET_DEFAULT};

#[derive(Parser)]
#[command(
    name = "ordo",
    version,
    about = "Ordo: a sharded, Raft-replicated, transactional KV store for orders"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    serve: ServeArgs,
}

/// The bounds of the process's gRPC servers (`ordo_proto::serve`), for every command.
#[derive(Args)]
struct ServeArgs {
    /// Most connections a server keeps open; new ones past it are closed at once.
    #[arg(long, global = true, env = "ORDO_CONNECTIONS_MAX", default_value_t = CONNECTIONS_MAX_DEFAULT)]
    connections_max: usize,
    /// Bytes that requests being received or handled may hold, over the whole process; a
    /// request past it is refused with RESOURCE_EXHAUSTED before it is read.
    #[arg(long, global = true, env = "ORDO_REQUEST_BYTES_BUDGET", default_value_t = REQUEST_BYTES_BUDGET_DEFAULT)]
    request_bytes_budget: usize,
}

/// What every replica is told at start, a shard group's (`ordo node`) or a config server's
/// (`ordo config`): who it is, where it serves, its peers, its data and whether it joins.
///
/// The help below is `ordo node`'s; `ordo config` words some of it for the config group.
/// `display_order` keeps `ordo node`'s flags in their order, `--group` after `--id` and
/// `--compact-log-entries` before `--join`.
#[derive(Args)]
struct ReplicaArgs {
    /// This replica's raft id (non-zero, unique in the group).
    #[arg(long, display_order = 0)]
    id: u64,
    /// Address to serve clients and peers on.
    #[arg(long, display_order = 2)]
    listen: String,
    /// Every replica of the group, this one included: `1=host:port,2=host:port,3=host:port`.
    #[arg(long, display_order = 3)]
    peers: String,
    /// Where this replica keeps its data (created if missing).
    #[arg(long, display_order = 4)]
    data_dir: PathBuf,
    /// Join a running group instead of founding one: start empty, then run `ordoctl replica
    /// add` (or `replace`) to make this node a member. --peers lists the group's current
    /// replicas and this node.
    #[arg(long, display_order = 6)]
    join: bool,
    /// How long a write's idempotency key is remembered, in seconds (1 to 86400): a write sent
    /// again with its key within this window is answered with its first outcome and not applied
    /// again. The leader's value is the one that counts (replicas apply by the stamp it puts on
    /// each entry).
    #[arg(long, default_value_t = DEDUP_WINDOW_SECS_DEFAULT, display_order = 7,
          value_parser = |s: &str| -> anyhow::Result<u64> { check_dedup_window(s.parse()?) })]
    dedup_window_secs: u64,
    /// sled's page cache, in MiB: a replica's memory grows with its data up to about this (the
    /// rest of its memory is bounded by fixed limits).
    #[arg(long, default_value_t = CACHE_BYTES_DEFAULT >> 20, display_order = 8, value_parser = cache_mb)]
    cache_mb: u64,
}

/// Parses `--cache-mb`, refusing a cache below `CACHE_BYTES_MIN`.
fn cache_mb(s: &str) -> anyhow::Result<u64> {
    let mb: u64 = s.parse()?;
    let min = CACHE_BYTES_MIN >> 20;
    anyhow::ensure!(
        (min..=1 << 20).contains(&mb),
        "--cache-mb {mb} is out of range: {min} to 1048576 MiB"
    );
    Ok(mb)
}

/// The change feed of a shard group's replica (`ordo node`, `ordo playground`). A leader's
/// flags are the ones that count: it stamps its capture on every entry and decides the trims.
#[derive(Args)]
struct FeedArgs {
    /// What the change feed captures: off, new (new values) or old-and-new (also the value each
    /// change replaced, about twice the bytes).
    #[arg(long, default_value = "new")]
    feed_capture: Capture,
    /// How long events are kept, in seconds.
    #[arg(long, default_value_t = FEED_RETENTION_SECS_DEFAULT, value_parser = clap::value_parser!(u64).range(1..))]
    feed_retention_secs: u64,
    /// Bytes of events a group keeps; past it the oldest go first.
    #[arg(long, default_value_t = FEED_RETENTION_BYTES_DEFAULT, value_parser = clap::value_parser!(u64).range(1..))]
    feed_retention_bytes: u64,
    /// How long events a durable consumer group has not acked are kept, in seconds (at least
    /// the retention); past it they are trimmed and the group is expired, loudly.
    #[arg(long, default_value_t = FEED_PROTECT_SECS_DEFAULT, value_parser = clap::value_parser!(u64).range(1..))]
    feed_protect_secs: u64,
    /// Bytes of events a group keeps for durable consumer groups (at least the retention's);
    /// past it the oldest go and the groups that had not acked them are expired.
    #[arg(long, default_value_t = FEED_PROTECT_BYTES_DEFAULT, value_parser = clap::value_parser!(u64).range(1..))]
    feed_protect_bytes: u64,
}

impl FeedArgs {
    fn config(&self) -> FeedConfig {
        FeedConfig {
            capture: self.feed_capture,
            retention_secs: self.feed_retention_secs,
            retention_bytes: self.feed_retention_bytes,
            protect_secs: self.feed_protect_secs,
            protect_bytes: self.feed_protect_bytes,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one replica of a shard group (starts a new group or rejoins the one in --data-dir).
    Node {
        #[command(flatten)]
        replica: ReplicaArgs,
        /// The shard group this replica belongs to (1 or more; 0 is the config servers' group).
        #[arg(long, default_value_t = 1, display_order = 1)]
        group: u64,
        /// Applied entries kept in the raft log before it is compacted.
        #[arg(long, default_value_t = COMPACT_LOG_ENTRIES_DEFAULT, display_order = 5)]
        compact_log_entries: u64,
        #[command(flatten)]
        feed: FeedArgs,
    },
    /// Run one config server: a replica of the config group that keeps the shard map.
    #[command(
        mut_arg("id", |a| a.help("This replica's raft id in the config group")),
        mut_arg("listen", |a| a.help(None::<&str>)),
        mut_arg("peers", |a| a.help("Every config replica: `1=host:port,2=host:port,3=host:port`")),
        mut_arg("data_dir", |a| a.help(None::<&str>)),
        mut_arg("join", |a| {
            a.help("Join the running config group instead of founding it (see `ordo node --join`)")
        })
    )]
    Config {
        #[command(flatten)]
        replica: ReplicaArgs,
        /// Copy bandwidth of a slot move whose request names none, in bytes per second (moves
        /// copy their data in the background while clients keep writing).
        #[arg(long, default_value_t = COPY_BYTES_PER_SEC, value_parser = clap::value_parser!(u64).range(1..), display_order = 7)]
        copy_bytes_per_sec: u64,
    },
    /// Run a query router: stateless, serves ordo.v1.Kv and forwards to the owning groups.
    Router {
        #[arg(long)]
        listen: String,
        /// Config server addresses: `host:port,host:port,...`.
        #[arg(long, required = true, value_delimiter = ',', value_parser = trimmed)]
        config: Vec<String>,
    },
    /// Run a whole local cluster in this process: 3 config replicas, groups × replicas nodes, one router.
    Playground {
        /// Where the playground keeps its data; starting again with the same dir brings it back.
        #[arg(long, default_value = "./ordo-data")]
        dir: PathBuf,
        /// Shard groups (1 to 9).
        #[arg(long, default_value_t = 3)]
        groups: u64,
        /// Replicas per group (1 to 7).
        #[arg(long, default_value_t = 3)]
        replicas: u64,
        /// The router listens on 127.0.0.1:<port>, config replica i on <port + i>, replica r of
        /// group g on <port + 10g + r>.
        #[arg(long, default_value_t = 7000)]
        port: u16,
        /// Copy bandwidth of a slot move whose request names none, in bytes per second.
        #[arg(long, default_value_t = COPY_BYTES_PER_SEC, value_parser = clap::value_parser!(u64).range(1..))]
        copy_bytes_per_sec: u64,
        #[command(flatten)]
        feed: FeedArgs,
        /// Each replica's page cache, in MiB (its data beyond it is read from disk).
        #[arg(long, default_value_t = PLAYGROUND_CACHE_BYTES_DEFAULT >> 20, value_parser = cache_mb)]
        cache_mb: u64,
    },
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn node_config(
    r: ReplicaArgs,
    group: u64,
    compact: u64,
    copy_bytes_per_sec: u64,
    feed: FeedConfig,
    serve: ServeLimits,
) -> anyhow::Result<NodeConfig> {
    Ok(NodeConfig {
        id: r.id,
        group,
        listen: r.listen,
        peers: parse_peers(&r.peers)?,
        data_dir: r.data_dir,
        compact_log_entries: compact,
        dedup_window_secs: r.dedup_window_secs,
        slot_count: SLOT_COUNT_DEFAULT,
        config_server: group == 0,
        copy_bytes_per_sec,
        link_filter: None,
        join: r.join,
        serve,
        feed,
        cache_bytes: r.cache_mb << 20,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ordo::logging::init();
    let cli = Cli::parse();
    let limits = ServeLimits::new(cli.serve.connections_max, cli.serve.request_bytes_budget)?;
    match cli.cmd {
        Cmd::Node {
            replica,
            group,
            compact_log_entries,
            feed,
        } => {
            anyhow::ensure!(
                group != 0,
                "group 0 is the config group: run `ordo config` for it"
            );
            let feed = feed.config();
            run_replica(replica, group, compact_log_entries, 0, feed, limits).await
        }
        Cmd::Config {
            replica,
            copy_bytes_per_sec,
        } => {
            let compact = COMPACT_LOG_ENTRIES_DEFAULT;
            let feed = FeedConfig::default();
            run_replica(replica, 0, compact, copy_bytes_per_sec, feed, limits).await
        }
        Cmd::Router { listen, config } => run_router(listen, config, limits).await,
        Cmd::Playground {
            dir,
            groups,
            replicas,
            port,
            copy_bytes_per_sec,
            feed,
            cache_mb,
        } => {
            let cfg = PlaygroundConfig {
                groups,
                replicas,
                port: Some(port),
                copy_bytes_per_sec,
                serve: limits,
                feed: feed.config(),
                cache_bytes: cache_mb << 20,
                ..PlaygroundConfig::new(&dir)
            };
            run_playground(cfg).await
        }
    }
}

/// Runs one replica of `group` (0: a config server) until SIGINT or SIGTERM, or until it fails.
/// `copy_bytes_per_sec`: a config server's default copy bandwidth (0 on shard groups).
async fn run_replica(
    r: ReplicaArgs,
    group: u64,
    compact_log_entries: u64,
    copy_bytes_per_sec: u64,
    feed: FeedConfig,
    limits: ServeLimits,
) -> anyhow::Result<()> {
    let cfg = node_config(
        r,
        group,
        compact_log_entries,
        copy_bytes_per_sec,
        feed,
        limits,
    )?;
    let node = Node::start(cfg).await?;
    tokio::select! {
        _ = wait_for_signal() => {}
        why = node.failed() => {
            // Fail-stop: a replica whose driver died must not linger (it would keep its port and
            // pass health checks); exit so a supervisor restarts it and recovery runs.
            tracing::error!(why, "the replica failed; exiting with code {EXIT_REPLICA_FAILED}");
            std::process::exit(EXIT_REPLICA_FAILED);
        }
    }
    tracing::info!("stopping");
    node.shutdown().await;
    Ok(())
}

/// `ordo node`/`ordo config`'s exit code when the replica failed (storage error, corruption, a
/// panic of its driver), as opposed to 1 for a start-up error.
const EXIT_REPLICA_FAILED: i32 = 3;

/// One `--config` value between commas, without the spaces around it.
fn trimmed(s: &str) -> Result<String, std::convert::Infallible> {
    Ok(s.trim().to_string())
}

/// The `--config` values without the blank ones: `a:1, b:1,` names two config servers.
fn config_addrs(values: Vec<String>) -> Vec<String> {
    values.into_iter().filter(|s| !s.is_empty()).collect()
}

async fn run_router(listen: String, config: Vec<String>, serve: ServeLimits) -> anyhow::Result<()> {
    let router = ordo_router::Router::start_with_options(
        ordo_router::RouterConfig {
            listen,
            config_addrs: config_addrs(config),
        },
        ordo_router::RouterOptions {
            serve,
            ..Default::default()
        },
    )
    .await?;
    println!("router serving on {}", router.addr);
    wait_for_signal().await;
    tracing::info!("stopping");
    router.shutdown().await;
    Ok(())
}

async fn run_playground(cfg: PlaygroundConfig) -> anyhow::Result<()> {
    let (dir, groups, replicas) = (cfg.dir.clone(), cfg.groups, cfg.replicas);
    let pg = Playground::start(cfg).await?;
    let r = pg.router_addr();
    println!("Ordo playground: {groups} shard groups x {replicas} replicas, 3 config replicas; data in {}", dir.display());
    println!(
        "Router: {r}    Config servers: {}",
        pg.config_addrs.join(",")
    );
    println!("Try:");
    println!("  cargo run --release --bin ordoctl -- --endpoint {r} put order-1 \"\" created");
    println!("  cargo run --release --bin ordoctl -- --endpoint {r} get order-1 \"\"");
    println!("  cargo run --release --bin ordoctl -- --endpoint {r} status");
    println!(
        "Ctrl-C stops it; starting again with --dir {} brings the same cluster and data back.",
        dir.display()
    );
    wait_for_signal().await;
    tracing::info!("stopping the playground");
    pg.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cmd, clap::Error> {
        Cli::try_parse_from([&["ordo"], args].concat()).map(|c| c.cmd)
    }

    /// `ordo node` with its required flags and `extra`.
    fn node(extra: &[&str]) -> Result<Cmd, clap::Error> {
        let base = ["node", "--id", "1", "--listen", "l:1", "--peers", "1=l:1"];
        parse(&[&base[..], &["--data-dir", "d"], extra].concat())
    }

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn node_and_config_take_the_same_replica_flags() {
        let flags = [
            "--id",
            "2",
            "--listen",
            "l:1",
            "--peers",
            "1=a:1,2=l:1",
            "--data-dir",
            "d",
        ];
        let Cmd::Node {
            replica,
            group,
            compact_log_entries,
            ..
        } = parse(&[&["node"], &flags[..], &["--join"]].concat()).unwrap()
        else {
            panic!("not node")
        };
        assert_eq!(
            (group, compact_log_entries),
            (1, COMPACT_LOG_ENTRIES_DEFAULT)
        );
        assert_eq!((replica.id, replica.listen.as_str()), (2, "l:1"));
        assert_eq!(
            (replica.peers.as_str(), replica.data_dir),
            ("1=a:1,2=l:1", "d".into())
        );
        assert!(replica.join);
        let Cmd::Config {
            replica,
            copy_bytes_per_sec,
        } = parse(&[&["config"], &flags[..]].concat()).unwrap()
        else {
            panic!("not config")
        };
        assert_eq!((replica.id, replica.join), (2, false));
        assert_eq!(copy_bytes_per_sec, COPY_BYTES_PER_SEC);
        assert!(
            parse(&[&["config"], &flags[..], &["--copy-bytes-per-sec", "0"]].concat()).is_err()
        );
        assert!(parse(&["config", "--id", "1", "--listen", "l:1", "--peers", "1=l:1"]).is_err());
        assert!(parse(&[&["config"], &flags[..], &["--group", "2"]].concat()).is_err());
    }

    #[test]
    fn feed_flags_default_to_new_values_a_day_and_a_gib_and_bad_ones_are_refused() {
        let Ok(Cmd::Node { feed, .. }) = node(&[]) else {
            panic!("not node")
        };
        let c = feed.config();
        assert_eq!(
            (c.capture, c.retention_secs, c.retention_bytes),
            (Capture::New, 86_400, 1 << 30)
        );
        assert_eq!((c.protect_secs, c.protect_bytes), (2 * 86_400, 4 << 30));
        let flags = [
            "--feed-capture",
            "old-and-new",
            "--feed-retention-secs",
            "2",
            "--feed-retention-bytes",
            "4096",
            "--feed-protect-secs",
            "1",
        ];
        let Ok(Cmd::Node { feed, .. }) = node(&flags) else {
            panic!("not node")
        };
        let c = feed.config();
        assert_eq!(
            (c.capture, c.retention_secs, c.retention_bytes),
            (Capture::OldAndNew, 2, 4096)
        );
        assert_eq!(
            c.retention().protect_ms,
            2_000,
            "a protection below the retention is the retention"
        );
        for bad in [
            &["--feed-capture", "all"][..],
            &["--feed-retention-secs", "0"],
            &["--feed-retention-bytes", "0"],
            &["--feed-protect-secs", "0"],
            &["--feed-protect-bytes", "0"],
        ] {
            assert!(node(bad).is_err(), "{bad:?}");
        }
        let Ok(Cmd::Playground { feed, .. }) = parse(&["playground", "--feed-capture", "off"])
        else {
            panic!("not playground")
        };
        assert_eq!(feed.config().capture, Capture::Off);
    }

    #[test]
    fn m9_the_dedup_window_defaults_to_ten_minutes_and_bad_ones_name_the_limit() {
        let Ok(Cmd::Node { replica, .. }) = node(&[]) else {
            panic!("not node")
        };
        assert_eq!(replica.dedup_window_secs, DEDUP_WINDOW_SECS_DEFAULT);
        let Ok(Cmd::Node { replica, .. }) = node(&["--dedup-window-secs", "30"]) else {
            panic!("not node")
        };
        assert_eq!(replica.dedup_window_secs, 30);
        for bad in ["0", "86401"] {
            let err = node(&["--dedup-window-secs", bad])
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("DEDUP_WINDOW_SECS_MAX (86400)"), "{err}");
        }
    }

    #[test]
    fn the_page_cache_defaults_per_command_and_refuses_a_tiny_one() {
        let Ok(Cmd::Node { replica, .. }) = node(&[]) else {
            panic!("not node")
        };
        assert_eq!(replica.cache_mb << 20, CACHE_BYTES_DEFAULT);
        let Ok(Cmd::Node { replica, .. }) = node(&["--cache-mb", "100"]) else {
            panic!("not node")
        };
        assert_eq!(replica.cache_mb, 100);
        let err = node(&["--cache-mb", "1"]).err().unwrap().to_string();
        assert!(err.contains("out of range: 8 to"), "{err}");
        let Cmd::Playground { cache_mb, .. } = parse(&["playground"]).unwrap() else {
            panic!("not playground")
        };
        assert_eq!(cache_mb << 20, PLAYGROUND_CACHE_BYTES_DEFAULT);
    }

    #[test]
    fn router_config_addresses_split_on_commas() {
        let config = |value: &str| {
            let Cmd::Router { config, .. } =
                parse(&["router", "--listen", "l:1", "--config", value]).unwrap()
            else {
                panic!("not router")
            };
            config_addrs(config)
        };
        assert_eq!(config("a:1"), ["a:1"]);
        assert_eq!(config(" a:1 , b:1,,c:1, "), ["a:1", "b:1", "c:1"]);
        assert!(config("").is_empty());
        assert!(parse(&["router", "--listen", "l:1"]).is_err());
    }
}
