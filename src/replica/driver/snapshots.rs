//! Snapshots and log compaction on the driver: installing a received snapshot raft accepted,
//! building one from the state machine when a follower needs it (on a thread of its own), and
//! removing applied log entries in bounded steps.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
#[cfg(test)]
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use raft::prelude::*;
use tokio::sync::oneshot;

use super::Driver;
use crate::error::{Error, Result};
use crate::limits::*;
use crate::replica::storage::SnapshotFile;

/// What a builder thread hands back: the snapshot's index, its file and how many records it holds.
type Built = Result<(u64, PathBuf, u64)>;

/// A snapshot being written by its own thread (H3): the driver keeps ticking, stepping and
/// appending meanwhile, and leaves committed entries in the log until the build ends, so the
/// state machine stays at the build's index (`Driver::apply_committed`).
pub(super) struct Build {
    done: oneshot::Receiver<Built>,
    term: u64,
    conf_state: ConfState,
    started: Instant,
}

/// The snapshot raft asked for: being built, or not built yet. A failed build (full disk, I/O
/// error) is retried after a doubling backoff, and meanwhile raft is told the snapshot is
/// temporarily unavailable, so the replica keeps serving and raft asks again.
#[derive(Default)]
pub(super) struct SnapshotBuild {
    wanted: bool,
    failures: u32,
    not_before: Option<Instant>,
    pub(super) running: Option<Build>,
    /// Tests: a builder thread waits while this gate is closed before it writes anything.
    #[cfg(test)]
    pub(super) gate: Option<Arc<Gate>>,
}

/// Tests: holds builder threads back while closed.
#[cfg(test)]
#[derive(Default)]
pub(super) struct Gate {
    closed: Mutex<bool>,
    opened: Condvar,
    /// Builders waiting at the gate now.
    held: std::sync::atomic::AtomicUsize,
}

#[cfg(test)]
impl Gate {
    pub(super) fn close(&self) {
        *self.closed.lock().unwrap() = true;
    }

    pub(super) fn open(&self) {
        *self.closed.lock().unwrap() = false;
        self.opened.notify_all();
    }

    /// Whether a builder waits at the gate.
    pub(super) fn holds_a_build(&self) -> bool {
        self.held.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

    fn pass(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        let mut closed = self.closed.lock().unwrap();
        self.held.fetch_add(1, SeqCst);
        while *closed {
            closed = self.opened.wait(closed).unwrap();
        }
        self.held.fetch_sub(1, SeqCst);
    }
}

impl SnapshotBuild {
    fn backoff(failures: u32) -> Duration {
        let ms = SNAPSHOT_BUILD_RETRY_MIN_MS.saturating_mul(1 << failures.min(16));
        Duration::from_millis(ms.min(SNAPSHOT_BUILD_RETRY_MAX_MS))
    }
}

/// Resolves with the running build's result; never while none runs.
pub(super) async fn built(running: &mut Option<Build>) -> Built {
    match running {
        Some(b) => (&mut b.done).await.unwrap_or_else(|_| {
            Err(Error::Storage(
                "the snapshot builder thread ended without a result".into(),
            ))
        }),
        None => std::future::pending().await,
    }
}

impl Driver {
    /// Starts building the snapshot raft asked for, unless one is being built or a failed build
    /// is still backing off.
    pub(super) fn maybe_build_snapshot(&mut self) {
        // Raft's asks during a build are answered by its result.
        let asked = self.raw.store().take_snapshot_wanted();
        let b = &mut self.snapshot_build;
        b.wanted |= asked && b.running.is_none();
        if !b.wanted || b.running.is_some() || b.not_before.is_some_and(|t| Instant::now() < t) {
            return;
        }
        match self.start_build() {
            Ok(build) => self.snapshot_build.running = Some(build),
            Err(e) => self.build_failed(e),
        }
    }

    /// Writes the state machine at its applied index to a file, on a thread of its own.
    fn start_build(&mut self) -> Result<Build> {
        let applied = self.sm.applied_index();
        let term = raft::Storage::term(self.raw.store(), applied)
            .map_err(|e| Error::Storage(format!("term of applied index {applied}: {e}")))?;
        let (tx, done) = oneshot::channel();
        let (sm, dir) = (self.sm.clone(), self.cfg.snap_dir.clone());
        #[cfg(test)]
        let gate = self.snapshot_build.gate.clone();
        std::thread::Builder::new()
            .name(format!("snap-g{}-n{}", self.cfg.group_id, self.cfg.node_id))
            .spawn(move || {
                #[cfg(test)]
                if let Some(gate) = gate {
                    gate.pass();
                }
                let _ = tx.send(sm.build_snapshot(&dir, applied, term));
            })
            .map_err(|e| Error::Storage(format!("starting a snapshot builder thread: {e}")))?;
        Ok(Build {
            done,
            term,
            conf_state: self.raw.store().conf_state().clone(),
            started: Instant::now(),
        })
    }

    /// Takes in the result of the running build: raft is offered the new snapshot, or the
    /// build is retried after a backoff.
    pub(super) fn on_build_done(&mut self, result: Built) {
        let Some(build) = self.snapshot_build.running.take() else {
            return;
        };
        let (index, path, records) = match result {
            Ok(built) => built,
            Err(e) => return self.build_failed(e),
        };
        self.snapshot_build.wanted = false;
        self.snapshot_build.failures = 0;
        self.snapshot_build.not_before = None;
        let old = self.raw.store().latest_snapshot();
        if old.is_some_and(|s| s.metadata.index >= index) {
            // A snapshot installed during the build is newer.
            let _ = std::fs::remove_file(path);
            return;
        }
        let old = old.map(|s| s.path.clone());
        let mut metadata = SnapshotMetadata {
            index,
            term: build.term,
            ..Default::default()
        };
        metadata.set_conf_state(build.conf_state);
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
            ms = build.started.elapsed().as_millis() as u64,
            "built snapshot"
        );
    }

    fn build_failed(&mut self, e: Error) {
        let b = &mut self.snapshot_build;
        let backoff = SnapshotBuild::backoff(b.failures);
        b.failures += 1;
        b.not_before = Some(Instant::now() + backoff);
        self.shared
            .snapshot_build_failures
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            node = self.cfg.node_id,
            group = self.cfg.group_id,
            error = %e,
            failures = b.failures,
            retry_ms = backoff.as_millis() as u64,
            "snapshot build failed; the replica keeps serving and retries (check the snapshot dir and free disk space)"
        );
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
        // The data is durable before the log says it replaces the entries.
        self.flusher.sync_now(meta.index)?;
        self.raw.mut_store().apply_snapshot(meta)?;
        // Everything committed before it is in it, whatever was left unapplied.
        self.committed_seen = meta.index;
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

    pub(super) fn maybe_compact(&mut self) -> Result<()> {
        let applied = self.sm.applied_index();
        let store = self.raw.store();
        let first = store.first_index_now();
        let over_count = applied + 1 - first.min(applied + 1) > self.cfg.compact_log_entries;
        let over_bytes = store.log_bytes() > LOG_MEMORY_BYTES_MAX;
        if !over_count && !over_bytes {
            return Ok(());
        }
        // Keep the newest half so a follower slightly behind still catches up from the log,
        // unless the log's memory is over its bound: then everything applied may go.
        let mut to = match over_bytes {
            true => applied,
            false => applied - self.cfg.compact_log_entries / 2,
        };
        // Never past what sled has made durable: a crash may lose the rest of sled's applies,
        // and the restart replays them from here.
        let durable = self.flusher.durable_applied();
        if durable < to {
            self.flusher.request();
            to = durable;
        }
        let removed = self.raw.mut_store().compact(to)?;
        if removed > 0 {
            tracing::debug!(node = self.cfg.node_id, to, removed, "compacted raft log");
        }
        Ok(())
    }
}
