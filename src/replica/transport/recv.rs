//! The receiving half of the transport: raft frames and snapshot streams arriving through
//! `Peer.Raft` / `Peer.InstallSnapshot` are checked (addressing, crc32, decoding) in full before
//! anything reaches the driver, so a bad frame changes nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ordo_proto::v1::{RaftBatch, SnapshotChunk, SnapshotDone};
use protobuf::Message as _;
use raft::prelude::{Message as RaftMessage, MessageType};
use tokio::io::AsyncWriteExt;
use tokio_stream::{Stream, StreamExt};
use tonic::{Status, Streaming};

use crate::limits::{SNAPSHOT_BYTES_MAX, SNAPSHOT_CHUNK_WAIT_MS};
use crate::replica::inbox::Msg;
use crate::replica::snapshot;
use crate::replica::ReplicaHandle;

fn refuse(msg: String) -> Status {
    tracing::warn!("refused peer message: {msg}");
    Status::invalid_argument(msg)
}

fn check_addressing(replica: &ReplicaHandle, group_id: u64, to: u64) -> Result<(), Status> {
    check_addressing_of(replica.group_id, replica.node_id, group_id, to)
}

fn check_addressing_of(group: u64, node: u64, group_id: u64, to: u64) -> Result<(), Status> {
    if group_id != group || to != node {
        return Err(refuse(format!(
            "message for group {group_id} node {to} reached group {group} node {node}"
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

/// Where a snapshot stream lands: the receiving replica's address and snapshot dir.
struct Landing<'a> {
    group_id: u64,
    node_id: u64,
    snap_dir: &'a Path,
}

/// A partial file, removed unless the transfer completes: a refused, failed or dropped stream
/// (its handler future dropped mid-await) leaves nothing on disk.
struct Partial(Option<PathBuf>);

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub(crate) async fn receive_snapshot(
    replica: &ReplicaHandle,
    stream: Streaming<SnapshotChunk>,
) -> Result<SnapshotDone, Status> {
    let at = Landing {
        group_id: replica.group_id,
        node_id: replica.node_id,
        snap_dir: &replica.snap_dir,
    };
    let (msg, path) = receive_file(&at, stream, SNAPSHOT_BYTES_MAX).await?;
    let meta = msg.get_snapshot().get_metadata();
    tracing::info!(
        node = replica.node_id,
        from = msg.from,
        index = meta.index,
        term = meta.term,
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

/// The first chunk's raft message, checked: a `MsgSnapshot` to this node.
fn first_message(at: &Landing<'_>, chunk: &SnapshotChunk) -> Result<RaftMessage, Status> {
    let mut m = RaftMessage::default();
    m.merge_from_bytes(&chunk.message)
        .map_err(|e| refuse(format!("snapshot message does not decode: {e}")))?;
    if m.get_msg_type() != MessageType::MsgSnapshot || m.to != at.node_id {
        return Err(refuse(format!(
            "first snapshot chunk carries {:?} to {}",
            m.get_msg_type(),
            m.to
        )));
    }
    Ok(m)
}

/// Writes a checked stream of at most `bytes_max` bytes to `in-<index>-<term>.snap` in the
/// snapshot dir and returns its raft message and path; on any refusal the partial file goes.
async fn receive_file(
    at: &Landing<'_>,
    mut stream: impl Stream<Item = Result<SnapshotChunk, Status>> + Unpin,
    bytes_max: u64,
) -> Result<(RaftMessage, PathBuf), Status> {
    let io = |e: std::io::Error| Status::internal(format!("writing received snapshot: {e}"));
    tokio::fs::create_dir_all(at.snap_dir).await.map_err(io)?;
    let tmp = at.snap_dir.join("incoming.snap.tmp");
    let mut partial = Partial(Some(tmp.clone()));
    let mut file = tokio::fs::File::create(&tmp).await.map_err(io)?;
    let mut msg: Option<RaftMessage> = None;
    let (mut expect_seq, mut written) = (0u64, 0u64);
    let chunk_wait = Duration::from_millis(SNAPSHOT_CHUNK_WAIT_MS);
    loop {
        let next = tokio::time::timeout(chunk_wait, stream.next())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no snapshot chunk arrived for {chunk_wait:?} after chunk {expect_seq}; transfer dropped, the sender retries"
                ))
            })?;
        let Some(chunk) = next.transpose()? else {
            return Err(refuse("snapshot stream ended before its last chunk".into()));
        };
        check_addressing_of(at.group_id, at.node_id, chunk.group_id, chunk.to)?;
        if chunk.seq != expect_seq {
            return Err(refuse(format!(
                "snapshot chunk {} arrived where {expect_seq} was expected",
                chunk.seq
            )));
        }
        snapshot::verify_chunk(chunk.seq, &chunk.message, &chunk.data, chunk.crc32)
            .map_err(|e| refuse(e.to_string()))?;
        written += chunk.data.len() as u64;
        if written > bytes_max {
            let why = format!(
                "snapshot stream from node {} is over {bytes_max} bytes (limits::SNAPSHOT_BYTES_MAX); refused, its partial file removed",
                chunk.from
            );
            tracing::warn!("{why}");
            return Err(Status::resource_exhausted(why));
        }
        if chunk.seq == 0 {
            msg = Some(first_message(at, &chunk)?);
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
    let path = at.snap_dir.join(format!("in-{index:020}-{term:020}.snap"));
    tokio::fs::rename(&tmp, &path).await.map_err(io)?;
    partial.0 = None;
    Ok((msg, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot file of `records` records at 42/3, cut into chunks of `chunk` bytes.
    fn chunks_of_a_file(
        dir: &Path,
        records: usize,
        chunk: usize,
    ) -> Vec<Result<SnapshotChunk, Status>> {
        let src = dir.join("src");
        std::fs::create_dir_all(&src).unwrap();
        let mut w = snapshot::Writer::create(snapshot::file_name(&src, 42, 3), 42, 3).unwrap();
        for i in 0..records {
            w.record(snapshot::TREE_DATA, format!("k{i}").as_bytes(), &[7; 100])
                .unwrap();
        }
        let bytes = std::fs::read(w.finish().unwrap()).unwrap();
        let mut m = RaftMessage::default();
        m.set_msg_type(MessageType::MsgSnapshot);
        (m.from, m.to) = (2, 1);
        m.mut_snapshot().mut_metadata().index = 42;
        m.mut_snapshot().mut_metadata().term = 3;
        let message: bytes::Bytes = m.write_to_bytes().unwrap().into();
        let pieces: Vec<&[u8]> = bytes.chunks(chunk).collect();
        let n = pieces.len();
        pieces
            .into_iter()
            .enumerate()
            .map(|(seq, data)| {
                let msg = if seq == 0 {
                    message.clone()
                } else {
                    bytes::Bytes::new()
                };
                Ok(SnapshotChunk {
                    group_id: 1,
                    from: 2,
                    to: 1,
                    seq: seq as u64,
                    crc32: snapshot::chunk_crc(&msg, data),
                    message: msg,
                    data: bytes::Bytes::copy_from_slice(data),
                    last: seq + 1 == n,
                })
            })
            .collect()
    }

    /// Where the tests' snapshots land: node 1 of group 1.
    fn landing(snap_dir: &Path) -> Landing<'_> {
        Landing {
            group_id: 1,
            node_id: 1,
            snap_dir,
        }
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn m5_a_snapshot_stream_over_the_cap_is_refused_and_its_file_removed() {
        let dir = tempfile::tempdir().unwrap();
        let snap_dir = dir.path().join("snap");
        let at = landing(&snap_dir);
        let chunks = chunks_of_a_file(dir.path(), 100, 4096);
        let total: u64 = chunks
            .iter()
            .map(|c| c.as_ref().unwrap().data.len() as u64)
            .sum();

        let s = receive_file(&at, tokio_stream::iter(chunks.clone()), total - 1)
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
        assert!(
            s.message().contains("SNAPSHOT_BYTES_MAX"),
            "names the limit: {s:?}"
        );
        assert!(
            files_in(&snap_dir).is_empty(),
            "nothing left: {:?}",
            files_in(&snap_dir)
        );

        // The same stream within the cap lands as a received snapshot, and only that.
        let (msg, path) = receive_file(&at, tokio_stream::iter(chunks), total)
            .await
            .unwrap();
        assert_eq!(msg.get_snapshot().get_metadata().index, 42);
        assert_eq!(snapshot::verify_file(&path).unwrap(), (42, 3));
        assert_eq!(
            files_in(&snap_dir),
            [format!("in-{:020}-{:020}.snap", 42, 3)]
        );
    }

    #[tokio::test]
    async fn m5_a_stream_that_fails_midway_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let snap_dir = dir.path().join("snap");
        let at = landing(&snap_dir);
        let mut chunks = chunks_of_a_file(dir.path(), 100, 4096);
        chunks.truncate(2);
        chunks.push(Err(Status::cancelled("sender went away")));
        let s = receive_file(&at, tokio_stream::iter(chunks), SNAPSHOT_BYTES_MAX)
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::Cancelled, "{s:?}");
        assert!(
            files_in(&snap_dir).is_empty(),
            "nothing left: {:?}",
            files_in(&snap_dir)
        );
    }
}
