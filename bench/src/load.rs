//! The load phase: the records (or orders) a run reads and updates, inserted before it starts
//! and not measured.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::bail;
use futures::future::join_all;
use tokio::time::Instant;

use crate::args::Args;
use crate::backend::Backend;
use crate::ops::{self, World};
use crate::progress::bar;

/// Inserts records `0..records` (or creates orders `0..records`) with `--clients` tasks.
pub async fn load(
    args: &Args,
    backend: &Backend,
    world: &World,
    records: u64,
    orders: bool,
) -> anyhow::Result<()> {
    let what = if orders { "orders" } else { "records" };
    let progress = bar(
        records,
        args.quiet,
        &format!(
            "load  [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {what} {{per_sec}} {{msg}}"
        ),
    );
    let failed = AtomicU64::new(0);
    let first_error = Mutex::new(None::<String>);
    let task = |_: usize| async {
        loop {
            let n = world.next_new.fetch_add(1, Ordering::Relaxed);
            if n >= records {
                break;
            }
            let result = if orders {
                ops::create_order(backend, world, n).await
            } else {
                ops::insert_record(backend, world, n).await
            };
            if let Err(kind) = result {
                failed.fetch_add(1, Ordering::Relaxed);
                first_error.lock().expect("lock").get_or_insert(kind);
            }
            progress.inc(1);
        }
    };
    let started = Instant::now();
    join_all((0..args.clients.max(1)).map(task)).await;
    progress.finish_and_clear();
    world.loaded(records);
    world.existing.store(records, Ordering::Relaxed);
    let failed = failed.load(Ordering::Relaxed);
    if !args.quiet {
        eprintln!(
            "loaded {} {what} in {:.1} s{}",
            records - failed,
            started.elapsed().as_secs_f64(),
            if failed > 0 {
                format!(", {failed} failed")
            } else {
                String::new()
            }
        );
    }
    if failed == records {
        bail!(
            "every load request failed (first error: {}); is the target up?",
            first_error
                .lock()
                .expect("lock")
                .clone()
                .unwrap_or_default()
        );
    }
    Ok(())
}
