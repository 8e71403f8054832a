//! The clients against scripted nodes on port 0: leader following, retry rules, bounds.

use super::*;
use crate::retry::classify;
use crate::status::with_detail;
use crate::v1::{
    AddGroupRequest, ClusterStatus, DeleteRequest, DeleteResponse, GetClusterStatusRequest,
    GetRequest, GetResponse, GetShardMapRequest, InitClusterRequest, MoveSlotsRequest, PutRequest,
    PutResponse, RemoveGroupRequest, ScanRequest, ScanResponse, ShardMap, TxnRequest, TxnResponse,
    WatchShardMapRequest,
};
use bytes::Bytes;
use tonic::Code;

fn not_leader(leader_id: u64, leader_addr: &str) -> Status {
    with_detail(
        Code::Unavailable,
        "not leader",
        error_detail::Kind::NotLeader(error_detail::NotLeader {
            leader_id,
            leader_addr: leader_addr.to_string(),
        }),
    )
}

/// What the node's `Error::NotApplied(msg)` turns into.
fn not_applied(msg: &str) -> Status {
    with_detail(
        Code::Unavailable,
        msg,
        error_detail::Kind::NotApplied(error_detail::NotApplied {}),
    )
}

#[test]
fn addresses_are_normalised() {
    assert_eq!(
        normalize_addr("127.0.0.1:7001").unwrap(),
        "http://127.0.0.1:7001"
    );
    assert_eq!(
        normalize_addr(" localhost:7001/ ").unwrap(),
        "http://localhost:7001"
    );
    assert_eq!(
        normalize_addr("http://10.0.0.1:7001").unwrap(),
        "http://10.0.0.1:7001"
    );
    assert_eq!(normalize_addr("[::1]:7001").unwrap(), "http://[::1]:7001");
    assert!(normalize_addr("").is_err());
    assert!(normalize_addr("  ").is_err());
    assert!(normalize_addr("http://").is_err());
    assert!(normalize_addr("https://a:1").is_err());
    assert!(normalize_addr("grpc://a:1").is_err());
}

#[test]
fn connect_validates_and_dedups_without_a_runtime() {
    let c = Client::connect(vec![
        "127.0.0.1:7001".into(),
        "http://127.0.0.1:7001".into(),
        "127.0.0.1:7002".into(),
    ])
    .unwrap();
    assert_eq!(
        c.endpoints(),
        ["http://127.0.0.1:7001", "http://127.0.0.1:7002"]
    );
    assert_eq!(c.timeout(), DEFAULT_TIMEOUT);
    assert_eq!(
        c.with_timeout(Duration::from_secs(3)).timeout(),
        Duration::from_secs(3)
    );
    assert!(Client::connect(vec![]).is_err());
    assert!(Client::connect(vec!["bad host:1".into()]).is_err());
}

#[test]
fn backoff_doubles_from_20ms_and_is_capped() {
    let backoff = |retry| BACKOFF.delay(retry);
    assert_eq!(backoff(0), Duration::from_millis(20));
    assert_eq!(backoff(1), Duration::from_millis(40));
    assert_eq!(backoff(4), Duration::from_millis(320));
    assert_eq!(backoff(5), BACKOFF.max);
    let mut prev = Duration::ZERO;
    for retry in 0..100 {
        let d = backoff(retry);
        assert!(d >= prev && d <= BACKOFF.max && d >= BACKOFF.first);
        prev = d;
    }
    // Even if every attempt backs off fully, the attempts fit in the default deadline.
    let worst: Duration = (0..MAX_ATTEMPTS).map(backoff).sum();
    assert!(worst < DEFAULT_TIMEOUT, "{worst:?}");
}

#[test]
fn statuses_are_classified() {
    use Effect::{IdempotentWrite, Read, StaleRead, Write};
    // What the client retries: a hint (followed), a rotation, a hold; anything else comes back.
    for effect in [Read, StaleRead, Write, IdempotentWrite] {
        assert_eq!(
            classify(&not_leader(2, "127.0.0.1:7002"), effect),
            Action::Redirect("127.0.0.1:7002".into())
        );
        assert_eq!(classify(&not_leader(0, ""), effect), Action::Rotate);
        assert_eq!(classify(&not_leader(2, ""), effect), Action::Rotate);
        assert_eq!(classify(&not_applied("full"), effect), Action::Rotate);
        assert!(!classify(&Status::invalid_argument("key too long"), effect).retries());
        assert!(!classify(&Status::deadline_exceeded("slow"), effect).retries());
        assert!(!classify(&Status::unknown("connection reset"), effect).retries());
        let s = with_detail(
            Code::Unavailable,
            "x",
            error_detail::Kind::WrongShard(error_detail::WrongShard { map_version: 3 }),
        );
        assert!(!classify(&s, effect).retries());
    }
    // A plain Unavailable: a read or a map change moves on, a write may have been applied.
    let plain = Status::unavailable("no leader elected yet");
    for effect in [Read, StaleRead, IdempotentWrite] {
        assert_eq!(classify(&plain, effect), Action::Rotate);
    }
    assert!(!classify(&plain, Write).retries());
    // Garbage details are ignored rather than trusted.
    let junk = Status::with_details(Code::Unavailable, "x", Bytes::from_static(b"\xff\xff"));
    assert_eq!(classify(&junk, Read), Action::Rotate);
    assert!(!classify(&junk, Write).retries());
}

#[test]
fn rerouting_follows_hints_and_rotates() {
    let c = Core::new(vec!["a:1".into(), "b:1".into(), "c:1".into()]).unwrap();
    assert_eq!(c.target(), "a:1");
    c.reroute("a:1", Action::Redirect("c:1".into()));
    assert_eq!(c.target(), "c:1");
    assert_eq!(c.leader().as_deref(), Some("http://c:1"));
    // The leader failed: forget it and move past it in the list.
    c.reroute("c:1", Action::Rotate);
    assert_eq!(c.leader(), None);
    assert_eq!(c.target(), "a:1");
    c.reroute("a:1", Action::Rotate);
    assert_eq!(c.target(), "b:1");
    // A failure on an address other than the remembered leader leaves the leader alone.
    c.reroute("b:1", Action::Redirect("a:1".into()));
    c.reroute("b:1", Action::Rotate);
    assert_eq!(c.target(), "a:1");
}

#[tokio::test]
async fn unreachable_nodes_give_unavailable_within_the_deadline() {
    // Port 1 on localhost refuses connections: every attempt is a retryable Unavailable.
    let c = Client::connect(vec!["127.0.0.1:1".into()])
        .unwrap()
        .with_timeout(Duration::from_millis(300));
    let start = std::time::Instant::now();
    let err = c.get("o", "k", false).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(2));
}

/// A scripted node serving both Kv and Cluster: answers every request according to `reply`
/// and counts the calls.
mod fake {
    use super::*;
    use crate::v1::cluster_server::{Cluster, ClusterServer};
    use crate::v1::kv_server::{Kv, KvServer};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tonic::{Request, Response};

    #[derive(Clone)]
    pub enum Reply {
        Serve,
        NotLeader(String),
        Unavailable,
        NotApplied,
        Invalid,
    }

    pub struct Node {
        pub reply: Mutex<Reply>,
        pub calls: AtomicUsize,
        pub consistency: Mutex<Option<i32>>,
        pub linearizable: Mutex<Option<bool>>,
        /// The idempotency key of every write it was sent.
        pub keys: Mutex<Vec<bytes::Bytes>>,
    }

    impl Node {
        pub fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        fn answer<T>(&self, ok: T) -> Result<Response<T>, Status> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            match self.reply.lock().unwrap().clone() {
                Reply::Serve => Ok(Response::new(ok)),
                Reply::NotLeader(addr) => Err(not_leader(2, &addr)),
                Reply::Unavailable => Err(Status::unavailable("no leader elected yet")),
                Reply::NotApplied => Err(not_applied("leader overloaded")),
                Reply::Invalid => Err(Status::invalid_argument("bad key")),
            }
        }
    }

    /// The service wrapper (the trait cannot be implemented for `Arc<Node>` directly).
    struct Svc(Arc<Node>);

    #[tonic::async_trait]
    impl Kv for Svc {
        async fn get(&self, r: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
            *self.0.consistency.lock().unwrap() = Some(r.get_ref().consistency);
            let value = r.into_inner().key;
            self.0.answer(GetResponse {
                found: true,
                value,
                version: 1,
            })
        }
        async fn put(&self, r: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
            let key = r.into_inner().header.unwrap_or_default().idempotency_key;
            self.0.keys.lock().unwrap().push(key);
            self.0.answer(PutResponse {
                succeeded: true,
                version: 2,
            })
        }
        async fn delete(
            &self,
            _: Request<DeleteRequest>,
        ) -> Result<Response<DeleteResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn scan(&self, _: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn txn(&self, r: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
            let key = r.into_inner().header.unwrap_or_default().idempotency_key;
            self.0.keys.lock().unwrap().push(key);
            self.0.answer(TxnResponse {
                succeeded: true,
                results: vec![],
            })
        }
    }

    /// A map of `version` whose slots `0..owners.len()` belong to `owners`.
    pub fn map(version: u64, owners: Vec<u64>) -> ShardMap {
        ShardMap {
            version,
            slot_count: owners.len() as u32,
            slot_owner: owners,
            ..ShardMap::default()
        }
    }

    #[tonic::async_trait]
    impl Cluster for Svc {
        async fn get_shard_map(
            &self,
            r: Request<GetShardMapRequest>,
        ) -> Result<Response<ShardMap>, Status> {
            *self.0.linearizable.lock().unwrap() = Some(r.get_ref().linearizable);
            self.0.answer(map(1, vec![1, 2]))
        }

        type WatchShardMapStream = tokio_stream::Iter<std::vec::IntoIter<Result<ShardMap, Status>>>;

        async fn watch_shard_map(
            &self,
            r: Request<WatchShardMapRequest>,
        ) -> Result<Response<Self::WatchShardMapStream>, Status> {
            let after = r.get_ref().after_version;
            self.0.answer(tokio_stream::iter(vec![
                Ok(map(after + 1, vec![1])),
                Ok(map(after + 2, vec![2])),
            ]))
        }

        async fn init_cluster(
            &self,
            r: Request<InitClusterRequest>,
        ) -> Result<Response<ShardMap>, Status> {
            let r = r.into_inner();
            let first = r.groups.first().map_or(0, |g| g.id);
            self.0.answer(map(1, vec![first; r.slot_count as usize]))
        }

        async fn add_group(
            &self,
            _: Request<AddGroupRequest>,
        ) -> Result<Response<ShardMap>, Status> {
            self.0.answer(map(2, vec![]))
        }

        async fn remove_group(
            &self,
            r: Request<RemoveGroupRequest>,
        ) -> Result<Response<ShardMap>, Status> {
            self.0.answer(map(r.get_ref().id, vec![]))
        }

        async fn move_slots(
            &self,
            r: Request<MoveSlotsRequest>,
        ) -> Result<Response<ShardMap>, Status> {
            let r = r.into_inner();
            self.0.answer(map(3, vec![r.to_group; r.slots.len()]))
        }

        async fn change_group_replicas(
            &self,
            _: Request<crate::v1::ChangeGroupReplicasRequest>,
        ) -> Result<Response<crate::v1::ChangeGroupReplicasResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }

        async fn get_cluster_status(
            &self,
            _: Request<GetClusterStatusRequest>,
        ) -> Result<Response<ClusterStatus>, Status> {
            self.0.answer(ClusterStatus {
                map: Some(map(7, vec![])),
                ..ClusterStatus::default()
            })
        }

        async fn list_migrations(
            &self,
            _: Request<crate::v1::ListMigrationsRequest>,
        ) -> Result<Response<crate::v1::MigrationList>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn abort_migration(
            &self,
            _: Request<crate::v1::AbortMigrationRequest>,
        ) -> Result<Response<crate::v1::Migration>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn rebalance(
            &self,
            _: Request<crate::v1::RebalanceRequest>,
        ) -> Result<Response<crate::v1::RebalanceResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn start_task(
            &self,
            _: Request<crate::v1::StartTaskRequest>,
        ) -> Result<Response<crate::v1::Task>, Status> {
            self.0.answer(crate::v1::Task {
                id: 9,
                ..Default::default()
            })
        }

        async fn abort_task(
            &self,
            _: Request<crate::v1::AbortTaskRequest>,
        ) -> Result<Response<crate::v1::Task>, Status> {
            Err(Status::unimplemented("fake"))
        }
    }

    /// Starts a node on a free port; returns its `host:port` and its state.
    pub async fn start(reply: Reply) -> (String, Arc<Node>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let node = Arc::new(Node {
            reply: Mutex::new(reply),
            calls: AtomicUsize::new(0),
            consistency: Mutex::new(None),
            linearizable: Mutex::new(None),
            keys: Mutex::new(Vec::new()),
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(KvServer::new(Svc(node.clone())))
                .add_service(ClusterServer::new(Svc(node.clone())))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (addr, node)
    }
}

#[tokio::test]
async fn follows_the_leader_hint_and_remembers_it() {
    let (b, node_b) = fake::start(fake::Reply::Serve).await;
    let (a, node_a) = fake::start(fake::Reply::NotLeader(b.clone())).await;
    let c = Client::connect(vec![a.clone()]).unwrap();
    let got = c.get("o", "k", false).await.unwrap();
    assert_eq!(got.value, "k");
    assert_eq!(c.leader(), Some(format!("http://{b}")));
    assert_eq!((node_a.calls(), node_b.calls()), (1, 1));
    // The next call goes straight to the remembered leader.
    c.put("o", "k", "v", None).await.unwrap();
    assert_eq!((node_a.calls(), node_b.calls()), (1, 2));
    assert_eq!(
        *node_b.consistency.lock().unwrap(),
        Some(Consistency::Linearizable as i32)
    );
}

#[tokio::test]
async fn rotates_past_nodes_without_a_leader() {
    let (a, node_a) = fake::start(fake::Reply::Unavailable).await;
    let (b, node_b) = fake::start(fake::Reply::NotLeader(String::new())).await;
    let (l, node_l) = fake::start(fake::Reply::Serve).await;
    let c = Client::connect(vec![a, b, l.clone()]).unwrap();
    c.get("o", "k", false).await.unwrap();
    assert_eq!((node_a.calls(), node_b.calls(), node_l.calls()), (1, 1, 1));
    assert_eq!(c.leader(), Some(format!("http://{l}")));
}

#[tokio::test]
async fn m9_writes_are_keyed_and_retried_with_their_key_after_an_unknown_outcome() {
    // A plain Unavailable may come after the write was proposed: the write is sent again with
    // the same key, which the server answers with the first outcome.
    let (a, node_a) = fake::start(fake::Reply::Unavailable).await;
    let (l, node_l) = fake::start(fake::Reply::Serve).await;
    let c = Client::connect(vec![a, l.clone()]).unwrap();
    c.put("o", "k", "v", Some(1)).await.unwrap();
    assert_eq!((node_a.calls(), node_l.calls()), (1, 1));
    let (first, retry) = (
        node_a.keys.lock().unwrap()[0].clone(),
        node_l.keys.lock().unwrap()[0].clone(),
    );
    assert_eq!(first.len(), 16);
    assert_eq!(first, retry, "a retry carries the first attempt's key");
    c.put("o", "k", "v", Some(1)).await.unwrap();
    assert_ne!(
        node_l.keys.lock().unwrap()[1],
        first,
        "a new write has a key of its own"
    );
    // A Txn too, spanning groups or not (a cross-group one keeps its key with its decision).
    let (a, node_a) = fake::start(fake::Reply::Unavailable).await;
    let c = Client::connect(vec![a, l.clone()]).unwrap();
    c.txn(TxnRequest::default()).await.unwrap();
    assert_eq!((node_a.calls(), node_l.calls()), (1, 3));
    let keys = |n: &fake::Node| n.keys.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        keys(&node_a),
        keys(&node_l),
        "the Txn's retry carries its key"
    );

    // Not leader (no hint), NotApplied and a refused connection were certainly not applied.
    let (a, node_a) = fake::start(fake::Reply::NotApplied).await;
    let (b, node_b) = fake::start(fake::Reply::NotLeader(String::new())).await;
    let c = Client::connect(vec!["127.0.0.1:1".into(), a, b, l.clone()]).unwrap();
    c.put("o", "k", "v", Some(1)).await.unwrap();
    assert_eq!((node_a.calls(), node_b.calls(), node_l.calls()), (1, 1, 4));
    assert_eq!(c.leader(), Some(format!("http://{l}")));
}

#[tokio::test]
async fn other_errors_are_returned_at_once() {
    let (a, node_a) = fake::start(fake::Reply::Invalid).await;
    let (b, node_b) = fake::start(fake::Reply::Serve).await;
    let c = Client::connect(vec![a, b]).unwrap();
    let err = c.get("o", "k", false).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "bad key");
    assert_eq!((node_a.calls(), node_b.calls()), (1, 0));
}

#[tokio::test]
async fn gives_up_after_bounded_attempts_with_the_last_error() {
    let (a, node_a) = fake::start(fake::Reply::Unavailable).await;
    let c = Client::connect(vec![a]).unwrap().with_max_attempts(4);
    let err = c.get("o", "k", false).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(err.message(), "no leader elected yet");
    assert_eq!(node_a.calls(), 4);
}

#[tokio::test]
async fn stale_reads_on_one_endpoint_stay_there() {
    let (b, node_b) = fake::start(fake::Reply::Serve).await;
    let (a, node_a) = fake::start(fake::Reply::NotLeader(b)).await;
    let c = Client::connect(vec![a]).unwrap();
    let err = c.get("o", "k", true).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(error_detail_of(&err).is_some(), "details stay inspectable");
    assert_eq!((node_a.calls(), node_b.calls()), (1, 0));
    // Once the replica serves, the stale answer comes from it and no leader is recorded.
    *node_a.reply.lock().unwrap() = fake::Reply::Serve;
    c.get("o", "k", true).await.unwrap();
    assert_eq!(
        *node_a.consistency.lock().unwrap(),
        Some(Consistency::Stale as i32)
    );
    assert_eq!(c.leader(), None);
}

#[tokio::test]
async fn cluster_calls_follow_the_meta_leader() {
    let (b, node_b) = fake::start(fake::Reply::Serve).await;
    let (a, node_a) = fake::start(fake::Reply::NotLeader(b.clone())).await;
    let c = ClusterClient::connect(vec![a]).unwrap();
    let map = c
        .init_cluster(InitClusterRequest {
            slot_count: 4,
            groups: vec![crate::v1::GroupSpec {
                id: 9,
                addrs: vec!["x:1".into()],
            }],
        })
        .await
        .unwrap();
    assert_eq!((map.version, map.slot_owner), (1, vec![9; 4]));
    assert_eq!(c.leader(), Some(format!("http://{b}")));
    assert_eq!((node_a.calls(), node_b.calls()), (1, 1));
    // The remembered leader serves the other calls directly.
    let map = c.move_slots(vec![0, 1, 2], 5).await.unwrap();
    assert_eq!(map.slot_owner, [5, 5, 5]);
    let rebalance = crate::v1::start_task_request::Task::Rebalance(Default::default());
    assert_eq!(c.start_task(rebalance).await.unwrap().id, 9);
    assert_eq!(c.remove_group(4).await.unwrap().version, 4);
    assert_eq!(
        c.add_group(AddGroupRequest::default())
            .await
            .unwrap()
            .version,
        2
    );
    assert_eq!(c.cluster_status().await.unwrap().map.unwrap().version, 7);
    assert_eq!(c.get_shard_map(true).await.unwrap().version, 1);
    assert_eq!(*node_b.linearizable.lock().unwrap(), Some(true));
    assert_eq!((node_a.calls(), node_b.calls()), (1, 7));
}

#[tokio::test]
async fn cluster_errors_keep_their_code_and_attempts_are_bounded() {
    let (a, node_a) = fake::start(fake::Reply::Invalid).await;
    let c = ClusterClient::connect(vec![a])
        .unwrap()
        .with_max_attempts(3);
    let err = c.remove_group(1).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(node_a.calls(), 1);
    *node_a.reply.lock().unwrap() = fake::Reply::Unavailable;
    let err = c.cluster_status().await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(node_a.calls(), 4);
}

#[tokio::test]
async fn map_reads_from_one_replica_stay_there_unless_linearizable() {
    let (b, node_b) = fake::start(fake::Reply::Serve).await;
    let (a, node_a) = fake::start(fake::Reply::NotLeader(b.clone())).await;
    let c = ClusterClient::connect(vec![a]).unwrap();
    let err = c.get_shard_map(false).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!((node_a.calls(), node_b.calls()), (1, 0));
    c.get_shard_map(true).await.unwrap();
    assert_eq!((node_a.calls(), node_b.calls()), (2, 1));
    assert_eq!(c.leader(), Some(format!("http://{b}")));
}

#[tokio::test]
async fn watch_streams_maps_and_is_not_retried() {
    let (a, node_a) = fake::start(fake::Reply::Unavailable).await;
    let (b, node_b) = fake::start(fake::Reply::Serve).await;
    let c = ClusterClient::connect(vec![a, b]).unwrap();
    // One attempt only, but the failure moves the client on to the next address.
    let err = c.watch_shard_map(5).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!((node_a.calls(), node_b.calls()), (1, 0));
    let mut stream = c.watch_shard_map(5).await.unwrap();
    assert_eq!(stream.message().await.unwrap().unwrap().version, 6);
    assert_eq!(stream.message().await.unwrap().unwrap().version, 7);
    assert!(stream.message().await.unwrap().is_none());
    assert_eq!((node_a.calls(), node_b.calls()), (1, 1));
}

#[test]
fn cluster_client_is_built_like_the_kv_client() {
    let c = ClusterClient::connect(vec!["a:1".into(), "http://a:1/".into()])
        .unwrap()
        .with_timeout(Duration::from_secs(2));
    assert_eq!(c.endpoints(), ["http://a:1"]);
    assert_eq!(c.timeout(), Duration::from_secs(2));
    assert_eq!(c.leader(), None);
    assert!(ClusterClient::connect(vec![]).is_err());
}
