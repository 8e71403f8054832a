//! What the config server asks of shard-group replicas: their status, and calls to a group's
//! leader (installing ownership, membership changes, the mover's migration steps), which follow
//! the leader with [`ordo_proto::retry::follow_leader`] over cached channels.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use ordo_proto::addr::{self, ChannelCache, Profile, ADMIN_MESSAGE_BYTES_MAX};
use ordo_proto::retry::{
    classify, follow_leader, Action, Backoff, Effect, GaveUp, LeaderCursor, Walk, Why,
};
use ordo_proto::status::describe;
use ordo_proto::v1::peer_client::PeerClient;
use ordo_proto::v1::{
    ChangeReplicasRequest, ChangeReplicasResponse, Group, GroupSpec, Replica, SetOwnershipRequest,
    SetOwnershipResponse, StatusRequest, StatusResponse,
};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Longest wait for one replica's status, and for one ownership install.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an ownership install or membership change keeps starting attempts.
const OWNERSHIP_DEADLINE: Duration = Duration::from_secs(10);
const ATTEMPTS_MAX: u32 = 12;
/// 50 ms doubling up to 500 ms between attempts (the first not-leader hint is followed at once).
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));

/// How a call to a group's leader walks the group.
#[derive(Debug, Clone)]
pub struct LeaderCall {
    /// What the call does, for the give-up message ("install ownership").
    pub what: &'static str,
    pub effect: Effect,
    pub attempts_max: u32,
    /// No attempt starts after this much time.
    pub deadline: Duration,
    /// Each attempt's bound (it may outlive the deadline).
    pub attempt_timeout: Duration,
    pub backoff: Backoff,
    /// [`classify`] unless the call retries more (see the mover).
    pub classify: fn(&Status, Effect) -> Action,
}

impl LeaderCall {
    /// Installing ownership: idempotent (a version at or below the installed one is refused).
    fn ownership() -> LeaderCall {
        LeaderCall {
            what: "install ownership",
            effect: Effect::IdempotentWrite,
            attempts_max: ATTEMPTS_MAX,
            deadline: OWNERSHIP_DEADLINE,
            attempt_timeout: CALL_TIMEOUT,
            backoff: BACKOFF,
            classify,
        }
    }
}

/// Channels to the replicas of every group, and the replica of each group that last answered as
/// its leader (tried first). One per config server replica, shared by its service and its mover.
pub struct GroupLeaders {
    channels: ChannelCache,
    leaders: Mutex<HashMap<u64, String>>,
}

impl Default for GroupLeaders {
    fn default() -> GroupLeaders {
        GroupLeaders {
            channels: ChannelCache::new(Profile::Admin),
            leaders: Mutex::default(),
        }
    }
}

impl GroupLeaders {
    /// A Peer stub on the cached channel to `addr` (any accepted spelling).
    fn peer(&self, addr: &str) -> Result<PeerClient<Channel>, Status> {
        let canonical =
            addr::parse(addr).map_err(|e| Status::invalid_argument(format!("address {e}")))?;
        let channel = self
            .channels
            .channel(&canonical)
            .map_err(|e| Status::invalid_argument(format!("address {e}")))?;
        Ok(PeerClient::new(channel)
            .max_decoding_message_size(ADMIN_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(ADMIN_MESSAGE_BYTES_MAX))
    }

    /// The status of the replica at `addr`, within [`CALL_TIMEOUT`].
    pub async fn status(&self, addr: &str) -> Result<StatusResponse, Status> {
        let mut c = self.peer(addr)?;
        let mut request = Request::new(StatusRequest {
            with_data_digest: false,
        });
        request.set_timeout(CALL_TIMEOUT);
        Ok(tokio::time::timeout(CALL_TIMEOUT, c.status(request))
            .await
            .map_err(|_| {
                Status::unavailable(format!("{addr} did not answer within {CALL_TIMEOUT:?}"))
            })??
            .into_inner())
    }

    /// Checks that every address of `spec` is a live replica of group `spec.id`, that they agree on
    /// who the replicas are, and that the group has a leader. Returns the group with node ids.
    pub async fn resolve_group(&self, spec: &GroupSpec) -> Result<Group, Status> {
        let statuses = futures::future::join_all(spec.addrs.iter().map(|a| self.status(a))).await;
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

    /// Sends `req` with `rpc` to the leader of group `group_id`, whose replicas are at `addrs`,
    /// walking the group as `call` says. A refusal comes back unchanged; running out of attempts
    /// or time is `UNAVAILABLE` with the last error.
    pub async fn on_leader<Req, T, F, Fut>(
        &self,
        group_id: u64,
        addrs: &[String],
        call: &LeaderCall,
        req: Req,
        rpc: F,
    ) -> Result<T, Status>
    where
        Req: Clone,
        F: Fn(PeerClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let cursor = Mutex::new(self.cursor(group_id, addrs)?);
        let mut walk = Walk::new(
            call.effect,
            call.attempts_max,
            Instant::now() + call.deadline,
            call.backoff,
        );
        walk.attempt_timeout = Some(call.attempt_timeout);
        walk.classify = call.classify;
        let (req, rpc) = (&req, &rpc);
        let attempt = |addr: String, bound: Duration| {
            let client = self.peer(&addr);
            let mut request = Request::new(req.clone());
            request.set_timeout(bound);
            async move { rpc(client?, request).await.map(Response::into_inner) }
        };
        let result = follow_leader(&cursor, &walk, attempt).await;
        let leader = cursor.into_inner().unwrap().leader;
        let mut leaders = self.leaders.lock().unwrap();
        match leader {
            Some(l) => leaders.insert(group_id, l),
            None => leaders.remove(&group_id),
        };
        result.map_err(|gave_up| gave_up_status(group_id, call.what, gave_up))
    }

    /// A cursor over `addrs` (canonical), starting at the replica that led last.
    fn cursor(&self, group_id: u64, addrs: &[String]) -> Result<LeaderCursor, Status> {
        if addrs.is_empty() {
            return Err(Status::failed_precondition(format!(
                "group {group_id} has no replicas"
            )));
        }
        let canonical = addrs
            .iter()
            .map(|a| addr::parse(a))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(format!("address {e}")))?;
        let mut cursor = LeaderCursor::new(canonical);
        cursor.leader = self.leaders.lock().unwrap().get(&group_id).cloned();
        Ok(cursor)
    }

    /// Installs `slots` as group `group`'s ownership at `map_version`, through its leader, and
    /// tells it where the config servers are (`config_addrs`).
    pub async fn set_ownership(
        &self,
        group: &Group,
        map_version: u64,
        slot_count: u32,
        slots: Vec<u32>,
        config_addrs: Vec<String>,
    ) -> Result<SetOwnershipResponse, Status> {
        let req = SetOwnershipRequest {
            group_id: group.id,
            map_version,
            slot_count,
            slots,
            config_addrs,
        };
        let addrs: Vec<String> = group.replicas.iter().map(|r| r.addr.clone()).collect();
        self.on_leader(
            group.id,
            &addrs,
            &LeaderCall::ownership(),
            req,
            |mut c, r| async move { c.set_ownership(r).await },
        )
        .await
    }

    /// Runs a membership change on the leader of the group whose replicas are at `addrs`
    /// (following not-leader hints). A write: only a refusal before anything was proposed
    /// ([`ordo_proto::certainly_not_applied`]) is retried elsewhere; the change itself may take
    /// as long as `timeout` (its catch-up timeout and more).
    pub async fn change_replicas(
        &self,
        group_id: u64,
        addrs: &[String],
        req: ChangeReplicasRequest,
        timeout: Duration,
    ) -> Result<ChangeReplicasResponse, Status> {
        let call = LeaderCall {
            what: "reach the leader",
            effect: Effect::Write,
            attempt_timeout: timeout,
            ..LeaderCall::ownership()
        };
        self.on_leader(group_id, addrs, &call, req, |mut c, r| async move {
            c.change_replicas(r).await
        })
        .await
    }
}

/// What a caller of [`GroupLeaders::on_leader`] sees of a walk that got no answer.
fn gave_up_status(group_id: u64, what: &str, gave_up: GaveUp) -> Status {
    let elapsed = gave_up.elapsed;
    let attempts = gave_up.attempts;
    let last = match gave_up.why {
        Why::Refused { status, .. } => return status,
        Why::NoAnswer { bound } => format!("{} did not answer within {bound:?}", gave_up.addr),
        Why::AttemptsSpent(status) | Why::OutOfTime(status) | Why::DeadlinePassed(Some(status)) => {
            describe(&status)
        }
        Why::DeadlinePassed(None) => "no attempt made".to_string(),
    };
    Status::unavailable(format!(
        "group {group_id}: could not {what} within {elapsed:.1?} ({attempts} attempt(s)): {last}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_start_at_the_last_leader_and_check_addresses() {
        let g = GroupLeaders::default();
        let addrs = vec!["a:1".to_string(), "http://b:1/".to_string()];
        let c = g.cursor(7, &addrs).unwrap();
        assert_eq!(
            (c.addrs.as_slice(), c.target()),
            (
                &["a:1".to_string(), "b:1".to_string()][..],
                "a:1".to_string()
            )
        );
        g.leaders.lock().unwrap().insert(7, "b:1".into());
        assert_eq!(g.cursor(7, &addrs).unwrap().target(), "b:1");
        assert_eq!(g.cursor(8, &addrs).unwrap().target(), "a:1");
        assert_eq!(
            g.cursor(7, &[]).unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
        let bad = vec!["https://a:1".to_string()];
        assert_eq!(
            g.cursor(7, &bad).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn giving_up_names_the_group_the_call_and_the_last_error() {
        let gave_up = GaveUp {
            why: Why::AttemptsSpent(Status::unavailable("no leader")),
            attempts: 12,
            addr: "a:1".into(),
            elapsed: Duration::from_millis(1500),
        };
        let s = gave_up_status(3, "install ownership", gave_up);
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(
            s.message(),
            "group 3: could not install ownership within 1.5s (12 attempt(s)): Unavailable: no leader"
        );
        let refused = GaveUp {
            why: Why::Refused {
                status: Status::failed_precondition("older map"),
                action: Action::Fail,
            },
            attempts: 1,
            addr: "a:1".into(),
            elapsed: Duration::ZERO,
        };
        let s = gave_up_status(3, "install ownership", refused);
        assert_eq!(
            (s.code(), s.message()),
            (tonic::Code::FailedPrecondition, "older map")
        );
    }
}
