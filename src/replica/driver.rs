//! The raft driver of one replica: the only owner of its `RawNode`.
//!
//! One loop on a dedicated thread ticks, takes messages from a bounded inbox (up to
//! `DRIVER_BATCH_MAX` at a time, so proposals that arrive together share one fsync) and handles
//! each `Ready` in raft-rs's order:
//! 1. send the leader's messages (they need not wait for its own disk),
//! 2. install a snapshot if raft accepted one,
//! 3. append entries and the hard state, then **one** sync (sled flush + fdatasync, see
//!    `durable.rs`) for the whole Ready,
//! 4. send the messages that had to wait for that flush (votes, append responses),
//! 5. apply committed entries (effects + applied index in one sled transaction) and answer the
//!    proposals and reads waiting for them,
//! 6. advance, and do the same for the light ready.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ordo_proto::v1::{StatusResponse, TransferLeaderResponse, TxnRequest};
use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::*;
use raft::{RawNode, StateRole};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::limits::*;
use crate::replica::durable::Durable;
use crate::replica::storage::{RaftStore, SnapshotFile};
use crate::replica::transport::Transport;
use crate::state::{Apply, Command, Outcome, StateMachine};

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
    Raft(Box<Message>),
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

/// The membership change this leader proposed and has not seen applied.
struct ConfWaiter {
    index: u64,
    term: u64,
    resp: oneshot::Sender<Result<ConfState>>,
}

/// A leader transfer this replica started and has not seen finish.
struct Transfer {
    to: u64,
    since: Instant,
    resp: oneshot::Sender<Result<TransferLeaderResponse>>,
}

/// What request handlers may read without asking the driver.
#[derive(Default)]
pub struct Shared {
    pub leader_id: AtomicU64,
    pub term: AtomicU64,
    /// 1 when this replica is the leader.
    pub is_leader: AtomicU64,
}

pub struct DriverConfig {
    pub node_id: u64,
    pub group_id: u64,
    pub applied: u64,
    pub snap_dir: PathBuf,
    pub compact_log_entries: u64,
}

type Reply = oneshot::Sender<Result<Outcome>>;

/// Who waits for a proposed entry: one request, or the transactions of a `TxnBatch` in order.
enum Waiting {
    One(Reply),
    Batch(Vec<Reply>),
}

impl Waiting {
    /// How many requests wait.
    fn len(&self) -> usize {
        match self {
            Waiting::One(_) => 1,
            Waiting::Batch(txs) => txs.len(),
        }
    }

    /// Whether every waiting client has gone away.
    fn is_closed(&self) -> bool {
        match self {
            Waiting::One(tx) => tx.is_closed(),
            Waiting::Batch(txs) => txs.iter().all(|tx| tx.is_closed()),
        }
    }

    fn fail(self, err: impl Fn() -> Error) {
        match self {
            Waiting::One(tx) => {
                let _ = tx.send(Err(err()));
            }
            Waiting::Batch(txs) => {
                for tx in txs {
                    let _ = tx.send(Err(err()));
                }
            }
        }
    }

    /// Hands each waiting request its result: a batch's outcome is split per transaction.
    fn answer(self, result: Result<Outcome>) {
        match (self, result) {
            (Waiting::One(tx), r) => {
                let _ = tx.send(r);
            }
            (Waiting::Batch(txs), Ok(Outcome::TxnBatch(results))) if results.len() == txs.len() => {
                for (tx, r) in txs.into_iter().zip(results) {
                    let _ = tx.send(r.map(Outcome::Txn));
                }
            }
            (waiting, other) => {
                let why = format!("a batch of transactions was applied with the result {other:?}");
                tracing::error!("{why}");
                waiting.fail(|| Error::Storage(why.clone()));
            }
        }
    }
}

struct PendingRead {
    ctx: u64,
    waiters: Vec<oneshot::Sender<Result<()>>>,
    since: Instant,
}

pub struct Driver {
    cfg: DriverConfig,
    raw: RawNode<RaftStore>,
    durable: Durable,
    sm: Arc<StateMachine>,
    inbox: mpsc::Receiver<Msg>,
    transport: Transport,
    shared: Arc<Shared>,
    /// Proposals in flight by log index, with the term they were proposed in.
    proposals: BTreeMap<u64, (u64, Waiting)>,
    /// Transactions taken from the inbox and not proposed yet: `propose_pending` proposes them as
    /// one entry after each inbox batch (or sooner when they reach the batch bounds).
    pending: Vec<(TxnRequest, Reply)>,
    pending_bytes: usize,
    /// Requests waiting in `proposals` and `pending` together (a batch counts each).
    waiting_txns: usize,
    /// Reads that arrived since the last ReadIndex was issued.
    reads_new: Vec<oneshot::Sender<Result<()>>>,
    /// Reads whose ReadIndex is in flight.
    reads_in_flight: Vec<PendingRead>,
    /// Reads whose index is known, waiting for the state machine to reach it.
    reads_ready: Vec<(u64, Vec<oneshot::Sender<Result<()>>>)>,
    next_read_ctx: u64,
    /// Snapshots received and waiting for raft to accept them, by (index, term).
    staged: HashMap<(u64, u64), PathBuf>,
    snapshots_installed: u64,
    snapshots_sent: u64,
    transfer: Option<Transfer>,
    conf_waiter: Option<ConfWaiter>,
    /// When each peer was last heard from (for the live-quorum check of membership changes).
    last_heard: HashMap<u64, Instant>,
    stop: tokio::sync::watch::Receiver<bool>,
}

pub fn raft_config(id: u64, applied: u64) -> raft::Config {
    raft::Config {
        id,
        election_tick: ELECTION_TICKS,
        heartbeat_tick: HEARTBEAT_TICKS,
        applied,
        max_size_per_msg: RAFT_MSG_BYTES_MAX,
        max_inflight_msgs: RAFT_INFLIGHT_MSGS_MAX,
        pre_vote: true,
        check_quorum: true,
        read_only_option: raft::ReadOnlyOption::Safe,
        max_committed_size_per_ready: 16 * RAFT_MSG_BYTES_MAX,
        ..Default::default()
    }
}

impl Driver {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: DriverConfig,
        store: RaftStore,
        durable: Durable,
        sm: Arc<StateMachine>,
        inbox: mpsc::Receiver<Msg>,
        transport: Transport,
        shared: Arc<Shared>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Driver> {
        let logger = crate::logging::raft_logger(cfg.group_id, cfg.node_id);
        let config = raft_config(cfg.node_id, cfg.applied);
        config
            .validate()
            .map_err(|e| Error::InvalidArgument(format!("raft config: {e}")))?;
        let raw = RawNode::new(&config, store, &logger)
            .map_err(|e| Error::Storage(format!("raft could not start: {e}")))?;
        Ok(Driver {
            cfg,
            raw,
            durable,
            sm,
            inbox,
            transport,
            shared,
            proposals: BTreeMap::new(),
            pending: Vec::new(),
            pending_bytes: 0,
            waiting_txns: 0,
            reads_new: Vec::new(),
            reads_in_flight: Vec::new(),
            reads_ready: Vec::new(),
            next_read_ctx: 1,
            staged: HashMap::new(),
            snapshots_installed: 0,
            snapshots_sent: 0,
            transfer: None,
            conf_waiter: None,
            last_heard: HashMap::new(),
            stop,
        })
    }

    /// Runs until every inbox sender is gone (the node is shutting down) or the replica finds
    /// corruption. Pending requests are then failed, never left hanging.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.changed() => break,
                _ = tick.tick() => {
                    self.raw.tick();
                    self.expire();
                }
                msg = self.inbox.recv() => {
                    let Some(msg) = msg else { break };
                    self.handle(msg);
                    for _ in 1..DRIVER_BATCH_MAX {
                        match self.inbox.try_recv() {
                            Ok(msg) => self.handle(msg),
                            Err(_) => break,
                        }
                    }
                }
            }
            if let Err(e) = self.after_batch() {
                tracing::error!(node = self.cfg.node_id, group = self.cfg.group_id, error = %e, "replica stops");
                break;
            }
            if let Some(c) = self.raw.store().corruption() {
                tracing::error!(node = self.cfg.node_id, group = self.cfg.group_id, corruption = %c,
                    "replica stops: it will not campaign or serve from a log it cannot read");
                break;
            }
        }
        self.fail_all(|| {
            Error::Unavailable(
                "the replica stopped before this request completed; its outcome is unknown".into(),
            )
        });
        if let Err(e) = self.durable.sync() {
            tracing::error!(error = %e, "final flush failed");
        }
        tracing::info!(
            node = self.cfg.node_id,
            group = self.cfg.group_id,
            "raft driver stopped"
        );
    }

    fn not_leader(&self) -> Error {
        let leader_id = self.raw.raft.leader_id;
        Error::NotLeader {
            group: self.cfg.group_id,
            leader_id,
            leader_addr: self.transport.addr_of(leader_id).unwrap_or_default(),
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Propose { cmd, resp } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = resp.send(Err(self.not_leader()));
                } else if self.waiting_txns >= PENDING_PROPOSALS_MAX {
                    let _ = resp.send(Err(Error::NotApplied(format!(
                        "leader overloaded: {PENDING_PROPOSALS_MAX} proposals in flight; retry with backoff"
                    ))));
                } else {
                    self.waiting_txns += 1;
                    match cmd {
                        Command::Txn(t) => {
                            let len = t.encoded_len();
                            if self.pending_bytes + len > PROPOSAL_BATCH_BYTES_MAX {
                                self.propose_pending();
                            }
                            self.pending_bytes += len;
                            self.pending.push((t, resp));
                            if self.pending.len() >= PROPOSAL_BATCH_TXNS_MAX {
                                self.propose_pending();
                            }
                        }
                        // Anything else goes alone, after what arrived before it.
                        other => {
                            self.propose_pending();
                            self.propose(other, Waiting::One(resp));
                        }
                    }
                }
            }
            Msg::Read { resp } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = resp.send(Err(self.not_leader()));
                } else if self.pending_reads() >= PENDING_READS_MAX {
                    let _ = resp.send(Err(Error::NotApplied(
                        "too many reads waiting; retry with backoff".into(),
                    )));
                } else {
                    self.reads_new.push(resp);
                }
            }
            Msg::Raft(m) => {
                self.last_heard.insert(m.from, Instant::now());
                if let Err(e) = self.raw.step(*m) {
                    tracing::debug!(error = %e, "raft message ignored");
                }
            }
            Msg::SnapshotReceived { msg, path } => {
                let meta = msg.get_snapshot().get_metadata();
                self.staged.insert((meta.index, meta.term), path);
                if let Err(e) = self.raw.step(*msg) {
                    tracing::warn!(error = %e, "snapshot message refused by raft");
                }
            }
            Msg::SnapshotSent { to, ok } => {
                let status = if ok {
                    raft::SnapshotStatus::Finish
                } else {
                    raft::SnapshotStatus::Failure
                };
                if ok {
                    self.snapshots_sent += 1;
                }
                self.raw.report_snapshot(to, status);
            }
            Msg::Unreachable { to } => self.raw.report_unreachable(to),
            Msg::TransferLeader { to, resp } => self.start_transfer(to, resp),
            Msg::ChangeConf { cc, resp } => self.start_conf_change(cc, resp),
            Msg::Members { resp } => {
                let _ = resp.send(Ok(self.members()));
            }
            Msg::Status { with_digest, resp } => {
                let _ = resp.send(self.status(with_digest));
            }
        }
    }

    fn start_transfer(&mut self, to: u64, resp: oneshot::Sender<Result<TransferLeaderResponse>>) {
        let voters = self.raw.store().conf_state().voters.clone();
        let err = if self.raw.raft.state != StateRole::Leader {
            Some(self.not_leader())
        } else if !voters.contains(&to) {
            Some(Error::FailedPrecondition(format!(
                "node {to} is not a voter of group {} (voters: {voters:?})",
                self.cfg.group_id
            )))
        } else if let Some(t) = &self.transfer {
            Some(Error::FailedPrecondition(format!(
                "a leader transfer to node {} is already in progress; wait for it",
                t.to
            )))
        } else {
            None
        };
        if let Some(e) = err {
            let _ = resp.send(Err(e));
            return;
        }
        tracing::info!(
            node = self.cfg.node_id,
            group = self.cfg.group_id,
            to,
            "transferring leadership"
        );
        if to != self.cfg.node_id {
            self.raw.transfer_leader(to);
        }
        self.transfer = Some(Transfer {
            to,
            since: Instant::now(),
            resp,
        });
    }

    fn members(&self) -> Members {
        let r = &self.raw.raft;
        let cs = self.raw.store().conf_state();
        let matched = if r.state == StateRole::Leader {
            r.prs().iter().map(|(id, p)| (*id, p.matched)).collect()
        } else {
            BTreeMap::new()
        };
        Members {
            leader_id: r.leader_id,
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
            addrs: self.transport.addrs(),
            commit_index: r.raft_log.committed,
            matched,
        }
    }

    /// Whether the leader heard from `id` recently (itself always).
    fn is_live(&self, id: u64) -> bool {
        id == self.cfg.node_id
            || self
                .last_heard
                .get(&id)
                .is_some_and(|t| t.elapsed() < Duration::from_millis(REPLICA_LIVE_MS))
    }

    /// Why `cc` must not be proposed now, if it must not; `Ok(Some(cs))` when it is already in
    /// effect (asking again is harmless).
    fn check_conf_change(&self, cc: &ConfChange) -> Result<Option<ConfState>> {
        let g = self.cfg.group_id;
        let cs = self.raw.store().conf_state();
        let refuse = |why: String| Err(Error::FailedPrecondition(why));
        if self.raw.raft.state != StateRole::Leader {
            return Err(self.not_leader());
        }
        if let Some(w) = &self.conf_waiter {
            return refuse(format!(
                "another membership change of group {g} is in progress (raft index {}); wait for it",
                w.index
            ));
        }
        if self.raw.raft.has_pending_conf() || !cs.voters_outgoing.is_empty() {
            return refuse(format!(
                "a membership change of group {g} is still being applied; retry in a moment"
            ));
        }
        let id = cc.node_id;
        let (voter, learner) = (cs.voters.contains(&id), cs.learners.contains(&id));
        let quorum_after = |voters: Vec<u64>, action: &str| -> Result<Option<ConfState>> {
            let need = voters.len() / 2 + 1;
            let live: Vec<u64> = voters
                .iter()
                .copied()
                .filter(|v| self.is_live(*v))
                .collect();
            if voters.is_empty() || live.len() < need {
                return refuse(format!(
                    "{action} would lose quorum: group {g} would have voters {voters:?}, of which                      only {live:?} are live, and needs {need}; bring replicas back first"
                ));
            }
            Ok(None)
        };
        match cc.get_change_type() {
            ConfChangeType::AddLearnerNode => {
                if voter {
                    return refuse(format!("node {id} is already a voter of group {g}"));
                }
                if cc.context.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "no address given for node {id}"
                    )));
                }
                if learner {
                    return Ok(Some(cs.clone()));
                }
                Ok(None)
            }
            ConfChangeType::AddNode => {
                if voter {
                    return Ok(Some(cs.clone()));
                }
                if !learner {
                    return refuse(format!(
                        "node {id} is not a learner of group {g}: add it as a learner first"
                    ));
                }
                let mut after = cs.voters.clone();
                after.push(id);
                quorum_after(after, &format!("making node {id} a voter"))
            }
            ConfChangeType::RemoveNode => {
                if !voter && !learner {
                    return refuse(format!(
                        "node {id} is not a replica of group {g} (voters {:?}, learners {:?})",
                        cs.voters, cs.learners
                    ));
                }
                if id == self.cfg.node_id {
                    return refuse(format!(
                        "node {id} leads group {g}: move leadership first \
                         (`ordoctl leader transfer --group {g} --to <another voter>`)"
                    ));
                }
                if learner {
                    return Ok(None);
                }
                let after = cs.voters.iter().copied().filter(|v| *v != id).collect();
                quorum_after(after, &format!("removing node {id}"))
            }
        }
    }

    fn start_conf_change(&mut self, cc: ConfChange, resp: oneshot::Sender<Result<ConfState>>) {
        match self.check_conf_change(&cc) {
            Err(e) => {
                let _ = resp.send(Err(e));
                return;
            }
            Ok(Some(cs)) => {
                let _ = resp.send(Ok(cs));
                return;
            }
            Ok(None) => {}
        }
        self.propose_pending();
        tracing::info!(node = self.cfg.node_id, group = self.cfg.group_id, change = ?cc.get_change_type(),
            target = cc.node_id, "proposing a membership change");
        match self.raw.propose_conf_change(vec![], cc) {
            Ok(()) => {
                self.conf_waiter = Some(ConfWaiter {
                    index: self.raw.raft.raft_log.last_index(),
                    term: self.raw.raft.term,
                    resp,
                });
            }
            Err(e) => {
                let _ = resp.send(Err(Error::NotApplied(format!(
                    "membership change refused by raft ({e}); nothing changed"
                ))));
            }
        }
    }

    /// Answers a leader transfer once its outcome is known: the target leads, someone else
    /// does, or it took too long.
    fn check_transfer(&mut self) {
        let Some(t) = &self.transfer else { return };
        let r = &self.raw.raft;
        let outcome = if r.leader_id == t.to {
            Some(Ok(TransferLeaderResponse {
                leader_id: r.leader_id,
                term: r.term,
            }))
        } else if r.state != StateRole::Leader && r.leader_id != 0 {
            Some(Err(Error::Unavailable(format!(
                "leadership went to node {} instead of node {}; retry the transfer",
                r.leader_id, t.to
            ))))
        } else if t.since.elapsed() > Duration::from_millis(LEADER_TRANSFER_TIMEOUT_MS) {
            Some(Err(Error::Unavailable(format!(
                "node {} did not take over within {LEADER_TRANSFER_TIMEOUT_MS} ms (is it down \
                 or far behind?); node {} still leads",
                t.to, self.cfg.node_id
            ))))
        } else {
            None
        };
        if let Some(outcome) = outcome {
            let t = self.transfer.take().expect("checked above");
            let _ = t.resp.send(outcome);
        }
    }

    /// Proposes the pending transactions as one entry (a `TxnBatch` when there are several).
    fn propose_pending(&mut self) {
        self.pending_bytes = 0;
        let mut pending = std::mem::take(&mut self.pending);
        let (cmd, waiting) = match pending.len() {
            0 => return,
            1 => {
                let (t, tx) = pending.pop().expect("one pending");
                (Command::Txn(t), Waiting::One(tx))
            }
            _ => {
                let (txns, txs): (Vec<_>, Vec<_>) = pending.into_iter().unzip();
                (Command::TxnBatch(txns), Waiting::Batch(txs))
            }
        };
        self.propose(cmd, waiting);
    }

    fn propose(&mut self, cmd: Command, waiting: Waiting) {
        match self.raw.propose(vec![], cmd.encode()) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                self.proposals.insert(index, (self.raw.raft.term, waiting));
            }
            Err(e) => {
                self.waiting_txns -= waiting.len();
                let why = format!("proposal refused by raft ({e}); nothing was written, retry");
                waiting.fail(|| Error::NotApplied(why.clone()));
            }
        }
    }

    fn pending_reads(&self) -> usize {
        self.reads_new.len()
            + self
                .reads_in_flight
                .iter()
                .map(|r| r.waiters.len())
                .sum::<usize>()
            + self.reads_ready.iter().map(|r| r.1.len()).sum::<usize>()
    }

    fn after_batch(&mut self) -> Result<()> {
        self.propose_pending();
        // One ReadIndex for every read that arrived in this batch. A new leader must first commit
        // an entry of its own term; until then raft-rs would drop the request, so keep them.
        if !self.reads_new.is_empty() && self.raw.raft.commit_to_current_term() {
            let ctx = self.next_read_ctx;
            self.next_read_ctx += 1;
            self.raw.read_index(ctx.to_be_bytes().to_vec());
            self.reads_in_flight.push(PendingRead {
                ctx,
                waiters: std::mem::take(&mut self.reads_new),
                since: Instant::now(),
            });
        }
        if self.raw.store().take_snapshot_wanted() {
            self.build_snapshot()?;
        }
        self.on_ready()?;
        self.publish();
        Ok(())
    }

    fn publish(&mut self) {
        self.check_transfer();
        let r = &self.raw.raft;
        self.shared.leader_id.store(r.leader_id, Ordering::Relaxed);
        self.shared.term.store(r.term, Ordering::Relaxed);
        self.shared
            .is_leader
            .store((r.state == StateRole::Leader) as u64, Ordering::Relaxed);
        if r.state != StateRole::Leader {
            // Reads accepted while leader cannot complete elsewhere: fail them so clients retry.
            let err = self.not_leader();
            for tx in self.reads_new.drain(..) {
                let _ = tx.send(Err(err.clone_not_leader()));
            }
            // A read index in flight may never be confirmed now. Reads whose index is already
            // known stay: that index was confirmed by a quorum and remains a correct bound.
            for r in self.reads_in_flight.drain(..) {
                for tx in r.waiters {
                    let _ = tx.send(Err(err.clone_not_leader()));
                }
            }
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                let meta = m.get_snapshot().get_metadata();
                match self.raw.store().latest_snapshot() {
                    Some(s) if s.metadata.index == meta.index => {
                        self.transport.send_snapshot(m, s.path.clone())
                    }
                    _ => {
                        tracing::warn!(
                            to = m.to,
                            index = meta.index,
                            "snapshot file is gone; raft will ask again"
                        );
                        self.raw
                            .report_snapshot(m.to, raft::SnapshotStatus::Failure);
                    }
                }
            } else {
                self.transport.send(m);
            }
        }
    }

    fn on_ready(&mut self) -> Result<()> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut rd = self.raw.ready();
        self.send(rd.take_messages());

        if !rd.snapshot().is_empty() {
            let meta = rd.snapshot().get_metadata().clone();
            self.install_snapshot(&meta)?;
        }
        if !rd.entries().is_empty() {
            self.raw.mut_store().append(rd.entries())?;
        }
        if let Some(hs) = rd.hs() {
            self.raw.mut_store().set_hard_state(hs)?;
        }
        // raft-rs sets must_sync for new entries, a new term or a new vote: what must be on disk
        // before the persisted messages go out. A hard state that only moved the commit index
        // needs no fsync of its own (restart recovery copes with a stored commit behind the
        // applied index, see `node.rs`), and skipping it saves one fsync per commit on a leader.
        if rd.must_sync() {
            self.durable.sync()?;
        }
        for rs in rd.take_read_states() {
            self.read_index_known(&rs.request_ctx, rs.index);
        }
        self.send(rd.take_persisted_messages());
        self.apply(rd.take_committed_entries())?;

        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.release_reads();
        self.maybe_compact()?;
        Ok(())
    }

    fn read_index_known(&mut self, ctx: &[u8], index: u64) {
        let Ok(ctx) = <[u8; 8]>::try_from(ctx) else {
            return;
        };
        let ctx = u64::from_be_bytes(ctx);
        if let Some(pos) = self.reads_in_flight.iter().position(|r| r.ctx == ctx) {
            let r = self.reads_in_flight.swap_remove(pos);
            self.reads_ready.push((index, r.waiters));
        }
    }

    fn release_reads(&mut self) {
        let applied = self.sm.applied_index();
        self.reads_ready.retain_mut(|(index, waiters)| {
            if *index <= applied {
                for tx in waiters.drain(..) {
                    let _ = tx.send(Ok(()));
                }
                false
            } else {
                true
            }
        });
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<()> {
        let mut batch: Vec<Apply> = Vec::with_capacity(entries.len());
        let mut terms: HashMap<u64, u64> = HashMap::new();
        for e in entries {
            terms.insert(e.index, e.term);
            // Raft turns a conf change it will not accept into an empty entry, and a new leader
            // may overwrite it: either way it is not a conf change at the waiter's index.
            let is_conf = matches!(
                e.get_entry_type(),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2
            );
            if !is_conf {
                if let Some(w) = self.conf_waiter.take_if(|w| w.index == e.index) {
                    let _ = w.resp.send(Err(conf_not_applied()));
                }
            }
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if e.data.is_empty() {
                        batch.push(Apply {
                            index: e.index,
                            cmd: None,
                        });
                        continue;
                    }
                    match Command::decode(&e.data) {
                        Ok(cmd) => batch.push(Apply {
                            index: e.index,
                            cmd: Some(cmd),
                        }),
                        Err(why) => {
                            // Every replica decodes the same bytes the same way, so skipping is
                            // deterministic; it can only mean a bug, so say so loudly.
                            tracing::error!(
                                index = e.index,
                                why,
                                "committed entry does not decode; applied as a no-op"
                            );
                            batch.push(Apply {
                                index: e.index,
                                cmd: None,
                            });
                        }
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_batch(std::mem::take(&mut batch), &terms)?;
                    let cs = self.apply_conf_change(&e)?;
                    if let Some(w) = self.conf_waiter.take_if(|w| w.index == e.index) {
                        let _ = w.resp.send(if w.term == e.term {
                            Ok(cs)
                        } else {
                            Err(conf_not_applied())
                        });
                    }
                    self.apply_batch(
                        vec![Apply {
                            index: e.index,
                            cmd: None,
                        }],
                        &terms,
                    )?;
                }
            }
        }
        self.apply_batch(batch, &terms)
    }

    fn apply_batch(&mut self, batch: Vec<Apply>, terms: &HashMap<u64, u64>) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let results = self.sm.apply(&batch)?;
        let mut results = results.into_iter().peekable();
        for a in &batch {
            let result = match results.peek() {
                Some((i, _)) if *i == a.index => results.next().map(|r| r.1),
                _ => None,
            };
            if let Some((term, waiting)) = self.proposals.remove(&a.index) {
                self.waiting_txns -= waiting.len();
                if terms.get(&a.index) == Some(&term) {
                    waiting.answer(result.unwrap_or_else(|| {
                        Err(Error::Storage("entry applied without a result".into()))
                    }));
                } else {
                    waiting.fail(|| Error::NotApplied(
                        "leadership changed and this write was replaced in the log: it was NOT applied; retry".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Applies a membership change: raft's configuration, the transport's peers (an added
    /// node's address travels in the change's context) and both persisted.
    fn apply_conf_change(&mut self, e: &Entry) -> Result<ConfState> {
        let corrupt = |err| Error::Corruption(format!("conf change at {}: {err}", e.index));
        let (cs, changes) = if e.get_entry_type() == EntryType::EntryConfChangeV2 {
            let mut cc = ConfChangeV2::default();
            cc.merge_from_bytes(&e.data).map_err(corrupt)?;
            let changes: Vec<_> = cc
                .changes
                .iter()
                .map(|c| (c.get_change_type(), c.node_id, cc.context.to_vec()))
                .collect();
            (self.raw.apply_conf_change(&cc), changes)
        } else {
            let mut cc = ConfChange::default();
            cc.merge_from_bytes(&e.data).map_err(corrupt)?;
            let change = (cc.get_change_type(), cc.node_id, cc.context.to_vec());
            (self.raw.apply_conf_change(&cc), vec![change])
        };
        let cs = cs.map_err(|err| Error::Storage(format!("conf change at {}: {err}", e.index)))?;
        for (kind, id, context) in changes {
            match kind {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    match std::str::from_utf8(&context) {
                        Ok(addr) if !addr.is_empty() => self.transport.add_peer(id, addr),
                        _ => {}
                    }
                }
                ConfChangeType::RemoveNode if id == self.cfg.node_id => {
                    tracing::warn!(node = id, group = self.cfg.group_id,
                        "this replica was removed from its group: it takes no further part and can be stopped");
                }
                ConfChangeType::RemoveNode => {
                    self.transport.remove_peer(id);
                    self.last_heard.remove(&id);
                }
            }
        }
        tracing::info!(node = self.cfg.node_id, group = self.cfg.group_id, index = e.index,
            voters = ?cs.voters, learners = ?cs.learners, "membership changed");
        let addrs = self.transport.addrs();
        self.raw.mut_store().set_peer_addrs(&addrs)?;
        self.raw.mut_store().set_conf_state(&cs)?;
        Ok(cs)
    }

    fn install_snapshot(&mut self, meta: &SnapshotMetadata) -> Result<()> {
        let path = self
            .staged
            .remove(&(meta.index, meta.term))
            .ok_or_else(|| {
                Error::Storage(format!(
                    "raft accepted snapshot {}/{} but its file is not staged",
                    meta.index, meta.term
                ))
            })?;
        let started = Instant::now();
        let items = self.sm.install_snapshot(&path, meta.index)?;
        self.raw.mut_store().apply_snapshot(meta)?;
        self.durable.sync()?;
        self.sm.finish_install()?;
        self.snapshots_installed += 1;
        self.raw.mut_store().set_latest_snapshot(SnapshotFile {
            metadata: meta.clone(),
            path,
        });
        self.staged.clear();
        tracing::info!(
            node = self.cfg.node_id,
            index = meta.index,
            items,
            ms = started.elapsed().as_millis() as u64,
            "caught up from a snapshot"
        );
        Ok(())
    }

    fn build_snapshot(&mut self) -> Result<()> {
        let applied = self.sm.applied_index();
        let term = raft::Storage::term(self.raw.store(), applied)
            .map_err(|e| Error::Storage(format!("term of applied index {applied}: {e}")))?;
        let started = Instant::now();
        let (index, path, records) = self.sm.build_snapshot(&self.cfg.snap_dir, term)?;
        let mut metadata = SnapshotMetadata::default();
        metadata.index = index;
        metadata.term = term;
        metadata.set_conf_state(self.raw.store().conf_state().clone());
        let old = self.raw.store().latest_snapshot().map(|s| s.path.clone());
        self.raw.mut_store().set_latest_snapshot(SnapshotFile {
            metadata,
            path: path.clone(),
        });
        if let Some(old) = old.filter(|o| *o != path) {
            // A transfer still reading it keeps its open handle.
            let _ = std::fs::remove_file(old);
        }
        tracing::info!(
            node = self.cfg.node_id,
            index,
            records,
            ms = started.elapsed().as_millis() as u64,
            "built snapshot"
        );
        Ok(())
    }

    fn maybe_compact(&mut self) -> Result<()> {
        let applied = self.sm.applied_index();
        let first = self.raw.store().first_index_now();
        if applied + 1 - first.min(applied + 1) <= self.cfg.compact_log_entries {
            return Ok(());
        }
        // Keep at least the newest half so a follower slightly behind still catches up from the
        // log, and remove at most a step at a time: deleting thousands of entries in one batch
        // stalls every request of the group for tens of milliseconds, small steps spread it out.
        let first_kept_max = applied - self.cfg.compact_log_entries / 2;
        let to = first_kept_max.min(first.saturating_sub(1) + COMPACT_STEP_ENTRIES_MAX);
        let removed = self.raw.mut_store().compact(to)?;
        tracing::debug!(node = self.cfg.node_id, to, removed, "compacted raft log");
        Ok(())
    }

    /// Fails requests whose wait has no end in sight, and forgets those whose client left.
    fn expire(&mut self) {
        let timeout = Duration::from_millis(READ_INDEX_TIMEOUT_MS);
        self.reads_in_flight.retain_mut(|r| {
            if r.since.elapsed() < timeout {
                return true;
            }
            for tx in r.waiters.drain(..) {
                let _ = tx.send(Err(Error::Unavailable(
                    "read index timed out (leader could not confirm it still leads); retry".into(),
                )));
            }
            false
        });
        let mut forgotten = 0;
        self.proposals.retain(|_, (_, waiting)| {
            let closed = waiting.is_closed();
            if closed {
                forgotten += waiting.len();
            }
            !closed
        });
        self.waiting_txns -= forgotten;
    }

    fn fail_all(&mut self, err: impl Fn() -> Error) {
        if let Some(t) = self.transfer.take() {
            let _ = t.resp.send(Err(err()));
        }
        if let Some(w) = self.conf_waiter.take() {
            let _ = w.resp.send(Err(err()));
        }
        for (_, (_, waiting)) in std::mem::take(&mut self.proposals) {
            waiting.fail(&err);
        }
        for (_, tx) in self.pending.drain(..) {
            let _ = tx.send(Err(err()));
        }
        self.waiting_txns = 0;
        for tx in self.reads_new.drain(..) {
            let _ = tx.send(Err(err()));
        }
        for r in self.reads_in_flight.drain(..) {
            for tx in r.waiters {
                let _ = tx.send(Err(err()));
            }
        }
        for (_, ws) in self.reads_ready.drain(..) {
            for tx in ws {
                let _ = tx.send(Err(err()));
            }
        }
    }

    fn status(&self, with_digest: bool) -> Result<StatusResponse> {
        let r = &self.raw.raft;
        let (items, data_digest) = if with_digest {
            self.sm.digest()?
        } else {
            (0, 0)
        };
        Ok(StatusResponse {
            node_id: self.cfg.node_id,
            group_id: self.cfg.group_id,
            leader_id: r.leader_id,
            role: format!("{:?}", r.state),
            term: r.term,
            commit_index: r.raft_log.committed,
            applied_index: self.sm.applied_index(),
            first_index: self.raw.store().first_index_now(),
            last_index: self.raw.store().last_index_now(),
            voters: self.raw.store().conf_state().voters.clone(),
            learners: self.raw.store().conf_state().learners.clone(),
            live: if r.state == StateRole::Leader {
                r.prs()
                    .iter()
                    .map(|(id, _)| *id)
                    .filter(|id| self.is_live(*id))
                    .collect()
            } else {
                Vec::new()
            },
            snapshots_installed: self.snapshots_installed,
            snapshots_sent: self.snapshots_sent,
            items,
            data_digest,
            ..Default::default()
        })
    }
}

fn conf_not_applied() -> Error {
    Error::NotApplied(
        "the membership change was not applied (raft refused it or leadership changed); nothing changed, retry".into(),
    )
}

impl Error {
    fn clone_not_leader(&self) -> Error {
        match self {
            Error::NotLeader {
                group,
                leader_id,
                leader_addr,
            } => Error::NotLeader {
                group: *group,
                leader_id: *leader_id,
                leader_addr: leader_addr.clone(),
            },
            other => Error::Unavailable(other.to_string()),
        }
    }
}
