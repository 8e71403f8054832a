//! The Ordo clients: handles over a list of addresses that find the leader by themselves.
//!
//! [`Client`] speaks the `ordo.v1.Kv` service (to the nodes of a shard group, or to a router);
//! [`ClusterClient`] speaks the `ordo.v1.Cluster` service (to config servers, or to a router,
//! which proxies it).
//!
//! A server answers a request it cannot serve because it is not the leader with `Unavailable`
//! and an [`ordo_proto::v1::ErrorDetail`] naming the leader when it knows it. Both clients follow that hint (or
//! try the next address when there is none), back off between attempts, remember the leader for
//! the next call, and give up after a bounded number of attempts or when the per-call deadline
//! runs out. Every other error is handed back unchanged as a [`tonic::Status`], so callers can
//! inspect its code and details. The machinery lives in one place, `Core::call`, which is generic
//! over the RPC: each client only says how to make its call on a [`Channel`].
//!
//! Channels are created lazily (nothing connects until the first request) and cached per address.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use ordo_proto::v1::cluster_client::ClusterClient as ClusterStub;
use ordo_proto::v1::kv_client::KvClient;
use ordo_proto::v1::{
    error_detail, AddGroupRequest, ChangeGroupReplicasRequest, ChangeGroupReplicasResponse,
    ClusterStatus, Consistency, DeleteRequest, DeleteResponse, GetClusterStatusRequest, GetRequest,
    GetResponse, GetShardMapRequest, InitClusterRequest, MoveSlotsRequest, PutRequest, PutResponse,
    RemoveGroupRequest, ScanRequest, ScanResponse, ShardMap, TxnRequest, TxnResponse,
    WatchShardMapRequest,
};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Per-call deadline unless [`Client::with_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most attempts (first try included) one call makes before it returns the last error.
pub const MAX_ATTEMPTS: u32 = 20;
/// Time allowed to establish a TCP connection to one address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// First backoff delay; doubled on every further retry.
const BACKOFF_BASE: Duration = Duration::from_millis(20);
/// Longest backoff delay.
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Largest response the client decodes. tonic's default (4 MiB) is too small for a full scan page
/// of large values; this stays well above what a node sends while still bounding memory.
const RESPONSE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// A client of the `ordo.v1.Kv` service over one or more node addresses.
///
/// Cheap to clone: clones share the channel cache and the remembered leader, so one `Client` can
/// be handed to many tasks.
///
/// # Retries and write outcomes
///
/// A read (`get`, `scan`) is retried (up to [`MAX_ATTEMPTS`] attempts by default, within the
/// deadline) when it failed with `Unavailable`: a not-leader answer, or a plain `Unavailable` such
/// as "no leader elected yet" or a refused connection.
///
/// A write (`put`, `delete`, `txn`) is retried only when the failed attempt certainly was not
/// applied ([`ordo_proto::certainly_not_applied`]): a not-leader answer, a `NotApplied` detail
/// (the node refused it before proposing, or its log entry was replaced), or a connection that
/// could not be established, so the request was never sent. A plain `Unavailable` (a leader may
/// stop or lose leadership after it proposed the write) is returned at once, so a write never
/// applies twice and a conditional write never reports a failure caused by its own first attempt.
///
/// Every other status, including `DeadlineExceeded` and broken connections (which tonic reports
/// as `Unknown` or `Internal`), is returned at once. A `WrongShard` detail is returned too: it is
/// for a router to act on.
///
/// When a write returns an error that is not `InvalidArgument`, `FailedPrecondition` or
/// certainly-not-applied, its outcome is unknown: read the item back before acting on it.
#[derive(Clone)]
pub struct Client {
    core: Core,
}

/// A client of the `ordo.v1.Cluster` service over the addresses of config servers or routers.
///
/// Same construction and sharing as [`Client`]: reads and writes follow `NotLeader` hints to the
/// meta leader and retry plain `Unavailable` answers.
///
/// # Write outcomes
///
/// Unlike a [`Client`] write, a map change is retried after a plain `Unavailable` too: each one
/// is a compare-and-set on the map version or refuses to repeat itself, so it cannot apply twice.
/// A change that failed with a plain `Unavailable` may have been applied, though, so its retry
/// may fail because of its own first attempt: `init_cluster` then reports that the
/// cluster is already initialized, `add_group` that the group exists, `remove_group` that it does
/// not. `move_slots` is idempotent. When a write returns an error, read the map back with
/// `get_shard_map(true)` before acting on it.
#[derive(Clone)]
pub struct ClusterClient {
    core: Core,
}

/// The address list, channel cache, remembered leader and retry policy behind both clients.
///
/// Cheap to clone; clones share the cache and the routing state.
#[derive(Clone)]
struct Core {
    shared: Arc<Shared>,
    timeout: Duration,
    max_attempts: u32,
}

/// State shared by all clones of one client.
struct Shared {
    /// The user's addresses, normalised and deduplicated, in the order given.
    endpoints: Vec<String>,
    channels: Mutex<HashMap<String, Channel>>,
    routing: Mutex<Routing>,
}

/// Where the next request goes.
#[derive(Default)]
struct Routing {
    /// The last known leader; tried first.
    leader: Option<String>,
    /// Index into `endpoints` of the address to try when no leader is known.
    next: usize,
}

/// What kind of call is made: decides which failures are retried and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A read the leader answers: retried after any `Unavailable`.
    Read,
    /// A read any replica may answer: retried like `Read`, but with a single address the user
    /// asked for that replica, so hints are not followed.
    StaleRead,
    /// A Kv write: retried only when the attempt certainly was not applied.
    Write,
    /// A map change (CAS or self-refusing, see [`ClusterClient`]): retried like a read.
    MapChange,
}

/// What a failed attempt tells the retry loop.
#[derive(Debug, PartialEq, Eq)]
enum Retry {
    /// The node named the leader: go there.
    Redirect(String),
    /// Transiently unavailable, leader unknown: try the next address.
    Rotate,
    /// Not retryable: hand the status to the caller.
    Fail,
}

/// The accessors and builders both clients share, delegating to their [`Core`].
macro_rules! common_client_api {
    ($client:ident) => {
        impl $client {
            /// Creates a client over `endpoints` (`host:port` or `http://host:port`).
            ///
            /// Nothing connects here, so this needs no runtime and succeeds even when no server
            /// is up yet; connection failures surface (and are retried) on the first request.
            pub fn connect(endpoints: Vec<String>) -> anyhow::Result<$client> {
                Ok($client {
                    core: Core::new(endpoints)?,
                })
            }

            /// Sets the overall deadline of each call, retries and backoff included.
            pub fn with_timeout(mut self, timeout: Duration) -> $client {
                self.core.timeout = timeout;
                self
            }

            /// Sets the most attempts (first try included, at least 1) one call makes; default
            /// [`MAX_ATTEMPTS`].
            pub fn with_max_attempts(mut self, attempts: u32) -> $client {
                self.core.max_attempts = attempts.max(1);
                self
            }

            /// The per-call deadline.
            pub fn timeout(&self) -> Duration {
                self.core.timeout
            }

            /// The normalised addresses this client was created with.
            pub fn endpoints(&self) -> &[String] {
                &self.core.shared.endpoints
            }

            /// The leader address learnt from the last calls, if any.
            pub fn leader(&self) -> Option<String> {
                self.core.leader()
            }
        }
    };
}

common_client_api!(Client);
common_client_api!(ClusterClient);

/// A Kv stub on `channel`.
fn kv(channel: Channel) -> KvClient<Channel> {
    KvClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX)
}

/// A Cluster stub on `channel`.
fn cluster(channel: Channel) -> ClusterStub<Channel> {
    ClusterStub::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX)
}

/// A Peer stub on `channel` (node admin calls).
fn peer(channel: Channel) -> ordo_proto::v1::peer_client::PeerClient<Channel> {
    ordo_proto::v1::peer_client::PeerClient::new(channel)
        .max_decoding_message_size(RESPONSE_BYTES_MAX)
}

impl Client {
    /// Hands the group's leadership to replica `to` (given the addresses of the group's nodes,
    /// not a router's). Answers once `to` leads. Repeating it is harmless, so it is retried like
    /// a read.
    pub async fn transfer_leader(
        &self,
        to: u64,
    ) -> Result<ordo_proto::v1::TransferLeaderResponse, Status> {
        let req = ordo_proto::v1::TransferLeaderRequest { to };
        self.core
            .call(req, Kind::MapChange, |ch, r| async move {
                peer(ch).transfer_leader(r).await
            })
            .await
    }
    /// Reads one item. With `stale`, any replica may answer from its local state, which may lag
    /// behind acknowledged writes; otherwise the read is linearizable.
    pub async fn get(
        &self,
        shard_key: impl Into<Bytes>,
        key: impl Into<Bytes>,
        stale: bool,
    ) -> Result<GetResponse, Status> {
        let req = GetRequest {
            header: None,
            shard_key: shard_key.into(),
            key: key.into(),
            consistency: consistency(stale) as i32,
        };
        self.core
            .call(
                req,
                read_kind(stale),
                |ch, r| async move { kv(ch).get(r).await },
            )
            .await
    }

    /// Writes one item. With `if_version`, writes only when the item's version equals it
    /// (`Some(0)`: the item must not exist); a failed condition is `Ok` with `succeeded == false`.
    /// See the type's documentation about the outcome of a write that returned an error.
    pub async fn put(
        &self,
        shard_key: impl Into<Bytes>,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        if_version: Option<u64>,
    ) -> Result<PutResponse, Status> {
        let req = PutRequest {
            header: None,
            shard_key: shard_key.into(),
            key: key.into(),
            value: value.into(),
            if_version,
        };
        self.core
            .call(req, Kind::Write, |ch, r| async move { kv(ch).put(r).await })
            .await
    }

    /// Deletes one item, optionally only at `if_version`.
    /// See the type's documentation about the outcome of a write that returned an error.
    pub async fn delete(
        &self,
        shard_key: impl Into<Bytes>,
        key: impl Into<Bytes>,
        if_version: Option<u64>,
    ) -> Result<DeleteResponse, Status> {
        let req = DeleteRequest {
            header: None,
            shard_key: shard_key.into(),
            key: key.into(),
            if_version,
        };
        self.core
            .call(
                req,
                Kind::Write,
                |ch, r| async move { kv(ch).delete(r).await },
            )
            .await
    }

    /// Reads one page of the keys in `[start, end)` of `shard_key` (an empty `end` means to the end
    /// of the shard key), at most `limit` items (0 = the server's page size). When more remain,
    /// the response's `next_key` is the `start` of the next page.
    pub async fn scan(
        &self,
        shard_key: impl Into<Bytes>,
        start: impl Into<Bytes>,
        end: impl Into<Bytes>,
        limit: u32,
        stale: bool,
    ) -> Result<ScanResponse, Status> {
        let req = ScanRequest {
            header: None,
            shard_key: shard_key.into(),
            start_key: start.into(),
            end_key: end.into(),
            limit,
            consistency: consistency(stale) as i32,
        };
        self.core
            .call(req, read_kind(stale), |ch, r| async move {
                kv(ch).scan(r).await
            })
            .await
    }

    /// Runs a transaction: checks `compares`, then runs the success or the failure ops atomically.
    /// See the type's documentation about the outcome of a write that returned an error.
    pub async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, Status> {
        self.core
            .call(req, Kind::Write, |ch, r| async move { kv(ch).txn(r).await })
            .await
    }
}

impl ClusterClient {
    /// The shard map. Without `linearizable`, any config replica (or a router's cache) answers
    /// with the version it has, which may lag; with it, the meta leader answers with its latest.
    pub async fn get_shard_map(&self, linearizable: bool) -> Result<ShardMap, Status> {
        let req = GetShardMapRequest { linearizable };
        self.core
            .call(req, read_kind(!linearizable), |ch, r| async move {
                cluster(ch).get_shard_map(r).await
            })
            .await
    }

    /// Creates the cluster: spreads `slot_count` slots evenly over the groups. All or nothing;
    /// refused on an initialized cluster. See the type's documentation about write outcomes.
    pub async fn init_cluster(&self, req: InitClusterRequest) -> Result<ShardMap, Status> {
        self.core
            .call(req, Kind::MapChange, |ch, r| async move {
                cluster(ch).init_cluster(r).await
            })
            .await
    }

    /// Registers a running group; it owns no slots until slots are moved to it.
    pub async fn add_group(&self, req: AddGroupRequest) -> Result<ShardMap, Status> {
        self.core
            .call(req, Kind::MapChange, |ch, r| async move {
                cluster(ch).add_group(r).await
            })
            .await
    }

    /// Unregisters group `id`, which must own no slots.
    pub async fn remove_group(&self, id: u64) -> Result<ShardMap, Status> {
        let req = RemoveGroupRequest { id };
        self.core
            .call(req, Kind::MapChange, |ch, r| async move {
                cluster(ch).remove_group(r).await
            })
            .await
    }

    /// Moves `slots` to group `to`.
    pub async fn move_slots(&self, slots: Vec<u32>, to: u64) -> Result<ShardMap, Status> {
        let req = MoveSlotsRequest {
            slots,
            to_group: to,
            ..Default::default()
        };
        self.core
            .call(req, Kind::MapChange, |ch, r| async move {
                cluster(ch).move_slots(r).await
            })
            .await
    }

    /// Changes the replicas of group `req.group_id` (0 = the config servers): see
    /// `Peer.ChangeReplicas`. Give the client a timeout longer than the catch-up timeout.
    pub async fn change_group_replicas(
        &self,
        req: ChangeGroupReplicasRequest,
    ) -> Result<ChangeGroupReplicasResponse, Status> {
        self.core
            .call(req, Kind::MapChange, |ch, r| async move {
                cluster(ch).change_group_replicas(r).await
            })
            .await
    }

    /// Moves `req.slots` to `req.to_group` with their data (online resharding), with the
    /// request's copy bandwidth bound; answers once every migration committed and cleaned up.
    pub async fn move_slots_with(&self, req: MoveSlotsRequest) -> Result<ShardMap, Status> {
        self.core
            .call(req, Kind::MapChange, |ch, r| async move {
                cluster(ch).move_slots(r).await
            })
            .await
    }

    /// Migrations in flight and recently finished, with progress and measured pauses.
    pub async fn list_migrations(&self) -> Result<ordo_proto::v1::MigrationList, Status> {
        let req = ordo_proto::v1::ListMigrationsRequest {};
        self.core
            .call(req, Kind::Read, |ch, r| async move {
                cluster(ch).list_migrations(r).await
            })
            .await
    }

    /// Aborts migration `id` before its commit point.
    pub async fn abort_migration(&self, id: u64) -> Result<ordo_proto::v1::Migration, Status> {
        let req = ordo_proto::v1::AbortMigrationRequest { id };
        self.core
            .call(req, Kind::MapChange, |ch, r| async move {
                cluster(ch).abort_migration(r).await
            })
            .await
    }

    /// Plans an even spread (or drains `req.drain_group`) and, unless a dry run, runs the moves.
    pub async fn rebalance(
        &self,
        req: ordo_proto::v1::RebalanceRequest,
    ) -> Result<ordo_proto::v1::RebalanceResponse, Status> {
        self.core
            .call(req, Kind::MapChange, |ch, r| async move {
                cluster(ch).rebalance(r).await
            })
            .await
    }

    /// The map plus each replica's live state (groups and config replicas).
    pub async fn cluster_status(&self) -> Result<ClusterStatus, Status> {
        self.core
            .call(GetClusterStatusRequest {}, Kind::Read, |ch, r| async move {
                cluster(ch).get_cluster_status(r).await
            })
            .await
    }

    /// Streams the shard map: the current one (or only versions above `after_version` when it
    /// is not 0), then every newer version as it is committed.
    ///
    /// Not retried: one attempt on the remembered leader or the next address, bounded by the
    /// client's timeout until the stream is established (the stream itself has no deadline). A
    /// retryable failure moves the client on to the next address, so a caller that watches in a
    /// loop re-calls this with the last version it saw and reaches another server.
    pub async fn watch_shard_map(
        &self,
        after_version: u64,
    ) -> Result<tonic::Streaming<ShardMap>, Status> {
        let addr = self.core.target();
        let mut stub = cluster(self.core.channel(&addr)?);
        let req = WatchShardMapRequest { after_version };
        match tokio::time::timeout(self.core.timeout, stub.watch_shard_map(req)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => {
                self.core
                    .reroute(&addr, classify(&status, Kind::Read), &mut false);
                Err(status)
            }
            Err(_elapsed) => {
                self.core.reroute(&addr, Retry::Rotate, &mut false);
                Err(deadline_exceeded(self.core.timeout, 1))
            }
        }
    }
}

impl Core {
    fn new(endpoints: Vec<String>) -> anyhow::Result<Core> {
        let mut normalised: Vec<String> = Vec::with_capacity(endpoints.len());
        for raw in &endpoints {
            let addr = normalize_addr(raw)?;
            // Validate now so that a typo fails at startup rather than on every request.
            Endpoint::from_shared(addr.clone())
                .with_context(|| format!("invalid endpoint address {raw:?}"))?;
            if !normalised.contains(&addr) {
                normalised.push(addr);
            }
        }
        if normalised.is_empty() {
            bail!("no endpoint given");
        }
        Ok(Core {
            shared: Arc::new(Shared {
                endpoints: normalised,
                channels: Mutex::new(HashMap::new()),
                routing: Mutex::new(Routing::default()),
            }),
            timeout: DEFAULT_TIMEOUT,
            max_attempts: MAX_ATTEMPTS,
        })
    }

    fn leader(&self) -> Option<String> {
        self.shared.routing.lock().unwrap().leader.clone()
    }

    /// Sends `req` with `rpc` (which makes the call on the channel it is given), following leader
    /// hints and retrying as described on [`Client`].
    ///
    /// A [`Kind::StaleRead`] may be served by any replica: a successful answer then says nothing
    /// about who leads, and with a single address the user asked for that replica specifically,
    /// so hints are not followed.
    async fn call<Req, Resp, F, Fut>(&self, req: Req, kind: Kind, rpc: F) -> Result<Resp, Status>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let deadline = Instant::now() + self.timeout;
        let stale = kind == Kind::StaleRead;
        let pinned = stale && self.shared.endpoints.len() == 1;
        let mut redirected = false;
        let mut attempt = 0;
        loop {
            let addr = if pinned {
                self.shared.endpoints[0].clone()
            } else {
                self.target()
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(deadline_exceeded(self.timeout, attempt));
            }
            let channel = self.channel(&addr)?;
            let mut request = tonic::Request::new(req.clone());
            // Tells the server how long we wait, so it can drop work nobody will read.
            request.set_timeout(remaining);
            // The header alone does not bound the wait on our side (e.g. a stalled connection).
            let status = match tokio::time::timeout(remaining, rpc(channel, request)).await {
                Ok(Ok(resp)) => {
                    if !stale {
                        self.shared.routing.lock().unwrap().leader = Some(addr);
                    }
                    return Ok(resp.into_inner());
                }
                Ok(Err(status)) => status,
                Err(_elapsed) => return Err(deadline_exceeded(self.timeout, attempt + 1)),
            };
            attempt += 1;

            let decision = classify(&status, kind);
            if decision == Retry::Fail || attempt >= self.max_attempts {
                return Err(status);
            }
            if pinned && decision != Retry::Rotate {
                // Do not wander off to another node the user did not ask for.
                return Err(status);
            }
            tracing::debug!(
                addr = %addr,
                attempt,
                code = ?status.code(),
                message = status.message(),
                "retrying ordo request"
            );
            // The first redirect is followed at once: it is the normal way to find the leader.
            // Later ones back off too, so that nodes pointing at each other during an election
            // do not burn the attempts in a few milliseconds.
            let delay = match &decision {
                Retry::Redirect(_) if !redirected => Duration::ZERO,
                _ => backoff(attempt - 1),
            };
            if !pinned {
                self.reroute(&addr, decision, &mut redirected);
            }
            if !delay.is_zero() {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if delay >= remaining {
                    // The next attempt could not start in time; the last error says more than
                    // "deadline exceeded" would.
                    return Err(status);
                }
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// The address the next attempt goes to.
    fn target(&self) -> String {
        let routing = self.shared.routing.lock().unwrap();
        match &routing.leader {
            Some(leader) => leader.clone(),
            None => self.shared.endpoints[routing.next % self.shared.endpoints.len()].clone(),
        }
    }

    /// Updates the routing after `failed` answered with a retryable error.
    fn reroute(&self, failed: &str, decision: Retry, redirected: &mut bool) {
        let mut routing = self.shared.routing.lock().unwrap();
        match decision {
            Retry::Redirect(leader) => {
                *redirected = true;
                routing.leader = Some(leader);
            }
            Retry::Fail => {}
            Retry::Rotate => {
                // Another task may already have moved on; only forget the leader it failed on.
                if routing.leader.as_deref() == Some(failed) || routing.leader.is_none() {
                    routing.leader = None;
                    // Step past the failed address (it may be a hint outside the list, in which
                    // case any next address will do).
                    let endpoints = &self.shared.endpoints;
                    routing.next = match endpoints.iter().position(|e| e == failed) {
                        Some(i) => i + 1,
                        None => routing.next + 1,
                    } % endpoints.len();
                }
            }
        }
    }

    /// The cached channel to `addr`, created (without connecting) on first use.
    fn channel(&self, addr: &str) -> Result<Channel, Status> {
        let mut channels = self.shared.channels.lock().unwrap();
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let endpoint = Endpoint::from_shared(addr.to_string())
            .map_err(|e| Status::invalid_argument(format!("invalid address {addr:?}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

fn consistency(stale: bool) -> Consistency {
    if stale {
        Consistency::Stale
    } else {
        Consistency::Linearizable
    }
}

fn deadline_exceeded(timeout: Duration, attempts: u32) -> Status {
    Status::deadline_exceeded(format!(
        "no answer within the client deadline of {timeout:?} ({attempts} attempt(s)); \
         a write's outcome is unknown"
    ))
}

fn read_kind(stale: bool) -> Kind {
    if stale {
        Kind::StaleRead
    } else {
        Kind::Read
    }
}

/// Decides what to do after `status` for a call of `kind`.
fn classify(status: &Status, kind: Kind) -> Retry {
    if status.code() != Code::Unavailable {
        return Retry::Fail;
    }
    // A write whose attempt may have been applied must not be sent again.
    if kind == Kind::Write && !ordo_proto::certainly_not_applied(status) {
        return Retry::Fail;
    }
    match error_detail_of(status) {
        Some(error_detail::Kind::NotLeader(nl)) if !nl.leader_addr.is_empty() => {
            match normalize_addr(&nl.leader_addr) {
                Ok(addr) => Retry::Redirect(addr),
                // A hint we cannot use is as good as no hint.
                Err(_) => Retry::Rotate,
            }
        }
        Some(error_detail::Kind::NotLeader(_))
        | Some(error_detail::Kind::NotApplied(_))
        | Some(error_detail::Kind::SlotMoving(_))
        | None => Retry::Rotate,
        // Routing and lock errors are for a router to act on, not for a client talking to nodes.
        Some(error_detail::Kind::WrongShard(_)) | Some(error_detail::Kind::Locked(_)) => {
            Retry::Fail
        }
    }
}

/// The typed detail a node attached to an error status, if any.
pub fn error_detail_of(status: &Status) -> Option<error_detail::Kind> {
    ordo_proto::error_detail_of(status)
}

/// Turns `host:port` into `http://host:port`; keeps `http://` addresses; rejects `https://` (this
/// build has no TLS) and empty input. A trailing `/` is dropped so that one address has one
/// spelling in the channel cache.
pub fn normalize_addr(raw: &str) -> anyhow::Result<String> {
    let trimmed = raw.trim();
    let host_port = match trimmed.split_once("://") {
        None => trimmed,
        Some(("http", rest)) => rest,
        Some(("https", _)) => bail!("endpoint {raw:?}: TLS is not supported, use http://"),
        Some(_) => bail!("endpoint {raw:?}: unsupported scheme, use host:port or http://host:port"),
    };
    let host_port = host_port.trim_end_matches('/');
    if host_port.is_empty() {
        bail!("endpoint {raw:?} has no host");
    }
    Ok(format!("http://{host_port}"))
}

/// Delay before retry number `retry` (0-based): 20 ms doubling up to 500 ms.
fn backoff(retry: u32) -> Duration {
    // Cap the shift so that the multiplication cannot overflow for large retry counts.
    let factor = 1u32 << retry.min(16);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ordo_proto::v1::ErrorDetail;
    use prost::Message;

    fn not_leader(leader_id: u64, leader_addr: &str) -> Status {
        let detail = ErrorDetail {
            kind: Some(error_detail::Kind::NotLeader(error_detail::NotLeader {
                leader_id,
                leader_addr: leader_addr.to_string(),
            })),
        };
        Status::with_details(
            Code::Unavailable,
            "not leader",
            detail.encode_to_vec().into(),
        )
    }

    #[test]
    fn addresses_are_normalised() {
        assert_eq!(
            normalize_addr("127.0.0.1:7001").unwrap(),
            "http://127.0.0.1:7001"
        );
        assert_eq!(
            normalize_addr(" localhost:7001/ ").unwrap(),
            "http://localhost:7001"
        );
        assert_eq!(
            normalize_addr("http://10.0.0.1:7001").unwrap(),
            "http://10.0.0.1:7001"
        );
        assert_eq!(normalize_addr("[::1]:7001").unwrap(), "http://[::1]:7001");
        assert!(normalize_addr("").is_err());
        assert!(normalize_addr("  ").is_err());
        assert!(normalize_addr("http://").is_err());
        assert!(normalize_addr("https://a:1").is_err());
        assert!(normalize_addr("grpc://a:1").is_err());
    }

    #[test]
    fn connect_validates_and_dedups_without_a_runtime() {
        let c = Client::connect(vec![
            "127.0.0.1:7001".into(),
            "http://127.0.0.1:7001".into(),
            "127.0.0.1:7002".into(),
        ])
        .unwrap();
        assert_eq!(
            c.endpoints(),
            ["http://127.0.0.1:7001", "http://127.0.0.1:7002"]
        );
        assert_eq!(c.timeout(), DEFAULT_TIMEOUT);
        assert_eq!(
            c.with_timeout(Duration::from_secs(3)).timeout(),
            Duration::from_secs(3)
        );
        assert!(Client::connect(vec![]).is_err());
        assert!(Client::connect(vec!["bad host:1".into()]).is_err());
    }

    #[test]
    fn backoff_doubles_from_20ms_and_is_capped() {
        assert_eq!(backoff(0), Duration::from_millis(20));
        assert_eq!(backoff(1), Duration::from_millis(40));
        assert_eq!(backoff(4), Duration::from_millis(320));
        assert_eq!(backoff(5), BACKOFF_MAX);
        let mut prev = Duration::ZERO;
        for retry in 0..100 {
            let d = backoff(retry);
            assert!(d >= prev && d <= BACKOFF_MAX && d >= BACKOFF_BASE);
            prev = d;
        }
        // Even if every attempt backs off fully, the attempts fit in the default deadline.
        let worst: Duration = (0..MAX_ATTEMPTS).map(backoff).sum();
        assert!(worst < DEFAULT_TIMEOUT, "{worst:?}");
    }

    #[test]
    fn statuses_are_classified() {
        use Kind::{MapChange, Read, StaleRead, Write};
        for kind in [Read, StaleRead, Write, MapChange] {
            assert_eq!(
                classify(&not_leader(2, "127.0.0.1:7002"), kind),
                Retry::Redirect("http://127.0.0.1:7002".into())
            );
            assert_eq!(classify(&not_leader(0, ""), kind), Retry::Rotate);
            assert_eq!(classify(&not_leader(2, ""), kind), Retry::Rotate);
            let not_applied: Status = crate::error::Error::NotApplied("full".into()).into();
            assert_eq!(classify(&not_applied, kind), Retry::Rotate);
            assert_eq!(
                classify(&Status::invalid_argument("key too long"), kind),
                Retry::Fail
            );
            assert_eq!(
                classify(&Status::deadline_exceeded("slow"), kind),
                Retry::Fail
            );
            assert_eq!(
                classify(&Status::unknown("connection reset"), kind),
                Retry::Fail
            );
            let wrong_shard = ErrorDetail {
                kind: Some(error_detail::Kind::WrongShard(error_detail::WrongShard {
                    map_version: 3,
                })),
            };
            let s =
                Status::with_details(Code::Unavailable, "x", wrong_shard.encode_to_vec().into());
            assert_eq!(classify(&s, kind), Retry::Fail);
        }
        // A plain Unavailable: a read or a map change moves on, a write may have been applied.
        let plain = Status::unavailable("no leader elected yet");
        for kind in [Read, StaleRead, MapChange] {
            assert_eq!(classify(&plain, kind), Retry::Rotate);
        }
        assert_eq!(classify(&plain, Write), Retry::Fail);
        // Garbage details are ignored rather than trusted.
        let junk = Status::with_details(Code::Unavailable, "x", Bytes::from_static(b"\xff\xff"));
        assert_eq!(classify(&junk, Read), Retry::Rotate);
        assert_eq!(classify(&junk, Write), Retry::Fail);
    }

    #[test]
    fn rerouting_follows_hints_and_rotates() {
        let c = Core::new(vec!["a:1".into(), "b:1".into(), "c:1".into()]).unwrap();
        assert_eq!(c.target(), "http://a:1");
        let mut redirected = false;
        c.reroute(
            "http://a:1",
            Retry::Redirect("http://c:1".into()),
            &mut redirected,
        );
        assert!(redirected);
        assert_eq!(c.target(), "http://c:1");
        assert_eq!(c.leader().as_deref(), Some("http://c:1"));
        // The leader failed: forget it and move past it in the list.
        c.reroute("http://c:1", Retry::Rotate, &mut redirected);
        assert_eq!(c.leader(), None);
        assert_eq!(c.target(), "http://a:1");
        c.reroute("http://a:1", Retry::Rotate, &mut redirected);
        assert_eq!(c.target(), "http://b:1");
        // A failure on an address other than the remembered leader leaves the leader alone.
        c.reroute(
            "http://b:1",
            Retry::Redirect("http://a:1".into()),
            &mut redirected,
        );
        c.reroute("http://b:1", Retry::Rotate, &mut redirected);
        assert_eq!(c.target(), "http://a:1");
    }

    #[tokio::test]
    async fn unreachable_nodes_give_unavailable_within_the_deadline() {
        // Port 1 on localhost refuses connections: every attempt is a retryable Unavailable.
        let c = Client::connect(vec!["127.0.0.1:1".into()])
            .unwrap()
            .with_timeout(Duration::from_millis(300));
        let start = std::time::Instant::now();
        let err = c.get("o", "k", false).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    /// A scripted node serving both Kv and Cluster: answers every request according to `reply`
    /// and counts the calls.
    mod fake {
        use super::*;
        use ordo_proto::v1::cluster_server::{Cluster, ClusterServer};
        use ordo_proto::v1::kv_server::{Kv, KvServer};
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tonic::{Request, Response};

        #[derive(Clone)]
        pub enum Reply {
            Serve,
            NotLeader(String),
            Unavailable,
            NotApplied,
            Invalid,
        }

        pub struct Node {
            pub reply: Mutex<Reply>,
            pub calls: AtomicUsize,
            pub consistency: Mutex<Option<i32>>,
            pub linearizable: Mutex<Option<bool>>,
        }

        impl Node {
            pub fn calls(&self) -> usize {
                self.calls.load(Ordering::SeqCst)
            }

            fn answer<T>(&self, ok: T) -> Result<Response<T>, Status> {
                self.calls.fetch_add(1, Ordering::SeqCst);
                match self.reply.lock().unwrap().clone() {
                    Reply::Serve => Ok(Response::new(ok)),
                    Reply::NotLeader(addr) => Err(not_leader(2, &addr)),
                    Reply::Unavailable => Err(Status::unavailable("no leader elected yet")),
                    Reply::NotApplied => {
                        Err(crate::error::Error::NotApplied("leader overloaded".into()).into())
                    }
                    Reply::Invalid => Err(Status::invalid_argument("bad key")),
                }
            }
        }

        /// The service wrapper (the trait cannot be implemented for `Arc<Node>` directly).
        struct Svc(Arc<Node>);

        #[tonic::async_trait]
        impl Kv for Svc {
            async fn get(&self, r: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
                *self.0.consistency.lock().unwrap() = Some(r.get_ref().consistency);
                let value = r.into_inner().key;
                self.0.answer(GetResponse {
                    found: true,
                    value,
                    version: 1,
                })
            }
            async fn put(&self, _: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
                self.0.answer(PutResponse {
                    succeeded: true,
                    version: 2,
                })
            }
            async fn delete(
                &self,
                _: Request<DeleteRequest>,
            ) -> Result<Response<DeleteResponse>, Status> {
                Err(Status::unimplemented("fake"))
            }
            async fn scan(
                &self,
                _: Request<ScanRequest>,
            ) -> Result<Response<ScanResponse>, Status> {
                Err(Status::unimplemented("fake"))
            }
            async fn txn(&self, _: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
                Err(Status::unimplemented("fake"))
            }
        }

        /// A map of `version` whose slots `0..owners.len()` belong to `owners`.
        pub fn map(version: u64, owners: Vec<u64>) -> ShardMap {
            ShardMap {
                version,
                slot_count: owners.len() as u32,
                slot_owner: owners,
                ..ShardMap::default()
            }
        }

        #[tonic::async_trait]
        impl Cluster for Svc {
            async fn get_shard_map(
                &self,
                r: Request<GetShardMapRequest>,
            ) -> Result<Response<ShardMap>, Status> {
                *self.0.linearizable.lock().unwrap() = Some(r.get_ref().linearizable);
                self.0.answer(map(1, vec![1, 2]))
            }

            type WatchShardMapStream =
                tokio_stream::Iter<std::vec::IntoIter<Result<ShardMap, Status>>>;

            async fn watch_shard_map(
                &self,
                r: Request<WatchShardMapRequest>,
            ) -> Result<Response<Self::WatchShardMapStream>, Status> {
                let after = r.get_ref().after_version;
                self.0.answer(tokio_stream::iter(vec![
                    Ok(map(after + 1, vec![1])),
                    Ok(map(after + 2, vec![2])),
                ]))
            }

            async fn init_cluster(
                &self,
                r: Request<InitClusterRequest>,
            ) -> Result<Response<ShardMap>, Status> {
                let r = r.into_inner();
                let first = r.groups.first().map_or(0, |g| g.id);
                self.0.answer(map(1, vec![first; r.slot_count as usize]))
            }

            async fn add_group(
                &self,
                _: Request<AddGroupRequest>,
            ) -> Result<Response<ShardMap>, Status> {
                self.0.answer(map(2, vec![]))
            }

            async fn remove_group(
                &self,
                r: Request<RemoveGroupRequest>,
            ) -> Result<Response<ShardMap>, Status> {
                self.0.answer(map(r.get_ref().id, vec![]))
            }

            async fn move_slots(
                &self,
                r: Request<MoveSlotsRequest>,
            ) -> Result<Response<ShardMap>, Status> {
                let r = r.into_inner();
                self.0.answer(map(3, vec![r.to_group; r.slots.len()]))
            }

            async fn change_group_replicas(
                &self,
                _: Request<ordo_proto::v1::ChangeGroupReplicasRequest>,
            ) -> Result<Response<ordo_proto::v1::ChangeGroupReplicasResponse>, Status> {
                Err(Status::unimplemented("not scripted"))
            }

            async fn get_cluster_status(
                &self,
                _: Request<GetClusterStatusRequest>,
            ) -> Result<Response<ClusterStatus>, Status> {
                self.0.answer(ClusterStatus {
                    map: Some(map(7, vec![])),
                    ..ClusterStatus::default()
                })
            }

            async fn list_migrations(
                &self,
                _: Request<ordo_proto::v1::ListMigrationsRequest>,
            ) -> Result<Response<ordo_proto::v1::MigrationList>, Status> {
                Err(Status::unimplemented("fake"))
            }

            async fn abort_migration(
                &self,
                _: Request<ordo_proto::v1::AbortMigrationRequest>,
            ) -> Result<Response<ordo_proto::v1::Migration>, Status> {
                Err(Status::unimplemented("fake"))
            }

            async fn rebalance(
                &self,
                _: Request<ordo_proto::v1::RebalanceRequest>,
            ) -> Result<Response<ordo_proto::v1::RebalanceResponse>, Status> {
                Err(Status::unimplemented("fake"))
            }
        }

        /// Starts a node on a free port; returns its `host:port` and its state.
        pub async fn start(reply: Reply) -> (String, Arc<Node>) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let node = Arc::new(Node {
                reply: Mutex::new(reply),
                calls: AtomicUsize::new(0),
                consistency: Mutex::new(None),
                linearizable: Mutex::new(None),
            });
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(KvServer::new(Svc(node.clone())))
                    .add_service(ClusterServer::new(Svc(node.clone())))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            (addr, node)
        }
    }

    #[tokio::test]
    async fn follows_the_leader_hint_and_remembers_it() {
        let (b, node_b) = fake::start(fake::Reply::Serve).await;
        let (a, node_a) = fake::start(fake::Reply::NotLeader(b.clone())).await;
        let c = Client::connect(vec![a.clone()]).unwrap();
        let got = c.get("o", "k", false).await.unwrap();
        assert_eq!(got.value, "k");
        assert_eq!(c.leader(), Some(format!("http://{b}")));
        assert_eq!((node_a.calls(), node_b.calls()), (1, 1));
        // The next call goes straight to the remembered leader.
        c.put("o", "k", "v", None).await.unwrap();
        assert_eq!((node_a.calls(), node_b.calls()), (1, 2));
        assert_eq!(
            *node_b.consistency.lock().unwrap(),
            Some(Consistency::Linearizable as i32)
        );
    }

    #[tokio::test]
    async fn rotates_past_nodes_without_a_leader() {
        let (a, node_a) = fake::start(fake::Reply::Unavailable).await;
        let (b, node_b) = fake::start(fake::Reply::NotLeader(String::new())).await;
        let (l, node_l) = fake::start(fake::Reply::Serve).await;
        let c = Client::connect(vec![a, b, l.clone()]).unwrap();
        c.get("o", "k", false).await.unwrap();
        assert_eq!((node_a.calls(), node_b.calls(), node_l.calls()), (1, 1, 1));
        assert_eq!(c.leader(), Some(format!("http://{l}")));
    }

    #[tokio::test]
    async fn writes_are_retried_only_when_certainly_not_applied() {
        // A plain Unavailable may come after the write was proposed: returned at once.
        let (a, node_a) = fake::start(fake::Reply::Unavailable).await;
        let (l, node_l) = fake::start(fake::Reply::Serve).await;
        let c = Client::connect(vec![a, l.clone()]).unwrap();
        let err = c.put("o", "k", "v", Some(1)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!((node_a.calls(), node_l.calls()), (1, 0));

        // Not leader (no hint), NotApplied and a refused connection were certainly not applied.
        let (a, node_a) = fake::start(fake::Reply::NotApplied).await;
        let (b, node_b) = fake::start(fake::Reply::NotLeader(String::new())).await;
        let c = Client::connect(vec!["127.0.0.1:1".into(), a, b, l.clone()]).unwrap();
        c.put("o", "k", "v", Some(1)).await.unwrap();
        assert_eq!((node_a.calls(), node_b.calls(), node_l.calls()), (1, 1, 1));
        assert_eq!(c.leader(), Some(format!("http://{l}")));
    }

    #[tokio::test]
    async fn other_errors_are_returned_at_once() {
        let (a, node_a) = fake::start(fake::Reply::Invalid).await;
        let (b, node_b) = fake::start(fake::Reply::Serve).await;
        let c = Client::connect(vec![a, b]).unwrap();
        let err = c.get("o", "k", false).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.message(), "bad key");
        assert_eq!((node_a.calls(), node_b.calls()), (1, 0));
    }

    #[tokio::test]
    async fn gives_up_after_bounded_attempts_with_the_last_error() {
        let (a, node_a) = fake::start(fake::Reply::Unavailable).await;
        let c = Client::connect(vec![a]).unwrap().with_max_attempts(4);
        let err = c.get("o", "k", false).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(err.message(), "no leader elected yet");
        assert_eq!(node_a.calls(), 4);
    }

    #[tokio::test]
    async fn stale_reads_on_one_endpoint_stay_there() {
        let (b, node_b) = fake::start(fake::Reply::Serve).await;
        let (a, node_a) = fake::start(fake::Reply::NotLeader(b)).await;
        let c = Client::connect(vec![a]).unwrap();
        let err = c.get("o", "k", true).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(error_detail_of(&err).is_some(), "details stay inspectable");
        assert_eq!((node_a.calls(), node_b.calls()), (1, 0));
        // Once the replica serves, the stale answer comes from it and no leader is recorded.
        *node_a.reply.lock().unwrap() = fake::Reply::Serve;
        c.get("o", "k", true).await.unwrap();
        assert_eq!(
            *node_a.consistency.lock().unwrap(),
            Some(Consistency::Stale as i32)
        );
        assert_eq!(c.leader(), None);
    }

    #[tokio::test]
    async fn cluster_calls_follow_the_meta_leader() {
        let (b, node_b) = fake::start(fake::Reply::Serve).await;
        let (a, node_a) = fake::start(fake::Reply::NotLeader(b.clone())).await;
        let c = ClusterClient::connect(vec![a]).unwrap();
        let map = c
            .init_cluster(InitClusterRequest {
                slot_count: 4,
                groups: vec![ordo_proto::v1::GroupSpec {
                    id: 9,
                    addrs: vec!["x:1".into()],
                }],
            })
            .await
            .unwrap();
        assert_eq!((map.version, map.slot_owner), (1, vec![9; 4]));
        assert_eq!(c.leader(), Some(format!("http://{b}")));
        assert_eq!((node_a.calls(), node_b.calls()), (1, 1));
        // The remembered leader serves the other calls directly.
        let map = c.move_slots(vec![0, 1, 2], 5).await.unwrap();
        assert_eq!(map.slot_owner, [5, 5, 5]);
        assert_eq!(c.remove_group(4).await.unwrap().version, 4);
        assert_eq!(
            c.add_group(AddGroupRequest::default())
                .await
                .unwrap()
                .version,
            2
        );
        assert_eq!(c.cluster_status().await.unwrap().map.unwrap().version, 7);
        assert_eq!(c.get_shard_map(true).await.unwrap().version, 1);
        assert_eq!(*node_b.linearizable.lock().unwrap(), Some(true));
        assert_eq!((node_a.calls(), node_b.calls()), (1, 6));
    }

    #[tokio::test]
    async fn cluster_errors_keep_their_code_and_attempts_are_bounded() {
        let (a, node_a) = fake::start(fake::Reply::Invalid).await;
        let c = ClusterClient::connect(vec![a])
            .unwrap()
            .with_max_attempts(3);
        let err = c.remove_group(1).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(node_a.calls(), 1);
        *node_a.reply.lock().unwrap() = fake::Reply::Unavailable;
        let err = c.cluster_status().await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(node_a.calls(), 4);
    }

    #[tokio::test]
    async fn map_reads_from_one_replica_stay_there_unless_linearizable() {
        let (b, node_b) = fake::start(fake::Reply::Serve).await;
        let (a, node_a) = fake::start(fake::Reply::NotLeader(b.clone())).await;
        let c = ClusterClient::connect(vec![a]).unwrap();
        let err = c.get_shard_map(false).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!((node_a.calls(), node_b.calls()), (1, 0));
        c.get_shard_map(true).await.unwrap();
        assert_eq!((node_a.calls(), node_b.calls()), (2, 1));
        assert_eq!(c.leader(), Some(format!("http://{b}")));
    }

    #[tokio::test]
    async fn watch_streams_maps_and_is_not_retried() {
        let (a, node_a) = fake::start(fake::Reply::Unavailable).await;
        let (b, node_b) = fake::start(fake::Reply::Serve).await;
        let c = ClusterClient::connect(vec![a, b]).unwrap();
        // One attempt only, but the failure moves the client on to the next address.
        let err = c.watch_shard_map(5).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!((node_a.calls(), node_b.calls()), (1, 0));
        let mut stream = c.watch_shard_map(5).await.unwrap();
        assert_eq!(stream.message().await.unwrap().unwrap().version, 6);
        assert_eq!(stream.message().await.unwrap().unwrap().version, 7);
        assert!(stream.message().await.unwrap().is_none());
        assert_eq!((node_a.calls(), node_b.calls()), (1, 1));
    }

    #[test]
    fn cluster_client_is_built_like_the_kv_client() {
        let c = ClusterClient::connect(vec!["a:1".into(), "http://a:1/".into()])
            .unwrap()
            .with_timeout(Duration::from_secs(2));
        assert_eq!(c.endpoints(), ["http://a:1"]);
        assert_eq!(c.timeout(), Duration::from_secs(2));
        assert_eq!(c.leader(), None);
        assert!(ClusterClient::connect(vec![]).is_err());
    }
}
