//! Seeded fault schedules against in-process 3-replica groups, every history checked for
//! linearizability (with zero lost acknowledged writes: a final linearizable read of every key is
//! part of the history).
//!
//! Each seed generates a schedule of timed episodes (leader or follower isolated, bridge
//! partitions, one-way links, the whole net split, lossy links that drop, delay, duplicate and so
//! reorder messages, crash and restart of the leader or a follower), runs it against a fresh
//! group through a shared `ordo_testkit::faults::FaultNet` while client tasks issue
//! linearizable Gets and conditional and unconditional Puts and Deletes, then heals everything,
//! reads every key back and checks the whole history. A failing seed prints its schedule, what
//! happened when (with the nodes each role resolved to, on the history's clock), and how to
//! replay it. A seed always gives the same schedule, link-fault decisions and client operation
//! mix; the interleaving with raft's own timers and the machine's load does not replay exactly,
//! so replay a failing seed a few times.
//!
//! - default: `DEFAULT_SEEDS` fixed seeds, `PARALLEL` groups at a time, ~4 s of faults each;
//! - `ORDO_FAULT_SEED=<n>`: only seed n (add `ORDO_FAULT_SOAK_SECS` if it came from a soak run);
//! - `ORDO_FAULT_SOAK=<n>`: n fresh random seeds with `ORDO_FAULT_SOAK_SECS` (default 20) seconds
//!   of faults each, for manual soak runs;
//! - `ORDO_FAULT_PARALLEL=<n>`: groups run at once.
//!
//! Crashes here are in-process: `Node::shutdown`, then `Node::start` on the same data dir. That is
//! a clean crash of the process (in-flight requests fail, storage is closed); kill -9 with no
//! flush is covered by the process-level tests in `group.rs` and `nemesis.rs`.

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use ordo_proto::v1::kv_client::KvClient;
use ordo_proto::v1::{error_detail, DeleteRequest, GetRequest, PutRequest};
use ordo_testkit::faults::{FaultNet, FaultStats};
use ordo_testkit::inproc::{Filter, InProcGroup, Running};
use ordo_testkit::linearizability::{check, Completion, History, ItemKey, Op, Output};
use ordo_testkit::{env_u64, SplitMix64};
use tonic::transport::Channel;
use tonic::Code;

mod schedule;

pub(crate) use schedule::Schedule;
use schedule::{Episode, Fault, Target};

pub(crate) const REPLICAS: u64 = 3;
const KEYS: u64 = 4;
/// Clients doing reads and writes, then clients doing only reads.
const CLIENTS: u64 = 3;
const READERS: u64 = 1;
const DEFAULT_SEEDS: u64 = 24;
const PARALLEL: usize = 4;
/// Milliseconds of faults per schedule (default runs) and per soak schedule (seconds).
pub(crate) const FAULT_MS: u64 = 4_000;
const SOAK_SECS_DEFAULT: u64 = 20;
/// One request attempt; one operation (attempts that provably did nothing are retried).
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1_000);
const OP_BUDGET: Duration = Duration::from_millis(2_500);
/// Healthy time before the first fault and after the last, with clients running.
const WARMUP: Duration = Duration::from_millis(300);
const COOLDOWN: Duration = Duration::from_millis(500);
/// Bounds of the recovery after the schedule; exceeding one fails the seed loudly.
const RECOVERY_LIMIT: Duration = Duration::from_secs(20);
/// Small, so that a replica that was down or cut off for a while catches up from a snapshot.
const COMPACT_LOG_ENTRIES: u64 = 64;
/// A schedule that acknowledged fewer writes than this proved nothing. Some schedules leave the
/// group without a quorum most of the time, and a loaded machine slows every write, so the bound
/// per seed is low; across a run, the average must be far higher: 25 a schedule is 600 over the
/// default 24 (a quiet 2-core machine does about 40; one with builds beside it, 32).
const MIN_ACKED_WRITES: usize = 5;
const MIN_ACKED_WRITES_MEAN: usize = 25;

// ---- the group under test -------------------------------------------------------------------

/// What happened when, with the nodes each role resolved to: printed with a failing seed. Times
/// are on the history's clock, so they line up with the checker's report.
#[derive(Clone)]
pub(crate) struct Trace {
    clock: History,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Trace {
    pub(crate) fn new(clock: &History) -> Trace {
        Trace {
            clock: clock.clone(),
            lines: Default::default(),
        }
    }

    pub(crate) fn log(&self, what: impl Into<String>) {
        let line = format!("  {:>7.3}s {}", self.clock.now().as_secs_f64(), what.into());
        self.lines.lock().unwrap().push(line);
    }

    pub(crate) fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

/// The group under test: in-process replicas whose raft traffic goes through `net`.
struct Group {
    nodes: InProcGroup,
    net: Arc<FaultNet>,
}

impl Group {
    async fn start(seed: u64) -> anyhow::Result<Group> {
        let net = Arc::new(FaultNet::new(seed));
        let nodes =
            InProcGroup::start(REPLICAS, COMPACT_LOG_ENTRIES, Some(net.clone() as Filter)).await?;
        Ok(Group { nodes, net })
    }
}

impl Deref for Group {
    type Target = InProcGroup;

    fn deref(&self) -> &InProcGroup {
        &self.nodes
    }
}

impl DerefMut for Group {
    fn deref_mut(&mut self) -> &mut InProcGroup {
        &mut self.nodes
    }
}

/// Watches for moments when two nodes both believe they lead (in different terms): a deposed
/// leader that has not noticed yet. Reads it answers then must still be linearizable, so the
/// report counts these windows to show the schedules really create them.
async fn watch_leaders(running: Running, stop: Arc<AtomicBool>, trace: Trace) -> (usize, Duration) {
    let (mut windows, mut total) = (0, Duration::ZERO);
    let mut since: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let leaders = running.leaders();
        match (leaders.len() > 1, since) {
            (true, None) => {
                since = Some(Instant::now());
                windows += 1;
                trace.log(format!(
                    "two nodes believe they lead: (node, term) {leaders:?}"
                ));
            }
            (false, Some(t)) => {
                total += t.elapsed();
                since = None;
                trace.log("one leader again");
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(t) = since {
        total += t.elapsed();
    }
    (windows, total)
}

// ---- clients ---------------------------------------------------------------------------------

enum Attempt {
    Done(Output),
    /// Provably not applied; the node may have named the leader.
    NotApplied(Option<u64>),
    /// May or may not have been applied.
    Ambiguous,
}

/// What an error proves. Only answers that guarantee the request was never proposed (or was
/// replaced in the log) count as not applied; everything else is ambiguous.
fn classify(status: &tonic::Status) -> Attempt {
    if status.code() == Code::InvalidArgument {
        panic!("the test sent an invalid request: {status:?}");
    }
    // `service.rs` and `driver.rs` answer NotLeader before proposing, never after.
    if let Some(error_detail::Kind::NotLeader(nl)) = ordo_proto::error_detail_of(status) {
        return Attempt::NotApplied(Some(nl.leader_id).filter(|&l| l != 0));
    }
    // A `NotApplied` detail (refused before proposing, or the entry was replaced in the log), or
    // no connection at all. Testing these claims is part of the point: an op recorded as failed
    // that did take effect shows up as a violation.
    if ordo_proto::certainly_not_applied(status) {
        return Attempt::NotApplied(None);
    }
    Attempt::Ambiguous
}

struct Conn {
    peers: BTreeMap<u64, String>,
    channels: BTreeMap<u64, KvClient<Channel>>,
    /// The node this client believes leads.
    target: u64,
    rng: SplitMix64,
    /// How often a read goes first to a random node rather than the believed leader.
    spread_reads: f64,
}

impl Conn {
    fn next_target(&mut self) {
        self.target = self.target % REPLICAS + 1;
    }

    async fn attempt(&mut self, node: u64, key: &ItemKey, op: &Op) -> Attempt {
        let mut kv = match self.channels.get(&node) {
            Some(c) => c.clone(),
            None => {
                let ep = ordo_testkit::endpoint(&self.peers[&node]).unwrap();
                match tokio::time::timeout(Duration::from_millis(300), ep.connect()).await {
                    Ok(Ok(ch)) => {
                        let c = KvClient::new(ch);
                        self.channels.insert(node, c.clone());
                        c
                    }
                    // Not connected: nothing was sent.
                    _ => return Attempt::NotApplied(None),
                }
            }
        };
        let (sk, k) = (key.shard_key.clone().into(), key.key.clone().into());
        let call = async {
            match op {
                Op::Get => kv
                    .get(GetRequest {
                        shard_key: sk,
                        key: k,
                        ..Default::default()
                    })
                    .await
                    .map(|r| Output::from(r.get_ref())),
                Op::Put { value, if_version } => kv
                    .put(PutRequest {
                        shard_key: sk,
                        key: k,
                        value: value.clone().into(),
                        if_version: *if_version,
                        ..Default::default()
                    })
                    .await
                    .map(|r| Output::from(r.get_ref())),
                Op::Delete { if_version } => kv
                    .delete(DeleteRequest {
                        shard_key: sk,
                        key: k,
                        if_version: *if_version,
                        ..Default::default()
                    })
                    .await
                    .map(|r| Output::from(r.get_ref())),
            }
        };
        let outcome = match tokio::time::timeout(ATTEMPT_TIMEOUT, call).await {
            Ok(Ok(out)) => Attempt::Done(out),
            Ok(Err(status)) => classify(&status),
            Err(_) => Attempt::Ambiguous,
        };
        if !matches!(outcome, Attempt::Done(_)) {
            // Start the next request to this node on a fresh connection, so that a refused
            // connect is seen as such.
            self.channels.remove(&node);
        }
        outcome
    }

    /// One operation: retried on other nodes while every attempt provably did nothing, ended at
    /// the first answer or the first ambiguous attempt.
    async fn run(&mut self, key: &ItemKey, op: &Op) -> Completion {
        let started = Instant::now();
        // Some requests go first to any node: a follower refuses (not leader, and names the
        // leader it knows), but a deposed leader that has not noticed yet would answer a read,
        // and must not answer from the past.
        let spread = if *op == Op::Get {
            self.spread_reads
        } else {
            0.2
        };
        let mut first = self.rng.chance(spread).then(|| self.rng.range(1, REPLICAS));
        while started.elapsed() < OP_BUDGET {
            let node = first.take().unwrap_or(self.target);
            match self.attempt(node, key, op).await {
                Attempt::Done(out) => return Completion::Ok(out),
                Attempt::Ambiguous => {
                    if node == self.target {
                        self.next_target();
                    }
                    return Completion::Unknown;
                }
                Attempt::NotApplied(Some(hint)) if hint != node => {
                    self.target = hint;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Attempt::NotApplied(_) => {
                    if node == self.target {
                        self.next_target();
                    }
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            }
        }
        Completion::Fail
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct ClientStats {
    ops: usize,
    acked_writes: usize,
    ok_reads: usize,
    failed: usize,
    unknown: usize,
}

fn item(k: u64) -> ItemKey {
    ItemKey::new(format!("fault-key-{k}"), "")
}

async fn client_loop(
    client: u64,
    seed: u64,
    peers: BTreeMap<u64, String>,
    history: History,
    stop: Arc<AtomicBool>,
) -> ClientStats {
    let reader = client > CLIENTS;
    let mut rng = SplitMix64(seed ^ (client.wrapping_mul(0xA076_1D64_78BD_642F)));
    let mut conn = Conn {
        peers,
        channels: BTreeMap::new(),
        target: rng.range(1, REPLICAS),
        rng: SplitMix64(rng.next_u64()),
        spread_reads: if reader { 1.0 } else { 0.5 },
    };
    // The version this client last saw per key, for conditional writes that may succeed.
    let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
    let mut stats = ClientStats::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let k = rng.range(0, KEYS - 1);
        let known = seen.get(&k).copied();
        let op = match rng.range(0, 99) {
            _ if reader => Op::Get,
            0..=34 => Op::Get,
            35..=84 => {
                n += 1;
                let if_version = match rng.range(0, 2) {
                    0 => None,
                    1 => Some(known.unwrap_or(0)),
                    _ => Some(rng.range(0, 3)),
                };
                Op::Put {
                    value: format!("c{client}-{n}").into_bytes(),
                    if_version,
                }
            }
            _ => Op::Delete {
                if_version: rng.chance(0.5).then(|| known.unwrap_or(1)),
            },
        };
        let id = history.invoke(client, item(k), op.clone());
        let done = conn.run(&item(k), &op).await;
        history.complete(id, done.clone());
        stats.ops += 1;
        match done {
            Completion::Ok(out) => match out {
                Output::Get { found, version, .. } => {
                    stats.ok_reads += 1;
                    seen.insert(k, if found { version } else { 0 });
                }
                Output::Put { succeeded, version } => {
                    stats.acked_writes += succeeded as usize;
                    seen.insert(k, version);
                }
                Output::Delete {
                    succeeded,
                    prev_version,
                    ..
                } => {
                    stats.acked_writes += succeeded as usize;
                    let now = if succeeded { Some(0) } else { prev_version };
                    match now {
                        Some(v) => seen.insert(k, v),
                        None => seen.remove(&k),
                    };
                }
            },
            Completion::Fail => stats.failed += 1,
            Completion::Unknown => {
                stats.unknown += 1;
                seen.remove(&k);
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.range(0, 4))).await;
    }
    stats
}

/// After the faults: a linearizable read of every key, retried until one is answered.
async fn final_reads(peers: BTreeMap<u64, String>, history: &History) -> anyhow::Result<()> {
    let mut conn = Conn {
        peers,
        channels: BTreeMap::new(),
        target: 1,
        rng: SplitMix64(0),
        spread_reads: 0.0,
    };
    for k in 0..KEYS {
        let started = Instant::now();
        loop {
            let id = history.invoke(CLIENTS + READERS + 1, item(k), Op::Get);
            let done = conn.run(&item(k), &Op::Get).await;
            let ok = matches!(done, Completion::Ok(_));
            history.complete(id, done);
            if ok {
                break;
            }
            if started.elapsed() > RECOVERY_LIMIT {
                anyhow::bail!(
                    "the final read of {} got no answer within {RECOVERY_LIMIT:?}",
                    item(k)
                );
            }
        }
    }
    Ok(())
}

// ---- one seed --------------------------------------------------------------------------------

struct Report {
    ops: usize,
    acked_writes: usize,
    ok_reads: usize,
    failed: usize,
    unknown: usize,
    net: FaultStats,
    crashes: usize,
    /// Raft term at the end: every election (or failed campaign that raised it) counts.
    term: u64,
    /// Windows in which a deposed leader still believed it led, and their total length.
    dual_leader: (usize, Duration),
    snapshots: u64,
    elapsed: Duration,
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What a schedule runs against: three in-process replicas of one group whose raft traffic
/// goes through the schedule's `FaultNet` (this module's bare group, or a whole cluster's one
/// shard group behind a router, for the feed: `feed_faults.rs`).
pub(crate) trait Faulted {
    fn net(&self) -> &FaultNet;
    /// The replicas' node ids.
    fn ids(&self) -> Vec<u64>;
    /// The running replica that believes it leads in the highest term.
    fn leader(&self) -> Option<u64>;
    /// Each replica's view, for the trace.
    fn roles(&self) -> String;
    /// Stops replica `id` (a clean process crash).
    async fn crash(&mut self, id: u64);
    /// Starts replica `id` again on its data dir.
    async fn restart(&mut self, id: u64) -> anyhow::Result<()>;
}

impl Faulted for Group {
    fn net(&self) -> &FaultNet {
        &self.net
    }

    fn ids(&self) -> Vec<u64> {
        self.nodes.ids()
    }

    fn leader(&self) -> Option<u64> {
        self.nodes.leader()
    }

    fn roles(&self) -> String {
        self.nodes.roles()
    }

    async fn crash(&mut self, id: u64) {
        self.nodes.stop_node(id).await
    }

    async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        self.nodes.start_node(id).await
    }
}

/// The node a role names now, and how it was chosen (for the trace).
fn resolve(g: &impl Faulted, t: Target, rng: &mut SplitMix64) -> (u64, String) {
    let leader = g.leader();
    match (t, leader) {
        (Target::Leader, Some(l)) => (l, t.to_string()),
        (Target::Follower, Some(l)) => {
            let others: Vec<u64> = g.ids().into_iter().filter(|&i| i != l).collect();
            (*rng.pick(&others), t.to_string())
        }
        (_, None) => (
            rng.range(1, REPLICAS),
            format!("{t} was wanted but none leads now: any node"),
        ),
    }
}

async fn apply_episode(
    g: &mut impl Faulted,
    e: &Episode,
    rng: &mut SplitMix64,
    trace: &Trace,
) -> anyhow::Result<Vec<u64>> {
    let all = g.ids();
    let mut crashed = Vec::new();
    trace.log(format!("[{}]", g.roles()));
    for f in &e.faults {
        let what = match f {
            Fault::Isolate(t) => {
                let (n, who) = resolve(g, *t, rng);
                g.net().isolate(n, &all);
                format!("isolate node {n} ({who})")
            }
            Fault::OneWay { node, out } => {
                let (n, who) = resolve(g, *node, rng);
                for &o in all.iter().filter(|&&o| o != n) {
                    if *out {
                        g.net().block(n, o)
                    } else {
                        g.net().block(o, n)
                    }
                }
                let dir = if *out { "outgoing" } else { "incoming" };
                format!("cut the {dir} links of node {n} ({who})")
            }
            Fault::Bridge { bridge } => {
                let (b, who) = resolve(g, *bridge, rng);
                let ends: Vec<u64> = all.iter().copied().filter(|&i| i != b).collect();
                g.net().bridge(ends[0], b, ends[1]);
                format!(
                    "bridge: {}–{b}–{} connected, {}–{} cut ({who} bridges)",
                    ends[0], ends[1], ends[0], ends[1]
                )
            }
            Fault::SplitAll => {
                for &n in &all {
                    g.net().isolate(n, &all);
                }
                "cut every link".to_string()
            }
            Fault::Lossy(l) => {
                g.net().set_link_faults(*l);
                Fault::Lossy(*l).to_string()
            }
            Fault::Crash(t) => {
                let (n, who) = resolve(g, *t, rng);
                g.crash(n).await;
                crashed.push(n);
                format!("crashed node {n} ({who})")
            }
        };
        trace.log(what);
    }
    Ok(crashed)
}

/// Runs `s`'s episodes against `g` on their times (after the warm-up), each healed and its
/// crashed replicas restarted when it ends; the crashes.
pub(crate) async fn run_episodes(
    s: &Schedule,
    g: &mut impl Faulted,
    trace: &Trace,
) -> anyhow::Result<usize> {
    let mut rng = SplitMix64(s.seed ^ 0x5EED_F0F0_FA17);
    let mut crashes = 0;
    let faults_at = Instant::now() + WARMUP;
    for e in &s.episodes {
        tokio::time::sleep_until((faults_at + Duration::from_millis(e.start_ms)).into()).await;
        let crashed = apply_episode(g, e, &mut rng, trace).await?;
        crashes += crashed.len();
        tokio::time::sleep_until((faults_at + Duration::from_millis(e.start_ms + e.len_ms)).into())
            .await;
        trace.log(format!("[{}]", g.roles()));
        g.net().heal();
        for n in crashed {
            g.restart(n).await?;
            trace.log(format!("restarted node {n}"));
        }
        trace.log("healed");
    }
    Ok(crashes)
}

async fn run_schedule(
    s: &Schedule,
    g: &mut Group,
    history: &History,
    trace: &Trace,
) -> anyhow::Result<Report> {
    let t0 = Instant::now();
    let leader = g.try_wait_leader(RECOVERY_LIMIT).await?;
    trace.log(format!("node {leader} leads; clients start"));
    let stop = Arc::new(AtomicBool::new(false));
    // Clients stop however this function ends.
    let _stop_clients = StopOnDrop(stop.clone());
    let monitor = tokio::spawn(watch_leaders(g.running(), stop.clone(), trace.clone()));
    let clients: Vec<_> = (1..=CLIENTS + READERS)
        .map(|c| {
            tokio::spawn(client_loop(
                c,
                s.seed,
                g.peers.clone(),
                history.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let crashes = run_episodes(s, g, trace).await?;
    tokio::time::sleep(COOLDOWN).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = ClientStats::default();
    for c in clients {
        let st = c.await?;
        total.ops += st.ops;
        total.acked_writes += st.acked_writes;
        total.ok_reads += st.ok_reads;
        total.failed += st.failed;
        total.unknown += st.unknown;
    }
    trace.log(format!("clients stopped: {total:?} [{}]", g.roles()));
    let dual_leader = monitor.await?;
    let leader = g.try_wait_leader(RECOVERY_LIMIT).await?;
    let term = g.term(leader);
    final_reads(g.peers.clone(), history).await?;
    trace.log(format!("final reads done (leader {leader})"));
    let (applied, items, snapshots) = g.converged(RECOVERY_LIMIT).await?;
    trace.log(format!(
        "replicas converged at index {applied} with {items} items"
    ));
    Ok(Report {
        ops: total.ops,
        acked_writes: total.acked_writes,
        ok_reads: total.ok_reads,
        failed: total.failed,
        unknown: total.unknown,
        net: g.net.stats(),
        crashes,
        term,
        dual_leader,
        snapshots,
        elapsed: t0.elapsed(),
    })
}

/// Runs one seed on a fresh group; `Err` carries everything needed to understand and replay it.
/// `verbose`: the success line also carries the schedule and what happened.
async fn run_seed(seed: u64, fault_ms: u64, verbose: bool) -> Result<(String, usize), String> {
    let schedule = Schedule::generate(seed, fault_ms);
    let history = History::new();
    let trace = Trace::new(&history);
    let outcome: anyhow::Result<Report> = async {
        let mut g = Group::start(seed).await?;
        let r = run_schedule(&schedule, &mut g, &history, &trace).await;
        g.nodes.shutdown().await;
        r
    }
    .await;
    let fail = |why: String| {
        let replay = if fault_ms == FAULT_MS {
            format!("ORDO_FAULT_SEED={seed}")
        } else {
            format!(
                "ORDO_FAULT_SEED={seed} ORDO_FAULT_SOAK_SECS={}",
                fault_ms / 1000
            )
        };
        Err(format!(
            "seed {seed} FAILED: {why}\n{schedule}what happened:\n{}\nreplay: {replay} \
             cargo test --test cluster faults -- --nocapture\n",
            trace.text()
        ))
    };
    let report = match outcome {
        Ok(r) => r,
        Err(e) => return fail(format!("{e:#}")),
    };
    let h = history.clone();
    let result = tokio::task::spawn_blocking(move || check(&h))
        .await
        .expect("the checker ran");
    if !result.is_linearizable() {
        return fail(format!("history is not proven linearizable\n{result}"));
    }
    if report.acked_writes < MIN_ACKED_WRITES {
        return fail(format!(
            "only {} acknowledged writes: the schedule proved nothing (at least {MIN_ACKED_WRITES} needed)",
            report.acked_writes
        ));
    }
    let line = format!(
        "seed {seed}: linearizable; {} ops ({} acked writes, {} reads, {} failed, {} unknown), \
         {} crashes, term {} at the end, {} windows with two leaders ({} ms), {} snapshots installed, net {:?}, {:.1}s",
        report.ops,
        report.acked_writes,
        report.ok_reads,
        report.failed,
        report.unknown,
        report.crashes,
        report.term,
        report.dual_leader.0,
        report.dual_leader.1.as_millis(),
        report.snapshots,
        report.net,
        report.elapsed.as_secs_f64()
    );
    let text = if verbose {
        format!("{line}\n{schedule}what happened:\n{}", trace.text())
    } else {
        line
    };
    Ok((text, report.acked_writes))
}

/// The default seeds cover every kind of fault, leader isolation and crashes of both roles.
#[test]
fn default_schedules_cover_every_fault() {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for seed in 1..=DEFAULT_SEEDS {
        let s = Schedule::generate(seed, FAULT_MS);
        assert_eq!(s, Schedule::generate(seed, FAULT_MS), "a seed replays");
        for e in &s.episodes {
            for f in &e.faults {
                let kind = match f {
                    Fault::Lossy(_) => "lossy links".to_string(),
                    other => other.to_string(),
                };
                *counts.entry(kind).or_default() += 1;
            }
        }
    }
    eprintln!("{counts:#?}");
    for kind in [
        "isolate the leader",
        "isolate a follower",
        "bridge partition through the leader",
        "bridge partition through a follower",
        "cut the outgoing links of the leader",
        "cut the incoming links of the leader",
        "cut every link",
        "lossy links",
        "crash the leader",
        "crash a follower",
    ] {
        assert!(
            counts.get(kind).copied().unwrap_or(0) >= 2,
            "{kind}: {counts:#?}"
        );
    }
}

/// The acceptance suite: `DEFAULT_SEEDS` schedules (see the module docs for the variables).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seeded_fault_schedules_stay_linearizable() {
    let _heavy = ordo_testkit::HEAVY.lock().await;
    let soak_secs = env_u64("ORDO_FAULT_SOAK_SECS");
    let (seeds, fault_ms): (Vec<u64>, u64) = if let Some(seed) = env_u64("ORDO_FAULT_SEED") {
        (vec![seed], soak_secs.map_or(FAULT_MS, |s| s * 1000))
    } else if let Some(n) = env_u64("ORDO_FAULT_SOAK") {
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let mut rng = SplitMix64(base);
        let seeds = (0..n).map(|_| rng.next_u64() >> 16).collect();
        (seeds, soak_secs.unwrap_or(SOAK_SECS_DEFAULT) * 1000)
    } else {
        ((1..=DEFAULT_SEEDS).collect(), FAULT_MS)
    };
    let verbose = seeds.len() == 1;
    let parallel = env_u64("ORDO_FAULT_PARALLEL").map_or(PARALLEL, |n| n.max(1) as usize);
    eprintln!(
        "running {} fault schedules of {fault_ms} ms, {parallel} at a time",
        seeds.len()
    );
    let started = Instant::now();
    let results: Vec<Result<(String, usize), String>> = stream::iter(seeds.clone())
        .map(|seed| async move {
            match tokio::spawn(run_seed(seed, fault_ms, verbose)).await {
                Ok(r) => r,
                Err(e) => Err(format!(
                    "seed {seed} PANICKED: {e}\n{}",
                    Schedule::generate(seed, fault_ms)
                )),
            }
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    let mut failed = Vec::new();
    let mut acked = 0;
    for r in &results {
        match r {
            Ok((line, n)) => {
                eprintln!("{line}");
                acked += n;
            }
            Err(report) => {
                eprintln!("{report}");
                failed.push(report.lines().next().unwrap_or_default().to_string());
            }
        }
    }
    eprintln!(
        "{} schedules in {:.1}s, {} failed",
        results.len(),
        started.elapsed().as_secs_f64(),
        failed.len()
    );
    assert!(failed.is_empty(), "failing seeds:\n{}", failed.join("\n"));
    assert!(
        acked >= MIN_ACKED_WRITES_MEAN * results.len(),
        "only {acked} acknowledged writes over {} schedules: too little progress to prove much",
        results.len()
    );
}
