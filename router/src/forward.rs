//! The routing loop: send a request to the leader of its group, and handle routing trouble (not
//! leader, wrong shard, dead replica, moving slot, locked item) with bounded retries, as the crate
//! documentation describes.
//!
//! [`forward`] is the loop; each turn is three named steps over the request's [`Attempts`]:
//! [`Attempts::attempt`] sends once (or ends the request), [`Attempts::next_step`] turns the
//! failure into the delay its [`Action`] calls for (or the final answer), and [`Attempts::pause`]
//! gives up when attempts or time are spent, else waits out the delay.
//!
//! What a locked item means is the caller's [`LockPolicy`]. The loop itself knows nothing of
//! transactions: `locks.rs` resolves locks, and calls this loop only with [`FailOnLock`], so a
//! lock resolution never meets a lock it would have to resolve (no recursion).

use std::future::Future;
use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use ordo_proto::v1::kv_client::KvClient;
use ordo_proto::v1::participant_client::ParticipantClient;
use ordo_proto::v1::{
    error_detail, DecideRequest, DeleteRequest, ErrorDetail, FinishRequest, ForgetRequest,
    GetRequest, PrepareRequest, PutRequest, RequestHeader, ScanRequest, ShardMap, TxnRequest,
};
use prost::Message;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::config::refresh_map;
use crate::map::{group_of, groups_of, list_groups, replicas};
use crate::pool::MESSAGE_BYTES_MAX;
use crate::retry::{
    backoff, classify, describe, pass_through, short_wait, Action, Effect, HOLDS_MAX, MAX_ATTEMPTS,
};
use crate::Shared;

/// A request the router stamps with the map version it routed by (and keys, if it writes).
pub(crate) trait Routed: Clone {
    fn header_mut(&mut self) -> &mut RequestHeader;

    fn set_map_version(&mut self, version: u64) {
        self.header_mut().map_version = version;
    }

    /// Gives the request an idempotency key of its own unless the client gave it one, so that
    /// an attempt whose outcome is unknown can be sent again (the node answers a repeat with the
    /// first outcome).
    fn ensure_idempotency_key(&mut self) {
        let header = self.header_mut();
        if header.idempotency_key.is_empty() {
            header.idempotency_key = ordo_proto::unique_id();
        }
    }
}

macro_rules! routed {
    ($($t:ty),*) => {$(
        impl Routed for $t {
            fn header_mut(&mut self) -> &mut RequestHeader {
                self.header.get_or_insert_default()
            }
        }
    )*};
}
routed!(
    GetRequest,
    PutRequest,
    DeleteRequest,
    ScanRequest,
    TxnRequest,
    PrepareRequest,
    DecideRequest,
    FinishRequest,
    ForgetRequest
);

pub(crate) fn kv_client(ch: Channel) -> KvClient<Channel> {
    KvClient::new(ch)
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX)
}

pub(crate) fn participant(ch: Channel) -> ParticipantClient<Channel> {
    ParticipantClient::new(ch)
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX)
}

/// What decides a request's group.
pub(crate) enum Route {
    /// One shard key (Get, Put, Delete, Scan).
    Key(Bytes),
    /// Every distinct shard key of a Txn; they must all map to one group.
    Txn(Vec<Bytes>),
}

impl Route {
    /// A shard key of the route (they all share its group).
    fn any_key(&self) -> Bytes {
        match self {
            Route::Key(k) => k.clone(),
            Route::Txn(keys) => keys[0].clone(),
        }
    }

    /// The group to send to under `map`, or the status to answer with.
    fn group(&self, map: &ShardMap) -> Result<u64, Status> {
        match self {
            Route::Key(k) => Ok(group_of(map, k)),
            Route::Txn(keys) => {
                let groups = groups_of(map, keys.iter().map(|k| &k[..]));
                if groups.len() > 1 {
                    // Only when the map changed while the request was routed (cross-group Txns
                    // go to two-phase commit before they get here).
                    return Err(Status::unavailable(format!(
                        "the keys routed together now belong to groups {} (the shard map \
                         changed); nothing was applied, retry",
                        list_groups(&groups)
                    )));
                }
                Ok(*groups.first().expect("a Txn has at least one key"))
            }
        }
    }
}

/// What the loop does when the request meets an item locked by a cross-group transaction.
/// `locks::OnLock` waits (and resolves); [`FailOnLock`] hands the status back.
pub(crate) trait LockPolicy: Sync {
    /// Whether to wait for the lock and retry; `false` hands the `ABORTED` status back.
    fn waits(&self) -> bool;

    /// Resolves `lock`, met on the group that the shard key `at` routes to, if this request may
    /// (called only when [`LockPolicy::waits`]); an error only goes into the request's account.
    fn resolve(
        &self,
        shared: &Shared,
        lock: error_detail::Locked,
        at: Bytes,
        deadline: Instant,
    ) -> impl Future<Output = Result<(), Status>> + Send;
}

/// Hands a lock's `ABORTED` status back to the caller: the mode of every request a lock
/// resolution sends, and of a writing transaction's prepare, which never waits.
pub(crate) struct FailOnLock;

impl LockPolicy for FailOnLock {
    fn waits(&self) -> bool {
        false
    }

    fn resolve(
        &self,
        _: &Shared,
        _: error_detail::Locked,
        _: Bytes,
        _: Instant,
    ) -> impl Future<Output = Result<(), Status>> + Send {
        std::future::ready(Ok(()))
    }
}

/// Sends `req` to the leader of its group with `rpc`, retrying routing trouble as described
/// in the crate documentation, within `budget`. An item locked by a cross-group transaction
/// is handled as `on_lock` says.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn forward<Req, Resp, F, Fut, L>(
    shared: &Shared,
    op: &'static str,
    effect: Effect,
    on_lock: &L,
    route: Route,
    req: Req,
    budget: Duration,
    rpc: F,
) -> Result<Response<Resp>, Status>
where
    Req: Routed,
    F: Fn(Channel, Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<Resp>, Status>>,
    L: LockPolicy,
{
    let call = Call {
        shared,
        op,
        effect,
        on_lock,
        route,
        req,
        rpc,
    };
    let mut attempts = Attempts::new(budget);
    loop {
        let (target, failure) = match attempts.attempt(&call).await {
            ControlFlow::Break(answer) => return answer,
            ControlFlow::Continue(failed) => failed,
        };
        let delay = attempts.next_step(&call, &target, failure).await?;
        attempts.pause(&call, &target, delay).await?;
    }
}

/// The request being forwarded, and how.
struct Call<'a, Req, F, L> {
    shared: &'a Shared,
    op: &'static str,
    effect: Effect,
    on_lock: &'a L,
    route: Route,
    req: Req,
    rpc: F,
}

/// Where an attempt went.
struct Target {
    group: u64,
    /// The version of the map it was routed by.
    map_version: u64,
    /// The replica it went to (`shard map vN` when the map had no address for the group).
    addr: String,
    /// The group's replicas in that map (empty without an address).
    replicas: Vec<String>,
}

/// How an attempt failed, short of ending the request.
enum Failure {
    /// The map names an owner it has no address for: a newer map may.
    NoAddress(String),
    /// The node, or the connection to it, answered with this status.
    Status(Status),
}

/// One request's way through the loop: what it has used up and learned so far.
struct Attempts {
    started: Instant,
    deadline: Instant,
    budget: Duration,
    /// Attempts counted against [`MAX_ATTEMPTS`] (waits on a lock or a moving slot are not).
    counted: u32,
    /// Waits on a slot in a migration's critical section (bounded apart, by [`HOLDS_MAX`]).
    holds: u32,
    /// Waits on an item locked by a cross-group transaction (bounded by the deadline).
    lock_waits: u32,
    /// A leader named by a hint during this request: tried next even if the map does not list
    /// it (yet).
    hint: Option<String>,
    followed_hint: bool,
    /// The group of the previous attempt (a hint is about that group only).
    last_group: u64,
    last_error: String,
    /// A keyed write's attempt failed after it was sent (it may have been applied): the write is
    /// retried until the deadline, whatever the attempt count, and if it still fails its outcome
    /// is unknown.
    maybe_applied: bool,
}

impl Attempts {
    fn new(budget: Duration) -> Attempts {
        let started = Instant::now();
        Attempts {
            started,
            deadline: started + budget,
            budget,
            counted: 0,
            holds: 0,
            lock_waits: 0,
            hint: None,
            followed_hint: false,
            last_group: 0,
            last_error: String::from("no attempt made"),
            maybe_applied: false,
        }
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Sends one attempt under the current map, to the hinted or cached leader of the group.
    /// Breaks with the request's answer (a response, or a status that ends it); continues with
    /// where the attempt went and how it failed.
    async fn attempt<Req, Resp, F, Fut, L>(
        &mut self,
        call: &Call<'_, Req, F, L>,
    ) -> ControlFlow<Result<Response<Resp>, Status>, (Target, Failure)>
    where
        Req: Routed,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let map = call.shared.map.current();
        if map.version == 0 {
            return ControlFlow::Break(Err(not_initialized()));
        }
        let group = match call.route.group(&map) {
            Ok(group) => group,
            Err(status) => return ControlFlow::Break(Err(status)),
        };
        if group != self.last_group {
            self.hint = None;
        }
        self.last_group = group;
        let remaining = self.remaining();
        if remaining.is_zero() {
            let status = self.exhausted(group, call.effect, &self.last_error, false);
            return ControlFlow::Break(Err(status));
        }
        let list = match replicas(&map, group) {
            Ok(list) => list,
            Err(why) => {
                let target = Target {
                    group,
                    map_version: map.version,
                    addr: format!("shard map v{}", map.version),
                    replicas: Vec::new(),
                };
                return ControlFlow::Continue((target, Failure::NoAddress(why)));
            }
        };
        let addr = self
            .hint
            .take()
            .unwrap_or_else(|| call.shared.leaders.pick(group, &list));
        let status = match call.shared.pool.channel(&addr) {
            // Nothing was sent: as good as a refused connection.
            Err(e) => never_sent(e),
            Ok(channel) => {
                let mut r = call.req.clone();
                r.set_map_version(map.version);
                let mut request = Request::new(r);
                request.set_timeout(remaining);
                match tokio::time::timeout(remaining, (call.rpc)(channel, request)).await {
                    Ok(Ok(resp)) => {
                        if self.counted > 0 {
                            tracing::debug!(op = call.op, group, %addr,
                                attempts = self.counted + 1, "succeeded after retries");
                        }
                        return ControlFlow::Break(Ok(Response::new(resp.into_inner())));
                    }
                    Ok(Err(status)) => status,
                    Err(_) => return ControlFlow::Break(Err(self.timed_out(group, &addr))),
                }
            }
        };
        let target = Target {
            group,
            map_version: map.version,
            addr,
            replicas: list,
        };
        ControlFlow::Continue((target, Failure::Status(status)))
    }

    /// After a failed attempt: the delay before the next one, or the answer when the failure
    /// ends the request (a status that is not the router's business, a lock the caller wants
    /// back, a write whose outcome is unknown).
    async fn next_step<Req, F, L: LockPolicy>(
        &mut self,
        call: &Call<'_, Req, F, L>,
        target: &Target,
        failure: Failure,
    ) -> Result<Duration, Status> {
        let status = match failure {
            Failure::NoAddress(why) => {
                self.counted += 1;
                self.last_error = why;
                return Ok(self.refresh(call.shared, target.map_version).await);
            }
            Failure::Status(status) => status,
        };
        if call.effect == Effect::KeyedWrite
            && classify(&status, Effect::Write) == Action::OutcomeUnknown
        {
            self.maybe_applied = true;
        }
        let action = classify(&status, call.effect);
        if self.counts(&action) {
            self.counted += 1;
        }
        match action {
            Action::Fail => Err(pass_through(status)),
            Action::Locked(_) if !call.on_lock.waits() => Err(status),
            Action::OutcomeUnknown => {
                let status =
                    outcome_unknown(call.op, target.group, &target.addr, self.counted, &status);
                tracing::warn!(
                    op = call.op,
                    group = target.group,
                    attempts = self.counted,
                    "{}",
                    status.message()
                );
                Err(status)
            }
            action => {
                self.last_error = describe(&status);
                Ok(self.act(call, target, action).await)
            }
        }
    }

    /// Whether an attempt that failed with `action` uses up one of [`MAX_ATTEMPTS`]: waiting
    /// for a transaction to finish is bounded by the deadline, and waiting for a moving slot
    /// (up to [`HOLDS_MAX`] times) by the migration's critical section.
    fn counts(&self, action: &Action) -> bool {
        match action {
            Action::Locked(_) => false,
            Action::Hold => self.holds >= HOLDS_MAX,
            _ => true,
        }
    }

    /// Does what a retryable `action` calls for; the delay before the next attempt.
    async fn act<Req, F, L: LockPolicy>(
        &mut self,
        call: &Call<'_, Req, F, L>,
        target: &Target,
        action: Action,
    ) -> Duration {
        let shared = call.shared;
        match action {
            Action::Fail | Action::OutcomeUnknown => unreachable!("next_step answers these"),
            Action::Locked(lock) => {
                self.lock_waits += 1;
                let at = call.route.any_key();
                if let Err(e) = call.on_lock.resolve(shared, lock, at, self.deadline).await {
                    self.last_error = format!("{}; resolving the lock: {e}", self.last_error);
                }
                short_wait(self.lock_waits)
            }
            // The slot's donor is in the critical section: ask the same replica again shortly
            // (or the new owner, once the map moves on).
            Action::Hold if self.holds < HOLDS_MAX => {
                self.holds += 1;
                self.hint = Some(target.addr.clone());
                short_wait(self.holds - 1)
            }
            Action::Hold => self.backoff(),
            Action::Redirect(leader) => {
                shared.counters.redirects.fetch_add(1, Ordering::Relaxed);
                shared.leaders.set(target.group, &leader);
                self.hint = Some(leader);
                // The first hint is the normal way to find a leader: follow it at once. Later
                // ones back off, so that replicas pointing at each other during an election do
                // not burn the attempts in a few milliseconds.
                if self.followed_hint {
                    self.backoff()
                } else {
                    self.followed_hint = true;
                    Duration::ZERO
                }
            }
            // A read: no leader known, replica shutting down, connection refused or broken. A
            // write only when the attempt was certainly not applied (not-leader without a hint,
            // `NotApplied`, connection never established); every other write failure is
            // `OutcomeUnknown`.
            Action::Rotate => {
                shared
                    .leaders
                    .rotate(target.group, &target.addr, &target.replicas);
                self.backoff()
            }
            // The node does not own the slot at its map version and never applied the request:
            // get the map that says who does, then retry there.
            Action::Refresh { node_version } => {
                shared.counters.wrong_shard.fetch_add(1, Ordering::Relaxed);
                self.last_error = format!(
                    "{} (the router used map v{})",
                    self.last_error, target.map_version
                );
                let delay = self.refresh(shared, target.map_version).await;
                if !delay.is_zero() {
                    tracing::debug!(
                        group = target.group,
                        node_version,
                        map_version = target.map_version,
                        "wrong shard, but no newer map yet"
                    );
                }
                delay
            }
        }
    }

    /// Asks the config servers for a map newer than v`used`: no delay when one arrived, else
    /// the backoff (a failure to ask goes into the request's account).
    async fn refresh(&mut self, shared: &Shared, used: u64) -> Duration {
        match refresh_map(shared, used, self.deadline).await {
            Ok(()) if shared.map.current().version > used => Duration::ZERO,
            Ok(()) => self.backoff(),
            Err(e) => {
                self.last_error = format!("{}; {e}", self.last_error);
                self.backoff()
            }
        }
    }

    /// The backoff before the next attempt, by the number of attempts counted so far.
    fn backoff(&self) -> Duration {
        backoff(self.counted.saturating_sub(1))
    }

    /// Gives up when the attempts are spent or `delay` would outlast the deadline; else waits
    /// it out.
    async fn pause<Req, F, L>(
        &self,
        call: &Call<'_, Req, F, L>,
        target: &Target,
        delay: Duration,
    ) -> Result<(), Status> {
        let (op, group, attempts) = (call.op, target.group, self.counted);
        let remaining = self.remaining();
        let out_of_time = delay >= remaining || remaining.is_zero();
        // Once a keyed write may have been applied, only the deadline ends it: giving up
        // earlier would leave its client with "outcome unknown" while time remained.
        if (attempts >= MAX_ATTEMPTS && !self.maybe_applied) || out_of_time {
            let last = format!("from {}: {}", target.addr, self.last_error);
            let status = self.exhausted(group, call.effect, &last, out_of_time);
            tracing::warn!(op, group, attempts, "{}", status.message());
            return Err(status);
        }
        tracing::debug!(op, group, addr = %target.addr, attempts, ?delay,
            error = %self.last_error, "retrying");
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(())
    }

    fn exhausted(&self, group: u64, effect: Effect, last: &str, deadline_cut: bool) -> Status {
        let known = match effect {
            Effect::Read => Known::Read,
            _ if self.maybe_applied => Known::MaybeApplied,
            _ => Known::NotApplied,
        };
        exhausted(
            group,
            known,
            self.counted,
            self.started,
            self.budget,
            last,
            deadline_cut,
        )
    }

    /// The answer when an attempt outlasted the whole deadline.
    fn timed_out(&self, group: u64, addr: &str) -> Status {
        Status::deadline_exceeded(format!(
            "group {group}: {addr} did not answer within the request's deadline ({} attempt(s) \
             over {:.1?}); the outcome of a write is unknown",
            self.counted + 1,
            self.started.elapsed()
        ))
    }
}

pub(crate) fn not_initialized() -> Status {
    Status::unavailable("cluster is not initialized: run `ordoctl init`")
}

/// What a request that gives up knows of its effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Read,
    /// Every attempt of the write was certainly not applied.
    NotApplied,
    /// A keyed write, one of whose attempts failed after it was sent.
    MaybeApplied,
}

/// The answer when the router gives up: what it tried and the last thing that went wrong.
///
/// A write is retried only after attempts that certainly were not applied, or with its
/// idempotency key; a write whose every attempt was certainly not applied was not applied at all:
/// it says so, in the message and with a `NotApplied` detail (a client may retry it). A keyed
/// write that may have been applied gives up only at its deadline, and says its outcome is
/// unknown. A read's give-up carries no details, so a client never mistakes the router for a
/// node and follows a node's leader hint past it.
fn exhausted(
    group: u64,
    known: Known,
    attempts: u32,
    started: Instant,
    budget: Duration,
    last: &str,
    deadline_cut: bool,
) -> Status {
    let cut = if deadline_cut {
        format!(" (the request's deadline of {budget:.1?} left no time for another)")
    } else {
        String::new()
    };
    let message = format!(
        "group {group}: {attempts} attempts over {:.1?} failed{cut}; last error {last}",
        started.elapsed()
    );
    match known {
        Known::Read => Status::unavailable(message),
        Known::MaybeApplied => Status::unavailable(format!(
            "{message}; an earlier attempt failed after it was sent, so the outcome of this \
             write is unknown (it was retried with its idempotency key until the deadline)"
        )),
        Known::NotApplied => {
            let detail = ErrorDetail {
                kind: Some(error_detail::Kind::NotApplied(error_detail::NotApplied {})),
            };
            Status::with_details(
                Code::Unavailable,
                format!("{message}; the write was not applied"),
                detail.encode_to_vec().into(),
            )
        }
    }
}

/// The answer to a write whose attempt failed after it was sent, in a way that does not prove
/// the node did not apply it. Not retried: a retry could apply it twice, or fail its own
/// condition because the first attempt succeeded.
fn outcome_unknown(op: &str, group: u64, addr: &str, attempt: u32, status: &Status) -> Status {
    Status::unavailable(format!(
        "group {group}: the outcome of this {op} is unknown: attempt {attempt} went to {addr}, \
         which failed after the request was sent ({}); it may or may not have been applied, so \
         the router did not retry it (read the item back before retrying)",
        describe(status)
    ))
}

/// A status for an attempt that never left the router (marked as a connection failure).
fn never_sent(why: String) -> Status {
    Status::from_error(Box::new(tonic::ConnectError(why.into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhausted_message_says_what_was_tried() {
        let s = exhausted(
            2,
            Known::Read,
            12,
            Instant::now(),
            Duration::from_secs(1),
            "from 127.0.0.1:7012: not leader",
            false,
        );
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().starts_with("group 2: 12 attempts over "));
        assert!(s
            .message()
            .ends_with("failed; last error from 127.0.0.1:7012: not leader"));
        assert!(s.details().is_empty());

        // Every attempt of a write was certainly not applied, or it would not have been retried.
        let w = exhausted(
            2,
            Known::NotApplied,
            3,
            Instant::now(),
            Duration::from_secs(1),
            "from 127.0.0.1:7012: not applied: leader overloaded",
            true,
        );
        assert_eq!(w.code(), tonic::Code::Unavailable);
        assert!(
            w.message().ends_with("the write was not applied"),
            "{}",
            w.message()
        );
        assert!(ordo_proto::certainly_not_applied(&w));
    }

    #[test]
    fn unsent_attempts_count_as_connect_failures() {
        assert!(ordo_proto::certainly_not_applied(&never_sent(
            "invalid address".into()
        )));
        let s = outcome_unknown(
            "Put",
            1,
            "127.0.0.1:7001",
            2,
            &Status::unavailable("the replica stopped during the write; its outcome is unknown"),
        );
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(
            s.message().contains("outcome of this Put is unknown"),
            "{}",
            s.message()
        );
        assert!(!ordo_proto::certainly_not_applied(&s));
    }
}
