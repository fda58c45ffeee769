//! Thin gRPC handlers: decode the request, call [`Ledger`], encode the answer.

mod status;

use fluxo_proto::ledger_v1::{
    self as pb,
    ledger_service_server::{LedgerService, LedgerServiceServer},
};
use futures::TryStreamExt;
use tonic::{Request, Response, Status};

use crate::{
    Booked, Ledger, LedgerError, WatchFrom,
    domain::{
        CloseCommand, EntryKind, FilterFields, KindError, RecordCommand, ReopenCommand, ReverseCommand,
    },
    wire,
};

/// Response header set when an idempotency key replayed an earlier answer.
pub const REPLAYED_HEADER: &str = "fluxo-idempotent-replayed";

/// `fluxo.ledger.v1.LedgerService` over a [`Ledger`].
#[derive(Debug, Clone)]
pub struct LedgerGrpc {
    ledger: Ledger,
    /// Largest message taken in; streamed messages are cut to it (tonic
    /// refuses to send one past four times it).
    max_message_bytes: usize,
    watch: WatchSettings,
}

pub use fluxo_server::stream::WatchSettings;

/// The tonic service, with inbound messages bounded to `max_message_bytes`.
pub fn server(ledger: Ledger, max_message_bytes: usize) -> LedgerServiceServer<LedgerGrpc> {
    server_with(ledger, max_message_bytes, WatchSettings::default())
}

/// [`server`], with the watches' behaviour set.
pub fn server_with(
    ledger: Ledger,
    max_message_bytes: usize,
    watch: WatchSettings,
) -> LedgerServiceServer<LedgerGrpc> {
    LedgerServiceServer::new(LedgerGrpc { ledger, max_message_bytes, watch })
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

type Instant = Option<prost_types::Timestamp>;

/// The filter fields ListEntries and ExportEntries share, as sent.
fn filter_fields<'a>(
    (start_date, end_date): (&'a str, &'a str),
    kind_value: i32,
    metadata: &'a std::collections::HashMap<String, String>,
    (created_after, created_before): (&Instant, &Instant),
) -> FilterFields<'a> {
    let at = |t: &Instant| t.as_ref().map(|t| (t.seconds, t.nanos));
    FilterFields {
        start_date,
        end_date,
        kind: Some(kind(kind_value)),
        metadata: pairs(metadata),
        created_after: at(created_after),
        created_before: at(created_before),
    }
}

fn record_command(r: &pb::RecordEntryRequest) -> RecordCommand<'_> {
    RecordCommand {
        merchant_id: &r.merchant_id,
        kind: kind(r.r#type),
        amount: r.amount.as_ref().map(|m| (m.currency_code.as_str(), m.minor_units)),
        booking_date: &r.booking_date,
        description: &r.description,
        request_id: &r.request_id,
        metadata: pairs(&r.metadata),
    }
}

/// The caller's subject, as the identity layer forwarded it (empty when open).
fn subject<T>(request: &Request<T>) -> String {
    request
        .metadata()
        .get(fluxo_server::identity::SUBJECT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// One entry of a batch as answered.
fn batch_result(result: Result<Booked, LedgerError>) -> pb::BatchRecordResult {
    use pb::batch_record_result::Outcome;
    match result {
        Ok(Booked::New(entry)) => pb::BatchRecordResult {
            outcome: Outcome::Booked.into(),
            entry: Some(wire::entry(&entry)),
            error: None,
        },
        Ok(Booked::Replayed(entry)) => pb::BatchRecordResult {
            outcome: Outcome::Replayed.into(),
            entry: Some(wire::entry(&entry)),
            error: None,
        },
        Err(error) => {
            let status = Status::from(error);
            // The details travel as an encoded google.rpc.Status: the same
            // answer RecordEntry would have given for this entry alone.
            let error = prost::Message::decode(status.details())
                .ok()
                .filter(|s: &fluxo_proto::google::rpc::Status| s.code != 0)
                .unwrap_or_else(|| fluxo_proto::google::rpc::Status {
                    code: status.code() as i32,
                    message: status.message().to_owned(),
                    details: Vec::new(),
                });
            pb::BatchRecordResult { outcome: Outcome::Refused.into(), entry: None, error: Some(error) }
        }
    }
}

fn booked(result: Booked) -> Response<pb::Entry> {
    let replayed = matches!(result, Booked::Replayed(_));
    let mut response = Response::new(wire::entry(result.entry()));
    if replayed {
        response.metadata_mut().insert(REPLAYED_HEADER, tonic::metadata::MetadataValue::from_static("true"));
    }
    response
}

/// A server-streaming answer.
pub type Streamed<T> = fluxo_server::stream::Streamed<T>;

#[tonic::async_trait]
impl LedgerService for LedgerGrpc {
    type ExportEntriesStream = Streamed<pb::ExportEntriesResponse>;
    type WatchEntriesStream = Streamed<pb::WatchEntriesResponse>;

    #[tracing::instrument(
        name = "ledger.BatchRecordEntries",
        skip_all,
        fields(merchant_id = %request.get_ref().merchant_id, entries = request.get_ref().requests.len())
    )]
    async fn batch_record_entries(
        &self,
        request: Request<pb::BatchRecordEntriesRequest>,
    ) -> Result<Response<pb::BatchRecordEntriesResponse>, Status> {
        let r = request.get_ref();
        fluxo_server::identity::authorize(request.metadata(), &r.merchant_id)?;
        let commands = r.requests.iter().map(record_command).collect();
        let results = self.ledger.record_batch(&r.merchant_id, commands).await?;
        // When the store is down for every entry, the call fails as a whole,
        // so clients and the mesh retry it like any unavailable call.
        let unavailable =
            |r: &Result<Booked, LedgerError>| matches!(r, Err(LedgerError::Store(e)) if e.is_unavailable());
        if !results.is_empty() && results.iter().all(unavailable) {
            if let Some(Err(error)) = results.into_iter().next() {
                return Err(error.into());
            }
            return Err(Status::internal("unreachable"));
        }
        Ok(Response::new(pb::BatchRecordEntriesResponse {
            results: results.into_iter().map(batch_result).collect(),
        }))
    }

    #[tracing::instrument(name = "ledger.ExportEntries", skip_all, fields(merchant_id = %request.get_ref().merchant_id))]
    async fn export_entries(
        &self,
        request: Request<pb::ExportEntriesRequest>,
    ) -> Result<Response<Self::ExportEntriesStream>, Status> {
        let r = request.get_ref();
        fluxo_server::identity::authorize(request.metadata(), &r.merchant_id)?;
        let filter = filter_fields(
            (&r.start_date, &r.end_date),
            r.r#type,
            &r.metadata,
            (&r.created_after, &r.created_before),
        );
        let budget = self.max_message_bytes;
        let messages = self
            .ledger
            .export(&r.merchant_id, &filter)?
            .map_ok(move |chunk| {
                let entries = chunk.iter().map(wire::entry).collect();
                let runs = fluxo_server::stream::sized(entries, budget);
                futures::stream::iter(
                    runs.into_iter()
                        .map(|entries| Ok::<_, LedgerError>(pb::ExportEntriesResponse { entries })),
                )
            })
            .try_flatten();
        Ok(Response::new(fluxo_server::stream::pump(messages)))
    }

    #[tracing::instrument(name = "ledger.WatchEntries", skip_all, fields(merchant_id = %request.get_ref().merchant_id))]
    async fn watch_entries(
        &self,
        request: Request<pb::WatchEntriesRequest>,
    ) -> Result<Response<Self::WatchEntriesStream>, Status> {
        let r = request.get_ref();
        fluxo_server::identity::authorize(request.metadata(), &r.merchant_id)?;
        let from = WatchFrom { cursor: &r.cursor, start_at_end: r.start_at_end };
        let budget = self.max_message_bytes;
        let messages = self
            .ledger
            .watch(&r.merchant_id, from, self.watch.pace)
            .await?
            .map_ok(move |batch| {
                let entries =
                    batch.entries.iter().map(|(entry, cursor)| (wire::entry(entry), cursor)).collect();
                let runs = fluxo_server::stream::sized_with_cursors(entries, &batch.cursor, budget);
                let messages: Vec<_> = runs
                    .into_iter()
                    .map(|(entries, cursor)| {
                        Ok::<_, LedgerError>(pb::WatchEntriesResponse { entries, cursor: cursor.encode() })
                    })
                    .collect();
                futures::stream::iter(messages)
            })
            .try_flatten();
        Ok(Response::new(fluxo_server::stream::pump_live(messages, self.watch.live.clone())))
    }

    #[tracing::instrument(name = "ledger.ClosePeriod", skip_all, fields(merchant_id = %request.get_ref().merchant_id))]
    async fn close_period(
        &self,
        request: Request<pb::ClosePeriodRequest>,
    ) -> Result<Response<pb::PeriodClose>, Status> {
        let r = request.get_ref();
        fluxo_server::identity::authorize_close(request.metadata(), &r.merchant_id)?;
        let command =
            CloseCommand { merchant_id: &r.merchant_id, closed_through: &r.closed_through, note: &r.note };
        let close = self.ledger.close_period(command, &subject(&request)).await?;
        tracing::info!(closed_through = %close.closed_through, entries = close.entry_count, "books closed");
        Ok(Response::new(wire::period_close(&close)))
    }

    #[tracing::instrument(name = "ledger.ReopenPeriod", skip_all, fields(merchant_id = %request.get_ref().merchant_id))]
    async fn reopen_period(
        &self,
        request: Request<pb::ReopenPeriodRequest>,
    ) -> Result<Response<pb::PeriodClose>, Status> {
        let r = request.get_ref();
        fluxo_server::identity::authorize_close(request.metadata(), &r.merchant_id)?;
        let command = ReopenCommand { merchant_id: &r.merchant_id, reason: &r.reason };
        let close = self.ledger.reopen_period(command, &subject(&request)).await?;
        tracing::warn!(closed_through = %close.closed_through, "books reopened");
        Ok(Response::new(wire::period_close(&close)))
    }

    #[tracing::instrument(name = "ledger.ListPeriodCloses", skip_all, fields(merchant_id = %request.get_ref().merchant_id))]
    async fn list_period_closes(
        &self,
        request: Request<pb::ListPeriodClosesRequest>,
    ) -> Result<Response<pb::ListPeriodClosesResponse>, Status> {
        let r = request.get_ref();
        fluxo_server::identity::authorize(request.metadata(), &r.merchant_id)?;
        let closes = self.ledger.period_closes(&r.merchant_id).await?;
        Ok(Response::new(pb::ListPeriodClosesResponse {
            closes: closes.iter().map(wire::period_close).collect(),
        }))
    }

    #[tracing::instrument(name = "ledger.RecordEntry", skip_all, fields(merchant_id = %request.get_ref().merchant_id))]
    async fn record_entry(
        &self,
        request: Request<pb::RecordEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let r = request.get_ref();
        fluxo_server::identity::authorize(request.metadata(), &r.merchant_id)?;
        Ok(booked(self.ledger.record(record_command(r)).await?))
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
        let filter = filter_fields(
            (&r.start_date, &r.end_date),
            r.r#type,
            &r.metadata,
            (&r.created_after, &r.created_before),
        );
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
