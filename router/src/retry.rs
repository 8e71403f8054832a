//! What a failed attempt means, and how long to wait before the next one.
//!
//! Shared by the Kv forwarding loop (`kv.rs`) and the config-server client (`config.rs`), so that
//! both read node and config-server errors the same way.

use std::error::Error as _;
use std::time::Duration;

use ordo_proto::v1::error_detail;
use tonic::{Code, Status};

use crate::pool::canonical_addr;

/// Most attempts (the first included) one request makes before the router gives up.
pub(crate) const MAX_ATTEMPTS: u32 = 12;
/// Most holds (waits on a slot in a migration's critical section) one request makes; with
/// [`hold_delay`] that is about 5 s, far above the critical section's bound.
pub(crate) const HOLDS_MAX: u32 = 100;
/// Delay before the first retry; doubled on every further one.
const BACKOFF_BASE: Duration = Duration::from_millis(10);
/// Longest delay between two attempts.
const BACKOFF_MAX: Duration = Duration::from_millis(250);
/// Longest error description kept for a message (node messages are not ours to bound).
const DESCRIPTION_CHARS_MAX: usize = 400;

/// What the retry loop does after an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// The replica is not the leader and named the one that is (canonical `host:port`).
    Redirect(String),
    /// The replica cannot serve now and does not know who can (no leader, shutting down, refused
    /// connection, broken connection): try the next replica.
    Rotate,
    /// The node does not own the slot (`WrongShard`); it knows map version `node_version`.
    /// It never applied the request, so retrying against the owner of a newer map is safe.
    Refresh { node_version: u64 },
    /// The slot is in a migration's critical section (`SlotMoving`; certainly not applied): wait
    /// briefly and try again. Holds do not use up attempts; [`HOLDS_MAX`] bounds them.
    Hold,
    /// Not the router's business: hand the status to the client unchanged.
    Fail,
    /// A write failed in a way that does not prove it was not applied (a plain `UNAVAILABLE`, a
    /// connection that broke after the request was sent): answer "outcome unknown", never retry.
    OutcomeUnknown,
    /// An item is locked by an unfinished cross-group transaction; nothing was applied. Wait, or
    /// resolve the lock through its transaction record, then retry.
    Locked(error_detail::Locked),
}

/// Whether a request can change data: decides which failures may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Get, Scan, map reads: retrying is always safe.
    Read,
    /// Put, Delete, Txn: retried only when the failed attempt was certainly not applied
    /// ([`ordo_proto::certainly_not_applied`]), so that no write applies twice and no conditional
    /// write reports a failure caused by its own first attempt.
    Write,
}

/// Decides what to do after `status` for a request with `effect`.
pub(crate) fn classify(status: &Status, effect: Effect) -> Action {
    let action = classify_routing(status);
    match (effect, &action) {
        (Effect::Write, Action::Redirect(_) | Action::Rotate)
            if !ordo_proto::certainly_not_applied(status) =>
        {
            Action::OutcomeUnknown
        }
        _ => action,
    }
}

/// What `status` says about routing, whether or not the request may have been applied.
fn classify_routing(status: &Status) -> Action {
    match status.code() {
        Code::Unavailable => match error_detail_of(status) {
            Some(error_detail::Kind::SlotMoving(_)) => Action::Hold,
            Some(error_detail::Kind::NotLeader(nl)) if !nl.leader_addr.is_empty() => {
                match canonical_addr(&nl.leader_addr) {
                    Ok(addr) => Action::Redirect(addr),
                    // A hint we cannot use is as good as no hint.
                    Err(_) => Action::Rotate,
                }
            }
            _ => Action::Rotate,
        },
        Code::Aborted => match error_detail_of(status) {
            Some(error_detail::Kind::Locked(l)) => Action::Locked(l),
            _ => Action::Fail,
        },
        Code::FailedPrecondition => match error_detail_of(status) {
            Some(error_detail::Kind::WrongShard(ws)) => Action::Refresh {
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

/// Whether tonic produced `status` on this side from a transport failure, rather than decoding it
/// from the remote's answer.
pub(crate) fn is_transport_error(status: &Status) -> bool {
    status.source().is_some()
}

/// The typed detail a node attached to an error status, if any.
pub(crate) fn error_detail_of(status: &Status) -> Option<error_detail::Kind> {
    ordo_proto::error_detail_of(status)
}

/// A one-line account of `status` for logs and for the message of an exhausted request.
pub(crate) fn describe(status: &Status) -> String {
    let mut text = match error_detail_of(status) {
        Some(error_detail::Kind::NotLeader(nl)) => {
            let leader = match (nl.leader_id, nl.leader_addr.as_str()) {
                (0, "") => "leader unknown".to_string(),
                (id, "") => format!("leader is node {id}, address unknown"),
                (id, addr) => format!("leader is node {id} at {addr}"),
            };
            format!("not leader ({leader}): {}", status.message())
        }
        Some(error_detail::Kind::WrongShard(ws)) => format!(
            "wrong shard (the node is at map v{}): {}",
            ws.map_version,
            status.message()
        ),
        Some(error_detail::Kind::NotApplied(_)) => format!("not applied: {}", status.message()),
        Some(error_detail::Kind::Locked(_)) => format!("locked: {}", status.message()),
        Some(error_detail::Kind::SlotMoving(_)) => {
            format!("slot moving (critical section): {}", status.message())
        }
        None => format!("{:?}: {}", status.code(), status.message()),
    };
    // Transport errors keep the useful part ("Connection refused") in their source chain.
    let mut source = status.source();
    while let Some(err) = source {
        let msg = err.to_string();
        if !msg.is_empty() && !text.contains(&msg) {
            text.push_str(": ");
            text.push_str(&msg);
        }
        source = err.source();
    }
    truncate(text, DESCRIPTION_CHARS_MAX)
}

fn truncate(mut text: String, max_chars: usize) -> String {
    if let Some((cut, _)) = text.char_indices().nth(max_chars) {
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// Delay before hold number `hold` (0-based): 2 ms doubling up to 50 ms, so a short critical
/// section costs the held request little more than itself.
pub(crate) fn hold_delay(hold: u32) -> Duration {
    Duration::from_millis(2u64 << hold.min(5)).min(Duration::from_millis(50))
}

/// Delay before retry number `retry` (0-based): 10 ms doubling up to 250 ms.
/// Delay before retrying a request that met a lock: a live transaction holds its locks for a
/// few raft round trips, so wait briefly and often.
pub(crate) fn lock_backoff(waits: u32) -> Duration {
    (Duration::from_millis(2) * (1u32 << waits.min(5))).min(Duration::from_millis(50))
}

pub(crate) fn backoff(retry: u32) -> Duration {
    let factor = 1u32 << retry.min(16);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

/// The same status without anything tonic attached on the way in (response metadata, source):
/// code, message and details, as the client must see them.
pub(crate) fn pass_through(status: Status) -> Status {
    Status::with_details(
        status.code(),
        status.message().to_string(),
        status.details().to_vec().into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ordo_proto::v1::ErrorDetail;
    use prost::Message;

    fn with_detail(code: Code, kind: error_detail::Kind) -> Status {
        let detail = ErrorDetail { kind: Some(kind) };
        Status::with_details(code, "msg", detail.encode_to_vec().into())
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
    fn descriptions_say_what_happened() {
        let hint = with_detail(
            Code::Unavailable,
            error_detail::Kind::NotLeader(error_detail::NotLeader {
                leader_id: 3,
                leader_addr: "127.0.0.1:7013".into(),
            }),
        );
        assert_eq!(
            describe(&hint),
            "not leader (leader is node 3 at 127.0.0.1:7013): msg"
        );
        assert_eq!(describe(&Status::unavailable("busy")), "Unavailable: busy");
        let long = describe(&Status::internal("x".repeat(10_000)));
        assert!(long.chars().count() <= DESCRIPTION_CHARS_MAX + 1);
    }

    #[test]
    fn backoff_doubles_from_10ms_to_250ms() {
        assert_eq!(backoff(0), Duration::from_millis(10));
        assert_eq!(backoff(1), Duration::from_millis(20));
        assert_eq!(backoff(4), Duration::from_millis(160));
        assert_eq!(backoff(5), BACKOFF_MAX);
        assert_eq!(backoff(1000), BACKOFF_MAX);
        // Even if every retry backs off fully, the attempts fit well inside the default deadline.
        let worst: Duration = (0..MAX_ATTEMPTS - 1).map(backoff).sum();
        assert!(worst < crate::deadline::DEFAULT_TIMEOUT / 4, "{worst:?}");
    }

    #[test]
    fn pass_through_keeps_code_message_and_details() {
        let s = Status::with_details(Code::DataLoss, "corrupt", vec![1u8, 2, 3].into());
        let p = pass_through(s);
        assert_eq!(p.code(), Code::DataLoss);
        assert_eq!(p.message(), "corrupt");
        assert_eq!(p.details(), &[1, 2, 3]);
    }
}
