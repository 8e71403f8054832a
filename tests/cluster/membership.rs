//! Membership changes on real processes: `ordoctl replica replace` swaps a dead replica for a
//! new one under load, and the refusals (quorum, unknown node, change in progress) hold.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ordo_testkit::proc::ProcCluster;
use ordo_testkit::{bins, node_status, wait_for, Cluster, Member};

const LIMIT: Duration = Duration::from_secs(30);

/// What the writers saw: acknowledged items (shard key → version) and when each write succeeded.
#[derive(Default)]
struct Load {
    acked: BTreeMap<String, u64>,
    successes: Vec<Instant>,
    errors: Vec<String>,
}

/// `writers` tasks each writing fresh items through the router until `stop` (at most 60 s).
fn start_load(
    router: &str,
    writers: usize,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Load>>, Vec<tokio::task::JoinHandle<()>>) {
    let load = Arc::new(Mutex::new(Load::default()));
    let client = ordo_proto::client::Client::connect(vec![router.to_string()])
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    let tasks = (0..writers)
        .map(|w| {
            let (client, load, stop) = (client.clone(), load.clone(), stop.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                    seq += 1;
                    let sk = format!("member-{w}-{seq}");
                    let r = client.put(sk.clone(), "", format!("v-{sk}"), None).await;
                    let mut l = load.lock().unwrap();
                    match r {
                        Ok(p) => {
                            l.acked.insert(sk, p.version);
                            l.successes.push(Instant::now());
                        }
                        Err(e) => l.errors.push(format!("{sk}: {e}")),
                    }
                }
            })
        })
        .collect();
    (load, tasks)
}

/// The longest time without any successful write between `from` and `to`.
fn longest_gap(successes: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut times: Vec<Instant> = successes
        .iter()
        .copied()
        .filter(|t| *t >= from && *t <= to)
        .collect();
    times.sort();
    let mut edges = vec![from];
    edges.extend(times);
    edges.push(to);
    edges
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or_default()
}

/// Waits until the leader of `group` no longer counts node `id` as live.
async fn leader_sees_dead(c: &ProcCluster, dead: Member) {
    let (group, id) = (dead.group, dead.id);
    wait_for(
        &format!("the leader of group {group} to see node {id} dead"),
        LIMIT,
        || async {
            let l = c.find_leader(group).await?;
            let s = c.status(l, false).await?;
            (!s.live.is_empty() && !s.live.contains(&id)).then_some(())
        },
    )
    .await
}

/// Acceptance 3 of the fault-tolerance issue: a follower dies, a fresh node replaces it with
/// `ordoctl replica replace` while writes continue; writes never stop for longer than an
/// election, the new node ends with exactly the group's data and votes (the group survives
/// losing its old leader afterwards), and the map lists the new replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
// One scenario under one running load (refusals, replace, the new node votes): its phases share it.
#[allow(clippy::too_many_lines)]
async fn replace_a_dead_replica_under_load() {
    let _heavy = ordo_testkit::HEAVY.lock().await;
    let mut c = ProcCluster::start(bins!(), 1, 3);
    c.init(LIMIT).await;
    let router = c.router_addr().to_string();
    let cli = |args: &[&str]| bins!().ordoctl(std::slice::from_ref(&router), args);
    wait_for("the router to serve", LIMIT, || async {
        cli(&["put", "warm", "", "up"]).0.then_some(())
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let (load, writers) = start_load(&router, 8, stop.clone());
    let load_started = Instant::now();
    wait_for("writes to flow", LIMIT, || async {
        (load.lock().unwrap().acked.len() >= 200).then_some(())
    })
    .await;

    let leader = c.wait_leader(1, LIMIT).await;
    let members = c.members(1);
    let dead = *members.iter().find(|&&m| m != leader).unwrap();
    let live_follower = *members.iter().find(|&&m| m != leader && m != dead).unwrap();
    let (leader_id, dead_id, follower_id) = (leader.id, dead.id, live_follower.id);
    c.kill(dead).await;
    leader_sees_dead(&c, dead).await;

    // Refusals while a replica is down; none of them changes anything.
    let (ok, out) = cli(&[
        "replica",
        "remove",
        "--group",
        "1",
        "--id",
        &follower_id.to_string(),
    ]);
    assert!(!ok && out.contains("would lose quorum"), "{out}");
    let (ok, out) = cli(&["replica", "remove", "--group", "1", "--id", "9"]);
    assert!(!ok && out.contains("not a replica"), "{out}");
    let (ok, out) = cli(&[
        "replica",
        "remove",
        "--group",
        "1",
        "--id",
        &leader_id.to_string(),
    ]);
    assert!(!ok && out.contains("leads group 1"), "{out}");
    let s = c.status(leader, false).await.unwrap();
    assert_eq!(
        s.voters.len(),
        3,
        "a refused change changed the voters: {s:?}"
    );

    let new = c.start_joining(1, 4);
    let new_addr = c.addr(new);
    let replace_started = Instant::now();
    let (ok, out) = cli(&[
        "replica",
        "replace",
        "--group",
        "1",
        "--old",
        &dead_id.to_string(),
        "--id",
        "4",
        "--addr",
        &new_addr,
    ]);
    let replace_took = replace_started.elapsed();
    assert!(ok, "replace failed: {out}");
    assert!(
        out.contains("node 4") && !out.contains(&format!("node {dead_id} ")),
        "{out}"
    );
    // Keep writing a little with the new configuration, then stop.
    let count_after = load.lock().unwrap().acked.len() + 100;
    wait_for("writes after the replace", LIMIT, || async {
        (load.lock().unwrap().acked.len() >= count_after).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let load = std::mem::take(&mut *load.lock().unwrap());
    let gap = longest_gap(&load.successes, load_started, Instant::now());
    eprintln!(
        "replace took {replace_took:?}; {} writes acknowledged, {} failed; longest write gap {gap:?}",
        load.acked.len(),
        load.errors.len()
    );
    // Longer than the longest election timeout (1 s) would mean the group was unavailable.
    assert!(
        gap < Duration::from_millis(1000),
        "writes stopped for {gap:?}"
    );

    // The new node is a voter with exactly the group's data.
    let leader_addr = c.addr(leader);
    let (items, digest) = wait_for("the new node to hold the group's data", LIMIT, || async {
        let l = node_status(&leader_addr, true).await?;
        let n = node_status(&new_addr, true).await?;
        (l.applied_index == n.applied_index && l.data_digest == n.data_digest && l.items > 0)
            .then_some((n.items, n.data_digest))
    })
    .await;
    let s = node_status(&new_addr, false).await.unwrap();
    let mut voters = s.voters.clone();
    voters.sort();
    assert_eq!(voters, {
        let mut v = vec![leader_id, follower_id, 4];
        v.sort();
        v
    });
    assert!(
        items as usize > load.acked.len(),
        "{items} items, digest {digest}"
    );

    // The map names the new replicas, so routers reach them.
    let admin = ordo_proto::client::ClusterClient::connect(vec![router.clone()]).unwrap();
    let map = admin.get_shard_map(true).await.unwrap();
    let mut addrs: Vec<&str> = map.groups[0]
        .replicas
        .iter()
        .map(|r| r.addr.as_str())
        .collect();
    addrs.sort();
    let follower_addr = c.addr(live_follower);
    let mut want = vec![
        leader_addr.as_str(),
        follower_addr.as_str(),
        new_addr.as_str(),
    ];
    want.sort();
    assert_eq!(addrs, want);

    // The new node votes: with the old leader gone, it and the remaining founder elect a leader,
    // and every acknowledged write reads back.
    c.kill(leader).await;
    let client = ordo_proto::client::Client::connect(vec![router.clone()])
        .unwrap()
        .with_timeout(Duration::from_secs(10));
    client
        .put("after-leader-kill", "", "x", None)
        .await
        .unwrap_or_else(|e| panic!("the group {{follower, new node}} did not serve: {e}"));
    for (sk, version) in &load.acked {
        let r = client.get(sk.clone(), "", false).await.unwrap();
        assert!(
            r.found && r.version == *version && r.value.as_ref() == format!("v-{sk}").as_bytes(),
            "{sk}: acked v{version}, read found={} v{}",
            r.found,
            r.version
        );
    }
}

/// A second change while one is running is refused; a node that never catches up stays a
/// learner and can be removed; a dead config server is replaced in the config group, and the map
/// then lists the new config server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusals_while_a_change_runs_and_config_server_replacement() {
    let _heavy = ordo_testkit::HEAVY.lock().await;
    let mut c = ProcCluster::start(bins!(), 1, 3);
    c.init(LIMIT).await;
    let router = c.router_addr().to_string();
    let leader = c.wait_leader(1, LIMIT).await;
    let leader_addr = c.addr(leader);

    // Node 5 is never started: its add waits for it to catch up until the timeout.
    let nowhere = ordo_testkit::ports::free_addr();
    let add = {
        let router = router.clone();
        std::thread::spawn(move || {
            bins!().ordoctl(
                &[router],
                &[
                    "replica",
                    "add",
                    "--group",
                    "1",
                    "--id",
                    "5",
                    "--addr",
                    &nowhere,
                    "--catch-up-timeout",
                    "4s",
                ],
            )
        })
    };
    wait_for("node 5 to become a learner", LIMIT, || async {
        let s = node_status(&leader_addr, false).await?;
        s.learners.contains(&5).then_some(())
    })
    .await;
    let other = c.members(1).into_iter().find(|&m| m != leader).unwrap();
    let (ok, out) = c.ordoctl(&[
        "replica",
        "remove",
        "--group",
        "1",
        "--id",
        &other.id.to_string(),
    ]);
    assert!(!ok && out.contains("in progress"), "{out}");
    let (ok, out) = add.join().unwrap();
    assert!(!ok && out.contains("did not catch up"), "{out}");
    let s = node_status(&leader_addr, false).await.unwrap();
    assert_eq!((s.voters.len(), s.learners.clone()), (3, vec![5]), "{s:?}");
    let (ok, out) = c.ordoctl(&["replica", "remove", "--group", "1", "--id", "5"]);
    assert!(ok, "removing the learner: {out}");
    let s = node_status(&leader_addr, false).await.unwrap();
    assert!(s.learners.is_empty() && s.voters.len() == 3, "{s:?}");

    h2_a_membership_change_outlives_its_caller(&router, &leader_addr).await;

    // The config group: replace a dead config server.
    let meta_leader = c.wait_leader(0, LIMIT).await;
    let dead = c
        .members(0)
        .into_iter()
        .find(|&m| m != meta_leader)
        .unwrap();
    let dead_id = dead.id;
    c.kill(dead).await;
    let new = c.start_joining(0, 4);
    let new_addr = c.addr(new);
    let (ok, out) = c.ordoctl(&[
        "replica",
        "replace",
        "--group",
        "0",
        "--old",
        &dead_id.to_string(),
        "--id",
        "4",
        "--addr",
        &new_addr,
    ]);
    assert!(ok, "replacing config server {dead_id}: {out}");
    let admin = ordo_proto::client::ClusterClient::connect(vec![router.clone()]).unwrap();
    let map = admin.get_shard_map(true).await.unwrap();
    assert!(
        map.config_addrs.contains(&new_addr) && !map.config_addrs.contains(&c.addr(dead)),
        "config addrs {:?}",
        map.config_addrs
    );
    // The new config server holds the map: with the old config leader gone too, map reads still
    // answer (it and the remaining founder form the quorum).
    c.kill(meta_leader).await;
    let admin = ordo_proto::client::ClusterClient::connect(vec![new_addr.clone()])
        .unwrap()
        .with_timeout(Duration::from_secs(10));
    let after = admin.get_shard_map(true).await.unwrap();
    assert_eq!(after.version, map.version);
}

/// H2, for membership: a `ChangeGroupReplicas` whose caller gives up after 1 s, while the change
/// waits 3 s for a node that never catches up. The caller's deadline changes nothing: the task
/// runs to its end (FAILED, the node left a learner) and the next change goes through.
async fn h2_a_membership_change_outlives_its_caller(router: &str, leader_addr: &str) {
    use ordo_proto::v1::{
        ChangeGroupReplicasRequest, ChangeReplicasRequest, ReplicaChange, TaskState,
    };
    let admin = ordo_proto::client::ClusterClient::connect(vec![router.to_string()]).unwrap();
    let add = ChangeGroupReplicasRequest {
        group_id: 1,
        change: Some(ChangeReplicasRequest {
            change: ReplicaChange::Add as i32,
            node_id: 6,
            addr: ordo_testkit::ports::free_addr(),
            old_node_id: 0,
            catch_up_timeout_ms: 3000,
        }),
    };
    let err = admin
        .clone()
        .with_timeout(Duration::from_secs(1))
        .change_group_replicas(add)
        .await
        .expect_err("the caller gives up before the change ends");
    assert!(
        matches!(
            err.code(),
            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ),
        "{err:?}"
    );
    let task = wait_for("the membership task to end", LIMIT, || async {
        let list = admin.list_migrations().await.ok()?;
        let t = list.tasks.last()?.clone();
        (t.state != TaskState::Running as i32).then_some(t)
    })
    .await;
    assert_eq!(task.state, TaskState::Failed as i32, "{task:?}");
    assert!(task.error.contains("did not catch up"), "{task:?}");
    let s = node_status(leader_addr, false).await.unwrap();
    assert_eq!(s.learners, vec![6], "the change ran to its end: {s:?}");
    let (ok, out) = bins!().ordoctl(
        &[router.to_string()],
        &["replica", "remove", "--group", "1", "--id", "6"],
    );
    assert!(ok, "removing the learner: {out}");
}
