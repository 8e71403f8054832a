//! Clusters of in-process nodes: one shard group ([`InProcGroup`], the fault schedules' group)
//! or a whole [`Playground`] ([`InProcCluster`]). A kill is a clean stop of the node
//! (`Node::shutdown`: in-flight requests fail, storage is closed); a restart starts it again
//! on its data dir. Leadership is read from the replicas' own state, without an RPC.

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use ordo::limits::{COMPACT_LOG_ENTRIES_DEFAULT, SLOT_COUNT_DEFAULT};
use ordo::node::{Node, NodeConfig};
use ordo::playground::{start_extra_group, Playground, PlaygroundConfig};
use ordo_proto::client::Client;
use ordo_proto::v1::GroupSpec;

use crate::cluster::{Cluster, Member, CONFIG_GROUP};
use crate::ports::free_addr;
use crate::wait::poll_until;

/// What the product's transport is handed to filter a replica's raft traffic (e.g. a
/// [`FaultNet`](crate::faults::FaultNet)).
pub type Filter = Arc<dyn ordo::LinkFilter>;

/// How long a restart keeps trying while the stopped node's port or storage lock is released.
const RESTART_BOUND: Duration = Duration::from_secs(10);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

/// Whether an in-process node believes it leads, and its raft term.
pub fn raft_role(node: &Node) -> (bool, u64) {
    let s = &node.replica.shared;
    (
        s.is_leader.load(Ordering::Relaxed) == 1,
        s.term.load(Ordering::Relaxed),
    )
}

/// The node of `nodes` that believes it leads in the highest term, by position.
fn leader_among<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Option<&'a Node> {
    nodes
        .into_iter()
        .filter(|n| raft_role(n).0)
        .max_by_key(|n| raft_role(n).1)
}

/// Each node's view: `n2 L/t3` = node 2 leads in term 3, `F` follows, `-` is down.
fn roles_text<'a>(ids: Vec<u64>, running: impl Fn(u64) -> Option<&'a Node>) -> String {
    ids.into_iter()
        .map(|id| match running(id) {
            Some(n) => {
                let (leads, term) = raft_role(n);
                format!("n{id} {}/t{term}", if leads { "L" } else { "F" })
            }
            None => format!("n{id} -"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn node_config(
    id: u64,
    group: u64,
    peers: &BTreeMap<u64, String>,
    data_dir: PathBuf,
    compact_log_entries: u64,
    filter: Option<Filter>,
) -> NodeConfig {
    NodeConfig {
        id,
        group,
        listen: peers[&id].clone(),
        peers: peers.clone(),
        data_dir,
        compact_log_entries,
        dedup_window_secs: ordo::limits::DEDUP_WINDOW_SECS_DEFAULT,
        slot_count: SLOT_COUNT_DEFAULT,
        config_server: group == CONFIG_GROUP,
        copy_bytes_per_sec: 0,
        link_filter: filter,
        join: false,
        serve: Default::default(),
        feed: Default::default(),
        cache_bytes: ordo::limits::CACHE_BYTES_MIN,
    }
}

/// Starts `cfg`, retrying while the previous holder of its port or storage lets go.
async fn start_node(cfg: NodeConfig) -> anyhow::Result<Node> {
    let what = format!("node {} of group {} to start", cfg.id, cfg.group);
    let started = poll_until(&what, RESTART_BOUND, Duration::from_millis(100), || {
        let cfg = cfg.clone();
        async move {
            Node::start(cfg).await.map_err(|e| {
                tracing::debug!(error = %e, "restart failed; retrying");
                e
            })
        }
    })
    .await;
    started.map_err(|e| e.last.context(format!("restarting node {}", cfg.id)))
}

/// One single-replica group in this process (`group` 0: a config server), on a free port.
pub async fn lone_node(data_dir: PathBuf, group: u64) -> Node {
    let peers = BTreeMap::from([(1, free_addr())]);
    let cfg = node_config(
        1,
        group,
        &peers,
        data_dir,
        COMPACT_LOG_ENTRIES_DEFAULT,
        None,
    );
    Node::start(cfg).await.unwrap()
}

// ---- one group ------------------------------------------------------------------------------

/// The running nodes of an [`InProcGroup`], shared with monitors that run beside the test.
#[derive(Clone, Default)]
pub struct Running(Arc<Mutex<BTreeMap<u64, Arc<ordo::ReplicaHandle>>>>);

impl Running {
    /// `(node, term)` of every running node that believes it leads.
    pub fn leaders(&self) -> Vec<(u64, u64)> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, r)| r.shared.is_leader.load(Ordering::Relaxed) == 1)
            .map(|(&id, r)| (id, r.shared.term.load(Ordering::Relaxed)))
            .collect()
    }
}

/// One shard group (group 1) of in-process replicas, its raft traffic through `filter`.
pub struct InProcGroup {
    _dir: tempfile::TempDir,
    filter: Option<Filter>,
    compact_log_entries: u64,
    pub peers: BTreeMap<u64, String>,
    data_dirs: BTreeMap<u64, PathBuf>,
    /// The running nodes.
    pub nodes: BTreeMap<u64, Node>,
    running: Running,
    /// Snapshots installed by nodes since stopped (a restart starts counting again).
    snapshots_before: u64,
}

/// The group of an [`InProcGroup`].
pub const INPROC_GROUP: u64 = 1;

impl InProcGroup {
    pub async fn start(
        replicas: u64,
        compact_log_entries: u64,
        filter: Option<Filter>,
    ) -> anyhow::Result<InProcGroup> {
        let dir = tempfile::tempdir()?;
        let peers: BTreeMap<u64, String> = (1..=replicas).map(|id| (id, free_addr())).collect();
        let data_dirs = peers
            .keys()
            .map(|&id| (id, dir.path().join(format!("node-{id}"))))
            .collect();
        let mut g = InProcGroup {
            _dir: dir,
            filter,
            compact_log_entries,
            peers,
            data_dirs,
            nodes: BTreeMap::new(),
            running: Running::default(),
            snapshots_before: 0,
        };
        for id in 1..=replicas {
            g.start_node(id).await?;
        }
        Ok(g)
    }

    /// Starts node `id` on its data dir (it must be stopped).
    pub async fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        assert!(!self.nodes.contains_key(&id), "node {id} is running");
        let cfg = node_config(
            id,
            INPROC_GROUP,
            &self.peers,
            self.data_dirs[&id].clone(),
            self.compact_log_entries,
            self.filter.clone(),
        );
        let n = start_node(cfg).await?;
        self.running
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, n.replica.clone());
        self.nodes.insert(id, n);
        Ok(())
    }

    /// Stops node `id` if it runs (see the module docs).
    pub async fn stop_node(&mut self, id: u64) {
        self.running
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        if let Some(n) = self.nodes.remove(&id) {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_secs(1), n.replica.status(false)).await
            {
                self.snapshots_before += s.snapshots_installed;
            }
            n.shutdown().await;
        }
    }

    /// The running nodes, for a monitor task.
    pub fn running(&self) -> Running {
        self.running.clone()
    }

    pub fn ids(&self) -> Vec<u64> {
        self.peers.keys().copied().collect()
    }

    /// The running node that believes it leads in the highest term.
    pub fn leader(&self) -> Option<u64> {
        leader_among(self.nodes.values()).map(|n| n.replica.node_id)
    }

    /// The raft term of running node `id`.
    pub fn term(&self, id: u64) -> u64 {
        raft_role(&self.nodes[&id]).1
    }

    /// Each node's view: `n2 L/t3` = node 2 leads in term 3, `F` follows, `-` is down.
    pub fn roles(&self) -> String {
        roles_text(self.ids(), |id| self.nodes.get(&id))
    }

    /// Waits for a leader; an error (not a panic) past `bound`, for tests that report it.
    pub async fn try_wait_leader(&self, bound: Duration) -> anyhow::Result<u64> {
        let every = Duration::from_millis(20);
        poll_until("a leader", bound, every, || async {
            self.leader().ok_or(())
        })
        .await
        .map_err(|_| anyhow::anyhow!("no leader within {bound:?}"))
    }

    /// Waits until every replica has applied everything committed and holds identical data.
    /// Returns the lowest applied index, the items and the snapshots installed during the run.
    /// Applied indexes are not compared: an idle leader keeps proposing change-feed
    /// checkpoints, which change no data but move the index while the digests are computed.
    pub async fn converged(&self, bound: Duration) -> anyhow::Result<(u64, u64, u64)> {
        let every = Duration::from_millis(50);
        let converged = poll_until("the replicas to converge", bound, every, || async {
            let mut last = Vec::new();
            let mut snapshots = self.snapshots_before;
            for (id, n) in &self.nodes {
                if let Ok(s) = n.replica.status(true).await {
                    last.push((*id, s.commit_index, s.applied_index, s.items, s.data_digest));
                    snapshots += s.snapshots_installed;
                }
            }
            let first = last.first().copied();
            match first {
                Some(f)
                    if last.len() == self.nodes.len()
                        && last.iter().all(|s| s.2 >= s.1 && (s.3, s.4) == (f.3, f.4)) =>
                {
                    let applied = last.iter().map(|s| s.2).min().unwrap_or(f.2);
                    Ok((applied, f.3, snapshots))
                }
                _ => Err(last),
            }
        })
        .await;
        converged.map_err(|e| {
            anyhow::anyhow!(
                "replicas did not converge within {bound:?}: (id, commit, applied, items, digest) {:?}",
                e.last
            )
        })
    }

    pub async fn shutdown(mut self) {
        for id in self.ids() {
            self.stop_node(id).await;
        }
    }
}

impl Cluster for InProcGroup {
    fn members(&self, group: u64) -> Vec<Member> {
        if group != INPROC_GROUP {
            return Vec::new();
        }
        self.ids()
            .into_iter()
            .map(|id| Member::new(group, id))
            .collect()
    }

    fn addr(&self, m: Member) -> String {
        self.peers[&m.id].clone()
    }

    fn is_running(&self, m: Member) -> bool {
        self.nodes.contains_key(&m.id)
    }

    fn client(&self) -> Client {
        Client::connect(self.peers.values().cloned().collect())
            .unwrap()
            .with_timeout(CLIENT_TIMEOUT)
    }

    async fn kill(&mut self, m: Member) {
        self.stop_node(m.id).await;
    }

    async fn restart(&mut self, m: Member) {
        self.start_node(m.id)
            .await
            .unwrap_or_else(|e| panic!("restart {m}: {e:#}"));
    }

    async fn find_leader(&self, group: u64) -> Option<Member> {
        (group == INPROC_GROUP)
            .then(|| self.leader())
            .flatten()
            .map(|id| Member::new(group, id))
    }
}

// ---- a whole cluster ------------------------------------------------------------------------

/// A [`Playground`] in a temp dir on free ports, as a [`Cluster`]. Derefs to the playground
/// (its router, config addresses and nodes); stopped members are out of its node lists until
/// restarted.
pub struct InProcCluster {
    pg: Playground,
    pub cfg: PlaygroundConfig,
    /// Every member's address, stopped ones included.
    addrs: BTreeMap<Member, String>,
    _dir: tempfile::TempDir,
}

impl InProcCluster {
    /// `groups` groups of `replicas` replicas, 3 config servers and a router.
    pub async fn start(groups: u64, replicas: u64) -> InProcCluster {
        InProcCluster::start_filtered(groups, replicas, None).await
    }

    /// [`InProcCluster::start`] with `filter` on the raft traffic of every shard-group replica
    /// (node ids repeat across groups, so a rule about node 1 hits node 1 of every group).
    pub async fn start_filtered(
        groups: u64,
        replicas: u64,
        filter: Option<Filter>,
    ) -> InProcCluster {
        InProcCluster::start_with(groups, replicas, filter, 0).await
    }

    /// [`InProcCluster::start`] with the config servers copying a move whose request names no
    /// bandwidth at `copy_bytes_per_sec`: moves that last long without much data.
    pub async fn start_copying_at(
        groups: u64,
        replicas: u64,
        copy_bytes_per_sec: u64,
    ) -> InProcCluster {
        InProcCluster::start_with(groups, replicas, None, copy_bytes_per_sec).await
    }

    async fn start_with(
        groups: u64,
        replicas: u64,
        filter: Option<Filter>,
        copy_bytes_per_sec: u64,
    ) -> InProcCluster {
        let dir = tempfile::tempdir().unwrap();
        let cfg = PlaygroundConfig {
            groups,
            replicas,
            port: None,
            link_filter: filter,
            copy_bytes_per_sec,
            ..PlaygroundConfig::new(dir.path())
        };
        let pg = Playground::start(cfg.clone())
            .await
            .expect("playground starts");
        let mut addrs = BTreeMap::new();
        let all = pg.groups.iter().chain([(&CONFIG_GROUP, &pg.config)]);
        for (&g, nodes) in all {
            for n in nodes {
                addrs.insert(Member::new(g, n.replica.node_id), n.addr.to_string());
            }
        }
        InProcCluster {
            pg,
            cfg,
            addrs,
            _dir: dir,
        }
    }

    /// The running nodes of `group`.
    pub fn nodes(&self, group: u64) -> &[Node] {
        if group == CONFIG_GROUP {
            &self.pg.config
        } else {
            self.pg.groups.get(&group).map_or(&[], Vec::as_slice)
        }
    }

    fn nodes_mut(&mut self, group: u64) -> &mut Vec<Node> {
        if group == CONFIG_GROUP {
            &mut self.pg.config
        } else {
            self.pg.groups.entry(group).or_default()
        }
    }

    /// The running node of member `m`.
    pub fn node(&self, m: Member) -> Option<&Node> {
        self.nodes(m.group)
            .iter()
            .find(|n| n.replica.node_id == m.id)
    }

    /// The running node of `group` that believes it leads in the highest term (a local look,
    /// no call: fault schedules resolve roles with it at the instant a fault starts).
    pub fn leader_of(&self, group: u64) -> Option<u64> {
        leader_among(self.nodes(group)).map(|n| n.replica.node_id)
    }

    /// Each node of `group`'s view, as [`InProcGroup::roles`] gives it.
    pub fn roles_of(&self, group: u64) -> String {
        let ids = self.members(group).into_iter().map(|m| m.id).collect();
        roles_text(ids, |id| self.node(Member::new(group, id)))
    }

    /// Starts the replicas of a new group `group` beside the cluster (for `AddGroup` to
    /// register); its nodes, which the test stops, and its spec.
    pub async fn start_extra_group(&self, group: u64, replicas: u64) -> (Vec<Node>, GroupSpec) {
        start_extra_group(&self.cfg, group, replicas).await.unwrap()
    }

    /// Stops the router, then the groups, then the config servers.
    pub async fn shutdown(self) {
        self.pg.shutdown().await;
    }
}

impl Deref for InProcCluster {
    type Target = Playground;

    fn deref(&self) -> &Playground {
        &self.pg
    }
}

impl DerefMut for InProcCluster {
    fn deref_mut(&mut self) -> &mut Playground {
        &mut self.pg
    }
}

impl Cluster for InProcCluster {
    fn members(&self, group: u64) -> Vec<Member> {
        self.addrs
            .keys()
            .copied()
            .filter(|m| m.group == group)
            .collect()
    }

    fn addr(&self, m: Member) -> String {
        self.addrs[&m].clone()
    }

    fn is_running(&self, m: Member) -> bool {
        self.node(m).is_some()
    }

    /// A client through the router.
    fn client(&self) -> Client {
        Client::connect(vec![self.pg.router_addr()])
            .unwrap()
            .with_timeout(CLIENT_TIMEOUT)
    }

    async fn kill(&mut self, m: Member) {
        let nodes = self.nodes_mut(m.group);
        let i = nodes
            .iter()
            .position(|n| n.replica.node_id == m.id)
            .unwrap_or_else(|| panic!("{m} is not running"));
        nodes.remove(i).shutdown().await;
    }

    /// Starts `m` on its data dir, laid out as the playground lays it (a dir that is not there
    /// is a layout this harness does not know, and fails the test rather than start empty).
    ///
    /// A config server that the router watches cannot be restarted in-process yet: the config
    /// service's `WatchShardMap` task does not end when its replica stops, so the router's open
    /// stream keeps the old instance's storage locked, and the restart fails after its bound.
    async fn restart(&mut self, m: Member) {
        assert!(!self.is_running(m), "{m} is running");
        let name = if m.group == CONFIG_GROUP {
            "meta".to_string()
        } else {
            format!("group-{}", m.group)
        };
        let data_dir = self.cfg.dir.join(format!("{name}/node-{}", m.id));
        assert!(
            data_dir.is_dir(),
            "{m} has no data dir at {}",
            data_dir.display()
        );
        let peers: BTreeMap<u64, String> = self
            .addrs
            .iter()
            .filter(|(k, _)| k.group == m.group)
            .map(|(k, a)| (k.id, a.clone()))
            .collect();
        let filter = (m.group != CONFIG_GROUP)
            .then(|| self.cfg.link_filter.clone())
            .flatten();
        let cfg = node_config(
            m.id,
            m.group,
            &peers,
            data_dir,
            self.cfg.compact_log_entries,
            filter,
        );
        let node = start_node(cfg)
            .await
            .with_context(|| format!("restart {m}"))
            .unwrap();
        let nodes = self.nodes_mut(m.group);
        nodes.push(node);
        nodes.sort_by_key(|n| n.replica.node_id);
    }

    /// The running member of `group` that believes it leads in the highest term.
    async fn find_leader(&self, group: u64) -> Option<Member> {
        leader_among(self.nodes(group)).map(|n| Member::new(group, n.replica.node_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_secs(30);

    /// The in-process harnesses do what the trait says: a killed leader is replaced, and the
    /// restarted member rejoins on its data dir (the playground's layout is the one assumed).
    /// Shard groups only: see [`InProcCluster::restart`] on config servers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_leader_is_replaced_and_rejoins_on_restart() {
        let _heavy = crate::HEAVY.lock().await;
        let mut pg = InProcCluster::start(2, 3).await;
        let c = pg.client();
        c.put("before", "", "x", None).await.unwrap();
        for group in [1, 2] {
            let old = pg.wait_leader(group, BOUND).await;
            pg.kill(old).await;
            assert!(!pg.is_running(old));
            let new = pg.wait_leader(group, BOUND).await;
            assert_ne!(new, old);
            pg.restart(old).await;
            pg.answers(old, BOUND).await;
            assert_eq!(pg.members(group).len(), 3);
        }
        c.put("after", "", "y", None).await.unwrap();
        let r = c.get("before", "", false).await.unwrap();
        assert!(r.found && r.version == 1);
        pg.shutdown().await;

        let mut g = InProcGroup::start(3, 64, None).await.unwrap();
        let old = g.wait_leader(INPROC_GROUP, BOUND).await;
        g.kill(old).await;
        g.client().put("k", "", "v", None).await.unwrap();
        g.restart(old).await;
        let (_, items, _) = g.converged(BOUND).await.unwrap();
        assert_eq!(items, 1);
        g.shutdown().await;
    }
}
