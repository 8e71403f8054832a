//! The edge of the KV API: every client request is checked against `limits.rs` here, and
//! `Put`/`Delete` are turned into the `Txn`s the state machine applies. Nothing unchecked gets
//! past this module, so a bad request can never reach the raft log.

use ordo_proto::v1::{
    compare, txn_op, txn_op_result, Compare, Consistency, DecideRequest, DeleteRequest,
    DeleteResponse, GetRequest, GetResponse, PutRequest, PutResponse, RequestHeader, ScanRequest,
    TxnOp, TxnRequest, TxnResponse,
};

use crate::error::{Error, Result};
use crate::limits::*;

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

pub fn check_shard_key(sk: &[u8]) -> Result<()> {
    if sk.is_empty() {
        return Err(invalid(
            "shard_key is empty; every item needs a shard key (the order ID)".into(),
        ));
    }
    if sk.len() > SHARD_KEY_BYTES_MAX {
        return Err(invalid(format!(
            "shard_key is {} bytes; the limit is {SHARD_KEY_BYTES_MAX} bytes",
            sk.len()
        )));
    }
    Ok(())
}

pub fn check_key(key: &[u8]) -> Result<()> {
    if key.len() > KEY_BYTES_MAX {
        return Err(invalid(format!(
            "key is {} bytes; the limit is {KEY_BYTES_MAX} bytes",
            key.len()
        )));
    }
    Ok(())
}

fn check_value(value: &[u8]) -> Result<()> {
    if value.len() > VALUE_BYTES_MAX {
        return Err(invalid(format!(
            "value is {} bytes; the limit is {VALUE_BYTES_MAX} bytes",
            value.len()
        )));
    }
    Ok(())
}

/// An idempotency key is 1 to `IDEMPOTENCY_KEY_BYTES_MAX` bytes (empty = none).
fn check_header(h: Option<&RequestHeader>) -> Result<()> {
    let len = h.map_or(0, |h| h.idempotency_key.len());
    if len > IDEMPOTENCY_KEY_BYTES_MAX {
        return Err(invalid(format!(
            "idempotency_key is {len} bytes; the limit is IDEMPOTENCY_KEY_BYTES_MAX \
             ({IDEMPOTENCY_KEY_BYTES_MAX} bytes)"
        )));
    }
    Ok(())
}

/// Whether a read asked for a stale (any-replica) read.
pub fn check_consistency(raw: i32) -> Result<bool> {
    match Consistency::try_from(raw) {
        Ok(Consistency::Linearizable) => Ok(false),
        Ok(Consistency::Stale) => Ok(true),
        Err(_) => Err(invalid(format!(
            "consistency {raw} is unknown; use 0 (LINEARIZABLE) or 1 (STALE)"
        ))),
    }
}

pub fn check_get(r: &GetRequest) -> Result<bool> {
    check_shard_key(&r.shard_key)?;
    check_key(&r.key)?;
    check_consistency(r.consistency)
}

/// Checks a scan and returns `(stale, limit)`.
pub fn check_scan(r: &ScanRequest) -> Result<(bool, usize)> {
    check_shard_key(&r.shard_key)?;
    check_key(&r.start_key)?;
    check_key(&r.end_key)?;
    if !r.end_key.is_empty() && r.end_key < r.start_key {
        return Err(invalid("scan end_key sorts before start_key".into()));
    }
    if r.limit > SCAN_LIMIT_MAX {
        return Err(invalid(format!(
            "scan limit {} is above the maximum page of {SCAN_LIMIT_MAX} items; page with next_key",
            r.limit
        )));
    }
    let limit = if r.limit == 0 {
        SCAN_LIMIT_MAX
    } else {
        r.limit
    };
    Ok((check_consistency(r.consistency)?, limit as usize))
}

fn check_compare(c: &Compare) -> Result<()> {
    check_shard_key(&c.shard_key)?;
    check_key(&c.key)?;
    check_value(&c.value)?;
    let target = compare::Target::try_from(c.target).map_err(|_| {
        invalid(format!(
            "compare target {} is unknown; use VERSION, VALUE or EXISTS",
            c.target
        ))
    })?;
    let op = compare::Op::try_from(c.op).map_err(|_| {
        invalid(format!(
            "compare op {} is unknown; use EQUAL, NOT_EQUAL, LESS or GREATER",
            c.op
        ))
    })?;
    if target == compare::Target::Exists
        && !matches!(op, compare::Op::Equal | compare::Op::NotEqual)
    {
        return Err(invalid(
            "an EXISTS compare takes only EQUAL or NOT_EQUAL".into(),
        ));
    }
    Ok(())
}

fn check_op(op: &TxnOp) -> Result<()> {
    match op.op.as_ref() {
        Some(txn_op::Op::Put(p)) => {
            check_shard_key(&p.shard_key)?;
            check_key(&p.key)?;
            check_value(&p.value)?;
            if p.if_version.is_some() {
                return Err(invalid("if_version is not allowed on an op inside a Txn; add a VERSION compare instead".into()));
            }
        }
        Some(txn_op::Op::Delete(d)) => {
            check_shard_key(&d.shard_key)?;
            check_key(&d.key)?;
            if d.if_version.is_some() {
                return Err(invalid("if_version is not allowed on an op inside a Txn; add a VERSION compare instead".into()));
            }
        }
        Some(txn_op::Op::Get(g)) => {
            check_shard_key(&g.shard_key)?;
            check_key(&g.key)?;
            check_consistency(g.consistency)?;
        }
        // An event with no stored item: bounded as a put is.
        Some(txn_op::Op::Emit(e)) => {
            check_shard_key(&e.shard_key)?;
            check_key(&e.key)?;
            check_value(&e.value)?;
        }
        Some(txn_op::Op::FeedAck(a)) => {
            ordo_proto::check_group_name(&a.group).map_err(invalid)?;
            check_shard_key(&a.shard_key)?;
            if a.seq == 0 || a.attempt == 0 {
                return Err(invalid(format!(
                    "feed_ack names seq {} attempt {}; deliveries start at seq 1, attempt 1",
                    a.seq, a.attempt
                )));
            }
        }
        None => {
            return Err(invalid(
                "a TxnOp has no put, delete, get, emit or feed_ack".into(),
            ))
        }
    }
    Ok(())
}

fn op_bytes(op: &TxnOp) -> usize {
    match op.op.as_ref() {
        Some(txn_op::Op::Put(p)) => p.shard_key.len() + p.key.len() + p.value.len(),
        Some(txn_op::Op::Delete(d)) => d.shard_key.len() + d.key.len(),
        Some(txn_op::Op::Get(g)) => g.shard_key.len() + g.key.len(),
        Some(txn_op::Op::Emit(e)) => e.shard_key.len() + e.key.len() + e.value.len(),
        Some(txn_op::Op::FeedAck(a)) => a.group.len() + a.shard_key.len(),
        None => 0,
    }
}

/// A decision's dedup fields: a digest of `REQUEST_DIGEST_BYTES` with a key (none without), an
/// outcome within `DEDUP_OUTCOME_BYTES_MAX`.
pub fn check_decide(d: &DecideRequest) -> Result<()> {
    check_header(d.header.as_ref())?;
    let keyed = d
        .header
        .as_ref()
        .is_some_and(|h| !h.idempotency_key.is_empty());
    let digest = d.request_digest.len();
    if keyed && digest != ordo_proto::REQUEST_DIGEST_BYTES || !keyed && digest != 0 {
        return Err(invalid(format!(
            "request_digest has {digest} bytes; a decision with an idempotency key carries \
             {} (ordo_proto::request_digest), one without carries none",
            ordo_proto::REQUEST_DIGEST_BYTES
        )));
    }
    let outcome = d.outcome.as_ref().map_or(0, prost::Message::encoded_len);
    if outcome > DEDUP_OUTCOME_BYTES_MAX {
        return Err(invalid(format!(
            "outcome is {outcome} bytes; the limit is DEDUP_OUTCOME_BYTES_MAX \
             ({DEDUP_OUTCOME_BYTES_MAX} bytes): send none, it is then not kept"
        )));
    }
    Ok(())
}

/// A 2PC part: a checked Txn (its `feed_ack`s are checked and locked by the prepare).
pub fn check_part(part: &TxnRequest) -> Result<()> {
    check_txn(part)
}

pub fn check_txn(t: &TxnRequest) -> Result<()> {
    check_header(t.header.as_ref())?;
    let ops = t.compares.len() + t.success.len() + t.failure.len();
    if ops > TXN_OPS_MAX {
        return Err(invalid(format!(
            "txn has {ops} compares and ops; the limit is {TXN_OPS_MAX}"
        )));
    }
    for c in &t.compares {
        check_compare(c)?;
    }
    for op in t.success.iter().chain(&t.failure) {
        check_op(op)?;
    }
    let bytes: usize = t
        .compares
        .iter()
        .map(|c| c.shard_key.len() + c.key.len() + c.value.len())
        .sum::<usize>()
        + t.success
            .iter()
            .chain(&t.failure)
            .map(op_bytes)
            .sum::<usize>();
    if bytes > TXN_BYTES_MAX {
        return Err(invalid(format!(
            "txn carries {bytes} bytes of keys and values; the limit is {TXN_BYTES_MAX} bytes"
        )));
    }
    Ok(())
}

fn version_compare(shard_key: &bytes::Bytes, key: &bytes::Bytes, version: u64) -> Compare {
    Compare {
        shard_key: shard_key.clone(),
        key: key.clone(),
        target: compare::Target::Version as i32,
        op: compare::Op::Equal as i32,
        version,
        ..Default::default()
    }
}

fn get_op(shard_key: &bytes::Bytes, key: &bytes::Bytes) -> TxnOp {
    TxnOp {
        op: Some(txn_op::Op::Get(GetRequest {
            shard_key: shard_key.clone(),
            key: key.clone(),
            ..Default::default()
        })),
    }
}

/// A checked `Put` as the `Txn` that applies it: the optional version compare, the put, and on a
/// failed compare a get that reports the current version.
pub fn put_as_txn(r: PutRequest) -> Result<TxnRequest> {
    check_header(r.header.as_ref())?;
    check_shard_key(&r.shard_key)?;
    check_key(&r.key)?;
    check_value(&r.value)?;
    let (header, if_version) = (r.header, r.if_version);
    let (sk, key) = (r.shard_key.clone(), r.key.clone());
    let op = txn_op::Op::Put(PutRequest {
        if_version: None,
        header: None,
        ..r
    });
    Ok(single_op_txn(header, &sk, &key, if_version, op))
}

pub fn delete_as_txn(r: DeleteRequest) -> Result<TxnRequest> {
    check_header(r.header.as_ref())?;
    check_shard_key(&r.shard_key)?;
    check_key(&r.key)?;
    let (header, if_version) = (r.header, r.if_version);
    let (sk, key) = (r.shard_key.clone(), r.key.clone());
    let op = txn_op::Op::Delete(DeleteRequest {
        if_version: None,
        header: None,
        ..r
    });
    Ok(single_op_txn(header, &sk, &key, if_version, op))
}

/// `op` on one item as a `Txn`: with `if_version`, a version compare guards it and the failure
/// branch reads the item, so the answer can report its current version.
fn single_op_txn(
    header: Option<RequestHeader>,
    sk: &bytes::Bytes,
    key: &bytes::Bytes,
    if_version: Option<u64>,
    op: txn_op::Op,
) -> TxnRequest {
    let mut txn = TxnRequest {
        header,
        ..Default::default()
    };
    if let Some(v) = if_version {
        txn.compares.push(version_compare(sk, key, v));
        txn.failure.push(get_op(sk, key));
    }
    txn.success.push(TxnOp { op: Some(op) });
    txn
}

fn first_result(resp: &TxnResponse) -> Option<&txn_op_result::Result> {
    resp.results.first().and_then(|r| r.result.as_ref())
}

pub fn put_response(resp: TxnResponse) -> PutResponse {
    match first_result(&resp) {
        Some(txn_op_result::Result::Put(p)) => *p,
        Some(txn_op_result::Result::Get(GetResponse { version, .. })) => PutResponse {
            succeeded: false,
            version: *version,
        },
        other => unreachable!("a put txn answered {other:?}"),
    }
}

pub fn delete_response(resp: TxnResponse) -> DeleteResponse {
    match first_result(&resp) {
        Some(txn_op_result::Result::Delete(d)) => *d,
        Some(txn_op_result::Result::Get(GetResponse { version, .. })) => DeleteResponse {
            succeeded: false,
            deleted: false,
            prev_version: *version,
        },
        other => unreachable!("a delete txn answered {other:?}"),
    }
}

/// A checked `CreateGroupRequest` as the definition every slot's record keeps (defaults filled
/// in, shard keys sorted without repeats) and where the group starts.
pub fn check_group_create(
    r: &ordo_proto::v1::CreateGroupRequest,
) -> Result<(ordo_proto::v1::GroupDef, ordo_proto::v1::GroupStart)> {
    use ordo_proto::v1::{GroupDef, Mode, PoisonPolicy};
    ordo_proto::check_group_name(&r.group).map_err(invalid)?;
    check_key(&r.key_prefix)?;
    if r.shard_keys.len() > FEED_SHARD_KEYS_MAX {
        return Err(invalid(format!(
            "a group over {} shard keys is over FEED_SHARD_KEYS_MAX ({FEED_SHARD_KEYS_MAX})",
            r.shard_keys.len()
        )));
    }
    for sk in &r.shard_keys {
        check_shard_key(sk)?;
    }
    if Mode::try_from(r.mode).is_err() || PoisonPolicy::try_from(r.poison).is_err() {
        return Err(invalid(format!(
            "unknown mode {} or poison policy {}",
            r.mode, r.poison
        )));
    }
    if r.ack_wait_ms > FEED_GROUP_ACK_WAIT_MS_MAX {
        return Err(invalid(format!(
            "ack_wait_ms {} is over FEED_GROUP_ACK_WAIT_MS_MAX ({FEED_GROUP_ACK_WAIT_MS_MAX}); \
             a member that needs longer sends InProgress",
            r.ack_wait_ms
        )));
    }
    if r.max_deliver > FEED_GROUP_MAX_DELIVER_MAX {
        return Err(invalid(format!(
            "max_deliver {} is over FEED_GROUP_MAX_DELIVER_MAX ({FEED_GROUP_MAX_DELIVER_MAX})",
            r.max_deliver
        )));
    }
    let mut shard_keys = r.shard_keys.clone();
    shard_keys.sort();
    shard_keys.dedup();
    let def = GroupDef {
        group: r.group.clone(),
        key_prefix: r.key_prefix.clone(),
        mode: r.mode,
        ack_wait_ms: match r.ack_wait_ms {
            0 => FEED_GROUP_ACK_WAIT_MS_DEFAULT,
            n => n,
        },
        max_deliver: match r.max_deliver {
            0 => FEED_GROUP_MAX_DELIVER_DEFAULT,
            n => n,
        },
        poison: r.poison,
        shard_keys,
    };
    Ok((def, check_group_start(r.from, r.after_ts_ms)?))
}

/// Where a group starts (or is sought to): a time, else now or oldest (a snapshot is refused).
pub fn check_group_start(from: i32, after_ts_ms: u64) -> Result<ordo_proto::v1::GroupStart> {
    use ordo_proto::v1::group_start::At;
    use ordo_proto::v1::watch_request::Start;
    let at =
        match (after_ts_ms, Start::try_from(from)) {
            (ts, _) if ts > 0 => At::AfterTsMs(ts),
            (_, Ok(Start::FromNow)) => At::Now(true),
            (_, Ok(Start::FromOldest)) => At::Oldest(true),
            (_, Ok(Start::FromSnapshot)) => return Err(invalid(
                "FROM_SNAPSHOT: a consumer group delivers events, not items; start FROM_OLDEST \
                 or FROM_NOW (or watch FROM_SNAPSHOT)"
                    .into(),
            )),
            (_, Err(_)) => return Err(invalid(format!("unknown start {from}"))),
        };
    Ok(ordo_proto::v1::GroupStart { at: Some(at) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(n: usize) -> bytes::Bytes {
        vec![b'x'; n].into()
    }

    #[test]
    fn limits_are_named_in_errors() {
        let mut cases: Vec<(Result<TxnRequest>, &str)> = vec![
            (
                put_as_txn(PutRequest {
                    shard_key: b(0),
                    ..Default::default()
                }),
                "shard_key is empty",
            ),
            (
                put_as_txn(PutRequest {
                    shard_key: b(257),
                    ..Default::default()
                }),
                "limit is 256 bytes",
            ),
            (
                put_as_txn(PutRequest {
                    shard_key: b(1),
                    key: b(4097),
                    ..Default::default()
                }),
                "limit is 4096 bytes",
            ),
            (
                put_as_txn(PutRequest {
                    shard_key: b(1),
                    value: b(VALUE_BYTES_MAX + 1),
                    ..Default::default()
                }),
                "limit is 1048576 bytes",
            ),
        ];
        let keyed = |n| {
            Some(RequestHeader {
                idempotency_key: b(n),
                ..Default::default()
            })
        };
        cases.push((
            put_as_txn(PutRequest {
                header: keyed(65),
                shard_key: b(1),
                ..Default::default()
            }),
            "idempotency_key is 65 bytes; the limit is IDEMPOTENCY_KEY_BYTES_MAX (64 bytes)",
        ));
        cases.push((
            delete_as_txn(DeleteRequest {
                header: keyed(65),
                shard_key: b(1),
                ..Default::default()
            }),
            "IDEMPOTENCY_KEY_BYTES_MAX",
        ));
        let t = TxnRequest {
            header: keyed(65),
            success: vec![get_op(&b(1), &b(1))],
            ..Default::default()
        };
        cases.push((check_txn(&t).map(|_| t), "IDEMPOTENCY_KEY_BYTES_MAX"));
        for (r, needle) in cases {
            let msg = r.unwrap_err().to_string();
            assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
        }
        assert!(put_as_txn(PutRequest {
            header: keyed(64),
            shard_key: b(256),
            key: b(4096),
            value: b(VALUE_BYTES_MAX),
            ..Default::default()
        })
        .is_ok());
    }

    /// An Emit is bounded as a put is, and its value counts in the Txn's bytes like a put's.
    #[test]
    fn emits_are_bounded_like_puts() {
        let emit = |sk: usize, key: usize, value: usize| TxnRequest {
            success: vec![TxnOp {
                op: Some(txn_op::Op::Emit(ordo_proto::v1::EmitRequest {
                    shard_key: b(sk),
                    key: b(key),
                    value: b(value),
                })),
            }],
            ..Default::default()
        };
        for (t, needle) in [
            (emit(0, 1, 1), "shard_key is empty"),
            (emit(1, 4097, 1), "limit is 4096 bytes"),
            (emit(1, 1, VALUE_BYTES_MAX + 1), "limit is 1048576 bytes"),
        ] {
            let msg = check_txn(&t).unwrap_err().to_string();
            assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
        }
        check_txn(&emit(256, 4096, VALUE_BYTES_MAX)).unwrap();
        let mut many = emit(1, 1, VALUE_BYTES_MAX);
        many.success = vec![many.success[0].clone(); TXN_BYTES_MAX / VALUE_BYTES_MAX + 1];
        let msg = check_txn(&many).unwrap_err().to_string();
        assert!(
            msg.contains("TXN_BYTES_MAX") || msg.contains(&TXN_BYTES_MAX.to_string()),
            "{msg}"
        );
    }

    /// A feed ack names a valid group, a shard key, and a delivery (seq and attempt from 1),
    /// in a Txn as in a 2PC part.
    #[test]
    fn feed_acks_are_checked_in_txns_and_parts() {
        let ack = |group: &str, seq: u64, attempt: u32| TxnRequest {
            success: vec![
                get_op(&b(1), &b(1)),
                TxnOp {
                    op: Some(txn_op::Op::FeedAck(ordo_proto::v1::FeedAckRequest {
                        group: group.into(),
                        slot: 0,
                        seq,
                        attempt,
                        shard_key: b(1),
                    })),
                },
            ],
            ..Default::default()
        };
        check_txn(&ack("billing", 1, 1)).unwrap();
        for (t, needle) in [
            (ack("", 1, 1), "FEED_GROUP_NAME_BYTES_MAX"),
            (ack(&"g".repeat(65), 1, 1), "FEED_GROUP_NAME_BYTES_MAX"),
            (ack("a/b", 1, 1), "'/'"),
            (ack("billing", 0, 1), "seq 0"),
            (ack("billing", 1, 0), "attempt 0"),
        ] {
            let msg = check_txn(&t).unwrap_err().to_string();
            assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
        }
        check_part(&ack("billing", 1, 1)).unwrap();
        check_part(&TxnRequest {
            success: vec![get_op(&b(1), &b(1))],
            ..Default::default()
        })
        .unwrap();
    }

    #[test]
    fn txn_op_count_and_enums_are_checked() {
        let op = get_op(&b(1), &b(1));
        let t = TxnRequest {
            success: vec![op.clone(); 129],
            ..Default::default()
        };
        assert!(check_txn(&t)
            .unwrap_err()
            .to_string()
            .contains("limit is 128"));
        let t = TxnRequest {
            success: vec![op; 128],
            ..Default::default()
        };
        assert!(check_txn(&t).is_ok());
        let mut c = version_compare(&b(1), &b(1), 0);
        c.target = 9;
        assert!(check_txn(&TxnRequest {
            compares: vec![c],
            ..Default::default()
        })
        .unwrap_err()
        .to_string()
        .contains("target 9"));
        let mut c = version_compare(&b(1), &b(1), 0);
        c.target = compare::Target::Exists as i32;
        c.op = compare::Op::Less as i32;
        assert!(check_txn(&TxnRequest {
            compares: vec![c],
            ..Default::default()
        })
        .is_err());
        assert!(check_txn(&TxnRequest {
            success: vec![TxnOp { op: None }],
            ..Default::default()
        })
        .is_err());
        assert!(check_consistency(5)
            .unwrap_err()
            .to_string()
            .contains("consistency 5"));
    }

    #[test]
    fn m9_a_decision_carries_a_digest_exactly_when_it_carries_a_key() {
        let keyed = |digest: usize| DecideRequest {
            header: Some(RequestHeader {
                map_version: 0,
                idempotency_key: b(8),
            }),
            request_digest: b(digest),
            ..Default::default()
        };
        assert!(check_decide(&keyed(ordo_proto::REQUEST_DIGEST_BYTES)).is_ok());
        assert!(check_decide(&DecideRequest::default()).is_ok());
        for bad in [
            keyed(0),
            keyed(11),
            DecideRequest {
                request_digest: b(12),
                ..Default::default()
            },
        ] {
            let e = check_decide(&bad).unwrap_err().to_string();
            assert!(e.contains("request_digest"), "{e}");
        }
        let big = DecideRequest {
            outcome: Some(TxnResponse {
                succeeded: true,
                results: vec![
                    ordo_proto::v1::TxnOpResult {
                        result: Some(txn_op_result::Result::Get(GetResponse {
                            found: true,
                            value: b(DEDUP_OUTCOME_BYTES_MAX),
                            version: 1,
                        })),
                    };
                    1
                ],
            }),
            ..keyed(12)
        };
        let e = check_decide(&big).unwrap_err().to_string();
        assert!(e.contains("DEDUP_OUTCOME_BYTES_MAX"), "{e}");
    }
}
