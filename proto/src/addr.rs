//! The one spelling of a replica's address, and the one place that turns it into a tonic
//! channel.
//!
//! Users, maps and not-leader hints spell an address `host:port` or `http://host:port[/]`; inside
//! Ordo it is always the canonical `host:port` ([`parse`]), which keys channel caches and leader
//! cursors, and `http://host:port` only on the wire ([`uri`]). This build has no TLS, so
//! `https://` is refused rather than silently downgraded.
//!
//! Each kind of caller gets an endpoint [`Profile`] (connect timeout, keepalive, `TCP_NODELAY`),
//! and the message-size bounds every stub sets are the constants below.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// Largest response a [`crate::client`] decodes. tonic's default (4 MiB) is too small for a full
/// scan page of large values; this stays well above what a node or router sends while still
/// bounding memory.
pub const CLIENT_RESPONSE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Largest `Kv` or `Participant` message anyone decodes or encodes: a node from and to its
/// clients, a router on both sides. One bound, so a request over it gets the same refusal from a
/// router as from a node, and every answer a node sends fits what a router accepts. It holds the
/// largest transaction (8 MiB of keys and values) with 1 MiB to spare; answers are smaller (a
/// scan page or a Txn's results are at most 4 MiB of values).
pub const KV_MESSAGE_BYTES_MAX: usize = 9 * 1024 * 1024;
/// Largest message a config server exchanges with a node's `Peer` admin calls (migration pages
/// are far smaller; the bound equals the node's peer bound).
pub const ADMIN_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;

const _: () = assert!(KV_MESSAGE_BYTES_MAX <= CLIENT_RESPONSE_BYTES_MAX);

/// Most channels a [`ChannelCache`] keeps. Addresses come from the user, the shard map and leader
/// hints, so this is never reached in practice; if it is, the cache starts over (channels are
/// cheap to create lazily and clones already handed out keep working).
pub const CACHED_CHANNELS_MAX: usize = 1024;

/// An address that cannot be used, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrError(String);

impl fmt::Display for AddrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AddrError {}

/// The `host:port` part of `raw` (`host:port` or `http://host:port[/]`, surrounding blanks
/// ignored), checked only for its shape: a scheme other than `http`, or nothing left, is refused.
pub fn host_port(raw: &str) -> Result<&str, AddrError> {
    let trimmed = raw.trim();
    let host_port = match trimmed.split_once("://") {
        None => trimmed,
        Some(("http", rest)) => rest,
        Some(("https", _)) => {
            return Err(AddrError(format!(
                "{raw:?}: TLS is not supported, use http://"
            )))
        }
        Some(_) => {
            return Err(AddrError(format!(
                "{raw:?}: unsupported scheme, use host:port or http://host:port"
            )))
        }
    };
    let host_port = host_port.trim_end_matches('/');
    if host_port.is_empty() {
        return Err(AddrError(format!("{raw:?} has no host")));
    }
    Ok(host_port)
}

/// The canonical spelling of `raw`: `host:port`, checked to make a valid URI.
pub fn parse(raw: &str) -> Result<String, AddrError> {
    let host_port = host_port(raw)?;
    Endpoint::from_shared(uri(host_port))
        .map_err(|e| AddrError(format!("{raw:?} is not a valid address: {e}")))?;
    Ok(host_port.to_string())
}

/// The URI of canonical `host_port` on the wire.
pub fn uri(host_port: &str) -> String {
    format!("http://{host_port}")
}

/// How a kind of caller connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// An application's [`crate::client`]: a generous connect timeout, no keepalive (a client
    /// that idles may let its connection go).
    Client,
    /// A router's pooled connections to nodes and config servers: HTTP/2 pings find a dead peer
    /// on an idle pooled connection.
    Router,
    /// Raft traffic between the replicas of a group (the node's transport).
    Peer,
    /// A config server's admin calls to group leaders (ownership, membership, migration steps).
    Admin,
}

impl Profile {
    /// Time allowed to establish a TCP connection to one address.
    pub fn connect_timeout(self) -> Duration {
        match self {
            Profile::Client => Duration::from_secs(2),
            Profile::Router | Profile::Peer | Profile::Admin => Duration::from_secs(1),
        }
    }

    /// HTTP/2 keepalive: ping interval and how long a ping may go unanswered.
    pub fn keepalive(self) -> Option<(Duration, Duration)> {
        match self {
            Profile::Router => Some((Duration::from_secs(10), Duration::from_secs(5))),
            Profile::Peer => Some((Duration::from_secs(5), Duration::from_secs(5))),
            Profile::Client | Profile::Admin => None,
        }
    }
}

/// An endpoint for `raw` (any spelling [`parse`] accepts) set up for `profile`; nothing connects.
pub fn endpoint(raw: &str, profile: Profile) -> Result<Endpoint, AddrError> {
    let host_port = host_port(raw)?;
    let mut endpoint = Endpoint::from_shared(uri(host_port))
        .map_err(|e| AddrError(format!("{raw:?} is not a valid address: {e}")))?
        .connect_timeout(profile.connect_timeout())
        .tcp_nodelay(true);
    if let Some((interval, timeout)) = profile.keepalive() {
        endpoint = endpoint
            .http2_keep_alive_interval(interval)
            .keep_alive_timeout(timeout);
        if profile == Profile::Router {
            endpoint = endpoint.keep_alive_while_idle(true);
        }
    }
    Ok(endpoint)
}

/// The endpoint a replica uses for raft traffic to a peer at `addr` (1 s connect timeout,
/// `TCP_NODELAY`, 5 s keepalive): the node's transport is switched to it.
pub fn peer_endpoint(addr: &str) -> Result<Endpoint, AddrError> {
    endpoint(addr, Profile::Peer)
}

/// One lazily connected channel per canonical address, shared by every request: HTTP/2
/// multiplexes concurrent requests over the one connection.
pub struct ChannelCache {
    profile: Profile,
    channels: Mutex<HashMap<String, Channel>>,
}

impl ChannelCache {
    pub fn new(profile: Profile) -> ChannelCache {
        ChannelCache {
            profile,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// The channel to `addr`, created without connecting on first use.
    pub fn channel(&self, addr: &str) -> Result<Channel, AddrError> {
        let mut channels = self.channels.lock().unwrap();
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let channel = endpoint(addr, self.profile)?.connect_lazy();
        if channels.len() >= CACHED_CHANNELS_MAX {
            tracing::warn!(
                channels = channels.len(),
                "channel cache full; starting it over"
            );
            channels.clear();
        }
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// How many channels are cached.
    pub fn len(&self) -> usize {
        self.channels.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_have_one_spelling() {
        assert_eq!(parse("127.0.0.1:7001").unwrap(), "127.0.0.1:7001");
        assert_eq!(parse(" http://127.0.0.1:7001/ ").unwrap(), "127.0.0.1:7001");
        assert_eq!(parse("[::1]:7001").unwrap(), "[::1]:7001");
        assert_eq!(uri("a:1"), "http://a:1");
        for bad in [
            "",
            " ",
            "http://",
            "https://a:1",
            "grpc://a:1",
            "bad host:1",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        // The shape check alone lets a bad host through; `parse` does not.
        assert_eq!(host_port("bad host:1").unwrap(), "bad host:1");
    }

    #[test]
    fn profiles_differ_only_where_they_must() {
        assert_eq!(Profile::Peer.connect_timeout(), Duration::from_secs(1));
        assert_eq!(
            Profile::Peer.keepalive(),
            Some((Duration::from_secs(5), Duration::from_secs(5)))
        );
        assert_eq!(Profile::Client.connect_timeout(), Duration::from_secs(2));
        assert_eq!(Profile::Admin.keepalive(), None);
        assert!(peer_endpoint("http://127.0.0.1:7001").is_ok());
        assert!(endpoint("https://a:1", Profile::Client).is_err());
    }

    #[tokio::test]
    async fn channels_are_reused() {
        let cache = ChannelCache::new(Profile::Router);
        cache.channel("127.0.0.1:1").unwrap();
        cache.channel("127.0.0.1:1").unwrap();
        cache.channel("127.0.0.1:2").unwrap();
        assert_eq!(cache.len(), 2);
    }
}
