//! What the config server asks of shard-group replicas: their status, and installing slot
//! ownership on a group's leader (following not-leader hints, bounded in attempts and time).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ordo_proto::v1::peer_client::PeerClient;
use ordo_proto::v1::{
    error_detail, ChangeReplicasRequest, ChangeReplicasResponse, ErrorDetail, Group, GroupSpec,
    Replica, SetOwnershipRequest, SetOwnershipResponse, StatusRequest, StatusResponse,
};
use prost::Message;
use tonic::transport::Endpoint;
use tonic::{Code, Status};

const CALL_TIMEOUT: Duration = Duration::from_secs(2);
const OWNERSHIP_DEADLINE: Duration = Duration::from_secs(10);
const ATTEMPTS_MAX: usize = 12;

async fn peer(addr: &str) -> Result<PeerClient<tonic::transport::Channel>, Status> {
    peer_with_timeout(addr, CALL_TIMEOUT).await
}

async fn peer_with_timeout(
    addr: &str,
    timeout: Duration,
) -> Result<PeerClient<tonic::transport::Channel>, Status> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let ch = Endpoint::from_shared(uri)
        .map_err(|e| Status::invalid_argument(format!("address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("{addr} is unreachable: {e}")))?;
    Ok(PeerClient::new(ch))
}

pub async fn status(addr: &str) -> Result<StatusResponse, Status> {
    let mut c = peer(addr).await?;
    Ok(tokio::time::timeout(
        CALL_TIMEOUT,
        c.status(StatusRequest {
            with_data_digest: false,
        }),
    )
    .await
    .map_err(|_| Status::unavailable(format!("{addr} did not answer within {CALL_TIMEOUT:?}")))??
    .into_inner())
}

/// Checks that every address of `spec` is a live replica of group `spec.id`, that they agree on
/// who the replicas are, and that the group has a leader. Returns the group with node ids.
pub async fn resolve_group(spec: &GroupSpec) -> Result<Group, Status> {
    let statuses = futures::future::join_all(spec.addrs.iter().map(|a| status(a))).await;
    let mut replicas = Vec::new();
    let mut leader = 0;
    let wanted: BTreeSet<&str> = spec.addrs.iter().map(String::as_str).collect();
    for (addr, st) in spec.addrs.iter().zip(statuses) {
        let st = st.map_err(|e| {
            Status::failed_precondition(format!(
                "group {}: replica {addr} is unreachable ({}); start it or fix the address",
                spec.id,
                e.message()
            ))
        })?;
        if st.group_id != spec.id {
            return Err(Status::failed_precondition(format!(
                "{addr} is a replica of group {}, not group {}",
                st.group_id, spec.id
            )));
        }
        let theirs: BTreeSet<&str> = st.peers.values().map(String::as_str).collect();
        if theirs != wanted {
            return Err(Status::failed_precondition(format!(
                "group {}: {addr} was started with peers {theirs:?}, but {wanted:?} were given; list exactly the group's replicas",
                spec.id
            )));
        }
        if st.leader_id != 0 {
            leader = st.leader_id;
        }
        replicas.push(Replica {
            node_id: st.node_id,
            addr: addr.clone(),
        });
    }
    if leader == 0 {
        return Err(Status::unavailable(format!(
            "group {} has no leader yet; retry in a moment",
            spec.id
        )));
    }
    Ok(Group {
        id: spec.id,
        replicas,
    })
}

fn leader_hint(s: &Status) -> Option<String> {
    if s.code() != Code::Unavailable || s.details().is_empty() {
        return None;
    }
    match ErrorDetail::decode(s.details()).ok()?.kind? {
        error_detail::Kind::NotLeader(nl) if !nl.leader_addr.is_empty() => Some(nl.leader_addr),
        _ => None,
    }
}

/// Sends `call` to the leader of the group whose replicas are at `addrs`: follows not-leader
/// hints, and tries the next replica (with a doubling pause) after a failure `retryable` says
/// did nothing; at most `ATTEMPTS_MAX` attempts within `OWNERSHIP_DEADLINE`. `what` names the
/// call in the give-up message.
async fn on_leader<T, F, Fut>(
    what: &str,
    group_id: u64,
    addrs: &[String],
    timeout: Duration,
    retryable: impl Fn(&Status) -> bool,
    call: F,
) -> Result<T, Status>
where
    F: Fn(PeerClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let mut target = addrs
        .first()
        .cloned()
        .ok_or_else(|| Status::failed_precondition(format!("group {group_id} has no replicas")))?;
    let started = Instant::now();
    let mut rotate = 0;
    let mut backoff = Duration::from_millis(50);
    let mut last = Status::unavailable("no attempt made");
    for _ in 0..ATTEMPTS_MAX {
        if started.elapsed() > OWNERSHIP_DEADLINE {
            break;
        }
        let r = match peer_with_timeout(&target, timeout).await {
            Ok(c) => call(c).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(resp) => return Ok(resp),
            Err(s) if retryable(&s) => {
                match leader_hint(&s) {
                    Some(hint) => target = hint,
                    None => {
                        rotate += 1;
                        target = addrs[rotate % addrs.len()].clone();
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                }
                last = s;
            }
            Err(s) => return Err(s),
        }
    }
    Err(Status::unavailable(format!(
        "group {group_id}: could not {what} within {:?}: {}",
        started.elapsed(),
        last.message()
    )))
}

/// Installs `slots` as group `group`'s ownership at `map_version`, through its leader.
pub async fn set_ownership(
    group: &Group,
    map_version: u64,
    slot_count: u32,
    slots: Vec<u32>,
) -> Result<SetOwnershipResponse, Status> {
    let req = SetOwnershipRequest {
        group_id: group.id,
        map_version,
        slot_count,
        slots,
    };
    let addrs: Vec<String> = group.replicas.iter().map(|r| r.addr.clone()).collect();
    on_leader(
        "install ownership",
        group.id,
        &addrs,
        CALL_TIMEOUT,
        |s| s.code() == Code::Unavailable,
        |mut c| {
            let req = req.clone();
            async move { c.set_ownership(req).await.map(|r| r.into_inner()) }
        },
    )
    .await
}

/// Runs a membership change on the leader of the group whose replicas are at `addrs` (following
/// not-leader hints). Only a refusal before anything was proposed is retried elsewhere; the
/// change itself may take as long as its catch-up timeout.
pub async fn change_replicas(
    group_id: u64,
    addrs: &[String],
    req: ChangeReplicasRequest,
    timeout: Duration,
) -> Result<ChangeReplicasResponse, Status> {
    // Not the leader (a hint, or none yet), or unreachable: nothing was proposed.
    let nothing_proposed = |s: &Status| {
        s.code() == Code::Unavailable
            && (!s.details().is_empty() || s.message().contains("unreachable"))
    };
    on_leader(
        "reach the leader",
        group_id,
        addrs,
        timeout,
        nothing_proposed,
        |mut c| {
            let req = req.clone();
            async move { c.change_replicas(req).await.map(|r| r.into_inner()) }
        },
    )
    .await
}
