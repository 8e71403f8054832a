//! Every bound a node enforces, in one place (bounds that routers and clients share with nodes
//! live in `ordo-proto`). Network input is checked against these before it can change anything;
//! internal queues use them so that memory stays bounded under overload.

/// Longest shard key (the order ID). Shard keys are also hashed and copied into every data key.
pub const SHARD_KEY_BYTES_MAX: usize = 256;
/// Longest item key inside one shard key.
pub const KEY_BYTES_MAX: usize = 4 * 1024;
/// Largest value of one item.
pub const VALUE_BYTES_MAX: usize = 1024 * 1024;
/// Most ops (compares + success + failure) in one `Txn`.
pub const TXN_OPS_MAX: usize = 128;
/// Largest total payload (keys + values) of one `Txn`: one raft entry, so it is bounded well below
/// the peer message limit.
pub const TXN_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Largest gRPC message a node decodes from or encodes to a client: the one bound routers use
/// too (`ordo-proto`), so a client gets the same refusal from either and a node's answer always
/// fits what a router accepts.
pub const CLIENT_MESSAGE_BYTES_MAX: usize = ordo_proto::addr::KV_MESSAGE_BYTES_MAX;
/// Largest gRPC message a node decodes from a peer (a raft batch or a snapshot chunk).
pub const PEER_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Streams per connection, the connection cap and the request-bytes budget of every server
/// (`ordo_proto::serve`, shared with routers; `--connections-max`, `--request-bytes-budget`).
pub use ordo_proto::serve::{
    CONNECTIONS_MAX_DEFAULT, REQUEST_BYTES_BUDGET_DEFAULT, STREAMS_PER_CONNECTION_MAX,
};
/// Most items one `Scan` page returns.
pub const SCAN_LIMIT_MAX: u32 = 1000;
/// Most key and value bytes one `Scan` page returns (a page always holds at least one item, so
/// a scan progresses): 1000 items of 1 MiB would be 1 GiB, far over any message bound.
pub const SCAN_PAGE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Most value bytes the Gets of one `Txn` (or 2PC part) return; shared with routers, which
/// bound a cross-group `Txn`'s parts together by it.
pub use ordo_proto::TXN_RESULT_BYTES_MAX;
/// Most value bytes all the transactions of one raft entry (a `TxnBatch` of up to 256) return:
/// a hostile entry of 256 over-budget reads cannot make a replica hold more than this (plus the
/// one transaction being refused). An apply run is also cut into sled transactions once its
/// results reach it, so one `Ready` of thousands of such entries holds at most twice this.
pub const ENTRY_RESULT_BYTES_MAX: usize = 4 * TXN_RESULT_BYTES_MAX;
/// Bytes an answer adds per op result to the values it carries (tags, lengths, version, found),
/// rounded up: the op results of a `TxnResponse` are this and the values.
pub const OP_RESULT_FRAMING_BYTES_MAX: usize = 64;

/// Bounded mailbox of a group's raft driver (proposals, reads, peer messages).
pub const DRIVER_INBOX_MAX: usize = 8192;
/// Most bytes of proposals waiting in a driver's inbox (`InboxBytes`): 8192 proposals of up to
/// 8 MiB would be 64 GiB. While requests wait for their answer the request-bytes budget bounds
/// them too; this bounds what requests that gave up waiting (a stalled driver) leave queued.
/// Past it a write is refused as overloaded, not started.
pub const DRIVER_INBOX_BYTES_MAX: usize = 256 * 1024 * 1024;
/// A driver's queue of raft messages from peers, apart from the inbox (`RaftQueue`, audit M10):
/// at most this many messages and bytes wait; beyond either a message is dropped (raft
/// retransmits). Bytes bound it because one append may carry 1 MiB of entries or a large entry.
pub const RAFT_QUEUE_MAX: usize = 4096;
pub const RAFT_QUEUE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Most inbox messages the driver takes before it handles a Ready: proposals that arrive together
/// share one log append and one fsync.
pub const DRIVER_BATCH_MAX: usize = 512;
/// Bounded queue of raft messages waiting to go to one peer; beyond it messages are dropped
/// (raft retransmits) rather than buffered without limit.
pub const PEER_QUEUE_MAX: usize = 4096;
/// Most raft messages in one `RaftBatch` frame.
pub const PEER_BATCH_MESSAGES_MAX: usize = 256;
/// Snapshot chunk size on the wire.
pub const SNAPSHOT_CHUNK_BYTES: usize = 256 * 1024;
/// Largest snapshot a node accepts from a peer: 2^20 chunks, 256 GiB. Groups are split by slot
/// migration long before they hold that much, so no real snapshot comes near it, but a faulty
/// or hostile sender cannot fill the disk with a stream that never ends.
pub const SNAPSHOT_BYTES_MAX: u64 = (1 << 20) * SNAPSHOT_CHUNK_BYTES as u64;
/// Longest a receiver waits for the next chunk of a snapshot stream (a stalled sender holds the
/// replica's one transfer slot otherwise); a healthy sender sends 256 KiB far sooner.
pub const SNAPSHOT_CHUNK_WAIT_MS: u64 = 30_000;
/// A sender gives up on one snapshot transfer after this fixed allowance (connect, the receiver's
/// fsync and hand-off) plus its size at the slowest rate we still call progress; raft then sends
/// a new one. Without it a receiver that stops reading would hold the transfer forever.
pub const SNAPSHOT_TRANSFER_BASE_MS: u64 = 60_000;
pub const SNAPSHOT_TRANSFER_MIN_BYTES_PER_SEC: u64 = 1024 * 1024;
/// How long the transfer of a `bytes`-long snapshot file may take in all.
pub const fn snapshot_transfer_timeout(bytes: u64) -> std::time::Duration {
    std::time::Duration::from_millis(
        SNAPSHOT_TRANSFER_BASE_MS + bytes / (SNAPSHOT_TRANSFER_MIN_BYTES_PER_SEC / 1000),
    )
}
/// A failed snapshot build (full disk, I/O error) is retried after this backoff, doubling up to
/// the max, while the replica keeps serving: sooner would spin on a disk that is still full.
pub const SNAPSHOT_BUILD_RETRY_MIN_MS: u64 = 250;
pub const SNAPSHOT_BUILD_RETRY_MAX_MS: u64 = 30_000;
/// The raft watermark (`replica/watermark.rs`) records log and commit progress at most this often
/// (a new term or vote is recorded at once): writing it after every raft sync would add a second
/// fsync to every write, and what it guards against, sled losing synced writes, is still caught
/// for everything older than this.
pub const WATERMARK_INTERVAL_MS: u64 = 100;
/// sled (the state machine) is flushed and synced in the background at least this often
/// (`durable::Flusher`); the raft log is compacted only below what the last flush covered.
pub const FLUSH_INTERVAL_MS: u64 = 1_000;
/// Bytes of applied entries the raft log keeps in memory (`storage.rs` holds the live log in
/// memory; the files are for recovery): past this, the driver compacts down to half of it, as far
/// as sled's durable applied index allows.
pub const LOG_MEMORY_BYTES_MAX: u64 = 64 << 20;
/// sled's page cache of one replica (`--cache-mb` of `ordo node` and `ordo config`): what a
/// replica's memory grows with as its data does (its other memory is bounded by the limits here,
/// the live raft log by `LOG_MEMORY_BYTES_MAX`).
pub const CACHE_BYTES_DEFAULT: u64 = 512 << 20;
/// The page cache of each replica of `ordo playground` (`--cache-mb`): it runs 12 or more in one
/// process.
pub const PLAYGROUND_CACHE_BYTES_DEFAULT: u64 = 64 << 20;
/// The smallest page cache a replica accepts: below it sled thrashes on its own index nodes.
pub const CACHE_BYTES_MIN: u64 = 8 << 20;
/// Proposals in flight on one leader; beyond it clients get `UNAVAILABLE` (overloaded) at once.
/// Only their replies wait here (their entries are in the raft log), so this bounds count, not
/// bytes.
pub const PENDING_PROPOSALS_MAX: usize = 65_536;
/// Linearizable reads waiting for their read index; beyond it clients get `UNAVAILABLE`.
pub const PENDING_READS_MAX: usize = 65_536;

/// Raft timing, in driver ticks. Elections time out after 0.5–1 s (raft-rs randomises within
/// [election, 2 × election) ticks), so a dead leader is replaced in about a second; heartbeats go
/// every 100 ms, well inside that, so a busy 2-core machine does not trigger needless elections.
pub const TICK_MS: u64 = 50;
pub const ELECTION_TICKS: usize = 10;
pub const HEARTBEAT_TICKS: usize = 2;
/// A ReadIndex that has not completed after this long is failed with `UNAVAILABLE` (a leader
/// that has not yet committed in its term silently drops read requests in raft-rs).
pub const READ_INDEX_TIMEOUT_MS: u64 = 2_000;
/// How long a leader transfer may take before it is reported as failed (a few election timeouts).
pub const LEADER_TRANSFER_TIMEOUT_MS: u64 = 3_000;
/// A replica counts as live for a membership change's quorum check if the leader heard from it
/// this recently (two election timeouts: heartbeats answer every 100 ms).
pub const REPLICA_LIVE_MS: u64 = 2 * ELECTION_TICKS as u64 * TICK_MS;
/// How long a node being added may take to catch up, by default and at most.
pub const CATCH_UP_TIMEOUT_DEFAULT_MS: u64 = 60_000;
pub const CATCH_UP_TIMEOUT_MAX_MS: u64 = 600_000;
/// A cross-group transaction whose locks are older than this may be aborted by anyone who meets
/// them (defined next to the slot hash, since routers need it too).
pub use ordo_proto::TXN_LOCK_TIMEOUT_MS;
/// How often a group's leader looks for locks held longer than the lock timeout that no request
/// met (orphans of dead coordinators on cold keys, which would block moving their slots: audit
/// M4), and resolves them. A quarter of the timeout: an orphan outlives it by at most that.
pub const ORPHAN_SCAN_EVERY_MS: u64 = TXN_LOCK_TIMEOUT_MS / 4;
/// Most orphaned transactions one round resolves (bounded work per round; the rest wait for the
/// next), and how long each resolution may take (it asks the primary's group for the decision).
pub const ORPHANS_PER_ROUND_MAX: usize = 16;
pub const ORPHAN_RESOLVE_MS: u64 = 2_000;
/// Raft-rs flow control: bytes of entries per append message, and appends in flight per follower.
pub const RAFT_MSG_BYTES_MAX: u64 = 1024 * 1024;
pub const RAFT_INFLIGHT_MSGS_MAX: usize = 256;
/// Most transactions the leader puts into one raft entry, and most bytes of them (a larger single
/// transaction goes alone): transactions that arrive together share one entry's raft costs.
pub const PROPOSAL_BATCH_TXNS_MAX: usize = 256;
pub const PROPOSAL_BATCH_BYTES_MAX: usize = 256 * 1024;
/// Most bytes of committed entries applied in one step: raft-rs hands at most this much to one
/// Ready, and entries left in the log during a snapshot build are read back in steps of it.
pub const APPLY_BATCH_BYTES_MAX: u64 = 16 * RAFT_MSG_BYTES_MAX;
/// Default number of applied entries kept in the log before it is compacted.
pub const COMPACT_LOG_ENTRIES_DEFAULT: u64 = 10_000;

/// Slots of the hash ring. `ordoctl init --slots` must match it: a group refuses ownership for
/// any other count (`SetOwnership` checks it at apply).
pub const SLOT_COUNT_DEFAULT: u32 = 4096;

const _: () = assert!(VALUE_BYTES_MAX + KEY_BYTES_MAX + SHARD_KEY_BYTES_MAX < TXN_BYTES_MAX);
const _: () = assert!(TXN_BYTES_MAX < CLIENT_MESSAGE_BYTES_MAX);
const _: () = assert!(CLIENT_MESSAGE_BYTES_MAX < DRIVER_INBOX_BYTES_MAX);
// A full page plus the one item that may start it, with room for framing.
const _: () = assert!(
    SCAN_PAGE_BYTES_MAX + VALUE_BYTES_MAX + KEY_BYTES_MAX + 64 * 1024 < CLIENT_MESSAGE_BYTES_MAX
);
// The largest answer a Txn can have, with room for framing.
const _: () = assert!(
    TXN_RESULT_BYTES_MAX + TXN_OPS_MAX * OP_RESULT_FRAMING_BYTES_MAX + 64 * 1024
        < CLIENT_MESSAGE_BYTES_MAX / 2
);
const _: () = assert!(TXN_RESULT_BYTES_MAX <= ENTRY_RESULT_BYTES_MAX);
const _: () = assert!(CLIENT_MESSAGE_BYTES_MAX < PEER_MESSAGE_BYTES_MAX);
// The largest append raft sends (its byte bound plus one entry of the largest transaction) fits.
const _: () =
    assert!(RAFT_MSG_BYTES_MAX as usize + CLIENT_MESSAGE_BYTES_MAX < RAFT_QUEUE_BYTES_MAX);
const _: () = assert!(SNAPSHOT_CHUNK_BYTES < PEER_MESSAGE_BYTES_MAX);
const _: () = assert!(SNAPSHOT_BUILD_RETRY_MIN_MS < SNAPSHOT_BUILD_RETRY_MAX_MS);
const _: () = assert!(PROPOSAL_BATCH_BYTES_MAX as u64 <= RAFT_MSG_BYTES_MAX);
const _: () = assert!(PROPOSAL_BATCH_TXNS_MAX <= PENDING_PROPOSALS_MAX);

/// Most bytes a migration's change log keeps on its donor (the writes to its slots the recipient
/// has not replayed and trimmed yet; every donor replica holds them): past it the move is
/// aborted rather than filling the donor's disks during a long copy under write load (audit
/// H6). A BEGIN may ask for less (`MigrateOutRequest.log_bytes_max`).
pub const MIGRATION_LOG_BYTES_MAX: u64 = 1 << 30;
/// Most change-log entries one TRIM or END entry deletes: a long log goes in several bounded
/// raft entries, never one batch that stalls the driver.
pub const MIGRATION_LOG_DELETE_MAX: usize = 1024;

/// Most bytes of records one migration page carries (a pull answer, an ingest entry): one raft
/// entry stays well under the raft message bound.
pub const MIGRATION_PAGE_BYTES_MAX: usize = 256 * 1024;
const _: () =
    assert!((MIGRATION_PAGE_BYTES_MAX + VALUE_BYTES_MAX) * 2 < RAFT_MSG_BYTES_MAX as usize * 4);

/// Longest idempotency key (`RequestHeader.idempotency_key`): room for a UUID or a client id and
/// a sequence number in text, while every dedup entry's key stays small.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 64;
/// How long a keyed write's outcome is kept by default (`--dedup-window-secs`): far longer than
/// any retry (a router's deadline is at most a minute), short enough that the entries of a busy
/// group stay a small fraction of its data.
pub const DEDUP_WINDOW_SECS_DEFAULT: u64 = 600;
/// The longest window a node accepts: a day of entries is already a lot of state to move with
/// every slot.
pub const DEDUP_WINDOW_SECS_MAX: u64 = 24 * 3600;
/// Most dedup entries one slot keeps; a new one beyond it evicts the entry closest to expiry (its
/// key is then forgotten early). All writes of a hot shard key land in one slot, so the bound
/// holds even for it, and 16384 entries of about 100 bytes are 1.6 MB a slot.
pub const DEDUP_ENTRIES_PER_SLOT_MAX: u64 = 16_384;
/// Most expired dedup entries one keyed write removes from its slot (with the apply, in the same
/// sled transaction): expiry keeps pace with the writes that create entries without ever
/// deleting a big batch on the driver.
pub const DEDUP_EXPIRE_STEP: usize = 4;
/// Most dedup entries a replica indexes in memory (about 30 bytes each: 120 MB at the bound;
/// 4,000 writes/s kept 600 s are 2.4M). Past it, whole slots' indexes are dropped, and each is
/// built again from its records (a scan of the slot's entries) when a write next needs it: a
/// busier group pays in reads, never in memory.
pub const DEDUP_INDEX_ENTRIES_MAX: u64 = 4_000_000;
pub use ordo_proto::DEDUP_OUTCOME_BYTES_MAX;

// -- The change feed (`state/feed/`, `server/feed.rs`) --

/// Largest event the change log holds: one item's key, its new value and (under old-and-new
/// capture) its old value, each already bounded, plus the event's own fields. Events are built
/// from bounded ops only, so none is ever over it; a page always has room for one.
pub const FEED_EVENT_BYTES_MAX: usize =
    SHARD_KEY_BYTES_MAX + KEY_BYTES_MAX + 2 * VALUE_BYTES_MAX + 256;
/// Most events one `ReadChanges` page carries (a reader may ask for fewer): one page is read
/// under the state machine's read lock, so it must stay short next to an apply.
pub const FEED_PAGE_EVENTS_MAX: u32 = 1024;
/// Most bytes of events one page carries (at least one event): under the message bound with
/// room to spare, and the same read-lock reasoning as `SCAN_PAGE_BYTES_MAX`.
pub const FEED_PAGE_BYTES_MAX: u64 = 4 * 1024 * 1024;
const _: () = assert!(
    FEED_PAGE_BYTES_MAX as usize + FEED_EVENT_BYTES_MAX < ordo_proto::addr::KV_MESSAGE_BYTES_MAX
);
/// Most events one page looks at, filtered out or not: a filter that matches nothing must not
/// make one page scan a whole slot's log under the read lock.
pub const FEED_PAGE_SCAN_MAX: usize = 8 * FEED_PAGE_EVENTS_MAX as usize;
/// An idle leader proposes a checkpoint after this long without a proposal, and a reader with
/// nothing new sends its resolved time this often: resolved times advance within about a second
/// with no writes (issue 13), at one small raft entry per 250 ms per idle group.
pub const FEED_CHECKPOINT_INTERVAL_MS: u64 = 250;
/// A `Peer.ReadChanges` stream reads its next page at most this soon after the last one (unless
/// that one was full): every apply wakes it, and a page looks at every watched slot, so without
/// a pace one reader of a whole group would cost a page per apply. Adds at most this much to a
/// change's latency.
pub const FEED_PAGE_PACE_MS: u64 = 5;
/// `Peer.ReadChanges` streams one node serves at once (RESOURCE_EXHAUSTED past it): each holds
/// at most one page, so this bounds the memory readers take, whatever they watch.
pub const FEED_READERS_MAX: usize = 256;
pub use ordo_proto::FEED_SHARD_KEYS_MAX;
/// How often a leader plans trims of the retained log (a checkpoint with per-slot "drop below
/// seq" decisions): it reads every owned slot's meta record, so not every checkpoint does it.
pub const FEED_TRIM_INTERVAL_MS: u64 = 1_000;
/// Most events one checkpoint entry drops: bounded work per apply, whatever is due.
pub const FEED_TRIM_EVENTS_MAX: u64 = 1024;
/// Default retention by time (`--feed-retention-secs`): a day, as DynamoDB Streams and TiCDC.
pub const FEED_RETENTION_SECS_DEFAULT: u64 = 24 * 3600;
/// Default retention by bytes per group (`--feed-retention-bytes`): 1 GiB, the same as a
/// migration's change-log cap, so the events a move must copy with its slots stay of the order
/// the mover already handles, while a day of a moderately busy group (1 KiB events at 10/s) fits.
pub const FEED_RETENTION_BYTES_DEFAULT: u64 = 1 << 30;

// -- Consumer groups (`state/groups/`) --

pub use ordo_proto::FEED_GROUP_NAME_BYTES_MAX;
/// Most consumer groups a cluster holds (every group has a record in every slot it covers, and
/// each slot keeps an index of its groups that a trim reads): a trim and a describe read every
/// group of a slot, so the count stays small.
pub const FEED_GROUPS_MAX: usize = 64;
/// Most ranges of done events a group keeps above its committed seq in one slot: they are read
/// and written with every ack of the slot, and a dispatcher that holds a bounded number of
/// events in flight per slot never needs more (each in-flight event splits one range at most).
/// An ack past it is refused (`RESOURCE_EXHAUSTED`) and the event is delivered again later.
pub const FEED_GROUP_DONE_RANGES_MAX: usize = FEED_GROUP_HELD_EVENTS_PER_SLOT_MAX + 1;
/// Most delivery counts (events above the committed seq delivered more than once) a group keeps
/// in one slot: like the done ranges, part of the record every ack rewrites. A redelivery past it
/// is refused until acks advance the committed seq.
pub const FEED_GROUP_DELIVERIES_MAX: usize = FEED_GROUP_HELD_EVENTS_PER_SLOT_MAX;
/// Most parked orders a group keeps in one slot: past it, parking is refused (the dispatcher
/// keeps redelivering), and an operator has far too many poison orders to look at anyway.
pub const FEED_GROUP_PARKED_MAX: usize = 256;
/// Most slots one create, delete or seek of a group covers in one raft entry: its outcome names
/// the slot to go on from, so a group over 65,536 slots is a few bounded entries, not one.
pub const FEED_GROUP_SLOTS_PER_ENTRY: usize = 1024;
/// Most acks, skips or delivery counts one replicated flush carries: one raft entry stays small
/// (about 100 bytes each) however many members ack at once.
pub const FEED_GROUP_BATCH_MAX: usize = 4096;
/// A group's `ack_wait` when its creation names none: NATS JetStream's default, long enough for
/// a consumer's own writes and retries.
pub const FEED_GROUP_ACK_WAIT_MS_DEFAULT: u32 = 30_000;
/// Longest `ack_wait` a group may have: an hour (a member that needs longer sends `InProgress`);
/// a crashed member's events are redelivered within it.
pub const FEED_GROUP_ACK_WAIT_MS_MAX: u32 = 3_600_000;
/// Attempts an event gets when the group's creation names none, before its poison policy
/// applies: enough to ride out a consumer's transient failures, few enough that a poison order
/// is parked within minutes at the default ack wait.
pub const FEED_GROUP_MAX_DELIVER_DEFAULT: u32 = 5;
/// Most attempts a group may give an event (`max_deliver`): past a thousand, a poison order
/// would be retried for days at the default ack wait.
pub const FEED_GROUP_MAX_DELIVER_MAX: u32 = 1000;
/// How often a leader persists its groups' acks (research 9.4's `--ack-flush-interval`): one
/// raft entry per interval for all of them, however many acks arrived. Attempts, horizons and
/// parks, which hold deliveries back, go at once.
pub const FEED_GROUP_ACK_FLUSH_MS: u64 = 50;
/// How long a durable group holds events past retention by default (`--feed-protect-secs`):
/// retention plus a day (research 9.3), room for a weekend's stopped consumer to be noticed.
pub const FEED_PROTECT_SECS_DEFAULT: u64 = FEED_RETENTION_SECS_DEFAULT + 24 * 3600;
/// Most bytes of events a shard group keeps for durable groups by default
/// (`--feed-protect-bytes`): four times the retention cap, so a stopped group never fills a disk
/// (past it the oldest go and the groups that had not acked them are expired).
pub const FEED_PROTECT_BYTES_DEFAULT: u64 = 4 * FEED_RETENTION_BYTES_DEFAULT;
const _: () = assert!(FEED_PROTECT_SECS_DEFAULT >= FEED_RETENTION_SECS_DEFAULT);
const _: () = assert!(FEED_PROTECT_BYTES_DEFAULT >= FEED_RETENTION_BYTES_DEFAULT);

// -- Consumer groups: the dispatcher on a group's leader (`groups/dispatch.rs`) --

/// Members one consumer group has on one shard group's leader (`Join` past it is refused):
/// each costs a little memory and a turn in every round of deliveries.
pub const FEED_GROUP_MEMBERS_MAX: usize = 1024;
pub use ordo_proto::FEED_GROUP_CREDITS_MAX;
/// Deliveries of one slot in flight at once, across members (research 9.4's
/// `--feed-inflight-max`): one slot's events cannot take every member's credits, so the other
/// slots keep flowing, and redeliveries after a failover stay few per slot.
pub const FEED_GROUP_INFLIGHT_PER_SLOT_MAX: usize = 256;
/// Events a dispatcher holds per slot (read and not done: waiting their key's turn, in flight,
/// to be delivered again, parked); it reads more only below it. Bounds its memory per slot, and
/// the done ranges its acks leave above the committed seq (they are separated by held events,
/// so a slot's state keeps at most this many plus one). A parked key with this many later
/// events in one slot holds the slot until it is unparked.
pub const FEED_GROUP_HELD_EVENTS_PER_SLOT_MAX: usize = 1024;
/// Bytes of those events (a read takes at most the room left, and always one event).
pub const FEED_GROUP_HELD_BYTES_PER_SLOT_MAX: usize = 1024 * 1024;
const _: () = assert!(FEED_GROUP_INFLIGHT_PER_SLOT_MAX <= FEED_GROUP_HELD_EVENTS_PER_SLOT_MAX);
// The dispatcher's held events separate the done ranges and delivery counts its acks and
// redeliveries leave in a slot's state: the state must keep as many, or an apply refusal would
// stall the dispatcher waiting for a confirmation.
const _: () = assert!(FEED_GROUP_DONE_RANGES_MAX > FEED_GROUP_HELD_EVENTS_PER_SLOT_MAX);
const _: () = assert!(FEED_GROUP_DELIVERIES_MAX >= FEED_GROUP_HELD_EVENTS_PER_SLOT_MAX);
/// How far past the events it read a dispatcher asks its slot's horizon to be persisted: one
/// write per this many seqs of a slot lets first deliveries go without a write each, and after
/// a failover at most about this many more events than were read are fenced (one persisted
/// attempt each) because an earlier leader may have sent them.
pub const FEED_GROUP_HORIZON_AHEAD: u64 = 1024;
/// Longest delay a `Nack` may ask for: the event stays held (and, under `KEY_ORDERED`, its key
/// busy) that long, so it is bounded like everything held.
pub const FEED_GROUP_NACK_DELAY_MS_MAX: u64 = 3_600_000;
/// The longest a lease grows to by backoff (doubling `ack_wait` per failed attempt, unless
/// `ack_wait` is longer): an event whose member vanished is delivered again within this.
pub const FEED_GROUP_ACK_WAIT_BACKOFF_MAX_MS: u64 = 600_000;
