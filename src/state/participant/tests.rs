//! The 2PC participant on real state machines: locks, decisions, lock ages, readers, snapshots.

use super::*;
use crate::limits::TXN_LOCK_TIMEOUT_MS;
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
                stamp: None,
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
            report_results: false,
        }))? {
            Outcome::Prepared(p) => Ok(p.compares_held),
            other => panic!("{other:?}"),
        }
    }

    fn finish(&mut self, txn: u8, d: Decision) -> FinishResponse {
        self.finish_at(txn, "order-1", d)
    }

    /// Finishes `txn`'s part, naming `sk` (one of its shard keys).
    fn finish_at(&mut self, txn: u8, sk: &str, d: Decision) -> FinishResponse {
        match self.apply(Command::Finish(FinishRequest {
            header: None,
            txn_id: id(txn).into(),
            shard_key: sk.as_bytes().to_vec().into(),
            decision: d as i32,
            group_id: 0,
        })) {
            Ok(Outcome::Finished(f)) => f,
            other => panic!("{other:?}"),
        }
    }

    fn decide(&mut self, txn: u8, d: Decision, resolve: bool) -> Decision {
        match self.apply(Command::Decide(DecideRequest {
            header: None,
            txn_id: id(txn).into(),
            primary_shard_key: b"order-1".to_vec().into(),
            decision: d as i32,
            resolve,
            started_ms: 0,
            wound: false,
            ..Default::default()
        })) {
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
fn the_first_decision_wins_and_a_resolver_aborts_only_undecided_transactions() {
    let mut s = Sm::new();
    assert_eq!(
        s.decide(1, Decision::RunSuccess, false),
        Decision::RunSuccess
    );
    // Once decided, a resolver learns the decision.
    assert_eq!(s.decide(1, Decision::Abort, true), Decision::RunSuccess);
    // An undecided transaction is aborted by the resolver; the coordinator then learns the
    // abort, and a late prepare of it is refused.
    assert_eq!(s.decide(2, Decision::Abort, true), Decision::Abort);
    assert_eq!(s.decide(2, Decision::RunSuccess, false), Decision::Abort);
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
    assert_eq!(s.decide(1, Decision::Abort, true), Decision::Abort);
}

/// Audit H7: a lock's age is this replica's own measure, from when it applied the lock,
/// whatever the coordinator's clock said (here: an hour ahead, then the epoch).
#[test]
fn h7_lock_ages_are_measured_by_the_replica_holding_them() {
    let hour_ahead = 3_600_000
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
    for started_ms in [hour_ahead, 0] {
        let mut s = Sm::new();
        let part = TxnRequest {
            success: vec![put("order-1", "x")],
            ..Default::default()
        };
        s.prepare(1, part, started_ms).unwrap();
        assert!(s.sm.holds_young_locks(&id(1)), "just applied: young");
        let age = |s: &Sm| match s.sm.get(b"order-1", b"") {
            Err(Error::Locked { age_ms, .. }) => age_ms,
            other => panic!("{other:?}"),
        };
        assert!(age(&s) < TXN_LOCK_TIMEOUT_MS, "started_ms {started_ms}");
        s.sm.lock_ages
            .backdate(Duration::from_millis(TXN_LOCK_TIMEOUT_MS));
        assert!(!s.sm.holds_young_locks(&id(1)));
        assert!(age(&s) >= TXN_LOCK_TIMEOUT_MS);
        // A restart knows no better than "held since I started": young again.
        s.sm.lock_ages.reset(&s.sm.data, SLOTS).unwrap();
        assert!(s.sm.holds_young_locks(&id(1)));
        s.finish(1, Decision::Abort);
        assert!(!s.sm.lock_ages.holds(&id(1)), "released: no age kept");
    }
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
            report_results: false,
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
        report_results: false,
    }));
    assert!(matches!(other_reader, Ok(Outcome::Prepared(_))));
    assert!(
        !s.finish(8, Decision::RunSuccess).found,
        "a shard key outside the part finds nothing"
    );
    s.finish_at(8, "order-3", Decision::RunSuccess);
    assert_eq!(
        s.sm.locks_held(),
        3,
        "order-3 stays read-locked by the first reader"
    );
    s.finish_at(1, "order-2", Decision::RunSuccess);
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
    let (index, path, _) =
        s.sm.build_snapshot(&dir.path().join("snap"), s.sm.applied_index(), 1)
            .unwrap();
    let db = sled::open(dir.path().join("b")).unwrap();
    let other = StateMachine::open(&db, 2, SLOTS).unwrap().sm;
    other.install_snapshot(&path, index).unwrap();
    other.finish_install().unwrap();
    assert_eq!(other.locks_held(), 2);
    assert!(is_locked(other.get(b"order-2", b""), 7));
}
