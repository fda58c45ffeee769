//! Liveness, readiness and the OpenAPI document: `GET /healthz`, `/readyz`
//! and `/openapi.json`.

use std::time::Duration;

use axum::{
    extract::Request,
    response::{IntoResponse, Response},
};
use http::{Method, StatusCode, header};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tower::{Layer, ServiceExt};

use super::{Next, Refusal, middleware};
use crate::Gateway;

/// Answers the probes and the document; passes every other request on.
pub(crate) fn layer(gateway: Gateway) -> impl Layer<Next, Service = Next> + Clone {
    middleware(gateway, probe)
}

async fn probe(gateway: Gateway, request: Request, next: Next) -> Result<Response, Refusal> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => Ok((StatusCode::OK, "ok\n").into_response()),
        // Boxed: a gRPC call is a future of kilobytes, and in place it would
        // make this layer's future as large for every request.
        (&Method::GET, "/readyz") => Ok(Box::pin(ready(&gateway)).await),
        (&Method::GET, "/openapi.json") => {
            let document = gateway.inner.openapi.clone();
            Ok(([(header::CONTENT_TYPE, "application/json")], document).into_response())
        }
        _ => next.oneshot(request).await,
    }
}

/// 200 when both backends report SERVING, 503 once shutdown has begun.
async fn ready(gateway: &Gateway) -> Response {
    if gateway.inner.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let backends = &gateway.inner.backends;
    for channel in [&backends.ledger, &backends.balance] {
        let mut health = HealthClient::new(channel.clone());
        let mut check = tonic::Request::new(HealthCheckRequest { service: String::new() });
        check.set_timeout(Duration::from_secs(1));
        let serving =
            matches!(health.check(check).await.map(|r| r.into_inner().status()), Ok(ServingStatus::Serving));
        if !serving {
            return (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response();
        }
    }
    (StatusCode::OK, "ready\n").into_response()
}
