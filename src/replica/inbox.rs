//! What reaches a group's raft driver: the closed set of events it handles (`Msg`), from request
//! handlers, the transport's receiving half and its own senders; raft messages from peers on a
//! queue of their own (`RaftQueue`); and what it publishes back for handlers to read without
//! asking (`Shared`). Both the driver and the transport depend on this module; neither depends on
//! the other.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use ordo_proto::v1::{StatusResponse, TransferLeaderResponse};
use raft::prelude::{ConfChange, ConfState, Message};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::error::Error;
use crate::error::Result;
use crate::limits::{DRIVER_INBOX_BYTES_MAX, RAFT_QUEUE_BYTES_MAX, RAFT_QUEUE_MAX};
use crate::state::{Command, Outcome};

pub enum Msg {
    Propose {
        cmd: Command,
        resp: oneshot::Sender<Result<Outcome>>,
        /// The command's place in the inbox's byte bound, given back when the driver takes it.
        queued: Queued,
    },
    /// A linearizable read barrier: answered once the state machine has applied everything
    /// committed before the read arrived (ReadIndex).
    Read {
        resp: oneshot::Sender<Result<()>>,
    },
    /// A snapshot streamed from the leader, verified and stored at `path`; `msg` is its MsgSnapshot.
    SnapshotReceived {
        msg: Box<Message>,
        path: PathBuf,
    },
    SnapshotSent {
        to: u64,
        ok: bool,
    },
    Unreachable {
        to: u64,
    },
    Status {
        with_digest: bool,
        resp: oneshot::Sender<Result<StatusResponse>>,
    },
    /// Hand leadership to replica `to`; answered once it leads (or the transfer failed).
    TransferLeader {
        to: u64,
        resp: oneshot::Sender<Result<TransferLeaderResponse>>,
    },
    /// One raft membership change (leader only), checked against the quorum rules first;
    /// answered with the new configuration once the change is applied.
    ChangeConf {
        cc: ConfChange,
        resp: oneshot::Sender<Result<ConfState>>,
    },
    /// The group's configuration and, on the leader, each replica's replication progress.
    Members {
        resp: oneshot::Sender<Result<Members>>,
    },
}

/// A raft message from a peer, holding its bytes' place in the raft queue until the driver has
/// stepped it.
pub struct PeerMsg {
    pub msg: Box<Message>,
    _bytes: OwnedSemaphorePermit,
}

/// The sending side of a driver's raft queue. Raft messages from peers do not share the inbox
/// with proposals: the driver takes all of them before each inbox batch, so acks, votes and
/// heartbeats never wait behind thousands of proposals and their fsyncs (audit M10), and a peer's
/// stream never waits for room. The queue is bounded in messages and bytes; a message that does
/// not fit is dropped, as a lost packet would be (raft retransmits).
#[derive(Clone)]
pub struct RaftQueue {
    tx: mpsc::Sender<PeerMsg>,
    bytes: Arc<Semaphore>,
}

impl RaftQueue {
    pub fn new() -> (RaftQueue, mpsc::Receiver<PeerMsg>) {
        let (tx, rx) = mpsc::channel(RAFT_QUEUE_MAX);
        let bytes = Arc::new(Semaphore::new(RAFT_QUEUE_BYTES_MAX));
        (RaftQueue { tx, bytes }, rx)
    }

    /// Queues `msg` (`size` bytes as it arrived) for the driver without waiting; `false` if it
    /// was dropped because the queue is full or the driver has stopped.
    pub fn offer(&self, msg: Message, size: usize) -> bool {
        let Some(bytes) = u32::try_from(size)
            .ok()
            .and_then(|n| self.bytes.clone().try_acquire_many_owned(n).ok())
        else {
            return false;
        };
        self.tx
            .try_send(PeerMsg {
                msg: Box::new(msg),
                _bytes: bytes,
            })
            .is_ok()
    }
}

/// The bytes of the proposals waiting in a driver's inbox, bounded by `DRIVER_INBOX_BYTES_MAX`:
/// while a request waits for its answer its bytes are in the request-bytes budget too, but one
/// that gave up (after 10 s, a stalled driver) leaves its proposal queued, and this bound keeps
/// such leftovers from filling memory.
#[derive(Clone)]
pub struct InboxBytes(Arc<Semaphore>);

/// A proposal's bytes, held in its driver's [`InboxBytes`] until the driver takes it.
pub struct Queued {
    _bytes: OwnedSemaphorePermit,
}

impl InboxBytes {
    pub fn new() -> InboxBytes {
        InboxBytes(Arc::new(Semaphore::new(DRIVER_INBOX_BYTES_MAX)))
    }

    /// Room for `cmd` in the inbox, or `NotApplied` (the node is overloaded; nothing started).
    pub fn take(&self, cmd: &Command) -> Result<Queued> {
        let bytes = cmd.encoded_len();
        u32::try_from(bytes)
            .ok()
            .and_then(|n| self.0.clone().try_acquire_many_owned(n).ok())
            .map(|bytes| Queued { _bytes: bytes })
            .ok_or_else(|| {
                Error::NotApplied(format!(
                    "node overloaded: proposals waiting for the raft driver hold up to \
                     {DRIVER_INBOX_BYTES_MAX} bytes (DRIVER_INBOX_BYTES_MAX), no room for this \
                     {bytes}-byte write; it was not started, retry with backoff"
                ))
            })
    }
}

impl Default for InboxBytes {
    fn default() -> InboxBytes {
        InboxBytes::new()
    }
}

/// A group's configuration as one replica sees it.
#[derive(Debug, Clone)]
pub struct Members {
    pub leader_id: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub addrs: BTreeMap<u64, String>,
    pub commit_index: u64,
    /// Leader only: the highest log index known to be on each replica.
    pub matched: BTreeMap<u64, u64>,
}

/// What request handlers may read without asking the driver.
#[derive(Default)]
pub struct Shared {
    pub leader_id: AtomicU64,
    pub term: AtomicU64,
    /// 1 when this replica is the leader.
    pub is_leader: AtomicU64,
    /// Snapshot builds that failed (each is retried after a backoff; the replica keeps serving).
    pub snapshot_build_failures: AtomicU64,
    /// Set once, when the replica failed (its driver stopped without being asked to): why.
    /// Handlers then refuse every request with `UNAVAILABLE` naming it (fail-stop).
    stopped: std::sync::OnceLock<String>,
}

impl Shared {
    /// Records that the replica failed; the first reason wins.
    pub fn stop_with(&self, why: String) {
        let _ = self.stopped.set(why);
    }

    /// Why the replica failed, if it did.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.get().map(String::as_str)
    }

    /// `UNAVAILABLE` naming why if the replica failed: its state is frozen and must not be served.
    pub fn check_running(&self) -> crate::error::Result<()> {
        match self.stopped() {
            Some(why) => Err(crate::error::Error::Unavailable(format!(
                "this replica has stopped and serves nothing: {why}"
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::validate::put_as_txn;

    /// M1: the proposals waiting in an inbox are bounded in bytes, not only in count; past the
    /// bound a write is refused as not started, naming the bound, and room comes back as the
    /// driver takes proposals.
    #[test]
    fn m1_queued_proposals_are_bounded_in_bytes() {
        let cmd = Command::Txn(
            put_as_txn(ordo_proto::v1::PutRequest {
                shard_key: b"k".to_vec().into(),
                value: vec![0; crate::limits::VALUE_BYTES_MAX].into(),
                ..Default::default()
            })
            .unwrap(),
        );
        let inbox = InboxBytes::new();
        let fits = DRIVER_INBOX_BYTES_MAX / cmd.encoded_len();
        let mut queued: Vec<Queued> = (0..fits).map(|_| inbox.take(&cmd).unwrap()).collect();
        match inbox.take(&cmd) {
            Err(Error::NotApplied(msg)) => assert!(
                msg.contains(&format!(
                    "{DRIVER_INBOX_BYTES_MAX} bytes (DRIVER_INBOX_BYTES_MAX)"
                )),
                "{msg}"
            ),
            Err(other) => panic!("refused as {other:?}"),
            Ok(_) => panic!("{} proposals of {} bytes fit", fits + 1, cmd.encoded_len()),
        }
        queued.pop();
        assert!(
            inbox.take(&cmd).is_ok(),
            "room comes back once one is taken"
        );
    }
}
