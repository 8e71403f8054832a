//! Admin work outlives its caller (audit H2): moves and rebalances run as tasks of the config
//! leader, recorded before they start. A caller that times out changes nothing, a task started
//! with `StartTask` answers at once and can be aborted cleanly, a config leader change resumes
//! the task, and `ordoctl rebalance` with its default flags completes a move that lasts longer
//! than its default call timeout.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::stream::{self, StreamExt};
use ordo_config::migration::in_flight;
use ordo_config::tasks::task_running;
use ordo_proto::client::{Client, ClusterClient};
use ordo_proto::v1::start_task_request::Task as What;
use ordo_proto::v1::{
    MigrationList, MigrationState, MoveSlotsRequest, RebalanceRequest, ShardMap, Task, TaskState,
};
use ordo_testkit::inproc::InProcCluster;
use ordo_testkit::{bins, wait_for, Cluster, CONFIG_GROUP};
use tonic::Code;

use crate::resharding::{admin, assert_placement, print_moves, slot_counts};

/// Items of the H2 tests, with values of [`VALUE_BYTES`]: a few MiB in all, so that a throttled
/// move lasts seconds without loading much.
const ITEMS: u64 = 600;
const VALUE_BYTES: usize = 4096;
/// Copy bandwidth of the moves: half of the items (~1.2 MiB) take ~5 s, well past the caller's
/// [`CALLER_TIMEOUT`].
const COPY_BYTES_PER_SEC: u64 = 256 * 1024;
const CALLER_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on a task's end once its caller has gone (a move of ~5 s, twice after a config leader
/// change, and its cleanup).
const END_WITHIN: Duration = Duration::from_secs(90);

fn value(i: u64) -> String {
    let v = format!("big {i} ");
    v.clone() + &"x".repeat(VALUE_BYTES.saturating_sub(v.len()))
}

/// Writes item `big-<i>` (version 1) for each of `keys`, 32 at a time.
async fn preload(router: &str, keys: impl Iterator<Item = u64>) {
    let c = Client::connect(vec![router.to_string()])
        .unwrap()
        .with_timeout(Duration::from_secs(15));
    stream::iter(keys)
        .map(|i| {
            let c = c.clone();
            async move {
                let r = c
                    .put(format!("big-{i}"), "", value(i), Some(0))
                    .await
                    .unwrap_or_else(|e| panic!("preload {i}: {e}"));
                assert_eq!(r.version, 1);
            }
        })
        .buffer_unordered(32)
        .collect::<()>()
        .await;
}

/// Reads every preloaded item back through the router: each is served (its slot is not left
/// fenced anywhere) with its version and value; the shard keys.
async fn read_back(router: &str, keys: &[u64]) -> BTreeSet<String> {
    let c = Client::connect(vec![router.to_string()])
        .unwrap()
        .with_timeout(Duration::from_secs(10));
    let mut found = BTreeSet::new();
    for &i in keys {
        let sk = format!("big-{i}");
        let r = c
            .get(sk.clone(), "", false)
            .await
            .unwrap_or_else(|e| panic!("reading {sk}: {e}"));
        assert!(
            r.found && r.version == 1 && r.value.as_ref() == value(i).as_bytes(),
            "{sk} reads back as written (found {}, version {})",
            r.found,
            r.version
        );
        found.insert(sk);
    }
    // And the slots take writes.
    c.put(format!("big-{}", keys[0]), "", "after", Some(1))
        .await
        .expect("a write after the task");
    c.put(format!("big-{}", keys[0]), "", value(keys[0]), Some(2))
        .await
        .expect("a write after the task");
    found
}

fn owned_by(map: &ShardMap, group: u64) -> Vec<u32> {
    (0..map.slot_count)
        .filter(|s| map.slot_owner[*s as usize] == group)
        .collect()
}

/// Waits (at most [`END_WITHIN`]) for task `id` to end; it and the records then.
async fn ended(cc: &ClusterClient, id: u64) -> (Task, MigrationList) {
    let (t, list) = wait_for(&format!("task {id} to end"), END_WITHIN, || {
        let cc = cc.clone();
        async move {
            let list = cc.list_migrations().await.ok()?;
            let t = list.tasks.iter().find(|t| t.id == id)?.clone();
            (!task_running(&t)).then_some((t, list))
        }
    })
    .await;
    print_moves(&list.migrations);
    assert!(
        list.migrations.iter().all(|m| !in_flight(m)),
        "task {id} ended with migrations in flight: {:?}",
        list.migrations
    );
    (t, list)
}

/// Waits until a migration of task `task` has copied something; its id.
async fn copying(cc: &ClusterClient, task: u64) -> u64 {
    wait_for(
        &format!("task {task}'s move to be copying"),
        Duration::from_secs(30),
        || {
            let cc = cc.clone();
            async move {
                let list = cc.list_migrations().await.ok()?;
                let m = list.migrations.iter().find(|m| m.task_id == task)?;
                assert_eq!(
                    m.state,
                    MigrationState::Copying as i32,
                    "the move left its copy before the test acted: {m:?}"
                );
                (m.items_copied > 0).then_some(m.id)
            }
        },
    )
    .await
}

/// H2: a `MoveSlots` whose caller gives up after 2 s, while its move takes ~5 s. The caller sees
/// its deadline pass; the move goes on and within a bound is DONE: the map gives the slots to
/// the recipient, nothing is fenced, every item reads back from its new owner and the donor kept
/// none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2_a_move_outlives_its_callers_deadline() {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let pg = InProcCluster::start(2, 3).await;
    let router = pg.router_addr();
    let keys: Vec<u64> = (0..ITEMS).collect();
    preload(&router, keys.iter().copied()).await;
    let cc = admin(&pg);
    let before = cc.get_shard_map(true).await.unwrap();
    let req = MoveSlotsRequest {
        slots: owned_by(&before, 1),
        to_group: 2,
        copy_bytes_per_sec: COPY_BYTES_PER_SEC,
    };
    let err = cc
        .clone()
        .with_timeout(CALLER_TIMEOUT)
        .move_slots_with(req)
        .await
        .expect_err("the move outlasts its caller");
    // The client's own timeout (tonic reports it as CANCELLED when it fires mid-call).
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    // The caller is gone; its move is not (it was recorded before it started, and lasts longer).
    let m = wait_for("the move to be listed", Duration::from_secs(10), || {
        let cc = cc.clone();
        async move { cc.list_migrations().await.ok()?.migrations.pop() }
    })
    .await;
    assert!(in_flight(&m), "the move was still running: {m:?}");
    let (t, list) = ended(&cc, m.task_id).await;
    assert_eq!(t.state, TaskState::Done as i32, "{t:?}");
    assert!(t.migrations.iter().all(|id| list
        .migrations
        .iter()
        .any(|m| m.id == *id && m.state == MigrationState::Done as i32)));
    let map = cc.get_shard_map(true).await.unwrap();
    assert!(owned_by(&map, 1).is_empty(), "group 1 gave every slot");
    let found = read_back(&router, &keys).await;
    assert_placement(&pg, &BTreeMap::new(), &map, &found).await;
    pg.shutdown().await;
}

/// H2: `StartTask` answers while its move is still copying, and `AbortTask` then ends it
/// cleanly: ABORTED, the map unchanged, the donor serving every item, the recipient without the
/// copy; a second abort is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2_a_started_task_answers_at_once_and_aborts_cleanly() {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let pg = InProcCluster::start(2, 3).await;
    let router = pg.router_addr();
    let keys: Vec<u64> = (0..ITEMS).collect();
    preload(&router, keys.iter().copied()).await;
    let cc = admin(&pg);
    let before = cc.get_shard_map(true).await.unwrap();
    let t = cc
        .start_task(What::MoveSlots(MoveSlotsRequest {
            slots: owned_by(&before, 1),
            to_group: 2,
            copy_bytes_per_sec: COPY_BYTES_PER_SEC,
        }))
        .await
        .unwrap();
    assert_eq!(
        (t.state, t.plan.len()),
        (TaskState::Running as i32, 1),
        "{t:?}"
    );
    let m = copying(&cc, t.id).await;
    let asked = cc.abort_task(t.id).await.unwrap();
    assert!(asked.abort_requested, "{asked:?}");
    let (t, list) = ended(&cc, t.id).await;
    assert_eq!(t.state, TaskState::Aborted as i32, "{t:?}");
    assert!(t.error.contains("aborted on request"), "{t:?}");
    let m = list.migrations.iter().find(|x| x.id == m).unwrap();
    assert_eq!(m.state, MigrationState::Aborted as i32, "{m:?}");
    let e = cc.abort_task(t.id).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("can no longer be aborted"), "{e:?}");
    let after = cc.get_shard_map(true).await.unwrap();
    assert_eq!(
        (after.version, &after.slot_owner),
        (before.version, &before.slot_owner),
        "nothing was cut over"
    );
    let found = read_back(&router, &keys).await;
    assert_placement(&pg, &BTreeMap::new(), &after, &found).await;
    pg.shutdown().await;
}

/// Registers a new group 2 beside a one-group cluster; its nodes (the test stops them).
async fn add_group_2(
    pg: &InProcCluster,
    cc: &ClusterClient,
) -> (Vec<ordo::node::Node>, Vec<String>) {
    let (nodes, spec, _) = crate::resharding::start_and_add_group(pg, cc, 2).await;
    (nodes, spec.addrs)
}

/// H2: the config leader is killed while a rebalance task copies. The new leader resumes the
/// task: the move it finds in flight is aborted (it had not cut over) and started again, and the
/// task ends DONE within a bound with the slots spread evenly and nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2_a_config_leader_change_resumes_the_rebalance() {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let mut pg = InProcCluster::start(1, 3).await;
    let router = pg.router_addr();
    let keys: Vec<u64> = (0..ITEMS).collect();
    preload(&router, keys.iter().copied()).await;
    let cc = admin(&pg);
    let (nodes2, addrs2) = add_group_2(&pg, &cc).await;
    let t = cc
        .start_task(What::Rebalance(RebalanceRequest {
            // One move of half the slots.
            slots_per_move: 4096,
            copy_bytes_per_sec: COPY_BYTES_PER_SEC,
            ..Default::default()
        }))
        .await
        .unwrap();
    let first = copying(&cc, t.id).await;
    let victim = pg.wait_leader(CONFIG_GROUP, Duration::from_secs(10)).await;
    eprintln!("stopping the config leader {} mid-copy", pg.addr(victim));
    pg.kill(victim).await;
    let (t, list) = ended(&cc, t.id).await;
    assert_eq!(t.state, TaskState::Done as i32, "{t:?}");
    let aborted = list.migrations.iter().find(|m| m.id == first).unwrap();
    assert_eq!(aborted.state, MigrationState::Aborted as i32, "{aborted:?}");
    let last = list
        .migrations
        .iter()
        .find(|m| Some(&m.id) == t.migrations.last())
        .unwrap();
    assert!(
        last.id != first && last.state == MigrationState::Done as i32,
        "the new leader moved the slots again: {last:?}"
    );
    let map = cc.get_shard_map(true).await.unwrap();
    assert_eq!(
        slot_counts(&map).values().copied().collect::<Vec<_>>(),
        vec![2048; 2]
    );
    let found = read_back(&router, &keys).await;
    assert_placement(&pg, &BTreeMap::from([(2, addrs2)]), &map, &found).await;
    for n in nodes2 {
        n.shutdown().await;
    }
    pg.shutdown().await;
}

/// Copy bandwidth of the cluster in the `ordoctl` test (the config servers' default, so that
/// `ordoctl rebalance` runs with its own defaults): the loaded move's ~800 KiB take ~12 s.
const SLOW_COPY_BYTES_PER_SEC: u64 = 64 * 1024;
/// Items loaded into the slots of the rebalance's first move.
const SLOW_MOVE_ITEMS: u64 = 200;
/// `ordoctl`'s default `--timeout`, which a move used to have to fit in.
const ORDOCTL_DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The reproduction: `ordoctl rebalance` with every flag at its default (a 10 s call
/// timeout) on a cluster where one move lasts longer than that. It completes: the slots are
/// spread evenly, every item reads back, and the long move is recorded as taking over 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2_ordoctl_rebalance_with_default_flags_completes_a_move_longer_than_its_timeout() {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let pg = InProcCluster::start_copying_at(1, 3, SLOW_COPY_BYTES_PER_SEC).await;
    let router = pg.router_addr();
    let cc = admin(&pg);
    let (nodes2, addrs2) = add_group_2(&pg, &cc).await;
    let plan = cc
        .rebalance(RebalanceRequest {
            dry_run: true,
            slots_per_move: 512, // ordoctl's default
            ..Default::default()
        })
        .await
        .unwrap()
        .plan;
    // The data goes into the first move's slots only: that move is long, the others quick.
    let first: BTreeSet<u32> = plan[0].slots.iter().copied().collect();
    let map = cc.get_shard_map(true).await.unwrap();
    let keys: Vec<u64> = (0..)
        .filter(|i| {
            let slot = ordo_proto::slot_of(format!("big-{i}").as_bytes(), map.slot_count);
            first.contains(&slot)
        })
        .take(SLOW_MOVE_ITEMS as usize)
        .collect();
    preload(&router, keys.iter().copied()).await;

    let endpoint = vec![router.clone()];
    let (ok, out) =
        tokio::task::spawn_blocking(move || bins!().ordoctl_defaults(&endpoint, &["rebalance"]))
            .await
            .unwrap();
    assert!(ok, "ordoctl rebalance failed: {out}");
    assert!(out.contains("(rebalance) started"), "{out}");
    let list = cc.list_migrations().await.unwrap();
    print_moves(&list.migrations);
    let long = list
        .migrations
        .iter()
        .find(|m| m.slots == plan[0].slots)
        .expect("the first move ran");
    assert_eq!(long.state, MigrationState::Done as i32, "{long:?}");
    let took = Duration::from_millis(long.finished_unix_ms - long.started_unix_ms);
    eprintln!("the loaded move took {took:?}; ordoctl printed:\n{out}");
    assert!(
        took > ORDOCTL_DEFAULT_TIMEOUT,
        "the loaded move took {took:?}, not longer than ordoctl's default timeout: load more"
    );
    let map = cc.get_shard_map(true).await.unwrap();
    assert_eq!(
        slot_counts(&map).values().copied().collect::<Vec<_>>(),
        vec![2048; 2]
    );
    let found = read_back(&router, &keys).await;
    assert_placement(&pg, &BTreeMap::from([(2, addrs2)]), &map, &found).await;
    for n in nodes2 {
        n.shutdown().await;
    }
    pg.shutdown().await;
}

/// A rebalance task whose first move cannot start (one of its slots is already moving, in a
/// slow move of its own) still runs its other moves, then ends FAILED naming the move that
/// failed; the slots of that move stay with their owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2_a_rebalance_whose_move_fails_still_runs_its_other_moves() {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let pg = InProcCluster::start(1, 3).await;
    let router = pg.router_addr();
    let cc = admin(&pg);
    let (nodes2, addrs2) = add_group_2(&pg, &cc).await;
    let plan = cc
        .rebalance(RebalanceRequest {
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .plan;
    assert!(plan.len() > 1, "{plan:?}");
    // A move of one slot of the first planned move, slow enough to outlast the rebalance.
    let busy = plan[0].slots[0];
    let map = cc.get_shard_map(true).await.unwrap();
    let keys: Vec<u64> = (0..)
        .filter(|i| ordo_proto::slot_of(format!("big-{i}").as_bytes(), map.slot_count) == busy)
        .take(20)
        .collect();
    preload(&router, keys.iter().copied()).await;
    let slow = cc
        .start_task(What::MoveSlots(MoveSlotsRequest {
            slots: vec![busy],
            to_group: 2,
            copy_bytes_per_sec: 2_000,
        }))
        .await
        .unwrap();
    let slow_move = copying(&cc, slow.id).await;
    let rebalance = cc
        .start_task(What::Rebalance(RebalanceRequest::default()))
        .await
        .unwrap();
    let (t, _) = wait_for("the rebalance to end", END_WITHIN, || {
        let cc = cc.clone();
        async move {
            let list = cc.list_migrations().await.ok()?;
            let t = list.tasks.iter().find(|t| t.id == rebalance.id)?.clone();
            (!task_running(&t)).then_some((t, list))
        }
    })
    .await;
    assert_eq!(t.state, TaskState::Failed as i32, "{t:?}");
    assert!(
        t.error.starts_with(&format!(
            "move 1 of {} failed: slot {busy} is already moving",
            plan.len()
        )),
        "{t:?}"
    );
    assert_eq!(
        (t.moves_done as usize, t.migrations.len()),
        (plan.len(), plan.len() - 1),
        "{t:?}"
    );
    cc.abort_migration(slow_move).await.unwrap();
    let (slow, _) = ended(&cc, slow.id).await;
    assert_eq!(slow.state, TaskState::Aborted as i32, "{slow:?}");
    let map = cc.get_shard_map(true).await.unwrap();
    for mv in &plan[1..] {
        assert!(mv.slots.iter().all(|s| map.slot_owner[*s as usize] == 2));
    }
    assert!(plan[0]
        .slots
        .iter()
        .all(|s| map.slot_owner[*s as usize] == 1));
    let found = read_back(&router, &keys).await;
    assert_placement(&pg, &BTreeMap::from([(2, addrs2)]), &map, &found).await;
    for n in nodes2 {
        n.shutdown().await;
    }
    pg.shutdown().await;
}
