//! The change feed under a seeded fault schedule (issue 13, acceptance 1): the schedules of
//! `faults.rs` (partitions, one-way cuts, message loss, duplication and delay, replica crashes)
//! on the raft traffic of a cluster's one shard group, with the resharding load through its
//! router and a watcher from the oldest event; the test kit's feed checker then proves every
//! acknowledged write in the feed exactly once, per item in version order and per slot with no
//! gap, an unknown one at most once and as the final data says. The seed is printed first;
//! `ORDO_FAULT_SEED=n` replays it (the schedule exactly, the interleaving as closely as
//! `faults.rs` says).

use std::sync::Arc;

use ordo_testkit::faults::FaultNet;
use ordo_testkit::inproc::{Filter, InProcCluster};
use ordo_testkit::{env_u64, Cluster, Member};

use crate::faults::{run_episodes, Faulted, Schedule, Trace, FAULT_MS, REPLICAS};
use crate::feed_moves::FeedRun;
use crate::resharding::start_load;

/// The one shard group.
const GROUP: u64 = 1;
/// Clients of the load: few, so that a schedule leaves the CPU to raft's timers.
const CLIENTS: u64 = 4;

/// A whole cluster whose shard group's raft traffic goes through `net`, as a schedule sees it.
struct FaultedCluster {
    pg: InProcCluster,
    net: Arc<FaultNet>,
}

impl Faulted for FaultedCluster {
    fn net(&self) -> &FaultNet {
        &self.net
    }

    fn ids(&self) -> Vec<u64> {
        self.pg.members(GROUP).into_iter().map(|m| m.id).collect()
    }

    fn leader(&self) -> Option<u64> {
        self.pg.leader_of(GROUP)
    }

    fn roles(&self) -> String {
        self.pg.roles_of(GROUP)
    }

    async fn crash(&mut self, id: u64) {
        self.pg.kill(Member::new(GROUP, id)).await
    }

    async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        self.pg.restart(Member::new(GROUP, id)).await;
        Ok(())
    }
}

/// By default the first seed whose schedule partitions the group, loses messages and crashes a
/// replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn feed_under_a_seeded_fault_schedule_delivers_every_acknowledged_write_once() {
    let _heavy = ordo_testkit::HEAVY.lock().await;
    let seed = env_u64("ORDO_FAULT_SEED").unwrap_or_else(|| {
        (1..)
            .find(|&s| Schedule::generate(s, FAULT_MS).partitions_loses_and_crashes())
            .unwrap()
    });
    let schedule = Schedule::generate(seed, FAULT_MS);
    eprintln!(
        "feed under faults, seed {seed} (replay: ORDO_FAULT_SEED={seed} cargo test -p ordo \
         --test cluster feed_under_a_seeded -- --nocapture)\n{schedule}"
    );
    let net = Arc::new(FaultNet::new(seed));
    let pg = InProcCluster::start_filtered(1, REPLICAS, Some(net.clone() as Filter)).await;
    let router = pg.router_addr();
    let feed = FeedRun::start(&format!("under fault seed {seed}"), &router).await;
    let load = start_load(&router, CLIENTS);
    load.wait_ops(50, "the load to get going").await;
    let trace = Trace::new(&load.history);
    let mut cluster = FaultedCluster { pg, net };
    let crashes = run_episodes(&schedule, &mut cluster, &trace)
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: {e:#}\n{}", trace.text()));
    eprintln!(
        "seed {seed}: {crashes} crashes, net {:?}; what happened:\n{}",
        cluster.net.stats(),
        trace.text()
    );
    let finished = load.finish_with(&router, 0, true).await;
    feed.check(&finished, Vec::new()).await;
    cluster.pg.shutdown().await;
}
