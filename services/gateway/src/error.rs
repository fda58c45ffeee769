//! Errors in grpc-gateway's shape: `{"code", "message", "details"}` with the
//! gRPC code as a number, its HTTP status from grpc-gateway's mapping, and the
//! `google.rpc` details rendered as JSON with their `@type`.

use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, StatusCode, header};
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::{Value, json};
use tonic::Code;

use crate::transcode::{BindError, to_json};

/// grpc-gateway v2's gRPC code → HTTP status mapping.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    code: Code,
    message: String,
    details: Vec<Value>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    /// An error with grpc-gateway's HTTP status for `code`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            status: http_status(code),
            code,
            message: message.into(),
            details: Vec::new(),
            headers: Vec::new(),
        }
    }

    /// The same error answered with another HTTP status (405, 413, 415).
    pub fn with_http_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// A 400 naming the request field that could not be bound.
    pub fn bind(error: &BindError) -> Self {
        let mut e = Self::new(Code::InvalidArgument, error.to_string());
        e.details.push(json!({
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": error.field, "description": error.reason}],
        }));
        e
    }

    /// The answer for a gRPC error from a backend, with its details.
    pub fn from_status(status: &tonic::Status, pool: &DescriptorPool) -> Self {
        let mut e = Self::new(status.code(), status.message());
        e.details = details(status.details(), pool);
        e
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

/// `grpc-status-details-bin` (a google.rpc.Status) as JSON details.
fn details(bytes: &[u8], pool: &DescriptorPool) -> Vec<Value> {
    if bytes.is_empty() {
        return Vec::new();
    }
    let Some(descriptor) = pool.get_message_by_name("google.rpc.Status") else { return Vec::new() };
    let Ok(message) = DynamicMessage::decode(descriptor, bytes) else { return Vec::new() };
    match serde_json::from_slice::<Value>(&to_json(&message)) {
        Ok(Value::Object(mut status)) => match status.remove("details") {
            Some(Value::Array(details)) => details,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"code": self.code as i32, "message": self.message, "details": self.details});
        let mut response =
            (self.status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_as_in_grpc_gateway() {
        let cases = [
            (Code::InvalidArgument, 400),
            (Code::FailedPrecondition, 400),
            (Code::Unauthenticated, 401),
            (Code::PermissionDenied, 403),
            (Code::NotFound, 404),
            (Code::AlreadyExists, 409),
            (Code::Aborted, 409),
            (Code::ResourceExhausted, 429),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
            (Code::Internal, 500),
        ];
        for (code, http) in cases {
            assert_eq!(http_status(code).as_u16(), http, "{code:?}");
        }
    }

    #[test]
    fn backend_details_render_with_their_type() {
        use tonic_types::{ErrorDetails, StatusExt};
        let pool = DescriptorPool::decode(fluxo_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut d = ErrorDetails::new();
        d.add_bad_request_violation("amount.minor_units", "must be greater than zero");
        let status = tonic::Status::with_error_details(Code::InvalidArgument, "invalid", d);
        let e = ApiError::from_status(&status, &pool);
        assert_eq!(e.details[0]["@type"], "type.googleapis.com/google.rpc.BadRequest");
        assert_eq!(e.details[0]["fieldViolations"][0]["field"], "amount.minor_units");
    }
}
