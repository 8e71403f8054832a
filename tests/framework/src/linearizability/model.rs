//! Ordo's item as the checker models it: absent, or `(value, version)` with version 1 at
//! creation and +1 per write. Values are interned per item so that a model state is two
//! integers: cheap to copy, hash and compare in the memo table.

use std::collections::HashMap;

use super::report::{OutText, StateText};

pub(super) type ValueId = u32;
/// `None` = absent; `Some((value, version))`.
pub(super) type State = Option<(ValueId, u64)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum ModelOp {
    Get,
    Put { value: ValueId, cond: Option<u64> },
    Delete { cond: Option<u64> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ModelOutput {
    /// The outcome is unknown: any output is acceptable, and it may never take effect.
    Unknown,
    Get(State),
    Put {
        succeeded: bool,
        version: u64,
    },
    Delete {
        succeeded: bool,
        existed: bool,
        prev: Option<u64>,
    },
}

pub(super) fn version_of(state: State) -> u64 {
    state.map_or(0, |(_, v)| v)
}

pub(super) fn cond_holds(state: State, cond: Option<u64>) -> bool {
    match cond {
        None => true,
        Some(0) => state.is_none(),
        Some(v) => version_of(state) == v,
    }
}

/// Applies `op` to `state` if the op could have answered `out` there. An unknown op whose
/// effect would be nothing is refused: linearizing it is the same as leaving it out, and
/// leaving it out is always allowed, so trying it only widens the search.
pub(super) fn step(state: State, op: ModelOp, out: ModelOutput) -> Option<State> {
    let cur = version_of(state);
    match op {
        ModelOp::Get => match out {
            ModelOutput::Get(seen) if seen == state => Some(state),
            _ => None,
        },
        ModelOp::Put { value, cond } if cond_holds(state, cond) => {
            let next = Some((value, cur + 1));
            match out {
                ModelOutput::Unknown => Some(next),
                ModelOutput::Put {
                    succeeded: true,
                    version,
                } if version == cur + 1 => Some(next),
                _ => None,
            }
        }
        ModelOp::Put { .. } => match out {
            ModelOutput::Put {
                succeeded: false,
                version,
            } if version == cur => Some(state),
            _ => None,
        },
        ModelOp::Delete { cond } if cond_holds(state, cond) => match out {
            ModelOutput::Unknown if state.is_some() => Some(None),
            ModelOutput::Delete {
                succeeded: true,
                existed,
                prev,
            } if existed == state.is_some() && prev.is_none_or(|p| p == cur) => Some(None),
            _ => None,
        },
        ModelOp::Delete { .. } => match out {
            ModelOutput::Delete {
                succeeded: false,
                existed: false,
                prev,
            } if prev.is_none_or(|p| p == cur) => Some(state),
            _ => None,
        },
    }
}

/// Why `step` refused (for reports only; kept apart so the hot path stays small).
pub(super) fn why_not(state: State, op: ModelOp, out: ModelOutput, values: &[Vec<u8>]) -> String {
    let st = StateText(state, values);
    let cur = version_of(state);
    match op {
        ModelOp::Get => format!("it read {} but the item is {st}", OutText(out, values)),
        ModelOp::Put { cond, .. } | ModelOp::Delete { cond } => {
            let name = if matches!(op, ModelOp::Put { .. }) {
                "put"
            } else {
                "delete"
            };
            let holds = cond_holds(state, cond);
            match (holds, out) {
                (true, ModelOutput::Unknown) => {
                    format!("its outcome is unknown and a {name} here would change nothing")
                }
                (false, ModelOutput::Unknown) => format!(
                    "its outcome is unknown and its condition fails against {st}, so it \
                     would change nothing"
                ),
                (true, _) => {
                    let expected = if matches!(op, ModelOp::Put { .. }) {
                        format!("succeed with version {}", cur + 1)
                    } else {
                        format!("succeed, existed={}, prev_version {cur}", state.is_some())
                    };
                    format!(
                        "the item is {st}, so the {name} would {expected}, but it answered {}",
                        OutText(out, values)
                    )
                }
                (false, _) => format!(
                    "the item is {st}, so its condition fails and it must answer failed with \
                     version {cur}, but it answered {}",
                    OutText(out, values)
                ),
            }
        }
    }
}

/// The value id shared by every unknown-outcome put whose value no read returned. Such values
/// can only ever fail a read's comparison, so they are indistinguishable to the model, and
/// sharing one id lets both the memo table and the symmetry rule in `search` treat those puts
/// as one.
pub(super) const UNSEEN: ValueId = 0;

pub(super) struct Interner {
    ids: HashMap<Vec<u8>, ValueId>,
    pub(super) values: Vec<Vec<u8>>,
}

impl Interner {
    pub(super) fn new() -> Interner {
        Interner {
            ids: HashMap::new(),
            // Slot `UNSEEN`; never returned by `id`.
            values: vec![Vec::new()],
        }
    }

    pub(super) fn id(&mut self, v: &[u8]) -> ValueId {
        if let Some(&id) = self.ids.get(v) {
            return id;
        }
        let id = self.values.len() as ValueId;
        self.ids.insert(v.to_vec(), id);
        self.values.push(v.to_vec());
        id
    }
}
