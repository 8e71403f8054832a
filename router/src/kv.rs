//! `ordo.v1.Kv` on the router: check the request, then hand it to the routing loop
//! (`forward.rs`), or a cross-group `Txn` to the two-phase-commit coordinator (`coordinator.rs`).
//! Every Kv request waits for locks it meets (`locks.rs`).

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use ordo_proto::v1::kv_server::Kv;
use ordo_proto::v1::{
    DeleteRequest, DeleteResponse, GetRequest, GetResponse, PutRequest, PutResponse, ScanRequest,
    ScanResponse, TxnRequest, TxnResponse,
};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::forward::{forward, kv_client, not_initialized, Route, Routed};
use crate::locks::OnLock;
use crate::map::groups_of;
use crate::retry::Effect;
use crate::{coordinator, deadline, Shared};

pub(crate) struct KvService(pub(crate) Arc<Shared>);

fn require_shard_key(shard_key: &Bytes) -> Result<(), Status> {
    if shard_key.is_empty() {
        return Err(Status::invalid_argument("shard_key is empty"));
    }
    Ok(())
}

/// The distinct shard keys of a Txn, in first-seen order; refuses an empty Txn and empty keys.
fn txn_shard_keys(req: &TxnRequest) -> Result<Vec<Bytes>, Status> {
    let mut keys: Vec<(String, &Bytes)> = Vec::new();
    for (i, c) in req.compares.iter().enumerate() {
        keys.push((format!("compare {i}"), &c.shard_key));
    }
    for (branch, ops) in [("success", &req.success), ("failure", &req.failure)] {
        for (i, op) in ops.iter().enumerate() {
            // The node refuses an empty op with its own message; it names no key to route by.
            let Some(key) = op.shard_key() else {
                continue;
            };
            keys.push((format!("{branch} op {i}"), key));
        }
    }
    if keys.is_empty() {
        return Err(Status::invalid_argument(
            "Txn is empty: it has no compares and no ops naming a key",
        ));
    }
    let mut distinct: Vec<Bytes> = Vec::new();
    for (what, key) in keys {
        if key.is_empty() {
            return Err(Status::invalid_argument(format!(
                "shard_key is empty ({what})"
            )));
        }
        if !distinct.contains(key) {
            distinct.push(key.clone());
        }
    }
    Ok(distinct)
}

impl KvService {
    /// A request of one shard key: refused if the key is empty, else forwarded to its group
    /// with the client's deadline as the budget, waiting for locks it meets. A write is keyed
    /// first, so that it can be retried whatever happens to an attempt.
    async fn one_key<Req, Resp, F, Fut>(
        &self,
        op: &'static str,
        effect: Effect,
        request: Request<Req>,
        shard_key: impl Fn(&Req) -> &Bytes,
        rpc: F,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Routed,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let budget = deadline::budget(request.metadata());
        let mut req = request.into_inner();
        require_shard_key(shard_key(&req))?;
        if effect.writes() {
            req.ensure_idempotency_key();
        }
        let route = Route::Key(shard_key(&req).clone());
        forward(&self.0, op, effect, &OnLock::Wait, route, req, budget, rpc).await
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let call = |ch, r| async move { kv_client(ch).get(r).await };
        self.one_key("Get", Effect::Read, request, |r| &r.shard_key, call)
            .await
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let call = |ch, r| async move { kv_client(ch).put(r).await };
        self.one_key("Put", Effect::KeyedWrite, request, |r| &r.shard_key, call)
            .await
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let call = |ch, r| async move { kv_client(ch).delete(r).await };
        self.one_key(
            "Delete",
            Effect::KeyedWrite,
            request,
            |r| &r.shard_key,
            call,
        )
        .await
    }

    async fn scan(&self, request: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let call = |ch, r| async move { kv_client(ch).scan(r).await };
        self.one_key("Scan", Effect::Read, request, |r| &r.shard_key, call)
            .await
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let budget = deadline::budget(request.metadata());
        let mut req = request.into_inner();
        let keys = txn_shard_keys(&req)?;
        req.ensure_idempotency_key();
        let map = self.0.map.current();
        if map.version == 0 {
            return Err(not_initialized());
        }
        if groups_of(&map, keys.iter().map(|k| &k[..])).len() > 1 {
            return coordinator::coordinate(&self.0, req, budget)
                .await
                .map(Response::new);
        }
        // A read-only Txn changes nothing (a node serves it after a read barrier): like a Get,
        // it may go to the next replica after any failure.
        let effect = if req.writes() {
            Effect::KeyedWrite
        } else {
            Effect::Read
        };
        forward(
            &self.0,
            "Txn",
            effect,
            &OnLock::Wait,
            Route::Txn(keys),
            req,
            budget,
            |ch, r| async move { kv_client(ch).txn(r).await },
        )
        .await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ordo_proto::v1::{Compare, TxnOp};

    pub(crate) fn put(sk: &str) -> TxnOp {
        TxnOp {
            op: Some(ordo_proto::v1::txn_op::Op::Put(PutRequest {
                shard_key: Bytes::copy_from_slice(sk.as_bytes()),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn txn_keys_are_collected_from_every_part() {
        let req = TxnRequest {
            header: None,
            compares: vec![Compare {
                shard_key: Bytes::from_static(b"a"),
                ..Default::default()
            }],
            success: vec![put("b"), put("a"), TxnOp { op: None }],
            failure: vec![put("c")],
        };
        let keys = txn_shard_keys(&req).unwrap();
        assert_eq!(keys, [&b"a"[..], b"b", b"c"]);

        let empty = txn_shard_keys(&TxnRequest::default()).unwrap_err();
        assert_eq!(empty.code(), tonic::Code::InvalidArgument);
        let blank = TxnRequest {
            failure: vec![put("")],
            ..Default::default()
        };
        let err = txn_shard_keys(&blank).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("failure op 0"), "{}", err.message());
    }
}
