//! Observability end to end, against the built binary: an OTLP/gRPC receiver
//! of the test's own (the collector's TraceService and MetricsService) on
//! 127.0.0.1:0, and fluxo processes pointed at it with the standard `OTEL_*`
//! variables — one ledger, one consolidator, one balance, over PostgreSQL and
//! a password-protected Redis, the way they run in Kubernetes.
//!
//! What a user of the telemetry cares about:
//! - one RecordEntry can be followed across the asynchronous hop: the ledger's
//!   spans continue the caller's trace, and the relay batch and the
//!   consolidator batch that carried the entry link to that trace, with the
//!   cache invalidation under the consolidator's span ([`JOURNEY`]);
//! - the metrics that drive alerts arrive with plausible values;
//! - log lines are JSON with trace ids;
//! - no secret (database or Redis password, collector token) appears in
//!   anything the processes print or export.

use std::{
    collections::HashMap,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fluxo_proto::{
    balance_v1::{self as bpb, balance_service_client::BalanceServiceClient},
    ledger_v1::{self as lpb, ledger_service_client::LedgerServiceClient},
};
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::{AnyValue, KeyValue, any_value},
    metrics::v1::{metric::Data, number_data_point},
};
use tokio_stream::wrappers::TcpListenerStream;

use crate::{pipeline::Install, support::fluxo_command};

const PG_PASSWORD: &str = "pg-Secret-7f3a91";
const REDIS_PASSWORD: &str = "redis-Secret-c20e55";
const COLLECTOR_TOKEN: &str = "otlp-Token-9b14d2";
const JWT_SECRET: &str = "jwt-Secret-for-the-telemetry-test-7c1e";

// ---------------------------------------------------------------------------
// The receiver: keeps every export request it is sent.

#[derive(Clone, Default)]
struct Received {
    traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    /// `authorization` headers the exporters sent.
    authorizations: Arc<Mutex<Vec<String>>>,
}

impl Received {
    fn note_auth<T>(&self, request: &tonic::Request<T>) {
        if let Some(v) = request.metadata().get("authorization").and_then(|v| v.to_str().ok()) {
            self.authorizations.lock().unwrap().push(v.to_owned());
        }
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.note_auth(&request);
        self.traces.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl MetricsService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.note_auth(&request);
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

/// Starts the receiver; returns its endpoint URL.
async fn start_receiver(received: Received) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received.clone()))
            .add_service(MetricsServiceServer::new(received))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

// ---------------------------------------------------------------------------
// What was received, flattened for assertions.

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect()
}

fn service_of(resource: &Option<opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .as_ref()
        .map(|r| attributes(&r.attributes))
        .unwrap_or_default()
        .remove("service.name")
        .unwrap_or_default()
}

#[derive(Debug, Clone)]
struct SpanRec {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    /// (trace id, span id, link attributes)
    links: Vec<(String, String, HashMap<String, String>)>,
    attributes: HashMap<String, String>,
}

fn spans(received: &Received) -> Vec<SpanRec> {
    let requests = received.traces.lock().unwrap();
    let mut out = Vec::new();
    for request in requests.iter() {
        for rs in &request.resource_spans {
            let service = service_of(&rs.resource);
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    out.push(SpanRec {
                        service: service.clone(),
                        name: s.name.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        links: s
                            .links
                            .iter()
                            .map(|l| (hex(&l.trace_id), hex(&l.span_id), attributes(&l.attributes)))
                            .collect(),
                        attributes: attributes(&s.attributes),
                    });
                }
            }
        }
    }
    out
}

/// One data point: a gauge's or counter's value, or a histogram's count and sum.
#[derive(Debug, Clone)]
struct Point {
    service: String,
    metric: String,
    unit: String,
    attributes: HashMap<String, String>,
    value: f64,
    count: u64,
    sum: f64,
}

fn number(value: &Option<number_data_point::Value>) -> f64 {
    match value {
        Some(number_data_point::Value::AsDouble(d)) => *d,
        Some(number_data_point::Value::AsInt(i)) => *i as f64,
        None => f64::NAN,
    }
}

fn points(received: &Received) -> Vec<Point> {
    let requests = received.metrics.lock().unwrap();
    let mut out = Vec::new();
    for request in requests.iter() {
        for rm in &request.resource_metrics {
            let service = service_of(&rm.resource);
            for sm in &rm.scope_metrics {
                for m in &sm.metrics {
                    let point = |attrs: &[KeyValue], value: f64, count: u64, sum: f64| Point {
                        service: service.clone(),
                        metric: m.name.clone(),
                        unit: m.unit.clone(),
                        attributes: attributes(attrs),
                        value,
                        count,
                        sum,
                    };
                    match &m.data {
                        Some(Data::Gauge(g)) => out.extend(
                            g.data_points.iter().map(|p| point(&p.attributes, number(&p.value), 0, 0.0)),
                        ),
                        Some(Data::Sum(s)) => out.extend(
                            s.data_points.iter().map(|p| point(&p.attributes, number(&p.value), 0, 0.0)),
                        ),
                        Some(Data::Histogram(h)) => out.extend(
                            h.data_points
                                .iter()
                                .map(|p| point(&p.attributes, f64::NAN, p.count, p.sum.unwrap_or(0.0))),
                        ),
                        _ => {}
                    }
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The journey of one entry, as hops to find. Later hops (the REST gateway's
// span in front of the ledger) are one more line in JOURNEY.

/// How a hop relates to the caller's trace.
#[derive(Debug, Clone, Copy)]
enum Relation {
    /// A span of the caller's trace, whose parent is the named hop's span
    /// (`None`: the caller's own span).
    ChildOf(Option<&'static str>),
    /// A span of another trace with a span link to a span of the caller's trace.
    LinkedToCaller,
    /// A span whose parent is the named hop's span, in that span's trace.
    Under(&'static str),
}

#[derive(Debug, Clone, Copy)]
struct Hop {
    service: &'static str,
    span: &'static str,
    relation: Relation,
}

const JOURNEY: &[Hop] = &[
    Hop {
        service: "fluxo-gateway",
        span: "POST /v1/merchants/{merchant_id}/entries",
        relation: Relation::ChildOf(None),
    },
    Hop {
        service: "fluxo-ledger",
        span: "fluxo.ledger.v1.LedgerService/RecordEntry",
        relation: Relation::ChildOf(Some("POST /v1/merchants/{merchant_id}/entries")),
    },
    Hop {
        service: "fluxo-ledger",
        span: "ledger.RecordEntry",
        relation: Relation::ChildOf(Some("fluxo.ledger.v1.LedgerService/RecordEntry")),
    },
    Hop { service: "fluxo-ledger", span: "outbox.publish", relation: Relation::LinkedToCaller },
    Hop { service: "fluxo-consolidator", span: "consolidate", relation: Relation::LinkedToCaller },
    Hop {
        service: "fluxo-consolidator",
        span: "balance.cache.invalidate",
        relation: Relation::Under("consolidate"),
    },
];

/// Finds every hop of `journey` for the caller's trace; the found spans, or
/// what is missing.
fn follow(
    spans: &[SpanRec],
    journey: &[Hop],
    trace_id: &str,
    caller_span: &str,
    event_id: &str,
) -> Result<HashMap<&'static str, SpanRec>, String> {
    let mut found: HashMap<&'static str, SpanRec> = HashMap::new();
    for hop in journey {
        let mut candidates = spans.iter().filter(|s| s.service == hop.service && s.name == hop.span);
        let matched = match hop.relation {
            Relation::ChildOf(parent) => {
                let parent_id = match parent {
                    None => Some(caller_span.to_owned()),
                    Some(name) => found.get(name).map(|p| p.span_id.clone()),
                };
                candidates
                    .find(|s| s.trace_id == trace_id && Some(&s.parent_span_id) == parent_id.as_ref())
                    .cloned()
            }
            Relation::LinkedToCaller => candidates
                .find(|s| {
                    s.links.iter().any(|(t, _, attrs)| {
                        t == trace_id
                            && attrs.get("messaging.message.id").map(String::as_str) == Some(event_id)
                    })
                })
                .cloned(),
            Relation::Under(name) => found.get(name).and_then(|parent| {
                candidates
                    .find(|s| s.trace_id == parent.trace_id && s.parent_span_id == parent.span_id)
                    .cloned()
            }),
        };
        match matched {
            Some(span) => {
                found.insert(hop.span, span);
            }
            None => return Err(format!("no {} span `{}` ({:?})", hop.service, hop.span, hop.relation)),
        }
    }
    Ok(found)
}

// ---------------------------------------------------------------------------
// Processes whose every output byte is kept, for the secret scan.

struct Proc {
    child: Child,
    name: String,
    stdout: PathBuf,
    stderr: PathBuf,
    addr: String,
}

impl Proc {
    fn start(install: &Install, target: &str, env: &[(String, String)], logs: &Path) -> Self {
        let stdout = logs.join(format!("{target}.stdout"));
        let stderr = logs.join(format!("{target}.stderr"));
        let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let ready_file = logs.join(format!("{target}.ready.json"));
        let child = fluxo_command(install.dir.path(), &refs)
            .args(["serve", "--target", target, "--ready-file"])
            .arg(&ready_file)
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("start fluxo");
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            if let Ok(ready) = std::fs::read_to_string(&ready_file) {
                let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
                break ready["grpc"].as_str().unwrap().to_owned();
            }
            let err = std::fs::read_to_string(&stderr).unwrap_or_default();
            assert!(Instant::now() < deadline, "{target}: not ready; stderr:\n{err}");
            std::thread::sleep(Duration::from_millis(50));
        };
        Self { child, name: target.to_owned(), stdout, stderr, addr }
    }

    /// SIGTERM and wait: the exporters flush on the way out.
    fn stop(mut self) -> (String, String, String) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                self.child.kill().ok();
                panic!("{} did not stop", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = std::fs::read_to_string(&self.stdout).unwrap();
        let err = std::fs::read_to_string(&self.stderr).unwrap();
        (std::mem::take(&mut self.name), out, err)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// A Redis that demands a password, so the URL fluxo gets carries one.
struct LockedRedis {
    child: Child,
    port: u16,
}

impl LockedRedis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let bin = std::env::var("FLUXO_TEST_REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(bin)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
            .args(["--requirepass", REDIS_PASSWORD])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (run the suite with ./scripts/test.sh)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port }
    }
}

impl Drop for LockedRedis {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// The database URL with a password (PostgreSQL's trust auth ignores it).
fn with_password(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (user, host) = rest.split_once('@').unwrap();
    let user = user.split(':').next().unwrap();
    format!("{scheme}://{user}:{PG_PASSWORD}@{host}")
}

async fn wait_for<T>(what: &str, within: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + within;
    loop {
        match check() {
            Ok(found) => return found,
            Err(missing) if Instant::now() > deadline => panic!("{what}: {missing}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn random_hex(digits: usize) -> String {
    let a = ulid::Ulid::new().0;
    let b = ulid::Ulid::new().0;
    format!("{a:032x}{b:032x}")[64 - digits..].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_entry_is_traced_across_the_asynchronous_hop_and_metrics_and_logs_arrive_without_secrets() {
    let received = Received::default();
    let endpoint = start_receiver(received.clone()).await;
    let redis = LockedRedis::start();
    let redis_url = format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{}", redis.port);
    let install = Install::new(redis_url.clone()).await;
    let logs = tempfile::tempdir().unwrap();

    let mut env = install.env();
    env.extend(
        [
            ("FLUXO_DATABASE__URL", with_password(&install.db.url)),
            ("FLUXO_REDIS__URL", redis_url.clone()),
            // Every call's access line too, so a successful call is found in the logs.
            ("FLUXO_LOG__LEVEL", "info,fluxo::access=debug".into()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
            ("OTEL_EXPORTER_OTLP_HEADERS", format!("authorization=Bearer {COLLECTOR_TOKEN}")),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=e2e".into()),
            ("FLUXO_AUTH__HS256_SECRET", JWT_SECRET.into()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    let ledger = Proc::start(&install, "ledger", &env, logs.path());
    let consolidator = Proc::start(&install, "consolidator", &env, logs.path());
    let balance = Proc::start(&install, "balance", &env, logs.path());

    // The REST gateway in front of the ledger and balance targets.
    let mut gateway_env = env.clone();
    gateway_env.push(("FLUXO_GATEWAY__LEDGER_URL".into(), format!("http://{}", ledger.addr)));
    gateway_env.push(("FLUXO_GATEWAY__BALANCE_URL".into(), format!("http://{}", balance.addr)));
    let gateway = Proc::start(&install, "gateway", &gateway_env, logs.path());
    let rest_addr = std::fs::read_to_string(&gateway.stderr)
        .unwrap()
        .lines()
        .find_map(|l| {
            l.trim().strip_prefix("REST").and_then(|r| r.split_whitespace().next()).map(str::to_owned)
        })
        .expect("the gateway prints its REST address");
    let bearer = fluxo_gateway::auth::TokenSpec {
        valid_for_secs: 600,
        ..fluxo_gateway::auth::TokenSpec::new("otel-test", &["m-otel"])
    }
    .sign_hs256(&secrecy::SecretString::from(JWT_SECRET.to_owned()), "fluxo", "fluxo-api")
    .unwrap();

    // The caller's own trace, continued by the gateway and then the ledger.
    let (trace_id, caller_span) = (random_hex(32), random_hex(16));
    let mut ledger_client = LedgerServiceClient::connect(format!("http://{}", ledger.addr)).await.unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut reply = agent
        .post(&format!("{rest_addr}/v1/merchants/m-otel/entries"))
        .header("Authorization", &format!("Bearer {bearer}"))
        .header("traceparent", &format!("00-{trace_id}-{caller_span}-01"))
        .header("Content-Type", "application/json")
        .send(
            r#"{"type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":"1050"},"bookingDate":"2026-11-21","description":"traced","requestId":"otel-1"}"#,
        )
        .unwrap();
    assert_eq!(reply.status().as_u16(), 200);
    let entry: lpb::Entry = {
        let body: serde_json::Value = reply.body_mut().read_json().unwrap();
        lpb::Entry { id: body["id"].as_str().unwrap().to_owned(), ..Default::default() }
    };
    // One refused call, so errors show up by code.
    let invalid = ledger_client
        .record_entry(lpb::RecordEntryRequest { merchant_id: "m-otel".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);

    // The balance shows it (a miss, then a hit from the cache).
    let mut balances = BalanceServiceClient::connect(format!("http://{}", balance.addr)).await.unwrap();
    let ask = bpb::GetDailyBalanceRequest {
        merchant_id: "m-otel".into(),
        date: "2026-11-21".into(),
        currency_code: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let day = balances.get_daily_balance(ask.clone()).await.map(tonic::Response::into_inner);
        if matches!(&day, Ok(d) if d.total_credits_minor == 1050) {
            break;
        }
        assert!(Instant::now() < deadline, "the entry never reached its balance: {day:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The answer that showed the entry may have been read just before the
    // consolidator's invalidation; after it, one read loads and the next hits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..2 {
        balances.get_daily_balance(ask.clone()).await.unwrap();
    }

    // The trace: ledger → relay → consolidator → cache.
    let event_id = wait_for("the entry's event id", Duration::from_secs(20), || {
        spans(&received)
            .iter()
            .filter(|s| s.name == "outbox.publish")
            .flat_map(|s| &s.links)
            .find(|(t, _, _)| *t == trace_id)
            .and_then(|(_, _, a)| a.get("messaging.message.id").cloned())
            .ok_or_else(|| "no relay span linked to the caller's trace".to_owned())
    })
    .await;
    let journey = wait_for("the entry's journey", Duration::from_secs(20), || {
        let all = spans(&received);
        follow(&all, JOURNEY, &trace_id, &caller_span, &event_id).map_err(|e| {
            let seen: Vec<String> =
                all.iter().map(|s| format!("{}:{} parent {}", s.service, s.name, s.parent_span_id)).collect();
            format!("{e}; spans seen: {seen:?}")
        })
    })
    .await;
    let server = &journey["fluxo.ledger.v1.LedgerService/RecordEntry"];
    assert_eq!(server.attributes.get("rpc.system").map(String::as_str), Some("grpc"));
    assert_eq!(server.attributes.get("rpc.method").map(String::as_str), Some("RecordEntry"));
    // The asynchronous hop starts new traces; the links lead back.
    assert_ne!(journey["consolidate"].trace_id, trace_id);
    let link = journey["consolidate"].links.iter().find(|(t, _, _)| *t == trace_id).unwrap();
    assert_eq!(link.1, journey["ledger.RecordEntry"].span_id, "linked to the span that wrote the outbox");
    assert!(!entry.id.is_empty());

    // The metrics, with plausible values.
    let ledger_rpc = |code: &'static str| {
        move |p: &&Point| {
            p.service == "fluxo-ledger"
                && p.metric == "rpc.server.duration"
                && p.attributes.get("rpc.method").map(String::as_str) == Some("RecordEntry")
                && p.attributes.get("rpc.service").map(String::as_str)
                    == Some("fluxo.ledger.v1.LedgerService")
                && p.attributes.get("rpc.grpc.status_code").map(String::as_str) == Some(code)
        }
    };
    let ok = wait_for("rpc.server.duration of RecordEntry OK", Duration::from_secs(20), || {
        points(&received).iter().filter(ledger_rpc("0")).max_by_key(|p| p.count).cloned().ok_or_default()
    })
    .await;
    assert_eq!(ok.unit, "s");
    assert_eq!(ok.count, 1, "one successful RecordEntry");
    assert!(ok.sum > 0.0 && ok.sum < 30.0, "a plausible duration: {ok:?}");
    let refused =
        wait_for("rpc.server.duration of RecordEntry INVALID_ARGUMENT", Duration::from_secs(20), || {
            points(&received).iter().filter(ledger_rpc("3")).max_by_key(|p| p.count).cloned().ok_or_default()
        })
        .await;
    assert_eq!(refused.count, 1);

    let delay = wait_for("fluxo.consolidation.delay", Duration::from_secs(20), || {
        points(&received)
            .into_iter()
            .filter(|p| p.service == "fluxo-consolidator" && p.metric == "fluxo.consolidation.delay")
            .max_by_key(|p| p.count)
            .filter(|p| p.count >= 1)
            .ok_or_default()
    })
    .await;
    assert_eq!(delay.unit, "s");
    assert_eq!(delay.count, 1, "one entry applied");
    assert!(delay.sum >= 0.0 && delay.sum < 30.0, "a plausible delay: {delay:?}");

    // Once the entry is applied the group has nothing left to deliver or acknowledge.
    let group = |metric: &'static str| {
        let stream = install.stream.clone();
        move |p: &&Point| {
            p.service == "fluxo-consolidator"
                && p.metric == metric
                && p.attributes.get("messaging.destination.name") == Some(&stream)
                && p.attributes.get("messaging.consumer.group.name").map(String::as_str)
                    == Some("consolidators")
        }
    };
    for metric in ["fluxo.stream.lag", "fluxo.stream.pending"] {
        wait_for(metric, Duration::from_secs(20), || {
            let all = points(&received);
            let last = all.iter().rfind(group(metric)).ok_or_else(|| "not reported".to_owned())?;
            (last.value == 0.0).then_some(()).ok_or_else(|| format!("last value {}", last.value))
        })
        .await;
    }
    // (service, metric, lowest, highest) of the latest value reported.
    let expected: [(&str, &str, f64, f64); 6] = [
        ("fluxo-consolidator", "fluxo.stream.dead_letters", 0.0, 0.0),
        ("fluxo-ledger", "fluxo.outbox.backlog", 0.0, 0.0),
        ("fluxo-ledger", "fluxo.outbox.oldest_age", 0.0, 0.0),
        // Polling the balance until the entry showed missed at least once.
        ("fluxo-balance", "fluxo.balance.cache.misses", 1.0, 1000.0),
        ("fluxo-balance", "fluxo.balance.cache.hits", 1.0, 1000.0),
        ("fluxo-ledger", "db.client.connection.max", 16.0, 16.0),
    ];
    wait_for("the other gauges and counters", Duration::from_secs(20), || {
        let all = points(&received);
        for (service, metric, low, high) in expected {
            let last = all
                .iter()
                .rfind(|p| p.service == service && p.metric == metric)
                .ok_or_else(|| format!("{service} reported no {metric}"))?;
            if !(low..=high).contains(&last.value) {
                return Err(format!("{service} {metric} = {}", last.value));
            }
        }
        Ok(())
    })
    .await;
    assert!(
        points(&received).iter().any(|p| p.service == "fluxo-ledger"
            && p.metric == "db.client.connection.count"
            && p.attributes.get("db.client.connection.state").map(String::as_str) == Some("idle")),
        "pool connections by state"
    );

    // Everything printed: JSON log lines with trace ids, and no secret anywhere.
    let status = install.run(&["queue", "status"]);
    let mut printed: Vec<(String, String)> = vec![
        ("queue status stdout".into(), String::from_utf8_lossy(&status.stdout).into_owned()),
        ("queue status stderr".into(), String::from_utf8_lossy(&status.stderr).into_owned()),
    ];
    for process in [gateway, ledger, consolidator, balance] {
        let (name, out, err) = process.stop();
        for line in out.lines() {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("{name}: not a JSON line ({e}): {line}"));
        }
        printed.push((format!("{name} stdout"), out));
        printed.push((format!("{name} stderr"), err));
    }
    let ledger_logs = &printed.iter().find(|(n, _)| n == "ledger stdout").unwrap().1;
    let traced = ledger_logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l.get("trace_id").is_some())
        .count();
    assert!(traced > 0, "no ledger log line carries a trace id:\n{ledger_logs}");
    // The traced call's access log line carries the caller's trace id.
    assert!(
        ledger_logs.lines().any(|l| l.contains(&format!("\"trace_id\":\"{trace_id}\""))),
        "no ledger log line in the caller's trace:\n{ledger_logs}"
    );

    let exported = format!("{:?}{:?}", received.traces.lock().unwrap(), received.metrics.lock().unwrap());
    printed.push(("OTLP payloads".into(), exported));
    assert!(
        received.authorizations.lock().unwrap().iter().any(|a| a.contains(COLLECTOR_TOKEN)),
        "the collector token was sent to the collector (as a header, not in the data)"
    );
    for (source, text) in &printed {
        for secret in [PG_PASSWORD, REDIS_PASSWORD, COLLECTOR_TOKEN, JWT_SECRET, bearer.as_str()] {
            assert!(!text.contains(secret), "{source} leaks a secret ({secret})");
        }
    }
}

trait OkOrDefault<T> {
    fn ok_or_default(self) -> Result<T, String>;
}

impl<T> OkOrDefault<T> for Option<T> {
    fn ok_or_default(self) -> Result<T, String> {
        self.ok_or_else(|| "not received yet".to_owned())
    }
}
