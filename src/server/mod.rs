//! The gRPC edge of a node: the `Kv`, `Peer` and `Participant` services, request validation,
//! the change feed's reads and retention planner,
//! membership changes driven from the leader, and the config server's map store.

pub(crate) mod config_store;
pub(crate) mod feed;
pub(crate) mod groups;
pub(crate) mod kv;
pub(crate) mod membership;
pub(crate) mod orphans;
pub(crate) mod participant;
pub(crate) mod peer;
pub(crate) mod validate;
