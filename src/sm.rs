//! The KV state machine of one replica: the `data` and `meta` trees.
//!
//! Only the raft driver writes here, by applying committed entries; an entry's effects and the new
//! applied index go into one sled transaction, so a restart resumes exactly after the last entry
//! whose effects are on disk. Readers take `view` so they never observe half of an applied batch.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use ordo_proto::v1::{Item, TxnRequest, TxnResponse};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::Transactional;

use crate::error::{Error, Result};
use crate::keys;
use crate::snapshot;
use crate::txn::{self, ItemView};

const APPLIED_KEY: &[u8] = b"applied_index";
const SLOT_COUNT_KEY: &[u8] = b"slot_count";
/// Present while a snapshot is being installed: a restart that finds it knows the data tree is
/// partial and starts over from an empty replica.
const INSTALLING_KEY: &[u8] = b"installing_snapshot";

pub struct StateMachine {
    node_id: u64,
    data: sled::Tree,
    meta: sled::Tree,
    slot_count: u32,
    applied: AtomicU64,
    view: RwLock<()>,
}

/// One committed entry to apply: its index and, for a client command, the transaction.
pub struct Apply {
    pub index: u64,
    pub txn: Option<TxnRequest>,
}

struct TxView<'a> {
    data: &'a TransactionalTree,
    slot_count: u32,
}

fn tx_err(e: sled::transaction::UnabortableTransactionError) -> Error {
    Error::Storage(e.to_string())
}

impl ItemView for TxView<'_> {
    fn get(&mut self, sk: &[u8], key: &[u8]) -> Result<Option<(u64, Vec<u8>)>> {
        let raw_key = keys::encode_key(ordo_proto::slot_of(sk, self.slot_count), sk, key);
        match self.data.get(&raw_key).map_err(tx_err)? {
            Some(raw) => {
                let (version, value) = keys::decode_value(&raw_key, &raw)?;
                Ok(Some((version, value.to_vec())))
            }
            None => Ok(None),
        }
    }
    fn put(&mut self, sk: &[u8], key: &[u8], version: u64, value: &[u8]) -> Result<()> {
        let raw_key = keys::encode_key(ordo_proto::slot_of(sk, self.slot_count), sk, key);
        self.data
            .insert(raw_key, keys::encode_value(version, value))
            .map_err(tx_err)?;
        Ok(())
    }
    fn delete(&mut self, sk: &[u8], key: &[u8]) -> Result<()> {
        let raw_key = keys::encode_key(ordo_proto::slot_of(sk, self.slot_count), sk, key);
        self.data.remove(raw_key).map_err(tx_err)?;
        Ok(())
    }
}

fn read_u64(raw: Option<sled::IVec>, what: &str) -> Result<u64> {
    match raw {
        None => Ok(0),
        Some(v) if v.len() == 8 => Ok(u64::from_be_bytes(v.as_ref().try_into().unwrap())),
        Some(v) => Err(Error::Corruption(format!(
            "tree meta, {what}: {} bytes, expected 8",
            v.len()
        ))),
    }
}

/// What `open` found.
pub struct Opened {
    pub sm: StateMachine,
    /// A snapshot install was cut short: the replica was reset to empty and its raft log must be
    /// reset too, so that the leader sends the snapshot again.
    pub interrupted_install: bool,
}

impl StateMachine {
    pub fn open(db: &sled::Db, node_id: u64, slot_count: u32) -> Result<Opened> {
        let data = db.open_tree("data")?;
        let meta = db.open_tree("meta")?;
        match read_u64(meta.get(SLOT_COUNT_KEY)?, "slot_count")? {
            0 => {
                meta.insert(SLOT_COUNT_KEY, &(slot_count as u64).to_be_bytes())?;
            }
            stored if stored != slot_count as u64 => {
                return Err(Error::InvalidArgument(format!(
                    "this data dir was created with {stored} slots, not {slot_count}; the slot count never changes"
                )))
            }
            _ => {}
        }
        let interrupted_install = meta.get(INSTALLING_KEY)?.is_some();
        if interrupted_install {
            tracing::warn!(node = node_id, "a snapshot install was interrupted; resetting this replica to empty so the leader sends it again");
            data.clear()?;
            meta.insert(APPLIED_KEY, &0u64.to_be_bytes())?;
            meta.remove(INSTALLING_KEY)?;
        }
        let applied = read_u64(meta.get(APPLIED_KEY)?, "applied_index")?;
        Ok(Opened {
            sm: StateMachine {
                node_id,
                data,
                meta,
                slot_count,
                applied: AtomicU64::new(applied),
                view: RwLock::new(()),
            },
            interrupted_install,
        })
    }

    pub fn applied_index(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Applies committed entries in order, in one sled transaction with the applied index.
    /// Returns the response of each entry that carried a transaction.
    pub fn apply(&self, batch: &[Apply]) -> Result<Vec<(u64, TxnResponse)>> {
        let Some(last) = batch.last() else {
            return Ok(vec![]);
        };
        let _w = self.view.write().unwrap();
        let out = (&self.data, &self.meta)
            .transaction(|(data, meta)| {
                let mut view = TxView {
                    data,
                    slot_count: self.slot_count,
                };
                let mut out = Vec::with_capacity(batch.len());
                for a in batch {
                    if let Some(t) = &a.txn {
                        let r = txn::evaluate(&mut view, t)
                            .map_err(ConflictableTransactionError::Abort)?;
                        out.push((a.index, r));
                    }
                }
                meta.insert(APPLIED_KEY, &last.index.to_be_bytes())?;
                Ok(out)
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Abort(e) => e,
                sled::transaction::TransactionError::Storage(e) => Error::from(e),
            })?;
        self.applied.store(last.index, Ordering::Release);
        Ok(out)
    }

    fn read_guard(&self) -> RwLockReadGuard<'_, ()> {
        self.view.read().unwrap()
    }

    pub fn get(&self, sk: &[u8], key: &[u8]) -> Result<Option<(u64, bytes::Bytes)>> {
        let raw_key = keys::encode_key(ordo_proto::slot_of(sk, self.slot_count), sk, key);
        let _r = self.read_guard();
        match self.data.get(&raw_key)? {
            Some(raw) => {
                let (version, value) = keys::decode_value(&raw_key, &raw)?;
                Ok(Some((version, bytes::Bytes::copy_from_slice(value))))
            }
            None => Ok(None),
        }
    }

    /// Items of one shard key with `start <= key < end` (empty end = no bound), at most `limit`;
    /// also returns the key to continue from when more remain.
    pub fn scan(
        &self,
        sk: &[u8],
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<(Vec<Item>, Option<bytes::Bytes>)> {
        let prefix = keys::shard_prefix(ordo_proto::slot_of(sk, self.slot_count), sk);
        let mut from = prefix.clone();
        from.extend_from_slice(start);
        let _r = self.read_guard();
        let mut items = Vec::new();
        for kv in self.data.range(from..) {
            let (raw_key, raw) = kv?;
            if !raw_key.starts_with(&prefix) {
                break;
            }
            let key = &raw_key[prefix.len()..];
            if !end.is_empty() && key >= end {
                break;
            }
            if items.len() == limit {
                return Ok((items, Some(bytes::Bytes::copy_from_slice(key))));
            }
            let (version, value) = keys::decode_value(&raw_key, &raw)?;
            items.push(Item {
                key: bytes::Bytes::copy_from_slice(key),
                value: bytes::Bytes::copy_from_slice(value),
                version,
            });
        }
        Ok((items, None))
    }

    /// Writes the whole state machine at the current applied index to a snapshot file. The caller
    /// (the driver) is the only writer, so the copy is consistent.
    pub fn build_snapshot(&self, dir: &Path, term: u64) -> Result<(u64, PathBuf, u64)> {
        let index = self.applied_index();
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Storage(format!("{}: {e}", dir.display())))?;
        let mut w = snapshot::Writer::create(snapshot::file_name(dir, index, term), index, term)?;
        for kv in self.data.iter() {
            let (k, v) = kv?;
            keys::decode_value(&k, &v)?; // never ship an item that fails its checksum
            w.record(snapshot::TREE_DATA, &k, &v)?;
        }
        for kv in self.meta.iter() {
            let (k, v) = kv?;
            if k.as_ref() != APPLIED_KEY
                && k.as_ref() != INSTALLING_KEY
                && k.as_ref() != SLOT_COUNT_KEY
            {
                w.record(snapshot::TREE_META, &k, &v)?;
            }
        }
        let records = w.records;
        Ok((index, w.finish()?, records))
    }

    /// Replaces the state machine by a verified snapshot file. Leaves the "installing" mark set:
    /// the driver clears it with `finish_install` once raft's own state points past the snapshot.
    pub fn install_snapshot(&self, path: &Path, index: u64) -> Result<u64> {
        let (file_index, _) = snapshot::verify_file(path)?;
        if file_index != index {
            return Err(Error::Corruption(format!(
                "snapshot {} holds index {file_index}, raft expected {index}",
                path.display()
            )));
        }
        let _w = self.view.write().unwrap();
        self.meta.insert(INSTALLING_KEY, &index.to_be_bytes())?;
        self.data.clear()?;
        let mut reader = snapshot::Reader::open(path)?;
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        let mut items = 0u64;
        while let Some((tree, k, v)) = reader.next_record()? {
            match tree {
                snapshot::TREE_DATA => {
                    keys::decode_value(&k, &v)?;
                    batch.insert(k, v);
                    in_batch += 1;
                    items += 1;
                }
                snapshot::TREE_META => {
                    self.meta.insert(k, v)?;
                }
                other => {
                    return Err(Error::Corruption(format!(
                        "snapshot {}: unknown tree tag {other}",
                        path.display()
                    )))
                }
            }
            if in_batch == 1024 {
                self.data.apply_batch(std::mem::take(&mut batch))?;
                in_batch = 0;
            }
        }
        self.data.apply_batch(batch)?;
        self.meta.insert(APPLIED_KEY, &index.to_be_bytes())?;
        self.applied.store(index, Ordering::Release);
        tracing::info!(node = self.node_id, index, items, "installed snapshot");
        Ok(items)
    }

    pub fn finish_install(&self) -> Result<()> {
        self.meta.remove(INSTALLING_KEY)?;
        Ok(())
    }

    /// Item count and a crc32 over every stored key and value, in key order: equal digests on two
    /// replicas mean equal data.
    pub fn digest(&self) -> Result<(u64, u32)> {
        let _r = self.read_guard();
        let mut h = crc32fast::Hasher::new();
        let mut n = 0;
        for kv in self.data.iter() {
            let (k, v) = kv?;
            h.update(&(k.len() as u32).to_be_bytes());
            h.update(&k);
            h.update(&v);
            n += 1;
        }
        Ok((n, h.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ordo_proto::v1::{txn_op, PutRequest, TxnOp};

    fn put(sk: &str, k: &str, v: &str) -> TxnRequest {
        TxnRequest {
            success: vec![TxnOp {
                op: Some(txn_op::Op::Put(PutRequest {
                    shard_key: sk.as_bytes().to_vec().into(),
                    key: k.as_bytes().to_vec().into(),
                    value: v.as_bytes().to_vec().into(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn apply_scan_snapshot_and_install_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("a")).unwrap();
        let sm = StateMachine::open(&db, 1, 64).unwrap().sm;
        let batch: Vec<Apply> = (0..30)
            .map(|i| Apply {
                index: i + 1,
                txn: Some(put("order-7", &format!("items/{i:02}"), "x")),
            })
            .chain(std::iter::once(Apply {
                index: 31,
                txn: None,
            }))
            .collect();
        assert_eq!(sm.apply(&batch).unwrap().len(), 30);
        assert_eq!(sm.applied_index(), 31);

        let (page, next) = sm.scan(b"order-7", b"items/05", b"items/20", 10).unwrap();
        assert_eq!(page.len(), 10);
        assert_eq!(page[0].key.as_ref(), b"items/05");
        assert_eq!(next.as_deref(), Some(&b"items/15"[..]));
        let (rest, next) = sm.scan(b"order-7", b"items/15", b"items/20", 10).unwrap();
        assert_eq!((rest.len(), next), (5, None));

        let (index, path, records) = sm.build_snapshot(&dir.path().join("snap"), 2).unwrap();
        assert_eq!((index, records), (31, 30));
        let db2 = sled::open(dir.path().join("b")).unwrap();
        let sm2 = StateMachine::open(&db2, 2, 64).unwrap().sm;
        sm2.apply(&[Apply {
            index: 1,
            txn: Some(put("stale", "", "gone after install")),
        }])
        .unwrap();
        assert_eq!(sm2.install_snapshot(&path, 31).unwrap(), 30);
        sm2.finish_install().unwrap();
        assert_eq!(sm2.digest().unwrap(), sm.digest().unwrap());
        assert_eq!(sm2.applied_index(), 31);
        assert!(sm2.get(b"stale", b"").unwrap().is_none());
    }

    #[test]
    fn an_interrupted_install_resets_the_replica() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let sm = StateMachine::open(&db, 1, 64).unwrap().sm;
            sm.apply(&[Apply {
                index: 5,
                txn: Some(put("o", "", "v")),
            }])
            .unwrap();
            sm.meta.insert(INSTALLING_KEY, &9u64.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let db = sled::open(dir.path()).unwrap();
        let opened = StateMachine::open(&db, 1, 64).unwrap();
        assert!(opened.interrupted_install);
        assert_eq!(opened.sm.applied_index(), 0);
        assert!(opened.sm.get(b"o", b"").unwrap().is_none());
    }

    #[test]
    fn the_slot_count_of_a_data_dir_never_changes() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        StateMachine::open(&db, 1, 64).unwrap();
        let err = StateMachine::open(&db, 1, 128).err().unwrap().to_string();
        assert!(err.contains("64 slots"), "{err}");
    }
}
