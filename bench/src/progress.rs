//! What a run shows while it runs: a progress bar, or a line per second when stderr is not a
//! terminal.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::run::Plan;

/// A progress bar of `len` steps drawn with `template`; hidden when `quiet` (or when stderr is
/// not a terminal, which indicatif detects).
pub fn bar(len: u64, quiet: bool, template: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// The live progress bar (or, when stderr is not a terminal, a line per second): phase, ops/s and
/// p99 of the last second.
pub async fn show_progress(plan: Arc<Plan>, total: Duration, quiet: bool) {
    let progress = bar(
        total.as_secs().max(1),
        quiet,
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len}s {msg}",
    );
    let lines = !quiet && progress.is_hidden();
    let mut tick =
        tokio::time::interval_at(plan.start + Duration::from_secs(1), Duration::from_secs(1));
    let (mut ok_before, mut failed_before) = (0, 0);
    loop {
        let now = tick.tick().await;
        let ok = plan.live.ok.load(Ordering::Relaxed);
        let failed = plan.live.failed.load(Ordering::Relaxed);
        let p99 = {
            let mut w = plan.live.window.lock().expect("window lock");
            let p = (!w.is_empty()).then(|| w.value_at_quantile(0.99) as f64 / 1000.0);
            w.reset();
            p
        };
        let phase = if now <= plan.measure_from {
            "warm-up"
        } else {
            "measure"
        };
        let msg = format!(
            "{phase}: {} ops/s, p99 {}, {} failed/s",
            ok - ok_before,
            p99.map_or_else(|| "-".to_string(), |p| format!("{p:.2} ms")),
            failed - failed_before
        );
        let secs = now.saturating_duration_since(plan.start).as_secs();
        progress.set_position(secs.min(total.as_secs()));
        progress.set_message(msg.clone());
        if lines {
            eprintln!("[{secs:>4}s] {msg}");
        }
        (ok_before, failed_before) = (ok, failed);
        if now >= plan.stop_at {
            progress.finish_and_clear();
        }
    }
}
