//! WatchEntries on both backends: catch up, follow, resume, heartbeats, bad
//! requests, and a reader that stops reading.

use std::{collections::HashSet, time::Duration};

use fluxo_ledger::{WatchPace, grpc::WatchSettings};
use fluxo_proto::ledger_v1::{self as pb, ledger_service_client::LedgerServiceClient};
use fluxo_server::stream::Live;
use fluxo_testing::{Backend, TestDb};
use tonic::{Code, Streaming, transport::Channel};

use crate::helpers::{Options, TestApp, credit, spawn_app, spawn_with, violated_fields};

/// How long a test waits for something that should happen at once.
const PATIENCE: Duration = Duration::from_secs(30);

fn watch(merchant: &str, cursor: &str) -> pb::WatchEntriesRequest {
    pb::WatchEntriesRequest { merchant_id: merchant.into(), cursor: cursor.into(), start_at_end: false }
}

/// What a reader has taken from a watch.
#[derive(Default)]
struct Seen {
    ids: Vec<String>,
    /// The cursor of every message, with how many entries had arrived by then.
    cursors: Vec<(usize, String)>,
}

impl Seen {
    /// Reads messages until `n` entries have arrived in all, within PATIENCE
    /// altogether (heartbeats do not extend it).
    async fn until(&mut self, stream: &mut Streaming<pb::WatchEntriesResponse>, n: usize) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.ids.len() < n {
            let message = tokio::time::timeout_at(deadline, stream.message())
                .await
                .unwrap_or_else(|_| panic!("only {} of {n} entries arrived", self.ids.len()))
                .expect("the watch failed")
                .expect("a watch does not end");
            self.take(message);
        }
    }

    fn take(&mut self, message: pb::WatchEntriesResponse) {
        assert!(!message.cursor.is_empty(), "every message carries a cursor");
        self.ids.extend(message.entries.into_iter().map(|e| e.id));
        self.cursors.push((self.ids.len(), message.cursor));
    }

    fn distinct(&self) -> HashSet<String> {
        let set: HashSet<String> = self.ids.iter().cloned().collect();
        assert_eq!(set.len(), self.ids.len(), "an entry arrived twice");
        set
    }
}

/// The ids of every entry of `merchant`, from ListEntries.
async fn listed(app: &TestApp, merchant: &str) -> HashSet<String> {
    let mut client = app.client.clone();
    let mut ids = HashSet::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_entries(pb::ListEntriesRequest {
                merchant_id: merchant.into(),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.entries.into_iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        token = page.next_page_token;
    }
}

/// Books `n` credits for `merchant` in batches of 200, keys `{prefix}-{i}`.
async fn book(app: &TestApp, merchant: &str, prefix: &str, n: usize) -> Vec<String> {
    let mut client = app.client.clone();
    let mut ids = Vec::new();
    for start in (0..n).step_by(200) {
        let requests =
            (start..n.min(start + 200)).map(|i| credit("", &format!("{prefix}-{i}"), 1 + i as i64)).collect();
        let call = client
            .batch_record_entries(pb::BatchRecordEntriesRequest { merchant_id: merchant.into(), requests });
        let results = tokio::time::timeout(PATIENCE, call)
            .await
            .unwrap_or_else(|_| panic!("a batch of {prefix} entries was not booked within {PATIENCE:?}"))
            .unwrap()
            .into_inner()
            .results;
        ids.extend(results.into_iter().map(|r| r.entry.expect("booked").id));
    }
    ids
}

pub(crate) async fn a_watch_catches_up_follows_concurrent_writers_and_resumes_from_any_cursor(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    let mut client = app.client.clone();
    let before = book(&app, "m-1", "early", 5).await;
    book(&app, "m-2", "other", 3).await;

    // From the start: the five entries already booked (one transaction, so in
    // an order of its own), and nothing of m-2.
    let mut stream = client.watch_entries(watch("m-1", "")).await.unwrap().into_inner();
    let mut seen = Seen::default();
    seen.until(&mut stream, 5).await;
    assert_eq!(seen.distinct(), before.iter().cloned().collect());

    // Eight writers at once, one entry per call (so the group commit runs
    // transactions side by side), plus a reversal, while the watch follows.
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let client = app.client.clone();
            tokio::spawn(async move {
                let mut client = client;
                for i in 0..40 {
                    let request = credit("m-1", &format!("w{w}-{i}"), 10);
                    client.record_entry(request).await.expect("booked");
                }
            })
        })
        .collect();
    client
        .reverse_entry(pb::ReverseEntryRequest {
            merchant_id: "m-1".into(),
            entry_id: before[0].clone(),
            request_id: "undo-0".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    for writer in writers {
        writer.await.unwrap();
    }
    seen.until(&mut stream, 5 + 320 + 1).await;
    // Exactly the merchant's entries, each once: none skipped by a transaction
    // that committed after a later one.
    assert_eq!(seen.distinct(), listed(&app, "m-1").await);

    // Resumed from any message's cursor, a new watch sends exactly what followed it.
    for (at, cursor) in [seen.cursors[0].clone(), seen.cursors[seen.cursors.len() / 2].clone()] {
        let mut resumed = client.watch_entries(watch("m-1", &cursor)).await.unwrap().into_inner();
        let mut rest = Seen::default();
        rest.until(&mut resumed, seen.ids.len() - at).await;
        assert_eq!(rest.ids, seen.ids[at..], "resumed after {at}");
    }
    // The last cursor resumes at the end: the next entry is the first thing sent.
    let (_, last) = seen.cursors.last().cloned().unwrap();
    let mut tail = client.watch_entries(watch("m-1", &last)).await.unwrap().into_inner();
    let next = app.record(credit("m-1", "late", 7)).await.unwrap();
    let mut after = Seen::default();
    after.until(&mut tail, 1).await;
    assert_eq!(after.ids, [next.id]);
}

pub(crate) async fn a_watch_from_the_end_sends_new_entries_and_heartbeats_while_idle(backend: Backend) {
    let watch_settings = WatchSettings {
        pace: WatchPace { heartbeat: Duration::from_millis(200), ..WatchPace::default() },
        ..WatchSettings::default()
    };
    let options = Options { watch: watch_settings, ..Options::default() };
    let app = spawn_with(TestDb::new(backend).await, options).await;
    let mut client = app.client.clone();
    let old: HashSet<String> = book(&app, "m-1", "old", 3).await.into_iter().collect();

    let request =
        pb::WatchEntriesRequest { merchant_id: "m-1".into(), cursor: String::new(), start_at_end: true };
    let mut stream = client.watch_entries(request).await.unwrap().into_inner();
    // The first message goes at once, so the reader learns where it stands.
    let first = tokio::time::timeout(PATIENCE, stream.message()).await.unwrap().unwrap().unwrap();
    assert!(!first.cursor.is_empty());
    let new: Vec<String> = book(&app, "m-1", "new", 2).await;
    let mut seen = Seen::default();
    seen.take(first);
    let mut arrived = HashSet::new();
    while !new.iter().all(|id| arrived.contains(id)) {
        let before = seen.ids.len();
        seen.until(&mut stream, before + 1).await;
        arrived.extend(seen.ids[before..].iter().cloned());
    }
    let seen_ids = seen.distinct();
    if backend == Backend::Sqlite {
        // The single writer makes "the end" exact.
        assert!(seen_ids.is_disjoint(&old), "an entry committed before the watch began was sent");
    }
    // On PostgreSQL an entry committed just before the watch began may follow
    // (the watch starts at the oldest transaction still running, in any
    // database of the server); nothing else does.
    assert!(seen_ids.iter().all(|id| old.contains(id) || new.contains(id)));

    // Idle: heartbeats, no entries, the same cursor, every 200 ms or so.
    let (_, cursor) = seen.cursors.last().cloned().unwrap();
    for _ in 0..2 {
        let beat = tokio::time::timeout(PATIENCE, stream.message()).await.unwrap().unwrap().unwrap();
        assert!(beat.entries.is_empty(), "nothing was booked, yet entries came");
        assert_eq!(beat.cursor, cursor);
    }
}

pub(crate) async fn a_bad_watch_is_refused_naming_the_field_before_anything_is_sent(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut client = app.client.clone();
    let foreign = match backend {
        Backend::Postgres => "p5",
        Backend::Sqlite => "t5.",
    };
    let cases = [
        (watch("", ""), "merchant_id"),
        (watch("m-1", "not-a-cursor"), "cursor"),
        (watch("m-1", "p-1"), "cursor"),
        (watch("m-1", foreign), "cursor"),
        (
            pb::WatchEntriesRequest { merchant_id: "m-1".into(), cursor: "p1".into(), start_at_end: true },
            "start_at_end",
        ),
    ];
    for (request, field) in cases {
        let status = client.watch_entries(request.clone()).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{request:?}: {status:?}");
        let fields = violated_fields(&status);
        assert!(fields.iter().any(|f| f == field), "{request:?} should name {field}, named {fields:?}");
    }
}

/// The slow-reader counter is per process: the backends take turns.
static ONE_SLOW_READER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub(crate) async fn a_reader_that_stops_reading_is_cut_off_and_resumes_without_a_gap(backend: Backend) {
    let _turn = ONE_SLOW_READER_AT_A_TIME.lock().await;
    let live = Live { slow_reader: Duration::from_millis(300), drain: None };
    let settings = WatchSettings { live, ..WatchSettings::default() };
    let app = spawn_with(TestDb::new(backend).await, Options { watch: settings, ..Options::default() }).await;
    // Small HTTP/2 windows, so little waits in the transport when the reader stops.
    let channel = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .initial_stream_window_size(16 * 1024)
        .initial_connection_window_size(16 * 1024)
        .connect()
        .await
        .unwrap();
    let mut slow = LedgerServiceClient::new(channel);
    let mut stream = slow.watch_entries(watch("m-1", "")).await.unwrap().into_inner();
    let mut seen = Seen::default();
    seen.take(tokio::time::timeout(PATIENCE, stream.message()).await.unwrap().unwrap().unwrap());

    // The reader stops reading while 4,000 entries are booked.
    let cut_before = fluxo_server::stream::slow_readers_cut();
    let booked: HashSet<String> = book(&app, "m-1", "k", 4_000).await.into_iter().collect();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while fluxo_server::stream::slow_readers_cut() == cut_before {
        assert!(tokio::time::Instant::now() < deadline, "the stalled reader was never cut off");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // It gets what had reached the transport, then RESOURCE_EXHAUSTED.
    let status = loop {
        match tokio::time::timeout(PATIENCE, stream.message()).await.expect("the cut-off arrives") {
            Ok(Some(message)) => seen.take(message),
            Ok(None) => panic!("the watch ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("resume from the last cursor"), "{}", status.message());
    assert!(
        seen.ids.len() < booked.len(),
        "all {} entries were buffered for a reader that did not read",
        seen.ids.len()
    );

    // Resumed from its last cursor, it gets the rest: nothing lost, nothing twice.
    let (_, cursor) = seen.cursors.last().cloned().unwrap();
    let mut resumed = app.client.clone().watch_entries(watch("m-1", &cursor)).await.unwrap().into_inner();
    let mut rest = Seen::default();
    rest.until(&mut resumed, booked.len() - seen.ids.len()).await;
    seen.ids.extend(rest.ids);
    assert_eq!(seen.distinct(), booked);
}

pub(crate) async fn a_watch_closes_with_unavailable_when_the_server_drains(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let mut stream = app.client.clone().watch_entries(watch("m-1", "")).await.unwrap().into_inner();
    let first = tokio::time::timeout(PATIENCE, stream.message()).await.unwrap().unwrap().unwrap();

    // SIGTERM: the watch, which would never end by itself, is closed with a
    // status that tells its reader to resume elsewhere from its cursor.
    app.begin_shutdown();
    let status = loop {
        match tokio::time::timeout(PATIENCE, stream.message()).await.expect("the watch closes") {
            Ok(Some(heartbeat)) => assert_eq!(heartbeat.cursor, first.cursor),
            Ok(None) => panic!("the watch ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("resume from the last cursor"), "{}", status.message());
    // Nothing is left in flight: the server stops before its 10 s drain deadline.
    drop(stream);
    let stopped = tokio::time::timeout(Duration::from_secs(8), app.stop()).await;
    assert!(stopped.is_ok(), "the server drained: the watch was not left running");
}

/// Commit order is numeric: transaction 9 before 10 before today's (as text,
/// "10" sorts before "9", and a watch would send the entries out of order and
/// then again). PostgreSQL only: the order there is the transaction id.
pub(crate) async fn entries_come_in_numeric_transaction_order(backend: Backend) {
    if backend != Backend::Postgres {
        return;
    }
    let app = spawn_app(backend).await;
    use sea_orm::ConnectionTrait;
    // Two entries written as if by transactions 10 and 9, long over.
    for (id, xid) in [("01KB0000000000000000000010", "10"), ("01KB0000000000000000000009", "9")] {
        let sql = format!(
            "INSERT INTO ledger_entries (id, merchant_id, kind, currency_code, amount_minor, booking_date, \
             description, created_at, commit_xid) \
             VALUES ('{id}', 'm-1', 'CREDIT', 'BRL', 1, '2026-11-20', '', now(), '{xid}')"
        );
        app.db
            .conn()
            .execute_raw(sea_orm::Statement::from_string(sea_orm::DbBackend::Postgres, sql))
            .await
            .unwrap();
    }
    let booked = app.record(credit("m-1", "k-now", 5)).await.unwrap().id;
    let mut stream = app.client.clone().watch_entries(watch("m-1", "")).await.unwrap().into_inner();
    let mut seen = Seen::default();
    seen.until(&mut stream, 3).await;
    assert_eq!(seen.ids, ["01KB0000000000000000000009", "01KB0000000000000000000010", booked.as_str()]);
}
