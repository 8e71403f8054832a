//! Ordo's test support, kept out of the product (the product never depends on this crate; it
//! offers seams, such as the transport's link filter, and this crate plugs into them).
//!
//! - [`cluster`]: the [`Cluster`] trait and [`Member`], one vocabulary over the four harnesses:
//!   [`proc`] (real processes, SIGKILL) and [`inproc`] (in-process nodes, a whole playground);
//! - [`faults`]: `FaultNet`, partitions and seeded lossy links as the transport's link filter;
//! - [`linearizability`]: the checker every history of the cluster tests goes through;
//! - [`feed`]: the change feed's checker beside it, and the [`feed::Watcher`] that records a
//!   `Feed.Watch` through a router for it;
//! - [`groups`]: consumer groups' [`groups::Member`] (one `Feed.Consume` stream through a router,
//!   with a handler policy and a kill) and the checker of their deliveries;
//! - [`wait`], [`rng`], [`ports`], [`env`], [`net`], [`bins`]: one copy of each helper:
//!   `wait_for`, the seeded `SplitMix64`, the free-port picker, `env_u64`, the test endpoint and
//!   `Status` call, the `ordoctl` runner;
//! - [`HEAVY`]: the lock of the tests that load the machine.

pub mod bins;
pub mod cluster;
pub mod env;
pub mod faults;
pub mod feed;
pub mod groups;
pub mod inproc;
pub mod linearizability;
pub mod net;
pub mod ports;
pub mod proc;
pub mod rng;
pub mod wait;

pub use bins::Bins;
pub use cluster::{Cluster, Member, CONFIG_GROUP};
pub use env::env_u64;
pub use net::{endpoint, node_status};
pub use ports::free_port;
pub use rng::SplitMix64;
pub use wait::{wait_for, wait_for_every};

/// Held by the tests that load the machine hard or measure time (nemesis, fault schedules, the
/// bank, membership changes under load, resharding): on a 2-core machine two of them at once
/// starve each other's clusters and bounded waits fail for want of CPU, not for a bug.
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
