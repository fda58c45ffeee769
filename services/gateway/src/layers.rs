//! The middleware of the gateway's stack, one module per concern, and what
//! they share: the shape of a layer ([`middleware`]), the rest of the stack as a
//! layer sees it ([`Next`]), and [`Refusal`], the one way a layer answers a
//! request itself, turned into a response once by [`refusals`].
//!
//! The stack itself is composed in one place, [`crate::Gateway::router`].

pub(crate) mod access;
pub(crate) mod auth;
pub(crate) mod body;
pub(crate) mod limit;
pub(crate) mod probes;
pub(crate) mod route;

use std::{convert::Infallible, time::Duration};

use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use http::{HeaderValue, Request, header};
use tower::{Layer, ServiceExt, util::BoxCloneSyncService};

use crate::{RequestLimits, error::ApiError};

/// The rest of the stack below a layer: requests with a body of type `B`,
/// refused with `E`.
pub(crate) type Next<B = Body, E = Refusal> = BoxCloneSyncService<Request<B>, Response, E>;

/// A layer made of one async function of some state, the request and the
/// rest of the stack: `step(state, request, next)` answers the request itself
/// or calls `next`. Each layer's future is boxed, so no request carries the
/// largest future of every layer (gRPC and Redis calls are kilobytes) in place.
pub(crate) fn middleware<T, B, S, E, F, Fut>(
    state: T,
    step: F,
) -> impl Layer<S, Service = BoxCloneSyncService<Request<B>, Response, E>> + Clone
where
    T: Clone + Send + Sync + 'static,
    F: Fn(T, Request<B>, S) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response, E>> + Send + 'static,
    S: Clone + Send + Sync + 'static,
    B: 'static,
{
    tower::layer::layer_fn(move |next: S| {
        let (state, step) = (state.clone(), step.clone());
        BoxCloneSyncService::new(tower::service_fn(move |request| step(state.clone(), request, next.clone())))
    })
}

/// A request the gateway answers itself, with what that leaves of the
/// connection.
pub(crate) enum Refusal {
    /// Refused once its body was read: the answer is all there is to send.
    Read(ApiError),
    /// Refused before its body was read. HTTP/1.1 can reuse the connection
    /// only once the body is consumed, so it is read and dropped (within the
    /// body limits); otherwise the answer says `Connection: close` rather than
    /// leaving the client to find the connection closed under its next request.
    Unread(ApiError, Body),
    /// Refused with its body unread or half read, which is not worth draining
    /// (too large, too slow): the answer is the last on its connection.
    Closing(ApiError),
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        Self::Read(error)
    }
}

impl Refusal {
    /// The response, once the body is drained or given up on.
    async fn answer(self, limits: RequestLimits) -> Response {
        match self {
            Self::Read(error) => error.into_response(),
            Self::Closing(error) => close(error.into_response()),
            Self::Unread(error, body) => {
                let drained = discard(body, limits.max_body_bytes, limits.body_timeout).await;
                let response = error.into_response();
                if drained { response } else { close(response) }
            }
        }
    }
}

/// Turns refusals into responses, the one place errors are answered.
pub(crate) fn refusals(limits: RequestLimits) -> impl Layer<Next, Service = Next<Body, Infallible>> + Clone {
    middleware(limits, answered)
}

async fn answered(limits: RequestLimits, request: Request<Body>, next: Next) -> Result<Response, Infallible> {
    Ok(match next.oneshot(request).await {
        Ok(response) => response,
        Err(refusal) => refusal.answer(limits).await,
    })
}

/// Reads and drops a body; false when it is larger than `limit`, broken, or
/// not over within `timeout`. The size is counted here because unknown routes
/// are refused above the body-limit layer.
async fn discard(body: Body, limit: usize, timeout: Duration) -> bool {
    use http_body_util::BodyExt;
    let read = async move {
        let mut body = body;
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            seen = seen.saturating_add(frame.data_ref().map_or(0, bytes::Bytes::len));
            if seen > limit {
                return false;
            }
        }
        true
    };
    tokio::time::timeout(timeout, read).await.unwrap_or(false)
}

/// Marks the answer as the last on its connection.
fn close(mut response: Response) -> Response {
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
