//! `ordoctl watch`: follows the change feed through a router, printing one line per event, and
//! on exit (Ctrl-C, `--count`, `--for`, or the stream failing) the cursor to resume from with
//! `--from <cursor>`, so that an operator can tail the outbox and pick up where they stopped.

use bytes::Bytes;
use ordo::proto::v1::watch_request::StartOneOf;
use ordo::proto::v1::WatchRequest;
use tokio::time::Instant;

use crate::args::WatchArgs;
use crate::parse::WatchFrom;
use crate::render::{render_cursor, render_event};
use crate::{Endpoints, Failure};

pub(crate) async fn watch(ep: &Endpoints, a: WatchArgs, json: bool) -> Result<(), Failure> {
    let start = match a.from {
        WatchFrom::Start(s) => StartOneOf::From(s as i32),
        WatchFrom::Cursor(c) => StartOneOf::Cursor(c),
    };
    // Until a response brings one, the cursor to resume from is the one the watch started at.
    let mut cursor = match &start {
        StartOneOf::Cursor(c) => c.clone(),
        _ => Bytes::new(),
    };
    let req = WatchRequest {
        shard_keys: a.shard_keys.into_iter().map(Bytes::from).collect(),
        key_prefix: a.prefix.into(),
        start: Some(start),
    };
    let mut stream = ep.kv()?.watch(req).await?;
    let until = a.duration.map(|d| Instant::now() + d);
    let mut left = a.count;
    let failed = loop {
        if left == Some(0) {
            break None;
        }
        let next = tokio::select! {
            next = stream.message() => next,
            _ = tokio::signal::ctrl_c() => break None,
            _ = sleep_until(until) => break None,
        };
        let resp = match next {
            Ok(Some(resp)) => resp,
            Ok(None) => break None,
            Err(status) => break Some(status),
        };
        // A response is printed whole (its cursor counts only after all its events), so
        // `--count` may print a few more events than asked.
        for e in &resp.events {
            println!("{}", render_event(e, json));
        }
        if let Some(n) = left.as_mut() {
            *n = n.saturating_sub(resp.events.len() as u64);
        }
        cursor = resp.cursor;
    };
    if !cursor.is_empty() {
        println!("{}", render_cursor(&cursor, json));
    }
    match failed {
        Some(status) => Err(status.into()),
        None => Ok(()),
    }
}

/// Waits until `until`, or forever without one.
async fn sleep_until(until: Option<Instant>) {
    match until {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
