//! The router against in-process fake nodes and config servers (real gRPC on loopback, port 0).
//! Nothing here sleeps to synchronise: every wait is on a condition, under a bound.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use ordo_proto::slot_of;
use ordo_proto::v1::cluster_client::ClusterClient;
use ordo_proto::v1::cluster_server::{Cluster, ClusterServer};
use ordo_proto::v1::kv_client::KvClient;
use ordo_proto::v1::kv_server::{Kv, KvServer};
use ordo_proto::v1::*;
use ordo_router::{Router, RouterConfig, RouterOptions};
use prost::Message;
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

const SLOTS: u32 = 16;
/// Bound on any wait for something that should happen at once.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Fake node

#[derive(Clone, Debug)]
struct Seen {
    op: &'static str,
    shard_key: Bytes,
    map_version: u64,
    grpc_timeout: Option<String>,
}

type Behaviour = Arc<dyn Fn(&Seen) -> Option<Status> + Send + Sync>;

struct FakeNode {
    name: &'static str,
    seen: Arc<Mutex<Vec<Seen>>>,
    behave: Behaviour,
}

impl FakeNode {
    fn record<T>(
        &self,
        op: &'static str,
        req: &Request<T>,
        shard_key: Bytes,
        header: Option<&RequestHeader>,
    ) -> Result<(), Status> {
        let seen = Seen {
            op,
            shard_key,
            map_version: header.map(|h| h.map_version).unwrap_or(0),
            grpc_timeout: req
                .metadata()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        };
        self.seen.lock().unwrap().push(seen.clone());
        match (self.behave)(&seen) {
            Some(status) => Err(status),
            None => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl Kv for FakeNode {
    async fn get(&self, r: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let m = r.get_ref();
        self.record("Get", &r, m.shard_key.clone(), m.header.as_ref())?;
        Ok(Response::new(GetResponse {
            found: true,
            value: Bytes::from_static(self.name.as_bytes()),
            version: 1,
        }))
    }
    async fn put(&self, r: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let m = r.get_ref();
        self.record("Put", &r, m.shard_key.clone(), m.header.as_ref())?;
        Ok(Response::new(PutResponse {
            succeeded: true,
            version: 1,
        }))
    }
    async fn delete(&self, r: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let m = r.get_ref();
        self.record("Delete", &r, m.shard_key.clone(), m.header.as_ref())?;
        Ok(Response::new(DeleteResponse::default()))
    }
    async fn scan(&self, r: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let m = r.get_ref();
        self.record("Scan", &r, m.shard_key.clone(), m.header.as_ref())?;
        Ok(Response::new(ScanResponse::default()))
    }
    async fn txn(&self, r: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let m = r.get_ref();
        let sk = m
            .compares
            .first()
            .map(|c| c.shard_key.clone())
            .unwrap_or_default();
        self.record("Txn", &r, sk, m.header.as_ref())?;
        Ok(Response::new(TxnResponse {
            succeeded: true,
            results: vec![],
        }))
    }
}

/// A running fake server; stops when dropped.
struct Served<S> {
    addr: String,
    state: S,
    task: tokio::task::JoinHandle<()>,
}

impl<S> Drop for Served<S> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn listen() -> (tokio::net::TcpListener, String) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

async fn spawn_node(
    name: &'static str,
    behave: impl Fn(&Seen) -> Option<Status> + Send + Sync + 'static,
) -> Served<Arc<Mutex<Vec<Seen>>>> {
    let (listener, addr) = listen().await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let node = FakeNode {
        name,
        seen: seen.clone(),
        behave: Arc::new(behave),
    };
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(KvServer::new(node))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    Served {
        addr,
        state: seen,
        task,
    }
}

async fn healthy_node(name: &'static str) -> Served<Arc<Mutex<Vec<Seen>>>> {
    spawn_node(name, |_| None).await
}

fn seen(node: &Served<Arc<Mutex<Vec<Seen>>>>) -> Vec<Seen> {
    node.state.lock().unwrap().clone()
}

// ---------------------------------------------------------------------------------------------
// Fake config server

#[derive(Default)]
struct ConfigState {
    /// What GetShardMap answers.
    map: Mutex<ShardMap>,
    /// What WatchShardMap streams (kept apart so that a test can make the watch lag).
    feed: Mutex<Option<watch::Sender<ShardMap>>>,
    gets: AtomicUsize,
    linearizable_gets: AtomicUsize,
    inits: AtomicUsize,
    /// Answer map changes with NotLeader naming this address.
    redirect_writes_to: Mutex<Option<String>>,
}

impl ConfigState {
    /// Changes what GetShardMap answers, and (if `publish`) what watchers get.
    fn set_map(&self, map: ShardMap, publish: bool) {
        *self.map.lock().unwrap() = map.clone();
        if publish {
            self.feed
                .lock()
                .unwrap()
                .as_ref()
                .unwrap()
                .send_replace(map);
        }
    }
}

struct FakeConfig(Arc<ConfigState>);

type MapStream = Pin<Box<dyn Stream<Item = Result<ShardMap, Status>> + Send>>;

fn not_leader(leader_addr: &str) -> Status {
    let d = ErrorDetail {
        kind: Some(error_detail::Kind::NotLeader(error_detail::NotLeader {
            leader_id: 9,
            leader_addr: leader_addr.to_string(),
        })),
    };
    Status::with_details(Code::Unavailable, "not leader", d.encode_to_vec().into())
}

fn not_applied(msg: &str) -> Status {
    let d = ErrorDetail {
        kind: Some(error_detail::Kind::NotApplied(error_detail::NotApplied {})),
    };
    Status::with_details(Code::Unavailable, msg.to_string(), d.encode_to_vec().into())
}

fn wrong_shard(map_version: u64) -> Status {
    let d = ErrorDetail {
        kind: Some(error_detail::Kind::WrongShard(error_detail::WrongShard {
            map_version,
        })),
    };
    Status::with_details(
        Code::FailedPrecondition,
        "wrong shard",
        d.encode_to_vec().into(),
    )
}

#[tonic::async_trait]
impl Cluster for FakeConfig {
    async fn get_shard_map(
        &self,
        r: Request<GetShardMapRequest>,
    ) -> Result<Response<ShardMap>, Status> {
        self.0.gets.fetch_add(1, Ordering::SeqCst);
        if r.get_ref().linearizable {
            self.0.linearizable_gets.fetch_add(1, Ordering::SeqCst);
        }
        Ok(Response::new(self.0.map.lock().unwrap().clone()))
    }

    type WatchShardMapStream = MapStream;

    async fn watch_shard_map(
        &self,
        r: Request<WatchShardMapRequest>,
    ) -> Result<Response<MapStream>, Status> {
        let after = r.into_inner().after_version;
        let rx = self.0.feed.lock().unwrap().as_ref().unwrap().subscribe();
        let stream = futures::stream::unfold((rx, after), |(mut rx, last)| async move {
            loop {
                let cur = rx.borrow_and_update().clone();
                if cur.version > last {
                    let v = cur.version;
                    return Some((Ok(cur), (rx, v)));
                }
                rx.changed().await.ok()?;
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn init_cluster(
        &self,
        r: Request<InitClusterRequest>,
    ) -> Result<Response<ShardMap>, Status> {
        if let Some(leader) = self.0.redirect_writes_to.lock().unwrap().clone() {
            return Err(not_leader(&leader));
        }
        self.0.inits.fetch_add(1, Ordering::SeqCst);
        let req = r.into_inner();
        let old = self.0.map.lock().unwrap().version;
        if old > 0 {
            return Err(Status::failed_precondition("already initialized"));
        }
        let groups: Vec<Group> = req
            .groups
            .iter()
            .map(|g| Group {
                id: g.id,
                replicas: g
                    .addrs
                    .iter()
                    .enumerate()
                    .map(|(i, a)| Replica {
                        node_id: g.id * 10 + i as u64,
                        addr: a.clone(),
                    })
                    .collect(),
            })
            .collect();
        let slot_owner = (0..req.slot_count as usize)
            .map(|s| groups[s % groups.len()].id)
            .collect();
        let map = ShardMap {
            version: old + 1,
            slot_count: req.slot_count,
            groups,
            slot_owner,
            config_addrs: vec![],
        };
        self.0.set_map(map.clone(), true);
        Ok(Response::new(map))
    }

    async fn add_group(&self, _: Request<AddGroupRequest>) -> Result<Response<ShardMap>, Status> {
        Err(Status::unimplemented("AddGroup"))
    }
    async fn remove_group(
        &self,
        _: Request<RemoveGroupRequest>,
    ) -> Result<Response<ShardMap>, Status> {
        Err(Status::unimplemented("RemoveGroup"))
    }
    async fn move_slots(&self, _: Request<MoveSlotsRequest>) -> Result<Response<ShardMap>, Status> {
        Err(Status::unimplemented("MoveSlots"))
    }
    async fn change_group_replicas(
        &self,
        _: Request<ordo_proto::v1::ChangeGroupReplicasRequest>,
    ) -> Result<Response<ordo_proto::v1::ChangeGroupReplicasResponse>, Status> {
        Err(Status::unimplemented("ChangeGroupReplicas"))
    }
    async fn get_cluster_status(
        &self,
        _: Request<GetClusterStatusRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        Err(Status::unimplemented("GetClusterStatus"))
    }

    async fn list_migrations(
        &self,
        _: Request<ListMigrationsRequest>,
    ) -> Result<Response<MigrationList>, Status> {
        Err(Status::unimplemented("ListMigrations"))
    }

    async fn abort_migration(
        &self,
        _: Request<AbortMigrationRequest>,
    ) -> Result<Response<Migration>, Status> {
        Err(Status::unimplemented("AbortMigration"))
    }

    async fn rebalance(
        &self,
        _: Request<RebalanceRequest>,
    ) -> Result<Response<RebalanceResponse>, Status> {
        Err(Status::unimplemented("Rebalance"))
    }
}

async fn spawn_config(map: ShardMap) -> Served<Arc<ConfigState>> {
    let (listener, addr) = listen().await;
    let state = Arc::new(ConfigState::default());
    *state.feed.lock().unwrap() = Some(watch::channel(map.clone()).0);
    state.set_map(map, false);
    let svc = FakeConfig(state.clone());
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(ClusterServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    Served { addr, state, task }
}

// ---------------------------------------------------------------------------------------------
// Maps, keys, clients

/// Slots 0..8 belong to group 1, 8..16 to group 2.
fn map_v(version: u64, g1: &[&str], g2: &[&str]) -> ShardMap {
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
fn key_of_group(group: u64, nth: usize) -> Bytes {
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

async fn start_router(config_addrs: Vec<String>) -> Router {
    Router::start(RouterConfig {
        listen: "127.0.0.1:0".into(),
        config_addrs,
    })
    .await
    .unwrap()
}

async fn kv(router: &Router) -> KvClient<Channel> {
    KvClient::connect(format!("http://{}", router.addr))
        .await
        .unwrap()
}

async fn cluster(router: &Router) -> ClusterClient<Channel> {
    ClusterClient::connect(format!("http://{}", router.addr))
        .await
        .unwrap()
}

fn with_timeout<T>(msg: T, t: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(t);
    r
}

fn put_req(shard_key: Bytes) -> PutRequest {
    PutRequest {
        header: None,
        shard_key,
        key: Bytes::from_static(b"k"),
        value: Bytes::from_static(b"v"),
        if_version: None,
    }
}

fn get_req(shard_key: Bytes) -> GetRequest {
    GetRequest {
        header: None,
        shard_key,
        key: Bytes::new(),
        consistency: 0,
    }
}

/// A local address nothing listens on.
async fn closed_addr() -> String {
    let (l, addr) = listen().await;
    drop(l);
    addr
}

// ---------------------------------------------------------------------------------------------
// Tests

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

#[tokio::test]
async fn retries_are_bounded_by_attempts_and_by_the_deadline() {
    let node = spawn_node("down", |s| {
        Some(match s.op {
            "Get" => Status::unavailable("no leader elected yet"),
            _ => not_applied("leader overloaded"),
        })
    })
    .await;
    let other = healthy_node("g2").await;
    let config = spawn_config(map_v(1, &[&node.addr], &[&other.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut c = kv(&router).await;
    let k = key_of_group(1, 0);

    // Plenty of time: the attempts run out first.
    let deadline = Duration::from_secs(8);
    let started = Instant::now();
    let err = c
        .get(with_timeout(get_req(k.clone()), deadline))
        .await
        .unwrap_err();
    assert!(started.elapsed() < deadline);
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().starts_with("group 1: 12 attempts over "),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains(&format!(
            "last error from {}: Unavailable: no leader elected yet",
            node.addr
        )),
        "{}",
        err.message()
    );
    assert!(
        err.details().is_empty(),
        "a router's give-up carries no node hint"
    );
    assert_eq!(seen(&node).len(), 12);

    // A write refused with NotApplied every time: retried as often, and the give-up says that
    // nothing was applied (typed, so a client may retry it).
    let started = Instant::now();
    let err = c
        .put(with_timeout(put_req(k.clone()), deadline))
        .await
        .unwrap_err();
    assert!(started.elapsed() < deadline);
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().starts_with("group 1: 12 attempts over "),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains(&format!(
            "last error from {}: not applied: leader overloaded",
            node.addr
        )),
        "{}",
        err.message()
    );
    assert!(
        err.message().ends_with("the write was not applied"),
        "{}",
        err.message()
    );
    assert!(
        matches!(
            ErrorDetail::decode(err.details()).unwrap().kind,
            Some(error_detail::Kind::NotApplied(_))
        ),
        "{err:?}"
    );
    assert_eq!(seen(&node).len(), 24);

    // A short deadline: the router gives up within it, still with UNAVAILABLE.
    let deadline = Duration::from_millis(300);
    let started = Instant::now();
    let err = c.get(with_timeout(get_req(k), deadline)).await.unwrap_err();
    assert!(started.elapsed() < deadline + Duration::from_millis(200));
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("deadline"), "{}", err.message());
    let attempts = seen(&node).len() - 24;
    assert!((1..12).contains(&attempts), "{attempts}");
    router.shutdown().await;
}

#[tokio::test]
async fn a_write_with_an_unknown_outcome_is_not_retried() {
    // The first replica answers writes with a plain UNAVAILABLE, as a node does when it stopped
    // after proposing: the write may have been applied.
    let unsure = spawn_node("unsure", |s| {
        (s.op != "Get").then(|| {
            Status::unavailable("the replica stopped during the write; its outcome is unknown")
        })
    })
    .await;
    let live = healthy_node("live").await;
    let other = healthy_node("g2").await;
    let config = spawn_config(map_v(1, &[&unsure.addr, &live.addr], &[&other.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut c = kv(&router).await;
    let k = key_of_group(1, 0);

    for op in ["Put", "Delete", "Txn"] {
        let err = match op {
            "Put" => c.put(put_req(k.clone())).await.unwrap_err(),
            "Delete" => c
                .delete(DeleteRequest {
                    shard_key: k.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
            _ => c
                .txn(TxnRequest {
                    compares: vec![Compare {
                        shard_key: k.clone(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        };
        assert_eq!(err.code(), Code::Unavailable, "{op}");
        assert!(
            err.message()
                .contains(&format!("the outcome of this {op} is unknown")),
            "{}",
            err.message()
        );
        assert!(
            err.message()
                .contains("the replica stopped during the write"),
            "says what happened: {}",
            err.message()
        );
        assert!(err.details().is_empty(), "{op}");
    }
    assert_eq!(seen(&unsure).len(), 3, "one attempt per write");
    assert!(seen(&live).is_empty(), "no write was retried elsewhere");

    // A write refused with NotApplied is retried at the next replica.
    let refusing = spawn_node("refusing", |_| {
        Some(not_applied(
            "leadership changed and this write was replaced in the log: it was NOT applied",
        ))
    })
    .await;
    let config = spawn_config(map_v(1, &[&refusing.addr, &live.addr], &[&other.addr])).await;
    let router2 = start_router(vec![config.addr.clone()]).await;
    let mut c2 = kv(&router2).await;
    let resp = c2.put(put_req(k.clone())).await.unwrap().into_inner();
    assert!(resp.succeeded);
    assert_eq!(seen(&refusing).len(), 1);
    assert_eq!(seen(&live).len(), 1);

    // Reads still move on after a plain UNAVAILABLE.
    let flaky_reads = spawn_node("flaky", |_| Some(Status::unavailable("no leader yet"))).await;
    let config = spawn_config(map_v(1, &[&flaky_reads.addr, &live.addr], &[&other.addr])).await;
    let router3 = start_router(vec![config.addr.clone()]).await;
    let got = kv(&router3)
        .await
        .get(get_req(k))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, "live");
    router.shutdown().await;
    router2.shutdown().await;
    router3.shutdown().await;
}

/// A fake node that accepts HTTP/2 connections, waits until a request's body has arrived, and
/// then drops the connection: a node killed after it received the request. Counts the requests
/// whose body it received.
async fn spawn_breaking_node() -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (listener, addr) = listen().await;
    let received = Arc::new(AtomicUsize::new(0));
    let count = received.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let count = count.clone();
            tokio::spawn(async move {
                // An empty SETTINGS frame, so the client's handshake never waits on us.
                let _ = sock.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                const PREFACE: usize = 24;
                loop {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    // Walk the frames after the preface: a DATA frame (type 0) on a stream means
                    // the request was sent.
                    let mut at = PREFACE;
                    while buf.len() >= at + 9 {
                        let len =
                            u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
                        let kind = buf[at + 3];
                        if buf.len() < at + 9 + len {
                            break;
                        }
                        if kind == 0 {
                            count.fetch_add(1, Ordering::SeqCst);
                            drop(sock); // the node dies with the request in hand
                            return;
                        }
                        at += 9 + len;
                    }
                }
            });
        }
    });
    (addr, received, task)
}

#[tokio::test]
async fn a_write_whose_connection_breaks_mid_request_is_reported_as_unknown() {
    let (breaking, received, _task) = spawn_breaking_node().await;
    let live = healthy_node("live").await;
    let other = healthy_node("g2").await;
    let config = spawn_config(map_v(1, &[&breaking, &live.addr], &[&other.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut c = kv(&router).await;
    let k = key_of_group(1, 0);

    let err = c.put(put_req(k.clone())).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("the outcome of this Put is unknown"),
        "{}",
        err.message()
    );
    assert!(err.message().contains(&breaking), "{}", err.message());
    assert_eq!(received.load(Ordering::SeqCst), 1);
    assert!(
        seen(&live).is_empty(),
        "the write was not retried elsewhere"
    );

    // A read in the same situation moves on to the next replica.
    let got = c.get(get_req(k)).await.unwrap().into_inner();
    assert_eq!(got.value, "live");
    assert_eq!(received.load(Ordering::SeqCst), 2);
    router.shutdown().await;
}

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

/// A slot in a migration's critical section: the router holds the write (more times than its
/// attempt bound) and retries the same replica until the donor lets go, then succeeds; the
/// client sees latency, not an error.
#[tokio::test]
async fn a_moving_slot_is_held_and_retried_beyond_the_attempt_bound() {
    let refusals = Arc::new(AtomicUsize::new(0));
    let counted = refusals.clone();
    let node = spawn_node("donor", move |_| {
        if counted.fetch_add(1, Ordering::SeqCst) < 20 {
            let d = ErrorDetail {
                kind: Some(error_detail::Kind::SlotMoving(error_detail::SlotMoving {
                    slot: 1,
                    migration_id: 7,
                })),
            };
            Some(Status::with_details(
                Code::Unavailable,
                "slot moving",
                d.encode_to_vec().into(),
            ))
        } else {
            None
        }
    })
    .await;
    let other = healthy_node("g2").await;
    let config = spawn_config(map_v(1, &[&node.addr], &[&other.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut c = kv(&router).await;
    let resp = c
        .put(put_req(key_of_group(1, 0)))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.succeeded);
    assert_eq!(seen(&node).len(), 21, "20 holds, then the write");
    router.shutdown().await;
}
