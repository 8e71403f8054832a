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

/// Attempts of [`free_base_port`] used so far in this process: each call starts after them, so
/// two tests asking at once never get the same base (both would find it free, one would fail to
/// bind).
static BASE_ATTEMPTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A base port `b` such that every `b + offset` is free now, for a process that lays its own
/// ports out from a base (`ordo playground --port`). Tried from a start that depends on the
/// process id, below the ephemeral range like [`free_local_port`]; each base is handed out once
/// per process.
pub fn free_base_port(offsets: &[u16]) -> u16 {
    use std::sync::atomic::Ordering;
    for _ in 0..200 {
        let attempt = BASE_ATTEMPTS.fetch_add(1, Ordering::Relaxed);
        let base = (20_000 + (std::process::id() % 200) * 100 + attempt * 137 % 20_000) as u16;
        if offsets
            .iter()
            .all(|o| std::net::TcpListener::bind(("127.0.0.1", base + o)).is_ok())
        {
            return base;
        }
    }
    panic!("no free port range for offsets {offsets:?}");
}
