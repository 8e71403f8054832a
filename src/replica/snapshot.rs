//! Snapshot files and their transfer.
//!
//! A snapshot is the state machine at one applied index, written by a builder thread while the
//! driver (the only writer of the state machine) applies nothing, so the copy is consistent, to
//! `<data-dir>/snap/<index>-<term>.snap`.
//! Layout: `MAGIC | index u64 | term u64 | records… | END | crc32 (u32)`, a record being
//! `tree u8 | len u32 | key | len u32 | value`, and the trailing crc32 covering everything before
//! it. On the wire the file travels in `SNAPSHOT_CHUNK_BYTES` pieces, each with its own crc32;
//! the receiver verifies each chunk as it arrives and the whole file before installing it.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"ORDOSNP1";
const END: u8 = 0xFF;
/// Record tags: which tree a record belongs to.
pub const TREE_DATA: u8 = 0;
pub const TREE_META: u8 = 1;

/// Largest key/value a record may declare: a corrupt length must not make us allocate gigabytes.
const RECORD_BYTES_MAX: u32 = 16 * 1024 * 1024;

pub fn file_name(dir: &Path, index: u64, term: u64) -> PathBuf {
    dir.join(format!("{index:020}-{term:020}.snap"))
}

/// Removes the snapshot files (`*.snap`) and partial files (`*.tmp`) an earlier run left in `dir`.
/// At start none is in use: raft asks for a new build when a follower needs one, and a leader
/// resends a snapshot this replica had received but not installed. Returns how many went.
pub fn remove_leftovers(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| io(e, dir))? {
        let path = entry.map_err(|e| io(e, dir))?.path();
        let ext = path.extension().and_then(|e| e.to_str());
        if path.is_file() && matches!(ext, Some("snap" | "tmp")) {
            std::fs::remove_file(&path).map_err(|e| io(e, &path))?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn io(e: std::io::Error, path: &Path) -> Error {
    Error::Storage(format!("snapshot file {}: {e}", path.display()))
}

/// Writes a snapshot file; records are fed by the caller.
pub struct Writer {
    out: BufWriter<File>,
    hasher: crc32fast::Hasher,
    tmp: PathBuf,
    path: PathBuf,
    pub records: u64,
}

impl Writer {
    /// Where a file is written before its atomic rename to `path`.
    pub fn tmp_path(path: &Path) -> PathBuf {
        path.with_extension("snap.tmp")
    }

    pub fn create(path: PathBuf, index: u64, term: u64) -> Result<Writer> {
        let tmp = Self::tmp_path(&path);
        let file = File::create(&tmp).map_err(|e| io(e, &tmp))?;
        let mut w = Writer {
            out: BufWriter::with_capacity(1 << 20, file),
            hasher: crc32fast::Hasher::new(),
            tmp,
            path,
            records: 0,
        };
        w.write(MAGIC)?;
        w.write(&index.to_be_bytes())?;
        w.write(&term.to_be_bytes())?;
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.out.write_all(bytes).map_err(|e| io(e, &self.tmp))
    }

    pub fn record(&mut self, tree: u8, key: &[u8], value: &[u8]) -> Result<()> {
        self.write(&[tree])?;
        self.write(&(key.len() as u32).to_be_bytes())?;
        self.write(key)?;
        self.write(&(value.len() as u32).to_be_bytes())?;
        self.write(value)?;
        self.records += 1;
        Ok(())
    }

    /// Seals the file (trailer, fsync, atomic rename) and returns its path.
    pub fn finish(mut self) -> Result<PathBuf> {
        self.write(&[END])?;
        let crc = self.hasher.clone().finalize();
        self.out
            .write_all(&crc.to_be_bytes())
            .map_err(|e| io(e, &self.tmp))?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| io(e.into_error(), &self.tmp))?;
        file.sync_all().map_err(|e| io(e, &self.tmp))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| io(e, &self.path))?;
        Ok(self.path)
    }
}

/// Checks a whole file's trailer checksum without keeping it in memory.
pub fn verify_file(path: &Path) -> Result<(u64, u64)> {
    let mut f = BufReader::new(File::open(path).map_err(|e| io(e, path))?);
    let len = std::fs::metadata(path).map_err(|e| io(e, path))?.len();
    if len < (MAGIC.len() + 16 + 1 + 4) as u64 {
        return Err(Error::Corruption(format!(
            "snapshot {}: too short ({len} bytes)",
            path.display()
        )));
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut remaining = len - 4;
    let mut buf = vec![0u8; 1 << 16];
    let mut header = Vec::with_capacity(24);
    while remaining > 0 {
        let n = (remaining as usize).min(buf.len());
        f.read_exact(&mut buf[..n]).map_err(|e| io(e, path))?;
        if header.len() < 24 {
            let take = (24 - header.len()).min(n);
            header.extend_from_slice(&buf[..take]);
        }
        hasher.update(&buf[..n]);
        remaining -= n as u64;
    }
    let mut crc = [0u8; 4];
    f.read_exact(&mut crc).map_err(|e| io(e, path))?;
    let (stored, actual) = (u32::from_be_bytes(crc), hasher.finalize());
    if stored != actual {
        return Err(Error::Corruption(format!(
            "snapshot {}: crc32 mismatch (stored {stored:08x}, computed {actual:08x})",
            path.display()
        )));
    }
    if &header[..8] != MAGIC {
        return Err(Error::Corruption(format!(
            "snapshot {}: bad magic",
            path.display()
        )));
    }
    Ok((
        u64::from_be_bytes(header[8..16].try_into().unwrap()),
        u64::from_be_bytes(header[16..24].try_into().unwrap()),
    ))
}

/// One entry of a snapshot file: the tree tag, the key and the value.
pub type SnapshotEntry = (u8, Vec<u8>, Vec<u8>);

/// Reads the records of a file that `verify_file` accepted.
pub struct Reader {
    input: BufReader<File>,
    path: PathBuf,
}

impl Reader {
    pub fn open(path: &Path) -> Result<Reader> {
        let mut input =
            BufReader::with_capacity(1 << 20, File::open(path).map_err(|e| io(e, path))?);
        let mut header = [0u8; 24];
        input.read_exact(&mut header).map_err(|e| io(e, path))?;
        Ok(Reader {
            input,
            path: path.to_path_buf(),
        })
    }

    fn read_len(&mut self) -> Result<usize> {
        let mut b = [0u8; 4];
        self.input
            .read_exact(&mut b)
            .map_err(|e| io(e, &self.path))?;
        let n = u32::from_be_bytes(b);
        if n > RECORD_BYTES_MAX {
            return Err(Error::Corruption(format!(
                "snapshot {}: record declares {n} bytes",
                self.path.display()
            )));
        }
        Ok(n as usize)
    }

    /// The next entry, or `None` at the end marker.
    pub fn next_record(&mut self) -> Result<Option<SnapshotEntry>> {
        let mut tag = [0u8; 1];
        self.input
            .read_exact(&mut tag)
            .map_err(|e| io(e, &self.path))?;
        if tag[0] == END {
            return Ok(None);
        }
        let klen = self.read_len()?;
        let mut key = vec![0; klen];
        self.input
            .read_exact(&mut key)
            .map_err(|e| io(e, &self.path))?;
        let vlen = self.read_len()?;
        let mut value = vec![0; vlen];
        self.input
            .read_exact(&mut value)
            .map_err(|e| io(e, &self.path))?;
        Ok(Some((tag[0], key, value)))
    }
}

/// The checksum a chunk carries: over the raft message (first chunk only) and the data.
pub fn chunk_crc(message: &[u8], data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(message);
    h.update(data);
    h.finalize()
}

/// Refuses a chunk whose checksum does not match what it carries.
pub fn verify_chunk(seq: u64, message: &[u8], data: &[u8], crc: u32) -> Result<()> {
    let actual = chunk_crc(message, data);
    if actual != crc {
        return Err(Error::Corruption(format!(
            "snapshot chunk {seq}: crc32 mismatch (sent {crc:08x}, computed {actual:08x}); snapshot refused"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> PathBuf {
        let mut w = Writer::create(file_name(dir, 42, 3), 42, 3).unwrap();
        w.record(TREE_DATA, b"k1", b"v1").unwrap();
        w.record(TREE_META, b"m", &[7; 1000]).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn a_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        assert_eq!(verify_file(&path).unwrap(), (42, 3));
        let mut r = Reader::open(&path).unwrap();
        assert_eq!(
            r.next_record().unwrap(),
            Some((TREE_DATA, b"k1".to_vec(), b"v1".to_vec()))
        );
        assert_eq!(r.next_record().unwrap().unwrap().2.len(), 1000);
        assert_eq!(r.next_record().unwrap(), None);
    }

    #[test]
    fn a_corrupted_file_or_chunk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[40] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let msg = verify_file(&path).unwrap_err().to_string();
        assert!(msg.contains("crc32 mismatch"), "{msg}");

        let crc = chunk_crc(b"msg", b"chunk data");
        assert!(verify_chunk(0, b"msg", b"chunk data", crc).is_ok());
        let msg = verify_chunk(3, b"msg", b"chunk dat\x00", crc)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("chunk 3") && msg.contains("refused"), "{msg}");
    }
}
