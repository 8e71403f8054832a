//! The feed checker against generated histories: a model store applies random puts, deletes,
//! emits and two-item transactions (applied, unknown either way, or not applied) and makes the
//! feed a correct node would; the checker must pass every such history, and catch each single
//! corruption of it (an acknowledged event dropped, an event repeated, two of a slot swapped, a
//! version changed, a failed write's event added, resolved set back, a replay cut short).

use bytes::Bytes;
use ordo_proto::v1::change_event::Op as EventOp;
use ordo_proto::v1::{ChangeEvent, WatchResponse};

use super::*;
use crate::SplitMix64;

const SEEDS: u64 = 200;
const ITEMS: usize = 12;
const SLOTS: u32 = 4;
const STEPS: usize = 150;

/// A generated run: the writes, the final data and the events in commit order.
struct Sim {
    rng: SplitMix64,
    state: Vec<Option<(Vec<u8>, u64)>>,
    seq: [u64; SLOTS as usize],
    ts: u64,
    values: u64,
    labels: u64,
    expected: Expected,
    events: Vec<ChangeEvent>,
}

fn item(i: usize) -> ItemKey {
    ItemKey::new(format!("o-{i}"), "")
}

fn slot(i: usize) -> u32 {
    i as u32 % SLOTS
}

impl Sim {
    fn run(seed: u64) -> Sim {
        let mut sim = Sim {
            rng: SplitMix64(seed),
            state: vec![None; ITEMS],
            seq: [0; SLOTS as usize],
            ts: 1_000,
            values: 0,
            labels: 0,
            expected: Expected::default(),
            events: Vec::new(),
        };
        for _ in 0..STEPS {
            sim.step();
        }
        sim.expected.settled_ms = sim.ts + 5;
        sim.expected.final_data = (0..ITEMS)
            .map(|i| (item(i), sim.state[i].clone()))
            .collect();
        sim
    }

    /// Whether the write applies, and when it was answered (`None`: outcome unknown): applied
    /// and acknowledged, unknown either way, or answered not applied.
    fn outcome(&mut self) -> (bool, Option<u64>) {
        match self.rng.below(100) {
            0..=79 => (true, Some(self.ts + self.rng.below(4))),
            80..=84 => (true, None),
            85..=89 => (false, None),
            _ => (false, Some(0)),
        }
    }

    fn step(&mut self) {
        self.ts += 1 + self.rng.below(3);
        let (applies, acked) = self.outcome();
        let i = self.rng.below(ITEMS as u64) as usize;
        match self.rng.below(100) {
            0..=59 => self.put(i, applies, acked, None),
            60..=74 => self.delete(i, applies, acked),
            75..=84 => self.emit(i, applies, acked),
            _ => {
                self.labels += 1;
                let label = TxnLabel {
                    id: self.labels,
                    cross_group: true,
                };
                let j = (i + 1 + self.rng.below(ITEMS as u64 - 1) as usize) % ITEMS;
                self.put(i, applies, acked, Some(label));
                self.put(j, applies, acked, Some(label));
            }
        }
    }

    fn value(&mut self) -> Vec<u8> {
        self.values += 1;
        format!("v{}", self.values).into_bytes()
    }

    fn event(
        &mut self,
        i: usize,
        key: &str,
        op: EventOp,
        version: u64,
        value: &[u8],
        txn: Option<TxnLabel>,
    ) {
        let s = slot(i);
        self.seq[s as usize] += 1;
        self.events.push(ChangeEvent {
            slot: s,
            seq: self.seq[s as usize],
            shard_key: Bytes::from(format!("o-{i}")),
            key: Bytes::from(key.to_string()),
            op: op as i32,
            version,
            value: Bytes::copy_from_slice(value),
            old_value: Bytes::new(),
            commit_ts_ms: self.ts,
            txn_id: txn.map_or(Bytes::new(), |t| Bytes::from(format!("t{}", t.id))),
        });
    }

    fn put(&mut self, i: usize, applies: bool, acked: Option<u64>, txn: Option<TxnLabel>) {
        let value = self.value();
        let version = self.state[i].as_ref().map_or(0, |s| s.1) + 1;
        let applied = applies.then(|| {
            self.state[i] = Some((value.clone(), version));
            self.event(i, "", EventOp::Put, version, &value, txn);
            version
        });
        self.record(item(i), WriteOp::Put { value }, applied, acked, txn);
    }

    fn delete(&mut self, i: usize, applies: bool, acked: Option<u64>) {
        // A delete of an absent item changes nothing: the history has it as not applied.
        let applied = (applies && self.state[i].is_some()).then(|| {
            self.state[i] = None;
            self.event(i, "", EventOp::Delete, 0, b"", None);
            0
        });
        self.record(item(i), WriteOp::Delete, applied, acked, None);
    }

    fn emit(&mut self, i: usize, applies: bool, acked: Option<u64>) {
        let value = self.value();
        let applied = applies.then(|| {
            self.event(i, "outbox", EventOp::Emit, 0, &value, None);
            0
        });
        let at = ItemKey::new(format!("o-{i}"), "outbox");
        self.record(at, WriteOp::Emit { value }, applied, acked, None);
    }

    /// `applied`: at that version; `acked`: answered then (`None`: outcome unknown).
    fn record(
        &mut self,
        item: ItemKey,
        op: WriteOp,
        applied: Option<u64>,
        acked: Option<u64>,
        txn: Option<TxnLabel>,
    ) {
        let outcome = match (applied, acked) {
            (Some(version), Some(acked_ms)) => Outcome::Applied { version, acked_ms },
            (_, None) => Outcome::Unknown,
            (None, Some(_)) => Outcome::NotApplied,
        };
        self.expected.writes.push(Write {
            item,
            op,
            outcome,
            txn,
        });
    }

    /// The events in responses of 0–5 (an empty one only moves resolved), each resolved just
    /// below its last event's commit time (a transaction's two events share theirs), the last
    /// past everything.
    fn watch(&mut self) -> Watch {
        let mut w = Watch::new("model", Start::Empty);
        let mut at = 0;
        let mut resolved = 0;
        while at < self.events.len() {
            let n = (self.rng.below(6) as usize).min(self.events.len() - at);
            let events = self.events[at..at + n].to_vec();
            at += n;
            if let Some(last) = events.last() {
                resolved = last.commit_ts_ms - 1;
            }
            push(&mut w, events, resolved);
        }
        push(&mut w, Vec::new(), self.expected.settled_ms + 5);
        w
    }
}

fn push(w: &mut Watch, events: Vec<ChangeEvent>, resolved: u64) {
    let n = w.responses.len();
    w.responses.push(Received {
        at_ms: resolved,
        response: WatchResponse {
            events,
            cursor: Bytes::from(format!("c{n}")),
            resolved_ts_ms: resolved,
        },
    });
}

/// `w` with its stream broken after response `k` and resumed after its cursor (changes
/// nothing), then resumed after the cursor of response `r` on purpose: everything after `r`
/// again, in one response.
fn with_resumes(w: &Watch, k: usize, r: usize) -> Watch {
    let mut w = w.clone();
    w.resumes.push(Resume {
        first: k + 1,
        after: Some(k),
    });
    let again: Vec<ChangeEvent> = w.responses[r + 1..]
        .iter()
        .flat_map(|x| x.response.events.iter().cloned())
        .collect();
    let end = w.resolved_ms();
    w.resumes.push(Resume {
        first: w.responses.len(),
        after: Some(r),
    });
    push(&mut w, again, end);
    w
}

#[test]
fn generated_correct_feeds_pass() {
    let mut events = 0;
    for seed in 0..SEEDS {
        let mut sim = Sim::run(seed);
        let w = sim.watch();
        events += w.events();
        let report = check(&sim.expected, std::slice::from_ref(&w));
        assert!(report.is_ok(), "seed {seed}: {report}");
        assert_eq!(report.stats.complete_watches, 1);
        let last = w.responses.len() - 1;
        let k = sim.rng.below(last as u64) as usize;
        let r = sim.rng.below(last as u64) as usize;
        let report = check(&sim.expected, &[with_resumes(&w, k, r)]);
        assert!(
            report.is_ok(),
            "seed {seed}, resumed after {k}, rewound to {r}: {report}"
        );
    }
    assert!(
        events > SEEDS as usize * STEPS / 2,
        "only {events} events generated"
    );
}

/// Where each event of `w` is: `(response, index)`.
fn places(w: &Watch) -> Vec<(usize, usize)> {
    w.responses
        .iter()
        .enumerate()
        .flat_map(|(r, x)| (0..x.response.events.len()).map(move |i| (r, i)))
        .collect()
}

/// One corruption of the feed, the kind of violation it must show, and what it was.
type Corruption = (Watch, Kind, String);

fn corruptions(sim: &mut Sim, w: &Watch) -> Vec<Corruption> {
    let places = places(w);
    let at = |w: &Watch, (r, i): (usize, usize)| w.responses[r].response.events[i].clone();
    let pick = |rng: &mut SplitMix64, v: &[(usize, usize)]| v[rng.below(v.len() as u64) as usize];
    let mut out = Vec::new();
    if places.is_empty() {
        return out;
    }
    let acked: Vec<_> = places
        .iter()
        .copied()
        .filter(|&p| {
            let e = at(w, p);
            sim.expected.writes.iter().any(|x| {
                matches!(x.outcome, Outcome::Applied { .. })
                    && x.item.shard_key == e.shard_key
                    && x.op.value().is_some_and(|v| v == e.value)
            })
        })
        .collect();
    if !acked.is_empty() {
        let (r, i) = pick(&mut sim.rng, &acked);
        let mut m = w.clone();
        let e = m.responses[r].response.events.remove(i);
        out.push((
            m,
            Kind::Writes,
            format!("acknowledged event dropped: {e:?}"),
        ));
    }
    let p = pick(&mut sim.rng, &places);
    let mut m = w.clone();
    let last = m.responses.len() - 1;
    m.responses[last].response.events.push(at(w, p));
    out.push((
        m,
        Kind::SlotSeq,
        format!("event at {p:?} repeated at the end"),
    ));

    let p = pick(&mut sim.rng, &places);
    let later: Vec<_> = places
        .iter()
        .copied()
        .filter(|&q| q > p && at(w, q).slot == at(w, p).slot)
        .collect();
    if !later.is_empty() {
        let q = pick(&mut sim.rng, &later);
        let mut m = w.clone();
        m.responses[p.0].response.events[p.1] = at(w, q);
        m.responses[q.0].response.events[q.1] = at(w, p);
        out.push((
            m,
            Kind::SlotSeq,
            format!("events at {p:?} and {q:?} swapped"),
        ));
    }

    let puts: Vec<_> = places
        .iter()
        .copied()
        .filter(|&p| at(w, p).op == EventOp::Put as i32)
        .collect();
    if !puts.is_empty() {
        let (r, i) = pick(&mut sim.rng, &puts);
        let mut m = w.clone();
        m.responses[r].response.events[i].version += 1;
        out.push((
            m,
            Kind::ItemOrder,
            format!("version of the put at {:?} changed", (r, i)),
        ));
    }

    failed_write_delivered(sim, w, &mut out);

    let backs: Vec<usize> = (1..w.responses.len())
        .filter(|&r| w.responses[r - 1].response.resolved_ts_ms > 0)
        .collect();
    if !backs.is_empty() {
        let r = backs[sim.rng.below(backs.len() as u64) as usize];
        let mut m = w.clone();
        m.responses[r].response.resolved_ts_ms = w.responses[r - 1].response.resolved_ts_ms - 1;
        out.push((
            m,
            Kind::Watermark,
            format!("resolved of response {r} set back"),
        ));
    }

    let (r, _) = places[sim.rng.below(places.len() as u64) as usize];
    if r + 1 < w.responses.len()
        && w.responses[r + 1..]
            .iter()
            .any(|x| !x.response.events.is_empty())
    {
        let mut m = with_resumes(w, 0, r);
        let last = m.responses.len() - 1;
        m.responses[last].response.events.remove(0);
        out.push((
            m,
            Kind::Resume,
            format!("replay after response {r} lost its first event"),
        ));
    }
    out
}

/// The event of a put that was answered not applied, added at the end as the next version of
/// its item with the next seq of its slot.
fn failed_write_delivered(sim: &mut Sim, w: &Watch, out: &mut Vec<Corruption>) {
    let failed: Vec<&Write> = sim
        .expected
        .writes
        .iter()
        .filter(|x| x.outcome == Outcome::NotApplied && matches!(x.op, WriteOp::Put { .. }))
        .collect();
    let Some(&write) = failed.get(sim.rng.below(failed.len().max(1) as u64) as usize) else {
        return;
    };
    let i: usize = String::from_utf8_lossy(&write.item.shard_key)[2..]
        .parse()
        .unwrap();
    let s = slot(i);
    let version = sim.state[i].as_ref().map_or(0, |st| st.1) + 1;
    let e = ChangeEvent {
        slot: s,
        seq: sim.seq[s as usize] + 1,
        shard_key: Bytes::from(write.item.shard_key.clone()),
        key: Bytes::new(),
        op: EventOp::Put as i32,
        version,
        value: Bytes::copy_from_slice(write.op.value().unwrap()),
        old_value: Bytes::new(),
        commit_ts_ms: sim.ts + 1,
        txn_id: write
            .txn
            .map_or(Bytes::new(), |t| Bytes::from(format!("t{}", t.id))),
    };
    let mut m = w.clone();
    let last = m.responses.len() - 1;
    m.responses[last].response.events.push(e);
    out.push((
        m,
        Kind::Writes,
        format!("failed write delivered: {write:?}"),
    ));
}

#[test]
fn every_single_corruption_of_a_generated_feed_is_caught() {
    let mut tried = std::collections::BTreeMap::new();
    for seed in 0..SEEDS {
        let mut sim = Sim::run(seed);
        let w = sim.watch();
        for (m, kind, what) in corruptions(&mut sim, &w) {
            let report = check(&sim.expected, &[m]);
            assert!(
                report.count(kind) > 0,
                "seed {seed}: {what}: no {kind:?} violation\n{report}"
            );
            *tried.entry(kind).or_insert(0) += 1;
        }
    }
    // Every kind of corruption was made in most runs.
    for kind in [
        Kind::Writes,
        Kind::SlotSeq,
        Kind::ItemOrder,
        Kind::Watermark,
        Kind::Resume,
    ] {
        assert!(
            tried.get(&kind).copied().unwrap_or(0) > SEEDS / 2,
            "{tried:?}"
        );
    }
}
