//! One tower layer for what every call needs before it reaches a handler.
//!
//! Written here rather than composed from `tower::load_shed` and
//! `tower::limit` because those cannot exempt health checks: under overload a
//! kubelet probe would be shed, and Kubernetes would restart a pod that is
//! merely busy.
//!
//! It also measures every call for the golden signals: the
//! `rpc.server.duration` histogram (seconds) with the OpenTelemetry semantic
//! convention attributes `rpc.system`, `rpc.service`, `rpc.method` and
//! `rpc.grpc.status_code`. The status comes from the response headers when
//! the call failed before any message (trailers-only responses, refusals), or
//! from the trailers at the end of the body; a body dropped before its
//! trailers (the caller went away) counts as CANCELLED.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use fluxo_telemetry::opentelemetry::{KeyValue, metrics::Histogram};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use tokio::sync::Semaphore;
use tonic::{Status, body::Body};
use tower::{Layer, Service};
use tracing::Instrument;

/// Header carrying the request id, accepted from the caller or minted here.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Log target of the access log: one `call finished` line per call, at DEBUG
/// for OK calls and refusals (RESOURCE_EXHAUSTED) and INFO otherwise
/// (`FLUXO_LOG__LEVEL=info,fluxo::access=debug` logs every call). Refusals are
/// summed up instead, in at most one WARN line a second: a line per refused
/// call would spend the CPU of an overloaded server on its log.
pub const ACCESS: &str = "fluxo::access";

/// Adds admission control, a request span and a request id to a service.
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    permits: Arc<Semaphore>,
    refusals: Arc<Refusals>,
}

impl AdmissionLayer {
    /// Admits at most `max_concurrent` calls at once (health and reflection exempt).
    pub fn new(max_concurrent: usize) -> Self {
        let max_concurrent = max_concurrent.max(1);
        Self {
            permits: Arc::new(Semaphore::new(max_concurrent)),
            refusals: Arc::new(Refusals::new(max_concurrent)),
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission { inner, permits: self.permits.clone(), refusals: self.refusals.clone() }
    }
}

/// Counts refused calls and reports them at most once per [`Refusals::EVERY`].
#[derive(Debug)]
struct Refusals {
    max_concurrent: usize,
    epoch: Instant,
    /// Refused since the last report.
    pending: AtomicU64,
    /// Milliseconds after `epoch` of the last report; `u64::MAX` before the first.
    reported_at: AtomicU64,
}

impl Refusals {
    const EVERY: Duration = Duration::from_secs(1);

    fn new(max_concurrent: usize) -> Self {
        Self {
            max_concurrent,
            epoch: Instant::now(),
            pending: AtomicU64::new(0),
            reported_at: AtomicU64::new(u64::MAX),
        }
    }

    /// Counts one refusal and logs the sum when a report is due.
    fn refused(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        if let Some((refused, since)) = self.count_at(now) {
            let since = since
                .map_or_else(|| "first report".to_owned(), |ms| format!("{ms} ms since the last report"));
            tracing::warn!(
                refused,
                max_concurrent = self.max_concurrent,
                "overloaded: refused {refused} calls with RESOURCE_EXHAUSTED ({since}); \
                 every call is in the rpc.server.duration metric"
            );
        }
    }

    /// Counts one refusal at `now` (ms after `epoch`). The caller that finds the
    /// last report old enough gets every refusal since, its own included, and
    /// how long ago that report was (`None` for the first).
    fn count_at(&self, now: u64) -> Option<(u64, Option<u64>)> {
        self.pending.fetch_add(1, Ordering::Relaxed);
        let last = self.reported_at.load(Ordering::Relaxed);
        let every = u64::try_from(Self::EVERY.as_millis()).unwrap_or(u64::MAX);
        let first = last == u64::MAX;
        if !first && now.saturating_sub(last) < every {
            return None;
        }
        self.reported_at.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).ok()?;
        let refused = self.pending.swap(0, Ordering::Relaxed);
        Some((refused, (!first).then(|| now - last)))
    }
}

/// The service produced by [`AdmissionLayer`].
#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    permits: Arc<Semaphore>,
    refusals: Arc<Refusals>,
}

fn exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

/// The caller's request id when it is a sane token; a fresh one otherwise.
/// The caller's `x-request-id` when it is a sensible one (1 to 128 visible
/// ASCII characters), else a new ULID: the id a request is logged, traced and
/// answered under, in gRPC and REST alike.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(REQUEST_ID_HEADER)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(u8::is_ascii_graphic))
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&ulid::Ulid::new().to_string())
                .unwrap_or(HeaderValue::from_static("unknown"))
        })
}

/// `rpc.server.duration`, created on first use (after telemetry is installed).
static DURATION: LazyLock<Histogram<f64>> = LazyLock::new(|| {
    fluxo_telemetry::meter()
        .f64_histogram("rpc.server.duration")
        .with_unit("s")
        .with_description("Duration of inbound gRPC calls, by service, method and status code")
        .with_boundaries(fluxo_telemetry::LATENCY_BUCKETS.to_vec())
        .build()
});

/// gRPC status codes used when no `grpc-status` was seen.
const OK: i64 = 0;
const UNKNOWN: i64 = 2;
const CANCELLED: i64 = 1;
const UNIMPLEMENTED: i64 = 12;
const RESOURCE_EXHAUSTED: i64 = 8;

fn grpc_status(headers: &HeaderMap) -> Option<i64> {
    headers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

/// Records one call's duration and status exactly once: when its status is
/// known, or when it is dropped without one. Also writes the call's access log
/// line, in the call's span (so it carries the trace id).
struct CallRecord {
    start: Instant,
    attributes: Vec<KeyValue>,
    span: tracing::Span,
    done: bool,
}

impl CallRecord {
    fn new(service: &str, method: &str, span: tracing::Span) -> Self {
        let attributes = vec![
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", service.to_owned()),
            KeyValue::new("rpc.method", method.to_owned()),
        ];
        Self { start: Instant::now(), attributes, span, done: false }
    }

    fn finish(&mut self, status: i64) {
        if self.done {
            return;
        }
        self.done = true;
        let mut attributes = std::mem::take(&mut self.attributes);
        if status == UNIMPLEMENTED {
            // Any path can be called: unknown ones must not mint label values.
            attributes.truncate(1);
            attributes.push(KeyValue::new("rpc.service", "_OTHER"));
            attributes.push(KeyValue::new("rpc.method", "_OTHER"));
        }
        attributes.push(KeyValue::new("rpc.grpc.status_code", status));
        let elapsed = self.start.elapsed();
        DURATION.record(fluxo_telemetry::seconds(elapsed), &attributes);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        // Every call is counted and timed in the metrics above; the log keeps the
        // calls that went wrong, and every call when `fluxo::access=debug` is enabled.
        if status == OK || status == RESOURCE_EXHAUSTED {
            tracing::debug!(target: ACCESS, parent: &self.span, grpc_status = status, duration_us = micros, "call finished");
        } else {
            tracing::info!(target: ACCESS, parent: &self.span, grpc_status = status, duration_us = micros, "call finished");
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.finish(CANCELLED);
    }
}

/// A response body that reports the call's status when its trailers pass.
struct MeteredBody {
    inner: Body,
    record: CallRecord,
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.record.finish(grpc_status(trailers).unwrap_or(UNKNOWN));
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => this.record.finish(UNKNOWN),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Wraps `response` so its status is recorded: at once when the headers carry
/// it (trailers-only), else from the trailers.
fn metered(response: Response<Body>, mut record: CallRecord) -> Response<Body> {
    if let Some(status) = grpc_status(response.headers()) {
        record.finish(status);
        return response;
    }
    response.map(|inner| Body::new(MeteredBody { inner, record }))
}

impl<S> Service<Request<Body>> for Admission<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // Probes and reflection are not traffic: never refused, and not measured
        // (they would drown the signals).
        let exempt = exempt(request.uri().path());
        let permit = if exempt {
            None
        } else {
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => return self.refuse(&request),
            }
        };
        let path = request.uri().path().to_owned();
        let id = request_id(request.headers());
        let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((&path, ""));
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            request_id = %id.to_str().unwrap_or_default(),
        );
        fluxo_telemetry::continue_trace(&span, request.headers());
        let record = (!exempt).then(|| CallRecord::new(service, method, span.clone()));
        // The clone that was polled ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(
            async move {
                let mut response = inner.call(request).await?;
                drop(permit);
                response.headers_mut().insert(REQUEST_ID_HEADER, id);
                Ok(match record {
                    Some(record) => metered(response, record),
                    None => response,
                })
            }
            .instrument(span),
        )
    }
}

impl<S> Admission<S> {
    /// RESOURCE_EXHAUSTED at once. Under a flood refusals are most of the work,
    /// so they make no span and no log line of their own: they are measured
    /// like every call, summed up in the log by [`Refusals`], and carry the
    /// request id.
    fn refuse<E: 'static>(
        &self,
        request: &Request<Body>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Body>, E>> + Send>> {
        self.refusals.refused();
        let path = request.uri().path().trim_start_matches('/');
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        let record = CallRecord::new(service, method, tracing::Span::none());
        let mut response: Response<Body> =
            Status::resource_exhausted("server overloaded: too many concurrent calls, retry with backoff")
                .into_http();
        response.headers_mut().insert(REQUEST_ID_HEADER, request_id(request.headers()));
        let response = metered(response, record);
        Box::pin(async move { Ok(response) })
    }
}

#[cfg(test)]
mod tests {
    use super::Refusals;

    #[test]
    fn refusals_are_reported_at_most_once_a_second_and_none_is_left_out() {
        let r = Refusals::new(8);
        assert_eq!(r.count_at(0), Some((1, None)), "the first refusal is reported at once");
        for ms in 1..1_000 {
            assert_eq!(r.count_at(ms), None, "no second report within a second ({ms} ms)");
        }
        assert_eq!(r.count_at(1_000), Some((1_000, Some(1_000))), "999 held back plus this one");
        assert_eq!(r.count_at(5_000), Some((1, Some(4_000))), "a lone refusal after a quiet spell");
    }
}
