//! The leader's background resolution of orphaned 2PC locks (audit M4): a coordinator that dies
//! after preparing leaves locks that only the next request meeting them would resolve; on a key
//! nobody touches they would stay, and a slot move waits for every lock in its slots. So the
//! leader of each group looks for locks held longer than the lock timeout (by its own clock,
//! `StateMachine::expired_locks`) every `ORPHAN_SCAN_EVERY_MS` and resolves up to
//! `ORPHANS_PER_ROUND_MAX` of them as a router would (`ordo_router::LockResolver`: the decision
//! from the primary's group, aborting the holder if it has none, then `Finish` here), reaching
//! other groups through the config servers that ownership changes named.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ordo_proto::v1::error_detail;
use ordo_router::LockResolver;
use tokio::sync::watch;

use crate::limits::{ORPHANS_PER_ROUND_MAX, ORPHAN_RESOLVE_MS, ORPHAN_SCAN_EVERY_MS};
use crate::replica::ReplicaHandle;

/// Runs the resolver of `replica`'s group until `stop` turns true.
pub(crate) fn spawn(replica: Arc<ReplicaHandle>, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        // Connected on first need, again when the config servers' addresses change.
        let mut resolver: Option<(Vec<String>, LockResolver)> = None;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(Duration::from_millis(ORPHAN_SCAN_EVERY_MS)) => {}
            }
            if replica.shared.is_leader.load(Ordering::Relaxed) == 0 || replica.sm.locks_held() <= 0
            {
                continue;
            }
            if let Err(e) = round(&replica, &mut resolver).await {
                tracing::warn!(group = replica.group_id, error = %e, "orphaned locks not resolved this round");
            }
        }
    });
}

/// One round: the expired locks, each resolved within `ORPHAN_RESOLVE_MS`.
async fn round(
    replica: &ReplicaHandle,
    resolver: &mut Option<(Vec<String>, LockResolver)>,
) -> anyhow::Result<()> {
    let orphans = replica.sm.expired_locks(ORPHANS_PER_ROUND_MAX)?;
    if orphans.is_empty() {
        return Ok(());
    }
    let addrs = replica.sm.config_addrs();
    if addrs.is_empty() {
        anyhow::bail!("no config server is known (no ownership change named one)");
    }
    let budget = Duration::from_millis(ORPHAN_RESOLVE_MS);
    if resolver.as_ref().is_none_or(|(known, _)| *known != addrs) {
        *resolver = Some((addrs.clone(), LockResolver::connect(&addrs, budget).await?));
    }
    let (_, r) = resolver.as_ref().expect("connected above");
    for (locked, at) in orphans {
        let status = tonic::Status::from(locked);
        let Some(error_detail::Kind::Locked(lock)) = ordo_proto::error_detail_of(&status) else {
            unreachable!("expired_locks reports locks")
        };
        let txn = crate::error::hex(&lock.txn_id);
        match r.resolve(lock, at, budget).await {
            Ok(()) => tracing::info!(group = replica.group_id, txn, "resolved an orphaned lock"),
            Err(e) => {
                tracing::debug!(group = replica.group_id, txn, error = %e, "could not resolve an orphaned lock yet")
            }
        }
    }
    Ok(())
}
