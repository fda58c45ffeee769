//! JSON log lines that carry the OpenTelemetry trace and span ids of the span
//! they were written in, so a log pipeline can jump from a line to its trace.
//!
//! tracing-subscriber's own JSON format knows nothing of OpenTelemetry ids, so
//! this formatter asks the OpenTelemetry layer for the span's context. That
//! needs the `Dispatch` the subscriber ends up in, which [`DispatchSlot`]
//! captures when the subscriber is installed.

use std::{
    fmt,
    sync::{Arc, OnceLock},
};

use opentelemetry::trace::TraceContextExt;
use serde_json::{Map, Value};
use tracing::{
    Event, Subscriber,
    dispatcher::WeakDispatch,
    field::{Field, Visit},
};
use tracing_subscriber::{
    Layer,
    fmt::{
        FmtContext, FormatEvent, FormatFields, FormattedFields,
        format::Writer,
        time::{FormatTime, SystemTime},
    },
    registry::LookupSpan,
};

/// Where the installed subscriber's `Dispatch` is kept for the formatter.
#[derive(Clone, Default)]
pub(crate) struct DispatchSlot(Arc<OnceLock<WeakDispatch>>);

/// A layer that does nothing but remember the dispatch it was installed in.
pub(crate) struct CaptureDispatch(pub(crate) DispatchSlot);

impl<S: Subscriber> Layer<S> for CaptureDispatch {
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        let _ = self.0.0.set(subscriber.downgrade());
    }
}

/// One JSON object per line: `timestamp`, `level`, `target`, the event's
/// fields (`message` among them), `span` (name and fields of the innermost
/// span) and `trace_id`/`span_id` when the event happened inside a span.
pub(crate) struct JsonLines(pub(crate) DispatchSlot);

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        line.insert("timestamp".into(), Value::String(timestamp));
        line.insert("level".into(), Value::String(event.metadata().level().to_string()));
        event.record(&mut Fields(&mut line));
        line.insert("target".into(), Value::String(event.metadata().target().to_owned()));
        if let Some(span) = ctx.parent_span() {
            let mut described = Map::new();
            described.insert("name".into(), Value::String(span.name().to_owned()));
            {
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields)
                {
                    described.extend(fields);
                }
            } // The OpenTelemetry layer locks the extensions itself below.
            line.insert("span".into(), Value::Object(described));
            let dispatch = self.0.0.get().and_then(WeakDispatch::upgrade);
            if let Some(context) =
                dispatch.and_then(|d| tracing_opentelemetry::get_otel_context(&span.id(), &d))
            {
                let otel = context.span();
                let ids = otel.span_context();
                if ids.is_valid() {
                    line.insert("trace_id".into(), Value::String(ids.trace_id().to_string()));
                    line.insert("span_id".into(), Value::String(ids.span_id().to_string()));
                }
            }
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().to_owned(), Value::String(value.to_string()));
    }
}
