//! What nodes and cross-group coordinators agree on about idempotency keys: how a request is
//! told from another under the same key, and how large a kept outcome may be.

use crate::v1::TxnRequest;

/// Largest outcome a dedup entry keeps (nodes keep it; a cross-group coordinator sends it with
/// its decision). A writing Txn that also reads big values can answer
/// megabytes; such an outcome is not kept, and a retry with its key is told the first attempt
/// was applied (FAILED_PRECONDITION naming this limit) instead of getting its results again.
pub const DEDUP_OUTCOME_BYTES_MAX: usize = 64 * 1024;

/// Bytes of a [`request_digest`].
pub const REQUEST_DIGEST_BYTES: usize = 12;

/// A digest of everything in the request but its header (routing and key): FNV-1a 64 and crc32
/// of its encoding. It tells a retry from another request under the same key; it is not a
/// defence against a client forging collisions with its own keys. A node computes it for a
/// single-group Txn, a router for a cross-group one: a key keeps its meaning when a reshard
/// moves a Txn's items together or apart.
pub fn request_digest(t: &TxnRequest) -> [u8; REQUEST_DIGEST_BYTES] {
    let mut buf = Vec::new();
    for c in &t.compares {
        prost::encoding::message::encode(2, c, &mut buf);
    }
    for op in &t.success {
        prost::encoding::message::encode(3, op, &mut buf);
    }
    for op in &t.failure {
        prost::encoding::message::encode(4, op, &mut buf);
    }
    let fnv = buf.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut out = [0; REQUEST_DIGEST_BYTES];
    out[..8].copy_from_slice(&fnv.to_be_bytes());
    out[8..].copy_from_slice(&crc32fast::hash(&buf).to_be_bytes());
    out
}
