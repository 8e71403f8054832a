//! Acceptance tests of the sharded cluster (config server + groups + routers), in-process with
//! real gRPC between the pieces.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{self, StreamExt};
use ordo_proto::client::Client;
use ordo_proto::v1::cluster_client::ClusterClient;
use ordo_proto::v1::kv_client::KvClient;
use ordo_proto::v1::{GetRequest, GetShardMapRequest, MoveSlotsRequest, PutRequest, ShardMap};
use ordo_router::{Router, RouterConfig, RouterOptions};
use tonic::Code;

use ordo_testkit::inproc::{lone_node, InProcCluster};
use ordo_testkit::{endpoint, node_status, wait_for, Cluster, CONFIG_GROUP};

fn client(addr: &str) -> Client {
    Client::connect(vec![addr.to_string()])
        .unwrap()
        .with_timeout(Duration::from_secs(15))
}

async fn cluster(addr: &str) -> ClusterClient<tonic::transport::Channel> {
    ClusterClient::new(endpoint(addr).unwrap().connect().await.unwrap())
}

async fn shard_map(addr: &str) -> ShardMap {
    cluster(addr)
        .await
        .get_shard_map(GetShardMapRequest { linearizable: true })
        .await
        .unwrap()
        .into_inner()
}

/// Moves one (empty) slot to group `to` through the Cluster API at `addr`; the new map.
async fn move_slot(addr: &str, slot: u32, to: u64) -> Result<ShardMap, tonic::Status> {
    let req = MoveSlotsRequest {
        slots: vec![slot],
        to_group: to,
        ..Default::default()
    };
    Ok(cluster(addr).await.move_slots(req).await?.into_inner())
}

/// A shard key whose slot group `group` owns in `map`.
fn key_owned_by(map: &ShardMap, group: u64, prefix: &str) -> (String, u32) {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .map(|sk| {
            let slot = ordo_proto::slot_of(sk.as_bytes(), map.slot_count);
            (sk, slot)
        })
        .find(|(_, slot)| map.slot_owner[*slot as usize] == group)
        .unwrap()
}

/// Acceptance 1: 10,000 distinct order IDs through one router, read back; each group's share is
/// within ±10% of the mean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_orders_spread_evenly_over_three_groups() {
    // 10,000 writes through 9 replicas for over a minute: beside a resharding scenario, its
    // load starved that cluster into a leader election the scenario counts as an error.
    let _heavy = ordo_testkit::HEAVY.lock().await;
    let pg = InProcCluster::start(3, 3).await;
    let c = client(&pg.router_addr());
    let n = 10_000;
    stream::iter(0..n)
        .map(|i| {
            let c = c.clone();
            async move {
                c.put(format!("order-{i}"), "", format!("order {i}"), Some(0))
                    .await
                    .unwrap_or_else(|e| panic!("put {i}: {e}"))
            }
        })
        .buffer_unordered(32)
        .for_each(|r| async move { assert!(r.succeeded && r.version == 1) })
        .await;
    stream::iter(0..n)
        .map(|i| {
            let c = c.clone();
            async move { (i, c.get(format!("order-{i}"), "", false).await.unwrap()) }
        })
        .buffer_unordered(32)
        .for_each(|(i, r)| async move {
            assert!(
                r.found && r.value.as_ref() == format!("order {i}").as_bytes(),
                "order-{i} reads back"
            );
        })
        .await;
    let mut shares = BTreeMap::new();
    for (g, nodes) in &pg.groups {
        let s = node_status(&nodes[0].addr.to_string(), true).await.unwrap();
        shares.insert(*g, s.items);
    }
    let mean = n as f64 / 3.0;
    eprintln!("items per group: {shares:?} (mean {mean:.0})");
    assert_eq!(shares.values().sum::<u64>(), n as u64);
    for (g, items) in shares {
        let off = (items as f64 - mean).abs() / mean;
        assert!(
            off <= 0.10,
            "group {g} holds {items} items, {:.1}% off the mean",
            off * 100.0
        );
    }
    pg.shutdown().await;
}

/// Acceptance 2: after a slot changes owner, a router still holding the old map writes to the new
/// owner after one `wrong shard`, and the old owner never accepts the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_router_is_corrected_by_one_wrong_shard() {
    let pg = InProcCluster::start(2, 1).await;
    let stale = Router::start_with_options(
        RouterConfig {
            listen: "127.0.0.1:0".into(),
            config_addrs: pg.config_addrs.clone(),
        },
        RouterOptions {
            follow_map_updates: false,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let map = shard_map(&pg.router_addr()).await;
    let (sk, slot) = key_owned_by(&map, 1, "moving-order");
    let moved = move_slot(&pg.router_addr(), slot, 2)
        .await
        .expect("moving an empty slot");
    assert_eq!(moved.version, map.version + 1);
    assert_eq!(
        stale.map_version(),
        map.version,
        "the second router must still hold the old map"
    );

    let r = client(&stale.addr.to_string())
        .put(sk.clone(), "", "paid", None)
        .await
        .expect("put through the stale router");
    assert_eq!(r.version, 1);
    assert_eq!(
        stale.stats().wrong_shard,
        1,
        "exactly one wrong-shard answer corrected the router"
    );
    assert_eq!(stale.map_version(), moved.version);

    // The old owner refuses the slot, even to a client that comes straight to it.
    let old_owner = pg.groups[&1][0].addr.to_string();
    let mut kv = KvClient::new(endpoint(&old_owner).unwrap().connect().await.unwrap());
    let get = GetRequest {
        shard_key: sk.clone().into(),
        consistency: 1,
        ..Default::default()
    };
    let e = kv.get(get).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let put = PutRequest {
        shard_key: sk.clone().into(),
        value: "sneaky".into(),
        ..Default::default()
    };
    assert_eq!(
        kv.put(put).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let new_owner = pg.groups[&2][0].addr.to_string();
    let mut kv = KvClient::new(endpoint(&new_owner).unwrap().connect().await.unwrap());
    let got = kv
        .get(GetRequest {
            shard_key: sk.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (got.found, got.value.as_ref(), got.version),
        (true, &b"paid"[..], 1)
    );
    stale.shutdown().await;
    pg.shutdown().await;
}

/// Acceptance 3: with the config leader killed, routers keep serving data from their cached map;
/// map reads and changes work again once a new config leader exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routers_serve_through_a_meta_leader_loss() {
    let mut pg = InProcCluster::start(2, 1).await;
    let c = client(&pg.router_addr());
    c.put("before", "", "x", None).await.unwrap();
    let leader = pg.wait_leader(CONFIG_GROUP, Duration::from_secs(10)).await;
    pg.kill(leader).await;

    for i in 0..100 {
        c.put(format!("during-{i}"), "", "x", None)
            .await
            .expect("data keeps flowing without a config leader");
    }
    let map = wait_for(
        "a linearizable map read after the config leader loss",
        Duration::from_secs(10),
        || async {
            let mut cc = cluster(&pg.router_addr()).await;
            cc.get_shard_map(GetShardMapRequest { linearizable: true })
                .await
                .ok()
                .map(|r| r.into_inner())
        },
    )
    .await;
    let (_, slot) = key_owned_by(&map, 1, "empty-slot");
    let moved = move_slot(&pg.router_addr(), slot, 2)
        .await
        .expect("map change under the new config leader");
    wait_for(
        "the router to follow the new map",
        Duration::from_secs(10),
        || {
            let v = pg.router.map_version();
            async move { (v == moved.version).then_some(()) }
        },
    )
    .await;
    for i in 0..100 {
        let r = c.get(format!("during-{i}"), "", false).await.unwrap();
        assert!(r.found);
    }
    pg.shutdown().await;
}

/// Acceptance 4: two routers serve the same cluster concurrently; restarting one loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_routers_and_a_router_restart_lose_nothing() {
    let pg = InProcCluster::start(2, 1).await;
    let second = Router::start(RouterConfig {
        listen: "127.0.0.1:0".into(),
        config_addrs: pg.config_addrs.clone(),
    })
    .await
    .unwrap();
    let second_addr = second.addr.to_string();
    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Default::default();
    let routers = [pg.router_addr(), second_addr.clone()];
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let c = client(&routers[w % 2]);
            let acked = acked.clone();
            tokio::spawn(async move {
                for i in 0..150 {
                    let sk = format!("w{w}-{i}");
                    // A write that fails while its router restarts is simply not acknowledged.
                    if let Ok(r) = c.put(sk.clone(), "", "x", None).await {
                        acked.lock().unwrap().insert(sk, r.version);
                    }
                }
            })
        })
        .collect();
    wait_for(
        "writes through both routers",
        Duration::from_secs(30),
        || {
            let n = acked.lock().unwrap().len();
            async move { (n >= 300).then_some(()) }
        },
    )
    .await;
    second.shutdown().await;
    let restarted = Router::start(RouterConfig {
        listen: second_addr.clone(),
        config_addrs: pg.config_addrs.clone(),
    })
    .await
    .unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 300);
    for addr in [pg.router_addr(), second_addr] {
        let c = client(&addr);
        for (sk, version) in &acked {
            let r = c.get(sk.clone(), "", false).await.unwrap();
            assert!(
                r.found && r.version == *version,
                "{sk} acknowledged at v{version}, read {r:?} via {addr}"
            );
        }
    }
    eprintln!(
        "{} acknowledged writes through two routers, one restarted",
        acked.len()
    );
    restarted.shutdown().await;
    pg.shutdown().await;
}

fn spec(id: u64, addrs: &[&str]) -> ordo_proto::v1::GroupSpec {
    ordo_proto::v1::GroupSpec {
        id,
        addrs: addrs.iter().map(|a| a.to_string()).collect(),
    }
}

/// Bad input at init: overlapping, unreachable and mislabelled addresses, a group id used twice,
/// and an init on an initialized cluster each get an error that says what to fix, and leave no
/// trace (map version 0, the groups' ownership untouched); then a good init goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
// One table of refused inits, each checked to leave no trace, then the good one: a list.
#[allow(clippy::too_many_lines)]
async fn init_refuses_bad_input_and_is_all_or_nothing() {
    use ordo_proto::v1::InitClusterRequest;
    let dir = tempfile::tempdir().unwrap();
    let lone = |group: u64| lone_node(dir.path().join(format!("group-{group}")), group);
    let meta = lone(0).await;
    let g1 = lone(1).await;
    let g2 = lone(2).await;
    let (m, a1, a2) = (
        meta.addr.to_string(),
        g1.addr.to_string(),
        g2.addr.to_string(),
    );
    for addr in [&m, &a1, &a2] {
        wait_for(
            "a single replica to lead",
            Duration::from_secs(10),
            || async {
                node_status(addr, false)
                    .await
                    .filter(|s| s.leader_id != 0)
                    .map(|_| ())
            },
        )
        .await;
    }
    let dead = ordo_testkit::ports::free_addr();
    let init = |slot_count: u32, groups: Vec<ordo_proto::v1::GroupSpec>| {
        let m = m.clone();
        async move {
            cluster(&m)
                .await
                .init_cluster(InitClusterRequest { slot_count, groups })
                .await
        }
    };
    let slots = ordo::limits::SLOT_COUNT_DEFAULT;
    let refused: [(u32, Vec<ordo_proto::v1::GroupSpec>, Code, &str); 6] = [
        (
            slots,
            vec![spec(1, &[&a1]), spec(2, &[&a1])],
            Code::FailedPrecondition,
            "is listed for group 2 and group 1",
        ),
        (
            slots,
            vec![spec(1, &[&a1]), spec(1, &[&a2])],
            Code::FailedPrecondition,
            "used twice",
        ),
        (
            slots,
            vec![spec(1, &[&a1]), spec(2, &[&dead])],
            Code::FailedPrecondition,
            "start it or fix the address",
        ),
        (
            slots,
            vec![spec(1, &[&a2]), spec(2, &[&a1])],
            Code::FailedPrecondition,
            "is a replica of group 2, not group 1",
        ),
        (slots, vec![], Code::InvalidArgument, "no groups given"),
        (
            64,
            vec![spec(1, &[&a1]), spec(2, &[&a2])],
            Code::FailedPrecondition,
            "the map has 64 slots but this group was created with",
        ),
    ];
    for (slot_count, groups, code, says) in refused {
        let what = format!("{slot_count} slots, {groups:?}");
        let e = init(slot_count, groups).await.expect_err(&what);
        assert_eq!(e.code(), code, "{what}: {e:?}");
        assert!(
            e.message().contains(says),
            "{what}: {:?} should say {says:?}",
            e.message()
        );
        assert_eq!(
            shard_map(&m).await.version,
            0,
            "a refused init left a map behind"
        );
        for a in [&a1, &a2] {
            let s = node_status(a, false).await.unwrap();
            assert_eq!(
                (s.map_version, s.owned_slots),
                (0, slots),
                "{a} still standalone after {what}"
            );
        }
    }

    let map = init(slots, vec![spec(1, &[&a1]), spec(2, &[&a2])])
        .await
        .expect("a good init")
        .into_inner();
    assert_eq!(
        (map.version, map.slot_count, map.groups.len()),
        (1, slots, 2)
    );
    let owned: Vec<u32> = [&a1, &a2]
        .iter()
        .map(|a| async move { node_status(a, false).await.unwrap().owned_slots })
        .collect::<futures::stream::FuturesOrdered<_>>()
        .collect()
        .await;
    assert_eq!(
        owned,
        [slots / 2, slots / 2],
        "each group installed its half of the slots"
    );

    let e = init(slots, vec![spec(1, &[&a1]), spec(2, &[&a2])])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("already initialized"),
        "{}",
        e.message()
    );
    assert_eq!(shard_map(&m).await, map, "a second init changed nothing");
    for n in [g1, g2, meta] {
        n.shutdown().await;
    }
}
