//! Online resharding (issue 6), in-process: slots move between groups with their data while 16
//! clients keep writing and reading through the router; every history is checked linearizable
//! and every acknowledged write is read back with its version.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use ordo_config::migration::in_flight;
use ordo_config::tasks::task_running;
use ordo_proto::client::{Client, ClusterClient};
use ordo_proto::v1::{
    AddGroupRequest, Migration, MigrationState, MoveSlotsRequest, RebalanceRequest, ShardMap,
};
use ordo_testkit::feed;
use ordo_testkit::linearizability::{check, Completion, History, ItemKey, Op, Output};
use tonic::Code;

use crate::feed_moves::{self, FeedRun};

use ordo_testkit::inproc::InProcCluster;
use ordo_testkit::{node_status, wait_for, wait_for_every, Cluster, CONFIG_GROUP};

/// Clients of acceptance 1; the other tests use fewer, to leave CPU to the tests beside them.
const CLIENTS: u64 = 16;
const CLIENTS_LIGHT: u64 = 8;

/// Keys each client writes alone (its last acknowledged version is known exactly).
const PRIVATE_KEYS: u64 = 12;
/// Keys every client reads and writes (their history is what the checker is for).
const SHARED_KEYS: u64 = 24;
/// Items written before the load starts (moved by the copy, not the change log).
const PRELOAD: u64 = 1500;
/// Bound on one client's operations, so a stuck stop flag cannot loop forever.
const OPS_PER_CLIENT_MAX: u64 = 200_000;

pub(crate) fn admin(pg: &InProcCluster) -> ClusterClient {
    ClusterClient::connect(pg.config_addrs.clone())
        .unwrap()
        .with_timeout(Duration::from_secs(120))
}

/// Starts group `group` (3 replicas) and registers it, asking again while the config servers
/// refuse (a leader not elected yet); its nodes, its spec and the map that lists it.
pub(crate) async fn start_and_add_group(
    pg: &InProcCluster,
    cc: &ClusterClient,
    group: u64,
) -> (Vec<ordo::node::Node>, ordo_proto::v1::GroupSpec, ShardMap) {
    let (nodes, spec) = pg.start_extra_group(group, 3).await;
    let what = format!("group {group} to be registered");
    let map = wait_for(&what, Duration::from_secs(20), || {
        let (cc, spec) = (cc.clone(), spec.clone());
        async move {
            cc.add_group(AddGroupRequest { group: Some(spec) })
                .await
                .ok()
        }
    })
    .await;
    (nodes, spec, map)
}

async fn preload(router: &str) {
    preload_n(router, PRELOAD).await
}

/// The value preloaded item `i` holds (at version 1).
fn preload_value(i: u64) -> String {
    format!("pre {i}")
}

/// The preload's `n` puts as the feed must show them, each answered by `acked_ms`.
pub(crate) fn preloaded_writes(n: u64, acked_ms: u64) -> Vec<feed::Write> {
    (0..n)
        .map(|i| feed::Write {
            item: ItemKey::new(format!("pre-{i}"), ""),
            op: feed::WriteOp::Put {
                value: preload_value(i).into_bytes(),
            },
            outcome: feed::Outcome::Applied {
                version: 1,
                acked_ms,
            },
            txn: None,
        })
        .collect()
}

async fn preload_n(router: &str, n: u64) {
    let c = Client::connect(vec![router.to_string()])
        .unwrap()
        .with_timeout(Duration::from_secs(15));
    stream::iter(0..n)
        .map(|i| {
            let c = c.clone();
            async move {
                let r = c
                    .put(format!("pre-{i}"), "", preload_value(i), Some(0))
                    .await
                    .unwrap_or_else(|e| panic!("preload {i}: {e}"));
                assert_eq!(r.version, 1);
            }
        })
        .buffer_unordered(32)
        .collect::<()>()
        .await;
}

/// How a load ended: the keys found, every key's final read, and the history (final reads
/// included) whose writes the feed must show.
pub(crate) struct Finished {
    pub(crate) found: BTreeSet<String>,
    pub(crate) finals: BTreeMap<ItemKey, Output>,
    pub(crate) history: History,
    /// Wall clock (ms since the Unix epoch) by which every write had ended and been read back.
    pub(crate) settled_ms: u64,
}

/// 16 clients through the router, each recording into one history.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    pub(crate) history: History,
    /// Private key → last acknowledged version; keys with an unknown outcome are left out.
    acked: Arc<Mutex<BTreeMap<String, u64>>>,
    uncertain: Arc<Mutex<BTreeSet<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub(crate) fn start_load(router: &str, clients: u64) -> Load {
    let load = Load {
        stop: Default::default(),
        ops: Default::default(),
        errors: Default::default(),
        history: History::new(),
        acked: Default::default(),
        uncertain: Default::default(),
        tasks: Vec::new(),
    };
    let mut tasks = Vec::new();
    for c in 0..clients {
        let kv = Client::connect(vec![router.to_string()])
            .unwrap()
            .with_timeout(Duration::from_secs(10));
        let (stop, ops, errors, history, acked, uncertain) = (
            load.stop.clone(),
            load.ops.clone(),
            load.errors.clone(),
            load.history.clone(),
            load.acked.clone(),
            load.uncertain.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for i in 0..OPS_PER_CLIENT_MAX {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                // A fixed mix: half private writes, a quarter shared writes, a quarter reads.
                let mix = (i * 7 + c * 13) % 4;
                let value = format!("c{c}-{i}");
                let failure = if mix < 2 {
                    let sk = format!("c{c}-{}", (i * 5) % PRIVATE_KEYS);
                    let op = Op::Put {
                        value: value.clone().into_bytes(),
                        if_version: None,
                    };
                    let r = history
                        .record(
                            c,
                            ItemKey::new(sk.clone(), ""),
                            op,
                            kv.put(sk.clone(), "", value, None),
                        )
                        .await;
                    match &r {
                        Ok(p) => {
                            acked.lock().unwrap().insert(sk, p.version);
                        }
                        Err(s) if Completion::from_status(s) == Completion::Unknown => {
                            uncertain.lock().unwrap().insert(sk);
                        }
                        Err(_) => {}
                    }
                    r.err()
                } else {
                    let sk = format!("shared-{}", (i * 11 + c) % SHARED_KEYS);
                    let key = ItemKey::new(sk.clone(), "");
                    if mix == 2 {
                        let op = Op::Put {
                            value: value.clone().into_bytes(),
                            if_version: None,
                        };
                        history
                            .record(c, key, op, kv.put(sk, "", value, None))
                            .await
                            .err()
                    } else {
                        history
                            .record(c, key, Op::Get, kv.get(sk, "", false))
                            .await
                            .err()
                    }
                };
                if let Some(s) = failure {
                    errors.lock().unwrap().push(format!(
                        "client {c} op {i}: {:?} {}",
                        s.code(),
                        s.message()
                    ));
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    Load { tasks, ..load }
}

impl Load {
    pub(crate) async fn wait_ops(&self, more: u64, what: &str) {
        let target = self.ops.load(Ordering::Relaxed) + more;
        let ops = self.ops.clone();
        wait_for(what, Duration::from_secs(60), || {
            let n = ops.load(Ordering::Relaxed);
            async move { (n >= target).then_some(()) }
        })
        .await;
    }

    /// Stops the clients, reads every key back through the router (recorded in the history),
    /// checks the history and the private keys' versions.
    async fn finish(self, router: &str) -> Finished {
        self.finish_with(router, PRELOAD, false).await
    }

    /// `finish` for `preloaded` items; with `errors_allowed`, client errors (a killed leader
    /// leaves writes with unknown outcomes) are counted but not failed on.
    pub(crate) async fn finish_with(
        self,
        router: &str,
        preloaded: u64,
        errors_allowed: bool,
    ) -> Finished {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("clients stop")
                .unwrap();
        }
        let ops = self.ops.load(Ordering::Relaxed);
        let errors = self.errors.lock().unwrap().clone();
        eprintln!("load: {ops} operations, {} errors", errors.len());
        for e in errors.iter().take(5) {
            eprintln!("  {e}");
        }
        // Even where errors are allowed (a killed leader leaves outcomes unknown), a moving
        // slot must only ever cost latency.
        assert!(
            !errors.iter().any(|e| e.contains("moving")),
            "a client saw a moving slot: {errors:?}"
        );
        assert!(
            errors_allowed || errors.is_empty(),
            "clients saw errors (a move should cost latency only): {:?}",
            &errors[..errors.len().min(10)]
        );
        let kv = Client::connect(vec![router.to_string()])
            .unwrap()
            .with_timeout(Duration::from_secs(15));
        let keys: Vec<String> = (0..CLIENTS)
            .flat_map(|c| (0..PRIVATE_KEYS).map(move |k| format!("c{c}-{k}")))
            .chain((0..SHARED_KEYS).map(|k| format!("shared-{k}")))
            .collect();
        let mut found = BTreeSet::new();
        let mut finals = BTreeMap::new();
        for sk in &keys {
            let r = self
                .history
                .record(
                    999,
                    ItemKey::new(sk.clone(), ""),
                    Op::Get,
                    kv.get(sk.clone(), "", false),
                )
                .await
                .unwrap_or_else(|e| panic!("final read of {sk}: {e}"));
            if r.found {
                found.insert(sk.clone());
            }
            finals.insert(ItemKey::new(sk.clone(), ""), Output::from(&r));
            if let Some(v) = self.acked.lock().unwrap().get(sk) {
                if !self.uncertain.lock().unwrap().contains(sk) {
                    assert_eq!(r.version, *v, "{sk}: last acknowledged version");
                }
            }
        }
        for i in 0..preloaded {
            let sk = format!("pre-{i}");
            let r = kv.get(sk.clone(), "", false).await.unwrap();
            assert!(
                r.found && r.version == 1 && r.value.as_ref() == preload_value(i).as_bytes(),
                "{sk} reads back as written: {r:?}"
            );
            finals.insert(ItemKey::new(sk.clone(), ""), Output::from(&r));
            found.insert(sk);
        }
        let settled_ms = ordo_proto::unix_ms();
        let verdict = check(&self.history);
        verdict.assert_linearizable();
        Finished {
            found,
            finals,
            history: self.history,
            settled_ms,
        }
    }
}

/// Every replica of every group holds exactly the found keys whose slots its group owns: moved
/// data is on its recipient, and donors kept none of it.
pub(crate) async fn assert_placement(
    pg: &InProcCluster,
    extra: &BTreeMap<u64, Vec<String>>,
    map: &ShardMap,
    found: &BTreeSet<String>,
) {
    let mut want: BTreeMap<u64, u64> = map.groups.iter().map(|g| (g.id, 0)).collect();
    for sk in found {
        let slot = ordo_proto::slot_of(sk.as_bytes(), map.slot_count);
        *want.entry(map.slot_owner[slot as usize]).or_default() += 1;
    }
    let mut addrs: BTreeMap<u64, Vec<String>> = pg
        .groups
        .iter()
        .map(|(g, nodes)| (*g, nodes.iter().map(|n| n.addr.to_string()).collect()))
        .collect();
    addrs.extend(extra.clone());
    for (g, replicas) in addrs {
        let expect = want.get(&g).copied().unwrap_or(0);
        for addr in replicas {
            wait_for(
                &format!("group {g} replica {addr} to hold exactly {expect} items"),
                Duration::from_secs(15),
                || {
                    let addr = addr.clone();
                    async move {
                        let s = node_status(&addr, true).await?;
                        (s.items == expect).then_some(())
                    }
                },
            )
            .await;
        }
    }
    eprintln!("items per group: {want:?}");
}

pub(crate) fn slot_counts(map: &ShardMap) -> BTreeMap<u64, usize> {
    let mut c: BTreeMap<u64, usize> = map.groups.iter().map(|g| (g.id, 0)).collect();
    for g in &map.slot_owner {
        *c.entry(*g).or_default() += 1;
    }
    c
}

pub(crate) fn print_moves(migrations: &[ordo_proto::v1::Migration]) {
    for m in migrations {
        eprintln!(
            "migration {}: {} slots {}→{}, {} items + {} log records copied, pause {} ms, {} cleaned, state {}",
            m.id,
            m.slots.len(),
            m.from_group,
            m.to_group,
            m.items_copied,
            m.log_records,
            m.pause_ms,
            m.items_cleaned,
            ordo_config::migration::state_name(m.state)
        );
    }
}

/// Acceptance 1: under 16 clients, add a 4th group and rebalance onto it. A watcher from the
/// oldest event runs throughout (issue 13, acceptance 2, `feed_moves::FeedRun`): every
/// acknowledged write once, per slot the seqs contiguous across the moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adding_a_group_and_rebalancing_under_load_loses_nothing() {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let started = Instant::now();
    let pg = InProcCluster::start(3, 3).await;
    let router = pg.router_addr();
    let feed = FeedRun::start("through a rebalance onto group 4", &router).await;
    preload(&router).await;
    let preloaded = preloaded_writes(PRELOAD, ordo_proto::unix_ms());
    let load = start_load(&router, CLIENTS);
    load.wait_ops(300, "the load to get going").await;

    let cc = admin(&pg);
    let (nodes4, spec, map) = start_and_add_group(&pg, &cc, 4).await;
    let addrs4 = spec.addrs;
    let plan = cc
        .rebalance(RebalanceRequest {
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(plan.migrations.is_empty(), "a dry run moves nothing");
    assert_eq!(plan.map.as_ref().unwrap().version, map.version);
    let r = cc.rebalance(RebalanceRequest::default()).await.unwrap();
    print_moves(&r.migrations);
    // Every planned move ended in one finished migration. A config leader change mid-move
    // aborts the migration in flight and the new leader's runner starts that move again; the
    // task lists every migration it started (`Task.migrations`), so aborted attempts may be
    // listed too, each of them retried.
    let done = |m: &&Migration| m.state == MigrationState::Done as i32;
    for mv in &plan.plan {
        let finished = r.migrations.iter().filter(done).filter(|m| {
            (m.from_group, m.to_group, &m.slots) == (mv.from_group, mv.to_group, &mv.slots)
        });
        assert_eq!(finished.count(), 1, "planned move {mv:?}");
    }
    assert_eq!(r.migrations.iter().filter(done).count(), plan.plan.len());
    assert!(r.migrations.iter().all(|m| {
        m.state == MigrationState::Done as i32 || m.state == MigrationState::Aborted as i32
    }));
    load.wait_ops(300, "the load to go on after the moves")
        .await;
    let finished = load.finish(&router).await;
    feed.check(&finished, preloaded).await;

    let map = cc.get_shard_map(true).await.unwrap();
    assert_eq!(
        slot_counts(&map).values().copied().collect::<Vec<_>>(),
        vec![1024; 4],
        "slots spread evenly"
    );
    assert_placement(&pg, &BTreeMap::from([(4, addrs4)]), &map, &finished.found).await;
    for n in nodes4 {
        n.shutdown().await;
    }
    pg.shutdown().await;
    eprintln!("took {:.1?}", started.elapsed());
}

/// Acceptance 3: under 16 clients, drain a group, then remove it. The feed loses no retained
/// event (issue 13, acceptance 2): a watcher that ran throughout, and a second one from the
/// oldest event after the removal, each deliver every write ever made exactly once, the same
/// events at the same slot and seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_and_removing_a_group_under_load_loses_nothing() {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let pg = InProcCluster::start(3, 3).await;
    let router = pg.router_addr();
    let feed = FeedRun::start("through the drain", &router).await;
    preload(&router).await;
    let preloaded = preloaded_writes(PRELOAD, ordo_proto::unix_ms());
    let load = start_load(&router, CLIENTS_LIGHT);
    load.wait_ops(300, "the load to get going").await;
    let cc = admin(&pg);
    let err = cc.remove_group(2).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let r = cc
        .rebalance(RebalanceRequest {
            drain_group: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    print_moves(&r.migrations);
    let map = cc.remove_group(2).await.expect("a drained group can go");
    assert!(map.groups.iter().all(|g| g.id != 2));
    load.wait_ops(300, "the load to go on after the drain")
        .await;
    let finished = load.finish(&router).await;
    let found = &finished.found;
    let (during, expected) = feed.check(&finished, preloaded).await;
    let after = FeedRun::start("from the oldest after the removal", &router)
        .await
        .stop_at(finished.settled_ms)
        .await;
    feed_moves::assert_complete(&expected, &after);
    feed_moves::assert_same_events(&during, &after);
    let map = cc.get_shard_map(true).await.unwrap();
    assert_eq!(
        slot_counts(&map).values().copied().collect::<Vec<_>>(),
        vec![2048; 2]
    );
    // Group 2 is out of the map: its replicas must hold nothing.
    let mut extra = BTreeMap::new();
    extra.insert(
        2,
        pg.groups[&2].iter().map(|n| n.addr.to_string()).collect(),
    );
    assert_placement(&pg, &extra, &map, found).await;
    pg.shutdown().await;
}

/// Acceptance 4: bad requests are refused with clear errors and change nothing; an abort before
/// the commit leaves the donor the owner with all its data and the recipient without the copy.
/// It leaves the feed unchanged too (issue 13, acceptance 2): a watcher that ran through the
/// move and one from the oldest event after the abort deliver the same events at the same slot
/// and seq, the preload's and nothing else (the copy and its cleanup emit nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
// A list of refusals around one in-flight move, which the abort then ends: one story.
#[allow(clippy::too_many_lines)]
async fn bad_moves_are_refused_and_an_abort_changes_nothing() {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let pg = InProcCluster::start(2, 3).await;
    let router = pg.router_addr();
    let feed = FeedRun::start("through the aborted move", &router).await;
    preload(&router).await;
    let preloaded = preloaded_writes(PRELOAD, ordo_proto::unix_ms());
    let cc = admin(&pg);
    let before = cc.get_shard_map(true).await.unwrap();
    let owned_by = |g: u64| -> Vec<u32> {
        (0..before.slot_count)
            .filter(|s| before.slot_owner[*s as usize] == g)
            .collect()
    };
    let expect = |r: Result<ShardMap, tonic::Status>, code: Code, needle: &str| {
        let e = r.expect_err(needle);
        assert_eq!(e.code(), code, "{e:?}");
        assert!(
            e.message().contains(needle),
            "{needle:?} not in {:?}",
            e.message()
        );
    };
    expect(
        cc.move_slots(owned_by(1)[..3].to_vec(), 1).await,
        Code::FailedPrecondition,
        "already owns",
    );
    expect(
        cc.move_slots(vec![0], 9).await,
        Code::FailedPrecondition,
        "not in the map",
    );
    expect(
        cc.move_slots(vec![before.slot_count + 5], 2).await,
        Code::InvalidArgument,
        "out of range",
    );
    expect(
        cc.remove_group(1).await,
        Code::FailedPrecondition,
        "still owns",
    );

    // A slow move (a tiny copy bandwidth), so that it is surely in flight for what follows.
    let slow: Vec<u32> = owned_by(1)[..256].to_vec();
    let mover = {
        let cc = cc.clone();
        let req = MoveSlotsRequest {
            slots: slow.clone(),
            to_group: 2,
            copy_bytes_per_sec: 2_000,
        };
        tokio::spawn(async move { cc.move_slots_with(req).await })
    };
    let id = wait_for(
        "the slow move to be copying",
        Duration::from_secs(20),
        || {
            let cc = cc.clone();
            async move {
                let list = cc.list_migrations().await.ok()?;
                list.migrations
                    .iter()
                    .find(|m| m.state == MigrationState::Copying as i32 && m.items_copied > 0)
                    .map(|m| m.id)
            }
        },
    )
    .await;
    expect(
        cc.move_slots(slow[10..20].to_vec(), 2).await,
        Code::FailedPrecondition,
        &format!("already moving in migration {id}"),
    );
    expect(
        cc.remove_group(2).await,
        Code::FailedPrecondition,
        &format!("migration {id}"),
    );
    let m = cc.abort_migration(id).await.unwrap();
    assert!(m.abort_requested);
    let moved = tokio::time::timeout(Duration::from_secs(30), mover)
        .await
        .expect("the aborted move answers")
        .unwrap();
    expect(moved, Code::Aborted, "aborted on request");
    let list = cc.list_migrations().await.unwrap();
    let m = list.migrations.iter().find(|m| m.id == id).unwrap();
    assert_eq!(m.state, MigrationState::Aborted as i32, "{m:?}");
    let e = cc.abort_migration(id).await.unwrap_err();
    assert!(e.message().contains("can no longer be aborted"), "{e:?}");

    let after = cc.get_shard_map(true).await.unwrap();
    assert_eq!(after.version, before.version, "nothing was committed");
    assert_eq!(after.slot_owner, before.slot_owner);
    let found: BTreeSet<String> = (0..PRELOAD).map(|i| format!("pre-{i}")).collect();
    let kv = Client::connect(vec![router.clone()]).unwrap();
    for sk in &found {
        let r = kv.get(sk.clone(), "", false).await.unwrap();
        assert!(r.found && r.version == 1, "{sk}");
    }
    let aborted = feed::Expected {
        writes: preloaded,
        final_data: (0..PRELOAD)
            .map(|i| {
                let item = ItemKey::new(format!("pre-{i}"), "");
                (item, Some((preload_value(i).into_bytes(), 1)))
            })
            .collect(),
        settled_ms: ordo_proto::unix_ms(),
    };
    let through = feed.stop_at(aborted.settled_ms).await;
    let after_abort = FeedRun::start("from the oldest after the abort", &router)
        .await
        .stop_at(aborted.settled_ms)
        .await;
    feed_moves::assert_complete(&aborted, &through);
    feed_moves::assert_complete(&aborted, &after_abort);
    feed_moves::assert_same_events(&through, &after_abort);
    // The donor serves the slots again: writes go through.
    kv.put("pre-0", "", "after the abort", Some(1))
        .await
        .unwrap();
    assert_placement(&pg, &BTreeMap::new(), &after, &found).await;
    pg.shutdown().await;
}

/// Which replica a kill test stops, and when.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kill {
    DonorLeaderDuringCopy,
    RecipientLeaderDuringCatchUp,
    MetaLeaderInCriticalSection,
}

/// Items preloaded by the kill tests (few: their moves are throttled to open a window).
const KILL_PRELOAD: u64 = 600;
/// The kill tests' copy bandwidth: group 1's preloaded items take about 2 s to copy, and the
/// change log a few pages, so the kill lands inside the phase it is meant for. (Every keyed
/// write also leaves a dedup entry of about 100 bytes in its slot, which the move copies too:
/// several times the bytes of these small items.)
const KILL_COPY_BYTES_PER_SEC: u64 = 32 * 1024;
/// The config-leader scenario's: it catches the critical section by polling, not by a slow copy,
/// and the move its new leader starts again copies everything again, change log included (each
/// put is also an event there), so at the kill tests' bandwidth that alone could outlast the
/// scenario's bound on a loaded machine.
const KILL_META_COPY_BYTES_PER_SEC: u64 = 8 * KILL_COPY_BYTES_PER_SEC;

/// The migration records as one config replica has applied them (a local read: tests poll it
/// every millisecond without loading the config leader).
fn local_migrations(node: &ordo::node::Node) -> ordo_proto::v1::MigrationList {
    use prost::Message as _;
    match node
        .replica
        .sm
        .get(b"__ordo_cluster", b"migrations")
        .unwrap()
    {
        Some((_, raw)) => ordo_proto::v1::MigrationList::decode(raw).unwrap(),
        None => Default::default(),
    }
}

/// Moves all of group 1's slots to group 2 under load and stops one leader at the chosen
/// moment. The move completes or aborts; nothing acknowledged is lost; the groups' ownership
/// matches the final map (one owner per slot) and every live replica holds exactly its group's
/// data. A watcher from the oldest event runs throughout (issue 13, acceptance 2,
/// `feed_moves::FeedRun`): per slot the seqs contiguous, every acknowledged write once, an
/// unknown one at most once.
async fn move_with_a_kill(kill: Kill) {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let mut pg = InProcCluster::start(2, 3).await;
    let router = pg.router_addr();
    let feed = FeedRun::start(&format!("through a move, {kill:?} stopped"), &router).await;
    preload_n(&router, KILL_PRELOAD).await;
    let preloaded = preloaded_writes(KILL_PRELOAD, ordo_proto::unix_ms());
    let load = start_load(&router, CLIENTS_LIGHT);
    load.wait_ops(200, "the load to get going").await;
    let cc = admin(&pg);
    let before = cc.get_shard_map(true).await.unwrap();
    let slots: Vec<u32> = (0..before.slot_count)
        .filter(|s| before.slot_owner[*s as usize] == 1)
        .collect();
    let mover = {
        let cc = cc.clone();
        let req = MoveSlotsRequest {
            slots,
            to_group: 2,
            copy_bytes_per_sec: match kill {
                Kill::MetaLeaderInCriticalSection => KILL_META_COPY_BYTES_PER_SEC,
                _ => KILL_COPY_BYTES_PER_SEC,
            },
        };
        tokio::spawn(async move { cc.move_slots_with(req).await })
    };
    stop_a_leader(kill, &mut pg, &cc).await;
    // The request may fail (its config server stopped, or the move aborted); either way every
    // migration must reach an end.
    let answer = tokio::time::timeout(Duration::from_secs(90), mover)
        .await
        .expect("the move answers")
        .unwrap();
    eprintln!("move answered: {:?}", answer.as_ref().map(|m| m.version));
    // The task ends after its migrations: a move a config leader change aborted is started
    // again by the new leader.
    let list = wait_for(
        "every task and migration to end",
        Duration::from_secs(60),
        || {
            let cc = cc.clone();
            async move {
                let list = cc.list_migrations().await.ok()?;
                let tasks_over = list.tasks.iter().all(|t| !task_running(t));
                let moves_over = list.migrations.iter().all(|m| !in_flight(m));
                (tasks_over && moves_over).then_some(list)
            }
        },
    )
    .await;
    print_moves(&list.migrations);
    assert!(list.migrations.iter().all(|m| {
        m.state == MigrationState::Done as i32 || m.state == MigrationState::Aborted as i32
    }));
    load.wait_ops(200, "the load to go on after the move").await;
    let finished = load.finish_with(&router, KILL_PRELOAD, true).await;
    feed.check(&finished, preloaded).await;
    let map = cc.get_shard_map(true).await.unwrap();
    // One owner per slot: each group's replicated ownership is exactly its share of the map.
    let counts = slot_counts(&map);
    for (g, nodes) in &pg.groups {
        for n in nodes {
            let addr = n.addr.to_string();
            let want = counts.get(g).copied().unwrap_or(0) as u32;
            wait_for(
                &format!("group {g} replica {addr} to own {want} slots"),
                Duration::from_secs(10),
                || {
                    let addr = addr.clone();
                    async move {
                        let s = node_status(&addr, false).await?;
                        (s.owned_slots == want && s.map_version <= map.version + 1).then_some(())
                    }
                },
            )
            .await;
        }
    }
    assert_placement(&pg, &BTreeMap::new(), &map, &finished.found).await;
    pg.shutdown().await;
}

/// Stops the leader `kill` names once the move is in the phase it names.
async fn stop_a_leader(kill: Kill, pg: &mut InProcCluster, cc: &ClusterClient) {
    match kill {
        Kill::DonorLeaderDuringCopy | Kill::RecipientLeaderDuringCatchUp => {
            let (group, what) = match kill {
                Kill::DonorLeaderDuringCopy => (1, "the copy to be under way"),
                _ => (2, "the catch-up to be under way"),
            };
            wait_for(what, Duration::from_secs(30), || {
                let cc = cc.clone();
                async move {
                    let list = cc.list_migrations().await.ok()?;
                    let m = list.migrations.first()?;
                    let copying = m.state == MigrationState::Copying as i32;
                    let ready = match kill {
                        Kill::DonorLeaderDuringCopy => m.items_copied > 0,
                        _ => m.log_records > 0,
                    };
                    assert!(
                        m.state <= MigrationState::Copying as i32,
                        "the move left the phase before the kill: {m:?}"
                    );
                    (copying && ready).then_some(())
                }
            })
            .await;
            let victim = pg.wait_leader(group, Duration::from_secs(10)).await;
            eprintln!("stopping group {group}'s leader {}", pg.addr(victim));
            pg.kill(victim).await;
        }
        Kill::MetaLeaderInCriticalSection => {
            let victim = pg.wait_leader(CONFIG_GROUP, Duration::from_secs(10)).await;
            let node = pg.node(victim).expect("the config leader runs");
            // Polled every millisecond: the fenced window is short.
            wait_for_every(
                "the move to reach its critical section",
                Duration::from_secs(30),
                Duration::from_millis(1),
                || {
                    let list = local_migrations(node);
                    let fenced = match list.migrations.first().map(|m| m.state) {
                        Some(s) if s == MigrationState::Fenced as i32 => Some(()),
                        Some(s) if s > MigrationState::Fenced as i32 => {
                            panic!("the move passed its critical section before the kill: {list:?}")
                        }
                        _ => None,
                    };
                    async move { fenced }
                },
            )
            .await;
            eprintln!(
                "stopping the config leader {} in the critical section",
                pg.addr(victim)
            );
            pg.kill(victim).await;
        }
    }
}

/// Acceptance 2a.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_donor_leader_killed_during_the_copy_loses_nothing() {
    move_with_a_kill(Kill::DonorLeaderDuringCopy).await;
}

/// Acceptance 2b.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recipient_leader_killed_during_the_catch_up_loses_nothing() {
    move_with_a_kill(Kill::RecipientLeaderDuringCatchUp).await;
}

/// Acceptance 2c.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_meta_leader_killed_in_the_critical_section_loses_nothing() {
    move_with_a_kill(Kill::MetaLeaderInCriticalSection).await;
}
