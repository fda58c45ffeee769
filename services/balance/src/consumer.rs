//! The consolidators on the ledger's stream: [`Consolidator`] as the
//! [`Handler`] of the consumer-group member every consumer of the stream runs
//! (`fluxo_queue::consumer`).

use async_trait::async_trait;
use fluxo_queue::StreamEvent;
pub use fluxo_queue::consumer::{
    BATCHES_IN_FLIGHT, ConsumerConfig, ConsumerError, DeadLetter, DeadLetters, HandleError, Handler,
    ensure_group,
};

use crate::consolidator::Consolidator;

/// A consolidator reading the stream in the consolidators' group.
pub type StreamConsumer = fluxo_queue::consumer::StreamConsumer<Consolidator>;

/// Applies events to the daily balances: an event and its "applied" record
/// commit in one transaction, so a redelivered event is skipped
/// ([`crate::store::BalanceStore::apply`]).
#[async_trait]
impl Handler for Consolidator {
    async fn handle(&self, events: &[StreamEvent]) -> Vec<Result<(), HandleError>> {
        self.apply(events).await
    }

    async fn park(&self, event: &StreamEvent, reason: &HandleError) -> Result<(), String> {
        Consolidator::park(self, event, reason).await.map_err(|e| e.to_string())
    }

    async fn unpark(&self, event_id: &str) -> Result<(), String> {
        self.store().unpark(event_id).await.map(|_| ()).map_err(|e| e.to_string())
    }
}
