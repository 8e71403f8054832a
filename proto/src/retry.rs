//! One way to talk to a replica set: what a failed attempt means ([`classify`]), how long to wait
//! before the next one ([`Backoff`]), where it goes ([`LeaderCursor`]), and the loop that puts
//! them together ([`follow_leader`]).
//!
//! Every caller that follows a leader uses these parts: the clients (`crate::client`), the
//! router's config client, the config server's calls to group leaders and the migration mover.
//! The router's Kv forwarding loop adds its map-specific actions ([`Action::Refresh`],
//! [`Action::Locked`], holds bounded apart from attempts) on top of the same [`classify`] and
//! [`Backoff`]. The retry-safety rule stays [`crate::certainly_not_applied`]: a
//! [`Effect::Write`] is sent again only when it holds.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tonic::{Code, Status};

use crate::status::{certainly_not_applied, error_detail_of, is_transport_error};
use crate::v1::error_detail;

/// A doubling delay: `first` before the first retry, twice that before the next, never more than
/// `max`. Deterministic, so tests can state the curve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { first, max }
    }

    /// Delay before retry number `retry` (0-based).
    pub fn delay(&self, retry: u32) -> Duration {
        // Cap the shift so that the multiplication cannot overflow for large retry counts.
        self.first
            .saturating_mul(1u32 << retry.min(16))
            .min(self.max)
    }

    /// The longest total wait `retries` retries can cost.
    pub fn worst(&self, retries: u32) -> Duration {
        (0..retries).map(|r| self.delay(r)).sum()
    }
}

/// What a request may do to the data: decides which failures may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// A read the leader answers: retrying is always safe.
    Read,
    /// A read any replica may answer: retried like `Read`; a success says nothing about who
    /// leads, so the cursor does not remember it.
    StaleRead,
    /// A write: retried only when the failed attempt was certainly not applied
    /// ([`crate::certainly_not_applied`]), so that no write applies twice and no conditional
    /// write reports a failure caused by its own first attempt.
    Write,
    /// A write that cannot apply twice (a compare-and-set on the map version, a change that
    /// refuses to repeat itself, installing ownership at a version): retried like a read.
    IdempotentWrite,
}

impl Effect {
    /// Whether an attempt whose outcome is unknown may be sent again.
    pub fn repeatable(self) -> bool {
        self != Effect::Write
    }
}

/// What a retry loop does after an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The replica is not the leader and named the one that is (canonical `host:port`).
    Redirect(String),
    /// The replica cannot serve now and does not know who can (no leader, shutting down, refused
    /// connection, broken connection): try the next replica.
    Rotate,
    /// The node does not own the slot (`WrongShard`); it knows map version `node_version`.
    /// It never applied the request, so retrying against the owner of a newer map is safe.
    Refresh { node_version: u64 },
    /// The slot is in a migration's critical section (`SlotMoving`; certainly not applied): wait
    /// briefly and ask the same replica again.
    Hold,
    /// Not retryable: hand the status to the caller unchanged.
    Fail,
    /// A write failed in a way that does not prove it was not applied (a plain `UNAVAILABLE`, a
    /// connection that broke after the request was sent): answer "outcome unknown", never retry.
    OutcomeUnknown,
    /// An item is locked by an unfinished cross-group transaction; nothing was applied. Wait, or
    /// resolve the lock through its transaction's decision, then retry.
    Locked(error_detail::Locked),
}

impl Action {
    /// Whether [`follow_leader`] tries again after this action (the map-specific ones are the
    /// router's to act on).
    pub fn retries(&self) -> bool {
        matches!(self, Action::Redirect(_) | Action::Rotate | Action::Hold)
    }
}

/// Decides what to do after `status` for a request with `effect`.
pub fn classify(status: &Status, effect: Effect) -> Action {
    let action = classify_routing(status);
    match (effect, &action) {
        (Effect::Write, Action::Redirect(_) | Action::Rotate) if !certainly_not_applied(status) => {
            Action::OutcomeUnknown
        }
        _ => action,
    }
}

/// What `status` says about routing, whether or not the request may have been applied.
fn classify_routing(status: &Status) -> Action {
    use error_detail::Kind;
    match status.code() {
        Code::Unavailable => match error_detail_of(status) {
            Some(Kind::SlotMoving(_)) => Action::Hold,
            Some(Kind::NotLeader(nl)) if !nl.leader_addr.is_empty() => {
                match crate::addr::parse(&nl.leader_addr) {
                    Ok(addr) => Action::Redirect(addr),
                    // A hint we cannot use is as good as no hint.
                    Err(_) => Action::Rotate,
                }
            }
            // A routing or lock detail under the wrong code contradicts itself: not ours to
            // retry.
            Some(Kind::WrongShard(_) | Kind::Locked(_)) => Action::Fail,
            _ => Action::Rotate,
        },
        Code::Aborted => match error_detail_of(status) {
            Some(Kind::Locked(l)) => Action::Locked(l),
            _ => Action::Fail,
        },
        Code::FailedPrecondition => match error_detail_of(status) {
            Some(Kind::WrongShard(ws)) => Action::Refresh {
                node_version: ws.map_version,
            },
            _ => Action::Fail,
        },
        // Broken connections surface as Unknown / Internal / Cancelled statuses that tonic made
        // locally from a transport error (they carry its source); a node's own statuses never do.
        Code::Unknown | Code::Internal | Code::Cancelled if is_transport_error(status) => {
            Action::Rotate
        }
        _ => Action::Fail,
    }
}

/// The replicas of one set (canonical `host:port`), the leader last seen, and the replica to try
/// when no leader is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderCursor {
    pub addrs: Vec<String>,
    pub leader: Option<String>,
    pub next: usize,
}

impl LeaderCursor {
    /// A cursor over `addrs`, which must not be empty.
    pub fn new(addrs: Vec<String>) -> LeaderCursor {
        assert!(!addrs.is_empty(), "a leader cursor needs an address");
        LeaderCursor {
            addrs,
            leader: None,
            next: 0,
        }
    }

    /// The address the next attempt goes to: the known leader, else the next address in turn.
    pub fn target(&self) -> String {
        match &self.leader {
            Some(leader) => leader.clone(),
            None => self.addrs[self.next % self.addrs.len()].clone(),
        }
    }

    /// A replica named `leader` as the leader (it may be outside the list).
    pub fn redirect(&mut self, leader: String) {
        self.leader = Some(leader);
    }

    /// `addr` answered: it leads.
    pub fn succeeded(&mut self, addr: &str) {
        self.leader = Some(addr.to_string());
    }

    /// `failed` could not serve: forget it as the leader and step past it in the list. Another
    /// task may already have found another leader meanwhile; that one is kept.
    pub fn rotate(&mut self, failed: &str) {
        if self.leader.as_deref().is_some_and(|l| l != failed) {
            return;
        }
        self.leader = None;
        // A failed hint outside the list: any next address will do.
        self.next = match self.addrs.iter().position(|a| a == failed) {
            Some(i) => i + 1,
            None => self.next + 1,
        } % self.addrs.len();
    }

    /// Adds `addr` to the list unless it is there.
    pub fn learn(&mut self, addr: String) {
        if !self.addrs.contains(&addr) {
            self.addrs.push(addr);
        }
    }
}

/// How one call walks a replica set.
#[derive(Debug, Clone)]
pub struct Walk {
    pub effect: Effect,
    /// Most attempts, the first included (at least 1).
    pub attempts_max: u32,
    /// No attempt starts, and no backoff ends, after this.
    pub deadline: Instant,
    pub backoff: Backoff,
    /// Each attempt's own bound; `None`: the time left before the deadline. An attempt of a
    /// repeatable effect that runs out of its own bound is retried elsewhere.
    pub attempt_timeout: Option<Duration>,
    /// Stay on the cursor's target: hints end the walk and rotation does not move it (a stale
    /// read the user sent to one replica).
    pub pinned: bool,
    /// Reads a failed attempt; [`classify`] unless a caller widens what it retries.
    pub classify: fn(&Status, Effect) -> Action,
}

impl Walk {
    /// A walk with `effect`, `attempts_max` attempts before `deadline`, backing off by `backoff`.
    pub fn new(effect: Effect, attempts_max: u32, deadline: Instant, backoff: Backoff) -> Walk {
        Walk {
            effect,
            attempts_max: attempts_max.max(1),
            deadline,
            backoff,
            attempt_timeout: None,
            pinned: false,
            classify,
        }
    }
}

/// Why [`follow_leader`] stopped without an answer.
#[derive(Debug)]
pub enum Why {
    /// The last status is not retried for this effect: `action` says why.
    Refused { status: Status, action: Action },
    /// Retryable, but the attempts ran out.
    AttemptsSpent(Status),
    /// Retryable, but the deadline left no time for the backoff and another attempt.
    OutOfTime(Status),
    /// The deadline passed before the next attempt could start (`None`: before the first).
    DeadlinePassed(Option<Status>),
    /// The last attempt did not answer within `bound`, and could not be repeated.
    NoAnswer { bound: Duration },
}

/// The end of a walk that got no answer.
#[derive(Debug)]
pub struct GaveUp {
    pub why: Why,
    /// Attempts made, the last included.
    pub attempts: u32,
    /// Where the last attempt went.
    pub addr: String,
    /// Since the walk started.
    pub elapsed: Duration,
}

impl GaveUp {
    /// The last status a replica (or the transport) answered with, if any.
    pub fn last_status(&self) -> Option<&Status> {
        match &self.why {
            Why::Refused { status, .. } | Why::AttemptsSpent(status) | Why::OutOfTime(status) => {
                Some(status)
            }
            Why::DeadlinePassed(last) => last.as_ref(),
            Why::NoAnswer { .. } => None,
        }
    }

    /// The last status, owned.
    pub fn into_last_status(self) -> Option<Status> {
        match self.why {
            Why::Refused { status, .. } | Why::AttemptsSpent(status) | Why::OutOfTime(status) => {
                Some(status)
            }
            Why::DeadlinePassed(last) => last,
            Why::NoAnswer { .. } => None,
        }
    }
}

/// Sends one request to the leader of the replica set behind `cursor`: `rpc(addr, bound)` makes
/// one attempt on `addr`, which must answer within `bound` (the loop enforces it too).
///
/// Tries the cursor's target; after a failure [`Walk::classify`] reads it: a hint is followed (at
/// once the first time, with backoff after, so that replicas pointing at each other during an
/// election do not burn the attempts), `Rotate` moves to the next replica and `Hold` asks the
/// same one again, both after backing off; anything else ends the walk. At most
/// [`Walk::attempts_max`] attempts, none starting after [`Walk::deadline`]. A success is
/// remembered as the leader (not for a stale read); the cursor is shared by every caller of the
/// set and locked only between attempts.
pub async fn follow_leader<T, F, Fut>(
    cursor: &Mutex<LeaderCursor>,
    walk: &Walk,
    mut rpc: F,
) -> Result<T, GaveUp>
where
    F: FnMut(String, Duration) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let started = Instant::now();
    let mut attempts = 0u32;
    let mut redirected = false;
    let mut last = None;
    loop {
        let addr = cursor.lock().unwrap().target();
        let gave_up = |why, attempts| GaveUp {
            why,
            attempts,
            addr: addr.clone(),
            elapsed: started.elapsed(),
        };
        let remaining = walk.deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(gave_up(Why::DeadlinePassed(last), attempts));
        }
        let bound = walk.attempt_timeout.unwrap_or(remaining);
        attempts += 1;
        let status = match tokio::time::timeout(bound, rpc(addr.clone(), bound)).await {
            Ok(Ok(answer)) => {
                if walk.effect != Effect::StaleRead && !walk.pinned {
                    cursor.lock().unwrap().succeeded(&addr);
                }
                return Ok(answer);
            }
            Ok(Err(status)) => status,
            // Out of its own bound with time left: as good as an unavailable replica.
            Err(_) if walk.attempt_timeout.is_some() && walk.effect.repeatable() => {
                Status::unavailable(format!("{addr} did not answer within {bound:?}"))
            }
            Err(_) => return Err(gave_up(Why::NoAnswer { bound }, attempts)),
        };
        let action = (walk.classify)(&status, walk.effect);
        let delay = match &action {
            Action::Redirect(_) if walk.pinned => None,
            Action::Redirect(_) if !redirected => Some(Duration::ZERO),
            a if a.retries() => Some(walk.backoff.delay(attempts - 1)),
            _ => None,
        };
        let Some(delay) = delay else {
            return Err(gave_up(Why::Refused { status, action }, attempts));
        };
        if !walk.pinned {
            let mut cursor = cursor.lock().unwrap();
            match action {
                Action::Redirect(leader) => {
                    redirected = true;
                    cursor.redirect(leader);
                }
                Action::Rotate => cursor.rotate(&addr),
                _ => {}
            }
        }
        if attempts >= walk.attempts_max {
            return Err(gave_up(Why::AttemptsSpent(status), attempts));
        }
        if !delay.is_zero() {
            if delay >= walk.deadline.saturating_duration_since(Instant::now()) {
                // The next attempt could not start in time; the last error says more than
                // "deadline exceeded" would.
                return Err(gave_up(Why::OutOfTime(status), attempts));
            }
            tokio::time::sleep(delay).await;
        }
        tracing::debug!(
            %addr,
            attempts,
            code = ?status.code(),
            message = status.message(),
            "retrying on the replica set"
        );
        last = Some(status);
    }
}

#[cfg(test)]
mod tests;
