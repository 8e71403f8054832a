//! Issue 12's first reproduction (audit C2), from outside: 40 items of 1 MiB under one shard
//! key in an `ordo playground --groups 1`, then 32 concurrent read-only `Txn`s of 40 `Get`s
//! each (about 1 KB per request) through its router. (The issue used 100 items; 40 is ten times
//! the 4 MiB budget and keeps the unbounded case, 32 reads of 40 MiB, five times over the bound
//! below, in 60% less loading time.) Before the result budgets the playground's
//! RSS peaked at 3.96 GB and every one failed with `OUT_OF_RANGE` after going through the raft
//! log; now each is refused with `RESOURCE_EXHAUSTED` naming the limit, none reaches the log, and
//! the peak stays bounded.

use std::process::Child;
use std::time::Duration;

use futures::future::join_all;
use futures::stream::{self, StreamExt};
use ordo_proto::client::{Client, ClusterClient};
use ordo_proto::v1::{txn_op, txn_op_result, GetRequest, TxnOp, TxnRequest};
use ordo_testkit::wait_for;

use crate::playground::{free_base_port, interrupt_and_wait, start_with, wait_ready};

const ITEMS: usize = 40;
const READERS: usize = 32;
const MIB: u64 = 1024 * 1024;
const SK: &str = "order-big";
/// How much the playground's RSS may grow while the 32 oversized reads run: each may hold its
/// 4 MiB budget and the 1 MiB item that broke it at once, 160 MiB in all, plus slack for the
/// allocator. Unbounded, each held 40 MiB on each of 3 replicas (the issue measured a peak of
/// 3.96 GB for a playground holding 300 MB).
const PEAK_RSS_GROWTH_MAX: u64 = 256 * MIB;
/// The playground's peak RSS at most: before the reads it holds 3 replicas of 40 MiB (sled's
/// caches of the items and of the raft logs that carried them) plus the config group and the
/// router, about 450 MiB in a debug build.
const PEAK_RSS_MAX: u64 = 1536 * MIB;

/// The playground child, killed if the test fails before it is stopped cleanly.
struct Playground(Option<Child>);

impl Drop for Playground {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `/proc/<pid>/status`'s `name` line, in bytes (it is given in kB).
fn proc_status_bytes(pid: u32, name: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"));
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Resets the process's peak RSS (`VmHWM`) to its current RSS, so that the peak of one phase
/// is measured apart from the loading before it.
fn reset_peak_rss(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

fn gets(n: usize) -> TxnRequest {
    TxnRequest {
        success: (0..n)
            .map(|i| TxnOp {
                op: Some(txn_op::Op::Get(GetRequest {
                    shard_key: SK.into(),
                    key: format!("item/{i:03}").into(),
                    ..Default::default()
                })),
            })
            .collect(),
        ..Default::default()
    }
}

/// Where group 1's log stands, once its replicas agree on it (nothing is being applied).
#[derive(Debug, Clone, Copy, PartialEq)]
struct LogAt {
    applied: u64,
    term: u64,
}

impl LogAt {
    /// Entries applied since `before` that a request may have added: every new leader appends
    /// one empty entry of its own (on a loaded machine elections happen), anything more came
    /// through the log.
    fn entries_since(self, before: LogAt) -> u64 {
        (self.applied - before.applied).saturating_sub(self.term - before.term)
    }
}

async fn settled(cluster: &ClusterClient) -> LogAt {
    wait_for(
        "group 1's replicas to agree on an applied index",
        Duration::from_secs(20),
        || async {
            let status = cluster.cluster_status().await.ok()?;
            let g = status.groups.into_iter().find(|g| g.id == 1)?;
            let applied: Vec<u64> = g.replicas.iter().map(|r| r.applied_index).collect();
            let term = g.replicas.iter().map(|r| r.term).max()?;
            (applied.len() == 3 && g.replicas.iter().all(|r| r.reachable))
                .then_some(applied[0])
                .filter(|a| applied.iter().all(|x| x == a))
                .map(|applied| LogAt { applied, term })
        },
    )
    .await
}

/// Puts the items, a few at a time (the raft log carries each 1 MiB value).
async fn load(client: &Client) {
    stream::iter(0..ITEMS)
        .map(|i| {
            let client = client.clone();
            async move {
                let value = vec![i as u8; MIB as usize];
                client
                    .put(SK, format!("item/{i:03}"), value, None)
                    .await
                    .unwrap_or_else(|e| panic!("put item {i}: {e}"));
            }
        })
        .buffer_unordered(4)
        .collect::<Vec<()>>()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c2_oversized_read_only_txns_are_refused_without_the_log_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    // Without the change feed: its events would double the data the bound is set from, and
    // what is measured here is the reads' result budget.
    let mut pg = Playground(Some(start_with(
        dir.path(),
        free_base_port(),
        &["--groups", "1", "--feed-capture", "off"],
    )));
    let pid = pg.0.as_ref().unwrap().id();
    let router = wait_ready(pg.0.as_mut().unwrap());
    let client = Client::connect(vec![router.clone()])
        .unwrap()
        .with_timeout(Duration::from_secs(30));
    let cluster = ClusterClient::connect(vec![router]).unwrap();
    load(&client).await;

    // Within the budget: the right values, and no raft entry.
    let before = settled(&cluster).await;
    for _ in 0..5 {
        let r = client.txn(gets(4)).await.expect("a read of 4 MiB fits");
        for (i, op) in r.results.iter().enumerate() {
            match op.result.as_ref() {
                Some(txn_op_result::Result::Get(g)) => assert!(
                    g.found
                        && g.value.len() == MIB as usize
                        && g.value.iter().all(|b| *b == i as u8),
                    "item {i}: found={} {} bytes",
                    g.found,
                    g.value.len()
                ),
                other => panic!("op {i}: {other:?}"),
            }
        }
    }
    let after = settled(&cluster).await;
    assert_eq!(
        after.entries_since(before),
        0,
        "read-only Txns went through the log: {before:?} -> {after:?}"
    );

    // Over it: 32 at once, each refused, none through the log, memory bounded.
    let resident = proc_status_bytes(pid, "VmRSS:");
    reset_peak_rss(pid);
    let refusals = join_all((0..READERS).map(|_| client.txn(gets(ITEMS)))).await;
    let peak = proc_status_bytes(pid, "VmHWM:");
    for (j, r) in refusals.iter().enumerate() {
        let status = r.as_ref().expect_err("a read of 40 MiB is refused");
        assert_eq!(
            status.code(),
            tonic::Code::ResourceExhausted,
            "reader {j}: {status:?}"
        );
        assert!(
            status
                .message()
                .contains("TXN_RESULT_BYTES_MAX (4194304 bytes)"),
            "reader {j}: {}",
            status.message()
        );
    }
    let after = settled(&cluster).await;
    assert_eq!(
        after.entries_since(before),
        0,
        "refused reads went through the log: {before:?} -> {after:?}"
    );
    println!(
        "playground RSS {} MiB before {READERS} oversized read-only Txns, peak {} MiB during them",
        resident / MIB,
        peak / MIB
    );
    assert!(
        peak < PEAK_RSS_MAX && peak < resident + PEAK_RSS_GROWTH_MAX,
        "the playground's RSS grew from {} MiB to a peak of {} MiB",
        resident / MIB,
        peak / MIB
    );

    // The applied index does move for a write: the checks above could fail.
    let before = settled(&cluster).await;
    client.put(SK, "written", "x", None).await.unwrap();
    let after = settled(&cluster).await;
    assert!(after.entries_since(before) > 0, "{before:?} -> {after:?}");
    interrupt_and_wait(pg.0.take().unwrap());
}
