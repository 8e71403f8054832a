//! The feed checker on hand-made histories: a correct one passes, and each kind of violation,
//! made up on purpose, fails with an account naming the item, slot and seq.

use std::time::Instant;

use bytes::Bytes;
use ordo_proto::v1::change_event::Op as EventOp;
use ordo_proto::v1::{ChangeEvent, WatchResponse};

use super::*;

const SETTLED: u64 = 1_090;

fn ev(
    slot: u32,
    sk: &str,
    key: &str,
    op: EventOp,
    version: u64,
    value: &str,
    ts: u64,
) -> ChangeEvent {
    ChangeEvent {
        slot,
        seq: 0,
        shard_key: Bytes::from(sk.to_string()),
        key: Bytes::from(key.to_string()),
        op: op as i32,
        version,
        value: Bytes::from(value.to_string()),
        old_value: Bytes::new(),
        commit_ts_ms: ts,
        txn_id: Bytes::new(),
    }
}

fn put(slot: u32, sk: &str, version: u64, value: &str, ts: u64) -> ChangeEvent {
    ev(slot, sk, "", EventOp::Put, version, value, ts)
}

fn del(slot: u32, sk: &str, ts: u64) -> ChangeEvent {
    ev(slot, sk, "", EventOp::Delete, 0, "", ts)
}

fn in_txn(mut e: ChangeEvent, id: &str) -> ChangeEvent {
    e.txn_id = Bytes::from(id.to_string());
    e
}

/// Responses as `(events, resolved)`, their events not yet numbered.
type Script = Vec<(Vec<ChangeEvent>, u64)>;

/// Numbers each slot's events 1, 2, … in delivery order, as a correct feed does.
fn numbered(mut script: Script) -> Script {
    let mut next = std::collections::HashMap::new();
    for (events, _) in &mut script {
        for e in events {
            let seq = next.entry(e.slot).or_insert(0u64);
            *seq += 1;
            e.seq = *seq;
        }
    }
    script
}

fn watch_of(name: &str, start: Start, script: Script) -> Watch {
    let mut w = Watch::new(name, start);
    for (i, (events, resolved)) in script.into_iter().enumerate() {
        w.responses.push(Received {
            at_ms: resolved + 1,
            response: WatchResponse {
                events,
                cursor: Bytes::from(format!("cursor-{i}")),
                resolved_ts_ms: resolved,
            },
        });
    }
    w
}

fn write(sk: &str, op: WriteOp, outcome: Outcome) -> Write {
    Write {
        item: ItemKey::new(sk, ""),
        op,
        outcome,
        txn: None,
    }
}

fn w_put(sk: &str, value: &str, outcome: Outcome) -> Write {
    write(
        sk,
        WriteOp::Put {
            value: value.into(),
        },
        outcome,
    )
}

fn acked(version: u64, acked_ms: u64) -> Outcome {
    Outcome::Applied { version, acked_ms }
}

fn labelled(mut w: Write, id: u64) -> Write {
    w.txn = Some(TxnLabel {
        id,
        cross_group: true,
    });
    w
}

/// Items a, b (slot 1), c (slot 2), d (slot 3), e (slot 4): puts, a delete and a recreation,
/// an unknown write that applied and one that did not, a failed write, an emit, a cross-group
/// transaction that committed and one that aborted.
fn expected() -> Expected {
    let final_data = [
        ("a", "a3"),
        ("b", "b1"),
        ("c", "c1"),
        ("d", "d1"),
        ("e", "e1"),
    ]
    .into_iter()
    .map(|(k, v)| (ItemKey::new(k, ""), Some((v.as_bytes().to_vec(), 1))))
    .collect();
    Expected {
        writes: vec![
            w_put("a", "a1", acked(1, 1010)),
            w_put("b", "b1", acked(1, 1015)),
            w_put("a", "a2", acked(2, 1020)),
            write("a", WriteOp::Delete, acked(0, 1030)),
            w_put("a", "a3", acked(1, 1040)),
            w_put("c", "c1", Outcome::Unknown),
            w_put("c", "c2", Outcome::Unknown),
            w_put("b", "bx", Outcome::NotApplied),
            Write {
                item: ItemKey::new("c", "outbox/1"),
                op: WriteOp::Emit {
                    value: b"m1".to_vec(),
                },
                outcome: acked(0, 1050),
                txn: None,
            },
            labelled(w_put("d", "d1", acked(1, 1060)), 7),
            labelled(w_put("e", "e1", acked(1, 1060)), 7),
            labelled(w_put("d", "dx", Outcome::NotApplied), 8),
            labelled(w_put("e", "ex", Outcome::NotApplied), 8),
        ],
        final_data,
        settled_ms: SETTLED,
    }
}

/// The feed of [`expected`], in four responses.
fn script() -> Script {
    vec![
        (
            vec![
                put(1, "a", 1, "a1", 1005),
                put(1, "b", 1, "b1", 1012),
                put(2, "c", 1, "c1", 1013),
            ],
            1015,
        ),
        (vec![put(1, "a", 2, "a2", 1018), del(1, "a", 1028)], 1030),
        (
            vec![
                put(1, "a", 1, "a3", 1038),
                ev(2, "c", "outbox/1", EventOp::Emit, 0, "m1", 1048),
            ],
            1050,
        ),
        (
            vec![
                in_txn(put(3, "d", 1, "d1", 1058), "T7"),
                in_txn(put(4, "e", 1, "e1", 1059), "T7"),
            ],
            1100,
        ),
    ]
}

fn check_script(script: Script) -> FeedReport {
    check(
        &expected(),
        &[watch_of("w", Start::Empty, numbered(script))],
    )
}

/// The report has violations of `kind` (and maybe others), the first naming every `parts`.
#[track_caller]
fn assert_caught(report: &FeedReport, kind: Kind, parts: &[&str]) {
    let account = report
        .account(kind)
        .unwrap_or_else(|| panic!("no {kind:?} violation in\n{report}"));
    for part in parts {
        assert!(
            account.contains(part),
            "the {kind:?} account does not name {part:?}: {account}\n{report}"
        );
    }
}

#[test]
fn a_correct_feed_passes() {
    let report = check_script(script());
    report.assert_ok();
    let s = &report.stats;
    assert_eq!((s.events, s.complete_watches), (9, 1));
    // a1 b1 a2 a3, the emit, d1 e1 (the delete is counted per item).
    assert_eq!(s.acked_found, 7);
    assert_eq!((s.unknown_appeared, s.unknown_absent), (1, 1));
}

#[test]
fn a_watch_that_reconnects_from_its_last_cursor_is_one_stream() {
    let mut w = watch_of("w", Start::Empty, numbered(script()));
    w.resumes.push(Resume {
        first: 2,
        after: Some(1),
    });
    let report = check(&expected(), &[w.clone()]);
    report.assert_ok();
    assert_eq!(report.stats.resumes, 1);

    // Sending the last event before the break again is a repeat, not a redelivery.
    let repeat = w.responses[1].response.events[1].clone();
    w.responses[2].response.events.insert(0, repeat);
    assert_caught(
        &check(&expected(), &[w]),
        Kind::SlotSeq,
        &["slot 1 seq 4 delivered again in response 2 (first: response 1)"],
    );
}

#[test]
fn check_1_an_item_whose_versions_come_out_of_order_is_caught() {
    let mut s = script();
    // a's v2 before its v1 (the slot's seqs stay contiguous).
    s[0].0[0] = put(1, "a", 2, "a2", 1005);
    s[1].0[0] = put(1, "a", 1, "a1", 1018);
    assert_caught(
        &check_script(s),
        Kind::ItemOrder,
        &[
            "item (\"a\", \"\")",
            "slot 1 seq 1 PUT",
            "v2",
            "expected v1",
        ],
    );

    // A delete of an absent item.
    let mut s = script();
    s[0].0.insert(0, del(1, "b", 1001));
    assert_caught(
        &check_script(s),
        Kind::ItemOrder,
        &[
            "item (\"b\", \"\")",
            "slot 1 seq 1 DELETE",
            "the item is absent",
        ],
    );

    // A version skipped: a3 recreates a at v2.
    let mut s = script();
    s[2].0[0] = put(1, "a", 2, "a3", 1038);
    assert_caught(
        &check_script(s),
        Kind::ItemOrder,
        &[
            "slot 1 seq 5 PUT (\"a\", \"\") v2",
            "expected v1",
            "slot 1 seq 4 DELETE",
        ],
    );
}

#[test]
fn check_2_a_missing_acknowledged_write_is_caught() {
    let mut s = script();
    s[0].0.remove(1); // b1
    let report = check_script(s);
    assert_caught(
        &report,
        Kind::Writes,
        &["#1 PUT (\"b\", \"\") \"b1\" (acknowledged v1 at 1015) is not in the feed"],
    );
    assert_eq!(report.count(Kind::SlotSeq), 0, "{report}");
}

#[test]
fn check_2_a_write_acknowledged_after_the_resolved_time_need_not_be_there_yet() {
    let mut s = script();
    s.pop(); // d1, e1 (acknowledged at 1060), and resolved only reaches 1050
    let report = check_script(s);
    report.assert_ok();
    assert_eq!(report.stats.complete_watches, 0, "{report}");
}

#[test]
fn check_2_a_failed_write_in_the_feed_is_caught() {
    let mut s = script();
    s[1].0.push(put(1, "b", 2, "bx", 1029));
    assert_caught(
        &check_script(s),
        Kind::Writes,
        &[
            "#7 PUT (\"b\", \"\") \"bx\" (not applied) failed",
            "slot 1 seq 5",
        ],
    );
}

#[test]
fn check_2_an_unknown_write_twice_is_caught() {
    let mut s = script();
    s[1].0.push(put(2, "c", 2, "c1", 1029));
    assert_caught(
        &check_script(s),
        Kind::Writes,
        &[
            "\"c1\" (outcome unknown) delivered twice",
            "slot 2 seq 1",
            "slot 2 seq 2",
        ],
    );
}

#[test]
fn check_2_an_event_no_write_explains_is_caught() {
    let mut s = script();
    s[1].0.push(put(2, "c", 2, "zz", 1029));
    assert_caught(
        &check_script(s),
        Kind::Writes,
        &[
            "slot 2 seq 2 PUT (\"c\", \"\") v2 \"zz\"",
            "is no write of the history",
        ],
    );
}

#[test]
fn check_2_a_feed_that_disagrees_with_the_final_data_is_caught() {
    let mut e = expected();
    // c1's outcome was unknown and it is in the feed, but the data says it never applied.
    e.final_data.insert(ItemKey::new("c", ""), None);
    let report = check(&e, &[watch_of("w", Start::Empty, numbered(script()))]);
    assert_caught(
        &report,
        Kind::Writes,
        &[
            "item (\"c\", \"\"): the final data is absent",
            "leaves it v1 \"c1\"",
            "slot 2 seq 1",
        ],
    );
}

#[test]
fn check_2_a_missing_delete_is_caught() {
    let mut s = script();
    s[1].0.pop();
    assert_caught(
        &check_script(s),
        Kind::Writes,
        &["item (\"a\", \"\"): 0 DELETE events, but 1 deletes were acknowledged"],
    );
}

#[test]
fn check_3_a_gap_in_a_slot_is_caught() {
    let mut s = numbered(script());
    s[2].0[1].seq = 3; // slot 2: 1, 3
    assert_caught(
        &check(&expected(), &[watch_of("w", Start::Empty, s)]),
        Kind::SlotSeq,
        &["slot 2: seq 3 (response 2) follows seq 1: seqs 2..=2 never delivered"],
    );

    // A watch with the cluster starts every slot at 1.
    let mut s = numbered(script());
    s[3].0[0].seq = 4;
    assert_caught(
        &check(&expected(), &[watch_of("w", Start::Empty, s)]),
        Kind::SlotSeq,
        &["slot 3 starts at seq 4 (response 3), not 1"],
    );
}

#[test]
fn check_3_a_repeat_in_a_slot_is_caught() {
    let mut s = numbered(script());
    let again = s[0].0[1].clone();
    s[1].0.insert(1, again);
    assert_caught(
        &check(&expected(), &[watch_of("w", Start::Empty, s)]),
        Kind::SlotSeq,
        &["slot 1 seq 2 delivered again in response 1 (first: response 0), after seq 3"],
    );
}

#[test]
fn check_4_a_transaction_in_the_feed_in_part_is_caught() {
    let mut s = script();
    s[3].0.pop(); // e1
    assert_caught(
        &check_script(s),
        Kind::Txn,
        &[
            "transaction 7 is in the feed in part",
            "slot 3 seq 1",
            "\"e1\"",
        ],
    );
}

#[test]
fn check_4_an_aborted_transaction_in_the_feed_is_caught() {
    let mut s = script();
    s[3].0.push(in_txn(put(3, "d", 2, "dx", 1060), "T8"));
    assert_caught(
        &check_script(s),
        Kind::Txn,
        &["transaction 8 was aborted", "\"dx\"", "slot 3 seq 2"],
    );
}

#[test]
fn check_4_a_transaction_under_two_ids_or_none_is_caught() {
    let mut s = script();
    s[3].0[1] = in_txn(put(4, "e", 1, "e1", 1059), "T9");
    assert_caught(
        &check_script(s),
        Kind::Txn,
        &[
            "transaction 7 (cross-group)",
            "slot 4 seq 1",
            "txn \"T9\"",
            "not one txn id",
        ],
    );

    let mut s = script();
    s[3].0[1] = put(4, "e", 1, "e1", 1059);
    assert_caught(
        &check_script(s),
        Kind::Txn,
        &["transaction 7", "slot 4 seq 1"],
    );

    // A plain write that carries a txn id.
    let mut s = script();
    s[0].0[1] = in_txn(put(1, "b", 1, "b1", 1012), "T7");
    assert_caught(
        &check_script(s),
        Kind::Txn,
        &["#1 PUT (\"b\", \"\") \"b1\"", "is in no transaction"],
    );
}

#[test]
fn check_5_an_event_at_or_below_a_resolved_time_sent_is_caught() {
    let mut s = script();
    s[1].0[0] = put(1, "a", 2, "a2", 1015); // resolved 1015 was sent in response 0
    assert_caught(
        &check_script(s),
        Kind::Watermark,
        &[
            "slot 1 seq 3",
            "ts 1015",
            "after resolved 1015 was sent (response 0)",
        ],
    );
}

#[test]
fn check_5_resolved_going_back_is_caught() {
    let mut s = script();
    s[1].1 = 1014;
    assert_caught(
        &check_script(s),
        Kind::Watermark,
        &["resolved went back from 1015 (response 0) to 1014 (response 1)"],
    );
}

#[test]
fn check_5_a_slot_whose_commit_time_goes_back_is_caught() {
    let mut s = script();
    s[0].0[1] = put(1, "b", 1, "b1", 1004); // after a1 at 1005 in the same slot
    assert_caught(
        &check_script(s),
        Kind::Watermark,
        &[
            "slot 1 seq 2",
            "older than the slot's previous event slot 1 seq 1",
        ],
    );
}

/// A watch that, after response 2, resumes after response 0's cursor on purpose and gets
/// `replay` (then the last response).
fn rewound(replay: Vec<ChangeEvent>) -> Watch {
    let s = numbered(script());
    let mut w = watch_of("w", Start::Empty, s.clone());
    let tail = w.responses.pop().unwrap();
    let first = w.responses.len();
    w.resumes.push(Resume {
        first,
        after: Some(0),
    });
    w.responses.push(Received {
        at_ms: 1051,
        response: WatchResponse {
            events: replay,
            cursor: Bytes::from("cursor-replay"),
            resolved_ts_ms: 1050,
        },
    });
    w.responses.push(tail);
    w
}

/// What followed response 0 in [`script`], numbered: the exact replay.
fn after_response_0() -> Vec<ChangeEvent> {
    let s = numbered(script());
    s[1].0.iter().chain(&s[2].0).cloned().collect()
}

#[test]
fn check_6_a_rewind_that_delivers_exactly_the_rest_passes() {
    let report = check(&expected(), &[rewound(after_response_0())]);
    report.assert_ok();
    assert_eq!((report.stats.redelivered, report.stats.events), (4, 9));
}

#[test]
fn check_6_a_rewind_that_skips_an_event_is_caught() {
    let mut replay = after_response_0();
    replay.remove(0); // slot 1 seq 3
    assert_caught(
        &check(&expected(), &[rewound(replay)]),
        Kind::Resume,
        &[
            "resumed after the cursor of response 0, slot 1 should have delivered seq 3 again",
            "delivered seq 4",
        ],
    );
}

#[test]
fn check_6_a_rewind_that_changes_an_event_is_caught() {
    let mut replay = after_response_0();
    replay[2].commit_ts_ms += 1;
    assert_caught(
        &check(&expected(), &[rewound(replay)]),
        Kind::Resume,
        &[
            "slot 1 seq 5 came again in response 3 changed",
            "ts 1038",
            "ts 1039",
        ],
    );
}

#[test]
fn check_6_a_rewind_that_stops_short_of_its_resolved_time_is_caught() {
    let mut replay = after_response_0();
    replay.truncate(2); // slot 1 seq 5 and slot 2 seq 2 (at 1048) not again, yet resolved 1050
    let report = check(&expected(), &[rewound(replay)]);
    assert_caught(
        &report,
        Kind::Resume,
        &[
            "never delivered slot",
            "again",
            "though it sent resolved 1100 (response 4)",
        ],
    );
}

#[test]
fn check_6_a_second_watch_from_a_cursor_must_be_the_first_ones_suffix() {
    let s = numbered(script());
    let first = watch_of("first", Start::Empty, s.clone());
    let second = watch_of("second", Start::Midway, s[2..].to_vec());
    check_resume(&first, 1, &second).assert_ok();

    // From response 0's cursor the second must start with slot 1 seq 3.
    let report = check_resume(&first, 0, &second);
    assert_caught(
        &report,
        Kind::Resume,
        &[
            "slot 1 should have delivered seq 3 again",
            "delivered seq 5 (response 4)",
        ],
    );
    assert_eq!(report.first[&Kind::Resume].watch, "first resumed as second");

    // A second watch that goes further than the first goes on with no gap.
    let mut longer = s[2..].to_vec();
    longer.push((vec![put(1, "a", 2, "a4", 1101)], 1200));
    longer[2].0[0].seq = 7;
    assert_caught(
        &check_resume(&first, 1, &watch_of("second", Start::Midway, longer)),
        Kind::SlotSeq,
        &["slot 1: seq 7 (response 6) follows seq 5"],
    );
}

#[test]
fn input_the_checker_cannot_read_is_refused() {
    let mut e = expected();
    e.writes.push(w_put("a", "a1", Outcome::Unknown));
    let report = check(&e, &[watch_of("w", Start::Empty, numbered(script()))]);
    assert_caught(&report, Kind::Invalid, &["writes #0 and #13", "same value"]);

    let mut s = script();
    s[0].0.push(ev(9, "z", "", EventOp::Snapshot, 3, "z", 1001));
    assert_caught(
        &check_script(s),
        Kind::Invalid,
        &["SNAPSHOT", "put, delete and emit"],
    );

    let mut w = watch_of("w", Start::Empty, numbered(script()));
    w.resumes.push(Resume {
        first: 2,
        after: Some(2),
    });
    assert_caught(&check(&expected(), &[w]), Kind::Invalid, &["out of order"]);
}

#[test]
fn a_midway_watch_gets_the_stream_checks_only() {
    let mut s = numbered(script());
    s.remove(0);
    for (events, _) in &mut s {
        for e in events.iter_mut().filter(|e| e.slot <= 2) {
            e.seq += 10;
        }
    }
    let report = check(&expected(), &[watch_of("w", Start::Midway, s.clone())]);
    report.assert_ok();
    assert_eq!(report.stats.midway_watches, 1);

    // Its first event per slot may be any, but what follows may not skip.
    s[1].0[0].seq += 1;
    assert_caught(
        &check(&expected(), &[watch_of("w", Start::Midway, s)]),
        Kind::SlotSeq,
        &["slot 1: seq 16 (response 1) follows seq 14"],
    );
}

/// The nemesis delivers tens of thousands of events: 100k check in a few seconds even in a
/// debug build (one pass with hash maps), and the check of a broken one costs no more.
#[test]
fn a_hundred_thousand_events_check_quickly() {
    const ITEMS: u64 = 1000;
    const PER_ITEM: u64 = 100;
    let mut e = Expected {
        settled_ms: u64::MAX,
        ..Expected::default()
    };
    let mut script: Script = Vec::new();
    let mut ts = 1_000;
    for round in 1..=PER_ITEM {
        let mut events = Vec::new();
        for i in 0..ITEMS {
            let (sk, value) = (format!("order-{i}"), format!("v{round}-{i}"));
            ts += 1;
            events.push(put((i % 64) as u32, &sk, round, &value, ts));
            e.writes.push(w_put(&sk, &value, acked(round, ts)));
        }
        script.push((events, ts));
    }
    let watch = watch_of("big", Start::Empty, numbered(script));
    let started = Instant::now();
    let report = check(&e, &[watch]);
    let took = started.elapsed();
    report.assert_ok();
    assert_eq!(report.stats.acked_found, ITEMS * PER_ITEM);
    eprintln!("100k events checked in {took:?}");
    assert!(took.as_secs() < 10, "100k events took {took:?}");
}
