//! ExportEntries on both backends: the whole of ListEntries, streamed.

use std::{collections::HashMap, time::Duration};

use fluxo_proto::ledger_v1::{self as pb, ledger_service_client::LedgerServiceClient};
use fluxo_testing::Backend;
use tonic::{Code, transport::Channel};

use crate::helpers::{TestApp, spawn_app, violated_fields};

const DATES: [&str; 6] = ["2026-10-30", "2026-10-31", "2026-11-01", "2026-11-02", "2026-11-03", "2026-11-04"];

/// Books `n` entries for m-1 over six dates, both types, some labelled, in batches.
async fn seed(app: &TestApp, n: usize) {
    let mut client = app.client.clone();
    let requests: Vec<pb::RecordEntryRequest> = (0..n)
        .map(|i| {
            let kind = if i % 3 == 0 { pb::EntryType::Debit } else { pb::EntryType::Credit };
            let mut metadata = HashMap::new();
            if i % 2 == 0 {
                metadata.insert("channel".to_owned(), if i % 4 == 0 { "web" } else { "pos" }.to_owned());
            }
            pb::RecordEntryRequest {
                merchant_id: String::new(),
                r#type: kind.into(),
                amount: Some(pb::Money { currency_code: "BRL".into(), minor_units: 100 + i as i64 }),
                booking_date: DATES[(i * 7) % DATES.len()].into(),
                description: format!("sale {i}, \"quoted\"; with a comma"),
                request_id: format!("k-{i}"),
                metadata,
            }
        })
        .collect();
    // Batches well within the test server's 64 KiB message limit.
    for batch in requests.chunks(200) {
        let results = client
            .batch_record_entries(pb::BatchRecordEntriesRequest {
                merchant_id: "m-1".into(),
                requests: batch.to_vec(),
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        for r in &results {
            assert!(r.entry.is_some(), "a seeded entry was refused: {:?}", r.error);
        }
    }
}

/// Every page of a list, following the tokens.
async fn list_all(
    client: &mut LedgerServiceClient<Channel>,
    request: pb::ListEntriesRequest,
) -> Vec<pb::Entry> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_entries(pb::ListEntriesRequest { page_token: token, page_size: 1000, ..request.clone() })
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

/// The export's messages, each as received.
async fn export(
    client: &mut LedgerServiceClient<Channel>,
    request: pb::ExportEntriesRequest,
) -> Vec<pb::ExportEntriesResponse> {
    let mut stream = client.export_entries(request).await.unwrap().into_inner();
    let mut messages = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        messages.push(message);
    }
    messages
}

fn the_same_filters(e: &pb::ExportEntriesRequest) -> pb::ListEntriesRequest {
    pb::ListEntriesRequest {
        merchant_id: e.merchant_id.clone(),
        start_date: e.start_date.clone(),
        end_date: e.end_date.clone(),
        r#type: e.r#type,
        metadata: e.metadata.clone(),
        created_after: e.created_after,
        created_before: e.created_before,
        ..Default::default()
    }
}

pub(crate) async fn an_export_streams_exactly_what_list_entries_pages_through(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut client = app.client.clone();
    seed(&app, 2_600).await;
    // Reversals: the reversed entries carry reversed_by in the export as in the list.
    let listed =
        list_all(&mut client, pb::ListEntriesRequest { merchant_id: "m-1".into(), ..Default::default() })
            .await;
    for original in listed.iter().step_by(500) {
        client
            .reverse_entry(pb::ReverseEntryRequest {
                merchant_id: "m-1".into(),
                entry_id: original.id.clone(),
                booking_date: "2026-11-04".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // Another merchant's entries are never exported.
    app.record(crate::helpers::credit("m-2", "k-0", 5)).await.unwrap();

    let all = pb::ExportEntriesRequest { merchant_id: "m-1".into(), ..Default::default() };
    let messages = export(&mut client, all.clone()).await;
    assert!(messages.len() >= 3, "2,606 entries take several messages, got {}", messages.len());
    assert!(messages.iter().all(|m| !m.entries.is_empty() && m.entries.len() <= 1000));
    let exported: Vec<pb::Entry> = messages.into_iter().flat_map(|m| m.entries).collect();
    let listed = list_all(&mut client, the_same_filters(&all)).await;
    assert_eq!(listed.len(), 2_606);
    assert_eq!(exported.len(), listed.len());
    assert!(exported == listed, "the export is the list, entry for entry and in its order");
    assert_eq!(exported.iter().filter(|e| !e.reversed_by_entry_id.is_empty()).count(), 6);

    // Each filter, and all of them at once, select what the list selects.
    let middle = listed[1_300].created_at;
    let filtered = [
        pb::ExportEntriesRequest { r#type: pb::EntryType::Debit.into(), ..all.clone() },
        pb::ExportEntriesRequest {
            start_date: "2026-11-01".into(),
            end_date: "2026-11-02".into(),
            ..all.clone()
        },
        pb::ExportEntriesRequest {
            metadata: [("channel".to_owned(), "web".to_owned())].into(),
            ..all.clone()
        },
        pb::ExportEntriesRequest { created_after: middle, ..all.clone() },
        pb::ExportEntriesRequest {
            start_date: "2026-10-31".into(),
            r#type: pb::EntryType::Credit.into(),
            metadata: [("channel".to_owned(), "pos".to_owned())].into(),
            created_before: middle,
            ..all.clone()
        },
    ];
    for request in filtered {
        let exported: Vec<pb::Entry> =
            export(&mut client, request.clone()).await.into_iter().flat_map(|m| m.entries).collect();
        let listed = list_all(&mut client, the_same_filters(&request)).await;
        assert!(!listed.is_empty() && listed.len() < 2_606, "{request:?} selects some entries");
        assert!(exported == listed, "{request:?}: export and list differ");
    }

    // Nothing selected: a stream without messages, not an error.
    let none = pb::ExportEntriesRequest { start_date: "2027-01-01".into(), ..all };
    assert!(export(&mut client, none).await.is_empty());
}

pub(crate) async fn an_export_names_its_bad_filters_before_sending_anything(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut client = app.client.clone();
    let bad = pb::ExportEntriesRequest {
        merchant_id: "m-1".into(),
        start_date: "2026-13-01".into(),
        r#type: 9,
        metadata: [("bad key".to_owned(), "x".to_owned())].into(),
        created_after: Some(prost_types::Timestamp { seconds: 10, nanos: 0 }),
        created_before: Some(prost_types::Timestamp { seconds: 5, nanos: 0 }),
        ..Default::default()
    };
    let status = client.export_entries(bad).await.map(|_| ()).unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["start_date", "type", "metadata", "created_before"]);
    let status = client
        .export_entries(pb::ExportEntriesRequest { merchant_id: "no spaces".into(), ..Default::default() })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["merchant_id"]);
}

pub(crate) async fn a_client_that_stops_reading_does_not_wedge_the_server(backend: Backend) {
    let app = spawn_app(backend).await;
    seed(&app, 3_000).await;
    let all = pb::ExportEntriesRequest { merchant_id: "m-1".into(), ..Default::default() };

    // Other callers, on connections of their own, read a message and then stop.
    let mut stalled = Vec::new();
    for _ in 0..12 {
        let channel = Channel::from_shared(format!("http://{}", app.addr)).unwrap().connect().await.unwrap();
        let mut client = LedgerServiceClient::new(channel);
        let mut stream = client.export_entries(all.clone()).await.unwrap().into_inner();
        assert!(stream.message().await.unwrap().is_some());
        stalled.push(stream);
    }

    // Meanwhile the server answers everything else, a full export included.
    let mut client = app.client.clone();
    let within = Duration::from_secs(20);
    let booked = tokio::time::timeout(within, app.record(crate::helpers::credit("m-1", "k-after", 1))).await;
    assert!(booked.expect("booking while exports are stalled").is_ok());
    let exported =
        tokio::time::timeout(within, export(&mut client, all.clone())).await.expect("a full export");
    assert_eq!(exported.iter().map(|m| m.entries.len()).sum::<usize>(), 3_001);

    // Once the stalled callers go away, their streams end: the server stops
    // within its shutdown deadline, with nothing left in flight.
    drop(stalled);
    drop(client);
    let stopped = tokio::time::timeout(Duration::from_secs(8), app.stop()).await;
    assert!(stopped.is_ok(), "the server drained: no export was left running");
}
