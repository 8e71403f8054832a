//! Transaction evaluation: the one place that decides what a `Txn` (and so a `Put` or `Delete`,
//! which are `Txn`s with at most one compare) does to the items it touches. It works on any
//! `ItemView`, so it is tested without sled and applied on a sled transaction in production.

use ordo_proto::v1::{
    compare, txn_op, txn_op_result, Compare, DeleteResponse, GetResponse, PutResponse, TxnOpResult,
    TxnRequest, TxnResponse,
};

use crate::error::Result;

/// What a transaction can see and change: items addressed by `(shard_key, key)`.
pub trait ItemView {
    /// `(version, value)` of an item, or `None` when it does not exist.
    fn get(&mut self, shard_key: &[u8], key: &[u8]) -> Result<Option<(u64, Vec<u8>)>>;
    fn put(&mut self, shard_key: &[u8], key: &[u8], version: u64, value: &[u8]) -> Result<()>;
    fn delete(&mut self, shard_key: &[u8], key: &[u8]) -> Result<()>;
}

/// Evaluates the compares, then runs the success or the failure ops in order (a later op sees an
/// earlier op's write). The request has been validated (see `validate.rs`).
pub fn evaluate(view: &mut impl ItemView, txn: &TxnRequest) -> Result<TxnResponse> {
    let mut succeeded = true;
    for c in &txn.compares {
        if !compare_holds(view, c)? {
            succeeded = false;
            break;
        }
    }
    let ops = if succeeded {
        &txn.success
    } else {
        &txn.failure
    };
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        let result = match op.op.as_ref() {
            Some(txn_op::Op::Put(p)) => {
                let version = view.get(&p.shard_key, &p.key)?.map_or(0, |(v, _)| v) + 1;
                view.put(&p.shard_key, &p.key, version, &p.value)?;
                txn_op_result::Result::Put(PutResponse {
                    succeeded: true,
                    version,
                })
            }
            Some(txn_op::Op::Delete(d)) => {
                let prev = view.get(&d.shard_key, &d.key)?;
                if prev.is_some() {
                    view.delete(&d.shard_key, &d.key)?;
                }
                txn_op_result::Result::Delete(DeleteResponse {
                    succeeded: true,
                    deleted: prev.is_some(),
                    prev_version: prev.map_or(0, |(v, _)| v),
                })
            }
            Some(txn_op::Op::Get(g)) => {
                txn_op_result::Result::Get(match view.get(&g.shard_key, &g.key)? {
                    Some((version, value)) => GetResponse {
                        found: true,
                        value: value.into(),
                        version,
                    },
                    None => GetResponse::default(),
                })
            }
            // Validation refuses ops without a body before they reach the log.
            None => unreachable!("empty TxnOp passed validation"),
        };
        results.push(TxnOpResult {
            result: Some(result),
        });
    }
    Ok(TxnResponse { succeeded, results })
}

fn compare_holds(view: &mut impl ItemView, c: &Compare) -> Result<bool> {
    use std::cmp::Ordering;
    let item = view.get(&c.shard_key, &c.key)?;
    let op = compare::Op::try_from(c.op).expect("validated compare op");
    let ordering = match compare::Target::try_from(c.target).expect("validated compare target") {
        compare::Target::Version => item.as_ref().map_or(0, |(v, _)| *v).cmp(&c.version),
        compare::Target::Value => match &item {
            Some((_, value)) => value.as_slice().cmp(c.value.as_ref()),
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

/// An item's place in a `MemView`: (shard key, key).
#[cfg(test)]
type ItemName = (Vec<u8>, Vec<u8>);

/// An in-memory `ItemView` for tests and models: item → (version, value).
#[derive(Default, Debug, Clone, PartialEq)]
#[cfg(test)]
pub struct MemView(pub std::collections::BTreeMap<ItemName, (u64, Vec<u8>)>);

#[cfg(test)]
impl ItemView for MemView {
    fn get(&mut self, sk: &[u8], key: &[u8]) -> Result<Option<(u64, Vec<u8>)>> {
        Ok(self.0.get(&(sk.to_vec(), key.to_vec())).cloned())
    }
    fn put(&mut self, sk: &[u8], key: &[u8], version: u64, value: &[u8]) -> Result<()> {
        self.0
            .insert((sk.to_vec(), key.to_vec()), (version, value.to_vec()));
        Ok(())
    }
    fn delete(&mut self, sk: &[u8], key: &[u8]) -> Result<()> {
        self.0.remove(&(sk.to_vec(), key.to_vec()));
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
    fn version_of(r: &TxnOpResult) -> u64 {
        match r.result.as_ref().unwrap() {
            txn_op_result::Result::Put(p) => p.version,
            txn_op_result::Result::Get(g) => g.version,
            txn_op_result::Result::Delete(d) => d.prev_version,
        }
    }

    #[test]
    fn versions_start_at_one_and_grow_by_one() {
        let mut v = MemView::default();
        let txn = TxnRequest {
            success: vec![put("o1", "", "new"), put("o1", "", "paid"), get("o1", "")],
            ..Default::default()
        };
        let r = evaluate(&mut v, &txn).unwrap();
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
        evaluate(
            &mut v,
            &TxnRequest {
                success: vec![put("o1", "status", "new")],
                ..Default::default()
            },
        )
        .unwrap();
        let mut c = cmp("o1", "status", compare::Target::Version, compare::Op::Equal);
        c.version = 5;
        let txn = TxnRequest {
            compares: vec![c],
            success: vec![put("o1", "status", "paid")],
            failure: vec![get("o1", "status")],
            ..Default::default()
        };
        let before = v.clone();
        let r = evaluate(&mut v, &txn).unwrap();
        assert!(!r.succeeded);
        assert_eq!(v, before, "the failure branch only read");
        assert_eq!(version_of(&r.results[0]), 1);
    }

    #[test]
    fn compares_on_absent_items() {
        let mut v = MemView::default();
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
            assert_eq!(compare_holds(&mut v, &c).unwrap(), expect, "{c:?}");
        }
    }

    #[test]
    fn delete_reports_what_it_removed() {
        let mut v = MemView::default();
        evaluate(
            &mut v,
            &TxnRequest {
                success: vec![put("o", "a", "1"), put("o", "a", "2")],
                ..Default::default()
            },
        )
        .unwrap();
        let r = evaluate(
            &mut v,
            &TxnRequest {
                success: vec![del("o", "a"), del("o", "a")],
                ..Default::default()
            },
        )
        .unwrap();
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
        let r = evaluate(
            &mut v,
            &TxnRequest {
                success: vec![put("o", "a", "3")],
                ..Default::default()
            },
        )
        .unwrap();
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
                let r = evaluate(&mut v, &txn).unwrap();
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
