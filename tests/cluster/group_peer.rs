//! Consumer groups on one shard group, through the node API the router uses (`Peer.GroupAdmin`,
//! `Peer.Consume`): two members share a group's events with at most one event of an order in
//! flight, their acks move the committed position, and after the leader is killed the next
//! leader delivers again what was in flight, with higher attempts, refusing the old ones.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ordo::limits::COMPACT_LOG_ENTRIES_DEFAULT;
use ordo_proto::v1::group_admin_request::Op as AdminOp;
use ordo_proto::v1::peer_client::PeerClient;
use ordo_proto::v1::peer_consume_request::Msg as In;
use ordo_proto::v1::peer_consume_response::Msg as Out;
use ordo_proto::v1::watch_request::Start;
use ordo_proto::v1::{
    Ack, ChangeEvent, ConsumerGroup, CreateGroupRequest, Credit, DescribeGroupRequest,
    GroupAdminRequest, PeerConsumeRequest, PeerConsumeResponse, PeerJoin,
};
use tokio::sync::mpsc;
use tonic::Streaming;

use ordo_testkit::inproc::{InProcGroup, INPROC_GROUP};
use ordo_testkit::{Cluster, Member};

const SETTLE: Duration = Duration::from_secs(30);
const ORDERS: [&str; 5] = ["order-a", "order-b", "order-c", "order-d", "order-e"];

async fn admin(addr: &str, op: AdminOp) -> Result<Vec<ConsumerGroup>, tonic::Status> {
    let mut peer = PeerClient::connect(format!("http://{addr}")).await.unwrap();
    let req = GroupAdminRequest {
        group_id: INPROC_GROUP,
        op: Some(op),
    };
    Ok(peer.group_admin(req).await?.into_inner().groups)
}

async fn describe(addr: &str) -> ConsumerGroup {
    let op = AdminOp::Describe(DescribeGroupRequest {
        group: "billing".into(),
    });
    let groups = admin(addr, op).await.unwrap();
    assert_eq!(groups.len(), 1, "the group is there");
    groups.into_iter().next().unwrap()
}

/// One member's stream: what it sends, and what it gets.
struct Stream {
    tx: mpsc::Sender<PeerConsumeRequest>,
    rx: Streaming<PeerConsumeResponse>,
}

/// `member`'s stream at the group's leader (found again if leadership moves meanwhile).
async fn join(g: &InProcGroup, member: &str, credits: u32) -> Stream {
    let deadline = Instant::now() + SETTLE;
    loop {
        let addr = g.addr(g.wait_leader(INPROC_GROUP, SETTLE).await);
        match try_join(&addr, member, credits).await {
            Ok(s) => return s,
            Err(e) => assert!(Instant::now() < deadline, "no join within {SETTLE:?}: {e}"),
        }
    }
}

async fn try_join(addr: &str, member: &str, credits: u32) -> Result<Stream, tonic::Status> {
    let mut peer = PeerClient::connect(format!("http://{addr}")).await.unwrap();
    let (tx, rx) = mpsc::channel(64);
    let join = PeerConsumeRequest {
        msg: Some(In::Join(PeerJoin {
            group_id: INPROC_GROUP,
            group: "billing".into(),
            member: member.into(),
            credits,
        })),
    };
    tx.send(join).await.unwrap();
    let rx = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut rx = peer.consume(rx).await?.into_inner();
    match rx.message().await {
        Ok(Some(PeerConsumeResponse {
            msg: Some(Out::Joined(_)),
        })) => {}
        Err(e) => return Err(e),
        other => panic!("a join is answered `joined` first, got {other:?}"),
    }
    Ok(Stream { tx, rx })
}

impl Stream {
    async fn send(&self, msg: In) {
        self.tx
            .send(PeerConsumeRequest { msg: Some(msg) })
            .await
            .unwrap();
    }

    /// The next delivery within `bound` (counts in between are skipped); `None` at the bound.
    async fn delivery(&mut self, bound: Duration) -> Option<(ChangeEvent, u32)> {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.message()).await {
                Err(_) => return None,
                Ok(Ok(Some(PeerConsumeResponse {
                    msg: Some(Out::Delivery(d)),
                }))) => return Some((d.event.unwrap(), d.attempt)),
                Ok(Ok(Some(_))) => continue,
                Ok(other) => panic!("the member's stream ended: {other:?}"),
            }
        }
    }
}

impl Stream {
    /// The next count of events waiting for credits within `bound` (deliveries in between
    /// fail the test).
    async fn waiting(&mut self, bound: Duration) -> u32 {
        match tokio::time::timeout(bound, self.rx.message()).await {
            Ok(Ok(Some(PeerConsumeResponse {
                msg: Some(Out::Waiting(n)),
            }))) => n,
            other => panic!("expected a count of waiting events within {bound:?}, got {other:?}"),
        }
    }
}

async fn write(g: &InProcGroup, n: u32) -> BTreeMap<String, u64> {
    let client = g.client().with_timeout(Duration::from_secs(10));
    let mut last = BTreeMap::new();
    for i in 0..n {
        let sk = ORDERS[i as usize % ORDERS.len()];
        let r = client.put(sk, "outbox/e", format!("v{i}"), None).await;
        last.insert(sk.to_string(), r.unwrap().version);
    }
    last
}

async fn group() -> (InProcGroup, Member) {
    let g = InProcGroup::start(3, COMPACT_LOG_ENTRIES_DEFAULT, None)
        .await
        .unwrap();
    let leader = g.wait_leader(INPROC_GROUP, SETTLE).await;
    let create = AdminOp::Create(CreateGroupRequest {
        group: "billing".into(),
        key_prefix: "outbox/".into(),
        from: Start::FromOldest as i32,
        ack_wait_ms: 2_000,
        ..Default::default()
    });
    let created = admin(&g.addr(leader), create).await.unwrap();
    assert_eq!(created.len(), 1);
    assert_eq!(
        created[0].slots.len() as u32,
        ordo::limits::SLOT_COUNT_DEFAULT,
        "every slot has the group's state"
    );
    (g, leader)
}

/// Two members, each with one credit, ack everything: every event is delivered, an order's
/// events in version order and never two of one order in flight, and the committed position
/// reaches the end of every slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_members_share_the_events_one_order_at_a_time_and_acks_commit() {
    let (g, leader) = group().await;
    let last = write(&g, 60).await;
    let addr = g.addr(leader);
    let mut members = [join(&g, "m1", 1).await, join(&g, "m2", 1).await];
    let mut in_flight: BTreeSet<String> = BTreeSet::new();
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let deadline = Instant::now() + SETTLE;
    while seen != last {
        assert!(
            Instant::now() < deadline,
            "not every event arrived: {seen:?}"
        );
        // Take one delivery from each member in turn, hold them, then ack them all.
        let mut held = Vec::new();
        for (i, m) in members.iter_mut().enumerate() {
            if let Some((ev, attempt)) = m.delivery(Duration::from_millis(300)).await {
                let sk = String::from_utf8(ev.shard_key.to_vec()).unwrap();
                assert!(in_flight.insert(sk.clone()), "two events of {sk} in flight");
                let prev = seen.insert(sk.clone(), ev.version).unwrap_or(0);
                assert_eq!(ev.version, prev + 1, "{sk}: its events in version order");
                assert_eq!(attempt, 1, "no redelivery without a failure");
                held.push((i, sk, ev));
            }
        }
        for (i, sk, ev) in held {
            in_flight.remove(&sk);
            let m = &members[i];
            let ack = Ack {
                slot: ev.slot,
                seq: ev.seq,
                attempt: 1,
            };
            m.send(In::Ack(ack)).await;
            m.send(In::Credit(Credit { credits: 1 })).await;
        }
    }
    let bound = Instant::now() + SETTLE;
    loop {
        let cg = describe(&addr).await;
        if cg.lag_events == 0 && cg.pending == 0 {
            break;
        }
        assert!(
            Instant::now() < bound,
            "the acks were not persisted: {cg:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    g.shutdown().await;
}

/// The leader is killed with deliveries in flight: the next leader delivers them again with
/// a higher attempt, and an ack of the first attempt is refused there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_leader_redelivers_what_was_in_flight_with_higher_attempts() {
    let (mut g, leader) = group().await;
    write(&g, 10).await;
    let mut m = join(&g, "m1", 2).await;
    let mut first = Vec::new();
    while first.len() < 2 {
        let (ev, attempt) = m.delivery(SETTLE).await.expect("deliveries");
        assert_eq!(attempt, 1);
        first.push(ev);
    }
    // The horizon that let them go out is persisted before they went: wait for nothing more.
    g.kill(leader).await;
    g.wait_leader(INPROC_GROUP, SETTLE).await;
    let mut m = join(&g, "m1", 10).await;
    let mut again = BTreeMap::new();
    let deadline = Instant::now() + SETTLE;
    while again.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "in-flight events not redelivered"
        );
        let (ev, attempt) = m.delivery(SETTLE).await.expect("redeliveries");
        if first.iter().any(|f| f.seq == ev.seq && f.slot == ev.slot) {
            assert!(attempt > 1, "a redelivery has a higher attempt");
            again.insert((ev.slot, ev.seq), attempt);
        }
    }
    let stale = &first[0];
    m.send(In::Ack(Ack {
        slot: stale.slot,
        seq: stale.seq,
        attempt: 1,
    }))
    .await;
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        match tokio::time::timeout_at(deadline, m.rx.message()).await {
            Ok(Ok(Some(PeerConsumeResponse {
                msg: Some(Out::Refused(r)),
            }))) => {
                assert_eq!((r.slot, r.seq, r.attempt), (stale.slot, stale.seq, 1));
                assert_eq!(r.current_attempt, again[&(stale.slot, stale.seq)]);
                break;
            }
            Ok(Ok(Some(_))) => continue,
            other => panic!("a stale ack is refused on the stream, got {other:?}"),
        }
    }
    g.shutdown().await;
}

/// A member without credits is told what waits for them, and told again after each delivery
/// even when the count is the same (the router counts deliveries off the last count it heard:
/// a count not repeated left the last events of a group undelivered until another write).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn what_waits_for_credits_is_told_again_after_each_delivery() {
    let (g, _) = group().await;
    let mut m = join(&g, "m1", 0).await;
    let client = g.client().with_timeout(Duration::from_secs(10));
    client.put("order-a", "outbox/e", "1", None).await.unwrap();
    assert_eq!(m.waiting(SETTLE).await, 1, "one event waits");
    m.send(In::Credit(Credit { credits: 1 })).await;
    let (first, _) = m
        .delivery(SETTLE)
        .await
        .expect("the credit brings the event");
    assert_eq!(first.shard_key, "order-a".as_bytes());
    client.put("order-b", "outbox/e", "1", None).await.unwrap();
    assert_eq!(
        m.waiting(SETTLE).await,
        1,
        "the next one is told, though the count is the same"
    );
    m.send(In::Credit(Credit { credits: 1 })).await;
    let (second, _) = m
        .delivery(SETTLE)
        .await
        .expect("and comes with the next credit");
    assert_eq!(second.shard_key, "order-b".as_bytes());
    g.shutdown().await;
}
