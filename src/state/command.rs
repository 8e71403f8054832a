//! The raft log's payload: `Command` and its codec (a tag byte, then a prost message), what
//! applying one produces (`Outcome`), and the shard keys a transaction touches.

use ordo_proto::v1::{
    DecideRequest, DecideResponse, FinishRequest, FinishResponse, ForgetRequest, GroupCommand,
    MigrateClearRequest, MigrateIngestRequest, MigrateOutRequest, PrepareRequest, PrepareResponse,
    SetOwnershipRequest, SetOwnershipResponse, TxnRequest, TxnResponse,
};
use prost::Message as _;

use crate::error::Result;

/// Entry payload tags: the rest is a prost message of the command's kind.
const CMD_TXN: u8 = 1;
const CMD_SET_OWNERSHIP: u8 = 2;
/// Several transactions in one entry, each length-delimited, applied in order.
const CMD_TXN_BATCH: u8 = 3;
const CMD_MIGRATE_OUT: u8 = 4;
const CMD_MIGRATE_INGEST: u8 = 5;
const CMD_MIGRATE_CLEAR: u8 = 6;
/// A change-feed checkpoint: `(slot u32 BE, below u64 BE)` trims, none when idle.
const CMD_CHECKPOINT: u8 = 7;
/// A consumer group's replicated change (`groups/`).
const CMD_GROUP: u8 = 8;
/// Two-phase commit (`participant.rs`).
const CMD_PREPARE: u8 = 20;
const CMD_DECIDE: u8 = 21;
const CMD_FINISH: u8 = 22;
const CMD_FORGET: u8 = 23;

/// A command in the raft log.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    Txn(TxnRequest),
    SetOwnership(SetOwnershipRequest),
    /// Transactions that arrived together at the leader, in one entry: the per-entry costs of
    /// raft (encoding, log write, checksums, replication messages) are paid once for all of them.
    /// Each is still evaluated on its own, in order, with its own outcome.
    TxnBatch(Vec<TxnRequest>),
    /// Online resharding, donor side: begin (start the change log), fence, end a migration.
    MigrateOut(MigrateOutRequest),
    /// Online resharding, recipient side: write copied records as they are.
    MigrateIngest(MigrateIngestRequest),
    /// Delete a bounded number of items of slots neither owned nor moving out.
    MigrateClear(MigrateClearRequest),
    /// The change feed's checkpoint: proposed by an idle leader so resolved times advance with
    /// no writes (`FEED_CHECKPOINT_INTERVAL_MS`), and by the leader's retention planner with its
    /// trims, so every replica drops exactly the same events.
    Checkpoint(Checkpoint),
    /// Consumer groups: create, delete, seek, a flush of acks, redeliveries' attempts, park and
    /// unpark (`groups/`).
    Group(GroupCommand),
    /// Two-phase commit of a cross-group transaction, one participant's steps (`participant.rs`).
    Prepare(PrepareRequest),
    Decide(DecideRequest),
    Finish(FinishRequest),
    Forget(ForgetRequest),
}

impl Command {
    /// Bytes of the encoded command (`encode().len()`), computed without encoding it.
    pub fn encoded_len(&self) -> usize {
        1 + self.tag_and_len().1
    }

    fn tag_and_len(&self) -> (u8, usize) {
        match self {
            Command::Txn(t) => (CMD_TXN, t.encoded_len()),
            Command::SetOwnership(o) => (CMD_SET_OWNERSHIP, o.encoded_len()),
            Command::TxnBatch(ts) => (
                CMD_TXN_BATCH,
                ts.iter()
                    .map(|t| prost::length_delimiter_len(t.encoded_len()) + t.encoded_len())
                    .sum(),
            ),
            Command::MigrateOut(m) => (CMD_MIGRATE_OUT, m.encoded_len()),
            Command::MigrateIngest(m) => (CMD_MIGRATE_INGEST, m.encoded_len()),
            Command::MigrateClear(m) => (CMD_MIGRATE_CLEAR, m.encoded_len()),
            Command::Checkpoint(c) => (CMD_CHECKPOINT, c.trims.len() * TRIM_BYTES),
            Command::Group(g) => (CMD_GROUP, g.encoded_len()),
            Command::Prepare(p) => (CMD_PREPARE, p.encoded_len()),
            Command::Decide(d) => (CMD_DECIDE, d.encoded_len()),
            Command::Finish(f) => (CMD_FINISH, f.encoded_len()),
            Command::Forget(f) => (CMD_FORGET, f.encoded_len()),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let (tag, len) = self.tag_and_len();
        let mut data = Vec::with_capacity(1 + len);
        data.push(tag);
        match self {
            Command::Txn(t) => t.encode(&mut data),
            Command::SetOwnership(o) => o.encode(&mut data),
            Command::TxnBatch(ts) => ts
                .iter()
                .try_for_each(|t| t.encode_length_delimited(&mut data)),
            Command::MigrateOut(m) => m.encode(&mut data),
            Command::MigrateIngest(m) => m.encode(&mut data),
            Command::MigrateClear(m) => m.encode(&mut data),
            Command::Checkpoint(c) => {
                for (slot, below) in &c.trims {
                    data.extend_from_slice(&slot.to_be_bytes());
                    data.extend_from_slice(&below.to_be_bytes());
                }
                Ok(())
            }
            Command::Group(g) => g.encode(&mut data),
            Command::Prepare(p) => p.encode(&mut data),
            Command::Decide(d) => d.encode(&mut data),
            Command::Finish(f) => f.encode(&mut data),
            Command::Forget(f) => f.encode(&mut data),
        }
        .expect("vec has room");
        data
    }

    pub fn decode(data: &[u8]) -> std::result::Result<Command, String> {
        match data.split_first() {
            Some((&CMD_TXN, rest)) => TxnRequest::decode(rest)
                .map(Command::Txn)
                .map_err(|e| e.to_string()),
            Some((&CMD_SET_OWNERSHIP, rest)) => SetOwnershipRequest::decode(rest)
                .map(Command::SetOwnership)
                .map_err(|e| e.to_string()),
            Some((&CMD_TXN_BATCH, mut rest)) => {
                let mut txns = Vec::new();
                while !rest.is_empty() {
                    txns.push(
                        TxnRequest::decode_length_delimited(&mut rest)
                            .map_err(|e| format!("txn {} of a batch: {e}", txns.len()))?,
                    );
                }
                Ok(Command::TxnBatch(txns))
            }
            Some((&CMD_MIGRATE_OUT, rest)) => MigrateOutRequest::decode(rest)
                .map(Command::MigrateOut)
                .map_err(|e| e.to_string()),
            Some((&CMD_MIGRATE_INGEST, rest)) => MigrateIngestRequest::decode(rest)
                .map(Command::MigrateIngest)
                .map_err(|e| e.to_string()),
            Some((&CMD_MIGRATE_CLEAR, rest)) => MigrateClearRequest::decode(rest)
                .map(Command::MigrateClear)
                .map_err(|e| e.to_string()),
            Some((&CMD_CHECKPOINT, rest)) if rest.len() % TRIM_BYTES == 0 => {
                Ok(Command::Checkpoint(Checkpoint {
                    trims: rest
                        .chunks(TRIM_BYTES)
                        .map(|c| {
                            (
                                u32::from_be_bytes(c[..4].try_into().unwrap()),
                                u64::from_be_bytes(c[4..].try_into().unwrap()),
                            )
                        })
                        .collect(),
                }))
            }
            Some((&CMD_CHECKPOINT, rest)) => Err(format!("checkpoint of {} bytes", rest.len())),
            Some((&CMD_GROUP, rest)) => GroupCommand::decode(rest)
                .map(Command::Group)
                .map_err(|e| e.to_string()),
            Some((&CMD_PREPARE, rest)) => PrepareRequest::decode(rest)
                .map(Command::Prepare)
                .map_err(|e| e.to_string()),
            Some((&CMD_DECIDE, rest)) => DecideRequest::decode(rest)
                .map(Command::Decide)
                .map_err(|e| e.to_string()),
            Some((&CMD_FINISH, rest)) => FinishRequest::decode(rest)
                .map(Command::Finish)
                .map_err(|e| e.to_string()),
            Some((&CMD_FORGET, rest)) => ForgetRequest::decode(rest)
                .map(Command::Forget)
                .map_err(|e| e.to_string()),
            Some((tag, _)) => Err(format!("unknown command tag {tag}")),
            None => Err("empty command".into()),
        }
    }
}

/// Bytes of one trim of a `Checkpoint`.
const TRIM_BYTES: usize = 4 + 8;

/// A change-feed checkpoint entry: its time closes the group's resolved time up to it; each trim
/// `(slot, below)` drops the slot's events with a seq below `below` (the leader's decision from
/// its own state; at most `FEED_TRIM_EVENTS_MAX` events per entry go, the rest next time).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checkpoint {
    pub trims: Vec<(u32, u64)>,
}

/// What applying a command produced.
#[derive(Debug)]
pub enum Outcome {
    Txn(TxnResponse),
    Ownership(SetOwnershipResponse),
    /// One result per transaction of a `TxnBatch`, in order.
    TxnBatch(Vec<Result<TxnResponse>>),
    /// A migration command: the index it applied at (for a fence, the fence's index), and for a
    /// clear how many items it deleted and whether the slots are empty now.
    Migration {
        index: u64,
        deleted: u64,
        done: bool,
    },
    Prepared(PrepareResponse),
    Decided(DecideResponse),
    Finished(FinishResponse),
    Forgotten,
    Checkpointed,
    Group(super::GroupApplied),
}

/// One committed entry to apply: its index, its command (`None` for raft's own entries) and the
/// proposing leader's stamp (`None` when it has none: its keyed writes are not deduplicated).
pub struct Apply {
    pub index: u64,
    pub cmd: Option<Command>,
    pub stamp: Option<super::Stamp>,
}

/// Every shard key a transaction touches.
pub fn shard_keys(t: &TxnRequest) -> impl Iterator<Item = &[u8]> {
    t.shard_keys().map(|k| k.as_ref())
}
