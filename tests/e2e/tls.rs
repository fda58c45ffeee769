//! TLS to Redis (`rediss://`) and to PostgreSQL (`sslmode=verify-full`), against the real
//! servers `scripts/test.sh` starts with a certificate for 127.0.0.1 signed by a CA made for
//! the run: the pipeline, the cache, the rate limiter and `queue init` over TLS, and servers
//! whose certificate does not chain to the configured CA refused with the reason in the error.

use std::time::{Duration, Instant};

use fluxo_testing::{Backend, TestDb};
use serde_json::json;

use crate::{
    pipeline::{Install, assert_exact, record_many},
    rest::{Client, token},
    support::{Fluxo, fluxo_command},
};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the suite with ./scripts/test.sh, which makes a test CA and starts Redis and PostgreSQL with TLS")
    })
}

/// `rediss://127.0.0.1:<tls port>` of the test Redis.
fn rediss_url() -> String {
    env("FLUXO_TEST_REDIS_TLS_URL")
}

/// `url` with `sslmode=verify-full` against `ca`.
fn verify_full(url: &str, ca: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}sslmode=verify-full&sslrootcert={ca}")
}

/// A client of the test Redis over TLS, trusting the test CA.
async fn tls_client() -> fred::prelude::Client {
    use fred::prelude::ClientLike;
    let client = fluxo_queue::client(&fluxo_queue::RedisConfig {
        url: rediss_url().into(),
        command_timeout: Duration::from_secs(5),
        tls_ca_file: Some(env("FLUXO_TEST_TLS_CA").into()),
    })
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), client.wait_for_connect()).await.unwrap().unwrap();
    client
}

/// Keys matching `pattern` in the test Redis (read over TLS).
async fn keys(client: &fred::prelude::Client, pattern: &str) -> Vec<String> {
    use fred::prelude::KeysInterface;
    let mut cursor = "0".to_owned();
    let mut found = Vec::new();
    loop {
        let (next, page): (String, Vec<String>) =
            client.scan_page(cursor, pattern, Some(1000), None).await.unwrap();
        found.extend(page);
        if next == "0" {
            return found;
        }
        cursor = next;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pipeline_cache_and_rate_limiter_run_over_rediss() {
    let ca = env("FLUXO_TEST_TLS_CA");
    let install = Install::new(rediss_url()).await;
    let tls = [("FLUXO_REDIS__TLS_CA_FILE", ca.as_str())];

    // The queue-init hook over TLS.
    let mut env = install.env();
    env.push(("FLUXO_REDIS__TLS_CA_FILE".into(), ca.clone()));
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let init = fluxo_command(install.dir.path(), &refs).args(["queue", "init"]).output().unwrap();
    assert!(init.status.success(), "queue init over TLS: {}", String::from_utf8_lossy(&init.stderr));
    let client = tls_client().await;
    let groups: Vec<std::collections::HashMap<String, fred::types::Value>> = {
        use fred::prelude::StreamsInterface;
        client.xinfo_groups(&install.stream).await.unwrap()
    };
    assert_eq!(groups.len(), 1, "queue init created the consumer group over TLS");

    // Everything in one process: the relay publishes, the consumer applies, balance reads
    // through the cache, the gateway's limiter counts in Redis, all over rediss://. The limiter
    // denies when it cannot reach Redis, so a REST answer proves it got through.
    let secret = "an-hs256-secret-for-the-tls-test-0123456789";
    let fluxo = install.start(
        "all",
        &[
            tls[0],
            ("FLUXO_RATE_LIMIT__ON_REDIS_ERROR", "deny"),
            ("FLUXO_AUTH__HS256_SECRET", secret),
            ("FLUXO_LOG__LEVEL", "info"),
        ],
    );
    let mut expected = record_many(&fluxo.addr, "tls", 60, 3, 3).await;
    let rest = Client::new(fluxo.rest.as_deref().expect("the gateway runs under --target all"));
    let t = token(&secrecy::SecretString::from(secret.to_owned()), &["m-rest"], 300, "fluxo-api");
    let entry = json!({"type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":"700"},
                       "bookingDate":"2026-11-03","description":"over TLS","requestId":"tls-rest-1"});
    let created = rest.post("/v1/merchants/m-rest/entries", Some(&t), &entry);
    assert_eq!(created.status, 200, "REST write with the limiter on Redis over TLS: {:?}", created.body);
    expected.insert(("m-rest".into(), "2026-11-03".into()), (700, 0, 1));

    assert_exact(&install, &fluxo.addr, &expected, Duration::from_secs(90)).await;
    let stream_len: u64 = {
        use fred::prelude::StreamsInterface;
        client.xlen(&install.stream).await.unwrap()
    };
    assert!(stream_len > 0, "the relay published to the stream over TLS");

    // A daily balance read goes through the cache, which lives in Redis.
    let balance = fluxo
        .call(
            "fluxo.balance.v1.BalanceService/GetDailyBalance",
            &json!({"merchantId":"m-rest","date":"2026-11-03","currencyCode":"BRL"}),
        )
        .unwrap();
    assert_eq!(balance["totalCreditsMinor"], "700", "{balance}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cached = keys(&client, &format!("{}:balance:*", install.stream)).await;
        if !cached.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "no cache entry written to Redis over TLS");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fluxo.stop();
}

#[test]
fn queue_init_refuses_a_redis_certificate_from_another_ca() {
    let dir = tempfile::tempdir().unwrap();
    let url = rediss_url();
    let other = env("FLUXO_TEST_TLS_OTHER_CA");
    let output = fluxo_command(
        dir.path(),
        &[
            ("FLUXO_REDIS__URL", url.as_str()),
            ("FLUXO_REDIS__TLS_CA_FILE", other.as_str()),
            ("FLUXO_CONSOLIDATOR__STREAM", "fluxo:test:tls-refused"),
        ],
    )
    .args(["queue", "init"])
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a server signed by another CA was accepted: {stderr}");
    // rustls names the problem: InvalidCertificate(UnknownIssuer).
    assert!(stderr.contains("cannot connect to Redis") && stderr.contains("UnknownIssuer"), "{stderr}");

    // Without a CA file the built-in public roots apply, which do not know the test CA either.
    let output = fluxo_command(dir.path(), &[("FLUXO_REDIS__URL", url.as_str())])
        .args(["queue", "init"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("UnknownIssuer"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_verify_full_serves_and_another_ca_is_refused_with_the_reason() {
    let ca = env("FLUXO_TEST_TLS_CA");
    let other = env("FLUXO_TEST_TLS_OTHER_CA");
    // The test server speaks TLS on its port (FLUXO_TEST_POSTGRES_TLS_URL says so); a fresh database on it.
    env("FLUXO_TEST_POSTGRES_TLS_URL");
    let db = TestDb::new(Backend::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let good = verify_full(&db.url, &ca);

    let migrate = fluxo_command(dir.path(), &[("FLUXO_DATABASE__URL", good.as_str())])
        .args(["migrate", "--wait-secs", "5"])
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "migrate over verify-full: {}",
        String::from_utf8_lossy(&migrate.stderr)
    );

    let fluxo = Fluxo::start_target(dir.path(), "ledger", &[("FLUXO_DATABASE__URL", good.as_str())]);
    wait_for_health(&fluxo, "SERVING", Duration::from_secs(20));
    let entry = fluxo
        .call(
            "fluxo.ledger.v1.LedgerService/RecordEntry",
            &json!({"merchantId":"m-tls","type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":"100"},
                    "bookingDate":"2026-11-21","description":"verify-full","requestId":"k-tls-1"}),
        )
        .unwrap();
    assert_eq!(entry["amount"]["minorUnits"], "100");
    fluxo.stop();

    // A server whose certificate another CA signed: the one-shot command fails, naming it ...
    let bad = verify_full(&db.url, &other);
    let migrate = fluxo_command(dir.path(), &[("FLUXO_DATABASE__URL", bad.as_str())])
        .args(["migrate", "--wait-secs", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&migrate.stderr);
    assert!(!migrate.status.success(), "migrate trusted a certificate from another CA: {stderr}");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");

    // ... and a server keeps running, NOT_SERVING, with the reason in its log.
    let fluxo = Fluxo::start_target(dir.path(), "ledger", &[("FLUXO_DATABASE__URL", bad.as_str())]);
    assert_eq!(fluxo.health(""), "NOT_SERVING");
    assert_eq!(fluxo.health("liveness"), "SERVING", "an untrusted database must not restart the pod");
    let output = fluxo.stop();
    let log = String::from_utf8_lossy(&output.stdout);
    assert!(
        log.lines().any(|l| l.to_lowercase().contains("certificate") && l.contains("NOT_SERVING")),
        "no log line gives the certificate problem:\n{log}"
    );
}

/// Polls gRPC health of the whole server until it reports `want`.
pub(crate) fn wait_for_health(fluxo: &Fluxo, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let status = fluxo.health("");
        if status == want {
            return;
        }
        assert!(Instant::now() < deadline, "health is {status}, not {want}, after {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_redis_ca_file_without_tls_or_that_does_not_exist_stops_fluxo_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let ca = env("FLUXO_TEST_TLS_CA");
    for (url, file, says) in [
        ("redis://127.0.0.1:6379", ca.as_str(), "redis.tls_ca_file is set but redis.url is not a rediss://"),
        (
            "rediss://127.0.0.1:6379",
            "/nonexistent/ca.pem",
            "redis.tls_ca_file /nonexistent/ca.pem is not a readable file",
        ),
    ] {
        let output =
            fluxo_command(dir.path(), &[("FLUXO_REDIS__URL", url), ("FLUXO_REDIS__TLS_CA_FILE", file)])
                .args(["serve"])
                .output()
                .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
}
