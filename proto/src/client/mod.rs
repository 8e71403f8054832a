//! The Ordo clients: handles over a list of addresses that find the leader by themselves.
//!
//! [`Client`] speaks the `ordo.v1.Kv` service (to the nodes of a shard group, or to a router);
//! [`ClusterClient`] speaks the `ordo.v1.Cluster` service (to config servers, or to a router,
//! which proxies it). [`Client::watch`] opens the change feed (`ordo.v1.Feed`, on routers).
//!
//! A server answers a request it cannot serve because it is not the leader with `Unavailable`
//! and an [`crate::v1::ErrorDetail`] naming the leader when it knows it. Both clients follow that
//! hint (or try the next address when there is none), back off between attempts, remember the
//! leader for the next call, and give up after a bounded number of attempts or when the per-call
//! deadline runs out. Every other error is handed back unchanged as a [`tonic::Status`], so
//! callers can inspect its code and details. The walk is [`crate::retry::follow_leader`], shared
//! with the router and the config server; `Core::call` gives it the clients' policy, and each
//! client method only says how to make its call on a [`Channel`].
//!
//! Channels are created lazily (nothing connects until the first request) and cached per address.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use crate::addr::{self, ChannelCache, Profile, CLIENT_RESPONSE_BYTES_MAX};
use crate::retry::{follow_leader, Action, Backoff, Effect, GaveUp, LeaderCursor, Walk, Why};
use crate::v1::cluster_client::ClusterClient as ClusterStub;
use crate::v1::feed_client::FeedClient;
use crate::v1::kv_client::KvClient;
use crate::v1::peer_client::PeerClient;
use crate::v1::{error_detail, Consistency};

mod calls;
mod groups;
#[cfg(test)]
mod tests;

/// Per-call deadline unless [`Client::with_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most attempts (first try included) one call makes before it returns the last error.
pub const MAX_ATTEMPTS: u32 = 20;
/// Delay between attempts: 20 ms doubling up to 500 ms (the first not-leader hint is followed at
/// once).
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));

/// A client of the `ordo.v1.Kv` service over one or more node addresses.
///
/// Cheap to clone: clones share the channel cache and the remembered leader, so one `Client` can
/// be handed to many tasks.
///
/// # Retries and write outcomes
///
/// A read (`get`, `scan`) is retried (up to [`MAX_ATTEMPTS`] attempts by default, within the
/// deadline) when it failed with `Unavailable` (a not-leader answer, or a plain `Unavailable` such
/// as "no leader elected yet" or a refused connection) or over a connection that broke.
///
/// A write (`put`, `delete`, `txn`) carries an idempotency key (`RequestHeader.idempotency_key`,
/// made here unless a `txn` brings its own), the same on every attempt: the server applies it at
/// most once within its dedup window and answers a repeat with the first outcome (a `txn` over
/// several groups too: its two-phase commit records the key with its decision). So a write is
/// retried like a read, after a plain `Unavailable` or a broken connection too, and never
/// applies twice; a conditional one never reports a failure caused by its own first attempt.
///
/// Every other status, including `DeadlineExceeded`, is returned at once. `WrongShard` and
/// `Locked` details are returned too: they are for a router to act on. The classification is
/// [`crate::retry::classify`], the router's.
///
/// When a write returns an error that is not `InvalidArgument`, `FailedPrecondition` or
/// certainly-not-applied, its outcome is unknown: send it again with the same key (a `txn` whose
/// request names it), or read the item back, before acting on it.
#[derive(Clone)]
pub struct Client {
    core: Core,
}

/// A client of the `ordo.v1.Cluster` service over the addresses of config servers or routers.
///
/// Same construction and sharing as [`Client`]: reads and writes follow `NotLeader` hints to the
/// config leader and retry plain `Unavailable` answers.
///
/// # Write outcomes
///
/// Unlike a [`Client`] write, a map change is retried after a plain `Unavailable` too: each one
/// is a compare-and-set on the map version or refuses to repeat itself, so it cannot apply twice.
/// A change that failed with a plain `Unavailable` may have been applied, though, so its retry
/// may fail because of its own first attempt: `init_cluster` then reports that the
/// cluster is already initialized, `add_group` that the group exists, `remove_group` that it does
/// not. `move_slots` is idempotent. When a write returns an error, read the map back with
/// `get_shard_map(true)` before acting on it.
#[derive(Clone)]
pub struct ClusterClient {
    core: Core,
}

/// The address list, channel cache, remembered leader and retry policy behind both clients.
///
/// Cheap to clone; clones share the cache and the routing state.
#[derive(Clone)]
struct Core {
    shared: Arc<Shared>,
    timeout: Duration,
    max_attempts: u32,
}

/// State shared by all clones of one client.
struct Shared {
    /// The user's addresses, normalised (`http://host:port`) and deduplicated, in the order given.
    endpoints: Vec<String>,
    channels: ChannelCache,
    /// Where the next request goes: the same addresses, canonical (`host:port`), and the last
    /// known leader.
    cursor: Mutex<LeaderCursor>,
}

/// The accessors and builders both clients share, delegating to their [`Core`].
macro_rules! common_client_api {
    ($client:ident) => {
        impl $client {
            /// Creates a client over `endpoints` (`host:port` or `http://host:port`).
            ///
            /// Nothing connects here, so this needs no runtime and succeeds even when no server
            /// is up yet; connection failures surface (and are retried) on the first request.
            pub fn connect(endpoints: Vec<String>) -> anyhow::Result<$client> {
                Ok($client {
                    core: Core::new(endpoints)?,
                })
            }

            /// Sets the overall deadline of each call, retries and backoff included.
            pub fn with_timeout(mut self, timeout: Duration) -> $client {
                self.core.timeout = timeout;
                self
            }

            /// Sets the most attempts (first try included, at least 1) one call makes; default
            /// [`MAX_ATTEMPTS`].
            pub fn with_max_attempts(mut self, attempts: u32) -> $client {
                self.core.max_attempts = attempts.max(1);
                self
            }

            /// The per-call deadline.
            pub fn timeout(&self) -> Duration {
                self.core.timeout
            }

            /// The normalised addresses this client was created with.
            pub fn endpoints(&self) -> &[String] {
                &self.core.shared.endpoints
            }

            /// The leader address learnt from the last calls, if any.
            pub fn leader(&self) -> Option<String> {
                self.core.leader()
            }
        }
    };
}

common_client_api!(Client);
common_client_api!(ClusterClient);

/// A Kv stub on `channel`.
fn kv(channel: Channel) -> KvClient<Channel> {
    KvClient::new(channel).max_decoding_message_size(CLIENT_RESPONSE_BYTES_MAX)
}

/// A Cluster stub on `channel`.
fn cluster(channel: Channel) -> ClusterStub<Channel> {
    ClusterStub::new(channel).max_decoding_message_size(CLIENT_RESPONSE_BYTES_MAX)
}

/// A Feed stub on `channel` (a router's change feed).
fn feed(channel: Channel) -> FeedClient<Channel> {
    FeedClient::new(channel).max_decoding_message_size(CLIENT_RESPONSE_BYTES_MAX)
}

/// A Peer stub on `channel` (node admin calls).
fn peer(channel: Channel) -> PeerClient<Channel> {
    PeerClient::new(channel).max_decoding_message_size(CLIENT_RESPONSE_BYTES_MAX)
}

impl Core {
    fn new(endpoints: Vec<String>) -> anyhow::Result<Core> {
        let mut normalised: Vec<String> = Vec::with_capacity(endpoints.len());
        for raw in &endpoints {
            let addr = normalize_addr(raw)?;
            // Validate now so that a typo fails at startup rather than on every request.
            Endpoint::from_shared(addr.clone())
                .with_context(|| format!("invalid endpoint address {raw:?}"))?;
            if !normalised.contains(&addr) {
                normalised.push(addr);
            }
        }
        if normalised.is_empty() {
            bail!("no endpoint given");
        }
        let canonical = normalised
            .iter()
            .map(|a| addr::host_port(a).map(str::to_string))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Core {
            shared: Arc::new(Shared {
                endpoints: normalised,
                channels: ChannelCache::new(Profile::Client),
                cursor: Mutex::new(LeaderCursor::new(canonical)),
            }),
            timeout: DEFAULT_TIMEOUT,
            max_attempts: MAX_ATTEMPTS,
        })
    }

    /// The last known leader, spelled like [`Client::endpoints`].
    fn leader(&self) -> Option<String> {
        let cursor = self.shared.cursor.lock().unwrap();
        cursor.leader.as_deref().map(addr::uri)
    }

    /// The address the next attempt goes to (canonical).
    fn target(&self) -> String {
        self.shared.cursor.lock().unwrap().target()
    }

    /// Moves the routing on after `failed` answered with `action` outside a walk.
    fn reroute(&self, failed: &str, action: Action) {
        let mut cursor = self.shared.cursor.lock().unwrap();
        match action {
            Action::Redirect(leader) => cursor.redirect(leader),
            Action::Rotate => cursor.rotate(failed),
            _ => {}
        }
    }

    /// Sends `req` with `rpc` (which makes the call on the channel it is given), following leader
    /// hints and retrying as described on [`Client`], through [`follow_leader`].
    ///
    /// An [`Effect::StaleRead`] may be served by any replica: a successful answer then says
    /// nothing about who leads, and with a single address the user asked for that replica
    /// specifically, so hints are not followed.
    async fn call<Req, Resp, F, Fut>(
        &self,
        req: Req,
        effect: Effect,
        rpc: F,
    ) -> Result<Resp, Status>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut walk = Walk::new(effect, self.max_attempts, deadline, BACKOFF);
        // Do not wander off to another node the user did not ask for.
        walk.pinned = effect == Effect::StaleRead && self.shared.endpoints.len() == 1;
        let pinned_cursor;
        let cursor = if walk.pinned {
            let only = self.shared.cursor.lock().unwrap().addrs[0].clone();
            pinned_cursor = Mutex::new(LeaderCursor::new(vec![only]));
            &pinned_cursor
        } else {
            &self.shared.cursor
        };
        let (req, rpc) = (&req, &rpc);
        let attempt = |addr: String, bound: Duration| {
            let channel = self.channel(&addr);
            let mut request = tonic::Request::new(req.clone());
            // Tells the server how long we wait, so it can drop work nobody will read.
            request.set_timeout(bound);
            async move {
                rpc(channel?, request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        };
        follow_leader(cursor, &walk, attempt)
            .await
            .map_err(|gave_up| self.status_of(gave_up))
    }

    /// What the caller sees of a walk that got no answer: the last status, unchanged, or
    /// `DeadlineExceeded` when the deadline cut it.
    fn status_of(&self, gave_up: GaveUp) -> Status {
        let attempts = gave_up.attempts;
        match gave_up.why {
            Why::Refused { status, .. } | Why::AttemptsSpent(status) | Why::OutOfTime(status) => {
                status
            }
            Why::DeadlinePassed(_) | Why::NoAnswer { .. } => {
                deadline_exceeded(self.timeout, attempts)
            }
        }
    }

    /// The cached channel to canonical `addr`, created (without connecting) on first use.
    fn channel(&self, addr: &str) -> Result<Channel, Status> {
        self.shared
            .channels
            .channel(addr)
            .map_err(|e| Status::invalid_argument(format!("invalid address {addr:?}: {e}")))
    }
}

fn consistency(stale: bool) -> Consistency {
    if stale {
        Consistency::Stale
    } else {
        Consistency::Linearizable
    }
}

fn deadline_exceeded(timeout: Duration, attempts: u32) -> Status {
    Status::deadline_exceeded(format!(
        "no answer within the client deadline of {timeout:?} ({attempts} attempt(s)); \
         a write's outcome is unknown"
    ))
}

fn read_effect(stale: bool) -> Effect {
    if stale {
        Effect::StaleRead
    } else {
        Effect::Read
    }
}

/// The typed detail a node attached to an error status, if any.
pub fn error_detail_of(status: &Status) -> Option<error_detail::Kind> {
    crate::error_detail_of(status)
}

/// Turns `host:port` into `http://host:port`; keeps `http://` addresses; rejects `https://` (this
/// build has no TLS) and empty input. A trailing `/` is dropped so that one address has one
/// spelling in the channel cache. The shape is [`crate::addr::host_port`]'s.
pub fn normalize_addr(raw: &str) -> anyhow::Result<String> {
    let host_port = addr::host_port(raw).map_err(|e| anyhow!("endpoint {e}"))?;
    Ok(addr::uri(host_port))
}
