//! The consumer-group half of the fake replica (`Peer.GroupAdmin`, `Peer.Consume`), with the
//! node semantics the router relies on, scripted by the tests: which slots a create covers,
//! which events wait, whether the replica leads.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::Stream;
use ordo_proto::slot_of;
use ordo_proto::v1::group_admin_request::Op;
use ordo_proto::v1::peer_consume_request::Msg as Req;
use ordo_proto::v1::peer_consume_response::Msg as Resp;
use ordo_proto::v1::*;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::support::{SLOTS, WAIT};

pub type ConsumeStream = Pin<Box<dyn Stream<Item = Result<PeerConsumeResponse, Status>> + Send>>;

/// Credits across every fake of a test, against what the member granted: the nodes never hold
/// more than the member granted minus what it was sent.
#[derive(Default)]
pub struct Ledger {
    pub member_granted: AtomicU64,
    pub member_received: AtomicU64,
    node_held: AtomicI64,
    pub violations: AtomicUsize,
}

impl Ledger {
    fn lent(&self, n: u32) {
        let held = self.node_held.fetch_add(i64::from(n), Ordering::SeqCst) + i64::from(n);
        let room = self.member_granted.load(Ordering::SeqCst) as i64
            - self.member_received.load(Ordering::SeqCst) as i64;
        if held > room {
            self.violations.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn used(&self, n: u32) {
        self.node_held.fetch_sub(i64::from(n), Ordering::SeqCst);
    }
}

/// One fake replica's consumer groups.
#[derive(Default)]
pub struct GroupNode {
    /// The slots a create covers here, one list per create in turn (the last one stays).
    pub owned: Mutex<VecDeque<Vec<u32>>>,
    pub groups: Mutex<BTreeMap<String, ConsumerGroup>>,
    /// The definition each group was created with.
    defs: Mutex<BTreeMap<String, CreateGroupRequest>>,
    /// Every GroupAdmin request received.
    pub admin_seen: Mutex<Vec<GroupAdminRequest>>,
    /// The next admin calls are answered with these, in turn.
    pub admin_refuse: Mutex<VecDeque<Status>>,
    /// (group, shard key) parked here.
    pub parked: Mutex<BTreeSet<(String, Bytes)>>,
    /// Events ready for any member, in order.
    pub ready: Mutex<VecDeque<ChangeEvent>>,
    /// Reports events as waiting but delivers none (keeps the credits it is lent).
    pub stalled: AtomicBool,
    pub joins: Mutex<Vec<PeerJoin>>,
    /// (slot, seq, attempt) of every ack and term received.
    pub acks: Mutex<Vec<(u32, u64, u32)>>,
    pub credits_received: AtomicU64,
    pub reclaims: AtomicUsize,
    pub deliveries: AtomicUsize,
    pub clean_closes: AtomicUsize,
    pub breaks: AtomicUsize,
    pub open_streams: AtomicUsize,
    /// Set: this replica does not lead; joins are refused with it and open streams end with it.
    pub not_leading: Mutex<Option<Status>>,
    pub ledger: Mutex<Option<Arc<Ledger>>>,
    changed: Mutex<Option<watch::Sender<u64>>>,
}

impl GroupNode {
    pub fn new() -> Arc<GroupNode> {
        let node = GroupNode::default();
        *node.changed.lock().unwrap() = Some(watch::channel(0).0);
        Arc::new(node)
    }

    pub fn poke(&self) {
        if let Some(tx) = self.changed.lock().unwrap().as_ref() {
            tx.send_modify(|v| *v += 1);
        }
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.lock().unwrap().as_ref().unwrap().subscribe()
    }

    /// Waits (at most [`WAIT`]) until `cond` holds of this node; panics naming `what`.
    pub async fn until(&self, what: &str, cond: impl Fn(&GroupNode) -> bool) {
        let mut changed = self.subscribe();
        let wait = async {
            while !cond(self) {
                changed.changed().await.unwrap();
            }
        };
        if tokio::time::timeout(WAIT, wait).await.is_err() {
            panic!("waited {WAIT:?} for {what}");
        }
    }

    /// Holds group `name` (default definition) in `slots`.
    pub fn add_group(&self, name: &str, slots: &[u32]) {
        let def = CreateGroupRequest {
            group: name.into(),
            ..Default::default()
        };
        let group = group_at(&def, slots);
        self.defs
            .lock()
            .unwrap()
            .insert(name.into(), definition(&def));
        self.groups.lock().unwrap().insert(name.into(), group);
    }

    /// Makes `n` events of `slot` ready (seq after those already added).
    pub fn add_events(&self, slot: u32, first_seq: u64, n: u64) {
        let mut ready = self.ready.lock().unwrap();
        for seq in first_seq..first_seq + n {
            ready.push_back(crate::fakes::feed_event(slot, seq, Bytes::from("v")));
        }
        drop(ready);
        self.poke();
    }

    pub fn admin(&self, req: GroupAdminRequest) -> Result<GroupAdminResponse, Status> {
        self.admin_seen.lock().unwrap().push(req.clone());
        if let Some(status) = self.admin_refuse.lock().unwrap().pop_front() {
            return Err(status);
        }
        let one = |g: Option<ConsumerGroup>| GroupAdminResponse {
            groups: g.into_iter().collect(),
            deleted: false,
        };
        let mut groups = self.groups.lock().unwrap();
        let answer = match req.op {
            Some(Op::Create(c)) => {
                let owned = {
                    let mut o = self.owned.lock().unwrap();
                    match o.len() {
                        0 => Vec::new(),
                        1 => o[0].clone(),
                        _ => o.pop_front().unwrap(),
                    }
                };
                let covers: Vec<u32> = owned
                    .into_iter()
                    .filter(|&s| {
                        c.shard_keys.is_empty()
                            || c.shard_keys.iter().any(|k| slot_of(k, SLOTS) == s)
                    })
                    .collect();
                let mut defs = self.defs.lock().unwrap();
                if let Some(old) = defs.get(&c.group) {
                    if *old != definition(&c) {
                        return Err(Status::already_exists(format!(
                            "consumer group {} exists with another definition",
                            c.group
                        )));
                    }
                }
                if covers.is_empty() {
                    one(None)
                } else {
                    let g = group_at(&c, &covers);
                    defs.insert(c.group.clone(), definition(&c));
                    groups.insert(c.group.clone(), g.clone());
                    one(Some(g))
                }
            }
            Some(Op::Describe(d)) => one(groups.get(&d.group).cloned()),
            Some(Op::Seek(s)) => one(groups.get(&s.group).cloned()),
            Some(Op::List(_)) => GroupAdminResponse {
                groups: groups.values().cloned().collect(),
                deleted: false,
            },
            Some(Op::Delete(d)) => GroupAdminResponse {
                groups: vec![],
                deleted: {
                    self.defs.lock().unwrap().remove(&d.group);
                    groups.remove(&d.group).is_some()
                },
            },
            Some(Op::Unpark(u)) => {
                let key = (u.group.clone(), u.shard_key.clone());
                if !self.parked.lock().unwrap().remove(&key) {
                    return Err(Status::not_found("no such parked order"));
                }
                one(groups.get(&u.group).cloned())
            }
            None => return Err(Status::invalid_argument("no op")),
        };
        drop(groups);
        self.poke();
        Ok(answer)
    }

    pub async fn consume(
        self: Arc<Self>,
        r: Request<Streaming<PeerConsumeRequest>>,
    ) -> Result<Response<ConsumeStream>, Status> {
        let mut inbound = r.into_inner();
        let join = match inbound.message().await?.and_then(|m| m.msg) {
            Some(Req::Join(join)) => join,
            _ => return Err(Status::invalid_argument("join first")),
        };
        self.joins.lock().unwrap().push(join.clone());
        self.poke();
        if let Some(status) = self.not_leading.lock().unwrap().clone() {
            return Err(status);
        }
        if !self.groups.lock().unwrap().contains_key(&join.group) {
            return Err(Status::not_found("no such group"));
        }
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(self.clone().serve(join, inbound, tx));
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn serve(
        self: Arc<Self>,
        join: PeerJoin,
        mut inbound: Streaming<PeerConsumeRequest>,
        tx: mpsc::Sender<Result<PeerConsumeResponse, Status>>,
    ) {
        let send = |msg| PeerConsumeResponse { msg: Some(msg) };
        let mut stream = ServedStream {
            credits: join.credits,
            in_flight: Vec::new(),
            last_waiting: None,
        };
        let mut changed = self.subscribe();
        self.open_streams.fetch_add(1, Ordering::SeqCst);
        let _ = tx.send(Ok(send(Resp::Joined(Joined {})))).await;
        loop {
            let ended = self.step(&join, &mut stream, &tx).await;
            if ended {
                break;
            }
            tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(PeerConsumeRequest { msg: Some(m) })) => {
                        self.request(m, &mut stream, &tx).await
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        self.clean_closes.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    Err(_) => {
                        self.breaks.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                },
                _ = changed.changed() => {}
                _ = tx.closed() => {
                    self.breaks.fetch_add(1, Ordering::SeqCst);
                    break;
                }
            }
        }
        // What was in flight is handed on (to the next stream here).
        let mut ready = self.ready.lock().unwrap();
        for e in stream.in_flight.into_iter().rev() {
            ready.push_front(e);
        }
        drop(ready);
        self.open_streams.fetch_sub(1, Ordering::SeqCst);
        self.poke();
    }

    /// Delivers within the stream's credits and reports what waits; whether the stream ended.
    async fn step(
        &self,
        join: &PeerJoin,
        s: &mut ServedStream,
        tx: &mpsc::Sender<Result<PeerConsumeResponse, Status>>,
    ) -> bool {
        let send = |msg| Ok(PeerConsumeResponse { msg: Some(msg) });
        let not_leading = self.not_leading.lock().unwrap().clone();
        if let Some(status) = not_leading {
            let _ = tx.send(Err(status)).await;
            return true;
        }
        if !self.groups.lock().unwrap().contains_key(&join.group) {
            let _ = tx
                .send(Err(Status::not_found("the group was deleted")))
                .await;
            return true;
        }
        let stalled = self.stalled.load(Ordering::SeqCst);
        while s.credits > 0 && !stalled {
            let Some(event) = self.ready.lock().unwrap().pop_front() else {
                break;
            };
            s.credits -= 1;
            s.in_flight.push(event.clone());
            self.deliveries.fetch_add(1, Ordering::SeqCst);
            if let Some(l) = self.ledger.lock().unwrap().as_ref() {
                l.used(1);
            }
            let d = Delivery {
                event: Some(event),
                attempt: 1,
            };
            let _ = tx.send(send(Resp::Delivery(d))).await;
        }
        let ready = self.ready.lock().unwrap().len() as u32;
        let waiting = if stalled || s.credits == 0 { ready } else { 0 };
        if s.last_waiting.unwrap_or(0) != waiting {
            s.last_waiting = Some(waiting);
            let _ = tx.send(send(Resp::Waiting(waiting))).await;
        }
        self.poke();
        false
    }

    async fn request(
        &self,
        m: Req,
        s: &mut ServedStream,
        tx: &mpsc::Sender<Result<PeerConsumeResponse, Status>>,
    ) {
        match m {
            Req::Credit(c) => {
                s.credits += c.credits;
                self.credits_received
                    .fetch_add(u64::from(c.credits), Ordering::SeqCst);
                if let Some(l) = self.ledger.lock().unwrap().as_ref() {
                    l.lent(c.credits);
                }
            }
            Req::Ack(Ack { slot, seq, attempt }) | Req::Term(Term { slot, seq, attempt }) => {
                self.acks.lock().unwrap().push((slot, seq, attempt));
                s.in_flight.retain(|e| (e.slot, e.seq) != (slot, seq));
            }
            Req::Nack(n) => {
                if let Some(i) = s
                    .in_flight
                    .iter()
                    .position(|e| (e.slot, e.seq) == (n.slot, n.seq))
                {
                    let e = s.in_flight.remove(i);
                    self.ready.lock().unwrap().push_front(e);
                }
            }
            Req::Reclaim(_) => {
                self.reclaims.fetch_add(1, Ordering::SeqCst);
                if let Some(l) = self.ledger.lock().unwrap().as_ref() {
                    l.used(s.credits);
                }
                let n = std::mem::take(&mut s.credits);
                let msg = PeerConsumeResponse {
                    msg: Some(Resp::Returned(n)),
                };
                let _ = tx.send(Ok(msg)).await;
            }
            Req::InProgress(_) | Req::Join(_) => {}
        }
        self.poke();
    }
}

struct ServedStream {
    credits: u32,
    in_flight: Vec<ChangeEvent>,
    last_waiting: Option<u32>,
}

/// The definition a create names, as a node compares it (defaults filled in).
fn definition(c: &CreateGroupRequest) -> CreateGroupRequest {
    CreateGroupRequest {
        ack_wait_ms: if c.ack_wait_ms == 0 {
            30_000
        } else {
            c.ack_wait_ms
        },
        max_deliver: if c.max_deliver == 0 { 5 } else { c.max_deliver },
        from: 0,
        after_ts_ms: 0,
        ..c.clone()
    }
}

/// The group as a node holding `slots` of it answers (defaults filled in).
fn group_at(c: &CreateGroupRequest, slots: &[u32]) -> ConsumerGroup {
    let slots: Vec<GroupSlot> = slots
        .iter()
        .map(|&slot| GroupSlot {
            slot,
            lag_events: 2,
            pending: 1,
            ..Default::default()
        })
        .collect();
    ConsumerGroup {
        group: c.group.clone(),
        key_prefix: c.key_prefix.clone(),
        mode: c.mode,
        ack_wait_ms: definition(c).ack_wait_ms,
        max_deliver: definition(c).max_deliver,
        poison: c.poison,
        shard_keys: c
            .shard_keys
            .iter()
            .filter(|k| slots.iter().any(|s| s.slot == slot_of(k, SLOTS)))
            .cloned()
            .collect(),
        lag_events: 2 * slots.len() as u64,
        pending: slots.len() as u64,
        slots,
        ..Default::default()
    }
}
