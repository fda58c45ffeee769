//! One tower layer for what every call needs before it reaches a handler.
//!
//! Written here rather than composed from `tower::load_shed` and
//! `tower::limit` because those cannot exempt health checks: under overload a
//! kubelet probe would be shed, and Kubernetes would restart a pod that is
//! merely busy.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{HeaderValue, Request, Response};
use tokio::sync::Semaphore;
use tonic::{Status, body::Body};
use tower::{Layer, Service};
use tracing::Instrument;

/// Header carrying the request id, accepted from the caller or minted here.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Adds admission control, a request span and a request id to a service.
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    permits: Arc<Semaphore>,
}

impl AdmissionLayer {
    /// Admits at most `max_concurrent` calls at once (health and reflection exempt).
    pub fn new(max_concurrent: usize) -> Self {
        Self { permits: Arc::new(Semaphore::new(max_concurrent.max(1))) }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission { inner, permits: self.permits.clone() }
    }
}

/// The service produced by [`AdmissionLayer`].
#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

fn exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

/// The caller's request id when it is a sane token; a fresh one otherwise.
fn request_id(request: &Request<Body>) -> HeaderValue {
    request
        .headers()
        .get(REQUEST_ID_HEADER)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(u8::is_ascii_graphic))
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&ulid::Ulid::new().to_string())
                .unwrap_or(HeaderValue::from_static("unknown"))
        })
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
        let path = request.uri().path().to_owned();
        let id = request_id(&request);
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

        let permit = if exempt(&path) {
            None
        } else {
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    span.in_scope(|| tracing::warn!("overloaded: call refused"));
                    let mut response: Response<Body> = Status::resource_exhausted(
                        "server overloaded: too many concurrent calls, retry with backoff",
                    )
                    .into_http();
                    response.headers_mut().insert(REQUEST_ID_HEADER, id);
                    return Box::pin(async move { Ok(response) });
                }
            }
        };
        // The clone that was polled ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(
            async move {
                let mut response = inner.call(request).await?;
                drop(permit);
                response.headers_mut().insert(REQUEST_ID_HEADER, id);
                Ok(response)
            }
            .instrument(span),
        )
    }
}
