//! The KV state machine of one replica: the `data` and `sys` trees.
//!
//! Only the raft driver writes here, by applying committed entries; an entry's effects and the new
//! applied index go into one sled transaction, so a restart resumes exactly after the last entry
//! whose effects are on disk. Readers take `view` so they never observe half of an applied batch.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use ordo_proto::v1::change_event::Op as ChangeOp;
use ordo_proto::v1::{Item, TxnRequest, TxnResponse};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use crate::error::{Error, Result};
use crate::limits::{SCAN_PAGE_BYTES_MAX, TXN_LOCK_TIMEOUT_MS};
use crate::replica::snapshot;
use txn::{ItemRead, ItemView};

mod apply;
mod command;
/// Idempotency keys: keyed writes applied at most once, their outcomes kept per slot.
mod dedup;
/// The change feed's per-slot log: written at apply, read by `Peer.ReadChanges`.
pub(crate) mod feed;
/// Consumer groups' replicated state: per slot and group, its definition and position.
mod groups;
pub(crate) mod keys;
/// What apply runs remember of each slot between them (`SlotMemo`).
mod memo;
/// Online resharding's replicated state: outgoing migrations, their change logs and fences.
pub(crate) mod migrate;
mod ownership;
pub(crate) mod participant;
pub(crate) mod txn;

pub use command::{shard_keys, Apply, Checkpoint, Command, Outcome};
pub use dedup::Stamp;
pub use feed::{Capture, Retention};
pub use groups::{GroupApplied, Notice as GroupNotice};
use migrate::Moving;
use ownership::load_ownership;
pub use ownership::Ownership;

const APPLIED_KEY: &[u8] = b"applied_index";
const SLOT_COUNT_KEY: &[u8] = b"slot_count";
/// `map_version u64 BE | bitset of owned slots`; absent = standalone (owns every slot).
const OWNERSHIP_KEY: &[u8] = b"ownership";
/// The config servers' addresses, newline-separated, from the last `SetOwnership` that named them.
const CONFIG_ADDRS_KEY: &[u8] = b"config_addrs";
/// The effective time of the last entry applied (`feed::next_ts`), u64 BE: the change feed's
/// commit times and this replica's resolved time.
const FEED_TS_KEY: &[u8] = b"feed_ts";
/// Present while a snapshot is being installed: a restart that finds it knows the data tree is
/// partial and starts over from an empty replica.
const INSTALLING_KEY: &[u8] = b"installing_snapshot";

pub struct StateMachine {
    node_id: u64,
    data: sled::Tree,
    sys: sled::Tree,
    slot_count: u32,
    applied: AtomicU64,
    /// `FEED_TS_KEY` as the last apply left it.
    feed_ts: AtomicU64,
    /// Every slot's last seq and the epoch of ownership and fences, for change-feed readers.
    feed_tips: feed::Tips,
    /// Notified with the applied index after every apply (watchers of the shard map use it).
    applied_tx: tokio::sync::watch::Sender<u64>,
    ownership: RwLock<Ownership>,
    /// Slots being moved out of this group (change log kept, maybe fenced); see `migrate.rs`.
    moving: RwLock<Moving>,
    view: RwLock<()>,
    /// Items locked by cross-group transactions: while 0, nothing needs to look for locks.
    locks: AtomicI64,
    /// How long the holders of those locks have held them, by this replica's clock.
    lock_ages: participant::LockAges,
    /// Where the config servers are (`CONFIG_ADDRS_KEY`).
    config_addrs: RwLock<Vec<String>>,
    /// Consumer-group changes for the leader's dispatchers (`groups::Notices`).
    group_notices: groups::Notices,
    /// Each loaded slot's dedup entries, exact (`dedup::Indexes`).
    dedup_index: dedup::Indexes,
    /// Slots' feed metas as apply runs committed them (`feed::Metas`).
    feed_metas: std::sync::Arc<feed::Metas>,
}

struct TxView<'a> {
    data: &'a TransactionalTree,
    slot_count: u32,
    node_id: u64,
    /// Writes to slots moving out are also appended to their migration's change log here.
    log: migrate::LogWriter<'a>,
    /// For the ages a lock refusal reports.
    ages: &'a participant::LockAges,
    /// Items locked by cross-group transactions, as the commands so far left it.
    locks: i64,
    /// What the commands so far did to `ages`, recorded once the transaction commits.
    aged: Vec<participant::AgeEvent>,
    /// The change feed's writes (`feed/`): every item change here is also an event.
    feed: feed::Writer,
    /// What the commands so far did to consumer groups that their dispatchers did not ask for,
    /// handed to them once the transaction commits (`groups::Notices`).
    notices: Vec<groups::Notice>,
}

/// Verifies a stored value; a corrupt one is reported with this node's id, the tree and the key.
fn checked_value<'a>(node_id: u64, raw_key: &[u8], raw: &'a [u8]) -> Result<(u64, &'a [u8])> {
    keys::decode_value(raw_key, raw).map_err(|e| match e {
        Error::Corruption(why) => {
            let item = match keys::decode_key(raw_key) {
                Ok((slot, sk, key)) => format!(
                    " (slot {slot}, shard key {}, key {})",
                    keys::printable(sk),
                    keys::printable(key)
                ),
                Err(_) => String::new(),
            };
            Error::Corruption(format!("node {node_id}, {why}{item}"))
        }
        other => other,
    })
}

/// A stored item as `(version, value)`, the value a view into sled's buffer (nothing copied).
fn stored_item(node_id: u64, raw_key: &[u8], raw: sled::IVec) -> Result<(u64, sled::IVec)> {
    let (version, value) = checked_value(node_id, raw_key, &raw)?;
    let at = raw.len() - value.len();
    Ok((version, raw.subslice(at, value.len())))
}

fn tx_err(e: sled::transaction::UnabortableTransactionError) -> Error {
    Error::Storage(e.to_string())
}

impl ItemRead for TxView<'_> {
    type Value = sled::IVec;
    fn get(&self, sk: &[u8], key: &[u8]) -> Result<Option<(u64, sled::IVec)>> {
        let raw_key = keys::encode_key(ordo_proto::slot_of(sk, self.slot_count), sk, key);
        match self.data.get(&raw_key).map_err(tx_err)? {
            Some(raw) => Ok(Some(stored_item(self.node_id, &raw_key, raw)?)),
            None => Ok(None),
        }
    }
}

impl ItemView for TxView<'_> {
    fn put(
        &mut self,
        sk: &[u8],
        key: &[u8],
        version: u64,
        value: &[u8],
        old: Option<&[u8]>,
    ) -> Result<()> {
        let slot = ordo_proto::slot_of(sk, self.slot_count);
        let raw_value = keys::encode_value(version, value);
        self.put_raw(slot, keys::encode_key(slot, sk, key), raw_value)?;
        self.record_change(feed::Change {
            slot,
            shard_key: sk,
            key,
            op: ChangeOp::Put,
            version,
            value,
            old,
        })
    }
    fn delete(&mut self, sk: &[u8], key: &[u8], old: &[u8]) -> Result<()> {
        let slot = ordo_proto::slot_of(sk, self.slot_count);
        self.delete_raw(slot, keys::encode_key(slot, sk, key))?;
        self.record_change(feed::Change {
            slot,
            shard_key: sk,
            key,
            op: ChangeOp::Delete,
            version: 0,
            value: &[],
            old: Some(old),
        })
    }
    fn emit(&mut self, sk: &[u8], key: &[u8], value: &[u8]) -> Result<()> {
        self.record_change(feed::Change {
            slot: ordo_proto::slot_of(sk, self.slot_count),
            shard_key: sk,
            key,
            op: ChangeOp::Emit,
            version: 0,
            value,
            old: None,
        })
    }
    fn check_feed_ack(&self, ack: &ordo_proto::v1::FeedAckRequest) -> Result<Result<()>> {
        self.check_txn_ack(ack)
    }
    fn feed_ack(&mut self, ack: &ordo_proto::v1::FeedAckRequest) -> Result<()> {
        self.apply_txn_ack(ack)
    }
}

impl TxView<'_> {
    /// Writes a record of `slot` (an item or a reserved record), through its change log when it
    /// is moving.
    fn put_raw(&mut self, slot: u32, raw_key: Vec<u8>, raw_value: Vec<u8>) -> Result<()> {
        self.log.record(slot, &raw_key, &raw_value)?;
        // `set`, not `insert`: the value replaced is not needed, and reading it is a descent.
        self.data.set(raw_key, raw_value);
        Ok(())
    }
    fn delete_raw(&mut self, slot: u32, raw_key: Vec<u8>) -> Result<()> {
        self.log.record(slot, &raw_key, &[])?;
        self.data.unset(raw_key);
        Ok(())
    }

    /// Writes a record of a slot's reserved range (item encoding, version 0), logged like an item.
    fn put_record(&mut self, key: Vec<u8>, body: &[u8]) -> participant::Tx<()> {
        self.put_record_at(key, 0, body)
    }

    /// `put_record` with `version` in the version field (a prepared part keeps its time there).
    fn put_record_at(&mut self, key: Vec<u8>, version: u64, body: &[u8]) -> participant::Tx<()> {
        let slot = keys::slot_of(&key).map_err(ConflictableTransactionError::Abort)?;
        self.put_raw(slot, key, keys::encode_value(version, body))
            .map_err(ConflictableTransactionError::Abort)
    }

    /// Removes a record of a slot's reserved range (if present), logged like an item.
    fn remove_record(&mut self, key: Vec<u8>) -> participant::Tx<()> {
        if self.data.remove(key.as_slice())?.is_some() {
            let slot = keys::slot_of(&key).map_err(ConflictableTransactionError::Abort)?;
            self.log
                .record(slot, &key, &[])
                .map_err(ConflictableTransactionError::Abort)?;
        }
        Ok(())
    }
}

/// The applied state as a transaction reads it (the caller holds the view lock).
struct Applied<'a>(&'a StateMachine);

impl ItemRead for Applied<'_> {
    type Value = sled::IVec;
    fn get(&self, sk: &[u8], key: &[u8]) -> Result<Option<(u64, sled::IVec)>> {
        let raw_key = keys::encode_key(ordo_proto::slot_of(sk, self.0.slot_count), sk, key);
        match self.0.data.get(&raw_key)? {
            Some(raw) => Ok(Some(stored_item(self.0.node_id, &raw_key, raw)?)),
            None => Ok(None),
        }
    }
}

fn read_u64(raw: Option<sled::IVec>, what: &str) -> Result<u64> {
    match raw {
        None => Ok(0),
        Some(v) if v.len() == 8 => Ok(u64::from_be_bytes(v.as_ref().try_into().unwrap())),
        Some(v) => Err(Error::Corruption(format!(
            "tree sys, {what}: {} bytes, expected 8",
            v.len()
        ))),
    }
}

fn load_config_addrs(sys: &sled::Tree) -> Result<Vec<String>> {
    Ok(match sys.get(CONFIG_ADDRS_KEY)? {
        None => Vec::new(),
        Some(raw) => String::from_utf8_lossy(&raw)
            .split('\n')
            .map(str::to_string)
            .collect(),
    })
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
        // The `sys` tree keeps its first on-disk name, `meta`, so existing data dirs open unchanged.
        let sys = db.open_tree("meta")?;
        match read_u64(sys.get(SLOT_COUNT_KEY)?, "slot_count")? {
            0 => {
                sys.insert(SLOT_COUNT_KEY, &(slot_count as u64).to_be_bytes())?;
            }
            stored if stored != slot_count as u64 => {
                return Err(Error::InvalidArgument(format!(
                    "this data dir was created with {stored} slots, not {slot_count}; the slot count never changes"
                )))
            }
            _ => {}
        }
        let interrupted_install = sys.get(INSTALLING_KEY)?.is_some();
        if interrupted_install {
            tracing::warn!(node = node_id, "a snapshot install was interrupted; resetting this replica to empty so the leader sends it again");
            data.clear()?;
            sys.insert(APPLIED_KEY, &0u64.to_be_bytes())?;
            sys.remove(INSTALLING_KEY)?;
        }
        let upgraded = dedup::upgrade(&data, slot_count)?;
        if upgraded > 0 {
            tracing::info!(
                node = node_id,
                entries = upgraded,
                "rewrote dedup entries kept in the layout before issue 15 as one record each"
            );
        }
        let applied = read_u64(sys.get(APPLIED_KEY)?, "applied_index")?;
        let feed_ts = read_u64(sys.get(FEED_TS_KEY)?, "feed_ts")?;
        let ownership = load_ownership(&sys, slot_count)?;
        let moving = Moving::load(&sys)?;
        let lock_ages = participant::LockAges::default();
        let locks = lock_ages.reset(&data, slot_count)?;
        let feed_tips = feed::Tips::load(&data, slot_count)?;
        let config_addrs = RwLock::new(load_config_addrs(&sys)?);
        Ok(Opened {
            sm: StateMachine {
                node_id,
                data,
                sys,
                slot_count,
                applied: AtomicU64::new(applied),
                feed_ts: AtomicU64::new(feed_ts),
                feed_tips,
                applied_tx: tokio::sync::watch::channel(applied).0,
                ownership: RwLock::new(ownership),
                moving: RwLock::new(moving),
                view: RwLock::new(()),
                locks: AtomicI64::new(locks),
                lock_ages,
                config_addrs,
                group_notices: Default::default(),
                dedup_index: Default::default(),
                feed_metas: Default::default(),
            },
            interrupted_install,
        })
    }

    /// A founding replica's first start: the log begins after `index` (the bootstrap position,
    /// which carries no data), so count it as applied.
    pub fn start_at(&self, index: u64) -> Result<()> {
        if self.applied_index() < index {
            self.sys.insert(APPLIED_KEY, &index.to_be_bytes())?;
            self.applied.store(index, Ordering::Release);
            self.applied_tx.send_replace(index);
        }
        Ok(())
    }

    pub fn applied_index(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    pub fn ownership(&self) -> Ownership {
        self.ownership.read().unwrap().clone()
    }

    /// Refuses a request for a shard key whose slot this group does not own, or whose slot is
    /// fenced by a migration (`SlotMoving`: the router holds and retries).
    pub fn check_owned(&self, shard_key: &[u8]) -> Result<()> {
        let slot = ordo_proto::slot_of(shard_key, self.slot_count);
        if let Some(e) = self.moving.read().unwrap().fenced(slot) {
            return Err(e);
        }
        let o = self.ownership.read().unwrap();
        if o.owns(slot) {
            Ok(())
        } else {
            Err(Error::WrongShard {
                slot,
                map_version: o.map_version,
            })
        }
    }

    pub fn slot_count(&self) -> u32 {
        self.slot_count
    }

    /// Notified with the applied index after each apply.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    fn decode_lock(&self, lock_key: &[u8], raw: &[u8]) -> Result<participant::Lock> {
        participant::Lock::decode(lock_key, raw).map_err(participant::untx)
    }

    /// Refuses at once (before proposing) a transaction that would meet a lock at apply time
    /// (any lock but its own write lock); the apply-time check stays the authoritative one.
    pub fn check_unlocked(&self, t: &TxnRequest, own: Option<&[u8]>) -> Result<()> {
        self.refuse_locked(t, |lock| {
            !(lock.write && own.is_some_and(|id| lock.holders.iter().any(|h| h.txn_id == id)))
        })
    }

    /// The refusal of the first item of `t` whose lock `refuses`, if any.
    fn refuse_locked(
        &self,
        t: &TxnRequest,
        refuses: impl Fn(&participant::Lock) -> bool,
    ) -> Result<()> {
        if self.locks.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        for raw_key in participant::lock_data_keys(t, self.slot_count) {
            let lk = participant::lock_key(&raw_key);
            if let Some(raw) = self.data.get(&lk)? {
                let lock = self.decode_lock(&lk, &raw)?;
                if refuses(&lock) {
                    return Err(lock.refusal(&raw_key, &self.lock_ages));
                }
            }
        }
        Ok(())
    }

    /// Why migration `id` must not fence its slots yet, if it must not: an item of them is
    /// locked, or a part of an unfinished cross-group transaction is kept there (it could not
    /// finish on this side of the move once the slots are fenced). Decisions need no wait: they
    /// move with their slot. Checked on the leader before the fence is proposed; the apply-time
    /// check is the authoritative one.
    pub fn fence_blocker(&self, id: u64) -> Option<String> {
        let slots = self.moving.read().unwrap().slots_of(id);
        slots
            .into_iter()
            .find(|&slot| participant::slot_busy(&self.data, slot))
            .map(migrate::busy_slot)
    }

    /// Whether `txn_id` holds locks here that this replica applied less than the lock timeout
    /// ago (its own clock): a resolver must not abort it yet.
    pub fn holds_young_locks(&self, txn_id: &[u8]) -> bool {
        self.lock_ages.holds(txn_id)
            && self.lock_ages.age(txn_id) < std::time::Duration::from_millis(TXN_LOCK_TIMEOUT_MS)
    }

    /// The config servers' addresses, as the last ownership change named them.
    pub fn config_addrs(&self) -> Vec<String> {
        self.config_addrs.read().unwrap().clone()
    }

    /// Up to `max` transactions (one lock each, with the shard key of its item) that have held
    /// locks in slots this group owns for at least the lock timeout, by this replica's clock:
    /// their coordinators are presumed gone.
    pub fn expired_locks(&self, max: usize) -> Result<Vec<(Error, bytes::Bytes)>> {
        let ownership = self.ownership();
        let _r = self.read_guard();
        let mut found: Vec<(Error, bytes::Bytes)> = Vec::new();
        for slot in (0..self.slot_count).filter(|s| ownership.owns(*s)) {
            for kv in self
                .data
                .scan_prefix(keys::reserved_prefix(slot, participant::LOCK_KIND))
            {
                let (lk, raw) = kv?;
                let item = participant::locked_item(&lk);
                let locked = self.decode_lock(&lk, &raw)?.refusal(&item, &self.lock_ages);
                let Error::Locked { txn_id, age_ms, .. } = &locked else {
                    unreachable!("a refusal is Locked")
                };
                if *age_ms < TXN_LOCK_TIMEOUT_MS
                    || found
                        .iter()
                        .any(|(e, _)| matches!(e, Error::Locked { txn_id: t, .. } if t == txn_id))
                {
                    continue;
                }
                let (_, sk, _) = keys::decode_key(&item)?;
                found.push((locked, bytes::Bytes::copy_from_slice(sk)));
                if found.len() == max {
                    return Ok(found);
                }
            }
        }
        Ok(found)
    }

    /// Items locked by unfinished cross-group transactions.
    pub fn locks_held(&self) -> i64 {
        self.locks.load(Ordering::Relaxed)
    }

    fn read_guard(&self) -> RwLockReadGuard<'_, ()> {
        self.view.read().unwrap()
    }

    pub fn get(&self, sk: &[u8], key: &[u8]) -> Result<Option<(u64, bytes::Bytes)>> {
        let raw_key = keys::encode_key(ordo_proto::slot_of(sk, self.slot_count), sk, key);
        let _r = self.read_guard();
        if self.locks.load(Ordering::Relaxed) > 0 {
            let lk = participant::lock_key(&raw_key);
            if let Some(raw) = self.data.get(&lk)? {
                let lock = self.decode_lock(&lk, &raw)?;
                if lock.write {
                    return Err(lock.refusal(&raw_key, &self.lock_ages));
                }
            }
        }
        match self.data.get(&raw_key)? {
            Some(raw) => {
                let (version, value) = checked_value(self.node_id, &raw_key, &raw)?;
                Ok(Some((version, bytes::Bytes::copy_from_slice(value))))
            }
            None => Ok(None),
        }
    }

    /// A read-only transaction (`txn::read_only`) on the applied state, within
    /// `TXN_RESULT_BYTES_MAX`: served after a read barrier, like `get`, without a raft entry. An
    /// item a cross-group transaction holds a write lock on refuses it (read locks do not).
    pub fn read_txn(&self, t: &TxnRequest) -> Result<TxnResponse> {
        let _r = self.read_guard();
        self.refuse_locked(t, |lock| lock.write)?;
        txn::evaluate_reads(&Applied(self), t, &mut txn::Budget::txn())?
    }

    /// Items of one shard key with `start <= key < end` (empty end = no bound), at most `limit`
    /// and about `SCAN_PAGE_BYTES_MAX` of keys and values (at least one item); also returns the
    /// key to continue from when more remain.
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
        if self.locks.load(Ordering::Relaxed) > 0 {
            // A scan must not see half of a transaction: any lock in its range refuses it.
            let lock_prefix = participant::lock_prefix(&prefix);
            for kv in self.data.range(participant::lock_key(&from)..) {
                let (lk, raw) = kv?;
                if !lk.starts_with(&lock_prefix) {
                    break;
                }
                if !end.is_empty() && &lk[lock_prefix.len()..] >= end {
                    break;
                }
                let lock = self.decode_lock(&lk, &raw)?;
                if lock.write {
                    return Err(lock.refusal(&participant::locked_item(&lk), &self.lock_ages));
                }
            }
        }
        let mut items = Vec::new();
        let mut page_bytes = 0;
        for kv in self.data.range(from..) {
            let (raw_key, raw) = kv?;
            if !raw_key.starts_with(&prefix) {
                break;
            }
            let key = &raw_key[prefix.len()..];
            if !end.is_empty() && key >= end {
                break;
            }
            let next = || Some(bytes::Bytes::copy_from_slice(key));
            if items.len() == limit {
                return Ok((items, next()));
            }
            let (version, value) = checked_value(self.node_id, &raw_key, &raw)?;
            page_bytes += key.len() + value.len();
            if !items.is_empty() && page_bytes > SCAN_PAGE_BYTES_MAX {
                return Ok((items, next()));
            }
            items.push(Item {
                key: bytes::Bytes::copy_from_slice(key),
                value: bytes::Bytes::copy_from_slice(value),
                version,
            });
        }
        Ok((items, None))
    }

    /// Writes the whole state machine, applied up to `index` (of `term`), to a snapshot file.
    /// Runs on a thread of its own while the driver goes on (H3): the view lock keeps writers out
    /// for the copy, and the driver applies nothing until it ends, so the copy is of one index.
    pub fn build_snapshot(&self, dir: &Path, index: u64, term: u64) -> Result<(u64, PathBuf, u64)> {
        let _r = self.read_guard();
        if self.applied_index() != index {
            return Err(Error::Storage(format!(
                "the state machine moved from index {index} to {} before its snapshot began",
                self.applied_index()
            )));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Storage(format!("{}: {e}", dir.display())))?;
        let path = snapshot::file_name(dir, index, term);
        let built = self.write_snapshot(path.clone(), index, term);
        if built.is_err() {
            // A half-written copy (a full disk, most likely) must not hold on to the space.
            let _ = std::fs::remove_file(snapshot::Writer::tmp_path(&path));
        }
        built.map(|(path, records)| (index, path, records))
    }

    fn write_snapshot(&self, path: PathBuf, index: u64, term: u64) -> Result<(PathBuf, u64)> {
        let mut w = snapshot::Writer::create(path, index, term)?;
        for kv in self.data.iter() {
            let (k, v) = kv?;
            checked_value(self.node_id, &k, &v)?; // never ship an item that fails its checksum
            w.record(snapshot::TREE_DATA, &k, &v)?;
        }
        for kv in self.sys.iter() {
            let (k, v) = kv?;
            if k.as_ref() != APPLIED_KEY
                && k.as_ref() != INSTALLING_KEY
                && k.as_ref() != SLOT_COUNT_KEY
            {
                w.record(snapshot::TREE_META, &k, &v)?;
            }
        }
        let records = w.records;
        Ok((w.finish()?, records))
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
        self.forget_hints();
        self.sys.insert(INSTALLING_KEY, &index.to_be_bytes())?;
        self.data.clear()?;
        self.sys.remove(OWNERSHIP_KEY)?;
        self.sys.remove(CONFIG_ADDRS_KEY)?;
        self.sys.remove(FEED_TS_KEY)?;
        migrate::clear_sys(&self.sys)?;
        let mut reader = snapshot::Reader::open(path)?;
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        let mut items = 0u64;
        while let Some((tree, k, v)) = reader.next_record()? {
            match tree {
                snapshot::TREE_DATA => {
                    checked_value(self.node_id, &k, &v)?;
                    batch.insert(k, v);
                    in_batch += 1;
                    items += 1;
                }
                snapshot::TREE_META => {
                    self.sys.insert(k, v)?;
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
        // A snapshot of a replica that still ran the layout before issue 15.
        dedup::upgrade(&self.data, self.slot_count)?;
        self.sys.insert(APPLIED_KEY, &index.to_be_bytes())?;
        self.applied.store(index, Ordering::Release);
        self.feed_ts.store(
            read_u64(self.sys.get(FEED_TS_KEY)?, "feed_ts")?,
            Ordering::Release,
        );
        *self.ownership.write().unwrap() = load_ownership(&self.sys, self.slot_count)?;
        self.locks.store(
            self.lock_ages.reset(&self.data, self.slot_count)?,
            Ordering::Relaxed,
        );
        *self.moving.write().unwrap() = Moving::load(&self.sys)?;
        *self.config_addrs.write().unwrap() = load_config_addrs(&self.sys)?;
        self.feed_tips.reload(&self.data, 0..self.slot_count)?;
        self.applied_tx.send_replace(index);
        tracing::info!(node = self.node_id, index, items, "installed snapshot");
        Ok(items)
    }

    pub fn finish_install(&self) -> Result<()> {
        self.sys.remove(INSTALLING_KEY)?;
        Ok(())
    }

    /// Item count and a crc32 over every stored key and value (slots' reserved records, such as
    /// dedup entries, included, but not counted as items), in key order: equal digests on two
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
            n += u64::from(keys::decode_reserved(&k).is_none());
        }
        Ok((n, h.finalize()))
    }
}

#[cfg(test)]
mod budget_tests;
#[cfg(test)]
mod tests;
