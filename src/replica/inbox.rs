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

use crate::error::Result;
use crate::limits::{RAFT_QUEUE_BYTES_MAX, RAFT_QUEUE_MAX};
use crate::state::{Command, Outcome};

pub enum Msg {
    Propose {
        cmd: Command,
        resp: oneshot::Sender<Result<Outcome>>,
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
