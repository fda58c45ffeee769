//! Thin gRPC handlers for `fluxo.balance.v1.BalanceService`.

use fluxo_proto::balance_v1::{
    self as pb,
    balance_service_server::{BalanceService, BalanceServiceServer},
};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    query::{BalanceView, Balances, QueryError},
    store::StoreError,
};

/// `fluxo.balance.v1.BalanceService` over [`Balances`].
#[derive(Debug, Clone)]
pub struct BalanceGrpc {
    balances: Balances,
}

/// The tonic service.
pub fn server(balances: Balances, max_message_bytes: usize) -> BalanceServiceServer<BalanceGrpc> {
    BalanceServiceServer::new(BalanceGrpc { balances })
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes.saturating_mul(4))
}

pub(crate) fn message(view: &BalanceView) -> pb::DailyBalance {
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
        as_of: view.as_of_micros.map(|us| prost_types::Timestamp {
            seconds: us.div_euclid(1_000_000),
            nanos: i32::try_from(us.rem_euclid(1_000_000) * 1_000).unwrap_or(0),
        }),
        possibly_stale: false,
    }
}

impl From<QueryError> for Status {
    fn from(error: QueryError) -> Self {
        let text = error.to_string();
        match error {
            QueryError::Invalid(violations) => {
                let mut details = ErrorDetails::new();
                for v in violations.list() {
                    details.add_bad_request_violation(v.field.clone(), v.description.clone());
                }
                Status::with_error_details(Code::InvalidArgument, text, details)
            }
            QueryError::NoBalances(_) => Status::not_found(text),
            // Retryable, and never a guessed number.
            QueryError::Store(StoreError::Unavailable(cause)) => {
                tracing::warn!(error = %cause, "read model unavailable");
                Status::unavailable("the balance database is unavailable; retry later")
            }
            QueryError::Store(cause) => {
                tracing::error!(error = %cause, "read model failure");
                Status::internal("internal error")
            }
        }
    }
}

#[tonic::async_trait]
impl BalanceService for BalanceGrpc {
    #[tracing::instrument(name = "balance.GetDailyBalance", skip_all, fields(merchant_id = %request.get_ref().merchant_id))]
    async fn get_daily_balance(
        &self,
        request: Request<pb::GetDailyBalanceRequest>,
    ) -> Result<Response<pb::DailyBalance>, Status> {
        let r = request.get_ref();
        let view = self
            .balances
            .daily(&r.merchant_id, &r.date, &r.currency_code)
            .await?;
        Ok(Response::new(message(&view)))
    }

    #[tracing::instrument(name = "balance.ListDailyBalances", skip_all, fields(merchant_id = %request.get_ref().merchant_id))]
    async fn list_daily_balances(
        &self,
        request: Request<pb::ListDailyBalancesRequest>,
    ) -> Result<Response<pb::ListDailyBalancesResponse>, Status> {
        let r = request.get_ref();
        let views = self
            .balances
            .report(&r.merchant_id, &r.start_date, &r.end_date, &r.currency_code)
            .await?;
        Ok(Response::new(pb::ListDailyBalancesResponse {
            balances: views.iter().map(message).collect(),
        }))
    }
}
