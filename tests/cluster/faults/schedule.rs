//! The seeded fault schedules: what faults, on which role, when. A seed always gives the same
//! schedule.

use std::fmt;
use std::time::Duration;

use ordo_testkit::faults::LinkFaults;
use ordo_testkit::SplitMix64;

use super::WARMUP;

/// A node named by its role at the moment the fault starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Target {
    Leader,
    /// A node that is not the leader, picked when the fault starts.
    Follower,
}

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Fault {
    /// Every link to and from the node cut.
    Isolate(Target),
    /// Only the node's outgoing (`out`) or incoming links cut: an asymmetric partition.
    OneWay { node: Target, out: bool },
    /// The two nodes other than `bridge` cannot talk to each other; both still reach `bridge`.
    Bridge { bridge: Target },
    /// Every link cut: no quorum anywhere.
    SplitAll,
    /// Random drops, delays (hence reordering) and duplicates on every link.
    Lossy(LinkFaults),
    /// The node stops (clean process crash) and restarts on its data dir when the episode ends.
    Crash(Target),
}

/// Faults applied together at `start_ms` (after the warm-up) and undone `len_ms` later: the net
/// healed, crashed nodes restarted.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Episode {
    pub(super) start_ms: u64,
    pub(super) len_ms: u64,
    pub(super) faults: Vec<Fault>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Schedule {
    pub(super) seed: u64,
    pub(super) fault_ms: u64,
    pub(super) episodes: Vec<Episode>,
}

fn lossy(rng: &mut SplitMix64) -> LinkFaults {
    LinkFaults {
        drop: rng.range(2, 30) as f64 / 100.0,
        duplicate: rng.range(0, 20) as f64 / 100.0,
        delay: rng.range(0, 60) as f64 / 100.0,
        delay_max: Duration::from_millis(rng.range(5, 120)),
    }
}

impl Schedule {
    /// Whether it partitions the group, loses messages and crashes a replica, each at least
    /// once.
    pub(crate) fn partitions_loses_and_crashes(&self) -> bool {
        let any = |f: fn(&Fault) -> bool| self.episodes.iter().flat_map(|e| &e.faults).any(f);
        any(|f| {
            matches!(
                f,
                Fault::Isolate(_) | Fault::OneWay { .. } | Fault::Bridge { .. } | Fault::SplitAll
            )
        }) && any(|f| matches!(f, Fault::Lossy(_)))
            && any(|f| matches!(f, Fault::Crash(_)))
    }

    /// The same seed and length always give the same schedule.
    pub(crate) fn generate(seed: u64, fault_ms: u64) -> Schedule {
        let mut rng = SplitMix64(seed);
        let target = |rng: &mut SplitMix64| {
            if rng.chance(0.6) {
                Target::Leader
            } else {
                Target::Follower
            }
        };
        let mut episodes = Vec::new();
        let mut t = 0;
        while t < fault_ms {
            let start_ms = t + rng.range(50, 300);
            let mut faults = Vec::new();
            // Partitions mostly outlast an election (0.5–1 s timeouts, plus a pre-vote round),
            // so that a new leader is elected while the old one may still believe it leads.
            let len_ms = match rng.range(0, 99) {
                0..=19 => {
                    faults.push(Fault::Isolate(target(&mut rng)));
                    rng.range(600, 2_000)
                }
                20..=29 => {
                    faults.push(Fault::OneWay {
                        node: target(&mut rng),
                        out: rng.chance(0.5),
                    });
                    rng.range(600, 2_000)
                }
                30..=44 => {
                    faults.push(Fault::Bridge {
                        bridge: target(&mut rng),
                    });
                    rng.range(600, 2_000)
                }
                45..=49 => {
                    faults.push(Fault::SplitAll);
                    rng.range(300, 1_500)
                }
                50..=64 => {
                    faults.push(Fault::Lossy(lossy(&mut rng)));
                    rng.range(300, 1_500)
                }
                65..=84 => {
                    faults.push(Fault::Crash(target(&mut rng)));
                    rng.range(200, 1_500)
                }
                _ => {
                    // A crash and a partition at once: the group may have no quorum at all.
                    faults.push(Fault::Crash(Target::Follower));
                    faults.push(Fault::Isolate(Target::Leader));
                    rng.range(300, 1_500)
                }
            };
            if !matches!(faults[0], Fault::Lossy(_)) && rng.chance(0.3) {
                faults.push(Fault::Lossy(lossy(&mut rng)));
            }
            episodes.push(Episode {
                start_ms,
                len_ms,
                faults,
            });
            t = start_ms + len_ms;
        }
        Schedule {
            seed,
            fault_ms,
            episodes,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Leader => "the leader",
            Target::Follower => "a follower",
        })
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Isolate(t) => write!(f, "isolate {t}"),
            Fault::OneWay { node, out: true } => write!(f, "cut the outgoing links of {node}"),
            Fault::OneWay { node, out: false } => write!(f, "cut the incoming links of {node}"),
            Fault::Bridge { bridge } => write!(f, "bridge partition through {bridge}"),
            Fault::SplitAll => write!(f, "cut every link"),
            Fault::Lossy(l) => write!(
                f,
                "lossy links (drop {:.0}%, duplicate {:.0}%, delay {:.0}% up to {:?})",
                l.drop * 100.0,
                l.duplicate * 100.0,
                l.delay * 100.0,
                l.delay_max
            ),
            Fault::Crash(t) => write!(f, "crash {t}"),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "schedule of seed {} ({} ms of faults after {:?} of warm-up):",
            self.seed, self.fault_ms, WARMUP
        )?;
        for e in &self.episodes {
            let faults: Vec<String> = e.faults.iter().map(|x| x.to_string()).collect();
            writeln!(
                f,
                "  +{:>5} ms for {:>4} ms: {}",
                e.start_ms,
                e.len_ms,
                faults.join(" + ")
            )?;
        }
        Ok(())
    }
}
