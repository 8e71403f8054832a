//! `--rebalance-at`: online resharding while the load runs (with `--playground`).

use std::time::Duration;

use anyhow::{ensure, Context};
use ordo::playground::PlaygroundConfig;
use tokio::time::Instant;

/// What `--rebalance-at` did.
pub struct Rebalance {
    /// The new group's nodes, stopped with the playground.
    pub nodes: Vec<ordo::node::Node>,
    pub summary: String,
}

/// Waits until `at` into the measurement, starts group `group`, registers it and rebalances
/// onto it; reports the window (seconds since the measurement started) and each move.
pub async fn rebalance_during_run(
    cfg: PlaygroundConfig,
    config_addrs: Vec<String>,
    group: u64,
    replicas: u64,
    measure_from: Instant,
    at: Duration,
) -> anyhow::Result<Rebalance> {
    tokio::time::sleep_until(measure_from + at).await;
    let since = |t: Instant| t.saturating_duration_since(measure_from).as_secs_f64();
    let began = Instant::now();
    let (nodes, spec) = ordo::playground::start_extra_group(&cfg, group, replicas).await?;
    let cc = ordo_proto::client::ClusterClient::connect(config_addrs)?
        .with_timeout(Duration::from_secs(300));
    let mut added = None;
    for _ in 0..60 {
        match cc
            .add_group(ordo_proto::v1::AddGroupRequest {
                group: Some(spec.clone()),
            })
            .await
        {
            Ok(m) => {
                added = Some(m);
                break;
            }
            // The new group may not have elected its leader yet.
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    ensure!(added.is_some(), "group {group} could not be registered");
    let moving = Instant::now();
    let r = cc
        .rebalance(ordo_proto::v1::RebalanceRequest::default())
        .await
        .context("rebalance")?;
    let done = Instant::now();
    let mut summary = format!(
        "rebalance onto group {group}: group started at {:.1}s, moves from {:.1}s to {:.1}s ({} moves)",
        since(began),
        since(moving),
        since(done),
        r.migrations.len()
    );
    let mut pauses: Vec<u64> = r.migrations.iter().map(|m| m.pause_ms).collect();
    for m in &r.migrations {
        summary.push_str(&format!(
            "\n  migration {}: {} slots {}->{}, {} items + {} log records, pause {} ms, {} cleaned",
            m.id,
            m.slots.len(),
            m.from_group,
            m.to_group,
            m.items_copied,
            m.log_records,
            m.pause_ms,
            m.items_cleaned
        ));
    }
    pauses.sort_unstable();
    if let Some(max) = pauses.last() {
        summary.push_str(&format!("\n  pause max {max} ms"));
    }
    Ok(Rebalance { nodes, summary })
}
