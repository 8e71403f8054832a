//! One member's stream to one shard group's leader (`Peer.Consume`), kept up by a task: it
//! opens the stream with a `PeerJoin` (credits 0: the member's session lends them), follows the
//! leader with [`follow_leader`], hands the session the stream's request sender and every
//! response, and after an end opens it again (at once at a hinted leader, else after a
//! backoff), until the session closes it or the group is gone.
//!
//! The task never holds the request sender itself, so when the session drops it the node sees
//! the end of the request stream (a clean close: it hands the member's in-flight events on at
//! once); the task then reads the response stream to its end, within [`CLOSE_WAIT`]. To break
//! it instead (the member vanished: the node lets the leases run out) the session sends on the
//! stream's breaker before it drops the sender (see [`ConsumeCodec`]).

use std::sync::Mutex;
use std::time::Duration;

use futures::Stream;
use ordo_proto::retry::{follow_leader, Backoff, GaveUp, LeaderCursor, Walk, Why};
use ordo_proto::v1::peer_consume_request::Msg as PeerReq;
use ordo_proto::v1::peer_consume_response::Msg as PeerResp;
use ordo_proto::v1::{PeerConsumeRequest, PeerConsumeResponse, PeerJoin};
use prost::Message;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tonic::client::Grpc;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Code, Request, Status, Streaming};

use crate::config::refresh_map;
use crate::map::replicas;
use crate::pool::MESSAGE_BYTES_MAX;
use crate::retry::{classify, describe, Action, Effect, BACKOFF, MAX_ATTEMPTS};
use crate::Shared;

/// Requests queued to one node stream: the member's acks (at most its credits in flight, so
/// [`ordo_proto::FEED_GROUP_CREDITS_MAX`]) and the router's grants and reclaims, with room. A
/// stream whose node does not take them that fast is dropped and opened again.
pub(crate) const LINK_REQUESTS_MAX: usize = ordo_proto::FEED_GROUP_CREDITS_MAX as usize + 64;
/// Longest wait for a replica to accept a consume stream and answer `joined`.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a cleanly closed stream is read for its end before it is dropped.
pub(crate) const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Between failed opens of one stream (a shard group may be down for long; the member's other
/// streams go on meanwhile).
const REOPEN_BACKOFF: Backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(2));

/// What a link tells the member's session, in order (an `Up`, its stream's messages, its
/// `Down`, the next `Up`, ...). `link` names the task (one per shard group and session, a new
/// one if the group comes back or the stream is dropped), so a replaced task's reports are
/// told apart.
#[derive(Debug)]
pub(crate) enum Event {
    /// The stream joined: requests go to `tx`; dropping it closes the stream cleanly, a
    /// send on `breaker` breaks it.
    Up {
        group: u64,
        link: u64,
        tx: mpsc::Sender<PeerConsumeRequest>,
        breaker: oneshot::Sender<()>,
    },
    /// A response of the stream that is up.
    Msg {
        group: u64,
        link: u64,
        msg: PeerResp,
    },
    /// The stream that was up ended; what it was lent is the pool's again.
    Down { group: u64, link: u64 },
    /// The node says the group does not exist (deleted): the member's stream ends with it.
    Gone { status: Status },
}

/// What a link needs to know.
pub(crate) struct LinkSpec {
    pub(crate) group: u64,
    pub(crate) link: u64,
    pub(crate) consumer_group: String,
    pub(crate) member: String,
}

/// Keeps `spec.group`'s stream up until `closing` turns true (then closes it cleanly) or the
/// group is gone; reports to `events`.
pub(crate) async fn run(
    shared: Arc<Shared>,
    spec: LinkSpec,
    events: mpsc::Sender<Event>,
    mut closing: watch::Receiver<bool>,
) {
    let (group, link) = (spec.group, spec.link);
    let mut hint: Option<String> = None;
    let mut failures = 0u32;
    loop {
        if *closing.borrow() {
            return;
        }
        let opened = tokio::select! {
            opened = open(&shared, &spec, hint.take()) => opened,
            _ = closed(&mut closing) => return,
        };
        let (addr, tx, breaker, mut stream) = match opened {
            Ok(up) => up,
            Err(status) if status.code() == Code::NotFound => {
                let _ = events.send(Event::Gone { status }).await;
                return;
            }
            Err(status) => {
                failures += 1;
                if status.code() == Code::Unavailable {
                    tracing::debug!(group, failures, error = %describe(&status),
                        "consume: cannot open the node stream; trying again");
                } else {
                    tracing::warn!(group, failures, error = %describe(&status),
                        "consume: a node refused the member's stream; trying again");
                }
                if matches!(classify(&status, Effect::Read), Action::Refresh { .. }) {
                    // The replica is not that shard group at the router's map: a newer map.
                    let used = shared.map.current().version;
                    let _ = refresh_map(&shared, used, Instant::now() + OPEN_TIMEOUT).await;
                }
                pause(&mut closing, REOPEN_BACKOFF.delay(failures - 1)).await;
                continue;
            }
        };
        shared.leaders.set(group, &addr);
        let up = Event::Up {
            group,
            link,
            tx,
            breaker,
        };
        if events.send(up).await.is_err() {
            return;
        }
        let end = forward(&mut stream, &events, group, link, &mut closing).await;
        if events.send(Event::Down { group, link }).await.is_err() {
            return;
        }
        match end {
            End::Closed | End::SessionGone => return,
            End::Gone(status) => {
                let _ = events.send(Event::Gone { status }).await;
                return;
            }
            End::Failed(status) => {
                tracing::debug!(group, %addr, error = %describe(&status),
                    "consume: the node stream ended; opening it again");
                if let Action::Redirect(leader) = classify(&status, Effect::Read) {
                    // A new leader named: there at once.
                    hint = Some(leader);
                    failures = 0;
                    continue;
                }
                failures += 1;
                pause(&mut closing, REOPEN_BACKOFF.delay(failures - 1)).await;
            }
        }
    }
}

/// Until the session closes the link (or is gone).
pub(crate) async fn closed(closing: &mut watch::Receiver<bool>) {
    let _ = closing.wait_for(|c| *c).await;
}

async fn pause(closing: &mut watch::Receiver<bool>, delay: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = closed(closing) => {}
    }
}

/// How a stream that was up ended.
enum End {
    /// The session closed it and the node ended it (or [`CLOSE_WAIT`] passed).
    Closed,
    /// The session is gone.
    SessionGone,
    /// NOT_FOUND: the group was deleted.
    Gone(Status),
    /// Anything else: open it again.
    Failed(Status),
}

/// Hands the session every response of `stream` until it ends.
async fn forward(
    stream: &mut Streaming<PeerConsumeResponse>,
    events: &mpsc::Sender<Event>,
    group: u64,
    link: u64,
    closing: &mut watch::Receiver<bool>,
) -> End {
    loop {
        let next = tokio::select! {
            next = stream.message() => next,
            _ = closed(closing) => {
                // The session dropped the request sender: the node sees the end of the
                // requests and ends its responses; read them to the end, within a bound.
                let drain = async { while let Ok(Some(_)) = stream.message().await {} };
                let _ = tokio::time::timeout(CLOSE_WAIT, drain).await;
                return End::Closed;
            }
        };
        let msg = match next {
            Ok(Some(PeerConsumeResponse { msg: Some(msg) })) => msg,
            // An empty message says nothing (a newer node's message this router does not know).
            Ok(Some(PeerConsumeResponse { msg: None })) => continue,
            Ok(None) => return End::Failed(Status::unavailable("the node ended the stream")),
            Err(status) if status.code() == Code::NotFound => return End::Gone(status),
            Err(status) => return End::Failed(status),
        };
        if events.send(Event::Msg { group, link, msg }).await.is_err() {
            return End::SessionGone;
        }
    }
}

type Opened = (
    String,
    mpsc::Sender<PeerConsumeRequest>,
    oneshot::Sender<()>,
    Streaming<PeerConsumeResponse>,
);

/// Opens the stream on `spec.group`'s leader (the hint, else the cached one) and waits for
/// `joined`.
async fn open(shared: &Shared, spec: &LinkSpec, hint: Option<String>) -> Result<Opened, Status> {
    let map = shared.map.current();
    let list = replicas(&map, spec.group).map_err(Status::unavailable)?;
    let mut cursor = LeaderCursor::new(list.clone());
    cursor.redirect(hint.unwrap_or_else(|| shared.leaders.pick(spec.group, &list)));
    let cursor = Mutex::new(cursor);
    let mut walk = Walk::new(
        Effect::Read.into(),
        MAX_ATTEMPTS,
        Instant::now() + crate::feed::FEED_REOPEN_WITHIN,
        BACKOFF,
    );
    walk.attempt_timeout = Some(OPEN_TIMEOUT);
    let join = PeerJoin {
        group_id: spec.group,
        group: spec.consumer_group.clone(),
        member: spec.member.clone(),
        credits: 0,
    };
    let join = &join;
    let attempt = |addr: String, _bound: Duration| {
        // No grpc-timeout: the stream lives as long as the member's; the walk bounds the open.
        let channel = shared.pool.channel(&addr);
        async move {
            let channel = channel.map_err(Status::unavailable)?;
            let mut grpc = Grpc::new(channel)
                .max_decoding_message_size(MESSAGE_BYTES_MAX)
                .max_encoding_message_size(MESSAGE_BYTES_MAX);
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(format!("{addr} is not ready: {e}")))?;
            let (tx, rx) = mpsc::channel(LINK_REQUESTS_MAX);
            let (breaker, broken) = oneshot::channel();
            tx.try_send(PeerConsumeRequest {
                msg: Some(PeerReq::Join(join.clone())),
            })
            .expect("a new channel has room");
            let request = Request::new(requests(rx, broken));
            let path = PathAndQuery::from_static(CONSUME_PATH);
            let response = grpc.streaming(request, path, ConsumeCodec).await?;
            let mut stream = response.into_inner();
            match stream.message().await? {
                Some(PeerConsumeResponse {
                    msg: Some(PeerResp::Joined(_)),
                }) => Ok((addr, tx, breaker, stream)),
                Some(other) => Err(Status::internal(format!(
                    "{addr} answered a join with {other:?} before `joined`"
                ))),
                None => Err(Status::unavailable(format!(
                    "{addr} ended the consume stream before `joined`"
                ))),
            }
        }
    };
    follow_leader(&cursor, &walk, attempt)
        .await
        .map_err(gave_up_status)
}

/// The request stream of a node stream: what the session sends, until it drops the sender
/// (the end of the requests: a clean close) or breaks it.
fn requests(
    rx: mpsc::Receiver<PeerConsumeRequest>,
    broken: oneshot::Receiver<()>,
) -> impl Stream<Item = Out> + Send + 'static {
    futures::stream::unfold(Some((rx, Some(broken))), |state| async move {
        let (mut rx, mut broken) = state?;
        loop {
            let Some(b) = broken.as_mut() else {
                return rx.recv().await.map(|m| (Out::Req(m), Some((rx, None))));
            };
            tokio::select! {
                biased;
                r = b => {
                    if r.is_ok() {
                        return Some((Out::Break, None));
                    }
                }
                next = rx.recv() => return next.map(|m| (Out::Req(m), Some((rx, broken)))),
            }
            // The breaker was dropped unsent: nothing can break the stream any more. It is not
            // polled again (a finished oneshot receiver panics when polled: that aborted the
            // router when a session dropped a link's breaker before its sender).
            broken = None;
        }
    })
}

/// `Peer.Consume`, called through [`ConsumeCodec`] rather than the generated client.
const CONSUME_PATH: &str = "/ordo.v1.Peer/Consume";

/// What the router writes on a node stream: a request, or the order to break the stream.
enum Out {
    Req(PeerConsumeRequest),
    Break,
}

/// The prost encoding of `Peer.Consume`, plus [`Out::Break`]: an encoding error, which makes
/// the stream end with RST_STREAM(INTERNAL_ERROR), so the node sees it break. (A tonic server
/// reads RST_STREAM(CANCEL), what tonic's own cancellation sends, as a clean end of the
/// requests, which would hand the member's in-flight events on at once.)
struct ConsumeCodec;

struct OutEncoder;

struct ResponseDecoder;

impl Codec for ConsumeCodec {
    type Encode = Out;
    type Decode = PeerConsumeResponse;
    type Encoder = OutEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> OutEncoder {
        OutEncoder
    }

    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

impl Encoder for OutEncoder {
    type Item = Out;
    type Error = Status;

    fn encode(&mut self, item: Out, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Out::Req(req) => req
                .encode(dst)
                .map_err(|e| Status::internal(format!("encoding a consume request: {e}"))),
            Out::Break => Err(Status::aborted("the member's stream broke")),
        }
    }
}

impl Decoder for ResponseDecoder {
    type Item = PeerConsumeResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<PeerConsumeResponse>, Status> {
        PeerConsumeResponse::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding a consume response: {e}")))
    }
}

fn gave_up_status(gave_up: GaveUp) -> Status {
    let GaveUp {
        why,
        attempts,
        addr,
        elapsed,
    } = gave_up;
    match why {
        Why::Refused { status, .. } => status,
        why => {
            let last = match &why {
                Why::AttemptsSpent(s) | Why::OutOfTime(s) | Why::DeadlinePassed(Some(s)) => {
                    describe(s)
                }
                _ => format!("no answer within {OPEN_TIMEOUT:?}"),
            };
            Status::unavailable(format!(
                "no replica accepted the consume stream ({attempts} attempts over \
                 {elapsed:.1?}); last error from {addr}: {last}"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn requests_go_on_after_the_breaker_is_dropped_unsent() {
        let (tx, rx) = mpsc::channel(4);
        let (breaker, broken) = oneshot::channel::<()>();
        let mut out = Box::pin(requests(rx, broken));
        drop(breaker);
        for _ in 0..3 {
            tx.send(PeerConsumeRequest::default()).await.unwrap();
            assert!(matches!(out.next().await, Some(Out::Req(_))));
        }
        drop(tx);
        assert!(
            out.next().await.is_none(),
            "the end of the requests ends the stream"
        );
    }

    #[tokio::test]
    async fn a_sent_breaker_breaks_the_stream() {
        let (tx, rx) = mpsc::channel(4);
        let (breaker, broken) = oneshot::channel::<()>();
        let mut out = Box::pin(requests(rx, broken));
        tx.send(PeerConsumeRequest::default()).await.unwrap();
        assert!(matches!(out.next().await, Some(Out::Req(_))));
        breaker.send(()).unwrap();
        assert!(matches!(out.next().await, Some(Out::Break)));
        assert!(out.next().await.is_none());
    }
}
