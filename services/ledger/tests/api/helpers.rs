//! `spawn_app`: a real ledger gRPC server on port 0 over a fresh database, and
//! a real tonic client to it.

use std::{sync::Arc, time::Duration};

use fluxo_db::Db;
use fluxo_ledger::{GroupCommit, Ledger, LedgerStore, grpc::WatchSettings, readiness};
use fluxo_proto::ledger_v1::{self as pb, ledger_service_client::LedgerServiceClient};
use fluxo_server::{GrpcServer, ServerConfig};
use fluxo_testing::{Backend, TestDb};
use sea_orm::{ConnectionTrait, Statement};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

pub(crate) struct TestApp {
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) client: LedgerServiceClient<Channel>,
    pub(crate) health: HealthClient<Channel>,
    pub(crate) db: Db,
    pub(crate) test_db: TestDb,
    shutdown: Option<oneshot::Sender<()>>,
    pub(crate) server: Option<JoinHandle<Result<(), fluxo_server::ServerError>>>,
}

pub(crate) struct Options {
    pub(crate) migrate: bool,
    pub(crate) max_concurrent_requests: usize,
    pub(crate) shutdown_delay: Duration,
    pub(crate) group_commit: GroupCommit,
    pub(crate) watch: WatchSettings,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            migrate: true,
            max_concurrent_requests: 256,
            shutdown_delay: Duration::ZERO,
            group_commit: GroupCommit::default(),
            watch: WatchSettings::default(),
        }
    }
}

pub(crate) async fn spawn_app(backend: Backend) -> TestApp {
    spawn_with(TestDb::new(backend).await, Options::default()).await
}

pub(crate) async fn spawn_with(test_db: TestDb, options: Options) -> TestApp {
    let db = test_db.connect().await;
    if options.migrate {
        LedgerStore::migrate(&db).await.expect("migrate");
    }
    let mut server = GrpcServer::bind(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_concurrent_requests: options.max_concurrent_requests,
        request_timeout: Duration::from_secs(30),
        shutdown_delay: options.shutdown_delay,
        shutdown_timeout: Duration::from_secs(10),
        readiness_interval: Duration::from_millis(100),
    })
    .await
    .expect("bind");
    let addr = server.local_addr().unwrap();
    let mut watch = options.watch;
    if watch.live.drain.is_none() {
        watch.live.drain = Some(server.draining());
    }
    let ledger =
        Ledger::new(LedgerStore::with_group_commit(db.clone(), options.group_commit), chrono_tz::UTC);
    server.add_service(fluxo_ledger::grpc::server_with(ledger, 64 * 1024, watch)).await;
    server.add_reflection(fluxo_proto::FILE_DESCRIPTOR_SET).unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let readiness = Arc::new(readiness(db.clone()));
    let handle = tokio::spawn(server.serve(readiness, async {
        let _ = rx.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connect");
    TestApp {
        addr,
        client: LedgerServiceClient::new(channel.clone()),
        health: HealthClient::new(channel),
        db,
        test_db,
        shutdown: Some(tx),
        server: Some(handle),
    }
}

impl TestApp {
    /// Starts shutdown (as SIGTERM would).
    pub(crate) fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Stops the server and waits for it, as a restart would.
    pub(crate) async fn stop(mut self) -> TestDb {
        self.begin_shutdown();
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
        self.db.close().await.unwrap();
        self.test_db
    }

    pub(crate) async fn health(&self, service: &str) -> ServingStatus {
        let response = self
            .health
            .clone()
            .check(HealthCheckRequest { service: service.into() })
            .await
            .expect("health check");
        response.into_inner().status()
    }

    /// Waits up to `within` for `service` to report `status`.
    pub(crate) async fn wait_health(&self, service: &str, status: ServingStatus, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if self.health(service).await == status {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    pub(crate) async fn record(&self, request: pb::RecordEntryRequest) -> Result<pb::Entry, tonic::Status> {
        self.client.clone().record_entry(request).await.map(tonic::Response::into_inner)
    }

    pub(crate) async fn count(&self, sql: &str) -> i64 {
        let row = self
            .db
            .conn()
            .query_one_raw(Statement::from_string(self.db.backend(), sql.to_owned()))
            .await
            .expect("count query")
            .expect("a row");
        row.try_get_by_index::<i64>(0).expect("an integer")
    }
}

pub(crate) fn credit(merchant: &str, key: &str, minor_units: i64) -> pb::RecordEntryRequest {
    pb::RecordEntryRequest {
        merchant_id: merchant.into(),
        r#type: pb::EntryType::Credit.into(),
        amount: Some(pb::Money { currency_code: "BRL".into(), minor_units }),
        booking_date: "2026-11-20".into(),
        description: "sale".into(),
        request_id: key.into(),
        ..Default::default()
    }
}

/// The fields a BadRequest detail names.
pub(crate) fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}
