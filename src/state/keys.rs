//! Layout of the data tree.
//!
//! Key: `slot (u32 BE) | len(shard_key) (u16 BE) | shard_key | key`. All items of one shard key are
//! one contiguous range (a `Scan`), and so are all items of one slot (a migration or a cleanup).
//! Order: by slot, then by shard key in *shortlex* order (length first, then bytes, because of
//! the length prefix), then by key in byte order.
//!
//! Value: `crc32 (u32 BE) | version (u64 BE) | value`, the checksum covering version and value, so
//! a flipped bit on disk is reported instead of served.
//!
//! Each slot also has a *reserved* range for replicated records that must travel with the slot
//! (a migration copies `[slot_start(s), slot_start(s + 1))` whole, and a cleanup deletes it whole):
//! `slot | 0xffff | kind | rest`. No shard key is 65535 bytes long, so the range sorts after every
//! item of the slot and no item key can fall in it; its values use the item encoding above.

use crate::error::{Error, Result};
use crate::limits::SHARD_KEY_BYTES_MAX;

const SLOT_BYTES: usize = 4;
const LEN_BYTES: usize = 2;
const VALUE_HEADER_BYTES: usize = 4 + 8;

const _: () = assert!(SHARD_KEY_BYTES_MAX <= u16::MAX as usize);

/// The prefix shared by every item of one shard key.
pub fn shard_prefix(slot: u32, shard_key: &[u8]) -> Vec<u8> {
    debug_assert!(shard_key.len() <= SHARD_KEY_BYTES_MAX);
    let mut out = Vec::with_capacity(SLOT_BYTES + LEN_BYTES + shard_key.len());
    out.extend_from_slice(&slot.to_be_bytes());
    out.extend_from_slice(&(shard_key.len() as u16).to_be_bytes());
    out.extend_from_slice(shard_key);
    out
}

pub fn encode_key(slot: u32, shard_key: &[u8], key: &[u8]) -> Vec<u8> {
    let mut out = shard_prefix(slot, shard_key);
    out.extend_from_slice(key);
    out
}

/// The first key of a slot; `slot_range(s)` covers `[slot_start(s), slot_start(s + 1))`.
pub fn slot_start(slot: u32) -> Vec<u8> {
    slot.to_be_bytes().to_vec()
}

/// The length field that marks a slot's reserved range (see the module comment).
const RESERVED_LEN: u16 = u16::MAX;
const _: () = assert!(SHARD_KEY_BYTES_MAX < RESERVED_LEN as usize);

/// A key of kind `kind` in a slot's reserved range; kinds are single bytes owned by the modules
/// that use them.
pub fn reserved_key(slot: u32, kind: u8, rest: &[u8]) -> Vec<u8> {
    let mut out = reserved_prefix(slot, kind);
    out.extend_from_slice(rest);
    out
}

/// Every key of kind `kind` in one slot.
pub fn reserved_prefix(slot: u32, kind: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(SLOT_BYTES + LEN_BYTES + 1);
    out.extend_from_slice(&slot.to_be_bytes());
    out.extend_from_slice(&RESERVED_LEN.to_be_bytes());
    out.push(kind);
    out
}

/// The slot of any key of the data tree, item or reserved.
pub fn slot_of(raw: &[u8]) -> Result<u32> {
    match raw.get(..SLOT_BYTES) {
        Some(b) if raw.len() >= SLOT_BYTES + LEN_BYTES => {
            Ok(u32::from_be_bytes(b.try_into().unwrap()))
        }
        _ => Err(Error::Corruption(format!(
            "data key of {} bytes is shorter than its header",
            raw.len()
        ))),
    }
}

/// `Some((slot, kind, rest))` when `raw` is in a slot's reserved range.
pub fn decode_reserved(raw: &[u8]) -> Option<(u32, u8, &[u8])> {
    let slot = slot_of(raw).ok()?;
    let len = u16::from_be_bytes(raw[SLOT_BYTES..SLOT_BYTES + LEN_BYTES].try_into().unwrap());
    let kind = *raw.get(SLOT_BYTES + LEN_BYTES)?;
    (len == RESERVED_LEN).then(|| (slot, kind, &raw[SLOT_BYTES + LEN_BYTES + 1..]))
}

/// Splits an encoded key into `(slot, shard_key, key)`.
pub fn decode_key(raw: &[u8]) -> Result<(u32, &[u8], &[u8])> {
    if raw.len() < SLOT_BYTES + LEN_BYTES {
        return Err(Error::Corruption(format!(
            "data key of {} bytes is shorter than its header",
            raw.len()
        )));
    }
    let slot = u32::from_be_bytes(raw[..SLOT_BYTES].try_into().unwrap());
    let len =
        u16::from_be_bytes(raw[SLOT_BYTES..SLOT_BYTES + LEN_BYTES].try_into().unwrap()) as usize;
    let rest = &raw[SLOT_BYTES + LEN_BYTES..];
    if rest.len() < len {
        return Err(Error::Corruption(format!(
            "data key declares a shard key of {len} bytes but holds {}",
            rest.len()
        )));
    }
    Ok((slot, &rest[..len], &rest[len..]))
}

pub fn encode_value(version: u64, value: &[u8]) -> Vec<u8> {
    encode_value_with(version, value.len(), |out| out.extend_from_slice(value))
}

/// A value in the item encoding whose body (`body_len` bytes) `write` appends in place: no
/// intermediate copy of it.
pub fn encode_value_with(
    version: u64,
    body_len: usize,
    write: impl FnOnce(&mut Vec<u8>),
) -> Vec<u8> {
    let mut out = Vec::with_capacity(VALUE_HEADER_BYTES + body_len);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&version.to_be_bytes());
    write(&mut out);
    let crc = crc32fast::hash(&out[4..]);
    out[..4].copy_from_slice(&crc.to_be_bytes());
    out
}

/// Verifies and splits a stored value into `(version, value)`. `raw_key` only names the item in
/// the error.
pub fn decode_value<'a>(raw_key: &[u8], raw: &'a [u8]) -> Result<(u64, &'a [u8])> {
    if raw.len() < VALUE_HEADER_BYTES {
        return Err(Error::Corruption(format!(
            "tree data, key {}: value of {} bytes is shorter than its header",
            printable(raw_key),
            raw.len()
        )));
    }
    let stored = u32::from_be_bytes(raw[..4].try_into().unwrap());
    let actual = crc32fast::hash(&raw[4..]);
    if stored != actual {
        return Err(Error::Corruption(format!(
            "tree data, key {}: crc32 mismatch (stored {stored:08x}, computed {actual:08x})",
            printable(raw_key)
        )));
    }
    let version = u64::from_be_bytes(raw[4..12].try_into().unwrap());
    Ok((version, &raw[12..]))
}

/// Bytes as text when they are printable ASCII, hex otherwise: for log lines and error messages.
pub fn printable(bytes: &[u8]) -> String {
    if bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("{:?}", String::from_utf8_lossy(bytes))
    } else {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("0x{hex}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shortlex(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
        a.len().cmp(&b.len()).then_with(|| a.cmp(b))
    }

    proptest! {
        #[test]
        fn key_round_trips(slot in 0u32..8192, sk in proptest::collection::vec(any::<u8>(), 1..=256),
                           key in proptest::collection::vec(any::<u8>(), 0..64)) {
            let raw = encode_key(slot, &sk, &key);
            let (s2, sk2, k2) = decode_key(&raw).unwrap();
            prop_assert_eq!(s2, slot);
            prop_assert_eq!(sk2, &sk[..]);
            prop_assert_eq!(k2, &key[..]);
            prop_assert!(raw.starts_with(&shard_prefix(slot, &sk)));
        }

        #[test]
        fn key_order_is_slot_then_shard_key_then_key(
            a in (0u32..4, proptest::collection::vec(0u8..4, 1..4), proptest::collection::vec(0u8..4, 0..4)),
            b in (0u32..4, proptest::collection::vec(0u8..4, 1..4), proptest::collection::vec(0u8..4, 0..4)),
        ) {
            let ea = encode_key(a.0, &a.1, &a.2);
            let eb = encode_key(b.0, &b.1, &b.2);
            let expected = a.0.cmp(&b.0)
                .then_with(|| shortlex(&a.1, &b.1))
                .then_with(|| a.2.cmp(&b.2));
            prop_assert_eq!(ea.cmp(&eb), expected);
        }

        #[test]
        fn value_round_trips(version in any::<u64>(), value in proptest::collection::vec(any::<u8>(), 0..256)) {
            let raw = encode_value(version, &value);
            let (v2, val2) = decode_value(b"k", &raw).unwrap();
            prop_assert_eq!(v2, version);
            prop_assert_eq!(val2, &value[..]);
        }

        #[test]
        fn any_flipped_bit_in_a_value_is_detected(value in proptest::collection::vec(any::<u8>(), 0..64),
                                                  bit in any::<prop::sample::Index>()) {
            let mut raw = encode_value(7, &value);
            let i = bit.index(raw.len() * 8);
            raw[i / 8] ^= 1 << (i % 8);
            prop_assert!(matches!(decode_value(b"k", &raw), Err(Error::Corruption(_))));
        }
    }

    #[test]
    fn items_of_one_shard_key_are_contiguous() {
        // "ab" sorts after every key of "a", even "a" + 0xff…, because the length prefix differs.
        let a_last = encode_key(1, b"a", &[0xff; 8]);
        let ab_first = encode_key(1, b"ab", b"");
        assert!(a_last < ab_first);
        assert!(encode_key(1, b"zz", b"x") < encode_key(2, b"a", b""));
    }

    #[test]
    fn a_slots_reserved_range_follows_its_items_and_stays_inside_the_slot() {
        let longest = vec![0xff; SHARD_KEY_BYTES_MAX];
        let r = reserved_key(7, b'd', b"id");
        assert!(encode_key(7, &longest, &[0xff; 64]) < reserved_prefix(7, 0));
        assert!(r < slot_start(8) && r > slot_start(7));
        assert_eq!(decode_reserved(&r), Some((7, b'd', &b"id"[..])));
        assert_eq!(decode_reserved(&encode_key(7, b"a", b"k")), None);
        assert_eq!(slot_of(&r).unwrap(), 7);
        assert!(decode_key(&r).is_err(), "a reserved key is not an item");
    }
}
