//! The watcher against a small in-process `Feed` server (tonic) whose streams break on cue: it
//! resumes from its last cursor with no gap, and gives up within its bounds when it cannot.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ordo_proto::retry::Backoff;
use ordo_proto::v1::feed_server::{Feed, FeedServer};
use ordo_proto::v1::watch_request::{Start as From, StartOneOf};
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

const EVENTS: u64 = 10;
/// Events per response.
const PAGE: usize = 2;
const BOUND: Duration = Duration::from_secs(10);

/// What the fake does after the first stream's first `BREAK_AFTER` responses.
#[derive(Clone, Copy)]
enum Mode {
    /// The first stream breaks; the next serves the rest and stays open.
    BreakOnce,
    /// The first stream breaks; every later Watch is refused as unavailable.
    BreakThenRefuse,
    /// Every Watch is refused as unimplemented (a router without the feed).
    Unimplemented,
}

const BREAK_AFTER: usize = 2;

/// One slot's log of `EVENTS` puts (seq n: item `o-n` at v1, committed at 1000 + n); the cursor
/// is the last seq sent, big-endian.
struct FakeFeed {
    mode: Mode,
    requests: Arc<Mutex<Vec<WatchRequest>>>,
}

fn event(seq: u64) -> ChangeEvent {
    ChangeEvent {
        slot: 3,
        seq,
        shard_key: Bytes::from(format!("o-{seq}")),
        key: Bytes::new(),
        op: ordo_proto::v1::change_event::Op::Put as i32,
        version: 1,
        value: Bytes::from(format!("value-{seq}")),
        old_value: Bytes::new(),
        commit_ts_ms: 1000 + seq,
        txn_id: Bytes::new(),
    }
}

#[tonic::async_trait]
impl Feed for FakeFeed {
    type WatchStream = ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let call = {
            let mut requests = self.requests.lock().unwrap();
            requests.push(request.clone());
            requests.len()
        };
        match (self.mode, call) {
            (Mode::Unimplemented, _) => return Err(Status::unimplemented("no feed here")),
            (Mode::BreakThenRefuse, 2..) => return Err(Status::unavailable("no stream now")),
            _ => {}
        }
        let after = match &request.start {
            Some(StartOneOf::Cursor(c)) => u64::from_be_bytes(c[..8].try_into().unwrap()),
            _ => 0,
        };
        let events: Vec<ChangeEvent> = (after + 1..=EVENTS).map(event).collect();
        let (tx, rx) = mpsc::channel(EVENTS as usize);
        tokio::spawn(async move {
            for (n, page) in events.chunks(PAGE).enumerate() {
                if call == 1 && n == BREAK_AFTER {
                    let _ = tx.send(Err(Status::unavailable("the stream broke"))).await;
                    return;
                }
                let last = page.last().unwrap();
                let response = WatchResponse {
                    events: page.to_vec(),
                    cursor: Bytes::copy_from_slice(&last.seq.to_be_bytes()),
                    resolved_ts_ms: last.commit_ts_ms,
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
            // Caught up: hold the stream open until the watcher leaves.
            tx.closed().await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    // The watcher uses Watch only.
    type ConsumeStream = ReceiverStream<Result<ConsumeResponse, Status>>;

    async fn create_group(
        &self,
        _: Request<CreateGroupRequest>,
    ) -> Result<Response<ConsumerGroup>, Status> {
        Err(Status::unimplemented("the fake serves Watch only"))
    }

    async fn describe_group(
        &self,
        _: Request<DescribeGroupRequest>,
    ) -> Result<Response<ConsumerGroup>, Status> {
        Err(Status::unimplemented("the fake serves Watch only"))
    }

    async fn delete_group(
        &self,
        _: Request<DeleteGroupRequest>,
    ) -> Result<Response<DeleteGroupResponse>, Status> {
        Err(Status::unimplemented("the fake serves Watch only"))
    }

    async fn consume(
        &self,
        _: Request<Streaming<ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        Err(Status::unimplemented("the fake serves Watch only"))
    }

    async fn list_groups(
        &self,
        _: Request<ListGroupsRequest>,
    ) -> Result<Response<ListGroupsResponse>, Status> {
        Err(Status::unimplemented("the fake serves Watch only"))
    }

    async fn seek_group(
        &self,
        _: Request<SeekGroupRequest>,
    ) -> Result<Response<ConsumerGroup>, Status> {
        Err(Status::unimplemented("the fake serves Watch only"))
    }

    async fn unpark(&self, _: Request<UnparkRequest>) -> Result<Response<ConsumerGroup>, Status> {
        Err(Status::unimplemented("the fake serves Watch only"))
    }
}

struct Served {
    addr: String,
    requests: Arc<Mutex<Vec<WatchRequest>>>,
    task: JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mode: Mode) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let feed = FakeFeed {
        mode,
        requests: requests.clone(),
    };
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(FeedServer::new(feed))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    Served {
        addr,
        requests,
        task,
    }
}

fn from_oldest() -> WatchRequest {
    WatchRequest {
        start: Some(StartOneOf::From(From::FromOldest as i32)),
        ..WatchRequest::default()
    }
}

fn quick() -> WatcherOptions {
    WatcherOptions {
        backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(20)),
        attempts_max: 3,
        reopen_within: BOUND,
    }
}

/// The fake's log as the writes that made it, every one acknowledged.
fn expected() -> Expected {
    let writes = (1..=EVENTS)
        .map(|seq| Write {
            item: ItemKey::new(format!("o-{seq}"), ""),
            op: WriteOp::Put {
                value: format!("value-{seq}").into_bytes(),
            },
            outcome: Outcome::Applied {
                version: 1,
                acked_ms: 1000 + seq,
            },
            txn: None,
        })
        .collect();
    Expected {
        writes,
        settled_ms: 1000 + EVENTS,
        ..Expected::default()
    }
}

#[tokio::test]
async fn the_watcher_resumes_from_its_last_cursor_after_a_break_with_no_gap() {
    let server = serve(Mode::BreakOnce).await;
    let watcher = Watcher::start_with("w", &server.addr, from_oldest(), Start::Empty, quick());
    watcher.wait_resolved(1000 + EVENTS, BOUND).await;
    assert_eq!(watcher.reconnects(), 1);
    let watch = watcher.stop().await.expect("the watcher gave up");

    let seqs: Vec<u64> = watch
        .responses
        .iter()
        .flat_map(|r| r.response.events.iter().map(|e| e.seq))
        .collect();
    assert_eq!(seqs, (1..=EVENTS).collect::<Vec<_>>());
    // The second stream asked for what followed the last response of the first.
    assert_eq!(
        watch.resumes,
        vec![Resume {
            first: BREAK_AFTER,
            after: Some(BREAK_AFTER - 1),
        }]
    );
    let requests = server.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0], from_oldest());
    let last_cursor = watch.responses[BREAK_AFTER - 1].response.cursor.clone();
    assert_eq!(requests[1].start, Some(StartOneOf::Cursor(last_cursor)));
    assert!(watch.responses.iter().all(|r| r.at_ms > 0));
    let report = check(&expected(), &[watch]);
    report.assert_ok();
    assert_eq!(report.stats.acked_found, EVENTS);
}

#[tokio::test]
async fn a_watcher_that_cannot_reopen_its_stream_gives_up_within_its_bounds() {
    let server = serve(Mode::BreakThenRefuse).await;
    let watcher = Watcher::start_with("w", &server.addr, from_oldest(), Start::Empty, quick());
    crate::wait_for("the watcher to give up", BOUND, || async {
        watcher.has_ended().then_some(())
    })
    .await;
    let failed = watcher.stop().await.expect_err("the watcher went on");
    assert!(failed.why.contains("3 attempts"), "{failed}");
    assert_eq!(failed.watch.responses.len(), BREAK_AFTER);
    // The first stream, then `attempts_max` tries to open another.
    assert_eq!(server.requests.lock().unwrap().len(), 1 + 3);
}

#[tokio::test]
async fn a_watcher_refused_for_good_gives_up_at_once() {
    let server = serve(Mode::Unimplemented).await;
    let watcher = Watcher::start_with("w", &server.addr, from_oldest(), Start::Empty, quick());
    crate::wait_for("the watcher to give up", BOUND, || async {
        watcher.has_ended().then_some(())
    })
    .await;
    let failed = watcher.stop().await.expect_err("the watcher went on");
    assert!(failed.why.contains("Unimplemented"), "{failed}");
    assert_eq!(server.requests.lock().unwrap().len(), 1);

    // A test waiting on such a watcher fails at once, saying why.
    let watcher = Watcher::start_with("w", &server.addr, from_oldest(), Start::Empty, quick());
    let waited = tokio::spawn(async move { watcher.wait_resolved(1, BOUND).await }).await;
    let panic = waited.expect_err("the wait passed").into_panic();
    let message = panic.downcast_ref::<String>().expect("a panic message");
    assert!(
        message.contains("the watcher ended before") && message.contains("no feed here"),
        "{message}"
    );
}
