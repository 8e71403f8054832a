//! Two-phase commit of a `Txn` whose shard keys live in several groups; the router is the
//! coordinator, each group a participant (`ordo.v1.Participant`, applied by the node's state
//! machine).
//!
//! 1. **Prepare** every group's part at once: it locks every item the part reads or writes and
//!    evaluates its compares. A Txn that writes takes write locks, all of a part or none; a
//!    read-only Txn takes read locks, shared with other readers, and keeps what it got while it
//!    waits for the rest (`read_only`). Conflicts are settled by age, the clock of the
//!    transaction's first attempt (kept across attempts): meeting a younger transaction's lock
//!    aborts that transaction (through its record). Beyond that, a writer never waits: it
//!    gives this attempt up and retries after a random backoff; a reader waits for the older
//!    writer (within the deadline). Only readers wait, and only for writers, so there is no
//!    deadlock, and a transaction that keeps losing ends up the oldest. A lock older than the
//!    lock timeout is resolved by whoever meets it: its coordinator is gone.
//! 2. **Decide**: every compare held → the success branch, else the failure branch. The decision
//!    is recorded in the group of the primary shard key (the Txn's first). The first decision
//!    recorded wins: if a resolver aborted the transaction meanwhile, this attempt is aborted.
//!    A read-only Txn records nothing (committing or aborting it changes nothing).
//! 3. **Finish** every part with the decision: it runs the branch's ops and releases the locks.
//!    Then the record is forgotten (in the background).
//!
//! Decide and Finish are idempotent, so they are retried until the deadline like reads. A
//! request that meets a lock waits, and past the timeout resolves it (`locks.rs`): Decide with
//! `resolve` at the primary (aborts it unless decided), then Finish at the locked group.
//! Readers never see half of a transaction: every item it touches is locked from its prepare to
//! its finish, and reads of locked items wait.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use ordo_proto::v1::{
    error_detail, DecideRequest, DecideResponse, Decision, FinishRequest, ForgetRequest,
    PrepareRequest, PrepareResponse, TxnOp, TxnOpResult, TxnRequest, TxnResponse,
};
use ordo_proto::{request_digest, DEDUP_OUTCOME_BYTES_MAX, TXN_RESULT_BYTES_MAX};
use prost::Message as _;
use tokio::time::Instant;
use tonic::{Response, Status};

use crate::forward::{forward, participant, FailOnLock, Route};
use crate::locks::{self, OnLock};
use crate::map::group_of;
use crate::retry::Effect;
use crate::Shared;

/// Most attempts (fresh transaction ids) one cross-group Txn makes before answering `ABORTED`;
/// the request's deadline usually ends them first. Enough to outwait a lock whose coordinator
/// died (the lock timeout) at the longest backoff.
const ATTEMPTS_MAX: u32 = 40;
const RETRY_BACKOFF_BASE_MS: u64 = 5;
const RETRY_BACKOFF_MAX_MS: u64 = 200;
/// How long the background Forget of a finished transaction's record may take.
const FORGET_BUDGET: Duration = Duration::from_secs(5);

/// Where a test wants a coordinator to stop, as if its router died there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// Every part is prepared (locked); no decision is recorded.
    AfterPrepare,
    /// The decision is recorded; no participant has finished.
    AfterDecide,
    /// The decision is recorded and the primary's part finished; no other part has.
    AfterPrimaryFinish,
}

fn failpoint(shared: &Shared, fp: Failpoint) -> Result<(), Status> {
    if shared.twopc_failpoint == Some(fp) {
        tracing::warn!(?fp, "failpoint: the coordinator stops here");
        return Err(Status::unavailable(format!(
            "failpoint {fp:?}: the coordinator stopped; the transaction's outcome is up to the \
             lock resolvers"
        )));
    }
    Ok(())
}

fn random_below(n: u64) -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(ordo_proto::unix_ms());
    h.finish() % n.max(1)
}

/// Whether `ops` write (see `TxnOp::writes`).
fn writes(ops: &[TxnOp]) -> bool {
    ops.iter().any(TxnOp::writes)
}

/// One group's share of a Txn, and where each of its op results goes in the whole Txn's answer.
struct Part {
    group: u64,
    txn: TxnRequest,
    keys: Vec<Bytes>,
    /// Position in the whole Txn's success (failure) ops of each op of this part's branch.
    success_at: Vec<usize>,
    failure_at: Vec<usize>,
}

fn split(map: &ordo_proto::v1::ShardMap, req: &TxnRequest) -> Vec<Part> {
    let mut parts: BTreeMap<u64, Part> = BTreeMap::new();
    let mut part = |sk: &Bytes| {
        let group = group_of(map, sk);
        let p = parts.entry(group).or_insert_with(|| Part {
            group,
            txn: TxnRequest::default(),
            keys: Vec::new(),
            success_at: Vec::new(),
            failure_at: Vec::new(),
        });
        if !p.keys.contains(sk) {
            p.keys.push(sk.clone());
        }
        group
    };
    let mut placed: Vec<(u64, usize, u8)> = Vec::new();
    let mut compares = Vec::new();
    for c in &req.compares {
        compares.push((part(&c.shard_key), c.clone()));
    }
    for (branch, ops) in [(0u8, &req.success), (1u8, &req.failure)] {
        for (i, op) in ops.iter().enumerate() {
            if let Some(sk) = op.shard_key() {
                placed.push((part(sk), i, branch));
            }
        }
    }
    for (g, c) in compares {
        parts.get_mut(&g).unwrap().txn.compares.push(c);
    }
    for (g, i, branch) in placed {
        let p = parts.get_mut(&g).unwrap();
        if branch == 0 {
            p.txn.success.push(req.success[i].clone());
            p.success_at.push(i);
        } else {
            p.txn.failure.push(req.failure[i].clone());
            p.failure_at.push(i);
        }
    }
    parts.into_values().collect()
}

/// What a decision step leaves to do.
enum Decided {
    /// Finish the parts with this decision (whether the branch writes).
    Run(Decision, bool),
    /// Another coordination of this Txn (the same idempotency key) was applied: its outcome.
    Repeat(TxnResponse),
}

/// Why one attempt did not commit.
enum AttemptFailed {
    /// Worth another attempt with a new id (a lock, a lost race with a resolver).
    Retry(String),
    /// The answer to give the client.
    Fail(Status),
}

/// Runs a cross-group Txn to its end within `budget`.
pub(crate) async fn coordinate(
    shared: &Arc<Shared>,
    req: TxnRequest,
    budget: Duration,
) -> Result<TxnResponse, Status> {
    let started = Instant::now();
    let deadline = started + budget;
    // Kept across attempts: a transaction that keeps losing ends up the oldest, and wins.
    let priority_ms = shared.now_ms();
    let mut last = String::new();
    for attempt in 0..ATTEMPTS_MAX {
        if attempt > 0 {
            let cap = (RETRY_BACKOFF_BASE_MS << attempt.min(6)).min(RETRY_BACKOFF_MAX_MS);
            let pause = Duration::from_millis(cap / 2 + random_below(cap / 2 + 1));
            if Instant::now() + pause >= deadline {
                break;
            }
            tokio::time::sleep(pause).await;
        }
        match Attempt::new(shared, &req, priority_ms, deadline)
            .run()
            .await
        {
            Ok(resp) => return Ok(resp),
            Err(AttemptFailed::Fail(s)) => return Err(s),
            Err(AttemptFailed::Retry(why)) => {
                tracing::debug!(attempt, why, "cross-group transaction retried");
                last = why;
            }
        }
    }
    Err(Status::aborted(format!(
        "cross-group transaction aborted after {:.1?} of attempts ({last}); this coordination \
         applied nothing: retry it with the same idempotency key (if an earlier send of it was \
         applied, the retry answers that outcome)",
        started.elapsed()
    )))
}

/// One attempt of a cross-group Txn, under a fresh transaction id.
struct Attempt<'a> {
    shared: &'a Arc<Shared>,
    req: &'a TxnRequest,
    parts: Vec<Part>,
    txn_id: Bytes,
    /// The Txn's first shard key: its group records the decision.
    primary: Bytes,
    /// The age that settles conflicts (the first attempt's clock).
    priority_ms: u64,
    started_ms: u64,
    deadline: Instant,
    /// Whether either branch writes: a writer takes write locks and never waits for a lock,
    /// and its abort is recorded; a read-only Txn takes shared read locks and records nothing.
    writes: bool,
    /// A writer's idempotency key (the router gives every Txn one): its commit decision keeps
    /// the key's dedup entry, so the Txn is applied once however often it is coordinated.
    keyed: bool,
}

/// Every part's answer to its prepare, in part order.
type Prepared = Vec<Result<PrepareResponse, Status>>;

impl<'a> Attempt<'a> {
    fn new(
        shared: &'a Arc<Shared>,
        req: &'a TxnRequest,
        priority_ms: u64,
        deadline: Instant,
    ) -> Attempt<'a> {
        let map = shared.map.current();
        let primary = req
            .shard_keys()
            .next()
            .cloned()
            .expect("a routed Txn names a key");
        let writes = req.writes();
        let has_key = req.header.as_ref().map(|h| !h.idempotency_key.is_empty());
        Attempt {
            shared,
            req,
            parts: split(&map, req),
            txn_id: ordo_proto::unique_id(),
            primary,
            priority_ms,
            started_ms: shared.now_ms(),
            deadline,
            writes,
            keyed: writes && has_key == Some(true),
        }
    }

    /// Prepare, decide, finish.
    async fn run(self) -> Result<TxnResponse, AttemptFailed> {
        let prepared = self.prepare_all().await;
        let held = match compares_held(&self.parts, &prepared)
            .and_then(|held| results_fit(&prepared, held).map(|()| held))
        {
            Ok(held) => held,
            Err(refusal) => return Err(self.abort_attempt(&prepared, refusal).await),
        };
        if self.writes {
            failpoint(self.shared, Failpoint::AfterPrepare).map_err(AttemptFailed::Fail)?;
        }
        let outcome = self.outcome(&prepared, held);
        match self.decide_branch(held, outcome.clone()).await? {
            Decided::Run(decision, branch_writes) => {
                self.finish_and_merge(decision, branch_writes, outcome)
                    .await
            }
            Decided::Repeat(first) => Ok(first),
        }
    }

    /// The whole Txn's answer under the branch `held` picks, from what the prepares reported
    /// (a keyed writer's): `None` unless every part reported it and it fits a dedup entry.
    fn outcome(&self, prepared: &Prepared, held: bool) -> Option<TxnResponse> {
        let mut results = Vec::with_capacity(prepared.len());
        for r in prepared {
            let r = r.as_ref().ok()?;
            let branch = if held {
                &r.success_results
            } else {
                &r.failure_results
            };
            results.push(branch.as_ref()?.results.clone());
        }
        let decision = if held {
            Decision::RunSuccess
        } else {
            Decision::RunFailure
        };
        let outcome = merge(self.req, &self.parts, decision, results);
        (outcome.encoded_len() <= DEDUP_OUTCOME_BYTES_MAX).then_some(outcome)
    }

    /// Phase 1, prepare: every part at once. A writer never waits: meeting a lock ends this
    /// attempt (after aborting the holder if it is younger, see [`Attempt::abort_attempt`]). A
    /// reader shares read locks with other readers, keeps what it locked, and waits for older
    /// writers (aborting younger ones). Nobody waits for a waiter: no deadlock.
    async fn prepare_all(&self) -> Prepared {
        let on_lock = if self.writes {
            OnLock::Fail
        } else {
            OnLock::WaitAs(self.priority_ms, self.txn_id.clone())
        };
        let prepare = |p: &Part| {
            let r = PrepareRequest {
                header: None,
                txn_id: self.txn_id.clone(),
                primary_shard_key: self.primary.clone(),
                started_ms: self.started_ms,
                part: Some(p.txn.clone()),
                read_only: !self.writes,
                priority_ms: self.priority_ms,
                group_id: p.group,
                report_results: self.keyed,
            };
            forward(
                self.shared,
                "Prepare",
                Effect::Write,
                &on_lock,
                Route::Txn(p.keys.clone()),
                r,
                remaining(self.deadline),
                |ch, r| async move { participant(ch).prepare(r).await },
            )
        };
        join_all(self.parts.iter().map(prepare))
            .await
            .into_iter()
            .map(|r| r.map(Response::into_inner))
            .collect()
    }

    /// Finishes every part with `decision` (the same for all of them).
    async fn finish_parts(&self, decision: Decision) -> Result<Vec<Vec<TxnOpResult>>, Status> {
        finish_all(
            self.shared,
            &self.parts,
            &self.txn_id,
            decision,
            self.deadline,
        )
        .await
    }

    /// Some part is not prepared (or its outcome is unknown): abort, so that a late prepare is
    /// refused and the parts that did lock let go. Then say whether another attempt is worth
    /// it, after resolving the lock that refused this one if this transaction may.
    async fn abort_attempt(&self, prepared: &Prepared, refusal: Status) -> AttemptFailed {
        let recorded = if self.writes {
            self.decide(Decision::Abort, None).await.map(drop)
        } else {
            Ok(())
        };
        let released = self.finish_parts(Decision::Abort).await.is_ok();
        // The abort record fences out a prepare still on its way; when every prepare answered,
        // none is, and the record can go.
        let all_answered = prepared.iter().all(|r| match r {
            Ok(_) => true,
            Err(s) => {
                ordo_proto::certainly_not_applied(s) || s.code() == tonic::Code::FailedPrecondition
            }
        });
        if released && all_answered {
            forget_later(self.shared, &self.txn_id, &self.primary);
        }
        if let Err(e) = recorded {
            // Not even the abort could be recorded (e.g. the primary's slot is moving): the
            // attempt changed nothing it did not undo, but a prepare still on its way could
            // lock again; its locks expire and are resolved like a dead coordinator's.
            return if ordo_proto::certainly_not_applied(&e) {
                AttemptFailed::Retry(format!("the abort was not recorded: {}", e.message()))
            } else {
                AttemptFailed::Fail(e)
            };
        }
        match ordo_proto::error_detail_of(&refusal) {
            Some(error_detail::Kind::Locked(lock)) => {
                // The lock's own group is the one that refused; any key of it routes there.
                let at = self
                    .parts
                    .iter()
                    .zip(prepared)
                    .find(|(_, r)| r.is_err())
                    .map(|(p, _)| p.keys[0].clone())
                    .unwrap_or_else(|| lock.primary_shard_key.clone());
                // An older transaction aborts the younger holder; a younger one only gives up
                // and retries (keeping its priority, so it ages); anyone resolves an expired one.
                let me = Some((self.priority_ms, self.txn_id.clone()));
                if let Err(e) = locks::resolve(self.shared, lock, at, self.deadline, me).await {
                    tracing::debug!(error = %e, "could not resolve a lock");
                }
                AttemptFailed::Retry(format!("an item is locked: {}", refusal.message()))
            }
            // A transactional ack of a delivery that is done or superseded: no attempt can
            // apply it, the consumer must learn so (its writes were for that delivery).
            Some(error_detail::Kind::StaleDelivery(_)) => AttemptFailed::Fail(refusal),
            _ if ordo_proto::certainly_not_applied(&refusal)
                || refusal.code() == tonic::Code::FailedPrecondition =>
            {
                AttemptFailed::Retry(refusal.message().to_string())
            }
            _ => AttemptFailed::Fail(refusal),
        }
    }

    /// Phase 2, decide: every compare held → the success branch, else the failure branch;
    /// recorded at the primary when the branch writes (a branch that writes nothing changes
    /// nothing either way) or the Txn has a key: then with the key and `outcome`, so that a
    /// resend finds them. A key applied before by another coordination of the same Txn aborts
    /// this one, which answers the first outcome (a resent conditional Txn must not report a
    /// failed compare its own first coordination caused).
    async fn decide_branch(
        &self,
        held: bool,
        outcome: Option<TxnResponse>,
    ) -> Result<Decided, AttemptFailed> {
        let (wanted, branch) = if held {
            (Decision::RunSuccess, &self.req.success)
        } else {
            (Decision::RunFailure, &self.req.failure)
        };
        let branch_writes = writes(branch);
        if !branch_writes && !self.keyed {
            return Ok(Decided::Run(wanted, false));
        }
        let resp = self
            .decide(wanted, outcome)
            .await
            .map_err(AttemptFailed::Fail)?;
        failpoint(self.shared, Failpoint::AfterDecide).map_err(AttemptFailed::Fail)?;
        let decision = Decision::try_from(resp.decision).unwrap_or(Decision::Unspecified);
        if decision != Decision::Abort {
            return Ok(Decided::Run(decision, branch_writes));
        }
        if self.finish_parts(Decision::Abort).await.is_ok() {
            forget_later(self.shared, &self.txn_id, &self.primary);
        }
        if let Some(first) = resp.repeat {
            return Ok(Decided::Repeat(first));
        }
        if !resp.refused.is_empty() {
            return Err(AttemptFailed::Fail(Status::failed_precondition(
                resp.refused,
            )));
        }
        Err(AttemptFailed::Retry(
            "an older transaction or a lock resolver aborted this one before its decision was \
             recorded"
                .into(),
        ))
    }

    /// Phase 3, finish: everywhere, then merge the op results in the Txn's order.
    /// A decided writer whose finish a group did not confirm answers `outcome` when the
    /// prepares reported it: the decision is its commit point, and the part's items stay locked
    /// (reads wait) until a finish or a resolver applies it.
    async fn finish_and_merge(
        &self,
        decision: Decision,
        branch_writes: bool,
        outcome: Option<TxnResponse>,
    ) -> Result<TxnResponse, AttemptFailed> {
        if branch_writes && self.shared.twopc_failpoint == Some(Failpoint::AfterPrimaryFinish) {
            let primary = self
                .parts
                .iter()
                .position(|p| p.keys.contains(&self.primary));
            let parts = &self.parts[primary.map_or(0..0, |i| i..i + 1)];
            let _ = finish_all(self.shared, parts, &self.txn_id, decision, self.deadline).await;
            failpoint(self.shared, Failpoint::AfterPrimaryFinish).map_err(AttemptFailed::Fail)?;
        }
        let finished = self.finish_parts(decision).await;
        let results = match finished {
            Ok(r) => r,
            // Nothing was written: reading again is harmless. (An older transaction may have
            // aborted this reader, leaving a record behind.)
            Err(e) if !branch_writes => {
                self.finish_parts(Decision::Abort).await.ok();
                forget_later(self.shared, &self.txn_id, &self.primary);
                return Err(AttemptFailed::Retry(format!(
                    "a read-only part could not answer: {}",
                    e.message()
                )));
            }
            Err(e) if outcome.is_some() => {
                tracing::debug!(error = %e.message(), "a finish was not confirmed: the outcome the prepares reported stands");
                return Ok(outcome.expect("checked"));
            }
            Err(e) => {
                return Err(AttemptFailed::Fail(Status::unavailable(format!(
                    "the transaction is decided ({decision:?}) and will be applied in full, but \
                     a group did not confirm its part ({}): its op results are unknown; read the \
                     items back",
                    e.message()
                ))))
            }
        };
        if branch_writes {
            forget_later(self.shared, &self.txn_id, &self.primary);
        }
        Ok(merge(self.req, &self.parts, decision, results))
    }

    /// Records `wanted` at the primary's group (or learns the decision already recorded); a
    /// keyed commit carries the Txn's key, digest and `outcome`.
    async fn decide(
        &self,
        wanted: Decision,
        outcome: Option<TxnResponse>,
    ) -> Result<DecideResponse, Status> {
        let commit = wanted != Decision::Abort && self.keyed;
        let r = DecideRequest {
            header: self.req.header.clone().filter(|_| commit),
            txn_id: self.txn_id.clone(),
            primary_shard_key: self.primary.clone(),
            decision: wanted as i32,
            resolve: false,
            started_ms: 0,
            wound: false,
            request_digest: if commit {
                Bytes::copy_from_slice(&request_digest(self.req))
            } else {
                Bytes::new()
            },
            outcome: outcome.filter(|_| commit),
        };
        let resp = forward(
            self.shared,
            "Decide",
            Effect::Read, // idempotent: the first decision wins
            &FailOnLock,
            Route::Key(self.primary.clone()),
            r,
            remaining(self.deadline),
            |ch, r| async move { participant(ch).decide(r).await },
        )
        .await?;
        Ok(resp.into_inner())
    }
}

/// Whether every prepared part's compares held, or the first refusal (each one is logged).
fn compares_held(parts: &[Part], prepared: &Prepared) -> Result<bool, Status> {
    let mut held = true;
    let mut refusal: Option<Status> = None;
    for (p, r) in parts.iter().zip(prepared) {
        match r {
            Ok(r) => held &= r.compares_held,
            Err(s) => {
                tracing::debug!(group = p.group, error = %s.message(), "prepare refused");
                if refusal.is_none() {
                    refusal = Some(s.clone());
                }
            }
        }
    }
    match refusal {
        Some(s) => Err(s),
        None => Ok(held),
    }
}

/// Refuses a Txn whose branch (the success branch if `held`) returns more than
/// `TXN_RESULT_BYTES_MAX` across its parts (each part was checked alone by its group): its answer
/// would be over the message bound after it had been applied.
fn results_fit(prepared: &Prepared, held: bool) -> Result<(), Status> {
    let bytes: u64 = prepared
        .iter()
        .flatten()
        .map(|r| {
            if held {
                r.success_result_bytes
            } else {
                r.failure_result_bytes
            }
        })
        .sum();
    if bytes > TXN_RESULT_BYTES_MAX as u64 {
        return Err(Status::resource_exhausted(format!(
            "txn results are over TXN_RESULT_BYTES_MAX ({TXN_RESULT_BYTES_MAX} bytes) for one Txn: \
             its Gets across {} groups would return {bytes} bytes; nothing was applied",
            prepared.len()
        )));
    }
    Ok(())
}

/// The whole Txn's answer from each part's op results (in part order) under `decision`.
fn merge(
    req: &TxnRequest,
    parts: &[Part],
    decision: Decision,
    results: Vec<Vec<TxnOpResult>>,
) -> TxnResponse {
    let succeeded = decision == Decision::RunSuccess;
    let len = if succeeded {
        req.success.len()
    } else {
        req.failure.len()
    };
    let mut merged: Vec<Option<TxnOpResult>> = vec![None; len];
    for (p, rs) in parts.iter().zip(results) {
        let at = if succeeded {
            &p.success_at
        } else {
            &p.failure_at
        };
        for (i, r) in at.iter().zip(rs) {
            merged[*i] = Some(r);
        }
    }
    TxnResponse {
        succeeded,
        results: merged.into_iter().map(Option::unwrap_or_default).collect(),
    }
}

/// Drops the transaction's record at the primary's group, in the background, once every part
/// has finished (or an attempt was given up: the abort that fenced out late prepares is no
/// longer needed once its parts are released). Best effort: a record left behind is only kept
/// space.
fn forget_later(shared: &Arc<Shared>, txn_id: &Bytes, primary: &Bytes) {
    let (shared, txn_id, primary) = (shared.clone(), txn_id.clone(), primary.clone());
    tokio::spawn(async move {
        let r = ForgetRequest {
            header: None,
            txn_id,
            primary_shard_key: primary.clone(),
        };
        let _ = forward(
            &shared,
            "Forget",
            Effect::Read,
            &FailOnLock,
            Route::Key(primary),
            r,
            FORGET_BUDGET,
            |ch, r| async move { participant(ch).forget(r).await },
        )
        .await;
    });
}

/// Finishes every part with `decision`; the op results of each part, in part order.
async fn finish_all(
    shared: &Shared,
    parts: &[Part],
    txn_id: &Bytes,
    decision: Decision,
    deadline: Instant,
) -> Result<Vec<Vec<TxnOpResult>>, Status> {
    let finishes = parts.iter().map(|p| {
        let r = FinishRequest {
            header: None,
            txn_id: txn_id.clone(),
            shard_key: p.keys[0].clone(),
            decision: decision as i32,
            group_id: p.group,
        };
        forward(
            shared,
            "Finish",
            Effect::Read, // idempotent
            &FailOnLock,
            Route::Txn(p.keys.clone()),
            r,
            remaining(deadline),
            |ch, r| async move { participant(ch).finish(r).await },
        )
    });
    join_all(finishes)
        .await
        .into_iter()
        .map(|r| r.map(Response::into_inner))
        .map(|r| match r {
            Ok(f) if f.found => Ok(f.results),
            // Finished before: a retried Finish whose first answer was lost with a leader
            // change, or a resolver that got there first. The effects are in; the op results
            // are not kept.
            Ok(_) => Err(Status::unavailable("its op results were lost")),
            Err(e) => Err(e),
        })
        .collect()
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::tests::put;
    use ordo_proto::v1::{Compare, GetRequest, Group, ShardMap};

    fn get(sk: &str) -> TxnOp {
        TxnOp {
            op: Some(ordo_proto::v1::txn_op::Op::Get(GetRequest {
                shard_key: Bytes::copy_from_slice(sk.as_bytes()),
                ..Default::default()
            })),
        }
    }

    /// A map of 2 slots: group 1 owns slot 0, group 2 slot 1.
    fn two_groups() -> ShardMap {
        ShardMap {
            version: 1,
            slot_count: 2,
            groups: vec![
                Group {
                    id: 1,
                    replicas: vec![],
                },
                Group {
                    id: 2,
                    replicas: vec![],
                },
            ],
            slot_owner: vec![1, 2],
            config_addrs: vec![],
        }
    }

    #[test]
    fn a_txn_splits_into_parts_that_remember_where_results_go() {
        let map = two_groups();
        let (a, b) = {
            // Find one shard key per group.
            let keys: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
            let a = keys
                .iter()
                .find(|k| group_of(&map, k.as_bytes()) == 1)
                .unwrap()
                .clone();
            let b = keys
                .iter()
                .find(|k| group_of(&map, k.as_bytes()) == 2)
                .unwrap()
                .clone();
            (a, b)
        };
        let req = TxnRequest {
            header: None,
            compares: vec![Compare {
                shard_key: Bytes::copy_from_slice(b.as_bytes()),
                ..Default::default()
            }],
            success: vec![put(&a), get(&b), put(&b), get(&a)],
            failure: vec![get(&a)],
        };
        let parts = split(&map, &req);
        assert_eq!(parts.len(), 2);
        let pa = parts.iter().find(|p| p.group == 1).unwrap();
        let pb = parts.iter().find(|p| p.group == 2).unwrap();
        assert_eq!(pa.success_at, vec![0, 3]);
        assert_eq!(pb.success_at, vec![1, 2]);
        assert_eq!(pa.failure_at, vec![0]);
        assert!(pb.failure_at.is_empty());
        assert_eq!(pb.txn.compares.len(), 1);
        assert!(pa.txn.compares.is_empty());
        assert!(writes(&req.success) && !writes(&req.failure));
    }

    #[test]
    fn c2_a_cross_group_txn_whose_parts_return_too_much_together_is_refused() {
        let part = |success, failure| {
            Ok(PrepareResponse {
                compares_held: true,
                success_result_bytes: success,
                failure_result_bytes: failure,
                ..Default::default()
            })
        };
        // Each part fits alone (its group checked); three of 2 MiB do not fit together.
        let mib = 1024 * 1024;
        let prepared: Prepared = vec![part(2 * mib, 0), part(2 * mib, mib), part(2 * mib, 0)];
        let refused = results_fit(&prepared, true).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .contains("TXN_RESULT_BYTES_MAX (4194304 bytes)")
                && refused.message().contains("6291456 bytes"),
            "{}",
            refused.message()
        );
        // The failure branch would return 1 MiB: it fits.
        assert!(results_fit(&prepared, false).is_ok());
    }
}
