//! Applying committed commands: transactions, 2PC steps and the applied index in one sled
//! transaction over `data` + `sys` per run of entries, ownership and migration commands alone.
//! Every check here is deterministic, so every replica refuses the same commands.

use std::sync::atomic::Ordering;

use ordo_proto::v1::TxnResponse;
use ordo_proto::v1::{DecideRequest, DecideResponse, PrepareRequest, PrepareResponse, TxnRequest};
use sled::transaction::ConflictableTransactionError;
use sled::Transactional;

use super::migrate::{self, Moving};
use super::participant::{self, Tx};
use super::APPLIED_KEY;
use super::{shard_keys, txn, Apply, Command, Outcome, Ownership, StateMachine, TxView};
use crate::error::{Error, Result};

impl StateMachine {
    /// Applies committed entries in order. Runs of transactions go into one sled transaction
    /// with the applied index; an ownership change is applied on its own (it must look at the
    /// data already written). Returns the outcome of every entry that carried a command; a
    /// refused command (e.g. a slot this group does not own) is an `Err` outcome with no effects.
    pub fn apply(&self, batch: &[Apply]) -> Result<Vec<(u64, Result<Outcome>)>> {
        let mut out = Vec::with_capacity(batch.len());
        let mut run_start = 0;
        for (i, a) in batch.iter().enumerate() {
            let r = match &a.cmd {
                Some(Command::SetOwnership(req)) => {
                    self.apply_txns(&batch[run_start..i], &mut out)?;
                    self.apply_ownership(a.index, req)?
                }
                Some(
                    cmd @ (Command::MigrateOut(_)
                    | Command::MigrateIngest(_)
                    | Command::MigrateClear(_)),
                ) => {
                    self.apply_txns(&batch[run_start..i], &mut out)?;
                    self.apply_migration(a.index, cmd)?
                }
                _ => continue,
            };
            out.push((a.index, r));
            run_start = i + 1;
        }
        self.apply_txns(&batch[run_start..], &mut out)?;
        if let Some(last) = batch.last() {
            self.applied_tx.send_replace(last.index);
        }
        Ok(out)
    }

    /// Applies a run of transactions and 2PC steps, and the run's last index, in one sled
    /// transaction, under the view lock (readers never see half a run).
    fn apply_txns(&self, batch: &[Apply], out: &mut Vec<(u64, Result<Outcome>)>) -> Result<()> {
        let Some(last) = batch.last() else {
            return Ok(());
        };
        let ownership = self.ownership.read().unwrap().clone();
        let moving = self.moving.read().unwrap();
        let _w = self.view.write().unwrap();
        let (results, locks, aged, logs) = (&self.data, &self.sys)
            .transaction(|(data, sys)| {
                let mut applier = Applier {
                    view: TxView {
                        data,
                        slot_count: self.slot_count,
                        node_id: self.node_id,
                        log: migrate::LogWriter::new(sys, &moving),
                        ages: &self.lock_ages,
                        locks: self.locks.load(Ordering::Relaxed),
                        aged: Vec::new(),
                    },
                    slot_count: self.slot_count,
                    ownership: &ownership,
                    moving: &moving,
                };
                let mut results = Vec::with_capacity(batch.len());
                for a in batch {
                    applier.view.log.at_index(a.index);
                    if let Some(cmd) = &a.cmd {
                        if let Some(r) = applier.command(cmd)? {
                            results.push((a.index, r));
                        }
                    }
                }
                sys.insert(APPLIED_KEY, &last.index.to_be_bytes())?;
                let view = applier.view;
                Ok((results, view.locks, view.aged, view.log.finish()?))
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Abort(e) => e,
                sled::transaction::TransactionError::Storage(e) => Error::from(e),
            })?;
        if !logs.is_empty() {
            drop(moving);
            self.moving.write().unwrap().update_logs(logs);
        }
        self.locks.store(locks, Ordering::Relaxed);
        self.lock_ages.record(aged);
        self.applied.store(last.index, Ordering::Release);
        out.extend(results);
        Ok(())
    }
}

/// What the commands of one apply transaction are checked against and write to.
struct Applier<'a> {
    view: TxView<'a>,
    slot_count: u32,
    ownership: &'a Ownership,
    moving: &'a Moving,
}

impl Applier<'_> {
    /// One command's outcome; `None` for commands applied elsewhere (ownership, migrations).
    fn command(&mut self, cmd: &Command) -> Tx<Option<Result<Outcome>>> {
        Ok(Some(match cmd {
            Command::Txn(t) => self.txn(t)?.map(Outcome::Txn),
            Command::TxnBatch(ts) => {
                let mut rs = Vec::with_capacity(ts.len());
                for t in ts {
                    rs.push(self.txn(t)?);
                }
                Ok(Outcome::TxnBatch(rs))
            }
            Command::Prepare(p) => self.prepare(p)?.map(Outcome::Prepared),
            Command::Decide(req) => self.decide(req)?.map(Outcome::Decided),
            Command::Finish(f) => participant::finish(&mut self.view, f)?.map(Outcome::Finished),
            Command::Forget(f) => {
                participant::forget(&mut self.view, f)?;
                Ok(Outcome::Forgotten)
            }
            Command::SetOwnership(_)
            | Command::MigrateOut(_)
            | Command::MigrateIngest(_)
            | Command::MigrateClear(_) => return Ok(None),
        }))
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

    /// One transaction: refused if it touches a fenced slot, a slot not owned here or an item a
    /// cross-group transaction holds, else evaluated.
    fn txn(&mut self, t: &TxnRequest) -> Tx<Result<TxnResponse>> {
        if let Some(e) = shard_keys(t).find_map(|sk| self.moving.fenced(self.slot(sk))) {
            return Ok(Err(e));
        }
        if let Some(e) = self.unowned(shard_keys(t)) {
            return Ok(Err(e));
        }
        if self.view.locks > 0 {
            if let Err(e) = participant::check_unlocked(&self.view, t, None)? {
                return Ok(Err(e));
            }
        }
        Ok(Ok(
            txn::evaluate(&mut self.view, t).map_err(ConflictableTransactionError::Abort)?
        ))
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
            .or_else(|| self.unowned(shard_keys(&part)));
        if let Some(e) = refused {
            return Ok(Err(e));
        }
        participant::prepare(&mut self.view, p)
    }

    /// A decision in a moving slot is written to its change log like an item, so it moves with
    /// the slot; once the slot is fenced none is taken (the log is complete at the fence).
    fn decide(&mut self, req: &DecideRequest) -> Tx<Result<DecideResponse>> {
        let slot = self.slot(&req.primary_shard_key);
        let refused = self
            .moving
            .fenced(slot)
            .or_else(|| self.unowned(std::iter::once(req.primary_shard_key.as_ref())));
        match refused {
            Some(e) => Ok(Err(e)),
            None => participant::decide(&mut self.view, req),
        }
    }
}
