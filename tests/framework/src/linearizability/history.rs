//! What a test records: operations on items, how they ended, and when, in a shared [`History`].

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ordo_proto::v1::{DeleteResponse, GetResponse, PutResponse};

use super::report::{Bytes, OpText, OutputText};

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
    /// The wall clock (ms since the Unix epoch) at `start`, to set recorded times beside the
    /// cluster's commit and resolved times (the feed checker).
    start_unix_ms: u64,
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
                start_unix_ms: ordo_proto::unix_ms(),
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

    /// A time of this history's clock as wall-clock ms since the Unix epoch (the clock Ordo
    /// stamps `commit_ts_ms` and `resolved_ts_ms` with; the tests' processes share a machine).
    pub fn unix_ms(&self, at: Duration) -> u64 {
        self.shared.start_unix_ms + at.as_millis() as u64
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
