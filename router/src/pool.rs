//! One lazily connected tonic `Channel` per node address, shared by every request: HTTP/2
//! multiplexes concurrent requests over the one connection. The cache, the router's endpoint
//! profile and the address spelling are [`ordo_proto::addr`]'s.

use ordo_proto::addr::{self, ChannelCache, Profile};
use tonic::transport::Channel;

/// Largest message the router decodes or encodes, on either side: the nodes' bound.
pub(crate) const MESSAGE_BYTES_MAX: usize = addr::KV_MESSAGE_BYTES_MAX;

pub(crate) struct Pool {
    channels: ChannelCache,
}

impl Default for Pool {
    fn default() -> Pool {
        Pool {
            channels: ChannelCache::new(Profile::Router),
        }
    }
}

impl Pool {
    /// The channel to `addr` (canonical `host:port`), created without connecting on first use.
    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, String> {
        self.channels.channel(addr).map_err(|e| e.to_string())
    }
}

/// The one spelling of an address the router uses as a key and in messages: `host:port`
/// ([`ordo_proto::addr::parse`]). Accepts `host:port` and `http://host:port[/]`; refuses
/// `https://` (no TLS in this build), other schemes, and empty input.
pub(crate) fn canonical_addr(raw: &str) -> Result<String, String> {
    addr::parse(raw).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spelling itself is tested in `ordo_proto::addr`; the router only passes it on.
    #[test]
    fn addresses_are_proto_spelling() {
        assert_eq!(
            canonical_addr(" http://127.0.0.1:7001/ ").unwrap(),
            "127.0.0.1:7001"
        );
        let err = canonical_addr("https://a:1").unwrap_err();
        assert_eq!(err, addr::parse("https://a:1").unwrap_err().to_string());
    }

    #[tokio::test]
    async fn channels_are_reused() {
        let pool = Pool::default();
        pool.channel("127.0.0.1:1").unwrap();
        pool.channel("127.0.0.1:1").unwrap();
        pool.channel("127.0.0.1:2").unwrap();
        assert_eq!(pool.channels.len(), 2);
    }
}
