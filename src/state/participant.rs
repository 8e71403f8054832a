//! The participant side of cross-group transactions: locks, prepared parts and decisions,
//! all replicated state kept in the `sys` tree (so they survive leader changes and travel in
//! snapshots), changed only by applying raft commands inside the state machine's transaction.
//!
//! - `2pc/lock/<data key>` → the transaction holding the item: `txn_id | started_ms | primary`;
//! - `2pc/txn/<txn_id>` → this group's prepared part (`PrepareRequest`), until it finishes;
//! - `2pc/rec/<primary's slot><txn_id>` → the decision (on the primary's group), until the
//!   coordinator forgets it. Under the slot, so that a slot move can see it (it waits for it).
//!
//! Every value starts with a crc32 of the rest. The router coordinates (see
//! `router/src/twopc.rs`); this module only decides what one group does with one command.

use ordo_proto::v1::{
    txn_op, DecideRequest, DecideResponse, Decision, FinishRequest, FinishResponse, ForgetRequest,
    PrepareRequest, PrepareResponse, TxnRequest,
};
use prost::Message as _;
use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use crate::error::{hex, Error, Result};
use crate::limits::TXN_LOCK_TIMEOUT_MS;
use crate::state::keys;
use crate::state::txn::{self, Budget, ItemView};

pub const PREFIX: &[u8] = b"2pc/";
const LOCK_PREFIX: &[u8] = b"2pc/lock/";
const PART_PREFIX: &[u8] = b"2pc/txn/";
const RECORD_PREFIX: &[u8] = b"2pc/rec/";
pub const TXN_ID_BYTES: usize = 16;

/// Inside the state machine's sled transaction: an outer error aborts the whole apply (storage
/// failure, corruption); the inner `Result` is this command's outcome.
pub type Tx<T> = std::result::Result<T, ConflictableTransactionError<Error>>;

fn seal(body: &[u8]) -> Vec<u8> {
    let mut v = crc32fast::hash(body).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn unseal<'a>(what: &str, key: &[u8], raw: &'a [u8]) -> Tx<&'a [u8]> {
    if raw.len() < 4
        || u32::from_be_bytes(raw[..4].try_into().unwrap()) != crc32fast::hash(&raw[4..])
    {
        return Err(ConflictableTransactionError::Abort(Error::Corruption(
            format!("tree sys, {what} {}: crc32 mismatch", keys::printable(key)),
        )));
    }
    Ok(&raw[4..])
}

fn key(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(rest);
    k
}

/// The lock key of a data key.
pub fn lock_key(data_key: &[u8]) -> Vec<u8> {
    key(LOCK_PREFIX, data_key)
}

/// The lock keys of every item of one shard key (a range of the sys tree).
pub fn lock_prefix(shard_prefix: &[u8]) -> Vec<u8> {
    key(LOCK_PREFIX, shard_prefix)
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

fn corrupt(what: String) -> ConflictableTransactionError<Error> {
    ConflictableTransactionError::Abort(Error::Corruption(what))
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
        seal(&body)
    }

    pub fn decode(lock_key: &[u8], raw: &[u8]) -> Tx<Lock> {
        let body = unseal("lock", lock_key, raw)?;
        let bad = || {
            corrupt(format!(
                "tree sys, lock {}: malformed",
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
    /// the one a resolver may abort first).
    pub fn refusal(self, data_key: &[u8]) -> Error {
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
            txn_id: h.txn_id,
            primary_shard_key: h.primary,
            started_ms: h.started_ms,
            priority_ms: h.priority_ms,
            read: !self.write,
        }
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

/// Refuses (inner `Err(Locked)`) if an item of `t` is locked, other than by `own`'s write lock.
pub fn check_unlocked(
    sys: &TransactionalTree,
    slot_count: u32,
    t: &TxnRequest,
    own: Option<&[u8]>,
) -> Tx<Result<()>> {
    for (sk, k) in items(t) {
        let data_key = keys::encode_key(ordo_proto::slot_of(sk, slot_count), sk, k);
        let lk = lock_key(&data_key);
        if let Some(raw) = sys.get(&lk)? {
            let lock = Lock::decode(&lk, &raw)?;
            let ours = lock.write && own.is_some_and(|id| lock.held_by(id));
            if !ours {
                return Ok(Err(lock.refusal(&data_key)));
            }
        }
    }
    Ok(Ok(()))
}

fn decision_byte(d: Decision) -> u8 {
    d as i32 as u8
}

/// The decision key of a transaction whose primary shard key is in `slot`.
fn decision_key(slot: u32, txn_id: &[u8]) -> Vec<u8> {
    let mut k = key(RECORD_PREFIX, &keys::slot_start(slot));
    k.extend_from_slice(txn_id);
    k
}

/// The prefixes of the locks and decisions of `slot` (a move of the slot waits until both are
/// empty).
pub fn slot_prefixes(slot: u32) -> [Vec<u8>; 2] {
    [
        lock_key(&keys::slot_start(slot)),
        key(RECORD_PREFIX, &keys::slot_start(slot)),
    ]
}

/// When the decision under decision key `k` was recorded (ms, the deciding leader's clock).
pub fn decision_age_base(k: &[u8], raw: &[u8]) -> Result<u64> {
    match unseal("decision", k, raw) {
        Ok(body) if body.len() >= 9 => Ok(u64::from_be_bytes(body[1..9].try_into().unwrap())),
        Ok(_) => Err(Error::Corruption(format!(
            "tree sys, decision {}: too short",
            keys::printable(k)
        ))),
        Err(ConflictableTransactionError::Abort(e)) => Err(e),
        Err(e) => Err(Error::Storage(format!("{e:?}"))),
    }
}

fn decision_of(sys: &TransactionalTree, slot: u32, txn_id: &[u8]) -> Tx<Option<Decision>> {
    let rk = decision_key(slot, txn_id);
    match sys.get(&rk)? {
        None => Ok(None),
        Some(raw) => {
            let body = unseal("decision", &rk, &raw)?;
            Decision::try_from(body.first().copied().unwrap_or(0) as i32)
                .ok()
                .filter(|d| *d != Decision::Unspecified && *d != Decision::Pending)
                .map(Some)
                .ok_or_else(|| {
                    ConflictableTransactionError::Abort(Error::Corruption(format!(
                        "tree sys, decision {}: bad decision",
                        hex(txn_id)
                    )))
                })
        }
    }
}

fn part_of(sys: &TransactionalTree, txn_id: &[u8]) -> Tx<Option<PrepareRequest>> {
    let pk = key(PART_PREFIX, txn_id);
    match sys.get(&pk)? {
        None => Ok(None),
        Some(raw) => {
            let body = unseal("prepared transaction", &pk, &raw)?;
            PrepareRequest::decode(body).map(Some).map_err(|e| {
                ConflictableTransactionError::Abort(Error::Corruption(format!(
                    "tree sys, prepared transaction {}: {e}",
                    hex(txn_id)
                )))
            })
        }
    }
}

/// Prepare: lock every item of this group's part, keep the part, evaluate its compares.
/// `locks` counts the locks taken.
pub fn prepare(
    view: &mut impl ItemView,
    sys: &TransactionalTree,
    slot_count: u32,
    p: &PrepareRequest,
    locks: &mut i64,
) -> Tx<Result<PrepareResponse>> {
    let part = p.part.clone().unwrap_or_default();
    let primary_slot = ordo_proto::slot_of(&p.primary_shard_key, slot_count);
    if decision_of(sys, primary_slot, &p.txn_id)? == Some(Decision::Abort) {
        return Ok(Err(Error::FailedPrecondition(format!(
            "transaction {} was already aborted (a lock resolver timed it out); retry it",
            hex(&p.txn_id)
        ))));
    }
    // The items' values hold still from here to the finish (locked), which runs the decided
    // branch whatever its results weigh: so a part that might return too much is refused now.
    let mut result_bytes = [0; 2];
    for (ops, bytes) in [&part.success, &part.failure]
        .into_iter()
        .zip(&mut result_bytes)
    {
        let mut budget = Budget::txn();
        let fits = txn::fits(&*view, ops, &mut budget);
        if let Err(over) = fits.map_err(ConflictableTransactionError::Abort)? {
            return Ok(Err(Error::ResourceExhausted(format!(
                "{over}; the part was not prepared"
            ))));
        }
        *bytes = budget.used() as u64;
    }
    let again = part_of(sys, &p.txn_id)?.is_some();
    if again && !p.read_only {
        // A retried prepare: the locks are ours already.
        return compares_held(view, &part, result_bytes);
    }
    let data_keys: Vec<Vec<u8>> = items(&part)
        .into_iter()
        .map(|(sk, k)| keys::encode_key(ordo_proto::slot_of(sk, slot_count), sk, k))
        .collect();
    let locked = if p.read_only {
        lock_for_reading(sys, p, &data_keys, locks)?
    } else {
        lock_for_writing(sys, slot_count, p, &part, &data_keys, locks)?
    };
    if let Err(e) = locked {
        return Ok(Err(e));
    }
    compares_held(view, &part, result_bytes)
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
        }))
}

/// A reader: share read locks, take every item no writer holds, keep them, and report a
/// writer's item if there is one (the next prepare goes on from here).
fn lock_for_reading(
    sys: &TransactionalTree,
    p: &PrepareRequest,
    data_keys: &[Vec<u8>],
    locks: &mut i64,
) -> Tx<Result<()>> {
    sys.insert(key(PART_PREFIX, &p.txn_id), seal(&p.encode_to_vec()))?;
    let me = holder(p);
    let mut blocked: Option<Error> = None;
    for data_key in data_keys {
        let lk = lock_key(data_key);
        match sys.get(&lk)? {
            None => {
                let lock = Lock {
                    write: false,
                    holders: vec![me.clone()],
                };
                sys.insert(lk, lock.encode())?;
                *locks += 1;
            }
            Some(raw) => {
                let mut lock = Lock::decode(&lk, &raw)?;
                if lock.write {
                    if blocked.is_none() {
                        blocked = Some(lock.refusal(data_key));
                    }
                } else if !lock.held_by(&p.txn_id) {
                    lock.holders.push(me.clone());
                    sys.insert(lk, lock.encode())?;
                }
            }
        }
    }
    Ok(blocked.map_or(Ok(()), Err))
}

/// A writer: every item of the part free (or already ours), then a write lock on each, all or
/// none, and the part kept.
fn lock_for_writing(
    sys: &TransactionalTree,
    slot_count: u32,
    p: &PrepareRequest,
    part: &TxnRequest,
    data_keys: &[Vec<u8>],
    locks: &mut i64,
) -> Tx<Result<()>> {
    if let Err(e) = check_unlocked(sys, slot_count, part, Some(&p.txn_id))? {
        return Ok(Err(e));
    }
    let lock = Lock {
        write: true,
        holders: vec![holder(p)],
    }
    .encode();
    for data_key in data_keys {
        sys.insert(lock_key(data_key), lock.clone())?;
        *locks += 1;
    }
    sys.insert(key(PART_PREFIX, &p.txn_id), seal(&p.encode_to_vec()))?;
    Ok(Ok(()))
}

/// Decide, on the primary's group: the first decision recorded wins.
pub fn decide(
    sys: &TransactionalTree,
    slot_count: u32,
    d: &DecideRequest,
    now_ms: u64,
) -> Tx<Result<DecideResponse>> {
    let slot = ordo_proto::slot_of(&d.primary_shard_key, slot_count);
    if let Some(existing) = decision_of(sys, slot, &d.txn_id)? {
        return Ok(Ok(DecideResponse {
            decision: existing as i32,
        }));
    }
    let wanted = if d.wound {
        Decision::Abort
    } else if d.resolve {
        if now_ms < d.started_ms.saturating_add(TXN_LOCK_TIMEOUT_MS) {
            return Ok(Ok(DecideResponse {
                decision: Decision::Pending as i32,
            }));
        }
        Decision::Abort
    } else {
        match Decision::try_from(d.decision) {
            Ok(x @ (Decision::RunSuccess | Decision::RunFailure | Decision::Abort)) => x,
            _ => {
                return Ok(Err(Error::InvalidArgument(format!(
                    "decision {} is not commit-success, commit-failure or abort",
                    d.decision
                ))))
            }
        }
    };
    let mut body = vec![decision_byte(wanted)];
    body.extend_from_slice(&now_ms.to_be_bytes());
    sys.insert(decision_key(slot, &d.txn_id), seal(&body))?;
    Ok(Ok(DecideResponse {
        decision: wanted as i32,
    }))
}

/// Finish: run the decided branch of this group's part (its results within `budget`) and
/// release its locks.
pub fn finish(
    view: &mut impl ItemView,
    sys: &TransactionalTree,
    slot_count: u32,
    f: &FinishRequest,
    locks: &mut i64,
    budget: &mut Budget,
) -> Tx<Result<FinishResponse>> {
    let Some(p) = part_of(sys, &f.txn_id)? else {
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
    let txn = TxnRequest {
        success: ops,
        ..Default::default()
    };
    let abort = ConflictableTransactionError::Abort;
    // The decision is taken: the writes are applied even over the budget (which the prepare
    // checked, so only a part prepared by an older version can be over it).
    let results = match txn::evaluate(view, &txn, budget).map_err(abort)? {
        Ok(r) => Ok(r.results),
        Err(over) => {
            txn::apply_writes(view, &txn.success).map_err(abort)?;
            Err(Error::ResourceExhausted(format!(
                "{over}; the decided branch was applied in full, but its results are not returned"
            )))
        }
    };
    for (sk, k) in items(&part) {
        let data_key = keys::encode_key(ordo_proto::slot_of(sk, slot_count), sk, k);
        let lk = lock_key(&data_key);
        if let Some(raw) = sys.get(&lk)? {
            let mut lock = Lock::decode(&lk, &raw)?;
            if lock.held_by(&f.txn_id) {
                lock.holders.retain(|h| h.txn_id != f.txn_id.as_ref());
                if lock.holders.is_empty() {
                    sys.remove(lk)?;
                    *locks -= 1;
                } else {
                    sys.insert(lk, lock.encode())?;
                }
            }
        }
    }
    sys.remove(key(PART_PREFIX, &f.txn_id))?;
    Ok(results.map(|results| FinishResponse {
        found: true,
        results,
    }))
}

/// Forget, on the primary's group, once every participant finished.
pub fn forget(sys: &TransactionalTree, slot_count: u32, f: &ForgetRequest) -> Tx<()> {
    let slot = ordo_proto::slot_of(&f.primary_shard_key, slot_count);
    sys.remove(decision_key(slot, &f.txn_id))?;
    Ok(())
}

/// How many locks `sys` holds (once, when a replica opens or installs a snapshot).
pub fn count_locks(sys: &sled::Tree) -> Result<i64> {
    let mut n = 0;
    for kv in sys.scan_prefix(LOCK_PREFIX) {
        kv?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Apply, Command, Outcome, StateMachine};
    use ordo_proto::v1::{compare, Compare, ForgetRequest, GetRequest, PutRequest, TxnOp};

    const SLOTS: u32 = 64;

    fn put(sk: &str, v: &str) -> TxnOp {
        TxnOp {
            op: Some(txn_op::Op::Put(PutRequest {
                shard_key: sk.as_bytes().to_vec().into(),
                value: v.as_bytes().to_vec().into(),
                ..Default::default()
            })),
        }
    }

    fn get(sk: &str) -> TxnOp {
        TxnOp {
            op: Some(txn_op::Op::Get(GetRequest {
                shard_key: sk.as_bytes().to_vec().into(),
                ..Default::default()
            })),
        }
    }

    fn absent(sk: &str) -> Compare {
        Compare {
            shard_key: sk.as_bytes().to_vec().into(),
            target: compare::Target::Version as i32,
            op: compare::Op::Equal as i32,
            version: 0,
            ..Default::default()
        }
    }

    fn id(n: u8) -> Vec<u8> {
        vec![n; TXN_ID_BYTES]
    }

    struct Sm {
        _dir: tempfile::TempDir,
        sm: StateMachine,
        index: u64,
    }

    impl Sm {
        fn new() -> Sm {
            let dir = tempfile::tempdir().unwrap();
            let db = sled::open(dir.path()).unwrap();
            let sm = StateMachine::open(&db, 1, SLOTS).unwrap().sm;
            Sm {
                _dir: dir,
                sm,
                index: 0,
            }
        }

        fn apply(&mut self, cmd: Command) -> Result<Outcome> {
            self.index += 1;
            let mut out = self
                .sm
                .apply_all(&[Apply {
                    index: self.index,
                    cmd: Some(cmd),
                }])
                .unwrap();
            out.pop().unwrap().1
        }

        fn prepare(&mut self, txn: u8, part: TxnRequest, started_ms: u64) -> Result<bool> {
            match self.apply(Command::Prepare(PrepareRequest {
                header: None,
                txn_id: id(txn).into(),
                primary_shard_key: b"order-1".to_vec().into(),
                started_ms,
                part: Some(part),
                read_only: false,
                priority_ms: started_ms,
                group_id: 0,
            }))? {
                Outcome::Prepared(p) => Ok(p.compares_held),
                other => panic!("{other:?}"),
            }
        }

        fn finish(&mut self, txn: u8, d: Decision) -> FinishResponse {
            match self.apply(Command::Finish(FinishRequest {
                header: None,
                txn_id: id(txn).into(),
                shard_key: b"order-1".to_vec().into(),
                decision: d as i32,
                group_id: 0,
            })) {
                Ok(Outcome::Finished(f)) => f,
                other => panic!("{other:?}"),
            }
        }

        fn decide(
            &mut self,
            txn: u8,
            d: Decision,
            resolve: bool,
            started_ms: u64,
            now_ms: u64,
        ) -> Decision {
            match self.apply(Command::Decide {
                req: DecideRequest {
                    header: None,
                    txn_id: id(txn).into(),
                    primary_shard_key: b"order-1".to_vec().into(),
                    decision: d as i32,
                    resolve,
                    started_ms,
                    wound: false,
                },
                now_ms,
            }) {
                Ok(Outcome::Decided(r)) => Decision::try_from(r.decision).unwrap(),
                other => panic!("{other:?}"),
            }
        }
    }

    fn is_locked<T: std::fmt::Debug>(r: Result<T>, txn: u8) -> bool {
        matches!(r, Err(Error::Locked { ref txn_id, .. }) if *txn_id == id(txn))
    }

    #[test]
    fn a_prepared_part_locks_its_items_until_it_finishes_once() {
        let mut s = Sm::new();
        let part = TxnRequest {
            compares: vec![absent("order-1")],
            success: vec![put("order-1", "created")],
            failure: vec![get("order-1")],
            ..Default::default()
        };
        assert!(
            s.prepare(1, part.clone(), 0).unwrap(),
            "order-1 does not exist yet"
        );
        assert_eq!(s.sm.locks_held(), 1);
        // Reads, plain writes and other transactions' prepares all meet the lock; none changes
        // anything.
        assert!(is_locked(s.sm.get(b"order-1", b""), 1));
        assert!(is_locked(s.sm.scan(b"order-1", b"", b"", 10), 1));
        let plain = TxnRequest {
            success: vec![put("order-1", "sneaky")],
            ..Default::default()
        };
        assert!(is_locked(s.apply(Command::Txn(plain)), 1));
        assert!(is_locked(s.prepare(2, part.clone(), 0), 1));
        // Another order is not locked.
        assert!(s.sm.get(b"order-2", b"").unwrap().is_none());
        // A retried prepare of the same transaction is accepted.
        assert!(s.prepare(1, part.clone(), 0).unwrap());

        let f = s.finish(1, Decision::RunSuccess);
        assert!(f.found);
        assert_eq!(f.results.len(), 1);
        assert_eq!(s.sm.get(b"order-1", b"").unwrap().unwrap().0, 1);
        assert_eq!(s.sm.locks_held(), 0);
        // Finishing again changes nothing.
        assert!(!s.finish(1, Decision::RunSuccess).found);
        assert_eq!(s.sm.get(b"order-1", b"").unwrap().unwrap().0, 1);
        // Now the second transaction prepares, and its compare fails (order-1 exists).
        assert!(!s.prepare(2, part, 0).unwrap());
        let f = s.finish(2, Decision::RunFailure);
        assert!(
            f.found && f.results.len() == 1,
            "the failure branch ran its get"
        );
        assert_eq!(s.sm.get(b"order-1", b"").unwrap().unwrap().0, 1);
    }

    #[test]
    fn the_first_decision_wins_and_resolvers_abort_only_old_transactions() {
        let mut s = Sm::new();
        let t = TXN_LOCK_TIMEOUT_MS;
        // A young transaction: the resolver is told to wait, nothing is recorded.
        assert_eq!(
            s.decide(1, Decision::Abort, true, 10_000, 10_000 + t - 1),
            Decision::Pending
        );
        assert_eq!(
            s.decide(1, Decision::RunSuccess, false, 0, 10_000),
            Decision::RunSuccess
        );
        // Once decided, a resolver learns the decision, whatever the age.
        assert_eq!(
            s.decide(1, Decision::Abort, true, 0, u64::MAX),
            Decision::RunSuccess
        );
        // An old undecided transaction is aborted by the resolver; the coordinator then learns
        // the abort, and a late prepare of it is refused.
        assert_eq!(
            s.decide(2, Decision::Abort, true, 10_000, 10_000 + t),
            Decision::Abort
        );
        assert_eq!(
            s.decide(2, Decision::RunSuccess, false, 0, 20_000),
            Decision::Abort
        );
        let part = TxnRequest {
            success: vec![put("order-1", "x")],
            ..Default::default()
        };
        assert!(
            matches!(s.prepare(2, part, 0), Err(Error::FailedPrecondition(m)) if m.contains("aborted"))
        );
        assert_eq!(s.sm.locks_held(), 0);
        // Forgetting drops the decision.
        s.apply(Command::Forget(ForgetRequest {
            header: None,
            txn_id: id(1).into(),
            primary_shard_key: b"order-1".to_vec().into(),
        }))
        .unwrap();
        assert_eq!(
            s.decide(1, Decision::Abort, true, 0, u64::MAX),
            Decision::Abort
        );
    }

    #[test]
    fn a_reader_keeps_what_it_locked_and_goes_on_from_there() {
        let mut s = Sm::new();
        let writer = TxnRequest {
            success: vec![put("order-2", "w")],
            ..Default::default()
        };
        s.prepare(1, writer, 0).unwrap();
        let audit = TxnRequest {
            success: vec![get("order-1"), get("order-2"), get("order-3")],
            ..Default::default()
        };
        let read = |s: &mut Sm| {
            s.apply(Command::Prepare(PrepareRequest {
                header: None,
                txn_id: id(9).into(),
                primary_shard_key: b"order-1".to_vec().into(),
                started_ms: 0,
                part: Some(audit.clone()),
                read_only: true,
                priority_ms: 0,
                group_id: 0,
            }))
        };
        assert!(is_locked(read(&mut s), 1));
        // The reader keeps the items no writer holds (read locks), and waits only for the
        // writer's item: a new writer of a read-locked item is refused, plain reads pass, and a
        // second reader shares the read lock.
        assert_eq!(s.sm.locks_held(), 3);
        let late = TxnRequest {
            success: vec![put("order-1", "late")],
            ..Default::default()
        };
        assert!(is_locked(s.prepare(2, late, 0), 9));
        assert!(s.sm.get(b"order-1", b"").unwrap().is_none());
        assert!(is_locked(s.sm.get(b"order-2", b""), 1));
        let other_reader = s.apply(Command::Prepare(PrepareRequest {
            header: None,
            txn_id: id(8).into(),
            primary_shard_key: b"order-3".to_vec().into(),
            started_ms: 0,
            part: Some(TxnRequest {
                success: vec![get("order-3")],
                ..Default::default()
            }),
            read_only: true,
            priority_ms: 0,
            group_id: 0,
        }));
        assert!(matches!(other_reader, Ok(Outcome::Prepared(_))));
        s.finish(8, Decision::RunSuccess);
        assert_eq!(
            s.sm.locks_held(),
            3,
            "order-3 stays read-locked by the first reader"
        );
        s.finish(1, Decision::RunSuccess);
        assert!(matches!(read(&mut s), Ok(Outcome::Prepared(_))));
        assert_eq!(s.sm.locks_held(), 3);
        let f = s.finish(9, Decision::RunSuccess);
        assert_eq!(f.results.len(), 3);
        assert_eq!(s.sm.locks_held(), 0);
    }

    #[test]
    fn locks_survive_a_snapshot_install() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Sm::new();
        let part = TxnRequest {
            success: vec![put("order-1", "x"), put("order-2", "y")],
            ..Default::default()
        };
        s.prepare(7, part, 0).unwrap();
        let (index, path, _) = s.sm.build_snapshot(&dir.path().join("snap"), 1).unwrap();
        let db = sled::open(dir.path().join("b")).unwrap();
        let other = StateMachine::open(&db, 2, SLOTS).unwrap().sm;
        other.install_snapshot(&path, index).unwrap();
        other.finish_install().unwrap();
        assert_eq!(other.locks_held(), 2);
        assert!(is_locked(other.get(b"order-2", b""), 7));
    }
}
