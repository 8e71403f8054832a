//! Admin tasks from the command line: the commands that change the cluster at length
//! (`move-slots`, `rebalance`, `group drain`, `replica ...`) start a task on the config leader and
//! then follow it by polling `ListMigrations`, with a progress line on stderr. There is no
//! overall deadline: `--timeout` bounds each poll, and Ctrl-C stops following, not the task.
//! `tasks` lists them, `tasks abort <id>` stops one.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ordo::proto::v1::start_task_request::Task as What;
use ordo::proto::v1::{Migration, MigrationList, Task};
use ordo_config::migration::{in_flight, state_name};
use ordo_config::tasks::{task_kind_name, task_outcome, task_running};
use ordo_proto::client::ClusterClient;

use crate::args::{TasksArgs, TasksCommand};
use crate::render::render_tasks;
use crate::{Endpoints, Failure};

/// How often a followed task is polled.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);
/// Polls in a row that may fail (a config leader change costs a few) before following gives up
/// (about a minute: the task goes on regardless).
const FOLLOW_FAILURES_MAX: u32 = 120;

/// `tasks` lists them; `tasks abort <id>` stops one and shows it.
pub(crate) async fn tasks(ep: &Endpoints, a: TasksArgs, json: bool) -> Result<(), Failure> {
    let list = match a.command {
        None => ep.admin()?.list_migrations().await?.tasks,
        Some(TasksCommand::Abort(a)) => vec![ep.admin()?.abort_task(a.id).await?],
    };
    println!("{}", render_tasks(&list, json));
    Ok(())
}

/// Starts `what` and follows it to its end: the finished task and the records then (its
/// migrations among them), or the task's error.
pub(crate) async fn run(
    c: &ClusterClient,
    what: What,
    json: bool,
) -> Result<(Task, MigrationList), Failure> {
    let task = c.start_task(what).await?;
    let id = task.id;
    if !json {
        eprintln!(
            "task {id} ({}) started on the config leader; following it (Ctrl-C stops following, \
             not the task: `ordoctl tasks abort {id}` stops it)",
            task_kind_name(task.kind)
        );
    }
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut seen = HashMap::new();
    let mut failures = 0;
    let started = Instant::now();
    loop {
        tokio::select! {
            _ = &mut ctrl_c => {
                eprintln!();
                return Err(anyhow::anyhow!(
                    "stopped following task {id}; it goes on: `ordoctl tasks` shows it, \
                     `ordoctl tasks abort {id}` stops it"
                )
                .into());
            }
            () = tokio::time::sleep(FOLLOW_EVERY) => {}
        }
        // A config replica that has not applied the start yet does not list the task.
        let polled = c.list_migrations().await.map(|list| {
            let t = list.tasks.iter().find(|t| t.id == id).cloned();
            (t, list)
        });
        let (t, list) = match polled {
            Ok((Some(t), list)) => (t, list),
            Ok((None, _)) | Err(_) if failures + 1 < FOLLOW_FAILURES_MAX => {
                failures += 1;
                continue;
            }
            Ok((None, _)) => return Err(anyhow::anyhow!("task {id} is not listed").into()),
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "could not follow task {id} ({e}); it goes on: `ordoctl tasks` shows it"
                )
                .into())
            }
        };
        failures = 0;
        if !task_running(&t) {
            if !json {
                eprintln!();
            }
            return Ok((task_outcome(t)?, list));
        }
        if !json {
            let line = progress(&t, &list, &mut seen, started.elapsed());
            eprint!("\r{line}      ");
        }
    }
}

/// The migrations of `t`, in order.
pub(crate) fn migrations_of(t: &Task, list: &MigrationList) -> Vec<Migration> {
    t.migrations
        .iter()
        .filter_map(|id| list.migrations.iter().find(|m| m.id == *id).cloned())
        .collect()
}

/// One progress line: the task, its move, and its migration in flight, with its copy rate since
/// this command first saw it (`seen`: when, and the bytes copied then).
fn progress(
    t: &Task,
    list: &MigrationList,
    seen: &mut HashMap<u64, (Instant, u64)>,
    elapsed: Duration,
) -> String {
    let mut line = format!("task {} ({})", t.id, task_kind_name(t.kind));
    if !t.plan.is_empty() {
        let current = (t.moves_done as usize + 1).min(t.plan.len());
        line += &format!(": move {current}/{}", t.plan.len());
    }
    let live = list
        .migrations
        .iter()
        .find(|m| m.task_id == t.id && in_flight(m));
    match live {
        Some(m) => {
            let (since, bytes) = *seen
                .entry(m.id)
                .or_insert_with(|| (Instant::now(), m.bytes_copied));
            let rate = (m.bytes_copied - bytes) as f64 / since.elapsed().as_secs_f64().max(0.001);
            line += &format!(", {}", migration_line(m, rate));
        }
        None => line += &format!(", {:.0}s", elapsed.as_secs_f64()),
    }
    line
}

/// `migration 7 (512 slots 1→3): 1200 items, 640 KiB copied, 12 log records, 320 KiB/s,
/// copying`, at a copy rate of `bytes_per_sec`.
fn migration_line(m: &Migration, bytes_per_sec: f64) -> String {
    format!(
        "migration {} ({} slots {}→{}): {} items, {} KiB copied, {} log records, {:.0} KiB/s, {}",
        m.id,
        m.slots.len(),
        m.from_group,
        m.to_group,
        m.items_copied,
        m.bytes_copied / 1024,
        m.log_records,
        bytes_per_sec / 1024.0,
        state_name(m.state)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ordo::proto::v1::{MigrationState, PlannedMove, TaskKind, TaskState};

    #[test]
    fn progress_line_shows_the_move_and_its_copy() {
        let m = Migration {
            id: 7,
            slots: vec![0, 1, 2],
            from_group: 1,
            to_group: 3,
            state: MigrationState::Copying as i32,
            items_copied: 10,
            bytes_copied: 4096,
            log_records: 6,
            task_id: 2,
            ..Default::default()
        };
        assert_eq!(
            migration_line(&m, 2048.0),
            "migration 7 (3 slots 1→3): 10 items, 4 KiB copied, 6 log records, 2 KiB/s, copying"
        );
        let t = Task {
            id: 2,
            kind: TaskKind::Rebalance as i32,
            state: TaskState::Running as i32,
            plan: vec![PlannedMove::default(); 3],
            moves_done: 1,
            migrations: vec![7],
            ..Default::default()
        };
        let list = MigrationList {
            migrations: vec![m],
            ..Default::default()
        };
        let line = progress(&t, &list, &mut HashMap::new(), Duration::ZERO);
        assert!(
            line.starts_with("task 2 (rebalance): move 2/3, migration 7 (3 slots 1→3)"),
            "{line}"
        );
        assert_eq!(migrations_of(&t, &list).len(), 1);
        let idle = progress(
            &Task {
                kind: TaskKind::ChangeReplicas as i32,
                ..t
            },
            &MigrationList::default(),
            &mut HashMap::new(),
            Duration::from_secs(3),
        );
        assert_eq!(idle, "task 2 (replica change): move 2/3, 3s");
    }
}
