//! Transaction evaluation: the one place that decides what a `Txn` (and so a `Put` or `Delete`,
//! which are `Txn`s with at most one compare) does to the items it touches. It works on any
//! `ItemView`, so it is tested without sled and applied on a sled transaction in production.
//!
//! The values a transaction's Gets return are counted against a [`Budget`] before they are
//! copied, and its writes are staged until every op has run: a transaction over its budget is
//! refused with `RESOURCE_EXHAUSTED` having copied at most its budget and written nothing.

use ordo_proto::v1::{
    compare, txn_op, txn_op_result, Compare, DeleteResponse, EmitResponse, FeedAckRequest,
    FeedAckResponse, GetResponse, PutResponse, TxnOp, TxnOpResult, TxnRequest, TxnResponse,
};

use crate::error::{Error, Result};
use crate::limits::{ENTRY_RESULT_BYTES_MAX, TXN_RESULT_BYTES_MAX};

/// What a transaction can read: items addressed by `(shard_key, key)`.
pub trait ItemRead {
    /// A stored value, as cheap to hold as the store allows (sled hands out shared buffers):
    /// nothing is copied until the budget allows it.
    type Value: AsRef<[u8]>;
    /// `(version, value)` of an item, or `None` when it does not exist.
    fn get(&self, shard_key: &[u8], key: &[u8]) -> Result<Option<(u64, Self::Value)>>;
}

/// What a transaction can read and change. Each call is one change of the change feed: `old`
/// is the item's value before it (`None` for a new item), read by the evaluation anyway, so a
/// feed that captures old values costs no extra read.
pub trait ItemView: ItemRead {
    fn put(
        &mut self,
        shard_key: &[u8],
        key: &[u8],
        version: u64,
        value: &[u8],
        old: Option<&[u8]>,
    ) -> Result<()>;
    fn delete(&mut self, shard_key: &[u8], key: &[u8], old: &[u8]) -> Result<()>;
    /// An `Emit`: an event of the change feed with no stored item.
    fn emit(&mut self, shard_key: &[u8], key: &[u8], value: &[u8]) -> Result<()>;
    /// Whether a consumer group's ack may be applied now (the inner `Err`: refused, e.g. a
    /// stale attempt). Checked before any write of its transaction reaches the view.
    fn check_feed_ack(&self, ack: &FeedAckRequest) -> Result<Result<()>>;
    /// Applies an ack `check_feed_ack` accepted.
    fn feed_ack(&mut self, ack: &FeedAckRequest) -> Result<()>;
}

/// The result bytes (values returned by Gets) an evaluation may still copy, and the limit that
/// refuses it when they run out. Deterministic: it depends only on the request and the stored
/// values, so every replica refuses the same transactions.
#[derive(Debug)]
pub struct Budget {
    left: usize,
    used: usize,
    limit: Limit,
}

/// Which bound a [`Budget`] stands for.
#[derive(Debug, Clone, Copy)]
enum Limit {
    Txn,
    Entry,
}

impl Limit {
    /// The refusal of a transaction whose Gets asked for `asked` bytes.
    fn refusal(self, asked: usize) -> Error {
        let (name, value, scope) = match self {
            Limit::Txn => (
                "TXN_RESULT_BYTES_MAX",
                TXN_RESULT_BYTES_MAX,
                "one Txn (read fewer or smaller items per Txn)",
            ),
            Limit::Entry => (
                "ENTRY_RESULT_BYTES_MAX",
                ENTRY_RESULT_BYTES_MAX,
                "the raft entry it was batched in (retry it: it may fit another entry)",
            ),
        };
        Error::ResourceExhausted(format!(
            "txn results are over {name} ({value} bytes) for {scope}: its Gets asked for at \
             least {asked} bytes"
        ))
    }
}

impl Budget {
    /// A transaction on its own: `TXN_RESULT_BYTES_MAX`.
    pub fn txn() -> Budget {
        Budget {
            left: TXN_RESULT_BYTES_MAX,
            used: 0,
            limit: Limit::Txn,
        }
    }

    /// A transaction of a raft entry whose earlier transactions left `entry_left` bytes of
    /// `ENTRY_RESULT_BYTES_MAX`: the smaller of that and its own bound.
    pub fn within_entry(entry_left: usize) -> Budget {
        if entry_left >= TXN_RESULT_BYTES_MAX {
            return Budget::txn();
        }
        Budget {
            left: entry_left,
            used: 0,
            limit: Limit::Entry,
        }
    }

    /// Bytes taken so far.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Takes `n` bytes, or says which limit they would break.
    fn take(&mut self, n: usize) -> Result<()> {
        if n > self.left {
            return Err(self.limit.refusal(self.used + n));
        }
        self.left -= n;
        self.used += n;
        Ok(())
    }
}

/// Whether a transaction only reads (compares and Gets on both branches): it needs no raft
/// entry, a read barrier is enough (an Emit writes an event).
pub fn read_only(t: &TxnRequest) -> bool {
    t.success
        .iter()
        .chain(&t.failure)
        .all(|op| matches!(op.op, Some(txn_op::Op::Get(_))))
}

/// Evaluates the compares, then runs the success or the failure ops in order (a later op sees an
/// earlier op's write), within `budget`. The writes reach `view` only if every op ran and every
/// feed ack of the branch run is accepted: the inner `Err` (over budget, a refused ack) wrote
/// nothing. The request has been validated (see `validate.rs`).
pub fn evaluate(
    view: &mut impl ItemView,
    txn: &TxnRequest,
    budget: &mut Budget,
) -> Result<Result<TxnResponse>> {
    let mut staged = Staged::new(&*view);
    let resp = match staged.evaluate(txn, budget)? {
        Ok(resp) => resp,
        Err(over) => {
            return Ok(Err(Error::ResourceExhausted(format!(
                "{over}; nothing was applied"
            ))))
        }
    };
    for w in &staged.writes {
        if let Change::FeedAck(ack) = w.change {
            if let Err(refused) = view.check_feed_ack(ack)? {
                return Ok(Err(refused));
            }
        }
    }
    let writes = staged.writes;
    flush(view, writes)?;
    Ok(Ok(resp))
}

/// Evaluates a transaction that only reads (see [`read_only`]) within `budget`.
pub fn evaluate_reads(
    view: &impl ItemRead,
    txn: &TxnRequest,
    budget: &mut Budget,
) -> Result<Result<TxnResponse>> {
    debug_assert!(read_only(txn));
    Staged::new(view).evaluate(txn, budget)
}

/// Whether `ops` would stay within `budget` if run now (a dry run: nothing is copied or
/// written). A 2PC prepare checks both branches of its part with it, so that its finish, which
/// must run whatever it finds, never goes over.
pub fn fits(view: &impl ItemRead, ops: &[TxnOp], budget: &mut Budget) -> Result<Result<()>> {
    Ok(Staged::new(view).run(ops, budget, false)?.map(drop))
}

/// What `ops` would return if run now, writing nothing. A 2PC prepare of a keyed Txn reports it:
/// the part's items stay locked until its finish runs the same ops on the same values.
pub fn results_of(
    view: &impl ItemRead,
    ops: &[TxnOp],
    budget: &mut Budget,
) -> Result<Result<Vec<TxnOpResult>>> {
    Staged::new(view).run(ops, budget, true)
}

/// Applies the writes of `ops` whatever their Gets would return: the decided branch of a 2PC
/// part, whose writes must be applied. The Gets are left out (no op reads what a Get returns).
pub fn apply_writes(view: &mut impl ItemView, ops: &[TxnOp]) -> Result<()> {
    let writes: Vec<TxnOp> = ops.iter().filter(|op| op.writes()).cloned().collect();
    let mut staged = Staged::new(&*view);
    if let Err(e) = staged.run(&writes, &mut Budget::txn(), false)? {
        unreachable!("ops without Gets return no values, yet: {e}");
    }
    let staged = staged.writes;
    flush(view, staged)
}

/// What a staged write does.
enum Change<'t> {
    Put(u64, &'t [u8]),
    Delete,
    /// An event only: not an item, never seen by a later op's read.
    Emit(&'t [u8]),
    /// A consumer group's ack: not an item either.
    FeedAck(&'t FeedAckRequest),
}

/// A write staged by [`Staged`], with the value it replaces (for the change feed).
struct Write<'t, V> {
    shard_key: &'t [u8],
    key: &'t [u8],
    change: Change<'t>,
    old: Option<Seen<'t, V>>,
}

fn flush<V: ItemView>(view: &mut V, writes: Vec<Write<'_, V::Value>>) -> Result<()> {
    for w in writes {
        let old = w.old.as_ref().map(AsRef::as_ref);
        match w.change {
            Change::Put(version, value) => view.put(w.shard_key, w.key, version, value, old)?,
            Change::Delete => view.delete(w.shard_key, w.key, old.unwrap_or_default())?,
            Change::Emit(value) => view.emit(w.shard_key, w.key, value)?,
            Change::FeedAck(ack) => view.feed_ack(ack)?,
        }
    }
    Ok(())
}

/// A value as a transaction sees it: stored, or written by one of its earlier ops.
#[derive(Clone)]
enum Seen<'t, V> {
    Stored(V),
    Staged(&'t [u8]),
}

impl<V: AsRef<[u8]>> AsRef<[u8]> for Seen<'_, V> {
    fn as_ref(&self) -> &[u8] {
        match self {
            Seen::Stored(v) => v.as_ref(),
            Seen::Staged(v) => v,
        }
    }
}

/// A view with the transaction's own writes on top, in op order (at most `TXN_OPS_MAX`, so a
/// lookup is a short scan).
struct Staged<'v, 't, V: ItemRead> {
    base: &'v V,
    writes: Vec<Write<'t, V::Value>>,
}

impl<'v, 't, V: ItemRead> Staged<'v, 't, V> {
    fn new(base: &'v V) -> Self {
        Staged {
            base,
            writes: Vec::new(),
        }
    }

    fn get(&self, sk: &[u8], key: &[u8]) -> Result<Option<(u64, Seen<'t, V::Value>)>> {
        match self.writes.iter().rev().find(|w| {
            w.shard_key == sk
                && w.key == key
                && matches!(w.change, Change::Put(..) | Change::Delete)
        }) {
            Some(w) => Ok(match w.change {
                Change::Put(version, v) => Some((version, Seen::Staged(v))),
                _ => None,
            }),
            None => Ok(self
                .base
                .get(sk, key)?
                .map(|(version, v)| (version, Seen::Stored(v)))),
        }
    }

    fn evaluate(
        &mut self,
        txn: &'t TxnRequest,
        budget: &mut Budget,
    ) -> Result<Result<TxnResponse>> {
        let mut succeeded = true;
        for c in &txn.compares {
            if !self.compare_holds(c)? {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        Ok(self
            .run(ops, budget, true)?
            .map(|results| TxnResponse { succeeded, results }))
    }

    /// Runs `ops`, staging their writes; `copy` says whether Gets return their values (a dry
    /// run only counts them).
    fn run(
        &mut self,
        ops: &'t [TxnOp],
        budget: &mut Budget,
        copy: bool,
    ) -> Result<Result<Vec<TxnOpResult>>> {
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            let result = match op.op.as_ref() {
                Some(txn_op::Op::Put(p)) => {
                    let prev = self.get(&p.shard_key, &p.key)?;
                    let version = prev.as_ref().map_or(0, |(v, _)| *v) + 1;
                    self.writes.push(Write {
                        shard_key: &p.shard_key,
                        key: &p.key,
                        change: Change::Put(version, &p.value),
                        old: prev.map(|(_, v)| v),
                    });
                    txn_op_result::Result::Put(PutResponse {
                        succeeded: true,
                        version,
                    })
                }
                Some(txn_op::Op::Delete(d)) => {
                    let prev = self.get(&d.shard_key, &d.key)?;
                    let prev_version = prev.as_ref().map(|(v, _)| *v);
                    if let Some((_, old)) = prev {
                        self.writes.push(Write {
                            shard_key: &d.shard_key,
                            key: &d.key,
                            change: Change::Delete,
                            old: Some(old),
                        });
                    }
                    txn_op_result::Result::Delete(DeleteResponse {
                        succeeded: true,
                        deleted: prev_version.is_some(),
                        prev_version: prev_version.unwrap_or(0),
                    })
                }
                Some(txn_op::Op::Get(g)) => {
                    txn_op_result::Result::Get(match self.get(&g.shard_key, &g.key)? {
                        Some((version, value)) => {
                            // Counted before the copy: a refused transaction never holds more
                            // than its budget.
                            if let Err(over) = budget.take(value.as_ref().len()) {
                                return Ok(Err(over));
                            }
                            GetResponse {
                                found: true,
                                value: if copy {
                                    bytes::Bytes::copy_from_slice(value.as_ref())
                                } else {
                                    bytes::Bytes::new()
                                },
                                version,
                            }
                        }
                        None => GetResponse::default(),
                    })
                }
                Some(txn_op::Op::Emit(e)) => {
                    self.writes.push(Write {
                        shard_key: &e.shard_key,
                        key: &e.key,
                        change: Change::Emit(&e.value),
                        old: None,
                    });
                    txn_op_result::Result::Emit(EmitResponse {})
                }
                Some(txn_op::Op::FeedAck(a)) => {
                    self.writes.push(Write {
                        shard_key: &a.shard_key,
                        key: &[],
                        change: Change::FeedAck(a),
                        old: None,
                    });
                    txn_op_result::Result::FeedAck(FeedAckResponse {})
                }
                // Validation refuses ops without a body before they reach the log.
                None => unreachable!("empty TxnOp passed validation"),
            };
            results.push(TxnOpResult {
                result: Some(result),
            });
        }
        Ok(Ok(results))
    }

    fn compare_holds(&self, c: &Compare) -> Result<bool> {
        use std::cmp::Ordering;
        let item = self.get(&c.shard_key, &c.key)?;
        let op = compare::Op::try_from(c.op).expect("validated compare op");
        let ordering = match compare::Target::try_from(c.target).expect("validated compare target")
        {
            compare::Target::Version => item.as_ref().map_or(0, |(v, _)| *v).cmp(&c.version),
            compare::Target::Value => match &item {
                Some((_, value)) => value.as_ref().cmp(c.value.as_ref()),
                // An absent item has no value: only "not equal" holds.
                None => return Ok(op == compare::Op::NotEqual),
            },
            compare::Target::Exists => {
                let eq = item.is_some() == c.exists;
                return Ok(match op {
                    compare::Op::Equal => eq,
                    compare::Op::NotEqual => !eq,
                    _ => unreachable!("validation allows only = and != on exists"),
                });
            }
        };
        Ok(match op {
            compare::Op::Equal => ordering == Ordering::Equal,
            compare::Op::NotEqual => ordering != Ordering::Equal,
            compare::Op::Less => ordering == Ordering::Less,
            compare::Op::Greater => ordering == Ordering::Greater,
        })
    }
}

/// An item's place in a `MemView`: (shard key, key).
#[cfg(test)]
type ItemName = (Vec<u8>, Vec<u8>);

/// An in-memory `ItemView` for tests and models: item → (version, value).
#[derive(Default, Debug, Clone, PartialEq)]
#[cfg(test)]
pub struct MemView(pub std::collections::BTreeMap<ItemName, (u64, Vec<u8>)>);

#[cfg(test)]
impl ItemRead for MemView {
    type Value = Vec<u8>;
    fn get(&self, sk: &[u8], key: &[u8]) -> Result<Option<(u64, Vec<u8>)>> {
        Ok(self.0.get(&(sk.to_vec(), key.to_vec())).cloned())
    }
}

#[cfg(test)]
impl ItemView for MemView {
    fn put(
        &mut self,
        sk: &[u8],
        key: &[u8],
        version: u64,
        value: &[u8],
        _: Option<&[u8]>,
    ) -> Result<()> {
        self.0
            .insert((sk.to_vec(), key.to_vec()), (version, value.to_vec()));
        Ok(())
    }
    fn delete(&mut self, sk: &[u8], key: &[u8], _: &[u8]) -> Result<()> {
        self.0.remove(&(sk.to_vec(), key.to_vec()));
        Ok(())
    }
    fn emit(&mut self, _: &[u8], _: &[u8], _: &[u8]) -> Result<()> {
        Ok(())
    }
    /// Items only: every ack is accepted and changes nothing.
    fn check_feed_ack(&self, _: &FeedAckRequest) -> Result<Result<()>> {
        Ok(Ok(()))
    }
    fn feed_ack(&mut self, _: &FeedAckRequest) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ordo_proto::v1::{DeleteRequest, GetRequest, PutRequest, TxnOp};
    use proptest::prelude::*;

    fn put(sk: &str, k: &str, v: &str) -> TxnOp {
        TxnOp {
            op: Some(txn_op::Op::Put(PutRequest {
                shard_key: sk.as_bytes().to_vec().into(),
                key: k.as_bytes().to_vec().into(),
                value: v.as_bytes().to_vec().into(),
                ..Default::default()
            })),
        }
    }
    fn get(sk: &str, k: &str) -> TxnOp {
        TxnOp {
            op: Some(txn_op::Op::Get(GetRequest {
                shard_key: sk.as_bytes().to_vec().into(),
                key: k.as_bytes().to_vec().into(),
                ..Default::default()
            })),
        }
    }
    fn del(sk: &str, k: &str) -> TxnOp {
        TxnOp {
            op: Some(txn_op::Op::Delete(DeleteRequest {
                shard_key: sk.as_bytes().to_vec().into(),
                key: k.as_bytes().to_vec().into(),
                ..Default::default()
            })),
        }
    }
    fn cmp(sk: &str, k: &str, target: compare::Target, op: compare::Op) -> Compare {
        Compare {
            shard_key: sk.as_bytes().to_vec().into(),
            key: k.as_bytes().to_vec().into(),
            target: target as i32,
            op: op as i32,
            ..Default::default()
        }
    }
    fn ev(v: &mut MemView, t: &TxnRequest) -> TxnResponse {
        evaluate(v, t, &mut Budget::txn()).unwrap().unwrap()
    }
    fn version_of(r: &TxnOpResult) -> u64 {
        match r.result.as_ref().unwrap() {
            txn_op_result::Result::Put(p) => p.version,
            txn_op_result::Result::Get(g) => g.version,
            txn_op_result::Result::Delete(d) => d.prev_version,
            txn_op_result::Result::Emit(_) | txn_op_result::Result::FeedAck(_) => 0,
        }
    }

    #[test]
    fn versions_start_at_one_and_grow_by_one() {
        let mut v = MemView::default();
        let txn = TxnRequest {
            success: vec![put("o1", "", "new"), put("o1", "", "paid"), get("o1", "")],
            ..Default::default()
        };
        let r = ev(&mut v, &txn);
        assert!(r.succeeded);
        assert_eq!(
            r.results.iter().map(version_of).collect::<Vec<_>>(),
            vec![1, 2, 2]
        );
        match r.results[2].result.as_ref().unwrap() {
            txn_op_result::Result::Get(g) => assert_eq!(g.value.as_ref(), b"paid"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_compare_runs_the_failure_branch_only() {
        let mut v = MemView::default();
        ev(
            &mut v,
            &TxnRequest {
                success: vec![put("o1", "status", "new")],
                ..Default::default()
            },
        );
        let mut c = cmp("o1", "status", compare::Target::Version, compare::Op::Equal);
        c.version = 5;
        let txn = TxnRequest {
            compares: vec![c],
            success: vec![put("o1", "status", "paid")],
            failure: vec![get("o1", "status")],
            ..Default::default()
        };
        let before = v.clone();
        let r = ev(&mut v, &txn);
        assert!(!r.succeeded);
        assert_eq!(v, before, "the failure branch only read");
        assert_eq!(version_of(&r.results[0]), 1);
    }

    #[test]
    fn compares_on_absent_items() {
        let v = MemView::default();
        let mut version0 = cmp("o", "k", compare::Target::Version, compare::Op::Equal);
        version0.version = 0;
        let value_ne = {
            let mut c = cmp("o", "k", compare::Target::Value, compare::Op::NotEqual);
            c.value = b"x".to_vec().into();
            c
        };
        let value_eq = cmp("o", "k", compare::Target::Value, compare::Op::Equal);
        let not_exists = cmp("o", "k", compare::Target::Exists, compare::Op::Equal); // exists == false
        for (c, expect) in [
            (version0, true),
            (value_ne, true),
            (value_eq, false),
            (not_exists, true),
        ] {
            assert_eq!(Staged::new(&v).compare_holds(&c).unwrap(), expect, "{c:?}");
        }
    }

    #[test]
    fn delete_reports_what_it_removed() {
        let mut v = MemView::default();
        ev(
            &mut v,
            &TxnRequest {
                success: vec![put("o", "a", "1"), put("o", "a", "2")],
                ..Default::default()
            },
        );
        let r = ev(
            &mut v,
            &TxnRequest {
                success: vec![del("o", "a"), del("o", "a")],
                ..Default::default()
            },
        );
        let dels: Vec<_> = r
            .results
            .iter()
            .map(|x| match x.result.as_ref().unwrap() {
                txn_op_result::Result::Delete(d) => (d.deleted, d.prev_version),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(dels, vec![(true, 2), (false, 0)]);
        assert!(v.0.is_empty());
        // Recreated items start again at version 1.
        let r = ev(
            &mut v,
            &TxnRequest {
                success: vec![put("o", "a", "3")],
                ..Default::default()
            },
        );
        assert_eq!(version_of(&r.results[0]), 1);
    }

    proptest! {
        /// A version compare-and-set behaves like a register with a counter: against a model that
        /// tracks (version, value) per key, every outcome matches.
        #[test]
        fn cas_matches_a_register_model(ops in proptest::collection::vec((0u8..3, 0u64..4, 0u8..5), 1..60)) {
            let mut v = MemView::default();
            let mut model: std::collections::HashMap<u8, (u64, u8)> = Default::default();
            for (key, expect_version, value) in ops {
                let k = format!("k{key}");
                let mut c = cmp("o", &k, compare::Target::Version, compare::Op::Equal);
                c.version = expect_version;
                let txn = TxnRequest {
                    compares: vec![c],
                    success: vec![put("o", &k, &value.to_string())],
                    failure: vec![get("o", &k)],
                    ..Default::default()
                };
                let r = ev(&mut v, &txn);
                let current = model.get(&key).map_or(0, |(ver, _)| *ver);
                prop_assert_eq!(r.succeeded, current == expect_version);
                if r.succeeded {
                    model.insert(key, (current + 1, value));
                    prop_assert_eq!(version_of(&r.results[0]), current + 1);
                } else {
                    prop_assert_eq!(version_of(&r.results[0]), current);
                }
            }
            for (key, (ver, val)) in model {
                let got = v.get(b"o", format!("k{key}").as_bytes()).unwrap().unwrap();
                prop_assert_eq!(got, (ver, val.to_string().into_bytes()));
            }
        }
    }
}
