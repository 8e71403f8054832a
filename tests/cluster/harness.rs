//! Test harness: real `ordo node` processes on loopback, and an in-process node for fast checks.

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ordo::client::Client;
use ordo_proto::v1::peer_client::PeerClient;
use ordo_proto::v1::{StatusRequest, StatusResponse};

/// Held by the tests that load the machine hard or measure time (nemesis, fault schedules, the
/// bank, membership changes under load, resharding): on a 2-core machine two of them at once
/// starve each other's clusters and bounded waits fail for want of CPU, not for a bug.
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Polls `probe` until it yields a value or `limit` passes; then fails naming `what`.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs `ordoctl --endpoint <endpoints> --timeout 10s <args>`: (succeeded, stdout + stderr).
pub fn ordoctl(endpoints: &[String], args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ordoctl"))
        .args(["--endpoint", &endpoints.join(","), "--timeout", "10s"])
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub fn free_port() -> u16 {
    ordo::playground::free_local_port().unwrap()
}

pub struct NodeProc {
    pub id: u64,
    pub addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

/// One shard group of real processes. Killed on drop; node logs are printed if the test fails.
pub struct ProcGroup {
    _dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, NodeProc>,
    peers_arg: String,
    compact_log_entries: u64,
}

impl ProcGroup {
    pub fn start(replicas: u64, compact_log_entries: u64) -> ProcGroup {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = BTreeMap::new();
        for id in 1..=replicas {
            let addr = format!("127.0.0.1:{}", free_port());
            nodes.insert(
                id,
                NodeProc {
                    id,
                    addr,
                    data_dir: dir.path().join(format!("node-{id}")),
                    log: dir.path().join(format!("node-{id}.log")),
                    child: None,
                },
            );
        }
        let peers_arg = nodes
            .values()
            .map(|n| format!("{}={}", n.id, n.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut g = ProcGroup {
            _dir: dir,
            nodes,
            peers_arg,
            compact_log_entries,
        };
        let ids: Vec<u64> = g.nodes.keys().copied().collect();
        for id in ids {
            g.restart(id);
        }
        g
    }

    /// Starts (or starts again) node `id` with its data dir as it is.
    pub fn restart(&mut self, id: u64) {
        let n = self.nodes.get_mut(&id).unwrap();
        assert!(n.child.is_none(), "node {id} is already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&n.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ordo"))
            .args([
                "node",
                "--id",
                &id.to_string(),
                "--group",
                "1",
                "--listen",
                &n.addr,
                "--peers",
                &self.peers_arg,
            ])
            .arg("--data-dir")
            .arg(&n.data_dir)
            .args([
                "--compact-log-entries",
                &self.compact_log_entries.to_string(),
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn ordo node");
        n.child = Some(child);
    }

    /// kill -9: no shutdown, no flush.
    pub fn kill(&mut self, id: u64) {
        let n = self.nodes.get_mut(&id).unwrap();
        let mut child = n.child.take().expect("node is running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.values().map(|n| n.addr.clone()).collect()
    }

    pub fn client(&self) -> Client {
        Client::connect(self.endpoints())
            .unwrap()
            .with_timeout(Duration::from_secs(15))
    }

    pub fn addr(&self, id: u64) -> &str {
        &self.nodes[&id].addr
    }

    pub async fn status(&self, id: u64, with_digest: bool) -> Option<StatusResponse> {
        node_status(self.addr(id), with_digest).await
    }

    /// Waits until some running node reports itself leader and returns its id.
    pub async fn leader(&self, limit: Duration) -> u64 {
        wait_for(limit, "a leader", || async {
            for (&id, n) in &self.nodes {
                if n.child.is_none() {
                    continue;
                }
                if let Some(s) = self.status(id, false).await {
                    if s.role == "Leader" {
                        return Some(id);
                    }
                }
            }
            None
        })
        .await
    }

    /// Waits until every running node has applied the same index and holds the same data, and
    /// returns that (applied index, items, digest). No writes may be running.
    pub async fn converged(&self, limit: Duration) -> (u64, u64, u32) {
        wait_for(limit, "all replicas to hold identical data", || async {
            let mut seen = None;
            for (&id, n) in &self.nodes {
                if n.child.is_none() {
                    continue;
                }
                let s = self.status(id, true).await?;
                let this = (s.applied_index, s.items, s.data_digest);
                if s.applied_index < s.commit_index || seen.is_some_and(|x| x != this) {
                    return None;
                }
                seen = Some(this);
            }
            seen
        })
        .await
    }

    pub fn dump_logs(&self) {
        for n in self.nodes.values() {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!(
                "---- last lines of node {} ({}) ----",
                n.id,
                n.log.display()
            );
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
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

pub async fn node_status(addr: &str, with_digest: bool) -> Option<StatusResponse> {
    let ep = ordo::endpoint(addr).ok()?.timeout(Duration::from_secs(2));
    let ch = ep.connect().await.ok()?;
    PeerClient::new(ch)
        .status(StatusRequest {
            with_data_digest: with_digest,
        })
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// What a process of a [`ProcCluster`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A config server: a replica of the meta group (group 0).
    Config,
    /// A replica of shard group `group` (1, 2, ...).
    Node {
        group: u64,
    },
    Router,
}

impl Role {
    /// The raft group the process belongs to (0 = meta); `None` for the router.
    pub fn group(self) -> Option<u64> {
        match self {
            Role::Config => Some(0),
            Role::Node { group } => Some(group),
            Role::Router => None,
        }
    }
}

/// One process of a [`ProcCluster`]: how to start it, and the running child if any.
pub struct ClusterProc {
    pub name: String,
    pub role: Role,
    pub addr: String,
    pub log: PathBuf,
    args: Vec<std::ffi::OsString>,
    child: Option<Child>,
    pub starts: u32,
}

impl ClusterProc {
    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

/// A whole sharded cluster of real processes: 3 `ordo config` (the meta group), `groups` shard
/// groups × `replicas` `ordo node`, and one `ordo router`. Every process logs to a file in the
/// temp dir; the tails are printed if the test fails; everything is killed on drop.
pub struct ProcCluster {
    dir: tempfile::TempDir,
    /// A private copy of the `ordo` binary: restarts run exactly what the cluster started with,
    /// even if the shared target dir is rebuilt meanwhile.
    bin: PathBuf,
    /// Config servers first, then the nodes of group 1, 2, ..., then the router (once started).
    pub procs: Vec<ClusterProc>,
    pub groups: u64,
}

impl ProcCluster {
    /// Starts the config servers and the shard-group nodes (not initialized, no router yet).
    pub fn start(groups: u64, replicas: u64) -> ProcCluster {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("ordo");
        std::fs::copy(env!("CARGO_BIN_EXE_ordo"), &bin).expect("copy the ordo binary");
        let mut c = ProcCluster {
            dir,
            bin,
            procs: Vec::new(),
            groups,
        };
        let config: Vec<(u64, String)> = (1..=3)
            .map(|id| (id, format!("127.0.0.1:{}", free_port())))
            .collect();
        let peers = |members: &[(u64, String)]| {
            members
                .iter()
                .map(|(id, a)| format!("{id}={a}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let config_peers = peers(&config);
        for (id, addr) in &config {
            let data = c.dir.path().join(format!("config-{id}"));
            let args = ["config", "--id", &id.to_string(), "--listen", addr]
                .into_iter()
                .map(Into::into)
                .chain(["--peers".into(), config_peers.clone().into()])
                .chain(["--data-dir".into(), data.into_os_string()])
                .collect();
            c.add(format!("config-{id}"), Role::Config, addr.clone(), args);
        }
        for group in 1..=groups {
            let members: Vec<(u64, String)> = (1..=replicas)
                .map(|id| (id, format!("127.0.0.1:{}", free_port())))
                .collect();
            let group_peers = peers(&members);
            for (id, addr) in &members {
                let data = c.dir.path().join(format!("g{group}-n{id}"));
                let args = [
                    "node",
                    "--id",
                    &id.to_string(),
                    "--group",
                    &group.to_string(),
                    "--listen",
                    addr,
                ]
                .into_iter()
                .map(Into::into)
                .chain(["--peers".into(), group_peers.clone().into()])
                .chain(["--data-dir".into(), data.into_os_string()])
                .collect();
                c.add(
                    format!("g{group}-n{id}"),
                    Role::Node { group },
                    addr.clone(),
                    args,
                );
            }
        }
        for i in 0..c.procs.len() {
            c.restart(i);
        }
        c
    }

    fn add(&mut self, name: String, role: Role, addr: String, args: Vec<std::ffi::OsString>) {
        let log = self.dir.path().join(format!("{name}.log"));
        self.procs.push(ClusterProc {
            name,
            role,
            addr,
            log,
            args,
            child: None,
            starts: 0,
        });
    }

    /// Addresses of the config servers.
    pub fn config_addrs(&self) -> Vec<String> {
        self.members(0)
            .map(|i| self.procs[i].addr.clone())
            .collect()
    }

    /// Indexes of the processes of raft group `group` (0 = meta).
    pub fn members(&self, group: u64) -> impl Iterator<Item = usize> + '_ {
        (0..self.procs.len()).filter(move |&i| self.procs[i].role.group() == Some(group))
    }

    /// Creates the cluster (`InitCluster` on a config server, as `ordoctl init` does) once every
    /// group has a leader, then starts the router. Returns the initial shard map.
    pub async fn init(&mut self, limit: Duration) -> ordo_proto::v1::ShardMap {
        for group in 0..=self.groups {
            self.leader(group, limit).await;
        }
        let groups = (1..=self.groups)
            .map(|g| ordo_proto::v1::GroupSpec {
                id: g,
                addrs: self
                    .members(g)
                    .map(|i| self.procs[i].addr.clone())
                    .collect(),
            })
            .collect();
        let admin = ordo::client::ClusterClient::connect(self.config_addrs())
            .unwrap()
            .with_timeout(limit);
        let map = admin
            .init_cluster(ordo_proto::v1::InitClusterRequest {
                slot_count: ordo::limits::SLOT_COUNT_DEFAULT,
                groups,
            })
            .await
            .unwrap_or_else(|e| panic!("init the cluster: {e}"));
        let addr = format!("127.0.0.1:{}", free_port());
        let args = ["router", "--listen", &addr, "--config"]
            .into_iter()
            .map(Into::into)
            .chain([self.config_addrs().join(",").into()])
            .collect();
        self.add("router".into(), Role::Router, addr, args);
        let i = self.procs.len() - 1;
        self.restart(i);
        map
    }

    /// The raft id of process `i` (from its name: `config-<id>`, `g<group>-n<id>`).
    pub fn node_id(&self, i: usize) -> u64 {
        let name = &self.procs[i].name;
        let id = name.rsplit(['-', 'n']).next().unwrap();
        id.parse()
            .unwrap_or_else(|_| panic!("{name} has no node id"))
    }

    /// Starts a new, empty replica `id` of raft group `group` with `--join`, its `--peers` the
    /// group's current processes and itself. It is not a member until a `replica add|replace`.
    pub fn start_joining(&mut self, group: u64, id: u64) -> usize {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut peers: Vec<String> = self
            .members(group)
            .map(|i| format!("{}={}", self.node_id(i), self.procs[i].addr))
            .collect();
        peers.push(format!("{id}={addr}"));
        let (name, mut args) = if group == 0 {
            (format!("config-{id}"), vec!["config".to_string()])
        } else {
            (
                format!("g{group}-n{id}"),
                vec!["node".into(), "--group".into(), group.to_string()],
            )
        };
        let data = self.dir.path().join(&name);
        args.extend([
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            addr.clone(),
            "--peers".into(),
            peers.join(","),
            "--join".into(),
            "--data-dir".into(),
            data.display().to_string(),
        ]);
        let role = if group == 0 {
            Role::Config
        } else {
            Role::Node { group }
        };
        self.add(name, role, addr, args.into_iter().map(Into::into).collect());
        let i = self.procs.len() - 1;
        self.restart(i);
        i
    }

    pub fn router_addr(&self) -> &str {
        let r = self.procs.iter().find(|p| p.role == Role::Router);
        &r.expect("the router is started by init").addr
    }

    /// Starts (or starts again) process `i` with its data dir as it is and the same arguments.
    pub fn restart(&mut self, i: usize) {
        let p = &mut self.procs[i];
        assert!(p.child.is_none(), "{} is already running", p.name);
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&p.log)
            .unwrap();
        p.starts += 1;
        use std::io::Write as _;
        let _ = writeln!(log, "==== harness: start #{} of {} ====", p.starts, p.name);
        let child = Command::new(&self.bin)
            .args(&p.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", p.name));
        p.child = Some(child);
    }

    /// kill -9 process `i`: no shutdown, no flush.
    pub fn kill(&mut self, i: usize) {
        let p = &mut self.procs[i];
        let mut child = p
            .child
            .take()
            .unwrap_or_else(|| panic!("{} is not running", p.name));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// The index of the leader of raft group `group` among its running members, if one says so.
    pub async fn find_leader(&self, group: u64) -> Option<usize> {
        for i in self.members(group) {
            if !self.procs[i].running() {
                continue;
            }
            if let Some(s) = node_status(&self.procs[i].addr, false).await {
                if s.role == "Leader" {
                    return Some(i);
                }
            }
        }
        None
    }

    /// Waits until some running member of `group` reports itself leader.
    pub async fn leader(&self, group: u64, limit: Duration) -> usize {
        wait_for(limit, &format!("a leader of group {group}"), || {
            self.find_leader(group)
        })
        .await
    }

    /// Waits until process `i` answers a status request (it serves again after a restart).
    pub async fn answers(&self, i: usize, limit: Duration) {
        let p = &self.procs[i];
        if p.role == Role::Router {
            return;
        }
        wait_for(
            limit,
            &format!("{} to answer after its start", p.name),
            || {
                let addr = p.addr.clone();
                async move { node_status(&addr, false).await.map(|_| ()) }
            },
        )
        .await
    }

    pub fn dump_logs(&self, lines: usize) {
        for p in &self.procs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(lines).collect();
            eprintln!("---- last lines of {} ({}) ----", p.name, p.log.display());
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
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
