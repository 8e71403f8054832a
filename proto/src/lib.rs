//! Everything needed to speak Ordo correctly, and nothing of the server: the generated `ordo.v1`
//! types and services, the slot hash every piece must agree on, error statuses and the one
//! retry-safety rule (`status`), the one address spelling and channel set-up (`addr`), the one
//! way to follow a leader (`retry`), the clients applications use (`client`), and the one way
//! every Ordo process serves gRPC within bounds (`serve`).
//!
//! An application that depends on this crate compiles no storage engine and no raft.

pub mod addr;
pub mod client;
mod dedup;
pub mod retry;
pub mod serve;
pub mod status;
mod txn;

pub use dedup::{request_digest, DEDUP_OUTCOME_BYTES_MAX, REQUEST_DIGEST_BYTES};

/// Most shard keys one change-feed watch filters on, at the router (`Feed.Watch`) and at the
/// node (`Peer.ReadChanges`, which the router forwards them to): each is compared with every
/// event read.
pub const FEED_SHARD_KEYS_MAX: usize = 1024;

/// Longest consumer-group name (`CreateGroupRequest.group`, `FeedAckRequest.group`, ...): it is
/// part of the key of the group's record in every slot and is carried by every ack, so it stays
/// short; routers and nodes check it alike.
pub const FEED_GROUP_NAME_BYTES_MAX: usize = 64;

/// Why `name` is not a consumer-group name, if it is not: 1 to [`FEED_GROUP_NAME_BYTES_MAX`]
/// bytes of ASCII letters, digits, `-`, `_` and `.` (printable in logs and in `ordoctl`, and
/// never a separator of the records that hold it).
pub fn check_group_name(name: &str) -> Result<(), String> {
    check_name(
        "group",
        name,
        FEED_GROUP_NAME_BYTES_MAX,
        "FEED_GROUP_NAME_BYTES_MAX",
    )
}

/// Longest member name (`Join.member`): in logs and in `ordoctl feed describe`.
pub const FEED_MEMBER_NAME_BYTES_MAX: usize = 128;

/// Why `name` is not a member name, if it is not: as a group name, up to
/// [`FEED_MEMBER_NAME_BYTES_MAX`] bytes (room for a host name and a process id).
pub fn check_member_name(name: &str) -> Result<(), String> {
    check_name(
        "member",
        name,
        FEED_MEMBER_NAME_BYTES_MAX,
        "FEED_MEMBER_NAME_BYTES_MAX",
    )
}

fn check_name(what: &str, name: &str, max: usize, max_name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > max {
        return Err(format!(
            "{what} name is {} bytes; it must have 1 to {max_name} ({max}) bytes",
            name.len()
        ));
    }
    match name
        .bytes()
        .find(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
    {
        Some(b) => Err(format!(
            "{what} name {name:?} holds {:?}; use ASCII letters, digits, '-', '_' and '.'",
            b as char
        )),
        None => Ok(()),
    }
}

/// Credits a member may hold (granted and not yet used; a `Join` or `Credit` taking it past is
/// refused): as many deliveries in flight to one member as NATS's `MaxAckPending` default.
/// Routers check it for a member's stream, nodes for each shard group's part of it.
pub const FEED_GROUP_CREDITS_MAX: u32 = 1024;

pub use status::{certainly_not_applied, connect_failed, error_detail_of};

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("ordo.v1");
}

/// A cross-group transaction whose locks are older than this may be aborted by anyone who meets
/// them: its coordinator is presumed gone. A lock's age is measured by the group holding it, on
/// its own clock, from when it applied the lock (`Locked.age_ms`), so clock skew between
/// machines cannot shorten or stretch it. Nodes and routers agree on it through this constant.
pub const TXN_LOCK_TIMEOUT_MS: u64 = 2_000;

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it). Never compared
/// across machines for correctness: it stamps records, orders transactions, seeds ids.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// 16 bytes unique to this process and call: a random per-process half (a std `RandomState`
/// hash of the clock and the process id) and a counter. Routers and clients make idempotency keys
/// with it, the router its cross-group transaction ids.
pub fn unique_id() -> bytes::Bytes {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let seed = *SEED.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        h.write_u128(now.map_or(0, |d| d.as_nanos()));
        h.write_u32(std::process::id());
        h.finish()
    });
    let mut id = seed.to_be_bytes().to_vec();
    id.extend_from_slice(&NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    id.into()
}

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

    #[test]
    fn unique_ids_are_16_bytes_and_distinct() {
        let (a, b) = (unique_id(), unique_id());
        assert_eq!((a.len(), b.len()), (16, 16));
        assert_ne!(a, b);
        assert_eq!(a[..8], b[..8], "one process, one random half");
    }
}
