//! Result budgets at apply (audit C2): over-budget transactions are refused alike on every
//! replica, write nothing, and cost bounded memory. Memory is measured by a counting allocator
//! that keeps a count per thread, so tests running alongside do not disturb each other (sled
//! reads on the calling thread, so its buffers are counted too).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use ordo_proto::v1::{
    txn_op, txn_op_result, GetRequest, PrepareRequest, PutRequest, TxnOp, TxnRequest,
};

use super::*;
use crate::limits::{ENTRY_RESULT_BYTES_MAX, TXN_RESULT_BYTES_MAX, VALUE_BYTES_MAX};

struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn grew(n: usize) {
    let _ = LIVE.try_with(|live| {
        live.set(live.get() + n);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(live.get())));
    });
}

fn shrank(n: usize) {
    // Memory allocated on another thread and freed here is not ours: never below zero.
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(n)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        System.dealloc(p, layout);
        shrank(layout.size());
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = System.realloc(p, layout, new_size);
        if !q.is_null() {
            shrank(layout.size());
            grew(new_size);
        }
        q
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// `f`'s result and the most bytes this thread held at once while it ran, above what it held
/// before.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(before));
    let r = f();
    (r, PEAK.with(Cell::get) - before)
}

const MIB: usize = 1024 * 1024;
const SK: &str = "order-big";

fn get(i: usize) -> TxnOp {
    TxnOp {
        op: Some(txn_op::Op::Get(GetRequest {
            shard_key: SK.into(),
            key: format!("item/{i:03}").into(),
            ..Default::default()
        })),
    }
}

fn put(key: &str, value: Vec<u8>) -> TxnOp {
    TxnOp {
        op: Some(txn_op::Op::Put(PutRequest {
            shard_key: SK.into(),
            key: key.to_string().into(),
            value: value.into(),
            ..Default::default()
        })),
    }
}

fn txn(success: Vec<TxnOp>) -> TxnRequest {
    TxnRequest {
        success,
        ..Default::default()
    }
}

/// A state machine holding `n` items of 1 MiB under one shard key (`item/000`, ...; item i
/// filled with byte i), applied at indexes 1..=n; the next free index is n + 1.
fn store(n: usize) -> (tempfile::TempDir, StateMachine) {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let sm = StateMachine::open(&db, 1, 64).unwrap().sm;
    for i in 0..n {
        let t = txn(vec![put(
            &format!("item/{i:03}"),
            vec![i as u8; VALUE_BYTES_MAX],
        )]);
        let r = sm.apply_all(&[Apply {
            index: i as u64 + 1,
            cmd: Some(Command::Txn(t)),
            stamp: None,
        }]);
        assert!(matches!(&r.unwrap()[0].1, Ok(Outcome::Txn(_))));
    }
    (dir, sm)
}

fn batch_results(out: Vec<(u64, Result<Outcome>)>) -> Vec<Result<TxnResponse>> {
    match out.into_iter().next() {
        Some((_, Ok(Outcome::TxnBatch(rs)))) => rs,
        other => panic!("a batch gave {other:?}"),
    }
}

fn refused_naming(r: &Result<TxnResponse>, limit: &str) -> bool {
    matches!(r, Err(Error::ResourceExhausted(m)) if m.contains(limit)
        && m.contains(&format!("{limit} (")))
}

#[test]
fn c2_an_entry_of_256_oversized_reads_is_refused_alike_and_holds_bounded_memory() {
    let (_dir, sm) = store(127);
    let all: Vec<TxnOp> = (0..127).map(get).collect();
    // 128 get-only Txns of all 127 items, and 128 that also write (127 Gets + a Put: 128 ops).
    let txns: Vec<TxnRequest> = (0..256)
        .map(|j| {
            let mut ops = all.clone();
            if j % 2 == 1 {
                ops.insert(0, put(&format!("written/{j}"), b"x".to_vec()));
            }
            txn(ops)
        })
        .collect();
    let entry = [Apply {
        index: 128,
        cmd: Some(Command::TxnBatch(txns)),
        stamp: None,
    }];
    let (out, peak) = peak_during(|| sm.apply_all(&entry).unwrap());
    let results = batch_results(out);
    assert_eq!(results.len(), 256);
    for (j, r) in results.iter().enumerate() {
        assert!(refused_naming(r, "TXN_RESULT_BYTES_MAX"), "txn {j}: {r:?}");
    }
    for j in (1..256).step_by(2) {
        let key = format!("written/{j}");
        assert!(
            sm.get(SK.as_bytes(), key.as_bytes()).unwrap().is_none(),
            "{key} was written"
        );
    }
    assert_eq!(sm.applied_index(), 128);
    // Unbounded, this entry would hold 256 x 127 MiB. Bounded: one Txn's budget being refused,
    // the item being read, sled's buffers for it; nothing accepted.
    assert!(
        peak < TXN_RESULT_BYTES_MAX + 8 * MIB,
        "applying the entry held {} MiB at its peak",
        peak / MIB
    );
}

#[test]
fn c2_the_transactions_of_an_entry_share_its_budget_and_refused_ones_write_nothing() {
    let (_dir, sm) = store(4);
    let reads = |n: usize| (0..n).map(get).collect::<Vec<_>>();
    // Four Txns of 4 MiB fill the entry's budget; a fifth that reads fits its own budget but
    // not what the entry has left; one that only writes still applies.
    let mut txns: Vec<TxnRequest> = (0..4).map(|_| txn(reads(4))).collect();
    let mut over = reads(1);
    over.push(put("written/over", b"x".to_vec()));
    txns.push(txn(over));
    txns.push(txn(vec![put("written/fine", b"y".to_vec())]));
    let entry = [Apply {
        index: 5,
        cmd: Some(Command::TxnBatch(txns)),
        stamp: None,
    }];
    let (out, peak) = peak_during(|| batch_results(sm.apply_all(&entry).unwrap()));
    for (j, r) in out[..4].iter().enumerate() {
        let r = r.as_ref().unwrap();
        for (i, op) in r.results.iter().enumerate() {
            match op.result.as_ref().unwrap() {
                txn_op_result::Result::Get(g) => {
                    assert!(g.found && g.value.len() == VALUE_BYTES_MAX && g.value[0] == i as u8)
                }
                other => panic!("txn {j} op {i}: {other:?}"),
            }
        }
    }
    assert!(
        refused_naming(&out[4], "ENTRY_RESULT_BYTES_MAX"),
        "{:?}",
        out[4]
    );
    assert!(out[5].is_ok(), "{:?}", out[5]);
    assert!(sm.get(SK.as_bytes(), b"written/over").unwrap().is_none());
    assert_eq!(
        sm.get(SK.as_bytes(), b"written/fine").unwrap().unwrap().0,
        1
    );
    assert!(
        peak < ENTRY_RESULT_BYTES_MAX + TXN_RESULT_BYTES_MAX + 8 * MIB,
        "{peak}"
    );
}

#[test]
fn c2_a_long_apply_run_hands_its_results_out_as_it_goes() {
    let (_dir, sm) = store(4);
    // 32 entries of one 4 MiB read each: 128 MiB of results in one run of transactions.
    let entries: Vec<Apply> = (0..32)
        .map(|i| Apply {
            index: 5 + i,
            cmd: Some(Command::Txn(txn((0..4).map(get).collect()))),
            stamp: None,
        })
        .collect();
    let mut answered = 0;
    let ((), peak) = peak_during(|| {
        sm.apply(&entries, &mut |_, r| {
            assert!(matches!(r, Ok(Outcome::Txn(ref t)) if t.results.len() == 4));
            answered += 1; // and dropped, as the driver hands it to its waiter
        })
        .unwrap()
    });
    assert_eq!(answered, 32);
    assert_eq!(sm.applied_index(), 36);
    // Cut where the results reach the entry budget: at most that plus one entry's at a time.
    assert!(
        peak < ENTRY_RESULT_BYTES_MAX + TXN_RESULT_BYTES_MAX + 8 * MIB,
        "the run held {} MiB at its peak",
        peak / MIB
    );
}

#[test]
fn c2_a_read_only_txn_is_served_from_the_applied_state_within_the_budget() {
    let (_dir, sm) = store(5);
    let fits = sm.read_txn(&txn((0..4).map(get).collect())).unwrap();
    assert_eq!(fits.results.len(), 4);
    let (r, peak) = peak_during(|| sm.read_txn(&txn((0..5).map(get).collect())));
    assert!(refused_naming(&r, "TXN_RESULT_BYTES_MAX"), "{r:?}");
    assert!(peak < TXN_RESULT_BYTES_MAX + 8 * MIB, "{peak}");
    assert_eq!(sm.applied_index(), 5);
}

#[test]
fn c2_a_2pc_part_that_could_return_too_much_is_not_prepared() {
    let (_dir, sm) = store(5);
    // Its failure branch reads 5 MiB: whichever branch is decided, the finish must run it.
    let part = TxnRequest {
        success: vec![put("written/2pc", b"x".to_vec())],
        failure: (0..5).map(get).collect(),
        ..Default::default()
    };
    let prepare = PrepareRequest {
        txn_id: vec![7; participant::TXN_ID_BYTES].into(),
        primary_shard_key: SK.into(),
        started_ms: 1,
        part: Some(part),
        ..Default::default()
    };
    let out = sm
        .apply_all(&[Apply {
            index: 6,
            cmd: Some(Command::Prepare(prepare)),
            stamp: None,
        }])
        .unwrap();
    match &out[0].1 {
        Err(Error::ResourceExhausted(m)) => {
            assert!(
                m.contains("TXN_RESULT_BYTES_MAX (") && m.contains("not prepared"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sm.locks_held(), 0);
}

/// A keyed write refused for its results wrote nothing, and its key keeps no outcome: sent again
/// once it fits, it is evaluated (and applied), not answered with the refusal.
#[test]
fn c2_a_keyed_txn_over_the_result_budget_keeps_no_outcome() {
    let (_dir, sm) = store(5);
    let mut t = txn((0..5).map(get).collect());
    t.success.push(put("written/keyed", b"x".to_vec()));
    t.header = Some(ordo_proto::v1::RequestHeader {
        map_version: 0,
        idempotency_key: bytes::Bytes::from_static(b"key-1"),
    });
    let stamp = Some(Stamp {
        now_ms: 1_000,
        window_ms: 60_000,
        capture: Default::default(),
    });
    let keyed = |index| {
        let out = sm
            .apply_all(&[Apply {
                index,
                cmd: Some(Command::Txn(t.clone())),
                stamp,
            }])
            .unwrap();
        match out.into_iter().next() {
            Some((_, Ok(Outcome::Txn(r)))) => Ok(r),
            Some((_, Err(e))) => Err(e),
            other => panic!("a txn gave {other:?}"),
        }
    };
    let written = || sm.get(SK.as_bytes(), b"written/keyed").unwrap();
    let first = keyed(6);
    assert!(refused_naming(&first, "TXN_RESULT_BYTES_MAX"), "{first:?}");
    assert!(written().is_none(), "nothing applied");

    // Two items fewer: 3 MiB fits.
    let delete = |i: usize| TxnOp {
        op: Some(txn_op::Op::Delete(ordo_proto::v1::DeleteRequest {
            shard_key: SK.into(),
            key: format!("item/{i:03}").into(),
            ..Default::default()
        })),
    };
    let out = sm.apply_all(&[Apply {
        index: 7,
        cmd: Some(Command::Txn(txn(vec![delete(0), delete(1)]))),
        stamp: None,
    }]);
    assert!(matches!(&out.unwrap()[0].1, Ok(Outcome::Txn(_))));
    let again = keyed(8).expect("the repeat is evaluated and fits");
    assert!(again.succeeded);
    assert_eq!(again.results.len(), 6);
    assert!(written().is_some(), "applied this time");
}
