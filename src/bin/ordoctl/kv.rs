//! Data commands, over [`ordo_proto::client::Client`]: `get`, `put`, `delete`, `scan` and `txn`. Each
//! makes one call (or a series of scan pages) and prints the answer.

use bytes::Bytes;
use ordo::proto::v1::{Item, TxnRequest};

use crate::args::{DeleteArgs, GetArgs, PutArgs, ScanArgs, TxnArgs};
use crate::render::{render_delete, render_get, render_item, render_put, render_txn, shell_word};
use crate::{condition, json, Endpoints, Failure};

pub(crate) async fn get(ep: &Endpoints, a: GetArgs, json: bool) -> Result<(), Failure> {
    let resp = ep.kv()?.get(a.shard_key, a.key, a.stale).await?;
    println!("{}", render_get(&resp, json));
    Ok(())
}

/// Exits with 2 when `--if-version` does not match.
pub(crate) async fn put(ep: &Endpoints, a: PutArgs, json: bool) -> Result<(), Failure> {
    let resp = ep
        .kv()?
        .put(a.shard_key, a.key, a.value, a.if_version)
        .await?;
    println!("{}", render_put(&resp, json));
    condition(resp.succeeded)
}

/// Exits with 2 when `--if-version` does not match.
pub(crate) async fn delete(ep: &Endpoints, a: DeleteArgs, json: bool) -> Result<(), Failure> {
    let resp = ep.kv()?.delete(a.shard_key, a.key, a.if_version).await?;
    println!("{}", render_delete(&resp, json));
    condition(resp.succeeded)
}

/// Prints the items of one page (or of every page with `--all`) and, in text, where to go on.
pub(crate) async fn scan(ep: &Endpoints, a: ScanArgs, json: bool) -> Result<(), Failure> {
    let client = ep.kv()?;
    let shard_key = Bytes::from(a.shard_key);
    let end = Bytes::from(a.end);
    let mut start = Bytes::from(a.start);
    let mut items: Vec<Item> = Vec::new();
    let next_key = loop {
        let page = client
            .scan(shard_key.clone(), start, end.clone(), a.limit, a.stale)
            .await?;
        if json {
            items.extend(page.items);
        } else {
            // Print as pages arrive so that a long --all scan shows progress and stays small.
            for item in &page.items {
                println!("{}", render_item(item));
            }
        }
        match page.next_key {
            Some(next) if a.all => start = next,
            other => break other,
        }
    };
    if json {
        println!("{}", json::scan(&items, next_key.as_deref()));
    } else if let Some(next) = next_key {
        eprintln!(
            "more items follow; continue with --start {} or pass --all",
            shell_word(&String::from_utf8_lossy(&next))
        );
    }
    Ok(())
}

pub(crate) async fn txn(ep: &Endpoints, a: TxnArgs, json: bool) -> Result<(), Failure> {
    let req = TxnRequest {
        header: None,
        compares: a.compare,
        success: a.success,
        failure: a.failure,
    };
    let resp = ep.kv()?.txn(req.clone()).await?;
    // Results come back in the order of the ops that ran, so pair them with those ops.
    let ops = if resp.succeeded {
        &req.success
    } else {
        &req.failure
    };
    println!("{}", render_txn(ops, &resp, json));
    condition(resp.succeeded)
}
