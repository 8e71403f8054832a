//! `ordo.v1.Kv` on a node: validate (`validate.rs`), check ownership, then propose through the
//! driver or read after a barrier. Thin: decisions are the driver's and the state machine's.

use std::sync::Arc;

use ordo_proto::v1::kv_server::Kv;
use ordo_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::replica::ReplicaHandle;
use crate::server::validate;
use crate::state::txn;

#[derive(Clone)]
pub struct KvService(pub Arc<ReplicaHandle>);

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let r = req.into_inner();
        let stale = validate::check_get(&r)?;
        self.0.check_running()?;
        if !stale {
            self.0.read_barrier().await?;
        }
        self.0.sm.check_owned(&r.shard_key)?;
        Ok(Response::new(
            match self.0.sm.get(&r.shard_key, &r.key)? {
                Some((version, value)) => GetResponse {
                    found: true,
                    value,
                    version,
                },
                None => GetResponse::default(),
            },
        ))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let txn = validate::put_as_txn(req.into_inner())?;
        let resp = self.0.propose_txn(txn).await?;
        Ok(Response::new(validate::put_response(resp)))
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let txn = validate::delete_as_txn(req.into_inner())?;
        let resp = self.0.propose_txn(txn).await?;
        Ok(Response::new(validate::delete_response(resp)))
    }

    async fn scan(&self, req: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let r = req.into_inner();
        let (stale, limit) = validate::check_scan(&r)?;
        self.0.check_running()?;
        if !stale {
            self.0.read_barrier().await?;
        }
        self.0.sm.check_owned(&r.shard_key)?;
        let (items, next_key) = self
            .0
            .sm
            .scan(&r.shard_key, &r.start_key, &r.end_key, limit)?;
        Ok(Response::new(ScanResponse { items, next_key }))
    }

    /// A read-only `Txn` is served like a linearizable `Get`, after a read barrier and without a
    /// raft entry; any other goes through the log.
    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let txn = req.into_inner();
        validate::check_txn(&txn)?;
        if txn::read_only(&txn) {
            return Ok(Response::new(self.0.read_txn(&txn).await?));
        }
        Ok(Response::new(self.0.propose_txn(txn).await?))
    }
}
