//! The feed cursor: opaque bytes a client hands back to resume a `Watch`, naming per watched
//! slot the last seq delivered (filtered-out events included).
//!
//! Layout (version 1), every number an unsigned LEB128 varint:
//!
//! ```text
//! version: u8 = 1 | slot_count | runs | run* | crc32 (4 bytes, little endian, of all before it)
//! run = gap | len | zigzag(seq - previous seq) * len
//! ```
//!
//! Only slots with a non-zero position are written (a slot left out is at 0: nothing delivered
//! yet, so a resume reads it from its first event). Slots go up in runs of consecutive slots:
//! `gap` is the number of slots skipped since the end of the previous run (since slot 0 for the
//! first), so a whole map costs a few bytes of slot numbers. Seqs are deltas from the previous
//! slot's seq (zigzag, since they go down as often as up): the slots of one map fill at about
//! the same rate, so a delta is one or two bytes where a seq would be three to five. The slot
//! count binds a cursor to a map of that many slots, so that a cursor of another cluster is
//! refused instead of read as positions of other slots.

use std::collections::BTreeMap;

/// The cursor layout this router writes and reads.
const VERSION: u8 = 1;
/// Bytes of the trailing checksum.
const CRC_BYTES: usize = 4;

/// Per slot, the last seq delivered; slots at 0 are left out.
pub(crate) type Positions = BTreeMap<u32, u64>;

/// Encodes `positions` (slots below `slot_count`, in slot order) as a cursor. Walks them twice
/// (runs, then seqs) so that nothing but the output is allocated.
pub(crate) fn encode<I>(slot_count: u32, positions: I) -> Vec<u8>
where
    I: IntoIterator<Item = (u32, u64)>,
    I::IntoIter: Clone,
{
    let positions = positions.into_iter().filter(|&(_, seq)| seq > 0);
    let runs = || {
        let mut slots = positions.clone().map(|(s, _)| s).peekable();
        std::iter::from_fn(move || {
            let first = slots.next()?;
            let mut len = 1u32;
            while slots.next_if_eq(&(first + len)).is_some() {
                len += 1;
            }
            Some((first, len))
        })
    };
    let mut out = Vec::with_capacity(16 + positions.clone().count() * 2);
    out.push(VERSION);
    put_varint(&mut out, u64::from(slot_count));
    put_varint(&mut out, runs().count() as u64);
    let mut seqs = positions.clone().map(|(_, seq)| seq);
    let (mut end, mut prev) = (0u32, 0u64);
    for (first, len) in runs() {
        put_varint(&mut out, u64::from(first - end));
        put_varint(&mut out, u64::from(len));
        for seq in seqs.by_ref().take(len as usize) {
            put_varint(&mut out, zigzag(seq.wrapping_sub(prev) as i64));
            prev = seq;
        }
        end = first + len;
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a cursor made by [`encode`] for a map of `slot_count` slots. The error says why it is
/// refused (the caller answers `INVALID_ARGUMENT` with it).
pub(crate) fn decode(bytes: &[u8], slot_count: u32) -> Result<Positions, String> {
    if bytes.len() < 1 + CRC_BYTES {
        return Err(format!(
            "cursor is {} bytes, shorter than any cursor (truncated?)",
            bytes.len()
        ));
    }
    if bytes[0] != VERSION {
        return Err(format!(
            "cursor version {} is not one this router reads (it reads version {VERSION})",
            bytes[0]
        ));
    }
    let (body, crc) = bytes.split_at(bytes.len() - CRC_BYTES);
    let crc = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    if crc32fast::hash(body) != crc {
        return Err("cursor checksum mismatch: the cursor is corrupt or truncated".into());
    }
    let mut r = Reader {
        bytes: &body[1..],
        at: 0,
    };
    let theirs = r.varint("slot count")?;
    if theirs != u64::from(slot_count) {
        return Err(format!(
            "cursor is for a map of {theirs} slots; this cluster has {slot_count}"
        ));
    }
    let runs = r.varint("run count")?;
    let mut positions = Positions::new();
    let (mut end, mut prev) = (0u64, 0u64);
    for _ in 0..runs {
        let first = end.saturating_add(r.varint("slot gap")?);
        let len = r.varint("run length")?;
        if len == 0 || first.saturating_add(len) > u64::from(slot_count) {
            return Err(format!(
                "cursor names slots {first}..{} of a {slot_count}-slot map",
                first.saturating_add(len)
            ));
        }
        for slot in first..first + len {
            let seq = prev.wrapping_add(unzigzag(r.varint("seq")?) as u64);
            if seq == 0 {
                return Err(format!("cursor gives slot {slot} position 0"));
            }
            positions.insert(slot as u32, seq);
            prev = seq;
        }
        end = first + len;
    }
    if r.at != r.bytes.len() {
        return Err(format!(
            "cursor has {} bytes after its last slot",
            r.bytes.len() - r.at
        ));
    }
    Ok(positions)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn varint(&mut self, what: &str) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.bytes.get(self.at) else {
                return Err(format!("cursor ends inside its {what}"));
            };
            self.at += 1;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(format!("cursor's {what} is longer than 10 bytes"))
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(slot_count: u32, p: &Positions) -> Vec<u8> {
        encode(slot_count, p.iter().map(|(&s, &seq)| (s, seq)))
    }

    fn positions(pairs: &[(u32, u64)]) -> Positions {
        pairs.iter().copied().collect()
    }

    #[test]
    fn cursors_round_trip() {
        let cases = [
            positions(&[]),
            positions(&[(0, 1)]),
            positions(&[(7, u64::MAX)]),
            positions(&[(0, 5), (1, 3), (2, 900), (10, 4), (11, 1), (4095, 1 << 40)]),
            (0..4096).map(|s| (s, u64::from(s) * 1000 + 1)).collect(),
        ];
        for p in cases {
            let bytes = enc(4096, &p);
            assert_eq!(decode(&bytes, 4096).unwrap(), p);
        }
        // Slots at 0 are left out: they decode as absent, which means 0.
        let with_zero = positions(&[(1, 0), (2, 8)]);
        assert_eq!(
            decode(&enc(16, &with_zero), 16).unwrap(),
            positions(&[(2, 8)])
        );
        assert_eq!(enc(16, &with_zero), enc(16, &positions(&[(2, 8)])));
    }

    /// A whole 4096-slot map after about four million events, spread as crc32 spreads shard
    /// keys (per slot within about a hundred of the mean): a few KiB, where 4096 plain
    /// (slot, seq) pairs would be 48 KiB.
    #[test]
    fn a_whole_map_fits_in_a_few_kib() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let p: Positions = (0..4096u32)
            .map(|s| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (s, 1000 + rng % 120)
            })
            .collect();
        let bytes = enc(4096, &p);
        // 5,029 bytes when written: about 1.2 bytes a slot.
        assert!(bytes.len() <= 6 * 1024, "{} bytes", bytes.len());
        assert_eq!(decode(&bytes, 4096).unwrap(), p);
        // Even seqs that differ wildly stay within 11 bytes a slot.
        let wild: Positions = (0..4096u32)
            .map(|s| (s, if s % 2 == 0 { u64::MAX } else { 1 }))
            .collect();
        assert!(enc(4096, &wild).len() <= 4096 * 11 + 16);
    }

    #[test]
    fn corrupt_cursors_are_refused_naming_why() {
        let good = enc(16, &positions(&[(3, 10), (4, 11), (9, 2)]));
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            let err = decode(&bad, 16).unwrap_err();
            assert!(
                err.contains("checksum") || err.contains("version"),
                "byte {i}: {err}"
            );
        }
        for len in 0..good.len() {
            assert!(decode(&good[..len], 16).is_err(), "truncated to {len}");
        }
        assert!(decode(&good, 32).unwrap_err().contains("map of 16 slots"));
        let mut v2 = good.clone();
        v2[0] = 2;
        assert!(decode(&v2, 16).unwrap_err().contains("version 2"));
    }

    /// A cursor whose checksum holds but whose contents do not (written by another encoder)
    /// is refused as well, never read as other positions.
    #[test]
    fn well_checksummed_nonsense_is_refused() {
        let seal = |body: Vec<u8>| {
            let mut b = body;
            let crc = crc32fast::hash(&b);
            b.extend_from_slice(&crc.to_le_bytes());
            b
        };
        // Slots 15..17 of a 16-slot map.
        let past_end = seal(vec![VERSION, 16, 1, 15, 2, 2, 2]);
        assert!(decode(&past_end, 16).unwrap_err().contains("slots 15..17"));
        // A seq of 0.
        let zero = seal(vec![VERSION, 16, 1, 0, 1, 0]);
        assert!(decode(&zero, 16).unwrap_err().contains("position 0"));
        // Trailing bytes.
        let trailing = seal(vec![VERSION, 16, 0, 7]);
        assert!(decode(&trailing, 16)
            .unwrap_err()
            .contains("after its last slot"));
        // A run that ends inside a varint.
        let cut = seal(vec![VERSION, 16, 1, 0, 1, 0x80]);
        assert!(decode(&cut, 16)
            .unwrap_err()
            .contains("ends inside its seq"));
    }
}
