//! `ordoctl`: the command-line client of Ordo.
//!
//! A thin layer over [`ordo::client::Client`]: it parses arguments, makes one call (or a series of
//! scan pages) and prints the answer. All networking, leader following and retrying live in the
//! client.
//!
//! Exit codes: 0 success, 1 error (bad arguments or a failed call), 2 a condition did not hold
//! (`put`/`delete` with `--if-version`, or a `txn` whose compares failed).

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use ordo::client::Client;
use ordo::proto::v1::{
    compare, txn_op, txn_op_result, Compare, DeleteRequest, DeleteResponse, GetRequest,
    GetResponse, Item, PutRequest, PutResponse, TxnOp, TxnRequest,
};
use tonic::Code;

/// Syntax of one `--compare`, repeated in help and error messages.
const COMPARE_SYNTAX: &str = "\"<shard_key> <key> version|value|exists =|!=|<|> <operand>\"";
/// Syntax of one `--success`/`--failure` op.
const OP_SYNTAX: &str = "\"put <shard_key> <key> <value>\", \"delete <shard_key> <key>\" or \
                         \"get <shard_key> <key>\"";

#[derive(Parser, Debug)]
#[command(
    name = "ordoctl",
    version,
    about = "Command-line client of the Ordo key-value store",
    after_help = "\
Keys and values are UTF-8 strings; write the empty key (an order's root item) as \"\". Put \
arguments that start with '-' after `--`.

Exit codes: 0 success, 1 error, 2 a condition did not hold (--if-version, txn compares)."
)]
struct Cli {
    /// Node addresses (host:port or http://host:port), comma-separated or repeated. The leader is
    /// found from any of them.
    #[arg(
        long,
        short = 'e',
        env = "ORDO_ENDPOINT",
        value_delimiter = ',',
        global = true
    )]
    endpoint: Vec<String>,

    /// Deadline of each call, retries included (e.g. 500ms, 10s, 1m; a bare number is seconds).
    #[arg(long, default_value = "10s", value_parser = parse_duration, global = true)]
    timeout: Duration,

    /// Print results as JSON (values are shown as UTF-8, invalid bytes replaced).
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

/// One variant per subcommand, each with its own argument struct, so that admin commands
/// (`status`, `init`, `replica ...` as a nested subcommand) slot in next to the data commands.
#[derive(Subcommand, Debug)]
enum Command {
    /// Read one item.
    Get(GetArgs),
    /// Write one item. Exits with 2 when --if-version does not match.
    Put(PutArgs),
    /// Delete one item. Exits with 2 when --if-version does not match.
    Delete(DeleteArgs),
    /// List the items of one shard key in key order.
    Scan(ScanArgs),
    /// Compare, then run the success or the failure ops atomically. Exits with 2 when the
    /// compares did not hold (the failure ops ran).
    Txn(TxnArgs),
}

// Keys and values are UTF-8 strings on the command line; the empty key (an order's root item) is
// written `""`. Arguments starting with `-` must follow `--`.

#[derive(Args, Debug)]
struct GetArgs {
    shard_key: String,
    key: String,
    /// Let any replica answer from its local state (may lag behind acknowledged writes).
    #[arg(long)]
    stale: bool,
}

#[derive(Args, Debug)]
struct PutArgs {
    shard_key: String,
    key: String,
    value: String,
    /// Write only if the item's version is N (0: only if the item does not exist).
    #[arg(long, value_name = "N")]
    if_version: Option<u64>,
}

#[derive(Args, Debug)]
struct DeleteArgs {
    shard_key: String,
    key: String,
    /// Delete only if the item's version is N.
    #[arg(long, value_name = "N")]
    if_version: Option<u64>,
}

#[derive(Args, Debug)]
struct ScanArgs {
    shard_key: String,
    /// First key (inclusive); default: the first key of the shard key.
    #[arg(long, value_name = "KEY", default_value = "")]
    start: String,
    /// End key (exclusive); default: to the end of the shard key.
    #[arg(long, value_name = "KEY", default_value = "")]
    end: String,
    /// Items per page (0: the server's page size). Without --all, only one page is printed.
    #[arg(long, value_name = "N", default_value_t = 0)]
    limit: u32,
    /// Fetch every page until the end of the range.
    #[arg(long)]
    all: bool,
    /// Let any replica answer from its local state (may lag behind acknowledged writes).
    #[arg(long)]
    stale: bool,
}

#[derive(Args, Debug)]
#[command(after_help = "\
Each compare and op is one argument, split on whitespace, so keys and values cannot contain \
spaces here (use put/delete/get for those); write an empty key or value as \"\".

Compare: \"<shard_key> <key> version|value|exists =|!=|<|> <operand>\"
  version: the operand is a number (an absent item has version 0)
  value:   the operand is a string
  exists:  the operand is true or false, and only = and != apply
Op: \"put <shard_key> <key> <value>\" | \"delete <shard_key> <key>\" | \"get <shard_key> <key>\"

Example:
  ordoctl txn --compare 'o1 status version = 3' \\
      --success 'put o1 status paid' --success 'delete o1 cart' \\
      --failure 'get o1 status'")]
struct TxnArgs {
    /// A condition; all must hold for the success ops to run. Repeatable.
    #[arg(long, value_name = "COMPARE", value_parser = parse_compare)]
    compare: Vec<Compare>,
    /// An op to run when every compare holds. Repeatable.
    #[arg(long, value_name = "OP", value_parser = parse_op)]
    success: Vec<TxnOp>,
    /// An op to run when some compare does not hold. Repeatable.
    #[arg(long, value_name = "OP", value_parser = parse_op)]
    failure: Vec<TxnOp>,
}

/// Why a command did not succeed, mapped to the exit code.
enum Failure {
    /// A condition did not hold; the result has already been printed.
    Condition,
    /// The call or the arguments failed.
    Error(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Error(e)
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Failure::Error(s.into())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Help and version go to stdout and are not errors. Usage errors exit with 1 (not
            // clap's 2) so that 2 keeps meaning "condition failed".
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Condition) => ExitCode::from(2),
        Err(Failure::Error(e)) => {
            eprintln!("error: {}", describe_error(&e));
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if cli.endpoint.is_empty() {
        return Err(anyhow::anyhow!(
            "no endpoint: pass --endpoint <addr>[,<addr>...] or set ORDO_ENDPOINT"
        )
        .into());
    }
    let client = Client::connect(cli.endpoint)?.with_timeout(cli.timeout);
    let json = cli.json;
    match cli.command {
        Command::Get(a) => {
            let resp = client.get(a.shard_key, a.key, a.stale).await?;
            println!("{}", render_get(&resp, json));
            Ok(())
        }
        Command::Put(a) => {
            let resp = client
                .put(a.shard_key, a.key, a.value, a.if_version)
                .await?;
            println!("{}", render_put(&resp, json));
            condition(resp.succeeded)
        }
        Command::Delete(a) => {
            let resp = client.delete(a.shard_key, a.key, a.if_version).await?;
            println!("{}", render_delete(&resp, json));
            condition(resp.succeeded)
        }
        Command::Scan(a) => scan(&client, a, json).await,
        Command::Txn(a) => txn(&client, a, json).await,
    }
}

fn condition(succeeded: bool) -> Result<(), Failure> {
    if succeeded {
        Ok(())
    } else {
        Err(Failure::Condition)
    }
}

async fn scan(client: &Client, a: ScanArgs, json: bool) -> Result<(), Failure> {
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
        println!("{}", render_scan_json(&items, next_key.as_deref()));
    } else if let Some(next) = next_key {
        eprintln!(
            "more items follow; continue with --start {} or pass --all",
            shell_word(&String::from_utf8_lossy(&next))
        );
    }
    Ok(())
}

async fn txn(client: &Client, a: TxnArgs, json: bool) -> Result<(), Failure> {
    let req = TxnRequest {
        header: None,
        compares: a.compare,
        success: a.success,
        failure: a.failure,
    };
    let resp = client.txn(req.clone()).await?;
    // Results come back in the order of the ops that ran, so pair them with those ops.
    let ops = if resp.succeeded {
        &req.success
    } else {
        &req.failure
    };
    let mut out = String::new();
    if json {
        out.push_str(&format!("{{\"succeeded\":{},\"results\":[", resp.succeeded));
    } else {
        out.push_str(if resp.succeeded {
            "succeeded"
        } else {
            "failed"
        });
    }
    for (i, result) in resp.results.iter().enumerate() {
        let op = ops.get(i).map(describe_op).unwrap_or_else(|| "?".into());
        let result = result.result.as_ref();
        if json {
            if i > 0 {
                out.push(',');
            }
            let body = match result {
                Some(txn_op_result::Result::Put(r)) => render_put(r, true),
                Some(txn_op_result::Result::Delete(r)) => render_delete(r, true),
                Some(txn_op_result::Result::Get(r)) => render_get(r, true),
                None => "null".into(),
            };
            let _ = write!(out, "{{\"op\":{},\"result\":{}}}", json_str(&op), body);
        } else {
            let body = match result {
                Some(txn_op_result::Result::Put(r)) => render_put(r, false),
                Some(txn_op_result::Result::Delete(r)) => render_delete(r, false),
                Some(txn_op_result::Result::Get(r)) => match r.found {
                    true => format!(
                        "{} version={}",
                        String::from_utf8_lossy(&r.value),
                        r.version
                    ),
                    false => "not found".into(),
                },
                None => "(empty result)".into(),
            };
            let _ = write!(out, "\n[{i}] {op}: {body}");
        }
    }
    if json {
        out.push_str("]}");
    }
    println!("{out}");
    condition(resp.succeeded)
}

// ---- Rendering -------------------------------------------------------------------------------

fn render_get(r: &GetResponse, json: bool) -> String {
    let value = String::from_utf8_lossy(&r.value);
    match (json, r.found) {
        (true, true) => format!(
            "{{\"found\":true,\"value\":{},\"version\":{}}}",
            json_str(&value),
            r.version
        ),
        (true, false) => "{\"found\":false}".into(),
        (false, true) => format!("{value}\nversion={}", r.version),
        (false, false) => "not found".into(),
    }
}

fn render_put(r: &PutResponse, json: bool) -> String {
    match (json, r.succeeded) {
        (true, _) => format!(
            "{{\"succeeded\":{},\"version\":{}}}",
            r.succeeded, r.version
        ),
        (false, true) => format!("ok version={}", r.version),
        (false, false) => format!("condition failed: current version={}", r.version),
    }
}

fn render_delete(r: &DeleteResponse, json: bool) -> String {
    match (json, r.succeeded) {
        (true, _) => format!(
            "{{\"succeeded\":{},\"deleted\":{},\"prev_version\":{}}}",
            r.succeeded, r.deleted, r.prev_version
        ),
        (false, true) if r.deleted => format!("ok deleted prev_version={}", r.prev_version),
        (false, true) => "ok not found".into(),
        (false, false) => format!("condition failed: current version={}", r.prev_version),
    }
}

/// One scan line: `key  version  value`.
fn render_item(item: &Item) -> String {
    format!(
        "{}  {}  {}",
        String::from_utf8_lossy(&item.key),
        item.version,
        String::from_utf8_lossy(&item.value)
    )
}

fn render_scan_json(items: &[Item], next_key: Option<&[u8]>) -> String {
    let mut out = String::from("{\"items\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"key\":{},\"version\":{},\"value\":{}}}",
            json_str(&String::from_utf8_lossy(&item.key)),
            item.version,
            json_str(&String::from_utf8_lossy(&item.value))
        );
    }
    out.push_str("],\"next_key\":");
    match next_key {
        Some(k) => out.push_str(&json_str(&String::from_utf8_lossy(k))),
        None => out.push_str("null"),
    }
    out.push('}');
    out
}

/// A JSON string literal for `s`.
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `s` as the user would type it back: `""` for empty, single-quoted when it has spaces or quotes.
fn shell_word(s: &str) -> String {
    if s.is_empty() {
        "\"\"".into()
    } else if s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c))
    {
        s.into()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The op in the syntax it was given in, e.g. `put o1 status paid`.
fn describe_op(op: &TxnOp) -> String {
    let word = |b: &Bytes| {
        if b.is_empty() {
            "\"\"".to_string()
        } else {
            String::from_utf8_lossy(b).into_owned()
        }
    };
    match &op.op {
        Some(txn_op::Op::Put(p)) => format!(
            "put {} {} {}",
            word(&p.shard_key),
            word(&p.key),
            word(&p.value)
        ),
        Some(txn_op::Op::Delete(d)) => format!("delete {} {}", word(&d.shard_key), word(&d.key)),
        Some(txn_op::Op::Get(g)) => format!("get {} {}", word(&g.shard_key), word(&g.key)),
        None => "(empty op)".into(),
    }
}

/// `error: <gRPC code>: <message>` for statuses, the plain chain otherwise.
fn describe_error(e: &anyhow::Error) -> String {
    match e.downcast_ref::<tonic::Status>() {
        Some(s) => format!("{}: {}", code_name(s.code()), s.message()),
        None => format!("{e:#}"),
    }
}

/// The canonical gRPC name of a status code.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

// ---- Parsing ---------------------------------------------------------------------------------

/// Parses `500ms`, `10s`, `2m` or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 10s or 1m"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {s:?}: use ms, s or m"
            ))
        }
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
fn parse_compare(s: &str) -> Result<Compare, String> {
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

/// Parses one `--success`/`--failure` op: `put <sk> <k> <v>`, `delete <sk> <k>` or `get <sk> <k>`.
fn parse_op(s: &str) -> Result<TxnOp, String> {
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
        ["put", ..] => {
            return Err(fail(format!(
                "put takes 3 fields (shard_key key value), got {} (values cannot contain spaces)",
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_parse_anywhere() {
        let cli = Cli::try_parse_from([
            "ordoctl",
            "get",
            "o1",
            "",
            "--stale",
            "--json",
            "-e",
            "a:1,b:2",
            "--timeout",
            "3s",
        ])
        .unwrap();
        assert_eq!(cli.endpoint, ["a:1", "b:2"]);
        assert_eq!(cli.timeout, Duration::from_secs(3));
        assert!(cli.json);
        let Command::Get(g) = cli.command else {
            panic!("not get")
        };
        assert_eq!(
            (g.shard_key.as_str(), g.key.as_str(), g.stale),
            ("o1", "", true)
        );
    }

    #[test]
    fn txn_arguments_are_parsed_into_a_request() {
        let cli = Cli::try_parse_from([
            "ordoctl",
            "--endpoint",
            "a:1",
            "txn",
            "--compare",
            "o1 status version = 3",
            "--success",
            "put o1 status paid",
            "--failure",
            "get o1 status",
        ])
        .unwrap();
        let Command::Txn(t) = cli.command else {
            panic!("not txn")
        };
        assert_eq!(t.compare.len(), 1);
        assert_eq!(t.success.len(), 1);
        assert_eq!(t.failure.len(), 1);
        let err = Cli::try_parse_from(["ordoctl", "txn", "--compare", "o1 k version ~ 3"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown operator"), "{err}");
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
    }

    #[test]
    fn bad_ops_say_what_and_how() {
        for (input, what) in [
            ("put o1 k", "put takes 3 fields"),
            ("put o1 k two words", "put takes 3 fields"),
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
    fn ops_describe_in_their_input_syntax() {
        for s in ["put o1 status paid", "delete o1 \"\"", "get o1 k"] {
            assert_eq!(describe_op(&parse_op(s).unwrap()), s);
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        for bad in ["", "s", "10h", "1.5s", "0s", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_str("plain"), "\"plain\"");
        assert_eq!(json_str("a\"b\\c\nd\u{1}é"), "\"a\\\"b\\\\c\\nd\\u0001é\"");
    }

    #[test]
    fn results_render() {
        let found = GetResponse {
            found: true,
            value: Bytes::from_static(b"paid"),
            version: 4,
        };
        assert_eq!(render_get(&found, false), "paid\nversion=4");
        assert_eq!(
            render_get(&found, true),
            "{\"found\":true,\"value\":\"paid\",\"version\":4}"
        );
        assert_eq!(render_get(&GetResponse::default(), false), "not found");
        assert_eq!(
            render_get(&GetResponse::default(), true),
            "{\"found\":false}"
        );

        let ok = PutResponse {
            succeeded: true,
            version: 5,
        };
        let failed = PutResponse {
            succeeded: false,
            version: 7,
        };
        assert_eq!(render_put(&ok, false), "ok version=5");
        assert_eq!(
            render_put(&failed, false),
            "condition failed: current version=7"
        );
        assert_eq!(
            render_put(&failed, true),
            "{\"succeeded\":false,\"version\":7}"
        );

        let deleted = DeleteResponse {
            succeeded: true,
            deleted: true,
            prev_version: 3,
        };
        assert_eq!(render_delete(&deleted, false), "ok deleted prev_version=3");
        assert_eq!(
            render_delete(
                &DeleteResponse {
                    succeeded: true,
                    ..Default::default()
                },
                false
            ),
            "ok not found"
        );

        let item = Item {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"v"),
            version: 2,
        };
        assert_eq!(render_item(&item), "k  2  v");
        assert_eq!(
            render_scan_json(&[item], Some(b"n")),
            "{\"items\":[{\"key\":\"k\",\"version\":2,\"value\":\"v\"}],\"next_key\":\"n\"}"
        );
        assert_eq!(
            render_scan_json(&[], None),
            "{\"items\":[],\"next_key\":null}"
        );
    }

    #[test]
    fn errors_show_the_grpc_code() {
        let e = anyhow::Error::from(tonic::Status::invalid_argument("key too long"));
        assert_eq!(describe_error(&e), "INVALID_ARGUMENT: key too long");
        assert_eq!(describe_error(&anyhow::anyhow!("boom")), "boom");
    }

    #[test]
    fn shell_words_round_trip_visibly() {
        assert_eq!(shell_word(""), "\"\"");
        assert_eq!(shell_word("item-7"), "item-7");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
    }
}
