//! The context every phase shares: the run's settings, its database and
//! Redis, how to start fluxo, the processes whose CPU is counted, and the
//! report being built.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use fred::prelude::{Client, ClientLike, KeysInterface};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};
use secrecy::SecretString;
use tokio::time::Instant;

use super::{SECRET, Scratch};
use crate::{
    RunArgs, cpu,
    load::{self, Mode, Outcome, Stats},
    procs::{Fluxo, Proc},
    report::{ProcRow, Report, Run},
};

/// How long a phase waits after starting `perf record` before its load begins.
const PROFILER_SETTLE: Duration = Duration::from_millis(1_500);

/// The shared context of a run, passed to every phase.
pub(super) struct Bench {
    pub(super) args: RunArgs,
    /// How long a measured phase lasts.
    pub(super) duration: Duration,
    /// Names what the run creates: its database, directory and Redis streams.
    pub(super) run_id: String,
    /// This run's own database.
    pub(super) db_url: String,
    pub(super) db: DatabaseConnection,
    pub(super) redis: Client,
    /// The stream between fluxo's relay and its consolidator in this run.
    stream: String,
    /// Starts fluxo processes on this run's database, Redis and stream.
    fluxo: Fluxo,
    pub(super) report: Report,
    /// The processes whose CPU each phase reports, by name.
    pids: Vec<(String, u32)>,
    /// Where `perf` recordings go, when profiling.
    profile_dir: Option<PathBuf>,
}

impl Bench {
    /// States the run's settings, migrates its database and connects to it
    /// and to Redis.
    pub(super) async fn start(
        args: RunArgs,
        scratch: &Scratch,
        redis_url: &str,
        fluxo_bin: PathBuf,
        durability: &str,
    ) -> anyhow::Result<Self> {
        let duration = Duration::from_secs_f64(args.duration.unwrap_or(10.0));
        let stream = format!("fluxo:bench:{}", scratch.run_id);
        let fluxo = Fluxo {
            bin: fluxo_bin,
            data_dir: scratch.data_dir.clone(),
            env: vec![
                ("FLUXO_DATABASE__URL".into(), scratch.db_url.clone()),
                ("FLUXO_REDIS__URL".into(), redis_url.into()),
                ("FLUXO_CONSOLIDATOR__STREAM".into(), stream.clone()),
                ("FLUXO_RATE_LIMIT__ENABLED".into(), "false".into()),
                ("FLUXO_AUTH__HS256_SECRET".into(), SECRET.into()),
                ("FLUXO_GRPC__SHUTDOWN_TIMEOUT_MS".into(), "5000".into()),
                // Webhooks: subscriptions sealed under a bench key, to the bench's receiver on loopback.
                ("FLUXO_WEBHOOKS__SECRET_KEY".into(), "Zmx1eG8tYmVuY2gtd2ViaG9vay1zZWFsaW5nLWtleTI=".into()),
                ("FLUXO_WEBHOOKS__ALLOW_NETS".into(), r#"["127.0.0.0/8"]"#.into()),
            ],
        };
        let report = Report {
            machine: crate::procs::machine(),
            command: args
                .command_line
                .clone()
                .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" ")),
            started: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            revision: revision(),
            settings: settings(&args, duration, durability),
            ..Report::default()
        };
        let profile_dir = profile_dir(&args, &scratch.data_dir);
        eprintln!("fluxo-bench: {}", report.machine);
        eprintln!("fluxo-bench: {}", report.settings);
        fluxo.run(&["migrate"])?;
        let db = Database::connect(&scratch.db_url).await?;
        let redis = fluxo_queue::client(&fluxo_queue::RedisConfig {
            url: SecretString::from(redis_url.to_owned()),
            command_timeout: Duration::from_secs(10),
            tls_ca_file: None,
        })?;
        redis.wait_for_connect().await?;
        Ok(Self {
            args,
            duration,
            run_id: scratch.run_id.clone(),
            db_url: scratch.db_url.clone(),
            db,
            redis,
            stream,
            fluxo,
            report,
            pids: Vec::new(),
            profile_dir,
        })
    }

    /// Removes the run's stream (and its dead letters) from Redis, closes the
    /// connections and hands over the report.
    pub(super) async fn finish(self) -> Report {
        let _ = self.redis.del::<i64, _>(&self.stream).await;
        let _ = self.redis.del::<i64, _>(format!("{}:dlq", self.stream)).await;
        self.redis.quit().await.ok();
        self.db.close().await.ok();
        self.report
    }

    /// One load run of the phase's duration with the CPU it took (and, when
    /// profiling, where it went), recorded in the report.
    pub(super) async fn measure<F, Fut>(&mut self, label: &str, mode: Mode, op: F) -> Stats
    where
        F: Fn(u64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let duration = self.duration;
        eprintln!("==> {label}");
        let n = self.report.runs.len();
        let recording = self.profile_dir.as_deref().and_then(|dir| {
            crate::profile::start(dir, n, PROFILER_SETTLE + duration + Duration::from_millis(500))
        });
        if recording.is_some() {
            // perf's start (it reads every process's memory map) takes CPU for a
            // moment; the load starts once that is over, so it is not measured.
            tokio::time::sleep(PROFILER_SETTLE).await;
        }
        let before = self.cpu_snapshot();
        let stats = load::run(label, mode, duration, op).await;
        let cpu = self.cpu_since(&before);
        eprintln!("  {}\n  CPU {cpu}", stats.line());
        if let Some(recording) = recording {
            let busy = self.busy(&cpu);
            if let Some(profile) = crate::profile::finish(recording, label, &busy, 8) {
                self.report.profiles.push(profile);
            }
        }
        self.report.runs.push(Run { stats: stats.clone(), cpu: cpu.to_string() });
        stats
    }

    /// The processes worth a profile (a fifth of a core or more), with the
    /// `perf report` filter that selects each.
    fn busy(&self, cpu: &cpu::Usage) -> Vec<(String, String)> {
        cpu.by_group
            .iter()
            .filter(|(_, cores)| *cores >= 0.2)
            .filter_map(|(group, _)| {
                let filter = match group.as_str() {
                    "postgres" => "--comm=postgres".to_owned(),
                    "redis" => "--comm=redis-server".to_owned(),
                    "fluxo-bench" => format!("--pid={}", std::process::id()),
                    name => format!("--pid={}", self.pids.iter().find(|(n, _)| n == name)?.1),
                };
                Some((group.clone(), filter))
            })
            .collect()
    }

    /// The run's callers in a closed loop: the maximum.
    pub(super) fn closed(&self) -> Mode {
        Mode::Closed { concurrency: self.args.concurrency }
    }

    /// A constant arrival rate.
    pub(super) fn open(&self, rate: f64) -> Mode {
        Mode::Open { rate: rate.max(1.0), max_in_flight: self.args.concurrency.max(1) * 16 }
    }

    /// CPU time of every process counted so far.
    pub(super) fn cpu_snapshot(&self) -> cpu::Snapshot {
        cpu::snapshot(&self.pids)
    }

    /// Cores used by each process since `before`.
    pub(super) fn cpu_since(&self, before: &cpu::Snapshot) -> cpu::Usage {
        cpu::between(before, &self.cpu_snapshot())
    }

    /// Counts `p`'s CPU in every phase from now on.
    pub(super) fn track(&mut self, p: &Proc) {
        self.pids.push((p.name.clone(), p.pid()));
    }

    /// Starts a fluxo target; its CPU counts from now on.
    pub(super) async fn serve(&mut self, target: &str, env: &[(String, String)]) -> anyhow::Result<Proc> {
        let p = self.fluxo.serve(target, env).await?;
        self.track(&p);
        Ok(p)
    }

    /// Starts a fluxo target for the first time in the run: its start-up time
    /// and idle RSS go into the report.
    pub(super) async fn serve_fresh(
        &mut self,
        target: &str,
        env: &[(String, String)],
    ) -> anyhow::Result<Proc> {
        let p = self.serve(target, env).await?;
        self.idle(&p).await;
        Ok(p)
    }

    /// Stops `p` (SIGTERM, SIGKILL after `within`); its CPU no longer counts.
    pub(super) fn stop(&mut self, p: Proc, within: Duration) {
        let pid = p.pid();
        self.pids.retain(|(_, q)| *q != pid);
        p.stop(within);
    }

    /// Start time and idle RSS of a freshly started process.
    async fn idle(&mut self, p: &Proc) {
        tokio::time::sleep(Duration::from_secs(if self.args.smoke { 1 } else { 3 })).await;
        let rss = p.rss().unwrap_or(0) as f64 / 1e6;
        eprintln!(
            "  {}: SERVING {:.0} ms after spawn, idle RSS {rss:.1} MB",
            p.name,
            p.ready_after.as_secs_f64() * 1e3
        );
        self.report.procs.push(ProcRow {
            target: p.name.clone(),
            ready_ms: p.ready_after.as_secs_f64() * 1e3,
            idle_rss_mb: rss,
        });
    }

    /// The single number `sql` selects.
    pub(super) async fn count(&self, sql: &str) -> anyhow::Result<i64> {
        let row = self
            .db
            .query_one_raw(Statement::from_string(DbBackend::Postgres, sql.to_owned()))
            .await?
            .context("no row")?;
        Ok(row.try_get_by_index(0)?)
    }

    /// Waits until every ledger entry is in the read model; the time it took.
    pub(super) async fn wait_consolidated(&self, within: Duration, label: &str) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let total = self.count("SELECT COUNT(*) FROM ledger_entries").await?;
        let mut last_print = Instant::now();
        loop {
            let applied = self.count("SELECT COUNT(*) FROM balance_applied_events").await?;
            if applied >= total {
                return Ok(start.elapsed());
            }
            anyhow::ensure!(
                start.elapsed() < within,
                "{label}: only {applied} of {total} entries consolidated within {within:?}"
            );
            if last_print.elapsed() > Duration::from_secs(1) {
                eprintln!(
                    "  [{label}] {:>3.0}s consolidated {applied} of {total}",
                    start.elapsed().as_secs_f64()
                );
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The revision benchmarked, as `git rev-parse --short HEAD` names it.
fn revision() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// The report's settings line: the run's options, PostgreSQL's durability,
/// fluxo's defaults that bound the write path, and any overrides.
fn settings(args: &RunArgs, duration: Duration, durability: &str) -> String {
    format!(
        "{}{:.0} s per phase, {} callers over {} connections for maximum runs, backlog {}, pipeline at {:.0}/s, mixed at {:.0}/s; PostgreSQL {durability}, fluxo database pool 16 (default), ledger group commit 4 writers × 256 (default)",
        if args.smoke { "SMOKE (figures mean nothing), " } else { "" },
        duration.as_secs_f64(),
        args.concurrency,
        args.connections,
        args.backlog,
        args.pipeline_rate,
        args.mixed_rate
    ) + &overridden()
}

/// The settings a run changed with `FLUXO_BENCH_SET_<VAR>`, for the report.
fn overridden() -> String {
    let set: Vec<String> =
        crate::procs::overrides().iter().map(|(var, value)| format!("{var}={value}")).collect();
    if set.is_empty() { String::new() } else { format!("; overridden: {}", set.join(", ")) }
}

/// Where `perf` recordings go: the run's directory, when `--profile` asks
/// for profiles (never in a smoke run) and perf can sample here.
fn profile_dir(args: &RunArgs, data_dir: &std::path::Path) -> Option<PathBuf> {
    if !args.profile || args.smoke {
        return None;
    }
    if crate::profile::available(data_dir) {
        Some(data_dir.to_path_buf())
    } else {
        eprintln!("fluxo-bench: warning: `perf record -a` does not work here; running without profiles");
        None
    }
}
