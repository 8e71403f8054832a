//! One lazily connected tonic `Channel` per node address, shared by every request: HTTP/2
//! multiplexes concurrent requests over the one connection.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// Largest message the router decodes or encodes, on either side.
pub(crate) const MESSAGE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Time allowed to establish a TCP connection to one node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 pings find a dead peer on an idle pooled connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most channels kept. Addresses come from the shard map and from leader hints, so this is never
/// reached in practice; if it is, the pool starts over (channels are cheap to create lazily and
/// clones already handed out keep working).
const CHANNELS_MAX: usize = 1024;

#[derive(Default)]
pub(crate) struct Pool {
    channels: Mutex<HashMap<String, Channel>>,
}

impl Pool {
    /// The channel to `addr` (canonical `host:port`), created without connecting on first use.
    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap();
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("invalid address {addr:?}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let channel = endpoint.connect_lazy();
        if channels.len() >= CHANNELS_MAX {
            tracing::warn!(
                channels = channels.len(),
                "connection pool full; starting it over"
            );
            channels.clear();
        }
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

/// The one spelling of an address the router uses as a key and in messages: `host:port`.
/// Accepts `host:port` and `http://host:port[/]`; refuses `https://` (no TLS in this build),
/// other schemes, and empty input.
pub(crate) fn canonical_addr(raw: &str) -> Result<String, String> {
    let trimmed = raw.trim();
    let host_port = match trimmed.split_once("://") {
        None => trimmed,
        Some(("http", rest)) => rest,
        Some(("https", _)) => return Err(format!("{raw:?}: TLS is not supported, use http://")),
        Some(_) => {
            return Err(format!(
                "{raw:?}: unsupported scheme, use host:port or http://host:port"
            ))
        }
    };
    let host_port = host_port.trim_end_matches('/');
    if host_port.is_empty() {
        return Err(format!("{raw:?} has no host"));
    }
    Endpoint::from_shared(format!("http://{host_port}"))
        .map_err(|e| format!("{raw:?} is not a valid address: {e}"))?;
    Ok(host_port.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_have_one_spelling() {
        assert_eq!(canonical_addr("127.0.0.1:7001").unwrap(), "127.0.0.1:7001");
        assert_eq!(
            canonical_addr(" http://127.0.0.1:7001/ ").unwrap(),
            "127.0.0.1:7001"
        );
        assert_eq!(canonical_addr("[::1]:7001").unwrap(), "[::1]:7001");
        for bad in [
            "",
            " ",
            "http://",
            "https://a:1",
            "grpc://a:1",
            "bad host:1",
        ] {
            assert!(canonical_addr(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn channels_are_reused() {
        let pool = Pool::default();
        pool.channel("127.0.0.1:1").unwrap();
        pool.channel("127.0.0.1:1").unwrap();
        pool.channel("127.0.0.1:2").unwrap();
        assert_eq!(pool.channels.lock().unwrap().len(), 2);
    }
}
