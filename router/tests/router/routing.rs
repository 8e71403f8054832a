//! Where requests go: the owning group, a followed leader hint, a skipped dead replica, a
//! refreshed map; what passes through unchanged.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use ordo_proto::v1::*;
use tonic::{Code, Status};

use crate::fakes::*;
use crate::support::*;

#[tokio::test]
async fn requests_go_to_the_group_that_owns_the_slot() {
    let n1 = healthy_node("g1").await;
    let n2 = healthy_node("g2").await;
    let config = spawn_config(map_v(3, &[&n1.addr], &[&n2.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    assert_eq!(router.map_version(), 3);
    let mut c = kv(&router).await;

    let k1 = key_of_group(1, 0);
    let k2 = key_of_group(2, 0);
    let got = c.get(get_req(k1.clone())).await.unwrap().into_inner();
    assert_eq!(got.value, "g1");
    let got = c.get(get_req(k2.clone())).await.unwrap().into_inner();
    assert_eq!(got.value, "g2");
    c.put(put_req(k2.clone())).await.unwrap();
    c.delete(DeleteRequest {
        shard_key: k1.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.scan(ScanRequest {
        shard_key: k2.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    let s1 = seen(&n1);
    let s2 = seen(&n2);
    assert_eq!(
        s1.iter().map(|s| s.op).collect::<Vec<_>>(),
        ["Get", "Delete"]
    );
    assert_eq!(
        s2.iter().map(|s| s.op).collect::<Vec<_>>(),
        ["Get", "Put", "Scan"]
    );
    assert!(s1.iter().all(|s| s.shard_key == k1 && s.map_version == 3));
    assert!(s2.iter().all(|s| s.shard_key == k2 && s.map_version == 3));
    // Every forwarded request carries a deadline.
    assert!(s1.iter().chain(&s2).all(|s| s.grpc_timeout.is_some()));
    router.shutdown().await;
}

#[tokio::test]
async fn a_not_leader_hint_is_followed_and_remembered() {
    let leader = healthy_node("leader").await;
    let leader_addr = leader.addr.clone();
    let follower = spawn_node("follower", move |_| Some(not_leader(&leader_addr))).await;
    let other = healthy_node("g2").await;
    let config = spawn_config(map_v(1, &[&follower.addr, &leader.addr], &[&other.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut c = kv(&router).await;

    let k = key_of_group(1, 0);
    let resp = c.put(put_req(k.clone())).await.unwrap().into_inner();
    assert!(resp.succeeded);
    assert_eq!(seen(&follower).len(), 1);
    assert_eq!(seen(&leader).len(), 1);

    // The leader cache sends the next request straight to the leader.
    let got = c
        .get(get_req(key_of_group(1, 1)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, "leader");
    assert_eq!(seen(&follower).len(), 1);
    assert_eq!(seen(&leader).len(), 2);
    router.shutdown().await;
}

#[tokio::test]
async fn a_dead_replica_is_skipped() {
    let dead = closed_addr().await;
    let live = healthy_node("live").await;
    let other = healthy_node("g2").await;
    let config = spawn_config(map_v(1, &[&dead, &live.addr], &[&other.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut c = kv(&router).await;
    let got = c
        .get(get_req(key_of_group(1, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, "live");
    assert_eq!(seen(&live).len(), 1);
    // A refused connection means the request never left the router: a write moves on too.
    // (The router now remembers `live`; make it start from the dead replica again.)
    let router = start_router(vec![config.addr.clone()]).await;
    let mut c = kv(&router).await;
    let resp = c
        .put(put_req(key_of_group(1, 1)))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.succeeded);
    assert_eq!(seen(&live).len(), 2);
    router.shutdown().await;
}

#[tokio::test]
async fn wrong_shard_refreshes_the_map_and_retries_at_the_new_owner() {
    let old_owner = spawn_node("old", |_| Some(wrong_shard(2))).await;
    let new_owner = healthy_node("new").await;
    // v1: every slot on group 1 (the old owner).
    let mut v1 = map_v(1, &[&old_owner.addr], &[&new_owner.addr]);
    v1.slot_owner = vec![1; SLOTS as usize];
    let config = spawn_config(v1.clone()).await;
    let router = start_router(vec![config.addr.clone()]).await;
    assert_eq!(router.map_version(), 1);

    // v2 moves every slot to group 2. Only a (linearizable) GetShardMap tells; the watch lags, so
    // the router can learn it only through the WrongShard answer.
    let mut v2 = v1.clone();
    v2.version = 2;
    v2.slot_owner = vec![2; SLOTS as usize];
    config.state.set_map(v2, false);

    let mut c = kv(&router).await;
    let k = key_of_group(1, 0);
    let resp = c.put(put_req(k.clone())).await.unwrap().into_inner();
    assert!(resp.succeeded);

    let old = seen(&old_owner);
    assert_eq!(old.len(), 1, "the old owner sees exactly one request");
    assert_eq!(old[0].map_version, 1);
    let new = seen(&new_owner);
    assert_eq!(new.len(), 1);
    assert_eq!((new[0].op, new[0].map_version), ("Put", 2));
    assert_eq!(new[0].shard_key, k);
    assert!(config.state.linearizable_gets.load(Ordering::SeqCst) >= 1);
    assert_eq!(router.map_version(), 2);
    router.shutdown().await;
}

#[tokio::test]
async fn txns_are_checked_and_a_cross_group_txn_goes_to_two_phase_commit() {
    let n1 = healthy_node("g1").await;
    let n2 = healthy_node("g2").await;
    let config = spawn_config(map_v(1, &[&n1.addr], &[&n2.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut c = kv(&router).await;
    let compare = |sk: Bytes| Compare {
        shard_key: sk,
        ..Default::default()
    };
    let put_op = |sk: Bytes| TxnOp {
        op: Some(txn_op::Op::Put(put_req(sk))),
    };

    // Several keys of one group: forwarded.
    let one_group = TxnRequest {
        header: None,
        compares: vec![compare(key_of_group(2, 0))],
        success: vec![put_op(key_of_group(2, 1))],
        failure: vec![put_op(key_of_group(2, 0))],
    };
    assert!(c.txn(one_group).await.unwrap().into_inner().succeeded);
    assert_eq!(seen(&n2).len(), 1);

    // Keys of groups 1 and 2: never sent as a plain Txn; the router coordinates a two-phase
    // commit, which these fake nodes (no `Participant` service) cannot take part in.
    let cross = TxnRequest {
        header: None,
        compares: vec![compare(key_of_group(1, 0))],
        success: vec![],
        failure: vec![put_op(key_of_group(2, 0))],
    };
    let err = c.txn(cross).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{}", err.message());

    // No keys at all; an empty shard key.
    let err = c.txn(TxnRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c.get(get_req(Bytes::new())).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "shard_key is empty");
    let err = c.put(put_req(Bytes::new())).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    assert!(seen(&n1).is_empty());
    assert_eq!(seen(&n2).len(), 1);
    router.shutdown().await;
}

#[tokio::test]
async fn other_errors_pass_through_unchanged() {
    let node = spawn_node("bad", |s| {
        Some(match s.op {
            "Put" => Status::with_details(
                Code::InvalidArgument,
                "value is larger than 1 MiB",
                vec![7u8, 7, 7].into(),
            ),
            _ => Status::data_loss("checksum mismatch"),
        })
    })
    .await;
    let other = healthy_node("g2").await;
    let config = spawn_config(map_v(1, &[&node.addr], &[&other.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut c = kv(&router).await;
    let k = key_of_group(1, 0);

    let err = c.put(put_req(k.clone())).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "value is larger than 1 MiB");
    assert_eq!(err.details(), [7, 7, 7]);
    let err = c.get(get_req(k)).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
    assert_eq!(err.message(), "checksum mismatch");
    assert_eq!(
        seen(&node).len(),
        2,
        "no retries for errors that are not routing trouble"
    );
    router.shutdown().await;
}

/// Router and node message bounds are one (`KV_MESSAGE_BYTES_MAX`): a request over it is
/// refused by the router itself, as a node refuses it, before any node is contacted (group 1's
/// only replica is not even there); one under it is forwarded and accepted.
#[tokio::test]
async fn a_request_over_the_nodes_message_bound_is_refused_at_the_router_as_a_node_would() {
    use ordo_proto::addr::KV_MESSAGE_BYTES_MAX;
    let (gone, gone_addr) = listen().await;
    drop(gone);
    let n2 = healthy_node("g2").await;
    let config = spawn_config(map_v(1, &[&gone_addr], &[&n2.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut c = kv(&router).await;
    let put = |shard_key: Bytes, bytes: usize| PutRequest {
        shard_key,
        value: vec![7; bytes].into(),
        ..Default::default()
    };
    let s = c
        .put(put(key_of_group(1, 0), KV_MESSAGE_BYTES_MAX))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
    assert!(
        s.message()
            .contains(&format!("{KV_MESSAGE_BYTES_MAX} bytes")),
        "names the bound: {}",
        s.message()
    );
    c.put(put(key_of_group(2, 0), KV_MESSAGE_BYTES_MAX - 1024))
        .await
        .unwrap();
    assert_eq!(seen(&n2).len(), 1);
    router.shutdown().await;
}
