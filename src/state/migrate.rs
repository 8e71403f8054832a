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
    pub(super) fn apply_migration(&self, index: u64, cmd: &Command) -> Applied {
        let r = match cmd {
            Command::MigrateOut(req) => self.apply_out(index, req)?,
            Command::MigrateIngest(req) => self.apply_ingest(index, &req.records)?,
            Command::MigrateClear(req) => self.apply_clear(index, &req.slots, req.items_max)?,
            other => unreachable!("not a migration command: {other:?}"),
        };
        if r.is_err() {
            self.mark_applied(index)?;
        }
        Ok(r)
    }

    fn apply_out(&self, index: u64, req: &MigrateOutRequest) -> Applied {
        let mut moving = self.moving.write().unwrap();
        let _w = self.view.write().unwrap();
        match MigrateStep::try_from(req.step) {
            Ok(MigrateStep::Begin) => self.out_begin(index, req, &mut moving),
            Ok(MigrateStep::Fence) => self.out_fence(index, req.migration_id, &mut moving),
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
    fn out_fence(&self, index: u64, id: u64, moving: &mut Moving) -> Applied {
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
        let out = Out {
            fence_index: index,
            ..out
        };
        self.save_out(index, id, out, moving)?;
        tracing::info!(node = self.node_id, migration = id, index, "slots fenced");
        step_done(index)
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
mod tests {
    use super::super::{Apply, StateMachine};
    use super::*;
    use ordo_proto::v1::{
        txn_op, DecideRequest, Decision, DeleteRequest, FinishRequest, MigrateClearRequest,
        MigrateIngestRequest, PrepareRequest, PutRequest, SetOwnershipRequest, TxnOp, TxnRequest,
    };

    const SLOTS: u32 = 64;

    fn write(sk: &str, v: Option<&str>) -> Command {
        let op = match v {
            Some(v) => txn_op::Op::Put(PutRequest {
                shard_key: sk.as_bytes().to_vec().into(),
                value: v.as_bytes().to_vec().into(),
                ..Default::default()
            }),
            None => txn_op::Op::Delete(DeleteRequest {
                shard_key: sk.as_bytes().to_vec().into(),
                ..Default::default()
            }),
        };
        Command::Txn(TxnRequest {
            success: vec![TxnOp { op: Some(op) }],
            ..Default::default()
        })
    }

    fn step(id: u64, step: MigrateStep, slots: &[u32]) -> Command {
        Command::MigrateOut(MigrateOutRequest {
            group_id: 1,
            migration_id: id,
            step: step as i32,
            slots: slots.to_vec(),
            ..Default::default()
        })
    }

    struct Sm {
        sm: StateMachine,
        index: u64,
        _dir: tempfile::TempDir,
    }

    impl Sm {
        fn new(owned: &[u32]) -> Sm {
            let dir = tempfile::tempdir().unwrap();
            let db = sled::open(dir.path()).unwrap();
            let mut s = Sm {
                sm: StateMachine::open(&db, 1, SLOTS).unwrap().sm,
                index: 0,
                _dir: dir,
            };
            s.run(Command::SetOwnership(SetOwnershipRequest {
                group_id: 1,
                map_version: 1,
                slot_count: SLOTS,
                slots: owned.to_vec(),
                ..Default::default()
            }))
            .unwrap();
            s
        }

        fn run(&mut self, cmd: Command) -> Result<Outcome> {
            self.index += 1;
            let mut r = self
                .sm
                .apply_all(&[Apply {
                    index: self.index,
                    cmd: Some(cmd),
                    stamp: None,
                }])
                .unwrap();
            r.pop().unwrap().1
        }

        fn pull_all(&self, id: u64, log: bool) -> Vec<MigrationRecord> {
            let mut after = Vec::new();
            let mut out = Vec::new();
            for _ in 0..1000 {
                let p = self.sm.migration_pull(id, log, &after, 64).unwrap();
                out.extend(p.records);
                after = p.next_after.to_vec();
                if p.done {
                    return out;
                }
            }
            panic!("pull did not finish");
        }
    }

    fn slot(sk: &str) -> u32 {
        ordo_proto::slot_of(sk.as_bytes(), SLOTS)
    }

    /// The protocol on two state machines: copy while writes continue, replay the log, fence,
    /// end, clear; the recipient ends with exactly the donor's items and versions.
    #[test]
    fn copy_log_fence_and_clear_move_a_slot_with_versions() {
        let moving_slot = slot("order-1");
        let all: Vec<u32> = (0..SLOTS).collect();
        let mut d = Sm::new(&all);
        let mut r = Sm::new(&[]);
        let keys: Vec<String> = (0..400)
            .map(|i| format!("order-{i}"))
            .filter(|k| slot(k) == moving_slot)
            .collect();
        assert!(keys.len() >= 4, "{keys:?}");
        for k in &keys {
            d.run(write(k, Some("v1"))).unwrap();
            d.run(write(k, Some("v2"))).unwrap();
        }
        d.run(step(7, MigrateStep::Begin, &[moving_slot])).unwrap();
        let copied = d.pull_all(7, false);
        assert_eq!(copied.len(), keys.len());
        // Writes during the copy: an update, a delete, a delete + re-create.
        d.run(write(&keys[0], Some("v3"))).unwrap();
        d.run(write(&keys[1], None)).unwrap();
        d.run(write(&keys[2], None)).unwrap();
        d.run(write(&keys[2], Some("again"))).unwrap();
        let ingest = |r: &mut Sm, records: Vec<MigrationRecord>| {
            r.run(Command::MigrateIngest(MigrateIngestRequest {
                group_id: 2,
                migration_id: 7,
                records,
            }))
            .unwrap()
        };
        ingest(&mut r, copied);
        let log = d.pull_all(7, true);
        assert_eq!(log.len(), 4);
        ingest(&mut r, log.clone());
        // A replayed chunk changes nothing.
        ingest(&mut r, log[2..].to_vec());
        let Outcome::Migration { index: fence, .. } =
            d.run(step(7, MigrateStep::Fence, &[])).unwrap()
        else {
            panic!()
        };
        assert!(matches!(
            d.run(write(&keys[3], Some("refused"))),
            Err(Error::SlotMoving {
                migration_id: 7,
                ..
            })
        ));
        assert!(matches!(
            d.sm.check_owned(keys[3].as_bytes()),
            Err(Error::SlotMoving { .. })
        ));
        assert_eq!(
            d.sm.migration_pull(7, true, &[], 1 << 20)
                .unwrap()
                .fence_index,
            fence
        );
        assert_eq!(d.digest_of(moving_slot), r.digest_of(moving_slot));
        assert_eq!(r.sm.get(keys[0].as_bytes(), b"").unwrap().unwrap().0, 3);
        assert!(r.sm.get(keys[1].as_bytes(), b"").unwrap().is_none());
        assert_eq!(r.sm.get(keys[2].as_bytes(), b"").unwrap().unwrap().0, 1);
        give_up_and_clear(&mut d, &mut r, moving_slot, &keys[3], log);
    }

    /// The end of a move: the donor gives the fenced slot up and the recipient takes it (ingest
    /// is then refused), the donor ends the migration and clears its copy in bounded steps.
    fn give_up_and_clear(
        d: &mut Sm,
        r: &mut Sm,
        moving_slot: u32,
        unwritten: &str,
        log: Vec<MigrationRecord>,
    ) {
        // Ingest into an owned slot is refused; the donor may give the fenced slot up.
        let others: Vec<u32> = (0..SLOTS).filter(|s| *s != moving_slot).collect();
        d.run(Command::SetOwnership(SetOwnershipRequest {
            group_id: 1,
            map_version: 2,
            slot_count: SLOTS,
            slots: others,
            ..Default::default()
        }))
        .unwrap();
        r.run(Command::SetOwnership(SetOwnershipRequest {
            group_id: 2,
            map_version: 2,
            slot_count: SLOTS,
            slots: vec![moving_slot],
            ..Default::default()
        }))
        .unwrap();
        assert!(matches!(
            ingest_result(r, log),
            Err(Error::FailedPrecondition(_))
        ));
        // Clearing is refused while moving, then deletes in bounded steps.
        let clear = |d: &mut Sm| {
            d.run(Command::MigrateClear(MigrateClearRequest {
                group_id: 1,
                slots: vec![moving_slot],
                items_max: 2,
            }))
        };
        assert!(clear(d).is_err());
        d.run(step(7, MigrateStep::End, &[])).unwrap();
        assert!(
            d.sm.migration_pull(7, true, &[], 10).is_err(),
            "the log is gone"
        );
        assert!(matches!(
            d.sm.check_owned(unwritten.as_bytes()),
            Err(Error::WrongShard { .. })
        ));
        let mut rounds = 0;
        loop {
            rounds += 1;
            assert!(rounds < 100);
            match clear(d).unwrap() {
                Outcome::Migration { done: true, .. } => break,
                Outcome::Migration { deleted, .. } => assert_eq!(deleted, 2),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            d.digest_of(moving_slot),
            (0, crc32fast::Hasher::new().finalize())
        );
    }

    fn ingest_result(r: &mut Sm, records: Vec<MigrationRecord>) -> Result<Outcome> {
        r.run(Command::MigrateIngest(MigrateIngestRequest {
            group_id: 2,
            migration_id: 7,
            records,
        }))
    }

    impl Sm {
        fn digest_of(&self, slot: u32) -> (u64, u32) {
            let mut h = crc32fast::Hasher::new();
            let mut n = 0;
            for kv in self
                .sm
                .data
                .range(keys::slot_start(slot)..keys::slot_start(slot + 1))
            {
                let (k, v) = kv.unwrap();
                h.update(&k);
                h.update(&v);
                n += 1;
            }
            (n, h.finalize())
        }
    }

    /// Begin refuses slots not owned or already moving; an unfenced migration survives a restart
    /// with its log, and a snapshot carries it.
    #[test]
    fn begin_checks_ownership_and_migrations_survive_restart_and_snapshots() {
        let mut d = Sm::new(&[1, 2, 3]);
        assert!(d.run(step(1, MigrateStep::Begin, &[4])).is_err());
        d.run(step(1, MigrateStep::Begin, &[1, 2])).unwrap();
        assert!(d.run(step(2, MigrateStep::Begin, &[2, 3])).is_err());
        d.run(step(1, MigrateStep::Begin, &[1, 2])).unwrap(); // idempotent
        let sk = (0..)
            .map(|i| format!("o{i}"))
            .find(|k| slot(k) == 2)
            .unwrap();
        d.run(write(&sk, Some("x"))).unwrap();
        assert_eq!(d.pull_all(1, true).len(), 1);
        let (_, path, _) =
            d.sm.build_snapshot(&d._dir.path().join("snap"), d.sm.applied_index(), 1)
                .unwrap();
        let other = Sm::new(&[]);
        other.sm.install_snapshot(&path, d.index).unwrap();
        assert_eq!(other.pull_all(1, true).len(), 1);
        assert!(other.sm.moving.read().unwrap().is_moving(2));
        let reloaded = Moving::load(&d.sm.sys).unwrap();
        assert_eq!(reloaded.out, d.sm.moving.read().unwrap().out);
    }

    fn log_bytes(d: &Sm, id: u64) -> u64 {
        d.sm.moving.read().unwrap().out[&id].log_bytes
    }

    /// The change log's entries and bytes as stored.
    fn stored_log(d: &Sm, id: u64) -> (usize, u64) {
        d.sm.sys
            .scan_prefix(log_prefix(id))
            .map(|kv| kv.unwrap())
            .fold((0, 0), |(n, b), (k, v)| {
                (n + 1, b + (k.len() + v.len()) as u64)
            })
    }

    fn keyed_writes(sk: &str, n: usize, value: &str) -> Command {
        Command::Txn(TxnRequest {
            success: (0..n)
                .map(|i| TxnOp {
                    op: Some(txn_op::Op::Put(PutRequest {
                        shard_key: sk.as_bytes().to_vec().into(),
                        key: format!("k{i}").into_bytes().into(),
                        value: value.as_bytes().to_vec().into(),
                        ..Default::default()
                    })),
                })
                .collect(),
            ..Default::default()
        })
    }

    /// Audit H6: writes past the cap leave the log at or below it; the migration is marked
    /// overflowed, so the next pull, trim and fence are refused with RESOURCE_EXHAUSTED naming
    /// the cap (the mover aborts on it), the donor keeps serving, and END still ends it.
    #[test]
    fn h6_a_change_log_past_its_cap_stays_under_it_and_the_move_is_refused() {
        let s = slot("order-1");
        let mut d = Sm::new(&(0..SLOTS).collect::<Vec<_>>());
        let cap = 4096;
        d.run(Command::MigrateOut(MigrateOutRequest {
            group_id: 1,
            migration_id: 3,
            step: MigrateStep::Begin as i32,
            slots: vec![s],
            log_bytes_max: cap,
            ..Default::default()
        }))
        .unwrap();
        for round in 0..40 {
            d.run(write(
                "order-1",
                Some(&format!("value {round} {}", "x".repeat(100))),
            ))
            .unwrap();
            assert!(log_bytes(&d, 3) <= cap);
            assert_eq!(stored_log(&d, 3).1, log_bytes(&d, 3), "counted as stored");
        }
        assert!(d.sm.moving.read().unwrap().out[&3].overflowed);
        let named = |e: Error| {
            let m = e.to_string();
            assert!(
                m.contains("MIGRATION_LOG_BYTES_MAX") && m.contains(&cap.to_string()),
                "{m}"
            );
            assert_eq!(
                tonic::Status::from(e).code(),
                tonic::Code::ResourceExhausted
            );
        };
        named(d.sm.migration_pull(3, true, &[], 1 << 20).unwrap_err());
        named(d.sm.migration_pull(3, false, &[], 1 << 20).unwrap_err());
        named(d.run(step(3, MigrateStep::Fence, &[])).unwrap_err());
        named(d.run(step(3, MigrateStep::Trim, &[])).unwrap_err());
        // The donor still owns and serves the slot; END ends the migration and its log.
        d.run(write("order-1", Some("after"))).unwrap();
        assert!(matches!(
            d.run(step(3, MigrateStep::End, &[])).unwrap(),
            Outcome::Migration { done: true, .. }
        ));
        assert_eq!(stored_log(&d, 3), (0, 0));
        assert!(d.sm.check_owned(b"order-1").is_ok());
        // A cap over the node's own is refused.
        let over = d.run(Command::MigrateOut(MigrateOutRequest {
            group_id: 1,
            migration_id: 4,
            step: MigrateStep::Begin as i32,
            slots: vec![s],
            log_bytes_max: MIGRATION_LOG_BYTES_MAX + 1,
            ..Default::default()
        }));
        assert!(
            matches!(over, Err(Error::InvalidArgument(m)) if m.contains("MIGRATION_LOG_BYTES_MAX"))
        );
    }

    /// Audit H6: the replayed prefix of the log is trimmed, and END deletes the rest, each in
    /// entries of at most `MIGRATION_LOG_DELETE_MAX` log entries.
    #[test]
    fn h6_trim_and_end_delete_the_log_in_bounded_steps() {
        let s = slot("order-1");
        let mut d = Sm::new(&(0..SLOTS).collect::<Vec<_>>());
        d.run(step(5, MigrateStep::Begin, &[s])).unwrap();
        let n = 2 * MIGRATION_LOG_DELETE_MAX + 100;
        d.run(keyed_writes("order-1", n, "one")).unwrap();
        d.run(keyed_writes("order-1", n, "two")).unwrap();
        assert_eq!(stored_log(&d, 5).0, 2 * n);
        // The recipient replayed the first write of every key.
        let first = d.sm.migration_pull(5, true, &[], 1 << 30).unwrap();
        assert!(first.done);
        let position = {
            let mut after = Vec::new();
            for _ in 0..n {
                let p = d.sm.migration_pull(5, true, &after, 1).unwrap();
                after = p.next_after.to_vec();
            }
            after
        };
        let trim = |d: &mut Sm| {
            d.run(Command::MigrateOut(MigrateOutRequest {
                group_id: 1,
                migration_id: 5,
                step: MigrateStep::Trim as i32,
                trim_after: position.clone().into(),
                ..Default::default()
            }))
            .unwrap()
        };
        let mut steps = 0;
        loop {
            steps += 1;
            let before = stored_log(&d, 5).0;
            let Outcome::Migration { deleted, done, .. } = trim(&mut d) else {
                panic!()
            };
            assert!(deleted as usize <= MIGRATION_LOG_DELETE_MAX);
            assert_eq!(stored_log(&d, 5).0, before - deleted as usize);
            assert_eq!(
                stored_log(&d, 5).1,
                log_bytes(&d, 5),
                "the count follows the trim"
            );
            if done {
                break;
            }
        }
        assert_eq!(steps, 3);
        // What is left is exactly the unreplayed suffix.
        let rest = d.sm.migration_pull(5, true, &[], 1 << 30).unwrap();
        assert!(rest.done);
        let rest = rest.records;
        assert_eq!(rest.len(), n);
        assert_eq!(
            rest[0].key, first.records[0].key,
            "the second write of the first key"
        );
        assert!(rest.iter().all(|r| r.value.ends_with(b"two")));
        let mut steps = 0;
        loop {
            steps += 1;
            let Outcome::Migration { deleted, done, .. } =
                d.run(step(5, MigrateStep::End, &[])).unwrap()
            else {
                panic!()
            };
            assert!(deleted as usize <= MIGRATION_LOG_DELETE_MAX);
            if done {
                break;
            }
        }
        assert_eq!(steps, 3);
        assert_eq!(stored_log(&d, 5), (0, 0), "the log is gone after END");
        assert!(
            d.sm.check_owned(b"order-1").is_ok(),
            "and the slot unfenced"
        );
    }

    fn prepare(txn: u8, sk: &str, primary: &str) -> Command {
        Command::Prepare(PrepareRequest {
            txn_id: vec![txn; participant::TXN_ID_BYTES].into(),
            primary_shard_key: primary.as_bytes().to_vec().into(),
            part: Some(TxnRequest {
                success: vec![TxnOp {
                    op: Some(txn_op::Op::Put(PutRequest {
                        shard_key: sk.as_bytes().to_vec().into(),
                        value: b"2pc".to_vec().into(),
                        ..Default::default()
                    })),
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn decide(txn: u8, primary: &str, decision: Decision, resolve: bool) -> Command {
        Command::Decide(DecideRequest {
            txn_id: vec![txn; participant::TXN_ID_BYTES].into(),
            primary_shard_key: primary.as_bytes().to_vec().into(),
            decision: decision as i32,
            resolve,
            ..Default::default()
        })
    }

    /// Audit H7: a decision recorded at the primary's slot while it moves, and a lock that was
    /// copied and then released, reach the recipient through the copy and the change log: a
    /// resolver asking the slot's new owner learns the decision, and no stale lock is left.
    /// The fence waits for the lock and the kept part.
    #[test]
    fn h7_decisions_and_released_locks_move_with_their_slot() {
        let s = slot("order-1");
        let mut d = Sm::new(&(0..SLOTS).collect::<Vec<_>>());
        let mut r = Sm::new(&[]);
        // Txn 1 holds order-1 (its primary) before the move begins.
        d.run(prepare(1, "order-1", "order-1")).unwrap();
        d.run(step(9, MigrateStep::Begin, &[s])).unwrap();
        assert!(matches!(
            d.run(prepare(2, "order-1", "order-1")),
            Err(Error::Locked { .. })
        ));
        let copied = d.pull_all(9, false);
        assert!(
            copied.len() >= 2,
            "the lock and the part are in the slot's range"
        );
        ingest_result(&mut r, copied).unwrap();
        assert!(d.run(step(9, MigrateStep::Fence, &[])).is_err(), "locked");
        // The coordinator decides, finishes the primary's part, and dies before forgetting.
        assert!(matches!(
            d.run(decide(1, "order-1", Decision::RunSuccess, false)).unwrap(),
            Outcome::Decided(x) if x.decision == Decision::RunSuccess as i32
        ));
        d.run(Command::Finish(FinishRequest {
            txn_id: vec![1; participant::TXN_ID_BYTES].into(),
            shard_key: b"order-1".to_vec().into(),
            decision: Decision::RunSuccess as i32,
            ..Default::default()
        }))
        .unwrap();
        ingest_result(&mut r, d.pull_all(9, true)).unwrap();
        assert!(matches!(
            d.run(step(9, MigrateStep::Fence, &[])).unwrap(),
            Outcome::Migration { .. }
        ));
        assert!(
            matches!(
                d.run(decide(3, "order-1", Decision::RunSuccess, false)),
                Err(Error::SlotMoving { .. })
            ),
            "no decision in a fenced slot"
        );
        assert_eq!(d.digest_of(s), r.digest_of(s));
        r.run(Command::SetOwnership(SetOwnershipRequest {
            group_id: 2,
            map_version: 2,
            slot_count: SLOTS,
            slots: vec![s],
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(
            r.sm.locks_held(),
            0,
            "the copied lock was released by the log"
        );
        assert_eq!(
            r.sm.get(b"order-1", b"").unwrap().unwrap().1.as_ref(),
            b"2pc"
        );
        assert!(matches!(
            r.run(decide(1, "order-1", Decision::Abort, true)).unwrap(),
            Outcome::Decided(x) if x.decision == Decision::RunSuccess as i32
        ));
    }
}
