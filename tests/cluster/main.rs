//! Cluster tests: whole shard groups as real processes (kill -9, restart) and in-process nodes.
//! One test binary with modules, so the `ordo` binary is built once. The harnesses, the fault
//! net, the linearizability checker and the helpers are the test kit's (`tests/framework`).

mod admin_tasks;
mod bad_input;
mod bank;
mod bounds;
mod concurrency;
mod dedup;
mod faults;
mod feed;
mod feed_faults;
mod feed_moves;
mod feed_watch;
mod group;
mod group_2pc;
mod group_peer;
mod group_router;
mod groups;
mod groups_acks;
mod groups_exactly_once;
mod membership;
mod nemesis;
mod ordoctl_feed;
mod playground;
mod resharding;
mod sharded;
mod snapshots;
