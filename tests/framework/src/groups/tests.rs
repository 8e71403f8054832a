//! The consumer-group checker on synthetic histories: a clean one passes, and each rule catches
//! the history that breaks it (and only the rules it breaks).

use std::time::Duration;

use bytes::Bytes;
use ordo_proto::v1::ChangeEvent;

use super::check::STREAM_LOSS_GRACE;
use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Event `seq` of order `order` (one slot per order: slot = order).
fn ev(order: u32, seq: u64) -> ChangeEvent {
    ChangeEvent {
        slot: order,
        seq,
        shard_key: Bytes::from(format!("order-{order}")),
        key: Bytes::from(format!("outbox/{seq}")),
        version: 1,
        value: Bytes::from(format!("{order}:{seq}")),
        ..ChangeEvent::default()
    }
}

/// A delivery of `e` to `member` at `at` ms, attempt `attempt`, ending with `outcome`.
fn d(member: &str, e: &ChangeEvent, attempt: u32, at: u64, outcome: Outcome) -> Delivery {
    let mut d = Delivery::of(member, e, attempt, ms(at));
    d.outcome = outcome;
    d
}

fn acked(at: u64) -> Outcome {
    Outcome::Acked { at: ms(at) }
}

fn input(log: Vec<ChangeEvent>, deliveries: Vec<Delivery>) -> CheckInput {
    CheckInput {
        deliveries,
        log,
        ..CheckInput::default()
    }
}

/// The rules `input` breaks.
fn broken(input: &CheckInput) -> Vec<Rule> {
    let r = check(input);
    eprintln!("{r}");
    r.counts.keys().copied().collect()
}

/// Two orders, three events each, shared by two members, each acked before the next.
fn clean() -> CheckInput {
    let mut ds = Vec::new();
    for order in 0..2u32 {
        for seq in 1..=3u64 {
            let at = seq * 100 + u64::from(order) * 10;
            let m = if (seq + u64::from(order)) % 2 == 0 {
                "a"
            } else {
                "b"
            };
            ds.push(d(m, &ev(order, seq), 1, at, acked(at + 50)));
        }
    }
    let log = (0..2)
        .flat_map(|o| (1..=3).map(move |s| ev(o, s)))
        .collect();
    input(log, ds)
}

#[test]
fn a_clean_history_passes() {
    let r = check(&clean());
    assert!(r.is_ok(), "{r}");
    assert_eq!((r.events, r.deliveries, r.members), (6, 6, 2));
}

#[test]
fn the_next_event_of_an_order_before_the_previous_ack_is_two_in_flight() {
    let mut i = clean();
    // Order 0's seq 2 reaches b at 140, before a acked seq 1 (at 150): also a wrong ack order
    // is not claimed, since b acks it later.
    i.deliveries[1].delivered_at = ms(140);
    assert_eq!(broken(&i), vec![Rule::InFlight]);
}

#[test]
fn a_delivery_ends_with_a_later_attempt_and_with_its_members_death() {
    let e = ev(0, 1);
    let e2 = ev(0, 2);
    // a never answers; after its lease the event goes to b (attempt 2), which acks; then c
    // dies holding seq 2, which d gets next.
    let ds = vec![
        d("a", &e, 1, 100, Outcome::Ignored),
        d("b", &e, 2, 200, acked(250)),
        d("c", &e2, 1, 300, Outcome::Died { at: ms(320) }),
        d("d", &e2, 2, 400, acked(410)),
    ];
    let i = input(vec![e.clone(), e2.clone()], ds.clone());
    assert_eq!(broken(&i), vec![]);
    // e got seq 3 while c still held seq 2: two in flight, and seq 2 then went out after 3.
    let mut early = ds;
    early.push(d("e", &ev(0, 3), 1, 310, acked(420)));
    let i = input(vec![e, e2, ev(0, 3)], early);
    assert_eq!(broken(&i), vec![Rule::InFlight, Rule::Order]);
}

#[test]
fn a_stream_end_closes_what_the_member_held() {
    let (e1, e2) = (ev(0, 1), ev(0, 2));
    // a never answers seq 1 (given up on elsewhere: done otherwise), b gets seq 2 at 200.
    let ds = vec![
        d("a", &e1, 1, 100, Outcome::Ignored),
        d("b", &e2, 1, 200, acked(210)),
    ];
    let mut i = input(vec![e1, e2], ds);
    i.done_otherwise.insert((0, 1));
    assert_eq!(broken(&i), vec![Rule::InFlight]);
    // a's stream ended at 150: it held nothing after that.
    i.ends.push(StreamEnd {
        member: "a".into(),
        incarnation: 1,
        at: ms(150),
        status: None,
    });
    assert_eq!(broken(&i), vec![]);
}

#[test]
fn an_event_delivered_again_after_its_ack_is_a_redelivery_unless_the_ack_may_be_lost() {
    let e = ev(0, 1);
    let ds = vec![
        d("a", &e, 1, 100, acked(110)),
        d("b", &e, 2, 5_000, acked(5_010)),
    ];
    let mut i = input(vec![e.clone()], ds);
    assert_eq!(broken(&i), vec![Rule::Redelivery]);
    // A kill of the group's leader around the ack: it may have been lost.
    i.loss_windows.push((ms(0), ms(1_000)));
    assert_eq!(broken(&i), vec![]);
    // Or the ack was refused (its attempt was stale already).
    i.loss_windows.clear();
    i.deliveries[0].refused = Some((ms(120), 2));
    assert_eq!(broken(&i), vec![]);
    // Or a's stream ended right after it.
    i.deliveries[0].refused = None;
    i.ends.push(StreamEnd {
        member: "a".into(),
        incarnation: 1,
        at: ms(110) + STREAM_LOSS_GRACE / 2,
        status: Some("Unavailable: gone".into()),
    });
    assert_eq!(broken(&i), vec![]);
}

#[test]
fn an_applied_transactional_ack_is_never_followed_by_another_delivery() {
    let e = ev(0, 1);
    let done = Outcome::Txn {
        at: ms(110),
        outcome: TxnOutcome::Applied,
    };
    let ds = vec![d("a", &e, 1, 100, done), d("b", &e, 2, 5_000, acked(5_010))];
    let mut i = input(vec![e], ds);
    i.loss_windows.push((ms(0), ms(10_000)));
    assert_eq!(broken(&i), vec![Rule::Redelivery]);
    // A refused one is no ack: the redelivery is right.
    i.deliveries[0].outcome = Outcome::Txn {
        at: ms(110),
        outcome: TxnOutcome::Refused { current_attempt: 2 },
    };
    assert_eq!(broken(&i), vec![]);
}

#[test]
fn an_event_nobody_acked_is_reported_unless_done_otherwise() {
    let e = ev(0, 1);
    let nacks = vec![
        d("a", &e, 1, 100, Outcome::Nacked { at: ms(110) }),
        d("a", &e, 2, 200, Outcome::Nacked { at: ms(210) }),
    ];
    let mut i = input(vec![e.clone(), ev(0, 2)], nacks);
    i.deliveries.push(d("a", &ev(0, 2), 1, 300, acked(310)));
    assert_eq!(broken(&i), vec![Rule::Unacked]);
    i.done_otherwise.insert((0, 1));
    assert_eq!(broken(&i), vec![]);
    // A transactional ack whose answer never came may have applied: not reported.
    let unknown = Outcome::Txn {
        at: ms(110),
        outcome: TxnOutcome::Unknown,
    };
    let i = input(vec![e.clone()], vec![d("a", &e, 1, 100, unknown)]);
    assert_eq!(broken(&i), vec![]);
    // An ack sent after a later attempt was out is superseded: it does not count.
    let late = vec![
        d("a", &e, 1, 100, acked(300)),
        d("b", &e, 2, 200, Outcome::Died { at: ms(250) }),
    ];
    assert!(broken(&input(vec![e], late)).contains(&Rule::Unacked));
}

#[test]
fn an_order_delivered_or_acked_out_of_sequence_is_reported() {
    let (e1, e2) = (ev(0, 1), ev(0, 2));
    // seq 2 first, then seq 1: delivered out of order, and acked out of order.
    let ds = vec![
        d("a", &e2, 1, 100, acked(110)),
        d("b", &e1, 1, 200, acked(210)),
    ];
    assert_eq!(broken(&input(vec![e1, e2], ds)), vec![Rule::Order]);
}

#[test]
fn attempts_must_grow_per_event() {
    let e = ev(0, 1);
    let ds = vec![
        d("a", &e, 2, 100, Outcome::Died { at: ms(150) }),
        d("b", &e, 2, 200, acked(210)),
    ];
    assert_eq!(broken(&input(vec![e], ds)), vec![Rule::Attempts]);
}

#[test]
fn a_delivery_outside_the_log_or_unlike_its_event_is_stray() {
    let e = ev(0, 1);
    let mut changed = e.clone();
    changed.value = Bytes::from_static(b"other");
    let ds = vec![d("a", &changed, 1, 100, acked(110))];
    assert_eq!(broken(&input(vec![e.clone()], ds)), vec![Rule::Stray]);
    let ds = vec![
        d("a", &e, 1, 100, acked(110)),
        d("a", &ev(5, 1), 1, 200, acked(210)),
    ];
    assert_eq!(broken(&input(vec![e.clone()], ds)), vec![Rule::Stray]);
    let mut i = input(vec![e.clone()], vec![d("a", &e, 1, 100, acked(110))]);
    i.notes
        .push("member a: refused an attempt it never had".into());
    assert_eq!(broken(&i), vec![Rule::Stray]);
}

#[test]
fn the_report_keeps_a_few_violations_per_rule_and_counts_all() {
    let log: Vec<ChangeEvent> = (1..=20).map(|s| ev(0, s)).collect();
    let r = check(&input(log, vec![]));
    assert_eq!(r.counts[&Rule::Unacked], 20);
    assert_eq!(r.of(Rule::Unacked).len(), 5);
    assert!(r.to_string().contains("never acked"), "{r}");
}
