//! The consumer groups' admin RPCs on the router (`CreateGroup`, `DescribeGroup`,
//! `DeleteGroup`, `ListGroups`, `SeekGroup`, `Unpark`): each is checked here, then sent as
//! `Peer.GroupAdmin` to the leader of every shard group of the map at once (an unpark to the one
//! owning its shard key's slot), and the answers are merged into one [`ConsumerGroup`] per name.
//!
//! A group's state lives in the slots it covers, so a shard group answers for its owned slots
//! only. A create is done once the merged group holds every slot it should: a slot that moved
//! between groups while the create went out may be in neither answer, so the router refreshes
//! the map and sends the create again (the nodes treat the same definition as a repeat) until
//! it is covered, a bounded number of rounds. Each call walks its shard group's replicas with
//! [`follow_leader`]; a `WrongShard` refreshes the map and starts the round again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use ordo_proto::retry::{follow_leader, Effect, GaveUp, LeaderCursor, Walk, Why};
use ordo_proto::v1::group_admin_request::Op;
use ordo_proto::v1::peer_client::PeerClient;
use ordo_proto::v1::watch_request::Start;
use ordo_proto::v1::{
    ConsumerGroup, CreateGroupRequest, DescribeGroupRequest, GroupAdminRequest, GroupAdminResponse,
    Mode, PoisonPolicy, SeekGroupRequest, ShardMap, UnparkRequest,
};
use ordo_proto::{check_group_name, slot_of, FEED_SHARD_KEYS_MAX};
use tokio::time::Instant;
use tonic::{Request, Status};

use crate::config::refresh_map;
use crate::forward::not_initialized;
use crate::map::replicas;
use crate::pool::MESSAGE_BYTES_MAX;
use crate::retry::{backoff, describe, pass_through, Action, BACKOFF, MAX_ATTEMPTS};
use crate::Shared;

/// Longest shard key a group may name: the nodes' `SHARD_KEY_BYTES_MAX` (every item's bound).
pub const FEED_GROUP_SHARD_KEY_BYTES_MAX: usize = 256;
/// Longest key prefix a group may filter on: the nodes' `KEY_BYTES_MAX`, the bound a
/// `Peer.ReadChanges` prefix has too (no key is longer, so no longer prefix can match).
pub const FEED_GROUP_KEY_PREFIX_BYTES_MAX: usize = 4 * 1024;
/// Most rounds a group RPC sends to every shard group before it gives up: a round is repeated
/// after a `WrongShard`, and a create also while some slot of it is in no answer (it moved
/// between groups meanwhile). With the backoff between rounds that is about 1.5 s of moves.
pub const FEED_GROUP_ROUNDS_MAX: u32 = 10;

/// Why a call to one shard group failed.
enum Failed {
    /// The replica is not that shard group at the router's map (or the map lost its address):
    /// a newer map says who owns what.
    WrongShard(Status),
    /// Anything else: the answer of the RPC.
    Status(Status),
}

/// `CreateGroup`: checked, sent to every shard group until the merged group covers its slots.
pub(crate) async fn create(
    shared: &Shared,
    req: CreateGroupRequest,
    deadline: Instant,
) -> Result<ConsumerGroup, Status> {
    let req = check_create(req)?;
    let name = req.group.clone();
    let op = Op::Create(req.clone());
    let mut missing = Vec::new();
    for round in 0..FEED_GROUP_ROUNDS_MAX {
        if round > 0 {
            pause(shared, round, deadline).await?;
        }
        let (map, answers) = fan_out(shared, &op, deadline).await?;
        let Some(group) = merge_answers(answers, &name) else {
            return Err(Status::internal(format!(
                "consumer group {name}: no shard group answered the create with the group"
            )));
        };
        let have: BTreeSet<u32> = group.slots.iter().map(|s| s.slot).collect();
        missing = covered_slots(&req.shard_keys, map.slot_count)
            .filter(|s| !have.contains(s))
            .collect();
        if missing.is_empty() {
            return Ok(group);
        }
        tracing::debug!(group = %name, round, missing = missing.len(),
            "create: slots not covered yet (moved during the fan-out?), sending again");
    }
    Err(Status::unavailable(format!(
        "consumer group {name}: after {FEED_GROUP_ROUNDS_MAX} rounds the shard groups' answers \
         still miss slot(s) {} (they moved between groups meanwhile?); the create is \
         idempotent, retrying it is safe",
        list_slots(&missing)
    )))
}

/// `DescribeGroup`: the merged group, NOT_FOUND when no shard group has it.
pub(crate) async fn describe_group(
    shared: &Shared,
    name: &str,
    deadline: Instant,
) -> Result<ConsumerGroup, Status> {
    check_name(name)?;
    let op = Op::Describe(DescribeGroupRequest {
        group: name.to_string(),
    });
    let (_, answers) = fan_out(shared, &op, deadline).await?;
    merge_answers(answers, name).ok_or_else(|| not_found(name))
}

/// `DeleteGroup`: whether any shard group had it.
pub(crate) async fn delete(shared: &Shared, name: &str, deadline: Instant) -> Result<bool, Status> {
    check_name(name)?;
    let op = Op::Delete(ordo_proto::v1::DeleteGroupRequest {
        group: name.to_string(),
    });
    let (_, answers) = fan_out(shared, &op, deadline).await?;
    Ok(answers.iter().any(|a| a.deleted))
}

/// `ListGroups`: every group, merged per name, in name order.
pub(crate) async fn list(shared: &Shared, deadline: Instant) -> Result<Vec<ConsumerGroup>, Status> {
    let op = Op::List(ordo_proto::v1::ListGroupsRequest {});
    let (_, answers) = fan_out(shared, &op, deadline).await?;
    let mut by_name: BTreeMap<String, ConsumerGroup> = BTreeMap::new();
    for group in answers.into_iter().flat_map(|a| a.groups) {
        match by_name.get_mut(&group.group) {
            Some(into) => merge(into, group),
            None => {
                by_name.insert(group.group.clone(), group);
            }
        }
    }
    Ok(by_name.into_values().map(finish).collect())
}

/// `SeekGroup`: the merged group after the seek, NOT_FOUND when no shard group has it.
pub(crate) async fn seek(
    shared: &Shared,
    req: SeekGroupRequest,
    deadline: Instant,
) -> Result<ConsumerGroup, Status> {
    check_name(&req.group)?;
    check_start(req.to, "seek to")?;
    let name = req.group.clone();
    let (_, answers) = fan_out(shared, &Op::Seek(req), deadline).await?;
    merge_answers(answers, &name).ok_or_else(|| not_found(&name))
}

/// `Unpark`: sent to the shard group owning the shard key's slot, then the merged describe.
pub(crate) async fn unpark(
    shared: &Shared,
    req: UnparkRequest,
    deadline: Instant,
) -> Result<ConsumerGroup, Status> {
    check_name(&req.group)?;
    check_shard_key(&req.shard_key)?;
    let name = req.group.clone();
    let mut round = 0;
    loop {
        let map = current_map(shared)?;
        let owner = map.slot_owner[slot_of(&req.shard_key, map.slot_count) as usize];
        let op = Op::Unpark(req.clone());
        match admin_at(shared, &map, owner, op, deadline).await {
            Ok(_) => break,
            Err(Failed::Status(status)) => return Err(status),
            Err(Failed::WrongShard(status)) => {
                round += 1;
                if round >= FEED_GROUP_ROUNDS_MAX {
                    return Err(rounds_spent(&status));
                }
                pause(shared, round, deadline).await?;
            }
        }
    }
    describe_group(shared, &name, deadline).await
}

/// The map, or UNAVAILABLE before the cluster is initialized.
fn current_map(shared: &Shared) -> Result<std::sync::Arc<ShardMap>, Status> {
    let map = shared.map.current();
    if map.version == 0 {
        return Err(not_initialized());
    }
    Ok(map)
}

/// Sends `op` to the leader of every shard group of the map at once; their answers, with the
/// map they were sent by. A `WrongShard` refreshes the map and sends the round again.
async fn fan_out(
    shared: &Shared,
    op: &Op,
    deadline: Instant,
) -> Result<(std::sync::Arc<ShardMap>, Vec<GroupAdminResponse>), Status> {
    let mut round = 0;
    loop {
        let map = current_map(shared)?;
        let calls = map
            .groups
            .iter()
            .map(|g| admin_at(shared, &map, g.id, op.clone(), deadline));
        let mut stale = None;
        let mut answers = Vec::with_capacity(map.groups.len());
        for result in futures::future::join_all(calls).await {
            match result {
                Ok(answer) => answers.push(answer),
                Err(Failed::Status(status)) => return Err(status),
                Err(Failed::WrongShard(status)) => stale = Some(status),
            }
        }
        let Some(status) = stale else {
            return Ok((map, answers));
        };
        round += 1;
        if round >= FEED_GROUP_ROUNDS_MAX {
            return Err(rounds_spent(&status));
        }
        pause(shared, round, deadline).await?;
    }
}

/// Between rounds: a map newer than the one used, if the config servers have one, else the
/// backoff; DEADLINE_EXCEEDED when the deadline would pass first.
async fn pause(shared: &Shared, round: u32, deadline: Instant) -> Result<(), Status> {
    let used = shared.map.current().version;
    if let Err(e) = refresh_map(shared, used, deadline).await {
        tracing::debug!("consumer groups: {e}");
    }
    if shared.map.current().version > used {
        return Ok(());
    }
    let delay = backoff(round - 1);
    if Instant::now() + delay >= deadline {
        return Err(Status::deadline_exceeded(format!(
            "the request's deadline passed after {round} round(s) to the shard groups; \
             retrying is safe"
        )));
    }
    tokio::time::sleep(delay).await;
    Ok(())
}

fn rounds_spent(last: &Status) -> Status {
    Status::unavailable(format!(
        "{FEED_GROUP_ROUNDS_MAX} rounds to the shard groups met a shard map that had changed \
         (last: {}); retrying is safe",
        describe(last)
    ))
}

/// One `Peer.GroupAdmin` call to `group`'s leader, walked with [`follow_leader`] from the
/// cached leader. Every op may be sent again: a create, delete or seek repeated changes nothing
/// more, a describe or list only reads.
async fn admin_at(
    shared: &Shared,
    map: &ShardMap,
    group: u64,
    op: Op,
    deadline: Instant,
) -> Result<GroupAdminResponse, Failed> {
    let list = replicas(map, group).map_err(|why| Failed::WrongShard(Status::unavailable(why)))?;
    let mut cursor = LeaderCursor::new(list.clone());
    cursor.redirect(shared.leaders.pick(group, &list));
    let cursor = Mutex::new(cursor);
    let walk = Walk::new(Effect::IdempotentWrite, MAX_ATTEMPTS, deadline, BACKOFF);
    let req = GroupAdminRequest {
        group_id: group,
        op: Some(op),
    };
    let req = &req;
    let attempt = |addr: String, bound: Duration| {
        let channel = shared.pool.channel(&addr);
        async move {
            let channel = channel.map_err(Status::unavailable)?;
            let mut client = PeerClient::new(channel)
                .max_decoding_message_size(MESSAGE_BYTES_MAX)
                .max_encoding_message_size(MESSAGE_BYTES_MAX);
            let mut request = Request::new(req.clone());
            request.set_timeout(bound);
            Ok(client.group_admin(request).await?.into_inner())
        }
    };
    let answer = follow_leader(&cursor, &walk, attempt)
        .await
        .map_err(|gave_up| gave_up_status(group, gave_up))?;
    if let Some(leader) = cursor.lock().unwrap().leader.clone() {
        shared.leaders.set(group, &leader);
    }
    Ok(answer)
}

fn gave_up_status(group: u64, gave_up: GaveUp) -> Failed {
    let GaveUp {
        why,
        attempts,
        addr,
        elapsed,
    } = gave_up;
    let last = match why {
        Why::Refused {
            status,
            action: Action::Refresh { .. },
        } => return Failed::WrongShard(status),
        Why::Refused { status, .. } => return Failed::Status(pass_through(status)),
        Why::NoAnswer { bound } => format!("no answer within {bound:?}"),
        Why::DeadlinePassed(None) => "the deadline passed before the first attempt".into(),
        Why::AttemptsSpent(s) | Why::OutOfTime(s) | Why::DeadlinePassed(Some(s)) => describe(&s),
    };
    Failed::Status(Status::unavailable(format!(
        "shard group {group}: no leader answered the consumer-group request ({attempts} \
         attempt(s) over {elapsed:.1?}); last error from {addr}: {last}"
    )))
}

/// The slots a group over `shard_keys` (none: every slot) must hold, in slot order.
fn covered_slots(shard_keys: &[Bytes], slot_count: u32) -> impl Iterator<Item = u32> {
    let slots: BTreeSet<u32> = if shard_keys.is_empty() {
        (0..slot_count).collect()
    } else {
        shard_keys.iter().map(|k| slot_of(k, slot_count)).collect()
    };
    slots.into_iter()
}

/// "3", "3, 9 and 12", at most 20 of them named.
fn list_slots(slots: &[u32]) -> String {
    let named: Vec<String> = slots.iter().take(20).map(u32::to_string).collect();
    let more = slots.len().saturating_sub(named.len());
    let text = match named.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    };
    if more > 0 {
        format!("{text} (and {more} more)")
    } else {
        text
    }
}

pub(crate) fn not_found(name: &str) -> Status {
    Status::not_found(format!("consumer group {name} does not exist"))
}

/// The group named `name` as the answers hold it, merged; `None` when none holds it.
pub(crate) fn merge_answers(answers: Vec<GroupAdminResponse>, name: &str) -> Option<ConsumerGroup> {
    let mut merged: Option<ConsumerGroup> = None;
    for group in answers.into_iter().flat_map(|a| a.groups) {
        if group.group != name {
            continue;
        }
        match merged.as_mut() {
            Some(into) => merge(into, group),
            None => merged = Some(group),
        }
    }
    merged.map(finish)
}

/// Adds one shard group's view of a group to `into`: the definition is the same everywhere,
/// the shard keys are a union, the slots add up, and so do the counts.
pub(crate) fn merge(into: &mut ConsumerGroup, other: ConsumerGroup) {
    into.shard_keys.extend(other.shard_keys);
    into.slots.extend(other.slots);
    into.lag_events = into.lag_events.saturating_add(other.lag_events);
    into.pending = into.pending.saturating_add(other.pending);
    into.redeliveries = into.redeliveries.saturating_add(other.redeliveries);
    into.parked = into.parked.saturating_add(other.parked);
    into.expired |= other.expired;
}

/// A merged group in its canonical order: shard keys sorted without repeats, slots by slot.
fn finish(mut group: ConsumerGroup) -> ConsumerGroup {
    group.shard_keys.sort_unstable();
    group.shard_keys.dedup();
    group.slots.sort_by_key(|s| s.slot);
    group
}

fn check_name(name: &str) -> Result<(), Status> {
    check_group_name(name).map_err(Status::invalid_argument)
}

fn check_shard_key(key: &[u8]) -> Result<(), Status> {
    if key.is_empty() || key.len() > FEED_GROUP_SHARD_KEY_BYTES_MAX {
        return Err(Status::invalid_argument(format!(
            "a shard key of {} bytes: it must have 1 to FEED_GROUP_SHARD_KEY_BYTES_MAX \
             ({FEED_GROUP_SHARD_KEY_BYTES_MAX}) bytes",
            key.len()
        )));
    }
    Ok(())
}

/// A group starts (or is sought to) at events: now, the oldest, a time, never a snapshot.
fn check_start(start: i32, what: &str) -> Result<(), Status> {
    match Start::try_from(start) {
        Ok(Start::FromNow | Start::FromOldest) => Ok(()),
        Ok(Start::FromSnapshot) => Err(Status::invalid_argument(format!(
            "{what} FROM_SNAPSHOT: a group delivers events, not items (use FROM_OLDEST or \
             FROM_NOW, or a time)"
        ))),
        Err(_) => Err(Status::invalid_argument(format!(
            "{what}: unknown start {start}"
        ))),
    }
}

/// Checks a create before anything is sent, and puts its shard keys in the canonical order
/// (sorted, without repeats) the nodes store, so that a retry is the same definition.
pub(crate) fn check_create(mut req: CreateGroupRequest) -> Result<CreateGroupRequest, Status> {
    check_name(&req.group)?;
    if req.key_prefix.len() > FEED_GROUP_KEY_PREFIX_BYTES_MAX {
        return Err(Status::invalid_argument(format!(
            "a key prefix of {} bytes is over FEED_GROUP_KEY_PREFIX_BYTES_MAX \
             ({FEED_GROUP_KEY_PREFIX_BYTES_MAX})",
            req.key_prefix.len()
        )));
    }
    if req.shard_keys.len() > FEED_SHARD_KEYS_MAX {
        return Err(Status::invalid_argument(format!(
            "{} shard keys is over FEED_SHARD_KEYS_MAX ({FEED_SHARD_KEYS_MAX})",
            req.shard_keys.len()
        )));
    }
    for key in &req.shard_keys {
        check_shard_key(key)?;
    }
    check_start(req.from, "a group from")?;
    if Mode::try_from(req.mode).is_err() {
        return Err(Status::invalid_argument(format!(
            "unknown mode {}",
            req.mode
        )));
    }
    if PoisonPolicy::try_from(req.poison).is_err() {
        return Err(Status::invalid_argument(format!(
            "unknown poison policy {}",
            req.poison
        )));
    }
    req.shard_keys.sort_unstable();
    req.shard_keys.dedup();
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ordo_proto::v1::GroupSlot;

    fn part(slots: &[u32], keys: &[&'static str], pending: u64, expired: bool) -> ConsumerGroup {
        ConsumerGroup {
            group: "billing".into(),
            key_prefix: Bytes::from_static(b"outbox/"),
            ack_wait_ms: 30_000,
            max_deliver: 5,
            shard_keys: keys
                .iter()
                .map(|k| Bytes::from_static(k.as_bytes()))
                .collect(),
            slots: slots
                .iter()
                .map(|&slot| GroupSlot {
                    slot,
                    lag_events: 2,
                    ..Default::default()
                })
                .collect(),
            lag_events: 2 * slots.len() as u64,
            pending,
            redeliveries: 1,
            parked: 0,
            expired,
            ..Default::default()
        }
    }

    #[test]
    fn merged_groups_add_up_and_keep_slot_order() {
        let answers = vec![
            GroupAdminResponse {
                groups: vec![part(&[9, 3], &["b", "a"], 4, false)],
                deleted: false,
            },
            GroupAdminResponse::default(),
            GroupAdminResponse {
                groups: vec![part(&[1], &["a"], 1, true)],
                deleted: false,
            },
        ];
        let g = merge_answers(answers, "billing").unwrap();
        assert_eq!(
            g.slots.iter().map(|s| s.slot).collect::<Vec<_>>(),
            [1, 3, 9]
        );
        assert_eq!(g.shard_keys, [Bytes::from("a"), Bytes::from("b")]);
        assert_eq!((g.lag_events, g.pending, g.redeliveries), (6, 5, 2));
        assert!(g.expired);
        assert_eq!((g.ack_wait_ms, g.max_deliver), (30_000, 5));
        assert_eq!(merge_answers(vec![], "billing"), None);
    }

    #[test]
    fn creates_are_checked_and_made_canonical() {
        let req = |f: &dyn Fn(&mut CreateGroupRequest)| {
            let mut r = CreateGroupRequest {
                group: "g".into(),
                ..Default::default()
            };
            f(&mut r);
            check_create(r)
        };
        let ok = req(&|r| r.shard_keys = ["b", "a", "b"].map(Bytes::from).to_vec()).unwrap();
        assert_eq!(ok.shard_keys, ["a", "b"].map(Bytes::from));
        type Edit<'a> = &'a dyn Fn(&mut CreateGroupRequest);
        let bad: [(Edit, &str); 7] = [
            (
                &|r| r.from = Start::FromSnapshot as i32,
                "events, not items",
            ),
            (&|r| r.from = 7, "unknown start"),
            (&|r| r.group = "a b".into(), "' '"),
            (
                &|r| r.key_prefix = vec![0; 4097].into(),
                "FEED_GROUP_KEY_PREFIX",
            ),
            (
                &|r| r.shard_keys = vec![Bytes::new()],
                "1 to FEED_GROUP_SHARD_KEY",
            ),
            (
                &|r| r.shard_keys = vec![Bytes::from("k"); 1025],
                "FEED_SHARD_KEYS_MAX",
            ),
            (&|r| r.mode = 5, "unknown mode"),
        ];
        for (f, want) in bad {
            let err = req(f).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().contains(want), "{want}: {}", err.message());
        }
    }

    #[test]
    fn slots_are_listed_in_prose_within_a_bound() {
        assert_eq!(list_slots(&[15]), "15");
        assert_eq!(list_slots(&[3, 9, 12]), "3, 9 and 12");
        let many: Vec<u32> = (0..25).collect();
        assert!(list_slots(&many).ends_with("19 (and 5 more)"));
    }
}
