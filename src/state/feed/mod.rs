//! The change feed's log (issue 13): every committed change of every item, per slot, written at
//! apply in the same sled transaction as the data, on every replica.
//!
//! Records live in each slot's reserved range (`keys::reserved_key`, kind `e`), so a move copies
//! them, its change log carries their changes (they are written through `TxView`), and
//! snapshots, `CLEAR` and digests treat them as records of the slot: the log moves with its slot
//! by itself. Values use the item encoding (checksummed, version 0).
//! - `slot | 0xffff | e | 0 | seq u64 BE` → the event, a `ChangeEvent` in its wire format;
//! - `slot | 0xffff | e | 1` → the slot's [`Meta`]: first and last seq held, bytes held, the
//!   floor of the next event's commit time, and the commit time of the last event trimmed.
//!
//! One event per changed item, in op order with consecutive seqs (dense per slot from 1): each
//! Put, each Delete of an existing item, each Emit, and the decided branch of a 2PC Finish (with
//! its transaction id). Prepares, aborts, refused transactions, Gets, migration ingest and
//! clear write none. The commit time is the entry's effective time (`next_ts`), never below
//! the slot's floor, so it is non-decreasing per slot, also across a move (a fence raises the
//! floor of its slots to the fence's time, see `migrate`). What is captured (nothing, new
//! values, or new and old values) comes with the leader's stamp, so every replica writes the
//! same bytes. Trimming (retention) is a replicated decision: a checkpoint entry names per slot
//! the seq below which events go, at most `FEED_TRIM_EVENTS_MAX` per entry.

use std::collections::BTreeMap;

use ordo_proto::v1::change_event::Op;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};

use super::{keys, tx_err, TxView};
use crate::error::{Error, Result};

mod read;
#[cfg(test)]
pub(super) mod tests;
mod tips;
mod trim;

pub(super) use read::last_seq_at_or_before;
pub use read::{Cursor, Filter, Slots, Start};
pub(super) use tips::Tips;
pub use trim::Retention;

/// The reserved-range kind of change-feed records.
pub(super) const KIND: u8 = b'e';
const EVENT: u8 = 0;
const META: u8 = 1;
const SEQ_BYTES: usize = 8;

/// The key of event `seq` of `slot`.
pub(super) fn event_key(slot: u32, seq: u64) -> Vec<u8> {
    let mut k = keys::reserved_prefix(slot, KIND);
    k.push(EVENT);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The key of `slot`'s meta record; it also ends the range of the slot's events.
pub(super) fn meta_key(slot: u32) -> Vec<u8> {
    keys::reserved_key(slot, KIND, &[META])
}

/// The seq of an event key.
fn seq_of(raw_key: &[u8]) -> Result<u64> {
    raw_key
        .len()
        .checked_sub(SEQ_BYTES)
        .map(|at| u64::from_be_bytes(raw_key[at..].try_into().unwrap()))
        .ok_or_else(|| Error::Corruption(format!("event key {}", keys::printable(raw_key))))
}

/// What the change feed captures (`--feed-capture`, carried in the leader's stamp).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Capture {
    /// No events (a Txn with an Emit is refused: its event would be lost).
    Off,
    /// New values.
    #[default]
    New,
    /// New and old values (`old_value`).
    OldAndNew,
}

impl Capture {
    pub fn byte(self) -> u8 {
        match self {
            Capture::Off => 0,
            Capture::New => 1,
            Capture::OldAndNew => 2,
        }
    }

    pub fn from_byte(b: u8) -> Option<Capture> {
        Some(match b {
            0 => Capture::Off,
            1 => Capture::New,
            2 => Capture::OldAndNew,
            _ => return None,
        })
    }
}

impl std::str::FromStr for Capture {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Capture, String> {
        Ok(match s {
            "off" => Capture::Off,
            "new" => Capture::New,
            "old-and-new" => Capture::OldAndNew,
            other => return Err(format!("{other:?}: use off, new or old-and-new")),
        })
    }
}

/// A slot's log at a glance, read and updated inside the apply transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// The oldest seq held (`last_seq + 1` when none is).
    pub first_seq: u64,
    /// The last seq ever written (0: none yet).
    pub last_seq: u64,
    /// Bytes of the events held (their stored values).
    pub bytes: u64,
    /// The next event's commit time is at least this: the last event's, or the time of the
    /// fence that froze the slot on its previous owner.
    pub floor_ts: u64,
    /// The commit time of the last event trimmed (0: none): a start by time at or after it
    /// misses nothing.
    pub trimmed_ts: u64,
}

impl Default for Meta {
    fn default() -> Meta {
        Meta {
            first_seq: 1,
            last_seq: 0,
            bytes: 0,
            floor_ts: 0,
            trimmed_ts: 0,
        }
    }
}

const META_BYTES: usize = 5 * 8;

impl Meta {
    fn encode(&self) -> Vec<u8> {
        let fields = [
            self.first_seq,
            self.last_seq,
            self.bytes,
            self.floor_ts,
            self.trimmed_ts,
        ];
        keys::encode_value_with(0, META_BYTES, |out| {
            fields
                .iter()
                .for_each(|f| out.extend_from_slice(&f.to_be_bytes()))
        })
    }

    pub(super) fn decode(raw_key: &[u8], raw: &[u8]) -> Result<Meta> {
        let (_, body) = keys::decode_value(raw_key, raw)?;
        if body.len() != META_BYTES {
            return Err(Error::Corruption(format!(
                "feed meta record {}: {} bytes, expected {META_BYTES}",
                keys::printable(raw_key),
                body.len()
            )));
        }
        let at = |i: usize| u64::from_be_bytes(body[i * 8..i * 8 + 8].try_into().unwrap());
        Ok(Meta {
            first_seq: at(0),
            last_seq: at(1),
            bytes: at(2),
            floor_ts: at(3),
            trimmed_ts: at(4),
        })
    }
}

/// The effective time of an entry applied after one at `last_ts`: its leader's stamp, made
/// strictly increasing (an unstamped entry takes `last_ts + 1`). Every replica computes the same.
pub(super) fn next_ts(last_ts: u64, stamp: Option<super::Stamp>) -> u64 {
    stamp.map_or(0, |s| s.now_ms).max(last_ts + 1)
}

/// Slots' meta records as apply runs committed them (`memo.rs`), so that a run need not read
/// them again.
pub(super) type Metas = super::memo::SlotMemo<Meta>;

/// The feed's side of one apply transaction: the current entry's time and capture, the 2PC
/// transaction whose finish is running, and the meta records touched (written once, at the end).
#[derive(Default)]
pub(super) struct Writer {
    capture: Capture,
    ts: u64,
    txn_id: Option<Vec<u8>>,
    metas: BTreeMap<u32, Meta>,
    /// Where metas of earlier runs are found before the tree is read (apply runs only).
    committed: Option<std::sync::Arc<Metas>>,
}

impl Writer {
    /// A writer that looks in `committed` before reading a meta record.
    pub(super) fn with_committed(committed: std::sync::Arc<Metas>) -> Writer {
        Writer {
            committed: Some(committed),
            ..Default::default()
        }
    }

    pub(super) fn at_entry(&mut self, ts: u64, capture: Capture) {
        self.ts = ts;
        self.capture = capture;
    }

    /// The current entry's effective time.
    pub(super) fn ts(&self) -> u64 {
        self.ts
    }

    /// What the current entry captures.
    pub(super) fn capture(&self) -> Capture {
        self.capture
    }

    /// The events written until the next call carry this 2PC transaction id.
    pub(super) fn in_txn(&mut self, txn_id: Option<&[u8]>) {
        self.txn_id = txn_id.map(<[u8]>::to_vec);
    }
}

/// One change of one item (or an Emit), as the apply saw it.
pub(super) struct Change<'a> {
    pub slot: u32,
    pub shard_key: &'a [u8],
    pub key: &'a [u8],
    pub op: Op,
    pub version: u64,
    pub value: &'a [u8],
    pub old: Option<&'a [u8]>,
}

impl TxView<'_> {
    /// The meta record of `slot` as this transaction left it.
    pub(super) fn feed_meta(&mut self, slot: u32) -> Result<&mut Meta> {
        if !self.feed.metas.contains_key(&slot) {
            let meta = self.feed_meta_peek(slot)?;
            self.feed.metas.insert(slot, meta);
        }
        Ok(self.feed.metas.get_mut(&slot).expect("inserted above"))
    }

    /// The meta record of `slot` as this transaction left it, without keeping it to be written
    /// at the end (for readers of the log inside an apply).
    pub(super) fn feed_meta_peek(&self, slot: u32) -> Result<Meta> {
        if let Some(meta) = self.feed.metas.get(&slot) {
            return Ok(*meta);
        }
        if let Some(meta) = self.feed.committed.as_ref().and_then(|c| c.get(slot)) {
            return Ok(meta);
        }
        let key = meta_key(slot);
        match self.data.get(&key).map_err(tx_err)? {
            Some(raw) => Meta::decode(&key, &raw),
            None => Ok(Meta::default()),
        }
    }

    /// Appends `c` to its slot's log (unless capture is off).
    pub(super) fn record_change(&mut self, c: Change<'_>) -> Result<()> {
        let capture = self.feed.capture;
        if capture == Capture::Off {
            return Ok(());
        }
        let entry_ts = self.feed.ts;
        let meta = *self.feed_meta(c.slot)?;
        let seq = meta.last_seq + 1;
        let ts = entry_ts.max(meta.floor_ts);
        let old = match capture {
            Capture::OldAndNew => c.old.unwrap_or_default(),
            _ => &[],
        };
        let txn_id = self.feed.txn_id.as_deref().unwrap_or_default();
        let raw = encode_event(&c, seq, ts, old, txn_id);
        let m = self.feed_meta(c.slot)?;
        m.last_seq = seq;
        m.bytes += raw.len() as u64;
        m.floor_ts = ts;
        self.put_raw(c.slot, event_key(c.slot, seq), raw)
    }

    /// Drops the events of `slot` below `below` (those it still holds), at most `budget` of
    /// them, counting them off `budget`.
    pub(super) fn trim_feed(&mut self, slot: u32, below: u64, budget: &mut u64) -> Result<()> {
        let meta = *self.feed_meta(slot)?;
        let end = below.min(meta.last_seq + 1);
        let (mut seq, mut freed, mut last) = (meta.first_seq, 0, None);
        while seq < end && *budget > 0 {
            let key = event_key(slot, seq);
            if let Some(raw) = self.data.remove(key.as_slice()).map_err(tx_err)? {
                self.log.record(slot, &key, &[])?;
                freed += raw.len() as u64;
                last = Some((key, raw));
            }
            seq += 1;
            *budget -= 1;
        }
        let trimmed_ts = match last {
            Some((key, raw)) => decode_event(&key, &raw)?.commit_ts_ms,
            None => meta.trimmed_ts,
        };
        let m = self.feed_meta(slot)?;
        m.first_seq = seq.max(m.first_seq);
        m.bytes = m.bytes.saturating_sub(freed);
        m.trimmed_ts = trimmed_ts;
        Ok(())
    }

    /// Writes the meta records this transaction changed (once each, at its end); returns them,
    /// for [`Tips`] and [`Metas`] once the transaction commits.
    pub(super) fn finish_feed(&mut self) -> Result<Vec<(u32, Meta)>> {
        let mut written = Vec::with_capacity(self.feed.metas.len());
        for (slot, meta) in std::mem::take(&mut self.feed.metas) {
            self.put_raw(slot, meta_key(slot), meta.encode())?;
            written.push((slot, meta));
        }
        Ok(written)
    }
}

/// A stored event, its checksum verified.
pub(super) fn decode_event(raw_key: &[u8], raw: &[u8]) -> Result<ordo_proto::v1::ChangeEvent> {
    use prost::Message as _;
    let (_, body) = keys::decode_value(raw_key, raw)?;
    ordo_proto::v1::ChangeEvent::decode(body)
        .map_err(|e| Error::Corruption(format!("event {}: {e}", keys::printable(raw_key))))
}

fn varint_len(tag: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(v)
    }
}

fn varint_field(tag: u32, v: u64, out: &mut Vec<u8>) {
    if v != 0 {
        encode_key(tag, WireType::Varint, out);
        encode_varint(v, out);
    }
}

fn bytes_len(tag: u32, b: &[u8]) -> usize {
    if b.is_empty() {
        0
    } else {
        key_len(tag) + encoded_len_varint(b.len() as u64) + b.len()
    }
}

fn bytes_field(tag: u32, b: &[u8], out: &mut Vec<u8>) {
    if !b.is_empty() {
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }
}

/// The stored value of an event: a `ChangeEvent` in its wire format (what `decode_event` and
/// readers decode), written straight from the op's bytes into the item encoding.
fn encode_event(c: &Change<'_>, seq: u64, ts: u64, old: &[u8], txn_id: &[u8]) -> Vec<u8> {
    let varints = [
        (1, u64::from(c.slot)),
        (2, seq),
        (5, c.op as u64),
        (6, c.version),
        (9, ts),
    ];
    let bytes = [
        (3, c.shard_key),
        (4, c.key),
        (7, c.value),
        (8, old),
        (10, txn_id),
    ];
    let len = varints
        .iter()
        .map(|(t, v)| varint_len(*t, *v))
        .sum::<usize>()
        + bytes.iter().map(|(t, b)| bytes_len(*t, b)).sum::<usize>();
    keys::encode_value_with(0, len, |out| {
        // Fields in tag order, as prost writes them.
        varint_field(1, u64::from(c.slot), out);
        varint_field(2, seq, out);
        bytes_field(3, c.shard_key, out);
        bytes_field(4, c.key, out);
        varint_field(5, c.op as u64, out);
        varint_field(6, c.version, out);
        bytes_field(7, c.value, out);
        bytes_field(8, old, out);
        varint_field(9, ts, out);
        bytes_field(10, txn_id, out);
    })
}
