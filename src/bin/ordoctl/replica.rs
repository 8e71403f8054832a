//! Membership and leadership of one raft group: `replica add|remove|replace` (over the config
//! server, which drives the change) and `leader transfer` (straight to the group's nodes).

use std::time::Duration;

use ordo::proto::v1::start_task_request::Task as What;
use ordo::proto::v1::{ChangeGroupReplicasRequest, ChangeReplicasRequest, ReplicaChange};

use crate::args::{LeaderCommand, ReplicaCommand};
use crate::render::{render_leader, render_replicas};
use crate::{tasks, Endpoints, Failure};

/// Changes the group's replicas, as a task this command follows (it lasts as long as the new
/// replica takes to catch up), and prints them after the change.
pub(crate) async fn replica(ep: &Endpoints, c: ReplicaCommand, json: bool) -> Result<(), Failure> {
    let (group, change) = replica_change(c).map_err(anyhow::Error::msg)?;
    let what = What::ChangeReplicas(ChangeGroupReplicasRequest {
        group_id: group,
        change: Some(change),
    });
    let (task, _) = tasks::run(&ep.admin()?, what, json).await?;
    let resp = task.change_result.unwrap_or_default();
    println!("{}", render_replicas(group, &resp, json));
    Ok(())
}

/// Hands the group's leadership to `--to` and waits until it leads.
pub(crate) async fn leader(ep: &Endpoints, c: LeaderCommand, json: bool) -> Result<(), Failure> {
    let LeaderCommand::Transfer(a) = c;
    let r = ep.kv()?.transfer_leader(a.to).await?;
    println!("{}", render_leader(&r, json));
    Ok(())
}

fn replica_change(c: ReplicaCommand) -> Result<(u64, ChangeReplicasRequest), String> {
    let ms = |d: Duration| -> Result<u32, String> {
        u32::try_from(d.as_millis())
            .ok()
            .filter(|ms| *ms > 0)
            .ok_or_else(|| format!("--catch-up-timeout {d:?} is out of range"))
    };
    Ok(match c {
        ReplicaCommand::Add(a) => (
            a.group,
            ChangeReplicasRequest {
                change: ReplicaChange::Add as i32,
                node_id: a.new.id,
                addr: a.new.addr,
                old_node_id: 0,
                catch_up_timeout_ms: ms(a.new.catch_up_timeout)?,
            },
        ),
        ReplicaCommand::Remove(a) => (
            a.group,
            ChangeReplicasRequest {
                change: ReplicaChange::Remove as i32,
                node_id: a.id,
                ..Default::default()
            },
        ),
        ReplicaCommand::Replace(a) => (
            a.group,
            ChangeReplicasRequest {
                change: ReplicaChange::Replace as i32,
                node_id: a.new.id,
                addr: a.new.addr,
                old_node_id: a.old,
                catch_up_timeout_ms: ms(a.new.catch_up_timeout)?,
            },
        ),
    })
}
