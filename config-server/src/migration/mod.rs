//! Online resharding: the [`Mover`], run by the config leader (MongoDB's chunk migration).
//!
//! A migration moves a set of slots from one donor group D to one recipient group R:
//!
//! 1. The migration is persisted in the config group's migration list
//!    (`MapStore::save_migrations`, state COPYING), for the task that moves the slots
//!    (`tasks.rs`: the task, not the caller that asked for it, drives the migration).
//! 2. R's leftovers in the slots are cleared; D begins the migration (a raft entry that starts a
//!    change log for the slots); the slots' items are pulled from D's leader in bounded pages and
//!    ingested into R (raft entries, versions kept) while writes continue on D.
//! 3. D's change log is replayed on R from its start, in rounds, until a round is small.
//! 4. Critical section: state FENCED is persisted, D fences the slots (requests refused with the
//!    retryable `SlotMoving`: D serves none of them from now on), R replays the rest of the log
//!    (complete at the fence index). The cut-over, under the admin lock: the map v+1 with the
//!    slots on R is stored (CAS), R takes them; state COMMITTED on the wire. The pause (fence to
//!    R serving) is measured and recorded.
//! 5. D gives the slots up (still fenced), ends the migration (unfenced: it answers wrong shard
//!    now) and deletes its copy in rate-limited batches; state DONE.
//!
//! Abort (asked for, or a step failed) before the cut-over: D gets its slots back and is
//! unfenced, R's copy is deleted, state ABORTED. The map decides: a mover that resumes after a
//! config leader change reads it (linearizably) and finishes a migration the map cut over or
//! aborts one it did not. A cut-over whose outcome is unknown is never rolled back by the mover
//! that sent it; the resumed drive decides from the map. Every node call keeps to the mover's
//! own deadlines ([`CALL_DEADLINE`]), whoever asked for the move.
//!
//! `plan.rs` is the pure planner (which moves, an even spread); `steps.rs` the calls to the
//! groups (copy, fence, cut-over, cleanup, abort). ("Commit" is raft's word; here the step is
//! the cut-over.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ordo_proto::retry::Backoff;
use ordo_proto::v1::*;
use tonic::Status;

use crate::groups::GroupLeaders;
use crate::MapStore;

mod plan;
mod steps;

pub use plan::{counts_after, describe_plan, in_flight, plan_move, plan_rebalance, state_name};

/// Fence attempts refused because items of the moving slots are locked, 50 ms apart (10 s,
/// five lock timeouts: a lock left by a dead coordinator is resolved once the timeout has
/// passed, by the next request that meets it or else by its group's leader in the background)
/// before the move is given up.
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
const CALL_ATTEMPTS_MAX: u32 = 40;
/// 20 ms doubling up to 400 ms between a node call's attempts.
const CALL_BACKOFF: Backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(400));
/// Slots per planned move when the request names none.
pub const SLOTS_PER_MOVE_DEFAULT: u32 = 512;
/// How often a copy pass checks that its migration is still wanted (abort, config leadership).
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

/// Live progress of the migrations this replica drives (persisted only at state changes).
type Progress = Arc<Mutex<HashMap<u64, Migration>>>;

/// Moves slots with their data: drives each migration to DONE or ABORTED.
pub struct Mover<S> {
    store: Arc<S>,
    admin: Arc<tokio::sync::Mutex<()>>,
    /// Calls to group leaders, over cached channels, starting at the replica that led last.
    groups: Arc<GroupLeaders>,
    progress: Progress,
    /// The copy bandwidth of a move whose request names none.
    copy_bytes_per_sec: u64,
}

/// A migration this replica drives: its `progress` entry, removed however the drive ends (an
/// error, a panic, a dropped future), so that the resumer never skips a migration nobody drives.
struct Driving<'a> {
    progress: &'a Progress,
    id: u64,
}

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        self.progress.lock().unwrap().remove(&self.id);
    }
}

/// Loads the records linearizably, applies `f` to them and saves them (CAS, retried while they
/// change concurrently); what `f` returned. An error from `f` saves nothing.
pub(crate) async fn update_records<S: MapStore, T>(
    store: &S,
    mut f: impl FnMut(&mut MigrationList) -> Result<T, Status>,
) -> Result<T, Status> {
    for _ in 0..CAS_ATTEMPTS_MAX {
        let (mut list, token) = store.load_migrations(true).await?;
        let out = f(&mut list)?;
        if store.save_migrations(token, &list).await? {
            return Ok(out);
        }
    }
    Err(Status::aborted(
        "the migration records kept changing concurrently; retry",
    ))
}

/// Forgets the oldest of `items` that `finished` says are over, beyond `kept` of them.
pub(crate) fn forget_oldest<T>(items: &mut Vec<T>, kept: usize, finished: impl Fn(&T) -> bool) {
    let mut drop = items
        .iter()
        .filter(|x| finished(x))
        .count()
        .saturating_sub(kept);
    items.retain(|x| {
        if drop > 0 && finished(x) {
            drop -= 1;
            false
        } else {
            true
        }
    });
}

/// Why a drive stopped without finishing.
enum Stop {
    /// Abort the migration (before the cut-over) with this reason.
    Abort(String),
    /// Leave it to the resumer (this replica lost the config leadership, or the cut-over's outcome
    /// is unknown).
    Leave(Status),
}

impl From<Status> for Stop {
    fn from(s: Status) -> Stop {
        Stop::Abort(s.message().to_string())
    }
}

impl<S: MapStore> Mover<S> {
    /// `copy_bytes_per_sec`: the copy bandwidth of moves whose request names none (0:
    /// [`COPY_BYTES_PER_SEC`]).
    pub fn new(
        store: Arc<S>,
        admin: Arc<tokio::sync::Mutex<()>>,
        groups: Arc<GroupLeaders>,
        copy_bytes_per_sec: u64,
    ) -> Arc<Self> {
        Arc::new(Mover {
            store,
            admin,
            groups,
            progress: Default::default(),
            copy_bytes_per_sec: match copy_bytes_per_sec {
                0 => COPY_BYTES_PER_SEC,
                r => r,
            },
        })
    }

    /// Whether a task of this replica drives migration `id` now.
    pub fn driving(&self, id: u64) -> bool {
        self.progress.lock().unwrap().contains_key(&id)
    }

    /// Drives `m`, a migration in flight that nothing drives (its task ended, or it has none),
    /// to an end in a task of its own: aborted before its cut-over, finished after.
    pub fn resume_orphan(self: &Arc<Self>, m: &Migration) {
        tracing::warn!(
            migration = m.id,
            state = m.state,
            "resuming a migration no task drives"
        );
        let d = self.clone();
        let id = m.id;
        tokio::spawn(async move {
            if let Err(e) = d.drive(id, true).await {
                tracing::warn!(migration = id, error = %e, "resumed migration did not finish");
            }
        });
    }

    /// Loads the records linearizably, applies `f` to record `id` and saves them (CAS, retried).
    async fn update(
        &self,
        id: u64,
        mut f: impl FnMut(&mut Migration) -> Result<(), Status>,
    ) -> Result<Migration, Status> {
        update_records(&*self.store, |list| {
            let m = list
                .migrations
                .iter_mut()
                .find(|m| m.id == id)
                .ok_or_else(|| Status::not_found(format!("no migration {id}")))?;
            f(m)?;
            Ok(m.clone())
        })
        .await
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

    /// Records the migrations of a move (one per donor) for task `task` (it lists them); their
    /// ids. A bandwidth of 0 is this config server's default.
    pub async fn start(
        &self,
        slots: &[u32],
        to: u64,
        copy_bytes_per_sec: u64,
        task: u64,
    ) -> Result<Vec<u64>, Status> {
        let _admin = self.admin.lock().await;
        let (map, _) = self.store.load(true).await?;
        if map.version == 0 {
            return Err(Status::failed_precondition(
                "the cluster is not initialized: run `ordoctl init` first",
            ));
        }
        let rate = match copy_bytes_per_sec {
            0 => self.copy_bytes_per_sec,
            r => r,
        };
        let ids = update_records(&*self.store, |list| {
            let moves = plan_move(&map, list, slots, to)?;
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
                    copy_bytes_per_sec: rate,
                    task_id: task,
                    ..Default::default()
                });
                ids.push(id);
            }
            if let Some(t) = list.tasks.iter_mut().find(|t| t.id == task) {
                t.migrations.extend(&ids);
            }
            forget_oldest(&mut list.migrations, FINISHED_KEPT, |m| !in_flight(m));
            Ok(ids)
        })
        .await?;
        tracing::info!(?ids, to, slots = slots.len(), task, "migrations recorded");
        Ok(ids)
    }

    /// Asks for an abort; the mover (this replica's, or the resumer) carries it out.
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
        let _driving = {
            let mut p = self.progress.lock().unwrap();
            if p.contains_key(&id) {
                return Err(Status::failed_precondition(format!(
                    "migration {id} is already being driven"
                )));
            }
            p.insert(id, m.clone());
            Driving {
                progress: &self.progress,
                id,
            }
        };
        self.drive_inner(m, resumed).await
    }

    async fn drive_inner(&self, m: Migration, resumed: bool) -> Result<Migration, Status> {
        let stop = match MigrationState::try_from(m.state) {
            Ok(MigrationState::Copying) if !resumed && !m.abort_requested => {
                match self.copy_and_cut_over(&m).await {
                    Ok(()) => return self.finish(&m).await,
                    Err(stop) => stop,
                }
            }
            Ok(MigrationState::Copying | MigrationState::Fenced) => {
                Stop::Abort(if m.abort_requested {
                    "aborted on request".into()
                } else {
                    "the config leader changed during the move; the new leader aborts it".into()
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
}
