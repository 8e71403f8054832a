//! Applying committed entries: normal entries are decoded into commands and handed to the state
//! machine in batches (one sled transaction each); a conf change ends the batch before it and is
//! applied on its own; each waiting proposal is answered, or told it was replaced in the log.

use std::collections::HashMap;

use raft::prelude::*;

use super::conf_change::conf_not_applied;
use super::Driver;
use crate::error::{Error, Result};
use crate::state::{Apply, Command, Stamp};

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
}
