//! Applying ledger events to the read model: decode, apply a batch in one
//! transaction, and when a batch fails, apply its events one by one so a
//! single bad event cannot hold the others back.
//!
//! Tracing: each batch gets one `consolidate` span (kind consumer) with a span
//! link to the trace of every event in it (the `traceparent` the ledger stored
//! with the event), so the trace of a RecordEntry call leads to the batch that
//! applied it, and the cache invalidation that followed is a child of that span.
//!
//! Metrics: `fluxo.consolidation.delay` (ledger commit → applied, seconds) and
//! `fluxo.consolidator.events` by outcome.

use std::{
    sync::{Arc, LazyLock},
    time::Duration,
};

use chrono::NaiveDate;
use fluxo_proto::ledger_v1 as pb;
use fluxo_queue::{EventSink, PublishError, StreamEvent};
use fluxo_telemetry::opentelemetry::{
    KeyValue,
    metrics::{Counter, Histogram},
};
use prost::Message;
use tracing::Instrument;

use crate::{
    domain::{Direction, Posting},
    store::{Applied, BalanceStore, Parked, StoreError},
};

/// Told which balances changed after each commit (to drop cached copies).
#[async_trait::async_trait]
pub trait OnApplied: Send + Sync + 'static {
    /// Called after `applied` committed.
    async fn applied(&self, applied: &Applied);
}

/// Why an event was not applied (the consumer's [`HandleError`]: the same
/// three cases for every handler of the stream).
pub use fluxo_queue::consumer::HandleError as ApplyError;

struct Metrics {
    delay: Histogram<f64>,
    events: Counter<u64>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let meter = fluxo_telemetry::meter();
    Metrics {
        delay: meter
            .f64_histogram("fluxo.consolidation.delay")
            .with_unit("s")
            .with_description("Time from the ledger commit of an entry to its commit in the daily balances")
            .with_boundaries(fluxo_telemetry::LATENCY_BUCKETS.to_vec())
            .build(),
        events: meter
            .u64_counter("fluxo.consolidator.events")
            .with_unit("{event}")
            .with_description(
                "Ledger events handled by consolidators, by outcome (applied, duplicate, failed, parked)",
            )
            .build(),
    }
});

/// Records what a committed batch did: one delay sample per posting applied now.
fn observe(applied: &Applied) {
    let now = crate::store::now_micros();
    for committed in &applied.committed_at_micros {
        let micros = u64::try_from(now.saturating_sub(*committed)).unwrap_or(0);
        METRICS.delay.record(fluxo_telemetry::seconds(Duration::from_micros(micros)), &[]);
    }
    let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    METRICS.events.add(count(applied.applied), &[KeyValue::new("outcome", "applied")]);
    METRICS.events.add(count(applied.duplicates), &[KeyValue::new("outcome", "duplicate")]);
}

/// The span of one batch, linked to the trace each event was produced in.
fn batch_span(events: &[StreamEvent]) -> tracing::Span {
    let span = tracing::info_span!(
        "consolidate",
        otel.kind = "consumer",
        messaging.operation.type = "process",
        messaging.batch.message_count = events.len(),
        applied = tracing::field::Empty,
        duplicates = tracing::field::Empty,
    );
    fluxo_queue::link_to_events(&span, events);
    span
}

/// Applies events to the read model.
#[derive(Clone)]
pub struct Consolidator {
    store: BalanceStore,
    listeners: Vec<Arc<dyn OnApplied>>,
}

impl std::fmt::Debug for Consolidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consolidator").field("store", &self.store).finish_non_exhaustive()
    }
}

/// Reads an `EntryRecorded` event into a posting.
pub fn decode(event: &StreamEvent) -> Result<Posting, ApplyError> {
    let malformed = |what: &str| ApplyError::Malformed(format!("event {}: {what}", event.event_id));
    let recorded =
        pb::EntryRecorded::decode(event.payload.as_ref()).map_err(|e| malformed(&e.to_string()))?;
    if recorded.event_id != event.event_id {
        return Err(malformed("payload event_id differs from the message's"));
    }
    let entry = recorded.entry.ok_or_else(|| malformed("no entry"))?;
    let amount = entry.amount.as_ref().ok_or_else(|| malformed("no amount"))?;
    let currency =
        fluxo_types::Currency::parse(&amount.currency_code).map_err(|e| malformed(&e.to_string()))?;
    let money =
        fluxo_types::Money::positive(currency, amount.minor_units).map_err(|e| malformed(&e.to_string()))?;
    let merchant =
        fluxo_types::MerchantId::parse(&entry.merchant_id).map_err(|e| malformed(&e.to_string()))?;
    let date: NaiveDate =
        fluxo_types::BookingDate::parse_date(&entry.booking_date).map_err(|e| malformed(&e.to_string()))?;
    let direction = match pb::EntryType::try_from(entry.r#type) {
        Ok(pb::EntryType::Credit) => Direction::Credit,
        Ok(pb::EntryType::Debit) => Direction::Debit,
        _ => return Err(malformed("entry type is neither CREDIT nor DEBIT")),
    };
    let committed = entry.created_at.or(recorded.occurred_at).unwrap_or_default();
    Ok(Posting {
        event_id: event.event_id.clone(),
        entry_id: entry.id,
        merchant_id: merchant.as_str().to_owned(),
        currency: money.currency().code().to_owned(),
        date,
        direction,
        amount: money.minor_units(),
        committed_at_micros: fluxo_proto::time::to_micros(&committed),
    })
}

fn classify(error: &StoreError) -> ApplyError {
    match error {
        StoreError::Unavailable(e) => ApplyError::Unavailable(e.to_string()),
        other => ApplyError::Rejected(other.to_string()),
    }
}

impl Consolidator {
    /// A consolidator writing to `store`.
    pub fn new(store: BalanceStore) -> Self {
        Self { store, listeners: Vec::new() }
    }

    /// Also tells `listener` about every commit (after those added before).
    pub fn with_listener(mut self, listener: Arc<dyn OnApplied>) -> Self {
        self.listeners.push(listener);
        self
    }

    /// The read model.
    pub fn store(&self) -> &BalanceStore {
        &self.store
    }

    /// Applies `events`; one result per event, in order. `Ok` means the event
    /// is in the read model (now or from an earlier delivery) and may be acknowledged.
    pub async fn apply(&self, events: &[StreamEvent]) -> Vec<Result<(), ApplyError>> {
        let span = batch_span(events);
        let results = self.apply_batch(events).instrument(span.clone()).await;
        let failed = results.iter().filter(|r| r.is_err()).count();
        if failed > 0 {
            METRICS
                .events
                .add(u64::try_from(failed).unwrap_or(u64::MAX), &[KeyValue::new("outcome", "failed")]);
        }
        results
    }

    async fn apply_batch(&self, events: &[StreamEvent]) -> Vec<Result<(), ApplyError>> {
        let decoded: Vec<Result<Posting, ApplyError>> = events.iter().map(decode).collect();
        let postings: Vec<Posting> = decoded.iter().filter_map(|d| d.as_ref().ok().cloned()).collect();
        match self.store.apply(&postings).await {
            Ok(applied) => {
                self.notify(&applied).await;
                decoded.into_iter().map(|d| d.map(|_| ())).collect()
            }
            Err(error @ StoreError::Unavailable(_)) => {
                let e = classify(&error);
                decoded.into_iter().map(|_| Err(e.clone())).collect()
            }
            Err(batch_error) => {
                tracing::warn!(error = %batch_error, events = postings.len(), "batch refused; applying events one by one");
                let mut results = Vec::with_capacity(decoded.len());
                for d in decoded {
                    results.push(match d {
                        Err(e) => Err(e),
                        Ok(posting) => match self.store.apply(std::slice::from_ref(&posting)).await {
                            Ok(applied) => {
                                self.notify(&applied).await;
                                Ok(())
                            }
                            Err(e) => Err(classify(&e)),
                        },
                    });
                }
                results
            }
        }
    }

    /// Parks an event the read model refused, so the events behind it go on:
    /// it is kept in the read model's database with its reason, the merchant's
    /// balances from its day on read as possibly stale, and `fluxo dlq` lists,
    /// replays or drops it.
    pub async fn park(&self, event: &StreamEvent, reason: &ApplyError) -> Result<(), StoreError> {
        let posting = decode(event).ok();
        let parked = Parked {
            event_id: event.event_id.clone(),
            merchant_id: posting.as_ref().map(|p| p.merchant_id.clone()),
            date: posting.as_ref().map(|p| p.date),
            reason: reason.to_string(),
            payload: event.payload.to_vec(),
        };
        self.store.park(&parked).await?;
        tracing::error!(event_id = %event.event_id, merchant_id = ?parked.merchant_id, %reason, "event parked: the read model refused it");
        METRICS.events.add(1, &[KeyValue::new("outcome", "parked")]);
        // Cached answers of that merchant must now say "possibly stale".
        if let Some(p) = posting {
            let touched = [(p.merchant_id, p.currency)].into_iter().collect();
            let applied = Applied { touched, ..Applied::default() };
            for listener in &self.listeners {
                listener.applied(&applied).await;
            }
        }
        Ok(())
    }

    async fn notify(&self, applied: &Applied) {
        observe(applied);
        let span = tracing::Span::current();
        span.record("applied", applied.applied);
        span.record("duplicates", applied.duplicates);
        if !applied.touched.is_empty() {
            for listener in &self.listeners {
                listener.applied(applied).await;
            }
        }
    }
}

/// The relay's outlet when no Redis is configured: events go straight into
/// the read model, in process. Used by `fluxo serve` on a laptop.
#[derive(Debug, Clone)]
pub struct InProcessSink {
    consolidator: Consolidator,
}

impl InProcessSink {
    /// Delivers to `consolidator`.
    pub fn new(consolidator: Consolidator) -> Self {
        Self { consolidator }
    }
}

#[async_trait::async_trait]
impl EventSink for InProcessSink {
    /// Delivered when every event is in the read model or parked. Only an
    /// unreachable database fails the batch (the relay retries it): an event
    /// the read model refuses is parked at once, never retried in a loop
    /// that would hold back every merchant's events behind it.
    async fn publish(&self, events: &[StreamEvent]) -> Result<(), PublishError> {
        let results = self.consolidator.apply(events).await;
        let mut unavailable = None;
        for (event, result) in events.iter().zip(results) {
            match result {
                Ok(()) => {}
                Err(e @ ApplyError::Unavailable(_)) => unavailable = Some(e),
                Err(refused) => {
                    self.consolidator.park(event, &refused).await.map_err(|e| {
                        PublishError::Consumer(format!("parking event {}: {e}", event.event_id))
                    })?
                }
            }
        }
        match unavailable {
            None => Ok(()),
            Some(e) => Err(PublishError::Consumer(e.to_string())),
        }
    }
}

/// Wakes the balance watches of the merchants a commit changed (when the
/// consolidator runs in the process that serves them).
#[derive(Debug, Clone, Default)]
pub struct ChangeNotifier(pub Arc<fluxo_server::stream::Signals>);

#[async_trait::async_trait]
impl OnApplied for ChangeNotifier {
    async fn applied(&self, applied: &Applied) {
        self.0.notify(applied.touched.iter().map(|(merchant, _)| merchant.as_str()));
    }
}
