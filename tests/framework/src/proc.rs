//! Clusters of real `ordo` processes on loopback: one shard group ([`ProcGroup`]) or a whole
//! sharded cluster ([`ProcCluster`]). Kills are SIGKILL (no shutdown, no flush); every process
//! logs to a file in the cluster's temp dir, the tails are printed if the test fails, and
//! everything is killed on drop.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ordo_proto::client::Client;

use crate::bins::Bins;
use crate::cluster::{Cluster, Member, CONFIG_GROUP};
use crate::ports::free_addr;
use crate::wait::wait_for;

/// How long the clients of a process cluster wait for one call.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

/// Spawns `bin args` with `RUST_LOG=info` (and `env`), its output appended to `log`.
fn spawn_logged(bin: &str, args: &[OsString], log: &PathBuf, banner: Option<String>) -> Child {
    spawn_logged_env(bin, args, log, banner, &[])
}

fn spawn_logged_env(
    bin: &str,
    args: &[OsString],
    log: &PathBuf,
    banner: Option<String>,
    env: &[(String, String)],
) -> Child {
    let mut file = File::options().create(true).append(true).open(log).unwrap();
    if let Some(banner) = banner {
        use std::io::Write as _;
        let _ = writeln!(file, "{banner}");
    }
    Command::new(bin)
        .args(args)
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {bin}: {e}"))
}

/// kill -9 and reap.
fn kill_child(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

fn print_tail(name: &str, log: &PathBuf, lines: usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    eprintln!("---- last lines of {name} ({}) ----", log.display());
    for l in tail.into_iter().rev() {
        eprintln!("{l}");
    }
}

fn peers_arg<'a>(members: impl IntoIterator<Item = (u64, &'a String)>) -> String {
    members
        .into_iter()
        .map(|(id, a)| format!("{id}={a}"))
        .collect::<Vec<_>>()
        .join(",")
}

// ---- one group ------------------------------------------------------------------------------

pub struct NodeProc {
    pub id: u64,
    pub addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

/// One shard group (group 1) of real processes. Killed on drop; node logs are printed if the
/// test fails.
pub struct ProcGroup {
    _dir: tempfile::TempDir,
    bins: Bins,
    pub nodes: BTreeMap<u64, NodeProc>,
    peers_arg: String,
    compact_log_entries: u64,
    /// Extra environment of some nodes (failpoints), by node id.
    env: BTreeMap<u64, Vec<(String, String)>>,
    /// Extra `ordo node` flags of every node (e.g. a short change-feed retention), on every
    /// start; set on a prepared group before [`ProcGroup::start_all`].
    pub args: Vec<String>,
}

/// The group of a [`ProcGroup`].
pub const PROC_GROUP: u64 = 1;

impl ProcGroup {
    pub fn start(bins: Bins, replicas: u64, compact_log_entries: u64) -> ProcGroup {
        Self::start_with_env(bins, replicas, compact_log_entries, BTreeMap::new())
    }

    /// [`ProcGroup::start`], node `id` running with the extra environment `env[id]` (e.g. a
    /// failpoint), on every start.
    pub fn start_with_env(
        bins: Bins,
        replicas: u64,
        compact_log_entries: u64,
        env: BTreeMap<u64, Vec<(String, String)>>,
    ) -> ProcGroup {
        let mut g = Self::prepare(bins, replicas, compact_log_entries, env);
        g.start_all();
        g
    }

    /// [`ProcGroup::start_with_env`] without starting anything: the data dirs
    /// (`nodes[id].data_dir`) are chosen but not created, so a test can set them up (e.g. mount
    /// a small file system there) before [`ProcGroup::start_all`].
    pub fn prepare(
        bins: Bins,
        replicas: u64,
        compact_log_entries: u64,
        env: BTreeMap<u64, Vec<(String, String)>>,
    ) -> ProcGroup {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = BTreeMap::new();
        for id in 1..=replicas {
            nodes.insert(
                id,
                NodeProc {
                    id,
                    addr: free_addr(),
                    data_dir: dir.path().join(format!("node-{id}")),
                    log: dir.path().join(format!("node-{id}.log")),
                    child: None,
                },
            );
        }
        let peers_arg = peers_arg(nodes.values().map(|n| (n.id, &n.addr)));
        ProcGroup {
            _dir: dir,
            bins,
            nodes,
            peers_arg,
            compact_log_entries,
            env,
            args: Vec::new(),
        }
    }

    /// Starts every node of a prepared group.
    pub fn start_all(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.start_node(id);
        }
    }

    /// Member `id` of the group.
    pub fn node(&self, id: u64) -> Member {
        assert!(self.nodes.contains_key(&id), "no node {id}");
        Member::new(PROC_GROUP, id)
    }

    /// Starts (or starts again) node `id` with its data dir as it is.
    fn start_node(&mut self, id: u64) {
        let n = self.nodes.get_mut(&id).unwrap();
        assert!(n.child.is_none(), "node {id} is already running");
        let args: Vec<OsString> = [
            "node",
            "--id",
            &id.to_string(),
            "--group",
            &PROC_GROUP.to_string(),
            "--listen",
            &n.addr,
            "--peers",
            &self.peers_arg,
        ]
        .into_iter()
        .map(Into::into)
        .chain(["--data-dir".into(), n.data_dir.clone().into_os_string()])
        .chain([
            "--compact-log-entries".into(),
            self.compact_log_entries.to_string().into(),
        ])
        .chain(self.args.iter().map(Into::into))
        .collect();
        let env = self.env.get(&id).map(Vec::as_slice).unwrap_or_default();
        n.child = Some(spawn_logged_env(self.bins.ordo, &args, &n.log, None, env));
    }

    /// Waits up to `bound` for node `id`'s process to exit on its own and returns how it exited
    /// (it then counts as not running). Fails the test if it is still running after `bound`.
    pub async fn wait_exit(&mut self, id: u64, bound: Duration) -> std::process::ExitStatus {
        let n = self.nodes.get_mut(&id).unwrap();
        let child = n.child.as_mut().expect("node is running");
        let deadline = std::time::Instant::now() + bound;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node {id} still runs after {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        n.child = None;
        status
    }

    /// Whether node `id`'s process has exited (reaping it if so); `None` if it was not started.
    pub fn try_exit(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        let n = self.nodes.get_mut(&id).unwrap();
        let status = n.child.as_mut()?.try_wait().unwrap()?;
        n.child = None;
        Some(status)
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.values().map(|n| n.addr.clone()).collect()
    }

    /// The process id of node `id`, if it runs (for reading its `/proc` entries).
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes[&id].child.as_ref().map(Child::id)
    }

    /// `ordoctl` against this group's nodes.
    pub fn ordoctl(&self, args: &[&str]) -> (bool, String) {
        self.bins.ordoctl(&self.endpoints(), args)
    }

    /// Waits until every running node has applied what it knows committed and holds the same
    /// data, and returns (the lowest applied index, items, digest). No writes may be running.
    /// Applied indexes are not compared: an idle leader keeps proposing change-feed
    /// checkpoints, which change no data but move the index while the digests are computed.
    pub async fn converged(&self, bound: Duration) -> (u64, u64, u32) {
        wait_for("all replicas to hold identical data", bound, || async {
            let mut seen: Option<(u64, u64, u32)> = None;
            for (&id, n) in &self.nodes {
                if n.child.is_none() {
                    continue;
                }
                let s = self.status(self.node(id), true).await?;
                let data = (s.items, s.data_digest);
                if s.applied_index < s.commit_index || seen.is_some_and(|x| (x.1, x.2) != data) {
                    return None;
                }
                let applied = seen.map_or(s.applied_index, |x| x.0.min(s.applied_index));
                seen = Some((applied, data.0, data.1));
            }
            seen
        })
        .await
    }

    pub fn dump_logs(&self) {
        for n in self.nodes.values() {
            print_tail(&format!("node {}", n.id), &n.log, 40);
        }
    }
}

impl Cluster for ProcGroup {
    fn members(&self, group: u64) -> Vec<Member> {
        if group != PROC_GROUP {
            return Vec::new();
        }
        self.nodes
            .keys()
            .map(|&id| Member::new(group, id))
            .collect()
    }

    fn addr(&self, m: Member) -> String {
        self.nodes[&m.id].addr.clone()
    }

    fn is_running(&self, m: Member) -> bool {
        self.nodes[&m.id].child.is_some()
    }

    fn client(&self) -> Client {
        Client::connect(self.endpoints())
            .unwrap()
            .with_timeout(CLIENT_TIMEOUT)
    }

    async fn kill(&mut self, m: Member) {
        let n = self.nodes.get_mut(&m.id).unwrap();
        kill_child(n.child.take().expect("node is running"));
    }

    async fn restart(&mut self, m: Member) {
        self.start_node(m.id);
    }
}

impl Drop for ProcGroup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for n in self.nodes.values_mut() {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

// ---- a whole cluster ------------------------------------------------------------------------

/// What a process of a [`ProcCluster`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A config server: a replica of the config group.
    Config,
    /// A replica of shard group `group` (1, 2, ...).
    Node {
        group: u64,
    },
    Router,
}

impl Role {
    /// The raft group the process belongs to ([`CONFIG_GROUP`] for config servers); `None`
    /// for the router.
    pub fn group(self) -> Option<u64> {
        match self {
            Role::Config => Some(CONFIG_GROUP),
            Role::Node { group } => Some(group),
            Role::Router => None,
        }
    }
}

/// One process of a [`ProcCluster`]: how to start it, and the running child if any.
pub struct ClusterProc {
    pub name: String,
    pub role: Role,
    /// The replica it is; `None` for the router.
    pub member: Option<Member>,
    pub addr: String,
    pub log: PathBuf,
    args: Vec<OsString>,
    child: Option<Child>,
    pub starts: u32,
}

impl ClusterProc {
    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

/// A whole sharded cluster of real processes: 3 `ordo config` (the config group), `groups`
/// shard groups × `replicas` `ordo node`, and one `ordo router`.
pub struct ProcCluster {
    dir: tempfile::TempDir,
    bins: Bins,
    /// A private copy of the `ordo` binary: restarts run exactly what the cluster started with,
    /// even if the shared target dir is rebuilt meanwhile.
    bin: PathBuf,
    /// Config servers first, then the nodes of group 1, 2, ..., then the router (once started).
    pub procs: Vec<ClusterProc>,
    pub groups: u64,
    /// Extra `ordo node` flags of every shard-group node (e.g. a short feed retention).
    node_args: Vec<String>,
}

impl ProcCluster {
    /// Starts the config servers and the shard-group nodes (not initialized, no router yet).
    pub fn start(bins: Bins, groups: u64, replicas: u64) -> ProcCluster {
        Self::start_with_node_args(bins, groups, replicas, &[])
    }

    /// [`ProcCluster::start`], every shard-group node with the extra flags `node_args`.
    pub fn start_with_node_args(
        bins: Bins,
        groups: u64,
        replicas: u64,
        node_args: &[&str],
    ) -> ProcCluster {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("ordo");
        std::fs::copy(bins.ordo, &bin).expect("copy the ordo binary");
        let mut c = ProcCluster {
            dir,
            bins,
            bin,
            procs: Vec::new(),
            groups,
            node_args: node_args.iter().map(|a| a.to_string()).collect(),
        };
        let config: BTreeMap<u64, String> = (1..=3).map(|id| (id, free_addr())).collect();
        for (&id, addr) in &config {
            let m = Member::new(CONFIG_GROUP, id);
            let args = c.replica_args(m, addr, &peers_arg(config.iter().map(|(i, a)| (*i, a))));
            c.add(Role::Config, Some(m), addr.clone(), args);
        }
        for group in 1..=groups {
            let members: BTreeMap<u64, String> =
                (1..=replicas).map(|id| (id, free_addr())).collect();
            let peers = peers_arg(members.iter().map(|(i, a)| (*i, a)));
            for (&id, addr) in &members {
                let m = Member::new(group, id);
                let args = c.replica_args(m, addr, &peers);
                c.add(Role::Node { group }, Some(m), addr.clone(), args);
            }
        }
        for i in 0..c.procs.len() {
            c.start_proc(i);
        }
        c
    }

    /// `ordo config|node` arguments of member `m` listening on `addr`.
    fn replica_args(&self, m: Member, addr: &str, peers: &str) -> Vec<OsString> {
        let mut args: Vec<String> = if m.group == CONFIG_GROUP {
            vec!["config".into()]
        } else {
            vec!["node".into(), "--group".into(), m.group.to_string()]
        };
        args.extend([
            "--id".into(),
            m.id.to_string(),
            "--listen".into(),
            addr.into(),
            "--peers".into(),
            peers.into(),
        ]);
        if m.group != CONFIG_GROUP {
            args.extend(self.node_args.iter().cloned());
        }
        let data = self.dir.path().join(m.to_string());
        args.into_iter()
            .map(Into::into)
            .chain(["--data-dir".into(), data.into_os_string()])
            .collect()
    }

    fn add(&mut self, role: Role, member: Option<Member>, addr: String, args: Vec<OsString>) {
        let name = member.map_or_else(|| "router".to_string(), |m| m.to_string());
        let log = self.dir.path().join(format!("{name}.log"));
        self.procs.push(ClusterProc {
            name,
            role,
            member,
            addr,
            log,
            args,
            child: None,
            starts: 0,
        });
    }

    /// The index in `procs` of member `m`.
    pub fn index(&self, m: Member) -> usize {
        self.procs
            .iter()
            .position(|p| p.member == Some(m))
            .unwrap_or_else(|| panic!("{m} is not a member of this cluster"))
    }

    /// The process name of `m` (`config-2`, `g1-n3`).
    pub fn name(&self, m: Member) -> &str {
        &self.procs[self.index(m)].name
    }

    /// Addresses of the config servers.
    pub fn config_addrs(&self) -> Vec<String> {
        self.addrs(CONFIG_GROUP)
    }

    /// Addresses of the members of `group`.
    pub fn addrs(&self, group: u64) -> Vec<String> {
        self.members(group)
            .into_iter()
            .map(|m| self.addr(m))
            .collect()
    }

    /// Creates the cluster (`InitCluster` on a config server, as `ordoctl init` does) once every
    /// group has a leader, then starts the router. Returns the initial shard map.
    pub async fn init(&mut self, bound: Duration) -> ordo_proto::v1::ShardMap {
        for group in 0..=self.groups {
            self.wait_leader(group, bound).await;
        }
        let groups = (1..=self.groups)
            .map(|g| ordo_proto::v1::GroupSpec {
                id: g,
                addrs: self.addrs(g),
            })
            .collect();
        let admin = ordo_proto::client::ClusterClient::connect(self.config_addrs())
            .unwrap()
            .with_timeout(bound);
        let map = admin
            .init_cluster(ordo_proto::v1::InitClusterRequest {
                slot_count: ordo::limits::SLOT_COUNT_DEFAULT,
                groups,
            })
            .await
            .unwrap_or_else(|e| panic!("init the cluster: {e}"));
        let addr = free_addr();
        let args = ["router", "--listen", &addr, "--config"]
            .into_iter()
            .map(Into::into)
            .chain([self.config_addrs().join(",").into()])
            .collect();
        self.add(Role::Router, None, addr, args);
        self.start_proc(self.procs.len() - 1);
        map
    }

    /// Starts a new, empty replica `id` of raft group `group` with `--join`, its `--peers` the
    /// group's current processes and itself. It is not a member until a `replica add|replace`.
    pub fn start_joining(&mut self, group: u64, id: u64) -> Member {
        let addr = free_addr();
        let mut peers: Vec<(u64, String)> = self
            .members(group)
            .into_iter()
            .map(|m| (m.id, self.addr(m)))
            .collect();
        peers.push((id, addr.clone()));
        let m = Member::new(group, id);
        let mut args = self.replica_args(m, &addr, &peers_arg(peers.iter().map(|(i, a)| (*i, a))));
        args.push("--join".into());
        let role = if group == CONFIG_GROUP {
            Role::Config
        } else {
            Role::Node { group }
        };
        self.add(role, Some(m), addr, args);
        self.start_proc(self.procs.len() - 1);
        m
    }

    pub fn router_addr(&self) -> &str {
        &self.procs[self.router_index()].addr
    }

    fn router_index(&self) -> usize {
        let r = self.procs.iter().position(|p| p.role == Role::Router);
        r.expect("the router is started by init")
    }

    /// Kills the router with SIGKILL and starts it again on the same address: it keeps no
    /// state, so its streams break and its clients come back to the same cluster.
    pub fn restart_router(&mut self) {
        let i = self.router_index();
        let child = self.procs[i]
            .child
            .take()
            .expect("the router is not running");
        kill_child(child);
        self.start_proc(i);
    }

    /// `ordoctl` against the router.
    pub fn ordoctl(&self, args: &[&str]) -> (bool, String) {
        self.bins.ordoctl(&[self.router_addr().to_string()], args)
    }

    /// Starts (or starts again) process `i` with its data dir as it is and the same arguments.
    fn start_proc(&mut self, i: usize) {
        let bin = self.bin.to_str().expect("a UTF-8 temp path").to_string();
        let p = &mut self.procs[i];
        assert!(p.child.is_none(), "{} is already running", p.name);
        p.starts += 1;
        let banner = format!("==== harness: start #{} of {} ====", p.starts, p.name);
        p.child = Some(spawn_logged(&bin, &p.args, &p.log, Some(banner)));
    }

    pub fn dump_logs(&self, lines: usize) {
        for p in &self.procs {
            print_tail(&p.name, &p.log, lines);
        }
    }
}

impl Cluster for ProcCluster {
    fn members(&self, group: u64) -> Vec<Member> {
        let mut m: Vec<Member> = self
            .procs
            .iter()
            .filter_map(|p| p.member)
            .filter(|m| m.group == group)
            .collect();
        m.sort();
        m
    }

    fn addr(&self, m: Member) -> String {
        self.procs[self.index(m)].addr.clone()
    }

    fn is_running(&self, m: Member) -> bool {
        self.procs[self.index(m)].running()
    }

    /// A client through the router (started by [`ProcCluster::init`]).
    fn client(&self) -> Client {
        Client::connect(vec![self.router_addr().to_string()])
            .unwrap()
            .with_timeout(CLIENT_TIMEOUT)
    }

    async fn kill(&mut self, m: Member) {
        let i = self.index(m);
        let p = &mut self.procs[i];
        let child = p
            .child
            .take()
            .unwrap_or_else(|| panic!("{} is not running", p.name));
        kill_child(child);
    }

    async fn restart(&mut self, m: Member) {
        self.start_proc(self.index(m));
    }
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        for p in &mut self.procs {
            if let Some(mut c) = p.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            self.dump_logs(30);
        }
    }
}
