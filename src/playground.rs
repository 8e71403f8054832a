//! A whole cluster in one process: 3 config replicas (the config group), `groups` × `replicas`
//! shard-group nodes and one router, all on loopback with real gRPC between them. The README's
//! run command, and the in-process cluster of the tests.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ordo_proto::v1::cluster_client::ClusterClient;
use ordo_proto::v1::{GetShardMapRequest, GroupSpec, InitClusterRequest, ShardMap};
use tonic::Code;

use crate::limits::{COMPACT_LOG_ENTRIES_DEFAULT, SLOT_COUNT_DEFAULT};
use crate::node::{Node, NodeConfig};

pub const CONFIG_REPLICAS: u64 = 3;
/// How long start-up waits for the config group and the groups to elect leaders and accept the map.
const READY_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct PlaygroundConfig {
    pub dir: PathBuf,
    pub groups: u64,
    pub replicas: u64,
    /// Router on `port`, config replica i on `port + i`, replica r of group g on `port + 10g + r`.
    /// `None` picks free ports (tests).
    pub port: Option<u16>,
    pub compact_log_entries: u64,
    /// The config servers' copy bandwidth for moves whose request names none, bytes/s (0: the
    /// default, `ordo_config::migration::COPY_BYTES_PER_SEC`).
    pub copy_bytes_per_sec: u64,
    /// Tests only: fault injection on the raft traffic of every shard-group replica (node ids
    /// repeat across groups, so a rule about node 1 hits node 1 of every group). `None` outside
    /// tests.
    pub link_filter: Option<std::sync::Arc<dyn crate::replica::transport::LinkFilter>>,
    /// The bounds of every server of the playground; all of them share its one request-bytes
    /// budget, which so bounds the process.
    pub serve: ordo_proto::serve::ServeLimits,
    /// Every shard-group replica's change feed settings.
    pub feed: crate::node::FeedConfig,
    /// Each replica's sled page cache, bytes (`--cache-mb`).
    pub cache_bytes: u64,
}

impl PlaygroundConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PlaygroundConfig {
            dir: dir.into(),
            groups: 3,
            replicas: 3,
            port: Some(7000),
            compact_log_entries: COMPACT_LOG_ENTRIES_DEFAULT,
            copy_bytes_per_sec: 0,
            link_filter: None,
            serve: Default::default(),
            feed: Default::default(),
            cache_bytes: crate::limits::PLAYGROUND_CACHE_BYTES_DEFAULT,
        }
    }
}

pub struct Playground {
    pub router: ordo_router::Router,
    pub config: Vec<Node>,
    /// Group id → its replicas.
    pub groups: BTreeMap<u64, Vec<Node>>,
    pub config_addrs: Vec<String>,
}

fn addr_for(port: Option<u16>, offset: u64) -> anyhow::Result<String> {
    Ok(match port {
        Some(p) => {
            let p = p as u64 + offset;
            if p > u16::MAX as u64 {
                bail!("port {p} is out of range; pick a lower --port");
            }
            format!("127.0.0.1:{p}")
        }
        None => format!("127.0.0.1:{}", free_local_port()?),
    })
}

/// A loopback port nobody listens on, for a node started later. Taken below Linux's ephemeral
/// range (32768+), where the system also picks the local ports of outgoing connections: a port
/// from `bind(0)` can be taken by some connection before the node binds it. Each port is handed
/// out once per process; the start depends on the process id so that two processes rarely
/// walk the same ports.
pub fn free_local_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const HIGH: u32 = 32_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let _ = NEXT.compare_exchange(
        0,
        LOW + std::process::id() % 4_000 * 3,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..(HIGH - LOW) {
        let p = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (p - LOW) % (HIGH - LOW)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port between {LOW} and {HIGH}")
}

async fn start_group(
    cfg: &PlaygroundConfig,
    group: u64,
    peers: &BTreeMap<u64, String>,
    name: &str,
) -> anyhow::Result<Vec<Node>> {
    started(name, spawn_group(cfg, group, peers, name)).await
}

/// A replica being started: its id, address and start task.
type Starting = (u64, String, tokio::task::JoinHandle<anyhow::Result<Node>>);

/// Starts the replicas of `group` as tasks, so that they open their data at once (each opening is
/// mostly sled reading its files): a restart takes about as long as the slowest replica, not the
/// sum of them. [`started`] waits for them.
fn spawn_group(
    cfg: &PlaygroundConfig,
    group: u64,
    peers: &BTreeMap<u64, String>,
    name: &str,
) -> Vec<Starting> {
    peers
        .iter()
        .map(|(&id, addr)| {
            let node_cfg = NodeConfig {
                id,
                group,
                listen: addr.clone(),
                peers: peers.clone(),
                data_dir: cfg.dir.join(format!("{name}/node-{id}")),
                compact_log_entries: cfg.compact_log_entries,
                dedup_window_secs: crate::limits::DEDUP_WINDOW_SECS_DEFAULT,
                slot_count: SLOT_COUNT_DEFAULT,
                config_server: group == 0,
                copy_bytes_per_sec: cfg.copy_bytes_per_sec,
                link_filter: if group == 0 {
                    None
                } else {
                    cfg.link_filter.clone()
                },
                join: false,
                serve: cfg.serve.clone(),
                feed: cfg.feed,
                cache_bytes: cfg.cache_bytes,
            };
            (id, addr.clone(), tokio::spawn(Node::start(node_cfg)))
        })
        .collect()
}

/// Waits for the replicas `spawn_group` started; a failed one is logged as it fails.
async fn started(name: &str, starting: Vec<Starting>) -> anyhow::Result<Vec<Node>> {
    let mut nodes = Vec::new();
    for (id, addr, started) in starting {
        let node = started
            .await
            .context("a replica's start panicked")?
            .with_context(|| format!("starting {name} replica {id} on {addr}"))?;
        // Many replicas share this process, so one failure does not end it (unlike `ordo node`):
        // the failed replica refuses every request with UNAVAILABLE naming why, and says so here.
        let failed = node.failed();
        let who = format!("{name} replica {id}");
        tokio::spawn(async move {
            let why = failed.await;
            tracing::error!(
                replica = who,
                why,
                "REPLICA FAILED: it serves nothing until the playground restarts"
            );
        });
        nodes.push(node);
    }
    Ok(nodes)
}

/// Asks the config servers for the map, and creates the cluster when there is none yet. Retries
/// while leaders are being elected, within `READY_WAIT`.
async fn ensure_initialized(
    config_addrs: &[String],
    specs: Vec<GroupSpec>,
) -> anyhow::Result<ShardMap> {
    let started = Instant::now();
    let mut last_err = String::new();
    while started.elapsed() < READY_WAIT {
        for addr in config_addrs {
            let Ok(ch) = ordo_proto::addr::peer_endpoint(addr)?.connect().await else {
                continue;
            };
            let mut c = ClusterClient::new(ch);
            let map = match c
                .get_shard_map(GetShardMapRequest { linearizable: true })
                .await
            {
                Ok(m) => m.into_inner(),
                Err(e) => {
                    last_err = format!("{addr}: {}", e.message());
                    continue;
                }
            };
            if map.version > 0 {
                return Ok(map);
            }
            match c
                .init_cluster(InitClusterRequest {
                    slot_count: SLOT_COUNT_DEFAULT,
                    groups: specs.clone(),
                })
                .await
            {
                Ok(m) => return Ok(m.into_inner()),
                Err(e) if matches!(e.code(), Code::Unavailable | Code::Aborted) => {
                    last_err = format!("{addr}: {}", e.message())
                }
                Err(e) => bail!("initializing the cluster failed: {}", e.message()),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the cluster did not become ready within {READY_WAIT:?}; last error: {last_err}")
}

impl Playground {
    pub async fn start(cfg: PlaygroundConfig) -> anyhow::Result<Playground> {
        if !(1..=9).contains(&cfg.groups) {
            bail!("--groups must be between 1 and 9");
        }
        if !(1..=7).contains(&cfg.replicas) {
            bail!("--replicas must be between 1 and 7");
        }
        let config_peers: BTreeMap<u64, String> = (1..=CONFIG_REPLICAS)
            .map(|i| Ok((i, addr_for(cfg.port, i)?)))
            .collect::<anyhow::Result<_>>()?;
        // The config group's data dir keeps its first name, `meta`.
        let config = start_group(&cfg, 0, &config_peers, "meta").await?;
        let mut specs = Vec::new();
        let mut starting = Vec::new();
        for g in 1..=cfg.groups {
            let peers: BTreeMap<u64, String> = (1..=cfg.replicas)
                .map(|r| Ok((r, addr_for(cfg.port, 10 * g + r)?)))
                .collect::<anyhow::Result<_>>()?;
            specs.push(GroupSpec {
                id: g,
                addrs: peers.values().cloned().collect(),
            });
            let name = format!("group-{g}");
            starting.push((g, spawn_group(&cfg, g, &peers, &name), name));
        }
        // Every group's replicas start at once (`spawn_group`).
        let mut groups = BTreeMap::new();
        for (g, replicas, name) in starting {
            groups.insert(g, started(&name, replicas).await?);
        }
        let config_addrs: Vec<String> = config_peers.values().cloned().collect();
        let map = ensure_initialized(&config_addrs, specs).await?;
        if map.groups.len() as u64 != cfg.groups {
            tracing::warn!(in_map = map.groups.len(), asked = cfg.groups, "this data dir holds a cluster with a different number of groups; the stored map wins");
        }
        let router = ordo_router::Router::start_with_options(
            ordo_router::RouterConfig {
                listen: addr_for(cfg.port, 0)?,
                config_addrs: config_addrs.clone(),
            },
            ordo_router::RouterOptions {
                serve: cfg.serve.clone(),
                ..Default::default()
            },
        )
        .await
        .context("starting the router")?;
        // The router may have asked a config replica that had not applied the map yet: serve
        // only once it routes by the map just initialized (or found).
        if !router.wait_for_map_version(map.version, READY_WAIT).await {
            bail!(
                "the router did not receive shard map v{} within {READY_WAIT:?}",
                map.version
            );
        }
        Ok(Playground {
            router,
            config,
            groups,
            config_addrs,
        })
    }

    pub fn router_addr(&self) -> String {
        self.router.addr.to_string()
    }

    /// Stops the router first (no new requests), then the groups, then the config servers.
    pub async fn shutdown(self) {
        self.router.shutdown().await;
        for (_, nodes) in self.groups {
            for n in nodes {
                n.shutdown().await;
            }
        }
        for n in self.config {
            n.shutdown().await;
        }
    }
}

/// Starts the replicas of a new group `group` beside a running playground (on free ports when
/// `cfg.port` is `None`), for `ordoctl group add` / `AddGroup` to register; its nodes and spec.
pub async fn start_extra_group(
    cfg: &PlaygroundConfig,
    group: u64,
    replicas: u64,
) -> anyhow::Result<(Vec<Node>, GroupSpec)> {
    let peers: BTreeMap<u64, String> = (1..=replicas)
        .map(|r| Ok((r, addr_for(cfg.port, 10 * group + r)?)))
        .collect::<anyhow::Result<_>>()?;
    let nodes = start_group(cfg, group, &peers, &format!("group-{group}")).await?;
    let spec = GroupSpec {
        id: group,
        addrs: peers.values().cloned().collect(),
    };
    Ok((nodes, spec))
}
