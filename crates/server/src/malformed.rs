//! A request the server cannot read is the caller's fault: INVALID_ARGUMENT,
//! not INTERNAL.
//!
//! tonic answers a request it cannot decode (bad protobuf, a truncated frame,
//! the compressed flag without `grpc-encoding`, an empty body) with INTERNAL,
//! before any handler runs. Callers, retry policies and the mesh read INTERNAL
//! as a server fault — alerts fire, and retries resend the same bad bytes. No
//! tonic setting changes that code, so this layer rewrites exactly those
//! answers: trailers-only responses whose message is one of tonic's request
//! decoding errors. A handler's own INTERNAL (`internal error`) is untouched.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};

/// The messages tonic (and prost, through tonic-prost) gives a request body
/// it cannot decode. Pinned by the wire tests in `tests/malformed.rs`.
const DECODE_ERRORS: [&str; 6] = [
    "failed to decode Protobuf message",
    "protocol error: received message with compressed-flag but no grpc-encoding",
    "protocol error: received message with invalid compression flag",
    "Unexpected EOF decoding stream",
    "Missing request message",
    "Error decompressing",
];

const INTERNAL: &str = "13";
const INVALID_ARGUMENT: HeaderValue = HeaderValue::from_static("3");

/// Answers requests tonic could not decode with INVALID_ARGUMENT.
#[derive(Debug, Clone, Copy, Default)]
pub struct MalformedRequestLayer;

impl<S> Layer<S> for MalformedRequestLayer {
    type Service = MalformedRequest<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MalformedRequest { inner }
    }
}

/// See [`MalformedRequestLayer`].
#[derive(Debug, Clone)]
pub struct MalformedRequest<S> {
    inner: S,
}

impl<S, B, R> Service<Request<B>> for MalformedRequest<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let call = self.inner.call(request);
        Box::pin(async move {
            let mut response = call.await?;
            if is_decode_error(response.headers()) {
                response.headers_mut().insert("grpc-status", INVALID_ARGUMENT);
            }
            Ok(response)
        })
    }
}

fn is_decode_error(headers: &http::HeaderMap) -> bool {
    if headers.get("grpc-status").map(HeaderValue::as_bytes) != Some(INTERNAL.as_bytes()) {
        return false;
    }
    // grpc-message is percent-encoded (tonic encodes spaces too).
    let raw = headers.get("grpc-message").map(HeaderValue::as_bytes).unwrap_or_default();
    let message = percent_encoding::percent_decode(raw).decode_utf8_lossy();
    DECODE_ERRORS.iter().any(|prefix| message.starts_with(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(status: &'static str, message: &'static str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static(status));
        h.insert("grpc-message", HeaderValue::from_static(message));
        h
    }

    #[test]
    fn only_decoding_errors_become_invalid_argument() {
        assert!(is_decode_error(&headers(
            "13",
            "failed%20to%20decode%20Protobuf%20message:%20invalid%20wire%20type"
        )));
        assert!(!is_decode_error(&headers("13", "internal error")), "a handler's own INTERNAL stays");
        assert!(!is_decode_error(&headers("3", "failed to decode Protobuf message")));
    }
}
