//! The Redis adapter: a client that reconnects forever (over TLS for
//! `rediss://`), and the [`EventSink`] that appends to a Redis Stream.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use fred::{
    error::ErrorKind,
    prelude::{Builder, Client, ClientLike, Config, EventInterface, ReconnectPolicy, StreamsInterface},
    types::{Value, config::TlsConnector},
};
use secrecy::{ExposeSecret, SecretString};

use crate::{EventSink, PublishError, StreamEvent, StreamNames};

impl From<fred::error::Error> for PublishError {
    fn from(error: fred::error::Error) -> Self {
        Self::Unavailable(format!("redis: {error}"))
    }
}

/// Creates the consumer group (and the stream) if missing. Safe to repeat.
pub async fn ensure_group(client: &Client, names: &StreamNames) -> Result<(), fred::error::Error> {
    let created: Result<(), fred::error::Error> =
        client.xgroup_create(&names.stream, &names.group, "0", true).await;
    match created {
        Err(e) if !e.details().contains("BUSYGROUP") => Err(e),
        _ => Ok(()),
    }
}

/// One consumer group of a stream, as XINFO GROUPS reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// The group's name.
    pub name: String,
    /// Entries not yet delivered to the group; `None` while Redis cannot tell
    /// (for a while after some XDEL/XTRIM).
    pub lag: Option<i64>,
    /// Delivered, not yet acknowledged.
    pub pending: i64,
    /// Consumers the group knows.
    pub consumers: i64,
    /// The id last delivered to the group.
    pub last_delivered: Option<String>,
}

/// The groups of `stream`; none when the stream does not exist.
pub async fn groups(client: &Client, stream: &str) -> Result<Vec<GroupInfo>, fred::error::Error> {
    let reply: Result<Vec<HashMap<String, Value>>, _> = client.xinfo_groups(stream).await;
    let groups = match reply {
        Ok(groups) => groups,
        Err(e) if e.details().contains("no such key") => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let number = |g: &HashMap<String, Value>, key: &str| g.get(key).and_then(Value::as_i64);
    Ok(groups
        .iter()
        .filter_map(|g| {
            Some(GroupInfo {
                name: g.get("name").and_then(Value::as_string)?,
                lag: number(g, "lag"),
                pending: number(g, "pending").unwrap_or(0),
                consumers: number(g, "consumers").unwrap_or(0),
                last_delivered: g.get("last-delivered-id").and_then(Value::as_string),
            })
        })
        .collect())
}

/// Messages delivered to `consumer` of `names`' group and not yet
/// acknowledged (its share of the group's pending entries, XINFO CONSUMERS);
/// 0 for a consumer the group does not know.
pub async fn consumer_pending(
    client: &Client,
    names: &StreamNames,
    consumer: &str,
) -> Result<u64, fred::error::Error> {
    let consumers: Vec<HashMap<String, Value>> = client.xinfo_consumers(&names.stream, &names.group).await?;
    Ok(consumers
        .iter()
        .find(|c| c.get("name").and_then(Value::as_string).as_deref() == Some(consumer))
        .and_then(|c| c.get("pending").and_then(Value::as_u64))
        .unwrap_or(0))
}

/// Where the events of a stream are, measured in one go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStatus {
    /// Messages the stream holds (acknowledged ones until they are trimmed).
    pub length: u64,
    /// Its consumer groups.
    pub groups: Vec<GroupInfo>,
    /// Messages in the dead-letter stream.
    pub dead_letters: u64,
}

impl StreamStatus {
    /// The group named `name`, if it exists.
    pub fn group(&self, name: &str) -> Option<&GroupInfo> {
        self.groups.iter().find(|g| g.name == name)
    }
}

/// Measures `names`' stream, its groups and its dead-letter stream.
pub async fn stream_status(client: &Client, names: &StreamNames) -> Result<StreamStatus, fred::error::Error> {
    Ok(StreamStatus {
        length: client.xlen(&names.stream).await?,
        groups: groups(client, &names.stream).await?,
        dead_letters: client.xlen(&names.dead_letters).await?,
    })
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
