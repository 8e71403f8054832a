//! One `Watch`: the merge of a `Peer.ReadChanges` stream per group holding watched slots.
//!
//! Every watched slot has a position, the last seq the client was sent (filtered-out events
//! included), its resolved time (the highest its replicas reported), and an owner group in the
//! router's map. Each group has a [`Reader`]: its slots and the stream open on one of its
//! replicas (a follower first). [`Watch::next`] reads one page from any reader that has one,
//! drops what the client already has (seq at or below the slot's position), and turns the page
//! into responses carrying the cursor of the positions after them and the resolved time (the
//! minimum over the slots, never lower than one already sent: a moved slot's stays frozen below
//! its fence until the new owner reports it). Nothing is read until the previous page's
//! responses are taken, so a page is the most the router holds per group.
//!
//! It follows the cluster: a stream that breaks or ends is reopened on another replica from the
//! slots' positions; a slot reported `moved` goes to the owner a newer map names (refreshed,
//! waited for within [`FEED_MOVE_WAIT_MAX`]); a `WrongShard` refreshes the map and reassigns
//! the group's slots. Any other error ends the watch with the node's status as it was (so a
//! `CursorExpired` reaches the client as `OUT_OF_RANGE` with its detail).
//!
//! A start without positions (now, oldest, a time, a snapshot) learns them from each group's
//! first page, which carries every slot of the request. Until every slot has one, a group's
//! first page waits (at most one page per group), since a cursor must name every slot; then
//! each slot starts at the position before the first event the page gave it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use ordo_proto::retry::{follow_leader, Effect, GaveUp, LeaderCursor, Walk, Why};
use ordo_proto::v1::change_event::Op;
use ordo_proto::v1::peer_client::PeerClient;
use ordo_proto::v1::{
    slot_from, ChangeEvent, ReadChangesRequest, ReadChangesResponse, SlotFrom, WatchResponse,
};
use prost::Message;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tonic::{Status, Streaming};

use super::{
    cursor, Plan, FEED_MOVE_WAIT_MAX, FEED_REOPEN_WITHIN, FEED_RESPONSE_BYTES_MAX,
    FEED_RESPONSE_EVENTS_MAX,
};
use crate::config::refresh_map;
use crate::map::replicas;
use crate::pool::MESSAGE_BYTES_MAX;
use crate::retry::{backoff, classify, describe, pass_through, Action, BACKOFF, MAX_ATTEMPTS};
use crate::Shared;

/// Longest wait for a replica to accept a change stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

struct Slot {
    /// The last seq sent (`None` until the start is resolved by a first page).
    pos: Option<u64>,
    /// The group reading it; 0 while it waits for an owner.
    group: u64,
    /// The group that reported it moved: the slot waits for a map naming another owner.
    left: Option<u64>,
    /// A snapshot start whose snapshot has not been read whole (`SlotPosition.snapshotting`):
    /// read again with a snapshot if its stream must be reopened (a consumer keeps the higher
    /// version).
    snapshot: bool,
    /// The highest resolved time its readers reported for it (`SlotPosition.resolved_ts_ms`).
    resolved: u64,
}

struct Reader {
    slots: BTreeSet<u32>,
    stream: Option<Streaming<ReadChangesResponse>>,
    /// The replica the stream is open on, or the last one that failed.
    addr: String,
    /// Failed opens and breaks since the last page (their backoff), and since when.
    failures: u32,
    failing_since: Option<Instant>,
    /// A first page held until every slot has a position.
    held: Option<ReadChangesResponse>,
}

impl Reader {
    fn new() -> Reader {
        Reader {
            slots: BTreeSet::new(),
            stream: None,
            addr: String::new(),
            failures: 0,
            failing_since: None,
            held: None,
        }
    }

    /// Drops the stream, so that the next read opens one for the current slots.
    fn restart(&mut self) {
        self.stream = None;
    }
}

pub(crate) struct Watch {
    shared: Arc<Shared>,
    slot_count: u32,
    start: slot_from::From,
    shard_keys: Vec<Bytes>,
    key_prefix: Bytes,
    slots: BTreeMap<u32, Slot>,
    readers: BTreeMap<u64, Reader>,
    /// Responses of the last page, not yet taken.
    ready: VecDeque<WatchResponse>,
    /// Every slot has a position.
    started: bool,
    resolved_sent: u64,
    /// The cursor and resolved time of the last response queued.
    last: (Bytes, u64),
    /// Which reader is polled first (turns, so no group starves the others).
    turn: usize,
    /// When a slot first waited for a new owner (bounded by [`FEED_MOVE_WAIT_MAX`]).
    waiting_since: Option<Instant>,
    _permit: OwnedSemaphorePermit,
}

impl Watch {
    pub(crate) fn new(shared: Arc<Shared>, plan: Plan, permit: OwnedSemaphorePermit) -> Watch {
        let snapshot = plan.start == slot_from::From::Snapshot(true);
        let started = plan.slots.iter().all(|(_, pos)| pos.is_some());
        let slots = plan
            .slots
            .into_iter()
            .map(|(s, pos)| {
                let slot = Slot {
                    pos,
                    group: 0,
                    left: None,
                    snapshot,
                    resolved: 0,
                };
                (s, slot)
            })
            .collect();
        Watch {
            shared,
            slot_count: plan.slot_count,
            start: plan.start,
            shard_keys: plan.shard_keys,
            key_prefix: plan.key_prefix,
            slots,
            readers: BTreeMap::new(),
            ready: VecDeque::new(),
            started,
            resolved_sent: 0,
            last: (Bytes::new(), 0),
            turn: 0,
            waiting_since: None,
            _permit: permit,
        }
    }

    /// The responses, until the watch fails or the router stops (its last item is the error:
    /// a stopping router's is `UNAVAILABLE`, so that a client resumes elsewhere rather than
    /// take the end of the stream for the end of the feed).
    pub(crate) fn into_stream(self) -> impl Stream<Item = Result<WatchResponse, Status>> + Send {
        futures::stream::unfold(Some(self), |watch| async move {
            let mut watch = watch?;
            let mut stop = watch.shared.stop.clone();
            tokio::select! {
                next = watch.next() => match next {
                    Ok(resp) => Some((Ok(resp), Some(watch))),
                    Err(status) => Some((Err(status), None)),
                },
                _ = stop.wait_for(|s| *s) => Some((Err(Status::unavailable(
                    "this router is stopping; resume from the last cursor at another router"
                )), None)),
            }
        })
    }

    /// The next response: from the last page if it left some, else from the next page read.
    async fn next(&mut self) -> Result<WatchResponse, Status> {
        loop {
            if self.started {
                if let Some(resp) = self.ready.pop_front() {
                    return Ok(resp);
                }
            }
            self.assign().await?;
            self.open_streams().await?;
            if self.readers.values().any(|r| r.stream.is_none()) {
                // A refused open moved slots or waits to be asked again.
                continue;
            }
            let (group, item) = self.poll_page().await;
            match item {
                Some(Ok(page)) => self.take(group, page)?,
                Some(Err(status)) => self.failed(group, status).await?,
                None => {
                    let status = Status::unavailable("the replica ended the change stream");
                    self.failed(group, status).await?
                }
            }
        }
    }

    /// Gives every slot without a group the owner the map names: refreshes the map while it
    /// still names the group the slot left, within [`FEED_MOVE_WAIT_MAX`].
    async fn assign(&mut self) -> Result<(), Status> {
        let mut tries = 0u32;
        loop {
            let map = self.shared.map.current();
            let mut stale = 0usize;
            for (&s, slot) in self.slots.iter_mut().filter(|(_, s)| s.group == 0) {
                let owner = map.slot_owner.get(s as usize).copied().unwrap_or(0);
                if owner == 0 || Some(owner) == slot.left {
                    stale += 1;
                    continue;
                }
                slot.group = owner;
                slot.left = None;
                let reader = self.readers.entry(owner).or_insert_with(Reader::new);
                reader.slots.insert(s);
                reader.restart();
            }
            self.readers.retain(|_, r| !r.slots.is_empty());
            if stale == 0 {
                self.waiting_since = None;
                return Ok(());
            }
            let since = *self.waiting_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= FEED_MOVE_WAIT_MAX {
                return Err(Status::unavailable(format!(
                    "{stale} watched slot(s) left their group and no shard map named a new owner \
                     within {FEED_MOVE_WAIT_MAX:?} (map v{}); resume from the last cursor",
                    map.version
                )));
            }
            let deadline = Instant::now() + FEED_MOVE_WAIT_MAX;
            if let Err(e) = refresh_map(&self.shared, map.version, deadline).await {
                tracing::debug!("feed: {e}");
            }
            if self.shared.map.current().version == map.version {
                tokio::time::sleep(backoff(tries)).await;
                tries += 1;
            }
        }
    }

    /// Opens a stream for every reader without one (after a backoff when it failed before).
    async fn open_streams(&mut self) -> Result<(), Status> {
        let groups: Vec<u64> = self
            .readers
            .iter()
            .filter(|(_, r)| r.stream.is_none())
            .map(|(&g, _)| g)
            .collect();
        for group in groups {
            let req = self.request(group);
            let reader = self.readers.get_mut(&group).expect("listed above");
            if reader.failures > 0 {
                tokio::time::sleep(backoff(reader.failures - 1)).await;
            }
            match open(&self.shared, group, &reader.addr, req).await {
                Ok((addr, stream)) => {
                    reader.addr = addr;
                    reader.stream = Some(stream);
                }
                Err(Opened::WrongShard(status)) => self.wrong_shard(group, status).await?,
                Err(Opened::Failed(status)) => return Err(status),
            }
        }
        Ok(())
    }

    /// What `group`'s stream asks for: its slots from their positions (or the start).
    fn request(&self, group: u64) -> ReadChangesRequest {
        let reader = &self.readers[&group];
        let slots = reader
            .slots
            .iter()
            .map(|&s| {
                let slot = &self.slots[&s];
                let from = match slot.pos {
                    Some(_) if slot.snapshot => slot_from::From::Snapshot(true),
                    Some(pos) => slot_from::From::AfterSeq(pos),
                    None => self.start,
                };
                SlotFrom {
                    slot: s,
                    from: Some(from),
                }
            })
            .collect();
        let shard_keys = self
            .shard_keys
            .iter()
            .filter(|k| {
                reader
                    .slots
                    .contains(&ordo_proto::slot_of(k, self.slot_count))
            })
            .cloned()
            .collect();
        ReadChangesRequest {
            group_id: group,
            slots,
            shard_keys,
            key_prefix: self.key_prefix.clone(),
            max_events: FEED_RESPONSE_EVENTS_MAX as u32,
            max_bytes: FEED_RESPONSE_BYTES_MAX as u64,
        }
    }

    /// The next page of any reader that may read (taking turns), with its group. Before every
    /// slot has a position only readers whose first page has not come are read.
    async fn poll_page(&mut self) -> (u64, Option<Result<ReadChangesResponse, Status>>) {
        self.turn = self.turn.wrapping_add(1);
        let (turn, started) = (self.turn, self.started);
        let readers = &mut self.readers;
        let pivot = readers
            .keys()
            .nth(turn % readers.len().max(1))
            .copied()
            .unwrap_or(0);
        std::future::poll_fn(|cx| {
            let mut poll = |(group, reader): (&u64, &mut Reader)| {
                if !started && reader.held.is_some() {
                    return None;
                }
                match reader.stream.as_mut()?.poll_next_unpin(cx) {
                    Poll::Ready(item) => Some((*group, item)),
                    Poll::Pending => None,
                }
            };
            if let Some(ready) = readers.range_mut(pivot..).find_map(&mut poll) {
                return Poll::Ready(ready);
            }
            match readers.range_mut(..pivot).find_map(poll) {
                Some(ready) => Poll::Ready(ready),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Takes `group`'s page: holds it while positions are missing, else turns it into responses.
    fn take(&mut self, group: u64, page: ReadChangesResponse) -> Result<(), Status> {
        let reader = self.readers.get_mut(&group).expect("polled");
        reader.failures = 0;
        reader.failing_since = None;
        if self.started {
            self.merge(group, page);
            return Ok(());
        }
        // A first page: where each of the group's slots starts.
        for &s in &reader.slots {
            let before_first = page
                .events
                .iter()
                .find(|e| e.slot == s && e.seq > 0)
                .map(|e| e.seq - 1);
            let reported = page.positions.iter().find(|p| p.slot == s).map(|p| p.seq);
            let Some(pos) = before_first.or(reported) else {
                return Err(Status::internal(format!(
                    "group {group}'s first change page gave no position for slot {s}"
                )));
            };
            // Its resolved time is taken when the page is merged, with its events: a held
            // page's time must not reach a response before the events under it.
            self.slots.get_mut(&s).expect("watched").pos = Some(pos);
        }
        reader.held = Some(page);
        if self.slots.values().all(|s| s.pos.is_some()) {
            self.started = true;
            let held: Vec<(u64, ReadChangesResponse)> = self
                .readers
                .iter_mut()
                .filter_map(|(&g, r)| r.held.take().map(|p| (g, p)))
                .collect();
            for (g, page) in held {
                self.merge(g, page);
            }
        }
        Ok(())
    }

    /// Turns `group`'s page into responses: the events the client does not have yet, in
    /// bounded responses, then the page's positions, moves and resolved time.
    fn merge(&mut self, group: u64, page: ReadChangesResponse) {
        let mut events: Vec<ChangeEvent> = Vec::new();
        let mut bytes = 0usize;
        for ev in page.events {
            let Some(slot) = self.slots.get(&ev.slot) else {
                continue;
            };
            let snapshot = ev.op == Op::Snapshot as i32;
            let fresh = if snapshot {
                slot.snapshot
            } else {
                slot.pos.is_none_or(|p| ev.seq > p)
            };
            if slot.group != group || !fresh {
                continue;
            }
            let size = ev.encoded_len();
            if !events.is_empty()
                && (events.len() >= FEED_RESPONSE_EVENTS_MAX
                    || bytes + size > FEED_RESPONSE_BYTES_MAX)
            {
                let full = std::mem::take(&mut events);
                self.push_response(full);
                bytes = 0;
            }
            if !snapshot {
                let slot = self.slots.get_mut(&ev.slot).expect("looked up");
                slot.pos = Some(ev.seq);
                slot.snapshot = false;
            }
            bytes += size;
            events.push(ev);
        }
        let reader = self.readers.get_mut(&group).expect("polled");
        // The page's time covers every slot of the stream; a page lists only the slots it
        // read (every one at least once per checkpoint interval).
        for s in &reader.slots {
            if let Some(slot) = self.slots.get_mut(s).filter(|slot| slot.group == group) {
                slot.resolved = slot.resolved.max(page.resolved_ts_ms);
            }
        }
        for p in &page.positions {
            let Some(slot) = self.slots.get_mut(&p.slot) else {
                continue;
            };
            if slot.group != group {
                continue;
            }
            slot.pos = Some(slot.pos.unwrap_or(0).max(p.seq));
            slot.resolved = slot.resolved.max(p.resolved_ts_ms);
            slot.snapshot &= p.snapshotting;
            if p.moved {
                slot.group = 0;
                slot.left = Some(group);
                reader.slots.remove(&p.slot);
            }
        }
        if reader.slots.is_empty() {
            self.readers.remove(&group);
        }
        // A moved slot's time stays frozen below its fence until its new owner reports it, so
        // the minimum holds back while it waits.
        let min = self.slots.values().map(|s| s.resolved).min().unwrap_or(0);
        self.resolved_sent = self.resolved_sent.max(min);
        self.push_response(events);
    }

    /// Queues a response of `events` with the cursor of the current positions and the resolved
    /// time; one that would tell the client nothing new is left out.
    fn push_response(&mut self, events: Vec<ChangeEvent>) {
        let positions = self
            .slots
            .iter()
            .filter_map(|(&s, slot)| slot.pos.map(|p| (s, p)));
        let cursor = Bytes::from(cursor::encode(self.slot_count, positions));
        let unchanged = (&cursor, self.resolved_sent) == (&self.last.0, self.last.1);
        if events.is_empty() && unchanged {
            return;
        }
        self.last = (cursor.clone(), self.resolved_sent);
        self.ready.push_back(WatchResponse {
            events,
            cursor,
            resolved_ts_ms: self.resolved_sent,
        });
    }

    /// A stream of `group` broke, ended or was refused with `status`: reopen it (another
    /// replica first), follow the map on `WrongShard`, or end the watch with the status.
    async fn failed(&mut self, group: u64, status: Status) -> Result<(), Status> {
        match classify(&status, crate::retry::Effect::Read) {
            Action::Refresh { .. } => self.wrong_shard(group, status).await,
            Action::Rotate | Action::Redirect(_) | Action::Hold => {
                self.note_failure(group, &status)
            }
            Action::Fail | Action::OutcomeUnknown | Action::Locked(_) => Err(pass_through(status)),
        }
    }

    /// Counts a failure of `group`'s stream and drops it; past [`FEED_REOPEN_WITHIN`] without a
    /// page the watch ends with `UNAVAILABLE` (the client resumes from its last cursor).
    fn note_failure(&mut self, group: u64, status: &Status) -> Result<(), Status> {
        let reader = self.readers.get_mut(&group).expect("failing reader");
        reader.stream = None;
        reader.failures += 1;
        let since = *reader.failing_since.get_or_insert_with(Instant::now);
        tracing::debug!(group, addr = %reader.addr, failures = reader.failures,
            error = %describe(status), "feed: change stream failed, reopening");
        if since.elapsed() >= FEED_REOPEN_WITHIN {
            return Err(Status::unavailable(format!(
                "group {group}: no change stream has served a page for {:.1?} ({} failures \
                 over FEED_REOPEN_WITHIN of {FEED_REOPEN_WITHIN:?}); last error from {}: {}; \
                 resume from the last cursor",
                since.elapsed(),
                reader.failures,
                reader.addr,
                describe(status)
            )));
        }
        Ok(())
    }

    /// `group` does not hold (some of) its slots at the router's map: refresh the map and give
    /// the slots it no longer names for `group` to their owners. Slots it still names stay and
    /// are asked again after a backoff (a new owner that does not serve them yet).
    async fn wrong_shard(&mut self, group: u64, status: Status) -> Result<(), Status> {
        self.note_failure(group, &status)?;
        self.shared
            .counters
            .wrong_shard
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let used = self.shared.map.current().version;
        if let Err(e) = refresh_map(&self.shared, used, Instant::now() + OPEN_TIMEOUT).await {
            tracing::debug!(group, "feed: {e}");
        }
        let map = self.shared.map.current();
        let reader = self.readers.get_mut(&group).expect("failing reader");
        let gone: Vec<u32> = reader
            .slots
            .iter()
            .copied()
            .filter(|&s| map.slot_owner.get(s as usize) != Some(&group))
            .collect();
        for s in &gone {
            reader.slots.remove(s);
            self.slots.get_mut(s).expect("watched").group = 0;
        }
        if !gone.is_empty() {
            reader.restart();
            if reader.slots.is_empty() {
                self.readers.remove(&group);
            }
        }
        Ok(())
    }
}

/// Why a stream could not be opened.
enum Opened {
    /// The replica does not hold the slots at the router's map (or the map has no such group).
    WrongShard(Status),
    /// Refused for good, or no replica answered within [`FEED_REOPEN_WITHIN`]: ends the watch.
    Failed(Status),
}

/// Opens `req`'s change stream on one of `group`'s replicas: followers before the believed
/// leader, the one that failed last (`avoid`) at the end, walked with
/// [`ordo_proto::retry::follow_leader`]. Returns the replica and the stream.
async fn open(
    shared: &Shared,
    group: u64,
    avoid: &str,
    req: ReadChangesRequest,
) -> Result<(String, Streaming<ReadChangesResponse>), Opened> {
    let map = shared.map.current();
    let list = replicas(&map, group).map_err(|why| Opened::WrongShard(Status::unavailable(why)))?;
    let leader = shared.leaders.pick(group, &list);
    let mut order: Vec<String> = list
        .iter()
        .filter(|a| **a != leader && *a != avoid)
        .cloned()
        .collect();
    order.extend(
        list.iter()
            .filter(|a| **a == leader && *a != avoid)
            .cloned(),
    );
    order.extend(list.iter().filter(|a| *a == avoid).cloned());
    let cursor = Mutex::new(LeaderCursor::new(order));
    let mut walk = Walk::new(
        Effect::StaleRead,
        MAX_ATTEMPTS,
        Instant::now() + FEED_REOPEN_WITHIN,
        BACKOFF,
    );
    walk.attempt_timeout = Some(OPEN_TIMEOUT);
    let req = &req;
    let attempt = |addr: String, _bound: Duration| {
        // No grpc-timeout: the stream lives as long as the watch; the walk bounds the open.
        let channel = shared.pool.channel(&addr);
        let request = req.clone();
        async move {
            let mut client = PeerClient::new(channel.map_err(Status::unavailable)?)
                .max_decoding_message_size(MESSAGE_BYTES_MAX)
                .max_encoding_message_size(MESSAGE_BYTES_MAX);
            let stream = client.read_changes(request).await?.into_inner();
            Ok((addr, stream))
        }
    };
    follow_leader(&cursor, &walk, attempt)
        .await
        .map_err(|gave_up| gave_up_opening(group, gave_up))
}

fn gave_up_opening(group: u64, gave_up: GaveUp) -> Opened {
    let GaveUp {
        why,
        attempts,
        addr,
        elapsed,
    } = gave_up;
    match why {
        Why::Refused {
            status,
            action: Action::Refresh { .. },
        } => Opened::WrongShard(status),
        Why::Refused { status, .. } => Opened::Failed(pass_through(status)),
        why => {
            let last = match &why {
                Why::AttemptsSpent(s) | Why::OutOfTime(s) | Why::DeadlinePassed(Some(s)) => {
                    describe(s)
                }
                _ => format!("no answer within {OPEN_TIMEOUT:?}"),
            };
            Opened::Failed(Status::unavailable(format!(
                "group {group}: no replica opened a change stream ({attempts} attempts over \
                 {elapsed:.1?}); last error from {addr}: {last}; resume from the last cursor"
            )))
        }
    }
}
