//! A smoke test of consumer groups through the router (`Feed` group RPCs) over two real shard
//! groups: a create covers every slot, a member granting one credit at a time gets every
//! event of both groups, each order's in version order, its acks drain the lag, and a delete
//! ends the member's stream with NOT_FOUND. Crashes, moves, poison and transactional acks are
//! the consumer-group acceptance tests'.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ordo_proto::client::Client;
use ordo_proto::v1::consume_request::Msg;
use ordo_proto::v1::feed_client::FeedClient;
use ordo_proto::v1::watch_request::Start;
use ordo_proto::v1::{
    Ack, ConsumeRequest, CreateGroupRequest, Credit, DeleteGroupRequest, DescribeGroupRequest,
    Join, ListGroupsRequest,
};
use ordo_testkit::inproc::InProcCluster;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Code;

/// Bound on anything that should happen within a few ack flushes.
const WAIT: Duration = Duration::from_secs(60);
const ORDERS: usize = 8;
const VERSIONS: u64 = 3;

/// Writes [`VERSIONS`] versions of item `status` of [`ORDERS`] orders, half of them in each
/// shard group.
async fn write_orders(pg: &InProcCluster) {
    let map = pg.router.shard_map();
    let owner =
        |k: &str| map.slot_owner[ordo_proto::slot_of(k.as_bytes(), map.slot_count) as usize];
    let groups: BTreeSet<u64> = map.slot_owner.iter().copied().collect();
    assert_eq!(groups.len(), 2, "two shard groups own slots");
    let orders: Vec<String> = groups
        .iter()
        .flat_map(|&g| {
            (0..)
                .map(|i| format!("order-{i}"))
                .filter(move |k| owner(k) == g)
                .take(ORDERS / 2)
        })
        .collect();
    let client = Client::connect(vec![pg.router_addr()])
        .unwrap()
        .with_timeout(Duration::from_secs(15));
    for v in 1..=VERSIONS {
        for order in &orders {
            client
                .put(order.clone(), "status", format!("v{v}"), Some(v - 1))
                .await
                .unwrap();
        }
    }
}

/// Until the group has nothing left to deliver and nothing in flight, before `deadline`.
async fn until_drained(feed: &mut FeedClient<tonic::transport::Channel>, deadline: Instant) {
    loop {
        let describe = DescribeGroupRequest {
            group: "smoke".into(),
        };
        let g = feed.describe_group(describe).await.unwrap().into_inner();
        if g.lag_events == 0 && g.pending == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "lag {} pending {}",
            g.lag_events,
            g.pending
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_member_through_the_router_gets_every_event_in_order_and_its_acks_drain_the_lag() {
    let pg = InProcCluster::start(2, 1).await;
    let router = format!("http://{}", pg.router_addr());
    let mut feed = FeedClient::connect(router.clone()).await.unwrap();
    let create = CreateGroupRequest {
        group: "smoke".into(),
        key_prefix: "status".into(),
        from: Start::FromNow as i32,
        ..Default::default()
    };
    let group = feed.create_group(create).await.unwrap().into_inner();
    let slot_count = pg.router.shard_map().slot_count;
    assert_eq!(
        group.slots.len(),
        slot_count as usize,
        "every slot holds the group"
    );
    assert_eq!(group.ack_wait_ms, 30_000, "the node filled the default in");

    write_orders(&pg).await;

    let (tx, rx) = mpsc::channel(64);
    let join = Join {
        group: "smoke".into(),
        member: "m1".into(),
        credits: 1,
    };
    tx.send(ConsumeRequest {
        msg: Some(Msg::Join(join)),
    })
    .await
    .unwrap();
    let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut stream = feed.consume(requests).await.unwrap().into_inner();
    let mut versions: BTreeMap<Vec<u8>, Vec<u64>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    while seen.len() < ORDERS * VERSIONS as usize {
        let next = tokio::time::timeout_at(deadline, stream.message()).await;
        let resp = next
            .unwrap_or_else(|_| {
                panic!(
                    "{} of {} events within {WAIT:?}",
                    seen.len(),
                    ORDERS * VERSIONS as usize
                )
            })
            .expect("the member's stream failed")
            .expect("the member's stream ended");
        let e = resp.event.expect("a delivery");
        assert!(
            seen.insert((e.slot, e.seq)),
            "{}/{} delivered twice",
            e.slot,
            e.seq
        );
        versions
            .entry(e.shard_key.to_vec())
            .or_default()
            .push(e.version);
        let ack = Ack {
            slot: e.slot,
            seq: e.seq,
            attempt: resp.attempt,
        };
        for msg in [Msg::Ack(ack), Msg::Credit(Credit { credits: 1 })] {
            tx.send(ConsumeRequest { msg: Some(msg) }).await.unwrap();
        }
    }
    assert_eq!(versions.len(), ORDERS);
    for (order, v) in &versions {
        assert_eq!(v, &(1..=VERSIONS).collect::<Vec<_>>(), "{order:?}");
    }

    // The acks are flushed: nothing is left to deliver or in flight.
    until_drained(&mut feed, deadline).await;
    let list = feed.list_groups(ListGroupsRequest {}).await.unwrap();
    let names: Vec<String> = list
        .into_inner()
        .groups
        .into_iter()
        .map(|g| g.group)
        .collect();
    assert_eq!(names, ["smoke"]);

    let delete = DeleteGroupRequest {
        group: "smoke".into(),
    };
    assert!(
        feed.delete_group(delete)
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    let end = tokio::time::timeout_at(deadline, stream.message()).await;
    let err = end.expect("the member's stream ends").unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let describe = DescribeGroupRequest {
        group: "smoke".into(),
    };
    let err = feed.describe_group(describe).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    drop(tx);
    pg.shutdown().await;
}

/// A member's stream, straight to the router or through a relay the test can cut.
struct Member {
    tx: mpsc::Sender<ConsumeRequest>,
    rx: tonic::Streaming<ordo_proto::v1::ConsumeResponse>,
}

async fn join(addr: &str, group: &str, member: &str) -> Member {
    let mut feed = FeedClient::connect(format!("http://{addr}")).await.unwrap();
    let (tx, rx) = mpsc::channel(8);
    let join = Join {
        group: group.into(),
        member: member.into(),
        credits: 1,
    };
    tx.send(ConsumeRequest {
        msg: Some(Msg::Join(join)),
    })
    .await
    .unwrap();
    let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
    let rx = feed.consume(requests).await.unwrap().into_inner();
    Member { tx, rx }
}

/// The next delivery's (shard key, attempt), within `bound`.
async fn delivery(m: &mut Member, bound: Duration) -> (Vec<u8>, u32) {
    let next = tokio::time::timeout(bound, m.rx.message()).await;
    let resp = next
        .unwrap_or_else(|_| panic!("no delivery within {bound:?}"))
        .unwrap()
        .unwrap();
    let e = resp.event.expect("a delivery");
    (e.shard_key.to_vec(), resp.attempt)
}

/// A TCP relay to `to` for one connection; aborting the task cuts it.
async fn relay(to: &str) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let to = to.to_string();
    let task = tokio::spawn(async move {
        let (mut inbound, _) = listener.accept().await.unwrap();
        let mut outbound = tokio::net::TcpStream::connect(to).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
    });
    (addr, task)
}

#[tokio::test]
async fn a_closed_member_hands_its_event_on_at_once_a_vanished_one_only_after_its_lease() {
    let pg = InProcCluster::start(2, 1).await;
    let router = pg.router_addr();
    let mut feed = FeedClient::connect(format!("http://{router}"))
        .await
        .unwrap();
    // "slow" holds a delivery a minute, "fast" two seconds.
    for (group, ack_wait_ms) in [("slow", 60_000), ("fast", 2_000)] {
        let create = CreateGroupRequest {
            group: group.into(),
            from: Start::FromNow as i32,
            ack_wait_ms,
            ..Default::default()
        };
        feed.create_group(create).await.unwrap();
    }
    let client = Client::connect(vec![router.clone()])
        .unwrap()
        .with_timeout(Duration::from_secs(15));
    client.put("order-1", "status", "v1", None).await.unwrap();

    // A member that closes its stream: the other member gets the event well within the
    // minute its lease would have held it.
    let mut a = join(&router, "slow", "a").await;
    let (key, first) = delivery(&mut a, WAIT).await;
    assert_eq!(key, b"order-1");
    let mut b = join(&router, "slow", "b").await;
    let Member { tx, mut rx } = a;
    drop(tx);
    let end = tokio::time::timeout(WAIT, rx.message()).await.unwrap();
    assert!(matches!(end, Ok(None)), "a's stream ends cleanly: {end:?}");
    let (key, again) = delivery(&mut b, Duration::from_secs(30)).await;
    assert_eq!(key, b"order-1");
    assert!(again > first, "a new attempt: {again} after {first}");

    // A member that vanishes: its lease runs out first.
    let (relayed, cut) = relay(&router).await;
    let mut c = join(&relayed, "fast", "c").await;
    let (_, first) = delivery(&mut c, WAIT).await;
    let delivered = Instant::now();
    let mut d = join(&router, "fast", "d").await;
    cut.abort();
    let (key, again) = delivery(&mut d, WAIT).await;
    assert_eq!(key, b"order-1");
    assert!(again > first, "a new attempt: {again} after {first}");
    let waited = delivered.elapsed();
    assert!(
        waited >= Duration::from_millis(1_500),
        "redelivered after {waited:?}, not its lease"
    );
    drop((b, c, d));
    pg.shutdown().await;
}
