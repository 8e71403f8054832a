//! Maps, keys, clients and requests the tests share.

use std::time::Duration;

use bytes::Bytes;
use ordo_proto::slot_of;
use ordo_proto::v1::cluster_client::ClusterClient;
use ordo_proto::v1::kv_client::KvClient;
use ordo_proto::v1::*;
use ordo_router::{Router, RouterConfig};
use tonic::transport::Channel;
use tonic::Request;

use crate::fakes::listen;

/// Slots of every test map.
pub const SLOTS: u32 = 16;
/// Bound on any wait for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(10);

/// Slots 0..8 belong to group 1, 8..16 to group 2.
pub fn map_v(version: u64, g1: &[&str], g2: &[&str]) -> ShardMap {
    let group = |id: u64, addrs: &[&str]| Group {
        id,
        replicas: addrs
            .iter()
            .enumerate()
            .map(|(i, a)| Replica {
                node_id: id * 10 + i as u64,
                addr: a.to_string(),
            })
            .collect(),
    };
    ShardMap {
        version,
        slot_count: SLOTS,
        groups: vec![group(1, g1), group(2, g2)],
        slot_owner: (0..SLOTS)
            .map(|s| if s < SLOTS / 2 { 1 } else { 2 })
            .collect(),
        config_addrs: vec![],
    }
}

/// A shard key whose slot group 1 (`first_half`) or group 2 owns under `map_v`.
pub fn key_of_group(group: u64, nth: usize) -> Bytes {
    (0..)
        .map(|i| format!("order-{i}"))
        .filter(|k| {
            let slot = slot_of(k.as_bytes(), SLOTS);
            (slot < SLOTS / 2) == (group == 1)
        })
        .nth(nth)
        .map(Bytes::from)
        .unwrap()
}

pub async fn start_router(config_addrs: Vec<String>) -> Router {
    Router::start(RouterConfig {
        listen: "127.0.0.1:0".into(),
        config_addrs,
    })
    .await
    .unwrap()
}

pub async fn kv(router: &Router) -> KvClient<Channel> {
    KvClient::connect(format!("http://{}", router.addr))
        .await
        .unwrap()
}

pub async fn cluster(router: &Router) -> ClusterClient<Channel> {
    ClusterClient::connect(format!("http://{}", router.addr))
        .await
        .unwrap()
}

pub fn with_timeout<T>(msg: T, t: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(t);
    r
}

pub fn put_req(shard_key: Bytes) -> PutRequest {
    PutRequest {
        header: None,
        shard_key,
        key: Bytes::from_static(b"k"),
        value: Bytes::from_static(b"v"),
        if_version: None,
    }
}

pub fn get_req(shard_key: Bytes) -> GetRequest {
    GetRequest {
        header: None,
        shard_key,
        key: Bytes::new(),
        consistency: 0,
    }
}

/// A local address nothing listens on.
pub async fn closed_addr() -> String {
    let (l, addr) = listen().await;
    drop(l);
    addr
}
