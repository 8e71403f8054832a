//! The donor's log, fences and cleanup, and the recipient's ingest, on real state machines.

use super::super::{Apply, StateMachine};
use super::*;
use ordo_proto::v1::{
    txn_op, DecideRequest, Decision, DeleteRequest, FinishRequest, MigrateClearRequest,
    MigrateIngestRequest, PrepareRequest, PutRequest, SetOwnershipRequest, TxnOp, TxnRequest,
};

const SLOTS: u32 = 64;

fn write(sk: &str, v: Option<&str>) -> Command {
    let op = match v {
        Some(v) => txn_op::Op::Put(PutRequest {
            shard_key: sk.as_bytes().to_vec().into(),
            value: v.as_bytes().to_vec().into(),
            ..Default::default()
        }),
        None => txn_op::Op::Delete(DeleteRequest {
            shard_key: sk.as_bytes().to_vec().into(),
            ..Default::default()
        }),
    };
    Command::Txn(TxnRequest {
        success: vec![TxnOp { op: Some(op) }],
        ..Default::default()
    })
}

fn step(id: u64, step: MigrateStep, slots: &[u32]) -> Command {
    Command::MigrateOut(MigrateOutRequest {
        group_id: 1,
        migration_id: id,
        step: step as i32,
        slots: slots.to_vec(),
        ..Default::default()
    })
}

struct Sm {
    sm: StateMachine,
    index: u64,
    _dir: tempfile::TempDir,
}

impl Sm {
    fn new(owned: &[u32]) -> Sm {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut s = Sm {
            sm: StateMachine::open(&db, 1, SLOTS).unwrap().sm,
            index: 0,
            _dir: dir,
        };
        s.run(Command::SetOwnership(SetOwnershipRequest {
            group_id: 1,
            map_version: 1,
            slot_count: SLOTS,
            slots: owned.to_vec(),
            ..Default::default()
        }))
        .unwrap();
        s
    }

    /// Applies `cmd` with the change feed off: these tests count the records and log entries
    /// of the items a move carries (`feed/tests.rs` moves a slot's events).
    fn run(&mut self, cmd: Command) -> Result<Outcome> {
        self.index += 1;
        let mut r = self
            .sm
            .apply_all(&[Apply {
                index: self.index,
                cmd: Some(cmd),
                stamp: Some(crate::state::Stamp {
                    now_ms: 0,
                    window_ms: 0,
                    capture: crate::state::Capture::Off,
                }),
            }])
            .unwrap();
        r.pop().unwrap().1
    }

    fn pull_all(&self, id: u64, log: bool) -> Vec<MigrationRecord> {
        let mut after = Vec::new();
        let mut out = Vec::new();
        for _ in 0..1000 {
            let p = self.sm.migration_pull(id, log, &after, 64).unwrap();
            out.extend(p.records);
            after = p.next_after.to_vec();
            if p.done {
                return out;
            }
        }
        panic!("pull did not finish");
    }
}

fn slot(sk: &str) -> u32 {
    ordo_proto::slot_of(sk.as_bytes(), SLOTS)
}

/// The protocol on two state machines: copy while writes continue, replay the log, fence,
/// end, clear; the recipient ends with exactly the donor's items and versions.
#[test]
fn copy_log_fence_and_clear_move_a_slot_with_versions() {
    let moving_slot = slot("order-1");
    let all: Vec<u32> = (0..SLOTS).collect();
    let mut d = Sm::new(&all);
    let mut r = Sm::new(&[]);
    let keys: Vec<String> = (0..400)
        .map(|i| format!("order-{i}"))
        .filter(|k| slot(k) == moving_slot)
        .collect();
    assert!(keys.len() >= 4, "{keys:?}");
    for k in &keys {
        d.run(write(k, Some("v1"))).unwrap();
        d.run(write(k, Some("v2"))).unwrap();
    }
    d.run(step(7, MigrateStep::Begin, &[moving_slot])).unwrap();
    let copied = d.pull_all(7, false);
    assert_eq!(copied.len(), keys.len());
    // Writes during the copy: an update, a delete, a delete + re-create.
    d.run(write(&keys[0], Some("v3"))).unwrap();
    d.run(write(&keys[1], None)).unwrap();
    d.run(write(&keys[2], None)).unwrap();
    d.run(write(&keys[2], Some("again"))).unwrap();
    let ingest = |r: &mut Sm, records: Vec<MigrationRecord>| {
        r.run(Command::MigrateIngest(MigrateIngestRequest {
            group_id: 2,
            migration_id: 7,
            records,
        }))
        .unwrap()
    };
    ingest(&mut r, copied);
    let log = d.pull_all(7, true);
    assert_eq!(log.len(), 4);
    ingest(&mut r, log.clone());
    // A replayed chunk changes nothing.
    ingest(&mut r, log[2..].to_vec());
    let Outcome::Migration { index: fence, .. } = d.run(step(7, MigrateStep::Fence, &[])).unwrap()
    else {
        panic!()
    };
    assert!(matches!(
        d.run(write(&keys[3], Some("refused"))),
        Err(Error::SlotMoving {
            migration_id: 7,
            ..
        })
    ));
    assert!(matches!(
        d.sm.check_owned(keys[3].as_bytes()),
        Err(Error::SlotMoving { .. })
    ));
    assert_eq!(
        d.sm.migration_pull(7, true, &[], 1 << 20)
            .unwrap()
            .fence_index,
        fence
    );
    // The log read to its end after the fence (it raised the slot's change-feed floor).
    ingest(&mut r, d.pull_all(7, true));
    assert_eq!(d.digest_of(moving_slot), r.digest_of(moving_slot));
    assert_eq!(r.sm.get(keys[0].as_bytes(), b"").unwrap().unwrap().0, 3);
    assert!(r.sm.get(keys[1].as_bytes(), b"").unwrap().is_none());
    assert_eq!(r.sm.get(keys[2].as_bytes(), b"").unwrap().unwrap().0, 1);
    give_up_and_clear(&mut d, &mut r, moving_slot, &keys[3], log);
}

/// The end of a move: the donor gives the fenced slot up and the recipient takes it (ingest
/// is then refused), the donor ends the migration and clears its copy in bounded steps.
fn give_up_and_clear(
    d: &mut Sm,
    r: &mut Sm,
    moving_slot: u32,
    unwritten: &str,
    log: Vec<MigrationRecord>,
) {
    // Ingest into an owned slot is refused; the donor may give the fenced slot up.
    let others: Vec<u32> = (0..SLOTS).filter(|s| *s != moving_slot).collect();
    d.run(Command::SetOwnership(SetOwnershipRequest {
        group_id: 1,
        map_version: 2,
        slot_count: SLOTS,
        slots: others,
        ..Default::default()
    }))
    .unwrap();
    r.run(Command::SetOwnership(SetOwnershipRequest {
        group_id: 2,
        map_version: 2,
        slot_count: SLOTS,
        slots: vec![moving_slot],
        ..Default::default()
    }))
    .unwrap();
    assert!(matches!(
        ingest_result(r, log),
        Err(Error::FailedPrecondition(_))
    ));
    // Clearing is refused while moving, then deletes in bounded steps.
    let clear = |d: &mut Sm| {
        d.run(Command::MigrateClear(MigrateClearRequest {
            group_id: 1,
            slots: vec![moving_slot],
            items_max: 2,
        }))
    };
    assert!(clear(d).is_err());
    d.run(step(7, MigrateStep::End, &[])).unwrap();
    assert!(
        d.sm.migration_pull(7, true, &[], 10).is_err(),
        "the log is gone"
    );
    assert!(matches!(
        d.sm.check_owned(unwritten.as_bytes()),
        Err(Error::WrongShard { .. })
    ));
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < 100);
        match clear(d).unwrap() {
            Outcome::Migration { done: true, .. } => break,
            Outcome::Migration { deleted, .. } => assert_eq!(deleted, 2),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        d.digest_of(moving_slot),
        (0, crc32fast::Hasher::new().finalize())
    );
}

fn ingest_result(r: &mut Sm, records: Vec<MigrationRecord>) -> Result<Outcome> {
    r.run(Command::MigrateIngest(MigrateIngestRequest {
        group_id: 2,
        migration_id: 7,
        records,
    }))
}

impl Sm {
    fn digest_of(&self, slot: u32) -> (u64, u32) {
        let mut h = crc32fast::Hasher::new();
        let mut n = 0;
        for kv in self
            .sm
            .data
            .range(keys::slot_start(slot)..keys::slot_start(slot + 1))
        {
            let (k, v) = kv.unwrap();
            h.update(&k);
            h.update(&v);
            n += 1;
        }
        (n, h.finalize())
    }
}

/// Begin refuses slots not owned or already moving; an unfenced migration survives a restart
/// with its log, and a snapshot carries it.
#[test]
fn begin_checks_ownership_and_migrations_survive_restart_and_snapshots() {
    let mut d = Sm::new(&[1, 2, 3]);
    assert!(d.run(step(1, MigrateStep::Begin, &[4])).is_err());
    d.run(step(1, MigrateStep::Begin, &[1, 2])).unwrap();
    assert!(d.run(step(2, MigrateStep::Begin, &[2, 3])).is_err());
    d.run(step(1, MigrateStep::Begin, &[1, 2])).unwrap(); // idempotent
    let sk = (0..)
        .map(|i| format!("o{i}"))
        .find(|k| slot(k) == 2)
        .unwrap();
    d.run(write(&sk, Some("x"))).unwrap();
    assert_eq!(d.pull_all(1, true).len(), 1);
    let (_, path, _) =
        d.sm.build_snapshot(&d._dir.path().join("snap"), d.sm.applied_index(), 1)
            .unwrap();
    let other = Sm::new(&[]);
    other.sm.install_snapshot(&path, d.index).unwrap();
    assert_eq!(other.pull_all(1, true).len(), 1);
    assert!(other.sm.moving.read().unwrap().is_moving(2));
    let reloaded = Moving::load(&d.sm.sys).unwrap();
    assert_eq!(reloaded.out, d.sm.moving.read().unwrap().out);
}

fn log_bytes(d: &Sm, id: u64) -> u64 {
    d.sm.moving.read().unwrap().out[&id].log_bytes
}

/// The change log's entries and bytes as stored.
fn stored_log(d: &Sm, id: u64) -> (usize, u64) {
    d.sm.sys
        .scan_prefix(log_prefix(id))
        .map(|kv| kv.unwrap())
        .fold((0, 0), |(n, b), (k, v)| {
            (n + 1, b + (k.len() + v.len()) as u64)
        })
}

fn keyed_writes(sk: &str, n: usize, value: &str) -> Command {
    Command::Txn(TxnRequest {
        success: (0..n)
            .map(|i| TxnOp {
                op: Some(txn_op::Op::Put(PutRequest {
                    shard_key: sk.as_bytes().to_vec().into(),
                    key: format!("k{i}").into_bytes().into(),
                    value: value.as_bytes().to_vec().into(),
                    ..Default::default()
                })),
            })
            .collect(),
        ..Default::default()
    })
}

/// Audit H6: writes past the cap leave the log at or below it; the migration is marked
/// overflowed, so the next pull, trim and fence are refused with RESOURCE_EXHAUSTED naming
/// the cap (the mover aborts on it), the donor keeps serving, and END still ends it.
#[test]
fn h6_a_change_log_past_its_cap_stays_under_it_and_the_move_is_refused() {
    let s = slot("order-1");
    let mut d = Sm::new(&(0..SLOTS).collect::<Vec<_>>());
    let cap = 4096;
    d.run(Command::MigrateOut(MigrateOutRequest {
        group_id: 1,
        migration_id: 3,
        step: MigrateStep::Begin as i32,
        slots: vec![s],
        log_bytes_max: cap,
        ..Default::default()
    }))
    .unwrap();
    for round in 0..40 {
        d.run(write(
            "order-1",
            Some(&format!("value {round} {}", "x".repeat(100))),
        ))
        .unwrap();
        assert!(log_bytes(&d, 3) <= cap);
        assert_eq!(stored_log(&d, 3).1, log_bytes(&d, 3), "counted as stored");
    }
    assert!(d.sm.moving.read().unwrap().out[&3].overflowed);
    let named = |e: Error| {
        let m = e.to_string();
        assert!(
            m.contains("MIGRATION_LOG_BYTES_MAX") && m.contains(&cap.to_string()),
            "{m}"
        );
        assert_eq!(
            tonic::Status::from(e).code(),
            tonic::Code::ResourceExhausted
        );
    };
    named(d.sm.migration_pull(3, true, &[], 1 << 20).unwrap_err());
    named(d.sm.migration_pull(3, false, &[], 1 << 20).unwrap_err());
    named(d.run(step(3, MigrateStep::Fence, &[])).unwrap_err());
    named(d.run(step(3, MigrateStep::Trim, &[])).unwrap_err());
    // The donor still owns and serves the slot; END ends the migration and its log.
    d.run(write("order-1", Some("after"))).unwrap();
    assert!(matches!(
        d.run(step(3, MigrateStep::End, &[])).unwrap(),
        Outcome::Migration { done: true, .. }
    ));
    assert_eq!(stored_log(&d, 3), (0, 0));
    assert!(d.sm.check_owned(b"order-1").is_ok());
    // A cap over the node's own is refused.
    let over = d.run(Command::MigrateOut(MigrateOutRequest {
        group_id: 1,
        migration_id: 4,
        step: MigrateStep::Begin as i32,
        slots: vec![s],
        log_bytes_max: MIGRATION_LOG_BYTES_MAX + 1,
        ..Default::default()
    }));
    assert!(
        matches!(over, Err(Error::InvalidArgument(m)) if m.contains("MIGRATION_LOG_BYTES_MAX"))
    );
}

/// Audit H6: the replayed prefix of the log is trimmed, and END deletes the rest, each in
/// entries of at most `MIGRATION_LOG_DELETE_MAX` log entries.
#[test]
fn h6_trim_and_end_delete_the_log_in_bounded_steps() {
    let s = slot("order-1");
    let mut d = Sm::new(&(0..SLOTS).collect::<Vec<_>>());
    d.run(step(5, MigrateStep::Begin, &[s])).unwrap();
    let n = 2 * MIGRATION_LOG_DELETE_MAX + 100;
    d.run(keyed_writes("order-1", n, "one")).unwrap();
    d.run(keyed_writes("order-1", n, "two")).unwrap();
    assert_eq!(stored_log(&d, 5).0, 2 * n);
    // The recipient replayed the first write of every key.
    let first = d.sm.migration_pull(5, true, &[], 1 << 30).unwrap();
    assert!(first.done);
    let position = {
        let mut after = Vec::new();
        for _ in 0..n {
            let p = d.sm.migration_pull(5, true, &after, 1).unwrap();
            after = p.next_after.to_vec();
        }
        after
    };
    let trim = |d: &mut Sm| {
        d.run(Command::MigrateOut(MigrateOutRequest {
            group_id: 1,
            migration_id: 5,
            step: MigrateStep::Trim as i32,
            trim_after: position.clone().into(),
            ..Default::default()
        }))
        .unwrap()
    };
    let mut steps = 0;
    loop {
        steps += 1;
        let before = stored_log(&d, 5).0;
        let Outcome::Migration { deleted, done, .. } = trim(&mut d) else {
            panic!()
        };
        assert!(deleted as usize <= MIGRATION_LOG_DELETE_MAX);
        assert_eq!(stored_log(&d, 5).0, before - deleted as usize);
        assert_eq!(
            stored_log(&d, 5).1,
            log_bytes(&d, 5),
            "the count follows the trim"
        );
        if done {
            break;
        }
    }
    assert_eq!(steps, 3);
    // What is left is exactly the unreplayed suffix.
    let rest = d.sm.migration_pull(5, true, &[], 1 << 30).unwrap();
    assert!(rest.done);
    let rest = rest.records;
    assert_eq!(rest.len(), n);
    assert_eq!(
        rest[0].key, first.records[0].key,
        "the second write of the first key"
    );
    assert!(rest.iter().all(|r| r.value.ends_with(b"two")));
    let mut steps = 0;
    loop {
        steps += 1;
        let Outcome::Migration { deleted, done, .. } =
            d.run(step(5, MigrateStep::End, &[])).unwrap()
        else {
            panic!()
        };
        assert!(deleted as usize <= MIGRATION_LOG_DELETE_MAX);
        if done {
            break;
        }
    }
    assert_eq!(steps, 3);
    assert_eq!(stored_log(&d, 5), (0, 0), "the log is gone after END");
    assert!(
        d.sm.check_owned(b"order-1").is_ok(),
        "and the slot unfenced"
    );
}

fn prepare(txn: u8, sk: &str, primary: &str) -> Command {
    Command::Prepare(PrepareRequest {
        txn_id: vec![txn; participant::TXN_ID_BYTES].into(),
        primary_shard_key: primary.as_bytes().to_vec().into(),
        part: Some(TxnRequest {
            success: vec![TxnOp {
                op: Some(txn_op::Op::Put(PutRequest {
                    shard_key: sk.as_bytes().to_vec().into(),
                    value: b"2pc".to_vec().into(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn decide(txn: u8, primary: &str, decision: Decision, resolve: bool) -> Command {
    Command::Decide(DecideRequest {
        txn_id: vec![txn; participant::TXN_ID_BYTES].into(),
        primary_shard_key: primary.as_bytes().to_vec().into(),
        decision: decision as i32,
        resolve,
        ..Default::default()
    })
}

/// Audit H7: a decision recorded at the primary's slot while it moves, and a lock that was
/// copied and then released, reach the recipient through the copy and the change log: a
/// resolver asking the slot's new owner learns the decision, and no stale lock is left.
/// The fence waits for the lock and the kept part.
#[test]
fn h7_decisions_and_released_locks_move_with_their_slot() {
    let s = slot("order-1");
    let mut d = Sm::new(&(0..SLOTS).collect::<Vec<_>>());
    let mut r = Sm::new(&[]);
    // Txn 1 holds order-1 (its primary) before the move begins.
    d.run(prepare(1, "order-1", "order-1")).unwrap();
    d.run(step(9, MigrateStep::Begin, &[s])).unwrap();
    assert!(matches!(
        d.run(prepare(2, "order-1", "order-1")),
        Err(Error::Locked { .. })
    ));
    let copied = d.pull_all(9, false);
    assert!(
        copied.len() >= 2,
        "the lock and the part are in the slot's range"
    );
    ingest_result(&mut r, copied).unwrap();
    assert!(d.run(step(9, MigrateStep::Fence, &[])).is_err(), "locked");
    // The coordinator decides, finishes the primary's part, and dies before forgetting.
    assert!(matches!(
        d.run(decide(1, "order-1", Decision::RunSuccess, false)).unwrap(),
        Outcome::Decided(x) if x.decision == Decision::RunSuccess as i32
    ));
    d.run(Command::Finish(FinishRequest {
        txn_id: vec![1; participant::TXN_ID_BYTES].into(),
        shard_key: b"order-1".to_vec().into(),
        decision: Decision::RunSuccess as i32,
        ..Default::default()
    }))
    .unwrap();
    ingest_result(&mut r, d.pull_all(9, true)).unwrap();
    assert!(matches!(
        d.run(step(9, MigrateStep::Fence, &[])).unwrap(),
        Outcome::Migration { .. }
    ));
    assert!(
        matches!(
            d.run(decide(3, "order-1", Decision::RunSuccess, false)),
            Err(Error::SlotMoving { .. })
        ),
        "no decision in a fenced slot"
    );
    // The log read to its end after the fence (it raised the slot's change-feed floor).
    ingest_result(&mut r, d.pull_all(9, true)).unwrap();
    assert_eq!(d.digest_of(s), r.digest_of(s));
    r.run(Command::SetOwnership(SetOwnershipRequest {
        group_id: 2,
        map_version: 2,
        slot_count: SLOTS,
        slots: vec![s],
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(
        r.sm.locks_held(),
        0,
        "the copied lock was released by the log"
    );
    assert_eq!(
        r.sm.get(b"order-1", b"").unwrap().unwrap().1.as_ref(),
        b"2pc"
    );
    assert!(matches!(
        r.run(decide(1, "order-1", Decision::Abort, true)).unwrap(),
        Outcome::Decided(x) if x.decision == Decision::RunSuccess as i32
    ));
}
