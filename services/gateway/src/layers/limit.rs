//! The shared rate limits ([`crate::ratelimit`]) applied to requests: per
//! client address for tokens still to be verified, per verified subject for
//! the rest, each refusal a 429 with `Retry-After` and the RateLimit headers.

use std::{sync::LazyLock, time::Duration};

use axum::{extract::Request, response::Response};
use fluxo_telemetry::opentelemetry::{KeyValue, metrics::Counter};
use http::{HeaderName, HeaderValue, header};
use tonic::Code;
use tower::{Layer, ServiceExt};

use super::{Next, Refusal, middleware};
use crate::{Gateway, LOG_TARGET, auth::Identity, error::ApiError, ratelimit::Decision, server};

/// Limits requests whose token was not verified lately, per client address.
/// Such a token costs a signature check: those requests have their own
/// allowance, apart from the verified clients', so a flood of forged or
/// missing tokens is cheap to refuse and starves no one.
pub(crate) fn unverified(gateway: Gateway) -> impl Layer<Next, Service = Next> + Clone {
    middleware(gateway, limit_unverified)
}

async fn limit_unverified(gateway: Gateway, request: Request, next: Next) -> Result<Response, Refusal> {
    let inner = &gateway.inner;
    if !inner.verifier.is_known(request.headers().get(header::AUTHORIZATION))
        && let Some(limiter) = &inner.limiter
    {
        let peer = server::peer(&request).map_or_else(|| "unknown".to_owned(), |a| a.ip().to_string());
        // Boxed: a Redis call is a future of kilobytes.
        let decision = Box::pin(limiter.check_unverified(&peer)).await;
        if !decision.allowed {
            tracing::debug!(target: LOG_TARGET, %peer, "unverified requests rate limited");
            return Err(Refusal::Unread(rate_limited(&decision, "unverified"), request.into_body()));
        }
    }
    next.oneshot(request).await
}

/// Limits the authenticated subject (the [`Identity`] in the request's
/// extensions) by its tier, and reports its allowance on the answers the
/// backends gave.
pub(crate) fn per_subject(gateway: Gateway) -> impl Layer<Next, Service = Next> + Clone {
    middleware(gateway, limit_subject)
}

async fn limit_subject(gateway: Gateway, request: Request, next: Next) -> Result<Response, Refusal> {
    let (Some(limiter), Some(identity)) = (&gateway.inner.limiter, request.extensions().get::<Identity>())
    else {
        return next.oneshot(request).await;
    };
    // Boxed: a Redis call is a future of kilobytes.
    let decision = Box::pin(limiter.check(&identity.subject, identity.tier.as_deref())).await;
    if !decision.allowed {
        tracing::debug!(target: LOG_TARGET, subject = %identity.subject, "rate limited");
        let tier = identity.tier.clone().unwrap_or_else(|| "default".to_owned());
        return Err(Refusal::Unread(rate_limited(&decision, &tier), request.into_body()));
    }
    // A refusal from below (a bad request, a forbidden merchant) is answered
    // without the headers: only the backends' answers carry them.
    let mut response = next.oneshot(request).await?;
    for (name, value) in rate_headers(&decision) {
        response.headers_mut().insert(name, value);
    }
    Ok(response)
}

/// Requests refused with 429, by tier; built on first use, after telemetry is installed.
static RATE_LIMITED: LazyLock<Counter<u64>> = LazyLock::new(|| {
    fluxo_telemetry::meter()
        .u64_counter("fluxo.gateway.rate_limited")
        .with_description("Requests refused with 429 by the shared rate limit")
        .build()
});

/// A 429 with the retry time and rate-limit headers, counted by tier.
fn rate_limited(d: &Decision, tier: &str) -> ApiError {
    RATE_LIMITED.add(1, &[KeyValue::new("fluxo.rate_limit.tier", tier.to_owned())]);
    let mut e = ApiError::new(Code::ResourceExhausted, "rate limit exceeded; retry later")
        .with_header(header::RETRY_AFTER, HeaderValue::from(ceil_secs(d.retry_after).max(1)));
    for (name, value) in rate_headers(d) {
        e = e.with_header(name, value);
    }
    e
}

fn rate_headers(d: &Decision) -> [(HeaderName, HeaderValue); 3] {
    [
        (HeaderName::from_static("ratelimit-limit"), HeaderValue::from(d.limit)),
        (HeaderName::from_static("ratelimit-remaining"), HeaderValue::from(d.remaining)),
        (HeaderName::from_static("ratelimit-reset"), HeaderValue::from(ceil_secs(d.reset))),
    ]
}

/// Whole seconds, rounded up (HTTP headers count in seconds).
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}
