//! Consumer groups through the router against fake shard-group leaders (`group_fakes.rs`): the
//! admin RPCs' fan-out and merge, and `Consume`'s merge of one node stream per shard group with
//! the member's credits kept by the router.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use ordo_proto::slot_of;
use ordo_proto::v1::consume_request::Msg;
use ordo_proto::v1::feed_client::FeedClient;
use ordo_proto::v1::group_admin_request::Op;
use ordo_proto::v1::watch_request::Start;
use ordo_proto::v1::*;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use crate::fakes::*;
use crate::group_fakes::{GroupNode, Ledger};
use crate::support::*;

type Node = Served<Arc<FeedState>>;

async fn feed(router: &ordo_router::Router) -> FeedClient<Channel> {
    FeedClient::connect(format!("http://{}", router.addr))
        .await
        .unwrap()
}

fn groups(node: &Node) -> &GroupNode {
    &node.state.groups
}

/// Two shard groups of one replica each, owning slots 0..8 and 8..16, and a router.
async fn two_groups() -> (Node, Node, Served<Arc<ConfigState>>, ordo_router::Router) {
    let (g1, g2) = (spawn_feed_node().await, spawn_feed_node().await);
    groups(&g1)
        .owned
        .lock()
        .unwrap()
        .push_back((0..8).collect());
    groups(&g2)
        .owned
        .lock()
        .unwrap()
        .push_back((8..16).collect());
    let config = spawn_config(map_v(1, &[&g1.addr], &[&g2.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    (g1, g2, config, router)
}

fn creates(node: &Node) -> Vec<CreateGroupRequest> {
    let seen = groups(node).admin_seen.lock().unwrap().clone();
    seen.into_iter()
        .filter_map(|r| match r.op {
            Some(Op::Create(c)) => Some(c),
            _ => None,
        })
        .collect()
}

fn create_req(name: &str, shard_keys: Vec<Bytes>) -> CreateGroupRequest {
    CreateGroupRequest {
        group: name.into(),
        key_prefix: Bytes::from_static(b"outbox/"),
        from: Start::FromOldest as i32,
        shard_keys,
        ..Default::default()
    }
}

fn slots_of(g: &ConsumerGroup) -> Vec<u32> {
    g.slots.iter().map(|s| s.slot).collect()
}

#[tokio::test]
async fn create_fans_out_with_sorted_shard_keys_and_merges_the_answers() {
    let (g1, g2, _config, router) = two_groups().await;
    let (a1, a2, b1) = (key_of_group(1, 0), key_of_group(1, 1), key_of_group(2, 0));
    let keys = vec![b1.clone(), a2.clone(), a1.clone(), b1.clone(), a2.clone()];
    let group = feed(&router)
        .await
        .create_group(create_req("billing", keys))
        .await
        .unwrap()
        .into_inner();

    let mut canonical = vec![a1.clone(), a2.clone(), b1.clone()];
    canonical.sort();
    for node in [&g1, &g2] {
        let sent = creates(node);
        assert_eq!(sent.len(), 1, "one create per shard group");
        assert_eq!(sent[0].shard_keys, canonical, "sorted, without repeats");
        assert_eq!(sent[0].ack_wait_ms, 0, "defaults are the node's to fill in");
    }
    let want: BTreeSet<u32> = [&a1, &a2, &b1].iter().map(|k| slot_of(k, SLOTS)).collect();
    assert_eq!(slots_of(&group), want.iter().copied().collect::<Vec<_>>());
    assert_eq!(group.shard_keys, canonical, "the union of both answers");
    assert_eq!(group.pending, want.len() as u64, "summed over shard groups");
    assert_eq!(group.lag_events, 2 * want.len() as u64);
    assert_eq!(group.ack_wait_ms, 30_000);
}

#[tokio::test]
async fn create_is_sent_again_until_every_slot_is_covered() {
    let (g1, g2, config, router) = two_groups().await;
    // Slot 15 is moving from group 2 to group 1: the first round finds it in neither.
    *groups(&g2).owned.lock().unwrap() = [(8..15).collect()].into();
    *groups(&g1).owned.lock().unwrap() = [(0..8).collect(), (0..8).chain([15]).collect()].into();
    let group = feed(&router)
        .await
        .create_group(create_req("billing", vec![]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(slots_of(&group), (0..16).collect::<Vec<_>>());
    assert_eq!((creates(&g1).len(), creates(&g2).len()), (2, 2));
    assert!(config.state.linearizable_gets.load(Ordering::SeqCst) >= 1);
}

#[tokio::test]
async fn create_gives_up_naming_the_slots_no_shard_group_covers() {
    let (g1, g2, _config, router) = two_groups().await;
    *groups(&g2).owned.lock().unwrap() = [(8..15).collect()].into();
    let err = feed(&router)
        .await
        .create_group(create_req("billing", vec![]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("slot(s) 15 "), "{}", err.message());
    assert!(
        err.message().contains("retrying it is safe"),
        "{}",
        err.message()
    );
    let rounds = ordo_router::FEED_GROUP_ROUNDS_MAX as usize;
    assert_eq!((creates(&g1).len(), creates(&g2).len()), (rounds, rounds));
}

#[tokio::test]
async fn bad_creates_are_refused_before_any_node_hears_of_them() {
    let (g1, g2, _config, router) = two_groups().await;
    let mut client = feed(&router).await;
    type Edit = fn(&mut CreateGroupRequest);
    let edits: [(Edit, &str); 5] = [
        (|r| r.from = Start::FromSnapshot as i32, "events, not items"),
        (|r| r.group = "no spaces".into(), "' '"),
        (|r| r.group = String::new(), "FEED_GROUP_NAME_BYTES_MAX"),
        (
            |r| r.shard_keys = vec![Bytes::from_static(b"k"); 1025],
            "FEED_SHARD_KEYS_MAX",
        ),
        (
            |r| r.key_prefix = vec![b'p'; 5000].into(),
            "FEED_GROUP_KEY_PREFIX_BYTES_MAX",
        ),
    ];
    for (edit, want) in edits {
        let mut req = create_req("billing", vec![]);
        edit(&mut req);
        let err = client.create_group(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{want}: {err:?}");
        assert!(err.message().contains(want), "{want}: {}", err.message());
    }
    let seek = SeekGroupRequest {
        group: "billing".into(),
        to: Start::FromSnapshot as i32,
        after_ts_ms: 0,
    };
    let err = client.seek_group(seek).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    for node in [&g1, &g2] {
        assert!(groups(node).admin_seen.lock().unwrap().is_empty());
    }
}

#[tokio::test]
async fn another_definition_under_the_name_is_already_exists_from_the_node() {
    let (g1, _g2, _config, router) = two_groups().await;
    groups(&g1).add_group("billing", &[0, 1]);
    let mut req = create_req("billing", vec![]);
    req.ack_wait_ms = 5_000;
    let err = feed(&router).await.create_group(req).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(
        err.message().contains("another definition"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn an_unknown_group_is_not_found_on_describe_seek_and_consume() {
    let (_g1, _g2, _config, router) = two_groups().await;
    let mut client = feed(&router).await;
    let describe = DescribeGroupRequest {
        group: "nope".into(),
    };
    let err = client.describe_group(describe).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "consumer group nope does not exist");
    let seek = SeekGroupRequest {
        group: "nope".into(),
        to: Start::FromNow as i32,
        after_ts_ms: 0,
    };
    assert_eq!(
        client.seek_group(seek).await.unwrap_err().code(),
        Code::NotFound
    );
    let err = Member::join(&router, "nope", "m1", 1).await.err().unwrap();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test]
async fn list_merges_per_name_delete_says_if_any_had_it_and_unpark_goes_to_the_owner() {
    let (g1, g2, _config, router) = two_groups().await;
    groups(&g1).add_group("a", &(0..8).collect::<Vec<_>>());
    groups(&g2).add_group("a", &(8..16).collect::<Vec<_>>());
    groups(&g2).add_group("b", &[9]);
    let mut client = feed(&router).await;
    let list = client.list_groups(ListGroupsRequest {}).await.unwrap();
    let list = list.into_inner().groups;
    let names: Vec<&str> = list.iter().map(|g| g.group.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(slots_of(&list[0]), (0..16).collect::<Vec<_>>());

    let delete = |name: &str| DeleteGroupRequest { group: name.into() };
    assert!(
        client
            .delete_group(delete("b"))
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    assert!(
        !client
            .delete_group(delete("b"))
            .await
            .unwrap()
            .into_inner()
            .deleted
    );

    let key = key_of_group(2, 0);
    groups(&g2)
        .parked
        .lock()
        .unwrap()
        .insert(("a".into(), key.clone()));
    let unpark = UnparkRequest {
        group: "a".into(),
        shard_key: key,
    };
    let group = client.unpark(unpark.clone()).await.unwrap().into_inner();
    assert_eq!(
        slots_of(&group),
        (0..16).collect::<Vec<_>>(),
        "the merged describe"
    );
    let unparks = |node: &Node| {
        let seen = groups(node).admin_seen.lock().unwrap().clone();
        seen.iter()
            .filter(|r| matches!(r.op, Some(Op::Unpark(_))))
            .count()
    };
    assert_eq!((unparks(&g1), unparks(&g2)), (0, 1));
    let err = client.unpark(unpark).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "the node's answer passes: {err:?}"
    );
}

/// A member's stream, as a client holds it, with what it granted and received.
struct Member {
    tx: Option<mpsc::Sender<ConsumeRequest>>,
    rx: Streaming<ConsumeResponse>,
    granted: u64,
    received: u64,
    ledger: Option<Arc<Ledger>>,
}

impl Member {
    async fn join(
        router: &ordo_router::Router,
        group: &str,
        member: &str,
        credits: u32,
    ) -> Result<Member, Status> {
        Member::join_at(&router.addr.to_string(), group, member, credits).await
    }

    /// Joins through the router at `addr`.
    async fn join_at(
        addr: &str,
        group: &str,
        member: &str,
        credits: u32,
    ) -> Result<Member, Status> {
        let (tx, rx) = mpsc::channel(64);
        let join = Join {
            group: group.into(),
            member: member.into(),
            credits,
        };
        tx.send(ConsumeRequest {
            msg: Some(Msg::Join(join)),
        })
        .await
        .unwrap();
        let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut client = FeedClient::connect(format!("http://{addr}")).await.unwrap();
        let rx = client.consume(requests).await?.into_inner();
        Ok(Member {
            tx: Some(tx),
            rx,
            granted: u64::from(credits),
            received: 0,
            ledger: None,
        })
    }

    /// The next response, within [`WAIT`].
    async fn next(&mut self) -> Result<Option<ConsumeResponse>, Status> {
        let next = tokio::time::timeout(WAIT, self.rx.message()).await;
        let next = next.unwrap_or_else(|_| panic!("no response within {WAIT:?}"));
        if let Ok(Some(r)) = &next {
            if r.event.is_some() {
                self.received += 1;
                if let Some(l) = &self.ledger {
                    l.member_received.fetch_add(1, Ordering::SeqCst);
                }
                assert!(
                    self.received <= self.granted,
                    "delivery {} with {} credits granted",
                    self.received,
                    self.granted
                );
            }
        }
        next
    }

    async fn delivery(&mut self) -> ChangeEvent {
        let r = self
            .next()
            .await
            .expect("stream failed")
            .expect("stream ended");
        r.event.expect("a delivery")
    }

    async fn send(&self, msg: Msg) {
        let tx = self.tx.as_ref().expect("requests open");
        tx.send(ConsumeRequest { msg: Some(msg) }).await.unwrap();
    }

    async fn ack(&self, e: &ChangeEvent) {
        let ack = Ack {
            slot: e.slot,
            seq: e.seq,
            attempt: 1,
        };
        self.send(Msg::Ack(ack)).await;
    }

    async fn credit(&mut self, credits: u32) {
        self.granted += u64::from(credits);
        if let Some(l) = &self.ledger {
            l.member_granted
                .fetch_add(u64::from(credits), Ordering::SeqCst);
        }
        self.send(Msg::Credit(Credit { credits })).await;
    }
}

fn events_of(node: &Node) -> BTreeSet<(u32, u64)> {
    let ready = groups(node).ready.lock().unwrap().clone();
    ready.iter().map(|e| (e.slot, e.seq)).collect()
}

#[tokio::test]
async fn one_credit_at_a_time_gets_every_event_of_both_groups_and_acks_reach_their_slot() {
    let (g1, g2, _config, router) = two_groups().await;
    let ledger = Arc::new(Ledger::default());
    for (node, slots) in [(&g1, 0..8), (&g2, 8..16)] {
        groups(node).add_group("billing", &slots.collect::<Vec<_>>());
        *groups(node).ledger.lock().unwrap() = Some(ledger.clone());
    }
    groups(&g1).add_events(1, 1, 20);
    groups(&g1).add_events(2, 1, 5);
    groups(&g2).add_events(9, 1, 20);
    let (want1, want2) = (events_of(&g1), events_of(&g2));
    ledger.member_granted.store(1, Ordering::SeqCst);
    let mut member = Member::join(&router, "billing", "m1", 1).await.unwrap();
    member.ledger = Some(ledger.clone());

    let mut got = BTreeSet::new();
    while got.len() < want1.len() + want2.len() {
        let e = member.delivery().await;
        assert!(
            got.insert((e.slot, e.seq)),
            "{}/{} delivered twice",
            e.slot,
            e.seq
        );
        member.ack(&e).await;
        member.credit(1).await;
    }
    assert_eq!(got, want1.union(&want2).copied().collect());
    for (node, want) in [(&g1, &want1), (&g2, &want2)] {
        let n = want.len();
        groups(node)
            .until("every ack", |g| g.acks.lock().unwrap().len() == n)
            .await;
        let acks = groups(node).acks.lock().unwrap().clone();
        let acked: BTreeSet<(u32, u64)> = acks.iter().map(|&(s, q, _)| (s, q)).collect();
        assert_eq!(&acked, want, "each ack went to its slot's shard group");
    }
    assert_eq!(
        ledger.violations.load(Ordering::SeqCst),
        0,
        "nodes held more than granted"
    );
}

#[tokio::test]
async fn credits_a_stream_cannot_use_are_reclaimed_for_one_where_events_wait() {
    let (g1, g2, _config, router) = two_groups().await;
    for (node, slots) in [(&g1, 0..8), (&g2, 8..16)] {
        groups(node).add_group("billing", &slots.collect::<Vec<_>>());
    }
    let n1 = groups(&g1);
    n1.stalled.store(true, Ordering::SeqCst);
    n1.add_events(1, 1, 1);
    let mut member = Member::join(&router, "billing", "m1", 1).await.unwrap();
    n1.until("group 1 lent the credit", |g| {
        g.credits_received.load(Ordering::SeqCst) == 1
    })
    .await;
    // Another member took the event: group 1 holds the credit and waits for nothing.
    n1.ready.lock().unwrap().clear();
    n1.poke();
    groups(&g2).add_events(9, 1, 3);
    for seq in 1..=3 {
        let e = member.delivery().await;
        assert_eq!((e.slot, e.seq), (9, seq));
        member.ack(&e).await;
        member.credit(1).await;
    }
    assert!(n1.reclaims.load(Ordering::SeqCst) >= 1);
}

#[tokio::test]
async fn a_not_leader_end_reopens_at_the_hinted_leader_with_the_credits_back_in_the_pool() {
    let (a, b, g2) = (
        spawn_feed_node().await,
        spawn_feed_node().await,
        spawn_feed_node().await,
    );
    let config = spawn_config(map_v(1, &[&a.addr, &b.addr], &[&g2.addr])).await;
    let router = start_router(vec![config.addr.clone()]).await;
    for (node, slots) in [(&a, 0..8), (&b, 0..8), (&g2, 8..16)] {
        groups(node).add_group("billing", &slots.collect::<Vec<_>>());
    }
    *groups(&b).not_leading.lock().unwrap() = Some(not_leader(&a.addr));
    groups(&a).stalled.store(true, Ordering::SeqCst);
    groups(&a).add_events(1, 1, 2);
    groups(&b).add_events(1, 1, 2);
    let mut member = Member::join(&router, "billing", "m1", 2).await.unwrap();
    groups(&a)
        .until("the leader was lent both credits", |g| {
            g.credits_received.load(Ordering::SeqCst) == 2
        })
        .await;

    // A leader change: b leads, a ends its stream naming b.
    *groups(&b).not_leading.lock().unwrap() = None;
    *groups(&a).not_leading.lock().unwrap() = Some(not_leader(&b.addr));
    groups(&a).poke();
    let (first, second) = (member.delivery().await, member.delivery().await);
    assert_eq!(
        [(first.slot, first.seq), (second.slot, second.seq)],
        [(1, 1), (1, 2)]
    );
    let joins = groups(&b).joins.lock().unwrap().clone();
    let last = joins.last().expect("b was joined");
    assert_eq!(
        (
            last.group_id,
            last.group.as_str(),
            last.member.as_str(),
            last.credits
        ),
        (1, "billing", "m1", 0)
    );
    assert_eq!(groups(&b).credits_received.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_member_that_closes_closes_its_node_streams_and_one_that_vanishes_breaks_them() {
    let (g1, g2, _config, router) = two_groups().await;
    for (node, slots) in [(&g1, 0..8), (&g2, 8..16)] {
        groups(node).add_group("billing", &slots.collect::<Vec<_>>());
    }
    let open = |n: usize| move |g: &GroupNode| g.open_streams.load(Ordering::SeqCst) == n;
    let mut member = Member::join(&router, "billing", "m1", 0).await.unwrap();
    for node in [&g1, &g2] {
        groups(node).until("a node stream", open(1)).await;
    }
    member.tx = None;
    assert!(
        member.next().await.unwrap().is_none(),
        "the member's stream ends cleanly"
    );
    for node in [&g1, &g2] {
        let g = groups(node);
        g.until("a clean close", |g| {
            g.clean_closes.load(Ordering::SeqCst) == 1
        })
        .await;
        assert_eq!(g.breaks.load(Ordering::SeqCst), 0);
    }

    // The second member's connection goes through a relay the test cuts, as a member's machine
    // vanishing does, once both shard groups have delivered to it.
    let (relay, cut) = relay(router.addr).await;
    groups(&g1).add_events(1, 1, 1);
    groups(&g2).add_events(9, 1, 1);
    let member = Member::join_at(&relay, "billing", "m2", 2).await.unwrap();
    for node in [&g1, &g2] {
        let delivered = |g: &GroupNode| g.deliveries.load(Ordering::SeqCst) == 1;
        groups(node).until("a delivery", delivered).await;
    }
    cut.abort();
    for node in [&g1, &g2] {
        let g = groups(node);
        g.until("a broken stream", |g| g.breaks.load(Ordering::SeqCst) == 1)
            .await;
        assert_eq!(g.clean_closes.load(Ordering::SeqCst), 1);
    }
    drop(member);
}

/// A TCP relay to `to` for one connection at a time; aborting the task cuts it.
async fn relay(to: std::net::SocketAddr) -> (String, tokio::task::JoinHandle<()>) {
    let (listener, addr) = listen().await;
    let task = tokio::spawn(async move {
        loop {
            let (mut inbound, _) = listener.accept().await.unwrap();
            let mut outbound = tokio::net::TcpStream::connect(to).await.unwrap();
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        }
    });
    (addr, task)
}

#[tokio::test]
async fn deleting_the_group_ends_its_members_with_not_found() {
    let (g1, g2, _config, router) = two_groups().await;
    for (node, slots) in [(&g1, 0..8), (&g2, 8..16)] {
        groups(node).add_group("billing", &slots.collect::<Vec<_>>());
    }
    let mut member = Member::join(&router, "billing", "m1", 4).await.unwrap();
    groups(&g1)
        .until("a node stream", |g| {
            g.open_streams.load(Ordering::SeqCst) == 1
        })
        .await;
    let delete = DeleteGroupRequest {
        group: "billing".into(),
    };
    let deleted = feed(&router).await.delete_group(delete).await.unwrap();
    assert!(deleted.into_inner().deleted);
    let err = member.next().await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(
        err.message().contains("billing was deleted"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn a_member_must_join_first_within_the_credit_bound() {
    let (g1, g2, _config, router) = two_groups().await;
    for (node, slots) in [(&g1, 0..8), (&g2, 8..16)] {
        groups(node).add_group("billing", &slots.collect::<Vec<_>>());
    }
    let max = ordo_proto::FEED_GROUP_CREDITS_MAX;
    let err = Member::join(&router, "billing", "m1", max + 1)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("FEED_GROUP_CREDITS_MAX"),
        "{}",
        err.message()
    );
    let err = Member::join(&router, "billing", "bad name", 1)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Past the bound with a Credit: the stream ends saying so.
    let mut member = Member::join(&router, "billing", "m1", max).await.unwrap();
    member.credit(1).await;
    let err = member.next().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("FEED_GROUP_CREDITS_MAX"),
        "{}",
        err.message()
    );

    // A first message that is not a Join.
    let (tx, rx) = mpsc::channel(4);
    tx.send(ConsumeRequest {
        msg: Some(Msg::Credit(Credit { credits: 1 })),
    })
    .await
    .unwrap();
    let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
    let err = feed(&router).await.consume(requests).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("must be a Join"),
        "{}",
        err.message()
    );
}
