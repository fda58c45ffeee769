//! The consolidation pipeline (ledger → outbox → relay → stream →
//! consolidator → read model): its end-to-end delay at a steady write rate,
//! serving while the consolidator is stopped and its catching up, and the
//! rate at which one consolidator drains a backlog.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use fluxo_proto::balance_v1::GetDailyBalanceRequest;
use hdrhistogram::Histogram;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use tokio::time::Instant;

use super::{
    MERCHANTS, WARM_DATE,
    bench::Bench,
    calls::{BalanceClients, Call, LedgerClients, entry, mixed_op, ratio},
    targets::Targets,
};
use crate::load;

/// Writes at `--pipeline-rate` with probes among them; the delay from commit
/// to the read model, as the probes see it through GetDailyBalance and as the
/// database records it for every entry.
pub(super) async fn pipeline(b: &mut Bench, t: &Targets) -> anyhow::Result<()> {
    let probes = Arc::new(Probes::new()?);
    let rate = b.args.pipeline_rate;
    let watches = Watches::start(t, WATCHED).await?;
    let op = pipeline_op(t.ledgers.clone(), t.balances.clone(), probes.clone(), rate);
    let pipe = b.measure(&format!("pipeline writes at {rate:.0}/s"), b.open(rate), op).await;
    b.wait_consolidated(Duration::from_secs(600), "pipeline").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (entries, days) = watches.stop();
    b.report.fact(
        &format!("watch delay, commit → WatchEntries reader ({WATCHED} watches, one merchant each)"),
        entries.summary(),
    );
    b.report.fact(
        &format!("watch delay, commit → WatchDailyBalances reader ({WATCHED} watches; the day's as_of)"),
        days.summary(),
    );
    let (p50, p99, max, seen) = probes.delays();
    let (started, lost) = *probes.counts.lock().expect("lock");
    b.report.fact(
        "end-to-end delay, commit → visible in GetDailyBalance (probes)",
        format!(
            "p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms over {seen} probes ({started} started, {lost} never seen) at {:.0} writes/s (5 probes/s, polled every 10 ms)",
            pipe.throughput()
        ),
    );
    let every = EntryDelays::of_pipeline(&b.db).await?;
    b.report.fact(
        "end-to-end delay, every entry: ledger created_at → balance applied_at",
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, p999 {:.1} ms, max {:.1} ms over {} entries",
            every.p50, every.p99, every.p999, every.max, every.n
        ),
    );
    let seconds = worst_seconds(&b.db).await?;
    b.report.fact("end-to-end delay by second of commit (UTC)", seconds.join("; "));
    b.report.verdict(
        &format!("pipeline e2e delay p99 ≤ 250 ms at {rate:.0} entries/s"),
        format!(
            "every entry: p99 {:.1} ms; probes through GetDailyBalance: p99 {p99:.1} ms; writes served {:.0}/s, p99 {:.1} ms, {} failed",
            every.p99,
            pipe.throughput(),
            pipe.ms(0.99),
            pipe.failed()
        ),
        every.p99 <= 250.0 && p99 <= 250.0 && lost == 0 && pipe.failed() == 0 && seen > 0,
    );
    Ok(())
}

/// Merchants of the pipeline followed by a watch of each kind during the phase.
const WATCHED: u64 = 8;

/// Delays from an entry's commit to a watch reader receiving it, microseconds.
#[derive(Debug)]
struct Delays(Mutex<Histogram<u64>>);

impl Delays {
    fn new() -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self(Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3)?))))
    }

    /// Records the delay since `committed` (a protobuf timestamp).
    fn since(&self, committed: Option<&prost_types::Timestamp>) {
        let Some(at) = committed else { return };
        let committed_us = at.seconds.saturating_mul(1_000_000).saturating_add(i64::from(at.nanos / 1_000));
        let now_us = chrono::Utc::now().timestamp_micros();
        let us = u64::try_from(now_us.saturating_sub(committed_us)).unwrap_or(0).max(1);
        self.0.lock().expect("lock").saturating_record(us);
    }

    fn summary(&self) -> String {
        let d = self.0.lock().expect("lock");
        if d.is_empty() {
            return "nothing received".into();
        }
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} messages' entries/days",
            d.value_at_quantile(0.5) as f64 / 1e3,
            d.value_at_quantile(0.99) as f64 / 1e3,
            d.max() as f64 / 1e3,
            d.len()
        )
    }
}

/// WatchEntries and WatchDailyBalances readers of the first `n` pipeline merchants.
struct Watches {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    entries: Arc<Delays>,
    days: Arc<Delays>,
}

impl Watches {
    async fn start(t: &Targets, n: u64) -> anyhow::Result<Self> {
        use futures::StreamExt as _;
        let (entries, days) = (Delays::new()?, Delays::new()?);
        let mut tasks = Vec::new();
        for m in 0..n {
            let merchant = format!("p-{m}");
            let request = fluxo_proto::ledger_v1::WatchEntriesRequest {
                merchant_id: merchant.clone(),
                cursor: String::new(),
                start_at_end: true,
            };
            let mut stream = t.ledgers.get(m).watch_entries(request).await?.into_inner();
            let delays = entries.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(Ok(message)) = stream.next().await {
                    for entry in &message.entries {
                        delays.since(entry.created_at.as_ref());
                    }
                }
            }));
            let request = fluxo_proto::balance_v1::WatchDailyBalancesRequest {
                merchant_id: merchant,
                cursor: String::new(),
                start_at_end: true,
            };
            let mut stream = t.balances.get(m).watch_daily_balances(request).await?.into_inner();
            let delays = days.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(Ok(message)) = stream.next().await {
                    for day in &message.balances {
                        delays.since(day.as_of.as_ref());
                    }
                }
            }));
        }
        Ok(Self { tasks, entries, days })
    }

    /// Ends the watches; what each kind measured.
    fn stop(self) -> (Arc<Delays>, Arc<Delays>) {
        for task in self.tasks {
            task.abort();
        }
        (self.entries, self.days)
    }
}

/// The pipeline's probes: entries of a merchant of their own, whose balance
/// is polled until it shows them.
#[derive(Debug)]
struct Probes {
    /// From the write's return to the balance showing it, microseconds.
    delays: Mutex<Histogram<u64>>,
    /// (started, never seen within a minute)
    counts: Mutex<(u64, u64)>,
}

impl Probes {
    /// How long a probe is polled before it counts as never seen.
    const PATIENCE: Duration = Duration::from_secs(60);

    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            delays: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3)?),
            counts: Mutex::new((0, 0)),
        })
    }

    /// p50, p99 and max in ms, and how many probes were seen.
    fn delays(&self) -> (f64, f64, f64, u64) {
        let d = self.delays.lock().expect("lock");
        (
            d.value_at_quantile(0.5) as f64 / 1e3,
            d.value_at_quantile(0.99) as f64 / 1e3,
            d.max() as f64 / 1e3,
            d.len(),
        )
    }

    /// Polls `merchant`'s balance every 10 ms from `committed` until it shows
    /// the probe's entry.
    async fn watch(self: Arc<Self>, balances: BalanceClients, merchant: String, i: u64, committed: Instant) {
        let mut bc = balances.get(i);
        let ask = GetDailyBalanceRequest {
            merchant_id: merchant,
            date: WARM_DATE.into(),
            currency_code: String::new(),
        };
        while committed.elapsed() < Self::PATIENCE {
            if let Ok(r) = bc.get_daily_balance(ask.clone()).await
                && r.into_inner().entry_count >= 1
            {
                let us = committed.elapsed().as_micros() as u64;
                self.delays.lock().expect("lock").saturating_record(us.max(1));
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.counts.lock().expect("lock").1 += 1;
    }
}

/// RecordEntry at the pipeline's rate; five a second are probes, watched
/// once their write returns.
fn pipeline_op(
    ledgers: LedgerClients,
    balances: BalanceClients,
    probes: Arc<Probes>,
    rate: f64,
) -> impl Fn(u64) -> Call + Send + Sync + 'static {
    // Few probes, polled gently: the probes must not become the load they measure.
    let probe_every = ((rate / 5.0).round() as u64).max(1);
    move |i| {
        let mut c = ledgers.get(i);
        let probe = i.is_multiple_of(probe_every);
        let merchant = if probe { format!("probe-{i}") } else { format!("p-{}", i % MERCHANTS) };
        let request = entry(merchant.clone(), format!("pipe-{i}"), WARM_DATE, i);
        let (balances, probes) = (balances.clone(), probes.clone());
        Box::pin(async move {
            let result = c.record_entry(request).await;
            if probe && result.is_ok() {
                let committed = Instant::now();
                probes.counts.lock().expect("lock").0 += 1;
                tokio::spawn(probes.watch(balances, merchant, i, committed));
            }
            load::grpc(result)
        })
    }
}

/// The delay of one pipeline entry in ms: the ledger's commit time to the
/// read model's apply time.
const DELAY_MS: &str =
    "(a.applied_at_micros - (EXTRACT(EPOCH FROM e.created_at) * 1000000)::BIGINT) / 1000.0";
/// The pipeline phase's entries, joined with their apply in the read model.
const PIPELINE_ENTRIES: &str = "FROM ledger_entries e JOIN balance_applied_events a ON a.entry_id = e.id \
     WHERE e.request_id LIKE 'pipe-%'";

/// The delay of every entry of the pipeline phase, in ms.
#[derive(Debug)]
struct EntryDelays {
    n: i64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl EntryDelays {
    async fn of_pipeline(db: &DatabaseConnection) -> anyhow::Result<Self> {
        let sql = format!(
            "SELECT COUNT(*)::BIGINT, \
             (percentile_cont(0.5) WITHIN GROUP (ORDER BY d))::FLOAT8, \
             (percentile_cont(0.99) WITHIN GROUP (ORDER BY d))::FLOAT8, \
             (percentile_cont(0.999) WITHIN GROUP (ORDER BY d))::FLOAT8, MAX(d)::FLOAT8 FROM ( \
             SELECT {DELAY_MS} AS d {PIPELINE_ENTRIES}) t"
        );
        let row =
            db.query_one_raw(Statement::from_string(DbBackend::Postgres, sql)).await?.context("no row")?;
        Ok(Self {
            n: row.try_get_by_index(0)?,
            p50: row.try_get_by_index(1).unwrap_or(0.0),
            p99: row.try_get_by_index(2).unwrap_or(0.0),
            p999: row.try_get_by_index(3).unwrap_or(0.0),
            max: row.try_get_by_index(4).unwrap_or(0.0),
        })
    }
}

/// When in the pipeline phase the slow entries were committed: each second
/// of commit with its entries and its worst delay.
async fn worst_seconds(db: &DatabaseConnection) -> anyhow::Result<Vec<String>> {
    let sql = format!(
        "SELECT to_char(date_trunc('second', e.created_at), 'HH24:MI:SS'), COUNT(*)::BIGINT, \
         MAX({DELAY_MS})::FLOAT8 AS worst {PIPELINE_ENTRIES} GROUP BY 1 ORDER BY 1"
    );
    let rows = db.query_all_raw(Statement::from_string(DbBackend::Postgres, sql)).await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let at: String = r.try_get_by_index(0).ok()?;
            let n: i64 = r.try_get_by_index(1).ok()?;
            let worst: f64 = r.try_get_by_index(2).ok()?;
            Some(format!("{at} {n} entries, worst {worst:.0} ms"))
        })
        .collect())
}

/// The mixed load at `--mixed-rate` while the consolidator is stopped (reads
/// and writes must not depend on it), then the consolidator restarted and
/// timed until it has caught up.
pub(super) async fn mixed_with_consolidator_stopped(b: &mut Bench, t: &mut Targets) -> anyhow::Result<()> {
    t.stop_consolidator(b);
    let rate = b.args.mixed_rate;
    let op = mixed_op(t.ledgers.clone(), t.balances.clone(), "mixed");
    let mixed = b.measure("mixed 20/80, consolidator stopped", b.open(rate), op).await;
    let restart = Instant::now();
    t.start_consolidator(b).await?;
    b.wait_consolidated(Duration::from_secs(600), "catching up").await?;
    let catch_up = restart.elapsed();
    b.report.fact(
        "consolidator restarted after mixed",
        format!(
            "caught up with {} writes in {:.2} s from its spawn (start-up included)",
            mixed.ok / 5,
            catch_up.as_secs_f64()
        ),
    );
    b.report.verdict(
        &format!("{rate:.0} req/s mixed, zero failures, consolidator stopped, then catching up"),
        format!(
            "{:.0}/s served, {} failed, p99 {:.2} ms; caught up in {:.2} s",
            mixed.throughput(),
            mixed.failed(),
            mixed.ms(0.99),
            catch_up.as_secs_f64()
        ),
        mixed.failed() == 0 && mixed.throughput() >= rate * 0.97,
    );
    Ok(())
}

/// A backlog of `--backlog` entries written with the consolidator stopped and
/// published by the relay, then drained by one consolidator started afresh;
/// its rate against the XREADGROUP+XACK ceiling (`read_ceiling`, messages/s).
pub(super) async fn backlog_drain(b: &mut Bench, t: &mut Targets, read_ceiling: f64) -> anyhow::Result<()> {
    t.stop_consolidator(b);
    eprintln!("==> building a backlog of {} entries (consolidator stopped)", b.args.backlog);
    let backlog = Backlog::write(&t.ledgers, b.args.backlog, b.args.concurrency as u64).await?;
    let relay_lag = wait_published(b).await?;
    let before = b.cpu_snapshot();
    let spawn = Instant::now();
    t.start_consolidator(b).await?;
    b.wait_consolidated(Duration::from_secs(3600), "draining").await?;
    let drain = spawn.elapsed();
    let drain_cpu = b.cpu_since(&before);
    let Backlog { n, failed, secs } = backlog;
    let drain_rate = n as f64 / drain.as_secs_f64().max(1e-3);
    b.report.fact(
        "backlog",
        format!(
            "{n} entries written in {secs:.1} s ({:.0}/s, {failed} failed) with the consolidator stopped; relay published them all {:.1} s after the last write",
            n as f64 / secs,
            relay_lag.as_secs_f64()
        ),
    );
    b.report.fact(
        "backlog drain, one consolidator",
        format!(
            "{drain_rate:.0} entries/s ({n} in {:.1} s from the consolidator's spawn, start-up included); {:.0}% of the XREADGROUP+XACK ceiling; CPU {drain_cpu}",
            drain.as_secs_f64(),
            ratio(drain_rate, read_ceiling) * 100.0
        ),
    );
    b.report.verdict(
        "pipeline ≥ 20,000 entries/s consolidated per consolidator",
        format!("{drain_rate:.0} entries/s over a backlog of {n}"),
        drain_rate >= 20_000.0,
    );
    Ok(())
}

/// The entries written for the drain.
#[derive(Debug)]
struct Backlog {
    /// Entries written.
    n: u64,
    /// Entries that still failed after their retries.
    failed: u64,
    /// Seconds the writing took.
    secs: f64,
}

impl Backlog {
    /// About `total` entries from `workers` writers, each its share in turn.
    async fn write(ledgers: &LedgerClients, total: u64, workers: u64) -> anyhow::Result<Self> {
        let start = Instant::now();
        let per_worker = total.div_ceil(workers);
        let fill = (0..workers).map(|w| tokio::spawn(write_share(ledgers.clone(), w, per_worker)));
        let mut failed = 0;
        for f in futures::future::join_all(fill).await {
            failed += f?;
        }
        Ok(Self { n: per_worker * workers - failed, failed, secs: start.elapsed().as_secs_f64() })
    }
}

/// Worker `w`'s share of the backlog, each entry retried up to ten times;
/// how many failed even so. The first worker reports progress.
async fn write_share(ledgers: LedgerClients, w: u64, per_worker: u64) -> u64 {
    let mut failed = 0u64;
    for j in 0..per_worker {
        let i = w * per_worker + j;
        let mut c = ledgers.get(i);
        let request = entry(format!("b-{}", i % MERCHANTS), format!("backlog-{i}"), "2026-11-05", i);
        let mut attempt = 0;
        while c.record_entry(request.clone()).await.is_err() {
            if attempt == 10 {
                failed += 1;
                break;
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if w == 0 && j % (per_worker / 10).max(1) == 0 {
            eprintln!("  [backlog] {:>3.0}% written", j as f64 * 100.0 / per_worker as f64);
        }
    }
    failed
}

/// Waits until the relay has published every entry to the stream; how long
/// after the last write that was.
async fn wait_published(b: &Bench) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while b.count("SELECT COUNT(*) FROM ledger_outbox WHERE published_at IS NULL").await? > 0 {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(600), "the relay did not publish the backlog");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(start.elapsed())
}
