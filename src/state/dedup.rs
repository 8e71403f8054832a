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
mod tests {
    use super::*;
    use crate::state::{Apply, Command, Outcome, StateMachine};
    use ordo_proto::v1::{
        txn_op_result, GetRequest, PrepareRequest, PutRequest, RequestHeader, TxnOp,
    };

    const SLOTS: u32 = 64;
    const WINDOW_MS: u64 = 1_000;

    struct Sm {
        sm: StateMachine,
        index: u64,
        /// Kept open for a restart: sled releases its file lock only once its flusher thread
        /// has gone, some time after the last handle drops, so reopening the path can fail.
        db: sled::Db,
        dir: tempfile::TempDir,
    }

    impl Sm {
        fn new() -> Sm {
            let dir = tempfile::tempdir().unwrap();
            let db = sled::open(dir.path().join("db")).unwrap();
            Sm {
                sm: StateMachine::open(&db, 1, SLOTS).unwrap().sm,
                index: 0,
                db,
                dir,
            }
        }

        /// Applies `cmds` in one batch, each stamped at `now_ms`; their results in order.
        fn apply(&mut self, cmds: Vec<Command>, now_ms: u64) -> Vec<Result<Outcome>> {
            let batch: Vec<Apply> = cmds
                .into_iter()
                .map(|cmd| {
                    self.index += 1;
                    Apply {
                        index: self.index,
                        cmd: Some(cmd),
                        stamp: Some(Stamp {
                            now_ms,
                            window_ms: WINDOW_MS,
                            capture: Default::default(),
                        }),
                    }
                })
                .collect();
            self.sm
                .apply_all(&batch)
                .unwrap()
                .into_iter()
                .map(|r| r.1)
                .collect()
        }

        /// The version a keyed put of `value` at `now_ms` answers.
        fn put(&mut self, key: &str, value: &str, now_ms: u64) -> Result<u64> {
            let r = self
                .apply(vec![Command::Txn(put(key, value))], now_ms)
                .pop()
                .unwrap();
            r.map(put_version)
        }

        fn version(&self) -> u64 {
            self.sm.get(b"order", b"").unwrap().map_or(0, |(v, _)| v)
        }

        /// The number of dedup entries of the slot of "order" (and none in the old layout).
        fn records(&self) -> usize {
            let slot = ordo_proto::slot_of(b"order", SLOTS);
            let n = |kind: u8| {
                let prefix = keys::reserved_key(slot, KIND, &[kind]);
                self.sm.data.scan_prefix(prefix).count()
            };
            assert_eq!(n(OLD_ENTRY) + n(OLD_BY_EXPIRY) + n(OLD_COUNT), 0);
            n(ENTRY)
        }
    }

    /// A put of the root item of "order", keyed `key`.
    fn put(key: &str, value: &str) -> TxnRequest {
        TxnRequest {
            header: Some(RequestHeader {
                map_version: 0,
                idempotency_key: key.as_bytes().to_vec().into(),
            }),
            success: vec![TxnOp {
                op: Some(ordo_proto::v1::txn_op::Op::Put(PutRequest {
                    shard_key: b"order".to_vec().into(),
                    value: value.as_bytes().to_vec().into(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        }
    }

    fn put_version(o: Outcome) -> u64 {
        match o {
            Outcome::Txn(r) => match r.results[0].result {
                Some(txn_op_result::Result::Put(p)) => p.version,
                ref other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn m9_the_same_key_twice_is_applied_once_and_answers_the_first_outcome() {
        let mut s = Sm::new();
        assert_eq!(s.put("k1", "v", 10).unwrap(), 1);
        assert_eq!(
            s.put("k1", "v", 20).unwrap(),
            1,
            "a repeat answers version 1 again"
        );
        assert_eq!(s.version(), 1, "and was not applied");
        // A repeat in the same entry (one sled transaction) is caught too, and so is one of a
        // batch: both answer the first outcome.
        let batch = Command::TxnBatch(vec![put("k2", "w"), put("k2", "w")]);
        let rs = s.apply(vec![batch, Command::Txn(put("k2", "w"))], 30);
        let Ok(Outcome::TxnBatch(rs0)) = &rs[0] else {
            panic!("{rs:?}")
        };
        let versions: Vec<u64> = rs0
            .iter()
            .map(|r| put_version(Outcome::Txn(r.as_ref().unwrap().clone())))
            .collect();
        assert_eq!(versions, [2, 2]);
        assert_eq!(put_version(rs.into_iter().nth(1).unwrap().unwrap()), 2);
        assert_eq!(s.version(), 2);
        assert_eq!(s.records(), 2);
        assert_eq!(s.sm.digest().unwrap().0, 1, "dedup records are not items");
        // Without a key, or read-only, nothing is deduplicated or recorded.
        let mut unkeyed = put("", "x");
        unkeyed.header = None;
        s.apply(
            vec![Command::Txn(unkeyed.clone()), Command::Txn(unkeyed)],
            40,
        );
        assert_eq!(s.version(), 4);
        let mut read = put("k3", "");
        read.success[0].op = Some(ordo_proto::v1::txn_op::Op::Get(GetRequest {
            shard_key: b"order".to_vec().into(),
            ..Default::default()
        }));
        s.apply(vec![Command::Txn(read)], 50)
            .pop()
            .unwrap()
            .unwrap();
        assert_eq!(s.records(), 2);
    }

    #[test]
    fn m9_the_same_key_with_another_request_is_failed_precondition() {
        let mut s = Sm::new();
        s.put("k", "v", 10).unwrap();
        let err = s.put("k", "other", 20).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
        assert!(
            err.to_string()
                .contains("already used for a different request"),
            "{err}"
        );
        assert_eq!(s.version(), 1, "nothing was applied");
        assert_eq!(s.sm.get(b"order", b"").unwrap().unwrap().1.as_ref(), b"v");
    }

    #[test]
    fn m9_a_key_expires_after_the_window_of_the_entries_stamp() {
        let mut s = Sm::new();
        s.put("k", "v", 1_000).unwrap();
        assert_eq!(s.put("k", "v", 1_000 + WINDOW_MS - 1).unwrap(), 1);
        assert_eq!(
            s.put("k", "v", 1_000 + WINDOW_MS).unwrap(),
            2,
            "expired: applied again"
        );
        assert_eq!(s.records(), 1, "the expired entry was replaced");
        // Expired entries of the slot go a few per keyed write, never in one big batch.
        for i in 0..10 {
            s.put(&format!("old{i}"), "v", 5_000).unwrap();
        }
        assert_eq!(s.records(), 10, "the first old one expired the entry of k");
        s.put("new", "v", 5_000 + WINDOW_MS).unwrap();
        let left = 10 - DEDUP_EXPIRE_STEP;
        assert_eq!(s.records(), left + 1);
        // An expired entry still there counts as absent.
        assert_eq!(s.put("old9", "v", 5_000 + WINDOW_MS).unwrap(), 14);
    }

    /// Expiry reads the tree under the apply transaction: grouping the same entries into other
    /// transactions (as replicas do, by what each Ready holds) must give the same state.
    #[test]
    fn m9_expiry_is_the_same_however_entries_are_grouped() {
        let entries: Vec<(TxnRequest, u64)> = (0..40)
            .map(|i| {
                (
                    put(&format!("k{}", i % 13), &format!("v{}", i % 13)),
                    i * 150,
                )
            })
            .collect();
        let one = Sm::new();
        let each = Sm::new();
        let batch: Vec<Apply> = entries
            .iter()
            .enumerate()
            .map(|(i, (t, at))| Apply {
                index: i as u64 + 1,
                cmd: Some(Command::Txn(t.clone())),
                stamp: Some(Stamp {
                    now_ms: *at,
                    window_ms: WINDOW_MS,
                    capture: Default::default(),
                }),
            })
            .collect();
        let together = one.sm.apply_all(&batch).unwrap();
        let mut apart = Vec::new();
        for a in &batch {
            apart.extend(each.sm.apply_all(std::slice::from_ref(a)).unwrap());
        }
        let answers = |rs: Vec<(u64, Result<Outcome>)>| -> Vec<u64> {
            rs.into_iter()
                .map(|(_, r)| put_version(r.unwrap()))
                .collect()
        };
        assert_eq!(answers(together), answers(apart));
        assert_eq!(one.sm.digest().unwrap(), each.sm.digest().unwrap());
        assert_eq!(one.records(), each.records());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// What apply runs remember (`Indexes`, `feed::Metas`) is a function of the records: a replica that
        /// keeps it and one that forgets it before every run answer the same and hold the same
        /// records (dedup entries, change events, feed metas), whatever the grouping of entries
        /// into runs, the repeats and the expiries.
        #[test]
        fn m9_hints_change_no_outcome(
            writes in proptest::collection::vec((0u8..6, 0u64..700, proptest::bool::ANY), 1..80)
        ) {
            let (hinted, forgetful) = (Sm::new(), Sm::new());
            let (mut runs, mut run, mut now) = (Vec::new(), Vec::new(), 0);
            for (i, (key, gap, cut)) in writes.iter().enumerate() {
                now += gap;
                run.push(Apply {
                    index: i as u64 + 1,
                    cmd: Some(Command::Txn(put(&format!("k{key}"), &format!("v{i}")))),
                    stamp: Some(Stamp {
                        now_ms: now,
                        window_ms: WINDOW_MS,
                        capture: Default::default(),
                    }),
                });
                if *cut {
                    runs.push(std::mem::take(&mut run));
                }
            }
            runs.push(run);
            for run in runs.iter().filter(|r| !r.is_empty()) {
                forgetful.sm.forget_hints();
                let a = hinted.sm.apply_all(run).unwrap();
                let b = forgetful.sm.apply_all(run).unwrap();
                let answers = |rs: Vec<(u64, Result<Outcome>)>| -> Vec<String> {
                    rs.into_iter().map(|(i, r)| format!("{i}: {r:?}")).collect()
                };
                proptest::prop_assert_eq!(answers(a), answers(b));
            }
            proptest::prop_assert_eq!(hinted.records(), forgetful.records());
            proptest::prop_assert_eq!(hinted.sm.digest().unwrap(), forgetful.sm.digest().unwrap());
        }
    }

    /// Two keys under one hash in a slot's index: each still finds its own entry only.
    #[test]
    fn m9_keys_that_share_a_hash_keep_their_own_entries() {
        let mut index = Index::default();
        index.add(7, 100);
        index.add(7, 200);
        index.add(8, 300);
        assert_eq!(
            index.candidates(7).collect::<BTreeSet<_>>(),
            [100, 200].into()
        );
        index.drop(7, 100);
        assert_eq!(index.candidates(7).collect::<Vec<_>>(), [200]);
        index.drop(7, 200);
        assert_eq!(index.candidates(7).count(), 0);
        assert_eq!(index.candidates(8).collect::<Vec<_>>(), [300]);
    }

    /// Past its bound the index drops whole slots, which are built again from their records
    /// when a write needs them: repeats are still answered, the memory stays bounded.
    #[test]
    fn m9_the_index_drops_slots_past_its_bound_and_rebuilds_them() {
        let mut s = Sm::new();
        s.sm.dedup_index.entries_max = 3;
        let put = |sk: &str, key: &str| {
            let mut t = put(key, "v");
            if let Some(ordo_proto::v1::txn_op::Op::Put(p)) = t.success[0].op.as_mut() {
                p.shard_key = sk.as_bytes().to_vec().into();
            }
            Command::Txn(t)
        };
        let sks = ["a", "b", "c", "d", "e"];
        let first: Vec<_> = sks.iter().map(|sk| put(sk, &format!("k-{sk}"))).collect();
        let answers = s.apply(first.clone(), 10);
        let indexed = |s: &Sm| {
            s.sm.dedup_index
                .slots
                .lock()
                .unwrap()
                .values()
                .map(|i| i.count)
                .sum::<u64>()
        };
        // One run of five slots keeps its own five; the next run of one slot drops the others.
        s.apply(vec![put("a", "k-a2")], 20);
        assert!(indexed(&s) <= 3, "{} entries indexed", indexed(&s));
        let again = s.apply(first, 30);
        let fmt = |rs: Vec<Result<Outcome>>| format!("{rs:?}");
        assert_eq!(
            fmt(again),
            fmt(answers),
            "the first outcomes, from rebuilt indexes"
        );
    }

    /// A data dir written with the layout before issue 15 (entry by key, expiry index, count):
    /// its entries are rewritten at open, answer their first outcome and expire as before.
    #[test]
    fn m9_entries_of_the_old_layout_are_rewritten_at_open_and_still_answer() {
        let mut s = Sm::new();
        assert_eq!(s.put("k", "v", 10).unwrap(), 1);
        assert_eq!(s.put("j", "v", 20).unwrap(), 2);
        // Turn them into the old layout, as an older build left them.
        let slot = ordo_proto::slot_of(b"order", SLOTS);
        for record in s.sm.data.scan_prefix(entry_prefix(slot)) {
            let (ek, raw) = record.unwrap();
            let (expires, key) = split_entry_key(slot, &ek);
            let old =
                |kind: u8, rest: &[u8]| keys::reserved_key(slot, KIND, &[&[kind], rest].concat());
            s.sm.data.insert(old(OLD_ENTRY, key), raw).unwrap();
            let by_expiry = [&expires.to_be_bytes()[..], key].concat();
            s.sm.data
                .insert(old(OLD_BY_EXPIRY, &by_expiry), keys::encode_value(1, &[]))
                .unwrap();
            s.sm.data.remove(&ek).unwrap();
        }
        s.sm.data
            .insert(
                keys::reserved_key(slot, KIND, &[OLD_COUNT]),
                keys::encode_value(2, &[]),
            )
            .unwrap();
        let Sm { sm, db, dir, index } = s;
        drop(sm);
        let mut s = Sm {
            sm: StateMachine::open(&db, 1, SLOTS).unwrap().sm,
            index,
            db,
            dir,
        };
        assert_eq!(s.records(), 2, "rewritten, none left in the old layout");
        assert_eq!(s.put("k", "v", 30).unwrap(), 1, "the first outcome");
        assert_eq!(s.put("j", "v", 30).unwrap(), 2, "the first outcome");
        assert_eq!(
            s.put("k", "v", 10 + WINDOW_MS).unwrap(),
            3,
            "expired: applied again"
        );
    }

    #[test]
    fn m9_a_slot_keeps_at_most_its_bound_of_entries_and_evicts_the_oldest() {
        let mut s = Sm::new();
        let max = DEDUP_ENTRIES_PER_SLOT_MAX;
        let key = |i: u64| format!("k{i:06}");
        for (n, chunk) in (0..max).collect::<Vec<_>>().chunks(256).enumerate() {
            let txns = chunk.iter().map(|i| put(&key(*i), "v")).collect();
            s.apply(vec![Command::TxnBatch(txns)], 10 + n as u64);
        }
        let max_n = max as usize;
        assert_eq!(s.records(), max_n);
        assert_eq!(s.put("one-more", "v", 500).unwrap(), max + 1);
        assert_eq!(s.records(), max_n, "the bound holds");
        // The oldest key was forgotten (so it applies again), the others are still known.
        assert_eq!(s.put(&key(2), "v", 500).unwrap(), 3);
        assert_eq!(s.put(&key(0), "v", 500).unwrap(), max + 2);
    }

    #[test]
    fn m9_entries_survive_a_restart_and_travel_in_snapshots() {
        let mut s = Sm::new();
        s.put("k", "v", 10).unwrap();
        let index = s.index;
        let (_, path, _) =
            s.sm.build_snapshot(&s.dir.path().join("snap"), s.sm.applied_index(), 1)
                .unwrap();
        // Restart: the state machine is dropped and loaded again from the same storage.
        let Sm { sm, db, dir, .. } = s;
        drop(sm);
        let mut s = Sm {
            sm: StateMachine::open(&db, 1, SLOTS).unwrap().sm,
            index,
            db,
            dir,
        };
        assert_eq!(s.put("k", "v", 20).unwrap(), 1);
        assert_eq!(s.version(), 1);
        // A replica that installs the snapshot knows the key too.
        let mut other = Sm::new();
        other.sm.install_snapshot(&path, index).unwrap();
        other.sm.finish_install().unwrap();
        other.index = index;
        assert_eq!(other.put("k", "v", 30).unwrap(), 1);
        assert!(matches!(
            other.put("k", "w", 30),
            Err(Error::FailedPrecondition(_))
        ));
    }

    /// What a cross-group coordination sends for the one part of `whole` (keyed `whole`'s key)
    /// at this group: its prepare, decision and finish.
    struct Coordination {
        txn_id: u8,
        whole: TxnRequest,
    }

    impl Coordination {
        fn prepare(&self) -> Command {
            Command::Prepare(PrepareRequest {
                txn_id: vec![self.txn_id; 16].into(),
                primary_shard_key: b"order".to_vec().into(),
                part: Some(TxnRequest {
                    header: None,
                    ..self.whole.clone()
                }),
                report_results: true,
                ..Default::default()
            })
        }

        fn decide(&self, outcome: Option<TxnResponse>) -> Command {
            Command::Decide(DecideRequest {
                header: self.whole.header.clone(),
                txn_id: vec![self.txn_id; 16].into(),
                primary_shard_key: b"order".to_vec().into(),
                decision: Decision::RunSuccess as i32,
                request_digest: request_digest(&self.whole).to_vec().into(),
                outcome,
                ..Default::default()
            })
        }

        fn finish(&self, d: Decision) -> Command {
            Command::Finish(ordo_proto::v1::FinishRequest {
                txn_id: vec![self.txn_id; 16].into(),
                shard_key: b"order".to_vec().into(),
                decision: d as i32,
                ..Default::default()
            })
        }
    }

    fn decided(o: Result<Outcome>) -> ordo_proto::v1::DecideResponse {
        match o {
            Ok(Outcome::Decided(d)) => d,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn m9_a_cross_group_commit_keeps_its_key_so_another_coordination_answers_its_outcome() {
        let mut s = Sm::new();
        let first = Coordination {
            txn_id: 1,
            whole: put("k1", "v"),
        };
        let reported = match s.apply(vec![first.prepare()], 10).pop().unwrap() {
            Ok(Outcome::Prepared(p)) => p.success_results.expect("a keyed prepare reports"),
            other => panic!("{other:?}"),
        };
        let outcome = TxnResponse {
            succeeded: true,
            results: reported.results.clone(),
        };
        let d = decided(
            s.apply(vec![first.decide(Some(outcome.clone()))], 11)
                .remove(0),
        );
        assert_eq!((d.decision, d.repeat), (Decision::RunSuccess as i32, None));
        match s
            .apply(vec![first.finish(Decision::RunSuccess)], 12)
            .remove(0)
        {
            Ok(Outcome::Finished(f)) => assert_eq!(
                f.results, reported.results,
                "the prepare reported what the finish returns"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.version(), 1);

        // The client resent it after an unknown outcome: a new coordination (a new txn id)
        // prepares and decides again, and is aborted with the first outcome.
        let again = Coordination {
            txn_id: 2,
            whole: put("k1", "v"),
        };
        s.apply(vec![again.prepare()], 20).remove(0).unwrap();
        let d = decided(s.apply(vec![again.decide(None)], 21).remove(0));
        assert_eq!(d.decision, Decision::Abort as i32);
        assert_eq!(d.repeat, Some(outcome.clone()));
        s.apply(vec![again.finish(Decision::Abort)], 22)
            .remove(0)
            .unwrap();
        assert_eq!(s.version(), 1, "applied once");

        // The same request in one group (a reshard brought its items together): the same entry.
        match s.apply(vec![Command::Txn(put("k1", "v"))], 30).remove(0) {
            Ok(Outcome::Txn(r)) => assert_eq!(r, outcome),
            other => panic!("{other:?}"),
        }
        // Another request under the key is refused, and its coordination aborted.
        let other = Coordination {
            txn_id: 3,
            whole: put("k1", "w"),
        };
        let d = decided(s.apply(vec![other.decide(None)], 40).remove(0));
        assert_eq!(d.decision, Decision::Abort as i32);
        assert!(d.refused.contains("different request"), "{}", d.refused);
        assert_eq!(s.version(), 1);
    }

    #[test]
    fn m9_a_cross_group_commit_without_its_outcome_refuses_a_resend_with_advice() {
        let mut s = Sm::new();
        let big = Coordination {
            txn_id: 1,
            whole: put("k2", "v"),
        };
        let d = decided(s.apply(vec![big.decide(None)], 10).remove(0));
        assert_eq!(d.decision, Decision::RunSuccess as i32);
        let resend = Coordination {
            txn_id: 2,
            whole: put("k2", "v"),
        };
        let d = decided(s.apply(vec![resend.decide(None)], 11).remove(0));
        assert_eq!(d.decision, Decision::Abort as i32);
        assert!(
            d.refused.contains("DEDUP_OUTCOME_BYTES_MAX") && d.refused.contains("read the items"),
            "{}",
            d.refused
        );
        // A decision asked again for the same transaction answers the recorded one, before any
        // key is looked at (a coordinator's retried Decide).
        let d = decided(s.apply(vec![big.decide(None)], 12).remove(0));
        assert_eq!(
            (d.decision, d.refused.as_str()),
            (Decision::RunSuccess as i32, "")
        );
    }
}
