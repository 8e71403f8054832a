//! `ordo.v1.Kv` on the router: find the group by the shard key's slot, forward to its leader,
//! and handle routing trouble (not leader, wrong shard, dead replica) with bounded retries.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ordo_proto::v1::kv_client::KvClient;
use ordo_proto::v1::kv_server::Kv;
use ordo_proto::v1::participant_client::ParticipantClient;
use ordo_proto::v1::{
    error_detail, txn_op, DecideRequest, DeleteRequest, DeleteResponse, ErrorDetail, FinishRequest,
    ForgetRequest, GetRequest, GetResponse, PrepareRequest, PutRequest, PutResponse, RequestHeader,
    ScanRequest, ScanResponse, ShardMap, TxnRequest, TxnResponse,
};
use prost::Message;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::config::refresh_map;
use crate::map::{group_of, groups_of, list_groups, replicas};
use crate::pool::MESSAGE_BYTES_MAX;
use crate::retry::{
    backoff, classify, describe, hold_delay, lock_backoff, pass_through, Action, Effect, HOLDS_MAX,
    MAX_ATTEMPTS,
};
use crate::{deadline, Shared};

pub(crate) struct KvService(pub(crate) Arc<Shared>);

/// A request the router stamps with the map version it routed by.
pub(crate) trait Routed: Clone {
    fn set_map_version(&mut self, version: u64);
}

macro_rules! routed {
    ($($t:ty),*) => {$(
        impl Routed for $t {
            fn set_map_version(&mut self, version: u64) {
                self.header = Some(RequestHeader { map_version: version });
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

/// What the forwarding loop does when the request meets an item locked by a cross-group
/// transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OnLock {
    /// Wait (bounded by the deadline), resolving the lock once it is older than the timeout.
    Wait,
    /// Wait as the cross-group transaction `(priority_ms, txn_id)`: as `Wait`, but a holder
    /// younger than it is aborted at once (wound-wait, see `twopc.rs`).
    WaitAs(u64, Bytes),
    /// Hand the `ABORTED` status back (a writing transaction's prepare never waits).
    Fail,
}

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

fn not_initialized() -> Status {
    Status::unavailable("cluster is not initialized: run `ordoctl init`")
}

fn require_shard_key(shard_key: &Bytes) -> Result<(), Status> {
    if shard_key.is_empty() {
        return Err(Status::invalid_argument("shard_key is empty"));
    }
    Ok(())
}

/// The distinct shard keys of a Txn, in first-seen order; refuses an empty Txn and empty keys.
fn txn_shard_keys(req: &TxnRequest) -> Result<Vec<Bytes>, Status> {
    let mut keys: Vec<(String, &Bytes)> = Vec::new();
    for (i, c) in req.compares.iter().enumerate() {
        keys.push((format!("compare {i}"), &c.shard_key));
    }
    for (branch, ops) in [("success", &req.success), ("failure", &req.failure)] {
        for (i, op) in ops.iter().enumerate() {
            let key = match &op.op {
                Some(txn_op::Op::Put(p)) => &p.shard_key,
                Some(txn_op::Op::Delete(d)) => &d.shard_key,
                Some(txn_op::Op::Get(g)) => &g.shard_key,
                // The node refuses an empty op with its own message; it names no key to route by.
                None => continue,
            };
            keys.push((format!("{branch} op {i}"), key));
        }
    }
    if keys.is_empty() {
        return Err(Status::invalid_argument(
            "Txn is empty: it has no compares and no ops naming a key",
        ));
    }
    let mut distinct: Vec<Bytes> = Vec::new();
    for (what, key) in keys {
        if key.is_empty() {
            return Err(Status::invalid_argument(format!(
                "shard_key is empty ({what})"
            )));
        }
        if !distinct.contains(key) {
            distinct.push(key.clone());
        }
    }
    Ok(distinct)
}

impl KvService {
    /// Sends `req` to the leader of its group with `rpc`, retrying routing trouble as described
    /// in the crate documentation, within `budget`. An item locked by a cross-group transaction
    /// is waited for (and the lock resolved once it is older than the lock timeout) with
    /// `OnLock::Wait`, or handed back as the `ABORTED` status with `OnLock::Fail`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn forward<Req, Resp, F, Fut>(
        &self,
        op: &'static str,
        effect: Effect,
        on_lock: OnLock,
        route: Route,
        req: Req,
        budget: Duration,
        rpc: F,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Routed,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let shared = &self.0;
        let started = Instant::now();
        let deadline = started + budget;
        let mut attempts = 0u32;
        // Waits on a slot in a migration's critical section (bounded apart from attempts).
        let mut holds = 0u32;
        // A leader named by a hint during this request: tried next even if the map does not list
        // it (yet).
        let mut hint: Option<String> = None;
        let mut followed_hint = false;
        let mut last_group = 0;
        let mut last_error = String::from("no attempt made");
        let mut lock_waits = 0u32;
        loop {
            let map = shared.map.current();
            if map.version == 0 {
                return Err(not_initialized());
            }
            let group = route.group(&map)?;
            if group != last_group {
                hint = None;
            }
            last_group = group;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(exhausted(
                    group,
                    effect,
                    attempts,
                    started,
                    budget,
                    &last_error,
                    false,
                ));
            }

            // One attempt: where it went and how it failed.
            let (addr, replica_list, status) = match replicas(&map, group) {
                // The map names an owner it has no address for: a newer map may.
                Err(why) => (format!("shard map v{}", map.version), Vec::new(), Err(why)),
                Ok(list) => {
                    let addr = hint
                        .take()
                        .unwrap_or_else(|| shared.leaders.pick(group, &list));
                    let status = match shared.pool.channel(&addr) {
                        // Nothing was sent: as good as a refused connection.
                        Err(e) => Ok(never_sent(e)),
                        Ok(channel) => {
                            let mut r = req.clone();
                            r.set_map_version(map.version);
                            let mut request = Request::new(r);
                            request.set_timeout(remaining);
                            match tokio::time::timeout(remaining, rpc(channel, request)).await {
                                Ok(Ok(resp)) => {
                                    if attempts > 0 {
                                        tracing::debug!(op, group, %addr, attempts = attempts + 1, "succeeded after retries");
                                    }
                                    return Ok(Response::new(resp.into_inner()));
                                }
                                Ok(Err(status)) => Ok(status),
                                Err(_) => {
                                    return Err(Status::deadline_exceeded(format!(
                                        "group {group}: {addr} did not answer within the \
                                         request's deadline ({} attempt(s) over {:.1?}); the \
                                         outcome of a write is unknown",
                                        attempts + 1,
                                        started.elapsed()
                                    )))
                                }
                            }
                        }
                    };
                    (addr, list, status)
                }
            };
            attempts += 1;

            let delay = match status {
                Err(why) => {
                    last_error = why;
                    match refresh_map(shared, map.version, deadline).await {
                        Ok(()) if shared.map.current().version > map.version => Duration::ZERO,
                        Ok(()) => backoff(attempts - 1),
                        Err(e) => {
                            last_error = format!("{last_error}; {e}");
                            backoff(attempts - 1)
                        }
                    }
                }
                Ok(status) => {
                    let action = classify(&status, effect);
                    match action {
                        Action::Fail => return Err(pass_through(status)),
                        Action::Locked(_) if on_lock == OnLock::Fail => return Err(status),
                        Action::OutcomeUnknown => {
                            let status = outcome_unknown(op, group, &addr, attempts, &status);
                            tracing::warn!(op, group, attempts, "{}", status.message());
                            return Err(status);
                        }
                        _ => {}
                    }
                    last_error = describe(&status);
                    match action {
                        Action::Fail | Action::OutcomeUnknown => unreachable!("returned above"),
                        // Waiting for a transaction to finish is not a failed attempt: the
                        // deadline bounds it.
                        Action::Locked(lock) => {
                            attempts -= 1;
                            lock_waits += 1;
                            let wounder = match &on_lock {
                                OnLock::WaitAs(priority, id) => Some((*priority, id.clone())),
                                _ => None,
                            };
                            if let Err(e) = self
                                .resolve_lock(lock, route.any_key(), deadline, wounder)
                                .await
                            {
                                last_error = format!("{last_error}; resolving the lock: {e}");
                            }
                            lock_backoff(lock_waits)
                        }
                        // The slot's donor is in the critical section: ask the same replica
                        // again shortly (or the new owner, once the map moves on).
                        Action::Hold if holds < HOLDS_MAX => {
                            holds += 1;
                            attempts -= 1;
                            hint = Some(addr.clone());
                            hold_delay(holds - 1)
                        }
                        Action::Hold => backoff(attempts - 1),
                        Action::Redirect(leader) => {
                            shared.counters.redirects.fetch_add(1, Ordering::Relaxed);
                            shared.leaders.set(group, &leader);
                            hint = Some(leader);
                            // The first hint is the normal way to find a leader: follow it at
                            // once. Later ones back off, so that replicas pointing at each other
                            // during an election do not burn the attempts in a few milliseconds.
                            if followed_hint {
                                backoff(attempts - 1)
                            } else {
                                followed_hint = true;
                                Duration::ZERO
                            }
                        }
                        // A read: no leader known, replica shutting down, connection refused or
                        // broken. A write only when the attempt was certainly not applied
                        // (not-leader without a hint, `NotApplied`, connection never
                        // established); every other write failure is `OutcomeUnknown` above.
                        Action::Rotate => {
                            shared.leaders.rotate(group, &addr, &replica_list);
                            backoff(attempts - 1)
                        }
                        // The node does not own the slot at its map version and never applied
                        // the request: get the map that says who does, then retry there.
                        Action::Refresh { node_version } => {
                            shared.counters.wrong_shard.fetch_add(1, Ordering::Relaxed);
                            last_error =
                                format!("{last_error} (the router used map v{})", map.version);
                            match refresh_map(shared, map.version, deadline).await {
                                Ok(()) if shared.map.current().version > map.version => {
                                    Duration::ZERO
                                }
                                Ok(()) => {
                                    tracing::debug!(
                                        group,
                                        node_version,
                                        map_version = map.version,
                                        "wrong shard, but no newer map yet"
                                    );
                                    backoff(attempts - 1)
                                }
                                Err(e) => {
                                    last_error = format!("{last_error}; {e}");
                                    backoff(attempts - 1)
                                }
                            }
                        }
                    }
                }
            };

            let remaining = deadline.saturating_duration_since(Instant::now());
            let out_of_time = delay >= remaining || remaining.is_zero();
            if attempts >= MAX_ATTEMPTS || out_of_time {
                let status = exhausted(
                    group,
                    effect,
                    attempts,
                    started,
                    budget,
                    &format!("from {addr}: {last_error}"),
                    attempts < MAX_ATTEMPTS,
                );
                tracing::warn!(op, group, attempts, "{}", status.message());
                return Err(status);
            }
            tracing::debug!(op, group, %addr, attempts, ?delay, error = %last_error, "retrying");
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The answer when the router gives up: what it tried and the last thing that went wrong.
///
/// A write is retried only after attempts that certainly were not applied, so a write that
/// runs out of attempts was not applied at all: it says so, in the message and with a
/// `NotApplied` detail (a client may retry it). A read's give-up carries no details, so a client
/// never mistakes the router for a node and follows a node's leader hint past it.
fn exhausted(
    group: u64,
    effect: Effect,
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
    match effect {
        Effect::Read => Status::unavailable(message),
        Effect::Write => {
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

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let budget = deadline::budget(request.metadata());
        let req = request.into_inner();
        require_shard_key(&req.shard_key)?;
        let route = Route::Key(req.shard_key.clone());
        self.forward(
            "Get",
            Effect::Read,
            OnLock::Wait,
            route,
            req,
            budget,
            |ch, r| async move { kv_client(ch).get(r).await },
        )
        .await
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let budget = deadline::budget(request.metadata());
        let req = request.into_inner();
        require_shard_key(&req.shard_key)?;
        let route = Route::Key(req.shard_key.clone());
        self.forward(
            "Put",
            Effect::Write,
            OnLock::Wait,
            route,
            req,
            budget,
            |ch, r| async move { kv_client(ch).put(r).await },
        )
        .await
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let budget = deadline::budget(request.metadata());
        let req = request.into_inner();
        require_shard_key(&req.shard_key)?;
        let route = Route::Key(req.shard_key.clone());
        self.forward(
            "Delete",
            Effect::Write,
            OnLock::Wait,
            route,
            req,
            budget,
            |ch, r| async move { kv_client(ch).delete(r).await },
        )
        .await
    }

    async fn scan(&self, request: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let budget = deadline::budget(request.metadata());
        let req = request.into_inner();
        require_shard_key(&req.shard_key)?;
        let route = Route::Key(req.shard_key.clone());
        self.forward(
            "Scan",
            Effect::Read,
            OnLock::Wait,
            route,
            req,
            budget,
            |ch, r| async move { kv_client(ch).scan(r).await },
        )
        .await
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let budget = deadline::budget(request.metadata());
        let req = request.into_inner();
        let keys = txn_shard_keys(&req)?;
        let map = self.0.map.current();
        if map.version == 0 {
            return Err(not_initialized());
        }
        if groups_of(&map, keys.iter().map(|k| &k[..])).len() > 1 {
            return crate::twopc::coordinate(self, req, budget)
                .await
                .map(Response::new);
        }
        self.forward(
            "Txn",
            Effect::Write,
            OnLock::Wait,
            Route::Txn(keys),
            req,
            budget,
            |ch, r| async move { kv_client(ch).txn(r).await },
        )
        .await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ordo_proto::v1::{Compare, TxnOp};

    pub(crate) fn put(sk: &str) -> TxnOp {
        TxnOp {
            op: Some(txn_op::Op::Put(PutRequest {
                shard_key: Bytes::copy_from_slice(sk.as_bytes()),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn txn_keys_are_collected_from_every_part() {
        let req = TxnRequest {
            header: None,
            compares: vec![Compare {
                shard_key: Bytes::from_static(b"a"),
                ..Default::default()
            }],
            success: vec![put("b"), put("a"), TxnOp { op: None }],
            failure: vec![put("c")],
        };
        let keys = txn_shard_keys(&req).unwrap();
        assert_eq!(keys, [&b"a"[..], b"b", b"c"]);

        let empty = txn_shard_keys(&TxnRequest::default()).unwrap_err();
        assert_eq!(empty.code(), tonic::Code::InvalidArgument);
        let blank = TxnRequest {
            failure: vec![put("")],
            ..Default::default()
        };
        let err = txn_shard_keys(&blank).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("failure op 0"), "{}", err.message());
    }

    #[test]
    fn exhausted_message_says_what_was_tried() {
        let s = exhausted(
            2,
            Effect::Read,
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
            Effect::Write,
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
