//! The config server: the versioned shard map and the operations that change it, served as
//! `ordo.v1.Cluster`. Its state lives in a config group replicated by the same raft engine as the
//! shard groups; this crate reaches it only through the `MapStore` trait, which the root package
//! implements, so the map logic here knows nothing of sled or raft.
//!
//! Every change is: compute the next map (pure, `map.rs`), make the groups agree (install
//! ownership on their leaders), then compare-and-set the map; one change at a time. The long
//! ones (moves, rebalances, drains, membership changes) are tasks (`tasks.rs`): recorded first,
//! run by the config leader whatever becomes of the caller, resumed by the next leader.

pub mod groups;
pub mod map;
pub mod migration;
pub mod tasks;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use ordo_proto::v1::cluster_server::Cluster;
use ordo_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::groups::GroupLeaders;
use crate::map::MapError;

/// Where the shard map is kept.
#[tonic::async_trait]
pub trait MapStore: Send + Sync + 'static {
    /// The stored map (version 0 when none) and a token for `save`. A linearizable load goes
    /// through the config leader (and fails with not-leader elsewhere); otherwise this replica answers.
    async fn load(&self, linearizable: bool) -> Result<(ShardMap, u64), Status>;
    /// Stores `map` only if nothing was stored since the load that returned `token`.
    async fn save(&self, token: u64, map: &ShardMap) -> Result<bool, Status>;
    /// Ticks whenever this replica applies something (the map may have changed).
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Addresses of the config group's replicas.
    fn config_addrs(&self) -> Vec<String>;
    /// The migration records (online resharding) and a token for `save_migrations`; loaded and
    /// saved like the map, as a second item.
    async fn load_migrations(&self, linearizable: bool) -> Result<(MigrationList, u64), Status>;
    /// Stores `list` only if nothing was stored since the load that returned `token`.
    async fn save_migrations(&self, token: u64, list: &MigrationList) -> Result<bool, Status>;
    /// Whether this replica has stopped (background tasks end then).
    fn stopped(&self) -> bool {
        false
    }
    /// Turns true when this replica stops: streams it serves (map watches) end then, so a
    /// stopped replica holds no storage open for a watcher.
    fn stop_signal(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }
}

/// Most `WatchShardMap` streams one config server serves at once: each is a task that re-reads
/// the map on every applied entry, so their number is bounded (routers keep one each).
pub const MAP_WATCHES_MAX: usize = 1024;

pub struct ConfigService<S> {
    store: Arc<S>,
    /// One permit per open map watch (`MAP_WATCHES_MAX`).
    watches: Arc<tokio::sync::Semaphore>,
    /// One map change at a time on this replica (the CAS in `save` covers leader changes).
    admin: Arc<tokio::sync::Mutex<()>>,
    /// Calls to group leaders, over cached channels (shared with the mover).
    groups: Arc<GroupLeaders>,
    /// Online resharding: moves slots with their data.
    migrations: Arc<migration::Mover<S>>,
    /// The admin tasks this replica runs (`tasks.rs`).
    runners: Arc<tasks::Runners>,
}

impl<S> Clone for ConfigService<S> {
    fn clone(&self) -> Self {
        ConfigService {
            store: self.store.clone(),
            watches: self.watches.clone(),
            admin: self.admin.clone(),
            groups: self.groups.clone(),
            migrations: self.migrations.clone(),
            runners: self.runners.clone(),
        }
    }
}

impl From<MapError> for Status {
    fn from(e: MapError) -> Status {
        match e {
            MapError::Invalid(m) => Status::invalid_argument(m),
            MapError::Refused(m) => Status::failed_precondition(m),
        }
    }
}

impl<S: MapStore> ConfigService<S> {
    /// `copy_bytes_per_sec`: the copy bandwidth of moves whose request names none (0:
    /// [`migration::COPY_BYTES_PER_SEC`]). Inside a tokio runtime, also starts the task that
    /// resumes the tasks and migrations left by an earlier config leader (`tasks.rs`); it ends
    /// when the store says its replica stopped.
    pub fn new(store: Arc<S>, copy_bytes_per_sec: u64) -> Self {
        let admin: Arc<tokio::sync::Mutex<()>> = Default::default();
        let groups: Arc<GroupLeaders> = Default::default();
        let migrations = migration::Mover::new(
            store.clone(),
            admin.clone(),
            groups.clone(),
            copy_bytes_per_sec,
        );
        let svc = ConfigService {
            store,
            watches: Arc::new(tokio::sync::Semaphore::new(MAP_WATCHES_MAX)),
            admin,
            groups,
            migrations,
            runners: Default::default(),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            svc.spawn_resumer();
        }
        svc
    }

    async fn load(&self, linearizable: bool) -> Result<(ShardMap, u64), Status> {
        let (mut map, token) = self.store.load(linearizable).await?;
        map.config_addrs = self.store.config_addrs();
        Ok((map, token))
    }

    async fn load_initialized(&self) -> Result<(ShardMap, u64), Status> {
        let (map, token) = self.load(true).await?;
        if map.version == 0 {
            return Err(Status::failed_precondition(
                "the cluster is not initialized: run `ordoctl init` first",
            ));
        }
        Ok((map, token))
    }

    /// Compare-and-set of the map: stores `map` only if nothing was stored since the load that
    /// returned `token`.
    async fn cas_map(&self, token: u64, map: &ShardMap) -> Result<(), Status> {
        if !self.store.save(token, map).await? {
            return Err(Status::aborted("the shard map changed concurrently (a config leader change?); nothing was committed, retry"));
        }
        tracing::info!(
            version = map.version,
            groups = map.groups.len(),
            "shard map committed"
        );
        Ok(())
    }

    async fn init(&self, req: InitClusterRequest) -> Result<ShardMap, Status> {
        let _admin = self.admin.lock().await;
        let (current, token) = self.load(true).await?;
        if current.version != 0 {
            return Err(Status::failed_precondition(format!(
                "the cluster is already initialized (map version {}, {} groups); use `ordoctl group add` to grow it",
                current.version,
                current.groups.len()
            )));
        }
        map::check_specs(&req.groups, &[])?;
        let mut groups = Vec::new();
        for spec in &req.groups {
            groups.push(self.groups.resolve_group(spec).await?);
        }
        let next = map::initial_map(req.slot_count, groups, self.store.config_addrs())?;
        let owned = map::slots_by_group(&next);
        let mut installed: Vec<&Group> = Vec::new();
        for g in &next.groups {
            if let Err(e) = self
                .groups
                .set_ownership(
                    g,
                    next.version,
                    next.slot_count,
                    owned[&g.id].clone(),
                    next.config_addrs.clone(),
                )
                .await
            {
                self.roll_back_init(&installed, &next).await;
                return Err(Status::new(
                    e.code(),
                    format!("init failed, nothing kept: group {}: {}", g.id, e.message()),
                ));
            }
            installed.push(g);
        }
        if let Err(e) = self.cas_map(token, &next).await {
            self.roll_back_init(&installed, &next).await;
            return Err(e);
        }
        Ok(next)
    }

    /// Leaves the groups owning nothing (they own nothing in any committed map either).
    async fn roll_back_init(&self, installed: &[&Group], next: &ShardMap) {
        for g in installed {
            if let Err(e) = self
                .groups
                .set_ownership(g, next.version, next.slot_count, vec![], vec![])
                .await
            {
                tracing::error!(group = g.id, error = %e, "could not roll back ownership after a failed init");
            }
        }
    }

    async fn add(&self, spec: GroupSpec) -> Result<ShardMap, Status> {
        let _admin = self.admin.lock().await;
        let (current, token) = self.load_initialized().await?;
        map::check_specs(std::slice::from_ref(&spec), &current.groups)?;
        let group = self.groups.resolve_group(&spec).await?;
        let next = map::add_group(&current, group.clone());
        // From now on the group serves exactly what the map gives it: nothing, yet.
        self.groups
            .set_ownership(
                &group,
                next.version,
                next.slot_count,
                vec![],
                self.store.config_addrs(),
            )
            .await?;
        self.cas_map(token, &next).await?;
        Ok(next)
    }

    async fn remove(&self, id: u64) -> Result<ShardMap, Status> {
        let _admin = self.admin.lock().await;
        let (current, token) = self.load_initialized().await?;
        let (list, _) = self.store.load_migrations(true).await?;
        if let Some(m) = list
            .migrations
            .iter()
            .find(|m| migration::in_flight(m) && (m.from_group == id || m.to_group == id))
        {
            return Err(Status::failed_precondition(format!(
                "group {id} takes part in migration {} ({}); wait for it to end",
                m.id,
                migration::state_name(m.state)
            )));
        }
        let next = map::remove_group(&current, id)?;
        self.cas_map(token, &next).await?;
        Ok(next)
    }

    /// Moves slots with their data: one migration per donor group, run in turn (see
    /// `migration/`) by a task (`tasks.rs`); at no point do two groups own a slot. Answers with
    /// the map after the last one, or with the error of the first that aborted (the rest are
    /// aborted too). The caller going away changes nothing.
    async fn move_slots(&self, req: MoveSlotsRequest) -> Result<ShardMap, Status> {
        let t = self
            .start_task(start_task_request::Task::MoveSlots(req))
            .await?;
        self.wait_task(t.id).await?;
        Ok(self.load(true).await?.0)
    }

    async fn rebalance(&self, req: RebalanceRequest) -> Result<RebalanceResponse, Status> {
        if req.dry_run {
            let (map, _) = self.load_initialized().await?;
            let drain = (req.drain_group != 0).then_some(req.drain_group);
            let plan = migration::plan_rebalance(&map, drain, req.slots_per_move)?;
            tracing::info!(
                moves = plan.len(),
                "rebalance plan: {}",
                migration::describe_plan(&plan)
            );
            return Ok(RebalanceResponse {
                plan,
                map: Some(map),
                ..Default::default()
            });
        }
        let t = self
            .start_task(start_task_request::Task::Rebalance(req))
            .await?;
        let t = self.wait_task(t.id).await?;
        // The answer comes from this replica's copy, like the wait: it holds every map the
        // task's moves stored (they were applied before the task's end). A linearizable read
        // here fails with not-leader when the config leader changed while the task ran (the new
        // leader resumes it), and the client, told "not the leader", asks the new leader again:
        // a second rebalance, which finds nothing to move and answers with no migrations.
        let list = self.migrations.list().await?;
        let migrations = t
            .migrations
            .iter()
            .filter_map(|id| list.migrations.iter().find(|m| m.id == *id).cloned())
            .collect();
        Ok(RebalanceResponse {
            plan: t.plan,
            migrations,
            map: Some(self.load(false).await?.0),
            task_id: t.id,
        })
    }

    /// The addresses of group `g`'s replicas (the config servers' for group 0).
    async fn change_addrs(&self, g: u64) -> Result<Vec<String>, Status> {
        if g == 0 {
            return Ok(self.store.config_addrs());
        }
        let (map, _) = self.load_initialized().await?;
        let group = map.groups.iter().find(|x| x.id == g).ok_or_else(|| {
            Status::failed_precondition(format!(
                "group {g} is not in the shard map (groups: {:?})",
                map.groups.iter().map(|x| x.id).collect::<Vec<_>>()
            ))
        })?;
        Ok(group.replicas.iter().map(|r| r.addr.clone()).collect())
    }

    /// A membership change on a group's leader, then a map that lists the group's voters (for
    /// the config group, a new version so routers learn the config servers' addresses).
    async fn change_replicas(
        &self,
        req: ChangeGroupReplicasRequest,
    ) -> Result<ChangeGroupReplicasResponse, Status> {
        let g = req.group_id;
        let change = req
            .change
            .ok_or_else(|| Status::invalid_argument("change is missing"))?;
        let addrs = self.change_addrs(g).await?;
        let catch_up = match change.catch_up_timeout_ms {
            0 => Duration::from_secs(60),
            ms => Duration::from_millis(ms as u64),
        };
        let resp = self
            .groups
            .change_replicas(g, &addrs, change, catch_up + Duration::from_secs(30))
            .await?;
        tracing::info!(group = g, members = ?resp.members, "group membership changed");
        let _admin = self.admin.lock().await;
        let (current, token) = self.load(true).await?;
        if current.version == 0 {
            return Ok(ChangeGroupReplicasResponse {
                members: resp.members,
                catch_up_ms: resp.catch_up_ms,
                map: Some(current),
                ..Default::default()
            });
        }
        let mut next = current.clone();
        next.version += 1;
        if let Some(group) = next.groups.iter_mut().find(|x| x.id == g) {
            group.replicas = resp
                .members
                .iter()
                .filter(|m| m.voter)
                .map(|m| Replica {
                    node_id: m.node_id,
                    addr: m.addr.clone(),
                })
                .collect();
        }
        self.cas_map(token, &next).await.map_err(|e| {
            Status::new(
                e.code(),
                format!(
                    "group {g}'s membership changed, but the map listing it could not be \
                     stored ({}); routers still reach the group through its other replicas. \
                     Run the same command again to store it",
                    e.message()
                ),
            )
        })?;
        Ok(ChangeGroupReplicasResponse {
            members: resp.members,
            catch_up_ms: resp.catch_up_ms,
            map: Some(next),
            ..Default::default()
        })
    }

    async fn group_status(&self, id: u64, replicas: &[Replica], slots: u32) -> GroupStatus {
        let statuses =
            futures::future::join_all(replicas.iter().map(|r| self.groups.status(&r.addr))).await;
        let mut leader_id = 0;
        let replicas = replicas
            .iter()
            .zip(statuses)
            .map(|(r, st)| match st {
                Ok(st) => {
                    if st.role == "Leader" {
                        leader_id = st.node_id;
                    }
                    ReplicaStatus {
                        node_id: st.node_id,
                        addr: r.addr.clone(),
                        reachable: true,
                        role: st.role,
                        term: st.term,
                        applied_index: st.applied_index,
                        items: st.items,
                        error: String::new(),
                    }
                }
                Err(e) => ReplicaStatus {
                    node_id: r.node_id,
                    addr: r.addr.clone(),
                    error: e.message().to_string(),
                    ..Default::default()
                },
            })
            .collect();
        GroupStatus {
            id,
            leader_id,
            slots,
            replicas,
        }
    }
}

type MapStream = Pin<Box<dyn Stream<Item = Result<ShardMap, Status>> + Send>>;

#[tonic::async_trait]
impl<S: MapStore> Cluster for ConfigService<S> {
    async fn get_shard_map(
        &self,
        req: Request<GetShardMapRequest>,
    ) -> Result<Response<ShardMap>, Status> {
        Ok(Response::new(
            self.load(req.into_inner().linearizable).await?.0,
        ))
    }

    type WatchShardMapStream = MapStream;

    async fn watch_shard_map(
        &self,
        req: Request<WatchShardMapRequest>,
    ) -> Result<Response<MapStream>, Status> {
        let mut last = req.into_inner().after_version;
        let permit = self.watches.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this config server already serves {MAP_WATCHES_MAX} map watches \
                 (MAP_WATCHES_MAX); close idle ones or watch another config server"
            ))
        })?;
        let svc = self.clone();
        let mut changes = self.store.changes();
        let mut stop = self.store.stop_signal();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            let _permit = permit;
            loop {
                match svc.load(false).await {
                    Ok((map, _)) if map.version > last => {
                        last = map.version;
                        if tx.send(Ok(map)).await.is_err() {
                            return; // the watcher left
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
                let stopped = async {
                    match stop.as_mut() {
                        Some(s) => drop(s.wait_for(|stopped| *stopped).await),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                    () = stopped => {
                        let _ = tx.send(Err(Status::unavailable(
                            "this config server stopped; watch another one",
                        ))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn init_cluster(
        &self,
        req: Request<InitClusterRequest>,
    ) -> Result<Response<ShardMap>, Status> {
        Ok(Response::new(self.init(req.into_inner()).await?))
    }

    async fn add_group(&self, req: Request<AddGroupRequest>) -> Result<Response<ShardMap>, Status> {
        let spec = req
            .into_inner()
            .group
            .ok_or_else(|| Status::invalid_argument("add_group needs a group"))?;
        Ok(Response::new(self.add(spec).await?))
    }

    async fn remove_group(
        &self,
        req: Request<RemoveGroupRequest>,
    ) -> Result<Response<ShardMap>, Status> {
        Ok(Response::new(self.remove(req.into_inner().id).await?))
    }

    async fn move_slots(
        &self,
        req: Request<MoveSlotsRequest>,
    ) -> Result<Response<ShardMap>, Status> {
        Ok(Response::new(
            ConfigService::move_slots(self, req.into_inner()).await?,
        ))
    }

    async fn list_migrations(
        &self,
        _req: Request<ListMigrationsRequest>,
    ) -> Result<Response<MigrationList>, Status> {
        Ok(Response::new(self.migrations.list().await?))
    }

    async fn abort_migration(
        &self,
        req: Request<AbortMigrationRequest>,
    ) -> Result<Response<Migration>, Status> {
        Ok(Response::new(
            self.migrations.request_abort(req.into_inner().id).await?,
        ))
    }

    async fn rebalance(
        &self,
        req: Request<RebalanceRequest>,
    ) -> Result<Response<RebalanceResponse>, Status> {
        Ok(Response::new(
            ConfigService::rebalance(self, req.into_inner()).await?,
        ))
    }

    async fn change_group_replicas(
        &self,
        req: Request<ChangeGroupReplicasRequest>,
    ) -> Result<Response<ChangeGroupReplicasResponse>, Status> {
        let what = start_task_request::Task::ChangeReplicas(req.into_inner());
        let t = self.start_task(what).await?;
        let t = self.wait_task(t.id).await?;
        Ok(Response::new(t.change_result.unwrap_or_default()))
    }

    async fn start_task(&self, req: Request<StartTaskRequest>) -> Result<Response<Task>, Status> {
        let what = req.into_inner().task.ok_or_else(|| {
            Status::invalid_argument(
                "StartTask needs a task: move_slots, rebalance or change_replicas",
            )
        })?;
        Ok(Response::new(ConfigService::start_task(self, what).await?))
    }

    async fn abort_task(&self, req: Request<AbortTaskRequest>) -> Result<Response<Task>, Status> {
        Ok(Response::new(
            ConfigService::abort_task(self, req.into_inner().id).await?,
        ))
    }

    async fn get_cluster_status(
        &self,
        _req: Request<GetClusterStatusRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        let (map, _) = self.load(false).await?;
        let counts: BTreeMap<u64, u32> = map::slots_by_group(&map)
            .into_iter()
            .map(|(g, s)| (g, s.len() as u32))
            .collect();
        let groups = futures::future::join_all(map.groups.iter().map(|g| {
            self.group_status(g.id, &g.replicas, counts.get(&g.id).copied().unwrap_or(0))
        }))
        .await;
        let meta_replicas: Vec<Replica> = map
            .config_addrs
            .iter()
            .map(|a| Replica {
                node_id: 0,
                addr: a.clone(),
            })
            .collect();
        let meta = self.group_status(0, &meta_replicas, 0).await;
        Ok(Response::new(ClusterStatus {
            map: Some(map),
            groups,
            meta: Some(meta),
        }))
    }
}

#[cfg(test)]
mod tests;
