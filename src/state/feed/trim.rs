//! Retention: the leader decides from its own state which events go (by time and by bytes per
//! group), and proposes the decision as a checkpoint's trims, so every replica drops exactly the
//! same events (`TxView::trim_feed` at apply). Events a live consumer group has not done are
//! protected up to a longer limit (time and bytes); past it they go too, and the apply expires
//! the groups that had not done them.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use super::{event_key, Meta};
use crate::error::Result;
use crate::limits::FEED_TRIM_EVENTS_MAX;
use crate::state::StateMachine;

/// What the retention planner keeps (the node's `FeedConfig`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Events committed longer ago than this go ...
    pub ms: u64,
    /// ... and while the group holds more bytes of events than this, the oldest go.
    pub bytes: u64,
    /// An event a live consumer group has not done is kept until it is this old ...
    pub protect_ms: u64,
    /// ... unless the group holds more bytes of events than this.
    pub protect_bytes: u64,
}

impl StateMachine {
    /// The trims due now, as `(slot, below)`: events committed at or before `now_ms - r.ms` go,
    /// and while the group holds more than `r.bytes` bytes of events the oldest go too (oldest
    /// first across slots), at most `FEED_TRIM_EVENTS_MAX` in all; an event a live consumer
    /// group of its slot has not done goes only past `r.protect_ms` or `r.protect_bytes` (and
    /// a warning says which slot's groups expire). Reads without the view lock (the decision
    /// names seqs; the apply drops what is still there), so planning never holds up an apply.
    pub fn plan_trims(&self, now_ms: u64, r: Retention) -> Result<Vec<(u32, u64)>> {
        let cutoff = now_ms.saturating_sub(r.ms);
        let protect_cutoff = now_ms.saturating_sub(r.protect_ms);
        let ownership = self.ownership();
        // Per slot with events: its meta and the first seq its live groups still need.
        let mut slots: BTreeMap<u32, (Meta, Option<u64>)> = BTreeMap::new();
        let mut total = 0u64;
        // The oldest event of each slot, by commit time.
        let mut oldest = BinaryHeap::new();
        for slot in (0..self.slot_count).filter(|s| ownership.owns(*s)) {
            let meta = self.feed_meta_of(slot)?;
            if meta.first_seq > meta.last_seq {
                continue;
            }
            total += meta.bytes;
            if let Some(ev) = self.feed_event(slot, meta.first_seq)? {
                oldest.push(Reverse((ev.commit_ts_ms, slot, meta.first_seq)));
                slots.insert(slot, (meta, self.groups_protect(slot)?));
            }
        }
        let mut trims: BTreeMap<u32, u64> = BTreeMap::new();
        let mut budget = FEED_TRIM_EVENTS_MAX;
        while let Some(Reverse((ts, slot, seq))) = oldest.pop() {
            if budget == 0 {
                break;
            }
            let (meta, needed) = slots[&slot];
            let protected = needed.is_some_and(|n| seq >= n);
            let due = if protected {
                ts <= protect_cutoff || total > r.protect_bytes
            } else {
                ts <= cutoff || total > r.bytes
            };
            // The slot's later events are newer and the bytes only go down: none is due either.
            if !due {
                continue;
            }
            let key = event_key(slot, seq);
            let size = self.data.get(&key)?.map_or(0, |raw| raw.len() as u64);
            total = total.saturating_sub(size);
            budget -= 1;
            trims.insert(slot, seq + 1);
            if seq < meta.last_seq {
                if let Some(next) = self.feed_event(slot, seq + 1)? {
                    oldest.push(Reverse((next.commit_ts_ms, slot, seq + 1)));
                }
            }
        }
        for (&slot, &below) in &trims {
            if slots[&slot].1.is_some_and(|n| below > n) {
                tracing::warn!(
                    slot,
                    below,
                    "change-feed retention: events consumer groups have not acked are past the \
                     protection limit (--feed-protect-secs / --feed-protect-bytes) and are \
                     trimmed; those groups are expired in this slot (see describe)"
                );
            }
        }
        Ok(trims.into_iter().collect())
    }
}
