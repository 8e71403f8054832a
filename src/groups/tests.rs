//! The dispatcher, directed: each behaviour a consumer relies on, on a few events; `model.rs`
//! runs random sequences against a model with the invariants checked on every step.

mod model;

use bytes::Bytes;
use ordo_proto::v1::ChangeEvent;

use super::dispatch::{
    lease_ms, Config, Delivery, Dispatcher, Done, How, Mode, Persist, Poison, Refusal, SlotState,
};
use crate::limits::{
    FEED_GROUP_ACK_WAIT_BACKOFF_MAX_MS, FEED_GROUP_CREDITS_MAX, FEED_GROUP_HELD_BYTES_PER_SLOT_MAX,
    FEED_GROUP_HELD_EVENTS_PER_SLOT_MAX, FEED_GROUP_HORIZON_AHEAD,
    FEED_GROUP_INFLIGHT_PER_SLOT_MAX, FEED_GROUP_MEMBERS_MAX, FEED_GROUP_NACK_DELAY_MS_MAX,
};

const WAIT: u64 = 1000;

fn ev(slot: u32, seq: u64, key: &str) -> ChangeEvent {
    ChangeEvent {
        slot,
        seq,
        shard_key: Bytes::from(key.to_string()),
        key: Bytes::from(format!("outbox/{seq}")),
        commit_ts_ms: seq,
        ..Default::default()
    }
}

fn cfg(mode: Mode, max_deliver: u32, poison: Poison) -> Config {
    Config {
        mode,
        ack_wait_ms: WAIT,
        max_deliver,
        poison,
    }
}

fn ordered() -> Config {
    cfg(Mode::KeyOrdered, 5, Poison::Park)
}

/// Takes what the dispatcher has to persist and confirms it all, as the node does once its
/// commands are applied.
fn persist(d: &mut Dispatcher) -> Vec<Persist> {
    let ps = d.take_persist();
    for p in &ps {
        d.persisted(p);
    }
    ps
}

/// A dispatcher over slot 0 holding one event per key in `keys` (seqs from 1), its horizon
/// persisted.
fn holding(config: Config, keys: &[&str]) -> Dispatcher {
    let mut d = Dispatcher::new(config, [(0, SlotState::default())]);
    feed(&mut d, 0, 1, keys);
    d
}

fn feed(d: &mut Dispatcher, slot: u32, first: u64, keys: &[&str]) {
    let events: Vec<ChangeEvent> = (first..)
        .zip(keys)
        .map(|(seq, k)| ev(slot, seq, k))
        .collect();
    d.feed(slot, events, first + keys.len() as u64 - 1);
    persist(d);
}

fn seqs(out: &[Delivery]) -> Vec<u64> {
    out.iter().map(|d| d.event.seq).collect()
}

/// The ack flush of one done event of `slot`, with no skips.
fn one_done(slot: u32, seq: u64, attempt: u32, how: How) -> Persist {
    Persist::AckBatch {
        slot,
        done: vec![Done { seq, attempt, how }],
        skips: vec![],
    }
}
#[test]
fn key_ordered_sends_a_keys_next_event_only_once_the_previous_is_acked() {
    let mut d = holding(ordered(), &["a", "a", "b", "a", "c"]);
    let m1 = d.join("m1", 10).unwrap();
    let m2 = d.join("m2", 10).unwrap();
    let out = d.poll(0);
    // a's second event waits; later events of other keys go, spread over both members.
    assert_eq!(seqs(&out), vec![1, 3, 5]);
    assert!(out.iter().any(|x| x.member == m1) && out.iter().any(|x| x.member == m2));
    assert!(d.poll(0).is_empty());
    // Events read under a persisted horizon wait their key's turn too.
    feed(&mut d, 0, 6, &["a", "d"]);
    assert_eq!(seqs(&d.poll(0)), vec![7]);
    d.ack(0, 1, 1).unwrap();
    // a's next waits until the ack is durable: a failover before the flush would deliver the
    // first again after it.
    assert!(
        d.poll(0).is_empty(),
        "a's next went before its ack was persisted"
    );
    assert!(d.urgent(), "a held-back successor asks for a flush now");
    persist(&mut d);
    assert_eq!(seqs(&d.poll(0)), vec![2]);
    d.ack(0, 3, 1).unwrap();
    persist(&mut d);
    assert!(d.poll(0).is_empty(), "b's ack released nothing of a");
    d.ack(0, 2, 1).unwrap();
    persist(&mut d);
    assert_eq!(seqs(&d.poll(0)), vec![4]);
}

#[test]
fn a_first_delivery_waits_for_its_horizon_to_be_persisted() {
    let mut d = Dispatcher::new(ordered(), [(0, SlotState::default())]);
    d.join("m", 10).unwrap();
    d.feed(0, vec![ev(0, 1, "a")], 1);
    assert!(d.poll(0).is_empty());
    let ps = d.take_persist();
    let horizon = Persist::Horizon {
        slot: 0,
        seq: 1 + FEED_GROUP_HORIZON_AHEAD,
    };
    assert_eq!(ps, vec![horizon.clone()]);
    assert!(
        d.poll(0).is_empty(),
        "sent before its horizon was persisted"
    );
    d.persisted(&horizon);
    let out = d.poll(0);
    assert_eq!((seqs(&out), out[0].attempt), (vec![1], 1));
    // Events under the horizon asked for need no other write.
    d.feed(0, vec![ev(0, 2, "b")], 2);
    assert!(d.take_persist().is_empty());
    assert_eq!(seqs(&d.poll(0)), vec![2]);
}

#[test]
fn credits_bound_what_a_member_gets_and_a_member_without_any_blocks_nobody() {
    let mut d = holding(ordered(), &["a", "b", "c", "d", "e"]);
    let idle = d.join("idle", 0).unwrap();
    let busy = d.join("busy", 2).unwrap();
    let out = d.poll(0);
    assert_eq!(seqs(&out), vec![1, 2]);
    assert!(out.iter().all(|x| x.member == busy));
    d.ack(0, 1, 1).unwrap();
    d.ack(0, 2, 1).unwrap();
    assert!(d.poll(0).is_empty(), "acks are not credits");
    d.credit(idle, 1).unwrap();
    let out = d.poll(0);
    assert_eq!((seqs(&out), out[0].member), (vec![3], idle));
    d.credit(busy, 5).unwrap();
    assert_eq!(seqs(&d.poll(0)), vec![4, 5]);
}

#[test]
fn an_ack_of_a_superseded_attempt_is_refused_and_changes_nothing() {
    let mut d = holding(ordered(), &["a"]);
    d.join("m", 10).unwrap();
    assert_eq!(d.poll(0)[0].attempt, 1);
    assert!(d.poll(WAIT - 1).is_empty());
    assert!(
        d.poll(WAIT).is_empty(),
        "redelivered before its attempt was persisted"
    );
    let count = Persist::DeliveryCount {
        slot: 0,
        seq: 1,
        attempt: 2,
        base: 0,
    };
    assert_eq!(d.take_persist(), vec![count.clone()]);
    assert!(d.poll(WAIT).is_empty());
    d.persisted(&count);
    let out = d.poll(WAIT);
    assert_eq!((seqs(&out), out[0].attempt), (vec![1], 2));
    let before = d.clone();
    let stale = d.ack(0, 1, 1);
    assert_eq!(
        stale,
        Err(Refusal::StaleDelivery {
            slot: 0,
            seq: 1,
            attempt: 1,
            current_attempt: 2
        })
    );
    assert_eq!(d, before, "a refused ack changed something");
    assert!(d.nack(0, 1, 1, 0, WAIT).is_err() && d.in_progress(0, 1, 1, WAIT).is_err());
    assert!(d.term(0, 1, 1).is_err());
    assert_eq!(d, before);
    d.ack(0, 1, 2).unwrap();
    d.ack(0, 1, 2).unwrap();
    let batch = one_done(0, 1, 2, How::Acked);
    assert_eq!(d.take_persist(), vec![batch]);
    // An ack of an event done is idempotent, whatever its attempt.
    assert_eq!(d.ack(0, 1, 1), Ok(()));
}

#[test]
fn leases_double_per_failed_attempt_up_to_the_cap() {
    assert_eq!(lease_ms(30_000, 1, 0), 30_000);
    assert_eq!(lease_ms(30_000, 2, 0), 60_000);
    assert_eq!(lease_ms(30_000, 3, 0), 120_000);
    assert_eq!(lease_ms(30_000, 6, 0), FEED_GROUP_ACK_WAIT_BACKOFF_MAX_MS);
    assert_eq!(
        lease_ms(30_000, u32::MAX, 0),
        FEED_GROUP_ACK_WAIT_BACKOFF_MAX_MS
    );
    // An ack_wait over the cap is kept; an unpark starts the doubling again.
    assert_eq!(lease_ms(1_000_000, 4, 0), 1_000_000);
    assert_eq!(lease_ms(30_000, 4, 3), 30_000);
    // The dispatcher uses them: attempt 2 goes again only after twice ack_wait.
    let mut d = holding(ordered(), &["a"]);
    d.join("m", 10).unwrap();
    d.poll(0);
    d.poll(WAIT);
    persist(&mut d);
    assert_eq!(d.poll(WAIT)[0].attempt, 2);
    d.poll(3 * WAIT - 1);
    assert!(d.take_persist().is_empty(), "attempt 2 expired early");
    d.poll(3 * WAIT);
    persist(&mut d);
    assert_eq!(d.poll(3 * WAIT)[0].attempt, 3);
}

#[test]
fn in_progress_starts_the_lease_again() {
    let mut d = holding(ordered(), &["a"]);
    d.join("m", 10).unwrap();
    d.poll(0);
    d.in_progress(0, 1, 1, 900).unwrap();
    assert_eq!(d.next_timer(), Some(900 + WAIT));
    d.poll(900 + WAIT - 1);
    assert!(d.take_persist().is_empty(), "expired despite its progress");
    d.poll(900 + WAIT);
    assert_eq!(d.take_persist().len(), 1);
}

#[test]
fn a_member_that_leaves_hands_its_events_on_at_once_one_that_vanishes_after_its_lease() {
    let mut d = holding(ordered(), &["a", "a"]);
    let m1 = d.join("m1", 1).unwrap();
    assert_eq!(d.poll(0)[0].member, m1);
    let m2 = d.join("m2", 5).unwrap();
    d.leave(m1).unwrap();
    persist(&mut d);
    let out = d.poll(10);
    assert_eq!(
        (seqs(&out), out[0].attempt, out[0].member),
        (vec![1], 2, m2)
    );
    // m2's stream breaks: it may still be working, so seq 1 waits for its lease.
    d.vanish(m2).unwrap();
    let m3 = d.join("m3", 5).unwrap();
    let end = 10 + lease_ms(WAIT, 2, 0);
    assert!(d.poll(end - 1).is_empty());
    assert!(d.take_persist().is_empty());
    d.poll(end);
    persist(&mut d);
    let out = d.poll(end);
    assert_eq!(
        (seqs(&out), out[0].attempt, out[0].member),
        (vec![1], 3, m3)
    );
    assert_eq!(d.leave(m2), Err(Refusal::UnknownMember(m2)));
}

#[test]
fn a_member_joining_again_under_its_name_replaces_the_old_one() {
    let mut d = holding(ordered(), &["a", "b"]);
    let old = d.join("m", 1).unwrap();
    d.poll(0);
    let new = d.join("m", 1).unwrap();
    assert_ne!(old, new);
    assert_eq!(d.credit(old, 1), Err(Refusal::UnknownMember(old)));
    let out = d.poll(0);
    assert_eq!((seqs(&out), out[0].member), (vec![2], new));
    // The old one's delivery is still in flight until its lease ends (it may be working).
    assert_eq!(d.ack(0, 1, 1), Ok(()));
}

#[test]
fn max_deliver_parks_the_key_while_others_flow_and_unpark_resumes_it_in_sequence() {
    let mut d = holding(cfg(Mode::KeyOrdered, 2, Poison::Park), &["a", "a", "b"]);
    d.join("m", 20).unwrap();
    assert_eq!(seqs(&d.poll(0)), vec![1, 3]);
    d.nack(0, 1, 1, 0, 0).unwrap();
    persist(&mut d);
    assert_eq!(d.poll(0)[0].attempt, 2);
    d.nack(0, 1, 2, 0, 0).unwrap();
    let park = Persist::Park {
        slot: 0,
        shard_key: Bytes::from("a"),
        seq: 1,
    };
    assert_eq!(persist(&mut d), vec![park]);
    assert!(d.poll(0).is_empty(), "a parked key's event went out");
    d.ack(0, 3, 1).unwrap();
    feed(&mut d, 0, 4, &["b"]);
    assert_eq!(seqs(&d.poll(0)), vec![4], "other keys stop flowing");
    assert!(d.unpark(0, b"b").is_err());
    d.unpark(0, b"a").unwrap();
    let ps = persist(&mut d);
    assert_eq!(
        ps[0],
        Persist::Unpark {
            slot: 0,
            shard_key: Bytes::from("a")
        }
    );
    assert_eq!(
        ps[1],
        Persist::DeliveryCount {
            slot: 0,
            seq: 1,
            attempt: 3,
            base: 2
        }
    );
    let out = d.poll(0);
    assert_eq!((seqs(&out), out[0].attempt), (vec![1], 3));
    d.ack(0, 1, 3).unwrap();
    persist(&mut d);
    assert_eq!(seqs(&d.poll(0)), vec![2]);
    assert_eq!(
        d.unpark(0, b"a"),
        Err(Refusal::NotParked {
            slot: 0,
            shard_key: Bytes::from("a")
        })
    );
}

#[test]
fn a_parked_keys_later_events_wait_in_both_modes() {
    // SLOT_EXCLUSIVE has several of a key's events out at once: one parks the key.
    let mut d = holding(cfg(Mode::SlotExclusive, 1, Poison::Park), &["a", "a", "b"]);
    d.join("m", 20).unwrap();
    assert_eq!(seqs(&d.poll(0)), vec![1, 2, 3]);
    d.nack(0, 2, 1, 0, 0).unwrap();
    persist(&mut d);
    feed(&mut d, 0, 4, &["a", "b"]);
    assert_eq!(seqs(&d.poll(0)), vec![5], "a parked key's event went out");
    d.unpark(0, b"a").unwrap();
    persist(&mut d);
    assert_eq!(seqs(&d.poll(0)), vec![2, 4]);
    // KEY_ORDERED after a failover: the parked event was acked in a Txn, the key stays parked.
    let state = SlotState {
        committed: 1,
        parked: vec![(Bytes::from("a"), 1)],
        horizon: 10,
        ..SlotState::default()
    };
    let mut d = Dispatcher::new(ordered(), [(0, state)]);
    d.join("m", 20).unwrap();
    d.feed(0, vec![ev(0, 2, "a"), ev(0, 3, "b")], 3);
    persist(&mut d);
    assert_eq!(seqs(&d.poll(0)), vec![3]);
    d.unpark(0, b"a").unwrap();
    assert_eq!(seqs(&d.poll(0)), vec![2]);
}

#[test]
fn a_slot_has_at_most_its_in_flight_bound_out_and_the_others_keep_flowing() {
    let slots = [(0, SlotState::default()), (1, SlotState::default())];
    let mut d = Dispatcher::new(ordered(), slots);
    let keys: Vec<String> = (0..FEED_GROUP_INFLIGHT_PER_SLOT_MAX + 10)
        .map(|i| format!("k{i}"))
        .collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    feed(&mut d, 0, 1, &keys);
    feed(&mut d, 1, 1, &["x"]);
    d.join("m", FEED_GROUP_CREDITS_MAX).unwrap();
    let out = d.poll(0);
    let of = |slot| out.iter().filter(|x| x.event.slot == slot).count();
    assert_eq!((of(0), of(1)), (FEED_GROUP_INFLIGHT_PER_SLOT_MAX, 1));
    d.ack(0, 1, 1).unwrap();
    let next = FEED_GROUP_INFLIGHT_PER_SLOT_MAX as u64 + 1;
    assert_eq!(seqs(&d.poll(0)), vec![next]);
}

#[test]
fn an_unparked_event_gets_max_deliver_more_attempts() {
    let mut d = holding(cfg(Mode::KeyOrdered, 1, Poison::Park), &["a"]);
    d.join("m", 20).unwrap();
    d.poll(0);
    d.nack(0, 1, 1, 0, 0).unwrap();
    persist(&mut d);
    d.unpark(0, b"a").unwrap();
    persist(&mut d);
    assert_eq!(d.poll(0)[0].attempt, 2);
    d.nack(0, 1, 2, 0, 0).unwrap();
    assert!(matches!(
        persist(&mut d)[..],
        [Persist::Park { seq: 1, .. }]
    ));
}

#[test]
fn dead_letter_goes_on_with_the_keys_next_event_once_the_dead_letter_is_persisted() {
    let mut d = holding(cfg(Mode::KeyOrdered, 1, Poison::DeadLetter), &["a", "a"]);
    d.join("m", 20).unwrap();
    assert_eq!(seqs(&d.poll(0)), vec![1]);
    d.nack(0, 1, 1, 0, 0).unwrap();
    let ps = d.take_persist();
    let batch = one_done(0, 1, 1, How::DeadLettered);
    assert_eq!(ps, vec![batch.clone()]);
    assert!(
        d.poll(0).is_empty(),
        "the next event overtook an unpersisted dead letter"
    );
    d.persisted(&batch);
    assert_eq!(seqs(&d.poll(0)), vec![2]);
}

#[test]
fn the_committed_seq_moves_over_filtered_out_seqs_and_stops_at_the_first_not_done() {
    let mut d = Dispatcher::new(ordered(), [(0, SlotState::default())]);
    d.join("m", 10).unwrap();
    // The group's filter kept seqs 2 and 5 of 1..=7: the others are done as read.
    d.feed(0, vec![ev(0, 2, "a"), ev(0, 5, "b")], 7);
    let skips = vec![(1, 1), (3, 4), (6, 7)];
    let ps = persist(&mut d);
    assert_eq!(
        ps[1],
        Persist::AckBatch {
            slot: 0,
            done: vec![],
            skips
        }
    );
    assert_eq!(seqs(&d.poll(0)), vec![2, 5]);
    d.ack(0, 5, 1).unwrap();
    assert_eq!(d.take_persist(), vec![one_done(0, 5, 1, How::Acked)]);
    // A new leader from that state (committed 1, 3..=7 done) delivers seq 2 only, fenced.
    let state = SlotState {
        committed: 1,
        done: vec![(3, 7)],
        horizon: 2 + FEED_GROUP_HORIZON_AHEAD,
        ..SlotState::default()
    };
    let mut d = Dispatcher::new(ordered(), [(0, state)]);
    d.join("m", 10).unwrap();
    let want = d.wants()[0];
    assert_eq!(want.after_seq, 1);
    d.feed(0, vec![ev(0, 2, "a"), ev(0, 5, "b")], 7);
    let fence = Persist::DeliveryCount {
        slot: 0,
        seq: 2,
        attempt: 2,
        base: 1,
    };
    assert_eq!(persist(&mut d), vec![fence], "done seqs skipped again");
    let out = d.poll(0);
    assert_eq!((seqs(&out), out[0].attempt), (vec![2], 2));
}

#[test]
fn a_new_leader_fences_every_event_the_old_one_may_have_sent() {
    let mut old = holding(ordered(), &["a", "b", "c"]);
    old.join("m", 2).unwrap();
    assert_eq!(seqs(&old.poll(0)), vec![1, 2]);
    old.ack(0, 1, 1).unwrap();
    persist(&mut old);
    let state = SlotState {
        committed: 1,
        horizon: 1 + FEED_GROUP_HORIZON_AHEAD,
        ..SlotState::default()
    };
    let mut d = Dispatcher::new(ordered(), [(0, state)]);
    d.join("m", 10).unwrap();
    d.feed(0, vec![ev(0, 2, "b"), ev(0, 3, "c")], 3);
    let fences: Vec<Persist> = [2, 3]
        .map(|seq| Persist::DeliveryCount {
            slot: 0,
            seq,
            attempt: 2,
            base: 1,
        })
        .into();
    assert_eq!(d.take_persist(), fences);
    assert!(
        d.poll(0).is_empty(),
        "sent before its new attempt was persisted"
    );
    assert!(matches!(d.ack(0, 2, 1), Err(Refusal::StaleDelivery { .. })));
    for p in &fences {
        d.persisted(p);
    }
    let out = d.poll(0);
    assert_eq!(seqs(&out), vec![2, 3]);
    assert!(out.iter().all(|x| x.attempt == 2));
    // Above the old horizon, events go as a first delivery (under a horizon of their own).
    let above = 2 + FEED_GROUP_HORIZON_AHEAD;
    d.feed(0, vec![ev(0, above, "d")], above);
    persist(&mut d);
    assert_eq!(d.poll(0)[0].attempt, 1);
}

#[test]
fn a_parked_key_stays_parked_after_failover() {
    let state = SlotState {
        attempts: vec![(1, 3, 0)],
        parked: vec![(Bytes::from("a"), 1)],
        horizon: 10,
        ..SlotState::default()
    };
    let mut d = Dispatcher::new(cfg(Mode::KeyOrdered, 3, Poison::Park), [(0, state)]);
    d.join("m", 10).unwrap();
    d.feed(0, vec![ev(0, 1, "a"), ev(0, 2, "a"), ev(0, 3, "b")], 3);
    persist(&mut d);
    assert_eq!(seqs(&d.poll(0)), vec![3]);
    d.unpark(0, b"a").unwrap();
    persist(&mut d);
    let out = d.poll(0);
    assert_eq!((seqs(&out), out[0].attempt), (vec![1], 4));
}

#[test]
fn slot_exclusive_leases_whole_slots_and_hands_one_over_only_once_its_member_is_done() {
    let config = cfg(Mode::SlotExclusive, 5, Poison::Park);
    let mut d = Dispatcher::new(config, (0..4).map(|s| (s, SlotState::default())));
    for slot in 0..4 {
        feed(&mut d, slot, 1, &["x", "x"]);
    }
    let m1 = d.join("m1", 100).unwrap();
    let out = d.poll(0);
    // Every slot's events, several of one key in flight, to the one member, in seq order.
    assert_eq!(out.len(), 8);
    assert!(out.iter().all(|x| x.member == m1));
    let m2 = d.join("m2", 100).unwrap();
    for slot in 0..4 {
        feed(&mut d, slot, 3, &["x"]);
    }
    let out = d.poll(0);
    let kept: Vec<u32> = out.iter().map(|x| x.event.slot).collect();
    assert_eq!(kept.len(), 2, "m1 keeps two slots");
    assert!(out.iter().all(|x| x.member == m1));
    // m2's two slots go to it once m1 is done with their events.
    let moved: Vec<u32> = (0..4).filter(|s| !kept.contains(s)).collect();
    d.ack(moved[0], 1, 1).unwrap();
    assert!(
        d.poll(0).is_empty(),
        "handed over while m1 holds one of its events"
    );
    for &slot in &moved {
        for seq in 1..=2 {
            d.ack(slot, seq, 1).unwrap();
        }
    }
    let out = d.poll(0);
    assert_eq!(out.iter().map(|x| x.event.slot).collect::<Vec<_>>(), moved);
    assert!(out.iter().all(|x| x.member == m2 && x.event.seq == 3));
    // m1 leaves: its slots go to m2 with its events at once.
    d.leave(m1).unwrap();
    persist(&mut d);
    let out = d.poll(0);
    assert_eq!(out.len(), 6);
    assert!(out
        .iter()
        .all(|x| x.member == m2 && kept.contains(&x.event.slot)));
}

#[test]
fn a_slot_that_moves_away_drops_its_deliveries_and_comes_back_from_its_state() {
    let mut d = holding(ordered(), &["a", "b"]);
    d.join("m", 10).unwrap();
    d.poll(0);
    d.ack(0, 1, 1).unwrap();
    d.remove_slot(0);
    assert!(
        d.take_persist().is_empty(),
        "a moved slot's acks were persisted here"
    );
    assert_eq!(d.ack(0, 2, 1), Err(Refusal::SlotNotHere { slot: 0 }));
    assert!(d.wants().is_empty() && d.next_timer().is_none());
    let state = SlotState {
        horizon: 2,
        ..SlotState::default()
    };
    d.add_slot(0, state);
    d.feed(0, vec![ev(0, 1, "a"), ev(0, 2, "b")], 2);
    persist(&mut d);
    let out = d.poll(0);
    assert_eq!(seqs(&out), vec![1, 2]);
    assert!(out.iter().all(|x| x.attempt == 2));
}

#[test]
fn requests_over_a_limit_are_refused_naming_it_and_change_nothing() {
    let mut d = holding(ordered(), &["a"]);
    let over = FEED_GROUP_CREDITS_MAX + 1;
    let e = d.join("m", over).unwrap_err();
    assert!(e.to_string().contains("FEED_GROUP_CREDITS_MAX"), "{e}");
    let m = d.join("m", FEED_GROUP_CREDITS_MAX).unwrap();
    d.poll(0);
    let before = d.clone();
    let e = d.credit(m, 2).unwrap_err();
    assert_eq!(
        e,
        Refusal::CreditsOverLimit {
            credits: u64::from(FEED_GROUP_CREDITS_MAX) + 1,
            max: FEED_GROUP_CREDITS_MAX
        }
    );
    let e = d
        .nack(0, 1, 1, FEED_GROUP_NACK_DELAY_MS_MAX + 1, 0)
        .unwrap_err();
    assert!(
        e.to_string().contains("FEED_GROUP_NACK_DELAY_MS_MAX"),
        "{e}"
    );
    assert_eq!(d, before);
    d.ack(0, 1, 1).unwrap();
    for i in 1..FEED_GROUP_MEMBERS_MAX {
        d.join(&format!("m{i}"), 0).unwrap();
    }
    let before = d.clone();
    let e = d.join("one-too-many", 0).unwrap_err();
    assert!(e.to_string().contains("FEED_GROUP_MEMBERS_MAX"), "{e}");
    assert_eq!(d, before);
    d.join("m1", 0).unwrap();
}

#[test]
fn reads_stop_at_the_held_bound() {
    let mut d = Dispatcher::new(
        ordered(),
        [(0, SlotState::default()), (1, SlotState::default())],
    );
    let w = d.wants();
    assert_eq!(w.len(), 2);
    assert_eq!(w[0].events_max, FEED_GROUP_HELD_EVENTS_PER_SLOT_MAX);
    assert_eq!(w[0].bytes_max, FEED_GROUP_HELD_BYTES_PER_SLOT_MAX);
    // One key's events wait behind its first: the slot holds them, up to the bound.
    let keys = vec!["a"; FEED_GROUP_HELD_EVENTS_PER_SLOT_MAX - 1];
    feed(&mut d, 0, 1, &keys);
    assert_eq!(d.wants()[0].events_max, 1);
    feed(&mut d, 0, keys.len() as u64 + 1, &["a"]);
    assert_eq!(
        d.wants().iter().map(|w| w.slot).collect::<Vec<_>>(),
        vec![1]
    );
    let mut big = ev(1, 1, "a");
    big.value = vec![0; FEED_GROUP_HELD_BYTES_PER_SLOT_MAX].into();
    d.feed(1, vec![big], 1);
    assert!(d.wants().is_empty());
    // Done events make room again.
    d.join("m", 10).unwrap();
    persist(&mut d);
    d.poll(0);
    d.ack(0, 1, 1).unwrap();
    assert_eq!(d.wants()[0].events_max, 1);
}

#[test]
fn a_transactional_ack_is_done_even_for_an_attempt_the_dispatcher_gave_up() {
    let mut d = holding(ordered(), &["a", "a"]);
    d.join("m", 10).unwrap();
    d.poll(0);
    d.poll(WAIT);
    let count = d.take_persist();
    // The Txn with attempt 1 applied before the new attempt's command did.
    d.txn_acked(0, 1);
    for p in &count {
        d.persisted(p);
    }
    let out = d.poll(WAIT);
    assert_eq!((seqs(&out), out[0].attempt), (vec![2], 1));
    d.ack(0, 2, 1).unwrap();
    let ps = d.take_persist();
    let Persist::AckBatch { done, .. } = &ps[0] else {
        panic!("{ps:?}")
    };
    assert_eq!(done.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![2]);
}
