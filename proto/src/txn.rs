//! What every layer asks of a `Txn`'s ops: the shard key an op names, and whether ops write.

use bytes::Bytes;

use crate::v1::{txn_op, TxnOp, TxnRequest};

impl TxnOp {
    /// The shard key the op names (`None` for an op without a body, which validation refuses).
    pub fn shard_key(&self) -> Option<&Bytes> {
        Some(match self.op.as_ref()? {
            txn_op::Op::Put(p) => &p.shard_key,
            txn_op::Op::Delete(d) => &d.shard_key,
            txn_op::Op::Get(g) => &g.shard_key,
            txn_op::Op::Emit(e) => &e.shard_key,
            txn_op::Op::FeedAck(a) => &a.shard_key,
        })
    }

    /// Whether the op changes anything: a Put, a Delete, an Emit (which appends an event) or a
    /// FeedAck (which moves a consumer group's state).
    pub fn writes(&self) -> bool {
        !matches!(self.op, Some(txn_op::Op::Get(_)) | None)
    }
}

impl TxnRequest {
    /// Whether either branch writes: a Txn that does not is only a read.
    pub fn writes(&self) -> bool {
        self.success.iter().chain(&self.failure).any(TxnOp::writes)
    }

    /// Every shard key the Txn names, compares first, then the ops of both branches in order
    /// (with repeats). The first is the Txn's primary.
    pub fn shard_keys(&self) -> impl Iterator<Item = &Bytes> {
        self.compares.iter().map(|c| &c.shard_key).chain(
            self.success
                .iter()
                .chain(&self.failure)
                .filter_map(TxnOp::shard_key),
        )
    }
}
