//! `ordoctl`: the command-line client of Ordo.
//!
//! A thin layer over [`ordo_proto::client::Client`] (data commands: `get`, `put`, `delete`, `scan`,
//! `txn`, and `leader transfer`, which talks to one group's nodes) and
//! [`ordo_proto::client::ClusterClient`] (admin commands: `init`, `status`, `map`,
//! `group add|remove|drain`, `move-slots`, `rebalance`, `migrations [abort]`, `tasks [abort]`,
//! `replica add|remove|replace`), `watch` (the change feed, through a router) and `feed ...`
//! (its consumer groups, through a router): it parses
//! arguments, makes one call (or a series of scan pages; or, for the commands that run as tasks
//! on the config leader, one call to start the task and polls that follow it; or, for `watch`,
//! one stream) and prints the answer. All networking, leader following and retrying
//! live in the clients.
//!
//! Files by role: `args` (clap definitions), `parse` (values clap cannot parse alone), `render`
//! (text tables), `json` (`--json` views); one file per command group: `kv` (data), `admin`
//! (map and groups), `migrate` (resharding), `tasks` (starting and following admin tasks, their
//! progress line), `replica` (membership and leadership), `watch` (the change feed), `feed`
//! (consumer groups).
//!
//! Exit codes: 0 success, 1 error (bad arguments or a failed call), 2 a condition did not hold
//! (`put`/`delete` with `--if-version`, or a `txn` whose compares failed).

mod admin;
mod args;
mod feed;
#[cfg(test)]
mod fixtures;
mod json;
mod kv;
mod migrate;
mod parse;
mod render;
mod replica;
mod tasks;
mod watch;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ordo_proto::client::{Client, ClusterClient};
use tonic::Code;

use crate::args::{Cli, Command, GroupCommand};

/// Why a command did not succeed, mapped to the exit code.
pub(crate) enum Failure {
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

/// Runs one command: a flat dispatch to the command groups.
async fn run(cli: Cli) -> Result<(), Failure> {
    let Cli {
        endpoint,
        timeout,
        json,
        command,
    } = cli;
    let ep = &Endpoints {
        addrs: endpoint,
        timeout,
    };
    match command {
        Command::Get(a) => kv::get(ep, a, json).await,
        Command::Put(a) => kv::put(ep, a, json).await,
        Command::Delete(a) => kv::delete(ep, a, json).await,
        Command::Scan(a) => kv::scan(ep, a, json).await,
        Command::Txn(a) => kv::txn(ep, a, json).await,
        Command::Init(a) => admin::init(ep, a, json).await,
        Command::Status => admin::status(ep, json).await,
        Command::Map(a) => admin::map(ep, a, json).await,
        Command::Group(GroupCommand::Add(a)) => admin::group_add(ep, a, json).await,
        Command::Group(GroupCommand::Remove(a)) => admin::group_remove(ep, a, json).await,
        Command::Group(GroupCommand::Drain(a)) => migrate::drain(ep, a, json).await,
        Command::MoveSlots(a) => admin::move_slots(ep, a, json).await,
        Command::Rebalance(a) => migrate::rebalance_cmd(ep, a, json).await,
        Command::Migrations(a) => migrate::migrations(ep, a, json).await,
        Command::Tasks(a) => tasks::tasks(ep, a, json).await,
        Command::Replica(c) => replica::replica(ep, c, json).await,
        Command::Leader(c) => replica::leader(ep, c, json).await,
        Command::Watch(a) => watch::watch(ep, a, json).await,
        Command::Feed(c) => feed::feed(ep, c, json).await,
    }
}

/// The global `--endpoint` and `--timeout`. Commands connect through it only once their
/// arguments are checked, so that a bad argument is reported before a missing address.
pub(crate) struct Endpoints {
    addrs: Vec<String>,
    pub(crate) timeout: Duration,
}

impl Endpoints {
    /// A data client, over nodes or routers.
    pub(crate) fn kv(&self) -> anyhow::Result<Client> {
        if self.addrs.is_empty() {
            anyhow::bail!("no endpoint: pass --endpoint <addr>[,<addr>...] or set ORDO_ENDPOINT");
        }
        Ok(Client::connect(self.addrs.clone())?.with_timeout(self.timeout))
    }

    /// An admin client, over config servers or routers.
    pub(crate) fn admin(&self) -> anyhow::Result<ClusterClient> {
        if self.addrs.is_empty() {
            anyhow::bail!(
                "no endpoint: pass --config <config server or router addr>[,<addr>...] or set \
                 ORDO_ENDPOINT"
            );
        }
        Ok(ClusterClient::connect(self.addrs.clone())?.with_timeout(self.timeout))
    }
}

/// `Ok` when the condition held, [`Failure::Condition`] (exit code 2) otherwise.
pub(crate) fn condition(succeeded: bool) -> Result<(), Failure> {
    if succeeded {
        Ok(())
    } else {
        Err(Failure::Condition)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_show_the_grpc_code() {
        let e = anyhow::Error::from(tonic::Status::invalid_argument("key too long"));
        assert_eq!(describe_error(&e), "INVALID_ARGUMENT: key too long");
        assert_eq!(describe_error(&anyhow::anyhow!("boom")), "boom");
    }
}
