//! The state machine's own tests: apply, reads, snapshots, ownership and the command codec.

use super::*;
use ordo_proto::v1::{txn_op, PutRequest, SetOwnershipRequest, SetOwnershipResponse, TxnOp};

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
            stamp: None,
        })
        .chain(std::iter::once(Apply {
            index: 31,
            cmd: None,
            stamp: None,
        }))
        .collect();
    assert_eq!(sm.apply_all(&batch).unwrap().len(), 30);
    assert_eq!(sm.applied_index(), 31);

    let (page, next) = sm.scan(b"order-7", b"items/05", b"items/20", 10).unwrap();
    assert_eq!(page.len(), 10);
    assert_eq!(page[0].key.as_ref(), b"items/05");
    assert_eq!(next.as_deref(), Some(&b"items/15"[..]));
    let (rest, next) = sm.scan(b"order-7", b"items/15", b"items/20", 10).unwrap();
    assert_eq!((rest.len(), next), (5, None));

    let (index, path, records) = sm
        .build_snapshot(&dir.path().join("snap"), sm.applied_index(), 2)
        .unwrap();
    // 30 items, their 30 change-feed events and the slot's feed meta; the applied time (sys).
    assert_eq!((index, records), (31, 62));
    let db2 = sled::open(dir.path().join("b")).unwrap();
    let sm2 = StateMachine::open(&db2, 2, 64).unwrap().sm;
    sm2.apply_all(&[Apply {
        index: 1,
        cmd: Some(put("stale", "", "gone after install")),
        stamp: None,
    }])
    .unwrap();
    // Every record of the data tree: items, events and the feed meta.
    assert_eq!(sm2.install_snapshot(&path, 31).unwrap(), 61);
    sm2.finish_install().unwrap();
    assert_eq!(sm2.digest().unwrap(), sm.digest().unwrap());
    assert_eq!(sm2.applied_index(), 31);
    assert!(sm2.get(b"stale", b"").unwrap().is_none());
}

#[test]
fn an_interrupted_install_resets_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    // One handle throughout: sled frees a path's lock only after its flusher thread is gone, some
    // time after the last handle drops, so opening the path again at once can fail.
    let db = sled::open(dir.path()).unwrap();
    {
        let sm = StateMachine::open(&db, 1, 64).unwrap().sm;
        sm.apply_all(&[Apply {
            index: 5,
            cmd: Some(put("o", "", "v")),
            stamp: None,
        }])
        .unwrap();
        sm.sys.insert(INSTALLING_KEY, &9u64.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
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
        ..Default::default()
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
        .apply_all(&[
            Apply {
                index: 1,
                cmd: Some(own(1, &other)),
                stamp: None,
            },
            Apply {
                index: 2,
                cmd: Some(put("order-1", "", "x")),
                stamp: None,
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
    sm.apply_all(&[
        Apply {
            index: 3,
            cmd: Some(own(2, &all)),
            stamp: None,
        },
        Apply {
            index: 4,
            cmd: Some(put("order-1", "", "x")),
            stamp: None,
        },
    ])
    .unwrap();
    assert!(sm.get(b"order-1", b"").unwrap().is_some());
    // The slot holds data now: it cannot leave, and older map versions are refused.
    let r = sm
        .apply_all(&[
            Apply {
                index: 5,
                cmd: Some(own(3, &other)),
                stamp: None,
            },
            Apply {
                index: 6,
                cmd: Some(own(1, &all)),
                stamp: None,
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
    let cmd = Command::Group(ordo_proto::v1::GroupCommand {
        op: Some(ordo_proto::v1::group_command::Op::Unpark(
            ordo_proto::v1::GroupUnpark {
                group: "billing".into(),
                shard_key: "o".as_bytes().to_vec().into(),
            },
        )),
    });
    assert_eq!(cmd.encoded_len(), cmd.encode().len());
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
    sm.apply_all(&[Apply {
        index: 1,
        cmd: Some(put("order-9", "items/1", "sku-42")),
        stamp: None,
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
        sm.build_snapshot(&dir.path().join("snap"), sm.applied_index(), 1)
            .map(|_| ())
            .unwrap_err(),
    );
    let r = sm.apply_all(&[Apply {
        index: 2,
        cmd: Some(put("order-9", "items/1", "again")),
        stamp: None,
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
    sm.apply_all(&[Apply {
        index: 1,
        cmd: Some(own(1, &others)),
        stamp: None,
    }])
    .unwrap();
    let batch = Command::TxnBatch(vec![
        txn(put("order-1", "", "a")),
        txn(put("order-2", "", "refused")),
        txn(put("order-1", "", "b")),
    ]);
    let r = sm
        .apply_all(&[Apply {
            index: 2,
            cmd: Some(batch),
            stamp: None,
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

/// M2: a page is bounded in bytes as well as items, and always says where to go on: paging
/// through 1 MiB values returns every item once, in order, in pages under the byte bound.
#[test]
fn m2_scan_pages_are_bounded_in_bytes_and_continue_with_next_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let sm = StateMachine::open(&db, 1, 64).unwrap().sm;
    let big = "v".repeat(crate::limits::VALUE_BYTES_MAX);
    let batch: Vec<Apply> = (0..10)
        .map(|i| Apply {
            index: i + 1,
            cmd: Some(put("order-big", &format!("items/{i:02}"), &big)),
            stamp: None,
        })
        .collect();
    sm.apply_all(&batch).unwrap();
    let (mut seen, mut start, mut pages) = (Vec::new(), bytes::Bytes::new(), 0);
    loop {
        let (page, next) = sm.scan(b"order-big", &start, b"", 1000).unwrap();
        pages += 1;
        assert!(!page.is_empty(), "every page holds at least one item");
        let bytes: usize = page.iter().map(|i| i.key.len() + i.value.len()).sum();
        assert!(bytes <= SCAN_PAGE_BYTES_MAX, "page of {bytes} bytes");
        seen.extend(page.into_iter().map(|i| i.key));
        match next {
            Some(k) => start = k,
            None => break,
        }
    }
    let want: Vec<String> = (0..10).map(|i| format!("items/{i:02}")).collect();
    assert_eq!(seen, want.iter().map(|k| k.as_bytes()).collect::<Vec<_>>());
    assert!(
        pages >= 3,
        "10 MiB in pages of at most 4 MiB: {pages} pages"
    );
}
