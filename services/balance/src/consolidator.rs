//! Applying ledger events to the read model: decode, apply a batch in one
//! transaction, and when a batch fails, apply its events one by one so a
//! single bad event cannot hold the others back.

use std::sync::Arc;

use chrono::NaiveDate;
use fluxo_proto::ledger_v1 as pb;
use fluxo_queue::{EventSink, PublishError, StreamEvent};
use prost::Message;

use crate::{
    domain::{Direction, Posting},
    store::{Applied, BalanceStore, StoreError},
};

/// Told which balances changed after each commit (to drop cached copies).
#[async_trait::async_trait]
pub trait OnApplied: Send + Sync + 'static {
    /// Called after `applied` committed.
    async fn applied(&self, applied: &Applied);
}

/// Why one event was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The event cannot be read: retrying will not help.
    #[error("undecodable event: {0}")]
    Malformed(String),
    /// The database refused it (a constraint, an overflow, a trigger).
    #[error("rejected by the read model: {0}")]
    Rejected(String),
    /// The database is unreachable: retry later.
    #[error("read model unavailable: {0}")]
    Unavailable(String),
}

/// Applies events to the read model.
#[derive(Clone)]
pub struct Consolidator {
    store: BalanceStore,
    listener: Option<Arc<dyn OnApplied>>,
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
        committed_at_micros: committed
            .seconds
            .saturating_mul(1_000_000)
            .saturating_add(i64::from(committed.nanos / 1_000)),
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
        Self { store, listener: None }
    }

    /// Also tells `listener` about every commit.
    pub fn with_listener(mut self, listener: Arc<dyn OnApplied>) -> Self {
        self.listener = Some(listener);
        self
    }

    /// The read model.
    pub fn store(&self) -> &BalanceStore {
        &self.store
    }

    /// Applies `events`; one result per event, in order. `Ok` means the event
    /// is in the read model (now or from an earlier delivery) and may be acknowledged.
    pub async fn apply(&self, events: &[StreamEvent]) -> Vec<Result<(), ApplyError>> {
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

    async fn notify(&self, applied: &Applied) {
        if let Some(listener) = &self.listener
            && !applied.touched.is_empty()
        {
            listener.applied(applied).await;
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
    async fn publish(&self, events: &[StreamEvent]) -> Result<(), PublishError> {
        let failures: Vec<String> = self
            .consolidator
            .apply(events)
            .await
            .into_iter()
            .filter_map(Result::err)
            .map(|e| e.to_string())
            .collect();
        match failures.first() {
            None => Ok(()),
            Some(first) => {
                Err(PublishError::Consumer(format!("{} events not applied; first: {first}", failures.len())))
            }
        }
    }
}
