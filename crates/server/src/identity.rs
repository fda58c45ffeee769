//! Who may call fluxo's gRPC services, the caller identity the REST gateway
//! forwards with each call, and the per-merchant check every service applies
//! when an identity is present.
//!
//! Three install modes ([`CallerAuth`]):
//! - **open** (the embedded default, loopback only): whoever reaches the port
//!   acts for every merchant; a forwarded identity can only narrow a call.
//! - **mesh** (behind Istio): callers are authenticated by mTLS and admitted by
//!   AuthorizationPolicies; only the gateway's principal may send the identity
//!   headers (the chart denies them from every other principal), and a call
//!   carrying them is kept to the merchants its token named.
//! - **jwt** (no mesh): every call carries `authorization: Bearer <token>`,
//!   verified like the REST gateway's; identity headers sent by the caller are
//!   dropped and rebuilt from the token, so no header raises a privilege.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use fluxo_auth::Verifier;
use http::{HeaderValue, Request, Response};
use tonic::{Status, metadata::MetadataMap};
use tower::{Layer, Service};

/// The token's subject.
pub const SUBJECT: &str = "x-fluxo-subject";
/// Comma-separated merchants the caller may act for.
pub const MERCHANTS: &str = "x-fluxo-merchants";
/// `true` when the caller may act for every merchant.
pub const ADMIN: &str = "x-fluxo-admin";
/// `true` when the caller may close and reopen its merchants' books.
pub const CLOSER: &str = "x-fluxo-closer";

/// PERMISSION_DENIED unless the caller may close or reopen `merchant_id`'s
/// books: an admin, or a caller acting for the merchant with the close scope.
/// With no identity (an open install on loopback) everyone may.
pub fn authorize_close(metadata: &MetadataMap, merchant_id: &str) -> Result<(), Status> {
    authorize(metadata, merchant_id)?;
    let flag = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok()) == Some("true");
    if metadata.get(SUBJECT).is_none() || flag(ADMIN) || flag(CLOSER) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "closing or reopening the books of merchant {merchant_id} needs the fluxo:close scope (or fluxo:admin)"
        )))
    }
}

/// PERMISSION_DENIED when a forwarded identity may not act for `merchant_id`.
pub fn authorize(metadata: &MetadataMap, merchant_id: &str) -> Result<(), Status> {
    if metadata.get(SUBJECT).is_none() {
        return Ok(());
    }
    if metadata.get(ADMIN).and_then(|v| v.to_str().ok()) == Some("true") {
        return Ok(());
    }
    let allowed = metadata
        .get(MERCHANTS)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|list| list.split(',').any(|m| m == merchant_id));
    if allowed {
        Ok(())
    } else {
        Err(Status::permission_denied(format!("the caller may not act for merchant {merchant_id}")))
    }
}

/// How gRPC callers are authenticated.
#[derive(Debug, Clone, Default)]
pub enum CallerAuth {
    /// Nobody is asked who they are (loopback installs).
    #[default]
    Open,
    /// The mesh authenticates and admits callers.
    Mesh,
    /// Every call brings a bearer token, checked by this verifier.
    Jwt(Verifier),
}

/// Applies a [`CallerAuth`] to every call but health checks and reflection.
#[derive(Debug, Clone)]
pub struct CallerAuthLayer(pub CallerAuth);

impl<S> Layer<S> for CallerAuthLayer {
    type Service = CallerAuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallerAuthService { inner, auth: self.0.clone() }
    }
}

/// See [`CallerAuthLayer`].
#[derive(Debug, Clone)]
pub struct CallerAuthService<S> {
    inner: S,
    auth: CallerAuth,
}

impl<S, B, R> Service<Request<B>> for CallerAuthService<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if let CallerAuth::Jwt(verifier) = &self.auth
            && let Err(status) = from_token(verifier, &mut request)
        {
            return Box::pin(async move { Ok(status.into_http()) });
        }
        Box::pin(self.inner.call(request))
    }
}

/// Replaces whatever identity headers the caller sent by the identity its
/// token grants; UNAUTHENTICATED without a valid token.
fn from_token<B>(verifier: &Verifier, request: &mut Request<B>) -> Result<(), Status> {
    let headers = request.headers_mut();
    for name in [SUBJECT, MERCHANTS, ADMIN, CLOSER] {
        headers.remove(name);
    }
    let path = request.uri().path();
    if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
        return Ok(());
    }
    let identity = verifier.verify(request.headers().get(http::header::AUTHORIZATION)).map_err(|error| {
        tracing::debug!(%error, "gRPC call without a valid token");
        Status::unauthenticated("a valid bearer token is required (authorization: Bearer …)")
    })?;
    let headers = request.headers_mut();
    let value =
        |v: &str| HeaderValue::from_str(v).map_err(|_| Status::unauthenticated("unusable token claims"));
    headers.insert(SUBJECT, value(&identity.subject)?);
    headers.insert(MERCHANTS, value(&identity.merchants.join(","))?);
    if identity.admin {
        headers.insert(ADMIN, HeaderValue::from_static("true"));
    }
    if identity.closer {
        headers.insert(CLOSER, HeaderValue::from_static("true"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarded_identity_is_kept_to_its_merchants() {
        let mut m = MetadataMap::new();
        assert!(authorize(&m, "m-1").is_ok(), "mesh callers without a forwarded identity");
        m.insert(SUBJECT, "shop".parse().unwrap());
        assert!(authorize(&m, "m-1").is_err());
        m.insert(MERCHANTS, "m-1,m-2".parse().unwrap());
        assert!(authorize(&m, "m-2").is_ok());
        assert_eq!(authorize(&m, "m-3").unwrap_err().code(), tonic::Code::PermissionDenied);
        m.insert(ADMIN, "true".parse().unwrap());
        assert!(authorize(&m, "m-3").is_ok());
    }

    #[test]
    fn with_jwt_only_the_token_says_who_calls() {
        use fluxo_auth::{Keys, TokenSpec};
        let secret = secrecy::SecretString::from("a-development-secret-of-32-bytes!".to_owned());
        let verifier = Verifier::new(Keys::Hs256(secret.clone()), "fluxo", "fluxo-api", 0);
        let call = |token: Option<&str>, path: &str| {
            let mut builder = Request::builder().uri(path).header(ADMIN, "true").header(SUBJECT, "me");
            if let Some(t) = token {
                builder = builder.header("authorization", format!("Bearer {t}"));
            }
            let mut request = builder.body(()).unwrap();
            from_token(&verifier, &mut request).map(|()| request.headers().clone())
        };
        let rpc = "/fluxo.ledger.v1.LedgerService/RecordEntry";
        assert_eq!(call(None, rpc).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(call(Some("forged"), rpc).unwrap_err().code(), tonic::Code::Unauthenticated);
        let shop = TokenSpec::new("shop", &["m-1"]).sign_hs256(&secret, "fluxo", "fluxo-api").unwrap();
        let headers = call(Some(&shop), rpc).unwrap();
        assert_eq!(headers.get(SUBJECT).unwrap(), "shop");
        assert_eq!(headers.get(MERCHANTS).unwrap(), "m-1");
        assert!(headers.get(ADMIN).is_none(), "a header sent by the caller grants nothing");
        let health = call(None, "/grpc.health.v1.Health/Check").unwrap();
        assert!(health.get(ADMIN).is_none(), "probes need no token, and carry no identity");
    }
}
