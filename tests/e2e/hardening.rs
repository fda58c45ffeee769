//! What a hostile caller tries, against the built binary: sums past 64 bits,
//! a poison event, retry storms, bad protobuf and duplicate JSON keys, forged
//! identity headers, slow sockets, and shutdown under load — each checked with
//! a client fluxo did not write where the defect is on the wire (curl, ghz,
//! raw sockets).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use fluxo_proto::{
    balance_v1::{self as bpb, balance_service_client::BalanceServiceClient},
    ledger_v1 as lpb,
};
use fluxo_testing::{Backend, TestDb};
use serde_json::json;

use crate::{
    pipeline::{Install, OwnRedis, ledger_client},
    rest,
    support::{Fluxo, fluxo_command},
};

/// The largest entry the ledger accepts, and how many of them fit in 64 bits.
const MAX_ENTRY: i64 = 1_000_000_000_000_000;
const FIT: i64 = i64::MAX / MAX_ENTRY;

fn credit(merchant: &str, key: &str, minor_units: i64, date: &str) -> lpb::RecordEntryRequest {
    lpb::RecordEntryRequest {
        merchant_id: merchant.into(),
        r#type: lpb::EntryType::Credit.into(),
        amount: Some(lpb::Money { currency_code: "BRL".into(), minor_units }),
        booking_date: date.into(),
        description: String::new(),
        request_id: key.into(),
        ..Default::default()
    }
}

/// Books `requests` with 32 callers; the outcome of each, in order.
async fn book_all(addr: &str, requests: Vec<lpb::RecordEntryRequest>) -> Vec<Result<(), tonic::Status>> {
    let client = ledger_client(addr).await;
    let chunks: Vec<Vec<(usize, lpb::RecordEntryRequest)>> = {
        let mut chunks = vec![Vec::new(); 32];
        for (i, r) in requests.into_iter().enumerate() {
            chunks[i % 32].push((i, r));
        }
        chunks
    };
    let tasks = chunks.into_iter().map(|chunk| {
        let mut client = client.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            for (i, r) in chunk {
                out.push((i, client.record_entry(r).await.map(|_| ())));
            }
            out
        })
    });
    let mut results: Vec<(usize, Result<(), tonic::Status>)> =
        futures::future::join_all(tasks).await.into_iter().flat_map(Result::unwrap).collect();
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// Polls the balance service until each (merchant, date) reads `expected`
/// (credits, count, possibly stale), or fails at the deadline.
async fn wait_for_days(balance_addr: &str, expected: &BTreeMap<(String, String), (i64, i64, bool)>) {
    let mut client = BalanceServiceClient::connect(format!("http://{balance_addr}")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut wrong = Vec::new();
        for ((merchant, date), want) in expected {
            let got = client
                .get_daily_balance(bpb::GetDailyBalanceRequest {
                    merchant_id: merchant.clone(),
                    date: date.clone(),
                    currency_code: "BRL".into(),
                })
                .await
                .map(|r| r.into_inner());
            match got {
                Ok(day) if (day.total_credits_minor, day.entry_count, day.possibly_stale) == *want => {}
                Ok(day) => wrong.push(format!(
                    "{merchant} {date}: {:?}, want {want:?}",
                    (day.total_credits_minor, day.entry_count, day.possibly_stale)
                )),
                Err(status) => {
                    assert_ne!(
                        status.code(),
                        tonic::Code::Internal,
                        "a balance read is never INTERNAL: {status:?}"
                    );
                    wrong.push(format!("{merchant} {date}: {status:?}"));
                }
            }
        }
        if wrong.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "balances not as expected within 60 s:\n{}", wrong.join("\n"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// 9,300 of the largest entries for one merchant on one day: the ledger books
/// exactly as many as 64 bits hold and refuses the rest naming the amount,
/// and every balance — that merchant's and the others' — is consolidated exactly.
async fn totals_are_capped_where_entries_are_booked(ledger_addr: &str, balance_addr: &str) {
    let date = "2026-11-03";
    let mut requests: Vec<_> =
        (0..9_300).map(|i| credit("m-big", &format!("big-{i}"), MAX_ENTRY, date)).collect();
    for m in 0..5 {
        for i in 0..40 {
            requests.push(credit(&format!("m-{m}"), &format!("small-{m}-{i}"), 100 + i, date));
        }
    }
    let results = book_all(ledger_addr, requests).await;
    let (big, small) = results.split_at(9_300);
    let booked = big.iter().filter(|r| r.is_ok()).count();
    assert_eq!(i64::try_from(booked).unwrap(), FIT, "exactly as many as fit in 64 bits");
    for refused in big.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
        assert!(refused.message().contains("m-big") && refused.message().contains("credits"), "{refused:?}");
    }
    assert!(small.iter().all(Result::is_ok), "other merchants are never refused");
    // A debit still books: the limit is per direction, and the balance can hold it.
    let mut client = ledger_client(ledger_addr).await;
    let debit = lpb::RecordEntryRequest {
        r#type: lpb::EntryType::Debit.into(),
        ..credit("m-big", "big-debit", 5, date)
    };
    client.record_entry(debit).await.unwrap();

    let mut expected = BTreeMap::new();
    expected.insert(("m-big".to_owned(), date.to_owned()), (FIT * MAX_ENTRY, FIT + 1, false));
    for m in 0..5 {
        expected.insert((format!("m-{m}"), date.to_owned()), ((100..140).sum(), 40, false));
    }
    wait_for_days(balance_addr, &expected).await;
    let mut balances = BalanceServiceClient::connect(format!("http://{balance_addr}")).await.unwrap();
    let later = balances
        .get_daily_balance(bpb::GetDailyBalanceRequest {
            merchant_id: "m-big".into(),
            date: "2026-11-30".into(),
            currency_code: "BRL".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(later.closing_balance_minor, FIT * MAX_ENTRY - 5, "the running balance carries exactly");
}

#[test]
fn embedded_the_ledger_refuses_what_the_balances_could_not_hold() {
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(data.path(), &[("FLUXO_LOG__LEVEL", "warn")]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(totals_are_capped_where_entries_are_booked(&fluxo.addr, &fluxo.addr));
    assert_eq!(fluxo.health(""), "SERVING");
    fluxo.stop();
}

#[test]
fn on_postgres_and_redis_the_ledger_refuses_what_the_balances_could_not_hold() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let redis = OwnRedis::start();
    let install = runtime.block_on(Install::new(redis.url()));
    let ledger = install.start("ledger", &[]);
    let consolidator = install.start("consolidator", &[]);
    let balance = install.start("balance", &[]);
    runtime.block_on(totals_are_capped_where_entries_are_booked(&ledger.addr, &balance.addr));
    for p in [ledger, consolidator, balance] {
        p.stop();
    }
}

/// A read model that already holds a day near 64 bits (written before the
/// ledger's limit) refuses the next entry of that merchant: the event is
/// parked at once, everyone else's events go on, that merchant's balances read
/// as possibly stale (never INTERNAL, never stale presented as fresh), the
/// operator sees it, and a replay after the fix clears it.
async fn a_poison_event_is_parked_and_holds_no_one_back(
    db_url: &str,
    ledger: &str,
    balance: &str,
    run: &dyn Fn(&[&str]) -> std::process::Output,
) {
    use sea_orm::{ConnectionTrait, Database};
    let db = Database::connect(db_url).await.unwrap();
    let backend = db.get_database_backend();
    let seed = format!(
        "INSERT INTO balance_daily (merchant_id, currency_code, booking_date, credits_minor, debits_minor, \
         entry_count, as_of_micros) VALUES ('m-poison', 'BRL', '2026-11-02', {}, 0, 1, 0)",
        i64::MAX - 10
    );
    db.execute_raw(sea_orm::Statement::from_string(backend, seed)).await.unwrap();

    let mut requests = vec![credit("m-poison", "poison", 1_000, "2026-11-02")];
    for i in 0..50 {
        requests.push(credit(&format!("m-ok-{}", i % 5), &format!("ok-{i}"), 10, "2026-11-02"));
    }
    assert!(book_all(ledger, requests).await.iter().all(Result::is_ok), "the ledger accepts all of them");
    let mut expected = BTreeMap::new();
    for m in 0..5 {
        expected.insert((format!("m-ok-{m}"), "2026-11-02".to_owned()), (100, 10, false));
    }
    // The poisoned merchant keeps its old figures, and says they may be stale.
    expected.insert(("m-poison".to_owned(), "2026-11-02".to_owned()), (i64::MAX - 10, 1, true));
    expected.insert(("m-poison".to_owned(), "2026-11-01".to_owned()), (0, 0, false));
    wait_for_days(balance, &expected).await;

    let status = run(&["queue", "status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("parked      1 event(s)"), "{text}");
    let listed = run(&["dlq", "list"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("1 parked"), "{text}");

    // The operator fixes the cause (here: the bogus row) and replays.
    db.execute_raw(sea_orm::Statement::from_string(
        backend,
        "UPDATE balance_daily SET credits_minor = 0, entry_count = 0 WHERE merchant_id = 'm-poison'"
            .to_owned(),
    ))
    .await
    .unwrap();
    let replay = run(&["dlq", "replay", "--all"]);
    assert!(
        replay.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&replay.stdout),
        String::from_utf8_lossy(&replay.stderr)
    );
    expected.insert(("m-poison".to_owned(), "2026-11-02".to_owned()), (1_000, 1, false));
    wait_for_days(balance, &expected).await;
}

#[test]
fn embedded_a_poison_event_is_parked_and_holds_no_one_back() {
    let data = tempfile::tempdir().unwrap();
    // No cache in the embedded default: every read sees the read model.
    let fluxo = Fluxo::start(data.path(), &[("FLUXO_LOG__LEVEL", "warn")]);
    let url = format!("sqlite://{}", data.path().join("data/fluxo.sqlite").display());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = data.path().to_owned();
    let run = move |args: &[&str]| fluxo_command(&dir, &[]).args(args).output().unwrap();
    runtime.block_on(a_poison_event_is_parked_and_holds_no_one_back(&url, &fluxo.addr, &fluxo.addr, &run));
    assert_eq!(fluxo.health(""), "SERVING");
    fluxo.stop();
}

#[test]
fn on_postgres_and_redis_a_poison_event_is_parked_at_once_and_holds_no_one_back() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let redis = OwnRedis::start();
    let install = runtime.block_on(Install::new(redis.url()));
    // Redeliveries would take minutes before the dead-letter stream: parking is immediate.
    let slow_retries = [("FLUXO_CONSOLIDATOR__CLAIM_IDLE_MS", "600000")];
    let ledger = install.start("ledger", &[]);
    let consolidator = install.start("consolidator", &slow_retries);
    let balance = install.start("balance", &[]);
    let run = |args: &[&str]| install.run(args);
    runtime.block_on(a_poison_event_is_parked_and_holds_no_one_back(
        &install.db.url,
        &ledger.addr,
        &balance.addr,
        &run,
    ));
    for p in [ledger, consolidator, balance] {
        p.stop();
    }
}

/// Forty copies of one ReverseEntry at once (a retry storm) all answer with
/// the reversal booked under their key.
#[test]
fn a_retry_storm_of_one_reversal_is_answered_with_that_reversal() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new(Backend::Postgres));
    let data = tempfile::tempdir().unwrap();
    let env = [
        ("FLUXO_DATABASE__URL", db.url.as_str()),
        ("FLUXO_DATABASE__MIGRATE_ON_START", "true"),
        ("FLUXO_AUTH__HS256_SECRET", "an-hs256-secret-for-this-test-only"),
    ];
    let fluxo = Fluxo::start(data.path(), &env);
    runtime.block_on(async {
        let mut client = ledger_client(&fluxo.addr).await;
        let original =
            client.record_entry(credit("m-1", "k-1", 500, "2026-11-02")).await.unwrap().into_inner();
        let calls = (0..40).map(|_| {
            let mut client = client.clone();
            let request = lpb::ReverseEntryRequest {
                merchant_id: "m-1".into(),
                entry_id: original.id.clone(),
                request_id: "r-1".into(),
                ..Default::default()
            };
            tokio::spawn(async move { client.reverse_entry(request).await.map(|r| r.into_inner().id) })
        });
        let ids: std::collections::BTreeSet<String> = futures::future::join_all(calls)
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap_or_else(|s| panic!("a retry was refused: {s:?}")))
            .collect();
        assert_eq!(ids.len(), 1);
    });
    fluxo.stop();
}

fn curl() -> Command {
    let mut c = Command::new("curl");
    c.args(["--silent", "--show-error", "--max-time", "10"]);
    c
}

/// A raw gRPC request sent by curl over h2c: the grpc-status it gets back.
fn grpc_status_of(addr: &str, path: &str, frame: &[u8], extra_headers: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    std::fs::write(&body, frame).unwrap();
    let mut command = curl();
    command.args([
        "--http2-prior-knowledge",
        "-i",
        "-X",
        "POST",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
    ]);
    for h in extra_headers {
        command.args(["-H", h]);
    }
    command.arg("--data-binary").arg(format!("@{}", body.display())).arg(format!("http://{addr}{path}"));
    let out = command.output().expect("curl (Debian's, with HTTP/2)");
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    text.lines()
        .find_map(|l| l.strip_prefix("grpc-status:").map(|s| s.trim().to_owned()))
        .unwrap_or_else(|| panic!("no grpc-status in curl's output: {text}"))
}

/// A length-prefixed gRPC message with the given compressed flag.
fn frame(flag: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![flag];
    f.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn requests_that_cannot_be_decoded_are_invalid_argument_not_internal() {
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(data.path(), &[]);
    let record = "/fluxo.ledger.v1.LedgerService/RecordEntry";
    // Field 1 (merchant_id, a string) holding bytes that are not UTF-8.
    let bad_utf8 = frame(0, &[0x0a, 0x02, 0xff, 0xfe]);
    // Field 1 declared with a length past the end of the message.
    let truncated_field = frame(0, &[0x0a, 0x10, b'm']);
    // Field 1 with wire type 5 (fixed32) where a string is declared.
    let wrong_wire_type = frame(0, &[0x0d, 1, 2, 3, 4]);
    let garbage = frame(0, &[0xff; 12]);
    // The frame says 100 bytes follow; 3 do.
    let mut short_frame = frame(0, &[1, 2, 3]);
    short_frame[4] = 100;
    let compressed_without_encoding = frame(1, &[0x0a, 0x01, b'm']);
    for (what, body) in [
        ("invalid UTF-8 in a string field", bad_utf8),
        ("a field past the end", truncated_field),
        ("a wrong wire type", wrong_wire_type),
        ("garbage", garbage),
        ("a truncated frame", short_frame),
        ("the compressed flag without grpc-encoding", compressed_without_encoding),
    ] {
        assert_eq!(grpc_status_of(&fluxo.addr, record, &body, &[]), "3", "{what}: INVALID_ARGUMENT");
    }
    // A well-formed message still reaches the handler (which names the bad fields).
    assert_eq!(grpc_status_of(&fluxo.addr, record, &frame(0, &[0x0a, 0x01, b'm']), &[]), "3");
    fluxo.stop();
}

/// ghz (grpc-go) sending one call at a time on one connection: with Nagle's
/// algorithm on the server's sockets about half the calls waited for the
/// client's delayed ACK (~40 ms, a kernel timer, whatever the load: mean 22 ms,
/// 26 of 60 calls over 40 ms); without it a loopback call takes well under a
/// millisecond. Counted, not timed: how many calls took as long as that timer.
#[test]
fn a_caller_sending_one_call_at_a_time_is_not_held_by_nagle() {
    let Ok(ghz) = std::env::var("FLUXO_TEST_GHZ") else {
        panic!("FLUXO_TEST_GHZ is not set: run the suite with ./scripts/test.sh, which installs ghz");
    };
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(data.path(), &[]);
    let entry = r#"{"merchantId":"m-1","type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":"100"},"requestId":"k-{{newUUID}}"}"#;
    for (call, data) in
        [("grpc.health.v1.Health/Check", "{}"), ("fluxo.ledger.v1.LedgerService/RecordEntry", entry)]
    {
        let out = Command::new(&ghz)
            .args(["--insecure", "--call", call, "-c", "1", "-n", "60", "--connections", "1"])
            .args(["-d", data, "--format", "json"])
            .arg(&fluxo.addr)
            .output()
            .expect("run ghz");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let latencies: Vec<f64> = report["details"]
            .as_array()
            .expect("ghz reports every call")
            .iter()
            .map(|d| d["latency"].as_f64().unwrap() / 1e6)
            .collect();
        assert_eq!(latencies.len(), 60);
        let held = latencies.iter().filter(|ms| **ms >= 38.0).count();
        eprintln!(
            "{call}, one caller on one connection: mean {:.2} ms, {held} of 60 calls ≥ 38 ms (ghz)",
            report["average"].as_f64().unwrap_or(0.0) / 1e6
        );
        // A busy host may stretch a call or two; Nagle holds a third or more of them.
        assert!(
            held <= 6,
            "{held} of 60 one-at-a-time {call} calls took ≥ 38 ms: TCP_NODELAY is off ({latencies:?})"
        );
    }
    fluxo.stop();
}

/// With grpc.auth = jwt, gRPC asks for the same tokens as REST, and an
/// identity header a caller sends grants nothing.
#[test]
fn with_jwt_on_grpc_a_header_never_raises_a_privilege() {
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(data.path(), &[("FLUXO_GRPC__AUTH", "jwt")]);
    let token = fluxo.token.clone().expect("a development token");
    let secret = rest::dev_secret(data.path());
    let shop = rest::token(&secret, &["m-1"], 600, "fluxo-api");
    let entry = r#"{"merchantId":"m-2","type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":"5"},"requestId":"k"}"#;
    let call = |headers: &[String]| {
        let mut args: Vec<String> = Vec::new();
        for h in headers {
            args.extend(["-H".to_owned(), h.clone()]);
        }
        args.push(fluxo.addr.clone());
        args.push("fluxo.ledger.v1.LedgerService/RecordEntry".to_owned());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::support::grpcurl_args(&refs, Some(entry))
    };
    let none = call(&[]).unwrap_err();
    assert!(none.contains("Unauthenticated"), "{none}");
    let forged = call(&["x-fluxo-admin: true".into(), "x-fluxo-subject: me".into()]).unwrap_err();
    assert!(forged.contains("Unauthenticated"), "{forged}");
    let narrowed =
        call(&[format!("authorization: Bearer {shop}"), "x-fluxo-admin: true".into()]).unwrap_err();
    assert!(narrowed.contains("PermissionDenied"), "a token for m-1 may not act for m-2: {narrowed}");
    assert!(call(&[format!("authorization: Bearer {token}")]).is_ok());
    // Probes need no token.
    assert_eq!(fluxo.health(""), "SERVING");
    // REST goes through the same check with the caller's token.
    let client = rest::Client::new(fluxo.rest.as_deref().unwrap());
    let reply = client.get("/v1/merchants/m-2/entries", Some(&token));
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    fluxo.stop();
}

#[test]
fn open_grpc_refuses_to_listen_beyond_loopback() {
    let data = tempfile::tempdir().unwrap();
    let out =
        fluxo_command(data.path(), &[("FLUXO_GRPC__LISTEN", "0.0.0.0:0")]).arg("serve").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("grpc.auth") && stderr.contains("loopback"), "{stderr}");
}

/// One raw HTTP/1.1 exchange on `stream`: the status line and headers.
fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0)
}

/// Waits until the server closes `stream` (a read returns 0 or fails).
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn the_rest_server_bounds_slow_and_oversized_requests() {
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(
        data.path(),
        &[("FLUXO_GATEWAY__HEADER_READ_TIMEOUT_MS", "1000"), ("FLUXO_GATEWAY__REQUEST_TIMEOUT_MS", "1500")],
    );
    let addr = fluxo.rest.clone().unwrap();
    let token = fluxo.token.clone().unwrap();

    // Headers that never end are cut after the header timeout.
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /v1/merchants/m-1/entries HTTP/1.1\r\nHost: x\r\n").unwrap();
    assert!(closed_within(&mut slow, Duration::from_secs(10)), "a slow-header client is disconnected");

    // A body that stops short is answered 408 after the body timeout.
    let mut short = TcpStream::connect(&addr).unwrap();
    write!(
        short,
        "POST /v1/merchants/m-1/entries HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"type\""
    )
    .unwrap();
    short.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = read_head(&mut short);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");

    // A declared body over the limit is refused before it is sent.
    let mut large = TcpStream::connect(&addr).unwrap();
    write!(
        large,
        "POST /v1/merchants/m-1/entries HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
    )
    .unwrap();
    large.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = read_head(&mut large);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
    fluxo.stop();
}

/// Refused before its body was read (401, 429…), a request still leaves its
/// keep-alive connection usable — or says `Connection: close`; the next
/// request on it never meets a closed socket.
#[test]
fn a_refusal_keeps_the_connection_usable_or_says_it_closes() {
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(
        data.path(),
        &[
            ("FLUXO_RATE_LIMIT__TIERS__STANDARD__PER_SECOND", "1"),
            ("FLUXO_RATE_LIMIT__TIERS__STANDARD__BURST", "1"),
        ],
    );
    let addr = fluxo.rest.clone().unwrap();
    let secret = rest::dev_secret(data.path());
    let shop = rest::token(&secret, &["m-1"], 600, "fluxo-api");
    let body = r#"{"type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":"5"}}"#;
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut statuses = Vec::new();
    for i in 0..20 {
        let auth = if i % 5 == 4 { "Bearer forged".to_owned() } else { format!("Bearer {shop}") };
        let request = format!(
            "POST /v1/merchants/m-1/entries HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
             Idempotency-Key: k-{i}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).unwrap();
        let head = read_head(&mut stream);
        assert!(!head.is_empty(), "request {i}: the connection was closed without Connection: close");
        let mut rest_of = vec![0u8; content_length(&head)];
        stream.read_exact(&mut rest_of).unwrap();
        statuses.push(head[9..12].to_owned());
        if head.to_ascii_lowercase().contains("connection: close") {
            stream = TcpStream::connect(&addr).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
    }
    assert!(statuses.iter().any(|s| s == "429"), "the limit was reached: {statuses:?}");
    assert!(statuses.iter().any(|s| s == "401"), "{statuses:?}");
    fluxo.stop();
}

#[test]
fn forged_tokens_are_rate_limited_before_their_signature_is_checked() {
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(
        data.path(),
        &[("FLUXO_RATE_LIMIT__UNVERIFIED__PER_SECOND", "1"), ("FLUXO_RATE_LIMIT__UNVERIFIED__BURST", "5")],
    );
    let client = rest::Client::new(fluxo.rest.as_deref().unwrap());
    // A client whose token was verified lately (its first request drew one of
    // the address's burst of 5)...
    assert_eq!(client.get("/v1/merchants/m-1/entries", fluxo.token.as_deref()).status, 200);
    let statuses: Vec<u16> = (0..30)
        .map(|i| client.get("/v1/merchants/m-1/entries", Some(&format!("forged.{i}.x"))).status)
        .collect();
    // The rest of the burst is checked and refused (401); then, but for the one a
    // second the allowance regains, they are refused before any check (429).
    assert_eq!(statuses[..4], [401; 4], "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 401 || *s == 429), "{statuses:?}");
    assert!(statuses.iter().filter(|s| **s == 429).count() >= 20, "{statuses:?}");
    // ...is not held back by the forgers at its address.
    let ok = client.get("/v1/merchants/m-1/entries", fluxo.token.as_deref());
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    fluxo.stop();
}

#[test]
fn request_json_is_read_one_way_and_errors_name_the_field() {
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(data.path(), &[]);
    let client = rest::Client::new(fluxo.rest.as_deref().unwrap());
    let token = fluxo.token.as_deref();
    let post = |body: &str| {
        client.call(
            "POST",
            "/v1/merchants/m-1/entries",
            token,
            Some(("application/json", body)),
            &[("Idempotency-Key", "k")],
        )
    };
    let cases = [
        (
            r#"{"type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":"7"},"amount":{"currencyCode":"BRL","minorUnits":"700000"}}"#,
            "amount",
        ),
        (r#"{"type":"CREDIT","type":"DEBIT","amount":{"currencyCode":"BRL","minorUnits":"7"}}"#, "type"),
        (
            r#"{"type":"CREDIT","amount":{"currencyCode":"BRL","minor_units":"7","minorUnits":"700000"}}"#,
            "amount.minor_units",
        ),
        (r#"{"type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":"01050"}}"#, "amount.minor_units"),
        (r#"{"type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":true}}"#, "amount.minor_units"),
        (
            r#"{"type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":"9223372036854775808"}}"#,
            "amount.minor_units",
        ),
        (
            r#"{"type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":9223372036854775808}}"#,
            "amount.minor_units",
        ),
        (r#"{"type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":1.5}}"#, "amount.minor_units"),
        (r#"{"type":"REFUND","amount":{"currencyCode":"BRL","minorUnits":"7"}}"#, "type"),
        (r#"{"type":"CREDIT","amount":"7"}"#, "amount"),
    ];
    for (body, field) in cases {
        let reply = post(body);
        assert_eq!(reply.status, 400, "{body}: {:?}", reply.body);
        let violation = &reply.body["details"][0]["fieldViolations"][0];
        assert_eq!(violation["field"], field, "{body}: {:?}", reply.body);
    }
    let unknown = post(r#"{"type":"REFUND","amount":{"currencyCode":"BRL","minorUnits":"7"}}"#);
    assert!(unknown.body["message"].as_str().unwrap().contains("CREDIT, DEBIT"), "{:?}", unknown.body);
    // Nothing of any of them was booked.
    let listed = client.get("/v1/merchants/m-1/entries", token);
    assert_eq!(listed.body["entries"], json!([]), "{:?}", listed.body);
    // A well-formed request still books, numbers as strings or as JSON numbers.
    let ok = post(r#"{"type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":1050}}"#);
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert_eq!(ok.body["amount"]["minorUnits"], "1050");
    fluxo.stop();
}

#[test]
fn tokens_not_valid_yet_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(data.path(), &[("FLUXO_AUTH__LEEWAY_SECS", "5")]);
    let client = rest::Client::new(fluxo.rest.as_deref().unwrap());
    let secret = rest::dev_secret(data.path());
    use fluxo_gateway::auth::TokenSpec;
    let sign = |spec: TokenSpec<'_>| spec.sign_hs256(&secret, "fluxo", "fluxo-api").unwrap();
    let future_nbf = sign(TokenSpec { not_before_secs: Some(300), ..TokenSpec::admin("t") });
    let future_iat = sign(TokenSpec { issued_in_secs: Some(300), ..TokenSpec::admin("t") });
    let fine =
        sign(TokenSpec { not_before_secs: Some(-1), issued_in_secs: Some(-1), ..TokenSpec::admin("t") });
    assert_eq!(client.get("/v1/merchants/m-1/entries", Some(&future_nbf)).status, 401);
    assert_eq!(client.get("/v1/merchants/m-1/entries", Some(&future_iat)).status, 401);
    assert_eq!(client.get("/v1/merchants/m-1/entries", Some(&fine)).status, 200);
    fluxo.stop();
}

/// SIGTERM while REST calls are in flight under --target all: every call that
/// was sent gets its answer (the gateway drains before the gRPC services stop).
#[test]
fn sigterm_under_rest_load_answers_every_call_in_flight() {
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(
        data.path(),
        &[("FLUXO_RATE_LIMIT__ENABLED", "false"), ("FLUXO_GRPC__SHUTDOWN_DELAY_MS", "300")],
    );
    let addr = fluxo.rest.clone().unwrap();
    let token = fluxo.token.clone().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (addr, token, stop) = (addr.clone(), token.clone(), stop.clone());
            std::thread::spawn(move || {
                let client = rest::Client::new(&addr);
                let mut answered = Vec::new();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let body = json!({"type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":"3"},"requestId":format!("w{w}-{i}")});
                    // Once the listener is closed connections are refused: the end.
                    let text = body.to_string();
                    match client.try_call("POST", "/v1/merchants/m-1/entries", Some(&token), Some(("application/json", &text)), &[]) {
                        Ok(reply) => answered.push(reply.status),
                        Err(_) => break,
                    }
                    i += 1;
                }
                answered
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    fluxo.signal("TERM");
    let output = fluxo.wait(Duration::from_secs(30));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses: Vec<u16> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    assert!(output.status.success());
    assert!(statuses.len() > 8, "calls were in flight: {statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every answered call succeeded: {:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
}
