//! The one way a test waits for the system: poll a condition under a named bound, then fail
//! saying what it waited for. Tests never sleep to synchronise.

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

/// How often [`wait_for`] polls.
pub const POLL: Duration = Duration::from_millis(25);

/// Polls `probe` every [`POLL`] until it yields a value or `bound` passes; then panics naming
/// `what`.
pub async fn wait_for<T, F, Fut>(what: &str, bound: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_for_every(what, bound, POLL, probe).await
}

/// [`wait_for`] polling every `every` (e.g. 1 ms to catch a short window).
pub async fn wait_for_every<T, F, Fut>(
    what: &str,
    bound: Duration,
    every: Duration,
    mut probe: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let polled = poll_until(what, bound, every, || {
        let next = probe();
        async move { next.await.ok_or(()) }
    })
    .await;
    polled.unwrap_or_else(|e| panic!("{e}"))
}

/// A wait that ran out of time, with what the last poll said.
#[derive(Debug)]
pub struct TimedOut<E> {
    pub what: String,
    pub bound: Duration,
    pub last: E,
}

impl<E: fmt::Debug> fmt::Display for TimedOut<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "timed out after {:?} waiting for {}",
            self.bound, self.what
        )?;
        if std::mem::size_of::<E>() != 0 {
            write!(f, "; last: {:?}", self.last)?;
        }
        Ok(())
    }
}

impl<E: fmt::Debug> std::error::Error for TimedOut<E> {}

/// Polls `probe` every `every` until it yields `Ok` or `bound` passes; then the last `Err`, for
/// tests that report a timeout themselves (with a seed and a trace) instead of panicking.
pub async fn poll_until<T, E, F, Fut>(
    what: &str,
    bound: Duration,
    every: Duration,
    mut probe: F,
) -> Result<T, TimedOut<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    loop {
        let last = match probe().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if start.elapsed() >= bound {
            return Err(TimedOut {
                what: what.to_string(),
                bound,
                last,
            });
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wait_returns_the_value_or_says_what_it_waited_for() {
        let mut n = 0;
        let v = wait_for_every(
            "three polls",
            Duration::from_secs(5),
            Duration::ZERO,
            || {
                n += 1;
                let n = n;
                async move { (n == 3).then_some(n) }
            },
        )
        .await;
        assert_eq!(v, 3);
        let e = poll_until(
            "never",
            Duration::from_millis(30),
            Duration::from_millis(5),
            || async { Err::<(), _>("not yet") },
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "timed out after 30ms waiting for never; last: \"not yet\""
        );
    }
}
