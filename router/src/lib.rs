//! Ordo's query router: a stateless gRPC front door that caches the shard map, hashes each
//! request's shard key to its slot and group, and forwards the request to that group's leader.
//!
//! # What it serves
//! One tonic server with `ordo.v1.Kv` (Get/Put/Delete/Scan/Txn), `ordo.v1.Cluster` and
//! `ordo.v1.Feed` (the change feed, merged over the groups' `Peer.ReadChanges`: `feed/`).
//!
//! # Shard map
//! [`Router::start`] fetches the map from the config servers (any replica), then a background
//! task follows `WatchShardMap` on any reachable config replica and installs each newer version.
//! A `WrongShard` answer also refreshes it (linearizably, from the config leader). The map lives
//! in a `tokio::sync::watch` cell of `Arc<ShardMap>`; routing is
//! `slot_owner[slot_of(shard_key, slot_count)]` → group → replicas. Until the cluster is
//! initialized (map version 0) Kv requests get `UNAVAILABLE`.
//!
//! # Forwarding and retries (`forward.rs`)
//! Each Kv request goes to the cached leader of its group (initially the first replica) over a
//! pooled, lazily connected channel, stamped with the map version used. Node errors:
//! - `UNAVAILABLE` + `NotLeader`: go to the named leader (at once the first time), or to the next
//!   replica when none is named;
//! - `UNAVAILABLE` + `NotApplied` (refused before it was proposed, or replaced in the log), or a
//!   connection that could not be established (tonic's `ConnectError`): next replica;
//! - `UNAVAILABLE` + `SlotMoving` (the slot is in a migration's critical section): a **hold**,
//!   the same replica again after 2 ms doubling to 50 ms; up to 100 holds do not use up
//!   attempts;
//! - `FAILED_PRECONDITION` + `WrongShard`: refresh the map, retry at the new owner;
//! - `ABORTED` + `Locked` (an item locked by a cross-group transaction; nothing applied): a
//!   **lock wait**, retried after 4 ms doubling to 50 ms, bounded by the deadline, not by
//!   attempts; before each retry the lock is resolved if it is older than the lock timeout, or
//!   (for a waiting transaction) if its holder is younger (`locks.rs`);
//! - `UNAVAILABLE` without details, or a transport error after the request was sent (reset,
//!   broken pipe, keepalive timeout): a read (Get, Scan) goes to the next replica; a write (Put,
//!   Delete, Txn) may have been applied, so it is **not** retried: the client gets `UNAVAILABLE`
//!   saying that the outcome is unknown and what happened;
//! - anything else: returned to the client unchanged (code, message, details).
//!
//! So a write is retried only after attempts that certainly did not apply it
//! (`ordo_proto::certainly_not_applied`): it never applies twice, and a conditional write never
//! reports a failed condition caused by its own first attempt.
//!
//! At most 12 attempts, backoff 10 ms doubling to 250 ms, all within the request's deadline (its
//! `grpc-timeout`, default 10 s, at most 60 s). When they are spent the client gets
//! `UNAVAILABLE` saying what was tried. A read's give-up carries no details, so a client never
//! mistakes the router for a node and follows a node's leader hint past it; a write's carries
//! `NotApplied`, which is true of every attempt the router retried. An attempt that exceeds the
//! whole deadline is `DEADLINE_EXCEEDED`, outcome unknown.
//!
//! # Transactions
//! A `Txn` whose shard keys all map to one group is forwarded like a write. A cross-group `Txn`
//! is run by the router as the coordinator of a two-phase commit (`coordinator.rs`): prepare
//! every group's part, record the decision at the primary's group, finish every part. The
//! coordinator keeps no state a lock resolver cannot find again: if it dies, its locks expire
//! and whoever meets them resolves them through the transaction's record (`locks.rs`).
//!
//! # Layering
//! `forward.rs` (the routing loop) ← `locks.rs` (waiting on and resolving locks) ←
//! `coordinator.rs` (two-phase commit) ← `kv.rs` (the `Kv` service). The loop knows nothing of
//! transactions: how a request treats a lock is its caller's `LockPolicy`, and lock resolution
//! forwards only in fail-on-lock mode, so it never recurses. `retry.rs` reads a failed attempt
//! (classification, backoff curves), `map.rs` caches the shard map and leaders, `config.rs` talks
//! to the config servers, `pool.rs` keeps the channels, `deadline.rs` bounds a request's time.

mod cluster;
mod config;
mod coordinator;
mod deadline;
mod feed;
mod forward;
mod kv;
mod locks;
mod map;
mod pool;
mod retry;

pub use coordinator::Failpoint;
pub use feed::{
    FEED_CURSOR_BYTES_MAX, FEED_GROUP_KEY_PREFIX_BYTES_MAX, FEED_GROUP_ROUNDS_MAX,
    FEED_GROUP_SHARD_KEY_BYTES_MAX, FEED_JOIN_WAIT, FEED_MEMBERS_MAX, FEED_MOVE_WAIT_MAX,
    FEED_RECLAIM_EVERY, FEED_REOPEN_WITHIN, FEED_RESPONSE_BYTES_MAX, FEED_RESPONSE_EVENTS_MAX,
    FEED_SHARD_KEYS_MAX, FEED_WATCHES_MAX,
};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ordo_proto::v1::cluster_server::ClusterServer;
use ordo_proto::v1::feed_server::FeedServer;
use ordo_proto::v1::kv_server::KvServer;
use ordo_proto::v1::ShardMap;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster::ClusterService;
use crate::config::ConfigClient;
use crate::feed::FeedService;
use crate::kv::KvService;
use crate::map::{Leaders, MapCell};
use crate::pool::{Pool, MESSAGE_BYTES_MAX};

/// How long [`Router::start`] keeps trying to reach a config server by default.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Router::shutdown`] lets open requests finish before it aborts them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Where the router listens and where it finds the config servers.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// `host:port` to listen on; port 0 picks a free port (see [`Router::addr`]).
    pub listen: String,
    /// Config server addresses (`host:port` or `http://host:port`; an entry may hold several,
    /// comma-separated).
    pub config_addrs: Vec<String>,
}

/// Knobs that are rarely changed; [`Router::start`] uses the defaults.
#[derive(Debug, Clone)]
pub struct RouterOptions {
    /// How long start-up keeps trying to fetch the shard map before it fails.
    pub start_timeout: Duration,
    /// Follow `WatchShardMap` in the background (the normal case). With `false` the router
    /// learns a new map only from a `wrong shard` answer, which tests use to hold a stale map.
    pub follow_map_updates: bool,
    /// Tests only: where this router's cross-group transactions stop, as if it died there.
    pub twopc_failpoint: Option<Failpoint>,
    /// Connection cap and request-bytes budget of the router's server.
    pub serve: ordo_proto::serve::ServeLimits,
    /// Tests only: added to this router's wall clock (ms), as if it were that far off. The
    /// clock only orders transactions (`priority_ms`); lock ages are measured by the groups.
    pub clock_offset_ms: i64,
}

/// Counters of routing events since the router started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterStats {
    /// `wrong shard` answers from nodes (each one makes the router refresh its map).
    pub wrong_shard: u64,
    /// `not leader` answers that named the leader, which the router then followed.
    pub redirects: u64,
}

/// The live counters behind [`RouterStats`].
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) wrong_shard: AtomicU64,
    pub(crate) redirects: AtomicU64,
}

impl Default for RouterOptions {
    fn default() -> Self {
        RouterOptions {
            start_timeout: DEFAULT_START_TIMEOUT,
            follow_map_updates: true,
            twopc_failpoint: None,
            serve: Default::default(),
            clock_offset_ms: 0,
        }
    }
}

/// State shared by the services and the background watcher.
pub(crate) struct Shared {
    pub(crate) map: MapCell,
    pub(crate) leaders: Leaders,
    pub(crate) pool: Arc<Pool>,
    pub(crate) config: ConfigClient,
    /// Serialises map refreshes (see `config::refresh_map`).
    pub(crate) refresh_lock: tokio::sync::Mutex<()>,
    /// Turns true when the router stops (ends the router's own watch streams).
    pub(crate) stop: watch::Receiver<bool>,
    pub(crate) counters: Counters,
    pub(crate) twopc_failpoint: Option<Failpoint>,
    pub(crate) clock_offset_ms: i64,
    /// One permit per open `Feed.Watch` (`FEED_WATCHES_MAX`).
    pub(crate) feed_watches: Arc<tokio::sync::Semaphore>,
    /// One permit per open `Feed.Consume` (`FEED_MEMBERS_MAX`).
    pub(crate) feed_members: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    fn new(
        pool: Arc<Pool>,
        config: ConfigClient,
        stop: watch::Receiver<bool>,
        opts: &RouterOptions,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            map: MapCell::new(),
            leaders: Leaders::default(),
            pool,
            config,
            refresh_lock: tokio::sync::Mutex::new(()),
            stop,
            counters: Counters::default(),
            twopc_failpoint: opts.twopc_failpoint,
            clock_offset_ms: opts.clock_offset_ms,
            feed_watches: feed::watch_permits(),
            feed_members: feed::member_permits(),
        })
    }

    /// This router's clock (ms since the Unix epoch), which orders its transactions.
    pub(crate) fn now_ms(&self) -> u64 {
        ordo_proto::unix_ms().saturating_add_signed(self.clock_offset_ms)
    }

    /// Installs `map` if it is newer than the cached one.
    pub(crate) fn install_map(&self, map: ShardMap, source: &str) {
        self.config.learn(&map);
        if self.map.install(map, source).is_some() {
            self.leaders.retain_groups(&self.map.current());
        }
    }
}

/// A running router.
pub struct Router {
    /// The address it listens on (the real port when `listen` asked for port 0).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop_tx: watch::Sender<bool>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    watcher: Option<JoinHandle<()>>,
}

impl Router {
    /// Binds `cfg.listen`, fetches the shard map from the config servers (trying for up to
    /// [`DEFAULT_START_TIMEOUT`]), starts following map updates and serves.
    pub async fn start(cfg: RouterConfig) -> anyhow::Result<Router> {
        Router::start_with_options(cfg, RouterOptions::default()).await
    }

    /// [`Router::start`] with explicit [`RouterOptions`].
    pub async fn start_with_options(
        cfg: RouterConfig,
        opts: RouterOptions,
    ) -> anyhow::Result<Router> {
        let pool = Arc::new(Pool::default());
        let config = ConfigClient::new(&cfg.config_addrs, pool.clone())?;
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .with_context(|| format!("router: cannot listen on {}", cfg.listen))?;
        let addr = listener.local_addr()?;

        let initial = config.fetch_initial(opts.start_timeout).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Shared::new(pool, config, stop_rx.clone(), &opts);
        shared.install_map(initial, "start");
        if shared.map.current().version == 0 {
            tracing::warn!(
                "the cluster is not initialized yet (map version 0): run `ordoctl init`"
            );
        }

        let watcher = opts
            .follow_map_updates
            .then(|| tokio::spawn(config::watch_maps(shared.clone())));
        let kv = KvServer::new(KvService(shared.clone()))
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX);
        let cluster = ClusterServer::new(ClusterService(shared.clone()))
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX);
        let feed = FeedServer::new(FeedService(shared.clone()))
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX);
        let mut stop = stop_rx;
        let routes = tonic::service::Routes::new(kv)
            .add_service(cluster)
            .add_service(feed);
        let server = tokio::spawn(async move {
            ordo_proto::serve::serve(routes, listener, &opts.serve, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        });
        tracing::info!(
            %addr,
            config = ?shared.config.addrs(),
            map_version = shared.map.current().version,
            "router serving"
        );
        Ok(Router {
            addr,
            shared,
            stop_tx,
            server: Some(server),
            watcher,
        })
    }

    /// The version of the cached shard map (0 = cluster not initialized).
    pub fn map_version(&self) -> u64 {
        self.shared.map.current().version
    }

    /// The cached shard map.
    pub fn shard_map(&self) -> ordo_proto::v1::ShardMap {
        (*self.shared.map.current()).clone()
    }

    /// Waits until the router holds a shard map of at least `version`, for at most `timeout`.
    /// Returns whether it does. (At start the router takes the map from any config replica,
    /// which may not have applied the newest one yet; the watch brings it shortly after.)
    pub async fn wait_for_map_version(&self, version: u64, timeout: Duration) -> bool {
        let mut maps = self.shared.map.subscribe();
        tokio::time::timeout(timeout, maps.wait_for(|m| m.version >= version))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Routing counters since start.
    pub fn stats(&self) -> RouterStats {
        let c = &self.shared.counters;
        RouterStats {
            wrong_shard: c.wrong_shard.load(Ordering::Relaxed),
            redirects: c.redirects.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting requests, lets open ones finish for at most [`SHUTDOWN_GRACE`], then
    /// aborts what is left.
    pub async fn shutdown(mut self) {
        let _ = self.stop_tx.send(true);
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
        if let Some(mut server) = self.server.take() {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!("router server ended with an error: {e}"),
                Ok(Err(e)) => tracing::warn!("router server task failed: {e}"),
                Err(_) => {
                    tracing::warn!("requests still open after {SHUTDOWN_GRACE:?}; aborting them");
                    server.abort();
                }
            }
        }
        tracing::info!(addr = %self.addr, "router stopped");
    }
}

/// The router's lock resolution (`locks.rs`) for use outside a router: a shard group's leader
/// resolves, in the background, expired locks that no request meets (audit M4: an orphan on a
/// cold key would block moving its slot). Routes by a shard map fetched from the config servers
/// and refreshed on `wrong shard`, like a router that does not follow map updates.
pub struct LockResolver {
    shared: Arc<Shared>,
    /// Dropped with the resolver: nothing of it outlives it.
    _stop: watch::Sender<bool>,
}

impl LockResolver {
    /// Fetches the shard map from the config servers at `config_addrs`, trying for `timeout`.
    pub async fn connect(config_addrs: &[String], timeout: Duration) -> anyhow::Result<Self> {
        let pool = Arc::new(Pool::default());
        let config = ConfigClient::new(config_addrs, pool.clone())?;
        let initial = config.fetch_initial(timeout).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Shared::new(pool, config, stop_rx, &RouterOptions::default());
        shared.install_map(initial, "start");
        Ok(LockResolver {
            shared,
            _stop: stop_tx,
        })
    }

    /// Resolves `lock`, met on an item of shard key `at`, if its holder has held it longer than
    /// the lock timeout (`lock.age_ms`), within `budget`: as a router meeting it would.
    pub async fn resolve(
        &self,
        lock: ordo_proto::v1::error_detail::Locked,
        at: bytes::Bytes,
        budget: Duration,
    ) -> Result<(), tonic::Status> {
        let deadline = tokio::time::Instant::now() + budget;
        locks::resolve(&self.shared, lock, at, deadline, None).await
    }
}

impl Drop for Router {
    /// A router dropped without [`Router::shutdown`] still stops: the server drains in the
    /// background and the watcher ends.
    fn drop(&mut self) {
        let _ = self.stop_tx.send(true);
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
    }
}
