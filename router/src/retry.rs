//! What a failed attempt means, and how long to wait before the next one: the router's view of
//! [`ordo_proto::retry`], the one classification and backoff every Ordo caller uses.
//!
//! Shared by the Kv forwarding loop (`forward.rs`) and the config-server client (`config.rs`), so that
//! both read node and config-server errors the same way. The forwarding loop keeps its
//! map-specific actions (refresh, hold, locked) on top of [`classify`]; the config client walks
//! with [`ordo_proto::retry::follow_leader`].

use std::time::Duration;

use ordo_proto::retry::{self, Backoff};
use tonic::Status;

pub(crate) use ordo_proto::retry::Action;
pub(crate) use ordo_proto::status::{describe, pass_through};

/// Most attempts (the first included) one request makes before the router gives up.
pub(crate) const MAX_ATTEMPTS: u32 = 12;
/// Most holds (waits on a slot in a migration's critical section) one request makes; with
/// [`short_wait`] that is about 5 s, far above the critical section's bound.
pub(crate) const HOLDS_MAX: u32 = 100;
/// Delay between attempts: 10 ms doubling up to 250 ms.
pub(crate) const BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(10), Duration::from_millis(250));
/// Delay between short waits (a hold, a lock): 2 ms doubling up to 50 ms, so a short critical
/// section or a live transaction's few raft round trips cost the waiting request little more
/// than itself.
const SHORT_WAIT: Backoff = Backoff::new(Duration::from_millis(2), Duration::from_millis(50));

/// Whether a request can change data: decides which failures may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Get, Scan, map reads, idempotent decisions: retrying is always safe.
    Read,
    /// A write without an idempotency key (a 2PC prepare): retried only when the failed attempt
    /// was certainly not applied ([`ordo_proto::certainly_not_applied`]), so that no write
    /// applies twice and no conditional write reports a failure caused by its own first attempt.
    Write,
    /// Put, Delete, Txn, which the router keys (`RequestHeader.idempotency_key`): the node
    /// answers a repeat with the first outcome, so an attempt whose outcome is unknown is sent
    /// again, within the deadline.
    KeyedWrite,
}

impl Effect {
    /// Whether the request may change data.
    pub(crate) fn writes(self) -> bool {
        self != Effect::Read
    }
}

impl From<Effect> for retry::Effect {
    fn from(e: Effect) -> retry::Effect {
        match e {
            Effect::Read => retry::Effect::Read,
            Effect::Write => retry::Effect::Write,
            Effect::KeyedWrite => retry::Effect::IdempotentWrite,
        }
    }
}

/// Decides what to do after `status` for a request with `effect` ([`retry::classify`]).
pub(crate) fn classify(status: &Status, effect: Effect) -> Action {
    retry::classify(status, effect.into())
}

/// Delay before short wait number `n` (0-based) on a hold or a lock: 2 ms doubling up to
/// 50 ms. A fenced slot's critical section and a live transaction's locks both last a few raft
/// round trips, so the waits are brief and often.
pub(crate) fn short_wait(n: u32) -> Duration {
    SHORT_WAIT.delay(n)
}

/// Delay before retry number `retry` (0-based): 10 ms doubling up to 250 ms.
pub(crate) fn backoff(retry: u32) -> Duration {
    BACKOFF.delay(retry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ordo_proto::status::is_transport_error;
    use ordo_proto::v1::error_detail;
    use tonic::Code;

    fn with_detail(code: Code, kind: error_detail::Kind) -> Status {
        ordo_proto::status::with_detail(code, "msg", kind)
    }

    #[test]
    fn statuses_are_classified() {
        use Effect::{Read, Write};
        let hint = with_detail(
            Code::Unavailable,
            error_detail::Kind::NotLeader(error_detail::NotLeader {
                leader_id: 2,
                leader_addr: "http://127.0.0.1:7002/".into(),
            }),
        );
        for effect in [Read, Write] {
            assert_eq!(
                classify(&hint, effect),
                Action::Redirect("127.0.0.1:7002".into())
            );
        }
        let no_hint = with_detail(
            Code::Unavailable,
            error_detail::Kind::NotLeader(error_detail::NotLeader::default()),
        );
        assert_eq!(classify(&no_hint, Read), Action::Rotate);
        assert_eq!(classify(&no_hint, Write), Action::Rotate);
        let not_applied = with_detail(
            Code::Unavailable,
            error_detail::Kind::NotApplied(error_detail::NotApplied {}),
        );
        assert_eq!(classify(&not_applied, Read), Action::Rotate);
        assert_eq!(classify(&not_applied, Write), Action::Rotate);
        // A plain UNAVAILABLE may come after the write was proposed.
        let plain = Status::unavailable("no leader yet");
        assert_eq!(classify(&plain, Read), Action::Rotate);
        assert_eq!(classify(&plain, Write), Action::OutcomeUnknown);
        let wrong = with_detail(
            Code::FailedPrecondition,
            error_detail::Kind::WrongShard(error_detail::WrongShard { map_version: 7 }),
        );
        for effect in [Read, Write] {
            assert_eq!(
                classify(&wrong, effect),
                Action::Refresh { node_version: 7 }
            );
            assert_eq!(
                classify(&Status::failed_precondition("other"), effect),
                Action::Fail
            );
        }
        for code in [
            Code::InvalidArgument,
            Code::DeadlineExceeded,
            Code::DataLoss,
            Code::Unknown,
            Code::Internal,
            Code::Cancelled,
        ] {
            for effect in [Read, Write] {
                assert_eq!(
                    classify(&Status::new(code, "x"), effect),
                    Action::Fail,
                    "{code:?}"
                );
            }
        }
        // A status tonic built from an I/O error is a transport failure: a read moves on, a
        // write's outcome is unknown (the connection broke after the request may have been sent).
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let transport = Status::from_error(Box::new(io));
        assert!(is_transport_error(&transport));
        if matches!(
            transport.code(),
            Code::Unknown | Code::Internal | Code::Cancelled | Code::Unavailable
        ) {
            assert_eq!(classify(&transport, Read), Action::Rotate);
            assert_eq!(classify(&transport, Write), Action::OutcomeUnknown);
        }
        // A connection that could not be established: the request never left the router.
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let connect = Status::from_error(Box::new(tonic::ConnectError(Box::new(refused))));
        assert_eq!(classify(&connect, Read), Action::Rotate);
        assert_eq!(classify(&connect, Write), Action::Rotate);
    }

    #[test]
    fn backoff_doubles_from_10ms_to_250ms() {
        assert_eq!(backoff(0), Duration::from_millis(10));
        assert_eq!(backoff(1), Duration::from_millis(20));
        assert_eq!(backoff(4), Duration::from_millis(160));
        assert_eq!(backoff(5), BACKOFF.max);
        assert_eq!(backoff(1000), BACKOFF.max);
        // Even if every retry backs off fully, the attempts fit well inside the default deadline.
        let worst: Duration = (0..MAX_ATTEMPTS - 1).map(backoff).sum();
        assert!(worst < crate::deadline::DEFAULT_TIMEOUT / 4, "{worst:?}");
    }

    #[test]
    fn short_waits_double_from_2ms_to_50ms() {
        assert_eq!(short_wait(0), Duration::from_millis(2));
        assert_eq!(short_wait(3), Duration::from_millis(16));
        assert_eq!(short_wait(100), Duration::from_millis(50));
        assert_eq!(short_wait(1), Duration::from_millis(4));
        assert_eq!(short_wait(5), Duration::from_millis(50));
    }
}
