//! A group's dead-letter stream, for operators (`fluxo dlq`): list, show,
//! replay and drop parked messages.

use crate::{StreamEvent, StreamNames};
use fred::{
    prelude::{Client, StreamsInterface},
    types::Value,
};

use super::{ConsumerError, Handler, Message};

/// Dead-letter stream operations for operators.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    client: Client,
    names: StreamNames,
}

/// One parked message.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its id in the dead-letter stream.
    pub id: String,
    /// Why it was parked.
    pub reason: String,
    /// Its id in the main stream.
    pub original_id: String,
    /// How often it had been delivered.
    pub deliveries: String,
    /// The event, when readable.
    pub event: Option<StreamEvent>,
}

impl DeadLetters {
    /// Operations on `names.dead_letters`.
    pub fn new(client: Client, names: StreamNames) -> Self {
        Self { client, names }
    }

    /// Up to `count` parked messages, oldest first.
    pub async fn list(&self, count: u64) -> Result<Vec<DeadLetter>, ConsumerError> {
        let entries: Vec<Message> =
            self.client.xrange_values(&self.names.dead_letters, "-", "+", Some(count)).await?;
        Ok(entries.into_iter().map(to_dead_letter).collect())
    }

    /// One parked message.
    pub async fn show(&self, id: &str) -> Result<DeadLetter, ConsumerError> {
        let entries: Vec<Message> =
            self.client.xrange_values(&self.names.dead_letters, id, id, Some(1)).await?;
        entries.into_iter().next().map(to_dead_letter).ok_or_else(|| ConsumerError::NotFound(id.to_owned()))
    }

    /// Hands a parked message to `handler` again (after its cause was fixed)
    /// and removes it once handled. Handling is idempotent: a message already
    /// handled has no second effect.
    pub async fn replay(&self, id: &str, handler: &impl Handler) -> Result<(), ConsumerError> {
        let letter = self.show(id).await?;
        let event = letter.event.ok_or_else(|| ConsumerError::StillFailing {
            id: id.to_owned(),
            reason: "the message is malformed and can only be dropped".into(),
        })?;
        match handler.handle(std::slice::from_ref(&event)).await.pop() {
            Some(Ok(())) => {
                let _: i64 = self.client.xdel(&self.names.dead_letters, id).await?;
                handler.unpark(&event.event_id).await.map_err(ConsumerError::Handler)?;
                Ok(())
            }
            Some(Err(reason)) => {
                Err(ConsumerError::StillFailing { id: id.to_owned(), reason: reason.to_string() })
            }
            None => Err(ConsumerError::NotFound(id.to_owned())),
        }
    }

    /// Deletes a parked message without applying it.
    pub async fn drop_message(&self, id: &str) -> Result<bool, ConsumerError> {
        let removed: i64 = self.client.xdel(&self.names.dead_letters, id).await?;
        Ok(removed > 0)
    }

    /// How many messages are parked.
    pub async fn count(&self) -> Result<u64, ConsumerError> {
        Ok(self.client.xlen(&self.names.dead_letters).await?)
    }
}

fn to_dead_letter((id, fields): Message) -> DeadLetter {
    let text = |k: &str| fields.get(k).and_then(Value::as_string).unwrap_or_default();
    DeadLetter {
        reason: text("dlq_reason"),
        original_id: text("dlq_original_id"),
        deliveries: text("dlq_deliveries"),
        event: StreamEvent::from_fields(&fields).ok(),
        id,
    }
}
