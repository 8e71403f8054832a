//! The service against in-memory `MapStore`s: map watches end when their replica stops, and
//! their number is bounded.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

use super::*;

/// Longest a watch may take to notice its replica stopped.
const NOTICE: Duration = Duration::from_secs(2);

struct MemStore {
    map: ShardMap,
    changes: watch::Sender<u64>,
    stop: watch::Sender<bool>,
}

impl MemStore {
    fn new() -> Arc<MemStore> {
        Arc::new(MemStore {
            map: ShardMap {
                version: 1,
                ..Default::default()
            },
            changes: watch::channel(0).0,
            stop: watch::channel(false).0,
        })
    }
}

#[tonic::async_trait]
impl MapStore for MemStore {
    async fn load(&self, _linearizable: bool) -> Result<(ShardMap, u64), Status> {
        Ok((self.map.clone(), 1))
    }
    async fn save(&self, _token: u64, _map: &ShardMap) -> Result<bool, Status> {
        Err(Status::unimplemented("read-only store"))
    }
    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
    fn config_addrs(&self) -> Vec<String> {
        Vec::new()
    }
    async fn load_migrations(&self, _linearizable: bool) -> Result<(MigrationList, u64), Status> {
        Ok((MigrationList::default(), 1))
    }
    async fn save_migrations(&self, _token: u64, _list: &MigrationList) -> Result<bool, Status> {
        Err(Status::unimplemented("read-only store"))
    }
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }
    fn stop_signal(&self) -> Option<watch::Receiver<bool>> {
        Some(self.stop.subscribe())
    }
}

async fn watch(svc: &ConfigService<MemStore>) -> Result<MapStream, Status> {
    let req = Request::new(WatchShardMapRequest { after_version: 0 });
    Ok(svc.watch_shard_map(req).await?.into_inner())
}

#[tokio::test]
async fn a_map_watch_ends_when_its_replica_stops() {
    let store = MemStore::new();
    let svc = ConfigService::new(store.clone(), 0);
    let mut stream = watch(&svc).await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.version, 1, "the current map comes first");
    store.stop.send_replace(true);
    let last = tokio::time::timeout(NOTICE, stream.next())
        .await
        .expect("the watch noticed the stop")
        .expect("it says why before it ends")
        .unwrap_err();
    assert_eq!(last.code(), tonic::Code::Unavailable, "{last:?}");
    let end = tokio::time::timeout(NOTICE, stream.next()).await.unwrap();
    assert!(end.is_none(), "the stream ended");
}

#[tokio::test]
async fn map_watches_are_bounded_and_a_closed_one_frees_its_place() {
    let svc = ConfigService::new(MemStore::new(), 0);
    let mut open = Vec::new();
    for _ in 0..MAP_WATCHES_MAX {
        open.push(watch(&svc).await.unwrap());
    }
    let refused = watch(&svc).await.err().expect("one watch too many");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(refused.message().contains("MAP_WATCHES_MAX"), "{refused:?}");
    drop(open.pop());
    // The closed watch's task sees its receiver gone and gives its permit back.
    let started = tokio::time::Instant::now();
    loop {
        match watch(&svc).await {
            Ok(_) => break,
            Err(e) if started.elapsed() < NOTICE => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("the closed watch's place was not freed within {NOTICE:?}: {e:?}"),
        }
    }
}

/// The map and migration records of one config replica that leads until a task ends: from then
/// on its linearizable loads answer not-leader (the config leader changed), while its own copy
/// stays readable.
struct LosesLeadership {
    map: ShardMap,
    records: std::sync::Mutex<(MigrationList, u64)>,
    changes: watch::Sender<u64>,
}

impl LosesLeadership {
    fn leads(&self) -> Result<(), Status> {
        let records = self.records.lock().unwrap();
        match records.0.tasks.iter().any(|t| !tasks::task_running(t)) {
            true => Err(Status::unavailable("not the leader of group 0")),
            false => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl MapStore for LosesLeadership {
    async fn load(&self, linearizable: bool) -> Result<(ShardMap, u64), Status> {
        if linearizable {
            self.leads()?;
        }
        Ok((self.map.clone(), 1))
    }
    async fn save(&self, _token: u64, _map: &ShardMap) -> Result<bool, Status> {
        Err(Status::unimplemented("the map does not change here"))
    }
    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
    fn config_addrs(&self) -> Vec<String> {
        Vec::new()
    }
    async fn load_migrations(&self, linearizable: bool) -> Result<(MigrationList, u64), Status> {
        if linearizable {
            self.leads()?;
        }
        Ok(self.records.lock().unwrap().clone())
    }
    async fn save_migrations(&self, token: u64, list: &MigrationList) -> Result<bool, Status> {
        let mut records = self.records.lock().unwrap();
        if records.1 != token {
            return Ok(false);
        }
        *records = (list.clone(), token + 1);
        self.changes.send_modify(|n| *n += 1);
        Ok(true)
    }
}

/// A config leader change after a rebalance's task ended (the new leader had resumed it) must
/// not turn the answer into not-leader: the client would ask the new leader again, and that
/// second rebalance, with nothing left to move, would answer with no migrations.
#[tokio::test]
async fn a_rebalance_answers_from_its_replica_once_its_task_ended() {
    let groups = [1, 2].map(|id| Group {
        id,
        replicas: vec![],
    });
    let store = Arc::new(LosesLeadership {
        map: map::initial_map(8, groups.to_vec(), vec![]).unwrap(),
        records: Default::default(),
        changes: watch::channel(0).0,
    });
    let svc = ConfigService::new(store.clone(), 0);
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        ConfigService::rebalance(&svc, RebalanceRequest::default()),
    )
    .await
    .expect("the rebalance ended")
    .expect("it answers with the task that ran");
    assert_eq!((r.task_id, r.plan.len()), (1, 0), "{r:?}");
    assert_eq!(r.map.unwrap().version, 1);
    assert!(store.leads().is_err(), "the replica no longer leads");
}
