//! `ordo-bench`: a load generator for Ordo (and, for comparison, etcd and NATS JetStream KV).
//!
//! * Workloads: YCSB core A–F and `orders` (an order system's aggregate creates, status CAS and
//!   reads), see [`workload`] and [`ops`].
//! * Pacing: closed loop (`--clients` workers, one request in flight each) or open loop at
//!   `--rate` ops/s with latency measured from each request's intended start, see [`schedule`].
//! * Targets: an Ordo router or group (`--endpoints`), an in-process cluster (`--playground`),
//!   etcd (`--target etcd://host:port,...`) or a NATS JetStream KV bucket (`--target
//!   nats://host:port,...`, feature `nats`), see [`backend`].
//! * Output: a live progress bar, a table per op, a JSON report and an SVG plot, see
//!   [`progress`], [`report`], [`output`] and [`plot`]; CPU seconds per 1,000 ops, see [`cpu`].
//!
//! A run: optional load phase (inserts `--records` records, or creates that many orders; not
//! measured), then `--warmup` of load that is not measured, then `--duration` measured. A request
//! still running when the duration ends is waited for and counted; the measured time runs until
//! the last one finished. [`run`] holds these steps; [`load`], [`worker`] and [`rebalance`] the
//! phases' tasks; [`args`] the command line.
//!
//! `ordo-bench groups ...` is another command with its own arguments: consumer groups'
//! throughput and latency, see [`groups`]; `ordo-bench jetstream ...` (feature `nats`) its
//! backlog test on NATS JetStream.

mod args;
mod backend;
mod cpu;
mod feed;
mod groups;
#[cfg(feature = "nats")]
mod jetstream;
mod load;
mod ops;
mod output;
mod plot;
mod progress;
mod rebalance;
mod report;
mod run;
mod schedule;
mod worker;
mod workload;

use anyhow::{ensure, Context};
use clap::Parser;

use args::Args;
use output::{default_out_dir, write_outputs};
use run::run;

fn main() -> anyhow::Result<()> {
    // `ordo-bench groups ...` is the consumer-group bench, with its own arguments.
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("groups") {
        return groups::main(argv[1..].to_vec());
    }
    // `ordo-bench jetstream ...`: the same backlog test on NATS JetStream (feature `nats`).
    if argv.get(1).map(String::as_str) == Some("jetstream") {
        #[cfg(feature = "nats")]
        return jetstream::main(argv[1..].to_vec());
        #[cfg(not(feature = "nats"))]
        anyhow::bail!("built without JetStream: cargo build -p ordo-bench --features nats");
    }
    let args = Args::parse();
    args.check()?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = args.threads {
        ensure!(threads > 0, "--threads must be at least 1");
        runtime.worker_threads(threads);
    }
    let report = runtime
        .build()
        .context("starting the runtime")?
        .block_on(run(&args))?;

    println!();
    print!("{}", report.table());
    let out_dir = args.out.clone().unwrap_or_else(default_out_dir);
    let paths = write_outputs(&report, &out_dir, args.json.as_deref())?;
    for p in paths {
        println!("report: {}", p.display());
    }
    Ok(())
}
