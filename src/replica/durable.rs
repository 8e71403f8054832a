//! Making sled's writes durable.
//!
//! sled 0.34's `flush` writes its IO buffers and then calls `sync_file_range` on Linux. That
//! waits for the pages to reach the device, but it neither flushes the device's write cache nor
//! commits the file system's journal, so after a power loss the "flushed" tail of the log may be
//! gone. Large items (over an eighth of a segment, about 64 KiB) go to separate blob files that
//! sled never syncs at all. Raft needs more than that: a vote or an acknowledged entry must
//! survive a crash of the machine, not only of the process.
//!
//! [`Durable::sync`] therefore follows `flush` with an `fdatasync` of sled's log file (any
//! descriptor of a file syncs its data) and an `fsync` of every blob file created since the last
//! call, plus of the blob directory that names them. The blob directory is listed on every call;
//! it holds only the few large items, so the listing is cheap.
//!
//! **The first failure is final** (fail-stop, the fsyncgate lesson: after a failed `fsync` the
//! kernel may have dropped the dirty pages and marked them clean, so a later `fsync` that
//! succeeds proves nothing). `Durable` remembers the first error of `flush` or of a sync and
//! returns it from every later `sync` without trying again; the replica stops on it.
//!
//! Failpoint `ORDO_FAILPOINT_FSYNC=after:N` (read once, in [`Durable::open`]): every sync after
//! the first `N` that follow `open` fails as if `fdatasync` had returned EIO. For tests of the
//! fail-stop path; unset in production, where it costs one branch per sync.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::limits::FLUSH_INTERVAL_MS;

pub struct Durable {
    db: sled::Db,
    log_file: File,
    log_path: PathBuf,
    blob_dir: PathBuf,
    /// Blob files already synced (sled never rewrites a blob file in place).
    blobs_synced: HashSet<OsString>,
    /// The first sync error: every later `sync` returns it (see the module doc).
    failed: Option<String>,
    failpoint: FailPoint,
}

/// The fsync failpoint (see the module doc): counts syncs and, when set, fails every one after
/// the first `n`. Shared by sled's syncs here and the raft log's (`wal`).
#[derive(Debug, Default)]
pub struct FailPoint {
    syncs: u64,
    fail_after: Option<u64>,
}

impl FailPoint {
    /// The failpoint as `ORDO_FAILPOINT_FSYNC` sets it (off when unset).
    pub fn from_env() -> Result<FailPoint> {
        Ok(FailPoint {
            syncs: 0,
            fail_after: parse_failpoint(std::env::var(FAILPOINT_FSYNC_ENV).ok().as_deref())?,
        })
    }

    #[cfg(test)]
    pub fn after(n: u64) -> FailPoint {
        FailPoint {
            syncs: 0,
            fail_after: Some(n),
        }
    }

    /// Counts one sync; true if it is to fail.
    pub fn fails_now(&mut self) -> bool {
        self.syncs += 1;
        self.fail_after.is_some_and(|n| self.syncs > n)
    }
}

/// The failpoint's environment variable (see the module doc).
pub const FAILPOINT_FSYNC_ENV: &str = "ORDO_FAILPOINT_FSYNC";

/// `after:N` → `Some(N)`; unset → `None`; anything else is refused so a typo is not ignored.
fn parse_failpoint(value: Option<&str>) -> Result<Option<u64>> {
    let Some(v) = value else { return Ok(None) };
    v.strip_prefix("after:")
        .and_then(|n| n.parse().ok())
        .map(Some)
        .ok_or_else(|| {
            Error::InvalidArgument(format!("{FAILPOINT_FSYNC_ENV}={v}: expected after:<syncs>"))
        })
}

fn io(e: std::io::Error, what: &str, path: &Path) -> Error {
    Error::Storage(format!("{what} {}: {e}", path.display()))
}

impl Durable {
    /// `dir` is the directory sled was opened at.
    pub fn open(db: sled::Db, dir: &Path) -> Result<Durable> {
        let path = dir.join("db");
        let log_file = File::open(&path).map_err(|e| io(e, "opening sled's log", &path))?;
        let mut durable = Durable {
            db,
            log_file,
            log_path: path,
            blob_dir: dir.join("blobs"),
            blobs_synced: HashSet::new(),
            failed: None,
            failpoint: FailPoint::default(),
        };
        // Whatever an earlier run left unsynced is synced now, before raft relies on it.
        durable.sync()?;
        durable.failpoint = FailPoint::from_env()?;
        Ok(durable)
    }

    /// Writes everything sled holds in memory and waits until it is on stable storage. After a
    /// failure, returns that failure again without writing anything (see the module doc).
    pub fn sync(&mut self) -> Result<()> {
        if let Some(first) = &self.failed {
            return Err(Error::Storage(format!(
                "an earlier sync failed, so nothing written since is known to be durable: {first}"
            )));
        }
        let r = self.try_sync();
        if let Err(e) = &r {
            self.failed = Some(e.to_string());
        }
        r
    }

    /// Tests: the failpoint without the environment variable (shared by the whole process).
    #[cfg(test)]
    pub(crate) fn fail_syncs_after(&mut self, n: u64) {
        self.failpoint = FailPoint::after(n);
    }

    fn try_sync(&mut self) -> Result<()> {
        self.db.flush()?;
        if self.failpoint.fails_now() {
            return Err(io(
                std::io::Error::other(format!("injected by {FAILPOINT_FSYNC_ENV}")),
                "syncing",
                &self.log_path,
            ));
        }
        self.log_file
            .sync_data()
            .map_err(|e| io(e, "syncing", &self.log_path))?;
        self.sync_new_blobs()
    }

    fn sync_new_blobs(&mut self) -> Result<()> {
        let entries = match std::fs::read_dir(&self.blob_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(e, "listing", &self.blob_dir)),
        };
        let mut present = HashSet::new();
        let mut synced_any = false;
        for entry in entries {
            let name = entry
                .map_err(|e| io(e, "listing", &self.blob_dir))?
                .file_name();
            if !self.blobs_synced.contains(&name) {
                let path = self.blob_dir.join(&name);
                match File::open(&path) {
                    Ok(f) => f.sync_all().map_err(|e| io(e, "syncing", &path))?,
                    // sled removed it meanwhile (rewritten or garbage-collected).
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io(e, "opening", &path)),
                }
                synced_any = true;
            }
            present.insert(name);
        }
        if synced_any {
            File::open(&self.blob_dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io(e, "syncing", &self.blob_dir))?;
        }
        self.blobs_synced = present;
        Ok(())
    }
}

/// sled made durable in the background (issue 15). The state machine is applied without a
/// sync of its own (the raft log is synced, and a restart replays what sled lost), so this thread
/// flushes and syncs sled every `FLUSH_INTERVAL_MS`, or sooner when asked, and publishes the
/// applied index each flush covers: the raft log is compacted up to that index and never above
/// it (`driver/snapshots.rs`), so whatever sled loses in a crash is still in the log.
///
/// An applied index is read *before* the flush starts: its sled transaction had committed by
/// then (the state machine publishes it after), so the flush covers it. A failed sync is final
/// here too: `failure` reports it and the driver stops the replica.
pub struct Flusher {
    shared: Arc<FlushShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct FlushShared {
    durable: Mutex<Durable>,
    wake: Mutex<FlushWake>,
    cv: Condvar,
    durable_applied: AtomicU64,
    failed: AtomicBool,
    /// Tests only (`Flusher::hold`).
    held: AtomicBool,
}

#[derive(Default)]
struct FlushWake {
    wanted: bool,
    stop: bool,
    failure: Option<String>,
}

impl Flusher {
    /// Starts the thread. `applied` reads the state machine's applied index; the one given now
    /// is durable already (`Durable::open` synced).
    pub fn spawn(
        durable: Durable,
        applied_now: u64,
        applied: impl Fn() -> u64 + Send + 'static,
        name: String,
    ) -> Result<Flusher> {
        let shared = Arc::new(FlushShared {
            durable: Mutex::new(durable),
            wake: Mutex::new(FlushWake::default()),
            cv: Condvar::new(),
            durable_applied: AtomicU64::new(applied_now),
            failed: AtomicBool::new(false),
            held: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || s.run(applied))
            .map_err(|e| Error::Storage(format!("starting the sled flusher: {e}")))?;
        Ok(Flusher {
            shared,
            thread: Some(thread),
        })
    }

    /// The highest applied index whose effects are known to be on stable storage.
    pub fn durable_applied(&self) -> u64 {
        self.shared.durable_applied.load(Ordering::Acquire)
    }

    /// Asks for a flush soon (the log wants compacting).
    pub fn request(&self) {
        let mut w = self.shared.wake.lock().unwrap();
        if !w.wanted {
            w.wanted = true;
            self.shared.cv.notify_one();
        }
    }

    /// The first failed flush, if any.
    pub fn failure(&self) -> Option<String> {
        if !self.shared.failed.load(Ordering::Relaxed) {
            return None;
        }
        self.shared.wake.lock().unwrap().failure.clone()
    }

    /// Flushes on the caller's thread and waits until it is durable: `applied` is covered after
    /// it returns (a snapshot install, a clean stop).
    pub fn sync_now(&self, applied: u64) -> Result<()> {
        self.shared.durable.lock().unwrap().sync()?;
        self.shared
            .durable_applied
            .fetch_max(applied, Ordering::AcqRel);
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn fail_syncs_after(&self, n: u64) {
        self.shared.durable.lock().unwrap().fail_syncs_after(n);
    }

    /// Tests: while held, the thread flushes nothing (what a crash between flushes leaves).
    #[cfg(test)]
    pub(crate) fn hold(&self, held: bool) {
        self.shared.held.store(held, Ordering::Relaxed);
    }
}

impl FlushShared {
    fn run(&self, applied: impl Fn() -> u64) {
        let interval = Duration::from_millis(FLUSH_INTERVAL_MS);
        loop {
            {
                let mut w = self.wake.lock().unwrap();
                if !w.wanted && !w.stop {
                    w = self.cv.wait_timeout(w, interval).unwrap().0;
                }
                if w.stop {
                    return;
                }
                w.wanted = false;
            }
            if self.held.load(Ordering::Relaxed) {
                continue;
            }
            let index = applied();
            let synced = self.durable.lock().unwrap().sync();
            match synced {
                Ok(()) => {
                    self.durable_applied.fetch_max(index, Ordering::AcqRel);
                }
                Err(e) => {
                    tracing::error!(error = %e, "flushing sled failed; the replica stops");
                    self.wake.lock().unwrap().failure = Some(e.to_string());
                    self.failed.store(true, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.shared.wake.lock().unwrap().stop = true;
        self.shared.cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncs_the_log_and_new_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let mut d = Durable::open(db.clone(), dir.path()).unwrap();
        db.insert(b"small", b"x".to_vec()).unwrap();
        // Large enough to be stored as a blob file of its own.
        db.insert(b"large", vec![7u8; 512 * 1024]).unwrap();
        d.sync().unwrap();
        assert!(
            !d.blobs_synced.is_empty(),
            "the large value went to a blob file, which was synced"
        );
        let before = d.blobs_synced.clone();
        d.sync().unwrap();
        assert_eq!(d.blobs_synced, before, "nothing new to sync");
        drop(d);
        drop(db);
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        assert_eq!(db.get(b"large").unwrap().unwrap().len(), 512 * 1024);
    }

    /// H4 (fsyncgate): once a sync failed, no later sync may report success, and the error says
    /// what failed first.
    #[test]
    fn h4_failed_fsync_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let mut d = Durable::open(db.clone(), dir.path()).unwrap();
        d.failpoint = FailPoint::after(1);
        db.insert(b"a", b"1".to_vec()).unwrap();
        d.sync().expect("the first sync is allowed to succeed");
        db.insert(b"b", b"2".to_vec()).unwrap();
        let first = d.sync().expect_err("the failpoint fails the second sync");
        assert!(first.to_string().contains("injected"), "{first}");
        // The failure goes away; a naive retry would now succeed and hide the lost writes.
        d.failpoint.fail_after = None;
        for _ in 0..3 {
            let again = d
                .sync()
                .expect_err("a failed sync is never followed by success");
            let msg = again.to_string();
            assert!(
                msg.contains("earlier sync failed") && msg.contains("injected"),
                "{msg}"
            );
        }
        assert_eq!(
            d.failpoint.syncs, 2,
            "no sync was attempted after the failure"
        );
    }

    #[test]
    fn failpoint_values_parse_or_are_refused() {
        assert_eq!(parse_failpoint(None).unwrap(), None);
        assert_eq!(parse_failpoint(Some("after:7")).unwrap(), Some(7));
        assert!(parse_failpoint(Some("7")).is_err());
        assert!(parse_failpoint(Some("after:x")).is_err());
    }
}
