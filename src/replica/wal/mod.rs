//! The raft log's own files (issue 15): an append-only sequence of segment files under
//! `<data-dir>/raft/`, one `fdatasync` per batch, deletion by whole segments. The state machine
//! stays in sled and is no longer synced per write: a restart replays the committed entries above
//! the applied index sled kept (`node.rs`), and the log is compacted only below the applied index
//! the background flusher has made durable (`durable.rs`).
//!
//! **Files.** `raft/<seq:016x>.wal`, `seq` growing by one per segment. A segment starts with
//! `MAGIC | seq (u64 LE)` and holds records: `len (u32 LE) | crc32 (u32 LE) | kind (u8) | payload`,
//! `len` counting kind and payload, the crc covering the segment's `seq`, the kind and the payload
//! (so bytes of another segment never pass as this one's). A zero `len` ends a segment.
//!
//! **What it means** is the store's business (`storage.rs`): this module knows records, not raft.
//! Each segment begins with the whole raft state of its moment (`head`), so a segment can be
//! deleted once every entry in it is compacted; replay starts at the oldest segment left.
//!
//! **Failures.** A bad record in the newest segment is a torn tail (a write the crash cut short):
//! replay stops there, and the first write after the open truncates the file at that offset and
//! starts a new segment. Whether what was lost had been synced is for the watermark to say
//! (`watermark.rs`): the node refuses to start if so. A bad record in an older segment is
//! corruption: the open fails, naming the file and the offset. The first failed write or sync is
//! final (fail-stop, as in `durable.rs`).

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::replica::durable::FailPoint;

#[cfg(test)]
mod tests;

/// The folder under the data dir.
pub const DIR_NAME: &str = "raft";
const MAGIC: &[u8; 8] = b"ORDOWAL1";
const SEGMENT_HEADER: u64 = 16;
const RECORD_HEADER: usize = 9;
/// A segment past this size is closed and a new one begun.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// No record is larger (a batch of entries is at most a few MiB; see `limits.rs`).
const RECORD_BYTES_MAX: usize = 256 << 20;

/// What a record holds; the payload's layout is the store's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Entries = 1,
    HardState = 2,
    ConfState = 3,
    Compacted = 4,
    Reset = 5,
    PeerAddrs = 6,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Entries,
            2 => Kind::HardState,
            3 => Kind::ConfState,
            4 => Kind::Compacted,
            5 => Kind::Reset,
            6 => Kind::PeerAddrs,
            _ => return None,
        })
    }
}

struct Segment {
    seq: u64,
    path: PathBuf,
    /// The highest entry index any record of it holds (0: none).
    max_index: u64,
}

struct Active {
    seg: Segment,
    file: File,
    len: u64,
}

/// The segment files of one replica's raft log, open for appending.
pub struct Wal {
    dir: PathBuf,
    /// Closed segments, oldest first.
    sealed: Vec<Segment>,
    /// None until the first write after `open` (which begins a new segment).
    active: Option<Active>,
    /// Where the newest segment found at open stops being readable, if before its end.
    torn: Option<(PathBuf, u64)>,
    next_seq: u64,
    buf: Vec<u8>,
    buf_max_index: u64,
    /// Closed segments whose entries are all at or below this index are deleted after the next
    /// sync (which makes the record that compacted them durable).
    release_through: u64,
    /// Closed segments with a seq below this are deleted after the next sync.
    release_seq: u64,
    failed: Option<String>,
    failpoint: FailPoint,
    segment_bytes: u64,
}

fn io(e: std::io::Error, what: &str, path: &Path) -> Error {
    Error::Storage(format!("{what} {}: {e}", path.display()))
}

fn crc(seq: u64, kind: u8, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&[kind]);
    h.update(payload);
    h.finalize()
}

fn segment_name(seq: u64) -> String {
    format!("{seq:016x}.wal")
}

/// The segment files in `dir`, by seq.
fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(e, "listing", dir)),
    };
    for entry in entries {
        let path = entry.map_err(|e| io(e, "listing", dir))?.path();
        let seq = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".wal"))
            .and_then(|n| u64::from_str_radix(n, 16).ok());
        if let Some(seq) = seq {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Whether `data_dir` holds any raft log.
pub fn exists(data_dir: &Path) -> Result<bool> {
    Ok(!list(&data_dir.join(DIR_NAME))?.is_empty())
}

/// How reading one segment ended.
enum End {
    /// At the end of the file or at a zero length.
    Clean,
    /// At a record that does not read; the offset where it starts, and why.
    Bad(u64, String),
}

/// Reads the records of one segment in order, handing each to `f`, which returns the highest
/// entry index in it (0 for none).
fn read_segment(
    seq: u64,
    path: &Path,
    f: &mut impl FnMut(Kind, &[u8]) -> Result<u64>,
) -> Result<(End, u64)> {
    let bytes = std::fs::read(path).map_err(|e| io(e, "reading", path))?;
    let mut max_index = 0;
    if bytes.len() < SEGMENT_HEADER as usize
        || &bytes[..8] != MAGIC
        || u64::from_le_bytes(bytes[8..16].try_into().unwrap()) != seq
    {
        let why = "the segment header is missing or names another segment".to_string();
        return Ok((End::Bad(0, why), 0));
    }
    let mut at = SEGMENT_HEADER as usize;
    loop {
        if bytes.len() - at < RECORD_HEADER {
            let rest = &bytes[at..];
            return Ok(match rest.iter().all(|b| *b == 0) {
                true => (End::Clean, max_index),
                false => (
                    End::Bad(at as u64, "a record header is cut short".into()),
                    max_index,
                ),
            });
        }
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 {
            return Ok((End::Clean, max_index));
        }
        let stored = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap());
        let body_at = at + 8;
        if len > RECORD_BYTES_MAX || bytes.len() - body_at < len {
            let why = format!("a record of {len} bytes runs past the end of the file");
            return Ok((End::Bad(at as u64, why), max_index));
        }
        let (kind, payload) = (bytes[body_at], &bytes[body_at + 1..body_at + len]);
        if crc(seq, kind, payload) != stored {
            return Ok((End::Bad(at as u64, "crc32 mismatch".into()), max_index));
        }
        let Some(kind) = Kind::from_u8(kind) else {
            return Ok((
                End::Bad(at as u64, format!("unknown record kind {kind}")),
                max_index,
            ));
        };
        let index = f(kind, payload)
            .map_err(|e| Error::Corruption(format!("{} at offset {at}: {e}", path.display())))?;
        max_index = max_index.max(index);
        at = body_at + len;
    }
}

impl Wal {
    /// Opens the log under `data_dir`, replaying every record through `f` in the order written.
    /// Writes nothing: a torn tail is cut only by the first write (after the caller has checked
    /// what the replay found against the watermark).
    pub fn open(data_dir: &Path, mut f: impl FnMut(Kind, &[u8]) -> Result<u64>) -> Result<Wal> {
        let dir = data_dir.join(DIR_NAME);
        let files = list(&dir)?;
        let mut sealed = Vec::with_capacity(files.len());
        let mut torn = None;
        let last = files.len().saturating_sub(1);
        for (i, (seq, path)) in files.iter().enumerate() {
            let (end, max_index) = read_segment(*seq, path, &mut f)?;
            if let End::Bad(offset, why) = end {
                if i != last {
                    return Err(Error::Corruption(format!(
                        "raft log segment {} is unreadable at offset {offset} ({why}) and newer \
                         segments follow it: this is not a torn write but a damaged disk",
                        path.display()
                    )));
                }
                tracing::warn!(segment = %path.display(), offset, why = %why,
                    "the raft log's newest segment ends in a torn write; it is cut there");
                torn = Some((path.clone(), offset));
            }
            sealed.push(Segment {
                seq: *seq,
                path: path.clone(),
                max_index,
            });
        }
        let next_seq = files.last().map_or(1, |(seq, _)| seq + 1);
        Ok(Wal {
            dir,
            sealed,
            active: None,
            torn,
            next_seq,
            buf: Vec::new(),
            buf_max_index: 0,
            release_through: 0,
            release_seq: 0,
            failed: None,
            failpoint: FailPoint::from_env()?,
            segment_bytes: SEGMENT_BYTES,
        })
    }

    /// Tests: make every sync after the next `n` fail.
    #[cfg(test)]
    pub(crate) fn fail_syncs_after(&mut self, n: u64) {
        self.failpoint = FailPoint::after(n);
    }

    /// Tests: roll segments sooner.
    #[cfg(test)]
    pub(crate) fn set_segment_bytes(&mut self, n: u64) {
        self.segment_bytes = n;
    }

    /// Adds a record to the next write. `max_index` is the highest entry index it holds (0: none).
    pub fn push(&mut self, kind: Kind, payload: &[u8], max_index: u64) {
        let seq = self.active.as_ref().map_or(self.next_seq, |a| a.seg.seq);
        self.push_for(seq, kind, payload);
        self.buf_max_index = self.buf_max_index.max(max_index);
    }

    fn push_for(&mut self, seq: u64, kind: Kind, payload: &[u8]) {
        let len = u32::try_from(payload.len() + 1).expect("a record under 4 GiB");
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf
            .extend_from_slice(&crc(seq, kind as u8, payload).to_le_bytes());
        self.buf.push(kind as u8);
        self.buf.extend_from_slice(payload);
    }

    /// Whether the open segment is full: the store then calls `roll` with its state.
    pub fn wants_roll(&self) -> bool {
        self.active
            .as_ref()
            .is_some_and(|a| a.len >= self.segment_bytes)
    }

    /// Whether a segment is open for writing (none is until the first `roll` after `open`).
    pub fn has_active(&self) -> bool {
        self.active.is_some()
    }

    /// Deletes every closed segment after the next sync (the log was reset: the open segment's
    /// head holds all that is left).
    pub fn release_sealed(&mut self) {
        if let Some(a) = &self.active {
            self.release_seq = a.seg.seq;
        }
    }

    /// Deletes, after the next sync, the closed segments whose entries are all at or below
    /// `index` (a compaction or a snapshot covers them).
    pub fn release_through(&mut self, index: u64) {
        self.release_through = self.release_through.max(index);
    }

    /// Closes the open segment (after writing what is pending into it) and begins a new one
    /// whose first records are `head`, the store's whole state. `head` is written by the next
    /// sync. Also the first write after `open`: it cuts a torn tail and begins a segment.
    pub fn roll(&mut self, head: &[(Kind, Vec<u8>)]) -> Result<()> {
        self.check_failed()?;
        let r = self.try_roll(head);
        if let Err(e) = &r {
            self.failed = Some(e.to_string());
        }
        r
    }

    fn try_roll(&mut self, head: &[(Kind, Vec<u8>)]) -> Result<()> {
        if self.active.is_some() {
            self.write_and_sync()?;
        }
        if let Some((path, offset)) = self.torn.take() {
            if offset < SEGMENT_HEADER {
                // Not even its header is readable: nothing of it counts.
                std::fs::remove_file(&path).map_err(|e| io(e, "deleting", &path))?;
                self.sealed.retain(|s| s.path != path);
            } else {
                let f = File::options()
                    .write(true)
                    .open(&path)
                    .map_err(|e| io(e, "opening", &path))?;
                f.set_len(offset)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| io(e, "cutting the torn tail of", &path))?;
            }
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| io(e, "creating", &self.dir))?;
        let seq = self.next_seq;
        let path = self.dir.join(segment_name(seq));
        let tmp = path.with_extension("tmp");
        let mut file = File::create(&tmp).map_err(|e| io(e, "creating", &tmp))?;
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&seq.to_le_bytes());
        file.write_all(&header)
            .and_then(|()| file.sync_all())
            .map_err(|e| io(e, "writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(|e| io(e, "renaming", &tmp))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(e, "syncing", &self.dir))?;
        if let Some(old) = self.active.take() {
            self.sealed.push(old.seg);
        }
        self.next_seq = seq + 1;
        self.active = Some(Active {
            seg: Segment {
                seq,
                path,
                max_index: 0,
            },
            file,
            len: SEGMENT_HEADER,
        });
        // Records pushed before the roll were checksummed for another seq: none are pending
        // (written above), and an open without a segment had none to write.
        self.buf.clear();
        for (kind, payload) in head {
            self.push_for(seq, *kind, payload);
        }
        Ok(())
    }

    /// Writes everything pushed and waits until it is on stable storage; then deletes the
    /// segments released. After a failure, returns it again (fail-stop).
    pub fn sync(&mut self) -> Result<()> {
        self.check_failed()?;
        let r = self.write_and_sync().and_then(|()| self.delete_released());
        if let Err(e) = &r {
            self.failed = Some(e.to_string());
        }
        r
    }

    fn check_failed(&self) -> Result<()> {
        match &self.failed {
            Some(first) => Err(Error::Storage(format!(
                "an earlier raft log write failed, so nothing written since is known to be \
                 durable: {first}"
            ))),
            None => Ok(()),
        }
    }

    fn write_and_sync(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let active = self
            .active
            .as_mut()
            .expect("the store rolls a segment before its first write");
        active
            .file
            .write_all_at(&self.buf, active.len)
            .map_err(|e| io(e, "writing", &active.seg.path))?;
        if self.failpoint.fails_now() {
            return Err(io(
                std::io::Error::other(format!(
                    "injected by {}",
                    crate::replica::durable::FAILPOINT_FSYNC_ENV
                )),
                "syncing",
                &active.seg.path,
            ));
        }
        active
            .file
            .sync_data()
            .map_err(|e| io(e, "syncing", &active.seg.path))?;
        active.len += self.buf.len() as u64;
        active.seg.max_index = active.seg.max_index.max(self.buf_max_index);
        self.buf.clear();
        self.buf_max_index = 0;
        Ok(())
    }

    fn delete_released(&mut self) -> Result<()> {
        // Only once the open segment's head is durable does it stand for what is deleted.
        if self.active.is_none() {
            return Ok(());
        }
        let (through, below_seq) = (self.release_through, self.release_seq);
        let mut deleted = false;
        while let Some(oldest) = self.sealed.first() {
            if oldest.max_index > through && oldest.seq >= below_seq {
                break;
            }
            let seg = self.sealed.remove(0);
            match std::fs::remove_file(&seg.path) {
                Ok(()) => deleted = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(e, "deleting", &seg.path)),
            }
            tracing::debug!(segment = %seg.path.display(), "raft log segment deleted");
        }
        if deleted {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io(e, "syncing", &self.dir))?;
        }
        Ok(())
    }

    /// Segments on disk.
    #[cfg(test)]
    pub fn segments(&self) -> usize {
        self.sealed.len() + usize::from(self.active.is_some())
    }
}
