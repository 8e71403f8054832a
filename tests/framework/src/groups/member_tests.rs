//! The member against a small in-process `Feed` server (tonic) that delivers a few events on
//! each Consume stream and records what the member sends and how its stream ended: acks and
//! credits go out as the handler says, refusals land on their delivery, a kill breaks the
//! stream (the server sees an error, never a clean end) and a close ends it cleanly.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ordo_proto::v1::consume_request::Msg;
use ordo_proto::v1::error_detail::StaleDelivery;
use ordo_proto::v1::feed_server::{Feed, FeedServer};
use ordo_proto::v1::{
    ChangeEvent, ConsumeRequest, ConsumeResponse, ConsumerGroup, CreateGroupRequest,
    DeleteGroupRequest, DeleteGroupResponse, DescribeGroupRequest, ListGroupsRequest,
    ListGroupsResponse, SeekGroupRequest, UnparkRequest, WatchRequest, WatchResponse,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use super::*;
use crate::wait_for;

const BOUND: Duration = Duration::from_secs(10);

/// How a stream's requests ended, as the server saw them.
#[derive(Clone, Debug, PartialEq)]
enum Ended {
    Clean,
    Broken(String),
}

#[derive(Default)]
struct Seen {
    requests: Vec<Msg>,
    ended: Option<Ended>,
}

/// Delivers events 1 and 2 of slot 7 (attempt 1) on each stream; refuses an ack of an event
/// in `refuse` (current attempt: one more).
struct FakeFeed {
    refuse: BTreeSet<u64>,
    seen: Arc<Mutex<Seen>>,
}

fn event(seq: u64) -> ChangeEvent {
    ChangeEvent {
        slot: 7,
        seq,
        shard_key: Bytes::from(format!("order-{seq}")),
        key: Bytes::from(format!("outbox/{seq}")),
        version: 1,
        value: Bytes::from(format!("v{seq}")),
        ..ChangeEvent::default()
    }
}

async fn pump(
    mut requests: Streaming<ConsumeRequest>,
    tx: mpsc::Sender<Result<ConsumeResponse, Status>>,
    refuse: BTreeSet<u64>,
    seen: Arc<Mutex<Seen>>,
) {
    for seq in [1, 2] {
        let d = ConsumeResponse {
            event: Some(event(seq)),
            attempt: 1,
            refused: None,
        };
        let _ = tx.send(Ok(d)).await;
    }
    let ended = loop {
        match requests.message().await {
            Ok(Some(r)) => {
                let msg = r.msg.expect("a message");
                if let Msg::Ack(a) = &msg {
                    if refuse.contains(&a.seq) {
                        let refused = StaleDelivery {
                            group: "g".into(),
                            slot: a.slot,
                            seq: a.seq,
                            attempt: a.attempt,
                            current_attempt: a.attempt + 1,
                        };
                        let r = ConsumeResponse {
                            refused: Some(refused),
                            ..ConsumeResponse::default()
                        };
                        let _ = tx.send(Ok(r)).await;
                    }
                }
                seen.lock().unwrap().requests.push(msg);
            }
            Ok(None) => break Ended::Clean,
            Err(s) => break Ended::Broken(format!("{s:?}")),
        }
    };
    seen.lock().unwrap().ended = Some(ended);
}

type Unused<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Feed for FakeFeed {
    type WatchStream = ReceiverStream<Result<WatchResponse, Status>>;
    type ConsumeStream = ReceiverStream<Result<ConsumeResponse, Status>>;

    async fn consume(
        &self,
        request: Request<Streaming<ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let (refuse, seen) = (self.refuse.clone(), self.seen.clone());
        tokio::spawn(pump(request.into_inner(), tx, refuse, seen));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn watch(&self, _: Request<WatchRequest>) -> Unused<Self::WatchStream> {
        Err(Status::unimplemented("the fake serves Consume only"))
    }

    async fn create_group(&self, _: Request<CreateGroupRequest>) -> Unused<ConsumerGroup> {
        Err(Status::unimplemented("the fake serves Consume only"))
    }

    async fn describe_group(&self, _: Request<DescribeGroupRequest>) -> Unused<ConsumerGroup> {
        Err(Status::unimplemented("the fake serves Consume only"))
    }

    async fn delete_group(&self, _: Request<DeleteGroupRequest>) -> Unused<DeleteGroupResponse> {
        Err(Status::unimplemented("the fake serves Consume only"))
    }

    async fn list_groups(&self, _: Request<ListGroupsRequest>) -> Unused<ListGroupsResponse> {
        Err(Status::unimplemented("the fake serves Consume only"))
    }

    async fn seek_group(&self, _: Request<SeekGroupRequest>) -> Unused<ConsumerGroup> {
        Err(Status::unimplemented("the fake serves Consume only"))
    }

    async fn unpark(&self, _: Request<UnparkRequest>) -> Unused<ConsumerGroup> {
        Err(Status::unimplemented("the fake serves Consume only"))
    }
}

struct Served {
    addr: String,
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(refuse: &[u64]) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let feed = FakeFeed {
        refuse: refuse.iter().copied().collect(),
        seen: seen.clone(),
    };
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(FeedServer::new(feed))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    Served { addr, seen, task }
}

async fn ended(s: &Served) -> Ended {
    wait_for("the server to see the stream end", BOUND, || async {
        s.seen.lock().unwrap().ended.clone()
    })
    .await
}

/// Waits until `rec` holds `n` deliveries all matching `f`.
async fn wait_outcomes(rec: &Recorder, n: usize, f: fn(&Delivery) -> bool) -> Vec<Delivery> {
    wait_for("the deliveries' outcomes", BOUND, || async {
        let ds = rec.deliveries();
        (ds.len() == n && ds.iter().all(f)).then_some(ds)
    })
    .await
}

#[tokio::test]
async fn a_member_acks_grants_a_credit_per_delivery_and_leaves_cleanly() {
    let s = serve(&[]).await;
    let rec = Recorder::new();
    let opts = MemberOptions::new("g", "m-ack", 4);
    let handler = policy(|_| (Duration::from_millis(5), Action::Ack));
    let m = Member::join(&s.addr, opts, handler, &rec).await.unwrap();
    let ds = wait_outcomes(&rec, 2, |d| matches!(d.outcome, Outcome::Acked { .. })).await;
    assert_eq!(ds[0].event(), (7, 1));
    assert_eq!((ds[1].event(), ds[1].attempt), ((7, 2), 1));
    assert!(ds[0].delivered_at <= ds[1].delivered_at);
    assert_eq!(
        ds[0].outcome.ended_at().map(|at| at >= ds[0].delivered_at),
        Some(true)
    );
    m.close().await;
    assert_eq!(ended(&s).await, Ended::Clean);
    let requests = s.seen.lock().unwrap().requests.clone();
    let kinds: Vec<&str> = requests
        .iter()
        .map(|m| match m {
            Msg::Join(j) => {
                assert_eq!(
                    (j.group.as_str(), j.member.as_str(), j.credits),
                    ("g", "m-ack", 4)
                );
                "join"
            }
            Msg::Ack(_) => "ack",
            Msg::Credit(c) => {
                assert_eq!(c.credits, 1);
                "credit"
            }
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["join", "ack", "credit", "ack", "credit"]);
    assert_eq!(rec.ends().len(), 1);
    assert_eq!(rec.ends()[0].status, None, "the member closed it");
}

#[tokio::test]
async fn a_killed_member_breaks_its_stream_and_what_it_held_died() {
    let s = serve(&[]).await;
    let rec = Recorder::new();
    let opts = MemberOptions::new("g", "m-kill", 4);
    let handler = policy(|_| (Duration::from_secs(30), Action::Ack));
    let m = Member::join(&s.addr, opts, handler, &rec).await.unwrap();
    wait_outcomes(&rec, 2, |d| d.outcome == Outcome::Open).await;
    let before = rec.now();
    m.kill().await;
    match ended(&s).await {
        Ended::Broken(_) => {}
        Ended::Clean => panic!("a kill must not end the stream cleanly"),
    }
    let ds = wait_outcomes(&rec, 2, |d| matches!(d.outcome, Outcome::Died { .. })).await;
    let at = ds[0].outcome.ended_at().unwrap();
    assert!(
        at >= before && ds[1].outcome.ended_at() == Some(at),
        "{ds:?}"
    );
    assert_eq!(
        rec.ends()[0].at,
        at,
        "the stream ended when the member died"
    );
}

#[tokio::test]
async fn a_refused_ack_is_recorded_on_its_delivery() {
    let s = serve(&[1]).await;
    let rec = Recorder::new();
    let opts = MemberOptions::new("g", "m-refused", 4);
    let m = Member::join(
        &s.addr,
        opts,
        policy(|_| (Duration::ZERO, Action::Ack)),
        &rec,
    )
    .await
    .unwrap();
    let ds = wait_outcomes(&rec, 2, |d| d.seq == 2 || d.refused.is_some()).await;
    assert_eq!(ds[0].refused.map(|r| r.1), Some(2), "{ds:?}");
    assert_eq!(ds[1].refused, None);
    m.close().await;
    assert!(rec.notes().is_empty(), "{:?}", rec.notes());
}

#[tokio::test]
async fn a_member_that_dies_mid_delivery_breaks_its_stream() {
    let s = serve(&[]).await;
    let rec = Recorder::new();
    let opts = MemberOptions::new("g", "m-die", 4);
    let m = Member::join(
        &s.addr,
        opts,
        policy(|_| (Duration::ZERO, Action::Die)),
        &rec,
    )
    .await
    .unwrap();
    assert!(matches!(ended(&s).await, Ended::Broken(_)));
    assert!(m.has_ended());
    // The second delivery may or may not have arrived before the death; none is open.
    let ds = rec.deliveries();
    assert!(!ds.is_empty() && ds.len() <= 2, "{ds:?}");
    assert!(
        ds.iter().all(|d| matches!(d.outcome, Outcome::Died { .. })),
        "{ds:?}"
    );
    let sent = s.seen.lock().unwrap().requests.len();
    assert_eq!(sent, 1, "only the join went out");
}
