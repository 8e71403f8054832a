//! Consumer groups' replicated state on real state machines: create (idempotent, start resolved
//! at apply), acks in any order and grouping (a model test), stale attempts, transactional acks
//! with the Txn's writes, park / unpark / dead letters, seek, delete, the state moving with its
//! slot and through a snapshot, and retention protecting what a live group has not done.

use std::collections::BTreeSet;

use ordo_proto::v1::group_ack::Done;
use ordo_proto::v1::group_command::Op;
use ordo_proto::v1::group_start::At as StartAt;
use ordo_proto::v1::{
    txn_op, FeedAckRequest, GroupAck, GroupAcks, GroupCommand, GroupCreate, GroupDef, GroupDelete,
    GroupDeliveries, GroupDelivery, GroupPark, GroupRecord, GroupSeek, GroupSkip, GroupSlotState,
    GroupStart, GroupUnpark, MigrateIngestRequest, MigrateStep, SeqRange, TxnOp,
};
use ordo_proto::v1::{Decision, FinishRequest, PrepareRequest};
use proptest::prelude::*;

use super::GroupApplied;
use crate::error::Error;
use crate::limits::{FEED_GROUPS_MAX, FEED_GROUP_BATCH_MAX, FEED_GROUP_SLOTS_PER_ENTRY};
use crate::state::feed::tests::{b, migrate, ownership, put, retention, slot, txn, Sm, SLOTS};
use crate::state::feed::Retention;
use crate::state::{Command, Outcome, StateMachine};

const G: &str = "billing";

fn def(name: &str) -> GroupDef {
    GroupDef {
        group: name.into(),
        key_prefix: b("outbox/"),
        ack_wait_ms: 30_000,
        max_deliver: 5,
        ..Default::default()
    }
}

fn group(op: Op) -> Command {
    Command::Group(GroupCommand { op: Some(op) })
}

fn create(d: GroupDef, at: StartAt) -> Command {
    create_from(d, at, 0)
}

fn create_from(d: GroupDef, at: StartAt, from_slot: u32) -> Command {
    group(Op::Create(GroupCreate {
        def: Some(d),
        start: Some(GroupStart { at: Some(at) }),
        from_slot,
    }))
}

fn ack(sl: u32, seq: u64, attempt: u32) -> GroupAck {
    GroupAck {
        group: G.into(),
        slot: sl,
        seq,
        attempt,
        done: Done::Acked as i32,
    }
}

fn acks(acks: Vec<GroupAck>) -> Command {
    group(Op::Acks(GroupAcks {
        acks,
        skips: vec![],
    }))
}

fn deliver(sl: u32, seq: u64, attempt: u32) -> Command {
    group(Op::Deliveries(GroupDeliveries {
        deliveries: vec![GroupDelivery {
            group: G.into(),
            slot: sl,
            seq,
            attempt,
            base: 0,
        }],
    }))
}

/// The outcome of a group command that was not refused.
fn applied(s: &mut Sm, cmd: Command) -> GroupApplied {
    match s.run(cmd) {
        Ok(Outcome::Group(g)) => g,
        other => panic!("{other:?}"),
    }
}

fn refusal(s: &mut Sm, cmd: Command) -> Error {
    match s.run(cmd) {
        Err(e) => e,
        other => panic!("not refused: {other:?}"),
    }
}

fn state(sm: &StateMachine, sl: u32) -> GroupSlotState {
    record(sm, sl).state.unwrap()
}

fn record(sm: &StateMachine, sl: u32) -> GroupRecord {
    sm.group_record(sl, G)
        .unwrap()
        .expect("the slot has the group")
}

/// `n` events in the slot of `sk` (puts of `outbox/<i>`), committed at 1000 + the entry index.
fn events(s: &mut Sm, sk: &str, n: u64) {
    for i in 0..n {
        s.run(Command::Txn(txn(vec![put(
            sk,
            &format!("outbox/{i}"),
            "v",
        )])))
        .unwrap();
    }
}

/// Create resolves each slot's start from its own log when it applies, writes the group in
/// every owned slot, is a no-op when repeated with the same definition, and is refused whole
/// (nothing written) for another definition under the name or past `FEED_GROUPS_MAX`.
#[test]
fn create_resolves_its_start_at_apply_is_idempotent_and_refuses_another_definition() {
    let mut s = Sm::new();
    let (o, q) = (slot("o"), slot("q"));
    assert_ne!(o, q);
    events(&mut s, "o", 3);
    events(&mut s, "q", 2);
    let first = applied(&mut s, create(def(G), StartAt::Now(true)));
    assert_eq!(first.slots, SLOTS);
    assert_eq!(first.next_slot, None);
    assert_eq!(
        state(&s.sm, o).committed_seq,
        3,
        "now: after the slot's last event"
    );
    assert_eq!(state(&s.sm, q).committed_seq, 2);
    for sl in 0..SLOTS {
        assert_eq!(s.sm.group_names(sl).unwrap(), vec![G.to_string()]);
    }
    let digest = s.sm.digest().unwrap();
    let again = applied(&mut s, create(def(G), StartAt::Oldest(true)));
    assert_eq!(again.slots, 0, "the same definition again changes nothing");
    assert_eq!(s.sm.digest().unwrap(), digest);
    let other = GroupDef {
        key_prefix: b("other/"),
        ..def(G)
    };
    let e = refusal(&mut s, create(other, StartAt::Now(true)));
    assert!(matches!(e, Error::AlreadyExists(_)), "{e}");
    let e = refusal(&mut s, create(def("two\nlines"), StartAt::Now(true)));
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert_eq!(
        s.sm.digest().unwrap(),
        digest,
        "a refused create writes nothing"
    );

    // Oldest and by time, in a slot with events committed at 1001..1003.
    applied(&mut s, create(def("from-oldest"), StartAt::Oldest(true)));
    assert_eq!(
        s.sm.group_record(o, "from-oldest")
            .unwrap()
            .unwrap()
            .state
            .unwrap()
            .committed_seq,
        0
    );
    let at = s.sm.feed_event(o, 2).unwrap().unwrap().commit_ts_ms;
    applied(&mut s, create(def("from-time"), StartAt::AfterTsMs(at)));
    let c =
        s.sm.group_record(o, "from-time")
            .unwrap()
            .unwrap()
            .state
            .unwrap();
    assert_eq!(
        c.committed_seq, 2,
        "after the last event committed at or before the time"
    );

    for i in 3..FEED_GROUPS_MAX {
        applied(&mut s, create(def(&format!("g{i}")), StartAt::Now(true)));
    }
    let digest = s.sm.digest().unwrap();
    let e = refusal(&mut s, create(def("one-too-many"), StartAt::Now(true)));
    assert!(e.to_string().contains("FEED_GROUPS_MAX"), "{e}");
    assert_eq!(s.sm.digest().unwrap(), digest);
}

/// A group over shard keys lives in their slots only, each record keeping its slot's keys.
#[test]
fn a_group_over_shard_keys_lives_in_their_slots_only() {
    let mut s = Sm::new();
    let d = GroupDef {
        shard_keys: vec![b("o")],
        ..def(G)
    };
    assert_eq!(applied(&mut s, create(d, StartAt::Now(true))).slots, 1);
    assert_eq!(
        record(&s.sm, slot("o")).def.unwrap().shard_keys,
        vec![b("o")]
    );
    assert!(s.sm.group_record(slot("q"), G).unwrap().is_none());
}

/// Create, delete and seek cover at most `FEED_GROUP_SLOTS_PER_ENTRY` slots per entry and name
/// the slot to go on from.
#[test]
fn create_delete_and_seek_are_bounded_per_entry() {
    let slots = FEED_GROUP_SLOTS_PER_ENTRY as u32 + 3;
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let sm = StateMachine::open(&db, 1, slots).unwrap().sm;
    let run = |index: u64, cmd: Command| match sm.apply_all(&[crate::state::Apply {
        index,
        cmd: Some(cmd),
        stamp: None,
    }]) {
        Ok(mut out) => match out.pop().unwrap().1 {
            Ok(Outcome::Group(g)) => g,
            other => panic!("{other:?}"),
        },
        Err(e) => panic!("{e}"),
    };
    let per_entry = FEED_GROUP_SLOTS_PER_ENTRY as u32;
    let first = run(1, create(def(G), StartAt::Now(true)));
    assert_eq!((first.slots, first.next_slot), (per_entry, Some(per_entry)));
    assert!(sm.group_record(per_entry, G).unwrap().is_none());
    let rest = run(2, create_from(def(G), StartAt::Now(true), per_entry));
    assert_eq!((rest.slots, rest.next_slot), (3, None));
    assert!(sm.group_record(slots - 1, G).unwrap().is_some());
    let del = run(
        3,
        group(Op::Delete(GroupDelete {
            group: G.into(),
            from_slot: 0,
        })),
    );
    assert_eq!((del.slots, del.next_slot), (per_entry, Some(per_entry)));
    assert!(sm.group_record(0, G).unwrap().is_none());
    assert!(
        sm.group_names(0).unwrap().is_empty(),
        "the slot's index goes with it"
    );
    assert!(sm.group_record(slots - 1, G).unwrap().is_some());
}

/// The state a run of acks leaves: the committed seq is the end of the done prefix, the rest
/// are ranges.
fn model(start: u64, done: &BTreeSet<u64>) -> (u64, Vec<SeqRange>) {
    let mut committed = start;
    while done.contains(&(committed + 1)) {
        committed += 1;
    }
    let mut ranges: Vec<SeqRange> = Vec::new();
    for &seq in done.range(committed + 2..) {
        match ranges.last_mut() {
            Some(r) if r.last + 1 == seq => r.last = seq,
            _ => ranges.push(SeqRange {
                first: seq,
                last: seq,
            }),
        }
    }
    (committed, ranges)
}

/// An ack of a flush, or a skip of a run of seqs, of the model test.
#[derive(Clone, Debug)]
enum Mark {
    Ack(u64),
    Skip(u64, u64),
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Acks and skips in any order, grouped into flushes any way, give the same state on every
    /// replica, and the state a model of "done seqs" gives; acking again changes nothing.
    #[test]
    fn acks_in_any_order_and_grouping_give_the_same_state(
        ops in proptest::collection::vec(
            prop_oneof![
                (1u64..=40).prop_map(Mark::Ack),
                (1u64..=40, 0u64..4).prop_map(|(f, n)| Mark::Skip(f, (f + n).min(40))),
            ],
            1..60,
        ),
        cuts in proptest::collection::vec(1usize..8, 1..20),
        seed in any::<u64>(),
    ) {
        let o = slot("o");
        let flush = |batch: &[Mark]| {
            let mut a = GroupAcks::default();
            for d in batch {
                match *d {
                    Mark::Ack(seq) => a.acks.push(ack(o, seq, 1)),
                    Mark::Skip(first, last) => a.skips.push(GroupSkip {
                        group: G.into(),
                        slot: o,
                        first_seq: first,
                        last_seq: last,
                    }),
                }
            }
            group(Op::Acks(a))
        };
        let mut shuffled = ops.clone();
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let mut states = Vec::new();
        for (order, grouped) in [(&ops, false), (&shuffled, true)] {
            let mut s = Sm::new();
            events(&mut s, "o", 40);
            applied(&mut s, create(def(G), StartAt::Oldest(true)));
            let mut at = 0;
            let mut cut = cuts.iter().cycle();
            while at < order.len() {
                let n = if grouped { *cut.next().unwrap() } else { 1 };
                let end = (at + n).min(order.len());
                let out = applied(&mut s, flush(&order[at..end]));
                prop_assert!(out.refused.is_empty(), "{:?}", out.refused);
                at = end;
            }
            let before = s.sm.digest().unwrap();
            applied(&mut s, flush(order));
            prop_assert_eq!(s.sm.digest().unwrap().1, before.1, "done again: no change");
            states.push(state(&s.sm, o));
        }
        let mut done = BTreeSet::new();
        for d in &ops {
            match *d {
                Mark::Ack(seq) => {
                    done.insert(seq);
                }
                Mark::Skip(first, last) => done.extend(first..=last),
            }
        }
        let (committed, ranges) = model(0, &done);
        prop_assert_eq!(&states[0], &states[1]);
        prop_assert_eq!(states[0].committed_seq, committed);
        prop_assert_eq!(&states[0].done, &ranges);
    }
}

/// An ack or a redelivery naming an attempt that is not the event's current one is refused and
/// changes nothing; the current one is applied; an ack of a done event is accepted again.
#[test]
fn a_stale_attempt_is_refused_and_changes_nothing() {
    let mut s = Sm::new();
    let o = slot("o");
    events(&mut s, "o", 3);
    applied(&mut s, create(def(G), StartAt::Oldest(true)));
    assert!(applied(&mut s, deliver(o, 2, 2)).refused.is_empty());
    assert_eq!(state(&s.sm, o).deliveries[0].attempt, 2);
    let digest = s.sm.digest().unwrap();
    let out = applied(&mut s, acks(vec![ack(o, 2, 1)]));
    assert_eq!(out.refused.len(), 1);
    assert!(
        matches!(
            out.refused[0],
            (
                0,
                Error::StaleDelivery {
                    attempt: 1,
                    current_attempt: 2,
                    ..
                }
            )
        ),
        "{:?}",
        out.refused
    );
    let out = applied(&mut s, deliver(o, 2, 1));
    assert!(
        matches!(out.refused[0].1, Error::StaleDelivery { .. }),
        "{:?}",
        out.refused
    );
    assert_eq!(s.sm.digest().unwrap(), digest, "refusals wrote nothing");
    let out = applied(&mut s, acks(vec![ack(o, 1, 1), ack(o, 2, 2), ack(o, 7, 1)]));
    assert_eq!(
        out.refused.len(),
        1,
        "seq 7 does not exist: {:?}",
        out.refused
    );
    let st = state(&s.sm, o);
    assert_eq!(st.committed_seq, 2);
    assert!(
        st.deliveries.is_empty(),
        "a done event's count is forgotten"
    );
    assert!(
        applied(&mut s, acks(vec![ack(o, 2, 1)])).refused.is_empty(),
        "done: idempotent"
    );
    let out = applied(
        &mut s,
        acks(vec![GroupAck {
            group: "nobody".into(),
            ..ack(o, 3, 1)
        }]),
    );
    assert!(
        matches!(out.refused[0].1, Error::NotFound(_)),
        "{:?}",
        out.refused
    );
    let digest = s.sm.digest().unwrap();
    let e = refusal(&mut s, acks(vec![ack(o, 3, 1); FEED_GROUP_BATCH_MAX + 1]));
    assert!(e.to_string().contains("FEED_GROUP_BATCH_MAX"), "{e}");
    assert_eq!(s.sm.digest().unwrap(), digest);
}

fn feed_ack(sk: &str, seq: u64, attempt: u32) -> TxnOp {
    TxnOp {
        op: Some(txn_op::Op::FeedAck(FeedAckRequest {
            group: G.into(),
            slot: slot(sk),
            seq,
            attempt,
            shard_key: b(sk),
        })),
    }
}

/// A Txn with a put and a feed ack applies both or neither: with a stale attempt it is refused
/// (`StaleDelivery`) and neither the item nor the group changes; with the current one both do;
/// once the event is done, another Txn acking it is refused whole (the event is processed once).
#[test]
fn a_txn_of_a_put_and_a_feed_ack_applies_both_or_neither() {
    let mut s = Sm::new();
    let o = slot("o");
    events(&mut s, "o", 2);
    applied(&mut s, create(def(G), StartAt::Oldest(true)));
    applied(&mut s, deliver(o, 1, 2));
    let model = |attempt| {
        Command::Txn(txn(vec![
            put("o", "read-model", "1"),
            feed_ack("o", 1, attempt),
        ]))
    };
    let digest = s.sm.digest().unwrap();
    match s.run(model(1)) {
        Err(Error::StaleDelivery {
            current_attempt: 2, ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(
        s.sm.digest().unwrap(),
        digest,
        "the whole Txn changed nothing"
    );
    assert!(s.sm.get(b"o", b"read-model").unwrap().is_none());
    match s.run(model(2)) {
        Ok(Outcome::Txn(r)) => assert!(r.succeeded),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.sm.get(b"o", b"read-model").unwrap().unwrap().0, 1);
    assert_eq!(state(&s.sm, o).committed_seq, 1);
    // The same delivery's Txn again (say, retried without its key after an unknown outcome):
    // the event is done, so its writes are not applied twice.
    let digest = s.sm.digest().unwrap();
    match s.run(model(2)) {
        Err(Error::StaleDelivery {
            current_attempt: 0, ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(s.sm.digest().unwrap(), digest);
    assert_eq!(s.sm.get(b"o", b"read-model").unwrap().unwrap().0, 1);
    // A shard key outside the ack's slot is refused, whole.
    let mut wrong = feed_ack("o", 2, 1);
    if let Some(txn_op::Op::FeedAck(a)) = &mut wrong.op {
        a.slot = (o + 1) % SLOTS;
    }
    let digest = s.sm.digest().unwrap();
    let e = s
        .run(Command::Txn(txn(vec![put("o", "read-model", "2"), wrong])))
        .unwrap_err();
    assert!(e.to_string().contains("not in slot"), "{e}");
    assert_eq!(s.sm.digest().unwrap(), digest);
}

fn prepare(id: u8, ops: Vec<TxnOp>) -> Command {
    Command::Prepare(PrepareRequest {
        txn_id: vec![id; 16].into(),
        primary_shard_key: b("o"),
        part: Some(txn(ops)),
        ..Default::default()
    })
}

fn finish(id: u8, d: Decision) -> Command {
    Command::Finish(FinishRequest {
        txn_id: vec![id; 16].into(),
        shard_key: b("o"),
        decision: d as i32,
        ..Default::default()
    })
}

/// A cross-group Txn's part with a feed ack (the ack in the event's group, the read model
/// elsewhere) checks the ack at its prepare and holds it locked until its finish: meanwhile a
/// single-group Txn acking the event and the dispatcher's flush are refused, so the event is
/// processed once; the finish of a commit makes it done, an abort leaves it to be delivered again.
#[test]
fn a_prepared_part_holds_its_feed_ack_until_the_finish() {
    let mut s = Sm::new();
    let o = slot("o");
    events(&mut s, "o", 2);
    applied(&mut s, create(def(G), StartAt::Oldest(true)));
    match s.run(prepare(1, vec![feed_ack("o", 1, 1)])) {
        Ok(Outcome::Prepared(_)) => {}
        other => panic!("{other:?}"),
    }
    let digest = s.sm.digest().unwrap();
    let other = Command::Txn(txn(vec![put("o", "read-model", "1"), feed_ack("o", 1, 1)]));
    let e = s.run(other).unwrap_err();
    assert!(e.to_string().contains("lock"), "{e}");
    let flushed = applied(&mut s, acks(vec![ack(o, 1, 1)]));
    assert_eq!(
        flushed.refused.len(),
        1,
        "the flush's ack waits for the finish"
    );
    assert_eq!(s.sm.digest().unwrap(), digest, "neither changed anything");
    // A redelivery meanwhile raises the attempt; the prepared ack still applies at the finish.
    applied(&mut s, deliver(o, 1, 2));
    match s.run(finish(1, Decision::RunSuccess)) {
        Ok(Outcome::Finished(f)) => assert!(f.found),
        other => panic!("{other:?}"),
    }
    assert_eq!(state(&s.sm, o).committed_seq, 1);
    match s.run(prepare(2, vec![feed_ack("o", 1, 2)])) {
        Err(Error::StaleDelivery {
            current_attempt: 0, ..
        }) => {}
        other => panic!("a prepare of a done event's ack is refused: {other:?}"),
    }
    // An aborted part leaves its event as it was, and unlocked.
    match s.run(prepare(3, vec![feed_ack("o", 2, 1)])) {
        Ok(Outcome::Prepared(_)) => {}
        other => panic!("{other:?}"),
    }
    s.run(finish(3, Decision::Abort)).unwrap();
    assert_eq!(state(&s.sm, o).committed_seq, 1);
    let flushed = applied(&mut s, acks(vec![ack(o, 2, 1)]));
    assert!(flushed.refused.is_empty(), "{:?}", flushed.refused);
    assert_eq!(state(&s.sm, o).committed_seq, 2);
}

/// Parking records the order at its event and attempts; unpark releases it and records the
/// attempt it was released at; a dead letter writes the event under its order and counts it
/// done.
#[test]
fn park_unpark_and_dead_letter() {
    let mut s = Sm::new();
    let o = slot("o");
    events(&mut s, "o", 3);
    applied(&mut s, create(def(G), StartAt::Oldest(true)));
    applied(&mut s, deliver(o, 1, 5));
    let park = group(Op::Park(GroupPark {
        group: G.into(),
        slot: o,
        shard_key: b("o"),
        seq: 1,
    }));
    applied(&mut s, park.clone());
    let parked = state(&s.sm, o).parked;
    assert_eq!((parked.len(), parked[0].seq, parked[0].attempts), (1, 1, 5));
    let cg = s.sm.describe_group(G, 10_000).unwrap().unwrap();
    assert_eq!(cg.parked, 1);
    assert_eq!(cg.lag_events, 3);
    let first_ts = s.sm.feed_event(o, 1).unwrap().unwrap().commit_ts_ms;
    let gs = cg.slots.iter().find(|g| g.slot == o).unwrap();
    assert_eq!(
        (gs.lag_ms, gs.redeliveries),
        (10_000 - first_ts, 1),
        "lag: the oldest event not done"
    );
    let unpark = group(Op::Unpark(GroupUnpark {
        group: G.into(),
        shard_key: b("o"),
    }));
    applied(&mut s, unpark.clone());
    let st = state(&s.sm, o);
    assert!(st.parked.is_empty());
    assert_eq!(
        (st.deliveries[0].attempt, st.deliveries[0].unparked_at),
        (5, 5)
    );
    assert!(matches!(refusal(&mut s, unpark), Error::NotFound(_)));

    let dead = GroupAck {
        done: Done::DeadLettered as i32,
        ..ack(o, 1, 5)
    };
    assert!(applied(&mut s, acks(vec![dead])).refused.is_empty());
    let key = format!("dlq/{G}/{:020}", 1);
    let (version, value) = s.sm.get(b"o", key.as_bytes()).unwrap().unwrap();
    let event: ordo_proto::v1::ChangeEvent = prost::Message::decode(value).unwrap();
    assert_eq!(
        (version, event.seq, event.key.as_ref()),
        (1, 1, &b"outbox/0"[..])
    );
    assert_eq!(state(&s.sm, o).committed_seq, 1);
}

/// Seek moves the position in every slot and drops what was kept above it (an expired group is
/// live again); delete removes the group and its index entry, and a second delete finds none.
#[test]
fn seek_and_delete() {
    let mut s = Sm::new();
    let o = slot("o");
    events(&mut s, "o", 4);
    applied(&mut s, create(def(G), StartAt::Oldest(true)));
    applied(&mut s, acks(vec![ack(o, 3, 1)]));
    applied(&mut s, deliver(o, 2, 2));
    let seek = |at| {
        group(Op::Seek(GroupSeek {
            group: G.into(),
            to: Some(GroupStart { at: Some(at) }),
            from_slot: 0,
        }))
    };
    assert_eq!(applied(&mut s, seek(StartAt::Now(true))).slots, SLOTS);
    assert_eq!(
        state(&s.sm, o),
        GroupSlotState {
            committed_seq: 4,
            ..Default::default()
        }
    );
    applied(&mut s, seek(StartAt::Oldest(true)));
    assert_eq!(state(&s.sm, o).committed_seq, 0);
    let delete = group(Op::Delete(GroupDelete {
        group: G.into(),
        from_slot: 0,
    }));
    assert_eq!(applied(&mut s, delete.clone()).slots, SLOTS);
    assert!(s.sm.describe_group(G, 0).unwrap().is_none());
    assert!(s.sm.group_names(o).unwrap().is_empty());
    assert_eq!(applied(&mut s, delete).slots, 0);
    let out = applied(&mut s, acks(vec![ack(o, 1, 1)]));
    assert!(
        matches!(out.refused[0].1, Error::NotFound(_)),
        "{:?}",
        out.refused
    );
}

/// The group's state moves with its slot (the move's copy and change log carry it) and the
/// recipient goes on from it; a snapshot carries it too.
#[test]
fn the_state_moves_with_its_slot_and_survives_a_snapshot() {
    let o = slot("o");
    let (mut d, mut r) = (Sm::new(), Sm::new());
    d.run(ownership(1, 1, (0..SLOTS).collect())).unwrap();
    r.run(ownership(2, 1, vec![])).unwrap();
    events(&mut d, "o", 3);
    applied(&mut d, create(def(G), StartAt::Oldest(true)));
    d.run(migrate(3, MigrateStep::Begin, &[o])).unwrap();
    // During the copy: an ack goes through the change log.
    applied(&mut d, acks(vec![ack(o, 1, 1)]));
    applied(&mut d, deliver(o, 2, 2));
    d.run(migrate(3, MigrateStep::Fence, &[])).unwrap();
    let out = applied(&mut d, acks(vec![ack(o, 2, 2)]));
    assert!(
        matches!(out.refused[0].1, Error::SlotMoving { .. }),
        "a fenced slot's group state does not change: {:?}",
        out.refused
    );
    let copy = d.sm.migration_pull(3, false, &[], 1 << 20).unwrap().records;
    let log = d.sm.migration_pull(3, true, &[], 1 << 20).unwrap().records;
    for records in [copy, log] {
        r.run(Command::MigrateIngest(MigrateIngestRequest {
            group_id: 2,
            migration_id: 3,
            records,
        }))
        .unwrap();
    }
    r.run(ownership(2, 2, vec![o])).unwrap();
    assert_eq!(
        record(&r.sm, o),
        record(&d.sm, o),
        "the record moved as it was"
    );
    assert_eq!(r.sm.group_names(o).unwrap(), vec![G.to_string()]);
    let out = applied(&mut r, acks(vec![ack(o, 2, 1), ack(o, 2, 2), ack(o, 3, 1)]));
    assert_eq!(
        out.refused.len(),
        1,
        "the moved attempt still counts: {:?}",
        out.refused
    );
    assert_eq!(state(&r.sm, o).committed_seq, 3);

    let dir = tempfile::tempdir().unwrap();
    let (index, path, _) =
        r.sm.build_snapshot(&dir.path().join("snap"), r.sm.applied_index(), 1)
            .unwrap();
    let other = Sm::new();
    other.sm.install_snapshot(&path, index).unwrap();
    other.sm.finish_install().unwrap();
    assert_eq!(record(&other.sm, o), record(&r.sm, o));
    assert_eq!(other.sm.digest().unwrap(), r.sm.digest().unwrap());
}

/// Retention never trims what a live group has not done until the protection limit; past it the
/// events go and the group is expired in that slot (its position moves past them), which
/// `describe` reports; a group's done events are trimmed as usual.
#[test]
fn retention_protects_what_a_live_group_has_not_done_until_the_limit() {
    let mut s = Sm::new();
    let o = slot("o");
    events(&mut s, "o", 6);
    applied(&mut s, create(def(G), StartAt::Oldest(true)));
    applied(&mut s, acks(vec![ack(o, 1, 1), ack(o, 2, 1)]));
    let r = Retention {
        protect_ms: 100_000,
        protect_bytes: u64::MAX,
        ..retention(1_000, u64::MAX)
    };
    // Every event is past the retention (committed at about 1000): the done ones go.
    let plan = s.sm.plan_trims(50_000, r).unwrap();
    assert_eq!(
        plan,
        vec![(o, 3)],
        "events 1 and 2 are done, 3.. are protected"
    );
    s.run(Command::Checkpoint(crate::state::Checkpoint {
        trims: plan,
    }))
    .unwrap();
    assert!(!state(&s.sm, o).expired);
    let unprotected = s.sm.plan_trims(50_000, retention(1_000, u64::MAX)).unwrap();
    assert_eq!(
        unprotected,
        vec![(o, 7)],
        "without protection all of it would go"
    );
    let over_bytes = Retention {
        protect_bytes: 0,
        ..r
    };
    assert_eq!(
        s.sm.plan_trims(50_000, over_bytes).unwrap(),
        vec![(o, 7)],
        "past the protection's byte cap they go too"
    );
    // Past the protection limit: trimmed, and the group expires.
    let plan = s.sm.plan_trims(200_000, r).unwrap();
    assert_eq!(plan, vec![(o, 7)]);
    s.run(Command::Checkpoint(crate::state::Checkpoint {
        trims: plan,
    }))
    .unwrap();
    let st = state(&s.sm, o);
    assert!(st.expired);
    assert_eq!(
        st.committed_seq, 6,
        "the group's position moved past what was dropped"
    );
    let cg = s.sm.describe_group(G, 200_000).unwrap().unwrap();
    assert!(cg.expired && cg.slots.iter().any(|g| g.slot == o && g.expired));
    // An expired group protects nothing more.
    events(&mut s, "o", 1);
    assert_eq!(s.sm.plan_trims(200_000, r).unwrap(), vec![(o, 8)]);
}
