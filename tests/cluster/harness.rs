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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
    let ep = ordo::transport::endpoint(addr)
        .ok()?
        .timeout(Duration::from_secs(2));
    let ch = ep.connect().await.ok()?;
    PeerClient::new(ch)
        .status(StatusRequest {
            with_data_digest: with_digest,
        })
        .await
        .ok()
        .map(|r| r.into_inner())
}
