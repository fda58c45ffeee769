//! Delivery attempts against a real HTTPS receiver the test starts: a Python
//! server with the suite's certificate that checks every signature with the
//! Standard Webhooks reference library (scripts/test.sh installs it and makes
//! the certificates).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fluxo_testing::receiver::{Receiver, env};
use fluxo_webhooks::{Attempt, DestinationPolicy, Failure, Limits, Outcome, Secret, Sender};
use url::Url;

fn url(receiver: &Receiver, host: &str) -> Url {
    Url::parse(&receiver.url(host, "/hooks/fluxo?tenant=t-1")).unwrap()
}

/// The test's receiver is on loopback: allowed by name, as a test setting would.
fn sender(limits: Limits) -> Sender {
    let policy = DestinationPolicy::strict().allow_nets(["127.0.0.0/8".parse().unwrap()]);
    Sender::new(policy, Some(env("FLUXO_TEST_TLS_CA").as_ref()), limits).unwrap()
}

fn now() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

const BODY: &str = r#"{"type":"entry.recorded","data":{"id":"01KBNZ7Q3X5V0000000000000A"}}"#;

async fn attempt(sender: &Sender, url: &Url, secrets: &[&Secret]) -> Outcome {
    attempt_id(sender, url, secrets, "evt_1").await
}

async fn attempt_id(sender: &Sender, url: &Url, secrets: &[&Secret], event_id: &str) -> Outcome {
    let body = Bytes::from_static(BODY.as_bytes());
    sender.send(Attempt { url, event_id, body: &body, secrets, timestamp: now() }).await
}

/// Proves nothing reached `receiver` before: a delivery allowed now is the next it reports.
async fn nothing_arrived_before(receiver: &Receiver, secret: &Secret) {
    let outcome =
        attempt_id(&sender(Limits::default()), &url(receiver, "localhost"), &[secret], "evt_probe").await;
    assert!(matches!(outcome, Outcome::Delivered { .. }), "{outcome:?}");
    assert_eq!(receiver.next()["id"], "evt_probe", "something reached the receiver before");
}

#[tokio::test]
async fn a_signed_delivery_is_verified_by_the_reference_library_over_https() {
    let secret = Secret::generate().unwrap();
    let receiver = Receiver::start(&secret.expose_text(), "200");
    let sender = sender(Limits::default());
    // By name: the certificate is checked for `localhost`.
    let outcome = attempt(&sender, &url(&receiver, "localhost"), &[&secret]).await;
    assert_eq!(outcome, Outcome::Delivered { status: 200, excerpt: "thanks".into() });
    let seen = receiver.next();
    assert_eq!(seen["verified"], true, "{seen}");
    assert_eq!(seen["id"], "evt_1");
    assert_eq!(seen["body"], BODY);

    // During a rotation both secrets sign: a receiver still on the old one verifies.
    let new = Secret::generate().unwrap();
    let outcome = attempt(&sender, &url(&receiver, "127.0.0.1"), &[&new, &secret]).await;
    assert!(matches!(outcome, Outcome::Delivered { .. }), "{outcome:?}");
    assert_eq!(receiver.next()["verified"], true);
    // Signed by a stranger only: delivered (the receiver answers 200) but not verified.
    let stranger = Secret::generate().unwrap();
    attempt(&sender, &url(&receiver, "127.0.0.1"), &[&stranger]).await;
    assert_eq!(receiver.next()["verified"], false);
}

#[tokio::test]
async fn failures_say_whether_to_retry_and_keep_only_an_excerpt() {
    let secret = Secret::generate().unwrap();
    let receiver = Receiver::start(&secret.expose_text(), "503,410,big");
    let sender = sender(Limits { excerpt: 100, ..Limits::default() });
    let url = url(&receiver, "localhost");
    let outcome = attempt(&sender, &url, &[&secret]).await;
    assert_eq!(
        outcome,
        Outcome::Failed { failure: Failure::Status { status: 503, excerpt: "thanks".into() }, retry: true }
    );
    // 410 Gone: the endpoint wants no more.
    let outcome = attempt(&sender, &url, &[&secret]).await;
    assert!(matches!(
        outcome,
        Outcome::Failed { retry: false, failure: Failure::Status { status: 410, .. } }
    ));
    // A 64 KiB answer: 100 bytes kept.
    let Outcome::Delivered { excerpt, .. } = attempt(&sender, &url, &[&secret]).await else {
        panic!("delivered")
    };
    assert_eq!(excerpt.len(), 100);
}

/// One connection carries attempt after attempt to the same endpoint; an
/// answer left unread closes it, and so does the receiver closing it while
/// it was kept: the next attempt is still delivered, on a new one.
#[tokio::test]
async fn a_connection_is_kept_for_the_next_attempt_until_it_cannot_be() {
    let secret = Secret::generate().unwrap();
    let receiver = Receiver::start_closing_idle(
        &secret.expose_text(),
        "200,200,big,200,200,200",
        Duration::from_secs(3),
    );
    let sender = sender(Limits::default());
    let url = url(&receiver, "localhost");
    let mut conns = Vec::new();
    for _ in 0..4 {
        let outcome = attempt(&sender, &url, &[&secret]).await;
        assert!(matches!(outcome, Outcome::Delivered { status: 200, .. }), "{outcome:?}");
        let seen = receiver.next();
        assert_eq!(seen["verified"], true, "{seen}");
        conns.push(seen["conn"].clone());
    }
    assert_eq!(conns[0], conns[1], "the second attempt came on the first's connection");
    assert_eq!(conns[1], conns[2], "and so did the third (whose 64 KiB answer was not read)");
    assert_ne!(conns[2], conns[3], "an answer left unread closes its connection");
    // Kept after the fourth, then closed by the receiver (idle 3 s, under the 4 s it is kept): the next one still arrives.
    assert_eq!(receiver.next()["closed"], conns[3], "the receiver closed the idle connection");
    let outcome = attempt(&sender, &url, &[&secret]).await;
    assert!(matches!(outcome, Outcome::Delivered { status: 200, .. }), "{outcome:?}");
    let seen = receiver.next();
    assert_eq!(seen["verified"], true, "{seen}");
    assert_ne!(seen["conn"], conns[3]);
    // Another name for the same address is another connection (its certificate is checked for that name).
    attempt(&sender, &Url::parse(&receiver.url("127.0.0.1", "/hooks")).unwrap(), &[&secret]).await;
    assert_ne!(receiver.next()["conn"], seen["conn"]);
}

#[tokio::test]
async fn a_receiver_that_does_not_answer_times_out_and_an_untrusted_certificate_is_refused() {
    let secret = Secret::generate().unwrap();
    let receiver = Receiver::start(&secret.expose_text(), "stall,200");
    let limits = Limits { response: Duration::from_millis(500), ..Limits::default() };
    let outcome = attempt(&sender(limits), &url(&receiver, "localhost"), &[&secret]).await;
    assert_eq!(
        outcome,
        Outcome::Failed { failure: Failure::Timeout(Duration::from_millis(500)), retry: true }
    );
    receiver.next();

    // Trusting another CA: the TLS handshake fails and nothing is sent.
    let policy = DestinationPolicy::strict().allow_nets(["127.0.0.0/8".parse().unwrap()]);
    let strict =
        Sender::new(policy, Some(env("FLUXO_TEST_TLS_OTHER_CA").as_ref()), Limits::default()).unwrap();
    let outcome = attempt(&strict, &url(&receiver, "localhost"), &[&secret]).await;
    assert!(
        matches!(&outcome, Outcome::Failed { failure: Failure::Connect(why), retry: true } if why.contains("TLS")),
        "{outcome:?}"
    );
    nothing_arrived_before(&receiver, &secret).await;
}

#[tokio::test]
async fn an_inward_destination_is_refused_before_anything_is_sent() {
    let secret = Secret::generate().unwrap();
    let receiver = Receiver::start(&secret.expose_text(), "200");
    // The default policy: loopback is inward. By address and by a name that resolves to it.
    let sender =
        Sender::new(DestinationPolicy::strict(), Some(env("FLUXO_TEST_TLS_CA").as_ref()), Limits::default())
            .unwrap();
    for host in ["127.0.0.1", "localhost"] {
        let outcome = attempt(&sender, &url(&receiver, host), &[&secret]).await;
        assert!(
            matches!(&outcome, Outcome::Failed { failure: Failure::Refused(_), retry: true }),
            "{host}: {outcome:?}"
        );
        // The refusal names the address, never the URL's query (a receiver's token may be there).
        let text = match outcome {
            Outcome::Failed { failure, .. } => failure.to_string(),
            Outcome::Delivered { .. } => unreachable!(),
        };
        assert!(!text.contains("tenant"), "{text}");
    }
    nothing_arrived_before(&receiver, &secret).await;
}
