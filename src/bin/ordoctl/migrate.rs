//! Resharding commands: `rebalance`, `group drain` and `migrations [abort]`. The moves run as a
//! task that the command follows (`tasks.rs`).

use ordo::proto::v1::start_task_request::Task as What;
use ordo::proto::v1::RebalanceRequest;

use crate::args::{GroupDrainArgs, MigrationsArgs, MigrationsCommand, MoveOptions, RebalanceArgs};
use crate::render::{render_map_change, render_migrations, render_plan};
use crate::{tasks, Endpoints, Failure};

/// Spreads the slots evenly over the groups: shows the plan, then moves one range at a time.
pub(crate) async fn rebalance_cmd(
    ep: &Endpoints,
    a: RebalanceArgs,
    json: bool,
) -> Result<(), Failure> {
    rebalance(ep, 0, a.dry_run, a.moves, json).await
}

/// Moves every slot off a group, as a rebalance that leaves the group out.
pub(crate) async fn drain(ep: &Endpoints, a: GroupDrainArgs, json: bool) -> Result<(), Failure> {
    rebalance(ep, a.id, false, a.moves, json).await
}

/// `migrations` lists them; `migrations abort <id>` aborts one and shows it.
pub(crate) async fn migrations(
    ep: &Endpoints,
    a: MigrationsArgs,
    json: bool,
) -> Result<(), Failure> {
    let list = match a.command {
        None => ep.admin()?.list_migrations().await?.migrations,
        Some(MigrationsCommand::Abort(a)) => vec![ep.admin()?.abort_migration(a.id).await?],
    };
    println!("{}", render_migrations(&list, json));
    Ok(())
}

/// The plan (unless `--json` without `--dry-run`), then the moves, run as a task that this
/// command follows with its progress, then the migrations done and the new map.
async fn rebalance(
    ep: &Endpoints,
    drain: u64,
    dry_run: bool,
    moves: MoveOptions,
    json: bool,
) -> Result<(), Failure> {
    let req = RebalanceRequest {
        dry_run: true,
        drain_group: drain,
        slots_per_move: moves.slots_per_move,
        copy_bytes_per_sec: moves.copy_bytes_per_sec,
    };
    let c = &ep.admin()?;
    let plan = c.rebalance(req).await?;
    if !json || dry_run {
        println!("{}", render_plan(&plan.plan, json));
    }
    if dry_run || plan.plan.is_empty() {
        return Ok(());
    }
    let what = What::Rebalance(RebalanceRequest {
        dry_run: false,
        ..req
    });
    let (task, list) = tasks::run(c, what, json).await?;
    println!(
        "{}",
        render_migrations(&tasks::migrations_of(&task, &list), json)
    );
    if !json {
        println!(
            "{}",
            render_map_change(&c.get_shard_map(true).await?, false)
        );
    }
    Ok(())
}
