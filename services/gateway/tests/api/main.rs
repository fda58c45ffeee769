//! The gateway driven through its public router, in process: every answer it
//! gives itself (status, headers in order, JSON body) and the order of its
//! checks, against a fake ledger on a port of its own.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, body::Body, extract::ConnectInfo};
use bytes::Bytes;
use fluxo_gateway::{
    Backends, Gateway, RequestLimits,
    auth::{Keys, TokenSpec, Verifier},
    ratelimit::{Fallback, Limits, Rate, RateLimiter},
};
use fluxo_proto::fluxo::ledger::v1::{
    self as lpb,
    ledger_service_server::{LedgerService, LedgerServiceServer},
};
use futures::StreamExt;
use http::{Method, Request, Response, header};
use http_body_util::BodyExt;
use tonic::metadata::MetadataMap;
use tower::ServiceExt;

const ISSUER: &str = "fluxo-test";
const AUDIENCE: &str = "fluxo-api";
const MAX_BODY: usize = 1024;
const BODY_TIMEOUT: Duration = Duration::from_millis(300);
const ENTRY: &str = r#"{"type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":"5"}}"#;

/// A ledger that books whatever it is sent and remembers the metadata of each call.
#[derive(Clone, Default)]
struct FakeLedger {
    calls: Arc<Mutex<Vec<MetadataMap>>>,
}

#[tonic::async_trait]
impl LedgerService for FakeLedger {
    type ExportEntriesStream = futures::stream::Empty<Result<lpb::ExportEntriesResponse, tonic::Status>>;
    type WatchEntriesStream = futures::stream::Empty<Result<lpb::WatchEntriesResponse, tonic::Status>>;

    async fn batch_record_entries(
        &self,
        _: tonic::Request<lpb::BatchRecordEntriesRequest>,
    ) -> Result<tonic::Response<lpb::BatchRecordEntriesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not faked"))
    }

    async fn export_entries(
        &self,
        _: tonic::Request<lpb::ExportEntriesRequest>,
    ) -> Result<tonic::Response<Self::ExportEntriesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not faked"))
    }

    async fn watch_entries(
        &self,
        _: tonic::Request<lpb::WatchEntriesRequest>,
    ) -> Result<tonic::Response<Self::WatchEntriesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not faked"))
    }

    async fn close_period(
        &self,
        _: tonic::Request<lpb::ClosePeriodRequest>,
    ) -> Result<tonic::Response<lpb::PeriodClose>, tonic::Status> {
        Err(tonic::Status::unimplemented("not faked"))
    }

    async fn reopen_period(
        &self,
        _: tonic::Request<lpb::ReopenPeriodRequest>,
    ) -> Result<tonic::Response<lpb::PeriodClose>, tonic::Status> {
        Err(tonic::Status::unimplemented("not faked"))
    }

    async fn list_period_closes(
        &self,
        _: tonic::Request<lpb::ListPeriodClosesRequest>,
    ) -> Result<tonic::Response<lpb::ListPeriodClosesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not faked"))
    }

    async fn record_entry(
        &self,
        request: tonic::Request<lpb::RecordEntryRequest>,
    ) -> Result<tonic::Response<lpb::Entry>, tonic::Status> {
        self.calls.lock().unwrap().push(request.metadata().clone());
        let r = request.into_inner();
        let entry = lpb::Entry {
            id: "E1".into(),
            merchant_id: r.merchant_id,
            r#type: r.r#type,
            amount: r.amount,
            request_id: r.request_id.clone(),
            ..Default::default()
        };
        let mut response = tonic::Response::new(entry);
        if r.request_id == "replayed" {
            response.metadata_mut().insert("fluxo-idempotent-replayed", "true".parse().unwrap());
        }
        Ok(response)
    }

    async fn get_entry(
        &self,
        _: tonic::Request<lpb::GetEntryRequest>,
    ) -> Result<tonic::Response<lpb::Entry>, tonic::Status> {
        Err(tonic::Status::not_found("no such entry"))
    }

    async fn list_entries(
        &self,
        request: tonic::Request<lpb::ListEntriesRequest>,
    ) -> Result<tonic::Response<lpb::ListEntriesResponse>, tonic::Status> {
        self.calls.lock().unwrap().push(request.metadata().clone());
        Ok(tonic::Response::new(lpb::ListEntriesResponse::default()))
    }

    async fn reverse_entry(
        &self,
        _: tonic::Request<lpb::ReverseEntryRequest>,
    ) -> Result<tonic::Response<lpb::Entry>, tonic::Status> {
        Err(tonic::Status::failed_precondition("already reversed"))
    }
}

struct Fixture {
    gateway: Gateway,
    router: Router,
    /// The HS256 key tokens are signed with.
    keys: Keys,
    ledger: FakeLedger,
}

fn limits() -> Limits {
    Limits {
        tiers: [
            ("standard".to_owned(), Rate { per_second: 1000, burst: 1000 }),
            ("tiny".to_owned(), Rate { per_second: 1, burst: 1 }),
        ]
        .into(),
        default_tier: "standard".into(),
        priority_tiers: Vec::new(),
        shared: Rate { per_second: 10_000, burst: 10_000 },
        unverified: Rate { per_second: 1, burst: 2 },
        unverified_pool: Rate { per_second: 10_000, burst: 10_000 },
        fallback: Fallback::Local,
        key_prefix: fluxo_gateway::ratelimit::DEFAULT_KEY_PREFIX.into(),
    }
}

/// A gateway in front of a fake ledger (also answering for the balance
/// service: its calls are UNIMPLEMENTED there), or in front of nothing.
async fn fixture(backend: bool) -> Fixture {
    let ledger = FakeLedger::default();
    let url = if backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_, health) = tonic_health::server::health_reporter();
        let service = LedgerServiceServer::new(ledger.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        format!("http://{addr}")
    } else {
        // Nothing listens on port 1.
        "http://127.0.0.1:1".to_owned()
    };
    let channel = tonic::transport::Channel::from_shared(url).unwrap().connect_lazy();
    let dir = std::env::temp_dir().join(format!("fluxo-gateway-test-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = fluxo_gateway::auth::dev_secret(&dir).unwrap();
    let keys = Keys::Hs256(secret);
    let verifier = Verifier::new(keys.clone(), ISSUER, AUDIENCE, 0);
    let backends = Backends {
        ledger: channel.clone(),
        balance: channel,
        timeout: Duration::from_secs(5),
        forward_token: false,
    };
    let limiter = RateLimiter::new(None, limits());
    let request_limits = RequestLimits { max_body_bytes: MAX_BODY, body_timeout: BODY_TIMEOUT };
    let gateway = Gateway::new(backends, verifier, Some(limiter), request_limits).unwrap();
    let router = gateway.clone().router(None);
    Fixture { gateway, router, keys, ledger }
}

impl Fixture {
    fn token(&self, spec: &TokenSpec<'_>) -> String {
        let Keys::Hs256(secret) = &self.keys else { panic!("the fixture signs with HS256") };
        spec.sign_hs256(secret, ISSUER, AUDIENCE).unwrap()
    }

    /// A token acting for merchant m-1, in the default tier.
    fn shop(&self) -> String {
        self.token(&TokenSpec::new("shop", &["m-1"]))
    }

    /// A token acting for m-1 in a tier of one request a second.
    fn tiny(&self) -> String {
        self.token(&TokenSpec { tier: Some("tiny"), ..TokenSpec::new("tiny-shop", &["m-1"]) })
    }

    async fn send(&self, request: Request<Body>) -> Response<Body> {
        self.router.clone().oneshot(request).await.unwrap()
    }

    /// The answer to `request`, as [`shown`].
    async fn answer(&self, request: Request<Body>) -> String {
        shown(self.send(request).await).await
    }

    /// The metadata of the calls the fake ledger received.
    fn calls(&self) -> Vec<MetadataMap> {
        self.ledger.calls.lock().unwrap().clone()
    }
}

/// A request from 10.0.0.1 (as the gateway's server records the peer).
fn from(method: Method, uri: &str) -> http::request::Builder {
    from_peer(method, uri, [10, 0, 0, 1])
}

fn from_peer(method: Method, uri: &str, ip: [u8; 4]) -> http::request::Builder {
    Request::builder().method(method).uri(uri).extension(ConnectInfo(SocketAddr::from((ip, 40000))))
}

/// A request with no token and no body.
fn bare(method: Method, uri: &str) -> Request<Body> {
    from(method, uri).body(Body::empty()).unwrap()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `POST /v1/merchants/{merchant}/entries` with `token` and a JSON body.
fn post_entry(merchant: &str, token: &str, body: &'static str) -> Request<Body> {
    post(merchant, token, "application/json", Body::from(body))
}

/// `POST /v1/merchants/{merchant}/entries` with `token`, and `body` of `content_type`.
fn post(merchant: &str, token: &str, content_type: &str, body: Body) -> Request<Body> {
    from(Method::POST, &format!("/v1/merchants/{merchant}/entries"))
        .header(header::AUTHORIZATION, bearer(token))
        .header(header::CONTENT_TYPE, content_type)
        .body(body)
        .unwrap()
}

fn get(uri: &str, token: &str) -> Request<Body> {
    from(Method::GET, uri).header(header::AUTHORIZATION, bearer(token)).body(Body::empty()).unwrap()
}

/// A body that never ends.
fn stalled() -> Body {
    Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>())
}

/// A body that sends `first` and then stalls.
fn stalls_after(first: &'static str) -> Body {
    Body::from_stream(
        futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(first.as_bytes()))])
            .chain(futures::stream::pending()),
    )
}

/// A body that notes in `polled` whether anyone asked it for data.
fn watched(polled: Arc<Mutex<bool>>) -> Body {
    Body::from_stream(futures::stream::poll_fn(move |_| {
        *polled.lock().unwrap() = true;
        std::task::Poll::<Option<Result<Bytes, std::io::Error>>>::Pending
    }))
}

/// Status, headers in their order and body of an answer; a minted request id
/// (a ULID) reads `<ulid>`.
async fn shown(response: Response<Body>) -> String {
    let (parts, body) = response.into_parts();
    let mut text = format!("{}\n", parts.status.as_u16());
    for (name, value) in &parts.headers {
        let value = value.to_str().unwrap();
        let value =
            if name == "x-request-id" && ulid::Ulid::from_string(value).is_ok() { "<ulid>" } else { value };
        text += &format!("{name}: {value}\n");
    }
    let body = body.collect().await.unwrap().to_bytes();
    text + "\n" + &String::from_utf8_lossy(&body)
}

#[tokio::test]
async fn probes_and_the_document_answer_before_routing() {
    let f = fixture(true).await;
    assert_eq!(
        f.answer(bare(Method::GET, "/healthz")).await,
        "200\ncontent-type: text/plain; charset=utf-8\nx-request-id: <ulid>\ncontent-length: 3\n\nok\n"
    );
    assert_eq!(
        f.answer(bare(Method::GET, "/readyz")).await,
        "200\ncontent-type: text/plain; charset=utf-8\nx-request-id: <ulid>\ncontent-length: 6\n\nready\n"
    );
    let document = f.send(bare(Method::GET, "/openapi.json")).await;
    assert_eq!(document.headers()[header::CONTENT_TYPE], "application/json");
    let body = document.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, fluxo_gateway::openapi_json().unwrap().as_bytes());
    // Only GET is a probe; other methods are looked up as routes.
    let post = bare(Method::POST, "/healthz");
    assert_eq!(f.send(post).await.status(), 404);
    // HEAD is no probe either; its answer has no body.
    let head = bare(Method::HEAD, "/healthz");
    assert_eq!(
        f.answer(head).await,
        "404\ncontent-type: application/json\nx-request-id: <ulid>\ncontent-length: 49\n\n"
    );
    // Not ready while a backend is not serving, nor once draining.
    let down = fixture(false).await;
    assert_eq!(
        down.answer(bare(Method::GET, "/readyz")).await,
        "503\ncontent-type: text/plain; charset=utf-8\nx-request-id: <ulid>\ncontent-length: 10\n\nnot ready\n"
    );
    f.gateway.drain();
    assert_eq!(
        f.answer(bare(Method::GET, "/readyz")).await,
        "503\ncontent-type: text/plain; charset=utf-8\nx-request-id: <ulid>\ncontent-length: 14\n\nshutting down\n"
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_are_refused_before_authentication() {
    let f = fixture(true).await;
    assert_eq!(
        f.answer(bare(Method::GET, "/v2/nothing")).await,
        "404\ncontent-type: application/json\nx-request-id: <ulid>\ncontent-length: 49\n\n\
         {\"code\":5,\"details\":[],\"message\":\"no such route\"}"
    );
    let delete = bare(Method::DELETE, "/v1/merchants/m-1/entries");
    assert_eq!(
        f.answer(delete).await,
        "405\ncontent-type: application/json\nallow: POST, GET\nx-request-id: <ulid>\ncontent-length: 55\n\n\
         {\"code\":12,\"details\":[],\"message\":\"method not allowed\"}"
    );
    // Before a declared oversize body too: its body is drained, or the
    // connection closes when it cannot be.
    let large = from(Method::POST, "/v2/nothing")
        .header(header::CONTENT_LENGTH, "100000000")
        .body(stalled())
        .unwrap();
    assert_eq!(
        f.answer(large).await,
        "404\ncontent-type: application/json\nconnection: close\nx-request-id: <ulid>\ncontent-length: 49\n\n\
         {\"code\":5,\"details\":[],\"message\":\"no such route\"}"
    );
}

#[tokio::test]
async fn a_declared_oversize_body_is_refused_unread_before_authentication() {
    let f = fixture(true).await;
    let polled = Arc::new(Mutex::new(false));
    let large = from(Method::POST, "/v1/merchants/m-1/entries")
        .header(header::CONTENT_LENGTH, (MAX_BODY + 1).to_string())
        .body(watched(polled.clone()))
        .unwrap();
    assert_eq!(
        f.answer(large).await,
        "413\ncontent-type: application/json\nconnection: close\nx-request-id: <ulid>\ncontent-length: 71\n\n\
         {\"code\":3,\"details\":[],\"message\":\"request body larger than 1024 bytes\"}"
    );
    assert!(!*polled.lock().unwrap(), "the body was not read");
    // At the limit it is read.
    let body = " ".repeat(MAX_BODY);
    let mut at_limit = post("m-1", &f.shop(), "application/json", Body::from(body));
    at_limit.headers_mut().insert(header::CONTENT_LENGTH, MAX_BODY.into());
    assert_eq!(f.send(at_limit).await.status(), 200);
}

#[tokio::test]
async fn requests_without_a_valid_token_are_401_with_the_scheme() {
    let f = fixture(true).await;
    let missing = from(Method::POST, "/v1/merchants/m-1/entries").body(Body::from(ENTRY)).unwrap();
    let expected = "401\ncontent-type: application/json\nwww-authenticate: Bearer\nx-request-id: <ulid>\ncontent-length: 69\n\n\
         {\"code\":16,\"details\":[],\"message\":\"a valid bearer token is required\"}";
    assert_eq!(f.answer(missing).await, expected);
    let expired = f.token(&TokenSpec { valid_for_secs: -60, ..TokenSpec::new("shop", &["m-1"]) });
    assert_eq!(f.answer(post_entry("m-1", &expired, ENTRY)).await, expected);
    // A body that cannot be drained in time leaves the connection closing.
    // (From another address: this one has spent its allowance of tokens to verify.)
    let stalling =
        from_peer(Method::POST, "/v1/merchants/m-1/entries", [10, 0, 0, 3]).body(stalls_after("{")).unwrap();
    assert_eq!(
        f.answer(stalling).await,
        "401\ncontent-type: application/json\nwww-authenticate: Bearer\nconnection: close\n\
         x-request-id: <ulid>\ncontent-length: 69\n\n\
         {\"code\":16,\"details\":[],\"message\":\"a valid bearer token is required\"}"
    );
    assert!(f.calls().is_empty(), "nothing was forwarded");
}

#[tokio::test]
async fn tokens_to_verify_are_limited_per_address_before_their_signature_is_checked() {
    let f = fixture(true).await;
    let shop = f.shop();
    // A token verified for the first time draws from its address's allowance (2)...
    assert_eq!(f.send(get("/v1/merchants/m-1/entries", &shop)).await.status(), 200);
    assert_eq!(f.send(get("/v1/merchants/m-1/entries", "forged.1.x")).await.status(), 401);
    assert_eq!(
        f.answer(get("/v1/merchants/m-1/entries", "forged.2.x")).await,
        "429\ncontent-type: application/json\nretry-after: 1\nratelimit-limit: 2\nratelimit-remaining: 0\n\
         ratelimit-reset: 2\nx-request-id: <ulid>\ncontent-length: 68\n\n\
         {\"code\":8,\"details\":[],\"message\":\"rate limit exceeded; retry later\"}"
    );
    // ...a token verified lately does not, nor do other addresses share it.
    assert_eq!(f.send(get("/v1/merchants/m-1/entries", &shop)).await.status(), 200);
    let other = from_peer(Method::GET, "/v1/merchants/m-1/entries", [10, 0, 0, 2])
        .header(header::AUTHORIZATION, "Bearer forged.3.x")
        .body(Body::empty())
        .unwrap();
    assert_eq!(f.send(other).await.status(), 401);
    // A new token is refused before it is verified once the address is spent.
    let fresh = f.token(&TokenSpec::new("other-shop", &["m-1"]));
    assert_eq!(f.send(get("/v1/merchants/m-1/entries", &fresh)).await.status(), 429);
}

#[tokio::test]
async fn the_subject_limit_applies_after_authentication_and_reports_on_forwarded_answers() {
    let f = fixture(true).await;
    let tiny = f.tiny();
    let first = f.send(get("/v1/merchants/m-1/entries", &tiny)).await;
    let first = shown(first).await;
    assert!(
        first.starts_with(
            "200\ncontent-type: application/json\nratelimit-limit: 1\nratelimit-remaining: 0\n\
             ratelimit-reset: 1\nx-request-id: <ulid>\ncontent-length: "
        ),
        "{first}"
    );
    assert_eq!(
        f.answer(get("/v1/merchants/m-1/entries", &tiny)).await,
        "429\ncontent-type: application/json\nretry-after: 1\nratelimit-limit: 1\nratelimit-remaining: 0\n\
         ratelimit-reset: 1\nx-request-id: <ulid>\ncontent-length: 68\n\n\
         {\"code\":8,\"details\":[],\"message\":\"rate limit exceeded; retry later\"}"
    );
    // Refused before its body is read: one that stalls closes the connection.
    let stalling = from(Method::POST, "/v1/merchants/m-1/entries")
        .header(header::AUTHORIZATION, bearer(&tiny))
        .body(stalled())
        .unwrap();
    let refused = f.send(stalling).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()[header::CONNECTION], "close");
    // An invalid token is unauthenticated, whatever its subject's allowance.
    let expired =
        f.token(&TokenSpec { valid_for_secs: -60, tier: Some("tiny"), ..TokenSpec::new("tiny-shop", &[]) });
    assert_eq!(f.send(get("/v1/merchants/m-1/entries", &expired)).await.status(), 401);
    assert_eq!(f.calls().len(), 1);
}

#[tokio::test]
async fn bodies_are_bounded_in_size_and_in_time() {
    let f = fixture(true).await;
    let shop = f.shop();
    let chunks = futures::stream::iter(
        [Bytes::from(vec![b' '; 700]), Bytes::from(vec![b' '; 700])].map(Ok::<_, std::io::Error>),
    );
    let streamed = post("m-1", &shop, "application/json", Body::from_stream(chunks));
    assert_eq!(
        f.answer(streamed).await,
        "413\ncontent-type: application/json\nconnection: close\nx-request-id: <ulid>\ncontent-length: 71\n\n\
         {\"code\":3,\"details\":[],\"message\":\"request body larger than 1024 bytes\"}"
    );
    let mut slow = post("m-1", &shop, "application/json", stalls_after("{\"type\""));
    slow.headers_mut().insert(header::CONTENT_LENGTH, 100.into());
    assert_eq!(
        f.answer(slow).await,
        "408\ncontent-type: application/json\nconnection: close\nx-request-id: <ulid>\ncontent-length: 81\n\n\
         {\"code\":4,\"details\":[],\"message\":\"the request body did not arrive within 300 ms\"}"
    );
    assert!(f.calls().is_empty());
}

#[tokio::test]
async fn a_read_request_is_checked_then_authorised_without_rate_headers() {
    let f = fixture(true).await;
    let shop = f.shop();
    let text = post("m-1", &shop, "text/plain", Body::from(ENTRY));
    assert_eq!(
        f.answer(text).await,
        "415\ncontent-type: application/json\nx-request-id: <ulid>\ncontent-length: 73\n\n\
         {\"code\":3,\"details\":[],\"message\":\"content type must be application/json\"}"
    );
    assert_eq!(
        f.answer(post_entry("m-1", &shop, r#"{"type":"CREDIT","amount":7}"#)).await,
        "400\ncontent-type: application/json\nx-request-id: <ulid>\ncontent-length: 195\n\n\
         {\"code\":3,\"details\":[{\"@type\":\"type.googleapis.com/google.rpc.BadRequest\",\
         \"fieldViolations\":[{\"description\":\"must be a JSON object\",\"field\":\"amount\"}]}],\
         \"message\":\"amount: must be a JSON object\"}"
    );
    let mut keyed = post_entry("m-1", &shop, r#"{"requestId":"a","type":"CREDIT"}"#);
    keyed.headers_mut().insert("idempotency-key", "b".parse().unwrap());
    assert_eq!(
        f.answer(keyed).await,
        "400\ncontent-type: application/json\nx-request-id: <ulid>\ncontent-length: 239\n\n\
         {\"code\":3,\"details\":[{\"@type\":\"type.googleapis.com/google.rpc.BadRequest\",\
         \"fieldViolations\":[{\"description\":\"differs from requestId in the body\",\
         \"field\":\"Idempotency-Key\"}]}],\
         \"message\":\"Idempotency-Key: differs from requestId in the body\"}"
    );
    let mut unprintable = post_entry("m-1", &shop, ENTRY);
    unprintable.headers_mut().insert("idempotency-key", http::HeaderValue::from_bytes(b"\xff").unwrap());
    assert_eq!(f.send(unprintable).await.status(), 400);
    assert_eq!(
        f.answer(post_entry("m-2", &shop, ENTRY)).await,
        "403\ncontent-type: application/json\nx-request-id: <ulid>\ncontent-length: 74\n\n\
         {\"code\":7,\"details\":[],\"message\":\"the token may not act for merchant m-2\"}"
    );
    assert!(f.calls().is_empty(), "nothing was forwarded");
}

#[tokio::test]
async fn calls_are_forwarded_with_the_callers_identity_and_request_id() {
    let f = fixture(true).await;
    let mut request = post_entry("m-1", &f.shop(), ENTRY);
    request.headers_mut().insert("idempotency-key", "replayed".parse().unwrap());
    request.headers_mut().insert("x-request-id", "caller-id-1".parse().unwrap());
    let answer = f.send(request).await;
    let (parts, body) = answer.into_parts();
    let names: Vec<&str> = parts.headers.keys().map(http::HeaderName::as_str).collect();
    assert_eq!(
        names,
        [
            "content-type",
            "idempotent-replayed",
            "ratelimit-limit",
            "ratelimit-remaining",
            "ratelimit-reset",
            "x-request-id",
            "content-length"
        ]
    );
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["idempotent-replayed"], "true");
    assert_eq!(parts.headers["ratelimit-limit"], "1000");
    assert_eq!(parts.headers["x-request-id"], "caller-id-1");
    let entry: serde_json::Value = serde_json::from_slice(&body.collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(entry["merchantId"], "m-1");
    assert_eq!(entry["requestId"], "replayed");
    assert_eq!(entry["amount"]["minorUnits"], "5");
    let calls = f.calls();
    let call = &calls[0];
    assert_eq!(call.get("x-fluxo-subject").unwrap(), "shop");
    assert_eq!(call.get("x-fluxo-merchants").unwrap(), "m-1");
    assert!(call.get("x-fluxo-admin").is_none());
    assert!(call.get("authorization").is_none(), "the identity travels, not the token");
    assert_eq!(call.get("x-request-id").unwrap(), "caller-id-1");

    // Without an id of its own (or with one that is not sane) the caller is
    // answered under the id minted for it, and the backend logs the same one.
    let admin = f.token(&TokenSpec::admin("ops"));
    let mut unnamed = get("/v1/merchants/m-9/entries", &admin);
    unnamed.headers_mut().insert("x-request-id", "has spaces".parse().unwrap());
    let answer = f.send(unnamed).await;
    assert_eq!(answer.status(), 200);
    let minted = answer.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(ulid::Ulid::from_string(&minted).is_ok(), "{minted}");
    assert_eq!(f.calls()[1].get("x-fluxo-admin").unwrap(), "true");
    assert_eq!(f.calls()[1].get("x-request-id").unwrap(), minted.as_str());
}

#[tokio::test]
async fn backend_errors_are_answered_in_grpc_gateway_shape_with_rate_headers() {
    let f = fixture(true).await;
    let shop = f.shop();
    assert_eq!(
        f.answer(get("/v1/merchants/m-1/entries/E9", &shop)).await,
        "404\ncontent-type: application/json\nratelimit-limit: 1000\nratelimit-remaining: 999\n\
         ratelimit-reset: 1\nx-request-id: <ulid>\ncontent-length: 49\n\n\
         {\"code\":5,\"details\":[],\"message\":\"no such entry\"}"
    );
    let down = fixture(false).await;
    let answer = down.send(get("/v1/merchants/m-1/entries", &down.shop())).await;
    assert_eq!(answer.status(), 503);
    assert_eq!(answer.headers()["ratelimit-limit"], "1000");
}

#[tokio::test]
async fn a_request_id_is_kept_when_sane_and_minted_otherwise() {
    let f = fixture(true).await;
    for (sent, kept) in [("abc-123", true), ("has space", false), (&*"x".repeat(129), false), ("", false)] {
        let request =
            from(Method::GET, "/v2/nothing").header("x-request-id", sent).body(Body::empty()).unwrap();
        let answer = f.send(request).await;
        let id = answer.headers()["x-request-id"].to_str().unwrap();
        if kept {
            assert_eq!(id, sent);
        } else {
            assert!(ulid::Ulid::from_string(id).is_ok(), "{sent:?} → {id}");
        }
    }
}

/// Log lines written to a buffer, as fluxo's JSON lines.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    /// Each line without what changes from run to run (time, ids, durations).
    fn read(&self) -> Vec<String> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| {
                let mut line: serde_json::Value = serde_json::from_str(line).unwrap();
                let fields = line.as_object_mut().unwrap();
                for varying in ["timestamp", "elapsed_ms", "trace_id", "span_id"] {
                    fields.remove(varying);
                }
                if let Some(span) = fields.get_mut("span").and_then(serde_json::Value::as_object_mut) {
                    span.remove("request_id");
                }
                line.to_string()
            })
            .collect()
    }
}

#[tokio::test]
async fn refusals_and_answers_are_logged_as_before() {
    let config = fluxo_telemetry::TelemetryConfig {
        service_name: "gateway-test".into(),
        log_format: fluxo_telemetry::LogFormat::Json,
        log_filter: "fluxo_gateway=debug,fluxo::access=debug".into(),
    };
    let (provider, _) = fluxo_telemetry::tracer_provider("gateway-test").unwrap();
    let lines = Lines::default();
    let sink = lines.clone();
    let subscriber = fluxo_telemetry::subscriber(&config, &provider, move || sink.clone(), false).unwrap();
    let _installed = tracing::subscriber::set_default(subscriber);
    let f = fixture(false).await;
    f.send(bare(Method::GET, "/healthz")).await;
    f.send(bare(Method::GET, "/v2/nothing")).await;
    f.send(bare(Method::POST, "/v1/merchants/m-1/entries")).await;
    f.send(bare(Method::GET, "/v1/merchants/m-1/entries")).await;
    f.send(bare(Method::GET, "/v1/merchants/m-1/entries")).await;
    let tiny = f.tiny();
    for _ in 0..2 {
        let request = from_peer(Method::GET, "/v1/merchants/m-1/entries", [10, 0, 0, 2])
            .header(header::AUTHORIZATION, bearer(&tiny))
            .body(Body::empty())
            .unwrap();
        f.send(request).await;
    }
    // One access-log line per request (OK at DEBUG, the rest at INFO), after
    // the reason for a refusal, each in the request's span.
    assert_eq!(
        lines.read(),
        [
            r#"{"level":"DEBUG","message":"request","method":"GET","path":"/healthz","span":{"http.request.method":"GET","http.response.status_code":200,"http.route":"unmatched","name":"http.server","otel.kind":"server","otel.name":"GET unmatched"},"status":200,"target":"fluxo::access"}"#,
            r#"{"level":"INFO","message":"request","method":"GET","path":"/v2/nothing","span":{"http.request.method":"GET","http.response.status_code":404,"http.route":"unmatched","name":"http.server","otel.kind":"server","otel.name":"GET unmatched"},"status":404,"target":"fluxo::access"}"#,
            r#"{"error":"missing bearer token","level":"DEBUG","message":"unauthenticated","span":{"http.request.method":"POST","http.route":"/v1/merchants/{merchant_id}/entries","name":"http.server","otel.kind":"server","otel.name":"POST /v1/merchants/{merchant_id}/entries"},"target":"fluxo_gateway"}"#,
            r#"{"level":"INFO","message":"request","method":"POST","path":"/v1/merchants/m-1/entries","span":{"http.request.method":"POST","http.response.status_code":401,"http.route":"/v1/merchants/{merchant_id}/entries","name":"http.server","otel.kind":"server","otel.name":"POST /v1/merchants/{merchant_id}/entries"},"status":401,"target":"fluxo::access"}"#,
            r#"{"error":"missing bearer token","level":"DEBUG","message":"unauthenticated","span":{"http.request.method":"GET","http.route":"/v1/merchants/{merchant_id}/entries","name":"http.server","otel.kind":"server","otel.name":"GET /v1/merchants/{merchant_id}/entries"},"target":"fluxo_gateway"}"#,
            r#"{"level":"INFO","message":"request","method":"GET","path":"/v1/merchants/m-1/entries","span":{"http.request.method":"GET","http.response.status_code":401,"http.route":"/v1/merchants/{merchant_id}/entries","name":"http.server","otel.kind":"server","otel.name":"GET /v1/merchants/{merchant_id}/entries"},"status":401,"target":"fluxo::access"}"#,
            r#"{"level":"DEBUG","message":"unverified requests rate limited","peer":"10.0.0.1","span":{"http.request.method":"GET","http.route":"/v1/merchants/{merchant_id}/entries","name":"http.server","otel.kind":"server","otel.name":"GET /v1/merchants/{merchant_id}/entries"},"target":"fluxo_gateway"}"#,
            r#"{"level":"INFO","message":"request","method":"GET","path":"/v1/merchants/m-1/entries","span":{"http.request.method":"GET","http.response.status_code":429,"http.route":"/v1/merchants/{merchant_id}/entries","name":"http.server","otel.kind":"server","otel.name":"GET /v1/merchants/{merchant_id}/entries"},"status":429,"target":"fluxo::access"}"#,
            r#"{"level":"INFO","message":"request","method":"GET","path":"/v1/merchants/m-1/entries","span":{"http.request.method":"GET","http.response.status_code":503,"http.route":"/v1/merchants/{merchant_id}/entries","name":"http.server","otel.kind":"server","otel.name":"GET /v1/merchants/{merchant_id}/entries"},"status":503,"target":"fluxo::access"}"#,
            r#"{"level":"DEBUG","message":"rate limited","span":{"http.request.method":"GET","http.route":"/v1/merchants/{merchant_id}/entries","name":"http.server","otel.kind":"server","otel.name":"GET /v1/merchants/{merchant_id}/entries"},"subject":"tiny-shop","target":"fluxo_gateway"}"#,
            r#"{"level":"INFO","message":"request","method":"GET","path":"/v1/merchants/m-1/entries","span":{"http.request.method":"GET","http.response.status_code":429,"http.route":"/v1/merchants/{merchant_id}/entries","name":"http.server","otel.kind":"server","otel.name":"GET /v1/merchants/{merchant_id}/entries"},"status":429,"target":"fluxo::access"}"#
        ]
    );
}
