//! Sample answers shared by the rendering tests.

use ordo::proto::v1::{ClusterStatus, Group, GroupStatus, Replica, ReplicaStatus, ShardMap};

pub(crate) fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

pub(crate) fn sample_map() -> ShardMap {
    let replica = |node_id, addr: &str| Replica {
        node_id,
        addr: addr.into(),
    };
    ShardMap {
        version: 3,
        slot_count: 8,
        groups: vec![
            Group {
                id: 1,
                replicas: vec![replica(11, "a1:7001"), replica(12, "a2:7001")],
            },
            Group {
                id: 2,
                replicas: vec![replica(21, "b1:7001")],
            },
            Group {
                id: 10,
                replicas: vec![replica(0, "c1:7001")],
            },
        ],
        slot_owner: vec![1, 1, 1, 2, 2, 1, 2, 2],
        config_addrs: strings(&["m1:7000", "m2:7000"]),
    }
}

pub(crate) fn sample_status() -> ClusterStatus {
    let up = |node_id, addr: &str, role: &str, term, applied_index, items| ReplicaStatus {
        node_id,
        addr: addr.into(),
        reachable: true,
        role: role.into(),
        term,
        applied_index,
        items,
        error: String::new(),
    };
    ClusterStatus {
        map: Some(sample_map()),
        groups: vec![
            GroupStatus {
                id: 1,
                leader_id: 11,
                slots: 4,
                replicas: vec![
                    up(11, "a1:7001", "leader", 5, 1200, 340),
                    ReplicaStatus {
                        node_id: 12,
                        addr: "a2:7001".into(),
                        error: "connection refused".into(),
                        ..ReplicaStatus::default()
                    },
                ],
            },
            GroupStatus {
                id: 2,
                leader_id: 0,
                slots: 4,
                replicas: vec![up(21, "b1:7001", "candidate", 12, 7, 0)],
            },
        ],
        meta: Some(GroupStatus {
            id: 0,
            leader_id: 1,
            slots: 0,
            replicas: vec![up(1, "m1:7000", "leader", 2, 30, 0)],
        }),
    }
}
