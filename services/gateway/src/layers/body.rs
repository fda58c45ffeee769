//! What a request may send: a body of at most `max_body_bytes`, arriving
//! within `body_timeout` once the headers did.

use axum::{body::Body, extract::Request, response::Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;
use tonic::Code;
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_http::limit::{RequestBodyLimitLayer, ResponseBody};

use super::{Next, Refusal, middleware};
use crate::{RequestLimits, error::ApiError};

/// Refuses a request whose `Content-Length` is over the limit (413) without
/// reading a byte of its body; the connection closes rather than take it in.
pub(crate) fn refuse_declared_oversize(limits: RequestLimits) -> impl Layer<Next, Service = Next> + Clone {
    middleware(limits, declared)
}

async fn declared(limits: RequestLimits, request: Request, next: Next) -> Result<Response, Refusal> {
    if declared_length(request.headers()).is_some_and(|n| n > limits.max_body_bytes) {
        return Err(Refusal::Closing(too_large(limits)));
    }
    next.oneshot(request).await
}

/// Bounds the body to the limit as it is read, below this layer: by the
/// handler, or when a refusal drains it. A declared length over the limit
/// never gets here (see [`refuse_declared_oversize`]), so tower-http's own
/// 413 answer is never given.
pub(crate) fn limit(limits: RequestLimits) -> impl Layer<Next, Service = Next> + Clone {
    tower::layer::layer_fn(move |next: Next| {
        Next::new(
            ServiceBuilder::new()
                .map_response(|response: http::Response<ResponseBody<Body>>| response.map(Body::new))
                .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
                .map_request(|request: Request<tower_http::body::Limited<Body>>| request.map(Body::new))
                .service(next),
        )
    })
}

/// Reads the whole body, within the limit (413) and the time allowed (408),
/// and hands it to the handler as bytes.
pub(crate) fn read(limits: RequestLimits) -> impl Layer<Next<Bytes>, Service = Next> + Clone {
    middleware(limits, read_body)
}

async fn read_body(limits: RequestLimits, request: Request, next: Next<Bytes>) -> Result<Response, Refusal> {
    let (parts, body) = request.into_parts();
    let body = match tokio::time::timeout(limits.body_timeout, body.collect()).await {
        Ok(Ok(body)) => body.to_bytes(),
        // Over the limit, or cut off by the client: either way not a request to serve.
        Ok(Err(_)) => return Err(Refusal::Closing(too_large(limits))),
        Err(_) => {
            let error = ApiError::new(
                Code::DeadlineExceeded,
                format!("the request body did not arrive within {} ms", limits.body_timeout.as_millis()),
            )
            .with_http_status(StatusCode::REQUEST_TIMEOUT);
            return Err(Refusal::Closing(error));
        }
    };
    next.oneshot(Request::from_parts(parts, body)).await
}

fn too_large(limits: RequestLimits) -> ApiError {
    ApiError::new(Code::InvalidArgument, format!("request body larger than {} bytes", limits.max_body_bytes))
        .with_http_status(StatusCode::PAYLOAD_TOO_LARGE)
}

/// The `Content-Length` a request declares, if any.
fn declared_length(headers: &HeaderMap) -> Option<usize> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}
