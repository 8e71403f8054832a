//! Online resharding inside one group's state machine (a child module of `state`).
//!
//! Donor side: `BEGIN` records an outgoing migration (`migout/<id>` in the sys tree) and from
//! then on every write to one of its slots is also appended, in the same sled transaction, to its
//! change log (`miglog/<id>/<raft index>/<seq>` → `key | value`, an empty value for a delete).
//! `FENCE` refuses every later request for the slots with `SlotMoving`, so the log is complete
//! at the fence index. The log has a byte cap, counted at apply (`Out::log_bytes`): a write
//! past it is not logged and the migration is overflowed, which refuses every later step but
//! `END` with RESOURCE_EXHAUSTED (the move must abort). `TRIM` deletes the prefix the recipient
//! has replayed; `END` drops the record and the fence, and deletes the log; both delete at most
//! `MIGRATION_LOG_DELETE_MAX` log entries per raft entry and are repeated until done. All of it
//! is replicated state (raft entries, part of snapshots), so a new donor leader serves the same
//! log.
//!
//! Recipient side: `INGEST` writes copied records as they are, versions included, in the order the
//! driver sends them (the slots' items first, then the change log from its start, in log order):
//! replaying a suffix again converges to the same state, so a retried chunk is harmless.
//! `CLEAR` deletes a bounded number of items of slots that the group neither owns nor moves out.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::Ordering;

use ordo_proto::v1::{MigrateOutRequest, MigratePullResponse, MigrateStep, MigrationRecord};
use sled::transaction::{
    ConflictableTransactionError, TransactionalTree, UnabortableTransactionError,
};
use sled::Transactional;

use super::{tx_err, Command, Outcome, StateMachine, APPLIED_KEY};
use crate::error::{Error, Result};
use crate::limits::{MIGRATION_LOG_BYTES_MAX, MIGRATION_LOG_DELETE_MAX};
use crate::state::{keys, participant};

const OUT_PREFIX: &[u8] = b"migout/";
const LOG_PREFIX: &[u8] = b"miglog/";
/// Most items one `CLEAR` entry deletes.
pub const CLEAR_ITEMS_MAX: u32 = 4096;

/// An outgoing migration as the donor group knows it.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Out {
    slots: Vec<u32>,
    /// Raft index of the fence; 0 = not fenced.
    fence_index: u64,
    /// Bytes the change log holds now (keys and values of its entries, counted at apply, so
    /// every replica counts alike), and its cap.
    log_bytes: u64,
    log_bytes_max: u64,
    /// A write was not logged because of the cap: the log is incomplete, the move must abort.
    overflowed: bool,
}

/// `fence_index | log_bytes | log_bytes_max | overflowed (1 byte) | slots`.
const OUT_HEADER_BYTES: usize = 8 * 3 + 1;

impl Out {
    fn encode(&self) -> Vec<u8> {
        let mut v = self.fence_index.to_be_bytes().to_vec();
        v.extend_from_slice(&self.log_bytes.to_be_bytes());
        v.extend_from_slice(&self.log_bytes_max.to_be_bytes());
        v.push(self.overflowed as u8);
        for s in &self.slots {
            v.extend_from_slice(&s.to_be_bytes());
        }
        v
    }

    fn decode(raw: &[u8]) -> Result<Out> {
        if raw.len() < OUT_HEADER_BYTES || !(raw.len() - OUT_HEADER_BYTES).is_multiple_of(4) {
            return Err(Error::Corruption(format!(
                "tree sys, migration record of {} bytes",
                raw.len()
            )));
        }
        let u64_at = |at: usize| u64::from_be_bytes(raw[at..at + 8].try_into().unwrap());
        Ok(Out {
            fence_index: u64_at(0),
            log_bytes: u64_at(8),
            log_bytes_max: u64_at(16),
            overflowed: raw[24] != 0,
            slots: raw[OUT_HEADER_BYTES..]
                .chunks(4)
                .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
                .collect(),
        })
    }

    /// The refusal of any step but END once the log overflowed its cap.
    fn overflow(&self, id: u64) -> Option<Error> {
        self.overflowed.then(|| {
            Error::ResourceExhausted(format!(
                "migration {id}: its change log reached its cap of {} bytes \
                 (MIGRATION_LOG_BYTES_MAX is {MIGRATION_LOG_BYTES_MAX}) before the recipient \
                 replayed it, so it no longer holds every write; abort the move",
                self.log_bytes_max
            ))
        })
    }
}

fn out_key(id: u64) -> Vec<u8> {
    [OUT_PREFIX, &id.to_be_bytes()].concat()
}

fn log_prefix(id: u64) -> Vec<u8> {
    [LOG_PREFIX, &id.to_be_bytes()].concat()
}

fn log_key(id: u64, index: u64, seq: u32) -> Vec<u8> {
    [
        LOG_PREFIX,
        &id.to_be_bytes(),
        &index.to_be_bytes(),
        &seq.to_be_bytes(),
    ]
    .concat()
}

fn encode_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    [&(key.len() as u32).to_be_bytes(), key, value].concat()
}

fn decode_record(raw: &[u8]) -> Result<(&[u8], &[u8])> {
    let bad = || {
        Error::Corruption(format!(
            "tree sys, change-log record of {} bytes",
            raw.len()
        ))
    };
    let len = u32::from_be_bytes(raw.get(..4).ok_or_else(bad)?.try_into().unwrap()) as usize;
    let key = raw.get(4..4 + len).ok_or_else(bad)?;
    Ok((key, &raw[4 + len..]))
}

/// The group's outgoing migrations, and which slot belongs to which.
#[derive(Default, Debug)]
pub struct Moving {
    out: BTreeMap<u64, Out>,
    by_slot: HashMap<u32, u64>,
}

impl Moving {
    pub fn load(sys: &sled::Tree) -> Result<Moving> {
        let mut m = Moving::default();
        for kv in sys.scan_prefix(OUT_PREFIX) {
            let (k, v) = kv?;
            let id = u64::from_be_bytes(k[OUT_PREFIX.len()..].try_into().map_err(|_| {
                Error::Corruption("tree sys, migration record key of the wrong length".into())
            })?);
            m.insert(id, Out::decode(&v)?);
        }
        Ok(m)
    }

    fn insert(&mut self, id: u64, out: Out) {
        for s in &out.slots {
            self.by_slot.insert(*s, id);
        }
        self.out.insert(id, out);
    }

    /// The new log sizes an apply transaction committed.
    pub(super) fn update_logs(&mut self, changed: Vec<(u64, Out)>) {
        for (id, out) in changed {
            self.out.insert(id, out);
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(out) = self.out.remove(&id) {
            for s in out.slots {
                self.by_slot.remove(&s);
            }
        }
    }

    /// `SlotMoving` when `slot` is fenced by a migration.
    pub fn fenced(&self, slot: u32) -> Option<Error> {
        let id = *self.by_slot.get(&slot)?;
        (self.out[&id].fence_index != 0).then_some(Error::SlotMoving {
            slot,
            migration_id: id,
        })
    }

    fn is_moving(&self, slot: u32) -> bool {
        self.by_slot.contains_key(&slot)
    }

    /// The refusal of a new cross-group lock in `slot` while it is moving out (begun, fenced or
    /// not): a transaction must not be split by a move.
    pub fn moving_out(&self, slot: u32) -> Option<Error> {
        let id = *self.by_slot.get(&slot)?;
        Some(Error::SlotMoving {
            slot,
            migration_id: id,
        })
    }

    /// The slots of migration `id`.
    pub(crate) fn slots_of(&self, id: u64) -> Vec<u32> {
        self.by_slot
            .iter()
            .filter(|(_, m)| **m == id)
            .map(|(s, _)| *s)
            .collect()
    }
}

/// Appends writes to moving slots to their migration's change log, inside the apply transaction,
/// up to the log's byte cap.
pub struct LogWriter<'a> {
    sys: &'a TransactionalTree,
    moving: &'a Moving,
    index: u64,
    seq: u32,
    /// The migrations whose log this transaction changed, as it leaves them.
    changed: BTreeMap<u64, Out>,
}

impl<'a> LogWriter<'a> {
    pub fn new(sys: &'a TransactionalTree, moving: &'a Moving) -> Self {
        LogWriter {
            sys,
            moving,
            index: 0,
            seq: 0,
            changed: BTreeMap::new(),
        }
    }

    /// Stores the new sizes of the logs this transaction wrote to (in it); returns them, for
    /// `Moving::update_logs` once it commits.
    pub(super) fn finish(
        self,
    ) -> std::result::Result<Vec<(u64, Out)>, UnabortableTransactionError> {
        for (id, out) in &self.changed {
            self.sys.insert(out_key(*id), out.encode())?;
        }
        Ok(self.changed.into_iter().collect())
    }

    pub fn at_index(&mut self, index: u64) {
        self.index = index;
        self.seq = 0;
    }

    /// `value` empty = the item was deleted. A write that would take the log past its cap is
    /// not logged and marks the migration overflowed (it must abort).
    pub fn record(&mut self, slot: u32, key: &[u8], value: &[u8]) -> Result<()> {
        let Some(&id) = self.moving.by_slot.get(&slot) else {
            return Ok(());
        };
        let moving = self.moving;
        let out = self
            .changed
            .entry(id)
            .or_insert_with(|| moving.out[&id].clone());
        if out.overflowed {
            return Ok(());
        }
        let (k, v) = (log_key(id, self.index, self.seq), encode_record(key, value));
        let size = (k.len() + v.len()) as u64;
        if out.log_bytes + size > out.log_bytes_max {
            out.overflowed = true;
            tracing::warn!(
                migration = id,
                cap = out.log_bytes_max,
                "the change log reached its cap; the move will be aborted"
            );
            return Ok(());
        }
        self.sys.insert(k, v).map_err(tx_err)?;
        out.log_bytes += size;
        self.seq += 1;
        Ok(())
    }
}

/// Forgets every migration record and change log (a snapshot install brings its own).
pub fn clear_sys(sys: &sled::Tree) -> Result<()> {
    for prefix in [OUT_PREFIX, LOG_PREFIX] {
        let mut batch = sled::Batch::default();
        for k in sys.scan_prefix(prefix).keys() {
            batch.remove(k?);
        }
        sys.apply_batch(batch)?;
    }
    Ok(())
}

/// The refusal of a BEGIN asking for a log cap over the node's.
pub fn log_cap_refusal(asked: u64) -> Error {
    Error::InvalidArgument(format!(
        "a change-log cap of {asked} bytes is over MIGRATION_LOG_BYTES_MAX \
         ({MIGRATION_LOG_BYTES_MAX})"
    ))
}

/// Why a slot cannot be fenced yet (the mover retries while the message says "locked").
pub fn busy_slot(slot: u32) -> String {
    format!(
        "slot {slot} has items locked by an unfinished cross-group transaction; fence again once \
         it finishes"
    )
}

/// Checks a copied record before it is proposed or applied: a data key (an item or a slot's
/// reserved record), and a value that passes its checksum (or is empty: a delete).
pub fn check_record(r: &MigrationRecord, slot_count: u32) -> Result<u32> {
    let slot = match keys::decode_reserved(&r.key) {
        Some((slot, _, _)) => slot,
        None => {
            keys::decode_key(&r.key)
                .map_err(|e| Error::InvalidArgument(format!("migration record: {e}")))?
                .0
        }
    };
    if slot >= slot_count {
        return Err(Error::InvalidArgument(format!(
            "migration record for slot {slot}, but there are {slot_count} slots"
        )));
    }
    if !r.value.is_empty() {
        keys::decode_value(&r.key, &r.value)
            .map_err(|e| Error::InvalidArgument(format!("migration record: {e}")))?;
    }
    Ok(slot)
}

type Applied = Result<Result<Outcome>>;

/// A donor step's answer: the index it took effect at.
fn step_done(index: u64) -> Applied {
    Ok(Ok(Outcome::Migration {
        index,
        deleted: 0,
        done: true,
    }))
}

impl StateMachine {
    fn mark_applied(&self, index: u64) -> Result<()> {
        self.sys.insert(APPLIED_KEY, &index.to_be_bytes())?;
        self.applied.store(index, Ordering::Release);
        Ok(())
    }

    /// Applies a migration command on its own (like an ownership change). A refused command
    /// changes nothing but the applied index.
    pub(super) fn apply_migration(
        &self,
        index: u64,
        cmd: &Command,
        stamp: Option<super::Stamp>,
    ) -> Applied {
        let r = match cmd {
            Command::MigrateOut(req) => self.apply_out(index, req, stamp)?,
            Command::MigrateIngest(req) => self.apply_ingest(index, &req.records)?,
            Command::MigrateClear(req) => self.apply_clear(index, &req.slots, req.items_max)?,
            other => unreachable!("not a migration command: {other:?}"),
        };
        if r.is_err() {
            self.mark_applied(index)?;
        }
        Ok(r)
    }

    fn apply_out(
        &self,
        index: u64,
        req: &MigrateOutRequest,
        stamp: Option<super::Stamp>,
    ) -> Applied {
        // The view first, as every apply path that writes `moving` takes them: a reader (a
        // change-feed page) holds the view while it reads `moving`.
        let _w = self.view.write().unwrap();
        let mut moving = self.moving.write().unwrap();
        // A fence freezes the resolved time of its slots: change-feed readers look again.
        self.feed_tips.bump();
        match MigrateStep::try_from(req.step) {
            Ok(MigrateStep::Begin) => self.out_begin(index, req, &mut moving),
            Ok(MigrateStep::Fence) => self.out_fence(index, req.migration_id, &mut moving, stamp),
            Ok(MigrateStep::End) => self.out_end(index, req.migration_id, &mut moving),
            Ok(MigrateStep::Trim) => self.out_trim(index, req, &mut moving),
            _ => Ok(Err(Error::InvalidArgument(format!(
                "unknown migration step {}",
                req.step
            )))),
        }
    }

    /// BEGIN: from this entry on, every write to the slots is also written to the change log.
    fn out_begin(&self, index: u64, req: &MigrateOutRequest, moving: &mut Moving) -> Applied {
        let id = req.migration_id;
        if moving.out.contains_key(&id) {
            self.mark_applied(index)?;
            return step_done(index);
        }
        let ownership = self.ownership.read().unwrap();
        if req.slots.is_empty() {
            return Ok(Err(Error::InvalidArgument(
                "a migration needs slots".into(),
            )));
        }
        for &s in &req.slots {
            if s >= self.slot_count || !ownership.owns(s) {
                return Ok(Err(Error::FailedPrecondition(format!(
                    "group does not own slot {s}; it cannot be moved out of it"
                ))));
            }
            if let Some(other) = moving.by_slot.get(&s) {
                return Ok(Err(Error::FailedPrecondition(format!(
                    "slot {s} is already moving out in migration {other}"
                ))));
            }
        }
        if req.log_bytes_max > MIGRATION_LOG_BYTES_MAX {
            return Ok(Err(log_cap_refusal(req.log_bytes_max)));
        }
        let mut slots = req.slots.clone();
        slots.sort_unstable();
        slots.dedup();
        let out = Out {
            slots,
            fence_index: 0,
            log_bytes: 0,
            log_bytes_max: match req.log_bytes_max {
                0 => MIGRATION_LOG_BYTES_MAX,
                cap => cap,
            },
            overflowed: false,
        };
        self.save_out(index, id, out, moving)?;
        tracing::info!(
            node = self.node_id,
            migration = id,
            "migration began: change log on"
        );
        step_done(index)
    }

    /// Stores an outgoing migration's new state with the applied index, then serves by it.
    fn save_out(&self, index: u64, id: u64, out: Out, moving: &mut Moving) -> Result<()> {
        let mut batch = sled::Batch::default();
        batch.insert(out_key(id), out.encode());
        batch.insert(APPLIED_KEY, &index.to_be_bytes());
        self.sys.apply_batch(batch)?;
        self.applied.store(index, Ordering::Release);
        moving.insert(id, out);
        Ok(())
    }

    /// FENCE: the slots refuse every request from this entry on (`SlotMoving`).
    fn out_fence(
        &self,
        index: u64,
        id: u64,
        moving: &mut Moving,
        stamp: Option<super::Stamp>,
    ) -> Applied {
        let Some(out) = moving.out.get(&id).cloned() else {
            return Ok(Err(Error::FailedPrecondition(format!(
                "no migration {id} on this group (never begun, or ended)"
            ))));
        };
        if out.fence_index != 0 {
            self.mark_applied(index)?;
            return step_done(out.fence_index);
        }
        if let Some(e) = out.overflow(id) {
            return Ok(Err(e));
        }
        // Writes are refused once fenced, so a transaction holding items here could not
        // finish on this side of the move: fence only once no item is locked and no part is
        // kept (no new lock is taken in a moving slot; the leader's resolver ends orphans).
        if let Some(slot) = moving
            .slots_of(id)
            .into_iter()
            .find(|&s| participant::slot_busy(&self.data, s))
        {
            return Ok(Err(Error::FailedPrecondition(busy_slot(slot))));
        }
        let out = self.fence_feed(index, id, &out, moving, stamp)?;
        moving.insert(id, out);
        tracing::info!(node = self.node_id, migration = id, index, "slots fenced");
        step_done(index)
    }

    /// The fence's sled transaction: the record, fenced, with the applied index and the fence's
    /// effective time, and the change feed's floor of every slot raised to that time (through
    /// the change log, so the recipient gets it): the slots' resolved time here freezes below
    /// it, and the recipient's events of them come after it whatever its clock says.
    fn fence_feed(
        &self,
        index: u64,
        id: u64,
        out: &Out,
        moving: &Moving,
        stamp: Option<super::Stamp>,
    ) -> Result<Out> {
        let (out, ts) = (&self.data, &self.sys)
            .transaction(|(data, sys)| {
                let abort = ConflictableTransactionError::Abort;
                let last =
                    super::read_u64(sys.get(super::FEED_TS_KEY)?, "feed_ts").map_err(abort)?;
                let ts = super::feed::next_ts(last, stamp);
                let mut view = super::TxView {
                    data,
                    slot_count: self.slot_count,
                    node_id: self.node_id,
                    log: LogWriter::new(sys, moving),
                    ages: &self.lock_ages,
                    locks: 0,
                    aged: Vec::new(),
                    feed: Default::default(),
                    notices: Vec::new(),
                };
                view.log.at_index(index);
                for &slot in &out.slots {
                    let meta = view.feed_meta(slot).map_err(abort)?;
                    meta.floor_ts = meta.floor_ts.max(ts);
                }
                view.finish_feed().map_err(abort)?;
                let logged = view.log.finish()?.into_iter().find(|(m, _)| *m == id);
                let fenced = Out {
                    fence_index: index,
                    ..logged.map_or_else(|| out.clone(), |(_, o)| o)
                };
                sys.insert(out_key(id), fenced.encode())?;
                sys.insert(APPLIED_KEY, &index.to_be_bytes())?;
                sys.insert(super::FEED_TS_KEY, &ts.to_be_bytes())?;
                Ok((fenced, ts))
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Abort(e) => e,
                sled::transaction::TransactionError::Storage(e) => Error::from(e),
            })?;
        self.applied.store(index, Ordering::Release);
        self.feed_ts.store(ts, Ordering::Release);
        Ok(out)
    }

    /// END: the record and the fence go, and the change log is deleted, at most
    /// `MIGRATION_LOG_DELETE_MAX` entries per END (the driver repeats it until `done`).
    fn out_end(&self, index: u64, id: u64, moving: &mut Moving) -> Applied {
        let mut batch = sled::Batch::default();
        batch.remove(out_key(id));
        let (deleted, more) = self.delete_log(&mut batch, id, None)?;
        batch.insert(APPLIED_KEY, &index.to_be_bytes());
        self.sys.apply_batch(batch)?;
        self.applied.store(index, Ordering::Release);
        if moving.out.contains_key(&id) {
            moving.remove(id);
            tracing::info!(
                node = self.node_id,
                migration = id,
                "migration ended on the donor"
            );
        }
        Ok(Ok(Outcome::Migration {
            index,
            deleted: deleted.len() as u64,
            done: !more,
        }))
    }

    /// TRIM: the log up to the recipient's replay position goes, in bounded entries, and no
    /// longer counts against the cap.
    fn out_trim(&self, index: u64, req: &MigrateOutRequest, moving: &mut Moving) -> Applied {
        let id = req.migration_id;
        let Some(mut out) = moving.out.get(&id).cloned() else {
            return Ok(Err(Error::FailedPrecondition(format!(
                "no migration {id} on this group (never begun, or ended)"
            ))));
        };
        if let Some(e) = out.overflow(id) {
            return Ok(Err(e));
        }
        let mut batch = sled::Batch::default();
        let (deleted, more) = self.delete_log(&mut batch, id, Some(&req.trim_after))?;
        let freed: u64 = deleted.iter().sum();
        out.log_bytes = out.log_bytes.saturating_sub(freed);
        batch.insert(out_key(id), out.encode());
        batch.insert(APPLIED_KEY, &index.to_be_bytes());
        self.sys.apply_batch(batch)?;
        self.applied.store(index, Ordering::Release);
        moving.update_logs(vec![(id, out)]);
        Ok(Ok(Outcome::Migration {
            index,
            deleted: deleted.len() as u64,
            done: !more,
        }))
    }

    /// Adds to `batch` the deletion of the first `MIGRATION_LOG_DELETE_MAX` entries of
    /// migration `id`'s log (up to `upto` included, if given); the size of each, and whether
    /// more remain.
    fn delete_log(
        &self,
        batch: &mut sled::Batch,
        id: u64,
        upto: Option<&[u8]>,
    ) -> Result<(Vec<u64>, bool)> {
        let prefix = log_prefix(id);
        let mut sizes = Vec::new();
        for kv in self.sys.scan_prefix(&prefix) {
            let (k, v) = kv?;
            if upto.is_some_and(|upto| k.as_ref() > upto) {
                return Ok((sizes, false));
            }
            if sizes.len() == MIGRATION_LOG_DELETE_MAX {
                return Ok((sizes, true));
            }
            sizes.push((k.len() + v.len()) as u64);
            batch.remove(k);
        }
        Ok((sizes, false))
    }

    fn apply_ingest(&self, index: u64, records: &[MigrationRecord]) -> Applied {
        let ownership = self.ownership.read().unwrap().clone();
        let moving = self.moving.read().unwrap();
        for r in records {
            let slot = match check_record(r, self.slot_count) {
                Ok(s) => s,
                Err(e) => return Ok(Err(e)),
            };
            if ownership.owns(slot) || moving.is_moving(slot) {
                return Ok(Err(Error::FailedPrecondition(format!(
                    "slot {slot} is served by this group; copied items are only written into slots it does not own"
                ))));
            }
        }
        let locks = self.lock_delta(records.iter().map(|r| (&r.key[..], !r.value.is_empty())))?;
        let _w = self.view.write().unwrap();
        self.transact_at(index, |data| {
            for r in records {
                if r.value.is_empty() {
                    data.remove(r.key.as_ref())?;
                } else {
                    data.insert(r.key.as_ref(), r.value.as_ref())?;
                }
            }
            Ok(())
        })?;
        self.locks.fetch_add(locks, Ordering::Relaxed);
        Ok(Ok(Outcome::Migration {
            index,
            deleted: 0,
            done: true,
        }))
    }

    fn apply_clear(&self, index: u64, slots: &[u32], items_max: u32) -> Applied {
        let ownership = self.ownership.read().unwrap().clone();
        let moving = self.moving.read().unwrap();
        for &s in slots {
            if s >= self.slot_count || ownership.owns(s) || moving.is_moving(s) {
                return Ok(Err(Error::FailedPrecondition(format!(
                    "slot {s} is owned or moving out here (or out of range); only data of slots this group does not serve is cleared"
                ))));
            }
        }
        let limit = items_max.clamp(1, CLEAR_ITEMS_MAX) as usize;
        let mut doomed = Vec::new();
        let mut more = false;
        'slots: for &s in slots {
            for k in self
                .data
                .range(keys::slot_start(s)..keys::slot_start(s + 1))
                .keys()
            {
                if doomed.len() == limit {
                    more = true;
                    break 'slots;
                }
                doomed.push(k?);
            }
        }
        let locks = self.lock_delta(doomed.iter().map(|k| (&k[..], false)))?;
        let _w = self.view.write().unwrap();
        self.transact_at(index, |data| {
            for k in &doomed {
                data.remove(k)?;
            }
            Ok(())
        })?;
        self.locks.fetch_add(locks, Ordering::Relaxed);
        Ok(Ok(Outcome::Migration {
            index,
            deleted: doomed.len() as u64,
            done: !more,
        }))
    }

    /// How writing (`true`) or deleting (`false`) these keys in order changes the lock count: a
    /// copy may carry a lock, and its release (a deletion) after it.
    fn lock_delta<'k>(&self, writes: impl Iterator<Item = (&'k [u8], bool)>) -> Result<i64> {
        let mut present: HashMap<&[u8], bool> = HashMap::new();
        let mut delta = 0;
        for (k, write) in writes {
            if !matches!(
                keys::decode_reserved(k),
                Some((_, participant::LOCK_KIND, _))
            ) {
                continue;
            }
            let was = match present.get(k) {
                Some(p) => *p,
                None => self.data.get(k)?.is_some(),
            };
            delta += write as i64 - was as i64;
            present.insert(k, write);
        }
        Ok(delta)
    }

    /// Changes the data tree with `f` and records `index` as applied, in one sled transaction.
    fn transact_at(
        &self,
        index: u64,
        f: impl Fn(&TransactionalTree) -> std::result::Result<(), UnabortableTransactionError>,
    ) -> Result<()> {
        (&self.data, &self.sys)
            .transaction(|(data, sys)| {
                f(data).map_err(ConflictableTransactionError::from)?;
                sys.insert(APPLIED_KEY, &index.to_be_bytes())?;
                Ok::<_, ConflictableTransactionError<Error>>(())
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Abort(e) => e,
                sled::transaction::TransactionError::Storage(e) => Error::from(e),
            })?;
        self.applied.store(index, Ordering::Release);
        Ok(())
    }

    /// One page of a migration's items (`log` false) or change log (`log` true) after `after`,
    /// at most about `bytes_max` bytes (at least one record).
    pub fn migration_pull(
        &self,
        id: u64,
        log: bool,
        after: &[u8],
        bytes_max: usize,
    ) -> Result<MigratePullResponse> {
        let out = self
            .moving
            .read()
            .unwrap()
            .out
            .get(&id)
            .cloned()
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "no migration {id} on this group (never begun, or ended)"
                ))
            })?;
        if let Some(e) = out.overflow(id) {
            return Err(e);
        }
        let _r = self.read_guard();
        let mut resp = MigratePullResponse {
            applied_index: self.applied_index(),
            fence_index: out.fence_index,
            next_after: after.to_vec().into(),
            done: true,
            ..Default::default()
        };
        let mut bytes = 0usize;
        let mut push = |resp: &mut MigratePullResponse, k: &[u8], v: &[u8], pos: &[u8]| -> bool {
            if bytes >= bytes_max && !resp.records.is_empty() {
                resp.done = false;
                return false;
            }
            bytes += k.len() + v.len();
            resp.records.push(MigrationRecord {
                key: k.to_vec().into(),
                value: v.to_vec().into(),
            });
            resp.next_after = pos.to_vec().into();
            true
        };
        let from = |start: Vec<u8>| {
            if after.is_empty() || after < start.as_slice() {
                Bound::Included(start)
            } else {
                Bound::Excluded(after.to_vec())
            }
        };
        if log {
            let prefix = log_prefix(id);
            for kv in self.sys.range((from(prefix.clone()), Bound::Unbounded)) {
                let (k, v) = kv?;
                if !k.starts_with(&prefix) {
                    break;
                }
                let (key, value) = decode_record(&v)?;
                if !push(&mut resp, key, value, &k) {
                    break;
                }
            }
        } else {
            'slots: for &s in &out.slots {
                let end = keys::slot_start(s + 1);
                if !after.is_empty() && after >= end.as_slice() {
                    continue;
                }
                for kv in self
                    .data
                    .range((from(keys::slot_start(s)), Bound::Excluded(end)))
                {
                    let (k, v) = kv?;
                    super::checked_value(self.node_id, &k, &v)?;
                    if !push(&mut resp, &k, &v, &k) {
                        break 'slots;
                    }
                }
            }
        }
        Ok(resp)
    }
}

#[cfg(test)]
mod tests;
