//! The gRPC services of a node: `ordo.v1.Kv` for clients and `ordo.v1.Peer` for replicas. Thin:
//! validation is `validate.rs`, decisions are the driver's and the state machine's.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ordo_proto::v1::kv_server::Kv;
use ordo_proto::v1::participant_server::Participant;
use ordo_proto::v1::peer_server::Peer;
use ordo_proto::v1::*;
use protobuf::Message as _;
use raft::prelude::{Message as RaftMessage, MessageType};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::driver::{Msg, Shared};
use crate::error::{Error, Result};
use crate::sm::{Command, Outcome, StateMachine};
use crate::{snapshot, validate};

/// How long a request waits for its write to commit or its read index before giving up.
const REQUEST_WAIT_MAX: Duration = Duration::from_secs(10);

/// One replica as the services see it: a mailbox to its driver and read access to its state.
pub struct Replica {
    pub node_id: u64,
    pub group_id: u64,
    pub driver: mpsc::Sender<Msg>,
    pub sm: Arc<StateMachine>,
    pub shared: Arc<Shared>,
    pub peers: crate::transport::PeerAddrs,
    pub snap_dir: PathBuf,
    pub receiving_snapshot: AtomicBool,
    /// Held while this leader runs a `ChangeReplicas` (one at a time).
    pub membership: tokio::sync::Mutex<()>,
    pub stop: watch::Receiver<bool>,
}

impl Replica {
    pub fn addr_of(&self, id: u64) -> Option<String> {
        self.peers.read().unwrap().get(&id).cloned()
    }

    fn not_leader(&self) -> Error {
        let leader_id = self.shared.leader_id.load(Ordering::Relaxed);
        Error::NotLeader {
            group: self.group_id,
            leader_id,
            leader_addr: self.addr_of(leader_id).unwrap_or_default(),
        }
    }

    pub(crate) async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T>>) -> Msg,
        what: &str,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.driver.try_send(make(tx)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                Error::NotApplied(format!("node overloaded: the raft inbox is full; {what} was not started, retry with backoff"))
            }
            mpsc::error::TrySendError::Closed(_) => Error::NotApplied(format!(
                "node is shutting down; {what} was not started"
            )),
        })?;
        match tokio::time::timeout(REQUEST_WAIT_MAX, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Unavailable(format!(
                "the replica stopped during the {what}; its outcome is unknown"
            ))),
            Err(_) => Err(Error::Unavailable(format!(
                "{what} did not complete within {}s (no quorum?); its outcome is unknown",
                REQUEST_WAIT_MAX.as_secs()
            ))),
        }
    }

    pub async fn propose(&self, cmd: Command) -> Result<Outcome> {
        if self.shared.is_leader.load(Ordering::Relaxed) == 0 {
            return Err(self.not_leader());
        }
        self.ask(|resp| Msg::Propose { cmd, resp }, "write").await
    }

    /// Proposes a checked transaction. Slots this group does not own are refused here already
    /// (cheap), and again when the entry is applied (authoritative: ownership may change between).
    pub async fn propose_txn(&self, txn: TxnRequest) -> Result<TxnResponse> {
        for sk in crate::sm::shard_keys(&txn) {
            self.sm.check_owned(sk)?;
        }
        self.sm.check_unlocked(&txn, None)?;
        match self.propose(Command::Txn(txn)).await? {
            Outcome::Txn(r) => Ok(r),
            other => unreachable!("a txn produced {other:?}"),
        }
    }

    /// Waits until a read started now would see every write acknowledged before it.
    pub async fn read_barrier(&self) -> Result<()> {
        if self.shared.is_leader.load(Ordering::Relaxed) == 0 {
            return Err(self.not_leader());
        }
        self.ask(|resp| Msg::Read { resp }, "linearizable read")
            .await
    }

    pub async fn status(&self, with_digest: bool) -> Result<StatusResponse> {
        self.ask(|resp| Msg::Status { with_digest, resp }, "status")
            .await
    }
}

#[derive(Clone)]
pub struct KvService(pub Arc<Replica>);

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let r = req.into_inner();
        let stale = validate::check_get(&r)?;
        if !stale {
            self.0.read_barrier().await?;
        }
        self.0.sm.check_owned(&r.shard_key)?;
        Ok(Response::new(
            match self.0.sm.get(&r.shard_key, &r.key)? {
                Some((version, value)) => GetResponse {
                    found: true,
                    value,
                    version,
                },
                None => GetResponse::default(),
            },
        ))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let txn = validate::put_as_txn(req.into_inner())?;
        let resp = self.0.propose_txn(txn).await?;
        Ok(Response::new(validate::put_response(resp)))
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let txn = validate::delete_as_txn(req.into_inner())?;
        let resp = self.0.propose_txn(txn).await?;
        Ok(Response::new(validate::delete_response(resp)))
    }

    async fn scan(&self, req: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let r = req.into_inner();
        let (stale, limit) = validate::check_scan(&r)?;
        if !stale {
            self.0.read_barrier().await?;
        }
        self.0.sm.check_owned(&r.shard_key)?;
        let (items, next_key) = self
            .0
            .sm
            .scan(&r.shard_key, &r.start_key, &r.end_key, limit)?;
        Ok(Response::new(ScanResponse { items, next_key }))
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let txn = req.into_inner();
        validate::check_txn(&txn)?;
        Ok(Response::new(self.0.propose_txn(txn).await?))
    }
}

/// `ordo.v1.Participant`: a shard group's side of cross-group transactions (see `twopc.rs`).
/// Every request is checked here, then applied as one raft command.
#[derive(Clone)]
pub struct ParticipantService(pub Arc<Replica>);

fn check_txn_id(id: &[u8]) -> Result<()> {
    if id.len() != crate::twopc::TXN_ID_BYTES {
        return Err(Error::InvalidArgument(format!(
            "txn_id has {} bytes; it must have {}",
            id.len(),
            crate::twopc::TXN_ID_BYTES
        )));
    }
    Ok(())
}

/// A part split for another group (the shard map changed since the coordinator split the Txn).
fn check_part_group(meant: u64, here: u64) -> Result<()> {
    if meant != 0 && meant != here {
        return Err(Error::FailedPrecondition(format!(
            "this transaction part was split for group {meant} but reached group {here} (the \
             shard map changed); split it again"
        )));
    }
    Ok(())
}

/// The decisions a coordinator may record and a part may be finished with.
const FINAL_DECISIONS: [Decision; 3] = [
    Decision::CommitSuccess,
    Decision::CommitFailure,
    Decision::Abort,
];

fn check_decision(d: i32, allowed: &[Decision]) -> Result<()> {
    match Decision::try_from(d) {
        Ok(x) if allowed.contains(&x) => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "decision {d} is not one of {allowed:?}"
        ))),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[tonic::async_trait]
impl Participant for ParticipantService {
    async fn prepare(
        &self,
        req: Request<PrepareRequest>,
    ) -> Result<Response<PrepareResponse>, Status> {
        let r = req.into_inner();
        check_txn_id(&r.txn_id)?;
        check_part_group(r.group_id, self.0.group_id)?;
        validate::check_shard_key(&r.primary_shard_key)?;
        let part = r
            .part
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("prepare without a part".into()))?;
        validate::check_txn(part)?;
        if crate::twopc::items(part).is_empty() {
            return Err(Error::InvalidArgument("the part names no item".into()).into());
        }
        for sk in crate::sm::shard_keys(part) {
            validate::check_shard_key(sk)?;
            self.0.sm.check_owned(sk)?;
        }
        if !r.accumulate {
            self.0.sm.check_unlocked(part, Some(&r.txn_id))?;
        }
        match self.0.propose(Command::Prepare(r)).await? {
            Outcome::Prepared(p) => Ok(Response::new(p)),
            other => unreachable!("a prepare produced {other:?}"),
        }
    }

    async fn decide(
        &self,
        req: Request<DecideRequest>,
    ) -> Result<Response<DecideResponse>, Status> {
        let r = req.into_inner();
        check_txn_id(&r.txn_id)?;
        validate::check_shard_key(&r.primary_shard_key)?;
        if !r.resolve {
            check_decision(r.decision, &FINAL_DECISIONS)?;
        }
        self.0.sm.check_owned(&r.primary_shard_key)?;
        match self
            .0
            .propose(Command::Decide {
                req: r,
                now_ms: now_ms(),
            })
            .await?
        {
            Outcome::Decided(d) => Ok(Response::new(d)),
            other => unreachable!("a decision produced {other:?}"),
        }
    }

    async fn finish(
        &self,
        req: Request<FinishRequest>,
    ) -> Result<Response<FinishResponse>, Status> {
        let r = req.into_inner();
        check_txn_id(&r.txn_id)?;
        check_part_group(r.group_id, self.0.group_id)?;
        check_decision(r.decision, &FINAL_DECISIONS)?;
        validate::check_shard_key(&r.shard_key)?;
        self.0.sm.check_owned(&r.shard_key)?;
        match self.0.propose(Command::Finish(r)).await? {
            Outcome::Finished(f) => Ok(Response::new(f)),
            other => unreachable!("a finish produced {other:?}"),
        }
    }

    async fn forget(
        &self,
        req: Request<ForgetRequest>,
    ) -> Result<Response<ForgetResponse>, Status> {
        let r = req.into_inner();
        check_txn_id(&r.txn_id)?;
        validate::check_shard_key(&r.primary_shard_key)?;
        self.0.sm.check_owned(&r.primary_shard_key)?;
        self.0.propose(Command::Forget(r)).await?;
        Ok(Response::new(ForgetResponse {}))
    }
}

#[derive(Clone)]
pub struct PeerService(pub Arc<Replica>);

fn refuse(msg: String) -> Status {
    tracing::warn!("refused peer message: {msg}");
    Status::invalid_argument(msg)
}

impl PeerService {
    fn check_addressing(&self, group_id: u64, to: u64) -> Result<(), Status> {
        if group_id != self.0.group_id || to != self.0.node_id {
            return Err(refuse(format!(
                "message for group {group_id} node {to} reached group {} node {}",
                self.0.group_id, self.0.node_id
            )));
        }
        Ok(())
    }

    /// Checks and decodes a whole frame before any of it is delivered: a bad frame changes nothing.
    fn decode_batch(&self, b: &RaftBatch) -> Result<Vec<RaftMessage>, Status> {
        self.check_addressing(b.group_id, b.to)?;
        let mut h = crc32fast::Hasher::new();
        for m in &b.messages {
            h.update(m);
        }
        if h.finalize() != b.crc32 {
            return Err(refuse(format!(
                "raft batch from node {}: crc32 mismatch",
                b.from
            )));
        }
        b.messages
            .iter()
            .map(|bytes| {
                let mut m = RaftMessage::default();
                m.merge_from_bytes(bytes).map_err(|e| {
                    refuse(format!(
                        "raft message from node {} does not decode: {e}",
                        b.from
                    ))
                })?;
                if m.to != self.0.node_id || m.from != b.from {
                    return Err(refuse(format!(
                        "raft message from {} to {} inside a frame from {} to {}",
                        m.from, m.to, b.from, b.to
                    )));
                }
                Ok(m)
            })
            .collect()
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn raft(&self, req: Request<Streaming<RaftBatch>>) -> Result<Response<RaftDone>, Status> {
        let mut stream = req.into_inner();
        let mut stop = self.0.stop.clone();
        loop {
            let batch = tokio::select! {
                b = stream.message() => b?,
                _ = stop.changed() => None,
            };
            let Some(batch) = batch else { break };
            for m in self.decode_batch(&batch)? {
                if self.0.driver.send(Msg::Raft(Box::new(m))).await.is_err() {
                    return Err(Status::unavailable("replica is shutting down"));
                }
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
                "a snapshot transfer is already in progress on this replica",
            ));
        }
        let result = self.receive_snapshot(req.into_inner()).await;
        self.0.receiving_snapshot.store(false, Ordering::Release);
        result.map(Response::new)
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
            // A decision younger than this may belong to a transaction whose coordinator is
            // still finishing its other parts (their resolvers would ask for it); an older one
            // is a leftover, or a coordinator that died mid-finish and was not resolved since
            // (see ARCHITECTURE.md, *Deviations*). No decision is taken in a moving slot.
            let keep_ms = 2 * crate::limits::TXN_LOCK_TIMEOUT_MS;
            if let Some(why) = self.0.sm.fence_blocker(r.migration_id, now_ms(), keep_ms)? {
                return Err(Status::failed_precondition(why));
            }
        }
        let (index, _, _) = self.propose_migration(Command::MigrateOut(r)).await?;
        Ok(Response::new(MigrateOutResponse { index }))
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
            crate::sm::migrate::check_record(rec, self.0.sm.slot_count())?;
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

/// Most bytes of records one migration page carries (a pull answer, an ingest entry): one raft
/// entry stays well under the raft message bound.
pub const MIGRATION_PAGE_BYTES_MAX: usize = 256 * 1024;
const _: () = assert!(
    (MIGRATION_PAGE_BYTES_MAX + crate::limits::VALUE_BYTES_MAX) * 2
        < crate::limits::RAFT_MSG_BYTES_MAX as usize * 4
);

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

    async fn receive_snapshot(
        &self,
        mut stream: Streaming<SnapshotChunk>,
    ) -> Result<SnapshotDone, Status> {
        let io = |e: std::io::Error| Status::internal(format!("writing received snapshot: {e}"));
        tokio::fs::create_dir_all(&self.0.snap_dir)
            .await
            .map_err(io)?;
        let tmp = self.0.snap_dir.join("incoming.snap.tmp");
        let mut file = tokio::fs::File::create(&tmp).await.map_err(io)?;
        let mut msg: Option<RaftMessage> = None;
        let mut expect_seq = 0u64;
        loop {
            let Some(chunk) = stream.message().await? else {
                return Err(refuse("snapshot stream ended before its last chunk".into()));
            };
            self.check_addressing(chunk.group_id, chunk.to)?;
            if chunk.seq != expect_seq {
                return Err(refuse(format!(
                    "snapshot chunk {} arrived where {expect_seq} was expected",
                    chunk.seq
                )));
            }
            snapshot::verify_chunk(chunk.seq, &chunk.message, &chunk.data, chunk.crc32)
                .map_err(|e| refuse(e.to_string()))?;
            if chunk.seq == 0 {
                let mut m = RaftMessage::default();
                m.merge_from_bytes(&chunk.message)
                    .map_err(|e| refuse(format!("snapshot message does not decode: {e}")))?;
                if m.get_msg_type() != MessageType::MsgSnapshot || m.to != self.0.node_id {
                    return Err(refuse(format!(
                        "first snapshot chunk carries {:?} to {}",
                        m.get_msg_type(),
                        m.to
                    )));
                }
                msg = Some(m);
            }
            file.write_all(&chunk.data).await.map_err(io)?;
            expect_seq += 1;
            if chunk.last {
                break;
            }
        }
        file.sync_all().await.map_err(io)?;
        drop(file);
        let msg = msg.expect("chunk 0 was checked");
        let meta = msg.get_snapshot().get_metadata();
        let (index, term) = snapshot::verify_file(&tmp).map_err(|e| refuse(e.to_string()))?;
        if (index, term) != (meta.index, meta.term) {
            return Err(refuse(format!(
                "snapshot file holds {index}/{term} but its message says {}/{}",
                meta.index, meta.term
            )));
        }
        let path = self
            .0
            .snap_dir
            .join(format!("in-{index:020}-{term:020}.snap"));
        tokio::fs::rename(&tmp, &path).await.map_err(io)?;
        tracing::info!(
            node = self.0.node_id,
            from = msg.from,
            index,
            term,
            "received snapshot"
        );
        self.0
            .driver
            .send(Msg::SnapshotReceived {
                msg: Box::new(msg),
                path,
            })
            .await
            .map_err(|_| Status::unavailable("replica is shutting down"))?;
        Ok(SnapshotDone {})
    }
}
