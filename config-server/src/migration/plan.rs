//! The pure part of resharding: which moves a request makes (one per donor), an even spread
//! for a rebalance, and how migrations read. No I/O; unit-tested here.

use std::collections::BTreeMap;

use ordo_proto::v1::*;

use super::{CONCURRENT_MAX, SLOTS_PER_MOVE_DEFAULT};
use crate::map::{self, MapError};

/// Whether `m` still holds slots in motion (copying, fenced, or cut over but not cleaned up).
pub fn in_flight(m: &Migration) -> bool {
    matches!(
        MigrationState::try_from(m.state),
        Ok(MigrationState::Copying | MigrationState::Fenced | MigrationState::Committed)
    )
}

/// The state's name as `ordoctl` shows it.
pub fn state_name(state: i32) -> &'static str {
    match MigrationState::try_from(state) {
        Ok(MigrationState::Copying) => "copying",
        Ok(MigrationState::Fenced) => "fenced",
        Ok(MigrationState::Committed) => "committed",
        Ok(MigrationState::Done) => "done",
        Ok(MigrationState::Aborted) => "aborted",
        _ => "unknown",
    }
}

/// Checks a request to move `slots` to `to` against the map and the migrations in flight; the
/// moves it makes, one per donor group (slots `to` already owns are skipped).
pub fn plan_move(
    map: &ShardMap,
    migrations: &MigrationList,
    slots: &[u32],
    to: u64,
) -> Result<Vec<PlannedMove>, MapError> {
    let (_, donors) = map::move_slots(map, slots, to)?;
    let busy: BTreeMap<u32, &Migration> = migrations
        .migrations
        .iter()
        .filter(|m| in_flight(m))
        .flat_map(|m| m.slots.iter().map(move |s| (*s, m)))
        .collect();
    for s in donors.values().flatten() {
        if let Some(m) = busy.get(s) {
            return Err(MapError::Refused(format!(
                "slot {s} is already moving in migration {} (group {} to group {}); wait for it or abort it with `ordoctl migrations abort {}`",
                m.id, m.from_group, m.to_group, m.id
            )));
        }
    }
    for m in migrations.migrations.iter().filter(|m| in_flight(m)) {
        if m.from_group == to {
            return Err(MapError::Refused(format!(
                "group {to} is moving slots out (migration {}); move slots into it after that ends",
                m.id
            )));
        }
    }
    let running = migrations
        .migrations
        .iter()
        .filter(|m| in_flight(m))
        .count();
    if running + donors.len() > CONCURRENT_MAX {
        return Err(MapError::Refused(format!(
            "{running} migrations are in flight and this needs {} more; at most {CONCURRENT_MAX} run at once, retry when some finish (`ordoctl migrations`)",
            donors.len()
        )));
    }
    Ok(donors
        .into_iter()
        .map(|(from, slots)| PlannedMove {
            slots,
            from_group: from,
            to_group: to,
        })
        .collect())
}

/// An even spread: every group other than `drain` ends with `slot_count / n` slots (the first
/// `slot_count % n` one more). Slots move from the groups above their share, highest slots
/// first, to the groups below, in moves of at most `per_move` slots with one donor and one
/// recipient each. Deterministic.
pub fn plan_rebalance(
    map: &ShardMap,
    drain: Option<u64>,
    per_move: u32,
) -> Result<Vec<PlannedMove>, MapError> {
    if let Some(d) = drain {
        if !map.groups.iter().any(|g| g.id == d) {
            return Err(MapError::Refused(format!("group {d} is not in the map")));
        }
    }
    let keep: Vec<u64> = map
        .groups
        .iter()
        .map(|g| g.id)
        .filter(|g| Some(*g) != drain)
        .collect();
    if keep.is_empty() {
        return Err(MapError::Refused(
            "no group would be left to own the slots; add a group first".into(),
        ));
    }
    let per_move = if per_move == 0 {
        SLOTS_PER_MOVE_DEFAULT
    } else {
        per_move
    } as usize;
    let n = keep.len() as u32;
    let mut owned = map::slots_by_group(map);
    let target: BTreeMap<u64, usize> = keep
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let extra = (i as u32) < map.slot_count % n;
            (*g, (map.slot_count / n + extra as u32) as usize)
        })
        .chain(drain.map(|d| (d, 0)))
        .collect();
    // Slots given away, per donor, highest first.
    let mut surplus: Vec<(u64, Vec<u32>)> = Vec::new();
    for (g, t) in &target {
        let slots = owned.entry(*g).or_default();
        if slots.len() > *t {
            let give: Vec<u32> = slots.split_off(*t).into_iter().rev().collect();
            surplus.push((*g, give));
        }
    }
    let mut plan = Vec::new();
    for (to, t) in &target {
        let mut need = t.saturating_sub(owned.get(to).map_or(0, |s| s.len()));
        for (from, give) in surplus.iter_mut() {
            while need > 0 && !give.is_empty() {
                let take = need.min(per_move).min(give.len());
                let mut slots: Vec<u32> = give.drain(..take).collect();
                slots.sort_unstable();
                need -= take;
                plan.push(PlannedMove {
                    slots,
                    from_group: *from,
                    to_group: *to,
                });
            }
        }
    }
    Ok(plan)
}

/// Slots of `plan` per (from, to), for logs.
pub fn describe_plan(plan: &[PlannedMove]) -> String {
    let mut by: BTreeMap<(u64, u64), usize> = BTreeMap::new();
    for p in plan {
        *by.entry((p.from_group, p.to_group)).or_default() += p.slots.len();
    }
    by.iter()
        .map(|((f, t), n)| format!("{n} slots {f}→{t}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Counts of slots per group after `plan` is applied to `map`.
pub fn counts_after(map: &ShardMap, plan: &[PlannedMove]) -> BTreeMap<u64, usize> {
    let mut owner = map.slot_owner.clone();
    for p in plan {
        for s in &p.slots {
            owner[*s as usize] = p.to_group;
        }
    }
    let mut counts: BTreeMap<u64, usize> = map.groups.iter().map(|g| (g.id, 0)).collect();
    for g in owner {
        *counts.entry(g).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn map(slot_count: u32, groups: &[u64]) -> ShardMap {
        let gs = groups
            .iter()
            .map(|id| Group {
                id: *id,
                replicas: vec![],
            })
            .collect();
        map::initial_map(slot_count, gs, vec![]).unwrap()
    }

    #[test]
    fn rebalance_onto_a_new_group_spreads_evenly_with_one_donor_per_move() {
        let mut m = map(4096, &[1, 2, 3]);
        m = map::add_group(
            &m,
            Group {
                id: 4,
                replicas: vec![],
            },
        );
        let plan = plan_rebalance(&m, None, 256).unwrap();
        let counts = counts_after(&m, &plan);
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![1024; 4]);
        assert!(plan.iter().all(|p| p.to_group == 4 && p.slots.len() <= 256));
        let moved: BTreeSet<u32> = plan.iter().flat_map(|p| p.slots.clone()).collect();
        assert_eq!(moved.len(), 1024, "no slot moves twice");
        // Balanced already: nothing to do.
        assert!(plan_rebalance(&map(4096, &[1, 2]), None, 0)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn drain_moves_every_slot_off_the_group() {
        let m = map(100, &[1, 2, 3]);
        let plan = plan_rebalance(&m, Some(2), 0).unwrap();
        let counts = counts_after(&m, &plan);
        assert_eq!(counts[&2], 0);
        assert_eq!(counts[&1] + counts[&3], 100);
        assert!(counts[&1].abs_diff(counts[&3]) <= 1);
        assert!(plan_rebalance(&map(10, &[1]), Some(1), 0).is_err());
        assert!(plan_rebalance(&m, Some(9), 0).is_err());
    }

    #[test]
    fn moves_are_refused_when_they_overlap_or_make_no_sense() {
        let m = map(8, &[1, 2]);
        let mut list = MigrationList::default();
        let err = |r: Result<_, MapError>| r.unwrap_err().to_string();
        assert!(err(plan_move(&m, &list, &[0], 1)).contains("already owns"));
        assert!(err(plan_move(&m, &list, &[0], 7)).contains("not in the map"));
        assert!(err(plan_move(&m, &list, &[99], 2)).contains("out of range"));
        let plan = plan_move(&m, &list, &[0, 1, 5], 2).unwrap();
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].slots, vec![0, 1]);
        list.migrations.push(Migration {
            id: 3,
            slots: vec![1],
            from_group: 1,
            to_group: 2,
            state: MigrationState::Copying as i32,
            ..Default::default()
        });
        assert!(err(plan_move(&m, &list, &[1, 2], 2)).contains("already moving in migration 3"));
        assert!(plan_move(&m, &list, &[2], 2).is_ok());
        list.migrations[0].state = MigrationState::Done as i32;
        assert!(plan_move(&m, &list, &[1, 2], 2).is_ok());
    }
}
