//! fluxo's REST/JSON gateway in grpc-gateway v2 style.
//!
//! Routes, request binding and JSON come from the protos' `google.api.http`
//! annotations and descriptors at run time ([`routes`], [`transcode`]); calls
//! are forwarded over gRPC to the ledger and balance targets with the
//! caller's verified identity, request id and trace context. A request goes
//! through a stack of tower layers ([`Gateway::router`]), one per check, down
//! to the handler that forwards it.
//!
//! Why descriptor-driven rather than generated code: the gateway runs as its
//! own Deployment and forwards over gRPC, so it needs no handler per RPC — one
//! generic forwarder serves every annotated method, and the same descriptors
//! yield the OpenAPI document ([`openapi`]). Code generators such as
//! `rest_over_grpc` bind REST to handlers in the same process, which would
//! need a hand-written forwarding bridge per service here.

/// Token verification, shared with the gRPC servers.
pub use fluxo_auth as auth;
mod download;
pub mod error;
mod forward;
mod json;
mod layers;
pub mod openapi;
pub mod ratelimit;
pub mod routes;
pub mod server;
pub mod transcode;

use std::{sync::Arc, time::Duration};

use axum::{Router, body::Body, extract::Request};
use prost_reflect::DescriptorPool;
use tonic::transport::Channel;
use tower::{ServiceBuilder, ServiceExt};

use crate::{auth::Verifier, ratelimit::RateLimiter, routes::Routes};

/// Target of the gateway's own log events and spans: the crate's name
/// wherever in it the code sits, so log filters and queries keep matching.
const LOG_TARGET: &str = module_path!();

/// The services the gateway exposes.
pub const SERVICES: [&str; 3] =
    ["fluxo.ledger.v1.LedgerService", "fluxo.balance.v1.BalanceService", "fluxo.webhooks.v1.WebhookService"];

/// Whether the ledger target serves `service` (the write side, and the
/// webhook subscriptions kept in its database); the balance target serves the rest.
pub(crate) fn served_by_ledger(service: &str) -> bool {
    service.starts_with("fluxo.ledger.") || service.starts_with("fluxo.webhooks.")
}

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

    /// The HTTP application: the gateway's layers, outermost first, over the
    /// handler that forwards to the backends. The order is the order of the
    /// checks, each refusing before the next costs anything.
    pub fn router(self, cors: Option<tower_http::cors::CorsLayer>) -> Router {
        let limits = self.inner.limits;
        let stack = ServiceBuilder::new()
            // Before the span: the span is named by the route's template.
            .layer(layers::route::lookup(self.clone()))
            // Outermost that answers: every response, refusals included, gets
            // the request id, the span and an access-log line.
            .layer(layers::access::layer())
            // Refusals become responses here, once, inside the span; a body
            // left unread by one is drained or its connection closed.
            .layer(layers::refusals(limits))
            // Probes and the document need no route, token or allowance.
            .layer(layers::probes::layer(self.clone()))
            // No route, no point checking anything else (404, 405).
            .layer(layers::route::refuse_unrouted())
            // A declared oversize body: 413 before any token is checked.
            .layer(layers::body::refuse_declared_oversize(limits))
            // Bodies bounded from here on, when read or drained.
            .layer(layers::body::limit(limits))
            // Before verifying a token, which costs a signature check.
            .layer(layers::limit::unverified(self.clone()))
            // The caller's identity, which the layers below need.
            .layer(layers::auth::authenticate(self.clone()))
            // Per subject, before its body is read; reports on the answers.
            .layer(layers::limit::per_subject(self.clone()))
            // The body in full, only for a request that is allowed.
            .layer(layers::body::read(limits))
            .service(forward::endpoint(self));
        // As a handler rather than `fallback_service`: axum then gives the
        // answer its Content-Length and strips the body of answers to HEAD.
        let router = Router::new().fallback(|request: Request| async move {
            let Ok(response) = stack.oneshot(request).await;
            response
        });
        match cors {
            Some(cors) => router.layer(cors),
            None => router,
        }
    }
}

/// A body of JSON bytes (for tests and tools).
pub fn json_body(value: &serde_json::Value) -> Body {
    Body::from(value.to_string())
}
