//! Idempotency keys (audit M9): a keyed write is applied at most once within its window, and the
//! same key again answers with the first outcome.
//!
//! A keyed write's entry lives in the reserved range (kind `b'i'`) of the slot of its first shard
//! key (a Txn's first compare, else its first op: the router's primary), so it moves with the
//! slot (a migration copies the slot's whole range, and writes made here go through `TxView`,
//! which appends them to the change log of a moving slot), travels in snapshots and is deleted
//! by a cleanup. One record per entry, its value in the item encoding (checksummed):
//! `3 | expires_ms u64 BE | key` → `expires_ms u64 | digest (12 bytes) | kept u8 | TxnResponse`
//! (the outcome, when `kept`). The records of a slot are so in expiry order.
//!
//! A lookup by key needs no read of sled when the key is new: each replica keeps an exact index
//! of every loaded slot's entries ([`Indexes`]: a hash of each key → its expiry, the slot's count)
//! that it builds from the slot's records when a run first needs it and keeps current with what
//! each committed run wrote. Anything else that writes a slot's records (ownership changes,
//! migrations, snapshot installs) drops the slot's index, so the next run builds it again: the
//! index is always a function of the records, and so are the decisions taken with it. (Before
//! issue 15 an entry was three records, `0 | key`, `1 | expires | key` and a count `2`: a third
//! of a replica's CPU per write; [`upgrade`] rewrites such entries at open.)
//!
//! Time is the leader's clock and dedup window as stamped in the raft entry's context
//! ([`Stamp`]), never a replica's own clock or flags, so every replica expires and evicts the same
//! entries at the same index. Each keyed write removes at most [`DEDUP_EXPIRE_STEP`] expired
//! entries of its slot and, once the slot holds [`DEDUP_ENTRIES_PER_SLOT_MAX`], evicts the one
//! closest to expiry: bounded work per write, never a big batch on the driver. An expired entry
//! still present counts as absent.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::BuildHasher;

use ordo_proto::v1::{DecideRequest, Decision, TxnRequest, TxnResponse};
use ordo_proto::{request_digest, REQUEST_DIGEST_BYTES as DIGEST_BYTES};
use prost::Message;
use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use super::feed::Capture;
use super::{keys, Apply, Command, TxView};
use crate::error::{Error, Result};
use crate::limits::{
    DEDUP_ENTRIES_PER_SLOT_MAX, DEDUP_EXPIRE_STEP, DEDUP_INDEX_ENTRIES_MAX, DEDUP_OUTCOME_BYTES_MAX,
};

/// The reserved-range kind of dedup records (`keys::reserved_key`).
pub(super) const KIND: u8 = b'i';
/// An entry, in expiry order.
const ENTRY: u8 = 3;
/// The layout before issue 15 (see [`upgrade`]): entry by key, expiry index, count.
const OLD_ENTRY: u8 = 0;
const OLD_BY_EXPIRY: u8 = 1;
const OLD_COUNT: u8 = 2;
const ENTRY_HEADER_BYTES: usize = 8 + DIGEST_BYTES + 1;

/// What the leader stamps on every entry it proposes (the raft entry's context): its clock, its
/// dedup window and its change-feed capture. Replicas apply by these, so they agree whatever
/// their own clocks and flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub now_ms: u64,
    pub window_ms: u64,
    pub capture: Capture,
}

impl Stamp {
    pub fn encode(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(17);
        out.extend_from_slice(&self.now_ms.to_be_bytes());
        out.extend_from_slice(&self.window_ms.to_be_bytes());
        out.push(self.capture.byte());
        out
    }

    /// `None` for an entry without a stamp (raft's own, or written before stamps existed): its
    /// writes are not deduplicated. A 16-byte stamp (written before the change feed) captures
    /// new values, the default.
    pub fn decode(ctx: &[u8]) -> Option<Stamp> {
        let (times, capture) = match ctx.len() {
            16 => (ctx, Capture::default()),
            17 => (&ctx[..16], Capture::from_byte(ctx[16])?),
            _ => return None,
        };
        Some(Stamp {
            now_ms: u64::from_be_bytes(times[..8].try_into().unwrap()),
            window_ms: u64::from_be_bytes(times[8..].try_into().unwrap()),
            capture,
        })
    }
}

/// A keyed write: where its entry lives and what a repeat must match.
pub(super) struct Keyed {
    slot: u32,
    key: Vec<u8>,
    digest: [u8; DIGEST_BYTES],
    stamp: Stamp,
}

/// The slot of the entry `t` would have if it were keyed and stamped: `t` carries a key and a
/// branch writes (reads are not deduplicated).
fn entry_slot(t: &TxnRequest, slot_count: u32) -> Option<u32> {
    let key = t.header.as_ref().map(|h| &h.idempotency_key)?;
    if key.is_empty() || !t.writes() {
        return None;
    }
    Some(ordo_proto::slot_of(
        super::shard_keys(t).next()?,
        slot_count,
    ))
}

/// The keyed write `t` is, if it is one (see [`entry_slot`]) and its entry is stamped.
pub(super) fn keyed(t: &TxnRequest, stamp: Option<Stamp>, slot_count: u32) -> Option<Keyed> {
    let slot = entry_slot(t, slot_count)?;
    Some(Keyed {
        slot,
        key: t.header.as_ref()?.idempotency_key.to_vec(),
        digest: request_digest(t),
        stamp: stamp?,
    })
}

/// The slot of the entry a decision would record: a commit decision of a keyed writing Txn that
/// spans groups (its coordinator sends the key, the Txn's digest and its outcome, see
/// `DecideRequest`), the primary's slot, as for the same Txn in one group.
fn decision_slot(d: &DecideRequest, slot_count: u32) -> Option<u32> {
    let key = &d.header.as_ref()?.idempotency_key;
    let commit = matches!(
        Decision::try_from(d.decision),
        Ok(Decision::RunSuccess | Decision::RunFailure)
    );
    if key.is_empty() || !commit || d.resolve || d.wound {
        return None;
    }
    Some(ordo_proto::slot_of(&d.primary_shard_key, slot_count))
}

/// The keyed write a commit decision is, if it is one (see [`decision_slot`]) and its entry is
/// stamped.
pub(super) fn keyed_decision(
    d: &DecideRequest,
    stamp: Option<Stamp>,
    slot_count: u32,
) -> Option<Keyed> {
    let slot = decision_slot(d, slot_count)?;
    Some(Keyed {
        slot,
        key: d.header.as_ref()?.idempotency_key.to_vec(),
        digest: d.request_digest.as_ref().try_into().ok()?,
        stamp: stamp?,
    })
}

fn entry_prefix(slot: u32) -> Vec<u8> {
    keys::reserved_key(slot, KIND, &[ENTRY])
}

fn entry_key(slot: u32, expires_ms: u64, key: &[u8]) -> Vec<u8> {
    [&entry_prefix(slot), &expires_ms.to_be_bytes()[..], key].concat()
}

/// The expiry time and the idempotency key of an entry record of `slot`.
fn split_entry_key(slot: u32, ek: &[u8]) -> (u64, &[u8]) {
    let at = entry_prefix(slot).len();
    let expires = u64::from_be_bytes(ek[at..at + 8].try_into().unwrap());
    (expires, &ek[at + 8..])
}

fn corrupt(raw_key: &[u8], what: &str) -> ConflictableTransactionError<Error> {
    ConflictableTransactionError::Abort(Error::Corruption(format!(
        "tree data, dedup record {}: {what}",
        keys::printable(raw_key)
    )))
}

/// What the entry under a keyed write's key says.
pub(super) enum Seen {
    /// Never applied (or its entry expired at `expired`): apply it, then [`remember`] it.
    New { expired: Option<u64> },
    /// Applied before: this was its outcome.
    Repeat(TxnResponse),
}

/// Looks a keyed write up: its slot's index says under which expiry times an entry of its key
/// may be (a hash matches), and only those records are read. A live entry of another request
/// under the key, or one whose outcome was too large to keep, refuses it with
/// FAILED_PRECONDITION.
pub(super) fn seen(
    data: &TransactionalTree,
    pending: &Pending<'_>,
    k: &Keyed,
) -> super::participant::Tx<Result<Seen>> {
    for expires in pending.candidates(k.slot, &k.key)? {
        let ek = entry_key(k.slot, expires, &k.key);
        let Some(raw) = data.get(&ek)? else {
            continue;
        };
        let (_, v) = keys::decode_value(&ek, &raw).map_err(ConflictableTransactionError::Abort)?;
        if v.len() < ENTRY_HEADER_BYTES {
            return Err(corrupt(&ek, "shorter than its header"));
        }
        if expires <= k.stamp.now_ms {
            return Ok(Ok(Seen::New {
                expired: Some(expires),
            }));
        }
        let key = keys::printable(&k.key);
        if v[8..8 + DIGEST_BYTES] != k.digest {
            return Ok(Err(Error::FailedPrecondition(format!(
                "idempotency key {key} was already used for a different request (within the \
                 dedup window); use a new key for a new request"
            ))));
        }
        if v[8 + DIGEST_BYTES] == 0 {
            return Ok(Err(Error::FailedPrecondition(format!(
                "the request with idempotency key {key} was already applied, but its outcome \
                 was over DEDUP_OUTCOME_BYTES_MAX ({DEDUP_OUTCOME_BYTES_MAX} bytes) and was not \
                 kept: read the items back"
            ))));
        }
        let resp = TxnResponse::decode(&v[ENTRY_HEADER_BYTES..])
            .map_err(|e| corrupt(&ek, &format!("outcome does not decode: {e}")))?;
        return Ok(Ok(Seen::Repeat(resp)));
    }
    Ok(Ok(Seen::New { expired: None }))
}

/// One slot's entries as a replica knows them between runs: exact, built from the records
/// ([`Index::build`]) and kept current with what committed runs wrote.
#[derive(Debug, Default)]
pub(super) struct Index {
    count: u64,
    /// No entry of the slot expires before this (a bound, not always the first entry's time).
    expiry_floor: u64,
    /// Hash of each entry's key → its expiry time. Two keys with one hash are rare (the hasher
    /// is seeded at random per process): the second goes to `more`.
    by_key: HashMap<u64, u64>,
    more: Vec<(u64, u64)>,
}

impl Index {
    /// The index of `slot` from its records (a scan of the slot's entries, in expiry order).
    fn build(tree: &sled::Tree, slot: u32, hasher: &RandomState) -> Result<Index> {
        let mut index = Index {
            expiry_floor: u64::MAX,
            ..Index::default()
        };
        for ek in tree.scan_prefix(entry_prefix(slot)).keys() {
            let ek = ek?;
            let (expires, key) = split_entry_key(slot, &ek);
            index.expiry_floor = index.expiry_floor.min(expires);
            index.add(hasher.hash_one(key), expires);
            index.count += 1;
        }
        Ok(index)
    }

    fn add(&mut self, hash: u64, expires: u64) {
        if let Some(other) = self.by_key.insert(hash, expires) {
            self.more.push((hash, other));
        }
    }

    fn drop(&mut self, hash: u64, expires: u64) {
        if self.by_key.get(&hash) == Some(&expires) {
            self.by_key.remove(&hash);
            if let Some(i) = self.more.iter().position(|(h, _)| *h == hash) {
                let (_, other) = self.more.swap_remove(i);
                self.by_key.insert(hash, other);
            }
        } else if let Some(i) = self.more.iter().position(|e| *e == (hash, expires)) {
            self.more.swap_remove(i);
        }
    }

    fn candidates(&self, hash: u64) -> impl Iterator<Item = u64> + '_ {
        let more = self.more.iter().filter(move |(h, _)| *h == hash);
        self.by_key
            .get(&hash)
            .copied()
            .into_iter()
            .chain(more.map(|(_, e)| *e))
    }
}

/// Every loaded slot's [`Index`], on the state machine. A run takes it out for its transaction
/// ([`Indexes::take`]) and gives it back with its changes once it committed.
pub(super) struct Indexes {
    slots: std::sync::Mutex<HashMap<u32, Index>>,
    hasher: RandomState,
    /// Most entries indexed at once ([`DEDUP_INDEX_ENTRIES_MAX`]; tests set less).
    entries_max: u64,
}

impl Default for Indexes {
    fn default() -> Self {
        Indexes {
            slots: Default::default(),
            hasher: RandomState::new(),
            entries_max: DEDUP_INDEX_ENTRIES_MAX,
        }
    }
}

/// The indexes a run reads, taken from [`Indexes`].
pub(super) struct Taken<'a> {
    slots: HashMap<u32, Index>,
    hasher: &'a RandomState,
}

impl Indexes {
    pub(super) fn clear(&self) {
        self.slots.lock().unwrap().clear();
    }

    /// Drops the indexes of `slots` (something other than a run wrote their records).
    pub(super) fn forget(&self, slots: impl IntoIterator<Item = u32>) {
        let mut known = self.slots.lock().unwrap();
        for slot in slots {
            known.remove(&slot);
        }
    }

    /// The indexes, for one run: every slot `batch` writes keyed is loaded (built when missing).
    pub(super) fn take(
        &self,
        tree: &sled::Tree,
        batch: &[Apply],
        slot_count: u32,
    ) -> Result<Taken<'_>> {
        let mut slots = std::mem::take(&mut *self.slots.lock().unwrap());
        for slot in keyed_slots(batch, slot_count).into_keys() {
            if let std::collections::hash_map::Entry::Vacant(e) = slots.entry(slot) {
                e.insert(Index::build(tree, slot, &self.hasher)?);
            }
        }
        Ok(Taken {
            slots,
            hasher: &self.hasher,
        })
    }

    /// Gives the indexes back, with what a committed run changed (`None`: the run failed and
    /// changed nothing).
    pub(super) fn give_back(&self, mut taken: Taken<'_>, changes: Option<&Changes>) {
        if let Some(changes) = changes {
            for (slot, op) in &changes.ops {
                let index = taken.slots.entry(*slot).or_default();
                match *op {
                    Op::Add(hash, expires) => index.add(hash, expires),
                    Op::Drop(hash, expires) => index.drop(hash, expires),
                }
            }
            for (slot, (count, floor)) in &changes.counts {
                let index = taken.slots.entry(*slot).or_default();
                index.count = *count;
                index.expiry_floor = *floor;
            }
            self.bound(&mut taken.slots, changes);
        }
        *self.slots.lock().unwrap() = taken.slots;
    }

    /// Drops whole indexes, the run's own slots last, until at most `entries_max` entries are
    /// indexed.
    fn bound(&self, slots: &mut HashMap<u32, Index>, changes: &Changes) {
        let mut total: u64 = slots.values().map(|i| i.count).sum();
        if total <= self.entries_max {
            return;
        }
        let (mut others, mine): (Vec<u32>, Vec<u32>) = slots
            .keys()
            .partition(|slot| !changes.counts.contains_key(*slot));
        others.extend(mine);
        for slot in others {
            if total <= self.entries_max {
                break;
            }
            total -= slots.remove(&slot).map_or(0, |i| i.count);
        }
    }
}

/// How many keyed writes of `batch` each slot takes.
fn keyed_slots(batch: &[Apply], slot_count: u32) -> HashMap<u32, usize> {
    let mut writes: HashMap<u32, usize> = HashMap::new();
    for a in batch.iter().filter(|a| a.stamp.is_some()) {
        let slots: Vec<u32> = match &a.cmd {
            Some(Command::Txn(t)) => entry_slot(t, slot_count).into_iter().collect(),
            Some(Command::TxnBatch(ts)) => ts
                .iter()
                .filter_map(|t| entry_slot(t, slot_count))
                .collect(),
            Some(Command::Decide(d)) => decision_slot(d, slot_count).into_iter().collect(),
            _ => continue,
        };
        for slot in slots {
            *writes.entry(slot).or_default() += 1;
        }
    }
    writes
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Add(u64, u64),
    Drop(u64, u64),
}

/// What a run changed in the indexes, in order, and each touched slot's count and floor as it
/// left them.
#[derive(Default, Clone, Debug)]
pub(super) struct Changes {
    ops: Vec<(u32, Op)>,
    counts: HashMap<u32, (u64, u64)>,
}

/// A run's view of the dedup records: the indexes as committed, the oldest entries of the
/// slots it writes keyed, and what its sled transaction wrote and removed so far. A sled
/// transaction can neither be scanned nor read the tree under it (that would deadlock), so the
/// head of each slot's entries is read before the transaction ([`Pending::load`]), as far as the
/// run's keyed writes can consume it, and corrected by these. The result is the same however a
/// replica's entries are grouped into transactions.
#[derive(Clone)]
pub(super) struct Pending<'a> {
    taken: &'a Taken<'a>,
    heads: HashMap<u32, VecDeque<Vec<u8>>>,
    inserted: BTreeSet<Vec<u8>>,
    removed: BTreeSet<Vec<u8>>,
    /// Entries this run added, by slot and key (a repeat in the same run finds them).
    added: HashMap<(u32, Vec<u8>), u64>,
    changes: Changes,
}

impl<'a> Pending<'a> {
    /// Reads the head of the entries of every slot `batch` writes keyed: each keyed write takes
    /// at most `DEDUP_EXPIRE_STEP + 1` of them (expiry, eviction) and removes one more (its own
    /// expired entry), so that many per write are enough.
    ///
    /// Only the records a write can consume are read: expiry takes records that expired by the
    /// write's stamp, so those up to the run's latest stamp (none at all when the slot's floor
    /// says none expires that early); eviction takes the oldest whatever its time, but only in
    /// a slot at its bound, so there the head is read whole.
    pub(super) fn load(
        tree: &sled::Tree,
        batch: &[Apply],
        slot_count: u32,
        taken: &'a Taken<'a>,
    ) -> Result<Pending<'a>> {
        let latest = batch
            .iter()
            .filter_map(|a| a.stamp.map(|s| s.now_ms))
            .max()
            .unwrap_or(0);
        let mut pending = Pending {
            taken,
            heads: HashMap::new(),
            inserted: BTreeSet::new(),
            removed: BTreeSet::new(),
            added: HashMap::new(),
            changes: Changes::default(),
        };
        for (slot, n) in keyed_slots(batch, slot_count) {
            let index = taken.slots.get(&slot);
            let count = index.map_or(0, |i| i.count);
            let floor = index.map_or(u64::MAX, |i| i.expiry_floor);
            let full = count + n as u64 >= DEDUP_ENTRIES_PER_SLOT_MAX;
            let floor = if !full && floor > latest {
                floor
            } else {
                let head = read_head(tree, slot, (n + 1) * (DEDUP_EXPIRE_STEP + 2), full, latest)?;
                // In expiry order: the first record is the slot's oldest.
                let floor = head
                    .front()
                    .map_or(u64::MAX, |ek| split_entry_key(slot, ek).0);
                pending.heads.insert(slot, head);
                floor
            };
            pending.changes.counts.insert(slot, (count, floor));
        }
        Ok(pending)
    }

    /// What the run changed, for [`Indexes::give_back`] once its transaction committed.
    pub(super) fn changes(&self) -> &Changes {
        &self.changes
    }

    /// The expiry times under which an entry of `key` may be in `slot`.
    fn candidates(&self, slot: u32, key: &[u8]) -> super::participant::Tx<Vec<u64>> {
        let Some(index) = self.taken.slots.get(&slot) else {
            return Err(ConflictableTransactionError::Abort(Error::Corruption(
                format!("the dedup index of slot {slot} was not loaded for this run (a bug)"),
            )));
        };
        let hash = self.taken.hasher.hash_one(key);
        let mut out: Vec<u64> = index.candidates(hash).collect();
        out.extend(self.added.get(&(slot, key.to_vec())));
        Ok(out)
    }

    /// The slot's count and floor as the run left them so far.
    fn count(&self, slot: u32) -> (u64, u64) {
        self.changes
            .counts
            .get(&slot)
            .copied()
            .unwrap_or((0, u64::MAX))
    }

    /// Up to `n` of the slot's oldest entry records, in order.
    fn oldest(&mut self, slot: u32, n: usize) -> Vec<Vec<u8>> {
        let prefix = entry_prefix(slot);
        let head = self.heads.entry(slot).or_default();
        while head.front().is_some_and(|k| self.removed.contains(k)) {
            head.pop_front();
        }
        let from_tree = head.iter().filter(|k| !self.removed.contains(*k)).take(n);
        let from_tx = self.inserted.range(prefix.clone()..);
        let mut present: BTreeSet<&Vec<u8>> = from_tree.collect();
        present.extend(from_tx.take_while(|k| k.starts_with(&prefix)).take(n));
        present.into_iter().take(n).cloned().collect()
    }

    fn insert(&mut self, slot: u32, ek: Vec<u8>) {
        let (expires, key) = split_entry_key(slot, &ek);
        let hash = self.taken.hasher.hash_one(key);
        self.added.insert((slot, key.to_vec()), expires);
        self.changes.ops.push((slot, Op::Add(hash, expires)));
        self.removed.remove(&ek);
        self.inserted.insert(ek);
    }

    fn remove(&mut self, slot: u32, ek: Vec<u8>) {
        let (expires, key) = split_entry_key(slot, &ek);
        let hash = self.taken.hasher.hash_one(key);
        let id = (slot, key.to_vec());
        if self.added.get(&id) == Some(&expires) {
            self.added.remove(&id);
        }
        self.changes.ops.push((slot, Op::Drop(hash, expires)));
        self.inserted.remove(&ek);
        self.removed.insert(ek);
    }
}

/// Up to `want` of the first entry records of `slot`: all of them (`whole`), or those expired
/// by `latest` and the first one after them (which tells the slot's floor how long no read is
/// needed).
fn read_head(
    tree: &sled::Tree,
    slot: u32,
    want: usize,
    whole: bool,
    latest: u64,
) -> Result<VecDeque<Vec<u8>>> {
    let mut head = VecDeque::new();
    for ek in tree.scan_prefix(entry_prefix(slot)).keys() {
        let ek = ek?;
        let late = split_entry_key(slot, &ek).0 > latest;
        head.push_back(ek.to_vec());
        if head.len() >= want || (late && !whole) {
            break;
        }
    }
    Ok(head)
}

/// Removes an entry.
fn drop_entry(view: &mut TxView, pending: &mut Pending, slot: u32, ek: Vec<u8>) -> Result<()> {
    view.delete_raw(slot, ek.clone())?;
    pending.remove(slot, ek);
    Ok(())
}

/// Records a keyed write's outcome (after it was applied; `None`: not known here, kept as "over
/// the bound"): removes its own expired entry and up to [`DEDUP_EXPIRE_STEP`] expired entries of
/// its slot, evicts the oldest one if the slot is full, then stores its own entry.
pub(super) fn remember(
    view: &mut TxView,
    pending: &mut Pending,
    k: &Keyed,
    expired: Option<u64>,
    resp: Option<&TxnResponse>,
) -> super::participant::Tx<()> {
    let abort = ConflictableTransactionError::Abort;
    let slot = k.slot;
    let (mut count, floor) = pending.count(slot);
    if let Some(old) = expired {
        drop_entry(view, pending, slot, entry_key(slot, old, &k.key)).map_err(abort)?;
        count = count.saturating_sub(1);
    }
    let mut oldest = pending
        .oldest(slot, DEDUP_EXPIRE_STEP + 1)
        .into_iter()
        .peekable();
    let expires = |ek: &Vec<u8>| split_entry_key(slot, ek).0;
    for _ in 0..DEDUP_EXPIRE_STEP {
        let Some(ek) = oldest.next_if(|ek| expires(ek) <= k.stamp.now_ms) else {
            break;
        };
        drop_entry(view, pending, slot, ek).map_err(abort)?;
        count = count.saturating_sub(1);
    }
    if count >= DEDUP_ENTRIES_PER_SLOT_MAX {
        if let Some(ek) = oldest.next() {
            drop_entry(view, pending, slot, ek).map_err(abort)?;
            count = count.saturating_sub(1);
        }
    }
    let expires_ms = k.stamp.now_ms.saturating_add(k.stamp.window_ms);
    let outcome = resp.map(Message::encode_to_vec).unwrap_or_default();
    let kept = resp.is_some() && outcome.len() <= DEDUP_OUTCOME_BYTES_MAX;
    let mut v = Vec::with_capacity(ENTRY_HEADER_BYTES + outcome.len());
    v.extend_from_slice(&expires_ms.to_be_bytes());
    v.extend_from_slice(&k.digest);
    v.push(kept as u8);
    if kept {
        v.extend_from_slice(&outcome);
    }
    let ek = entry_key(slot, expires_ms, &k.key);
    view.put_raw(slot, ek.clone(), keys::encode_value(1, &v))
        .map_err(abort)?;
    pending.insert(slot, ek);
    pending
        .changes
        .counts
        .insert(slot, (count + 1, floor.min(expires_ms)));
    Ok(())
}

/// Rewrites the entries of slots still in the layout before issue 15 (entry by key, expiry
/// index, count) as one record each, a slot at a time (one atomic batch per slot, so a crash
/// in between leaves whole slots of either layout, and the next open goes on). The new layout
/// keeps the same entries in the same expiry order, so a replica that upgraded earlier and one
/// that upgraded later apply the same log to the same state. How many entries it rewrote.
pub(super) fn upgrade(tree: &sled::Tree, slot_count: u32) -> Result<u64> {
    let mut rewritten = 0;
    for slot in 0..slot_count {
        let mut batch = sled::Batch::default();
        let mut any = false;
        for kind in [OLD_ENTRY, OLD_BY_EXPIRY, OLD_COUNT] {
            for record in tree.scan_prefix(keys::reserved_key(slot, KIND, &[kind])) {
                let (k, raw) = record?;
                any = true;
                batch.remove(k.clone());
                if kind != OLD_ENTRY {
                    continue;
                }
                let (_, v) = keys::decode_value(&k, &raw)?;
                if v.len() < ENTRY_HEADER_BYTES {
                    return Err(Error::Corruption(format!(
                        "tree data, dedup record {}: shorter than its header",
                        keys::printable(&k)
                    )));
                }
                let expires = u64::from_be_bytes(v[..8].try_into().unwrap());
                let key = &k[keys::reserved_key(slot, KIND, &[OLD_ENTRY]).len()..];
                batch.insert(entry_key(slot, expires, key), raw);
                rewritten += 1;
            }
        }
        if any {
            tree.apply_batch(batch)?;
        }
    }
    Ok(rewritten)
}

#[cfg(test)]
#[path = "dedup_tests.rs"]
mod tests;
