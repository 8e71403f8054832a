//! The checker's own tests: hand-written histories with known verdicts, then generated ones
//! (proptest) against an independent reference model.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ordo_proto::v1::{DeleteResponse, GetResponse, PutResponse};
use proptest::prelude::*;

use super::*;
use crate::rng::SplitMix64;

// ---- helpers for hand-written histories ----

fn item() -> ItemKey {
    ItemKey::new("order-1", "payment")
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn put(v: &str, if_version: Option<u64>) -> Op {
    Op::Put {
        value: v.as_bytes().to_vec(),
        if_version,
    }
}

fn del(if_version: Option<u64>) -> Op {
    Op::Delete { if_version }
}

fn put_ok(version: u64) -> Completion {
    Completion::Ok(Output::Put {
        succeeded: true,
        version,
    })
}

fn put_failed(current: u64) -> Completion {
    Completion::Ok(Output::Put {
        succeeded: false,
        version: current,
    })
}

fn found(v: &str, version: u64) -> Completion {
    Completion::Ok(Output::found(v, version))
}

fn absent() -> Completion {
    Completion::Ok(Output::absent())
}

fn del_ok(existed: bool, prev: u64) -> Completion {
    Completion::Ok(Output::Delete {
        succeeded: true,
        existed,
        prev_version: Some(prev),
    })
}

/// Adds an op on `item()` from `client` over [a, b] ms; `b` is ignored for non-Ok outcomes.
fn at(h: &History, client: ClientId, op: Op, a: u64, b: u64, c: Completion) -> OpId {
    let ret = matches!(c, Completion::Ok(_)).then(|| ms(b));
    h.push(client, item(), op, ms(a), ret, c)
}

fn assert_ok(h: &History) {
    check(h).assert_linearizable();
}

/// Asserts a violation on `item()` and returns it (printing the report, which is what a
/// failing test would show).
fn assert_violation(h: &History) -> Violation {
    let r = check(h);
    eprintln!("{r}");
    assert_eq!(r.overall(), Overall::NotLinearizable, "{r}");
    let bad = r.violations();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].key, item());
    match &bad[0].verdict {
        Verdict::Violation(v) => v.clone(),
        other => panic!("expected a violation, got {other:?}"),
    }
}

// ---- linearizable histories ----

#[test]
fn empty_history_is_linearizable() {
    assert_ok(&History::new());
}

#[test]
fn sequential_history_is_linearizable() {
    let h = History::new();
    at(&h, 1, put("a", None), 0, 1, put_ok(1));
    at(&h, 1, Op::Get, 2, 3, found("a", 1));
    at(&h, 1, put("b", Some(1)), 4, 5, put_ok(2));
    at(&h, 1, put("c", Some(1)), 6, 7, put_failed(2));
    at(&h, 1, Op::Get, 8, 9, found("b", 2));
    at(&h, 1, del(None), 10, 11, del_ok(true, 2));
    at(&h, 1, Op::Get, 12, 13, absent());
    // An unconditional delete of an absent item succeeds and removes nothing.
    at(&h, 1, del(None), 14, 15, del_ok(false, 0));
    at(&h, 1, del(Some(3)), 16, 17, {
        Completion::Ok(Output::Delete {
            succeeded: false,
            existed: false,
            prev_version: Some(0),
        })
    });
    assert_ok(&h);
}

#[test]
fn overlapping_writes_with_reads_seeing_either() {
    // Both puts overlap every read; their versions say b went first.
    let h = History::new();
    at(&h, 1, put("a", None), 0, 10, put_ok(2));
    at(&h, 2, put("b", None), 0, 10, put_ok(1));
    at(&h, 3, Op::Get, 1, 9, found("b", 1));
    at(&h, 4, Op::Get, 2, 9, found("a", 2));
    at(&h, 3, Op::Get, 11, 12, found("a", 2));
    assert_ok(&h);

    // Reads overlapping both writes may see nothing, the first, or the second.
    let h = History::new();
    at(&h, 1, put("a", None), 0, 10, put_ok(1));
    at(&h, 2, put("b", None), 1, 10, put_ok(2));
    at(&h, 3, Op::Get, 2, 5, absent());
    at(&h, 4, Op::Get, 3, 9, found("a", 1));
    at(&h, 5, Op::Get, 4, 9, found("b", 2));
    assert_ok(&h);
}

#[test]
fn cas_chain_is_linearizable() {
    let h = History::new();
    at(&h, 1, put("a", Some(0)), 0, 1, put_ok(1));
    // Three racing CAS on version 1: exactly one wins, the others see version 2.
    at(&h, 1, put("x", Some(1)), 2, 6, put_ok(2));
    at(&h, 2, put("y", Some(1)), 2, 6, put_failed(2));
    at(&h, 3, put("z", Some(1)), 3, 7, put_failed(2));
    // A CAS on a wrong version that ran before the winner saw version 1.
    at(&h, 4, put("q", Some(5)), 2, 7, put_failed(1));
    // "Must not exist" fails against an existing item.
    at(&h, 4, put("n", Some(0)), 8, 9, put_failed(2));
    at(&h, 1, put("w", Some(2)), 8, 9, put_ok(3));
    at(&h, 2, Op::Get, 10, 11, found("w", 3));
    assert_ok(&h);
}

#[test]
fn unknown_write_that_took_effect() {
    let h = History::new();
    at(&h, 1, put("a", None), 0, 1, put_ok(1));
    at(&h, 2, put("b", None), 2, 0, Completion::Unknown);
    at(&h, 3, Op::Get, 5, 6, found("b", 2));
    at(&h, 3, Op::Get, 7, 8, found("b", 2));
    assert_ok(&h);
}

#[test]
fn unknown_write_that_did_not_take_effect() {
    let h = History::new();
    at(&h, 1, put("a", None), 0, 1, put_ok(1));
    at(&h, 2, put("b", None), 2, 0, Completion::Unknown);
    at(&h, 3, Op::Get, 5, 6, found("a", 1));
    at(&h, 3, Op::Get, 20, 21, found("a", 1));
    assert_ok(&h);
}

#[test]
fn unknown_write_may_take_effect_long_after_its_timeout() {
    let h = History::new();
    at(&h, 1, put("a", None), 0, 1, put_ok(1));
    at(&h, 2, put("b", None), 2, 0, Completion::Unknown);
    at(&h, 3, Op::Get, 5, 6, found("a", 1));
    at(&h, 3, put("c", Some(1)), 7, 8, put_ok(2));
    at(&h, 3, Op::Get, 100, 101, found("b", 3));
    assert_ok(&h);
}

#[test]
fn search_backtracks_over_unknown_writes() {
    // Placing b first (it comes first in the list) must be undone: c went first.
    let h = History::new();
    at(&h, 1, put("a", None), 0, 1, put_ok(1));
    at(&h, 2, put("b", None), 2, 0, Completion::Unknown);
    at(&h, 3, put("c", None), 3, 0, Completion::Unknown);
    at(&h, 4, Op::Get, 10, 11, found("c", 2));
    at(&h, 4, Op::Get, 12, 13, found("b", 3));
    assert_ok(&h);
}

#[test]
fn many_timed_out_writes_stay_cheap() {
    // Forty writes of unknown outcome: which ones happened is irrelevant when nobody read
    // their values, only how many. Without the symmetry rule this is 2^40 subsets.
    let h = History::new();
    for c in 0..40 {
        at(
            &h,
            c,
            put(&format!("lost{c}"), None),
            c,
            0,
            Completion::Unknown,
        );
    }
    at(&h, 50, put("seen", None), 0, 100, Completion::Unknown);
    at(&h, 51, Op::Get, 60, 61, found("seen", 17));
    at(&h, 51, put("x", Some(17)), 62, 63, put_ok(18));
    at(&h, 51, Op::Get, 70, 71, {
        Completion::Ok(Output::Get {
            found: true,
            value: b"x".to_vec(),
            version: 18,
        })
    });
    let r = check(&h);
    assert!(r.is_linearizable(), "{r}");
    assert!(r.keys[0].steps < 100_000, "{} steps", r.keys[0].steps);

    // And a refutation over the same writes is found, not timed out: a read of a version
    // no number of writes can reach.
    at(&h, 51, Op::Get, 200, 201, found("x", 60));
    let r = check(&h);
    eprintln!("{r}");
    assert_eq!(r.overall(), Overall::NotLinearizable, "{r}");
}

#[test]
fn delete_then_recreate_starts_at_version_one() {
    let h = History::new();
    at(&h, 1, put("a", None), 0, 1, put_ok(1));
    at(&h, 1, put("b", None), 2, 3, put_ok(2));
    at(&h, 2, del(Some(2)), 4, 5, del_ok(true, 2));
    at(&h, 3, Op::Get, 6, 7, absent());
    at(&h, 1, put("c", Some(0)), 8, 9, put_ok(1));
    at(&h, 3, Op::Get, 10, 11, found("c", 1));
    at(&h, 2, put("d", Some(1)), 12, 13, put_ok(2));
    assert_ok(&h);
}

#[test]
fn failed_ops_are_ignored() {
    let h = History::new();
    at(&h, 1, put("a", None), 0, 1, Completion::Fail);
    at(&h, 2, Op::Get, 2, 3, absent());
    at(&h, 2, Op::Get, 4, 0, Completion::Unknown);
    assert_ok(&h);
}

#[test]
fn touching_windows_count_as_concurrent() {
    // The read is invoked at the instant the write returns: either order is allowed.
    let h = History::new();
    at(&h, 1, put("a", None), 0, 5, put_ok(1));
    at(&h, 2, Op::Get, 5, 6, absent());
    assert_ok(&h);
}

#[test]
fn initial_state_is_respected() {
    let h = History::new();
    at(&h, 1, put("b", Some(5)), 0, 1, put_ok(6));
    assert_eq!(check(&h).overall(), Overall::NotLinearizable);
    let mut options = CheckOptions::default();
    options.initial.insert(item(), (b"a".to_vec(), 5));
    assert!(check_with(&h, &options).is_linearizable());
}

#[test]
fn recorder_with_real_clock_and_a_pending_op() {
    let h = History::new();
    let k = item();
    let a = h.invoke(1, k.clone(), put("a", None));
    h.complete(a, put_ok(1));
    // Invoked, never completed (say the task was cancelled): it counts as unknown.
    let _b = h.invoke(2, k.clone(), put("b", None));
    let c = h.invoke(3, k.clone(), Op::Get);
    h.complete(c, found("b", 2));
    assert_ok(&h);
    let d = h.invoke(3, k, Op::Get);
    h.complete(d, found("zzz", 2));
    assert_eq!(check(&h).overall(), Overall::NotLinearizable);
    let records = h.records();
    assert!(records.windows(2).all(|w| w[0].invoke <= w[1].invoke));
}

#[test]
fn async_recording_maps_answers_and_errors() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let h = History::new();
    rt.block_on(async {
        let ok = h
            .record(1, item(), put("a", None), async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok(PutResponse {
                    succeeded: true,
                    version: 1,
                })
            })
            .await;
        assert!(ok.is_ok());
        let refused: Result<PutResponse, _> = h
            .record(1, item(), put("b", None), async {
                Err(tonic::Status::invalid_argument("value too large"))
            })
            .await;
        assert!(refused.is_err());
        let lost: Result<DeleteResponse, _> = h
            .record(1, item(), del(None), async {
                Err(tonic::Status::unavailable("connection reset"))
            })
            .await;
        assert!(lost.is_err());
        let _ = h
            .record(2, item(), Op::Get, async {
                Ok(GetResponse {
                    found: true,
                    value: b"a".to_vec().into(),
                    version: 1,
                })
            })
            .await;
    });
    let completions: Vec<_> = h.records().into_iter().map(|r| r.completion).collect();
    assert_eq!(
        completions,
        vec![
            Some(put_ok(1)),
            Some(Completion::Fail),
            Some(Completion::Unknown),
            Some(found("a", 1)),
        ]
    );
    assert_ok(&h);
}

#[test]
#[should_panic(expected = "completed twice")]
fn completing_twice_is_a_test_bug() {
    let h = History::new();
    let a = h.invoke(1, item(), Op::Get);
    h.complete(a, absent());
    h.complete(a, absent());
}

// ---- non-linearizable histories ----

#[test]
fn stale_read_is_a_violation() {
    let h = History::new();
    at(&h, 1, put("a", None), 0, 1, put_ok(1));
    at(&h, 1, put("b", None), 2, 3, put_ok(2));
    let read = at(&h, 2, Op::Get, 4, 5, found("a", 1));
    let v = assert_violation(&h);
    assert_eq!(v.stuck_at, Some(read));
    assert_eq!(v.longest_prefix.len(), 2);
    assert!(v.explanation.contains("#2"), "{}", v.explanation);
    assert!(v.explanation.contains("it read"), "{}", v.explanation);
}

#[test]
fn lost_update_is_a_violation() {
    let h = History::new();
    at(&h, 1, put("a", Some(0)), 0, 1, put_ok(1));
    at(&h, 1, put("b", Some(1)), 2, 5, put_ok(2));
    at(&h, 2, put("c", Some(1)), 3, 6, put_ok(2));
    assert_violation(&h);
}

#[test]
fn read_of_a_failed_write_is_a_violation() {
    let h = History::new();
    at(&h, 1, put("a", None), 0, 1, put_ok(1));
    at(&h, 1, put("b", None), 2, 3, Completion::Fail);
    at(&h, 2, Op::Get, 4, 5, found("b", 2));
    assert_violation(&h);
}

#[test]
fn version_going_backwards_is_a_violation() {
    let h = History::new();
    at(&h, 1, put("a", None), 0, 1, put_ok(1));
    at(&h, 1, put("b", None), 2, 10, put_ok(2));
    at(&h, 2, Op::Get, 3, 4, found("b", 2));
    at(&h, 2, Op::Get, 5, 6, found("a", 1));
    assert_violation(&h);
}

#[test]
fn read_of_a_value_never_written_is_a_violation() {
    let h = History::new();
    at(&h, 1, put("a", None), 0, 1, put_ok(1));
    at(&h, 2, Op::Get, 2, 3, found("zzz", 1));
    assert_violation(&h);
}

#[test]
fn wrong_write_answers_are_violations() {
    // An unconditional put cannot fail.
    let h = History::new();
    at(&h, 1, put("a", None), 0, 1, put_failed(0));
    assert_violation(&h);
    // Versions go up by one.
    let h = History::new();
    at(&h, 1, put("a", None), 0, 1, put_ok(1));
    at(&h, 1, put("b", None), 2, 3, put_ok(3));
    assert_violation(&h);
    // A delete of an absent item removed nothing.
    let h = History::new();
    at(&h, 1, del(None), 0, 1, del_ok(true, 0));
    assert_violation(&h);
    // Recreation after a delete starts again at 1.
    let h = History::new();
    at(&h, 1, put("a", None), 0, 1, put_ok(1));
    at(&h, 1, del(None), 2, 3, del_ok(true, 1));
    at(&h, 1, put("b", None), 4, 5, put_ok(2));
    assert_violation(&h);
}

#[test]
fn unknown_write_cannot_explain_a_read_before_it() {
    let h = History::new();
    at(&h, 1, Op::Get, 0, 1, found("b", 1));
    at(&h, 2, put("b", None), 2, 0, Completion::Unknown);
    assert_violation(&h);
}

#[test]
fn violation_is_reported_for_its_item_only() {
    let h = History::new();
    let other = ItemKey::new("order-2", "");
    h.push(
        1,
        other.clone(),
        put("x", None),
        ms(0),
        Some(ms(1)),
        put_ok(1),
    );
    h.push(1, other.clone(), Op::Get, ms(2), Some(ms(3)), found("x", 1));
    at(&h, 1, put("a", None), 0, 1, put_ok(1));
    at(&h, 2, Op::Get, 2, 3, absent());
    let r = check(&h);
    assert_eq!(r.keys.len(), 2);
    let bad = r.violations();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].key, item());
    let text = r.to_string();
    assert!(text.contains("\"order-1\""), "{text}");
    assert!(!text.contains("\"order-2\""), "{text}");
}

#[test]
fn malformed_history_is_reported() {
    let h = History::new();
    at(&h, 1, Op::Get, 0, 1, put_ok(1));
    let r = check(&h);
    assert!(matches!(r.keys[0].verdict, Verdict::Invalid(_)), "{r}");
    assert_eq!(r.overall(), Overall::NotLinearizable);
}

#[test]
fn exhausted_budget_is_undecided_not_a_violation() {
    let h = History::new();
    for c in 0..10 {
        at(&h, c, put(&format!("v{c}"), None), 0, 100, put_ok(c + 1));
    }
    let options = CheckOptions {
        max_steps_per_key: 3,
        ..CheckOptions::default()
    };
    let r = check_with(&h, &options);
    assert_eq!(r.overall(), Overall::Unknown, "{r}");
    assert_eq!(r.timed_out(), vec![&item()]);
    r.assert_no_violation();
    assert!(check(&h).is_linearizable());
}

// ---- generated histories ----

/// A reference model written independently of `step`, so a shared misunderstanding of
/// the semantics does not make generator and checker agree by accident.
fn apply(store: &mut BTreeMap<ItemKey, (Vec<u8>, u64)>, key: &ItemKey, op: &Op) -> Output {
    let cur = store.get(key).cloned();
    let cur_version = cur.as_ref().map_or(0, |c| c.1);
    let holds = |c: &Option<u64>| match *c {
        None => true,
        Some(0) => cur.is_none(),
        Some(v) => cur_version == v,
    };
    match op {
        Op::Get => match cur {
            Some((value, version)) => Output::found(value, version),
            None => Output::absent(),
        },
        Op::Put { value, if_version } if holds(if_version) => {
            store.insert(key.clone(), (value.clone(), cur_version + 1));
            Output::Put {
                succeeded: true,
                version: cur_version + 1,
            }
        }
        Op::Put { .. } => Output::Put {
            succeeded: false,
            version: cur_version,
        },
        Op::Delete { if_version } if holds(if_version) => {
            store.remove(key);
            Output::Delete {
                succeeded: true,
                existed: cur.is_some(),
                prev_version: Some(cur_version),
            }
        }
        Op::Delete { .. } => Output::Delete {
            succeeded: false,
            existed: false,
            prev_version: Some(cur_version),
        },
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    Ok,
    UnknownApplied,
    UnknownLost,
    Fail,
}

/// One generated client operation: what it is, and its timing relative to the client's
/// previous operation.
#[derive(Clone, Debug)]
struct Spec {
    client: u64,
    key: u8,
    /// 0..8 get, 8..17 put, 17..20 delete.
    kind: u8,
    /// 0 unconditional, 1 must-not-exist, 2 the version current at execution, 3 `ver`.
    cond: u8,
    ver: u64,
    value: u8,
    gap: u64,
    exec: u64,
    ret: u64,
    fate: Fate,
}

fn spec(clients: u64, keys: u8) -> impl Strategy<Value = Spec> {
    (
        0..clients,
        0..keys,
        0u8..20,
        0u8..4,
        0u64..5,
        0u8..6,
        1u64..20,
        0u64..30,
        0u64..30,
        0u8..20,
    )
        .prop_map(
            |(client, key, kind, cond, ver, value, gap, exec, ret, fate)| Spec {
                client,
                key,
                kind,
                cond,
                ver,
                value,
                gap,
                exec,
                ret,
                fate: match fate {
                    0..=15 => Fate::Ok,
                    16 => Fate::UnknownApplied,
                    17 | 18 => Fate::UnknownLost,
                    _ => Fate::Fail,
                },
            },
        )
}

fn gen_key(k: u8) -> ItemKey {
    ItemKey::new(format!("order-{k}"), "")
}

/// Builds a history in which every applied op takes effect atomically at one instant inside
/// its window (for unknown ops: any instant after invocation, possibly after the client has
/// moved on), by running the reference model in order of those instants.
fn simulate(specs: &[Spec]) -> History {
    let clients = specs.iter().map(|s| s.client).max().map_or(0, |c| c + 1);
    let mut cursor = vec![0u64; clients as usize];
    // (invoke, effect instant, return)
    let mut times = Vec::with_capacity(specs.len());
    for s in specs {
        let c = s.client as usize;
        let invoke = cursor[c] + s.gap;
        let (effect, ret) = match s.fate {
            Fate::Ok => (invoke + s.exec, Some(invoke + s.exec + s.ret)),
            // The client gives up at `invoke + ret`, the server may act much later.
            Fate::UnknownApplied | Fate::UnknownLost => (invoke + s.exec * 3, None),
            Fate::Fail => (invoke, None),
        };
        cursor[c] = ret.unwrap_or(invoke + s.ret);
        times.push((invoke, effect, ret));
    }
    let mut order: Vec<usize> = (0..specs.len())
        .filter(|&i| matches!(specs[i].fate, Fate::Ok | Fate::UnknownApplied))
        .collect();
    order.sort_by_key(|&i| (times[i].1, i));

    let mut store = BTreeMap::new();
    let mut ops: Vec<Option<Op>> = vec![None; specs.len()];
    let mut outs: Vec<Option<Output>> = vec![None; specs.len()];
    let op_for = |s: &Spec, current: u64| {
        let if_version = match s.cond {
            0 => None,
            1 => Some(0),
            2 => Some(current),
            _ => Some(s.ver),
        };
        match s.kind {
            0..=7 => Op::Get,
            8..=16 => Op::Put {
                value: format!("v{}", s.value).into_bytes(),
                if_version,
            },
            _ => Op::Delete { if_version },
        }
    };
    for i in order {
        let key = gen_key(specs[i].key);
        // "Current" is what a client that had just read the item would send.
        let current = store.get(&key).map_or(0, |c: &(Vec<u8>, u64)| c.1);
        let op = op_for(&specs[i], current);
        outs[i] = Some(apply(&mut store, &key, &op));
        ops[i] = Some(op);
    }

    let h = History::new();
    for (i, s) in specs.iter().enumerate() {
        let op = ops[i].take().unwrap_or_else(|| op_for(s, s.ver));
        let (invoke, _, ret) = times[i];
        let completion = match s.fate {
            Fate::Ok => Completion::Ok(outs[i].take().expect("applied op has an output")),
            Fate::UnknownApplied | Fate::UnknownLost => Completion::Unknown,
            Fate::Fail => Completion::Fail,
        };
        h.push(
            s.client,
            gen_key(s.key),
            op,
            Duration::from_micros(invoke),
            ret.map(Duration::from_micros),
            completion,
        );
    }
    h
}

/// Indexes of completed reads.
fn ok_reads(records: &[Record]) -> Vec<usize> {
    records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.op == Op::Get && matches!(r.completion, Some(Completion::Ok(_))))
        .map(|(i, _)| i)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn generated_histories_are_linearizable(
        specs in proptest::collection::vec(spec(4, 2), 1..40),
    ) {
        let r = check(&simulate(&specs));
        prop_assert!(r.is_linearizable(), "{}", r);
    }

    /// A read answering a version the item never reached cannot be linearized, however
    /// the ops overlap.
    #[test]
    fn read_of_an_impossible_version_is_found(
        specs in proptest::collection::vec(spec(4, 2), 1..40),
        pick in any::<prop::sample::Index>(),
    ) {
        let mut records = simulate(&specs).records();
        let reads = ok_reads(&records);
        prop_assume!(!reads.is_empty());
        let r = &mut records[reads[pick.index(reads.len())]];
        r.completion = Some(Completion::Ok(Output::found("v0", 1_000_000)));
        let result = check_records(&records, &CheckOptions::default());
        prop_assert_eq!(result.overall(), Overall::NotLinearizable, "{}", result);
    }

    /// Without concurrency or unknown outcomes there is exactly one linearization, so any
    /// changed read answer must be caught.
    #[test]
    fn any_wrong_read_in_a_sequential_history_is_found(
        specs in proptest::collection::vec(spec(1, 2), 1..40),
        pick in any::<prop::sample::Index>(),
        how in 0u8..3,
    ) {
        let specs: Vec<Spec> = specs
            .into_iter()
            .map(|s| Spec {
                fate: if s.fate == Fate::Fail { Fate::Fail } else { Fate::Ok },
                ..s
            })
            .collect();
        let mut records = simulate(&specs).records();
        let reads = ok_reads(&records);
        prop_assume!(!reads.is_empty());
        let r = &mut records[reads[pick.index(reads.len())]];
        let Some(Completion::Ok(Output::Get { found, value, version })) = r.completion.clone()
        else {
            unreachable!()
        };
        let wrong = match (how, found) {
            (_, false) => Output::found("v1", 1),
            (0, true) => Output::absent(),
            (1, true) => Output::found(value, version + 1),
            _ => Output::found("never written", version),
        };
        r.completion = Some(Completion::Ok(wrong));
        let result = check_records(&records, &CheckOptions::default());
        prop_assert_eq!(result.overall(), Overall::NotLinearizable, "{}", result);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, ..ProptestConfig::default() })]

    /// The symmetry reduction over unknown ops never changes a verdict: compare it with the
    /// plain search on histories full of unknown outcomes, with and without a read answer
    /// replaced by a plausible but possibly wrong one.
    #[test]
    fn symmetry_reduction_agrees_with_plain_search(
        specs in proptest::collection::vec(spec(4, 1), 1..24),
        fates in proptest::collection::vec(0u8..5, 24),
        mutate in proptest::option::of((any::<prop::sample::Index>(), 0u8..6, 1u64..6)),
    ) {
        let specs: Vec<Spec> = specs
            .into_iter()
            .zip(fates)
            .map(|(s, f)| Spec {
                fate: match f {
                    0 => Fate::UnknownApplied,
                    1 => Fate::UnknownLost,
                    _ => s.fate,
                },
                ..s
            })
            .collect();
        let mut records = simulate(&specs).records();
        let reads = ok_reads(&records);
        if let (Some((pick, value, version)), false) = (mutate, reads.is_empty()) {
            let r = &mut records[reads[pick.index(reads.len())]];
            r.completion = Some(Completion::Ok(Output::found(format!("v{value}"), version)));
        }
        let options = CheckOptions::default();
        let fast = check_records_inner(&records, &options, true);
        let plain = check_records_inner(&records, &options, false);
        prop_assume!(plain.overall() != Overall::Unknown);
        prop_assert_eq!(fast.overall(), plain.overall(), "reduced:\n{}\nplain:\n{}", fast, plain);
    }
}

#[test]
fn hundreds_of_heavily_concurrent_ops_get_a_verdict() {
    let mut rng = SplitMix64(0x9e37_79b9_7f4a_7c15);
    let specs: Vec<Spec> = (0..600)
        .map(|_| Spec {
            client: rng.below(10),
            key: rng.below(3) as u8,
            kind: rng.below(20) as u8,
            cond: rng.below(4) as u8,
            ver: rng.below(6),
            value: rng.below(4) as u8,
            gap: 1 + rng.below(3),
            // Long windows against short gaps: most ops overlap several others.
            exec: rng.below(200),
            ret: rng.below(200),
            fate: match rng.below(40) {
                0 => Fate::UnknownApplied,
                1 => Fate::UnknownLost,
                2 => Fate::Fail,
                _ => Fate::Ok,
            },
        })
        .collect();
    let r = check(&simulate(&specs));
    eprintln!("{r}");
    for k in &r.keys {
        eprintln!("{}: {} ops, {} steps", k.key, k.ops, k.steps);
    }
    r.assert_no_violation();
}

#[test]
fn threads_sharing_a_history_against_a_locked_store() {
    let history = History::new();
    let store = Arc::new(Mutex::new(BTreeMap::new()));
    let keys: Vec<ItemKey> = (0..3).map(gen_key).collect();
    std::thread::scope(|scope| {
        for client in 0..8u64 {
            let history = history.clone();
            let store = Arc::clone(&store);
            let keys = &keys;
            scope.spawn(move || {
                let mut rng = SplitMix64(client * 7919 + 1);
                for n in 0..80u64 {
                    let key = keys[rng.below(3) as usize].clone();
                    let if_version = match rng.below(3) {
                        0 => None,
                        _ => Some(rng.below(4)),
                    };
                    let op = match rng.below(5) {
                        0 | 1 => Op::Get,
                        2 | 3 => Op::Put {
                            value: format!("c{client}-{n}").into_bytes(),
                            if_version,
                        },
                        _ => Op::Delete { if_version },
                    };
                    let id = history.invoke(client, key.clone(), op.clone());
                    let fate = rng.below(30);
                    let out = if fate == 0 {
                        None
                    } else {
                        Some(apply(&mut store.lock().unwrap(), &key, &op))
                    };
                    let completion = match (fate, out) {
                        (_, None) => Completion::Fail,
                        // Applied, but the client lost the answer.
                        (1, Some(_)) => Completion::Unknown,
                        (_, Some(out)) => Completion::Ok(out),
                    };
                    history.complete(id, completion);
                }
            });
        }
    });
    assert_eq!(history.len(), 8 * 80);
    check(&history).assert_linearizable();
}
