//! What a change-feed reader checks before it reads a slot: the last seq of every slot's log as
//! the last apply left it, and an epoch that moves whenever ownership, a migration's fence or the
//! whole state (a snapshot) changes. A page then reads only the slots with something new
//! (`StateMachine::feed_page` with `Slots::Changed`), instead of every watched slot's meta record
//! on every apply: a reader costs the writers per event, not per watched slot.
//!
//! Both are written under the view's write lock (after the apply's transaction commits) and read
//! under its read lock, so a reader sees them agree with the data.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{meta_key, Meta};
use crate::error::Result;

pub(in crate::state) struct Tips {
    last: Box<[AtomicU64]>,
    epoch: AtomicU64,
}

impl Tips {
    /// The tips of what `data` holds.
    pub(in crate::state) fn load(data: &sled::Tree, slot_count: u32) -> Result<Tips> {
        let tips = Tips {
            last: (0..slot_count).map(|_| AtomicU64::new(0)).collect(),
            epoch: AtomicU64::new(0),
        };
        tips.reload(data, 0..slot_count)?;
        Ok(tips)
    }

    /// Reads the tips of `slots` again (a snapshot replaced the data, or they came in with a
    /// move, whose copy wrote their logs without an apply) and moves the epoch.
    pub(in crate::state) fn reload(
        &self,
        data: &sled::Tree,
        slots: impl IntoIterator<Item = u32>,
    ) -> Result<()> {
        for slot in slots {
            let key = meta_key(slot);
            let last = match data.get(&key)? {
                Some(raw) => Meta::decode(&key, &raw)?.last_seq,
                None => 0,
            };
            self.set(slot, last);
        }
        self.bump();
        Ok(())
    }

    /// `slot`'s log now ends at `last_seq`.
    pub(in crate::state) fn set(&self, slot: u32, last_seq: u64) {
        if let Some(tip) = self.last.get(slot as usize) {
            tip.store(last_seq, Ordering::Release);
        }
    }

    /// Ownership or a fence changed: every reader reads each of its slots again.
    pub(in crate::state) fn bump(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    pub(in crate::state) fn last(&self, slot: u32) -> u64 {
        self.last
            .get(slot as usize)
            .map_or(0, |t| t.load(Ordering::Acquire))
    }

    pub(in crate::state) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }
}
