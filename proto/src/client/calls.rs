//! The RPCs of both clients: each says which call it makes and what [`Effect`] it has; the walk
//! is [`Core::call`]'s.

use bytes::Bytes;
use tonic::Status;

use super::{
    cluster, consistency, deadline_exceeded, feed, kv, peer, read_effect, Client, ClusterClient,
};
use crate::retry::{classify, Action, Effect};
use crate::v1::{
    AddGroupRequest, ChangeGroupReplicasRequest, ChangeGroupReplicasResponse, ClusterStatus,
    DeleteRequest, DeleteResponse, GetClusterStatusRequest, GetRequest, GetResponse,
    GetShardMapRequest, InitClusterRequest, MoveSlotsRequest, PutRequest, PutResponse,
    RemoveGroupRequest, RequestHeader, ScanRequest, ScanResponse, ShardMap, TxnRequest,
    TxnResponse, WatchRequest, WatchResponse, WatchShardMapRequest,
};

/// The header of a write this client keys itself: every attempt carries the same key.
fn keyed() -> RequestHeader {
    RequestHeader {
        idempotency_key: crate::unique_id(),
        ..Default::default()
    }
}

impl Client {
    /// Hands the group's leadership to replica `to` (given the addresses of the group's nodes,
    /// not a router's). Answers once `to` leads. Repeating it is harmless, so it is retried like
    /// a read.
    pub async fn transfer_leader(
        &self,
        to: u64,
    ) -> Result<crate::v1::TransferLeaderResponse, Status> {
        let req = crate::v1::TransferLeaderRequest { to };
        self.core
            .call(req, Effect::IdempotentWrite, |ch, r| async move {
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
            .call(req, read_effect(stale), |ch, r| async move {
                kv(ch).get(r).await
            })
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
            header: Some(keyed()),
            shard_key: shard_key.into(),
            key: key.into(),
            value: value.into(),
            if_version,
        };
        self.core
            .call(req, Effect::IdempotentWrite, |ch, r| async move {
                kv(ch).put(r).await
            })
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
            header: Some(keyed()),
            shard_key: shard_key.into(),
            key: key.into(),
            if_version,
        };
        self.core
            .call(req, Effect::IdempotentWrite, |ch, r| async move {
                kv(ch).delete(r).await
            })
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
            .call(req, read_effect(stale), |ch, r| async move {
                kv(ch).scan(r).await
            })
            .await
    }

    /// Opens a change feed watch (`Feed.Watch`, served by routers): opening is retried like a
    /// read, at the next address; the stream is then the caller's for as long as it reads it
    /// (the deadline bounds the open only). A stream that fails is resumed with a new watch from
    /// the last response's cursor; `OUT_OF_RANGE` (`CursorExpired`) is never worth retrying.
    pub async fn watch(
        &self,
        req: WatchRequest,
    ) -> Result<tonic::Streaming<WatchResponse>, Status> {
        self.core
            .call(
                req,
                Effect::Read,
                |ch, r| async move { feed(ch).watch(r).await },
            )
            .await
    }

    /// Runs a transaction: checks `compares`, then runs the success or the failure ops atomically.
    /// See the type's documentation about the outcome of a write that returned an error.
    /// A request without an idempotency key gets one (a read-only Txn ignores it), and like a
    /// `put` or `delete` it is sent again with it after an unknown outcome: a writing Txn is
    /// applied at most once per key, in one group or across several (whose two-phase commit
    /// records the key with its decision).
    pub async fn txn(&self, mut req: TxnRequest) -> Result<TxnResponse, Status> {
        let header = req.header.get_or_insert_default();
        if header.idempotency_key.is_empty() {
            header.idempotency_key = crate::unique_id();
        }
        self.core
            .call(req, Effect::IdempotentWrite, |ch, r| async move {
                kv(ch).txn(r).await
            })
            .await
    }
}

impl ClusterClient {
    /// The shard map. Without `linearizable`, any config replica (or a router's cache) answers
    /// with the version it has, which may lag; with it, the config leader answers with its latest.
    pub async fn get_shard_map(&self, linearizable: bool) -> Result<ShardMap, Status> {
        let req = GetShardMapRequest { linearizable };
        self.core
            .call(req, read_effect(!linearizable), |ch, r| async move {
                cluster(ch).get_shard_map(r).await
            })
            .await
    }

    /// Creates the cluster: spreads `slot_count` slots evenly over the groups. All or nothing;
    /// refused on an initialized cluster. See the type's documentation about write outcomes.
    pub async fn init_cluster(&self, req: InitClusterRequest) -> Result<ShardMap, Status> {
        self.core
            .call(req, Effect::IdempotentWrite, |ch, r| async move {
                cluster(ch).init_cluster(r).await
            })
            .await
    }

    /// Registers a running group; it owns no slots until slots are moved to it.
    pub async fn add_group(&self, req: AddGroupRequest) -> Result<ShardMap, Status> {
        self.core
            .call(req, Effect::IdempotentWrite, |ch, r| async move {
                cluster(ch).add_group(r).await
            })
            .await
    }

    /// Unregisters group `id`, which must own no slots.
    pub async fn remove_group(&self, id: u64) -> Result<ShardMap, Status> {
        let req = RemoveGroupRequest { id };
        self.core
            .call(req, Effect::IdempotentWrite, |ch, r| async move {
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
            .call(req, Effect::IdempotentWrite, |ch, r| async move {
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
            .call(req, Effect::IdempotentWrite, |ch, r| async move {
                cluster(ch).change_group_replicas(r).await
            })
            .await
    }

    /// Moves `req.slots` to `req.to_group` with their data (online resharding), with the
    /// request's copy bandwidth bound; answers once every migration committed and cleaned up.
    pub async fn move_slots_with(&self, req: MoveSlotsRequest) -> Result<ShardMap, Status> {
        self.core
            .call(req, Effect::IdempotentWrite, |ch, r| async move {
                cluster(ch).move_slots(r).await
            })
            .await
    }

    /// Migrations in flight and recently finished, with progress and measured pauses.
    pub async fn list_migrations(&self) -> Result<crate::v1::MigrationList, Status> {
        let req = crate::v1::ListMigrationsRequest {};
        self.core
            .call(req, Effect::Read, |ch, r| async move {
                cluster(ch).list_migrations(r).await
            })
            .await
    }

    /// Aborts migration `id` before its commit point.
    pub async fn abort_migration(&self, id: u64) -> Result<crate::v1::Migration, Status> {
        let req = crate::v1::AbortMigrationRequest { id };
        self.core
            .call(req, Effect::IdempotentWrite, |ch, r| async move {
                cluster(ch).abort_migration(r).await
            })
            .await
    }

    /// Records an admin task (a move, a rebalance or drain, a membership change) and answers at
    /// once with its record; the config leader runs it whatever happens to this client. Follow
    /// it with [`ClusterClient::list_migrations`]. Retried only where it was certainly not
    /// recorded, so one call starts at most one task.
    pub async fn start_task(
        &self,
        task: crate::v1::start_task_request::Task,
    ) -> Result<crate::v1::Task, Status> {
        let req = crate::v1::StartTaskRequest { task: Some(task) };
        self.core
            .call(req, Effect::Write, |ch, r| async move {
                cluster(ch).start_task(r).await
            })
            .await
    }

    /// Stops move or rebalance task `id`: no further move starts, its migration in flight aborts
    /// if before its cut-over.
    pub async fn abort_task(&self, id: u64) -> Result<crate::v1::Task, Status> {
        let req = crate::v1::AbortTaskRequest { id };
        self.core
            .call(req, Effect::IdempotentWrite, |ch, r| async move {
                cluster(ch).abort_task(r).await
            })
            .await
    }

    /// Plans an even spread (or drains `req.drain_group`) and, unless a dry run, runs the moves.
    pub async fn rebalance(
        &self,
        req: crate::v1::RebalanceRequest,
    ) -> Result<crate::v1::RebalanceResponse, Status> {
        self.core
            .call(req, Effect::IdempotentWrite, |ch, r| async move {
                cluster(ch).rebalance(r).await
            })
            .await
    }

    /// The map plus each replica's live state (groups and config replicas).
    pub async fn cluster_status(&self) -> Result<ClusterStatus, Status> {
        self.core
            .call(
                GetClusterStatusRequest {},
                Effect::Read,
                |ch, r| async move { cluster(ch).get_cluster_status(r).await },
            )
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
                self.core.reroute(&addr, classify(&status, Effect::Read));
                Err(status)
            }
            Err(_elapsed) => {
                self.core.reroute(&addr, Action::Rotate);
                Err(deadline_exceeded(self.core.timeout, 1))
            }
        }
    }
}
