//! Retention: the leader decides from its own state which events go (by time and by bytes per
//! group), and proposes the decision as a checkpoint's trims, so every replica drops exactly the
//! same events (`TxView::trim_feed` at apply).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use super::{event_key, Meta};
use crate::error::Result;
use crate::limits::FEED_TRIM_EVENTS_MAX;
use crate::state::StateMachine;

impl StateMachine {
    /// The trims due now, as `(slot, below)`: events committed at or before `now_ms -
    /// retention_ms` go, and while the group holds more than `bytes_max` bytes of events the
    /// oldest go too (oldest first across slots), at most `FEED_TRIM_EVENTS_MAX` in all. Reads
    /// without the view lock (the decision names seqs; the apply drops what is still there), so
    /// planning never holds up an apply.
    pub fn plan_trims(
        &self,
        now_ms: u64,
        retention_ms: u64,
        bytes_max: u64,
    ) -> Result<Vec<(u32, u64)>> {
        let cutoff = now_ms.saturating_sub(retention_ms);
        let ownership = self.ownership();
        let mut metas: BTreeMap<u32, Meta> = BTreeMap::new();
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
                metas.insert(slot, meta);
            }
        }
        let mut trims: BTreeMap<u32, u64> = BTreeMap::new();
        let mut budget = FEED_TRIM_EVENTS_MAX;
        while let Some(Reverse((ts, slot, seq))) = oldest.pop() {
            if budget == 0 || (ts > cutoff && total <= bytes_max) {
                break;
            }
            let key = event_key(slot, seq);
            let size = self.data.get(&key)?.map_or(0, |raw| raw.len() as u64);
            total = total.saturating_sub(size);
            budget -= 1;
            trims.insert(slot, seq + 1);
            if seq < metas[&slot].last_seq {
                if let Some(next) = self.feed_event(slot, seq + 1)? {
                    oldest.push(Reverse((next.commit_ts_ms, slot, seq + 1)));
                }
            }
        }
        Ok(trims.into_iter().collect())
    }
}
