//! Fault injection for in-process clusters: a [`LinkFilter`] on the replicas' outgoing raft
//! traffic (the seam the product's transport offers, as TiKV's `transport_simulate` filters
//! its transport).
//!
//! Tests build one [`FaultNet`] per raft group, share it (an `Arc`) between the in-process
//! replicas of that group through `NodeConfig::link_filter`, and change it while the group
//! runs. Production nodes pass `None`.
//!
//! For every raft message a replica sends (and every snapshot transfer it starts), the transport
//! asks [`LinkFilter::fate`] what happens to it:
//! - a **partition** is a set of blocked directed links `from → to`, so asymmetric partitions
//!   (A hears B but B does not hear A), an isolated node and a bridge (A–B and B–C connected,
//!   A–C cut) are all just sets of rules ([`FaultNet::block`], [`FaultNet::isolate`],
//!   [`FaultNet::bridge`]);
//! - **link faults** ([`LinkFaults`]) drop, delay or duplicate messages at random, from the
//!   net's own seeded generator. Each delayed copy is delivered on its own timer, so random
//!   delays also **reorder** messages.
//!
//! A delayed message is checked against the partition again when its timer fires (a link cut
//! meanwhile loses it) and is lost if its sender has stopped. Delayed messages are bounded
//! ([`DELAYED_MESSAGES_MAX`] across the net; beyond it they are dropped), like every other
//! queue. Messages already handed to a peer's stream are in flight and are not recalled.
//!
//! The decisions are random but seeded, so a schedule replays the same kind of faults; the exact
//! interleaving with the replicas' own timers is not reproducible (they run on wall-clock time).
//! Crashes are not this module's job: a test stops a `Node` and starts it again on its data dir.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

pub use ordo::{Fate, LinkFilter};

use crate::rng::SplitMix64;

/// Raft messages a net holds back for delayed delivery, across all its links; beyond it,
/// delayed messages are dropped.
pub const DELAYED_MESSAGES_MAX: usize = 4096;

/// Random faults applied to every link that is not blocked. Probabilities are in `[0, 1]` and
/// are tried in the order drop, duplicate, delay.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkFaults {
    pub drop: f64,
    pub duplicate: f64,
    pub delay: f64,
    /// Delays (and the gap before a duplicate) are uniform in `[0, delay_max]`.
    pub delay_max: Duration,
}

impl LinkFaults {
    pub const NONE: LinkFaults = LinkFaults {
        drop: 0.0,
        duplicate: 0.0,
        delay: 0.0,
        delay_max: Duration::ZERO,
    };
}

/// What the net did so far (for test reports, and to prove faults were really injected).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    pub delivered: u64,
    pub blocked: u64,
    pub dropped: u64,
    pub delayed: u64,
    pub duplicated: u64,
    /// Delayed copies lost because too many were pending, their link was cut meanwhile or their
    /// sender stopped.
    pub delayed_lost: u64,
    pub snapshots_refused: u64,
}

/// The shared fault state of one group's in-process replicas. See the module docs.
pub struct FaultNet {
    inner: Mutex<Inner>,
    delayed_pending: AtomicUsize,
    delivered: AtomicU64,
    blocked: AtomicU64,
    dropped: AtomicU64,
    delayed: AtomicU64,
    duplicated: AtomicU64,
    delayed_lost: AtomicU64,
    snapshots_refused: AtomicU64,
}

struct Inner {
    rng: SplitMix64,
    blocked: BTreeSet<(u64, u64)>,
    link: LinkFaults,
}

impl fmt::Debug for FaultNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("FaultNet")
            .field("blocked", &inner.blocked)
            .field("link", &inner.link)
            .field("stats", &self.stats())
            .finish()
    }
}

impl FaultNet {
    /// A healthy net whose random decisions come from `seed`.
    pub fn new(seed: u64) -> FaultNet {
        FaultNet {
            inner: Mutex::new(Inner {
                rng: SplitMix64(seed),
                blocked: BTreeSet::new(),
                link: LinkFaults::NONE,
            }),
            delayed_pending: AtomicUsize::new(0),
            delivered: AtomicU64::new(0),
            blocked: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            delayed_lost: AtomicU64::new(0),
            snapshots_refused: AtomicU64::new(0),
        }
    }

    // A test that panicked while holding the lock must not wedge every replica's transport.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Cuts the directed link `from → to` (messages `to → from` still pass).
    pub fn block(&self, from: u64, to: u64) {
        self.lock().blocked.insert((from, to));
    }

    pub fn unblock(&self, from: u64, to: u64) {
        self.lock().blocked.remove(&(from, to));
    }

    /// Cuts every link between the sets `a` and `b`, both ways.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        let mut inner = self.lock();
        for &x in a {
            for &y in b {
                if x != y {
                    inner.blocked.insert((x, y));
                    inner.blocked.insert((y, x));
                }
            }
        }
    }

    /// Cuts `node` off from every other node of `all`, both ways.
    pub fn isolate(&self, node: u64, all: &[u64]) {
        self.partition(&[node], all);
    }

    /// Bridge partition: `a`–`bridge` and `bridge`–`c` stay connected, `a`–`c` is cut both ways.
    pub fn bridge(&self, a: u64, bridge: u64, c: u64) {
        debug_assert!(a != bridge && bridge != c && a != c);
        self.partition(&[a], &[c]);
    }

    /// Sets the random faults of every link (replacing the previous ones).
    pub fn set_link_faults(&self, link: LinkFaults) {
        self.lock().link = link;
    }

    /// Removes every partition rule and link fault. Delayed messages still pending are delivered.
    pub fn heal(&self) {
        let mut inner = self.lock();
        inner.blocked.clear();
        inner.link = LinkFaults::NONE;
    }

    /// The blocked directed links, in order.
    pub fn blocked_links(&self) -> Vec<(u64, u64)> {
        self.lock().blocked.iter().copied().collect()
    }

    pub fn stats(&self) -> FaultStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FaultStats {
            delivered: get(&self.delivered),
            blocked: get(&self.blocked),
            dropped: get(&self.dropped),
            delayed: get(&self.delayed),
            duplicated: get(&self.duplicated),
            delayed_lost: get(&self.delayed_lost),
            snapshots_refused: get(&self.snapshots_refused),
        }
    }

    /// Delayed copies not yet delivered or lost.
    pub fn delayed_pending(&self) -> usize {
        self.delayed_pending.load(Ordering::Acquire)
    }
}

impl LinkFilter for FaultNet {
    /// Decides the fate of one raft message `from → to`. A `Delay` or `Duplicate` verdict has
    /// already reserved a slot among the delayed messages: the caller must call
    /// [`LinkFilter::delayed_done`] once the delayed copy is delivered or lost.
    fn fate(&self, from: u64, to: u64) -> Fate {
        let fate = {
            let mut inner = self.lock();
            if inner.blocked.contains(&(from, to)) {
                self.blocked.fetch_add(1, Ordering::Relaxed);
                return Fate::Drop;
            }
            let link = inner.link;
            if link == LinkFaults::NONE {
                Fate::Deliver
            } else if inner.rng.chance(link.drop) {
                Fate::Drop
            } else if inner.rng.chance(link.duplicate) {
                Fate::Duplicate(inner.rng.duration(link.delay_max))
            } else if inner.rng.chance(link.delay) {
                Fate::Delay(inner.rng.duration(link.delay_max))
            } else {
                Fate::Deliver
            }
        };
        let fate = match fate {
            Fate::Delay(_) | Fate::Duplicate(_) => {
                let held = self.delayed_pending.fetch_add(1, Ordering::AcqRel);
                if held >= DELAYED_MESSAGES_MAX {
                    self.delayed_pending.fetch_sub(1, Ordering::AcqRel);
                    self.delayed_lost.fetch_add(1, Ordering::Relaxed);
                    match fate {
                        Fate::Duplicate(_) => Fate::Deliver,
                        _ => Fate::Drop,
                    }
                } else {
                    fate
                }
            }
            f => f,
        };
        let counter = match fate {
            Fate::Deliver => &self.delivered,
            Fate::Drop => &self.dropped,
            Fate::Delay(_) => &self.delayed,
            Fate::Duplicate(_) => &self.duplicated,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        fate
    }

    /// Releases the slot of a delayed copy. `delivered: false` counts it as lost.
    fn delayed_done(&self, delivered: bool) {
        self.delayed_pending.fetch_sub(1, Ordering::AcqRel);
        if !delivered {
            self.delayed_lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Decides whether a snapshot transfer `from → to` may start now, and after how long. A
    /// refused transfer is reported to raft as failed (it retries later).
    fn snapshot_fate(&self, from: u64, to: u64) -> Option<Duration> {
        let mut inner = self.lock();
        let refuse = inner.blocked.contains(&(from, to)) || {
            let p = inner.link.drop;
            inner.rng.chance(p)
        };
        if refuse {
            self.snapshots_refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let link = inner.link;
        Some(if inner.rng.chance(link.delay) {
            inner.rng.duration(link.delay_max)
        } else {
            Duration::ZERO
        })
    }

    fn is_blocked(&self, from: u64, to: u64) -> bool {
        self.lock().blocked.contains(&(from, to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_directed_rules() {
        let net = FaultNet::new(1);
        net.block(1, 2);
        assert_eq!(net.fate(1, 2), Fate::Drop);
        assert_eq!(net.fate(2, 1), Fate::Deliver);
        net.heal();
        net.bridge(1, 2, 3);
        assert_eq!(net.blocked_links(), vec![(1, 3), (3, 1)]);
        assert_eq!(net.fate(1, 2), Fate::Deliver);
        assert_eq!(net.fate(2, 3), Fate::Deliver);
        net.heal();
        net.isolate(2, &[1, 2, 3]);
        assert_eq!(net.blocked_links(), vec![(1, 2), (2, 1), (2, 3), (3, 2)]);
        assert!(net.snapshot_fate(2, 1).is_none());
        let stats = net.stats();
        assert_eq!((stats.blocked, stats.snapshots_refused), (1, 1));
    }

    #[test]
    fn link_faults_follow_the_seed_and_delays_are_bounded() {
        let run = |seed| {
            let net = FaultNet::new(seed);
            net.set_link_faults(LinkFaults {
                drop: 0.2,
                duplicate: 0.2,
                delay: 0.5,
                delay_max: Duration::from_millis(40),
            });
            (0..2000).map(|_| net.fate(1, 2)).collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7), "same seed, same decisions");
        assert_ne!(a, run(8));
        let count = |f: fn(&Fate) -> bool| a.iter().filter(|x| f(x)).count();
        assert!(count(|f| *f == Fate::Drop) > 300);
        assert!(count(|f| matches!(f, Fate::Duplicate(_))) > 200);
        assert!(count(|f| matches!(f, Fate::Delay(_))) > 400);
        assert!(a.iter().all(|f| match f {
            Fate::Delay(d) | Fate::Duplicate(d) => *d <= Duration::from_millis(40),
            _ => true,
        }));
    }

    #[test]
    fn too_many_delayed_messages_are_dropped_not_held() {
        let net = FaultNet::new(3);
        net.set_link_faults(LinkFaults {
            delay: 1.0,
            delay_max: Duration::from_millis(10),
            ..LinkFaults::NONE
        });
        for _ in 0..DELAYED_MESSAGES_MAX {
            assert!(matches!(net.fate(1, 2), Fate::Delay(_)));
        }
        assert_eq!(net.fate(1, 2), Fate::Drop);
        assert_eq!(net.delayed_pending(), DELAYED_MESSAGES_MAX);
        net.delayed_done(true);
        assert!(matches!(net.fate(1, 2), Fate::Delay(_)));
    }

    /// Through the product's transport: an isolated leader loses its group, which elects
    /// another; healed, the old leader rejoins and the group converges.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_isolated_leader_is_replaced_through_the_transport() {
        use crate::cluster::Cluster;
        use crate::inproc::{Filter, InProcGroup, INPROC_GROUP};
        let _heavy = crate::HEAVY.lock().await;
        let bound = Duration::from_secs(30);
        let net = std::sync::Arc::new(FaultNet::new(5));
        let g = InProcGroup::start(3, 64, Some(net.clone() as Filter))
            .await
            .unwrap();
        let old = g.wait_leader(INPROC_GROUP, bound).await;
        let old_term = g.term(old.id);
        net.isolate(old.id, &g.ids());
        crate::wait::wait_for("another leader", bound, || {
            let others = g.nodes.iter().filter(|(id, _)| **id != old.id);
            let led = others
                .map(|(_, n)| crate::inproc::raft_role(n))
                .any(|(leads, term)| leads && term > old_term);
            async move { led.then_some(()) }
        })
        .await;
        net.heal();
        g.client().put("k", "", "v", None).await.unwrap();
        let (_, items, _) = g.converged(bound).await.unwrap();
        assert_eq!(items, 1);
        let stats = net.stats();
        assert!(stats.blocked > 0 && stats.delivered > 0, "{stats:?}");
        g.shutdown().await;
    }
}
