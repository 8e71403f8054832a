//! Channels to a node as the tests open them, and the `Status` call every harness polls.

use std::time::Duration;

use ordo_proto::v1::peer_client::PeerClient;
use ordo_proto::v1::{StatusRequest, StatusResponse};
use tonic::transport::Endpoint;

/// The endpoint of a node or router at `addr` (`host:port` or a URI): the same profile as the
/// replicas' own transport (1 s connect timeout, no Nagle, 5 s HTTP/2 keepalive).
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(uri)?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5)))
}

/// A replica's `Status` (with the data digest if asked), or `None` if it does not answer
/// within 2 s.
pub async fn node_status(addr: &str, with_digest: bool) -> Option<StatusResponse> {
    let ep = endpoint(addr).ok()?.timeout(Duration::from_secs(2));
    let ch = ep.connect().await.ok()?;
    PeerClient::new(ch)
        .status(StatusRequest {
            with_data_digest: with_digest,
        })
        .await
        .ok()
        .map(|r| r.into_inner())
}
