//! Consumer groups as a test drives them: [`Member`], one `Feed.Consume` stream through a router
//! with a handler policy, recording every delivery in a shared [`Recorder`]; and [`check`], the
//! checker of acceptance 1 of issue 14 over those records and the log of the group's events.
//!
//! Every instant is a [`Duration`] since the recorder's start on the test's monotonic clock, so
//! the records of all members compare. A delivery counts as in flight from the moment its
//! member read it off the stream until its member sent the ack (or nack, or term) or the `Txn`
//! of its transactional ack, its member died (or its stream ended), or a later attempt of
//! the same event was delivered, whichever comes first. Those are the member's own instants: a
//! server that hands the next event of an order out before the previous one's ack was even sent
//! is caught, one that waits for its ack flush is not mistaken for two in flight.
//!
//! - [`member`]: the stream, the handler and the kill (the member's TCP connection shut down,
//!   as a crashed process's is: the router sees its stream break, not close);
//! - [`check`]: (a) one delivery of a shard key in flight at a time, (b) per order acks and
//!   deliveries in seq order, (c) every event of the log done, (d) redeliveries only of events
//!   whose previous attempt was in flight (or whose ack may have been lost in a window the test
//!   names: a kill), plus attempts that grow per event.

mod check;
mod member;
#[cfg(test)]
mod member_tests;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ordo_proto::v1::ChangeEvent;
use tokio::time::Instant;

pub use check::{check, CheckInput, GroupReport, GroupViolation, Rule};
pub use member::{policy, Action, Handler, HandlerFuture, Member, MemberOptions, TxnOutcome};

/// How a delivery ended, as its member saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Still being handled (or held by a member that never acks) when the records were taken.
    Open,
    /// The member sent `Ack` at `at`.
    Acked { at: Duration },
    /// The member sent `Nack` at `at`.
    Nacked { at: Duration },
    /// The member sent `Term` at `at`.
    Termed { at: Duration },
    /// The member chose never to answer it; it stays in flight until redelivered.
    Ignored,
    /// The member died (or its stream ended) at `at` with the delivery unanswered.
    Died { at: Duration },
    /// A `Txn` with a `feed_ack` of it, sent at `at`, was answered with `outcome`.
    Txn { at: Duration, outcome: TxnOutcome },
    /// The ack could not be sent (the member's stream was gone) at `at`.
    Unsent { at: Duration },
}

impl Outcome {
    /// When the member stopped holding the delivery, if it did.
    pub fn ended_at(&self) -> Option<Duration> {
        match *self {
            Outcome::Open | Outcome::Ignored => None,
            Outcome::Acked { at }
            | Outcome::Nacked { at }
            | Outcome::Termed { at }
            | Outcome::Died { at }
            | Outcome::Txn { at, .. }
            | Outcome::Unsent { at } => Some(at),
        }
    }
}

/// One delivery a member received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub member: String,
    /// Which stream of the member (it counts its joins from 1).
    pub incarnation: u32,
    pub slot: u32,
    pub seq: u64,
    pub attempt: u32,
    pub shard_key: Bytes,
    pub key: Bytes,
    pub version: u64,
    pub value: Bytes,
    pub delivered_at: Duration,
    pub outcome: Outcome,
    /// The router answered the member's ack (or nack, term) of it with `refused`: (when, the
    /// event's current attempt then).
    pub refused: Option<(Duration, u32)>,
}

impl Delivery {
    /// `(slot, seq)`: the event it delivers.
    pub fn event(&self) -> (u32, u64) {
        (self.slot, self.seq)
    }

    /// A delivery of `e` at attempt `attempt`, received at `at` (for the checker's own tests
    /// and for tests that build records).
    pub fn of(member: &str, e: &ChangeEvent, attempt: u32, at: Duration) -> Delivery {
        Delivery {
            member: member.to_string(),
            incarnation: 1,
            slot: e.slot,
            seq: e.seq,
            attempt,
            shard_key: e.shard_key.clone(),
            key: e.key.clone(),
            version: e.version,
            value: e.value.clone(),
            delivered_at: at,
            outcome: Outcome::Open,
            refused: None,
        }
    }
}

/// A member's stream that ended, and how.
#[derive(Clone, Debug)]
pub struct StreamEnd {
    pub member: String,
    pub incarnation: u32,
    pub at: Duration,
    /// `None`: the test killed or closed it; else what the stream ended with.
    pub status: Option<String>,
}

#[derive(Default)]
struct Records {
    deliveries: Vec<Delivery>,
    ends: Vec<StreamEnd>,
    /// Things a member saw that no delivery explains (a refusal of an attempt it never had).
    notes: Vec<String>,
}

/// The deliveries of every member of a test, on one clock. Cheap to clone (shared).
#[derive(Clone)]
pub struct Recorder {
    epoch: Instant,
    inner: Arc<Mutex<Records>>,
}

impl Default for Recorder {
    fn default() -> Recorder {
        Recorder::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            epoch: Instant::now(),
            inner: Arc::default(),
        }
    }

    /// Now on the recorder's clock.
    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// `instant` on the recorder's clock.
    pub fn at(&self, instant: Instant) -> Duration {
        instant.saturating_duration_since(self.epoch)
    }

    /// Adds a delivery; its index names it for [`Recorder::update`].
    fn push(&self, d: Delivery) -> usize {
        let mut r = self.inner.lock().unwrap();
        r.deliveries.push(d);
        r.deliveries.len() - 1
    }

    fn update(&self, i: usize, f: impl FnOnce(&mut Delivery)) {
        f(&mut self.inner.lock().unwrap().deliveries[i]);
    }

    fn end(&self, end: StreamEnd) {
        self.inner.lock().unwrap().ends.push(end);
    }

    fn note(&self, note: String) {
        self.inner.lock().unwrap().notes.push(note);
    }

    /// What members saw that no delivery explains (the checker fails on any).
    pub fn notes(&self) -> Vec<String> {
        self.inner.lock().unwrap().notes.clone()
    }

    /// Every delivery so far, in the order they were received.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.inner.lock().unwrap().deliveries.clone()
    }

    /// Every member stream that ended so far.
    pub fn ends(&self) -> Vec<StreamEnd> {
        self.inner.lock().unwrap().ends.clone()
    }

    /// Deliveries so far.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().deliveries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
