//! `ordo`: the server binary. `node` runs one replica of a shard group, `config` one config
//! server, `router` a query router, and `playground` a whole local cluster in one process.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use ordo::limits::{COMPACT_LOG_ENTRIES_DEFAULT, SLOT_COUNT_DEFAULT};
use ordo::node::{parse_peers, Node, NodeConfig};
use ordo::playground::{Playground, PlaygroundConfig};

#[derive(Parser)]
#[command(
    name = "ordo",
    version,
    about = "Ordo: a sharded, Raft-replicated, transactional KV store for orders"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one replica of a shard group (starts a new group or rejoins the one in --data-dir).
    Node {
        /// This replica's raft id (non-zero, unique in the group).
        #[arg(long)]
        id: u64,
        /// The shard group this replica belongs to (1 or more; 0 is the config servers' group).
        #[arg(long, default_value_t = 1)]
        group: u64,
        /// Address to serve clients and peers on.
        #[arg(long)]
        listen: String,
        /// Every replica of the group, this one included: `1=host:port,2=host:port,3=host:port`.
        #[arg(long)]
        peers: String,
        /// Where this replica keeps its data (created if missing).
        #[arg(long)]
        data_dir: PathBuf,
        /// Applied entries kept in the raft log before it is compacted.
        #[arg(long, default_value_t = COMPACT_LOG_ENTRIES_DEFAULT)]
        compact_log_entries: u64,
        /// Join a running group instead of founding one: start empty, then run `ordoctl replica
        /// add` (or `replace`) to make this node a member. --peers lists the group's current
        /// replicas and this node.
        #[arg(long)]
        join: bool,
    },
    /// Run one config server: a replica of the meta group that keeps the shard map.
    Config {
        /// This replica's raft id in the meta group.
        #[arg(long)]
        id: u64,
        #[arg(long)]
        listen: String,
        /// Every config replica: `1=host:port,2=host:port,3=host:port`.
        #[arg(long)]
        peers: String,
        #[arg(long)]
        data_dir: PathBuf,
        /// Join the running meta group instead of founding it (see `ordo node --join`).
        #[arg(long)]
        join: bool,
    },
    /// Run a query router: stateless, serves ordo.v1.Kv and forwards to the owning groups.
    Router {
        #[arg(long)]
        listen: String,
        /// Config server addresses: `host:port,host:port,...`.
        #[arg(long)]
        config: String,
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
    id: u64,
    group: u64,
    listen: String,
    peers: &str,
    data_dir: PathBuf,
    compact: u64,
    join: bool,
) -> anyhow::Result<NodeConfig> {
    Ok(NodeConfig {
        id,
        group,
        listen,
        peers: parse_peers(peers)?,
        data_dir,
        compact_log_entries: compact,
        slot_count: SLOT_COUNT_DEFAULT,
        config_server: group == 0,
        link_filter: None,
        join,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ordo::logging::init();
    match Cli::parse().cmd {
        Cmd::Node {
            id,
            group,
            listen,
            peers,
            data_dir,
            compact_log_entries,
            join,
        } => {
            anyhow::ensure!(
                group != 0,
                "group 0 is the config servers' meta group: run `ordo config` for it"
            );
            let node = Node::start(node_config(
                id,
                group,
                listen,
                &peers,
                data_dir,
                compact_log_entries,
                join,
            )?)
            .await?;
            wait_for_signal().await;
            tracing::info!("stopping");
            node.shutdown().await;
        }
        Cmd::Config {
            id,
            listen,
            peers,
            data_dir,
            join,
        } => {
            let node = Node::start(node_config(
                id,
                0,
                listen,
                &peers,
                data_dir,
                COMPACT_LOG_ENTRIES_DEFAULT,
                join,
            )?)
            .await?;
            wait_for_signal().await;
            tracing::info!("stopping");
            node.shutdown().await;
        }
        Cmd::Router { listen, config } => {
            let config_addrs: Vec<String> = config
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            let router = ordo_router::Router::start(ordo_router::RouterConfig {
                listen,
                config_addrs,
            })
            .await?;
            println!("router serving on {}", router.addr);
            wait_for_signal().await;
            tracing::info!("stopping");
            router.shutdown().await;
        }
        Cmd::Playground {
            dir,
            groups,
            replicas,
            port,
        } => {
            let cfg = PlaygroundConfig {
                groups,
                replicas,
                port: Some(port),
                ..PlaygroundConfig::new(&dir)
            };
            let pg = Playground::start(cfg).await?;
            let r = pg.router_addr();
            println!("Ordo playground: {groups} shard groups x {replicas} replicas, 3 config replicas; data in {}", dir.display());
            println!(
                "Router: {r}    Config servers: {}",
                pg.config_addrs.join(",")
            );
            println!("Try:");
            println!(
                "  cargo run --release --bin ordoctl -- --endpoint {r} put order-1 \"\" created"
            );
            println!("  cargo run --release --bin ordoctl -- --endpoint {r} get order-1 \"\"");
            println!("  cargo run --release --bin ordoctl -- --endpoint {r} status");
            println!("Ctrl-C stops it; starting again with --dir {} brings the same cluster and data back.", dir.display());
            wait_for_signal().await;
            tracing::info!("stopping the playground");
            pg.shutdown().await;
        }
    }
    Ok(())
}
