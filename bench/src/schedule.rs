//! When requests are sent, and what their latency is measured from.
//!
//! Closed loop: each of `--clients` workers sends its next request when the previous one
//! answered; latency is the service time. Open loop (`--rate R`): requests are due at fixed
//! times, request `i` at `i / R` seconds after the start, dealt round-robin to the workers
//! (worker `w` sends requests `w, w + W, w + 2W, ...`). A worker that falls behind sends its
//! overdue requests at once, and their latency is measured from the time they were **due**
//! (their intended start), not from when they were sent. That is the correction for coordinated
//! omission: a stall of the server shows up in every request that should have been sent during
//! it, as a real client population would see it, instead of in one slow request only.

use std::time::Duration;

/// How requests are paced.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pacing {
    /// Back to back, one in flight per worker.
    Closed,
    /// `rate` requests per second in total, over all workers.
    Open { rate: f64 },
}

impl Pacing {
    /// When the `k`-th request of worker `worker` (of `workers`) is due, after the start; `None`
    /// in closed loop (due whenever the worker is free).
    pub fn due(self, k: u64, worker: u64, workers: u64) -> Option<Duration> {
        match self {
            Pacing::Closed => None,
            Pacing::Open { rate } => {
                let index = k as f64 * workers as f64 + worker as f64;
                Some(Duration::from_secs_f64(index / rate))
            }
        }
    }
}

/// The latency to record for a request sent at `sent` and answered at `done`, both measured from
/// the start; `due` is when it should have been sent (open loop). Open loop measures from `due`
/// (which is never after `sent`): time spent waiting behind a slow request counts.
pub fn latency(due: Option<Duration>, sent: Duration, done: Duration) -> Duration {
    let from = due.map_or(sent, |due| due.min(sent));
    done.saturating_sub(from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_loop_spreads_the_rate_evenly_over_the_workers() {
        let p = Pacing::Open { rate: 1000.0 };
        // 4 workers, 1000/s: globally one request every millisecond, round-robin.
        let mut all: Vec<Duration> = (0..4)
            .flat_map(|w| (0..250).map(move |k| p.due(k, w, 4).unwrap()))
            .collect();
        all.sort();
        for (i, due) in all.iter().enumerate() {
            let want = Duration::from_micros(1000 * i as u64);
            assert!(
                due.abs_diff(want) < Duration::from_nanos(10),
                "{i}: {due:?}"
            );
        }
        // Each worker sends every 4 ms.
        assert_eq!(
            p.due(1, 2, 4).unwrap() - p.due(0, 2, 4).unwrap(),
            Duration::from_millis(4)
        );
        assert_eq!(Pacing::Closed.due(5, 0, 4), None);
    }

    #[test]
    fn open_loop_latency_counts_from_the_intended_start() {
        let ms = Duration::from_millis;
        // On time: due 10, sent 10, done 12 → 2 ms.
        assert_eq!(latency(Some(ms(10)), ms(10), ms(12)), ms(2));
        // A 100 ms stall: the request due at 20 could only be sent at 110 and took 1 ms; it
        // waited 90 ms for its turn, so its latency is 91 ms, not 1 ms.
        assert_eq!(latency(Some(ms(20)), ms(110), ms(111)), ms(91));
        // Closed loop counts the service time only.
        assert_eq!(latency(None, ms(110), ms(111)), ms(1));
        // Sending a hair early (timer granularity) never inflates the latency.
        assert_eq!(latency(Some(ms(30)), ms(29), ms(31)), ms(2));
    }

    #[test]
    fn a_stall_shows_in_every_request_due_during_it() {
        // 1 worker at 1000/s; the server stalls 50 ms on request 0, then answers in 0.
        let p = Pacing::Open { rate: 1000.0 };
        let mut clock = Duration::ZERO;
        let mut lat = Vec::new();
        for k in 0..100 {
            let due = p.due(k, 0, 1).unwrap();
            let sent = clock.max(due);
            let done = sent
                + if k == 0 {
                    Duration::from_millis(50)
                } else {
                    Duration::ZERO
                };
            lat.push(latency(Some(due), sent, done));
            clock = done;
        }
        // Requests 0..50 were all delayed by the stall: 50, 49, ..., 1 ms.
        assert_eq!(lat[0], Duration::from_millis(50));
        assert_eq!(lat[10], Duration::from_millis(40));
        assert_eq!(lat.iter().filter(|l| !l.is_zero()).count(), 50);
        assert!(lat[50..].iter().all(|l| l.is_zero()));
    }
}
