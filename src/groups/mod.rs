//! Consumer groups (issue 14, research 9.4): several instances of a service share one feed.
//! `dispatch` is what a shard group's leader runs for one group over its owned slots, pure and
//! deterministic (`slot` holds one slot's part); the replicated state it resumes from and the
//! commands its `Persist` actions become live in `state/`. `runner` runs the dispatchers of a
//! replica while it leads (reads, deliveries to members' streams, flushes through `persist`).

pub mod dispatch;
mod persist;
pub mod runner;
mod slot;
#[cfg(test)]
mod tests;
