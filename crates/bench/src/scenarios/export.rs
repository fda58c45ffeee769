//! Export: N entries of one merchant, seeded straight into PostgreSQL, read
//! back through ExportEntries (gRPC) and through the REST CSV download, with
//! the rate and each process's peak RSS against its RSS before the export.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use fluxo_proto::ledger_v1::{self as pb, ledger_service_client::LedgerServiceClient};
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client as HttpClient, rt::TokioExecutor};
use sea_orm::ConnectionTrait;
use secrecy::SecretString;

use super::{SECRET, bench::Bench, targets::Targets};
use crate::procs::rss_of;

const MERCHANT: &str = "export-1";

/// One INSERT … SELECT: ids are ULIDs (a fixed prefix and the row number in
/// Crockford base32), dates spread over a year, one in three a debit.
const SEED: &str = "INSERT INTO ledger_entries (id, merchant_id, kind, currency_code, amount_minor, booking_date, \
       description, request_id, created_at) \
     SELECT '01JDEXP0000000' || (SELECT string_agg(substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', \
              ((i >> (5 * (11 - k))) & 31)::int + 1, 1), '' ORDER BY k) FROM generate_series(0, 11) k), \
            $1, CASE WHEN i % 3 = 0 THEN 'DEBIT' ELSE 'CREDIT' END, 'BRL', 100 + i % 100000, \
            DATE '2025-01-01' + (i % 365)::int, 'bench export row', 'x-' || i, now() \
     FROM generate_series(1, $2) i";

/// Peak RSS of some processes while a phase runs, sampled every 50 ms.
struct Peaks {
    stop: Arc<AtomicBool>,
    peaks: Vec<Arc<AtomicU64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Peaks {
    fn watch(pids: &[u32]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks: Vec<Arc<AtomicU64>> = pids.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
        let (s, p, pids) = (stop.clone(), peaks.clone(), pids.to_vec());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                for (pid, peak) in pids.iter().zip(&p) {
                    peak.fetch_max(rss_of(*pid).unwrap_or(0), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Self { stop, peaks, task }
    }

    async fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.peaks.iter().map(|p| p.load(Ordering::Relaxed)).collect()
    }
}

#[allow(clippy::cast_precision_loss)]
fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

#[allow(clippy::cast_precision_loss)]
fn per_sec(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(0.001)
}

pub(super) async fn entries(b: &mut Bench, t: &Targets) -> anyhow::Result<()> {
    let n = b.args.export_entries;
    eprintln!("==> export: seeding {n} entries of one merchant");
    let seeded = Instant::now();
    let statement = sea_orm::Statement::from_sql_and_values(
        sea_orm::DbBackend::Postgres,
        SEED,
        [MERCHANT.into(), i64::try_from(n)?.into()],
    );
    b.db.execute_raw(statement).await.context("seeding the export")?;
    b.db.execute_unprepared("ANALYZE ledger_entries").await?;
    b.report.fact(
        "export: seeding (one INSERT … SELECT generate_series)",
        format!("{n} entries in {:.0} s", seeded.elapsed().as_secs_f64()),
    );

    // gRPC.
    eprintln!("==> export: ExportEntries over gRPC");
    let ledger_pid = t.ledger.pid();
    let before = rss_of(ledger_pid).unwrap_or(0);
    let watch = Peaks::watch(&[ledger_pid]);
    let started = Instant::now();
    let mut client = LedgerServiceClient::connect(format!("http://{}", t.ledger.grpc))
        .await?
        .max_decoding_message_size(64 << 20);
    let request = pb::ExportEntriesRequest { merchant_id: MERCHANT.into(), ..Default::default() };
    let mut stream = client.export_entries(request).await?.into_inner();
    let (mut rows, mut messages) = (0u64, 0u64);
    while let Some(message) = stream.message().await? {
        rows += message.entries.len() as u64;
        messages += 1;
    }
    let took = started.elapsed();
    let peak = watch.finish().await[0];
    anyhow::ensure!(rows == n, "ExportEntries sent {rows} entries of {n}");
    b.report.fact(
        "export: ExportEntries (gRPC)",
        format!(
            "{rows} entries in {messages} messages, {:.1} s: {:.0} rows/s; ledger RSS {:.0} MB before, peak {:.0} MB ({:.2}×)",
            took.as_secs_f64(),
            per_sec(rows, took),
            mb(before),
            mb(peak),
            ratio(peak, before)
        ),
    );
    let grpc_ratio = ratio(peak, before);

    // REST.
    eprintln!("==> export: the CSV download through the gateway");
    let rest = t.gateway.rest.clone().context("the gateway printed no REST address")?;
    let token = fluxo_gateway::auth::TokenSpec {
        valid_for_secs: 24 * 3600,
        ..fluxo_gateway::auth::TokenSpec::admin("fluxo-bench")
    }
    .sign_hs256(&SecretString::from(SECRET.to_owned()), "fluxo", "fluxo-api")?;
    let gateway_pid = t.gateway.pid();
    let (ledger_before, gateway_before) = (rss_of(ledger_pid).unwrap_or(0), rss_of(gateway_pid).unwrap_or(0));
    let watch = Peaks::watch(&[ledger_pid, gateway_pid]);
    let started = Instant::now();
    let http: HttpClient<_, Empty<Bytes>> = HttpClient::builder(TokioExecutor::new()).build_http();
    let request = http::Request::get(format!("http://{rest}/v1/merchants/{MERCHANT}/entries:export"))
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Empty::<Bytes>::new())?;
    let response = http.request(request).await?;
    anyhow::ensure!(response.status() == 200, "the download answered {}", response.status());
    let mut body = response.into_body();
    let (mut lines, mut bytes) = (0u64, 0u64);
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            bytes += data.len() as u64;
            lines += data.iter().filter(|&&c| c == b'\n').count() as u64;
        }
    }
    let took = started.elapsed();
    let peaks = watch.finish().await;
    // The description holds no line break: a line per row, plus the header.
    anyhow::ensure!(lines == n + 1, "the download held {lines} lines for {n} entries");
    b.report.fact(
        "export: CSV download (REST, through the gateway)",
        format!(
            "{n} rows, {:.0} MB, {:.1} s: {:.0} rows/s; gateway RSS {:.0} → peak {:.0} MB ({:.2}×), ledger {:.0} → {:.0} MB ({:.2}×)",
            mb(bytes),
            took.as_secs_f64(),
            per_sec(n, took),
            mb(gateway_before),
            mb(peaks[1]),
            ratio(peaks[1], gateway_before),
            mb(ledger_before),
            mb(peaks[0]),
            ratio(peaks[0], ledger_before)
        ),
    );
    let worst = grpc_ratio.max(ratio(peaks[1], gateway_before)).max(ratio(peaks[0], ledger_before));
    b.report.verdict(
        "export memory bounded: peak RSS ≤ 2× RSS before, whatever N",
        format!("worst {worst:.2}× over {n} entries"),
        worst <= 2.0,
    );
    Ok(())
}

#[allow(clippy::cast_precision_loss, clippy::float_arithmetic)]
fn ratio(peak: u64, before: u64) -> f64 {
    peak as f64 / (before.max(1) as f64)
}
