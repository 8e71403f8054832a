//! The Ordo client: one handle over a list of node addresses that finds the leader by itself.
//!
//! Nodes answer a request they cannot serve because they are not the leader with `Unavailable`
//! and an [`ErrorDetail`] naming the leader when they know it. [`Client`] follows that hint (or
//! tries the next address when there is none), backs off between attempts, remembers the leader
//! for the next call, and gives up after a bounded number of attempts or when the per-call
//! deadline runs out. Every other error is handed back unchanged as a [`tonic::Status`], so callers
//! can inspect its code and details.
//!
//! Channels are created lazily (nothing connects until the first request) and cached per address.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use ordo_proto::v1::kv_client::KvClient;
use ordo_proto::v1::{
    error_detail, Consistency, DeleteRequest, DeleteResponse, ErrorDetail, GetRequest, GetResponse,
    PutRequest, PutResponse, ScanRequest, ScanResponse, TxnRequest, TxnResponse,
};
use prost::Message;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Per-call deadline unless [`Client::with_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most attempts (first try included) one call makes before it returns the last error.
pub const MAX_ATTEMPTS: u32 = 20;
/// Time allowed to establish a TCP connection to one address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// First backoff delay; doubled on every further retry.
const BACKOFF_BASE: Duration = Duration::from_millis(20);
/// Longest backoff delay.
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Largest response the client decodes. tonic's default (4 MiB) is too small for a full scan page
/// of large values; this stays well above what a node sends while still bounding memory.
const RESPONSE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// A client of the `ordo.v1.Kv` service over one or more node addresses.
///
/// Cheap to clone: clones share the channel cache and the remembered leader, so one `Client` can
/// be handed to many tasks.
///
/// # Retries and write outcomes
///
/// A call is retried (up to [`MAX_ATTEMPTS`] attempts by default, within the deadline) only when
/// it failed with `Unavailable`: either a not-leader answer, which means the node did not accept
/// the request, or a plain `Unavailable` such as "no leader elected yet" or a refused connection.
/// Every other status, including `DeadlineExceeded` and broken connections (which tonic reports
/// as `Unknown` or `Internal`), is returned at once. A `WrongShard` detail is returned too: it is
/// for a router to act on.
///
/// A plain `Unavailable` does not always prove that a write was not applied (a leader may lose
/// leadership after it proposed the write). A retried write may therefore apply twice. For an
/// unconditional `put`/`delete` the only visible effect is an extra version bump; a conditional
/// write (`if_version`, or a `txn` whose compares check versions) cannot apply twice, but its
/// retry may then report a failed condition caused by its own first attempt. When a write returns
/// an error its outcome is unknown: read the item back before acting on it.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    timeout: Duration,
    max_attempts: u32,
}

/// State shared by all clones of one [`Client`].
struct Shared {
    /// The user's addresses, normalised and deduplicated, in the order given.
    endpoints: Vec<String>,
    channels: Mutex<HashMap<String, Channel>>,
    routing: Mutex<Routing>,
}

/// Where the next request goes.
#[derive(Default)]
struct Routing {
    /// The last known leader; tried first.
    leader: Option<String>,
    /// Index into `endpoints` of the address to try when no leader is known.
    next: usize,
}

/// What a failed attempt tells the retry loop.
#[derive(Debug, PartialEq, Eq)]
enum Retry {
    /// The node named the leader: go there.
    Redirect(String),
    /// Transiently unavailable, leader unknown: try the next address.
    Rotate,
    /// Not retryable: hand the status to the caller.
    Fail,
}

impl Client {
    /// Creates a client over `endpoints` (`host:port` or `http://host:port`).
    ///
    /// Nothing connects here, so this needs no runtime and succeeds even when no node is up yet;
    /// connection failures surface (and are retried) on the first request.
    pub fn connect(endpoints: Vec<String>) -> anyhow::Result<Client> {
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
        Ok(Client {
            shared: Arc::new(Shared {
                endpoints: normalised,
                channels: Mutex::new(HashMap::new()),
                routing: Mutex::new(Routing::default()),
            }),
            timeout: DEFAULT_TIMEOUT,
            max_attempts: MAX_ATTEMPTS,
        })
    }

    /// Sets the overall deadline of each call, retries and backoff included.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// Sets the most attempts (first try included, at least 1) one call makes; default
    /// [`MAX_ATTEMPTS`].
    pub fn with_max_attempts(mut self, attempts: u32) -> Client {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The per-call deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The normalised addresses this client was created with.
    pub fn endpoints(&self) -> &[String] {
        &self.shared.endpoints
    }

    /// The leader address learnt from the last calls, if any.
    pub fn leader(&self) -> Option<String> {
        self.shared.routing.lock().unwrap().leader.clone()
    }

    /// Reads one item. With `stale`, any replica may answer from its local state, which may lag
    /// behind acknowledged writes; otherwise the read is linearizable.
    pub async fn get(
        &self,
        shard_key: impl Into<Bytes>,
        key: impl Into<Bytes>,
        stale: bool,
    ) -> Result<GetResponse, Status> {
        let req = GetRequest {
            header: None,
            shard_key: shard_key.into(),
            key: key.into(),
            consistency: consistency(stale) as i32,
        };
        self.call(req, stale, |mut kv, r| async move { kv.get(r).await })
            .await
    }

    /// Writes one item. With `if_version`, writes only when the item's version equals it
    /// (`Some(0)`: the item must not exist); a failed condition is `Ok` with `succeeded == false`.
    /// See the type's documentation about the outcome of a write that returned an error.
    pub async fn put(
        &self,
        shard_key: impl Into<Bytes>,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        if_version: Option<u64>,
    ) -> Result<PutResponse, Status> {
        let req = PutRequest {
            header: None,
            shard_key: shard_key.into(),
            key: key.into(),
            value: value.into(),
            if_version,
        };
        self.call(req, false, |mut kv, r| async move { kv.put(r).await })
            .await
    }

    /// Deletes one item, optionally only at `if_version`.
    /// See the type's documentation about the outcome of a write that returned an error.
    pub async fn delete(
        &self,
        shard_key: impl Into<Bytes>,
        key: impl Into<Bytes>,
        if_version: Option<u64>,
    ) -> Result<DeleteResponse, Status> {
        let req = DeleteRequest {
            header: None,
            shard_key: shard_key.into(),
            key: key.into(),
            if_version,
        };
        self.call(req, false, |mut kv, r| async move { kv.delete(r).await })
            .await
    }

    /// Reads one page of the keys in `[start, end)` of `shard_key` (an empty `end` means to the end
    /// of the shard key), at most `limit` items (0 = the server's page size). When more remain,
    /// the response's `next_key` is the `start` of the next page.
    pub async fn scan(
        &self,
        shard_key: impl Into<Bytes>,
        start: impl Into<Bytes>,
        end: impl Into<Bytes>,
        limit: u32,
        stale: bool,
    ) -> Result<ScanResponse, Status> {
        let req = ScanRequest {
            header: None,
            shard_key: shard_key.into(),
            start_key: start.into(),
            end_key: end.into(),
            limit,
            consistency: consistency(stale) as i32,
        };
        self.call(req, stale, |mut kv, r| async move { kv.scan(r).await })
            .await
    }

    /// Runs a transaction: checks `compares`, then runs the success or the failure ops atomically.
    /// See the type's documentation about the outcome of a write that returned an error.
    pub async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, Status> {
        self.call(req, false, |mut kv, r| async move { kv.txn(r).await })
            .await
    }

    /// Sends `req` with `rpc`, following leader hints and retrying as described on [`Client`].
    ///
    /// `stale` marks a read any replica may serve: a successful answer then says nothing about
    /// who leads, and with a single address the user asked for that replica specifically, so
    /// hints are not followed.
    async fn call<Req, Resp, F, Fut>(&self, req: Req, stale: bool, rpc: F) -> Result<Resp, Status>
    where
        Req: Clone,
        F: Fn(KvClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let deadline = Instant::now() + self.timeout;
        let pinned = stale && self.shared.endpoints.len() == 1;
        let mut redirected = false;
        let mut attempt = 0;
        loop {
            let addr = if pinned {
                self.shared.endpoints[0].clone()
            } else {
                self.target()
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(deadline_exceeded(self.timeout, attempt));
            }
            let kv =
                KvClient::new(self.channel(&addr)?).max_decoding_message_size(RESPONSE_BYTES_MAX);
            let mut request = tonic::Request::new(req.clone());
            // Tells the server how long we wait, so it can drop work nobody will read.
            request.set_timeout(remaining);
            // The header alone does not bound the wait on our side (e.g. a stalled connection).
            let status = match tokio::time::timeout(remaining, rpc(kv, request)).await {
                Ok(Ok(resp)) => {
                    if !stale {
                        self.shared.routing.lock().unwrap().leader = Some(addr);
                    }
                    return Ok(resp.into_inner());
                }
                Ok(Err(status)) => status,
                Err(_elapsed) => return Err(deadline_exceeded(self.timeout, attempt + 1)),
            };
            attempt += 1;

            let decision = classify(&status);
            if decision == Retry::Fail || attempt >= self.max_attempts {
                return Err(status);
            }
            if pinned && decision != Retry::Rotate {
                // Do not wander off to another node the user did not ask for.
                return Err(status);
            }
            tracing::debug!(
                addr = %addr,
                attempt,
                code = ?status.code(),
                message = status.message(),
                "retrying ordo request"
            );
            // The first redirect is followed at once: it is the normal way to find the leader.
            // Later ones back off too, so that nodes pointing at each other during an election
            // do not burn the attempts in a few milliseconds.
            let delay = match &decision {
                Retry::Redirect(_) if !redirected => Duration::ZERO,
                _ => backoff(attempt - 1),
            };
            if !pinned {
                self.reroute(&addr, decision, &mut redirected);
            }
            if !delay.is_zero() {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if delay >= remaining {
                    // The next attempt could not start in time; the last error says more than
                    // "deadline exceeded" would.
                    return Err(status);
                }
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// The address the next attempt goes to.
    fn target(&self) -> String {
        let routing = self.shared.routing.lock().unwrap();
        match &routing.leader {
            Some(leader) => leader.clone(),
            None => self.shared.endpoints[routing.next % self.shared.endpoints.len()].clone(),
        }
    }

    /// Updates the routing after `failed` answered with a retryable error.
    fn reroute(&self, failed: &str, decision: Retry, redirected: &mut bool) {
        let mut routing = self.shared.routing.lock().unwrap();
        match decision {
            Retry::Redirect(leader) => {
                *redirected = true;
                routing.leader = Some(leader);
            }
            Retry::Fail => {}
            Retry::Rotate => {
                // Another task may already have moved on; only forget the leader it failed on.
                if routing.leader.as_deref() == Some(failed) || routing.leader.is_none() {
                    routing.leader = None;
                    // Step past the failed address (it may be a hint outside the list, in which
                    // case any next address will do).
                    let endpoints = &self.shared.endpoints;
                    routing.next = match endpoints.iter().position(|e| e == failed) {
                        Some(i) => i + 1,
                        None => routing.next + 1,
                    } % endpoints.len();
                }
            }
        }
    }

    /// The cached channel to `addr`, created (without connecting) on first use.
    fn channel(&self, addr: &str) -> Result<Channel, Status> {
        let mut channels = self.shared.channels.lock().unwrap();
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let endpoint = Endpoint::from_shared(addr.to_string())
            .map_err(|e| Status::invalid_argument(format!("invalid address {addr:?}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
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

/// Decides what to do after `status`.
fn classify(status: &Status) -> Retry {
    if status.code() != Code::Unavailable {
        return Retry::Fail;
    }
    match error_detail_of(status) {
        Some(error_detail::Kind::NotLeader(nl)) if !nl.leader_addr.is_empty() => {
            match normalize_addr(&nl.leader_addr) {
                Ok(addr) => Retry::Redirect(addr),
                // A hint we cannot use is as good as no hint.
                Err(_) => Retry::Rotate,
            }
        }
        Some(error_detail::Kind::NotLeader(_)) | None => Retry::Rotate,
        // Routing errors are for a router to act on, not for a client talking to nodes.
        Some(error_detail::Kind::WrongShard(_)) => Retry::Fail,
    }
}

/// The typed detail a node attached to an error status, if any.
pub fn error_detail_of(status: &Status) -> Option<error_detail::Kind> {
    if status.details().is_empty() {
        return None;
    }
    ErrorDetail::decode(status.details()).ok()?.kind
}

/// Turns `host:port` into `http://host:port`; keeps `http://` addresses; rejects `https://` (this
/// build has no TLS) and empty input. A trailing `/` is dropped so that one address has one
/// spelling in the channel cache.
pub fn normalize_addr(raw: &str) -> anyhow::Result<String> {
    let trimmed = raw.trim();
    let host_port = match trimmed.split_once("://") {
        None => trimmed,
        Some(("http", rest)) => rest,
        Some(("https", _)) => bail!("endpoint {raw:?}: TLS is not supported, use http://"),
        Some(_) => bail!("endpoint {raw:?}: unsupported scheme, use host:port or http://host:port"),
    };
    let host_port = host_port.trim_end_matches('/');
    if host_port.is_empty() {
        bail!("endpoint {raw:?} has no host");
    }
    Ok(format!("http://{host_port}"))
}

/// Delay before retry number `retry` (0-based): 20 ms doubling up to 500 ms.
fn backoff(retry: u32) -> Duration {
    // Cap the shift so that the multiplication cannot overflow for large retry counts.
    let factor = 1u32 << retry.min(16);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn not_leader(leader_id: u64, leader_addr: &str) -> Status {
        let detail = ErrorDetail {
            kind: Some(error_detail::Kind::NotLeader(error_detail::NotLeader {
                leader_id,
                leader_addr: leader_addr.to_string(),
            })),
        };
        Status::with_details(
            Code::Unavailable,
            "not leader",
            detail.encode_to_vec().into(),
        )
    }

    #[test]
    fn addresses_are_normalised() {
        assert_eq!(
            normalize_addr("127.0.0.1:7001").unwrap(),
            "http://127.0.0.1:7001"
        );
        assert_eq!(
            normalize_addr(" localhost:7001/ ").unwrap(),
            "http://localhost:7001"
        );
        assert_eq!(
            normalize_addr("http://10.0.0.1:7001").unwrap(),
            "http://10.0.0.1:7001"
        );
        assert_eq!(normalize_addr("[::1]:7001").unwrap(), "http://[::1]:7001");
        assert!(normalize_addr("").is_err());
        assert!(normalize_addr("  ").is_err());
        assert!(normalize_addr("http://").is_err());
        assert!(normalize_addr("https://a:1").is_err());
        assert!(normalize_addr("grpc://a:1").is_err());
    }

    #[test]
    fn connect_validates_and_dedups_without_a_runtime() {
        let c = Client::connect(vec![
            "127.0.0.1:7001".into(),
            "http://127.0.0.1:7001".into(),
            "127.0.0.1:7002".into(),
        ])
        .unwrap();
        assert_eq!(
            c.endpoints(),
            ["http://127.0.0.1:7001", "http://127.0.0.1:7002"]
        );
        assert_eq!(c.timeout(), DEFAULT_TIMEOUT);
        assert_eq!(
            c.with_timeout(Duration::from_secs(3)).timeout(),
            Duration::from_secs(3)
        );
        assert!(Client::connect(vec![]).is_err());
        assert!(Client::connect(vec!["bad host:1".into()]).is_err());
    }

    #[test]
    fn backoff_doubles_from_20ms_and_is_capped() {
        assert_eq!(backoff(0), Duration::from_millis(20));
        assert_eq!(backoff(1), Duration::from_millis(40));
        assert_eq!(backoff(4), Duration::from_millis(320));
        assert_eq!(backoff(5), BACKOFF_MAX);
        let mut prev = Duration::ZERO;
        for retry in 0..100 {
            let d = backoff(retry);
            assert!(d >= prev && d <= BACKOFF_MAX && d >= BACKOFF_BASE);
            prev = d;
        }
        // Even if every attempt backs off fully, the attempts fit in the default deadline.
        let worst: Duration = (0..MAX_ATTEMPTS).map(backoff).sum();
        assert!(worst < DEFAULT_TIMEOUT, "{worst:?}");
    }

    #[test]
    fn statuses_are_classified() {
        assert_eq!(
            classify(&not_leader(2, "127.0.0.1:7002")),
            Retry::Redirect("http://127.0.0.1:7002".into())
        );
        assert_eq!(classify(&not_leader(0, "")), Retry::Rotate);
        assert_eq!(classify(&not_leader(2, "")), Retry::Rotate);
        assert_eq!(
            classify(&Status::unavailable("no leader elected yet")),
            Retry::Rotate
        );
        assert_eq!(
            classify(&Status::invalid_argument("key too long")),
            Retry::Fail
        );
        assert_eq!(classify(&Status::deadline_exceeded("slow")), Retry::Fail);
        assert_eq!(classify(&Status::unknown("connection reset")), Retry::Fail);
        // Garbage details are ignored rather than trusted.
        let junk = Status::with_details(Code::Unavailable, "x", Bytes::from_static(b"\xff\xff"));
        assert_eq!(classify(&junk), Retry::Rotate);
        let wrong_shard = ErrorDetail {
            kind: Some(error_detail::Kind::WrongShard(error_detail::WrongShard {
                map_version: 3,
            })),
        };
        let s = Status::with_details(Code::Unavailable, "x", wrong_shard.encode_to_vec().into());
        assert_eq!(classify(&s), Retry::Fail);
    }

    #[test]
    fn rerouting_follows_hints_and_rotates() {
        let c = Client::connect(vec!["a:1".into(), "b:1".into(), "c:1".into()]).unwrap();
        assert_eq!(c.target(), "http://a:1");
        let mut redirected = false;
        c.reroute(
            "http://a:1",
            Retry::Redirect("http://c:1".into()),
            &mut redirected,
        );
        assert!(redirected);
        assert_eq!(c.target(), "http://c:1");
        assert_eq!(c.leader().as_deref(), Some("http://c:1"));
        // The leader failed: forget it and move past it in the list.
        c.reroute("http://c:1", Retry::Rotate, &mut redirected);
        assert_eq!(c.leader(), None);
        assert_eq!(c.target(), "http://a:1");
        c.reroute("http://a:1", Retry::Rotate, &mut redirected);
        assert_eq!(c.target(), "http://b:1");
        // A failure on an address other than the remembered leader leaves the leader alone.
        c.reroute(
            "http://b:1",
            Retry::Redirect("http://a:1".into()),
            &mut redirected,
        );
        c.reroute("http://b:1", Retry::Rotate, &mut redirected);
        assert_eq!(c.target(), "http://a:1");
    }

    #[tokio::test]
    async fn unreachable_nodes_give_unavailable_within_the_deadline() {
        // Port 1 on localhost refuses connections: every attempt is a retryable Unavailable.
        let c = Client::connect(vec!["127.0.0.1:1".into()])
            .unwrap()
            .with_timeout(Duration::from_millis(300));
        let start = std::time::Instant::now();
        let err = c.get("o", "k", false).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    /// A scripted node: answers every request according to `reply` and counts the calls.
    mod fake {
        use super::*;
        use ordo_proto::v1::kv_server::{Kv, KvServer};
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tonic::{Request, Response};

        #[derive(Clone)]
        pub enum Reply {
            Serve,
            NotLeader(String),
            Unavailable,
            Invalid,
        }

        pub struct Node {
            pub reply: Mutex<Reply>,
            pub calls: AtomicUsize,
            pub consistency: Mutex<Option<i32>>,
        }

        impl Node {
            pub fn calls(&self) -> usize {
                self.calls.load(Ordering::SeqCst)
            }

            fn answer<T>(&self, ok: T) -> Result<Response<T>, Status> {
                self.calls.fetch_add(1, Ordering::SeqCst);
                match self.reply.lock().unwrap().clone() {
                    Reply::Serve => Ok(Response::new(ok)),
                    Reply::NotLeader(addr) => Err(not_leader(2, &addr)),
                    Reply::Unavailable => Err(Status::unavailable("no leader elected yet")),
                    Reply::Invalid => Err(Status::invalid_argument("bad key")),
                }
            }
        }

        /// The service wrapper (the trait cannot be implemented for `Arc<Node>` directly).
        struct Svc(Arc<Node>);

        #[tonic::async_trait]
        impl Kv for Svc {
            async fn get(&self, r: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
                *self.0.consistency.lock().unwrap() = Some(r.get_ref().consistency);
                let value = r.into_inner().key;
                self.0.answer(GetResponse {
                    found: true,
                    value,
                    version: 1,
                })
            }
            async fn put(&self, _: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
                self.0.answer(PutResponse {
                    succeeded: true,
                    version: 2,
                })
            }
            async fn delete(
                &self,
                _: Request<DeleteRequest>,
            ) -> Result<Response<DeleteResponse>, Status> {
                Err(Status::unimplemented("fake"))
            }
            async fn scan(
                &self,
                _: Request<ScanRequest>,
            ) -> Result<Response<ScanResponse>, Status> {
                Err(Status::unimplemented("fake"))
            }
            async fn txn(&self, _: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
                Err(Status::unimplemented("fake"))
            }
        }

        /// Starts a node on a free port; returns its `host:port` and its state.
        pub async fn start(reply: Reply) -> (String, Arc<Node>) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let node = Arc::new(Node {
                reply: Mutex::new(reply),
                calls: AtomicUsize::new(0),
                consistency: Mutex::new(None),
            });
            let service = KvServer::new(Svc(node.clone()));
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            (addr, node)
        }
    }

    #[tokio::test]
    async fn follows_the_leader_hint_and_remembers_it() {
        let (b, node_b) = fake::start(fake::Reply::Serve).await;
        let (a, node_a) = fake::start(fake::Reply::NotLeader(b.clone())).await;
        let c = Client::connect(vec![a.clone()]).unwrap();
        let got = c.get("o", "k", false).await.unwrap();
        assert_eq!(got.value, "k");
        assert_eq!(c.leader(), Some(format!("http://{b}")));
        assert_eq!((node_a.calls(), node_b.calls()), (1, 1));
        // The next call goes straight to the remembered leader.
        c.put("o", "k", "v", None).await.unwrap();
        assert_eq!((node_a.calls(), node_b.calls()), (1, 2));
        assert_eq!(
            *node_b.consistency.lock().unwrap(),
            Some(Consistency::Linearizable as i32)
        );
    }

    #[tokio::test]
    async fn rotates_past_nodes_without_a_leader() {
        let (a, node_a) = fake::start(fake::Reply::Unavailable).await;
        let (b, node_b) = fake::start(fake::Reply::NotLeader(String::new())).await;
        let (l, node_l) = fake::start(fake::Reply::Serve).await;
        let c = Client::connect(vec![a, b, l.clone()]).unwrap();
        c.put("o", "k", "v", Some(1)).await.unwrap();
        assert_eq!((node_a.calls(), node_b.calls(), node_l.calls()), (1, 1, 1));
        assert_eq!(c.leader(), Some(format!("http://{l}")));
    }

    #[tokio::test]
    async fn other_errors_are_returned_at_once() {
        let (a, node_a) = fake::start(fake::Reply::Invalid).await;
        let (b, node_b) = fake::start(fake::Reply::Serve).await;
        let c = Client::connect(vec![a, b]).unwrap();
        let err = c.get("o", "k", false).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.message(), "bad key");
        assert_eq!((node_a.calls(), node_b.calls()), (1, 0));
    }

    #[tokio::test]
    async fn gives_up_after_bounded_attempts_with_the_last_error() {
        let (a, node_a) = fake::start(fake::Reply::Unavailable).await;
        let c = Client::connect(vec![a]).unwrap().with_max_attempts(4);
        let err = c.get("o", "k", false).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(err.message(), "no leader elected yet");
        assert_eq!(node_a.calls(), 4);
    }

    #[tokio::test]
    async fn stale_reads_on_one_endpoint_stay_there() {
        let (b, node_b) = fake::start(fake::Reply::Serve).await;
        let (a, node_a) = fake::start(fake::Reply::NotLeader(b)).await;
        let c = Client::connect(vec![a]).unwrap();
        let err = c.get("o", "k", true).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(error_detail_of(&err).is_some(), "details stay inspectable");
        assert_eq!((node_a.calls(), node_b.calls()), (1, 0));
        // Once the replica serves, the stale answer comes from it and no leader is recorded.
        *node_a.reply.lock().unwrap() = fake::Reply::Serve;
        c.get("o", "k", true).await.unwrap();
        assert_eq!(
            *node_a.consistency.lock().unwrap(),
            Some(Consistency::Stale as i32)
        );
        assert_eq!(c.leader(), None);
    }
}
