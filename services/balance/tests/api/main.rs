//! The balance side's integration suite: the real consolidator applying real
//! events into the read model, the real BalanceService over gRPC, the real
//! Redis cache — each test on a fresh database, on SQLite and on PostgreSQL.

mod watch;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use fluxo_balance::{
    BalanceStore, Balances, Consolidator,
    cache::{BalanceCache, Invalidator},
};
use fluxo_proto::{
    balance_v1::{self as bpb, balance_service_client::BalanceServiceClient},
    ledger_v1 as lpb,
};
use fluxo_queue::StreamEvent;
use fluxo_server::{GrpcServer, ServerConfig};
use fluxo_testing::{Backend, TestDb, backend_suite};
use prost::Message;
use tonic::{Code, transport::Channel};
use watch::{
    a_bad_balance_watch_is_refused_naming_the_field,
    a_balance_watch_sends_each_day_as_it_changes_and_resumes_from_a_cursor,
    an_in_process_consolidator_wakes_the_balance_watch_without_its_poll,
};

struct App {
    client: BalanceServiceClient<Channel>,
    consolidator: Consolidator,
    cache: Option<BalanceCache>,
    db: fluxo_db::Db,
    _test_db: TestDb,
}

fn redis() -> fred::prelude::Client {
    let url = std::env::var("FLUXO_TEST_REDIS_URL")
        .expect("FLUXO_TEST_REDIS_URL is not set: run the suite with ./scripts/test.sh");
    fluxo_queue::client(&fluxo_queue::RedisConfig {
        url: url.into(),
        command_timeout: Duration::from_secs(5),
        tls_ca_file: None,
    })
    .unwrap()
}

async fn spawn(backend: Backend, cached: bool) -> App {
    spawn_with(backend, cached, fluxo_server::stream::WatchSettings::default()).await
}

/// As `fluxo serve` wires one process: the consolidator's commits drop cached
/// answers and wake the balance watches of the merchants they changed.
async fn spawn_with(backend: Backend, cached: bool, watch: fluxo_server::stream::WatchSettings) -> App {
    let test_db = TestDb::new(backend).await;
    let db = test_db.connect().await;
    BalanceStore::migrate(&db).await.unwrap();
    let store = BalanceStore::new(db.clone());
    let cache = cached.then(|| BalanceCache::new(redis(), 60_000, 600_000));
    let mut consolidator = Consolidator::new(store.clone());
    if let Some(cache) = &cache {
        consolidator = consolidator.with_listener(Arc::new(Invalidator(cache.clone())));
    }
    let changes = Arc::new(fluxo_server::stream::Signals::default());
    consolidator = consolidator.with_listener(Arc::new(fluxo_balance::ChangeNotifier(changes.clone())));
    let mut server = GrpcServer::bind(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_concurrent_requests: 512,
        request_timeout: Duration::from_secs(30),
        shutdown_delay: Duration::ZERO,
        shutdown_timeout: Duration::from_secs(5),
        readiness_interval: Duration::from_millis(100),
    })
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();
    let balances = Balances::new(store).with_changes(changes);
    server.add_service(fluxo_balance::grpc::server_with(balances, cache.clone(), 1 << 20, watch)).await;
    let readiness = Arc::new(fluxo_balance::readiness(db.clone()));
    tokio::spawn(server.serve(readiness, futures::future::pending()));
    let client = BalanceServiceClient::connect(format!("http://{addr}")).await.unwrap();
    App { client, consolidator, cache, db, _test_db: test_db }
}

fn merchant() -> String {
    format!("m-{}", ulid::Ulid::new())
}

fn event(merchant: &str, date: &str, credit: bool, amount: i64) -> StreamEvent {
    let id = ulid::Ulid::new().to_string();
    let recorded = lpb::EntryRecorded {
        event_id: id.clone(),
        entry: Some(lpb::Entry {
            id: ulid::Ulid::new().to_string(),
            merchant_id: merchant.into(),
            r#type: if credit { lpb::EntryType::Credit } else { lpb::EntryType::Debit }.into(),
            amount: Some(lpb::Money { currency_code: "BRL".into(), minor_units: amount }),
            booking_date: date.into(),
            created_at: Some(prost_types::Timestamp { seconds: 1_790_000_000, nanos: 0 }),
            ..Default::default()
        }),
        occurred_at: None,
    };
    StreamEvent {
        event_id: id,
        position: 1,
        payload: Bytes::from(recorded.encode_to_vec()),
        traceparent: None,
        tracestate: None,
    }
}

impl App {
    async fn apply(&self, events: &[StreamEvent]) {
        for r in self.consolidator.apply(events).await {
            r.unwrap();
        }
    }

    async fn day(&self, merchant: &str, date: &str) -> bpb::DailyBalance {
        self.client
            .clone()
            .get_daily_balance(bpb::GetDailyBalanceRequest {
                merchant_id: merchant.into(),
                date: date.into(),
                currency_code: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn closings(&self, merchant: &str, start: &str, end: &str) -> Vec<i64> {
        self.client
            .clone()
            .list_daily_balances(bpb::ListDailyBalancesRequest {
                merchant_id: merchant.into(),
                start_date: start.into(),
                end_date: end.into(),
                currency_code: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .balances
            .iter()
            .map(|b| b.closing_balance_minor)
            .collect()
    }
}

backend_suite!(
    a_backdated_entry_changes_that_day_and_every_later_closing_balance,
    redelivered_and_out_of_order_events_count_once,
    the_cache_never_serves_a_balance_older_than_the_committed_read_model,
    serves_the_last_known_balance_marked_stale_when_the_database_is_down,
    reports_bad_requests_by_field,
    a_balance_watch_sends_each_day_as_it_changes_and_resumes_from_a_cursor,
    a_bad_balance_watch_is_refused_naming_the_field,
    an_in_process_consolidator_wakes_the_balance_watch_without_its_poll,
);

async fn a_backdated_entry_changes_that_day_and_every_later_closing_balance(backend: Backend) {
    for cached in [false, true] {
        let app = spawn(backend, cached).await;
        let m = merchant();
        app.apply(&[event(&m, "2026-11-10", true, 100), event(&m, "2026-11-12", true, 50)]).await;
        assert_eq!(app.closings(&m, "2026-11-09", "2026-11-13").await, [0, 100, 100, 150, 150]);
        // Booked today for the 5th: that day and every later day move.
        app.apply(&[event(&m, "2026-11-05", false, 30)]).await;
        assert_eq!(app.closings(&m, "2026-11-09", "2026-11-13").await, [-30, 70, 70, 120, 120]);
        let fifth = app.day(&m, "2026-11-05").await;
        assert_eq!(
            (fifth.opening_balance_minor, fifth.total_debits_minor, fifth.closing_balance_minor),
            (0, 30, -30)
        );
        let twelfth = app.day(&m, "2026-11-12").await;
        assert_eq!((twelfth.opening_balance_minor, twelfth.closing_balance_minor), (70, 120));
        assert!(twelfth.as_of.is_some());
    }
}

async fn redelivered_and_out_of_order_events_count_once(backend: Backend) {
    let app = spawn(backend, false).await;
    let m = merchant();
    let events = [
        event(&m, "2026-11-03", true, 500),
        event(&m, "2026-11-01", false, 200),
        event(&m, "2026-11-02", true, 7),
    ];
    app.apply(&[events[2].clone(), events[0].clone()]).await;
    app.apply(&events).await; // a redelivery of two, plus a late one
    app.apply(&[events[1].clone(), events[1].clone()]).await; // the same event twice in a batch
    assert_eq!(app.closings(&m, "2026-11-01", "2026-11-03").await, [-200, -193, 307]);
    let third = app.day(&m, "2026-11-03").await;
    assert_eq!(third.entry_count, 1);
}

async fn the_cache_never_serves_a_balance_older_than_the_committed_read_model(backend: Backend) {
    let app = spawn(backend, true).await;
    let m = merchant();
    // A reader hammers the same keys the whole time, keeping them cached.
    let reader = {
        let app_client = app.client.clone();
        let m = m.clone();
        tokio::spawn(async move {
            for _ in 0..400 {
                let mut c = app_client.clone();
                let _ = c
                    .get_daily_balance(bpb::GetDailyBalanceRequest {
                        merchant_id: m.clone(),
                        date: "2026-11-20".into(),
                        currency_code: String::new(),
                    })
                    .await;
            }
        })
    };
    let mut expected = 0;
    for i in 1..=40 {
        // Alternate backdated and current entries.
        let date = if i % 2 == 0 { "2026-11-01" } else { "2026-11-20" };
        app.apply(&[event(&m, date, true, i)]).await;
        expected += i;
        // Once apply returned (committed and invalidated), no read may be older.
        assert_eq!(app.day(&m, "2026-11-20").await.closing_balance_minor, expected, "after entry {i}");
        assert_eq!(*app.closings(&m, "2026-11-19", "2026-11-20").await.last().unwrap(), expected);
    }
    reader.await.unwrap();
    let cache = app.cache.as_ref().unwrap();
    assert!(cache.loads() > 0);

    // Redis forgets its scripts (SCRIPT FLUSH, as after a restart): the cache
    // loads them again and keeps caching — one load, then a hit.
    use fred::prelude::{ClientLike, LuaInterface};
    let admin = redis();
    admin.wait_for_connect().await.unwrap();
    app.apply(&[event(&m, "2026-11-20", true, 1)]).await;
    admin.script_flush(false).await.unwrap();
    let before = cache.loads();
    for _ in 0..2 {
        assert_eq!(app.day(&m, "2026-11-20").await.closing_balance_minor, expected + 1);
    }
    assert_eq!(cache.loads() - before, 1, "answered from the cache again after the scripts were flushed");
}

async fn serves_the_last_known_balance_marked_stale_when_the_database_is_down(backend: Backend) {
    let app = spawn(backend, true).await;
    let m = merchant();
    app.apply(&[event(&m, "2026-11-10", true, 100)]).await;
    let fresh = app.day(&m, "2026-11-10").await;
    assert!(!fresh.possibly_stale);
    // The database goes away (its pool is closed under the service).
    app.db.clone().close().await.unwrap();
    let stale = app.day(&m, "2026-11-10").await;
    assert_eq!(stale.closing_balance_minor, 100);
    // The cached copy may be served as is or from the last-known store; either way the numbers match.
    // A question never answered before cannot be: UNAVAILABLE, never a guess.
    let unknown = app
        .client
        .clone()
        .get_daily_balance(bpb::GetDailyBalanceRequest {
            merchant_id: m.clone(),
            date: "2026-11-11".into(),
            currency_code: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unavailable);
    // Drop the live cache entry: the last known answer is served, marked stale.
    app.cache.as_ref().unwrap().invalidate([(m.clone(), "BRL".to_owned())]).await.unwrap();
    let last = app.day(&m, "2026-11-10").await;
    assert!(last.possibly_stale);
    assert_eq!(last.closing_balance_minor, 100);
}

async fn reports_bad_requests_by_field(backend: Backend) {
    use tonic_types::StatusExt;
    let app = spawn(backend, false).await;
    let mut c = app.client.clone();
    let bad = c
        .list_daily_balances(bpb::ListDailyBalancesRequest {
            merchant_id: "bad id".into(),
            start_date: "2026-01-01".into(),
            end_date: "2027-06-01".into(),
            currency_code: "brl".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let fields: Vec<String> = bad
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(fields, ["merchant_id", "currency_code", "end_date"]);
    let none = c
        .get_daily_balance(bpb::GetDailyBalanceRequest {
            merchant_id: merchant(),
            date: "2026-11-01".into(),
            currency_code: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::NotFound);
    let zero = c
        .get_daily_balance(bpb::GetDailyBalanceRequest {
            merchant_id: merchant(),
            date: "2026-11-01".into(),
            currency_code: "USD".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((zero.closing_balance_minor, zero.entry_count), (0, 0));
    // Two currencies: the caller must choose.
    let m = merchant();
    let mut usd = event(&m, "2026-11-01", true, 5);
    let mut recorded = lpb::EntryRecorded::decode(usd.payload.as_ref()).unwrap();
    recorded.entry.as_mut().unwrap().amount.as_mut().unwrap().currency_code = "USD".into();
    usd.payload = Bytes::from(recorded.encode_to_vec());
    app.apply(&[event(&m, "2026-11-01", true, 5), usd]).await;
    let ambiguous = c
        .get_daily_balance(bpb::GetDailyBalanceRequest {
            merchant_id: m,
            date: "2026-11-01".into(),
            currency_code: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(ambiguous.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_for_one_key_load_once() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let app = spawn(Backend::Postgres, true).await;
    let m = merchant();
    app.apply(&[event(&m, "2026-11-10", true, 100)]).await;
    // Hold reads of the read model until every caller has missed.
    let blocker_db = app._test_db.connect().await;
    let txn = blocker_db.conn().begin().await.unwrap();
    txn.execute_unprepared("LOCK TABLE balance_daily IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let before = app.cache.as_ref().unwrap().loads();
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let mut c = app.client.clone();
            let m = m.clone();
            tokio::spawn(async move {
                c.get_daily_balance(bpb::GetDailyBalanceRequest {
                    merchant_id: m,
                    date: "2026-11-10".into(),
                    currency_code: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .closing_balance_minor
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    txn.rollback().await.unwrap();
    for call in calls {
        assert_eq!(call.await.unwrap(), 100);
    }
    assert_eq!(app.cache.as_ref().unwrap().loads() - before, 1, "50 concurrent misses, one database load");
}

#[tokio::test]
async fn installations_sharing_a_redis_never_read_each_others_answers() {
    use fluxo_balance::cache::{CacheKey, Lookup};
    let key = CacheKey { merchant: merchant(), currency: "BRL".into(), field: "d:2026-11-10".into() };
    let prefix = |name: &str| format!("fluxo-test:{}:{name}", ulid::Ulid::new());
    let first = BalanceCache::new(redis(), 60_000, 600_000).with_prefix(&prefix("first"));
    let second = BalanceCache::new(redis(), 60_000, 600_000).with_prefix(&prefix("second"));
    let Lookup::Miss(generation) = first.get(&key).await.unwrap() else { panic!("a fresh cache hit") };
    assert!(first.put(&key, &generation, Bytes::from_static(b"first's answer")).await.unwrap());
    assert!(matches!(first.get(&key).await.unwrap(), Lookup::Hit(b) if b.as_ref() == b"first's answer"));
    // The same merchant, currency and question under the other prefix: nothing there.
    assert!(matches!(second.get(&key).await.unwrap(), Lookup::Miss(_)));
    // Nor does the other installation's invalidation drop the first one's answer.
    second.invalidate([(key.merchant.clone(), "BRL".to_owned())]).await.unwrap();
    assert!(matches!(first.get(&key).await.unwrap(), Lookup::Hit(_)));
}
