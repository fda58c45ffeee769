//! Starting targets: connect, migrate when asked, serve, drain.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, bail};
use fluxo_db::{Db, backend_name};
use fluxo_ledger::{Ledger, LedgerStore, Readiness};
use fluxo_server::GrpcServer;
use sea_orm::DbBackend;

use crate::{Target, config::Config};

fn telemetry(config: &Config, target: &str) -> anyhow::Result<fluxo_telemetry::Telemetry> {
    Ok(fluxo_telemetry::init(&fluxo_telemetry::TelemetryConfig {
        service_name: format!("fluxo-{target}"),
        log_format: config.log_format()?,
        log_filter: std::env::var("RUST_LOG").unwrap_or_else(|_| config.log.level.clone()),
    })?)
}

/// Runs `target` until SIGTERM or Ctrl-C.
pub(crate) async fn serve(config: Config, target: Target) -> anyhow::Result<()> {
    let name = match target {
        Target::All => "all",
        Target::Ledger => "ledger",
        Target::Balance | Target::Consolidator | Target::Gateway => {
            let name = format!("{target:?}").to_lowercase();
            bail!(
                "target `{name}` is not built yet in this version of fluxo; run `--target ledger` or `--target all`"
            )
        }
    };
    let telemetry = telemetry(&config, name)?;
    let db = Db::connect(&config.db_config()).await?;
    let migrate = config
        .database
        .migrate_on_start
        .unwrap_or(db.backend() == DbBackend::Sqlite);
    if migrate {
        LedgerStore::migrate(&db)
            .await
            .context("applying ledger migrations")?;
        tracing::info!("schema is current");
    }

    let mut server = GrpcServer::bind(config.server_config()).await?;
    let addr = server.local_addr()?;
    let ledger = Ledger::new(LedgerStore::new(db.clone()), config.time_zone()?);
    server
        .add_service(fluxo_ledger::grpc::server(
            ledger,
            config.grpc.max_message_bytes,
        ))
        .await;
    server.add_reflection(fluxo_proto::FILE_DESCRIPTOR_SET)?;
    tracing::info!(%addr, targets = name, otlp = telemetry.exporting(), "listening");
    banner(&config, &db, name, addr);

    let result = server
        .serve(
            Arc::new(Readiness::new(db.clone())),
            fluxo_server::shutdown_signal(),
        )
        .await;
    if let Err(error) = db.close().await {
        tracing::warn!(%error, "closing the database pool");
    }
    telemetry.shutdown();
    Ok(result?)
}

/// Applies every pending migration, retrying while the database is unreachable.
pub(crate) async fn migrate(config: Config, wait_secs: u64) -> anyhow::Result<()> {
    let telemetry = telemetry(&config, "migrate")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_secs);
    let db = loop {
        match Db::connect(&config.db_config()).await {
            Ok(db) if db.ping().await.is_ok() => break db,
            Ok(_) | Err(fluxo_db::DbError::Connect { .. })
                if tokio::time::Instant::now() < deadline =>
            {
                tracing::info!("database not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok(db) => {
                db.ping().await.context("database unreachable")?;
                break db;
            }
            Err(error) => return Err(error.into()),
        }
    };
    LedgerStore::migrate(&db)
        .await
        .context("applying ledger migrations")?;
    tracing::info!(database = backend_name(db.backend()), "schema is current");
    eprintln!(
        "fluxo: schema is current ({})",
        crate::config::context_for(&config)
    );
    db.close().await.ok();
    telemetry.shutdown();
    Ok(())
}

/// Tells a newcomer where fluxo is and how to call it. On stderr: stdout
/// carries the JSON log lines.
fn banner(config: &Config, db: &Db, target: &str, addr: std::net::SocketAddr) {
    let version = env!("CARGO_PKG_VERSION");
    let database = crate::config::context_for(config);
    let backend = backend_name(db.backend());
    eprintln!(
        "\nfluxo {version} is ready (target: {target}; the balance, consolidator and gateway targets are not built yet)\n\
         \x20 gRPC      {addr}  (ledger; server reflection on)\n\
         \x20 database  {backend} {database}\n\
         \x20 try it:\n\
         \x20   grpcurl -plaintext {addr} list\n\
         \x20   grpcurl -plaintext -d '{{\"merchantId\":\"m-1\",\"type\":\"CREDIT\",\"amount\":{{\"currencyCode\":\"BRL\",\"minorUnits\":\"1050\"}},\"description\":\"sale 1\",\"requestId\":\"k-1\"}}' {addr} fluxo.ledger.v1.LedgerService/RecordEntry\n\
         \x20   grpcurl -plaintext -d '{{\"merchantId\":\"m-1\"}}' {addr} fluxo.ledger.v1.LedgerService/ListEntries\n\
         \x20 stop with Ctrl-C\n"
    );
}
