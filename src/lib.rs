//! Ordo: one replica of one shard group (storage, raft driver, KV state machine, gRPC), and the
//! client the CLI uses. See ARCHITECTURE.md for the map.

pub use ordo_proto as proto;

pub mod client;
pub mod driver;
pub mod durable;
pub mod error;
pub mod fault;
pub mod keys;
pub mod limits;
pub mod logging;
pub mod membership;
pub mod meta;
pub mod node;
pub mod playground;
pub mod service;
pub mod sm;
pub mod snapshot;
pub mod storage;
pub mod transport;
pub mod twopc;
pub mod txn;
pub mod validate;
