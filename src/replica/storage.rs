//! Raft's durable state: the log and the hard state, conf state, compaction point and replica
//! addresses, as records of the raft log's own files (`wal`, issue 15), and implements raft-rs's
//! `Storage` over it. The live log (everything after the compaction point) is kept in memory,
//! bounded by the driver's compaction (`LOG_MEMORY_BYTES_MAX`); the files exist for recovery:
//! `open` replays them.
//!
//! Records (payloads): `Entries` = `(len u32 LE | raft-rs protobuf Entry)*`, contiguous indexes;
//! an `Entries` record that starts at or below the last index replaces the suffix from there (a
//! conflicting leader's entries). `HardState` = protobuf. `ConfState` = `conf index (u64 LE) |
//! protobuf`, the index of the entry (or snapshot) that set it. `Compacted` = `index | term` (u64
//! LE each): entries up to it are gone. `Reset` = `index | term | hard state length (u32 LE) | hard
//! state | conf state`: the whole log is replaced by a snapshot's position (or emptied, at 0). `PeerAddrs` = `id=addr,...`. Every record carries a
//! crc32 (`wal`); a record that fails it is never handed to raft.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use protobuf::Message as _;
use raft::prelude::*;
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::error::{Error, Result};
use crate::replica::wal::{Kind, Wal};
use crate::replica::watermark::Mark;

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

/// Raft's state apart from the entries (what a replay rebuilds, what a segment's head repeats).
#[derive(Default)]
struct Meta {
    hard_state: HardState,
    conf_state: ConfState,
    /// The index of the conf change (or snapshot) `conf_state` comes from.
    conf_index: u64,
    compacted_index: u64,
    compacted_term: u64,
    peer_addrs: Option<BTreeMap<u64, String>>,
}

pub struct RaftStore {
    node_id: u64,
    wal: Wal,
    meta: Meta,
    /// Entries `compacted_index + 1 ..= last_index`, in order.
    entries: VecDeque<Entry>,
    /// Their encoded bytes.
    entry_bytes: u64,
    latest_snapshot: Option<SnapshotFile>,
    /// Set by `snapshot()` when raft needs a snapshot that does not exist yet; the driver builds
    /// one at its applied index and clears the flag.
    snapshot_wanted: AtomicBool,
    /// The first inconsistency seen, if any: the driver stops the replica rather than let raft
    /// act on a log it cannot read.
    corruption: Mutex<Option<String>>,
}

fn u64_pair(raw: &[u8], what: &str) -> Result<(u64, u64)> {
    if raw.len() != 16 {
        return Err(Error::Corruption(format!("{what}: {} bytes", raw.len())));
    }
    Ok((
        u64::from_le_bytes(raw[..8].try_into().unwrap()),
        u64::from_le_bytes(raw[8..].try_into().unwrap()),
    ))
}

fn pair(a: u64, b: u64) -> Vec<u8> {
    let mut v = a.to_le_bytes().to_vec();
    v.extend_from_slice(&b.to_le_bytes());
    v
}

fn decode_proto<M: protobuf::Message>(raw: &[u8], what: &str) -> Result<M> {
    let mut m = M::new();
    m.merge_from_bytes(raw)
        .map_err(|e| Error::Corruption(format!("{what} does not decode: {e}")))?;
    Ok(m)
}

fn encode_entries(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.iter().map(|e| 4 + e.compute_size() as usize).sum());
    for e in entries {
        let len = e.compute_size();
        out.extend_from_slice(&len.to_le_bytes());
        e.write_to_vec(&mut out).expect("raft entry encodes");
    }
    out
}

fn decode_entries(mut raw: &[u8]) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        if raw.len() < 4 {
            return Err(Error::Corruption("entries: a length is cut short".into()));
        }
        let len = u32::from_le_bytes(raw[..4].try_into().unwrap()) as usize;
        let body = raw
            .get(4..4 + len)
            .ok_or_else(|| Error::Corruption("entries: an entry is cut short".into()))?;
        let e: Entry = decode_proto(body, "entry")?;
        if let Some(prev) = out.last().map(|p: &Entry| p.index) {
            if e.index != prev + 1 {
                return Err(Error::Corruption(format!(
                    "entries: index {} follows {prev}",
                    e.index
                )));
            }
        }
        out.push(e);
        raw = &raw[4 + len..];
    }
    Ok(out)
}

fn encode_peers(peers: &BTreeMap<u64, String>) -> Vec<u8> {
    peers
        .iter()
        .map(|(id, addr)| format!("{id}={addr}"))
        .collect::<Vec<_>>()
        .join(",")
        .into_bytes()
}

fn decode_peers(raw: &[u8]) -> Result<BTreeMap<u64, String>> {
    let bad = |why: String| Error::Corruption(format!("peer_addrs: {why}"));
    let text = std::str::from_utf8(raw).map_err(|e| bad(e.to_string()))?;
    let mut out = BTreeMap::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("{part:?}")))?;
        let id = id.parse().map_err(|_| bad(format!("{part:?}")))?;
        out.insert(id, addr.to_string());
    }
    Ok(out)
}

/// The state a replay builds, record by record.
#[derive(Default)]
struct Replay {
    meta: Meta,
    entries: VecDeque<Entry>,
    /// The index just before `entries[0]`: equal to the compacted index once the replay is
    /// whole; above it while a deleted segment's entries have not been compacted yet.
    base: u64,
}

impl Replay {
    fn last(&self) -> u64 {
        self.base + self.entries.len() as u64
    }

    /// Applies one record; returns the highest entry index it holds.
    fn record(&mut self, kind: Kind, raw: &[u8]) -> Result<u64> {
        match kind {
            Kind::Entries => {
                let es = decode_entries(raw)?;
                let (Some(first), Some(last)) = (es.first(), es.last()) else {
                    return Ok(0);
                };
                let (first, last) = (first.index, last.index);
                if first <= self.meta.compacted_index {
                    return Err(Error::Corruption(format!(
                        "entries from {first} are at or below the compacted index {}",
                        self.meta.compacted_index
                    )));
                }
                if first > self.last() + 1 || first <= self.base {
                    // The entries before them were in a deleted segment (a later Compacted
                    // record must cover them), or they replace every entry replayed so far.
                    self.entries.clear();
                    self.base = first - 1;
                } else {
                    self.entries.truncate((first - 1 - self.base) as usize);
                }
                self.entries.extend(es);
                Ok(last)
            }
            Kind::HardState => {
                self.meta.hard_state = decode_proto(raw, "hard state")?;
                Ok(0)
            }
            Kind::ConfState => {
                if raw.len() < 8 {
                    return Err(Error::Corruption("conf state: too short".into()));
                }
                self.meta.conf_index = u64::from_le_bytes(raw[..8].try_into().unwrap());
                self.meta.conf_state = decode_proto(&raw[8..], "conf state")?;
                Ok(0)
            }
            Kind::Compacted => {
                let (index, term) = u64_pair(raw, "compacted")?;
                while self.entries.front().is_some_and(|e| e.index <= index) {
                    self.entries.pop_front();
                }
                self.base = match self.entries.front() {
                    Some(e) => e.index - 1,
                    None => self.base.max(index),
                };
                (self.meta.compacted_index, self.meta.compacted_term) = (index, term);
                Ok(0)
            }
            Kind::Reset => {
                let short = || Error::Corruption("reset: too short".into());
                let (index, term) = u64_pair(raw.get(..16).ok_or_else(short)?, "reset")?;
                let hs_len = raw.get(16..20).ok_or_else(short)?;
                let hs_end = 20 + u32::from_le_bytes(hs_len.try_into().unwrap()) as usize;
                self.meta.hard_state =
                    decode_proto(raw.get(20..hs_end).ok_or_else(short)?, "reset")?;
                self.meta.conf_state = decode_proto(&raw[hs_end..], "reset")?;
                self.meta.conf_index = index;
                self.entries.clear();
                self.base = index;
                (self.meta.compacted_index, self.meta.compacted_term) = (index, term);
                Ok(0)
            }
            Kind::PeerAddrs => {
                self.meta.peer_addrs = Some(decode_peers(raw)?);
                Ok(0)
            }
        }
    }
}

impl RaftStore {
    /// Whether `data_dir` holds no raft state at all (a data dir never started).
    pub fn is_empty(data_dir: &Path) -> Result<bool> {
        Ok(!crate::replica::wal::exists(data_dir)?)
    }

    /// Opens (replays) the raft log under `data_dir`. A node that has never run gets
    /// `initial_voters` as its configuration (the static initial cluster), its log starting
    /// after `BOOTSTRAP_INDEX`; with no initial voters (a node joining a running group) it starts
    /// empty and waits for the leader's snapshot. A node that has run keeps its stored state.
    /// Nothing is written until the first change (see `Wal::open`).
    pub fn open(data_dir: &Path, node_id: u64, initial_voters: &[u64]) -> Result<RaftStore> {
        let mut replay = Replay::default();
        let wal = Wal::open(data_dir, |kind, raw| replay.record(kind, raw))?;
        if replay.base != replay.meta.compacted_index {
            return Err(Error::Corruption(format!(
                "raft log of node {node_id}: entries {}..={} are missing (compacted up to {})",
                replay.meta.compacted_index + 1,
                replay.base,
                replay.meta.compacted_index
            )));
        }
        let fresh = replay.meta.conf_state.voters.is_empty()
            && replay.meta.conf_state.learners.is_empty()
            && replay.meta.compacted_index == 0
            && replay.entries.is_empty();
        let entry_bytes = replay.entries.iter().map(|e| e.compute_size() as u64).sum();
        let mut store = RaftStore {
            node_id,
            wal,
            meta: replay.meta,
            entries: replay.entries,
            entry_bytes,
            latest_snapshot: None,
            snapshot_wanted: AtomicBool::new(false),
            corruption: Mutex::new(None),
        };
        if fresh && !initial_voters.is_empty() {
            store.set_compacted(BOOTSTRAP_INDEX, BOOTSTRAP_TERM)?;
            store.set_hard_state(&HardState {
                term: BOOTSTRAP_TERM,
                commit: BOOTSTRAP_INDEX,
                ..Default::default()
            })?;
            let cs = ConfState {
                voters: initial_voters.to_vec(),
                ..Default::default()
            };
            store.set_conf_state(&cs, BOOTSTRAP_INDEX)?;
        }
        Ok(store)
    }

    /// The records that open a new segment: the whole state but the entries.
    fn head(&self) -> Vec<(Kind, Vec<u8>)> {
        let m = &self.meta;
        let mut cs = m.conf_index.to_le_bytes().to_vec();
        cs.extend(m.conf_state.write_to_bytes().expect("conf state encodes"));
        let mut head = vec![
            (Kind::Compacted, pair(m.compacted_index, m.compacted_term)),
            (
                Kind::HardState,
                m.hard_state.write_to_bytes().expect("hard state encodes"),
            ),
            (Kind::ConfState, cs),
        ];
        if let Some(peers) = &m.peer_addrs {
            head.push((Kind::PeerAddrs, encode_peers(peers)));
        }
        head
    }

    /// Adds a record to the next sync; the first one after `open` begins a segment.
    fn record(&mut self, kind: Kind, payload: &[u8], max_index: u64) -> Result<()> {
        if !self.wal.has_active() {
            let head = self.head();
            self.wal.roll(&head)?;
        }
        self.wal.push(kind, payload, max_index);
        Ok(())
    }

    /// Makes everything recorded durable (one write and one `fdatasync`), beginning a new
    /// segment first when the open one is full.
    pub fn sync(&mut self) -> Result<()> {
        if self.wal.wants_roll() {
            let head = self.head();
            self.wal.roll(&head)?;
        }
        self.wal.sync()
    }

    #[cfg(test)]
    pub(crate) fn fail_syncs_after(&mut self, n: u64) {
        self.wal.fail_syncs_after(n);
    }

    fn last_term(&self) -> u64 {
        self.entries
            .back()
            .map_or(self.meta.compacted_term, |e| e.term)
    }

    /// Raft's durable state as the watermark records it (what the last sync made durable, when
    /// called right after one).
    pub fn mark(&self) -> Mark {
        let hs = &self.meta.hard_state;
        Mark {
            term: hs.term,
            vote: hs.vote,
            commit: hs.commit,
            last_index: self.last_index_now(),
            last_term: self.last_term(),
        }
    }

    pub fn hard_state(&self) -> &HardState {
        &self.meta.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.meta.conf_state
    }

    /// The index of the conf change (or snapshot) the conf state comes from: a conf change at or
    /// below it is already in `conf_state` (a restart replays entries sled had not kept).
    pub fn conf_index(&self) -> u64 {
        self.meta.conf_index
    }

    pub fn first_index_now(&self) -> u64 {
        self.meta.compacted_index + 1
    }

    pub fn last_index_now(&self) -> u64 {
        self.meta.compacted_index + self.entries.len() as u64
    }

    /// Bytes of the live log held in memory.
    pub fn log_bytes(&self) -> u64 {
        self.entry_bytes
    }

    /// Appends entries, replacing any conflicting suffix. Not synced: the driver syncs once per
    /// Ready.
    pub fn append(&mut self, entries: &[Entry]) -> Result<()> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(());
        };
        assert!(
            first.index > self.meta.compacted_index,
            "append at {} below the compacted index {}",
            first.index,
            self.meta.compacted_index
        );
        assert!(
            first.index <= self.last_index_now() + 1,
            "append at {} leaves a hole after {}",
            first.index,
            self.last_index_now()
        );
        self.record(Kind::Entries, &encode_entries(entries), last.index)?;
        let keep = (first.index - 1 - self.meta.compacted_index) as usize;
        for gone in self.entries.drain(keep..) {
            self.entry_bytes -= gone.compute_size() as u64;
        }
        for e in entries {
            self.entry_bytes += e.compute_size() as u64;
            self.entries.push_back(e.clone());
        }
        Ok(())
    }

    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<()> {
        let raw = hs.write_to_bytes().expect("hard state encodes");
        self.record(Kind::HardState, &raw, 0)?;
        self.meta.hard_state = hs.clone();
        Ok(())
    }

    pub fn set_commit(&mut self, commit: u64) -> Result<()> {
        let mut hs = self.meta.hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(&hs)
    }

    /// Records the configuration set by the conf change (or snapshot) at `index`.
    pub fn set_conf_state(&mut self, cs: &ConfState, index: u64) -> Result<()> {
        let mut raw = index.to_le_bytes().to_vec();
        raw.extend(cs.write_to_bytes().expect("conf state encodes"));
        self.record(Kind::ConfState, &raw, 0)?;
        self.meta.conf_state = cs.clone();
        self.meta.conf_index = index;
        Ok(())
    }

    /// The replica addresses stored by `set_peer_addrs`, if any.
    pub fn peer_addrs(&self) -> Result<Option<BTreeMap<u64, String>>> {
        Ok(self.meta.peer_addrs.clone())
    }

    /// Stores the replica addresses (not synced: the next raft sync carries it).
    pub fn set_peer_addrs(&mut self, peers: &BTreeMap<u64, String>) -> Result<()> {
        if self.meta.peer_addrs.as_ref() == Some(peers) {
            return Ok(());
        }
        self.record(Kind::PeerAddrs, &encode_peers(peers), 0)?;
        self.meta.peer_addrs = Some(peers.clone());
        Ok(())
    }

    fn set_compacted(&mut self, index: u64, term: u64) -> Result<()> {
        self.record(Kind::Compacted, &pair(index, term), 0)?;
        (self.meta.compacted_index, self.meta.compacted_term) = (index, term);
        Ok(())
    }

    /// Removes entries up to and including `to` (which must be applied, and durable in the
    /// state machine). Returns how many went. Their segments are deleted after the next sync.
    pub fn compact(&mut self, to: u64) -> Result<u64> {
        if to <= self.meta.compacted_index {
            return Ok(0);
        }
        assert!(
            to <= self.last_index_now(),
            "compact to {to} past the last index {}",
            self.last_index_now()
        );
        let term = self.term_of(to)?;
        let removed = to - self.meta.compacted_index;
        self.set_compacted(to, term)?;
        for gone in self.entries.drain(..removed as usize) {
            self.entry_bytes -= gone.compute_size() as u64;
        }
        self.wal.release_through(to);
        Ok(removed)
    }

    /// Replaces the whole log by `(index, term)` with `hs` and `cs` (set at `index`), in one
    /// record: a crash leaves either all of it or none. The record is synced at once and a new
    /// segment begins, so that every older one is deleted after the next sync.
    fn reset(&mut self, index: u64, term: u64, hs: HardState, cs: ConfState) -> Result<()> {
        let mut raw = pair(index, term);
        let hs_raw = hs.write_to_bytes().expect("hard state encodes");
        raw.extend_from_slice(&(hs_raw.len() as u32).to_le_bytes());
        raw.extend(hs_raw);
        raw.extend(cs.write_to_bytes().expect("conf state encodes"));
        self.record(Kind::Reset, &raw, 0)?;
        self.entries.clear();
        self.entry_bytes = 0;
        (self.meta.compacted_index, self.meta.compacted_term) = (index, term);
        (self.meta.hard_state, self.meta.conf_state) = (hs, cs);
        self.meta.conf_index = index;
        let head = self.head();
        self.wal.roll(&head)?;
        self.wal.release_sealed();
        Ok(())
    }

    /// Replaces the log by a snapshot's position: everything up to `meta.index` is now covered by
    /// the snapshot's data, which the state machine has already installed (and synced). Durable
    /// when it returns.
    pub fn apply_snapshot(&mut self, meta: &SnapshotMetadata) -> Result<()> {
        let mut hs = self.meta.hard_state.clone();
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        self.reset(meta.index, meta.term, hs, meta.get_conf_state().clone())
    }

    /// After an interrupted snapshot install the state machine is empty again; so is the log,
    /// and the leader will send a snapshot anew. Term and vote stay: they are promises; the
    /// configuration stays too (the replica still knows its group).
    pub fn reset_to_empty(&mut self) -> Result<()> {
        let mut hs = self.meta.hard_state.clone();
        hs.commit = 0;
        let cs = self.meta.conf_state.clone();
        self.reset(0, 0, hs, cs)
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
        tracing::error!(node = self.node_id, error = %e, "raft log inconsistency detected; this replica will stop");
        let mut c = self.corruption.lock().unwrap();
        if c.is_none() {
            *c = Some(e.to_string());
        }
    }

    fn term_of(&self, idx: u64) -> Result<u64> {
        if idx == self.meta.compacted_index {
            return Ok(self.meta.compacted_term);
        }
        self.entry_at(idx).map(|e| e.term)
    }

    fn entry_at(&self, idx: u64) -> Result<&Entry> {
        let pos = idx.checked_sub(self.meta.compacted_index + 1);
        match pos.and_then(|p| self.entries.get(p as usize)) {
            Some(e) if e.index == idx => Ok(e),
            found => Err(Error::Corruption(format!(
                "node {}, raft log: entry {idx} is {}",
                self.node_id,
                match found {
                    Some(e) => format!("stored as index {}", e.index),
                    None => "missing inside the log".into(),
                }
            ))),
        }
    }
}

impl raft::Storage for RaftStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.meta.hard_state.clone(),
            conf_state: self.meta.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.meta.compacted_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index_now() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into().unwrap_or(u64::MAX);
        let mut out = Vec::with_capacity((high - low).min(1024) as usize);
        let mut size = 0u64;
        for idx in low..high {
            let entry = self
                .entry_at(idx)
                .inspect_err(|e| self.note_corruption(e))
                .map_err(|e| raft::Error::Store(StorageError::Other(e.to_string().into())))?;
            size += entry.compute_size() as u64;
            // raft-rs's contract: always at least one entry, then stop before exceeding max_size.
            if !out.is_empty() && size > max_size {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx < self.meta.compacted_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index_now() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        self.term_of(idx)
            .inspect_err(|e| self.note_corruption(e))
            .map_err(|e| raft::Error::Store(StorageError::Other(e.to_string().into())))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.meta.compacted_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index_now())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        if let Some(s) = &self.latest_snapshot {
            // A node added after the snapshot was built is not in its configuration and would
            // refuse it: build a newer one.
            let cs = s.metadata.get_conf_state();
            let names_receiver = cs.voters.contains(&to) || cs.learners.contains(&to);
            if names_receiver
                && s.metadata.index >= request_index
                && s.metadata.index >= self.meta.compacted_index
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
mod tests;
