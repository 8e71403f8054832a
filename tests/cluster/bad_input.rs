//! Acceptance 5: every bad input is refused with the right status and changes nothing.

use std::time::Duration;

use ordo::limits::*;
use ordo::node::Node;
use ordo_proto::v1::kv_client::KvClient;
use ordo_proto::v1::peer_client::PeerClient;
use ordo_proto::v1::*;
use tonic::Code;

use ordo_testkit::inproc::lone_node;
use ordo_testkit::{endpoint, node_status, wait_for};

async fn single_node() -> (tempfile::TempDir, Node) {
    let dir = tempfile::tempdir().unwrap();
    let node = lone_node(dir.path().to_path_buf(), 1).await;
    (dir, node)
}

fn b(n: usize) -> bytes::Bytes {
    vec![b'x'; n].into()
}

fn put(sk: usize, key: usize, value: usize) -> PutRequest {
    PutRequest {
        shard_key: b(sk),
        key: b(key),
        value: b(value),
        ..Default::default()
    }
}

fn expect_invalid<T: std::fmt::Debug>(
    what: &str,
    r: Result<tonic::Response<T>, tonic::Status>,
    needle: &str,
) {
    let s = r.expect_err(what);
    assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
    assert!(
        s.message().contains(needle),
        "{what}: message {:?} should mention {needle:?}",
        s.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// One table of refusals against one node, each checked to change nothing: a list, not phases.
#[allow(clippy::too_many_lines)]
async fn bad_requests_are_refused_and_change_nothing() {
    let (_dir, node) = single_node().await;
    let addr = node.addr.to_string();
    let ch = endpoint(&addr).unwrap().connect_lazy();
    let mut kv = KvClient::new(ch.clone()).max_encoding_message_size(64 << 20);
    // One good write, so "unchanged" is checked against real data.
    wait_for("the single node to lead", Duration::from_secs(10), || {
        let mut kv = kv.clone();
        async move {
            kv.put(PutRequest {
                shard_key: b(3),
                value: b(5),
                ..Default::default()
            })
            .await
            .ok()
        }
    })
    .await;
    let before = node_status(&addr, true).await.unwrap();

    expect_invalid(
        "empty shard key",
        kv.put(put(0, 1, 1)).await,
        "shard_key is empty",
    );
    expect_invalid(
        "shard key > 256 B",
        kv.put(put(SHARD_KEY_BYTES_MAX + 1, 1, 1)).await,
        "256 bytes",
    );
    expect_invalid(
        "key > 4 KiB",
        kv.put(put(1, KEY_BYTES_MAX + 1, 1)).await,
        "4096 bytes",
    );
    expect_invalid(
        "value > 1 MiB",
        kv.put(put(1, 1, VALUE_BYTES_MAX + 1)).await,
        "1048576 bytes",
    );
    expect_invalid(
        "get with unknown consistency",
        kv.get(GetRequest {
            shard_key: b(3),
            consistency: 7,
            ..Default::default()
        })
        .await,
        "consistency 7",
    );
    expect_invalid(
        "delete with empty shard key",
        kv.delete(DeleteRequest::default()).await,
        "shard_key is empty",
    );
    expect_invalid(
        "scan limit",
        kv.scan(ScanRequest {
            shard_key: b(3),
            limit: 5000,
            ..Default::default()
        })
        .await,
        "1000",
    );
    let op = TxnOp {
        op: Some(txn_op::Op::Put(put(3, 1, 1))),
    };
    expect_invalid(
        "txn with 129 ops",
        kv.txn(TxnRequest {
            success: vec![op.clone(); TXN_OPS_MAX + 1],
            ..Default::default()
        })
        .await,
        "limit is 128",
    );
    let bad_compare = Compare {
        shard_key: b(3),
        target: 42,
        ..Default::default()
    };
    expect_invalid(
        "txn with an unknown compare target",
        kv.txn(TxnRequest {
            compares: vec![bad_compare],
            success: vec![op.clone()],
            ..Default::default()
        })
        .await,
        "target 42",
    );
    // A bad op anywhere refuses the whole txn, including its valid ops.
    expect_invalid(
        "txn with one oversized op",
        kv.txn(TxnRequest {
            success: vec![
                op,
                TxnOp {
                    op: Some(txn_op::Op::Put(put(1, 1, VALUE_BYTES_MAX + 1))),
                },
            ],
            ..Default::default()
        })
        .await,
        "1048576 bytes",
    );

    // Over the one message bound of nodes and routers: refused as a router refuses it
    // (`router/tests/router/routing.rs`), naming the bound.
    let s = kv
        .put(put(1, 1, ordo_proto::addr::KV_MESSAGE_BYTES_MAX))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
    assert!(
        s.message()
            .contains(&format!("{} bytes", ordo_proto::addr::KV_MESSAGE_BYTES_MAX)),
        "{s:?}"
    );

    // Peer API: a malformed raft message, a bad checksum, a misaddressed frame, a bad snapshot chunk.
    let mut peer = PeerClient::new(ch);
    let garbage = RaftBatch {
        group_id: 1,
        from: 2,
        to: 1,
        messages: vec![b(3)],
        crc32: crc32fast::hash(&b(3)),
    };
    let s = peer
        .raft(tokio_stream::iter(vec![garbage]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let bad_crc = RaftBatch {
        group_id: 1,
        from: 2,
        to: 1,
        messages: vec![b(3)],
        crc32: 1,
    };
    let s = peer
        .raft(tokio_stream::iter(vec![bad_crc]))
        .await
        .unwrap_err();
    assert!(s.message().contains("crc32"), "{s:?}");
    let wrong_group = RaftBatch {
        group_id: 9,
        from: 2,
        to: 1,
        ..Default::default()
    };
    let s = peer
        .raft(tokio_stream::iter(vec![wrong_group]))
        .await
        .unwrap_err();
    assert!(s.message().contains("group 9"), "{s:?}");
    let chunk = SnapshotChunk {
        group_id: 1,
        from: 2,
        to: 1,
        data: b(100),
        crc32: 7,
        last: true,
        ..Default::default()
    };
    let s = peer
        .install_snapshot(tokio_stream::iter(vec![chunk]))
        .await
        .unwrap_err();
    assert!(
        s.message().contains("crc32 mismatch") && s.message().contains("refused"),
        "{s:?}"
    );

    let after = node_status(&addr, true).await.unwrap();
    assert_eq!(
        (after.applied_index, after.items, after.data_digest),
        (before.applied_index, before.items, before.data_digest)
    );
    assert_eq!(after.term, before.term, "no bad message disturbed raft");
    node.shutdown().await;
}
