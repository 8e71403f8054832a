//! One slot as a consumer group's dispatcher holds it: the events read and not yet done, per
//! shard key in seq order, which of them may go now, and the done seqs above the committed one
//! (as the slot's replicated group state keeps them: ranges), so the committed seq the
//! dispatcher reports is the one the apply computes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use ordo_proto::v1::ChangeEvent;
use prost::Message;

use super::dispatch::{Done, How, MemberId, Mode, Persist, SlotState};
use crate::limits::{
    FEED_GROUP_HELD_BYTES_PER_SLOT_MAX, FEED_GROUP_HELD_EVENTS_PER_SLOT_MAX,
    FEED_GROUP_HORIZON_AHEAD, FEED_GROUP_INFLIGHT_PER_SLOT_MAX,
};

/// Where one held event is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    /// Goes out with `attempt` once it may (its key's turn, credits, the horizon for a first
    /// delivery).
    Queued { attempt: u32 },
    /// A redelivery whose attempt was asked to be persisted; not sent before it is.
    Persisting { attempt: u32, ready_at: u64 },
    /// A redelivery persisted, waiting for `ready_at` (a nack's delay).
    Delayed { attempt: u32, ready_at: u64 },
    InFlight {
        member: MemberId,
        attempt: u32,
        deadline: u64,
    },
    /// Its `attempt` used up `max_deliver`: its key is parked.
    Parked { attempt: u32 },
    /// Its `attempt` used up `max_deliver` and it goes to the dead letters: done once the ack
    /// flush carrying it is persisted (not before: the key's next event must not overtake it).
    DeadLettering { attempt: u32 },
}

impl State {
    /// The attempt the event is at: the one out, asked for or last failed.
    pub(super) fn attempt(self) -> u32 {
        match self {
            State::Queued { attempt }
            | State::Persisting { attempt, .. }
            | State::Delayed { attempt, .. }
            | State::InFlight { attempt, .. }
            | State::Parked { attempt }
            | State::DeadLettering { attempt } => attempt,
        }
    }

    /// The time it waits for (a lease's end, a delay's), if any: the dispatcher's timer.
    pub(super) fn timer(self) -> Option<u64> {
        match self {
            State::InFlight { deadline, .. } => Some(deadline),
            State::Delayed { ready_at, .. } => Some(ready_at),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(super) struct Entry {
    pub event: ChangeEvent,
    bytes: usize,
    /// The attempt an unpark released it at: `max_deliver` counts the attempts after it.
    pub base: u32,
    pub state: State,
}

/// A persisted attempt of an event not read yet (after a failover or a move).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Count {
    attempt: u32,
    base: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub(super) struct Slot {
    id: u32,
    /// Every event at or below it is done.
    committed: u64,
    /// The log was read through it (events the group's filter leaves out included).
    read_to: u64,
    /// Persisted: events at or below it may be delivered a first time.
    horizon: u64,
    /// The horizon asked to be persisted (at or above `horizon`).
    horizon_asked: u64,
    /// The persisted horizon this dispatcher started from: an earlier leader may have
    /// delivered any event at or below it, so none of them goes out again with an attempt that
    /// leader may have used.
    resumed_horizon: u64,
    counts: BTreeMap<u64, Count>,
    /// Persisted parked events not read yet (after a failover or a move).
    parked_at: BTreeSet<u64>,
    /// The events read and not done, by seq.
    pub entries: BTreeMap<u64, Entry>,
    /// The seqs of `entries` per shard key, ascending: the first is the key's next.
    keys: BTreeMap<Bytes, VecDeque<u64>>,
    pub parked: BTreeSet<Bytes>,
    /// The entries that may be delivered now as far as the slot is concerned.
    ready: BTreeSet<u64>,
    /// Done seqs above `committed`, as `first -> last` ranges that neither touch nor overlap.
    done: BTreeMap<u64, u64>,
    /// Done since the last flush, and filtered-out seq ranges since the last flush.
    flush_done: Vec<Done>,
    flush_skips: Vec<(u64, u64)>,
    held_bytes: usize,
    /// Deliveries in flight per member (a member that vanished stays until its leases end).
    pub holders: BTreeMap<MemberId, u32>,
    /// `SLOT_EXCLUSIVE`: the member leasing the slot.
    pub owner: Option<MemberId>,
    /// `KEY_ORDERED`: events done here whose ack flush is not persisted yet, by seq, with
    /// their keys; a key with one holds its next event back (a failover before the flush would
    /// deliver the earlier event again after the later one).
    unflushed: BTreeMap<u64, Bytes>,
    unflushed_keys: BTreeMap<Bytes, u32>,
}

impl Slot {
    pub(super) fn resume(id: u32, state: SlotState) -> Slot {
        let mut slot = Slot {
            id,
            committed: state.committed,
            read_to: state.committed,
            horizon: state.horizon,
            horizon_asked: state.horizon,
            resumed_horizon: state.horizon,
            counts: state
                .attempts
                .iter()
                .map(|&(seq, attempt, base)| (seq, Count { attempt, base }))
                .collect(),
            entries: BTreeMap::new(),
            keys: BTreeMap::new(),
            parked_at: state.parked.iter().map(|(_, seq)| *seq).collect(),
            parked: state.parked.into_iter().map(|(key, _)| key).collect(),
            ready: BTreeSet::new(),
            done: BTreeMap::new(),
            flush_done: Vec::new(),
            flush_skips: Vec::new(),
            held_bytes: 0,
            holders: BTreeMap::new(),
            owner: None,
            unflushed: BTreeMap::new(),
            unflushed_keys: BTreeMap::new(),
        };
        for (first, last) in state.done {
            slot.insert_done(first, last);
        }
        slot
    }

    /// The log was read through it.
    pub(super) fn read_to(&self) -> u64 {
        self.read_to
    }

    /// How many more events (and bytes) the slot takes, and after which seq: `None` when it
    /// holds its bound already.
    pub(super) fn room(&self) -> Option<(u64, usize, usize)> {
        let events = FEED_GROUP_HELD_EVENTS_PER_SLOT_MAX.checked_sub(self.entries.len())?;
        let bytes = FEED_GROUP_HELD_BYTES_PER_SLOT_MAX.checked_sub(self.held_bytes)?;
        (events > 0 && bytes > 0).then_some((self.read_to, events, bytes))
    }

    /// Takes a page read after `read_to`: its events (ascending, those the group's filter
    /// keeps) and the position it reached. Events at or below the position already held are
    /// ignored (a page read twice).
    pub(super) fn feed(
        &mut self,
        events: Vec<ChangeEvent>,
        read_to: u64,
        mode: Mode,
        out: &mut Vec<Persist>,
    ) {
        for event in events {
            let seq = event.seq;
            if seq <= self.read_to {
                continue;
            }
            self.skip(self.read_to + 1, seq - 1);
            self.read_to = seq;
            if self.is_done(seq) {
                continue;
            }
            self.hold(event, mode, out);
        }
        if read_to > self.read_to {
            self.skip(self.read_to + 1, read_to);
            self.read_to = read_to;
        }
        self.advance();
    }

    fn hold(&mut self, event: ChangeEvent, mode: Mode, out: &mut Vec<Persist>) {
        let seq = event.seq;
        let key = event.shard_key.clone();
        let count = self.counts.remove(&seq);
        let mut base = count.map_or(0, |c| c.base);
        let state = if seq <= self.resumed_horizon {
            let attempt = count.map_or(1, |c| c.attempt);
            if self.parked_at.remove(&seq) {
                State::Parked { attempt }
            } else {
                // A fence, not a delivery: it uses up no attempt of `max_deliver`.
                base += 1;
                out.push(Persist::DeliveryCount {
                    slot: self.id,
                    seq,
                    attempt: attempt + 1,
                    base,
                });
                State::Persisting {
                    attempt: attempt + 1,
                    ready_at: 0,
                }
            }
        } else {
            if seq > self.horizon_asked {
                self.horizon_asked = seq + FEED_GROUP_HORIZON_AHEAD;
                out.push(Persist::Horizon {
                    slot: self.id,
                    seq: self.horizon_asked,
                });
            }
            State::Queued { attempt: 1 }
        };
        if seq > self.resumed_horizon {
            // Read past every event an earlier leader may have delivered.
            self.counts.clear();
            self.parked_at.clear();
        }
        let bytes = event.encoded_len();
        self.held_bytes += bytes;
        self.entries.insert(
            seq,
            Entry {
                event,
                bytes,
                base,
                state,
            },
        );
        let seqs = self.keys.entry(key.clone()).or_default();
        seqs.push_back(seq);
        let head = seqs.len() == 1;
        if self.may_go(seq, head, self.parked.contains(&key), mode) {
            self.ready.insert(seq);
        }
    }

    /// The horizon `seq` was persisted: first deliveries up to it may go.
    pub(super) fn horizon_persisted(&mut self, seq: u64, mode: Mode) {
        if seq <= self.horizon {
            return;
        }
        let from = self.horizon + 1;
        self.horizon = seq;
        let keys: BTreeSet<Bytes> = self
            .entries
            .range(from..=seq)
            .map(|(_, e)| e.event.shard_key.clone())
            .collect();
        for key in keys {
            self.refresh(&key, mode);
        }
    }

    pub(super) fn is_done(&self, seq: u64) -> bool {
        seq <= self.committed
            || self
                .done
                .range(..=seq)
                .next_back()
                .is_some_and(|(_, &last)| last >= seq)
    }

    /// Seqs the group's filter left out: done without a delivery. Only those not done already
    /// go to the flush (after a resume, persisted done ranges cover some of them).
    fn skip(&mut self, first: u64, last: u64) {
        let mut from = first.max(self.committed + 1);
        if from > last {
            return;
        }
        let mut gaps = Vec::new();
        let before = self.done.range(..from).next_back();
        for (&f, &l) in before.into_iter().chain(self.done.range(from..=last)) {
            if f > from {
                gaps.push((from, f - 1));
            }
            from = from.max(l + 1);
        }
        if from <= last {
            gaps.push((from, last));
        }
        for (first, last) in gaps {
            self.insert_done(first, last);
            match self.flush_skips.last_mut() {
                Some((_, l)) if *l + 1 == first => *l = last,
                _ => self.flush_skips.push((first, last)),
            }
        }
    }

    fn insert_done(&mut self, mut first: u64, mut last: u64) {
        if let Some((&f, &l)) = self.done.range(..=first).next_back() {
            if l + 1 >= first {
                first = f;
                last = last.max(l);
            }
        }
        while let Some((&f, &l)) = self.done.range(first..).next() {
            if f > last + 1 {
                break;
            }
            last = last.max(l);
            self.done.remove(&f);
        }
        self.done.insert(first, last);
    }

    /// Moves `committed` over the done ranges that follow it.
    fn advance(&mut self) {
        while let Some((&first, &last)) = self.done.first_key_value() {
            if first > self.committed + 1 {
                break;
            }
            self.committed = self.committed.max(last);
            self.done.remove(&first);
        }
    }

    /// Takes `seq` out of the slot as done. `how`: what the next ack flush records (`None`:
    /// it is persisted already). Returns the entry and its key's next seq, if any.
    pub(super) fn settle(&mut self, seq: u64, how: Option<How>, mode: Mode) -> Option<Entry> {
        let entry = self.entries.remove(&seq);
        if let Some(e) = &entry {
            self.held_bytes -= e.bytes;
            self.ready.remove(&seq);
            let key = &e.event.shard_key;
            if how.is_some() && mode == Mode::KeyOrdered {
                self.unflushed.insert(seq, key.clone());
                *self.unflushed_keys.entry(key.clone()).or_default() += 1;
            }
            if let Some(seqs) = self.keys.get_mut(key) {
                seqs.retain(|s| *s != seq);
                if seqs.is_empty() {
                    self.keys.remove(key);
                } else {
                    let key = key.clone();
                    self.refresh(&key, mode);
                }
            }
            if let Some(how) = how {
                self.flush_done.push(Done {
                    seq,
                    attempt: e.state.attempt(),
                    how,
                });
            }
        }
        if seq > self.read_to {
            // Done before this dispatcher read it (a transactional ack).
            self.counts.remove(&seq);
        }
        self.insert_done(seq, seq);
        self.advance();
        entry
    }

    /// Recomputes which of `key`'s entries may go: `KEY_ORDERED` only its first, and only once
    /// queued; both modes none while the key is parked, and a first delivery only under the
    /// persisted horizon. (Under `KEY_ORDERED` only a first can ever have been ready: a key's
    /// first stays first until it is done.)
    pub(super) fn refresh(&mut self, key: &Bytes, mode: Mode) {
        let Some(seqs) = self.keys.get(key) else {
            return;
        };
        let parked = self.parked.contains(key);
        let look = if mode == Mode::KeyOrdered {
            1
        } else {
            seqs.len()
        };
        let marks: Vec<(u64, bool)> = seqs
            .iter()
            .take(look)
            .enumerate()
            .map(|(i, &seq)| (seq, self.may_go(seq, i == 0, parked, mode)))
            .collect();
        for (seq, ready) in marks {
            if ready {
                self.ready.insert(seq);
            } else {
                self.ready.remove(&seq);
            }
        }
    }

    fn may_go(&self, seq: u64, head: bool, parked: bool, mode: Mode) -> bool {
        let unflushed = || {
            let key = &self.entries[&seq].event.shard_key;
            self.unflushed_keys.contains_key(key)
        };
        !parked
            && (head || mode == Mode::SlotExclusive)
            && !(mode == Mode::KeyOrdered && unflushed())
            && match self.entries[&seq].state {
                State::Queued { attempt } => attempt > 1 || seq <= self.horizon,
                _ => false,
            }
    }

    /// The seqs of `key`'s entries.
    pub(super) fn seqs_of(&self, key: &[u8]) -> Vec<u64> {
        self.keys
            .get(key)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The next event of the slot to deliver, if the slot has one and room in flight.
    pub(super) fn candidate(&self) -> Option<u64> {
        let inflight: u32 = self.holders.values().sum();
        if inflight as usize >= FEED_GROUP_INFLIGHT_PER_SLOT_MAX {
            return None;
        }
        self.ready.first().copied()
    }

    /// How many events could go now with credits: ready, within the slot's in-flight bound.
    pub(super) fn deliverable(&self) -> usize {
        let inflight: u32 = self.holders.values().sum();
        let room = FEED_GROUP_INFLIGHT_PER_SLOT_MAX.saturating_sub(inflight as usize);
        self.ready.len().min(room)
    }

    pub(super) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// `seq` left the ready set (it went out, or its state changed).
    pub(super) fn unready(&mut self, seq: u64) {
        self.ready.remove(&seq);
    }

    /// `seq` used up its attempts and goes to the dead letters with the next ack flush.
    pub(super) fn dead_letter(&mut self, seq: u64, attempt: u32) {
        self.flush_done.push(Done {
            seq,
            attempt,
            how: How::DeadLettered,
        });
    }

    /// An ack flush of these done events was persisted: their keys' next events may go.
    pub(super) fn flushed(&mut self, done: &[Done], mode: Mode) {
        for d in done {
            let Some(key) = self.unflushed.remove(&d.seq) else {
                continue;
            };
            let Some(n) = self.unflushed_keys.get_mut(&key) else {
                continue;
            };
            *n -= 1;
            if *n == 0 {
                self.unflushed_keys.remove(&key);
                self.refresh(&key, mode);
            }
        }
    }

    /// Whether a done event's flush holds its key's next event back (flush now, not at the
    /// next interval).
    pub(super) fn holds_back(&self) -> bool {
        self.unflushed_keys
            .keys()
            .any(|k| self.keys.contains_key(k))
    }

    /// The slot's part of an ack flush, if it has anything new.
    pub(super) fn take_flush(&mut self) -> Option<Persist> {
        if self.flush_done.is_empty() && self.flush_skips.is_empty() {
            return None;
        }
        Some(Persist::AckBatch {
            slot: self.id,
            done: std::mem::take(&mut self.flush_done),
            skips: std::mem::take(&mut self.flush_skips),
        })
    }
}
