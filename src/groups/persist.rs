//! A flush of the dispatchers' `Persist` actions as replicated group commands: runs of the same
//! kind share one command (at most `FEED_GROUP_BATCH_MAX` entries), parks and unparks go alone,
//! all proposed one after another in the order given.

use ordo_proto::v1::group_ack::Done as WireDone;
use ordo_proto::v1::group_command::Op;
use ordo_proto::v1::{
    GroupAck, GroupAcks, GroupCommand, GroupDeliveries, GroupDelivery, GroupHorizon, GroupHorizons,
    GroupPark, GroupSkip, GroupUnpark,
};

use super::dispatch::{How, Persist};
use crate::limits::FEED_GROUP_BATCH_MAX;
use crate::replica::ReplicaHandle;
use crate::state::{Command, Outcome};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Acks,
    Deliveries,
    Horizons,
    Alone,
}

fn kind(p: &Persist) -> Kind {
    match p {
        Persist::AckBatch { .. } => Kind::Acks,
        Persist::DeliveryCount { .. } => Kind::Deliveries,
        Persist::Horizon { .. } => Kind::Horizons,
        Persist::Park { .. } | Persist::Unpark { .. } => Kind::Alone,
    }
}

/// The entries `p` adds to its command.
fn entries(p: &Persist) -> usize {
    match p {
        Persist::AckBatch { done, skips, .. } => done.len() + skips.len(),
        _ => 1,
    }
}

/// The command for a run of persists of one kind.
fn command(run: &[(String, Persist)]) -> GroupCommand {
    let (mut acks, mut skips, mut deliveries, mut horizons) = (vec![], vec![], vec![], vec![]);
    let mut alone = None;
    for (group, p) in run {
        let group = group.clone();
        match p {
            Persist::AckBatch {
                slot,
                done,
                skips: s,
            } => {
                acks.extend(done.iter().map(|d| GroupAck {
                    group: group.clone(),
                    slot: *slot,
                    seq: d.seq,
                    attempt: d.attempt,
                    done: match d.how {
                        How::Acked => WireDone::Acked,
                        How::Termed => WireDone::Termed,
                        How::DeadLettered => WireDone::DeadLettered,
                    } as i32,
                }));
                skips.extend(s.iter().map(|&(first_seq, last_seq)| GroupSkip {
                    group: group.clone(),
                    slot: *slot,
                    first_seq,
                    last_seq,
                }));
            }
            &Persist::DeliveryCount {
                slot,
                seq,
                attempt,
                base,
            } => deliveries.push(GroupDelivery {
                group,
                slot,
                seq,
                attempt,
                base,
            }),
            &Persist::Horizon { slot, seq } => horizons.push(GroupHorizon { group, slot, seq }),
            Persist::Park {
                slot,
                shard_key,
                seq,
            } => {
                alone = Some(Op::Park(GroupPark {
                    group,
                    slot: *slot,
                    shard_key: shard_key.clone(),
                    seq: *seq,
                }))
            }
            Persist::Unpark { shard_key, .. } => {
                alone = Some(Op::Unpark(GroupUnpark {
                    group,
                    shard_key: shard_key.clone(),
                }))
            }
        }
    }
    let op = match run.first().map(|(_, p)| kind(p)) {
        Some(Kind::Acks) => Op::Acks(GroupAcks { acks, skips }),
        Some(Kind::Deliveries) => Op::Deliveries(GroupDeliveries { deliveries }),
        Some(Kind::Horizons) => Op::Horizons(GroupHorizons { horizons }),
        _ => alone.expect("a run of one park or unpark"),
    };
    GroupCommand { op: Some(op) }
}

/// Proposes `batch` in order; each persist comes back with whether its command was applied
/// with nothing refused (a refusal or an unknown outcome: `false`, and the caller reads the
/// slot again from the applied state).
pub(super) async fn apply(
    replica: &ReplicaHandle,
    batch: Vec<(String, Persist)>,
) -> Vec<(String, Persist, bool)> {
    let mut out = Vec::with_capacity(batch.len());
    let mut rest = &batch[..];
    while let Some((_, first)) = rest.first() {
        let k = kind(first);
        let mut n = 1;
        let mut size = entries(first);
        while let Some((_, p)) = rest.get(n) {
            if k == Kind::Alone || kind(p) != k || size + entries(p) > FEED_GROUP_BATCH_MAX {
                break;
            }
            size += entries(p);
            n += 1;
        }
        let (run, tail) = rest.split_at(n);
        rest = tail;
        let ok = match replica.propose(Command::Group(command(run))).await {
            Ok(Outcome::Group(applied)) if applied.refused.is_empty() => true,
            Ok(Outcome::Group(applied)) => {
                let (_, why) = &applied.refused[0];
                tracing::warn!(
                    group = replica.group_id,
                    refused = applied.refused.len(),
                    "consumer groups: a flush was partly refused ({why}); its slots are read again"
                );
                false
            }
            Ok(other) => unreachable!("a group command produced {other:?}"),
            Err(e) => {
                tracing::info!(
                    group = replica.group_id,
                    "consumer groups: a flush failed: {e}"
                );
                false
            }
        };
        out.extend(run.iter().cloned().map(|(g, p)| (g, p, ok)));
    }
    out
}
