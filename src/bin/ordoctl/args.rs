//! The command line: clap definitions of every command, flag and help text. Values that need
//! more than clap's parsers (durations, txn compares and ops, group specs, slot lists) are parsed
//! in [`crate::parse`].

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ordo::proto::v1::{Compare, GroupSpec, TxnOp};

use crate::parse::{
    parse_compare, parse_duration, parse_group_from, parse_group_spec, parse_op, parse_slot_list,
    parse_watch_from, GroupFrom, SlotList, WatchFrom,
};

#[derive(Parser, Debug)]
#[command(
    name = "ordoctl",
    version,
    about = "Command-line client of the Ordo key-value store",
    after_help = "\
Keys and values are UTF-8 strings; write the empty key (an order's root item) as \"\". Put \
arguments that start with '-' after `--`.

Data commands (get, put, delete, scan, txn) take node or router addresses; admin commands \
(init, status, map, group, move-slots, rebalance, migrations, tasks, replica) take config server \
or router addresses (--config is an alias of --endpoint); leader transfer takes the addresses of \
the group's own nodes; watch (the change feed) and feed (consumer groups) take router addresses.

move-slots, rebalance, group drain and replica run as tasks on the config leader: the command \
starts the task and follows it with a progress line on stderr, with no overall deadline \
(--timeout bounds each call). Ctrl-C stops following, not the task; `tasks abort <id>` stops it.

Exit codes: 0 success, 1 error, 2 a condition did not hold (--if-version, txn compares)."
)]
pub(crate) struct Cli {
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
    pub(crate) endpoint: Vec<String>,

    /// Deadline of each call, retries included (e.g. 500ms, 10s, 1m; a bare number is seconds).
    /// Commands that follow a task have no overall deadline: this bounds each of their polls.
    #[arg(long, default_value = "10s", value_parser = parse_duration, global = true)]
    pub(crate) timeout: Duration,

    /// Print results as JSON (values are shown as UTF-8, invalid bytes replaced).
    #[arg(long, global = true)]
    pub(crate) json: bool,

    #[command(subcommand)]
    pub(crate) command: Command,
}

/// One variant per subcommand, each with its own argument struct, so that admin commands
/// (`status`, `init`, `replica ...` as a nested subcommand) slot in next to the data commands.
#[derive(Subcommand, Debug)]
pub(crate) enum Command {
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
    /// critical section per move). Runs as a task and follows it, with progress on stderr.
    MoveSlots(MoveSlotsArgs),
    /// Spread the slots evenly over the groups: shows the plan, then moves one range at a time
    /// (a task, followed with progress on stderr).
    Rebalance(RebalanceArgs),
    /// Slot migrations: in flight and recently finished, with progress and measured pauses.
    Migrations(MigrationsArgs),
    /// Admin tasks (moves, rebalances, drains, replica changes): running and recently finished.
    Tasks(TasksArgs),
    /// Leadership of one raft group (give --endpoint the group's node addresses).
    #[command(subcommand)]
    Leader(LeaderCommand),
    /// Change the replicas of a shard group, or of the config servers (--group 0).
    #[command(subcommand)]
    Replica(ReplicaCommand),
    /// Follow the change feed (give --endpoint router addresses): one line per event, and the
    /// cursor to resume from on exit (Ctrl-C, --count, --for).
    Watch(WatchArgs),
    /// Consumer groups of the change feed (give --endpoint router addresses): list, describe
    /// (lag, pending, redeliveries, parked orders per slot), create, delete, seek, unpark.
    #[command(subcommand)]
    Feed(FeedCommand),
}

#[derive(Subcommand, Debug)]
#[command(after_help = "\
A time (--from, --to) is milliseconds since the Unix epoch or an RFC 3339 time in UTC \
(2026-12-01T21:00:00Z): the group starts with the events committed after it.

Example:
  ordoctl -e router:7000 feed create billing --prefix outbox/ --from oldest --ack-wait 10s
  ordoctl -e router:7000 feed describe billing
  ordoctl -e router:7000 feed unpark billing order-17")]
pub(crate) enum FeedCommand {
    /// Every consumer group with its totals.
    Groups,
    /// One group: its definition and totals, then per slot the committed seq, lag (events and
    /// time), pending deliveries, redeliveries, parked orders and whether retention expired it
    /// (slots with nothing waiting are counted, not listed, unless --all-slots).
    Describe(FeedDescribeArgs),
    /// Create a durable consumer group (the same definition again changes nothing).
    Create(FeedCreateArgs),
    /// Delete a group's state from every slot (its members' streams end).
    Delete(FeedGroupArgs),
    /// Move a group's committed position in every slot (acks above it, delivery counts and
    /// parked orders are dropped; an expired group is live again).
    Seek(FeedSeekArgs),
    /// Release a parked order: its parked event is delivered again, then its later events.
    Unpark(FeedUnparkArgs),
}

#[derive(Args, Debug)]
pub(crate) struct FeedGroupArgs {
    /// The group's name.
    #[arg(value_name = "GROUP")]
    pub(crate) group: String,
}

#[derive(Args, Debug)]
pub(crate) struct FeedDescribeArgs {
    /// The group's name.
    #[arg(value_name = "GROUP")]
    pub(crate) group: String,
    /// List every slot, also those with nothing waiting (--json always lists every slot).
    #[arg(long)]
    pub(crate) all_slots: bool,
}

/// How a group hands events to its members (`--mode`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FeedMode {
    /// At most one event of a shard key in flight across all members.
    KeyOrdered,
    /// Each member leases whole slots.
    SlotExclusive,
}

/// What happens to an event `--max-deliver` attempts did not get acked (`--poison`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FeedPoison {
    /// Park its order until `feed unpark` (its later events wait, others flow).
    Park,
    /// Write it as the item dlq/<group>/<seq> under its shard key and go on.
    DeadLetter,
}

#[derive(Args, Debug)]
pub(crate) struct FeedCreateArgs {
    /// The group's name: letters, digits, '-', '_' and '.'.
    #[arg(value_name = "GROUP")]
    pub(crate) group: String,
    /// Only events whose key starts with this (e.g. outbox/); default: every event.
    #[arg(long, value_name = "P", default_value = "")]
    pub(crate) prefix: String,
    /// Only the events of this shard key (repeat for several); default: every shard key.
    #[arg(long = "shard-key", value_name = "K")]
    pub(crate) shard_keys: Vec<String>,
    /// Where the group starts: now, oldest (the oldest event retained) or a time.
    #[arg(long, value_name = "FROM", default_value = "now", value_parser = parse_group_from)]
    pub(crate) from: GroupFrom,
    /// How events are handed to the members.
    #[arg(long, value_enum, default_value_t = FeedMode::KeyOrdered)]
    pub(crate) mode: FeedMode,
    /// How long a delivery may go unacked before it is delivered again [default: the server's,
    /// 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) ack_wait: Option<Duration>,
    /// Attempts an event gets before --poison applies [default: the server's].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_deliver: Option<u32>,
    /// What happens to an event --max-deliver attempts did not get acked.
    #[arg(long, value_enum, default_value_t = FeedPoison::Park)]
    pub(crate) poison: FeedPoison,
}

#[derive(Args, Debug)]
pub(crate) struct FeedSeekArgs {
    /// The group's name.
    #[arg(value_name = "GROUP")]
    pub(crate) group: String,
    /// The new start: now, oldest or a time.
    #[arg(long, value_name = "TO", value_parser = parse_group_from)]
    pub(crate) to: GroupFrom,
}

#[derive(Args, Debug)]
pub(crate) struct FeedUnparkArgs {
    /// The group's name.
    #[arg(value_name = "GROUP")]
    pub(crate) group: String,
    /// The parked order's shard key.
    #[arg(value_name = "SHARD_KEY")]
    pub(crate) shard_key: String,
}

#[derive(Subcommand, Debug)]
#[command(after_help = "\
A new replica first runs empty with --join, then joins: e.g. to replace dead node 3 of group 1,
  ordo node --id 4 --group 1 --join --listen 10.0.0.4:7001 \\
      --peers 1=10.0.0.1:7001,2=10.0.0.2:7001,4=10.0.0.4:7001 --data-dir /var/lib/ordo
  ordoctl --config router:7000 replica replace --group 1 --old 3 --id 4 --addr 10.0.0.4:7001")]
pub(crate) enum ReplicaCommand {
    /// Add a running --join node: it becomes a learner, catches up, then votes.
    Add(ReplicaAddArgs),
    /// Remove a replica. Refused if the voters left would not have a live quorum.
    Remove(ReplicaRemoveArgs),
    /// Add a new node as `add` does, then remove the old one (which may be dead). The group keeps
    /// a live quorum throughout.
    Replace(ReplicaReplaceArgs),
}

#[derive(Args, Debug)]
pub(crate) struct ReplicaAddArgs {
    /// The group (0 = the config servers).
    #[arg(long, value_name = "N")]
    pub(crate) group: u64,
    #[command(flatten)]
    pub(crate) new: NewReplicaArgs,
}

/// The replica that `add` and `replace` bring in.
#[derive(Args, Debug)]
pub(crate) struct NewReplicaArgs {
    /// The new replica's raft id (unique in the group).
    #[arg(long, value_name = "NODE_ID", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) id: u64,
    /// The new replica's address, as its peers reach it.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) addr: String,
    /// How long the new replica may take to catch up before the command gives up (it then
    /// stays a learner until the command is run again or it is removed).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub(crate) catch_up_timeout: Duration,
}

#[derive(Args, Debug)]
pub(crate) struct ReplicaRemoveArgs {
    /// The group (0 = the config servers).
    #[arg(long, value_name = "N")]
    pub(crate) group: u64,
    /// The replica to remove.
    #[arg(long, value_name = "NODE_ID", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) id: u64,
}

#[derive(Args, Debug)]
pub(crate) struct ReplicaReplaceArgs {
    /// The group (0 = the config servers).
    #[arg(long, value_name = "N")]
    pub(crate) group: u64,
    /// The replica that leaves (it may be dead).
    #[arg(long, value_name = "NODE_ID", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) old: u64,
    #[command(flatten)]
    pub(crate) new: NewReplicaArgs,
}

#[derive(Subcommand, Debug)]
pub(crate) enum LeaderCommand {
    /// Hand the group's leadership to one of its voters, e.g. before taking the leader's machine
    /// down. Waits until that replica leads.
    Transfer(LeaderTransferArgs),
}

#[derive(Args, Debug)]
pub(crate) struct LeaderTransferArgs {
    /// Raft id of the replica that should lead.
    #[arg(long, value_name = "NODE_ID", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) to: u64,
}

#[derive(Args, Debug)]
#[command(after_help = "\
Example:
  ordoctl --config cfg1:7000 init --slots 4096 \\
      --group 1=a1:7001,a2:7001,a3:7001 --group 2=b1:7001,b2:7001,b3:7001")]
pub(crate) struct InitArgs {
    /// Number of slots the shard keys are hashed into; fixed for the life of the cluster.
    #[arg(long, value_name = "N")]
    pub(crate) slots: u32,
    /// One shard group: <id>=<addr>,<addr>,... (its replicas' addresses). Repeat per group.
    #[arg(long = "group", value_name = "ID=ADDRS", value_parser = parse_group_spec)]
    pub(crate) groups: Vec<GroupSpec>,
}

#[derive(Args, Debug)]
pub(crate) struct MapArgs {
    /// Let any config replica (or a router's cache) answer; it may lag behind the latest map.
    #[arg(long)]
    pub(crate) stale: bool,
}

#[derive(Subcommand, Debug)]
pub(crate) enum GroupCommand {
    /// Register a running shard group; it owns no slots until slots are moved to it.
    Add(GroupAddArgs),
    /// Unregister a group that owns no slots.
    Remove(GroupRemoveArgs),
    /// Move every slot off a group (spread over the others), so that it can be removed.
    Drain(GroupDrainArgs),
}

#[derive(Args, Debug)]
pub(crate) struct GroupDrainArgs {
    /// The group's id.
    #[arg(value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) id: u64,
    #[command(flatten)]
    pub(crate) moves: MoveOptions,
}

#[derive(Args, Debug, Clone, Copy)]
pub(crate) struct MoveOptions {
    /// Most slots per move.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub(crate) slots_per_move: u32,
    /// Copy bandwidth bound of each move, bytes per second (0 = the config server's default).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub(crate) copy_bytes_per_sec: u64,
}

#[derive(Args, Debug)]
pub(crate) struct RebalanceArgs {
    /// Show the plan only.
    #[arg(long)]
    pub(crate) dry_run: bool,
    #[command(flatten)]
    pub(crate) moves: MoveOptions,
}

#[derive(Args, Debug)]
pub(crate) struct MigrationsArgs {
    #[command(subcommand)]
    pub(crate) command: Option<MigrationsCommand>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum MigrationsCommand {
    /// Abort a migration before its commit point: the donor keeps the slots and its data.
    Abort(MigrationAbortArgs),
}

#[derive(Args, Debug)]
pub(crate) struct MigrationAbortArgs {
    #[arg(value_name = "ID")]
    pub(crate) id: u64,
}

#[derive(Args, Debug)]
pub(crate) struct TasksArgs {
    #[command(subcommand)]
    pub(crate) command: Option<TasksCommand>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum TasksCommand {
    /// Stop a move, rebalance or drain task: no further move starts, and its migration in flight
    /// is aborted if it is before its commit point (moves already done stay done).
    Abort(TaskAbortArgs),
}

#[derive(Args, Debug)]
pub(crate) struct TaskAbortArgs {
    #[arg(value_name = "ID")]
    pub(crate) id: u64,
}

#[derive(Args, Debug)]
pub(crate) struct GroupAddArgs {
    /// The new group's id (0 is the config group's).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) id: u64,
    /// The group's replica addresses, comma-separated or repeated.
    #[arg(long, value_name = "ADDRS", value_delimiter = ',', required = true)]
    pub(crate) replicas: Vec<String>,
}

#[derive(Args, Debug)]
pub(crate) struct GroupRemoveArgs {
    /// The group's id.
    #[arg(value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) id: u64,
}

#[derive(Args, Debug)]
pub(crate) struct MoveSlotsArgs {
    /// The slots: comma-separated slots and inclusive ranges, e.g. 0-511,600,700-701.
    #[arg(long, value_name = "SLOTS", value_parser = parse_slot_list)]
    pub(crate) slots: SlotList,
    /// The group that will own them.
    #[arg(long, value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) to: u64,
    /// Copy bandwidth bound, bytes per second (0 = the config server's default).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub(crate) copy_bytes_per_sec: u64,
}

// Keys and values are UTF-8 strings on the command line; the empty key (an order's root item) is
// written `""`. Arguments starting with `-` must follow `--`.

#[derive(Args, Debug)]
pub(crate) struct GetArgs {
    pub(crate) shard_key: String,
    pub(crate) key: String,
    /// Let any replica answer from its local state (may lag behind acknowledged writes).
    #[arg(long)]
    pub(crate) stale: bool,
}

#[derive(Args, Debug)]
pub(crate) struct PutArgs {
    pub(crate) shard_key: String,
    pub(crate) key: String,
    pub(crate) value: String,
    /// Write only if the item's version is N (0: only if the item does not exist).
    #[arg(long, value_name = "N")]
    pub(crate) if_version: Option<u64>,
}

#[derive(Args, Debug)]
pub(crate) struct DeleteArgs {
    pub(crate) shard_key: String,
    pub(crate) key: String,
    /// Delete only if the item's version is N.
    #[arg(long, value_name = "N")]
    pub(crate) if_version: Option<u64>,
}

#[derive(Args, Debug)]
pub(crate) struct WatchArgs {
    /// Only events whose key starts with this (e.g. outbox/).
    #[arg(long, value_name = "P", default_value = "")]
    pub(crate) prefix: String,
    /// Only the events of this shard key (repeat for several); default: every shard key.
    #[arg(long = "shard-key", value_name = "K")]
    pub(crate) shard_keys: Vec<String>,
    /// Where to start: now, oldest (the oldest event retained), snapshot (every matching item,
    /// then its changes), or a cursor an earlier watch printed (resumes right after it).
    #[arg(long, value_name = "FROM", default_value = "now", value_parser = parse_watch_from)]
    pub(crate) from: WatchFrom,
    /// Stop after this many events.
    #[arg(long, value_name = "N")]
    pub(crate) count: Option<u64>,
    /// Stop after this long (e.g. 30s); default: until Ctrl-C.
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) duration: Option<Duration>,
}

#[derive(Args, Debug)]
pub(crate) struct ScanArgs {
    pub(crate) shard_key: String,
    /// First key (inclusive); default: the first key of the shard key.
    #[arg(long, value_name = "KEY", default_value = "")]
    pub(crate) start: String,
    /// End key (exclusive); default: to the end of the shard key.
    #[arg(long, value_name = "KEY", default_value = "")]
    pub(crate) end: String,
    /// Items per page (0: the server's page size). Without --all, only one page is printed.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub(crate) limit: u32,
    /// Fetch every page until the end of the range.
    #[arg(long)]
    pub(crate) all: bool,
    /// Let any replica answer from its local state (may lag behind acknowledged writes).
    #[arg(long)]
    pub(crate) stale: bool,
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
  | \"emit <shard_key> <key> <value>\" (an event on the change feed, no item stored)

Example:
  ordoctl txn --compare 'o1 status version = 3' \\
      --success 'put o1 status paid' --success 'emit o1 outbox/paid {}' \\
      --failure 'get o1 status'")]
pub(crate) struct TxnArgs {
    /// A condition; all must hold for the success ops to run. Repeatable.
    #[arg(long, value_name = "COMPARE", value_parser = parse_compare)]
    pub(crate) compare: Vec<Compare>,
    /// An op to run when every compare holds. Repeatable.
    #[arg(long, value_name = "OP", value_parser = parse_op)]
    pub(crate) success: Vec<TxnOp>,
    /// An op to run when some compare does not hold. Repeatable.
    #[arg(long, value_name = "OP", value_parser = parse_op)]
    pub(crate) failure: Vec<TxnOp>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::strings;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_says_what_every_command_connects_to() {
        let cli = Cli::command();
        let help = cli.get_after_help().expect("after_help").to_string();
        for sub in cli.get_subcommands() {
            assert!(
                help.contains(sub.get_name()),
                "{} is missing",
                sub.get_name()
            );
        }
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
    fn watch_parses() {
        let cli = Cli::try_parse_from([
            "ordoctl",
            "watch",
            "--prefix",
            "outbox/",
            "--shard-key",
            "o1",
            "--shard-key",
            "o2",
            "--from",
            "oldest",
            "--count",
            "5",
            "--for",
            "2s",
        ])
        .unwrap();
        let Command::Watch(w) = cli.command else {
            panic!("not watch")
        };
        assert_eq!(w.prefix, "outbox/");
        assert_eq!(w.shard_keys, ["o1", "o2"]);
        assert_eq!(
            w.from,
            WatchFrom::Start(ordo::proto::v1::watch_request::Start::FromOldest)
        );
        assert_eq!(
            (w.count, w.duration),
            (Some(5), Some(Duration::from_secs(2)))
        );
        let Command::Watch(w) = Cli::try_parse_from(["ordoctl", "watch"]).unwrap().command else {
            panic!("not watch")
        };
        assert_eq!(
            w.from,
            WatchFrom::Start(ordo::proto::v1::watch_request::Start::FromNow)
        );
        assert!(Cli::try_parse_from(["ordoctl", "watch", "--from", "yesterday"]).is_err());
    }

    #[test]
    fn feed_commands_parse() {
        let parse = |argv: &[&str]| Cli::try_parse_from(argv).map(|c| c.command);
        assert!(matches!(
            parse(&["ordoctl", "feed", "groups", "--json"]),
            Ok(Command::Feed(FeedCommand::Groups))
        ));
        let Ok(Command::Feed(FeedCommand::Describe(a))) =
            parse(&["ordoctl", "feed", "describe", "g"])
        else {
            panic!("not feed describe")
        };
        assert_eq!(a.group, "g");
        let Ok(Command::Feed(FeedCommand::Seek(a))) =
            parse(&["ordoctl", "feed", "seek", "g", "--to", "oldest"])
        else {
            panic!("not feed seek")
        };
        assert_eq!(
            (a.group.as_str(), a.to),
            (
                "g",
                GroupFrom::Start(ordo::proto::v1::watch_request::Start::FromOldest)
            )
        );
        let Ok(Command::Feed(FeedCommand::Unpark(a))) =
            parse(&["ordoctl", "feed", "unpark", "g", "o17"])
        else {
            panic!("not feed unpark")
        };
        assert_eq!((a.group.as_str(), a.shard_key.as_str()), ("g", "o17"));
        let Ok(Command::Feed(FeedCommand::Create(a))) = parse(&["ordoctl", "feed", "create", "g"])
        else {
            panic!("not feed create")
        };
        assert_eq!((a.mode, a.poison), (FeedMode::KeyOrdered, FeedPoison::Park));
        assert_eq!((a.ack_wait, a.max_deliver), (None, None));
        for bad in [
            &["ordoctl", "feed", "seek", "g"][..],
            &["ordoctl", "feed", "seek", "g", "--to", "snapshot"],
            &["ordoctl", "feed", "unpark", "g"],
            &["ordoctl", "feed", "describe"],
            &["ordoctl", "feed", "create", "g", "--poison", "drop"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
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
        let cli = Cli::try_parse_from(["ordoctl", "tasks", "abort", "4"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Tasks(TasksArgs {
                command: Some(TasksCommand::Abort(TaskAbortArgs { id: 4 }))
            })
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
}
