//! Raft's durable state in sled: the log (`raft_log`) and the hard state, conf state and
//! compaction point (`raft_state`). Implements raft-rs's `Storage` so the `RawNode` reads the log
//! straight from sled.
//!
//! Log entry layout: key `index (u64 BE)`, value `crc32 (u32 BE) | term (u64 BE) | entry`, where
//! `entry` is raft-rs's protobuf encoding and the checksum covers term and entry. Every read
//! verifies the checksum; a mismatch is reported with the index and never handed to raft.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use protobuf::Message as _;
use raft::prelude::*;
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::error::{Error, Result};
use crate::replica::watermark::Mark;

const HARD_STATE_KEY: &[u8] = b"hard_state";
const CONF_STATE_KEY: &[u8] = b"conf_state";
/// `(index u64 BE, term u64 BE)` of the last entry removed from the log (or covered by a snapshot).
const COMPACTED_KEY: &[u8] = b"compacted";
/// The group's replica addresses as this replica last knew them (`id=addr,...`, crc32 first):
/// membership changes carry the new node's address, and a restart must still reach it.
const PEER_ADDRS_KEY: &[u8] = b"peer_addrs";

/// Where the log of a group's founding replicas starts: as if a snapshot at this index, holding
/// the initial configuration, had been installed. Nothing below it exists anywhere, so a node that
/// joins later (empty log) can only catch up from a snapshot, which carries the configuration it
/// needs; replaying the log from 1 would not tell it who the founding voters are.
pub const BOOTSTRAP_INDEX: u64 = 5;
const BOOTSTRAP_TERM: u64 = 1;

/// The latest snapshot this node built or installed; raft-rs is handed only its metadata, the
/// data travels as a file (see `snapshot.rs`).
#[derive(Clone, Debug)]
pub struct SnapshotFile {
    pub metadata: SnapshotMetadata,
    pub path: std::path::PathBuf,
}

pub struct RaftStore {
    node_id: u64,
    log: sled::Tree,
    state: sled::Tree,
    hard_state: HardState,
    conf_state: ConfState,
    compacted_index: u64,
    compacted_term: u64,
    last_index: u64,
    /// The term of the entry at `last_index` (the compacted term when the log is empty).
    last_term: u64,
    latest_snapshot: Option<SnapshotFile>,
    /// Set by `snapshot()` when raft needs a snapshot that does not exist yet; the driver builds
    /// one at its applied index and clears the flag.
    snapshot_wanted: AtomicBool,
    /// The first checksum failure seen, if any: the driver stops the replica rather than let raft
    /// act on a log it cannot read.
    corruption: Mutex<Option<String>>,
}

fn storage_err(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

pub fn encode_entry(entry: &Entry) -> Vec<u8> {
    let body = entry.write_to_bytes().expect("raft entry encodes");
    let mut out = Vec::with_capacity(12 + body.len());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&entry.term.to_be_bytes());
    out.extend_from_slice(&body);
    let crc = crc32fast::hash(&out[4..]);
    out[..4].copy_from_slice(&crc.to_be_bytes());
    out
}

/// Verifies a stored log value; returns `(term, entry bytes)`.
fn verify_entry(node_id: u64, index: u64, raw: &[u8]) -> Result<(u64, &[u8])> {
    if raw.len() < 12 {
        return Err(Error::Corruption(format!(
            "node {node_id}, tree raft_log, index {index}: entry of {} bytes is shorter than its header",
            raw.len()
        )));
    }
    let stored = u32::from_be_bytes(raw[..4].try_into().unwrap());
    let actual = crc32fast::hash(&raw[4..]);
    if stored != actual {
        return Err(Error::Corruption(format!(
            "node {node_id}, tree raft_log, index {index}: crc32 mismatch (stored {stored:08x}, computed {actual:08x})"
        )));
    }
    Ok((
        u64::from_be_bytes(raw[4..12].try_into().unwrap()),
        &raw[12..],
    ))
}

pub fn decode_entry(node_id: u64, index: u64, raw: &[u8]) -> Result<Entry> {
    let (_, body) = verify_entry(node_id, index, raw)?;
    let mut e = Entry::default();
    e.merge_from_bytes(body).map_err(|err| {
        Error::Corruption(format!(
            "node {node_id}, tree raft_log, index {index}: entry does not decode: {err}"
        ))
    })?;
    if e.index != index {
        return Err(Error::Corruption(format!(
            "node {node_id}, tree raft_log, index {index}: entry claims index {}",
            e.index
        )));
    }
    Ok(e)
}

fn decode_proto<M: protobuf::Message>(raw: &[u8], what: &str) -> Result<M> {
    if raw.len() < 4 {
        return Err(Error::Corruption(format!(
            "tree raft_state, {what}: too short"
        )));
    }
    let stored = u32::from_be_bytes(raw[..4].try_into().unwrap());
    if stored != crc32fast::hash(&raw[4..]) {
        return Err(Error::Corruption(format!(
            "tree raft_state, {what}: crc32 mismatch"
        )));
    }
    let mut m = M::new();
    m.merge_from_bytes(&raw[4..])
        .map_err(|e| Error::Corruption(format!("tree raft_state, {what}: {e}")))?;
    Ok(m)
}

fn encode_proto<M: protobuf::Message>(m: &M) -> Vec<u8> {
    let body = m.write_to_bytes().expect("raft state encodes");
    let mut out = crc32fast::hash(&body).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

impl RaftStore {
    /// Whether `db` holds no raft state at all (a data dir never started).
    pub fn is_empty(db: &sled::Db) -> Result<bool> {
        Ok(db.open_tree("raft_state")?.is_empty() && db.open_tree("raft_log")?.is_empty())
    }

    /// Opens the raft trees of `db`. A node that has never run gets `initial_voters` as its
    /// configuration (the static initial cluster), its log starting after `BOOTSTRAP_INDEX`; with
    /// no initial voters (a node joining a running group) it starts empty and waits for the
    /// leader's snapshot. A node that has run keeps its stored state.
    pub fn open(db: &sled::Db, node_id: u64, initial_voters: &[u64]) -> Result<RaftStore> {
        let log = db.open_tree("raft_log")?;
        let state = db.open_tree("raft_state")?;
        if state.get(CONF_STATE_KEY)?.is_none() && !initial_voters.is_empty() {
            let cs = ConfState {
                voters: initial_voters.to_vec(),
                ..Default::default()
            };
            let hs = HardState {
                term: BOOTSTRAP_TERM,
                commit: BOOTSTRAP_INDEX,
                ..Default::default()
            };
            let mut compacted = BOOTSTRAP_INDEX.to_be_bytes().to_vec();
            compacted.extend_from_slice(&BOOTSTRAP_TERM.to_be_bytes());
            state.insert(HARD_STATE_KEY, encode_proto(&hs))?;
            state.insert(COMPACTED_KEY, compacted)?;
            state.insert(CONF_STATE_KEY, encode_proto(&cs))?;
        }
        let hard_state = match state.get(HARD_STATE_KEY)? {
            Some(raw) => decode_proto::<HardState>(&raw, "hard state")?,
            None => HardState::default(),
        };
        let conf_state = match state.get(CONF_STATE_KEY)? {
            Some(raw) => decode_proto::<ConfState>(&raw, "conf state")?,
            None => ConfState::default(),
        };
        let (compacted_index, compacted_term) = match state.get(COMPACTED_KEY)? {
            Some(raw) if raw.len() == 16 => (
                u64::from_be_bytes(raw[..8].try_into().unwrap()),
                u64::from_be_bytes(raw[8..].try_into().unwrap()),
            ),
            Some(_) => {
                return Err(Error::Corruption(
                    "tree raft_state, compacted: bad length".into(),
                ))
            }
            None => (0, 0),
        };
        let last_index =
            match log.last()? {
                Some((k, _)) => u64::from_be_bytes(k.as_ref().try_into().map_err(|_| {
                    Error::Corruption("tree raft_log: key is not a u64 index".into())
                })?),
                None => compacted_index,
            };
        let mut store = RaftStore {
            node_id,
            log,
            state,
            hard_state,
            conf_state,
            compacted_index,
            compacted_term,
            last_index,
            last_term: compacted_term,
            latest_snapshot: None,
            snapshot_wanted: AtomicBool::new(false),
            corruption: Mutex::new(None),
        };
        store.last_term = store.term_of(last_index)?;
        Ok(store)
    }

    /// Raft's durable state as the watermark records it (what the last sync made durable, when
    /// called right after one).
    pub fn mark(&self) -> Mark {
        Mark {
            term: self.hard_state.term,
            vote: self.hard_state.vote,
            commit: self.hard_state.commit,
            last_index: self.last_index,
            last_term: self.last_term,
        }
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    pub fn first_index_now(&self) -> u64 {
        self.compacted_index + 1
    }

    pub fn last_index_now(&self) -> u64 {
        self.last_index
    }

    /// Appends entries, replacing any conflicting suffix. Not flushed: the driver flushes once per Ready.
    pub fn append(&mut self, entries: &[Entry]) -> Result<()> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        assert!(
            first.index > self.compacted_index,
            "append at {} below the compacted index {}",
            first.index,
            self.compacted_index
        );
        let mut batch = sled::Batch::default();
        for stale in first.index..=self.last_index {
            batch.remove(&stale.to_be_bytes());
        }
        for e in entries {
            batch.insert(&e.index.to_be_bytes(), encode_entry(e));
        }
        self.log.apply_batch(batch)?;
        let last = entries.last().unwrap();
        (self.last_index, self.last_term) = (last.index, last.term);
        Ok(())
    }

    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<()> {
        self.state.insert(HARD_STATE_KEY, encode_proto(hs))?;
        self.hard_state = hs.clone();
        Ok(())
    }

    pub fn set_commit(&mut self, commit: u64) -> Result<()> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(&hs)
    }

    pub fn set_conf_state(&mut self, cs: &ConfState) -> Result<()> {
        self.state.insert(CONF_STATE_KEY, encode_proto(cs))?;
        self.conf_state = cs.clone();
        Ok(())
    }

    /// The replica addresses stored by `set_peer_addrs`, if any.
    pub fn peer_addrs(&self) -> Result<Option<BTreeMap<u64, String>>> {
        let Some(raw) = self.state.get(PEER_ADDRS_KEY)? else {
            return Ok(None);
        };
        let bad = |why: String| Error::Corruption(format!("tree raft_state, peer_addrs: {why}"));
        if raw.len() < 4
            || u32::from_be_bytes(raw[..4].try_into().unwrap()) != crc32fast::hash(&raw[4..])
        {
            return Err(bad("crc32 mismatch".into()));
        }
        let text = std::str::from_utf8(&raw[4..]).map_err(|e| bad(e.to_string()))?;
        let mut out = BTreeMap::new();
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (id, addr) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?}")))?;
            let id = id.parse().map_err(|_| bad(format!("{part:?}")))?;
            out.insert(id, addr.to_string());
        }
        Ok(Some(out))
    }

    /// Stores the replica addresses (not flushed: the next raft sync carries it).
    pub fn set_peer_addrs(&mut self, peers: &BTreeMap<u64, String>) -> Result<()> {
        let body = peers
            .iter()
            .map(|(id, addr)| format!("{id}={addr}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut v = crc32fast::hash(body.as_bytes()).to_be_bytes().to_vec();
        v.extend_from_slice(body.as_bytes());
        self.state.insert(PEER_ADDRS_KEY, v)?;
        Ok(())
    }

    fn set_compacted(&mut self, index: u64, term: u64) -> Result<()> {
        let mut v = index.to_be_bytes().to_vec();
        v.extend_from_slice(&term.to_be_bytes());
        self.state.insert(COMPACTED_KEY, v)?;
        self.compacted_index = index;
        self.compacted_term = term;
        Ok(())
    }

    /// Removes entries up to and including `to` (which must be applied). Returns how many went.
    pub fn compact(&mut self, to: u64) -> Result<u64> {
        if to <= self.compacted_index {
            return Ok(0);
        }
        assert!(
            to <= self.last_index,
            "compact to {to} past the last index {}",
            self.last_index
        );
        let term = self.term_of(to)?;
        let mut batch = sled::Batch::default();
        for i in self.compacted_index + 1..=to {
            batch.remove(&i.to_be_bytes());
        }
        let removed = to - self.compacted_index;
        // Record the new start first: a crash between the two leaves extra entries below it,
        // which are ignored, never a hole.
        self.set_compacted(to, term)?;
        self.log.apply_batch(batch)?;
        Ok(removed)
    }

    /// Replaces the log by a snapshot's position: everything up to `meta.index` is now covered by
    /// the snapshot's data, which the state machine has already installed.
    pub fn apply_snapshot(&mut self, meta: &SnapshotMetadata) -> Result<()> {
        let mut batch = sled::Batch::default();
        for item in self.log.iter().keys() {
            batch.remove(item?);
        }
        self.log.apply_batch(batch)?;
        self.set_compacted(meta.index, meta.term)?;
        (self.last_index, self.last_term) = (meta.index, meta.term);
        let mut hs = self.hard_state.clone();
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        self.set_hard_state(&hs)?;
        self.set_conf_state(meta.get_conf_state())?;
        Ok(())
    }

    /// After an interrupted snapshot install the state machine is empty again; so is the log,
    /// and the leader will send a snapshot anew. Term and vote stay: they are promises.
    pub fn reset_to_empty(&mut self) -> Result<()> {
        let mut batch = sled::Batch::default();
        for k in self.log.iter().keys() {
            batch.remove(k?);
        }
        self.log.apply_batch(batch)?;
        self.set_compacted(0, 0)?;
        (self.last_index, self.last_term) = (0, 0);
        self.set_commit(0)
    }

    pub fn set_latest_snapshot(&mut self, snap: SnapshotFile) {
        self.latest_snapshot = Some(snap);
    }

    pub fn latest_snapshot(&self) -> Option<&SnapshotFile> {
        self.latest_snapshot.as_ref()
    }

    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.swap(false, Ordering::Relaxed)
    }

    pub fn corruption(&self) -> Option<String> {
        self.corruption.lock().unwrap().clone()
    }

    fn note_corruption(&self, e: &Error) {
        tracing::error!(node = self.node_id, error = %e, "raft log corruption detected; this replica will stop");
        let mut c = self.corruption.lock().unwrap();
        if c.is_none() {
            *c = Some(e.to_string());
        }
    }

    fn term_of(&self, idx: u64) -> Result<u64> {
        if idx == self.compacted_index {
            return Ok(self.compacted_term);
        }
        let raw = self.log.get(idx.to_be_bytes())?.ok_or_else(|| {
            Error::Corruption(format!(
                "node {}, tree raft_log: entry {idx} is missing inside the log",
                self.node_id
            ))
        })?;
        Ok(verify_entry(self.node_id, idx, &raw)?.0)
    }

    /// Reads and verifies one entry (for tests and tools).
    #[cfg(test)]
    pub fn entry(&self, idx: u64) -> Result<Entry> {
        let raw = self
            .log
            .get(idx.to_be_bytes())?
            .ok_or_else(|| Error::Storage(format!("no entry {idx}")))?;
        decode_entry(self.node_id, idx, &raw)
    }
}

impl raft::Storage for RaftStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.compacted_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into().unwrap_or(u64::MAX);
        let mut out = Vec::with_capacity((high - low).min(1024) as usize);
        let mut size = 0u64;
        for item in self.log.range(low.to_be_bytes()..high.to_be_bytes()) {
            let (k, v) = item.map_err(storage_err)?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(storage_err)?);
            if idx != low + out.len() as u64 {
                let e = Error::Corruption(format!(
                    "node {}, tree raft_log: expected entry {} but found {idx}",
                    self.node_id,
                    low + out.len() as u64
                ));
                self.note_corruption(&e);
                return Err(storage_err(e));
            }
            let entry = decode_entry(self.node_id, idx, &v)
                .inspect_err(|e| self.note_corruption(e))
                .map_err(storage_err)?;
            size += entry.compute_size() as u64;
            // raft-rs's contract: always at least one entry, then stop before exceeding max_size.
            if !out.is_empty() && size > max_size {
                break;
            }
            out.push(entry);
        }
        if out.is_empty() && low < high {
            let e = Error::Corruption(format!(
                "node {}, tree raft_log: entries {low}..{high} are missing",
                self.node_id
            ));
            self.note_corruption(&e);
            return Err(storage_err(e));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx < self.compacted_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        self.term_of(idx)
            .inspect_err(|e| self.note_corruption(e))
            .map_err(storage_err)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.compacted_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        if let Some(s) = &self.latest_snapshot {
            // A node added after the snapshot was built is not in its configuration and would
            // refuse it: build a newer one.
            let cs = s.metadata.get_conf_state();
            let names_receiver = cs.voters.contains(&to) || cs.learners.contains(&to);
            if names_receiver
                && s.metadata.index >= request_index
                && s.metadata.index >= self.compacted_index
            {
                let mut snap = Snapshot::default();
                snap.set_metadata(s.metadata.clone());
                return Ok(snap);
            }
        }
        self.snapshot_wanted.store(true, Ordering::Relaxed);
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    /// A store whose log starts at 1 (the tests write their own entries from there).
    fn open(dir: &std::path::Path) -> (sled::Db, RaftStore) {
        let db = sled::open(dir).unwrap();
        let mut s = RaftStore::open(&db, 1, &[]).unwrap();
        if s.conf_state().voters.is_empty() {
            s.set_conf_state(&ConfState {
                voters: vec![1, 2, 3],
                ..Default::default()
            })
            .unwrap();
        }
        (db, s)
    }

    #[test]
    fn founders_start_after_the_bootstrap_index_and_joiners_start_empty() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("founder")).unwrap();
        let s = RaftStore::open(&db, 1, &[1, 2, 3]).unwrap();
        assert_eq!(s.first_index().unwrap(), BOOTSTRAP_INDEX + 1);
        assert_eq!(s.last_index().unwrap(), BOOTSTRAP_INDEX);
        assert_eq!(s.term(BOOTSTRAP_INDEX).unwrap(), BOOTSTRAP_TERM);
        assert_eq!(s.hard_state().commit, BOOTSTRAP_INDEX);
        assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
        // Entries below the start are compacted, so a leader sends a joiner a snapshot.
        assert!(matches!(
            s.entries(1, 2, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        drop(s);
        // Reopening keeps the stored state whatever voters are passed.
        let s = RaftStore::open(&db, 1, &[7]).unwrap();
        assert_eq!(s.conf_state().voters, vec![1, 2, 3]);

        let db = sled::open(dir.path().join("joiner")).unwrap();
        let s = RaftStore::open(&db, 4, &[]).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 0));
        assert!(s.conf_state().voters.is_empty() && s.conf_state().learners.is_empty());
    }

    #[test]
    fn peer_addresses_survive_reopen_and_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let (db, mut s) = open(dir.path());
        assert_eq!(s.peer_addrs().unwrap(), None);
        let peers: BTreeMap<u64, String> = [
            (1, "127.0.0.1:7001".to_string()),
            (4, "127.0.0.4:7004".to_string()),
        ]
        .into();
        s.set_peer_addrs(&peers).unwrap();
        drop(s);
        let s = RaftStore::open(&db, 1, &[]).unwrap();
        assert_eq!(s.peer_addrs().unwrap(), Some(peers));
        let state = db.open_tree("raft_state").unwrap();
        let mut raw = state.get(PEER_ADDRS_KEY).unwrap().unwrap().to_vec();
        *raw.last_mut().unwrap() ^= 1;
        state.insert(PEER_ADDRS_KEY, raw).unwrap();
        let err = s.peer_addrs().unwrap_err().to_string();
        assert!(err.contains("peer_addrs") && err.contains("crc32"), "{err}");
    }

    #[test]
    fn a_snapshot_that_does_not_name_the_receiver_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, mut s) = open(dir.path());
        let mut metadata = SnapshotMetadata::default();
        metadata.mut_conf_state().voters = vec![1, 2, 3];
        s.set_latest_snapshot(SnapshotFile {
            metadata,
            path: dir.path().join("x.snap"),
        });
        assert!(s.snapshot(0, 2).is_ok());
        assert!(!s.take_snapshot_wanted());
        assert!(
            s.snapshot(0, 4).is_err(),
            "node 4 is not in the snapshot's configuration"
        );
        assert!(s.take_snapshot_wanted());
    }

    #[test]
    fn append_truncates_conflicts_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (db, mut s) = open(dir.path());
            s.append(&[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")])
                .unwrap();
            s.append(&[entry(2, 2, b"B")]).unwrap();
            let hs = HardState {
                term: 2,
                commit: 2,
                ..Default::default()
            };
            s.set_hard_state(&hs).unwrap();
            db.flush().unwrap();
        }
        let (_db, s) = open(dir.path());
        assert_eq!(s.last_index().unwrap(), 2);
        assert_eq!(s.term(2).unwrap(), 2);
        let es = s
            .entries(1, 3, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            es.iter().map(|e| e.data.to_vec()).collect::<Vec<_>>(),
            vec![b"a".to_vec(), b"B".to_vec()]
        );
        assert_eq!(s.initial_state().unwrap().hard_state.commit, 2);
        assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
    }

    #[test]
    fn compaction_moves_the_first_index_and_keeps_the_term() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, mut s) = open(dir.path());
        let es: Vec<_> = (1..=10).map(|i| entry(i, 1 + i / 5, b"x")).collect();
        s.append(&es).unwrap();
        assert_eq!(s.compact(6).unwrap(), 6);
        assert_eq!(s.first_index().unwrap(), 7);
        assert_eq!(s.term(6).unwrap(), 2);
        assert!(matches!(
            s.term(5),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert!(matches!(
            s.entries(5, 8, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(
            s.entries(7, 11, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            4
        );
    }

    #[test]
    fn a_flipped_byte_in_a_stored_entry_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let (db, mut s) = open(dir.path());
        s.append(&[entry(1, 1, b"order-1 paid"), entry(2, 1, b"order-2 paid")])
            .unwrap();
        let log = db.open_tree("raft_log").unwrap();
        let mut raw = log.get(2u64.to_be_bytes()).unwrap().unwrap().to_vec();
        let last = raw.len() - 1;
        raw[last] ^= 0x01;
        log.insert(2u64.to_be_bytes(), raw).unwrap();

        let err = s
            .entries(1, 3, None, GetEntriesContext::empty(false))
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("raft_log") && msg.contains("index 2") && msg.contains("crc32"),
            "{msg}"
        );
        assert!(
            s.corruption().is_some(),
            "the driver must learn of the corruption"
        );
        assert!(matches!(s.entry(2), Err(Error::Corruption(_))));
        assert_eq!(s.entry(1).unwrap().data.as_ref(), b"order-1 paid");
    }
}
