//! One member of a consumer group: a `Feed.Consume` stream through the router that acks every
//! delivery at once, either on the stream (`Ack`, applied by the node's ack flush) or in a `Txn`
//! that also writes the consumer's read-model item under the event's shard key (`feed_ack`),
//! and grants one credit back per delivery handled. What every member saw goes into one
//! [`Tally`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::Bytes;
use ordo_proto::client::Client;
use ordo_proto::v1::consume_request::Msg;
use ordo_proto::v1::{
    txn_op, Ack, ChangeEvent, ConsumeRequest, Credit, FeedAckRequest, Join, PutRequest, TxnOp,
    TxnRequest,
};
use serde::Serialize;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::feed::Probe;

/// How a member acknowledges a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// `Ack` on the Consume stream (the node applies acks in ~50 ms flushes).
    Plain,
    /// A `Txn` putting the read-model item `rm/<group>` under the event's shard key and
    /// acknowledging the delivery with `feed_ack`: both apply in one raft entry, or neither.
    Txn,
}

/// What the members of one run saw, shared by all of them.
pub struct Tally {
    inner: Mutex<Counts>,
    /// Woken whenever `done` grows.
    pub progress: Notify,
    /// Each delivery's arrival (event matched to the write that made it), for the live phase.
    pub delivered: Arc<Probe>,
    /// Each transactional ack's success, for the live phase.
    pub applied: Arc<Probe>,
}

/// Counters of a run's deliveries.
#[derive(Default, Clone, Debug, Serialize)]
pub struct Counts {
    /// Deliveries received (every attempt).
    pub deliveries: u64,
    /// Of those, with attempt > 1.
    pub redeliveries: u64,
    /// `refused` answers to plain acks (a superseded attempt).
    pub refused: u64,
    /// Transactional acks refused as stale (FAILED_PRECONDITION): the event comes again.
    pub txn_stale: u64,
    /// Transactional acks that failed otherwise.
    pub txn_errors: u64,
    /// Distinct events handled (acked on the stream, or whose ack Txn succeeded).
    pub done: u64,
    #[serde(skip)]
    seen: HashSet<(u32, u64)>,
    /// When the last new event was handled.
    #[serde(skip)]
    pub last_done: Option<Instant>,
}

impl Tally {
    pub fn new() -> Arc<Tally> {
        Arc::new(Tally {
            inner: Mutex::new(Counts::default()),
            progress: Notify::new(),
            delivered: Arc::new(Probe::default()),
            applied: Arc::new(Probe::default()),
        })
    }

    pub fn counts(&self) -> Counts {
        self.inner.lock().expect("tally lock").clone()
    }

    fn delivery(&self, attempt: u32) {
        let mut c = self.inner.lock().expect("tally lock");
        c.deliveries += 1;
        if attempt > 1 {
            c.redeliveries += 1;
        }
    }

    fn done(&self, slot: u32, seq: u64) {
        let mut c = self.inner.lock().expect("tally lock");
        if c.seen.insert((slot, seq)) {
            c.done += 1;
            c.last_done = Some(Instant::now());
            drop(c);
            self.progress.notify_waiters();
        }
    }

    fn count(&self, f: impl FnOnce(&mut Counts)) {
        f(&mut self.inner.lock().expect("tally lock"));
    }
}

/// One member's settings.
#[derive(Clone)]
pub struct MemberConfig {
    pub group: String,
    pub name: String,
    pub credits: u32,
    pub ack: AckMode,
}

/// Runs one member until `stop` turns true (then its request stream ends cleanly, so the node
/// hands its in-flight events on at once) or its stream fails.
pub async fn run_member(
    client: Client,
    cfg: MemberConfig,
    tally: Arc<Tally>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Room for one ack and one credit per delivery the member may hold, plus the join.
    let (tx, rx) = mpsc::channel::<ConsumeRequest>(2 * cfg.credits as usize + 2);
    let send = |msg: Msg| ConsumeRequest { msg: Some(msg) };
    tx.send(send(Msg::Join(Join {
        group: cfg.group.clone(),
        member: cfg.name.clone(),
        credits: cfg.credits,
    })))
    .await
    .context("queueing the join")?;
    let mut stream = client
        .consume(ReceiverStream::new(rx))
        .await
        .with_context(|| format!("member {} joining", cfg.name))?;
    // Transactional acks run concurrently, at most one per credit.
    let in_flight = Arc::new(Semaphore::new(cfg.credits.max(1) as usize));
    let mut acks = tokio::task::JoinSet::new();
    loop {
        let resp = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            resp = stream.message() => resp,
        };
        let resp = match resp {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(s) if *stop.borrow() => {
                log_stop_error(&cfg.name, &s);
                break;
            }
            Err(s) => return Err(s).with_context(|| format!("member {}", cfg.name)),
        };
        if resp.refused.is_some() {
            tally.count(|c| c.refused += 1);
            continue;
        }
        let Some(e) = resp.event else {
            continue;
        };
        let at = Instant::now();
        tally.delivery(resp.attempt);
        tally
            .delivered
            .seen((e.shard_key.clone(), e.key.clone(), e.version), at);
        match cfg.ack {
            AckMode::Plain => {
                let ack = Ack {
                    slot: e.slot,
                    seq: e.seq,
                    attempt: resp.attempt,
                };
                let sent = tx.send(send(Msg::Ack(ack))).await.is_ok()
                    && tx
                        .send(send(Msg::Credit(Credit { credits: 1 })))
                        .await
                        .is_ok();
                if sent {
                    tally.done(e.slot, e.seq);
                }
            }
            AckMode::Txn => {
                let permit = in_flight.clone().acquire_owned().await?;
                let (client, tally, tx) = (client.clone(), tally.clone(), tx.clone());
                let group = cfg.group.clone();
                acks.spawn(async move {
                    txn_ack(&client, &group, &e, resp.attempt, &tally).await;
                    drop(permit);
                    let _ = tx.send(send(Msg::Credit(Credit { credits: 1 }))).await;
                });
            }
        }
        // Reap finished acks so the set stays as small as the credits.
        while acks.try_join_next().is_some() {}
    }
    drop(tx);
    while acks.join_next().await.is_some() {}
    Ok(())
}

/// A member's stream that failed after it was told to stop is expected (the router may end it
/// first); said on stderr only when it is not a plain cancellation.
fn log_stop_error(member: &str, s: &tonic::Status) {
    if s.code() != Code::Cancelled {
        eprintln!("member {member}: stream ended while stopping: {s}");
    }
}

/// The read-model update and the ack of `e` in one Txn.
async fn txn_ack(client: &Client, group: &str, e: &ChangeEvent, attempt: u32, tally: &Tally) {
    let put = PutRequest {
        header: None,
        shard_key: e.shard_key.clone(),
        key: Bytes::from(format!("rm/{group}")),
        value: Bytes::from(e.seq.to_string()),
        if_version: None,
    };
    let ack = FeedAckRequest {
        group: group.to_string(),
        slot: e.slot,
        seq: e.seq,
        attempt,
        shard_key: e.shard_key.clone(),
    };
    let req = TxnRequest {
        success: vec![
            TxnOp {
                op: Some(txn_op::Op::Put(put)),
            },
            TxnOp {
                op: Some(txn_op::Op::FeedAck(ack)),
            },
        ],
        ..TxnRequest::default()
    };
    match client.txn(req).await {
        Ok(_) => {
            tally.applied.seen(
                (e.shard_key.clone(), e.key.clone(), e.version),
                Instant::now(),
            );
            tally.done(e.slot, e.seq);
        }
        Err(s) if s.code() == Code::FailedPrecondition => tally.count(|c| c.txn_stale += 1),
        Err(s) => {
            eprintln!("transactional ack of {}/{}: {s}", e.slot, e.seq);
            tally.count(|c| c.txn_errors += 1);
        }
    }
}
