//! Retryable writes (issue 12, audit M9), in-process through the router: a write sent again
//! with its idempotency key is applied once and answered with its first outcome, also after its
//! group's leader was killed and after its slot moved to another group.

use std::time::Duration;

use bytes::Bytes;
use ordo_proto::client::ClusterClient;
use ordo_proto::v1::kv_client::KvClient;
use ordo_proto::v1::{
    DeleteRequest, DeleteResponse, GetRequest, PutRequest, PutResponse, RequestHeader,
};
use tonic::transport::Channel;
use tonic::Code;

use ordo_testkit::inproc::InProcCluster;
use ordo_testkit::{wait_for, Cluster};

const SK: &str = "order-m9";
/// Bound on each wait for the cluster to settle (a leader, a move to end).
const SETTLE: Duration = Duration::from_secs(60);

fn header(key: &str) -> Option<RequestHeader> {
    Some(RequestHeader {
        map_version: 0,
        idempotency_key: Bytes::copy_from_slice(key.as_bytes()),
    })
}

/// A keyed put of `value` to the root item of `SK`, retried (with its key) while the cluster
/// settles after a kill or a move: what it finally answers.
async fn put(kv: &KvClient<Channel>, key: &str, value: &str) -> PutResponse {
    let req = PutRequest {
        header: header(key),
        shard_key: SK.into(),
        key: Bytes::new(),
        value: Bytes::copy_from_slice(value.as_bytes()),
        if_version: None,
    };
    wait_for(&format!("the put keyed {key}"), SETTLE, || {
        let (mut kv, req) = (kv.clone(), req.clone());
        async move { kv.put(req).await.ok().map(|r| r.into_inner()) }
    })
    .await
}

async fn version(kv: &KvClient<Channel>) -> u64 {
    let req = GetRequest {
        header: None,
        shard_key: SK.into(),
        key: Bytes::new(),
        consistency: 0,
    };
    kv.clone().get(req).await.unwrap().into_inner().version
}

fn owner(map: &ordo_proto::v1::ShardMap) -> (u32, u64) {
    let slot = ordo_proto::slot_of(SK.as_bytes(), map.slot_count);
    (slot, map.slot_owner[slot as usize])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn m9_a_keyed_put_sent_again_applies_once_across_a_leader_kill_and_a_slot_move() {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let mut pg = InProcCluster::start(2, 3).await;
    let router = pg.router_addr();
    let kv = KvClient::new(ordo_testkit::endpoint(&router).unwrap().connect_lazy());
    let cc = ClusterClient::connect(pg.config_addrs.clone())
        .unwrap()
        .with_timeout(SETTLE);
    let (slot, group) = owner(&cc.get_shard_map(true).await.unwrap());

    // Acceptance 4: the same keyed put twice gives version 1 both times.
    let first = put(&kv, "put-1", "v1").await;
    assert_eq!((first.succeeded, first.version), (true, 1));
    assert_eq!(put(&kv, "put-1", "v1").await, first);
    assert_eq!(version(&kv).await, 1, "the repeat was not applied");
    // The key with another request is refused, and changes nothing.
    let mut other = kv.clone();
    let err = other
        .put(PutRequest {
            header: header("put-1"),
            shard_key: SK.into(),
            value: "v2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(version(&kv).await, 1);
    // A keyed delete answers its first outcome too (it did delete, at version 1).
    let del = DeleteRequest {
        header: header("del-1"),
        shard_key: SK.into(),
        ..Default::default()
    };
    let deleted = |r: DeleteResponse| (r.succeeded, r.deleted, r.prev_version);
    let d1 = other.delete(del.clone()).await.unwrap().into_inner();
    let d2 = other.delete(del).await.unwrap().into_inner();
    assert_eq!(
        (deleted(d1), deleted(d2)),
        ((true, true, 1), (true, true, 1))
    );
    let again = put(&kv, "put-2", "v").await;
    assert_eq!(again.version, 1, "recreated after the delete");

    // The entry is replicated state: the group's next leader knows it.
    let leader = pg.wait_leader(group, SETTLE).await;
    pg.kill(leader).await;
    assert_eq!(
        put(&kv, "put-2", "v").await,
        again,
        "after the leader's kill"
    );
    assert_eq!(version(&kv).await, 1);
    pg.restart(leader).await;

    // It moves with the slot: the new owner answers the repeat as the old one did.
    let to = if group == 1 { 2 } else { 1 };
    // The call may end before the move does (or time out); the map says when it is done.
    let _ = cc.move_slots(vec![slot], to).await;
    wait_for("the slot to move", SETTLE, || {
        let cc = cc.clone();
        async move {
            let map = cc.get_shard_map(true).await.ok()?;
            (owner(&map).1 == to).then_some(())
        }
    })
    .await;
    assert_eq!(put(&kv, "put-2", "v").await, again, "after the slot moved");
    assert_eq!(version(&kv).await, 1);
    assert_eq!(put(&kv, "put-3", "v").await.version, 2, "a new key applies");
    pg.shutdown().await;
}
