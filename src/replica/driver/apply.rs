//! Applying committed entries: normal entries are decoded into commands and handed to the state
//! machine in batches (one sled transaction each); a conf change ends the batch before it and is
//! applied on its own; each waiting proposal is answered, or told it was replaced in the log.

use std::collections::{BTreeMap, HashMap};

use raft::prelude::*;

use super::conf_change::conf_not_applied;
use super::{Driver, Waiting};
use crate::error::{Error, Result};
use crate::state::{Apply, Command, Outcome, Stamp};

impl Driver {
    pub(super) fn apply(&mut self, entries: Vec<Entry>) -> Result<()> {
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
                            stamp: None,
                        });
                        continue;
                    }
                    match Command::decode(&e.data) {
                        Ok(cmd) => batch.push(Apply {
                            index: e.index,
                            cmd: Some(cmd),
                            stamp: Stamp::decode(&e.context),
                        }),
                        Err(why) => {
                            // Skipping it would be silent divergence (audit M7): a replica of
                            // another version may decode and apply it. Stop instead (fail-stop);
                            // what came before it in this Ready is applied first.
                            self.apply_batch(std::mem::take(&mut batch), &terms)?;
                            return Err(Error::Corruption(format!(
                                "committed entry {} (term {}) does not decode: {why}; the replica \
                                 stops rather than skip it (is a newer version's command in the log?)",
                                e.index, e.term
                            )));
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
                            stamp: None,
                        }],
                        &terms,
                    )?;
                }
            }
        }
        self.apply_batch(batch, &terms)
    }

    pub(super) fn apply_batch(
        &mut self,
        batch: Vec<Apply>,
        terms: &HashMap<u64, u64>,
    ) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let (proposals, waiting_txns) = (&mut self.proposals, &mut self.waiting_txns);
        self.sm.apply(&batch, &mut |index, result| {
            settle(proposals, waiting_txns, terms, index, Some(result));
        })?;
        // Raft's own entries have no outcome; a proposal waiting at one was replaced.
        for a in &batch {
            settle(proposals, waiting_txns, terms, a.index, None);
        }
        Ok(())
    }
}

/// Answers the proposal waiting at `index`, if any, with the entry's outcome, or tells it that
/// another leader's entry took its place.
fn settle(
    proposals: &mut BTreeMap<u64, (u64, Waiting)>,
    waiting_txns: &mut usize,
    terms: &HashMap<u64, u64>,
    index: u64,
    result: Option<Result<Outcome>>,
) {
    let Some((term, waiting)) = proposals.remove(&index) else {
        return;
    };
    *waiting_txns -= waiting.len();
    if terms.get(&index) == Some(&term) {
        waiting.answer(
            result.unwrap_or_else(|| Err(Error::Storage("entry applied without a result".into()))),
        );
    } else {
        waiting.fail(|| {
            Error::NotApplied(
                "leadership changed and this write was replaced in the log: it was NOT applied; \
                 retry"
                    .into(),
            )
        });
    }
}
