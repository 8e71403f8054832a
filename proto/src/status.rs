//! Error statuses as Ordo nodes send them: a gRPC code plus an [`ErrorDetail`] in the details,
//! and the one rule every retry loop obeys, [`certainly_not_applied`].
//!
//! Nodes build their statuses with [`with_detail`]; clients, routers and config servers read them
//! with [`error_detail_of`] and log them with [`describe`]. Nobody else decodes details by hand.

use std::error::Error as _;

use prost::Message as _;
use tonic::{Code, Status};

use crate::v1::error_detail::Kind;
use crate::v1::ErrorDetail;

/// Longest error description [`describe`] returns (node messages are not ours to bound).
pub const DESCRIPTION_CHARS_MAX: usize = 400;

/// A status with `code`, `message` and the typed detail `kind` in its details.
pub fn with_detail(code: Code, message: impl Into<String>, kind: Kind) -> Status {
    let detail = ErrorDetail { kind: Some(kind) };
    Status::with_details(code, message, detail.encode_to_vec().into())
}

/// Whether a request that failed with `status` certainly was not applied by any node: the
/// node refused it before proposing or applying (`NotLeader`, `WrongShard`, `NotApplied`,
/// `SlotMoving` details), or the
/// client could not even establish a connection, so the request was never sent. Anything else
/// (a plain `UNAVAILABLE`, a reset or timeout after the request was sent) leaves a write's
/// outcome unknown. Routers and clients retry writes only when this holds.
pub fn certainly_not_applied(status: &Status) -> bool {
    let detail = match status.code() {
        Code::Unavailable | Code::FailedPrecondition | Code::Aborted => error_detail_of(status),
        _ => None,
    };
    match detail {
        Some(Kind::NotLeader(_)) | Some(Kind::NotApplied(_)) | Some(Kind::SlotMoving(_)) => {
            status.code() == Code::Unavailable
        }
        Some(Kind::WrongShard(_)) => status.code() == Code::FailedPrecondition,
        Some(Kind::Locked(_)) => status.code() == Code::Aborted,
        Some(Kind::CursorExpired(_)) | Some(Kind::StaleDelivery(_)) => false,
        None => connect_failed(status),
    }
}

/// The typed detail a node attached to an error status, if any (garbage details are ignored).
pub fn error_detail_of(status: &Status) -> Option<Kind> {
    if status.details().is_empty() {
        return None;
    }
    ErrorDetail::decode(status.details()).ok()?.kind
}

/// Whether tonic made `status` locally because no connection could be established (refused,
/// connect timeout, bad address): the request never left this process. tonic marks those with a
/// [`tonic::ConnectError`] in the source chain; a connection that broke after the request was
/// sent carries a hyper/h2 error instead.
pub fn connect_failed(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(err) = source {
        if err.downcast_ref::<tonic::ConnectError>().is_some() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Whether tonic produced `status` on this side from a transport failure, rather than decoding it
/// from the remote's answer (a node's own statuses never carry a source).
pub fn is_transport_error(status: &Status) -> bool {
    status.source().is_some()
}

/// The same status without anything tonic attached on the way in (response metadata, source):
/// code, message and details, as a caller further up must see them.
pub fn pass_through(status: Status) -> Status {
    Status::with_details(
        status.code(),
        status.message().to_string(),
        status.details().to_vec().into(),
    )
}

/// A one-line account of `status` for logs and for the message of an exhausted request: the
/// detail in words, the message, and the transport error's source chain, at most
/// [`DESCRIPTION_CHARS_MAX`] characters.
pub fn describe(status: &Status) -> String {
    let mut text = match error_detail_of(status) {
        Some(Kind::NotLeader(nl)) => {
            let leader = match (nl.leader_id, nl.leader_addr.as_str()) {
                (0, "") => "leader unknown".to_string(),
                (id, "") => format!("leader is node {id}, address unknown"),
                (id, addr) => format!("leader is node {id} at {addr}"),
            };
            format!("not leader ({leader}): {}", status.message())
        }
        Some(Kind::WrongShard(ws)) => format!(
            "wrong shard (the node is at map v{}): {}",
            ws.map_version,
            status.message()
        ),
        Some(Kind::NotApplied(_)) => format!("not applied: {}", status.message()),
        Some(Kind::Locked(_)) => format!("locked: {}", status.message()),
        Some(Kind::SlotMoving(_)) => {
            format!("slot moving (critical section): {}", status.message())
        }
        Some(Kind::CursorExpired(ce)) => format!(
            "cursor expired (slot {} holds seq {} and later): {}",
            ce.slot,
            ce.oldest_seq,
            status.message()
        ),
        Some(Kind::StaleDelivery(sd)) => format!(
            "stale delivery (slot {} seq {} is at attempt {}): {}",
            sd.slot,
            sd.seq,
            sd.current_attempt,
            status.message()
        ),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::error_detail::{NotApplied, NotLeader, WrongShard};

    #[test]
    fn only_refusals_and_connect_failures_are_certainly_not_applied() {
        let nl = Kind::NotLeader(NotLeader::default());
        assert!(certainly_not_applied(&with_detail(
            Code::Unavailable,
            "x",
            nl.clone()
        )));
        assert!(certainly_not_applied(&with_detail(
            Code::Unavailable,
            "x",
            Kind::NotApplied(NotApplied {})
        )));
        let ws = Kind::WrongShard(WrongShard { map_version: 3 });
        assert!(certainly_not_applied(&with_detail(
            Code::FailedPrecondition,
            "x",
            ws.clone()
        )));
        // A detail under the wrong code is not trusted.
        assert!(!certainly_not_applied(&with_detail(
            Code::Internal,
            "x",
            nl
        )));
        assert!(!certainly_not_applied(&with_detail(
            Code::Unavailable,
            "x",
            ws
        )));
        assert!(!certainly_not_applied(&Status::unavailable("no leader")));
        let junk = Status::with_details(Code::Unavailable, "x", b"\xff\xff"[..].to_vec().into());
        assert!(!certainly_not_applied(&junk));

        // A connect failure as tonic reports it, and a reset after sending.
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let connect = Status::from_error(Box::new(tonic::ConnectError(Box::new(refused))));
        assert_eq!(connect.code(), Code::Unavailable);
        assert!(connect_failed(&connect) && certainly_not_applied(&connect));
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let reset = Status::from_error(Box::new(reset));
        assert!(!connect_failed(&reset) && !certainly_not_applied(&reset));
        assert!(is_transport_error(&reset) && !is_transport_error(&junk));
    }

    #[test]
    fn details_round_trip_and_garbage_is_ignored() {
        let s = with_detail(
            Code::Unavailable,
            "not leader",
            Kind::NotLeader(NotLeader {
                leader_id: 2,
                leader_addr: "a:1".into(),
            }),
        );
        assert_eq!(s.message(), "not leader");
        assert!(
            matches!(error_detail_of(&s), Some(Kind::NotLeader(nl)) if nl.leader_addr == "a:1")
        );
        assert_eq!(error_detail_of(&Status::unavailable("plain")), None);
        let junk = Status::with_details(Code::Unavailable, "x", b"\xff\xff"[..].to_vec().into());
        assert_eq!(error_detail_of(&junk), None);
    }

    #[test]
    fn descriptions_say_what_happened() {
        let hint = with_detail(
            Code::Unavailable,
            "msg",
            Kind::NotLeader(NotLeader {
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
    fn pass_through_keeps_code_message_and_details() {
        let s = Status::with_details(Code::DataLoss, "corrupt", vec![1u8, 2, 3].into());
        let p = pass_through(s);
        assert_eq!(p.code(), Code::DataLoss);
        assert_eq!(p.message(), "corrupt");
        assert_eq!(p.details(), &[1, 2, 3]);
    }
}
