//! The one way an Ordo process serves gRPC: nodes, config servers and routers all go through
//! [`serve`], so every server has the same bounds on what its callers can make it hold
//! (reliability audit M1; tonic's defaults bound none of them):
//!
//! - **Streams per connection** ([`STREAMS_PER_CONNECTION_MAX`], HTTP/2
//!   `SETTINGS_MAX_CONCURRENT_STREAMS`): tonic passes "no limit", overriding hyper's 200. It is
//!   also the per-connection concurrency limit: h2 refuses a stream past it, so at most that many
//!   handlers run for one connection, and a well-behaved client queues further requests on its
//!   side instead of failing them. (tonic's `concurrency_limit_per_connection` is not used: it
//!   queues streams that are already open, and their unread bodies hold the connection's flow
//!   control window, which can stall the requests being served on it.)
//! - **Connections** ([`ServeLimits::connections_max`]): each accepted connection holds a permit;
//!   past the cap a new connection is closed at once (its client sees `UNAVAILABLE` and backs
//!   off) while the open ones keep working. Refusals are logged once per burst. Server
//!   keepalive pings close connections whose client vanished, so they do not hold the cap.
//! - **Request bytes** ([`RequestBudget`]): the bytes of requests being received or handled,
//!   summed over the whole process, are bounded. A request takes its size from the budget when
//!   its gRPC message header arrives, before the message is buffered, and gives it back when its
//!   handler has answered; one that does not fit is refused with `RESOURCE_EXHAUSTED` naming the
//!   budget, before anything decodes it, so it changes nothing. The two client-streaming calls,
//!   `Peer.Raft` and `Peer.InstallSnapshot`, are not counted: their stream lasts as long as the
//!   connection, they hold one message at a time (raft messages then go into the driver's
//!   bounded raft queue, snapshot chunks to disk), and refusing raft traffic because clients
//!   filled the budget would starve the group's heartbeats (audit M10).
//!
//! There is no server-wide handler timeout: tonic's would cover a client stream's whole life
//! (cutting `Peer.Raft`), and every handler bounds its own wait (a node's requests wait at most
//! 10 s for the driver, a router's work is bounded by its deadline).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::service::Routes;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::Status;

/// Most concurrent streams (requests in flight) on one connection. A router sends all its
/// clients' requests to a node over one connection, so this is the router's concurrency towards
/// one node; further requests wait in the client's HTTP/2 layer, not in the server.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 256;
/// Default connection cap of one server: below the common soft file-descriptor limit of 1024,
/// leaving room for storage files and outgoing connections. Routers, peers and admin tools need a
/// handful each; applications should connect through routers.
pub const CONNECTIONS_MAX_DEFAULT: usize = 512;
/// Largest connection cap accepted (`--connections-max`).
pub const CONNECTIONS_MAX_LIMIT: usize = 65_536;
/// Default request-bytes budget of a process: about 28 of the largest node requests (9 MiB) or
/// thousands of ordinary ones at once; requests in flight then hold a few times this at most
/// (the received bytes, their decoded copy, the raft entry made of them).
pub const REQUEST_BYTES_BUDGET_DEFAULT: usize = 256 * 1024 * 1024;
/// Smallest budget accepted: the largest client message any Ordo server decodes (routers and
/// nodes alike), so that every valid request fits when nothing else is in flight.
pub const REQUEST_BYTES_BUDGET_MIN: usize = crate::addr::KV_MESSAGE_BYTES_MAX;
/// Largest budget accepted (`--request-bytes-budget`); beyond it the budget bounds nothing real.
pub const REQUEST_BYTES_BUDGET_MAX: usize = 64 * 1024 * 1024 * 1024;
/// The server pings each connection this often and closes it if the ping is not answered within
/// the timeout: a client that vanished without closing does not hold a connection permit forever.
pub const SERVER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const SERVER_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Calls whose request is a stream lasting as long as the connection, not counted in the
/// request-bytes budget (see the module doc).
const UNBUDGETED_PATHS: [&str; 2] = ["/ordo.v1.Peer/Raft", "/ordo.v1.Peer/InstallSnapshot"];

/// Bytes of gRPC framing before each message: a compression flag and a 4-byte length.
const GRPC_HEADER_BYTES: usize = 5;

/// The bytes that requests in flight may hold, shared by every server of a process that is
/// given a clone (the playground shares one among all its nodes and routers).
#[derive(Clone, Debug)]
pub struct RequestBudget {
    free: Arc<Semaphore>,
    bytes: usize,
}

impl RequestBudget {
    /// A budget of `bytes`, within [`REQUEST_BYTES_BUDGET_MIN`]..=[`REQUEST_BYTES_BUDGET_MAX`].
    pub fn new(bytes: usize) -> anyhow::Result<RequestBudget> {
        anyhow::ensure!(
            (REQUEST_BYTES_BUDGET_MIN..=REQUEST_BYTES_BUDGET_MAX).contains(&bytes),
            "a request-bytes budget of {bytes} bytes is outside \
             {REQUEST_BYTES_BUDGET_MIN}..={REQUEST_BYTES_BUDGET_MAX} (REQUEST_BYTES_BUDGET_MIN, \
             the largest client message, ..= REQUEST_BYTES_BUDGET_MAX)"
        );
        Ok(RequestBudget {
            free: Arc::new(Semaphore::new(bytes)),
            bytes,
        })
    }

    /// The whole budget.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Bytes not held by any request now.
    pub fn available(&self) -> usize {
        self.free.available_permits()
    }
}

/// The bounds of one server (see the module doc).
#[derive(Clone, Debug)]
pub struct ServeLimits {
    /// Most connections open at once; past it new ones are closed at once.
    pub connections_max: usize,
    pub request_bytes: RequestBudget,
}

impl ServeLimits {
    /// Limits with `connections_max` (1..=[`CONNECTIONS_MAX_LIMIT`]) and a new budget of
    /// `request_bytes` (see [`RequestBudget::new`]).
    pub fn new(connections_max: usize, request_bytes: usize) -> anyhow::Result<ServeLimits> {
        anyhow::ensure!(
            (1..=CONNECTIONS_MAX_LIMIT).contains(&connections_max),
            "a connection cap of {connections_max} is outside 1..={CONNECTIONS_MAX_LIMIT} \
             (CONNECTIONS_MAX_LIMIT)"
        );
        Ok(ServeLimits {
            connections_max,
            request_bytes: RequestBudget::new(request_bytes)?,
        })
    }
}

impl Default for ServeLimits {
    fn default() -> ServeLimits {
        ServeLimits::new(CONNECTIONS_MAX_DEFAULT, REQUEST_BYTES_BUDGET_DEFAULT)
            .expect("the defaults are within their bounds")
    }
}

/// Serves `routes` on `listener` within `limits` until `shutdown` resolves, then drains the open
/// connections.
pub async fn serve(
    routes: Routes,
    listener: TcpListener,
    limits: &ServeLimits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let service = Budgeted {
        inner: routes.prepare(),
        budget: limits.request_bytes.clone(),
    };
    tonic::transport::Server::builder()
        .max_concurrent_streams(STREAMS_PER_CONNECTION_MAX)
        .http2_keepalive_interval(Some(SERVER_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(SERVER_KEEPALIVE_TIMEOUT))
        .serve_with_incoming_shutdown(
            service,
            CappedIncoming::new(listener, limits.connections_max),
            shutdown,
        )
        .await
}

/// Accepts connections while fewer than the cap are open; closes the others at once.
struct CappedIncoming {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    cap: usize,
    /// Connections refused since the cap was last reached.
    refused: u64,
}

impl CappedIncoming {
    fn new(listener: TcpListener, cap: usize) -> CappedIncoming {
        CappedIncoming {
            listener,
            permits: Arc::new(Semaphore::new(cap)),
            cap,
            refused: 0,
        }
    }
}

impl tokio_stream::Stream for CappedIncoming {
    type Item = io::Result<CappedConn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let (io, _) = match ready!(this.listener.poll_accept(cx)) {
                Ok(accepted) => accepted,
                Err(e) => return Poll::Ready(Some(Err(e))),
            };
            let Ok(permit) = this.permits.clone().try_acquire_owned() else {
                if this.refused == 0 {
                    tracing::warn!(
                        cap = this.cap,
                        "connection cap reached: refusing new connections until some close"
                    );
                }
                this.refused += 1;
                continue;
            };
            if this.refused > 0 {
                tracing::info!(
                    cap = this.cap,
                    refused = this.refused,
                    "accepting connections again"
                );
                this.refused = 0;
            }
            // Answers over ~256 bytes would otherwise wait for the peer's delayed ACK (40 ms).
            if let Err(e) = io.set_nodelay(true) {
                tracing::debug!(error = %e, "could not set TCP_NODELAY");
            }
            return Poll::Ready(Some(Ok(CappedConn {
                io,
                _permit: permit,
            })));
        }
    }
}

/// An accepted connection, holding its place under the cap until it closes.
struct CappedConn {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for CappedConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for CappedConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, b)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The routes, with every request's bytes taken from the budget (see the module doc).
#[derive(Clone)]
struct Budgeted {
    inner: Routes,
    budget: RequestBudget,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl Service<http::Request<Body>> for Budgeted {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<http::Request<Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> ResponseFuture {
        if UNBUDGETED_PATHS.contains(&req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        let held = Arc::new(Held {
            budget: self.budget.clone(),
            bytes: AtomicUsize::new(0),
        });
        let body = held.clone();
        let response = self.inner.call(req.map(|inner| {
            Body::new(Metered {
                inner,
                held: body,
                header: [0; GRPC_HEADER_BYTES],
                header_len: 0,
                payload_left: 0,
            })
        }));
        Box::pin(async move {
            let response = response.await;
            // The handler has answered: what it was given is no longer held.
            drop(held);
            response
        })
    }
}

/// The budget bytes one request holds, given back when both its body and its handler are done.
struct Held {
    budget: RequestBudget,
    bytes: AtomicUsize,
}

impl Held {
    /// Takes `n` more bytes for this request, or refuses it.
    fn take(&self, n: usize) -> Result<(), Status> {
        let permit = u32::try_from(n)
            .ok()
            .and_then(|n32| self.budget.free.try_acquire_many(n32).ok());
        let Some(permit) = permit else {
            return Err(Status::resource_exhausted(format!(
                "a request of {n} bytes does not fit in this server's request-bytes budget of {} \
                 bytes ({} free; --request-bytes-budget): it was refused unread and changed \
                 nothing, retry with backoff",
                self.budget.bytes,
                self.budget.available()
            )));
        };
        permit.forget();
        self.bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.free.add_permits(*self.bytes.get_mut());
    }
}

/// A request body that takes each gRPC message's size from the budget as its header arrives.
struct Metered {
    inner: Body,
    held: Arc<Held>,
    header: [u8; GRPC_HEADER_BYTES],
    header_len: usize,
    /// Bytes of the current message still to come.
    payload_left: usize,
}

impl Metered {
    fn count(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(data.len());
                self.payload_left -= n;
                data = &data[n..];
                continue;
            }
            let n = (GRPC_HEADER_BYTES - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len == GRPC_HEADER_BYTES {
                self.header_len = 0;
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.payload_left = len;
                self.held.take(GRPC_HEADER_BYTES + len)?;
            }
        }
        Ok(())
    }
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
            if let Err(refused) = this.count(data) {
                return Poll::Ready(Some(Err(refused)));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
