//! Webhooks end to end: a real `fluxo serve` (embedded default: the relay
//! hands events to the notifier in process) delivering to a real HTTPS
//! receiver run by the test, which checks every signature with the Standard
//! Webhooks reference library. Through a receiver outage (retried), past the
//! retry window (dead-lettered, then replayed by the CLI), across a secret
//! rotation, and across a SIGKILL of the notifier in the middle of an attempt
//! (claimed again once its lease ran out: nothing lost).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use fluxo_testing::receiver::{Receiver, env};
use serde_json::{Value, json};

use crate::{
    rest::{Client, dev_secret, token},
    support::{Fluxo, fluxo_command},
};

const MERCHANT: &str = "m-webhooks";

/// Fast retries, a short retry window and a short lease: the test's clock.
pub(crate) fn settings(ca: &str) -> Vec<(&'static str, String)> {
    vec![
        ("FLUXO_WEBHOOKS__ALLOW_NETS", r#"["127.0.0.0/8"]"#.to_owned()),
        ("FLUXO_WEBHOOKS__CA_FILE", ca.to_owned()),
        ("FLUXO_WEBHOOKS__RETRY_FIRST_MS", "200".to_owned()),
        ("FLUXO_WEBHOOKS__RETRY_CAP_MS", "400".to_owned()),
        ("FLUXO_WEBHOOKS__GIVE_UP_AFTER_SECS", "3".to_owned()),
        ("FLUXO_WEBHOOKS__CONNECT_TIMEOUT_MS", "1000".to_owned()),
        ("FLUXO_WEBHOOKS__RESPONSE_TIMEOUT_MS", "2000".to_owned()),
        ("FLUXO_WEBHOOKS__LEASE_MS", "3500".to_owned()),
        ("FLUXO_WEBHOOKS__POLL_MS", "100".to_owned()),
    ]
}

fn start(data: &Path, env: &[(&'static str, String)]) -> Fluxo {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Fluxo::start(data, &pairs)
}

fn entry(key: &str, minor: &str) -> Value {
    json!({"type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":minor},"bookingDate":"2026-11-21","description":"sale","requestId":key})
}

/// The next delivery whose body is about `entry_id`, skipping others; every
/// one seen on the way must verify too.
fn delivery_of(receiver: &Receiver, entry_id: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let seen = receiver
            .next_within(left)
            .unwrap_or_else(|| panic!("no delivery of {entry_id} within {within:?}"));
        let body: Value = serde_json::from_str(seen["body"].as_str().unwrap()).unwrap();
        if body["data"]["id"] == entry_id {
            return seen;
        }
    }
}

fn cli(data: &Path, env: &[(&'static str, String)], args: &[&str]) -> String {
    let mut command = fluxo_command(data, &[]);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.args(args).output().expect("run fluxo");
    assert!(out.status.success(), "fluxo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `check` every 100 ms until it holds or `within` passes.
fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn signed_retried_dead_lettered_replayed_and_never_lost() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let secret_file = data.join("receiver-secret");
    let script_file = data.join("receiver-script");
    std::fs::write(&secret_file, "").unwrap();
    std::fs::write(&script_file, "200").unwrap();
    let receiver =
        Receiver::start(&format!("@{}", secret_file.display()), &format!("@{}", script_file.display()));
    let env = settings(&env("FLUXO_TEST_TLS_CA"));
    let mut fluxo = start(data, &env);
    let rest = Client::new(fluxo.rest.as_deref().unwrap());
    let own = token(&dev_secret(data), &[MERCHANT], 600, "fluxo-api");
    let t = Some(own.as_str());

    // Subscribe the receiver (loopback, allowed by the install's setting).
    let created = rest.post(
        &format!("/v1/merchants/{MERCHANT}/webhooks"),
        t,
        &json!({"endpointUrl": receiver.url("localhost", "/fluxo?tenant=t-1"),
                "eventTypes": ["entry.recorded", "entry.reversed"], "requestId": "hook-1"}),
    );
    assert_eq!(created.status, 200, "{:?}", created.body);
    let first_secret = created.body["secret"].as_str().unwrap().to_owned();
    let subscription = created.body["subscription"]["id"].as_str().unwrap().to_owned();
    std::fs::write(&secret_file, &first_secret).unwrap();
    let book = |key: &str| {
        let booked = rest.post(&format!("/v1/merchants/{MERCHANT}/entries"), t, &entry(key, "100"));
        assert_eq!(booked.status, 200, "{:?}", booked.body);
        booked.body["id"].as_str().unwrap().to_owned()
    };

    // 1. A booked entry arrives signed, verified by the reference library, as the REST API shows it.
    let id = book("e-1");
    let got = delivery_of(&receiver, &id, Duration::from_secs(30));
    assert_eq!(got["verified"], true, "{got}");
    let body: Value = serde_json::from_str(got["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["type"], "entry.recorded");
    assert_eq!(body["sequence"], 1);
    assert_eq!(body["data"]["amount"]["minorUnits"], "100");
    assert_eq!(body["data"]["merchantId"], MERCHANT);

    // 2. An outage: every attempt answered 503 until it ends; then delivered, under the same webhook-id.
    std::fs::write(&script_file, "503").unwrap();
    let id = book("e-2");
    let failed = delivery_of(&receiver, &id, Duration::from_secs(30));
    assert_eq!((failed["answer"].as_str(), failed["verified"].as_bool()), (Some("503"), Some(true)));
    let retried = delivery_of(&receiver, &id, Duration::from_secs(30));
    assert_eq!(retried["id"], failed["id"], "a retry is the same message");
    std::fs::write(&script_file, "200").unwrap();
    let mut last = retried;
    while last["answer"] != "200" {
        last = delivery_of(&receiver, &id, Duration::from_secs(30));
        assert_eq!(last["id"], failed["id"]);
    }
    let reversal = rest.post(
        &format!("/v1/merchants/{MERCHANT}/entries/{id}:reverse"),
        t,
        &json!({"bookingDate": "2026-11-21"}),
    );
    assert_eq!(reversal.status, 200, "{:?}", reversal.body);
    let reversed_id = reversal.body["id"].as_str().unwrap().to_owned();
    let got = delivery_of(&receiver, &reversed_id, Duration::from_secs(30));
    let body: Value = serde_json::from_str(got["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        (body["type"].as_str(), body["data"]["reversesEntryId"].as_str()),
        (Some("entry.reversed"), Some(id.as_str()))
    );

    // 3. Past the retry window the delivery is dead-lettered; the CLI lists and replays it.
    std::fs::write(&script_file, "503").unwrap();
    let id = book("e-3");
    eventually(Duration::from_secs(30), "the delivery is dead-lettered", || {
        cli(data, &env, &["webhooks", "deliveries", "list", "--state", "dead"]).contains(&subscription)
    });
    let dead =
        cli(data, &env, &["webhooks", "deliveries", "list", "--state", "dead", "--merchant", MERCHANT]);
    let delivery_id = dead.lines().nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    let shown = cli(data, &env, &["webhooks", "deliveries", "show", &delivery_id]);
    assert!(shown.contains("answered 503") && shown.contains(&id), "{shown}");
    std::fs::write(&script_file, "200").unwrap();
    cli(data, &env, &["webhooks", "deliveries", "replay", "--all"]);
    let mut replayed = delivery_of(&receiver, &id, Duration::from_secs(30));
    while replayed["answer"] != "200" {
        replayed = delivery_of(&receiver, &id, Duration::from_secs(30));
    }
    assert_eq!(replayed["verified"], true);

    // 4. A rotation: the receiver switches to the new secret at once; both sign during the grace period.
    let rotated = rest.post(
        &format!("/v1/merchants/{MERCHANT}/webhooks/{subscription}:rotateSecret"),
        t,
        &json!({"gracePeriodSeconds": "3600"}),
    );
    assert_eq!(rotated.status, 200, "{:?}", rotated.body);
    let new_secret = rotated.body["secret"].as_str().unwrap().to_owned();
    std::fs::write(&secret_file, &new_secret).unwrap();
    let id = book("e-4");
    let got = delivery_of(&receiver, &id, Duration::from_secs(30));
    assert_eq!((got["verified"].as_bool(), got["signatures"].as_i64()), (Some(true), Some(2)), "{got}");
    std::fs::write(&secret_file, &first_secret).unwrap();
    let id = book("e-5");
    let got = delivery_of(&receiver, &id, Duration::from_secs(30));
    assert_eq!(got["verified"], true, "the old secret still verifies during the grace period: {got}");
    std::fs::write(&secret_file, &new_secret).unwrap();

    // 5. SIGKILL in the middle of an attempt: the receiver holds the request;
    //    the process dies; restarted, the delivery is claimed again and lands.
    std::fs::write(&script_file, "stall").unwrap();
    let id = book("e-6");
    let held = delivery_of(&receiver, &id, Duration::from_secs(30));
    assert_eq!(held["answer"], "stall");
    fluxo.signal("KILL");
    drop(fluxo);
    std::fs::write(&script_file, "200").unwrap();
    fluxo = start(data, &env);
    let mut got = delivery_of(&receiver, &id, Duration::from_secs(30));
    while got["answer"] != "200" {
        got = delivery_of(&receiver, &id, Duration::from_secs(30));
    }
    assert_eq!((got["id"].clone(), got["verified"].clone()), (held["id"].clone(), json!(true)));
    let seq =
        |v: &Value| serde_json::from_str::<Value>(v["body"].as_str().unwrap()).unwrap()["sequence"].as_i64();
    assert_eq!(seq(&got), Some(7), "numbered in the order read: e-1, e-2, its reversal, e-3, e-4, e-5, e-6");

    // Every delivery of this subscription ends delivered: nothing lost, nothing pending (the
    // receiver reports a delivery before it answers, the notifier records it after).
    eventually(Duration::from_secs(30), "all seven deliveries are recorded delivered", || {
        let all = cli(data, &env, &["webhooks", "deliveries", "list", "--merchant", MERCHANT]);
        all.lines().filter(|l| l.contains("DELIVERED")).count() == 7
    });

    // 6. balance.changed: a day's figures as the balance API gives them, once consolidated.
    // (The restarted process listens on new ports.)
    let rest = Client::new(fluxo.rest.as_deref().unwrap());
    let balance_secret_file = data.join("balance-secret");
    std::fs::write(&balance_secret_file, "").unwrap();
    let balances = Receiver::start(&format!("@{}", balance_secret_file.display()), "200");
    let created = rest.post(
        &format!("/v1/merchants/{MERCHANT}/webhooks"),
        t,
        &json!({"endpointUrl": balances.url("127.0.0.1", "/balances"), "eventTypes": ["balance.changed"], "requestId": "hook-2"}),
    );
    assert_eq!(created.status, 200, "{:?}", created.body);
    std::fs::write(&balance_secret_file, created.body["secret"].as_str().unwrap()).unwrap();
    let booked = rest.post(&format!("/v1/merchants/{MERCHANT}/entries"), t, &entry("e-7", "100"));
    assert_eq!(booked.status, 200, "{:?}", booked.body);
    // Six credits of 100 and one reversal before, all on 2026-11-21: 600 now.
    let deadline = Instant::now() + Duration::from_secs(30);
    let day = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let got = balances.next_within(left).expect("a balance.changed delivery");
        assert_eq!(got["verified"], true, "{got}");
        let body: Value = serde_json::from_str(got["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["type"], "balance.changed");
        if body["data"]["closingBalanceMinor"] == "600" {
            break body;
        }
    };
    assert_eq!(
        (day["data"]["date"].as_str(), day["data"]["currencyCode"].as_str()),
        (Some("2026-11-21"), Some("BRL"))
    );
    assert_eq!(day["data"]["entryCount"], "8", "{day}");

    // 7. period.closed: the same subscription asks for closes too; the books close through the day.
    let balance_sub = created.body["subscription"]["id"].as_str().unwrap().to_owned();
    let patch = json!({"eventTypes": ["balance.changed", "period.closed"]}).to_string();
    let patched = rest.call(
        "PATCH",
        &format!("/v1/merchants/{MERCHANT}/webhooks/{balance_sub}"),
        t,
        Some(("application/json", &patch)),
        &[],
    );
    assert_eq!(patched.status, 200, "{:?}", patched.body);
    let admin = fluxo.token.clone().unwrap();
    let closed = rest.post(
        &format!("/v1/merchants/{MERCHANT}/periods:close"),
        Some(&admin),
        &json!({"closedThrough": "2026-11-21", "note": "November"}),
    );
    assert_eq!(closed.status, 200, "{:?}", closed.body);
    let deadline = Instant::now() + Duration::from_secs(30);
    let close = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let got = balances.next_within(left).expect("a period.closed delivery");
        assert_eq!(got["verified"], true, "{got}");
        let body: Value = serde_json::from_str(got["body"].as_str().unwrap()).unwrap();
        if body["type"] == "period.closed" {
            break body;
        }
    };
    assert_eq!(close["data"]["id"], closed.body["id"]);
    assert_eq!(
        (close["data"]["closedThrough"].as_str(), close["data"]["entryCount"].as_str()),
        (Some("2026-11-21"), Some("8"))
    );

    let logs = String::from_utf8_lossy(&fluxo.stop().stderr).into_owned();
    for secret in [&first_secret, &new_secret] {
        assert!(!logs.contains(secret.trim_start_matches("whsec_")), "a signing secret reached the log");
    }
}

/// The notifier as its own process on PostgreSQL and Redis, with its own
/// consumer group: events booked before it first runs are not trimmed away by
/// the consolidators (who are done with them), and a notifier SIGKILLed in
/// the middle of an attempt loses nothing once another starts.
pub(crate) async fn its_own_target_on_redis_loses_nothing(install: &crate::pipeline::Install) {
    use fluxo_proto::webhooks_v1::{self as wpb, webhook_service_client::WebhookServiceClient};

    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    let script_file = dir.path().join("script");
    std::fs::write(&secret_file, "").unwrap();
    std::fs::write(&script_file, "200").unwrap();
    let receiver =
        Receiver::start(&format!("@{}", secret_file.display()), &format!("@{}", script_file.display()));
    let mut owned = settings(&env("FLUXO_TEST_TLS_CA"));
    owned.push(("FLUXO_WEBHOOKS__SECRET_KEY", "Zmx1eG8tZTJlLXdlYmhvb2stc2VhbGluZy1rZXktMzI=".to_owned()));
    // Many deliveries at once to one small receiver: no dead letter for a slow accept.
    owned.retain(|(k, _)| *k != "FLUXO_WEBHOOKS__GIVE_UP_AFTER_SECS");
    owned.push(("FLUXO_WEBHOOKS__GIVE_UP_AFTER_SECS", "120".to_owned()));
    let extra: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let init = {
        let mut command = fluxo_command(install.dir.path(), &[]);
        for (k, v) in install.env().iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(extra.iter().copied())
        {
            command.env(k, v);
        }
        command.args(["queue", "init", "--notifiers"]).output().unwrap()
    };
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));

    let ledger = install.start("ledger", &extra);
    let consolidator = install.start("consolidator", &[]);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", ledger.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut hooks = WebhookServiceClient::new(channel);
    let created = hooks
        .create_subscription(wpb::CreateSubscriptionRequest {
            merchant_id: "m-0".into(),
            endpoint_url: receiver.url("localhost", "/fluxo"),
            event_types: vec!["entry.recorded".into()],
            description: String::new(),
            request_id: "hook-0".into(),
        })
        .await
        .expect("a subscription")
        .into_inner();
    let secret = created.secret;
    std::fs::write(&secret_file, &secret).unwrap();

    // 300 entries (three stream nodes: an approximate trim can drop whole ones) booked and
    // consolidated before any notifier runs.
    let expected = crate::pipeline::record_many(&ledger.addr, "hooked", 300, 1, 4).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while crate::pipeline::pending(&install.redis_url, &install.stream).await > 0 {
        assert!(Instant::now() < deadline, "the consolidators did not finish within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Several of their trims (every second here) pass; none may drop what the notifiers have not read.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    drop(expected);

    let notifier = install.start("notifier", &extra);
    let mut ids = std::collections::HashSet::new();
    while ids.len() < 300 {
        let got = receiver.next_within(Duration::from_secs(60)).unwrap_or_else(|| {
            let left =
                install.run(&["webhooks", "deliveries", "list", "--merchant", "m-0", "--state", "dead"]);
            let pending =
                install.run(&["webhooks", "deliveries", "list", "--merchant", "m-0", "--state", "pending"]);
            panic!(
                "every booked entry is delivered: {} of 300 arrived; dead: {}; pending: {}",
                ids.len(),
                String::from_utf8_lossy(&left.stdout),
                String::from_utf8_lossy(&pending.stdout)
            )
        });
        assert_eq!(got["verified"], true, "{got}");
        ids.insert(got["id"].as_str().unwrap().to_owned());
    }

    // Recorded delivered, every one (the receiver reports a delivery before it answers; the
    // notifier records it after): else a kill now sends it again, as at-least-once allows.
    let delivered = || {
        let listed = install.run(&[
            "webhooks",
            "deliveries",
            "list",
            "--merchant",
            "m-0",
            "--state",
            "delivered",
            "--count",
            "500",
        ]);
        String::from_utf8_lossy(&listed.stdout).lines().filter(|l| l.contains("DELIVERED")).count()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered() < 300 {
        assert!(Instant::now() < deadline, "300 deliveries recorded delivered within 30 s: {}", delivered());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Killed in the middle of an attempt; the next notifier delivers it.
    std::fs::write(&script_file, "stall").unwrap();
    crate::pipeline::record_many(&ledger.addr, "stalled", 1, 1, 1).await;
    let held = receiver.next_within(Duration::from_secs(30)).expect("an attempt in flight");
    crate::pipeline::kill(&notifier);
    drop(notifier);
    std::fs::write(&script_file, "200").unwrap();
    let next = install.start("notifier", &extra);
    let mut got = receiver.next_within(Duration::from_secs(30)).expect("claimed again");
    while got["answer"] != "200" {
        got = receiver.next_within(Duration::from_secs(30)).expect("claimed again");
    }
    assert_eq!((got["id"].clone(), got["verified"].clone()), (held["id"].clone(), json!(true)));

    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered() < 301 {
        assert!(Instant::now() < deadline, "301 deliveries recorded delivered within 30 s: {}", delivered());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(delivered(), 301, "one delivery per entry and subscription");
    assert!(next.stop().status.success());
    assert!(consolidator.stop().status.success());
    ledger.stop();
}
