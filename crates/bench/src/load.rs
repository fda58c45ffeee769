//! The load generator: open loop at a constant arrival rate (latency counted
//! from the intended send time, so a slow server cannot hide its queueing:
//! no coordinated omission) or closed loop at a fixed concurrency (to find
//! the maximum), both recording into HDR histograms.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hdrhistogram::Histogram;
use tokio::{sync::Semaphore, time::Instant};

/// What one request came to.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Served.
    Ok,
    /// Refused by load shedding: RESOURCE_EXHAUSTED or HTTP 429.
    Shed,
    /// Anything else, with a short description.
    Error(String),
}

/// How requests are sent.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Mode {
    /// `concurrency` callers, each sending its next request when the last one returns.
    Closed { concurrency: usize },
    /// A constant arrival rate per second; at most `max_in_flight` outstanding (beyond
    /// that, sends wait, and their wait counts in their latency).
    Open { rate: f64, max_in_flight: usize },
}

/// What a run measured.
#[derive(Debug, Clone)]
pub(crate) struct Stats {
    pub(crate) label: String,
    pub(crate) mode: Mode,
    pub(crate) ok: u64,
    pub(crate) shed: u64,
    pub(crate) errors: u64,
    /// Failed calls by cause.
    pub(crate) causes: BTreeMap<String, u64>,
    /// Latency of served requests, microseconds.
    pub(crate) latency: Histogram<u64>,
    /// Latency of shed requests, microseconds.
    pub(crate) shed_latency: Histogram<u64>,
    pub(crate) elapsed: Duration,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

impl Stats {
    /// Served requests per second.
    pub(crate) fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A latency quantile of served requests, in milliseconds.
    pub(crate) fn ms(&self, q: f64) -> f64 {
        if self.latency.is_empty() { 0.0 } else { self.latency.value_at_quantile(q) as f64 / 1000.0 }
    }

    pub(crate) fn shed_ms(&self, q: f64) -> f64 {
        if self.shed_latency.is_empty() {
            0.0
        } else {
            self.shed_latency.value_at_quantile(q) as f64 / 1000.0
        }
    }

    pub(crate) fn failed(&self) -> u64 {
        self.shed + self.errors
    }

    /// One line for the console.
    pub(crate) fn line(&self) -> String {
        let mode = match self.mode {
            Mode::Closed { concurrency } => format!("closed c={concurrency}"),
            Mode::Open { rate, .. } => format!("open {rate:.0}/s"),
        };
        let mut s = format!(
            "{:<28} {:<16} {:>9.0}/s  p50 {:>7.2} ms  p99 {:>7.2} ms  p999 {:>7.2} ms  ok {} shed {} errors {}",
            self.label,
            mode,
            self.throughput(),
            self.ms(0.5),
            self.ms(0.99),
            self.ms(0.999),
            self.ok,
            self.shed,
            self.errors
        );
        if !self.causes.is_empty() {
            let mut causes: Vec<_> = self.causes.iter().collect();
            causes.sort_by(|a, b| b.1.cmp(a.1));
            let top: Vec<String> = causes.iter().take(3).map(|(cause, n)| format!("{n}× {cause}")).collect();
            let more = causes.len().saturating_sub(3);
            s.push_str(&format!(
                "  (errors: {}{})",
                top.join("; "),
                if more > 0 { format!("; {more} more causes") } else { String::new() }
            ));
        }
        s
    }
}

/// What the requests of a run came to, shared by its senders.
#[derive(Debug)]
struct Tally {
    sent: AtomicU64,
    ok: AtomicU64,
    shed: AtomicU64,
    errors: AtomicU64,
    recorder: Mutex<Recorder>,
}

#[derive(Debug)]
struct Recorder {
    latency: Histogram<u64>,
    shed_latency: Histogram<u64>,
    causes: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> Self {
        Self {
            sent: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            recorder: Mutex::new(Recorder {
                latency: histogram(),
                shed_latency: histogram(),
                causes: BTreeMap::new(),
            }),
        }
    }

    /// Counts `outcome` and records its latency (served or shed) or its cause (an error).
    fn record(&self, outcome: Outcome, took: Duration) {
        match outcome {
            Outcome::Ok => &self.ok,
            Outcome::Shed => &self.shed,
            Outcome::Error(_) => &self.errors,
        }
        .fetch_add(1, Ordering::Relaxed);
        let mut r = self.recorder.lock().expect("recorder lock");
        match outcome {
            Outcome::Ok => r.latency.saturating_record(micros(took)),
            Outcome::Shed => r.shed_latency.saturating_record(micros(took)),
            Outcome::Error(e) => *r.causes.entry(e).or_default() += 1,
        }
    }

    fn stats(&self, label: &str, mode: Mode, elapsed: Duration) -> Stats {
        let r = self.recorder.lock().expect("recorder lock");
        Stats {
            label: label.to_owned(),
            mode,
            ok: self.ok.load(Ordering::Relaxed),
            shed: self.shed.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            causes: r.causes.clone(),
            latency: r.latency.clone(),
            shed_latency: r.shed_latency.clone(),
            elapsed,
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).clamp(1, 60_000_000)
}

/// Longest a single request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `op(i)` for request `i` in `mode` for `duration`, showing progress on stderr.
pub(crate) async fn run<F, Fut>(label: &str, mode: Mode, duration: Duration, op: F) -> Stats
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let op = Arc::new(op);
    let tally = Arc::new(Tally::new());
    let progress = tokio::spawn(progress(label.to_owned(), tally.clone()));
    let start = Instant::now();
    match mode {
        Mode::Closed { concurrency } => closed(op, &tally, concurrency, start + duration).await,
        Mode::Open { rate, max_in_flight } => open(op, &tally, rate, max_in_flight, start, duration).await,
    }
    let elapsed = start.elapsed();
    progress.abort();
    tally.stats(label, mode, elapsed)
}

/// Every second: what has been sent and what came of it.
async fn progress(label: String, tally: Arc<Tally>) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        eprintln!(
            "  [{label}] {:>3.0}s sent {} ok {} shed {} errors {}",
            start.elapsed().as_secs_f64(),
            tally.sent.load(Ordering::Relaxed),
            tally.ok.load(Ordering::Relaxed),
            tally.shed.load(Ordering::Relaxed),
            tally.errors.load(Ordering::Relaxed)
        );
    }
}

/// `concurrency` callers, each sending its next request when the last one returns, until `deadline`.
async fn closed<F, Fut>(op: Arc<F>, tally: &Arc<Tally>, concurrency: usize, deadline: Instant)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let workers = (0..concurrency).map(|_| {
        let op = op.clone();
        let tally = tally.clone();
        tokio::spawn(async move {
            while Instant::now() < deadline {
                let i = tally.sent.fetch_add(1, Ordering::Relaxed);
                let sent = Instant::now();
                let outcome = timed(op(i)).await;
                tally.record(outcome, sent.elapsed());
            }
        })
    });
    for w in futures::future::join_all(workers).await {
        w.expect("load worker panicked");
    }
}

/// Request `i` sent at `start + i / rate` whatever came of the earlier ones
/// (at most `max_in_flight` outstanding), then waits for the last answers.
async fn open<F, Fut>(
    op: Arc<F>,
    tally: &Arc<Tally>,
    rate: f64,
    max_in_flight: usize,
    start: Instant,
    duration: Duration,
) where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let total = (rate * duration.as_secs_f64()).round() as u64;
    for i in 0..total {
        let intended = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(intended).await;
        let permit = permits.clone().acquire_owned().await.expect("semaphore open");
        tally.sent.fetch_add(1, Ordering::Relaxed);
        let op = op.clone();
        let tally = tally.clone();
        tokio::spawn(async move {
            let outcome = timed(op(i)).await;
            // From the intended send time: waiting for a permit counts.
            tally.record(outcome, intended.elapsed());
            drop(permit);
        });
    }
    let all = u32::try_from(max_in_flight).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(REQUEST_TIMEOUT * 2, permits.acquire_many(all)).await;
}

async fn timed(f: impl Future<Output = Outcome>) -> Outcome {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Error(format!("no answer within {REQUEST_TIMEOUT:?}")),
    }
}

/// Any other result as an outcome: there is no shedding to tell apart.
pub(crate) fn outcome<T, E: std::fmt::Display>(result: Result<T, E>) -> Outcome {
    match result {
        Ok(_) => Outcome::Ok,
        Err(e) => Outcome::Error(e.to_string()),
    }
}

/// A gRPC status as an outcome.
pub(crate) fn grpc<T>(result: Result<T, tonic::Status>) -> Outcome {
    match result {
        Ok(_) => Outcome::Ok,
        Err(s) if s.code() == tonic::Code::ResourceExhausted => Outcome::Shed,
        Err(s) => {
            // The causes too: "transport error" alone does not say what closed the connection.
            let mut text = format!("{:?}: {}", s.code(), s.message());
            let mut cause = std::error::Error::source(&s);
            while let Some(error) = cause {
                text.push_str(&format!(": {error}"));
                cause = error.source();
            }
            Outcome::Error(text)
        }
    }
}
