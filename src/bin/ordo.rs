//! `ordo`: the server binary. `ordo node` runs one replica of a shard group; `ordo playground`
//! runs a whole local group in one process.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ordo::limits::{COMPACT_LOG_ENTRIES_DEFAULT, SLOT_COUNT_DEFAULT};
use ordo::node::{parse_peers, Node, NodeConfig};

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
        /// The shard group this replica belongs to.
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
    },
    /// Run a local group of replicas in this process, for trying Ordo out.
    Playground {
        /// Where the playground keeps its data; starting again with the same dir brings it back.
        #[arg(long, default_value = "./ordo-data")]
        dir: PathBuf,
        /// Replicas in the group.
        #[arg(long, default_value_t = 3)]
        replicas: u64,
        /// Replica i listens on 127.0.0.1:<port + i>.
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
        } => {
            let peers = parse_peers(&peers)?;
            let node = Node::start(NodeConfig {
                id,
                group,
                listen,
                peers,
                data_dir,
                compact_log_entries,
                slot_count: SLOT_COUNT_DEFAULT,
            })
            .await?;
            wait_for_signal().await;
            tracing::info!("stopping");
            node.shutdown().await;
        }
        Cmd::Playground {
            dir,
            replicas,
            port,
        } => {
            anyhow::ensure!(
                (1..=7).contains(&replicas),
                "--replicas must be between 1 and 7"
            );
            let peers: std::collections::BTreeMap<u64, String> = (1..=replicas)
                .map(|i| (i, format!("127.0.0.1:{}", port as u64 + i)))
                .collect();
            let mut nodes = Vec::new();
            for (&id, addr) in &peers {
                let node = Node::start(NodeConfig {
                    id,
                    group: 1,
                    listen: addr.clone(),
                    peers: peers.clone(),
                    data_dir: dir.join(format!("group-1/node-{id}")),
                    compact_log_entries: COMPACT_LOG_ENTRIES_DEFAULT,
                    slot_count: SLOT_COUNT_DEFAULT,
                })
                .await
                .with_context(|| format!("starting replica {id} on {addr}"))?;
                nodes.push(node);
            }
            let endpoints: Vec<&str> = peers.values().map(String::as_str).collect();
            let endpoints = endpoints.join(",");
            println!(
                "Ordo playground: group 1 with {replicas} replicas, data in {}",
                dir.display()
            );
            println!("Try:");
            println!("  cargo run --release --bin ordoctl -- --endpoint {endpoints} put order-1 \"\" created");
            println!(
                "  cargo run --release --bin ordoctl -- --endpoint {endpoints} get order-1 \"\""
            );
            println!(
                "Ctrl-C stops it; starting again with --dir {} brings the same data back.",
                dir.display()
            );
            wait_for_signal().await;
            tracing::info!("stopping the playground");
            for n in nodes {
                n.shutdown().await;
            }
        }
    }
    Ok(())
}
