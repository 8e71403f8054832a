//! Consumer groups' replicated state (issue 14): per slot and group, the group's definition and
//! where it stands in the slot's change feed.
//!
//! Records live in each slot's reserved range (`keys::reserved_key`, kind `g`), beside the
//! feed's log (kind `e`), so they move with the slot (a move copies the range and its change log
//! carries their changes: they are written through `TxView`), and snapshots, `CLEAR` and digests
//! treat them as records of the slot. Values use the item encoding (checksummed, version 0).
//! - `slot | 0xffff | g | name` → the group's `GroupRecord` (prost): its definition (with only
//!   the shard keys of this slot) and its `GroupSlotState`: the committed seq (every event at or
//!   below it done), the ranges of done events above it, the attempts of events delivered more
//!   than once, the parked orders, and whether retention expired it;
//! - `slot | 0xffff | g` (no name) → the slot's index: the names of its groups, sorted, one per
//!   line (a sled transaction cannot scan, and a trim must find the slot's groups).
//!
//! Every change is a replicated command (`apply.rs`), applied alike on every replica; the
//! leader's dispatcher keeps what is in flight in memory and reads these records (from the
//! applied state, never the apply path) when it starts.

use ordo_proto::v1::{
    ConsumerGroup, DeliveryCount, GroupDef, GroupRecord, GroupSlot, GroupSlotState, SeqRange,
};
use prost::Message as _;

use super::feed::{event_key, last_seq_at_or_before, Meta};
use super::{keys, tx_err, StateMachine, TxView};
use crate::error::{Error, Result};
use crate::limits::FEED_GROUP_DONE_RANGES_MAX;

mod apply;
#[cfg(test)]
mod tests;

pub use apply::GroupApplied;
pub(super) use apply::{apply, Ctx};

/// What an apply did to a consumer group that the leader's dispatcher did not ask for itself
/// (its own acks, attempts, horizons, parks and unparks it learns from their outcomes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// The group's record in the slot was created, deleted, sought or expired: the dispatcher
    /// reads the slot again.
    Changed { group: String, slot: u32 },
    /// A transactional ack (`TxnOp.feed_ack`) made event `seq` done.
    Acked { group: String, slot: u32, seq: u64 },
}

/// Notices not yet taken, bounded: past `NOTICES_MAX` they are dropped and the taker is told
/// to read everything again. Every replica applies, so followers' notices are taken (and
/// dropped) too, by the node's group runner.
#[derive(Default)]
pub(crate) struct Notices(std::sync::Mutex<(Vec<Notice>, bool)>);

/// Notices kept for the runner; a runner that fell this far behind reloads every group.
const NOTICES_MAX: usize = 65_536;

impl Notices {
    pub(super) fn push(&self, mut notices: Vec<Notice>) {
        if notices.is_empty() {
            return;
        }
        let mut inner = self.0.lock().unwrap();
        if inner.0.len() + notices.len() > NOTICES_MAX {
            inner.0.clear();
            inner.1 = true;
        } else {
            inner.0.append(&mut notices);
        }
    }

    /// The notices since the last take, and whether some were dropped (then reload all).
    fn take(&self) -> (Vec<Notice>, bool) {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// The reserved-range kind of consumer-group records.
const KIND: u8 = b'g';

fn record_key(slot: u32, group: &str) -> Vec<u8> {
    keys::reserved_key(slot, KIND, group.as_bytes())
}

/// The key of `slot`'s index of its groups (the one key of the kind without a name).
fn index_key(slot: u32) -> Vec<u8> {
    keys::reserved_key(slot, KIND, &[])
}

fn encode_record(rec: &GroupRecord) -> Vec<u8> {
    keys::encode_value_with(0, rec.encoded_len(), |out| {
        rec.encode(out).expect("vec has room")
    })
}

fn decode_record(raw_key: &[u8], raw: &[u8]) -> Result<GroupRecord> {
    let (_, body) = keys::decode_value(raw_key, raw)?;
    GroupRecord::decode(body)
        .map_err(|e| Error::Corruption(format!("group record {}: {e}", keys::printable(raw_key))))
}

fn decode_index(raw_key: &[u8], raw: &[u8]) -> Result<Vec<String>> {
    let (_, body) = keys::decode_value(raw_key, raw)?;
    let text = std::str::from_utf8(body)
        .map_err(|e| Error::Corruption(format!("group index {}: {e}", keys::printable(raw_key))))?;
    Ok(text.split('\n').map(str::to_string).collect())
}

/// Where a group starts in a slot whose log is `meta`: after the last event, before the oldest,
/// or after the last event committed at or before a time (`ts_of` gives an event's commit time;
/// a time before what was trimmed starts at the oldest event).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum At {
    Now,
    Oldest,
    AfterTs(u64),
}

impl At {
    fn from_proto(s: Option<&ordo_proto::v1::GroupStart>) -> Result<At> {
        use ordo_proto::v1::group_start::At as P;
        match s.and_then(|s| s.at.as_ref()) {
            Some(P::Now(_)) => Ok(At::Now),
            Some(P::Oldest(_)) => Ok(At::Oldest),
            Some(P::AfterTsMs(ts)) => Ok(At::AfterTs(*ts)),
            None => Err(Error::InvalidArgument(
                "a group start names none of now, oldest, after_ts_ms".into(),
            )),
        }
    }

    fn seq(self, meta: &Meta, ts_of: impl FnMut(u64) -> Result<u64>) -> Result<u64> {
        Ok(match self {
            At::Now => meta.last_seq,
            At::Oldest => meta.first_seq - 1,
            At::AfterTs(ts) => last_seq_at_or_before(meta, ts, ts_of)?,
        })
    }
}

/// Whether event `seq` is done (acked, termed, skipped or dead-lettered).
pub(crate) fn is_done(s: &GroupSlotState, seq: u64) -> bool {
    seq <= s.committed_seq || {
        let i = s.done.partition_point(|r| r.last < seq);
        s.done.get(i).is_some_and(|r| r.first <= seq)
    }
}

/// The current attempt of event `seq`: 1 unless a redelivery recorded more.
pub(crate) fn attempt_of(s: &GroupSlotState, seq: u64) -> u32 {
    delivery(s, seq).map_or(1, |i| s.deliveries[i].attempt)
}

fn delivery(s: &GroupSlotState, seq: u64) -> std::result::Result<usize, usize> {
    s.deliveries.binary_search_by_key(&seq, |d| d.seq)
}

/// Marks `first..=last` done, merging it into the done ranges and moving the committed seq over
/// the ranges that now follow it; forgets the delivery counts and parked orders of what became
/// done. False (nothing changed) when the state would keep more than
/// `FEED_GROUP_DONE_RANGES_MAX` ranges.
fn mark_done(s: &mut GroupSlotState, first: u64, last: u64) -> bool {
    let first = first.max(s.committed_seq + 1);
    if first > last {
        return true;
    }
    // The ranges that overlap or touch `first..=last`: `lo..hi`.
    let lo = s.done.partition_point(|r| r.last.saturating_add(1) < first);
    let hi = s
        .done
        .partition_point(|r| r.first <= last.saturating_add(1));
    let (mut f, mut l) = (first, last);
    if lo < hi {
        f = f.min(s.done[lo].first);
        l = l.max(s.done[hi - 1].last);
    }
    let advances = lo == 0 && f == s.committed_seq + 1;
    if s.done.len() - (hi - lo) + usize::from(!advances) > FEED_GROUP_DONE_RANGES_MAX {
        return false;
    }
    s.done.splice(lo..hi, [SeqRange { first: f, last: l }]);
    if advances {
        s.committed_seq = s.done.remove(0).last;
    }
    let committed = s.committed_seq;
    let newly = |seq: u64| seq <= committed || (f..=l).contains(&seq);
    s.deliveries.retain(|d| !newly(d.seq));
    s.parked.retain(|p| !newly(p.seq));
    true
}

/// Moves the committed seq to at least `seq` (events there are gone: trimmed, or sought past),
/// dropping what it passes.
fn advance_to(s: &mut GroupSlotState, seq: u64) {
    if seq <= s.committed_seq {
        return;
    }
    s.committed_seq = seq;
    s.done.retain(|r| r.last > seq);
    if let Some(r) = s.done.first_mut() {
        r.first = r.first.max(seq + 1);
        if r.first == seq + 1 {
            s.committed_seq = r.last;
            s.done.remove(0);
        }
    }
    let committed = s.committed_seq;
    s.deliveries.retain(|d| d.seq > committed);
    s.parked.retain(|p| p.seq > committed);
}

/// Records `attempt` as event `seq`'s current one (never lowering it). False (nothing changed):
/// the state keeps `max` delivery counts already.
fn record_attempt(s: &mut GroupSlotState, seq: u64, attempt: u32, max: usize) -> bool {
    match delivery(s, seq) {
        Ok(i) => s.deliveries[i].attempt = s.deliveries[i].attempt.max(attempt),
        Err(_) if s.deliveries.len() >= max => return false,
        Err(i) => s.deliveries.insert(
            i,
            DeliveryCount {
                seq,
                attempt,
                unparked_at: 0,
            },
        ),
    }
    true
}

impl TxView<'_> {
    /// `group`'s record in `slot`, as this transaction sees it.
    fn group_record(&self, slot: u32, group: &str) -> Result<Option<GroupRecord>> {
        let key = record_key(slot, group);
        match self.data.get(&key).map_err(tx_err)? {
            Some(raw) => decode_record(&key, &raw).map(Some),
            None => Ok(None),
        }
    }

    fn put_group_record(&mut self, slot: u32, rec: &GroupRecord) -> Result<()> {
        let group = rec.def.as_ref().map_or("", |d| d.group.as_str());
        self.put_raw(slot, record_key(slot, group), encode_record(rec))
    }

    /// The names of `slot`'s groups, sorted.
    fn group_names(&self, slot: u32) -> Result<Vec<String>> {
        let key = index_key(slot);
        match self.data.get(&key).map_err(tx_err)? {
            Some(raw) => decode_index(&key, &raw),
            None => Ok(Vec::new()),
        }
    }

    fn put_group_names(&mut self, slot: u32, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return self.delete_raw(slot, index_key(slot));
        }
        self.put_raw(
            slot,
            index_key(slot),
            keys::encode_value(0, names.join("\n").as_bytes()),
        )
    }

    /// Where `at` puts a group in `slot` now, from the slot's log as this transaction sees it.
    fn group_start(&self, slot: u32, at: At) -> Result<u64> {
        let meta = self.feed_meta_peek(slot)?;
        at.seq(&meta, |seq| {
            let key = event_key(slot, seq);
            match self.data.get(&key).map_err(tx_err)? {
                Some(raw) => Ok(super::feed::decode_event(&key, &raw)?.commit_ts_ms),
                None => Ok(0),
            }
        })
    }

    /// After a trim of `slot` left its oldest event at `first_seq`: every group of the slot
    /// that had not done the events dropped is expired, and its position moves past them.
    pub(super) fn expire_groups(&mut self, slot: u32, first_seq: u64) -> Result<()> {
        for name in self.group_names(slot)? {
            let Some(mut rec) = self.group_record(slot, &name)? else {
                continue;
            };
            let state = rec.state.get_or_insert_with(Default::default);
            if state.committed_seq + 1 >= first_seq {
                continue;
            }
            state.expired = true;
            advance_to(state, first_seq - 1);
            self.put_group_record(slot, &rec)?;
            self.notices.push(Notice::Changed { group: name, slot });
        }
        Ok(())
    }
}

impl StateMachine {
    /// What applies did to consumer groups since the last call (`Notice`), and whether some
    /// were dropped for the bound (the caller then reads every group again).
    pub fn take_group_notices(&self) -> (Vec<Notice>, bool) {
        self.group_notices.take()
    }

    /// `slot`'s last seq as the last apply left it (in memory, no read).
    pub fn feed_last_seq(&self, slot: u32) -> u64 {
        self.feed_tips.last(slot)
    }

    /// Moves whenever ownership, a fence or the whole state changed (`feed::Tips`).
    pub fn feed_epoch(&self) -> u64 {
        self.feed_tips.epoch()
    }

    /// `group`'s record in `slot`, as applied.
    pub fn group_record(&self, slot: u32, group: &str) -> Result<Option<GroupRecord>> {
        let _r = self.read_guard();
        self.group_record_unlocked(slot, group)
    }

    fn group_record_unlocked(&self, slot: u32, group: &str) -> Result<Option<GroupRecord>> {
        let key = record_key(slot, group);
        self.data
            .get(&key)?
            .map(|raw| decode_record(&key, &raw))
            .transpose()
    }

    /// The names of `slot`'s groups, sorted.
    pub fn group_names(&self, slot: u32) -> Result<Vec<String>> {
        let key = index_key(slot);
        match self.data.get(&key)? {
            Some(raw) => decode_index(&key, &raw),
            None => Ok(Vec::new()),
        }
    }

    /// The seq below which `slot`'s live groups (not expired) need no event (the lowest
    /// `committed_seq + 1` among them); `None` without a live group.
    pub(super) fn groups_protect(&self, slot: u32) -> Result<Option<u64>> {
        let mut lowest = None;
        for name in self.group_names(slot)? {
            let Some(rec) = self.group_record_unlocked(slot, &name)? else {
                continue;
            };
            let state = rec.state.unwrap_or_default();
            if !state.expired {
                let need = state.committed_seq + 1;
                lowest = Some(lowest.map_or(need, |l: u64| l.min(need)));
            }
        }
        Ok(lowest)
    }

    /// `group` as this replica's owned slots hold it (`None`: in none of them), with each
    /// slot's lag at `now_ms`; `pending` is left 0 (deliveries in flight are the leader's
    /// dispatcher's, in memory).
    pub fn describe_group(&self, group: &str, now_ms: u64) -> Result<Option<ConsumerGroup>> {
        let ownership = self.ownership();
        let _r = self.read_guard();
        let mut out: Option<ConsumerGroup> = None;
        for slot in (0..self.slot_count).filter(|s| ownership.owns(*s)) {
            let Some(rec) = self.group_record_unlocked(slot, group)? else {
                continue;
            };
            let def = rec.def.unwrap_or_default();
            let gs = self.group_slot(slot, &rec.state.unwrap_or_default(), now_ms)?;
            let cg = out.get_or_insert_with(|| definition(&def));
            cg.shard_keys.extend(def.shard_keys);
            cg.lag_events += gs.lag_events;
            cg.redeliveries += gs.redeliveries;
            cg.parked += gs.parked.len() as u64;
            cg.expired |= gs.expired;
            cg.slots.push(gs);
        }
        Ok(out)
    }

    fn group_slot(&self, slot: u32, s: &GroupSlotState, now_ms: u64) -> Result<GroupSlot> {
        let meta = self.feed_meta_of(slot)?;
        let acked_above: u64 = s.done.iter().map(|r| r.last - r.first + 1).sum();
        let lag_events = meta
            .last_seq
            .saturating_sub(s.committed_seq)
            .saturating_sub(acked_above);
        let lag_ms = match lag_events {
            0 => 0,
            _ => self
                .feed_event(slot, s.committed_seq + 1)?
                .map_or(0, |e| now_ms.saturating_sub(e.commit_ts_ms)),
        };
        Ok(GroupSlot {
            slot,
            committed_seq: s.committed_seq,
            acked_above,
            lag_events,
            lag_ms,
            pending: 0,
            // Delivered more than once: more than one counted attempt (a failover's fence
            // alone is not a redelivery).
            redeliveries: s
                .deliveries
                .iter()
                .filter(|d| d.attempt > d.unparked_at.saturating_add(1))
                .count() as u64,
            parked: s.parked.clone(),
            expired: s.expired,
        })
    }
}

/// A `ConsumerGroup` with `def`'s definition and no slot yet.
fn definition(def: &GroupDef) -> ConsumerGroup {
    ConsumerGroup {
        group: def.group.clone(),
        key_prefix: def.key_prefix.clone(),
        mode: def.mode,
        ack_wait_ms: def.ack_wait_ms,
        max_deliver: def.max_deliver,
        poison: def.poison,
        ..Default::default()
    }
}
