//! Thin gRPC handlers for `fluxo.balance.v1.BalanceService`.

use fluxo_proto::balance_v1::{
    self as pb,
    balance_service_server::{BalanceService, BalanceServiceServer},
};
use std::{future::Future, sync::Arc};

use bytes::Bytes;
use fluxo_server::stream::WatchSettings;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::{
    cache::{BalanceCache, CacheKey, Loaded, Lookup},
    query::{BalanceView, Balances, QueryError},
};

/// `fluxo.balance.v1.BalanceService` over [`Balances`], with an optional shared cache.
#[derive(Debug, Clone)]
pub struct BalanceGrpc {
    balances: Balances,
    cache: Option<BalanceCache>,
    /// Largest message taken in; streamed messages are cut to it (tonic
    /// refuses to send one past four times it).
    max_message_bytes: usize,
    watch: WatchSettings,
}

/// The tonic service.
pub fn server(
    balances: Balances,
    cache: Option<BalanceCache>,
    max_message_bytes: usize,
) -> BalanceServiceServer<BalanceGrpc> {
    server_with(balances, cache, max_message_bytes, WatchSettings::default())
}

/// [`server`], with the watches' behaviour set.
pub fn server_with(
    balances: Balances,
    cache: Option<BalanceCache>,
    max_message_bytes: usize,
    watch: WatchSettings,
) -> BalanceServiceServer<BalanceGrpc> {
    BalanceServiceServer::new(BalanceGrpc { balances, cache, max_message_bytes, watch })
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes.saturating_mul(4))
}

/// A day's balance as the API answers it.
pub fn message(view: &BalanceView) -> pb::DailyBalance {
    pb::DailyBalance {
        merchant_id: view.merchant_id.clone(),
        date: view.day.date.format("%Y-%m-%d").to_string(),
        currency_code: view.currency.clone(),
        total_credits_minor: view.day.credits,
        total_debits_minor: view.day.debits,
        net_minor: view.day.net,
        opening_balance_minor: view.day.opening,
        closing_balance_minor: view.day.closing,
        entry_count: view.day.count,
        as_of: view.as_of_micros.map(fluxo_proto::time::from_micros),
        possibly_stale: view.missing_events,
    }
}

impl From<QueryError> for Status {
    fn from(error: QueryError) -> Self {
        status(&error)
    }
}

fn status(error: &QueryError) -> Status {
    match error {
        QueryError::Invalid(violations) => fluxo_server::status::invalid(error.to_string(), violations),
        QueryError::NoBalances(_) => Status::not_found(error.to_string()),
        QueryError::Store(cause) => fluxo_server::status::store("balance", cause),
    }
}

/// A cache key for a request that names a valid merchant, currency and
/// dates; `None` (no caching) for an invalid one, which the query rejects.
fn cache_key(merchant: &str, currency: &str, dates: &[&str], field: String) -> Option<CacheKey> {
    let valid = fluxo_types::MerchantId::parse(merchant).is_ok()
        && (currency.is_empty() || fluxo_types::Currency::parse(currency).is_ok())
        && dates.iter().all(|d| fluxo_types::BookingDate::parse_date(d).is_ok());
    valid.then(|| CacheKey {
        merchant: merchant.to_owned(),
        currency: if currency.is_empty() { "*".to_owned() } else { currency.to_owned() },
        field,
    })
}

impl BalanceGrpc {
    /// The answer from the cache, or loaded once and cached; when the
    /// database is down, the last known answer marked stale; else UNAVAILABLE.
    ///
    /// `load` makes the database read only when one is needed: a read is a
    /// future of kilobytes, and one built for every call, hits included, would
    /// be copied with the call's future on each of its moves.
    async fn answer<F, Fut>(&self, key: Option<CacheKey>, load: F) -> Result<(Bytes, bool), Status>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Loaded> + Send + 'static,
    {
        let (Some(cache), Some(key)) = (&self.cache, key) else {
            return Box::pin(load()).await.map(|b| (b, false)).map_err(|e| status(&e));
        };
        let generation = match cache.get(&key).await {
            Ok(Lookup::Hit(answer)) => return Ok((answer, false)),
            Ok(Lookup::Miss(generation)) => generation,
            Err(error) => {
                tracing::warn!(%error, "balance cache unreachable; reading the database");
                return Box::pin(load()).await.map(|b| (b, false)).map_err(|e| status(&e));
            }
        };
        match cache.load_once(&key, &generation, load).await {
            Ok(answer) => Ok((answer, false)),
            Err(error) if matches!(&*error, QueryError::Store(e) if e.is_unavailable()) => {
                match cache.last_known(&key).await {
                    Ok(Some(answer)) => Ok((answer, true)),
                    _ => Err(status(&error)),
                }
            }
            Err(error) => Err(status(&error)),
        }
    }
}

fn decode<M: Message + Default>(bytes: &Bytes) -> Result<M, Status> {
    M::decode(bytes.as_ref()).map_err(|_| Status::internal("internal error"))
}

#[tonic::async_trait]
impl BalanceService for BalanceGrpc {
    type ExportDailyBalancesStream = fluxo_server::stream::Streamed<pb::ExportDailyBalancesResponse>;
    type WatchDailyBalancesStream = fluxo_server::stream::Streamed<pb::WatchDailyBalancesResponse>;

    /// Straight from the read model: an export is not cached, and when the
    /// database is down it fails (UNAVAILABLE) rather than answer stale days.
    #[tracing::instrument(name = "balance.ExportDailyBalances", skip_all, fields(merchant_id = %request.get_ref().merchant_id))]
    async fn export_daily_balances(
        &self,
        request: Request<pb::ExportDailyBalancesRequest>,
    ) -> Result<Response<Self::ExportDailyBalancesStream>, Status> {
        use futures::TryStreamExt;
        fluxo_server::identity::authorize(request.metadata(), &request.get_ref().merchant_id)?;
        let r = request.into_inner();
        let budget = self.max_message_bytes;
        let messages = self
            .balances
            .export(&r.merchant_id, &r.start_date, &r.end_date, &r.currency_code)
            .await?
            .map_ok(move |views| {
                let balances = views.iter().map(message).collect();
                let runs = fluxo_server::stream::sized(balances, budget);
                futures::stream::iter(
                    runs.into_iter()
                        .map(|balances| Ok::<_, QueryError>(pb::ExportDailyBalancesResponse { balances })),
                )
            })
            .try_flatten();
        Ok(Response::new(fluxo_server::stream::pump(messages)))
    }

    #[tracing::instrument(name = "balance.WatchDailyBalances", skip_all, fields(merchant_id = %request.get_ref().merchant_id))]
    async fn watch_daily_balances(
        &self,
        request: Request<pb::WatchDailyBalancesRequest>,
    ) -> Result<Response<Self::WatchDailyBalancesStream>, Status> {
        use futures::TryStreamExt;
        fluxo_server::identity::authorize(request.metadata(), &request.get_ref().merchant_id)?;
        let r = request.into_inner();
        let budget = self.max_message_bytes;
        let messages = self
            .balances
            .watch(&r.merchant_id, &r.cursor, r.start_at_end, self.watch.pace)
            .await?
            .map_ok(move |(views, cursor)| {
                let views = views.into_iter().map(|(view, cursor)| (message(&view), cursor)).collect();
                let runs = fluxo_server::stream::sized_with_cursors(views, cursor, budget);
                futures::stream::iter(runs.into_iter().map(|(balances, cursor)| {
                    Ok::<_, QueryError>(pb::WatchDailyBalancesResponse { balances, cursor: cursor.encode() })
                }))
            })
            .try_flatten();
        Ok(Response::new(fluxo_server::stream::pump_live(messages, self.watch.live.clone())))
    }

    #[tracing::instrument(name = "balance.GetDailyBalance", skip_all, fields(merchant_id = %request.get_ref().merchant_id))]
    async fn get_daily_balance(
        &self,
        request: Request<pb::GetDailyBalanceRequest>,
    ) -> Result<Response<pb::DailyBalance>, Status> {
        fluxo_server::identity::authorize(request.metadata(), &request.get_ref().merchant_id)?;
        let r = request.into_inner();
        let key = cache_key(&r.merchant_id, &r.currency_code, &[&r.date], format!("d:{}", r.date));
        let balances = self.balances.clone();
        let load = move || async move {
            let view = balances.daily(&r.merchant_id, &r.date, &r.currency_code).await.map_err(Arc::new)?;
            Ok(Bytes::from(message(&view).encode_to_vec()))
        };
        let (bytes, stale) = self.answer(key, load).await?;
        let mut balance: pb::DailyBalance = decode(&bytes)?;
        balance.possibly_stale |= stale;
        Ok(Response::new(balance))
    }

    #[tracing::instrument(name = "balance.ListDailyBalances", skip_all, fields(merchant_id = %request.get_ref().merchant_id))]
    async fn list_daily_balances(
        &self,
        request: Request<pb::ListDailyBalancesRequest>,
    ) -> Result<Response<pb::ListDailyBalancesResponse>, Status> {
        fluxo_server::identity::authorize(request.metadata(), &request.get_ref().merchant_id)?;
        let r = request.into_inner();
        let field = format!("r:{}:{}", r.start_date, r.end_date);
        let key = cache_key(&r.merchant_id, &r.currency_code, &[&r.start_date, &r.end_date], field);
        let balances = self.balances.clone();
        let load = move || async move {
            let views = balances
                .report(&r.merchant_id, &r.start_date, &r.end_date, &r.currency_code)
                .await
                .map_err(Arc::new)?;
            let response = pb::ListDailyBalancesResponse { balances: views.iter().map(message).collect() };
            Ok(Bytes::from(response.encode_to_vec()))
        };
        let (bytes, stale) = self.answer(key, load).await?;
        let mut response: pb::ListDailyBalancesResponse = decode(&bytes)?;
        for balance in &mut response.balances {
            balance.possibly_stale |= stale;
        }
        Ok(Response::new(response))
    }
}
