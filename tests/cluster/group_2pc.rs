//! Exactly-once processing with the read model in another group (issue 14, acceptance 3): a
//! consumer folds an order's events into a counter kept under another shard group, acking each
//! event in the counter's Txn (a cross-group Txn: 2PC). Its router stops at each 2PC failpoint
//! in turn, as if the consumer's process died mid-commit; the consumer then retries its Txn
//! through a healthy router. Whatever each stopped Txn's fate (resolved by the lock timeout),
//! the counter ends equal to the number of events and the group has every event done: each
//! event applied once.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ordo_proto::v1::group_admin_request::Op as AdminOp;
use ordo_proto::v1::peer_client::PeerClient;
use ordo_proto::v1::watch_request::Start;
use ordo_proto::v1::{
    compare, error_detail, txn_op, Compare, ConsumerGroup, CreateGroupRequest,
    DescribeGroupRequest, FeedAckRequest, GroupAdminRequest, PutRequest, TxnOp, TxnRequest,
};
use ordo_router::Failpoint;
use ordo_testkit::inproc::InProcCluster;
use ordo_testkit::Cluster;

use crate::bank::router_with;

const GROUP: &str = "read-model";
const EVENTS: u64 = 8;

/// `op` on the leader of shard group `g`, following no hints: the test waits for a leader.
async fn admin(pg: &InProcCluster, g: u64, op: AdminOp) -> Vec<ConsumerGroup> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let leader = pg.find_leader(g).await;
        if let Some(m) = leader {
            let mut peer = PeerClient::connect(format!("http://{}", pg.addr(m)))
                .await
                .unwrap();
            let req = GroupAdminRequest {
                group_id: g,
                op: Some(op.clone()),
            };
            match peer.group_admin(req).await {
                Ok(r) => return r.into_inner().groups,
                Err(e) => assert!(Instant::now() < deadline, "GroupAdmin on {g}: {e}"),
            }
        }
        assert!(Instant::now() < deadline, "no leader of group {g}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An order and a read-model shard key owned by different groups, and those groups.
fn apart(pg: &InProcCluster) -> (String, String, u64) {
    let map = pg.router.shard_map();
    let owner =
        |sk: &str| map.slot_owner[ordo_proto::slot_of(sk.as_bytes(), map.slot_count) as usize];
    let order = "order-7".to_string();
    let view = (0..)
        .map(|i| format!("view-{i}"))
        .find(|v| owner(v) != owner(&order))
        .unwrap();
    (order.clone(), view, owner(&order))
}

/// The counter's Txn for event `seq`: if the counter is still at `version`, write `count`
/// and ack the event.
fn fold(view: &str, version: u64, count: u64, order: &str, at: (u32, u64, u32)) -> TxnRequest {
    let (slot, seq, attempt) = at;
    let sk = Bytes::copy_from_slice(view.as_bytes());
    TxnRequest {
        compares: vec![Compare {
            shard_key: sk.clone(),
            key: Bytes::from_static(b"count"),
            target: compare::Target::Version as i32,
            op: compare::Op::Equal as i32,
            version,
            ..Default::default()
        }],
        success: vec![
            TxnOp {
                op: Some(txn_op::Op::Put(PutRequest {
                    shard_key: sk,
                    key: Bytes::from_static(b"count"),
                    value: count.to_string().into_bytes().into(),
                    ..Default::default()
                })),
            },
            TxnOp {
                op: Some(txn_op::Op::FeedAck(FeedAckRequest {
                    group: GROUP.into(),
                    slot,
                    seq,
                    attempt,
                    shard_key: Bytes::copy_from_slice(order.as_bytes()),
                })),
            },
        ],
        ..Default::default()
    }
}

/// The counter's version and value (0, 0 before its first write).
async fn read(c: &ordo_proto::client::Client, view: &str) -> (u64, u64) {
    let r = c
        .get(view.to_string(), "count", false)
        .await
        .expect("reading the counter");
    match r.found {
        true => (
            r.version,
            std::str::from_utf8(&r.value).unwrap().parse().unwrap(),
        ),
        false => (0, 0),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_model_in_another_group_folds_each_event_once_across_2pc_failpoints() {
    let _heavy = ordo_testkit::HEAVY.lock().await;
    let pg = InProcCluster::start(2, 3).await;
    let c = pg.client();
    let (order, view, order_group) = apart(&pg);
    let slot = ordo_proto::slot_of(order.as_bytes(), pg.router.shard_map().slot_count);
    let create = AdminOp::Create(CreateGroupRequest {
        group: GROUP.into(),
        key_prefix: "outbox/".into(),
        from: Start::FromOldest as i32,
        shard_keys: vec![Bytes::copy_from_slice(order.as_bytes())],
        ..Default::default()
    });
    assert_eq!(admin(&pg, order_group, create).await[0].slots.len(), 1);
    for i in 0..EVENTS {
        c.put(order.clone(), format!("outbox/{i}"), "paid", None)
            .await
            .unwrap();
    }
    let failpoints = [
        Some(Failpoint::AfterPrepare),
        Some(Failpoint::AfterDecide),
        Some(Failpoint::AfterPrimaryFinish),
        None,
    ];
    // The order's slot holds only its events: seqs 1..=EVENTS.
    for seq in 1..=EVENTS {
        let fp = failpoints[(seq as usize - 1) % failpoints.len()];
        // The delivery the consumer acks: attempt 1, unless a new leader of the order's group
        // fenced the event with a higher one (it then delivers it again: the consumer takes the
        // attempt the refusal names, as it would from the redelivery).
        let mut attempt = 1;
        if let Some(fp) = fp {
            let (router, dying) = router_with(&pg, fp).await;
            let (version, count) = read(&c, &view).await;
            let r = dying
                .txn(fold(
                    &view,
                    version,
                    count + 1,
                    &order,
                    (slot, seq, attempt),
                ))
                .await;
            assert!(r.is_err(), "{fp:?}: the stopped coordinator cannot answer");
            router.shutdown().await;
        }
        // The consumer comes back and processes the event again, until its Txn applies or
        // the event turns out done (its earlier Txn committed).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "event {seq} never settled");
            let (version, count) = read(&c, &view).await;
            match c
                .txn(fold(
                    &view,
                    version,
                    count + 1,
                    &order,
                    (slot, seq, attempt),
                ))
                .await
            {
                Ok(r) if r.succeeded => break,
                Ok(_) => continue,
                Err(e) => match ordo_proto::error_detail_of(&e) {
                    Some(error_detail::Kind::StaleDelivery(s)) if s.current_attempt == 0 => break,
                    Some(error_detail::Kind::StaleDelivery(s)) => attempt = s.current_attempt,
                    _ => {
                        eprintln!("event {seq}: retrying after {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                },
            }
        }
        eprintln!("event {seq} ({fp:?}) settled");
    }
    let count = c.get(view.clone(), "count", false).await.unwrap();
    assert_eq!(
        std::str::from_utf8(&count.value).unwrap(),
        EVENTS.to_string(),
        "the read model folded each event once"
    );
    let described = admin(
        &pg,
        order_group,
        AdminOp::Describe(DescribeGroupRequest {
            group: GROUP.into(),
        }),
    )
    .await;
    assert_eq!(
        described[0].slots[0].committed_seq, EVENTS,
        "every event is done"
    );
    pg.shutdown().await;
}
