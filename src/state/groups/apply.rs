//! Applying consumer-group commands (`GroupCommand`) and transactional acks (`TxnOp.feed_ack`)
//! inside the apply transaction. Every check depends only on the command and the replicated
//! state, so every replica refuses the same ones; a refused command (or ack) writes nothing.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use ordo_proto::v1::group_ack::Done;
use ordo_proto::v1::group_command::Op;
use ordo_proto::v1::{
    FeedAckRequest, GroupAck, GroupCommand, GroupCreate, GroupDef, GroupDelivery, GroupHorizon,
    GroupPark, GroupRecord, GroupSkip, GroupSlotState, GroupUnpark, ParkedOrder,
};

use super::{attempt_of, delivery, is_done, mark_done, record_attempt, At, Notice};
use crate::error::{Error, Result};
use crate::limits::{
    FEED_GROUPS_MAX, FEED_GROUP_BATCH_MAX, FEED_GROUP_DELIVERIES_MAX, FEED_GROUP_DONE_RANGES_MAX,
    FEED_GROUP_PARKED_MAX, FEED_GROUP_SLOTS_PER_ENTRY,
};
use crate::state::migrate::Moving;
use crate::state::txn::ItemView;
use crate::state::{feed, keys, Ownership, TxView};

/// What a group command is checked against.
pub(in crate::state) struct Ctx<'a> {
    pub slot_count: u32,
    pub ownership: &'a Ownership,
    pub moving: &'a Moving,
}

/// What a group command did.
#[derive(Debug, Default)]
pub struct GroupApplied {
    /// Create, delete, seek: the owned slot the next command goes on from (`None`: every owned
    /// slot is done).
    pub next_slot: Option<u32>,
    /// Create: slots given the group's record; delete: slots that lost it; seek: slots moved.
    pub slots: u32,
    /// Acks, skips and delivery counts refused, each by its place in the command (acks first,
    /// then skips, then deliveries), with why; the others were applied.
    pub refused: Vec<(usize, Error)>,
}

/// Applies `cmd`: `Ok(Err(_))` is a refusal that changed nothing.
pub(in crate::state) fn apply(
    view: &mut TxView<'_>,
    ctx: &Ctx<'_>,
    cmd: &GroupCommand,
) -> Result<Result<GroupApplied>> {
    match &cmd.op {
        Some(Op::Create(c)) => create(view, ctx, c),
        Some(Op::Delete(d)) => each_slot(view, ctx, &d.group, d.from_slot, |v, slot, _| {
            let mut names = v.group_names(slot)?;
            names.retain(|n| *n != d.group);
            v.put_group_names(slot, &names)?;
            v.changed(&d.group, slot);
            v.delete_raw(slot, super::record_key(slot, &d.group))
        }),
        Some(Op::Seek(s)) => {
            let at = match At::from_proto(s.to.as_ref()) {
                Ok(at) => at,
                Err(e) => return Ok(Err(e)),
            };
            each_slot(view, ctx, &s.group, s.from_slot, |v, slot, mut rec| {
                // The horizon stays: deliveries made before the seek are still fenced.
                let horizon = rec.state.as_ref().map_or(0, |s| s.horizon);
                rec.state = Some(GroupSlotState {
                    committed_seq: v.group_start(slot, at)?,
                    horizon,
                    ..Default::default()
                });
                v.changed(&s.group, slot);
                v.put_group_record(slot, &rec)
            })
        }
        Some(Op::Acks(a)) => {
            if let Some(e) = over_batch(a.acks.len() + a.skips.len()) {
                return Ok(Err(e));
            }
            let mut flush = Flush::default();
            flush.each(view, ctx, &a.acks, ack_one)?;
            flush.each(view, ctx, &a.skips, |v, c, r, k| skip_one(v, c, r, k))?;
            flush.done(view)
        }
        Some(Op::Deliveries(d)) => {
            if let Some(e) = over_batch(d.deliveries.len()) {
                return Ok(Err(e));
            }
            let mut flush = Flush::default();
            flush.each(view, ctx, &d.deliveries, |v, c, r, x| {
                deliver_one(v, c, r, x)
            })?;
            flush.done(view)
        }
        Some(Op::Horizons(h)) => {
            if let Some(e) = over_batch(h.horizons.len()) {
                return Ok(Err(e));
            }
            let mut flush = Flush::default();
            flush.each(view, ctx, &h.horizons, |v, c, r, x| horizon_one(v, c, r, x))?;
            flush.done(view)
        }
        Some(Op::Park(p)) => Ok(park(view, ctx, p)?.map(|()| GroupApplied::default())),
        Some(Op::Unpark(u)) => Ok(unpark(view, ctx, u)?.map(|()| GroupApplied::default())),
        None => Ok(Err(Error::InvalidArgument(
            "a group command with no op".into(),
        ))),
    }
}

/// A flush of entries (acks, skips, attempts, horizons), each applied or refused on its own,
/// the records they change written once at the end; refusals by place in the command.
#[derive(Default)]
struct Flush<'c> {
    records: Records<'c>,
    refused: Vec<(usize, Error)>,
    seen: usize,
}

type One<'c, T> = fn(&mut TxView<'_>, &Ctx<'_>, &mut Records<'c>, &'c T) -> Result<Result<()>>;

impl<'c> Flush<'c> {
    fn each<T>(
        &mut self,
        view: &mut TxView<'_>,
        ctx: &Ctx<'_>,
        entries: &'c [T],
        one: One<'c, T>,
    ) -> Result<()> {
        for entry in entries {
            if let Err(e) = one(view, ctx, &mut self.records, entry)? {
                self.refused.push((self.seen, e));
            }
            self.seen += 1;
        }
        Ok(())
    }

    fn done(self, view: &mut TxView<'_>) -> Result<Result<GroupApplied>> {
        self.records.write(view)?;
        Ok(Ok(GroupApplied {
            refused: self.refused,
            ..Default::default()
        }))
    }
}

/// The refusal of a flush of `n` acks, skips or attempts, if over `FEED_GROUP_BATCH_MAX`.
fn over_batch(n: usize) -> Option<Error> {
    (n > FEED_GROUP_BATCH_MAX).then(|| {
        Error::ResourceExhausted(format!(
            "a group flush of {n} entries is over FEED_GROUP_BATCH_MAX ({FEED_GROUP_BATCH_MAX}); \
             nothing was applied"
        ))
    })
}

/// Why a group's state in `slot` cannot change here, if it cannot: no such slot, fenced by a
/// move, or not owned.
fn unwritable(ctx: &Ctx<'_>, slot: u32) -> Option<Error> {
    if slot >= ctx.slot_count {
        return Some(Error::InvalidArgument(format!(
            "slot {slot} does not exist (the cluster has {} slots)",
            ctx.slot_count
        )));
    }
    ctx.moving.fenced(slot).or_else(|| {
        (!ctx.ownership.owns(slot)).then_some(Error::WrongShard {
            slot,
            map_version: ctx.ownership.map_version,
        })
    })
}

/// The owned slots a create, delete or seek covers from `from` on (those of `shard_keys` when
/// it names some), at most `FEED_GROUP_SLOTS_PER_ENTRY`, and the owned slot after them.
fn covered(ctx: &Ctx<'_>, shard_keys: &[bytes::Bytes], from: u32) -> (Vec<u32>, Option<u32>) {
    let mut slots: Vec<u32> = if shard_keys.is_empty() {
        (from..ctx.slot_count).collect()
    } else {
        let mut s: Vec<u32> = shard_keys
            .iter()
            .map(|k| ordo_proto::slot_of(k, ctx.slot_count))
            .filter(|s| *s >= from)
            .collect();
        s.sort_unstable();
        s.dedup();
        s
    };
    slots.retain(|s| ctx.ownership.owns(*s));
    let next = slots.get(FEED_GROUP_SLOTS_PER_ENTRY).copied();
    slots.truncate(FEED_GROUP_SLOTS_PER_ENTRY);
    (slots, next)
}

/// Runs `change` on the record of `group` in each owned slot from `from` on that holds one (at
/// most `FEED_GROUP_SLOTS_PER_ENTRY` slots looked at); refused whole if one of them is fenced.
fn each_slot(
    view: &mut TxView<'_>,
    ctx: &Ctx<'_>,
    group: &str,
    from: u32,
    mut change: impl FnMut(&mut TxView<'_>, u32, GroupRecord) -> Result<()>,
) -> Result<Result<GroupApplied>> {
    let (slots, next_slot) = covered(ctx, &[], from);
    if let Some(e) = slots.iter().find_map(|s| ctx.moving.fenced(*s)) {
        return Ok(Err(e));
    }
    let mut done = 0;
    for slot in slots {
        if let Some(rec) = view.group_record(slot, group)? {
            change(view, slot, rec)?;
            done += 1;
        }
    }
    Ok(Ok(GroupApplied {
        next_slot,
        slots: done,
        ..Default::default()
    }))
}

/// The definition a slot's record keeps: `def` with only the shard keys of `slot`.
fn slot_def(def: &GroupDef, slot: u32, slot_count: u32) -> GroupDef {
    GroupDef {
        shard_keys: def
            .shard_keys
            .iter()
            .filter(|k| ordo_proto::slot_of(k, slot_count) == slot)
            .cloned()
            .collect(),
        ..def.clone()
    }
}

/// Gives every covered slot without the group its record, starting where the command says;
/// idempotent for slots that have it with the same definition, refused whole (nothing
/// written) if one has another definition or a slot would hold more than `FEED_GROUPS_MAX`.
fn create(view: &mut TxView<'_>, ctx: &Ctx<'_>, c: &GroupCreate) -> Result<Result<GroupApplied>> {
    let (Some(def), Ok(at)) = (&c.def, At::from_proto(c.start.as_ref())) else {
        return Ok(Err(Error::InvalidArgument(
            "a group create needs a definition and a start".into(),
        )));
    };
    // The slot's index is names one per line: only a checked name may enter it.
    if let Err(why) = ordo_proto::check_group_name(&def.group) {
        return Ok(Err(Error::InvalidArgument(why)));
    }
    let (slots, next_slot) = covered(ctx, &def.shard_keys, c.from_slot);
    if let Some(e) = slots.iter().find_map(|s| ctx.moving.fenced(*s)) {
        return Ok(Err(e));
    }
    let mut todo = Vec::new();
    for slot in slots {
        let want = slot_def(def, slot, ctx.slot_count);
        match view.group_record(slot, &def.group)? {
            Some(rec) if rec.def.as_ref() == Some(&want) => {}
            Some(_) => {
                return Ok(Err(Error::AlreadyExists(format!(
                    "consumer group {:?} exists with another definition (slot {slot}); \
                     delete it first or use another name; nothing was changed",
                    def.group
                ))))
            }
            None => {
                let names = view.group_names(slot)?;
                if names.len() >= FEED_GROUPS_MAX {
                    return Ok(Err(Error::ResourceExhausted(format!(
                        "slot {slot} already holds {} consumer groups, FEED_GROUPS_MAX \
                         ({FEED_GROUPS_MAX}); delete one first; nothing was changed",
                        names.len()
                    ))));
                }
                todo.push((slot, names, want));
            }
        }
    }
    let created = todo.len() as u32;
    for (slot, mut names, want) in todo {
        let rec = GroupRecord {
            def: Some(want),
            state: Some(GroupSlotState {
                committed_seq: view.group_start(slot, at)?,
                ..Default::default()
            }),
        };
        view.put_group_record(slot, &rec)?;
        view.changed(&def.group, slot);
        let at = names.partition_point(|n| *n < def.group);
        names.insert(at, def.group.clone());
        view.put_group_names(slot, &names)?;
    }
    Ok(Ok(GroupApplied {
        next_slot,
        slots: created,
        ..Default::default()
    }))
}

/// The records one command changes, each read once and written once, at its end: a flush may
/// ack many events of one slot, and the record is decoded and encoded once for all of them.
#[derive(Default)]
struct Records<'c>(BTreeMap<(u32, &'c str), (GroupRecord, bool)>);

impl<'c> Records<'c> {
    /// The state of `group` in `slot` for a change to its event `seq` (mark it changed with
    /// the flag): refused if the slot cannot change here, the slot has no such event yet, or
    /// the group is not there.
    fn get(
        &mut self,
        view: &TxView<'_>,
        ctx: &Ctx<'_>,
        group: &'c str,
        slot: u32,
        seq: u64,
    ) -> Result<Result<(&mut GroupSlotState, &mut bool)>> {
        if let Some(e) = unwritable(ctx, slot) {
            return Ok(Err(e));
        }
        let last = view.feed_meta_peek(slot)?.last_seq;
        if seq == 0 || seq > last {
            return Ok(Err(Error::InvalidArgument(format!(
                "slot {slot} has no event {seq} (its last is {last})"
            ))));
        }
        self.record(view, group, slot)
    }

    /// The state of `group` in `slot`, whatever its events (the caller checked the slot).
    fn record(
        &mut self,
        view: &TxView<'_>,
        group: &'c str,
        slot: u32,
    ) -> Result<Result<(&mut GroupSlotState, &mut bool)>> {
        let (rec, changed) = match self.0.entry((slot, group)) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => match view.group_record(slot, group)? {
                Some(rec) => v.insert((rec, false)),
                None => return Ok(Err(unknown(group, slot))),
            },
        };
        Ok(Ok((state_of(rec), changed)))
    }

    /// Writes the records that changed.
    fn write(self, view: &mut TxView<'_>) -> Result<()> {
        for ((slot, _), (rec, changed)) in self.0 {
            if changed {
                view.put_group_record(slot, &rec)?;
            }
        }
        Ok(())
    }
}

fn unknown(group: &str, slot: u32) -> Error {
    Error::NotFound(format!(
        "consumer group {group:?} has no state in slot {slot} here"
    ))
}

/// The state of a record (always present in records this module writes).
fn state_of(rec: &mut GroupRecord) -> &mut GroupSlotState {
    rec.state.get_or_insert_with(Default::default)
}

/// Refused if `attempt` is not event `seq`'s current one (an event already done accepts any:
/// acks are idempotent).
fn check_attempt(s: &GroupSlotState, group: &str, slot: u32, seq: u64, attempt: u32) -> Result<()> {
    let current = attempt_of(s, seq);
    if is_done(s, seq) || attempt == current {
        return Ok(());
    }
    Err(Error::StaleDelivery {
        group: group.to_string(),
        slot,
        seq,
        attempt,
        current_attempt: current,
    })
}

fn too_many_ranges(slot: u32) -> Error {
    Error::ResourceExhausted(format!(
        "slot {slot}: the group keeps FEED_GROUP_DONE_RANGES_MAX ({FEED_GROUP_DONE_RANGES_MAX}) \
         ranges of done events above its committed seq; this ack waits until earlier events are \
         done; nothing was applied"
    ))
}

/// One ack of a flush (or a transactional ack): checked, then the event marked done (a dead
/// letter also written under its order).
fn ack_one<'c>(
    view: &mut TxView<'_>,
    ctx: &Ctx<'_>,
    records: &mut Records<'c>,
    a: &'c GroupAck,
) -> Result<Result<()>> {
    let (s, changed) = match records.get(view, ctx, &a.group, a.slot, a.seq)? {
        Ok(found) => found,
        Err(e) => return Ok(Err(e)),
    };
    if let Err(e) = check_attempt(s, &a.group, a.slot, a.seq, a.attempt) {
        return Ok(Err(e));
    }
    if is_done(s, a.seq) {
        return Ok(Ok(()));
    }
    // A prepared cross-group Txn acks it (or not) at its finish.
    if let Some(e) = crate::state::participant::ack_lock(view, &a.group, a.slot, a.seq)? {
        return Ok(Err(e));
    }
    // Within the bound before anything is written (a dead letter writes an item).
    if !mark_done(&mut s.clone(), a.seq, a.seq) {
        return Ok(Err(too_many_ranges(a.slot)));
    }
    if a.done == Done::DeadLettered as i32 {
        if let Err(e) = dead_letter(view, &a.group, a.slot, a.seq)? {
            return Ok(Err(e));
        }
    }
    mark_done(s, a.seq, a.seq);
    *changed = true;
    Ok(Ok(()))
}

/// Writes event `seq` of `slot` under its own shard key, key `dlq/<group>/<seq>` (20 digits),
/// its value the event as the log holds it (a `ChangeEvent`).
fn dead_letter(view: &mut TxView<'_>, group: &str, slot: u32, seq: u64) -> Result<Result<()>> {
    let key = feed::event_key(slot, seq);
    let Some(raw) = view.data.get(&key).map_err(crate::state::tx_err)? else {
        return Ok(Err(Error::FailedPrecondition(format!(
            "slot {slot}: event {seq} is no longer held, it cannot be dead-lettered"
        ))));
    };
    let (_, body) = keys::decode_value(&key, &raw)?;
    let event = feed::decode_event(&key, &raw)?;
    let item = format!("dlq/{group}/{seq:020}");
    let prev = crate::state::txn::ItemRead::get(&*view, &event.shard_key, item.as_bytes())?;
    let version = prev.as_ref().map_or(0, |(v, _)| *v) + 1;
    let old = prev.as_ref().map(|(_, v)| v.as_ref());
    view.put(&event.shard_key, item.as_bytes(), version, body, old)?;
    Ok(Ok(()))
}

fn skip_one<'c>(
    view: &TxView<'_>,
    ctx: &Ctx<'_>,
    records: &mut Records<'c>,
    k: &'c GroupSkip,
) -> Result<Result<()>> {
    if k.first_seq > k.last_seq {
        return Ok(Err(Error::InvalidArgument(format!(
            "a skip of seqs {}..={} is empty",
            k.first_seq, k.last_seq
        ))));
    }
    let (s, changed) = match records.get(view, ctx, &k.group, k.slot, k.last_seq)? {
        Ok(found) => found,
        Err(e) => return Ok(Err(e)),
    };
    if !mark_done(s, k.first_seq, k.last_seq) {
        return Ok(Err(too_many_ranges(k.slot)));
    }
    *changed = true;
    Ok(Ok(()))
}

/// Records a redelivery's attempt (higher than the current one; the same again, or an event
/// already done, changes nothing).
fn deliver_one<'c>(
    view: &TxView<'_>,
    ctx: &Ctx<'_>,
    records: &mut Records<'c>,
    d: &'c GroupDelivery,
) -> Result<Result<()>> {
    let (s, changed) = match records.get(view, ctx, &d.group, d.slot, d.seq)? {
        Ok(found) => found,
        Err(e) => return Ok(Err(e)),
    };
    let current = attempt_of(s, d.seq);
    if is_done(s, d.seq) || d.attempt == current {
        return Ok(Ok(()));
    }
    if d.attempt < current {
        return Ok(Err(Error::StaleDelivery {
            group: d.group.clone(),
            slot: d.slot,
            seq: d.seq,
            attempt: d.attempt,
            current_attempt: current,
        }));
    }
    if !record_attempt(s, d.seq, d.attempt, FEED_GROUP_DELIVERIES_MAX) {
        return Ok(Err(Error::ResourceExhausted(format!(
            "slot {}: the group keeps FEED_GROUP_DELIVERIES_MAX ({FEED_GROUP_DELIVERIES_MAX}) \
             delivery counts; this redelivery waits until earlier events are done",
            d.slot
        ))));
    }
    if let Ok(i) = delivery(s, d.seq) {
        let count = &mut s.deliveries[i];
        count.unparked_at = count.unparked_at.max(d.base.min(d.attempt));
    }
    *changed = true;
    Ok(Ok(()))
}

/// Raises a slot's horizon (a lower or equal one changes nothing). It may run ahead of the
/// slot's log: the leader asks for room before it reads.
fn horizon_one<'c>(
    view: &TxView<'_>,
    ctx: &Ctx<'_>,
    records: &mut Records<'c>,
    h: &'c GroupHorizon,
) -> Result<Result<()>> {
    if let Some(e) = unwritable(ctx, h.slot) {
        return Ok(Err(e));
    }
    let (s, changed) = match records.record(view, &h.group, h.slot)? {
        Ok(found) => found,
        Err(e) => return Ok(Err(e)),
    };
    if h.seq > s.horizon {
        s.horizon = h.seq;
        *changed = true;
    }
    Ok(Ok(()))
}

fn park(view: &mut TxView<'_>, ctx: &Ctx<'_>, p: &GroupPark) -> Result<Result<()>> {
    if ordo_proto::slot_of(&p.shard_key, ctx.slot_count) != p.slot {
        return Ok(Err(Error::InvalidArgument(format!(
            "shard key {} is not in slot {}",
            keys::printable(&p.shard_key),
            p.slot
        ))));
    }
    let mut records = Records::default();
    let (s, changed) = match records.get(view, ctx, &p.group, p.slot, p.seq)? {
        Ok(found) => found,
        Err(e) => return Ok(Err(e)),
    };
    if is_done(s, p.seq) || s.parked.iter().any(|o| o.shard_key == p.shard_key) {
        return Ok(Ok(()));
    }
    if s.parked.len() >= FEED_GROUP_PARKED_MAX {
        return Ok(Err(Error::ResourceExhausted(format!(
            "slot {}: the group has FEED_GROUP_PARKED_MAX ({FEED_GROUP_PARKED_MAX}) parked \
             orders; unpark some first",
            p.slot
        ))));
    }
    let order = ParkedOrder {
        shard_key: p.shard_key.clone(),
        seq: p.seq,
        attempts: attempt_of(s, p.seq),
    };
    let at = s.parked.partition_point(|o| o.seq < p.seq);
    s.parked.insert(at, order);
    *changed = true;
    records.write(view)?;
    Ok(Ok(()))
}

/// Releases a parked order: `max_deliver` counts its event's attempts from now on.
fn unpark(view: &mut TxView<'_>, ctx: &Ctx<'_>, u: &GroupUnpark) -> Result<Result<()>> {
    let slot = ordo_proto::slot_of(&u.shard_key, ctx.slot_count);
    if let Some(e) = unwritable(ctx, slot) {
        return Ok(Err(e));
    }
    let Some(mut rec) = view.group_record(slot, &u.group)? else {
        return Ok(Err(unknown(&u.group, slot)));
    };
    let s = state_of(&mut rec);
    let Some(i) = s.parked.iter().position(|o| o.shard_key == u.shard_key) else {
        return Ok(Err(Error::NotFound(format!(
            "consumer group {:?} has no parked order {}",
            u.group,
            keys::printable(&u.shard_key)
        ))));
    };
    let seq = s.parked.remove(i).seq;
    let attempt = attempt_of(s, seq);
    // Room is kept: an unpark never fails for the bound (the entry replaces the parked one).
    record_attempt(s, seq, attempt, usize::MAX);
    if let Ok(d) = delivery(s, seq) {
        s.deliveries[d].unparked_at = attempt;
    }
    view.put_group_record(slot, &rec)?;
    Ok(Ok(()))
}

impl TxView<'_> {
    /// Whether a transactional ack may be applied now: its shard key is in its slot, the group
    /// is there, the event exists, is not done yet (its Txn's writes were made for a delivery
    /// that another ack already settled: applying them would process the event twice) and its
    /// attempt is the current one.
    pub(in crate::state) fn check_txn_ack(&self, a: &FeedAckRequest) -> Result<Result<()>> {
        if ordo_proto::slot_of(&a.shard_key, self.slot_count) != a.slot {
            return Ok(Err(Error::InvalidArgument(format!(
                "feed_ack: shard key {} is not in slot {}",
                keys::printable(&a.shard_key),
                a.slot
            ))));
        }
        let Some(rec) = self.group_record(a.slot, &a.group)? else {
            return Ok(Err(unknown(&a.group, a.slot)));
        };
        let last = self.feed_meta_peek(a.slot)?.last_seq;
        if a.seq > last {
            return Ok(Err(Error::InvalidArgument(format!(
                "feed_ack: slot {} has no event {} (its last is {last})",
                a.slot, a.seq
            ))));
        }
        let s = rec.state.unwrap_or_default();
        if is_done(&s, a.seq) {
            return Ok(Err(Error::StaleDelivery {
                group: a.group.clone(),
                slot: a.slot,
                seq: a.seq,
                attempt: a.attempt,
                current_attempt: 0,
            }));
        }
        if let Err(e) = check_attempt(&s, &a.group, a.slot, a.seq, a.attempt) {
            return Ok(Err(e));
        }
        if !mark_done(&mut s.clone(), a.seq, a.seq) {
            return Ok(Err(too_many_ranges(a.slot)));
        }
        Ok(Ok(()))
    }

    /// Applies a transactional ack that `check_txn_ack` accepted in this transaction.
    pub(in crate::state) fn apply_txn_ack(&mut self, a: &FeedAckRequest) -> Result<()> {
        // A 2PC part's ack was checked at its prepare: the group may be gone since.
        let Some(mut rec) = self.group_record(a.slot, &a.group)? else {
            return Ok(());
        };
        if mark_done(state_of(&mut rec), a.seq, a.seq) {
            self.put_group_record(a.slot, &rec)?;
        }
        self.notices.push(Notice::Acked {
            group: a.group.clone(),
            slot: a.slot,
            seq: a.seq,
        });
        Ok(())
    }

    fn changed(&mut self, group: &str, slot: u32) {
        self.notices.push(Notice::Changed {
            group: group.to_string(),
            slot,
        });
    }
}
