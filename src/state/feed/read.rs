//! Reading one slot's change log from sled (never from the apply path), under the view lock so a
//! page never sees half of an applied batch: from a position, filtered on the node, bounded per
//! page, with continuity checked on every page (the first event read is the position + 1, or
//! the read is `CursorExpired`).

use bytes::Bytes;
use ordo_proto::v1::change_event::Op;
use ordo_proto::v1::{ChangeEvent, SlotPosition};

use super::{decode_event, event_key, meta_key, seq_of, Meta};
use crate::error::{Error, Result};
use crate::limits::FEED_PAGE_SCAN_MAX;
use crate::state::{keys, participant, StateMachine};

/// Which events a reader wants (both empty: all).
pub struct Filter<'a> {
    pub shard_keys: &'a [Bytes],
    pub key_prefix: &'a [u8],
}

impl Filter<'_> {
    fn matches(&self, shard_key: &[u8], key: &[u8]) -> bool {
        key.starts_with(self.key_prefix)
            && (self.shard_keys.is_empty() || self.shard_keys.iter().any(|s| s == shard_key))
    }
}

/// Where a read of one slot starts (`SlotFrom`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    AfterSeq(u64),
    Oldest,
    Now,
    AfterTs(u64),
    Snapshot,
}

/// Which slots a page reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slots {
    Every,
    Changed,
}

/// One reader's position in one slot, kept by the reader between pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub slot: u32,
    /// The last seq read (filtered-out events included).
    pub seq: u64,
    /// While a snapshot start streams the slot's items: the data key to go on from.
    snapshot: Option<Vec<u8>>,
    /// The highest resolved time sent for the slot (it never goes back).
    resolved: u64,
    /// What the last read of the slot saw (`None`: not read yet).
    seen: Option<Seen>,
}

/// A slot as a read left it: the tips' epoch then, and whether it was owned, unfenced and read
/// to its end (its resolved time is then the group's, with no part prepared).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    epoch: u64,
    live: bool,
}

/// One page of a read over several slots.
#[derive(Debug, Default)]
pub struct Page {
    pub events: Vec<ChangeEvent>,
    /// One per cursor, in the cursors' order.
    pub positions: Vec<SlotPosition>,
    /// The lowest of the slots' resolved times.
    pub resolved_ts_ms: u64,
    /// A slot has more to read now (the page filled up): read again without waiting.
    pub more: bool,
}

/// What one page may still take.
struct Room {
    events: usize,
    bytes: u64,
    scanned: usize,
}

impl Room {
    /// Whether one more event of `bytes` fits (a page always takes its first).
    fn take(&mut self, page: &[ChangeEvent], bytes: usize) -> bool {
        if self.scanned == 0
            || (!page.is_empty() && (self.events == 0 || self.bytes < bytes as u64))
        {
            return false;
        }
        self.scanned -= 1;
        true
    }

    fn sent(&mut self, bytes: usize) {
        self.events = self.events.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes as u64);
    }
}

/// The last seq held with a commit time at or before `ts` (`first_seq - 1` if none), `ts_of`
/// giving an event's commit time: commit times are non-decreasing per slot, so a binary search
/// over seqs.
pub(in crate::state) fn last_seq_at_or_before(
    meta: &Meta,
    ts: u64,
    mut ts_of: impl FnMut(u64) -> Result<u64>,
) -> Result<u64> {
    let (mut lo, mut hi) = (meta.first_seq, meta.last_seq + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if ts_of(mid)? <= ts {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo - 1)
}

impl StateMachine {
    pub(in crate::state) fn feed_meta_of(&self, slot: u32) -> Result<Meta> {
        let key = meta_key(slot);
        match self.data.get(&key)? {
            Some(raw) => Meta::decode(&key, &raw),
            None => Ok(Meta::default()),
        }
    }

    /// Event `seq` of `slot`, if held.
    pub(in crate::state) fn feed_event(&self, slot: u32, seq: u64) -> Result<Option<ChangeEvent>> {
        let key = event_key(slot, seq);
        self.data
            .get(&key)?
            .map(|raw| decode_event(&key, &raw))
            .transpose()
    }

    fn expired(&self, slot: u32, meta: &Meta, requested_seq: u64) -> Result<Error> {
        let oldest_ts_ms = self
            .feed_event(slot, meta.first_seq)?
            .map_or(0, |e| e.commit_ts_ms);
        Ok(Error::CursorExpired {
            slot,
            oldest_seq: meta.first_seq,
            oldest_ts_ms,
            requested_seq,
        })
    }

    /// Where a read of `slot` from `start` begins. A seq or a time older than what was trimmed
    /// is `CursorExpired` (with `requested_seq` 0 for a start by time: it names no seq).
    pub fn feed_start(&self, slot: u32, start: Start) -> Result<Cursor> {
        let _r = self.read_guard();
        let meta = self.feed_meta_of(slot)?;
        let mut cursor = Cursor {
            slot,
            seq: 0,
            snapshot: None,
            resolved: 0,
            seen: None,
        };
        cursor.seq = match start {
            Start::AfterSeq(seq) if seq + 1 < meta.first_seq => {
                return Err(self.expired(slot, &meta, seq + 1)?)
            }
            Start::AfterSeq(seq) => seq,
            Start::Oldest => meta.first_seq - 1,
            Start::Now => meta.last_seq,
            Start::Snapshot => {
                cursor.snapshot = Some(keys::slot_start(slot));
                meta.last_seq
            }
            Start::AfterTs(ts) if meta.trimmed_ts > ts => return Err(self.expired(slot, &meta, 0)?),
            Start::AfterTs(ts) => self.last_seq_at_or_before(slot, &meta, ts)?,
        };
        Ok(cursor)
    }

    fn last_seq_at_or_before(&self, slot: u32, meta: &Meta, ts: u64) -> Result<u64> {
        last_seq_at_or_before(meta, ts, |seq| {
            Ok(self.feed_event(slot, seq)?.map_or(0, |e| e.commit_ts_ms))
        })
    }

    /// The next page over `cursors`, in their order, at most `events_max` events and about
    /// `bytes_max` bytes (at least one event when any is due), each cursor moved past what it
    /// read. `Slots::Every` reads every slot and gives each a position; `Slots::Changed` reads
    /// only the slots with something new since their last read (events, a trim of unread
    /// events, a change of owner or fence, a snapshot still streaming, or never read): the
    /// others keep their position and get no `SlotPosition`, but their resolved time still
    /// follows the group's while nothing is prepared. The page's `resolved_ts_ms` covers every
    /// cursor.
    pub fn feed_page(
        &self,
        slots: Slots,
        cursors: &mut [Cursor],
        filter: &Filter<'_>,
        events_max: usize,
        bytes_max: u64,
    ) -> Result<Page> {
        let mut room = Room {
            events: events_max,
            bytes: bytes_max,
            scanned: FEED_PAGE_SCAN_MAX,
        };
        let mut page = Page {
            resolved_ts_ms: u64::MAX,
            ..Page::default()
        };
        for c in cursors.iter_mut() {
            // One slot at a time under the view lock (its events, position and resolved time
            // agree), never a whole page: an apply waits for one slot's read at most.
            let _r = self.read_guard();
            if slots == Slots::Changed && self.unchanged(c) {
                page.resolved_ts_ms = page.resolved_ts_ms.min(c.resolved);
                continue;
            }
            let owned = self.ownership.read().unwrap().owns(c.slot);
            let (pos, more) = self.read_slot(c, owned, filter, &mut room, &mut page.events)?;
            c.seen = Some(Seen {
                epoch: self.feed_tips.epoch(),
                live: owned && !more && !pos.snapshotting && !self.fenced(c.slot),
            });
            page.resolved_ts_ms = page.resolved_ts_ms.min(pos.resolved_ts_ms);
            page.more |= pos.snapshotting || more;
            page.positions.push(pos);
        }
        if cursors.is_empty() {
            page.resolved_ts_ms = 0;
        }
        Ok(page)
    }

    /// Whether `c`'s slot has nothing new since its last read (under the view lock): no event
    /// after its position and the same epoch. Its resolved time then moves up to the group's
    /// applied time when that is what a read would give it (owned, unfenced, at its end, and
    /// no part prepared anywhere in the group).
    fn unchanged(&self, c: &mut Cursor) -> bool {
        let Some(seen) = c.seen else {
            return false;
        };
        let tips = &self.feed_tips;
        if c.snapshot.is_some() || seen.epoch != tips.epoch() || tips.last(c.slot) != c.seq {
            return false;
        }
        if seen.live && self.locks_held() == 0 {
            let group = self.feed_ts.load(std::sync::atomic::Ordering::Acquire);
            c.resolved = c.resolved.max(group);
        }
        true
    }

    fn fenced(&self, slot: u32) -> bool {
        self.moving.read().unwrap().fenced(slot).is_some()
    }

    /// One slot's share of a page: its position, and whether events are left to read.
    fn read_slot(
        &self,
        c: &mut Cursor,
        owned: bool,
        filter: &Filter<'_>,
        room: &mut Room,
        out: &mut Vec<ChangeEvent>,
    ) -> Result<(SlotPosition, bool)> {
        let meta = self.feed_meta_of(c.slot)?;
        if c.snapshot.is_some() {
            if !owned {
                // Its items are leaving: the snapshot must start again at the new owner.
                return Err(Error::WrongShard {
                    slot: c.slot,
                    map_version: self.ownership().map_version,
                });
            }
            self.read_snapshot(c, filter, room, out)?;
        }
        let mut at_end = c.snapshot.is_none();
        if at_end && c.seq + 1 < meta.first_seq {
            if owned {
                return Err(self.expired(c.slot, &meta, c.seq + 1)?);
            }
        } else if at_end {
            at_end = self.read_events(c, filter, room, out)?;
        }
        let moved = !owned && at_end;
        let resolved = self.slot_resolved(c, &meta, owned, at_end)?;
        let pos = SlotPosition {
            slot: c.slot,
            seq: c.seq,
            oldest_seq: meta.first_seq,
            moved,
            resolved_ts_ms: resolved,
            snapshotting: c.snapshot.is_some(),
        };
        Ok((pos, !at_end))
    }

    /// Events after `c.seq`, as many as fit; whether the slot has none left.
    fn read_events(
        &self,
        c: &mut Cursor,
        filter: &Filter<'_>,
        room: &mut Room,
        out: &mut Vec<ChangeEvent>,
    ) -> Result<bool> {
        for kv in self
            .data
            .range(event_key(c.slot, c.seq + 1)..meta_key(c.slot))
        {
            let (k, raw) = kv?;
            let seq = seq_of(&k)?;
            if seq != c.seq + 1 {
                return Err(Error::Corruption(format!(
                    "slot {}: the change log holds seq {seq} after {} (a gap)",
                    c.slot, c.seq
                )));
            }
            if !room.take(out, raw.len()) {
                return Ok(false);
            }
            let ev = decode_event(&k, &raw)?;
            c.seq = seq;
            if filter.matches(&ev.shard_key, &ev.key) {
                room.sent(raw.len());
                out.push(ev);
            }
        }
        Ok(true)
    }

    /// The slot's items after `c.snapshot` as OP_SNAPSHOT events, as many as fit; the snapshot
    /// ends (and the events after the seq it recorded follow) once every item was read.
    fn read_snapshot(
        &self,
        c: &mut Cursor,
        filter: &Filter<'_>,
        room: &mut Room,
        out: &mut Vec<ChangeEvent>,
    ) -> Result<()> {
        let from = c.snapshot.take().expect("snapshotting");
        // Items sort before the slot's reserved range.
        let end = keys::reserved_prefix(c.slot, 0);
        for kv in self.data.range(from..end) {
            let (k, raw) = kv?;
            if !room.take(out, raw.len()) {
                c.snapshot = Some(k.to_vec());
                return Ok(());
            }
            let (_, sk, key) = keys::decode_key(&k)?;
            if !filter.matches(sk, key) {
                continue;
            }
            let (version, value) = super::super::checked_value(self.node_id, &k, &raw)?;
            room.sent(raw.len());
            out.push(ChangeEvent {
                slot: c.slot,
                seq: 0,
                shard_key: Bytes::copy_from_slice(sk),
                key: Bytes::copy_from_slice(key),
                op: Op::Snapshot as i32,
                version,
                value: Bytes::copy_from_slice(value),
                ..Default::default()
            });
        }
        Ok(())
    }

    /// The slot's resolved time after this page: every change of it committed at or before
    /// it is in this page or an earlier one. The group's last applied time, held below the
    /// oldest part prepared in the slot and not finished, raised to just below the slot's floor
    /// (later events are at or above it); frozen below the floor once the slot is fenced or gone
    /// (its next events are the new owner's, above the floor); and below the next event not yet
    /// sent. Never lower than what was sent before.
    fn slot_resolved(&self, c: &mut Cursor, meta: &Meta, owned: bool, at_end: bool) -> Result<u64> {
        let floor = meta.floor_ts.saturating_sub(1);
        let frozen = !owned || self.fenced(c.slot);
        let mut r = if frozen {
            floor
        } else {
            let mut r = self.feed_ts.load(std::sync::atomic::Ordering::Acquire);
            // Every prepared part holds locks: with none held (the counter agrees with the data
            // under the view lock) there is no part to scan for.
            let parts = self.locks_held() > 0;
            if let Some(prepared) = parts
                .then(|| participant::oldest_part_ts(&self.data, c.slot))
                .transpose()?
                .flatten()
            {
                r = r.min(prepared.saturating_sub(1));
            }
            r.max(floor)
        };
        if !at_end {
            if let Some(next) = self.feed_event(c.slot, c.seq + 1)? {
                r = r.min(next.commit_ts_ms.saturating_sub(1));
            }
        }
        c.resolved = c.resolved.max(r);
        Ok(c.resolved)
    }
}
