//! `ordo.v1.Participant` on a node: the participant side of two-phase commit. Checks each
//! request, then proposes `Prepare`/`Decide`/`Finish`/`Forget`; `state/participant.rs` applies them.

use std::sync::Arc;

use ordo_proto::v1::participant_server::Participant;
use ordo_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::error::{Error, Result};
use crate::replica::ReplicaHandle;
use crate::server::validate;
use crate::state::{Command, Outcome};

/// `ordo.v1.Participant`: a shard group's side of cross-group transactions (see `state/participant.rs`).
/// Every request is checked here, then applied as one raft command.
#[derive(Clone)]
pub struct ParticipantService(pub Arc<ReplicaHandle>);

fn check_txn_id(id: &[u8]) -> Result<()> {
    if id.len() != crate::state::participant::TXN_ID_BYTES {
        return Err(Error::InvalidArgument(format!(
            "txn_id has {} bytes; it must have {}",
            id.len(),
            crate::state::participant::TXN_ID_BYTES
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
const FINAL_DECISIONS: [Decision; 3] =
    [Decision::RunSuccess, Decision::RunFailure, Decision::Abort];

fn check_decision(d: i32, allowed: &[Decision]) -> Result<()> {
    match Decision::try_from(d) {
        Ok(x) if allowed.contains(&x) => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "decision {d} is not one of {allowed:?}"
        ))),
    }
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
        validate::check_part(part)?;
        if crate::state::participant::lock_data_keys(part, self.0.sm.slot_count()).is_empty() {
            return Err(Error::InvalidArgument("the part names no item".into()).into());
        }
        for sk in crate::state::shard_keys(part) {
            validate::check_shard_key(sk)?;
            self.0.sm.check_owned(sk)?;
        }
        if !r.read_only {
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
        validate::check_decide(&r)?;
        if !r.resolve {
            check_decision(r.decision, &FINAL_DECISIONS)?;
        }
        self.0.sm.check_owned(&r.primary_shard_key)?;
        if r.resolve && !r.wound && self.0.sm.holds_young_locks(&r.txn_id) {
            // This group applied locks of it less than the lock timeout ago (by its own clock):
            // its coordinator may well be alive.
            return Ok(Response::new(DecideResponse {
                decision: Decision::Pending as i32,
                ..Default::default()
            }));
        }
        match self.0.propose(Command::Decide(r)).await? {
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
