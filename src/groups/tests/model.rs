//! A consumer group run against a model: random joins, leaves, vanishes, credits, acks (right
//! and stale attempts), nacks, progress, terms, transactional acks, time, unparks, failovers and
//! slots moving away and back, over a random log of several keys in several slots. The model
//! keeps the persisted state as the replicated records would (applying every `Persist` the
//! dispatcher hands out, in order), what each member holds, and every delivery made; every
//! step checks what consumers rely on, and a drain at the end checks every event gets done.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use ordo_proto::v1::ChangeEvent;
use proptest::prelude::*;

use crate::groups::dispatch::{
    lease_ms, Config, Delivery, Dispatcher, How, MemberId, Mode, Persist, Poison, Refusal,
    SlotState,
};
use crate::limits::{FEED_GROUP_CREDITS_MAX, FEED_GROUP_INFLIGHT_PER_SLOT_MAX};

pub(super) const ACK_WAIT: u64 = 100;
const SLOTS: u32 = 3;
const NAMES: usize = 4;

#[derive(Clone, Debug)]
pub(super) enum Op {
    Join(usize, u32),
    Leave(usize),
    Vanish(usize),
    Credit(usize, u32),
    Ack(usize),
    Term(usize),
    Nack(usize, u64),
    InProgress(usize),
    TxnAck(usize),
    Advance(u64),
    Write(u64),
    Flush(bool),
    Unpark(u32, usize),
    Failover,
    Move(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..NAMES, 0u32..4).prop_map(|(n, c)| Op::Join(n, c)),
        1 => (0..NAMES).prop_map(Op::Leave),
        1 => (0..NAMES).prop_map(Op::Vanish),
        2 => (0..NAMES, 0u32..4).prop_map(|(n, c)| Op::Credit(n, c)),
        8 => any::<usize>().prop_map(Op::Ack),
        1 => any::<usize>().prop_map(Op::Term),
        2 => (any::<usize>(), 0u64..3).prop_map(|(i, d)| Op::Nack(i, d * ACK_WAIT / 2)),
        1 => any::<usize>().prop_map(Op::InProgress),
        2 => any::<usize>().prop_map(Op::TxnAck),
        3 => (0u64..4).prop_map(|t| Op::Advance(t * ACK_WAIT / 2)),
        3 => (1u64..6).prop_map(Op::Write),
        4 => any::<bool>().prop_map(Op::Flush),
        1 => (0..SLOTS, 0usize..3).prop_map(|(s, k)| Op::Unpark(s, k)),
        1 => Just(Op::Failover),
        1 => (0..SLOTS).prop_map(Op::Move),
    ]
}

/// A log: per slot, `(key index, whether the group's filter keeps it)` per seq from 1.
fn log() -> impl Strategy<Value = Vec<Vec<(usize, bool)>>> {
    prop::collection::vec(
        prop::collection::vec((0usize..3, prop::bool::weighted(0.75)), 4..16),
        SLOTS as usize,
    )
}

pub(super) fn config() -> impl Strategy<Value = Config> {
    (any::<bool>(), 1u32..4, any::<bool>()).prop_map(|(exclusive, max_deliver, dead)| Config {
        mode: if exclusive {
            Mode::SlotExclusive
        } else {
            Mode::KeyOrdered
        },
        ack_wait_ms: ACK_WAIT,
        max_deliver,
        poison: if dead {
            Poison::DeadLetter
        } else {
            Poison::Park
        },
    })
}

pub(super) fn key(slot: u32, k: usize) -> Bytes {
    Bytes::from(format!("order-{slot}-{k}"))
}

/// The persisted group state of one slot, as the replicated record keeps it.
#[derive(Clone, Debug, Default)]
pub(super) struct Stored {
    pub committed: u64,
    pub done: BTreeSet<u64>,
    /// seq -> (attempt, unparked_at)
    pub attempts: BTreeMap<u64, (u32, u32)>,
    pub parked: BTreeMap<Bytes, Vec<u64>>,
    pub horizon: u64,
}

impl Stored {
    pub(super) fn is_done(&self, seq: u64) -> bool {
        seq <= self.committed || self.done.contains(&seq)
    }

    pub(super) fn attempt(&self, seq: u64) -> u32 {
        self.attempts.get(&seq).map_or(1, |a| a.0)
    }

    fn mark_done(&mut self, seq: u64) {
        if seq <= self.committed {
            return;
        }
        self.done.insert(seq);
        while self.done.remove(&(self.committed + 1)) {
            self.committed += 1;
        }
        let committed = self.committed;
        self.attempts.retain(|&s, _| s > committed);
    }

    pub(super) fn state(&self) -> SlotState {
        let mut done: Vec<(u64, u64)> = Vec::new();
        for &s in &self.done {
            match done.last_mut() {
                Some((_, l)) if *l + 1 == s => *l = s,
                _ => done.push((s, s)),
            }
        }
        SlotState {
            committed: self.committed,
            done,
            attempts: self
                .attempts
                .iter()
                .map(|(&s, &(a, b))| (s, a, b))
                .collect(),
            parked: self
                .parked
                .iter()
                .flat_map(|(k, seqs)| seqs.iter().map(|&s| (k.clone(), s)))
                .collect(),
            horizon: self.horizon,
        }
    }
}

#[derive(Clone, Debug)]
struct Sent {
    slot: u32,
    seq: u64,
    attempt: u32,
    member: MemberId,
    /// The slot's dispatcher instance it was made by (a failover or a move starts another).
    instance: u64,
    deadline: u64,
    closed: bool,
}

#[derive(Clone, Debug)]
struct Joined {
    id: MemberId,
    credits: u32,
}

pub(super) struct Run {
    cfg: Config,
    pub d: Dispatcher,
    now: u64,
    log: Vec<Vec<(usize, bool)>>,
    visible: u64,
    pub store: BTreeMap<u32, Stored>,
    members: Vec<Option<Joined>>,
    sent: Vec<Sent>,
    away: BTreeSet<u32>,
    instance: BTreeMap<u32, u64>,
    next_instance: u64,
    /// Done in the slot's current instance, persisted or not.
    settled: BTreeSet<(u32, u64)>,
    /// Done for good: an accepted ack or term, a transactional ack, a persisted dead letter.
    truly_done: BTreeSet<(u32, u64)>,
    max_attempt: BTreeMap<(u32, u64), u32>,
    unconfirmed: Vec<Persist>,
    /// Dead letters persisted but not yet confirmed to the dispatcher.
    dead_unconfirmed: BTreeSet<(u32, u64)>,
    /// Keys parked (persisted, and no unpark since).
    parked: BTreeSet<(u32, Bytes)>,
}

impl Run {
    fn new(cfg: Config, log: Vec<Vec<(usize, bool)>>) -> Run {
        let store: BTreeMap<u32, Stored> = (0..SLOTS).map(|s| (s, Stored::default())).collect();
        let d = Dispatcher::new(cfg, store.iter().map(|(&s, st)| (s, st.state())));
        Run {
            cfg,
            d,
            now: 0,
            log,
            visible: 2,
            store,
            members: vec![None; NAMES],
            sent: Vec::new(),
            away: BTreeSet::new(),
            instance: (0..SLOTS).map(|s| (s, 0)).collect(),
            next_instance: 1,
            settled: BTreeSet::new(),
            truly_done: BTreeSet::new(),
            max_attempt: BTreeMap::new(),
            unconfirmed: Vec::new(),
            dead_unconfirmed: BTreeSet::new(),
            parked: BTreeSet::new(),
        }
    }

    fn event(&self, slot: u32, seq: u64) -> ChangeEvent {
        let (k, keep) = self.log[slot as usize][seq as usize - 1];
        let prefix = if keep { "outbox/" } else { "other/" };
        ChangeEvent {
            slot,
            seq,
            shard_key: key(slot, k),
            key: Bytes::from(format!("{prefix}{seq}")),
            commit_ts_ms: seq,
            ..Default::default()
        }
    }

    fn kept(&self, slot: u32, seq: u64) -> bool {
        self.log[slot as usize][seq as usize - 1].1
    }

    /// Done as the dispatcher must see it: persisted (a dead letter once confirmed), or done
    /// in the slot's current instance.
    fn done_now(&self, slot: u32, seq: u64) -> bool {
        let persisted =
            self.store[&slot].is_done(seq) && !self.dead_unconfirmed.contains(&(slot, seq));
        persisted || self.settled.contains(&(slot, seq))
    }

    fn open(&self, s: &Sent) -> bool {
        !s.closed && s.instance == self.instance[&s.slot] && self.now < s.deadline
    }

    fn close_member(&mut self, id: MemberId) {
        for s in self.sent.iter_mut().filter(|s| s.member == id) {
            s.closed = true;
        }
    }

    pub(super) fn step(&mut self, op: &Op) {
        match *op {
            Op::Join(n, credits) => {
                let id = self.d.join(&format!("m{n}"), credits).unwrap();
                // A member joining again under its name replaces (vanishes) the old one.
                self.members[n] = Some(Joined { id, credits });
            }
            Op::Leave(n) => {
                if let Some(j) = self.members[n].take() {
                    self.d.leave(j.id).unwrap();
                    self.close_member(j.id);
                }
            }
            Op::Vanish(n) => {
                if let Some(j) = self.members[n].take() {
                    self.d.vanish(j.id).unwrap();
                }
            }
            Op::Credit(n, c) => {
                if let Some(j) = self.members[n].as_mut() {
                    self.d.credit(j.id, c).unwrap();
                    j.credits += c;
                }
            }
            Op::Ack(i) => self.settle_op(i, How::Acked),
            Op::Term(i) => self.settle_op(i, How::Termed),
            Op::Nack(i, delay) => self.nack_op(i, delay),
            Op::InProgress(i) => self.progress_op(i),
            Op::TxnAck(i) => self.txn_ack_op(i),
            Op::Advance(ms) => self.now += ms,
            Op::Write(n) => self.visible += n,
            Op::Flush(confirm) => self.flush(confirm),
            Op::Unpark(slot, k) => {
                let before = self.d.clone();
                if self.d.unpark(slot, &key(slot, k)).is_err() {
                    assert_eq!(self.d, before, "a refused unpark changed the dispatcher");
                } else {
                    self.parked.remove(&(slot, key(slot, k)));
                }
            }
            Op::Failover => self.failover(),
            Op::Move(slot) => self.move_slot(slot),
        }
        self.serve_reads();
        let out = self.d.poll(self.now);
        for delivery in out {
            self.check_delivery(delivery);
        }
    }

    /// The delivery an op names, if any has been made.
    fn pick(&self, i: usize) -> Option<Sent> {
        (!self.sent.is_empty()).then(|| self.sent[i % self.sent.len()].clone())
    }

    /// Runs a member's action on delivery `i` and checks its answer against the model: the
    /// delivery in flight is accepted, one of an event done is accepted (idempotent), any other
    /// is refused and changes nothing.
    fn answer(
        &mut self,
        i: usize,
        act: impl FnOnce(&mut Dispatcher, &Sent, u64) -> Result<(), Refusal>,
    ) -> Option<(usize, Sent)> {
        let s = self.pick(i)?;
        let idx = i % self.sent.len();
        let current = self.open(&s);
        let done = !self.away.contains(&s.slot) && self.done_now(s.slot, s.seq);
        let before = self.d.clone();
        let got = act(&mut self.d, &s, self.now);
        if current || done {
            assert_eq!(got, Ok(()), "{s:?} current {current} done {done}");
        } else {
            assert!(got.is_err(), "a stale {s:?} was accepted");
            if self.away.contains(&s.slot) {
                assert_eq!(got, Err(Refusal::SlotNotHere { slot: s.slot }));
            } else {
                assert!(matches!(got, Err(Refusal::StaleDelivery { .. })), "{got:?}");
            }
            assert_eq!(self.d, before, "a refused action changed the dispatcher");
        }
        (current && !done).then_some((idx, s))
    }

    fn settle_op(&mut self, i: usize, how: How) {
        let hit = self.answer(i, |d, s, _| match how {
            How::Termed => d.term(s.slot, s.seq, s.attempt),
            _ => d.ack(s.slot, s.seq, s.attempt),
        });
        if let Some((idx, s)) = hit {
            self.sent[idx].closed = true;
            self.settled.insert((s.slot, s.seq));
            self.truly_done.insert((s.slot, s.seq));
        }
    }

    fn nack_op(&mut self, i: usize, delay: u64) {
        if let Some((idx, _)) =
            self.answer(i, |d, s, now| d.nack(s.slot, s.seq, s.attempt, delay, now))
        {
            self.sent[idx].closed = true;
        }
    }

    fn progress_op(&mut self, i: usize) {
        if let Some((idx, s)) =
            self.answer(i, |d, s, now| d.in_progress(s.slot, s.seq, s.attempt, now))
        {
            let base = self.store[&s.slot].attempts.get(&s.seq).map_or(0, |a| a.1);
            self.sent[idx].deadline = self.now + lease_ms(ACK_WAIT, s.attempt, base);
        }
    }

    /// A transactional ack, applied as the replicated state would: only for the event's current
    /// persisted attempt and an event not done, on a slot here; then the dispatcher hears of it.
    fn txn_ack_op(&mut self, i: usize) {
        let Some(s) = self.pick(i) else { return };
        if self.away.contains(&s.slot) {
            return;
        }
        let st = self.store.get_mut(&s.slot).unwrap();
        if st.is_done(s.seq) || st.attempt(s.seq) != s.attempt {
            return;
        }
        st.mark_done(s.seq);
        self.truly_done.insert((s.slot, s.seq));
        self.settled.insert((s.slot, s.seq));
        let instance = self.instance[&s.slot];
        for x in self
            .sent
            .iter_mut()
            .filter(|x| (x.slot, x.seq) == (s.slot, s.seq))
        {
            if x.instance == instance {
                x.closed = true;
            }
        }
        self.d.txn_acked(s.slot, s.seq);
        self.check_committed(s.slot);
    }

    pub(super) fn flush(&mut self, confirm: bool) {
        for p in self.d.take_persist() {
            self.apply(&p);
            self.unconfirmed.push(p);
        }
        if confirm {
            for p in std::mem::take(&mut self.unconfirmed) {
                self.d.persisted(&p);
            }
            self.dead_unconfirmed.clear();
        }
    }

    /// `p` applied to the persisted state, with the checks the apply makes.
    fn apply(&mut self, p: &Persist) {
        match p {
            Persist::AckBatch { slot, done, skips } => {
                for &(first, last) in skips {
                    for seq in first..=last {
                        assert!(!self.kept(*slot, seq), "seq {seq} of slot {slot} skipped");
                        self.store.get_mut(slot).unwrap().mark_done(seq);
                    }
                }
                for d in done {
                    let st = self.store.get_mut(slot).unwrap();
                    if st.is_done(d.seq) {
                        continue;
                    }
                    assert_eq!(st.attempt(d.seq), d.attempt, "stale attempt in {d:?}");
                    st.mark_done(d.seq);
                    if d.how == How::DeadLettered {
                        self.truly_done.insert((*slot, d.seq));
                        self.dead_unconfirmed.insert((*slot, d.seq));
                    } else {
                        assert!(self.truly_done.contains(&(*slot, d.seq)), "{d:?} not done");
                    }
                }
                self.check_committed(*slot);
            }
            Persist::DeliveryCount {
                slot,
                seq,
                attempt,
                base,
            } => {
                let st = self.store.get_mut(slot).unwrap();
                assert!(
                    *attempt > st.attempt(*seq),
                    "attempt {attempt} of {seq} not higher"
                );
                let was = st.attempts.get(seq).map_or(0, |a| a.1);
                st.attempts.insert(*seq, (*attempt, was.max(*base)));
            }
            Persist::Horizon { slot, seq } => {
                let st = self.store.get_mut(slot).unwrap();
                st.horizon = st.horizon.max(*seq);
            }
            Persist::Park {
                slot,
                shard_key,
                seq,
            } => {
                let st = self.store.get_mut(slot).unwrap();
                st.parked.entry(shard_key.clone()).or_default().push(*seq);
                self.parked.insert((*slot, shard_key.clone()));
            }
            Persist::Unpark { slot, shard_key } => {
                self.parked.remove(&(*slot, shard_key.clone()));
                let st = self.store.get_mut(slot).unwrap();
                for seq in st.parked.remove(shard_key).unwrap_or_default() {
                    let a = st.attempt(seq);
                    st.attempts.insert(seq, (a, a));
                }
            }
        }
    }

    /// The committed seq never passes an event that is not done.
    fn check_committed(&self, slot: u32) {
        let committed = self.store[&slot].committed;
        for seq in 1..=committed {
            if self.kept(slot, seq) {
                assert!(
                    self.truly_done.contains(&(slot, seq)),
                    "slot {slot} committed {committed} passes seq {seq}, not done"
                );
            }
        }
    }

    fn failover(&mut self) {
        let slots: Vec<(u32, SlotState)> = self
            .store
            .iter()
            .filter(|(s, _)| !self.away.contains(s))
            .map(|(&s, st)| (s, st.state()))
            .collect();
        self.d = Dispatcher::new(self.cfg, slots);
        self.members = vec![None; NAMES];
        self.unconfirmed.clear();
        for slot in 0..SLOTS {
            self.new_instance(slot);
        }
    }

    /// A failover or a move: the slot's dispatcher starts again from the persisted state.
    fn new_instance(&mut self, slot: u32) {
        self.instance.insert(slot, self.next_instance);
        self.next_instance += 1;
        self.settled.retain(|&(s, _)| s != slot);
        self.dead_unconfirmed.retain(|&(s, _)| s != slot);
        self.parked.retain(|(s, _)| *s != slot);
        let keys = self.store[&slot].parked.keys().cloned();
        self.parked.extend(keys.map(|k| (slot, k)));
    }

    fn move_slot(&mut self, slot: u32) {
        if self.away.remove(&slot) {
            self.d.add_slot(slot, self.store[&slot].state());
        } else {
            self.d.remove_slot(slot);
            self.away.insert(slot);
            self.unconfirmed.retain(|p| p.slot() != slot);
        }
        self.new_instance(slot);
    }

    /// What the node does for the dispatcher's wants: pages of at most 3 kept events from the
    /// visible log, the position past the filtered-out events read.
    fn serve_reads(&mut self) {
        for w in self.d.wants() {
            let len = (self.log[w.slot as usize].len() as u64).min(self.visible);
            let mut events = Vec::new();
            let mut read_to = w.after_seq;
            for seq in w.after_seq + 1..=len {
                if events.len() == w.events_max.min(3) {
                    break;
                }
                read_to = seq;
                if self.kept(w.slot, seq) {
                    events.push(self.event(w.slot, seq));
                }
            }
            if read_to > w.after_seq {
                self.d.feed(w.slot, events, read_to);
            }
        }
    }

    /// Everything a delivery must satisfy when it is made.
    fn check_delivery(&mut self, d: Delivery) {
        let (slot, seq, attempt) = (d.event.slot, d.event.seq, d.attempt);
        let st = &self.store[&slot];
        assert!(!self.away.contains(&slot), "slot {slot} is away");
        assert!(self.kept(slot, seq), "a filtered-out event went out");
        assert_eq!(d.event, self.event(slot, seq));
        assert!(
            !self.done_now(slot, seq),
            "{slot}/{seq} is done, delivered again"
        );
        // Attempts only grow, and are persisted before use (attempt 1 under the horizon).
        let prev = self.max_attempt.insert((slot, seq), attempt).unwrap_or(0);
        assert!(
            attempt > prev,
            "{slot}/{seq} attempt {attempt} after {prev}"
        );
        if attempt == 1 {
            assert!(
                seq <= st.horizon,
                "{slot}/{seq} first delivery over the horizon"
            );
        } else {
            assert_eq!(
                st.attempt(seq),
                attempt,
                "{slot}/{seq} attempt not persisted"
            );
        }
        // Credits.
        let j = self
            .members
            .iter_mut()
            .flatten()
            .find(|j| j.id == d.member)
            .expect("delivered to a member that is not joined");
        assert!(j.credits > 0, "member over its credits");
        j.credits -= 1;
        let key = d.event.shard_key.clone();
        assert!(
            !self.parked.contains(&(slot, key.clone())),
            "{slot}/{seq}: {key:?} is parked"
        );
        // What is in flight.
        let open: Vec<&Sent> = self.sent.iter().filter(|s| self.open(s)).collect();
        assert!(
            !open.iter().any(|s| (s.slot, s.seq) == (slot, seq)),
            "{slot}/{seq} redelivered while in flight"
        );
        let in_slot = open.iter().filter(|s| s.slot == slot).count();
        assert!(in_slot < FEED_GROUP_INFLIGHT_PER_SLOT_MAX);
        match self.cfg.mode {
            Mode::KeyOrdered => {
                assert!(
                    !open
                        .iter()
                        .any(|s| s.slot == slot && self.event(slot, s.seq).shard_key == key),
                    "two events of {key:?} in flight"
                );
                for earlier in 1..seq {
                    if self.kept(slot, earlier) && self.event(slot, earlier).shard_key == key {
                        assert!(
                            self.done_now(slot, earlier),
                            "{slot}/{seq} of {key:?} before {earlier} was done"
                        );
                    }
                }
            }
            Mode::SlotExclusive => assert!(
                open.iter().all(|s| s.slot != slot || s.member == d.member),
                "slot {slot} held by two members"
            ),
        }
        let base = st.attempts.get(&seq).map_or(0, |a| a.1);
        self.sent.push(Sent {
            slot,
            seq,
            attempt,
            member: d.member,
            instance: self.instance[&slot],
            deadline: self.now + lease_ms(ACK_WAIT, attempt, base),
            closed: false,
        });
    }

    /// Members that keep acking: every event gets done.
    pub(super) fn drain(&mut self) {
        self.visible = u64::MAX;
        for slot in self.away.clone() {
            self.move_slot(slot);
        }
        // One member that acks everything (a member with no credits would hold its slots).
        for n in 0..NAMES {
            self.step(&Op::Leave(n));
        }
        let name = NAMES - 1;
        self.step(&Op::Join(name, FEED_GROUP_CREDITS_MAX));
        for _ in 0..200 {
            if (0..SLOTS).all(|s| self.store[&s].committed == self.log[s as usize].len() as u64) {
                return;
            }
            let j = self.members[name].clone().unwrap();
            self.step(&Op::Credit(name, FEED_GROUP_CREDITS_MAX - j.credits));
            for slot in 0..SLOTS {
                for k in 0..3 {
                    self.step(&Op::Unpark(slot, k));
                }
            }
            self.step(&Op::Flush(true));
            let open: Vec<usize> = (0..self.sent.len())
                .filter(|&i| self.open(&self.sent[i]))
                .collect();
            for i in open {
                self.step(&Op::Ack(i));
            }
            self.step(&Op::Flush(true));
            self.step(&Op::Advance(1_000_000));
        }
        panic!("not every event got done: {:?}", self.store);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn a_group_keeps_order_credits_and_attempts_and_gets_everything_done(
        cfg in config(),
        log in log(),
        ops in prop::collection::vec(op(), 1..150),
    ) {
        let mut run = Run::new(cfg, log);
        for op in &ops {
            run.step(op);
        }
        run.drain();
    }
}
