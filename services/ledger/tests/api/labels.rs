//! Metadata on entries and the filters of ListEntries, on both backends.

use std::collections::HashMap;

use fluxo_proto::ledger_v1 as pb;
use fluxo_testing::Backend;
use sea_orm::ConnectionTrait;
use tonic::Code;

use crate::helpers::{TestApp, credit, spawn_app, violated_fields};

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn labelled(key: &str, kind: pb::EntryType, date: &str, pairs: &[(&str, &str)]) -> pb::RecordEntryRequest {
    pb::RecordEntryRequest {
        r#type: kind.into(),
        booking_date: date.into(),
        metadata: labels(pairs),
        ..credit("m-1", key, 100)
    }
}

/// Every page of a list, following the tokens; the ids in order.
async fn list_all(app: &TestApp, request: pb::ListEntriesRequest) -> Vec<pb::Entry> {
    let mut client = app.client.clone();
    let mut token = String::new();
    let mut all = Vec::new();
    loop {
        let page = client
            .list_entries(pb::ListEntriesRequest { page_token: token.clone(), ..request.clone() })
            .await
            .unwrap()
            .into_inner();
        all.extend(page.entries);
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
}

fn m1() -> pb::ListEntriesRequest {
    pb::ListEntriesRequest { merchant_id: "m-1".into(), page_size: 2, ..Default::default() }
}

pub(crate) async fn entries_carry_metadata_and_lists_filter_on_it(backend: Backend) {
    use pb::EntryType::{Credit, Debit};
    let app = spawn_app(backend).await;
    let mut client = app.client.clone();

    // Order A-1 spans three days and both types; other entries do not carry it.
    let a = app
        .record(labelled("k-1", Credit, "2026-11-03", &[("order", "A-1"), ("channel", "pos")]))
        .await
        .unwrap();
    let b = app.record(labelled("k-2", Debit, "2026-11-01", &[("order", "A-1")])).await.unwrap();
    let c = app.record(labelled("k-3", Credit, "2026-11-02", &[("order", "A-2")])).await.unwrap();
    let d = app
        .record(labelled("k-4", Credit, "2026-11-02", &[("order", "A-1"), ("channel", "web")]))
        .await
        .unwrap();
    let e = app.record(labelled("k-5", Debit, "2026-11-04", &[])).await.unwrap();
    let f = app.record(labelled("k-6", Credit, "2026-11-05", &[("order", "A-1")])).await.unwrap();
    assert_eq!(a.metadata, labels(&[("order", "A-1"), ("channel", "pos")]));

    // Read back exactly as booked.
    let read = client
        .get_entry(pb::GetEntryRequest { merchant_id: "m-1".into(), entry_id: a.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read, a);

    // The labels are part of what a replay must repeat.
    let replay =
        app.record(labelled("k-1", Credit, "2026-11-03", &[("channel", "pos"), ("order", "A-1")])).await;
    assert_eq!(replay.unwrap().id, a.id);
    let changed =
        app.record(labelled("k-1", Credit, "2026-11-03", &[("order", "A-9"), ("channel", "pos")])).await;
    assert_eq!(changed.unwrap_err().code(), Code::AlreadyExists);

    let ids = |entries: Vec<pb::Entry>| entries.into_iter().map(|e| e.id).collect::<Vec<_>>();
    // The list order: booking date, then id (ids made in the same millisecond sort at random).
    let order = |entries: &[&pb::Entry]| {
        let mut sorted: Vec<_> = entries.iter().map(|e| (e.booking_date.clone(), e.id.clone())).collect();
        sorted.sort();
        sorted.into_iter().map(|(_, id)| id).collect::<Vec<_>>()
    };
    // A label alone (read in the label index's own order), paged two at a time.
    let by_order = pb::ListEntriesRequest { metadata: labels(&[("order", "A-1")]), ..m1() };
    assert_eq!(
        ids(list_all(&app, by_order.clone()).await),
        [b.id.as_str(), d.id.as_str(), a.id.as_str(), f.id.as_str()]
    );
    // Within dates.
    let dated = pb::ListEntriesRequest {
        start_date: "2026-11-02".into(),
        end_date: "2026-11-03".into(),
        ..by_order.clone()
    };
    assert_eq!(ids(list_all(&app, dated).await), [d.id.as_str(), a.id.as_str()]);
    // Two labels: both must match.
    let two = pb::ListEntriesRequest { metadata: labels(&[("order", "A-1"), ("channel", "web")]), ..m1() };
    assert_eq!(ids(list_all(&app, two).await), [d.id.as_str()]);
    // A label and a type.
    let credits_of_a1 = pb::ListEntriesRequest { r#type: Credit.into(), ..by_order.clone() };
    assert_eq!(ids(list_all(&app, credits_of_a1).await), [d.id.as_str(), a.id.as_str(), f.id.as_str()]);
    // A type alone.
    let debits = pb::ListEntriesRequest { r#type: Debit.into(), ..m1() };
    assert_eq!(ids(list_all(&app, debits).await), [b.id.as_str(), e.id.as_str()]);
    // A label nobody carries.
    let none = pb::ListEntriesRequest { metadata: labels(&[("order", "Z")]), ..m1() };
    assert!(list_all(&app, none).await.is_empty());
    // Another merchant's label of the same value is not listed.
    app.record(pb::RecordEntryRequest { metadata: labels(&[("order", "A-1")]), ..credit("m-2", "k-1", 5) })
        .await
        .unwrap();
    assert_eq!(list_all(&app, by_order.clone()).await.len(), 4);

    // Insertion time: entries committed at or after the instant of c, and before that of e.
    let (from, to) = (c.created_at.unwrap(), e.created_at.unwrap());
    let window = pb::ListEntriesRequest { created_after: Some(from), created_before: Some(to), ..m1() };
    assert_eq!(ids(list_all(&app, window).await), order(&[&c, &d]));
    let since = pb::ListEntriesRequest { created_after: Some(to), ..m1() };
    assert_eq!(ids(list_all(&app, since).await), [e.id.as_str(), f.id.as_str()]);

    // A token only pages the query it was issued for.
    let first = client.list_entries(by_order.clone()).await.unwrap().into_inner();
    let other =
        pb::ListEntriesRequest { page_token: first.next_page_token, r#type: Debit.into(), ..by_order };
    assert_eq!(violated_fields(&client.list_entries(other).await.unwrap_err()), ["page_token"]);

    // A reversal carries its own labels, not those of what it reverses.
    let reversal = client
        .reverse_entry(pb::ReverseEntryRequest {
            merchant_id: "m-1".into(),
            entry_id: c.id.clone(),
            metadata: labels(&[("reason", "duplicate")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reversal.metadata, labels(&[("reason", "duplicate")]));
    let reasons = pb::ListEntriesRequest { metadata: labels(&[("reason", "duplicate")]), ..m1() };
    assert_eq!(ids(list_all(&app, reasons).await), [reversal.id]);
}

pub(crate) async fn bad_metadata_is_refused_with_the_field_and_nothing_is_booked(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut client = app.client.clone();
    let bad = |pairs: &[(&str, &str)]| pb::RecordEntryRequest {
        metadata: labels(pairs),
        ..credit("m-1", "k-1", 1)
    };

    let status = app.record(bad(&[("order", "")])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["metadata[order]"]);
    let status = app.record(bad(&[("bad key", "x")])).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["metadata"]);
    assert!(status.message().contains("bad key"), "{}", status.message());
    let long = "v".repeat(257);
    assert_eq!(violated_fields(&app.record(bad(&[("note", &long)])).await.unwrap_err()), ["metadata[note]"]);
    let keys: Vec<String> = (0..17).map(|i| format!("k{i}")).collect();
    let many: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "v")).collect();
    assert_eq!(violated_fields(&app.record(bad(&many)).await.unwrap_err()), ["metadata"]);
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entries").await, 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entry_metadata").await, 0);
    // The key was not used up by the refusals.
    assert!(app.record(bad(&many[..16])).await.is_ok());
    assert_eq!(app.count("SELECT COUNT(*) FROM ledger_entry_metadata").await, 16);

    // Filters name their bad fields too.
    let list = pb::ListEntriesRequest {
        merchant_id: "m-1".into(),
        r#type: 7,
        metadata: labels(&[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4"), ("e", "5")]),
        created_after: Some(prost_types::Timestamp { seconds: 10, nanos: 0 }),
        created_before: Some(prost_types::Timestamp { seconds: 5, nanos: 0 }),
        ..Default::default()
    };
    let status = client.list_entries(list).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["type", "metadata", "created_before"]);

    // Labels are as immutable as the entries they belong to.
    let update = app.db.conn().execute_unprepared("UPDATE ledger_entry_metadata SET value = 'changed'").await;
    assert!(update.is_err(), "labels must not be updatable");
}
