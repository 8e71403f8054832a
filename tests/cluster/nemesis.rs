//! Process-level nemesis: a real cluster (3 config servers, 2 groups × 3 nodes, one router, all
//! separate `ordo` processes) under load from 8 clients while random processes, leaders and meta
//! replicas included, are killed with SIGKILL and restarted. Afterwards every item is read
//! linearizably and the whole history is checked: linearizable, and nothing acknowledged lost.
//!
//! Writes are keyed (M9): the history's writes by the router, which retries an attempt whose
//! outcome is unknown with the key, and each client's own counter (a share of its operations)
//! by the client, which sends a put again with its key until it is answered. The run counts
//! "outcome unknown" answers to writes whose deadline was not spent (there must be none) and
//! double applications (a counter's versions must match its puts exactly: there must be none).
//!
//! The same run has a `Feed.Watch` from the oldest event through the router throughout, checked
//! with the test kit's feed checker (issue 13): every acknowledged write once, per item in version
//! order, per slot with no gap, unknown writes at most once and as the data says, the watermark,
//! and a second watch from a cursor halfway through giving exactly the rest.
//!
//! `ORDO_NEMESIS_SEED` replays a kill schedule (the seed is printed: the timings and the kinds
//! of victim; which process leads at that moment depends on the run); `ORDO_NEMESIS_SECS` makes
//! the run longer (default 60 s).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ordo_proto::v1::kv_client::KvClient;
use ordo_proto::v1::watch_request::{Start as From, StartOneOf};
use ordo_proto::v1::{
    Consistency, DeleteRequest, GetRequest, PutRequest, RequestHeader, ShardMap, WatchRequest,
};
use ordo_testkit::feed::{self, Watcher};
use ordo_testkit::linearizability::{check, Completion, History, ItemKey, Op, Output, Record};
use tonic::transport::Channel;
use tonic::{Request, Status};

use ordo_testkit::proc::ProcCluster;
use ordo_testkit::{bins, env_u64, wait_for, Cluster, SplitMix64, CONFIG_GROUP};

const GROUPS: u64 = 2;
const REPLICAS: u64 = 3;
const CLIENTS: u64 = 8;
/// Items per group: few, so that clients contend on them.
const ITEMS_PER_GROUP: usize = 10;
/// Deadline the router gets for one request; the client waits a little longer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const MIN_KILLS: usize = 10;
/// An answer this close to the deadline came once the deadline was spent: the router keeps a
/// 50 ms margin and gives up when its next backoff (at most 250 ms) would not fit.
const DEADLINE_SLACK: Duration = Duration::from_millis(400);
/// Percent of a client's operations that are puts to its own counter.
const COUNTER_SHARE: u64 = 20;
/// Most times a client sends one counter put (with its key) before the run fails.
const COUNTER_TRIES_MAX: u32 = 100;
/// Bound on every wait for the cluster to become healthy.
const HEALTHY: Duration = Duration::from_secs(30);
/// Bound on a watcher's catching up with the end of the run once the cluster is healthy.
pub(crate) const FEED_CATCH_UP: Duration = Duration::from_secs(30);

/// One item of the workload and the group that owns it.
#[derive(Clone)]
struct Item {
    key: ItemKey,
    group: u64,
}

fn items(map: &ShardMap) -> Vec<Item> {
    let mut per_group: BTreeMap<u64, Vec<Item>> = BTreeMap::new();
    for i in 0.. {
        let sk = format!("order-{i}");
        let group = map.slot_owner[ordo_proto::slot_of(sk.as_bytes(), map.slot_count) as usize];
        let list = per_group.entry(group).or_default();
        if list.len() < ITEMS_PER_GROUP {
            list.push(Item {
                key: ItemKey::new(sk, ""),
                group,
            });
        }
        if per_group.len() as u64 == GROUPS
            && per_group.values().all(|l| l.len() == ITEMS_PER_GROUP)
        {
            break;
        }
    }
    per_group.into_values().flatten().collect()
}

/// What the clients observed, besides the history.
#[derive(Default)]
struct Observed {
    /// Return times (history clock) of writes the cluster answered, per group.
    write_oks: Mutex<BTreeMap<u64, Vec<Duration>>>,
    /// Writes acknowledged as applied (`succeeded`).
    acked: AtomicU64,
    /// Errors the clients got, by code and message (digits blanked so that they group).
    errors: Mutex<BTreeMap<String, u64>>,
    /// "Outcome unknown" answers to writes whose deadline was not spent (must stay 0), and to
    /// writes whose deadline was spent.
    unknown_early: AtomicU64,
    unknown_spent: AtomicU64,
    /// Counter puts answered, and the versions they answered off the count: above it is a
    /// double application, below it a lost one.
    counter_puts: AtomicU64,
    double_applied: AtomicU64,
    lost_applied: AtomicU64,
    /// Every counter put answered, as the feed must show it.
    counter_writes: Mutex<Vec<feed::Write>>,
}

impl Observed {
    fn error(&self, is_write: bool, status: &Status) {
        let what = if is_write { "write" } else { "read" };
        let message: String = status
            .message()
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .take(160)
            .collect();
        let key = format!("{what} {:?}: {message}", status.code());
        *self.errors.lock().unwrap().entry(key).or_default() += 1;
    }

    /// A write's error after `took`: counted as an unknown outcome, early or once its deadline
    /// was spent.
    fn write_error(&self, status: &Status, took: Duration) {
        self.error(true, status);
        if Completion::from_status(status) == Completion::Unknown {
            if took + DEADLINE_SLACK < REQUEST_TIMEOUT {
                self.unknown_early.fetch_add(1, Ordering::Relaxed);
                eprintln!("EARLY outcome unknown after {took:.2?}: {status:?}");
            } else {
                self.unknown_spent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn counter_key(client: u64) -> Bytes {
    Bytes::from(format!("counter-{client}"))
}

/// Put number `n` (from 1) to `client`'s counter, keyed, sent again with its key until it is
/// answered; checks that it answers version `n`: each put applied exactly once.
async fn counter_put(kv: &mut KvClient<Channel>, client: u64, n: u64, observed: &Observed) {
    let req = PutRequest {
        header: Some(RequestHeader {
            map_version: 0,
            idempotency_key: Bytes::from(format!("counter-{client}-{n}")),
        }),
        shard_key: counter_key(client),
        key: Bytes::new(),
        value: Bytes::from(n.to_string()),
        if_version: None,
    };
    for _ in 0..COUNTER_TRIES_MAX {
        let started = Instant::now();
        let sent = kv.put(timed(req.clone()));
        let status =
            match tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(1), sent).await {
                Ok(Ok(resp)) => {
                    let version = resp.into_inner().version;
                    observed.counter_puts.fetch_add(1, Ordering::Relaxed);
                    observed.counter_writes.lock().unwrap().push(feed::Write {
                        item: ItemKey::new(counter_key(client).to_vec(), ""),
                        op: feed::WriteOp::Put {
                            value: req.value.to_vec(),
                        },
                        outcome: feed::Outcome::Applied {
                            version,
                            acked_ms: ordo_proto::unix_ms(),
                        },
                        txn: None,
                    });
                    if version > n {
                        observed
                            .double_applied
                            .fetch_add(version - n, Ordering::Relaxed);
                    } else if version < n {
                        observed
                            .lost_applied
                            .fetch_add(n - version, Ordering::Relaxed);
                    }
                    return;
                }
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded("client-side timeout"),
            };
        observed.write_error(&status, started.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("counter put {n} of client {client} was never answered in {COUNTER_TRIES_MAX} tries");
}

#[derive(Clone, Copy)]
enum Kind {
    Get,
    CasPut,
    Put,
    Delete,
    CasDelete,
}

fn kv_client(router: &str) -> KvClient<Channel> {
    KvClient::new(ordo_testkit::endpoint(router).unwrap().connect_lazy())
}

fn timed<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(REQUEST_TIMEOUT);
    r
}

/// One request, recorded in `history`. Completes with `Fail` only for errors that prove nothing
/// was applied; a timeout or any other error is `Unknown`.
async fn run_op(
    kv: &mut KvClient<Channel>,
    history: &History,
    client: u64,
    item: &Item,
    op: Op,
) -> Result<Output, Status> {
    let id = history.invoke(client, item.key.clone(), op.clone());
    let sk = Bytes::from(item.key.shard_key.clone());
    let key = Bytes::from(item.key.key.clone());
    let call = async {
        match &op {
            Op::Get => kv
                .get(timed(GetRequest {
                    header: None,
                    shard_key: sk,
                    key,
                    consistency: Consistency::Linearizable as i32,
                }))
                .await
                .map(|r| Output::from(r.get_ref())),
            Op::Put { value, if_version } => kv
                .put(timed(PutRequest {
                    header: None,
                    shard_key: sk,
                    key,
                    value: Bytes::from(value.clone()),
                    if_version: *if_version,
                }))
                .await
                .map(|r| Output::from(r.get_ref())),
            Op::Delete { if_version } => kv
                .delete(timed(DeleteRequest {
                    header: None,
                    shard_key: sk,
                    key,
                    if_version: *if_version,
                }))
                .await
                .map(|r| Output::from(r.get_ref())),
        }
    };
    let result = match tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(1), call).await {
        Ok(r) => r,
        Err(_) => Err(Status::deadline_exceeded("client-side timeout")),
    };
    history.complete(
        id,
        match &result {
            Ok(out) => Completion::Ok(out.clone()),
            Err(status) => Completion::from_status(status),
        },
    );
    result
}

async fn client_loop(
    client: u64,
    router: String,
    items: Arc<Vec<Item>>,
    history: History,
    observed: Arc<Observed>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> u64 {
    let mut rng = SplitMix64(seed ^ (client.wrapping_mul(0x5851_F42D_4C95_7F2D)));
    let mut counter = 0;
    let mut kv = kv_client(&router);
    // The last version this client saw per item (0 = absent or never seen).
    let mut seen: HashMap<usize, u64> = HashMap::new();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if rng.below(100) < COUNTER_SHARE {
            counter += 1;
            counter_put(&mut kv, client, counter, &observed).await;
            continue;
        }
        let i = rng.below(items.len() as u64) as usize;
        let item = &items[i];
        let last = seen.get(&i).copied().unwrap_or(0);
        let kind = match rng.below(100) {
            0..=34 => Kind::Get,
            35..=64 => Kind::CasPut,
            65..=89 => Kind::Put,
            90..=94 => Kind::Delete,
            _ => Kind::CasDelete,
        };
        seq += 1;
        let value = format!("c{client}-{seq}").into_bytes();
        let op = match kind {
            Kind::Get => Op::Get,
            Kind::CasPut => Op::Put {
                value,
                if_version: Some(last),
            },
            Kind::Put => Op::Put {
                value,
                if_version: None,
            },
            Kind::Delete => Op::Delete { if_version: None },
            Kind::CasDelete => Op::Delete {
                if_version: Some(last),
            },
        };
        let is_write = !matches!(op, Op::Get);
        let started = Instant::now();
        match run_op(&mut kv, &history, client, item, op).await {
            Ok(out) => {
                if is_write {
                    observed
                        .write_oks
                        .lock()
                        .unwrap()
                        .entry(item.group)
                        .or_default()
                        .push(history.now());
                }
                match out {
                    Output::Get { found, version, .. } => {
                        seen.insert(i, if found { version } else { 0 });
                    }
                    Output::Put { succeeded, version } => {
                        seen.insert(i, version);
                        if succeeded {
                            observed.acked.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Output::Delete {
                        succeeded,
                        prev_version,
                        ..
                    } => {
                        if succeeded {
                            observed.acked.fetch_add(1, Ordering::Relaxed);
                            seen.insert(i, 0);
                        } else if let Some(v) = prev_version {
                            seen.insert(i, v);
                        }
                    }
                }
            }
            Err(status) => {
                if is_write {
                    observed.write_error(&status, started.elapsed());
                } else {
                    observed.error(false, &status);
                }
                // The cluster is busy failing over: do not spin.
                tokio::time::sleep(Duration::from_millis(20)).await
            }
        }
    }
    counter
}

/// A kill the nemesis made.
struct Kill {
    at: Duration,
    group: u64,
    target: &'static str,
    name: String,
}

/// The longest gap between answered writes of `group` from the last one before `from` to `to`.
fn longest_gap(oks: &[Duration], from: Duration, to: Duration) -> Duration {
    let start = oks
        .iter()
        .copied()
        .filter(|&t| t <= from)
        .max()
        .unwrap_or(from);
    let mut prev = start;
    let mut longest = Duration::ZERO;
    for &t in oks.iter().filter(|&&t| t > from && t <= to) {
        longest = longest.max(t - prev);
        prev = t;
    }
    // No answered write until `to`: the group was unavailable for the whole window.
    longest.max(to.saturating_sub(prev))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// For each item whose last write was acknowledged and cannot have been overtaken (every other
/// write of the item is known and returned before it was sent), the final read must show exactly
/// that write's effect. Returns how many items were checked this way.
fn check_last_acknowledged(records: &[Record], finals: &BTreeMap<ItemKey, Output>) -> usize {
    let mut by_key: BTreeMap<&ItemKey, Vec<&Record>> = BTreeMap::new();
    for r in records {
        if !matches!(r.op, Op::Get) && r.completion != Some(Completion::Fail) {
            by_key.entry(&r.key).or_default().push(r);
        }
    }
    let mut checked = 0;
    for (key, writes) in by_key {
        let last = writes.iter().max_by_key(|r| r.invoke).unwrap();
        let alone = writes.iter().all(|w| {
            w.id == last.id
                || (matches!(w.completion, Some(Completion::Ok(_)))
                    && w.ret.is_some_and(|t| t < last.invoke))
        });
        let Some(Completion::Ok(out)) = &last.completion else {
            continue;
        };
        if !alone {
            continue;
        }
        let fin = &finals[key];
        match (&last.op, out, fin) {
            (
                Op::Put { value, .. },
                Output::Put {
                    succeeded: true,
                    version,
                },
                Output::Get {
                    found,
                    value: v,
                    version: fv,
                },
            ) => assert!(
                *found && v == value && fv == version,
                "{key}: the last acknowledged write (put v{version}) is not what the final read \
                 shows: {fin:?}"
            ),
            (
                Op::Delete { .. },
                Output::Delete {
                    succeeded: true, ..
                },
                Output::Get { found, .. },
            ) => {
                assert!(
                    !found,
                    "{key}: the last acknowledged write (a delete) is not what the final read \
                     shows: {fin:?}"
                )
            }
            // A write whose condition failed changed nothing; the checker covers it.
            _ => continue,
        }
        checked += 1;
    }
    checked
}

/// A cluster under the nemesis: what the checks read once the load ended.
struct Run {
    /// Its processes live until the checks are done.
    cluster: ProcCluster,
    router: String,
    seed: u64,
    history: History,
    observed: Arc<Observed>,
    /// Puts each client made to its counter.
    counters: Vec<u64>,
    kills: Vec<Kill>,
    finals: BTreeMap<ItemKey, Output>,
    load_ended: Duration,
    started: Instant,
}

/// The cluster up, its items chosen, the router serving every group.
async fn start_cluster() -> (ProcCluster, Arc<Vec<Item>>, String) {
    let started = Instant::now();
    let mut cluster = ProcCluster::start(bins!(), GROUPS, REPLICAS);
    let map = cluster.init(HEALTHY).await;
    let items = Arc::new(items(&map));
    let router = cluster.router_addr().to_string();
    router_serves_every_group(&router, &items).await;
    eprintln!("cluster up in {:.1?}", started.elapsed());
    (cluster, items, router)
}

/// The load of `CLIENTS` clients under the nemesis, then the final reads.
async fn load(mut cluster: ProcCluster, items: Arc<Vec<Item>>, router: String) -> Run {
    let started = Instant::now();
    let seed = env_u64("ORDO_NEMESIS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let run_for = Duration::from_secs(env_u64("ORDO_NEMESIS_SECS").unwrap_or(60));
    eprintln!("nemesis seed {seed} (replay with ORDO_NEMESIS_SEED={seed}); load for {run_for:?}");
    let history = History::new();
    let observed = Arc::new(Observed::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::spawn(client_loop(
                c,
                router.clone(),
                items.clone(),
                history.clone(),
                observed.clone(),
                stop.clone(),
                seed,
            ))
        })
        .collect();
    let kills = run_nemesis(&mut cluster, seed, run_for, &history).await;
    // Let the last restart settle under load before stopping (the gap after it is measured).
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let load_ended = history.now();
    let mut counters = Vec::new();
    for c in clients {
        counters.push(c.await.expect("client task"));
    }
    let finals = final_reads(&mut cluster, &router, &items, &history).await;
    Run {
        cluster,
        router,
        seed,
        history,
        observed,
        counters,
        kills,
        finals,
        load_ended,
        started,
    }
}

impl Run {
    /// The checks of the nemesis acceptance: enough kills and writes, a linearizable history,
    /// keyed writes applied once, items ending at their last acknowledged write.
    async fn check_acceptance(&self) {
        let records = self.history.records();
        let acked = summarize(
            self.seed,
            &self.kills,
            &records,
            &self.observed,
            self.load_ended,
        );
        assert!(self.kills.len() >= MIN_KILLS, "{} kills", self.kills.len());
        assert!(
            acked >= 200,
            "only {acked} writes were acknowledged: the run proves too little"
        );
        let checked_at = Instant::now();
        let result = check(&self.history);
        eprintln!("checker: {:.1?}; {result}", checked_at.elapsed());
        result.assert_linearizable();
        check_keyed_writes(&self.router, &self.counters, &self.observed).await;
        let exact = check_last_acknowledged(&records, &self.finals);
        eprintln!(
            "{exact} items end exactly at their last acknowledged write; {:.1?} since the \
             cluster was up",
            self.started.elapsed()
        );
    }
}

/// Acceptance: ≥ 60 s of load with ≥ 10 kill -9 / restart cycles of leaders, replicas and meta
/// replicas; the history is linearizable and nothing acknowledged is lost.
///
/// And issue 13, acceptances 1 and 3, under the same nemesis: a watcher from the oldest event,
/// through the router, for the whole run. Every acknowledged write (the history's and the
/// counters') is in the feed exactly once, per item in version order and per slot with no gap;
/// an unknown one at most once and as the final data says; the watermark holds; the watch
/// resumes across a router killed -9 and restarted; and a second watch from a cursor halfway
/// through gives exactly the rest. (One run checks both: the watcher is part of the load a
/// cluster must survive, and a second cluster run would double the suite's longest test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nemesis_kills_and_restarts_processes_under_load() {
    let _heavy = ordo_testkit::HEAVY.lock().await;
    let (cluster, items, router) = start_cluster().await;
    let oldest = WatchRequest {
        start: Some(StartOneOf::From(From::FromOldest as i32)),
        ..WatchRequest::default()
    };
    let watcher = Watcher::start("whole run", &router, oldest, feed::Start::Empty);
    // Live before the load: the watermark of an idle cluster advances.
    watcher
        .wait_resolved(ordo_proto::unix_ms(), FEED_CATCH_UP)
        .await;
    let mut run = load(cluster, items, router).await;
    run.check_acceptance().await;

    // Every write ended before now. The watcher's stream then breaks with its router: it
    // resumes from its last cursor on the new router process and goes on past this time.
    let settled = ordo_proto::unix_ms();
    run.cluster.restart_router();
    let restarted = ordo_proto::unix_ms();
    wait_for("the watcher to reconnect", FEED_CATCH_UP, || async {
        (watcher.reconnects() > 0).then_some(())
    })
    .await;
    watcher.wait_resolved(restarted, FEED_CATCH_UP).await;
    let watch = watcher.stop().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(!watch.responses.is_empty(), "the watcher received nothing");
    let middle = watch.responses.len() / 2;
    let from_middle = WatchRequest {
        start: Some(StartOneOf::Cursor(
            watch.responses[middle].response.cursor.clone(),
        )),
        ..WatchRequest::default()
    };
    let second = Watcher::start(
        "from the middle",
        &run.router,
        from_middle,
        feed::Start::Midway,
    );
    second.wait_resolved(settled, FEED_CATCH_UP).await;
    let second = second.stop().await.unwrap_or_else(|e| panic!("{e}"));

    let mut expected = feed::Expected::from_history(&run.history, &run.finals, settled);
    expected
        .writes
        .extend(run.observed.counter_writes.lock().unwrap().iter().cloned());
    let checked_at = Instant::now();
    let report = feed::check(&expected, std::slice::from_ref(&watch));
    eprintln!("feed checker: {:.1?}; {report}", checked_at.elapsed());
    report.assert_ok();
    let resumed = feed::check_resume(&watch, middle, &second);
    eprintln!("from the cursor of response {middle}: {resumed}");
    resumed.assert_ok();
}

/// M9: no write was answered "outcome unknown" before its deadline was spent, and no keyed
/// write applied twice: every counter put answered its own number, and each counter's final
/// version is the number of puts its client sent.
async fn check_keyed_writes(router: &str, counters: &[u64], observed: &Observed) {
    let kv = kv_client(router);
    for (client, &puts) in counters.iter().enumerate() {
        let version = wait_for(&format!("a read of counter {client}"), HEALTHY, || {
            let mut kv = kv.clone();
            async move {
                let r = kv
                    .get(timed(GetRequest {
                        header: None,
                        shard_key: counter_key(client as u64),
                        key: Bytes::new(),
                        consistency: Consistency::Linearizable as i32,
                    }))
                    .await
                    .ok()?;
                Some(r.into_inner().version)
            }
        })
        .await;
        assert_eq!(
            version, puts,
            "counter {client}: {puts} keyed puts, each answered, but the item is at version \
             {version}"
        );
    }
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (early, spent) = (load(&observed.unknown_early), load(&observed.unknown_spent));
    let (doubles, lost) = (load(&observed.double_applied), load(&observed.lost_applied));
    eprintln!(
        "keyed writes: {early} outcome-unknown answers before the deadline was spent, {spent} \
         after it; {} counter puts ({} in all), {doubles} double applications, {lost} lost",
        load(&observed.counter_puts),
        counters.iter().sum::<u64>(),
    );
    assert_eq!(early, 0, "writes answered outcome-unknown with time left");
    assert_eq!(
        (doubles, lost),
        (0, 0),
        "keyed writes applied twice or lost"
    );
}

/// Waits until the router serves a read of every group.
async fn router_serves_every_group(router: &str, items: &[Item]) {
    let router = router.to_string();
    for group in 1..=GROUPS {
        let item = items.iter().find(|i| i.group == group).unwrap().clone();
        wait_for(
            &format!("a read of group {group} through the router"),
            HEALTHY,
            || {
                let mut kv = kv_client(&router);
                let item = item.clone();
                async move {
                    kv.get(timed(GetRequest {
                        header: None,
                        shard_key: item.key.shard_key.into(),
                        key: item.key.key.into(),
                        consistency: Consistency::Linearizable as i32,
                    }))
                    .await
                    .ok()
                }
            },
        )
        .await;
    }
}

/// The nemesis: one process down at a time, so no group ever loses its majority; kills until
/// `run_for` has passed and at least `MIN_KILLS` were made. The kills, in order.
async fn run_nemesis(
    cluster: &mut ProcCluster,
    seed: u64,
    run_for: Duration,
    history: &History,
) -> Vec<Kill> {
    let mut rng = SplitMix64(seed);
    let mut kills: Vec<Kill> = Vec::new();
    let load_started = Instant::now();
    while load_started.elapsed() < run_for || kills.len() < MIN_KILLS {
        assert!(
            load_started.elapsed() < run_for * 2,
            "only {} kills in {:?}",
            kills.len(),
            load_started.elapsed()
        );
        tokio::time::sleep(rng.millis(1500, 3000)).await;
        // Group leaders are the interesting victims (their kill costs availability), so they
        // get 40% of the kills; group replicas, the config leader and config replicas 20% each.
        let (group, leader_wanted) = match rng.below(10) {
            0..=3 => (1 + rng.below(GROUPS), true),
            4..=5 => (1 + rng.below(GROUPS), false),
            6..=7 => (CONFIG_GROUP, true),
            _ => (CONFIG_GROUP, false),
        };
        let members = cluster.members(group);
        let any = members[rng.below(members.len() as u64) as usize];
        let leader = cluster.find_leader(group).await;
        let victim = match leader {
            Some(l) if leader_wanted => l,
            // No leader right now (an election is running): any member will do.
            _ => any,
        };
        // Named by what the victim was, not what was asked for: a random replica may lead.
        let target = match (group, leader == Some(victim)) {
            (0, true) => "config leader",
            (0, false) => "meta follower",
            (_, true) => "group leader",
            (_, false) => "group follower",
        };
        cluster.kill(victim).await;
        let name = cluster.name(victim).to_string();
        kills.push(Kill {
            at: history.now(),
            group,
            target,
            name: name.clone(),
        });
        eprintln!(
            "[{:>5.1}s] kill -9 {name} ({target})",
            load_started.elapsed().as_secs_f64()
        );
        tokio::time::sleep(rng.millis(1000, 2500)).await;
        cluster.restart(victim).await;
        cluster.answers(victim, HEALTHY).await;
        eprintln!(
            "[{:>5.1}s] restarted {name}",
            load_started.elapsed().as_secs_f64()
        );
    }
    kills
}

/// Everything up again (the nemesis restarted its last victim already), then a linearizable
/// read of every item, recorded in the history. The reads by item.
async fn final_reads(
    cluster: &mut ProcCluster,
    router: &str,
    items: &[Item],
    history: &History,
) -> BTreeMap<ItemKey, Output> {
    for group in 0..=GROUPS {
        for m in cluster.members(group) {
            if !cluster.is_running(m) {
                cluster.restart(m).await;
            }
        }
    }
    for group in 0..=GROUPS {
        cluster.wait_leader(group, HEALTHY).await;
    }
    let kv = kv_client(router);
    let mut finals: BTreeMap<ItemKey, Output> = BTreeMap::new();
    for item in items.iter() {
        let out = wait_for(&format!("a final read of {}", item.key), HEALTHY, || {
            let (mut kv, history, item) = (kv.clone(), history.clone(), item.clone());
            async move { run_op(&mut kv, &history, 1000, &item, Op::Get).await.ok() }
        })
        .await;
        finals.insert(item.key.clone(), out);
    }

    finals
}

/// Prints what the run did (kills, outcomes, unavailability after each kill, errors); the
/// number of acknowledged writes.
fn summarize(
    seed: u64,
    kills: &[Kill],
    records: &[Record],
    observed: &Observed,
    load_ended: Duration,
) -> u64 {
    let mut ok = 0;
    let mut fail = 0;
    let mut unknown = 0;
    let mut writes = 0;
    for r in records {
        if !matches!(r.op, Op::Get) {
            writes += 1;
        }
        match r.completion {
            Some(Completion::Ok(_)) => ok += 1,
            Some(Completion::Fail) => fail += 1,
            _ => unknown += 1,
        }
    }
    let acked = observed.acked.load(Ordering::Relaxed);
    let write_oks = observed.write_oks.lock().unwrap().clone();
    let mut leader_gaps = Vec::new();
    let mut other_gaps = Vec::new();
    for (n, k) in kills.iter().enumerate() {
        let next = kills.get(n + 1).map_or(load_ended, |k| k.at);
        // Meta kills: the worst group; group kills: that group.
        let groups: Vec<u64> = if k.group == CONFIG_GROUP {
            (1..=GROUPS).collect()
        } else {
            vec![k.group]
        };
        let gap = groups
            .iter()
            .map(|g| longest_gap(write_oks.get(g).map_or(&[][..], |v| v), k.at, next))
            .max()
            .unwrap();
        eprintln!("  {} ({}): longest write gap {gap:.2?}", k.name, k.target);
        if k.target == "group leader" {
            leader_gaps.push(gap);
        } else {
            other_gaps.push(gap);
        }
    }
    eprintln!(
        "nemesis summary: seed {seed}, {} kills ({} group leaders) over {:.1?}; {} ops ({} writes): \
         {ok} ok, {fail} failed (not applied), {unknown} unknown; {acked} writes acknowledged",
        kills.len(),
        leader_gaps.len(),
        load_ended,
        records.len(),
        writes,
    );
    eprintln!(
        "unavailability (longest gap between answered writes of the group after a kill): \
         group leader kills median {:.2?} max {:.2?}; other kills median {:.2?} max {:.2?}",
        median(leader_gaps.clone()),
        leader_gaps.iter().max().copied().unwrap_or_default(),
        median(other_gaps.clone()),
        other_gaps.iter().max().copied().unwrap_or_default(),
    );

    for (error, n) in observed.errors.lock().unwrap().iter() {
        eprintln!("  {n:>5} × {error}");
    }

    acked
}
