//! The REST API over real HTTP: every route, grpc-gateway's error mapping,
//! idempotent replay through the Idempotency-Key header, pagination, the
//! authorization matrix, and a rate limit shared by two gateway processes.

use std::time::{Duration, Instant};

use secrecy::SecretString;
use serde_json::{Value, json};

use crate::support::Fluxo;

pub(crate) struct Client {
    agent: ureq::Agent,
    base: String,
}

pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Value,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

impl Client {
    pub(crate) fn new(addr: &str) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        Self { agent, base: format!("http://{addr}") }
    }

    pub(crate) fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, &str)>,
        extra: &[(&str, &str)],
    ) -> Reply {
        self.try_call(method, path, token, body, extra).expect("HTTP exchange")
    }

    /// Like [`Client::call`], with a transport failure as an error.
    pub(crate) fn try_call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, &str)>,
        extra: &[(&str, &str)],
    ) -> Result<Reply, ureq::Error> {
        let url = format!("{}{path}", self.base);
        let auth = token.map(|t| format!("Bearer {t}"));
        let response = match method {
            "GET" | "DELETE" => {
                let mut r = if method == "GET" { self.agent.get(&url) } else { self.agent.delete(&url) };
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                for (k, v) in extra {
                    r = r.header(*k, *v);
                }
                r.call()
            }
            _ => {
                let mut r = match method {
                    "POST" => self.agent.post(&url),
                    "PATCH" => self.agent.patch(&url),
                    _ => self.agent.put(&url),
                };
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                for (k, v) in extra {
                    r = r.header(*k, *v);
                }
                let (content_type, text) = body.unwrap_or(("application/json", ""));
                r.header("Content-Type", content_type).send(text)
            }
        };
        let mut response = response?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
            .collect();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Reply { status, headers, body })
    }

    pub(crate) fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.call("GET", path, token, None, &[])
    }

    pub(crate) fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Reply {
        self.call("POST", path, token, Some(("application/json", &body.to_string())), &[])
    }
}

/// The development secret the embedded default generated, to mint test tokens.
pub(crate) fn dev_secret(data: &std::path::Path) -> SecretString {
    SecretString::from(std::fs::read_to_string(data.join("data/dev-jwt-secret")).unwrap().trim().to_owned())
}

pub(crate) fn token(secret: &SecretString, merchants: &[&str], valid_for: i64, audience: &str) -> String {
    fluxo_gateway::auth::TokenSpec {
        valid_for_secs: valid_for,
        ..fluxo_gateway::auth::TokenSpec::new("tester", merchants)
    }
    .sign_hs256(secret, "fluxo", audience)
    .unwrap()
}

fn entry(key: &str, minor: &str) -> Value {
    json!({"type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":minor},"bookingDate":"2026-11-21","description":"sale","requestId":key})
}

pub(crate) fn every_route_and_error_mapping(fluxo: &Fluxo) {
    let rest = Client::new(fluxo.rest.as_deref().expect("a REST address in the banner"));
    let token = fluxo.token.clone().expect("a development token in the banner");
    let t = Some(token.as_str());

    // RecordEntry: the JSON external callers send; int64 as strings, enums by name, RFC 3339 Z.
    let created = rest.post("/v1/merchants/m-1/entries", t, &entry("k-1", "1050"));
    assert_eq!(created.status, 200, "{:?}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    assert_eq!(created.body["amount"]["minorUnits"], "1050");
    assert_eq!(created.body["type"], "CREDIT");
    assert!(created.body["createdAt"].as_str().unwrap().ends_with('Z'));
    assert!(created.header("x-request-id").is_some());
    assert!(created.header("ratelimit-remaining").is_some());

    // Idempotent replay through the header; proto field names are accepted too; unknown fields ignored.
    let body = json!({"type":"CREDIT","amount":{"currency_code":"BRL","minor_units":"1050"},"booking_date":"2026-11-21","description":"sale","surprise":1});
    let replay = rest.call(
        "POST",
        "/v1/merchants/m-1/entries",
        t,
        Some(("application/json", &body.to_string())),
        &[("Idempotency-Key", "k-1")],
    );
    assert_eq!(replay.status, 200, "{:?}", replay.body);
    assert_eq!(replay.body["id"], id.as_str());
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    // Same key, different request: 409 with ErrorInfo.
    let reused = rest.post("/v1/merchants/m-1/entries", t, &entry("k-1", "9"));
    assert_eq!(reused.status, 409);
    assert_eq!(reused.body["code"], 6);
    assert_eq!(reused.body["details"][0]["@type"], "type.googleapis.com/google.rpc.ErrorInfo");
    // Invalid: 400 with BadRequest naming the field.
    let invalid = rest.post("/v1/merchants/m-1/entries", t, &entry("k-2", "0"));
    assert_eq!(invalid.status, 400);
    assert_eq!(invalid.body["code"], 3);
    assert_eq!(invalid.body["details"][0]["fieldViolations"][0]["field"], "amount.minor_units");
    let not_json =
        rest.call("POST", "/v1/merchants/m-1/entries", t, Some(("application/json", "{not json")), &[]);
    assert_eq!(not_json.status, 400);

    // GetEntry, 404 for an unknown one.
    let read = rest.get(&format!("/v1/merchants/m-1/entries/{id}"), t);
    assert_eq!(read.status, 200);
    assert_eq!(read.body["id"], id.as_str());
    let missing = rest.get("/v1/merchants/m-1/entries/01JD0000000000000000000000", t);
    assert_eq!((missing.status, missing.body["code"].clone()), (404, json!(5)));

    // ListEntries with pagination through query parameters.
    rest.post("/v1/merchants/m-1/entries", t, &entry("k-3", "5"));
    let first = rest.get("/v1/merchants/m-1/entries?pageSize=1&startDate=2026-11-01", t);
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.body["entries"].as_array().unwrap().len(), 1);
    let next = first.body["nextPageToken"].as_str().unwrap();
    assert!(!next.is_empty());
    let second =
        rest.get(&format!("/v1/merchants/m-1/entries?pageSize=1&startDate=2026-11-01&pageToken={next}"), t);
    assert_eq!(second.body["entries"].as_array().unwrap().len(), 1);
    assert_ne!(second.body["entries"][0]["id"], first.body["entries"][0]["id"]);
    let bad_query = rest.get("/v1/merchants/m-1/entries?pageSize=lots", t);
    assert_eq!(bad_query.status, 400);

    // ReverseEntry (custom verb), then FAILED_PRECONDITION → 400 on a second one.
    // Booked for the original's day (a reversal defaults to today).
    let reversal = json!({"bookingDate": "2026-11-21"});
    let reversed = rest.post(&format!("/v1/merchants/m-1/entries/{id}:reverse"), t, &reversal);
    assert_eq!(reversed.status, 200, "{:?}", reversed.body);
    assert_eq!(reversed.body["reversesEntryId"], id.as_str());
    assert_eq!(reversed.body["bookingDate"], "2026-11-21");
    let again = rest.post(&format!("/v1/merchants/m-1/entries/{id}:reverse"), t, &json!({}));
    assert_eq!((again.status, again.body["code"].clone()), (400, json!(9)));

    // Balances: one day and a range.
    // Consolidation is asynchronous: the reversal shows within seconds, not at once, on a busy machine.
    let deadline = Instant::now() + Duration::from_secs(15);
    let day = loop {
        let day = rest.get("/v1/merchants/m-1/balances/2026-11-21", t);
        assert_eq!(day.status, 200, "{:?}", day.body);
        if day.body["closingBalanceMinor"] == "5" || Instant::now() > deadline {
            break day;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(day.body["closingBalanceMinor"], "5", "1050 + 5 - 1050 once the reversal is consolidated");
    let range =
        rest.get("/v1/merchants/m-1/balances?startDate=2026-11-20&endDate=2026-11-21&currencyCode=BRL", t);
    assert_eq!(range.body["balances"].as_array().unwrap().len(), 2);

    // The edge's own answers.
    assert_eq!(rest.get("/v1/nowhere", t).status, 404);
    let wrong_method = rest.call("DELETE", "/v1/merchants/m-1/entries", t, None, &[]);
    assert_eq!(wrong_method.status, 405);
    assert!(wrong_method.header("allow").unwrap().contains("POST"));
    let wrong_type = rest.call("POST", "/v1/merchants/m-1/entries", t, Some(("text/plain", "hello")), &[]);
    assert_eq!(wrong_type.status, 415);
    // Just over the 64 KiB default, so the whole body is sent before the answer.
    let huge = json!({"description": "x".repeat(70_000)});
    assert_eq!(rest.post("/v1/merchants/m-1/entries", t, &huge).status, 413);
    assert_eq!(rest.get("/healthz", None).status, 200);
    assert_eq!(rest.get("/readyz", None).status, 200);
    let openapi = rest.get("/openapi.json", None);
    assert_eq!(openapi.body["openapi"], "3.1.0");
    assert_eq!(openapi.body, serde_json::from_str::<Value>(include_str!("../../docs/openapi.json")).unwrap());
}

pub(crate) fn authorization_matrix(fluxo: &Fluxo, data: &std::path::Path) {
    let rest = Client::new(fluxo.rest.as_deref().unwrap());
    let secret = dev_secret(data);
    let admin = fluxo.token.clone().unwrap();
    let own = token(&secret, &["m-own"], 300, "fluxo-api");
    let entry_id = rest.post("/v1/merchants/m-own/entries", Some(&own), &entry("a-1", "10")).body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let forged = token(
        &SecretString::from("not-the-secret-not-the-secret-xx".to_owned()),
        &["m-own"],
        300,
        "fluxo-api",
    );
    let expired = token(&secret, &["m-own"], -300, "fluxo-api");
    let wrong_audience = token(&secret, &["m-own"], 300, "another-api");
    let other = token(&secret, &["m-other"], 300, "fluxo-api");
    let routes: Vec<(&str, String, Option<Value>)> = vec![
        ("POST", "/v1/merchants/m-own/entries".into(), Some(entry("a-2", "3"))),
        ("GET", format!("/v1/merchants/m-own/entries/{entry_id}"), None),
        ("GET", "/v1/merchants/m-own/entries".into(), None),
        (
            "POST",
            format!("/v1/merchants/m-own/entries/{entry_id}:reverse"),
            Some(json!({"requestId": "r-1"})),
        ),
        ("GET", "/v1/merchants/m-own/balances/2026-11-21?currencyCode=BRL".into(), None),
        (
            "GET",
            "/v1/merchants/m-own/balances?startDate=2026-11-01&endDate=2026-11-30&currencyCode=BRL".into(),
            None,
        ),
    ];
    for (method, path, body) in &routes {
        let send = |t: Option<&str>| {
            let text = body.as_ref().map(Value::to_string).unwrap_or_default();
            rest.call(method, path, t, body.as_ref().map(|_| ("application/json", text.as_str())), &[])
        };
        assert_eq!(send(None).status, 401, "{method} {path} without a token");
        assert_eq!(send(Some(&forged)).status, 401, "{method} {path} bad signature");
        assert_eq!(send(Some(&expired)).status, 401, "{method} {path} expired");
        assert_eq!(send(Some(&wrong_audience)).status, 401, "{method} {path} wrong audience");
        let denied = send(Some(&other));
        assert_eq!(
            (denied.status, denied.body["code"].clone()),
            (403, json!(7)),
            "{method} {path} other merchant"
        );
        let allowed = send(Some(&own));
        assert!(
            (200..300).contains(&allowed.status),
            "{method} {path} own merchant: {} {:?}",
            allowed.status,
            allowed.body
        );
        let admin_reply = send(Some(&admin));
        assert!(admin_reply.status < 500, "{method} {path} admin");
    }
}

/// Labels booked over REST and the ListEntries filters as query parameters:
/// `metadata[key]=value` (grpc-gateway's map syntax), `type` by name,
/// `createdAfter` as RFC 3339.
pub(crate) fn metadata_and_filters(fluxo: &Fluxo) {
    let rest = Client::new(fluxo.rest.as_deref().expect("a REST address in the banner"));
    let token = fluxo.token.clone().expect("a development token in the banner");
    let t = Some(token.as_str());
    let book = |key: &str, kind: &str, labels: Value| {
        let body = json!({"type": kind, "amount": {"currencyCode": "BRL", "minorUnits": "700"},
                          "bookingDate": "2026-11-22", "requestId": key, "metadata": labels});
        let reply = rest.post("/v1/merchants/m-1/entries", t, &body);
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        reply.body
    };
    let first = book("md-1", "CREDIT", json!({"invoice": "INV-77", "channel": "pos"}));
    assert_eq!(first["metadata"], json!({"invoice": "INV-77", "channel": "pos"}));
    let second = book("md-2", "DEBIT", json!({"invoice": "INV-77"}));
    book("md-3", "CREDIT", json!({"invoice": "INV-78"}));

    let list = |query: &str| {
        let reply = rest.get(&format!("/v1/merchants/m-1/entries?{query}"), t);
        assert_eq!(reply.status, 200, "{query}: {:?}", reply.body);
        reply.body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let mut both = vec![first["id"].as_str().unwrap().to_owned(), second["id"].as_str().unwrap().to_owned()];
    both.sort();
    assert_eq!(list("metadata%5Binvoice%5D=INV-77"), both);
    assert_eq!(list("metadata[invoice]=INV-77&type=DEBIT"), [second["id"].as_str().unwrap()]);
    let since = second["createdAt"].as_str().unwrap();
    assert_eq!(
        list(&format!("metadata[invoice]=INV-77&createdAfter={since}")),
        [second["id"].as_str().unwrap()]
    );

    // Bad labels and filters: 400 naming the field.
    let bad = rest.post(
        "/v1/merchants/m-1/entries",
        t,
        &json!({"type": "CREDIT", "amount": {"currencyCode": "BRL", "minorUnits": "1"}, "requestId": "md-4",
                "metadata": {"note": ""}}),
    );
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body["details"][0]["fieldViolations"][0]["field"], "metadata[note]");
    for (query, field) in [
        ("metadata=INV-77", "metadata"),
        ("metadata[invoice]=a&metadata[invoice]=b", "metadata[invoice]"),
        ("createdAfter=yesterday", "createdAfter"),
        ("type=REFUND", "type"),
    ] {
        let reply = rest.get(&format!("/v1/merchants/m-1/entries?{query}"), t);
        assert_eq!(reply.status, 400, "{query}: {:?}", reply.body);
        let named =
            reply.body["details"][0]["fieldViolations"][0]["field"].as_str().unwrap_or_default().to_owned();
        assert_eq!(named, field, "{query}: {:?}", reply.body);
    }
}

/// BatchRecordEntries and the period routes over REST: per-entry results with
/// the refusal's google.rpc.Status rendered as JSON, and a close refusing a
/// backdated entry with FAILED_PRECONDITION (HTTP 400) naming the date.
pub(crate) fn batch_and_periods(fluxo: &Fluxo) {
    let rest = Client::new(fluxo.rest.as_deref().expect("a REST address in the banner"));
    let token = fluxo.token.clone().expect("a development token in the banner");
    let t = Some(token.as_str());
    let entry = |key: &str, date: &str, units: &str| {
        json!({"type": "CREDIT", "amount": {"currencyCode": "BRL", "minorUnits": units},
               "bookingDate": date, "requestId": key})
    };
    let body = json!({"requests": [entry("b-1", "2026-10-01", "100"), entry("b-2", "2026-10-02", "0"),
                                   entry("b-1", "2026-10-01", "100")]});
    let reply = rest.post("/v1/merchants/m-rest/entries:batchRecord", t, &body);
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let results = reply.body["results"].as_array().unwrap();
    let outcomes: Vec<&str> = results.iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["BOOKED", "REFUSED", "REPLAYED"]);
    assert_eq!(results[0]["entry"]["merchantId"], "m-rest");
    let error = &results[1]["error"];
    assert_eq!(error["code"], 3, "{error}");
    let violation = &error["details"][0];
    assert_eq!(violation["@type"], "type.googleapis.com/google.rpc.BadRequest", "{error}");
    assert_eq!(violation["fieldViolations"][0]["field"], "requests[1].amount.minor_units", "{error}");

    let close = rest.post(
        "/v1/merchants/m-rest/periods:close",
        t,
        &json!({"closedThrough": "2026-10-01", "note": "September and before"}),
    );
    assert_eq!(close.status, 200, "{:?}", close.body);
    assert_eq!(close.body["entryCount"], "1");
    assert_eq!(close.body["closingBalances"], json!([{"currencyCode": "BRL", "minorUnits": "100"}]));
    let late = rest.post("/v1/merchants/m-rest/entries", t, &entry("b-3", "2026-09-30", "5"));
    assert_eq!(late.status, 400, "{:?}", late.body);
    assert_eq!(late.body["code"], 9, "FAILED_PRECONDITION: {:?}", late.body);
    assert!(late.body["message"].as_str().unwrap().contains("closed through 2026-10-01"), "{:?}", late.body);
    let reopened =
        rest.post("/v1/merchants/m-rest/periods:reopen", t, &json!({"reason": "a late statement arrived"}));
    assert_eq!(reopened.status, 200, "{:?}", reopened.body);
    let listed = rest.get("/v1/merchants/m-rest/periods", t);
    assert_eq!(listed.body["closes"][0]["reopenReason"], "a late statement arrived", "{:?}", listed.body);
}
