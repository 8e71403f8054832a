//! What each [`Op`] does against a [`Backend`], and the state the ops share (which records and
//! orders exist).
//!
//! An op either succeeds or fails with a *kind*: the gRPC code name (`Unavailable`,
//! `DeadlineExceeded`, ...) or one of the bench's own outcomes:
//! `Conflict` (a version compare failed: someone else wrote first), `NotFound` (the chosen record
//! or order is not there; a scan from an existing record that returned nothing), `Terminal` (the
//! order is already in its final status), `NoRecords` (nothing exists yet to choose from) and
//! `MissingItems` (an order's root was there but not all its line items: a torn aggregate).

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tonic::Status;

use crate::backend::{Backend, Txn, VersionIs, Write};
use crate::workload::{
    next_status, order_id, order_root_value, order_status, KeyChooser, Layout, Op, XorShift64,
    ORDER_STATUSES,
};

/// Why an op failed: a gRPC code name or a bench outcome (see the module docs).
pub type ErrorKind = String;

pub const CONFLICT: &str = "Conflict";
pub const NOT_FOUND: &str = "NotFound";
pub const TERMINAL: &str = "Terminal";
pub const NO_RECORDS: &str = "NoRecords";
/// An order whose root was read but whose line items were not all there: the create `Txn` was
/// not atomic (or, with stale reads, two replicas were at different points).
pub const MISSING_ITEMS: &str = "MissingItems";

fn kind(status: Status) -> ErrorKind {
    format!("{:?}", status.code())
}

/// Which group owns each slot (from the target's shard map), so that `txn1`/`txn2` can pick
/// records of one group or of two.
#[derive(Debug, Clone)]
pub struct Groups {
    pub slot_count: u32,
    pub slot_owner: Vec<u64>,
}

impl Groups {
    pub fn of(&self, shard_key: &str) -> u64 {
        self.slot_owner[ordo::proto::slot_of(shard_key.as_bytes(), self.slot_count) as usize]
    }
}

/// What all tasks share about the data set.
#[derive(Debug)]
pub struct World {
    pub layout: Layout,
    /// Payload of every write (records, order items).
    pub value: Bytes,
    /// Line items per new order.
    pub order_items: u32,
    /// Prefix of the order IDs of this run, so that runs against one cluster do not collide.
    pub order_prefix: String,
    /// Records (or orders) `0..existing` exist: the choosers draw from this range.
    pub existing: AtomicU64,
    /// The number the next insert (or order create) takes.
    pub next_new: AtomicU64,
    /// The target's slot owners, when it has groups (an Ordo cluster).
    pub groups: Option<Groups>,
}

impl World {
    pub fn new(layout: Layout, value: Bytes, order_items: u32, order_prefix: String) -> World {
        World {
            layout,
            value,
            order_items,
            order_prefix,
            existing: AtomicU64::new(0),
            next_new: AtomicU64::new(0),
            groups: None,
        }
    }

    /// A record to write together with record `n` in one `Txn`: of another shard key, owned
    /// by the same group as `n`'s (`same_group`) or by another one. Without a map (etcd): any
    /// other shard key.
    fn partner(&self, n: u64, same_group: bool) -> Option<(String, String)> {
        let (sk, _) = self.layout.record(n);
        let existing = self.existing.load(Ordering::Relaxed).max(1);
        (1..=4 * existing.min(4096)).find_map(|step| {
            let (psk, pkey) = self
                .layout
                .record((n + step * self.layout.items_per_shard) % existing);
            let fits = psk != sk
                && self
                    .groups
                    .as_ref()
                    .is_none_or(|g| (g.of(&psk) == g.of(&sk)) == same_group);
            fits.then_some((psk, pkey))
        })
    }

    fn created(&self, n: u64) {
        self.existing.fetch_max(n + 1, Ordering::Relaxed);
    }

    /// After the load phase: new records continue from `records`.
    pub fn loaded(&self, records: u64) {
        self.next_new.store(records, Ordering::Relaxed);
    }
}

/// The per-task generator state.
pub struct Draw {
    pub rng: XorShift64,
    pub chooser: KeyChooser,
}

impl Draw {
    fn existing(&mut self, world: &World) -> Result<u64, ErrorKind> {
        let n = world.existing.load(Ordering::Relaxed);
        self.chooser
            .next(&mut self.rng, n)
            .ok_or_else(|| NO_RECORDS.to_string())
    }
}

/// Inserts record `n` (load phase and YCSB insert).
pub async fn insert_record(backend: &Backend, world: &World, n: u64) -> Result<(), ErrorKind> {
    let (sk, key) = world.layout.record(n);
    backend
        .put(&sk, &key, world.value.clone())
        .await
        .map_err(kind)?;
    world.created(n);
    Ok(())
}

/// The transaction that creates order `id` (version 0 = must not exist yet): root, line items,
/// and the outbox entry announcing it, all or nothing.
pub fn create_order_txn(id: &str, items: u32, payload: &Bytes) -> Txn {
    let sk = Bytes::copy_from_slice(id.as_bytes());
    let mut writes = vec![Write {
        shard_key: sk.clone(),
        key: Bytes::new(),
        value: order_root_value(ORDER_STATUSES[0], payload),
    }];
    for i in 1..=items {
        writes.push(Write {
            shard_key: sk.clone(),
            key: format!("items/{i}").into(),
            value: payload.clone(),
        });
    }
    writes.push(Write {
        shard_key: sk.clone(),
        key: outbox_key(1),
        value: format!("order {id} {}", ORDER_STATUSES[0]).into(),
    });
    Txn {
        compares: vec![VersionIs {
            shard_key: sk,
            key: Bytes::new(),
            version: 0,
        }],
        writes,
    }
}

/// The transaction that moves order `id` from the root version `version` (holding `status`) to
/// `next`, with its outbox entry; it fails if anyone changed the root since it was read.
pub fn advance_order_txn(id: &str, version: u64, next: &str, payload: &Bytes) -> Txn {
    let sk = Bytes::copy_from_slice(id.as_bytes());
    Txn {
        compares: vec![VersionIs {
            shard_key: sk.clone(),
            key: Bytes::new(),
            version,
        }],
        writes: vec![
            Write {
                shard_key: sk.clone(),
                key: Bytes::new(),
                value: order_root_value(next, payload),
            },
            Write {
                shard_key: sk,
                key: outbox_key(version + 1),
                value: format!("order {id} {next}").into(),
            },
        ],
    }
}

/// The outbox entry written with root version `version`.
pub fn outbox_key(version: u64) -> Bytes {
    format!("outbox/{version:06}").into()
}

/// Creates order number `n`.
pub async fn create_order(backend: &Backend, world: &World, n: u64) -> Result<(), ErrorKind> {
    let id = order_id(&world.order_prefix, n);
    let txn = create_order_txn(&id, world.order_items, &world.value);
    if !backend.txn(txn).await.map_err(kind)? {
        return Err(CONFLICT.to_string());
    }
    world.created(n);
    Ok(())
}

/// Runs one `op`.
pub async fn execute(
    backend: &Backend,
    world: &World,
    op: Op,
    draw: &mut Draw,
) -> Result<(), ErrorKind> {
    match op {
        Op::Read => read(backend, world, draw).await,
        Op::Update => {
            let (sk, key) = world.layout.record(draw.existing(world)?);
            backend
                .put(&sk, &key, world.value.clone())
                .await
                .map_err(kind)
        }
        Op::Insert => {
            let n = world.next_new.fetch_add(1, Ordering::Relaxed);
            insert_record(backend, world, n).await
        }
        Op::Scan => scan(backend, world, draw).await,
        Op::Rmw => read_modify_write(backend, world, draw).await,
        Op::Txn1 | Op::Txn2 => write_pair(backend, world, draw, op == Op::Txn1).await,
        Op::OrderCreate => {
            let n = world.next_new.fetch_add(1, Ordering::Relaxed);
            create_order(backend, world, n).await
        }
        Op::OrderAdvance => advance_order(backend, world, draw).await,
        Op::OrderRead => read_order(backend, world, draw).await,
    }
}

/// `read`: one existing record.
async fn read(backend: &Backend, world: &World, draw: &mut Draw) -> Result<(), ErrorKind> {
    let (sk, key) = world.layout.record(draw.existing(world)?);
    match backend.get(&sk, &key).await.map_err(kind)? {
        Some(_) => Ok(()),
        None => Err(NOT_FOUND.to_string()),
    }
}

/// `scan`: up to a drawn number of records from an existing one, inside its shard key.
async fn scan(backend: &Backend, world: &World, draw: &mut Draw) -> Result<(), ErrorKind> {
    let (sk, key) = world.layout.record(draw.existing(world)?);
    let len = world.layout.scan_length(&mut draw.rng);
    // The scan starts at an existing record, so it returns at least that one.
    match backend.scan(&sk, &key, "", len).await.map_err(kind)? {
        0 => Err(NOT_FOUND.to_string()),
        _ => Ok(()),
    }
}

/// `rmw`: read a record, then write it back if nobody wrote it in between.
async fn read_modify_write(
    backend: &Backend,
    world: &World,
    draw: &mut Draw,
) -> Result<(), ErrorKind> {
    let (sk, key) = world.layout.record(draw.existing(world)?);
    let Some(found) = backend.get(&sk, &key).await.map_err(kind)? else {
        return Err(NOT_FOUND.to_string());
    };
    let txn = Txn {
        compares: vec![VersionIs {
            shard_key: sk.clone().into(),
            key: key.clone().into(),
            version: found.version,
        }],
        writes: vec![Write {
            shard_key: sk.into(),
            key: key.into(),
            value: world.value.clone(),
        }],
    };
    match backend.txn(txn).await.map_err(kind)? {
        true => Ok(()),
        false => Err(CONFLICT.to_string()),
    }
}

/// `txn1` (`same_group`) / `txn2`: one `Txn` writing two records of different shard keys, in one
/// group or in two.
async fn write_pair(
    backend: &Backend,
    world: &World,
    draw: &mut Draw,
    same_group: bool,
) -> Result<(), ErrorKind> {
    let n = draw.existing(world)?;
    let (sk, key) = world.layout.record(n);
    let Some((psk, pkey)) = world.partner(n, same_group) else {
        return Err(NOT_FOUND.to_string());
    };
    let write = |sk: String, key: String| Write {
        shard_key: sk.into(),
        key: key.into(),
        value: world.value.clone(),
    };
    let txn = Txn {
        compares: vec![],
        writes: vec![write(sk, key), write(psk, pkey)],
    };
    backend.txn(txn).await.map_err(kind)?;
    Ok(())
}

/// `order_advance`: move an existing order to its next status, unless someone else did first.
async fn advance_order(backend: &Backend, world: &World, draw: &mut Draw) -> Result<(), ErrorKind> {
    let id = order_id(&world.order_prefix, draw.existing(world)?);
    let Some(root) = backend.get(&id, "").await.map_err(kind)? else {
        return Err(NOT_FOUND.to_string());
    };
    let Some(next) = next_status(order_status(&root.value)) else {
        return Err(TERMINAL.to_string());
    };
    let txn = advance_order_txn(&id, root.version, next, &world.value);
    match backend.txn(txn).await.map_err(kind)? {
        true => Ok(()),
        false => Err(CONFLICT.to_string()),
    }
}

/// `order_read`: an existing order's root and all its line items.
async fn read_order(backend: &Backend, world: &World, draw: &mut Draw) -> Result<(), ErrorKind> {
    let id = order_id(&world.order_prefix, draw.existing(world)?);
    if backend.get(&id, "").await.map_err(kind)?.is_none() {
        return Err(NOT_FOUND.to_string());
    }
    let items = backend
        .scan(&id, "items/", "items0", 0)
        .await
        .map_err(kind)?;
    // Items are never deleted and were created with the root in one Txn.
    if items < world.order_items as usize {
        return Err(MISSING_ITEMS.to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_txns_have_the_aggregate_shape() {
        let payload = Bytes::from_static(b"p");
        let t = create_order_txn("r-o7", 3, &payload);
        assert_eq!(t.compares.len(), 1);
        assert_eq!(t.compares[0].version, 0, "a new order must not exist yet");
        let keys: Vec<&[u8]> = t.writes.iter().map(|w| &w.key[..]).collect();
        assert_eq!(
            keys,
            [
                &b""[..],
                b"items/1",
                b"items/2",
                b"items/3",
                b"outbox/000001"
            ]
        );
        assert!(t.writes.iter().all(|w| &w.shard_key[..] == b"r-o7"));
        assert_eq!(order_status(&t.writes[0].value), "created");

        let a = advance_order_txn("r-o7", 4, "shipped", &payload);
        assert_eq!(a.compares[0].version, 4);
        assert_eq!(order_status(&a.writes[0].value), "shipped");
        assert_eq!(&a.writes[1].key[..], b"outbox/000005");
    }

    #[test]
    fn created_records_extend_the_choosable_range() {
        let w = World::new(
            Layout {
                items_per_shard: 1,
                scan_length_max: 1,
            },
            Bytes::new(),
            1,
            String::new(),
        );
        w.created(4);
        w.created(2);
        assert_eq!(w.existing.load(Ordering::Relaxed), 5);
        w.loaded(10);
        assert_eq!(w.next_new.load(Ordering::Relaxed), 10);
    }
}
