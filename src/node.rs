//! Starting and stopping one replica: storage, raft driver thread, transport and gRPC server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ordo_proto::serve::ServeLimits;
use ordo_proto::v1::cluster_server::ClusterServer;
use ordo_proto::v1::kv_server::KvServer;
use ordo_proto::v1::participant_server::ParticipantServer;
use ordo_proto::v1::peer_server::PeerServer;
use tokio::sync::{mpsc, watch};
use tonic::service::RoutesBuilder;

use crate::limits::*;
use crate::replica::driver::{Driver, DriverConfig};
use crate::replica::inbox::{Msg, PeerMsg, RaftQueue, Shared};
use crate::replica::outbox::Outbox;
use crate::replica::storage::RaftStore;
use crate::replica::transport::{PeerAddrs, Transport};
use crate::replica::watermark::Watermark;
use crate::replica::ReplicaHandle;
use crate::server::{kv::KvService, participant::ParticipantService, peer::PeerService};
pub use crate::state::Capture;
use crate::state::StateMachine;

/// How long a graceful stop waits for in-flight requests before closing connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: u64,
    pub group: u64,
    /// Address to listen on; port 0 picks a free one.
    pub listen: String,
    /// Every replica of the group, this one included: id → address. Once the replica has run,
    /// the addresses it stored (kept current by membership changes) take precedence.
    pub peers: BTreeMap<u64, String>,
    /// Join a running group (`ordoctl replica add` makes it a member) instead of founding one
    /// with `peers` as its voters: start empty and wait for the leader's snapshot.
    pub join: bool,
    pub data_dir: PathBuf,
    pub compact_log_entries: u64,
    /// How long keyed writes are deduplicated when this replica leads (`--dedup-window-secs`,
    /// checked by [`check_dedup_window`]).
    pub dedup_window_secs: u64,
    pub slot_count: u32,
    /// Serve `ordo.v1.Cluster` (a config server: this group is the config group) instead of `ordo.v1.Kv`.
    pub config_server: bool,
    /// A config server's copy bandwidth for moves whose request names none, bytes/s (0:
    /// `ordo_config::migration::COPY_BYTES_PER_SEC`).
    pub copy_bytes_per_sec: u64,
    /// A filter on outgoing raft traffic (the transport's fault-injection seam), shared by a
    /// test's in-process replicas of one group. Always `None` outside tests.
    pub link_filter: Option<Arc<dyn crate::replica::transport::LinkFilter>>,
    /// Connection cap and request-bytes budget of the node's gRPC server (a clone shares the
    /// budget: the playground gives all its servers one).
    pub serve: ServeLimits,
    /// The change feed's capture and retention when this replica leads.
    pub feed: FeedConfig,
    /// sled's page cache, bytes (`--cache-mb`; `limits::CACHE_BYTES_DEFAULT`).
    pub cache_bytes: u64,
}

/// The change feed's settings (`--feed-capture`, `--feed-retention-secs`,
/// `--feed-retention-bytes`). A leader stamps its capture on every entry and decides trims from
/// its retention, so replicas need not agree on the flags.
#[derive(Clone, Copy, Debug)]
pub struct FeedConfig {
    pub capture: Capture,
    /// Events older than this are trimmed.
    pub retention_secs: u64,
    /// A group's events beyond this many bytes are trimmed, oldest first.
    pub retention_bytes: u64,
    /// Events a live consumer group has not acked are kept this long (at least the retention)
    /// ...
    pub protect_secs: u64,
    /// ... and while the group holds at most this many bytes (at least the retention's).
    pub protect_bytes: u64,
}

impl FeedConfig {
    /// What the leader's retention planner keeps; a protection below the retention is the
    /// retention (protecting an event can only keep it longer).
    pub fn retention(&self) -> crate::state::Retention {
        crate::state::Retention {
            ms: self.retention_secs.saturating_mul(1000),
            bytes: self.retention_bytes,
            protect_ms: self
                .protect_secs
                .max(self.retention_secs)
                .saturating_mul(1000),
            protect_bytes: self.protect_bytes.max(self.retention_bytes),
        }
    }
}

impl Default for FeedConfig {
    fn default() -> FeedConfig {
        FeedConfig {
            capture: Capture::default(),
            retention_secs: FEED_RETENTION_SECS_DEFAULT,
            retention_bytes: FEED_RETENTION_BYTES_DEFAULT,
            protect_secs: FEED_PROTECT_SECS_DEFAULT,
            protect_bytes: FEED_PROTECT_BYTES_DEFAULT,
        }
    }
}

/// Refuses a dedup window outside `1..=DEDUP_WINDOW_SECS_MAX` seconds, naming the limit.
pub fn check_dedup_window(secs: u64) -> anyhow::Result<u64> {
    use crate::limits::DEDUP_WINDOW_SECS_MAX;
    if secs == 0 || secs > DEDUP_WINDOW_SECS_MAX {
        bail!(
            "--dedup-window-secs {secs} is out of range: it must be 1 to DEDUP_WINDOW_SECS_MAX \
             ({DEDUP_WINDOW_SECS_MAX})"
        );
    }
    Ok(secs)
}

/// Parses `1=127.0.0.1:7001,2=127.0.0.1:7002`.
pub fn parse_peers(s: &str) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .with_context(|| format!("peer {part:?} is not of the form <id>=<host:port>"))?;
        let id: u64 = id
            .trim()
            .parse()
            .with_context(|| format!("peer id {id:?} is not a number"))?;
        if id == 0 {
            bail!("peer id 0 is reserved (it means \"no node\" in raft)");
        }
        if peers.insert(id, addr.trim().to_string()).is_some() {
            bail!("peer id {id} is listed twice");
        }
    }
    if peers.is_empty() {
        bail!("--peers is empty; list every replica of the group as <id>=<host:port>,...");
    }
    Ok(peers)
}

pub struct Node {
    pub addr: SocketAddr,
    pub replica: Arc<ReplicaHandle>,
    stop_tx: watch::Sender<bool>,
    server: ServerTask,
    driver: Option<std::thread::JoinHandle<()>>,
    /// True once the driver thread has ended, for whatever reason.
    exited: watch::Receiver<bool>,
}

/// One replica's storage, opened and recovered: what the driver starts from.
pub(crate) struct Recovered {
    pub(crate) db: sled::Db,
    pub(crate) db_dir: PathBuf,
    pub(crate) snap_dir: PathBuf,
    pub(crate) sm: Arc<StateMachine>,
    pub(crate) store: RaftStore,
    /// Checked against `store` (H5); kept up to date by the driver.
    pub(crate) watermark: Watermark,
    /// Every replica's address: the stored map (kept current by membership changes) if the
    /// replica has run before, else the configured one.
    pub(crate) peers: BTreeMap<u64, String>,
}

/// Opens sled under the data dir and brings the state machine and the raft log into agreement
/// (invariant 3: a restart resumes exactly after the last entry whose effects are on disk).
pub(crate) fn recover(cfg: &NodeConfig) -> anyhow::Result<Recovered> {
    if !cfg.peers.contains_key(&cfg.id) {
        bail!(
            "--peers must include this node's own id {} (peers: {:?})",
            cfg.id,
            cfg.peers.keys().collect::<Vec<_>>()
        );
    }
    let db_dir = cfg.data_dir.join("db");
    let snap_dir = cfg.data_dir.join("snap");
    std::fs::create_dir_all(&snap_dir)
        .with_context(|| format!("creating {}", snap_dir.display()))?;
    let leftovers = crate::replica::snapshot::remove_leftovers(&snap_dir)?;
    if leftovers > 0 {
        tracing::info!(
            node = cfg.id,
            files = leftovers,
            "removed snapshot files of an earlier run"
        );
    }
    // No flusher of sled's own: `durable::Flusher` syncs it in the background and tells the
    // driver how far the raft log may be compacted. HighThroughput: sled's segment cleaning
    // then waits for emptier segments; under 64 writers it cut server CPU per write by about a
    // tenth for a few percent more disk (bench/RESULTS.md, issue 15).
    let db = sled::Config::new()
        .path(&db_dir)
        .flush_every_ms(None)
        .mode(sled::Mode::HighThroughput)
        .cache_capacity(cfg.cache_bytes.max(crate::limits::CACHE_BYTES_MIN))
        .open()
        .with_context(|| {
            format!(
                "opening sled at {} (is another node using this data dir?)",
                db_dir.display()
            )
        })?;

    let opened = StateMachine::open(&db, cfg.id, cfg.slot_count)?;
    let sm = Arc::new(opened.sm);
    let voters: Vec<u64> = if cfg.join {
        Vec::new()
    } else {
        cfg.peers.keys().copied().collect()
    };
    if db.tree_names().iter().any(|t| t.as_ref() == b"raft_log") {
        bail!(
            "{} holds a raft log inside sled: it was made by an Ordo version before the raft log \
             had files of its own (issue 15); start this replica with an empty data dir and let \
             it catch up from its group",
            db_dir.display()
        );
    }
    let log_was_empty = RaftStore::is_empty(&cfg.data_dir)?;
    let mut store = RaftStore::open(&cfg.data_dir, cfg.id, &voters)?;
    // Protocol-aware recovery (H5): a raft log that lost synced writes is not trusted.
    let mut watermark =
        crate::replica::watermark::check_and_open(&cfg.data_dir, store.mark(), log_was_empty)?;
    if opened.interrupted_install {
        // The install lowered the watermark before it began; this keeps it so should the
        // reset itself be cut short.
        watermark.write(store.mark().before_install())?;
        store.reset_to_empty()?;
    }
    // sled is synced in the background and a crash may lose its newest applies; the log still
    // holds them, because it is compacted only below what sled made durable. sled behind the
    // log's start lost more than that: a damaged disk.
    let log_start = store.first_index_now() - 1;
    let never_applied =
        sm.applied_index() == 0 && log_start == crate::replica::storage::BOOTSTRAP_INDEX;
    if !log_was_empty && sm.applied_index() < log_start && !never_applied {
        bail!(
            "the state machine in {} is at applied index {} but the raft log starts after {}: \
             sled lost writes it had synced; replace this replica (a new node with an empty data \
             dir) and inspect the disk",
            db_dir.display(),
            sm.applied_index(),
            log_start
        );
    }
    // A founder's first start: its log begins after the bootstrap position.
    sm.start_at(store.first_index_now() - 1)?;
    let peers = match store.peer_addrs()? {
        Some(mut stored) => {
            stored.insert(cfg.id, cfg.peers[&cfg.id].clone());
            stored
        }
        None => cfg.peers.clone(),
    };
    store.set_peer_addrs(&peers)?;
    // Entries are applied only after they are on disk and committed, so an applied index
    // above the stored commit only means the commit update had not been flushed yet.
    if sm.applied_index() > store.hard_state().commit {
        store.set_commit(sm.applied_index())?;
    }
    db.flush()?;
    let to_replay = store.hard_state().commit.saturating_sub(sm.applied_index());
    tracing::info!(node = cfg.id, group = cfg.group, applied = sm.applied_index(),
        commit = store.hard_state().commit, last_index = store.last_index_now(),
        term = store.hard_state().term, to_replay, data_dir = %cfg.data_dir.display(),
        "opened storage");
    Ok(Recovered {
        db,
        db_dir,
        snap_dir,
        sm,
        store,
        watermark,
        peers,
    })
}

/// The raft driver over recovered storage, sending through `outbox`.
pub(crate) fn new_driver(
    cfg: &NodeConfig,
    rec: Recovered,
    outbox: Box<dyn Outbox>,
    inbox: mpsc::Receiver<Msg>,
    raft_in: mpsc::Receiver<PeerMsg>,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Driver> {
    let durable = crate::replica::durable::Durable::open(rec.db, &rec.db_dir)?;
    let sm = rec.sm.clone();
    let flusher = crate::replica::durable::Flusher::spawn(
        durable,
        rec.sm.applied_index(),
        move || sm.applied_index(),
        format!("flush-g{}-n{}", cfg.group, cfg.id),
    )?;
    // Sync what recovery recorded; then the watermark can say so.
    let mut store = rec.store;
    store.sync()?;
    let mut watermark = rec.watermark;
    watermark.write(store.mark())?;
    let driver_cfg = DriverConfig {
        node_id: cfg.id,
        group_id: cfg.group,
        applied: rec.sm.applied_index(),
        snap_dir: rec.snap_dir,
        compact_log_entries: cfg.compact_log_entries,
        dedup_window_ms: cfg.dedup_window_secs * 1000,
        // The config group keeps no change feed.
        feed_capture: match cfg.config_server {
            true => Capture::Off,
            false => cfg.feed.capture,
        },
    };
    Ok(Driver::new(
        driver_cfg, store, flusher, watermark, rec.sm, inbox, raft_in, outbox, shared, stop,
    )?)
}

/// Runs the driver on a thread of its own (its IO is blocking; it must not stall the services).
/// When it ends, `exited` turns true; a panic (debug builds: release builds abort) is recorded in
/// `shared` as the replica's failure, like a storage error. The driver (and with it sled) is
/// dropped only after that: closing sled flushes, which on a full disk may never return, and the
/// failure must be reported whatever the storage does.
fn spawn_driver(
    cfg: &NodeConfig,
    driver: Driver,
    shared: Arc<Shared>,
    exited: watch::Sender<bool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("raft-g{}-n{}", cfg.group, cfg.id))
        .spawn(move || {
            let mut driver = driver;
            let run = std::panic::AssertUnwindSafe(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .expect("driver runtime");
                rt.block_on(driver.run());
            });
            if let Err(panic) = std::panic::catch_unwind(run) {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                shared
                    .is_leader
                    .store(0, std::sync::atomic::Ordering::Relaxed);
                shared.stop_with(format!("the raft driver panicked: {what}"));
            }
            let _ = exited.send(true);
            drop(driver);
        })
}

type ServerTask = tokio::task::JoinHandle<Result<(), tonic::transport::Error>>;

/// Serves the node's gRPC services on `listener` within `cfg.serve` until `stop` turns true:
/// `Peer` always, `Kv` and `Participant` on shard groups, `Cluster` on config servers.
fn serve(
    cfg: &NodeConfig,
    replica: &Arc<ReplicaHandle>,
    listener: tokio::net::TcpListener,
    mut stop: watch::Receiver<bool>,
) -> ServerTask {
    let config_server = cfg.config_server;
    let peer = PeerServer::new(PeerService(replica.clone()))
        .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX);
    let mut routes = RoutesBuilder::default();
    routes.add_service(peer);
    if config_server {
        routes.add_service(ClusterServer::new(ordo_config::ConfigService::new(
            Arc::new(crate::server::config_store::ReplicaMapStore {
                replica: replica.clone(),
            }),
            cfg.copy_bytes_per_sec,
        )));
    } else {
        routes.add_service(
            KvServer::new(KvService(replica.clone()))
                .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(CLIENT_MESSAGE_BYTES_MAX),
        );
        routes.add_service(
            ParticipantServer::new(ParticipantService(replica.clone()))
                .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(CLIENT_MESSAGE_BYTES_MAX),
        );
    }
    let limits = cfg.serve.clone();
    tokio::spawn(async move {
        ordo_proto::serve::serve(routes.routes(), listener, &limits, async move {
            let _ = stop.changed().await;
        })
        .await
    })
}

impl Node {
    pub async fn start(cfg: NodeConfig) -> anyhow::Result<Node> {
        let rec = recover(&cfg)?;
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        let addr = listener.local_addr()?;

        let (driver_tx, driver_rx) = mpsc::channel(DRIVER_INBOX_MAX);
        let (raft, raft_rx) = RaftQueue::new();
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared::default());
        let peers: PeerAddrs = Arc::new(std::sync::RwLock::new(rec.peers.clone()));
        let transport = Transport::new(
            tokio::runtime::Handle::current(),
            cfg.group,
            cfg.id,
            peers.clone(),
            driver_tx.clone(),
            cfg.link_filter.clone(),
        );
        let (sm, snap_dir) = (rec.sm.clone(), rec.snap_dir.clone());
        let driver = new_driver(
            &cfg,
            rec,
            Box::new(transport),
            driver_rx,
            raft_rx,
            shared.clone(),
            stop_rx.clone(),
        )?;
        let (exited_tx, exited) = watch::channel(false);
        let driver = spawn_driver(&cfg, driver, shared.clone(), exited_tx)?;

        let (groups, group_calls) = crate::groups::runner::Groups::new();
        let replica = Arc::new(ReplicaHandle {
            node_id: cfg.id,
            group_id: cfg.group,
            driver: driver_tx,
            inbox_bytes: Default::default(),
            raft,
            sm,
            shared,
            peers: peers.clone(),
            snap_dir,
            receiving_snapshot: AtomicBool::new(false),
            membership: Default::default(),
            feed_readers: Default::default(),
            groups,
            stop: stop_rx.clone(),
        });
        if !cfg.config_server {
            tokio::spawn(crate::groups::runner::run(replica.clone(), group_calls));
            crate::server::orphans::spawn(replica.clone(), stop_rx.clone());
            crate::server::feed::spawn_trimmer(replica.clone(), cfg.feed, stop_rx.clone());
        }
        let server = serve(&cfg, &replica, listener, stop_rx);
        tracing::info!(node = cfg.id, group = cfg.group, %addr, peers = ?peers.read().unwrap(), join = cfg.join, "node serving");
        Ok(Node {
            addr,
            replica,
            stop_tx,
            server,
            driver: Some(driver),
            exited,
        })
    }

    /// Resolves, with why, once this replica has failed: its driver stopped without being asked
    /// to (a storage error, corruption, a panic). Never resolves otherwise. `ordo node` exits
    /// non-zero on it (fail-stop: a supervisor restarts the process); the playground logs it.
    pub fn failed(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut exited = self.exited.clone();
        let shared = self.replica.shared.clone();
        async move {
            let _ = exited.wait_for(|e| *e).await;
            match shared.stopped() {
                Some(why) => why.to_string(),
                // Asked to stop: not a failure.
                None => std::future::pending().await,
            }
        }
    }

    /// Stops serving, fails what is still waiting (clients see UNAVAILABLE, never a hang), flushes
    /// storage and returns when the driver thread has exited.
    pub async fn shutdown(mut self) {
        let _ = self.stop_tx.send(true);
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.server).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!("requests still open after {SHUTDOWN_GRACE:?}; closing them");
                self.server.abort();
            }
        }
        if let Some(d) = self.driver.take() {
            let _ = tokio::task::spawn_blocking(move || d.join()).await;
        }
        tracing::info!(
            node = self.replica.node_id,
            group = self.replica.group_id,
            "node stopped"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_bad_lists_say_why() {
        let p = parse_peers("1=127.0.0.1:7001, 2=127.0.0.1:7002").unwrap();
        assert_eq!(p[&2], "127.0.0.1:7002");
        for (bad, needle) in [
            ("", "empty"),
            ("1:7001", "form"),
            ("x=a", "not a number"),
            ("0=a", "reserved"),
            ("1=a,1=b", "twice"),
        ] {
            let msg = parse_peers(bad).unwrap_err().to_string();
            assert!(msg.contains(needle), "{bad:?}: {msg}");
        }
    }
}
