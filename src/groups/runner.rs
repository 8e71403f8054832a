//! The consumer groups of one replica's shard group, run on its leader: one task per replica
//! owns a `Dispatcher` per group (over the slots this group owns), the members' streams
//! (`Peer.Consume`, `server/groups.rs`) and the ack flush.
//!
//! The task wakes on every apply (new events, `Notice`s), on a member's action, on a flush's
//! outcome and at least every `FEED_GROUP_ACK_FLUSH_MS`. Each wake it
//! 1. follows leadership: a replica that starts leading first waits for a read barrier (its
//!    applied state then holds everything an earlier leader persisted) and loads every group of
//!    its owned slots; one that stops ends every member's stream with `NotLeader`;
//! 2. applies the state's notices (a slot's record created, deleted, sought or expired: read it
//!    again; a transactional ack: the event is done) and, when ownership or a fence changed (the
//!    feed tips' epoch), adds and drops slots;
//! 3. reads the pages its dispatchers want, only of slots whose log moved past them;
//! 4. sends the deliveries, and tells each member how many events wait for its credits;
//! 5. persists what the dispatchers ask (one flush in flight at a time, in order): at once when
//!    it holds deliveries back (attempts, horizons, parks), else acks every
//!    `FEED_GROUP_ACK_FLUSH_MS`. A command refused or of unknown outcome makes the slots it
//!    named read again from the applied state: what was in flight there is delivered again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ordo_proto::v1::{
    peer_consume_response::Msg as Out, ConsumerGroup, Delivery as WireDelivery, GroupDef,
    GroupRecord, Joined, PeerConsumeResponse,
};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use super::dispatch::{Config, Dispatcher, MemberId, Mode, Persist, Poison, Refusal, SlotState};
use super::persist;
use crate::error::{Error, Result};
use crate::limits::{FEED_GROUP_ACK_FLUSH_MS, FEED_GROUP_ACK_WAIT_MS_DEFAULT};
use crate::replica::ReplicaHandle;
use crate::state::feed::{Filter, Slots, Start};
use crate::state::GroupNotice;

/// What a member's stream sends out: deliveries, refusals, counts; an `Err` ends it.
pub type MemberTx = mpsc::Sender<std::result::Result<PeerConsumeResponse, Status>>;

/// A member's stream on this node.
pub type ConnId = u64;

/// Calls queued for the runner (bounded: a member's actions wait for room).
const CALLS_MAX: usize = 4096;

/// A member's action, as `Peer.Consume` carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberOp {
    Ack {
        slot: u32,
        seq: u64,
        attempt: u32,
    },
    Term {
        slot: u32,
        seq: u64,
        attempt: u32,
    },
    Nack {
        slot: u32,
        seq: u64,
        attempt: u32,
        delay_ms: u32,
    },
    InProgress {
        slot: u32,
        seq: u64,
        attempt: u32,
    },
    Credit(u32),
    Reclaim,
}

pub enum Call {
    Join {
        group: String,
        member: String,
        credits: u32,
        out: MemberTx,
        reply: oneshot::Sender<Result<ConnId>>,
    },
    Op(ConnId, MemberOp),
    /// The stream ended: `clean` when the router closed it (hand its deliveries on now).
    Left {
        conn: ConnId,
        clean: bool,
    },
    Unpark {
        group: String,
        shard_key: Bytes,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Deliveries in flight per slot of `group`.
    Pending {
        group: String,
        reply: oneshot::Sender<BTreeMap<u32, u64>>,
    },
}

/// The replica's way to its runner.
#[derive(Clone)]
pub struct Groups(mpsc::Sender<Call>);

impl Default for Groups {
    /// A runner that is not there (tests of other parts): every call is refused.
    fn default() -> Groups {
        Groups(mpsc::channel(1).0)
    }
}

fn gone() -> Error {
    Error::Unavailable("this node's consumer-group runner has stopped (shutting down)".into())
}

impl Groups {
    pub fn new() -> (Groups, mpsc::Receiver<Call>) {
        let (tx, rx) = mpsc::channel(CALLS_MAX);
        (Groups(tx), rx)
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Call) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.0.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// A member joins `group` on this leader; its stream gets what `out` carries.
    pub async fn join(
        &self,
        group: String,
        member: String,
        credits: u32,
        out: MemberTx,
    ) -> Result<ConnId> {
        self.call(|reply| Call::Join {
            group,
            member,
            credits,
            out,
            reply,
        })
        .await?
    }

    pub async fn op(&self, conn: ConnId, op: MemberOp) -> Result<()> {
        self.0.send(Call::Op(conn, op)).await.map_err(|_| gone())
    }

    pub async fn left(&self, conn: ConnId, clean: bool) {
        let _ = self.0.send(Call::Left { conn, clean }).await;
    }

    /// Releases a parked order; answers once the release is applied.
    pub async fn unpark(&self, group: String, shard_key: Bytes) -> Result<()> {
        self.call(|reply| Call::Unpark {
            group,
            shard_key,
            reply,
        })
        .await?
    }

    pub async fn pending(&self, group: String) -> Result<BTreeMap<u32, u64>> {
        self.call(|reply| Call::Pending { group, reply }).await
    }
}

/// A group's dispatching definition from its record (defaults filled in by the create).
pub fn config_of(def: &GroupDef) -> Config {
    use ordo_proto::v1::{Mode as PMode, PoisonPolicy};
    Config {
        mode: match PMode::try_from(def.mode) {
            Ok(PMode::SlotExclusive) => Mode::SlotExclusive,
            _ => Mode::KeyOrdered,
        },
        ack_wait_ms: u64::from(def.ack_wait_ms),
        max_deliver: def.max_deliver.max(1),
        poison: match PoisonPolicy::try_from(def.poison) {
            Ok(PoisonPolicy::DeadLetter) => Poison::DeadLetter,
            _ => Poison::Park,
        },
    }
}

/// The dispatcher's view of a slot's persisted state.
pub fn slot_state(rec: &GroupRecord) -> SlotState {
    let s = rec.state.clone().unwrap_or_default();
    SlotState {
        committed: s.committed_seq,
        done: s.done.iter().map(|r| (r.first, r.last)).collect(),
        attempts: s
            .deliveries
            .iter()
            .map(|d| (d.seq, d.attempt, d.unparked_at))
            .collect(),
        parked: s.parked.into_iter().map(|p| (p.shard_key, p.seq)).collect(),
        horizon: s.horizon,
    }
}

/// One group on this leader.
struct Run {
    /// From the first slot record seen (`None`: known only from members' joins so far).
    def: Option<GroupDef>,
    d: Dispatcher,
    /// The shard keys the group's filter keeps, per slot (empty: all).
    keys: BTreeMap<u32, Vec<Bytes>>,
    members: BTreeMap<MemberId, ConnId>,
}

impl Run {
    fn new() -> Run {
        Run {
            def: None,
            d: Dispatcher::new(
                config_of(&GroupDef {
                    ack_wait_ms: FEED_GROUP_ACK_WAIT_MS_DEFAULT,
                    ..Default::default()
                }),
                [],
            ),
            keys: BTreeMap::new(),
            members: BTreeMap::new(),
        }
    }
}

struct Conn {
    group: String,
    name: String,
    member: MemberId,
    out: MemberTx,
    /// The last `waiting` count sent.
    waiting: u32,
}

/// A flush's outcome: each persist with whether its command was applied in full.
struct Flushed {
    term: u64,
    done: Vec<(String, Persist, bool)>,
}

struct Runner {
    replica: Arc<ReplicaHandle>,
    /// The term this replica leads in and has loaded its groups for.
    active: Option<u64>,
    runs: BTreeMap<String, Run>,
    conns: HashMap<ConnId, Conn>,
    next_conn: ConnId,
    epoch: u64,
    clock: Instant,
    flushing: bool,
    last_flush: u64,
    flushed_tx: mpsc::Sender<Flushed>,
    /// Unparks waiting for their release to be applied.
    unparks: Vec<(String, u32, Bytes, oneshot::Sender<Result<()>>)>,
    /// Slots to read again from the applied state once due (`(at, group, slot)`): a flush that
    /// failed (a fence, a lost leadership) is not retried at raft speed.
    reloads: Vec<(u64, String, u32)>,
}

/// How long a slot whose flush failed waits before it is read again.
const RELOAD_AFTER_FAILURE_MS: u64 = 100;

/// Runs the groups of `replica` until it stops.
pub async fn run(replica: Arc<ReplicaHandle>, mut calls: mpsc::Receiver<Call>) {
    let (flushed_tx, mut flushed) = mpsc::channel(1);
    let mut applied = replica.sm.subscribe();
    let mut stop = replica.stop.clone();
    let mut r = Runner {
        replica,
        active: None,
        runs: BTreeMap::new(),
        conns: HashMap::new(),
        next_conn: 1,
        epoch: 0,
        clock: Instant::now(),
        flushing: false,
        last_flush: 0,
        flushed_tx,
        unparks: Vec::new(),
        reloads: Vec::new(),
    };
    loop {
        let wake = r.next_wake();
        tokio::select! {
            call = calls.recv() => match call {
                Some(call) => r.call(call),
                None => break,
            },
            Some(f) = flushed.recv() => r.flushed(f),
            _ = applied.changed() => {}
            _ = tokio::time::sleep(wake) => {}
            _ = stop.changed() => break,
        }
        while let Ok(call) = calls.try_recv() {
            r.call(call);
        }
        r.step().await;
    }
    r.deactivate("this node is shutting down");
}

impl Runner {
    fn now(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    fn next_wake(&self) -> Duration {
        let now = self.now();
        let reload = self.reloads.iter().map(|r| r.0).min();
        let timer = self.runs.values().filter_map(|r| r.d.next_timer());
        let timer = timer.chain(reload).min();
        let at = timer.map_or(now + FEED_GROUP_ACK_FLUSH_MS, |t| {
            t.min(now + FEED_GROUP_ACK_FLUSH_MS)
        });
        Duration::from_millis(at.saturating_sub(now).max(1))
    }

    async fn step(&mut self) {
        let shared = &self.replica.shared;
        let leading = shared.is_leader.load(Ordering::Acquire) == 1;
        let term = shared.term.load(Ordering::Acquire);
        if self.active.is_some() && (!leading || self.active != Some(term)) {
            self.deactivate("this replica stopped leading its group");
        }
        if self.active.is_none() {
            // Followers' notices are nobody's.
            let _ = self.replica.sm.take_group_notices();
            if !leading || self.replica.read_barrier().await.is_err() {
                return;
            }
            self.active = Some(term);
            self.epoch = self.replica.sm.feed_epoch();
            if let Err(e) = self.load_all() {
                tracing::warn!(
                    group = self.replica.group_id,
                    "consumer groups: loading failed, retrying: {e}"
                );
                self.deactivate("this replica could not load its consumer groups");
                return;
            }
            tracing::info!(
                group = self.replica.group_id,
                term,
                groups = self.runs.len(),
                "consumer groups: leading, dispatching"
            );
        }
        if let Err(e) = self.sync() {
            tracing::warn!(
                group = self.replica.group_id,
                "consumer groups: reading state failed: {e}"
            );
        }
        let now = self.now();
        self.reload_due(now);
        self.read();
        self.deliver(now);
        self.flush(now);
    }

    fn reload_due(&mut self, now: u64) {
        let (due, later) = std::mem::take(&mut self.reloads)
            .into_iter()
            .partition(|(at, ..)| *at <= now);
        self.reloads = later;
        let mut due: Vec<(String, u32)> = due.into_iter().map(|(_, g, s)| (g, s)).collect();
        due.sort();
        due.dedup();
        for (group, slot) in due {
            if let Err(e) = self.reload(&group, slot) {
                tracing::warn!(group = %group, slot, "consumer groups: reloading failed: {e}");
            }
        }
    }

    /// Ends every member's stream (`NotLeader`) and forgets every group: a later term loads
    /// them again from the applied state.
    fn deactivate(&mut self, why: &str) {
        if self.active.take().is_none() && self.conns.is_empty() {
            return;
        }
        let status = Status::from(self.replica.not_leader_error(why));
        for (_, c) in self.conns.drain() {
            let _ = c.out.try_send(Err(status.clone()));
        }
        self.runs.clear();
        self.reloads.clear();
        for (_, _, _, reply) in self.unparks.drain(..) {
            let _ = reply.send(Err(self.replica.not_leader_error(why)));
        }
    }

    fn call(&mut self, call: Call) {
        match call {
            Call::Join {
                group,
                member,
                credits,
                out,
                reply,
            } => {
                let _ = reply.send(self.join(group, member, credits, out));
            }
            Call::Op(conn, op) => self.op(conn, op),
            Call::Left { conn, clean } => self.left(conn, clean),
            Call::Unpark {
                group,
                shard_key,
                reply,
            } => self.unpark(group, shard_key, reply),
            Call::Pending { group, reply } => {
                let pending = self.runs.get(&group).map_or_else(BTreeMap::new, |r| {
                    r.d.slot_ids()
                        .into_iter()
                        .map(|s| (s, r.d.pending(s)))
                        .collect()
                });
                let _ = reply.send(pending);
            }
        }
    }

    fn join(&mut self, group: String, name: String, credits: u32, out: MemberTx) -> Result<ConnId> {
        if self.active.is_none() {
            return Err(self
                .replica
                .not_leader_error("members join the group's leader"));
        }
        let run = self.runs.entry(group.clone()).or_insert_with(Run::new);
        let member = run.d.join(&name, credits).map_err(refusal_error)?;
        // A member of the same name is replaced: its stream ends.
        let replaced: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.group == group && c.name == name)
            .map(|(&id, _)| id)
            .collect();
        for id in replaced {
            if let Some(c) = self.conns.remove(&id) {
                run.members.remove(&c.member);
                let why =
                    format!("member {name:?} of group {group:?} joined again on another stream");
                let _ = c.out.try_send(Err(Status::aborted(why)));
            }
        }
        let conn = self.next_conn;
        self.next_conn += 1;
        run.members.insert(member, conn);
        let _ = out.try_send(Ok(PeerConsumeResponse {
            msg: Some(Out::Joined(Joined {})),
        }));
        self.conns.insert(
            conn,
            Conn {
                group,
                name,
                member,
                out,
                waiting: 0,
            },
        );
        Ok(conn)
    }

    fn op(&mut self, conn: ConnId, op: MemberOp) {
        let now = self.now();
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let Some(run) = self.runs.get_mut(&c.group) else {
            return;
        };
        let (d, member) = (&mut run.d, c.member);
        let result = match op {
            MemberOp::Ack { slot, seq, attempt } => d.ack(slot, seq, attempt),
            MemberOp::Term { slot, seq, attempt } => d.term(slot, seq, attempt),
            MemberOp::Nack {
                slot,
                seq,
                attempt,
                delay_ms,
            } => d.nack(slot, seq, attempt, delay_ms.into(), now),
            MemberOp::InProgress { slot, seq, attempt } => d.in_progress(slot, seq, attempt, now),
            MemberOp::Credit(n) => d.credit(member, n),
            MemberOp::Reclaim => d.reclaim(member).map(|n| {
                let _ = c.out.try_send(Ok(PeerConsumeResponse {
                    msg: Some(Out::Returned(n)),
                }));
            }),
        };
        let refused = match result {
            Ok(()) => return,
            Err(r) => r,
        };
        let group = c.group.clone();
        let out = match (refused, op) {
            (
                Refusal::StaleDelivery {
                    slot,
                    seq,
                    attempt,
                    current_attempt,
                },
                _,
            ) => Ok(stale(group, slot, seq, attempt, current_attempt)),
            (Refusal::SlotNotHere { slot }, op) => {
                let (seq, attempt) = op_delivery(op);
                Ok(stale(group, slot, seq, attempt, 0))
            }
            (other, _) => Err(Status::from(refusal_error(other))),
        };
        let ends = out.is_err();
        if c.out.try_send(out).is_err() || ends {
            self.left(conn, false);
        }
    }

    fn left(&mut self, conn: ConnId, clean: bool) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(run) = self.runs.get_mut(&c.group) {
            run.members.remove(&c.member);
            let _ = if clean {
                run.d.leave(c.member)
            } else {
                run.d.vanish(c.member)
            };
            if run.members.is_empty() && run.d.slot_ids().is_empty() {
                self.runs.remove(&c.group);
            }
        }
    }

    fn unpark(&mut self, group: String, key: Bytes, reply: oneshot::Sender<Result<()>>) {
        if self.active.is_none() {
            let _ = reply.send(Err(self
                .replica
                .not_leader_error("unpark goes to the leader")));
            return;
        }
        let slot = ordo_proto::slot_of(&key, self.replica.sm.slot_count());
        let Some(run) = self.runs.get_mut(&group) else {
            let _ = reply.send(Err(Error::NotFound(format!(
                "consumer group {group:?} has no state in slot {slot} here"
            ))));
            return;
        };
        match run.d.unpark(slot, &key) {
            Ok(()) => self.unparks.push((group, slot, key, reply)),
            Err(r) => {
                let _ = reply.send(Err(refusal_error(r)));
            }
        }
    }

    /// Every group record of the owned slots, compared with what is dispatched: slots gone
    /// are dropped, slots new are added (those dispatched already are left as they are).
    fn load_all(&mut self) -> Result<()> {
        let sm = &self.replica.sm;
        let ownership = sm.ownership();
        let mut found: BTreeMap<String, BTreeMap<u32, GroupRecord>> = BTreeMap::new();
        for slot in (0..sm.slot_count()).filter(|s| ownership.owns(*s)) {
            for name in sm.group_names(slot)? {
                if let Some(rec) = sm.group_record(slot, &name)? {
                    found.entry(name).or_default().insert(slot, rec);
                }
            }
        }
        for (name, run) in &mut self.runs {
            let here = found.get(name);
            for slot in run.d.slot_ids() {
                if here.is_none_or(|h| !h.contains_key(&slot)) {
                    run.d.remove_slot(slot);
                    run.keys.remove(&slot);
                }
            }
        }
        for (name, recs) in found {
            for (slot, rec) in recs {
                if !self.runs.get(&name).is_some_and(|r| r.d.has_slot(slot)) {
                    self.add_slot(&name, slot, &rec);
                }
            }
        }
        self.runs
            .retain(|_, r| !r.members.is_empty() || !r.d.slot_ids().is_empty());
        Ok(())
    }

    /// Dispatches `slot` of `group` from its record (a dispatcher made with the group's
    /// definition first, if it had none: members that joined before keep their credits).
    fn add_slot(&mut self, group: &str, slot: u32, rec: &GroupRecord) {
        let def = rec.def.clone().unwrap_or_default();
        let run = self.runs.entry(group.to_string()).or_insert_with(Run::new);
        if run.d.config() != config_of(&def) {
            let mut d = Dispatcher::new(config_of(&def), []);
            let mut members = BTreeMap::new();
            for (old, conn) in std::mem::take(&mut run.members) {
                let credits = run.d.credits(old);
                let Some(c) = self.conns.get_mut(&conn) else {
                    continue;
                };
                if let Ok(id) = d.join(&c.name, credits) {
                    c.member = id;
                    members.insert(id, conn);
                }
            }
            for s in run.d.slot_ids() {
                d.remove_slot(s);
            }
            run.d = d;
            run.members = members;
            run.keys.clear();
        }
        run.keys.insert(slot, def.shard_keys.clone());
        run.def = Some(def);
        run.d.add_slot(slot, slot_state(rec));
    }

    /// Reads `slot` of `group` again from the applied state (what was in flight there goes
    /// again; an unpark waiting on the slot is told to retry).
    fn reload(&mut self, group: &str, slot: u32) -> Result<()> {
        let sm = &self.replica.sm;
        let owned = sm.ownership().owns(slot);
        let rec = match owned {
            true => sm.group_record(slot, group)?,
            false => None,
        };
        if let Some(run) = self.runs.get_mut(group) {
            run.d.remove_slot(slot);
            run.keys.remove(&slot);
        }
        let (gone, kept) = std::mem::take(&mut self.unparks)
            .into_iter()
            .partition(|(g, s, ..)| g == group && *s == slot);
        self.unparks = kept;
        for (.., reply) in gone {
            let why = format!("slot {slot} was read again before the release was applied; retry");
            let _ = reply.send(Err(Error::Unavailable(why)));
        }
        match rec {
            Some(rec) => self.add_slot(group, slot, &rec),
            // Owned without the record: the group was deleted here.
            None if owned => self.maybe_deleted(group),
            None => {}
        }
        Ok(())
    }

    /// A group whose last slot here lost its record was deleted: its members' streams end.
    fn maybe_deleted(&mut self, group: &str) {
        let Some(run) = self.runs.get(group) else {
            return;
        };
        if run.def.is_none() || !run.d.slot_ids().is_empty() {
            return;
        }
        let run = self.runs.remove(group).expect("just found");
        let status = Status::not_found(format!("consumer group {group:?} was deleted"));
        for conn in run.members.values() {
            if let Some(c) = self.conns.remove(conn) {
                let _ = c.out.try_send(Err(status.clone()));
            }
        }
    }

    /// Applies the state's notices, and follows ownership and fences.
    fn sync(&mut self) -> Result<()> {
        let (notices, dropped) = self.replica.sm.take_group_notices();
        let epoch = self.replica.sm.feed_epoch();
        if dropped || epoch != self.epoch {
            self.epoch = epoch;
            self.load_all()?;
        }
        for n in notices {
            match n {
                GroupNotice::Changed { group, slot } => self.reload(&group, slot)?,
                GroupNotice::Acked { group, slot, seq } => {
                    if let Some(run) = self.runs.get_mut(&group) {
                        run.d.txn_acked(slot, seq);
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads what the dispatchers want, of the slots whose log moved past them.
    fn read(&mut self) {
        let sm = self.replica.sm.clone();
        let mut again = Vec::new();
        for (name, run) in &mut self.runs {
            let prefix = run
                .def
                .as_ref()
                .map_or(Bytes::new(), |d| d.key_prefix.clone());
            for want in run
                .d
                .wants_if(|slot, read_to| sm.feed_last_seq(slot) > read_to)
            {
                let keys = run.keys.get(&want.slot).map_or(&[][..], |k| &k[..]);
                let filter = Filter {
                    shard_keys: keys,
                    key_prefix: &prefix,
                };
                let page = sm
                    .feed_start(want.slot, Start::AfterSeq(want.after_seq))
                    .and_then(|c| {
                        let mut cursors = [c];
                        let max = want.bytes_max as u64;
                        sm.feed_page(Slots::Every, &mut cursors, &filter, want.events_max, max)
                    });
                match page {
                    Ok(page) => match page.positions.first() {
                        Some(pos) if !pos.moved => run.d.feed(want.slot, page.events, pos.seq),
                        _ => again.push((name.clone(), want.slot)),
                    },
                    Err(e) => {
                        tracing::info!(group = %name, slot = want.slot, "consumer groups: reading the slot again: {e}");
                        again.push((name.clone(), want.slot));
                    }
                }
            }
        }
        for (group, slot) in again {
            if let Err(e) = self.reload(&group, slot) {
                tracing::warn!(group = %group, slot, "consumer groups: reloading failed: {e}");
            }
        }
    }

    /// Sends what is due, then tells members what waits for their credits.
    fn deliver(&mut self, now: u64) {
        let mut broken = Vec::new();
        for run in self.runs.values_mut() {
            for d in run.d.poll(now) {
                let Some(c) = run.members.get(&d.member).and_then(|id| self.conns.get(id)) else {
                    continue;
                };
                let msg = Out::Delivery(WireDelivery {
                    event: Some(d.event),
                    attempt: d.attempt,
                });
                let conn = run.members[&d.member];
                if c.out
                    .try_send(Ok(PeerConsumeResponse { msg: Some(msg) }))
                    .is_err()
                {
                    broken.push(conn);
                }
                // The router counts each delivery off the last count it heard: what waits
                // now is told again, even if it is the same number.
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.waiting = 0;
                }
            }
            for (member, waiting) in run.d.waiting_each() {
                let Some(conn) = run.members.get(&member) else {
                    continue;
                };
                let Some(c) = self.conns.get_mut(conn) else {
                    continue;
                };
                if waiting != c.waiting {
                    c.waiting = waiting;
                    let msg = Some(Out::Waiting(waiting));
                    if c.out.try_send(Ok(PeerConsumeResponse { msg })).is_err() {
                        broken.push(*conn);
                    }
                }
            }
        }
        for conn in broken {
            self.left(conn, false);
        }
    }

    /// Starts a flush when none is in flight and something is due.
    fn flush(&mut self, now: u64) {
        let Some(term) = self.active else {
            return;
        };
        if self.flushing {
            return;
        }
        let urgent = self.runs.values().any(|r| r.d.urgent());
        if !urgent && now < self.last_flush + FEED_GROUP_ACK_FLUSH_MS {
            return;
        }
        let mut batch = Vec::new();
        for (name, run) in &mut self.runs {
            batch.extend(run.d.take_persist().into_iter().map(|p| (name.clone(), p)));
        }
        self.last_flush = now;
        if batch.is_empty() {
            return;
        }
        self.flushing = true;
        let (replica, tx) = (self.replica.clone(), self.flushed_tx.clone());
        tokio::spawn(async move {
            let done = persist::apply(&replica, batch).await;
            let _ = tx.send(Flushed { term, done }).await;
        });
    }

    fn flushed(&mut self, f: Flushed) {
        self.flushing = false;
        if self.active != Some(f.term) {
            return;
        }
        let at = self.now() + RELOAD_AFTER_FAILURE_MS;
        for (group, p, ok) in f.done {
            if let Persist::Unpark { slot, shard_key } = &p {
                let at = self
                    .unparks
                    .iter()
                    .position(|(g, s, k, _)| *g == group && s == slot && k == shard_key);
                if let Some(at) = at {
                    let (.., reply) = self.unparks.swap_remove(at);
                    let _ = reply.send(match ok {
                        true => Ok(()),
                        false => Err(Error::Unavailable(
                            "the release was not applied (leadership changed?); retry".into(),
                        )),
                    });
                }
            }
            match (ok, self.runs.get_mut(&group)) {
                (true, Some(run)) => run.d.persisted(&p),
                (false, _) => self.reloads.push((at, group, p.slot())),
                (true, None) => {}
            }
        }
    }
}

fn stale(
    group: String,
    slot: u32,
    seq: u64,
    attempt: u32,
    current_attempt: u32,
) -> PeerConsumeResponse {
    PeerConsumeResponse {
        msg: Some(Out::Refused(ordo_proto::v1::error_detail::StaleDelivery {
            group,
            slot,
            seq,
            attempt,
            current_attempt,
        })),
    }
}

/// The `(seq, attempt)` a member's action names (0s for credits).
fn op_delivery(op: MemberOp) -> (u64, u32) {
    match op {
        MemberOp::Ack { seq, attempt, .. }
        | MemberOp::Term { seq, attempt, .. }
        | MemberOp::Nack { seq, attempt, .. }
        | MemberOp::InProgress { seq, attempt, .. } => (seq, attempt),
        MemberOp::Credit(_) | MemberOp::Reclaim => (0, 0),
    }
}

/// A dispatcher's refusal as the error a member's stream or an admin call ends with.
pub fn refusal_error(r: Refusal) -> Error {
    let msg = r.to_string();
    match r {
        Refusal::StaleDelivery { .. } | Refusal::SlotNotHere { .. } => {
            Error::FailedPrecondition(msg)
        }
        Refusal::UnknownMember(_) => Error::FailedPrecondition(msg),
        Refusal::TooManyMembers { .. } => Error::ResourceExhausted(msg),
        Refusal::CreditsOverLimit { .. } | Refusal::NackDelayOverLimit { .. } => {
            Error::InvalidArgument(msg)
        }
        Refusal::NotParked { .. } => Error::NotFound(msg),
    }
}

/// The `ConsumerGroup` a describe answers, with this leader's pending counts.
pub fn with_pending(mut cg: ConsumerGroup, pending: &BTreeMap<u32, u64>) -> ConsumerGroup {
    cg.pending = 0;
    for s in &mut cg.slots {
        s.pending = pending.get(&s.slot).copied().unwrap_or(0);
        cg.pending += s.pending;
    }
    cg
}
