//! A linearizability checker for histories of single-item Ordo operations (`Get`, `Put`,
//! `Delete`, each with an optional `if_version`).
//!
//! Tests record what their clients did in a [`History`] (cheap to clone and share between tasks
//! or threads; every call takes its lock only for a moment, never across an `.await`), then call
//! [`check`]. The checker splits the history by item (an item is its own register, so the
//! history is linearizable iff every item's sub-history is: P-compositionality) and runs a
//! Wing–Gong search with Lowe's memoisation per item, the algorithm Porcupine and Knossos use.
//!
//! ```ignore
//! let history = History::new();
//! // In each client task (`history.clone()` moved in), either in one call...
//! let op = Op::Put { value: b"a".to_vec(), if_version: Some(3) };
//! let resp = history.record(client_id, key.clone(), op, kv.put(sk, k, "a", Some(3))).await;
//! // ...or by hand, e.g. when the test knows better than `Completion::from_status`:
//! let id = history.invoke(client_id, key.clone(), Op::Get);
//! let result = kv.get(sk, k, false).await;
//! history.complete(id, Completion::from_result(&result));
//! // After the clients stopped (ops still in flight count as unknown):
//! check(&history).assert_linearizable();
//! ```
//!
//! `client::Client` and the router retry a write only after attempts that certainly were not
//! applied (see [`ordo_proto::certainly_not_applied`]), so an operation takes effect at most once,
//! as this model assumes; a client that retried blindly would show up here as a violation.
//!
//! The model is Ordo's item: absent, or `(value, version)` with version 1 at creation and +1 per
//! write; a delete removes the item and a later put recreates it at version 1. The search
//! assumes every item is absent when the history starts unless [`CheckOptions::initial`] says
//! otherwise. Only linearizable reads belong in a history: a `STALE` read may legitimately see
//! the past.
//!
//! Multi-item `Txn`s are not modelled: they would tie items together and break the split.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ordo_proto::v1::{DeleteResponse, GetResponse, PutResponse};

/// Who issued an operation. Only used in reports: the checker takes real-time order from the
/// recorded times, not from the client, so one client may have several operations in flight.
pub type ClientId = u64;

/// An Ordo item's address.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemKey {
    pub shard_key: Vec<u8>,
    pub key: Vec<u8>,
}

impl ItemKey {
    /// `ItemKey::new("order-17", "items/3")`.
    pub fn new(shard_key: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> ItemKey {
        ItemKey {
            shard_key: shard_key.into(),
            key: key.into(),
        }
    }
}

impl fmt::Display for ItemKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {})", Bytes(&self.shard_key), Bytes(&self.key))
    }
}

impl fmt::Debug for ItemKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a client asked for, with its input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A linearizable read.
    Get,
    /// `if_version`: `None` = unconditional, `Some(0)` = the item must not exist, `Some(v)` =
    /// the item's version must be `v`.
    Put {
        value: Vec<u8>,
        if_version: Option<u64>,
    },
    /// `if_version` as for `Put`.
    Delete { if_version: Option<u64> },
}

/// What the server answered to a completed operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// When `found` is false, `value` and `version` are not compared.
    Get {
        found: bool,
        value: Vec<u8>,
        version: u64,
    },
    /// `version`: the new version on success; the current one (0 = absent) when the condition
    /// failed.
    Put { succeeded: bool, version: u64 },
    /// `existed`: an item existed and was removed (always false on a failed condition).
    /// `prev_version`: the version before the call (0 = absent); `None` if the client did not
    /// record it, and then it is not compared.
    Delete {
        succeeded: bool,
        existed: bool,
        prev_version: Option<u64>,
    },
}

impl Output {
    /// A read that found `value` at `version`.
    pub fn found(value: impl Into<Vec<u8>>, version: u64) -> Output {
        Output::Get {
            found: true,
            value: value.into(),
            version,
        }
    }

    /// A read that found nothing.
    pub fn absent() -> Output {
        Output::Get {
            found: false,
            value: Vec::new(),
            version: 0,
        }
    }
}

impl From<&GetResponse> for Output {
    fn from(r: &GetResponse) -> Output {
        Output::Get {
            found: r.found,
            value: r.value.to_vec(),
            version: r.version,
        }
    }
}

impl From<&PutResponse> for Output {
    fn from(r: &PutResponse) -> Output {
        Output::Put {
            succeeded: r.succeeded,
            version: r.version,
        }
    }
}

impl From<&DeleteResponse> for Output {
    fn from(r: &DeleteResponse) -> Output {
        Output::Delete {
            succeeded: r.succeeded,
            existed: r.deleted,
            prev_version: Some(r.prev_version),
        }
    }
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The server answered; the time of [`History::complete`] is the return time.
    Ok(Output),
    /// Known not to have been applied (e.g. refused before it was proposed). Dropped by the
    /// checker.
    Fail,
    /// May or may not have taken effect, at any time after its invocation (timeout, lost
    /// connection). An operation never completed counts as `Unknown` too.
    Unknown,
}

impl Completion {
    /// A conservative reading of an error from Ordo's client or router: `INVALID_ARGUMENT`
    /// proves the request never reached the log, and so does an error that is
    /// [`ordo_proto::certainly_not_applied`] (not leader, wrong shard, `NotApplied`, no
    /// connection): both retry a write only after such attempts, so none of its attempts was
    /// applied. Everything else is `Unknown`. A test that knows better (e.g. its fault injector
    /// refused the request) can record `Fail` itself.
    pub fn from_status(status: &tonic::Status) -> Completion {
        if status.code() == tonic::Code::InvalidArgument
            || ordo_proto::certainly_not_applied(status)
        {
            Completion::Fail
        } else {
            Completion::Unknown
        }
    }

    /// `Ok` with the response's output, or [`Completion::from_status`] of the error.
    pub fn from_result<T>(result: &Result<T, tonic::Status>) -> Completion
    where
        for<'a> Output: From<&'a T>,
    {
        match result {
            Ok(resp) => Completion::Ok(Output::from(resp)),
            Err(status) => Completion::from_status(status),
        }
    }
}

/// Index of an operation in its [`History`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId(usize);

impl OpId {
    /// Position in [`History::records`].
    pub fn index(self) -> usize {
        self.0
    }
}

impl fmt::Debug for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// One recorded operation. Times are offsets from the history's start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub id: OpId,
    pub client: ClientId,
    pub key: ItemKey,
    pub op: Op,
    pub invoke: Duration,
    /// When the completion was recorded; required for `Completion::Ok`, ignored otherwise.
    pub ret: Option<Duration>,
    /// `None` while the operation is in flight (and, at check time, means `Unknown`).
    pub completion: Option<Completion>,
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} client {} {} -> ",
            self.id,
            self.client,
            OpText(&self.op)
        )?;
        match &self.completion {
            Some(Completion::Ok(out)) => write!(f, "{}", OutputText(out))?,
            Some(Completion::Fail) => f.write_str("FAIL (not applied)")?,
            Some(Completion::Unknown) => f.write_str("UNKNOWN")?,
            None => f.write_str("never completed (unknown)")?,
        }
        match (&self.completion, self.ret) {
            (Some(Completion::Ok(_)), Some(ret)) => write!(f, "  [{:?} .. {:?}]", self.invoke, ret),
            _ => write!(f, "  [{:?} .. ∞)", self.invoke),
        }
    }
}

/// A shared, append-only log of operations. Clone it into every client; clones share the log.
///
/// Record `invoke` immediately before sending a request and `complete` immediately after its
/// answer arrives, so the recorded window contains the moment the server acted.
#[derive(Clone)]
pub struct History {
    shared: Arc<Shared>,
}

struct Shared {
    start: Instant,
    records: Mutex<Vec<Record>>,
}

impl Default for History {
    fn default() -> History {
        History::new()
    }
}

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("History").field("ops", &self.len()).finish()
    }
}

impl History {
    /// An empty history whose clock starts now.
    pub fn new() -> History {
        History {
            shared: Arc::new(Shared {
                start: Instant::now(),
                records: Mutex::new(Vec::new()),
            }),
        }
    }

    // A client that panicked while recording must not hide every other client's records, so a
    // poisoned lock is used as is: each update below leaves the log consistent.
    fn lock(&self) -> MutexGuard<'_, Vec<Record>> {
        self.shared
            .records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Time since the history started (monotonic).
    pub fn now(&self) -> Duration {
        self.shared.start.elapsed()
    }

    /// Records that `client` is about to send `op` on `key`; returns the id to complete.
    pub fn invoke(&self, client: ClientId, key: ItemKey, op: Op) -> OpId {
        let mut records = self.lock();
        // Read the clock under the lock so records are in invocation order.
        let invoke = self.now();
        let id = OpId(records.len());
        records.push(Record {
            id,
            client,
            key,
            op,
            invoke,
            ret: None,
            completion: None,
        });
        id
    }

    /// Records how `id` ended, at the current time.
    ///
    /// Panics if `id` is not from this history or was already completed: either is a bug in the
    /// test, and silently keeping one of two answers would make the check meaningless.
    pub fn complete(&self, id: OpId, completion: Completion) {
        let problem = {
            let mut records = self.lock();
            let now = self.now();
            match records.get_mut(id.0) {
                None => Some("is not from this history"),
                Some(r) if r.completion.is_some() => Some("was completed twice"),
                Some(r) => {
                    r.ret = Some(now);
                    r.completion = Some(completion);
                    None
                }
            }
        };
        // Panic only after the guard is gone, so other clients can keep recording.
        if let Some(problem) = problem {
            panic!("linearizability::History: operation {id} {problem}");
        }
    }

    /// Records `op`, awaits `call` (the request itself), records how it ended with
    /// [`Completion::from_result`], and hands the result back. No lock is held while `call`
    /// runs. If the returned future is dropped before `call` finishes, the op stays in flight,
    /// which the checker reads as `Unknown`.
    ///
    /// `let resp = history.record(c, key, Op::Get, kv.get(sk, k, false)).await;`
    pub async fn record<T, F>(
        &self,
        client: ClientId,
        key: ItemKey,
        op: Op,
        call: F,
    ) -> Result<T, tonic::Status>
    where
        F: std::future::Future<Output = Result<T, tonic::Status>>,
        for<'a> Output: From<&'a T>,
    {
        let id = self.invoke(client, key, op);
        let result = call.await;
        self.complete(id, Completion::from_result(&result));
        result
    }

    /// Adds an operation with explicit times (for hand-written histories and replays).
    pub fn push(
        &self,
        client: ClientId,
        key: ItemKey,
        op: Op,
        invoke: Duration,
        ret: Option<Duration>,
        completion: Completion,
    ) -> OpId {
        let mut records = self.lock();
        let id = OpId(records.len());
        records.push(Record {
            id,
            client,
            key,
            op,
            invoke,
            ret,
            completion: Some(completion),
        });
        id
    }

    /// A copy of every record so far, in id order.
    pub fn records(&self) -> Vec<Record> {
        self.lock().clone()
    }

    /// Operations recorded so far.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// No operation recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Bounds and assumptions of a check.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// Search steps allowed per item before giving up with [`Verdict::TimedOut`]. Each step is
    /// one visit of a call or return entry; the memo table grows by at most one entry per step,
    /// so this also bounds memory.
    pub max_steps_per_key: u64,
    /// Items that exist when the history starts, as `(value, version)`. Any other item is
    /// assumed absent.
    pub initial: BTreeMap<ItemKey, (Vec<u8>, u64)>,
}

impl Default for CheckOptions {
    fn default() -> CheckOptions {
        CheckOptions {
            max_steps_per_key: 1_000_000,
            initial: BTreeMap::new(),
        }
    }
}

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

/// Checks `history` with the default options.
pub fn check(history: &History) -> CheckResult {
    check_records(&history.records(), &CheckOptions::default())
}

/// Checks `history` with explicit options.
pub fn check_with(history: &History, options: &CheckOptions) -> CheckResult {
    check_records(&history.records(), options)
}

/// Checks a list of records (e.g. from [`History::records`]).
pub fn check_records(records: &[Record], options: &CheckOptions) -> CheckResult {
    check_records_inner(records, options, true)
}

/// `symmetry: false` turns off the reduction over interchangeable unknown ops, so tests can
/// compare against the plain search.
fn check_records_inner(records: &[Record], options: &CheckOptions, symmetry: bool) -> CheckResult {
    let mut by_key: BTreeMap<&ItemKey, Vec<&Record>> = BTreeMap::new();
    for r in records {
        by_key.entry(&r.key).or_default().push(r);
    }
    let keys = by_key
        .into_iter()
        .map(|(key, recs)| check_key(key, &recs, options, symmetry))
        .collect();
    CheckResult { keys }
}

// ---- the model ----------------------------------------------------------------------------
//
// Values are interned per item so that a model state is two integers: cheap to copy, hash and
// compare in the memo table.

type Vid = u32;
/// `None` = absent; `Some((value, version))`.
type State = Option<(Vid, u64)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum MOp {
    Get,
    Put { value: Vid, cond: Option<u64> },
    Delete { cond: Option<u64> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MOut {
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

fn version_of(state: State) -> u64 {
    state.map_or(0, |(_, v)| v)
}

fn cond_holds(state: State, cond: Option<u64>) -> bool {
    match cond {
        None => true,
        Some(0) => state.is_none(),
        Some(v) => version_of(state) == v,
    }
}

/// Applies `op` to `state` if the op could have answered `out` there. An unknown op whose
/// effect would be nothing is refused: linearizing it is the same as leaving it out, and
/// leaving it out is always allowed, so trying it only widens the search.
fn step(state: State, op: MOp, out: MOut) -> Option<State> {
    let cur = version_of(state);
    match op {
        MOp::Get => match out {
            MOut::Get(seen) if seen == state => Some(state),
            _ => None,
        },
        MOp::Put { value, cond } if cond_holds(state, cond) => {
            let next = Some((value, cur + 1));
            match out {
                MOut::Unknown => Some(next),
                MOut::Put {
                    succeeded: true,
                    version,
                } if version == cur + 1 => Some(next),
                _ => None,
            }
        }
        MOp::Put { .. } => match out {
            MOut::Put {
                succeeded: false,
                version,
            } if version == cur => Some(state),
            _ => None,
        },
        MOp::Delete { cond } if cond_holds(state, cond) => match out {
            MOut::Unknown if state.is_some() => Some(None),
            MOut::Delete {
                succeeded: true,
                existed,
                prev,
            } if existed == state.is_some() && prev.is_none_or(|p| p == cur) => Some(None),
            _ => None,
        },
        MOp::Delete { .. } => match out {
            MOut::Delete {
                succeeded: false,
                existed: false,
                prev,
            } if prev.is_none_or(|p| p == cur) => Some(state),
            _ => None,
        },
    }
}

/// Why `step` refused (for reports only; kept apart so the hot path stays small).
fn why_not(state: State, op: MOp, out: MOut, values: &[Vec<u8>]) -> String {
    let st = StateText(state, values);
    let cur = version_of(state);
    match op {
        MOp::Get => format!("it read {} but the item is {st}", OutText(out, values)),
        MOp::Put { cond, .. } | MOp::Delete { cond } => {
            let name = if matches!(op, MOp::Put { .. }) {
                "put"
            } else {
                "delete"
            };
            let holds = cond_holds(state, cond);
            match (holds, out) {
                (true, MOut::Unknown) => {
                    format!("its outcome is unknown and a {name} here would change nothing")
                }
                (false, MOut::Unknown) => format!(
                    "its outcome is unknown and its condition fails against {st}, so it \
                     would change nothing"
                ),
                (true, _) => {
                    let expected = if matches!(op, MOp::Put { .. }) {
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

// ---- per-item search ----------------------------------------------------------------------

/// One operation of one item, in model form.
struct KOp<'a> {
    rec: &'a Record,
    op: MOp,
    out: MOut,
    invoke: Duration,
    /// `None` for unknown outcomes: their return is at +infinity.
    ret: Option<Duration>,
}

/// The value id shared by every unknown-outcome put whose value no read returned. Such values
/// can only ever fail a read's comparison, so they are indistinguishable to the model, and
/// sharing one id lets both the memo table and the symmetry rule in `search` treat those puts
/// as one.
const UNSEEN: Vid = 0;

struct Interner {
    ids: HashMap<Vec<u8>, Vid>,
    values: Vec<Vec<u8>>,
}

impl Interner {
    fn new() -> Interner {
        Interner {
            ids: HashMap::new(),
            // Slot `UNSEEN`; never returned by `id`.
            values: vec![Vec::new()],
        }
    }

    fn id(&mut self, v: &[u8]) -> Vid {
        if let Some(&id) = self.ids.get(v) {
            return id;
        }
        let id = self.values.len() as Vid;
        self.ids.insert(v.to_vec(), id);
        self.values.push(v.to_vec());
        id
    }
}

fn check_key(key: &ItemKey, recs: &[&Record], options: &CheckOptions, symmetry: bool) -> KeyReport {
    let mut interner = Interner::new();
    let observed: HashSet<&[u8]> = recs
        .iter()
        .filter(|r| r.op == Op::Get)
        .filter_map(|r| match &r.completion {
            Some(Completion::Ok(Output::Get {
                found: true, value, ..
            })) => Some(value.as_slice()),
            _ => None,
        })
        .collect();
    let initial: State = options
        .initial
        .get(key)
        .map(|(v, ver)| (interner.id(v), *ver));
    let mut ops = Vec::with_capacity(recs.len());
    for &rec in recs {
        let (out, ret) = match &rec.completion {
            Some(Completion::Fail) => continue,
            Some(Completion::Ok(out)) => {
                let Some(ret) = rec.ret else {
                    return invalid(key, format!("{rec}: completed Ok without a return time"));
                };
                if ret < rec.invoke {
                    return invalid(key, format!("{rec}: returns before it is invoked"));
                }
                let out = match (&rec.op, out) {
                    (
                        Op::Get,
                        Output::Get {
                            found,
                            value,
                            version,
                        },
                    ) => MOut::Get(found.then(|| (interner.id(value), *version))),
                    (Op::Put { .. }, Output::Put { succeeded, version }) => MOut::Put {
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
                    ) => MOut::Delete {
                        succeeded: *succeeded,
                        existed: *existed,
                        prev: *prev_version,
                    },
                    _ => {
                        return invalid(
                            key,
                            format!("{rec}: the output does not fit the operation"),
                        )
                    }
                };
                (out, Some(ret))
            }
            Some(Completion::Unknown) | None => {
                // A read whose answer nobody saw constrains nothing.
                if rec.op == Op::Get {
                    continue;
                }
                (MOut::Unknown, None)
            }
        };
        let op = match &rec.op {
            Op::Get => MOp::Get,
            Op::Put { value, if_version } => MOp::Put {
                value: if out == MOut::Unknown && !observed.contains(value.as_slice()) {
                    UNSEEN
                } else {
                    interner.id(value)
                },
                cond: *if_version,
            },
            Op::Delete { if_version } => MOp::Delete { cond: *if_version },
        };
        ops.push(KOp {
            rec,
            op,
            out,
            invoke: rec.invoke,
            ret,
        });
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
fn event_order(ops: &[KOp]) -> Vec<(Duration, u8, usize)> {
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
fn search(ops: &[KOp], initial: State, budget: u64, symmetry: bool) -> (Outcome, u64) {
    let events = event_order(ops);
    let nodes = events.len() + 1;
    let mut next: Vec<usize> = (1..=nodes)
        .map(|n| if n == nodes { NIL } else { n })
        .collect();
    let mut prev: Vec<usize> = (0..nodes).map(|n| n.wrapping_sub(1)).collect();
    let mut is_call = vec![false; nodes];
    let mut op_of = vec![0usize; nodes];
    let mut ret_node = vec![NIL; ops.len()];
    for (k, &(_, kind, i)) in events.iter().enumerate() {
        is_call[k + 1] = kind == 0;
        op_of[k + 1] = i;
        if kind == 1 {
            ret_node[i] = k + 1;
        }
    }

    fn unlink(next: &mut [usize], prev: &mut [usize], n: usize) {
        next[prev[n]] = next[n];
        if next[n] != NIL {
            prev[next[n]] = prev[n];
        }
    }
    fn relink(next: &mut [usize], prev: &mut [usize], n: usize) {
        next[prev[n]] = n;
        if next[n] != NIL {
            prev[next[n]] = n;
        }
    }

    // For each unknown op, the previous unknown op of its class in list order.
    let mut class_prev = vec![NIL; ops.len()];
    let mut class_last: HashMap<MOp, usize> = HashMap::new();
    for &(_, kind, i) in &events {
        if symmetry && kind == 0 && ops[i].ret.is_none() {
            if let Some(p) = class_last.insert(ops[i].op, i) {
                class_prev[i] = p;
            }
        }
    }

    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut memo: HashSet<(Box<[u64]>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut best: Vec<usize> = Vec::new();
    let mut remaining_ok = ops.iter().filter(|o| o.ret.is_some()).count();
    let mut state = initial;
    let mut entry = next[0];
    let mut steps = 0u64;

    loop {
        if remaining_ok == 0 {
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
            return (Outcome::Violation(best), steps);
        }
        if is_call[entry] {
            let i = op_of[entry];
            let p = class_prev[i];
            if p != NIL && linearized[p / 64] & (1 << (p % 64)) == 0 {
                // Not its class's turn (see above).
                entry = next[entry];
                continue;
            }
            if let Some(new_state) = step(state, ops[i].op, ops[i].out) {
                linearized[i / 64] |= 1 << (i % 64);
                // Same set of placed ops and same state = same future: explored already.
                if memo.insert((linearized.clone().into_boxed_slice(), new_state)) {
                    stack.push((entry, state));
                    state = new_state;
                    unlink(&mut next, &mut prev, entry);
                    if ret_node[i] != NIL {
                        unlink(&mut next, &mut prev, ret_node[i]);
                        remaining_ok -= 1;
                    }
                    if stack.len() > best.len() {
                        best = stack.iter().map(|&(n, _)| op_of[n]).collect();
                    }
                    entry = next[0];
                    continue;
                }
                linearized[i / 64] &= !(1 << (i % 64));
            }
            entry = next[entry];
        } else {
            // An op returned before it could be placed: undo the last choice and try the next.
            let Some((call, old_state)) = stack.pop() else {
                return (Outcome::Violation(best), steps);
            };
            let i = op_of[call];
            state = old_state;
            linearized[i / 64] &= !(1 << (i % 64));
            if ret_node[i] != NIL {
                relink(&mut next, &mut prev, ret_node[i]);
                remaining_ok += 1;
            }
            relink(&mut next, &mut prev, call);
            entry = next[call];
        }
    }
}

/// How many prefix entries and candidates a report shows: enough to see the conflict, short
/// enough to read in a test failure.
const REPORT_TAIL: usize = 8;
const REPORT_CANDIDATES: usize = 10;

fn explain(ops: &[KOp], initial: State, best: &[usize], interner: &Interner) -> Violation {
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
struct Bytes<'a>(&'a [u8]);

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

struct OpText<'a>(&'a Op);

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

struct OutputText<'a>(&'a Output);

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

struct StateText<'a>(State, &'a [Vec<u8>]);

impl fmt::Display for StateText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("absent"),
            Some((UNSEEN, ver)) => write!(f, "<a value no read returned> v{ver}"),
            Some((v, ver)) => write!(f, "{} v{ver}", Bytes(&self.1[v as usize])),
        }
    }
}

struct OutText<'a>(MOut, &'a [Vec<u8>]);

impl fmt::Display for OutText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            MOut::Unknown => f.write_str("unknown"),
            MOut::Get(s) => {
                if s.is_none() {
                    f.write_str("not found")
                } else {
                    StateText(s, self.1).fmt(f)
                }
            }
            MOut::Put { succeeded, version } => {
                OutputText(&Output::Put { succeeded, version }).fmt(f)
            }
            MOut::Delete {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // ---- helpers for hand-written histories ----

    fn item() -> ItemKey {
        ItemKey::new("order-1", "payment")
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn put(v: &str, if_version: Option<u64>) -> Op {
        Op::Put {
            value: v.as_bytes().to_vec(),
            if_version,
        }
    }

    fn del(if_version: Option<u64>) -> Op {
        Op::Delete { if_version }
    }

    fn put_ok(version: u64) -> Completion {
        Completion::Ok(Output::Put {
            succeeded: true,
            version,
        })
    }

    fn put_failed(current: u64) -> Completion {
        Completion::Ok(Output::Put {
            succeeded: false,
            version: current,
        })
    }

    fn found(v: &str, version: u64) -> Completion {
        Completion::Ok(Output::found(v, version))
    }

    fn absent() -> Completion {
        Completion::Ok(Output::absent())
    }

    fn del_ok(existed: bool, prev: u64) -> Completion {
        Completion::Ok(Output::Delete {
            succeeded: true,
            existed,
            prev_version: Some(prev),
        })
    }

    /// Adds an op on `item()` from `client` over [a, b] ms; `b` is ignored for non-Ok outcomes.
    fn at(h: &History, client: ClientId, op: Op, a: u64, b: u64, c: Completion) -> OpId {
        let ret = matches!(c, Completion::Ok(_)).then(|| ms(b));
        h.push(client, item(), op, ms(a), ret, c)
    }

    fn assert_ok(h: &History) {
        check(h).assert_linearizable();
    }

    /// Asserts a violation on `item()` and returns it (printing the report, which is what a
    /// failing test would show).
    fn assert_violation(h: &History) -> Violation {
        let r = check(h);
        eprintln!("{r}");
        assert_eq!(r.overall(), Overall::NotLinearizable, "{r}");
        let bad = r.violations();
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].key, item());
        match &bad[0].verdict {
            Verdict::Violation(v) => v.clone(),
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    // ---- linearizable histories ----

    #[test]
    fn empty_history_is_linearizable() {
        assert_ok(&History::new());
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = History::new();
        at(&h, 1, put("a", None), 0, 1, put_ok(1));
        at(&h, 1, Op::Get, 2, 3, found("a", 1));
        at(&h, 1, put("b", Some(1)), 4, 5, put_ok(2));
        at(&h, 1, put("c", Some(1)), 6, 7, put_failed(2));
        at(&h, 1, Op::Get, 8, 9, found("b", 2));
        at(&h, 1, del(None), 10, 11, del_ok(true, 2));
        at(&h, 1, Op::Get, 12, 13, absent());
        // An unconditional delete of an absent item succeeds and removes nothing.
        at(&h, 1, del(None), 14, 15, del_ok(false, 0));
        at(&h, 1, del(Some(3)), 16, 17, {
            Completion::Ok(Output::Delete {
                succeeded: false,
                existed: false,
                prev_version: Some(0),
            })
        });
        assert_ok(&h);
    }

    #[test]
    fn overlapping_writes_with_reads_seeing_either() {
        // Both puts overlap every read; their versions say b went first.
        let h = History::new();
        at(&h, 1, put("a", None), 0, 10, put_ok(2));
        at(&h, 2, put("b", None), 0, 10, put_ok(1));
        at(&h, 3, Op::Get, 1, 9, found("b", 1));
        at(&h, 4, Op::Get, 2, 9, found("a", 2));
        at(&h, 3, Op::Get, 11, 12, found("a", 2));
        assert_ok(&h);

        // Reads overlapping both writes may see nothing, the first, or the second.
        let h = History::new();
        at(&h, 1, put("a", None), 0, 10, put_ok(1));
        at(&h, 2, put("b", None), 1, 10, put_ok(2));
        at(&h, 3, Op::Get, 2, 5, absent());
        at(&h, 4, Op::Get, 3, 9, found("a", 1));
        at(&h, 5, Op::Get, 4, 9, found("b", 2));
        assert_ok(&h);
    }

    #[test]
    fn cas_chain_is_linearizable() {
        let h = History::new();
        at(&h, 1, put("a", Some(0)), 0, 1, put_ok(1));
        // Three racing CAS on version 1: exactly one wins, the others see version 2.
        at(&h, 1, put("x", Some(1)), 2, 6, put_ok(2));
        at(&h, 2, put("y", Some(1)), 2, 6, put_failed(2));
        at(&h, 3, put("z", Some(1)), 3, 7, put_failed(2));
        // A CAS on a wrong version that ran before the winner saw version 1.
        at(&h, 4, put("q", Some(5)), 2, 7, put_failed(1));
        // "Must not exist" fails against an existing item.
        at(&h, 4, put("n", Some(0)), 8, 9, put_failed(2));
        at(&h, 1, put("w", Some(2)), 8, 9, put_ok(3));
        at(&h, 2, Op::Get, 10, 11, found("w", 3));
        assert_ok(&h);
    }

    #[test]
    fn unknown_write_that_took_effect() {
        let h = History::new();
        at(&h, 1, put("a", None), 0, 1, put_ok(1));
        at(&h, 2, put("b", None), 2, 0, Completion::Unknown);
        at(&h, 3, Op::Get, 5, 6, found("b", 2));
        at(&h, 3, Op::Get, 7, 8, found("b", 2));
        assert_ok(&h);
    }

    #[test]
    fn unknown_write_that_did_not_take_effect() {
        let h = History::new();
        at(&h, 1, put("a", None), 0, 1, put_ok(1));
        at(&h, 2, put("b", None), 2, 0, Completion::Unknown);
        at(&h, 3, Op::Get, 5, 6, found("a", 1));
        at(&h, 3, Op::Get, 20, 21, found("a", 1));
        assert_ok(&h);
    }

    #[test]
    fn unknown_write_may_take_effect_long_after_its_timeout() {
        let h = History::new();
        at(&h, 1, put("a", None), 0, 1, put_ok(1));
        at(&h, 2, put("b", None), 2, 0, Completion::Unknown);
        at(&h, 3, Op::Get, 5, 6, found("a", 1));
        at(&h, 3, put("c", Some(1)), 7, 8, put_ok(2));
        at(&h, 3, Op::Get, 100, 101, found("b", 3));
        assert_ok(&h);
    }

    #[test]
    fn search_backtracks_over_unknown_writes() {
        // Placing b first (it comes first in the list) must be undone: c went first.
        let h = History::new();
        at(&h, 1, put("a", None), 0, 1, put_ok(1));
        at(&h, 2, put("b", None), 2, 0, Completion::Unknown);
        at(&h, 3, put("c", None), 3, 0, Completion::Unknown);
        at(&h, 4, Op::Get, 10, 11, found("c", 2));
        at(&h, 4, Op::Get, 12, 13, found("b", 3));
        assert_ok(&h);
    }

    #[test]
    fn many_timed_out_writes_stay_cheap() {
        // Forty writes of unknown outcome: which ones happened is irrelevant when nobody read
        // their values, only how many. Without the symmetry rule this is 2^40 subsets.
        let h = History::new();
        for c in 0..40 {
            at(
                &h,
                c,
                put(&format!("lost{c}"), None),
                c,
                0,
                Completion::Unknown,
            );
        }
        at(&h, 50, put("seen", None), 0, 100, Completion::Unknown);
        at(&h, 51, Op::Get, 60, 61, found("seen", 17));
        at(&h, 51, put("x", Some(17)), 62, 63, put_ok(18));
        at(&h, 51, Op::Get, 70, 71, {
            Completion::Ok(Output::Get {
                found: true,
                value: b"x".to_vec(),
                version: 18,
            })
        });
        let r = check(&h);
        assert!(r.is_linearizable(), "{r}");
        assert!(r.keys[0].steps < 100_000, "{} steps", r.keys[0].steps);

        // And a refutation over the same writes is found, not timed out: a read of a version
        // no number of writes can reach.
        at(&h, 51, Op::Get, 200, 201, found("x", 60));
        let r = check(&h);
        eprintln!("{r}");
        assert_eq!(r.overall(), Overall::NotLinearizable, "{r}");
    }

    #[test]
    fn delete_then_recreate_starts_at_version_one() {
        let h = History::new();
        at(&h, 1, put("a", None), 0, 1, put_ok(1));
        at(&h, 1, put("b", None), 2, 3, put_ok(2));
        at(&h, 2, del(Some(2)), 4, 5, del_ok(true, 2));
        at(&h, 3, Op::Get, 6, 7, absent());
        at(&h, 1, put("c", Some(0)), 8, 9, put_ok(1));
        at(&h, 3, Op::Get, 10, 11, found("c", 1));
        at(&h, 2, put("d", Some(1)), 12, 13, put_ok(2));
        assert_ok(&h);
    }

    #[test]
    fn failed_ops_are_ignored() {
        let h = History::new();
        at(&h, 1, put("a", None), 0, 1, Completion::Fail);
        at(&h, 2, Op::Get, 2, 3, absent());
        at(&h, 2, Op::Get, 4, 0, Completion::Unknown);
        assert_ok(&h);
    }

    #[test]
    fn touching_windows_count_as_concurrent() {
        // The read is invoked at the instant the write returns: either order is allowed.
        let h = History::new();
        at(&h, 1, put("a", None), 0, 5, put_ok(1));
        at(&h, 2, Op::Get, 5, 6, absent());
        assert_ok(&h);
    }

    #[test]
    fn initial_state_is_respected() {
        let h = History::new();
        at(&h, 1, put("b", Some(5)), 0, 1, put_ok(6));
        assert_eq!(check(&h).overall(), Overall::NotLinearizable);
        let mut options = CheckOptions::default();
        options.initial.insert(item(), (b"a".to_vec(), 5));
        assert!(check_with(&h, &options).is_linearizable());
    }

    #[test]
    fn recorder_with_real_clock_and_a_pending_op() {
        let h = History::new();
        let k = item();
        let a = h.invoke(1, k.clone(), put("a", None));
        h.complete(a, put_ok(1));
        // Invoked, never completed (say the task was cancelled): it counts as unknown.
        let _b = h.invoke(2, k.clone(), put("b", None));
        let c = h.invoke(3, k.clone(), Op::Get);
        h.complete(c, found("b", 2));
        assert_ok(&h);
        let d = h.invoke(3, k, Op::Get);
        h.complete(d, found("zzz", 2));
        assert_eq!(check(&h).overall(), Overall::NotLinearizable);
        let records = h.records();
        assert!(records.windows(2).all(|w| w[0].invoke <= w[1].invoke));
    }

    #[test]
    fn async_recording_maps_answers_and_errors() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let h = History::new();
        rt.block_on(async {
            let ok = h
                .record(1, item(), put("a", None), async {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    Ok(PutResponse {
                        succeeded: true,
                        version: 1,
                    })
                })
                .await;
            assert!(ok.is_ok());
            let refused: Result<PutResponse, _> = h
                .record(1, item(), put("b", None), async {
                    Err(tonic::Status::invalid_argument("value too large"))
                })
                .await;
            assert!(refused.is_err());
            let lost: Result<DeleteResponse, _> = h
                .record(1, item(), del(None), async {
                    Err(tonic::Status::unavailable("connection reset"))
                })
                .await;
            assert!(lost.is_err());
            let _ = h
                .record(2, item(), Op::Get, async {
                    Ok(GetResponse {
                        found: true,
                        value: b"a".to_vec().into(),
                        version: 1,
                    })
                })
                .await;
        });
        let completions: Vec<_> = h.records().into_iter().map(|r| r.completion).collect();
        assert_eq!(
            completions,
            vec![
                Some(put_ok(1)),
                Some(Completion::Fail),
                Some(Completion::Unknown),
                Some(found("a", 1)),
            ]
        );
        assert_ok(&h);
    }

    #[test]
    #[should_panic(expected = "completed twice")]
    fn completing_twice_is_a_test_bug() {
        let h = History::new();
        let a = h.invoke(1, item(), Op::Get);
        h.complete(a, absent());
        h.complete(a, absent());
    }

    // ---- non-linearizable histories ----

    #[test]
    fn stale_read_is_a_violation() {
        let h = History::new();
        at(&h, 1, put("a", None), 0, 1, put_ok(1));
        at(&h, 1, put("b", None), 2, 3, put_ok(2));
        let read = at(&h, 2, Op::Get, 4, 5, found("a", 1));
        let v = assert_violation(&h);
        assert_eq!(v.stuck_at, Some(read));
        assert_eq!(v.longest_prefix.len(), 2);
        assert!(v.explanation.contains("#2"), "{}", v.explanation);
        assert!(v.explanation.contains("it read"), "{}", v.explanation);
    }

    #[test]
    fn lost_update_is_a_violation() {
        let h = History::new();
        at(&h, 1, put("a", Some(0)), 0, 1, put_ok(1));
        at(&h, 1, put("b", Some(1)), 2, 5, put_ok(2));
        at(&h, 2, put("c", Some(1)), 3, 6, put_ok(2));
        assert_violation(&h);
    }

    #[test]
    fn read_of_a_failed_write_is_a_violation() {
        let h = History::new();
        at(&h, 1, put("a", None), 0, 1, put_ok(1));
        at(&h, 1, put("b", None), 2, 3, Completion::Fail);
        at(&h, 2, Op::Get, 4, 5, found("b", 2));
        assert_violation(&h);
    }

    #[test]
    fn version_going_backwards_is_a_violation() {
        let h = History::new();
        at(&h, 1, put("a", None), 0, 1, put_ok(1));
        at(&h, 1, put("b", None), 2, 10, put_ok(2));
        at(&h, 2, Op::Get, 3, 4, found("b", 2));
        at(&h, 2, Op::Get, 5, 6, found("a", 1));
        assert_violation(&h);
    }

    #[test]
    fn read_of_a_value_never_written_is_a_violation() {
        let h = History::new();
        at(&h, 1, put("a", None), 0, 1, put_ok(1));
        at(&h, 2, Op::Get, 2, 3, found("zzz", 1));
        assert_violation(&h);
    }

    #[test]
    fn wrong_write_answers_are_violations() {
        // An unconditional put cannot fail.
        let h = History::new();
        at(&h, 1, put("a", None), 0, 1, put_failed(0));
        assert_violation(&h);
        // Versions go up by one.
        let h = History::new();
        at(&h, 1, put("a", None), 0, 1, put_ok(1));
        at(&h, 1, put("b", None), 2, 3, put_ok(3));
        assert_violation(&h);
        // A delete of an absent item removed nothing.
        let h = History::new();
        at(&h, 1, del(None), 0, 1, del_ok(true, 0));
        assert_violation(&h);
        // Recreation after a delete starts again at 1.
        let h = History::new();
        at(&h, 1, put("a", None), 0, 1, put_ok(1));
        at(&h, 1, del(None), 2, 3, del_ok(true, 1));
        at(&h, 1, put("b", None), 4, 5, put_ok(2));
        assert_violation(&h);
    }

    #[test]
    fn unknown_write_cannot_explain_a_read_before_it() {
        let h = History::new();
        at(&h, 1, Op::Get, 0, 1, found("b", 1));
        at(&h, 2, put("b", None), 2, 0, Completion::Unknown);
        assert_violation(&h);
    }

    #[test]
    fn violation_is_reported_for_its_item_only() {
        let h = History::new();
        let other = ItemKey::new("order-2", "");
        h.push(
            1,
            other.clone(),
            put("x", None),
            ms(0),
            Some(ms(1)),
            put_ok(1),
        );
        h.push(1, other.clone(), Op::Get, ms(2), Some(ms(3)), found("x", 1));
        at(&h, 1, put("a", None), 0, 1, put_ok(1));
        at(&h, 2, Op::Get, 2, 3, absent());
        let r = check(&h);
        assert_eq!(r.keys.len(), 2);
        let bad = r.violations();
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].key, item());
        let text = r.to_string();
        assert!(text.contains("\"order-1\""), "{text}");
        assert!(!text.contains("\"order-2\""), "{text}");
    }

    #[test]
    fn malformed_history_is_reported() {
        let h = History::new();
        at(&h, 1, Op::Get, 0, 1, put_ok(1));
        let r = check(&h);
        assert!(matches!(r.keys[0].verdict, Verdict::Invalid(_)), "{r}");
        assert_eq!(r.overall(), Overall::NotLinearizable);
    }

    #[test]
    fn exhausted_budget_is_undecided_not_a_violation() {
        let h = History::new();
        for c in 0..10 {
            at(&h, c, put(&format!("v{c}"), None), 0, 100, put_ok(c + 1));
        }
        let options = CheckOptions {
            max_steps_per_key: 3,
            ..CheckOptions::default()
        };
        let r = check_with(&h, &options);
        assert_eq!(r.overall(), Overall::Unknown, "{r}");
        assert_eq!(r.timed_out(), vec![&item()]);
        r.assert_no_violation();
        assert!(check(&h).is_linearizable());
    }

    // ---- generated histories ----

    /// A reference model written independently of `step`, so a shared misunderstanding of
    /// the semantics does not make generator and checker agree by accident.
    fn apply(store: &mut BTreeMap<ItemKey, (Vec<u8>, u64)>, key: &ItemKey, op: &Op) -> Output {
        let cur = store.get(key).cloned();
        let cur_version = cur.as_ref().map_or(0, |c| c.1);
        let holds = |c: &Option<u64>| match *c {
            None => true,
            Some(0) => cur.is_none(),
            Some(v) => cur_version == v,
        };
        match op {
            Op::Get => match cur {
                Some((value, version)) => Output::found(value, version),
                None => Output::absent(),
            },
            Op::Put { value, if_version } if holds(if_version) => {
                store.insert(key.clone(), (value.clone(), cur_version + 1));
                Output::Put {
                    succeeded: true,
                    version: cur_version + 1,
                }
            }
            Op::Put { .. } => Output::Put {
                succeeded: false,
                version: cur_version,
            },
            Op::Delete { if_version } if holds(if_version) => {
                store.remove(key);
                Output::Delete {
                    succeeded: true,
                    existed: cur.is_some(),
                    prev_version: Some(cur_version),
                }
            }
            Op::Delete { .. } => Output::Delete {
                succeeded: false,
                existed: false,
                prev_version: Some(cur_version),
            },
        }
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Fate {
        Ok,
        UnknownApplied,
        UnknownLost,
        Fail,
    }

    /// One generated client operation: what it is, and its timing relative to the client's
    /// previous operation.
    #[derive(Clone, Debug)]
    struct Spec {
        client: u64,
        key: u8,
        /// 0..8 get, 8..17 put, 17..20 delete.
        kind: u8,
        /// 0 unconditional, 1 must-not-exist, 2 the version current at execution, 3 `ver`.
        cond: u8,
        ver: u64,
        value: u8,
        gap: u64,
        exec: u64,
        ret: u64,
        fate: Fate,
    }

    fn spec(clients: u64, keys: u8) -> impl Strategy<Value = Spec> {
        (
            0..clients,
            0..keys,
            0u8..20,
            0u8..4,
            0u64..5,
            0u8..6,
            1u64..20,
            0u64..30,
            0u64..30,
            0u8..20,
        )
            .prop_map(
                |(client, key, kind, cond, ver, value, gap, exec, ret, fate)| Spec {
                    client,
                    key,
                    kind,
                    cond,
                    ver,
                    value,
                    gap,
                    exec,
                    ret,
                    fate: match fate {
                        0..=15 => Fate::Ok,
                        16 => Fate::UnknownApplied,
                        17 | 18 => Fate::UnknownLost,
                        _ => Fate::Fail,
                    },
                },
            )
    }

    fn gen_key(k: u8) -> ItemKey {
        ItemKey::new(format!("order-{k}"), "")
    }

    /// Builds a history in which every applied op takes effect atomically at one instant inside
    /// its window (for unknown ops: any instant after invocation, possibly after the client has
    /// moved on), by running the reference model in order of those instants.
    fn simulate(specs: &[Spec]) -> History {
        let clients = specs.iter().map(|s| s.client).max().map_or(0, |c| c + 1);
        let mut cursor = vec![0u64; clients as usize];
        // (invoke, effect instant, return)
        let mut times = Vec::with_capacity(specs.len());
        for s in specs {
            let c = s.client as usize;
            let invoke = cursor[c] + s.gap;
            let (effect, ret) = match s.fate {
                Fate::Ok => (invoke + s.exec, Some(invoke + s.exec + s.ret)),
                // The client gives up at `invoke + ret`, the server may act much later.
                Fate::UnknownApplied | Fate::UnknownLost => (invoke + s.exec * 3, None),
                Fate::Fail => (invoke, None),
            };
            cursor[c] = ret.unwrap_or(invoke + s.ret);
            times.push((invoke, effect, ret));
        }
        let mut order: Vec<usize> = (0..specs.len())
            .filter(|&i| matches!(specs[i].fate, Fate::Ok | Fate::UnknownApplied))
            .collect();
        order.sort_by_key(|&i| (times[i].1, i));

        let mut store = BTreeMap::new();
        let mut ops: Vec<Option<Op>> = vec![None; specs.len()];
        let mut outs: Vec<Option<Output>> = vec![None; specs.len()];
        let op_for = |s: &Spec, current: u64| {
            let if_version = match s.cond {
                0 => None,
                1 => Some(0),
                2 => Some(current),
                _ => Some(s.ver),
            };
            match s.kind {
                0..=7 => Op::Get,
                8..=16 => Op::Put {
                    value: format!("v{}", s.value).into_bytes(),
                    if_version,
                },
                _ => Op::Delete { if_version },
            }
        };
        for i in order {
            let key = gen_key(specs[i].key);
            // "Current" is what a client that had just read the item would send.
            let current = store.get(&key).map_or(0, |c: &(Vec<u8>, u64)| c.1);
            let op = op_for(&specs[i], current);
            outs[i] = Some(apply(&mut store, &key, &op));
            ops[i] = Some(op);
        }

        let h = History::new();
        for (i, s) in specs.iter().enumerate() {
            let op = ops[i].take().unwrap_or_else(|| op_for(s, s.ver));
            let (invoke, _, ret) = times[i];
            let completion = match s.fate {
                Fate::Ok => Completion::Ok(outs[i].take().expect("applied op has an output")),
                Fate::UnknownApplied | Fate::UnknownLost => Completion::Unknown,
                Fate::Fail => Completion::Fail,
            };
            h.push(
                s.client,
                gen_key(s.key),
                op,
                Duration::from_micros(invoke),
                ret.map(Duration::from_micros),
                completion,
            );
        }
        h
    }

    /// Indexes of completed reads.
    fn ok_reads(records: &[Record]) -> Vec<usize> {
        records
            .iter()
            .enumerate()
            .filter(|(_, r)| r.op == Op::Get && matches!(r.completion, Some(Completion::Ok(_))))
            .map(|(i, _)| i)
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn generated_histories_are_linearizable(
            specs in proptest::collection::vec(spec(4, 2), 1..40),
        ) {
            let r = check(&simulate(&specs));
            prop_assert!(r.is_linearizable(), "{}", r);
        }

        /// A read answering a version the item never reached cannot be linearized, however
        /// the ops overlap.
        #[test]
        fn read_of_an_impossible_version_is_found(
            specs in proptest::collection::vec(spec(4, 2), 1..40),
            pick in any::<prop::sample::Index>(),
        ) {
            let mut records = simulate(&specs).records();
            let reads = ok_reads(&records);
            prop_assume!(!reads.is_empty());
            let r = &mut records[reads[pick.index(reads.len())]];
            r.completion = Some(Completion::Ok(Output::found("v0", 1_000_000)));
            let result = check_records(&records, &CheckOptions::default());
            prop_assert_eq!(result.overall(), Overall::NotLinearizable, "{}", result);
        }

        /// Without concurrency or unknown outcomes there is exactly one linearization, so any
        /// changed read answer must be caught.
        #[test]
        fn any_wrong_read_in_a_sequential_history_is_found(
            specs in proptest::collection::vec(spec(1, 2), 1..40),
            pick in any::<prop::sample::Index>(),
            how in 0u8..3,
        ) {
            let specs: Vec<Spec> = specs
                .into_iter()
                .map(|s| Spec {
                    fate: if s.fate == Fate::Fail { Fate::Fail } else { Fate::Ok },
                    ..s
                })
                .collect();
            let mut records = simulate(&specs).records();
            let reads = ok_reads(&records);
            prop_assume!(!reads.is_empty());
            let r = &mut records[reads[pick.index(reads.len())]];
            let Some(Completion::Ok(Output::Get { found, value, version })) = r.completion.clone()
            else {
                unreachable!()
            };
            let wrong = match (how, found) {
                (_, false) => Output::found("v1", 1),
                (0, true) => Output::absent(),
                (1, true) => Output::found(value, version + 1),
                _ => Output::found("never written", version),
            };
            r.completion = Some(Completion::Ok(wrong));
            let result = check_records(&records, &CheckOptions::default());
            prop_assert_eq!(result.overall(), Overall::NotLinearizable, "{}", result);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 150, ..ProptestConfig::default() })]

        /// The symmetry reduction over unknown ops never changes a verdict: compare it with the
        /// plain search on histories full of unknown outcomes, with and without a read answer
        /// replaced by a plausible but possibly wrong one.
        #[test]
        fn symmetry_reduction_agrees_with_plain_search(
            specs in proptest::collection::vec(spec(4, 1), 1..24),
            fates in proptest::collection::vec(0u8..5, 24),
            mutate in proptest::option::of((any::<prop::sample::Index>(), 0u8..6, 1u64..6)),
        ) {
            let specs: Vec<Spec> = specs
                .into_iter()
                .zip(fates)
                .map(|(s, f)| Spec {
                    fate: match f {
                        0 => Fate::UnknownApplied,
                        1 => Fate::UnknownLost,
                        _ => s.fate,
                    },
                    ..s
                })
                .collect();
            let mut records = simulate(&specs).records();
            let reads = ok_reads(&records);
            if let (Some((pick, value, version)), false) = (mutate, reads.is_empty()) {
                let r = &mut records[reads[pick.index(reads.len())]];
                r.completion = Some(Completion::Ok(Output::found(format!("v{value}"), version)));
            }
            let options = CheckOptions::default();
            let fast = check_records_inner(&records, &options, true);
            let plain = check_records_inner(&records, &options, false);
            prop_assume!(plain.overall() != Overall::Unknown);
            prop_assert_eq!(fast.overall(), plain.overall(), "reduced:\n{}\nplain:\n{}", fast, plain);
        }
    }

    /// A small deterministic PRNG (xorshift64*) so the large tests are reproducible without
    /// another dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
    }

    #[test]
    fn hundreds_of_heavily_concurrent_ops_get_a_verdict() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let specs: Vec<Spec> = (0..600)
            .map(|_| Spec {
                client: rng.below(10),
                key: rng.below(3) as u8,
                kind: rng.below(20) as u8,
                cond: rng.below(4) as u8,
                ver: rng.below(6),
                value: rng.below(4) as u8,
                gap: 1 + rng.below(3),
                // Long windows against short gaps: most ops overlap several others.
                exec: rng.below(200),
                ret: rng.below(200),
                fate: match rng.below(40) {
                    0 => Fate::UnknownApplied,
                    1 => Fate::UnknownLost,
                    2 => Fate::Fail,
                    _ => Fate::Ok,
                },
            })
            .collect();
        let r = check(&simulate(&specs));
        eprintln!("{r}");
        for k in &r.keys {
            eprintln!("{}: {} ops, {} steps", k.key, k.ops, k.steps);
        }
        r.assert_no_violation();
    }

    #[test]
    fn threads_sharing_a_history_against_a_locked_store() {
        let history = History::new();
        let store = Arc::new(Mutex::new(BTreeMap::new()));
        let keys: Vec<ItemKey> = (0..3).map(gen_key).collect();
        std::thread::scope(|scope| {
            for client in 0..8u64 {
                let history = history.clone();
                let store = Arc::clone(&store);
                let keys = &keys;
                scope.spawn(move || {
                    let mut rng = Rng(client * 7919 + 1);
                    for n in 0..80u64 {
                        let key = keys[rng.below(3) as usize].clone();
                        let if_version = match rng.below(3) {
                            0 => None,
                            _ => Some(rng.below(4)),
                        };
                        let op = match rng.below(5) {
                            0 | 1 => Op::Get,
                            2 | 3 => Op::Put {
                                value: format!("c{client}-{n}").into_bytes(),
                                if_version,
                            },
                            _ => Op::Delete { if_version },
                        };
                        let id = history.invoke(client, key.clone(), op.clone());
                        let fate = rng.below(30);
                        let out = if fate == 0 {
                            None
                        } else {
                            Some(apply(&mut store.lock().unwrap(), &key, &op))
                        };
                        let completion = match (fate, out) {
                            (_, None) => Completion::Fail,
                            // Applied, but the client lost the answer.
                            (1, Some(_)) => Completion::Unknown,
                            (_, Some(out)) => Completion::Ok(out),
                        };
                        history.complete(id, completion);
                    }
                });
            }
        });
        assert_eq!(history.len(), 8 * 80);
        check(&history).assert_linearizable();
    }
}
