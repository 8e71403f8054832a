//! The KV state machine of one replica: the `data` and `meta` trees.
//!
//! Only the raft driver writes here, by applying committed entries; an entry's effects and the new
//! applied index go into one sled transaction, so a restart resumes exactly after the last entry
//! whose effects are on disk. Readers take `view` so they never observe half of an applied batch.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use ordo_proto::v1::{
    txn_op, DecideRequest, DecideResponse, FinishRequest, FinishResponse, ForgetRequest, Item,
    MigrateClearRequest, MigrateIngestRequest, MigrateOutRequest, PrepareRequest, PrepareResponse,
    SetOwnershipRequest, SetOwnershipResponse, TxnRequest, TxnResponse,
};
use prost::Message as _;
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::Transactional;

use crate::error::{Error, Result};
use crate::replica::snapshot;
use txn::ItemView;

pub(crate) mod keys;
/// Online resharding's replicated state: outgoing migrations, their change logs and fences.
pub(crate) mod migrate;
pub(crate) mod participant;
pub(crate) mod txn;
use migrate::Moving;

const APPLIED_KEY: &[u8] = b"applied_index";
const SLOT_COUNT_KEY: &[u8] = b"slot_count";
/// `map_version u64 BE | bitset of owned slots`; absent = standalone (owns every slot).
const OWNERSHIP_KEY: &[u8] = b"ownership";
/// Present while a snapshot is being installed: a restart that finds it knows the data tree is
/// partial and starts over from an empty replica.
const INSTALLING_KEY: &[u8] = b"installing_snapshot";

pub struct StateMachine {
    node_id: u64,
    data: sled::Tree,
    meta: sled::Tree,
    slot_count: u32,
    applied: AtomicU64,
    /// Notified with the applied index after every apply (watchers of the shard map use it).
    applied_tx: tokio::sync::watch::Sender<u64>,
    ownership: RwLock<Ownership>,
    /// Slots being moved out of this group (change log kept, maybe fenced); see `migrate.rs`.
    moving: RwLock<Moving>,
    view: RwLock<()>,
    /// Items locked by cross-group transactions: while 0, nothing needs to look for locks.
    locks: AtomicI64,
}

/// Entry payload tags: the rest is a prost message of the command's kind.
const CMD_TXN: u8 = 1;
const CMD_SET_OWNERSHIP: u8 = 2;
/// Several transactions in one entry, each length-delimited, applied in order.
const CMD_TXN_BATCH: u8 = 3;
const CMD_MIGRATE_OUT: u8 = 4;
const CMD_MIGRATE_INGEST: u8 = 5;
const CMD_MIGRATE_CLEAR: u8 = 6;
/// Two-phase commit (`twopc.rs`).
const CMD_PREPARE: u8 = 20;
/// Followed by the leader's clock (ms, u64 BE), then the request.
const CMD_DECIDE: u8 = 21;
const CMD_FINISH: u8 = 22;
const CMD_FORGET: u8 = 23;

/// A command in the raft log.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    Txn(TxnRequest),
    SetOwnership(SetOwnershipRequest),
    /// Transactions that arrived together at the leader, in one entry: the per-entry costs of
    /// raft (encoding, log write, checksums, replication messages) are paid once for all of them.
    /// Each is still evaluated on its own, in order, with its own outcome.
    TxnBatch(Vec<TxnRequest>),
    /// Online resharding, donor side: begin (start the change log), fence, end a migration.
    MigrateOut(MigrateOutRequest),
    /// Online resharding, recipient side: write copied records as they are.
    MigrateIngest(MigrateIngestRequest),
    /// Delete a bounded number of items of slots neither owned nor moving out.
    MigrateClear(MigrateClearRequest),
    /// Two-phase commit of a cross-group transaction, one participant's steps (`twopc.rs`).
    Prepare(PrepareRequest),
    /// `now_ms` is the proposing leader's clock, so that every replica decides alike.
    Decide {
        req: DecideRequest,
        now_ms: u64,
    },
    Finish(FinishRequest),
    Forget(ForgetRequest),
}

impl Command {
    pub fn encode(&self) -> Vec<u8> {
        let (tag, len) = match self {
            Command::Txn(t) => (CMD_TXN, t.encoded_len()),
            Command::SetOwnership(o) => (CMD_SET_OWNERSHIP, o.encoded_len()),
            Command::TxnBatch(ts) => (
                CMD_TXN_BATCH,
                ts.iter()
                    .map(|t| prost::length_delimiter_len(t.encoded_len()) + t.encoded_len())
                    .sum(),
            ),
            Command::MigrateOut(m) => (CMD_MIGRATE_OUT, m.encoded_len()),
            Command::MigrateIngest(m) => (CMD_MIGRATE_INGEST, m.encoded_len()),
            Command::MigrateClear(m) => (CMD_MIGRATE_CLEAR, m.encoded_len()),
            Command::Prepare(p) => (CMD_PREPARE, p.encoded_len()),
            Command::Decide { req, .. } => (CMD_DECIDE, 8 + req.encoded_len()),
            Command::Finish(f) => (CMD_FINISH, f.encoded_len()),
            Command::Forget(f) => (CMD_FORGET, f.encoded_len()),
        };
        let mut data = Vec::with_capacity(1 + len);
        data.push(tag);
        match self {
            Command::Txn(t) => t.encode(&mut data),
            Command::SetOwnership(o) => o.encode(&mut data),
            Command::TxnBatch(ts) => ts
                .iter()
                .try_for_each(|t| t.encode_length_delimited(&mut data)),
            Command::MigrateOut(m) => m.encode(&mut data),
            Command::MigrateIngest(m) => m.encode(&mut data),
            Command::MigrateClear(m) => m.encode(&mut data),
            Command::Prepare(p) => p.encode(&mut data),
            Command::Decide { req, now_ms } => {
                data.extend_from_slice(&now_ms.to_be_bytes());
                req.encode(&mut data)
            }
            Command::Finish(f) => f.encode(&mut data),
            Command::Forget(f) => f.encode(&mut data),
        }
        .expect("vec has room");
        data
    }

    pub fn decode(data: &[u8]) -> std::result::Result<Command, String> {
        match data.split_first() {
            Some((&CMD_TXN, rest)) => TxnRequest::decode(rest)
                .map(Command::Txn)
                .map_err(|e| e.to_string()),
            Some((&CMD_SET_OWNERSHIP, rest)) => SetOwnershipRequest::decode(rest)
                .map(Command::SetOwnership)
                .map_err(|e| e.to_string()),
            Some((&CMD_TXN_BATCH, mut rest)) => {
                let mut txns = Vec::new();
                while !rest.is_empty() {
                    txns.push(
                        TxnRequest::decode_length_delimited(&mut rest)
                            .map_err(|e| format!("txn {} of a batch: {e}", txns.len()))?,
                    );
                }
                Ok(Command::TxnBatch(txns))
            }
            Some((&CMD_MIGRATE_OUT, rest)) => MigrateOutRequest::decode(rest)
                .map(Command::MigrateOut)
                .map_err(|e| e.to_string()),
            Some((&CMD_MIGRATE_INGEST, rest)) => MigrateIngestRequest::decode(rest)
                .map(Command::MigrateIngest)
                .map_err(|e| e.to_string()),
            Some((&CMD_MIGRATE_CLEAR, rest)) => MigrateClearRequest::decode(rest)
                .map(Command::MigrateClear)
                .map_err(|e| e.to_string()),
            Some((&CMD_PREPARE, rest)) => PrepareRequest::decode(rest)
                .map(Command::Prepare)
                .map_err(|e| e.to_string()),
            Some((&CMD_DECIDE, rest)) if rest.len() >= 8 => {
                let now_ms = u64::from_be_bytes(rest[..8].try_into().unwrap());
                DecideRequest::decode(&rest[8..])
                    .map(|req| Command::Decide { req, now_ms })
                    .map_err(|e| e.to_string())
            }
            Some((&CMD_FINISH, rest)) => FinishRequest::decode(rest)
                .map(Command::Finish)
                .map_err(|e| e.to_string()),
            Some((&CMD_FORGET, rest)) => ForgetRequest::decode(rest)
                .map(Command::Forget)
                .map_err(|e| e.to_string()),
            Some((tag, _)) => Err(format!("unknown command tag {tag}")),
            None => Err("empty command".into()),
        }
    }
}

/// What applying a command produced.
#[derive(Debug)]
pub enum Outcome {
    Txn(TxnResponse),
    Ownership(SetOwnershipResponse),
    /// One result per transaction of a `TxnBatch`, in order.
    TxnBatch(Vec<Result<TxnResponse>>),
    /// A migration command: the index it applied at (for a fence, the fence's index), and for a
    /// clear how many items it deleted and whether the slots are empty now.
    Migration {
        index: u64,
        deleted: u64,
        done: bool,
    },
    Prepared(PrepareResponse),
    Decided(DecideResponse),
    Finished(FinishResponse),
    Forgotten,
}

/// The slots this replica's group owns, as of a map version.
#[derive(Clone, Debug, PartialEq)]
pub struct Ownership {
    pub map_version: u64,
    /// `None`: standalone, never managed by a config server, owns every slot.
    pub slots: Option<Vec<bool>>,
}

impl Ownership {
    pub fn owns(&self, slot: u32) -> bool {
        self.slots
            .as_ref()
            .is_none_or(|s| s.get(slot as usize).copied().unwrap_or(false))
    }

    pub fn count(&self, slot_count: u32) -> u32 {
        match &self.slots {
            None => slot_count,
            Some(s) => s.iter().filter(|b| **b).count() as u32,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let slots = self
            .slots
            .as_ref()
            .expect("standalone ownership is never stored");
        let mut out = self.map_version.to_be_bytes().to_vec();
        out.extend(slots.chunks(8).map(|c| {
            c.iter()
                .enumerate()
                .fold(0u8, |b, (i, on)| b | ((*on as u8) << i))
        }));
        out
    }

    fn decode(raw: &[u8], slot_count: u32) -> Result<Ownership> {
        let want = 8 + (slot_count as usize).div_ceil(8);
        if raw.len() != want {
            return Err(Error::Corruption(format!(
                "tree meta, ownership: {} bytes, expected {want}",
                raw.len()
            )));
        }
        let slots = (0..slot_count as usize)
            .map(|s| raw[8 + s / 8] & (1 << (s % 8)) != 0)
            .collect();
        Ok(Ownership {
            map_version: u64::from_be_bytes(raw[..8].try_into().unwrap()),
            slots: Some(slots),
        })
    }
}

/// One committed entry to apply: its index and its command (`None` for raft's own entries).
pub struct Apply {
    pub index: u64,
    pub cmd: Option<Command>,
}

/// Every shard key a transaction touches.
pub fn shard_keys(t: &TxnRequest) -> impl Iterator<Item = &[u8]> {
    t.compares.iter().map(|c| c.shard_key.as_ref()).chain(
        t.success.iter().chain(&t.failure).filter_map(|op| {
            Some(match op.op.as_ref()? {
                txn_op::Op::Put(p) => p.shard_key.as_ref(),
                txn_op::Op::Delete(d) => d.shard_key.as_ref(),
                txn_op::Op::Get(g) => g.shard_key.as_ref(),
            })
        }),
    )
}

struct TxView<'a> {
    data: &'a TransactionalTree,
    slot_count: u32,
    node_id: u64,
    /// Writes to slots moving out are also appended to their migration's change log here.
    log: migrate::LogWriter<'a>,
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

fn tx_err(e: sled::transaction::UnabortableTransactionError) -> Error {
    Error::Storage(e.to_string())
}

impl ItemView for TxView<'_> {
    fn get(&mut self, sk: &[u8], key: &[u8]) -> Result<Option<(u64, Vec<u8>)>> {
        let raw_key = keys::encode_key(ordo_proto::slot_of(sk, self.slot_count), sk, key);
        match self.data.get(&raw_key).map_err(tx_err)? {
            Some(raw) => {
                let (version, value) = checked_value(self.node_id, &raw_key, &raw)?;
                Ok(Some((version, value.to_vec())))
            }
            None => Ok(None),
        }
    }
    fn put(&mut self, sk: &[u8], key: &[u8], version: u64, value: &[u8]) -> Result<()> {
        let slot = ordo_proto::slot_of(sk, self.slot_count);
        let raw_key = keys::encode_key(slot, sk, key);
        let raw_value = keys::encode_value(version, value);
        self.log.record(slot, &raw_key, &raw_value)?;
        self.data.insert(raw_key, raw_value).map_err(tx_err)?;
        Ok(())
    }
    fn delete(&mut self, sk: &[u8], key: &[u8]) -> Result<()> {
        let slot = ordo_proto::slot_of(sk, self.slot_count);
        let raw_key = keys::encode_key(slot, sk, key);
        self.log.record(slot, &raw_key, &[])?;
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

fn load_ownership(meta: &sled::Tree, slot_count: u32) -> Result<Ownership> {
    match meta.get(OWNERSHIP_KEY)? {
        Some(raw) => Ownership::decode(&raw, slot_count),
        None => Ok(Ownership {
            map_version: 0,
            slots: None,
        }),
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
        let ownership = load_ownership(&meta, slot_count)?;
        let moving = Moving::load(&meta)?;
        let locks = participant::count_locks(&meta)?;
        Ok(Opened {
            sm: StateMachine {
                node_id,
                data,
                meta,
                slot_count,
                applied: AtomicU64::new(applied),
                applied_tx: tokio::sync::watch::channel(applied).0,
                ownership: RwLock::new(ownership),
                moving: RwLock::new(moving),
                view: RwLock::new(()),
                locks: AtomicI64::new(locks),
            },
            interrupted_install,
        })
    }

    /// A founding replica's first start: the log begins after `index` (the bootstrap position,
    /// which carries no data), so count it as applied.
    pub fn start_at(&self, index: u64) -> Result<()> {
        if self.applied_index() < index {
            self.meta.insert(APPLIED_KEY, &index.to_be_bytes())?;
            self.applied.store(index, Ordering::Release);
            self.applied_tx.send_replace(index);
        }
        Ok(())
    }

    pub fn applied_index(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Applies committed entries in order. Runs of transactions go into one sled transaction
    /// with the applied index; an ownership change is applied on its own (it must look at the
    /// data already written). Returns the outcome of every entry that carried a command; a
    /// refused command (e.g. a slot this group does not own) is an `Err` outcome with no effects.
    pub fn apply(&self, batch: &[Apply]) -> Result<Vec<(u64, Result<Outcome>)>> {
        let mut out = Vec::with_capacity(batch.len());
        let mut run_start = 0;
        for (i, a) in batch.iter().enumerate() {
            let r = match &a.cmd {
                Some(Command::SetOwnership(req)) => {
                    self.apply_txns(&batch[run_start..i], &mut out)?;
                    self.apply_ownership(a.index, req)?
                }
                Some(
                    cmd @ (Command::MigrateOut(_)
                    | Command::MigrateIngest(_)
                    | Command::MigrateClear(_)),
                ) => {
                    self.apply_txns(&batch[run_start..i], &mut out)?;
                    self.apply_migration(a.index, cmd)?
                }
                _ => continue,
            };
            out.push((a.index, r));
            run_start = i + 1;
        }
        self.apply_txns(&batch[run_start..], &mut out)?;
        if let Some(last) = batch.last() {
            self.applied_tx.send_replace(last.index);
        }
        Ok(out)
    }

    fn apply_txns(&self, batch: &[Apply], out: &mut Vec<(u64, Result<Outcome>)>) -> Result<()> {
        let Some(last) = batch.last() else {
            return Ok(());
        };
        let ownership = self.ownership.read().unwrap().clone();
        let moving = self.moving.read().unwrap();
        let _w = self.view.write().unwrap();
        let results = (&self.data, &self.meta)
            .transaction(|(data, meta)| {
                let mut view = TxView {
                    data,
                    slot_count: self.slot_count,
                    node_id: self.node_id,
                    log: migrate::LogWriter::new(meta, &moving),
                };
                let mut results = Vec::with_capacity(batch.len());
                let mut locks = self.locks.load(Ordering::Relaxed);
                // Refused if a shard key's slot is not owned here (at apply time, the
                // authoritative check).
                let unowned = |sks: &mut dyn Iterator<Item = &[u8]>| -> Option<Error> {
                    sks.map(|sk| ordo_proto::slot_of(sk, self.slot_count))
                        .find(|slot| !ownership.owns(*slot))
                        .map(|slot| Error::WrongShard {
                            slot,
                            map_version: ownership.map_version,
                        })
                };
                // One transaction: refused if it touches a slot not owned here or an item a
                // cross-group transaction holds, else evaluated.
                let apply_one = |view: &mut TxView,
                                 locks: i64,
                                 t: &TxnRequest|
                 -> std::result::Result<
                    Result<TxnResponse>,
                    ConflictableTransactionError<Error>,
                > {
                    let slots = || shard_keys(t).map(|sk| ordo_proto::slot_of(sk, self.slot_count));
                    if let Some(e) = slots().find_map(|slot| moving.fenced(slot)) {
                        return Ok(Err(e));
                    }
                    if let Some(e) = unowned(&mut shard_keys(t)) {
                        return Ok(Err(e));
                    }
                    if locks > 0 {
                        if let Err(e) = participant::check_unlocked(meta, self.slot_count, t, None)?
                        {
                            return Ok(Err(e));
                        }
                    }
                    Ok(Ok(
                        txn::evaluate(view, t).map_err(ConflictableTransactionError::Abort)?
                    ))
                };
                for a in batch {
                    view.log.at_index(a.index);
                    let r = match &a.cmd {
                        Some(Command::Txn(t)) => apply_one(&mut view, locks, t)?.map(Outcome::Txn),
                        Some(Command::TxnBatch(ts)) => {
                            let mut rs = Vec::with_capacity(ts.len());
                            for t in ts {
                                rs.push(apply_one(&mut view, locks, t)?);
                            }
                            Ok(Outcome::TxnBatch(rs))
                        }
                        Some(Command::Prepare(p)) => {
                            let part = p.part.clone().unwrap_or_default();
                            // No new lock in a slot that is moving out: the move must not split
                            // a transaction (its fence waits for the locks already there). A
                            // lock met there is reported first, so that the prepare's router
                            // resolves it (nobody else may touch a moving slot's items).
                            let moving_slot = shard_keys(&part)
                                .map(|sk| ordo_proto::slot_of(sk, self.slot_count))
                                .find_map(|slot| moving.moving_out(slot));
                            let locked = match moving_slot {
                                Some(_) => participant::check_unlocked(
                                    meta,
                                    self.slot_count,
                                    &part,
                                    Some(&p.txn_id),
                                )?
                                .err(),
                                None => None,
                            };
                            let refused = locked
                                .or(moving_slot)
                                .or_else(|| unowned(&mut shard_keys(&part)));
                            match refused {
                                Some(e) => Err(e),
                                None => participant::prepare(
                                    &mut view,
                                    meta,
                                    self.slot_count,
                                    p,
                                    &mut locks,
                                )?
                                .map(Outcome::Prepared),
                            }
                        }
                        Some(Command::Decide { req, now_ms }) => {
                            // A record is a new one only outside a moving slot (a move waits
                            // for the records of its slots).
                            let slot = ordo_proto::slot_of(&req.primary_shard_key, self.slot_count);
                            let refused = moving.moving_out(slot).or_else(|| {
                                unowned(&mut std::iter::once(req.primary_shard_key.as_ref()))
                            });
                            match refused {
                                Some(e) => Err(e),
                                None => participant::decide(meta, self.slot_count, req, *now_ms)?
                                    .map(Outcome::Decided),
                            }
                        }
                        Some(Command::Finish(f)) => {
                            participant::finish(&mut view, meta, self.slot_count, f, &mut locks)?
                                .map(Outcome::Finished)
                        }
                        Some(Command::Forget(f)) => {
                            participant::forget(meta, self.slot_count, f)?;
                            Ok(Outcome::Forgotten)
                        }
                        _ => continue,
                    };
                    results.push((a.index, r));
                }
                meta.insert(APPLIED_KEY, &last.index.to_be_bytes())?;
                Ok((results, locks))
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Abort(e) => e,
                sled::transaction::TransactionError::Storage(e) => Error::from(e),
            })?;
        let (results, locks) = results;
        self.locks.store(locks, Ordering::Relaxed);
        self.applied.store(last.index, Ordering::Release);
        out.extend(results);
        Ok(())
    }

    /// Whether any item is stored in `slot`.
    fn slot_has_data(&self, slot: u32) -> Result<bool> {
        let mut range = self
            .data
            .range(keys::slot_start(slot)..keys::slot_start(slot + 1));
        Ok(range.next().transpose()?.is_some())
    }

    fn apply_ownership(&self, index: u64, req: &SetOwnershipRequest) -> Result<Result<Outcome>> {
        let current = self.ownership.read().unwrap().clone();
        let refuse = |msg: String| -> Result<Result<Outcome>> {
            self.meta.insert(APPLIED_KEY, &index.to_be_bytes())?;
            self.applied.store(index, Ordering::Release);
            Ok(Err(Error::FailedPrecondition(msg)))
        };
        if req.slot_count != self.slot_count {
            return refuse(format!(
                "the map has {} slots but this group was created with {}",
                req.slot_count, self.slot_count
            ));
        }
        if current.slots.is_some() && req.map_version < current.map_version {
            return refuse(format!(
                "ownership for map version {} is older than this group's {}",
                req.map_version, current.map_version
            ));
        }
        let mut slots = vec![false; self.slot_count as usize];
        for &s in &req.slots {
            match slots.get_mut(s as usize) {
                Some(b) => *b = true,
                None => {
                    return refuse(format!(
                        "slot {s} is out of range (slot count {})",
                        self.slot_count
                    ))
                }
            }
        }
        // A slot leaves with data only inside a fenced migration (its data is copied to the
        // recipient and deleted here afterwards); otherwise only empty.
        let moving = self.moving.read().unwrap();
        for slot in 0..self.slot_count {
            if current.owns(slot)
                && !slots[slot as usize]
                && moving.fenced(slot).is_none()
                && self.slot_has_data(slot)?
            {
                return refuse(format!("slot {slot} still holds data here; move it with `ordoctl move-slots`, which copies its data, instead of changing ownership directly"));
            }
        }
        drop(moving);
        let next = Ownership {
            map_version: req.map_version,
            slots: Some(slots),
        };
        let owned = next.count(self.slot_count);
        {
            let _w = self.view.write().unwrap();
            let mut batch = sled::Batch::default();
            batch.insert(OWNERSHIP_KEY, next.encode());
            batch.insert(APPLIED_KEY, &index.to_be_bytes());
            self.meta.apply_batch(batch)?;
            *self.ownership.write().unwrap() = next;
        }
        self.applied.store(index, Ordering::Release);
        tracing::info!(
            node = self.node_id,
            map_version = req.map_version,
            owned,
            "slot ownership changed"
        );
        Ok(Ok(Outcome::Ownership(SetOwnershipResponse {
            map_version: req.map_version,
            owned_slots: owned,
        })))
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
        participant::Lock::decode(lock_key, raw).map_err(|e| match e {
            sled::transaction::ConflictableTransactionError::Abort(e) => e,
            other => Error::Storage(format!("{other:?}")),
        })
    }

    /// Refuses at once (before proposing) a transaction that would meet a lock at apply time
    /// (any lock but its own write lock); the apply-time check stays the authoritative one.
    pub fn check_unlocked(&self, t: &TxnRequest, own: Option<&[u8]>) -> Result<()> {
        if self.locks.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        for (sk, k) in participant::items(t) {
            let raw_key = keys::encode_key(ordo_proto::slot_of(sk, self.slot_count), sk, k);
            let lk = participant::lock_key(&raw_key);
            if let Some(raw) = self.meta.get(&lk)? {
                let lock = self.decode_lock(&lk, &raw)?;
                let ours =
                    lock.write && own.is_some_and(|id| lock.holders.iter().any(|h| h.txn_id == id));
                if !ours {
                    return Err(lock.refusal(&raw_key));
                }
            }
        }
        Ok(())
    }

    /// Why migration `id` must not fence its slots yet, if it must not: an item of them is
    /// locked, or a transaction whose primary is in them decided less than `keep_ms` ago (its
    /// record is not copied by the move, and its other parts may still need it). Checked on the
    /// leader before the fence is proposed; the apply-time check covers the locks.
    pub fn fence_blocker(&self, id: u64, now_ms: u64, keep_ms: u64) -> Result<Option<String>> {
        let slots = self.moving.read().unwrap().slots_of(id);
        for slot in slots {
            let [locks, records] = participant::slot_prefixes(slot);
            if self.meta.scan_prefix(&locks).next().is_some() {
                return Ok(Some(format!(
                    "slot {slot} has items locked by an unfinished cross-group transaction; \
                     fence again once it finishes"
                )));
            }
            for kv in self.meta.scan_prefix(&records) {
                let (k, v) = kv?;
                let decided = participant::record_age_base(&k, &v)?;
                if now_ms < decided.saturating_add(keep_ms) {
                    return Ok(Some(format!(
                        "slot {slot} holds the decision of a cross-group transaction taken {} ms \
                         ago that may still be finishing (locked elsewhere); fence again once it \
                         is forgotten",
                        now_ms.saturating_sub(decided)
                    )));
                }
            }
        }
        Ok(None)
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
            if let Some(raw) = self.meta.get(&lk)? {
                let lock = self.decode_lock(&lk, &raw)?;
                if lock.write {
                    return Err(lock.refusal(&raw_key));
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
        if self.locks.load(Ordering::Relaxed) > 0 {
            // A scan must not see half of a transaction: any lock in its range refuses it.
            let lock_prefix = participant::lock_prefix(&prefix);
            for kv in self.meta.range(participant::lock_key(&from)..) {
                let (lk, raw) = kv?;
                if !lk.starts_with(&lock_prefix) {
                    break;
                }
                let raw_key = &lk[participant::lock_key(&[]).len()..];
                if !end.is_empty() && &raw_key[prefix.len()..] >= end {
                    break;
                }
                let lock = self.decode_lock(&lk, &raw)?;
                if lock.write {
                    return Err(lock.refusal(raw_key));
                }
            }
        }
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
            let (version, value) = checked_value(self.node_id, &raw_key, &raw)?;
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
            checked_value(self.node_id, &k, &v)?; // never ship an item that fails its checksum
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
        self.meta.remove(OWNERSHIP_KEY)?;
        for k in self.meta.scan_prefix(participant::PREFIX).keys() {
            self.meta.remove(k?)?;
        }
        migrate::clear_meta(&self.meta)?;
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
        *self.ownership.write().unwrap() = load_ownership(&self.meta, self.slot_count)?;
        self.locks
            .store(participant::count_locks(&self.meta)?, Ordering::Relaxed);
        *self.moving.write().unwrap() = Moving::load(&self.meta)?;
        self.applied_tx.send_replace(index);
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

    fn put(sk: &str, k: &str, v: &str) -> Command {
        Command::Txn(TxnRequest {
            success: vec![TxnOp {
                op: Some(txn_op::Op::Put(PutRequest {
                    shard_key: sk.as_bytes().to_vec().into(),
                    key: k.as_bytes().to_vec().into(),
                    value: v.as_bytes().to_vec().into(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        })
    }

    #[test]
    fn apply_scan_snapshot_and_install_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("a")).unwrap();
        let sm = StateMachine::open(&db, 1, 64).unwrap().sm;
        let batch: Vec<Apply> = (0..30)
            .map(|i| Apply {
                index: i + 1,
                cmd: Some(put("order-7", &format!("items/{i:02}"), "x")),
            })
            .chain(std::iter::once(Apply {
                index: 31,
                cmd: None,
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
            cmd: Some(put("stale", "", "gone after install")),
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
                cmd: Some(put("o", "", "v")),
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

    fn own(version: u64, slots: &[u32]) -> Command {
        Command::SetOwnership(SetOwnershipRequest {
            group_id: 1,
            map_version: version,
            slot_count: 64,
            slots: slots.to_vec(),
        })
    }

    #[test]
    fn ownership_gates_writes_and_slots_leave_only_empty() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let sm = StateMachine::open(&db, 1, 64).unwrap().sm;
        let slot = ordo_proto::slot_of(b"order-1", 64);
        let other: Vec<u32> = (0..64).filter(|s| *s != slot).collect();
        // Standalone: owns every slot.
        assert!(sm.check_owned(b"order-1").is_ok());
        let r = sm
            .apply(&[
                Apply {
                    index: 1,
                    cmd: Some(own(1, &other)),
                },
                Apply {
                    index: 2,
                    cmd: Some(put("order-1", "", "x")),
                },
            ])
            .unwrap();
        assert!(matches!(
            r[0].1,
            Ok(Outcome::Ownership(SetOwnershipResponse {
                owned_slots: 63,
                ..
            }))
        ));
        assert!(
            matches!(r[1].1, Err(Error::WrongShard { slot: s, map_version: 1 }) if s == slot),
            "{:?}",
            r[1]
        );
        assert!(
            sm.get(b"order-1", b"").unwrap().is_none(),
            "a refused write changes nothing"
        );
        assert_eq!(
            sm.applied_index(),
            2,
            "a refused entry is still applied (as nothing)"
        );

        let all: Vec<u32> = (0..64).collect();
        sm.apply(&[
            Apply {
                index: 3,
                cmd: Some(own(2, &all)),
            },
            Apply {
                index: 4,
                cmd: Some(put("order-1", "", "x")),
            },
        ])
        .unwrap();
        assert!(sm.get(b"order-1", b"").unwrap().is_some());
        // The slot holds data now: it cannot leave, and older map versions are refused.
        let r = sm
            .apply(&[
                Apply {
                    index: 5,
                    cmd: Some(own(3, &other)),
                },
                Apply {
                    index: 6,
                    cmd: Some(own(1, &all)),
                },
            ])
            .unwrap();
        assert!(
            matches!(&r[0].1, Err(Error::FailedPrecondition(m)) if m.contains("still holds data")),
            "{:?}",
            r[0]
        );
        assert!(
            matches!(&r[1].1, Err(Error::FailedPrecondition(m)) if m.contains("older")),
            "{:?}",
            r[1]
        );
        assert_eq!(sm.ownership().map_version, 2);

        // Ownership survives a restart.
        drop(sm);
        let sm = StateMachine::open(&db, 1, 64).unwrap().sm;
        assert_eq!(sm.ownership().count(64), 64);
        assert_eq!(sm.ownership().map_version, 2);
    }

    #[test]
    fn commands_round_trip_and_unknown_tags_are_refused() {
        let cmd = own(4, &[1, 2, 3]);
        assert_eq!(Command::decode(&cmd.encode()).unwrap(), cmd);
        let cmd = put("o", "k", "v");
        assert_eq!(Command::decode(&cmd.encode()).unwrap(), cmd);
        assert!(Command::decode(&[9, 1, 2])
            .unwrap_err()
            .contains("unknown command tag 9"));
        assert!(Command::decode(&[]).is_err());
        let txn = |c: Command| match c {
            Command::Txn(t) => t,
            other => panic!("{other:?}"),
        };
        let batch = Command::TxnBatch(vec![txn(put("o", "a", "1")), txn(put("p", "", "2"))]);
        assert_eq!(Command::decode(&batch.encode()).unwrap(), batch);
        let mut cut = batch.encode();
        cut.pop();
        assert!(Command::decode(&cut)
            .unwrap_err()
            .contains("txn 1 of a batch"));
    }

    /// A stored value whose bytes changed is refused on read, by a transaction and by a
    /// snapshot build, with the node, the tree and the key in the error.
    #[test]
    fn a_corrupted_value_is_detected_and_reported_with_node_tree_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let sm = StateMachine::open(&db, 7, 64).unwrap().sm;
        sm.apply(&[Apply {
            index: 1,
            cmd: Some(put("order-9", "items/1", "sku-42")),
        }])
        .unwrap();
        let data = db.open_tree("data").unwrap();
        let (k, v) = data.iter().next().unwrap().unwrap();
        let mut bad = v.to_vec();
        *bad.last_mut().unwrap() ^= 0x01;
        data.insert(&k, bad).unwrap();
        let expect = |e: Error| {
            let msg = e.to_string();
            assert!(matches!(e, Error::Corruption(_)), "{msg}");
            assert!(
                msg.contains("node 7") && msg.contains("tree data") && msg.contains("order-9"),
                "{msg}"
            );
        };
        expect(sm.get(b"order-9", b"items/1").unwrap_err());
        expect(sm.scan(b"order-9", b"", b"", 10).unwrap_err());
        expect(
            sm.build_snapshot(&dir.path().join("snap"), 1)
                .map(|_| ())
                .unwrap_err(),
        );
        let r = sm.apply(&[Apply {
            index: 2,
            cmd: Some(put("order-9", "items/1", "again")),
        }]);
        // A put reads the old version first: the corrupt value is not silently overwritten.
        expect(r.map(|_| ()).unwrap_err());
    }

    /// The transactions of a batch apply in order, each with its own outcome: a later one sees an
    /// earlier one's write, and one refused (a slot not owned) changes nothing of the others.
    #[test]
    fn a_batch_applies_its_transactions_in_order_with_their_own_outcomes() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let sm = StateMachine::open(&db, 1, 64).unwrap().sm;
        let txn = |c: Command| match c {
            Command::Txn(t) => t,
            other => panic!("{other:?}"),
        };
        let refused = ordo_proto::slot_of(b"order-2", 64);
        let others: Vec<u32> = (0..64).filter(|s| *s != refused).collect();
        sm.apply(&[Apply {
            index: 1,
            cmd: Some(own(1, &others)),
        }])
        .unwrap();
        let batch = Command::TxnBatch(vec![
            txn(put("order-1", "", "a")),
            txn(put("order-2", "", "refused")),
            txn(put("order-1", "", "b")),
        ]);
        let r = sm
            .apply(&[Apply {
                index: 2,
                cmd: Some(batch),
            }])
            .unwrap();
        let Ok(Outcome::TxnBatch(results)) = &r[0].1 else {
            panic!("{r:?}")
        };
        assert_eq!(results.len(), 3);
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        assert!(
            matches!(results[1], Err(Error::WrongShard { .. })),
            "{results:?}"
        );
        assert_eq!(
            sm.get(b"order-1", b"").unwrap().unwrap().0,
            2,
            "both writes, in order"
        );
        assert!(sm.get(b"order-2", b"").unwrap().is_none());
        assert_eq!(sm.applied_index(), 2);
    }
}
