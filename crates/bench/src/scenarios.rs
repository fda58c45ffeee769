//! The run: ceilings first, then each scenario against fluxo targets in
//! their own processes (as in Kubernetes), then `--target all`.
//!
//! This file sets the run up, lists its phases in order ([`phases`]) and
//! publishes the report; each phase is a function of the module named after
//! what it measures, and [`Bench`] is the context they all share.

mod bench;
mod calls;
mod ceilings;
mod consolidation;
mod export;
mod reads;
mod target_all;
mod targets;
mod webhooks;
mod writes;

use std::path::PathBuf;

use anyhow::Context;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};
use tokio::time::Instant;

use self::{bench::Bench, targets::Targets};
use crate::{RunArgs, report::Report};

/// The business date of the balances read in every scenario.
const WARM_DATE: &str = "2026-11-02";
/// Merchants whose balances are read (warm in the cache).
const WARM_MERCHANTS: u64 = 200;
/// Merchants written to.
const MERCHANTS: u64 = 1_000;
const SECRET: &str = "fluxo-bench-hs256-secret-of-sufficient-length";

pub(crate) async fn run(args: RunArgs) -> anyhow::Result<()> {
    let wall = Instant::now();
    let pg = env("FLUXO_TEST_POSTGRES_URL")?;
    let redis_url = env("FLUXO_TEST_REDIS_URL")?;
    loopback(&pg)?;
    loopback(&redis_url)?;
    let fluxo_bin = std::fs::canonicalize(&args.fluxo)
        .with_context(|| format!("the fluxo binary {} (build it first)", args.fluxo.display()))?;

    let admin = Database::connect(&pg).await.context("connecting to PostgreSQL")?;
    let scratch = Scratch::create(&admin, &pg).await?;
    let durability = pg_durability(&admin).await?;
    let result = async {
        let mut b = Bench::start(args.clone(), &scratch, &redis_url, fluxo_bin, &durability).await?;
        phases(&mut b).await?;
        anyhow::Ok(b.finish().await)
    }
    .await;
    scratch.remove(&admin).await;
    admin.close().await.ok();

    let mut report = result?;
    report.fact("wall time of the whole run", format!("{:.0} s", wall.elapsed().as_secs_f64()));
    if args.smoke {
        smoke_check(&report)?;
    }
    publish(&args, &report)?;
    eprintln!("fluxo-bench: done in {:.1} s", wall.elapsed().as_secs_f64());
    Ok(())
}

/// The run's phases in order. Each adds its runs, facts and verdicts to the
/// report (so this order is the report's order); what a later phase is
/// compared with is handed on from the phase that measured it.
async fn phases(b: &mut Bench) -> anyhow::Result<()> {
    if let Some(only) = b.args.only.clone() {
        let targets = Targets::start(b).await?;
        match only.as_str() {
            "webhooks" => webhooks::deliveries(b, &targets).await?,
            other => anyhow::bail!("no phase {other}"),
        }
        targets.stop(b);
        return Ok(());
    }
    let bare = ceilings::bare_tonic(b).await?;
    let insert = ceilings::single_row_insert(b).await?;
    let pg = ceilings::pgbench(b).await?;
    let read_ceiling = ceilings::redis(b).await?;

    let mut targets = Targets::start(b).await?;
    targets.warm_up(b).await?;
    let record = writes::record(b, &targets, &insert).await?;
    writes::one_caller_and_ghz(b, &targets, pg).await?;
    writes::bulk_import(b, &targets, &record, &insert, pg).await?;
    let balance = reads::balance(b, &targets, &bare).await?;
    reads::balance_at_half_load(b, bare, &targets, &balance).await;
    reads::rest(b, &targets, &balance).await?;
    consolidation::pipeline(b, &targets).await?;
    consolidation::mixed_with_consolidator_stopped(b, &mut targets).await?;
    consolidation::backlog_drain(b, &mut targets, read_ceiling).await?;
    webhooks::deliveries(b, &targets).await?;
    writes::overload(b, &targets, &record).await;
    export::entries(b, &targets).await?;
    targets.stop(b);

    let peak_mb = target_all::mixed(b).await?;
    target_all::footprint_verdicts(b, peak_mb);
    Ok(())
}

/// What a run creates for itself, named by its id, and removes when it ends
/// however it ends: a fresh database on the test server and a directory.
#[derive(Debug)]
struct Scratch {
    run_id: String,
    db_name: String,
    db_url: String,
    data_dir: PathBuf,
}

impl Scratch {
    async fn create(admin: &DatabaseConnection, pg: &str) -> anyhow::Result<Self> {
        let run_id = ulid::Ulid::new().to_string().to_lowercase();
        let db_name = format!("fluxo_bench_{run_id}");
        admin.execute_unprepared(&format!("CREATE DATABASE {db_name}")).await?;
        let base = pg.rsplit_once('/').map_or(pg, |(b, _)| b);
        let db_url = format!("{base}/{db_name}");
        let data_dir = std::env::temp_dir().join(format!("fluxo-bench-{run_id}"));
        std::fs::create_dir_all(&data_dir)?;
        Ok(Self { run_id, db_name, db_url, data_dir })
    }

    async fn remove(&self, admin: &DatabaseConnection) {
        std::fs::remove_dir_all(&self.data_dir).ok();
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db_name);
        admin.execute_unprepared(&drop).await.ok();
    }
}

fn env(key: &str) -> anyhow::Result<String> {
    std::env::var(key).with_context(|| {
        format!("{key} is not set: run through scripts/bench.sh (it starts PostgreSQL and Redis)")
    })
}

fn loopback(url: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        url.contains("@127.0.0.1:")
            || url.contains("//127.0.0.1:")
            || url.contains("@localhost:")
            || url.contains("//localhost:"),
        "only loopback servers are benchmarked: {url}"
    );
    Ok(())
}

/// PostgreSQL's durability settings, as the report states them.
async fn pg_durability(admin: &DatabaseConnection) -> anyhow::Result<String> {
    let mut settings = Vec::new();
    for name in ["fsync", "synchronous_commit", "full_page_writes"] {
        let row = admin
            .query_one_raw(Statement::from_string(DbBackend::Postgres, format!("SHOW {name}")))
            .await?
            .context("SHOW returned nothing")?;
        settings.push(format!("{name}={}", row.try_get_by_index::<String>(0)?));
    }
    Ok(settings.join(", "))
}

/// A smoke run asserts no timing, only that every phase worked (overload
/// phases are meant to fail some calls).
fn smoke_check(report: &Report) -> anyhow::Result<()> {
    let broken: Vec<String> = report
        .runs
        .iter()
        .filter(|r| r.stats.ok == 0 || (r.stats.errors > 0 && !r.stats.label.starts_with("overload")))
        .map(|r| r.stats.line())
        .collect();
    anyhow::ensure!(
        broken.is_empty(),
        "smoke run: phases without success or with errors:\n{}",
        broken.join("\n")
    );
    Ok(())
}

/// Prints the report and, in a full run, writes it into its generated block
/// of the report file.
fn publish(args: &RunArgs, report: &Report) -> anyhow::Result<()> {
    let md = report.markdown();
    println_out(&format!("\n{md}"));
    if !args.smoke && args.only.is_none() {
        let existing = std::fs::read_to_string(&args.report).ok();
        std::fs::write(&args.report, crate::report::splice(existing.as_deref(), &md))?;
        eprintln!("fluxo-bench: wrote {}", args.report.display());
    }
    Ok(())
}

/// The report goes to stdout; progress to stderr.
fn println_out(s: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{s}");
}
