//! The config server's storage: the shard map is one item of the meta group's own replicated KV
//! state machine, changed only by compare-and-set on its version. The meta group is an ordinary
//! raft group (id 0), so it inherits durability, snapshots and leader election.

use std::sync::Arc;

use ordo_config::MapStore;
use ordo_proto::v1::{compare, txn_op, Compare, PutRequest, ShardMap, TxnOp, TxnRequest};
use prost::Message;
use tonic::Status;

use crate::service::Replica;

const MAP_SHARD_KEY: &[u8] = b"__ordo_cluster";
const MAP_KEY: &[u8] = b"shard_map";

pub struct ReplicaMapStore {
    pub replica: Arc<Replica>,
}

#[tonic::async_trait]
impl MapStore for ReplicaMapStore {
    async fn load(&self, linearizable: bool) -> Result<(ShardMap, u64), Status> {
        if linearizable {
            self.replica.read_barrier().await?;
        }
        match self.replica.sm.get(MAP_SHARD_KEY, MAP_KEY)? {
            None => Ok((ShardMap::default(), 0)),
            Some((version, raw)) => {
                let map = ShardMap::decode(raw).map_err(|e| {
                    Status::data_loss(format!("stored shard map does not decode: {e}"))
                })?;
                Ok((map, version))
            }
        }
    }

    async fn save(&self, token: u64, map: &ShardMap) -> Result<bool, Status> {
        let txn = TxnRequest {
            compares: vec![Compare {
                shard_key: MAP_SHARD_KEY.into(),
                key: MAP_KEY.into(),
                target: compare::Target::Version as i32,
                op: compare::Op::Equal as i32,
                version: token,
                ..Default::default()
            }],
            success: vec![TxnOp {
                op: Some(txn_op::Op::Put(PutRequest {
                    shard_key: MAP_SHARD_KEY.into(),
                    key: MAP_KEY.into(),
                    value: map.encode_to_vec().into(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        crate::validate::check_txn(&txn)?;
        Ok(self.replica.propose_txn(txn).await?.succeeded)
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
