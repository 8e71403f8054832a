//! What a check says: a verdict per item and, for a violation, an account a person can follow
//! (the longest linearizable prefix, the state after it, and why nothing could go next).

use std::fmt::{self, Write as _};

use super::history::{ItemKey, Op, OpId, Output};
use super::model::{step, why_not, Interner, ModelOutput, State, UNSEEN};
use super::search::{event_order, ItemOp};

/// The verdict for one item.
#[derive(Clone, Debug)]
pub enum Verdict {
    Linearizable,
    /// No linearization exists.
    Violation(Violation),
    /// The step budget ran out: neither proven nor refuted.
    TimedOut,
    /// The history itself is malformed (e.g. an output that does not fit its operation).
    Invalid(String),
}

/// Evidence that an item's history is not linearizable.
#[derive(Clone, Debug)]
pub struct Violation {
    /// The longest sequence of operations the search managed to linearize, in order.
    pub longest_prefix: Vec<OpId>,
    /// The completed operation that had to take effect next and could not: every candidate
    /// before its return was impossible or led to a dead end.
    pub stuck_at: Option<OpId>,
    /// Human-readable account: the prefix's tail, the model state after it, and why each
    /// candidate could not go next.
    pub explanation: String,
}

/// The result for one item.
#[derive(Clone, Debug)]
pub struct KeyReport {
    pub key: ItemKey,
    /// Operations the search considered (completed and unknown writes; failed ops and reads of
    /// unknown outcome are dropped since they cannot change anything).
    pub ops: usize,
    /// Search steps taken.
    pub steps: u64,
    pub verdict: Verdict,
}

/// The overall verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overall {
    Linearizable,
    /// At least one item has a violation or a malformed history.
    NotLinearizable,
    /// No violation found, but at least one item ran out of budget.
    Unknown,
}

/// The result of [`check`]: one report per item, in key order.
#[derive(Clone, Debug)]
pub struct CheckResult {
    pub keys: Vec<KeyReport>,
}

impl CheckResult {
    /// Violations win over timeouts: one refuted item refutes the whole history.
    pub fn overall(&self) -> Overall {
        if self
            .keys
            .iter()
            .any(|k| matches!(k.verdict, Verdict::Violation(_) | Verdict::Invalid(_)))
        {
            Overall::NotLinearizable
        } else if self
            .keys
            .iter()
            .any(|k| matches!(k.verdict, Verdict::TimedOut))
        {
            Overall::Unknown
        } else {
            Overall::Linearizable
        }
    }

    /// True only if every item was proven linearizable.
    pub fn is_linearizable(&self) -> bool {
        self.overall() == Overall::Linearizable
    }

    /// Items with a violation or a malformed history.
    pub fn violations(&self) -> Vec<&KeyReport> {
        self.keys
            .iter()
            .filter(|k| matches!(k.verdict, Verdict::Violation(_) | Verdict::Invalid(_)))
            .collect()
    }

    /// Items whose search ran out of budget.
    pub fn timed_out(&self) -> Vec<&ItemKey> {
        self.keys
            .iter()
            .filter(|k| matches!(k.verdict, Verdict::TimedOut))
            .map(|k| &k.key)
            .collect()
    }

    /// Panics with the report unless every item was proven linearizable.
    #[track_caller]
    pub fn assert_linearizable(&self) {
        if !self.is_linearizable() {
            panic!("history is not proven linearizable\n{self}");
        }
    }

    /// Panics with the report if any item has a violation; a timed-out item passes.
    #[track_caller]
    pub fn assert_no_violation(&self) {
        if self.overall() == Overall::NotLinearizable {
            panic!("history is not linearizable\n{self}");
        }
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ops: usize = self.keys.iter().map(|k| k.ops).sum();
        writeln!(
            f,
            "{:?}: {} items, {} ops considered",
            self.overall(),
            self.keys.len(),
            ops
        )?;
        for k in &self.keys {
            match &k.verdict {
                Verdict::Linearizable => {}
                Verdict::TimedOut => writeln!(
                    f,
                    "item {}: undecided, search gave up after {} steps ({} ops)",
                    k.key, k.steps, k.ops
                )?,
                Verdict::Invalid(why) => writeln!(f, "item {}: malformed history: {why}", k.key)?,
                Verdict::Violation(v) => {
                    writeln!(
                        f,
                        "item {}: NOT linearizable ({} ops, {} search steps)",
                        k.key, k.ops, k.steps
                    )?;
                    f.write_str(&v.explanation)?;
                }
            }
        }
        Ok(())
    }
}

// ---- explaining a violation ----------------------------------------------------------------

const REPORT_TAIL: usize = 8;
const REPORT_CANDIDATES: usize = 10;

pub(super) fn explain(
    ops: &[ItemOp],
    initial: State,
    best: &[usize],
    interner: &Interner,
) -> Violation {
    let values = &interner.values;
    let mut text = String::new();
    let mut placed = vec![false; ops.len()];
    let mut state = initial;
    let mut states = Vec::with_capacity(best.len());
    for &i in best {
        placed[i] = true;
        // The prefix was built by `step`, so replaying it cannot fail.
        state = step(state, ops[i].op, ops[i].out).unwrap_or(state);
        states.push(state);
    }
    let _ = writeln!(
        text,
        "  initial state: {}; longest linearizable prefix: {} of {} ops{}",
        StateText(initial, values),
        best.len(),
        ops.len(),
        if best.len() > REPORT_TAIL {
            format!(" (last {REPORT_TAIL} shown)")
        } else {
            String::new()
        }
    );
    let from = best.len().saturating_sub(REPORT_TAIL);
    for (k, &i) in best.iter().enumerate().skip(from) {
        let _ = writeln!(
            text,
            "    {}   => {}",
            ops[i].rec,
            StateText(states[k], values)
        );
    }
    let _ = writeln!(
        text,
        "  state after the prefix: {}",
        StateText(state, values)
    );

    // The op that had to go next is the unplaced completed op whose return entry comes first;
    // the candidates are the unplaced ops invoked before that return.
    let events = event_order(ops);
    let stuck = events
        .iter()
        .find(|&&(_, kind, i)| kind == 1 && !placed[i])
        .copied();
    let mut stuck_at = None;
    if let Some(stuck_event) = stuck {
        let s = stuck_event.2;
        stuck_at = Some(ops[s].rec.id);
        let _ = writeln!(
            text,
            "  {} must take effect by {:?}, but nothing can be placed next:",
            ops[s].rec.id, stuck_event.0
        );
        let candidates: Vec<usize> = events
            .iter()
            .filter(|&&e| e.1 == 0 && !placed[e.2] && e < stuck_event)
            .map(|e| e.2)
            .collect();
        for &c in candidates.iter().take(REPORT_CANDIDATES) {
            let why = match step(state, ops[c].op, ops[c].out) {
                Some(next) => format!(
                    "could go next (item would be {}) but every continuation dead-ends",
                    StateText(next, values)
                ),
                None => why_not(state, ops[c].op, ops[c].out, values),
            };
            let _ = writeln!(text, "    {}\n        {why}", ops[c].rec);
        }
        if candidates.len() > REPORT_CANDIDATES {
            let _ = writeln!(
                text,
                "    ... and {} more",
                candidates.len() - REPORT_CANDIDATES
            );
        }
    }
    Violation {
        longest_prefix: best.iter().map(|&i| ops[i].rec.id).collect(),
        stuck_at,
        explanation: text,
    }
}

// ---- formatting ---------------------------------------------------------------------------

/// Bytes as a quoted string when printable, as hex otherwise; long values are cut.
pub(crate) struct Bytes<'a>(pub(crate) &'a [u8]);

impl fmt::Display for Bytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX: usize = 32;
        let shown = &self.0[..self.0.len().min(MAX)];
        if shown.iter().all(|b| (0x20..0x7f).contains(b)) {
            write!(f, "{:?}", String::from_utf8_lossy(shown))?;
        } else {
            f.write_str("0x")?;
            for b in shown {
                write!(f, "{b:02x}")?;
            }
        }
        if self.0.len() > MAX {
            write!(f, "…({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

pub(super) struct OpText<'a>(pub(super) &'a Op);

impl fmt::Display for OpText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cond = |f: &mut fmt::Formatter<'_>, c: &Option<u64>| match c {
            Some(v) => write!(f, " if_version={v}"),
            None => Ok(()),
        };
        match self.0 {
            Op::Get => f.write_str("get"),
            Op::Put { value, if_version } => {
                write!(f, "put {}", Bytes(value))?;
                cond(f, if_version)
            }
            Op::Delete { if_version } => {
                f.write_str("delete")?;
                cond(f, if_version)
            }
        }
    }
}

pub(super) struct OutputText<'a>(pub(super) &'a Output);

impl fmt::Display for OutputText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Output::Get { found: false, .. } => f.write_str("not found"),
            Output::Get { value, version, .. } => write!(f, "{} v{version}", Bytes(value)),
            Output::Put {
                succeeded: true,
                version,
            } => write!(f, "ok v{version}"),
            Output::Put {
                succeeded: false,
                version,
            } => write!(f, "failed (current v{version})"),
            Output::Delete {
                succeeded,
                existed,
                prev_version,
            } => {
                f.write_str(if *succeeded { "ok" } else { "failed" })?;
                if *existed {
                    f.write_str(" (removed)")?;
                }
                match prev_version {
                    Some(p) => write!(f, " prev v{p}"),
                    None => Ok(()),
                }
            }
        }
    }
}

pub(super) struct StateText<'a>(pub(super) State, pub(super) &'a [Vec<u8>]);

impl fmt::Display for StateText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("absent"),
            Some((UNSEEN, ver)) => write!(f, "<a value no read returned> v{ver}"),
            Some((v, ver)) => write!(f, "{} v{ver}", Bytes(&self.1[v as usize])),
        }
    }
}

pub(super) struct OutText<'a>(pub(super) ModelOutput, pub(super) &'a [Vec<u8>]);

impl fmt::Display for OutText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            ModelOutput::Unknown => f.write_str("unknown"),
            ModelOutput::Get(s) => {
                if s.is_none() {
                    f.write_str("not found")
                } else {
                    StateText(s, self.1).fmt(f)
                }
            }
            ModelOutput::Put { succeeded, version } => {
                OutputText(&Output::Put { succeeded, version }).fmt(f)
            }
            ModelOutput::Delete {
                succeeded,
                existed,
                prev,
            } => OutputText(&Output::Delete {
                succeeded,
                existed,
                prev_version: prev,
            })
            .fmt(f),
        }
    }
}
