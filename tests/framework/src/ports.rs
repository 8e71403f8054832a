//! Loopback ports for nodes the tests start. The product's playground picks its ports the
//! same way, so the one picker lives there and is re-exported here.

pub use ordo::playground::free_local_port;

/// A loopback port nobody listens on (see [`free_local_port`]: below the ephemeral range, each
/// handed out once per process).
pub fn free_port() -> u16 {
    free_local_port().expect("a free loopback port")
}

/// `127.0.0.1:<a free port>`.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}
