//! What apply runs remember of each slot between them (issue 15): a value per slot, derived from
//! the slot's records, so that the next run need not read them again. Only an apply run fills
//! it, once its transaction committed; everything else that writes a slot's records (ownership
//! changes, migrations, snapshot installs) forgets all of it (`StateMachine::forget_hints`). A
//! memo only spares reads: every outcome is the same with or without it (the proptest
//! `m9_hints_change_no_outcome`). At most one value per slot, so bounded by the slot count.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

pub(super) struct SlotMemo<T>(Mutex<HashMap<u32, T>>);

impl<T> Default for SlotMemo<T> {
    fn default() -> Self {
        SlotMemo(Mutex::new(HashMap::new()))
    }
}

impl<T: Copy> SlotMemo<T> {
    pub(super) fn clear(&self) {
        self.lock().clear();
    }

    /// Records what a committed run left.
    pub(super) fn extend<'a>(&self, values: impl IntoIterator<Item = (&'a u32, &'a T)>)
    where
        T: 'a,
    {
        self.lock()
            .extend(values.into_iter().map(|(s, v)| (*s, *v)));
    }

    pub(super) fn get(&self, slot: u32) -> Option<T> {
        self.lock().get(&slot).copied()
    }

    /// The memo, held for several lookups in a row.
    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<u32, T>> {
        self.0.lock().unwrap()
    }
}
