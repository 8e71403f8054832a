//! How long the router keeps trying: attempt and deadline bounds, writes whose outcome is
//! unknown, holds on a moving slot.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ordo_proto::v1::*;
use prost::Message;
use tonic::{Code, Status};

use crate::fakes::*;
use crate::support::*;

#[tokio::test]
async fn retries_are_bounded_by_attempts_and_by_the_deadline() {
    let node = spawn_node("down", |s| {
        Some(match s.op {
            "Get" => Status::unavailable("no leader elected yet"),
            _ => not_applied("leader overloaded"),
        })
    })
    .await;
    let other = healthy_node("g2").await;
    let config = spawn_config(map_v(1, &[&node.addr], &[&other.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut c = kv(&router).await;
    let k = key_of_group(1, 0);

    // Plenty of time: the attempts run out first.
    let deadline = Duration::from_secs(8);
    let started = Instant::now();
    let err = c
        .get(with_timeout(get_req(k.clone()), deadline))
        .await
        .unwrap_err();
    assert!(started.elapsed() < deadline);
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().starts_with("group 1: 12 attempts over "),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains(&format!(
            "last error from {}: Unavailable: no leader elected yet",
            node.addr
        )),
        "{}",
        err.message()
    );
    assert!(
        err.details().is_empty(),
        "a router's give-up carries no node hint"
    );
    assert_eq!(seen(&node).len(), 12);

    // A write refused with NotApplied every time: retried as often, and the give-up says that
    // nothing was applied (typed, so a client may retry it).
    let started = Instant::now();
    let err = c
        .put(with_timeout(put_req(k.clone()), deadline))
        .await
        .unwrap_err();
    assert!(started.elapsed() < deadline);
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().starts_with("group 1: 12 attempts over "),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains(&format!(
            "last error from {}: not applied: leader overloaded",
            node.addr
        )),
        "{}",
        err.message()
    );
    assert!(
        err.message().ends_with("the write was not applied"),
        "{}",
        err.message()
    );
    assert!(
        matches!(
            ErrorDetail::decode(err.details()).unwrap().kind,
            Some(error_detail::Kind::NotApplied(_))
        ),
        "{err:?}"
    );
    assert_eq!(seen(&node).len(), 24);

    // A short deadline: the router gives up within it, still with UNAVAILABLE.
    let deadline = Duration::from_millis(300);
    let started = Instant::now();
    let err = c.get(with_timeout(get_req(k), deadline)).await.unwrap_err();
    assert!(started.elapsed() < deadline + Duration::from_millis(200));
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("deadline"), "{}", err.message());
    let attempts = seen(&node).len() - 24;
    assert!((1..12).contains(&attempts), "{attempts}");
    router.shutdown().await;
}

#[tokio::test]
async fn m9_a_write_with_an_unknown_outcome_is_retried_with_its_idempotency_key() {
    // The first replica answers writes with a plain UNAVAILABLE, as a node does when it stopped
    // after proposing: the write may have been applied. The router keys every write, so it
    // sends it again, with the same key, and the node would answer a repeat with the first
    // outcome.
    let unsure = spawn_node("unsure", |s| {
        (s.op != "Get").then(|| {
            Status::unavailable("the replica stopped during the write; its outcome is unknown")
        })
    })
    .await;
    let live = healthy_node("live").await;
    let other = healthy_node("g2").await;
    let config = spawn_config(map_v(1, &[&unsure.addr, &live.addr], &[&other.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut c = kv(&router).await;
    let k = key_of_group(1, 0);

    let client_key = Bytes::from_static(b"the client's own key");
    for op in ["Txn", "Put", "Delete"] {
        match op {
            "Put" => drop(c.put(put_req(k.clone())).await.unwrap()),
            "Delete" => drop(
                c.delete(DeleteRequest {
                    shard_key: k.clone(),
                    ..Default::default()
                })
                .await
                .unwrap(),
            ),
            _ => drop(
                c.txn(TxnRequest {
                    header: Some(RequestHeader {
                        map_version: 0,
                        idempotency_key: client_key.clone(),
                    }),
                    ..writing_txn(&k)
                })
                .await
                .unwrap(),
            ),
        }
    }
    // The first write (a writing Txn) met the unsure replica and was sent again, with its key,
    // to the live one, which the router then used for the others.
    let (first, retried) = (seen(&unsure), seen(&live));
    assert_eq!(
        (first.len(), retried.len()),
        (1, 3),
        "{first:?} {retried:?}"
    );
    assert_eq!(first[0].op, "Txn");
    assert_eq!(
        (&first[0].idempotency_key, &retried[0].idempotency_key),
        (&client_key, &client_key),
        "a client's key is kept, the same on the retry"
    );
    assert_eq!(retried[1].idempotency_key.len(), 16, "the router's own key");
    assert_ne!(retried[1].idempotency_key, retried[2].idempotency_key);

    // A write refused with NotApplied is retried at the next replica.
    let refusing = spawn_node("refusing", |_| {
        Some(not_applied(
            "leadership changed and this write was replaced in the log: it was NOT applied",
        ))
    })
    .await;
    let config = spawn_config(map_v(1, &[&refusing.addr, &live.addr], &[&other.addr])).await;
    let router2 = start_router(vec![config.addr.clone()]).await;
    let mut c2 = kv(&router2).await;
    let resp = c2.put(put_req(k.clone())).await.unwrap().into_inner();
    assert!(resp.succeeded);
    assert_eq!(seen(&refusing).len(), 1);
    assert_eq!(seen(&live).len(), 4);

    // Reads still move on after a plain UNAVAILABLE.
    let flaky_reads = spawn_node("flaky", |_| Some(Status::unavailable("no leader yet"))).await;
    let config = spawn_config(map_v(1, &[&flaky_reads.addr, &live.addr], &[&other.addr])).await;
    let router3 = start_router(vec![config.addr.clone()]).await;
    let got = kv(&router3)
        .await
        .get(get_req(k.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, "live");
    // So do read-only Txns (a node serves them after a read barrier, without the log, and
    // the router forwards them as reads).
    let router4 = start_router(vec![config.addr.clone()]).await;
    let mut read_only = writing_txn(&k);
    read_only.success.clear();
    kv(&router4).await.txn(read_only).await.unwrap();
    let txns_at = |n| seen(n).iter().filter(|s| s.op == "Txn").count();
    assert_eq!((txns_at(&flaky_reads), txns_at(&live)), (1, 2));
    router.shutdown().await;
    router2.shutdown().await;
    router3.shutdown().await;
    router4.shutdown().await;
}

/// A Txn on `k` that compares and writes.
fn writing_txn(k: &Bytes) -> TxnRequest {
    TxnRequest {
        compares: vec![Compare {
            shard_key: k.clone(),
            ..Default::default()
        }],
        success: vec![TxnOp {
            op: Some(txn_op::Op::Put(put_req(k.clone()))),
        }],
        ..Default::default()
    }
}

/// Only the deadline ends a write that may have been applied, not the attempt bound: its client
/// is told the outcome is unknown only once no time is left.
#[tokio::test]
async fn m9_a_write_that_may_have_applied_ends_only_at_its_deadline() {
    let unsure = spawn_node("unsure", |_| {
        Some(Status::unavailable(
            "the replica stopped during the write; its outcome is unknown",
        ))
    })
    .await;
    let other = healthy_node("g2").await;
    let k = key_of_group(1, 0);
    let config = spawn_config(map_v(1, &[&unsure.addr], &[&other.addr])).await;
    let router_unsure = start_router(vec![config.addr.clone()]).await;
    let deadline = Duration::from_secs(4);
    let started = Instant::now();
    let err = kv(&router_unsure)
        .await
        .put(with_timeout(put_req(k.clone()), deadline))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() >= deadline - Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .contains("the outcome of this write is unknown"),
        "{}",
        err.message()
    );
    assert!(err.details().is_empty(), "not NotApplied: {err:?}");
    let attempts = seen(&unsure).len();
    assert!(
        attempts > 12,
        "{attempts} attempts: more than the attempt bound"
    );
    router_unsure.shutdown().await;
}

/// A fake node that accepts HTTP/2 connections, waits until a request's body has arrived, and
/// then drops the connection: a node killed after it received the request. Counts the requests
/// whose body it received.
async fn spawn_breaking_node() -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (listener, addr) = listen().await;
    let received = Arc::new(AtomicUsize::new(0));
    let count = received.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let count = count.clone();
            tokio::spawn(async move {
                // An empty SETTINGS frame, so the client's handshake never waits on us.
                let _ = sock.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                const PREFACE: usize = 24;
                loop {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    // Walk the frames after the preface: a DATA frame (type 0) on a stream means
                    // the request was sent.
                    let mut at = PREFACE;
                    while buf.len() >= at + 9 {
                        let len =
                            u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
                        let kind = buf[at + 3];
                        if buf.len() < at + 9 + len {
                            break;
                        }
                        if kind == 0 {
                            count.fetch_add(1, Ordering::SeqCst);
                            drop(sock); // the node dies with the request in hand
                            return;
                        }
                        at += 9 + len;
                    }
                }
            });
        }
    });
    (addr, received, task)
}

#[tokio::test]
async fn m9_a_write_whose_connection_breaks_mid_request_is_retried_with_its_key() {
    let (breaking, received, _task) = spawn_breaking_node().await;
    let live = healthy_node("live").await;
    let other = healthy_node("g2").await;
    let config = spawn_config(map_v(1, &[&breaking, &live.addr], &[&other.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut c = kv(&router).await;
    let k = key_of_group(1, 0);

    let resp = c.put(put_req(k.clone())).await.unwrap().into_inner();
    assert!(resp.succeeded);
    assert_eq!(
        received.load(Ordering::SeqCst),
        1,
        "the first attempt was sent"
    );
    let retried = seen(&live);
    assert_eq!(retried.len(), 1, "then retried at the next replica");
    assert_eq!(
        retried[0].idempotency_key.len(),
        16,
        "with the router's key"
    );

    // The router moved on to the live replica for what follows.
    let got = c.get(get_req(k)).await.unwrap().into_inner();
    assert_eq!(got.value, "live");
    assert_eq!(received.load(Ordering::SeqCst), 1);
    router.shutdown().await;
}

/// A slot in a migration's critical section: the router holds the write (more times than its
/// attempt bound) and retries the same replica until the donor lets go, then succeeds; the
/// client sees latency, not an error.
#[tokio::test]
async fn a_moving_slot_is_held_and_retried_beyond_the_attempt_bound() {
    let refusals = Arc::new(AtomicUsize::new(0));
    let counted = refusals.clone();
    let node = spawn_node("donor", move |_| {
        if counted.fetch_add(1, Ordering::SeqCst) < 20 {
            let d = ErrorDetail {
                kind: Some(error_detail::Kind::SlotMoving(error_detail::SlotMoving {
                    slot: 1,
                    migration_id: 7,
                })),
            };
            Some(Status::with_details(
                Code::Unavailable,
                "slot moving",
                d.encode_to_vec().into(),
            ))
        } else {
            None
        }
    })
    .await;
    let other = healthy_node("g2").await;
    let config = spawn_config(map_v(1, &[&node.addr], &[&other.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    let mut c = kv(&router).await;
    let resp = c
        .put(put_req(key_of_group(1, 0)))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.succeeded);
    assert_eq!(seen(&node).len(), 21, "20 holds, then the write");
    router.shutdown().await;
}
