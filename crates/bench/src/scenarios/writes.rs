//! Writes: RecordEntry at the run's concurrency against single-row INSERTs,
//! by one caller and through ghz against pgbench's figures, and at three
//! times its maximum.

use std::time::Duration;

use anyhow::Context as _;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};

use super::{
    WARM_DATE,
    bench::Bench,
    calls::{self, ratio, record_op},
    ceilings::PgYardstick,
    targets::Targets,
};
use crate::{
    ghz::GhzStats,
    load::{Mode, Stats},
};
use fluxo_proto::ledger_v1::{self as lpb, batch_record_result::Outcome};

/// RecordEntry in a closed loop: the maximum, the WAL it writes per entry,
/// and the verdict against single-row INSERTs at the same concurrency.
pub(super) async fn record(b: &mut Bench, t: &Targets, insert: &Stats) -> anyhow::Result<Stats> {
    let wal_before = wal_bytes(&b.db).await?;
    let record = b.measure("record (RecordEntry)", b.closed(), record_op(t.ledgers.clone(), "rec")).await;
    let wal = wal_bytes(&b.db).await?.saturating_sub(wal_before);
    b.report.fact(
        "WAL per booked entry (whole pipeline: ledger, relay, consolidator)",
        format!("{:.0} bytes ({wal} bytes for {} entries)", wal as f64 / record.ok.max(1) as f64, record.ok),
    );
    let record_ratio = ratio(record.throughput(), insert.throughput());
    b.report.verdict(
        "record ≥ 1.0× single-row INSERT at the same concurrency",
        format!("{:.0}/s vs {:.0}/s: {record_ratio:.2}×", record.throughput(), insert.throughput()),
        record_ratio >= 1.0 && record.errors == 0,
    );
    b.wait_consolidated(Duration::from_secs(600), "after record").await?;
    Ok(record)
}

/// RecordEntry by one caller, then through ghz; ghz's figures against
/// pgbench's when both ran.
pub(super) async fn one_caller_and_ghz(
    b: &mut Bench,
    t: &Targets,
    pg: Option<PgYardstick>,
) -> anyhow::Result<()> {
    one_caller(b, &t.ledger.grpc).await?;
    if let (Some((one, many)), Some(pg)) = (through_ghz(b, &t.ledger.grpc)?, pg) {
        against_pgbench(b, &one, &many, &pg);
    }
    b.wait_consolidated(Duration::from_secs(600), "after record by one caller and ghz").await?;
    Ok(())
}

/// RecordEntry as an internal caller sends it, one call at a time on one
/// connection: a transport stall such as Nagle's algorithm shows here, never
/// with many callers.
async fn one_caller(b: &mut Bench, addr: &str) -> anyhow::Result<()> {
    let one = calls::ledger(addr, 1).await?;
    let single = b
        .measure("record, one caller (RecordEntry)", Mode::Closed { concurrency: 1 }, record_op(one, "one"))
        .await;
    b.report.fact(
        "record, one caller on one connection (fluxo-bench)",
        format!("p50 {:.2} ms, p99 {:.2} ms, {:.0}/s", single.ms(0.5), single.ms(0.99), single.throughput()),
    );
    Ok(())
}

/// RecordEntry through ghz (grpc-go): one caller, then the run's callers and
/// connections. `None` without ghz.
fn through_ghz(b: &mut Bench, addr: &str) -> anyhow::Result<Option<(GhzStats, GhzStats)>> {
    let Some(ghz) = crate::ghz::binary() else {
        eprintln!("fluxo-bench: warning: FLUXO_TEST_GHZ is not set; skipping the ghz runs");
        return Ok(None);
    };
    let data = format!(
        r#"{{"merchantId":"ghz-{{{{.WorkerID}}}}","type":"CREDIT","amount":{{"currencyCode":"BRL","minorUnits":"100"}},"bookingDate":"{WARM_DATE}","requestId":"ghz-{{{{newUUID}}}}"}}"#
    );
    let call = "fluxo.ledger.v1.LedgerService/RecordEntry";
    let mut run = |callers: usize, connections: usize| -> anyhow::Result<GhzStats> {
        eprintln!("==> record through ghz ({callers} callers, {connections} connections)");
        let s = crate::ghz::run(&ghz, addr, call, &data, callers, connections, b.duration)?;
        b.report.fact(
            &format!("record through ghz, {callers} caller(s) over {connections} connection(s)"),
            format!(
                "{:.0}/s, p50 {:.2} ms, p99 {:.2} ms, {} ok, failed: {}",
                s.rps,
                s.p50_ms,
                s.p99_ms,
                s.ok,
                if s.failed.is_empty() { "none" } else { &s.failed }
            ),
        );
        Ok(s)
    };
    let one = run(1, 1)?;
    let many = run(b.args.concurrency, b.args.connections)?;
    Ok(Some((one, many)))
}

/// ghz's RecordEntry, one caller and many, against pgbench's INSERTs.
fn against_pgbench(b: &mut Bench, one: &GhzStats, many: &GhzStats, pg: &PgYardstick) {
    let r = ratio(many.rps, pg.one_row.tps);
    b.report.verdict(
        &format!(
            "durable RecordEntry through ghz ({} callers) ≥ 0.5× pgbench one-row INSERT",
            b.args.concurrency
        ),
        format!("{:.0}/s vs {:.0}/s: {r:.2}×", many.rps, pg.one_row.tps),
        r >= 0.5,
    );
    b.report.fact(
        "RecordEntry through ghz vs pgbench booking fluxo's rows a transaction per entry",
        format!("{:.0}/s vs {:.0}/s: {:.2}×", many.rps, pg.entry.tps, ratio(many.rps, pg.entry.tps)),
    );
    let r = ratio(one.p50_ms, pg.round_trip.latency_ms);
    b.report.verdict(
        "single-caller RecordEntry p50 (ghz) ≤ 2× one INSERT round trip (pgbench, 1 client)",
        format!("{:.2} ms vs {:.2} ms: {r:.1}×", one.p50_ms, pg.round_trip.latency_ms),
        r <= 2.0,
    );
}

/// RecordEntry at three times the maximum `record` measured, without a
/// client-side cap on outstanding requests: goodput, and how fast the excess
/// is shed.
pub(super) async fn overload(b: &mut Bench, t: &Targets, record: &Stats) {
    let over_rate = 3.0 * record.throughput();
    let over = b
        .measure(
            &format!("overload: record at 3× max ({over_rate:.0}/s)"),
            Mode::Open { rate: over_rate, max_in_flight: 100_000 },
            record_op(t.ledgers.clone(), "over"),
        )
        .await;
    let goodput = ratio(over.throughput(), record.throughput());
    b.report.verdict(
        "overload goodput ≥ 80% of max, excess shed quickly",
        format!(
            "{:.0}/s served = {:.0}% of {:.0}/s; {} shed (p99 {:.2} ms), {} other errors",
            over.throughput(),
            goodput * 100.0,
            record.throughput(),
            over.shed,
            over.shed_ms(0.99),
            over.errors
        ),
        goodput >= 0.8,
    );
    b.wait_consolidated(Duration::from_secs(600), "after overload").await.ok();
}

/// WAL written by the whole PostgreSQL server so far.
async fn wal_bytes(db: &DatabaseConnection) -> anyhow::Result<u64> {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT wal_bytes::bigint FROM pg_stat_wal".to_owned(),
        ))
        .await?
        .context("pg_stat_wal returned nothing")?;
    Ok(u64::try_from(row.try_get_by_index::<i64>(0)?).unwrap_or(0))
}

/// Entries per BatchRecordEntries call in the bulk-import phase (what
/// `fluxo entries import` sends by default).
const IMPORT_BATCH: u64 = 500;
/// Import calls in flight (the CLI's default).
const IMPORT_CALLS: usize = 4;

/// Bulk import: BatchRecordEntries of 500 entries, 4 calls in flight (as
/// `fluxo entries import` sends them), in entries per second against the
/// single-call record path, the single-row INSERT ceiling and pgbench's
/// one-row INSERT.
pub(super) async fn bulk_import(
    b: &mut Bench,
    t: &Targets,
    record: &Stats,
    insert: &Stats,
    pg: Option<PgYardstick>,
) -> anyhow::Result<()> {
    let clients = t.ledgers.clone();
    let op = move |i: u64| {
        let mut c = clients.get(i);
        let merchant = format!("imp-{}", i % 16);
        let requests = (0..IMPORT_BATCH)
            .map(|j| {
                let n = i * IMPORT_BATCH + j;
                // Backdated history, one day per call, as an import of old files.
                let mut e = calls::entry(String::new(), format!("imp-{n}"), "2026-01-01", n);
                e.booking_date = format!("2025-{:02}-{:02}", 1 + i % 12, 1 + i % 28);
                e
            })
            .collect();
        let request = lpb::BatchRecordEntriesRequest { merchant_id: merchant, requests };
        Box::pin(async move {
            match c.batch_record_entries(request).await {
                Ok(r) if r.get_ref().results.iter().all(|r| r.outcome == Outcome::Booked as i32) => {
                    crate::load::Outcome::Ok
                }
                Ok(_) => crate::load::Outcome::Error("an entry of the batch was not booked".into()),
                Err(status) => crate::load::grpc::<()>(Err(status)),
            }
        }) as calls::Call
    };
    let label = format!("bulk import (BatchRecordEntries × {IMPORT_BATCH}, {IMPORT_CALLS} in flight)");
    let stats = b.measure(&label, Mode::Closed { concurrency: IMPORT_CALLS }, op).await;
    let entries = stats.throughput() * IMPORT_BATCH as f64;
    b.report.fact(
        "bulk import, entries per second",
        format!("{entries:.0}/s ({} calls, {} errors)", stats.ok, stats.errors),
    );
    b.report.fact(
        "bulk import ÷ single-call RecordEntry",
        format!(
            "{entries:.0}/s vs {:.0}/s: {:.2}×",
            record.throughput(),
            ratio(entries, record.throughput())
        ),
    );
    b.report.fact(
        "bulk import ÷ single-row INSERT ceiling (fluxo-bench's client)",
        format!(
            "{entries:.0}/s vs {:.0}/s: {:.2}×",
            insert.throughput(),
            ratio(entries, insert.throughput())
        ),
    );
    if let Some(pg) = pg {
        let r = ratio(entries, pg.one_row.tps);
        b.report.verdict(
            "bulk import ≥ 1.5× pgbench one-row INSERT, in entries/s",
            format!("{entries:.0}/s vs {:.0}/s: {r:.2}×", pg.one_row.tps),
            r >= 1.5 && stats.errors == 0,
        );
    }
    b.wait_consolidated(Duration::from_secs(600), "after bulk import").await?;
    Ok(())
}
