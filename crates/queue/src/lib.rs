//! The contract between the ledger's outbox relay and the consolidators: what
//! a stream message carries, where it goes, and the port the relay publishes
//! through — a Redis Stream in production, an in-process hand-off on a laptop.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use fred::{
    error::ErrorKind,
    prelude::{Builder, Client, ClientLike, Config, EventInterface, ReconnectPolicy, StreamsInterface},
    types::{Value, config::TlsConnector},
};
use secrecy::{ExposeSecret, SecretString};

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
    /// Redis refused or could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
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

/// Appends events to a Redis Stream, one pipelined round trip per batch.
#[derive(Debug, Clone)]
pub struct RedisSink {
    client: Client,
    stream: String,
}

impl RedisSink {
    /// Publishes to `stream` through `client`.
    pub fn new(client: Client, stream: &str) -> Self {
        Self { client, stream: stream.to_owned() }
    }
}

#[async_trait::async_trait]
impl EventSink for RedisSink {
    async fn publish(&self, events: &[StreamEvent]) -> Result<(), PublishError> {
        let pipeline = self.client.pipeline();
        for event in events {
            // No trimming here: the stream is trimmed only below what the group acknowledged.
            let _: () = pipeline.xadd(&self.stream, false, None, "*", event.to_fields()).await?;
        }
        let results: Vec<Value> = pipeline.all().await?;
        if let Some(Value::Null) = results.iter().find(|v| matches!(v, Value::Null)) {
            return Err(PublishError::Consumer("XADD returned no id".into()));
        }
        Ok(())
    }
}

/// Settings for a Redis connection.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]`, or `rediss://` for TLS; secret because of the password.
    pub url: SecretString,
    /// Longest wait for an ordinary command before it fails.
    pub command_timeout: Duration,
    /// PEM file of the certificate authorities that sign the server's certificate, for a
    /// `rediss://` URL (a private CA). `None`: the Mozilla roots built into the binary, which
    /// cover ElastiCache's Amazon-issued certificates.
    pub tls_ca_file: Option<PathBuf>,
}

/// A Redis client that reconnects forever with backoff. It is returned before
/// the first connection succeeds, so a target starts (and its writes keep
/// working) while Redis is down; commands fail after `command_timeout`.
///
/// A `rediss://` URL connects over TLS and verifies the server's certificate and host name.
pub fn client(config: &RedisConfig) -> Result<Client, fred::error::Error> {
    let url = config.url.expose_secret();
    let tls = url.starts_with("rediss://");
    if !tls && config.tls_ca_file.is_some() {
        return Err(fred::error::Error::new(
            ErrorKind::Config,
            "redis.tls_ca_file is set but redis.url is not a rediss:// (TLS) URL",
        ));
    }
    // fred would build its own TLS settings from `rediss://` (from the system's certificate
    // store, which a distroless image may not have): parse the plain form, then set ours.
    let mut redis = if tls {
        Config::from_url(&format!("redis://{}", &url["rediss://".len()..]))?
    } else {
        Config::from_url(url)?
    };
    if tls {
        redis.tls = Some(tls_connector(config.tls_ca_file.as_deref())?.into());
    }
    // Do not let fred retry a command on its own: callers decide what a retry means.
    redis.fail_fast = true;
    let timeout = config.command_timeout;
    let client = Builder::from_config(redis)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(3);
            c.max_command_attempts = 1;
        })
        .with_performance_config(|p| p.default_command_timeout = timeout)
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
        .build()?;
    // Connection failures happen in fred's own task, away from any command: log them, or a
    // refused certificate or password would only ever show up as commands timing out.
    let _errors = client.on_error(|(error, server)| async move {
        tracing::warn!(%error, ?server, "Redis connection failed; reconnecting");
        Ok(())
    });
    let _connection = client.connect();
    Ok(client)
}

/// rustls settings trusting `ca_file` (PEM) or, without one, the built-in Mozilla roots.
fn tls_connector(ca_file: Option<&Path>) -> Result<TlsConnector, fred::error::Error> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let config_error = |message: String| fred::error::Error::new(ErrorKind::Config, message);
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let shown = path.display();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    config_error(format!("redis.tls_ca_file {shown}: cannot read PEM certificates: {e}"))
                })?;
            let (added, _ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(config_error(format!(
                    "redis.tls_ca_file {shown}: no usable CA certificate in it"
                )));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    // The provider is named rather than taken from the process default, which is ambiguous
    // when more than one rustls provider is compiled in.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fred::error::Error::new(ErrorKind::Tls, e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(tls))
}

/// A Redis URL safe to print: any password replaced by `***`.
pub fn redacted_url(url: &SecretString) -> String {
    let url = url.expose_secret();
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://***@{}", &url[at + 1..]),
        _ => url.to_owned(),
    }
}

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

    fn config(url: &str, ca: Option<PathBuf>) -> RedisConfig {
        RedisConfig {
            url: SecretString::from(url.to_owned()),
            command_timeout: Duration::from_secs(1),
            tls_ca_file: ca,
        }
    }

    #[test]
    fn a_ca_file_without_tls_is_a_configuration_error() {
        let error = client(&config("redis://cache:6379", Some("/ca.pem".into()))).unwrap_err();
        assert!(error.to_string().contains("redis.tls_ca_file"), "{error}");
    }

    #[test]
    fn an_unreadable_or_empty_ca_file_names_the_setting() {
        let missing = client(&config("rediss://cache:6379", Some("/nonexistent/ca.pem".into()))).unwrap_err();
        assert!(missing.to_string().contains("redis.tls_ca_file /nonexistent/ca.pem"), "{missing}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = client(&config("rediss://:hunter2@cache:6379", Some(empty))).unwrap_err();
        assert!(error.to_string().contains("no usable CA certificate"), "{error}");
        assert!(!error.to_string().contains("hunter2"));
    }

    #[test]
    fn passwords_are_redacted() {
        let url = SecretString::from("redis://:hunter2@cache:6379/0".to_owned());
        assert_eq!(redacted_url(&url), "redis://***@cache:6379/0");
    }
}
