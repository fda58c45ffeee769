//! The contract between the ledger's outbox relay and the stream's consumers:
//! what a stream message carries, where it goes, the port the relay publishes
//! through ([`EventSink`]) — a Redis Stream in production ([`redis`]), an
//! in-process hand-off on a laptop (in the balance service) — and the
//! consumer-group member every consumer runs ([`consumer`]).

pub mod consumer;
pub mod redis;

use std::collections::HashMap;

use bytes::Bytes;
use fred::types::Value;

/// Field names of a stream message.
mod field {
    pub(crate) const EVENT_ID: &str = "event_id";
    pub(crate) const POSITION: &str = "position";
    pub(crate) const PAYLOAD: &str = "payload";
    pub(crate) const TRACEPARENT: &str = "traceparent";
    pub(crate) const TRACESTATE: &str = "tracestate";
}

/// One ledger event in transit: the outbox row as the consolidator needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEvent {
    /// The event's unique id (consumers deduplicate on it).
    pub event_id: String,
    /// The ledger position (outbox sequence) of the event.
    pub position: i64,
    /// Protobuf-encoded `fluxo.ledger.v1.EntryRecorded`.
    pub payload: Bytes,
    /// W3C trace context of the request that booked the entry.
    pub traceparent: Option<String>,
    /// W3C trace state, when the caller sent one.
    pub tracestate: Option<String>,
}

/// Why a stream message could not be read as a [`StreamEvent`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed stream message: {0}")]
pub struct MalformedMessage(pub String);

impl StreamEvent {
    /// The message's field/value pairs, as written with XADD.
    pub fn to_fields(&self) -> Vec<(&'static str, Value)> {
        let mut fields = vec![
            (field::EVENT_ID, Value::from(self.event_id.as_str())),
            (field::POSITION, Value::from(self.position)),
            (field::PAYLOAD, Value::Bytes(self.payload.clone())),
        ];
        if let Some(tp) = &self.traceparent {
            fields.push((field::TRACEPARENT, Value::from(tp.as_str())));
        }
        if let Some(ts) = &self.tracestate {
            fields.push((field::TRACESTATE, Value::from(ts.as_str())));
        }
        fields
    }

    /// Reads a message's fields back.
    pub fn from_fields(fields: &HashMap<String, Value>) -> Result<Self, MalformedMessage> {
        let text = |name: &str| fields.get(name).and_then(Value::as_string);
        let event_id = text(field::EVENT_ID).ok_or_else(|| MalformedMessage("no event_id".into()))?;
        let position = text(field::POSITION)
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| MalformedMessage(format!("event {event_id}: no numeric position")))?;
        let payload = fields
            .get(field::PAYLOAD)
            .and_then(Value::as_bytes)
            .map(Bytes::copy_from_slice)
            .ok_or_else(|| MalformedMessage(format!("event {event_id}: no payload")))?;
        Ok(Self {
            event_id,
            position,
            payload,
            traceparent: text(field::TRACEPARENT),
            tracestate: text(field::TRACESTATE),
        })
    }
}

/// Links `span` (a relay or consolidator batch) to the trace of every event
/// in it, so each entry's journey continues across the asynchronous hop.
pub fn link_to_events(span: &tracing::Span, events: &[StreamEvent]) {
    use fluxo_telemetry::opentelemetry::KeyValue;
    for event in events {
        fluxo_telemetry::link_to(
            span,
            event.traceparent.as_deref(),
            event.tracestate.as_deref(),
            vec![
                KeyValue::new("messaging.message.id", event.event_id.clone()),
                KeyValue::new("fluxo.outbox.position", event.position),
            ],
        );
    }
}

/// Where the events flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamNames {
    /// The stream the relay appends to.
    pub stream: String,
    /// The consumer group of the consolidators.
    pub group: String,
    /// Where messages that keep failing are parked, with their reason.
    pub dead_letters: String,
}

impl StreamNames {
    /// Names derived from the stream name.
    pub fn new(stream: &str, group: &str) -> Self {
        Self { stream: stream.to_owned(), group: group.to_owned(), dead_letters: format!("{stream}:dlq") }
    }
}

impl Default for StreamNames {
    fn default() -> Self {
        Self::new("fluxo:ledger:entries", "consolidators")
    }
}

/// Why publishing failed; the relay retries later.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The stream's server refused or could not be reached.
    #[error("{0}")]
    Unavailable(String),
    /// The in-process consumer failed.
    #[error("{0}")]
    Consumer(String),
}

/// The relay's outlet: accepts a batch of events durably, or fails as a whole
/// (the relay then leaves them unpublished and retries).
#[async_trait::async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// Publishes `events` in order.
    async fn publish(&self, events: &[StreamEvent]) -> Result<(), PublishError>;
}

/// Publishes to several sinks in turn (on the embedded default: the
/// consolidator, then the notifier). A batch fails when one of them fails;
/// the relay then publishes it again to all, so every sink must take a batch
/// twice with the effect of once (both do: they deduplicate on event ids).
#[derive(Clone)]
pub struct Tee(pub Vec<std::sync::Arc<dyn EventSink>>);

impl std::fmt::Debug for Tee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tee").field("sinks", &self.0.len()).finish()
    }
}

#[async_trait::async_trait]
impl EventSink for Tee {
    async fn publish(&self, events: &[StreamEvent]) -> Result<(), PublishError> {
        for sink in &self.0 {
            sink.publish(events).await?;
        }
        Ok(())
    }
}

pub use redis::{
    GroupInfo, RedisConfig, RedisSink, StreamStatus, client, consumer_pending, ensure_group, groups,
    redacted_url, stream_status,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_round_trips_through_its_fields() {
        let event = StreamEvent {
            event_id: "01JD0000000000000000000000".into(),
            position: 42,
            payload: Bytes::from_static(&[8, 1, 0, 255]),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            tracestate: None,
        };
        let fields: HashMap<String, Value> =
            event.to_fields().into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        assert_eq!(StreamEvent::from_fields(&fields), Ok(event));
    }

    #[test]
    fn a_message_without_payload_is_malformed() {
        let fields = HashMap::from([
            ("event_id".to_owned(), Value::from("e")),
            ("position".to_owned(), Value::from("1")),
        ]);
        assert!(StreamEvent::from_fields(&fields).is_err());
    }
}
