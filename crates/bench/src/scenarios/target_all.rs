//! `--target all`, every target in one process: its idle RSS, then its peak
//! RSS under the mixed load; and the memory and start-up verdicts over every
//! process of the run.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use super::{
    bench::Bench,
    calls::{self, mixed_op, read_warm_set},
};
use crate::report::ProcRow;

/// Starts `--target all`, warms its cache and runs the mixed load on it; its
/// peak RSS in MB.
pub(super) async fn mixed(b: &mut Bench) -> anyhow::Result<f64> {
    let all = b.serve_fresh("all", &[]).await?;
    let ledgers = calls::ledger(&all.grpc, b.args.connections).await?;
    let balances = calls::balance(&all.grpc, b.args.connections).await?;
    read_warm_set(&balances).await?;
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn(sample_peak_rss(all.pid(), peak.clone()));
    let op = mixed_op(ledgers, balances, "all");
    let mixed_all = b.measure("mixed 20/80 on --target all", b.open(b.args.mixed_rate), op).await;
    sampler.abort();
    let peak_mb = peak.load(Ordering::Relaxed) as f64 / 1e6;
    b.report.fact(
        "--target all under mixed",
        format!(
            "peak RSS {peak_mb:.1} MB at {:.0} req/s served ({} failed)",
            mixed_all.throughput(),
            mixed_all.failed()
        ),
    );
    b.stop(all, Duration::from_secs(10));
    Ok(peak_mb)
}

/// Keeps the highest RSS of `pid` in `peak`, sampled every 100 ms, until aborted.
async fn sample_peak_rss(pid: u32, peak: Arc<AtomicU64>) {
    loop {
        if let Some(rss) = crate::procs::rss_of(pid) {
            peak.fetch_max(rss, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Idle RSS of each target in its own process, `--target all`'s peak under
/// mixed, and every process's start to SERVING.
pub(super) fn footprint_verdicts(b: &mut Bench, peak_mb: f64) {
    let procs = &b.report.procs;
    let worst_idle = procs.iter().filter(|p| p.target != "all").map(|p| p.idle_rss_mb).fold(0.0, f64::max);
    let idle = per_target(procs, |p| format!("{:.1} MB", p.idle_rss_mb));
    let slowest = procs.iter().map(|p| p.ready_ms).fold(0.0, f64::max);
    let ready = per_target(procs, |p| format!("{:.0} ms", p.ready_ms));
    b.report.verdict("idle RSS ≤ 50 MB per target", idle, worst_idle <= 50.0);
    b.report.verdict("all ≤ 150 MB under mixed", format!("peak {peak_mb:.1} MB"), peak_mb <= 150.0);
    b.report.verdict("ready (health SERVING) within 1 s of process start", ready, slowest <= 1000.0);
}

/// `<target> <value>` for every process, comma-separated.
fn per_target(procs: &[ProcRow], value: impl Fn(&ProcRow) -> String) -> String {
    procs.iter().map(|p| format!("{} {}", p.target, value(p))).collect::<Vec<_>>().join(", ")
}
