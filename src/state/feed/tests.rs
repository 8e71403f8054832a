//! The change feed's log on real state machines: a model test of what apply writes (dense seqs,
//! no events from ingest or clear, the same bytes however entries are grouped), 2PC, capture,
//! commit times, reads (paging, filters, starts, continuity, CursorExpired), resolved times and
//! a slot moving with its log.

use std::collections::BTreeMap;

use ordo_proto::v1::change_event::Op;
use ordo_proto::v1::{
    txn_op, ChangeEvent, Decision, DeleteRequest, EmitRequest, FinishRequest, MigrateIngestRequest,
    MigrateOutRequest, MigrateStep, MigrationRecord, PrepareRequest, PutRequest,
    SetOwnershipRequest, TxnOp, TxnRequest,
};
use proptest::prelude::*;

use super::{Capture, Cursor, Filter, Retention, Slots, Start};
use crate::error::Error;
use crate::state::{keys, Apply, Checkpoint, Command, Outcome, Stamp, StateMachine};

pub(in crate::state) const SLOTS: u32 = 8;

pub(in crate::state) fn b(s: &str) -> bytes::Bytes {
    s.as_bytes().to_vec().into()
}

pub(in crate::state) fn put(sk: &str, k: &str, v: &str) -> TxnOp {
    TxnOp {
        op: Some(txn_op::Op::Put(PutRequest {
            shard_key: b(sk),
            key: b(k),
            value: b(v),
            ..Default::default()
        })),
    }
}

fn del(sk: &str, k: &str) -> TxnOp {
    TxnOp {
        op: Some(txn_op::Op::Delete(DeleteRequest {
            shard_key: b(sk),
            key: b(k),
            ..Default::default()
        })),
    }
}

fn emit(sk: &str, k: &str, v: &str) -> TxnOp {
    TxnOp {
        op: Some(txn_op::Op::Emit(EmitRequest {
            shard_key: b(sk),
            key: b(k),
            value: b(v),
        })),
    }
}

pub(in crate::state) fn txn(ops: Vec<TxnOp>) -> TxnRequest {
    TxnRequest {
        success: ops,
        ..Default::default()
    }
}

pub(in crate::state) fn slot(sk: &str) -> u32 {
    ordo_proto::slot_of(sk.as_bytes(), SLOTS)
}

pub(in crate::state) fn stamp(now_ms: u64, capture: Capture) -> Option<Stamp> {
    Some(Stamp {
        now_ms,
        window_ms: 60_000,
        capture,
    })
}

pub(in crate::state) struct Sm {
    pub(in crate::state) sm: StateMachine,
    index: u64,
    _dir: tempfile::TempDir,
}

impl Sm {
    pub(in crate::state) fn new() -> Sm {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        Sm {
            sm: StateMachine::open(&db, 1, SLOTS).unwrap().sm,
            index: 0,
            _dir: dir,
        }
    }

    pub(in crate::state) fn entry(&mut self, cmd: Command, stamp: Option<Stamp>) -> Apply {
        self.index += 1;
        Apply {
            index: self.index,
            cmd: Some(cmd),
            stamp,
        }
    }

    pub(in crate::state) fn run_at(
        &mut self,
        cmd: Command,
        now_ms: u64,
    ) -> crate::error::Result<Outcome> {
        let a = self.entry(cmd, stamp(now_ms, Capture::New));
        self.sm.apply_all(&[a]).unwrap().pop().unwrap().1
    }

    pub(in crate::state) fn run(&mut self, cmd: Command) -> crate::error::Result<Outcome> {
        let now = 1_000 + self.index;
        self.run_at(cmd, now)
    }

    /// Every event of `slot` from `start`, read in pages of at most `per_page` events.
    pub(in crate::state) fn read(
        &self,
        slot: u32,
        start: Start,
        per_page: usize,
    ) -> Vec<ChangeEvent> {
        let mut c = vec![self.sm.feed_start(slot, start).unwrap()];
        let all = Filter {
            shard_keys: &[],
            key_prefix: b"",
        };
        let mut out = Vec::new();
        loop {
            let page = self
                .sm
                .feed_page(Slots::Every, &mut c, &all, per_page, 1 << 30)
                .unwrap();
            assert!(page.events.len() <= per_page);
            out.extend(page.events);
            if !page.more {
                return out;
            }
        }
    }
}

/// An op of the model test: on one of a few items (shard key, key) of a few slots.
#[derive(Clone, Debug)]
enum ModelOp {
    Put(usize, u8),
    Delete(usize),
    Emit(usize, u8),
}

const ITEMS: [(&str, &str); 6] = [
    ("order-1", "a"),
    ("order-1", "outbox/x"),
    ("order-2", "a"),
    ("order-3", ""),
    ("order-4", "b"),
    ("order-5", "outbox/y"),
];

#[derive(Clone, Debug)]
enum ModelEntry {
    Txn(Vec<ModelOp>),
    Batch(Vec<Vec<ModelOp>>),
    Trim(u32, u64),
    Ingest,
    Clear,
}

fn model_op() -> impl Strategy<Value = ModelOp> {
    prop_oneof![
        (0..ITEMS.len(), any::<u8>()).prop_map(|(i, v)| ModelOp::Put(i, v)),
        (0..ITEMS.len()).prop_map(ModelOp::Delete),
        (0..ITEMS.len(), any::<u8>()).prop_map(|(i, v)| ModelOp::Emit(i, v)),
    ]
}

fn model_entry() -> impl Strategy<Value = ModelEntry> {
    let ops = || proptest::collection::vec(model_op(), 1..4);
    prop_oneof![
        4 => ops().prop_map(ModelEntry::Txn),
        2 => proptest::collection::vec(ops(), 1..4).prop_map(ModelEntry::Batch),
        1 => (0..SLOTS, 0u64..12).prop_map(|(s, below)| ModelEntry::Trim(s, below)),
        1 => Just(ModelEntry::Ingest),
        1 => Just(ModelEntry::Clear),
    ]
}

/// The slot this test's standalone replica does not own: ingest and clear work there.
fn foreign_slot() -> u32 {
    (0..SLOTS)
        .find(|s| !ITEMS.iter().any(|(sk, _)| slot(sk) == *s))
        .expect("a slot without the model's items")
}

fn to_txn(ops: &[ModelOp]) -> TxnRequest {
    txn(ops
        .iter()
        .map(|op| match *op {
            ModelOp::Put(i, v) => put(ITEMS[i].0, ITEMS[i].1, &v.to_string()),
            ModelOp::Delete(i) => del(ITEMS[i].0, ITEMS[i].1),
            ModelOp::Emit(i, v) => emit(ITEMS[i].0, ITEMS[i].1, &v.to_string()),
        })
        .collect())
}

fn to_command(e: &ModelEntry) -> Command {
    let foreign = foreign_slot();
    match e {
        ModelEntry::Txn(ops) => Command::Txn(to_txn(ops)),
        ModelEntry::Batch(ts) => Command::TxnBatch(ts.iter().map(|t| to_txn(t)).collect()),
        ModelEntry::Trim(s, below) => Command::Checkpoint(Checkpoint {
            trims: vec![(*s, *below)],
        }),
        ModelEntry::Ingest => Command::MigrateIngest(MigrateIngestRequest {
            group_id: 1,
            migration_id: 1,
            records: vec![MigrationRecord {
                key: keys::encode_key(foreign, b"copied", b"k").into(),
                value: keys::encode_value(3, b"copied").into(),
            }],
        }),
        ModelEntry::Clear => Command::MigrateClear(ordo_proto::v1::MigrateClearRequest {
            group_id: 1,
            slots: vec![foreign],
            items_max: 100,
        }),
    }
}

/// An event as the model writes it: shard key, key, op, version, value.
type ModelEvent = (String, String, Op, u64, String);

/// The model: items and, per slot, the log (first seq held, events).
#[derive(Default)]
struct Model {
    items: BTreeMap<usize, u64>,
    logs: BTreeMap<u32, (u64, Vec<ModelEvent>)>,
}

impl Model {
    fn op(&mut self, op: &ModelOp) {
        let (i, op, value) = match *op {
            ModelOp::Put(i, v) => {
                let version = self.items.get(&i).copied().unwrap_or(0) + 1;
                self.items.insert(i, version);
                (i, (Op::Put, version), v.to_string())
            }
            ModelOp::Delete(i) => match self.items.remove(&i) {
                Some(_) => (i, (Op::Delete, 0), String::new()),
                None => return,
            },
            ModelOp::Emit(i, v) => (i, (Op::Emit, 0), v.to_string()),
        };
        let (sk, key) = ITEMS[i];
        let log = self.logs.entry(slot(sk)).or_insert((1, Vec::new()));
        log.1.push((sk.into(), key.into(), op.0, op.1, value));
    }

    fn entry(&mut self, e: &ModelEntry) {
        match e {
            ModelEntry::Txn(ops) => ops.iter().for_each(|op| self.op(op)),
            ModelEntry::Batch(ts) => ts.iter().flatten().for_each(|op| self.op(op)),
            ModelEntry::Trim(s, below) => {
                if let Some((first, events)) = self.logs.get_mut(s) {
                    // Events keeps every event written, trimmed or not: seq n is events[n - 1].
                    let last = events.len() as u64;
                    *first = (*below).min(last + 1).max(*first);
                }
            }
            ModelEntry::Ingest | ModelEntry::Clear => {}
        }
    }
}

fn own_all_but(sm: &mut Sm, foreign: u32) {
    let owned: Vec<u32> = (0..SLOTS).filter(|s| *s != foreign).collect();
    sm.run(Command::SetOwnership(SetOwnershipRequest {
        group_id: 1,
        map_version: 1,
        slot_count: SLOTS,
        slots: owned,
        ..Default::default()
    }))
    .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random puts, deletes, emits, txns, batches, ingest, clear and trims against a model of
    /// each slot's log: seqs are dense from the first held, every event is the model's (ingest
    /// and clear write none, a delete of nothing writes none), commit times are non-decreasing
    /// and never below the entry's stamp; and a second replica fed the same entries grouped
    /// into other apply calls holds the same bytes.
    #[test]
    fn the_log_matches_a_model_whatever_the_grouping(
        entries in proptest::collection::vec(model_entry(), 1..30),
        cuts in proptest::collection::vec(any::<bool>(), 30),
        clock in proptest::collection::vec(0u64..3_000, 30),
    ) {
        let (mut one, mut grouped) = (Sm::new(), Sm::new());
        own_all_but(&mut one, foreign_slot());
        own_all_but(&mut grouped, foreign_slot());
        let mut model = Model::default();
        let mut run: Vec<Apply> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            model.entry(e);
            // A clock that goes back and forth: commit times stay monotonic anyway.
            let st = stamp(clock[i], Capture::New);
            let a = one.entry(to_command(e), st);
            one.sm.apply_all(&[a]).unwrap();
            run.push(grouped.entry(to_command(e), st));
            if cuts[i] {
                grouped.sm.apply_all(&std::mem::take(&mut run)).unwrap();
            }
        }
        grouped.sm.apply_all(&run).unwrap();
        prop_assert_eq!(one.sm.digest().unwrap(), grouped.sm.digest().unwrap());
        for s in 0..SLOTS {
            let got = one.read(s, Start::Oldest, 3);
            prop_assert_eq!(&got, &grouped.read(s, Start::Oldest, 1000));
            let (first, want) = model.logs.get(&s).cloned().unwrap_or((1, Vec::new()));
            let want: Vec<_> = want.into_iter().skip((first - 1) as usize).collect();
            prop_assert_eq!(got.len(), want.len(), "slot {}", s);
            let mut ts = 0;
            for (n, (ev, (sk, key, op, version, value))) in got.iter().zip(&want).enumerate() {
                prop_assert_eq!(ev.seq, first + n as u64);
                prop_assert_eq!(ev.slot, s);
                prop_assert_eq!((ev.shard_key.as_ref(), ev.key.as_ref()), (sk.as_bytes(), key.as_bytes()));
                prop_assert_eq!((ev.op, ev.version, ev.value.as_ref()), (*op as i32, *version, value.as_bytes()));
                prop_assert!(ev.commit_ts_ms >= ts);
                ts = ev.commit_ts_ms;
            }
        }
        prop_assert!(one.read(foreign_slot(), Start::Oldest, 10).is_empty(), "ingest and clear emit nothing");
    }
}

#[test]
fn capture_policies_come_with_the_stamp_and_emits_store_no_item() {
    let mut s = Sm::new();
    let write = |s: &mut Sm, capture, ops| {
        let a = s.entry(Command::Txn(txn(ops)), stamp(5, capture));
        s.sm.apply_all(&[a]).unwrap().pop().unwrap().1.unwrap();
    };
    write(&mut s, Capture::New, vec![put("o", "k", "v1")]);
    write(
        &mut s,
        Capture::OldAndNew,
        vec![put("o", "k", "v2"), emit("o", "outbox/paid", "e")],
    );
    write(&mut s, Capture::Off, vec![put("o", "k", "v3")]);
    // With capture off an Emit would be lost: its Txn is refused whole.
    let a = s.entry(
        Command::Txn(txn(vec![put("o", "k", "v4"), emit("o", "outbox/x", "e")])),
        stamp(6, Capture::Off),
    );
    let refused = s.sm.apply_all(&[a]).unwrap().pop().unwrap().1;
    assert!(
        matches!(&refused, Err(Error::FailedPrecondition(m)) if m.contains("--feed-capture off")),
        "{refused:?}"
    );
    assert_eq!(
        s.sm.get(b"o", b"k").unwrap().unwrap().1,
        b("v3"),
        "nothing applied"
    );
    write(&mut s, Capture::OldAndNew, vec![del("o", "k")]);
    let evs = s.read(slot("o"), Start::Oldest, 100);
    let seen: Vec<_> = evs
        .iter()
        .map(|e| (e.seq, e.op, e.version, e.value.clone(), e.old_value.clone()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (1, Op::Put as i32, 1, b("v1"), b("")),
            (2, Op::Put as i32, 2, b("v2"), b("v1")),
            (3, Op::Emit as i32, 0, b("e"), b("")),
            (4, Op::Delete as i32, 0, b(""), b("v3")),
        ],
        "off writes no event; old values only under old-and-new"
    );
    assert!(
        s.sm.get(b"o", b"outbox/paid").unwrap().is_none(),
        "an emit is not an item"
    );
    // A stamp from before the change feed (16 bytes) captures new values.
    let old = Stamp::decode(&[0u8; 16]).unwrap();
    assert_eq!(old.capture, Capture::New);
    assert_eq!(
        Stamp::decode(&stamp(7, Capture::Off).unwrap().encode()),
        stamp(7, Capture::Off)
    );
}

fn prepare(id: u8, ops: Vec<TxnOp>) -> Command {
    Command::Prepare(PrepareRequest {
        txn_id: vec![id; 16].into(),
        primary_shard_key: ops[0].shard_key().unwrap().clone(),
        part: Some(txn(ops)),
        ..Default::default()
    })
}

fn finish(id: u8, sk: &str, decision: Decision) -> Command {
    Command::Finish(FinishRequest {
        txn_id: vec![id; 16].into(),
        shard_key: b(sk),
        decision: decision as i32,
        ..Default::default()
    })
}

/// A 2PC part's events come with its finish and carry its id; the prepare writes none, an
/// abort none; while it is prepared the slot's resolved time stays below the prepare.
#[test]
fn a_finished_part_emits_with_its_id_an_abort_emits_nothing_and_a_prepare_holds_resolved() {
    let mut s = Sm::new();
    let sl = slot("o");
    s.run_at(
        prepare(1, vec![put("o", "a", "1"), emit("o", "outbox/1", "m")]),
        2_000,
    )
    .unwrap();
    assert!(
        s.read(sl, Start::Oldest, 10).is_empty(),
        "a prepare writes no event"
    );
    s.run_at(Command::Txn(txn(vec![put("p", "x", "x")])), 3_000)
        .unwrap();
    let mut c = vec![s.sm.feed_start(sl, Start::Oldest).unwrap()];
    let all = Filter {
        shard_keys: &[],
        key_prefix: b"",
    };
    let page =
        s.sm.feed_page(Slots::Every, &mut c, &all, 10, 1 << 20)
            .unwrap();
    assert_eq!(page.resolved_ts_ms, 1_999, "held below the prepared part");
    s.run_at(finish(1, "o", Decision::RunSuccess), 4_000)
        .unwrap();
    s.run_at(prepare(2, vec![put("o", "a", "2")]), 5_000)
        .unwrap();
    s.run_at(finish(2, "o", Decision::Abort), 6_000).unwrap();
    let page =
        s.sm.feed_page(Slots::Every, &mut c, &all, 10, 1 << 20)
            .unwrap();
    let ids: Vec<_> = page
        .events
        .iter()
        .map(|e| (e.seq, e.txn_id.clone(), e.commit_ts_ms))
        .collect();
    let id = bytes::Bytes::from(vec![1u8; 16]);
    assert_eq!(ids, vec![(1, id.clone(), 4_000), (2, id, 4_000)]);
    assert_eq!(page.resolved_ts_ms, 6_000, "nothing prepared any more");
}

#[test]
fn commit_times_are_the_stamps_made_strictly_increasing_per_entry() {
    let mut s = Sm::new();
    s.run_at(
        Command::Txn(txn(vec![put("o", "a", "1"), put("o", "b", "1")])),
        5_000,
    )
    .unwrap();
    s.run_at(Command::Txn(txn(vec![put("o", "a", "2")])), 4_000)
        .unwrap(); // a clock behind
    s.run_at(Command::Txn(txn(vec![put("o", "a", "3")])), 9_000)
        .unwrap();
    let ts: Vec<_> = s
        .read(slot("o"), Start::Oldest, 10)
        .iter()
        .map(|e| e.commit_ts_ms)
        .collect();
    assert_eq!(ts, vec![5_000, 5_000, 5_001, 9_000]);
}

fn fill(s: &mut Sm, n: u64) {
    for i in 0..n {
        let key = if i % 2 == 0 { "outbox/e" } else { "item" };
        s.run_at(
            Command::Txn(txn(vec![put(
                if i % 3 == 0 { "o" } else { "q" },
                key,
                &i.to_string(),
            )])),
            10_000 + i * 10,
        )
        .unwrap();
    }
}

/// Pages hold at most what was asked, filters drop events but not the position, starts by
/// time, oldest and now land where they should, and a position a trim passed is CursorExpired
/// with the slot's oldest seq and time, never a silent gap.
#[test]
fn reads_page_filter_start_and_check_continuity() {
    let mut s = Sm::new();
    let (o, q) = (slot("o"), slot("q"));
    assert_ne!(o, q, "two slots");
    fill(&mut s, 30);
    let all = s.read(o, Start::Oldest, 1000);
    assert_eq!(all.len(), 10);
    assert_eq!(s.read(o, Start::Oldest, 3), all, "pages of 3 read the same");
    // Filters: only outbox events of "o", positions advance past the others.
    let sks = [b("o")];
    let f = Filter {
        shard_keys: &sks,
        key_prefix: b"outbox/",
    };
    let mut c: Vec<Cursor> = vec![
        s.sm.feed_start(o, Start::Oldest).unwrap(),
        s.sm.feed_start(q, Start::Oldest).unwrap(),
    ];
    let page =
        s.sm.feed_page(Slots::Every, &mut c, &f, 1000, 1 << 20)
            .unwrap();
    assert!(page
        .events
        .iter()
        .all(|e| e.shard_key == sks[0] && e.key.starts_with(b"outbox/")));
    assert_eq!(page.events.len(), 5);
    assert_eq!(
        page.positions.iter().map(|p| p.seq).collect::<Vec<_>>(),
        vec![10, 20],
        "filtered-out events advance the position"
    );
    // Starts.
    let t = all[4].commit_ts_ms;
    assert_eq!(s.read(o, Start::AfterTs(t), 100), all[5..].to_vec());
    assert_eq!(s.read(o, Start::AfterTs(0), 100), all);
    assert!(s.read(o, Start::Now, 100).is_empty());
    assert_eq!(s.read(o, Start::AfterSeq(7), 100), all[7..].to_vec());
    // Trim below seq 4 of "o": a reader at seq 2 is told so, with the oldest held.
    let mut behind = vec![s.sm.feed_start(o, Start::AfterSeq(2)).unwrap()];
    s.run(Command::Checkpoint(Checkpoint {
        trims: vec![(o, 4)],
    }))
    .unwrap();
    let open = Filter {
        shard_keys: &[],
        key_prefix: b"",
    };
    match s
        .sm
        .feed_page(Slots::Every, &mut behind, &open, 10, 1 << 20)
    {
        Err(Error::CursorExpired {
            slot,
            oldest_seq,
            oldest_ts_ms,
            requested_seq,
        }) => {
            assert_eq!(
                (slot, oldest_seq, oldest_ts_ms, requested_seq),
                (o, 4, all[3].commit_ts_ms, 3)
            );
        }
        other => panic!("expected CursorExpired, got {other:?}"),
    }
    assert!(
        matches!(
            s.sm.feed_start(o, Start::AfterSeq(2)),
            Err(Error::CursorExpired {
                oldest_seq: 4,
                requested_seq: 3,
                ..
            })
        ),
        "and a new read from there is refused at its start"
    );
    assert_eq!(s.read(o, Start::Oldest, 100), all[3..].to_vec());
    assert_eq!(
        s.read(o, Start::AfterSeq(3), 100),
        all[3..].to_vec(),
        "right at the oldest: no gap"
    );
    assert!(matches!(
        s.sm.feed_start(o, Start::AfterTs(0)),
        Err(Error::CursorExpired { oldest_seq: 4, .. })
    ));
}

/// A snapshot start: the slot's items as OP_SNAPSHOT events, then the events after the seq it
/// recorded, with nothing lost to writes made between its pages.
#[test]
fn a_snapshot_start_sends_the_items_then_the_changes_after_it() {
    let mut s = Sm::new();
    for i in 0..5 {
        s.run(Command::Txn(txn(vec![put("o", &format!("k{i}"), "v1")])))
            .unwrap();
    }
    let sl = slot("o");
    let mut c = vec![s.sm.feed_start(sl, Start::Snapshot).unwrap()];
    let all = Filter {
        shard_keys: &[],
        key_prefix: b"",
    };
    let first =
        s.sm.feed_page(Slots::Every, &mut c, &all, 2, 1 << 20)
            .unwrap();
    assert_eq!(first.events.len(), 2);
    assert!(first.positions[0].snapshotting && first.more);
    s.run(Command::Txn(txn(vec![
        put("o", "k0", "v2"),
        put("o", "k9", "new"),
    ])))
    .unwrap();
    let mut evs = first.events;
    loop {
        let p =
            s.sm.feed_page(Slots::Every, &mut c, &all, 2, 1 << 20)
                .unwrap();
        evs.extend(p.events);
        if !p.more {
            break;
        }
    }
    let got: Vec<_> = evs
        .iter()
        .map(|e| {
            (
                e.op,
                e.seq,
                String::from_utf8_lossy(&e.key).to_string(),
                e.version,
            )
        })
        .collect();
    let snap = Op::Snapshot as i32;
    let put = Op::Put as i32;
    assert_eq!(
        &got[..2],
        &[(snap, 0, "k0".into(), 1), (snap, 0, "k1".into(), 1)]
    );
    assert_eq!(
        got.iter().filter(|e| e.0 == snap).count(),
        6,
        "k2..k4 and k9 read after the write"
    );
    assert_eq!(
        &got[6..],
        &[(put, 6, "k0".into(), 2), (put, 7, "k9".into(), 1)],
        "then every change after the recorded seq 5"
    );
}

pub(in crate::state) fn migrate(id: u64, step: MigrateStep, slots: &[u32]) -> Command {
    Command::MigrateOut(MigrateOutRequest {
        group_id: 1,
        migration_id: id,
        step: step as i32,
        slots: slots.to_vec(),
        ..Default::default()
    })
}

pub(in crate::state) fn ownership(group: u64, version: u64, slots: Vec<u32>) -> Command {
    Command::SetOwnership(SetOwnershipRequest {
        group_id: group,
        map_version: version,
        slot_count: SLOTS,
        slots,
        ..Default::default()
    })
}

/// A slot moves with its log: the recipient holds the same events and continues the seqs; the
/// donor's resolved time for the slot freezes at its fence, and the recipient's next event of
/// the slot comes after it even with the recipient's clock far behind; the donor reports the
/// slot moved once a reader has every event it held, also to a reader of changed slots only.
#[test]
fn a_slot_moves_with_its_log_and_its_times_stay_ordered_across_the_move() {
    let sl = slot("o");
    let (mut d, mut r) = (Sm::new(), Sm::new());
    d.run_at(ownership(1, 1, (0..SLOTS).collect()), 50_000)
        .unwrap();
    r.run_at(ownership(2, 1, vec![]), 1_000).unwrap();
    d.run_at(Command::Txn(txn(vec![put("o", "a", "1")])), 50_001)
        .unwrap();
    d.run_at(migrate(3, MigrateStep::Begin, &[sl]), 50_002)
        .unwrap();
    d.run_at(Command::Txn(txn(vec![put("o", "a", "2")])), 50_003)
        .unwrap();
    let reader = |sm: &StateMachine| vec![sm.feed_start(sl, Start::Oldest).unwrap()];
    let all = Filter {
        shard_keys: &[],
        key_prefix: b"",
    };
    let mut donor_reader = reader(&d.sm);
    let early =
        d.sm.feed_page(Slots::Changed, &mut donor_reader, &all, 10, 1 << 20)
            .unwrap();
    assert_eq!(early.events.len(), 2);
    d.run_at(migrate(3, MigrateStep::Fence, &[]), 50_010)
        .unwrap();
    let copy = d.sm.migration_pull(3, false, &[], 1 << 20).unwrap().records;
    let log = d.sm.migration_pull(3, true, &[], 1 << 20).unwrap().records;
    for records in [copy, log] {
        r.run_at(
            Command::MigrateIngest(MigrateIngestRequest {
                group_id: 2,
                migration_id: 3,
                records,
            }),
            1_001,
        )
        .unwrap();
    }
    d.run_at(
        ownership(1, 2, (0..SLOTS).filter(|s| *s != sl).collect()),
        50_020,
    )
    .unwrap();
    r.run_at(ownership(2, 2, vec![sl]), 1_002).unwrap();
    // No new event, but the owner changed: a page reading only changed slots reads it.
    let page =
        d.sm.feed_page(Slots::Changed, &mut donor_reader, &all, 10, 1 << 20)
            .unwrap();
    assert!(page.events.is_empty());
    assert!(
        page.positions[0].moved,
        "the donor holds no more of the slot"
    );
    let frozen = page.positions[0].resolved_ts_ms;
    assert_eq!(frozen, 50_009, "frozen below the fence");
    r.run_at(Command::Txn(txn(vec![put("o", "a", "3")])), 1_003)
        .unwrap();
    let evs = r.read(sl, Start::Oldest, 10);
    let seen: Vec<_> = evs.iter().map(|e| (e.seq, e.version)).collect();
    assert_eq!(
        seen,
        vec![(1, 1), (2, 2), (3, 3)],
        "the log moved and its seqs go on"
    );
    assert!(
        evs[2].commit_ts_ms > frozen,
        "{} after the donor's frozen {frozen}",
        evs[2].commit_ts_ms
    );
    let mut rc = vec![r.sm.feed_start(sl, Start::Now).unwrap()];
    let resolved =
        r.sm.feed_page(Slots::Every, &mut rc, &all, 10, 1 << 20)
            .unwrap()
            .resolved_ts_ms;
    assert!(
        resolved >= frozen,
        "the recipient's resolved time does not go back: {resolved}"
    );
}

/// A retention of `ms` and `bytes`, protecting nothing longer.
pub(in crate::state) fn retention(ms: u64, bytes: u64) -> Retention {
    Retention {
        ms,
        bytes,
        protect_ms: ms,
        protect_bytes: bytes,
    }
}

/// The leader's retention plan: events older than the retention go, then the oldest across
/// slots while the group holds more bytes than its cap, at most `FEED_TRIM_EVENTS_MAX`; applied
/// as a checkpoint, it leaves exactly the planned events.
#[test]
fn retention_plans_trims_by_time_then_by_bytes_oldest_first() {
    let mut s = Sm::new();
    let (o, q) = (slot("o"), slot("q"));
    for (sk, at) in [("o", 1_000), ("q", 2_000)] {
        for i in 0..10 {
            let t = txn(vec![put(sk, "k", &i.to_string())]);
            s.run_at(Command::Txn(t), at + i).unwrap();
        }
    }
    assert!(
        s.sm.plan_trims(3_000, retention(10_000, u64::MAX))
            .unwrap()
            .is_empty(),
        "nothing is due"
    );
    // By time: all of "o" (at 1000..1009) and q's first three (2000..2002) are older than 2002.
    assert_eq!(
        s.sm.plan_trims(12_002, retention(10_000, u64::MAX))
            .unwrap(),
        vec![(o, 11), (q, 4)]
    );
    // By bytes: keep about five events of the group's twenty: the oldest fifteen go, all of "o"
    // first (it is older).
    let size = s.read(o, Start::Oldest, 100).len() as u64;
    assert_eq!(size, 10);
    let held = s.sm.feed_meta_of(o).unwrap().bytes + s.sm.feed_meta_of(q).unwrap().bytes;
    let per_event = held / 20;
    let plan =
        s.sm.plan_trims(3_000, retention(10_000, 5 * per_event))
            .unwrap();
    assert_eq!(plan, vec![(o, 11), (q, 6)]);
    s.run(Command::Checkpoint(Checkpoint { trims: plan }))
        .unwrap();
    assert!(s.read(o, Start::Oldest, 100).is_empty());
    let left: Vec<_> = s
        .read(q, Start::Oldest, 100)
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(left, vec![6, 7, 8, 9, 10]);
    assert_eq!(s.sm.feed_meta_of(q).unwrap().bytes, 5 * per_event);
}

/// A reader of every owned slot, from now, paging until nothing is left; what it was given.
struct Follower {
    cursors: Vec<Cursor>,
    events: Vec<ChangeEvent>,
    resolved: u64,
}

impl Follower {
    fn new(sm: &StateMachine, slots: &[u32]) -> Follower {
        let cursors = slots
            .iter()
            .map(|&s| sm.feed_start(s, Start::Now).unwrap())
            .collect();
        Follower {
            cursors,
            events: Vec::new(),
            resolved: 0,
        }
    }

    /// Reads until the pages say nothing more is there; the slots each page listed.
    fn follow(&mut self, sm: &StateMachine, whole: bool) -> Vec<u32> {
        let all = Filter {
            shard_keys: &[],
            key_prefix: b"",
        };
        let mut listed = Vec::new();
        loop {
            let slots = if whole { Slots::Every } else { Slots::Changed };
            let page = sm
                .feed_page(slots, &mut self.cursors, &all, 2, 1 << 20)
                .unwrap();
            assert!(page.resolved_ts_ms >= self.resolved, "resolved went back");
            self.resolved = page.resolved_ts_ms;
            listed.extend(page.positions.iter().map(|p| p.slot));
            self.events.extend(page.events);
            if !page.more {
                return listed;
            }
        }
    }
}

/// Both followers read what is new; they must agree (see below).
fn follow_both(sm: &StateMachine, whole: &mut Follower, changed: &mut Follower, prepared: bool) {
    let before = changed.events.len();
    whole.follow(sm, true);
    let listed = changed.follow(sm, false);
    assert_eq!(changed.events, whole.events);
    assert!(changed.resolved <= whole.resolved);
    if !prepared {
        assert_eq!(changed.resolved, whole.resolved);
    }
    let fresh: Vec<u32> = changed.events[before..].iter().map(|ev| ev.slot).collect();
    assert!(
        listed.iter().all(|sl| fresh.contains(sl)),
        "listed {listed:?}, new events in {fresh:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// A page that reads only the slots with something new gives a follower exactly what a page
    /// reading every slot gives, whatever is applied between reads (txns, batches, trims,
    /// ingest, clear, 2PC parts prepared and finished): the same events in the same order, a
    /// resolved time never above the whole read's, and equal to it whenever no part is
    /// prepared; and it lists only slots with new events (once each has been read).
    #[test]
    fn reading_only_changed_slots_misses_nothing(
        steps in proptest::collection::vec((model_entry(), 0u8..4), 1..30),
    ) {
        let mut s = Sm::new();
        own_all_but(&mut s, foreign_slot());
        let slots: Vec<u32> = (0..SLOTS).filter(|&sl| sl != foreign_slot()).collect();
        let mut whole = Follower::new(&s.sm, &slots);
        let mut changed = Follower::new(&s.sm, &slots);
        whole.follow(&s.sm, true);
        prop_assert_eq!(changed.follow(&s.sm, false).len(), slots.len(), "a first read lists every slot");
        let (mut prepared, mut id) = (false, 0u8);
        for (e, twopc) in &steps {
            match twopc {
                1 if !prepared => {
                    id += 1;
                    s.run(prepare(id, vec![put("part", "x", &id.to_string())])).unwrap();
                    prepared = true;
                }
                2 if prepared => {
                    s.run(finish(id, "part", Decision::RunSuccess)).unwrap();
                    prepared = false;
                }
                _ => {}
            }
            follow_both(&s.sm, &mut whole, &mut changed, prepared);
            let _ = s.run(to_command(e)); // a refused command writes nothing
            follow_both(&s.sm, &mut whole, &mut changed, prepared);
        }
    }
}
