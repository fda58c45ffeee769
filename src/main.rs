//! `fluxo`: one binary, several targets. `fluxo serve` with no configuration
//! runs everything in one process on an embedded SQLite file; in Kubernetes
//! each target runs as its own Deployment (`fluxo serve --target ledger`).

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use fluxo::{Target, config::Config, ops, serve};

/// fluxo — a merchant cash-flow ledger with daily consolidated balances.
///
/// Configuration comes from built-in defaults, then the file given with
/// --config (TOML), then FLUXO_* environment variables, which win. Nested keys
/// use a double underscore: FLUXO_DATABASE__URL=postgres://…, FLUXO_GRPC__LISTEN=0.0.0.0:50051.
/// With no configuration, fluxo stores its data in ./fluxo-data (SQLite) and
/// serves gRPC on 127.0.0.1:50051.
#[derive(Debug, Parser)]
#[command(name = "fluxo", version, about, long_about, propagate_version = true)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, short = 'c', global = true, env = "FLUXO_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run fluxo's services (all of them in one process by default).
    Serve {
        /// What to run: `all` (every target in one process, for laptops and
        /// small installs) or one target per process, as in Kubernetes.
        #[arg(long, short = 't', value_enum, default_value_t = Target::All, env = "FLUXO_TARGET")]
        target: Target,
        /// Once serving, write where it answers to this file as JSON
        /// (`{"target", "grpc", "rest", "token"}`), for scripts and tests.
        #[arg(long, env = "FLUXO_READY_FILE", value_name = "FILE")]
        ready_file: Option<PathBuf>,
    },
    /// Create or upgrade the database schema, then exit.
    ///
    /// Safe to run repeatedly; in Kubernetes it runs as a pre-install/pre-upgrade hook.
    Migrate {
        /// How long to keep retrying while the database is unreachable, in seconds.
        #[arg(long, default_value_t = 60)]
        wait_secs: u64,
    },
    /// The Redis stream that carries ledger events to the consolidators.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Inspect, replay or drop messages parked in the dead-letter stream.
    Dlq {
        #[command(subcommand)]
        command: ops::DlqCommand,
    },
    /// Print the OpenAPI document of the REST API (the one served at /openapi.json).
    Openapi,
    /// Check a live Kubernetes installation of the chart and say how to fix what is wrong.
    ///
    /// Reads the release's Deployments, Pods, Services, hook Jobs, PodDisruptionBudgets,
    /// HorizontalPodAutoscalers, KEDA ScaledObjects (and KEDA's metric), Istio
    /// PeerAuthentications and AuthorizationPolicies, and Karpenter NodePools, through a
    /// kubeconfig or the pod's ServiceAccount. Given fluxo's settings (FLUXO_DATABASE__URL,
    /// FLUXO_REDIS__URL, as the release's pods have them), it also checks the schema and the
    /// consumer group and holds KEDA's view of the lag against fluxo's own.
    ///
    /// Each check passes, fails with the fix, or is skipped with why. Exit status: 0 when
    /// nothing failed, 1 when a check failed or the cluster could not be read, 2 on bad usage. Needs get/list on those
    /// objects in the namespace, get on ServiceAccounts the policies name, list on NodePools
    /// and get on the external metrics API (a cluster's `view` role plus those).
    Doctor(#[command(flatten)] fluxo::doctor::DoctorArgs),
    /// Rebuild, reconcile or export the daily balances.
    Balances {
        #[command(subcommand)]
        command: BalancesCommand,
    },
    /// Bulk work on entries over gRPC: import or export a CSV file.
    Entries {
        #[command(subcommand)]
        command: EntriesCommand,
    },
    /// Close, reopen and verify a merchant's books.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Webhook deliveries: what was sent, what was given up on, and sending it again.
    Webhooks {
        #[command(subcommand)]
        command: WebhooksCommand,
    },
}

#[derive(Debug, Subcommand)]
enum WebhooksCommand {
    /// List, show and replay deliveries (the dead-letter store among them).
    Deliveries {
        #[command(subcommand)]
        command: fluxo::webhooks::DeliveriesCommand,
    },
}

#[derive(Debug, Subcommand)]
enum EntriesCommand {
    /// Book every entry of a CSV file (header row), a batch at a time, with progress.
    ///
    /// Columns: request_id (required; the entry's idempotency key), type (CREDIT or DEBIT),
    /// currency (ISO 4217), amount_minor (integer minor units) or amount (decimal, e.g. 10.50),
    /// booking_date (YYYY-MM-DD, optional: backdated entries keep their dates), description
    /// (optional), metadata.KEY (optional labels; an empty cell sets none).
    ///
    /// Safe to interrupt (Ctrl-C) and run again: a new run continues after the last line done
    /// (FILE.import-state) and nothing is booked twice (each entry has its own key). Ends with
    /// a summary: booked, replayed, and every refused line with why. Exit status 1 when any
    /// line was refused.
    Import(#[command(flatten)] fluxo::import::ImportArgs),
    /// Write a merchant's entries as CSV (to stdout, or --output FILE), streamed over gRPC.
    ///
    /// The same CSV as `GET /v1/merchants/{merchant_id}/entries:export` (docs/export.md): a
    /// header row, then one row per entry in (booking date, id) order; amounts in integer minor
    /// units beside the currency code; metadata as one JSON-object column. Progress on stderr.
    Export(#[command(flatten)] fluxo::export::EntriesExportArgs),
    /// Follow a merchant's entries as they are committed, as CSV rows on stdout, until interrupted.
    ///
    /// The export's columns, a row per entry in commit order, flushed as they arrive. From the
    /// merchant's first entry, after --cursor, or --from-end. Reconnects by itself (the server
    /// draining, the connection lost) and resumes after the last row written; with
    /// --cursor-file FILE a later run resumes there too, without a second header row.
    Watch(#[command(flatten)] fluxo::watch::WatchArgs),
}

#[derive(Debug, Subcommand)]
enum LedgerCommand {
    /// Close a merchant's books through a date (gRPC; needs fluxo:close or fluxo:admin).
    Close(#[command(flatten)] fluxo::periods::CloseArgs),
    /// Reopen a merchant's latest close, saying why (gRPC; same scopes).
    Reopen(#[command(flatten)] fluxo::periods::ReopenArgs),
    /// List a merchant's closes, newest first (gRPC).
    Closes(#[command(flatten)] fluxo::periods::ClosesArgs),
    /// Recompute every close in force of a merchant from the entries and the daily balances
    /// as stored now, and report each difference (on the database, like `balances reconcile`).
    ///
    /// Exit status 1 when anything differs from what was closed.
    Verify {
        /// The merchant.
        #[arg(long, short = 'm')]
        merchant: String,
    },
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// Create the stream and its consumer group (safe to repeat).
    Init {
        /// Also create the notifiers' group (`webhooks.group`), so no event is trimmed before
        /// the first notifier reads it. Only where notifiers run: a group nobody reads keeps
        /// the stream from being trimmed.
        #[arg(long)]
        notifiers: bool,
    },
    /// Show the outbox backlog, the stream, the group's lag and pending, and the dead letters.
    Status,
}

#[derive(Debug, Subcommand)]
enum BalancesCommand {
    /// Recompute balances from the ledger (all, or one merchant and date range) while fluxo serves.
    Rebuild {
        #[command(flatten)]
        scope: ops::Scope,
    },
    /// Compare the ledger's sums with the balances and report every difference.
    Reconcile {
        #[command(flatten)]
        scope: ops::Scope,
        /// Apply the ledger entries the balances are missing.
        #[arg(long)]
        repair: bool,
    },
    /// Write a merchant's daily balances over a date range as CSV, streamed over gRPC.
    ///
    /// The same CSV as `GET /v1/merchants/{merchant_id}/balances:export` (docs/export.md): one row
    /// per day, days without entries included with the carried balance. Progress on stderr.
    Export(#[command(flatten)] fluxo::export::BalancesExportArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_ref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("fluxo: invalid configuration:\n  {error:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("fluxo: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { target, ready_file } => serve::serve(config, target, ready_file).await,
            Command::Migrate { wait_secs } => serve::migrate(config, wait_secs).await,
            Command::Queue { command: QueueCommand::Init { notifiers } } => {
                ops::queue_init(&config, notifiers).await
            }
            Command::Queue { command: QueueCommand::Status } => ops::queue_status(&config).await,
            Command::Dlq { command } => ops::dlq(&config, command).await,
            Command::Openapi => ops::openapi(),
            Command::Doctor(args) => fluxo::doctor::doctor(&config, &args).await,
            Command::Balances { command: BalancesCommand::Rebuild { scope } } => {
                ops::rebuild(&config, &scope).await
            }
            Command::Balances { command: BalancesCommand::Reconcile { scope, repair } } => {
                ops::reconcile(&config, &scope, repair).await
            }
            Command::Balances { command: BalancesCommand::Export(args) } => {
                fluxo::export::balances(&args).await
            }
            Command::Entries { command: EntriesCommand::Import(args) } => fluxo::import::import(&args).await,
            Command::Entries { command: EntriesCommand::Export(args) } => fluxo::export::entries(&args).await,
            Command::Entries { command: EntriesCommand::Watch(args) } => fluxo::watch::entries(&args).await,
            Command::Ledger { command } => match command {
                LedgerCommand::Close(args) => fluxo::periods::close(&args).await,
                LedgerCommand::Reopen(args) => fluxo::periods::reopen(&args).await,
                LedgerCommand::Closes(args) => fluxo::periods::closes(&args).await,
                LedgerCommand::Verify { merchant } => fluxo::periods::verify(&config, &merchant).await,
            },
            Command::Webhooks { command: WebhooksCommand::Deliveries { command } } => {
                fluxo::webhooks::deliveries(&config, command).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fluxo: {error:#}");
            ExitCode::FAILURE
        }
    }
}
