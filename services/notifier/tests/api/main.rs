//! The subscription API's integration suite: a real tonic client against a
//! real gRPC server, each test on a fresh database, on SQLite and PostgreSQL.

use std::{sync::Arc, time::Duration};

use fluxo_notifier::{
    Sealer, Settings, SubscriptionStore, Subscriptions, grpc, readiness, store::DeliveryFilter,
};
use fluxo_proto::webhooks_v1::{self as pb, webhook_service_client::WebhookServiceClient};
use fluxo_server::{GrpcServer, ServerConfig, identity};
use fluxo_testing::{Backend, TestDb, backend_suite};
use fluxo_webhooks::{DestinationPolicy, Secret};
use sea_orm::ConnectionTrait;
use tonic::{Code, Request, transport::Channel};
use tonic_types::StatusExt;

backend_suite!(
    a_subscription_shows_its_secret_once_and_a_retried_create_replays_it,
    every_bad_field_is_named_and_inward_endpoints_are_refused,
    pause_resume_update_and_delete_do_what_they_say_and_are_safe_to_retry,
    a_rotation_signs_with_both_secrets_until_the_grace_period_ends,
    a_merchant_cannot_pass_the_limit_even_with_concurrent_creates,
    a_caller_acts_only_for_its_own_merchants,
    secrets_are_sealed_at_rest_and_nothing_registers_without_a_key,
    changed_days_become_events_from_the_subscription_on,
    closes_made_after_a_subscription_become_events_once,
    a_batch_fans_out_once_numbered_in_order_and_records_streaks_in_order,
    a_paused_subscriptions_deliveries_are_held_until_it_is_resumed,
    a_database_from_before_held_deliveries_is_upgraded_keeping_every_row,
);

use balances::{
    changed_days_become_events_from_the_subscription_on, closes_made_after_a_subscription_become_events_once,
};

struct App {
    client: WebhookServiceClient<Channel>,
    subscriptions: Subscriptions,
    db: fluxo_db::Db,
    _test_db: TestDb,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn sealer() -> Sealer {
    Sealer::new(&[42u8; 32]).unwrap()
}

async fn spawn(backend: Backend, sealer: Option<Sealer>, max_per_merchant: u32) -> App {
    let test_db = TestDb::new(backend).await;
    let db = test_db.connect().await;
    SubscriptionStore::migrate(&db).await.expect("migrate");
    // The suite's receivers would live on loopback; the policy refuses it
    // unless allow-listed, which one test checks.
    let settings = Settings {
        policy: DestinationPolicy::strict().allow_nets(["127.0.0.2/32".parse().unwrap()]),
        max_per_merchant,
        resolve_timeout: Duration::from_secs(5),
    };
    let subscriptions = Subscriptions::new(SubscriptionStore::new(db.clone()), sealer, settings);
    let mut server = GrpcServer::bind(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_concurrent_requests: 64,
        request_timeout: Duration::from_secs(30),
        shutdown_delay: Duration::ZERO,
        shutdown_timeout: Duration::from_secs(5),
        readiness_interval: Duration::from_millis(100),
    })
    .await
    .expect("bind");
    let addr = server.local_addr().unwrap();
    server.add_service(grpc::server(subscriptions.clone())).await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve(Arc::new(readiness(db.clone())), async {
        let _ = rx.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connect");
    App { client: WebhookServiceClient::new(channel), subscriptions, db, _test_db: test_db, _stop: tx }
}

/// An endpoint on an address the policy accepts without resolving anything:
/// a documentation address is public as far as the policy is concerned.
const ENDPOINT: &str = "https://203.0.113.10/fluxo-events";

fn create(merchant: &str, request_id: &str, events: &[&str]) -> pb::CreateSubscriptionRequest {
    pb::CreateSubscriptionRequest {
        merchant_id: merchant.into(),
        endpoint_url: ENDPOINT.into(),
        event_types: events.iter().map(|e| (*e).to_owned()).collect(),
        description: "ERP".into(),
        request_id: request_id.into(),
    }
}

fn fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

async fn a_subscription_shows_its_secret_once_and_a_retried_create_replays_it(backend: Backend) {
    let mut app = spawn(backend, Some(sealer()), 20).await;
    let first = app
        .client
        .create_subscription(create("m-1", "k-1", &["entry.recorded", "balance.changed"]))
        .await
        .unwrap()
        .into_inner();
    let sub = first.subscription.unwrap();
    assert_eq!(sub.state(), pb::SubscriptionState::Active);
    assert_eq!(sub.event_types, ["entry.recorded", "balance.changed"]);
    assert_eq!(sub.endpoint_url, ENDPOINT);
    let secret = Secret::parse(&first.secret).expect("a Standard Webhooks secret");

    // Reads never carry it.
    let got = app
        .client
        .get_subscription(pb::GetSubscriptionRequest {
            merchant_id: "m-1".into(),
            subscription_id: sub.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, sub);
    let listed = app
        .client
        .list_subscriptions(pb::ListSubscriptionsRequest { merchant_id: "m-1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.subscriptions, std::slice::from_ref(&sub));

    // A retry (lost answer) gets the same subscription and the same secret.
    let again = app
        .client
        .create_subscription(create("m-1", "k-1", &["entry.recorded", "balance.changed"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.subscription.unwrap().id, sub.id);
    assert_eq!(again.secret, secret.expose_text());
    let listed = app
        .client
        .list_subscriptions(pb::ListSubscriptionsRequest { merchant_id: "m-1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.subscriptions.len(), 1, "a replay books nothing");

    // The same key for something else is refused, naming the earlier one.
    let other = app.client.create_subscription(create("m-1", "k-1", &["entry.reversed"])).await.unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists);
    assert!(other.message().contains(&sub.id), "{}", other.message());

    // The signing secret is the one shown.
    let secrets = app.subscriptions.signing_secrets(&sub.id, chrono::Utc::now()).await.unwrap().unwrap();
    assert_eq!(secrets.current.expose_text(), secret.expose_text());
    assert!(secrets.previous.is_none());
}

async fn every_bad_field_is_named_and_inward_endpoints_are_refused(backend: Backend) {
    let mut app = spawn(backend, Some(sealer()), 20).await;
    let bad = pb::CreateSubscriptionRequest {
        merchant_id: String::new(),
        endpoint_url: "http://203.0.113.10/hooks".into(),
        event_types: vec!["entry.recorded".into(), "entry.created".into(), "entry.recorded".into()],
        description: "d".repeat(201),
        request_id: String::new(),
    };
    let status = app.client.create_subscription(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        fields(&status),
        ["request_id", "merchant_id", "endpoint_url", "event_types[1]", "event_types[2]", "description"]
    );

    // Each inward destination, by literal or by name, is refused naming the field and the range.
    for (url, says) in [
        ("https://10.0.0.7/hooks", "private"),
        ("https://169.254.169.254/latest/meta-data", "link-local"),
        ("https://[::1]/hooks", "loopback"),
        ("https://localhost:8443/hooks", "loopback"),
        ("https://user:pw@203.0.113.10/hooks", "credentials"),
        ("https://203.0.113.10/hooks#frag", "fragment"),
        ("not a url", "absolute URL"),
    ] {
        let request = pb::CreateSubscriptionRequest {
            endpoint_url: url.into(),
            ..create("m-1", "k-ssrf", &["entry.recorded"])
        };
        let status = app.client.create_subscription(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{url}");
        let bad_request = status.get_details_bad_request().unwrap();
        assert_eq!(bad_request.field_violations.len(), 1, "{url}");
        assert_eq!(bad_request.field_violations[0].field, "endpoint_url", "{url}");
        assert!(
            bad_request.field_violations[0].description.contains(says),
            "{url}: {}",
            bad_request.field_violations[0].description
        );
    }
    let long = format!("https://203.0.113.10/{}", "a".repeat(2100));
    let status = app
        .client
        .create_subscription(pb::CreateSubscriptionRequest {
            endpoint_url: long,
            ..create("m-1", "k-long", &["entry.recorded"])
        })
        .await
        .unwrap_err();
    assert_eq!(fields(&status), ["endpoint_url"]);
    // An allow-listed loopback address passes.
    let allowed = pb::CreateSubscriptionRequest {
        endpoint_url: "https://127.0.0.2:9443/hooks".into(),
        ..create("m-1", "k-ok", &["entry.recorded"])
    };
    app.client.create_subscription(allowed).await.expect("allow-listed");
    let listed = app
        .client
        .list_subscriptions(pb::ListSubscriptionsRequest { merchant_id: "m-1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.subscriptions.len(), 1, "nothing refused was kept");

    let rotate = pb::RotateSubscriptionSecretRequest {
        merchant_id: "m-1".into(),
        subscription_id: "nope".into(),
        grace_period_seconds: 604_801,
    };
    let status = app.client.rotate_subscription_secret(rotate).await.unwrap_err();
    assert_eq!(fields(&status), ["subscription_id", "grace_period_seconds"]);
    let get = pb::GetSubscriptionRequest {
        merchant_id: "m-1".into(),
        subscription_id: ulid::Ulid::new().to_string(),
    };
    assert_eq!(app.client.get_subscription(get).await.unwrap_err().code(), Code::NotFound);
}

async fn pause_resume_update_and_delete_do_what_they_say_and_are_safe_to_retry(backend: Backend) {
    let mut app = spawn(backend, Some(sealer()), 20).await;
    let sub = app
        .client
        .create_subscription(create("m-1", "k-1", &["entry.recorded"]))
        .await
        .unwrap()
        .into_inner()
        .subscription
        .unwrap();
    let ids = || (String::from("m-1"), sub.id.clone());
    for _ in 0..2 {
        let (merchant_id, subscription_id) = ids();
        let paused = app
            .client
            .pause_subscription(pb::PauseSubscriptionRequest { merchant_id, subscription_id })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(paused.state(), pb::SubscriptionState::Paused);
    }
    for _ in 0..2 {
        let (merchant_id, subscription_id) = ids();
        let resumed = app
            .client
            .resume_subscription(pb::ResumeSubscriptionRequest { merchant_id, subscription_id })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resumed.state(), pb::SubscriptionState::Active);
    }

    let (merchant_id, subscription_id) = ids();
    let updated = app
        .client
        .update_subscription(pb::UpdateSubscriptionRequest {
            merchant_id,
            subscription_id,
            endpoint_url: "https://203.0.113.11/v2/events".into(),
            event_types: vec!["period.closed".into(), "entry.reversed".into()],
            description: String::new(),
            update_description: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.endpoint_url, "https://203.0.113.11/v2/events");
    assert_eq!(updated.event_types, ["entry.reversed", "period.closed"], "kept in the API's order");
    assert_eq!(updated.description, "");
    let micros = |t: &Option<prost_types::Timestamp>| fluxo_proto::time::to_micros(t.as_ref().unwrap());
    assert!(micros(&updated.updated_at) >= micros(&sub.updated_at));
    // An update naming nothing keeps everything; a bad one changes nothing.
    let (merchant_id, subscription_id) = ids();
    let same = app
        .client
        .update_subscription(pb::UpdateSubscriptionRequest {
            merchant_id,
            subscription_id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (same.endpoint_url.as_str(), same.event_types.clone()),
        (updated.endpoint_url.as_str(), updated.event_types.clone())
    );
    let (merchant_id, subscription_id) = ids();
    let status = app
        .client
        .update_subscription(pb::UpdateSubscriptionRequest {
            merchant_id,
            subscription_id,
            endpoint_url: "https://10.1.2.3/".into(),
            event_types: vec!["balance.changed".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(fields(&status), ["endpoint_url"]);
    let (merchant_id, subscription_id) = ids();
    let kept = app
        .client
        .get_subscription(pb::GetSubscriptionRequest { merchant_id, subscription_id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.event_types, ["entry.reversed", "period.closed"], "a refused update changes nothing");

    let (merchant_id, subscription_id) = ids();
    app.client
        .delete_subscription(pb::DeleteSubscriptionRequest { merchant_id, subscription_id })
        .await
        .unwrap();
    let (merchant_id, subscription_id) = ids();
    let again = app
        .client
        .delete_subscription(pb::DeleteSubscriptionRequest { merchant_id, subscription_id })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    let (merchant_id, subscription_id) = ids();
    assert_eq!(
        app.client
            .pause_subscription(pb::PauseSubscriptionRequest { merchant_id, subscription_id })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let listed = app
        .client
        .list_subscriptions(pb::ListSubscriptionsRequest { merchant_id: "m-1".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.subscriptions.is_empty());
    assert!(
        app.subscriptions.signing_secrets(&sub.id, chrono::Utc::now()).await.unwrap().is_none(),
        "nothing signs for a deleted one"
    );
}

async fn a_rotation_signs_with_both_secrets_until_the_grace_period_ends(backend: Backend) {
    let mut app = spawn(backend, Some(sealer()), 20).await;
    let created =
        app.client.create_subscription(create("m-1", "k-1", &["entry.recorded"])).await.unwrap().into_inner();
    let sub = created.subscription.unwrap();
    let rotate = pb::RotateSubscriptionSecretRequest {
        merchant_id: "m-1".into(),
        subscription_id: sub.id.clone(),
        grace_period_seconds: 3600,
    };
    let rotated = app.client.rotate_subscription_secret(rotate).await.unwrap().into_inner();
    assert_ne!(rotated.secret, created.secret);
    let after = rotated.subscription.unwrap();
    let expires = after.previous_secret_expires_at.unwrap();
    let rotated_at = after.secret_rotated_at.unwrap();
    assert_eq!(expires.seconds - rotated_at.seconds, 3600);

    let now = chrono::Utc::now();
    let signing = app.subscriptions.signing_secrets(&sub.id, now).await.unwrap().unwrap();
    let texts: Vec<String> = signing.signing(now.timestamp()).iter().map(|s| s.expose_text()).collect();
    assert_eq!(texts, [rotated.secret.clone(), created.secret.clone()], "new first, old beside it");
    let later = now + chrono::Duration::seconds(3601);
    let signing = app.subscriptions.signing_secrets(&sub.id, later).await.unwrap().unwrap();
    assert_eq!(
        signing.signing(later.timestamp()).len(),
        1,
        "the old one stops at the end of the grace period"
    );

    // After a rotation, a replayed create no longer shows a secret (the first one is retired).
    let replay =
        app.client.create_subscription(create("m-1", "k-1", &["entry.recorded"])).await.unwrap().into_inner();
    assert_eq!(replay.subscription.unwrap().id, sub.id);
    assert_eq!(replay.secret, "");
}

async fn a_merchant_cannot_pass_the_limit_even_with_concurrent_creates(backend: Backend) {
    let app = spawn(backend, Some(sealer()), 3).await;
    let calls = (0..8).map(|i| {
        let mut client = app.client.clone();
        async move { client.create_subscription(create("m-1", &format!("k-{i}"), &["entry.recorded"])).await }
    });
    let results = futures_join(calls).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 3, "{results:?}");
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    }
    // Another merchant has a limit of its own; a deletion frees a place.
    let mut client = app.client.clone();
    client.create_subscription(create("m-2", "k-0", &["entry.recorded"])).await.unwrap();
    let first = client
        .list_subscriptions(pb::ListSubscriptionsRequest { merchant_id: "m-1".into() })
        .await
        .unwrap()
        .into_inner()
        .subscriptions
        .remove(0);
    client
        .delete_subscription(pb::DeleteSubscriptionRequest {
            merchant_id: "m-1".into(),
            subscription_id: first.id,
        })
        .await
        .unwrap();
    client.create_subscription(create("m-1", "k-new", &["entry.recorded"])).await.expect("a freed place");
}

async fn futures_join<F, T>(calls: impl Iterator<Item = F>) -> Vec<T>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = calls.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

fn as_caller<T>(message: T, merchants: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(identity::SUBJECT, "shop".parse().unwrap());
    request.metadata_mut().insert(identity::MERCHANTS, merchants.parse().unwrap());
    request
}

async fn a_caller_acts_only_for_its_own_merchants(backend: Backend) {
    let mut app = spawn(backend, Some(sealer()), 20).await;
    let theirs = app
        .client
        .create_subscription(create("m-2", "k-1", &["entry.recorded"]))
        .await
        .unwrap()
        .into_inner()
        .subscription
        .unwrap();
    let refused = app
        .client
        .create_subscription(as_caller(create("m-2", "k-2", &["entry.recorded"]), "m-1"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let get = pb::GetSubscriptionRequest { merchant_id: "m-2".into(), subscription_id: theirs.id.clone() };
    assert_eq!(
        app.client.get_subscription(as_caller(get, "m-1")).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // Naming one's own merchant with another's subscription id finds nothing.
    let get = pb::GetSubscriptionRequest { merchant_id: "m-1".into(), subscription_id: theirs.id.clone() };
    assert_eq!(app.client.get_subscription(as_caller(get, "m-1")).await.unwrap_err().code(), Code::NotFound);
    let delete =
        pb::DeleteSubscriptionRequest { merchant_id: "m-1".into(), subscription_id: theirs.id.clone() };
    assert_eq!(
        app.client.delete_subscription(as_caller(delete, "m-1")).await.unwrap_err().code(),
        Code::NotFound
    );
    app.client
        .create_subscription(as_caller(create("m-1", "k-3", &["entry.recorded"]), "m-1"))
        .await
        .expect("its own merchant");
}

async fn secrets_are_sealed_at_rest_and_nothing_registers_without_a_key(backend: Backend) {
    let mut app = spawn(backend, Some(sealer()), 20).await;
    let created =
        app.client.create_subscription(create("m-1", "k-1", &["entry.recorded"])).await.unwrap().into_inner();
    let key = created.secret.strip_prefix("whsec_").unwrap().to_owned();
    let rows = app
        .db
        .conn()
        .query_all_raw(fluxo_db::statement(app.db.backend(), "SELECT * FROM webhook_subscriptions", vec![]))
        .await
        .unwrap();
    let dump = format!("{rows:?}");
    assert!(
        !dump.contains(&key) && !dump.contains(&created.secret),
        "the secret is not readable in the table"
    );

    let mut keyless = spawn(backend, None, 20).await;
    let status =
        keyless.client.create_subscription(create("m-1", "k-1", &["entry.recorded"])).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("webhooks.secret_key"), "{}", status.message());
    // A bad field is still named first: the caller can fix that much.
    let bad = pb::CreateSubscriptionRequest {
        endpoint_url: "https://10.0.0.1/".into(),
        ..create("m-1", "k-1", &["entry.recorded"])
    };
    assert_eq!(keyless.client.create_subscription(bad).await.unwrap_err().code(), Code::InvalidArgument);
    drop(keyless);

    // Under another key the stored secrets do not open, and say why.
    let other = Subscriptions::new(
        SubscriptionStore::new(app.db.clone()),
        Some(Sealer::new(&[7u8; 32]).unwrap()),
        Settings::default(),
    );
    let id = created.subscription.unwrap().id;
    let error = other.signing_secrets(&id, chrono::Utc::now()).await.unwrap_err();
    assert!(error.to_string().contains("sealed under key"), "{error}");
}

mod balances {
    use super::*;
    use fluxo_balance::{BalanceStore, Balances, Consolidator};
    use fluxo_proto::ledger_v1 as lpb;
    use fluxo_queue::StreamEvent;
    use prost::Message;

    fn event(n: u32, merchant: &str, minor: i64) -> StreamEvent {
        let entry = lpb::Entry {
            id: ulid::Ulid::new().to_string(),
            merchant_id: merchant.into(),
            r#type: lpb::EntryType::Credit.into(),
            amount: Some(lpb::Money { currency_code: "BRL".into(), minor_units: minor }),
            booking_date: "2026-11-21".into(),
            created_at: Some(prost_types::Timestamp { seconds: 1_764_000_000 + i64::from(n), nanos: 0 }),
            ..Default::default()
        };
        let event_id = ulid::Ulid::new().to_string();
        let payload =
            lpb::EntryRecorded { event_id: event_id.clone(), entry: Some(entry), occurred_at: None };
        StreamEvent {
            event_id,
            position: i64::from(n),
            payload: payload.encode_to_vec().into(),
            traceparent: None,
            tracestate: None,
        }
    }

    /// balance.changed: the days a merchant's entries changed, as the balance
    /// API shows them, from the moment it subscribed; read again after a
    /// crash (the cursor not yet moved), they make nothing new.
    pub(super) async fn changed_days_become_events_from_the_subscription_on(backend: Backend) {
        let mut app = spawn(backend, Some(sealer()), 20).await;
        BalanceStore::migrate(&app.db).await.unwrap();
        let consolidator = Consolidator::new(BalanceStore::new(app.db.clone()));
        let balances = Balances::new(BalanceStore::new(app.db.clone()));
        // Before anyone subscribes: not reported.
        assert!(consolidator.apply(&[event(1, "m-1", 100)]).await.iter().all(Result::is_ok));
        let subscriptions = app.subscriptions.clone().with_balances(balances.clone());
        let created = subscriptions
            .create(fluxo_notifier::subscriptions::CreateRequest {
                registration: fluxo_webhooks::subscription::Registration {
                    merchant_id: "m-1",
                    endpoint_url: ENDPOINT,
                    event_types: &["balance.changed".to_owned()],
                    description: "",
                },
                request_id: "k-b",
            })
            .await
            .unwrap();
        let sender =
            fluxo_webhooks::Sender::new(DestinationPolicy::strict(), None, Default::default()).unwrap();
        let notifier =
            fluxo_notifier::Notifier::new(subscriptions, sender, Default::default()).with_balances(balances);
        assert_eq!(notifier.follow_balances().await.unwrap(), 0, "nothing changed since it subscribed");

        assert!(
            consolidator.apply(&[event(2, "m-1", 250), event(3, "m-2", 7)]).await.iter().all(Result::is_ok)
        );
        assert_eq!(notifier.follow_balances().await.unwrap(), 1, "one day of m-1 changed");
        assert_eq!(notifier.follow_balances().await.unwrap(), 0, "and only once");
        let made = app
            .subscriptions
            .store()
            .deliveries(&DeliveryFilter { merchant: Some("m-1".into()), ..DeliveryFilter::default() }, 10)
            .await
            .unwrap();
        assert_eq!(made.len(), 1);
        assert_eq!(made[0].subscription_id, created.subscription.id);
        let body: serde_json::Value = serde_json::from_str(&made[0].payload).unwrap();
        assert_eq!(body["type"], "balance.changed");
        assert_eq!(body["data"]["closingBalanceMinor"], "350");
        assert_eq!(body["data"]["date"], "2026-11-21");
        assert_eq!(body["sequence"], 1);

        // A crash between making the deliveries and moving the cursor: read again, nothing new.
        app.subscriptions.store().set_balance_cursor("m-1", "0", false).await.unwrap();
        // From the start the merchant's one day reads as it stands now: the same change, the same event.
        notifier.follow_balances().await.unwrap();
        let again = app
            .subscriptions
            .store()
            .deliveries(&DeliveryFilter { merchant: Some("m-1".into()), ..DeliveryFilter::default() }, 10)
            .await
            .unwrap();
        assert_eq!(again.len(), 1, "{again:?}");

        // Deleted, its pending delivery ends as a dead letter saying why, and nothing is claimed.
        let id = created.subscription.id.clone();
        app.client
            .delete_subscription(pb::DeleteSubscriptionRequest {
                merchant_id: "m-1".into(),
                subscription_id: id,
            })
            .await
            .unwrap();
        let after = app
            .subscriptions
            .store()
            .deliveries(&DeliveryFilter { merchant: Some("m-1".into()), ..DeliveryFilter::default() }, 10)
            .await
            .unwrap();
        assert_eq!(
            (after[0].state, after[0].last_error.as_str()),
            (fluxo_notifier::store::DeliveryState::Dead, "the subscription was deleted")
        );
        assert!(app.subscriptions.store().claim(10, chrono::Duration::seconds(60)).await.unwrap().is_empty());
    }

    async fn insert_close(db: &fluxo_db::Db, id: &str, merchant: &str, at: chrono::DateTime<chrono::Utc>) {
        db.conn()
            .execute_raw(fluxo_db::statement(
                db.backend(),
                "INSERT INTO ledger_period_closes (id, merchant_id, closed_through, note, closed_by, closed_at, \
                 entry_count, digest) VALUES (?, ?, ?, 'month end', 'tester', ?, 3, ?)",
                vec![
                    id.into(),
                    merchant.into(),
                    chrono::NaiveDate::from_ymd_opt(2026, 11, 30).unwrap().into(),
                    at.into(),
                    "a".repeat(64).into(),
                ],
            ))
            .await
            .unwrap();
    }

    /// period.closed: a close made after the merchant subscribed becomes one
    /// event per subscription, with the close as ListPeriodCloses shows it;
    /// one made before does not; a close is never notified twice.
    pub(super) async fn closes_made_after_a_subscription_become_events_once(backend: Backend) {
        let app = spawn(backend, Some(sealer()), 20).await;
        fluxo_ledger::LedgerStore::migrate(&app.db).await.unwrap();
        insert_close(
            &app.db,
            "01KB0000000000000000000001",
            "m-1",
            chrono::Utc::now() - chrono::Duration::hours(1),
        )
        .await;
        app.subscriptions
            .create(fluxo_notifier::subscriptions::CreateRequest {
                registration: fluxo_webhooks::subscription::Registration {
                    merchant_id: "m-1",
                    endpoint_url: ENDPOINT,
                    event_types: &["period.closed".to_owned()],
                    description: "",
                },
                request_id: "k-c",
            })
            .await
            .unwrap();
        let sender =
            fluxo_webhooks::Sender::new(DestinationPolicy::strict(), None, Default::default()).unwrap();
        let notifier = fluxo_notifier::Notifier::new(app.subscriptions.clone(), sender, Default::default())
            .with_ledger(fluxo_ledger::LedgerStore::new(app.db.clone()));
        assert_eq!(notifier.follow_closes().await.unwrap(), 0, "closed before it subscribed");
        let later = chrono::Utc::now() + chrono::Duration::seconds(1);
        insert_close(&app.db, "01KB0000000000000000000002", "m-1", later).await;
        insert_close(&app.db, "01KB0000000000000000000003", "m-2", later).await;
        assert_eq!(notifier.follow_closes().await.unwrap(), 1);
        assert_eq!(notifier.follow_closes().await.unwrap(), 0, "once");
        let made = app.subscriptions.store().deliveries(&DeliveryFilter::default(), 10).await.unwrap();
        assert_eq!(made.len(), 1);
        assert_eq!(made[0].event_id, "01KB0000000000000000000002", "the close's id is the event's");
        let body: serde_json::Value = serde_json::from_str(&made[0].payload).unwrap();
        assert_eq!(body["type"], "period.closed");
        assert_eq!(
            (body["data"]["closedThrough"].as_str(), body["data"]["entryCount"].as_str()),
            (Some("2026-11-30"), Some("3"))
        );
    }
}

fn stream_event(
    merchant: &str,
    event_type: fluxo_webhooks::subscription::EventType,
) -> fluxo_notifier::store::Event {
    fluxo_notifier::store::Event {
        id: ulid::Ulid::new().to_string(),
        merchant_id: merchant.into(),
        event_type,
        occurred_at: chrono::Utc::now(),
        data: serde_json::json!({ "merchant": merchant }),
        traceparent: None,
        tracestate: None,
    }
}

/// The fan-out and the attempt recorder work a batch at a time: each
/// (event, subscription) pair once however often it is read (again, or twice
/// in one batch), numbered per subscription in the order read; a claim
/// carries where to send and what signs; a batch of attempts ends each
/// subscription's failing streak as its last attempt says.
async fn a_batch_fans_out_once_numbered_in_order_and_records_streaks_in_order(backend: Backend) {
    use fluxo_notifier::store::{AttemptRecord, DeliveryState, Next};
    use fluxo_webhooks::subscription::EventType::{EntryRecorded, EntryReversed};
    let app = spawn(backend, Some(sealer()), 20).await;
    let (mut ids, mut shown) = (Vec::new(), std::collections::HashMap::new());
    for (merchant, key, types) in [
        ("m-1", "k-a", vec!["entry.recorded".to_owned()]),
        ("m-1", "k-b", vec!["entry.recorded".to_owned(), "entry.reversed".to_owned()]),
        ("m-2", "k-c", vec!["entry.recorded".to_owned()]),
    ] {
        let created = app
            .subscriptions
            .create(fluxo_notifier::subscriptions::CreateRequest {
                registration: fluxo_webhooks::subscription::Registration {
                    merchant_id: merchant,
                    endpoint_url: ENDPOINT,
                    event_types: &types,
                    description: "",
                },
                request_id: key,
            })
            .await
            .unwrap();
        ids.push(created.subscription.id.clone());
        shown.insert(created.subscription.id, created.secret.expect("shown once").expose_text());
    }
    let store = app.subscriptions.store();
    let (e1, e2, e3, e4) = (
        stream_event("m-1", EntryRecorded),
        stream_event("m-1", EntryReversed),
        stream_event("m-2", EntryRecorded),
        stream_event("m-1", EntryRecorded),
    );
    let first = store.fan_out(&[e1.clone(), e2.clone(), e3.clone()]).await.unwrap();
    assert_eq!((first.made, first.existing), (4, 0), "a: e1; b: e1, e2; c: e3");
    let second = store.fan_out(&[e1.clone(), e4.clone(), e4.clone()]).await.unwrap();
    assert_eq!((second.made, second.existing), (2, 4), "e1 again and e4 twice: e4 once each for a and b");

    let mut of_b = store
        .deliveries(&DeliveryFilter { subscription: Some(ids[1].clone()), ..DeliveryFilter::default() }, 10)
        .await
        .unwrap();
    of_b.sort_by_key(|d| d.sequence);
    let numbered: Vec<(i64, &str)> = of_b.iter().map(|d| (d.sequence, d.event_id.as_str())).collect();
    assert_eq!(numbered, vec![(1, e1.id.as_str()), (2, e2.id.as_str()), (3, e4.id.as_str())]);
    for d in &of_b {
        let body: serde_json::Value = serde_json::from_str(&d.payload).unwrap();
        assert_eq!(body["sequence"], d.sequence, "the body carries the row's number");
    }

    let claimed = store.claim(10, chrono::Duration::seconds(60)).await.unwrap();
    assert_eq!(claimed.len(), 6);
    assert!(store.claim(10, chrono::Duration::seconds(60)).await.unwrap().is_empty(), "held by the lease");
    for due in &claimed {
        assert_eq!(due.endpoint_url, ENDPOINT);
        let sealed = due.sealed.as_ref().expect("the claim carries the secrets");
        let opened =
            app.subscriptions.open_secrets(&due.subscription_id, sealed, chrono::Utc::now()).unwrap();
        assert_eq!(opened.current.expose_text(), shown[&due.subscription_id], "the secret shown at creation");
    }

    // a: failed then delivered (streak over); b: delivered then failed (failing
    // since that attempt); c: failed once.
    let at = fluxo_notifier::store::now();
    let failed = AttemptRecord {
        at,
        duration_ms: 3,
        status: Some(503),
        error: "the endpoint answered 503".into(),
        response: "busy".into(),
    };
    let delivered =
        AttemptRecord { status: Some(204), error: String::new(), response: String::new(), ..failed.clone() };
    let retry = Next::RetryAt(at + chrono::Duration::seconds(30));
    let of = |sub: &str| claimed.iter().filter(|d| d.subscription_id == sub).collect::<Vec<_>>();
    let (a, b, c) = (of(&ids[0]), of(&ids[1]), of(&ids[2]));
    assert_eq!((a.len(), b.len(), c.len()), (2, 3, 1));
    store
        .record_many(&[
            (a[0], &failed, &retry),
            (b[0], &delivered, &Next::Delivered),
            (a[1], &delivered, &Next::Delivered),
            (b[1], &delivered, &Next::Delivered),
            (b[2], &failed, &retry),
            (c[0], &failed, &Next::Dead),
        ])
        .await
        .unwrap();
    assert_eq!(store.failing_since(&ids[0]).await.unwrap(), None);
    assert_eq!(store.failing_since(&ids[1]).await.unwrap(), Some(at));
    assert_eq!(store.failing_since(&ids[2]).await.unwrap(), Some(at));
    let shown = store.delivery(&b[2].id).await.unwrap().unwrap();
    assert_eq!(
        (shown.0.state, shown.0.attempts, shown.0.last_status),
        (DeliveryState::Pending, 1, Some(503))
    );
    assert_eq!(shown.1.len(), 1, "its attempt is on record");
    let dead = store.delivery(&c[0].id).await.unwrap().unwrap();
    assert_eq!(dead.0.state, DeliveryState::Dead);
    let done = store.delivery(&a[1].id).await.unwrap().unwrap();
    assert_eq!((done.0.state, done.0.delivered_at.is_some()), (DeliveryState::Delivered, true));
}

/// Paused, a subscription's deliveries accrue held: no claim sees them (nor
/// wades through them), a replay while paused holds too; resumed, they are due
/// in order; deleted, held ones end as dead letters.
async fn a_paused_subscriptions_deliveries_are_held_until_it_is_resumed(backend: Backend) {
    use fluxo_notifier::store::DeliveryState;
    use fluxo_webhooks::subscription::EventType::EntryRecorded;
    let mut app = spawn(backend, Some(sealer()), 20).await;
    let sub = app.client.create_subscription(create("m-1", "k-1", &["entry.recorded"])).await.unwrap();
    let id = sub.into_inner().subscription.unwrap().id;
    let store = app.subscriptions.store().clone();
    let of_sub = || DeliveryFilter { subscription: Some(id.clone()), ..DeliveryFilter::default() };
    store.fan_out(&[stream_event("m-1", EntryRecorded)]).await.unwrap();
    let pause = pb::PauseSubscriptionRequest { merchant_id: "m-1".into(), subscription_id: id.clone() };
    app.client.pause_subscription(pause.clone()).await.unwrap();
    store.fan_out(&[stream_event("m-1", EntryRecorded), stream_event("m-1", EntryRecorded)]).await.unwrap();
    let states =
        |list: Vec<fluxo_notifier::store::Delivery>| list.iter().map(|d| d.state).collect::<Vec<_>>();
    assert_eq!(states(store.deliveries(&of_sub(), 10).await.unwrap()), vec![DeliveryState::Held; 3]);
    assert!(
        store.claim(10, chrono::Duration::seconds(60)).await.unwrap().is_empty(),
        "nothing due while paused"
    );

    app.client
        .resume_subscription(pb::ResumeSubscriptionRequest {
            merchant_id: "m-1".into(),
            subscription_id: id.clone(),
        })
        .await
        .unwrap();
    let claimed = store.claim(10, chrono::Duration::seconds(60)).await.unwrap();
    let mut numbers: Vec<i64> = claimed
        .iter()
        .map(|d| serde_json::from_str::<serde_json::Value>(&d.payload).unwrap()["sequence"].as_i64().unwrap())
        .collect();
    numbers.sort_unstable();
    assert_eq!(numbers, vec![1, 2, 3], "every held delivery is due once resumed");

    // Dead-lettered, then replayed while paused: held, not sent.
    let failed = fluxo_notifier::store::AttemptRecord {
        at: fluxo_notifier::store::now(),
        duration_ms: 1,
        status: Some(500),
        error: "the endpoint answered 500".into(),
        response: String::new(),
    };
    let next = fluxo_notifier::store::Next::Dead;
    let records: Vec<_> = claimed.iter().map(|d| (d, &failed, &next)).collect();
    store.record_many(&records).await.unwrap();
    app.client.pause_subscription(pause).await.unwrap();
    assert!(store.replay(&claimed[0].id).await.unwrap());
    let replayed = store.delivery(&claimed[0].id).await.unwrap().unwrap().0;
    assert_eq!(replayed.state, DeliveryState::Held);
    assert!(store.claim(10, chrono::Duration::seconds(60)).await.unwrap().is_empty());

    // Deleted: the held one is a dead letter saying why.
    app.client
        .delete_subscription(pb::DeleteSubscriptionRequest {
            merchant_id: "m-1".into(),
            subscription_id: id.clone(),
        })
        .await
        .unwrap();
    let gone = store.delivery(&claimed[0].id).await.unwrap().unwrap().0;
    assert_eq!((gone.state, gone.last_error.as_str()), (DeliveryState::Dead, "the subscription was deleted"));
}

/// A database whose schema predates held deliveries (the first four
/// migrations, as they shipped): upgraded, a paused subscription's pending
/// delivery is held, the others and every attempt row are kept, and pausing
/// works on the new schema.
async fn a_database_from_before_held_deliveries_is_upgraded_keeping_every_row(backend: Backend) {
    use fluxo_notifier::store::DeliveryState;
    use sea_orm_migration::MigratorTrait;
    let test_db = TestDb::new(backend).await;
    let db = test_db.connect().await;
    fluxo_notifier::Migrator::up(db.conn(), Some(4)).await.unwrap();
    let at = fluxo_notifier::store::now();
    for (id, state) in [("S-active", "ACTIVE"), ("S-paused", "PAUSED")] {
        db.conn()
            .execute_raw(fluxo_db::statement(
                db.backend(),
                "INSERT INTO webhook_subscriptions (id, merchant_id, endpoint_url, event_types, state, \
                 secret_sealed, secret_rotated_at, request_id, fingerprint, created_at, updated_at) \
                 VALUES (?, 'm-1', ?, 'entry.recorded', ?, ?, ?, ?, ?, ?, ?)",
                vec![
                    id.into(),
                    ENDPOINT.into(),
                    state.into(),
                    vec![0u8; 4].into(),
                    at.into(),
                    id.into(),
                    "f".repeat(64).into(),
                    at.into(),
                    at.into(),
                ],
            ))
            .await
            .unwrap();
    }
    for (id, sub, state) in
        [("D-1", "S-active", "PENDING"), ("D-2", "S-paused", "PENDING"), ("D-3", "S-paused", "DELIVERED")]
    {
        db.conn()
            .execute_raw(fluxo_db::statement(
                db.backend(),
                "INSERT INTO webhook_deliveries (id, subscription_id, merchant_id, event_id, event_type, sequence, \
                 payload, state, attempts, next_attempt_at, created_at) VALUES (?, ?, 'm-1', ?, 'entry.recorded', 1, '{}', ?, 1, ?, ?)",
                vec![id.into(), sub.into(), id.into(), state.into(), at.into(), at.into()],
            ))
            .await
            .unwrap();
        db.conn()
            .execute_raw(fluxo_db::statement(
                db.backend(),
                "INSERT INTO webhook_delivery_attempts (delivery_id, attempt, at, duration_ms, status, error, response) \
                 VALUES (?, 1, ?, 3, 503, 'the endpoint answered 503', 'busy')",
                vec![id.into(), at.into()],
            ))
            .await
            .unwrap();
    }

    SubscriptionStore::migrate(&db).await.expect("the upgrade");
    let store = SubscriptionStore::new(db.clone());
    let state_of = |id: &'static str| {
        let store = store.clone();
        async move {
            let (d, attempts) = store.delivery(id).await.unwrap().expect("kept");
            assert_eq!(attempts.len(), 1, "{id}'s attempt is kept");
            d.state
        }
    };
    assert_eq!(state_of("D-1").await, DeliveryState::Pending);
    assert_eq!(state_of("D-2").await, DeliveryState::Held, "pending of a paused subscription: held");
    assert_eq!(state_of("D-3").await, DeliveryState::Delivered);
    let claimed = store.claim(10, chrono::Duration::seconds(60)).await.unwrap();
    assert_eq!(claimed.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), vec!["D-1"]);
    // Resumed on the new schema: due.
    let resume = fluxo_notifier::store::Changes {
        state: Some(fluxo_webhooks::subscription::State::Active),
        ..Default::default()
    };
    store.update("m-1", "S-paused", &resume).await.unwrap().expect("updated");
    assert_eq!(state_of("D-2").await, DeliveryState::Pending);
}
