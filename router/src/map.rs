//! The cached shard map, the routing rule over it, and the per-group leader cache.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use ordo_proto::slot_of;
use ordo_proto::v1::ShardMap;
use tokio::sync::watch;

use crate::pool::canonical_addr;

/// The router's current shard map.
///
/// A `watch` channel is the cell: readers `borrow()` (a read lock) and clone the `Arc`, the
/// watcher and refreshes install newer versions with `send_if_modified` (a write lock, so "only
/// if higher" is atomic), and the router's own `WatchShardMap` streams subscribe to it.
pub(crate) struct MapCell {
    tx: watch::Sender<Arc<ShardMap>>,
}

impl MapCell {
    /// A cell holding the empty map (version 0: cluster not initialized).
    pub(crate) fn new() -> MapCell {
        let (tx, _) = watch::channel(Arc::new(ShardMap::default()));
        MapCell { tx }
    }

    pub(crate) fn current(&self) -> Arc<ShardMap> {
        self.tx.borrow().clone()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<ShardMap>> {
        self.tx.subscribe()
    }

    /// Replaces the map with `map` if its version is higher. Returns the replaced version when it
    /// did. A malformed map is refused (and logged): routing by it would send requests nowhere.
    pub(crate) fn install(&self, map: ShardMap, source: &str) -> Option<u64> {
        if let Err(why) = check_map(&map) {
            tracing::warn!(version = map.version, %source, "ignoring malformed shard map: {why}");
            return None;
        }
        let version = map.version;
        let mut map = Some(Arc::new(map));
        let mut old = 0;
        let replaced = self.tx.send_if_modified(|cur| {
            if version > cur.version {
                old = cur.version;
                *cur = map.take().expect("taken once");
                true
            } else {
                false
            }
        });
        if replaced {
            let new = self.current();
            tracing::info!(
                from = old,
                to = version,
                groups = new.groups.len(),
                slots = new.slot_count,
                %source,
                "shard map v{old} -> v{version}"
            );
            Some(old)
        } else {
            None
        }
    }
}

/// Checks what routing relies on: a slot count with one owner entry per slot.
pub(crate) fn check_map(map: &ShardMap) -> Result<(), String> {
    if map.version == 0 {
        return Ok(());
    }
    if map.slot_count == 0 {
        return Err("slot_count is 0".into());
    }
    if map.slot_owner.len() != map.slot_count as usize {
        return Err(format!(
            "{} slot owners for {} slots",
            map.slot_owner.len(),
            map.slot_count
        ));
    }
    Ok(())
}

/// The group that owns `shard_key`'s slot in `map` (version > 0, checked by `check_map`).
pub(crate) fn group_of(map: &ShardMap, shard_key: &[u8]) -> u64 {
    let slot = slot_of(shard_key, map.slot_count);
    map.slot_owner[slot as usize]
}

/// The groups owning any of `shard_keys`, in id order.
pub(crate) fn groups_of<'a>(
    map: &ShardMap,
    shard_keys: impl IntoIterator<Item = &'a [u8]>,
) -> BTreeSet<u64> {
    shard_keys.into_iter().map(|k| group_of(map, k)).collect()
}

/// The canonical addresses of `group`'s replicas in `map`, in map order.
pub(crate) fn replicas(map: &ShardMap, group: u64) -> Result<Vec<String>, String> {
    let g = map
        .groups
        .iter()
        .find(|g| g.id == group)
        .ok_or_else(|| format!("shard map v{} has no group {group}", map.version))?;
    let mut addrs = Vec::with_capacity(g.replicas.len());
    for r in &g.replicas {
        match canonical_addr(&r.addr) {
            Ok(a) if !addrs.contains(&a) => addrs.push(a),
            Ok(_) => {}
            Err(e) => tracing::warn!(group, "shard map v{}: replica address {e}", map.version),
        }
    }
    if addrs.is_empty() {
        return Err(format!(
            "shard map v{} lists no usable replica for group {group}",
            map.version
        ));
    }
    Ok(addrs)
}

/// "1", "1 and 3", "1, 2 and 3".
pub(crate) fn list_groups(groups: &BTreeSet<u64>) -> String {
    let ids: Vec<String> = groups.iter().map(u64::to_string).collect();
    match ids.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Group id → the replica address believed to lead it.
#[derive(Default)]
pub(crate) struct Leaders {
    by_group: Mutex<HashMap<u64, String>>,
}

impl Leaders {
    /// Where a request for `group` goes first: the cached leader if it is still one of the
    /// group's replicas, else the first replica.
    pub(crate) fn pick(&self, group: u64, replicas: &[String]) -> String {
        let by_group = self.by_group.lock().unwrap();
        match by_group.get(&group) {
            Some(addr) if replicas.contains(addr) => addr.clone(),
            _ => replicas[0].clone(),
        }
    }

    pub(crate) fn set(&self, group: u64, addr: &str) {
        let mut by_group = self.by_group.lock().unwrap();
        if by_group.get(&group).map(String::as_str) != Some(addr) {
            by_group.insert(group, addr.to_string());
        }
    }

    /// `failed` could not serve `group`: move the cache to the replica after it. Another request
    /// may already have found the leader meanwhile; then the cache is left alone.
    pub(crate) fn rotate(&self, group: u64, failed: &str, replicas: &[String]) {
        let mut by_group = self.by_group.lock().unwrap();
        let current = by_group.get(&group);
        let stale = match current {
            None => true,
            Some(addr) => addr == failed || !replicas.contains(addr),
        };
        if stale {
            let next = match replicas.iter().position(|a| a == failed) {
                Some(i) => replicas[(i + 1) % replicas.len()].clone(),
                None => replicas[0].clone(),
            };
            by_group.insert(group, next);
        }
    }

    /// Forgets groups that are no longer in the map (keeps the cache bounded by the map).
    pub(crate) fn retain_groups(&self, map: &ShardMap) {
        let ids: BTreeSet<u64> = map.groups.iter().map(|g| g.id).collect();
        self.by_group
            .lock()
            .unwrap()
            .retain(|id, _| ids.contains(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ordo_proto::v1::{Group, Replica};

    fn map(version: u64) -> ShardMap {
        ShardMap {
            version,
            slot_count: 4,
            groups: vec![
                Group {
                    id: 1,
                    replicas: vec![
                        Replica {
                            node_id: 1,
                            addr: "a:1".into(),
                        },
                        Replica {
                            node_id: 2,
                            addr: "http://b:1".into(),
                        },
                    ],
                },
                Group {
                    id: 2,
                    replicas: vec![],
                },
            ],
            slot_owner: vec![1, 1, 2, 2],
            config_addrs: vec![],
        }
    }

    #[test]
    fn install_only_moves_forward_and_refuses_malformed_maps() {
        let cell = MapCell::new();
        assert_eq!(cell.current().version, 0);
        assert_eq!(cell.install(map(2), "test"), Some(0));
        assert_eq!(cell.install(map(1), "test"), None);
        assert_eq!(cell.install(map(2), "test"), None);
        let mut bad = map(5);
        bad.slot_owner.pop();
        assert_eq!(cell.install(bad, "test"), None);
        assert_eq!(cell.current().version, 2);
        assert_eq!(cell.install(map(3), "test"), Some(2));
    }

    #[test]
    fn routing_follows_slot_of() {
        let m = map(1);
        for i in 0..100 {
            let key = format!("order-{i}");
            let slot = slot_of(key.as_bytes(), 4);
            let want = if slot < 2 { 1 } else { 2 };
            assert_eq!(group_of(&m, key.as_bytes()), want);
        }
        assert_eq!(replicas(&m, 1).unwrap(), ["a:1", "b:1"]);
        assert!(replicas(&m, 2).unwrap_err().contains("no usable replica"));
        assert!(replicas(&m, 9).unwrap_err().contains("no group 9"));
    }

    #[test]
    fn groups_are_listed_in_prose() {
        let set = |v: &[u64]| v.iter().copied().collect::<BTreeSet<u64>>();
        assert_eq!(list_groups(&set(&[3])), "3");
        assert_eq!(list_groups(&set(&[3, 1])), "1 and 3");
        assert_eq!(list_groups(&set(&[2, 1, 3])), "1, 2 and 3");
    }

    #[test]
    fn leader_cache_rotates_only_from_the_failed_replica() {
        let l = Leaders::default();
        let r = vec!["a:1".to_string(), "b:1".to_string(), "c:1".to_string()];
        assert_eq!(l.pick(1, &r), "a:1");
        l.rotate(1, "a:1", &r);
        assert_eq!(l.pick(1, &r), "b:1");
        // A late failure report from a:1 does not move the cache away from b:1.
        l.rotate(1, "a:1", &r);
        assert_eq!(l.pick(1, &r), "b:1");
        l.rotate(1, "c:1", &r);
        assert_eq!(l.pick(1, &r), "b:1");
        l.rotate(1, "b:1", &r);
        l.rotate(1, "c:1", &r);
        assert_eq!(l.pick(1, &r), "a:1");
        // A leader outside the replica list is not used for new requests.
        l.set(1, "z:9");
        assert_eq!(l.pick(1, &r), "a:1");
    }
}
