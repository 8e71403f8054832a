//! Checks of a watch against the writes (2, 4) and the final data: which write each delivered
//! event is, found by its item and value (deletes, which carry no value, by count per item).

use std::collections::{BTreeMap, HashMap};

use ordo_proto::v1::change_event::Op as EventOp;
use ordo_proto::v1::ChangeEvent;

use super::report::{EventText, FeedReport, Kind};
use super::stream::Delivered;
use super::{Expected, ItemRef, Outcome, Watch, Write, WriteOp};
use crate::linearizability::{Bytes, ItemKey};

/// `(shard key, key, value)`: a put or an emit.
type ValueRef<'a> = (&'a [u8], &'a [u8], &'a [u8]);

/// The history's puts and emits by `(shard key, key, value)`.
pub(super) struct Index<'a> {
    by_value: HashMap<ValueRef<'a>, usize>,
}

impl<'a> Index<'a> {
    pub(super) fn new(expected: &'a Expected, report: &mut FeedReport) -> Index<'a> {
        let mut by_value = HashMap::new();
        for (w, write) in expected.writes.iter().enumerate() {
            let Some(value) = write.op.value() else {
                continue;
            };
            let key = (&write.item.shard_key[..], &write.item.key[..], value);
            if let Some(other) = by_value.insert(key, w) {
                report.violation(Kind::Invalid, "", || {
                    format!(
                        "writes #{other} and {} put the same value: the checker tells writes \
                         apart by value",
                        WriteText(w, write)
                    )
                });
            }
        }
        Index { by_value }
    }
}

/// `#12 PUT ("order-3", "") "c1-9"`, for reports.
struct WriteText<'a>(usize, &'a Write);

impl std::fmt::Display for WriteText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (w, write) = (self.0, self.1);
        let op = match &write.op {
            WriteOp::Put { .. } => "PUT",
            WriteOp::Delete => "DELETE",
            WriteOp::Emit { .. } => "EMIT",
        };
        write!(f, "#{w} {op} {}", write.item)?;
        if let Some(v) = write.op.value() {
            write!(f, " {}", Bytes(v))?;
        }
        match write.outcome {
            Outcome::Applied { version, acked_ms } => {
                write!(f, " (acknowledged v{version} at {acked_ms})")
            }
            Outcome::NotApplied => f.write_str(" (not applied)"),
            Outcome::Unknown => f.write_str(" (outcome unknown)"),
        }
    }
}

/// What a watch showed of each write.
struct Matched<'a> {
    /// Per write, the first event that is it, and how many were.
    event: Vec<Option<&'a ChangeEvent>>,
    times: Vec<u32>,
    /// DELETE events per item.
    deletes: HashMap<ItemRef<'a>, u64>,
}

/// Checks 2 and 4 of a watch that started with the cluster.
pub(super) fn check(
    expected: &Expected,
    index: &Index<'_>,
    watch: &Watch,
    delivered: &Delivered<'_>,
    report: &mut FeedReport,
) {
    let matched = match_events(expected, index, watch, delivered, report);
    let resolved = delivered.resolved_ms;
    missing(expected, &matched, &watch.name, resolved, report);
    deletes(expected, &matched, &watch.name, resolved, report);
    let complete = resolved >= expected.settled_ms;
    if complete {
        report.stats.complete_watches += 1;
        final_data(expected, delivered, &watch.name, report);
    }
    txns(expected, &matched, &watch.name, complete, report);
}

fn match_events<'a>(
    expected: &Expected,
    index: &Index<'_>,
    watch: &Watch,
    delivered: &Delivered<'a>,
    report: &mut FeedReport,
) -> Matched<'a> {
    let name = &watch.name;
    let n = expected.writes.len();
    let mut m = Matched {
        event: vec![None; n],
        times: vec![0; n],
        deletes: HashMap::new(),
    };
    for &e in &delivered.events {
        let op = EventOp::try_from(e.op);
        if op == Ok(EventOp::Delete) {
            *m.deletes.entry((&e.shard_key, &e.key)).or_default() += 1;
            continue;
        }
        let found = index
            .by_value
            .get(&(&e.shard_key[..], &e.key[..], &e.value[..]))
            .copied();
        let Some(w) = found.filter(|&w| {
            matches!(
                (&expected.writes[w].op, op),
                (WriteOp::Put { .. }, Ok(EventOp::Put)) | (WriteOp::Emit { .. }, Ok(EventOp::Emit))
            )
        }) else {
            report.violation(Kind::Writes, name, || {
                format!("{} is no write of the history", EventText(e))
            });
            continue;
        };
        let write = &expected.writes[w];
        m.times[w] += 1;
        match (m.event[w], write.outcome) {
            (Some(first), _) => report.violation(Kind::Writes, name, || {
                format!(
                    "write {} delivered twice: {} and {}",
                    WriteText(w, write),
                    EventText(first),
                    EventText(e)
                )
            }),
            (None, Outcome::NotApplied) => report.violation(Kind::Writes, name, || {
                format!(
                    "write {} failed, yet it is in the feed: {}",
                    WriteText(w, write),
                    EventText(e)
                )
            }),
            (None, Outcome::Applied { version, .. }) if e.version != version => {
                report.violation(Kind::Writes, name, || {
                    format!(
                        "write {} is in the feed at another version: {}",
                        WriteText(w, write),
                        EventText(e)
                    )
                })
            }
            _ => {}
        }
        m.event[w].get_or_insert(e);
    }
    m
}

/// Every acknowledged put and emit the watch covered is in it; counts of the rest.
fn missing(
    expected: &Expected,
    m: &Matched<'_>,
    name: &str,
    resolved: u64,
    report: &mut FeedReport,
) {
    for (w, write) in expected.writes.iter().enumerate() {
        if write.op == WriteOp::Delete {
            continue;
        }
        match (write.outcome, m.times[w]) {
            (Outcome::Applied { acked_ms, .. }, 0) if acked_ms <= resolved => {
                report.violation(Kind::Writes, name, || {
                    format!(
                        "write {} is not in the feed, though resolved reached {resolved}",
                        WriteText(w, write)
                    )
                })
            }
            (Outcome::Applied { .. }, 1) => report.stats.acked_found += 1,
            (Outcome::Unknown, 0) => report.stats.unknown_absent += 1,
            (Outcome::Unknown, _) => report.stats.unknown_appeared += 1,
            _ => {}
        }
    }
}

/// Per item, the DELETE events are at least the acknowledged deletes the watch covered and at
/// most those plus the unknown ones.
fn deletes(
    expected: &Expected,
    m: &Matched<'_>,
    name: &str,
    resolved: u64,
    report: &mut FeedReport,
) {
    // Per item: (acknowledged by `resolved`, acknowledged or unknown).
    let mut bounds: BTreeMap<&ItemKey, (u64, u64)> = BTreeMap::new();
    for write in &expected.writes {
        if write.op != WriteOp::Delete {
            continue;
        }
        let b = bounds.entry(&write.item).or_default();
        match write.outcome {
            Outcome::Applied { acked_ms, .. } => {
                b.0 += u64::from(acked_ms <= resolved);
                b.1 += 1;
            }
            Outcome::Unknown => b.1 += 1,
            Outcome::NotApplied => {}
        }
    }
    for (item, &(least, most)) in &bounds {
        let got = m
            .deletes
            .get(&(&item.shard_key[..], &item.key[..]))
            .copied()
            .unwrap_or(0);
        if got < least || got > most {
            report.violation(Kind::Writes, name, || {
                format!(
                    "item {item}: {got} DELETE events, but {least} deletes were acknowledged \
                     by resolved {resolved} and {most} may have applied"
                )
            });
        }
    }
    let mut unexpected: Vec<_> = m
        .deletes
        .iter()
        .filter(|(&(sk, k), _)| !bounds.contains_key(&ItemKey::new(sk, k)))
        .collect();
    unexpected.sort();
    for (&(sk, k), &got) in unexpected {
        report.violation(Kind::Writes, name, || {
            format!(
                "item ({}, {}): {got} DELETE events, but the history never deletes it",
                Bytes(sk),
                Bytes(k)
            )
        });
    }
}

/// A watch that covered the whole run leaves every item read back as the final data shows it
/// (events committed after the data was read are left out).
fn final_data(expected: &Expected, delivered: &Delivered<'_>, name: &str, report: &mut FeedReport) {
    let mut last: HashMap<ItemRef<'_>, &ChangeEvent> = HashMap::new();
    for &e in &delivered.events {
        let op = EventOp::try_from(e.op);
        if matches!(op, Ok(EventOp::Put | EventOp::Delete)) && e.commit_ts_ms <= expected.settled_ms
        {
            last.insert((&e.shard_key, &e.key), e);
        }
    }
    for (item, fin) in &expected.final_data {
        let event = last.get(&(&item.shard_key[..], &item.key[..])).copied();
        let fed = event
            .filter(|e| e.op == EventOp::Put as i32)
            .map(|e| (&e.value[..], e.version));
        let wanted = fin.as_ref().map(|(v, ver)| (&v[..], *ver));
        if fed != wanted {
            report.violation(Kind::Writes, name, || {
                let show = |s: Option<(&[u8], u64)>| match s {
                    Some((v, ver)) => format!("v{ver} {}", Bytes(v)),
                    None => "absent".to_string(),
                };
                format!(
                    "item {item}: the final data is {}, but the feed leaves it {} (its last \
                     event: {})",
                    show(wanted),
                    show(fed),
                    event.map_or("none".to_string(), |e| EventText(e).to_string())
                )
            });
        }
    }
}

/// Check 4 over the puts and emits of each labelled transaction.
fn txns(expected: &Expected, m: &Matched<'_>, name: &str, complete: bool, report: &mut FeedReport) {
    let mut labels: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (w, write) in expected.writes.iter().enumerate() {
        match (write.txn, m.event[w]) {
            (Some(label), _) if write.op != WriteOp::Delete => {
                labels.entry(label.id).or_default().push(w)
            }
            (None, Some(e)) if !e.txn_id.is_empty() => report.violation(Kind::Txn, name, || {
                format!(
                    "write {} is in no transaction of the history, yet its event carries a txn \
                     id: {}",
                    WriteText(w, write),
                    EventText(e)
                )
            }),
            _ => {}
        }
    }
    let mut owner: HashMap<&[u8], u64> = HashMap::new();
    for (&label, ws) in &labels {
        let shown: Vec<_> = ws
            .iter()
            .filter_map(|&w| Some((w, &expected.writes[w], m.event[w]?)))
            .collect();
        let Some(&(_, _, one)) = shown.first() else {
            continue;
        };
        let cross_group = expected.writes[ws[0]].txn.is_some_and(|t| t.cross_group);
        for &(w, write, e) in &shown {
            if e.txn_id != one.txn_id || (cross_group && e.txn_id.is_empty()) {
                report.violation(Kind::Txn, name, || {
                    format!(
                        "transaction {label}{}: write {} is {} beside {}: not one txn id",
                        if cross_group { " (cross-group)" } else { "" },
                        WriteText(w, write),
                        EventText(e),
                        EventText(one)
                    )
                });
            }
            if write.outcome == Outcome::NotApplied {
                report.violation(Kind::Txn, name, || {
                    format!(
                        "transaction {label} was aborted, yet write {} is in the feed: {}",
                        WriteText(w, write),
                        EventText(e)
                    )
                });
            }
        }
        if !one.txn_id.is_empty() {
            if let Some(other) = owner.insert(&one.txn_id, label).filter(|&o| o != label) {
                report.violation(Kind::Txn, name, || {
                    format!(
                        "transactions {other} and {label} both carry txn id {}",
                        Bytes(&one.txn_id)
                    )
                });
            }
        }
        if complete && shown.len() < ws.len() {
            let w = *ws.iter().find(|&&w| m.event[w].is_none()).unwrap();
            report.violation(Kind::Txn, name, || {
                format!(
                    "transaction {label} is in the feed in part: {} but not write {}",
                    EventText(one),
                    WriteText(w, &expected.writes[w])
                )
            });
        }
    }
}
