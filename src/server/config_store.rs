//! The config server's storage: the shard map is one item of the config group's own replicated KV
//! state machine, changed only by compare-and-set on its version. The config group is an ordinary
//! raft group (id 0), so it inherits durability, snapshots and leader election.

use std::sync::Arc;

use ordo_config::MapStore;
use ordo_proto::v1::{
    compare, txn_op, Compare, MigrationList, PutRequest, ShardMap, TxnOp, TxnRequest,
};
use prost::Message;
use tonic::Status;

use crate::replica::ReplicaHandle;

const MAP_SHARD_KEY: &[u8] = b"__ordo_cluster";
const MAP_KEY: &[u8] = b"shard_map";
/// The migration records (online resharding), a second CAS'd item beside the map.
const MIGRATIONS_KEY: &[u8] = b"migrations";

pub struct ReplicaMapStore {
    pub replica: Arc<ReplicaHandle>,
}

impl ReplicaMapStore {
    async fn load_item<M: Message + Default>(
        &self,
        key: &'static [u8],
        linearizable: bool,
    ) -> Result<(M, u64), Status> {
        self.replica.check_running()?;
        if linearizable {
            self.replica.read_barrier().await?;
        }
        match self.replica.sm.get(MAP_SHARD_KEY, key)? {
            None => Ok((M::default(), 0)),
            Some((version, raw)) => {
                let item = M::decode(raw).map_err(|e| {
                    Status::data_loss(format!(
                        "stored {} does not decode: {e}",
                        String::from_utf8_lossy(key)
                    ))
                })?;
                Ok((item, version))
            }
        }
    }

    async fn save_item(
        &self,
        key: &'static [u8],
        token: u64,
        value: Vec<u8>,
    ) -> Result<bool, Status> {
        let txn = TxnRequest {
            compares: vec![Compare {
                shard_key: MAP_SHARD_KEY.into(),
                key: key.into(),
                target: compare::Target::Version as i32,
                op: compare::Op::Equal as i32,
                version: token,
                ..Default::default()
            }],
            success: vec![TxnOp {
                op: Some(txn_op::Op::Put(PutRequest {
                    shard_key: MAP_SHARD_KEY.into(),
                    key: key.into(),
                    value: value.into(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        crate::server::validate::check_txn(&txn)?;
        Ok(self.replica.propose_txn(txn).await?.succeeded)
    }
}

#[tonic::async_trait]
impl MapStore for ReplicaMapStore {
    async fn load(&self, linearizable: bool) -> Result<(ShardMap, u64), Status> {
        self.load_item(MAP_KEY, linearizable).await
    }

    async fn save(&self, token: u64, map: &ShardMap) -> Result<bool, Status> {
        self.save_item(MAP_KEY, token, map.encode_to_vec()).await
    }

    async fn load_migrations(&self, linearizable: bool) -> Result<(MigrationList, u64), Status> {
        self.load_item(MIGRATIONS_KEY, linearizable).await
    }

    async fn save_migrations(&self, token: u64, list: &MigrationList) -> Result<bool, Status> {
        self.save_item(MIGRATIONS_KEY, token, list.encode_to_vec())
            .await
    }

    fn stopped(&self) -> bool {
        *self.replica.stop.borrow()
    }

    fn stop_signal(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        Some(self.replica.stop.clone())
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.replica.sm.subscribe()
    }

    fn config_addrs(&self) -> Vec<String> {
        self.replica
            .peers
            .read()
            .unwrap()
            .values()
            .cloned()
            .collect()
    }
}
