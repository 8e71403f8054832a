//! The raft driver of one replica: the only owner of its `RawNode`.
//!
//! One loop on a dedicated thread ticks, takes every raft message waiting in its raft queue (peer
//! traffic never waits behind proposals, audit M10), then messages from a bounded inbox (up to
//! `DRIVER_BATCH_MAX` at a time, so proposals that arrive together share one fsync) and handles
//! each `Ready` in raft-rs's order:
//! 1. send the leader's messages (they need not wait for its own disk),
//! 2. install a snapshot if raft accepted one,
//! 3. append entries and the hard state to the raft log, then **one** write and `fdatasync` of
//!    its segment file (`wal/`) for the whole Ready,
//! 4. send the messages that had to wait for that flush (votes, append responses),
//! 5. apply committed entries (effects + applied index in one sled transaction, not synced: the
//!    flusher thread syncs sled in the background, `durable.rs`) and answer the proposals and
//!    reads waiting for them,
//! 6. advance, and do the same for the light ready.
//!
//! A snapshot is built on a thread of its own (`snapshots.rs`); until it ends the loop goes on
//! ticking, stepping, appending and syncing, but leaves committed entries in the log, so the state
//! machine holds still at the snapshot's index; they are applied once it ends (`catch_up`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ordo_proto::v1::{StatusResponse, TxnRequest};
use prost::Message as _;
use raft::prelude::*;
use raft::{RawNode, StateRole};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::limits::*;
use crate::replica::durable::Flusher;
use crate::replica::inbox::{Msg, PeerMsg, Shared};
use crate::replica::outbox::Outbox;
use crate::replica::storage::RaftStore;
use crate::replica::watermark::Watermark;
use crate::state::{Command, Outcome, Stamp, StateMachine};

mod apply;
mod conf_change;
#[cfg(test)]
mod fail_stop_tests;
mod snapshots;
#[cfg(test)]
mod tests;

use conf_change::{ConfWaiter, Transfer};

pub struct DriverConfig {
    pub node_id: u64,
    pub group_id: u64,
    pub applied: u64,
    pub snap_dir: PathBuf,
    pub compact_log_entries: u64,
    /// How long keyed writes are deduplicated: stamped on every entry this leader proposes.
    pub dedup_window_ms: u64,
    /// What the change feed captures: stamped the same way. `Off` (a config server) also means
    /// no checkpoints.
    pub feed_capture: crate::state::Capture,
}

type Reply = oneshot::Sender<Result<Outcome>>;

/// Who waits for a proposed entry: one request, the transactions of a `TxnBatch` in order, or
/// nobody (the driver's own checkpoints).
enum Waiting {
    One(Reply),
    Batch(Vec<Reply>),
    Nobody,
}

impl Waiting {
    /// How many requests wait.
    fn len(&self) -> usize {
        match self {
            Waiting::One(_) => 1,
            Waiting::Batch(txs) => txs.len(),
            Waiting::Nobody => 0,
        }
    }

    /// Whether every waiting client has gone away.
    fn is_closed(&self) -> bool {
        match self {
            Waiting::One(tx) => tx.is_closed(),
            Waiting::Batch(txs) => txs.iter().all(|tx| tx.is_closed()),
            Waiting::Nobody => true,
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
            Waiting::Nobody => {}
        }
    }

    /// Hands each waiting request its result: a batch's outcome is split per transaction.
    fn answer(self, result: Result<Outcome>) {
        match (self, result) {
            (Waiting::Nobody, _) => {}
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
    /// Syncs sled in the background; how far the log may be compacted.
    flusher: Flusher,
    /// Raft state last known durable, outside the log (H5): refreshed after every sync.
    watermark: Watermark,
    sm: Arc<StateMachine>,
    inbox: mpsc::Receiver<Msg>,
    /// Raft messages from peers (`RaftQueue`), taken before the inbox.
    raft_in: mpsc::Receiver<PeerMsg>,
    outbox: Box<dyn Outbox>,
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
    snapshot_build: snapshots::SnapshotBuild,
    /// The last committed index raft handed over. While a snapshot is built the entries up to
    /// it stay in the log unapplied, and `catch_up` applies them once the build ends.
    committed_seen: u64,
    transfer: Option<Transfer>,
    conf_waiter: Option<ConfWaiter>,
    /// When each peer was last heard from (for the live-quorum check of membership changes).
    last_heard: HashMap<u64, Instant>,
    /// When this replica last proposed an entry (an idle leader proposes a checkpoint).
    last_proposed: Instant,
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
        max_committed_size_per_ready: APPLY_BATCH_BYTES_MAX,
        ..Default::default()
    }
}

impl Driver {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: DriverConfig,
        store: RaftStore,
        flusher: Flusher,
        watermark: Watermark,
        sm: Arc<StateMachine>,
        inbox: mpsc::Receiver<Msg>,
        raft_in: mpsc::Receiver<PeerMsg>,
        outbox: Box<dyn Outbox>,
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
            flusher,
            watermark,
            sm,
            inbox,
            raft_in,
            outbox,
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
            snapshot_build: Default::default(),
            committed_seen: config.applied,
            transfer: None,
            conf_waiter: None,
            last_heard: HashMap::new(),
            last_proposed: Instant::now(),
            stop,
        })
    }

    /// Runs until every inbox sender is gone (the node is shutting down) or the replica fails
    /// (a storage error, corruption). Pending requests are then failed, never left hanging. A
    /// failure is published in `Shared::stopped` (fail-stop, see ARCHITECTURE.md): handlers
    /// refuse everything from then on and the binary exits.
    pub async fn run(&mut self) {
        let failure = self.run_loop().await;
        if let Some(why) = &failure {
            self.shared.stop_with(why.clone());
        }
        self.shared.is_leader.store(0, Ordering::Relaxed);
        let failed = failure.is_some();
        let why = failure.unwrap_or_else(|| "it is shutting down".into());
        self.fail_all(|| {
            Error::Unavailable(format!(
                "the replica stopped before this request completed ({why}); its outcome is unknown"
            ))
        });
        // A replica that failed writes nothing more: its storage is not trusted, and on a full
        // disk sled's flush may never return, which would keep the process from exiting.
        if !failed {
            let applied = self.sm.applied_index();
            let synced = self.raw.mut_store().sync().and_then(|()| {
                self.flusher.sync_now(applied)?;
                let mark = self.raw.store().mark();
                self.watermark.write(mark)
            });
            if let Err(e) = synced {
                tracing::error!(error = %e, "final flush failed");
            }
        }
        tracing::info!(
            node = self.cfg.node_id,
            group = self.cfg.group_id,
            "raft driver stopped"
        );
    }

    /// The loop of `run`: `None` when asked to stop, else why the replica failed.
    async fn run_loop(&mut self) -> Option<String> {
        let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Asked to stop, or every sender is gone: the node is shutting down.
            self.next_batch(&mut tick).await?;
            if let Err(e) = self.after_batch() {
                tracing::error!(node = self.cfg.node_id, group = self.cfg.group_id, error = %e, "replica stops");
                return Some(format!("replica failed: {e}"));
            }
            if let Some(why) = self.flusher.failure() {
                tracing::error!(node = self.cfg.node_id, group = self.cfg.group_id, error = %why, "replica stops");
                return Some(format!("replica failed: {why}"));
            }
            if let Some(c) = self.raw.store().corruption() {
                tracing::error!(node = self.cfg.node_id, group = self.cfg.group_id, corruption = %c,
                    "replica stops: it will not campaign or serve from a log it cannot read");
                return Some(format!("replica found corruption: {c}"));
            }
        }
    }

    /// Waits until there is something to do, then takes it: a tick if one is due, every raft
    /// message waiting (up to its queue's bound), then up to `DRIVER_BATCH_MAX` inbox messages.
    /// Raft messages go first so that acks, votes and heartbeats are never queued behind
    /// proposals (audit M10); proposals still arrive in batches. `None` when stopping.
    async fn next_batch(&mut self, tick: &mut tokio::time::Interval) -> Option<()> {
        let first = tokio::select! {
            biased;
            _ = self.stop.changed() => return None,
            _ = tick.tick() => {
                self.raw.tick();
                self.expire();
                self.checkpoint_if_idle();
                None
            }
            m = self.raft_in.recv() => {
                self.step_peer(m?);
                None
            }
            built = snapshots::built(&mut self.snapshot_build.running) => {
                self.on_build_done(built);
                None
            }
            msg = self.inbox.recv() => Some(msg?),
        };
        for _ in 0..RAFT_QUEUE_MAX {
            match self.raft_in.try_recv() {
                Ok(m) => self.step_peer(m),
                Err(_) => break,
            }
        }
        let taken = usize::from(first.is_some());
        if let Some(msg) = first {
            self.handle(msg);
        }
        for _ in taken..DRIVER_BATCH_MAX {
            match self.inbox.try_recv() {
                Ok(msg) => self.handle(msg),
                Err(_) => break,
            }
        }
        Some(())
    }

    fn step_peer(&mut self, m: PeerMsg) {
        self.last_heard.insert(m.msg.from, Instant::now());
        if let Err(e) = self.raw.step(*m.msg) {
            tracing::debug!(error = %e, "raft message ignored");
        }
    }

    fn not_leader(&self) -> Error {
        let leader_id = self.raw.raft.leader_id;
        Error::NotLeader {
            group: self.cfg.group_id,
            leader_id,
            leader_addr: self.outbox.addr_of(leader_id).unwrap_or_default(),
        }
    }

    /// A write: refused unless this replica leads and has room; a transaction joins the pending
    /// batch (proposed when the batch is full or the inbox batch ends), anything else goes alone.
    fn on_propose(&mut self, cmd: Command, resp: Reply) {
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

    fn handle(&mut self, msg: Msg) {
        match msg {
            // Taken off the inbox: its bytes are the raft log's (or the batch's) from here on.
            Msg::Propose { cmd, resp, queued } => {
                drop(queued);
                self.on_propose(cmd, resp)
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
            Msg::SnapshotReceived { msg, path } => self.stage_snapshot(*msg, path),
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

    /// Proposes `cmd`, stamped with this leader's clock and dedup window (`state::Stamp`): every
    /// replica expires idempotency keys by the stamp, never by its own clock.
    ///
    /// Only a leader proposes. A transaction accepted while leading waits in `pending` until
    /// the inbox batch ends, and a raft message of a newer term may make this replica a follower
    /// before then: raft-rs would forward the proposal to the new leader and return `Ok`, and the
    /// waiter would be tracked at this replica's last index, which holds another leader's entry
    /// of the current term (its empty entry, or someone else's write). It would be answered with
    /// that entry's outcome (or none), while its own entry, if the new leader appends it, has no
    /// waiter. So a replica that no longer leads refuses: nothing was proposed.
    fn propose(&mut self, cmd: Command, waiting: Waiting) {
        if self.raw.raft.state != StateRole::Leader {
            self.waiting_txns -= waiting.len();
            let err = self.not_leader();
            waiting.fail(|| err.clone_not_leader());
            return;
        }
        let stamp = Stamp {
            now_ms: ordo_proto::unix_ms(),
            window_ms: self.cfg.dedup_window_ms,
            capture: self.cfg.feed_capture,
        };
        match self.raw.propose(stamp.encode(), cmd.encode()) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                self.track(index, self.raw.raft.term, waiting);
                self.last_proposed = Instant::now();
            }
            Err(e) => {
                self.waiting_txns -= waiting.len();
                let why = format!("proposal refused by raft ({e}); nothing was written, retry");
                waiting.fail(|| Error::NotApplied(why.clone()));
            }
        }
    }

    /// A leader that proposed nothing for `FEED_CHECKPOINT_INTERVAL_MS` proposes a checkpoint,
    /// so that the change feed's resolved times advance with no writes (also right after a
    /// leader change: a new leader has proposed nothing yet).
    fn checkpoint_if_idle(&mut self) {
        let idle =
            self.last_proposed.elapsed() >= Duration::from_millis(FEED_CHECKPOINT_INTERVAL_MS);
        if idle
            && self.cfg.feed_capture != crate::state::Capture::Off
            && self.raw.raft.state == StateRole::Leader
        {
            let checkpoint = Command::Checkpoint(crate::state::Checkpoint::default());
            self.propose(checkpoint, Waiting::Nobody);
        }
    }

    /// Remembers who waits for the entry just proposed at `index`. A leader whose tail was
    /// truncated reuses its indexes (audit M6): an older proposal still tracked there was
    /// replaced in the log and can no longer apply, so it is told so, and no longer counted.
    fn track(&mut self, index: u64, term: u64, waiting: Waiting) {
        if let Some((_, replaced)) = self.proposals.insert(index, (term, waiting)) {
            self.waiting_txns -= replaced.len();
            replaced.fail(|| Error::NotApplied(
                "leadership changed and this write was replaced in the log: it was NOT applied; retry".into(),
            ));
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
        self.maybe_build_snapshot();
        self.on_ready()?;
        self.catch_up()?;
        self.watermark.flush_due()?;
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
                        self.outbox.send_snapshot(m, s.path.clone())
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
                self.outbox.send(m);
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
            self.raw.mut_store().sync()?;
            // Before the persisted messages: a vote is on record before it is sent.
            self.watermark.record(self.raw.store().mark())?;
        }
        for rs in rd.take_read_states() {
            self.read_index_known(&rs.request_ctx, rs.index);
        }
        self.send(rd.take_persisted_messages());
        self.apply_committed(rd.take_committed_entries())?;

        let mut light = self.raw.advance_append(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        self.send(light.take_messages());
        self.apply_committed(light.take_committed_entries())?;
        self.applied()
    }

    /// Applies committed entries now, unless a snapshot is being built or earlier entries still
    /// wait: then they stay in the log (raft allows applying later) and `catch_up` applies them.
    fn apply_committed(&mut self, entries: Vec<Entry>) -> Result<()> {
        let Some(last) = entries.last().map(|e| e.index) else {
            return Ok(());
        };
        let caught_up = self.sm.applied_index() == self.committed_seen;
        self.committed_seen = last;
        if caught_up && self.snapshot_build.running.is_none() {
            self.apply(entries)?;
        }
        Ok(())
    }

    /// Once no snapshot is being built, applies the committed entries left in the log, a
    /// bounded step at a time.
    fn catch_up(&mut self) -> Result<()> {
        let applied = self.sm.applied_index();
        if applied >= self.committed_seen || self.snapshot_build.running.is_some() {
            return Ok(());
        }
        let (low, high) = (applied + 1, self.committed_seen + 1);
        let entries = raft::Storage::entries(
            self.raw.store(),
            low,
            high,
            APPLY_BATCH_BYTES_MAX,
            raft::GetEntriesContext::empty(false),
        )
        .map_err(|e| Error::Storage(format!("reading committed entries {low}..{high}: {e}")))?;
        self.apply(entries)?;
        self.applied()
    }

    /// Tells raft how far the state machine got, and what that releases.
    fn applied(&mut self) -> Result<()> {
        self.raw.advance_apply_to(self.sm.applied_index());
        self.release_reads();
        self.maybe_compact()
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
