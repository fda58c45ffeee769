//! Which route a request is for: looked up once, refused when there is none.

use std::convert::Infallible;

use axum::{body::Body, extract::Request, response::Response};
use http::{HeaderValue, Method, StatusCode, header};
use tonic::Code;
use tower::{Layer, ServiceExt};

use super::{Next, Refusal, middleware};
use crate::{
    Gateway,
    error::ApiError,
    routes::{Lookup, Route},
};

/// What the lookup found, in the request's extensions.
#[derive(Debug, Clone)]
pub(crate) enum Routed {
    /// The route and its path bindings.
    Found(Matched),
    /// The path exists with these methods only.
    MethodNotAllowed(Vec<Method>),
    /// No route has this path.
    NotFound,
}

/// The route of a request that has one, in the request's extensions once
/// [`refuse_unrouted`] let it through.
#[derive(Debug, Clone)]
pub(crate) struct Matched {
    /// The route.
    pub(crate) route: Route,
    /// The fields its path binds.
    pub(crate) bindings: Vec<(String, String)>,
}

/// Looks the request's route up and puts what it found, a [`Routed`], in the
/// request's extensions.
pub(crate) fn lookup(
    gateway: Gateway,
) -> impl Layer<Next<Body, Infallible>, Service = Next<Body, Infallible>> + Clone {
    middleware(gateway, looked_up)
}

async fn looked_up(
    gateway: Gateway,
    mut request: Request,
    next: Next<Body, Infallible>,
) -> Result<Response, Infallible> {
    let routed = match gateway.inner.routes.lookup(request.method(), request.uri().path()) {
        Lookup::Found(route, bindings) => Routed::Found(Matched { route: route.clone(), bindings }),
        Lookup::MethodNotAllowed(allowed) => Routed::MethodNotAllowed(allowed),
        Lookup::NotFound => Routed::NotFound,
    };
    request.extensions_mut().insert(routed);
    next.oneshot(request).await
}

/// Refuses a request without a route: 405 with `Allow` when the path has
/// other methods, 404 otherwise. A routed request goes on with its
/// [`Matched`] route in its extensions.
pub(crate) fn refuse_unrouted() -> impl Layer<Next, Service = Next> + Clone {
    middleware((), refusing_unrouted)
}

async fn refusing_unrouted((): (), mut request: Request, next: Next) -> Result<Response, Refusal> {
    let error = match request.extensions_mut().remove::<Routed>() {
        Some(Routed::Found(matched)) => {
            request.extensions_mut().insert(matched);
            return next.oneshot(request).await;
        }
        Some(Routed::MethodNotAllowed(allowed)) => method_not_allowed(&allowed),
        Some(Routed::NotFound) | None => ApiError::new(Code::NotFound, "no such route"),
    };
    Err(Refusal::Unread(error, request.into_body()))
}

fn method_not_allowed(allowed: &[Method]) -> ApiError {
    let allow = allowed.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
    ApiError::new(Code::Unimplemented, "method not allowed")
        .with_http_status(StatusCode::METHOD_NOT_ALLOWED)
        .with_header(header::ALLOW, HeaderValue::from_str(&allow).unwrap_or(HeaderValue::from_static("GET")))
}
