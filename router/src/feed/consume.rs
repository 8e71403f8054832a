//! `Feed.Consume` on the router: one member's stream, the merge of one `Peer.Consume` stream
//! per shard group of the map (each kept up by a link task, `link.rs`).
//!
//! The member's `Join` is checked and the group must exist (a describe over every shard
//! group); then a session task runs the stream. It keeps the member's credits (`credits.rs`:
//! a pool, lent to the node streams where events wait, reclaimed from streams that wait for
//! nothing), forwards each delivery and each refused ack to the member, and routes the
//! member's acks, nacks, progress and terms by slot to the stream of the shard group owning the
//! slot in the current map (with no stream up for it the ack is dropped: the event comes
//! again, at least once). It follows the map: a new shard group gets a stream, a removed one's
//! is closed.
//!
//! The member's end decides how the node streams end: a clean end (end of its requests), an
//! error the router answers or the router stopping close them cleanly, so the nodes hand the
//! member's in-flight events on at once; a member that vanished leaves them broken (the
//! events' leases run out).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use ordo_proto::v1::consume_request::Msg as MemberReq;
use ordo_proto::v1::peer_consume_request::Msg as PeerReq;
use ordo_proto::v1::peer_consume_response::Msg as PeerResp;
use ordo_proto::v1::{ConsumeRequest, ConsumeResponse, Credit, PeerConsumeRequest, Reclaim};
use ordo_proto::{check_group_name, check_member_name, FEED_GROUP_CREDITS_MAX};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::{Status, Streaming};

use super::credits::{Credits, Lend, RECLAIM_EVERY};
use super::link::{self, Event, LinkSpec, CLOSE_WAIT};
use crate::Shared;

/// Longest wait for a member's first message (its `Join`).
pub const FEED_JOIN_WAIT: Duration = Duration::from_secs(10);
/// Responses queued to one member (deliveries are bounded by its credits anyway).
const MEMBER_RESPONSES_MAX: usize = 64;
/// Link reports queued to one member's session.
const LINK_EVENTS_MAX: usize = 256;

/// Checks the member's `Join` (its first message) and that its group exists, then starts its
/// session; the responses to send it.
pub(crate) async fn start(
    shared: Arc<Shared>,
    mut requests: Streaming<ConsumeRequest>,
    deadline: Instant,
    permit: OwnedSemaphorePermit,
) -> Result<impl Stream<Item = Result<ConsumeResponse, Status>> + Send, Status> {
    let first = tokio::time::timeout(FEED_JOIN_WAIT, requests.message())
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!(
                "no Join within FEED_JOIN_WAIT ({FEED_JOIN_WAIT:?}) of the stream's start"
            ))
        })??;
    let join = match first.and_then(|r| r.msg) {
        Some(MemberReq::Join(join)) => join,
        _ => {
            return Err(Status::invalid_argument(
                "the first message of a Consume stream must be a Join",
            ))
        }
    };
    check_group_name(&join.group).map_err(Status::invalid_argument)?;
    check_member_name(&join.member).map_err(Status::invalid_argument)?;
    if join.credits > FEED_GROUP_CREDITS_MAX {
        return Err(Status::invalid_argument(format!(
            "a Join of {} credits is over FEED_GROUP_CREDITS_MAX ({FEED_GROUP_CREDITS_MAX})",
            join.credits
        )));
    }
    super::groups::describe_group(&shared, &join.group, deadline).await?;
    let (out, rx) = mpsc::channel(MEMBER_RESPONSES_MAX);
    let (events_tx, events) = mpsc::channel(LINK_EVENTS_MAX);
    let session = Session {
        shared,
        group: join.group,
        member: join.member,
        credits: Credits::new(join.credits),
        links: BTreeMap::new(),
        retired: Vec::new(),
        next_link: 1,
        events_tx,
        out,
        _permit: permit,
    };
    tokio::spawn(session.run(requests, events));
    Ok(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// A node stream, as the session sees it.
struct Link {
    /// Which task (events of an older one are stale).
    link: u64,
    task: JoinHandle<()>,
    closing: watch::Sender<bool>,
    /// The stream's requests, and what breaks it, while it is up.
    tx: Option<mpsc::Sender<PeerConsumeRequest>>,
    breaker: Option<oneshot::Sender<()>>,
}

impl Link {
    /// Breaks the stream (the node sees it reset, not closed) and stops the task.
    fn abort(mut self) {
        if let Some(breaker) = self.breaker.take() {
            let _ = breaker.send(());
        }
        self.task.abort();
    }
}

struct Session {
    shared: Arc<Shared>,
    group: String,
    member: String,
    credits: Credits,
    links: BTreeMap<u64, Link>,
    /// Tasks of links closed while the session goes on (a shard group left the map).
    retired: Vec<JoinHandle<()>>,
    next_link: u64,
    events_tx: mpsc::Sender<Event>,
    out: mpsc::Sender<Result<ConsumeResponse, Status>>,
    _permit: OwnedSemaphorePermit,
}

/// How the member's stream ends.
enum Ending {
    /// The member ended its requests.
    Closed,
    /// The router ends it with this status.
    Fail(Status),
    /// The member is gone (its stream broke, or it stopped reading).
    Broken,
}

impl Session {
    async fn run(
        mut self,
        mut requests: Streaming<ConsumeRequest>,
        mut events: mpsc::Receiver<Event>,
    ) {
        let mut maps = self.shared.map.subscribe();
        let mut stop = self.shared.stop.clone();
        let mut tick = tokio::time::interval(RECLAIM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.sync_links();
        let out = self.out.clone();
        let ending = loop {
            let step = tokio::select! {
                req = requests.message() => match req {
                    Ok(Some(req)) => self.member_request(req),
                    Ok(None) => Err(Ending::Closed),
                    Err(_) => Err(Ending::Broken),
                },
                Some(event) = events.recv() => self.event(event).await,
                Ok(()) = maps.changed() => {
                    self.sync_links();
                    Ok(())
                }
                _ = tick.tick() => self.lend(),
                _ = link::closed(&mut stop) => Err(Ending::Fail(Status::unavailable(
                    "this router is stopping; join again at another router"
                ))),
                _ = out.closed() => Err(Ending::Broken),
            };
            if let Err(ending) = step {
                break ending;
            }
        };
        match ending {
            Ending::Broken => {
                tracing::debug!(group = %self.group, member = %self.member,
                    "consume: the member's stream broke; dropping its node streams");
                self.abort();
            }
            Ending::Closed => self.close(events).await,
            Ending::Fail(status) => {
                let _ = self.out.try_send(Err(status));
                self.close(events).await;
            }
        }
    }

    /// Gives every shard group of the map a link, and closes those of groups it no longer has.
    fn sync_links(&mut self) {
        let map = self.shared.map.current();
        let gone: Vec<u64> = self
            .links
            .keys()
            .filter(|g| !map.groups.iter().any(|mg| mg.id == **g))
            .copied()
            .collect();
        for group in gone {
            let link = self.links.remove(&group).expect("listed");
            let _ = link.closing.send(true);
            self.credits.down(group);
            self.retired.push(link.task);
        }
        self.retired.retain(|t| !t.is_finished());
        for g in &map.groups {
            if !self.links.contains_key(&g.id) {
                self.spawn_link(g.id);
            }
        }
    }

    fn spawn_link(&mut self, group: u64) {
        let link = self.next_link;
        self.next_link += 1;
        let (closing, closing_rx) = watch::channel(false);
        let spec = LinkSpec {
            group,
            link,
            consumer_group: self.group.clone(),
            member: self.member.clone(),
        };
        let task = tokio::spawn(link::run(
            self.shared.clone(),
            spec,
            self.events_tx.clone(),
            closing_rx,
        ));
        let link = Link {
            link,
            task,
            closing,
            tx: None,
            breaker: None,
        };
        self.links.insert(group, link);
    }

    /// One message of the member's.
    fn member_request(&mut self, req: ConsumeRequest) -> Result<(), Ending> {
        let (slot, msg) = match req.msg {
            Some(MemberReq::Credit(Credit { credits })) => return self.granted(credits),
            Some(MemberReq::Ack(a)) => (a.slot, PeerReq::Ack(a)),
            Some(MemberReq::Nack(n)) => (n.slot, PeerReq::Nack(n)),
            Some(MemberReq::InProgress(p)) => (p.slot, PeerReq::InProgress(p)),
            Some(MemberReq::Term(t)) => (t.slot, PeerReq::Term(t)),
            Some(MemberReq::Join(_)) => {
                return Err(Ending::Fail(Status::invalid_argument(
                    "a Consume stream has one Join, its first message",
                )))
            }
            None => return Ok(()),
        };
        let map = self.shared.map.current();
        let Some(&group) = map.slot_owner.get(slot as usize) else {
            tracing::debug!(slot, member = %self.member, "consume: ack of a slot out of range, dropped");
            return Ok(());
        };
        let sent = self.send(group, msg);
        if !sent {
            tracing::debug!(group, slot, member = %self.member,
                "consume: no stream up for the slot's group; the ack is dropped (the event comes again)");
        }
        Ok(())
    }

    /// The member granted `n` more credits.
    fn granted(&mut self, n: u32) -> Result<(), Ending> {
        let held = self.credits.held() + u64::from(n);
        if held > u64::from(FEED_GROUP_CREDITS_MAX) {
            return Err(Ending::Fail(Status::invalid_argument(format!(
                "a Credit of {n} would have the member hold {held} credits, over \
                 FEED_GROUP_CREDITS_MAX ({FEED_GROUP_CREDITS_MAX})"
            ))));
        }
        self.credits.add(n);
        self.lend()
    }

    /// Sends `msg` on `group`'s stream if it is up; a stream whose queue is full is dropped
    /// and opened again (its node does not keep up). Whether it went.
    fn send(&mut self, group: u64, msg: PeerReq) -> bool {
        let Some(tx) = self.links.get(&group).and_then(|l| l.tx.as_ref()) else {
            return false;
        };
        match tx.try_send(PeerConsumeRequest { msg: Some(msg) }) {
            Ok(()) => true,
            Err(_) => {
                tracing::warn!(group, member = %self.member,
                    "consume: the node stream does not take requests; opening it again");
                self.restart_link(group);
                false
            }
        }
    }

    fn restart_link(&mut self, group: u64) {
        if let Some(link) = self.links.remove(&group) {
            link.abort();
        }
        self.credits.down(group);
        self.spawn_link(group);
    }

    /// Lends the pool where events wait, reclaims where credits idle.
    fn lend(&mut self) -> Result<(), Ending> {
        for lend in self.credits.plan(Instant::now()) {
            match lend {
                Lend::Grant(group, n) => {
                    if !self.send(group, PeerReq::Credit(Credit { credits: n })) {
                        // The stream went down before the grant: it is the pool's again.
                        self.credits.down(group);
                    }
                }
                Lend::Reclaim(group) => {
                    self.send(group, PeerReq::Reclaim(Reclaim {}));
                }
            }
        }
        Ok(())
    }

    /// One report of a link.
    async fn event(&mut self, event: Event) -> Result<(), Ending> {
        let current = |links: &BTreeMap<u64, Link>, group: u64, link: u64| {
            links.get(&group).is_some_and(|l| l.link == link)
        };
        match event {
            Event::Up {
                group,
                link,
                tx,
                breaker,
            } if current(&self.links, group, link) => {
                let l = self.links.get_mut(&group).expect("current");
                l.tx = Some(tx);
                l.breaker = Some(breaker);
                self.credits.up(group);
                Ok(())
            }
            Event::Down { group, link } if current(&self.links, group, link) => {
                let l = self.links.get_mut(&group).expect("current");
                l.tx = None;
                l.breaker = None;
                self.credits.down(group);
                self.lend()
            }
            Event::Msg { group, link, msg } if current(&self.links, group, link) => {
                self.node_message(group, msg).await
            }
            Event::Gone { status } => Err(Ending::Fail(Status::not_found(format!(
                "consumer group {} was deleted: {}",
                self.group,
                status.message()
            )))),
            // A link that was replaced or closed.
            _ => Ok(()),
        }
    }

    async fn node_message(&mut self, group: u64, msg: PeerResp) -> Result<(), Ending> {
        let response = match msg {
            PeerResp::Delivery(d) => {
                let Some(event) = d.event else {
                    return Ok(());
                };
                if !self.credits.delivered(group) {
                    tracing::warn!(group, member = %self.member, slot = event.slot, seq = event.seq,
                        "consume: a node sent a delivery past the credits lent to it; dropped \
                         (it is delivered again after its lease)");
                    return Ok(());
                }
                ConsumeResponse {
                    event: Some(event),
                    attempt: d.attempt,
                    refused: None,
                }
            }
            PeerResp::Refused(stale) => ConsumeResponse {
                event: None,
                attempt: 0,
                refused: Some(stale),
            },
            PeerResp::Waiting(n) => {
                self.credits.waiting(group, n);
                return self.lend();
            }
            PeerResp::Returned(n) => {
                self.credits.returned(group, n);
                return self.lend();
            }
            PeerResp::Joined(_) => return Ok(()),
        };
        self.out
            .send(Ok(response))
            .await
            .map_err(|_| Ending::Broken)
    }

    /// Drops every node stream (the nodes see them break).
    fn abort(&mut self) {
        for (_, link) in std::mem::take(&mut self.links) {
            link.abort();
        }
        for task in self.retired.drain(..) {
            task.abort();
        }
    }

    /// Closes every node stream cleanly and waits for them to end (at most [`CLOSE_WAIT`] and
    /// a little): what links still report is dropped, with any request sender it carries.
    async fn close(mut self, mut events: mpsc::Receiver<Event>) {
        let mut tasks: Vec<JoinHandle<()>> = self.retired.drain(..).collect();
        for (_, link) in std::mem::take(&mut self.links) {
            let _ = link.closing.send(true);
            drop(link.tx);
            tasks.push(link.task);
        }
        let all = futures::future::join_all(tasks.iter_mut());
        let drain = async {
            while let Some(event) = events.recv().await {
                drop(event);
            }
            std::future::pending::<()>().await
        };
        let bound = CLOSE_WAIT + Duration::from_millis(500);
        tokio::select! {
            _ = all => {}
            _ = drain => {}
            _ = tokio::time::sleep(bound) => {
                tracing::debug!(member = %self.member, "consume: node streams not closed in time; dropping them");
            }
        }
        for task in tasks {
            task.abort();
        }
    }
}
