//! The change feed across slot moves and two-phase commit (issue 13, acceptances 2 and 3): a
//! watcher from the oldest event,
//! through the router, runs through the resharding scenarios of `resharding.rs` (the rebalance
//! onto a 4th group under load, the three kill scenarios, the aborted move, the drain and
//! removal of a group), and the test kit's feed checker proves what it received: per slot the
//! seqs contiguous from 1, every acknowledged write exactly once at its version, an unknown one
//! at most once and as the final data says, the watermark kept.
//!
//! The scenarios themselves stay in `resharding.rs`. The abort and the drain run the watcher
//! always (the feed is part of what a move must not break), so their feed checks cost no
//! cluster of their own, and so do the rebalance and the three kill scenarios. This module
//! holds what they share: [`FeedRun`], and the comparison of two watches event by event for the
//! moves that must leave the feed as it was (an abort) or lose nothing of it (a removed group).
//!
//! The two-phase-commit test is here too, over the bank's accounts and coordinator failpoints
//! (`bank.rs`): its transactions write balances no other write uses, since the feed checker
//! tells puts apart by value, which the bank's transfers do not.

use std::collections::BTreeMap;

use ordo_proto::client::Client;
use ordo_proto::v1::watch_request::{Start as From, StartOneOf};
use ordo_proto::v1::{
    txn_op, txn_op_result, ChangeEvent, EmitRequest, TxnOp, TxnRequest, TxnResponse, WatchRequest,
};
use ordo_router::Failpoint;
use ordo_testkit::feed::{self, Watcher};
use ordo_testkit::inproc::InProcCluster;
use ordo_testkit::linearizability::ItemKey;
use ordo_testkit::{Cluster, SplitMix64};
use tonic::Code;

use crate::bank::{
    account, open_accounts, put, read_accounts, router_with, two_groups_apart, ACCOUNTS, INITIAL,
};
use crate::nemesis::FEED_CATCH_UP;
use crate::resharding::Finished;

/// A watch from the oldest event.
fn from_oldest() -> WatchRequest {
    WatchRequest {
        start: Some(StartOneOf::From(From::FromOldest as i32)),
        ..WatchRequest::default()
    }
}

/// A watcher that began with the cluster (before its first write).
pub(crate) struct FeedRun {
    watcher: Watcher,
}

impl FeedRun {
    /// Starts a watch from the oldest event through `router` and waits until it is live (its
    /// resolved time has passed the moment it started): a write after this returns is in it.
    pub(crate) async fn start(name: &str, router: &str) -> FeedRun {
        let watcher = Watcher::start(name, router, from_oldest(), feed::Start::Empty);
        watcher
            .wait_resolved(ordo_proto::unix_ms(), FEED_CATCH_UP)
            .await;
        FeedRun { watcher }
    }

    /// Waits until the watch has everything committed by `settled_ms`, stops it and hands
    /// back what it received (with how often it reconnected).
    pub(crate) async fn stop_at(self, settled_ms: u64) -> feed::Watch {
        self.watcher.wait_resolved(settled_ms, FEED_CATCH_UP).await;
        let reconnects = self.watcher.reconnects();
        let watch = self.watcher.stop().await.unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "watch {:?}: {} events in {} responses, {reconnects} reconnects",
            watch.name,
            watch.events(),
            watch.responses.len()
        );
        watch
    }

    /// Stops the watch once it has the whole load and checks it against the load's history
    /// and final reads, and `extra` (writes made outside the history: the preload). The watch
    /// and what it was checked against, for further comparisons.
    pub(crate) async fn check(
        self,
        finished: &Finished,
        extra: Vec<feed::Write>,
    ) -> (feed::Watch, feed::Expected) {
        let mut expected =
            feed::Expected::from_history(&finished.history, &finished.finals, finished.settled_ms);
        expected.writes.extend(extra);
        let watch = self.stop_at(finished.settled_ms).await;
        assert_complete(&expected, &watch);
        (watch, expected)
    }
}

/// Checks `watch` (begun with the cluster, resolved past `expected.settled_ms`) against
/// `expected` and fails on any violation; also fails if it did not cover the whole run, since
/// then the writes check would have proved less than it says.
pub(crate) fn assert_complete(expected: &feed::Expected, watch: &feed::Watch) {
    let report = feed::check(expected, std::slice::from_ref(watch));
    eprintln!("feed checker, watch {:?}: {report}", watch.name);
    report.assert_ok();
    assert_eq!(
        report.stats.complete_watches, 1,
        "watch {:?} did not cover the whole run: {:?}",
        watch.name, report.stats
    );
}

/// Every event of a watch by its position in the log, `(slot, seq)`.
pub(crate) fn events_by_position(watch: &feed::Watch) -> BTreeMap<(u32, u64), ChangeEvent> {
    watch
        .responses
        .iter()
        .flat_map(|r| r.response.events.iter())
        .map(|e| ((e.slot, e.seq), e.clone()))
        .collect()
}

/// `later` (a second watch from the oldest event) delivered exactly the events of `earlier`,
/// each at the same slot and seq and equal in every field: the log it reads is the same.
pub(crate) fn assert_same_events(earlier: &feed::Watch, later: &feed::Watch) {
    let (a, b) = (events_by_position(earlier), events_by_position(later));
    if let Some((pos, e)) = a.iter().find(|(pos, e)| b.get(pos) != Some(e)) {
        panic!(
            "watch {:?} has {e:?} at (slot, seq) {pos:?}, watch {:?} has {:?}",
            earlier.name,
            later.name,
            b.get(pos)
        );
    }
    if let Some((pos, e)) = b.iter().find(|(pos, _)| !a.contains_key(pos)) {
        panic!(
            "watch {:?} has {e:?} at (slot, seq) {pos:?}, which watch {:?} never saw",
            later.name, earlier.name
        );
    }
    eprintln!(
        "watches {:?} and {:?}: the same {} events",
        earlier.name,
        later.name,
        a.len()
    );
}

// ---- two-phase commit -------------------------------------------------------------------------

/// Clients of the 2PC test, and the cross-group transactions each sends.
const TXN_CLIENTS: u64 = 4;
const TXNS_PER_CLIENT: u64 = 15;
/// The key of the outbox event each transaction emits beside its first account.
const OUTBOX_KEY: &str = "outbox/transfer";

/// How a transaction ended, as its client (or a later read) knows it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ended {
    /// Committed: the two accounts' new versions, known by `acked_ms`.
    Committed {
        versions: [u64; 2],
        acked_ms: u64,
    },
    Aborted,
    Unknown,
}

/// A cross-group transaction over two accounts of different groups: a put of a balance no
/// other write uses on each (the feed checker tells puts apart by value) and an `Emit` beside
/// the first (an outbox event, with no stored item).
#[derive(Clone, Copy, Debug)]
struct CrossTxn {
    id: u64,
    accounts: [usize; 2],
}

impl CrossTxn {
    fn balances(&self) -> [u64; 2] {
        [1_000_000 + 2 * self.id, 1_000_001 + 2 * self.id]
    }

    fn request(&self) -> TxnRequest {
        let [a, b] = self.accounts;
        let [ba, bb] = self.balances();
        let emit = TxnOp {
            op: Some(txn_op::Op::Emit(EmitRequest {
                shard_key: account(a),
                key: OUTBOX_KEY.into(),
                value: format!("txn {}", self.id).into(),
            })),
        };
        TxnRequest {
            success: vec![put(account(a), ba), put(account(b), bb), emit],
            ..TxnRequest::default()
        }
    }

    /// How a client's answer ended it: no compares, so an answer is a commit; `ABORTED` (a
    /// lock conflict) and a certain refusal change nothing; anything else is unknown.
    fn ended(result: &Result<TxnResponse, tonic::Status>) -> Ended {
        match result {
            Ok(r) => {
                assert!(r.succeeded, "a Txn without compares succeeds: {r:?}");
                let version = |i: usize| match &r.results[i].result {
                    Some(txn_op_result::Result::Put(p)) => p.version,
                    other => panic!("result {i} of {r:?} is {other:?}"),
                };
                Ended::Committed {
                    versions: [version(0), version(1)],
                    acked_ms: ordo_proto::unix_ms(),
                }
            }
            Err(s) if s.code() == Code::Aborted || ordo_proto::certainly_not_applied(s) => {
                Ended::Aborted
            }
            Err(_) => Ended::Unknown,
        }
    }

    /// Its three writes as the feed must show them, under one cross-group label.
    fn writes(&self, ended: Ended) -> Vec<feed::Write> {
        let outcome = |version: u64| match ended {
            Ended::Committed { acked_ms, .. } => feed::Outcome::Applied { version, acked_ms },
            Ended::Aborted => feed::Outcome::NotApplied,
            Ended::Unknown => feed::Outcome::Unknown,
        };
        let versions = match ended {
            Ended::Committed { versions, .. } => versions,
            _ => [0, 0],
        };
        let txn = Some(feed::TxnLabel {
            id: self.id,
            cross_group: true,
        });
        let [a, b] = self.accounts;
        let put = |acct: usize, balance: u64, version: u64| feed::Write {
            item: ItemKey::new(account(acct).to_vec(), ""),
            op: feed::WriteOp::Put {
                value: balance.to_string().into_bytes(),
            },
            outcome: outcome(version),
            txn,
        };
        let [ba, bb] = self.balances();
        vec![
            put(a, ba, versions[0]),
            put(b, bb, versions[1]),
            feed::Write {
                item: ItemKey::new(account(a).to_vec(), OUTBOX_KEY),
                op: feed::WriteOp::Emit {
                    value: format!("txn {}", self.id).into_bytes(),
                },
                outcome: outcome(0),
                txn,
            },
        ]
    }
}

/// The opening of the bank's accounts as the feed must show it (each put at version 1).
fn opened_accounts(acked_ms: u64) -> Vec<feed::Write> {
    (0..ACCOUNTS)
        .map(|i| feed::Write {
            item: ItemKey::new(account(i).to_vec(), ""),
            op: feed::WriteOp::Put {
                value: INITIAL.to_string().into_bytes(),
            },
            outcome: feed::Outcome::Applied {
                version: 1,
                acked_ms,
            },
            txn: None,
        })
        .collect()
}

/// `TXN_CLIENTS` clients each sending `TXNS_PER_CLIENT` cross-group transactions between
/// random accounts of different groups (they contend, so some abort on locks); the writes.
async fn cross_group_load(pg: &InProcCluster, c: &Client) -> Vec<feed::Write> {
    let map = pg.router.shard_map();
    let owner =
        move |i: usize| map.slot_owner[ordo_proto::slot_of(&account(i), map.slot_count) as usize];
    let clients = (0..TXN_CLIENTS).map(|k| {
        let (c, owner) = (c.clone(), owner.clone());
        tokio::spawn(async move {
            let mut rng = SplitMix64(0xFEED_2BC0 ^ k);
            let mut writes = Vec::new();
            for n in 0..TXNS_PER_CLIENT {
                let a = rng.range(0, ACCOUNTS as u64 - 1) as usize;
                let b = loop {
                    let b = rng.range(0, ACCOUNTS as u64 - 1) as usize;
                    if owner(b) != owner(a) {
                        break b;
                    }
                };
                let t = CrossTxn {
                    id: k * TXNS_PER_CLIENT + n,
                    accounts: [a, b],
                };
                let ended = CrossTxn::ended(&c.txn(t.request()).await);
                writes.extend(t.writes(ended));
            }
            writes
        })
    });
    let mut writes = Vec::new();
    for client in clients.collect::<Vec<_>>() {
        writes.extend(client.await.unwrap());
    }
    writes
}

/// A transaction through a router that stops at `fp` (its client hears no outcome), and how
/// it ended once a reader resolved its locks: after prepare undecided, so aborted (neither
/// account changed); after the decision committed (both did).
async fn stopped_txn(pg: &InProcCluster, c: &Client, t: CrossTxn, fp: Failpoint) -> Ended {
    let (router, dying) = router_with(pg, fp).await;
    let answer = dying.txn(t.request()).await;
    assert!(
        answer.is_err(),
        "{fp:?}: the coordinator stopped: {answer:?}"
    );
    router.shutdown().await;
    let [a, b] = t.accounts;
    // A plain Get waits for the lock and resolves it; the read-only Txn then sees both.
    c.get(account(b), "", false).await.unwrap();
    let after = read_accounts(c, &[a, b]).await.unwrap();
    let balances = [after[0].1, after[1].1];
    match fp {
        Failpoint::AfterPrepare => {
            assert!(
                balances.iter().zip(t.balances()).all(|(x, y)| *x != y),
                "{fp:?}: an undecided transaction is aborted: {after:?}"
            );
            Ended::Aborted
        }
        _ => {
            assert_eq!(balances, t.balances(), "{fp:?}: a decided one commits");
            Ended::Committed {
                versions: [after[0].0, after[1].0],
                acked_ms: ordo_proto::unix_ms(),
            }
        }
    }
}

/// Issue 13, acceptance 3 (two-phase commit): with a watcher from the oldest event, cross-group
/// transactions over the bank's accounts, each with an `Emit`: every event of a committed one
/// carries its txn id, the same for all its events, and all of them are delivered (the emit
/// once, with that id); one aborted on a lock conflict, or left prepared by a coordinator that
/// stopped and then resolved to abort, emits nothing; one whose coordinator stopped after the
/// decision is delivered whole once its locks are resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn feed_cross_group_transactions_carry_one_txn_id_and_aborted_ones_emit_nothing() {
    let _heavy = ordo_testkit::HEAVY.lock().await;
    let pg = InProcCluster::start(3, 3).await;
    let feed = FeedRun::start("cross-group transactions", &pg.router_addr()).await;
    let c = pg.client();
    open_accounts(&c).await;
    let mut writes = opened_accounts(ordo_proto::unix_ms());
    writes.extend(cross_group_load(&pg, &c).await);
    let (a, b) = two_groups_apart(&pg);
    let stopped = TXN_CLIENTS * TXNS_PER_CLIENT;
    for (id, fp) in [
        (stopped, Failpoint::AfterPrepare),
        (stopped + 1, Failpoint::AfterDecide),
    ] {
        let t = CrossTxn {
            id,
            accounts: [a, b],
        };
        let ended = stopped_txn(&pg, &c, t, fp).await;
        eprintln!("transaction {id}, coordinator stopped {fp:?}: {ended:?}");
        writes.extend(t.writes(ended));
    }
    let all: Vec<usize> = (0..ACCOUNTS).collect();
    let finals = read_accounts(&c, &all).await.unwrap();
    let expected = feed::Expected {
        final_data: finals
            .iter()
            .enumerate()
            .map(|(i, &(version, balance))| {
                let item = ItemKey::new(account(i).to_vec(), "");
                (item, Some((balance.to_string().into_bytes(), version)))
            })
            .collect(),
        settled_ms: ordo_proto::unix_ms(),
        writes,
    };
    let outcomes = |o: fn(&feed::Outcome) -> bool| {
        let emits = expected
            .writes
            .iter()
            .filter(|w| w.item.key == OUTBOX_KEY.as_bytes());
        emits.filter(|w| o(&w.outcome)).count()
    };
    let committed = outcomes(|o| matches!(o, feed::Outcome::Applied { .. }));
    let aborted = outcomes(|o| *o == feed::Outcome::NotApplied);
    eprintln!(
        "{committed} transactions committed, {aborted} aborted, {} unknown",
        outcomes(|o| *o == feed::Outcome::Unknown)
    );
    assert!(
        committed >= 10 && aborted >= 1,
        "too few committed ({committed}) or aborted ({aborted}) transactions to prove much"
    );
    let watch = feed.stop_at(expected.settled_ms).await;
    assert_complete(&expected, &watch);
    pg.shutdown().await;
}
