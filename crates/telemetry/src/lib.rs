//! Telemetry for every fluxo target: a `tracing` subscriber writing JSON lines
//! (or readable text on a terminal), spans that carry W3C trace context across
//! every hop, and OTLP export switched on by the standard `OTEL_*` variables.
//!
//! Building the subscriber ([`subscriber`]) is separate from installing it
//! ([`init`]) so that tests choose where output goes.

use std::{collections::HashMap, io::IsTerminal};

use opentelemetry::{
    global,
    propagation::{Extractor, Injector},
    trace::TracerProvider as _,
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, fmt::MakeWriter, layer::SubscriberExt, registry::LookupSpan};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Pretty text when stdout is a terminal, JSON lines otherwise.
    #[default]
    Auto,
    /// One JSON object per line, for log pipelines.
    Json,
    /// Human-readable text.
    Pretty,
}

/// What to set up.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `service.name` when `OTEL_SERVICE_NAME` does not set one.
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

/// Keeps the exporter alive; call [`Telemetry::shutdown`] before exit to flush spans.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl Telemetry {
    /// True when spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// Flushes buffered spans to the collector and stops the exporter.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "telemetry shutdown did not complete");
        }
    }
}

/// True when the `OTEL_*` environment asks for OTLP export.
pub fn otlp_requested() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    let traces_off = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled
        && !traces_off
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Builds the tracer provider: exporting over OTLP/gRPC when the environment
/// asks for it, otherwise only minting trace ids so logs and propagation still work.
pub fn tracer_provider(service_name: &str) -> Result<(SdkTracerProvider, bool), TelemetryError> {
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service_name.to_owned());
    }
    let mut builder = SdkTracerProvider::builder().with_resource(resource.build());
    let exporting = otlp_requested();
    if exporting {
        // Endpoint, headers, timeout and compression come from the OTEL_EXPORTER_OTLP_* variables.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok((builder.build(), exporting))
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
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer).with_target(true);
    let fmt = if json {
        fmt.json().flatten_event(true).with_current_span(true).with_span_list(false).boxed()
    } else {
        fmt.with_ansi(terminal).boxed()
    };
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("fluxo"));
    Ok(tracing_subscriber::registry().with(filter).with(fmt).with(otel))
}

/// Installs telemetry for the whole process: logs to stdout, W3C trace-context
/// propagation, and OTLP export when configured.
pub fn init(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    let (provider, exporting) = tracer_provider(&config.service_name)?;
    let terminal = std::io::stdout().is_terminal();
    let subscriber = subscriber(config, &provider, std::io::stdout, terminal)?;
    tracing::subscriber::set_global_default(subscriber).map_err(|_| TelemetryError::AlreadyInstalled)?;
    global::set_text_map_propagator(TraceContextPropagator::new());
    global::set_tracer_provider(provider.clone());
    Ok(Telemetry { provider, exporting })
}

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
