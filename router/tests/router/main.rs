//! The router against in-process fake nodes and config servers (real gRPC on loopback, port 0).
//! Nothing here sleeps to synchronise: every wait is on a condition, under a bound.
//!
//! `fakes` holds the fake node and config server, `support` the maps, keys and clients; the
//! other modules are the tests, by topic.

mod fakes;
mod feed;
mod group_fakes;
mod groups;
mod retries;
mod routing;
mod shard_map;
mod support;
