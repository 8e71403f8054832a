//! `ReplicaHandle`: one replica as the gRPC services see it, a bounded mailbox to its driver and
//! read access to its state machine. The one place a request waits for the driver's answer.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ordo_proto::v1::{StatusResponse, TxnRequest, TxnResponse};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Result};
use crate::replica::inbox::{InboxBytes, Msg, RaftQueue, Shared};
use crate::state::{Command, Outcome, StateMachine};

/// How long a request waits for its write to commit or its read index before giving up.
const REQUEST_WAIT_MAX: Duration = Duration::from_secs(10);

/// One replica as the services see it: a mailbox to its driver and read access to its state.
pub struct ReplicaHandle {
    pub node_id: u64,
    pub group_id: u64,
    pub driver: mpsc::Sender<Msg>,
    /// The bytes of the proposals in `driver`'s queue.
    pub inbox_bytes: InboxBytes,
    /// Raft messages from peers, on their own queue (never behind proposals).
    pub raft: RaftQueue,
    pub sm: Arc<StateMachine>,
    pub shared: Arc<Shared>,
    pub peers: crate::replica::transport::PeerAddrs,
    pub snap_dir: PathBuf,
    pub receiving_snapshot: AtomicBool,
    /// Held while this leader runs a `ChangeReplicas` (one at a time).
    pub membership: tokio::sync::Mutex<()>,
    /// `Peer.ReadChanges` streams served now (at most `FEED_READERS_MAX`).
    pub feed_readers: std::sync::atomic::AtomicUsize,
    /// The consumer-group runner of this replica (`groups::runner`).
    pub groups: crate::groups::runner::Groups,
    pub stop: watch::Receiver<bool>,
}

impl ReplicaHandle {
    /// Refuses with `UNAVAILABLE` naming why once the replica failed: a STALE read must not be
    /// served from the frozen state of a replica whose driver stopped (audit H4).
    pub fn check_running(&self) -> Result<()> {
        self.shared.check_running()
    }

    pub fn addr_of(&self, id: u64) -> Option<String> {
        self.peers.read().unwrap().get(&id).cloned()
    }

    fn not_leader(&self) -> Error {
        self.not_leader_error("")
    }

    /// `NotLeader` with this replica's leader hint; `why` (if any) is logged, not sent.
    pub(crate) fn not_leader_error(&self, why: &str) -> Error {
        if !why.is_empty() {
            tracing::debug!(group = self.group_id, "not leader: {why}");
        }
        let leader_id = self.shared.leader_id.load(Ordering::Relaxed);
        Error::NotLeader {
            group: self.group_id,
            leader_id,
            leader_addr: self.addr_of(leader_id).unwrap_or_default(),
        }
    }

    pub(crate) async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T>>) -> Msg,
        what: &str,
    ) -> Result<T> {
        self.shared.check_running()?;
        let (tx, rx) = oneshot::channel();
        self.driver.try_send(make(tx)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                Error::NotApplied(format!("node overloaded: the raft inbox is full; {what} was not started, retry with backoff"))
            }
            mpsc::error::TrySendError::Closed(_) => Error::NotApplied(format!(
                "node is shutting down; {what} was not started"
            )),
        })?;
        match tokio::time::timeout(REQUEST_WAIT_MAX, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Unavailable(format!(
                "the replica stopped during the {what}; its outcome is unknown"
            ))),
            Err(_) => Err(Error::Unavailable(format!(
                "{what} did not complete within {}s (no quorum?); its outcome is unknown",
                REQUEST_WAIT_MAX.as_secs()
            ))),
        }
    }

    pub async fn propose(&self, cmd: Command) -> Result<Outcome> {
        self.shared.check_running()?;
        if self.shared.is_leader.load(Ordering::Relaxed) == 0 {
            return Err(self.not_leader());
        }
        let queued = self.inbox_bytes.take(&cmd)?;
        self.ask(|resp| Msg::Propose { cmd, resp, queued }, "write")
            .await
    }

    /// Proposes a checked transaction. Slots this group does not own are refused here already
    /// (cheap), and again when the entry is applied (authoritative: ownership may change between).
    pub async fn propose_txn(&self, txn: TxnRequest) -> Result<TxnResponse> {
        self.shared.check_running()?;
        for sk in crate::state::shard_keys(&txn) {
            self.sm.check_owned(sk)?;
        }
        self.sm.check_unlocked(&txn, None)?;
        match self.propose(Command::Txn(txn)).await? {
            Outcome::Txn(r) => Ok(r),
            other => unreachable!("a txn produced {other:?}"),
        }
    }

    /// A read-only transaction, after a read barrier: no raft entry, the same result bound as at
    /// apply. Ownership is checked after the barrier, as for a `Get`.
    pub async fn read_txn(&self, txn: &TxnRequest) -> Result<TxnResponse> {
        self.read_barrier().await?;
        for sk in crate::state::shard_keys(txn) {
            self.sm.check_owned(sk)?;
        }
        self.sm.read_txn(txn)
    }

    /// Waits until a read started now would see every write acknowledged before it.
    pub async fn read_barrier(&self) -> Result<()> {
        self.shared.check_running()?;
        if self.shared.is_leader.load(Ordering::Relaxed) == 0 {
            return Err(self.not_leader());
        }
        self.ask(|resp| Msg::Read { resp }, "linearizable read")
            .await
    }

    pub async fn status(&self, with_digest: bool) -> Result<StatusResponse> {
        self.ask(|resp| Msg::Status { with_digest, resp }, "status")
            .await
    }
}
