//! `Peer.GroupAdmin` and `Peer.Consume` on a node: consumer groups as a router reaches them on
//! a shard group's leader. Admin calls propose group commands (create, delete and seek until
//! every owned slot is covered) and read the applied state; a member's stream is a channel to
//! the replica's group runner (`groups/runner.rs`), which does the dispatching.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ordo_proto::v1::group_admin_request::Op as AdminOp;
use ordo_proto::v1::peer_consume_request::Msg as In;
use ordo_proto::v1::{
    group_command, ConsumerGroup, GroupAdminRequest, GroupAdminResponse, GroupCommand, GroupCreate,
    GroupDelete, GroupSeek, PeerConsumeRequest, PeerConsumeResponse,
};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::error::{Error, Result};
use crate::groups::runner::{with_pending, MemberOp};
use crate::limits::FEED_GROUP_CREDITS_MAX;
use crate::replica::ReplicaHandle;
use crate::server::validate;
use crate::state::{Command, Outcome};

pub(crate) type ConsumeStream = Pin<
    Box<dyn tokio_stream::Stream<Item = std::result::Result<PeerConsumeResponse, Status>> + Send>,
>;

/// What a member's stream may hold unsent: every delivery its credits allow, and room for the
/// counts and refusals between them.
const MEMBER_QUEUE: usize = FEED_GROUP_CREDITS_MAX as usize + 256;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn check_group_id(replica: &ReplicaHandle, group_id: u64) -> Result<()> {
    if group_id != replica.group_id {
        return Err(Error::WrongShard {
            slot: 0,
            map_version: replica.sm.ownership().map_version,
        });
    }
    Ok(())
}

pub(crate) async fn group_admin(
    replica: &Arc<ReplicaHandle>,
    req: GroupAdminRequest,
) -> Result<GroupAdminResponse> {
    replica.check_running()?;
    check_group_id(replica, req.group_id)?;
    let mut resp = GroupAdminResponse::default();
    let group = match req.op {
        Some(AdminOp::Create(c)) => {
            let (def, start) = validate::check_group_create(&c)?;
            let group = def.group.clone();
            each_slot(replica, |from_slot| {
                group_command::Op::Create(GroupCreate {
                    def: Some(def.clone()),
                    start: Some(start),
                    from_slot,
                })
            })
            .await?;
            group
        }
        Some(AdminOp::Delete(d)) => {
            ordo_proto::check_group_name(&d.group).map_err(Error::InvalidArgument)?;
            let group = d.group.clone();
            let slots = each_slot(replica, |from_slot| {
                group_command::Op::Delete(GroupDelete {
                    group: group.clone(),
                    from_slot,
                })
            })
            .await?;
            resp.deleted = slots > 0;
            return Ok(resp);
        }
        Some(AdminOp::Seek(s)) => {
            ordo_proto::check_group_name(&s.group).map_err(Error::InvalidArgument)?;
            let to = validate::check_group_start(s.to, s.after_ts_ms)?;
            let group = s.group.clone();
            each_slot(replica, |from_slot| {
                group_command::Op::Seek(GroupSeek {
                    group: group.clone(),
                    to: Some(to),
                    from_slot,
                })
            })
            .await?;
            group
        }
        Some(AdminOp::Unpark(u)) => {
            ordo_proto::check_group_name(&u.group).map_err(Error::InvalidArgument)?;
            validate::check_shard_key(&u.shard_key)?;
            replica.sm.check_owned(&u.shard_key)?;
            replica
                .groups
                .unpark(u.group.clone(), u.shard_key.clone())
                .await?;
            u.group
        }
        Some(AdminOp::Describe(d)) => {
            ordo_proto::check_group_name(&d.group).map_err(Error::InvalidArgument)?;
            replica.read_barrier().await?;
            d.group
        }
        Some(AdminOp::List(_)) => {
            replica.read_barrier().await?;
            for name in group_names(replica)? {
                resp.groups.extend(describe(replica, &name).await?);
            }
            return Ok(resp);
        }
        None => return Err(Error::InvalidArgument("GroupAdmin names no op".into())),
    };
    resp.groups.extend(describe(replica, &group).await?);
    Ok(resp)
}

/// Proposes the command `op(from_slot)` makes until it has covered every owned slot; the
/// slots it changed.
async fn each_slot(replica: &ReplicaHandle, op: impl Fn(u32) -> group_command::Op) -> Result<u32> {
    let (mut from, mut changed) = (0, 0);
    loop {
        let cmd = Command::Group(GroupCommand { op: Some(op(from)) });
        let applied = match replica.propose(cmd).await? {
            Outcome::Group(applied) => applied,
            other => unreachable!("a group command produced {other:?}"),
        };
        changed += applied.slots;
        match applied.next_slot {
            Some(next) => from = next,
            None => return Ok(changed),
        }
    }
}

/// The names of the groups of the owned slots, sorted.
fn group_names(replica: &ReplicaHandle) -> Result<Vec<String>> {
    let sm = &replica.sm;
    let ownership = sm.ownership();
    let mut names = std::collections::BTreeSet::new();
    for slot in (0..sm.slot_count()).filter(|s| ownership.owns(*s)) {
        names.extend(sm.group_names(slot)?);
    }
    Ok(names.into_iter().collect())
}

/// `group` as the owned slots hold it, with the dispatcher's pending counts.
async fn describe(replica: &ReplicaHandle, group: &str) -> Result<Option<ConsumerGroup>> {
    let Some(cg) = replica.sm.describe_group(group, now_ms())? else {
        return Ok(None);
    };
    let pending = replica.groups.pending(group.to_string()).await?;
    Ok(Some(with_pending(cg, &pending)))
}

fn invalid(why: &str) -> Status {
    Status::invalid_argument(why.to_string())
}

/// A member's stream: its join, then its actions handed to the runner, whose deliveries and
/// counts go back.
pub(crate) async fn consume(
    replica: Arc<ReplicaHandle>,
    mut input: Streaming<PeerConsumeRequest>,
) -> std::result::Result<ConsumeStream, Status> {
    replica.check_running()?;
    let first = input
        .message()
        .await?
        .ok_or_else(|| invalid("a Consume stream ended before its PeerJoin"))?;
    let Some(In::Join(join)) = first.msg else {
        return Err(invalid("a Consume stream must start with a PeerJoin"));
    };
    check_group_id(&replica, join.group_id)?;
    ordo_proto::check_group_name(&join.group).map_err(|e| invalid(&e))?;
    ordo_proto::check_member_name(&join.member).map_err(|e| invalid(&e))?;
    let (tx, rx) = mpsc::channel(MEMBER_QUEUE);
    let conn = replica
        .groups
        .join(join.group, join.member, join.credits, tx)
        .await?;
    tokio::spawn(async move {
        let groups = &replica.groups;
        loop {
            let op = match input.message().await {
                Ok(Some(m)) => match member_op(m) {
                    Ok(op) => op,
                    Err(why) => {
                        tracing::info!(conn, "consume: {why}; the member's stream ends");
                        groups.left(conn, false).await;
                        return;
                    }
                },
                Ok(None) => return groups.left(conn, true).await,
                Err(_) => return groups.left(conn, false).await,
            };
            if groups.op(conn, op).await.is_err() {
                return;
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

fn member_op(m: PeerConsumeRequest) -> std::result::Result<MemberOp, &'static str> {
    Ok(match m.msg {
        Some(In::Ack(a)) => MemberOp::Ack {
            slot: a.slot,
            seq: a.seq,
            attempt: a.attempt,
        },
        Some(In::Term(t)) => MemberOp::Term {
            slot: t.slot,
            seq: t.seq,
            attempt: t.attempt,
        },
        Some(In::Nack(n)) => MemberOp::Nack {
            slot: n.slot,
            seq: n.seq,
            attempt: n.attempt,
            delay_ms: n.delay_ms,
        },
        Some(In::InProgress(p)) => MemberOp::InProgress {
            slot: p.slot,
            seq: p.seq,
            attempt: p.attempt,
        },
        Some(In::Credit(c)) => MemberOp::Credit(c.credits),
        Some(In::Reclaim(_)) => MemberOp::Reclaim,
        Some(In::Join(_)) => return Err("a second PeerJoin on one stream"),
        None => return Err("a message with nothing in it"),
    })
}
