//! Black-box tests of the built `fluxo` binary: started as a newcomer starts
//! it, called with grpcurl over server reflection only, stopped with SIGTERM.

mod books;
mod export;
mod hardening;
mod notifier;
mod outage;
mod pipeline;
mod rest;
mod subscriptions;
mod support;
mod telemetry;
mod tls;
mod watch;

use std::time::Duration;

use fluxo_proto::{balance_v1 as bpb, ledger_v1 as lpb};
use fluxo_testing::{Backend, TestDb};
use serde_json::json;
use support::{Fluxo, fluxo_command, grpcurl};

const RECORD: &str = "fluxo.ledger.v1.LedgerService/RecordEntry";
const LEDGER: &str = "fluxo.ledger.v1.LedgerService";

#[test]
fn grpcurl_records_reads_lists_and_reverses_and_entries_survive_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(data.path(), &[]);

    let services = grpcurl(&fluxo.addr, &["list"], None).unwrap();
    assert!(services.contains(LEDGER), "{services}");
    assert!(services.contains("grpc.health.v1.Health"), "{services}");

    // Exactly the JSON external callers send.
    let request = json!({"merchantId":"m-1","type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":"1050"},
                         "bookingDate":"2026-11-21","description":"sale 1","requestId":"k-1"});
    let entry = fluxo.call(RECORD, &request).unwrap();
    let id = entry["id"].as_str().unwrap().to_owned();
    assert_eq!(entry["amount"], json!({"currencyCode":"BRL","minorUnits":"1050"}));
    assert_eq!(entry["type"], "CREDIT");
    assert_eq!(entry["bookingDate"], "2026-11-21");
    assert!(entry["createdAt"].as_str().unwrap().ends_with('Z'));

    let read = fluxo
        .call("fluxo.ledger.v1.LedgerService/GetEntry", &json!({"merchantId":"m-1","entryId":id}))
        .unwrap();
    assert_eq!(read, entry);

    let reversal = fluxo
        .call(
            "fluxo.ledger.v1.LedgerService/ReverseEntry",
            &json!({"merchantId":"m-1","entryId":id,"requestId":"r-1"}),
        )
        .unwrap();
    assert_eq!(reversal["type"], "DEBIT");
    assert_eq!(reversal["reversesEntryId"], id.as_str());

    let listed =
        fluxo.call("fluxo.ledger.v1.LedgerService/ListEntries", &json!({"merchantId":"m-1"})).unwrap();
    assert_eq!(listed["entries"].as_array().unwrap().len(), 2);
    assert_eq!(listed["entries"][0]["reversedByEntryId"], reversal["id"]);

    let invalid =
        fluxo.call(RECORD, &json!({"merchantId":"m-1","type":"CREDIT","requestId":"k-9"})).unwrap_err();
    assert!(invalid.contains("InvalidArgument") && invalid.contains("amount"), "{invalid}");

    let output = fluxo.stop();
    assert!(output.status.success(), "exit status {:?}", output.status);
    // stdout carries nothing but JSON log lines.
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }

    // Restart on the same data directory: everything is still there, and the
    // same request with the same key replays the original entry.
    let fluxo = Fluxo::start(data.path(), &[]);
    let listed =
        fluxo.call("fluxo.ledger.v1.LedgerService/ListEntries", &json!({"merchantId":"m-1"})).unwrap();
    assert_eq!(listed["entries"].as_array().unwrap().len(), 2);
    let replayed = fluxo.call(RECORD, &request).unwrap();
    assert_eq!(replayed["id"], id.as_str());
    assert_eq!(replayed["createdAt"], read["createdAt"]);
    // The replay shows the entry as it stands now: reversed.
    assert_eq!(replayed["reversedByEntryId"], reversal["id"]);
    fluxo.stop();
}

#[test]
fn sigterm_reports_not_serving_then_drains_and_exits() {
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(data.path(), &[("FLUXO_GRPC__SHUTDOWN_DELAY_MS", "1500")]);
    assert_eq!(fluxo.health(""), "SERVING");
    fluxo.signal("TERM");
    let mut status = String::new();
    for _ in 0..40 {
        status = fluxo.health("");
        if status == "NOT_SERVING" {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(status, "NOT_SERVING");
    assert_eq!(fluxo.health(LEDGER), "NOT_SERVING");
    // Draining is not dying: the liveness service stays SERVING, so nothing restarts the pod.
    assert_eq!(fluxo.health("liveness"), "SERVING");
    let output = fluxo.wait(Duration::from_secs(10));
    assert!(output.status.success(), "exit status {:?}", output.status);
}

#[test]
fn on_postgres_it_is_not_serving_until_fluxo_migrate_ran() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new(Backend::Postgres));
    let data = tempfile::tempdir().unwrap();
    // On PostgreSQL nothing is generated: the gateway needs keys configured.
    let env = [
        ("FLUXO_DATABASE__URL", db.url.as_str()),
        ("FLUXO_AUTH__HS256_SECRET", "an-hs256-secret-for-this-test-only"),
    ];
    let fluxo = Fluxo::start(data.path(), &env);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fluxo.health(""), "NOT_SERVING", "no schema yet");

    let migrate = fluxo_command(data.path(), &env).arg("migrate").output().unwrap();
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));
    let mut status = String::new();
    for _ in 0..40 {
        status = fluxo.health("");
        if status == "SERVING" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status, "SERVING");
    let entry = fluxo
        .call(RECORD, &json!({"merchantId":"m-1","type":"DEBIT","amount":{"currencyCode":"JPY","minorUnits":"500"},"requestId":"k-1"}))
        .unwrap();
    assert_eq!(entry["amount"]["currencyCode"], "JPY");
    // Migrating again is a no-op.
    let again = fluxo_command(data.path(), &env).arg("migrate").output().unwrap();
    assert!(again.status.success());
    fluxo.stop();
}

#[test]
fn bad_configuration_exits_with_a_message_naming_the_setting() {
    let data = tempfile::tempdir().unwrap();
    let cases = [
        ("FLUXO_GRPC__MAX_CONCURRENT_REQUESTS", "lots", "max_concurrent_requests"),
        ("FLUXO_LEDGER__TIME_ZONE", "Mars/Olympus_Mons", "ledger.time_zone"),
        ("FLUXO_DATABSE__URL", "postgres://x", "databse"),
        ("FLUXO_GRPC__LISTEN", "not-an-address", "listen"),
        ("FLUXO_DATABASE__URL", "mysql://root:hunter2@db/x", "database.url"),
        ("FLUXO_LEDGER__WRITERS", "0", "ledger.writers"),
        ("FLUXO_LEDGER__WRITERS", "64", "ledger.writers"),
        ("FLUXO_LEDGER__MAX_BATCH", "5000", "ledger.max_batch"),
        ("FLUXO_BALANCE__CACHE_PREFIX", "", "balance.cache_prefix"),
    ];
    for (key, value, named) in cases {
        let output = fluxo_command(data.path(), &[(key, value)]).arg("serve").output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{key}: {stderr}");
        assert!(stderr.contains(named), "{key}: {stderr}");
        assert!(!stderr.contains("hunter2"), "a password was echoed: {stderr}");
    }
    let missing = fluxo_command(data.path(), &[])
        .args(["--config", "/nonexistent/fluxo.toml", "serve"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/fluxo.toml"));
}

#[test]
fn a_config_file_is_read_and_the_environment_overrides_it() {
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("fluxo.toml");
    std::fs::write(&file, "[ledger]\ntime_zone = \"Nowhere/City\"\n").unwrap();
    let from_file = fluxo_command(data.path(), &[]).arg("--config").arg(&file).arg("serve").output().unwrap();
    assert_eq!(from_file.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&from_file.stderr).contains("Nowhere/City"));
    let overridden = fluxo_command(data.path(), &[("FLUXO_LEDGER__TIME_ZONE", "America/Sao_Paulo")])
        .arg("--config")
        .arg(&file)
        .arg("migrate")
        .output()
        .unwrap();
    assert!(overridden.status.success(), "{}", String::from_utf8_lossy(&overridden.stderr));
}

#[test]
fn help_names_the_commands_and_the_environment() {
    let data = tempfile::tempdir().unwrap();
    let help = fluxo_command(data.path(), &[]).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("serve") && help.contains("migrate") && help.contains("FLUXO_"), "{help}");
}

const THREE_MINUTES: Duration = Duration::from_secs(180);

#[test]
fn embedded_mode_shows_a_new_entry_in_the_balance_within_a_second() {
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(data.path(), &[]);
    let today = chrono::Utc::now().date_naive().format("%Y-%m-%d").to_string();
    let started = std::time::Instant::now();
    fluxo
        .call(RECORD, &json!({"merchantId":"m-1","type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":"1050"},"requestId":"k-1"}))
        .unwrap();
    let mut closing = String::new();
    while started.elapsed() < Duration::from_secs(1) {
        let balance = fluxo
            .call(
                "fluxo.balance.v1.BalanceService/GetDailyBalance",
                &json!({"merchantId":"m-1","date":today}),
            )
            .unwrap();
        closing = balance["closingBalanceMinor"].as_str().unwrap_or("0").to_owned();
        if closing == "1050" {
            break;
        }
    }
    assert_eq!(closing, "1050", "balance not visible within one second");
    fluxo.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_notifier_target_has_its_own_group_and_survives_a_kill() {
    let install =
        pipeline::Install::new(std::env::var("FLUXO_TEST_REDIS_URL").expect("FLUXO_TEST_REDIS_URL")).await;
    notifier::its_own_target_on_redis_loses_nothing(&install).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_entries_with_three_consolidators_are_exact() {
    let install =
        pipeline::Install::new(std::env::var("FLUXO_TEST_REDIS_URL").expect("FLUXO_TEST_REDIS_URL")).await;
    let ledger = install.start("ledger", &[]);
    let balance = install.start("balance", &[]);
    let consolidators: Vec<_> = (0..3).map(|_| install.start("consolidator", &[])).collect();
    let expected = pipeline::record_many(&ledger.addr, "bulk", 20_000, 50, 32).await;
    pipeline::assert_exact(&install, &balance.addr, &expected, THREE_MINUTES).await;
    assert_eq!(pipeline::pending(&install.redis_url, &install.stream).await, 0);
    for c in consolidators {
        assert!(c.stop().status.success());
    }
    ledger.stop();
    balance.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consolidators_killed_at_random_lose_and_double_count_nothing() {
    let install =
        pipeline::Install::new(std::env::var("FLUXO_TEST_REDIS_URL").expect("FLUXO_TEST_REDIS_URL")).await;
    let ledger = install.start("ledger", &[]);
    let balance = install.start("balance", &[]);
    let mut consolidators: Vec<_> = (0..3).map(|_| install.start("consolidator", &[])).collect();
    let writer = {
        let addr = ledger.addr.clone();
        tokio::spawn(async move { pipeline::record_many(&addr, "chaos", 12_000, 50, 16).await })
    };
    let mut kills = 0;
    let mut seed: usize = 7;
    while !writer.is_finished() || kills < 6 {
        tokio::time::sleep(Duration::from_millis(300 + (seed % 5) as u64 * 100)).await;
        seed = seed.wrapping_mul(31).wrapping_add(17);
        let victim = seed % consolidators.len();
        pipeline::kill(&consolidators[victim]);
        kills += 1;
        consolidators[victim] = install.start("consolidator", &[]);
    }
    let expected = writer.await.unwrap();
    assert!(kills >= 5);
    pipeline::assert_exact(&install, &balance.addr, &expected, THREE_MINUTES).await;
    // Whatever the killed consumers held was claimed and acknowledged.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pipeline::pending(&install.redis_url, &install.stream).await > 0 {
        assert!(std::time::Instant::now() < deadline, "messages left pending");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for c in consolidators {
        c.stop();
    }
    ledger.stop();
    balance.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_never_wait_on_consolidation_and_the_backlog_drains() {
    let install =
        pipeline::Install::new(std::env::var("FLUXO_TEST_REDIS_URL").expect("FLUXO_TEST_REDIS_URL")).await;
    let ledger = install.start("ledger", &[]);
    let balance = install.start("balance", &[]);
    // No consolidator at all during the write phase: every write must still succeed.
    let expected = pipeline::record_many(&ledger.addr, "backlog", 5_000, 20, 16).await;
    let consolidators: Vec<_> = (0..2).map(|_| install.start("consolidator", &[])).collect();
    pipeline::assert_exact(&install, &balance.addr, &expected, THREE_MINUTES).await;
    // Rebuilding from the ledger while everything serves changes nothing that was right.
    let one = install.run(&[
        "balances",
        "rebuild",
        "--merchant",
        "m-1",
        "--from",
        "2026-11-02",
        "--to",
        "2026-11-04",
    ]);
    assert!(one.status.success(), "{}", String::from_utf8_lossy(&one.stderr));
    let all = install.run(&["balances", "rebuild"]);
    assert!(all.status.success(), "{}", String::from_utf8_lossy(&all.stderr));
    let booked: i64 = expected.values().map(|v| v.2).sum();
    let report = String::from_utf8_lossy(&all.stdout);
    assert!(report.contains(&format!("from {booked} ledger entries")), "{report}");
    pipeline::assert_exact(&install, &balance.addr, &expected, THREE_MINUTES).await;
    for c in consolidators {
        c.stop();
    }
    ledger.stop();
    balance.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_then_back_then_wiped_loses_nothing() {
    let mut redis = pipeline::OwnRedis::start();
    let install = pipeline::Install::new(redis.url()).await;
    let ledger = install.start("ledger", &[]);
    let balance = install.start("balance", &[]);
    let consolidator = install.start("consolidator", &[]);
    let mut expected = pipeline::record_many(&ledger.addr, "before", 1_000, 10, 8).await;

    // Redis stops mid-run: writes keep succeeding.
    redis.stop();
    let during = pipeline::record_many(&ledger.addr, "during", 1_000, 10, 8).await;
    redis.restart(true);
    for (k, v) in during {
        let e = expected.entry(k).or_insert((0, 0, 0));
        e.0 += v.0;
        e.1 += v.1;
        e.2 += v.2;
    }
    pipeline::assert_exact(&install, &balance.addr, &expected, THREE_MINUTES).await;

    // Redis comes back empty: the consolidator is stopped, a batch is
    // published to the stream, and the stream is wiped before it is consumed.
    consolidator.stop();
    let lost = pipeline::record_many(&ledger.addr, "lost", 500, 10, 4).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // the relay publishes
    redis.stop();
    redis.restart(false);
    let report = install.run(&["balances", "reconcile"]);
    assert!(!report.status.success(), "reconcile must report the missing amounts");
    let stdout = String::from_utf8_lossy(&report.stdout);
    assert!(stdout.contains("missing net") && stdout.contains("day(s) differ"), "{stdout}");
    let repair = install.run(&["balances", "reconcile", "--repair"]);
    assert!(
        repair.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&repair.stdout),
        String::from_utf8_lossy(&repair.stderr)
    );
    for (k, v) in lost {
        let e = expected.entry(k).or_insert((0, 0, 0));
        e.0 += v.0;
        e.1 += v.1;
        e.2 += v.2;
    }
    let consolidator = install.start("consolidator", &[]);
    pipeline::assert_exact(&install, &balance.addr, &expected, THREE_MINUTES).await;
    consolidator.stop();
    ledger.stop();
    balance.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_message_is_dead_lettered_and_replayed_exactly_once() {
    use sea_orm::ConnectionTrait;
    let install =
        pipeline::Install::new(std::env::var("FLUXO_TEST_REDIS_URL").expect("FLUXO_TEST_REDIS_URL")).await;
    let db = install.db.connect().await;
    // The read model refuses merchant "poison" until the cause is fixed.
    db.conn()
        .execute_unprepared(
            "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.merchant_id = 'poison' THEN RAISE EXCEPTION 'poison refused'; END IF; RETURN NEW; END $$; \
             CREATE TRIGGER refuse_poison BEFORE INSERT OR UPDATE ON balance_daily FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
        )
        .await
        .unwrap();
    let ledger = install.start("ledger", &[]);
    let balance = install.start("balance", &[]);
    let consolidator = install.start("consolidator", &[]);
    let mut client = pipeline::ledger_client(&ledger.addr).await;
    let poison = lpb::RecordEntryRequest {
        merchant_id: "poison".into(),
        r#type: lpb::EntryType::Credit.into(),
        amount: Some(lpb::Money { currency_code: "BRL".into(), minor_units: 999 }),
        booking_date: "2026-11-03".into(),
        description: String::new(),
        request_id: "p-1".into(),
        ..Default::default()
    };
    client.record_entry(poison).await.unwrap();
    // The rest keeps flowing meanwhile.
    let expected = pipeline::record_many(&ledger.addr, "healthy", 600, 5, 4).await;
    pipeline::assert_balances(&install, &balance.addr, &expected, THREE_MINUTES).await;

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let list = install.run(&["dlq", "list"]);
        let out = String::from_utf8_lossy(&list.stdout).into_owned();
        if out.starts_with("1 parked") {
            assert!(out.contains("poison refused"), "{out}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "poison never reached the dead-letter stream: {out}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(pipeline::pending(&install.redis_url, &install.stream).await, 0);

    // Replay fails while the cause is there, then succeeds once it is fixed.
    let early = install.run(&["dlq", "replay", "--all"]);
    assert!(!early.status.success());
    db.conn().execute_unprepared("DROP TRIGGER refuse_poison ON balance_daily;").await.unwrap();
    let replay = install.run(&["dlq", "replay", "--all"]);
    assert!(replay.status.success(), "{}", String::from_utf8_lossy(&replay.stderr));
    let again = install.run(&["dlq", "replay", "--all"]);
    assert!(again.status.success());
    let mut balances =
        bpb::balance_service_client::BalanceServiceClient::connect(format!("http://{}", balance.addr))
            .await
            .unwrap();
    let day = balances
        .get_daily_balance(bpb::GetDailyBalanceRequest {
            merchant_id: "poison".into(),
            date: "2026-11-03".into(),
            currency_code: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((day.total_credits_minor, day.entry_count), (999, 1), "applied exactly once");
    let reconcile = install.run(&["balances", "reconcile"]);
    assert!(reconcile.status.success(), "{}", String::from_utf8_lossy(&reconcile.stdout));
    consolidator.stop();
    ledger.stop();
    balance.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_batch_commits_acknowledges_and_exits_in_time() {
    let install =
        pipeline::Install::new(std::env::var("FLUXO_TEST_REDIS_URL").expect("FLUXO_TEST_REDIS_URL")).await;
    let ledger = install.start("ledger", &[]);
    let balance = install.start("balance", &[]);
    let expected = pipeline::record_many(&ledger.addr, "term", 6_000, 20, 16).await;
    let consolidator = install.start(
        "consolidator",
        &[("FLUXO_CONSOLIDATOR__CONSUMER_NAME", "terminated"), ("FLUXO_CONSOLIDATOR__BATCH_SIZE", "200")],
    );
    tokio::time::sleep(Duration::from_millis(300)).await; // mid-drain
    let stopping = std::time::Instant::now();
    consolidator.signal("TERM");
    let output = consolidator.wait(Duration::from_secs(10));
    assert!(output.status.success(), "{:?}", output.status);
    assert!(stopping.elapsed() < Duration::from_secs(6), "exited after {:?}", stopping.elapsed());
    // Its batch in hand was committed and acknowledged: nothing is left pending for it.
    assert_eq!(pipeline::pending(&install.redis_url, &install.stream).await, 0);
    let next = install.start("consolidator", &[]);
    pipeline::assert_exact(&install, &balance.addr, &expected, THREE_MINUTES).await;
    next.stop();
    ledger.stop();
    balance.stop();
}

#[test]
fn webhooks_are_signed_retried_dead_lettered_replayed_rotated_and_survive_a_kill() {
    notifier::signed_retried_dead_lettered_replayed_and_never_lost();
}

#[test]
fn the_rest_api_serves_every_route_with_grpc_gateway_errors_and_authorization() {
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(data.path(), &[]);
    rest::every_route_and_error_mapping(&fluxo);
    rest::metadata_and_filters(&fluxo);
    rest::batch_and_periods(&fluxo);
    rest::authorization_matrix(&fluxo, data.path());
    let secrets = subscriptions::managed_over_rest(&fluxo, data.path());
    let logs = String::from_utf8_lossy(&fluxo.stop().stderr).into_owned();
    for secret in secrets {
        let key = secret.trim_start_matches("whsec_");
        assert!(!logs.contains(key), "a signing secret reached the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forwarded_identity_is_kept_to_its_merchants_on_grpc_too() {
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(data.path(), &[]);
    let mut client = pipeline::ledger_client(&fluxo.addr).await;
    let mut request =
        tonic::Request::new(lpb::ListEntriesRequest { merchant_id: "m-2".into(), ..Default::default() });
    request.metadata_mut().insert("x-fluxo-subject", "shop".parse().unwrap());
    request.metadata_mut().insert("x-fluxo-merchants", "m-1".parse().unwrap());
    let denied = client.list_entries(request).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    fluxo.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_share_one_rate_limit_and_priority_keeps_its_share() {
    let install =
        pipeline::Install::new(std::env::var("FLUXO_TEST_REDIS_URL").expect("FLUXO_TEST_REDIS_URL")).await;
    let secret = "a-shared-test-secret-of-32-bytes";
    let backends =
        install.start("all", &[("FLUXO_AUTH__HS256_SECRET", secret), ("FLUXO_RATE_LIMIT__ENABLED", "false")]);
    let grpc = format!("http://{}", backends.addr);
    let env = [
        ("FLUXO_AUTH__HS256_SECRET", secret),
        ("FLUXO_GATEWAY__LEDGER_URL", grpc.as_str()),
        ("FLUXO_GATEWAY__BALANCE_URL", grpc.as_str()),
        ("FLUXO_RATE_LIMIT__TIERS__STANDARD__PER_SECOND", "20"),
        ("FLUXO_RATE_LIMIT__TIERS__STANDARD__BURST", "20"),
        ("FLUXO_RATE_LIMIT__TIERS__PRIORITY__PER_SECOND", "20"),
        ("FLUXO_RATE_LIMIT__TIERS__PRIORITY__BURST", "20"),
        ("FLUXO_RATE_LIMIT__SHARED_PER_SECOND", "40"),
        ("FLUXO_RATE_LIMIT__SHARED_BURST", "40"),
    ];
    let gateways = [install.start("gateway", &env), install.start("gateway", &env)];
    let secret = secrecy::SecretString::from(secret.to_owned());
    let mint = |sub: &str, tier: Option<&str>| {
        fluxo_gateway::auth::TokenSpec {
            tier,
            valid_for_secs: 600,
            ..fluxo_gateway::auth::TokenSpec::admin(sub)
        }
        .sign_hs256(&secret, "fluxo", "fluxo-api")
        .unwrap()
    };
    let clients: Vec<rest::Client> =
        gateways.iter().map(|g| rest::Client::new(g.rest.as_deref().unwrap())).collect();
    let path = "/v1/merchants/m-1/balances/2026-11-21?currencyCode=BRL";

    // One client alternating between both gateways for two seconds: the limit is combined.
    let single = mint("single", None);
    let started = std::time::Instant::now();
    let (mut ok, mut limited) = (0u32, 0u32);
    while started.elapsed() < Duration::from_secs(2) {
        for c in &clients {
            match c.get(path, Some(&single)).status {
                200 => ok += 1,
                429 => limited += 1,
                other => panic!("unexpected status {other}"),
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let expected = 20.0 + 20.0 * elapsed; // burst + rate × time, across both gateways together
    eprintln!(
        "combined limit: {ok} allowed, {limited} refused in {elapsed:.2}s; expected about {expected:.0}"
    );
    assert!(limited > 0, "the limit was never reached");
    assert!(f64::from(ok) <= expected * 1.15 + 2.0, "{ok} allowed: more than one combined limit");
    assert!(f64::from(ok) >= expected * 0.7, "{ok} allowed: far below the limit");
    let refused = clients[0].get(path, Some(&single));
    if refused.status == 429 {
        assert!(refused.header("retry-after").is_some());
        assert_eq!(refused.header("ratelimit-remaining"), Some("0"));
    }

    // Standard clients flood the shared pool; a priority client keeps its share.
    let flooders: Vec<String> = (0..6).map(|i| mint(&format!("flood-{i}"), None)).collect();
    let vip = mint("vip", Some("priority"));
    let started = std::time::Instant::now();
    let (mut vip_ok, mut vip_total, mut flood_limited) = (0u32, 0u32, 0u32);
    let mut i = 0usize;
    let mut last_vip = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        for f in &flooders {
            if clients[i % 2].get(path, Some(f)).status == 429 {
                flood_limited += 1;
            }
            i += 1;
        }
        // The priority client asks at half its own rate (10/s of its 20/s).
        if last_vip.elapsed() >= Duration::from_millis(100) {
            last_vip = std::time::Instant::now();
            vip_total += 1;
            if clients[i % 2].get(path, Some(&vip)).status == 200 {
                vip_ok += 1;
            }
        }
    }
    eprintln!("priority: {vip_ok}/{vip_total} served while flooders were refused {flood_limited} times");
    assert!(flood_limited > 0);
    assert!(
        vip_total > 0 && f64::from(vip_ok) >= 0.9 * f64::from(vip_total),
        "priority lost its share: {vip_ok}/{vip_total}"
    );
    for g in gateways {
        g.stop();
    }
    backends.stop();
}

#[test]
fn books_on_sqlite_import_resume_close_and_verify() {
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(data.path(), &[]);
    let url = format!("sqlite://{}", data.path().join("data").join("fluxo.sqlite").display());
    books::import_close_and_verify(&fluxo, data.path(), &[], &url);
    fluxo.stop();
}

#[test]
fn books_on_postgres_import_resume_close_and_verify() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new(Backend::Postgres));
    let data = tempfile::tempdir().unwrap();
    let env = [
        ("FLUXO_DATABASE__URL", db.url.as_str()),
        ("FLUXO_AUTH__HS256_SECRET", "an-hs256-secret-for-this-test-only"),
    ];
    let migrate = fluxo_command(data.path(), &env).arg("migrate").output().unwrap();
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));
    let fluxo = Fluxo::start(data.path(), &env);
    books::import_close_and_verify(&fluxo, data.path(), &env, &db.url);
    fluxo.stop();
}
