//! `fluxo-bench`: measures fluxo against the ceilings of its own machine.
//!
//! `fluxo-bench run` creates a fresh PostgreSQL database on
//! `FLUXO_TEST_POSTGRES_URL`, uses the Redis at `FLUXO_TEST_REDIS_URL` (both
//! as `scripts/test.sh` provides them; `scripts/bench.sh` is the entry
//! point), starts fluxo targets on loopback ports, measures the ceilings
//! (a bare tonic server, single-row INSERTs, XADD and XREADGROUP+XACK) and
//! the scenarios with the same client and concurrency, and prints a report
//! (and writes it to BENCHMARKS.md unless `--smoke`).

// A benchmark is arithmetic on rates and durations.
#![allow(
    clippy::float_arithmetic,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]

mod bare;
mod cpu;
mod ghz;
mod load;
mod pgbench;
mod procs;
mod profile;
mod report;
mod scenarios;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "fluxo-bench", about = "Open-loop benchmark of fluxo against its machine's ceilings")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs every ceiling and scenario (PostgreSQL and Redis from FLUXO_TEST_POSTGRES_URL / FLUXO_TEST_REDIS_URL).
    Run(RunArgs),
    /// Serves the bare tonic ceiling (BalanceService with a constant reply) on 127.0.0.1.
    BareServer,
}

/// Settings of one run.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RunArgs {
    /// A second or two per phase at low rates; checks that everything works.
    #[arg(long)]
    smoke: bool,
    /// The fluxo binary to benchmark.
    #[arg(long, default_value = "target/release/fluxo")]
    fluxo: PathBuf,
    /// Seconds per measured phase (smoke: 1).
    #[arg(long)]
    duration: Option<f64>,
    /// Concurrent callers of the closed-loop (maximum) runs, ceilings included.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// gRPC / HTTP connections the client spreads its calls over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Entries in the backlog whose drain rate is measured (the full target is 1,000,000).
    #[arg(long, default_value_t = 1_000_000)]
    backlog: u64,
    /// Entries of the one merchant whose export is measured (gRPC and REST CSV).
    #[arg(long, default_value_t = 10_000_000)]
    export_entries: u64,
    /// Write rate while the end-to-end consolidation delay is measured.
    #[arg(long, default_value_t = 2_000.0)]
    pipeline_rate: f64,
    /// Request rate of the mixed scenario (20% writes, 80% reads).
    #[arg(long, default_value_t = 5_000.0)]
    mixed_rate: f64,
    /// Sample every CPU with `perf record` during each phase and add the hottest
    /// symbols of each busy process to the report (needs perf and the right to
    /// use it; skipped with a warning otherwise).
    #[arg(long)]
    profile: bool,
    /// Run only this phase (against the full set of targets, without the ceilings),
    /// printing its figures; the report file is left as it is.
    #[arg(long, value_parser = ["webhooks"])]
    only: Option<String>,
    /// Where to write the report (never in smoke runs or with --only).
    #[arg(long, default_value = "BENCHMARKS.md")]
    report: PathBuf,
    /// The command line to print in the report (scripts/bench.sh passes its own).
    #[arg(long, env = "FLUXO_BENCH_COMMAND")]
    command_line: Option<String>,
}

/// With `FLUXO_BENCH_LOGS=<dir>`, the load generator's own log (its gRPC and
/// HTTP clients: h2, hyper, tonic) goes to `<dir>/fluxo-bench.log`, filtered
/// by `FLUXO_BENCH_LOG` (default `warn`; say `warn,h2::proto::connection=debug`
/// to see why a connection closed).
fn own_log() -> anyhow::Result<()> {
    let Some(file) = procs::log_file("fluxo-bench")? else { return Ok(()) };
    let filter = std::env::var("FLUXO_BENCH_LOG").unwrap_or_else(|_| "warn".to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .with_context(|| format!("FLUXO_BENCH_LOG is not a valid filter: {filter:?}"))?;
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(file).init();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    own_log()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Cmd::BareServer => runtime.block_on(bare::serve()),
        Cmd::Run(mut args) => {
            if args.smoke {
                args.duration.get_or_insert(1.0);
                args.concurrency = args.concurrency.min(8);
                args.backlog = args.backlog.min(2_000);
                args.export_entries = args.export_entries.min(20_000);
                args.pipeline_rate = args.pipeline_rate.min(100.0);
                args.mixed_rate = args.mixed_rate.min(200.0);
            }
            // On SIGINT or SIGTERM the run is dropped, and with it every process it started.
            runtime.block_on(async {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    result = scenarios::run(args) => result,
                    _ = term.recv() => anyhow::bail!("terminated; stopped everything this run started"),
                    _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; stopped everything this run started"),
                }
            })
        }
    }
}
