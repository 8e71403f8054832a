//! The receiving half of the transport: raft frames and snapshot streams arriving through
//! `Peer.Raft` / `Peer.InstallSnapshot` are checked (addressing, crc32, decoding) in full before
//! anything reaches the driver, so a bad frame changes nothing.

use ordo_proto::v1::{RaftBatch, SnapshotChunk, SnapshotDone};
use protobuf::Message as _;
use raft::prelude::{Message as RaftMessage, MessageType};
use tokio::io::AsyncWriteExt;
use tonic::{Status, Streaming};

use crate::replica::inbox::Msg;
use crate::replica::snapshot;
use crate::replica::ReplicaHandle;

fn refuse(msg: String) -> Status {
    tracing::warn!("refused peer message: {msg}");
    Status::invalid_argument(msg)
}

fn check_addressing(replica: &ReplicaHandle, group_id: u64, to: u64) -> Result<(), Status> {
    if group_id != replica.group_id || to != replica.node_id {
        return Err(refuse(format!(
            "message for group {group_id} node {to} reached group {} node {}",
            replica.group_id, replica.node_id
        )));
    }
    Ok(())
}

/// Checks and decodes a whole frame before any of it is delivered: a bad frame changes nothing.
pub(crate) fn decode_batch(
    replica: &ReplicaHandle,
    b: &RaftBatch,
) -> Result<Vec<RaftMessage>, Status> {
    check_addressing(replica, b.group_id, b.to)?;
    let mut h = crc32fast::Hasher::new();
    for m in &b.messages {
        h.update(m);
    }
    if h.finalize() != b.crc32 {
        return Err(refuse(format!(
            "raft batch from node {}: crc32 mismatch",
            b.from
        )));
    }
    b.messages
        .iter()
        .map(|bytes| {
            let mut m = RaftMessage::default();
            m.merge_from_bytes(bytes).map_err(|e| {
                refuse(format!(
                    "raft message from node {} does not decode: {e}",
                    b.from
                ))
            })?;
            if m.to != replica.node_id || m.from != b.from {
                return Err(refuse(format!(
                    "raft message from {} to {} inside a frame from {} to {}",
                    m.from, m.to, b.from, b.to
                )));
            }
            Ok(m)
        })
        .collect()
}

pub(crate) async fn receive_snapshot(
    replica: &ReplicaHandle,
    mut stream: Streaming<SnapshotChunk>,
) -> Result<SnapshotDone, Status> {
    let io = |e: std::io::Error| Status::internal(format!("writing received snapshot: {e}"));
    tokio::fs::create_dir_all(&replica.snap_dir)
        .await
        .map_err(io)?;
    let tmp = replica.snap_dir.join("incoming.snap.tmp");
    let mut file = tokio::fs::File::create(&tmp).await.map_err(io)?;
    let mut msg: Option<RaftMessage> = None;
    let mut expect_seq = 0u64;
    loop {
        let Some(chunk) = stream.message().await? else {
            return Err(refuse("snapshot stream ended before its last chunk".into()));
        };
        check_addressing(replica, chunk.group_id, chunk.to)?;
        if chunk.seq != expect_seq {
            return Err(refuse(format!(
                "snapshot chunk {} arrived where {expect_seq} was expected",
                chunk.seq
            )));
        }
        snapshot::verify_chunk(chunk.seq, &chunk.message, &chunk.data, chunk.crc32)
            .map_err(|e| refuse(e.to_string()))?;
        if chunk.seq == 0 {
            let mut m = RaftMessage::default();
            m.merge_from_bytes(&chunk.message)
                .map_err(|e| refuse(format!("snapshot message does not decode: {e}")))?;
            if m.get_msg_type() != MessageType::MsgSnapshot || m.to != replica.node_id {
                return Err(refuse(format!(
                    "first snapshot chunk carries {:?} to {}",
                    m.get_msg_type(),
                    m.to
                )));
            }
            msg = Some(m);
        }
        file.write_all(&chunk.data).await.map_err(io)?;
        expect_seq += 1;
        if chunk.last {
            break;
        }
    }
    file.sync_all().await.map_err(io)?;
    drop(file);
    let msg = msg.expect("chunk 0 was checked");
    let meta = msg.get_snapshot().get_metadata();
    let (index, term) = snapshot::verify_file(&tmp).map_err(|e| refuse(e.to_string()))?;
    if (index, term) != (meta.index, meta.term) {
        return Err(refuse(format!(
            "snapshot file holds {index}/{term} but its message says {}/{}",
            meta.index, meta.term
        )));
    }
    let path = replica
        .snap_dir
        .join(format!("in-{index:020}-{term:020}.snap"));
    tokio::fs::rename(&tmp, &path).await.map_err(io)?;
    tracing::info!(
        node = replica.node_id,
        from = msg.from,
        index,
        term,
        "received snapshot"
    );
    replica
        .driver
        .send(Msg::SnapshotReceived {
            msg: Box::new(msg),
            path,
        })
        .await
        .map_err(|_| Status::unavailable("replica is shutting down"))?;
    Ok(SnapshotDone {})
}
