//! WatchDailyBalances on both backends: the days as they change, a
//! backdated entry's day included, resumed from a cursor.

use std::time::Duration;

use fluxo_proto::balance_v1 as bpb;
use fluxo_testing::Backend;
use tonic::{Code, Streaming};
use tonic_types::StatusExt;

use super::{event, merchant, spawn, spawn_with};

const PATIENCE: Duration = Duration::from_secs(30);

fn watch(merchant: &str, cursor: &str) -> bpb::WatchDailyBalancesRequest {
    bpb::WatchDailyBalancesRequest {
        merchant_id: merchant.into(),
        cursor: cursor.into(),
        start_at_end: false,
    }
}

/// Messages until `n` days have arrived: (date, opening, closing) of each, and the last cursor.
async fn days(
    stream: &mut Streaming<bpb::WatchDailyBalancesResponse>,
    n: usize,
) -> (Vec<(String, i64, i64)>, String) {
    let mut days = Vec::new();
    let mut cursor = String::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while days.len() < n {
        let message = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} days arrived: {days:?}", days.len()))
            .expect("the watch failed")
            .expect("a watch does not end");
        assert!(!message.cursor.is_empty(), "every message carries a cursor");
        cursor = message.cursor;
        days.extend(
            message.balances.into_iter().map(|b| (b.date, b.opening_balance_minor, b.closing_balance_minor)),
        );
    }
    assert_eq!(days.len(), n, "more days than changed: {days:?}");
    (days, cursor)
}

fn day(date: &str, opening: i64, closing: i64) -> (String, i64, i64) {
    (date.to_owned(), opening, closing)
}

pub(crate) async fn a_balance_watch_sends_each_day_as_it_changes_and_resumes_from_a_cursor(backend: Backend) {
    let app = spawn(backend, false).await;
    let (m, other) = (merchant(), merchant());
    app.apply(&[event(&m, "2026-11-20", true, 1000), event(&m, "2026-11-21", false, 300)]).await;

    let mut stream = app.client.clone().watch_daily_balances(watch(&m, "")).await.unwrap().into_inner();
    let (caught_up, after_two) = days(&mut stream, 2).await;
    assert_eq!(caught_up, [day("2026-11-20", 0, 1000), day("2026-11-21", 1000, 700)]);

    // A backdated entry: its day arrives with its figures; another merchant's change does not.
    app.apply(&[event(&other, "2026-11-19", true, 1)]).await;
    app.apply(&[event(&m, "2026-11-19", true, 50)]).await;
    let (backdated, _) = days(&mut stream, 1).await;
    assert_eq!(backdated, [day("2026-11-19", 0, 50)]);
    // A day that changes again arrives again, as it now stands (carried balance included).
    app.apply(&[event(&m, "2026-11-21", true, 5)]).await;
    let (again, _) = days(&mut stream, 1).await;
    assert_eq!(again, [day("2026-11-21", 1050, 755)]);

    // Resumed after the first two days: every day changed since, each once, as it stands.
    let mut resumed =
        app.client.clone().watch_daily_balances(watch(&m, &after_two)).await.unwrap().into_inner();
    let (since, _) = days(&mut resumed, 2).await;
    assert_eq!(since, [day("2026-11-19", 0, 50), day("2026-11-21", 1050, 755)]);

    // From the end: only what changes from now on.
    let request =
        bpb::WatchDailyBalancesRequest { merchant_id: m.clone(), cursor: String::new(), start_at_end: true };
    let mut tail = app.client.clone().watch_daily_balances(request).await.unwrap().into_inner();
    let first = tokio::time::timeout(PATIENCE, tail.message()).await.unwrap().unwrap().unwrap();
    if backend == Backend::Sqlite {
        assert!(first.balances.is_empty(), "a day that changed before the watch began was sent");
    }
    app.apply(&[event(&m, "2026-11-22", true, 1)]).await;
    let mut seen = first.balances.into_iter().map(|b| b.date).collect::<Vec<_>>();
    while !seen.iter().any(|d| d == "2026-11-22") {
        let message = tokio::time::timeout(PATIENCE, tail.message()).await.unwrap().unwrap().unwrap();
        seen.extend(message.balances.into_iter().map(|b| b.date));
    }
}

pub(crate) async fn a_bad_balance_watch_is_refused_naming_the_field(backend: Backend) {
    let app = spawn(backend, false).await;
    let foreign = match backend {
        Backend::Postgres => "s5",
        Backend::Sqlite => "t5",
    };
    let cases = [
        (watch("bad id", ""), "merchant_id"),
        (watch("m-1", "nope"), "cursor"),
        (watch("m-1", foreign), "cursor"),
        (
            bpb::WatchDailyBalancesRequest {
                merchant_id: "m-1".into(),
                cursor: "0".into(),
                start_at_end: true,
            },
            "start_at_end",
        ),
    ];
    for (request, field) in cases {
        let status = app.client.clone().watch_daily_balances(request.clone()).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{request:?}: {status:?}");
        let fields: Vec<String> = status
            .get_error_details()
            .bad_request()
            .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
            .unwrap_or_default();
        assert!(fields.iter().any(|f| f == field), "{request:?} should name {field}, named {fields:?}");
    }
}

pub(crate) async fn an_in_process_consolidator_wakes_the_balance_watch_without_its_poll(backend: Backend) {
    // A poll and a heartbeat an hour apart: within the test only a wake-up can bring news.
    let hour = Duration::from_secs(3600);
    let settings = fluxo_server::stream::WatchSettings {
        pace: fluxo_server::stream::WatchPace { heartbeat: hour, poll: hour },
        ..Default::default()
    };
    let app = spawn_with(backend, false, settings).await;
    let (m, other) = (merchant(), merchant());
    let mut stream = app.client.clone().watch_daily_balances(watch(&m, "")).await.unwrap().into_inner();
    let first = tokio::time::timeout(PATIENCE, stream.message()).await.unwrap().unwrap().unwrap();
    assert!(first.balances.is_empty());
    // Another merchant's change wakes nothing; this merchant's arrives at once.
    app.apply(&[event(&other, "2026-11-20", true, 5)]).await;
    app.apply(&[event(&m, "2026-11-20", true, 70)]).await;
    let (days, _) = days(&mut stream, 1).await;
    assert_eq!(days, [day("2026-11-20", 0, 70)]);
}
