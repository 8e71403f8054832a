//! Online resharding: the migration driver, run by the meta leader (MongoDB's chunk migration).
//!
//! A migration moves a set of slots from one donor group D to one recipient group R:
//!
//! 1. The record is persisted in the meta group (`MapStore::save_migrations`, state COPYING).
//! 2. R's leftovers in the slots are cleared; D begins the migration (a raft entry that starts a
//!    change log for the slots); the slots' items are pulled from D's leader in bounded pages and
//!    ingested into R (raft entries, versions kept) while writes continue on D.
//! 3. D's change log is replayed on R from its start, in rounds, until a round is small.
//! 4. Critical section: state FENCED is persisted, D fences the slots (requests refused with the
//!    retryable `SlotMoving`: D serves none of them from now on), R replays the rest of the log
//!    (complete at the fence index). Under the admin lock: the map v+1 with the slots on R is
//!    committed (CAS), R takes them. The pause (fence to R serving) is measured and recorded.
//! 5. D gives the slots up (still fenced), ends the migration (unfenced: it answers wrong shard
//!    now) and deletes its copy in rate-limited batches; state DONE.
//!
//! Abort (asked for, or a step failed) before the commit: D gets its slots back and is unfenced,
//! R's copy is deleted, state ABORTED. The map is the commit point: a driver that resumes after a
//! meta leader change reads it (linearizably) and finishes a committed migration or aborts an
//! uncommitted one. A commit whose outcome is unknown is never rolled back by the driver that
//! sent it; the resumer decides from the map.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ordo_proto::v1::peer_client::PeerClient;
use ordo_proto::v1::*;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::map::{self, MapError};
use crate::MapStore;

/// Fence attempts refused because items of the moving slots are locked, 50 ms apart (10 s,
/// five lock timeouts: a lock left by a dead coordinator is resolved by the next request that
/// meets it once the timeout has passed) before the move is given up.
const FENCE_LOCKED_TRIES_MAX: u32 = 200;
/// Most migrations in flight at once (each holds a change log on its donor).
pub const CONCURRENT_MAX: usize = 4;
/// Finished migrations kept in the list for `ordoctl migrations`.
pub const FINISHED_KEPT: usize = 64;
/// Bytes of records per pull and per ingest entry.
pub const PAGE_BYTES: u32 = 256 * 1024;
/// Copy bandwidth bound (bytes/s of records pulled), so a move does not starve client traffic:
/// every copied byte is written by three replicas of the recipient. At 1 MiB/s a 3 → 4 group
/// rebalance of the orders bench (about 0.5 MiB per move) copies each move in ~0.5 s and keeps
/// client throughput above 70% on a 2-core machine running the whole cluster (bench/RESULTS.md).
pub const COPY_BYTES_PER_SEC: u64 = 512 * 1024;
/// The fence is taken once a catch-up round replays fewer change-log records than this.
pub const FENCE_BELOW_RECORDS: u64 = 512;
/// Catch-up rounds before fencing anyway (the log keeps growing faster than it is replayed).
pub const CATCH_UP_ROUNDS_MAX: usize = 20;
/// Pages in one copy or catch-up pass; a pass that needs more is refused (abort) rather than
/// looping forever.
pub const PAGES_MAX: usize = 1_000_000;
/// Items deleted per cleanup entry, and the pause between two (cleanup rate bound).
pub const CLEAR_ITEMS: u32 = 128;
pub const CLEAR_PAUSE: Duration = Duration::from_millis(50);
/// How long a node call keeps retrying (leader changes included).
pub const CALL_DEADLINE: Duration = Duration::from_secs(20);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_ATTEMPTS_MAX: usize = 40;
/// Slots per planned move when the request names none.
pub const SLOTS_PER_MOVE_DEFAULT: u32 = 512;
/// How often a copy pass checks that its migration is still wanted (abort, meta leadership).
const CHECK_EVERY: Duration = Duration::from_millis(300);
/// How often the resumer looks for orphaned migrations.
pub const RESUME_EVERY: Duration = Duration::from_millis(500);
/// Attempts of a compare-and-set on the migration records before giving up.
const CAS_ATTEMPTS_MAX: usize = 8;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn in_flight(m: &Migration) -> bool {
    matches!(
        MigrationState::try_from(m.state),
        Ok(MigrationState::Copying | MigrationState::Fenced | MigrationState::Committed)
    )
}

/// Checks a request to move `slots` to `to` against the map and the migrations in flight; the
/// moves it makes, one per donor group (slots `to` already owns are skipped).
pub fn plan_move(
    map: &ShardMap,
    migrations: &MigrationList,
    slots: &[u32],
    to: u64,
) -> Result<Vec<PlannedMove>, MapError> {
    let (_, donors) = map::move_slots(map, slots, to)?;
    let busy: BTreeMap<u32, &Migration> = migrations
        .migrations
        .iter()
        .filter(|m| in_flight(m))
        .flat_map(|m| m.slots.iter().map(move |s| (*s, m)))
        .collect();
    for s in donors.values().flatten() {
        if let Some(m) = busy.get(s) {
            return Err(MapError::Refused(format!(
                "slot {s} is already moving in migration {} (group {} to group {}); wait for it or abort it with `ordoctl migrations abort {}`",
                m.id, m.from_group, m.to_group, m.id
            )));
        }
    }
    for m in migrations.migrations.iter().filter(|m| in_flight(m)) {
        if m.from_group == to {
            return Err(MapError::Refused(format!(
                "group {to} is moving slots out (migration {}); move slots into it after that ends",
                m.id
            )));
        }
    }
    let running = migrations
        .migrations
        .iter()
        .filter(|m| in_flight(m))
        .count();
    if running + donors.len() > CONCURRENT_MAX {
        return Err(MapError::Refused(format!(
            "{running} migrations are in flight and this needs {} more; at most {CONCURRENT_MAX} run at once, retry when some finish (`ordoctl migrations`)",
            donors.len()
        )));
    }
    Ok(donors
        .into_iter()
        .map(|(from, slots)| PlannedMove {
            slots,
            from_group: from,
            to_group: to,
        })
        .collect())
}

/// An even spread: every group other than `drain` ends with `slot_count / n` slots (the first
/// `slot_count % n` one more). Slots move from the groups above their share, highest slots
/// first, to the groups below, in moves of at most `per_move` slots with one donor and one
/// recipient each. Deterministic.
pub fn plan_rebalance(
    map: &ShardMap,
    drain: Option<u64>,
    per_move: u32,
) -> Result<Vec<PlannedMove>, MapError> {
    if let Some(d) = drain {
        if !map.groups.iter().any(|g| g.id == d) {
            return Err(MapError::Refused(format!("group {d} is not in the map")));
        }
    }
    let keep: Vec<u64> = map
        .groups
        .iter()
        .map(|g| g.id)
        .filter(|g| Some(*g) != drain)
        .collect();
    if keep.is_empty() {
        return Err(MapError::Refused(
            "no group would be left to own the slots; add a group first".into(),
        ));
    }
    let per_move = if per_move == 0 {
        SLOTS_PER_MOVE_DEFAULT
    } else {
        per_move
    } as usize;
    let n = keep.len() as u32;
    let mut owned = map::slots_by_group(map);
    let target: BTreeMap<u64, usize> = keep
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let extra = (i as u32) < map.slot_count % n;
            (*g, (map.slot_count / n + extra as u32) as usize)
        })
        .chain(drain.map(|d| (d, 0)))
        .collect();
    // Slots given away, per donor, highest first.
    let mut surplus: Vec<(u64, Vec<u32>)> = Vec::new();
    for (g, t) in &target {
        let slots = owned.entry(*g).or_default();
        if slots.len() > *t {
            let give: Vec<u32> = slots.split_off(*t).into_iter().rev().collect();
            surplus.push((*g, give));
        }
    }
    let mut plan = Vec::new();
    for (to, t) in &target {
        let mut need = t.saturating_sub(owned.get(to).map_or(0, |s| s.len()));
        for (from, give) in surplus.iter_mut() {
            while need > 0 && !give.is_empty() {
                let take = need.min(per_move).min(give.len());
                let mut slots: Vec<u32> = give.drain(..take).collect();
                slots.sort_unstable();
                need -= take;
                plan.push(PlannedMove {
                    slots,
                    from_group: *from,
                    to_group: *to,
                });
            }
        }
    }
    Ok(plan)
}

/// Peer clients by address, connected lazily and reused.
#[derive(Default)]
struct Peers(Mutex<HashMap<String, PeerClient<Channel>>>);

impl Peers {
    fn get(&self, addr: &str) -> Result<PeerClient<Channel>, Status> {
        let mut m = self.0.lock().unwrap();
        if let Some(c) = m.get(addr) {
            return Ok(c.clone());
        }
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let ch = Endpoint::from_shared(uri)
            .map_err(|e| Status::invalid_argument(format!("address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(CALL_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        let c = PeerClient::new(ch)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        m.insert(addr.to_string(), c.clone());
        Ok(c)
    }
}

fn leader_hint(s: &Status) -> Option<String> {
    match ordo_proto::error_detail_of(s)? {
        error_detail::Kind::NotLeader(nl) if !nl.leader_addr.is_empty() => Some(nl.leader_addr),
        _ => None,
    }
}

/// Live progress of the migrations this replica drives (persisted only at state changes).
type Progress = Arc<Mutex<HashMap<u64, Migration>>>;

pub struct Driver<S> {
    store: Arc<S>,
    admin: Arc<tokio::sync::Mutex<()>>,
    peers: Peers,
    progress: Progress,
    /// Last replica of each group that answered as leader: tried first.
    leaders: Mutex<HashMap<u64, String>>,
}

/// Why a drive stopped without finishing.
enum Stop {
    /// Abort the migration (before the commit point) with this reason.
    Abort(String),
    /// Leave it to the resumer (this replica lost the meta leadership, or the commit's outcome
    /// is unknown).
    Leave(Status),
}

impl From<Status> for Stop {
    fn from(s: Status) -> Stop {
        Stop::Abort(s.message().to_string())
    }
}

impl<S: MapStore> Driver<S> {
    pub fn new(store: Arc<S>, admin: Arc<tokio::sync::Mutex<()>>) -> Arc<Self> {
        Arc::new(Driver {
            store,
            admin,
            peers: Peers::default(),
            progress: Default::default(),
            leaders: Default::default(),
        })
    }

    /// Looks for migrations in flight that no task of this replica drives (a meta leader change,
    /// an abort asked of an orphan) and drives them to an end. Runs until the replica stops.
    pub fn spawn_resumer(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            while !me.store.stopped() {
                tokio::time::sleep(RESUME_EVERY).await;
                let Ok((list, _)) = me.store.load_migrations(true).await else {
                    continue; // not the meta leader
                };
                for m in list.migrations.iter().filter(|m| in_flight(m)) {
                    if me.progress.lock().unwrap().contains_key(&m.id) {
                        continue;
                    }
                    tracing::warn!(
                        migration = m.id,
                        state = m.state,
                        "resuming a migration no task drives"
                    );
                    let d = me.clone();
                    let id = m.id;
                    tokio::spawn(async move {
                        if let Err(e) = d.drive(id, true).await {
                            tracing::warn!(migration = id, error = %e, "resumed migration did not finish");
                        }
                    });
                }
            }
        });
    }

    /// Loads the records linearizably, applies `f` to record `id` and saves them (CAS, retried).
    async fn update(
        &self,
        id: u64,
        mut f: impl FnMut(&mut Migration) -> Result<(), Status>,
    ) -> Result<Migration, Status> {
        for _ in 0..CAS_ATTEMPTS_MAX {
            let (mut list, token) = self.store.load_migrations(true).await?;
            let m = list
                .migrations
                .iter_mut()
                .find(|m| m.id == id)
                .ok_or_else(|| Status::not_found(format!("no migration {id}")))?;
            f(m)?;
            let m = m.clone();
            if self.store.save_migrations(token, &list).await? {
                return Ok(m);
            }
        }
        Err(Status::aborted(
            "the migration records kept changing concurrently; retry",
        ))
    }

    fn progress(&self, id: u64, f: impl FnOnce(&mut Migration)) {
        if let Some(m) = self.progress.lock().unwrap().get_mut(&id) {
            f(m);
        }
    }

    /// The records, with live progress of the migrations this replica drives.
    pub async fn list(&self) -> Result<MigrationList, Status> {
        let (mut list, _) = self.store.load_migrations(false).await?;
        let live = self.progress.lock().unwrap();
        for m in list.migrations.iter_mut() {
            if let Some(p) = live.get(&m.id) {
                m.items_copied = m.items_copied.max(p.items_copied);
                m.bytes_copied = m.bytes_copied.max(p.bytes_copied);
                m.log_records = m.log_records.max(p.log_records);
                m.items_cleaned = m.items_cleaned.max(p.items_cleaned);
            }
        }
        Ok(list)
    }

    /// Records the migrations of a move (one per donor); their ids.
    pub async fn start(
        &self,
        slots: &[u32],
        to: u64,
        copy_bytes_per_sec: u64,
    ) -> Result<Vec<u64>, Status> {
        let _admin = self.admin.lock().await;
        let (map, _) = self.store.load(true).await?;
        if map.version == 0 {
            return Err(Status::failed_precondition(
                "the cluster is not initialized: run `ordoctl init` first",
            ));
        }
        let (mut list, token) = self.store.load_migrations(true).await?;
        let moves = plan_move(&map, &list, slots, to)?;
        let mut ids = Vec::new();
        for mv in moves {
            let id = list.next_id.max(1);
            list.next_id = id + 1;
            list.migrations.push(Migration {
                id,
                slots: mv.slots,
                from_group: mv.from_group,
                to_group: mv.to_group,
                state: MigrationState::Copying as i32,
                started_unix_ms: now_ms(),
                copy_bytes_per_sec,
                ..Default::default()
            });
            ids.push(id);
        }
        // Forget the oldest finished records beyond the bound.
        let finished = list.migrations.iter().filter(|m| !in_flight(m)).count();
        let mut drop = finished.saturating_sub(FINISHED_KEPT);
        list.migrations.retain(|m| {
            if drop > 0 && !in_flight(m) {
                drop -= 1;
                false
            } else {
                true
            }
        });
        if !self.store.save_migrations(token, &list).await? {
            return Err(Status::aborted(
                "the migration records changed concurrently; nothing was started, retry",
            ));
        }
        let mut p = self.progress.lock().unwrap();
        for m in list.migrations.iter().filter(|m| ids.contains(&m.id)) {
            tracing::info!(
                migration = m.id,
                to,
                slots = m.slots.len(),
                from = m.from_group,
                "migration recorded"
            );
            p.insert(m.id, m.clone());
        }
        Ok(ids)
    }

    /// Asks for an abort; the driver (this replica's, or the resumer) carries it out.
    pub async fn request_abort(&self, id: u64) -> Result<Migration, Status> {
        let m = self
            .update(id, |m| match MigrationState::try_from(m.state) {
                Ok(MigrationState::Copying | MigrationState::Fenced) => {
                    m.abort_requested = true;
                    Ok(())
                }
                _ => Err(Status::failed_precondition(format!(
                    "migration {id} is {} and can no longer be aborted (only before its commit)",
                    state_name(m.state)
                ))),
            })
            .await?;
        Ok(m)
    }

    /// Drives migration `id` to its end: DONE, or ABORTED (an error then says why).
    pub async fn drive(&self, id: u64, resumed: bool) -> Result<Migration, Status> {
        let (list, _) = self.store.load_migrations(true).await?;
        let m = list
            .migrations
            .iter()
            .find(|m| m.id == id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no migration {id}")))?;
        {
            // `start` registered the migrations it recorded, so that the resumer leaves them to
            // the request that runs them in turn.
            let mut p = self.progress.lock().unwrap();
            if resumed && p.contains_key(&id) {
                return Err(Status::failed_precondition(format!(
                    "migration {id} is already being driven"
                )));
            }
            p.insert(id, m.clone());
        }
        let r = self.drive_inner(m, resumed).await;
        self.progress.lock().unwrap().remove(&id);
        r
    }

    async fn drive_inner(&self, m: Migration, resumed: bool) -> Result<Migration, Status> {
        let stop = match MigrationState::try_from(m.state) {
            Ok(MigrationState::Copying) if !resumed && !m.abort_requested => {
                match self.copy_and_commit(&m).await {
                    Ok(()) => return self.finish(&m).await,
                    Err(stop) => stop,
                }
            }
            Ok(MigrationState::Copying | MigrationState::Fenced) => {
                Stop::Abort(if m.abort_requested {
                    "aborted on request".into()
                } else {
                    "the meta leader changed during the move; the new leader aborts it".into()
                })
            }
            Ok(MigrationState::Committed) => return self.finish(&m).await,
            _ => return Ok(m),
        };
        match stop {
            Stop::Leave(s) => Err(s),
            Stop::Abort(why) => {
                let m = self.abort(&m, &why).await?;
                if MigrationState::try_from(m.state) == Ok(MigrationState::Aborted) {
                    Err(Status::aborted(format!(
                        "migration {} of {} slots from group {} to group {} was aborted: {why}; nothing moved",
                        m.id,
                        m.slots.len(),
                        m.from_group,
                        m.to_group
                    )))
                } else {
                    Ok(m)
                }
            }
        }
    }

    async fn groups(&self, m: &Migration) -> Result<(Group, Group), Status> {
        let (map, _) = self.store.load(true).await?;
        let find = |id: u64| {
            map.groups
                .iter()
                .find(|g| g.id == id)
                .cloned()
                .ok_or_else(|| Status::failed_precondition(format!("group {id} is not in the map")))
        };
        Ok((find(m.from_group)?, find(m.to_group)?))
    }

    /// Calls `f` on `group`'s leader: follows not-leader hints, rotates over the replicas on
    /// UNAVAILABLE, bounded by [`CALL_DEADLINE`] and [`CALL_ATTEMPTS_MAX`]. Every request the
    /// driver sends is idempotent, so repeating one whose outcome was unknown is safe.
    async fn on_leader<T, F, Fut>(&self, group: &Group, what: &str, f: F) -> Result<T, Status>
    where
        F: Fn(PeerClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let started = Instant::now();
        let cached = self.leaders.lock().unwrap().get(&group.id).cloned();
        let mut target = cached
            .or_else(|| group.replicas.first().map(|r| r.addr.clone()))
            .ok_or_else(|| {
                Status::failed_precondition(format!("group {} has no replicas", group.id))
            })?;
        let mut rotate = 0;
        let mut backoff = Duration::from_millis(20);
        let mut last = Status::unavailable("no attempt made");
        for _ in 0..CALL_ATTEMPTS_MAX {
            if started.elapsed() > CALL_DEADLINE {
                break;
            }
            let r = match self.peers.get(&target) {
                Ok(c) => match tokio::time::timeout(CALL_TIMEOUT, f(c)).await {
                    Ok(r) => r.map(|r| r.into_inner()),
                    Err(_) => Err(Status::unavailable(format!("{target} did not answer"))),
                },
                Err(e) => Err(e),
            };
            match r {
                Ok(v) => {
                    self.leaders.lock().unwrap().insert(group.id, target);
                    return Ok(v);
                }
                Err(s)
                    if matches!(
                        s.code(),
                        Code::Unavailable
                            | Code::Unknown
                            | Code::Cancelled
                            | Code::DeadlineExceeded
                    ) =>
                {
                    match leader_hint(&s) {
                        Some(hint) if hint != target => target = hint,
                        _ => {
                            rotate += 1;
                            target = group.replicas[rotate % group.replicas.len()].addr.clone();
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_millis(400));
                        }
                    }
                    last = s;
                }
                Err(s) => return Err(s),
            }
        }
        Err(Status::unavailable(format!(
            "group {}: {what} did not succeed within {:.1?}: {}",
            group.id,
            started.elapsed(),
            last.message()
        )))
    }

    async fn out_step(
        &self,
        d: &Group,
        id: u64,
        step: MigrateStep,
        slots: &[u32],
    ) -> Result<u64, Status> {
        let req = MigrateOutRequest {
            group_id: d.id,
            migration_id: id,
            step: step as i32,
            slots: slots.to_vec(),
        };
        let r = self
            .on_leader(d, step.as_str_name(), |mut c| {
                let req = req.clone();
                async move { c.migrate_out(req).await }
            })
            .await?;
        Ok(r.index)
    }

    async fn ingest(
        &self,
        r: &Group,
        id: u64,
        records: Vec<MigrationRecord>,
    ) -> Result<(), Status> {
        let req = MigrateIngestRequest {
            group_id: r.id,
            migration_id: id,
            records,
        };
        self.on_leader(r, "ingest", |mut c| {
            let req = req.clone();
            async move { c.migrate_ingest(req).await }
        })
        .await?;
        Ok(())
    }

    /// Deletes every item of `slots` on `g` (which must not serve them), in rate-limited
    /// batches; how many.
    async fn clear(&self, g: &Group, slots: &[u32], id: u64) -> Result<u64, Status> {
        let req = MigrateClearRequest {
            group_id: g.id,
            slots: slots.to_vec(),
            items_max: CLEAR_ITEMS,
        };
        let mut total = 0;
        for _ in 0..PAGES_MAX {
            let r = self
                .on_leader(g, "clear", |mut c| {
                    let req = req.clone();
                    async move { c.migrate_clear(req).await }
                })
                .await?;
            total += r.deleted;
            self.progress(id, |m| m.items_cleaned = total);
            if r.done {
                return Ok(total);
            }
            tokio::time::sleep(CLEAR_PAUSE).await;
        }
        Err(Status::internal(
            "cleanup did not end within its page bound",
        ))
    }

    /// Pulls pages after `after` until D has nothing more, ingesting each into R. Returns the
    /// records moved and the last pull.
    async fn pass(
        &self,
        m: &Migration,
        d: &Group,
        r: &Group,
        log: bool,
        after: &mut Vec<u8>,
    ) -> Result<(u64, MigratePullResponse), Stop> {
        let mut moved = 0;
        let started = Instant::now();
        let mut checked = Instant::now();
        let mut bytes_total = 0u64;
        let rate = match m.copy_bytes_per_sec {
            0 => COPY_BYTES_PER_SEC,
            r => r,
        };
        // A page holds an eighth of a second's worth of the bandwidth bound at most, so that
        // the throttle is smooth.
        let page_bytes = (PAGE_BYTES as u64).min(rate / 8).max(1) as u32;
        for _ in 0..PAGES_MAX {
            if checked.elapsed() > CHECK_EVERY {
                self.check_still_wanted(m.id).await?;
                checked = Instant::now();
            }
            let req = MigratePullRequest {
                group_id: d.id,
                migration_id: m.id,
                log,
                after: after.clone().into(),
                bytes_max: page_bytes,
            };
            let p = self
                .on_leader(d, "pull", |mut c| {
                    let req = req.clone();
                    async move { c.migrate_pull(req).await }
                })
                .await?;
            let n = p.records.len() as u64;
            let bytes: u64 = p
                .records
                .iter()
                .map(|r| (r.key.len() + r.value.len()) as u64)
                .sum();
            if n > 0 {
                self.ingest(r, m.id, p.records.clone()).await?;
            }
            moved += n;
            bytes_total += bytes;
            *after = p.next_after.to_vec();
            self.progress(m.id, |x| {
                if log {
                    x.log_records += n;
                } else {
                    x.items_copied += n;
                }
                x.bytes_copied += bytes;
            });
            if p.done {
                return Ok((moved, p));
            }
            // Bandwidth bound: stay under COPY_BYTES_PER_SEC on average.
            let due = Duration::from_secs_f64(bytes_total as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        Err(Stop::Abort(
            "a copy pass did not end within its page bound".into(),
        ))
    }

    /// Stops the drive when an abort was asked for, or when this replica is no longer the one
    /// that may write the records (it lost the meta leadership).
    async fn check_still_wanted(&self, id: u64) -> Result<(), Stop> {
        match self.store.load_migrations(true).await {
            Ok((list, _)) => match list.migrations.iter().find(|m| m.id == id) {
                Some(m) if m.abort_requested => Err(Stop::Abort("aborted on request".into())),
                Some(_) => Ok(()),
                None => Err(Stop::Leave(Status::not_found(format!(
                    "migration {id} is gone"
                )))),
            },
            Err(s) => Err(Stop::Leave(s)),
        }
    }

    async fn copy_and_commit(&self, m: &Migration) -> Result<(), Stop> {
        let (d, r) = self.groups(m).await?;
        // Leftovers of an earlier attempt would survive the copy: clear them first.
        self.clear(&r, &m.slots, m.id).await?;
        self.progress(m.id, |x| x.items_cleaned = 0);
        self.out_step(&d, m.id, MigrateStep::Begin, &m.slots)
            .await?;
        let mut after = Vec::new();
        self.pass(m, &d, &r, false, &mut after).await?;
        // Catch up from the log's start until a round is small.
        let mut log_after = Vec::new();
        for _ in 0..CATCH_UP_ROUNDS_MAX {
            let (n, _) = self.pass(m, &d, &r, true, &mut log_after).await?;
            if n < FENCE_BELOW_RECORDS {
                break;
            }
        }
        self.check_still_wanted(m.id).await?;
        // Critical section.
        self.update(m.id, |x| {
            if x.abort_requested {
                return Err(Status::aborted("aborted on request"));
            }
            x.state = MigrationState::Fenced as i32;
            Ok(())
        })
        .await
        .map_err(|s| match s.code() {
            Code::Aborted => Stop::Abort(s.message().to_string()),
            _ => Stop::Leave(s),
        })?;
        let fenced_at = Instant::now();
        // The donor fences only once no cross-group transaction holds items of the slots (they
        // finish within a few round trips; a dead coordinator's are resolved by whoever meets
        // them, at the latest after the lock timeout).
        let mut tries = 0;
        let fence = loop {
            match self.out_step(&d, m.id, MigrateStep::Fence, &[]).await {
                Err(s)
                    if s.code() == Code::FailedPrecondition
                        && s.message().contains("locked")
                        && tries < FENCE_LOCKED_TRIES_MAX =>
                {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => break other?,
            }
        };
        let (_, last) = self.pass(m, &d, &r, true, &mut log_after).await?;
        if last.fence_index != fence || last.applied_index < fence {
            return Err(Stop::Abort(format!(
                "the donor's log does not reach the fence (fence {fence}, log read at {} with fence {})",
                last.applied_index, last.fence_index
            )));
        }
        self.commit(m, &r, fenced_at).await
    }

    /// The map commits, R takes the slots (D stays fenced): under the admin lock, so no other
    /// map change comes between.
    async fn commit(&self, m: &Migration, r: &Group, fenced_at: Instant) -> Result<(), Stop> {
        let _admin = self.admin.lock().await;
        let (map, token) = self.store.load(true).await.map_err(Stop::Leave)?;
        // The map load was linearizable: a local read of the records is as fresh.
        let (list, _) = self
            .store
            .load_migrations(false)
            .await
            .map_err(Stop::Leave)?;
        if list
            .migrations
            .iter()
            .any(|x| x.id == m.id && x.abort_requested)
        {
            return Err(Stop::Abort("aborted on request".into()));
        }
        if let Some(s) = m
            .slots
            .iter()
            .find(|s| map.slot_owner.get(**s as usize) != Some(&m.from_group))
        {
            return Err(Stop::Abort(format!(
                "slot {s} is no longer owned by group {} in the map",
                m.from_group
            )));
        }
        let (next, _) =
            map::move_slots(&map, &m.slots, m.to_group).map_err(|e| Stop::Abort(e.to_string()))?;
        let after = map::slots_by_group(&next);
        // D stays fenced (it serves none of the slots) until `finish` removes them from its
        // ownership, so the map can commit and R serve at once: one raft round less in the pause.
        match self.store.save(token, &next).await {
            Ok(true) => {}
            Ok(false) => {
                // Certainly not committed: the abort unfences D.
                return Err(Stop::Abort("the shard map changed concurrently".into()));
            }
            // Unknown: only a linearizable read of the map can tell; the resumer does it.
            Err(s) => return Err(Stop::Leave(s)),
        }
        tracing::info!(
            migration = m.id,
            version = next.version,
            "map committed: slots on the recipient"
        );
        let pause = {
            let taken = self
                .own(r, next.version, next.slot_count, after[&r.id].clone())
                .await;
            let pause = fenced_at.elapsed();
            if let Err(e) = taken {
                tracing::error!(migration = m.id, error = %e, "the recipient did not take its slots yet; the resumer retries");
            }
            pause
        };
        let pause_ms = pause.as_millis() as u64;
        let p = self
            .progress
            .lock()
            .unwrap()
            .get(&m.id)
            .cloned()
            .unwrap_or_default();
        let saved = self
            .update(m.id, |x| {
                x.state = MigrationState::Committed as i32;
                x.map_version = next.version;
                x.pause_ms = pause_ms;
                x.items_copied = p.items_copied;
                x.bytes_copied = p.bytes_copied;
                x.log_records = p.log_records;
                Ok(())
            })
            .await;
        if let Err(e) = saved {
            tracing::warn!(migration = m.id, error = %e, "could not record the commit; the resumer finishes it from the map");
        }
        tracing::info!(migration = m.id, pause_ms, "critical section over");
        Ok(())
    }

    async fn own(
        &self,
        g: &Group,
        map_version: u64,
        slot_count: u32,
        slots: Vec<u32>,
    ) -> Result<SetOwnershipResponse, Status> {
        let req = SetOwnershipRequest {
            group_id: g.id,
            map_version,
            slot_count,
            slots,
        };
        self.on_leader(g, "set ownership", |mut c| {
            let req = req.clone();
            async move { c.set_ownership(req).await }
        })
        .await
    }

    /// After the commit: R owns the slots (again, idempotent), D ends the migration and deletes
    /// its copy; state DONE.
    async fn finish(&self, m: &Migration) -> Result<Migration, Status> {
        let (d, r) = self.groups(m).await?;
        {
            let _admin = self.admin.lock().await;
            let (map, _) = self.store.load(true).await?;
            if m.slots
                .iter()
                .any(|s| map.slot_owner.get(*s as usize) != Some(&m.to_group))
            {
                return Err(Status::internal(format!(
                    "migration {} is recorded committed but the map does not give its slots to group {}",
                    m.id, m.to_group
                )));
            }
            // R takes the slots (again: idempotent), then D gives them up while still fenced,
            // so it never serves them after the commit.
            let mut owned = map::slots_by_group(&map);
            for g in [&r, &d] {
                let slots = owned.remove(&g.id).unwrap_or_default();
                if let Err(e) = self.own(g, map.version, map.slot_count, slots).await {
                    // Refused as older: a newer map already installed this group's ownership.
                    if e.code() != Code::FailedPrecondition {
                        return Err(e);
                    }
                }
            }
        }
        self.out_step(&d, m.id, MigrateStep::End, &[]).await?;
        let cleaned = self.clear(&d, &m.slots, m.id).await?;
        let map_version = {
            let (map, _) = self.store.load(true).await?;
            map.version
        };
        let m = self
            .update(m.id, |x| {
                x.state = MigrationState::Done as i32;
                x.items_cleaned = cleaned;
                if x.map_version == 0 {
                    x.map_version = map_version;
                }
                x.finished_unix_ms = now_ms();
                Ok(())
            })
            .await?;
        tracing::info!(
            migration = m.id,
            items = m.items_copied,
            pause_ms = m.pause_ms,
            cleaned,
            "migration done"
        );
        Ok(m)
    }

    /// Before the commit only: D owns and serves the slots again, R's copy is deleted.
    async fn abort(&self, m: &Migration, why: &str) -> Result<Migration, Status> {
        tracing::warn!(migration = m.id, why, "aborting migration");
        let (d, r) = self.groups(m).await?;
        {
            let _admin = self.admin.lock().await;
            let (map, _) = self.store.load(true).await?;
            if m.slots
                .iter()
                .all(|s| map.slot_owner.get(*s as usize) == Some(&m.to_group))
            {
                drop(_admin);
                tracing::info!(
                    migration = m.id,
                    "the map already gives the slots to the recipient: finishing instead"
                );
                self.update(m.id, |x| {
                    x.state = MigrationState::Committed as i32;
                    Ok(())
                })
                .await?;
                return self.finish(m).await;
            }
            // D may have given the slots up for a commit that did not happen: give them back at
            // a version above any it may hold.
            let slots = map::slots_by_group(&map).remove(&d.id).unwrap_or_default();
            let req = SetOwnershipRequest {
                group_id: d.id,
                map_version: map.version + 1,
                slot_count: map.slot_count,
                slots,
            };
            self.on_leader(&d, "set ownership", |mut c| {
                let req = req.clone();
                async move { c.set_ownership(req).await }
            })
            .await?;
            self.out_step(&d, m.id, MigrateStep::End, &[]).await?;
        }
        self.clear(&r, &m.slots, m.id).await?;
        let why = why.to_string();
        self.update(m.id, |x| {
            x.state = MigrationState::Aborted as i32;
            x.error = why.clone();
            x.finished_unix_ms = now_ms();
            Ok(())
        })
        .await
    }
}

pub fn state_name(state: i32) -> &'static str {
    match MigrationState::try_from(state) {
        Ok(MigrationState::Copying) => "copying",
        Ok(MigrationState::Fenced) => "fenced",
        Ok(MigrationState::Committed) => "committed",
        Ok(MigrationState::Done) => "done",
        Ok(MigrationState::Aborted) => "aborted",
        _ => "unknown",
    }
}

/// Slots of `plan` per (from, to), for logs.
pub fn describe_plan(plan: &[PlannedMove]) -> String {
    let mut by: BTreeMap<(u64, u64), usize> = BTreeMap::new();
    for p in plan {
        *by.entry((p.from_group, p.to_group)).or_default() += p.slots.len();
    }
    by.iter()
        .map(|((f, t), n)| format!("{n} slots {f}→{t}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Counts of slots per group after `plan` is applied to `map`.
pub fn counts_after(map: &ShardMap, plan: &[PlannedMove]) -> BTreeMap<u64, usize> {
    let mut owner = map.slot_owner.clone();
    for p in plan {
        for s in &p.slots {
            owner[*s as usize] = p.to_group;
        }
    }
    let mut counts: BTreeMap<u64, usize> = map.groups.iter().map(|g| (g.id, 0)).collect();
    for g in owner {
        *counts.entry(g).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn map(slot_count: u32, groups: &[u64]) -> ShardMap {
        let gs = groups
            .iter()
            .map(|id| Group {
                id: *id,
                replicas: vec![],
            })
            .collect();
        map::initial_map(slot_count, gs, vec![]).unwrap()
    }

    #[test]
    fn rebalance_onto_a_new_group_spreads_evenly_with_one_donor_per_move() {
        let mut m = map(4096, &[1, 2, 3]);
        m = map::add_group(
            &m,
            Group {
                id: 4,
                replicas: vec![],
            },
        );
        let plan = plan_rebalance(&m, None, 256).unwrap();
        let counts = counts_after(&m, &plan);
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![1024; 4]);
        assert!(plan.iter().all(|p| p.to_group == 4 && p.slots.len() <= 256));
        let moved: BTreeSet<u32> = plan.iter().flat_map(|p| p.slots.clone()).collect();
        assert_eq!(moved.len(), 1024, "no slot moves twice");
        // Balanced already: nothing to do.
        assert!(plan_rebalance(&map(4096, &[1, 2]), None, 0)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn drain_moves_every_slot_off_the_group() {
        let m = map(100, &[1, 2, 3]);
        let plan = plan_rebalance(&m, Some(2), 0).unwrap();
        let counts = counts_after(&m, &plan);
        assert_eq!(counts[&2], 0);
        assert_eq!(counts[&1] + counts[&3], 100);
        assert!(counts[&1].abs_diff(counts[&3]) <= 1);
        assert!(plan_rebalance(&map(10, &[1]), Some(1), 0).is_err());
        assert!(plan_rebalance(&m, Some(9), 0).is_err());
    }

    #[test]
    fn moves_are_refused_when_they_overlap_or_make_no_sense() {
        let m = map(8, &[1, 2]);
        let mut list = MigrationList::default();
        let err = |r: Result<_, MapError>| r.unwrap_err().to_string();
        assert!(err(plan_move(&m, &list, &[0], 1)).contains("already owns"));
        assert!(err(plan_move(&m, &list, &[0], 7)).contains("not in the map"));
        assert!(err(plan_move(&m, &list, &[99], 2)).contains("out of range"));
        let plan = plan_move(&m, &list, &[0, 1, 5], 2).unwrap();
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].slots, vec![0, 1]);
        list.migrations.push(Migration {
            id: 3,
            slots: vec![1],
            from_group: 1,
            to_group: 2,
            state: MigrationState::Copying as i32,
            ..Default::default()
        });
        assert!(err(plan_move(&m, &list, &[1, 2], 2)).contains("already moving in migration 3"));
        assert!(plan_move(&m, &list, &[2], 2).is_ok());
        list.migrations[0].state = MigrationState::Done as i32;
        assert!(plan_move(&m, &list, &[1, 2], 2).is_ok());
    }
}
