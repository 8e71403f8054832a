//! `ordo.v1.Feed` on the router: a `Watch` checks its request, takes one of the router's
//! [`FEED_WATCHES_MAX`] watch permits, and becomes a [`watch::Watch`], the merge of one
//! `Peer.ReadChanges` stream per group that holds watched slots (`watch.rs`). The cursor it
//! hands out is `cursor.rs`'s.
//!
//! The response stream is pulled: the router reads a group's next page only when the client's
//! stream has taken every response of the previous one, so a slow client holds the nodes back
//! (they keep a position, not a buffer) and the router holds at most one page per group.

mod consume;
mod credits;
mod cursor;
mod groups;
mod link;
mod watch;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use ordo_proto::slot_of;
use ordo_proto::v1::feed_server::Feed;
use ordo_proto::v1::watch_request::{Start, StartOneOf};
use ordo_proto::v1::{
    slot_from, ConsumeRequest, ConsumeResponse, ConsumerGroup, CreateGroupRequest,
    DeleteGroupRequest, DeleteGroupResponse, DescribeGroupRequest, ListGroupsRequest,
    ListGroupsResponse, SeekGroupRequest, UnparkRequest, WatchRequest, WatchResponse,
};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::{Request, Response, Status, Streaming};

use crate::forward::not_initialized;
use crate::Shared;

/// Most `Watch` streams one router serves at once: each holds a stream per group it reads and
/// up to a page per group, so the count bounds the router's memory. Past it a new Watch is
/// `RESOURCE_EXHAUSTED`.
pub const FEED_WATCHES_MAX: usize = 1024;
/// Most events in one `WatchResponse` (and asked of a node per page).
pub const FEED_RESPONSE_EVENTS_MAX: usize = 1024;
/// Most bytes of events in one `WatchResponse` (and asked of a node per page); a single larger
/// event goes alone. Well under the message bound (`KV_MESSAGE_BYTES_MAX`).
pub const FEED_RESPONSE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Longest cursor accepted: a 65,536-slot map at the worst case of 11 bytes a slot, with room.
pub const FEED_CURSOR_BYTES_MAX: usize = 1024 * 1024;
pub use ordo_proto::FEED_SHARD_KEYS_MAX;
/// Longest a watch keeps trying to reopen a group's stream (over its replicas, with backoff)
/// before it ends with `UNAVAILABLE`; the client resumes from its last cursor.
pub const FEED_REOPEN_WITHIN: Duration = Duration::from_secs(30);
/// Longest a watch waits for a map naming the new owner of a slot its old owner reported moved.
pub const FEED_MOVE_WAIT_MAX: Duration = Duration::from_secs(30);

/// Most `Consume` streams (consumer-group members) one router serves at once: each holds a
/// stream per shard group and a few bounded queues. Past it a new member is
/// `RESOURCE_EXHAUSTED`.
pub const FEED_MEMBERS_MAX: usize = 1024;
pub use consume::FEED_JOIN_WAIT;
pub use credits::RECLAIM_EVERY as FEED_RECLAIM_EVERY;
pub use groups::{
    FEED_GROUP_KEY_PREFIX_BYTES_MAX, FEED_GROUP_ROUNDS_MAX, FEED_GROUP_SHARD_KEY_BYTES_MAX,
};

/// The router's watch permits.
pub(crate) fn watch_permits() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(FEED_WATCHES_MAX))
}

/// The router's member permits.
pub(crate) fn member_permits() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(FEED_MEMBERS_MAX))
}

pub(crate) struct FeedService(pub(crate) Arc<Shared>);

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;
type ConsumeStream = Pin<Box<dyn Stream<Item = Result<ConsumeResponse, Status>> + Send>>;

/// When a group RPC must have answered: the client's deadline, bounded as every request's.
fn deadline_of<T>(r: &Request<T>) -> Instant {
    Instant::now() + crate::deadline::budget(r.metadata())
}

#[tonic::async_trait]
impl Feed for FeedService {
    type WatchStream = WatchStream;

    async fn watch(&self, r: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let req = r.into_inner();
        let map = self.0.map.current();
        if map.version == 0 {
            return Err(not_initialized());
        }
        let plan = plan(&req, map.slot_count)?;
        let permit = self
            .0
            .feed_watches
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "this router already serves {FEED_WATCHES_MAX} watches (FEED_WATCHES_MAX); \
                     close idle ones or watch through another router"
                ))
            })?;
        let watch = watch::Watch::new(self.0.clone(), plan, permit);
        Ok(Response::new(Box::pin(watch.into_stream())))
    }

    type ConsumeStream = ConsumeStream;

    async fn create_group(
        &self,
        r: Request<CreateGroupRequest>,
    ) -> Result<Response<ConsumerGroup>, Status> {
        let deadline = deadline_of(&r);
        let group = groups::create(&self.0, r.into_inner(), deadline).await?;
        Ok(Response::new(group))
    }

    async fn describe_group(
        &self,
        r: Request<DescribeGroupRequest>,
    ) -> Result<Response<ConsumerGroup>, Status> {
        let deadline = deadline_of(&r);
        let group = groups::describe_group(&self.0, &r.into_inner().group, deadline).await?;
        Ok(Response::new(group))
    }

    async fn delete_group(
        &self,
        r: Request<DeleteGroupRequest>,
    ) -> Result<Response<DeleteGroupResponse>, Status> {
        let deadline = deadline_of(&r);
        let deleted = groups::delete(&self.0, &r.into_inner().group, deadline).await?;
        Ok(Response::new(DeleteGroupResponse { deleted }))
    }

    async fn consume(
        &self,
        r: Request<Streaming<ConsumeRequest>>,
    ) -> Result<Response<ConsumeStream>, Status> {
        let permit = self
            .0
            .feed_members
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "this router already serves {FEED_MEMBERS_MAX} consumer-group members \
                     (FEED_MEMBERS_MAX); join through another router"
                ))
            })?;
        let deadline = deadline_of(&r);
        let stream = consume::start(self.0.clone(), r.into_inner(), deadline, permit).await?;
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_groups(
        &self,
        r: Request<ListGroupsRequest>,
    ) -> Result<Response<ListGroupsResponse>, Status> {
        let deadline = deadline_of(&r);
        let groups = groups::list(&self.0, deadline).await?;
        Ok(Response::new(ListGroupsResponse { groups }))
    }

    async fn seek_group(
        &self,
        r: Request<SeekGroupRequest>,
    ) -> Result<Response<ConsumerGroup>, Status> {
        let deadline = deadline_of(&r);
        let group = groups::seek(&self.0, r.into_inner(), deadline).await?;
        Ok(Response::new(group))
    }

    async fn unpark(&self, r: Request<UnparkRequest>) -> Result<Response<ConsumerGroup>, Status> {
        let deadline = deadline_of(&r);
        let group = groups::unpark(&self.0, r.into_inner(), deadline).await?;
        Ok(Response::new(group))
    }
}

/// What a checked request asks for.
pub(crate) struct Plan {
    pub(crate) slot_count: u32,
    /// The watched slots, each with its position when the start gives one.
    pub(crate) slots: Vec<(u32, Option<u64>)>,
    /// Where a slot without a position starts (and a snapshot slot until its snapshot is read).
    pub(crate) start: slot_from::From,
    pub(crate) shard_keys: Vec<Bytes>,
    pub(crate) key_prefix: Bytes,
}

/// Checks `req` against a map of `slot_count` slots; `INVALID_ARGUMENT` says what is wrong.
fn plan(req: &WatchRequest, slot_count: u32) -> Result<Plan, Status> {
    if req.shard_keys.len() > FEED_SHARD_KEYS_MAX {
        return Err(Status::invalid_argument(format!(
            "{} shard keys is over FEED_SHARD_KEYS_MAX ({FEED_SHARD_KEYS_MAX})",
            req.shard_keys.len()
        )));
    }
    if req.shard_keys.iter().any(Bytes::is_empty) {
        return Err(Status::invalid_argument("a shard key to watch is empty"));
    }
    let mut watched: Vec<u32> = if req.shard_keys.is_empty() {
        (0..slot_count).collect()
    } else {
        req.shard_keys
            .iter()
            .map(|k| slot_of(k, slot_count))
            .collect()
    };
    watched.sort_unstable();
    watched.dedup();
    let (start, positions) = match req.start.clone() {
        None => (slot_from::From::Now(true), None),
        Some(StartOneOf::Cursor(c)) => {
            if c.len() > FEED_CURSOR_BYTES_MAX {
                return Err(Status::invalid_argument(format!(
                    "cursor of {} bytes is over FEED_CURSOR_BYTES_MAX ({FEED_CURSOR_BYTES_MAX})",
                    c.len()
                )));
            }
            let positions = cursor::decode(&c, slot_count)
                .map_err(|why| Status::invalid_argument(format!("bad cursor: {why}")))?;
            (slot_from::From::AfterSeq(0), Some(positions))
        }
        Some(StartOneOf::From(f)) => match Start::try_from(f) {
            Ok(Start::FromNow) => (slot_from::From::Now(true), None),
            Ok(Start::FromOldest) => (slot_from::From::Oldest(true), None),
            Ok(Start::FromSnapshot) => (slot_from::From::Snapshot(true), None),
            Err(_) => return Err(Status::invalid_argument(format!("unknown start from {f}"))),
        },
        Some(StartOneOf::AfterTsMs(ts)) => (slot_from::From::AfterTsMs(ts), None),
    };
    let slots = watched
        .into_iter()
        .map(|s| {
            // A cursor leaves out the slots at 0: read them from their first event.
            let pos = positions.as_ref().map(|p| p.get(&s).copied().unwrap_or(0));
            (s, pos)
        })
        .collect();
    Ok(Plan {
        slot_count,
        slots,
        start,
        shard_keys: req.shard_keys.clone(),
        key_prefix: req.key_prefix.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(start: Option<StartOneOf>, shard_keys: Vec<Bytes>) -> WatchRequest {
        WatchRequest {
            shard_keys,
            key_prefix: Bytes::new(),
            start,
        }
    }

    #[test]
    fn starts_translate_to_slot_starts() {
        let p = plan(&req(None, vec![]), 8).unwrap();
        assert_eq!(p.slots, (0..8).map(|s| (s, None)).collect::<Vec<_>>());
        assert_eq!(p.start, slot_from::From::Now(true));
        let from = |s: Start| Some(StartOneOf::From(s as i32));
        let p = plan(&req(from(Start::FromOldest), vec![]), 8).unwrap();
        assert_eq!(p.start, slot_from::From::Oldest(true));
        let p = plan(&req(from(Start::FromSnapshot), vec![]), 8).unwrap();
        assert_eq!(p.start, slot_from::From::Snapshot(true));
        let p = plan(&req(Some(StartOneOf::AfterTsMs(77)), vec![]), 8).unwrap();
        assert_eq!(p.start, slot_from::From::AfterTsMs(77));
        let err = plan(&req(Some(StartOneOf::From(9)), vec![]), 8)
            .err()
            .unwrap();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);

        // A cursor positions every watched slot; those it leaves out are at 0.
        let c = cursor::encode(8, [(2, 40), (5, 9)]);
        let k = Bytes::from_static(b"order-1");
        let slot = slot_of(&k, 8);
        let p = plan(&req(Some(StartOneOf::Cursor(c.into())), vec![k]), 8).unwrap();
        let want = match slot {
            2 => 40,
            5 => 9,
            _ => 0,
        };
        assert_eq!(p.slots, vec![(slot, Some(want))]);
    }

    #[test]
    fn bad_requests_name_the_limit() {
        let many = vec![Bytes::from_static(b"k"); FEED_SHARD_KEYS_MAX + 1];
        let err = plan(&req(None, many), 8).err().unwrap();
        assert!(err.message().contains("FEED_SHARD_KEYS_MAX"), "{err:?}");
        let big = vec![0u8; FEED_CURSOR_BYTES_MAX + 1];
        let err = plan(&req(Some(StartOneOf::Cursor(big.into())), vec![]), 8)
            .err()
            .unwrap();
        assert!(err.message().contains("FEED_CURSOR_BYTES_MAX"), "{err:?}");
        let err = plan(&req(None, vec![Bytes::new()]), 8).err().unwrap();
        assert!(err.message().contains("empty"), "{err:?}");
    }
}
