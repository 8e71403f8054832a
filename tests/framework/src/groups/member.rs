//! One member of a consumer group: a `Feed.Consume` stream through a router on a TCP connection
//! of its own, a handler that decides what to do with each delivery, and a record of each in
//! the test's [`Recorder`].
//!
//! Two tasks per stream: the reader takes every response off the stream as it arrives (so a
//! delivery's instant is when it reached the member, not when the handler got round to it) and
//! queues deliveries for the worker, which runs the handler on one delivery at a time, sends
//! its answer and grants one credit back. [`Member::kill`] shuts the connection down under the
//! stream, as the death of a process does (the router sees it break, never a clean end);
//! [`Member::close`] ends the request stream cleanly, as a member that leaves does.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use ordo_proto::addr::CLIENT_RESPONSE_BYTES_MAX;
use ordo_proto::v1::consume_request::Msg;
use ordo_proto::v1::feed_client::FeedClient;
use ordo_proto::v1::{Ack, ConsumeRequest, ConsumeResponse, Credit, Join, Nack, Term};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;
use tonic::transport::Uri;
use tonic::Status;

use super::{Delivery, Outcome, Recorder, StreamEnd};

/// What a handler did with a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Ack,
    Nack {
        delay_ms: u32,
    },
    Term,
    /// Never answer it (it stays in flight until its lease runs out).
    Ignore,
    /// The member dies holding it: its connection is shut down.
    Die,
    /// The handler acked it inside a `Txn` it sent at `sent`, with this outcome. (The sending
    /// instant ends the delivery: once the Txn applies, the order's next event may reach the
    /// member before the Txn's answer does.)
    Txn {
        outcome: TxnOutcome,
        sent: Instant,
    },
    /// The same, and the member dies right after it learnt the outcome (or, `Unknown`, with
    /// the Txn still on its way).
    TxnAndDie {
        outcome: TxnOutcome,
        sent: Instant,
    },
}

/// How a `Txn` with a `feed_ack` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    Applied,
    /// FAILED_PRECONDITION with `StaleDelivery`: the event's current attempt then.
    Refused {
        current_attempt: u32,
    },
    /// No answer that says (a timeout, a connection lost).
    Unknown,
}

/// The future a [`Handler`] answers with.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Action> + Send + 'a>>;

/// Decides what a member does with each delivery (it may take time, write to Ordo, ...).
pub trait Handler: Send + 'static {
    fn handle<'a>(&'a mut self, d: &'a Delivery) -> HandlerFuture<'a>;
}

/// A handler from a function that says how long to hold a delivery and what to do then.
struct Policy<F>(F);

impl<F> Handler for Policy<F>
where
    F: FnMut(&Delivery) -> (Duration, Action) + Send + 'static,
{
    fn handle<'a>(&'a mut self, d: &'a Delivery) -> HandlerFuture<'a> {
        let (hold, action) = (self.0)(d);
        Box::pin(async move {
            if !hold.is_zero() {
                tokio::time::sleep(hold).await;
            }
            action
        })
    }
}

/// A handler that holds each delivery for the time `f` says, then does what it says.
pub fn policy<F>(f: F) -> Box<dyn Handler>
where
    F: FnMut(&Delivery) -> (Duration, Action) + Send + 'static,
{
    Box::new(Policy(f))
}

/// Who a member is and how it joins.
#[derive(Clone, Debug)]
pub struct MemberOptions {
    pub group: String,
    pub name: String,
    /// `Join.credits`.
    pub credits: u32,
    /// Grant one credit back after each delivery handled (ack, nack, term, ignore, txn).
    pub refill: bool,
}

impl MemberOptions {
    pub fn new(group: &str, name: &str, credits: u32) -> MemberOptions {
        MemberOptions {
            group: group.to_string(),
            name: name.to_string(),
            credits,
            refill: true,
        }
    }
}

/// Where a member's stream stands, for its two tasks.
#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Running,
    /// Killed, closed or ended at this instant: deliveries not answered yet died then.
    Stopped(Duration),
}

/// A connector that keeps a second handle of each socket it opens, so a kill can shut the
/// connection down under the channel.
#[derive(Clone, Default)]
struct KillableConnector {
    sockets: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl KillableConnector {
    fn kill(&self) {
        for s in self.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl tower_service::Service<Uri> for KillableConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let sockets = self.sockets.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or("127.0.0.1").to_string();
            let port = uri.port_u16().unwrap_or(80);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let std = tcp.into_std()?;
            sockets.lock().unwrap().push(std.try_clone()?);
            std.set_nonblocking(true)?;
            Ok(TokioIo::new(tokio::net::TcpStream::from_std(std)?))
        })
    }
}

/// What the member's tasks and its handle share.
struct Shared {
    name: String,
    incarnation: u32,
    recorder: Recorder,
    /// The request stream; taken (dropped) to close it cleanly.
    tx: Mutex<Option<mpsc::Sender<ConsumeRequest>>>,
    state: watch::Sender<State>,
    connector: KillableConnector,
}

impl Shared {
    fn send(&self, msg: Msg) -> bool {
        let tx = self.tx.lock().unwrap().clone();
        tx.is_some_and(|tx| tx.try_send(ConsumeRequest { msg: Some(msg) }).is_ok())
    }

    fn stop(&self, at: Duration) {
        self.state.send_if_modified(|s| {
            let first = *s == State::Running;
            if first {
                *s = State::Stopped(at);
            }
            first
        });
    }

    fn stopped_at(&self) -> Option<Duration> {
        match *self.state.borrow() {
            State::Running => None,
            State::Stopped(at) => Some(at),
        }
    }
}

/// Joins counted per member name across the whole test process, so each stream of a name has
/// its own incarnation.
static INCARNATIONS: Mutex<Vec<(String, u32)>> = Mutex::new(Vec::new());

fn next_incarnation(name: &str) -> u32 {
    let mut all = INCARNATIONS.lock().unwrap();
    if let Some((_, n)) = all.iter_mut().find(|(m, _)| m == name) {
        *n += 1;
        return *n;
    }
    all.push((name.to_string(), 1));
    1
}

/// A running member (tasks of the current tokio runtime).
pub struct Member {
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
    worker: JoinHandle<()>,
    handled: Arc<AtomicU32>,
}

impl Member {
    /// Opens a Consume stream through the router at `router` with a `Join` from `opts`; answers
    /// once the router accepted it (its response headers came), or what it refused it with.
    pub async fn join(
        router: &str,
        opts: MemberOptions,
        handler: Box<dyn Handler>,
        recorder: &Recorder,
    ) -> Result<Member, Status> {
        let connector = KillableConnector::default();
        let channel = crate::endpoint(router)
            .map_err(|e| Status::invalid_argument(format!("router address {router:?}: {e}")))?
            .connect_with_connector_lazy(connector.clone());
        let mut client =
            FeedClient::new(channel).max_decoding_message_size(CLIENT_RESPONSE_BYTES_MAX);
        let (tx, rx) = mpsc::channel(1024);
        let join = Join {
            group: opts.group.clone(),
            member: opts.name.clone(),
            credits: opts.credits,
        };
        tx.try_send(ConsumeRequest {
            msg: Some(Msg::Join(join)),
        })
        .expect("an empty channel");
        let stream = client.consume(ReceiverStream::new(rx)).await?.into_inner();
        let shared = Arc::new(Shared {
            name: opts.name.clone(),
            incarnation: next_incarnation(&opts.name),
            recorder: recorder.clone(),
            tx: Mutex::new(Some(tx)),
            state: watch::channel(State::Running).0,
            connector,
        });
        let (work_tx, work_rx) = mpsc::unbounded_channel();
        let handled = Arc::new(AtomicU32::new(0));
        let reader = tokio::spawn(read(shared.clone(), stream, work_tx));
        let worker = tokio::spawn(work(
            shared.clone(),
            handler,
            work_rx,
            opts.refill,
            handled.clone(),
        ));
        Ok(Member {
            shared,
            reader,
            worker,
            handled,
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn incarnation(&self) -> u32 {
        self.shared.incarnation
    }

    /// Deliveries its handler has answered.
    pub fn handled(&self) -> u32 {
        self.handled.load(Ordering::Relaxed)
    }

    /// Its stream ended (killed, closed, or by the router).
    pub fn has_ended(&self) -> bool {
        self.shared.stopped_at().is_some() || self.reader.is_finished()
    }

    /// Sends `Ack` of `d` by hand (e.g. a late one) and records it on `d`'s record.
    pub fn ack(&self, d: &Delivery) {
        let at = self.shared.recorder.now();
        let sent = self.shared.send(Msg::Ack(Ack {
            slot: d.slot,
            seq: d.seq,
            attempt: d.attempt,
        }));
        let outcome = if sent {
            Outcome::Acked { at }
        } else {
            Outcome::Unsent { at }
        };
        let recorder = &self.shared.recorder;
        let found = recorder.find(&d.member, d.incarnation, d.event(), d.attempt);
        let i = found.expect("a delivery this test recorded");
        recorder.update(i, |r| r.outcome = outcome);
    }

    /// Grants `n` more credits.
    pub fn credit(&self, n: u32) -> bool {
        self.shared.send(Msg::Credit(Credit { credits: n }))
    }

    /// Kills the member: its connection is shut down under the stream (the router sees it
    /// break), and what it held died now.
    pub async fn kill(self) {
        self.shared.stop(self.shared.recorder.now());
        self.shared.connector.kill();
        self.finish().await;
    }

    /// Leaves cleanly: the request stream ends, so the router closes the member's node streams
    /// and the nodes hand what it held to others at once; waits for the stream to end.
    pub async fn close(self) {
        self.shared.stop(self.shared.recorder.now());
        drop(self.shared.tx.lock().unwrap().take());
        self.finish().await;
    }

    async fn finish(self) {
        let bound = Duration::from_secs(20);
        let name = self.shared.name.clone();
        let ended = tokio::time::timeout(bound, async {
            let _ = self.worker.await;
            let _ = (&mut { self.reader }).await;
        })
        .await;
        if ended.is_err() {
            // A router that never ends a closed stream: cut it, and say so.
            self.shared.connector.kill();
            panic!("member {name}: its stream did not end within {bound:?} of its close");
        }
        self.shared.connector.kill();
    }
}

/// The reader: records every response as it arrives and queues deliveries for the worker.
async fn read(
    shared: Arc<Shared>,
    mut stream: Streaming<ConsumeResponse>,
    work: mpsc::UnboundedSender<usize>,
) {
    let rec = &shared.recorder;
    let status = loop {
        match stream.message().await {
            Ok(Some(r)) => {
                let at = rec.now();
                if let Some(s) = r.refused {
                    let key = (s.slot, s.seq);
                    match rec.find(&shared.name, shared.incarnation, key, s.attempt) {
                        Some(i) => rec.update(i, |d| d.refused = Some((at, s.current_attempt))),
                        None => rec.note(format!(
                            "member {} (stream {}): refused {s:?}, an attempt this stream never \
                             had delivered",
                            shared.name, shared.incarnation
                        )),
                    }
                } else if let Some(e) = r.event {
                    let mut d = Delivery::of(&shared.name, &e, r.attempt, at);
                    d.incarnation = shared.incarnation;
                    let i = rec.push(d);
                    if work.send(i).is_err() {
                        // The worker is gone (the member stopped): nobody holds it.
                        rec.update(i, |d| d.outcome = Outcome::Died { at });
                    }
                }
            }
            Ok(None) => break None,
            Err(s) => break Some(s),
        }
    };
    let ours = shared.stopped_at().is_some();
    let at = shared.stopped_at().unwrap_or_else(|| rec.now());
    rec.end(StreamEnd {
        member: shared.name.clone(),
        incarnation: shared.incarnation,
        at,
        status: match (&status, ours) {
            (_, true) => None,
            (None, false) => Some("the router ended the stream (OK)".to_string()),
            (Some(s), false) => Some(format!("{:?}: {}", s.code(), s.message())),
        },
    });
    shared.stop(at);
}

/// The worker: one delivery at a time through the handler, its answer sent, a credit back.
async fn work(
    shared: Arc<Shared>,
    mut handler: Box<dyn Handler>,
    mut queue: mpsc::UnboundedReceiver<usize>,
    refill: bool,
    handled: Arc<AtomicU32>,
) {
    let rec = shared.recorder.clone();
    let mut state = shared.state.subscribe();
    loop {
        let next = tokio::select! {
            _ = state.wait_for(|s| *s != State::Running) => None,
            i = queue.recv() => i,
        };
        let Some(i) = next else { break };
        let d = rec.get(i);
        let action = tokio::select! {
            _ = state.wait_for(|s| *s != State::Running) => None,
            a = handler.handle(&d) => Some(a),
        };
        let Some(action) = action else {
            queue.close();
            mark_died(&rec, &shared, Some(i), &mut queue);
            return;
        };
        if shared.stopped_at().is_some() {
            // It stopped while the handler finished: the answer never left.
            mark_died(&rec, &shared, Some(i), &mut queue);
            return;
        }
        let at = rec.now();
        let (msg, outcome) = match action {
            Action::Ack => (
                Some(Msg::Ack(Ack {
                    slot: d.slot,
                    seq: d.seq,
                    attempt: d.attempt,
                })),
                Outcome::Acked { at },
            ),
            Action::Nack { delay_ms } => (
                Some(Msg::Nack(Nack {
                    slot: d.slot,
                    seq: d.seq,
                    attempt: d.attempt,
                    delay_ms,
                })),
                Outcome::Nacked { at },
            ),
            Action::Term => (
                Some(Msg::Term(Term {
                    slot: d.slot,
                    seq: d.seq,
                    attempt: d.attempt,
                })),
                Outcome::Termed { at },
            ),
            Action::Ignore => (None, Outcome::Ignored),
            Action::Txn { outcome, sent } => {
                let at = rec.at(sent);
                (None, Outcome::Txn { at, outcome })
            }
            Action::Die => {
                shared.stop(at);
                shared.connector.kill();
                mark_died(&rec, &shared, Some(i), &mut queue);
                return;
            }
            Action::TxnAndDie { outcome, sent } => {
                let sent = rec.at(sent);
                rec.update(i, |r| r.outcome = Outcome::Txn { at: sent, outcome });
                shared.stop(at);
                shared.connector.kill();
                mark_died(&rec, &shared, None, &mut queue);
                return;
            }
        };
        let sent = msg.is_none_or(|msg| shared.send(msg));
        let outcome = if sent {
            outcome
        } else {
            Outcome::Unsent { at }
        };
        rec.update(i, |r| r.outcome = outcome);
        handled.fetch_add(1, Ordering::Relaxed);
        if refill {
            shared.send(Msg::Credit(Credit { credits: 1 }));
        }
    }
    mark_died(&rec, &shared, None, &mut queue);
}

/// The deliveries the member held when it stopped (the one being handled, those queued): died
/// at the instant it stopped.
fn mark_died(
    rec: &Recorder,
    shared: &Shared,
    current: Option<usize>,
    queue: &mut mpsc::UnboundedReceiver<usize>,
) {
    let at = shared.stopped_at().unwrap_or_else(|| rec.now());
    queue.close();
    let mut held: Vec<usize> = current.into_iter().collect();
    while let Ok(i) = queue.try_recv() {
        held.push(i);
    }
    for i in held {
        rec.update(i, |d| {
            if d.outcome == Outcome::Open {
                d.outcome = Outcome::Died { at }
            }
        });
    }
}

impl Recorder {
    /// The index of the delivery `(slot, seq)` at `attempt` to `member`'s stream `incarnation`.
    fn find(
        &self,
        member: &str,
        incarnation: u32,
        event: (u32, u64),
        attempt: u32,
    ) -> Option<usize> {
        let r = self.inner.lock().unwrap();
        r.deliveries.iter().rposition(|d| {
            d.member == member
                && d.incarnation == incarnation
                && d.event() == event
                && d.attempt == attempt
        })
    }

    fn get(&self, i: usize) -> Delivery {
        self.inner.lock().unwrap().deliveries[i].clone()
    }
}
