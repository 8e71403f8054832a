//! Ordo's wire contract: the generated `ordo.v1` types and services, plus the one function every
//! piece must agree on, the slot hash.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("ordo.v1");
}

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
