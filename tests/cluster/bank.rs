//! Cross-group transactions: the bank. Accounts spread over every group; transfers are `Txn`s
//! with version compares across two groups, audits are read-only `Txn`s over every account. The
//! total never changes, in any audit or at the end, including when the coordinating router
//! stops half-way and when a participant's leader changes with locks held.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ordo_proto::client::Client;
use ordo_proto::v1::{
    compare, txn_op, txn_op_result, Compare, GetRequest, PutRequest, RequestHeader, TxnOp,
    TxnRequest, TxnResponse,
};
use ordo_router::{Failpoint, Router, RouterConfig, RouterOptions};
use tonic::Code;

use ordo_testkit::inproc::{Filter, InProcCluster};
use ordo_testkit::{node_status, wait_for, Cluster, SplitMix64};

pub(crate) const ACCOUNTS: usize = 100;
pub(crate) const INITIAL: u64 = 100;

pub(crate) fn account(i: usize) -> Bytes {
    Bytes::from(format!("acct-{i}"))
}

fn get(sk: Bytes) -> TxnOp {
    TxnOp {
        op: Some(txn_op::Op::Get(GetRequest {
            shard_key: sk,
            ..Default::default()
        })),
    }
}

pub(crate) fn put(sk: Bytes, balance: u64) -> TxnOp {
    TxnOp {
        op: Some(txn_op::Op::Put(PutRequest {
            shard_key: sk,
            value: balance.to_string().into(),
            ..Default::default()
        })),
    }
}

fn version_is(sk: Bytes, version: u64) -> Compare {
    Compare {
        shard_key: sk,
        target: compare::Target::Version as i32,
        op: compare::Op::Equal as i32,
        version,
        ..Default::default()
    }
}

/// `(version, balance)` of each account, read in one read-only Txn (one consistent snapshot).
pub(crate) async fn read_accounts(
    c: &Client,
    which: &[usize],
) -> Result<Vec<(u64, u64)>, tonic::Status> {
    let req = TxnRequest {
        success: which.iter().map(|&i| get(account(i))).collect(),
        ..Default::default()
    };
    let resp = c.txn(req).await?;
    assert!(resp.succeeded, "a Txn without compares succeeds");
    Ok(resp
        .results
        .iter()
        .map(|r| match &r.result {
            Some(txn_op_result::Result::Get(g)) if g.found => (
                g.version,
                std::str::from_utf8(&g.value).unwrap().parse().unwrap(),
            ),
            other => panic!("an account is missing: {other:?}"),
        })
        .collect())
}

/// Moves up to 10 from `from` to `to` if both are unchanged since they were read. Whether it
/// committed (`None` when the outcome is unknown).
async fn transfer(c: &Client, from: usize, to: usize, amount: u64) -> Option<bool> {
    // Plain reads: the version compares make the transfer safe whatever happens in between.
    let read = |i: usize| async move {
        let g = c.get(account(i), "", false).await.ok()?;
        Some((
            g.version,
            std::str::from_utf8(&g.value).ok()?.parse::<u64>().ok()?,
        ))
    };
    let (Some((vf, bf)), Some((vt, bt))) = (read(from).await, read(to).await) else {
        return Some(false);
    };
    let amount = amount.min(bf);
    let req = TxnRequest {
        compares: vec![version_is(account(from), vf), version_is(account(to), vt)],
        success: vec![
            put(account(from), bf - amount),
            put(account(to), bt + amount),
        ],
        ..Default::default()
    };
    match c.txn(req).await {
        Ok(r) => Some(r.succeeded),
        Err(s) if s.code() == Code::Aborted || ordo_proto::certainly_not_applied(&s) => Some(false),
        Err(_) => None,
    }
}

/// Transfer clients and auditors running against a router until stopped (each at most 90 s).
/// Every audit that answers must sum to the total.
struct BankLoad {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    conflicts: Arc<AtomicU64>,
    audits: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl BankLoad {
    /// `auditors` read every account in one read-only Txn every `audit_every`.
    fn start(c: &Client, transfer_clients: u64, auditors: u64, audit_every: Duration) -> BankLoad {
        let load = BankLoad {
            stop: Arc::new(AtomicBool::new(false)),
            committed: Arc::new(AtomicU64::new(0)),
            conflicts: Arc::new(AtomicU64::new(0)),
            audits: Arc::new(AtomicU64::new(0)),
            tasks: Vec::new(),
        };
        let mut tasks = Vec::new();
        for w in 0..transfer_clients {
            let (c, stop) = (c.clone(), load.stop.clone());
            let (committed, conflicts) = (load.committed.clone(), load.conflicts.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = SplitMix64(0x9E37_79B9_7F4A_7C15u64 ^ (w + 1));
                let mut next = move || rng.next_u64();
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(90) {
                    let from = (next() % ACCOUNTS as u64) as usize;
                    let to = (from + 1 + (next() % (ACCOUNTS as u64 - 1)) as usize) % ACCOUNTS;
                    match transfer(&c, from, to, 1 + next() % 10).await {
                        Some(true) => committed.fetch_add(1, Ordering::Relaxed),
                        _ => conflicts.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        for _ in 0..auditors {
            let (c, stop, audits) = (c.clone(), load.stop.clone(), load.audits.clone());
            tasks.push(tokio::spawn(async move {
                let all: Vec<usize> = (0..ACCOUNTS).collect();
                while !stop.load(Ordering::Relaxed) {
                    // Reading every account holds every account against writers for the
                    // audit's duration: auditors check periodically.
                    tokio::time::sleep(audit_every).await;
                    if let Ok(b) = read_accounts(&c, &all).await {
                        assert_eq!(total(&b), ACCOUNTS as u64 * INITIAL, "an audit saw {b:?}");
                        audits.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        BankLoad { tasks, ..load }
    }

    fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    fn audits(&self) -> u64 {
        self.audits.load(Ordering::Relaxed)
    }

    /// Stops the clients; `(committed, conflicted or failed, audits)`.
    async fn stop(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.committed.load(Ordering::Relaxed),
            self.conflicts.load(Ordering::Relaxed),
            self.audits.load(Ordering::Relaxed),
        )
    }
}

async fn bank() -> (InProcCluster, Client) {
    bank_with(None).await
}

/// The bank's playground (3 groups of 3), with `filter` on every group's raft traffic, its
/// accounts created.
async fn bank_with(filter: Option<Filter>) -> (InProcCluster, Client) {
    let pg = InProcCluster::start_filtered(3, 3, filter).await;
    let c = pg.client();
    open_accounts(&c).await;
    (pg, c)
}

/// Creates every account with the initial balance (each at version 1).
pub(crate) async fn open_accounts(c: &Client) {
    for i in 0..ACCOUNTS {
        c.put(account(i), "", INITIAL.to_string(), None)
            .await
            .unwrap();
    }
}

fn total(balances: &[(u64, u64)]) -> u64 {
    balances.iter().map(|b| b.1).sum()
}

/// Waits until every replica at `addrs` holds no lock (bounded), else fails naming it.
async fn assert_no_locks_at(addrs: impl IntoIterator<Item = String>) {
    for addr in addrs {
        wait_for(
            &format!("replica {addr} to hold no locks"),
            Duration::from_secs(15),
            || {
                let addr = addr.clone();
                async move { node_status(&addr, false).await.filter(|s| s.locks == 0) }
            },
        )
        .await;
    }
}

async fn assert_no_locks_left(pg: &InProcCluster) {
    assert_no_locks_at(pg.groups.values().flatten().map(|n| n.addr.to_string())).await;
}

/// Acceptance 1: 16 clients transfer between random accounts on 3 groups while auditors read
/// every balance in one read-only Txn; every audit and the end state sum to the initial total.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bank_transfers_across_groups_keep_the_total() {
    let _heavy = ordo_testkit::HEAVY.lock().await;
    let (pg, c) = bank().await;
    let all: Vec<usize> = (0..ACCOUNTS).collect();
    let map = pg.router.shard_map();
    let groups: std::collections::BTreeSet<u64> = all
        .iter()
        .map(|&i| map.slot_owner[ordo_proto::slot_of(&account(i), map.slot_count) as usize])
        .collect();
    assert_eq!(groups.len(), 3, "the accounts span every group");

    let load_started = Instant::now();
    let load = BankLoad::start(&c, 16, 2, Duration::from_millis(100));
    wait_for(
        "100 transfers and 10 audits",
        Duration::from_secs(120),
        || async { (load.committed() >= 100 && load.audits() >= 10).then_some(()) },
    )
    .await;
    let (committed, conflicts, audits) = load.stop().await;
    eprintln!(
        "bank: {:?}: {committed} transfers committed, {conflicts} conflicted or aborted, {audits} \
         audits",
        load_started.elapsed()
    );
    assert_no_locks_left(&pg).await;
    let end = read_accounts(&c, &all).await.unwrap();
    assert_eq!(total(&end), ACCOUNTS as u64 * INITIAL);
    let mut sum = 0;
    for i in 0..ACCOUNTS {
        let g = c.get(account(i), "", false).await.unwrap();
        sum += std::str::from_utf8(&g.value)
            .unwrap()
            .parse::<u64>()
            .unwrap();
    }
    assert_eq!(sum, ACCOUNTS as u64 * INITIAL);
}

/// Two accounts on different groups.
pub(crate) fn two_groups_apart(pg: &InProcCluster) -> (usize, usize) {
    let map = pg.router.shard_map();
    let owner =
        |i: usize| map.slot_owner[ordo_proto::slot_of(&account(i), map.slot_count) as usize];
    let b = (1..ACCOUNTS).find(|&i| owner(i) != owner(0)).unwrap();
    (0, b)
}

pub(crate) async fn router_with(pg: &InProcCluster, fp: Failpoint) -> (Router, Client) {
    router_with_options(pg, stopping_at(fp)).await
}

/// A router with `options` and a client of it that makes one attempt per call: a test of a
/// coordinator stopping half-way sees the answer of the stopped coordination itself (the client
/// would resend a keyed Txn, and the resend can find the first one's outcome).
async fn router_with_options(pg: &InProcCluster, options: RouterOptions) -> (Router, Client) {
    let router = Router::start_with_options(
        RouterConfig {
            listen: "127.0.0.1:0".into(),
            config_addrs: pg.config_addrs.clone(),
        },
        options,
    )
    .await
    .unwrap();
    let c = Client::connect(vec![router.addr.to_string()])
        .unwrap()
        .with_timeout(Duration::from_secs(10))
        .with_max_attempts(1);
    (router, c)
}

/// Two accounts on different groups, their balances, and a transfer of 7 between them through a
/// router (with `options`) that stops at its failpoint and so cannot say how it ended.
async fn stopped_transfer(
    pg: &InProcCluster,
    c: &Client,
    options: RouterOptions,
) -> (usize, usize, Vec<(u64, u64)>) {
    let (a, b) = two_groups_apart(pg);
    let before = read_accounts(c, &[a, b]).await.unwrap();
    let (router, dying) = router_with_options(pg, options).await;
    assert_eq!(
        transfer(&dying, a, b, 7).await,
        None,
        "the coordinator stopped"
    );
    router.shutdown().await;
    (a, b, before)
}

fn stopping_at(fp: Failpoint) -> RouterOptions {
    RouterOptions {
        twopc_failpoint: Some(fp),
        ..Default::default()
    }
}

/// Acceptance 2 and 3: a router stops after every part is prepared (no decision) or after the
/// decision (no part finished); then, for good measure, the leader of a participant changes with
/// the locks held. The next reader resolves the locks within the lock timeout (plus a margin):
/// undecided → both accounts unchanged, decided → both changed. Never one without the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_that_stops_leaves_locks_that_readers_resolve_atomically() {
    let _heavy = ordo_testkit::HEAVY.lock().await;
    let (mut pg, c) = bank().await;
    let (a, b) = (two_groups_apart(&pg).0, two_groups_apart(&pg).1);
    // Each group can lose one replica of three: the two leader kills hit different groups.
    for (fp, kill_leader_of) in [
        (Failpoint::AfterPrepare, None),
        (Failpoint::AfterDecide, None),
        (Failpoint::AfterPrepare, Some(b)),
        (Failpoint::AfterDecide, Some(a)),
    ] {
        let before = read_accounts(&c, &[a, b]).await.unwrap();
        let (router, dying) = router_with(&pg, fp).await;
        let r = transfer(&dying, a, b, 7).await;
        assert_eq!(
            r, None,
            "{fp:?}: the stopped coordinator cannot say how it ended"
        );
        router.shutdown().await;
        if let Some(acct) = kill_leader_of {
            // The account's group loses its leader while it holds the locks.
            let map = pg.router.shard_map();
            let g = map.slot_owner[ordo_proto::slot_of(&account(acct), map.slot_count) as usize];
            let leader = pg.find_leader(g).await.expect("a leader");
            assert!(pg.status(leader, false).await.unwrap().locks > 0);
            pg.kill(leader).await;
        }
        // A plain Get of one locked account (the single-group path) waits and resolves...
        let started = Instant::now();
        let single = c.get(account(b), "", false).await.unwrap();
        let took = started.elapsed();
        // ...and a read-only Txn over both then sees both sides of the same outcome.
        let after = read_accounts(&c, &[a, b]).await.unwrap();
        assert_eq!(
            std::str::from_utf8(&single.value).unwrap(),
            after[1].1.to_string()
        );
        assert!(
            took < Duration::from_millis(ordo_proto::TXN_LOCK_TIMEOUT_MS + 5_000),
            "{fp:?}: resolving took {took:?}"
        );
        let moved = before[0].1 - after[0].1;
        assert_eq!(
            after[1].1 - before[1].1,
            moved,
            "{fp:?}: half a transfer: {before:?} → {after:?}"
        );
        match fp {
            Failpoint::AfterPrepare => assert_eq!(moved, 0, "an undecided transfer is aborted"),
            Failpoint::AfterDecide | Failpoint::AfterPrimaryFinish => {
                assert_eq!(moved, 7, "a decided transfer commits")
            }
        }
        eprintln!(
            "{fp:?} (leader of account {kill_leader_of:?}'s group stopped): resolved in {took:?}"
        );
    }
}

/// The group owning `acct`'s slot.
fn group_of(pg: &InProcCluster, acct: usize) -> u64 {
    let map = pg.router.shard_map();
    map.slot_owner[ordo_proto::slot_of(&account(acct), map.slot_count) as usize]
}

/// Audit H7 (a): the coordinator dies after finishing the primary's part, and the primary's
/// slot is moved at once. The decision moves with the slot, so the other part, resolved later
/// through the slot's new owner, commits too: never half a transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h7_a_decision_moves_with_the_primarys_slot() {
    let _heavy = ordo_testkit::HEAVY.lock().await;
    let (pg, c) = bank().await;
    let (a, b, before) =
        stopped_transfer(&pg, &c, stopping_at(Failpoint::AfterPrimaryFinish)).await;
    let (ga, gb) = (group_of(&pg, a), group_of(&pg, b));
    // The primary (account a, the first compare) is finished; b's part is still locked.
    let map = pg.router.shard_map();
    let slot = ordo_proto::slot_of(&account(a), map.slot_count);
    let third = map
        .groups
        .iter()
        .map(|g| g.id)
        .find(|g| *g != ga && *g != gb);
    let cc = ordo_proto::client::ClusterClient::connect(pg.config_addrs.clone())
        .unwrap()
        .with_timeout(Duration::from_secs(30));
    let started = Instant::now();
    cc.move_slots(vec![slot], third.unwrap()).await.unwrap();
    eprintln!("the primary's slot moved in {:?}", started.elapsed());
    let after = wait_for(
        "both accounts readable",
        Duration::from_secs(20),
        || async { read_accounts(&c, &[a, b]).await.ok() },
    )
    .await;
    assert_eq!(
        (before[0].1 - after[0].1, after[1].1 - before[1].1),
        (7, 7),
        "the decided transfer commits on both sides: {before:?} → {after:?}"
    );
    assert_no_locks_left(&pg).await;
    pg.shutdown().await;
}

/// Audit H7 (b): a coordinator whose clock is 5 s ahead dies after preparing. Its locks age by
/// the clocks of the groups holding them, from when they applied them, so a reader resolves
/// them after the lock timeout, not after timeout + skew, and the outcome is whole (aborted
/// on both sides). A router's clock only orders transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h7_a_coordinator_clock_ahead_neither_extends_nor_breaks_its_locks() {
    let _heavy = ordo_testkit::HEAVY.lock().await;
    let (pg, c) = bank().await;
    let skewed = RouterOptions {
        clock_offset_ms: 5_000,
        ..stopping_at(Failpoint::AfterPrepare)
    };
    let (a, b, before) = stopped_transfer(&pg, &c, skewed).await;
    // A plain Get (no transaction, so no wound-wait) waits for the lock to expire.
    let started = Instant::now();
    c.get(account(b), "", false).await.unwrap();
    let took = started.elapsed();
    let after = read_accounts(&c, &[a, b]).await.unwrap();
    assert_eq!(
        after, before,
        "an undecided transfer is aborted on both sides"
    );
    assert!(
        took < Duration::from_millis(ordo_proto::TXN_LOCK_TIMEOUT_MS + 2_500),
        "resolving took {took:?}: the coordinator's clock stretched its locks"
    );
    eprintln!("locks of a coordinator 5 s ahead resolved in {took:?}");
    pg.shutdown().await;
}

/// Audit M4: a coordinator dies after preparing a transfer between two cold accounts, and both
/// slots are moved at once. Nobody touches the accounts: the groups' leaders resolve the
/// orphaned locks themselves once they are older than the lock timeout, so the fences that wait
/// for them go through and the moves succeed, and the transfer is aborted on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn m4_orphaned_locks_on_cold_keys_do_not_block_moving_their_slots() {
    let _heavy = ordo_testkit::HEAVY.lock().await;
    let (pg, c) = bank().await;
    let (a, b, before) = stopped_transfer(&pg, &c, stopping_at(Failpoint::AfterPrepare)).await;
    let (ga, gb) = (group_of(&pg, a), group_of(&pg, b));
    let map = pg.router.shard_map();
    let slots = [a, b].map(|i| ordo_proto::slot_of(&account(i), map.slot_count));
    let third = map
        .groups
        .iter()
        .map(|g| g.id)
        .find(|g| *g != ga && *g != gb);
    let cc = ordo_proto::client::ClusterClient::connect(pg.config_addrs.clone())
        .unwrap()
        .with_timeout(Duration::from_secs(60));
    let started = Instant::now();
    let moved = cc.move_slots(slots.to_vec(), third.unwrap()).await;
    let took = started.elapsed();
    moved.unwrap_or_else(|e| panic!("the move failed after {took:?}: {e}"));
    assert!(
        took < Duration::from_millis(ordo_proto::TXN_LOCK_TIMEOUT_MS + 8_000),
        "the move took {took:?}"
    );
    eprintln!("both slots of an orphaned transfer moved in {took:?}");
    let after = read_accounts(&c, &[a, b]).await.unwrap();
    assert_eq!(
        (after[0].1, after[1].1),
        (before[0].1, before[1].1),
        "an undecided transfer is aborted on both sides"
    );
    assert_no_locks_left(&pg).await;
    pg.shutdown().await;
}

/// Acceptance 3 with real processes: while transfers and audits run through a router, the
/// leaders of both groups are killed (-9) and restarted, so prepares and finishes are cut in
/// every phase. Every audit that answers sums to the total, and so does the end state once the
/// locks left by cut transactions are resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bank_keeps_the_total_while_participant_leaders_are_killed() {
    let _heavy = ordo_testkit::HEAVY.lock().await;
    use ordo_testkit::proc::ProcCluster;
    let limit = Duration::from_secs(30);
    let mut cluster = ProcCluster::start(ordo_testkit::bins!(), 2, 3);
    cluster.init(limit).await;
    let c = cluster.client().with_timeout(Duration::from_secs(10));
    wait_for("the router to serve", limit, || async {
        c.put(account(0), "", INITIAL.to_string(), None).await.ok()
    })
    .await;
    for i in 1..ACCOUNTS {
        c.put(account(i), "", INITIAL.to_string(), None)
            .await
            .unwrap();
    }
    let all: Vec<usize> = (0..ACCOUNTS).collect();
    let load = BankLoad::start(&c, 8, 1, Duration::ZERO);
    for round in 0..4u64 {
        let before = load.committed();
        wait_for("transfers to flow", limit, || async {
            (load.committed() >= before + 50).then_some(())
        })
        .await;
        let group = 1 + round % 2;
        let leader = cluster.wait_leader(group, limit).await;
        cluster.kill(leader).await;
        cluster.wait_leader(group, limit).await;
        cluster.restart(leader).await;
        cluster.answers(leader, limit).await;
    }
    let (committed, _, audits) = load.stop().await;
    // Reading every account resolves what cut transactions left locked.
    let end = wait_for("a final audit", limit, || async {
        read_accounts(&c, &all).await.ok()
    })
    .await;
    assert_eq!(total(&end), ACCOUNTS as u64 * INITIAL);
    eprintln!("bank under leader kills: {committed} transfers committed, {audits} audits");
    assert_no_locks_at((1..=2).flat_map(|g| cluster.addrs(g))).await;
}

/// Acceptance 4, the rebalance half: transfers and audits keep the total while a 4th group is
/// added and the slots are rebalanced onto it (a move takes no new lock in its slots and fences
/// only once their locks are gone, so no transaction is split by a move).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bank_keeps_the_total_during_a_rebalance() {
    use ordo_proto::v1::{MigrationState, RebalanceRequest};
    let _heavy = ordo_testkit::HEAVY.lock().await;
    let (pg, c) = bank().await;
    let all: Vec<usize> = (0..ACCOUNTS).collect();
    let load = BankLoad::start(&c, 16, 1, Duration::from_millis(100));
    wait_for("transfers to flow", Duration::from_secs(60), || async {
        (load.committed() >= 30).then_some(())
    })
    .await;
    let cc = crate::resharding::admin(&pg);
    let (nodes4, _, _) = crate::resharding::start_and_add_group(&pg, &cc, 4).await;
    let before_moves = load.committed();
    // A move may also give up (a lock its fence waited for outlived the wait): that is an
    // allowed outcome, as long as the total holds and moves do complete.
    if let Err(e) = cc.rebalance(RebalanceRequest::default()).await {
        assert_eq!(e.code(), tonic::Code::Aborted, "{e}");
        eprintln!("a move gave up: {}", e.message());
    }
    let moves = cc.list_migrations().await.unwrap().migrations;
    let done = moves
        .iter()
        .filter(|m| m.state == MigrationState::Done as i32)
        .count();
    assert!(done > 0, "no move completed: {moves:?}");
    let during = load.committed() - before_moves;
    let (_, _, audits) = load.stop().await;
    let end = wait_for("a final audit", Duration::from_secs(30), || async {
        read_accounts(&c, &all).await.ok()
    })
    .await;
    assert_eq!(total(&end), ACCOUNTS as u64 * INITIAL);
    eprintln!(
        "bank during a rebalance: {done} of {} moves done, {during} transfers committed during \
         the moves, {audits} audits",
        moves.len(),
    );
    assert!(during > 0, "transfers stopped during the moves");
    for n in nodes4 {
        n.shutdown().await;
    }
    pg.shutdown().await;
}

/// Acceptance 4, the fault half: the bank under seeded network fault episodes on the raft
/// traffic of every group (an isolated replica, which is the leader a third of the time, a
/// one-way cut, a bridge, lossy links with drops, duplicates and delays), each healed after
/// 1.5 s; every audit and the end state sum to the total. `ORDO_FAULT_SEED=n` replays a seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bank_keeps_the_total_under_network_faults() {
    use ordo_testkit::faults::{FaultNet, LinkFaults};
    let _heavy = ordo_testkit::HEAVY.lock().await;
    let seed = ordo_testkit::env_u64("ORDO_FAULT_SEED").unwrap_or(11);
    let net = Arc::new(FaultNet::new(seed));
    let (pg, c) = bank_with(Some(net.clone() as Filter)).await;
    let load = BankLoad::start(&c, 16, 1, Duration::from_millis(100));
    wait_for("transfers to flow", Duration::from_secs(60), || async {
        (load.committed() >= 30).then_some(())
    })
    .await;
    let mut rng = SplitMix64(seed);
    let ids = [1u64, 2, 3];
    for episode in 0..6 {
        let what = match rng.range(0, 3) {
            0 => {
                let n = *rng.pick(&ids);
                net.isolate(n, &ids);
                format!("replica {n} of every group isolated")
            }
            1 => {
                let n = *rng.pick(&ids);
                for other in ids.iter().filter(|o| **o != n) {
                    net.block(n, *other);
                }
                format!("replica {n} of every group cannot send")
            }
            2 => {
                let b = *rng.pick(&ids);
                let (x, y): (Vec<u64>, Vec<u64>) = (
                    ids.iter().copied().filter(|i| *i != b).take(1).collect(),
                    ids.iter().copied().filter(|i| *i != b).skip(1).collect(),
                );
                net.bridge(x[0], b, y[0]);
                format!("replicas {} and {} cut, bridged by {b}", x[0], y[0])
            }
            _ => {
                net.set_link_faults(LinkFaults {
                    drop: 0.1,
                    duplicate: 0.05,
                    delay: 0.2,
                    delay_max: Duration::from_millis(30),
                });
                "every link drops 10%, duplicates 5%, delays 20% up to 30 ms".to_string()
            }
        };
        eprintln!("seed {seed}, episode {episode}: {what}");
        // The episode's length, part of the schedule (not a wait for anything).
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        net.heal();
        let before = load.committed();
        wait_for(
            &format!("seed {seed}: transfers to go on after episode {episode}"),
            Duration::from_secs(30),
            || async { (load.committed() >= before + 5).then_some(()) },
        )
        .await;
    }
    let (committed, conflicts, audits) = load.stop().await;
    let all: Vec<usize> = (0..ACCOUNTS).collect();
    let end = wait_for("a final audit", Duration::from_secs(30), || async {
        read_accounts(&c, &all).await.ok()
    })
    .await;
    assert_eq!(total(&end), ACCOUNTS as u64 * INITIAL, "seed {seed}");
    eprintln!(
        "bank under network faults (seed {seed}): {committed} transfers committed, {conflicts} \
         conflicted or failed, {audits} audits; {:?}",
        net.stats()
    );
    assert!(
        net.stats().blocked + net.stats().dropped > 0,
        "no fault was injected"
    );
    pg.shutdown().await;
}

/// Retryable writes across groups (issue 12, audit M9): a keyed transfer whose coordinator
/// stopped after recording its decision, so that its client heard "outcome unknown", is sent
/// again with the same key through another router. It answers the first outcome (succeeded,
/// each account at its next version) instead of a failed compare its own first coordination
/// caused, and the money moved once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn m9_a_cross_group_txn_resent_after_its_coordinator_stopped_is_applied_once() {
    let _heavy = ordo_testkit::HEAVY.lock().await;
    let (pg, c) = bank().await;
    let (a, b) = two_groups_apart(&pg);
    let before = read_accounts(&c, &[a, b]).await.unwrap();
    let [(va, ba), (vb, bb)] = before[..] else {
        unreachable!()
    };
    let req = TxnRequest {
        header: Some(RequestHeader {
            map_version: 0,
            idempotency_key: Bytes::from_static(b"m9-cross-group-transfer"),
        }),
        compares: vec![version_is(account(a), va), version_is(account(b), vb)],
        success: vec![put(account(a), ba - 7), put(account(b), bb + 7)],
        ..Default::default()
    };
    let (router, dying) = router_with(&pg, Failpoint::AfterDecide).await;
    let unknown = dying.txn(req.clone()).await.unwrap_err();
    assert_eq!(unknown.code(), Code::Unavailable, "{unknown:?}");
    assert!(!ordo_proto::certainly_not_applied(&unknown));
    router.shutdown().await;

    let versions = |r: &TxnResponse| -> Vec<u64> {
        r.results
            .iter()
            .map(|r| match &r.result {
                Some(txn_op_result::Result::Put(p)) => p.version,
                other => panic!("{other:?}"),
            })
            .collect()
    };
    let resent = c.txn(req.clone()).await.unwrap();
    assert!(
        resent.succeeded,
        "the first coordination's outcome: {resent:?}"
    );
    assert_eq!(versions(&resent), [va + 1, vb + 1]);
    assert_eq!(c.txn(req).await.unwrap(), resent, "and again");
    assert_eq!(
        read_accounts(&c, &[a, b]).await.unwrap(),
        [(va + 1, ba - 7), (vb + 1, bb + 7)],
        "moved once"
    );
    pg.shutdown().await;
}
