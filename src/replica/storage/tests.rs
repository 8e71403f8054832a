use super::*;
use proptest::prelude::*;
use raft::Storage;

fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
    Entry {
        index,
        term,
        data: data.to_vec().into(),
        ..Default::default()
    }
}

/// A store whose log starts at 1 (the tests write their own entries from there).
fn open(dir: &Path) -> RaftStore {
    let mut s = RaftStore::open(dir, 1, &[]).unwrap();
    if s.conf_state().voters.is_empty() {
        let cs = ConfState {
            voters: vec![1, 2, 3],
            ..Default::default()
        };
        s.set_conf_state(&cs, 0).unwrap();
    }
    s
}

fn datas(s: &RaftStore, low: u64, high: u64) -> Vec<Vec<u8>> {
    s.entries(low, high, None, GetEntriesContext::empty(false))
        .unwrap()
        .iter()
        .map(|e| e.data.to_vec())
        .collect()
}

fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join(crate::replica::wal::DIR_NAME))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    v
}

#[test]
fn founders_start_after_the_bootstrap_index_and_joiners_start_empty() {
    let dir = tempfile::tempdir().unwrap();
    let founder = dir.path().join("founder");
    let mut s = RaftStore::open(&founder, 1, &[1, 2, 3]).unwrap();
    assert_eq!(s.first_index().unwrap(), BOOTSTRAP_INDEX + 1);
    assert_eq!(s.last_index().unwrap(), BOOTSTRAP_INDEX);
    assert_eq!(s.term(BOOTSTRAP_INDEX).unwrap(), BOOTSTRAP_TERM);
    assert_eq!(s.hard_state().commit, BOOTSTRAP_INDEX);
    assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
    // Entries below the start are compacted, so a leader sends a joiner a snapshot.
    assert!(matches!(
        s.entries(1, 2, None, GetEntriesContext::empty(false)),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    s.sync().unwrap();
    drop(s);
    // Reopening keeps the stored state whatever voters are passed.
    let s = RaftStore::open(&founder, 1, &[7]).unwrap();
    assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
    assert_eq!(s.last_index().unwrap(), BOOTSTRAP_INDEX);
    assert!(!RaftStore::is_empty(&founder).unwrap());

    let joiner = dir.path().join("joiner");
    assert!(RaftStore::is_empty(&joiner).unwrap());
    let s = RaftStore::open(&joiner, 4, &[]).unwrap();
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 0));
    assert!(s.conf_state().voters.is_empty() && s.conf_state().learners.is_empty());
}

#[test]
fn peer_addresses_and_conf_state_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    assert_eq!(s.peer_addrs().unwrap(), None);
    let peers: BTreeMap<u64, String> = [
        (1, "127.0.0.1:7001".to_string()),
        (4, "127.0.0.4:7004".to_string()),
    ]
    .into();
    s.set_peer_addrs(&peers).unwrap();
    let cs = ConfState {
        voters: vec![1, 2, 4],
        ..Default::default()
    };
    s.set_conf_state(&cs, 9).unwrap();
    s.sync().unwrap();
    drop(s);
    let s = RaftStore::open(dir.path(), 1, &[]).unwrap();
    assert_eq!(s.peer_addrs().unwrap(), Some(peers));
    assert_eq!(
        (s.conf_state().voters.clone(), s.conf_index()),
        (vec![1, 2, 4], 9)
    );
}

#[test]
fn a_snapshot_that_does_not_name_the_receiver_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    let mut metadata = SnapshotMetadata::default();
    metadata.mut_conf_state().voters = vec![1, 2, 3];
    s.set_latest_snapshot(SnapshotFile {
        metadata,
        path: dir.path().join("x.snap"),
    });
    assert!(s.snapshot(0, 2).is_ok());
    assert!(!s.take_snapshot_wanted());
    assert!(
        s.snapshot(0, 4).is_err(),
        "node 4 is not in the snapshot's configuration"
    );
    assert!(s.take_snapshot_wanted());
}

#[test]
fn append_truncates_conflicts_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(dir.path());
        s.append(&[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")])
            .unwrap();
        s.append(&[entry(2, 2, b"B")]).unwrap();
        let hs = HardState {
            term: 2,
            commit: 2,
            ..Default::default()
        };
        s.set_hard_state(&hs).unwrap();
        s.sync().unwrap();
        // Not synced: gone with the process.
        s.append(&[entry(3, 2, b"lost")]).unwrap();
    }
    let s = open(dir.path());
    assert_eq!(s.last_index().unwrap(), 2);
    assert_eq!(s.term(2).unwrap(), 2);
    assert_eq!(datas(&s, 1, 3), vec![b"a".to_vec(), b"B".to_vec()]);
    assert_eq!(s.initial_state().unwrap().hard_state.commit, 2);
    assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
}

/// A store with entries `1..=n` (terms from `term`), each synced alone, in segments of 200 bytes.
fn synced_in_small_segments(dir: &Path, n: u64, term: impl Fn(u64) -> u64) -> RaftStore {
    let mut s = open(dir);
    s.wal.set_segment_bytes(200);
    for i in 1..=n {
        s.append(&[entry(i, term(i), &[b'x'; 64])]).unwrap();
        s.sync().unwrap();
    }
    s
}

#[test]
fn compaction_moves_the_first_index_keeps_the_term_and_deletes_whole_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = synced_in_small_segments(dir.path(), 10, |i| 1 + i / 5);
    let before = segment_files(dir.path()).len();
    assert!(before >= 4, "small segments roll: {before}");
    assert_eq!(s.compact(6).unwrap(), 6);
    assert_eq!(s.first_index().unwrap(), 7);
    assert_eq!(s.term(6).unwrap(), 2);
    assert!(matches!(
        s.term(5),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert!(matches!(
        s.entries(5, 8, None, GetEntriesContext::empty(false)),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert_eq!(datas(&s, 7, 11).len(), 4);
    s.sync().unwrap();
    let after = segment_files(dir.path()).len();
    assert!(
        after < before,
        "segments of compacted entries go: {before} -> {after}"
    );
    drop(s);
    let s = open(dir.path());
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (7, 10));
    assert_eq!(s.term(6).unwrap(), 2);
    assert_eq!(datas(&s, 7, 11).len(), 4);
}

#[test]
fn a_snapshot_resets_the_log_and_leaves_one_segment() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = synced_in_small_segments(dir.path(), 6, |_| 1);
    let mut meta = SnapshotMetadata::default();
    (meta.index, meta.term) = (40, 3);
    meta.mut_conf_state().voters = vec![1, 2, 5];
    s.apply_snapshot(&meta).unwrap();
    s.sync().unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1);
    s.append(&[entry(41, 3, b"after")]).unwrap();
    s.sync().unwrap();
    drop(s);
    let s = open(dir.path());
    assert_eq!(
        (s.first_index().unwrap(), s.last_index().unwrap()),
        (41, 41)
    );
    assert_eq!(s.term(40).unwrap(), 3);
    assert_eq!(s.hard_state().commit, 40);
    assert_eq!(
        (s.conf_state().voters.clone(), s.conf_index()),
        (vec![1, 2, 5], 40)
    );
}

/// A flipped bit at the end of the newest segment is a torn write: the open stops before it (the
/// watermark decides whether that lost anything synced). Anywhere in an older segment it is
/// damage: the open refuses, naming the file.
#[test]
fn a_flipped_byte_is_a_torn_tail_in_the_newest_segment_and_refused_in_older_ones() {
    let flip = |path: &Path, back: usize| {
        let mut raw = std::fs::read(path).unwrap();
        let at = raw.len() - back;
        raw[at] ^= 0x01;
        std::fs::write(path, raw).unwrap();
    };
    let write = |dir: &Path, segment_bytes: u64| {
        let mut s = open(dir);
        s.wal.set_segment_bytes(segment_bytes);
        for i in 1..=8 {
            s.append(&[entry(i, 1, format!("order-{i} paid").as_bytes())])
                .unwrap();
            s.sync().unwrap();
        }
    };

    let one = tempfile::tempdir().unwrap();
    write(one.path(), crate::replica::wal::SEGMENT_BYTES);
    let files = segment_files(one.path());
    assert_eq!(files.len(), 1);
    flip(&files[0], 1);
    let s = open(one.path());
    assert_eq!(
        s.last_index().unwrap(),
        7,
        "the torn record is not replayed"
    );
    assert_eq!(datas(&s, 1, 8).len(), 7);

    let many = tempfile::tempdir().unwrap();
    write(many.path(), 120);
    let files = segment_files(many.path());
    assert!(files.len() >= 3);
    flip(&files[0], 1);
    let err = RaftStore::open(many.path(), 1, &[]).err().expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains(&files[0].display().to_string()) && msg.contains("crc32"),
        "{msg}"
    );
}

/// After a torn tail is cut, the log goes on: new entries after the cut survive the next reopen.
#[test]
fn writing_after_a_torn_tail_cuts_it_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    for i in 1..=3 {
        s.append(&[entry(i, 1, b"x")]).unwrap();
        s.sync().unwrap();
    }
    drop(s);
    let newest = segment_files(dir.path()).pop().unwrap();
    let mut raw = std::fs::read(&newest).unwrap();
    raw.extend_from_slice(&[0x55; 7]);
    std::fs::write(&newest, raw).unwrap();
    let mut s = open(dir.path());
    assert_eq!(s.last_index().unwrap(), 3);
    s.append(&[entry(4, 2, b"y")]).unwrap();
    s.sync().unwrap();
    drop(s);
    let s = open(dir.path());
    assert_eq!(s.last_index().unwrap(), 4);
    assert_eq!(s.term(4).unwrap(), 2);
}

#[derive(Clone, Debug)]
enum Op {
    /// Append `n` entries at `at` positions back from the end (0: after the last).
    Append {
        back: u64,
        n: u64,
        term_up: bool,
    },
    Compact {
        keep: u64,
    },
    Commit,
    Snapshot {
        ahead: u64,
    },
    Sync,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3u64, 1..4u64, any::<bool>()).prop_map(|(back, n, term_up)| Op::Append { back, n, term_up }),
        2 => (0..4u64).prop_map(|keep| Op::Compact { keep }),
        2 => Just(Op::Commit),
        1 => (1..5u64).prop_map(|ahead| Op::Snapshot { ahead }),
        4 => Just(Op::Sync),
        2 => Just(Op::Reopen),
    ]
}

/// What the log must hold: `(compacted index, compacted term, entries as (index, term, data))`.
type Model = (u64, u64, Vec<(u64, u64, Vec<u8>)>, u64);

fn model_of(s: &RaftStore) -> Model {
    let first = s.first_index().unwrap();
    let last = s.last_index().unwrap();
    let entries = s
        .entries(first, last + 1, None, GetEntriesContext::empty(false))
        .map(|es| {
            es.into_iter()
                .map(|e| (e.index, e.term, e.data.to_vec()))
                .collect()
        })
        .unwrap_or_default();
    (
        first - 1,
        s.term(first - 1).unwrap(),
        entries,
        s.hard_state().commit,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Any sequence of appends (with conflicts), compactions, snapshots and syncs, with reopens
    /// in between, reopens to exactly what was synced last, with tiny segments so that rolls and
    /// deletions happen all the time.
    #[test]
    fn a_reopen_yields_exactly_what_was_synced(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        s.wal.set_segment_bytes(256);
        let mut synced = model_of(&s);
        let mut term = 1;
        let mut seq = 0u32;
        for op in ops {
            match op {
                Op::Append { back, n, term_up } => {
                    let first = s.first_index().unwrap();
                    let last = s.last_index().unwrap();
                    let at = (last + 1).saturating_sub(back).max(first);
                    if term_up { term += 1; }
                    let es: Vec<_> = (at..at + n).map(|i| {
                        seq += 1;
                        entry(i, term, format!("e{seq}").as_bytes())
                    }).collect();
                    s.append(&es).unwrap();
                }
                Op::Compact { keep } => {
                    let last = s.last_index().unwrap();
                    s.compact(last.saturating_sub(keep)).unwrap();
                }
                Op::Commit => {
                    let last = s.last_index().unwrap();
                    s.set_commit(last).unwrap();
                }
                Op::Snapshot { ahead } => {
                    let mut meta = SnapshotMetadata::default();
                    term += 1;
                    (meta.index, meta.term) = (s.last_index().unwrap() + ahead, term);
                    meta.mut_conf_state().voters = vec![1, 2, 3];
                    s.apply_snapshot(&meta).unwrap();
                    // Durable at once (and with it everything recorded before).
                    synced = model_of(&s);
                }
                Op::Sync => {
                    s.sync().unwrap();
                    synced = model_of(&s);
                }
                Op::Reopen => {
                    drop(s);
                    s = open(dir.path());
                    s.wal.set_segment_bytes(256);
                    prop_assert_eq!(&model_of(&s), &synced);
                }
            }
        }
        s.sync().unwrap();
        let expected = model_of(&s);
        drop(s);
        let s = open(dir.path());
        prop_assert_eq!(model_of(&s), expected);
    }
}
