//! The calls the scenarios make: gRPC clients spread over connections, the
//! requests, and the operations (request `i` → its outcome) that the load
//! generator runs.

use std::{pin::Pin, sync::Arc};

use fluxo_proto::{
    balance_v1::{GetDailyBalanceRequest, balance_service_client::BalanceServiceClient},
    ledger_v1::{self as lpb, ledger_service_client::LedgerServiceClient},
};
use tonic::transport::Channel;

use super::{MERCHANTS, WARM_DATE, WARM_MERCHANTS};
use crate::load::{self, Outcome};

/// Calls spread over several connections.
#[derive(Debug, Clone)]
pub(super) struct Clients<T>(Arc<Vec<T>>);

impl<T: Clone> Clients<T> {
    /// The client of request `i`: requests go round the connections.
    pub(super) fn get(&self, i: u64) -> T {
        self.0[(i as usize) % self.0.len()].clone()
    }
}

pub(super) type LedgerClients = Clients<LedgerServiceClient<Channel>>;
pub(super) type BalanceClients = Clients<BalanceServiceClient<Channel>>;

/// One request of a load run, as the load generator awaits it.
pub(super) type Call = Pin<Box<dyn Future<Output = Outcome> + Send>>;

async fn channels(addr: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        out.push(Channel::from_shared(format!("http://{addr}"))?.connect().await?);
    }
    Ok(out)
}

/// LedgerService clients over `n` connections to `addr`.
pub(super) async fn ledger(addr: &str, n: usize) -> anyhow::Result<LedgerClients> {
    Ok(Clients(Arc::new(channels(addr, n).await?.into_iter().map(LedgerServiceClient::new).collect())))
}

/// BalanceService clients over `n` connections to `addr`.
pub(super) async fn balance(addr: &str, n: usize) -> anyhow::Result<BalanceClients> {
    Ok(Clients(Arc::new(channels(addr, n).await?.into_iter().map(BalanceServiceClient::new).collect())))
}

/// Entry `i`: two credits for every debit, amounts varying with `i`.
pub(super) fn entry(merchant: String, request_id: String, date: &str, i: u64) -> lpb::RecordEntryRequest {
    let credit = !i.is_multiple_of(3);
    lpb::RecordEntryRequest {
        merchant_id: merchant,
        r#type: if credit { lpb::EntryType::Credit } else { lpb::EntryType::Debit }.into(),
        amount: Some(lpb::Money { currency_code: "BRL".into(), minor_units: 1 + (i * 37 % 10_000) as i64 }),
        booking_date: date.to_owned(),
        description: "bench".into(),
        request_id,
        ..Default::default()
    }
}

/// The balance of one merchant of the warm set.
pub(super) fn balance_request(i: u64) -> GetDailyBalanceRequest {
    GetDailyBalanceRequest {
        merchant_id: format!("w-{}", i % WARM_MERCHANTS),
        date: WARM_DATE.into(),
        currency_code: String::new(),
    }
}

fn record_call(clients: &LedgerClients, i: u64, request: lpb::RecordEntryRequest) -> Call {
    let mut c = clients.get(i);
    Box::pin(async move { load::grpc(c.record_entry(request).await) })
}

fn balance_call(clients: &BalanceClients, i: u64) -> Call {
    let mut c = clients.get(i);
    Box::pin(async move { load::grpc(c.get_daily_balance(balance_request(i)).await) })
}

/// A RecordEntry with a unique key (`<prefix>-<i>`), for one of many merchants.
pub(super) fn record_op(
    clients: LedgerClients,
    prefix: &str,
) -> impl Fn(u64) -> Call + Send + Sync + 'static {
    let prefix = prefix.to_owned();
    move |i| {
        let request = entry(format!("m-{}", i % MERCHANTS), format!("{prefix}-{i}"), "2026-11-03", i);
        record_call(&clients, i, request)
    }
}

/// A GetDailyBalance of the warm set.
pub(super) fn balance_op(clients: BalanceClients) -> impl Fn(u64) -> Call + Send + Sync + 'static {
    move |i| balance_call(&clients, i)
}

/// 20% RecordEntry (every fifth request, keys `<prefix>-<i>`), 80%
/// GetDailyBalance of the warm set.
pub(super) fn mixed_op(
    ledgers: LedgerClients,
    balances: BalanceClients,
    prefix: &str,
) -> impl Fn(u64) -> Call + Send + Sync + 'static {
    let prefix = prefix.to_owned();
    move |i| {
        if i.is_multiple_of(5) {
            let request = entry(format!("mx-{}", i % MERCHANTS), format!("{prefix}-{i}"), "2026-11-04", i);
            record_call(&ledgers, i, request)
        } else {
            balance_call(&balances, i)
        }
    }
}

/// Reads every balance of the warm set once, so that the cache holds it.
pub(super) async fn read_warm_set(balances: &BalanceClients) -> anyhow::Result<()> {
    for k in 0..WARM_MERCHANTS {
        balances.get(k).get_daily_balance(balance_request(k)).await?;
    }
    Ok(())
}

/// `a / b`, or 0 when there is no `b` to compare with.
pub(super) fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}
