//! A watcher as the fault tests run one: `Feed.Watch` through a router, every response recorded
//! with its receive time, the stream opened again from the last cursor whenever it breaks
//! (within bounds), until the test stops it. What it returns is a [`Watch`] for the checker.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ordo_proto::addr::CLIENT_RESPONSE_BYTES_MAX;
use ordo_proto::retry::{classify, Backoff, Effect};
use ordo_proto::v1::feed_client::FeedClient;
use ordo_proto::v1::watch_request::StartOneOf;
use ordo_proto::v1::{WatchRequest, WatchResponse};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::codec::Streaming;
use tonic::transport::Channel;
use tonic::Status;

use super::{Received, Resume, Start, Watch};

/// How a watcher opens its stream again after a break.
#[derive(Clone, Copy, Debug)]
pub struct WatcherOptions {
    /// Wait before each attempt (doubling from `first` to `max`).
    pub backoff: Backoff,
    /// Attempts per break before the watcher gives up.
    pub attempts_max: u32,
    /// Time per break before the watcher gives up: a router that cannot serve the feed for
    /// this long fails the test rather than hang it.
    pub reopen_within: Duration,
}

impl Default for WatcherOptions {
    /// Up to 100 attempts within 30 s, 50 ms to 1 s apart: longer than any failover the
    /// nemesis causes (a leader is replaced in about a second).
    fn default() -> WatcherOptions {
        WatcherOptions {
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(1)),
            attempts_max: 100,
            reopen_within: Duration::from_secs(30),
        }
    }
}

/// A watcher that gave up, with what it had received.
#[derive(Debug)]
pub struct WatcherFailed {
    pub watch: Watch,
    pub why: String,
}

impl fmt::Display for WatcherFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "watcher {:?} gave up after {} responses and {} reconnects: {}",
            self.watch.name,
            self.watch.responses.len(),
            self.watch.resumes.len(),
            self.why
        )
    }
}

impl std::error::Error for WatcherFailed {}

/// What a running watcher has got so far, for tests that wait on it.
#[derive(Default)]
struct Progress {
    resolved_ms: AtomicU64,
    events: AtomicU64,
    reconnects: AtomicU64,
    /// Why the watcher gave up, once it did.
    gave_up: Mutex<Option<String>>,
}

/// A running watch (a task of the current tokio runtime).
pub struct Watcher {
    progress: Arc<Progress>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<Watch, WatcherFailed>>,
}

impl Watcher {
    /// Starts watching `request` through the router at `router`, with the default options.
    /// `start` is what the checker may assume about where the watch begins.
    pub fn start(name: &str, router: &str, request: WatchRequest, start: Start) -> Watcher {
        Watcher::start_with(name, router, request, start, WatcherOptions::default())
    }

    /// [`Watcher::start`] with explicit reconnect bounds.
    pub fn start_with(
        name: &str,
        router: &str,
        request: WatchRequest,
        start: Start,
        options: WatcherOptions,
    ) -> Watcher {
        let channel = crate::endpoint(router)
            .unwrap_or_else(|e| panic!("watcher {name}: bad router address {router:?}: {e}"))
            .connect_lazy();
        let client = FeedClient::new(channel).max_decoding_message_size(CLIENT_RESPONSE_BYTES_MAX);
        let progress = Arc::new(Progress::default());
        let (stop, stopped) = oneshot::channel();
        let run = Run {
            client,
            request,
            watch: Watch::new(name, start),
            options,
            progress: progress.clone(),
            stopped,
        };
        Watcher {
            progress,
            stop: Some(stop),
            task: tokio::spawn(run.run()),
        }
    }

    /// The highest `resolved_ts_ms` received so far.
    pub fn resolved_ms(&self) -> u64 {
        self.progress.resolved_ms.load(Ordering::Relaxed)
    }

    /// Events received so far (redeliveries included).
    pub fn events(&self) -> u64 {
        self.progress.events.load(Ordering::Relaxed)
    }

    /// Streams opened again after a break so far.
    pub fn reconnects(&self) -> u64 {
        self.progress.reconnects.load(Ordering::Relaxed)
    }

    /// The watcher gave up (or was stopped): [`Watcher::stop`] says which.
    pub fn has_ended(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits until the watch's resolved time reaches `ms` (wall clock: e.g. when the last write
    /// was answered), so that it has everything committed by then; panics after `bound`.
    pub async fn wait_resolved(&self, ms: u64, bound: Duration) {
        let what = format!("the feed's resolved time to reach {ms}");
        crate::wait_for(&what, bound, || async move {
            (self.resolved_ms() >= ms || self.has_ended()).then_some(())
        })
        .await;
        if self.resolved_ms() < ms {
            let why = self.progress.gave_up.lock().unwrap().clone();
            panic!(
                "the watcher ended before {what} (at {}): {}",
                self.resolved_ms(),
                why.as_deref().unwrap_or("stopped")
            );
        }
    }

    /// Stops the watch and hands back everything it received, or why it gave up first.
    pub async fn stop(mut self) -> Result<Watch, WatcherFailed> {
        if let Some(stop) = self.stop.take() {
            // Gone only if the task ended already: its result says how.
            let _ = stop.send(());
        }
        (&mut self.task).await.expect("the watcher task panicked")
    }
}

/// How one stream ended.
enum Ended {
    Stopped,
    Broke(Status),
}

/// The watcher's task.
struct Run {
    client: FeedClient<Channel>,
    request: WatchRequest,
    watch: Watch,
    options: WatcherOptions,
    progress: Arc<Progress>,
    stopped: oneshot::Receiver<()>,
}

impl Run {
    async fn run(mut self) -> Result<Watch, WatcherFailed> {
        let mut opened_before = false;
        // Since when, and how often, the watch has been without a stream that delivers.
        let mut broken: Option<Instant> = None;
        let mut attempt = 0u32;
        loop {
            let request = self.next_request();
            let opened = tokio::select! {
                _ = &mut self.stopped => return Ok(self.watch),
                r = self.client.watch(request) => r,
            };
            let status = match opened {
                Ok(stream) => {
                    if opened_before {
                        let first = self.watch.responses.len();
                        self.watch.resumes.push(Resume {
                            first,
                            after: first.checked_sub(1),
                        });
                        self.progress.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    opened_before = true;
                    let before = self.watch.responses.len();
                    let ended = self.pump(stream.into_inner()).await;
                    // A stream that delivered ends the break; one that fails at once does not,
                    // so a router that opens streams and breaks them still runs out of bounds.
                    if self.watch.responses.len() > before {
                        (broken, attempt) = (None, 0);
                    }
                    match ended {
                        Ended::Stopped => return Ok(self.watch),
                        Ended::Broke(status) => status,
                    }
                }
                Err(status) => status,
            };
            let since = *broken.get_or_insert_with(Instant::now);
            let why = if !classify(&status, Effect::Read).retries() {
                Some(format!("the router refused the watch: {status:?}"))
            } else if attempt >= self.options.attempts_max
                || since.elapsed() >= self.options.reopen_within
            {
                Some(format!(
                    "no stream for {:?} ({attempt} attempts); last: {status:?}",
                    since.elapsed()
                ))
            } else {
                None
            };
            if let Some(why) = why {
                *self.progress.gave_up.lock().unwrap() = Some(why.clone());
                return Err(WatcherFailed {
                    watch: self.watch,
                    why,
                });
            }
            tokio::select! {
                _ = &mut self.stopped => return Ok(self.watch),
                _ = tokio::time::sleep(self.options.backoff.delay(attempt)) => {}
            }
            attempt += 1;
        }
    }

    /// The watch's own start the first time (and until a response came), then the last cursor.
    fn next_request(&self) -> WatchRequest {
        let mut request = self.request.clone();
        if let Some(last) = self.watch.responses.last() {
            request.start = Some(StartOneOf::Cursor(last.response.cursor.clone()));
        }
        request
    }

    async fn pump(&mut self, mut stream: Streaming<WatchResponse>) -> Ended {
        loop {
            let next = tokio::select! {
                _ = &mut self.stopped => return Ended::Stopped,
                next = stream.message() => next,
            };
            match next {
                Ok(Some(response)) => self.record(response),
                Ok(None) => {
                    return Ended::Broke(Status::unavailable("the router ended the stream"))
                }
                Err(status) => return Ended::Broke(status),
            }
        }
    }

    fn record(&mut self, response: WatchResponse) {
        let p = &self.progress;
        p.events
            .fetch_add(response.events.len() as u64, Ordering::Relaxed);
        p.resolved_ms
            .fetch_max(response.resolved_ts_ms, Ordering::Relaxed);
        self.watch.responses.push(Received {
            at_ms: ordo_proto::unix_ms(),
            response,
        });
    }
}
