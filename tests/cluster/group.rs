//! Acceptance tests of one replicated shard group made of real `ordo node` processes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};

use ordo_proto::client::Client;
use ordo_testkit::proc::{ProcGroup, PROC_GROUP};
use ordo_testkit::{bins, wait_for, Cluster};

/// Writes `count` distinct items with `concurrency` requests in flight; returns what was acknowledged.
async fn write_items(
    g: &ProcGroup,
    prefix: &str,
    count: usize,
    concurrency: usize,
) -> BTreeMap<String, u64> {
    let client = g.client();
    let acked: Vec<(String, u64)> = stream::iter(0..count)
        .map(|i| {
            let client = client.clone();
            let sk = format!("{prefix}-{i}");
            async move {
                let r = client
                    .put(sk.clone(), "", format!("value of {sk}"), None)
                    .await;
                (
                    sk,
                    r.unwrap_or_else(|e| panic!("put {i} failed: {e}")).version,
                )
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    acked.into_iter().collect()
}

/// Checks that `node` exited with the replica-failed code (3: not a signal, not 0) and that its
/// log says `why`; returns the log.
fn failed_node_log(
    g: &ProcGroup,
    node: u64,
    status: std::process::ExitStatus,
    why: &str,
) -> String {
    assert_eq!(
        status.code(),
        Some(3),
        "the node exits with the replica-failed code, not killed by a signal nor 0: {status:?}"
    );
    let log = std::fs::read_to_string(&g.nodes[&node].log).unwrap();
    assert!(
        log.contains(why),
        "node {node} says why it exited ({why:?})"
    );
    log
}

async fn assert_all_present(g: &ProcGroup, acked: &BTreeMap<String, u64>) {
    assert_all_read_back(g, acked, |sk| format!("value of {sk}").into_bytes()).await
}

/// Every acknowledged write reads back at its version or later, with the value `value_of` its
/// shard key.
async fn assert_all_read_back(
    g: &ProcGroup,
    acked: &BTreeMap<String, u64>,
    value_of: impl Fn(&str) -> Vec<u8>,
) {
    let value_of = &value_of;
    let client = g.client();
    let missing: Vec<String> = stream::iter(acked.iter())
        .map(|(sk, version)| {
            let client = client.clone();
            async move {
                let r = client
                    .get(sk.clone(), "", false)
                    .await
                    .unwrap_or_else(|e| panic!("get {sk}: {e}"));
                let ok = r.found && r.version >= *version && r.value.as_ref() == value_of(sk);
                (!ok).then(|| {
                    format!(
                        "{sk} (acked v{version}, read found={} v{})",
                        r.found, r.version
                    )
                })
            }
        })
        .buffer_unordered(16)
        .filter_map(|x| async move { x })
        .collect()
        .await;
    assert!(
        missing.is_empty(),
        "{} acknowledged writes are missing or wrong: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

/// Acceptance 1: 1,000 puts, kill -9 the leader, a new leader serves within 3 s, everything
/// acknowledged reads back with its version, and the killed node catches up on restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill_new_leader_serves_and_old_leader_catches_up() {
    let mut g = ProcGroup::start(bins!(), 3, 10_000);
    let leader = g.wait_leader(PROC_GROUP, Duration::from_secs(20)).await;
    let acked = write_items(&g, "order", 1000, 16).await;
    assert_eq!(acked.len(), 1000);
    assert!(acked.values().all(|&v| v == 1));

    g.kill(leader).await;
    let killed_at = Instant::now();
    let client = g.client();
    // The first write that succeeds after the kill was served by the new leader.
    first_write(&client, "a write after the leader was killed", "after-kill").await;
    let unavailable = killed_at.elapsed();
    let new_leader = g.wait_leader(PROC_GROUP, Duration::from_secs(5)).await;
    assert_ne!(new_leader, leader);
    eprintln!(
        "unavailable for {unavailable:?} after killing leader {leader}; new leader {new_leader}"
    );
    assert!(
        unavailable < Duration::from_secs(3),
        "new leader took {unavailable:?} to serve (limit 3 s)"
    );

    assert_all_present(&g, &acked).await;

    g.restart(leader).await;
    let (applied, items, _) = g.converged(Duration::from_secs(30)).await;
    assert_eq!(
        items, 1001,
        "every replica holds the 1,000 items and the one written after the kill"
    );
    let s = g.status(leader, false).await.unwrap();
    assert!(
        s.applied_index >= applied,
        "restarted node caught up to {applied}"
    );
}

/// Acceptance 2: a replica down while 10,000+ entries are written and the log is compacted
/// rejoins through a snapshot and ends with data identical to the leader's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_replica_rejoins_through_a_snapshot() {
    // Writes that arrive together share a raft entry, so 10,000 writes from 64 clients make only a
    // few hundred entries: compact early enough that they still push the log past the replica.
    let mut g = ProcGroup::start(bins!(), 3, 100);
    let leader = g.wait_leader(PROC_GROUP, Duration::from_secs(20)).await;
    let down = g.node(if leader.id == 3 { 2 } else { 3 });
    write_items(&g, "early", 100, 8).await;
    let before = g.status(down, false).await.unwrap();
    g.kill(down).await;

    let acked = write_items(&g, "while-down", 10_000, 64).await;
    let leader_now = g.wait_leader(PROC_GROUP, Duration::from_secs(5)).await;
    let s = g.status(leader_now, false).await.unwrap();
    assert!(
        s.first_index > before.last_index + 1,
        "the leader's log must be compacted past what the down replica has (first {} vs its last {})",
        s.first_index,
        before.last_index
    );

    g.restart(down).await;
    let (_, items, _) = g.converged(Duration::from_secs(60)).await;
    assert_eq!(items, 10_100);
    let s = g.status(down, false).await.unwrap();
    assert!(
        s.snapshots_installed >= 1,
        "replica {down} should have caught up from a snapshot: {s:?}"
    );
    assert_all_present(&g, &acked).await;
}

/// Acceptance 3: 8 clients × 100 compare-and-set increments of one counter end at exactly 800.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cas_increments_are_exact() {
    let g = ProcGroup::start(bins!(), 3, 10_000);
    g.wait_leader(PROC_GROUP, Duration::from_secs(20)).await;
    let client = g.client();
    let conflicts = Arc::new(Mutex::new(0u64));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            let conflicts = conflicts.clone();
            tokio::spawn(async move {
                for _ in 0..100 {
                    loop {
                        let cur = client.get("counter", "", false).await.expect("get counter");
                        let n: u64 = if cur.found {
                            std::str::from_utf8(&cur.value).unwrap().parse().unwrap()
                        } else {
                            0
                        };
                        let r = client
                            .put("counter", "", (n + 1).to_string(), Some(cur.version))
                            .await
                            .expect("cas put");
                        if r.succeeded {
                            break;
                        }
                        *conflicts.lock().unwrap() += 1;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let end = client.get("counter", "", false).await.unwrap();
    assert_eq!(std::str::from_utf8(&end.value).unwrap(), "800");
    assert_eq!(end.version, 800);
    eprintln!(
        "800 increments with {} lost compare-and-set races",
        conflicts.lock().unwrap()
    );
}

/// The `to_replay` of the last "opened storage" line of a node's log.
fn replayed_at_last_start(log: &str) -> u64 {
    let line = log
        .lines()
        .rfind(|l| l.contains("opened storage"))
        .expect("the node logged its start");
    // Without the terminal's colour codes around field names.
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            plain.push(c);
        }
    }
    let line = plain.as_str();
    let at = line
        .find("to_replay=")
        .expect("the start line counts its replay")
        + 10;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("to_replay in {line:?}"))
}

/// Acceptance 4: kill -9 all three nodes mid-load, restart them: every acknowledged write is present.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_group_killed_mid_load_loses_nothing_acknowledged() {
    let mut g = ProcGroup::start(bins!(), 3, 500);
    g.wait_leader(PROC_GROUP, Duration::from_secs(20)).await;
    let client = g.client().with_timeout(Duration::from_secs(2));
    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Default::default();
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let client = client.clone();
            let acked = acked.clone();
            tokio::spawn(async move {
                for i in 0.. {
                    let sk = format!("w{w}-{i}");
                    match client
                        .put(sk.clone(), "", format!("value of {sk}"), None)
                        .await
                    {
                        Ok(r) => {
                            acked.lock().unwrap().insert(sk, r.version);
                        }
                        // The group is being killed: stop at the first failure.
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    wait_for("2,000 acknowledged writes", Duration::from_secs(30), || {
        let n = acked.lock().unwrap().len();
        async move { (n >= 2000).then_some(()) }
    })
    .await;
    for id in [1, 2, 3] {
        g.kill(g.node(id)).await;
    }
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    for id in [1, 2, 3] {
        g.restart(g.node(id)).await;
    }
    g.wait_leader(PROC_GROUP, Duration::from_secs(20)).await;
    assert_all_present(&g, &acked).await;
    // sled is synced in the background, so the kill left applies only the raft log held; each
    // replica replayed them at its start, and all three hold the same data (issue 15).
    let (_, items, digest) = g.converged(Duration::from_secs(30)).await;
    assert!(items as usize >= acked.len(), "{items} items");
    let replayed: Vec<u64> = [1, 2, 3]
        .iter()
        .map(|id| replayed_at_last_start(&std::fs::read_to_string(&g.nodes[id].log).unwrap()))
        .collect();
    assert!(
        replayed.iter().any(|&n| n > 0),
        "no replica replayed anything after kill -9 mid-load: {replayed:?}"
    );
    eprintln!(
        "{} acknowledged writes survived kill -9 of the whole group; replayed {replayed:?} \
         entries at restart; all replicas at digest {digest:08x}",
        acked.len()
    );
}

/// `ordoctl leader transfer` hands leadership to the named voter and answers once it leads; the
/// group keeps serving; a replica that is not a voter is refused with a message saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_transfer_moves_leadership_to_the_named_voter() {
    let g = ProcGroup::start(bins!(), 3, 10_000);
    let leader = g.wait_leader(PROC_GROUP, Duration::from_secs(20)).await;
    write_items(&g, "before", 50, 8).await;
    let target = g.node(if leader.id == 1 { 2 } else { 1 });

    let (ok, out) = g.ordoctl(&["leader", "transfer", "--to", &target.id.to_string()]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("leader is node {}", target.id)),
        "{out}"
    );
    assert_eq!(
        g.wait_leader(PROC_GROUP, Duration::from_secs(5)).await,
        target
    );
    let acked = write_items(&g, "after", 50, 8).await;
    assert_all_present(&g, &acked).await;

    let (ok, out) = g.ordoctl(&["leader", "transfer", "--to", "9"]);
    assert!(
        !ok,
        "a transfer to a node outside the group must fail: {out}"
    );
    assert!(out.contains("node 9 is not a voter"), "{out}");
    assert_eq!(
        g.wait_leader(PROC_GROUP, Duration::from_secs(5)).await,
        target,
        "a refused transfer changes nothing"
    );
}

/// Writes `count` distinct items, `concurrency` at a time, and returns those acknowledged; a
/// failed write is left out (its outcome may be unknown, so it is neither expected nor excluded).
async fn write_items_tolerant(
    g: &ProcGroup,
    prefix: &str,
    count: usize,
    concurrency: usize,
) -> BTreeMap<String, u64> {
    let client = g.client();
    stream::iter(0..count)
        .map(|i| {
            let client = client.clone();
            let sk = format!("{prefix}-{i}");
            async move {
                let r = client
                    .put(sk.clone(), "", format!("value of {sk}"), None)
                    .await;
                r.ok().map(|r| (sk, r.version))
            }
        })
        .buffer_unordered(concurrency)
        .filter_map(|x| async move { x })
        .collect()
        .await
}

/// The time of day, in seconds, of the first line of `log` containing `what` (the tracing
/// timestamp that starts each line, `2026-01-01T12:34:56.789012Z`, perhaps in ANSI colours).
fn logged_at(log: &str, what: &str) -> f64 {
    let line = log
        .lines()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no log line contains {what:?}"));
    // The line may be coloured: take what lies between the first `T` and the `Z` after it.
    let time = line
        .split_once('T')
        .and_then(|(_, rest)| rest.split_once('Z'))
        .map(|(t, _)| t)
        .unwrap_or_else(|| panic!("no timestamp in {line:?}"));
    let parts: Vec<f64> = time
        .split(':')
        .map(|p| {
            p.parse()
                .unwrap_or_else(|_| panic!("bad timestamp in {line:?}"))
        })
        .collect();
    assert_eq!(parts.len(), 3, "bad timestamp in {line:?}");
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

/// H4 (fail-stop): an fsync failure on one replica, injected by its failpoint, makes that
/// process exit with the replica-failed code within 1 s instead of lingering as a zombie; the two others
/// keep serving writes, and every acknowledged write, before and after, reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h4_fsync_failure_makes_the_node_exit_non_zero() {
    const FAILING: u64 = 3;
    // Its 40 syncs after start cover the election and the first writes.
    let env = BTreeMap::from([(
        FAILING,
        vec![("ORDO_FAILPOINT_FSYNC".to_string(), "after:40".to_string())],
    )]);
    let mut g = ProcGroup::start_with_env(bins!(), 3, 10_000, env);
    g.wait_leader(PROC_GROUP, Duration::from_secs(20)).await;

    // Every write makes every replica sync, so the failing one soon passes its 40th sync.
    let mut acked = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let batch = acked.len();
        acked.extend(write_items_tolerant(&g, &format!("before-{batch}"), 20, 4).await);
        if let Some(status) = g.try_exit(FAILING) {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "node {FAILING} still runs 30 s into the writes, past its failing fsync"
        );
    };
    let log = failed_node_log(&g, FAILING, status, "injected by ORDO_FAILPOINT_FSYNC");
    // Promptly: from the driver stopping on the failed sync to the binary exiting on it.
    let stopped = logged_at(&log, "replica stops");
    let exiting = logged_at(&log, "the replica failed; exiting");
    let gap = (exiting - stopped).rem_euclid(86_400.0);
    assert!(
        gap < 1.0,
        "the process took {gap:.3} s after the failure to exit (limit 1 s)"
    );

    // The two others still form a quorum and serve writes.
    let client = g.client();
    first_write(&client, "a write after the node exited", "after-exit").await;
    acked.extend(write_items(&g, "after", 200, 8).await);
    assert_all_present(&g, &acked).await;
}

/// Waits (10 s at most) for the first write of `key` that succeeds, as after a failure.
async fn first_write(client: &Client, what: &str, key: &str) {
    wait_for(what, Duration::from_secs(10), || {
        let (client, key) = (client.clone(), key.to_string());
        let value = format!("value of {key}");
        async move { client.put(key, "", value, None).await.ok() }
    })
    .await;
}

/// A small tmpfs mounted at a directory for a test, unmounted on drop (lazily, so a process still
/// holding files there cannot keep it mounted).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts `mib` MiB at `dir`. Needs root (CI runs as root): anyone else fails loudly rather
    /// than pass without having tested anything.
    fn mount(dir: &std::path::Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "this test mounts a {mib} MiB tmpfs to fill a disk and must run as root (CI does; \
             elsewhere run it with sudo or skip it with `--skip full_disk`): mount said {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Acceptance 3 (full disk): one replica's data dir is a 64 MiB tmpfs, and writes go on until it
/// is full. That replica stops serving, its process exits with the replica-failed code, the two
/// others keep serving, and every acknowledged write, before and after, reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_disk_makes_the_node_exit_non_zero_and_the_group_keeps_serving() {
    const FULL: u64 = 3;
    const VALUE_BYTES: usize = 256 * 1024;
    let mut g = ProcGroup::prepare(bins!(), 3, 10_000, BTreeMap::new());
    // Declared after the group, so it is unmounted before the group's dir is removed.
    let _disk = Tmpfs::mount(&g.nodes[&FULL].data_dir, 64);
    g.start_all();
    g.wait_leader(PROC_GROUP, Duration::from_secs(20)).await;

    // Each write stores its value in the log and in the data tree: 64 MiB fill after ~130.
    let big = |sk: &str| {
        let mut v = sk.as_bytes().to_vec();
        v.resize(VALUE_BYTES, b'.');
        v
    };
    let client = g.client();
    let mut acked_big = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let batch: Vec<_> = (0..8)
            .map(|i| format!("big-{}-{i}", acked_big.len()))
            .collect();
        let writes = batch.iter().map(|sk| {
            let client = client.clone();
            let value = big(sk);
            async move { (sk.clone(), client.put(sk.clone(), "", value, None).await) }
        });
        for (sk, r) in futures::future::join_all(writes).await {
            // A write in flight when a leader fails has an unknown outcome: left out.
            if let Ok(r) = r {
                acked_big.insert(sk, r.version);
            }
        }
        if let Some(status) = g.try_exit(FULL) {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "node {FULL} still runs after 60 s of writes into its 64 MiB disk ({} acknowledged)",
            acked_big.len()
        );
    };
    let log = failed_node_log(&g, FULL, status, "No space left on device");
    assert!(log.contains("the replica failed; exiting"), "{log}");

    // The two others still form a quorum and serve writes, and nothing acknowledged is lost.
    first_write(&client, "a write after the node exited", "after-full").await;
    let acked = write_items(&g, "after", 200, 8).await;
    assert_all_present(&g, &acked).await;
    assert_all_read_back(&g, &acked_big, big).await;
    eprintln!(
        "node {FULL} exited on a full disk after {} acknowledged writes of {} KiB",
        acked_big.len(),
        VALUE_BYTES / 1024
    );
}
