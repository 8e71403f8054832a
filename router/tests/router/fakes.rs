//! In-process fakes the router talks to: a node serving `ordo.v1.Kv` with a scripted behaviour,
//! and a config server serving `ordo.v1.Cluster` whose map a test sets.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::Stream;
use ordo_proto::v1::cluster_server::{Cluster, ClusterServer};
use ordo_proto::v1::kv_server::{Kv, KvServer};
use ordo_proto::v1::*;
use prost::Message;
use tokio::sync::watch;
use tonic::{Code, Request, Response, Status};

// Fake node

#[derive(Clone, Debug)]
pub struct Seen {
    pub op: &'static str,
    pub shard_key: Bytes,
    pub map_version: u64,
    pub idempotency_key: Bytes,
    pub grpc_timeout: Option<String>,
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
            idempotency_key: header
                .map(|h| h.idempotency_key.clone())
                .unwrap_or_default(),
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
pub struct Served<S> {
    pub addr: String,
    pub state: S,
    task: tokio::task::JoinHandle<()>,
}

impl<S> Drop for Served<S> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn listen() -> (tokio::net::TcpListener, String) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

pub async fn spawn_node(
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
            // The message bound of a real node.
            .add_service(
                KvServer::new(node)
                    .max_decoding_message_size(ordo_proto::addr::KV_MESSAGE_BYTES_MAX)
                    .max_encoding_message_size(ordo_proto::addr::KV_MESSAGE_BYTES_MAX),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    Served {
        addr,
        state: seen,
        task,
    }
}

pub async fn healthy_node(name: &'static str) -> Served<Arc<Mutex<Vec<Seen>>>> {
    spawn_node(name, |_| None).await
}

pub fn seen(node: &Served<Arc<Mutex<Vec<Seen>>>>) -> Vec<Seen> {
    node.state.lock().unwrap().clone()
}

// Fake config server

#[derive(Default)]
pub struct ConfigState {
    /// What GetShardMap answers.
    pub map: Mutex<ShardMap>,
    /// What WatchShardMap streams (kept apart so that a test can make the watch lag).
    pub feed: Mutex<Option<watch::Sender<ShardMap>>>,
    pub gets: AtomicUsize,
    pub linearizable_gets: AtomicUsize,
    pub inits: AtomicUsize,
    /// Answer map changes with NotLeader naming this address.
    pub redirect_writes_to: Mutex<Option<String>>,
}

impl ConfigState {
    /// Changes what GetShardMap answers, and (if `publish`) what watchers get.
    pub fn set_map(&self, map: ShardMap, publish: bool) {
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

pub fn not_leader(leader_addr: &str) -> Status {
    let d = ErrorDetail {
        kind: Some(error_detail::Kind::NotLeader(error_detail::NotLeader {
            leader_id: 9,
            leader_addr: leader_addr.to_string(),
        })),
    };
    Status::with_details(Code::Unavailable, "not leader", d.encode_to_vec().into())
}

pub fn not_applied(msg: &str) -> Status {
    let d = ErrorDetail {
        kind: Some(error_detail::Kind::NotApplied(error_detail::NotApplied {})),
    };
    Status::with_details(Code::Unavailable, msg.to_string(), d.encode_to_vec().into())
}

pub fn wrong_shard(map_version: u64) -> Status {
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

    /// Records nothing: answers task 7, running, of the kind asked for.
    async fn start_task(&self, r: Request<StartTaskRequest>) -> Result<Response<Task>, Status> {
        let kind = match r.into_inner().task {
            Some(start_task_request::Task::MoveSlots(_)) => TaskKind::MoveSlots,
            Some(start_task_request::Task::Rebalance(_)) => TaskKind::Rebalance,
            Some(start_task_request::Task::ChangeReplicas(_)) => TaskKind::ChangeReplicas,
            None => TaskKind::Unspecified,
        };
        Ok(Response::new(Task {
            id: 7,
            kind: kind as i32,
            state: TaskState::Running as i32,
            ..Default::default()
        }))
    }

    async fn abort_task(&self, _: Request<AbortTaskRequest>) -> Result<Response<Task>, Status> {
        Err(Status::unimplemented("AbortTask"))
    }
}

pub async fn spawn_config(map: ShardMap) -> Served<Arc<ConfigState>> {
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
