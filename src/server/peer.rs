//! `ordo.v1.Peer` on a node: raft traffic and snapshots (decoded and checked by the transport's
//! receiving half), status, slot ownership, leader transfer, membership and migration steps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ordo_proto::v1::peer_server::Peer;
use ordo_proto::v1::*;
use tonic::{Request, Response, Status, Streaming};

use crate::limits::{MIGRATION_LOG_BYTES_MAX, MIGRATION_PAGE_BYTES_MAX};
use crate::replica::inbox::Msg;
use crate::replica::transport::recv;
use crate::replica::ReplicaHandle;
use crate::state::{Command, Outcome};

/// Clears `receiving_snapshot` however the transfer ends, its handler dropped mid-stream included.
struct Receiving<'a>(&'a AtomicBool);

impl Drop for Receiving<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[derive(Clone)]
pub struct PeerService(pub Arc<ReplicaHandle>);

#[tonic::async_trait]
impl Peer for PeerService {
    type ReadChangesStream = crate::server::feed::ChangeStream;
    type ConsumeStream = crate::server::groups::ConsumeStream;

    async fn group_admin(
        &self,
        req: Request<ordo_proto::v1::GroupAdminRequest>,
    ) -> Result<Response<ordo_proto::v1::GroupAdminResponse>, Status> {
        crate::server::groups::group_admin(&self.0, req.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn consume(
        &self,
        req: Request<Streaming<ordo_proto::v1::PeerConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        crate::server::groups::consume(self.0.clone(), req.into_inner())
            .await
            .map(Response::new)
    }

    async fn read_changes(
        &self,
        req: Request<ReadChangesRequest>,
    ) -> Result<Response<Self::ReadChangesStream>, Status> {
        crate::server::feed::read_changes(&self.0, req.into_inner()).map(Response::new)
    }

    async fn raft(&self, req: Request<Streaming<RaftBatch>>) -> Result<Response<RaftDone>, Status> {
        let mut stream = req.into_inner();
        let mut stop = self.0.stop.clone();
        loop {
            let batch = tokio::select! {
                b = stream.message() => b?,
                _ = stop.changed() => None,
            };
            let Some(batch) = batch else { break };
            let msgs = recv::decode_batch(&self.0, &batch)?;
            // Never waits: a full raft queue drops, as a lost packet would (raft retransmits).
            let mut dropped = 0;
            for (m, bytes) in msgs.into_iter().zip(&batch.messages) {
                dropped += usize::from(!self.0.raft.offer(m, bytes.len()));
            }
            if dropped > 0 {
                tracing::debug!(
                    from = batch.from,
                    dropped,
                    "raft queue full: messages dropped"
                );
            }
        }
        Ok(Response::new(RaftDone {}))
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<SnapshotDone>, Status> {
        if self.0.receiving_snapshot.swap(true, Ordering::AcqRel) {
            return Err(Status::unavailable(
                "a snapshot transfer is already in progress on this replica; the sender retries",
            ));
        }
        // Cleared on drop, not after the await: hyper drops this future when the stream is reset
        // or its deadline passes, and a flag left set would refuse every later snapshot.
        let _receiving = Receiving(&self.0.receiving_snapshot);
        recv::receive_snapshot(&self.0, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let mut s = self.0.status(req.into_inner().with_data_digest).await?;
        let o = self.0.sm.ownership();
        s.map_version = o.map_version;
        s.owned_slots = o.count(self.0.sm.slot_count());
        s.locks = self.0.sm.locks_held().max(0) as u64;
        s.peers = self.0.peers.read().unwrap().clone().into_iter().collect();
        Ok(Response::new(s))
    }

    async fn set_ownership(
        &self,
        req: Request<SetOwnershipRequest>,
    ) -> Result<Response<SetOwnershipResponse>, Status> {
        let r = req.into_inner();
        if r.group_id != self.0.group_id {
            return Err(Status::invalid_argument(format!(
                "ownership for group {} sent to a replica of group {}",
                r.group_id, self.0.group_id
            )));
        }
        if r.slots.len() > r.slot_count as usize {
            return Err(Status::invalid_argument(
                "more slots listed than the map has",
            ));
        }
        match self.0.propose(Command::SetOwnership(r)).await? {
            Outcome::Ownership(o) => Ok(Response::new(o)),
            other => unreachable!("an ownership change produced {other:?}"),
        }
    }

    async fn transfer_leader(
        &self,
        req: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let to = req.into_inner().to;
        let r = self
            .0
            .ask(|resp| Msg::TransferLeader { to, resp }, "leader transfer")
            .await?;
        Ok(Response::new(r))
    }

    async fn change_replicas(
        &self,
        req: Request<ChangeReplicasRequest>,
    ) -> Result<Response<ChangeReplicasResponse>, Status> {
        Ok(Response::new(
            self.0.change_replicas(req.into_inner()).await?,
        ))
    }

    async fn migrate_out(
        &self,
        req: Request<MigrateOutRequest>,
    ) -> Result<Response<MigrateOutResponse>, Status> {
        let r = req.into_inner();
        self.check_group(r.group_id)?;
        if r.slots.len() > self.0.sm.slot_count() as usize {
            return Err(Status::invalid_argument(
                "more slots listed than the map has",
            ));
        }
        if r.step == MigrateStep::Fence as i32 {
            // Locked items or kept parts would stay behind on this side of the move; decisions
            // need no wait, they move with their slot.
            if let Some(why) = self.0.sm.fence_blocker(r.migration_id) {
                return Err(Status::failed_precondition(why));
            }
        }
        if r.log_bytes_max > MIGRATION_LOG_BYTES_MAX {
            return Err(crate::state::migrate::log_cap_refusal(r.log_bytes_max).into());
        }
        let (index, deleted, done) = self.propose_migration(Command::MigrateOut(r)).await?;
        Ok(Response::new(MigrateOutResponse {
            index,
            deleted,
            done,
        }))
    }

    async fn migrate_pull(
        &self,
        req: Request<MigratePullRequest>,
    ) -> Result<Response<MigratePullResponse>, Status> {
        let r = req.into_inner();
        self.check_group(r.group_id)?;
        // On the leader after a barrier: the page reflects every entry committed before it,
        // the fence included.
        self.0.read_barrier().await?;
        let bytes_max = (r.bytes_max as usize).clamp(1, MIGRATION_PAGE_BYTES_MAX);
        Ok(Response::new(self.0.sm.migration_pull(
            r.migration_id,
            r.log,
            &r.after,
            bytes_max,
        )?))
    }

    async fn migrate_ingest(
        &self,
        req: Request<MigrateIngestRequest>,
    ) -> Result<Response<MigrateIngestResponse>, Status> {
        let r = req.into_inner();
        self.check_group(r.group_id)?;
        // A bad record is refused here, before anything reaches the log.
        let bytes: usize = r.records.iter().map(|x| x.key.len() + x.value.len()).sum();
        if bytes > MIGRATION_PAGE_BYTES_MAX + crate::limits::VALUE_BYTES_MAX + 64 * 1024 {
            return Err(Status::invalid_argument(format!(
                "an ingest of {bytes} bytes is over the page bound"
            )));
        }
        for rec in &r.records {
            crate::state::migrate::check_record(rec, self.0.sm.slot_count())?;
        }
        let (index, _, _) = self.propose_migration(Command::MigrateIngest(r)).await?;
        Ok(Response::new(MigrateIngestResponse { index }))
    }

    async fn migrate_clear(
        &self,
        req: Request<MigrateClearRequest>,
    ) -> Result<Response<MigrateClearResponse>, Status> {
        let r = req.into_inner();
        self.check_group(r.group_id)?;
        if r.slots.len() > self.0.sm.slot_count() as usize {
            return Err(Status::invalid_argument(
                "more slots listed than the map has",
            ));
        }
        let (_, deleted, done) = self.propose_migration(Command::MigrateClear(r)).await?;
        Ok(Response::new(MigrateClearResponse { deleted, done }))
    }
}

impl PeerService {
    fn check_group(&self, group_id: u64) -> Result<(), Status> {
        if group_id != self.0.group_id {
            return Err(Status::invalid_argument(format!(
                "migration request for group {group_id} sent to a replica of group {}",
                self.0.group_id
            )));
        }
        Ok(())
    }

    async fn propose_migration(&self, cmd: Command) -> Result<(u64, u64, bool), Status> {
        match self.0.propose(cmd).await? {
            Outcome::Migration {
                index,
                deleted,
                done,
            } => Ok((index, deleted, done)),
            other => unreachable!("a migration command produced {other:?}"),
        }
    }
}
