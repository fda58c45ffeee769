//! Telemetry for every fluxo target: a `tracing` subscriber writing JSON lines
//! (or readable text on a terminal) that carry trace and span ids, spans that
//! carry W3C trace context across every hop (span links across the
//! asynchronous one), and OTLP/gRPC export of traces and metrics switched on by
//! the standard `OTEL_*` variables.
//!
//! Building the subscriber ([`subscriber`]) is separate from installing it
//! ([`init`]) so that tests choose where output goes.
//!
//! Metric instruments are created from [`meter`] by the code that records
//! them; until [`init`] installs an exporting meter provider they are no-ops.

mod json;

use std::{collections::HashMap, io::IsTerminal, time::Duration};

pub use opentelemetry;
use opentelemetry::{
    KeyValue, global,
    metrics::Meter,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{SpanContext, TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource, metrics::SdkMeterProvider, propagation::TraceContextPropagator, trace::SdkTracerProvider,
};
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer, fmt::MakeWriter, fmt::format::JsonFields, layer::SubscriberExt, registry::LookupSpan,
};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Pretty text when stdout is a terminal, JSON lines otherwise.
    #[default]
    Auto,
    /// One JSON object per line, for log pipelines, with `trace_id` and `span_id`.
    Json,
    /// Human-readable text.
    Pretty,
}

/// What to set up.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `service.name` when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` sets one.
    pub service_name: String,
    /// Log line format.
    pub log_format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `fluxo=debug,info`.
    pub log_filter: String,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter does not parse.
    #[error("invalid log filter {filter:?}: {reason}")]
    Filter {
        /// The directive given.
        filter: String,
        /// The parser's complaint.
        reason: String,
    },
    /// The OTLP exporter could not be built from the `OTEL_*` settings.
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
    /// A subscriber was installed already.
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Keeps the exporters alive; call [`Telemetry::shutdown`] before exit to
/// flush spans and send the last metrics.
#[derive(Debug)]
pub struct Telemetry {
    tracer: SdkTracerProvider,
    meter: Option<SdkMeterProvider>,
    exporting: bool,
    // Flushes the log lines still queued for stdout when dropped.
    _log_writer: tracing_appender::non_blocking::WorkerGuard,
}

impl Telemetry {
    /// True when spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// True when metrics are exported over OTLP.
    pub fn exporting_metrics(&self) -> bool {
        self.meter.is_some()
    }

    /// Flushes buffered spans and a last round of metrics to the collector,
    /// then stops the exporters.
    pub fn shutdown(self) {
        let Self { tracer, meter, _log_writer, .. } = self;
        let work = move || {
            if let Some(meter) = meter
                && let Err(error) = meter.shutdown()
            {
                tracing::warn!(%error, "metrics shutdown did not complete");
            }
            if let Err(error) = tracer.shutdown() {
                tracing::warn!(%error, "telemetry shutdown did not complete");
            }
        };
        // The exporters' gRPC connections are driven by the runtime: let it keep
        // running on another thread while this one waits for the flush.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(work)
            }
            _ => work(),
        }
    }
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

fn env_is(name: &str, value: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value))
}

/// True when the `OTEL_*` environment asks for OTLP export of traces.
pub fn otlp_requested() -> bool {
    !env_is("OTEL_SDK_DISABLED", "true")
        && !env_is("OTEL_TRACES_EXPORTER", "none")
        && (env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// True when the `OTEL_*` environment asks for OTLP export of metrics.
pub fn otlp_metrics_requested() -> bool {
    !env_is("OTEL_SDK_DISABLED", "true")
        && !env_is("OTEL_METRICS_EXPORTER", "none")
        && (env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
}

/// The process's resource: `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`
/// win; otherwise `service.name` is `service_name`.
fn resource(service_name: &str) -> Resource {
    let named_by_env = env_set("OTEL_SERVICE_NAME")
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES")
            .is_ok_and(|a| a.split(',').any(|kv| kv.trim_start().starts_with("service.name=")));
    let mut resource =
        Resource::builder().with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if !named_by_env {
        resource = resource.with_service_name(service_name.to_owned());
    }
    resource.build()
}

/// Builds the tracer provider: exporting over OTLP/gRPC when the environment
/// asks for it, otherwise only minting trace ids so logs and propagation still
/// work. The sampler follows `OTEL_TRACES_SAMPLER` (default: parent-based, always on).
pub fn tracer_provider(service_name: &str) -> Result<(SdkTracerProvider, bool), TelemetryError> {
    let mut builder = SdkTracerProvider::builder().with_resource(resource(service_name));
    let exporting = otlp_requested();
    if exporting {
        // Endpoint, headers, timeout and compression come from the
        // OTEL_EXPORTER_OTLP_* variables; batching from OTEL_BSP_*.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok((builder.build(), exporting))
}

/// Builds the meter provider when the environment asks for OTLP metrics:
/// cumulative temporality (what Prometheus expects), exported every
/// `OTEL_METRIC_EXPORT_INTERVAL` milliseconds (default 60 000).
pub fn meter_provider(service_name: &str) -> Result<Option<SdkMeterProvider>, TelemetryError> {
    if !otlp_metrics_requested() {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    Ok(Some(
        SdkMeterProvider::builder()
            .with_resource(resource(service_name))
            .with_periodic_exporter(exporter)
            .build(),
    ))
}

/// The subscriber for `config`, writing log lines to `writer`, with spans
/// recorded by `provider`.
pub fn subscriber<W>(
    config: &TelemetryConfig,
    provider: &SdkTracerProvider,
    writer: W,
    terminal: bool,
) -> Result<impl Subscriber + Send + Sync + for<'a> LookupSpan<'a>, TelemetryError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(&config.log_filter)
        .map_err(|e| TelemetryError::Filter { filter: config.log_filter.clone(), reason: e.to_string() })?;
    let json = match config.log_format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !terminal,
    };
    let slot = json::DispatchSlot::default();
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    let fmt = if json {
        fmt.fmt_fields(JsonFields::new()).event_format(json::JsonLines(slot.clone())).boxed()
    } else {
        fmt.with_target(true).with_ansi(terminal).boxed()
    };
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("fluxo"));
    Ok(tracing_subscriber::registry().with(filter).with(fmt).with(otel).with(json::CaptureDispatch(slot)))
}

/// Installs telemetry for the whole process: logs to stdout, W3C trace-context
/// propagation, and OTLP export of traces and metrics when configured.
pub fn init(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    let (tracer, exporting) = tracer_provider(&config.service_name)?;
    let meter = meter_provider(&config.service_name)?;
    let terminal = std::io::stdout().is_terminal();
    // Log lines are written to stdout by a thread of their own, in batches,
    // instead of one write(2) per line on the thread serving a request. Never
    // lossy: when stdout cannot keep up, callers wait as they would writing
    // directly, and no line is dropped.
    let (writer, log_writer) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("fluxo-log")
        // Buffered: lines queued together leave in one write; the worker flushes
        // whenever the queue is empty, so nothing waits in the buffer.
        .finish(std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout()));
    let subscriber = subscriber(config, &tracer, writer, terminal)?;
    tracing::subscriber::set_global_default(subscriber).map_err(|_| TelemetryError::AlreadyInstalled)?;
    global::set_text_map_propagator(TraceContextPropagator::new());
    global::set_tracer_provider(tracer.clone());
    if let Some(meter) = &meter {
        global::set_meter_provider(meter.clone());
    }
    Ok(Telemetry { tracer, meter, exporting, _log_writer: log_writer })
}

/// The meter every fluxo instrument is created from. Create instruments after
/// [`init`] (lazily, on first use): before it, they record nothing.
pub fn meter() -> Meter {
    global::meter("fluxo")
}

/// Seconds as a float, for histograms in seconds (the unit the OpenTelemetry
/// semantic conventions and Prometheus expect).
pub fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

/// Histogram bucket boundaries, in seconds, for call and pipeline latencies:
/// from a millisecond to two minutes.
pub const LATENCY_BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct Carrier(HashMap<String, String>);

impl Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

/// Makes `span` a child of the W3C trace context (`traceparent`,
/// `tracestate`) carried by `headers`, when they carry one.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if headers.contains_key("traceparent") {
        let parent = global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
        let _ = span.set_parent(parent);
    }
}

/// The W3C `traceparent` and `tracestate` of the current span, to carry the
/// trace across an asynchronous hop (the outbox, a queue message).
pub fn current_trace_context() -> (Option<String>, Option<String>) {
    let context = tracing::Span::current().context();
    let mut carrier = Carrier(HashMap::new());
    global::get_text_map_propagator(|p| p.inject_context(&context, &mut carrier));
    let mut fields = carrier.0;
    (fields.remove("traceparent"), fields.remove("tracestate").filter(|s| !s.is_empty()))
}

/// The span context described by a W3C `traceparent` (and `tracestate`), when
/// it is a valid one.
pub fn remote_span_context(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let mut fields = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    if let Some(state) = tracestate {
        fields.insert("tracestate".to_owned(), state.to_owned());
    }
    let context = TraceContextPropagator::new().extract(&Fields(fields));
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

/// Links `span` to the trace a message was produced in (its stored
/// `traceparent`/`tracestate`), with `attributes` on the link. Used across
/// the asynchronous hop, where one span handles a batch of messages from many
/// traces: a link per message rather than one arbitrary parent. Returns
/// whether a link was added.
pub fn link_to(
    span: &tracing::Span,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
    attributes: Vec<KeyValue>,
) -> bool {
    match traceparent.and_then(|tp| remote_span_context(tp, tracestate)) {
        Some(context) => {
            span.add_link_with_attributes(context, attributes);
            true
        }
        None => false,
    }
}

struct Fields(HashMap<String, String>);

impl Extractor for Fields {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn json_lines(run: impl FnOnce()) -> Vec<serde_json::Value> {
        let buffer = Buffer::default();
        let config = TelemetryConfig {
            service_name: "test".into(),
            log_format: LogFormat::Json,
            log_filter: "info".into(),
        };
        let provider = SdkTracerProvider::builder().build();
        let writer = buffer.clone();
        let subscriber = subscriber(&config, &provider, move || writer.clone(), false).unwrap();
        tracing::subscriber::with_default(subscriber, run);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn json_lines_carry_the_trace_and_span_ids_of_their_span() {
        let ids = Arc::new(Mutex::new(None));
        let seen = ids.clone();
        let lines = json_lines(move || {
            let span = tracing::info_span!("handler", merchant_id = "m-1");
            let _entered = span.enter();
            let context = span.context();
            let otel = context.span();
            let ids = otel.span_context();
            *seen.lock().unwrap() = Some((ids.trace_id().to_string(), ids.span_id().to_string()));
            tracing::info!(amount = 5, "inside");
        });
        let (trace_id, span_id) = ids.lock().unwrap().clone().unwrap();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        assert_eq!(line["message"], "inside");
        assert_eq!(line["amount"], 5);
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["span"]["name"], "handler");
        assert_eq!(line["span"]["merchant_id"], "m-1");
        assert_eq!(line["trace_id"], trace_id.as_str());
        assert_eq!(line["span_id"], span_id.as_str());
        assert_ne!(trace_id, "00000000000000000000000000000000");
    }

    #[test]
    fn a_line_outside_any_span_has_no_trace_id() {
        let lines = json_lines(|| tracing::warn!("alone"));
        assert_eq!(lines[0]["message"], "alone");
        assert!(lines[0].get("trace_id").is_none());
    }

    #[test]
    fn a_stored_traceparent_becomes_a_span_link_target() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let context = remote_span_context(tp, Some("vendor=x")).unwrap();
        assert_eq!(context.trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(context.span_id().to_string(), "b7ad6b7169203331");
        assert!(context.is_remote());
        assert!(remote_span_context("garbage", None).is_none());
    }
}
