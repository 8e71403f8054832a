//! Membership changes and leader transfers on the driver: the checks that keep a quorum live
//! (one change at a time, never the leader, never below a live majority), proposing a raft conf
//! change, applying it (raft's configuration, the outbox's peers, both persisted), and answering
//! whoever asked once the outcome is known.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ordo_proto::v1::TransferLeaderResponse;
use protobuf::Message as _;
use raft::prelude::*;
use raft::StateRole;
use tokio::sync::oneshot;

use super::Driver;
use crate::error::{Error, Result};
use crate::limits::*;
use crate::replica::inbox::Members;

/// The membership change this leader proposed and has not seen applied.
pub(super) struct ConfWaiter {
    pub(super) index: u64,
    pub(super) term: u64,
    pub(super) resp: oneshot::Sender<Result<ConfState>>,
}

/// A leader transfer this replica started and has not seen finish.
pub(super) struct Transfer {
    pub(super) to: u64,
    pub(super) since: Instant,
    pub(super) resp: oneshot::Sender<Result<TransferLeaderResponse>>,
}

impl Driver {
    pub(super) fn start_transfer(
        &mut self,
        to: u64,
        resp: oneshot::Sender<Result<TransferLeaderResponse>>,
    ) {
        let voters = self.raw.store().conf_state().voters.clone();
        let err = if self.raw.raft.state != StateRole::Leader {
            Some(self.not_leader())
        } else if !voters.contains(&to) {
            Some(Error::FailedPrecondition(format!(
                "node {to} is not a voter of group {} (voters: {voters:?})",
                self.cfg.group_id
            )))
        } else {
            self.transfer.as_ref().map(|t| {
                Error::FailedPrecondition(format!(
                    "a leader transfer to node {} is already in progress; wait for it",
                    t.to
                ))
            })
        };
        if let Some(e) = err {
            let _ = resp.send(Err(e));
            return;
        }
        tracing::info!(
            node = self.cfg.node_id,
            group = self.cfg.group_id,
            to,
            "transferring leadership"
        );
        if to != self.cfg.node_id {
            self.raw.transfer_leader(to);
        }
        self.transfer = Some(Transfer {
            to,
            since: Instant::now(),
            resp,
        });
    }

    pub(super) fn members(&self) -> Members {
        let r = &self.raw.raft;
        let cs = self.raw.store().conf_state();
        let matched = if r.state == StateRole::Leader {
            r.prs().iter().map(|(id, p)| (*id, p.matched)).collect()
        } else {
            BTreeMap::new()
        };
        Members {
            leader_id: r.leader_id,
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
            addrs: self.outbox.addrs(),
            commit_index: r.raft_log.committed,
            matched,
        }
    }

    /// Whether the leader heard from `id` recently (itself always).
    pub(super) fn is_live(&self, id: u64) -> bool {
        id == self.cfg.node_id
            || self
                .last_heard
                .get(&id)
                .is_some_and(|t| t.elapsed() < Duration::from_millis(REPLICA_LIVE_MS))
    }

    /// Why `cc` must not be proposed now, if it must not; `Ok(Some(cs))` when it is already in
    /// effect (asking again is harmless).
    pub(super) fn check_conf_change(&self, cc: &ConfChange) -> Result<Option<ConfState>> {
        let g = self.cfg.group_id;
        let cs = self.raw.store().conf_state();
        let refuse = |why: String| Err(Error::FailedPrecondition(why));
        if self.raw.raft.state != StateRole::Leader {
            return Err(self.not_leader());
        }
        if let Some(w) = &self.conf_waiter {
            return refuse(format!(
                "another membership change of group {g} is in progress (raft index {}); wait for it",
                w.index
            ));
        }
        if self.raw.raft.has_pending_conf() || !cs.voters_outgoing.is_empty() {
            return refuse(format!(
                "a membership change of group {g} is still being applied; retry in a moment"
            ));
        }
        let id = cc.node_id;
        let (voter, learner) = (cs.voters.contains(&id), cs.learners.contains(&id));
        let quorum_after = |voters: Vec<u64>, action: &str| -> Result<Option<ConfState>> {
            let need = voters.len() / 2 + 1;
            let live: Vec<u64> = voters
                .iter()
                .copied()
                .filter(|v| self.is_live(*v))
                .collect();
            if voters.is_empty() || live.len() < need {
                return refuse(format!(
                    "{action} would lose quorum: group {g} would have voters {voters:?}, of which \
                     only {live:?} are live, and needs {need}; bring replicas back first"
                ));
            }
            Ok(None)
        };
        match cc.get_change_type() {
            ConfChangeType::AddLearnerNode => {
                if voter {
                    return refuse(format!("node {id} is already a voter of group {g}"));
                }
                if cc.context.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "no address given for node {id}"
                    )));
                }
                if learner {
                    return Ok(Some(cs.clone()));
                }
                Ok(None)
            }
            ConfChangeType::AddNode => {
                if voter {
                    return Ok(Some(cs.clone()));
                }
                if !learner {
                    return refuse(format!(
                        "node {id} is not a learner of group {g}: add it as a learner first"
                    ));
                }
                let mut after = cs.voters.clone();
                after.push(id);
                quorum_after(after, &format!("making node {id} a voter"))
            }
            ConfChangeType::RemoveNode => {
                if !voter && !learner {
                    return refuse(format!(
                        "node {id} is not a replica of group {g} (voters {:?}, learners {:?})",
                        cs.voters, cs.learners
                    ));
                }
                if id == self.cfg.node_id {
                    return refuse(format!(
                        "node {id} leads group {g}: move leadership first \
                         (`ordoctl leader transfer --group {g} --to <another voter>`)"
                    ));
                }
                if learner {
                    return Ok(None);
                }
                let after = cs.voters.iter().copied().filter(|v| *v != id).collect();
                quorum_after(after, &format!("removing node {id}"))
            }
        }
    }

    pub(super) fn start_conf_change(
        &mut self,
        cc: ConfChange,
        resp: oneshot::Sender<Result<ConfState>>,
    ) {
        match self.check_conf_change(&cc) {
            Err(e) => {
                let _ = resp.send(Err(e));
                return;
            }
            Ok(Some(cs)) => {
                let _ = resp.send(Ok(cs));
                return;
            }
            Ok(None) => {}
        }
        self.propose_pending();
        tracing::info!(node = self.cfg.node_id, group = self.cfg.group_id, change = ?cc.get_change_type(),
            target = cc.node_id, "proposing a membership change");
        match self.raw.propose_conf_change(vec![], cc) {
            Ok(()) => {
                self.conf_waiter = Some(ConfWaiter {
                    index: self.raw.raft.raft_log.last_index(),
                    term: self.raw.raft.term,
                    resp,
                });
            }
            Err(e) => {
                let _ = resp.send(Err(Error::NotApplied(format!(
                    "membership change refused by raft ({e}); nothing changed"
                ))));
            }
        }
    }

    /// Answers a leader transfer once its outcome is known: the target leads, someone else
    /// does, or it took too long.
    pub(super) fn check_transfer(&mut self) {
        let Some(t) = &self.transfer else { return };
        let r = &self.raw.raft;
        let outcome = if r.leader_id == t.to {
            Some(Ok(TransferLeaderResponse {
                leader_id: r.leader_id,
                term: r.term,
            }))
        } else if r.state != StateRole::Leader && r.leader_id != 0 {
            Some(Err(Error::Unavailable(format!(
                "leadership went to node {} instead of node {}; retry the transfer",
                r.leader_id, t.to
            ))))
        } else if t.since.elapsed() > Duration::from_millis(LEADER_TRANSFER_TIMEOUT_MS) {
            Some(Err(Error::Unavailable(format!(
                "node {} did not take over within {LEADER_TRANSFER_TIMEOUT_MS} ms (is it down \
                 or far behind?); node {} still leads",
                t.to, self.cfg.node_id
            ))))
        } else {
            None
        };
        if let Some(outcome) = outcome {
            let t = self.transfer.take().expect("checked above");
            let _ = t.resp.send(outcome);
        }
    }

    /// Applies a membership change: raft's configuration, the transport's peers (an added
    /// node's address travels in the change's context) and both persisted.
    pub(super) fn apply_conf_change(&mut self, e: &Entry) -> Result<ConfState> {
        // A restart replays the entries sled had not made durable; a conf change among them
        // that the raft log's conf state already holds must not be applied twice.
        if e.index <= self.raw.store().conf_index() {
            return Ok(self.raw.store().conf_state().clone());
        }
        let corrupt = |err| Error::Corruption(format!("conf change at {}: {err}", e.index));
        let (cs, changes) = if e.get_entry_type() == EntryType::EntryConfChangeV2 {
            let mut cc = ConfChangeV2::default();
            cc.merge_from_bytes(&e.data).map_err(corrupt)?;
            let changes: Vec<_> = cc
                .changes
                .iter()
                .map(|c| (c.get_change_type(), c.node_id, cc.context.to_vec()))
                .collect();
            (self.raw.apply_conf_change(&cc), changes)
        } else {
            let mut cc = ConfChange::default();
            cc.merge_from_bytes(&e.data).map_err(corrupt)?;
            let change = (cc.get_change_type(), cc.node_id, cc.context.to_vec());
            (self.raw.apply_conf_change(&cc), vec![change])
        };
        let cs = cs.map_err(|err| Error::Storage(format!("conf change at {}: {err}", e.index)))?;
        for (kind, id, context) in changes {
            match kind {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    match std::str::from_utf8(&context) {
                        Ok(addr) if !addr.is_empty() => self.outbox.add_peer(id, addr),
                        _ => {}
                    }
                }
                ConfChangeType::RemoveNode if id == self.cfg.node_id => {
                    tracing::warn!(node = id, group = self.cfg.group_id,
                        "this replica was removed from its group: it takes no further part and can be stopped");
                }
                ConfChangeType::RemoveNode => {
                    self.outbox.remove_peer(id);
                    self.last_heard.remove(&id);
                }
            }
        }
        tracing::info!(node = self.cfg.node_id, group = self.cfg.group_id, index = e.index,
            voters = ?cs.voters, learners = ?cs.learners, "membership changed");
        let addrs = self.outbox.addrs();
        self.raw.mut_store().set_peer_addrs(&addrs)?;
        self.raw.mut_store().set_conf_state(&cs, e.index)?;
        Ok(cs)
    }
}

pub(super) fn conf_not_applied() -> Error {
    Error::NotApplied(
        "the membership change was not applied (raft refused it or leadership changed); nothing changed, retry".into(),
    )
}
