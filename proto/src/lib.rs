//! Everything needed to speak Ordo correctly, and nothing of the server: the generated `ordo.v1`
//! types and services, the slot hash every piece must agree on, error statuses and the one
//! retry-safety rule (`status`), the one address spelling and channel set-up (`addr`), the one
//! way to follow a leader (`retry`), and the clients applications use (`client`).
//!
//! An application that depends on this crate compiles no storage engine and no raft.

pub mod addr;
pub mod client;
pub mod retry;
pub mod status;

pub use status::{certainly_not_applied, connect_failed, error_detail_of};

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("ordo.v1");
}

/// A cross-group transaction whose locks are older than this (by its coordinator's clock) may be
/// aborted by anyone who meets them: its coordinator is presumed gone. Nodes and routers agree
/// on it through this constant.
pub const TXN_LOCK_TIMEOUT_MS: u64 = 2_000;

/// Most value bytes the Gets of one `Txn` return, on one group (checked at apply, the same on
/// every replica, before any value is copied) and across the groups of a cross-group `Txn`
/// (checked by its coordinator after the prepares, before anything is decided): a `Txn` of 127
/// Gets of 1 MiB items is about 3 KB on the wire, but its answer would be over every message
/// bound, and its evaluation would hold 127 MiB on every replica. Over it the `Txn` is refused
/// with `RESOURCE_EXHAUSTED` and none of its writes are applied. As large as a scan page: larger
/// reads page with `Scan`.
pub const TXN_RESULT_BYTES_MAX: usize = 4 * 1024 * 1024;

/// The slot of a shard key: `crc32(shard_key) mod slot_count`. Routers and nodes both call this,
/// so a key can never be routed by one rule and owned by another.
pub fn slot_of(shard_key: &[u8], slot_count: u32) -> u32 {
    assert!(slot_count > 0, "slot_count must be positive");
    crc32fast::hash(shard_key) % slot_count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_is_crc32_mod_count() {
        // The one-shot hash and the streaming hasher must agree: routers may use either.
        let mut h = crc32fast::Hasher::new();
        h.update(b"order-");
        h.update(b"1");
        assert_eq!(slot_of(b"order-1", 4096), h.finalize() % 4096);
        assert!(slot_of(b"anything", 7) < 7);
    }
}
