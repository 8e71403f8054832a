//! Resharding commands: `rebalance`, `group drain` and `migrations [abort]`, plus the progress
//! line that `move-slots` and the rebalancing commands show on stderr while slots move.

use std::future::Future;
use std::time::{Duration, Instant};

use ordo::proto::v1::{Migration, RebalanceRequest};
use ordo_config::migration::{in_flight, state_name};
use ordo_proto::client::ClusterClient;

use crate::args::{GroupDrainArgs, MigrationsArgs, MigrationsCommand, MoveOptions, RebalanceArgs};
use crate::render::{render_map_change, render_migrations, render_plan};
use crate::{Endpoints, Failure};

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

/// The plan (unless `--json` without `--dry-run`), then the moves with their progress, then the
/// migrations done and the new map.
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
    let done = with_progress(
        c,
        json,
        c.rebalance(RebalanceRequest {
            dry_run: false,
            ..req
        }),
    )
    .await?;
    println!("{}", render_migrations(&done.migrations, json));
    if let Some(map) = &done.map {
        if !json {
            println!("{}", render_map_change(map, false));
        }
    }
    Ok(())
}

/// Runs `call` (a move, a rebalance) while printing the progress of the migration in flight on
/// stderr every half second: items and bytes copied, rate, state. Silent with `--json`.
///
/// A plain `\r` line rather than an `indicatif` bar: indicatif draws nothing when stderr is not
/// a terminal, and this line also lands in the logs of scripts that run long moves.
pub(crate) async fn with_progress<T>(
    c: &ClusterClient,
    json: bool,
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let started = Instant::now();
    let watch = async {
        if json {
            return std::future::pending::<()>().await;
        }
        // Bounded by the call: this future is dropped when it completes.
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let Ok(list) = c.list_migrations().await else {
                continue;
            };
            let live: Vec<_> = list.migrations.iter().filter(|m| in_flight(m)).collect();
            let secs = started.elapsed().as_secs_f64().max(0.001);
            for m in live {
                eprint!("\r{}      ", progress_line(m, secs));
            }
        }
    };
    let r = tokio::select! {
        r = call => r,
        _ = watch => unreachable!("the progress loop never ends"),
    };
    if !json {
        eprintln!();
    }
    r
}

/// One progress line: `migration 7 (512 slots 1→3): 1200 items, 640 KiB copied, 12 log records,
/// 320 KiB/s, copying`, the rate over `secs` since the call began.
fn progress_line(m: &Migration, secs: f64) -> String {
    format!(
        "migration {} ({} slots {}→{}): {} items, {} KiB copied, {} log records, {:.0} KiB/s, {}",
        m.id,
        m.slots.len(),
        m.from_group,
        m.to_group,
        m.items_copied,
        m.bytes_copied / 1024,
        m.log_records,
        m.bytes_copied as f64 / 1024.0 / secs,
        state_name(m.state)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ordo::proto::v1::MigrationState;

    #[test]
    fn progress_line_shows_copy_and_rate() {
        let m = Migration {
            id: 7,
            slots: vec![0, 1, 2],
            from_group: 1,
            to_group: 3,
            state: MigrationState::Copying as i32,
            items_copied: 10,
            bytes_copied: 4096,
            log_records: 6,
            ..Default::default()
        };
        assert_eq!(
            progress_line(&m, 2.0),
            "migration 7 (3 slots 1→3): 10 items, 4 KiB copied, 6 log records, 2 KiB/s, copying"
        );
    }
}
