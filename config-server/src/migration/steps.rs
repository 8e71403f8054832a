//! The mover's steps on the groups: copy, catch up, fence, cut-over, finish (cleanup) and abort.
//! Every call to a group goes to its leader through [`Mover::on_leader`].

use std::future::Future;
use std::time::{Duration, Instant};

use ordo_proto::retry::{classify, Action, Effect};
use ordo_proto::v1::peer_client::PeerClient;
use ordo_proto::v1::*;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::*;
use crate::groups::LeaderCall;
use crate::map;
use crate::MapStore;

/// [`classify`], and a replica's own timeout, cancellation or unknown failure is retried too:
/// every mover request is idempotent, and a step that gives up aborts the whole move.
fn classify_resumable(status: &Status, effect: Effect) -> Action {
    match classify(status, effect) {
        Action::Fail
            if matches!(
                status.code(),
                Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
            ) =>
        {
            Action::Rotate
        }
        action => action,
    }
}

impl<S: MapStore> Mover<S> {
    /// Calls `rpc` on `group`'s leader through [`GroupLeaders::on_leader`]: follows not-leader
    /// hints, rotates over the replicas, bounded by [`CALL_DEADLINE`] and [`CALL_ATTEMPTS_MAX`].
    /// Every request the mover sends is idempotent, so repeating one whose outcome was unknown
    /// is safe ([`Effect::IdempotentWrite`], and see [`classify_resumable`]).
    async fn on_leader<Req, T, F, Fut>(
        &self,
        group: &Group,
        what: &'static str,
        req: Req,
        rpc: F,
    ) -> Result<T, Status>
    where
        Req: Clone,
        F: Fn(PeerClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let call = LeaderCall {
            what,
            effect: Effect::IdempotentWrite,
            attempts_max: CALL_ATTEMPTS_MAX,
            deadline: CALL_DEADLINE,
            attempt_timeout: CALL_TIMEOUT,
            backoff: CALL_BACKOFF,
            classify: classify_resumable,
        };
        let addrs: Vec<String> = group.replicas.iter().map(|r| r.addr.clone()).collect();
        self.groups
            .on_leader(group.id, &addrs, &call, req, rpc)
            .await
    }

    async fn out_step(
        &self,
        d: &Group,
        id: u64,
        step: MigrateStep,
        slots: &[u32],
    ) -> Result<u64, Status> {
        let req = MigrateOutRequest {
            group_id: d.id,
            migration_id: id,
            step: step as i32,
            slots: slots.to_vec(),
            ..Default::default()
        };
        Ok(self.out_call(d, req).await?.index)
    }

    async fn out_call(
        &self,
        d: &Group,
        req: MigrateOutRequest,
    ) -> Result<MigrateOutResponse, Status> {
        let what = MigrateStep::try_from(req.step).map_or("migrate out", |s| s.as_str_name());
        self.on_leader(
            d,
            what,
            req,
            |mut c, r| async move { c.migrate_out(r).await },
        )
        .await
    }

    /// Repeats a TRIM or END step until the donor reports its part of the change log deleted
    /// (each step deletes a bounded number of entries).
    async fn delete_log(
        &self,
        d: &Group,
        id: u64,
        step: MigrateStep,
        trim_after: &[u8],
    ) -> Result<(), Status> {
        let req = MigrateOutRequest {
            group_id: d.id,
            migration_id: id,
            step: step as i32,
            trim_after: trim_after.to_vec().into(),
            ..Default::default()
        };
        for _ in 0..PAGES_MAX {
            if self.out_call(d, req.clone()).await?.done {
                return Ok(());
            }
        }
        Err(Status::internal(
            "the change log was not deleted within its page bound",
        ))
    }

    async fn ingest(
        &self,
        r: &Group,
        id: u64,
        records: Vec<MigrationRecord>,
    ) -> Result<(), Status> {
        let req = MigrateIngestRequest {
            group_id: r.id,
            migration_id: id,
            records,
        };
        self.on_leader(r, "ingest", req, |mut c, r| async move {
            c.migrate_ingest(r).await
        })
        .await?;
        Ok(())
    }

    /// Deletes every item of `slots` on `g` (which must not serve them), in rate-limited
    /// batches; how many.
    async fn clear(&self, g: &Group, slots: &[u32], id: u64) -> Result<u64, Status> {
        let req = MigrateClearRequest {
            group_id: g.id,
            slots: slots.to_vec(),
            items_max: CLEAR_ITEMS,
        };
        let mut total = 0;
        for _ in 0..PAGES_MAX {
            let r = self
                .on_leader(g, "clear", req.clone(), |mut c, r| async move {
                    c.migrate_clear(r).await
                })
                .await?;
            total += r.deleted;
            self.progress(id, |m| m.items_cleaned = total);
            if r.done {
                return Ok(total);
            }
            tokio::time::sleep(CLEAR_PAUSE).await;
        }
        Err(Status::internal(
            "cleanup did not end within its page bound",
        ))
    }

    /// Pulls pages after `after` until D has nothing more, ingesting each into R. Returns the
    /// records moved and the last pull.
    async fn pass(
        &self,
        m: &Migration,
        d: &Group,
        r: &Group,
        log: bool,
        after: &mut Vec<u8>,
    ) -> Result<(u64, MigratePullResponse), Stop> {
        let mut moved = 0;
        let started = Instant::now();
        let mut checked = Instant::now();
        let mut bytes_total = 0u64;
        let rate = match m.copy_bytes_per_sec {
            0 => COPY_BYTES_PER_SEC,
            r => r,
        };
        // A page holds an eighth of a second's worth of the bandwidth bound at most, so that
        // the throttle is smooth.
        let page_bytes = (PAGE_BYTES as u64).min(rate / 8).max(1) as u32;
        for _ in 0..PAGES_MAX {
            if checked.elapsed() > CHECK_EVERY {
                self.check_still_wanted(m.id).await?;
                checked = Instant::now();
            }
            let req = MigratePullRequest {
                group_id: d.id,
                migration_id: m.id,
                log,
                after: after.clone().into(),
                bytes_max: page_bytes,
            };
            let p = self
                .on_leader(
                    d,
                    "pull",
                    req,
                    |mut c, r| async move { c.migrate_pull(r).await },
                )
                .await?;
            let n = p.records.len() as u64;
            let bytes: u64 = p
                .records
                .iter()
                .map(|r| (r.key.len() + r.value.len()) as u64)
                .sum();
            if n > 0 {
                self.ingest(r, m.id, p.records.clone()).await?;
            }
            moved += n;
            bytes_total += bytes;
            *after = p.next_after.to_vec();
            self.progress(m.id, |x| {
                if log {
                    x.log_records += n;
                } else {
                    x.items_copied += n;
                }
                x.bytes_copied += bytes;
            });
            if p.done {
                return Ok((moved, p));
            }
            // Bandwidth bound: stay under COPY_BYTES_PER_SEC on average.
            let due = Duration::from_secs_f64(bytes_total as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        Err(Stop::Abort(
            "a copy pass did not end within its page bound".into(),
        ))
    }

    /// Stops the drive when an abort was asked for, or when this replica is no longer the one
    /// that may write the records (it lost the config leadership).
    async fn check_still_wanted(&self, id: u64) -> Result<(), Stop> {
        match self.store.load_migrations(true).await {
            Ok((list, _)) => match list.migrations.iter().find(|m| m.id == id) {
                Some(m) if m.abort_requested => Err(Stop::Abort("aborted on request".into())),
                Some(_) => Ok(()),
                None => Err(Stop::Leave(Status::not_found(format!(
                    "migration {id} is gone"
                )))),
            },
            Err(s) => Err(Stop::Leave(s)),
        }
    }

    pub(super) async fn copy_and_cut_over(&self, m: &Migration) -> Result<(), Stop> {
        let (d, r) = self.groups(m).await?;
        // Leftovers of an earlier attempt would survive the copy: clear them first.
        self.clear(&r, &m.slots, m.id).await?;
        self.progress(m.id, |x| x.items_cleaned = 0);
        self.out_step(&d, m.id, MigrateStep::Begin, &m.slots)
            .await?;
        let mut after = Vec::new();
        self.pass(m, &d, &r, false, &mut after).await?;
        // Catch up from the log's start until a round is small.
        let mut log_after = Vec::new();
        for _ in 0..CATCH_UP_ROUNDS_MAX {
            let (n, _) = self.pass(m, &d, &r, true, &mut log_after).await?;
            if n > 0 {
                // R holds the log up to here: D drops it, so its cap bounds what R still lacks.
                self.delete_log(&d, m.id, MigrateStep::Trim, &log_after)
                    .await?;
            }
            if n < FENCE_BELOW_RECORDS {
                break;
            }
        }
        self.check_still_wanted(m.id).await?;
        // Critical section.
        self.update(m.id, |x| {
            if x.abort_requested {
                return Err(Status::aborted("aborted on request"));
            }
            x.state = MigrationState::Fenced as i32;
            Ok(())
        })
        .await
        .map_err(|s| match s.code() {
            Code::Aborted => Stop::Abort(s.message().to_string()),
            _ => Stop::Leave(s),
        })?;
        let fenced_at = Instant::now();
        // The donor fences only once no cross-group transaction holds items of the slots (they
        // finish within a few round trips; a dead coordinator's are resolved by whoever meets
        // them, at the latest after the lock timeout).
        let mut tries = 0;
        let fence = loop {
            match self.out_step(&d, m.id, MigrateStep::Fence, &[]).await {
                Err(s)
                    if s.code() == Code::FailedPrecondition
                        && s.message().contains("locked")
                        && tries < FENCE_LOCKED_TRIES_MAX =>
                {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => break other?,
            }
        };
        let (_, last) = self.pass(m, &d, &r, true, &mut log_after).await?;
        if last.fence_index != fence || last.applied_index < fence {
            return Err(Stop::Abort(format!(
                "the donor's log does not reach the fence (fence {fence}, log read at {} with fence {})",
                last.applied_index, last.fence_index
            )));
        }
        self.cut_over(m, &r, fenced_at).await
    }

    /// The cut-over: the map moves the slots to R (a compare-and-set), R takes them (D stays
    /// fenced); under the admin lock, so no other map change comes between.
    async fn cut_over(&self, m: &Migration, r: &Group, fenced_at: Instant) -> Result<(), Stop> {
        let _admin = self.admin.lock().await;
        let (map, token) = self.store.load(true).await.map_err(Stop::Leave)?;
        // The map load was linearizable: a local read of the records is as fresh.
        let (list, _) = self
            .store
            .load_migrations(false)
            .await
            .map_err(Stop::Leave)?;
        if list
            .migrations
            .iter()
            .any(|x| x.id == m.id && x.abort_requested)
        {
            return Err(Stop::Abort("aborted on request".into()));
        }
        if let Some(s) = m
            .slots
            .iter()
            .find(|s| map.slot_owner.get(**s as usize) != Some(&m.from_group))
        {
            return Err(Stop::Abort(format!(
                "slot {s} is no longer owned by group {} in the map",
                m.from_group
            )));
        }
        let (next, _) =
            map::move_slots(&map, &m.slots, m.to_group).map_err(|e| Stop::Abort(e.to_string()))?;
        let after = map::slots_by_group(&next);
        // D stays fenced (it serves none of the slots) until `finish` removes them from its
        // ownership, so the map can cut over and R serve at once: one raft round less in the pause.
        match self.store.save(token, &next).await {
            Ok(true) => {}
            Ok(false) => {
                // Certainly not stored: the abort unfences D.
                return Err(Stop::Abort("the shard map changed concurrently".into()));
            }
            // Unknown: only a linearizable read of the map can tell; the resumer does it.
            Err(s) => return Err(Stop::Leave(s)),
        }
        tracing::info!(
            migration = m.id,
            version = next.version,
            "cut-over: the map gives the slots to the recipient"
        );
        let pause = {
            let taken = self
                .own(r, next.version, next.slot_count, after[&r.id].clone())
                .await;
            let pause = fenced_at.elapsed();
            if let Err(e) = taken {
                tracing::error!(migration = m.id, error = %e, "the recipient did not take its slots yet; the resumer retries");
            }
            pause
        };
        let pause_ms = pause.as_millis() as u64;
        let p = self
            .progress
            .lock()
            .unwrap()
            .get(&m.id)
            .cloned()
            .unwrap_or_default();
        let saved = self
            .update(m.id, |x| {
                x.state = MigrationState::Committed as i32;
                x.map_version = next.version;
                x.pause_ms = pause_ms;
                x.items_copied = p.items_copied;
                x.bytes_copied = p.bytes_copied;
                x.log_records = p.log_records;
                Ok(())
            })
            .await;
        if let Err(e) = saved {
            tracing::warn!(migration = m.id, error = %e, "could not record the cut-over; the resumer finishes it from the map");
        }
        tracing::info!(migration = m.id, pause_ms, "critical section over");
        Ok(())
    }

    async fn own(
        &self,
        g: &Group,
        map_version: u64,
        slot_count: u32,
        slots: Vec<u32>,
    ) -> Result<SetOwnershipResponse, Status> {
        let req = SetOwnershipRequest {
            group_id: g.id,
            map_version,
            slot_count,
            slots,
            config_addrs: self.store.config_addrs(),
        };
        self.on_leader(g, "set ownership", req, |mut c, r| async move {
            c.set_ownership(r).await
        })
        .await
    }

    /// After the cut-over: R owns the slots (again, idempotent), D ends the migration and deletes
    /// its copy; state DONE.
    pub(super) async fn finish(&self, m: &Migration) -> Result<Migration, Status> {
        let (d, r) = self.groups(m).await?;
        {
            let _admin = self.admin.lock().await;
            let (map, _) = self.store.load(true).await?;
            if m.slots
                .iter()
                .any(|s| map.slot_owner.get(*s as usize) != Some(&m.to_group))
            {
                return Err(Status::internal(format!(
                    "migration {} is recorded committed but the map does not give its slots to group {}",
                    m.id, m.to_group
                )));
            }
            // R takes the slots (again: idempotent), then D gives them up while still fenced,
            // so it never serves them after the cut-over.
            let mut owned = map::slots_by_group(&map);
            for g in [&r, &d] {
                let slots = owned.remove(&g.id).unwrap_or_default();
                if let Err(e) = self.own(g, map.version, map.slot_count, slots).await {
                    // Refused as older: a newer map already installed this group's ownership.
                    if e.code() != Code::FailedPrecondition {
                        return Err(e);
                    }
                }
            }
        }
        self.delete_log(&d, m.id, MigrateStep::End, &[]).await?;
        let cleaned = self.clear(&d, &m.slots, m.id).await?;
        let map_version = {
            let (map, _) = self.store.load(true).await?;
            map.version
        };
        let m = self
            .update(m.id, |x| {
                x.state = MigrationState::Done as i32;
                x.items_cleaned = cleaned;
                if x.map_version == 0 {
                    x.map_version = map_version;
                }
                x.finished_unix_ms = now_ms();
                Ok(())
            })
            .await?;
        tracing::info!(
            migration = m.id,
            items = m.items_copied,
            pause_ms = m.pause_ms,
            cleaned,
            "migration done"
        );
        Ok(m)
    }

    /// Before the cut-over only: D owns and serves the slots again, R's copy is deleted.
    pub(super) async fn abort(&self, m: &Migration, why: &str) -> Result<Migration, Status> {
        tracing::warn!(migration = m.id, why, "aborting migration");
        let (d, r) = self.groups(m).await?;
        {
            let _admin = self.admin.lock().await;
            let (map, _) = self.store.load(true).await?;
            if m.slots
                .iter()
                .all(|s| map.slot_owner.get(*s as usize) == Some(&m.to_group))
            {
                drop(_admin);
                tracing::info!(
                    migration = m.id,
                    "the map already gives the slots to the recipient: finishing instead"
                );
                self.update(m.id, |x| {
                    x.state = MigrationState::Committed as i32;
                    Ok(())
                })
                .await?;
                return self.finish(m).await;
            }
            // D may have given the slots up for a cut-over that did not happen: give them back at
            // a version above any it may hold.
            let slots = map::slots_by_group(&map).remove(&d.id).unwrap_or_default();
            let req = SetOwnershipRequest {
                group_id: d.id,
                map_version: map.version + 1,
                slot_count: map.slot_count,
                slots,
                config_addrs: self.store.config_addrs(),
            };
            self.on_leader(&d, "set ownership", req, |mut c, r| async move {
                c.set_ownership(r).await
            })
            .await?;
            self.delete_log(&d, m.id, MigrateStep::End, &[]).await?;
        }
        self.clear(&r, &m.slots, m.id).await?;
        let why = why.to_string();
        self.update(m.id, |x| {
            x.state = MigrationState::Aborted as i32;
            x.error = why.clone();
            x.finished_unix_ms = now_ms();
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mover_calls_also_retry_a_replica_timing_out_or_cancelling() {
        let e = Effect::IdempotentWrite;
        for code in [Code::Unknown, Code::Cancelled, Code::DeadlineExceeded] {
            assert_eq!(
                classify_resumable(&Status::new(code, "x"), e),
                Action::Rotate
            );
        }
        assert_eq!(
            classify_resumable(&Status::unavailable("no leader"), e),
            Action::Rotate
        );
        for code in [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::Internal,
        ] {
            assert_eq!(classify_resumable(&Status::new(code, "x"), e), Action::Fail);
        }
    }
}
