//! A member's credits on the router (pure: no I/O, the time is an input).
//!
//! The member grants credits to the router (`Join.credits`, then each `Credit`); the router
//! keeps them in a pool and lends them to the member's node streams (one per shard group) only
//! where events wait for them (`waiting = n`). Each stream's `outstanding` is what it was lent
//! minus the deliveries it sent minus what it gave back (`returned = n` after a `Reclaim`, or
//! all of it when it ends), so at every step
//!
//! `pool + Σ outstanding = credits the member granted − deliveries it was sent`
//!
//! and the member never has more in flight than it granted. When a stream waits, the pool is
//! empty and streams that wait for nothing hold credits, those are asked to give them back, at
//! most once per [`RECLAIM_EVERY`] each: a member granting one credit at a time never starves
//! while events wait in some shard group.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

/// Least time between two `Reclaim`s sent to one stream, and after a grant to it (its credits
/// may be on their way to events it reported).
pub const RECLAIM_EVERY: Duration = Duration::from_millis(50);

/// What the ledger asks of a node stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lend {
    Grant(u64, u32),
    Reclaim(u64),
}

#[derive(Debug, Default)]
struct Stream {
    outstanding: u32,
    /// What the node last said waits for credits, and what was lent since (toward it).
    waiting: u32,
    lent_since_report: u32,
    /// The last grant or reclaim sent to it.
    touched: Option<Instant>,
    reclaimed: Option<Instant>,
}

impl Stream {
    fn needs(&self) -> u32 {
        self.waiting.saturating_sub(self.lent_since_report)
    }
}

/// One member's credits: the pool and the streams that are up (joined), by shard group.
#[derive(Debug, Default)]
pub(crate) struct Credits {
    pool: u32,
    streams: BTreeMap<u64, Stream>,
    /// Where the next round of grants starts (so no stream always comes first).
    turn: usize,
}

impl Credits {
    pub(crate) fn new(pool: u32) -> Credits {
        Credits {
            pool,
            ..Credits::default()
        }
    }

    /// Credits the member holds: in the pool or lent.
    pub(crate) fn held(&self) -> u64 {
        u64::from(self.pool)
            + self
                .streams
                .values()
                .map(|s| u64::from(s.outstanding))
                .sum::<u64>()
    }

    #[cfg(test)]
    pub(crate) fn pool(&self) -> u32 {
        self.pool
    }

    #[cfg(test)]
    pub(crate) fn outstanding(&self, group: u64) -> Option<u32> {
        self.streams.get(&group).map(|s| s.outstanding)
    }

    /// The member granted `n` more (the caller checked the bound on [`Credits::held`]).
    pub(crate) fn add(&mut self, n: u32) {
        self.pool = self.pool.saturating_add(n);
    }

    /// `group`'s stream joined: it holds nothing yet.
    pub(crate) fn up(&mut self, group: u64) {
        if let Some(old) = self.streams.insert(group, Stream::default()) {
            self.pool = self.pool.saturating_add(old.outstanding);
        }
    }

    /// `group`'s stream ended or was dropped: what it held is the pool's again.
    pub(crate) fn down(&mut self, group: u64) {
        if let Some(old) = self.streams.remove(&group) {
            self.pool = self.pool.saturating_add(old.outstanding);
        }
    }

    /// A delivery on `group`'s stream: whether it was within what the stream was lent (one
    /// that was not must not reach the member; its event comes again after its lease).
    pub(crate) fn delivered(&mut self, group: u64) -> bool {
        match self.streams.get_mut(&group) {
            Some(s) if s.outstanding > 0 => {
                s.outstanding -= 1;
                s.waiting = s.waiting.saturating_sub(1);
                s.lent_since_report = s.lent_since_report.saturating_sub(1);
                true
            }
            _ => false,
        }
    }

    /// `group`'s stream gave `n` back after a reclaim (it has none left). Never more than it
    /// was lent is taken back into the pool.
    pub(crate) fn returned(&mut self, group: u64, n: u32) {
        if let Some(s) = self.streams.get_mut(&group) {
            let n = n.min(s.outstanding);
            s.outstanding -= n;
            s.lent_since_report = s.lent_since_report.saturating_sub(n);
            self.pool = self.pool.saturating_add(n);
        }
    }

    /// `group`'s node says `n` events wait for credits there.
    pub(crate) fn waiting(&mut self, group: u64, n: u32) {
        if let Some(s) = self.streams.get_mut(&group) {
            s.waiting = n;
            s.lent_since_report = 0;
        }
    }

    /// What to send now: grants from the pool to the streams that wait (a fair share each,
    /// never more than a stream waits for), then, if some stream still waits with the pool
    /// empty, reclaims from streams that hold credits and wait for nothing.
    pub(crate) fn plan(&mut self, now: Instant) -> Vec<Lend> {
        let mut out = Vec::new();
        let groups: Vec<u64> = self.streams.keys().copied().collect();
        if !groups.is_empty() {
            self.turn = (self.turn + 1) % groups.len();
        }
        let order: Vec<u64> = groups[self.turn..]
            .iter()
            .chain(&groups[..self.turn])
            .copied()
            .collect();
        loop {
            let needy = order
                .iter()
                .filter(|g| self.streams[*g].needs() > 0)
                .count() as u32;
            if needy == 0 || self.pool == 0 {
                break;
            }
            let share = (self.pool / needy).max(1);
            for g in &order {
                let s = self.streams.get_mut(g).expect("listed");
                let n = s.needs().min(share).min(self.pool);
                if n == 0 {
                    continue;
                }
                self.pool -= n;
                s.outstanding += n;
                s.lent_since_report += n;
                s.touched = Some(now);
                out.push(Lend::Grant(*g, n));
            }
        }
        let starved = self.streams.values().any(|s| s.needs() > 0);
        if starved && self.pool == 0 {
            for (&g, s) in self.streams.iter_mut() {
                let recent = |t: Option<Instant>| t.is_some_and(|t| now < t + RECLAIM_EVERY);
                if s.waiting == 0 && s.outstanding > 0 && !recent(s.touched) && !recent(s.reclaimed)
                {
                    s.reclaimed = Some(now);
                    out.push(Lend::Reclaim(g));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(plan: &[Lend]) -> Vec<(u64, u32)> {
        plan.iter()
            .filter_map(|l| match *l {
                Lend::Grant(g, n) => Some((g, n)),
                Lend::Reclaim(_) => None,
            })
            .collect()
    }

    #[test]
    fn credits_go_where_events_wait_and_never_past_the_pool() {
        let now = Instant::now();
        let mut c = Credits::new(10);
        c.up(1);
        c.up(2);
        assert!(c.plan(now).is_empty(), "nothing waits");
        c.waiting(1, 3);
        assert_eq!(grants(&c.plan(now)), [(1, 3)]);
        c.waiting(2, 100);
        assert_eq!(grants(&c.plan(now)), [(2, 7)]);
        assert_eq!((c.pool(), c.held()), (0, 10));
        // Deliveries use them up; a delivery past what was lent is refused.
        for _ in 0..3 {
            assert!(c.delivered(1));
        }
        assert!(!c.delivered(1));
        assert_eq!(c.held(), 7);
        // A stream that ends gives its credits back to the pool.
        c.down(2);
        assert_eq!((c.pool(), c.held()), (7, 7));
    }

    #[test]
    fn a_waiting_stream_reclaims_from_one_that_waits_for_nothing() {
        let t0 = Instant::now();
        let mut c = Credits::new(1);
        c.up(1);
        c.up(2);
        c.waiting(1, 1);
        assert_eq!(c.plan(t0), [Lend::Grant(1, 1)]);
        // Its event went elsewhere: it holds the credit and waits for nothing.
        c.waiting(1, 0);
        c.waiting(2, 4);
        // Not right after the grant, then once per RECLAIM_EVERY.
        assert!(c.plan(t0).is_empty());
        let t1 = t0 + RECLAIM_EVERY;
        assert_eq!(c.plan(t1), [Lend::Reclaim(1)]);
        assert!(c.plan(t1 + RECLAIM_EVERY / 2).is_empty());
        c.returned(1, 1);
        assert_eq!(grants(&c.plan(t1)), [(2, 1)]);
        assert_eq!((c.outstanding(1), c.outstanding(2)), (Some(0), Some(1)));
    }

    #[test]
    fn one_credit_takes_turns_between_waiting_streams() {
        let now = Instant::now();
        let mut c = Credits::new(1);
        c.up(1);
        c.up(2);
        c.waiting(1, 5);
        c.waiting(2, 5);
        let mut got = Vec::new();
        for _ in 0..6 {
            let g = grants(&c.plan(now));
            assert_eq!(g.len(), 1, "{g:?}");
            got.push(g[0].0);
            assert!(c.delivered(g[0].0));
            c.add(1);
        }
        assert!(got.contains(&1) && got.contains(&2), "{got:?}");
        assert_eq!(c.held(), 1);
    }
}
