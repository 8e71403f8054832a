//! The per-item search: one item's records turned into model operations, then a Wing–Gong
//! search with Lowe's memoisation for an order of them that the model accepts.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::history::{Completion, ItemKey, Op, Output, Record};
use super::model::{step, Interner, ModelOp, ModelOutput, State, UNSEEN};
use super::report::{explain, KeyReport, Verdict};
use super::CheckOptions;

/// One operation of one item, in model form.
pub(super) struct ItemOp<'a> {
    pub(super) rec: &'a Record,
    pub(super) op: ModelOp,
    pub(super) out: ModelOutput,
    pub(super) invoke: Duration,
    /// `None` for unknown outcomes: their return is at +infinity.
    pub(super) ret: Option<Duration>,
}

pub(super) fn check_key(
    key: &ItemKey,
    recs: &[&Record],
    options: &CheckOptions,
    symmetry: bool,
) -> KeyReport {
    let mut interner = Interner::new();
    let observed = observed_values(recs);
    let initial: State = options
        .initial
        .get(key)
        .map(|(v, ver)| (interner.id(v), *ver));
    let mut ops = Vec::with_capacity(recs.len());
    for &rec in recs {
        match item_op(rec, &observed, &mut interner) {
            Ok(Some(op)) => ops.push(op),
            Ok(None) => {}
            Err(why) => return invalid(key, why),
        }
    }

    let (outcome, steps) = search(&ops, initial, options.max_steps_per_key, symmetry);
    let verdict = match outcome {
        Outcome::Linearizable => Verdict::Linearizable,
        Outcome::TimedOut => Verdict::TimedOut,
        Outcome::Violation(best) => Verdict::Violation(explain(&ops, initial, &best, &interner)),
    };
    KeyReport {
        key: key.clone(),
        ops: ops.len(),
        steps,
        verdict,
    }
}

/// The values some completed read returned: an unknown put of any other value can only ever
/// fail a read's comparison (see `UNSEEN`).
fn observed_values<'a>(recs: &[&'a Record]) -> HashSet<&'a [u8]> {
    recs.iter()
        .filter(|r| r.op == Op::Get)
        .filter_map(|r| match &r.completion {
            Some(Completion::Ok(Output::Get {
                found: true, value, ..
            })) => Some(value.as_slice()),
            _ => None,
        })
        .collect()
}

/// `rec` in model form; `None` for a record that cannot constrain anything (a failed op, a
/// read whose answer nobody saw); `Err` for a malformed record.
fn item_op<'a>(
    rec: &'a Record,
    observed: &HashSet<&[u8]>,
    interner: &mut Interner,
) -> Result<Option<ItemOp<'a>>, String> {
    let (out, ret) = match &rec.completion {
        Some(Completion::Fail) => return Ok(None),
        Some(Completion::Ok(out)) => {
            let Some(ret) = rec.ret else {
                return Err(format!("{rec}: completed Ok without a return time"));
            };
            if ret < rec.invoke {
                return Err(format!("{rec}: returns before it is invoked"));
            }
            (model_output(rec, out, interner)?, Some(ret))
        }
        Some(Completion::Unknown) | None => {
            // A read whose answer nobody saw constrains nothing.
            if rec.op == Op::Get {
                return Ok(None);
            }
            (ModelOutput::Unknown, None)
        }
    };
    let op = match &rec.op {
        Op::Get => ModelOp::Get,
        Op::Put { value, if_version } => ModelOp::Put {
            value: if out == ModelOutput::Unknown && !observed.contains(value.as_slice()) {
                UNSEEN
            } else {
                interner.id(value)
            },
            cond: *if_version,
        },
        Op::Delete { if_version } => ModelOp::Delete { cond: *if_version },
    };
    Ok(Some(ItemOp {
        rec,
        op,
        out,
        invoke: rec.invoke,
        ret,
    }))
}

/// The answer of a completed op in model form, if it fits the op.
fn model_output(
    rec: &Record,
    out: &Output,
    interner: &mut Interner,
) -> Result<ModelOutput, String> {
    Ok(match (&rec.op, out) {
        (
            Op::Get,
            Output::Get {
                found,
                value,
                version,
            },
        ) => ModelOutput::Get(found.then(|| (interner.id(value), *version))),
        (Op::Put { .. }, Output::Put { succeeded, version }) => ModelOutput::Put {
            succeeded: *succeeded,
            version: *version,
        },
        (
            Op::Delete { .. },
            Output::Delete {
                succeeded,
                existed,
                prev_version,
            },
        ) => ModelOutput::Delete {
            succeeded: *succeeded,
            existed: *existed,
            prev: *prev_version,
        },
        _ => return Err(format!("{rec}: the output does not fit the operation")),
    })
}

fn invalid(key: &ItemKey, why: String) -> KeyReport {
    KeyReport {
        key: key.clone(),
        ops: 0,
        steps: 0,
        verdict: Verdict::Invalid(why),
    }
}

enum Outcome {
    Linearizable,
    TimedOut,
    /// Carries the longest linearized prefix (indexes into the item's ops).
    Violation(Vec<usize>),
}

const NIL: usize = usize::MAX;

/// The order of entries in the call/return list. At equal times calls come first, so an op
/// returning at `t` and one invoked at `t` count as concurrent: with a coarse clock the safe
/// reading is the one that cannot invent a violation.
pub(super) fn event_order(ops: &[ItemOp]) -> Vec<(Duration, u8, usize)> {
    let mut events = Vec::with_capacity(ops.len() * 2);
    for (i, op) in ops.iter().enumerate() {
        events.push((op.invoke, 0u8, i));
        if let Some(ret) = op.ret {
            events.push((ret, 1u8, i));
        }
    }
    events.sort_unstable();
    events
}

/// Wing–Gong search with Lowe's memoisation. The entries live in a doubly linked list (node 0
/// is a sentinel head) so linearizing an op unlinks its call and return in O(1) and
/// backtracking relinks them in reverse order. Unknown ops have no return entry: nothing
/// forces them to be linearized, so they may take effect any time after their call, or never.
///
/// Unknown ops with the same model op are interchangeable, except that an earlier-invoked one
/// may take effect at more points: any linearization that places a later one while an earlier
/// one is unplaced stays valid with the two swapped. So only the earliest unplaced op of each
/// such class is tried, which turns "which subset of k timed-out writes happened" (2^k) into
/// "how many of them" (k + 1).
fn search(ops: &[ItemOp], initial: State, budget: u64, symmetry: bool) -> (Outcome, u64) {
    let mut s = Search::new(ops, initial, symmetry);
    let mut entry = s.next[0];
    let mut steps = 0u64;
    loop {
        if s.remaining_ok == 0 {
            // Every completed op is placed; unknown ops left over simply never took effect.
            return (Outcome::Linearizable, steps);
        }
        if steps >= budget {
            return (Outcome::TimedOut, steps);
        }
        steps += 1;
        // While a completed op is unplaced its return entry is linked after `entry` (entries
        // before `entry` are calls already tried at this depth), so the walk meets a return
        // before the end of the list.
        debug_assert!(entry != NIL);
        if entry == NIL {
            return (Outcome::Violation(s.best), steps);
        }
        entry = if s.is_call[entry] {
            s.try_call(entry)
        } else {
            // An op returned before it could be placed: undo the last choice and try the next.
            match s.backtrack() {
                Some(next) => next,
                None => return (Outcome::Violation(s.best), steps),
            }
        };
    }
}

/// The state of one item's search: the call/return list, what is placed, the memo table.
struct Search<'o, 'r> {
    ops: &'o [ItemOp<'r>],
    /// The doubly linked call/return list; node `k + 1` is event `k` of `event_order`.
    next: Vec<usize>,
    prev: Vec<usize>,
    is_call: Vec<bool>,
    op_of: Vec<usize>,
    ret_node: Vec<usize>,
    /// For each unknown op, the previous unknown op of its class in list order (see `search`).
    class_prev: Vec<usize>,
    /// Bit set of the placed ops.
    linearized: Vec<u64>,
    memo: HashSet<(Box<[u64]>, State)>,
    /// The placed calls, each with the state before it.
    stack: Vec<(usize, State)>,
    best: Vec<usize>,
    remaining_ok: usize,
    state: State,
}

impl<'o, 'r> Search<'o, 'r> {
    fn new(ops: &'o [ItemOp<'r>], initial: State, symmetry: bool) -> Search<'o, 'r> {
        let events = event_order(ops);
        let nodes = events.len() + 1;
        let mut s = Search {
            ops,
            next: (1..=nodes)
                .map(|n| if n == nodes { NIL } else { n })
                .collect(),
            prev: (0..nodes).map(|n| n.wrapping_sub(1)).collect(),
            is_call: vec![false; nodes],
            op_of: vec![0usize; nodes],
            ret_node: vec![NIL; ops.len()],
            class_prev: vec![NIL; ops.len()],
            linearized: vec![0u64; ops.len().div_ceil(64)],
            memo: HashSet::new(),
            stack: Vec::new(),
            best: Vec::new(),
            remaining_ok: ops.iter().filter(|o| o.ret.is_some()).count(),
            state: initial,
        };
        for (k, &(_, kind, i)) in events.iter().enumerate() {
            s.is_call[k + 1] = kind == 0;
            s.op_of[k + 1] = i;
            if kind == 1 {
                s.ret_node[i] = k + 1;
            }
        }
        let mut class_last: HashMap<ModelOp, usize> = HashMap::new();
        for &(_, kind, i) in &events {
            if symmetry && kind == 0 && ops[i].ret.is_none() {
                if let Some(p) = class_last.insert(ops[i].op, i) {
                    s.class_prev[i] = p;
                }
            }
        }
        s
    }

    fn placed(&self, i: usize) -> bool {
        self.linearized[i / 64] & (1 << (i % 64)) != 0
    }

    fn set_placed(&mut self, i: usize, placed: bool) {
        if placed {
            self.linearized[i / 64] |= 1 << (i % 64);
        } else {
            self.linearized[i / 64] &= !(1 << (i % 64));
        }
    }

    fn unlink(&mut self, n: usize) {
        self.next[self.prev[n]] = self.next[n];
        if self.next[n] != NIL {
            self.prev[self.next[n]] = self.prev[n];
        }
    }

    fn relink(&mut self, n: usize) {
        self.next[self.prev[n]] = n;
        if self.next[n] != NIL {
            self.prev[self.next[n]] = n;
        }
    }

    /// Tries to place the op of call entry `entry` next; the entry to visit after.
    fn try_call(&mut self, entry: usize) -> usize {
        let i = self.op_of[entry];
        let p = self.class_prev[i];
        if p != NIL && !self.placed(p) {
            // Not its class's turn (see `search`).
            return self.next[entry];
        }
        let Some(new_state) = step(self.state, self.ops[i].op, self.ops[i].out) else {
            return self.next[entry];
        };
        self.set_placed(i, true);
        // Same set of placed ops and same state = same future: explored already.
        if !self
            .memo
            .insert((self.linearized.clone().into_boxed_slice(), new_state))
        {
            self.set_placed(i, false);
            return self.next[entry];
        }
        self.stack.push((entry, self.state));
        self.state = new_state;
        self.unlink(entry);
        if self.ret_node[i] != NIL {
            self.unlink(self.ret_node[i]);
            self.remaining_ok -= 1;
        }
        if self.stack.len() > self.best.len() {
            self.best = self.stack.iter().map(|&(n, _)| self.op_of[n]).collect();
        }
        self.next[0]
    }

    /// Undoes the last placement; the entry to visit after it, or `None` if nothing is placed.
    fn backtrack(&mut self) -> Option<usize> {
        let (call, old_state) = self.stack.pop()?;
        let i = self.op_of[call];
        self.state = old_state;
        self.set_placed(i, false);
        if self.ret_node[i] != NIL {
            self.relink(self.ret_node[i]);
            self.remaining_ok += 1;
        }
        self.relink(call);
        Some(self.next[call])
    }
}
