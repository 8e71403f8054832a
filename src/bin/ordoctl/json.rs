//! `--json` output: one `#[derive(Serialize)]` view per answer, borrowing from the response, and
//! serialized by `serde_json` (compact, fields in declaration order).
//!
//! The views are the JSON contract scripts rely on: field names, nesting and value types are
//! pinned by the tests below. Keys and values are shown as UTF-8 (invalid bytes replaced).

use std::borrow::Cow;

use ordo::proto::v1::{
    txn_op_result, ChangeEvent, ChangeGroupReplicasResponse, ClusterStatus, ConsumerGroup,
    DeleteResponse, GetResponse, GroupStatus, Item, Member, Migration, PlannedMove, PutResponse,
    ReplicaStatus, ShardMap, Task, TransferLeaderResponse, TxnOp, TxnResponse,
};
use ordo_config::migration::state_name;
use ordo_config::tasks::{task_kind_name, task_state_name};
use serde::Serialize;

use crate::render::{describe_op, event_op_name, mode_name, poison_name};

/// `v` as compact JSON.
fn to_json(v: &impl Serialize) -> String {
    // The views hold only strings, numbers, bools, lists and options: nothing can fail.
    serde_json::to_string(v).expect("a JSON view serializes")
}

fn utf8(b: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(b)
}

/// One `watch` event: `{"slot":…,"seq":…,"op":"PUT",…}`; `old_value` and `txn_id` (hex) only
/// when the event has them.
#[derive(Serialize)]
struct EventView<'a> {
    slot: u32,
    seq: u64,
    op: &'static str,
    shard_key: Cow<'a, str>,
    key: Cow<'a, str>,
    version: u64,
    value: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    old_value: Option<Cow<'a, str>>,
    commit_ts_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    txn_id: Option<String>,
}

pub(crate) fn event(e: &ChangeEvent) -> String {
    to_json(&EventView {
        slot: e.slot,
        seq: e.seq,
        op: event_op_name(e.op),
        shard_key: utf8(&e.shard_key),
        key: utf8(&e.key),
        version: e.version,
        value: utf8(&e.value),
        old_value: (!e.old_value.is_empty()).then(|| utf8(&e.old_value)),
        commit_ts_ms: e.commit_ts_ms,
        txn_id: (!e.txn_id.is_empty()).then(|| ordo::error::hex(&e.txn_id)),
    })
}

/// `{"cursor":"<hex>"}`: the last line of `watch --json`.
pub(crate) fn cursor(hex: &str) -> String {
    #[derive(Serialize)]
    struct CursorView<'a> {
        cursor: &'a str,
    }
    to_json(&CursorView { cursor: hex })
}

/// `{"found":true,"value":…,"version":…}`, or `{"found":false}` alone.
#[derive(Serialize)]
struct GetView<'a> {
    found: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
}

impl<'a> From<&'a GetResponse> for GetView<'a> {
    fn from(r: &'a GetResponse) -> Self {
        GetView {
            found: r.found,
            value: r.found.then(|| utf8(&r.value)),
            version: r.found.then_some(r.version),
        }
    }
}

#[derive(Serialize)]
struct PutView {
    succeeded: bool,
    version: u64,
}

impl From<&PutResponse> for PutView {
    fn from(r: &PutResponse) -> Self {
        PutView {
            succeeded: r.succeeded,
            version: r.version,
        }
    }
}

#[derive(Serialize)]
struct DeleteView {
    succeeded: bool,
    deleted: bool,
    prev_version: u64,
}

impl From<&DeleteResponse> for DeleteView {
    fn from(r: &DeleteResponse) -> Self {
        DeleteView {
            succeeded: r.succeeded,
            deleted: r.deleted,
            prev_version: r.prev_version,
        }
    }
}

pub(crate) fn get(r: &GetResponse) -> String {
    to_json(&GetView::from(r))
}

pub(crate) fn put(r: &PutResponse) -> String {
    to_json(&PutView::from(r))
}

pub(crate) fn delete(r: &DeleteResponse) -> String {
    to_json(&DeleteView::from(r))
}

#[derive(Serialize)]
struct ItemView<'a> {
    key: Cow<'a, str>,
    version: u64,
    value: Cow<'a, str>,
}

/// `next_key` is `null` at the end of the range.
#[derive(Serialize)]
struct ScanView<'a> {
    items: Vec<ItemView<'a>>,
    next_key: Option<Cow<'a, str>>,
}

/// What `scan --json` prints: every item fetched, and where to continue.
pub(crate) fn scan(items: &[Item], next_key: Option<&[u8]>) -> String {
    to_json(&ScanView {
        items: items
            .iter()
            .map(|i| ItemView {
                key: utf8(&i.key),
                version: i.version,
                value: utf8(&i.value),
            })
            .collect(),
        next_key: next_key.map(utf8),
    })
}

/// One txn result: the same object its command prints (`put`, `delete`, `get`).
#[derive(Serialize)]
#[serde(untagged)]
enum OpResultView<'a> {
    Put(PutView),
    Delete(DeleteView),
    Get(GetView<'a>),
    Emit {},
    FeedAck {},
}

/// `result` is `null` for a result the server left empty.
#[derive(Serialize)]
struct TxnResultView<'a> {
    op: String,
    result: Option<OpResultView<'a>>,
}

#[derive(Serialize)]
struct TxnView<'a> {
    succeeded: bool,
    results: Vec<TxnResultView<'a>>,
}

/// What `txn --json` prints; `ops` are the ops that ran, in the order of the results.
pub(crate) fn txn(ops: &[TxnOp], resp: &TxnResponse) -> String {
    let results = resp
        .results
        .iter()
        .enumerate()
        .map(|(i, r)| TxnResultView {
            op: ops.get(i).map(describe_op).unwrap_or_else(|| "?".into()),
            result: r.result.as_ref().map(|r| match r {
                txn_op_result::Result::Put(r) => OpResultView::Put(r.into()),
                txn_op_result::Result::Delete(r) => OpResultView::Delete(r.into()),
                txn_op_result::Result::Get(r) => OpResultView::Get(r.into()),
                txn_op_result::Result::Emit(_) => OpResultView::Emit {},
                txn_op_result::Result::FeedAck(_) => OpResultView::FeedAck {},
            }),
        })
        .collect();
    to_json(&TxnView {
        succeeded: resp.succeeded,
        results,
    })
}

#[derive(Serialize)]
struct ReplicaView<'a> {
    node_id: u64,
    addr: &'a str,
}

#[derive(Serialize)]
struct GroupView<'a> {
    id: u64,
    replicas: Vec<ReplicaView<'a>>,
}

/// The shard map as the config server keeps it.
#[derive(Serialize)]
struct MapView<'a> {
    version: u64,
    slot_count: u32,
    groups: Vec<GroupView<'a>>,
    slot_owner: &'a [u64],
    config_addrs: &'a [String],
}

impl<'a> From<&'a ShardMap> for MapView<'a> {
    fn from(m: &'a ShardMap) -> Self {
        let groups = m.groups.iter().map(|g| GroupView {
            id: g.id,
            replicas: g
                .replicas
                .iter()
                .map(|r| ReplicaView {
                    node_id: r.node_id,
                    addr: &r.addr,
                })
                .collect(),
        });
        MapView {
            version: m.version,
            slot_count: m.slot_count,
            groups: groups.collect(),
            slot_owner: &m.slot_owner,
            config_addrs: &m.config_addrs,
        }
    }
}

/// What `map`, `init`, `group add|remove` and `move-slots` print.
pub(crate) fn map(m: &ShardMap) -> String {
    to_json(&MapView::from(m))
}

/// One replica of `status` (without its item count, which replicas report only on request).
#[derive(Serialize)]
struct ReplicaStatusView<'a> {
    node_id: u64,
    addr: &'a str,
    reachable: bool,
    role: &'a str,
    term: u64,
    applied_index: u64,
    error: &'a str,
}

impl<'a> From<&'a ReplicaStatus> for ReplicaStatusView<'a> {
    fn from(r: &'a ReplicaStatus) -> Self {
        ReplicaStatusView {
            node_id: r.node_id,
            addr: &r.addr,
            reachable: r.reachable,
            role: &r.role,
            term: r.term,
            applied_index: r.applied_index,
            error: &r.error,
        }
    }
}

#[derive(Serialize)]
struct GroupStatusView<'a> {
    id: u64,
    leader_id: u64,
    slots: u32,
    replicas: Vec<ReplicaStatusView<'a>>,
}

impl<'a> From<&'a GroupStatus> for GroupStatusView<'a> {
    fn from(g: &'a GroupStatus) -> Self {
        GroupStatusView {
            id: g.id,
            leader_id: g.leader_id,
            slots: g.slots,
            replicas: g.replicas.iter().map(Into::into).collect(),
        }
    }
}

/// `map` and `meta` (the config group) are `null` when not reported.
#[derive(Serialize)]
struct StatusView<'a> {
    map: Option<MapView<'a>>,
    groups: Vec<GroupStatusView<'a>>,
    meta: Option<GroupStatusView<'a>>,
}

/// What `status --json` prints.
pub(crate) fn status(s: &ClusterStatus) -> String {
    to_json(&StatusView {
        map: s.map.as_ref().map(Into::into),
        groups: s.groups.iter().map(Into::into).collect(),
        meta: s.meta.as_ref().map(Into::into),
    })
}

#[derive(Serialize)]
struct MemberView<'a> {
    node_id: u64,
    addr: &'a str,
    voter: bool,
}

impl<'a> From<&'a Member> for MemberView<'a> {
    fn from(m: &'a Member) -> Self {
        MemberView {
            node_id: m.node_id,
            addr: &m.addr,
            voter: m.voter,
        }
    }
}

#[derive(Serialize)]
struct ReplicasView<'a> {
    group: u64,
    members: Vec<MemberView<'a>>,
    catch_up_ms: u64,
    map_version: u64,
}

/// What `replica add|remove|replace --json` prints.
pub(crate) fn replicas(group: u64, r: &ChangeGroupReplicasResponse) -> String {
    to_json(&ReplicasView {
        group,
        members: r.members.iter().map(Into::into).collect(),
        catch_up_ms: r.catch_up_ms,
        map_version: r.map.as_ref().map_or(0, |m| m.version),
    })
}

#[derive(Serialize)]
struct MoveView<'a> {
    from_group: u64,
    to_group: u64,
    slots: &'a [u32],
}

#[derive(Serialize)]
struct PlanView<'a> {
    plan: Vec<MoveView<'a>>,
}

/// What `rebalance --json` and `group drain --json` print before moving.
pub(crate) fn plan(plan: &[PlannedMove]) -> String {
    let plan = plan
        .iter()
        .map(|p| MoveView {
            from_group: p.from_group,
            to_group: p.to_group,
            slots: &p.slots,
        })
        .collect();
    to_json(&PlanView { plan })
}

/// One migration; `state` is its name (`copying`, `done`, …).
#[derive(Serialize)]
struct MigrationView<'a> {
    id: u64,
    state: &'static str,
    from_group: u64,
    to_group: u64,
    slots: &'a [u32],
    items_copied: u64,
    bytes_copied: u64,
    log_records: u64,
    pause_ms: u64,
    items_cleaned: u64,
    map_version: u64,
    abort_requested: bool,
    error: &'a str,
}

impl<'a> From<&'a Migration> for MigrationView<'a> {
    fn from(m: &'a Migration) -> Self {
        MigrationView {
            id: m.id,
            state: state_name(m.state),
            from_group: m.from_group,
            to_group: m.to_group,
            slots: &m.slots,
            items_copied: m.items_copied,
            bytes_copied: m.bytes_copied,
            log_records: m.log_records,
            pause_ms: m.pause_ms,
            items_cleaned: m.items_cleaned,
            map_version: m.map_version,
            abort_requested: m.abort_requested,
            error: &m.error,
        }
    }
}

/// What `migrations`, `migrations abort` and a finished rebalance print: a JSON array.
pub(crate) fn migrations(list: &[Migration]) -> String {
    to_json(&list.iter().map(MigrationView::from).collect::<Vec<_>>())
}

/// One task; `kind` and `state` are their names (`rebalance`, `running`, …).
#[derive(Serialize)]
struct TaskView<'a> {
    id: u64,
    kind: &'static str,
    state: &'static str,
    moves: usize,
    moves_done: u32,
    migrations: &'a [u64],
    group: Option<u64>,
    drain_group: u64,
    abort_requested: bool,
    error: &'a str,
}

/// What `tasks` and `tasks abort` print: a JSON array.
pub(crate) fn tasks(list: &[Task]) -> String {
    let views: Vec<TaskView> = list
        .iter()
        .map(|t| TaskView {
            id: t.id,
            kind: task_kind_name(t.kind),
            state: task_state_name(t.state),
            moves: t.plan.len(),
            moves_done: t.moves_done,
            migrations: &t.migrations,
            group: t.change.as_ref().map(|c| c.group_id),
            drain_group: t.drain_group,
            abort_requested: t.abort_requested,
            error: &t.error,
        })
        .collect();
    to_json(&views)
}

#[derive(Serialize)]
struct LeaderView {
    leader_id: u64,
    term: u64,
}

/// What `leader transfer --json` prints.
pub(crate) fn leader(r: &TransferLeaderResponse) -> String {
    to_json(&LeaderView {
        leader_id: r.leader_id,
        term: r.term,
    })
}

/// A consumer group as `feed describe|create|seek|unpark --json` print it (and each element
/// of `feed groups --json`): the definition, the totals, then `slots` in slot order. `mode` and
/// `poison` are spelled as `feed create` takes them.
#[derive(Serialize)]
struct ConsumerGroupView<'a> {
    group: &'a str,
    key_prefix: Cow<'a, str>,
    mode: &'static str,
    ack_wait_ms: u32,
    max_deliver: u32,
    poison: &'static str,
    shard_keys: Vec<Cow<'a, str>>,
    lag_events: u64,
    pending: u64,
    redeliveries: u64,
    parked: u64,
    expired: bool,
    slots: Vec<GroupSlotView<'a>>,
}

#[derive(Serialize)]
struct GroupSlotView<'a> {
    slot: u32,
    committed_seq: u64,
    acked_above: u64,
    lag_events: u64,
    lag_ms: u64,
    pending: u64,
    redeliveries: u64,
    parked: Vec<ParkedView<'a>>,
    expired: bool,
}

#[derive(Serialize)]
struct ParkedView<'a> {
    shard_key: Cow<'a, str>,
    seq: u64,
    attempts: u32,
}

impl<'a> From<&'a ConsumerGroup> for ConsumerGroupView<'a> {
    fn from(g: &'a ConsumerGroup) -> Self {
        let slots = g
            .slots
            .iter()
            .map(|s| GroupSlotView {
                slot: s.slot,
                committed_seq: s.committed_seq,
                acked_above: s.acked_above,
                lag_events: s.lag_events,
                lag_ms: s.lag_ms,
                pending: s.pending,
                redeliveries: s.redeliveries,
                parked: s
                    .parked
                    .iter()
                    .map(|p| ParkedView {
                        shard_key: utf8(&p.shard_key),
                        seq: p.seq,
                        attempts: p.attempts,
                    })
                    .collect(),
                expired: s.expired,
            })
            .collect();
        ConsumerGroupView {
            group: &g.group,
            key_prefix: utf8(&g.key_prefix),
            mode: mode_name(g.mode),
            ack_wait_ms: g.ack_wait_ms,
            max_deliver: g.max_deliver,
            poison: poison_name(g.poison),
            shard_keys: g.shard_keys.iter().map(|k| utf8(k)).collect(),
            lag_events: g.lag_events,
            pending: g.pending,
            redeliveries: g.redeliveries,
            parked: g.parked,
            expired: g.expired,
            slots,
        }
    }
}

/// What `feed describe|create|seek|unpark --json` print.
pub(crate) fn consumer_group(g: &ConsumerGroup) -> String {
    to_json(&ConsumerGroupView::from(g))
}

/// What `feed groups --json` prints: `{"groups":[…]}`, in name order.
pub(crate) fn consumer_groups(groups: &[ConsumerGroup]) -> String {
    #[derive(Serialize)]
    struct GroupsView<'a> {
        groups: Vec<ConsumerGroupView<'a>>,
    }
    to_json(&GroupsView {
        groups: groups.iter().map(ConsumerGroupView::from).collect(),
    })
}

/// What `feed delete --json` prints: `{"deleted":true}` (false: no slot had the group).
pub(crate) fn group_deleted(deleted: bool) -> String {
    #[derive(Serialize)]
    struct DeletedView {
        deleted: bool,
    }
    to_json(&DeletedView { deleted })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{sample_map, sample_status};
    use crate::render::*;
    use bytes::Bytes;

    #[test]
    fn json_strings_are_escaped() {
        // A string as every view writes it (the hand-written escaper this replaced wrote the same).
        let json_str = |s: &str| {
            let r = GetResponse {
                found: true,
                value: Bytes::copy_from_slice(s.as_bytes()),
                version: 1,
            };
            let out = get(&r);
            let value = out
                .strip_prefix("{\"found\":true,\"value\":")
                .and_then(|v| v.strip_suffix(",\"version\":1}"));
            value.unwrap_or_else(|| panic!("{out}")).to_string()
        };
        assert_eq!(json_str("plain"), "\"plain\"");
        assert_eq!(json_str("a\"b\\c\nd\u{1}é"), "\"a\\\"b\\\\c\\nd\\u0001é\"");
    }

    #[test]
    fn status_renders_as_json() {
        let mut status = sample_status();
        status.map = None;
        status.groups.truncate(1);
        status.meta = None;
        assert_eq!(
            render_status(&status, true),
            "{\"map\":null,\"groups\":[{\"id\":1,\"leader_id\":11,\"slots\":4,\"replicas\":[\
             {\"node_id\":11,\"addr\":\"a1:7001\",\"reachable\":true,\"role\":\"leader\",\
             \"term\":5,\"applied_index\":1200,\"error\":\"\"},\
             {\"node_id\":12,\"addr\":\"a2:7001\",\"reachable\":false,\"role\":\"\",\
             \"term\":0,\"applied_index\":0,\"error\":\"connection refused\"}]}],\
             \"meta\":null}"
        );
        let full = render_status(&sample_status(), true);
        assert!(full.starts_with("{\"map\":{\"version\":3,"), "{full}");
        assert!(full.ends_with("\"error\":\"\"}]}}"), "{full}");
    }

    /// Every `--json` output, with strings that need escaping, as ordoctl printed it before the
    /// serde views: the views must keep each byte.
    #[test]
    fn json_outputs_are_unchanged() {
        const ODD: &str = "q\"b\\s\nn\rr\tt\u{1}\u{1f}é/";
        const ODD_JSON: &str = "\"q\\\"b\\\\s\\nn\\rr\\tt\\u0001\\u001fé/\"";
        let odd = Bytes::from_static(ODD.as_bytes());
        let get = GetResponse {
            found: true,
            value: odd.clone(),
            version: u64::MAX,
        };
        assert_eq!(
            render_get(&get, true),
            format!("{{\"found\":true,\"value\":{ODD_JSON},\"version\":18446744073709551615}}")
        );
        let lossy = GetResponse {
            found: true,
            value: Bytes::from_static(b"a\xffb"),
            version: 1,
        };
        assert_eq!(
            render_get(&lossy, true),
            "{\"found\":true,\"value\":\"a\u{fffd}b\",\"version\":1}"
        );
        let ok = PutResponse {
            succeeded: true,
            version: 5,
        };
        assert_eq!(render_put(&ok, true), "{\"succeeded\":true,\"version\":5}");
        let deleted = DeleteResponse {
            succeeded: true,
            deleted: true,
            prev_version: 3,
        };
        assert_eq!(
            render_delete(&deleted, true),
            "{\"succeeded\":true,\"deleted\":true,\"prev_version\":3}"
        );
        assert_eq!(
            render_delete(&DeleteResponse::default(), true),
            "{\"succeeded\":false,\"deleted\":false,\"prev_version\":0}"
        );
        let items = [
            Item {
                key: odd.clone(),
                value: Bytes::new(),
                version: 2,
            },
            Item {
                key: Bytes::new(),
                value: odd.clone(),
                version: 0,
            },
        ];
        assert_eq!(
            scan(&items, Some(ODD.as_bytes())),
            format!(
                "{{\"items\":[{{\"key\":{ODD_JSON},\"version\":2,\"value\":\"\"}},\
                 {{\"key\":\"\",\"version\":0,\"value\":{ODD_JSON}}}],\"next_key\":{ODD_JSON}}}"
            )
        );
        assert_eq!(
            scan(&items[..1], Some(b"")),
            format!(
                "{{\"items\":[{{\"key\":{ODD_JSON},\"version\":2,\"value\":\"\"}}],\
                 \"next_key\":\"\"}}"
            )
        );
    }

    #[test]
    fn status_and_map_json_are_unchanged() {
        let mut status = sample_status();
        status.groups.truncate(1);
        assert_eq!(
            render_status(&status, true),
            "{\"map\":{\"version\":3,\"slot_count\":8,\"groups\":[\
             {\"id\":1,\"replicas\":[{\"node_id\":11,\"addr\":\"a1:7001\"},{\"node_id\":12,\"addr\":\"a2:7001\"}]},\
             {\"id\":2,\"replicas\":[{\"node_id\":21,\"addr\":\"b1:7001\"}]},\
             {\"id\":10,\"replicas\":[{\"node_id\":0,\"addr\":\"c1:7001\"}]}],\
             \"slot_owner\":[1,1,1,2,2,1,2,2],\"config_addrs\":[\"m1:7000\",\"m2:7000\"]},\
             \"groups\":[{\"id\":1,\"leader_id\":11,\"slots\":4,\"replicas\":[\
             {\"node_id\":11,\"addr\":\"a1:7001\",\"reachable\":true,\"role\":\"leader\",\
             \"term\":5,\"applied_index\":1200,\"error\":\"\"},\
             {\"node_id\":12,\"addr\":\"a2:7001\",\"reachable\":false,\"role\":\"\",\
             \"term\":0,\"applied_index\":0,\"error\":\"connection refused\"}]}],\
             \"meta\":{\"id\":0,\"leader_id\":1,\"slots\":0,\"replicas\":[\
             {\"node_id\":1,\"addr\":\"m1:7000\",\"reachable\":true,\"role\":\"leader\",\
             \"term\":2,\"applied_index\":30,\"error\":\"\"}]}}"
        );
        assert_eq!(
            render_map(&ShardMap::default(), true),
            "{\"version\":0,\"slot_count\":0,\"groups\":[],\"slot_owner\":[],\"config_addrs\":[]}"
        );
    }

    #[test]
    fn replicas_render_as_before() {
        let resp = ChangeGroupReplicasResponse {
            members: vec![
                ordo::proto::v1::Member {
                    node_id: 1,
                    addr: "a:1".into(),
                    voter: true,
                },
                ordo::proto::v1::Member {
                    node_id: 4,
                    addr: "d\"\\:1".into(),
                    voter: false,
                },
            ],
            catch_up_ms: 250,
            map: Some(sample_map()),
            task_id: 0,
        };
        assert_eq!(
            render_replicas(1, &resp, true),
            "{\"group\":1,\"members\":[{\"node_id\":1,\"addr\":\"a:1\",\"voter\":true},\
             {\"node_id\":4,\"addr\":\"d\\\"\\\\:1\",\"voter\":false}],\"catch_up_ms\":250,\
             \"map_version\":3}"
        );
        assert_eq!(
            render_replicas(0, &ChangeGroupReplicasResponse::default(), true),
            "{\"group\":0,\"members\":[],\"catch_up_ms\":0,\"map_version\":0}"
        );
        assert_eq!(
            render_replicas(1, &resp, false),
            "group 1, map version 3 (new replica caught up in 250 ms)\n\
             node 1  a:1    voter\n\
             node 4  d\"\\:1  learner"
        );
    }

    #[test]
    fn plan_and_leader_render_as_before() {
        let plan = [
            PlannedMove {
                slots: vec![0, 1, 2, 5],
                from_group: 1,
                to_group: 2,
            },
            PlannedMove {
                slots: vec![],
                from_group: 10,
                to_group: 3,
            },
        ];
        assert_eq!(
            render_plan(&plan, true),
            "{\"plan\":[{\"from_group\":1,\"to_group\":2,\"slots\":[0,1,2,5]},\
             {\"from_group\":10,\"to_group\":3,\"slots\":[]}]}"
        );
        assert_eq!(render_plan(&[], true), "{\"plan\":[]}");
        assert_eq!(
            render_plan(&plan, false),
            "plan: 2 moves\n\
             \x20 group 1 → group 2   4 slots  0-2,5\n\
             \x20 group 10 → group 3  0 slots"
        );
        assert_eq!(
            render_plan(&[], false),
            "nothing to move: the slots are spread evenly already"
        );
        let leader = TransferLeaderResponse {
            leader_id: 2,
            term: 9,
        };
        assert_eq!(render_leader(&leader, true), "{\"leader_id\":2,\"term\":9}");
        assert_eq!(render_leader(&leader, false), "leader is node 2 (term 9)");
    }

    #[test]
    fn migrations_json_is_unchanged() {
        let m = ordo::proto::v1::Migration {
            id: 4,
            slots: vec![0, 1, 2, 7],
            from_group: 1,
            to_group: 3,
            state: ordo::proto::v1::MigrationState::Copying as i32,
            items_copied: 10,
            bytes_copied: 4096,
            log_records: 6,
            pause_ms: 42,
            items_cleaned: 9,
            map_version: 12,
            abort_requested: true,
            error: "x\"y".into(),
            ..Default::default()
        };
        assert_eq!(
            render_migrations(&[m.clone(), ordo::proto::v1::Migration::default()], true),
            "[{\"id\":4,\"state\":\"copying\",\"from_group\":1,\"to_group\":3,\"slots\":[0,1,2,7],\
             \"items_copied\":10,\"bytes_copied\":4096,\"log_records\":6,\"pause_ms\":42,\
             \"items_cleaned\":9,\"map_version\":12,\"abort_requested\":true,\"error\":\"x\\\"y\"},\
             {\"id\":0,\"state\":\"unknown\",\"from_group\":0,\"to_group\":0,\"slots\":[],\
             \"items_copied\":0,\"bytes_copied\":0,\"log_records\":0,\"pause_ms\":0,\
             \"items_cleaned\":0,\"map_version\":0,\"abort_requested\":false,\"error\":\"\"}]"
        );
        assert_eq!(render_migrations(&[], true), "[]");
    }

    #[test]
    fn tasks_render_as_json_and_as_a_table() {
        use ordo::proto::v1::{ChangeGroupReplicasRequest, TaskKind, TaskState};
        let rebalance = Task {
            id: 3,
            kind: TaskKind::Drain as i32,
            state: TaskState::Running as i32,
            plan: vec![PlannedMove::default(); 4],
            moves_done: 1,
            migrations: vec![5, 6],
            drain_group: 2,
            ..Default::default()
        };
        let change = Task {
            id: 4,
            kind: TaskKind::ChangeReplicas as i32,
            state: TaskState::Failed as i32,
            change: Some(ChangeGroupReplicasRequest {
                group_id: 1,
                change: None,
            }),
            error: "would lose quorum".into(),
            ..Default::default()
        };
        let both = [rebalance, change];
        assert_eq!(
            render_tasks(&both, true),
            "[{\"id\":3,\"kind\":\"drain\",\"state\":\"running\",\"moves\":4,\"moves_done\":1,\
             \"migrations\":[5,6],\"group\":null,\"drain_group\":2,\"abort_requested\":false,\
             \"error\":\"\"},\
             {\"id\":4,\"kind\":\"replica change\",\"state\":\"failed\",\"moves\":0,\
             \"moves_done\":0,\"migrations\":[],\"group\":1,\"drain_group\":0,\
             \"abort_requested\":false,\"error\":\"would lose quorum\"}]"
        );
        assert_eq!(
            render_tasks(&both, false),
            "id  kind            state    moves  migrations  note\n\
             3   drain           running  1/4    5,6         drains group 2\n\
             4   replica change  failed   0/0                would lose quorum"
        );
        assert_eq!(render_tasks(&[], false), "no tasks");
    }
}
