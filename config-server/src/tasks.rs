//! Admin tasks: moves, rebalances and drains, membership changes (audit H2). Each is recorded in
//! the config group (beside the migration records, in `MigrationList.tasks`) before it starts,
//! and runs in a task spawned by the config leader, never inside the RPC handler that asked for
//! it, so a caller that cancels or times out changes nothing. `StartTask` answers at once with
//! the record; `MoveSlots`, `Rebalance` and `ChangeGroupReplicas` start one and wait for its end.
//!
//! A move task runs its planned moves in order, one migration per move (the mover drives it to
//! DONE or ABORTED, with the config server's own call deadlines). The resumer (every
//! [`RESUME_EVERY`], on the config leader) starts a runner for each running task that no runner
//! of this replica holds, so a new config leader resumes every one: the migration in flight is
//! finished if the map cut it over and aborted otherwise (see `migration/`), and an aborted move
//! is started again; the remaining moves follow. A membership change that a new leader finds
//! running is ended FAILED: the group's leader ran or refused it, and whether to ask again is the
//! operator's call. Migrations in flight that no running task owns are driven to an end alone.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use ordo_proto::v1::start_task_request::Task as What;
use ordo_proto::v1::*;
use tonic::{Code, Status};

use crate::migration::{
    forget_oldest, in_flight, plan_move, plan_rebalance, update_records, RESUME_EVERY,
};
use crate::{ConfigService, MapStore};

/// Finished tasks kept in the records for `ordoctl tasks` (the oldest are forgotten). Few: a
/// task keeps its plan (up to every slot, ~8 KiB), and the records are one item of the config
/// group, rewritten at every step and bounded like any value (1 MiB).
pub const TASKS_FINISHED_KEPT: usize = 16;

/// Whether `t` is still running.
pub fn task_running(t: &Task) -> bool {
    t.state == TaskState::Running as i32
}

/// The state's name as `ordoctl` shows it.
pub fn task_state_name(state: i32) -> &'static str {
    match TaskState::try_from(state) {
        Ok(TaskState::Running) => "running",
        Ok(TaskState::Done) => "done",
        Ok(TaskState::Failed) => "failed",
        Ok(TaskState::Aborted) => "aborted",
        _ => "unknown",
    }
}

/// The kind's name as `ordoctl` shows it.
pub fn task_kind_name(kind: i32) -> &'static str {
    match TaskKind::try_from(kind) {
        Ok(TaskKind::MoveSlots) => "move-slots",
        Ok(TaskKind::Rebalance) => "rebalance",
        Ok(TaskKind::Drain) => "drain",
        Ok(TaskKind::ChangeReplicas) => "replica change",
        _ => "unknown",
    }
}

/// What the waiting RPCs answer for a finished task: the task if DONE, else its error.
pub fn task_outcome(t: Task) -> Result<Task, Status> {
    match TaskState::try_from(t.state) {
        Ok(TaskState::Done) => Ok(t),
        _ => Err(Status::new(Code::from(t.error_code), t.error)),
    }
}

use ordo_proto::unix_ms as now_ms;

/// The tasks that runners of this replica hold now.
#[derive(Default)]
pub(crate) struct Runners(Mutex<HashSet<u64>>);

/// A runner's hold on its task, given back however the runner ends (an error, a panic), so the
/// resumer never skips a task nobody runs.
pub(crate) struct Held {
    runners: Arc<Runners>,
    id: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.runners.0.lock().unwrap().remove(&self.id);
    }
}

impl Runners {
    /// The hold on task `id`, unless a runner has it.
    fn hold(self: &Arc<Self>, id: u64) -> Option<Held> {
        self.0.lock().unwrap().insert(id).then(|| Held {
            runners: self.clone(),
            id,
        })
    }

    fn holds(&self, id: u64) -> bool {
        self.0.lock().unwrap().contains(&id)
    }
}

/// How a task ended.
#[derive(Clone)]
enum Ended {
    Done(Option<ChangeGroupReplicasResponse>),
    Failed(Status),
    Aborted(String),
}

impl Ended {
    fn apply(self, t: &mut Task) {
        let (state, code, error) = match self {
            // A move task whose moves all ran, some of them failing (the first recorded why).
            Ended::Done(_) if !t.error.is_empty() => {
                (TaskState::Failed, Code::from(t.error_code), t.error.clone())
            }
            Ended::Done(result) => {
                t.change_result = result;
                (TaskState::Done, Code::Ok, String::new())
            }
            Ended::Failed(s) => (TaskState::Failed, s.code(), s.message().to_string()),
            Ended::Aborted(why) => (TaskState::Aborted, Code::Aborted, why),
        };
        t.state = state as i32;
        t.error_code = code as i32;
        t.error = error;
        t.finished_unix_ms = now_ms();
    }
}

/// A refusal of a move's start that retrying would not change.
fn refusal(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::FailedPrecondition | Code::InvalidArgument | Code::NotFound
    )
}

fn find_task_mut(list: &mut MigrationList, id: u64) -> Result<&mut Task, Status> {
    list.tasks
        .iter_mut()
        .find(|t| t.id == id)
        .ok_or_else(|| Status::not_found(format!("no task {id}")))
}

fn find_task(list: &MigrationList, id: u64) -> Result<&Task, Status> {
    list.tasks
        .iter()
        .find(|t| t.id == id)
        .ok_or_else(|| Status::not_found(format!("no task {id}")))
}

impl<S: MapStore> ConfigService<S> {
    /// Checks `what`, records the task (state RUNNING) and starts its runner; the record. In a
    /// task of its own, so that a caller who goes away mid-call cannot leave a recorded task
    /// without its runner.
    pub(crate) async fn start_task(&self, what: What) -> Result<Task, Status> {
        let svc = self.clone();
        tokio::spawn(async move { svc.record_task(what).await })
            .await
            .map_err(|e| Status::internal(format!("starting the task failed: {e}")))?
    }

    async fn record_task(&self, what: What) -> Result<Task, Status> {
        // Held until the runner holds the task, so the resumer cannot start a second runner.
        let _admin = self.admin.lock().await;
        let mut proto = Task {
            state: TaskState::Running as i32,
            ..Default::default()
        };
        let map = match &what {
            What::ChangeReplicas(c) => {
                if c.change.is_none() {
                    return Err(Status::invalid_argument("change is missing"));
                }
                self.change_addrs(c.group_id).await?;
                proto.kind = TaskKind::ChangeReplicas as i32;
                proto.change = Some(c.clone());
                None
            }
            What::MoveSlots(m) => {
                proto.kind = TaskKind::MoveSlots as i32;
                proto.copy_bytes_per_sec = m.copy_bytes_per_sec;
                Some(self.load_initialized().await?.0)
            }
            What::Rebalance(r) => {
                if r.dry_run {
                    return Err(Status::invalid_argument(
                        "a dry run starts no task: call Rebalance with dry_run for the plan",
                    ));
                }
                proto.kind = match r.drain_group {
                    0 => TaskKind::Rebalance,
                    _ => TaskKind::Drain,
                } as i32;
                proto.drain_group = r.drain_group;
                proto.copy_bytes_per_sec = r.copy_bytes_per_sec;
                Some(self.load_initialized().await?.0)
            }
        };
        let task = update_records(&*self.store, |list| {
            let mut t = proto.clone();
            if let Some(map) = &map {
                t.plan = plan_for(&what, map, list)?;
            }
            t.id = list.next_task_id.max(1);
            list.next_task_id = t.id + 1;
            t.started_unix_ms = now_ms();
            list.tasks.push(t.clone());
            forget_oldest(&mut list.tasks, TASKS_FINISHED_KEPT, |t| !task_running(t));
            Ok(t)
        })
        .await?;
        tracing::info!(
            task = task.id,
            kind = task_kind_name(task.kind),
            moves = task.plan.len(),
            "task recorded"
        );
        let held = self
            .runners
            .hold(task.id)
            .ok_or_else(|| Status::internal(format!("task {} is already held", task.id)))?;
        self.spawn_runner(held, false);
        Ok(task)
    }

    /// Waits for task `id` to end (on this replica's copy of the records); its outcome.
    pub(crate) async fn wait_task(&self, id: u64) -> Result<Task, Status> {
        let mut changes = self.store.changes();
        loop {
            let (list, _) = self.store.load_migrations(false).await?;
            let t = find_task(&list, id)?;
            if !task_running(t) {
                return task_outcome(t.clone());
            }
            if self.store.stopped() {
                return Err(Status::unavailable(format!(
                    "this config server stopped; task {id} goes on under the config leader \
                     (`ordoctl tasks` follows it)"
                )));
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() {
                    return Err(Status::unavailable("this config server stopped"));
                },
                () = tokio::time::sleep(RESUME_EVERY) => {}
            }
        }
    }

    /// Asks a move task to stop: no further move starts, and its migration in flight aborts if
    /// it is before its cut-over.
    pub(crate) async fn abort_task(&self, id: u64) -> Result<Task, Status> {
        update_records(&*self.store, |list| {
            let t = find_task_mut(list, id)?;
            if !task_running(t) {
                return Err(Status::failed_precondition(format!(
                    "task {id} is {} and can no longer be aborted",
                    task_state_name(t.state)
                )));
            }
            if t.kind == TaskKind::ChangeReplicas as i32 {
                return Err(Status::failed_precondition(format!(
                    "task {id} is a membership change, which cannot be aborted: it ends by \
                     itself, at the latest after its catch-up timeout"
                )));
            }
            t.abort_requested = true;
            let t = t.clone();
            for m in list.migrations.iter_mut().filter(|m| m.task_id == id) {
                if matches!(
                    MigrationState::try_from(m.state),
                    Ok(MigrationState::Copying | MigrationState::Fenced)
                ) {
                    m.abort_requested = true;
                }
            }
            Ok(t)
        })
        .await
    }

    /// Runs the held task in a task of its own. An error leaves it running in the records: the
    /// resumer starts it again (here or on the next config leader).
    fn spawn_runner(&self, held: Held, resumed: bool) {
        let svc = self.clone();
        tokio::spawn(async move {
            let id = held.id;
            if let Err(e) = svc.run_task(id, resumed).await {
                tracing::warn!(task = id, error = %e, "task left to be resumed");
            }
            drop(held);
        });
    }

    async fn run_task(&self, id: u64, resumed: bool) -> Result<(), Status> {
        let (list, _) = self.store.load_migrations(true).await?;
        let t = find_task(&list, id)?.clone();
        if !task_running(&t) {
            return Ok(());
        }
        if t.kind == TaskKind::ChangeReplicas as i32 {
            return self.run_change(t, resumed).await;
        }
        self.run_moves(id, resumed).await
    }

    /// The membership change, then its record; see the module docs for a resumed one.
    async fn run_change(&self, t: Task, resumed: bool) -> Result<(), Status> {
        let ended = match t.change.clone() {
            _ if resumed => Ended::Failed(Status::aborted(
                "the config leader changed while the change ran, so its outcome was not \
                 recorded; `ordoctl status` shows the group's replicas: run the command again if \
                 it is not done",
            )),
            None => Ended::Failed(Status::internal("the task records no change")),
            Some(req) => match self.change_replicas(req).await {
                Ok(mut r) => {
                    r.task_id = t.id;
                    Ended::Done(Some(r))
                }
                Err(e) => Ended::Failed(e),
            },
        };
        self.end_task(t.id, ended).await
    }

    /// The moves of task `id`, one after another, to the end of its plan (or an abort, or an
    /// error). `resumed`: the migration found in flight was left by an earlier runner.
    async fn run_moves(&self, id: u64, mut resumed: bool) -> Result<(), Status> {
        loop {
            let (list, _) = self.store.load_migrations(true).await?;
            let t = find_task(&list, id)?;
            if !task_running(t) {
                return Ok(());
            }
            let mut ids: Vec<u64> = list
                .migrations
                .iter()
                .filter(|m| m.task_id == id && in_flight(m))
                .map(|m| m.id)
                .collect();
            if ids.is_empty() {
                resumed = false;
                if t.abort_requested {
                    return self
                        .end_task(id, Ended::Aborted("aborted on request".into()))
                        .await;
                }
                let Some(mv) = t.plan.get(t.moves_done as usize).cloned() else {
                    return self.end_task(id, Ended::Done(None)).await;
                };
                if self.moved_already(&mv).await? {
                    self.next_move(id, None).await?;
                    continue;
                }
                let rate = t.copy_bytes_per_sec;
                match self
                    .migrations
                    .start(&mv.slots, mv.to_group, rate, id)
                    .await
                {
                    Ok(started) => ids = started,
                    Err(e) if refusal(&e) => {
                        self.next_move(id, Some(e)).await?;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let failed = self.drive_all(&ids, resumed).await;
            if let Some(ended) = self.after_move(id, &ids, failed, resumed).await? {
                return self.end_task(id, ended).await;
            }
            resumed = false;
        }
    }

    /// Whether every slot of `mv` is its recipient's already (the move ended, but the runner that
    /// drove it did not record so).
    async fn moved_already(&self, mv: &PlannedMove) -> Result<bool, Status> {
        let (map, _) = self.store.load(true).await?;
        Ok(mv
            .slots
            .iter()
            .all(|s| map.slot_owner.get(*s as usize) == Some(&mv.to_group)))
    }

    /// Drives the migrations of one move in turn; after the first that fails the others are
    /// aborted. The first error.
    async fn drive_all(&self, ids: &[u64], resumed: bool) -> Option<Status> {
        for (i, id) in ids.iter().enumerate() {
            if let Err(e) = self.migrations.drive(*id, resumed).await {
                for rest in &ids[i + 1..] {
                    let _ = self.migrations.request_abort(*rest).await;
                    let _ = self.migrations.drive(*rest, resumed).await;
                }
                return Some(e);
            }
        }
        None
    }

    /// What the end of one move's migrations means for task `id`: go on (`None`: the next move,
    /// also after a move that failed, which is recorded and makes the task FAILED at its end; or
    /// the same move again when a resumed runner's leader change aborted it), or end the task
    /// (an abort was asked for). An error when a migration is still in flight (the task is left
    /// to be resumed).
    async fn after_move(
        &self,
        id: u64,
        ids: &[u64],
        failed: Option<Status>,
        resumed: bool,
    ) -> Result<Option<Ended>, Status> {
        let (list, _) = self.store.load_migrations(true).await?;
        let ms: Vec<&Migration> = ids
            .iter()
            .filter_map(|i| list.migrations.iter().find(|m| m.id == *i))
            .collect();
        if ms.iter().any(|m| in_flight(m)) {
            return Err(failed.unwrap_or_else(|| {
                Status::unavailable(format!("a migration of task {id} is still in flight"))
            }));
        }
        let Some(first_aborted) = ms
            .iter()
            .find(|m| m.state == MigrationState::Aborted as i32)
        else {
            self.next_move(id, None).await?;
            return Ok(None);
        };
        let why = failed.unwrap_or_else(|| Status::aborted(first_aborted.error.clone()));
        if find_task(&list, id)?.abort_requested || first_aborted.abort_requested {
            return Ok(Some(Ended::Aborted(why.message().to_string())));
        }
        if resumed {
            tracing::info!(
                task = id,
                "starting again the move a config leader change aborted"
            );
            return Ok(None);
        }
        // The other moves are independent of this one (a transient refusal, such as a lock the
        // fence waited for too long, spoils one move only): the task goes on with them.
        self.next_move(id, Some(why)).await?;
        Ok(None)
    }

    /// Counts the current move of task `id` done; `failed`, it failed so (the task keeps the
    /// first such error and ends FAILED with it once its other moves ran).
    async fn next_move(&self, id: u64, failed: Option<Status>) -> Result<(), Status> {
        update_records(&*self.store, |list| {
            let t = find_task_mut(list, id)?;
            if let Some(e) = failed.as_ref().filter(|_| t.error.is_empty()) {
                t.error = format!(
                    "move {} of {} failed: {}",
                    t.moves_done + 1,
                    t.plan.len(),
                    e.message()
                );
                t.error_code = e.code() as i32;
            }
            t.moves_done += 1;
            Ok(())
        })
        .await?;
        if let Some(e) = failed {
            tracing::warn!(task = id, error = %e.message(), "a move of the task failed; going on with the next");
        }
        Ok(())
    }

    async fn end_task(&self, id: u64, ended: Ended) -> Result<(), Status> {
        let t = update_records(&*self.store, |list| {
            let t = find_task_mut(list, id)?;
            ended.clone().apply(t);
            Ok(t.clone())
        })
        .await?;
        tracing::info!(
            task = id,
            state = task_state_name(t.state),
            error = %t.error,
            "task ended"
        );
        Ok(())
    }

    /// Every [`RESUME_EVERY`] until the replica stops: on the config leader, starts a runner for
    /// each running task none holds, and drives alone each migration in flight that no running
    /// task owns.
    pub(crate) fn spawn_resumer(&self) {
        let svc = self.clone();
        tokio::spawn(async move {
            while !svc.store.stopped() {
                tokio::time::sleep(RESUME_EVERY).await;
                let Ok((list, _)) = svc.store.load_migrations(true).await else {
                    continue; // not the config leader
                };
                svc.resume(&list).await;
            }
        });
    }

    async fn resume(&self, list: &MigrationList) {
        let running: HashSet<u64> = list
            .tasks
            .iter()
            .filter(|t| task_running(t))
            .map(|t| t.id)
            .collect();
        for t in list.tasks.iter().filter(|t| task_running(t)) {
            if self.runners.holds(t.id) {
                continue;
            }
            // A task being started is held before `start_task` lets go of the admin lock.
            let _admin = self.admin.lock().await;
            let Some(held) = self.runners.hold(t.id) else {
                continue;
            };
            tracing::warn!(
                task = t.id,
                kind = task_kind_name(t.kind),
                "resuming a task no runner holds"
            );
            self.spawn_runner(held, true);
        }
        for m in list
            .migrations
            .iter()
            .filter(|m| in_flight(m) && !running.contains(&m.task_id))
        {
            if !self.migrations.driving(m.id) {
                self.migrations.resume_orphan(m);
            }
        }
    }
}

/// The moves a move or rebalance task plans, checked against the map and the migrations in
/// flight (nothing is recorded when they refuse).
fn plan_for(what: &What, map: &ShardMap, list: &MigrationList) -> Result<Vec<PlannedMove>, Status> {
    Ok(match what {
        What::ChangeReplicas(_) => Vec::new(),
        What::MoveSlots(m) => plan_move(map, list, &m.slots, m.to_group)?,
        What::Rebalance(r) => {
            if let Some(t) = list.tasks.iter().find(|t| {
                task_running(t)
                    && matches!(
                        TaskKind::try_from(t.kind),
                        Ok(TaskKind::Rebalance | TaskKind::Drain)
                    )
            }) {
                return Err(Status::failed_precondition(format!(
                    "task {} ({}) is running; wait for it (`ordoctl tasks`) or abort it \
                     (`ordoctl tasks abort {}`)",
                    t.id,
                    task_kind_name(t.kind),
                    t.id
                )));
            }
            let drain = (r.drain_group != 0).then_some(r.drain_group);
            plan_rebalance(map, drain, r.slots_per_move)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map;

    fn map(groups: &[u64]) -> ShardMap {
        let gs = groups
            .iter()
            .map(|id| Group {
                id: *id,
                replicas: vec![],
            })
            .collect();
        map::initial_map(8, gs, vec![]).unwrap()
    }

    fn task(id: u64, kind: TaskKind, state: TaskState) -> Task {
        Task {
            id,
            kind: kind as i32,
            state: state as i32,
            ..Default::default()
        }
    }

    #[test]
    fn a_rebalance_is_refused_while_another_runs_and_a_move_is_not() {
        let mut m = map(&[1]);
        m = map::add_group(
            &m,
            Group {
                id: 2,
                replicas: vec![],
            },
        );
        let mut list = MigrationList::default();
        list.tasks
            .push(task(3, TaskKind::Drain, TaskState::Running));
        let rebalance = What::Rebalance(RebalanceRequest::default());
        let err = plan_for(&rebalance, &m, &list).unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(
            err.message().contains("task 3 (drain) is running"),
            "{err:?}"
        );
        let mv = What::MoveSlots(MoveSlotsRequest {
            slots: vec![0, 1],
            to_group: 2,
            ..Default::default()
        });
        let plan = plan_for(&mv, &m, &list).unwrap();
        assert_eq!((plan.len(), plan[0].from_group), (1, 1));
        list.tasks[0].state = TaskState::Aborted as i32;
        assert_eq!(plan_for(&rebalance, &m, &list).unwrap().len(), 1);
    }

    #[test]
    fn only_finished_tasks_are_forgotten_oldest_first() {
        let mut tasks: Vec<Task> = (1..=5)
            .map(|id| {
                let state = if id == 2 {
                    TaskState::Running
                } else {
                    TaskState::Done
                };
                task(id, TaskKind::MoveSlots, state)
            })
            .collect();
        forget_oldest(&mut tasks, 2, |t| !task_running(t));
        let ids: Vec<u64> = tasks.iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![2, 4, 5]);
    }

    #[test]
    fn a_finished_task_answers_with_its_recorded_status() {
        let mut t = task(1, TaskKind::ChangeReplicas, TaskState::Running);
        Ended::Failed(Status::failed_precondition("would lose quorum")).apply(&mut t);
        let e = task_outcome(t.clone()).unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (Code::FailedPrecondition, "would lose quorum")
        );
        assert!(t.finished_unix_ms > 0 && !task_running(&t));
        let mut t = task(2, TaskKind::Rebalance, TaskState::Running);
        Ended::Done(None).apply(&mut t);
        assert_eq!(task_outcome(t.clone()).unwrap().error_code, 0);
        // A move task whose moves ran, one of them failing, ends FAILED with that error.
        t.error = "move 1 of 3 failed: locked".into();
        t.error_code = Code::Aborted as i32;
        Ended::Done(None).apply(&mut t);
        let e = task_outcome(t).unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (Code::Aborted, "move 1 of 3 failed: locked")
        );
    }
}
