//! Ordo's server: one replica of one group (raft driver, state machine, gRPC edge), the process
//! that runs it (`node`), and a whole cluster in one process (`playground`). The client lives in
//! `ordo-proto`; test support in `ordo-testkit`. See ARCHITECTURE.md for the map.

pub use ordo_proto as proto;

pub mod error;
pub mod groups;
pub mod limits;
pub mod logging;
pub mod node;
pub mod playground;
pub(crate) mod replica;
pub(crate) mod server;
pub(crate) mod state;

pub use replica::transport::{Fate, LinkFilter};
pub use replica::ReplicaHandle;
