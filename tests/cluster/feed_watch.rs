//! The router's `Feed.Watch` over real groups: every write's events arrive once, in per-slot
//! order, across groups and across a slot move; a cursor resumes with exactly the rest; the
//! resolved time advances with nothing written; `ordoctl watch` prints them and its cursor.
//!
//! Ignored on this branch, whose nodes still answer `ReadChanges` with UNIMPLEMENTED; all three
//! pass on a merge with the node side (`feednode` at 996f0dc).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use ordo::proto::v1::watch_request::{Start, StartOneOf};
use ordo::proto::v1::{
    change_event, txn_op, EmitRequest, TxnOp, TxnRequest, WatchRequest, WatchResponse,
};
use ordo_proto::client::{Client, ClusterClient};
use ordo_testkit::inproc::InProcCluster;
use tokio::time::Instant;
use tonic::Streaming;

/// Bound on waiting for events already written.
const WAIT: Duration = Duration::from_secs(60);
const ORDERS: usize = 24;

fn client(pg: &InProcCluster) -> Client {
    Client::connect(vec![pg.router_addr()])
        .unwrap()
        .with_timeout(Duration::from_secs(15))
}

fn watch(start: StartOneOf) -> WatchRequest {
    WatchRequest {
        shard_keys: vec![],
        key_prefix: Bytes::new(),
        start: Some(start),
    }
}

/// Writes version `v` of item `status` of every order.
async fn write_round(c: &Client, v: u64) {
    for o in 0..ORDERS {
        let r = c
            .put(format!("order-{o}"), "status", format!("v{v}"), Some(v - 1))
            .await
            .unwrap();
        assert_eq!(r.version, v);
    }
}

/// Responses until `events` events have come, within [`WAIT`].
async fn read_events(s: &mut Streaming<WatchResponse>, events: usize) -> Vec<WatchResponse> {
    let deadline = Instant::now() + WAIT;
    let (mut out, mut n) = (Vec::new(), 0);
    while n < events {
        let resp = tokio::time::timeout_at(deadline, s.message())
            .await
            .unwrap_or_else(|_| panic!("{n} of {events} events within {WAIT:?}"))
            .expect("watch failed")
            .expect("watch ended");
        n += resp.events.len();
        out.push(resp);
    }
    assert_eq!(n, events, "no event more than written");
    out
}

/// Per (shard key, key) the versions delivered; per slot the seqs, checked dense and in order.
fn check(responses: &[WatchResponse]) -> BTreeMap<(Bytes, Bytes), Vec<u64>> {
    let mut versions: BTreeMap<(Bytes, Bytes), Vec<u64>> = BTreeMap::new();
    let mut seqs: BTreeMap<u32, u64> = BTreeMap::new();
    for e in responses.iter().flat_map(|r| &r.events) {
        if let Some(&last) = seqs.get(&e.slot) {
            assert_eq!(e.seq, last + 1, "slot {}: seq after {last}", e.slot);
        }
        seqs.insert(e.slot, e.seq);
        versions
            .entry((e.shard_key.clone(), e.key.clone()))
            .or_default()
            .push(e.version);
    }
    versions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_sees_every_write_once_in_order_and_resumes_from_any_cursor() {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let pg = InProcCluster::start(2, 3).await;
    let c = client(&pg);
    let mut stream = c
        .watch(watch(StartOneOf::From(Start::FromNow as i32)))
        .await
        .unwrap();
    // The first response positions every slot (no events yet).
    let first = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.events.is_empty(), "{first:?}");
    for v in 1..=3 {
        write_round(&c, v).await;
    }
    let emit = TxnOp {
        op: Some(txn_op::Op::Emit(EmitRequest {
            shard_key: "order-0".into(),
            key: "outbox/paid".into(),
            value: "{}".into(),
        })),
    };
    c.txn(TxnRequest {
        success: vec![emit],
        ..Default::default()
    })
    .await
    .unwrap();
    let responses = read_events(&mut stream, ORDERS * 3 + 1).await;
    let versions = check(&responses);
    for o in 0..ORDERS {
        let item = (
            Bytes::from(format!("order-{o}")),
            Bytes::from_static(b"status"),
        );
        assert_eq!(versions[&item], [1, 2, 3], "order-{o}");
    }
    let outbox = responses
        .iter()
        .flat_map(|r| &r.events)
        .find(|e| e.key == "outbox/paid")
        .expect("the emit's event");
    assert_eq!(outbox.op, change_event::Op::Emit as i32);
    let resolved: Vec<u64> = responses.iter().map(|r| r.resolved_ts_ms).collect();
    assert!(resolved.windows(2).all(|w| w[0] <= w[1]), "{resolved:?}");

    // From the cursor of the middle response: exactly the events after it.
    let mid = responses.len() / 2;
    let after: usize = responses[mid + 1..].iter().map(|r| r.events.len()).sum();
    let mut again = c
        .watch(watch(StartOneOf::Cursor(responses[mid].cursor.clone())))
        .await
        .unwrap();
    let rest = read_events(&mut again, after).await;
    let got: Vec<(u32, u64)> = rest
        .iter()
        .flat_map(|r| &r.events)
        .map(|e| (e.slot, e.seq))
        .collect();
    let mut want: Vec<(u32, u64)> = responses[mid + 1..]
        .iter()
        .flat_map(|r| &r.events)
        .map(|e| (e.slot, e.seq))
        .collect();
    let mut got_sorted = got.clone();
    got_sorted.sort_unstable();
    want.sort_unstable();
    assert_eq!(got_sorted, want);

    // With nothing written the resolved time still moves on (the groups' idle checkpoints,
    // every 250 ms; the bound is loose for a loaded debug build: the node's latency is the feed
    // checker's to prove, this that the router passes it on).
    let last = rest.last().unwrap().resolved_ts_ms;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = tokio::time::timeout_at(deadline, again.message())
            .await
            .expect("the resolved time advanced within 10 s")
            .unwrap()
            .unwrap();
        assert!(resp.events.is_empty());
        if resp.resolved_ts_ms > last {
            break;
        }
    }
    pg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_follows_a_slot_move_with_no_gap_and_no_duplicate() {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let pg = InProcCluster::start(2, 3).await;
    let c = client(&pg);
    write_round(&c, 1).await;
    let mut stream = c
        .watch(watch(StartOneOf::From(Start::FromOldest as i32)))
        .await
        .unwrap();
    let mut responses = read_events(&mut stream, ORDERS).await;
    // Every slot of group 1 moves to group 2 while the writes go on.
    let admin = ClusterClient::connect(vec![pg.router_addr()])
        .unwrap()
        .with_timeout(Duration::from_secs(60));
    let map = admin.get_shard_map(true).await.unwrap();
    let slots: Vec<u32> = (0..map.slot_count)
        .filter(|&s| map.slot_owner[s as usize] == 1)
        .collect();
    let admin2 = admin.clone();
    let mover = tokio::spawn(async move { admin.move_slots(slots, 2).await });
    for v in 2..=4 {
        write_round(&c, v).await;
    }
    match mover.await.unwrap() {
        Ok(_) => {}
        // A retry of the call after its move was done (the move is a task; the call waits).
        Err(e) if e.message().contains("already owns every slot") => {}
        Err(e) => panic!("move: {e:?}"),
    }
    let moved = admin2.get_shard_map(true).await.unwrap();
    assert!(moved.slot_owner.iter().all(|&g| g == 2), "{moved:?}");
    write_round(&c, 5).await;
    responses.extend(read_events(&mut stream, ORDERS * 4).await);
    let versions = check(&responses);
    for o in 0..ORDERS {
        let item = (
            Bytes::from(format!("order-{o}")),
            Bytes::from_static(b"status"),
        );
        assert_eq!(versions[&item], [1, 2, 3, 4, 5], "order-{o}");
    }
    pg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ordoctl_watch_prints_events_and_a_cursor_that_resumes() {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let pg = InProcCluster::start(1, 3).await;
    let c = client(&pg);
    for v in 1..=2 {
        write_round(&c, v).await;
    }
    let router = vec![pg.router_addr()];
    let ordoctl = |args: &[&str]| {
        let (ok, out) =
            ordo_testkit::bins!().ordoctl_within(&router, Duration::from_secs(20), args);
        assert!(ok, "{out}");
        out
    };
    let count = ORDERS.to_string();
    let out = ordoctl(&["watch", "--from", "oldest", "--count", &count, "--json"]);
    let lines: Vec<&str> = out.lines().collect();
    let cursor_line = lines.last().unwrap();
    assert!(cursor_line.starts_with("{\"cursor\":\""), "{out}");
    let cursor = cursor_line
        .trim_start_matches("{\"cursor\":\"")
        .trim_end_matches("\"}");
    let printed = lines.len() - 1;
    assert!(printed >= ORDERS, "{out}");
    // From that cursor: the rest of the 2 × ORDERS events, and nothing printed twice.
    let rest = (2 * ORDERS - printed).to_string();
    let out2 = ordoctl(&["watch", "--from", cursor, "--count", &rest, "--for", "10s"]);
    let lines2: Vec<&str> = out2.lines().filter(|l| !l.starts_with("cursor ")).collect();
    assert_eq!(lines2.len(), 2 * ORDERS - printed, "{out2}");
    assert!(lines2.iter().all(|l| l.contains("  PUT  order-")), "{out2}");
    assert!(
        out2.lines().last().unwrap().starts_with("cursor "),
        "{out2}"
    );
    pg.shutdown().await;
}
