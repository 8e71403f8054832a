//! Raft messages between replicas over the `ordo.v1.Peer` gRPC service.
//!
//! Each peer has one bounded queue and one task that keeps a client stream open to it, packing
//! queued messages into checksummed `RaftBatch` frames. A full queue drops messages (raft
//! retransmits; an unbounded buffer would not survive a slow peer). A broken connection is
//! reported to raft as unreachable and retried with backoff. Snapshots go on their own stream.
//!
//! Tests may give the transport a [`LinkFilter`] (`filter.rs`): every outgoing message and
//! snapshot transfer is then dropped, delayed or duplicated as the filter decides. Without one
//! (every production node) the send path is unchanged.

mod filter;
pub(crate) mod recv;

pub use filter::{Fate, LinkFilter};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ordo_proto::addr::peer_endpoint;
use ordo_proto::v1::peer_client::PeerClient;
use ordo_proto::v1::{RaftBatch, SnapshotChunk};
use protobuf::Message as _;
use raft::prelude::Message;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::limits::*;
use crate::replica::inbox::Msg;
use crate::replica::snapshot::chunk_crc;

const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(50);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The group's replica addresses (this one included), shared by the transport, which changes them
/// as membership changes are applied, and the services (not-leader hints, status).
pub type PeerAddrs = Arc<std::sync::RwLock<BTreeMap<u64, String>>>;

pub struct Transport {
    peers: PeerAddrs,
    queues: BTreeMap<u64, mpsc::Sender<Message>>,
    group_id: u64,
    node_id: u64,
    driver: mpsc::Sender<Msg>,
    rt: tokio::runtime::Handle,
    link_filter: Option<Arc<dyn LinkFilter>>,
}

fn peer_client(ch: Channel) -> PeerClient<Channel> {
    PeerClient::new(ch)
        .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX)
}

impl Transport {
    /// `peers` maps every replica of the group (this one included) to its address.
    pub fn new(
        rt: tokio::runtime::Handle,
        group_id: u64,
        node_id: u64,
        peers: PeerAddrs,
        driver: mpsc::Sender<Msg>,
        link_filter: Option<Arc<dyn LinkFilter>>,
    ) -> Transport {
        let initial = peers.read().unwrap().clone();
        let mut t = Transport {
            peers,
            queues: BTreeMap::new(),
            group_id,
            node_id,
            driver,
            rt,
            link_filter,
        };
        for (id, addr) in initial {
            t.add_peer(id, &addr);
        }
        t
    }

    pub fn addr_of(&self, id: u64) -> Option<String> {
        self.peers.read().unwrap().get(&id).cloned()
    }

    /// Every replica's address, this one's included.
    pub fn addrs(&self) -> BTreeMap<u64, String> {
        self.peers.read().unwrap().clone()
    }

    /// Starts sending to replica `id` at `addr` (a membership change added it), or moves it to a
    /// new address. The old connection, if any, ends with its queue.
    pub fn add_peer(&mut self, id: u64, addr: &str) {
        let known = self.peers.read().unwrap().get(&id).cloned();
        if known.as_deref() == Some(addr) && (id == self.node_id || self.queues.contains_key(&id)) {
            return;
        }
        self.peers.write().unwrap().insert(id, addr.to_string());
        if id == self.node_id {
            return;
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
        self.rt.spawn(peer_loop(
            self.group_id,
            self.node_id,
            id,
            addr.to_string(),
            rx,
            self.driver.clone(),
        ));
        self.queues.insert(id, tx);
    }

    /// Stops sending to replica `id` (a membership change removed it).
    pub fn remove_peer(&mut self, id: u64) {
        if id == self.node_id {
            return;
        }
        self.queues.remove(&id);
        self.peers.write().unwrap().remove(&id);
    }

    pub fn send(&self, m: Message) {
        let to = m.to;
        let Some(q) = self.queues.get(&to) else {
            tracing::warn!(to, "no address for raft peer; message dropped");
            return;
        };
        if let Some(filter) = &self.link_filter {
            match filter.fate(self.node_id, to) {
                Fate::Deliver => {}
                Fate::Drop => return,
                Fate::Delay(d) => return self.send_later(filter, q, m, d),
                Fate::Duplicate(d) => self.send_later(filter, q, m.clone(), d),
            }
        }
        enqueue(q, m);
    }

    /// Fault injection: queues `m` for its peer after `after`, unless the link was cut meanwhile
    /// or this node stopped (the weak sender then no longer upgrades).
    fn send_later(
        &self,
        filter: &Arc<dyn LinkFilter>,
        q: &mpsc::Sender<Message>,
        m: Message,
        after: Duration,
    ) {
        let (filter, q, from) = (filter.clone(), q.downgrade(), self.node_id);
        self.rt.spawn(async move {
            tokio::time::sleep(after).await;
            let q = q.upgrade().filter(|_| !filter.is_blocked(from, m.to));
            filter.delayed_done(q.is_some());
            if let Some(q) = q {
                enqueue(&q, m);
            }
        });
    }

    pub fn send_snapshot(&self, m: Message, path: PathBuf) {
        let to = m.to;
        let Some(addr) = self.addr_of(to) else {
            tracing::warn!(to, "no address for snapshot receiver");
            return;
        };
        let (group_id, from, driver) = (self.group_id, self.node_id, self.driver.clone());
        let link_filter = self.link_filter.clone();
        self.rt.spawn(async move {
            let started = std::time::Instant::now();
            let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let bound = snapshot_transfer_timeout(bytes);
            // Dropping the call on timeout resets its stream, which frees the receiver too.
            let bounded = |m, path| async move {
                tokio::time::timeout(bound, stream_snapshot(group_id, from, &addr, m, path))
                    .await
                    .unwrap_or_else(|_| {
                        Err(anyhow::anyhow!(
                            "transfer of {bytes} bytes took longer than {bound:?}"
                        ))
                    })
            };
            let result = match link_filter.map(|f| f.snapshot_fate(from, to)) {
                None => bounded(m, path).await,
                Some(Some(after)) => {
                    tokio::time::sleep(after).await;
                    bounded(m, path).await
                }
                Some(None) => Err(anyhow::anyhow!("fault injection: snapshot transfer cut")),
            };
            match &result {
                Ok(bytes) => tracing::info!(
                    to,
                    bytes,
                    ms = started.elapsed().as_millis() as u64,
                    "snapshot sent"
                ),
                Err(e) => {
                    tracing::warn!(to, error = %e, "snapshot transfer failed; raft will retry")
                }
            }
            let _ = driver
                .send(Msg::SnapshotSent {
                    to,
                    ok: result.is_ok(),
                })
                .await;
        });
    }
}

fn enqueue(q: &mpsc::Sender<Message>, m: Message) {
    if q.try_send(m).is_err() {
        tracing::debug!("peer queue full or closed; message dropped (raft will retransmit)");
    }
}

async fn peer_loop(
    group_id: u64,
    from: u64,
    to: u64,
    addr: String,
    mut rx: mpsc::Receiver<Message>,
    driver: mpsc::Sender<Msg>,
) {
    let mut backoff = RECONNECT_BACKOFF_MIN;
    // The first message of a batch, held across reconnects.
    let mut first: Option<Message> = None;
    loop {
        let m = match first.take() {
            Some(m) => m,
            None => match rx.recv().await {
                Some(m) => m,
                None => return, // the node is shutting down
            },
        };
        let channel = match peer_endpoint(&addr) {
            Ok(e) => e.connect().await,
            Err(e) => {
                tracing::error!(to, addr, error = %e, "bad peer address");
                return;
            }
        };
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(to, addr, error = %e, "peer unreachable");
                let _ = driver.try_send(Msg::Unreachable { to });
                // Drop what queued up meanwhile: raft will resend what still matters.
                while rx.try_recv().is_ok() {}
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                continue;
            }
        };
        let (frames_tx, frames_rx) = mpsc::channel::<RaftBatch>(64);
        let mut client = peer_client(channel);
        let call = tokio::spawn(async move {
            client
                .raft(tokio_stream::wrappers::ReceiverStream::new(frames_rx))
                .await
        });
        let mut next = Some(m);
        loop {
            let m = match next.take() {
                Some(m) => m,
                None => match rx.recv().await {
                    Some(m) => m,
                    None => return,
                },
            };
            let mut msgs = vec![m];
            while msgs.len() < PEER_BATCH_MESSAGES_MAX {
                match rx.try_recv() {
                    Ok(m) => msgs.push(m),
                    Err(_) => break,
                }
            }
            let encoded: Vec<bytes::Bytes> = msgs
                .iter()
                .map(|m| m.write_to_bytes().expect("raft message encodes").into())
                .collect();
            let mut h = crc32fast::Hasher::new();
            for e in &encoded {
                h.update(e);
            }
            let frame = RaftBatch {
                group_id,
                from,
                to,
                messages: encoded,
                crc32: h.finalize(),
            };
            if frames_tx.send(frame).await.is_err() {
                // The stream ended: keep the first message for the next connection.
                first = msgs.into_iter().next();
                break;
            }
            backoff = RECONNECT_BACKOFF_MIN;
        }
        match call.await {
            Ok(Err(status)) => tracing::debug!(to, %status, "raft stream to peer ended"),
            Ok(Ok(_)) => {}
            Err(e) => tracing::debug!(to, error = %e, "raft stream task failed"),
        }
        let _ = driver.try_send(Msg::Unreachable { to });
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
    }
}

async fn stream_snapshot(
    group_id: u64,
    from: u64,
    addr: &str,
    m: Message,
    path: PathBuf,
) -> anyhow::Result<u64> {
    let to = m.to;
    let channel = peer_endpoint(addr)?.connect().await?;
    let mut file = tokio::fs::File::open(&path).await?;
    let message: bytes::Bytes = m.write_to_bytes()?.into();
    let (tx, rx) = mpsc::channel::<SnapshotChunk>(4);
    let mut client = peer_client(channel);
    let call = tokio::spawn(async move {
        client
            .install_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let mut seq = 0u64;
    let mut sent = 0u64;
    loop {
        let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES];
        let mut n = 0;
        while n < buf.len() {
            let r = file.read(&mut buf[n..]).await?;
            if r == 0 {
                break;
            }
            n += r;
        }
        buf.truncate(n);
        let last = n < SNAPSHOT_CHUNK_BYTES;
        let msg = if seq == 0 {
            message.clone()
        } else {
            bytes::Bytes::new()
        };
        let chunk = SnapshotChunk {
            group_id,
            from,
            to,
            crc32: chunk_crc(&msg, &buf),
            message: msg,
            seq,
            data: buf.into(),
            last,
        };
        sent += chunk.data.len() as u64;
        if tx.send(chunk).await.is_err() {
            break;
        }
        seq += 1;
        if last {
            break;
        }
    }
    drop(tx);
    call.await??;
    Ok(sent)
}

impl crate::replica::outbox::Outbox for Transport {
    fn send(&self, m: Message) {
        Transport::send(self, m)
    }
    fn send_snapshot(&self, m: Message, path: PathBuf) {
        Transport::send_snapshot(self, m, path)
    }
    fn add_peer(&mut self, id: u64, addr: &str) {
        Transport::add_peer(self, id, addr)
    }
    fn remove_peer(&mut self, id: u64) {
        Transport::remove_peer(self, id)
    }
    fn addr_of(&self, id: u64) -> Option<String> {
        Transport::addr_of(self, id)
    }
    fn addrs(&self) -> BTreeMap<u64, String> {
        Transport::addrs(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ordo_proto::v1::peer_server::{Peer, PeerServer};
    use ordo_proto::v1::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    use tonic::{Request, Response, Status, Streaming};

    /// A peer that hands every raft message it receives to the test.
    struct Sink(mpsc::UnboundedSender<Message>);

    #[tonic::async_trait]
    impl Peer for Sink {
        type ReadChangesStream = tokio_stream::Empty<Result<ReadChangesResponse, Status>>;
        type ConsumeStream =
            tokio_stream::Empty<Result<ordo_proto::v1::PeerConsumeResponse, Status>>;

        async fn group_admin(
            &self,
            _: Request<ordo_proto::v1::GroupAdminRequest>,
        ) -> Result<Response<ordo_proto::v1::GroupAdminResponse>, Status> {
            Err(Status::unimplemented("sink"))
        }
        async fn consume(
            &self,
            _: Request<Streaming<ordo_proto::v1::PeerConsumeRequest>>,
        ) -> Result<Response<Self::ConsumeStream>, Status> {
            Err(Status::unimplemented("sink"))
        }

        async fn read_changes(
            &self,
            _: Request<ReadChangesRequest>,
        ) -> Result<Response<Self::ReadChangesStream>, Status> {
            Err(Status::unimplemented("sink"))
        }
        async fn raft(
            &self,
            req: Request<Streaming<RaftBatch>>,
        ) -> Result<Response<RaftDone>, Status> {
            let mut stream = req.into_inner();
            while let Some(b) = stream.message().await? {
                for bytes in b.messages {
                    let mut m = Message::default();
                    m.merge_from_bytes(&bytes).expect("decodes");
                    let _ = self.0.send(m);
                }
            }
            Ok(Response::new(RaftDone {}))
        }
        async fn install_snapshot(
            &self,
            _: Request<Streaming<SnapshotChunk>>,
        ) -> Result<Response<SnapshotDone>, Status> {
            Err(Status::unimplemented("sink"))
        }
        async fn status(
            &self,
            _: Request<StatusRequest>,
        ) -> Result<Response<StatusResponse>, Status> {
            Err(Status::unimplemented("sink"))
        }
        async fn transfer_leader(
            &self,
            _: Request<TransferLeaderRequest>,
        ) -> Result<Response<TransferLeaderResponse>, Status> {
            Err(Status::unimplemented("sink"))
        }
        async fn set_ownership(
            &self,
            _: Request<SetOwnershipRequest>,
        ) -> Result<Response<SetOwnershipResponse>, Status> {
            Err(Status::unimplemented("sink"))
        }
        async fn change_replicas(
            &self,
            _: Request<ChangeReplicasRequest>,
        ) -> Result<Response<ChangeReplicasResponse>, Status> {
            Err(Status::unimplemented("sink"))
        }
        async fn migrate_out(
            &self,
            _: Request<MigrateOutRequest>,
        ) -> Result<Response<MigrateOutResponse>, Status> {
            Err(Status::unimplemented("sink"))
        }
        async fn migrate_pull(
            &self,
            _: Request<MigratePullRequest>,
        ) -> Result<Response<MigratePullResponse>, Status> {
            Err(Status::unimplemented("sink"))
        }
        async fn migrate_ingest(
            &self,
            _: Request<MigrateIngestRequest>,
        ) -> Result<Response<MigrateIngestResponse>, Status> {
            Err(Status::unimplemented("sink"))
        }
        async fn migrate_clear(
            &self,
            _: Request<MigrateClearRequest>,
        ) -> Result<Response<MigrateClearResponse>, Status> {
            Err(Status::unimplemented("sink"))
        }
    }

    /// What [`Scripted`] does to every message of its one link while not blocked.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Mode {
        Deliver,
        /// Every message twice, the copy after up to this long.
        Duplicate(Duration),
        /// Every message after up to this long, spread so that they arrive out of order.
        Delay(Duration),
    }

    /// The smallest filter that exercises every path of the seam, and counts what it decided.
    /// (The test kit's `FaultNet` is the real one: partitions and seeded lossy links.)
    #[derive(Debug, Default)]
    struct Scripted {
        state: Mutex<(bool, Option<Mode>)>,
        sent: AtomicU64,
        blocked: AtomicU64,
        duplicated: AtomicU64,
        delayed: AtomicU64,
        delayed_lost: AtomicU64,
        delayed_pending: AtomicU64,
    }

    impl Scripted {
        fn set(&self, blocked: bool, mode: Mode) {
            *self.state.lock().unwrap() = (blocked, Some(mode));
        }

        fn get(c: &AtomicU64) -> u64 {
            c.load(Ordering::Relaxed)
        }
    }

    impl LinkFilter for Scripted {
        fn fate(&self, from: u64, to: u64) -> Fate {
            if self.is_blocked(from, to) {
                self.blocked.fetch_add(1, Ordering::Relaxed);
                return Fate::Drop;
            }
            let n = self.sent.fetch_add(1, Ordering::Relaxed);
            // Delays spread over [0, max] by a fixed stride: distinct, deterministic, shuffled.
            let spread = |max: Duration| max * ((n * 37) % 101) as u32 / 100;
            let fate = match self.state.lock().unwrap().1.unwrap_or(Mode::Deliver) {
                Mode::Deliver => return Fate::Deliver,
                Mode::Duplicate(max) => {
                    self.duplicated.fetch_add(1, Ordering::Relaxed);
                    Fate::Duplicate(spread(max))
                }
                Mode::Delay(max) => {
                    self.delayed.fetch_add(1, Ordering::Relaxed);
                    Fate::Delay(spread(max))
                }
            };
            self.delayed_pending.fetch_add(1, Ordering::Relaxed);
            fate
        }

        fn is_blocked(&self, _: u64, _: u64) -> bool {
            self.state.lock().unwrap().0
        }

        fn delayed_done(&self, delivered: bool) {
            self.delayed_pending.fetch_sub(1, Ordering::Relaxed);
            if !delivered {
                self.delayed_lost.fetch_add(1, Ordering::Relaxed);
            }
        }

        fn snapshot_fate(&self, from: u64, to: u64) -> Option<Duration> {
            (!self.is_blocked(from, to)).then_some(Duration::ZERO)
        }
    }

    fn msg(index: u64) -> Message {
        Message {
            from: 1,
            to: 2,
            index,
            ..Default::default()
        }
    }

    /// What arrives within `wait`, by index.
    async fn arrivals(rx: &mut mpsc::UnboundedReceiver<Message>, wait: Duration) -> Vec<u64> {
        let mut got = Vec::new();
        let until = tokio::time::Instant::now() + wait;
        while let Ok(Some(m)) = tokio::time::timeout_at(until, rx.recv()).await {
            got.push(m.index);
        }
        got
    }

    #[tokio::test]
    async fn a_link_filter_blocks_duplicates_delays_and_reorders_raft_messages() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PeerServer::new(Sink(tx)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let (driver, _driver_rx) = mpsc::channel(1024);
        let net = Arc::new(Scripted::default());
        let peers = BTreeMap::from([(1, "127.0.0.1:1".to_string()), (2, addr)]);
        let t = Transport::new(
            tokio::runtime::Handle::current(),
            1,
            1,
            Arc::new(std::sync::RwLock::new(peers)),
            driver,
            Some(net.clone() as Arc<dyn LinkFilter>),
        );
        let wait = Duration::from_millis(300);

        // Healthy: everything arrives, in order.
        (0..10).for_each(|i| t.send(msg(i)));
        assert_eq!(arrivals(&mut rx, wait).await, (0..10).collect::<Vec<_>>());

        // 1 → 2 cut: nothing arrives.
        net.set(true, Mode::Deliver);
        (10..20).for_each(|i| t.send(msg(i)));
        assert!(arrivals(&mut rx, wait).await.is_empty());

        // Duplicates: every message twice.
        net.set(false, Mode::Duplicate(Duration::from_millis(20)));
        (20..30).for_each(|i| t.send(msg(i)));
        let mut got = arrivals(&mut rx, wait).await;
        got.sort();
        assert_eq!(got, (20..30).flat_map(|i| [i, i]).collect::<Vec<_>>());

        // Spread delays: everything arrives, out of order.
        net.set(false, Mode::Delay(Duration::from_millis(100)));
        (30..60).for_each(|i| t.send(msg(i)));
        let got = arrivals(&mut rx, wait).await;
        assert_ne!(got, (30..60).collect::<Vec<_>>(), "reordered");
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(sorted, (30..60).collect::<Vec<_>>());

        // A link cut while messages are delayed loses them.
        (60..70).for_each(|i| t.send(msg(i)));
        net.set(true, Mode::Delay(Duration::from_millis(100)));
        assert!(arrivals(&mut rx, wait).await.is_empty());
        assert_eq!(Scripted::get(&net.delayed_pending), 0);
        assert_eq!(Scripted::get(&net.delayed_lost), 10);
        assert_eq!(
            (
                Scripted::get(&net.blocked),
                Scripted::get(&net.duplicated),
                Scripted::get(&net.delayed)
            ),
            (10, 10, 40)
        );
    }
}
