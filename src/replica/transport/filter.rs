//! The seam a test plugs fault injection into (as TiKV's `transport_simulate` filters its
//! transport): for every raft message a replica sends, and every snapshot transfer it starts,
//! the transport asks its [`LinkFilter`] what happens to it. Production nodes have none, and the
//! send path then pays one `Option` check per message. The filters themselves (partitions,
//! lossy links) live in the test kit, not here.

use std::fmt;
use std::time::Duration;

/// What happens to one raft message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Deliver,
    Drop,
    /// Delivered after this long (if the link is still up then).
    Delay(Duration),
    /// Delivered now, and a second copy after this long.
    Duplicate(Duration),
}

/// Decides the fate of a replica's outgoing raft traffic, link by link (`from → to` are raft
/// ids). Shared by the replicas of a group and called from their transports' tasks; `Debug` so
/// that a node's configuration prints.
pub trait LinkFilter: Send + Sync + fmt::Debug {
    /// The fate of one message `from → to`. A `Delay` or `Duplicate` verdict has reserved a
    /// delayed copy: the transport calls [`LinkFilter::delayed_done`] once for it.
    fn fate(&self, from: u64, to: u64) -> Fate;

    /// Whether `from → to` is cut now. A delayed copy is checked again when its timer fires (a
    /// link cut meanwhile loses it).
    fn is_blocked(&self, from: u64, to: u64) -> bool;

    /// A delayed copy was delivered (`true`) or lost (`false`: its link was cut or its sender
    /// stopped).
    fn delayed_done(&self, delivered: bool);

    /// Whether a snapshot transfer `from → to` may start, and after how long; `None` refuses it
    /// (reported to raft as failed, so it retries later).
    fn snapshot_fate(&self, from: u64, to: u64) -> Option<Duration>;
}
