//! The handler under the layers: a routed, authenticated request whose body
//! has been read is bound into its RPC's request message, authorised for the
//! merchant it names, and forwarded over gRPC; the reply is rendered as JSON.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use fluxo_server::{REQUEST_ID_HEADER, identity};
use http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use prost_reflect::{DynamicMessage, ReflectMessage, Value};
use tonic::Code;

use crate::{
    Gateway, LOG_TARGET,
    auth::Identity,
    error::ApiError,
    layers::{Next, Refusal, route::Matched},
    routes::Route,
    transcode::{self, DynamicCodec, to_json},
};

/// The handler as the bottom of the stack.
pub(crate) fn endpoint(gateway: Gateway) -> Next<Bytes> {
    Next::new(tower::service_fn(move |request| handle(gateway.clone(), request)))
}

async fn handle(gateway: Gateway, request: Request<Bytes>) -> Result<Response, Refusal> {
    let (mut parts, body) = request.into_parts();
    // The layers above put both there; without them nothing is forwarded.
    let (Some(Matched { route, bindings }), Some(identity)) =
        (parts.extensions.remove::<Matched>(), parts.extensions.remove::<Identity>())
    else {
        return Err(ApiError::new(Code::Internal, "internal error").into());
    };
    if !route.body.is_empty() && !body.is_empty() && !is_json(&parts.headers) {
        return Err(ApiError::new(Code::InvalidArgument, "content type must be application/json")
            .with_http_status(StatusCode::UNSUPPORTED_MEDIA_TYPE)
            .into());
    }
    let mut message =
        transcode::request(&route, &bindings, parts.uri.query(), &body).map_err(|e| ApiError::bind(&e))?;
    idempotency_key(&mut message, &parts.headers)?;
    authorise(&identity, &message)?;
    // The backend's answer, an error included, is the request's answer rather
    // than a refusal: the rate-limit layer reports the allowance on it.
    let answer = forward(&gateway, &route, message, &identity, &parts.headers).await;
    Ok(answer.unwrap_or_else(IntoResponse::into_response))
}

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

/// 403 unless the caller may act for the merchant the request names.
fn authorise(identity: &Identity, message: &DynamicMessage) -> Result<(), ApiError> {
    let merchant = match message.get_field_by_name("merchant_id").as_deref() {
        Some(Value::String(m)) => m.clone(),
        _ => String::new(),
    };
    if identity.may_act_for(&merchant) {
        return Ok(());
    }
    Err(ApiError::new(Code::PermissionDenied, format!("the token may not act for merchant {merchant}")))
}

/// Calls the route's RPC on its backend: the reply as JSON, or the backend's
/// error in grpc-gateway's shape.
async fn forward(
    gateway: &Gateway,
    route: &Route,
    message: DynamicMessage,
    identity: &Identity,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let inner = &gateway.inner;
    let service = route.rpc.parent_service();
    let channel = if crate::served_by_ledger(service.full_name()) {
        inner.backends.ledger.clone()
    } else {
        inner.backends.balance.clone()
    };
    let call = call(gateway, message, identity, headers);
    let path = format!("/{}/{}", service.full_name(), route.rpc.name());
    let path = path
        .parse::<http::uri::PathAndQuery>()
        .map_err(|_| ApiError::new(Code::Internal, "internal error"))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(error) = grpc.ready().await {
        tracing::warn!(target: LOG_TARGET, %error, backend = service.full_name(), "backend unavailable");
        return Err(ApiError::new(Code::Unavailable, "the service is unavailable; retry later"));
    }
    if route.rpc.is_server_streaming() {
        let error = |status: &tonic::Status| ApiError::from_status(status, &inner.pool);
        return crate::download::download(&mut grpc, call, path, route, error).await;
    }
    // Boxed: a gRPC call is a future of kilobytes.
    let reply = Box::pin(grpc.unary(call, path, DynamicCodec::new(route.rpc.output())))
        .await
        .map_err(|status| ApiError::from_status(&status, &inner.pool))?;
    let replayed = reply.metadata().get("fluxo-idempotent-replayed").is_some();
    let mut response =
        ([(header::CONTENT_TYPE, "application/json")], to_json(reply.get_ref())).into_response();
    if replayed {
        response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// The gRPC request: the message with the call's deadline, the caller's
/// identity (or, with `forward_token`, its token), request id and trace context.
fn call(
    gateway: &Gateway,
    message: DynamicMessage,
    identity: &Identity,
    headers: &HeaderMap,
) -> tonic::Request<DynamicMessage> {
    let backends = &gateway.inner.backends;
    let mut call = tonic::Request::new(message);
    call.set_timeout(backends.timeout);
    let metadata = call.metadata_mut();
    let mut put = |name: &'static str, value: &str| {
        if let Ok(v) = value.parse() {
            metadata.insert(name, v);
        }
    };
    if backends.forward_token {
        if let Some(token) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
            put("authorization", token);
        }
    } else {
        put(identity::SUBJECT, &identity.subject);
        put(identity::MERCHANTS, &identity.merchants.join(","));
        if identity.admin {
            put(identity::ADMIN, "true");
        }
        if identity.closer {
            put(identity::CLOSER, "true");
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
    call
}
