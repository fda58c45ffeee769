//! Thin gRPC handlers: decode the request, call [`Ledger`], encode the answer.

mod status;

use fluxo_proto::ledger_v1::{
    self as pb,
    ledger_service_server::{LedgerService, LedgerServiceServer},
};
use tonic::{Request, Response, Status};

use crate::{
    Booked, Ledger,
    domain::{EntryKind, FilterFields, KindError, RecordCommand, ReverseCommand},
    wire,
};

/// Response header set when an idempotency key replayed an earlier answer.
pub const REPLAYED_HEADER: &str = "fluxo-idempotent-replayed";

/// `fluxo.ledger.v1.LedgerService` over a [`Ledger`].
#[derive(Debug, Clone)]
pub struct LedgerGrpc {
    ledger: Ledger,
}

/// The tonic service, with inbound messages bounded to `max_message_bytes`.
pub fn server(ledger: Ledger, max_message_bytes: usize) -> LedgerServiceServer<LedgerGrpc> {
    LedgerServiceServer::new(LedgerGrpc { ledger })
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes.saturating_mul(4))
}

fn kind(value: i32) -> Result<EntryKind, KindError> {
    match pb::EntryType::try_from(value) {
        Ok(pb::EntryType::Credit) => Ok(EntryKind::Credit),
        Ok(pb::EntryType::Debit) => Ok(EntryKind::Debit),
        Ok(pb::EntryType::Unspecified) => Err(KindError::Missing),
        Err(_) => Err(KindError::Unknown(value)),
    }
}

fn pairs(map: &std::collections::HashMap<String, String>) -> Vec<(&str, &str)> {
    map.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn booked(result: Booked) -> Response<pb::Entry> {
    let replayed = matches!(result, Booked::Replayed(_));
    let mut response = Response::new(wire::entry(result.entry()));
    if replayed {
        response.metadata_mut().insert(REPLAYED_HEADER, tonic::metadata::MetadataValue::from_static("true"));
    }
    response
}

#[tonic::async_trait]
impl LedgerService for LedgerGrpc {
    #[tracing::instrument(name = "ledger.RecordEntry", skip_all, fields(merchant_id = %request.get_ref().merchant_id))]
    async fn record_entry(
        &self,
        request: Request<pb::RecordEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let r = request.get_ref();
        fluxo_server::identity::authorize(request.metadata(), &r.merchant_id)?;
        let command = RecordCommand {
            merchant_id: &r.merchant_id,
            kind: kind(r.r#type),
            amount: r.amount.as_ref().map(|m| (m.currency_code.as_str(), m.minor_units)),
            booking_date: &r.booking_date,
            description: &r.description,
            request_id: &r.request_id,
            metadata: pairs(&r.metadata),
        };
        Ok(booked(self.ledger.record(command).await?))
    }

    #[tracing::instrument(name = "ledger.GetEntry", skip_all, fields(merchant_id = %request.get_ref().merchant_id))]
    async fn get_entry(&self, request: Request<pb::GetEntryRequest>) -> Result<Response<pb::Entry>, Status> {
        let r = request.get_ref();
        fluxo_server::identity::authorize(request.metadata(), &r.merchant_id)?;
        let entry = self.ledger.get(&r.merchant_id, &r.entry_id).await?;
        Ok(Response::new(wire::entry(&entry)))
    }

    #[tracing::instrument(name = "ledger.ListEntries", skip_all, fields(merchant_id = %request.get_ref().merchant_id))]
    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let r = request.get_ref();
        fluxo_server::identity::authorize(request.metadata(), &r.merchant_id)?;
        let at = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| (t.seconds, t.nanos));
        let filter = FilterFields {
            start_date: &r.start_date,
            end_date: &r.end_date,
            kind: Some(kind(r.r#type)),
            metadata: pairs(&r.metadata),
            created_after: at(&r.created_after),
            created_before: at(&r.created_before),
        };
        let page = self.ledger.list(&r.merchant_id, &filter, r.page_size, &r.page_token).await?;
        Ok(Response::new(pb::ListEntriesResponse {
            entries: page.entries.iter().map(wire::entry).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    #[tracing::instrument(name = "ledger.ReverseEntry", skip_all, fields(merchant_id = %request.get_ref().merchant_id))]
    async fn reverse_entry(
        &self,
        request: Request<pb::ReverseEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let r = request.get_ref();
        fluxo_server::identity::authorize(request.metadata(), &r.merchant_id)?;
        let command = ReverseCommand {
            merchant_id: &r.merchant_id,
            entry_id: &r.entry_id,
            request_id: &r.request_id,
            booking_date: &r.booking_date,
            description: &r.description,
            metadata: pairs(&r.metadata),
        };
        Ok(booked(self.ledger.reverse(command).await?))
    }
}
