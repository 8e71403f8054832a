//! The change feed on a node (issue 13): `Peer.ReadChanges` read from a follower while the leader
//! is killed (every acknowledged write once, in seq order), resolved times advancing with no
//! writes (also after a leader change), and a short retention set by flag (`CursorExpired` with
//! the right oldest seq, and a trim racing a reader never leaves a silent gap).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ordo::limits::COMPACT_LOG_ENTRIES_DEFAULT;
use ordo_proto::v1::peer_client::PeerClient;
use ordo_proto::v1::{
    error_detail, slot_from, txn_op, EmitRequest, ReadChangesRequest, ReadChangesResponse,
    SlotFrom, TxnOp, TxnRequest,
};
use tonic::Streaming;

use ordo_testkit::inproc::{InProcGroup, INPROC_GROUP};
use ordo_testkit::proc::{ProcGroup, PROC_GROUP};
use ordo_testkit::{bins, wait_for, Cluster, Member};

const SETTLE: Duration = Duration::from_secs(60);
const SLOT_COUNT: u32 = ordo::limits::SLOT_COUNT_DEFAULT;
const ORDERS: [&str; 4] = ["order-a", "order-b", "order-c", "order-d"];

fn slot(sk: &str) -> u32 {
    ordo_proto::slot_of(sk.as_bytes(), SLOT_COUNT)
}

fn slots() -> Vec<u32> {
    let mut s: Vec<u32> = ORDERS.iter().map(|o| slot(o)).collect();
    s.sort_unstable();
    s.dedup();
    s
}

/// A `ReadChanges` stream of `slots` from `addr`, each after `after_seq`.
async fn read(
    addr: &str,
    group: u64,
    slots: &[u32],
    after_seq: u64,
    max_events: u32,
) -> Result<Streaming<ReadChangesResponse>, tonic::Status> {
    let mut peer = PeerClient::connect(format!("http://{addr}")).await.unwrap();
    let req = ReadChangesRequest {
        group_id: group,
        slots: slots
            .iter()
            .map(|&slot| SlotFrom {
                slot,
                from: Some(slot_from::From::AfterSeq(after_seq)),
            })
            .collect(),
        max_events,
        ..Default::default()
    };
    Ok(peer.read_changes(req).await?.into_inner())
}

/// The next page of `stream` within `bound` (fails the test on an error or the end).
async fn next(stream: &mut Streaming<ReadChangesResponse>, bound: Duration) -> ReadChangesResponse {
    match tokio::time::timeout(bound, stream.message()).await {
        Ok(Ok(Some(page))) => page,
        other => panic!("no page within {bound:?}: {other:?}"),
    }
}

fn emit(sk: &str, n: u32) -> TxnRequest {
    TxnRequest {
        success: vec![TxnOp {
            op: Some(txn_op::Op::Emit(EmitRequest {
                shard_key: Bytes::copy_from_slice(sk.as_bytes()),
                key: format!("outbox/{n}").into_bytes().into(),
                value: Bytes::from_static(b"paid"),
            })),
        }],
        ..Default::default()
    }
}

/// Writes to `ORDERS` round-robin through `g`'s client: (shard key, version) of every put
/// acknowledged, and (shard key, key) of every emit acknowledged.
async fn write(g: &impl Cluster, from: u32, n: u32) -> (Vec<(String, u64)>, Vec<(String, String)>) {
    let client = g.client().with_timeout(Duration::from_secs(10));
    let (mut puts, mut emits) = (Vec::new(), Vec::new());
    for i in from..from + n {
        let sk = ORDERS[i as usize % ORDERS.len()];
        if i % 5 == 0 {
            if client.txn(emit(sk, i)).await.is_ok() {
                emits.push((sk.to_string(), format!("outbox/{i}")));
            }
        } else if let Ok(r) = client.put(sk, "", format!("v{i}"), None).await {
            puts.push((sk.to_string(), r.version));
        }
    }
    (puts, emits)
}

/// A group of three, its leader and one of its followers (the reader of the tests below).
async fn group_with_a_follower() -> (InProcGroup, Member, Member) {
    let g = InProcGroup::start(3, COMPACT_LOG_ENTRIES_DEFAULT, None)
        .await
        .unwrap();
    let leader = g.wait_leader(INPROC_GROUP, SETTLE).await;
    let reader = g
        .members(INPROC_GROUP)
        .into_iter()
        .find(|m| *m != leader)
        .unwrap();
    (g, leader, reader)
}

/// A follower streams its slots from the start while the leader is killed and writes go on at
/// the next leader: every acknowledged put and emit arrives exactly once, each slot's seqs are
/// dense from 1, and each item's versions arrive in order with none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_streams_every_acknowledged_write_once_in_seq_order_across_a_leader_kill() {
    let (mut g, leader, reader) = group_with_a_follower().await;
    let mut stream = read(&g.addr(reader), INPROC_GROUP, &slots(), 0, 7)
        .await
        .unwrap();
    let (mut puts, mut emits) = write(&g, 0, 40).await;
    g.kill(leader).await;
    let (p2, e2) = write(&g, 40, 40).await;
    puts.extend(p2);
    emits.extend(e2);
    assert!(
        puts.len() >= 40 && !emits.is_empty(),
        "{} puts, {} emits acknowledged",
        puts.len(),
        emits.len()
    );

    let mut seqs: BTreeMap<u32, u64> = BTreeMap::new();
    let mut versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut emitted: Vec<(String, String)> = Vec::new();
    let deadline = Instant::now() + SETTLE;
    let seen_all = |versions: &BTreeMap<String, Vec<u64>>, emitted: &Vec<(String, String)>| {
        puts.iter()
            .all(|(sk, v)| versions.get(sk).is_some_and(|vs| vs.contains(v)))
            && emits.iter().all(|e| emitted.contains(e))
    };
    while !seen_all(&versions, &emitted) {
        assert!(
            Instant::now() < deadline,
            "not every acknowledged write arrived within {SETTLE:?}"
        );
        let page = next(&mut stream, SETTLE).await;
        assert!(page.events.len() <= 7, "pages hold what was asked");
        for ev in page.events {
            let last = seqs.entry(ev.slot).or_insert(0);
            assert_eq!(
                ev.seq,
                *last + 1,
                "slot {}: seqs are dense and in order",
                ev.slot
            );
            *last = ev.seq;
            let sk = String::from_utf8(ev.shard_key.to_vec()).unwrap();
            if ev.key.starts_with(b"outbox/") {
                let e = (sk, String::from_utf8(ev.key.to_vec()).unwrap());
                assert!(!emitted.contains(&e), "an emit arrived twice: {e:?}");
                emitted.push(e);
            } else {
                let vs = versions.entry(sk.clone()).or_default();
                assert_eq!(
                    ev.version,
                    vs.last().copied().unwrap_or(0) + 1,
                    "{sk}: versions in order, none twice"
                );
                vs.push(ev.version);
            }
        }
    }
    g.shutdown().await;
}

/// The resolved time of the pages of `stream` once it goes past `from`, which must happen
/// within a second (with no events: nothing is written).
async fn advances_within_a_second(from: u64, stream: &mut Streaming<ReadChangesResponse>) -> u64 {
    let start = Instant::now();
    loop {
        let left = Duration::from_secs(1).saturating_sub(start.elapsed());
        let page = next(stream, left.max(Duration::from_millis(1))).await;
        assert!(page.events.is_empty(), "nothing was written");
        if page.resolved_ts_ms > from {
            return page.resolved_ts_ms;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "resolved stayed at {from} for a second"
        );
    }
}

/// With no writes, a reader's resolved time advances within a second, and again within a
/// second of a new leader being elected after the old one was killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resolved_times_advance_within_a_second_with_no_writes_also_after_a_leader_kill() {
    let (mut g, leader, reader) = group_with_a_follower().await;
    let mut stream = read(&g.addr(reader), INPROC_GROUP, &slots(), 0, 0)
        .await
        .unwrap();
    let mut resolved = next(&mut stream, SETTLE).await.resolved_ts_ms;
    for _ in 0..3 {
        resolved = advances_within_a_second(resolved, &mut stream).await;
    }
    g.kill(leader).await;
    g.wait_leader(INPROC_GROUP, SETTLE).await;
    // Pages queued before the election may still carry the old value: drain to now.
    let at_election = ordo_proto::unix_ms();
    while resolved < at_election.saturating_sub(5_000) {
        resolved = next(&mut stream, SETTLE).await.resolved_ts_ms;
    }
    advances_within_a_second(resolved, &mut stream).await;
    g.shutdown().await;
}

/// `ordo node --feed-retention-secs 2`: once events are older than that a read from before them
/// is OUT_OF_RANGE with `CursorExpired` naming the slot's oldest seq, and a reader racing the
/// trims sees dense seqs to the end or up to an OUT_OF_RANGE, never a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_retention_by_flag_expires_old_positions_and_never_leaves_a_silent_gap() {
    let mut g = ProcGroup::prepare(bins!(), 3, COMPACT_LOG_ENTRIES_DEFAULT, BTreeMap::new());
    g.args = vec!["--feed-retention-secs".into(), "2".into()];
    g.start_all();
    let m = g.wait_leader(PROC_GROUP, SETTLE).await;
    let client = g.client().with_timeout(Duration::from_secs(10));
    let sk = ORDERS[0];
    let one = [slot(sk)];
    for i in 0..5 {
        client.put(sk, format!("k{i}"), "old", None).await.unwrap();
    }
    // A reader of one event per page, read from again once the trims ran (HTTP/2 lets the
    // node send ahead within its flow-control window, so it may or may not be behind them).
    let mut racing = read(&g.addr(m), PROC_GROUP, &one, 0, 1).await.unwrap();
    assert_eq!(next(&mut racing, SETTLE).await.events[0].seq, 1);
    let expired = |s: &tonic::Status| match ordo_proto::error_detail_of(s) {
        Some(error_detail::Kind::CursorExpired(ce)) if s.code() == tonic::Code::OutOfRange => {
            Some(ce)
        }
        _ => None,
    };
    wait_for("the old events to be trimmed", SETTLE, || async {
        let mut s = match read(&g.addr(m), PROC_GROUP, &one, 0, 0).await {
            Err(e) => return expired(&e).map(|_| ()),
            Ok(s) => s,
        };
        match s.message().await {
            Err(e) => expired(&e).map(|_| ()),
            Ok(_) => None,
        }
    })
    .await;
    for i in 5..8 {
        client.put(sk, format!("k{i}"), "new", None).await.unwrap();
    }
    let err = match read(&g.addr(m), PROC_GROUP, &one, 0, 0).await {
        Err(e) => e,
        Ok(mut s) => s
            .message()
            .await
            .expect_err("a position before the oldest retained"),
    };
    let ce = expired(&err).unwrap_or_else(|| panic!("expected CursorExpired, got {err:?}"));
    assert_eq!(
        (ce.slot, ce.oldest_seq, ce.requested_seq),
        (one[0], 6, 1),
        "{err:?}"
    );
    assert!(ce.oldest_ts_ms > 0);
    let mut fresh = read(&g.addr(m), PROC_GROUP, &one, 5, 0).await.unwrap();
    let seqs: Vec<u64> = next(&mut fresh, SETTLE)
        .await
        .events
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        seqs,
        vec![6, 7, 8],
        "right after the trim point: everything retained"
    );
    // The reader that raced the trims: dense seqs up to the last write, or up to an
    // OUT_OF_RANGE; never a jump.
    let mut last = 1;
    while last < 8 {
        match tokio::time::timeout(SETTLE, racing.message())
            .await
            .expect("a page or an error")
        {
            Ok(Some(page)) => {
                for ev in page.events {
                    assert_eq!(ev.seq, last + 1, "a gap in a reader's stream");
                    last = ev.seq;
                }
            }
            Ok(None) => panic!("the stream ended without an error"),
            Err(e) => {
                assert!(expired(&e).is_some(), "{e:?}");
                break;
            }
        }
    }
}

/// Readers per node are bounded (`FEED_READERS_MAX`, RESOURCE_EXHAUSTED naming it, and a place
/// frees when a reader leaves); another group's request is WRONG_SHARD and a bad slot
/// INVALID_ARGUMENT, both at the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_are_bounded_and_bad_reads_are_refused_at_the_start() {
    use ordo::limits::FEED_READERS_MAX;
    let dir = tempfile::tempdir().unwrap();
    let node = ordo_testkit::inproc::lone_node(dir.path().join("n"), 1).await;
    let addr = node.addr.to_string();
    let mut channels = Vec::new();
    for _ in 0..3 {
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        channels.push(ep.connect().await.unwrap());
    }
    let req = |group: u64, slot: u32| ReadChangesRequest {
        group_id: group,
        slots: vec![SlotFrom {
            slot,
            from: Some(slot_from::From::Now(true)),
        }],
        ..Default::default()
    };
    let open = |i: usize, r: ReadChangesRequest| {
        let mut peer = PeerClient::new(channels[i % channels.len()].clone());
        async move { peer.read_changes(r).await.map(|s| s.into_inner()) }
    };
    let mut streams = Vec::new();
    for i in 0..FEED_READERS_MAX {
        streams.push(open(i, req(1, 0)).await.unwrap());
    }
    let refused = open(0, req(1, 0)).await.expect_err("one reader too many");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused.message().contains("FEED_READERS_MAX (256)"),
        "{refused:?}"
    );
    streams.pop();
    let freed = wait_for("a reader's place to free", SETTLE, || async {
        open(1, req(1, 0)).await.ok()
    })
    .await;
    streams.push(freed);
    drop(streams);
    let wrong = wait_for("the readers to leave", SETTLE, || async {
        match open(2, req(2, 0)).await {
            Err(e) if e.code() == tonic::Code::ResourceExhausted => None,
            other => Some(other),
        }
    })
    .await
    .expect_err("another group's slots");
    assert!(
        matches!(
            ordo_proto::error_detail_of(&wrong),
            Some(error_detail::Kind::WrongShard(_))
        ),
        "{wrong:?}"
    );
    let bad = open(2, req(1, SLOT_COUNT))
        .await
        .expect_err("a slot out of range");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    node.shutdown().await;
}
