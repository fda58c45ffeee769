//! Who is calling: the bearer token verified, the caller's identity put in
//! the request's extensions.

use axum::{extract::Request, response::Response};
use http::{HeaderValue, header};
use tonic::Code;
use tower::{Layer, ServiceExt};

use super::{Next, Refusal, middleware};
use crate::{Gateway, LOG_TARGET, error::ApiError};

/// Refuses a request without a valid bearer token (401 with
/// `WWW-Authenticate: Bearer`); puts the [`crate::auth::Identity`] it grants
/// in the request's extensions.
pub(crate) fn authenticate(gateway: Gateway) -> impl Layer<Next, Service = Next> + Clone {
    middleware(gateway, authenticated)
}

async fn authenticated(gateway: Gateway, mut request: Request, next: Next) -> Result<Response, Refusal> {
    match gateway.inner.verifier.verify(request.headers().get(header::AUTHORIZATION)) {
        Ok(identity) => {
            request.extensions_mut().insert(identity);
            next.oneshot(request).await
        }
        Err(error) => {
            tracing::debug!(target: LOG_TARGET, %error, "unauthenticated");
            let error = ApiError::new(Code::Unauthenticated, "a valid bearer token is required")
                .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            Err(Refusal::Unread(error, request.into_body()))
        }
    }
}
