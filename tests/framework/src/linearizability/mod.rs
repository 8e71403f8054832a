//! A linearizability checker for histories of single-item Ordo operations (`Get`, `Put`,
//! `Delete`, each with an optional `if_version`).
//!
//! Tests record what their clients did in a [`History`] (cheap to clone and share between tasks
//! or threads; every call takes its lock only for a moment, never across an `.await`), then call
//! [`check`]. The checker splits the history by item (an item is its own register, so the
//! history is linearizable iff every item's sub-history is: P-compositionality) and runs a
//! Wing–Gong search with Lowe's memoisation per item, the algorithm Porcupine and Knossos use.
//!
//! ```ignore
//! let history = History::new();
//! // In each client task (`history.clone()` moved in), either in one call...
//! let op = Op::Put { value: b"a".to_vec(), if_version: Some(3) };
//! let resp = history.record(client_id, key.clone(), op, kv.put(sk, k, "a", Some(3))).await;
//! // ...or by hand, e.g. when the test knows better than `Completion::from_status`:
//! let id = history.invoke(client_id, key.clone(), Op::Get);
//! let result = kv.get(sk, k, false).await;
//! history.complete(id, Completion::from_result(&result));
//! // After the clients stopped (ops still in flight count as unknown):
//! check(&history).assert_linearizable();
//! ```
//!
//! `ordo_proto::client::Client` and the router retry a write only after attempts that certainly were not
//! applied (see [`ordo_proto::certainly_not_applied`]), so an operation takes effect at most once,
//! as this model assumes; a client that retried blindly would show up here as a violation.
//!
//! The model is Ordo's item: absent, or `(value, version)` with version 1 at creation and +1 per
//! write; a delete removes the item and a later put recreates it at version 1. The search
//! assumes every item is absent when the history starts unless [`CheckOptions::initial`] says
//! otherwise. Only linearizable reads belong in a history: a `STALE` read may legitimately see
//! the past.
//!
//! Multi-item `Txn`s are not modelled: they would tie items together and break the split.
//!
//! The parts: `history` (what tests record), `model` (Ordo's item as a state machine), `search`
//! (the per-item Wing–Gong search) and `report` (verdicts and the explanation of a violation).

use std::collections::BTreeMap;

mod history;
mod model;
mod report;
mod search;
#[cfg(test)]
mod tests;

pub use history::{ClientId, Completion, History, ItemKey, Op, OpId, Output, Record};
/// How every checker of this crate shows bytes in a report.
pub(crate) use report::Bytes;
pub use report::{CheckResult, KeyReport, Overall, Verdict, Violation};

/// Bounds and assumptions of a check.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// Search steps allowed per item before giving up with [`Verdict::TimedOut`]. Each step is
    /// one visit of a call or return entry; the memo table grows by at most one entry per step,
    /// so this also bounds memory.
    pub max_steps_per_key: u64,
    /// Items that exist when the history starts, as `(value, version)`. Any other item is
    /// assumed absent.
    pub initial: BTreeMap<ItemKey, (Vec<u8>, u64)>,
}

impl Default for CheckOptions {
    fn default() -> CheckOptions {
        CheckOptions {
            max_steps_per_key: 1_000_000,
            initial: BTreeMap::new(),
        }
    }
}

/// Checks `history` with the default options.
pub fn check(history: &History) -> CheckResult {
    check_records(&history.records(), &CheckOptions::default())
}

/// Checks `history` with explicit options.
pub fn check_with(history: &History, options: &CheckOptions) -> CheckResult {
    check_records(&history.records(), options)
}

/// Checks a list of records (e.g. from [`History::records`]).
pub fn check_records(records: &[Record], options: &CheckOptions) -> CheckResult {
    check_records_inner(records, options, true)
}

/// `symmetry: false` turns off the reduction over interchangeable unknown ops, so tests can
/// compare against the plain search.
fn check_records_inner(records: &[Record], options: &CheckOptions, symmetry: bool) -> CheckResult {
    let mut by_key: BTreeMap<&ItemKey, Vec<&Record>> = BTreeMap::new();
    for r in records {
        by_key.entry(&r.key).or_default().push(r);
    }
    let keys = by_key
        .into_iter()
        .map(|(key, recs)| search::check_key(key, &recs, options, symmetry))
        .collect();
    CheckResult { keys }
}
