//! `Feed.Watch` against fake replicas serving scripted change logs: the merge, the cursor, and
//! the router following breaks and moves by itself.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use ordo_proto::v1::feed_client::FeedClient;
use ordo_proto::v1::watch_request::{Start, StartOneOf};
use ordo_proto::v1::*;
use prost::Message;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use crate::fakes::*;
use crate::support::*;

async fn feed(router: &ordo_router::Router) -> FeedClient<Channel> {
    FeedClient::connect(format!("http://{}", router.addr))
        .await
        .unwrap()
}

fn watch_from(start: StartOneOf) -> WatchRequest {
    WatchRequest {
        shard_keys: vec![],
        key_prefix: Bytes::new(),
        start: Some(start),
    }
}

fn oldest() -> WatchRequest {
    watch_from(StartOneOf::From(Start::FromOldest as i32))
}

/// What a watcher saw: every response, in order.
#[derive(Default)]
struct Seen {
    responses: Vec<WatchResponse>,
}

impl Seen {
    fn events(&self) -> impl Iterator<Item = &ChangeEvent> {
        self.responses.iter().flat_map(|r| r.events.iter())
    }

    /// Per slot, the seqs delivered, in delivery order.
    fn seqs(&self) -> BTreeMap<u32, Vec<u64>> {
        let mut by_slot: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for e in self.events() {
            by_slot.entry(e.slot).or_default().push(e.seq);
        }
        by_slot
    }
}

/// Reads responses until `done` holds of what was seen, for at most [`WAIT`].
async fn read_until(
    stream: &mut Streaming<WatchResponse>,
    seen: &mut Seen,
    done: impl Fn(&Seen) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    while !done(seen) {
        let next = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("watch stalled; per slot so far: {:?}", seen.seqs()));
        let resp = next.expect("watch failed").expect("watch ended");
        assert!(!resp.cursor.is_empty(), "every response carries a cursor");
        seen.responses.push(resp);
    }
}

/// Until every slot of `want` has delivered up to its seq.
fn reached(want: &BTreeMap<u32, u64>) -> impl Fn(&Seen) -> bool + '_ {
    move |seen| {
        let seqs = seen.seqs();
        want.iter()
            .all(|(slot, &n)| seqs.get(slot).and_then(|s| s.last()) == Some(&n))
    }
}

/// Every slot's seqs are `first..=last` exactly once, in order.
fn assert_contiguous(seen: &Seen, want: &BTreeMap<u32, (u64, u64)>) {
    let seqs = seen.seqs();
    for (slot, &(first, last)) in want {
        let got = seqs.get(slot).cloned().unwrap_or_default();
        assert_eq!(got, (first..=last).collect::<Vec<_>>(), "slot {slot}");
    }
    let extra: Vec<&u32> = seqs.keys().filter(|s| !want.contains_key(s)).collect();
    assert!(extra.is_empty(), "events of unexpected slots {extra:?}");
}

/// Two groups of one replica each; slots 1, 2 (group 1) and 9, 12 (group 2) have events.
async fn two_groups() -> (
    Served<std::sync::Arc<FeedState>>,
    Served<std::sync::Arc<FeedState>>,
) {
    let (g1, g2) = (spawn_feed_node().await, spawn_feed_node().await);
    for (node, slot, n) in [(&g1, 1, 30), (&g1, 2, 7), (&g2, 9, 12), (&g2, 12, 3)] {
        node.state.append(slot, n);
    }
    (g1, g2)
}

#[tokio::test]
async fn the_merge_keeps_per_slot_order_and_any_cursor_resumes_with_exactly_the_rest() {
    let (g1, g2) = two_groups().await;
    g1.state.set_resolved(300);
    g2.state.set_resolved(120);
    let config = spawn_config(map_v(1, &[&g1.addr], &[&g2.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut client = feed(&router).await;

    let want: BTreeMap<u32, u64> = [(1, 30), (2, 7), (9, 12), (12, 3)].into();
    let mut seen = Seen::default();
    let mut stream = client.watch(oldest()).await.unwrap().into_inner();
    read_until(&mut stream, &mut seen, reached(&want)).await;
    assert_contiguous(&seen, &want.iter().map(|(&s, &n)| (s, (1, n))).collect());
    // Each group gave the router its slots from the oldest event, up to the router's page
    // bound.
    for node in [&g1, &g2] {
        let req = &node.state.requests()[0];
        assert_eq!(
            req.max_events as usize,
            ordo_router::FEED_RESPONSE_EVENTS_MAX
        );
        assert!(req
            .slots
            .iter()
            .all(|s| s.from == Some(slot_from::From::Oldest(true))));
    }

    // Resuming from the cursor of any response gives exactly the events after it.
    for i in [0, seen.responses.len() / 2, seen.responses.len() - 1] {
        let before = Seen {
            responses: seen.responses[..=i].to_vec(),
        };
        let cursor = seen.responses[i].cursor.clone();
        let mut again = Seen::default();
        let mut s = client
            .watch(watch_from(StartOneOf::Cursor(cursor)))
            .await
            .unwrap()
            .into_inner();
        let rest: BTreeMap<u32, (u64, u64)> = want
            .iter()
            .filter(|(slot, &n)| before.seqs().get(slot).and_then(|s| s.last()) != Some(&n))
            .map(|(&slot, &n)| {
                let after = before
                    .seqs()
                    .get(&slot)
                    .and_then(|s| s.last().copied())
                    .unwrap_or(0);
                (slot, (after + 1, n))
            })
            .collect();
        if rest.is_empty() {
            // Nothing more: the first response is the resolved time, with no event.
            read_until(&mut s, &mut again, |s| !s.responses.is_empty()).await;
        } else {
            let to: BTreeMap<u32, u64> = rest.iter().map(|(&s, &(_, n))| (s, n)).collect();
            read_until(&mut s, &mut again, reached(&to)).await;
        }
        assert_contiguous(&again, &rest);
    }
}

#[tokio::test]
async fn resolved_is_the_minimum_over_the_groups_and_never_goes_back() {
    let (g1, follower) = two_groups().await;
    // Group 2's first replica (taken for its leader) lags far behind: resolved 10.
    let lagging = spawn_feed_node().await;
    for slot in [9, 12] {
        lagging.state.copy_log(&follower.state, slot);
    }
    lagging.state.set_resolved(10);
    g1.state.set_resolved(300);
    follower.state.set_resolved(120);
    let config = spawn_config(map_v(1, &[&g1.addr], &[&lagging.addr, &follower.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut stream = feed(&router)
        .await
        .watch(oldest())
        .await
        .unwrap()
        .into_inner();
    let mut seen = Seen::default();
    read_until(&mut stream, &mut seen, |s| {
        s.responses.last().is_some_and(|r| r.resolved_ts_ms == 120)
    })
    .await;
    assert!(
        lagging.state.requests().is_empty(),
        "a follower is read first"
    );
    follower.state.set_resolved(500);
    read_until(&mut stream, &mut seen, |s| {
        s.responses.last().is_some_and(|r| r.resolved_ts_ms == 300)
    })
    .await;
    // Each group's first page is held until both have come, and every event so far was in
    // them: none may follow a resolved time at or above its commit time (group 2's are all at
    // or below 120).
    let mut sent = 0;
    for r in &seen.responses {
        for e in &r.events {
            assert!(e.commit_ts_ms > sent, "{e:?} after resolved {sent}");
        }
        sent = sent.max(r.resolved_ts_ms);
    }
    // The follower's stream breaks and it refuses to serve again: the router reads on at the
    // lagging replica, and the resolved time it sent stays.
    follower
        .state
        .refuse
        .lock()
        .unwrap()
        .push_back(Status::unavailable("stopping"));
    follower.state.cut();
    for node in [&follower, &lagging] {
        node.state.append(9, 1);
    }
    g1.state.set_resolved(700);
    read_until(&mut stream, &mut seen, |s| {
        s.seqs()[&9].last() == Some(&13) && s.responses.last().unwrap().resolved_ts_ms == 500
    })
    .await;
    assert_eq!(lagging.state.requests().len(), 1);
    let resolved: Vec<u64> = seen.responses.iter().map(|r| r.resolved_ts_ms).collect();
    assert!(resolved.windows(2).all(|w| w[0] <= w[1]), "{resolved:?}");
    assert_eq!(
        resolved.iter().find(|&&r| r > 0),
        Some(&120),
        "the first resolved time waits for both groups"
    );
    assert_contiguous(
        &seen,
        &[(1, (1, 30)), (2, (1, 7)), (9, (1, 13)), (12, (1, 3))].into(),
    );
}

#[tokio::test]
async fn a_stream_that_breaks_resumes_at_the_next_replica_with_no_gap_and_no_duplicate() {
    let (a, b) = (spawn_feed_node().await, spawn_feed_node().await);
    let g2 = spawn_feed_node().await;
    for slot in [1, 3] {
        a.state.append(slot, 40);
        b.state.copy_log(&a.state, slot);
    }
    // Each replica's first stream breaks after 25 events: b's (a follower, read first) in the
    // middle of slot 1, a's in the middle of slot 3.
    for node in [&a, &b] {
        *node.state.break_after.lock().unwrap() = Some(25);
    }
    let config = spawn_config(map_v(1, &[&a.addr, &b.addr], &[&g2.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut stream = feed(&router)
        .await
        .watch(oldest())
        .await
        .unwrap()
        .into_inner();
    let mut seen = Seen::default();
    let want: BTreeMap<u32, u64> = [(1, 40), (3, 40)].into();
    read_until(&mut stream, &mut seen, reached(&want)).await;
    assert_contiguous(&seen, &[(1, (1, 40)), (3, (1, 40))].into());
    let from = |r: &ReadChangesRequest| -> Vec<(u32, Option<slot_from::From>)> {
        // Slots 1 and 3 of group 1's 0..8 (the others have no events).
        r.slots
            .iter()
            .filter(|s| [1, 3].contains(&s.slot))
            .map(|s| (s.slot, s.from))
            .collect()
    };
    let after = |seq| Some(slot_from::From::AfterSeq(seq));
    let (a_reqs, b_reqs) = (a.state.requests(), b.state.requests());
    assert_eq!(b_reqs.len(), 2, "{b_reqs:?}");
    assert_eq!(a_reqs.len(), 1, "{a_reqs:?}");
    let oldest = Some(slot_from::From::Oldest(true));
    assert_eq!(from(&b_reqs[0]), [(1, oldest), (3, oldest)]);
    assert_eq!(from(&a_reqs[0]), [(1, after(25)), (3, after(0))]);
    assert_eq!(from(&b_reqs[1]), [(1, after(40)), (3, after(10))]);
}

#[tokio::test]
async fn a_moved_slot_continues_at_its_new_owner_from_the_same_seq() {
    let (g1, g2) = (spawn_feed_node().await, spawn_feed_node().await);
    g1.state.append(3, 5);
    g2.state.append(9, 2);
    let config = spawn_config(map_v(1, &[&g1.addr], &[&g2.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut stream = feed(&router)
        .await
        .watch(oldest())
        .await
        .unwrap()
        .into_inner();
    let mut seen = Seen::default();
    read_until(&mut stream, &mut seen, reached(&[(3, 5), (9, 2)].into())).await;

    // Slot 3 moves to group 2, which holds its log and three events more. The router hears of
    // it only from group 1 (`moved`), so it must fetch the map itself; group 2 does not serve
    // the slot at first (WrongShard), so the router asks again after a backoff.
    g2.state.copy_log(&g1.state, 3);
    g2.state.append(3, 3);
    let mut moved = map_v(2, &[&g1.addr], &[&g2.addr]);
    moved.slot_owner[3] = 2;
    config.state.set_map(moved, false);
    g2.state.refuse.lock().unwrap().push_back(wrong_shard(1));
    g1.state.set_moved(3);
    read_until(&mut stream, &mut seen, reached(&[(3, 8), (9, 2)].into())).await;
    assert_contiguous(&seen, &[(3, (1, 8)), (9, (1, 2))].into());
    assert!(
        config
            .state
            .linearizable_gets
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
    );
    let reqs = g2.state.requests();
    assert_eq!(
        reqs.len(),
        3,
        "the first stream, the refused one, the one with slot 3"
    );
    for r in &reqs[1..] {
        let s3 = r
            .slots
            .iter()
            .find(|s| s.slot == 3)
            .expect("slot 3 asked of group 2");
        assert_eq!(s3.from, Some(slot_from::From::AfterSeq(5)));
    }
}

#[tokio::test]
async fn corrupt_cursors_are_refused_naming_why() {
    let (g1, g2) = two_groups().await;
    let config = spawn_config(map_v(1, &[&g1.addr], &[&g2.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut client = feed(&router).await;
    let mut stream = client.watch(oldest()).await.unwrap().into_inner();
    let good = stream.message().await.unwrap().unwrap().cursor;
    let mut bad = good.to_vec();
    bad[2] ^= 0x01;
    for (cursor, why) in [
        (Bytes::from(bad), "checksum mismatch"),
        (good.slice(..good.len() - 1), "checksum mismatch"),
        (Bytes::from_static(b"\x07abcd"), "cursor version 7"),
        (Bytes::new(), "shorter than any cursor"),
    ] {
        let err = client
            .watch(watch_from(StartOneOf::Cursor(cursor)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(why), "{err:?}");
    }
}

#[tokio::test]
async fn cursor_expired_passes_through_as_out_of_range_with_its_detail() {
    let (g1, g2) = two_groups().await;
    let detail = error_detail::CursorExpired {
        slot: 9,
        oldest_seq: 40,
        oldest_ts_ms: 400,
        requested_seq: 13,
    };
    g2.state
        .refuse
        .lock()
        .unwrap()
        .push_back(ordo_proto::status::with_detail(
            Code::OutOfRange,
            "slot 9 holds seq 40 and later",
            error_detail::Kind::CursorExpired(detail),
        ));
    let config = spawn_config(map_v(1, &[&g1.addr], &[&g2.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut stream = feed(&router)
        .await
        .watch(oldest())
        .await
        .unwrap()
        .into_inner();
    let err = tokio::time::timeout(WAIT, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("watch ended without the error"),
                Err(status) => break status,
            }
        }
    })
    .await
    .expect("the error arrives");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert_eq!(err.message(), "slot 9 holds seq 40 and later");
    assert_eq!(
        ordo_proto::error_detail_of(&err),
        Some(error_detail::Kind::CursorExpired(detail))
    );
    assert!(!ordo_proto::certainly_not_applied(&err));
    assert_eq!(g2.state.requests().len(), 1, "never retried");
}

#[tokio::test]
async fn a_slow_client_makes_the_router_stop_reading_not_buffer() {
    let (g1, g2) = (spawn_feed_node().await, spawn_feed_node().await);
    const VALUE: usize = 64 * 1024;
    *g1.state.endless.lock().unwrap() = Some((1, Bytes::from(vec![7u8; VALUE])));
    let config = spawn_config(map_v(1, &[&g1.addr], &[&g2.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut stream = feed(&router)
        .await
        .watch(oldest())
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(!first.events.is_empty());
    assert!(first.encoded_len() <= ordo_router::FEED_RESPONSE_BYTES_MAX + 1024);

    // The client reads nothing more: what the node has sent levels off.
    let sent = || {
        g1.state
            .events_sent
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let deadline = Instant::now() + WAIT;
    let (mut last, mut steady) = (sent(), 0);
    while steady < 10 {
        assert!(
            Instant::now() < deadline,
            "the router kept reading: {} events",
            sent()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = sent();
        steady = if now == last { steady + 1 } else { 0 };
        last = now;
    }
    let held = last * VALUE;
    eprintln!(
        "a stalled watch held {last} events ({} MiB) between node and client",
        held >> 20
    );
    // The flow-control windows and socket buffers of two connections and a page or two each
    // side; an unbounded buffer would take the endless log.
    assert!(held <= 48 << 20, "{last} events sent to a stalled watch");

    // Reading again takes up where it stopped, with nothing lost.
    let mut seen = Seen {
        responses: vec![first],
    };
    let more = last as u64 + 100;
    read_until(&mut stream, &mut seen, |s| {
        s.seqs()[&1].len() as u64 >= more
    })
    .await;
    let seqs = &seen.seqs()[&1];
    assert!(seqs.iter().enumerate().all(|(i, &s)| s == i as u64 + 1));
}

#[tokio::test]
async fn watches_past_feed_watches_max_are_refused_until_one_closes() {
    let (g1, g2) = two_groups().await;
    let config = spawn_config(map_v(1, &[&g1.addr], &[&g2.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    // A connection carries at most STREAMS_PER_CONNECTION_MAX streams: spread them.
    let per_conn = ordo_proto::serve::STREAMS_PER_CONNECTION_MAX as usize / 2;
    let mut clients = Vec::new();
    let mut open = Vec::new();
    for i in 0..ordo_router::FEED_WATCHES_MAX {
        if i % per_conn == 0 {
            clients.push(feed(&router).await);
        }
        let client = clients.last_mut().unwrap();
        open.push(client.watch(oldest()).await.unwrap().into_inner());
    }
    let mut extra = feed(&router).await;
    let err = extra.watch(oldest()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("FEED_WATCHES_MAX"), "{err:?}");
    assert!(
        err.message()
            .contains(&ordo_router::FEED_WATCHES_MAX.to_string()),
        "{err:?}"
    );
    // A watch that closes gives its permit back.
    drop(open.pop());
    let deadline = Instant::now() + WAIT;
    let mut again = loop {
        match extra.watch(oldest()).await {
            Ok(s) => break s.into_inner(),
            Err(e) if e.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    let first = tokio::time::timeout(WAIT, again.message()).await.unwrap();
    assert!(!first.unwrap().unwrap().events.is_empty());
}
