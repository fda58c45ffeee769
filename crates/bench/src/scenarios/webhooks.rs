//! Webhooks: one notifier delivering to an HTTPS receiver run by the bench
//! (the suite's certificate; HTTP/1.1 kept alive, as the notifier keeps its
//! connections). How many deliveries per second one notifier sends
//! when a backlog waits (its subscriptions paused, then resumed), then the
//! delay from an entry's commit to its delivery at a steady write rate it
//! keeps up with.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use fluxo_proto::webhooks_v1::{self as wpb, webhook_service_client::WebhookServiceClient};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

use super::{
    WARM_DATE,
    bench::Bench,
    calls::{Call, LedgerClients, entry},
    targets::Targets,
};
use crate::load;

/// Merchants with a subscription each.
const HOOKED: u64 = 8;

/// What the receiver saw.
#[derive(Default)]
struct Seen {
    count: AtomicU64,
    /// Commit → receipt, microseconds.
    delays: Mutex<Option<Histogram<u64>>>,
}

impl Seen {
    fn record(&self, body: &[u8]) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let created = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| chrono::DateTime::parse_from_rfc3339(v["data"]["createdAt"].as_str()?).ok());
        if let Some(created) = created {
            let micros =
                (chrono::Utc::now() - created.with_timezone(&chrono::Utc)).num_microseconds().unwrap_or(0);
            let mut delays = self.delays.lock().expect("lock");
            let h = delays.get_or_insert_with(|| Histogram::new(3).expect("histogram"));
            let _ = h.record(u64::try_from(micros).unwrap_or(0));
        }
    }

    fn take(&self) -> (u64, Option<Histogram<u64>>) {
        (self.count.swap(0, Ordering::Relaxed), self.delays.lock().expect("lock").take())
    }
}

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name)
        .with_context(|| format!("{name} is not set: run the benchmark with ./scripts/bench.sh"))
}

/// An HTTPS receiver on loopback answering 200 to every POST.
async fn receiver(seen: Arc<Seen>) -> anyhow::Result<u16> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs = CertificateDer::pem_file_iter(env("FLUXO_TEST_TLS_CERT")?)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(env("FLUXO_TEST_TLS_KEY")?)?;
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            // As web servers do (nginx's tcp_nodelay, Go's default): without it, the answer
            // waits behind the TLS 1.3 session tickets for the client's delayed ACK (~40 ms).
            let _ = tcp.set_nodelay(true);
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service =
                    hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let body =
                                request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            seen.record(&body);
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                bytes::Bytes::from_static(b"ok"),
                            )))
                        }
                    });
                let io = hyper_util::rt::TokioIo::new(tls);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    Ok(port)
}

/// Where a steady phase's delay went (its entries' request ids start with `prefix`), by the notifier's own records: the
/// entry's commit (`createdAt` in the body) to the delivery being made
/// (fan-out), to its first attempt starting (claim), the attempt itself, and
/// commit to the 2xx recorded.
async fn stages(b: &Bench, prefix: &str) -> anyhow::Result<String> {
    let sql = format!(
        "WITH d AS (SELECT d.created_at AS made, d.delivered_at, (d.payload::json->'data'->>'createdAt')::timestamptz AS committed, \
                      a.at AS tried, a.duration_ms \
               FROM webhook_deliveries d JOIN webhook_delivery_attempts a ON a.delivery_id = d.id AND a.attempt = 1 \
               WHERE d.payload::json->'data'->>'requestId' LIKE '{prefix}-%' AND d.delivered_at IS NOT NULL) \
               SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM made - committed) * 1000), \
                      percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM tried - made) * 1000), \
                      percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY duration_ms), \
                      percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM delivered_at - committed) * 1000), \
                      COUNT(*) FROM d"
    );
    let row = sea_orm::ConnectionTrait::query_one_raw(
        &b.db,
        sea_orm::Statement::from_string(sea_orm::DbBackend::Postgres, sql),
    )
    .await?
    .context("no row")?;
    let pair = |i: usize| -> anyhow::Result<String> {
        let v: Vec<f64> = row.try_get_by_index(i)?;
        Ok(format!("{:.1} / {:.1}", v.first().copied().unwrap_or(0.0), v.get(1).copied().unwrap_or(0.0)))
    };
    let n: i64 = row.try_get_by_index(4)?;
    Ok(format!(
        "commit → delivery made {}; → first attempt {}; the attempt {}; commit → 2xx recorded {}; over {n} deliveries",
        pair(0)?,
        pair(1)?,
        pair(2)?,
        pair(3)?
    ))
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Waits until the receiver has seen `n` deliveries since the last take.
async fn received(seen: &Seen, n: u64, within: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while seen.count.load(Ordering::Relaxed) < n {
        anyhow::ensure!(
            started.elapsed() < within,
            "webhooks: {} of {n} deliveries arrived within {within:?}",
            seen.count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(started.elapsed())
}

fn write_op(ledgers: LedgerClients, prefix: &'static str) -> impl Fn(u64) -> Call + Send + Sync + 'static {
    move |i| {
        let mut c = ledgers.get(i);
        let request = entry(format!("hook-{}", i % HOOKED), format!("{prefix}-{i}"), WARM_DATE, i);
        Box::pin(async move { load::grpc(c.record_entry(request).await) })
    }
}

/// The webhook phase: a notifier started for it, a subscription per hooked merchant.
pub(super) async fn deliveries(b: &mut Bench, t: &Targets) -> anyhow::Result<()> {
    let seen = Arc::new(Seen::default());
    let port = receiver(seen.clone()).await?;
    let notifier =
        b.serve("notifier", &[("FLUXO_WEBHOOKS__CA_FILE".to_owned(), env("FLUXO_TEST_TLS_CA")?)]).await?;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", t.ledger.grpc))?.connect().await?;
    let mut hooks = WebhookServiceClient::new(channel);
    let mut ids = Vec::new();
    for m in 0..HOOKED {
        let created = hooks
            .create_subscription(wpb::CreateSubscriptionRequest {
                merchant_id: format!("hook-{m}"),
                endpoint_url: format!("https://localhost:{port}/fluxo"),
                event_types: vec!["entry.recorded".into(), "entry.reversed".into()],
                description: "bench".into(),
                request_id: format!("bench-hook-{m}"),
            })
            .await?
            .into_inner();
        ids.push((format!("hook-{m}"), created.subscription.context("a subscription")?.id));
    }

    // A backlog: subscriptions paused while entries are booked, then resumed.
    for (merchant, id) in &ids {
        hooks
            .pause_subscription(wpb::PauseSubscriptionRequest {
                merchant_id: merchant.clone(),
                subscription_id: id.clone(),
            })
            .await?;
    }
    let backlog = b
        .measure("webhooks: backlog booked while paused", b.closed(), write_op(t.ledgers.clone(), "held"))
        .await;
    let waiting = backlog.ok;
    // Every entry's delivery is made (fanned out) before the clock starts.
    let started = Instant::now();
    loop {
        let pending: i64 = sea_orm::ConnectionTrait::query_one_raw(
            &b.db,
            sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'HELD'".to_owned(),
            ),
        )
        .await?
        .map(|r| r.try_get_by_index(0))
        .transpose()?
        .unwrap_or(0);
        if u64::try_from(pending).unwrap_or(0) >= waiting {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "webhooks: the backlog's deliveries were not made"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu = b.cpu_snapshot();
    for (merchant, id) in &ids {
        hooks
            .resume_subscription(wpb::ResumeSubscriptionRequest {
                merchant_id: merchant.clone(),
                subscription_id: id.clone(),
            })
            .await?;
    }
    let drained = received(&seen, waiting, Duration::from_secs(600)).await?;
    let used = b.cpu_since(&cpu);
    let (count, _) = seen.take();
    let capacity = count as f64 / drained.as_secs_f64();
    let in_flight = std::env::var("FLUXO_BENCH_SET_FLUXO_WEBHOOKS__CONCURRENCY")
        .map_or_else(|_| "the default attempts".to_owned(), |n| format!("{n} attempts"));
    b.report.fact(
        &format!("webhook deliveries per second, one notifier draining a backlog ({in_flight} in flight, connections kept)"),
        format!("{capacity:.0}/s: {count} deliveries in {:.1} s; CPU {used}", drained.as_secs_f64()),
    );

    // Steady rates one notifier keeps up with (a quarter and a half of what it
    // drained, at most the pipeline's rate; the ledger and the consolidator
    // now share the machine with it): the delay from the ledger's commit to
    // the receiver is then the path's, not a queue's.
    for (share, prefix) in [(0.25, "hook-q"), (0.5, "hook-h")] {
        let rate = b.args.pipeline_rate.min(capacity * share).max(1.0);
        let steady = b
            .measure(
                &format!("webhooks: writes at {rate:.0}/s ({share} of the drain), one delivery each"),
                b.open(rate),
                write_op(t.ledgers.clone(), prefix),
            )
            .await;
        received(&seen, steady.ok, Duration::from_secs(300)).await?;
        let (count, delays) = seen.take();
        let at = format!("at {:.0} writes/s", steady.throughput());
        if let Some(h) = delays {
            b.report.fact(
                &format!(
                    "webhook delay {at}, commit → HTTPS receiver (one notifier, {HOOKED} subscriptions)"
                ),
                format!(
                    "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {count} deliveries",
                    ms(&h, 0.5),
                    ms(&h, 0.99),
                    h.max() as f64 / 1000.0,
                ),
            );
        }
        b.report.fact(
            &format!("webhook delay {at} by stage, from the delivery rows (p50 / p99 ms)"),
            stages(b, prefix).await?,
        );
    }

    b.stop(notifier, Duration::from_secs(10));
    Ok(())
}
