//! Cluster admin commands, over [`ordo_proto::client::ClusterClient`]: `init`, `status`, `map`,
//! `group add|remove` and `move-slots`. Arguments are checked locally before any address is
//! needed.

use ordo::proto::v1::start_task_request::Task as What;
use ordo::proto::v1::{AddGroupRequest, MoveSlotsRequest};

use crate::args::{GroupAddArgs, GroupRemoveArgs, InitArgs, MapArgs, MoveSlotsArgs};
use crate::parse::{group_spec, init_request};
use crate::render::{render_map, render_map_change, render_status};
use crate::{tasks, Endpoints, Failure};

pub(crate) async fn init(ep: &Endpoints, a: InitArgs, json: bool) -> Result<(), Failure> {
    let req = init_request(a.slots, a.groups).map_err(anyhow::Error::msg)?;
    let map = ep.admin()?.init_cluster(req).await?;
    println!("{}", render_map_change(&map, json));
    Ok(())
}

pub(crate) async fn status(ep: &Endpoints, json: bool) -> Result<(), Failure> {
    let status = ep.admin()?.cluster_status().await?;
    println!("{}", render_status(&status, json));
    Ok(())
}

pub(crate) async fn map(ep: &Endpoints, a: MapArgs, json: bool) -> Result<(), Failure> {
    let map = ep.admin()?.get_shard_map(!a.stale).await?;
    println!("{}", render_map(&map, json));
    Ok(())
}

pub(crate) async fn group_add(ep: &Endpoints, a: GroupAddArgs, json: bool) -> Result<(), Failure> {
    let group = group_spec(a.id, &a.replicas).map_err(anyhow::Error::msg)?;
    let req = AddGroupRequest { group: Some(group) };
    let map = ep.admin()?.add_group(req).await?;
    println!("{}", render_map_change(&map, json));
    Ok(())
}

pub(crate) async fn group_remove(
    ep: &Endpoints,
    a: GroupRemoveArgs,
    json: bool,
) -> Result<(), Failure> {
    let map = ep.admin()?.remove_group(a.id).await?;
    println!("{}", render_map_change(&map, json));
    Ok(())
}

/// Runs the move as a task and follows it, with its progress on stderr.
pub(crate) async fn move_slots(
    ep: &Endpoints,
    a: MoveSlotsArgs,
    json: bool,
) -> Result<(), Failure> {
    let c = ep.admin()?;
    let req = MoveSlotsRequest {
        slots: a.slots.0,
        to_group: a.to,
        copy_bytes_per_sec: a.copy_bytes_per_sec,
    };
    tasks::run(&c, What::MoveSlots(req), json).await?;
    let map = c.get_shard_map(true).await?;
    println!("{}", render_map_change(&map, json));
    Ok(())
}
