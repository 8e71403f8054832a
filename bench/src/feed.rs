//! The change feed's measurements (`--feed-*`, Ordo targets only), all through the router's
//! `Feed.Watch`:
//!
//! * [`backlog`]: before the run, `--feed-backlog` events' worth of puts to new items, so that
//!   the feed holds a log to catch up on or to stall behind.
//! * [`catch_up`]: one watcher reads from the oldest event until the feed's resolved time says it
//!   has everything committed before it opened: events/s and MB/s.
//! * [`stall`]: a watcher from the oldest event that reads its first response and then nothing,
//!   held open through the run (a slow reader must not slow the writers).
//! * [`Probe`] and [`follow`]: a watcher from now; every write the backend sees acknowledged is
//!   matched with its event by `(shard key, key, version)`, giving the latency from the
//!   acknowledgement to the event's arrival.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::future::join_all;
use hdrhistogram::Histogram;
use ordo_proto::client::Client;
use ordo_proto::v1::watch_request::{Start, StartOneOf};
use ordo_proto::v1::{WatchRequest, WatchResponse};
use prost::Message;
use serde::Serialize;
use tokio::time::Instant;
use tonic::Streaming;

use crate::backend::{Backend, Txn, Write};
use crate::progress::bar;
use crate::report::round3;

/// Puts per backlog `Txn` (a `Txn` holds at most 128 ops): one shard key each, so each is one
/// group's single raft write.
pub const BACKLOG_TXN_PUTS: u64 = 64;
/// How long a catch-up may take before the bench gives up on it.
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a stalled watcher may take to deliver its first response.
pub const FIRST_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// After the run, how long the latency watcher may take to deliver the last acknowledged
/// writes' events before those still missing are reported as such.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the `--feed-*` options measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FeedReport {
    /// Events written before the run by `--feed-backlog` (one per put), and how long it took.
    pub backlog_events: u64,
    pub backlog_s: f64,
    pub catch_up: Option<CatchUp>,
    pub stalled: Option<Stalled>,
    pub latency: Option<Latency>,
}

impl FeedReport {
    /// The report's lines for the table.
    pub fn lines(&self) -> String {
        let mut out = String::new();
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
        if self.backlog_events > 0 {
            out += &format!(
                "feed backlog: {} events written in {:.1} s before the run\n",
                self.backlog_events, self.backlog_s
            );
        }
        if let Some(c) = &self.catch_up {
            out += &format!(
                "feed catch-up from the oldest event: {} events, {:.1} MB in {:.2} s: {:.0} \
                 events/s, {:.2} MB/s (first event after {:.1} ms)\n",
                c.events,
                c.bytes as f64 / 1e6,
                c.seconds,
                c.events_per_s,
                c.mb_per_s,
                c.first_event_ms
            );
        }
        if let Some(s) = &self.stalled {
            out += &format!(
                "feed stalled watcher: read {} events from the oldest, then nothing; open at the \
                 end: {}\n",
                s.first_response_events, s.open_at_end
            );
        }
        if let Some(l) = &self.latency {
            out += &format!(
                "feed latency, write acknowledged -> event received: {} events, p50 {} p90 {} \
                 p99 {} p99.9 {} max {} ms; {} arrived before the ack, {} never arrived\n",
                l.matched,
                ms(l.p50_ms),
                ms(l.p90_ms),
                ms(l.p99_ms),
                ms(l.p99_9_ms),
                ms(l.max_ms),
                l.before_ack,
                l.missing
            );
        }
        out
    }
}

/// One watcher from the oldest event, until caught up.
#[derive(Clone, Debug, Serialize)]
pub struct CatchUp {
    pub events: u64,
    /// Encoded size of the events received (keys, values, fields).
    pub bytes: u64,
    /// From opening the watch to the last event received.
    pub seconds: f64,
    pub events_per_s: f64,
    pub mb_per_s: f64,
    /// From opening the watch to its first event.
    pub first_event_ms: f64,
}

/// The watcher held unread through the run.
#[derive(Clone, Debug, Serialize)]
pub struct Stalled {
    /// Events in the one response it read (from the oldest event).
    pub first_response_events: u64,
    /// Whether its stream was still open (not failed by the router) when the run ended.
    pub open_at_end: bool,
}

/// Acknowledged write → its event received, for writes acknowledged in the measured period.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    /// Events matched with a write acknowledged in the measured period.
    pub matched: u64,
    /// Of those, events that arrived before their write's acknowledgement (counted as 0 ms).
    pub before_ack: u64,
    /// Writes acknowledged in the measured period whose event never arrived (within
    /// `DRAIN_TIMEOUT` after the run): must be 0.
    pub missing: u64,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p99_9_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// An item's state after a write: its event is the one with this `(shard key, key, version)`.
type Item = (Bytes, Bytes, u64);

/// Matches acknowledged writes with their events (`--feed-latency`).
pub struct Probe {
    inner: Mutex<Pending>,
}

struct Pending {
    /// `None` until the watcher is open: writes before it have no event to wait for.
    measure_from: Option<Instant>,
    /// Acknowledged, event not yet received.
    acked: HashMap<Item, Instant>,
    /// Event received before its write's acknowledgement.
    seen: HashMap<Item, Instant>,
    latency_us: Histogram<u64>,
    before_ack: u64,
}

impl Default for Probe {
    fn default() -> Probe {
        Probe {
            inner: Mutex::new(Pending {
                measure_from: None,
                acked: HashMap::new(),
                seen: HashMap::new(),
                latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("bounds"),
                before_ack: 0,
            }),
        }
    }
}

impl Probe {
    /// The watcher is open: match writes acknowledged from now on, and record the latencies of
    /// those acknowledged from `measure_from`.
    pub fn arm(&self, measure_from: Instant) {
        self.inner.lock().expect("probe lock").measure_from = Some(measure_from);
    }

    /// A write's acknowledgement: the item is now at `version`.
    pub fn acked(&self, shard_key: Bytes, key: Bytes, version: u64) {
        let now = Instant::now();
        let mut p = self.inner.lock().expect("probe lock");
        let Some(from) = p.measure_from else {
            return;
        };
        let item = (shard_key, key, version);
        if p.seen.remove(&item).is_some() {
            if now >= from {
                p.before_ack += 1;
                p.latency_us.saturating_record(0);
            }
        } else {
            p.acked.insert(item, now);
        }
    }

    /// An event received at `at`.
    pub fn seen(&self, item: Item, at: Instant) {
        let mut p = self.inner.lock().expect("probe lock");
        let Some(from) = p.measure_from else {
            return;
        };
        match p.acked.remove(&item) {
            Some(acked) if acked >= from => {
                let us = at.saturating_duration_since(acked).as_micros() as u64;
                p.latency_us.saturating_record(us);
            }
            Some(_) => {}
            None => {
                p.seen.insert(item, at);
            }
        }
    }

    /// Writes acknowledged in the measured period whose event has not arrived.
    fn missing(&self) -> u64 {
        let p = self.inner.lock().expect("probe lock");
        let from = p.measure_from.expect("armed");
        p.acked.values().filter(|&&t| t >= from).count() as u64
    }

    /// Waits (at most `DRAIN_TIMEOUT`) for the events of every write acknowledged in the
    /// measured period, then reports.
    pub async fn drain(&self) -> Latency {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.missing() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let missing = self.missing();
        let p = self.inner.lock().expect("probe lock");
        let h = &p.latency_us;
        let ms = |us: u64| (!h.is_empty()).then(|| round3(us as f64 / 1000.0));
        Latency {
            matched: h.len(),
            before_ack: p.before_ack,
            missing,
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p99_9_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// A watch of every slot from `start`.
fn watch_from(start: Start) -> WatchRequest {
    WatchRequest {
        shard_keys: Vec::new(),
        key_prefix: Bytes::new(),
        start: Some(StartOneOf::From(start as i32)),
    }
}

/// Opens the latency watcher, from now (its probe is armed when the workers start).
pub async fn open_follower(client: &Client) -> anyhow::Result<Streaming<WatchResponse>> {
    client
        .watch(watch_from(Start::FromNow))
        .await
        .context("opening the latency watcher")
}

/// Reads the latency watcher's stream into `probe` until it ends (or the task is aborted).
pub async fn follow(mut stream: Streaming<WatchResponse>, probe: Arc<Probe>) -> anyhow::Result<()> {
    while let Some(resp) = stream.message().await.context("the latency watcher")? {
        let at = Instant::now();
        for e in resp.events {
            probe.seen((e.shard_key, e.key, e.version), at);
        }
    }
    Ok(())
}

/// Writes `events` puts (new items under shard keys `<prefix>b<n>`, `BACKLOG_TXN_PUTS` per
/// `Txn`) with `clients` tasks. Returns how long it took.
pub async fn backlog(
    backend: &Backend,
    prefix: &str,
    value: &Bytes,
    events: u64,
    clients: usize,
    quiet: bool,
) -> anyhow::Result<Duration> {
    let txns = events.div_ceil(BACKLOG_TXN_PUTS);
    let progress = bar(
        events,
        quiet,
        "backlog [{elapsed_precise}] {bar:30} {pos}/{len} events {per_sec}",
    );
    let next = AtomicU64::new(0);
    let started = Instant::now();
    let task = |_: usize| async {
        loop {
            let n = next.fetch_add(1, Ordering::Relaxed);
            if n >= txns {
                return Ok(());
            }
            let puts = BACKLOG_TXN_PUTS.min(events - n * BACKLOG_TXN_PUTS);
            let shard_key = Bytes::from(format!("{prefix}b{n}"));
            let writes = (0..puts)
                .map(|i| Write {
                    shard_key: shard_key.clone(),
                    key: format!("e{i:02}").into(),
                    value: value.clone(),
                })
                .collect();
            let txn = Txn {
                compares: Vec::new(),
                writes,
            };
            backend
                .txn(txn)
                .await
                .with_context(|| format!("backlog Txn {n}"))?;
            progress.inc(puts);
        }
    };
    let results: Vec<anyhow::Result<()>> = join_all((0..clients.max(1)).map(task)).await;
    progress.finish_and_clear();
    results.into_iter().collect::<anyhow::Result<()>>()?;
    Ok(started.elapsed())
}

/// Milliseconds since the Unix epoch now (the feed's clock for `resolved_ts_ms`).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reads the whole feed from its oldest event, with no writes running, until a response's
/// resolved time reaches the moment the watch opened: by the feed's contract every event
/// committed before then has been delivered.
pub async fn catch_up(client: &Client) -> anyhow::Result<CatchUp> {
    let opened_ms = now_ms();
    let opened = Instant::now();
    let deadline = opened + CATCH_UP_TIMEOUT;
    let mut stream = client
        .watch(watch_from(Start::FromOldest))
        .await
        .context("opening the catch-up watcher")?;
    let (mut events, mut bytes) = (0u64, 0u64);
    let (mut first, mut last) = (None, opened);
    loop {
        let Ok(next) = tokio::time::timeout_at(deadline, stream.message()).await else {
            bail!("the catch-up watcher had not caught up after {CATCH_UP_TIMEOUT:?} ({events} events)");
        };
        let resp = next
            .context("the catch-up watcher")?
            .context("the catch-up watcher's stream ended")?;
        if !resp.events.is_empty() {
            last = Instant::now();
            first.get_or_insert(last);
            events += resp.events.len() as u64;
            bytes += resp
                .events
                .iter()
                .map(|e| e.encoded_len() as u64)
                .sum::<u64>();
        }
        if resp.resolved_ts_ms >= opened_ms {
            break;
        }
    }
    let seconds = last.saturating_duration_since(opened).as_secs_f64();
    let per_s = |n: f64| {
        if seconds > 0.0 {
            round3(n / seconds)
        } else {
            0.0
        }
    };
    Ok(CatchUp {
        events,
        bytes,
        seconds: round3(seconds),
        events_per_s: per_s(events as f64),
        mb_per_s: per_s(bytes as f64 / 1e6),
        first_event_ms: first.map_or(0.0, |f| {
            round3(f.saturating_duration_since(opened).as_secs_f64() * 1000.0)
        }),
    })
}

/// Opens a watcher from the oldest event and reads its first response with events; the caller
/// holds the stream without reading it.
pub async fn stall(client: &Client) -> anyhow::Result<(Streaming<WatchResponse>, u64)> {
    let deadline = Instant::now() + FIRST_RESPONSE_TIMEOUT;
    let mut stream = client
        .watch(watch_from(Start::FromOldest))
        .await
        .context("opening the stalled watcher")?;
    loop {
        let Ok(next) = tokio::time::timeout_at(deadline, stream.message()).await else {
            bail!("the stalled watcher got no event in {FIRST_RESPONSE_TIMEOUT:?}");
        };
        let resp = next
            .context("the stalled watcher")?
            .context("the stalled watcher's stream ended")?;
        if !resp.events.is_empty() {
            return Ok((stream, resp.events.len() as u64));
        }
    }
}

/// Whether the stalled watcher's stream is still open: it has a response ready or waiting, not
/// an error or its end. (Reading one response does not unstall it in any way that matters.)
pub async fn still_open(stream: &mut Streaming<WatchResponse>) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_millis(100), stream.message()).await,
        Ok(Ok(Some(_))) | Err(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(key: &'static str, version: u64) -> Item {
        (
            Bytes::from_static(b"o1"),
            Bytes::from_static(key.as_bytes()),
            version,
        )
    }

    fn ack(p: &Probe, key: &'static str, version: u64) {
        let (sk, k, v) = item(key, version);
        p.acked(sk, k, v);
    }

    #[test]
    fn writes_match_their_events_by_item_and_version() {
        let p = Probe::default();
        // Not armed: the writes of the load phase wait for no event.
        ack(&p, "loaded", 1);
        p.seen(item("loaded", 1), Instant::now());
        let armed_at = Instant::now();
        p.arm(armed_at);
        assert_eq!(p.missing(), 0);

        ack(&p, "", 1);
        ack(&p, "items/1", 1);
        assert_eq!(p.missing(), 2);
        // Another version of the item is another event.
        p.seen(item("", 2), Instant::now() + Duration::from_millis(3));
        assert_eq!(p.missing(), 2);
        p.seen(item("", 1), Instant::now() + Duration::from_millis(5));
        assert_eq!(p.missing(), 1);
        // The event first, then the acknowledgement.
        p.seen(item("outbox/000001", 1), Instant::now());
        ack(&p, "outbox/000001", 1);
        assert_eq!(p.missing(), 1);

        let inner = p.inner.lock().unwrap();
        assert_eq!(inner.latency_us.len(), 2);
        assert_eq!(inner.before_ack, 1);
        assert!(
            inner.latency_us.max() >= 5_000,
            "{}",
            inner.latency_us.max()
        );
        assert!(inner.seen.contains_key(&item("", 2)));
    }

    #[test]
    fn writes_acknowledged_in_the_warm_up_are_matched_but_not_measured() {
        let p = Probe::default();
        p.arm(Instant::now() + Duration::from_secs(3600));
        ack(&p, "", 1);
        p.seen(item("", 1), Instant::now());
        assert_eq!(p.missing(), 0);
        let inner = p.inner.lock().unwrap();
        assert!(inner.latency_us.is_empty());
        assert!(inner.acked.is_empty());
    }

    #[test]
    fn feed_lines_name_every_figure() {
        let r = FeedReport {
            backlog_events: 1_000_000,
            backlog_s: 40.0,
            catch_up: Some(CatchUp {
                events: 1_000_000,
                bytes: 200_000_000,
                seconds: 10.0,
                events_per_s: 100_000.0,
                mb_per_s: 20.0,
                first_event_ms: 3.0,
            }),
            stalled: Some(Stalled {
                first_response_events: 1024,
                open_at_end: true,
            }),
            latency: None,
        };
        let text = r.lines();
        for want in [
            "1000000 events written",
            "100000 events/s",
            "20.00 MB/s",
            "open at the end: true",
        ] {
            assert!(text.contains(want), "{want:?} not in {text}");
        }
    }
}
