//! The shard map: an uninitialized cluster, map updates from the config watch, start-up
//! without a reachable config server.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ordo_proto::slot_of;
use ordo_proto::v1::*;
use ordo_router::{Router, RouterConfig, RouterOptions};
use tonic::Code;

use crate::fakes::*;
use crate::support::*;

#[tokio::test]
async fn an_uninitialized_cluster_is_reported_and_init_goes_through_the_router() {
    let n1 = healthy_node("g1").await;
    let n2 = healthy_node("g2").await;
    // Config replica A is a follower that names B as leader; the cluster is not initialized.
    let b = spawn_config(ShardMap::default()).await;
    let a = spawn_config(ShardMap::default()).await;
    *a.state.redirect_writes_to.lock().unwrap() = Some(b.addr.clone());
    let router = start_router(vec![a.addr.clone(), b.addr.clone()]).await;
    assert_eq!(router.map_version(), 0);

    let mut c = kv(&router).await;
    let err = c.get(get_req(key_of_group(1, 0))).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(
        err.message(),
        "cluster is not initialized: run `ordoctl init`"
    );

    let mut admin = cluster(&router).await;
    let map = admin
        .init_cluster(InitClusterRequest {
            slot_count: SLOTS,
            groups: vec![
                GroupSpec {
                    id: 1,
                    addrs: vec![n1.addr.clone()],
                },
                GroupSpec {
                    id: 2,
                    addrs: vec![n2.addr.clone()],
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(map.version, 1);
    assert_eq!(b.state.inits.load(Ordering::SeqCst), 1);
    // The router installed the map the config server answered with.
    assert_eq!(router.map_version(), 1);

    // Kv now works (InitCluster here spreads slot s to group s % 2 + 1).
    let k = Bytes::from_static(b"order-42");
    let owner = if slot_of(&k, SLOTS).is_multiple_of(2) {
        "g1"
    } else {
        "g2"
    };
    let got = c.get(get_req(k)).await.unwrap().into_inner();
    assert_eq!(got.value, owner);

    // A non-linearizable GetShardMap is answered from the cache; a linearizable one is proxied.
    let gets_before = a.state.gets.load(Ordering::SeqCst) + b.state.gets.load(Ordering::SeqCst);
    let cached = admin
        .get_shard_map(GetShardMapRequest {
            linearizable: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cached, map);
    let gets_after = a.state.gets.load(Ordering::SeqCst) + b.state.gets.load(Ordering::SeqCst);
    assert_eq!(gets_before, gets_after);
    let fresh = admin
        .get_shard_map(GetShardMapRequest { linearizable: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fresh.version, 1);
    assert_eq!(
        a.state.linearizable_gets.load(Ordering::SeqCst)
            + b.state.linearizable_gets.load(Ordering::SeqCst),
        1
    );

    // Unimplemented config RPCs pass through with their code.
    let err = admin
        .move_slots(MoveSlotsRequest {
            slots: vec![1],
            to_group: 2,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    // The task RPCs are proxied too: the answer is the config server's.
    let rebalance = RebalanceRequest::default();
    let task = admin
        .start_task(StartTaskRequest {
            task: Some(start_task_request::Task::Rebalance(rebalance)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((task.id, task.kind), (7, TaskKind::Rebalance as i32));
    let err = admin
        .abort_task(AbortTaskRequest { id: 7 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    router.shutdown().await;
}

#[tokio::test]
async fn map_updates_flow_from_the_config_watch_to_the_routers_watch() {
    let n1 = healthy_node("g1").await;
    let n2 = healthy_node("g2").await;
    let v1 = map_v(1, &[&n1.addr], &[&n2.addr]);
    let config = spawn_config(v1.clone()).await;
    config.state.set_map(v1.clone(), true);
    let router = start_router(vec![config.addr.clone()]).await;

    let mut admin = cluster(&router).await;
    let mut stream = admin
        .watch_shard_map(WatchShardMapRequest { after_version: 0 })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.version, 1);

    // v2 swaps the groups' slots; the config server only publishes it on its watch.
    let mut v2 = v1.clone();
    v2.version = 2;
    v2.slot_owner = v1.slot_owner.iter().map(|g| 3 - g).collect();
    config.state.set_map(v2.clone(), true);
    let next = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next, v2);
    assert_eq!(router.map_version(), 2);

    // Requests now follow v2.
    let mut c = kv(&router).await;
    let got = c
        .get(get_req(key_of_group(1, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, "g2");
    assert_eq!(seen(&n2)[0].map_version, 2);

    // Shutting down ends the router's watch streams.
    router.shutdown().await;
    let end = tokio::time::timeout(WAIT, stream.message()).await.unwrap();
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
}

#[tokio::test]
async fn the_router_refuses_to_start_without_a_reachable_config_server() {
    let err = Router::start(RouterConfig {
        listen: "127.0.0.1:0".into(),
        config_addrs: vec![],
    })
    .await
    .err()
    .unwrap();
    assert_eq!(
        err.to_string(),
        "no config server given: pass --config <addr,...>"
    );

    let a = closed_addr().await;
    let b = closed_addr().await;
    let started = Instant::now();
    let err = Router::start_with_options(
        RouterConfig {
            listen: "127.0.0.1:0".into(),
            config_addrs: vec![a.clone(), b.clone()],
        },
        RouterOptions {
            start_timeout: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .await
    .err()
    .unwrap();
    let msg = format!("{err:#}");
    assert!(started.elapsed() < WAIT);
    assert!(
        msg.starts_with("no config server reachable within 300ms"),
        "{msg}"
    );
    assert!(msg.contains(&format!("{a}: ")), "{msg}");
    assert!(msg.contains(&format!("{b}: ")), "{msg}");
    assert!(!msg.contains("not tried"), "{msg}");
}
