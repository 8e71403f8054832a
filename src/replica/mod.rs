//! The consensus engine of one group: the raft driver loop and everything it does IO with
//! (raft log storage, durability, snapshot files, the transport to the other replicas), and the
//! handle the gRPC edge (`server/`) uses to reach it. No gRPC service lives here.

pub(crate) mod driver;
pub(crate) mod durable;
mod handle;
pub(crate) mod inbox;
pub(crate) mod outbox;
pub(crate) mod snapshot;
pub(crate) mod storage;
pub(crate) mod transport;
pub(crate) mod wal;
pub(crate) mod watermark;

pub use handle::ReplicaHandle;
