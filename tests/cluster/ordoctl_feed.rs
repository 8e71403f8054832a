//! `ordoctl feed ...` against a router-fronted cluster of two shard groups: create (again: the
//! same group; another definition: ALREADY_EXISTS), describe with `--json` parsed (every slot,
//! lag counting the events written under the prefix only), groups, seek, unpark of an order
//! that is not parked (NOT_FOUND: exit code and message) and delete (twice; then describe is
//! NOT_FOUND).

use std::time::Duration;

use ordo_proto::client::{Client, ClusterClient};
use ordo_testkit::inproc::InProcCluster;
use serde_json::Value;

/// Bound on the cluster catching up with what the test did.
const WAIT: Duration = Duration::from_secs(30);
/// Events the test writes under the group's prefix.
const EVENTS: u64 = 12;

/// Runs ordoctl against the router: (exit status 0, stdout + stderr).
fn ordoctl(router: &[String], args: &[&str]) -> (bool, String) {
    ordo_testkit::bins!().ordoctl_within(router, Duration::from_secs(20), args)
}

/// Runs ordoctl, which must succeed, and parses its one line of JSON.
fn ordoctl_json(router: &[String], args: &[&str]) -> Value {
    let (ok, out) = ordoctl(router, &[args, &["--json"]].concat());
    assert!(ok, "ordoctl {args:?} failed: {out}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

fn u64_of(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not a number in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ordoctl_feed_creates_describes_seeks_unparks_and_deletes_a_group() {
    let _serial = ordo_testkit::HEAVY.lock().await;
    let pg = InProcCluster::start(2, 3).await;
    let router = vec![pg.router_addr()];
    let slot_count = ClusterClient::connect(router.clone())
        .unwrap()
        .get_shard_map(true)
        .await
        .unwrap()
        .slot_count;

    create_and_check(&router, slot_count);

    // Events under the prefix only: lag also counts filtered-out events until the group's
    // position passes them, which would make the count depend on timing.
    let kv = Client::connect(router.clone())
        .unwrap()
        .with_timeout(Duration::from_secs(15));
    for n in 0..EVENTS {
        let order = format!("order-{n}");
        kv.put(order.clone(), "outbox/1", "created", None)
            .await
            .unwrap();
    }
    let described = ordo_testkit::wait_for("the events counted as lag", WAIT, || {
        let router = router.clone();
        async move {
            let g = ordoctl_json(&router, &["feed", "describe", "billing"]);
            (u64_of(&g, "lag_events") == EVENTS).then_some(g)
        }
    })
    .await;
    let per_slot: u64 = described["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| u64_of(s, "lag_events"))
        .sum();
    assert_eq!(
        per_slot, EVENTS,
        "the totals are the slots' sums: {described}"
    );

    let (ok, out) = ordoctl(&router, &["feed", "describe", "billing"]);
    assert!(ok, "{out}");
    assert!(
        out.starts_with("group billing  mode key-ordered  prefix outbox/"),
        "{out}"
    );
    assert!(out.contains(&format!("lag {EVENTS} events")), "{out}");

    let list = ordoctl_json(&router, &["feed", "groups"]);
    let names: Vec<&str> = list["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["group"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["billing"], "{list}");

    // Seek to now: nothing is left to deliver.
    let sought = ordoctl_json(&router, &["feed", "seek", "billing", "--to", "now"]);
    assert_eq!(u64_of(&sought, "lag_events"), 0, "{sought}");

    // Unpark of an order that is not parked: NOT_FOUND, exit code 1, the message on stderr.
    let (ok, out) = ordoctl(&router, &["feed", "unpark", "billing", "order-1"]);
    assert!(!ok, "{out}");
    assert!(out.starts_with("error: NOT_FOUND: "), "{out}");

    delete_and_check(&router);
    pg.shutdown().await;
}

/// `feed create` answers the group with every slot; again, the same; another definition is
/// ALREADY_EXISTS.
fn create_and_check(router: &[String], slot_count: u32) {
    let g = ordoctl_json(
        router,
        &[
            "feed",
            "create",
            "billing",
            "--prefix",
            "outbox/",
            "--ack-wait",
            "5s",
        ],
    );
    assert_eq!(g["group"], "billing");
    assert_eq!(g["key_prefix"], "outbox/");
    assert_eq!(g["mode"], "key-ordered");
    assert_eq!(g["poison"], "park");
    assert_eq!(u64_of(&g, "ack_wait_ms"), 5_000);
    assert!(u64_of(&g, "max_deliver") > 0, "the server's default: {g}");
    let slots = g["slots"].as_array().unwrap();
    assert_eq!(slots.len(), slot_count as usize, "one entry per slot: {g}");
    let in_order = slots
        .windows(2)
        .all(|w| u64_of(&w[0], "slot") < u64_of(&w[1], "slot"));
    assert!(in_order, "slots in slot order: {g}");
    assert_eq!(u64_of(&g, "lag_events"), 0, "created from now: {g}");

    // The same definition again is the same group; another one under the name is refused.
    let again = ordoctl_json(
        router,
        &[
            "feed",
            "create",
            "billing",
            "--prefix",
            "outbox/",
            "--ack-wait",
            "5s",
        ],
    );
    assert_eq!(again["group"], "billing");
    let (ok, out) = ordoctl(router, &["feed", "create", "billing", "--prefix", "other/"]);
    assert!(!ok && out.contains("ALREADY_EXISTS"), "{out}");
}

/// `feed delete` twice (the second finds nothing, still exit 0), then the group is gone.
fn delete_and_check(router: &[String]) {
    let (ok, out) = ordoctl(router, &["feed", "delete", "billing"]);
    assert!(ok && out.trim() == "ok deleted", "{out}");
    let (ok, out) = ordoctl(router, &["feed", "delete", "billing"]);
    assert!(ok && out.trim() == "ok not found", "{out}");
    let (ok, out) = ordoctl(router, &["feed", "describe", "billing"]);
    assert!(!ok && out.starts_with("error: NOT_FOUND: "), "{out}");
    let (ok, out) = ordoctl(router, &["feed", "groups"]);
    assert!(ok && out.trim() == "no consumer groups", "{out}");
}
