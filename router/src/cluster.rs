//! `ordo.v1.Cluster` on the router: a proxy to the config servers, so that `ordoctl` needs one
//! address, except for reads of the map that the router's cache can answer.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use ordo_proto::retry::Effect;
use ordo_proto::v1::cluster_server::Cluster;
use ordo_proto::v1::{
    AbortMigrationRequest, AbortTaskRequest, AddGroupRequest, ChangeGroupReplicasRequest,
    ChangeGroupReplicasResponse, ClusterStatus, GetClusterStatusRequest, GetShardMapRequest,
    InitClusterRequest, ListMigrationsRequest, Migration, MigrationList, MoveSlotsRequest,
    RebalanceRequest, RebalanceResponse, RemoveGroupRequest, ShardMap, StartTaskRequest, Task,
    WatchShardMapRequest,
};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::{deadline, Shared};

pub(crate) struct ClusterService(pub(crate) Arc<Shared>);

impl ClusterService {
    /// Proxies an RPC that answers with a map (which is then newer than or equal to the cache).
    async fn map_call<Req, F, Fut>(
        &self,
        what: &'static str,
        request: Request<Req>,
        rpc: F,
    ) -> Result<Response<ShardMap>, Status>
    where
        Req: Clone,
        F: Fn(
            ordo_proto::v1::cluster_client::ClusterClient<tonic::transport::Channel>,
            Request<Req>,
        ) -> Fut,
        Fut: std::future::Future<Output = Result<Response<ShardMap>, Status>>,
    {
        let deadline = Instant::now() + deadline::budget(request.metadata());
        let map = self
            .0
            .config
            .call(what, request.into_inner(), deadline, rpc)
            .await?;
        self.0.install_map(map.clone(), what);
        Ok(Response::new(map))
    }
}

type MapStream = Pin<Box<dyn Stream<Item = Result<ShardMap, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn get_shard_map(
        &self,
        request: Request<GetShardMapRequest>,
    ) -> Result<Response<ShardMap>, Status> {
        if !request.get_ref().linearizable {
            let cached = self.0.map.current();
            if cached.version > 0 {
                return Ok(Response::new((*cached).clone()));
            }
        }
        self.map_call("GetShardMap", request, |mut c, r| async move {
            c.get_shard_map(r).await
        })
        .await
    }

    type WatchShardMapStream = MapStream;

    /// Served from the router's cache: the current map if newer than `after_version`, then every
    /// newer version the router installs. Ends when the router shuts down.
    async fn watch_shard_map(
        &self,
        request: Request<WatchShardMapRequest>,
    ) -> Result<Response<MapStream>, Status> {
        let after = request.into_inner().after_version;
        let maps = self.0.map.subscribe();
        let stop = self.0.stop.clone();
        let stream = futures::stream::unfold(
            (maps, stop, after),
            |(mut maps, mut stop, last)| async move {
                loop {
                    let current = maps.borrow_and_update().clone();
                    if current.version > last {
                        let version = current.version;
                        return Some((Ok((*current).clone()), (maps, stop, version)));
                    }
                    if *stop.borrow() {
                        return None;
                    }
                    tokio::select! {
                        changed = maps.changed() => if changed.is_err() { return None },
                        _ = stop.changed() => return None,
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn init_cluster(
        &self,
        request: Request<InitClusterRequest>,
    ) -> Result<Response<ShardMap>, Status> {
        self.map_call("InitCluster", request, |mut c, r| async move {
            c.init_cluster(r).await
        })
        .await
    }

    async fn add_group(
        &self,
        request: Request<AddGroupRequest>,
    ) -> Result<Response<ShardMap>, Status> {
        self.map_call("AddGroup", request, |mut c, r| async move {
            c.add_group(r).await
        })
        .await
    }

    async fn remove_group(
        &self,
        request: Request<RemoveGroupRequest>,
    ) -> Result<Response<ShardMap>, Status> {
        self.map_call("RemoveGroup", request, |mut c, r| async move {
            c.remove_group(r).await
        })
        .await
    }

    async fn change_group_replicas(
        &self,
        request: Request<ChangeGroupReplicasRequest>,
    ) -> Result<Response<ChangeGroupReplicasResponse>, Status> {
        // A new replica may take a while to catch up: allow for it whatever the usual cap.
        let catch_up = match request
            .get_ref()
            .change
            .as_ref()
            .map(|c| c.catch_up_timeout_ms)
        {
            Some(ms) if ms > 0 => Duration::from_millis(ms as u64),
            _ => Duration::from_secs(60),
        };
        let budget = deadline::budget(request.metadata()).max(catch_up + Duration::from_secs(30));
        let resp = self
            .0
            .config
            .call(
                "ChangeGroupReplicas",
                request.into_inner(),
                Instant::now() + budget,
                |mut c, r| async move { c.change_group_replicas(r).await },
            )
            .await?;
        if let Some(map) = &resp.map {
            self.0.install_map(map.clone(), "ChangeGroupReplicas");
        }
        Ok(Response::new(resp))
    }

    async fn move_slots(
        &self,
        request: Request<MoveSlotsRequest>,
    ) -> Result<Response<ShardMap>, Status> {
        self.map_call("MoveSlots", request, |mut c, r| async move {
            c.move_slots(r).await
        })
        .await
    }

    async fn get_cluster_status(
        &self,
        request: Request<GetClusterStatusRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        let deadline = Instant::now() + deadline::budget(request.metadata());
        let status = self
            .0
            .config
            .call(
                "GetClusterStatus",
                request.into_inner(),
                deadline,
                |mut c, r| async move { c.get_cluster_status(r).await },
            )
            .await?;
        if let Some(map) = &status.map {
            self.0.install_map(map.clone(), "GetClusterStatus");
        }
        Ok(Response::new(status))
    }

    async fn list_migrations(
        &self,
        request: Request<ListMigrationsRequest>,
    ) -> Result<Response<MigrationList>, Status> {
        let deadline = Instant::now() + deadline::budget(request.metadata());
        let r = self
            .0
            .config
            .call(
                "ListMigrations",
                request.into_inner(),
                deadline,
                |mut c, r| async move { c.list_migrations(r).await },
            )
            .await?;
        Ok(Response::new(r))
    }

    async fn abort_migration(
        &self,
        request: Request<AbortMigrationRequest>,
    ) -> Result<Response<Migration>, Status> {
        let deadline = Instant::now() + deadline::budget(request.metadata());
        let r = self
            .0
            .config
            .call(
                "AbortMigration",
                request.into_inner(),
                deadline,
                |mut c, r| async move { c.abort_migration(r).await },
            )
            .await?;
        Ok(Response::new(r))
    }

    async fn start_task(
        &self,
        request: Request<StartTaskRequest>,
    ) -> Result<Response<Task>, Status> {
        let deadline = Instant::now() + deadline::budget(request.metadata());
        let r = self
            .0
            .config
            .call_as(
                Effect::Write,
                "StartTask",
                request.into_inner(),
                deadline,
                |mut c, r| async move { c.start_task(r).await },
            )
            .await?;
        Ok(Response::new(r))
    }

    async fn abort_task(
        &self,
        request: Request<AbortTaskRequest>,
    ) -> Result<Response<Task>, Status> {
        let deadline = Instant::now() + deadline::budget(request.metadata());
        let r = self
            .0
            .config
            .call(
                "AbortTask",
                request.into_inner(),
                deadline,
                |mut c, r| async move { c.abort_task(r).await },
            )
            .await?;
        Ok(Response::new(r))
    }

    async fn rebalance(
        &self,
        request: Request<RebalanceRequest>,
    ) -> Result<Response<RebalanceResponse>, Status> {
        let deadline = Instant::now() + deadline::budget(request.metadata());
        let r = self
            .0
            .config
            .call(
                "Rebalance",
                request.into_inner(),
                deadline,
                |mut c, r| async move { c.rebalance(r).await },
            )
            .await?;
        if let Some(map) = &r.map {
            self.0.install_map(map.clone(), "Rebalance");
        }
        Ok(Response::new(r))
    }
}
