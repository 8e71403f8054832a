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

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub struct Durable {
    db: sled::Db,
    log_file: File,
    log_path: PathBuf,
    blob_dir: PathBuf,
    /// Blob files already synced (sled never rewrites a blob file in place).
    blobs_synced: HashSet<OsString>,
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
        };
        // Whatever an earlier run left unsynced is synced now, before raft relies on it.
        durable.sync()?;
        Ok(durable)
    }

    /// Writes everything sled holds in memory and waits until it is on stable storage.
    pub fn sync(&mut self) -> Result<()> {
        self.db.flush()?;
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
}
