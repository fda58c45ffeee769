//! The ledger's integration suite: a real gRPC client against a real server,
//! each test on a fresh database, every test run on SQLite and on PostgreSQL.

mod batch;
mod export;
mod helpers;
mod labels;
mod periods;
mod watch;

use std::{collections::HashSet, time::Duration};

use batch::{
    a_batch_books_replays_and_refuses_each_entry_on_its_own,
    a_full_batch_is_booked_exactly_and_a_rerun_replays_it,
};
use export::{
    a_client_that_stops_reading_does_not_wedge_the_server,
    an_export_names_its_bad_filters_before_sending_anything,
    an_export_streams_exactly_what_list_entries_pages_through,
};
use fluxo_proto::ledger_v1 as pb;
use fluxo_testing::{Backend, TestDb, backend_suite};
use helpers::{Options, credit, spawn_app, spawn_with, violated_fields};
use labels::{
    bad_metadata_is_refused_with_the_field_and_nothing_is_booked,
    entries_carry_metadata_and_lists_filter_on_it,
};
use periods::{
    a_closed_period_refuses_entries_dated_in_it_until_reopened,
    bookings_racing_a_close_are_either_in_its_digest_or_refused,
    closing_needs_the_close_scope_for_the_merchants_own_books,
    the_digest_recomputes_and_changes_when_a_row_is_changed_behind_fluxo,
};
use sea_orm::{ConnectionTrait, TransactionTrait};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;
use watch::{
    a_bad_watch_is_refused_naming_the_field_before_anything_is_sent,
    a_reader_that_stops_reading_is_cut_off_and_resumes_without_a_gap,
    a_watch_catches_up_follows_concurrent_writers_and_resumes_from_any_cursor,
    a_watch_closes_with_unavailable_when_the_server_drains,
    a_watch_from_the_end_sends_new_entries_and_heartbeats_while_idle,
    entries_come_in_numeric_transaction_order,
};

backend_suite!(
    records_reads_lists_and_reverses,
    replays_the_original_entry_even_after_a_restart,
    refuses_a_reused_key_with_a_different_request,
    fifty_concurrent_duplicates_book_exactly_one_entry,
    concurrent_records_share_commits_and_a_refused_one_fails_alone,
    names_every_invalid_field,
    paginates_without_skips_or_repeats_while_writing,
    enforces_the_reversal_rules,
    concurrent_reversals_book_at_most_one,
    concurrent_retries_of_one_reversal_all_get_that_reversal,
    commits_entry_and_outbox_event_together_or_not_at_all,
    is_not_serving_until_the_schema_is_current_and_after_shutdown_begins,
    finishes_in_flight_calls_during_graceful_shutdown,
    a_cancelled_deadline_writes_nothing,
    sheds_load_with_resource_exhausted_but_keeps_answering_health,
    rejects_oversized_messages,
    the_relay_publishes_every_event_once_and_a_failed_publish_keeps_them,
    entries_carry_metadata_and_lists_filter_on_it,
    bad_metadata_is_refused_with_the_field_and_nothing_is_booked,
    a_batch_books_replays_and_refuses_each_entry_on_its_own,
    a_full_batch_is_booked_exactly_and_a_rerun_replays_it,
    a_closed_period_refuses_entries_dated_in_it_until_reopened,
    closing_needs_the_close_scope_for_the_merchants_own_books,
    bookings_racing_a_close_are_either_in_its_digest_or_refused,
    the_digest_recomputes_and_changes_when_a_row_is_changed_behind_fluxo,
    an_export_streams_exactly_what_list_entries_pages_through,
    an_export_names_its_bad_filters_before_sending_anything,
    a_client_that_stops_reading_does_not_wedge_the_server,
    a_watch_catches_up_follows_concurrent_writers_and_resumes_from_any_cursor,
    a_watch_from_the_end_sends_new_entries_and_heartbeats_while_idle,
    a_bad_watch_is_refused_naming_the_field_before_anything_is_sent,
    a_reader_that_stops_reading_is_cut_off_and_resumes_without_a_gap,
    a_watch_closes_with_unavailable_when_the_server_drains,
    entries_come_in_numeric_transaction_order,
);

async fn records_reads_lists_and_reverses(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut client = app.client.clone();

    let entry = app.record(credit("m-1", "k-1", 1050)).await.unwrap();
    assert_eq!(entry.merchant_id, "m-1");
    assert_eq!(entry.r#type(), pb::EntryType::Credit);
    assert_eq!(entry.amount.as_ref().unwrap().minor_units, 1050);
    assert_eq!(entry.booking_date, "2026-11-20");
    assert_eq!(entry.id.len(), 26);
    assert!(entry.created_at.is_some());

    let read = client
        .get_entry(pb::GetEntryRequest { merchant_id: "m-1".into(), entry_id: entry.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read, entry);

    // Another merchant cannot see it.
    let other = client
        .get_entry(pb::GetEntryRequest { merchant_id: "m-2".into(), entry_id: entry.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::NotFound);

    let reversal = client
        .reverse_entry(pb::ReverseEntryRequest {
            merchant_id: "m-1".into(),
            entry_id: entry.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reversal.r#type(), pb::EntryType::Debit);
    assert_eq!(reversal.amount, entry.amount);
    assert_eq!(reversal.reverses_entry_id, entry.id);

    let listed = client
        .list_entries(pb::ListEntriesRequest { merchant_id: "m-1".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 2);
    assert_eq!(listed.entries[0].id, entry.id);
    assert_eq!(listed.entries[0].reversed_by_entry_id, reversal.id);
    assert!(listed.next_page_token.is_empty());

    // A booking date left out defaults to today.
    let today = app
        .record(pb::RecordEntryRequest { booking_date: String::new(), ..credit("m-1", "k-2", 1) })
        .await
        .unwrap();
    assert_eq!(today.booking_date, chrono::Utc::now().date_naive().format("%Y-%m-%d").to_string());
}

async fn replays_the_original_entry_even_after_a_restart(backend: Backend) {
    let app = spawn_app(backend).await;
    let first = app.record(credit("m-1", "k-1", 1050)).await.unwrap();
    let replay = app.client.clone().record_entry(credit("m-1", "k-1", 1050)).await.unwrap();
    assert_eq!(replay.metadata().get(fluxo_ledger::grpc::REPLAYED_HEADER).unwrap(), "true");
    assert_eq!(replay.into_inner(), first);

    // Restart: a new server and a new pool over the same database.
    let test_db = app.stop().await;
    let app = spawn_with(test_db, Options::default()).await;
    let again = app.record(credit("m-1", "k-1", 1050)).await.unwrap();
    assert_eq!(again, first);
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries").await, 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_outbox").await, 1);

    // The same key under another merchant is another key.
    let other = app.record(credit("m-2", "k-1", 1050)).await.unwrap();
    assert_ne!(other.id, first.id);
}

async fn refuses_a_reused_key_with_a_different_request(backend: Backend) {
    let app = spawn_app(backend).await;
    let first = app.record(credit("m-1", "k-1", 1050)).await.unwrap();
    let status = app.record(credit("m-1", "k-1", 2000)).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    let details = status.get_error_details();
    let info = details.error_info().expect("ErrorInfo detail");
    assert_eq!(info.reason, "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(info.metadata.get("entry_id"), Some(&first.id));
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries").await, 1);
}

async fn fifty_concurrent_duplicates_book_exactly_one_entry(backend: Backend) {
    let app = spawn_app(backend).await;
    let calls = (0..50).map(|_| {
        let mut client = app.client.clone();
        tokio::spawn(async move { client.record_entry(credit("m-1", "same-key", 777)).await })
    });
    let results = futures::future::join_all(calls).await;
    let ids: HashSet<String> =
        results.into_iter().map(|r| r.unwrap().expect("every duplicate succeeds").into_inner().id).collect();
    assert_eq!(ids.len(), 1, "all callers see the same entry");
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries").await, 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_outbox").await, 1);
}

async fn concurrent_records_share_commits_and_a_refused_one_fails_alone(backend: Backend) {
    let app = spawn_with(
        TestDb::new(backend).await,
        Options {
            group_commit: fluxo_ledger::GroupCommit { writers: 1, max_batch: 64 },
            ..Options::default()
        },
    )
    .await;
    refuse_outbox_events_of(&app, backend, "poison").await;
    let record = |merchant: String, key: String| {
        let mut client = app.client.clone();
        tokio::spawn(async move { client.record_entry(credit(&merchant, &key, 100)).await })
    };
    let mut calls: Vec<_> = (0..200).map(|i| record(format!("m-{}", i % 7), format!("k-{i}"))).collect();
    calls.insert(100, record("poison".into(), "k-poison".into()));
    let mut booked = HashSet::new();
    let mut refused = Vec::new();
    for call in futures::future::join_all(calls).await {
        match call.unwrap() {
            Ok(entry) => assert!(booked.insert(entry.into_inner().id)),
            Err(status) => refused.push(status),
        }
    }
    assert_eq!(booked.len(), 200, "every other entry is booked: {refused:?}");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].code(), Code::Internal);
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries").await, 200);
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_outbox").await, 200);
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_idempotency_keys").await, 200);
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries WHERE merchant_id = 'poison'").await, 0);
    // Entries booked in one transaction share its commit timestamp: with one
    // writer and 201 callers at once, they were booked in far fewer commits.
    let commits = app.count("SELECT COUNT(DISTINCT created_at) FROM ledger_entries").await;
    assert!(commits < 100, "{commits} commits for 200 entries");
}

/// Makes the outbox refuse `merchant`'s events (so booking them fails).
async fn refuse_outbox_events_of(app: &helpers::TestApp, backend: Backend, merchant: &str) {
    let create = match backend {
        Backend::Sqlite => format!(
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON ledger_outbox WHEN NEW.merchant_id = '{merchant}' \
             BEGIN SELECT RAISE(ABORT, 'outbox refused'); END;"
        ),
        Backend::Postgres => format!(
            "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.merchant_id = '{merchant}' THEN RAISE EXCEPTION 'outbox refused'; END IF; RETURN NEW; END $$; \
             CREATE TRIGGER refuse_poison BEFORE INSERT ON ledger_outbox FOR EACH ROW EXECUTE FUNCTION refuse_poison();"
        ),
    };
    app.db.conn().execute_unprepared(&create).await.unwrap();
}

async fn names_every_invalid_field(backend: Backend) {
    let app = spawn_app(backend).await;
    let base = || credit("m-1", "k-1", 100);
    let money = |code: &str, units: i64| Some(pb::Money { currency_code: code.into(), minor_units: units });
    let cases: Vec<(&str, pb::RecordEntryRequest, &str)> = vec![
        ("zero amount", pb::RecordEntryRequest { amount: money("BRL", 0), ..base() }, "amount.minor_units"),
        (
            "negative amount",
            pb::RecordEntryRequest { amount: money("BRL", -5), ..base() },
            "amount.minor_units",
        ),
        (
            "overflowing amount",
            pb::RecordEntryRequest { amount: money("BRL", i64::MAX), ..base() },
            "amount.minor_units",
        ),
        ("missing amount", pb::RecordEntryRequest { amount: None, ..base() }, "amount"),
        (
            "unknown currency",
            pb::RecordEntryRequest { amount: money("ZZZ", 1), ..base() },
            "amount.currency_code",
        ),
        (
            "lower-case currency",
            pb::RecordEntryRequest { amount: money("brl", 1), ..base() },
            "amount.currency_code",
        ),
        (
            "currency without minor units",
            pb::RecordEntryRequest { amount: money("XAU", 1), ..base() },
            "amount.currency_code",
        ),
        (
            "impossible date",
            pb::RecordEntryRequest { booking_date: "2026-02-30".into(), ..base() },
            "booking_date",
        ),
        (
            "badly formed date",
            pb::RecordEntryRequest { booking_date: "20/11/2026".into(), ..base() },
            "booking_date",
        ),
        (
            "date too far ahead",
            pb::RecordEntryRequest { booking_date: "2999-01-01".into(), ..base() },
            "booking_date",
        ),
        ("empty merchant", pb::RecordEntryRequest { merchant_id: String::new(), ..base() }, "merchant_id"),
        ("long merchant", pb::RecordEntryRequest { merchant_id: "m".repeat(65), ..base() }, "merchant_id"),
        (
            "merchant with spaces",
            pb::RecordEntryRequest { merchant_id: "m 1".into(), ..base() },
            "merchant_id",
        ),
        ("missing key", pb::RecordEntryRequest { request_id: String::new(), ..base() }, "request_id"),
        ("long key", pb::RecordEntryRequest { request_id: "k".repeat(129), ..base() }, "request_id"),
        (
            "long description",
            pb::RecordEntryRequest { description: "d".repeat(501), ..base() },
            "description",
        ),
        (
            "control characters",
            pb::RecordEntryRequest { description: "a\u{7}b".into(), ..base() },
            "description",
        ),
        ("unspecified type", pb::RecordEntryRequest { r#type: 0, ..base() }, "type"),
        ("unknown enum value", pb::RecordEntryRequest { r#type: 9, ..base() }, "type"),
    ];
    for (case, request, field) in cases {
        let status = app.record(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{case}");
        assert_eq!(violated_fields(&status), vec![field.to_owned()], "{case}: {}", status.message());
    }
    // Several bad fields are all reported at once.
    let status = app
        .record(pb::RecordEntryRequest {
            merchant_id: String::new(),
            amount: money("BRL", 0),
            request_id: String::new(),
            ..base()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["merchant_id", "amount.minor_units", "request_id"]);
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries").await, 0);

    let mut client = app.client.clone();
    let get = client
        .get_entry(pb::GetEntryRequest { merchant_id: "m-1".into(), entry_id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&get), ["entry_id"]);
    let list = |r: pb::ListEntriesRequest| {
        let mut client = app.client.clone();
        async move { client.list_entries(r).await.unwrap_err() }
    };
    let m = || pb::ListEntriesRequest { merchant_id: "m-1".into(), ..Default::default() };
    assert_eq!(
        violated_fields(&list(pb::ListEntriesRequest { page_size: 1001, ..m() }).await),
        ["page_size"]
    );
    assert_eq!(violated_fields(&list(pb::ListEntriesRequest { page_size: -1, ..m() }).await), ["page_size"]);
    assert_eq!(
        violated_fields(&list(pb::ListEntriesRequest { page_token: "forged".into(), ..m() }).await),
        ["page_token"]
    );
    assert_eq!(
        violated_fields(
            &list(pb::ListEntriesRequest {
                start_date: "2026-11-21".into(),
                end_date: "2026-11-01".into(),
                ..m()
            })
            .await
        ),
        ["end_date"]
    );
    let reverse = client
        .reverse_entry(pb::ReverseEntryRequest {
            merchant_id: "m-1".into(),
            entry_id: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&reverse), ["entry_id"]);
}

async fn paginates_without_skips_or_repeats_while_writing(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut seeded = HashSet::new();
    for i in 0..60 {
        let date = format!("2026-11-{:02}", 1 + i % 20);
        let e = app
            .record(pb::RecordEntryRequest {
                booking_date: date,
                ..credit("m-1", &format!("seed-{i}"), 100 + i)
            })
            .await
            .unwrap();
        seeded.insert(e.id);
    }
    // A writer keeps booking entries on every date, before and after the cursor.
    let writer = {
        let mut client = app.client.clone();
        tokio::spawn(async move {
            for i in 0..60 {
                let date = format!("2026-11-{:02}", 1 + (i * 7) % 20);
                let request =
                    pb::RecordEntryRequest { booking_date: date, ..credit("m-1", &format!("live-{i}"), 5) };
                client.record_entry(request).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut client = app.client.clone();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_entries(pb::ListEntriesRequest {
                merchant_id: "m-1".into(),
                start_date: "2026-11-01".into(),
                end_date: "2026-11-30".into(),
                page_size: 7,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 7);
        seen.extend(page.entries.into_iter().map(|e| (e.booking_date, e.id)));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    writer.await.unwrap();
    let ids: Vec<&String> = seen.iter().map(|(_, id)| id).collect();
    let unique: HashSet<&String> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no entry repeated");
    for id in &seeded {
        assert!(unique.contains(id), "seeded entry {id} skipped");
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "pages come in (booking_date, id) order");
    // Date filters bound the listing.
    let narrow = client
        .list_entries(pb::ListEntriesRequest {
            merchant_id: "m-1".into(),
            start_date: "2026-11-05".into(),
            end_date: "2026-11-05".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!narrow.entries.is_empty());
    assert!(narrow.entries.iter().all(|e| e.booking_date == "2026-11-05"));
}

async fn enforces_the_reversal_rules(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut client = app.client.clone();
    let original = app.record(credit("m-1", "k-1", 1050)).await.unwrap();
    let reverse = |entry_id: &str, key: &str| pb::ReverseEntryRequest {
        merchant_id: "m-1".into(),
        entry_id: entry_id.into(),
        request_id: key.into(),
        booking_date: "2026-11-21".into(),
        description: "customer refund".into(),
        ..Default::default()
    };

    let reversal = client.reverse_entry(reverse(&original.id, "r-1")).await.unwrap().into_inner();
    assert_eq!(reversal.booking_date, "2026-11-21");
    assert_eq!(reversal.description, "customer refund");
    assert_eq!(reversal.request_id, "r-1");

    // The same reversal with the same key replays.
    let replay = client.reverse_entry(reverse(&original.id, "r-1")).await.unwrap().into_inner();
    assert_eq!(replay, reversal);

    // A second reversal is refused, saying which reversal exists.
    let second = client.reverse_entry(reverse(&original.id, "r-2")).await.unwrap_err();
    assert_eq!(second.code(), Code::FailedPrecondition);
    let failure = second.get_error_details().precondition_failure().cloned().expect("PreconditionFailure");
    assert_eq!(failure.violations[0].r#type, "ALREADY_REVERSED");
    assert!(second.message().contains(&reversal.id));
    let without_key = client.reverse_entry(reverse(&original.id, "")).await.unwrap_err();
    assert_eq!(without_key.code(), Code::FailedPrecondition);

    // A reversal cannot be reversed.
    let of_reversal = client.reverse_entry(reverse(&reversal.id, "r-3")).await.unwrap_err();
    assert_eq!(of_reversal.code(), Code::FailedPrecondition);
    assert_eq!(
        of_reversal.get_error_details().precondition_failure().unwrap().violations[0].r#type,
        "IS_A_REVERSAL"
    );

    // Unknown entries are not found.
    let unknown = client.reverse_entry(reverse("01JD0000000000000000000000", "r-4")).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    // Nothing beyond the one reversal was booked, and failed attempts left their keys free.
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries").await, 2);
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_outbox").await, 2);
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_idempotency_keys WHERE request_id = 'r-2'").await, 0);
    let read = client
        .get_entry(pb::GetEntryRequest { merchant_id: "m-1".into(), entry_id: original.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.reversed_by_entry_id, reversal.id);
}

async fn concurrent_reversals_book_at_most_one(backend: Backend) {
    let app = spawn_app(backend).await;
    let original = app.record(credit("m-1", "k-1", 1050)).await.unwrap();
    let calls = (0..10).map(|i| {
        let mut client = app.client.clone();
        let request = pb::ReverseEntryRequest {
            merchant_id: "m-1".into(),
            entry_id: original.id.clone(),
            request_id: format!("r-{i}"),
            ..Default::default()
        };
        tokio::spawn(async move { client.reverse_entry(request).await })
    });
    let results = futures::future::join_all(calls).await;
    let (ok, refused): (Vec<_>, Vec<_>) = results.into_iter().map(|r| r.unwrap()).partition(Result::is_ok);
    assert_eq!(ok.len(), 1);
    assert!(refused.iter().all(|r| r.as_ref().unwrap_err().code() == Code::FailedPrecondition));
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries WHERE reverses_entry_id IS NOT NULL").await, 1);
}

/// A retry storm (the mesh's or the caller's) of one ReverseEntry: every copy
/// gets the reversal booked under its key, none is told "already reversed".
async fn concurrent_retries_of_one_reversal_all_get_that_reversal(backend: Backend) {
    let app = spawn_app(backend).await;
    for round in 0..3 {
        let original = app.record(credit("m-1", &format!("k-{round}"), 1050)).await.unwrap();
        let calls = (0..40).map(|_| {
            let mut client = app.client.clone();
            let request = pb::ReverseEntryRequest {
                merchant_id: "m-1".into(),
                entry_id: original.id.clone(),
                request_id: format!("r-{round}"),
                ..Default::default()
            };
            tokio::spawn(async move { client.reverse_entry(request).await })
        });
        let results = futures::future::join_all(calls).await;
        let ids: HashSet<String> = results
            .into_iter()
            .map(|r| match r.unwrap() {
                Ok(reply) => reply.into_inner().id,
                Err(status) => panic!("a retry of the same reversal failed: {status:?}"),
            })
            .collect();
        assert_eq!(ids.len(), 1, "every retry answers with the one reversal");
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries WHERE reverses_entry_id IS NOT NULL").await, 3);
}

async fn commits_entry_and_outbox_event_together_or_not_at_all(backend: Backend) {
    use prost::Message;
    let app = spawn_app(backend).await;
    let entry = app.record(credit("m-1", "k-1", 1050)).await.unwrap();

    // The committed event carries exactly the entry the API answered.
    let row = app
        .db
        .conn()
        .query_one_raw(sea_orm::Statement::from_string(
            app.db.backend(),
            format!("SELECT payload FROM ledger_outbox WHERE entry_id = '{}'", entry.id),
        ))
        .await
        .unwrap()
        .unwrap();
    let payload: Vec<u8> = row.try_get_by_index(0).unwrap();
    let event = pb::EntryRecorded::decode(payload.as_slice()).unwrap();
    assert_eq!(event.entry.as_ref(), Some(&entry));
    assert_eq!(event.event_id.len(), 26);

    // Make the outbox refuse one merchant's events: the entry must not land either.
    refuse_outbox_events_of(&app, backend, "poison").await;
    let failed = app.record(credit("poison", "k-p", 500)).await.unwrap_err();
    assert_eq!(failed.code(), Code::Internal);
    assert!(!failed.message().contains("outbox refused"), "internals stay hidden: {}", failed.message());
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries WHERE merchant_id = 'poison'").await, 0);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM ledger_idempotency_keys WHERE merchant_id = 'poison'").await,
        0
    );

    // Once the cause is gone, the same key books normally: nothing was half-written.
    let drop = match backend {
        Backend::Sqlite => "DROP TRIGGER refuse_poison;",
        Backend::Postgres => "DROP TRIGGER refuse_poison ON ledger_outbox; DROP FUNCTION refuse_poison();",
    };
    app.db.conn().execute_unprepared(drop).await.unwrap();
    let retried = app.record(credit("poison", "k-p", 500)).await.unwrap();
    assert_eq!(
        app.count(&format!("SELECT COUNT(*) FROM ledger_outbox WHERE entry_id = '{}'", retried.id)).await,
        1
    );
}

async fn is_not_serving_until_the_schema_is_current_and_after_shutdown_begins(backend: Backend) {
    let test_db = TestDb::new(backend).await;
    let mut app = spawn_with(
        test_db,
        Options { migrate: false, shutdown_delay: Duration::from_secs(2), ..Options::default() },
    )
    .await;
    let service = "fluxo.ledger.v1.LedgerService";
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(app.health("").await, ServingStatus::NotServing);
    assert_eq!(app.health(service).await, ServingStatus::NotServing);

    fluxo_ledger::LedgerStore::migrate(&app.db).await.unwrap();
    assert!(app.wait_health(service, ServingStatus::Serving, Duration::from_secs(5)).await);
    assert_eq!(app.health("").await, ServingStatus::Serving);

    app.begin_shutdown();
    assert!(app.wait_health("", ServingStatus::NotServing, Duration::from_secs(1)).await);
    assert_eq!(app.health(service).await, ServingStatus::NotServing);
    app.stop().await;
}

/// Opens a transaction that holds the idempotency key (merchant `m-1`, `key`),
/// so a RecordEntry with that key waits for it to end.
async fn hold_key(app: &helpers::TestApp, key: &str) -> sea_orm::DatabaseTransaction {
    let other = app.test_db.connect().await;
    let txn = other.conn().begin().await.unwrap();
    txn.execute_unprepared(&format!(
        "INSERT INTO ledger_idempotency_keys (merchant_id, request_id, fingerprint, entry_id, created_at) \
         VALUES ('m-1', '{key}', 'x', '01JD0000000000000000000000', '2026-11-21 00:00:00+00')"
    ))
    .await
    .unwrap();
    txn
}

async fn finishes_in_flight_calls_during_graceful_shutdown(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let blocker = hold_key(&app, "k-slow").await;
    let in_flight = {
        let mut client = app.client.clone();
        tokio::spawn(async move { client.record_entry(credit("m-1", "k-slow", 900)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!in_flight.is_finished(), "the call is waiting on the held key");

    app.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;
    blocker.rollback().await.unwrap();

    let entry = in_flight.await.unwrap().expect("the in-flight call completes").into_inner();
    assert_eq!(entry.request_id, "k-slow");
    let server = app.server.take().unwrap();
    tokio::time::timeout(Duration::from_secs(5), server).await.expect("server exits").unwrap().unwrap();
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries").await, 1);
}

async fn a_cancelled_deadline_writes_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let blocker = hold_key(&app, "k-late").await;
    let mut request = tonic::Request::new(credit("m-1", "k-late", 900));
    request.set_timeout(Duration::from_millis(300));
    let status = app.client.clone().record_entry(request).await.unwrap_err();
    assert!(matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded), "{status:?}");
    blocker.rollback().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries").await, 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_idempotency_keys").await, 0);
    // The caller's retry with the same key books it once.
    app.record(credit("m-1", "k-late", 900)).await.unwrap();
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries").await, 1);
}

async fn sheds_load_with_resource_exhausted_but_keeps_answering_health(backend: Backend) {
    let app =
        spawn_with(TestDb::new(backend).await, Options { max_concurrent_requests: 1, ..Options::default() })
            .await;
    assert!(app.wait_health("", ServingStatus::Serving, Duration::from_secs(5)).await);
    let blocker = hold_key(&app, "k-busy").await;
    let busy = {
        let mut client = app.client.clone();
        tokio::spawn(async move { client.record_entry(credit("m-1", "k-busy", 1)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let shed = app.record(credit("m-1", "k-other", 1)).await.unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted);
    assert_eq!(app.health("").await, ServingStatus::Serving, "probes are never shed");
    blocker.rollback().await.unwrap();
    busy.await.unwrap().unwrap();
    // Capacity is back once the call finished.
    app.record(credit("m-1", "k-other", 1)).await.unwrap();
}

async fn rejects_oversized_messages(backend: Backend) {
    let app = spawn_app(backend).await;
    // The test server accepts 64 KiB messages.
    let huge = pb::RecordEntryRequest { description: "x".repeat(100 * 1024), ..credit("m-1", "k-1", 1) };
    let status = app.record(huge).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries").await, 0);
}

/// The relay's outlet in this test: records what it is given, or refuses it.
#[derive(Default)]
struct RecordingSink {
    refuse: std::sync::atomic::AtomicBool,
    batches: std::sync::Mutex<Vec<Vec<(i64, String)>>>,
}

#[async_trait::async_trait]
impl fluxo_queue::EventSink for RecordingSink {
    async fn publish(&self, events: &[fluxo_queue::StreamEvent]) -> Result<(), fluxo_queue::PublishError> {
        // Long enough for a second relay to look for work meanwhile.
        tokio::time::sleep(Duration::from_millis(5)).await;
        if self.refuse.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(fluxo_queue::PublishError::Consumer("the stream is down".into()));
        }
        self.batches.lock().unwrap().push(events.iter().map(|e| (e.position, e.event_id.clone())).collect());
        Ok(())
    }
}

async fn the_relay_publishes_every_event_once_and_a_failed_publish_keeps_them(backend: Backend) {
    use std::sync::{Arc, atomic::Ordering};

    use fluxo_ledger::relay::{Relay, RelayConfig};

    let app = spawn_app(backend).await;
    let calls = (0..300).map(|i| app.record(credit(&format!("m-{}", i % 7), &format!("k-{i}"), 100 + i)));
    let booked: Vec<_> =
        futures::StreamExt::collect(futures::StreamExt::buffer_unordered(futures::stream::iter(calls), 32))
            .await;
    assert!(booked.iter().all(Result::is_ok));
    let sink = Arc::new(RecordingSink::default());
    let config = RelayConfig { batch_size: 40, ..RelayConfig::default() };
    let relay = || Relay::new(app.db.clone(), sink.clone(), config.clone(), Arc::default());
    let unpublished = "SELECT COUNT(*) FROM ledger_outbox WHERE published_at IS NULL";

    // The stream refuses: the batch stays unpublished, to be published later.
    sink.refuse.store(true, Ordering::SeqCst);
    assert!(relay().publish_batch().await.is_err());
    assert_eq!(app.count(unpublished).await, 300);
    sink.refuse.store(false, Ordering::SeqCst);

    // On PostgreSQL relays run side by side (each claims what the others have
    // not); SQLite has one per process.
    let relays = if backend == Backend::Postgres { 3 } else { 1 };
    let drain = |relay: Relay| async move { while relay.publish_batch().await.unwrap() > 0 {} };
    futures::future::join_all((0..relays).map(|_| drain(relay()))).await;
    assert_eq!(app.count(unpublished).await, 0);

    let batches = sink.batches.lock().unwrap().clone();
    assert!(batches.iter().all(|b| b.len() <= 40 && b.is_sorted()), "batches in position order");
    let published: Vec<String> = batches.into_iter().flatten().map(|(_, id)| id).collect();
    let unique: HashSet<&String> = published.iter().collect();
    assert_eq!((published.len(), unique.len()), (300, 300), "every event published exactly once");
    let row = app
        .db
        .conn()
        .query_all_raw(sea_orm::Statement::from_string(
            app.db.backend(),
            "SELECT event_id FROM ledger_outbox",
        ))
        .await
        .unwrap();
    let stored: HashSet<String> = row.iter().map(|r| r.try_get_by_index(0).unwrap()).collect();
    assert_eq!(stored, published.into_iter().collect::<HashSet<_>>());
}
