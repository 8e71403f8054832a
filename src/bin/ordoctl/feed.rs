//! `ordoctl feed groups | describe | create | delete | seek | unpark`: the change feed's consumer
//! groups, through a router's `Feed` service. Arguments are checked here (name, shard keys, how
//! long an ack may wait) before any address is used; the router and the nodes check them again.
//! A group's text view is here too (the JSON views are in [`crate::json`]): its definition, its
//! totals, one row per slot and one per parked order.

use std::time::Duration;

use bytes::Bytes;
use ordo::proto::v1::watch_request::Start;
use ordo::proto::v1::{
    ConsumerGroup, CreateGroupRequest, GroupSlot, Mode, PoisonPolicy, SeekGroupRequest,
    UnparkRequest,
};
use ordo_proto::{check_group_name, FEED_SHARD_KEYS_MAX};

use crate::args::{FeedCommand, FeedCreateArgs, FeedMode, FeedPoison};
use crate::json;
use crate::parse::GroupFrom;
use crate::render::{align, mode_name, poison_name, shell_word};
use crate::{Endpoints, Failure};

pub(crate) async fn feed(ep: &Endpoints, c: FeedCommand, json: bool) -> Result<(), Failure> {
    let client = |group: &str| -> Result<_, Failure> {
        check_group_name(group).map_err(anyhow::Error::msg)?;
        Ok(ep.kv()?)
    };
    let out = match c {
        FeedCommand::Groups => {
            let list = ep.kv()?.list_groups().await?;
            render_groups(&list.groups, json)
        }
        FeedCommand::Describe(a) => {
            let g = client(&a.group)?.describe_group(&a.group).await?;
            render_group_slots(&g, a.all_slots, json)
        }
        FeedCommand::Create(a) => {
            let req = create_request(a).map_err(anyhow::Error::msg)?;
            let g = client(&req.group)?.create_group(req).await?;
            render_group(&g, json)
        }
        FeedCommand::Delete(a) => {
            let r = client(&a.group)?.delete_group(&a.group).await?;
            render_deleted(r.deleted, json)
        }
        FeedCommand::Seek(a) => {
            let (to, after_ts_ms) = start_of(a.to);
            let req = SeekGroupRequest {
                group: a.group,
                to: to as i32,
                after_ts_ms,
            };
            let g = client(&req.group)?.seek_group(req).await?;
            render_group(&g, json)
        }
        FeedCommand::Unpark(a) => {
            let req = UnparkRequest {
                group: a.group,
                shard_key: Bytes::from(a.shard_key),
            };
            let g = client(&req.group)?.unpark(req).await?;
            render_group(&g, json)
        }
    };
    println!("{out}");
    Ok(())
}

/// The request's `Start` and `after_ts_ms` (a time wins over the start, which is then unused).
fn start_of(from: GroupFrom) -> (Start, u64) {
    match from {
        GroupFrom::Start(s) => (s, 0),
        GroupFrom::AfterTsMs(ms) => (Start::FromNow, ms),
    }
}

/// The `CreateGroup` request of `feed create`, refusing what the router would refuse anyway:
/// a bad name, too many shard keys, an `--ack-wait` that is not a whole number of milliseconds
/// from 1 ms to `u32::MAX` ms. Defaults the flags leave out are the server's (sent as 0).
pub(crate) fn create_request(a: FeedCreateArgs) -> Result<CreateGroupRequest, String> {
    check_group_name(&a.group)?;
    if a.shard_keys.len() > FEED_SHARD_KEYS_MAX {
        return Err(format!(
            "{} --shard-key values; a group names at most {FEED_SHARD_KEYS_MAX} \
             (FEED_SHARD_KEYS_MAX): use --prefix, or no --shard-key for every slot",
            a.shard_keys.len()
        ));
    }
    let ack_wait_ms = match a.ack_wait {
        None => 0,
        Some(d) => ack_wait_ms(d)?,
    };
    let (from, after_ts_ms) = start_of(a.from);
    let mode = match a.mode {
        FeedMode::KeyOrdered => Mode::KeyOrdered,
        FeedMode::SlotExclusive => Mode::SlotExclusive,
    };
    let poison = match a.poison {
        FeedPoison::Park => PoisonPolicy::Park,
        FeedPoison::DeadLetter => PoisonPolicy::DeadLetter,
    };
    Ok(CreateGroupRequest {
        group: a.group,
        key_prefix: Bytes::from(a.prefix),
        from: from as i32,
        mode: mode as i32,
        ack_wait_ms,
        max_deliver: a.max_deliver.unwrap_or(0),
        poison: poison as i32,
        shard_keys: a.shard_keys.into_iter().map(Bytes::from).collect(),
        after_ts_ms,
    })
}

fn ack_wait_ms(d: Duration) -> Result<u32, String> {
    let ms = d.as_millis();
    if ms == 0 || !d.subsec_nanos().is_multiple_of(1_000_000) {
        return Err(format!(
            "--ack-wait {d:?} is not a whole number of milliseconds of at least 1ms"
        ));
    }
    u32::try_from(ms).map_err(|_| format!("--ack-wait {d:?} is above {}ms", u32::MAX))
}

/// `30s`, `1s 200ms`: a count of milliseconds as humantime writes durations.
fn ms_text(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

/// What `feed create|seek|unpark` print: [`render_group_slots`] without the quiet slots.
pub(crate) fn render_group(g: &ConsumerGroup, json: bool) -> String {
    render_group_slots(g, false, json)
}

/// Whether a slot has anything to show beyond its committed seq: events after it, deliveries in
/// flight, parked orders, expiry.
fn slot_is_quiet(s: &GroupSlot) -> bool {
    s.lag_events == 0
        && s.acked_above == 0
        && s.pending == 0
        && s.redeliveries == 0
        && s.parked.is_empty()
        && !s.expired
}

/// What `feed describe` prints: a header line with the definition, a line of totals, one row
/// per slot (per slot with something waiting unless `all_slots`: a cluster has thousands), then
/// the parked orders. `--json` lists every slot.
pub(crate) fn render_group_slots(g: &ConsumerGroup, all_slots: bool, json: bool) -> String {
    if json {
        return json::consumer_group(g);
    }
    let mut out = format!(
        "group {}  mode {}  prefix {}  ack-wait {}  max-deliver {}  poison {}\n",
        g.group,
        mode_name(g.mode),
        shell_word(&String::from_utf8_lossy(&g.key_prefix)),
        ms_text(g.ack_wait_ms.into()),
        g.max_deliver,
        poison_name(g.poison),
    );
    if !g.shard_keys.is_empty() {
        let keys: Vec<String> = g.shard_keys.iter().map(|k| key_word(k)).collect();
        out += &format!("shard keys: {}\n", keys.join(" "));
    }
    out += &format!(
        "lag {} events  pending {}  redeliveries {}  parked {}{}\n",
        g.lag_events,
        g.pending,
        g.redeliveries,
        g.parked,
        if g.expired {
            "  EXPIRED (retention dropped events it had not acked; `feed seek` revives it)"
        } else {
            ""
        }
    );
    let mut rows = vec![[
        "slot",
        "committed",
        "acked-above",
        "lag",
        "lag-time",
        "pending",
        "redeliveries",
        "parked",
        "expired",
    ]
    .map(String::from)
    .to_vec()];
    let shown: Vec<&GroupSlot> = g
        .slots
        .iter()
        .filter(|s| all_slots || !slot_is_quiet(s))
        .collect();
    for s in &shown {
        rows.push(vec![
            s.slot.to_string(),
            s.committed_seq.to_string(),
            s.acked_above.to_string(),
            s.lag_events.to_string(),
            ms_text(s.lag_ms),
            s.pending.to_string(),
            s.redeliveries.to_string(),
            s.parked.len().to_string(),
            if s.expired { "yes" } else { "" }.to_string(),
        ]);
    }
    if shown.is_empty() {
        out += "every slot is caught up";
    } else {
        out += &align(&rows).join("\n");
    }
    let quiet = g.slots.len() - shown.len();
    if quiet > 0 {
        out += &format!(
            "\n{quiet} more slot{} with nothing waiting (--all-slots lists them)",
            if quiet == 1 { "" } else { "s" }
        );
    }
    let parked: Vec<Vec<String>> = g
        .slots
        .iter()
        .flat_map(|s| {
            s.parked.iter().map(|p| {
                vec![
                    s.slot.to_string(),
                    key_word(&p.shard_key),
                    p.seq.to_string(),
                    p.attempts.to_string(),
                ]
            })
        })
        .collect();
    if !parked.is_empty() {
        let mut rows = vec![["slot", "shard-key", "seq", "attempts"]
            .map(String::from)
            .to_vec()];
        rows.extend(parked);
        out += "\nparked orders (`feed unpark <group> <shard-key>` releases one):\n";
        out += &align(&rows).join("\n");
    }
    out
}

/// A shard key as `watch` prints one.
fn key_word(k: &[u8]) -> String {
    shell_word(&String::from_utf8_lossy(k))
}

/// What `feed groups` prints: one row per group with its totals.
pub(crate) fn render_groups(groups: &[ConsumerGroup], json: bool) -> String {
    if json {
        return json::consumer_groups(groups);
    }
    if groups.is_empty() {
        return "no consumer groups".into();
    }
    let mut rows = vec![[
        "group",
        "mode",
        "prefix",
        "slots",
        "lag",
        "pending",
        "redeliveries",
        "parked",
        "expired",
    ]
    .map(String::from)
    .to_vec()];
    for g in groups {
        rows.push(vec![
            g.group.clone(),
            mode_name(g.mode).into(),
            shell_word(&String::from_utf8_lossy(&g.key_prefix)),
            g.slots.len().to_string(),
            g.lag_events.to_string(),
            g.pending.to_string(),
            g.redeliveries.to_string(),
            g.parked.to_string(),
            if g.expired { "yes" } else { "" }.into(),
        ]);
    }
    align(&rows).join("\n")
}

/// What `feed delete` prints (deleting a group that does not exist is not an error).
pub(crate) fn render_deleted(deleted: bool, json: bool) -> String {
    match (json, deleted) {
        (true, _) => json::group_deleted(deleted),
        (false, true) => "ok deleted".into(),
        (false, false) => "ok not found".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ordo::proto::v1::ParkedOrder;

    fn sample_group() -> ConsumerGroup {
        ConsumerGroup {
            group: "billing".into(),
            key_prefix: Bytes::from_static(b"outbox/"),
            mode: Mode::KeyOrdered as i32,
            ack_wait_ms: 30_000,
            max_deliver: 5,
            poison: PoisonPolicy::Park as i32,
            shard_keys: vec![],
            slots: vec![
                GroupSlot {
                    slot: 0,
                    committed_seq: 120,
                    acked_above: 1,
                    lag_events: 2,
                    lag_ms: 1_200,
                    pending: 1,
                    redeliveries: 0,
                    parked: vec![],
                    expired: false,
                },
                GroupSlot {
                    slot: 3,
                    committed_seq: 44,
                    acked_above: 0,
                    lag_events: 10,
                    lag_ms: 0,
                    pending: 2,
                    redeliveries: 1,
                    parked: vec![ParkedOrder {
                        shard_key: Bytes::from_static(b"order 17"),
                        seq: 45,
                        attempts: 5,
                    }],
                    expired: true,
                },
            ],
            lag_events: 12,
            pending: 3,
            redeliveries: 1,
            parked: 1,
            expired: true,
        }
    }

    #[test]
    fn a_group_renders_as_tables() {
        assert_eq!(
            render_group(&sample_group(), false),
            "group billing  mode key-ordered  prefix outbox/  ack-wait 30s  max-deliver 5  \
             poison park\n\
             lag 12 events  pending 3  redeliveries 1  parked 1  EXPIRED (retention dropped \
             events it had not acked; `feed seek` revives it)\n\
             slot  committed  acked-above  lag  lag-time  pending  redeliveries  parked  expired\n\
             0     120        1            2    1s 200ms  1        0             0\n\
             3     44         0            10   0s        2        1             1       yes\n\
             parked orders (`feed unpark <group> <shard-key>` releases one):\n\
             slot  shard-key   seq  attempts\n\
             3     'order 17'  45   5"
        );
    }

    #[test]
    fn quiet_slots_are_counted_unless_all_are_asked_for() {
        let mut g = sample_group();
        g.slots.push(GroupSlot {
            slot: 7,
            committed_seq: 9,
            ..GroupSlot::default()
        });
        let text = render_group(&g, false);
        assert!(!text.contains("\n7 "), "{text}");
        assert!(
            text.contains("\n3     44 ") && text.contains("\n1 more slot with nothing waiting"),
            "{text}"
        );
        let all = render_group_slots(&g, true, false);
        assert!(
            all.contains("\n7     9          0            0    0s"),
            "{all}"
        );
        assert!(!all.contains("more slot"), "{all}");
        g.slots = vec![g.slots[2].clone(), g.slots[2].clone()];
        g.slots[1].slot = 8;
        let caught_up = render_group(&g, false);
        assert!(
            caught_up.contains("every slot is caught up\n2 more slots with nothing waiting"),
            "{caught_up}"
        );
    }

    #[test]
    fn a_group_renders_as_json() {
        let mut g = sample_group();
        g.shard_keys = vec![Bytes::from_static(b"o1")];
        g.slots.truncate(1);
        g.slots[0].parked = sample_group().slots[1].parked.clone();
        assert_eq!(
            render_group(&g, true),
            "{\"group\":\"billing\",\"key_prefix\":\"outbox/\",\"mode\":\"key-ordered\",\
             \"ack_wait_ms\":30000,\"max_deliver\":5,\"poison\":\"park\",\"shard_keys\":[\"o1\"],\
             \"lag_events\":12,\"pending\":3,\"redeliveries\":1,\"parked\":1,\"expired\":true,\
             \"slots\":[{\"slot\":0,\"committed_seq\":120,\"acked_above\":1,\"lag_events\":2,\
             \"lag_ms\":1200,\"pending\":1,\"redeliveries\":0,\"parked\":[{\"shard_key\":\
             \"order 17\",\"seq\":45,\"attempts\":5}],\"expired\":false}]}"
        );
    }

    #[test]
    fn the_group_list_renders() {
        let mut other = sample_group();
        other.group = "delivery".into();
        other.mode = Mode::SlotExclusive as i32;
        other.key_prefix = Bytes::new();
        other.expired = false;
        let list = [sample_group(), other];
        assert_eq!(
            render_groups(&list, false),
            "group     mode            prefix   slots  lag  pending  redeliveries  parked  expired\n\
             billing   key-ordered     outbox/  2      12   3        1             1       yes\n\
             delivery  slot-exclusive  \"\"       2      12   3        1             1"
        );
        assert_eq!(render_groups(&[], false), "no consumer groups");
        let json = render_groups(&list, true);
        assert!(
            json.starts_with("{\"groups\":[{\"group\":\"billing\""),
            "{json}"
        );
        assert!(json.contains("\"mode\":\"slot-exclusive\""), "{json}");
        assert_eq!(render_deleted(false, true), "{\"deleted\":false}");
        assert_eq!(render_deleted(true, false), "ok deleted");
    }

    fn create_args(extra: &[&str]) -> Result<CreateGroupRequest, String> {
        use clap::Parser;
        let mut argv = vec!["ordoctl", "feed", "create"];
        argv.extend_from_slice(extra);
        let cli = crate::args::Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let crate::args::Command::Feed(FeedCommand::Create(a)) = cli.command else {
            panic!("not feed create")
        };
        create_request(a)
    }

    #[test]
    fn create_requests_carry_the_flags() {
        let r = create_args(&["billing"]).unwrap();
        assert_eq!(
            r,
            CreateGroupRequest {
                group: "billing".into(),
                ..CreateGroupRequest::default()
            }
        );
        let r = create_args(&[
            "billing",
            "--prefix",
            "outbox/",
            "--shard-key",
            "o2",
            "--shard-key",
            "o1",
            "--from",
            "1764622800000",
            "--mode",
            "slot-exclusive",
            "--ack-wait",
            "1.5s",
            "--max-deliver",
            "3",
            "--poison",
            "dead-letter",
        ])
        .unwrap();
        assert_eq!(r.key_prefix, Bytes::from_static(b"outbox/"));
        assert_eq!(r.shard_keys, [Bytes::from("o2"), Bytes::from("o1")]);
        assert_eq!((r.from, r.after_ts_ms), (0, 1_764_622_800_000));
        assert_eq!(r.mode, Mode::SlotExclusive as i32);
        assert_eq!((r.ack_wait_ms, r.max_deliver), (1_500, 3));
        assert_eq!(r.poison, PoisonPolicy::DeadLetter as i32);
        let r = create_args(&["billing", "--from", "oldest"]).unwrap();
        assert_eq!((r.from, r.after_ts_ms), (Start::FromOldest as i32, 0));

        for (bad, why) in [
            (&["bad name"][..], "group name"),
            (
                &["g", "--ack-wait", "500us"],
                "whole number of milliseconds",
            ),
            (&["g", "--ack-wait", "100d"], "above"),
            (&["g", "--max-deliver", "0"], "0"),
            (&["g", "--mode", "fifo"], "fifo"),
            (&["g", "--from", "snapshot"], "events, not items"),
        ] {
            let err = create_args(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }
}
