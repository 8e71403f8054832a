//! The consumer-group checker (issue 14, acceptance 1): given every member's deliveries, how
//! their streams ended, and the log of the group's events, it proves
//!
//! - [`Rule::InFlight`] (a): never two deliveries of one shard key in flight at once, across
//!   members: the intervals `[delivered, ended]` of one key never overlap, where a delivery ends
//!   when its member answered it (ack, nack, term or a transactional ack's Txn sent), its
//!   member's stream ended, or a later attempt of the same event was delivered;
//! - [`Rule::Order`] (b): per order, events are delivered in seq order (no delivery of an
//!   earlier event after one of a later event) and done in seq order (the first effective ack of
//!   each event, by seq, at increasing instants);
//! - [`Rule::Unacked`] (c): every event of the log was acked at least once (an ack not refused
//!   and sent before any later attempt, a transactional ack applied, a term not refused), or is
//!   one the test says was done otherwise (dead-lettered), or had a transactional ack whose
//!   outcome is unknown (the test proves those by the data the Txn wrote);
//! - [`Rule::Redelivery`] (d): an event is delivered again only if its previous attempt was in
//!   flight: not acked, or its ack was refused, or sent in a window where it may have been lost
//!   (one the test names, around a kill, or shortly before its member's stream ended). A
//!   transactional ack that was applied is never followed by another delivery, whatever the
//!   windows;
//! - [`Rule::Attempts`]: per event the attempts grow with each delivery;
//! - [`Rule::Stray`]: every delivery is of an event of the log, with its shard key, key,
//!   version and value; members saw nothing unexplained (a refusal of an attempt never
//!   delivered to them).
//!
//! [`check`] reports the first few violations of each rule with the deliveries named, and
//! counts the rest.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use ordo_proto::v1::ChangeEvent;

use super::{Delivery, Outcome, StreamEnd, TxnOutcome};

/// How long before its member's stream ended an ack may have been lost with the stream (it was
/// in the member's socket, the router's queue or the node's unflushed batch).
pub const STREAM_LOSS_GRACE: Duration = Duration::from_secs(1);

/// Violations kept per rule (the rest are counted).
const KEPT_PER_RULE: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    InFlight,
    Order,
    Unacked,
    Redelivery,
    Attempts,
    Stray,
}

#[derive(Clone, Debug)]
pub struct GroupViolation {
    pub rule: Rule,
    pub what: String,
    /// The shard key it is about, if one.
    pub key: Option<Bytes>,
}

/// What the checker is given.
#[derive(Clone, Debug, Default)]
pub struct CheckInput {
    pub deliveries: Vec<Delivery>,
    pub ends: Vec<StreamEnd>,
    /// What members saw that no delivery explains ([`super::Recorder::notes`]).
    pub notes: Vec<String>,
    /// The group's events: those of the log its filter selects, each to be done by the end.
    pub log: Vec<ChangeEvent>,
    /// Events done without a member's ack (dead-lettered), by `(slot, seq)`.
    pub done_otherwise: BTreeSet<(u32, u64)>,
    /// Windows in which an ack may have been lost (a group leader killed: its unflushed acks,
    /// and those the router dropped while the group had no leader).
    pub loss_windows: Vec<(Duration, Duration)>,
}

impl CheckInput {
    /// The recorder's deliveries, ends and notes with `log`.
    pub fn from_recorder(rec: &super::Recorder, log: Vec<ChangeEvent>) -> CheckInput {
        CheckInput {
            deliveries: rec.deliveries(),
            ends: rec.ends(),
            notes: rec.notes(),
            log,
            ..CheckInput::default()
        }
    }
}

/// What [`check`] found.
#[derive(Clone, Debug, Default)]
pub struct GroupReport {
    pub violations: Vec<GroupViolation>,
    /// Violations per rule, kept or not.
    pub counts: BTreeMap<Rule, usize>,
    pub events: usize,
    pub deliveries: usize,
    /// Deliveries of an event delivered before.
    pub redeliveries: usize,
    /// Answers the router refused (stale attempts).
    pub refused: usize,
    pub members: usize,
    pub streams: usize,
}

impl GroupReport {
    pub fn is_ok(&self) -> bool {
        self.counts.is_empty()
    }

    /// Panics with every kept violation if there is any.
    pub fn assert_ok(&self) {
        assert!(self.is_ok(), "consumer-group checker: {self}");
    }

    fn add(&mut self, rule: Rule, what: String) {
        self.add_for(rule, None, what);
    }

    fn add_for(&mut self, rule: Rule, key: Option<&Bytes>, what: String) {
        let n = self.counts.entry(rule).or_default();
        *n += 1;
        if *n <= KEPT_PER_RULE {
            let key = key.cloned();
            self.violations.push(GroupViolation { rule, what, key });
        }
    }

    /// [`GroupReport::assert_ok`], first printing every delivery of each shard key a kept
    /// violation names, in the order they came, with how it ended.
    pub fn assert_ok_with(&self, input: &CheckInput) {
        let keys: BTreeSet<&Bytes> = self.violations.iter().flat_map(|v| &v.key).collect();
        for key in keys {
            let mut ds: Vec<&Delivery> = input
                .deliveries
                .iter()
                .filter(|d| d.shard_key == key)
                .collect();
            ds.sort_by_key(|d| d.delivered_at);
            eprintln!("---- deliveries of {:?} ----", String::from_utf8_lossy(key));
            for d in ds {
                eprintln!("  {}", name(d));
            }
        }
        self.assert_ok();
    }

    /// The violations of `rule` (kept ones).
    pub fn of(&self, rule: Rule) -> Vec<&GroupViolation> {
        self.violations.iter().filter(|v| v.rule == rule).collect()
    }
}

impl fmt::Display for GroupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} events, {} deliveries ({} redeliveries, {} refused) to {} members over {} \
             streams",
            self.events,
            self.deliveries,
            self.redeliveries,
            self.refused,
            self.members,
            self.streams
        )?;
        if self.is_ok() {
            return write!(f, "; no violation");
        }
        write!(f, "; violations {:?}", self.counts)?;
        for v in &self.violations {
            write!(f, "\n  {:?}: {}", v.rule, v.what)?;
        }
        Ok(())
    }
}

/// One delivery in the checker's words.
fn name(d: &Delivery) -> String {
    format!(
        "[{} #{}: slot {} seq {} attempt {} key {:?}/{:?} at {:?} -> {:?}{}]",
        d.member,
        d.incarnation,
        d.slot,
        d.seq,
        d.attempt,
        String::from_utf8_lossy(&d.shard_key),
        String::from_utf8_lossy(&d.key),
        d.delivered_at,
        d.outcome,
        d.refused
            .map(|(at, cur)| format!(", refused at {at:?} (current attempt {cur})"))
            .unwrap_or_default()
    )
}

/// The checker's view of the deliveries: per event in delivery order, and each one's end.
struct View<'a> {
    ds: &'a [Delivery],
    by_event: BTreeMap<(u32, u64), Vec<usize>>,
    /// Per delivery: when it stopped being in flight (`None`: never, as far as the test saw).
    ends: Vec<Option<Duration>>,
    /// Per delivery: when it was done by its member, if it counts (see [`Rule::Unacked`]).
    acked: Vec<Option<Duration>>,
    stream_ends: HashMap<(&'a str, u32), Duration>,
}

impl<'a> View<'a> {
    fn new(input: &'a CheckInput) -> View<'a> {
        let ds = &input.deliveries[..];
        let mut by_event: BTreeMap<(u32, u64), Vec<usize>> = BTreeMap::new();
        for (i, d) in ds.iter().enumerate() {
            by_event.entry(d.event()).or_default().push(i);
        }
        for list in by_event.values_mut() {
            list.sort_by_key(|&i| (ds[i].delivered_at, ds[i].attempt));
        }
        let stream_ends: HashMap<(&str, u32), Duration> = input
            .ends
            .iter()
            .map(|e| ((e.member.as_str(), e.incarnation), e.at))
            .collect();
        let mut v = View {
            ds,
            by_event,
            ends: vec![None; ds.len()],
            acked: vec![None; ds.len()],
            stream_ends,
        };
        for list in v.by_event.values() {
            for (k, &i) in list.iter().enumerate() {
                let d = &ds[i];
                let later = list[k + 1..]
                    .iter()
                    .map(|&j| &ds[j])
                    .find(|l| l.attempt > d.attempt)
                    .map(|l| l.delivered_at);
                let stream = v
                    .stream_ends
                    .get(&(d.member.as_str(), d.incarnation))
                    .copied();
                let end = [d.outcome.ended_at(), stream, later]
                    .into_iter()
                    .flatten()
                    .min();
                v.ends[i] = end;
                v.acked[i] = effective_ack(d, later);
            }
        }
        v
    }
}

/// When `d` was done by its member, if that counts: an ack or term not refused and sent before
/// any later attempt was delivered, or a transactional ack applied.
fn effective_ack(d: &Delivery, later: Option<Duration>) -> Option<Duration> {
    let at = match d.outcome {
        Outcome::Txn {
            at,
            outcome: TxnOutcome::Applied,
        } => return Some(at),
        Outcome::Acked { at } | Outcome::Termed { at } if d.refused.is_none() => at,
        _ => return None,
    };
    (later.is_none_or(|l| at < l)).then_some(at)
}

/// Checks the records in `input` (see the module doc).
pub fn check(input: &CheckInput) -> GroupReport {
    let view = View::new(input);
    let ds = &input.deliveries[..];
    let mut report = GroupReport {
        events: input.log.len(),
        deliveries: ds.len(),
        refused: ds.iter().filter(|d| d.refused.is_some()).count(),
        redeliveries: view.by_event.values().map(|l| l.len() - 1).sum(),
        members: ds.iter().map(|d| &d.member).collect::<BTreeSet<_>>().len(),
        streams: ds
            .iter()
            .map(|d| (&d.member, d.incarnation))
            .collect::<BTreeSet<_>>()
            .len(),
        ..GroupReport::default()
    };
    for n in &input.notes {
        report.add(Rule::Stray, n.clone());
    }
    check_stray(input, &mut report);
    check_in_flight(&view, &mut report);
    check_order(&view, &mut report);
    check_acked(input, &view, &mut report);
    check_redeliveries(input, &view, &mut report);
    report
}

/// [`Rule::Stray`]: each delivery is of a logged event, as logged.
fn check_stray(input: &CheckInput, report: &mut GroupReport) {
    let log: HashMap<(u32, u64), &ChangeEvent> =
        input.log.iter().map(|e| ((e.slot, e.seq), e)).collect();
    for d in &input.deliveries {
        match log.get(&d.event()) {
            None => report.add(
                Rule::Stray,
                format!("{} is of no event of the group's log", name(d)),
            ),
            Some(e)
                if e.shard_key != d.shard_key
                    || e.key != d.key
                    || e.version != d.version
                    || e.value != d.value =>
            {
                report.add(
                    Rule::Stray,
                    format!("{} differs from the logged event {e:?}", name(d)),
                )
            }
            Some(_) => {}
        }
    }
}

/// [`Rule::InFlight`]: per shard key, no delivery starts while another is in flight.
fn check_in_flight(view: &View, report: &mut GroupReport) {
    let ds = view.ds;
    let mut by_key: BTreeMap<&Bytes, Vec<usize>> = BTreeMap::new();
    for (i, d) in ds.iter().enumerate() {
        by_key.entry(&d.shard_key).or_default().push(i);
    }
    for list in by_key.values_mut() {
        list.sort_by_key(|&i| ds[i].delivered_at);
        // The delivery in flight longest so far, by its end (None: never ended).
        let mut open: Option<usize> = None;
        for &i in list.iter() {
            if let Some(o) = open {
                let o_end = view.ends[o];
                if o_end.is_none_or(|end| ds[i].delivered_at < end) {
                    report.add_for(
                        Rule::InFlight,
                        Some(&ds[i].shard_key),
                        format!(
                            "{} was delivered while {} was in flight (until {o_end:?})",
                            name(&ds[i]),
                            name(&ds[o])
                        ),
                    );
                }
            }
            let later = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(a), Some(b)) => a > b,
            };
            if open.is_none_or(|o| later(view.ends[i], view.ends[o])) {
                open = Some(i);
            }
        }
    }
}

/// [`Rule::Order`]: per shard key, deliveries and first acks in seq order.
fn check_order(view: &View, report: &mut GroupReport) {
    let ds = view.ds;
    let mut by_key: BTreeMap<&Bytes, Vec<usize>> = BTreeMap::new();
    for (i, d) in ds.iter().enumerate() {
        by_key.entry(&d.shard_key).or_default().push(i);
    }
    for list in by_key.values_mut() {
        list.sort_by_key(|&i| ds[i].delivered_at);
        let mut highest: Option<usize> = None;
        for &i in list.iter() {
            match highest {
                Some(h) if ds[i].event() < ds[h].event() => report.add_for(
                    Rule::Order,
                    Some(&ds[i].shard_key),
                    format!("{} was delivered after {}", name(&ds[i]), name(&ds[h])),
                ),
                _ => highest = Some(i),
            }
        }
        // The first effective ack of each event, in seq order.
        let mut first: BTreeMap<(u32, u64), (Duration, usize)> = BTreeMap::new();
        for &i in list.iter() {
            if let Some(at) = view.acked[i] {
                let e = first.entry(ds[i].event()).or_insert((at, i));
                if at < e.0 {
                    *e = (at, i);
                }
            }
        }
        let acks: Vec<&(Duration, usize)> = first.values().collect();
        for w in acks.windows(2) {
            if w[1].0 <= w[0].0 {
                report.add_for(
                    Rule::Order,
                    Some(&ds[w[1].1].shard_key),
                    format!(
                        "{} was acked at {:?}, not after {} at {:?}",
                        name(&ds[w[1].1]),
                        w[1].0,
                        name(&ds[w[0].1]),
                        w[0].0
                    ),
                );
            }
        }
    }
}

/// [`Rule::Unacked`]: every logged event done.
fn check_acked(input: &CheckInput, view: &View, report: &mut GroupReport) {
    for e in &input.log {
        let key = (e.slot, e.seq);
        if input.done_otherwise.contains(&key) {
            continue;
        }
        let list = view.by_event.get(&key).map(Vec::as_slice).unwrap_or(&[]);
        if list.iter().any(|&i| view.acked[i].is_some()) {
            continue;
        }
        // A transactional ack whose outcome the member never learnt may have applied: the
        // test proves it otherwise (its read model has the event).
        let unknown = |i: &usize| {
            matches!(
                view.ds[*i].outcome,
                Outcome::Txn {
                    outcome: TxnOutcome::Unknown,
                    ..
                }
            )
        };
        if list.iter().any(unknown) {
            continue;
        }
        let tried: Vec<String> = list.iter().map(|&i| name(&view.ds[i])).collect();
        report.add_for(
            Rule::Unacked,
            Some(&e.shard_key),
            format!(
                "slot {} seq {} (key {:?}/{:?}) was never acked; its deliveries: {tried:?}",
                e.slot,
                e.seq,
                String::from_utf8_lossy(&e.shard_key),
                String::from_utf8_lossy(&e.key)
            ),
        );
    }
}

/// [`Rule::Redelivery`] and [`Rule::Attempts`]: per event, each delivery after the first
/// follows one still in flight, with a higher attempt.
fn check_redeliveries(input: &CheckInput, view: &View, report: &mut GroupReport) {
    let ds = view.ds;
    let lost = |d: &Delivery, at: Duration| {
        let in_window = input
            .loss_windows
            .iter()
            .any(|&(from, to)| from <= at && at <= to);
        let stream = view
            .stream_ends
            .get(&(d.member.as_str(), d.incarnation))
            .is_some_and(|&end| at <= end && end <= at + STREAM_LOSS_GRACE);
        in_window || stream
    };
    for list in view.by_event.values() {
        for w in list.windows(2) {
            let (p, r) = (&ds[w[0]], &ds[w[1]]);
            if r.attempt <= p.attempt {
                report.add_for(
                    Rule::Attempts,
                    Some(&r.shard_key),
                    format!("{} came after {}", name(r), name(p)),
                );
            }
            let settled = match (view.acked[w[0]], &p.outcome) {
                (Some(at), Outcome::Txn { .. }) => Some((at, false)),
                (Some(at), _) => Some((at, lost(p, at))),
                (None, _) => None,
            };
            if let Some((at, false)) = settled {
                report.add_for(
                    Rule::Redelivery,
                    Some(&r.shard_key),
                    format!(
                        "{} redelivered an event whose previous delivery {} was done at {at:?}",
                        name(r),
                        name(p)
                    ),
                );
            }
        }
    }
}
