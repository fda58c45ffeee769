//! fluxo's REST/JSON gateway in grpc-gateway v2 style.
//!
//! Routes, request binding and JSON come from the protos' `google.api.http`
//! annotations and descriptors at run time ([`routes`], [`transcode`]); calls
//! are forwarded over gRPC to the ledger and balance targets with the
//! caller's verified identity, request id and trace context.
//!
//! Why descriptor-driven rather than generated code: the gateway runs as its
//! own Deployment and forwards over gRPC, so it needs no handler per RPC — one
//! generic forwarder serves every annotated method, and the same descriptors
//! yield the OpenAPI document ([`openapi`]). Code generators such as
//! `rest_over_grpc` bind REST to handlers in the same process, which would
//! need a hand-written forwarding bridge per service here.

/// Token verification, shared with the gRPC servers.
pub use fluxo_auth as auth;
pub mod error;
mod json;
pub mod openapi;
pub mod ratelimit;
pub mod routes;
pub mod server;
pub mod transcode;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    response::{IntoResponse, Response},
};
use fluxo_server::{REQUEST_ID_HEADER, identity};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use prost_reflect::{DescriptorPool, DynamicMessage, ReflectMessage, Value};
use tonic::{Code, transport::Channel};
use tracing::Instrument;

use crate::{
    auth::Verifier,
    error::ApiError,
    ratelimit::{Decision, RateLimiter},
    routes::{Lookup, Routes},
    transcode::{DynamicCodec, to_json},
};

/// The services the gateway exposes.
pub const SERVICES: [&str; 2] = ["fluxo.ledger.v1.LedgerService", "fluxo.balance.v1.BalanceService"];

/// Where calls go and how they are bounded.
#[derive(Debug, Clone)]
pub struct Backends {
    /// The ledger target.
    pub ledger: Channel,
    /// The balance target.
    pub balance: Channel,
    /// Deadline given to each forwarded call.
    pub timeout: Duration,
    /// Forward the caller's bearer token (gRPC verifies it itself) instead of
    /// the identity it granted (trusted in the mesh from the gateway only).
    pub forward_token: bool,
}

/// The gateway's state.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    pool: DescriptorPool,
    routes: Routes,
    backends: Backends,
    verifier: Verifier,
    limiter: Option<RateLimiter>,
    limits: RequestLimits,
    openapi: String,
    draining: std::sync::atomic::AtomicBool,
}

/// What one request may send.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Largest body accepted (413 beyond it).
    pub max_body_bytes: usize,
    /// How long the body may take to arrive once the headers did (408 after).
    pub body_timeout: Duration,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("routes", &self.inner.routes.all().len()).finish_non_exhaustive()
    }
}

/// Why the gateway could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The descriptor set is unreadable.
    #[error("descriptor set: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
    /// An annotation is unusable.
    #[error(transparent)]
    Route(#[from] routes::RouteError),
}

/// The routes of fluxo's protos.
pub fn fluxo_routes() -> Result<(DescriptorPool, Routes), GatewayError> {
    let pool = DescriptorPool::decode(fluxo_proto::FILE_DESCRIPTOR_SET)?;
    let routes = Routes::from_pool(&pool, &SERVICES)?;
    Ok((pool, routes))
}

/// The OpenAPI document as served and committed under `docs/`.
pub fn openapi_json() -> Result<String, GatewayError> {
    let (_, routes) = fluxo_routes()?;
    let doc = openapi::document(&routes, env!("CARGO_PKG_VERSION"));
    Ok(serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n")
}

impl Gateway {
    /// A gateway forwarding to `backends`.
    pub fn new(
        backends: Backends,
        verifier: Verifier,
        limiter: Option<RateLimiter>,
        limits: RequestLimits,
    ) -> Result<Self, GatewayError> {
        let (pool, routes) = fluxo_routes()?;
        let openapi = openapi_json()?;
        let draining = false.into();
        Ok(Self {
            inner: Arc::new(Inner { pool, routes, backends, verifier, limiter, limits, openapi, draining }),
        })
    }

    /// From now on `/readyz` answers 503 (shutdown has begun); requests are
    /// still served.
    pub fn drain(&self) {
        self.inner.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The HTTP application.
    pub fn router(self, cors: Option<tower_http::cors::CorsLayer>) -> Router {
        let router = Router::new().fallback(handle).with_state(self);
        match cors {
            Some(cors) => router.layer(cors),
            None => router,
        }
    }
}

fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(REQUEST_ID_HEADER)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(u8::is_ascii_graphic))
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&ulid::Ulid::new().to_string()).unwrap_or(HeaderValue::from_static("-"))
        })
}

async fn handle(State(gateway): State<Gateway>, request: Request) -> Response {
    let id = request_id(request.headers());
    // The span is named by its route template (bounded cardinality), known before it starts.
    let route = match gateway.inner.routes.lookup(request.method(), request.uri().path()) {
        Lookup::Found(route, _) => route.template.as_str().to_owned(),
        _ => "unmatched".to_owned(),
    };
    let span = tracing::info_span!(
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
    let mut response = gateway.serve(request).instrument(span.clone()).await;
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
    response
}

impl Gateway {
    async fn serve(&self, request: Request) -> Response {
        let inner = &self.inner;
        let path = request.uri().path();
        match (request.method(), path) {
            (&Method::GET, "/healthz") => return (StatusCode::OK, "ok\n").into_response(),
            // Boxed, like the other awaits of client calls below: a gRPC or Redis
            // call is a future of kilobytes, and in place it would make every
            // request's future as large, copied on each move.
            (&Method::GET, "/readyz") => return Box::pin(self.ready()).await,
            (&Method::GET, "/openapi.json") => {
                return ([(header::CONTENT_TYPE, "application/json")], inner.openapi.clone()).into_response();
            }
            _ => {}
        }
        let (route, bindings) = match inner.routes.lookup(request.method(), path) {
            Lookup::Found(route, bindings) => (route.clone(), bindings),
            Lookup::MethodNotAllowed(allowed) => {
                let allow = allowed.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
                let error = ApiError::new(Code::Unimplemented, "method not allowed")
                    .with_http_status(StatusCode::METHOD_NOT_ALLOWED)
                    .with_header(
                        header::ALLOW,
                        HeaderValue::from_str(&allow).unwrap_or(HeaderValue::from_static("GET")),
                    );
                return self.refuse(request, error).await;
            }
            Lookup::NotFound => {
                return self.refuse(request, ApiError::new(Code::NotFound, "no such route")).await;
            }
        };
        // A body declared larger than the limit is refused before a byte of it is read.
        if declared_length(request.headers()).is_some_and(|n| n > inner.limits.max_body_bytes) {
            return close(self.too_large().into_response());
        }

        let authorization = request.headers().get(header::AUTHORIZATION);
        // A token not verified lately costs a signature check: those are limited
        // per client address, apart from the verified clients' allowance, so a
        // flood of forged or missing tokens is cheap to refuse and starves no one.
        if !inner.verifier.is_known(authorization)
            && let Some(limiter) = &inner.limiter
        {
            let peer = server::peer(&request).map_or_else(|| "unknown".to_owned(), |a| a.ip().to_string());
            let decision = Box::pin(limiter.check_unverified(&peer)).await;
            if !decision.allowed {
                tracing::debug!(%peer, "unverified requests rate limited");
                return self.refuse(request, rate_limited(&decision, "unverified")).await;
            }
        }
        let identity = match inner.verifier.verify(authorization) {
            Ok(identity) => identity,
            Err(error) => {
                tracing::debug!(%error, "unauthenticated");
                let error = ApiError::new(Code::Unauthenticated, "a valid bearer token is required")
                    .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return self.refuse(request, error).await;
            }
        };
        let decision = match &inner.limiter {
            Some(limiter) => Some(Box::pin(limiter.check(&identity.subject, identity.tier.as_deref())).await),
            None => None,
        };
        if let Some(d) = decision.filter(|d| !d.allowed) {
            tracing::debug!(subject = %identity.subject, "rate limited");
            let tier = identity.tier.clone().unwrap_or_else(|| "default".to_owned());
            return self.refuse(request, rate_limited(&d, &tier)).await;
        }

        let (parts, body) = request.into_parts();
        let limits = inner.limits;
        let body = match tokio::time::timeout(
            limits.body_timeout,
            axum::body::to_bytes(body, limits.max_body_bytes),
        )
        .await
        {
            Ok(Ok(body)) => body,
            Ok(Err(_)) => return close(self.too_large().into_response()),
            Err(_) => {
                let error = ApiError::new(
                    Code::DeadlineExceeded,
                    format!("the request body did not arrive within {} ms", limits.body_timeout.as_millis()),
                )
                .with_http_status(StatusCode::REQUEST_TIMEOUT);
                return close(error.into_response());
            }
        };
        if !route.body.is_empty() && !body.is_empty() && !is_json(&parts.headers) {
            return ApiError::new(Code::InvalidArgument, "content type must be application/json")
                .with_http_status(StatusCode::UNSUPPORTED_MEDIA_TYPE)
                .into_response();
        }
        let mut message = match transcode::request(&route, &bindings, parts.uri.query(), &body) {
            Ok(message) => message,
            Err(error) => return ApiError::bind(&error).into_response(),
        };
        if let Err(e) = idempotency_key(&mut message, &parts.headers) {
            return e.into_response();
        }
        let merchant = match message.get_field_by_name("merchant_id").as_deref() {
            Some(Value::String(m)) => m.clone(),
            _ => String::new(),
        };
        if !identity.may_act_for(&merchant) {
            return ApiError::new(
                Code::PermissionDenied,
                format!("the token may not act for merchant {merchant}"),
            )
            .into_response();
        }
        let mut response = self.forward(&route, message, &identity, &parts.headers).await;
        if let Some(d) = decision {
            for (name, value) in rate_headers(&d) {
                response.headers_mut().insert(name, value);
            }
        }
        response
    }

    fn too_large(&self) -> ApiError {
        ApiError::new(
            Code::InvalidArgument,
            format!("request body larger than {} bytes", self.inner.limits.max_body_bytes),
        )
        .with_http_status(StatusCode::PAYLOAD_TOO_LARGE)
    }

    /// Answers `error` to a request whose body was not read. HTTP/1.1 can reuse
    /// the connection only once the body is consumed, so it is read and dropped
    /// (within the body limits); otherwise the answer says `Connection: close`
    /// rather than leaving the client to find the connection closed under its
    /// next request.
    async fn refuse(&self, request: Request, error: ApiError) -> Response {
        let limits = self.inner.limits;
        let drained =
            tokio::time::timeout(limits.body_timeout, discard(request.into_body(), limits.max_body_bytes))
                .await
                .unwrap_or(false);
        let response = error.into_response();
        if drained { response } else { close(response) }
    }

    async fn forward(
        &self,
        route: &routes::Route,
        message: DynamicMessage,
        identity: &auth::Identity,
        headers: &HeaderMap,
    ) -> Response {
        let inner = &self.inner;
        let service = route.rpc.parent_service();
        let channel = if service.full_name().starts_with("fluxo.ledger") {
            inner.backends.ledger.clone()
        } else {
            inner.backends.balance.clone()
        };
        let mut call = tonic::Request::new(message);
        call.set_timeout(inner.backends.timeout);
        let metadata = call.metadata_mut();
        let mut put = |name: &'static str, value: &str| {
            if let Ok(v) = value.parse() {
                metadata.insert(name, v);
            }
        };
        if inner.backends.forward_token {
            if let Some(token) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
                put("authorization", token);
            }
        } else {
            put(identity::SUBJECT, &identity.subject);
            put(identity::MERCHANTS, &identity.merchants.join(","));
            if identity.admin {
                put(identity::ADMIN, "true");
            }
        }
        if let Some(id) = headers.get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()) {
            put(REQUEST_ID_HEADER, id);
        }
        let (traceparent, tracestate) = fluxo_telemetry::current_trace_context();
        if let Some(tp) = traceparent {
            put("traceparent", &tp);
        }
        if let Some(ts) = tracestate {
            put("tracestate", &ts);
        }
        let path = format!("/{}/{}", service.full_name(), route.rpc.name());
        let Ok(path) = path.parse::<http::uri::PathAndQuery>() else {
            return ApiError::new(Code::Internal, "internal error").into_response();
        };
        let mut grpc = tonic::client::Grpc::new(channel);
        if let Err(error) = grpc.ready().await {
            tracing::warn!(%error, backend = service.full_name(), "backend unavailable");
            return ApiError::new(Code::Unavailable, "the service is unavailable; retry later")
                .into_response();
        }
        match Box::pin(grpc.unary(call, path, DynamicCodec::new(route.rpc.output()))).await {
            Ok(reply) => {
                let replayed = reply.metadata().get("fluxo-idempotent-replayed").is_some();
                let mut response =
                    ([(header::CONTENT_TYPE, "application/json")], to_json(reply.get_ref())).into_response();
                if replayed {
                    response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
                }
                response
            }
            Err(status) => ApiError::from_status(&status, &inner.pool).into_response(),
        }
    }

    async fn ready(&self) -> Response {
        if self.inner.draining.load(std::sync::atomic::Ordering::Relaxed) {
            return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
        }
        let backends = &self.inner.backends;
        for channel in [&backends.ledger, &backends.balance] {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            let mut check =
                tonic::Request::new(tonic_health::pb::HealthCheckRequest { service: String::new() });
            check.set_timeout(Duration::from_secs(1));
            let serving = matches!(
                health.check(check).await.map(|r| r.into_inner().status()),
                Ok(tonic_health::pb::health_check_response::ServingStatus::Serving)
            );
            if !serving {
                return (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response();
            }
        }
        (StatusCode::OK, "ready\n").into_response()
    }
}

/// Reads and drops a body; false when it is larger than `limit` or broken.
async fn discard(body: Body, limit: usize) -> bool {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                seen = seen.saturating_add(frame.data_ref().map_or(0, bytes::Bytes::len));
                if seen > limit {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// Marks the answer as the last on its connection.
fn close(mut response: Response) -> Response {
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The `Content-Length` a request declares, if any.
fn declared_length(headers: &HeaderMap) -> Option<usize> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// A 429 with the retry time and rate-limit headers, counted by tier.
fn rate_limited(d: &Decision, tier: &str) -> ApiError {
    RATE_LIMITED
        .add(1, &[fluxo_telemetry::opentelemetry::KeyValue::new("fluxo.rate_limit.tier", tier.to_owned())]);
    let mut e = ApiError::new(Code::ResourceExhausted, "rate limit exceeded; retry later")
        .with_header(header::RETRY_AFTER, HeaderValue::from(ceil_secs(d.retry_after).max(1)));
    for (name, value) in rate_headers(d) {
        e = e.with_header(name, value);
    }
    e
}

static RATE_LIMITED: std::sync::LazyLock<fluxo_telemetry::opentelemetry::metrics::Counter<u64>> =
    std::sync::LazyLock::new(|| {
        fluxo_telemetry::meter()
            .u64_counter("fluxo.gateway.rate_limited")
            .with_description("Requests refused with 429 by the shared rate limit")
            .build()
    });

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            let v = v.trim();
            v.eq_ignore_ascii_case("application/json") || v.to_ascii_lowercase().ends_with("+json")
        })
}

/// `Idempotency-Key` maps to `request_id`; both given and different is an error.
fn idempotency_key(message: &mut DynamicMessage, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = headers.get("idempotency-key") else { return Ok(()) };
    let key = key.to_str().map_err(|_| {
        ApiError::bind(&transcode::BindError {
            field: "Idempotency-Key".into(),
            reason: "must be printable ASCII".into(),
        })
    })?;
    let Some(field) = message.descriptor().get_field_by_name("request_id") else { return Ok(()) };
    match message.get_field(&field).as_ref() {
        Value::String(existing) if !existing.is_empty() && existing != key => {
            Err(ApiError::bind(&transcode::BindError {
                field: "Idempotency-Key".into(),
                reason: "differs from requestId in the body".into(),
            }))
        }
        _ => {
            message.set_field(&field, Value::String(key.to_owned()));
            Ok(())
        }
    }
}

/// Whole seconds, rounded up (HTTP headers count in seconds).
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn rate_headers(d: &Decision) -> Vec<(HeaderName, HeaderValue)> {
    vec![
        (HeaderName::from_static("ratelimit-limit"), HeaderValue::from(d.limit)),
        (HeaderName::from_static("ratelimit-remaining"), HeaderValue::from(d.remaining)),
        (HeaderName::from_static("ratelimit-reset"), HeaderValue::from(ceil_secs(d.reset))),
    ]
}

/// A body of JSON bytes (for tests and tools).
pub fn json_body(value: &serde_json::Value) -> Body {
    Body::from(value.to_string())
}
