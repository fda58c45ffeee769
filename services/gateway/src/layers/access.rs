//! The request id, the request's span and the access log.

use std::convert::Infallible;

use axum::{body::Body, extract::Request, response::Response};
use fluxo_server::REQUEST_ID_HEADER;
use http::HeaderName;
use tower::{Layer, ServiceExt};
use tracing::Instrument;

use super::{Next, middleware, route::Routed};
use crate::LOG_TARGET;

/// Gives every answer the caller's request id (or a new one), runs the rest
/// of the stack in an `http.server` span continuing the caller's trace, and
/// writes one access-log line per request.
pub(crate) fn layer() -> impl Layer<Next<Body, Infallible>, Service = Next<Body, Infallible>> + Clone {
    middleware((), logged)
}

async fn logged((): (), mut request: Request, next: Next<Body, Infallible>) -> Result<Response, Infallible> {
    let id = fluxo_server::request_id(request.headers());
    // The backends see the id the answer carries (the caller's, or the one minted here).
    request.headers_mut().insert(HeaderName::from_static(REQUEST_ID_HEADER), id.clone());
    // The span is named by its route template (bounded cardinality), known before it starts.
    let route = match request.extensions().get::<Routed>() {
        Some(Routed::Found(matched)) => matched.route.template.as_str(),
        _ => "unmatched",
    };
    let span = tracing::info_span!(
        target: LOG_TARGET,
        "http.server",
        otel.kind = "server",
        otel.name = %format!("{} {route}", request.method()),
        http.request.method = %request.method(),
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        request_id = %id.to_str().unwrap_or_default(),
    );
    fluxo_telemetry::continue_trace(&span, request.headers());
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let Ok(mut response) = next.oneshot(request).instrument(span.clone()).await;
    response.headers_mut().insert(HeaderName::from_static(REQUEST_ID_HEADER), id);
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    // The access log: never the Authorization header, never a body.
    // OK answers at DEBUG, the rest at INFO (see fluxo_server::ACCESS).
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    span.in_scope(|| {
        if status < 400 {
            tracing::debug!(target: fluxo_server::ACCESS, %method, %path, status, elapsed_ms, "request");
        } else {
            tracing::info!(target: fluxo_server::ACCESS, %method, %path, status, elapsed_ms, "request");
        }
    });
    Ok(response)
}
