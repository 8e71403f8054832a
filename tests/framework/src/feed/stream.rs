//! Checks of one watch on its own (1, 3, 5, 6): one pass over its responses, keeping per slot the
//! events delivered first and, per response, how far each slot had got (where a cursor of that
//! response points), and per item its version.

use std::collections::HashMap;

use ordo_proto::v1::change_event::Op as EventOp;
use ordo_proto::v1::ChangeEvent;

use super::report::{EventText, FeedReport, Kind};
use super::{ItemRef, Start, Watch};
use crate::linearizability::Bytes;

/// What a watch delivered, for the checks against the writes.
#[derive(Default)]
pub(super) struct Delivered<'a> {
    /// Each event delivered for the first time, in delivery order (repeats and redeliveries
    /// left out: they are checked here).
    pub events: Vec<&'a ChangeEvent>,
    /// The highest resolved time received.
    pub resolved_ms: u64,
}

/// One slot's events in a watch.
#[derive(Default)]
struct Slot<'a> {
    /// First deliveries, in order, with the response each came in.
    log: Vec<(&'a ChangeEvent, usize)>,
    /// `(response, position)`: after that response the stream had delivered `log[..position]`.
    marks: Vec<(usize, usize)>,
    /// Where the current stream stands in `log` (below its end while it redelivers).
    next: usize,
}

impl Slot<'_> {
    /// How far the slot had got after response `after` (`None`: before the first).
    fn position_at(&self, after: Option<usize>) -> usize {
        let Some(after) = after else { return 0 };
        match self.marks.partition_point(|&(resp, _)| resp <= after) {
            0 => 0,
            k => self.marks[k - 1].1,
        }
    }

    fn mark(&mut self, response: usize) {
        match self.marks.last_mut() {
            Some(m) if m.0 == response => m.1 = self.next,
            _ => self.marks.push((response, self.next)),
        }
    }

    /// The response that first delivered `seq`, if any.
    fn first_delivery(&self, seq: u64) -> Option<usize> {
        let k = self.log.binary_search_by_key(&seq, |(e, _)| e.seq).ok()?;
        Some(self.log[k].1)
    }
}

struct State<'a> {
    watch: &'a Watch,
    slots: HashMap<u32, Slot<'a>>,
    /// Each item's version after its last event (0: absent).
    items: HashMap<ItemRef<'a>, u64>,
    delivered: Delivered<'a>,
    /// The highest resolved time sent before the current response, and the response.
    resolved_sent: (u64, usize),
    /// The current stream: the response whose cursor it resumed after (`None`: the start), the
    /// highest resolved time it sent and where, and whether it has events to deliver again.
    stream_after: Option<usize>,
    stream_resolved: Option<(u64, usize)>,
    rewound: bool,
}

/// Checks `watch` (1, 3, 5, 6) and returns its first deliveries.
pub(super) fn check<'a>(watch: &'a Watch, report: &mut FeedReport) -> Delivered<'a> {
    report.stats.watches += 1;
    report.stats.responses += watch.responses.len() as u64;
    if !resumes_valid(watch, report) {
        return Delivered::default();
    }
    let mut st = State {
        watch,
        slots: HashMap::new(),
        items: HashMap::new(),
        delivered: Delivered::default(),
        resolved_sent: (0, 0),
        stream_after: None,
        stream_resolved: None,
        rewound: false,
    };
    let mut resumes = watch.resumes.iter().peekable();
    for (i, received) in watch.responses.iter().enumerate() {
        while let Some(r) = resumes.next_if(|r| r.first == i) {
            st.end_stream(report);
            st.resume(r.after, report);
        }
        for e in &received.response.events {
            st.event(e, i, report);
        }
        st.resolved(received.response.resolved_ts_ms, i, report);
    }
    for r in resumes {
        st.end_stream(report);
        st.resume(r.after, report);
    }
    st.end_stream(report);
    report.stats.events += st.delivered.events.len() as u64;
    st.delivered.resolved_ms = watch.resolved_ms();
    st.delivered
}

fn resumes_valid(watch: &Watch, report: &mut FeedReport) -> bool {
    let mut prev = 0;
    for r in &watch.resumes {
        let bad = r.first < prev
            || r.first > watch.responses.len()
            || r.after.is_some_and(|a| a >= r.first);
        if bad {
            report.violation(Kind::Invalid, &watch.name, || {
                format!(
                    "resume {r:?} is out of order or points past its own stream ({} responses)",
                    watch.responses.len()
                )
            });
            return false;
        }
        prev = r.first;
    }
    true
}

fn after_text(after: Option<usize>) -> String {
    match after {
        Some(a) => format!("the cursor of response {a}"),
        None => "the watch's start".to_string(),
    }
}

impl<'a> State<'a> {
    fn resume(&mut self, after: Option<usize>, report: &mut FeedReport) {
        report.stats.resumes += 1;
        self.stream_after = after;
        self.stream_resolved = None;
        self.rewound = false;
        for slot in self.slots.values_mut() {
            slot.next = slot.position_at(after);
            self.rewound |= slot.next < slot.log.len();
        }
    }

    /// A stream that was to deliver events again must have, up to the resolved time it sent.
    fn end_stream(&mut self, report: &mut FeedReport) {
        if !self.rewound {
            return;
        }
        let Some((resolved, at)) = self.stream_resolved else {
            return;
        };
        let watch: &'a Watch = self.watch;
        let name = &watch.name;
        let after = self.stream_after;
        // In slot order, so that the account of a run is the same every time.
        let mut short: Vec<_> = self
            .slots
            .iter()
            .filter_map(|(&id, slot)| Some((id, *slot.log.get(slot.next)?)))
            .collect();
        short.sort_by_key(|&(id, _)| id);
        for (slot_id, (missing, first)) in short {
            if missing.commit_ts_ms <= resolved {
                report.violation(Kind::Resume, name, || {
                    format!(
                        "the stream resumed after {} never delivered slot {slot_id} seq {} \
                         again (first delivered in response {first}: {}), though it sent \
                         resolved {resolved} (response {at})",
                        after_text(after),
                        missing.seq,
                        EventText(missing)
                    )
                });
            }
        }
    }

    fn resolved(&mut self, resolved: u64, i: usize, report: &mut FeedReport) {
        if let Some((prev, at)) = self.stream_resolved {
            if resolved < prev {
                report.violation(Kind::Watermark, &self.watch.name, || {
                    format!(
                        "resolved went back from {prev} (response {at}) to {resolved} \
                         (response {i}) in one stream"
                    )
                });
            }
        }
        if self
            .stream_resolved
            .is_none_or(|(prev, _)| resolved >= prev)
        {
            self.stream_resolved = Some((resolved, i));
        }
        if resolved > self.resolved_sent.0 {
            self.resolved_sent = (resolved, i);
        }
    }

    fn event(&mut self, e: &'a ChangeEvent, i: usize, report: &mut FeedReport) {
        let watch: &'a Watch = self.watch;
        let name = &watch.name;
        let op = match EventOp::try_from(e.op) {
            Ok(EventOp::Snapshot) | Err(_) => {
                report.violation(Kind::Invalid, name, || {
                    format!(
                        "{} (response {i}): the checker models put, delete and emit events only",
                        EventText(e)
                    )
                });
                return;
            }
            Ok(op) => op,
        };
        let slot = self.slots.entry(e.slot).or_default();
        if slot.next < slot.log.len() && !redeliver(slot, e, i, self.stream_after, name, report) {
            return;
        }
        let last = slot.log.last().map(|&(l, _)| l);
        match last {
            Some(last) if e.seq <= last.seq => {
                report.violation(Kind::SlotSeq, name, || {
                    let first = slot
                        .first_delivery(e.seq)
                        .map_or("never".to_string(), |r| format!("response {r}"));
                    format!(
                        "slot {} seq {} delivered again in response {i} (first: {first}), after \
                         seq {}: {}",
                        e.slot,
                        e.seq,
                        last.seq,
                        EventText(e)
                    )
                });
                return;
            }
            Some(last) if e.seq != last.seq + 1 => {
                report.violation(Kind::SlotSeq, name, || {
                    format!(
                        "slot {}: seq {} (response {i}) follows seq {}: seqs {}..={} never \
                         delivered",
                        e.slot,
                        e.seq,
                        last.seq,
                        last.seq + 1,
                        e.seq - 1
                    )
                });
            }
            None if watch.start == Start::Empty && e.seq != 1 => {
                report.violation(Kind::SlotSeq, name, || {
                    format!(
                        "slot {} starts at seq {} (response {i}), not 1: seqs 1..={} never \
                         delivered",
                        e.slot,
                        e.seq,
                        e.seq.saturating_sub(1)
                    )
                });
            }
            _ => {}
        }
        let (sent, sent_at) = self.resolved_sent;
        if sent > 0 && e.commit_ts_ms <= sent {
            report.violation(Kind::Watermark, name, || {
                format!(
                    "{} arrived in response {i}, after resolved {sent} was sent (response \
                     {sent_at})",
                    EventText(e)
                )
            });
        }
        if let Some(last) = last.filter(|l| e.commit_ts_ms < l.commit_ts_ms) {
            report.violation(Kind::Watermark, name, || {
                format!(
                    "{} (response {i}) is older than the slot's previous event {}",
                    EventText(e),
                    EventText(last)
                )
            });
        }
        slot.log.push((e, i));
        slot.next = slot.log.len();
        slot.mark(i);
        self.item(e, op, i, report);
        self.delivered.events.push(e);
    }

    /// Check 1: the event is the item's next version.
    fn item(&mut self, e: &'a ChangeEvent, op: EventOp, i: usize, report: &mut FeedReport) {
        let key: ItemRef<'a> = (&e.shard_key, &e.key);
        let cur = self
            .items
            .get(&key)
            .copied()
            .or((self.watch.start == Start::Empty).then_some(0));
        let wanted = match (op, cur) {
            (EventOp::Emit, _) | (EventOp::Delete, None) => Want::Zero,
            (EventOp::Delete, Some(0)) => Want::NoDelete,
            (EventOp::Delete, Some(_)) => Want::Zero,
            (EventOp::Put, Some(c)) => Want::Version(c + 1),
            (EventOp::Put, None) => Want::Created,
            (EventOp::Snapshot, _) => return,
        };
        if !wanted.admits(e.version) {
            let delivered = &self.delivered.events;
            report.violation(Kind::ItemOrder, &self.watch.name, || {
                let before: Vec<String> = delivered
                    .iter()
                    .filter(|d| d.shard_key == e.shard_key && d.key == e.key)
                    .rev()
                    .take(5)
                    .map(|d| EventText(d).to_string())
                    .collect();
                format!(
                    "item ({}, {}): {} (response {i}), expected {wanted}; its last events \
                     before, newest first: [{}]",
                    Bytes(&e.shard_key),
                    Bytes(&e.key),
                    EventText(e),
                    before.join("; ")
                )
            });
        }
        match op {
            EventOp::Put => {
                self.items.insert(key, e.version);
            }
            EventOp::Delete => {
                self.items.insert(key, 0);
            }
            EventOp::Emit | EventOp::Snapshot => {}
        }
    }
}

/// What check 1 wants of an item's next event.
#[derive(Clone, Copy)]
enum Want {
    /// A put of the item at this version.
    Version(u64),
    /// A put of an item whose version the watch does not know (a midway watch's first).
    Created,
    /// A delete of an item that exists, or an emit: version 0.
    Zero,
    /// Nothing: a delete of an absent item changes nothing, so it has no event.
    NoDelete,
}

impl Want {
    fn admits(self, version: u64) -> bool {
        match self {
            Want::Version(v) => version == v,
            Want::Created => version > 0,
            Want::Zero => version == 0,
            Want::NoDelete => false,
        }
    }
}

impl std::fmt::Display for Want {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Want::Version(v) => write!(f, "v{v}"),
            Want::Created => f.write_str("v1 or more"),
            Want::Zero => f.write_str("v0"),
            Want::NoDelete => f.write_str("no delete: the item is absent"),
        }
    }
}

/// Check 6: `e` comes while the stream redelivers `slot` (resumed after an older cursor), so it
/// must be the next event delivered before, unchanged. True when it turned out to be new (past
/// everything delivered before), for the caller to check as one.
fn redeliver(
    slot: &mut Slot<'_>,
    e: &ChangeEvent,
    i: usize,
    after: Option<usize>,
    name: &str,
    report: &mut FeedReport,
) -> bool {
    let (orig, first) = slot.log[slot.next];
    if orig.seq == e.seq {
        if orig != e {
            report.violation(Kind::Resume, name, || {
                format!(
                    "resumed after {}, slot {} seq {} came again in response {i} changed: first \
                     (response {first}) {}, now {}",
                    after_text(after),
                    e.slot,
                    e.seq,
                    EventText(orig),
                    EventText(e)
                )
            });
        }
        slot.next += 1;
    } else {
        report.violation(Kind::Resume, name, || {
            format!(
                "resumed after {}, slot {} should have delivered seq {} again (first in response \
                 {first}) but delivered seq {} (response {i})",
                after_text(after),
                e.slot,
                orig.seq,
                e.seq
            )
        });
        match slot.log.binary_search_by_key(&e.seq, |(l, _)| l.seq) {
            Ok(k) => slot.next = k + 1,
            Err(k) if k == slot.log.len() => {
                slot.next = k;
                return true;
            }
            Err(k) => slot.next = k,
        }
    }
    slot.mark(i);
    report.stats.redelivered += 1;
    false
}
