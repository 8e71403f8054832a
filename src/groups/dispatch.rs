//! The dispatcher of one consumer group on its shard group's leader (research 9.4, issue 14),
//! over the slots the leader owns: pure and deterministic, with no I/O and no clock of its own.
//! The caller feeds it pages of the feed (`wants`, then `feed`), members' actions and the time,
//! and gets back what to send (`poll`) and what to persist (`take_persist`, once per ack flush
//! interval, 50 ms in the design; `persisted` once applied). The time is the caller's clock in
//! ms (one leader's, so a monotonic one does). In-flight deliveries live only here: a new
//! leader builds its dispatcher from the persisted state and delivers again, with new attempts,
//! everything not done above the committed seq.
//!
//! Attempts are durable before use: a redelivery first asks to persist its attempt and goes
//! out only once `persisted` confirms it; a first delivery (attempt 1, which writes nothing)
//! only of an event at or below the slot's persisted *horizon*, so a later leader knows which
//! events may have gone out as attempt 1 and fences them with a higher attempt.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound::{Excluded, Unbounded};

use bytes::Bytes;
use ordo_proto::v1::ChangeEvent;

use super::slot::{Slot, State};
use crate::error::hex;
use crate::limits::{
    FEED_GROUP_ACK_WAIT_BACKOFF_MAX_MS, FEED_GROUP_CREDITS_MAX, FEED_GROUP_MEMBERS_MAX,
    FEED_GROUP_NACK_DELAY_MS_MAX,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// At most one event of any shard key in flight across all members; a key's next event
    /// only once the previous is done.
    KeyOrdered,
    /// Each member leases whole slots (balanced over the members) and gets their events in
    /// seq order, several in flight.
    SlotExclusive,
}

/// What happens to an event after `max_deliver` attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poison {
    /// Its shard key is parked: the key's later events wait, the others flow, until `unpark`.
    Park,
    /// It is done as dead-lettered (the apply writes it under its shard key) and its key's next
    /// event follows.
    DeadLetter,
}

/// A group's definition, as far as dispatching goes (defaults filled in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub mode: Mode,
    pub ack_wait_ms: u64,
    /// At least 1 (0 is taken as 1).
    pub max_deliver: u32,
    pub poison: Poison,
}

/// A slot's persisted group state, to resume from (failover, a slot moved in).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotState {
    /// Every event at or below it is done.
    pub committed: u64,
    /// Done seqs above `committed`, as `(first, last)` ranges.
    pub done: Vec<(u64, u64)>,
    /// Persisted attempts of events above `committed`: `(seq, attempt, unparked_at)`, where
    /// `unparked_at` is the attempt an unpark released the event at (0 if none).
    pub attempts: Vec<(u64, u32, u32)>,
    /// Parked events, as `(shard_key, seq)`: their keys are parked.
    pub parked: Vec<(Bytes, u64)>,
    /// Events at or below it may have been delivered a first time (see the module's doc).
    pub horizon: u64,
}

/// A member's handle, unique for the dispatcher's life: a member that joins again under its
/// name is a new member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemberId(u64);

/// A read the dispatcher wants: events of `slot` after `after_seq`, at most `events_max` of
/// them and `bytes_max` bytes (a page always holds at least one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    pub slot: u32,
    pub after_seq: u64,
    pub events_max: usize,
    pub bytes_max: usize,
}

/// An event to send to a member, with its attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    pub member: MemberId,
    pub event: ChangeEvent,
    pub attempt: u32,
}

/// How an event was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    Acked,
    Termed,
    DeadLettered,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    pub seq: u64,
    /// The attempt that was done (the apply checks it is the current one).
    pub attempt: u32,
    pub how: How,
}

/// What the caller must persist (a replicated command each, in the order given) and, for
/// `DeliveryCount`, `Horizon` and an `AckBatch` with a dead letter, confirm with `persisted`.
#[derive(Clone, Debug, PartialEq)]
pub enum Persist {
    /// Events done since the last flush, and the seqs the group's filter left out (done
    /// without a delivery): the committed seq moves over contiguous done seqs.
    AckBatch {
        slot: u32,
        done: Vec<Done>,
        skips: Vec<(u64, u64)>,
    },
    /// A redelivery's attempt, before it is sent. Attempts up to `base` do not count toward
    /// `max_deliver` (those before an unpark, and one per leader that fenced the event: a fence
    /// is not a delivery).
    DeliveryCount {
        slot: u32,
        seq: u64,
        attempt: u32,
        base: u32,
    },
    /// Events up to `seq` may be delivered a first time.
    Horizon { slot: u32, seq: u64 },
    /// `shard_key` is parked at its event `seq` (under `SLOT_EXCLUSIVE` several of a key's
    /// events in flight together may each use up their attempts: one each).
    Park {
        slot: u32,
        shard_key: Bytes,
        seq: u64,
    },
    /// `shard_key` is released: its parked events' attempts count from their current values.
    Unpark { slot: u32, shard_key: Bytes },
}

impl Persist {
    pub fn slot(&self) -> u32 {
        match self {
            Persist::AckBatch { slot, .. }
            | Persist::DeliveryCount { slot, .. }
            | Persist::Horizon { slot, .. }
            | Persist::Park { slot, .. }
            | Persist::Unpark { slot, .. } => *slot,
        }
    }
}

/// A member's action refused: it changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `STALE_DELIVERY`: the attempt named is not the event's delivery in flight (it was
    /// superseded, it failed, or it never went out).
    #[error("slot {slot} seq {seq}: attempt {attempt} is not the delivery in flight (in flight: attempt {current_attempt}, 0 for none); nothing changed")]
    StaleDelivery {
        slot: u32,
        seq: u64,
        attempt: u32,
        /// The attempt in flight, 0 if none.
        current_attempt: u32,
    },
    #[error("slot {slot} is not dispatched by this leader (not owned, or moved away)")]
    SlotNotHere { slot: u32 },
    #[error("member {0:?} is not in the group (it left, vanished or was replaced)")]
    UnknownMember(MemberId),
    #[error("the group already has FEED_GROUP_MEMBERS_MAX = {max} members on this leader")]
    TooManyMembers { max: usize },
    #[error("{credits} credits is over FEED_GROUP_CREDITS_MAX = {max}")]
    CreditsOverLimit { credits: u64, max: u32 },
    #[error("a nack delay of {delay_ms} ms is over FEED_GROUP_NACK_DELAY_MS_MAX = {max} ms")]
    NackDelayOverLimit { delay_ms: u64, max: u64 },
    #[error("shard key {} is not parked in slot {slot}", hex(.shard_key))]
    NotParked { slot: u32, shard_key: Bytes },
}

/// How long attempt `attempt` of an event may stay unacked: `ack_wait` doubled for each
/// attempt after the first since its unpark (`base`), up to
/// `max(ack_wait, FEED_GROUP_ACK_WAIT_BACKOFF_MAX_MS)`: NATS-like backoff, an event that keeps
/// failing is retried less and less often.
pub fn lease_ms(ack_wait_ms: u64, attempt: u32, base: u32) -> u64 {
    let doublings = attempt.saturating_sub(base).max(1) - 1;
    let grown = ack_wait_ms.saturating_mul(1u64 << doublings.min(32));
    grown.min(ack_wait_ms.max(FEED_GROUP_ACK_WAIT_BACKOFF_MAX_MS))
}

#[derive(Clone, Debug, PartialEq)]
struct Member {
    name: String,
    /// Deliveries it may still get.
    credits: u32,
    /// Its deliveries in flight, as `(slot, seq)`.
    held: BTreeSet<(u32, u64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Dispatcher {
    config: Config,
    slots: BTreeMap<u32, Slot>,
    members: BTreeMap<MemberId, Member>,
    next_member: u64,
    /// `(at, slot, seq)`: one per entry with a lease or a delay running.
    timers: BTreeSet<(u64, u32, u64)>,
    outbox: Vec<Persist>,
    /// Where the round-robins over members and slots left off.
    last_member: Option<MemberId>,
    last_slot: Option<u32>,
}

impl Dispatcher {
    /// A dispatcher over `slots`, each resumed from its persisted state.
    pub fn new(config: Config, slots: impl IntoIterator<Item = (u32, SlotState)>) -> Dispatcher {
        Dispatcher {
            config,
            slots: slots
                .into_iter()
                .map(|(id, state)| (id, Slot::resume(id, state)))
                .collect(),
            members: BTreeMap::new(),
            next_member: 1,
            timers: BTreeSet::new(),
            outbox: Vec::new(),
            last_member: None,
            last_slot: None,
        }
    }

    /// A slot came in (a move, or ownership learnt): resumed from its persisted state.
    pub fn add_slot(&mut self, slot: u32, state: SlotState) {
        self.remove_slot(slot);
        self.slots.insert(slot, Slot::resume(slot, state));
        self.rebalance();
    }

    /// A slot went (moved away): its deliveries in flight are dropped, not done, and what it
    /// had to persist is forgotten (its new owner delivers again what is not done).
    pub fn remove_slot(&mut self, slot: u32) {
        let Some(s) = self.slots.remove(&slot) else {
            return;
        };
        for (&seq, e) in &s.entries {
            if let Some(at) = e.state.timer() {
                self.timers.remove(&(at, slot, seq));
            }
            if let State::InFlight { member, .. } = e.state {
                if let Some(m) = self.members.get_mut(&member) {
                    m.held.remove(&(slot, seq));
                }
            }
        }
        self.outbox.retain(|p| p.slot() != slot);
        self.rebalance();
    }

    /// The reads the dispatcher wants now: one per slot with room for more events.
    pub fn wants(&self) -> Vec<Want> {
        self.wants_if(|_, _| true)
    }

    /// The reads it wants of the slots where `worth(slot, after_seq)` (say, the slot's log goes
    /// past `after_seq`).
    pub fn wants_if(&self, worth: impl Fn(u32, u64) -> bool) -> Vec<Want> {
        self.slots
            .iter()
            .filter(|(&slot, s)| worth(slot, s.read_to()))
            .filter_map(|(&slot, s)| {
                let (after_seq, events_max, bytes_max) = s.room()?;
                Some(Want {
                    slot,
                    after_seq,
                    events_max,
                    bytes_max,
                })
            })
            .collect()
    }

    /// A page of `slot`'s feed (the events the group's filter keeps, ascending) and the
    /// position it reached. A slot not dispatched here is ignored (it moved since the read).
    pub fn feed(&mut self, slot: u32, events: Vec<ChangeEvent>, read_to: u64) {
        if let Some(s) = self.slots.get_mut(&slot) {
            s.feed(events, read_to, self.config.mode, &mut self.outbox);
        }
    }

    /// A member joins with `credits` deliveries it may get. One of the same name is replaced:
    /// the old one vanishes (its leases run out, as it may still be working).
    pub fn join(&mut self, name: &str, credits: u32) -> Result<MemberId, Refusal> {
        if credits > FEED_GROUP_CREDITS_MAX {
            return Err(Refusal::CreditsOverLimit {
                credits: credits.into(),
                max: FEED_GROUP_CREDITS_MAX,
            });
        }
        let replaced = self.members.iter().find(|(_, m)| m.name == name);
        let replaced = replaced.map(|(&id, _)| id);
        if replaced.is_none() && self.members.len() >= FEED_GROUP_MEMBERS_MAX {
            return Err(Refusal::TooManyMembers {
                max: FEED_GROUP_MEMBERS_MAX,
            });
        }
        if let Some(old) = replaced {
            self.members.remove(&old);
        }
        let id = MemberId(self.next_member);
        self.next_member += 1;
        let member = Member {
            name: name.to_string(),
            credits,
            held: BTreeSet::new(),
        };
        self.members.insert(id, member);
        self.rebalance();
        Ok(id)
    }

    /// `credits` more deliveries for `member` (added to what it has left).
    pub fn credit(&mut self, member: MemberId, credits: u32) -> Result<(), Refusal> {
        let m = self
            .members
            .get_mut(&member)
            .ok_or(Refusal::UnknownMember(member))?;
        let total = u64::from(m.credits) + u64::from(credits);
        if total > u64::from(FEED_GROUP_CREDITS_MAX) {
            return Err(Refusal::CreditsOverLimit {
                credits: total,
                max: FEED_GROUP_CREDITS_MAX,
            });
        }
        m.credits = total as u32;
        Ok(())
    }

    /// A member closed its stream: its deliveries in flight are handed on at once.
    pub fn leave(&mut self, member: MemberId) -> Result<(), Refusal> {
        let m = self
            .members
            .remove(&member)
            .ok_or(Refusal::UnknownMember(member))?;
        for (slot, seq) in m.held {
            self.fail(slot, seq, 0);
        }
        self.rebalance();
        Ok(())
    }

    /// A member's stream broke: it gets nothing more, and its deliveries in flight go again
    /// only when their leases end (it may still be working on them).
    pub fn vanish(&mut self, member: MemberId) -> Result<(), Refusal> {
        self.members
            .remove(&member)
            .ok_or(Refusal::UnknownMember(member))?;
        self.rebalance();
        Ok(())
    }

    /// The delivery was handled. Idempotent for an event already done.
    pub fn ack(&mut self, slot: u32, seq: u64, attempt: u32) -> Result<(), Refusal> {
        self.finish(slot, seq, attempt, How::Acked)
    }

    /// Give the event up: done, not delivered again.
    pub fn term(&mut self, slot: u32, seq: u64, attempt: u32) -> Result<(), Refusal> {
        self.finish(slot, seq, attempt, How::Termed)
    }

    /// The delivery failed: deliver the event again (with a new attempt) after `delay_ms`.
    pub fn nack(
        &mut self,
        slot: u32,
        seq: u64,
        attempt: u32,
        delay_ms: u64,
        now: u64,
    ) -> Result<(), Refusal> {
        if delay_ms > FEED_GROUP_NACK_DELAY_MS_MAX {
            return Err(Refusal::NackDelayOverLimit {
                delay_ms,
                max: FEED_GROUP_NACK_DELAY_MS_MAX,
            });
        }
        if self.current(slot, seq, attempt)?.is_some() {
            self.fail(slot, seq, now + delay_ms);
        }
        Ok(())
    }

    /// The member is still working on the delivery: its lease starts again.
    pub fn in_progress(
        &mut self,
        slot: u32,
        seq: u64,
        attempt: u32,
        now: u64,
    ) -> Result<(), Refusal> {
        let Some(old) = self.current(slot, seq, attempt)? else {
            return Ok(());
        };
        let ack_wait_ms = self.config.ack_wait_ms;
        let Some(e) = self
            .slots
            .get_mut(&slot)
            .and_then(|s| s.entries.get_mut(&seq))
        else {
            return Ok(());
        };
        let new = now + lease_ms(ack_wait_ms, attempt, e.base);
        if let State::InFlight { deadline, .. } = &mut e.state {
            *deadline = new;
        }
        self.timers.remove(&(old, slot, seq));
        self.timers.insert((new, slot, seq));
        Ok(())
    }

    /// A transactional ack of the event was applied (checked against its attempt there): it is
    /// done, whatever this dispatcher thought of the attempt.
    pub fn txn_acked(&mut self, slot: u32, seq: u64) {
        self.settle(slot, seq, None);
    }

    /// Release a parked shard key: its parked event goes again with a new attempt (and
    /// `max_deliver` more), then its later events in sequence.
    pub fn unpark(&mut self, slot: u32, shard_key: &[u8]) -> Result<(), Refusal> {
        let s = self
            .slots
            .get_mut(&slot)
            .ok_or(Refusal::SlotNotHere { slot })?;
        let key = Bytes::copy_from_slice(shard_key);
        if !s.parked.remove(&key) {
            return Err(Refusal::NotParked {
                slot,
                shard_key: key,
            });
        }
        self.outbox.push(Persist::Unpark {
            slot,
            shard_key: key.clone(),
        });
        for seq in s.seqs_of(&key) {
            let Some(e) = s.entries.get_mut(&seq) else {
                continue;
            };
            if let State::Parked { attempt } = e.state {
                e.base = attempt;
                e.state = State::Persisting {
                    attempt: attempt + 1,
                    ready_at: 0,
                };
                self.outbox.push(Persist::DeliveryCount {
                    slot,
                    seq,
                    attempt: attempt + 1,
                    base: attempt,
                });
            }
        }
        s.refresh(&key, self.config.mode);
        Ok(())
    }

    /// `p` (from `take_persist`) was applied.
    pub fn persisted(&mut self, p: &Persist) {
        match p {
            Persist::DeliveryCount {
                slot, seq, attempt, ..
            } => {
                let Some(e) = self
                    .slots
                    .get_mut(slot)
                    .and_then(|s| s.entries.get_mut(seq))
                else {
                    return;
                };
                if let State::Persisting {
                    attempt: a,
                    ready_at,
                } = e.state
                {
                    if a == *attempt {
                        e.state = State::Delayed {
                            attempt: a,
                            ready_at,
                        };
                        self.timers.insert((ready_at, *slot, *seq));
                    }
                }
            }
            Persist::Horizon { slot, seq } => {
                if let Some(s) = self.slots.get_mut(slot) {
                    s.horizon_persisted(*seq, self.config.mode);
                }
            }
            Persist::AckBatch { slot, done, .. } => {
                if let Some(s) = self.slots.get_mut(slot) {
                    s.flushed(done, self.config.mode);
                }
                for d in done.iter().filter(|d| d.how == How::DeadLettered) {
                    let state = self
                        .slots
                        .get(slot)
                        .and_then(|s| s.entries.get(&d.seq))
                        .map(|e| e.state);
                    if state == Some(State::DeadLettering { attempt: d.attempt }) {
                        self.settle(*slot, d.seq, None);
                    }
                }
            }
            Persist::Park { .. } | Persist::Unpark { .. } => {}
        }
    }

    /// What is due at `now` (leases ended, delays over), then the deliveries to send: round
    /// robin over the slots with an event that may go and, under `KEY_ORDERED`, over the
    /// members with credits; under `SLOT_EXCLUSIVE` to the slot's member, once no other holds
    /// one of its events.
    pub fn poll(&mut self, now: u64) -> Vec<Delivery> {
        self.fire(now);
        let mut ids: Vec<u32> = self
            .slots
            .iter()
            .filter(|(_, s)| s.has_ready())
            .map(|(&id, _)| id)
            .collect();
        let start = ids.partition_point(|&id| Some(id) <= self.last_slot);
        ids.rotate_left(start);
        let mut out = Vec::new();
        // A slot that sends nothing in a round sends nothing later in this poll (a delivery of
        // another slot only uses up credits), so each round goes over the slots that sent.
        while !ids.is_empty() {
            ids.retain(|&id| match self.deliver_one(id, now) {
                Some(d) => {
                    out.push(d);
                    true
                }
                None => false,
            });
        }
        out
    }

    /// What to persist now: redeliveries' attempts, horizons, parks and unparks in the order
    /// they arose, then one ack flush per slot with something new.
    pub fn take_persist(&mut self) -> Vec<Persist> {
        let mut out = std::mem::take(&mut self.outbox);
        out.extend(self.slots.values_mut().filter_map(Slot::take_flush));
        out
    }

    /// When `poll` next has something due (a lease's end, a delay's), if ever.
    pub fn next_timer(&self) -> Option<u64> {
        self.timers.first().map(|t| t.0)
    }

    /// Whether something waits to be persisted that holds deliveries back (attempts, horizons,
    /// parks, unparks, and under `KEY_ORDERED` an ack whose key's next event waits for it to be
    /// durable): the caller persists at once instead of at its next ack flush.
    pub fn urgent(&self) -> bool {
        !self.outbox.is_empty() || self.slots.values().any(Slot::holds_back)
    }

    pub fn config(&self) -> Config {
        self.config
    }

    /// The slots dispatched here.
    pub fn slot_ids(&self) -> Vec<u32> {
        self.slots.keys().copied().collect()
    }

    pub fn has_slot(&self, slot: u32) -> bool {
        self.slots.contains_key(&slot)
    }

    /// Deliveries of `slot` in flight.
    pub fn pending(&self, slot: u32) -> u64 {
        self.slots
            .get(&slot)
            .map_or(0, |s| s.holders.values().map(|&n| u64::from(n)).sum())
    }

    /// The credits `member` has left.
    pub fn credits(&self, member: MemberId) -> u32 {
        self.members.get(&member).map_or(0, |m| m.credits)
    }

    /// Takes back the credits `member` has not used (it has none after).
    pub fn reclaim(&mut self, member: MemberId) -> Result<u32, Refusal> {
        let m = self
            .members
            .get_mut(&member)
            .ok_or(Refusal::UnknownMember(member))?;
        Ok(std::mem::take(&mut m.credits))
    }

    /// How many events `member` would get now if it had credits (0 while it has some: then
    /// nothing waits for it), as `poll` left them: under `KEY_ORDERED` the events any member
    /// may take, under `SLOT_EXCLUSIVE` those of its slots. Bounded by what the slots may have
    /// in flight.
    pub fn waiting(&self, member: MemberId) -> u32 {
        let Some(m) = self.members.get(&member) else {
            return 0;
        };
        if m.credits > 0 {
            return 0;
        }
        let mode = self.config.mode;
        let n: usize = self
            .slots
            .values()
            .filter(|s| mode == Mode::KeyOrdered || s.owner == Some(member))
            .map(Slot::deliverable)
            .sum();
        n.min(u32::MAX as usize) as u32
    }

    /// `waiting` of every member, the slots gone over once under `KEY_ORDERED` (where the
    /// count is the same for every member without credits), not once per member.
    pub fn waiting_each(&self) -> Vec<(MemberId, u32)> {
        let mut shared = None;
        self.members
            .iter()
            .map(|(&id, m)| {
                let n = match (m.credits, self.config.mode) {
                    (0, Mode::KeyOrdered) => *shared.get_or_insert_with(|| self.waiting(id)),
                    (0, Mode::SlotExclusive) => self.waiting(id),
                    _ => 0,
                };
                (id, n)
            })
            .collect()
    }

    fn finish(&mut self, slot: u32, seq: u64, attempt: u32, how: How) -> Result<(), Refusal> {
        if self.current(slot, seq, attempt)?.is_some() {
            self.settle(slot, seq, Some(how));
        }
        Ok(())
    }

    /// The lease's end of the delivery `(slot, seq, attempt)` if it is in flight, `None` if
    /// the event is done; refused otherwise.
    fn current(&self, slot: u32, seq: u64, attempt: u32) -> Result<Option<u64>, Refusal> {
        let s = self.slots.get(&slot).ok_or(Refusal::SlotNotHere { slot })?;
        if s.is_done(seq) {
            return Ok(None);
        }
        match s.entries.get(&seq).map(|e| e.state) {
            Some(State::InFlight {
                attempt: a,
                deadline,
                ..
            }) if a == attempt => Ok(Some(deadline)),
            state => Err(Refusal::StaleDelivery {
                slot,
                seq,
                attempt,
                current_attempt: match state {
                    Some(State::InFlight { attempt, .. }) => attempt,
                    _ => 0,
                },
            }),
        }
    }

    /// Takes `(slot, seq)` out as done; `how` for the next ack flush (`None`: persisted).
    fn settle(&mut self, slot: u32, seq: u64, how: Option<How>) {
        let Some(s) = self.slots.get_mut(&slot) else {
            return;
        };
        if let Some(state) = s.entries.get(&seq).map(|e| e.state) {
            if let Some(at) = state.timer() {
                self.timers.remove(&(at, slot, seq));
            }
            if let State::InFlight { member, .. } = state {
                release(&mut self.members, s, member, slot, seq);
            }
        }
        s.settle(seq, how, self.config.mode);
    }

    /// The attempt in flight of `(slot, seq)` failed (lease ended, nack, member left): a new
    /// attempt from `ready_at` on, or the poison policy once `max_deliver` are used up.
    fn fail(&mut self, slot: u32, seq: u64, ready_at: u64) {
        let mode = self.config.mode;
        let Some(s) = self.slots.get_mut(&slot) else {
            return;
        };
        let Some(State::InFlight {
            member,
            attempt,
            deadline,
        }) = s.entries.get(&seq).map(|e| e.state)
        else {
            return;
        };
        self.timers.remove(&(deadline, slot, seq));
        release(&mut self.members, s, member, slot, seq);
        let Some(e) = s.entries.get_mut(&seq) else {
            return;
        };
        if attempt - e.base < self.config.max_deliver.max(1) {
            e.state = State::Persisting {
                attempt: attempt + 1,
                ready_at,
            };
            let p = Persist::DeliveryCount {
                slot,
                seq,
                attempt: attempt + 1,
                base: e.base,
            };
            self.outbox.push(p);
            return;
        }
        match self.config.poison {
            Poison::Park => {
                e.state = State::Parked { attempt };
                let key = e.event.shard_key.clone();
                s.parked.insert(key.clone());
                self.outbox.push(Persist::Park {
                    slot,
                    shard_key: key.clone(),
                    seq,
                });
                s.refresh(&key, mode);
            }
            Poison::DeadLetter => {
                e.state = State::DeadLettering { attempt };
                s.dead_letter(seq, attempt);
            }
        }
    }

    fn fire(&mut self, now: u64) {
        while let Some(&(at, slot, seq)) = self.timers.first() {
            if at > now {
                return;
            }
            self.timers.pop_first();
            let Some(s) = self.slots.get_mut(&slot) else {
                continue;
            };
            let Some(e) = s.entries.get_mut(&seq) else {
                continue;
            };
            match e.state {
                State::InFlight { .. } => self.fail(slot, seq, at),
                State::Delayed { attempt, .. } => {
                    e.state = State::Queued { attempt };
                    let key = e.event.shard_key.clone();
                    s.refresh(&key, self.config.mode);
                }
                _ => {}
            }
        }
    }

    fn deliver_one(&mut self, slot: u32, now: u64) -> Option<Delivery> {
        let s = self.slots.get(&slot)?;
        let seq = s.candidate()?;
        let member = match self.config.mode {
            Mode::KeyOrdered => self.next_member()?,
            Mode::SlotExclusive => {
                let owner = s.owner?;
                let free = self.members.get(&owner).is_some_and(|m| m.credits > 0);
                (free && s.holders.keys().all(|h| *h == owner)).then_some(owner)?
            }
        };
        let m = self.members.get_mut(&member)?;
        let s = self.slots.get_mut(&slot)?;
        let e = s.entries.get_mut(&seq)?;
        let attempt = e.state.attempt();
        let deadline = now + lease_ms(self.config.ack_wait_ms, attempt, e.base);
        e.state = State::InFlight {
            member,
            attempt,
            deadline,
        };
        let event = e.event.clone();
        s.unready(seq);
        *s.holders.entry(member).or_default() += 1;
        m.credits -= 1;
        m.held.insert((slot, seq));
        self.timers.insert((deadline, slot, seq));
        self.last_member = Some(member);
        self.last_slot = Some(slot);
        Some(Delivery {
            member,
            event,
            attempt,
        })
    }

    /// The next member with credits after the last one served.
    fn next_member(&self) -> Option<MemberId> {
        let after = match self.last_member {
            Some(last) => self.members.range((Excluded(last), Unbounded)),
            None => self.members.range(..),
        };
        let before = self
            .members
            .range(..=self.last_member.unwrap_or(MemberId(0)));
        after
            .chain(before)
            .find(|(_, m)| m.credits > 0)
            .map(|(&id, _)| id)
    }

    /// `SLOT_EXCLUSIVE`: every slot leased to a member, each member `n / m` or one more slots;
    /// a slot keeps its member while that member is within its share.
    fn rebalance(&mut self) {
        if self.config.mode != Mode::SlotExclusive {
            return;
        }
        let ids: Vec<MemberId> = self.members.keys().copied().collect();
        let (n, m) = (self.slots.len(), ids.len().max(1));
        let share = |i: usize| n / m + usize::from(i < n % m);
        // Per member: (slots taken, its share).
        let mut load: BTreeMap<MemberId, (usize, usize)> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| (id, (0, share(i))))
            .collect();
        let mut free = Vec::new();
        for (&id, s) in self.slots.iter_mut() {
            match s.owner.and_then(|o| load.get_mut(&o)) {
                Some((taken, cap)) if *taken < *cap => *taken += 1,
                _ => {
                    s.owner = None;
                    free.push(id);
                }
            }
        }
        for id in free {
            let Some((&owner, (taken, _))) = load.iter_mut().find(|(_, (t, s))| t < s) else {
                return;
            };
            *taken += 1;
            if let Some(s) = self.slots.get_mut(&id) {
                s.owner = Some(owner);
            }
        }
    }
}

/// Frees a delivery's place in its member's and its slot's counts.
fn release(
    members: &mut BTreeMap<MemberId, Member>,
    s: &mut Slot,
    member: MemberId,
    slot: u32,
    seq: u64,
) {
    if let Some(m) = members.get_mut(&member) {
        m.held.remove(&(slot, seq));
    }
    if let Some(n) = s.holders.get_mut(&member) {
        *n -= 1;
        if *n == 0 {
            s.holders.remove(&member);
        }
    }
}
