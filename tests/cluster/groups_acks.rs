//! Consumer groups' acks and their limits through a router (issue 14, acceptances 2 and 5): an
//! ack after the event was delivered again is refused and the member is told; `max_deliver`
//! nacks park an order while the others flow, and `Unpark` resumes it in sequence; the
//! dead-letter policy writes the event as `dlq/<group>/<seq>` under its order and goes on; a
//! stopped durable group holds its events past the retention until the protection limit, then
//! describe reports it expired (and the leader's log says so).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ordo_proto::v1::{ChangeEvent, PoisonPolicy, SeekGroupRequest, UnparkRequest};
use ordo_testkit::groups::{
    self, policy, Action, CheckInput, Delivery, MemberOptions, Outcome, Recorder,
};
use ordo_testkit::proc::{ProcCluster, Role};
use ordo_testkit::{bins, wait_for, wait_for_every, Cluster};
use prost::Message as _;
use tokio::time::Instant;

use crate::groups::{
    create_group, describe, feed_client, group_over, join, kv, order, read_log, summary,
    try_read_log, wait_caught_up, write_event, CATCH_UP, HEALTHY,
};

/// A cluster of one shard group (3 nodes, 3 config servers, a router), initialized.
async fn one_group(node_args: &[&str]) -> (ProcCluster, String) {
    let mut c = ProcCluster::start_with_node_args(bins!(), 1, 3, node_args);
    c.init(HEALTHY).await;
    let router = c.router_addr().to_string();
    (c, router)
}

/// The deliveries of order `o` so far, in the order they came.
fn of_order(rec: &Recorder, o: u32) -> Vec<Delivery> {
    let key = order(o);
    rec.deliveries()
        .into_iter()
        .filter(|d| d.shard_key == key)
        .collect()
}

/// Checks everything `rec` holds against the log of `prefix` (as of now), with `done`
/// dead-lettered.
async fn check_all(router: &str, prefix: &str, rec: &Recorder, done: BTreeSet<(u32, u64)>) {
    let log = read_log(router, prefix, ordo_proto::unix_ms()).await;
    let mut input = CheckInput::from_recorder(rec, log);
    input.done_otherwise = done;
    let report = groups::check(&input);
    eprintln!("{prefix}: {report}");
    report.assert_ok_with(&input);
}

/// Acceptance 2, in three parts on one cluster, each its own group over its own prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_acks_are_refused_nacks_park_an_order_and_dead_letters_go_on() {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let started = Instant::now();
    let (_cluster, router) = one_group(&[]).await;
    late_ack_refused(&router).await;
    eprintln!("late ack: {:.1?}", started.elapsed());
    parked_and_unparked(&router).await;
    eprintln!("park: {:.1?}", started.elapsed());
    dead_lettered(&router).await;
    eprintln!("took {:.1?}", started.elapsed());
}

/// A member that never acks gets the event again after `ack_wait`; its ack of the first
/// attempt then is refused, naming the current attempt; the ack of the current one is taken.
async fn late_ack_refused(router: &str) {
    let prefix = "late/";
    create_group(router, group_over("late", prefix, 1_500, 100)).await;
    let rec = Recorder::new();
    let opts = MemberOptions::new("late", "late-0", 8);
    let m = join(router, &opts, &rec, || {
        policy(|_| (Duration::ZERO, Action::Ignore))
    })
    .await;
    write_event(&kv(router), prefix, 0, 1).await;
    let second = wait_for("the event to be delivered again", CATCH_UP, || async {
        of_order(&rec, 0).into_iter().find(|d| d.attempt > 1)
    })
    .await;
    let first = of_order(&rec, 0).remove(0);
    assert_eq!(first.attempt, 1, "{first:?}");
    assert_eq!(first.event(), second.event(), "the same event again");
    m.ack(&first);
    let refused = wait_for("the late ack to be refused", HEALTHY, || async {
        of_order(&rec, 0).remove(0).refused
    })
    .await;
    assert!(
        refused.1 >= second.attempt,
        "refusal {refused:?} of {second:?}"
    );
    // The ack of the latest attempt is taken (a later one may have come meanwhile: ack it too).
    let mut acked = BTreeSet::new();
    wait_for("the current attempt's ack to be taken", CATCH_UP, || {
        let latest = of_order(&rec, 0).pop().unwrap();
        if acked.insert(latest.attempt) {
            m.ack(&latest);
        }
        async {
            let g = describe(router, "late").await.ok()?;
            (g.lag_events == 0 && g.pending == 0).then_some(())
        }
    })
    .await;
    let last = of_order(&rec, 0).pop().unwrap();
    assert_eq!(last.refused, None, "the current attempt's ack: {last:?}");
    m.close().await;
    check_all(router, prefix, &rec, BTreeSet::new()).await;
}

/// A member nacks every attempt of order 0's first event: after `max_deliver` (3) the order is
/// parked (describe names it) and its later events wait, while orders 1-4 are all handled;
/// `Unpark` delivers the event again and the order goes on in sequence.
async fn parked_and_unparked(router: &str) {
    let prefix = "park/";
    create_group(router, group_over("park", prefix, 1_500, 3)).await;
    let rec = Recorder::new();
    let released = Arc::new(AtomicBool::new(false));
    let poison = order(0);
    let opts = MemberOptions::new("park", "park-0", 8);
    let m = join(router, &opts, &rec, || {
        let (released, poison) = (released.clone(), poison.clone());
        policy(move |d| {
            let nack = d.shard_key == poison && !released.load(Ordering::SeqCst);
            let action = if nack {
                Action::Nack { delay_ms: 0 }
            } else {
                Action::Ack
            };
            (Duration::ZERO, action)
        })
    })
    .await;
    let c = kv(router);
    for n in 1..=3 {
        for o in 0..5 {
            write_event(&c, prefix, o, n).await;
        }
    }
    let others_done = || {
        (1..5).all(|o| {
            let ds = of_order(&rec, o);
            ds.len() == 3
                && ds
                    .iter()
                    .all(|d| matches!(d.outcome, Outcome::Acked { .. }))
        })
    };
    let g = wait_for(
        "order 0 to be parked and the others done",
        CATCH_UP,
        || async {
            let g = describe(router, "park").await.ok()?;
            // Order 0's 3 events wait (1 parked, 2 behind it); every other event is done.
            (g.parked == 1 && g.lag_events >= 3 && g.pending == 0 && others_done()).then_some(g)
        },
    )
    .await;
    let parked: Vec<_> = g.slots.iter().flat_map(|s| s.parked.clone()).collect();
    let first = of_order(&rec, 0).remove(0);
    assert_eq!(parked.len(), 1, "{}", summary(&g));
    assert_eq!(parked[0].shard_key, poison);
    assert_eq!((parked[0].seq, parked[0].attempts), (first.seq, 3));
    let tries = of_order(&rec, 0);
    let attempts: Vec<(u64, u32)> = tries.iter().map(|d| (d.seq, d.attempt)).collect();
    assert_eq!(
        attempts,
        vec![(first.seq, 1), (first.seq, 2), (first.seq, 3)],
        "only the parked event was delivered, max_deliver times"
    );
    for o in 1..5 {
        assert_eq!(of_order(&rec, o).len(), 3, "order {o} flowed meanwhile");
    }
    released.store(true, Ordering::SeqCst);
    let req = UnparkRequest {
        group: "park".into(),
        shard_key: poison.clone(),
    };
    let after = feed_client(router)
        .unpark(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.parked, 0, "{}", summary(&after));
    let g = wait_caught_up(router, "park", CATCH_UP).await;
    assert_eq!(g.parked, 0);
    let resumed: Vec<(u64, u32)> = of_order(&rec, 0)[3..]
        .iter()
        .map(|d| (d.seq, d.attempt))
        .collect();
    assert_eq!(
        resumed.len(),
        3,
        "the parked event and the two behind it: {resumed:?}"
    );
    assert_eq!(
        resumed[0],
        (first.seq, 4),
        "delivered again with a new attempt"
    );
    assert!(
        resumed.windows(2).all(|w| w[0].0 < w[1].0),
        "in sequence: {resumed:?}"
    );
    // Unparking it again: nothing is parked there any more.
    let again = feed_client(router).unpark(req).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::NotFound, "{again:?}");
    m.close().await;
    check_all(router, prefix, &rec, BTreeSet::new()).await;
}

/// With `POISON_POLICY_DEAD_LETTER` and `max_deliver` 2, order 0's first event nacked twice is
/// written as `dlq/dlq/<seq>` under order 0 (the event itself) and the order's next events
/// follow.
async fn dead_lettered(router: &str) {
    let prefix = "dead/";
    let mut req = group_over("dlq", prefix, 1_500, 2);
    req.poison = PoisonPolicy::DeadLetter as i32;
    create_group(router, req).await;
    let rec = Recorder::new();
    let poison = order(0);
    let first_key = Bytes::from(format!("{prefix}0001"));
    let opts = MemberOptions::new("dlq", "dlq-0", 8);
    let m = join(router, &opts, &rec, || {
        let (poison, first_key) = (poison.clone(), first_key.clone());
        policy(move |d| {
            let action = if d.shard_key == poison && d.key == first_key {
                Action::Nack { delay_ms: 0 }
            } else {
                Action::Ack
            };
            (Duration::ZERO, action)
        })
    })
    .await;
    let c = kv(router);
    for n in 1..=3 {
        for o in 0..3 {
            write_event(&c, prefix, o, n).await;
        }
    }
    let g = wait_caught_up(router, "dlq", CATCH_UP).await;
    assert_eq!(g.parked, 0, "{}", summary(&g));
    let tries = of_order(&rec, 0);
    let dead = &tries[0];
    assert_eq!(
        tries.iter().map(|d| (d.seq, d.attempt)).collect::<Vec<_>>()[..2],
        [(dead.seq, 1), (dead.seq, 2)],
        "{tries:?}"
    );
    assert!(
        tries[2..].iter().all(|d| d.seq > dead.seq),
        "the order went on after the dead letter: {tries:?}"
    );
    assert_eq!(
        tries.len(),
        4,
        "two attempts, then the order's two next events"
    );
    let item = format!("dlq/dlq/{:020}", dead.seq);
    let got = c.get(poison.clone(), item.clone(), false).await.unwrap();
    assert!(got.found, "the dead letter {item} under {poison:?}");
    let letter = ChangeEvent::decode(got.value).expect("a ChangeEvent");
    assert_eq!(
        (letter.slot, letter.seq, &letter.key, &letter.value),
        (dead.slot, dead.seq, &dead.key, &dead.value),
        "the dead letter is the event"
    );
    m.close().await;
    check_all(router, prefix, &rec, BTreeSet::from([dead.event()])).await;
}

/// Acceptance 5: with a retention of 1 s and a protection of 6 s, a group with no member holds
/// its events past the retention; past the protection they are trimmed, describe reports the
/// group expired and the leader's log warns. A group whose member acked everything is not
/// expired; `SeekGroup` makes the stopped one live again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_group_holds_its_events_until_the_protection_limit_then_expires() {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let started = Instant::now();
    let args = ["--feed-retention-secs", "1", "--feed-protect-secs", "6"];
    let (cluster, router) = one_group(&args).await;
    let prefix = "kept/";
    create_group(&router, group_over("stopped", prefix, 2_000, 100)).await;
    create_group(&router, group_over("live", prefix, 2_000, 100)).await;
    let rec = Recorder::new();
    let opts = MemberOptions::new("live", "live-0", 8);
    let m = join(&router, &opts, &rec, || {
        policy(|_| (Duration::ZERO, Action::Ack))
    })
    .await;
    let c = kv(&router);
    let before = Instant::now();
    for n in 1..=5 {
        write_event(&c, prefix, 0, n).await;
    }
    let written = Instant::now();
    eprintln!("written in {:?}", before.elapsed());
    wait_caught_up(&router, "live", CATCH_UP).await;
    eprintln!(
        "the live group caught up {:?} after the writes",
        written.elapsed()
    );
    // Past the retention (1 s, trims every second), within the protection: all still there.
    tokio::time::sleep_until(written + Duration::from_secs(3)).await;
    let g = describe(&router, "stopped").await.unwrap();
    eprintln!("within the protection: {}", summary(&g));
    assert!(!g.expired && g.lag_events >= 5, "{}", summary(&g));
    let kept = read_log(&router, prefix, ordo_proto::unix_ms()).await;
    assert!(
        written.elapsed() < Duration::from_secs(6),
        "the log was read within the protection limit ({:?}); too slow a machine",
        written.elapsed()
    );
    assert_eq!(
        kept.len(),
        5,
        "the stopped group's events are retained: {kept:?}"
    );
    let g = wait_for("the stopped group to expire", CATCH_UP, || async {
        describe(&router, "stopped")
            .await
            .ok()
            .filter(|g| g.expired)
    })
    .await;
    eprintln!(
        "expired {:?} after the writes: {}",
        before.elapsed(),
        summary(&g)
    );
    // The first event was committed after `before`; the trim runs every second.
    assert!(
        before.elapsed() >= Duration::from_secs(6),
        "expired before the limit"
    );
    assert!(g.slots.iter().any(|s| s.expired), "{}", summary(&g));
    let live = describe(&router, "live").await.unwrap();
    assert!(!live.expired, "{}", summary(&live));
    let warned = cluster
        .procs
        .iter()
        .filter(|p| matches!(p.role, Role::Node { .. }))
        .any(|p| {
            std::fs::read_to_string(&p.log)
                .unwrap_or_default()
                .contains("past the protection limit")
        });
    assert!(warned, "a node's log warns of the expiry");
    // Each event is protected until its own commit is that old: the later ones go in the next
    // trims (every second), the expired group protecting nothing any more.
    // (A watch from the oldest event may be refused while the trims run: OUT_OF_RANGE.)
    wait_for(
        "the stopped group's events to be trimmed",
        HEALTHY,
        || async {
            let log = try_read_log(&router, prefix, ordo_proto::unix_ms()).await;
            log.is_ok_and(|l| l.is_empty()).then_some(())
        },
    )
    .await;
    let seek = SeekGroupRequest {
        group: "stopped".into(),
        to: ordo_proto::v1::watch_request::Start::FromNow as i32,
        after_ts_ms: 0,
    };
    let g = feed_client(&router)
        .seek_group(seek)
        .await
        .unwrap()
        .into_inner();
    assert!(!g.expired, "a seek makes it live again: {}", summary(&g));
    m.close().await;
    eprintln!("took {:.1?}", started.elapsed());
}

/// `max_deliver` counts deliveries, not failovers: an event nobody was ever sent, held by
/// leaders that were killed -9, still reaches a member `max_deliver` times before its order is
/// parked, and describe counts no redelivery of it before the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failovers_alone_use_up_no_attempt_of_an_event_never_delivered() {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let started = Instant::now();
    let (mut cluster, router) = one_group(&[]).await;
    let prefix = "fenced/";
    create_group(&router, group_over("fenced", prefix, 1_000, 2)).await;
    write_event(&kv(&router), prefix, 0, 1).await;
    // Two failovers while the event waits with no member (each new leader finds it below the
    // horizon the previous one persisted on reading it).
    for round in 0..2 {
        // The leader reads a new event and persists its horizon within an ack flush (50 ms)
        // or two; nothing shows the horizon, so wait until the event is 500 ms old.
        wait_for("the event to wait 500 ms", HEALTHY, || async {
            let g = describe(&router, "fenced").await.ok()?;
            (g.slots.iter().map(|s| s.lag_ms).max() >= Some(500)).then_some(())
        })
        .await;
        let leader = cluster.wait_leader(1, HEALTHY).await;
        eprintln!("{:?}: kill -9 {leader}", started.elapsed());
        cluster.kill(leader).await;
        cluster.wait_leader(1, HEALTHY).await;
        cluster.restart(leader).await;
        let g = wait_for("the group to be described again", HEALTHY, || async {
            describe(&router, "fenced").await.ok()
        })
        .await;
        eprintln!("after failover {}: {}", round + 1, summary(&g));
    }
    let g = describe(&router, "fenced").await.unwrap();
    let rec = Recorder::new();
    let opts = MemberOptions::new("fenced", "fenced-0", 8);
    let m = join(&router, &opts, &rec, || {
        policy(|_| (Duration::ZERO, Action::Nack { delay_ms: 0 }))
    })
    .await;
    let parked = wait_for("the order to be parked", CATCH_UP, || async {
        describe(&router, "fenced")
            .await
            .ok()
            .filter(|g| g.parked == 1)
    })
    .await;
    let tries: Vec<u32> = of_order(&rec, 0).iter().map(|d| d.attempt).collect();
    eprintln!(
        "deliveries' attempts {tries:?}; parked: {}",
        summary(&parked)
    );
    m.close().await;
    assert_eq!(
        g.redeliveries,
        0,
        "describe before any delivery counts a redelivery: {}",
        summary(&g)
    );
    assert_eq!(
        tries.len(),
        2,
        "max_deliver 2: the member got the event {} times (attempts {tries:?}) before its order \
         was parked",
        tries.len()
    );
    eprintln!("took {:.1?}", started.elapsed());
}

/// An order's next event goes out only once the previous one's ack is durable: the leader
/// killed -9 right after an order's second event was delivered (its first acked a few ms
/// before) must not hand the first event out again after the second. (It did while the
/// dispatcher made a key's next event ready as soon as an ack was settled in memory.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_right_after_an_ack_redelivers_nothing_out_of_order() {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let started = Instant::now();
    let (mut cluster, router) = one_group(&[]).await;
    let prefix = "seq/";
    create_group(&router, group_over("seq", prefix, 1_000, 100)).await;
    let rec = Recorder::new();
    let second = Bytes::from(format!("{prefix}0002"));
    let first_second = Arc::new(AtomicBool::new(true));
    let opts = MemberOptions::new("seq", "seq-0", 8);
    let m = join(&router, &opts, &rec, || {
        let (second, first_second) = (second.clone(), first_second.clone());
        policy(move |d| {
            // The second event's first delivery is held (the kill comes then); the rest acked.
            let hold = d.key == second && first_second.swap(false, Ordering::SeqCst);
            let action = if hold { Action::Ignore } else { Action::Ack };
            (Duration::ZERO, action)
        })
    })
    .await;
    let leader = cluster.wait_leader(1, HEALTHY).await;
    let c = kv(&router);
    write_event(&c, prefix, 0, 1).await;
    write_event(&c, prefix, 0, 2).await;
    wait_for_every(
        "the second event to be delivered",
        CATCH_UP,
        Duration::from_millis(1),
        || async {
            rec.deliveries()
                .iter()
                .any(|d| d.key == second)
                .then_some(())
        },
    )
    .await;
    let at = rec.now();
    cluster.kill(leader).await;
    eprintln!("{at:?}: kill -9 {leader}");
    cluster.wait_leader(1, HEALTHY).await;
    cluster.restart(leader).await;
    wait_caught_up(&router, "seq", CATCH_UP).await;
    m.close().await;
    let log = read_log(&router, prefix, ordo_proto::unix_ms()).await;
    let mut input = CheckInput::from_recorder(&rec, log);
    input.loss_windows = vec![(at.saturating_sub(Duration::from_secs(1)), rec.now())];
    let report = groups::check(&input);
    eprintln!("{report}");
    report.assert_ok_with(&input);
    eprintln!("took {:.1?}", started.elapsed());
}
