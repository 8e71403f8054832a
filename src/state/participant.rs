//! The participant side of cross-group transactions: locks, prepared parts and decisions, all
//! replicated state kept in the *reserved range* of their slot in the `data` tree
//! (`keys::reserved_key`), changed only by applying raft commands inside the state machine's
//! transaction, through `TxView` (so a write to a moving slot is also in its change log). A slot
//! move copies its whole range, so they move with their slot; snapshots carry them.
//!
//! - lock, kind `l`: `slot | 0xffff | l | len(shard_key) | shard_key | key` (the item's data key
//!   with the reserved marker after the slot) → who holds the item;
//! - prepared part, kind `p`: `slot | 0xffff | p | txn_id` → this group's part
//!   (`PrepareRequest`), until it finishes. A part spanning several slots has one copy in each
//!   of them, so that a finish naming any of its shard keys finds it, and a slot's fence sees it;
//! - decision, kind `r`: `slot | 0xffff | r | txn_id`, under the slot of the primary shard key →
//!   the decision, until the coordinator forgets it. It moves with the primary's slot, so a
//!   resolver asking the slot's new owner finds it.
//!
//! Values use the item encoding (`crc32 | version 0 | body`). Ages of locks are never stored:
//! each replica measures them on its own clock, from when it applied them (`LockAges`). The
//! router coordinates (see `router/src/coordinator.rs`); this module only decides what one group
//! does with one command.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ordo_proto::v1::{
    txn_op, DecideRequest, Decision, FeedAckRequest, FinishRequest, FinishResponse, ForgetRequest,
    PartResults, PrepareRequest, PrepareResponse, TxnOp, TxnRequest,
};
use prost::Message as _;
use sled::transaction::ConflictableTransactionError;

use crate::error::{hex, Error, Result};
use crate::limits::DEDUP_OUTCOME_BYTES_MAX;
use crate::state::keys;
use crate::state::txn::{self, Budget, ItemView};
use crate::state::TxView;

/// Reserved-range kinds (`keys::reserved_key`) of the records kept here.
pub const LOCK_KIND: u8 = b'l';
pub const PART_KIND: u8 = b'p';
const RECORD_KIND: u8 = b'r';
pub const TXN_ID_BYTES: usize = 16;
/// Bytes of a data key before its shard key's length (the slot).
const SLOT_BYTES: usize = 4;

/// Inside the state machine's sled transaction: an outer error aborts the whole apply (storage
/// failure, corruption); the inner `Result` is this command's outcome.
pub type Tx<T> = std::result::Result<T, ConflictableTransactionError<Error>>;

fn corrupt(what: String) -> ConflictableTransactionError<Error> {
    ConflictableTransactionError::Abort(Error::Corruption(what))
}

/// The body of a stored record, its checksum verified.
fn body<'a>(what: &str, key: &[u8], raw: &'a [u8]) -> Tx<&'a [u8]> {
    keys::decode_value(key, raw)
        .map(|(_, body)| body)
        .map_err(|e| corrupt(format!("{what}: {e}")))
}

fn slot_bytes(data_key: &[u8]) -> u32 {
    u32::from_be_bytes(data_key[..SLOT_BYTES].try_into().unwrap())
}

/// The lock key of a data key (item).
pub fn lock_key(data_key: &[u8]) -> Vec<u8> {
    keys::reserved_key(slot_bytes(data_key), LOCK_KIND, &data_key[SLOT_BYTES..])
}

/// The lock keys of every item of one shard key (`keys::shard_prefix`) start with this.
pub fn lock_prefix(shard_prefix: &[u8]) -> Vec<u8> {
    lock_key(shard_prefix)
}

/// The data key (item) a lock key locks.
pub fn locked_item(lock_key: &[u8]) -> Vec<u8> {
    let rest = keys::decode_reserved(lock_key).map_or(&[][..], |(_, _, rest)| rest);
    [&lock_key[..SLOT_BYTES], rest].concat()
}

fn part_key(slot: u32, txn_id: &[u8]) -> Vec<u8> {
    keys::reserved_key(slot, PART_KIND, txn_id)
}

/// The decision key of a transaction whose primary shard key is in `slot`.
fn decision_key(slot: u32, txn_id: &[u8]) -> Vec<u8> {
    keys::reserved_key(slot, RECORD_KIND, txn_id)
}

/// One transaction holding a lock.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    pub txn_id: Vec<u8>,
    pub started_ms: u64,
    pub priority_ms: u64,
    pub primary: Vec<u8>,
}

/// Who holds an item: one writing transaction, or any number of read-only ones (they change
/// nothing, so they share it; plain reads pass a read lock, writes do not).
#[derive(Debug, Clone, PartialEq)]
pub struct Lock {
    pub write: bool,
    pub holders: Vec<Holder>,
}

impl Lock {
    fn encode(&self) -> Vec<u8> {
        let mut body = vec![self.write as u8];
        for h in &self.holders {
            body.extend_from_slice(&h.txn_id);
            body.extend_from_slice(&h.started_ms.to_be_bytes());
            body.extend_from_slice(&h.priority_ms.to_be_bytes());
            body.extend_from_slice(&(h.primary.len() as u16).to_be_bytes());
            body.extend_from_slice(&h.primary);
        }
        body
    }

    pub fn decode(lock_key: &[u8], raw: &[u8]) -> Tx<Lock> {
        let body = body("lock", lock_key, raw)?;
        let bad = || {
            corrupt(format!(
                "tree data, lock {}: malformed",
                keys::printable(lock_key)
            ))
        };
        let (&mode, mut rest) = body.split_first().ok_or_else(bad)?;
        let mut holders = Vec::new();
        while !rest.is_empty() {
            const FIXED: usize = TXN_ID_BYTES + 18;
            if rest.len() < FIXED {
                return Err(bad());
            }
            let u64_at = |at: usize| u64::from_be_bytes(rest[at..at + 8].try_into().unwrap());
            let (started_ms, priority_ms) = (u64_at(TXN_ID_BYTES), u64_at(TXN_ID_BYTES + 8));
            let len = u16::from_be_bytes(rest[FIXED - 2..FIXED].try_into().unwrap()) as usize;
            let end = FIXED + len;
            if rest.len() < end {
                return Err(bad());
            }
            holders.push(Holder {
                txn_id: rest[..TXN_ID_BYTES].to_vec(),
                started_ms,
                priority_ms,
                primary: rest[FIXED..end].to_vec(),
            });
            rest = &rest[end..];
        }
        if holders.is_empty() || mode > 1 || (mode == 1 && holders.len() > 1) {
            return Err(bad());
        }
        Ok(Lock {
            write: mode == 1,
            holders,
        })
    }

    fn held_by(&self, txn_id: &[u8]) -> bool {
        self.holders.iter().any(|h| h.txn_id == txn_id)
    }

    /// The refusal of a request that met this lock on `data_key` (naming its oldest holder,
    /// the one a resolver may abort first, and how long this replica has seen it held).
    pub fn refusal(self, data_key: &[u8], ages: &LockAges) -> Error {
        let item = match keys::decode_key(data_key) {
            Ok((_, sk, k)) => format!("({}, {})", keys::printable(sk), keys::printable(k)),
            Err(_) => keys::printable(data_key),
        };
        let h = self
            .holders
            .into_iter()
            .min_by_key(|h| (h.priority_ms, h.started_ms))
            .expect("a lock has a holder");
        Error::Locked {
            item,
            age_ms: ages.age(&h.txn_id).as_millis() as u64,
            txn_id: h.txn_id,
            primary_shard_key: h.primary,
            started_ms: h.started_ms,
            priority_ms: h.priority_ms,
            read: !self.write,
        }
    }
}

/// How long each transaction holding locks here has held them, by this replica's own monotonic
/// clock: from when it applied the transaction's first lock here (or from when it opened or
/// installed a snapshot, for locks it found then: a restart only makes locks look younger).
/// Never replicated and never compared with another machine's clock, so clock skew cannot make
/// a live transaction look expired or a dead one young. It only decides when to *propose* a
/// resolution; every replica applies the same commands.
#[derive(Default)]
pub struct LockAges(Mutex<HashMap<Vec<u8>, Instant>>);

/// A change to [`LockAges`] made by an applied command, kept until its sled transaction commits.
pub enum AgeEvent {
    Locked(Vec<u8>),
    Released(Vec<u8>),
}

impl LockAges {
    /// How long `txn_id` has held its locks here (zero if it holds none).
    pub fn age(&self, txn_id: &[u8]) -> Duration {
        self.0
            .lock()
            .unwrap()
            .get(txn_id)
            .map_or(Duration::ZERO, Instant::elapsed)
    }

    /// Whether `txn_id` holds locks here.
    pub fn holds(&self, txn_id: &[u8]) -> bool {
        self.0.lock().unwrap().contains_key(txn_id)
    }

    /// Tests: every holder as if it had been seen `by` earlier.
    #[cfg(test)]
    pub fn backdate(&self, by: Duration) {
        for at in self.0.lock().unwrap().values_mut() {
            *at = at.checked_sub(by).expect("the clock runs long enough");
        }
    }

    pub fn record(&self, events: Vec<AgeEvent>) {
        if events.is_empty() {
            return;
        }
        let mut m = self.0.lock().unwrap();
        for e in events {
            match e {
                AgeEvent::Locked(id) => {
                    m.entry(id).or_insert_with(Instant::now);
                }
                AgeEvent::Released(id) => {
                    m.remove(&id);
                }
            }
        }
    }

    /// Starts the ages of every holder of the locks found in `data` (at open, after a snapshot
    /// install) from now; returns how many locks there are.
    pub fn reset(&self, data: &sled::Tree, slot_count: u32) -> Result<i64> {
        let mut m = self.0.lock().unwrap();
        m.clear();
        let now = Instant::now();
        let mut n = 0;
        for slot in 0..slot_count {
            for kv in data.scan_prefix(keys::reserved_prefix(slot, LOCK_KIND)) {
                let (k, v) = kv?;
                let lock = Lock::decode(&k, &v).map_err(untx)?;
                for h in lock.holders {
                    m.entry(h.txn_id).or_insert(now);
                }
                n += 1;
            }
        }
        Ok(n)
    }
}

/// A transaction error outside a transaction.
pub fn untx(e: ConflictableTransactionError<Error>) -> Error {
    match e {
        ConflictableTransactionError::Abort(e) => e,
        other => Error::Storage(format!("{other:?}")),
    }
}

/// Every `(shard_key, key)` a transaction reads (compares, gets) or writes, once each.
pub fn items(t: &TxnRequest) -> Vec<(&[u8], &[u8])> {
    let mut out: Vec<(&[u8], &[u8])> = Vec::new();
    let ops = t.success.iter().chain(&t.failure).filter_map(|op| {
        Some(match op.op.as_ref()? {
            txn_op::Op::Put(p) => (p.shard_key.as_ref(), p.key.as_ref()),
            txn_op::Op::Delete(d) => (d.shard_key.as_ref(), d.key.as_ref()),
            txn_op::Op::Get(g) => (g.shard_key.as_ref(), g.key.as_ref()),
            // An event, not an item: nothing to lock.
            txn_op::Op::Emit(_) => return None,
            // A consumer group's state, not an item: its lock is on a pseudo item
            // (`ack_data_key`, see `lock_data_keys`).
            txn_op::Op::FeedAck(_) => return None,
        })
    });
    for item in t
        .compares
        .iter()
        .map(|c| (c.shard_key.as_ref(), c.key.as_ref()))
        .chain(ops)
    {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// The transactional acks of both branches of `t`.
pub fn feed_acks(t: &TxnRequest) -> impl Iterator<Item = &FeedAckRequest> {
    t.success
        .iter()
        .chain(&t.failure)
        .filter_map(|op| match &op.op {
            Some(txn_op::Op::FeedAck(a)) => Some(a),
            _ => None,
        })
}

/// The shard key of the pseudo items that transactional acks lock (not a valid client shard
/// key's prefix clash: a client item under it only shares the lock).
const ACK_SHARD_KEY: &[u8] = b"\xfffeed-ack";

/// The pseudo item a transactional ack of a prepared part locks: the event's delivery in its
/// group, so no other ack of it (another Txn's, the dispatcher's flush) applies between the
/// prepare and the finish.
pub fn ack_data_key(group: &str, slot: u32, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(group.len() + 9);
    key.extend_from_slice(group.as_bytes());
    key.push(b'/');
    key.extend_from_slice(&seq.to_be_bytes());
    keys::encode_key(slot, ACK_SHARD_KEY, &key)
}

/// The refusal of an ack of `(group, slot, seq)` while a prepared part holds its lock.
pub(super) fn ack_lock(v: &TxView, group: &str, slot: u32, seq: u64) -> Result<Option<Error>> {
    let data_key = ack_data_key(group, slot, seq);
    let lk = lock_key(&data_key);
    match v.data.get(&lk).map_err(super::tx_err)? {
        Some(raw) => {
            let lock = Lock::decode(&lk, &raw).map_err(untx)?;
            Ok(Some(lock.refusal(&data_key, v.ages)))
        }
        None => Ok(None),
    }
}

/// The data keys a transaction's locks are on: its items', then its transactional acks'.
pub fn lock_data_keys(t: &TxnRequest, slot_count: u32) -> Vec<Vec<u8>> {
    let items = items(t)
        .into_iter()
        .map(|(sk, k)| keys::encode_key(ordo_proto::slot_of(sk, slot_count), sk, k));
    let acks = feed_acks(t).map(|a| ack_data_key(&a.group, a.slot, a.seq));
    items.chain(acks).collect()
}

/// The slots of a part's items and acks, each once, in that order (a part has a copy in each).
fn part_slots(part: &TxnRequest, slot_count: u32) -> Vec<u32> {
    let mut slots = Vec::new();
    for data_key in lock_data_keys(part, slot_count) {
        let s = slot_bytes(&data_key);
        if !slots.contains(&s) {
            slots.push(s);
        }
    }
    slots
}

/// Refuses (inner `Err(Locked)`) if an item of `t` is locked, other than by `own`'s write lock.
pub(super) fn check_unlocked(v: &TxView, t: &TxnRequest, own: Option<&[u8]>) -> Tx<Result<()>> {
    for data_key in lock_data_keys(t, v.slot_count) {
        let lk = lock_key(&data_key);
        if let Some(raw) = v.data.get(&lk)? {
            let lock = Lock::decode(&lk, &raw)?;
            let ours = lock.write && own.is_some_and(|id| lock.held_by(id));
            if !ours {
                return Ok(Err(lock.refusal(&data_key, v.ages)));
            }
        }
    }
    Ok(Ok(()))
}

fn decision_byte(d: Decision) -> u8 {
    d as i32 as u8
}

fn decision_of(v: &TxView, slot: u32, txn_id: &[u8]) -> Tx<Option<Decision>> {
    let rk = decision_key(slot, txn_id);
    match v.data.get(&rk)? {
        None => Ok(None),
        Some(raw) => {
            let body = body("decision", &rk, &raw)?;
            Decision::try_from(body.first().copied().unwrap_or(0) as i32)
                .ok()
                .filter(|d| *d != Decision::Unspecified && *d != Decision::Pending)
                .map(Some)
                .ok_or_else(|| {
                    corrupt(format!("tree data, decision {}: bad decision", hex(txn_id)))
                })
        }
    }
}

fn part_of(v: &TxView, slot: u32, txn_id: &[u8]) -> Tx<Option<PrepareRequest>> {
    let pk = part_key(slot, txn_id);
    match v.data.get(&pk)? {
        None => Ok(None),
        Some(raw) => {
            let body = body("prepared transaction", &pk, &raw)?;
            PrepareRequest::decode(body).map(Some).map_err(|e| {
                corrupt(format!(
                    "tree data, prepared transaction {}: {e}",
                    hex(txn_id)
                ))
            })
        }
    }
}

/// Keeps the part under every slot of its items, with the prepare's commit time in the version
/// field: it holds the slots' resolved time of the change feed below it until the part finishes.
fn keep_part(v: &mut TxView, p: &PrepareRequest, slots: &[u32]) -> Tx<()> {
    let encoded = p.encode_to_vec();
    let ts = v.feed.ts();
    for &s in slots {
        v.put_record_at(part_key(s, &p.txn_id), ts, &encoded)?;
    }
    Ok(())
}

/// The oldest prepare time of the parts kept in `slot` (those not finished), if any.
pub fn oldest_part_ts(data: &sled::Tree, slot: u32) -> Result<Option<u64>> {
    let mut oldest = None;
    for kv in data.scan_prefix(keys::reserved_prefix(slot, PART_KIND)) {
        let (k, raw) = kv?;
        let (ts, _) = keys::decode_value(&k, &raw)?;
        oldest = Some(oldest.map_or(ts, |o: u64| o.min(ts)));
    }
    Ok(oldest)
}

/// Prepare: lock every item of this group's part, keep the part, evaluate its compares.
pub(super) fn prepare(v: &mut TxView, p: &PrepareRequest) -> Tx<Result<PrepareResponse>> {
    let part = p.part.clone().unwrap_or_default();
    let primary_slot = ordo_proto::slot_of(&p.primary_shard_key, v.slot_count);
    if decision_of(v, primary_slot, &p.txn_id)? == Some(Decision::Abort) {
        return Ok(Err(Error::FailedPrecondition(format!(
            "transaction {} was already aborted (a lock resolver timed it out); retry it",
            hex(&p.txn_id)
        ))));
    }
    let slots = part_slots(&part, v.slot_count);
    let Some(&first) = slots.first() else {
        return Ok(Err(Error::InvalidArgument("the part names no item".into())));
    };
    // The items' values hold still from here to the finish (locked), which runs the decided
    // branch whatever its results weigh: so a part that might return too much is refused now.
    let mut result_bytes = [0; 2];
    let mut reported = [None, None];
    for ((ops, bytes), results) in [&part.success, &part.failure]
        .into_iter()
        .zip(&mut result_bytes)
        .zip(&mut reported)
    {
        let mut budget = Budget::txn();
        let fits = txn::fits(&*v, ops, &mut budget);
        if let Err(over) = fits.map_err(ConflictableTransactionError::Abort)? {
            return Ok(Err(Error::ResourceExhausted(format!(
                "{over}; the part was not prepared"
            ))));
        }
        *bytes = budget.used() as u64;
        if p.report_results && !p.read_only && budget.used() <= DEDUP_OUTCOME_BYTES_MAX {
            let run = txn::results_of(&*v, ops, &mut Budget::txn());
            let ran = run.map_err(ConflictableTransactionError::Abort)?;
            *results = Some(PartResults {
                results: ran.expect("the same ops fit a moment ago"),
            });
        }
    }
    let [success_results, failure_results] = reported;
    let report = |r: Result<PrepareResponse>| {
        r.map(|r| PrepareResponse {
            success_results,
            failure_results,
            ..r
        })
    };
    let again = part_of(v, first, &p.txn_id)?.is_some();
    if again && !p.read_only {
        // A retried prepare: the locks are ours already.
        return compares_held(v, &part, result_bytes).map(report);
    }
    // An ack must be one that may apply now; its lock then keeps it so until the finish.
    for ack in feed_acks(&part) {
        if let Err(e) = v
            .check_txn_ack(ack)
            .map_err(ConflictableTransactionError::Abort)?
        {
            return Ok(Err(e));
        }
    }
    let data_keys = lock_data_keys(&part, v.slot_count);
    let locked = if p.read_only {
        lock_for_reading(v, p, &data_keys, &slots)?
    } else {
        lock_for_writing(v, p, &part, &data_keys, &slots)?
    };
    if let Err(e) = locked {
        return Ok(Err(e));
    }
    compares_held(v, &part, result_bytes).map(report)
}

/// The holder a prepare's locks name.
fn holder(p: &PrepareRequest) -> Holder {
    Holder {
        txn_id: p.txn_id.to_vec(),
        started_ms: p.started_ms,
        priority_ms: p.priority_ms,
        primary: p.primary_shard_key.to_vec(),
    }
}

/// Whether the part's compares hold now, and what its branches return (the answer of a
/// prepare).
fn compares_held(
    view: &mut impl ItemView,
    part: &TxnRequest,
    [success_result_bytes, failure_result_bytes]: [u64; 2],
) -> Tx<Result<PrepareResponse>> {
    let compares_only = TxnRequest {
        compares: part.compares.clone(),
        ..Default::default()
    };
    // No ops: nothing to write, no results to bound.
    let evaluated = txn::evaluate_reads(&*view, &compares_only, &mut Budget::txn());
    Ok(evaluated
        .map_err(ConflictableTransactionError::Abort)?
        .map(|r| PrepareResponse {
            compares_held: r.succeeded,
            success_result_bytes,
            failure_result_bytes,
            ..Default::default()
        }))
}

/// A reader: share read locks, take every item no writer holds, keep them, and report a
/// writer's item if there is one (the next prepare goes on from here).
fn lock_for_reading(
    v: &mut TxView,
    p: &PrepareRequest,
    data_keys: &[Vec<u8>],
    slots: &[u32],
) -> Tx<Result<()>> {
    keep_part(v, p, slots)?;
    let me = holder(p);
    let mut blocked: Option<Error> = None;
    for data_key in data_keys {
        let lk = lock_key(data_key);
        match v.data.get(&lk)? {
            None => {
                let lock = Lock {
                    write: false,
                    holders: vec![me.clone()],
                };
                v.put_record(lk, &lock.encode())?;
                v.locks += 1;
                v.aged.push(AgeEvent::Locked(me.txn_id.clone()));
            }
            Some(raw) => {
                let mut lock = Lock::decode(&lk, &raw)?;
                if lock.write {
                    if blocked.is_none() {
                        blocked = Some(lock.refusal(data_key, v.ages));
                    }
                } else if !lock.held_by(&p.txn_id) {
                    lock.holders.push(me.clone());
                    v.put_record(lk, &lock.encode())?;
                    v.aged.push(AgeEvent::Locked(me.txn_id.clone()));
                }
            }
        }
    }
    Ok(blocked.map_or(Ok(()), Err))
}

/// A writer: every item of the part free (or already ours), then a write lock on each, all or
/// none, and the part kept.
fn lock_for_writing(
    v: &mut TxView,
    p: &PrepareRequest,
    part: &TxnRequest,
    data_keys: &[Vec<u8>],
    slots: &[u32],
) -> Tx<Result<()>> {
    if let Err(e) = check_unlocked(v, part, Some(&p.txn_id))? {
        return Ok(Err(e));
    }
    let lock = Lock {
        write: true,
        holders: vec![holder(p)],
    }
    .encode();
    for data_key in data_keys {
        v.put_record(lock_key(data_key), &lock)?;
        v.locks += 1;
    }
    v.aged.push(AgeEvent::Locked(p.txn_id.to_vec()));
    keep_part(v, p, slots)?;
    Ok(Ok(()))
}

/// Decide, on the primary's group, step 1: the decision already recorded (the first one wins).
pub(super) fn decided(v: &TxView, d: &DecideRequest) -> Tx<Option<Decision>> {
    let slot = ordo_proto::slot_of(&d.primary_shard_key, v.slot_count);
    decision_of(v, slot, &d.txn_id)
}

/// Step 2: the decision to record when none is. A resolver's (`resolve`) or a wounder's request
/// aborts the transaction unless it is decided: whether it is old enough was judged before it
/// was proposed, by the clocks of the groups holding its locks.
pub(super) fn wanted(d: &DecideRequest) -> Result<Decision> {
    if d.wound || d.resolve {
        return Ok(Decision::Abort);
    }
    match Decision::try_from(d.decision) {
        Ok(x @ (Decision::RunSuccess | Decision::RunFailure | Decision::Abort)) => Ok(x),
        _ => Err(Error::InvalidArgument(format!(
            "decision {} is not commit-success, commit-failure or abort",
            d.decision
        ))),
    }
}

/// Step 3: records `decision` (a keyed commit first checks its key, in `apply.rs`).
pub(super) fn record(v: &mut TxView, d: &DecideRequest, decision: Decision) -> Tx<()> {
    let slot = ordo_proto::slot_of(&d.primary_shard_key, v.slot_count);
    v.put_record(decision_key(slot, &d.txn_id), &[decision_byte(decision)])
}

/// Finish: run the decided branch of this group's part (its results within `budget`) and
/// release its locks. The part is found under the slot of the request's shard key (any shard key
/// of the part).
pub(super) fn finish(
    v: &mut TxView,
    f: &FinishRequest,
    budget: &mut Budget,
) -> Tx<Result<FinishResponse>> {
    let slot = ordo_proto::slot_of(&f.shard_key, v.slot_count);
    let Some(p) = part_of(v, slot, &f.txn_id)? else {
        return Ok(Ok(FinishResponse {
            found: false,
            results: vec![],
        }));
    };
    let part = p.part.unwrap_or_default();
    let ops = match Decision::try_from(f.decision) {
        Ok(Decision::RunSuccess) => part.success.clone(),
        Ok(Decision::RunFailure) => part.failure.clone(),
        Ok(Decision::Abort) => vec![],
        _ => {
            return Ok(Err(Error::InvalidArgument(format!(
                "finish with decision {}: expected commit-success, commit-failure or abort",
                f.decision
            ))))
        }
    };
    // The decided branch's acks were checked at the prepare and locked since: they apply as
    // they are (a redelivery meanwhile may have raised the attempt; the lock kept every other
    // ack of the event out).
    let (acks, ops): (Vec<TxnOp>, Vec<TxnOp>) = ops
        .into_iter()
        .partition(|op| matches!(op.op, Some(txn_op::Op::FeedAck(_))));
    let txn = TxnRequest {
        success: ops,
        ..Default::default()
    };
    let abort = ConflictableTransactionError::Abort;
    // The decision is taken: the writes are applied even over the budget (which the prepare
    // checked, so only a part prepared by an older version can be over it). Their events carry
    // the transaction's id.
    // (An error aborts the whole apply transaction, the feed's writer with it.)
    v.feed.in_txn(Some(&f.txn_id));
    let results = match txn::evaluate(v, &txn, budget).map_err(abort)? {
        Ok(r) => Ok(r.results),
        Err(over) => {
            txn::apply_writes(v, &txn.success).map_err(abort)?;
            Err(Error::ResourceExhausted(format!(
                "{over}; the decided branch was applied in full, but its results are not returned"
            )))
        }
    };
    v.feed.in_txn(None);
    for op in &acks {
        if let Some(txn_op::Op::FeedAck(a)) = &op.op {
            v.apply_txn_ack(a).map_err(abort)?;
        }
    }
    for data_key in lock_data_keys(&part, v.slot_count) {
        let lk = lock_key(&data_key);
        if let Some(raw) = v.data.get(&lk)? {
            let mut lock = Lock::decode(&lk, &raw)?;
            if lock.held_by(&f.txn_id) {
                lock.holders.retain(|h| h.txn_id != f.txn_id.as_ref());
                if lock.holders.is_empty() {
                    v.remove_record(lk)?;
                    v.locks -= 1;
                } else {
                    v.put_record(lk, &lock.encode())?;
                }
            }
        }
    }
    for s in part_slots(&part, v.slot_count) {
        v.remove_record(part_key(s, &f.txn_id))?;
    }
    v.aged.push(AgeEvent::Released(f.txn_id.to_vec()));
    Ok(results.map(|results| FinishResponse {
        found: true,
        results,
    }))
}

/// Forget, on the primary's group, once every participant finished.
pub(super) fn forget(v: &mut TxView, f: &ForgetRequest) -> Tx<()> {
    let slot = ordo_proto::slot_of(&f.primary_shard_key, v.slot_count);
    v.remove_record(decision_key(slot, &f.txn_id))
}

/// Whether `slot` holds a lock or a prepared part (a move of the slot waits until it does not).
pub fn slot_busy(data: &sled::Tree, slot: u32) -> bool {
    [LOCK_KIND, PART_KIND].iter().any(|&kind| {
        data.scan_prefix(keys::reserved_prefix(slot, kind))
            .next()
            .is_some()
    })
}

#[cfg(test)]
mod tests;
