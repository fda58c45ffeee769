//! The bare tonic ceiling: `fluxo.balance.v1.BalanceService` answering at
//! once with a constant reply, plus gRPC health, on plain tonic defaults. It
//! runs as its own process (`fluxo-bench bare-server`) like fluxo does, and
//! prints the same `gRPC <addr>` banner line.

use fluxo_proto::balance_v1::{
    DailyBalance, ExportDailyBalancesRequest, ExportDailyBalancesResponse, GetDailyBalanceRequest,
    ListDailyBalancesRequest, ListDailyBalancesResponse, WatchDailyBalancesRequest,
    WatchDailyBalancesResponse,
    balance_service_server::{BalanceService, BalanceServiceServer},
};
use tonic::{Request, Response, Status};

#[derive(Debug)]
struct Constant(DailyBalance);

#[tonic::async_trait]
impl BalanceService for Constant {
    type ExportDailyBalancesStream = futures::stream::Empty<Result<ExportDailyBalancesResponse, Status>>;
    type WatchDailyBalancesStream = futures::stream::Empty<Result<WatchDailyBalancesResponse, Status>>;

    async fn watch_daily_balances(
        &self,
        _request: Request<WatchDailyBalancesRequest>,
    ) -> Result<Response<Self::WatchDailyBalancesStream>, Status> {
        Err(Status::unimplemented("the bare server answers reads only"))
    }

    async fn export_daily_balances(
        &self,
        _request: Request<ExportDailyBalancesRequest>,
    ) -> Result<Response<Self::ExportDailyBalancesStream>, Status> {
        Err(Status::unimplemented("the bare server answers reads only"))
    }

    async fn get_daily_balance(
        &self,
        _request: Request<GetDailyBalanceRequest>,
    ) -> Result<Response<DailyBalance>, Status> {
        Ok(Response::new(self.0.clone()))
    }

    async fn list_daily_balances(
        &self,
        _request: Request<ListDailyBalancesRequest>,
    ) -> Result<Response<ListDailyBalancesResponse>, Status> {
        Ok(Response::new(ListDailyBalancesResponse { balances: vec![self.0.clone()] }))
    }
}

/// Serves until SIGTERM or Ctrl-C.
pub(crate) async fn serve() -> anyhow::Result<()> {
    use tonic::transport::server::TcpIncoming;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // Field for field what fluxo answers for a warm balance.
    let reply = DailyBalance {
        merchant_id: "m-1".into(),
        date: "2026-11-21".into(),
        currency_code: "BRL".into(),
        total_credits_minor: 1050,
        total_debits_minor: 300,
        net_minor: 750,
        opening_balance_minor: 0,
        closing_balance_minor: 750,
        entry_count: 2,
        as_of: Some(prost_timestamp()),
        possibly_stale: false,
    };
    let (_reporter, health) = tonic_health::server::health_reporter();
    eprintln!("  gRPC      {addr}");
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(BalanceServiceServer::new(Constant(reply)))
        // Accepted sockets with TCP_NODELAY, as fluxo's: a ceiling held by Nagle's
        // algorithm would be a slower yardstick than the server it measures.
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
    Ok(())
}

fn prost_timestamp() -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: 1_795_000_000, nanos: 0 }
}
