//! Parsers of the values clap cannot parse alone: durations, txn compares and ops, group specs,
//! slot lists and where a watch starts, plus the local checks of `init` and `group add`. Pure functions over strings,
//! so every refusal (with what was wrong and the expected syntax) is unit-tested.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use ordo::proto::v1::watch_request::Start;
use ordo::proto::v1::{
    compare, txn_op, Compare, DeleteRequest, EmitRequest, GetRequest, GroupSpec,
    InitClusterRequest, PutRequest, TxnOp,
};
use ordo_proto::client::normalize_addr;

/// Syntax of one `--compare`, repeated in help and error messages.
pub(crate) const COMPARE_SYNTAX: &str =
    "\"<shard_key> <key> version|value|exists =|!=|<|> <operand>\"";
/// Syntax of one `init --group`.
pub(crate) const GROUP_SYNTAX: &str = "<id>=<addr>,<addr>,... (e.g. 1=10.0.0.1:7001,10.0.0.2:7001)";
/// Syntax of `move-slots --slots`.
pub(crate) const SLOTS_SYNTAX: &str =
    "comma-separated slots and inclusive ranges, e.g. 0-511,600,700-701";
/// Most slots one `--slots` list may name; far above any cluster's slot count, it only keeps a
/// typo such as `0-4000000000` from allocating gigabytes.
const SLOTS_MAX: usize = 1 << 20;

/// Syntax of one `--success`/`--failure` op.
pub(crate) const OP_SYNTAX: &str =
    "\"put <shard_key> <key> <value>\", \"delete <shard_key> <key>\", \
                         \"get <shard_key> <key>\" or \"emit <shard_key> <key> <value>\"";

/// The parsed `--slots` of `move-slots` (a newtype so that clap takes the whole list as one value).
#[derive(Clone, Debug)]
pub(crate) struct SlotList(pub(crate) Vec<u32>);

pub(crate) fn parse_slot_list(s: &str) -> Result<SlotList, String> {
    parse_slot_ranges(s).map(SlotList)
}

/// Where `watch --from` starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum WatchFrom {
    Start(Start),
    /// A cursor printed by an earlier watch (hex).
    Cursor(Bytes),
}

/// `now`, `oldest`, `snapshot`, or a cursor in hex.
pub(crate) fn parse_watch_from(s: &str) -> Result<WatchFrom, String> {
    match s.trim() {
        "now" => Ok(WatchFrom::Start(Start::FromNow)),
        "oldest" => Ok(WatchFrom::Start(Start::FromOldest)),
        "snapshot" => Ok(WatchFrom::Start(Start::FromSnapshot)),
        hex => parse_hex(hex)
            .map(|b| WatchFrom::Cursor(b.into()))
            .map_err(|why| {
                format!("expected now, oldest, snapshot or a cursor printed by `watch`; {why}")
            }),
    }
}

/// Where a consumer group starts (`feed create --from`) or is sought to (`feed seek --to`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GroupFrom {
    /// `Start::FromNow` or `Start::FromOldest` (a group delivers events, so no snapshot).
    Start(Start),
    /// The events committed after this time (ms since the Unix epoch, not 0).
    AfterTsMs(u64),
}

/// `now`, `oldest`, milliseconds since the Unix epoch, or an RFC 3339 time in UTC
/// (`2026-12-01T21:00:00Z`, fractional seconds allowed).
pub(crate) fn parse_group_from(s: &str) -> Result<GroupFrom, String> {
    let s = s.trim();
    let expected = "expected now, oldest, milliseconds since the Unix epoch or an RFC 3339 time \
                    such as 2026-12-01T21:00:00Z";
    match s {
        "now" => return Ok(GroupFrom::Start(Start::FromNow)),
        "oldest" => return Ok(GroupFrom::Start(Start::FromOldest)),
        "snapshot" => {
            return Err(format!(
                "a consumer group delivers events, not items: snapshot is not a start; {expected}"
            ))
        }
        _ => {}
    }
    let ms = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<u64>()
            .map_err(|_| format!("time {s:?} is too large; {expected}"))?
    } else {
        let t = humantime::parse_rfc3339(s).map_err(|e| format!("time {s:?}: {e}; {expected}"))?;
        let since = t
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| format!("time {s:?} is before the Unix epoch"))?;
        u64::try_from(since.as_millis()).map_err(|_| format!("time {s:?} is too late"))?
    };
    if ms == 0 {
        return Err(format!("time 0 is not a start; {expected}"));
    }
    Ok(GroupFrom::AfterTsMs(ms))
}

/// Bytes from lowercase or uppercase hex digits, two per byte.
fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    if s.is_empty() || !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{s:?} is not an even number of hex digits"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

/// Parses a positive duration in humantime's grammar (`500ms`, `10s`, `2m`, `1h 30m`, `1.5s`:
/// the one the bench takes too), or a bare number of seconds, which ordoctl has always taken.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = s
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: too large"))?;
        Duration::from_secs(secs)
    } else {
        humantime::parse_duration(s)
            .map_err(|e| format!("invalid duration {s:?}: {e}; expected e.g. 500ms, 10s or 1m"))?
    };
    if d.is_zero() {
        return Err("the timeout must be positive".into());
    }
    Ok(d)
}

/// A token of the compare/op syntax as bytes: `""` stands for the empty string.
fn token(t: &str) -> Bytes {
    if t == "\"\"" || t == "''" {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(t.as_bytes())
    }
}

/// Parses one `--compare`: `<shard_key> <key> version|value|exists =|!=|<|> <operand>`.
pub(crate) fn parse_compare(s: &str) -> Result<Compare, String> {
    let fail = |what: String| format!("{what} in {s:?}; expected {COMPARE_SYNTAX}");
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [shard_key, key, target, op, operand] = parts[..] else {
        return Err(fail(format!(
            "expected 5 whitespace-separated fields, got {}",
            parts.len()
        )));
    };
    let op = match op {
        "=" | "==" => compare::Op::Equal,
        "!=" => compare::Op::NotEqual,
        "<" => compare::Op::Less,
        ">" => compare::Op::Greater,
        other => return Err(fail(format!("unknown operator {other:?}"))),
    };
    let mut c = Compare {
        shard_key: token(shard_key),
        key: token(key),
        op: op as i32,
        ..Compare::default()
    };
    match target {
        "version" => {
            c.target = compare::Target::Version as i32;
            c.version = operand.parse().map_err(|_| {
                fail(format!(
                    "version operand {operand:?} is not a non-negative integer"
                ))
            })?;
        }
        "value" => {
            c.target = compare::Target::Value as i32;
            c.value = token(operand);
        }
        "exists" => {
            c.target = compare::Target::Exists as i32;
            if !matches!(op, compare::Op::Equal | compare::Op::NotEqual) {
                return Err(fail("exists can only be compared with = or !=".into()));
            }
            c.exists = match operand {
                "true" => true,
                "false" => false,
                other => {
                    return Err(fail(format!(
                        "exists operand {other:?} must be true or false"
                    )))
                }
            };
        }
        other => {
            return Err(fail(format!(
                "unknown target {other:?} (use version, value or exists)"
            )))
        }
    }
    Ok(c)
}

/// Parses one `--success`/`--failure` op: `put <sk> <k> <v>`, `delete <sk> <k>`, `get <sk> <k>`
/// or `emit <sk> <k> <v>` (an event on the change feed, no item stored).
pub(crate) fn parse_op(s: &str) -> Result<TxnOp, String> {
    let fail = |what: String| format!("{what} in {s:?}; expected {OP_SYNTAX}");
    let parts: Vec<&str> = s.split_whitespace().collect();
    let op = match parts[..] {
        ["put", shard_key, key, value] => txn_op::Op::Put(PutRequest {
            shard_key: token(shard_key),
            key: token(key),
            value: token(value),
            ..PutRequest::default()
        }),
        ["delete", shard_key, key] => txn_op::Op::Delete(DeleteRequest {
            shard_key: token(shard_key),
            key: token(key),
            ..DeleteRequest::default()
        }),
        ["get", shard_key, key] => txn_op::Op::Get(GetRequest {
            shard_key: token(shard_key),
            key: token(key),
            ..GetRequest::default()
        }),
        ["emit", shard_key, key, value] => txn_op::Op::Emit(EmitRequest {
            shard_key: token(shard_key),
            key: token(key),
            value: token(value),
        }),
        [verb @ ("put" | "emit"), ..] => {
            return Err(fail(format!(
                "{verb} takes 3 fields (shard_key key value), got {} (values cannot contain \
                 spaces)",
                parts.len() - 1
            )))
        }
        [verb @ ("delete" | "get"), ..] => {
            return Err(fail(format!(
                "{verb} takes 2 fields (shard_key key), got {}",
                parts.len() - 1
            )))
        }
        [other, ..] => return Err(fail(format!("unknown op {other:?}"))),
        [] => return Err(fail("empty op".into())),
    };
    Ok(TxnOp { op: Some(op) })
}

/// A group's spec from its id and replica addresses (kept as typed, trimmed). Refuses id 0 (the
/// config group's), no address, an invalid address and an address listed twice (`a:1` and
/// `http://a:1` are the same address).
pub(crate) fn group_spec(id: u64, addrs: &[String]) -> Result<GroupSpec, String> {
    if id == 0 {
        return Err("group id 0 is reserved for the config group".into());
    }
    if addrs.iter().all(|a| a.trim().is_empty()) {
        return Err(format!("group {id} has no replica address"));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(addrs.len());
    for raw in addrs {
        let addr = raw.trim();
        if addr.is_empty() {
            return Err(format!("group {id}: empty address in the list"));
        }
        let canonical = canonical_addr(addr).map_err(|e| format!("group {id}: {e}"))?;
        if !seen.insert(canonical) {
            return Err(format!("group {id}: address {addr} is listed twice"));
        }
        out.push(addr.to_string());
    }
    Ok(GroupSpec { id, addrs: out })
}

/// The one spelling of `addr` used to find duplicates (`http://host:port`), if it is valid.
fn canonical_addr(addr: &str) -> Result<String, String> {
    let canonical = normalize_addr(addr).map_err(|e| format!("{e:#}"))?;
    tonic::transport::Endpoint::from_shared(canonical.clone())
        .map_err(|e| format!("invalid address {addr:?}: {e}"))?;
    Ok(canonical)
}

/// Parses one `init --group`: `<id>=<addr>,<addr>,...`.
pub(crate) fn parse_group_spec(s: &str) -> Result<GroupSpec, String> {
    let fail = |what: String| format!("{what} in --group {s:?}; expected {GROUP_SYNTAX}");
    let Some((id, addrs)) = s.split_once('=') else {
        return Err(fail("no '='".into()));
    };
    let id: u64 = id
        .trim()
        .parse()
        .map_err(|_| fail(format!("group id {:?} is not a number", id.trim())))?;
    let addrs: Vec<String> = addrs.split(',').map(str::to_string).collect();
    group_spec(id, &addrs).map_err(fail)
}

/// The InitCluster request, refusing what the config server would refuse anyway and is cheaper
/// to catch here: no slots, no groups, a group id given twice, an address in two groups.
pub(crate) fn init_request(
    slot_count: u32,
    groups: Vec<GroupSpec>,
) -> Result<InitClusterRequest, String> {
    if slot_count == 0 {
        return Err("--slots must be positive".into());
    }
    if groups.is_empty() {
        return Err(format!(
            "no groups: pass --group {GROUP_SYNTAX} once per shard group"
        ));
    }
    let mut ids = HashSet::new();
    // Canonical address -> the group that lists it.
    let mut owners: BTreeMap<String, u64> = BTreeMap::new();
    for g in &groups {
        if !ids.insert(g.id) {
            return Err(format!("group id {} is given twice", g.id));
        }
        for addr in &g.addrs {
            let canonical = canonical_addr(addr)?;
            if let Some(other) = owners.insert(canonical, g.id) {
                return Err(if other == g.id {
                    format!("group {}: address {addr} is listed twice", g.id)
                } else {
                    format!(
                        "address {addr} is listed in group {other} and in group {}",
                        g.id
                    )
                });
            }
        }
    }
    Ok(InitClusterRequest { slot_count, groups })
}

/// Parses `0-511,600,700-701` (inclusive ranges) into the slots in the order given. Refuses
/// reversed ranges, a slot named twice, empty elements and more than [`SLOTS_MAX`] slots.
pub(crate) fn parse_slot_ranges(s: &str) -> Result<Vec<u32>, String> {
    let fail = |what: String| format!("{what} in --slots {s:?}; expected {SLOTS_SYNTAX}");
    let number = |t: &str| -> Result<u32, String> {
        t.trim()
            .parse()
            .map_err(|_| fail(format!("{:?} is not a slot number", t.trim())))
    };
    let mut slots = Vec::new();
    let mut seen = HashSet::new();
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(fail("empty element".into()));
        }
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (number(lo)?, number(hi)?),
            None => {
                let n = number(part)?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(fail(format!(
                "reversed range {part} (did you mean {hi}-{lo}?)"
            )));
        }
        if (hi - lo) as usize + 1 > SLOTS_MAX - slots.len() {
            return Err(fail(format!("more than {SLOTS_MAX} slots")));
        }
        for slot in lo..=hi {
            if !seen.insert(slot) {
                return Err(fail(format!("slot {slot} is named twice")));
            }
            slots.push(slot);
        }
    }
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::strings;

    #[test]
    fn group_starts_parse() {
        use GroupFrom::*;
        assert_eq!(
            parse_group_from("now").unwrap(),
            Start(super::Start::FromNow)
        );
        assert_eq!(
            parse_group_from(" oldest ").unwrap(),
            Start(super::Start::FromOldest)
        );
        assert_eq!(
            parse_group_from("1764622800000").unwrap(),
            AfterTsMs(1_764_622_800_000)
        );
        assert_eq!(
            parse_group_from("2025-12-01T21:00:00Z").unwrap(),
            AfterTsMs(1_764_622_800_000)
        );
        assert_eq!(
            parse_group_from("2025-12-01T21:00:00.250Z").unwrap(),
            AfterTsMs(1_764_622_800_250)
        );
        let err = parse_group_from("snapshot").unwrap_err();
        assert!(err.contains("events, not items"), "{err}");
        for bad in [
            "",
            "0",
            "yesterday",
            "2025-13-01T00:00:00Z",
            "99999999999999999999",
        ] {
            let err = parse_group_from(bad).unwrap_err();
            assert!(err.contains("expected now, oldest"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn watch_starts_parse() {
        assert_eq!(
            parse_watch_from("oldest").unwrap(),
            WatchFrom::Start(Start::FromOldest)
        );
        assert_eq!(
            parse_watch_from(" now").unwrap(),
            WatchFrom::Start(Start::FromNow)
        );
        assert_eq!(
            parse_watch_from("snapshot").unwrap(),
            WatchFrom::Start(Start::FromSnapshot)
        );
        assert_eq!(
            parse_watch_from("01fEa0").unwrap(),
            WatchFrom::Cursor(Bytes::from_static(&[1, 0xfe, 0xa0]))
        );
        for bad in ["", "later", "0", "0g"] {
            let err = parse_watch_from(bad).unwrap_err();
            assert!(
                err.starts_with("expected now, oldest, snapshot"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn compares_parse() {
        let c = parse_compare("o1 status version = 3").unwrap();
        assert_eq!(c.shard_key, "o1");
        assert_eq!(c.key, "status");
        assert_eq!(c.target, compare::Target::Version as i32);
        assert_eq!(c.op, compare::Op::Equal as i32);
        assert_eq!(c.version, 3);

        let c = parse_compare("  o1   \"\"  value != paid ").unwrap();
        assert!(c.key.is_empty());
        assert_eq!(c.target, compare::Target::Value as i32);
        assert_eq!(c.op, compare::Op::NotEqual as i32);
        assert_eq!(c.value, "paid");

        let c = parse_compare("o1 k value < \"\"").unwrap();
        assert_eq!(c.op, compare::Op::Less as i32);
        assert!(c.value.is_empty());

        let c = parse_compare("o1 k exists = false").unwrap();
        assert_eq!(c.target, compare::Target::Exists as i32);
        assert!(!c.exists);
        assert!(parse_compare("o1 k exists != true").unwrap().exists);
        assert_eq!(
            parse_compare("o1 k version > 0").unwrap().op,
            compare::Op::Greater as i32
        );
    }

    #[test]
    fn bad_compares_say_what_and_how() {
        for (input, what) in [
            ("o1 k version =", "expected 5"),
            ("o1 k version = 3 4", "expected 5"),
            ("", "expected 5"),
            ("o1 k version ~ 3", "unknown operator"),
            ("o1 k size = 3", "unknown target"),
            ("o1 k version = -1", "not a non-negative integer"),
            ("o1 k version = x", "not a non-negative integer"),
            ("o1 k exists = yes", "true or false"),
            ("o1 k exists < true", "only be compared with = or !="),
        ] {
            let err = parse_compare(input).unwrap_err();
            assert!(err.contains(what), "{input:?}: {err}");
            assert!(err.contains(COMPARE_SYNTAX), "{input:?}: {err}");
        }
    }

    #[test]
    fn ops_parse() {
        let Some(txn_op::Op::Put(p)) = parse_op("put o1 status paid").unwrap().op else {
            panic!("not put")
        };
        assert_eq!(
            (&p.shard_key[..], &p.key[..], &p.value[..]),
            (&b"o1"[..], &b"status"[..], &b"paid"[..])
        );
        assert_eq!(p.if_version, None);

        let Some(txn_op::Op::Put(p)) = parse_op("put o1 \"\" \"\"").unwrap().op else {
            panic!("not put")
        };
        assert!(p.key.is_empty() && p.value.is_empty());

        let Some(txn_op::Op::Delete(d)) = parse_op("delete o1 cart").unwrap().op else {
            panic!("not delete")
        };
        assert_eq!(d.key, "cart");

        let Some(txn_op::Op::Get(g)) = parse_op("get o1 status").unwrap().op else {
            panic!("not get")
        };
        assert_eq!(g.key, "status");
        assert_eq!(g.consistency, 0, "txn gets are linearizable");

        let Some(txn_op::Op::Emit(e)) = parse_op("emit o1 outbox/paid {}").unwrap().op else {
            panic!("not emit")
        };
        assert_eq!(
            (&e.shard_key[..], &e.key[..], &e.value[..]),
            (&b"o1"[..], &b"outbox/paid"[..], &b"{}"[..])
        );
    }

    #[test]
    fn bad_ops_say_what_and_how() {
        for (input, what) in [
            ("put o1 k", "put takes 3 fields"),
            ("put o1 k two words", "put takes 3 fields"),
            ("emit o1 k", "emit takes 3 fields"),
            ("delete o1", "delete takes 2 fields"),
            ("get o1 k extra", "get takes 2 fields"),
            ("patch o1 k", "unknown op"),
            ("  ", "empty op"),
        ] {
            let err = parse_op(input).unwrap_err();
            assert!(err.contains(what), "{input:?}: {err}");
            assert!(err.contains(OP_SYNTAX), "{input:?}: {err}");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration(" 10 s ").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("010s").unwrap(), Duration::from_secs(10));
        // humantime's grammar (the bench's) takes more than ordoctl's own did: hours, fractions,
        // compound durations. These were refused before the switch.
        assert_eq!(parse_duration("10h").unwrap(), Duration::from_secs(36_000));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1m 30s").unwrap(), Duration::from_secs(90));
        for bad in ["", "s", "0s", "-1s", "0", "0ms", "10x", "5S", "1.s", "1e3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        let err = parse_duration("10x").unwrap_err();
        assert!(err.contains("\"10x\"") && err.contains("500ms"), "{err}");
        assert!(parse_duration("0s").unwrap_err().contains("positive"));
    }

    #[test]
    fn group_specs_parse() {
        let g = parse_group_spec("7=a:1, b:1 ,http://c:1").unwrap();
        assert_eq!(g.id, 7);
        assert_eq!(g.addrs, ["a:1", "b:1", "http://c:1"]);
        for (input, what) in [
            ("7", "no '='"),
            ("x=a:1", "is not a number"),
            ("-1=a:1", "is not a number"),
            ("0=a:1", "reserved for the config group"),
            ("7=", "has no replica address"),
            ("7=a:1,,b:1", "empty address"),
            ("7=a:1,a:1", "a:1 is listed twice"),
            ("7=a:1,http://a:1/", "listed twice"),
            ("7=https://a:1", "TLS"),
            ("7=a b:1", "invalid address"),
        ] {
            let err = parse_group_spec(input).unwrap_err();
            assert!(err.contains(what), "{input:?}: {err}");
            assert!(err.contains(GROUP_SYNTAX), "{input:?}: {err}");
        }
        assert!(group_spec(3, &strings(&["x:1", "y:1"])).is_ok());
        assert!(group_spec(3, &strings(&[]))
            .unwrap_err()
            .contains("no replica"));
        assert!(group_spec(3, &strings(&[""]))
            .unwrap_err()
            .contains("no replica"));
    }

    #[test]
    fn init_is_checked_locally() {
        let g = |s: &str| parse_group_spec(s).unwrap();
        let req = init_request(4096, vec![g("1=a:1,a:2"), g("2=b:1")]).unwrap();
        assert_eq!(req.slot_count, 4096);
        assert_eq!(req.groups.len(), 2);
        for (slots, groups, what) in [
            (0, vec![g("1=a:1")], "--slots must be positive"),
            (16, vec![], "no groups"),
            (
                16,
                vec![g("1=a:1"), g("1=b:1")],
                "group id 1 is given twice",
            ),
            (
                16,
                vec![g("1=a:1"), g("2=b:1,http://a:1")],
                "listed in group 1 and in group 2",
            ),
        ] {
            let err = init_request(slots, groups).unwrap_err();
            assert!(err.contains(what), "{err}");
        }
    }

    #[test]
    fn slot_ranges_parse() {
        let slots = parse_slot_ranges("0-511,600,700-701").unwrap();
        assert_eq!(slots.len(), 515);
        assert_eq!(slots[..2], [0, 1]);
        assert_eq!(slots[511..], [511, 600, 700, 701]);
        assert_eq!(parse_slot_ranges(" 9 , 3-3 ").unwrap(), [9, 3]);
        assert_eq!(parse_slot_ranges("4294967295").unwrap(), [u32::MAX]);
        for (input, what) in [
            ("5-3", "reversed range 5-3"),
            ("", "empty element"),
            ("1,,2", "empty element"),
            ("1,", "empty element"),
            ("x", "not a slot number"),
            ("1-", "not a slot number"),
            ("-1", "not a slot number"),
            ("1-2-3", "not a slot number"),
            ("4294967296", "not a slot number"),
            ("0-3,2", "slot 2 is named twice"),
            ("7,7", "slot 7 is named twice"),
            ("0-4294967295", "more than"),
        ] {
            let err = parse_slot_ranges(input).unwrap_err();
            assert!(err.contains(what), "{input:?}: {err}");
            assert!(err.contains(SLOTS_SYNTAX), "{input:?}: {err}");
        }
    }
}
