//! Idempotency keys (audit M9): a keyed write is applied at most once within its window, and the
//! same key again answers with the first outcome.
//!
//! A keyed write's entry lives in the reserved range (kind `b'i'`) of the slot of its first shard
//! key (a Txn's first compare, else its first op: the router's primary), so it moves with the
//! slot (a migration copies the slot's whole range, and writes made here go through `TxView`,
//! which appends them to the change log of a moving slot), travels in snapshots and is deleted
//! by a cleanup. Three records per slot, values in the item encoding (checksummed):
//! - `0 | key` → `expires_ms u64 | digest (12 bytes) | kept u8 | TxnResponse` (the outcome, when
//!   `kept`);
//! - `1 | expires_ms u64 BE | key` → empty: the slot's entries in expiry order;
//! - `2` → the slot's number of entries (in the version field).
//!
//! Time is the leader's clock and dedup window as stamped in the raft entry's context
//! ([`Stamp`]), never a replica's own clock or flags, so every replica expires and evicts the same
//! entries at the same index. Each keyed write removes at most [`DEDUP_EXPIRE_STEP`] expired
//! entries of its slot and, once the slot holds [`DEDUP_ENTRIES_PER_SLOT_MAX`], evicts the one
//! closest to expiry: bounded work per write, never a big batch on the driver. An expired entry
//! still present counts as absent.

use std::collections::{BTreeSet, HashMap, VecDeque};

use ordo_proto::v1::{DecideRequest, Decision, TxnRequest, TxnResponse};
use ordo_proto::{request_digest, REQUEST_DIGEST_BYTES as DIGEST_BYTES};
use prost::Message;
use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use super::feed::Capture;
use super::{keys, Apply, Command, TxView};
use crate::error::{Error, Result};
use crate::limits::{DEDUP_ENTRIES_PER_SLOT_MAX, DEDUP_EXPIRE_STEP, DEDUP_OUTCOME_BYTES_MAX};

/// The reserved-range kind of dedup records (`keys::reserved_key`).
pub(super) const KIND: u8 = b'i';
const ENTRY: u8 = 0;
const BY_EXPIRY: u8 = 1;
const COUNT: u8 = 2;
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

fn entry_key(slot: u32, key: &[u8]) -> Vec<u8> {
    keys::reserved_key(slot, KIND, &[&[ENTRY], key].concat())
}

fn expiry_prefix(slot: u32) -> Vec<u8> {
    keys::reserved_key(slot, KIND, &[BY_EXPIRY])
}

fn expiry_key(slot: u32, expires_ms: u64, key: &[u8]) -> Vec<u8> {
    [&expiry_prefix(slot), &expires_ms.to_be_bytes()[..], key].concat()
}

fn count_key(slot: u32) -> Vec<u8> {
    keys::reserved_key(slot, KIND, &[COUNT])
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

/// Looks a keyed write up. A live entry of another request under the key, or one whose outcome
/// was too large to keep, refuses it with FAILED_PRECONDITION.
pub(super) fn seen(data: &TransactionalTree, k: &Keyed) -> super::participant::Tx<Result<Seen>> {
    let ek = entry_key(k.slot, &k.key);
    let Some(raw) = data.get(&ek)? else {
        return Ok(Ok(Seen::New { expired: None }));
    };
    let (_, v) = keys::decode_value(&ek, &raw).map_err(ConflictableTransactionError::Abort)?;
    if v.len() < ENTRY_HEADER_BYTES {
        return Err(corrupt(&ek, "shorter than its header"));
    }
    let expires_ms = u64::from_be_bytes(v[..8].try_into().unwrap());
    if expires_ms <= k.stamp.now_ms {
        return Ok(Ok(Seen::New {
            expired: Some(expires_ms),
        }));
    }
    let key = keys::printable(&k.key);
    if v[8..8 + DIGEST_BYTES] != k.digest {
        return Ok(Err(Error::FailedPrecondition(format!(
            "idempotency key {key} was already used for a different request (within the dedup \
             window); use a new key for a new request"
        ))));
    }
    if v[8 + DIGEST_BYTES] == 0 {
        return Ok(Err(Error::FailedPrecondition(format!(
            "the request with idempotency key {key} was already applied, but its outcome was \
             over DEDUP_OUTCOME_BYTES_MAX ({DEDUP_OUTCOME_BYTES_MAX} bytes) and was not kept: \
             read the items back"
        ))));
    }
    let resp = TxnResponse::decode(&v[ENTRY_HEADER_BYTES..])
        .map_err(|e| corrupt(&ek, &format!("outcome does not decode: {e}")))?;
    Ok(Ok(Seen::Repeat(resp)))
}

/// What earlier apply runs learnt of each slot's dedup records (`memo.rs`): a keyed write then
/// reads neither its slot's count nor, while nothing there can have expired, its expiry index
/// (those reads were a tenth of a replica's CPU).
pub(super) type Hints = super::memo::SlotMemo<Hint>;

#[derive(Clone, Copy, Debug)]
pub(super) struct Hint {
    /// The slot's `COUNT` record.
    count: u64,
    /// No expiry-index record of the slot expires before this.
    expiry_floor: u64,
}

/// The oldest expiry-index records of the slots a run of entries writes keyed, and the ones the
/// run's sled transaction wrote and removed so far. A sled transaction can neither be scanned
/// nor read the tree under it (that would deadlock), so the head of each slot's index is read
/// before the transaction ([`Pending::load`]), as far as the run's keyed writes can consume it,
/// and corrected by these. The result is the same however a replica's entries are grouped into
/// transactions.
#[derive(Default, Clone)]
pub(super) struct Pending {
    heads: HashMap<u32, VecDeque<Vec<u8>>>,
    inserted: BTreeSet<Vec<u8>>,
    removed: BTreeSet<Vec<u8>>,
    /// Each slot's count and expiry floor as the run so far left them ([`Hints`]): the count is
    /// read with the head (or taken from the hint) and kept current by [`remember`].
    hints: HashMap<u32, Hint>,
}

impl Pending {
    /// Reads the head of the expiry index of every slot `batch` writes keyed: each keyed write
    /// takes at most `DEDUP_EXPIRE_STEP + 1` records from it (expiry, eviction) and removes
    /// one more (its own expired entry), so that many per write are enough.
    ///
    /// Only the records a write can consume are read: expiry takes records that expired by the
    /// write's stamp, so those up to the run's latest stamp (none at all when the slot's hint
    /// says none expires that early); eviction takes the oldest whatever its time, but only in a
    /// slot at its bound, so there the head is read whole.
    pub(super) fn load(
        tree: &sled::Tree,
        batch: &[Apply],
        slot_count: u32,
        hints: &Hints,
    ) -> Result<Pending> {
        let mut writes: HashMap<u32, usize> = HashMap::new();
        let latest = batch
            .iter()
            .filter_map(|a| a.stamp.map(|s| s.now_ms))
            .max()
            .unwrap_or(0);
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
        let mut pending = Pending::default();
        let known = hints.lock();
        for (slot, n) in writes {
            let hint = known.get(&slot).copied();
            let count = match hint {
                Some(h) => h.count,
                None => decode_count(slot, tree.get(count_key(slot))?)?,
            };
            let full = count + n as u64 >= DEDUP_ENTRIES_PER_SLOT_MAX;
            let expiry_floor = match hint {
                Some(h) if !full && h.expiry_floor > latest => h.expiry_floor,
                _ => {
                    let head =
                        read_head(tree, slot, (n + 1) * (DEDUP_EXPIRE_STEP + 2), full, latest)?;
                    // The index is in expiry order: its first record is the slot's oldest.
                    let floor = head.front().map_or(u64::MAX, |ik| expires_of(slot, ik));
                    pending.heads.insert(slot, head);
                    floor
                }
            };
            let hint = Hint {
                count,
                expiry_floor,
            };
            pending.hints.insert(slot, hint);
        }
        Ok(pending)
    }

    /// Each slot's hint as the run left it, for [`Hints`] once its transaction committed.
    pub(super) fn hints(&self) -> &HashMap<u32, Hint> {
        &self.hints
    }

    /// Up to `n` of the slot's oldest expiry-index records, in order.
    fn oldest(&mut self, slot: u32, n: usize) -> Vec<Vec<u8>> {
        let prefix = expiry_prefix(slot);
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

    fn insert(&mut self, k: Vec<u8>) {
        self.removed.remove(&k);
        self.inserted.insert(k);
    }

    fn remove(&mut self, k: Vec<u8>) {
        self.inserted.remove(&k);
        self.removed.insert(k);
    }
}

/// Up to `want` of the first records of `slot`'s expiry index: all of them (`whole`), or those
/// expired by `latest` and the first one after them (which tells the slot's hint how long no
/// read is needed).
fn read_head(
    tree: &sled::Tree,
    slot: u32,
    want: usize,
    whole: bool,
    latest: u64,
) -> Result<VecDeque<Vec<u8>>> {
    let mut head = VecDeque::new();
    for ik in tree.scan_prefix(expiry_prefix(slot)).keys() {
        let ik = ik?;
        let late = expires_of(slot, &ik) > latest;
        head.push_back(ik.to_vec());
        if head.len() >= want || (late && !whole) {
            break;
        }
    }
    Ok(head)
}

/// The expiry time of an expiry-index record of `slot`.
fn expires_of(slot: u32, ik: &[u8]) -> u64 {
    let at = expiry_prefix(slot).len();
    u64::from_be_bytes(ik[at..at + 8].try_into().unwrap())
}

/// A slot's entry count from its `COUNT` record (0 when there is none).
fn decode_count(slot: u32, raw: Option<sled::IVec>) -> Result<u64> {
    match raw {
        None => Ok(0),
        Some(raw) => Ok(keys::decode_value(&count_key(slot), &raw)?.0),
    }
}

fn read_count(data: &TransactionalTree, slot: u32) -> super::participant::Tx<u64> {
    decode_count(slot, data.get(count_key(slot))?).map_err(ConflictableTransactionError::Abort)
}

/// Removes the entry an expiry-index record stands for, and the record.
fn drop_entry(view: &mut TxView, pending: &mut Pending, slot: u32, ik: Vec<u8>) -> Result<()> {
    let key = &ik[expiry_prefix(slot).len() + 8..];
    view.delete_raw(slot, entry_key(slot, key))?;
    view.delete_raw(slot, ik.clone())?;
    pending.remove(ik);
    Ok(())
}

/// Records a keyed write's outcome (after it was applied; `None`: not known here, kept as "over
/// the bound"): removes up to [`DEDUP_EXPIRE_STEP`] expired entries of its slot, evicts the
/// oldest one if the slot is full, then stores its own entry.
pub(super) fn remember(
    view: &mut TxView,
    pending: &mut Pending,
    k: &Keyed,
    expired: Option<u64>,
    resp: Option<&TxnResponse>,
) -> super::participant::Tx<()> {
    let abort = ConflictableTransactionError::Abort;
    let slot = k.slot;
    let mut count = match pending.hints.get(&slot) {
        Some(h) => h.count,
        None => read_count(view.data, slot)?,
    };
    if let Some(old) = expired {
        // The entry itself is overwritten below.
        let ik = expiry_key(slot, old, &k.key);
        view.delete_raw(slot, ik.clone()).map_err(abort)?;
        pending.remove(ik);
        count = count.saturating_sub(1);
    }
    let mut oldest = pending
        .oldest(slot, DEDUP_EXPIRE_STEP + 1)
        .into_iter()
        .peekable();
    let expires = |ik: &Vec<u8>| expires_of(slot, ik);
    for _ in 0..DEDUP_EXPIRE_STEP {
        let Some(ik) = oldest.next_if(|ik| expires(ik) <= k.stamp.now_ms) else {
            break;
        };
        drop_entry(view, pending, slot, ik).map_err(abort)?;
        count = count.saturating_sub(1);
    }
    if count >= DEDUP_ENTRIES_PER_SLOT_MAX {
        if let Some(ik) = oldest.next() {
            drop_entry(view, pending, slot, ik).map_err(abort)?;
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
    let ik = expiry_key(slot, expires_ms, &k.key);
    let writes = [
        (entry_key(slot, &k.key), keys::encode_value(1, &v)),
        (ik.clone(), keys::encode_value(1, &[])),
        (count_key(slot), keys::encode_value(count + 1, &[])),
    ];
    for (rk, rv) in writes {
        view.put_raw(slot, rk, rv).map_err(abort)?;
    }
    pending.insert(ik);
    if let Some(h) = pending.hints.get_mut(&slot) {
        h.count = count + 1;
        h.expiry_floor = h.expiry_floor.min(expires_ms);
    }
    Ok(())
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

        /// The dedup records of the slot of "order": (entries, index records, count).
        fn records(&self) -> (usize, usize, u64) {
            let slot = ordo_proto::slot_of(b"order", SLOTS);
            let n = |kind: u8| {
                let prefix = keys::reserved_key(slot, KIND, &[kind]);
                self.sm.data.scan_prefix(prefix).count()
            };
            let count = match self.sm.data.get(count_key(slot)).unwrap() {
                Some(raw) => keys::decode_value(b"count", &raw).unwrap().0,
                None => 0,
            };
            (n(ENTRY), n(BY_EXPIRY), count)
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
        assert_eq!(s.records(), (2, 2, 2));
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
        assert_eq!(s.records(), (2, 2, 2));
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
        assert_eq!(s.records(), (1, 1, 1), "the expired entry was replaced");
        // Expired entries of the slot go a few per keyed write, never in one big batch.
        for i in 0..10 {
            s.put(&format!("old{i}"), "v", 5_000).unwrap();
        }
        assert_eq!(
            s.records(),
            (10, 10, 10),
            "the first old one expired the entry of k"
        );
        s.put("new", "v", 5_000 + WINDOW_MS).unwrap();
        let left = 10 - DEDUP_EXPIRE_STEP;
        assert_eq!(s.records(), (left + 1, left + 1, left as u64 + 1));
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
        /// What apply runs remember (`Hints`, `feed::Metas`) only spares reads: a replica that
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
        assert_eq!(s.records(), (max_n, max_n, max));
        assert_eq!(s.put("one-more", "v", 500).unwrap(), max + 1);
        assert_eq!(s.records(), (max_n, max_n, max), "the bound holds");
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
