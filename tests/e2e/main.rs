//! Black-box tests of the built `fluxo` binary: started as a newcomer starts
//! it, called with grpcurl over server reflection only, stopped with SIGTERM.

mod support;

use std::time::Duration;

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
    assert_eq!(
        entry["amount"],
        json!({"currencyCode":"BRL","minorUnits":"1050"})
    );
    assert_eq!(entry["type"], "CREDIT");
    assert_eq!(entry["bookingDate"], "2026-11-21");
    assert!(entry["createdAt"].as_str().unwrap().ends_with('Z'));

    let read = fluxo
        .call(
            "fluxo.ledger.v1.LedgerService/GetEntry",
            &json!({"merchantId":"m-1","entryId":id}),
        )
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

    let listed = fluxo
        .call(
            "fluxo.ledger.v1.LedgerService/ListEntries",
            &json!({"merchantId":"m-1"}),
        )
        .unwrap();
    assert_eq!(listed["entries"].as_array().unwrap().len(), 2);
    assert_eq!(listed["entries"][0]["reversedByEntryId"], reversal["id"]);

    let invalid = fluxo
        .call(
            RECORD,
            &json!({"merchantId":"m-1","type":"CREDIT","requestId":"k-9"}),
        )
        .unwrap_err();
    assert!(
        invalid.contains("InvalidArgument") && invalid.contains("amount"),
        "{invalid}"
    );

    let output = fluxo.stop();
    assert!(output.status.success(), "exit status {:?}", output.status);
    // stdout carries nothing but JSON log lines.
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }

    // Restart on the same data directory: everything is still there, and the
    // same request with the same key replays the original entry.
    let fluxo = Fluxo::start(data.path(), &[]);
    let listed = fluxo
        .call(
            "fluxo.ledger.v1.LedgerService/ListEntries",
            &json!({"merchantId":"m-1"}),
        )
        .unwrap();
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
    let output = fluxo.wait(Duration::from_secs(10));
    assert!(output.status.success(), "exit status {:?}", output.status);
}

#[test]
fn on_postgres_it_is_not_serving_until_fluxo_migrate_ran() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new(Backend::Postgres));
    let data = tempfile::tempdir().unwrap();
    let env = [("FLUXO_DATABASE__URL", db.url.as_str())];
    let fluxo = Fluxo::start(data.path(), &env);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fluxo.health(""), "NOT_SERVING", "no schema yet");

    let migrate = fluxo_command(data.path(), &env)
        .arg("migrate")
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
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
    let again = fluxo_command(data.path(), &env)
        .arg("migrate")
        .output()
        .unwrap();
    assert!(again.status.success());
    fluxo.stop();
}

#[test]
fn bad_configuration_exits_with_a_message_naming_the_setting() {
    let data = tempfile::tempdir().unwrap();
    let cases = [
        (
            "FLUXO_GRPC__MAX_CONCURRENT_REQUESTS",
            "lots",
            "max_concurrent_requests",
        ),
        (
            "FLUXO_LEDGER__TIME_ZONE",
            "Mars/Olympus_Mons",
            "ledger.time_zone",
        ),
        ("FLUXO_DATABSE__URL", "postgres://x", "databse"),
        ("FLUXO_GRPC__LISTEN", "not-an-address", "listen"),
        (
            "FLUXO_DATABASE__URL",
            "mysql://root:hunter2@db/x",
            "database.url",
        ),
    ];
    for (key, value, named) in cases {
        let output = fluxo_command(data.path(), &[(key, value)])
            .arg("serve")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{key}: {stderr}");
        assert!(stderr.contains(named), "{key}: {stderr}");
        assert!(
            !stderr.contains("hunter2"),
            "a password was echoed: {stderr}"
        );
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
    let from_file = fluxo_command(data.path(), &[])
        .arg("--config")
        .arg(&file)
        .arg("serve")
        .output()
        .unwrap();
    assert_eq!(from_file.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&from_file.stderr).contains("Nowhere/City"));
    let overridden = fluxo_command(
        data.path(),
        &[("FLUXO_LEDGER__TIME_ZONE", "America/Sao_Paulo")],
    )
    .arg("--config")
    .arg(&file)
    .arg("migrate")
    .output()
    .unwrap();
    assert!(
        overridden.status.success(),
        "{}",
        String::from_utf8_lossy(&overridden.stderr)
    );
}

#[test]
fn targets_not_built_yet_say_so() {
    let data = tempfile::tempdir().unwrap();
    let output = fluxo_command(data.path(), &[])
        .args(["serve", "--target", "gateway"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not built yet"));
    let help = fluxo_command(data.path(), &[])
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("serve") && help.contains("migrate") && help.contains("FLUXO_"),
        "{help}"
    );
}
