//! Replica membership changes, run on a group's leader for `Peer.ChangeReplicas`: each step is
//! one raft configuration change, checked by the driver against the quorum rules just before it
//! is proposed (`Driver::check_conf_change`), so the checks and the change cannot race.
//!
//! - add: learner (receives the log, does not vote) → wait until it holds everything committed
//!   when it joined → voter;
//! - remove: one voter or learner out; refused if the voters left would not have a live quorum;
//! - replace: add the new node as above, then remove the old one. The group never has fewer live
//!   voters than a quorum: the new node votes before the old one leaves, and it is caught up.

use std::time::{Duration, Instant};

use ordo_proto::v1::{ChangeReplicasRequest, ChangeReplicasResponse, Member, ReplicaChange};
use raft::prelude::{ConfChange, ConfChangeType, ConfState};

use crate::error::{Error, Result};
use crate::limits::{CATCH_UP_TIMEOUT_DEFAULT_MS, CATCH_UP_TIMEOUT_MAX_MS};
use crate::replica::inbox::{Members, Msg};
use crate::replica::ReplicaHandle;

/// How often the leader looks at a new node's progress while it catches up.
const CATCH_UP_POLL: Duration = Duration::from_millis(100);
const ADDR_BYTES_MAX: usize = 256;

/// What a request asks for, checked.
enum Change {
    Add { id: u64, addr: String },
    Remove { id: u64 },
    Replace { old: u64, id: u64, addr: String },
}

fn parse(r: &ChangeReplicasRequest) -> Result<(Change, Duration)> {
    let bad = |m: String| Err(Error::InvalidArgument(m));
    if r.node_id == 0 {
        return bad("node_id must be set (0 means \"no node\" in raft)".into());
    }
    let timeout = match r.catch_up_timeout_ms as u64 {
        0 => CATCH_UP_TIMEOUT_DEFAULT_MS,
        ms if ms > CATCH_UP_TIMEOUT_MAX_MS => {
            return bad(format!(
                "catch_up_timeout_ms {ms} is over the limit of {CATCH_UP_TIMEOUT_MAX_MS}"
            ))
        }
        ms => ms,
    };
    let addr = || -> Result<String> {
        let a = r.addr.trim();
        if a.is_empty() || a.len() > ADDR_BYTES_MAX || a.contains(',') || a.contains('=') {
            return Err(Error::InvalidArgument(format!(
                "addr {:?} is not a host:port of at most {ADDR_BYTES_MAX} bytes",
                r.addr
            )));
        }
        ordo_proto::addr::peer_endpoint(a)
            .map_err(|e| Error::InvalidArgument(format!("addr {a:?}: {e}")))?;
        Ok(a.to_string())
    };
    let change = match ReplicaChange::try_from(r.change) {
        Ok(ReplicaChange::Add) => Change::Add {
            id: r.node_id,
            addr: addr()?,
        },
        Ok(ReplicaChange::Remove) => Change::Remove { id: r.node_id },
        Ok(ReplicaChange::Replace) => {
            if r.old_node_id == 0 || r.old_node_id == r.node_id {
                return bad(format!(
                    "replace needs old_node_id, the node that leaves, different from node_id {}",
                    r.node_id
                ));
            }
            Change::Replace {
                old: r.old_node_id,
                id: r.node_id,
                addr: addr()?,
            }
        }
        _ => return bad(format!("change {} is not add, remove or replace", r.change)),
    };
    Ok((change, Duration::from_millis(timeout)))
}

impl ReplicaHandle {
    pub async fn members(&self) -> Result<Members> {
        self.ask(|resp| Msg::Members { resp }, "membership query")
            .await
    }

    async fn conf_change(&self, kind: ConfChangeType, id: u64, addr: &str) -> Result<ConfState> {
        let mut cc = ConfChange::default();
        cc.set_change_type(kind);
        cc.node_id = id;
        cc.context = addr.as_bytes().to_vec().into();
        self.ask(|resp| Msg::ChangeConf { cc, resp }, "membership change")
            .await
    }

    /// Runs one `ChangeReplicas` request. One at a time per leader.
    pub async fn change_replicas(
        &self,
        r: ChangeReplicasRequest,
    ) -> Result<ChangeReplicasResponse> {
        let (change, timeout) = parse(&r)?;
        let g = self.group_id;
        let _one = self.membership.try_lock().map_err(|_| {
            Error::FailedPrecondition(format!(
                "another membership change of group {g} is in progress; wait for it"
            ))
        })?;
        let mut catch_up_ms = 0;
        match change {
            Change::Add { id, addr } => catch_up_ms = self.add(id, &addr, timeout).await?,
            Change::Remove { id } => {
                self.conf_change(ConfChangeType::RemoveNode, id, "").await?;
            }
            Change::Replace { old, id, addr } => {
                // Refuse what the last step would refuse before adding anything.
                let m = self.members().await?;
                if !m.voters.contains(&old) && !m.learners.contains(&old) {
                    return Err(Error::FailedPrecondition(format!(
                        "node {old} is not a replica of group {g} (voters {:?}, learners {:?})",
                        m.voters, m.learners
                    )));
                }
                if old == self.node_id {
                    return Err(Error::FailedPrecondition(format!(
                        "node {old} leads group {g}: move leadership first \
                         (`ordoctl leader transfer --group {g} --to <another voter>`)"
                    )));
                }
                catch_up_ms = self.add(id, &addr, timeout).await?;
                self.conf_change(ConfChangeType::RemoveNode, old, "")
                    .await
                    .map_err(|e| {
                        Error::FailedPrecondition(format!(
                            "node {id} now votes in group {g}, but removing node {old} failed: \
                             {e}; run `ordoctl replica remove --group {g} --id {old}`"
                        ))
                    })?;
            }
        }
        let m = self.members().await?;
        Ok(ChangeReplicasResponse {
            members: to_members(&m),
            catch_up_ms,
        })
    }

    /// Learner, catch up, voter. Returns how long catching up took.
    async fn add(&self, id: u64, addr: &str, timeout: Duration) -> Result<u64> {
        let g = self.group_id;
        if self.members().await?.voters.contains(&id) {
            return Ok(0); // asking again is harmless
        }
        self.conf_change(ConfChangeType::AddLearnerNode, id, addr)
            .await?;
        let started = Instant::now();
        let target = self.members().await?.commit_index;
        tracing::info!(group = g, node = id, target, "new replica catching up");
        loop {
            let m = self.members().await?;
            if m.leader_id != self.node_id {
                return Err(Error::Unavailable(format!(
                    "leadership of group {g} moved while node {id} was catching up; it stays a \
                     learner: run the command again"
                )));
            }
            if m.voters.contains(&id) {
                break;
            }
            let matched = m.matched.get(&id).copied().unwrap_or(0);
            if matched >= target {
                break;
            }
            if started.elapsed() > timeout {
                // Not UNAVAILABLE: retrying at once would only wait again for a node that is
                // not there.
                return Err(Error::FailedPrecondition(format!(
                    "node {id} did not catch up within {} ms (it holds the log to index \
                     {matched} of {target}); it stays a learner. Check that it runs with --join \
                     at {addr}, then run the command again, or remove it",
                    timeout.as_millis()
                )));
            }
            tokio::time::sleep(CATCH_UP_POLL).await;
        }
        let catch_up_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            group = g,
            node = id,
            catch_up_ms,
            "new replica caught up; making it a voter"
        );
        self.conf_change(ConfChangeType::AddNode, id, addr).await?;
        Ok(catch_up_ms)
    }
}

pub fn to_members(m: &Members) -> Vec<Member> {
    let voters = m.voters.iter().map(|id| (id, true));
    let learners = m.learners.iter().map(|id| (id, false));
    voters
        .chain(learners)
        .map(|(id, voter)| Member {
            node_id: *id,
            addr: m.addrs.get(id).cloned().unwrap_or_default(),
            voter,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(change: ReplicaChange, id: u64, addr: &str, old: u64) -> ChangeReplicasRequest {
        ChangeReplicasRequest {
            change: change as i32,
            node_id: id,
            addr: addr.into(),
            old_node_id: old,
            catch_up_timeout_ms: 0,
        }
    }

    #[test]
    fn bad_requests_say_what_to_fix() {
        for (r, needle) in [
            (req(ReplicaChange::Add, 0, "127.0.0.1:1", 0), "node_id"),
            (req(ReplicaChange::Add, 4, "", 0), "addr"),
            (req(ReplicaChange::Add, 4, "a=b", 0), "addr"),
            (
                req(ReplicaChange::Replace, 4, "127.0.0.1:1", 0),
                "old_node_id",
            ),
            (
                req(ReplicaChange::Replace, 4, "127.0.0.1:1", 4),
                "old_node_id",
            ),
            (
                req(ReplicaChange::Unspecified, 4, "127.0.0.1:1", 0),
                "not add",
            ),
            (
                ChangeReplicasRequest {
                    catch_up_timeout_ms: u32::MAX,
                    ..req(ReplicaChange::Add, 4, "127.0.0.1:1", 0)
                },
                "limit",
            ),
        ] {
            let err = parse(&r).err().expect("refused").to_string();
            assert!(err.contains(needle), "{err}");
        }
        assert!(parse(&req(ReplicaChange::Remove, 3, "", 0)).is_ok());
        assert!(parse(&req(ReplicaChange::Replace, 4, "127.0.0.1:1", 3)).is_ok());
    }
}
