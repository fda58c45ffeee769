//! BatchRecordEntries on both backends: each entry answered on its own.

use fluxo_proto::ledger_v1::{self as pb, batch_record_result::Outcome};
use fluxo_testing::Backend;
use prost::Message;
use tonic::Code;

use crate::helpers::{credit, spawn_app};

fn batch(requests: Vec<pb::RecordEntryRequest>) -> pb::BatchRecordEntriesRequest {
    pb::BatchRecordEntriesRequest { merchant_id: "m-1".into(), requests }
}

/// The fields a refused result's BadRequest names.
fn refused_fields(result: &pb::BatchRecordResult) -> Vec<String> {
    let status = result.error.as_ref().expect("a refused entry carries its status");
    status
        .details
        .iter()
        .filter(|d| d.type_url.ends_with("google.rpc.BadRequest"))
        .flat_map(|d| {
            fluxo_proto::google::rpc::BadRequest::decode(d.value.as_slice()).unwrap().field_violations
        })
        .map(|v| v.field)
        .collect()
}

pub(crate) async fn a_batch_books_replays_and_refuses_each_entry_on_its_own(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut client = app.client.clone();
    let earlier = app.record(credit("m-1", "k-earlier", 700)).await.unwrap();

    let bad_amount = pb::RecordEntryRequest {
        amount: Some(pb::Money { currency_code: "XYZ".into(), minor_units: 0 }),
        ..credit("m-1", "k-bad", 1)
    };
    let other_merchant = credit("m-2", "k-other", 5);
    let reused_key = credit("m-1", "k-earlier", 999);
    let requests = vec![
        credit("", "k-1", 100),
        credit("m-1", "k-earlier", 700),
        bad_amount,
        other_merchant,
        credit("m-1", "k-2", 200),
        // The same key twice in one batch: booked once, the repeat replays it.
        credit("m-1", "k-2", 200),
        reused_key,
    ];
    let results = client.batch_record_entries(batch(requests)).await.unwrap().into_inner().results;
    let outcomes: Vec<Outcome> = results.iter().map(|r| r.outcome()).collect();
    assert_eq!(
        outcomes,
        [
            Outcome::Booked,
            Outcome::Replayed,
            Outcome::Refused,
            Outcome::Refused,
            Outcome::Booked,
            Outcome::Replayed,
            Outcome::Refused
        ]
    );
    assert_eq!(results[0].entry.as_ref().unwrap().merchant_id, "m-1", "an empty merchant is the batch's");
    assert_eq!(results[1].entry.as_ref().unwrap().id, earlier.id);
    assert_eq!(results[5].entry.as_ref().unwrap().id, results[4].entry.as_ref().unwrap().id);
    assert_eq!(
        refused_fields(&results[2]),
        ["requests[2].amount.currency_code", "requests[2].amount.minor_units"]
    );
    assert_eq!(results[2].error.as_ref().unwrap().code, Code::InvalidArgument as i32);
    assert_eq!(refused_fields(&results[3]), ["requests[3].merchant_id"]);
    assert_eq!(results[6].error.as_ref().unwrap().code, Code::AlreadyExists as i32);
    // Only the booked ones were written: the earlier entry, k-1 and k-2.
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries").await, 3);
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_outbox").await, 3);
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries WHERE merchant_id = 'm-2'").await, 0);

    // The batch itself must be well formed.
    for (requests, field) in [(vec![], "requests"), (vec![credit("m-1", "x", 1); 1001], "requests")] {
        let status = client.batch_record_entries(batch(requests)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(crate::helpers::violated_fields(&status), [field]);
    }
    let status = client
        .batch_record_entries(pb::BatchRecordEntriesRequest {
            merchant_id: String::new(),
            requests: vec![credit("", "k-3", 1)],
        })
        .await
        .unwrap_err();
    assert_eq!(crate::helpers::violated_fields(&status), ["merchant_id"]);
    app.stop().await;
}

pub(crate) async fn a_full_batch_is_booked_exactly_and_a_rerun_replays_it(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut client = app.client.clone();
    let requests: Vec<_> = (0..1000)
        .map(|i| pb::RecordEntryRequest {
            description: String::new(),
            booking_date: format!("2026-10-{:02}", 1 + i % 28),
            ..credit("", &format!("imp-{i}"), 1 + i64::from(i))
        })
        .collect();
    let first = client.batch_record_entries(batch(requests.clone())).await.unwrap().into_inner().results;
    assert!(first.iter().all(|r| r.outcome() == Outcome::Booked));
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries").await, 1000);
    let sum = app.count("SELECT CAST(SUM(amount_minor) AS BIGINT) FROM ledger_entries").await;
    assert_eq!(sum, (1..=1000).sum::<i64>());
    // An interrupted import sent again: every entry replays, nothing is booked twice.
    let again = client.batch_record_entries(batch(requests)).await.unwrap().into_inner().results;
    assert!(again.iter().all(|r| r.outcome() == Outcome::Replayed));
    let ids =
        |rs: &[pb::BatchRecordResult]| rs.iter().map(|r| r.entry.clone().unwrap().id).collect::<Vec<_>>();
    assert_eq!(ids(&again), ids(&first));
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries").await, 1000);
    assert_eq!(app.count("SELECT credits_minor FROM ledger_totals").await, (1..=1000).sum::<i64>());
    app.stop().await;
}
