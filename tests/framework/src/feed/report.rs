//! What a feed check says: per kind of violation, how many and an account of the first.

use std::collections::BTreeMap;
use std::fmt;

use ordo_proto::v1::change_event::Op as EventOp;
use ordo_proto::v1::ChangeEvent;

use crate::linearizability::Bytes;

/// The kinds of violation, one per check (see the module).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// 1: an item's events are not its versions in order.
    ItemOrder,
    /// 2: an acknowledged write missing, wrong or twice, an unknown one twice, a failed one or
    /// one the test never made delivered, or the feed disagreeing with the final data.
    Writes,
    /// 3: a slot's seqs skip or repeat within a watch.
    SlotSeq,
    /// 4: a transaction's events split, under several ids, or from an aborted transaction.
    Txn,
    /// 5: an event at or below a resolved time already sent, or resolved going back.
    Watermark,
    /// 6: a resumed stream that is not exactly what followed its cursor.
    Resume,
    /// The input cannot be checked as given (two puts of one value to an item, a resume out of
    /// order, an event the checker does not model).
    Invalid,
}

/// The first violation of a kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kind: Kind,
    /// The watch it was seen in (empty for the input itself).
    pub watch: String,
    pub account: String,
}

/// Figures of a check, to print beside the verdict.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub watches: u64,
    pub responses: u64,
    /// Events delivered for the first time in their watch.
    pub events: u64,
    /// Events delivered again after a rewind (checked equal to the first delivery).
    pub redelivered: u64,
    /// New streams of a watch (reconnects and rewinds).
    pub resumes: u64,
    /// Acknowledged writes each watch covered and found exactly once (summed over watches).
    pub acked_found: u64,
    /// Unknown writes that did / did not appear (summed over watches).
    pub unknown_appeared: u64,
    pub unknown_absent: u64,
    /// Watches that covered the whole run (checked against the final data).
    pub complete_watches: u64,
    /// Watches not started with the cluster (checks 2 and 4 do not apply).
    pub midway_watches: u64,
}

/// The result of a check.
#[derive(Clone, Debug, Default)]
pub struct FeedReport {
    /// The first violation of each kind.
    pub first: BTreeMap<Kind, Violation>,
    /// Violations per kind.
    pub counts: BTreeMap<Kind, u64>,
    pub stats: Stats,
}

impl FeedReport {
    /// No violation of any kind.
    pub fn is_ok(&self) -> bool {
        self.counts.is_empty()
    }

    /// Violations of `kind`.
    pub fn count(&self, kind: Kind) -> u64 {
        self.counts.get(&kind).copied().unwrap_or(0)
    }

    /// The account of the first violation of `kind`, if any.
    pub fn account(&self, kind: Kind) -> Option<&str> {
        self.first.get(&kind).map(|v| v.account.as_str())
    }

    /// Panics with the report unless there is no violation.
    #[track_caller]
    pub fn assert_ok(&self) {
        if !self.is_ok() {
            panic!("the feed is not the history's\n{self}");
        }
    }

    /// Records a violation; `account` is only built for the first of its kind, so a broken run
    /// with many violations costs no more than a good one.
    pub(super) fn violation(&mut self, kind: Kind, watch: &str, account: impl FnOnce() -> String) {
        *self.counts.entry(kind).or_default() += 1;
        self.first.entry(kind).or_insert_with(|| Violation {
            kind,
            watch: watch.to_string(),
            account: account(),
        });
    }
}

impl fmt::Display for FeedReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        writeln!(
            f,
            "feed check: {}; {} watches ({} complete, {} midway), {} responses, {} events \
             (+{} redelivered), {} resumes; {} acknowledged writes found once, unknown writes \
             {} appeared / {} absent",
            if self.is_ok() { "OK" } else { "VIOLATED" },
            s.watches,
            s.complete_watches,
            s.midway_watches,
            s.responses,
            s.events,
            s.redelivered,
            s.resumes,
            s.acked_found,
            s.unknown_appeared,
            s.unknown_absent,
        )?;
        for (kind, v) in &self.first {
            writeln!(
                f,
                "  {kind:?}: {} violation(s); first, in watch {:?}: {}",
                self.count(*kind),
                v.watch,
                v.account
            )?;
        }
        Ok(())
    }
}

/// An event as reports show it: `slot 7 seq 12 PUT ("order-3", "") v4 "c1-9" ts 1700…`.
pub(super) struct EventText<'a>(pub(super) &'a ChangeEvent);

impl fmt::Display for EventText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = self.0;
        let op = match EventOp::try_from(e.op) {
            Ok(EventOp::Put) => "PUT",
            Ok(EventOp::Delete) => "DELETE",
            Ok(EventOp::Emit) => "EMIT",
            Ok(EventOp::Snapshot) => "SNAPSHOT",
            Err(_) => "OP?",
        };
        write!(
            f,
            "slot {} seq {} {op} ({}, {}) v{}",
            e.slot,
            e.seq,
            Bytes(&e.shard_key),
            Bytes(&e.key),
            e.version
        )?;
        if !e.value.is_empty() {
            write!(f, " {}", Bytes(&e.value))?;
        }
        write!(f, " ts {}", e.commit_ts_ms)?;
        if !e.txn_id.is_empty() {
            write!(f, " txn {}", Bytes(&e.txn_id))?;
        }
        Ok(())
    }
}
