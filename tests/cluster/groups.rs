//! Consumer groups through a router (issue 14, acceptances 1 and 4): members of one
//! `KEY_ORDERED` group share an orders workload's outbox while members die and rejoin and
//! group leaders are killed -9, and while a rebalance moves slots onto a new group; the test
//! kit's group checker (`ordo_testkit::groups::check`) then proves over every delivery and the
//! group's log: one delivery of an order in flight at a time, each order's events delivered and
//! acked in sequence, every event acked, redeliveries only of events in flight, and the group
//! caught up (describe: lag 0, nothing pending).
//!
//! The workload: `ORDERS` orders, each written `EVENTS` times by a Txn that puts `order` (the
//! order's status) and `outbox/<n>` under the order's shard key, each Txn with its own
//! idempotency key and sent again until answered, so the log holds exactly one outbox event per
//! write. The group's prefix is `outbox/`: the status puts are in the log but filtered out.
//!
//! Acks in flight when a group's leader changes may be lost (its unflushed batch, those the
//! router drops while the group has no leader), so the redelivery rule allows a redelivery of
//! an acked event around each leader change: every kill, and every term rise a poll of the
//! replicas' status sees (elections happen on a loaded machine without kills too).
//!
//! `ORDO_GROUPS_SEED` replays the kill schedule of the crash test (timings and victims' kinds;
//! which process leads then depends on the run), `ORDO_GROUPS_SECS` makes it longer (default 15).
//! The helpers here serve `groups_acks.rs` and `groups_exactly_once.rs` too.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ordo_proto::client::Client;
use ordo_proto::v1::feed_client::FeedClient;
use ordo_proto::v1::watch_request::{Start as From, StartOneOf};
use ordo_proto::v1::{
    txn_op, ChangeEvent, ConsumerGroup, CreateGroupRequest, DescribeGroupRequest, Mode, PutRequest,
    RebalanceRequest, RequestHeader, TxnOp, TxnRequest, WatchRequest,
};
use ordo_testkit::feed::{self, Watcher};
use ordo_testkit::groups::{
    self, policy, Action, CheckInput, Handler, Member, MemberOptions, Outcome, Recorder,
};
use ordo_testkit::inproc::InProcCluster;
use ordo_testkit::proc::ProcCluster;
use ordo_testkit::{bins, env_u64, wait_for, Cluster, SplitMix64};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Bound on the cluster becoming healthy, a group being created, a member joining.
pub(crate) const HEALTHY: Duration = Duration::from_secs(30);
/// Bound on a group catching up with its log once the cluster is healthy.
pub(crate) const CATCH_UP: Duration = Duration::from_secs(60);
/// Bound on one write, sent again with its key until answered.
const WRITE_WITHIN: Duration = Duration::from_secs(30);

pub(crate) const PREFIX: &str = "outbox/";

/// A Feed client of the router at `router`.
pub(crate) fn feed_client(router: &str) -> FeedClient<Channel> {
    let ch = ordo_testkit::endpoint(router)
        .unwrap()
        .timeout(Duration::from_secs(15))
        .connect_lazy();
    FeedClient::new(ch)
}

/// A data client of the router at `router`.
pub(crate) fn kv(router: &str) -> Client {
    Client::connect(vec![router.to_string()])
        .unwrap()
        .with_timeout(Duration::from_secs(10))
}

/// A `KEY_ORDERED` group over the outbox, from the oldest event.
pub(crate) fn outbox_group(name: &str, ack_wait_ms: u32, max_deliver: u32) -> CreateGroupRequest {
    group_over(name, PREFIX, ack_wait_ms, max_deliver)
}

/// A `KEY_ORDERED` group over the events of keys starting with `prefix`, from the oldest event.
pub(crate) fn group_over(
    name: &str,
    prefix: &str,
    ack_wait_ms: u32,
    max_deliver: u32,
) -> CreateGroupRequest {
    CreateGroupRequest {
        group: name.to_string(),
        key_prefix: Bytes::from(prefix.to_string()),
        from: From::FromOldest as i32,
        mode: Mode::KeyOrdered as i32,
        ack_wait_ms,
        max_deliver,
        ..CreateGroupRequest::default()
    }
}

/// Whether an admin call's error is the cluster's passing state (a leader being elected, a
/// router finding the groups), worth asking again.
fn passing(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded)
}

/// Creates the group, asking again while the cluster is not ready, within [`HEALTHY`].
pub(crate) async fn create_group(router: &str, req: CreateGroupRequest) -> ConsumerGroup {
    let what = format!("group {:?} to be created", req.group);
    wait_for(&what, HEALTHY, || {
        let (mut c, req) = (feed_client(router), req.clone());
        async move {
            match c.create_group(req).await {
                Ok(g) => Some(g.into_inner()),
                Err(s) if passing(&s) => None,
                Err(s) => panic!("CreateGroup: {s:?}"),
            }
        }
    })
    .await
}

pub(crate) async fn describe(router: &str, group: &str) -> Result<ConsumerGroup, Status> {
    let req = DescribeGroupRequest {
        group: group.to_string(),
    };
    feed_client(router)
        .describe_group(req)
        .await
        .map(|r| r.into_inner())
}

/// Waits until describe shows the group caught up (lag 0, nothing pending), within `bound`.
pub(crate) async fn wait_caught_up(router: &str, group: &str, bound: Duration) -> ConsumerGroup {
    let start = Instant::now();
    loop {
        let last = match describe(router, group).await {
            Ok(g) if g.lag_events == 0 && g.pending == 0 => return g,
            other => other,
        };
        if start.elapsed() > bound {
            let last = last.map(|g| summary(&g));
            panic!("group {group} did not catch up within {bound:?}; last describe: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A describe's sums and its slots that are not caught up.
pub(crate) fn summary(g: &ConsumerGroup) -> String {
    let behind: Vec<String> = g
        .slots
        .iter()
        .filter(|s| s.lag_events > 0 || s.pending > 0 || !s.parked.is_empty() || s.expired)
        .take(10)
        .map(|s| format!("{s:?}"))
        .collect();
    format!(
        "lag {} pending {} redeliveries {} parked {} expired {} over {} slots; behind: {behind:?}",
        g.lag_events,
        g.pending,
        g.redeliveries,
        g.parked,
        g.expired,
        g.slots.len()
    )
}

/// Every event with key prefix `prefix` committed by `settled_ms`, read with a Watch from the
/// oldest event, in (slot, seq) order.
pub(crate) async fn read_log(router: &str, prefix: &str, settled_ms: u64) -> Vec<ChangeEvent> {
    try_read_log(router, prefix, settled_ms)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// [`read_log`], or why the watch gave up (e.g. OUT_OF_RANGE: retention trimmed the oldest
/// event between the router's reading where it was and reading from there).
pub(crate) async fn try_read_log(
    router: &str,
    prefix: &str,
    settled_ms: u64,
) -> Result<Vec<ChangeEvent>, String> {
    let req = WatchRequest {
        key_prefix: Bytes::from(prefix.to_string()),
        start: Some(StartOneOf::From(From::FromOldest as i32)),
        ..WatchRequest::default()
    };
    let w = Watcher::start("the group's log", router, req, feed::Start::Midway);
    wait_for("the log's watch to resolve", CATCH_UP, || async {
        (w.resolved_ms() >= settled_ms || w.has_ended()).then_some(())
    })
    .await;
    let watch = w.stop().await.map_err(|e| e.to_string())?;
    if watch.resolved_ms() < settled_ms {
        return Err(format!("the log's watch stopped before {settled_ms}"));
    }
    let events: BTreeMap<(u32, u64), ChangeEvent> = watch
        .responses
        .into_iter()
        .flat_map(|r| r.response.events)
        .map(|e| ((e.slot, e.seq), e))
        .collect();
    Ok(events.into_values().collect())
}

/// Joins `opts` through `router`, asking again while the router cannot yet (a group leader
/// being elected), within [`HEALTHY`].
pub(crate) async fn join<H>(
    router: &str,
    opts: &MemberOptions,
    rec: &Recorder,
    handler: H,
) -> Member
where
    H: Fn() -> Box<dyn Handler>,
{
    let what = format!("member {} to join {}", opts.name, opts.group);
    wait_for(&what, HEALTHY, || {
        let (opts, handler) = (opts.clone(), handler());
        async move {
            match Member::join(router, opts, handler, rec).await {
                Ok(m) => Some(m),
                Err(s) if passing(&s) => None,
                Err(s) => panic!("join: {s:?}"),
            }
        }
    })
    .await
}

pub(crate) fn order(o: u32) -> Bytes {
    Bytes::from(format!("order-{o:03}"))
}

fn put(shard_key: &Bytes, key: String, value: String) -> TxnOp {
    TxnOp {
        op: Some(txn_op::Op::Put(PutRequest {
            shard_key: shard_key.clone(),
            key: key.into(),
            value: value.into(),
            ..PutRequest::default()
        })),
    }
}

/// Writes event `n` of order `o` (its status and `<prefix><n>`), with one idempotency key, sent
/// again until answered within [`WRITE_WITHIN`].
pub(crate) async fn write_event(c: &Client, prefix: &str, o: u32, n: u32) {
    let key = order(o);
    let req = TxnRequest {
        header: Some(RequestHeader {
            idempotency_key: Bytes::from(format!("w-{prefix}{o}-{n}-{}", std::process::id())),
            ..RequestHeader::default()
        }),
        success: vec![
            put(&key, "order".into(), format!("status-{n}")),
            put(&key, format!("{prefix}{n:04}"), format!("order-{o:03}:{n}")),
        ],
        ..TxnRequest::default()
    };
    let start = Instant::now();
    loop {
        match c.txn(req.clone()).await {
            Ok(r) => {
                assert!(r.succeeded, "an unconditional Txn");
                return;
            }
            Err(s) if start.elapsed() < WRITE_WITHIN => {
                tracing::debug!("write {o}/{n}: {s:?}; again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("write {o}/{n} not answered within {WRITE_WITHIN:?}: {s:?}"),
        }
    }
}

/// Writes `events` rounds over `orders` orders (round n writes event n of every order, eight
/// at a time), `pause` between rounds. Answers the wall-clock time the last write was answered.
pub(crate) fn start_writes(
    router: &str,
    orders: u32,
    events: u32,
    pause: Duration,
) -> tokio::task::JoinHandle<u64> {
    let c = Arc::new(kv(router));
    tokio::spawn(async move {
        for n in 1..=events {
            let mut tasks = tokio::task::JoinSet::new();
            for w in 0..8u32 {
                let c = c.clone();
                tasks.spawn(async move {
                    for o in (w..orders).step_by(8) {
                        write_event(&c, PREFIX, o, n).await;
                    }
                });
            }
            while let Some(r) = tasks.join_next().await {
                r.expect("a writer panicked");
            }
            tokio::time::sleep(pause).await;
        }
        ordo_proto::unix_ms()
    })
}

/// The log has exactly one outbox event per write: `events` per order, in order of `n`.
pub(crate) fn assert_log_is_the_writes(log: &[ChangeEvent], orders: u32, events: u32) {
    let mut per_order: BTreeMap<Bytes, Vec<Bytes>> = BTreeMap::new();
    for e in log {
        per_order
            .entry(e.shard_key.clone())
            .or_default()
            .push(e.value.clone());
    }
    assert_eq!(per_order.len(), orders as usize, "orders in the log");
    for (o, values) in per_order {
        let want: Vec<Bytes> = (1..=events)
            .map(|n| Bytes::from(format!("{}:{n}", String::from_utf8_lossy(&o))))
            .collect();
        assert_eq!(values, want, "the log's outbox events of {o:?}");
    }
}

/// Windows around every leader change of the watched groups (any term rise, a kill's or an
/// election's under load), in which acks may have been lost: from 3 s before it was seen (the
/// old leader may have been cut off that long) to 2 s after.
pub(crate) struct TermWatch {
    windows: Arc<std::sync::Mutex<Vec<(Duration, Duration)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TermWatch {
    /// Polls the status of every replica `(group, addr)` every 100 ms.
    pub(crate) fn start(replicas: Vec<(u64, String)>, rec: &Recorder) -> TermWatch {
        let windows = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (out, rec) = (windows.clone(), rec.clone());
        let task = tokio::spawn(async move {
            let mut terms: BTreeMap<u64, u64> = BTreeMap::new();
            loop {
                for (group, addr) in &replicas {
                    let Some(s) = ordo_testkit::node_status(addr, false).await else {
                        continue;
                    };
                    let seen = terms.entry(*group).or_insert(s.term);
                    if s.term > *seen {
                        *seen = s.term;
                        let at = rec.now();
                        let from = at.saturating_sub(Duration::from_secs(3));
                        out.lock()
                            .unwrap()
                            .push((from, at + Duration::from_secs(2)));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        TermWatch { windows, task }
    }

    pub(crate) fn stop(self) -> Vec<(Duration, Duration)> {
        self.task.abort();
        self.windows.lock().unwrap().clone()
    }
}

/// Every shard-group replica of `c` as `(group, addr)`.
pub(crate) fn replicas(c: &impl Cluster, groups: u64) -> Vec<(u64, String)> {
    (1..=groups)
        .flat_map(|g| c.members(g).into_iter().map(move |m| (g, m)))
        .map(|(g, m)| (g, c.addr(m)))
        .collect()
}

/// Acks every delivery after holding it `hold_ms` (a range) ms; with probability `die` the
/// member dies holding it instead.
fn acker(seed: u64, hold_ms: (u64, u64), die: f64) -> impl Fn() -> Box<dyn Handler> {
    let seeds = std::sync::atomic::AtomicU64::new(seed);
    move || {
        let mut rng = SplitMix64(seeds.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        policy(move |_| {
            let hold = rng.millis(hold_ms.0, hold_ms.1);
            let action = if rng.chance(die) {
                Action::Die
            } else {
                Action::Ack
            };
            (hold, action)
        })
    }
}

const MEMBERS: usize = 4;
const ORDERS: u32 = 32;
const EVENTS: u32 = 8;

/// Acceptance 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_share_an_ordered_group_through_member_and_leader_kills() {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let started = Instant::now();
    let seed = env_u64("ORDO_GROUPS_SEED").unwrap_or_else(|| ordo_proto::unix_ms() % 100_000);
    let run_for = Duration::from_secs(env_u64("ORDO_GROUPS_SECS").unwrap_or(15));
    eprintln!("groups seed {seed} (replay with ORDO_GROUPS_SEED={seed}); kills for {run_for:?}");
    let mut rng = SplitMix64(seed);
    let mut cluster = ProcCluster::start(bins!(), 2, 3);
    cluster.init(HEALTHY).await;
    let router = cluster.router_addr().to_string();
    create_group(&router, outbox_group("billing", 1_500, 1_000)).await;
    let rec = Recorder::new();
    // Members take their time (4 × 4 credits at ~110 ms each keep up with the writes only just),
    // so kills find deliveries in flight.
    let handlers = acker(seed, (20, 200), 0.02);
    let opts: Vec<MemberOptions> = (0..MEMBERS)
        .map(|i| MemberOptions::new("billing", &format!("billing-{i}"), 4))
        .collect();
    let mut members: Vec<Option<Member>> = Vec::new();
    for o in &opts {
        members.push(Some(join(&router, o, &rec, &handlers).await));
    }
    let terms = TermWatch::start(replicas(&cluster, 2), &rec);
    let pause = run_for / EVENTS;
    let writes = start_writes(&router, ORDERS, EVENTS, pause);
    let nemesis = Instant::now();
    let mut windows = Vec::new();
    let (mut member_kills, mut leader_kills) = (0, 0);
    while nemesis.elapsed() < run_for || !writes.is_finished() {
        tokio::time::sleep(rng.millis(500, 1_500)).await;
        // Members that died holding a delivery rejoin.
        for (i, m) in members.iter_mut().enumerate() {
            if m.as_ref().is_none_or(Member::has_ended) {
                *m = Some(join(&router, &opts[i], &rec, &handlers).await);
            }
        }
        if nemesis.elapsed() >= run_for {
            continue;
        }
        if rng.chance(0.6) {
            let i = rng.below(MEMBERS as u64) as usize;
            eprintln!("{:?}: kill member {}", rec.now(), opts[i].name);
            members[i].take().unwrap().kill().await;
            member_kills += 1;
        } else {
            let group = rng.range(1, 2);
            let Some(leader) = cluster.find_leader(group).await else {
                continue;
            };
            let at = rec.now();
            eprintln!("{at:?}: kill -9 {leader} (leader of group {group})");
            cluster.kill(leader).await;
            leader_kills += 1;
            cluster.wait_leader(group, HEALTHY).await;
            windows.push((
                at.saturating_sub(Duration::from_secs(1)),
                rec.now() + Duration::from_secs(2),
            ));
            tokio::time::sleep(rng.millis(200, 1_000)).await;
            cluster.restart(leader).await;
        }
    }
    let settled_ms = writes.await.unwrap();
    for (i, m) in members.iter_mut().enumerate() {
        if m.as_ref().is_none_or(Member::has_ended) {
            *m = Some(join(&router, &opts[i], &rec, &handlers).await);
        }
    }
    let g = wait_caught_up(&router, "billing", CATCH_UP).await;
    eprintln!("caught up: {}", summary(&g));
    let log = read_log(&router, PREFIX, settled_ms).await;
    assert_log_is_the_writes(&log, ORDERS, EVENTS);
    for m in members.into_iter().flatten() {
        m.close().await;
    }
    let mut input = CheckInput::from_recorder(&rec, log);
    let changes = terms.stop();
    eprintln!("leader changes seen: {changes:?}");
    input.loss_windows = windows.into_iter().chain(changes).collect();
    let report = groups::check(&input);
    eprintln!(
        "{member_kills} member kills, {leader_kills} leader kills, {} stream ends; {report}",
        rec.ends().len()
    );
    report.assert_ok_with(&input);
    assert!(
        member_kills + leader_kills >= 3,
        "too few kills to prove anything"
    );
    let died = input
        .deliveries
        .iter()
        .filter(|d| matches!(d.outcome, Outcome::Died { .. }))
        .count();
    assert!(
        died > 0 && report.redeliveries > 0,
        "no kill found a delivery in flight ({died} died, {} redeliveries): it proved little",
        report.redeliveries
    );
    eprintln!("took {:.1?}", started.elapsed());
}

/// Acceptance 4: members consume while a rebalance moves slots onto a new group. Acks sent
/// around a slot's cut-over may be lost (the donor no longer owns the slot when its flush
/// applies), so the rebalance is a loss window for the redelivery rule; no event may be lost,
/// none delivered out of order, none two at a time per order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_moves_with_its_slots_onto_a_new_group_losing_nothing() {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let started = Instant::now();
    let pg = InProcCluster::start(2, 3).await;
    let router = pg.router_addr();
    create_group(&router, outbox_group("delivery", 2_000, 1_000)).await;
    let rec = Recorder::new();
    let handlers = acker(7, (0, 20), 0.0);
    let mut members = Vec::new();
    for i in 0..3 {
        let o = MemberOptions::new("delivery", &format!("delivery-{i}"), 4);
        members.push(join(&router, &o, &rec, &handlers).await);
    }
    let terms = TermWatch::start(replicas(&pg, 2), &rec);
    let writes = start_writes(&router, ORDERS, EVENTS, Duration::from_millis(700));
    wait_for("some events to be handled", HEALTHY, || async {
        (rec.len() >= ORDERS as usize).then_some(())
    })
    .await;
    let cc = crate::resharding::admin(&pg);
    let (nodes3, _, _) = crate::resharding::start_and_add_group(&pg, &cc, 3).await;
    let from = rec.now().saturating_sub(Duration::from_secs(1));
    let r = cc.rebalance(RebalanceRequest::default()).await.unwrap();
    let window = (from, rec.now() + Duration::from_secs(2));
    eprintln!("rebalance: {} moves in {:?}", r.migrations.len(), window);
    assert!(!r.migrations.is_empty(), "the rebalance moved slots");
    let settled_ms = writes.await.unwrap();
    let g = wait_caught_up(&router, "delivery", CATCH_UP).await;
    eprintln!("caught up: {}", summary(&g));
    let map = cc.get_shard_map(true).await.unwrap();
    let on3 = g
        .slots
        .iter()
        .filter(|s| map.slot_owner[s.slot as usize] == 3)
        .count();
    assert!(
        on3 > 0,
        "group 3 holds the group's state of the slots it got"
    );
    assert_eq!(
        g.slots.len(),
        map.slot_count as usize,
        "every slot has the group"
    );
    let log = read_log(&router, PREFIX, settled_ms).await;
    assert_log_is_the_writes(&log, ORDERS, EVENTS);
    for m in members {
        m.close().await;
    }
    let mut input = CheckInput::from_recorder(&rec, log);
    input.loss_windows = terms.stop();
    input.loss_windows.push(window);
    let report = groups::check(&input);
    eprintln!("{report}");
    report.assert_ok_with(&input);
    for n in nodes3 {
        n.shutdown().await;
    }
    pg.shutdown().await;
    eprintln!("took {:.1?}", started.elapsed());
}
