//! The feed checker: proves that what watchers of `ordo.v1.Feed` received is the change feed of
//! the writes a test made, and [`Watcher`], which records a watch the way the checker reads it.
//!
//! Input: the writes (for each: item, op, value, and how it ended: applied with its version,
//! certainly not applied, or unknown), the data read back at the end, and one [`Watch`] per
//! watcher (every response with its cursor and `resolved_ts_ms`, and where each new stream
//! resumed). [`check`] reports the first violation of each [`Kind`] with an account naming the
//! item, slot and seq, and how many there were:
//!
//! 1. [`Kind::ItemOrder`]: per item the events are its versions in order. A put makes version
//!    `v + 1` of an item at `v` (0 = absent); a delete (version 0) removes an existing item, and
//!    a later put recreates it at version 1 (the store's rule, as the linearizability model has
//!    it). A delete of an absent item changes nothing, so it has no event; an emit stores
//!    nothing, so it is outside the chain (its version is 0).
//! 2. [`Kind::Writes`]: every acknowledged write covered by the watch (answered at or before its
//!    last `resolved_ts_ms`) appears exactly once, with the acknowledged version; an unknown one
//!    at most once; a failed one never; no event comes from a write the test did not make. A
//!    watch that covers the whole run (resolved past [`Expected::settled_ms`]) also leaves every
//!    item as the final data shows it. Puts and emits are told apart by value (one item's put
//!    values must differ: a test writes unique values); deletes, which carry none, by count.
//! 3. [`Kind::SlotSeq`]: per slot the seqs are contiguous and never repeat within one watch
//!    (starting at 1 when the watch began with the cluster, [`Start::Empty`]).
//! 4. [`Kind::Txn`]: the events of one transaction (writes sharing a [`TxnLabel`]) carry one
//!    txn id, non-empty when it spans groups, borne by no other write; they are delivered all
//!    or none; an aborted transaction emits nothing.
//! 5. [`Kind::Watermark`]: no event arrives with `commit_ts_ms` at or below a `resolved_ts_ms`
//!    already sent in the watch; resolved never goes back within a stream; a slot's commit times
//!    never go back.
//! 6. [`Kind::Resume`]: exactly once per cursor. A stream resumed from an older cursor than the
//!    last one (on purpose: [`Resume::after`]) must deliver, per slot, exactly what followed that
//!    cursor, then go on; [`check_resume`] does the same for a second watch started from a
//!    cursor of the first. Redeliveries are deduplicated by `(slot, seq)` only there.
//!
//! Checks 2 and 4 need the watch to have started with the cluster ([`Start::Empty`]: from the
//! oldest event of a fresh cluster, nothing trimmed); a [`Start::Midway`] watch gets 1, 3, 5, 6.
//! Watches are unfiltered (no shard keys, no prefix): a filtered stream skips seqs.
//! `OP_SNAPSHOT` events are not checked (reported as [`Kind::Invalid`]).
//!
//! Cost: one pass over the events with hash maps; 100k events check in well under a second.

#[cfg(test)]
mod model_tests;
mod report;
mod stream;
#[cfg(test)]
mod tests;
mod watcher;
#[cfg(test)]
mod watcher_tests;
mod writes;

use std::collections::BTreeMap;

use ordo_proto::v1::WatchResponse;

use crate::linearizability::{Completion, History, ItemKey, Op, Output, Record};

pub use report::{FeedReport, Kind, Stats, Violation};
pub use watcher::{Watcher, WatcherFailed, WatcherOptions};

/// An item as `(shard key, key)` borrowed from an event or a write, for the checks' maps.
type ItemRef<'a> = (&'a [u8], &'a [u8]);

/// What a write did to the feed's item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    Put {
        value: Vec<u8>,
    },
    Delete,
    /// `TxnOp.emit`: an event with no stored item.
    Emit {
        value: Vec<u8>,
    },
}

impl WriteOp {
    /// The value a put or emit wrote (a delete has none).
    pub fn value(&self) -> Option<&[u8]> {
        match self {
            WriteOp::Put { value } | WriteOp::Emit { value } => Some(value),
            WriteOp::Delete => None,
        }
    }
}

/// How a write ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged as applied: `version` is the item's version after it (0 for a delete or an
    /// emit), `acked_ms` when the answer arrived (wall clock, ms since the Unix epoch; the
    /// change was committed before it).
    Applied { version: u64, acked_ms: u64 },
    /// Certainly not applied (refused, or its condition failed): it has no event.
    NotApplied,
    /// May have been applied once, or not at all.
    Unknown,
}

/// The transaction a write belongs to, as the test names it: the writes of one `Txn` share it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnLabel {
    pub id: u64,
    /// Its shard keys span groups (two-phase commit): its events must carry a txn id.
    pub cross_group: bool,
}

/// One write the test made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub item: ItemKey,
    pub op: WriteOp,
    pub outcome: Outcome,
    pub txn: Option<TxnLabel>,
}

/// What the feed must show: the writes and the data read back once they had all ended.
#[derive(Clone, Debug, Default)]
pub struct Expected {
    pub writes: Vec<Write>,
    /// The final data (`None`: absent), for the items the test read back.
    pub final_data: BTreeMap<ItemKey, Option<(Vec<u8>, u64)>>,
    /// Wall-clock ms by which every write had ended and the final data was read: a watch whose
    /// resolved time reached it has delivered everything.
    pub settled_ms: u64,
}

impl Expected {
    /// The writes of a linearizability history (its reads are left out), with final data
    /// `finals` (as the final reads' outputs) read by `settled_ms`.
    pub fn from_history(
        history: &History,
        finals: &BTreeMap<ItemKey, Output>,
        settled_ms: u64,
    ) -> Expected {
        let writes = history
            .records()
            .iter()
            .filter_map(|r| write_of(history, r))
            .collect();
        let final_data = finals
            .iter()
            .map(|(k, out)| {
                let state = match out {
                    Output::Get {
                        found: true,
                        value,
                        version,
                    } => Some((value.clone(), *version)),
                    _ => None,
                };
                (k.clone(), state)
            })
            .collect();
        Expected {
            writes,
            final_data,
            settled_ms,
        }
    }
}

/// The feed's view of a recorded write: a put or delete that succeeded is applied (a delete that
/// found nothing changed nothing, so it is not); one whose condition failed, or that failed
/// certainly not applied, is not; the rest is unknown.
fn write_of(history: &History, r: &Record) -> Option<Write> {
    let op = match &r.op {
        Op::Get => return None,
        Op::Put { value, .. } => WriteOp::Put {
            value: value.clone(),
        },
        Op::Delete { .. } => WriteOp::Delete,
    };
    let acked_ms = history.unix_ms(r.ret.unwrap_or_default());
    let outcome = match &r.completion {
        Some(Completion::Ok(Output::Put {
            succeeded: true,
            version,
        })) => Outcome::Applied {
            version: *version,
            acked_ms,
        },
        Some(Completion::Ok(Output::Delete {
            succeeded: true,
            existed: true,
            ..
        })) => Outcome::Applied {
            version: 0,
            acked_ms,
        },
        Some(Completion::Ok(_)) | Some(Completion::Fail) => Outcome::NotApplied,
        Some(Completion::Unknown) | None => Outcome::Unknown,
    };
    Some(Write {
        item: r.key.clone(),
        op,
        outcome,
        txn: None,
    })
}

/// Where a watch began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// With the cluster: from the oldest event of a cluster nothing was written to before and
    /// nothing was trimmed from, so every slot's first event is seq 1 and every item starts
    /// absent.
    Empty,
    /// Anywhere else (from now, a time, a cursor of another run): a slot's and an item's first
    /// event may be any.
    Midway,
}

/// A response as a watcher received it.
#[derive(Clone, Debug, PartialEq)]
pub struct Received {
    /// Wall clock, ms since the Unix epoch.
    pub at_ms: u64,
    pub response: WatchResponse,
}

/// A new stream of a watch: its first response is `responses[first]`, and it was asked to
/// resume after the cursor of `responses[after]` (`None`: the watch's start again). A watcher
/// that reconnects resumes after the last response it had; an older one is a rewind, and the
/// stream must then deliver again exactly what followed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    pub first: usize,
    pub after: Option<usize>,
}

/// Everything one watcher received, in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Watch {
    /// Named in reports.
    pub name: String,
    pub start: Start,
    pub responses: Vec<Received>,
    /// In order of `first`.
    pub resumes: Vec<Resume>,
}

impl Watch {
    /// An empty watch, to push responses into.
    pub fn new(name: impl Into<String>, start: Start) -> Watch {
        Watch {
            name: name.into(),
            start,
            responses: Vec::new(),
            resumes: Vec::new(),
        }
    }

    /// Events received (redeliveries included).
    pub fn events(&self) -> usize {
        self.responses.iter().map(|r| r.response.events.len()).sum()
    }

    /// The highest `resolved_ts_ms` received (0 if none).
    pub fn resolved_ms(&self) -> u64 {
        self.responses
            .iter()
            .map(|r| r.response.resolved_ts_ms)
            .max()
            .unwrap_or(0)
    }
}

/// Checks every watch against `expected` (checks 1–6, see the module).
pub fn check(expected: &Expected, watches: &[Watch]) -> FeedReport {
    let mut report = FeedReport::default();
    let index = writes::Index::new(expected, &mut report);
    for watch in watches {
        let delivered = stream::check(watch, &mut report);
        if watch.start == Start::Empty {
            writes::check(expected, &index, watch, &delivered, &mut report);
        } else {
            report.stats.midway_watches += 1;
        }
    }
    report
}

/// Exactly once per cursor across two watches: `second` was started from the cursor of
/// `first.responses[after]`, and must deliver per slot exactly what `first` delivered after it
/// (as far as either went; what one claims to have covered by its resolved time, the other may
/// not lack), then go on with no gap. Checks 1, 3, 5 and 6 over the two as one watch.
pub fn check_resume(first: &Watch, after: usize, second: &Watch) -> FeedReport {
    let mut joined = first.clone();
    joined.name = format!("{} resumed as {}", first.name, second.name);
    let offset = joined.responses.len();
    joined.resumes.push(Resume {
        first: offset,
        after: Some(after),
    });
    joined.responses.extend(second.responses.iter().cloned());
    joined.resumes.extend(second.resumes.iter().map(|r| Resume {
        first: r.first + offset,
        // Its own start again is the cursor it started from.
        after: Some(r.after.map_or(after, |a| a + offset)),
    }));
    let mut report = FeedReport::default();
    stream::check(&joined, &mut report);
    report
}
