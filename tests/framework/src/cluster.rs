//! One vocabulary for every cluster a test runs (as etcd's `tests/framework` has one `Cluster`
//! interface for process and in-process clusters): its members, a client, and "kill the
//! leader of group 2" said the same way whether the members are processes or in-process nodes.
//!
//! | harness | members | kill |
//! | --- | --- | --- |
//! | [`ProcGroup`](crate::proc::ProcGroup) | one group of `ordo node` processes | SIGKILL |
//! | [`ProcCluster`](crate::proc::ProcCluster) | config servers, groups, a router: processes | SIGKILL |
//! | [`InProcGroup`](crate::inproc::InProcGroup) | one group of in-process nodes | clean stop |
//! | [`InProcCluster`](crate::inproc::InProcCluster) | a whole [`Playground`](ordo::playground::Playground) | clean stop |

use std::fmt;
use std::time::Duration;

use ordo_proto::client::Client;
use ordo_proto::v1::StatusResponse;

use crate::net::node_status;
use crate::wait::wait_for;

/// The raft group of the config servers.
pub const CONFIG_GROUP: u64 = 0;

/// One replica of a cluster: its raft group ([`CONFIG_GROUP`] for the config servers) and its
/// raft id within the group. Ids repeat across groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Member {
    pub group: u64,
    pub id: u64,
}

impl Member {
    pub fn new(group: u64, id: u64) -> Member {
        Member { group, id }
    }
}

impl fmt::Display for Member {
    /// `config-2`, `g1-n3`: the names the process logs carry.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.group == CONFIG_GROUP {
            write!(f, "config-{}", self.id)
        } else {
            write!(f, "g{}-n{}", self.group, self.id)
        }
    }
}

/// A running cluster, whatever its members are made of. Async methods run on the test's
/// runtime; the harnesses are not shared between tasks, so no `Send` bound is promised.
#[allow(async_fn_in_trait)]
pub trait Cluster {
    /// The members of raft group `group`, running or not, in id order.
    fn members(&self, group: u64) -> Vec<Member>;

    /// Where `m` serves gRPC (it keeps its address across restarts).
    fn addr(&self, m: Member) -> String;

    fn is_running(&self, m: Member) -> bool;

    /// A client of the data API: through the router for a whole cluster, to the replicas for
    /// one group.
    fn client(&self) -> Client;

    /// Stops `m` at once: SIGKILL for a process (no shutdown, no flush), a clean stop of an
    /// in-process node (in-flight requests fail, storage is closed).
    async fn kill(&mut self, m: Member);

    /// Starts `m` again on its data dir, with the same configuration.
    async fn restart(&mut self, m: Member);

    /// The running member of `group` that says it leads now, if any: by default the first one
    /// whose status over gRPC says so (in-process harnesses look at the replica directly).
    async fn find_leader(&self, group: u64) -> Option<Member> {
        for m in self.members(group) {
            if !self.is_running(m) {
                continue;
            }
            if let Some(s) = self.status(m, false).await {
                if s.role == "Leader" {
                    return Some(m);
                }
            }
        }
        None
    }

    /// Waits until some running member of `group` leads, within `bound`.
    async fn wait_leader(&self, group: u64, bound: Duration) -> Member {
        wait_for(&format!("a leader of group {group}"), bound, || {
            self.find_leader(group)
        })
        .await
    }

    /// `m`'s status over gRPC, if it answers.
    async fn status(&self, m: Member, with_digest: bool) -> Option<StatusResponse> {
        node_status(&self.addr(m), with_digest).await
    }

    /// Waits until `m` answers a status request (it serves again after a restart).
    async fn answers(&self, m: Member, bound: Duration) {
        wait_for(&format!("{m} to answer after its start"), bound, || async {
            self.status(m, false).await.map(|_| ())
        })
        .await
    }
}
