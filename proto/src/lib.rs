//! Ordo's wire contract: the generated `ordo.v1` types and services, plus the one function every
//! piece must agree on, the slot hash.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("ordo.v1");
}

/// A cross-group transaction whose locks are older than this (by its coordinator's clock) may be
/// aborted by anyone who meets them: its coordinator is presumed gone. Nodes and routers agree
/// on it through this constant.
pub const TXN_LOCK_TIMEOUT_MS: u64 = 2_000;

/// The slot of a shard key: `crc32(shard_key) mod slot_count`. Routers and nodes both call this,
/// so a key can never be routed by one rule and owned by another.
pub fn slot_of(shard_key: &[u8], slot_count: u32) -> u32 {
    assert!(slot_count > 0, "slot_count must be positive");
    crc32fast::hash(shard_key) % slot_count
}

/// Whether a request that failed with `status` certainly was not applied by any node: the
/// node refused it before proposing or applying (`NotLeader`, `WrongShard`, `NotApplied`,
/// `SlotMoving` details), or the
/// client could not even establish a connection, so the request was never sent. Anything else
/// (a plain `UNAVAILABLE`, a reset or timeout after the request was sent) leaves a write's
/// outcome unknown. Routers and clients retry writes only when this holds.
pub fn certainly_not_applied(status: &tonic::Status) -> bool {
    use v1::error_detail::Kind;
    let detail = match status.code() {
        tonic::Code::Unavailable | tonic::Code::FailedPrecondition | tonic::Code::Aborted => {
            error_detail_of(status)
        }
        _ => None,
    };
    match detail {
        Some(Kind::NotLeader(_)) | Some(Kind::NotApplied(_)) | Some(Kind::SlotMoving(_)) => {
            status.code() == tonic::Code::Unavailable
        }
        Some(Kind::WrongShard(_)) => status.code() == tonic::Code::FailedPrecondition,
        Some(Kind::Locked(_)) => status.code() == tonic::Code::Aborted,
        None => connect_failed(status),
    }
}

/// The typed detail a node attached to an error status, if any (garbage details are ignored).
pub fn error_detail_of(status: &tonic::Status) -> Option<v1::error_detail::Kind> {
    use prost::Message as _;
    if status.details().is_empty() {
        return None;
    }
    v1::ErrorDetail::decode(status.details()).ok()?.kind
}

/// Whether tonic made `status` locally because no connection could be established (refused,
/// connect timeout, bad address): the request never left this process. tonic marks those with a
/// [`tonic::ConnectError`] in the source chain; a connection that broke after the request was
/// sent carries a hyper/h2 error instead.
pub fn connect_failed(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if err.downcast_ref::<tonic::ConnectError>().is_some() {
            return true;
        }
        source = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn with_detail(code: tonic::Code, kind: v1::error_detail::Kind) -> tonic::Status {
        let d = v1::ErrorDetail { kind: Some(kind) };
        tonic::Status::with_details(code, "x", d.encode_to_vec().into())
    }

    #[test]
    fn only_refusals_and_connect_failures_are_certainly_not_applied() {
        use tonic::Code;
        use v1::error_detail::{Kind, NotApplied, NotLeader, WrongShard};
        let nl = Kind::NotLeader(NotLeader::default());
        assert!(certainly_not_applied(&with_detail(
            Code::Unavailable,
            nl.clone()
        )));
        assert!(certainly_not_applied(&with_detail(
            Code::Unavailable,
            Kind::NotApplied(NotApplied {})
        )));
        let ws = Kind::WrongShard(WrongShard { map_version: 3 });
        assert!(certainly_not_applied(&with_detail(
            Code::FailedPrecondition,
            ws.clone()
        )));
        // A detail under the wrong code is not trusted.
        assert!(!certainly_not_applied(&with_detail(Code::Internal, nl)));
        assert!(!certainly_not_applied(&with_detail(Code::Unavailable, ws)));
        assert!(!certainly_not_applied(&tonic::Status::unavailable(
            "no leader"
        )));
        let junk =
            tonic::Status::with_details(Code::Unavailable, "x", b"\xff\xff"[..].to_vec().into());
        assert!(!certainly_not_applied(&junk));

        // A connect failure as tonic reports it, and a reset after sending.
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let connect = tonic::Status::from_error(Box::new(tonic::ConnectError(Box::new(refused))));
        assert_eq!(connect.code(), Code::Unavailable);
        assert!(connect_failed(&connect) && certainly_not_applied(&connect));
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let reset = tonic::Status::from_error(Box::new(reset));
        assert!(!connect_failed(&reset) && !certainly_not_applied(&reset));
    }

    #[test]
    fn slot_is_crc32_mod_count() {
        // The one-shot hash and the streaming hasher must agree: routers may use either.
        let mut h = crc32fast::Hasher::new();
        h.update(b"order-");
        h.update(b"1");
        assert_eq!(slot_of(b"order-1", 4096), h.finalize() % 4096);
        assert!(slot_of(b"anything", 7) < 7);
    }
}
