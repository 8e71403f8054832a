//! In-process fakes the router talks to: a node serving `ordo.v1.Kv` with a scripted behaviour,
//! a replica serving `Peer.ReadChanges` from a scripted change log, and a config server serving
//! `ordo.v1.Cluster` whose map a test sets.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

// Fake change feed (`Peer.ReadChanges`)

/// What a fake replica's change feed holds and does; a test scripts it.
pub struct FeedState {
    /// Per slot, its events (seq 1, 2, …).
    pub log: Mutex<BTreeMap<u32, Vec<ChangeEvent>>>,
    /// Past the end of the log, slot `.0` goes on without end with events carrying value `.1`.
    pub endless: Mutex<Option<(u32, Bytes)>>,
    pub resolved_ts_ms: AtomicU64,
    /// Slots this replica gave up: reported `moved` once all their events are sent.
    pub moved: Mutex<BTreeSet<u32>>,
    /// The next stream breaks (UNAVAILABLE, no detail) after sending this many events.
    pub break_after: Mutex<Option<usize>>,
    /// Streams opened before the last [`FeedState::cut`] break (UNAVAILABLE, no detail).
    cuts: AtomicU64,
    /// The next opens are refused with these, in turn.
    pub refuse: Mutex<VecDeque<Status>>,
    pub requests: Mutex<Vec<ReadChangesRequest>>,
    /// Events this replica has sent (those tonic has taken from its stream).
    pub events_sent: AtomicUsize,
    changed: watch::Sender<u64>,
    /// Its consumer groups (`Peer.GroupAdmin`, `Peer.Consume`: `group_fakes.rs`).
    pub groups: Arc<crate::group_fakes::GroupNode>,
}

impl FeedState {
    /// Appends `n` events to `slot`'s log and wakes the streams.
    pub fn append(&self, slot: u32, n: u64) {
        {
            let mut log = self.log.lock().unwrap();
            let events = log.entry(slot).or_default();
            for _ in 0..n {
                let seq = events.len() as u64 + 1;
                events.push(feed_event(slot, seq, Bytes::from(format!("v{slot}-{seq}"))));
            }
        }
        self.poke();
    }

    /// Copies `other`'s log (another replica of the group, or the group a slot moved from).
    pub fn copy_log(&self, other: &FeedState, slot: u32) {
        let events = other
            .log
            .lock()
            .unwrap()
            .get(&slot)
            .cloned()
            .unwrap_or_default();
        self.log.lock().unwrap().insert(slot, events);
        self.poke();
    }

    pub fn set_resolved(&self, ts: u64) {
        self.resolved_ts_ms.store(ts, Ordering::SeqCst);
        self.poke();
    }

    pub fn set_moved(&self, slot: u32) {
        self.moved.lock().unwrap().insert(slot);
        self.poke();
    }

    /// Breaks every open stream, as a replica that stops does.
    pub fn cut(&self) {
        self.cuts.fetch_add(1, Ordering::SeqCst);
        self.poke();
    }

    pub fn poke(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn requests(&self) -> Vec<ReadChangesRequest> {
        self.requests.lock().unwrap().clone()
    }

    fn start_of(&self, from: &SlotFrom) -> u64 {
        let len = self
            .log
            .lock()
            .unwrap()
            .get(&from.slot)
            .map_or(0, |e| e.len() as u64);
        match from.from {
            Some(slot_from::From::AfterSeq(s)) => s,
            Some(slot_from::From::Oldest(_)) => 0,
            // Commit times are seq × 10.
            Some(slot_from::From::AfterTsMs(ts)) => (ts / 10).min(len),
            Some(slot_from::From::Now(_)) | Some(slot_from::From::Snapshot(_)) | None => len,
        }
    }

    /// The events of `slot` after `pos`, at most `max` and (but for the first) `bytes`.
    fn events_after(&self, slot: u32, pos: u64, max: usize, bytes: &mut u64) -> Vec<ChangeEvent> {
        let log = self.log.lock().unwrap();
        let stored = log.get(&slot).map_or(&[][..], |e| &e[..]);
        let endless = self.endless.lock().unwrap().clone();
        let mut out: Vec<ChangeEvent> = Vec::new();
        for seq in pos + 1.. {
            let event = match stored.get(seq as usize - 1) {
                Some(e) => e.clone(),
                None => match &endless {
                    Some((s, value)) if *s == slot => feed_event(slot, seq, value.clone()),
                    _ => break,
                },
            };
            let size = event.encoded_len() as u64;
            if out.len() >= max || (size > *bytes && !out.is_empty()) {
                break;
            }
            *bytes = bytes.saturating_sub(size);
            out.push(event);
        }
        out
    }

    /// The next page after `positions`, or `None` if it would say nothing new since `last`.
    fn page(
        &self,
        positions: &mut [(u32, u64)],
        (max, mut bytes): (usize, u64),
        last: &mut Option<(Vec<SlotPosition>, u64)>,
    ) -> Option<ReadChangesResponse> {
        let mut events = Vec::new();
        for (slot, pos) in positions.iter_mut() {
            let more = self.events_after(*slot, *pos, max - events.len(), &mut bytes);
            if let Some(e) = more.last() {
                *pos = e.seq;
            }
            events.extend(more);
        }
        let log = self.log.lock().unwrap();
        let moved = self.moved.lock().unwrap();
        let resolved = self.resolved_ts_ms.load(Ordering::SeqCst);
        let slots: Vec<SlotPosition> = positions
            .iter()
            .map(|&(slot, seq)| SlotPosition {
                slot,
                seq,
                oldest_seq: 1,
                moved: moved.contains(&slot) && seq >= log.get(&slot).map_or(0, |e| e.len() as u64),
                resolved_ts_ms: resolved,
                snapshotting: false,
            })
            .collect();
        let now = Some((slots.clone(), resolved));
        if events.is_empty() && *last == now {
            return None;
        }
        *last = now;
        Some(ReadChangesResponse {
            events,
            positions: slots,
            resolved_ts_ms: resolved,
        })
    }
}

/// Event `seq` of `slot`: committed at seq × 10 ms.
pub fn feed_event(slot: u32, seq: u64, value: Bytes) -> ChangeEvent {
    ChangeEvent {
        slot,
        seq,
        shard_key: Bytes::from(format!("sk{slot}")),
        key: Bytes::from(format!("k{seq}")),
        op: change_event::Op::Put as i32,
        version: seq,
        value,
        old_value: Bytes::new(),
        commit_ts_ms: seq * 10,
        txn_id: Bytes::new(),
    }
}

struct FakePeer(Arc<FeedState>);

type PageStream = Pin<Box<dyn Stream<Item = Result<ReadChangesResponse, Status>> + Send>>;

/// One ReadChanges stream of a fake replica.
struct Reading {
    state: Arc<FeedState>,
    positions: Vec<(u32, u64)>,
    max: usize,
    max_bytes: u64,
    last: Option<(Vec<SlotPosition>, u64)>,
    sent: usize,
    break_after: Option<usize>,
    /// [`FeedState::cuts`] when it opened.
    cuts: u64,
    changed: watch::Receiver<u64>,
}

impl Reading {
    async fn next(&mut self) -> Option<Result<ReadChangesResponse, Status>> {
        loop {
            self.changed.borrow_and_update();
            if self.state.cuts.load(Ordering::SeqCst) > self.cuts {
                self.break_after = Some(self.sent);
            }
            let max = match self.break_after {
                Some(n) if self.sent >= n => {
                    self.break_after = None;
                    self.positions.clear();
                    return Some(Err(Status::unavailable("the replica stopped")));
                }
                Some(n) => self.max.min(n - self.sent),
                None => self.max,
            };
            if self.positions.is_empty() {
                return None;
            }
            let bounds = (max, self.max_bytes);
            if let Some(page) = self.state.page(&mut self.positions, bounds, &mut self.last) {
                self.sent += page.events.len();
                self.state
                    .events_sent
                    .fetch_add(page.events.len(), Ordering::SeqCst);
                return Some(Ok(page));
            }
            self.changed.changed().await.ok()?;
        }
    }
}

#[tonic::async_trait]
impl ordo_proto::v1::peer_server::Peer for FakePeer {
    async fn raft(
        &self,
        _: Request<tonic::Streaming<RaftBatch>>,
    ) -> Result<Response<RaftDone>, Status> {
        Err(Status::unimplemented("Raft"))
    }
    async fn install_snapshot(
        &self,
        _: Request<tonic::Streaming<SnapshotChunk>>,
    ) -> Result<Response<SnapshotDone>, Status> {
        Err(Status::unimplemented("InstallSnapshot"))
    }
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Err(Status::unimplemented("Status"))
    }
    async fn set_ownership(
        &self,
        _: Request<SetOwnershipRequest>,
    ) -> Result<Response<SetOwnershipResponse>, Status> {
        Err(Status::unimplemented("SetOwnership"))
    }
    async fn transfer_leader(
        &self,
        _: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        Err(Status::unimplemented("TransferLeader"))
    }
    async fn change_replicas(
        &self,
        _: Request<ChangeReplicasRequest>,
    ) -> Result<Response<ChangeReplicasResponse>, Status> {
        Err(Status::unimplemented("ChangeReplicas"))
    }

    type ReadChangesStream = PageStream;
    type ConsumeStream = crate::group_fakes::ConsumeStream;

    async fn group_admin(
        &self,
        r: Request<GroupAdminRequest>,
    ) -> Result<Response<GroupAdminResponse>, Status> {
        self.0.groups.admin(r.into_inner()).map(Response::new)
    }

    async fn consume(
        &self,
        r: Request<tonic::Streaming<PeerConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        self.0.groups.clone().consume(r).await
    }

    async fn read_changes(
        &self,
        r: Request<ReadChangesRequest>,
    ) -> Result<Response<PageStream>, Status> {
        let req = r.into_inner();
        self.0.requests.lock().unwrap().push(req.clone());
        if let Some(status) = self.0.refuse.lock().unwrap().pop_front() {
            return Err(status);
        }
        let reading = Reading {
            state: self.0.clone(),
            positions: req
                .slots
                .iter()
                .map(|f| (f.slot, self.0.start_of(f)))
                .collect(),
            max: req.max_events.max(1) as usize,
            max_bytes: req.max_bytes,
            last: None,
            sent: 0,
            break_after: self.0.break_after.lock().unwrap().take(),
            cuts: self.0.cuts.load(Ordering::SeqCst),
            changed: self.0.changed.subscribe(),
        };
        let stream = futures::stream::unfold(reading, |mut r| async move {
            let item = r.next().await?;
            Some((item, r))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn migrate_out(
        &self,
        _: Request<MigrateOutRequest>,
    ) -> Result<Response<MigrateOutResponse>, Status> {
        Err(Status::unimplemented("MigrateOut"))
    }
    async fn migrate_pull(
        &self,
        _: Request<MigratePullRequest>,
    ) -> Result<Response<MigratePullResponse>, Status> {
        Err(Status::unimplemented("MigratePull"))
    }
    async fn migrate_ingest(
        &self,
        _: Request<MigrateIngestRequest>,
    ) -> Result<Response<MigrateIngestResponse>, Status> {
        Err(Status::unimplemented("MigrateIngest"))
    }
    async fn migrate_clear(
        &self,
        _: Request<MigrateClearRequest>,
    ) -> Result<Response<MigrateClearResponse>, Status> {
        Err(Status::unimplemented("MigrateClear"))
    }
}

/// A fake replica serving `Peer.ReadChanges` from a scripted log.
pub async fn spawn_feed_node() -> Served<Arc<FeedState>> {
    let (listener, addr) = listen().await;
    let state = Arc::new(FeedState {
        log: Mutex::default(),
        endless: Mutex::default(),
        resolved_ts_ms: AtomicU64::new(0),
        moved: Mutex::default(),
        break_after: Mutex::default(),
        cuts: AtomicU64::new(0),
        refuse: Mutex::default(),
        requests: Mutex::default(),
        events_sent: AtomicUsize::new(0),
        changed: watch::channel(0).0,
        groups: crate::group_fakes::GroupNode::new(),
    });
    let svc = FakePeer(state.clone());
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(
                ordo_proto::v1::peer_server::PeerServer::new(svc)
                    .max_decoding_message_size(ordo_proto::addr::KV_MESSAGE_BYTES_MAX)
                    .max_encoding_message_size(ordo_proto::addr::KV_MESSAGE_BYTES_MAX),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    Served { addr, state, task }
}
