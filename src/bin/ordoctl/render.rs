//! Text output: what each command prints without `--json`, as aligned tables. Each
//! `render_*` takes the `--json` flag and hands the answer to [`crate::json`] when it is set, so a
//! command prints one string either way.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bytes::Bytes;
use ordo::proto::v1::{
    change_event, txn_op, txn_op_result, ChangeEvent, ChangeGroupReplicasResponse, ClusterStatus,
    DeleteResponse, GetResponse, Item, Migration, Mode, PlannedMove, PoisonPolicy, PutResponse,
    ReplicaStatus, ShardMap, Task, TransferLeaderResponse, TxnOp, TxnResponse,
};
use ordo_config::migration::state_name;
use ordo_config::tasks::{task_kind_name, task_state_name};

use crate::json;

pub(crate) fn render_get(r: &GetResponse, json: bool) -> String {
    if json {
        return json::get(r);
    }
    match r.found {
        true => format!(
            "{}\nversion={}",
            String::from_utf8_lossy(&r.value),
            r.version
        ),
        false => "not found".into(),
    }
}

pub(crate) fn render_put(r: &PutResponse, json: bool) -> String {
    match (json, r.succeeded) {
        (true, _) => json::put(r),
        (false, true) => format!("ok version={}", r.version),
        (false, false) => format!("condition failed: current version={}", r.version),
    }
}

pub(crate) fn render_delete(r: &DeleteResponse, json: bool) -> String {
    match (json, r.succeeded) {
        (true, _) => json::delete(r),
        (false, true) if r.deleted => format!("ok deleted prev_version={}", r.prev_version),
        (false, true) => "ok not found".into(),
        (false, false) => format!("condition failed: current version={}", r.prev_version),
    }
}

/// One scan line: `key  version  value`.
pub(crate) fn render_item(item: &Item) -> String {
    format!(
        "{}  {}  {}",
        String::from_utf8_lossy(&item.key),
        item.version,
        String::from_utf8_lossy(&item.value)
    )
}

/// One `watch` line: `slot/seq  OP  shard_key  key  vVERSION  value` (and the 2PC transaction's
/// id when it has one).
pub(crate) fn render_event(e: &ChangeEvent, json: bool) -> String {
    if json {
        return json::event(e);
    }
    let word = |b: &[u8]| shell_word(&String::from_utf8_lossy(b));
    let mut line = format!(
        "{}/{}  {}  {}  {}  v{}  {}",
        e.slot,
        e.seq,
        event_op_name(e.op),
        word(&e.shard_key),
        word(&e.key),
        e.version,
        word(&e.value)
    );
    if !e.txn_id.is_empty() {
        let _ = write!(line, "  txn {}", ordo::error::hex(&e.txn_id));
    }
    line
}

/// The last line of `watch`: the cursor to resume from (`--from <cursor>`).
pub(crate) fn render_cursor(cursor: &[u8], json: bool) -> String {
    let hex = ordo::error::hex(cursor);
    if json {
        json::cursor(&hex)
    } else {
        format!("cursor {hex}")
    }
}

/// A change event's op as `watch` shows it.
pub(crate) fn event_op_name(op: i32) -> &'static str {
    match change_event::Op::try_from(op) {
        Ok(change_event::Op::Put) => "PUT",
        Ok(change_event::Op::Delete) => "DELETE",
        Ok(change_event::Op::Emit) => "EMIT",
        Ok(change_event::Op::Snapshot) => "SNAPSHOT",
        Err(_) => "UNKNOWN",
    }
}

/// A consumer group's mode as `feed create --mode` takes it.
pub(crate) fn mode_name(mode: i32) -> &'static str {
    match Mode::try_from(mode) {
        Ok(Mode::KeyOrdered) => "key-ordered",
        Ok(Mode::SlotExclusive) => "slot-exclusive",
        Err(_) => "unknown",
    }
}

/// A consumer group's poison policy as `feed create --poison` takes it.
pub(crate) fn poison_name(poison: i32) -> &'static str {
    match PoisonPolicy::try_from(poison) {
        Ok(PoisonPolicy::Park) => "park",
        Ok(PoisonPolicy::DeadLetter) => "dead-letter",
        Err(_) => "unknown",
    }
}

/// What `txn` prints: the outcome, then each result next to the op (of `ops`, those that ran)
/// that produced it.
pub(crate) fn render_txn(ops: &[TxnOp], resp: &TxnResponse, json: bool) -> String {
    if json {
        return json::txn(ops, resp);
    }
    let mut out = String::from(if resp.succeeded {
        "succeeded"
    } else {
        "failed"
    });
    for (i, result) in resp.results.iter().enumerate() {
        let op = ops.get(i).map(describe_op).unwrap_or_else(|| "?".into());
        let body = match result.result.as_ref() {
            Some(txn_op_result::Result::Put(r)) => render_put(r, false),
            Some(txn_op_result::Result::Delete(r)) => render_delete(r, false),
            Some(txn_op_result::Result::Get(r)) => match r.found {
                true => format!(
                    "{} version={}",
                    String::from_utf8_lossy(&r.value),
                    r.version
                ),
                false => "not found".into(),
            },
            Some(txn_op_result::Result::Emit(_)) => "emitted".into(),
            Some(txn_op_result::Result::FeedAck(_)) => "acked".into(),
            None => "(empty result)".into(),
        };
        let _ = write!(out, "\n[{i}] {op}: {body}");
    }
    out
}

/// What `replica add|remove|replace` prints: the group's replicas after the change.
pub(crate) fn render_replicas(group: u64, r: &ChangeGroupReplicasResponse, json: bool) -> String {
    if json {
        return json::replicas(group, r);
    }
    let version = r.map.as_ref().map_or(0, |m| m.version);
    let mut out = format!("group {group}, map version {version}");
    if r.catch_up_ms > 0 {
        let _ = write!(out, " (new replica caught up in {} ms)", r.catch_up_ms);
    }
    let rows: Vec<Vec<String>> = r
        .members
        .iter()
        .map(|m| {
            let role = if m.voter { "voter" } else { "learner" };
            vec![
                format!("node {}", m.node_id),
                m.addr.clone(),
                role.to_string(),
            ]
        })
        .collect();
    for line in align(&rows) {
        out.push('\n');
        out.push_str(&line);
    }
    out
}

/// What `rebalance` and `group drain` print before moving: the planned moves.
pub(crate) fn render_plan(plan: &[PlannedMove], json: bool) -> String {
    if json {
        return json::plan(plan);
    }
    if plan.is_empty() {
        return "nothing to move: the slots are spread evenly already".into();
    }
    let rows: Vec<Vec<String>> = plan
        .iter()
        .map(|p| {
            vec![
                format!("group {} → group {}", p.from_group, p.to_group),
                format!("{} slots", p.slots.len()),
                compress_ranges(&p.slots),
            ]
        })
        .collect();
    let mut out = format!("plan: {} moves", rows.len());
    for line in align(&rows) {
        let _ = write!(out, "\n  {line}");
    }
    out
}

/// What `leader transfer` prints: the leader after the transfer.
pub(crate) fn render_leader(r: &TransferLeaderResponse, json: bool) -> String {
    if json {
        json::leader(r)
    } else {
        format!("leader is node {} (term {})", r.leader_id, r.term)
    }
}

pub(crate) fn render_migrations(list: &[Migration], json: bool) -> String {
    if json {
        return json::migrations(list);
    }
    if list.is_empty() {
        return "no migrations".into();
    }
    let mut rows = vec![vec![
        "id".to_string(),
        "state".into(),
        "move".into(),
        "slots".into(),
        "items".into(),
        "KiB".into(),
        "log".into(),
        "pause".into(),
        "cleaned".into(),
        "note".into(),
    ]];
    for m in list {
        rows.push(vec![
            m.id.to_string(),
            state_name(m.state).to_string(),
            format!("{}→{}", m.from_group, m.to_group),
            compress_ranges(&m.slots),
            m.items_copied.to_string(),
            (m.bytes_copied / 1024).to_string(),
            m.log_records.to_string(),
            if m.pause_ms > 0 {
                format!("{} ms", m.pause_ms)
            } else {
                "-".into()
            },
            m.items_cleaned.to_string(),
            if m.abort_requested && m.error.is_empty() {
                "abort requested".into()
            } else {
                m.error.clone()
            },
        ]);
    }
    align(&rows).join("\n")
}

/// What `tasks` and `tasks abort` print: one row per task.
pub(crate) fn render_tasks(list: &[Task], json: bool) -> String {
    if json {
        return json::tasks(list);
    }
    if list.is_empty() {
        return "no tasks".into();
    }
    let mut rows = vec![vec![
        "id".to_string(),
        "kind".into(),
        "state".into(),
        "moves".into(),
        "migrations".into(),
        "note".into(),
    ]];
    for t in list {
        let note = match &t.change {
            _ if !t.error.is_empty() => t.error.clone(),
            _ if t.abort_requested => "abort requested".into(),
            Some(c) => format!("group {}", c.group_id),
            None if t.drain_group != 0 => format!("drains group {}", t.drain_group),
            None => String::new(),
        };
        rows.push(vec![
            t.id.to_string(),
            task_kind_name(t.kind).to_string(),
            task_state_name(t.state).to_string(),
            format!("{}/{}", t.moves_done, t.plan.len()),
            t.migrations
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(","),
            note,
        ]);
    }
    align(&rows).join("\n")
}

/// `s` as the user would type it back: `""` for empty, single-quoted when it has spaces or quotes.
pub(crate) fn shell_word(s: &str) -> String {
    if s.is_empty() {
        "\"\"".into()
    } else if s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c))
    {
        s.into()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The op in the syntax it was given in, e.g. `put o1 status paid`.
pub(crate) fn describe_op(op: &TxnOp) -> String {
    let word = |b: &Bytes| {
        if b.is_empty() {
            "\"\"".to_string()
        } else {
            String::from_utf8_lossy(b).into_owned()
        }
    };
    match &op.op {
        Some(txn_op::Op::Put(p)) => format!(
            "put {} {} {}",
            word(&p.shard_key),
            word(&p.key),
            word(&p.value)
        ),
        Some(txn_op::Op::Delete(d)) => format!("delete {} {}", word(&d.shard_key), word(&d.key)),
        Some(txn_op::Op::Get(g)) => format!("get {} {}", word(&g.shard_key), word(&g.key)),
        Some(txn_op::Op::Emit(e)) => format!(
            "emit {} {} {}",
            word(&e.shard_key),
            word(&e.key),
            word(&e.value)
        ),
        Some(txn_op::Op::FeedAck(a)) => format!(
            "feed-ack {} {} {} {} {}",
            a.group,
            word(&a.shard_key),
            a.slot,
            a.seq,
            a.attempt
        ),
        None => "(empty op)".into(),
    }
}

/// Slots as sorted, comma-separated inclusive ranges: `[3, 0, 1, 2, 7]` -> `0-3,7`.
pub(crate) fn compress_ranges(slots: &[u32]) -> String {
    let mut sorted = slots.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            let _ = write!(out, "{start}");
        } else {
            let _ = write!(out, "{start}-{end}");
        }
        i += 1;
    }
    out
}

/// The slots each group owns: the map's groups in their order (with no slots when they own
/// none), then owners the map does not list, ascending (0 = unassigned).
fn slots_by_group(map: &ShardMap) -> Vec<(u64, Vec<u32>)> {
    let mut owned: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for (slot, owner) in map.slot_owner.iter().enumerate() {
        owned.entry(*owner).or_default().push(slot as u32);
    }
    let mut out: Vec<(u64, Vec<u32>)> = map
        .groups
        .iter()
        .map(|g| (g.id, owned.remove(&g.id).unwrap_or_default()))
        .collect();
    out.extend(owned);
    out
}

/// `group 3`, or what an owner missing from the map's groups is.
fn group_label(map: &ShardMap, id: u64) -> String {
    if map.groups.iter().any(|g| g.id == id) {
        format!("group {id}")
    } else if id == 0 {
        "unassigned".into()
    } else {
        format!("group {id} (not registered)")
    }
}

/// `map version N, S slots, G groups`, plus a hint when the cluster is not initialized.
fn map_header(map: &ShardMap) -> String {
    let mut out = format!(
        "map version {}, {} slots, {} groups",
        map.version,
        map.slot_count,
        map.groups.len()
    );
    if map.version == 0 {
        out.push_str("\ncluster not initialized (run ordoctl init)");
    }
    out
}

/// What `init`, `group add|remove` and `move-slots` print: the new version and the slot count of
/// every group.
pub(crate) fn render_map_change(map: &ShardMap, json: bool) -> String {
    if json {
        return json::map(map);
    }
    let rows: Vec<Vec<String>> = slots_by_group(map)
        .into_iter()
        .map(|(id, slots)| vec![group_label(map, id), format!("slots {}", slots.len())])
        .collect();
    let mut out = map_header(map);
    for line in align(&rows) {
        out.push('\n');
        out.push_str(&line);
    }
    out
}

/// What `map` prints: the header, each group with its slot ranges and replicas, the config
/// replicas.
pub(crate) fn render_map(map: &ShardMap, json: bool) -> String {
    if json {
        return json::map(map);
    }
    let sections = slots_by_group(map);
    let heads: Vec<Vec<String>> = sections
        .iter()
        .map(|(id, slots)| {
            let ranges = if slots.is_empty() {
                "-".to_string()
            } else {
                compress_ranges(slots)
            };
            vec![
                group_label(map, *id),
                format!("slots {}", slots.len()),
                ranges,
            ]
        })
        .collect();
    let replicas = |id: u64| {
        map.groups
            .iter()
            .filter(move |g| g.id == id)
            .flat_map(|g| &g.replicas)
    };
    let replica_rows: Vec<Vec<String>> = sections
        .iter()
        .flat_map(|(id, _)| replicas(*id))
        .map(|r| vec![node_label(r.node_id), r.addr.clone()])
        .collect();
    let heads = align(&heads);
    let mut replica_lines = align(&replica_rows).into_iter();
    let mut out = map_header(map);
    for ((id, _), head) in sections.iter().zip(heads) {
        let _ = write!(out, "\n{head}");
        for _ in replicas(*id) {
            let _ = write!(out, "\n  {}", replica_lines.next().unwrap_or_default());
        }
    }
    if !map.config_addrs.is_empty() {
        let _ = write!(out, "\nconfig  {}", map.config_addrs.join(", "));
    }
    out
}

/// What `status` prints: the map header, then each group and the config group with one line
/// per replica.
pub(crate) fn render_status(status: &ClusterStatus, json: bool) -> String {
    if json {
        return json::status(status);
    }
    let map = status.map.clone().unwrap_or_default();
    let mut sections: Vec<(Vec<String>, &[ReplicaStatus])> = status
        .groups
        .iter()
        .map(|g| {
            let head = vec![
                format!("group {}", g.id),
                leader_cell(g.leader_id),
                format!("slots {}", g.slots),
            ];
            (head, &g.replicas[..])
        })
        .collect();
    match &status.meta {
        Some(meta) => sections.push((
            vec!["config".into(), leader_cell(meta.leader_id)],
            &meta.replicas[..],
        )),
        None => sections.push((vec!["config".into(), "(not reported)".into()], &[])),
    }
    let heads: Vec<Vec<String>> = sections.iter().map(|(h, _)| h.clone()).collect();
    let rows: Vec<Vec<String>> = sections
        .iter()
        .flat_map(|(_, replicas)| replicas.iter().map(replica_row))
        .collect();
    let mut rows = align(&rows).into_iter();
    let mut out = map_header(&map);
    for ((_, replicas), head) in sections.iter().zip(align(&heads)) {
        let _ = write!(out, "\n{head}");
        for _ in replicas.iter() {
            let _ = write!(out, "\n  {}", rows.next().unwrap_or_default());
        }
    }
    out
}

fn leader_cell(leader_id: u64) -> String {
    if leader_id == 0 {
        "leader none".into()
    } else {
        format!("leader {leader_id}")
    }
}

/// `node 7`; `node ?` when the id is not known yet.
fn node_label(node_id: u64) -> String {
    if node_id == 0 {
        "node ?".into()
    } else {
        format!("node {node_id}")
    }
}

/// One replica line of `status`. An unreachable replica has no state to show, only the error.
fn replica_row(r: &ReplicaStatus) -> Vec<String> {
    let mut row = vec![node_label(r.node_id), r.addr.clone()];
    if !r.reachable {
        row.push(if r.error.is_empty() {
            "unreachable".into()
        } else {
            format!("unreachable: {}", r.error)
        });
        return row;
    }
    row.push(if r.role.is_empty() {
        "?".into()
    } else {
        r.role.clone()
    });
    row.push(format!("term {}", r.term));
    // No item count: replicas report it only when asked for a data digest, which costs a scan.
    row.push(format!("applied {}", r.applied_index));
    row
}

/// Joins each row's cells with two spaces, padding every cell but a row's last to the widest
/// cell of its column (last cells, which may be long error messages, do not widen a column).
pub(crate) fn align(rows: &[Vec<String>]) -> Vec<String> {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(row.len().saturating_sub(1)) {
            if widths.len() <= i {
                widths.push(0);
            }
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    rows.iter()
        .map(|row| {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                if i + 1 < row.len() {
                    let pad = widths[i].saturating_sub(cell.chars().count());
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            line.trim_end().to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{sample_map, sample_status, strings};
    use crate::parse::{parse_op, parse_slot_ranges};
    use ordo::proto::v1::{Group, Replica};

    #[test]
    fn ops_describe_in_their_input_syntax() {
        for s in ["put o1 status paid", "delete o1 \"\"", "get o1 k"] {
            assert_eq!(describe_op(&parse_op(s).unwrap()), s);
        }
    }

    #[test]
    fn results_render() {
        let found = GetResponse {
            found: true,
            value: Bytes::from_static(b"paid"),
            version: 4,
        };
        assert_eq!(render_get(&found, false), "paid\nversion=4");
        assert_eq!(
            render_get(&found, true),
            "{\"found\":true,\"value\":\"paid\",\"version\":4}"
        );
        assert_eq!(render_get(&GetResponse::default(), false), "not found");
        assert_eq!(
            render_get(&GetResponse::default(), true),
            "{\"found\":false}"
        );

        let ok = PutResponse {
            succeeded: true,
            version: 5,
        };
        let failed = PutResponse {
            succeeded: false,
            version: 7,
        };
        assert_eq!(render_put(&ok, false), "ok version=5");
        assert_eq!(
            render_put(&failed, false),
            "condition failed: current version=7"
        );
        assert_eq!(
            render_put(&failed, true),
            "{\"succeeded\":false,\"version\":7}"
        );

        let deleted = DeleteResponse {
            succeeded: true,
            deleted: true,
            prev_version: 3,
        };
        assert_eq!(render_delete(&deleted, false), "ok deleted prev_version=3");
        assert_eq!(
            render_delete(
                &DeleteResponse {
                    succeeded: true,
                    ..Default::default()
                },
                false
            ),
            "ok not found"
        );

        let item = Item {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"v"),
            version: 2,
        };
        assert_eq!(render_item(&item), "k  2  v");
        assert_eq!(
            json::scan(&[item], Some(b"n")),
            "{\"items\":[{\"key\":\"k\",\"version\":2,\"value\":\"v\"}],\"next_key\":\"n\"}"
        );
        assert_eq!(json::scan(&[], None), "{\"items\":[],\"next_key\":null}");
    }

    #[test]
    fn shell_words_round_trip_visibly() {
        assert_eq!(shell_word(""), "\"\"");
        assert_eq!(shell_word("item-7"), "item-7");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
    }

    #[test]
    fn migrations_render_as_a_table_and_as_json() {
        let m = ordo::proto::v1::Migration {
            id: 4,
            slots: vec![0, 1, 2, 7],
            from_group: 1,
            to_group: 3,
            state: ordo::proto::v1::MigrationState::Done as i32,
            items_copied: 10,
            bytes_copied: 4096,
            pause_ms: 42,
            ..Default::default()
        };
        let table = render_migrations(std::slice::from_ref(&m), false);
        assert!(table.contains("done") && table.contains("1→3"), "{table}");
        assert!(
            table.contains("0-2,7") && table.contains("42 ms"),
            "{table}"
        );
        let json = render_migrations(&[m], true);
        assert!(
            json.starts_with("[{\"id\":4,\"state\":\"done\",\"from_group\":1,\"to_group\":3,\"slots\":[0,1,2,7],"),
            "{json}"
        );
        assert!(json.contains("\"pause_ms\":42,"), "{json}");
        assert_eq!(render_migrations(&[], false), "no migrations");
    }

    #[test]
    fn slot_ranges_compress() {
        assert_eq!(compress_ranges(&[]), "");
        assert_eq!(compress_ranges(&(0..=1365).collect::<Vec<_>>()), "0-1365");
        assert_eq!(compress_ranges(&[10, 5, 1, 2, 3, 9, 3]), "1-3,5,9-10");
        assert_eq!(
            compress_ranges(&[u32::MAX - 1, u32::MAX]),
            "4294967294-4294967295"
        );
        // Compression and parsing are inverses.
        let slots = parse_slot_ranges("0-511,600,700-701").unwrap();
        assert_eq!(compress_ranges(&slots), "0-511,600,700-701");
    }

    #[test]
    fn maps_render() {
        let map = sample_map();
        assert_eq!(
            render_map_change(&map, false),
            "map version 3, 8 slots, 3 groups\n\
             group 1   slots 4\n\
             group 2   slots 4\n\
             group 10  slots 0"
        );
        assert_eq!(
            render_map(&map, false),
            "map version 3, 8 slots, 3 groups\n\
             group 1   slots 4  0-2,5\n\
             \x20 node 11  a1:7001\n\
             \x20 node 12  a2:7001\n\
             group 2   slots 4  3-4,6-7\n\
             \x20 node 21  b1:7001\n\
             group 10  slots 0  -\n\
             \x20 node ?   c1:7001\n\
             config  m1:7000, m2:7000"
        );
        // Owners the groups do not list still show up.
        let odd = ShardMap {
            version: 4,
            slot_count: 3,
            groups: vec![],
            slot_owner: vec![0, 5, 5],
            config_addrs: vec![],
        };
        assert_eq!(
            render_map(&odd, false),
            "map version 4, 3 slots, 0 groups\n\
             unassigned                slots 1  0\n\
             group 5 (not registered)  slots 2  1-2"
        );
        assert_eq!(
            render_map_change(&ShardMap::default(), false),
            "map version 0, 0 slots, 0 groups\ncluster not initialized (run ordoctl init)"
        );
        let small = ShardMap {
            version: 1,
            slot_count: 2,
            groups: vec![Group {
                id: 1,
                replicas: vec![Replica {
                    node_id: 1,
                    addr: "a\"b".into(),
                }],
            }],
            slot_owner: vec![1, 1],
            config_addrs: strings(&["m:1"]),
        };
        assert_eq!(
            render_map(&small, true),
            "{\"version\":1,\"slot_count\":2,\"groups\":[{\"id\":1,\"replicas\":\
             [{\"node_id\":1,\"addr\":\"a\\\"b\"}]}],\"slot_owner\":[1,1],\
             \"config_addrs\":[\"m:1\"]}"
        );
        assert_eq!(render_map_change(&small, true), render_map(&small, true));
    }

    #[test]
    fn status_renders_as_a_table() {
        assert_eq!(
            render_status(&sample_status(), false),
            "map version 3, 8 slots, 3 groups\n\
             group 1  leader 11    slots 4\n\
             \x20 node 11  a1:7001  leader     term 5   applied 1200\n\
             \x20 node 12  a2:7001  unreachable: connection refused\n\
             group 2  leader none  slots 4\n\
             \x20 node 21  b1:7001  candidate  term 12  applied 7\n\
             config   leader 1\n\
             \x20 node 1   m1:7000  leader     term 2   applied 30"
        );
        let bare = ClusterStatus::default();
        assert_eq!(
            render_status(&bare, false),
            "map version 0, 0 slots, 0 groups\n\
             cluster not initialized (run ordoctl init)\n\
             config  (not reported)"
        );
    }

    #[test]
    fn txn_renders_as_json_and_text() {
        use ordo::proto::v1::TxnOpResult;
        let ops: Vec<TxnOp> = ["put o1 k v", "delete o1 \"\"", "get o1 k", "get o1 gone"]
            .into_iter()
            .map(|s| parse_op(s).unwrap())
            .collect();
        let result = |r| TxnOpResult { result: Some(r) };
        let resp = TxnResponse {
            succeeded: true,
            results: vec![
                result(txn_op_result::Result::Put(PutResponse {
                    succeeded: true,
                    version: 4,
                })),
                result(txn_op_result::Result::Delete(DeleteResponse {
                    succeeded: true,
                    deleted: false,
                    prev_version: 0,
                })),
                result(txn_op_result::Result::Get(GetResponse {
                    found: true,
                    value: Bytes::from_static(b"a\"b"),
                    version: 4,
                })),
                result(txn_op_result::Result::Get(GetResponse::default())),
                TxnOpResult { result: None },
            ],
        };
        assert_eq!(
            render_txn(&ops, &resp, true),
            "{\"succeeded\":true,\"results\":[\
             {\"op\":\"put o1 k v\",\"result\":{\"succeeded\":true,\"version\":4}},\
             {\"op\":\"delete o1 \\\"\\\"\",\"result\":{\"succeeded\":true,\"deleted\":false,\
             \"prev_version\":0}},\
             {\"op\":\"get o1 k\",\"result\":{\"found\":true,\"value\":\"a\\\"b\",\"version\":4}},\
             {\"op\":\"get o1 gone\",\"result\":{\"found\":false}},\
             {\"op\":\"?\",\"result\":null}]}"
        );
        assert_eq!(
            render_txn(&ops, &resp, false),
            "succeeded\n\
             [0] put o1 k v: ok version=4\n\
             [1] delete o1 \"\": ok not found\n\
             [2] get o1 k: a\"b version=4\n\
             [3] get o1 gone: not found\n\
             [4] ?: (empty result)"
        );
        let failed = TxnResponse::default();
        assert_eq!(
            render_txn(&[], &failed, true),
            "{\"succeeded\":false,\"results\":[]}"
        );
        assert_eq!(render_txn(&[], &failed, false), "failed");
    }

    #[test]
    fn align_pads_all_but_the_last_cell() {
        let rows = vec![
            strings(&["a", "bb", "c"]),
            strings(&["aaa", "b", "a very long last cell"]),
            strings(&["x"]),
        ];
        assert_eq!(
            align(&rows),
            ["a    bb  c", "aaa  b   a very long last cell", "x"]
        );
    }

    #[test]
    fn watch_events_and_the_cursor_render_as_lines() {
        let e = ChangeEvent {
            slot: 3,
            seq: 17,
            shard_key: Bytes::from_static(b"order-1"),
            key: Bytes::from_static(b"outbox/paid"),
            op: change_event::Op::Emit as i32,
            version: 0,
            value: Bytes::from_static(b"{\"total\": 5}"),
            commit_ts_ms: 1234,
            txn_id: Bytes::from_static(b"\x01\xab"),
            ..Default::default()
        };
        assert_eq!(
            render_event(&e, false),
            "3/17  EMIT  order-1  outbox/paid  v0  '{\"total\": 5}'  txn 01ab"
        );
        assert_eq!(
            render_event(&e, true),
            "{\"slot\":3,\"seq\":17,\"op\":\"EMIT\",\"shard_key\":\"order-1\",\
             \"key\":\"outbox/paid\",\"version\":0,\"value\":\"{\\\"total\\\": 5}\",\
             \"commit_ts_ms\":1234,\"txn_id\":\"01ab\"}"
        );
        assert_eq!(render_cursor(&[1, 0xfe], false), "cursor 01fe");
        assert_eq!(render_cursor(&[1, 0xfe], true), "{\"cursor\":\"01fe\"}");
    }
}
