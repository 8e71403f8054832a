//! Applying committed commands: transactions, 2PC steps and the applied index in one sled
//! transaction over `data` + `sys` per run of entries, ownership and migration commands alone.
//! Every check here is deterministic, so every replica refuses the same commands. Results are
//! bounded: each transaction by `TXN_RESULT_BYTES_MAX`, each entry by `ENTRY_RESULT_BYTES_MAX`.

use std::sync::atomic::Ordering;

use ordo_proto::v1::{txn_op, TxnResponse};
use ordo_proto::v1::{
    DecideRequest, DecideResponse, Decision, PrepareRequest, PrepareResponse, TxnRequest,
};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::Transactional;

use super::dedup::{self, Seen, Stamp};
use super::migrate::{self, Moving};
use super::participant::{self, Tx};
use super::txn::Budget;
use super::Ownership;
use super::{feed, groups, shard_keys, txn, Apply, Capture, Checkpoint, Command, Outcome};
use super::{StateMachine, TxView, APPLIED_KEY, FEED_TS_KEY};
use crate::error::{Error, Result};
use crate::limits::{ENTRY_RESULT_BYTES_MAX, FEED_TRIM_EVENTS_MAX};

/// Where an apply hands each outcome as soon as its sled transaction is on disk: the driver
/// answers the waiting request, so results do not pile up over a long `Ready`.
pub type Answer<'a> = dyn FnMut(u64, Result<Outcome>) + 'a;

/// Outcomes by entry index, in order.
type Outcomes = Vec<(u64, Result<Outcome>)>;

impl StateMachine {
    /// Applies committed entries in order. Runs of transactions go into one sled transaction
    /// with the applied index (cut where their results reach `ENTRY_RESULT_BYTES_MAX`); an
    /// ownership change is applied on its own (it must look at the data already written). Hands
    /// `answer` the outcome of every entry that carried a command; a refused command (e.g. a slot
    /// this group does not own) is an `Err` outcome with no effects.
    pub fn apply(&self, batch: &[Apply], answer: &mut Answer<'_>) -> Result<()> {
        let mut run_start = 0;
        for (i, a) in batch.iter().enumerate() {
            let r = match &a.cmd {
                Some(Command::SetOwnership(req)) => {
                    self.apply_txns(&batch[run_start..i], answer)?;
                    self.forget_hints();
                    self.apply_ownership(a.index, req)?
                }
                Some(
                    cmd @ (Command::MigrateOut(_)
                    | Command::MigrateIngest(_)
                    | Command::MigrateClear(_)),
                ) => {
                    self.apply_txns(&batch[run_start..i], answer)?;
                    self.forget_written_by(cmd);
                    self.apply_migration(a.index, cmd, a.stamp)?
                }
                _ => continue,
            };
            answer(a.index, r);
            run_start = i + 1;
        }
        self.apply_txns(&batch[run_start..], answer)?;
        if let Some(last) = batch.last() {
            self.applied_tx.send_replace(last.index);
        }
        Ok(())
    }

    /// Ownership changes, migrations and snapshot installs write slots' records outside apply
    /// runs: what the runs remember of those records (`dedup::Indexes`, `feed::Metas`) is forgotten.
    pub(super) fn forget_hints(&self) {
        self.dedup_index.clear();
        self.feed_metas.clear();
    }

    /// What runs remember of the slots a migration command writes. A slot's dedup index costs
    /// a scan of its entries to build again, so only the slots an ingest or a cleanup writes
    /// lose theirs (the donor's steps write no dedup record); feed metas cost a read, all go.
    fn forget_written_by(&self, cmd: &Command) {
        self.feed_metas.clear();
        match cmd {
            Command::MigrateIngest(req) => self.dedup_index.forget(
                req.records
                    .iter()
                    .filter_map(|r| super::keys::slot_of(&r.key).ok()),
            ),
            Command::MigrateClear(req) => self.dedup_index.forget(req.slots.iter().copied()),
            _ => {}
        }
    }

    /// Every outcome of `apply`, in order (tests read them all at once).
    #[cfg(test)]
    pub fn apply_all(&self, batch: &[Apply]) -> Result<Outcomes> {
        let mut out = Vec::new();
        self.apply(batch, &mut |index, r| out.push((index, r)))?;
        Ok(out)
    }

    /// Applies a run of transactions and 2PC steps in sled transactions, each with its last
    /// index, under the view lock (readers never see half of one); a new one starts where the
    /// results so far reach `ENTRY_RESULT_BYTES_MAX`, after they are handed to `answer`.
    fn apply_txns(&self, mut batch: &[Apply], answer: &mut Answer<'_>) -> Result<()> {
        while !batch.is_empty() {
            let (applied, results) = self.apply_txns_once(batch)?;
            for (index, r) in results {
                answer(index, r);
            }
            batch = &batch[applied..];
        }
        Ok(())
    }

    /// One sled transaction over the start of `batch`: how many entries it applied, and their
    /// outcomes.
    fn apply_txns_once(&self, batch: &[Apply]) -> Result<(usize, Outcomes)> {
        let ownership = self.ownership.read().unwrap().clone();
        let moving = self.moving.read().unwrap();
        let taken = self.dedup_index.take(&self.data, batch, self.slot_count)?;
        let pending = match dedup::Pending::load(&self.data, batch, self.slot_count, &taken) {
            Ok(pending) => pending,
            Err(e) => {
                self.dedup_index.give_back(taken, None);
                return Err(e);
            }
        };
        let _w = self.view.write().unwrap();
        let run = (&self.data, &self.sys)
            .transaction(|(data, sys)| {
                let applier = Applier {
                    view: TxView {
                        data,
                        slot_count: self.slot_count,
                        node_id: self.node_id,
                        log: migrate::LogWriter::new(sys, &moving),
                        ages: &self.lock_ages,
                        locks: self.locks.load(Ordering::Relaxed),
                        aged: Vec::new(),
                        feed: feed::Writer::with_committed(self.feed_metas.clone()),
                        notices: Vec::new(),
                    },
                    dedup: pending.clone(),
                    slot_count: self.slot_count,
                    ownership: &ownership,
                    moving: &moving,
                    entry_left: 0,
                };
                applier.run(batch, sys)
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Abort(e) => e,
                sled::transaction::TransactionError::Storage(e) => Error::from(e),
            });
        let run = match run {
            Ok(run) => run,
            Err(e) => {
                drop(pending);
                self.dedup_index.give_back(taken, None);
                return Err(e);
            }
        };
        let changes = run.dedup.clone();
        drop(pending);
        self.dedup_index.give_back(taken, Some(&changes));
        if !run.logs.is_empty() {
            drop(moving);
            self.moving.write().unwrap().update_logs(run.logs);
        }
        self.feed_metas
            .extend(run.metas.iter().map(|(s, m)| (s, m)));
        self.locks.store(run.locks, Ordering::Relaxed);
        self.feed_ts.store(run.last_ts, Ordering::Release);
        for (slot, meta) in &run.metas {
            self.feed_tips.set(*slot, meta.last_seq);
        }
        self.group_notices.push(run.notices);
        self.lock_ages.record(run.aged);
        self.applied
            .store(batch[run.applied - 1].index, Ordering::Release);
        Ok((run.applied, run.results))
    }
}

/// What one apply transaction did, handed to the state machine once it committed.
struct Run {
    /// Entries of the batch it applied (a prefix).
    applied: usize,
    results: Outcomes,
    /// `StateMachine::locks` and `lock_ages` as it left them.
    locks: i64,
    aged: Vec<participant::AgeEvent>,
    /// The migrations' change logs it appended to.
    logs: Vec<(u64, migrate::Out)>,
    last_ts: u64,
    /// The feed metas it wrote.
    metas: Vec<(u32, feed::Meta)>,
    notices: Vec<groups::Notice>,
    /// What it changed in the dedup indexes.
    dedup: dedup::Changes,
}

/// What the commands of one apply transaction are checked against and write to.
struct Applier<'a> {
    view: TxView<'a>,
    /// Keyed writes' view of the dedup records (`dedup.rs`).
    dedup: dedup::Pending<'a>,
    slot_count: u32,
    ownership: &'a Ownership,
    moving: &'a Moving,
    /// Result bytes the current entry may still return (of `ENTRY_RESULT_BYTES_MAX`).
    entry_left: usize,
}

impl Applier<'_> {
    /// Applies the start of `batch` in this transaction (up to `ENTRY_RESULT_BYTES_MAX` of
    /// results), with its last index and effective time in `sys`.
    fn run(mut self, batch: &[Apply], sys: &TransactionalTree) -> Tx<Run> {
        let mut last_ts = super::read_u64(sys.get(FEED_TS_KEY)?, "feed_ts")
            .map_err(ConflictableTransactionError::Abort)?;
        let mut results = Vec::with_capacity(batch.len());
        let mut result_bytes = 0;
        let mut applied = 0;
        for a in batch {
            applied += 1;
            self.view.log.at_index(a.index);
            self.entry_left = ENTRY_RESULT_BYTES_MAX;
            if let Some(cmd) = &a.cmd {
                last_ts = feed::next_ts(last_ts, a.stamp);
                let capture = a.stamp.map(|s| s.capture).unwrap_or_default();
                self.view.feed.at_entry(last_ts, capture);
                if let Some(r) = self.command(cmd, a.stamp)? {
                    results.push((a.index, r));
                }
            }
            result_bytes += ENTRY_RESULT_BYTES_MAX - self.entry_left;
            if result_bytes >= ENTRY_RESULT_BYTES_MAX {
                break;
            }
        }
        sys.insert(APPLIED_KEY, &batch[applied - 1].index.to_be_bytes())?;
        sys.insert(FEED_TS_KEY, &last_ts.to_be_bytes())?;
        let mut view = self.view;
        let metas = view
            .finish_feed()
            .map_err(ConflictableTransactionError::Abort)?;
        Ok(Run {
            applied,
            results,
            logs: view.log.finish()?,
            locks: view.locks,
            aged: view.aged,
            last_ts,
            metas,
            notices: view.notices,
            dedup: self.dedup.changes().clone(),
        })
    }

    /// One command's outcome; `None` for commands applied elsewhere (ownership, migrations).
    fn command(&mut self, cmd: &Command, stamp: Option<Stamp>) -> Tx<Option<Result<Outcome>>> {
        Ok(Some(match cmd {
            Command::Txn(t) => self.txn(t, stamp)?.map(Outcome::Txn),
            Command::TxnBatch(ts) => {
                let mut rs = Vec::with_capacity(ts.len());
                for t in ts {
                    rs.push(self.txn(t, stamp)?);
                }
                Ok(Outcome::TxnBatch(rs))
            }
            Command::Prepare(p) => self.prepare(p)?.map(Outcome::Prepared),
            Command::Decide(req) => self.decide(req, stamp)?.map(Outcome::Decided),
            Command::Finish(f) => {
                let mut budget = Budget::within_entry(self.entry_left);
                let r = participant::finish(&mut self.view, f, &mut budget)?;
                self.entry_left -= budget.used();
                r.map(Outcome::Finished)
            }
            Command::Forget(f) => {
                participant::forget(&mut self.view, f)?;
                Ok(Outcome::Forgotten)
            }
            Command::Checkpoint(c) => {
                self.checkpoint(c)
                    .map_err(ConflictableTransactionError::Abort)?;
                Ok(Outcome::Checkpointed)
            }
            Command::Group(g) => {
                let ctx = groups::Ctx {
                    slot_count: self.slot_count,
                    ownership: self.ownership,
                    moving: self.moving,
                };
                groups::apply(&mut self.view, &ctx, g)
                    .map_err(ConflictableTransactionError::Abort)?
                    .map(Outcome::Group)
            }
            Command::SetOwnership(_)
            | Command::MigrateOut(_)
            | Command::MigrateIngest(_)
            | Command::MigrateClear(_) => return Ok(None),
        }))
    }

    /// A checkpoint's trims, in order, at most `FEED_TRIM_EVENTS_MAX` events in all; a slot
    /// not owned here (moved since the leader decided) is left alone. A consumer group that had
    /// not done the events dropped is expired (the leader's plan trims those only past the
    /// protection limit).
    fn checkpoint(&mut self, c: &Checkpoint) -> Result<()> {
        let mut budget = FEED_TRIM_EVENTS_MAX;
        for &(slot, below) in &c.trims {
            if slot < self.slot_count && self.ownership.owns(slot) {
                self.view.trim_feed(slot, below, &mut budget)?;
                let first_seq = self.view.feed_meta_peek(slot)?.first_seq;
                self.view.expire_groups(slot, first_seq)?;
            }
        }
        Ok(())
    }

    fn slot(&self, shard_key: &[u8]) -> u32 {
        ordo_proto::slot_of(shard_key, self.slot_count)
    }

    /// `WrongShard` if a shard key's slot is not owned here (at apply time, the authoritative
    /// check).
    fn unowned<'k>(&self, sks: impl Iterator<Item = &'k [u8]>) -> Option<Error> {
        sks.map(|sk| self.slot(sk))
            .find(|slot| !self.ownership.owns(*slot))
            .map(|slot| Error::WrongShard {
                slot,
                map_version: self.ownership.map_version,
            })
    }

    /// An `Emit` where the change feed captures nothing (`--feed-capture off`, as stamped):
    /// refused rather than accepted and dropped, since the event is all it is for.
    fn emits_unkept(&self, t: &TxnRequest) -> Option<Error> {
        let emits = t
            .success
            .iter()
            .chain(&t.failure)
            .any(|op| matches!(op.op, Some(txn_op::Op::Emit(_))));
        (emits && self.view.feed.capture() == Capture::Off).then(|| {
            Error::FailedPrecondition(
                "the Txn has an Emit, but this cluster's change feed captures nothing \
                 (--feed-capture off), so its event would be lost; nothing was applied"
                    .into(),
            )
        })
    }

    /// One transaction: refused if it touches a fenced slot or a slot not owned here; a keyed
    /// write seen before answers its first outcome (`dedup.rs`); refused if it touches an item a
    /// cross-group transaction holds; else evaluated (and a keyed write's outcome kept).
    fn txn(&mut self, t: &TxnRequest, stamp: Option<Stamp>) -> Tx<Result<TxnResponse>> {
        if let Some(e) = shard_keys(t).find_map(|sk| self.moving.fenced(self.slot(sk))) {
            return Ok(Err(e));
        }
        if let Some(e) = self.unowned(shard_keys(t)).or_else(|| self.emits_unkept(t)) {
            return Ok(Err(e));
        }
        let keyed = dedup::keyed(t, stamp, self.slot_count);
        let expired = match &keyed {
            None => None,
            Some(k) => match dedup::seen(self.view.data, &self.dedup, k)? {
                Ok(Seen::Repeat(resp)) => return Ok(Ok(resp)),
                Ok(Seen::New { expired }) => expired,
                Err(e) => return Ok(Err(e)),
            },
        };
        if self.view.locks > 0 {
            if let Err(e) = participant::check_unlocked(&self.view, t, None)? {
                return Ok(Err(e));
            }
        }
        let mut budget = Budget::within_entry(self.entry_left);
        let r = txn::evaluate(&mut self.view, t, &mut budget)
            .map_err(ConflictableTransactionError::Abort)?;
        if r.is_ok() {
            self.entry_left -= budget.used();
        }
        // An over-budget refusal wrote nothing and is not kept: like any refusal, a repeat is
        // evaluated again.
        if let (Some(k), Ok(resp)) = (&keyed, &r) {
            dedup::remember(&mut self.view, &mut self.dedup, k, expired, Some(resp))?;
        }
        Ok(r)
    }

    /// No new lock in a slot that is moving out: the move must not split a transaction (its
    /// fence waits for the locks already there). A lock met there is reported first, so that
    /// the prepare's router resolves it (nobody else may touch a moving slot's items).
    fn prepare(&mut self, p: &PrepareRequest) -> Tx<Result<PrepareResponse>> {
        let part = p.part.clone().unwrap_or_default();
        let moving_slot = shard_keys(&part).find_map(|sk| self.moving.moving_out(self.slot(sk)));
        let locked = match moving_slot {
            Some(_) => participant::check_unlocked(&self.view, &part, Some(&p.txn_id))?.err(),
            None => None,
        };
        let refused = locked
            .or(moving_slot)
            .or_else(|| self.unowned(shard_keys(&part)))
            .or_else(|| self.emits_unkept(&part));
        if let Some(e) = refused {
            return Ok(Err(e));
        }
        participant::prepare(&mut self.view, p)
    }

    /// A decision in a moving slot is written to its change log like an item, so it moves with
    /// the slot; once the slot is fenced none is taken (the log is complete at the fence). The
    /// first decision recorded wins. A keyed commit (a cross-group Txn with an idempotency key)
    /// is recorded with its dedup entry, as the same Txn in one group would be; if the key was
    /// applied before, this transaction is aborted and told the first outcome (or why there is
    /// none), so a resent Txn is applied once however many times it is coordinated.
    fn decide(&mut self, req: &DecideRequest, stamp: Option<Stamp>) -> Tx<Result<DecideResponse>> {
        let slot = self.slot(&req.primary_shard_key);
        let refused = self
            .moving
            .fenced(slot)
            .or_else(|| self.unowned(std::iter::once(req.primary_shard_key.as_ref())));
        if let Some(e) = refused {
            return Ok(Err(e));
        }
        if let Some(existing) = participant::decided(&self.view, req)? {
            return Ok(Ok(DecideResponse {
                decision: existing as i32,
                ..Default::default()
            }));
        }
        let mut resp = DecideResponse::default();
        let mut decision = match participant::wanted(req) {
            Ok(w) => w,
            Err(e) => return Ok(Err(e)),
        };
        if let Some(k) = dedup::keyed_decision(req, stamp, self.slot_count) {
            match dedup::seen(self.view.data, &self.dedup, &k)? {
                Ok(Seen::New { expired }) => {
                    let outcome = req.outcome.as_ref();
                    dedup::remember(&mut self.view, &mut self.dedup, &k, expired, outcome)?;
                }
                Ok(Seen::Repeat(first)) => (decision, resp.repeat) = (Decision::Abort, Some(first)),
                Err(Error::FailedPrecondition(why)) => {
                    (decision, resp.refused) = (Decision::Abort, why)
                }
                Err(e) => return Ok(Err(e)),
            }
        }
        participant::record(&mut self.view, req, decision)?;
        resp.decision = decision as i32;
        Ok(Ok(resp))
    }
}
