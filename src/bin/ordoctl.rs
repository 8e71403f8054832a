//! `ordoctl`: the command-line client of Ordo.
//!
//! A thin layer over [`ordo::client::Client`] (data commands) and [`ordo::client::ClusterClient`]
//! (admin commands: `init`, `status`, `map`, `group add|remove`, `move-slots`): it parses
//! arguments, makes one call (or a series of scan pages) and prints the answer. All networking,
//! leader following and retrying live in the clients.
//!
//! Exit codes: 0 success, 1 error (bad arguments or a failed call), 2 a condition did not hold
//! (`put`/`delete` with `--if-version`, or a `txn` whose compares failed).

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use ordo::client::{normalize_addr, Client, ClusterClient};
use ordo::proto::v1::{
    compare, txn_op, txn_op_result, AddGroupRequest, ChangeGroupReplicasRequest,
    ChangeGroupReplicasResponse, ChangeReplicasRequest, ClusterStatus, Compare, DeleteRequest,
    DeleteResponse, GetRequest, GetResponse, GroupSpec, GroupStatus, InitClusterRequest, Item,
    MoveSlotsRequest, PlannedMove, PutRequest, PutResponse, RebalanceRequest, ReplicaChange,
    ReplicaStatus, ShardMap, TransferLeaderResponse, TxnOp, TxnRequest, TxnResponse,
};
use tonic::Code;

/// Syntax of one `--compare`, repeated in help and error messages.
const COMPARE_SYNTAX: &str = "\"<shard_key> <key> version|value|exists =|!=|<|> <operand>\"";
/// Syntax of one `init --group`.
const GROUP_SYNTAX: &str = "<id>=<addr>,<addr>,... (e.g. 1=10.0.0.1:7001,10.0.0.2:7001)";
/// Syntax of `move-slots --slots`.
const SLOTS_SYNTAX: &str = "comma-separated slots and inclusive ranges, e.g. 0-511,600,700-701";
/// Most slots one `--slots` list may name; far above any cluster's slot count, it only keeps a
/// typo such as `0-4000000000` from allocating gigabytes.
const SLOTS_MAX: usize = 1 << 20;

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

Data commands take node or router addresses; admin commands (init, status, map, group, \
move-slots) take config server or router addresses (--config is an alias of --endpoint).

Exit codes: 0 success, 1 error, 2 a condition did not hold (--if-version, txn compares)."
)]
struct Cli {
    /// Server addresses (host:port or http://host:port), comma-separated or repeated: nodes or
    /// routers for data commands, config servers or routers for admin commands. The leader is
    /// found from any of them.
    #[arg(
        long,
        short = 'e',
        visible_alias = "config",
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
    /// Create the cluster: spread the slots evenly over the given shard groups.
    Init(InitArgs),
    /// Show the shard map and the live state of every replica (groups and config servers).
    Status,
    /// Show the shard map: groups, their replicas and the slot ranges they own.
    Map(MapArgs),
    /// Register or unregister shard groups.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Move slots to another group with their data, online (writes pause only for a short
    /// critical section per move). Shows progress on stderr.
    MoveSlots(MoveSlotsArgs),
    /// Spread the slots evenly over the groups: shows the plan, then moves one range at a time.
    Rebalance(RebalanceArgs),
    /// Slot migrations: in flight and recently finished, with progress and measured pauses.
    Migrations(MigrationsArgs),
    /// Leadership of one raft group (give --endpoint the group's node addresses).
    #[command(subcommand)]
    Leader(LeaderCommand),
    /// Change the replicas of a shard group, or of the config servers (--group 0).
    #[command(subcommand)]
    Replica(ReplicaCommand),
}

#[derive(Subcommand, Debug)]
#[command(after_help = "\
A new replica first runs empty with --join, then joins: e.g. to replace dead node 3 of group 1,
  ordo node --id 4 --group 1 --join --listen 10.0.0.4:7001 \\
      --peers 1=10.0.0.1:7001,2=10.0.0.2:7001,4=10.0.0.4:7001 --data-dir /var/lib/ordo
  ordoctl --config router:7000 replica replace --group 1 --old 3 --id 4 --addr 10.0.0.4:7001")]
enum ReplicaCommand {
    /// Add a running --join node: it becomes a learner, catches up, then votes.
    Add(ReplicaAddArgs),
    /// Remove a replica. Refused if the voters left would not have a live quorum.
    Remove(ReplicaRemoveArgs),
    /// Add a new node as `add` does, then remove the old one (which may be dead). The group keeps
    /// a live quorum throughout.
    Replace(ReplicaReplaceArgs),
}

#[derive(Args, Debug)]
struct ReplicaAddArgs {
    /// The group (0 = the config servers).
    #[arg(long, value_name = "N")]
    group: u64,
    /// The new replica's raft id (unique in the group).
    #[arg(long, value_name = "NODE_ID", value_parser = clap::value_parser!(u64).range(1..))]
    id: u64,
    /// The new replica's address, as its peers reach it.
    #[arg(long, value_name = "HOST:PORT")]
    addr: String,
    /// How long the new replica may take to catch up before the command gives up (it then
    /// stays a learner until the command is run again or it is removed).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    catch_up_timeout: Duration,
}

#[derive(Args, Debug)]
struct ReplicaRemoveArgs {
    /// The group (0 = the config servers).
    #[arg(long, value_name = "N")]
    group: u64,
    /// The replica to remove.
    #[arg(long, value_name = "NODE_ID", value_parser = clap::value_parser!(u64).range(1..))]
    id: u64,
}

#[derive(Args, Debug)]
struct ReplicaReplaceArgs {
    /// The group (0 = the config servers).
    #[arg(long, value_name = "N")]
    group: u64,
    /// The replica that leaves (it may be dead).
    #[arg(long, value_name = "NODE_ID", value_parser = clap::value_parser!(u64).range(1..))]
    old: u64,
    /// The new replica's raft id.
    #[arg(long, value_name = "NODE_ID", value_parser = clap::value_parser!(u64).range(1..))]
    id: u64,
    /// The new replica's address.
    #[arg(long, value_name = "HOST:PORT")]
    addr: String,
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    catch_up_timeout: Duration,
}

#[derive(Subcommand, Debug)]
enum LeaderCommand {
    /// Hand the group's leadership to one of its voters, e.g. before taking the leader's machine
    /// down. Waits until that replica leads.
    Transfer(LeaderTransferArgs),
}

#[derive(Args, Debug)]
struct LeaderTransferArgs {
    /// Raft id of the replica that should lead.
    #[arg(long, value_name = "NODE_ID", value_parser = clap::value_parser!(u64).range(1..))]
    to: u64,
}

#[derive(Args, Debug)]
#[command(after_help = "\
Example:
  ordoctl --config cfg1:7000 init --slots 4096 \\
      --group 1=a1:7001,a2:7001,a3:7001 --group 2=b1:7001,b2:7001,b3:7001")]
struct InitArgs {
    /// Number of slots the shard keys are hashed into; fixed for the life of the cluster.
    #[arg(long, value_name = "N")]
    slots: u32,
    /// One shard group: <id>=<addr>,<addr>,... (its replicas' addresses). Repeat per group.
    #[arg(long = "group", value_name = "ID=ADDRS", value_parser = parse_group_spec)]
    groups: Vec<GroupSpec>,
}

#[derive(Args, Debug)]
struct MapArgs {
    /// Let any config replica (or a router's cache) answer; it may lag behind the latest map.
    #[arg(long)]
    stale: bool,
}

#[derive(Subcommand, Debug)]
enum GroupCommand {
    /// Register a running shard group; it owns no slots until slots are moved to it.
    Add(GroupAddArgs),
    /// Unregister a group that owns no slots.
    Remove(GroupRemoveArgs),
    /// Move every slot off a group (spread over the others), so that it can be removed.
    Drain(GroupDrainArgs),
}

#[derive(Args, Debug)]
struct GroupDrainArgs {
    /// The group's id.
    #[arg(value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
    id: u64,
    #[command(flatten)]
    moves: MoveOptions,
}

#[derive(Args, Debug, Clone, Copy)]
struct MoveOptions {
    /// Most slots per move.
    #[arg(long, value_name = "N", default_value_t = 512)]
    slots_per_move: u32,
    /// Copy bandwidth bound of each move, bytes per second (0 = the config server's default).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    copy_bytes_per_sec: u64,
}

#[derive(Args, Debug)]
struct RebalanceArgs {
    /// Show the plan only.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    moves: MoveOptions,
}

#[derive(Args, Debug)]
struct MigrationsArgs {
    #[command(subcommand)]
    command: Option<MigrationsCommand>,
}

#[derive(Subcommand, Debug)]
enum MigrationsCommand {
    /// Abort a migration before its commit point: the donor keeps the slots and its data.
    Abort(MigrationAbortArgs),
}

#[derive(Args, Debug)]
struct MigrationAbortArgs {
    #[arg(value_name = "ID")]
    id: u64,
}

#[derive(Args, Debug)]
struct GroupAddArgs {
    /// The new group's id (0 is the config group's).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    id: u64,
    /// The group's replica addresses, comma-separated or repeated.
    #[arg(long, value_name = "ADDRS", value_delimiter = ',', required = true)]
    replicas: Vec<String>,
}

#[derive(Args, Debug)]
struct GroupRemoveArgs {
    /// The group's id.
    #[arg(value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
    id: u64,
}

#[derive(Args, Debug)]
struct MoveSlotsArgs {
    /// The slots: comma-separated slots and inclusive ranges, e.g. 0-511,600,700-701.
    #[arg(long, value_name = "SLOTS", value_parser = parse_slot_list)]
    slots: SlotList,
    /// The group that will own them.
    #[arg(long, value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
    to: u64,
    /// Copy bandwidth bound, bytes per second (0 = the config server's default).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    copy_bytes_per_sec: u64,
}

/// The parsed `--slots` of `move-slots` (a newtype so that clap takes the whole list as one value).
#[derive(Clone, Debug)]
struct SlotList(Vec<u32>);

fn parse_slot_list(s: &str) -> Result<SlotList, String> {
    parse_slot_ranges(s).map(SlotList)
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
    let Cli {
        endpoint,
        timeout,
        json,
        command,
    } = cli;
    // Built inside each arm, so that admin commands check their arguments before needing any
    // address.
    let kv = |endpoint: Vec<String>| -> anyhow::Result<Client> {
        if endpoint.is_empty() {
            anyhow::bail!("no endpoint: pass --endpoint <addr>[,<addr>...] or set ORDO_ENDPOINT");
        }
        Ok(Client::connect(endpoint)?.with_timeout(timeout))
    };
    let admin = |endpoint: Vec<String>| -> anyhow::Result<ClusterClient> {
        if endpoint.is_empty() {
            anyhow::bail!(
                "no endpoint: pass --config <config server or router addr>[,<addr>...] or set \
                 ORDO_ENDPOINT"
            );
        }
        Ok(ClusterClient::connect(endpoint)?.with_timeout(timeout))
    };
    match command {
        Command::Get(a) => {
            let resp = kv(endpoint)?.get(a.shard_key, a.key, a.stale).await?;
            println!("{}", render_get(&resp, json));
            Ok(())
        }
        Command::Put(a) => {
            let resp = kv(endpoint)?
                .put(a.shard_key, a.key, a.value, a.if_version)
                .await?;
            println!("{}", render_put(&resp, json));
            condition(resp.succeeded)
        }
        Command::Delete(a) => {
            let resp = kv(endpoint)?
                .delete(a.shard_key, a.key, a.if_version)
                .await?;
            println!("{}", render_delete(&resp, json));
            condition(resp.succeeded)
        }
        Command::Scan(a) => scan(&kv(endpoint)?, a, json).await,
        Command::Txn(a) => txn(&kv(endpoint)?, a, json).await,
        Command::Init(a) => {
            let req = init_request(a.slots, a.groups).map_err(anyhow::Error::msg)?;
            let map = admin(endpoint)?.init_cluster(req).await?;
            println!("{}", render_map_change(&map, json));
            Ok(())
        }
        Command::Status => {
            let status = admin(endpoint)?.cluster_status().await?;
            println!("{}", render_status(&status, json));
            Ok(())
        }
        Command::Map(a) => {
            let map = admin(endpoint)?.get_shard_map(!a.stale).await?;
            println!("{}", render_map(&map, json));
            Ok(())
        }
        Command::Group(GroupCommand::Add(a)) => {
            let group = group_spec(a.id, &a.replicas).map_err(anyhow::Error::msg)?;
            let req = AddGroupRequest { group: Some(group) };
            let map = admin(endpoint)?.add_group(req).await?;
            println!("{}", render_map_change(&map, json));
            Ok(())
        }
        Command::Group(GroupCommand::Remove(a)) => {
            let map = admin(endpoint)?.remove_group(a.id).await?;
            println!("{}", render_map_change(&map, json));
            Ok(())
        }
        Command::MoveSlots(a) => {
            let c = admin(endpoint)?;
            let req = MoveSlotsRequest {
                slots: a.slots.0,
                to_group: a.to,
                copy_bytes_per_sec: a.copy_bytes_per_sec,
            };
            let map = with_progress(&c, json, c.move_slots_with(req)).await?;
            println!("{}", render_map_change(&map, json));
            Ok(())
        }
        Command::Replica(c) => {
            let (group, change) = replica_change(c).map_err(anyhow::Error::msg)?;
            // The call lasts as long as the new replica takes to catch up.
            let wait = Duration::from_millis(change.catch_up_timeout_ms as u64 + 30_000);
            let resp = admin(endpoint)?
                .with_timeout(timeout.max(wait))
                .change_group_replicas(ChangeGroupReplicasRequest {
                    group_id: group,
                    change: Some(change),
                })
                .await?;
            println!("{}", render_replicas(group, &resp, json));
            Ok(())
        }
        Command::Rebalance(a) => rebalance(&admin(endpoint)?, 0, a.dry_run, a.moves, json).await,
        Command::Group(GroupCommand::Drain(a)) => {
            rebalance(&admin(endpoint)?, a.id, false, a.moves, json).await
        }
        Command::Migrations(MigrationsArgs { command: None }) => {
            let list = admin(endpoint)?.list_migrations().await?;
            println!("{}", render_migrations(&list.migrations, json));
            Ok(())
        }
        Command::Migrations(MigrationsArgs {
            command: Some(MigrationsCommand::Abort(a)),
        }) => {
            let m = admin(endpoint)?.abort_migration(a.id).await?;
            println!("{}", render_migrations(std::slice::from_ref(&m), json));
            Ok(())
        }
        Command::Leader(LeaderCommand::Transfer(a)) => {
            let r = kv(endpoint)?.transfer_leader(a.to).await?;
            println!("{}", render_leader(&r, json));
            Ok(())
        }
    }
}

fn replica_change(c: ReplicaCommand) -> Result<(u64, ChangeReplicasRequest), String> {
    let ms = |d: Duration| -> Result<u32, String> {
        u32::try_from(d.as_millis())
            .ok()
            .filter(|ms| *ms > 0)
            .ok_or_else(|| format!("--catch-up-timeout {d:?} is out of range"))
    };
    Ok(match c {
        ReplicaCommand::Add(a) => (
            a.group,
            ChangeReplicasRequest {
                change: ReplicaChange::Add as i32,
                node_id: a.id,
                addr: a.addr,
                old_node_id: 0,
                catch_up_timeout_ms: ms(a.catch_up_timeout)?,
            },
        ),
        ReplicaCommand::Remove(a) => (
            a.group,
            ChangeReplicasRequest {
                change: ReplicaChange::Remove as i32,
                node_id: a.id,
                ..Default::default()
            },
        ),
        ReplicaCommand::Replace(a) => (
            a.group,
            ChangeReplicasRequest {
                change: ReplicaChange::Replace as i32,
                node_id: a.id,
                addr: a.addr,
                old_node_id: a.old,
                catch_up_timeout_ms: ms(a.catch_up_timeout)?,
            },
        ),
    })
}

/// What `replica add|remove|replace` prints: the group's replicas after the change.
fn render_replicas(group: u64, r: &ChangeGroupReplicasResponse, json: bool) -> String {
    let version = r.map.as_ref().map_or(0, |m| m.version);
    if json {
        let members = json_list(&r.members, |m| {
            format!(
                "{{\"node_id\":{},\"addr\":{},\"voter\":{}}}",
                m.node_id,
                json_str(&m.addr),
                m.voter
            )
        });
        return format!(
            "{{\"group\":{group},\"members\":{members},\"catch_up_ms\":{},\"map_version\":{version}}}",
            r.catch_up_ms
        );
    }
    let mut out = format!("group {group}, map version {version}");
    if r.catch_up_ms > 0 {
        let _ = write!(out, " (new replica caught up in {} ms)", r.catch_up_ms);
    }
    let rows: Vec<Vec<String>> = r
        .members
        .iter()
        .map(|m| {
            let role = if m.voter { "voter" } else { "learner" };
            vec![
                format!("node {}", m.node_id),
                m.addr.clone(),
                role.to_string(),
            ]
        })
        .collect();
    for line in align(&rows) {
        out.push('\n');
        out.push_str(&line);
    }
    out
}

/// Runs `call` (a move, a rebalance) while printing the progress of the migration in flight on
/// stderr every half second: items and bytes copied, rate, state. Silent with `--json`.
async fn with_progress<T>(
    c: &ClusterClient,
    json: bool,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let started = std::time::Instant::now();
    let watch = async {
        if json {
            return std::future::pending::<()>().await;
        }
        // Bounded by the call: this future is dropped when it completes.
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let Ok(list) = c.list_migrations().await else {
                continue;
            };
            let live: Vec<_> = list
                .migrations
                .iter()
                .filter(|m| ordo_config::migration::in_flight(m))
                .collect();
            let secs = started.elapsed().as_secs_f64().max(0.001);
            for m in live {
                eprint!(
                    "\rmigration {} ({} slots {}→{}): {} items, {} KiB copied, {} log records, {:.0} KiB/s, {}      ",
                    m.id,
                    m.slots.len(),
                    m.from_group,
                    m.to_group,
                    m.items_copied,
                    m.bytes_copied / 1024,
                    m.log_records,
                    m.bytes_copied as f64 / 1024.0 / secs,
                    ordo_config::migration::state_name(m.state)
                );
            }
        }
    };
    let r = tokio::select! {
        r = call => r,
        _ = watch => unreachable!("the progress loop never ends"),
    };
    if !json {
        eprintln!();
    }
    r
}

async fn rebalance(
    c: &ClusterClient,
    drain: u64,
    dry_run: bool,
    moves: MoveOptions,
    json: bool,
) -> Result<(), Failure> {
    let req = RebalanceRequest {
        dry_run: true,
        drain_group: drain,
        slots_per_move: moves.slots_per_move,
        copy_bytes_per_sec: moves.copy_bytes_per_sec,
    };
    let plan = c.rebalance(req).await?;
    if !json || dry_run {
        println!("{}", render_plan(&plan.plan, json));
    }
    if dry_run || plan.plan.is_empty() {
        return Ok(());
    }
    let done = with_progress(
        c,
        json,
        c.rebalance(RebalanceRequest {
            dry_run: false,
            ..req
        }),
    )
    .await?;
    println!("{}", render_migrations(&done.migrations, json));
    if let Some(map) = &done.map {
        if !json {
            println!("{}", render_map_change(map, false));
        }
    }
    Ok(())
}

/// What `rebalance` and `group drain` print before moving: the planned moves.
fn render_plan(plan: &[PlannedMove], json: bool) -> String {
    if json {
        let moves = json_list(plan, |p| {
            format!(
                "{{\"from_group\":{},\"to_group\":{},\"slots\":{}}}",
                p.from_group,
                p.to_group,
                json_list(&p.slots, u32::to_string)
            )
        });
        return format!("{{\"plan\":{moves}}}");
    }
    if plan.is_empty() {
        return "nothing to move: the slots are spread evenly already".into();
    }
    let rows: Vec<Vec<String>> = plan
        .iter()
        .map(|p| {
            vec![
                format!("group {} → group {}", p.from_group, p.to_group),
                format!("{} slots", p.slots.len()),
                compress_ranges(&p.slots),
            ]
        })
        .collect();
    let mut out = format!("plan: {} moves", rows.len());
    for line in align(&rows) {
        let _ = write!(out, "\n  {line}");
    }
    out
}

/// What `leader transfer` prints: the leader after the transfer.
fn render_leader(r: &TransferLeaderResponse, json: bool) -> String {
    if json {
        format!("{{\"leader_id\":{},\"term\":{}}}", r.leader_id, r.term)
    } else {
        format!("leader is node {} (term {})", r.leader_id, r.term)
    }
}

fn render_migrations(list: &[ordo::proto::v1::Migration], json: bool) -> String {
    use ordo_config::migration::state_name;
    if json {
        return json_list(list, |m| {
            format!(
                "{{\"id\":{},\"state\":{},\"from_group\":{},\"to_group\":{},\"slots\":{},\"items_copied\":{},\"bytes_copied\":{},\"log_records\":{},\"pause_ms\":{},\"items_cleaned\":{},\"map_version\":{},\"abort_requested\":{},\"error\":{}}}",
                m.id,
                json_str(state_name(m.state)),
                m.from_group,
                m.to_group,
                json_list(&m.slots, u32::to_string),
                m.items_copied,
                m.bytes_copied,
                m.log_records,
                m.pause_ms,
                m.items_cleaned,
                m.map_version,
                m.abort_requested,
                json_str(&m.error)
            )
        });
    }
    if list.is_empty() {
        return "no migrations".into();
    }
    let mut rows = vec![vec![
        "id".to_string(),
        "state".into(),
        "move".into(),
        "slots".into(),
        "items".into(),
        "KiB".into(),
        "log".into(),
        "pause".into(),
        "cleaned".into(),
        "note".into(),
    ]];
    for m in list {
        rows.push(vec![
            m.id.to_string(),
            state_name(m.state).to_string(),
            format!("{}→{}", m.from_group, m.to_group),
            compress_ranges(&m.slots),
            m.items_copied.to_string(),
            (m.bytes_copied / 1024).to_string(),
            m.log_records.to_string(),
            if m.pause_ms > 0 {
                format!("{} ms", m.pause_ms)
            } else {
                "-".into()
            },
            m.items_cleaned.to_string(),
            if m.abort_requested && m.error.is_empty() {
                "abort requested".into()
            } else {
                m.error.clone()
            },
        ]);
    }
    align(&rows).join("\n")
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
    println!("{}", render_txn(ops, &resp, json));
    condition(resp.succeeded)
}

/// What `txn` prints: the outcome, then each result next to the op (of `ops`, those that ran)
/// that produced it.
fn render_txn(ops: &[TxnOp], resp: &TxnResponse, json: bool) -> String {
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
    out
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

// ---- Cluster admin ---------------------------------------------------------------------------

/// A group's spec from its id and replica addresses (kept as typed, trimmed). Refuses id 0 (the
/// config group's), no address, an invalid address and an address listed twice (`a:1` and
/// `http://a:1` are the same address).
fn group_spec(id: u64, addrs: &[String]) -> Result<GroupSpec, String> {
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
fn parse_group_spec(s: &str) -> Result<GroupSpec, String> {
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
fn init_request(slot_count: u32, groups: Vec<GroupSpec>) -> Result<InitClusterRequest, String> {
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
fn parse_slot_ranges(s: &str) -> Result<Vec<u32>, String> {
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

/// Slots as sorted, comma-separated inclusive ranges: `[3, 0, 1, 2, 7]` -> `0-3,7`.
fn compress_ranges(slots: &[u32]) -> String {
    let mut sorted = slots.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            let _ = write!(out, "{start}");
        } else {
            let _ = write!(out, "{start}-{end}");
        }
        i += 1;
    }
    out
}

/// The slots each group owns: the map's groups in their order (with no slots when they own
/// none), then owners the map does not list, ascending (0 = unassigned).
fn slots_by_group(map: &ShardMap) -> Vec<(u64, Vec<u32>)> {
    let mut owned: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for (slot, owner) in map.slot_owner.iter().enumerate() {
        owned.entry(*owner).or_default().push(slot as u32);
    }
    let mut out: Vec<(u64, Vec<u32>)> = map
        .groups
        .iter()
        .map(|g| (g.id, owned.remove(&g.id).unwrap_or_default()))
        .collect();
    out.extend(owned);
    out
}

/// `group 3`, or what an owner missing from the map's groups is.
fn group_label(map: &ShardMap, id: u64) -> String {
    if map.groups.iter().any(|g| g.id == id) {
        format!("group {id}")
    } else if id == 0 {
        "unassigned".into()
    } else {
        format!("group {id} (not registered)")
    }
}

/// `map version N, S slots, G groups`, plus a hint when the cluster is not initialized.
fn map_header(map: &ShardMap) -> String {
    let mut out = format!(
        "map version {}, {} slots, {} groups",
        map.version,
        map.slot_count,
        map.groups.len()
    );
    if map.version == 0 {
        out.push_str("\ncluster not initialized (run ordoctl init)");
    }
    out
}

/// What `init`, `group add|remove` and `move-slots` print: the new version and the slot count of
/// every group.
fn render_map_change(map: &ShardMap, json: bool) -> String {
    if json {
        return json_shard_map(map);
    }
    let rows: Vec<Vec<String>> = slots_by_group(map)
        .into_iter()
        .map(|(id, slots)| vec![group_label(map, id), format!("slots {}", slots.len())])
        .collect();
    let mut out = map_header(map);
    for line in align(&rows) {
        out.push('\n');
        out.push_str(&line);
    }
    out
}

/// What `map` prints: the header, each group with its slot ranges and replicas, the config
/// replicas.
fn render_map(map: &ShardMap, json: bool) -> String {
    if json {
        return json_shard_map(map);
    }
    let sections = slots_by_group(map);
    let heads: Vec<Vec<String>> = sections
        .iter()
        .map(|(id, slots)| {
            let ranges = if slots.is_empty() {
                "-".to_string()
            } else {
                compress_ranges(slots)
            };
            vec![
                group_label(map, *id),
                format!("slots {}", slots.len()),
                ranges,
            ]
        })
        .collect();
    let replicas = |id: u64| {
        map.groups
            .iter()
            .filter(move |g| g.id == id)
            .flat_map(|g| &g.replicas)
    };
    let replica_rows: Vec<Vec<String>> = sections
        .iter()
        .flat_map(|(id, _)| replicas(*id))
        .map(|r| vec![node_label(r.node_id), r.addr.clone()])
        .collect();
    let heads = align(&heads);
    let mut replica_lines = align(&replica_rows).into_iter();
    let mut out = map_header(map);
    for ((id, _), head) in sections.iter().zip(heads) {
        let _ = write!(out, "\n{head}");
        for _ in replicas(*id) {
            let _ = write!(out, "\n  {}", replica_lines.next().unwrap_or_default());
        }
    }
    if !map.config_addrs.is_empty() {
        let _ = write!(out, "\nconfig  {}", map.config_addrs.join(", "));
    }
    out
}

/// What `status` prints: the map header, then each group and the config group with one line
/// per replica.
fn render_status(status: &ClusterStatus, json: bool) -> String {
    if json {
        return json_cluster_status(status);
    }
    let map = status.map.clone().unwrap_or_default();
    let mut sections: Vec<(Vec<String>, &[ReplicaStatus])> = status
        .groups
        .iter()
        .map(|g| {
            let head = vec![
                format!("group {}", g.id),
                leader_cell(g.leader_id),
                format!("slots {}", g.slots),
            ];
            (head, &g.replicas[..])
        })
        .collect();
    match &status.meta {
        Some(meta) => sections.push((
            vec!["config".into(), leader_cell(meta.leader_id)],
            &meta.replicas[..],
        )),
        None => sections.push((vec!["config".into(), "(not reported)".into()], &[])),
    }
    let heads: Vec<Vec<String>> = sections.iter().map(|(h, _)| h.clone()).collect();
    let rows: Vec<Vec<String>> = sections
        .iter()
        .flat_map(|(_, replicas)| replicas.iter().map(replica_row))
        .collect();
    let mut rows = align(&rows).into_iter();
    let mut out = map_header(&map);
    for ((_, replicas), head) in sections.iter().zip(align(&heads)) {
        let _ = write!(out, "\n{head}");
        for _ in replicas.iter() {
            let _ = write!(out, "\n  {}", rows.next().unwrap_or_default());
        }
    }
    out
}

fn leader_cell(leader_id: u64) -> String {
    if leader_id == 0 {
        "leader none".into()
    } else {
        format!("leader {leader_id}")
    }
}

/// `node 7`; `node ?` when the id is not known yet.
fn node_label(node_id: u64) -> String {
    if node_id == 0 {
        "node ?".into()
    } else {
        format!("node {node_id}")
    }
}

/// One replica line of `status`. An unreachable replica has no state to show, only the error.
fn replica_row(r: &ReplicaStatus) -> Vec<String> {
    let mut row = vec![node_label(r.node_id), r.addr.clone()];
    if !r.reachable {
        row.push(if r.error.is_empty() {
            "unreachable".into()
        } else {
            format!("unreachable: {}", r.error)
        });
        return row;
    }
    row.push(if r.role.is_empty() {
        "?".into()
    } else {
        r.role.clone()
    });
    row.push(format!("term {}", r.term));
    // No item count: replicas report it only when asked for a data digest, which costs a scan.
    row.push(format!("applied {}", r.applied_index));
    row
}

/// Joins each row's cells with two spaces, padding every cell but a row's last to the widest
/// cell of its column (last cells, which may be long error messages, do not widen a column).
fn align(rows: &[Vec<String>]) -> Vec<String> {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(row.len().saturating_sub(1)) {
            if widths.len() <= i {
                widths.push(0);
            }
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    rows.iter()
        .map(|row| {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                if i + 1 < row.len() {
                    let pad = widths[i].saturating_sub(cell.chars().count());
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            line.trim_end().to_string()
        })
        .collect()
}

/// `[a,b,...]` with each element rendered by `f`.
fn json_list<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
    let parts: Vec<String> = items.iter().map(f).collect();
    format!("[{}]", parts.join(","))
}

fn json_shard_map(m: &ShardMap) -> String {
    let groups = json_list(&m.groups, |g| {
        let replicas = json_list(&g.replicas, |r| {
            format!(
                "{{\"node_id\":{},\"addr\":{}}}",
                r.node_id,
                json_str(&r.addr)
            )
        });
        format!("{{\"id\":{},\"replicas\":{replicas}}}", g.id)
    });
    format!(
        "{{\"version\":{},\"slot_count\":{},\"groups\":{groups},\"slot_owner\":{},\
         \"config_addrs\":{}}}",
        m.version,
        m.slot_count,
        json_list(&m.slot_owner, u64::to_string),
        json_list(&m.config_addrs, |a| json_str(a)),
    )
}

fn json_replica_status(r: &ReplicaStatus) -> String {
    format!(
        "{{\"node_id\":{},\"addr\":{},\"reachable\":{},\"role\":{},\"term\":{},\
         \"applied_index\":{},\"error\":{}}}",
        r.node_id,
        json_str(&r.addr),
        r.reachable,
        json_str(&r.role),
        r.term,
        r.applied_index,
        json_str(&r.error)
    )
}

fn json_group_status(g: &GroupStatus) -> String {
    format!(
        "{{\"id\":{},\"leader_id\":{},\"slots\":{},\"replicas\":{}}}",
        g.id,
        g.leader_id,
        g.slots,
        json_list(&g.replicas, json_replica_status)
    )
}

fn json_cluster_status(s: &ClusterStatus) -> String {
    format!(
        "{{\"map\":{},\"groups\":{},\"meta\":{}}}",
        s.map.as_ref().map_or("null".into(), json_shard_map),
        json_list(&s.groups, json_group_status),
        s.meta.as_ref().map_or("null".into(), json_group_status)
    )
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

    // ---- Cluster admin ----

    use ordo::proto::v1::{Group, Replica};

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn admin_commands_parse() {
        let cli = Cli::try_parse_from([
            "ordoctl",
            "--config",
            "c1:7000,c2:7000",
            "init",
            "--slots",
            "4096",
            "--group",
            "1=a1:1,a2:1,a3:1",
            "--group",
            "2=b1:1",
        ])
        .unwrap();
        assert_eq!(cli.endpoint, ["c1:7000", "c2:7000"]);
        let Command::Init(a) = cli.command else {
            panic!("not init")
        };
        assert_eq!(a.slots, 4096);
        assert_eq!(a.groups.len(), 2);
        assert_eq!(a.groups[0].addrs, ["a1:1", "a2:1", "a3:1"]);

        let cli = Cli::try_parse_from(["ordoctl", "status", "--json", "-e", "r:1"]).unwrap();
        assert!(cli.json && matches!(cli.command, Command::Status));
        let cli = Cli::try_parse_from(["ordoctl", "map", "--stale"]).unwrap();
        assert!(matches!(cli.command, Command::Map(MapArgs { stale: true })));
        let cli = Cli::try_parse_from([
            "ordoctl",
            "group",
            "add",
            "--id",
            "3",
            "--replicas",
            "x:1,y:1",
        ])
        .unwrap();
        let Command::Group(GroupCommand::Add(a)) = cli.command else {
            panic!("not group add")
        };
        assert_eq!((a.id, a.replicas), (3, strings(&["x:1", "y:1"])));
        let cli = Cli::try_parse_from(["ordoctl", "group", "remove", "3"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Group(GroupCommand::Remove(GroupRemoveArgs { id: 3 }))
        ));
        let cli = Cli::try_parse_from(["ordoctl", "move-slots", "--slots", "0-3,9", "--to", "2"])
            .unwrap();
        let Command::MoveSlots(a) = cli.command else {
            panic!("not move-slots")
        };
        assert_eq!((a.slots.0, a.to), (vec![0, 1, 2, 3, 9], 2));

        // Resharding commands.
        let cli = Cli::try_parse_from(["ordoctl", "rebalance", "--dry-run"]).unwrap();
        let Command::Rebalance(a) = cli.command else {
            panic!("not rebalance")
        };
        assert!(a.dry_run);
        assert_eq!(a.moves.slots_per_move, 512);
        let cli = Cli::try_parse_from([
            "ordoctl",
            "group",
            "drain",
            "3",
            "--copy-bytes-per-sec",
            "1000",
        ])
        .unwrap();
        let Command::Group(GroupCommand::Drain(a)) = cli.command else {
            panic!("not group drain")
        };
        assert_eq!((a.id, a.moves.copy_bytes_per_sec), (3, 1000));
        let cli = Cli::try_parse_from(["ordoctl", "migrations", "abort", "7"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Migrations(MigrationsArgs {
                command: Some(MigrationsCommand::Abort(MigrationAbortArgs { id: 7 }))
            })
        ));
        let cli = Cli::try_parse_from(["ordoctl", "migrations"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Migrations(MigrationsArgs { command: None })
        ));

        for bad in [
            &["ordoctl", "move-slots", "--slots", "5-3", "--to", "2"][..],
            &["ordoctl", "move-slots", "--slots", "1", "--to", "0"],
            &["ordoctl", "group", "remove", "0"],
            &["ordoctl", "group", "add", "--id", "0", "--replicas", "x:1"],
            &["ordoctl", "group", "add", "--id", "4"],
            &["ordoctl", "init", "--slots", "8", "--group", "1"],
            &["ordoctl", "init", "--group", "1=a:1"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
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

    #[test]
    fn migrations_render_as_a_table_and_as_json() {
        let m = ordo::proto::v1::Migration {
            id: 4,
            slots: vec![0, 1, 2, 7],
            from_group: 1,
            to_group: 3,
            state: ordo::proto::v1::MigrationState::Done as i32,
            items_copied: 10,
            bytes_copied: 4096,
            pause_ms: 42,
            ..Default::default()
        };
        let table = render_migrations(std::slice::from_ref(&m), false);
        assert!(table.contains("done") && table.contains("1→3"), "{table}");
        assert!(
            table.contains("0-2,7") && table.contains("42 ms"),
            "{table}"
        );
        let json = render_migrations(&[m], true);
        assert!(
            json.starts_with("[{\"id\":4,\"state\":\"done\",\"from_group\":1,\"to_group\":3,\"slots\":[0,1,2,7],"),
            "{json}"
        );
        assert!(json.contains("\"pause_ms\":42,"), "{json}");
        assert_eq!(render_migrations(&[], false), "no migrations");
    }

    #[test]
    fn slot_ranges_compress() {
        assert_eq!(compress_ranges(&[]), "");
        assert_eq!(compress_ranges(&(0..=1365).collect::<Vec<_>>()), "0-1365");
        assert_eq!(compress_ranges(&[10, 5, 1, 2, 3, 9, 3]), "1-3,5,9-10");
        assert_eq!(
            compress_ranges(&[u32::MAX - 1, u32::MAX]),
            "4294967294-4294967295"
        );
        // Compression and parsing are inverses.
        let slots = parse_slot_ranges("0-511,600,700-701").unwrap();
        assert_eq!(compress_ranges(&slots), "0-511,600,700-701");
    }

    fn sample_map() -> ShardMap {
        let replica = |node_id, addr: &str| Replica {
            node_id,
            addr: addr.into(),
        };
        ShardMap {
            version: 3,
            slot_count: 8,
            groups: vec![
                Group {
                    id: 1,
                    replicas: vec![replica(11, "a1:7001"), replica(12, "a2:7001")],
                },
                Group {
                    id: 2,
                    replicas: vec![replica(21, "b1:7001")],
                },
                Group {
                    id: 10,
                    replicas: vec![replica(0, "c1:7001")],
                },
            ],
            slot_owner: vec![1, 1, 1, 2, 2, 1, 2, 2],
            config_addrs: strings(&["m1:7000", "m2:7000"]),
        }
    }

    #[test]
    fn maps_render() {
        let map = sample_map();
        assert_eq!(
            render_map_change(&map, false),
            "map version 3, 8 slots, 3 groups\n\
             group 1   slots 4\n\
             group 2   slots 4\n\
             group 10  slots 0"
        );
        assert_eq!(
            render_map(&map, false),
            "map version 3, 8 slots, 3 groups\n\
             group 1   slots 4  0-2,5\n\
             \x20 node 11  a1:7001\n\
             \x20 node 12  a2:7001\n\
             group 2   slots 4  3-4,6-7\n\
             \x20 node 21  b1:7001\n\
             group 10  slots 0  -\n\
             \x20 node ?   c1:7001\n\
             config  m1:7000, m2:7000"
        );
        // Owners the groups do not list still show up.
        let odd = ShardMap {
            version: 4,
            slot_count: 3,
            groups: vec![],
            slot_owner: vec![0, 5, 5],
            config_addrs: vec![],
        };
        assert_eq!(
            render_map(&odd, false),
            "map version 4, 3 slots, 0 groups\n\
             unassigned                slots 1  0\n\
             group 5 (not registered)  slots 2  1-2"
        );
        assert_eq!(
            render_map_change(&ShardMap::default(), false),
            "map version 0, 0 slots, 0 groups\ncluster not initialized (run ordoctl init)"
        );
        let small = ShardMap {
            version: 1,
            slot_count: 2,
            groups: vec![Group {
                id: 1,
                replicas: vec![Replica {
                    node_id: 1,
                    addr: "a\"b".into(),
                }],
            }],
            slot_owner: vec![1, 1],
            config_addrs: strings(&["m:1"]),
        };
        assert_eq!(
            render_map(&small, true),
            "{\"version\":1,\"slot_count\":2,\"groups\":[{\"id\":1,\"replicas\":\
             [{\"node_id\":1,\"addr\":\"a\\\"b\"}]}],\"slot_owner\":[1,1],\
             \"config_addrs\":[\"m:1\"]}"
        );
        assert_eq!(render_map_change(&small, true), render_map(&small, true));
    }

    fn sample_status() -> ClusterStatus {
        let up = |node_id, addr: &str, role: &str, term, applied_index, items| ReplicaStatus {
            node_id,
            addr: addr.into(),
            reachable: true,
            role: role.into(),
            term,
            applied_index,
            items,
            error: String::new(),
        };
        ClusterStatus {
            map: Some(sample_map()),
            groups: vec![
                GroupStatus {
                    id: 1,
                    leader_id: 11,
                    slots: 4,
                    replicas: vec![
                        up(11, "a1:7001", "leader", 5, 1200, 340),
                        ReplicaStatus {
                            node_id: 12,
                            addr: "a2:7001".into(),
                            error: "connection refused".into(),
                            ..ReplicaStatus::default()
                        },
                    ],
                },
                GroupStatus {
                    id: 2,
                    leader_id: 0,
                    slots: 4,
                    replicas: vec![up(21, "b1:7001", "candidate", 12, 7, 0)],
                },
            ],
            meta: Some(GroupStatus {
                id: 0,
                leader_id: 1,
                slots: 0,
                replicas: vec![up(1, "m1:7000", "leader", 2, 30, 0)],
            }),
        }
    }

    #[test]
    fn status_renders_as_a_table() {
        assert_eq!(
            render_status(&sample_status(), false),
            "map version 3, 8 slots, 3 groups\n\
             group 1  leader 11    slots 4\n\
             \x20 node 11  a1:7001  leader     term 5   applied 1200\n\
             \x20 node 12  a2:7001  unreachable: connection refused\n\
             group 2  leader none  slots 4\n\
             \x20 node 21  b1:7001  candidate  term 12  applied 7\n\
             config   leader 1\n\
             \x20 node 1   m1:7000  leader     term 2   applied 30"
        );
        let bare = ClusterStatus::default();
        assert_eq!(
            render_status(&bare, false),
            "map version 0, 0 slots, 0 groups\n\
             cluster not initialized (run ordoctl init)\n\
             config  (not reported)"
        );
    }

    #[test]
    fn status_renders_as_json() {
        let mut status = sample_status();
        status.map = None;
        status.groups.truncate(1);
        status.meta = None;
        assert_eq!(
            render_status(&status, true),
            "{\"map\":null,\"groups\":[{\"id\":1,\"leader_id\":11,\"slots\":4,\"replicas\":[\
             {\"node_id\":11,\"addr\":\"a1:7001\",\"reachable\":true,\"role\":\"leader\",\
             \"term\":5,\"applied_index\":1200,\"error\":\"\"},\
             {\"node_id\":12,\"addr\":\"a2:7001\",\"reachable\":false,\"role\":\"\",\
             \"term\":0,\"applied_index\":0,\"error\":\"connection refused\"}]}],\
             \"meta\":null}"
        );
        let full = render_status(&sample_status(), true);
        assert!(full.starts_with("{\"map\":{\"version\":3,"), "{full}");
        assert!(full.ends_with("\"error\":\"\"}]}}"), "{full}");
    }

    /// Every `--json` output, with strings that need escaping, as ordoctl printed it before the
    /// serde views: the views must keep each byte.
    #[test]
    fn json_outputs_are_unchanged() {
        const ODD: &str = "q\"b\\s\nn\rr\tt\u{1}\u{1f}é/";
        const ODD_JSON: &str = "\"q\\\"b\\\\s\\nn\\rr\\tt\\u0001\\u001fé/\"";
        let odd = Bytes::from_static(ODD.as_bytes());
        let get = GetResponse {
            found: true,
            value: odd.clone(),
            version: u64::MAX,
        };
        assert_eq!(
            render_get(&get, true),
            format!("{{\"found\":true,\"value\":{ODD_JSON},\"version\":18446744073709551615}}")
        );
        let lossy = GetResponse {
            found: true,
            value: Bytes::from_static(b"a\xffb"),
            version: 1,
        };
        assert_eq!(
            render_get(&lossy, true),
            "{\"found\":true,\"value\":\"a\u{fffd}b\",\"version\":1}"
        );
        let ok = PutResponse {
            succeeded: true,
            version: 5,
        };
        assert_eq!(render_put(&ok, true), "{\"succeeded\":true,\"version\":5}");
        let deleted = DeleteResponse {
            succeeded: true,
            deleted: true,
            prev_version: 3,
        };
        assert_eq!(
            render_delete(&deleted, true),
            "{\"succeeded\":true,\"deleted\":true,\"prev_version\":3}"
        );
        assert_eq!(
            render_delete(&DeleteResponse::default(), true),
            "{\"succeeded\":false,\"deleted\":false,\"prev_version\":0}"
        );
        let items = [
            Item {
                key: odd.clone(),
                value: Bytes::new(),
                version: 2,
            },
            Item {
                key: Bytes::new(),
                value: odd.clone(),
                version: 0,
            },
        ];
        assert_eq!(
            render_scan_json(&items, Some(ODD.as_bytes())),
            format!(
                "{{\"items\":[{{\"key\":{ODD_JSON},\"version\":2,\"value\":\"\"}},\
                 {{\"key\":\"\",\"version\":0,\"value\":{ODD_JSON}}}],\"next_key\":{ODD_JSON}}}"
            )
        );
        assert_eq!(
            render_scan_json(&items[..1], Some(b"")),
            format!(
                "{{\"items\":[{{\"key\":{ODD_JSON},\"version\":2,\"value\":\"\"}}],\
                 \"next_key\":\"\"}}"
            )
        );
    }

    #[test]
    fn txn_renders_as_json_and_text() {
        use ordo::proto::v1::TxnOpResult;
        let ops: Vec<TxnOp> = ["put o1 k v", "delete o1 \"\"", "get o1 k", "get o1 gone"]
            .into_iter()
            .map(|s| parse_op(s).unwrap())
            .collect();
        let result = |r| TxnOpResult { result: Some(r) };
        let resp = TxnResponse {
            succeeded: true,
            results: vec![
                result(txn_op_result::Result::Put(PutResponse {
                    succeeded: true,
                    version: 4,
                })),
                result(txn_op_result::Result::Delete(DeleteResponse {
                    succeeded: true,
                    deleted: false,
                    prev_version: 0,
                })),
                result(txn_op_result::Result::Get(GetResponse {
                    found: true,
                    value: Bytes::from_static(b"a\"b"),
                    version: 4,
                })),
                result(txn_op_result::Result::Get(GetResponse::default())),
                TxnOpResult { result: None },
            ],
            ..Default::default()
        };
        assert_eq!(
            render_txn(&ops, &resp, true),
            "{\"succeeded\":true,\"results\":[\
             {\"op\":\"put o1 k v\",\"result\":{\"succeeded\":true,\"version\":4}},\
             {\"op\":\"delete o1 \\\"\\\"\",\"result\":{\"succeeded\":true,\"deleted\":false,\
             \"prev_version\":0}},\
             {\"op\":\"get o1 k\",\"result\":{\"found\":true,\"value\":\"a\\\"b\",\"version\":4}},\
             {\"op\":\"get o1 gone\",\"result\":{\"found\":false}},\
             {\"op\":\"?\",\"result\":null}]}"
        );
        assert_eq!(
            render_txn(&ops, &resp, false),
            "succeeded\n\
             [0] put o1 k v: ok version=4\n\
             [1] delete o1 \"\": ok not found\n\
             [2] get o1 k: a\"b version=4\n\
             [3] get o1 gone: not found\n\
             [4] ?: (empty result)"
        );
        let failed = TxnResponse::default();
        assert_eq!(
            render_txn(&[], &failed, true),
            "{\"succeeded\":false,\"results\":[]}"
        );
        assert_eq!(render_txn(&[], &failed, false), "failed");
    }

    #[test]
    fn admin_json_outputs_are_unchanged() {
        let mut status = sample_status();
        status.groups.truncate(1);
        assert_eq!(
            render_status(&status, true),
            "{\"map\":{\"version\":3,\"slot_count\":8,\"groups\":[\
             {\"id\":1,\"replicas\":[{\"node_id\":11,\"addr\":\"a1:7001\"},{\"node_id\":12,\"addr\":\"a2:7001\"}]},\
             {\"id\":2,\"replicas\":[{\"node_id\":21,\"addr\":\"b1:7001\"}]},\
             {\"id\":10,\"replicas\":[{\"node_id\":0,\"addr\":\"c1:7001\"}]}],\
             \"slot_owner\":[1,1,1,2,2,1,2,2],\"config_addrs\":[\"m1:7000\",\"m2:7000\"]},\
             \"groups\":[{\"id\":1,\"leader_id\":11,\"slots\":4,\"replicas\":[\
             {\"node_id\":11,\"addr\":\"a1:7001\",\"reachable\":true,\"role\":\"leader\",\
             \"term\":5,\"applied_index\":1200,\"error\":\"\"},\
             {\"node_id\":12,\"addr\":\"a2:7001\",\"reachable\":false,\"role\":\"\",\
             \"term\":0,\"applied_index\":0,\"error\":\"connection refused\"}]}],\
             \"meta\":{\"id\":0,\"leader_id\":1,\"slots\":0,\"replicas\":[\
             {\"node_id\":1,\"addr\":\"m1:7000\",\"reachable\":true,\"role\":\"leader\",\
             \"term\":2,\"applied_index\":30,\"error\":\"\"}]}}"
        );
        assert_eq!(
            render_map(&ShardMap::default(), true),
            "{\"version\":0,\"slot_count\":0,\"groups\":[],\"slot_owner\":[],\"config_addrs\":[]}"
        );
        let resp = ChangeGroupReplicasResponse {
            members: vec![
                ordo::proto::v1::Member {
                    node_id: 1,
                    addr: "a:1".into(),
                    voter: true,
                },
                ordo::proto::v1::Member {
                    node_id: 4,
                    addr: "d\"\\:1".into(),
                    voter: false,
                },
            ],
            catch_up_ms: 250,
            map: Some(sample_map()),
        };
        assert_eq!(
            render_replicas(1, &resp, true),
            "{\"group\":1,\"members\":[{\"node_id\":1,\"addr\":\"a:1\",\"voter\":true},\
             {\"node_id\":4,\"addr\":\"d\\\"\\\\:1\",\"voter\":false}],\"catch_up_ms\":250,\
             \"map_version\":3}"
        );
        assert_eq!(
            render_replicas(0, &ChangeGroupReplicasResponse::default(), true),
            "{\"group\":0,\"members\":[],\"catch_up_ms\":0,\"map_version\":0}"
        );
        assert_eq!(
            render_replicas(1, &resp, false),
            "group 1, map version 3 (new replica caught up in 250 ms)\n\
             node 1  a:1    voter\n\
             node 4  d\"\\:1  learner"
        );
        let plan = [
            PlannedMove {
                slots: vec![0, 1, 2, 5],
                from_group: 1,
                to_group: 2,
            },
            PlannedMove {
                slots: vec![],
                from_group: 10,
                to_group: 3,
            },
        ];
        assert_eq!(
            render_plan(&plan, true),
            "{\"plan\":[{\"from_group\":1,\"to_group\":2,\"slots\":[0,1,2,5]},\
             {\"from_group\":10,\"to_group\":3,\"slots\":[]}]}"
        );
        assert_eq!(render_plan(&[], true), "{\"plan\":[]}");
        assert_eq!(
            render_plan(&plan, false),
            "plan: 2 moves\n\
             \x20 group 1 → group 2   4 slots  0-2,5\n\
             \x20 group 10 → group 3  0 slots"
        );
        assert_eq!(
            render_plan(&[], false),
            "nothing to move: the slots are spread evenly already"
        );
        let leader = TransferLeaderResponse {
            leader_id: 2,
            term: 9,
        };
        assert_eq!(render_leader(&leader, true), "{\"leader_id\":2,\"term\":9}");
        assert_eq!(render_leader(&leader, false), "leader is node 2 (term 9)");
        let m = ordo::proto::v1::Migration {
            id: 4,
            slots: vec![0, 1, 2, 7],
            from_group: 1,
            to_group: 3,
            state: ordo::proto::v1::MigrationState::Copying as i32,
            items_copied: 10,
            bytes_copied: 4096,
            log_records: 6,
            pause_ms: 42,
            items_cleaned: 9,
            map_version: 12,
            abort_requested: true,
            error: "x\"y".into(),
            ..Default::default()
        };
        assert_eq!(
            render_migrations(&[m.clone(), ordo::proto::v1::Migration::default()], true),
            "[{\"id\":4,\"state\":\"copying\",\"from_group\":1,\"to_group\":3,\"slots\":[0,1,2,7],\
             \"items_copied\":10,\"bytes_copied\":4096,\"log_records\":6,\"pause_ms\":42,\
             \"items_cleaned\":9,\"map_version\":12,\"abort_requested\":true,\"error\":\"x\\\"y\"},\
             {\"id\":0,\"state\":\"unknown\",\"from_group\":0,\"to_group\":0,\"slots\":[],\
             \"items_copied\":0,\"bytes_copied\":0,\"log_records\":0,\"pause_ms\":0,\
             \"items_cleaned\":0,\"map_version\":0,\"abort_requested\":false,\"error\":\"\"}]"
        );
        assert_eq!(render_migrations(&[], true), "[]");
    }

    #[test]
    fn align_pads_all_but_the_last_cell() {
        let rows = vec![
            strings(&["a", "bb", "c"]),
            strings(&["aaa", "b", "a very long last cell"]),
            strings(&["x"]),
        ];
        assert_eq!(
            align(&rows),
            ["a    bb  c", "aaa  b   a very long last cell", "x"]
        );
    }
}
