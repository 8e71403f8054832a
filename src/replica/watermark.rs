//! Protocol-aware recovery (audit H5): a small file beside sled, `<data-dir>/raft.watermark`,
//! records the raft state last known to be durable (term, vote, commit, and the index and term of
//! the last log entry), and a start refuses to open a sled whose raft state is behind it.
//!
//! Why: sled treats a corrupt message anywhere in its log as a torn tail and recovers the prefix
//! before it, silently. A replica would come back with an older term or vote and a shorter log
//! than it had synced: it could vote twice in one term, or lose entries a leader counted as
//! acknowledged. The watermark lives outside sled's log, so the same fault does not erase both.
//!
//! **Never ahead of sled.** A mark is recorded only after the sync that made it durable, so
//! a healthy sled is always at or past the watermark and a start never refuses one by mistake.
//! The comparison follows what raft can legitimately undo: term and commit never go down; the
//! vote of a term never changes; the log may lose entries only to a conflicting leader's, whose
//! term is higher, so `(last term, last index)` never goes down either. The one destructive step,
//! installing a snapshot (a cut-short install resets the replica to an empty log), lowers the
//! watermark first ([`Watermark::write`] with [`Mark::before_install`]).
//!
//! **Cost.** One write of 512 bytes and an `fdatasync` of this small preallocated file. A change
//! of term or vote is written at once, before the vote or the new term's messages go out; a log or
//! commit that only moved on is written at most once per `WATERMARK_INTERVAL_MS`, not per raft
//! sync, so a write does not pay a second fsync. What lags is the detection of the newest entries
//! (at most that interval), never its correctness.
//!
//! **Layout.** Two 512-byte slots (sectors), written alternately; each holds `MAGIC | seq | term |
//! vote | commit | last_index | last_term | crc32`, all u64 big-endian but the crc. Reading takes
//! the valid slot with the higher `seq`: a write torn by a crash spoils only its own slot, and the
//! other holds the previous mark, which is still true. The file is created whole (temporary file,
//! fsync, rename, directory fsync), so it either exists with a valid slot or not at all.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::limits::WATERMARK_INTERVAL_MS;

pub const FILE_NAME: &str = "raft.watermark";
const MAGIC: &[u8; 8] = b"ORDOWM01";
const SLOT_BYTES: usize = 512;
const RECORD_BYTES: usize = 8 + 6 * 8 + 4;

/// Raft's durable state as the watermark records it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mark {
    pub term: u64,
    pub vote: u64,
    pub commit: u64,
    pub last_index: u64,
    pub last_term: u64,
}

impl Mark {
    /// What an install of a snapshot may leave if it is cut short: the same term and vote, an
    /// empty log and commit 0 (`node.rs` resets such a replica).
    pub fn before_install(self) -> Mark {
        Mark {
            commit: 0,
            last_index: 0,
            last_term: 0,
            ..self
        }
    }

    /// How `now` (what sled holds) falls behind `self` (what was durable before), if it does.
    fn behind(&self, now: &Mark) -> Option<String> {
        if now.term < self.term {
            return Some(format!(
                "term {} but term {} was synced",
                now.term, self.term
            ));
        }
        if now.term == self.term && self.vote != 0 && now.vote != self.vote {
            return Some(format!(
                "vote {} in term {} but vote {} was synced",
                now.vote, now.term, self.vote
            ));
        }
        if now.commit < self.commit {
            return Some(format!(
                "commit index {} but {} was synced",
                now.commit, self.commit
            ));
        }
        if (now.last_term, now.last_index) < (self.last_term, self.last_index) {
            return Some(format!(
                "log ending at index {} (term {}) but it had synced up to index {} (term {})",
                now.last_index, now.last_term, self.last_index, self.last_term
            ));
        }
        None
    }

    fn encode(&self, seq: u64) -> [u8; SLOT_BYTES] {
        let mut slot = [0u8; SLOT_BYTES];
        slot[..8].copy_from_slice(MAGIC);
        let fields = [
            seq,
            self.term,
            self.vote,
            self.commit,
            self.last_index,
            self.last_term,
        ];
        for (i, v) in fields.iter().enumerate() {
            slot[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_be_bytes());
        }
        let crc = crc32fast::hash(&slot[..RECORD_BYTES - 4]);
        slot[RECORD_BYTES - 4..RECORD_BYTES].copy_from_slice(&crc.to_be_bytes());
        slot
    }

    /// `(seq, mark)` of a valid slot.
    fn decode(slot: &[u8]) -> Option<(u64, Mark)> {
        let crc = u32::from_be_bytes(slot[RECORD_BYTES - 4..RECORD_BYTES].try_into().ok()?);
        if &slot[..8] != MAGIC || crc != crc32fast::hash(&slot[..RECORD_BYTES - 4]) {
            return None;
        }
        let field = |i: usize| u64::from_be_bytes(slot[8 + i * 8..16 + i * 8].try_into().unwrap());
        let mark = Mark {
            term: field(1),
            vote: field(2),
            commit: field(3),
            last_index: field(4),
            last_term: field(5),
        };
        Some((field(0), mark))
    }
}

fn io(e: std::io::Error, what: &str, path: &Path) -> Error {
    Error::Storage(format!("{what} {}: {e}", path.display()))
}

/// The newest valid `(seq, mark)` of the watermark in `dir`; `None` if there is no file.
fn read(dir: &Path) -> Result<Option<(u64, Mark)>> {
    let path = dir.join(FILE_NAME);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e, "reading", &path)),
    };
    if bytes.len() != 2 * SLOT_BYTES {
        return Err(Error::Corruption(format!(
            "watermark {}: {} bytes, expected {}",
            path.display(),
            bytes.len(),
            2 * SLOT_BYTES
        )));
    }
    let newest = bytes
        .chunks(SLOT_BYTES)
        .filter_map(Mark::decode)
        .max_by_key(|(seq, _)| *seq);
    match newest {
        Some(found) => Ok(Some(found)),
        None => Err(Error::Corruption(format!(
            "watermark {}: neither slot is valid",
            path.display()
        ))),
    }
}

/// Refuses to start on a sled whose raft state (`now`) is behind the watermark found in `dir`,
/// and on one that holds raft state (`sled_was_empty` false) while the watermark is missing.
/// Returns the watermark to keep up to date from here on (created when it was missing).
pub fn check_and_open(dir: &Path, now: Mark, sled_was_empty: bool) -> Result<Watermark> {
    let path = dir.join(FILE_NAME);
    let advice = "the node refuses to start rather than forget votes or acknowledged entries; \
                  replace this replica (`ordoctl replica replace`, a new node with an empty data \
                  dir) and inspect the disk";
    match read(dir)? {
        Some((seq, found)) => {
            if let Some(why) = found.behind(&now) {
                return Err(Error::Corruption(format!(
                    "sled's raft state is behind the watermark {}: {why} (sled: {now:?}; \
                     watermark: {found:?}); sled lost writes it had synced (a torn or corrupt \
                     log); {advice}",
                    path.display()
                )));
            }
            Watermark::open(path, seq, found)
        }
        None if sled_was_empty => Watermark::create(path),
        None => Err(Error::Corruption(format!(
            "watermark {} is missing but sled holds raft state ({now:?}): the file was removed, \
             or this data dir was made by an Ordo version before watermarks, so there is no \
             record to check sled against; {advice}",
            path.display()
        ))),
    }
}

/// The watermark file, open for updates (see the module doc for when each mark is written).
pub struct Watermark {
    file: File,
    path: PathBuf,
    seq: u64,
    written: Mark,
    /// A durable mark not written yet because the last write is too recent.
    pending: Option<Mark>,
    last_write: Instant,
}

impl Watermark {
    fn create(path: PathBuf) -> Result<Watermark> {
        let tmp = path.with_extension("tmp");
        let mut bytes = Mark::default().encode(0).to_vec();
        bytes.resize(2 * SLOT_BYTES, 0);
        let mut f = File::create(&tmp).map_err(|e| io(e, "creating", &tmp))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| io(e, "writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(|e| io(e, "renaming", &tmp))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(e, "syncing", dir))?;
        Watermark::open(path, 0, Mark::default())
    }

    fn open(path: PathBuf, seq: u64, written: Mark) -> Result<Watermark> {
        let file = File::options()
            .write(true)
            .open(&path)
            .map_err(|e| io(e, "opening", &path))?;
        Ok(Watermark {
            file,
            path,
            seq,
            written,
            pending: None,
            last_write: Instant::now(),
        })
    }

    /// Records `mark`, raft's state just made durable: written at once if its term or vote
    /// changed, else at most once per `WATERMARK_INTERVAL_MS` (the rest by `flush_due`).
    pub fn record(&mut self, mark: Mark) -> Result<()> {
        let vote_changed = (mark.term, mark.vote) != (self.written.term, self.written.vote);
        if vote_changed || self.due() {
            self.write(mark)
        } else {
            self.pending = (mark != self.written).then_some(mark);
            Ok(())
        }
    }

    /// Writes the pending mark once the interval since the last write has passed.
    pub fn flush_due(&mut self) -> Result<()> {
        match self.pending {
            Some(mark) if self.due() => self.write(mark),
            _ => Ok(()),
        }
    }

    fn due(&self) -> bool {
        self.last_write.elapsed() >= Duration::from_millis(WATERMARK_INTERVAL_MS)
    }

    /// Writes `mark` now (unless it is what the file holds) and waits until it is durable.
    pub fn write(&mut self, mark: Mark) -> Result<()> {
        self.pending = None;
        if mark == self.written {
            return Ok(());
        }
        let seq = self.seq + 1;
        let offset = (seq % 2) * SLOT_BYTES as u64;
        self.file
            .write_all_at(&mark.encode(seq), offset)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io(e, "writing", &self.path))?;
        self.seq = seq;
        self.written = mark;
        self.last_write = Instant::now();
        Ok(())
    }

    /// The mark the file holds.
    #[cfg(test)]
    pub fn written(&self) -> Mark {
        self.written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(term: u64, vote: u64, commit: u64, last_index: u64, last_term: u64) -> Mark {
        Mark {
            term,
            vote,
            commit,
            last_index,
            last_term,
        }
    }

    #[test]
    fn h5_sled_behind_the_watermark_is_refused_and_raft_moves_are_not() {
        let synced = mark(5, 2, 100, 120, 5);
        // What raft may legitimately do after a sync: move on, or lose uncommitted entries to a
        // newer leader's (a higher last term), or learn a newer term.
        for ok in [
            synced,
            mark(5, 2, 100, 130, 5),
            mark(6, 0, 100, 101, 6),
            mark(7, 3, 110, 110, 6),
        ] {
            assert_eq!(synced.behind(&ok), None, "{ok:?}");
        }
        for (bad, needle) in [
            (mark(4, 2, 100, 120, 5), "term 4"),
            (mark(5, 3, 100, 120, 5), "vote 3"),
            (mark(5, 0, 100, 120, 5), "vote 0"),
            (mark(5, 2, 99, 120, 5), "commit index 99"),
            (mark(5, 2, 100, 119, 5), "index 119"),
            (mark(5, 2, 100, 200, 4), "term 4"),
        ] {
            let why = synced
                .behind(&bad)
                .unwrap_or_else(|| panic!("{bad:?} passed"));
            assert!(why.contains(needle), "{why}");
        }
    }

    #[test]
    fn h5_the_newest_valid_slot_wins_and_a_missing_file_is_refused_unless_sled_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let some = mark(3, 1, 40, 41, 3);
        let err = check_and_open(dir.path(), some, false).err().unwrap();
        assert!(err.to_string().contains("is missing"), "{err}");
        let mut w = check_and_open(dir.path(), Mark::default(), true).unwrap();
        w.write(mark(3, 1, 40, 41, 3)).unwrap();
        w.write(mark(3, 1, 50, 51, 3)).unwrap();
        assert_eq!(read(dir.path()).unwrap().unwrap().1, mark(3, 1, 50, 51, 3));
        // A torn write of the newest slot leaves the previous mark.
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        let newest = (read(dir.path()).unwrap().unwrap().0 % 2) as usize * SLOT_BYTES;
        bytes[newest + 20] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read(dir.path()).unwrap().unwrap().1, some);
        let err = check_and_open(dir.path(), mark(3, 1, 40, 40, 3), false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("behind the watermark") && err.contains("index 40"),
            "{err}"
        );
    }

    #[test]
    fn a_vote_is_written_at_once_and_log_progress_at_most_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = check_and_open(dir.path(), Mark::default(), true).unwrap();
        w.record(mark(2, 1, 0, 0, 0)).unwrap();
        assert_eq!(
            w.written(),
            mark(2, 1, 0, 0, 0),
            "a new vote is written at once"
        );
        w.record(mark(2, 1, 6, 6, 2)).unwrap();
        assert_eq!(w.written(), mark(2, 1, 0, 0, 0), "log progress waits");
        w.last_write -= Duration::from_millis(WATERMARK_INTERVAL_MS);
        w.flush_due().unwrap();
        assert_eq!(w.written(), mark(2, 1, 6, 6, 2), "and is written once due");
        assert_eq!(read(dir.path()).unwrap().unwrap().1, mark(2, 1, 6, 6, 2));
    }
}
