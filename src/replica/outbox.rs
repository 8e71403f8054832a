//! `Outbox`: what the raft driver needs from whatever carries its messages to the other replicas.
//! The gRPC transport implements it for real nodes; the driver's unit tests implement it over an
//! in-memory network. The driver never sees a socket.

use std::collections::BTreeMap;
use std::path::PathBuf;

use raft::prelude::Message;

pub(crate) trait Outbox: Send {
    /// Queues a raft message for its peer (`m.to`). Never blocks: a full queue drops it, and
    /// raft retransmits.
    fn send(&self, m: Message);
    /// Streams the snapshot file at `path` with its `MsgSnapshot`, and reports the outcome to
    /// the driver as `Msg::SnapshotSent`.
    fn send_snapshot(&self, m: Message, path: PathBuf);
    /// Starts sending to replica `id` at `addr` (a membership change added it).
    fn add_peer(&mut self, id: u64, addr: &str);
    /// Stops sending to replica `id` (a membership change removed it).
    fn remove_peer(&mut self, id: u64);
    fn addr_of(&self, id: u64) -> Option<String>;
    /// Every replica's address, this one's included.
    fn addrs(&self) -> BTreeMap<u64, String>;
}
