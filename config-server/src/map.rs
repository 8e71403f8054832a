//! Shard-map transitions as pure functions: every change the config server makes is computed here
//! from the current map and a request, and checked before anything is written.

use std::collections::{BTreeMap, BTreeSet};

use ordo_proto::v1::{Group, GroupSpec, ShardMap};

/// Largest slot count a cluster may be created with.
pub const SLOT_COUNT_MAX: u32 = 65_536;
/// Most groups and replicas per group a map may hold.
pub const GROUPS_MAX: usize = 1024;
pub const REPLICAS_MAX: usize = 7;

#[derive(Debug, PartialEq)]
pub enum MapError {
    /// The request is malformed.
    Invalid(String),
    /// The request is well-formed but the map does not allow it.
    Refused(String),
}

impl std::fmt::Display for MapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MapError::Invalid(m) | MapError::Refused(m) => f.write_str(m),
        }
    }
}

/// Checks group specs on their own and against the groups already in `existing`.
pub fn check_specs(specs: &[GroupSpec], existing: &[Group]) -> Result<(), MapError> {
    if specs.is_empty() {
        return Err(MapError::Invalid(
            "no groups given: name at least one as --group <id>=<addr>,<addr>,...".into(),
        ));
    }
    if specs.len() + existing.len() > GROUPS_MAX {
        return Err(MapError::Invalid(format!(
            "a cluster holds at most {GROUPS_MAX} groups"
        )));
    }
    let mut ids: BTreeSet<u64> = existing.iter().map(|g| g.id).collect();
    let mut addrs: BTreeMap<String, u64> = existing
        .iter()
        .flat_map(|g| g.replicas.iter().map(move |r| (r.addr.clone(), g.id)))
        .collect();
    for s in specs {
        if s.id == 0 {
            return Err(MapError::Invalid(
                "group id 0 is reserved for the config group".into(),
            ));
        }
        if !ids.insert(s.id) {
            return Err(MapError::Refused(format!(
                "group id {} is used twice; pick an unused id",
                s.id
            )));
        }
        if s.addrs.is_empty() || s.addrs.len() > REPLICAS_MAX {
            return Err(MapError::Invalid(format!(
                "group {} lists {} replicas; give 1 to {REPLICAS_MAX}",
                s.id,
                s.addrs.len()
            )));
        }
        for a in &s.addrs {
            if a.trim().is_empty() {
                return Err(MapError::Invalid(format!(
                    "group {} has an empty address",
                    s.id
                )));
            }
            if let Some(other) = addrs.insert(a.clone(), s.id) {
                return Err(MapError::Refused(format!(
                    "address {a} is listed for group {} and group {other}; every replica has its own address",
                    s.id
                )));
            }
        }
    }
    Ok(())
}

/// Spreads `slot_count` slots over `groups` in contiguous, near-equal ranges (sizes differ by at
/// most one), in the order given.
pub fn assign_slots(slot_count: u32, groups: &[u64]) -> Vec<u64> {
    assert!(!groups.is_empty());
    let n = groups.len() as u64;
    (0..slot_count as u64)
        .map(|s| groups[(s * n / slot_count as u64) as usize])
        .collect()
}

/// The slots each group owns in `map`.
pub fn slots_by_group(map: &ShardMap) -> BTreeMap<u64, Vec<u32>> {
    let mut out: BTreeMap<u64, Vec<u32>> = map.groups.iter().map(|g| (g.id, vec![])).collect();
    for (slot, g) in map.slot_owner.iter().enumerate() {
        out.entry(*g).or_default().push(slot as u32);
    }
    out
}

/// The map a fresh cluster starts with (version 1).
pub fn initial_map(
    slot_count: u32,
    groups: Vec<Group>,
    config_addrs: Vec<String>,
) -> Result<ShardMap, MapError> {
    if slot_count == 0 || slot_count > SLOT_COUNT_MAX {
        return Err(MapError::Invalid(format!("slot count {slot_count} is out of range; use 1 to {SLOT_COUNT_MAX} (4096 is a good default)")));
    }
    if (slot_count as usize) < groups.len() {
        return Err(MapError::Invalid(format!(
            "{slot_count} slots cannot cover {} groups",
            groups.len()
        )));
    }
    let ids: Vec<u64> = groups.iter().map(|g| g.id).collect();
    Ok(ShardMap {
        version: 1,
        slot_count,
        slot_owner: assign_slots(slot_count, &ids),
        groups,
        config_addrs,
    })
}

/// The map after moving `slots` to `to`; also returns the donors and what each gives up.
pub fn move_slots(
    map: &ShardMap,
    slots: &[u32],
    to: u64,
) -> Result<(ShardMap, BTreeMap<u64, Vec<u32>>), MapError> {
    if !map.groups.iter().any(|g| g.id == to) {
        return Err(MapError::Refused(format!(
            "group {to} is not in the map; add it with `ordoctl group add` first"
        )));
    }
    if slots.is_empty() {
        return Err(MapError::Invalid("no slots given".into()));
    }
    let mut next = map.clone();
    let mut donors: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for &s in slots {
        let owner = *map.slot_owner.get(s as usize).ok_or_else(|| {
            MapError::Invalid(format!(
                "slot {s} is out of range; this cluster has slots 0 to {}",
                map.slot_count - 1
            ))
        })?;
        if owner != to {
            donors.entry(owner).or_default().push(s);
            next.slot_owner[s as usize] = to;
        }
    }
    if donors.is_empty() {
        return Err(MapError::Refused(format!(
            "group {to} already owns every slot given"
        )));
    }
    next.version += 1;
    Ok((next, donors))
}

pub fn add_group(map: &ShardMap, group: Group) -> ShardMap {
    let mut next = map.clone();
    next.groups.push(group);
    next.version += 1;
    next
}

pub fn remove_group(map: &ShardMap, id: u64) -> Result<ShardMap, MapError> {
    if !map.groups.iter().any(|g| g.id == id) {
        return Err(MapError::Refused(format!("group {id} is not in the map")));
    }
    let owned = map.slot_owner.iter().filter(|g| **g == id).count();
    if owned > 0 {
        return Err(MapError::Refused(format!("group {id} still owns {owned} slots; move them away first (ordoctl move-slots or group drain)")));
    }
    let mut next = map.clone();
    next.groups.retain(|g| g.id != id);
    next.version += 1;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(id: u64, addrs: &[&str]) -> GroupSpec {
        GroupSpec {
            id,
            addrs: addrs.iter().map(|a| a.to_string()).collect(),
        }
    }
    fn group(id: u64) -> Group {
        Group {
            id,
            replicas: vec![],
        }
    }

    proptest! {
        #[test]
        fn slots_are_spread_evenly_and_contiguously(slot_count in 1u32..5000, n in 1usize..16) {
            prop_assume!(slot_count as usize >= n);
            let ids: Vec<u64> = (1..=n as u64).collect();
            let owners = assign_slots(slot_count, &ids);
            let counts: Vec<usize> = ids.iter().map(|g| owners.iter().filter(|o| *o == g).count()).collect();
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            prop_assert!(max - min <= 1, "{counts:?}");
            prop_assert!(owners.windows(2).all(|w| w[0] <= w[1]), "ranges are contiguous");
        }
    }

    #[test]
    fn bad_specs_say_what_to_fix() {
        let cases = [
            (vec![], "no groups"),
            (vec![spec(1, &["a"]), spec(1, &["b"])], "used twice"),
            (vec![spec(1, &["a", "b"]), spec(2, &["b"])], "address b"),
            (vec![spec(0, &["a"])], "reserved"),
            (vec![spec(1, &[])], "0 replicas"),
        ];
        for (specs, needle) in cases {
            let e = check_specs(&specs, &[]).unwrap_err().to_string();
            assert!(e.contains(needle), "{specs:?}: {e}");
        }
        let existing = vec![Group {
            id: 1,
            replicas: vec![ordo_proto::v1::Replica {
                node_id: 1,
                addr: "a".into(),
            }],
        }];
        assert!(check_specs(&[spec(2, &["a"])], &existing)
            .unwrap_err()
            .to_string()
            .contains("address a"));
        assert!(check_specs(&[spec(1, &["z"])], &existing)
            .unwrap_err()
            .to_string()
            .contains("used twice"));
    }

    #[test]
    fn moves_bump_the_version_and_name_donors() {
        let map = initial_map(8, vec![group(1), group(2)], vec![]).unwrap();
        assert_eq!(map.slot_owner, vec![1, 1, 1, 1, 2, 2, 2, 2]);
        let (next, donors) = move_slots(&map, &[3, 4, 5], 2).unwrap();
        assert_eq!(next.version, 2);
        assert_eq!(donors, BTreeMap::from([(1, vec![3])]));
        assert_eq!(next.slot_owner, vec![1, 1, 1, 2, 2, 2, 2, 2]);
        assert!(move_slots(&map, &[9], 2).is_err());
        assert!(move_slots(&map, &[1], 3)
            .unwrap_err()
            .to_string()
            .contains("not in the map"));
        assert!(remove_group(&map, 1)
            .unwrap_err()
            .to_string()
            .contains("still owns 4 slots"));
        let map3 = add_group(&map, group(3));
        assert_eq!(remove_group(&map3, 3).unwrap().groups.len(), 2);
        assert!(initial_map(0, vec![group(1)], vec![]).is_err());
    }
}
