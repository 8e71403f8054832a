use super::*;

fn replay(dir: &Path) -> (Wal, Vec<(Kind, Vec<u8>)>) {
    let mut seen = Vec::new();
    let wal = Wal::open(dir, |kind, raw| {
        seen.push((kind, raw.to_vec()));
        Ok(0)
    })
    .unwrap();
    (wal, seen)
}

#[test]
fn records_come_back_in_order_across_segments_with_each_head() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, seen) = replay(dir.path());
    assert!(seen.is_empty() && !exists(dir.path()).unwrap());
    wal.set_segment_bytes(64);
    wal.roll(&[(Kind::HardState, b"h0".to_vec())]).unwrap();
    let mut expected = vec![(Kind::HardState, b"h0".to_vec())];
    for i in 0..10u8 {
        wal.push(Kind::PeerAddrs, &[i; 20], u64::from(i) + 1);
        expected.push((Kind::PeerAddrs, vec![i; 20]));
        wal.sync().unwrap();
        if wal.wants_roll() {
            wal.roll(&[(Kind::HardState, vec![b'h', i])]).unwrap();
            expected.push((Kind::HardState, vec![b'h', i]));
        }
    }
    wal.sync().unwrap();
    assert!(wal.segments() > 3);
    drop(wal);
    let (_, seen) = replay(dir.path());
    assert_eq!(seen, expected);
}

/// The crc covers the segment's seq: a segment's bytes under another name are not its records.
#[test]
fn a_segment_copied_under_another_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, _) = replay(dir.path());
    wal.set_segment_bytes(32);
    wal.roll(&[]).unwrap();
    wal.push(Kind::PeerAddrs, &[1; 40], 1);
    wal.sync().unwrap();
    wal.roll(&[]).unwrap();
    wal.push(Kind::PeerAddrs, &[2; 40], 2);
    wal.sync().unwrap();
    drop(wal);
    let files = list(&dir.path().join(DIR_NAME)).unwrap();
    assert_eq!(files.len(), 2);
    std::fs::copy(&files[1].1, &files[0].1).unwrap();
    let err = Wal::open(dir.path(), |_, _| Ok(0)).err().expect("refused");
    assert!(err.to_string().contains("header"), "{err}");
}

/// H4 for the raft log: once a sync failed, nothing is written again and every later sync fails.
#[test]
fn a_failed_sync_is_final() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, _) = replay(dir.path());
    wal.roll(&[]).unwrap();
    wal.fail_syncs_after(1);
    wal.push(Kind::PeerAddrs, b"a", 0);
    wal.sync().unwrap();
    wal.push(Kind::PeerAddrs, b"b", 0);
    let first = wal.sync().unwrap_err().to_string();
    assert!(first.contains("injected"), "{first}");
    wal.failpoint = FailPoint::default();
    let again = wal.sync().unwrap_err().to_string();
    assert!(again.contains("earlier raft log write failed"), "{again}");
    assert!(wal.roll(&[]).is_err());
}
