//! One worker of the measured run: closed or open loop, measuring every request it sends.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::time::Instant;

use crate::ops::{self, Draw};
use crate::report::Recorder;
use crate::run::Plan;
use crate::schedule;
use crate::workload::{KeyChooser, XorShift64};

/// One worker: closed loop (next request when the previous answered) or open loop (requests due
/// on the schedule of [`Pacing::due`]). Returns what it measured and, in open loop, how many due
/// requests it never got to send before the end.
pub async fn worker(plan: Arc<Plan>, id: u64) -> (Recorder, u64) {
    let mut draw = Draw {
        rng: XorShift64::new(plan.seed, id),
        chooser: KeyChooser::new(
            plan.distribution,
            plan.world.existing.load(Ordering::Relaxed),
        ),
    };
    let mut recorder = Recorder::default();
    let mut unsent = 0;
    let mut k = 0;
    loop {
        let due = plan.pacing.due(k, id, plan.workers).map(|d| plan.start + d);
        k += 1;
        let now = Instant::now();
        if plan.interrupted.load(Ordering::Relaxed) {
            break;
        }
        match due {
            Some(due) if due >= plan.stop_at => break,
            Some(due) if now >= plan.stop_at => {
                // Behind schedule at the end: count what was due but never sent.
                let mut due = due;
                let mut k2 = k;
                while due < plan.stop_at {
                    unsent += 1;
                    due = plan.start + plan.pacing.due(k2, id, plan.workers).expect("open");
                    k2 += 1;
                }
                break;
            }
            Some(due) => tokio::time::sleep_until(due).await,
            None if now >= plan.stop_at => break,
            None => {}
        }
        let sent = Instant::now();
        let op = plan.mix.pick(&mut draw.rng);
        let result = ops::execute(&plan.backend, &plan.world, op, &mut draw).await;
        let done = Instant::now();
        let latency = schedule::latency(
            due.map(|d| d - plan.start),
            sent - plan.start,
            done - plan.start,
        );
        let service = done - sent;
        match &result {
            Ok(()) => {
                plan.live.ok.fetch_add(1, Ordering::Relaxed);
                plan.live
                    .window
                    .lock()
                    .expect("window lock")
                    .saturating_record(latency.as_micros().max(1) as u64);
            }
            Err(_) => {
                plan.live.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        if due.unwrap_or(sent) < plan.measure_from {
            continue;
        }
        let second = done.saturating_duration_since(plan.measure_from).as_secs();
        let stats = recorder.op(op);
        match result {
            Ok(()) => {
                stats.record_ok(latency, service);
                plan.timeline
                    .lock()
                    .expect("timeline lock")
                    .record(second, op, Some(latency));
            }
            Err(kind) => {
                stats.record_err(&kind);
                plan.timeline
                    .lock()
                    .expect("timeline lock")
                    .record(second, op, None);
            }
        }
    }
    (recorder, unsent)
}
