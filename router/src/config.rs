//! Talking to the config servers: the first map at start, unary calls with leader-following
//! retries (map refreshes and the proxied `Cluster` RPCs), and the background map watcher.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use ordo_proto::retry::{follow_leader, Backoff, Effect, GaveUp, LeaderCursor, Walk, Why};
use ordo_proto::v1::cluster_client::ClusterClient;
use ordo_proto::v1::{GetShardMapRequest, ShardMap, WatchShardMapRequest};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::pool::{canonical_addr, Pool, MESSAGE_BYTES_MAX};
use crate::retry::{backoff, describe, pass_through, BACKOFF, MAX_ATTEMPTS};
use crate::Shared;

/// Most config addresses remembered (given ones plus those the map advertises).
const CONFIG_ADDRS_MAX: usize = 64;
/// Longest wait for one config server's answer while starting.
const START_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Watcher reconnect backoff: 50 ms doubling to 1 s.
const WATCH_BACKOFF: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
/// Longest wait for a config server to accept a watch stream.
const WATCH_OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// The config replicas and which of them led last.
pub(crate) struct ConfigClient {
    cursor: Mutex<LeaderCursor>,
    pool: Arc<Pool>,
}

impl ConfigClient {
    /// Checks and normalises the user's config addresses.
    pub(crate) fn new(given: &[String], pool: Arc<Pool>) -> anyhow::Result<ConfigClient> {
        let mut addrs: Vec<String> = Vec::new();
        for raw in given {
            // `--config a,b` may arrive as one string.
            for part in raw.split(',').filter(|p| !p.trim().is_empty()) {
                match canonical_addr(part) {
                    Ok(a) if !addrs.contains(&a) => addrs.push(a),
                    Ok(_) => {}
                    Err(e) => bail!("invalid config server address {e}"),
                }
            }
        }
        if addrs.is_empty() {
            bail!("no config server given: pass --config <addr,...>");
        }
        Ok(ConfigClient {
            cursor: Mutex::new(LeaderCursor::new(addrs)),
            pool,
        })
    }

    pub(crate) fn addrs(&self) -> Vec<String> {
        self.cursor.lock().unwrap().addrs.clone()
    }

    /// Adds the config replicas a map advertises to the addresses tried.
    pub(crate) fn learn(&self, map: &ShardMap) {
        let mut cursor = self.cursor.lock().unwrap();
        for raw in &map.config_addrs {
            if cursor.addrs.len() >= CONFIG_ADDRS_MAX {
                break;
            }
            if let Ok(a) = canonical_addr(raw) {
                if !cursor.addrs.contains(&a) {
                    tracing::debug!(addr = %a, "learnt config server address from the shard map");
                    cursor.learn(a);
                }
            }
        }
    }

    fn client(&self, addr: &str) -> Result<ClusterClient<Channel>, String> {
        Ok(ClusterClient::new(self.pool.channel(addr)?)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX))
    }

    /// The first map: asks every address at once (any replica may answer) and takes the newest
    /// map among the answers, so that a replica that has not applied the latest map yet does not
    /// hand the router an old one (or none, version 0) while others have it. Rounds repeat with
    /// backoff until at least one replica answers, for at most `timeout`; the error names every
    /// address and how it failed.
    pub(crate) async fn fetch_initial(&self, timeout: Duration) -> anyhow::Result<ShardMap> {
        let started = Instant::now();
        let deadline = started + timeout;
        let addrs = self.addrs();
        let mut failures: Vec<String> = vec!["not tried".to_string(); addrs.len()];
        let mut round = 0;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let wait = remaining.min(START_ATTEMPT_TIMEOUT);
            let answers = futures::future::join_all(addrs.iter().map(|addr| async move {
                let mut client = self.client(addr)?;
                let mut request = Request::new(GetShardMapRequest {
                    linearizable: false,
                });
                request.set_timeout(wait);
                match tokio::time::timeout(wait, client.get_shard_map(request)).await {
                    Ok(Ok(resp)) => Ok(resp.into_inner()),
                    Ok(Err(status)) => Err(describe(&status)),
                    Err(_) => Err(format!("no answer within {wait:?}")),
                }
            }))
            .await;
            let mut newest: Option<(ShardMap, &str)> = None;
            for ((addr, answer), failure) in addrs.iter().zip(answers).zip(&mut failures) {
                match answer {
                    Ok(map) => {
                        if newest.as_ref().is_none_or(|(n, _)| map.version > n.version) {
                            newest = Some((map, addr));
                        }
                    }
                    Err(e) => {
                        tracing::debug!(config = %addr, error = %e, "config server unreachable");
                        *failure = e;
                    }
                }
            }
            if let Some((map, addr)) = newest {
                tracing::info!(config = %addr, version = map.version, "fetched the shard map");
                return Ok(map);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                let each: Vec<String> = addrs
                    .iter()
                    .zip(&failures)
                    .map(|(a, f)| format!("{a}: {f}"))
                    .collect();
                bail!(
                    "no config server reachable within {timeout:?}: {}",
                    each.join("; ")
                );
            }
            tokio::time::sleep(backoff(round).min(remaining)).await;
            round += 1;
        }
    }

    /// Sends `req` with `rpc` to the config leader through [`follow_leader`]: tries the last
    /// known leader first, follows not-leader hints, rotates on UNAVAILABLE and transport errors,
    /// at most [`MAX_ATTEMPTS`] attempts before `deadline`. Any other error comes back unchanged.
    pub(crate) async fn call<Req, Resp, F, Fut>(
        &self,
        what: &str,
        req: Req,
        deadline: Instant,
        rpc: F,
    ) -> Result<Resp, Status>
    where
        Req: Clone,
        F: Fn(ClusterClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        // Map changes retry like reads: each is a compare-and-set on the map version or
        // refuses to repeat itself (init of an initialized cluster, add of a known group),
        // so a retry cannot apply twice; it may report its own first attempt's effect.
        self.call_as(Effect::IdempotentWrite, what, req, deadline, rpc)
            .await
    }

    /// [`ConfigClient::call`] for a request with `effect`: a `StartTask` is a plain write (a
    /// repeat would record a second task), retried only where it was certainly not applied.
    pub(crate) async fn call_as<Req, Resp, F, Fut>(
        &self,
        effect: Effect,
        what: &str,
        req: Req,
        deadline: Instant,
        rpc: F,
    ) -> Result<Resp, Status>
    where
        Req: Clone,
        F: Fn(ClusterClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let walk = Walk::new(effect, MAX_ATTEMPTS, deadline, BACKOFF);
        let (req, rpc) = (&req, &rpc);
        let attempt = |addr: String, bound: Duration| {
            let client = self.client(&addr);
            let mut request = Request::new(req.clone());
            request.set_timeout(bound);
            async move {
                // Nothing was sent: as good as an unreachable server.
                let client = client.map_err(Status::unavailable)?;
                rpc(client, request).await.map(Response::into_inner)
            }
        };
        follow_leader(&self.cursor, &walk, attempt)
            .await
            .map_err(|gave_up| gave_up_status(what, gave_up))
    }

    /// The known leader, else the next address in turn.
    #[cfg(test)]
    fn target(&self) -> String {
        self.cursor.lock().unwrap().target()
    }

    #[cfg(test)]
    fn rotate(&self, failed: &str) {
        self.cursor.lock().unwrap().rotate(failed)
    }

    /// The address the watcher uses for its `attempt`-th stream: rotates through every known
    /// config replica so one dead replica cannot stop updates.
    fn watch_target(&self, attempt: usize) -> String {
        let cursor = self.cursor.lock().unwrap();
        cursor.addrs[attempt % cursor.addrs.len()].clone()
    }
}

/// What a caller of [`ConfigClient::call`] sees of a walk that got no answer.
fn gave_up_status(what: &str, gave_up: GaveUp) -> Status {
    let GaveUp {
        why,
        attempts,
        addr,
        elapsed,
    } = gave_up;
    let (status, why) = match why {
        Why::Refused { status, .. } => return pass_through(status),
        Why::DeadlinePassed(_) => {
            return Status::deadline_exceeded(format!(
                "config server {what}: deadline reached after {attempts} attempt(s) over \
                 {elapsed:.1?}"
            ))
        }
        Why::NoAnswer { .. } => {
            return Status::deadline_exceeded(format!(
                "config server {what}: {addr} did not answer within the deadline \
                 ({attempts} attempt(s) over {elapsed:.1?}); the outcome of a change is unknown"
            ))
        }
        Why::AttemptsSpent(status) => (status, ""),
        Why::OutOfTime(status) => (status, " (the deadline left no time for another)"),
    };
    tracing::warn!(
        what,
        attempts,
        last = %addr,
        error = %describe(&status),
        "config server call failed"
    );
    Status::unavailable(format!(
        "config server {what}: {attempts} attempts over {elapsed:.1?} failed{why}; \
         last error from {addr}: {}",
        describe(&status)
    ))
}

/// Follows `WatchShardMap` on any reachable config replica for as long as the router runs,
/// installing every newer map. Reconnects with backoff (50 ms doubling to 1 s), rotating
/// addresses; the backoff starts over once a stream delivered a map.
pub(crate) async fn watch_maps(shared: Arc<Shared>) {
    let mut retry = 0u32;
    let mut attempt = 0usize;
    loop {
        let addr = shared.config.watch_target(attempt);
        attempt = attempt.wrapping_add(1);
        let after_version = shared.map.current().version;
        match shared.config.client(&addr) {
            Err(e) => tracing::warn!(config = %addr, "cannot watch the shard map: {e}"),
            Ok(mut client) => {
                let open = client.watch_shard_map(WatchShardMapRequest { after_version });
                match tokio::time::timeout(WATCH_OPEN_TIMEOUT, open).await {
                    Err(_) => {
                        tracing::debug!(config = %addr, "watch stream not accepted in time")
                    }
                    Ok(Err(status)) => {
                        tracing::debug!(config = %addr, error = %describe(&status), "cannot watch the shard map")
                    }
                    Ok(Ok(resp)) => {
                        tracing::debug!(config = %addr, after_version, "watching the shard map");
                        let mut stream = resp.into_inner();
                        loop {
                            match stream.message().await {
                                Ok(Some(map)) => {
                                    retry = 0;
                                    shared.install_map(map, &format!("watch {addr}"));
                                }
                                Ok(None) => {
                                    tracing::debug!(config = %addr, "shard map watch ended");
                                    break;
                                }
                                Err(status) => {
                                    tracing::debug!(config = %addr, error = %describe(&status), "shard map watch broke");
                                    break;
                                }
                            }
                        }
                    }
                }
            }
        }
        tokio::time::sleep(WATCH_BACKOFF.delay(retry)).await;
        retry = retry.saturating_add(1);
    }
}

/// Fetches the latest map from the config leader (`linearizable`) and installs it. Concurrent
/// refreshes wait for one another and skip the fetch when a newer map than `used_version` arrived
/// meanwhile, so a burst of `WrongShard` answers costs one config round trip.
pub(crate) async fn refresh_map(
    shared: &Shared,
    used_version: u64,
    deadline: Instant,
) -> Result<(), String> {
    let work = async {
        let _one_at_a_time = shared.refresh_lock.lock().await;
        if shared.map.current().version > used_version {
            return Ok(());
        }
        let map = shared
            .config
            .call(
                "GetShardMap",
                GetShardMapRequest { linearizable: true },
                deadline,
                |mut c, r| async move { c.get_shard_map(r).await },
            )
            .await
            .map_err(|s| format!("map refresh failed: {}", describe(&s)))?;
        shared.install_map(map, "refresh");
        Ok(())
    };
    match tokio::time::timeout_at(deadline, work).await {
        Ok(r) => r,
        Err(_) => Err("map refresh did not finish before the deadline".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked_split_and_deduplicated() {
        let pool = Arc::new(Pool::default());
        let err = ConfigClient::new(&[], pool.clone()).err().unwrap();
        assert_eq!(
            err.to_string(),
            "no config server given: pass --config <addr,...>"
        );
        let err = ConfigClient::new(&[" , ".into()], pool.clone())
            .err()
            .unwrap();
        assert!(err.to_string().starts_with("no config server given"));
        assert!(ConfigClient::new(&["https://a:1".into()], pool.clone()).is_err());
        let c = ConfigClient::new(&["a:1,http://b:2".into(), "a:1".into()], pool.clone()).unwrap();
        assert_eq!(c.addrs(), ["a:1", "b:2"]);
        c.learn(&ShardMap {
            config_addrs: vec!["b:2".into(), "c:3".into()],
            ..Default::default()
        });
        assert_eq!(c.addrs(), ["a:1", "b:2", "c:3"]);
        assert_eq!(c.target(), "a:1");
        c.rotate("a:1");
        assert_eq!(c.target(), "b:2");
        c.cursor.lock().unwrap().redirect("c:3".into());
        c.rotate("b:2");
        assert_eq!(c.target(), "c:3");
    }
}
