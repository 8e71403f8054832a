//! The driver without sockets: three drivers of one group over an in-memory `Outbox` network
//! (raft-rs `harness/src/network.rs` in spirit), real sled storage in temporary directories.
//! Links can be cut per node; a cut node neither sends nor receives.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ordo_proto::v1::{PutRequest, StatusResponse};
use raft::prelude::{Message, MessageType};
use tokio::sync::{mpsc, oneshot, watch};

use super::snapshots::Gate;
use crate::error::Result;
use crate::limits::{DRIVER_INBOX_MAX, ELECTION_TICKS, TICK_MS};
use crate::node::{new_driver, recover, NodeConfig};
use crate::replica::inbox::{InboxBytes, Msg, RaftQueue, Shared};
use crate::replica::outbox::Outbox;
use crate::server::validate::put_as_txn;
use crate::state::{Command, Outcome, StateMachine};

/// How long anything in these tests may take before the test fails: several elections.
const WAIT: Duration = Duration::from_secs(15);

/// The in-memory network: each node's inbox, the nodes cut off, and each node's snapshot dir.
#[derive(Default)]
struct MemNet {
    inboxes: Mutex<BTreeMap<u64, mpsc::Sender<Msg>>>,
    raft_queues: Mutex<BTreeMap<u64, RaftQueue>>,
    cut: Mutex<BTreeSet<u64>>,
    snap_dirs: Mutex<BTreeMap<u64, PathBuf>>,
}

impl MemNet {
    fn link_up(&self, from: u64, to: u64) -> bool {
        let cut = self.cut.lock().unwrap();
        !cut.contains(&from) && !cut.contains(&to)
    }

    fn deliver(&self, to: u64, msg: Msg) {
        if let Some(tx) = self.inboxes.lock().unwrap().get(&to) {
            // A full inbox drops, as the real transport's full queue does.
            let _ = tx.try_send(msg);
        }
    }
}

struct MemOutbox {
    id: u64,
    net: Arc<MemNet>,
    addrs: BTreeMap<u64, String>,
}

impl Outbox for MemOutbox {
    fn send(&self, m: Message) {
        if self.net.link_up(self.id, m.to) {
            if let Some(q) = self.net.raft_queues.lock().unwrap().get(&m.to) {
                // A full queue drops, as the real one does.
                let size = protobuf::Message::compute_size(&m) as usize;
                q.offer(m, size);
            }
        }
    }

    /// Copies the file into the receiver's snapshot dir (the sender may replace its own), then
    /// tells both sides, as a finished stream would.
    fn send_snapshot(&self, m: Message, path: PathBuf) {
        let to = m.to;
        let ok = self.net.link_up(self.id, to);
        if ok {
            let dir = self.net.snap_dirs.lock().unwrap()[&to].clone();
            let meta = m.get_snapshot().get_metadata();
            let copy = dir.join(format!("in-{:020}-{:020}.snap", meta.index, meta.term));
            std::fs::copy(&path, &copy).expect("copy snapshot");
            self.net.deliver(
                to,
                Msg::SnapshotReceived {
                    msg: Box::new(m),
                    path: copy,
                },
            );
        }
        self.net.deliver(self.id, Msg::SnapshotSent { to, ok });
    }

    fn add_peer(&mut self, id: u64, addr: &str) {
        self.addrs.insert(id, addr.to_string());
    }

    fn remove_peer(&mut self, id: u64) {
        self.addrs.remove(&id);
    }

    fn addr_of(&self, id: u64) -> Option<String> {
        self.addrs.get(&id).cloned()
    }

    fn addrs(&self) -> BTreeMap<u64, String> {
        self.addrs.clone()
    }
}

struct Member {
    inbox: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    sm: Arc<StateMachine>,
    _stop: watch::Sender<bool>,
}

struct Group {
    net: Arc<MemNet>,
    members: BTreeMap<u64, Member>,
    _dir: tempfile::TempDir,
}

fn node_config(
    id: u64,
    peers: &BTreeMap<u64, String>,
    dir: &std::path::Path,
    compact_log_entries: u64,
) -> NodeConfig {
    NodeConfig {
        id,
        group: 1,
        listen: String::new(),
        peers: peers.clone(),
        join: false,
        data_dir: dir.join(format!("n{id}")),
        compact_log_entries,
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

impl Group {
    /// Three founding replicas; each driver runs as a task of the test's runtime.
    fn start(compact_log_entries: u64) -> Group {
        Self::start_gated(compact_log_entries, None)
    }

    /// [`Group::start`], each replica's snapshot builder waiting for `gate` before it writes.
    fn start_gated(compact_log_entries: u64, gate: Option<Arc<Gate>>) -> Group {
        let dir = tempfile::tempdir().unwrap();
        let net = Arc::new(MemNet::default());
        let peers: BTreeMap<u64, String> = (1..=3).map(|id| (id, format!("mem-{id}"))).collect();
        let mut members = BTreeMap::new();
        for id in 1..=3 {
            let cfg = node_config(id, &peers, dir.path(), compact_log_entries);
            let rec = recover(&cfg).unwrap();
            let sm = rec.sm.clone();
            net.snap_dirs
                .lock()
                .unwrap()
                .insert(id, rec.snap_dir.clone());
            let (tx, rx) = mpsc::channel(DRIVER_INBOX_MAX);
            net.inboxes.lock().unwrap().insert(id, tx.clone());
            let (raft, raft_rx) = RaftQueue::new();
            net.raft_queues.lock().unwrap().insert(id, raft);
            let (stop_tx, stop_rx) = watch::channel(false);
            let shared = Arc::new(Shared::default());
            let outbox = MemOutbox {
                id,
                net: net.clone(),
                addrs: peers.clone(),
            };
            let mut driver = new_driver(
                &cfg,
                rec,
                Box::new(outbox),
                rx,
                raft_rx,
                shared.clone(),
                stop_rx,
            )
            .unwrap();
            driver.snapshot_build.gate = gate.clone();
            tokio::spawn(async move { driver.run().await });
            let member = Member {
                inbox: tx,
                shared,
                sm,
                _stop: stop_tx,
            };
            members.insert(id, member);
        }
        Group {
            net,
            members,
            _dir: dir,
        }
    }

    /// The leader among the nodes not cut off, once there is exactly one.
    async fn wait_leader(&self) -> u64 {
        let started = Instant::now();
        loop {
            let cut = self.net.cut.lock().unwrap().clone();
            let leaders: Vec<u64> = self
                .members
                .iter()
                .filter(|(id, m)| {
                    !cut.contains(id) && m.shared.is_leader.load(Ordering::Relaxed) == 1
                })
                .map(|(id, _)| *id)
                .collect();
            if let [leader] = leaders[..] {
                return leader;
            }
            assert!(
                started.elapsed() < WAIT,
                "no single leader within {WAIT:?}: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn put(&self, node: u64, key: &str, value: &str) -> Result<Outcome> {
        let txn = put_as_txn(PutRequest {
            shard_key: bytes::Bytes::from_static(b"order-1"),
            key: bytes::Bytes::copy_from_slice(key.as_bytes()),
            value: bytes::Bytes::copy_from_slice(value.as_bytes()),
            ..Default::default()
        })
        .unwrap();
        let (resp, rx) = oneshot::channel();
        let cmd = Command::Txn(txn);
        let queued = InboxBytes::new().take(&cmd).unwrap();
        self.members[&node]
            .inbox
            .send(Msg::Propose { cmd, resp, queued })
            .await
            .unwrap();
        rx.await.expect("the driver answers every proposal")
    }

    async fn status(&self, node: u64) -> StatusResponse {
        let (resp, rx) = oneshot::channel();
        let msg = Msg::Status {
            with_digest: true,
            resp,
        };
        self.members[&node].inbox.send(msg).await.unwrap();
        rx.await.unwrap().unwrap()
    }

    /// [`Group::status`], failing the test if the driver does not answer within `WAIT`.
    async fn status_within(&self, node: u64) -> StatusResponse {
        tokio::time::timeout(WAIT, self.status(node))
            .await
            .unwrap_or_else(|_| panic!("node {node}'s driver did not answer within {WAIT:?}"))
    }

    /// Waits until every replica has applied the same items (same digest).
    async fn wait_converged(&self) -> StatusResponse {
        let started = Instant::now();
        loop {
            let mut all = Vec::new();
            for id in self.members.keys() {
                all.push(self.status(*id).await);
            }
            let same = all
                .windows(2)
                .all(|w| (w[0].items, w[0].data_digest) == (w[1].items, w[1].data_digest));
            if same {
                return all.swap_remove(0);
            }
            assert!(
                started.elapsed() < WAIT,
                "replicas did not converge: {all:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn version_of(outcome: Outcome) -> u64 {
    match outcome {
        Outcome::Txn(t) => crate::server::validate::put_response(t).version,
        other => panic!("a put produced {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_drivers_elect_one_leader_and_apply_the_same_writes() {
    let g = Group::start(10_000);
    let leader = g.wait_leader().await;
    for i in 1..=20u64 {
        let out = g.put(leader, "status", &format!("v{i}")).await.unwrap();
        assert_eq!(
            version_of(out),
            i,
            "each put of one item raises its version by one"
        );
    }
    let st = g.wait_converged().await;
    assert_eq!(st.items, 1);
    for m in g.members.values() {
        let (version, value) = m.sm.get(b"order-1", b"status").unwrap().unwrap();
        assert_eq!((version, value.as_ref()), (20, &b"v20"[..]));
    }
    let follower = *g.members.keys().find(|id| **id != leader).unwrap();
    let refused = g.put(follower, "status", "x").await.unwrap_err();
    assert!(
        matches!(refused, crate::error::Error::NotLeader { leader_id, .. } if leader_id == leader),
        "a follower refuses writes and names the leader: {refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leader_is_replaced_and_catches_up_when_healed() {
    let g = Group::start(10_000);
    let old = g.wait_leader().await;
    g.put(old, "a", "1").await.unwrap();
    g.net.cut.lock().unwrap().insert(old);
    let new = g.wait_leader().await;
    assert_ne!(new, old);
    g.put(new, "b", "2").await.unwrap();
    g.net.cut.lock().unwrap().clear();
    let st = g.wait_converged().await;
    assert_eq!(st.items, 2, "both writes, on every replica");
    assert!(g.members[&old].sm.get(b"order-1", b"b").unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_compacted_log_catches_up_from_a_snapshot() {
    let g = Group::start(16);
    let leader = g.wait_leader().await;
    let lagging = *g.members.keys().find(|id| **id != leader).unwrap();
    g.net.cut.lock().unwrap().insert(lagging);
    for i in 0..200 {
        g.put(leader, &format!("k{i}"), "v").await.unwrap();
    }
    let first_index = g.status(leader).await.first_index;
    assert!(
        first_index > 2,
        "the leader compacted its log (first index {first_index})"
    );
    g.net.cut.lock().unwrap().clear();
    let st = g.wait_converged().await;
    assert_eq!(st.items, 200);
    assert!(
        g.status(lagging).await.snapshots_installed >= 1,
        "the lagging follower caught up from a snapshot"
    );
    // It keeps the snapshot it installed (to serve others) and nothing else.
    let dir = g.net.snap_dirs.lock().unwrap()[&lagging].clone();
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(files.len(), 1, "{files:?}");
}

/// Waits until `probe` holds, failing the test after `WAIT`.
async fn wait_until(what: &str, mut probe: impl FnMut() -> bool) {
    let started = Instant::now();
    while !probe() {
        assert!(started.elapsed() < WAIT, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h3_failed_snapshot_build_keeps_the_leader_serving() {
    let g = Group::start(16);
    let leader = g.wait_leader().await;
    let lagging = *g.members.keys().find(|id| **id != leader).unwrap();
    // The leader cannot write any snapshot: its snapshot dir is a regular file.
    let snap_dir = g.net.snap_dirs.lock().unwrap()[&leader].clone();
    std::fs::remove_dir_all(&snap_dir).unwrap();
    std::fs::write(&snap_dir, b"not a directory").unwrap();

    g.net.cut.lock().unwrap().insert(lagging);
    for i in 0..200 {
        g.put(leader, &format!("k{i}"), "v").await.unwrap();
    }
    g.net.cut.lock().unwrap().clear();
    let failures = &g.members[&leader].shared.snapshot_build_failures;
    wait_until(
        "the leader tried to build a snapshot for the lagging follower",
        || failures.load(Ordering::Relaxed) >= 1,
    )
    .await;
    for i in 0..20 {
        g.put(leader, &format!("after-{i}"), "v")
            .await
            .expect("a leader whose snapshot build failed keeps accepting writes");
    }
    wait_until("the build is retried while it keeps failing", || {
        failures.load(Ordering::Relaxed) >= 2
    })
    .await;
    assert_eq!(g.wait_leader().await, leader, "it kept its leadership too");

    // The dir is usable again: the next retry builds it and the follower catches up.
    std::fs::remove_file(&snap_dir).unwrap();
    std::fs::create_dir(&snap_dir).unwrap();
    let st = g.wait_converged().await;
    assert_eq!(st.items, 220);
    assert!(
        g.status(lagging).await.snapshots_installed >= 1,
        "the lagging follower caught up from a snapshot"
    );
}

/// H3: a snapshot is built on a thread of its own. While a build takes long (held here by a
/// gate), the leader keeps its leadership (it goes on sending heartbeats: no election over several
/// election timeouts) and keeps replicating: a write proposed meanwhile commits on a quorum, and
/// is applied and answered once the build ends; the lagging follower then catches up from the
/// snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h3_a_long_snapshot_build_does_not_stop_the_leader() {
    let gate = Arc::new(Gate::default());
    let g = Group::start_gated(16, Some(gate.clone()));
    let leader = g.wait_leader().await;
    let lagging = *g.members.keys().find(|id| **id != leader).unwrap();
    g.net.cut.lock().unwrap().insert(lagging);
    for i in 0..200 {
        g.put(leader, &format!("k{i}"), "v").await.unwrap();
    }
    let term = g.status(leader).await.term;
    gate.close();
    g.net.cut.lock().unwrap().clear();
    // The lagging follower needs a snapshot: the leader starts building one, which waits at the
    // gate. Until then a write could commit and apply before any build holds it back.
    wait_until("a snapshot build waits at the gate", || {
        gate.holds_a_build()
    })
    .await;

    // A write while the build waits at the gate: it commits, and stays unapplied.
    let txn = put_as_txn(PutRequest {
        shard_key: bytes::Bytes::from_static(b"order-1"),
        key: bytes::Bytes::from_static(b"during-build"),
        value: bytes::Bytes::from_static(b"v"),
        ..Default::default()
    })
    .unwrap();
    let (resp, mut answered) = oneshot::channel();
    let cmd = Command::Txn(txn);
    let queued = InboxBytes::new().take(&cmd).unwrap();
    g.members[&leader]
        .inbox
        .send(Msg::Propose { cmd, resp, queued })
        .await
        .unwrap();
    let started = Instant::now();
    let held_at = loop {
        let s = g.status_within(leader).await;
        if s.commit_index > s.applied_index {
            break s.applied_index;
        }
        if let Ok(early) = answered.try_recv() {
            panic!("the write was answered before any build held it back: {early:?}");
        }
        assert!(
            started.elapsed() < WAIT,
            "the leader never held a committed entry back for a build: {s:?}, follower {:?}",
            g.status_within(lagging).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Three election timeouts at the longest: an idle driver would have lost its leadership.
    let window = Instant::now();
    while window.elapsed() < Duration::from_millis(3 * 2 * ELECTION_TICKS as u64 * TICK_MS) {
        for id in g.members.keys() {
            let s = g.status_within(*id).await;
            assert_eq!(
                (s.term, s.leader_id),
                (term, leader),
                "node {id} saw an election during the build"
            );
        }
        let s = g.status_within(leader).await;
        assert_eq!(
            s.applied_index, held_at,
            "nothing is applied during the build"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        answered.try_recv().is_err(),
        "the write is answered only once applied"
    );

    gate.open();
    let out = tokio::time::timeout(WAIT, answered)
        .await
        .expect("the write is answered once the build ends")
        .unwrap()
        .expect("and it succeeded");
    assert_eq!(version_of(out), 1);
    let st = g.wait_converged().await;
    assert_eq!(st.items, 201);
    assert!(
        g.status(lagging).await.snapshots_installed >= 1,
        "the lagging follower caught up from the snapshot"
    );
}

#[test]
fn m5_leftover_snapshot_files_are_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let peers: BTreeMap<u64, String> = BTreeMap::from([(1, "mem-1".to_string())]);
    let cfg = node_config(1, &peers, dir.path(), 10_000);
    let snap_dir = cfg.data_dir.join("snap");
    std::fs::create_dir_all(&snap_dir).unwrap();
    let leftovers = [
        "incoming.snap.tmp",
        "in-00000000000000000042-00000000000000000003.snap",
        "00000000000000000040-00000000000000000003.snap",
        "00000000000000000041-00000000000000000003.snap.tmp",
    ];
    for name in leftovers {
        std::fs::write(snap_dir.join(name), b"left by a crash").unwrap();
    }
    let rec = recover(&cfg).unwrap();
    let left: Vec<_> = std::fs::read_dir(&rec.snap_dir).unwrap().collect();
    assert!(
        left.is_empty(),
        "a restart starts with an empty snapshot dir: {left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m5_a_received_snapshot_raft_will_not_install_is_removed() {
    let g = Group::start(10_000);
    let leader = g.wait_leader().await;
    for i in 0..5 {
        g.put(leader, &format!("k{i}"), "v").await.unwrap();
    }
    g.wait_converged().await;
    let follower = *g.members.keys().find(|id| **id != leader).unwrap();
    // A transfer that arrives late: a snapshot at index 1, far behind what the follower applied.
    let dir = g.net.snap_dirs.lock().unwrap()[&follower].clone();
    let stale = dir.join(format!("in-{:020}-{:020}.snap", 1, 1));
    std::fs::write(&stale, b"an old snapshot").unwrap();
    let mut msg = Message::default();
    msg.set_msg_type(raft::prelude::MessageType::MsgSnapshot);
    (msg.from, msg.to) = (leader, follower);
    msg.term = g.status(follower).await.term;
    msg.mut_snapshot().mut_metadata().index = 1;
    msg.mut_snapshot().mut_metadata().term = 1;
    g.members[&follower]
        .inbox
        .send(Msg::SnapshotReceived {
            msg: Box::new(msg),
            path: stale.clone(),
        })
        .await
        .unwrap();
    wait_until("the stale snapshot file is removed", || !stale.exists()).await;
    g.put(leader, "after", "v").await.unwrap();
    assert_eq!(
        g.wait_converged().await.items,
        6,
        "the follower is unharmed"
    );
}

/// A transaction accepted while leading waits for the end of the inbox batch; if a newer term's
/// message makes the replica a follower meanwhile, it must be refused as not applied. raft-rs
/// would forward it to the new leader and return `Ok`, and it would be tracked at this
/// replica's last index, which holds the new leader's entry: answered with that entry's outcome,
/// or "entry applied without a result" for the leader's empty entry (the race a loaded
/// playground showed).
#[tokio::test]
async fn a_transaction_pending_when_leadership_is_lost_is_refused_not_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let peers: BTreeMap<u64, String> = (1..=3).map(|id| (id, format!("mem-{id}"))).collect();
    let cfg = node_config(1, &peers, dir.path(), 0);
    let rec = recover(&cfg).unwrap();
    let (_inbox, rx) = mpsc::channel(DRIVER_INBOX_MAX);
    let (_raft, raft_rx) = RaftQueue::new();
    let (_stop, stop_rx) = watch::channel(false);
    let outbox = MemOutbox {
        id: 1,
        net: Arc::new(MemNet::default()),
        addrs: peers.clone(),
    };
    let shared = Arc::new(Shared::default());
    let mut d = new_driver(&cfg, rec, Box::new(outbox), rx, raft_rx, shared, stop_rx).unwrap();
    d.raw.raft.become_candidate();
    d.raw.raft.become_leader();
    let term = d.raw.raft.term;

    let txn = put_as_txn(PutRequest {
        shard_key: bytes::Bytes::from_static(b"order-1"),
        key: bytes::Bytes::from_static(b"k"),
        value: bytes::Bytes::from_static(b"v"),
        ..Default::default()
    })
    .unwrap();
    let (resp, mut answer) = oneshot::channel();
    let cmd = Command::Txn(txn);
    let queued = InboxBytes::new().take(&cmd).unwrap();
    d.handle(Msg::Propose { cmd, resp, queued });
    assert!(answer.try_recv().is_err(), "pending until the batch ends");

    // Node 2 leads a newer term; its heartbeat arrives in the same inbox batch.
    let mut hb = Message::default();
    hb.set_msg_type(MessageType::MsgHeartbeat);
    (hb.from, hb.to, hb.term) = (2, 1, term + 1);
    d.raw.step(hb).unwrap();
    assert_eq!(d.raw.raft.leader_id, 2);
    let last_index = d.raw.raft.raft_log.last_index();

    d.propose_pending();
    match answer.try_recv() {
        Ok(Err(crate::error::Error::NotLeader { leader_id: 2, .. })) => {}
        other => panic!("refused as not leader at once, not tracked: {other:?}"),
    }
    assert!(
        d.proposals.is_empty(),
        "no waiter at another leader's index"
    );
    assert_eq!(d.waiting_txns, 0);
    assert_eq!(d.raw.raft.raft_log.last_index(), last_index);
    let forwarded = d
        .raw
        .raft
        .msgs
        .iter()
        .any(|m| m.get_msg_type() == MessageType::MsgPropose);
    assert!(!forwarded, "not forwarded: {:?}", d.raw.raft.msgs);
}
