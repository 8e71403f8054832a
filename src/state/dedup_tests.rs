//! The dedup entries' tests (`dedup.rs`): repeats, expiry, bounds, restarts, snapshots, 2PC
//! decisions, the old layout and the in-memory index.
use super::*;
use crate::state::{Apply, Command, Outcome, StateMachine};
use ordo_proto::v1::{txn_op_result, GetRequest, PrepareRequest, PutRequest, RequestHeader, TxnOp};

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

    /// The state machine dropped and loaded again from the same storage (a restart).
    fn reopen(self) -> Sm {
        let Sm { sm, db, dir, index } = self;
        drop(sm);
        Sm {
            sm: StateMachine::open(&db, 1, SLOTS).unwrap().sm,
            index,
            db,
            dir,
        }
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
        let old = |kind: u8, rest: &[u8]| keys::reserved_key(slot, KIND, &[&[kind], rest].concat());
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
    let mut s = s.reopen();
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
    let mut s = s.reopen();
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
