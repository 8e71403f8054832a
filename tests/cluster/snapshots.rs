//! Snapshot transfers as a peer sees them: a transfer cut off mid-stream frees the receiver for
//! the next one (audit H1).

use std::time::{Duration, Instant};

use ordo_proto::v1::peer_client::PeerClient;
use ordo_proto::v1::SnapshotChunk;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::sync::mpsc;
use tonic::Code;

use ordo_testkit::endpoint;
use ordo_testkit::inproc::lone_node;

/// The cut-off transfer's deadline, as a sender's `grpc-timeout`.
const CUT_DEADLINE: Duration = Duration::from_millis(200);
/// How long after the deadline the receiver may take to notice the dropped stream.
const FREED_WITHIN: Duration = Duration::from_secs(5);

/// A first chunk whose checks pass: addressed to node 1 of group 1, carrying a `MsgSnapshot`.
fn valid_first_chunk() -> SnapshotChunk {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgSnapshot);
    m.from = 2;
    m.to = 1;
    let message: bytes::Bytes = m.write_to_bytes().unwrap().into();
    let data = bytes::Bytes::from(vec![0u8; 1024]);
    let mut h = crc32fast::Hasher::new();
    h.update(&message);
    h.update(&data);
    SnapshotChunk {
        group_id: 1,
        from: 2,
        to: 1,
        seq: 0,
        crc32: h.finalize(),
        message,
        data,
        last: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_cut_snapshot_transfer_does_not_block_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let node = lone_node(dir.path().to_path_buf(), 1).await;
    let ch = endpoint(&node.addr.to_string()).unwrap().connect_lazy();
    let mut peer = PeerClient::new(ch);

    // A sender that sends its first chunk, then stalls until its deadline cuts the stream.
    let (tx, rx) = mpsc::channel(1);
    tx.send(valid_first_chunk()).await.unwrap();
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.set_timeout(CUT_DEADLINE);
    let cut = peer.install_snapshot(req).await.unwrap_err();
    assert!(
        matches!(cut.code(), Code::DeadlineExceeded | Code::Cancelled),
        "the stalled transfer ends at its deadline: {cut:?}"
    );

    // The next transfer is heard: its bad chunk is refused for what it is, not as "in progress".
    let started = Instant::now();
    loop {
        let bad = SnapshotChunk {
            crc32: 7,
            ..valid_first_chunk()
        };
        let s = peer
            .install_snapshot(tokio_stream::iter(vec![bad]))
            .await
            .unwrap_err();
        if !s.message().contains("already in progress") {
            assert!(s.message().contains("crc32 mismatch"), "{s:?}");
            break;
        }
        assert!(
            started.elapsed() < FREED_WITHIN,
            "a transfer cut off {:?} ago still blocks the next: {s:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(tx);
    node.shutdown().await;
}
