//! `Peer.ReadChanges` on a node, and the leader's retention planner.
//!
//! A stream reads its slots' logs from this replica's applied state (`StateMachine::feed_page`,
//! never the apply path), pull-based: the next page is read only once the previous one left the
//! channel, so a stalled reader holds a position, not a buffer (beyond that page, what HTTP/2's
//! flow-control window lets the transport send ahead). It sends a page whenever the
//! applied state has events for it (woken by the applied index's watch, no polling of sled),
//! else every `FEED_CHECKPOINT_INTERVAL_MS` a page with no events and the resolved time. A page
//! reads only the slots whose log moved since their last read (`feed::Tips`), and every slot
//! once per `FEED_CHECKPOINT_INTERVAL_MS`, so a reader costs per event, not per watched slot
//! per apply. Readers per node are bounded (`FEED_READERS_MAX`).

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ordo_proto::v1::{slot_from, ReadChangesRequest, ReadChangesResponse};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::error::Error;
use crate::limits::*;
use crate::node::FeedConfig;
use crate::replica::ReplicaHandle;
use crate::state::feed::{Cursor, Filter, Slots, Start};
use crate::state::{Checkpoint, Command};

pub(crate) type ChangeStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ReadChangesResponse, Status>> + Send>>;

/// One reader counted in `ReplicaHandle::feed_readers` while its stream lives.
struct Reader(Arc<ReplicaHandle>);

impl Reader {
    fn admit(replica: &Arc<ReplicaHandle>) -> Result<Reader, Error> {
        if replica.feed_readers.fetch_add(1, Ordering::AcqRel) >= FEED_READERS_MAX {
            replica.feed_readers.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::ResourceExhausted(format!(
                "this node already serves FEED_READERS_MAX ({FEED_READERS_MAX}) change-feed \
                 readers; read from another replica or retry later"
            )));
        }
        Ok(Reader(replica.clone()))
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.feed_readers.fetch_sub(1, Ordering::AcqRel);
    }
}

fn invalid(why: String) -> Error {
    Error::InvalidArgument(why)
}

/// Checks a request and resolves where each slot's read starts.
fn start(replica: &ReplicaHandle, req: &ReadChangesRequest) -> Result<Vec<Cursor>, Error> {
    let sm = &replica.sm;
    if req.slots.is_empty() {
        return Err(invalid("ReadChanges names no slot".into()));
    }
    if req.shard_keys.len() > FEED_SHARD_KEYS_MAX {
        return Err(invalid(format!(
            "ReadChanges filters on {} shard keys, over FEED_SHARD_KEYS_MAX ({FEED_SHARD_KEYS_MAX})",
            req.shard_keys.len()
        )));
    }
    if let Some(sk) = req
        .shard_keys
        .iter()
        .find(|sk| sk.is_empty() || sk.len() > SHARD_KEY_BYTES_MAX)
    {
        return Err(invalid(format!(
            "a shard key of {} bytes: it must be 1 to SHARD_KEY_BYTES_MAX ({SHARD_KEY_BYTES_MAX})",
            sk.len()
        )));
    }
    if req.key_prefix.len() > KEY_BYTES_MAX {
        return Err(invalid(format!(
            "a key prefix of {} bytes is over KEY_BYTES_MAX ({KEY_BYTES_MAX})",
            req.key_prefix.len()
        )));
    }
    let ownership = sm.ownership();
    let mut cursors: Vec<Cursor> = Vec::with_capacity(req.slots.len());
    for from in &req.slots {
        if from.slot >= sm.slot_count() || cursors.iter().any(|c| c.slot == from.slot) {
            return Err(invalid(format!(
                "slot {} is out of range ({} slots) or named twice",
                from.slot,
                sm.slot_count()
            )));
        }
        if req.group_id != replica.group_id || !ownership.owns(from.slot) {
            return Err(Error::WrongShard {
                slot: from.slot,
                map_version: ownership.map_version,
            });
        }
        let start = match from.from {
            Some(slot_from::From::AfterSeq(seq)) => Start::AfterSeq(seq),
            Some(slot_from::From::Oldest(_)) => Start::Oldest,
            Some(slot_from::From::Now(_)) | None => Start::Now,
            Some(slot_from::From::AfterTsMs(ts)) => Start::AfterTs(ts),
            Some(slot_from::From::Snapshot(_)) => Start::Snapshot,
        };
        cursors.push(sm.feed_start(from.slot, start)?);
    }
    Ok(cursors)
}

/// `Peer.ReadChanges`: checks the request, then streams its pages from a task of its own.
pub(crate) fn read_changes(
    replica: &Arc<ReplicaHandle>,
    req: ReadChangesRequest,
) -> Result<ChangeStream, Status> {
    replica.check_running()?;
    let cursors = start(replica, &req)?;
    let reader = Reader::admit(replica)?;
    let events_max = match req.max_events {
        0 => FEED_PAGE_EVENTS_MAX,
        n => n.min(FEED_PAGE_EVENTS_MAX),
    } as usize;
    let bytes_max = match req.max_bytes {
        0 => FEED_PAGE_BYTES_MAX,
        n => n.min(FEED_PAGE_BYTES_MAX),
    };
    let (tx, rx) = mpsc::channel(1);
    let pump = Pump {
        reader,
        cursors,
        shard_keys: req.shard_keys,
        key_prefix: req.key_prefix,
        events_max,
        bytes_max,
    };
    tokio::spawn(pump.run(tx));
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// One stream's reader: its slots' positions and its filter.
struct Pump {
    reader: Reader,
    cursors: Vec<Cursor>,
    shard_keys: Vec<Bytes>,
    key_prefix: Bytes,
    events_max: usize,
    bytes_max: u64,
}

type Sender = mpsc::Sender<Result<ReadChangesResponse, Status>>;

impl Pump {
    async fn run(mut self, tx: Sender) {
        let replica = self.reader.0.clone();
        let mut applied = replica.sm.subscribe();
        let mut stop = replica.stop.clone();
        let interval = Duration::from_millis(FEED_CHECKPOINT_INTERVAL_MS);
        let pace = Duration::from_millis(FEED_PAGE_PACE_MS);
        let mut last_sent: Option<Instant> = None;
        let mut last_whole: Option<Instant> = None;
        let mut full = false;
        while !self.cursors.is_empty() {
            // Pull: nothing is read until the previous page has left.
            let permit = tokio::select! {
                p = tx.reserve() => p.ok(),
                _ = stop.wait_for(|s| *s) => None,
            };
            let Some(permit) = permit else {
                return self.stopped(&tx, &stop).await;
            };
            // Paced: applies that come within FEED_PAGE_PACE_MS of the last page share the
            // next one, so a reader costs a bounded number of pages a second however fast the
            // group applies (unless a page was full: then the rest is read at once).
            let since = last_sent.map_or(pace, |t| t.elapsed());
            if !full && since < pace {
                let stopping = tokio::select! {
                    _ = tokio::time::sleep(pace - since) => false,
                    _ = tx.closed() => return,
                    _ = stop.wait_for(|s| *s) => true,
                };
                if stopping {
                    drop(permit);
                    return self.stopped(&tx, &stop).await;
                }
            }
            let resp = loop {
                // Seen before reading: an apply after this line wakes the wait below.
                drop(applied.borrow_and_update());
                if let Err(e) = replica.check_running() {
                    permit.send(Err(e.into()));
                    return;
                }
                let due = last_sent.is_none_or(|t| t.elapsed() >= interval);
                let whole = last_whole.is_none_or(|t| t.elapsed() >= interval);
                if whole {
                    last_whole = Some(Instant::now());
                }
                match self.page(due, whole) {
                    Err(e) => {
                        permit.send(Err(e.into()));
                        return;
                    }
                    Ok((Some(resp), more)) => {
                        full = more;
                        break resp;
                    }
                    Ok((None, true)) => continue,
                    Ok((None, false)) => {}
                }
                let wait =
                    last_sent.map_or(Duration::ZERO, |t| interval.saturating_sub(t.elapsed()));
                let stopping = tokio::select! {
                    _ = applied.changed() => false,
                    _ = tokio::time::sleep(wait) => false,
                    _ = tx.closed() => return,
                    _ = stop.wait_for(|s| *s) => true,
                };
                if stopping {
                    drop(permit);
                    return self.stopped(&tx, &stop).await;
                }
            };
            permit.send(Ok(resp));
            last_sent = Some(Instant::now());
        }
    }

    /// The next page: `Some` when it is worth sending (events, a moved slot, or `due` for a
    /// checkpoint), and whether more can be read at once. A `whole` page reads every slot (its
    /// positions name them all); any other reads only the slots with something new. Moved
    /// slots leave the stream once reported; the slots take turns going first.
    fn page(
        &mut self,
        due: bool,
        whole: bool,
    ) -> crate::error::Result<(Option<ReadChangesResponse>, bool)> {
        let sm = &self.reader.0.sm;
        let filter = Filter {
            shard_keys: &self.shard_keys,
            key_prefix: &self.key_prefix,
        };
        let (events_max, bytes_max) = (self.events_max, self.bytes_max);
        let slots = if whole { Slots::Every } else { Slots::Changed };
        let page = sm.feed_page(slots, &mut self.cursors, &filter, events_max, bytes_max)?;
        let moved: Vec<u32> = page
            .positions
            .iter()
            .filter(|p| p.moved)
            .map(|p| p.slot)
            .collect();
        if !moved.is_empty() {
            self.cursors.retain(|c| !moved.contains(&c.slot));
        }
        if !self.cursors.is_empty() {
            self.cursors.rotate_left(1);
        }
        let send = due || !moved.is_empty() || !page.events.is_empty();
        let resp = send.then(|| ReadChangesResponse {
            events: page.events,
            positions: page.positions,
            resolved_ts_ms: page.resolved_ts_ms,
        });
        Ok((resp, page.more))
    }

    /// The node is shutting down (or the reader left): the reader hears so (and reads
    /// elsewhere).
    async fn stopped(&self, tx: &Sender, stop: &watch::Receiver<bool>) {
        if !*stop.borrow() {
            return;
        }
        let _ = tx
            .send(Err(Status::unavailable(
                "this node is shutting down; read the change feed from another replica",
            )))
            .await;
    }
}

/// Runs `replica`'s retention planner until `stop`: every `FEED_TRIM_INTERVAL_MS` a leader
/// proposes a checkpoint with the trims due (`StateMachine::plan_trims`) by its own clock and
/// `feed`, so every replica drops the same events.
pub(crate) fn spawn_trimmer(
    replica: Arc<ReplicaHandle>,
    feed: FeedConfig,
    mut stop: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(Duration::from_millis(FEED_TRIM_INTERVAL_MS)) => {}
            }
            if replica.shared.is_leader.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let planned = replica
                .sm
                .plan_trims(ordo_proto::unix_ms(), feed.retention());
            let trims = match planned {
                Ok(t) if t.is_empty() => continue,
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(group = replica.group_id, error = %e, "change-feed trims not planned");
                    continue;
                }
            };
            if let Err(e) = replica
                .propose(Command::Checkpoint(Checkpoint { trims }))
                .await
            {
                tracing::debug!(group = replica.group_id, error = %e, "change-feed trims not applied this round");
            }
        }
    });
}
