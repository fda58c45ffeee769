//! fluxo's targets in their own processes, as in Kubernetes: the ledger
//! (with its relay), balance, the consolidator and the REST gateway in front
//! of ledger and balance.

use std::time::Duration;

use super::{
    WARM_DATE, WARM_MERCHANTS,
    bench::Bench,
    calls::{self, BalanceClients, LedgerClients, entry, read_warm_set},
};
use crate::procs::Proc;

/// The running targets and clients of the ledger and balance.
#[derive(Debug)]
pub(super) struct Targets {
    pub(super) ledger: Proc,
    pub(super) balance: Proc,
    /// `None` while a phase has it stopped.
    consolidator: Option<Proc>,
    pub(super) gateway: Proc,
    pub(super) ledgers: LedgerClients,
    pub(super) balances: BalanceClients,
}

impl Targets {
    /// Starts each target, recording its start-up time and idle RSS, and
    /// connects to the ledger and balance.
    pub(super) async fn start(b: &mut Bench) -> anyhow::Result<Self> {
        eprintln!("==> starting fluxo targets");
        let ledger = b.serve_fresh("ledger", &[]).await?;
        let balance = b.serve_fresh("balance", &[]).await?;
        let consolidator = b.serve_fresh("consolidator", &[]).await?;
        let gateway_env = [
            ("FLUXO_GATEWAY__LEDGER_URL".to_owned(), format!("http://{}", ledger.grpc)),
            ("FLUXO_GATEWAY__BALANCE_URL".to_owned(), format!("http://{}", balance.grpc)),
        ];
        let gateway = b.serve_fresh("gateway", &gateway_env).await?;
        let ledgers = calls::ledger(&ledger.grpc, b.args.connections).await?;
        let balances = calls::balance(&balance.grpc, b.args.connections).await?;
        Ok(Self { ledger, balance, consolidator: Some(consolidator), gateway, ledgers, balances })
    }

    /// The warm set: one entry per read merchant, consolidated, then read once.
    pub(super) async fn warm_up(&self, b: &Bench) -> anyhow::Result<()> {
        for k in 0..WARM_MERCHANTS {
            let mut c = self.ledgers.get(k);
            c.record_entry(entry(format!("w-{k}"), format!("warm-{k}"), WARM_DATE, k)).await?;
        }
        b.wait_consolidated(Duration::from_secs(60), "warm set").await?;
        read_warm_set(&self.balances).await
    }

    pub(super) fn stop_consolidator(&mut self, b: &mut Bench) {
        if let Some(consolidator) = self.consolidator.take() {
            b.stop(consolidator, Duration::from_secs(10));
        }
    }

    /// Starts a consolidator afresh (it was stopped).
    pub(super) async fn start_consolidator(&mut self, b: &mut Bench) -> anyhow::Result<()> {
        self.consolidator = Some(b.serve("consolidator", &[]).await?);
        Ok(())
    }

    /// Stops every target.
    pub(super) fn stop(self, b: &mut Bench) {
        let all = [Some(self.ledger), Some(self.balance), self.consolidator, Some(self.gateway)];
        for p in all.into_iter().flatten() {
            b.stop(p, Duration::from_secs(10));
        }
    }
}
