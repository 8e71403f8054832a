//! The systems the bench can drive, behind one small interface: get, put, scan and a
//! version-compared multi-put transaction over `(shard_key, key)` items.
//!
//! * [`Backend::Ordo`]: `ordo_proto::client::Client` (a router, or the nodes of one group).
//! * [`Backend::Etcd`]: etcd v3's `KV` service over gRPC. The item `(shard_key, key)` is the etcd
//!   key `shard_key/key`; a scan inside a shard key is a `Range` over that prefix; an item version
//!   is etcd's per-key `version` (1 at creation, +1 per write: the same meaning as Ordo's), so a
//!   compare on it is a `Compare { target: VERSION }` (0 = absent).
//! * [`Backend::Nats`] (feature `nats`): a NATS JetStream KV bucket. The item `(shard_key, key)`
//!   is the KV key [`nats_key`] (`shard_key.key`); a put is `kv.put` (a JetStream publish, answered
//!   once the bucket's replicas stored it), a get is `kv.get`. Scans and transactions have no KV
//!   equivalent and fail with "not supported by the NATS KV backend".

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use bytes::Bytes;
use ordo_proto::client::Client;
use ordo_proto::v1 as pb;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use crate::feed::Probe;

/// The etcd v3 client code generated from `proto/etcd/` (a subset of etcd's own protos).
#[allow(clippy::all, dead_code)]
pub mod etcdpb {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

use etcdpb::etcdserverpb as epb;

/// The version compare of a [`Txn`]: the item's version must equal `version` (0 = absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionIs {
    pub shard_key: Bytes,
    pub key: Bytes,
    pub version: u64,
}

/// An unconditional write inside a [`Txn`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub shard_key: Bytes,
    pub key: Bytes,
    pub value: Bytes,
}

/// All `writes` atomically if every compare holds, nothing otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<VersionIs>,
    pub writes: Vec<Write>,
}

/// An item as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub value: Bytes,
    pub version: u64,
}

/// What the bench talks to. With `--feed-latency`, `probe` hears of every Ordo write
/// acknowledged (each item at its new version), to match it with its change-feed event.
#[derive(Clone)]
pub enum Backend {
    Ordo {
        client: Client,
        stale: bool,
        probe: Option<Arc<Probe>>,
    },
    Etcd(Etcd),
    #[cfg(feature = "nats")]
    Nats(Nats),
}

impl Backend {
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Ordo { .. } => "ordo",
            Backend::Etcd(_) => "etcd",
            #[cfg(feature = "nats")]
            Backend::Nats(_) => "nats",
        }
    }

    pub async fn get(&self, shard_key: &str, key: &str) -> Result<Option<Found>, Status> {
        match self {
            Backend::Ordo { client, stale, .. } => {
                let r = client
                    .get(
                        Bytes::copy_from_slice(shard_key.as_bytes()),
                        Bytes::copy_from_slice(key.as_bytes()),
                        *stale,
                    )
                    .await?;
                Ok(r.found.then_some(Found {
                    value: r.value,
                    version: r.version,
                }))
            }
            Backend::Etcd(e) => e.get(shard_key, key).await,
            #[cfg(feature = "nats")]
            Backend::Nats(n) => n.get(shard_key, key).await,
        }
    }

    pub async fn put(&self, shard_key: &str, key: &str, value: Bytes) -> Result<(), Status> {
        match self {
            Backend::Ordo { client, probe, .. } => {
                let (shard_key, key) = (
                    Bytes::copy_from_slice(shard_key.as_bytes()),
                    Bytes::copy_from_slice(key.as_bytes()),
                );
                let r = client
                    .put(shard_key.clone(), key.clone(), value, None)
                    .await?;
                if let Some(probe) = probe {
                    probe.acked(shard_key, key, r.version);
                }
                Ok(())
            }
            Backend::Etcd(e) => e.put(shard_key, key, value).await,
            #[cfg(feature = "nats")]
            Backend::Nats(n) => n.put(shard_key, key, value).await,
        }
    }

    /// Reads up to `limit` items of `shard_key` in `[start, end)` (`end` empty: to the end of the
    /// shard key); returns how many came back.
    pub async fn scan(
        &self,
        shard_key: &str,
        start: &str,
        end: &str,
        limit: u32,
    ) -> Result<usize, Status> {
        match self {
            Backend::Ordo { client, stale, .. } => {
                let r = client
                    .scan(
                        Bytes::copy_from_slice(shard_key.as_bytes()),
                        Bytes::copy_from_slice(start.as_bytes()),
                        Bytes::copy_from_slice(end.as_bytes()),
                        limit,
                        *stale,
                    )
                    .await?;
                Ok(r.items.len())
            }
            Backend::Etcd(e) => e.scan(shard_key, start, end, limit).await,
            #[cfg(feature = "nats")]
            Backend::Nats(_) => Err(nats_unsupported("scan")),
        }
    }

    /// Runs `txn`; `Ok(false)` when a compare failed (nothing written).
    pub async fn txn(&self, txn: Txn) -> Result<bool, Status> {
        match self {
            Backend::Ordo { client, probe, .. } => {
                let items: Vec<(Bytes, Bytes)> = match probe {
                    Some(_) => txn
                        .writes
                        .iter()
                        .map(|w| (w.shard_key.clone(), w.key.clone()))
                        .collect(),
                    None => Vec::new(),
                };
                let r = client.txn(ordo_txn(txn)).await?;
                if let (Some(probe), true) = (probe, r.succeeded) {
                    // The results are the success ops', in order: one put per write.
                    for ((shard_key, key), result) in items.into_iter().zip(r.results) {
                        if let Some(pb::txn_op_result::Result::Put(p)) = result.result {
                            probe.acked(shard_key, key, p.version);
                        }
                    }
                }
                Ok(r.succeeded)
            }
            Backend::Etcd(e) => e.txn(txn).await,
            #[cfg(feature = "nats")]
            Backend::Nats(_) => Err(nats_unsupported("txn")),
        }
    }
}

/// The Ordo `TxnRequest` for `txn`.
pub fn ordo_txn(txn: Txn) -> pb::TxnRequest {
    pb::TxnRequest {
        header: None,
        compares: txn
            .compares
            .into_iter()
            .map(|c| pb::Compare {
                shard_key: c.shard_key,
                key: c.key,
                target: pb::compare::Target::Version as i32,
                op: pb::compare::Op::Equal as i32,
                version: c.version,
                value: Bytes::new(),
                exists: false,
            })
            .collect(),
        success: txn
            .writes
            .into_iter()
            .map(|w| pb::TxnOp {
                op: Some(pb::txn_op::Op::Put(pb::PutRequest {
                    header: None,
                    shard_key: w.shard_key,
                    key: w.key,
                    value: w.value,
                    if_version: None,
                })),
            })
            .collect(),
        failure: Vec::new(),
    }
}

/// etcd's key for the item `(shard_key, key)`.
pub fn etcd_key(shard_key: &[u8], key: &[u8]) -> Bytes {
    let mut k = Vec::with_capacity(shard_key.len() + 1 + key.len());
    k.extend_from_slice(shard_key);
    k.push(b'/');
    k.extend_from_slice(key);
    k.into()
}

/// etcd's `[key, range_end)` for the keys of `shard_key` in `[start, end)`; an empty `end` is the
/// end of the shard key: the `shard_key/` prefix's end, `shard_key0` (`'0'` follows `'/'`).
pub fn etcd_range(shard_key: &str, start: &str, end: &str) -> (Bytes, Bytes) {
    let from = etcd_key(shard_key.as_bytes(), start.as_bytes());
    let to = if end.is_empty() {
        let mut k = shard_key.as_bytes().to_vec();
        k.push(b'/' + 1);
        Bytes::from(k)
    } else {
        etcd_key(shard_key.as_bytes(), end.as_bytes())
    };
    (from, to)
}

/// The etcd `TxnRequest` for `txn`.
pub fn etcd_txn(txn: Txn) -> epb::TxnRequest {
    epb::TxnRequest {
        compare: txn
            .compares
            .into_iter()
            .map(|c| epb::Compare {
                result: epb::compare::CompareResult::Equal as i32,
                target: epb::compare::CompareTarget::Version as i32,
                key: etcd_key(&c.shard_key, &c.key),
                range_end: Bytes::new(),
                target_union: Some(epb::compare::TargetUnion::Version(c.version as i64)),
            })
            .collect(),
        success: txn
            .writes
            .into_iter()
            .map(|w| epb::RequestOp {
                request: Some(epb::request_op::Request::RequestPut(epb::PutRequest {
                    key: etcd_key(&w.shard_key, &w.key),
                    value: w.value,
                    ..Default::default()
                })),
            })
            .collect(),
        failure: Vec::new(),
    }
}

/// A client of etcd's `KV` service, balanced over the cluster's members (any member serves reads
/// and forwards writes to the leader).
#[derive(Clone)]
pub struct Etcd {
    kv: epb::kv_client::KvClient<Channel>,
    /// Serializable (local, possibly stale) reads instead of linearizable ones.
    serializable: bool,
    endpoints: Vec<String>,
}

impl Etcd {
    /// A client over `endpoints` (`host:port`); must be called inside a Tokio runtime.
    pub fn connect(
        endpoints: Vec<String>,
        timeout: Duration,
        serializable: bool,
    ) -> anyhow::Result<Etcd> {
        ensure!(!endpoints.is_empty(), "no etcd endpoint given");
        let mut eps = Vec::new();
        for e in &endpoints {
            let url = if e.contains("://") {
                e.clone()
            } else {
                format!("http://{e}")
            };
            eps.push(
                Endpoint::from_shared(url)
                    .with_context(|| format!("invalid etcd endpoint {e:?}"))?
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(timeout)
                    .tcp_nodelay(true),
            );
        }
        let channel = Channel::balance_list(eps.into_iter());
        Ok(Etcd {
            kv: epb::kv_client::KvClient::new(channel).max_decoding_message_size(64 << 20),
            serializable,
            endpoints,
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    async fn get(&self, shard_key: &str, key: &str) -> Result<Option<Found>, Status> {
        let req = epb::RangeRequest {
            key: etcd_key(shard_key.as_bytes(), key.as_bytes()),
            serializable: self.serializable,
            ..Default::default()
        };
        let r = self.kv.clone().range(req).await?.into_inner();
        Ok(r.kvs.into_iter().next().map(|kv| Found {
            value: kv.value,
            version: kv.version.max(0) as u64,
        }))
    }

    async fn put(&self, shard_key: &str, key: &str, value: Bytes) -> Result<(), Status> {
        let req = epb::PutRequest {
            key: etcd_key(shard_key.as_bytes(), key.as_bytes()),
            value,
            ..Default::default()
        };
        self.kv.clone().put(req).await.map(drop)
    }

    async fn scan(
        &self,
        shard_key: &str,
        start: &str,
        end: &str,
        limit: u32,
    ) -> Result<usize, Status> {
        let (key, range_end) = etcd_range(shard_key, start, end);
        let req = epb::RangeRequest {
            key,
            range_end,
            limit: limit as i64,
            serializable: self.serializable,
            ..Default::default()
        };
        Ok(self.kv.clone().range(req).await?.into_inner().kvs.len())
    }

    async fn txn(&self, txn: Txn) -> Result<bool, Status> {
        let r = self.kv.clone().txn(etcd_txn(txn)).await?.into_inner();
        Ok(r.succeeded)
    }
}

/// Whether NATS KV takes the byte `b` in a key as it is (its keys allow `[-/_=.a-zA-Z0-9]`; `.`
/// separates [`nats_key`]'s parts and `=` starts an escape, so both are escaped themselves).
#[cfg_attr(not(feature = "nats"), allow(dead_code))]
fn nats_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_')
}

/// `part` into `out`, every byte NATS KV does not take as it is written `=XX` (upper-case hex);
/// an empty part is a lone `=` (which no escape is), so that a key never starts with `.`.
#[cfg_attr(not(feature = "nats"), allow(dead_code))]
fn nats_escape_into(out: &mut String, part: &[u8]) {
    use std::fmt::Write as _;
    if part.is_empty() {
        out.push('=');
        return;
    }
    for &b in part {
        if nats_plain(b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "={b:02X}");
        }
    }
}

/// The NATS KV key of the item `(shard_key, key)`: `shard_key.key`, or the shard key alone when
/// `key` is empty (an order's root). Bytes outside `[-/_a-zA-Z0-9]` are escaped `=XX`, so a `.`
/// is only ever the separator: two items never share a KV key, and the key is a valid NATS
/// subject (no empty token, no leading or trailing `.`, no wildcard). A pure function outside
/// the feature, so that `cargo test -p ordo-bench` checks it in every build.
#[cfg_attr(not(feature = "nats"), allow(dead_code))]
pub fn nats_key(shard_key: &[u8], key: &[u8]) -> String {
    let mut k = String::with_capacity(shard_key.len() + 1 + key.len());
    nats_escape_into(&mut k, shard_key);
    if !key.is_empty() {
        k.push('.');
        nats_escape_into(&mut k, key);
    }
    k
}

#[cfg(feature = "nats")]
pub use nats::Nats;

/// The NATS JetStream KV client (feature `nats`).
#[cfg(feature = "nats")]
mod nats {
    use std::sync::Arc;
    use std::time::Duration;

    use anyhow::{bail, ensure, Context};
    use async_nats::jetstream::{self, kv, stream::StorageType};
    use bytes::Bytes;
    use tokio::time::Instant;
    use tonic::Status;

    use super::{nats_key, Found};

    /// How long getting or creating the bucket is retried while the cluster elects its leaders.
    const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

    /// A KV bucket of a NATS JetStream cluster. Puts are JetStream publishes, answered once the
    /// bucket's replicas stored the message (synced to disk with the servers'
    /// `sync_interval: always`, as bench/nats.sh starts them). Gets are `kv.get`, which the
    /// client sends as a direct get (the bucket's streams allow it): any replica may answer, so
    /// a get may miss a put acknowledged just before; a write bench only loads records with them.
    #[derive(Clone)]
    pub struct Nats {
        /// Shared: a `Store` holds the bucket's stream info (over a kilobyte), and the backend
        /// is cloned per worker.
        kv: Arc<kv::Store>,
        servers: Vec<String>,
    }

    impl Nats {
        /// Connects to `servers` (`host:port` or `nats://host:port`), then gets bucket `bucket`
        /// or creates it (file storage, `replicas` copies, history 1).
        pub async fn connect(
            servers: Vec<String>,
            bucket: &str,
            replicas: usize,
            timeout: Duration,
        ) -> anyhow::Result<Nats> {
            ensure!(!servers.is_empty(), "no NATS server given");
            let addrs = servers
                .iter()
                .map(|s| {
                    let url = if s.contains("://") {
                        s.clone()
                    } else {
                        format!("nats://{s}")
                    };
                    url.parse::<async_nats::ServerAddr>()
                        .with_context(|| format!("NATS server {s:?}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let client = async_nats::ConnectOptions::new()
                .request_timeout(Some(timeout))
                .connect(addrs)
                .await
                .context("connecting to NATS")?;
            let mut js = jetstream::new(client);
            js.set_timeout(timeout);
            let config = kv::Config {
                bucket: bucket.to_string(),
                history: 1,
                num_replicas: replicas,
                storage: StorageType::File,
                ..Default::default()
            };
            let kv = bucket_store(&js, &config).await?;
            Ok(Nats {
                kv: Arc::new(kv),
                servers,
            })
        }

        pub fn endpoints(&self) -> &[String] {
            &self.servers
        }

        pub async fn get(&self, shard_key: &str, key: &str) -> Result<Option<Found>, Status> {
            let k = nats_key(shard_key.as_bytes(), key.as_bytes());
            let value = self.kv.get(k).await.map_err(|e| status("get", &e))?;
            // KV keeps a revision per bucket (the stream sequence), not Ordo's per-key version;
            // no op the NATS backend runs reads the version.
            Ok(value.map(|value| Found { value, version: 0 }))
        }

        pub async fn put(&self, shard_key: &str, key: &str, value: Bytes) -> Result<(), Status> {
            let k = nats_key(shard_key.as_bytes(), key.as_bytes());
            self.kv
                .put(k, value)
                .await
                .map(drop)
                .map_err(|e| status("put", &e))
        }
    }

    /// The bucket `config` names: the existing one if it has this configuration (an error if
    /// not), else a new one; retried while the cluster has no JetStream leader yet.
    async fn bucket_store(
        js: &jetstream::Context,
        config: &kv::Config,
    ) -> anyhow::Result<kv::Store> {
        let deadline = Instant::now() + SETUP_TIMEOUT;
        loop {
            let error = match js.get_key_value(&config.bucket).await {
                Ok(store) => {
                    let c = &store
                        .status()
                        .await
                        .context("the bucket's status")?
                        .info
                        .config;
                    ensure!(
                        c.num_replicas == config.num_replicas
                            && c.max_messages_per_subject == config.history
                            && c.storage == config.storage,
                        "NATS KV bucket {:?} exists with {} replicas, history {}, {:?} storage; \
                         the bench wants {}, {}, file: delete it or restart the cluster",
                        config.bucket,
                        c.num_replicas,
                        c.max_messages_per_subject,
                        c.storage,
                        config.num_replicas,
                        config.history
                    );
                    return Ok(store);
                }
                Err(get) => match js.create_key_value(config.clone()).await {
                    Ok(store) => return Ok(store),
                    Err(create) => format!("getting it: {get}; creating it: {create}"),
                },
            };
            if Instant::now() >= deadline {
                bail!(
                    "NATS KV bucket {:?} for {SETUP_TIMEOUT:?}: {error}",
                    config.bucket
                );
            }
            eprintln!("NATS KV bucket {:?}: {error}; retrying", config.bucket);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// A NATS error as the gRPC status the report counts errors by.
    fn status(op: &str, e: &dyn std::error::Error) -> Status {
        let msg = format!("NATS KV {op}: {e}");
        if msg.contains("timed out") || msg.contains("timeout") {
            Status::deadline_exceeded(msg)
        } else {
            Status::unavailable(msg)
        }
    }
}

/// The error of an op NATS KV has no equivalent for.
#[cfg(feature = "nats")]
fn nats_unsupported(op: &str) -> Status {
    Status::unimplemented(format!("{op} is not supported by the NATS KV backend"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn sample() -> Txn {
        Txn {
            compares: vec![VersionIs {
                shard_key: "o1".into(),
                key: "".into(),
                version: 0,
            }],
            writes: vec![
                Write {
                    shard_key: "o1".into(),
                    key: "".into(),
                    value: "created;".into(),
                },
                Write {
                    shard_key: "o1".into(),
                    key: "items/1".into(),
                    value: "sku".into(),
                },
            ],
        }
    }

    /// The item a [`nats_key`] came from (its inverse).
    fn nats_item(k: &str) -> (Vec<u8>, Vec<u8>) {
        fn unescape(part: &str) -> Vec<u8> {
            if part == "=" {
                return Vec::new();
            }
            let b = part.as_bytes();
            let mut out = Vec::new();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'=' {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 3;
                } else {
                    out.push(b[i]);
                    i += 1;
                }
            }
            out
        }
        match k.split_once('.') {
            Some((sk, key)) => (unescape(sk), unescape(key)),
            None => (unescape(k), Vec::new()),
        }
    }

    /// What NATS KV accepts as a key: `[-/_=.a-zA-Z0-9]+`, no empty token between dots, no
    /// leading or trailing dot.
    fn valid_nats_key(k: &str) -> bool {
        !k.is_empty()
            && k.bytes().all(|b| nats_plain(b) || b == b'=' || b == b'.')
            && k.split('.').all(|token| !token.is_empty())
    }

    #[test]
    fn items_map_onto_nats_kv_keys() {
        assert_eq!(nats_key(b"user3", b"00000004"), "user3.00000004");
        assert_eq!(nats_key(b"o1", b""), "o1");
        assert_eq!(nats_key(b"o1", b"items/1"), "o1.items/1");
        assert_eq!(
            nats_key(b"r17-o2", b"outbox/000001"),
            "r17-o2.outbox/000001"
        );
        assert_eq!(nats_key(b"A_z-9", b"x"), "A_z-9.x");
        // The separator, the escape and what KV keys do not allow are escaped.
        assert_eq!(nats_key(b"a.b", b"c"), "a=2Eb.c");
        assert_eq!(nats_key(b"a", b"b.c"), "a.b=2Ec");
        assert_eq!(nats_key(b"k=1", b""), "k=3D1");
        assert_eq!(nats_key(b"a b", b"*>"), "a=20b.=2A=3E");
        assert_eq!(nats_key("é".as_bytes(), b"\x00\xff"), "=C3=A9.=00=FF");
        assert_eq!(nats_key(b"", b"k"), "=.k");
        assert_eq!(nats_key(b"", b""), "=");
    }

    #[test]
    fn nats_kv_keys_are_valid_and_tell_items_apart() {
        let parts: [&[u8]; 12] = [
            b"",
            b".",
            b"..",
            b"=",
            b"=2E",
            b"a",
            b"a.b",
            b"a=b",
            b"user3",
            b"items/1",
            b" \t",
            b"\x00\xff*>",
        ];
        let mut seen = std::collections::HashMap::new();
        for sk in parts {
            for key in parts {
                let k = nats_key(sk, key);
                assert!(valid_nats_key(&k), "{k:?} from {sk:?}, {key:?}");
                assert_eq!(nats_item(&k), (sk.to_vec(), key.to_vec()), "{k:?}");
                if let Some(other) = seen.insert(k.clone(), (sk, key)) {
                    panic!("{k:?} from both {other:?} and {:?}", (sk, key));
                }
            }
        }
    }

    #[test]
    fn items_map_onto_etcd_keys_and_ranges() {
        assert_eq!(&etcd_key(b"o1", b"")[..], b"o1/");
        assert_eq!(&etcd_key(b"o1", b"items/1")[..], b"o1/items/1");
        let (from, to) = etcd_range("user3", "00000004", "");
        assert_eq!(
            (&from[..], &to[..]),
            (&b"user3/00000004"[..], &b"user30"[..])
        );
        // Every key of the shard key is inside, the next shard keys are not.
        assert!(etcd_key(b"user3", b"99999999") < to);
        // The next shard keys sharing the prefix ("user30", "user31", ...) are outside.
        assert!(etcd_key(b"user30", b"") >= to);
        assert!(etcd_key(b"user31", b"00000000") >= to);
        let (from, to) = etcd_range("o1", "items/", "items0");
        assert_eq!((&from[..], &to[..]), (&b"o1/items/"[..], &b"o1/items0"[..]));
    }

    #[test]
    fn txns_translate_for_both_backends() {
        let o = ordo_txn(sample());
        assert_eq!(o.compares.len(), 1);
        assert_eq!(o.compares[0].target, pb::compare::Target::Version as i32);
        assert_eq!(o.compares[0].version, 0);
        assert_eq!(o.success.len(), 2);
        assert!(o.failure.is_empty());

        let e = etcd_txn(sample());
        assert_eq!(&e.compare[0].key[..], b"o1/");
        assert_eq!(
            e.compare[0].target_union,
            Some(epb::compare::TargetUnion::Version(0))
        );
        let Some(epb::request_op::Request::RequestPut(p)) = &e.success[1].request else {
            panic!("not a put: {:?}", e.success[1]);
        };
        assert_eq!(&p.key[..], b"o1/items/1");
        // etcd's wire numbers: Compare.version is field 4 (varint: tag 0x20), key field 3.
        let bytes = e.compare[0].encode_to_vec();
        assert!(bytes.windows(2).any(|w| w == [0x20, 0x00]), "{bytes:?}");
        assert!(bytes.windows(2).any(|w| w == [0x1a, 0x03]), "{bytes:?}");
    }
}
