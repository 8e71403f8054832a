//! Waiting on, and resolving, an item locked by a cross-group transaction (`coordinator.rs`).
//!
//! A request that meets a lock gets `ABORTED` with a `Locked` detail from the node; nothing was
//! applied. With [`OnLock::Wait`] the routing loop waits and retries (the deadline bounds it;
//! waits do not use up attempts). Before each retry it offers the lock to [`resolve`], which
//! acts only when the lock is older than the lock timeout (its coordinator is gone) or when the
//! waiting transaction is older than the holder (wound-wait, [`OnLock::WaitAs`]): it asks the
//! holder's primary for the decision, aborting the holder if there is none, and finishes the
//! locked group's part with it. Otherwise the lock is left alone and the waiter waits on.
//!
//! Layering: this module sits on the routing loop (`forward.rs`) and calls it only with
//! [`FailOnLock`]. A lock met while resolving one is handed back, never resolved in turn: no
//! recursion, so no boxed future.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use ordo_proto::v1::{error_detail, DecideRequest, Decision, FinishRequest};
use tokio::time::Instant;
use tonic::Status;

use crate::forward::{forward, participant, FailOnLock, LockPolicy, Route};
use crate::retry::Effect;
use crate::Shared;

/// What a request does when it meets an item locked by a cross-group transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OnLock {
    /// Wait (bounded by the deadline), resolving the lock once it is older than the timeout.
    Wait,
    /// Wait as the cross-group transaction `(priority_ms, txn_id)`: as `Wait`, but a holder
    /// younger than it is aborted at once (wound-wait, see `coordinator.rs`).
    WaitAs(u64, Bytes),
    /// Hand the `ABORTED` status back (a writing transaction's prepare never waits).
    Fail,
}

impl LockPolicy for OnLock {
    fn waits(&self) -> bool {
        *self != OnLock::Fail
    }

    fn resolve(
        &self,
        shared: &Shared,
        lock: error_detail::Locked,
        at: Bytes,
        deadline: Instant,
    ) -> impl Future<Output = Result<(), Status>> + Send {
        let wounder = match self {
            OnLock::WaitAs(priority, id) => Some((*priority, id.clone())),
            OnLock::Wait | OnLock::Fail => None,
        };
        resolve(shared, lock, at, deadline, wounder)
    }
}

/// Resolves a lock met on an item of the group that `at` (a shard key) routes to, when the
/// `wounder` (the transaction that met it) is older than its holder, or the holder has held
/// the lock longer than the lock timeout (`age_ms`, measured by the locked group's own clock:
/// this router's clock is never compared with another machine's): ask the primary for the
/// decision (aborting the holder if there is none) and finish the locked group's part with it.
/// Otherwise the lock is left alone (the caller waits or retries).
pub(crate) async fn resolve(
    shared: &Shared,
    lock: error_detail::Locked,
    at: Bytes,
    deadline: Instant,
    wounder: Option<(u64, Bytes)>,
) -> Result<(), Status> {
    let wound = wounder
        .is_some_and(|(priority, id)| (priority, &id[..]) < (lock.priority_ms, &lock.txn_id[..]));
    let expired = lock.age_ms >= ordo_proto::TXN_LOCK_TIMEOUT_MS;
    if !wound && !expired {
        return Ok(());
    }
    if lock.read {
        // A reader decides nothing: releasing its part here is enough (a live one notices at
        // its finish and reads again).
        return finish(shared, &lock.txn_id, at, Decision::Abort as i32, deadline).await;
    }
    let decision = decide(shared, &lock, wound, deadline).await?;
    if decision == Decision::Pending as i32 {
        return Ok(());
    }
    if wound {
        tracing::debug!(txn = %hex(&lock.txn_id), decision = ?Decision::try_from(decision),
            "an older transaction resolved a younger one's lock");
    } else {
        tracing::info!(txn = %hex(&lock.txn_id), decision = ?Decision::try_from(decision),
            "resolving a lock left by a coordinator that is gone");
    }
    finish(shared, &lock.txn_id, at, decision, deadline).await
}

/// Asks the lock holder's primary for its decision, recording an abort if there is none yet
/// (`wound`: even though the holder's lock has not expired).
async fn decide(
    shared: &Shared,
    lock: &error_detail::Locked,
    wound: bool,
    deadline: Instant,
) -> Result<i32, Status> {
    let r = DecideRequest {
        header: None,
        txn_id: lock.txn_id.clone(),
        primary_shard_key: lock.primary_shard_key.clone(),
        decision: Decision::Abort as i32,
        resolve: true,
        started_ms: lock.started_ms,
        wound,
        ..Default::default()
    };
    let resp = forward(
        shared,
        "Decide",
        Effect::Read,
        &FailOnLock,
        Route::Key(lock.primary_shard_key.clone()),
        r,
        remaining(deadline),
        |ch, r| async move { participant(ch).decide(r).await },
    )
    .await?;
    Ok(resp.into_inner().decision)
}

/// Finishes the holder's part in the group that `at` routes to with `decision`, releasing its
/// locks there.
async fn finish(
    shared: &Shared,
    txn_id: &Bytes,
    at: Bytes,
    decision: i32,
    deadline: Instant,
) -> Result<(), Status> {
    let r = FinishRequest {
        header: None,
        txn_id: txn_id.clone(),
        shard_key: at.clone(),
        decision,
        group_id: 0,
    };
    forward(
        shared,
        "Finish",
        Effect::Read,
        &FailOnLock,
        Route::Key(at),
        r,
        remaining(deadline),
        |ch, r| async move { participant(ch).finish(r).await },
    )
    .await?;
    Ok(())
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// A transaction id for logs.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
