//! Errors shaped by who handles them, and their one mapping to gRPC statuses.

use ordo_proto::v1::{error_detail, ErrorDetail};
use prost::Message;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request breaks a limit or is malformed; nothing was changed.
    #[error("{0}")]
    InvalidArgument(String),
    /// This replica is not the leader; the client should go to `leader_addr` (when known).
    #[error("not the leader of group {group}; leader is {}", leader_desc(*.leader_id, .leader_addr))]
    NotLeader {
        group: u64,
        leader_id: u64,
        leader_addr: String,
    },
    /// This group does not own the slot (at the map version it knows): the router refreshes its
    /// map and retries at the owner. Nothing was changed.
    #[error("slot {slot} is not owned by this group (its ownership is at map version {map_version}); refresh the shard map")]
    WrongShard { slot: u32, map_version: u64 },
    /// The slot is in a migration's critical section (fenced on this donor): nothing was
    /// changed; the router holds the request briefly and retries. `UNAVAILABLE` + `SlotMoving`.
    #[error("slot {slot} is moving to another group (migration {migration_id}, critical section); retry in a moment")]
    SlotMoving { slot: u32, migration_id: u64 },
    /// The request is valid but the state does not allow it; the message says what to change.
    #[error("{0}")]
    FailedPrecondition(String),
    /// What the request names does not exist (a consumer group, a parked order); nothing was
    /// changed. `NOT_FOUND`.
    #[error("{0}")]
    NotFound(String),
    /// What the request would create exists with another definition; nothing was changed.
    /// `ALREADY_EXISTS`.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but its result would break a bound (the message names it and its
    /// value); nothing was applied. `RESOURCE_EXHAUSTED`.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Temporarily cannot serve (no leader, overloaded, leadership changed mid-request). The
    /// message says whether the request may have taken effect.
    #[error("{0}")]
    Unavailable(String),
    /// Temporarily cannot serve, and the request was certainly not applied: refused before it
    /// was proposed (overloaded, raft refused it, shutting down) or its entry was replaced in the
    /// log by another leader's. `UNAVAILABLE` with a `NotApplied` detail: retrying is safe.
    #[error("{0}")]
    NotApplied(String),
    /// An item the request touches is locked by an unfinished cross-group transaction; nothing
    /// was applied. `ABORTED` with a `Locked` detail: the router waits or resolves the lock.
    #[error("item {item} is locked by cross-group transaction {}; retry once it finishes", hex(.txn_id))]
    Locked {
        item: String,
        txn_id: Vec<u8>,
        primary_shard_key: Vec<u8>,
        started_ms: u64,
        priority_ms: u64,
        read: bool,
        /// How long the answering replica has seen the holder hold its locks (its own clock).
        age_ms: u64,
    },
    /// A change-feed read asked for events of `slot` that retention dropped: `OUT_OF_RANGE` +
    /// `CursorExpired`, never retried.
    #[error("slot {slot}: the change feed no longer holds seq {requested_seq} (it holds seq {oldest_seq} and later, from {oldest_ts_ms} ms); start again from the oldest event, a snapshot or now")]
    CursorExpired {
        slot: u32,
        oldest_seq: u64,
        oldest_ts_ms: u64,
        requested_seq: u64,
    },
    /// A consumer group's ack named an attempt that is not the event's current one (it was
    /// redelivered), or, in a Txn, an event already done (`current_attempt` 0):
    /// `FAILED_PRECONDITION` + `StaleDelivery`, nothing applied.
    #[error("group {group:?}, slot {slot}, seq {seq}: attempt {attempt} is stale ({}); nothing was applied", stale_why(*.current_attempt))]
    StaleDelivery {
        group: String,
        slot: u32,
        seq: u64,
        attempt: u32,
        current_attempt: u32,
    },
    /// Stored data failed its checksum or could not be decoded.
    #[error("corruption: {0}")]
    Corruption(String),
    /// The storage engine failed.
    #[error("storage: {0}")]
    Storage(String),
}

fn stale_why(current_attempt: u32) -> String {
    match current_attempt {
        0 => "the event is done already".into(),
        n => format!("the event is at attempt {n}: it was delivered again"),
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn leader_desc(id: u64, addr: &str) -> String {
    match (id, addr) {
        (0, _) => "unknown (no leader elected yet)".to_string(),
        (id, "") => format!("node {id} (address unknown)"),
        (id, addr) => format!("node {id} at {addr}"),
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument(_) => Status::invalid_argument(msg),
            Error::NotLeader {
                leader_id,
                leader_addr,
                ..
            } => {
                let detail = ErrorDetail {
                    kind: Some(error_detail::Kind::NotLeader(error_detail::NotLeader {
                        leader_id,
                        leader_addr,
                    })),
                };
                Status::with_details(Code::Unavailable, msg, detail.encode_to_vec().into())
            }
            Error::WrongShard { map_version, .. } => {
                let detail = ErrorDetail {
                    kind: Some(error_detail::Kind::WrongShard(error_detail::WrongShard {
                        map_version,
                    })),
                };
                Status::with_details(Code::FailedPrecondition, msg, detail.encode_to_vec().into())
            }
            Error::NotApplied(_) => {
                let detail = ErrorDetail {
                    kind: Some(error_detail::Kind::NotApplied(error_detail::NotApplied {})),
                };
                Status::with_details(Code::Unavailable, msg, detail.encode_to_vec().into())
            }
            Error::Locked {
                txn_id,
                primary_shard_key,
                started_ms,
                priority_ms,
                read,
                age_ms,
                ..
            } => {
                let detail = ErrorDetail {
                    kind: Some(error_detail::Kind::Locked(error_detail::Locked {
                        txn_id: txn_id.into(),
                        primary_shard_key: primary_shard_key.into(),
                        started_ms,
                        priority_ms,
                        read,
                        age_ms,
                    })),
                };
                Status::with_details(Code::Aborted, msg, detail.encode_to_vec().into())
            }
            Error::SlotMoving { slot, migration_id } => {
                let detail = ErrorDetail {
                    kind: Some(error_detail::Kind::SlotMoving(error_detail::SlotMoving {
                        slot,
                        migration_id,
                    })),
                };
                Status::with_details(Code::Unavailable, msg, detail.encode_to_vec().into())
            }
            Error::CursorExpired {
                slot,
                oldest_seq,
                oldest_ts_ms,
                requested_seq,
            } => ordo_proto::status::with_detail(
                Code::OutOfRange,
                msg,
                error_detail::Kind::CursorExpired(error_detail::CursorExpired {
                    slot,
                    oldest_seq,
                    oldest_ts_ms,
                    requested_seq,
                }),
            ),
            Error::StaleDelivery {
                group,
                slot,
                seq,
                attempt,
                current_attempt,
            } => ordo_proto::status::with_detail(
                Code::FailedPrecondition,
                msg,
                error_detail::Kind::StaleDelivery(error_detail::StaleDelivery {
                    group,
                    slot,
                    seq,
                    attempt,
                    current_attempt,
                }),
            ),
            Error::FailedPrecondition(_) => Status::failed_precondition(msg),
            Error::NotFound(_) => Status::not_found(msg),
            Error::AlreadyExists(_) => Status::already_exists(msg),
            Error::Unavailable(_) => Status::unavailable(msg),
            Error::ResourceExhausted(_) => Status::resource_exhausted(msg),
            Error::Corruption(_) => Status::data_loss(msg),
            Error::Storage(_) => Status::internal(msg),
        }
    }
}
