//! Webhook subscriptions over the REST API of a real `fluxo serve`: the
//! secret shown once (and again only to a retry), the SSRF refusals naming
//! `endpoint_url`, pause, rotation, deletion, and another merchant's token
//! refused — all through the gateway a merchant would use.

use serde_json::{Value, json};

use crate::{
    rest::{Client, dev_secret, token},
    support::Fluxo,
};

fn registration(url: &str) -> Value {
    json!({"endpointUrl": url, "eventTypes": ["entry.recorded", "balance.changed"], "description": "ERP"})
}

pub(crate) fn managed_over_rest(fluxo: &Fluxo, data: &std::path::Path) -> Vec<String> {
    let rest = Client::new(fluxo.rest.as_deref().expect("a REST address"));
    let own = token(&dev_secret(data), &["m-hooks"], 300, "fluxo-api");
    let t = Some(own.as_str());
    let body = registration("https://203.0.113.10/fluxo-events").to_string();
    let create = |key: &str| {
        rest.call(
            "POST",
            "/v1/merchants/m-hooks/webhooks",
            t,
            Some(("application/json", &body)),
            &[("Idempotency-Key", key)],
        )
    };

    let created = create("hook-1");
    assert_eq!(created.status, 200, "{:?}", created.body);
    let secret = created.body["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{secret}");
    let sub = &created.body["subscription"];
    let id = sub["id"].as_str().unwrap().to_owned();
    assert_eq!(sub["state"], "ACTIVE");
    assert_eq!(sub["eventTypes"], json!(["entry.recorded", "balance.changed"]));
    // A retry of the same request (its answer lost) shows the same secret; nothing new is made.
    let retried = create("hook-1");
    assert_eq!(
        (retried.body["subscription"]["id"].as_str(), retried.body["secret"].as_str()),
        (Some(id.as_str()), Some(secret.as_str()))
    );

    // Inward destinations: 400 naming the field; nothing is kept.
    for url in [
        "https://169.254.169.254/latest/meta-data/",
        "https://10.0.0.7/",
        "https://localhost:9443/",
        "http://203.0.113.10/",
    ] {
        let refused = rest.post(
            "/v1/merchants/m-hooks/webhooks",
            t,
            &json!({"endpointUrl": url, "eventTypes": ["entry.recorded"], "requestId": format!("bad-{url}")}),
        );
        assert_eq!(refused.status, 400, "{url}: {:?}", refused.body);
        assert_eq!(refused.body["details"][0]["fieldViolations"][0]["field"], "endpoint_url", "{url}");
    }

    // Reads never show the secret.
    let listed = rest.get("/v1/merchants/m-hooks/webhooks", t);
    assert_eq!(listed.status, 200);
    assert_eq!(listed.body["subscriptions"].as_array().unwrap().len(), 1);
    assert!(!listed.body.to_string().contains(&secret));

    let paused = rest.post(&format!("/v1/merchants/m-hooks/webhooks/{id}:pause"), t, &json!({}));
    assert_eq!((paused.status, paused.body["state"].as_str()), (200, Some("PAUSED")));
    let patch =
        json!({"eventTypes": ["period.closed"], "description": "", "updateDescription": true}).to_string();
    let patched = rest.call(
        "PATCH",
        &format!("/v1/merchants/m-hooks/webhooks/{id}"),
        t,
        Some(("application/json", &patch)),
        &[],
    );
    assert_eq!(patched.status, 200, "{:?}", patched.body);
    assert_eq!(
        (patched.body["eventTypes"].clone(), patched.body["state"].clone()),
        (json!(["period.closed"]), json!("PAUSED"))
    );

    let rotated = rest.post(
        &format!("/v1/merchants/m-hooks/webhooks/{id}:rotateSecret"),
        t,
        &json!({"gracePeriodSeconds": "600"}),
    );
    assert_eq!(rotated.status, 200, "{:?}", rotated.body);
    let new_secret = rotated.body["secret"].as_str().unwrap().to_owned();
    assert!(new_secret.starts_with("whsec_") && new_secret != secret);
    assert!(rotated.body["subscription"]["previousSecretExpiresAt"].as_str().unwrap().ends_with('Z'));

    // Another merchant's token reaches nothing of this one.
    let other = token(&dev_secret(data), &["m-other"], 300, "fluxo-api");
    let denied = rest.get(&format!("/v1/merchants/m-hooks/webhooks/{id}"), Some(&other));
    assert_eq!(denied.status, 403, "{:?}", denied.body);

    let deleted = rest.call("DELETE", &format!("/v1/merchants/m-hooks/webhooks/{id}"), t, None, &[]);
    assert_eq!(deleted.status, 200, "{:?}", deleted.body);
    let gone = rest.get(&format!("/v1/merchants/m-hooks/webhooks/{id}"), t);
    assert_eq!(gone.status, 404);
    vec![secret, new_secret]
}
