//! One driver, not running, its methods called directly: what happens to waiters whose index is
//! reused (audit M6), to a committed entry that does not decode (audit M7), and in what order one
//! loop iteration takes peer messages and proposals (audit M10).

use std::collections::BTreeMap;
use std::sync::Arc;

use raft::prelude::{Entry, Message};
use tokio::sync::{mpsc, oneshot, watch};

use super::{Driver, Waiting};
use crate::error::{Error, Result};
use crate::limits::{DRIVER_BATCH_MAX, DRIVER_INBOX_MAX};
use crate::node::{new_driver, recover, NodeConfig};
use crate::replica::inbox::{InboxBytes, Msg, RaftQueue, Shared};
use crate::replica::outbox::Outbox;
use crate::server::validate::put_as_txn;
use crate::state::{Command, Outcome};

/// A single-replica group sends nothing anywhere.
struct NoOutbox;

impl Outbox for NoOutbox {
    fn send(&self, _: Message) {}
    fn send_snapshot(&self, _: Message, _: std::path::PathBuf) {}
    fn add_peer(&mut self, _: u64, _: &str) {}
    fn remove_peer(&mut self, _: u64) {}
    fn addr_of(&self, _: u64) -> Option<String> {
        None
    }
    fn addrs(&self) -> BTreeMap<u64, String> {
        BTreeMap::new()
    }
}

/// A driver, its shared state, and what keeps it running (its queues' senders, its stop switch).
struct Parts {
    driver: Driver,
    shared: Arc<Shared>,
    sm: Arc<crate::state::StateMachine>,
    inbox: mpsc::Sender<Msg>,
    raft: RaftQueue,
    _stop: watch::Sender<bool>,
}

fn driver(dir: &std::path::Path) -> (Driver, watch::Sender<bool>) {
    let p = parts(dir);
    (p.driver, p._stop)
}

fn config(dir: &std::path::Path) -> NodeConfig {
    NodeConfig {
        id: 1,
        group: 1,
        listen: String::new(),
        peers: [(1, "mem-1".to_string())].into(),
        join: false,
        data_dir: dir.to_path_buf(),
        compact_log_entries: 1000,
        dedup_window_secs: crate::limits::DEDUP_WINDOW_SECS_DEFAULT,
        slot_count: crate::limits::SLOT_COUNT_DEFAULT,
        config_server: false,
        copy_bytes_per_sec: 0,
        link_filter: None,
        serve: Default::default(),
        feed: Default::default(),
        cache_bytes: crate::limits::CACHE_BYTES_MIN,
    }
}

fn parts(dir: &std::path::Path) -> Parts {
    let cfg = config(dir);
    let rec = recover(&cfg).unwrap();
    let sm = rec.sm.clone();
    let (tx, rx) = mpsc::channel(DRIVER_INBOX_MAX);
    let (raft, raft_rx) = RaftQueue::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared::default());
    let driver = new_driver(
        &cfg,
        rec,
        Box::new(NoOutbox),
        rx,
        raft_rx,
        shared.clone(),
        stop_rx,
    )
    .unwrap();
    Parts {
        driver,
        shared,
        sm,
        inbox: tx,
        raft,
        _stop: stop_tx,
    }
}

fn put(key: &str) -> Command {
    Command::Txn(
        put_as_txn(ordo_proto::v1::PutRequest {
            shard_key: key.as_bytes().to_vec().into(),
            key: Default::default(),
            value: b"v".to_vec().into(),
            ..Default::default()
        })
        .unwrap(),
    )
}

fn waiter() -> (Waiting, oneshot::Receiver<Result<Outcome>>) {
    let (tx, rx) = oneshot::channel();
    (Waiting::One(tx), rx)
}

/// M6: a proposal tracked at an index that a later proposal reuses is answered "not applied"
/// (it was replaced in the log), and only the live proposal is still counted.
#[test]
fn m6_a_replaced_proposal_is_answered_not_applied_and_uncounted() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, _stop) = driver(dir.path());
    let (old, mut old_rx) = waiter();
    let (new, mut new_rx) = waiter();
    d.waiting_txns = 2;
    d.track(7, 2, old);
    d.track(7, 3, new);
    match old_rx.try_recv() {
        Ok(Err(Error::NotApplied(why))) => assert!(why.contains("NOT applied"), "{why}"),
        other => panic!("the replaced proposal must hear NotApplied, got {other:?}"),
    }
    assert!(new_rx.try_recv().is_err(), "the live proposal still waits");
    assert_eq!(d.waiting_txns, 1, "only the live proposal is counted");
    assert_eq!(d.proposals.len(), 1);
    assert_eq!(
        d.proposals[&7].0, 3,
        "the index belongs to the newer proposal"
    );
}

/// M7: a committed entry that does not decode stops the replica with a corruption error; what
/// came before it in the same Ready is applied, it and what follows are not.
#[test]
fn m7_a_committed_entry_that_does_not_decode_stops_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, _stop) = driver(dir.path());
    let base = d.sm.applied_index();
    let entry = |index: u64, data: Vec<u8>| Entry {
        index,
        term: 1,
        data: data.into(),
        ..Default::default()
    };
    let entries = vec![
        entry(base + 1, put("before").encode()),
        // A command tag no version of Ordo knows.
        entry(base + 2, vec![0xEE, 1, 2, 3]),
        entry(base + 3, put("after").encode()),
    ];
    match d.apply(entries) {
        Err(Error::Corruption(why)) => {
            assert!(why.contains(&format!("entry {}", base + 2)), "{why}")
        }
        other => panic!("the undecodable entry must stop the replica, got {other:?}"),
    }
    assert_eq!(
        d.sm.applied_index(),
        base + 1,
        "the entry before it is applied, it is not skipped as a no-op"
    );
    assert!(d.sm.get(b"before", b"").unwrap().is_some());
    assert!(d.sm.get(b"after", b"").unwrap().is_none());
}

/// H4: a replica whose sync fails stops on its own and publishes why; from then on it refuses
/// every request, STALE reads included, with UNAVAILABLE naming that failure.
#[tokio::test]
async fn h4_a_failed_replica_refuses_everything_with_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = parts(dir.path());
    // The single voter elects itself, and the sync of its new term fails.
    p.driver.raw.mut_store().fail_syncs_after(0);
    tokio::time::timeout(std::time::Duration::from_secs(15), p.driver.run())
        .await
        .expect("the driver stops on its own after the failed sync");
    let why = p.shared.stopped().expect("the failure is published");
    assert!(why.contains("injected"), "{why}");
    assert_eq!(
        p.shared
            .is_leader
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "a stopped replica does not claim to lead"
    );
    match p.shared.check_running() {
        Err(Error::Unavailable(msg)) => {
            assert!(msg.contains("stopped") && msg.contains("injected"), "{msg}")
        }
        other => panic!("a stopped replica must refuse with UNAVAILABLE, got {other:?}"),
    }
    // A STALE read through the Kv service, which needs no driver, is refused too.
    let handle = crate::replica::ReplicaHandle {
        node_id: 1,
        group_id: 1,
        driver: p.inbox.clone(),
        inbox_bytes: Default::default(),
        raft: p.raft.clone(),
        sm: p.sm.clone(),
        shared: p.shared.clone(),
        peers: Default::default(),
        snap_dir: dir.path().join("snap"),
        receiving_snapshot: Default::default(),
        membership: Default::default(),
        feed_readers: Default::default(),
        groups: Default::default(),
        stop: p._stop.subscribe(),
    };
    let kv = crate::server::kv::KvService(Arc::new(handle));
    let stale = ordo_proto::v1::GetRequest {
        shard_key: b"k".to_vec().into(),
        consistency: ordo_proto::v1::Consistency::Stale as i32,
        ..Default::default()
    };
    use ordo_proto::v1::kv_server::Kv as _;
    let status = kv
        .get(tonic::Request::new(stale))
        .await
        .expect_err("a STALE read of a stopped replica is refused");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("injected"), "{status:?}");
}

/// Proposes `writes` puts of `value_bytes` each and waits for every one to be applied.
async fn propose_puts(inbox: &mpsc::Sender<Msg>, writes: usize, value_bytes: usize) {
    for i in 0..writes {
        let cmd = Command::Txn(
            put_as_txn(ordo_proto::v1::PutRequest {
                shard_key: format!("order-{i}").into_bytes().into(),
                key: Default::default(),
                value: vec![b'x'; value_bytes].into(),
                ..Default::default()
            })
            .unwrap(),
        );
        // The single voter may not have elected itself yet: retry until it takes the write.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let (resp, rx) = oneshot::channel();
            let queued = InboxBytes::new().take(&cmd).unwrap();
            inbox
                .send(Msg::Propose {
                    cmd: cmd.clone(),
                    resp,
                    queued,
                })
                .await
                .unwrap();
            match rx.await.unwrap() {
                Ok(_) => break,
                Err(Error::NotLeader { .. }) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                Err(e) => panic!("put {i}: {e}"),
            }
        }
    }
}

/// Runs a single-voter driver over `dir` until `writes` puts of `value_bytes` each are applied,
/// then stops it and drops everything that keeps its sled open.
async fn write_and_stop(dir: &std::path::Path, writes: usize, value_bytes: usize) {
    let r = Running::start(parts(dir));
    propose_puts(&r.inbox, writes, value_bytes).await;
    r.stop().await;
}

/// A driver running on a task of its own, and what keeps it running.
struct Running {
    task: tokio::task::JoinHandle<()>,
    sm: Arc<crate::state::StateMachine>,
    inbox: mpsc::Sender<Msg>,
    stop: watch::Sender<bool>,
    /// Its raft queue's sender: the driver stops when every sender is gone.
    _raft: RaftQueue,
}

impl Running {
    fn start(p: Parts) -> Running {
        let mut driver = p.driver;
        Running {
            task: tokio::spawn(async move { driver.run().await }),
            sm: p.sm,
            inbox: p.inbox,
            stop: p._stop,
            _raft: p.raft,
        }
    }

    /// Stops the driver and drops everything that keeps its sled open; returns its state
    /// machine (still readable).
    async fn stop(self) -> Arc<crate::state::StateMachine> {
        let _ = self.stop.send(true);
        self.task.await.unwrap();
        drop(self.inbox);
        self.sm
    }
}

/// H4 for the state machine: sled is synced in the background, and a failed sync there stops
/// the replica just as a failed raft log sync does.
#[tokio::test]
async fn h4_a_failed_background_flush_of_sled_stops_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = parts(dir.path());
    p.driver.flusher.fail_syncs_after(0);
    p.driver.flusher.request();
    tokio::time::timeout(std::time::Duration::from_secs(15), p.driver.run())
        .await
        .expect("the driver stops on its own after the failed flush");
    let why = p.shared.stopped().expect("the failure is published");
    assert!(why.contains("injected"), "{why}");
}

/// H5 (protocol-aware recovery): a byte flipped in the middle of the raft log's newest segment
/// makes everything after it unreadable, and the open takes it for a torn tail: without the
/// watermark the replica would come back with a shorter log and an older commit than it had
/// synced and acknowledged. With it the node refuses to start, naming what the log has and what
/// it had synced.
#[tokio::test]
async fn h5_a_corrupt_log_segment_makes_the_node_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    write_and_stop(dir.path(), 400, 4096).await;
    let wal = dir.path().join(crate::replica::wal::DIR_NAME);
    let newest = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .max()
        .unwrap();
    let mut log = std::fs::read(&newest).unwrap();
    assert!(
        log.len() > 400 * 4096,
        "the 400 writes are in the newest segment"
    );
    let middle = log.len() / 2;
    log[middle] ^= 0x40;
    std::fs::write(&newest, &log).unwrap();

    let err = match recover(&config(dir.path())) {
        Ok(rec) => panic!(
            "the node opened a torn log (last index {}, commit {})",
            rec.store.last_index_now(),
            rec.store.hard_state().commit
        ),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("corruption") && err.contains("behind the watermark"),
        "the refusal says why: {err}"
    );
}

/// Issue 15: sled is not synced per write, so a crash loses its newest applies; the restart
/// replays them from the raft log and the state machine comes back exactly (same digest). The
/// crash is a copy of the data dir taken while the replica runs with its background flush held,
/// which is what a kill -9 leaves on disk.
#[tokio::test]
async fn after_a_crash_the_state_machine_is_rebuilt_from_the_raft_log_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let crash = tempfile::tempdir().unwrap();
    let p = parts(dir.path());
    p.driver.flusher.hold(true);
    let r = Running::start(p);
    propose_puts(&r.inbox, 200, 100).await;
    let applied = r.sm.applied_index();
    copy_dir(dir.path(), crash.path());
    let expected = r.stop().await.digest().unwrap();

    let p = parts(crash.path());
    let at_open = p.sm.applied_index();
    assert!(
        at_open < applied,
        "the crash image's sled lacks applies ({at_open} of {applied}): nothing to replay"
    );
    let r = Running::start(p);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while r.sm.applied_index() < applied {
        assert!(
            std::time::Instant::now() < deadline,
            "the replay got to {} of {applied} in 15 s",
            r.sm.applied_index()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        r.sm.digest().unwrap(),
        expected,
        "replayed from {at_open} to {applied}"
    );
    r.stop().await;
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// M10: heartbeats that arrive after two inbox batches of proposals are stepped before any of
/// them: the proposals taken in the same loop iteration already see the leader the last one
/// names, and the second batch is still queued. With one FIFO inbox the heartbeats would wait
/// behind both batches (each followed by an fsync), long enough under load for a follower to
/// time out and call an election.
#[tokio::test]
async fn m10_a_peer_message_is_handled_before_queued_proposals() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = parts(dir.path());
    let mut answers = Vec::new();
    let inbox_bytes = InboxBytes::new();
    for i in 0..2 * DRIVER_BATCH_MAX {
        let (resp, rx) = oneshot::channel();
        let cmd = put(&format!("k{i}"));
        let queued = inbox_bytes.take(&cmd).unwrap();
        p.inbox
            .try_send(Msg::Propose { cmd, resp, queued })
            .ok()
            .unwrap();
        answers.push(rx);
    }
    // Two, so that both ways in are covered: the one the loop wakes for and the ones it drains.
    let term = p.driver.raw.raft.term;
    for (from, term) in [(2, term + 5), (3, term + 6)] {
        let mut heartbeat = Message::default();
        heartbeat.set_msg_type(raft::prelude::MessageType::MsgHeartbeat);
        (heartbeat.from, heartbeat.to, heartbeat.term) = (from, 1, term);
        assert!(p.raft.offer(heartbeat, 16), "an empty raft queue takes it");
    }

    let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
    p.driver.next_batch(&mut tick).await.expect("not stopping");

    assert_eq!(
        (p.driver.raw.raft.leader_id, p.driver.raw.raft.term),
        (3, term + 6),
        "both heartbeats were stepped"
    );
    for (i, rx) in answers.iter_mut().enumerate() {
        match rx.try_recv() {
            Ok(Err(Error::NotLeader { leader_id, .. })) if i < DRIVER_BATCH_MAX => {
                assert_eq!(
                    leader_id, 3,
                    "proposal {i} was handled before the heartbeats"
                )
            }
            Err(oneshot::error::TryRecvError::Empty) if i >= DRIVER_BATCH_MAX => {}
            other => panic!("proposal {i}: {other:?}"),
        }
    }
}
