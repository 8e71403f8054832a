//! Snapshots and log compaction on the driver: installing a received snapshot raft accepted,
//! building one from the state machine when a follower needs it, and removing applied log
//! entries in bounded steps.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use raft::prelude::*;

use super::Driver;
use crate::error::{Error, Result};
use crate::limits::*;
use crate::replica::storage::SnapshotFile;

/// A snapshot raft asked for and not built yet: a failed build (full disk, I/O error) is retried
/// after a doubling backoff, and meanwhile raft is told the snapshot is temporarily unavailable,
/// so the replica keeps serving and raft asks again.
#[derive(Default)]
pub(super) struct BuildRetry {
    wanted: bool,
    failures: u32,
    not_before: Option<Instant>,
}

impl BuildRetry {
    fn backoff(failures: u32) -> Duration {
        let ms = SNAPSHOT_BUILD_RETRY_MIN_MS.saturating_mul(1 << failures.min(16));
        Duration::from_millis(ms.min(SNAPSHOT_BUILD_RETRY_MAX_MS))
    }
}

impl Driver {
    /// Builds the snapshot raft asked for, unless a failed build is still backing off.
    pub(super) fn maybe_build_snapshot(&mut self) {
        let retry = &mut self.snapshot_build;
        retry.wanted |= self.raw.store().take_snapshot_wanted();
        if !retry.wanted || retry.not_before.is_some_and(|t| Instant::now() < t) {
            return;
        }
        match self.build_snapshot() {
            Ok(()) => self.snapshot_build = BuildRetry::default(),
            Err(e) => {
                let retry = &mut self.snapshot_build;
                let backoff = BuildRetry::backoff(retry.failures);
                retry.failures += 1;
                retry.not_before = Some(Instant::now() + backoff);
                self.shared
                    .snapshot_build_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    node = self.cfg.node_id,
                    group = self.cfg.group_id,
                    error = %e,
                    failures = retry.failures,
                    retry_ms = backoff.as_millis() as u64,
                    "snapshot build failed; the replica keeps serving and retries (check the snapshot dir and free disk space)"
                );
            }
        }
    }

    /// Hands a received snapshot to raft and keeps its file until raft installs it. Files raft can
    /// no longer install (at or below the applied index: raft restores only snapshots past its
    /// commit) are removed now rather than left on disk.
    pub(super) fn stage_snapshot(&mut self, msg: Message, path: PathBuf) {
        let meta = msg.get_snapshot().get_metadata();
        self.staged.insert((meta.index, meta.term), path);
        if let Err(e) = self.raw.step(msg) {
            tracing::warn!(error = %e, "snapshot message refused by raft");
        }
        let applied = self.sm.applied_index();
        self.staged.retain(|(index, _), path| {
            let keep = *index > applied;
            if !keep {
                let _ = std::fs::remove_file(path);
            }
            keep
        });
    }

    pub(super) fn install_snapshot(&mut self, meta: &SnapshotMetadata) -> Result<()> {
        let path = self
            .staged
            .remove(&(meta.index, meta.term))
            .ok_or_else(|| {
                Error::Storage(format!(
                    "raft accepted snapshot {}/{} but its file is not staged",
                    meta.index, meta.term
                ))
            })?;
        let started = Instant::now();
        // An install cut short resets the replica (`node.rs`): lower the watermark to that first.
        let mark = self.raw.store().mark();
        self.watermark.write(mark.before_install())?;
        let items = self.sm.install_snapshot(&path, meta.index)?;
        self.raw.mut_store().apply_snapshot(meta)?;
        self.durable.sync()?;
        let mark = self.raw.store().mark();
        self.watermark.write(mark)?;
        self.sm.finish_install()?;
        self.snapshots_installed += 1;
        // The files staged beside it are older or the same snapshot again, and the one this
        // replica built or installed before is superseded (a transfer reading it keeps its handle).
        let old = self.raw.store().latest_snapshot().map(|s| s.path.clone());
        for other in self.staged.drain().map(|(_, p)| p).chain(old) {
            if other != path {
                let _ = std::fs::remove_file(other);
            }
        }
        self.raw.mut_store().set_latest_snapshot(SnapshotFile {
            metadata: meta.clone(),
            path,
        });
        tracing::info!(
            node = self.cfg.node_id,
            index = meta.index,
            items,
            ms = started.elapsed().as_millis() as u64,
            "caught up from a snapshot"
        );
        Ok(())
    }

    pub(super) fn build_snapshot(&mut self) -> Result<()> {
        let applied = self.sm.applied_index();
        let term = raft::Storage::term(self.raw.store(), applied)
            .map_err(|e| Error::Storage(format!("term of applied index {applied}: {e}")))?;
        let started = Instant::now();
        let (index, path, records) = self.sm.build_snapshot(&self.cfg.snap_dir, term)?;
        let mut metadata = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        metadata.set_conf_state(self.raw.store().conf_state().clone());
        let old = self.raw.store().latest_snapshot().map(|s| s.path.clone());
        self.raw.mut_store().set_latest_snapshot(SnapshotFile {
            metadata,
            path: path.clone(),
        });
        if let Some(old) = old.filter(|o| *o != path) {
            // A transfer still reading it keeps its open handle.
            let _ = std::fs::remove_file(old);
        }
        tracing::info!(
            node = self.cfg.node_id,
            index,
            records,
            ms = started.elapsed().as_millis() as u64,
            "built snapshot"
        );
        Ok(())
    }

    pub(super) fn maybe_compact(&mut self) -> Result<()> {
        let applied = self.sm.applied_index();
        let first = self.raw.store().first_index_now();
        if applied + 1 - first.min(applied + 1) <= self.cfg.compact_log_entries {
            return Ok(());
        }
        // Keep at least the newest half so a follower slightly behind still catches up from the
        // log, and remove at most a step at a time: deleting thousands of entries in one batch
        // stalls every request of the group for tens of milliseconds, small steps spread it out.
        let first_kept_max = applied - self.cfg.compact_log_entries / 2;
        let to = first_kept_max.min(first.saturating_sub(1) + COMPACT_STEP_ENTRIES_MAX);
        let removed = self.raw.mut_store().compact(to)?;
        tracing::debug!(node = self.cfg.node_id, to, removed, "compacted raft log");
        Ok(())
    }
}
