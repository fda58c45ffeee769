//! Period close on both backends: closed books refuse what is dated in them,
//! reopening is explicit and recorded, and the close's digest is what a
//! recomputation from the rows gives — until a row is changed behind fluxo's back.

use fluxo_ledger::{LedgerStore, domain::MerchantId};
use fluxo_proto::ledger_v1::{self as pb, batch_record_result::Outcome};
use fluxo_testing::Backend;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{TestApp, credit, spawn_app, violated_fields};

fn dated(key: &str, date: &str, minor_units: i64) -> pb::RecordEntryRequest {
    pb::RecordEntryRequest { booking_date: date.into(), ..credit("m-1", key, minor_units) }
}

async fn close(app: &TestApp, through: &str) -> Result<pb::PeriodClose, tonic::Status> {
    let request = pb::ClosePeriodRequest {
        merchant_id: "m-1".into(),
        closed_through: through.into(),
        note: "test".into(),
    };
    app.client.clone().close_period(request).await.map(tonic::Response::into_inner)
}

/// The precondition a refusal names, and its message.
fn precondition(status: &tonic::Status) -> (String, String) {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let details = status.get_error_details();
    let violation = &details.precondition_failure().expect("a PreconditionFailure").violations[0];
    (violation.r#type.clone(), status.message().to_owned())
}

pub(crate) async fn a_closed_period_refuses_entries_dated_in_it_until_reopened(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut client = app.client.clone();
    let first = app.record(dated("k-1", "2026-11-01", 1000)).await.unwrap();
    app.record(dated("k-2", "2026-11-02", 250)).await.unwrap();
    app.record(pb::RecordEntryRequest {
        r#type: pb::EntryType::Debit.into(),
        ..dated("k-3", "2026-11-03", 50)
    })
    .await
    .unwrap();

    let closed = close(&app, "2026-11-02").await.unwrap();
    assert_eq!(closed.closed_through, "2026-11-02");
    assert_eq!(closed.previous_closed_through, "");
    assert_eq!(closed.entry_count, 2);
    assert_eq!(closed.digest.len(), 64);
    assert_eq!(closed.note, "test");
    assert_eq!(closed.closing_balances, [pb::Money { currency_code: "BRL".into(), minor_units: 1250 }]);

    // Dated in the closed period: refused, naming the closed-through date; nothing written.
    let before = app.count("SELECT COUNT(*) FROM ledger_entries").await;
    let refused = app.record(dated("k-4", "2026-11-02", 10)).await.unwrap_err();
    let (kind, message) = precondition(&refused);
    assert_eq!(kind, "PERIOD_CLOSED");
    assert!(message.contains("closed through 2026-11-02"), "{message}");
    // A retry of what was booked before the close still replays it.
    assert_eq!(app.record(dated("k-1", "2026-11-01", 1000)).await.unwrap().id, first.id);
    // A batch: the open day books, the closed one is refused on its own.
    let results = client
        .batch_record_entries(pb::BatchRecordEntriesRequest {
            merchant_id: "m-1".into(),
            requests: vec![dated("k-5", "2026-11-01", 1), dated("k-6", "2026-11-03", 1)],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.iter().map(|r| r.outcome()).collect::<Vec<_>>(), [Outcome::Refused, Outcome::Booked]);
    assert_eq!(results[0].error.as_ref().unwrap().code, Code::FailedPrecondition as i32);
    assert!(results[0].error.as_ref().unwrap().message.contains("2026-11-02"));
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries").await, before + 1);
    // Its key was not used up: once the date is fixed the same key books.
    app.record(dated("k-5", "2026-11-04", 1)).await.unwrap();

    // A reversal dated in the closed period is refused; the correction goes into the open period.
    let reverse = |date: &str, key: &str| pb::ReverseEntryRequest {
        merchant_id: "m-1".into(),
        entry_id: first.id.clone(),
        request_id: key.into(),
        booking_date: date.into(),
        ..Default::default()
    };
    let refused = client.reverse_entry(reverse("2026-11-02", "r-1")).await.unwrap_err();
    assert_eq!(precondition(&refused).0, "PERIOD_CLOSED");
    let correction = client.reverse_entry(reverse("2026-11-05", "r-2")).await.unwrap().into_inner();
    assert_eq!(correction.reverses_entry_id, first.id);

    // Closing no later than the close in force, or in the future, is refused.
    assert_eq!(precondition(&close(&app, "2026-11-01").await.unwrap_err()).0, "ALREADY_CLOSED");
    let future = close(&app, "2999-01-01").await.unwrap_err();
    assert_eq!(violated_fields(&future), ["closed_through"]);

    // Reopening needs a reason, is recorded, and lets the period take entries again.
    let reopen = |reason: &str| pb::ReopenPeriodRequest { merchant_id: "m-1".into(), reason: reason.into() };
    assert_eq!(violated_fields(&client.reopen_period(reopen("")).await.unwrap_err()), ["reason"]);
    let reopened = client.reopen_period(reopen("late bank statement")).await.unwrap().into_inner();
    assert_eq!(reopened.id, closed.id);
    assert_eq!(reopened.reopen_reason, "late bank statement");
    assert!(reopened.reopened_at.is_some());
    app.record(dated("k-4", "2026-11-02", 10)).await.unwrap();
    assert_eq!(precondition(&client.reopen_period(reopen("again")).await.unwrap_err()).0, "NOT_CLOSED");

    // A later close sees what was booked in between; the history keeps both, newest first.
    let second = close(&app, "2026-11-03").await.unwrap();
    assert_eq!(second.entry_count, 5, "k-1, k-2, k-3, k-4 and k-6");
    let listed = client
        .list_period_closes(pb::ListPeriodClosesRequest { merchant_id: "m-1".into() })
        .await
        .unwrap()
        .into_inner()
        .closes;
    assert_eq!(
        listed.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        [second.id.clone(), closed.id.clone()]
    );
    assert_eq!(listed[1].reopen_reason, "late bank statement");
    app.stop().await;
}

pub(crate) async fn closing_needs_the_close_scope_for_the_merchants_own_books(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut client = app.client.clone();
    app.record(dated("k-1", "2026-11-01", 1)).await.unwrap();
    let as_caller = |merchants: &str, closer: bool| {
        let mut request = tonic::Request::new(pb::ClosePeriodRequest {
            merchant_id: "m-1".into(),
            closed_through: "2026-11-01".into(),
            note: String::new(),
        });
        let m = request.metadata_mut();
        m.insert("x-fluxo-subject", "accountant".parse().unwrap());
        m.insert("x-fluxo-merchants", merchants.parse().unwrap());
        if closer {
            m.insert("x-fluxo-closer", "true".parse().unwrap());
        }
        request
    };
    let denied = client.close_period(as_caller("m-1", false)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("fluxo:close"), "{}", denied.message());
    let other = client.close_period(as_caller("m-2", true)).await.unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    let closed = client.close_period(as_caller("m-1", true)).await.unwrap().into_inner();
    assert_eq!(closed.closed_by, "accountant");
    app.stop().await;
}

pub(crate) async fn bookings_racing_a_close_are_either_in_its_digest_or_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let merchant = MerchantId::parse("m-1").unwrap();
    app.record(dated("seed", "2026-11-01", 1)).await.unwrap();
    // Writers keep booking into the period while it closes.
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let app_client = app.client.clone();
            tokio::spawn(async move {
                let mut outcomes = (0, 0);
                for i in 0..40 {
                    let request = dated(&format!("w{w}-{i}"), "2026-11-01", 1);
                    match app_client.clone().record_entry(request).await {
                        Ok(_) => outcomes.0 += 1,
                        Err(status) if status.code() == Code::FailedPrecondition => outcomes.1 += 1,
                        Err(status) => panic!("{status:?}"),
                    }
                }
                outcomes
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let closed = close(&app, "2026-11-01").await.unwrap();
    let mut booked = 1;
    for writer in writers {
        booked += writer.await.unwrap().0;
    }
    // Nothing landed in the period after its digest was taken.
    assert_eq!(closed.entry_count, booked);
    let store = LedgerStore::new(app.db.clone());
    let now =
        store.books_digest(&merchant, chrono::NaiveDate::from_ymd_opt(2026, 11, 1).unwrap()).await.unwrap();
    assert_eq!(now.digest, closed.digest);
    assert_eq!(now.entry_count, booked);
    app.stop().await;
}

pub(crate) async fn the_digest_recomputes_and_changes_when_a_row_is_changed_behind_fluxo(backend: Backend) {
    let app = spawn_app(backend).await;
    let merchant = MerchantId::parse("m-1").unwrap();
    let through = chrono::NaiveDate::from_ymd_opt(2026, 11, 2).unwrap();
    let labelled = pb::RecordEntryRequest {
        metadata: [("order".to_owned(), "A-1".to_owned())].into(),
        ..dated("k-2", "2026-11-02", 300)
    };
    app.record(dated("k-1", "2026-11-01", 1000)).await.unwrap();
    let target = app.record(labelled).await.unwrap();
    let closed = close(&app, "2026-11-02").await.unwrap();
    let store = LedgerStore::new(app.db.clone());
    assert_eq!(store.books_digest(&merchant, through).await.unwrap().digest, closed.digest);
    let recorded = store.close_days(&closed.id).await.unwrap();
    assert_eq!(recorded.len(), 2);
    assert_eq!(fluxo_ledger::domain::BooksDigest::digest_of(&recorded), closed.digest);

    // Someone with the database's keys edits a closed entry's description.
    let sql: &[&str] = match app.db.backend() {
        DbBackend::Postgres => &[
            "ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_immutable",
            "UPDATE ledger_entries SET description = 'edited' WHERE request_id = 'k-2'",
            "ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_immutable",
        ],
        _ => &[
            "DROP TRIGGER ledger_entries_no_update",
            "UPDATE ledger_entries SET description = 'edited' WHERE request_id = 'k-2'",
        ],
    };
    for statement in sql {
        app.db
            .conn()
            .execute_raw(Statement::from_string(app.db.backend(), (*statement).to_owned()))
            .await
            .unwrap();
    }
    let now = store.books_digest(&merchant, through).await.unwrap();
    assert_ne!(now.digest, closed.digest);
    let differences = fluxo_ledger::domain::compare(&recorded, &now.days);
    assert_eq!(differences.len(), 1, "{differences:?}");
    assert!(
        matches!(&differences[0], fluxo_ledger::domain::Difference::Changed { recorded, now }
            if recorded.date == through && recorded.credits == now.credits && recorded.digest != now.digest),
        "{differences:?}"
    );
    // The figures a close recorded cannot be rewritten through fluxo's tables either.
    let rewrite = app
        .db
        .conn()
        .execute_raw(Statement::from_string(
            app.db.backend(),
            format!("UPDATE ledger_period_close_days SET credits_minor = 1 WHERE close_id = '{}'", closed.id),
        ))
        .await;
    assert!(rewrite.is_err(), "close figures are immutable");
    let delete = app
        .db
        .conn()
        .execute_raw(Statement::from_string(app.db.backend(), "DELETE FROM ledger_period_closes".to_owned()))
        .await;
    assert!(delete.is_err(), "closes are kept");
    let _ = target;
    app.stop().await;
}
