//! Configuration: code defaults, then an optional TOML file, then `FLUXO_*`
//! environment variables (nested keys joined by `__`, e.g.
//! `FLUXO_DATABASE__URL`). The environment wins, so Helm `env:` entries
//! override a mounted file. Everything is validated before anything starts.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::bail;
use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use fluxo_balance::consumer::ConsumerConfig;
use fluxo_ledger::relay::RelayConfig;
use fluxo_queue::StreamNames;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// The whole configuration of a fluxo process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the embedded SQLite database lives when `database.url` is unset.
    pub data_dir: PathBuf,
    pub database: DatabaseConfig,
    pub grpc: GrpcConfig,
    pub ledger: LedgerConfig,
    pub log: LogConfig,
    pub redis: RedisSettings,
    pub relay: RelaySettings,
    pub consolidator: ConsolidatorSettings,
    pub balance: BalanceSettings,
    pub gateway: GatewaySettings,
    pub auth: AuthSettings,
    pub rate_limit: RateLimitSettings,
    pub webhooks: WebhookSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSettings {
    /// Base64 of 32 random bytes: the key that seals subscriptions' signing
    /// secrets at rest. Unset on the embedded default: one is generated in
    /// `data_dir`; unset elsewhere: registering a subscription is refused.
    #[serde(serialize_with = "skip_secret")]
    pub secret_key: Option<SecretString>,
    /// Accept plain `http://` endpoints (tests and closed networks only).
    pub allow_http: bool,
    /// CIDR ranges endpoints may reach although they are private, loopback
    /// or link-local (a receiver inside the network, a test's receiver).
    pub allow_nets: Vec<String>,
    /// The most subscriptions one merchant may hold.
    pub max_subscriptions_per_merchant: u32,
    /// The notifiers' consumer group on the ledger stream.
    pub group: String,
    /// CA certificates (PEM) endpoints are verified with; unset: Mozilla's roots.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout_ms: u64,
    pub response_timeout_ms: u64,
    /// Wait after the first failed attempt; doubled after each one, up to `retry_cap_ms`.
    pub retry_first_ms: u64,
    pub retry_cap_ms: u64,
    /// No attempt later than this after the first: then the delivery is dead-lettered.
    pub give_up_after_secs: u64,
    /// How long a notifier holds a claimed delivery (a killed one's claims run out).
    pub lease_ms: u64,
    pub poll_ms: u64,
    /// Attempts in flight per notifier.
    pub concurrency: u32,
    /// An endpoint failing without a break for this long disables its subscription.
    pub disable_after_secs: u64,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            secret_key: None,
            allow_http: false,
            allow_nets: Vec::new(),
            max_subscriptions_per_merchant: 20,
            group: "notifiers".into(),
            ca_file: None,
            connect_timeout_ms: 5_000,
            response_timeout_ms: 15_000,
            retry_first_ms: 5_000,
            retry_cap_ms: 3_600_000,
            give_up_after_secs: 26 * 3600,
            lease_ms: 60_000,
            poll_ms: 500,
            concurrency: 64,
            disable_after_secs: 5 * 24 * 3600,
        }
    }
}

impl WebhookSettings {
    /// The allow-listed ranges, each bad one named.
    pub fn allowed_nets(&self) -> Result<Vec<ipnet::IpNet>, String> {
        self.allow_nets
            .iter()
            .enumerate()
            .map(|(i, net)| {
                net.parse::<ipnet::IpNet>().map_err(|_| {
                    format!("webhooks.allow_nets[{i}] {net:?} is not a CIDR range such as 10.0.0.0/8")
                })
            })
            .collect()
    }

    /// How the notifier delivers.
    pub fn delivery_settings(&self) -> fluxo_notifier::DeliverySettings {
        let ms = Duration::from_millis;
        fluxo_notifier::DeliverySettings {
            batch: 64,
            concurrency: self.concurrency.max(1) as usize,
            lease: ms(self.lease_ms),
            poll: ms(self.poll_ms),
            disable_after: Duration::from_secs(self.disable_after_secs),
            retries: fluxo_webhooks::Retries {
                first: ms(self.retry_first_ms),
                cap: ms(self.retry_cap_ms),
                give_up_after: Duration::from_secs(self.give_up_after_secs),
            },
        }
    }

    /// Each attempt's limits.
    pub fn limits(&self) -> fluxo_webhooks::Limits {
        fluxo_webhooks::Limits {
            connect: Duration::from_millis(self.connect_timeout_ms),
            response: Duration::from_millis(self.response_timeout_ms),
            ..fluxo_webhooks::Limits::default()
        }
    }

    /// The destination policy endpoints are checked by.
    pub fn policy(&self) -> Result<fluxo_webhooks::DestinationPolicy, String> {
        Ok(fluxo_webhooks::DestinationPolicy::strict()
            .allow_http(self.allow_http)
            .allow_nets(self.allowed_nets()?))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    /// Where the REST/JSON API listens.
    pub listen: SocketAddr,
    /// The ledger's gRPC URL; unset under `--target all`: this process.
    pub ledger_url: Option<String>,
    /// The balance service's gRPC URL; unset under `--target all`: this process.
    pub balance_url: Option<String>,
    pub max_body_bytes: usize,
    pub request_timeout_ms: u64,
    /// How long a client may take to send a request's headers.
    pub header_read_timeout_ms: u64,
    /// Origins allowed by CORS; empty: no CORS headers.
    pub cors_allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    pub issuer: String,
    pub audience: String,
    /// A JWKS document with the RS256/ES256 public keys tokens are signed with.
    pub jwks_file: Option<PathBuf>,
    /// Or the identity provider's JWKS URL, fetched at start and refreshed.
    pub jwks_url: Option<String>,
    pub jwks_refresh_secs: u64,
    /// An HS256 secret (development). Unset with no JWKS on the embedded
    /// default: a development secret is generated in `data_dir`.
    #[serde(serialize_with = "skip_secret")]
    pub hs256_secret: Option<SecretString>,
    pub leeway_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSettings {
    pub per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSettings {
    pub enabled: bool,
    pub tiers: std::collections::BTreeMap<String, TierSettings>,
    pub default_tier: String,
    /// Tiers whose share is reserved: they do not draw from the shared pool.
    pub priority_tiers: Vec<String>,
    /// The pool every non-priority client draws from together.
    pub shared_per_second: u32,
    pub shared_burst: u32,
    /// When Redis is unreachable: `local` (per-process limits), `allow` or `deny`.
    pub on_redis_error: OnRedisError,
    /// Requests whose token is still to be verified (new, forged or missing),
    /// per client address, and of all addresses together.
    pub unverified: TierSettings,
    pub unverified_shared: TierSettings,
    /// Prefix of every rate-limit bucket's Redis key (installations sharing a Redis need their own).
    pub key_prefix: String,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            ledger_url: None,
            balance_url: None,
            max_body_bytes: 64 * 1024,
            request_timeout_ms: 10_000,
            header_read_timeout_ms: 10_000,
            cors_allowed_origins: Vec::new(),
        }
    }
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            issuer: "fluxo".into(),
            audience: "fluxo-api".into(),
            jwks_file: None,
            jwks_url: None,
            jwks_refresh_secs: 300,
            hs256_secret: None,
            leeway_secs: 30,
        }
    }
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            tiers: [
                ("standard".to_owned(), TierSettings { per_second: 100, burst: 200 }),
                ("priority".to_owned(), TierSettings { per_second: 500, burst: 1000 }),
            ]
            .into_iter()
            .collect(),
            default_tier: "standard".into(),
            priority_tiers: vec!["priority".into()],
            shared_per_second: 1000,
            shared_burst: 2000,
            on_redis_error: OnRedisError::Local,
            unverified: TierSettings { per_second: 20, burst: 40 },
            unverified_shared: TierSettings { per_second: 200, burst: 400 },
            key_prefix: fluxo_gateway::ratelimit::DEFAULT_KEY_PREFIX.to_owned(),
        }
    }
}

/// What the rate limiter does while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRedisError {
    /// Each process limits on its own, with the same rates.
    Local,
    /// Every request passes.
    Allow,
    /// Every request is refused.
    Deny,
}

impl From<OnRedisError> for fluxo_gateway::ratelimit::Fallback {
    fn from(choice: OnRedisError) -> Self {
        match choice {
            OnRedisError::Local => Self::Local,
            OnRedisError::Allow => Self::Allow,
            OnRedisError::Deny => Self::Deny,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// `redis://[:password@]host:port[/db]`. Unset: events are delivered in
    /// process (the embedded default) and balances are not cached.
    #[serde(serialize_with = "skip_secret")]
    pub url: Option<SecretString>,
    pub command_timeout_ms: u64,
    /// PEM bundle of the CAs that sign a `rediss://` server's certificate (a private CA).
    /// Unset: the Mozilla roots built into the binary.
    pub tls_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySettings {
    /// Run the outbox relay inside the ledger target.
    pub enabled: bool,
    pub batch_size: u32,
    pub max_idle_ms: u64,
    /// How long published events stay in the outbox before deletion.
    pub retention_hours: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsolidatorSettings {
    pub stream: String,
    pub group: String,
    /// Unique per process; unset: POD_NAME, else host name, plus a random suffix.
    pub consumer_name: Option<String>,
    pub batch_size: u64,
    pub block_ms: u64,
    pub claim_idle_ms: u64,
    pub max_deliveries: u64,
    pub trim_interval_ms: u64,
    /// In a pod (POD_NAME and POD_NAMESPACE set), keep its
    /// `controller.kubernetes.io/pod-deletion-cost` at the number of messages
    /// this consumer holds, so a scale-in deletes idle consolidators first.
    pub pod_deletion_cost: bool,
    /// The least time between two updates of that annotation.
    pub pod_deletion_cost_interval_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalanceSettings {
    /// How long a cached balance lives (it is also dropped on every change).
    pub cache_ttl_ms: u64,
    /// How long the last known balance is kept to answer while PostgreSQL is down.
    pub stale_ttl_ms: u64,
    /// Prefix of every cache key in Redis (installations sharing a Redis need their own).
    pub cache_prefix: String,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self { url: None, command_timeout_ms: 2_000, tls_ca_file: None }
    }
}

/// Whole milliseconds of `d`, for a setting written in milliseconds.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Default for RelaySettings {
    fn default() -> Self {
        let relay = RelayConfig::default();
        Self {
            enabled: true,
            batch_size: relay.batch_size,
            max_idle_ms: millis(relay.max_idle),
            retention_hours: relay.retention.as_secs() / 3600,
        }
    }
}

impl RelaySettings {
    /// The relay's settings as the relay takes them.
    pub fn relay_config(&self) -> RelayConfig {
        RelayConfig {
            batch_size: self.batch_size,
            max_idle: Duration::from_millis(self.max_idle_ms),
            retention: Duration::from_secs(self.retention_hours * 3600),
        }
    }
}

impl Default for ConsolidatorSettings {
    fn default() -> Self {
        let names = StreamNames::default();
        let consumer = ConsumerConfig::new(names.clone(), String::new());
        Self {
            stream: names.stream,
            group: names.group,
            consumer_name: None,
            batch_size: consumer.batch_size,
            block_ms: millis(consumer.block),
            claim_idle_ms: millis(consumer.claim_idle),
            max_deliveries: consumer.max_deliveries,
            trim_interval_ms: millis(consumer.trim_interval),
            pod_deletion_cost: true,
            pod_deletion_cost_interval_ms: 10_000,
        }
    }
}

impl ConsolidatorSettings {
    /// The settings of the consumer named `consumer` reading `names`.
    pub fn consumer_config(&self, names: StreamNames, consumer: String) -> ConsumerConfig {
        ConsumerConfig {
            names,
            consumer,
            batch_size: self.batch_size,
            block: Duration::from_millis(self.block_ms),
            claim_idle: Duration::from_millis(self.claim_idle_ms),
            max_deliveries: self.max_deliveries,
            trim_interval: Duration::from_millis(self.trim_interval_ms),
        }
    }
}

impl Default for BalanceSettings {
    fn default() -> Self {
        Self {
            cache_ttl_ms: 60_000,
            stale_ttl_ms: 24 * 3600 * 1000,
            cache_prefix: fluxo_balance::cache::DEFAULT_PREFIX.to_owned(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://user:password@host/db` or `sqlite://path`. Unset: SQLite in `data_dir`.
    #[serde(serialize_with = "skip_secret")]
    pub url: Option<SecretString>,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
    /// Apply pending migrations when `serve` starts. Unset: yes for SQLite,
    /// no for PostgreSQL, where `fluxo migrate` runs once per release (a Helm hook).
    pub migrate_on_start: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    pub listen: SocketAddr,
    /// Who may call: `open` (loopback only), `mesh` (Istio mTLS and policies)
    /// or `jwt` (a bearer token on every call). The same for every target.
    pub auth: GrpcAuth,
    pub max_message_bytes: usize,
    pub max_concurrent_requests: usize,
    pub request_timeout_ms: u64,
    pub shutdown_delay_ms: u64,
    pub shutdown_timeout_ms: u64,
    pub readiness_interval_ms: u64,
    /// A watch (WatchEntries, WatchDailyBalances) with nothing new sends a
    /// heartbeat this often (ms).
    pub watch_heartbeat_ms: u64,
    /// A watch's reader that has not taken the next message for this long
    /// (ms) is cut off with RESOURCE_EXHAUSTED.
    pub watch_slow_reader_ms: u64,
}

impl GrpcConfig {
    /// How the watches behave: paced by these settings, ended by a slow
    /// reader or by `drain`.
    pub fn watch_settings(
        &self,
        drain: tokio::sync::watch::Receiver<bool>,
    ) -> fluxo_server::stream::WatchSettings {
        fluxo_server::stream::WatchSettings {
            pace: fluxo_server::stream::WatchPace {
                heartbeat: Duration::from_millis(self.watch_heartbeat_ms),
                ..Default::default()
            },
            live: fluxo_server::stream::Live {
                slow_reader: Duration::from_millis(self.watch_slow_reader_ms),
                drain: Some(drain),
            },
        }
    }
}

/// How gRPC callers are authenticated (see `fluxo_server::identity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrpcAuth {
    /// Nobody is asked: only for a loopback listen address.
    #[default]
    Open,
    /// Behind an Istio mesh with the chart's AuthorizationPolicies.
    Mesh,
    /// A bearer token on every call, verified with the `auth` settings.
    Jwt,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// IANA time zone that decides "today" for entries booked without a date.
    pub time_zone: String,
    /// Transactions booking entries at once (group commit); 1 on SQLite.
    pub writers: usize,
    /// Most entries booked in one transaction (1 to 1000).
    pub max_batch: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `auto` (text on a terminal, JSON otherwise), `json` or `pretty`.
    pub format: String,
    /// A tracing filter such as `info` or `fluxo_ledger=debug,info`.
    pub level: String,
}

fn skip_secret<S: serde::Serializer>(url: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    // Defaults are serialized to seed figment; a secret has no default to write.
    match url {
        Some(_) => s.serialize_some("<redacted>"),
        None => s.serialize_none(),
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("fluxo-data"),
            database: DatabaseConfig::default(),
            grpc: GrpcConfig::default(),
            ledger: LedgerConfig::default(),
            log: LogConfig::default(),
            redis: RedisSettings::default(),
            relay: RelaySettings::default(),
            consolidator: ConsolidatorSettings::default(),
            balance: BalanceSettings::default(),
            gateway: GatewaySettings::default(),
            auth: AuthSettings::default(),
            rate_limit: RateLimitSettings::default(),
            webhooks: WebhookSettings::default(),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self { url: None, max_connections: 16, acquire_timeout_ms: 5_000, migrate_on_start: None }
    }
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            auth: GrpcAuth::Open,
            max_message_bytes: 1024 * 1024,
            max_concurrent_requests: 1024,
            request_timeout_ms: 30_000,
            shutdown_delay_ms: 0,
            shutdown_timeout_ms: 20_000,
            readiness_interval_ms: 5_000,
            watch_heartbeat_ms: millis(fluxo_server::stream::WatchPace::default().heartbeat),
            watch_slow_reader_ms: millis(fluxo_server::stream::Live::default().slow_reader),
        }
    }
}

impl Default for LedgerConfig {
    fn default() -> Self {
        let commit = fluxo_ledger::GroupCommit::default();
        Self { time_zone: "UTC".into(), writers: commit.writers, max_batch: commit.max_batch }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: "auto".into(), level: "info,opentelemetry=warn,opentelemetry_sdk=warn".into() }
    }
}

impl Config {
    /// Loads defaults, then `file` if given, then the environment, and validates.
    pub fn load(file: Option<&PathBuf>) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.is_file() {
                bail!("configuration file {} does not exist", file.display());
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        let figment = figment.merge(
            Env::prefixed("FLUXO_")
                // Not configuration keys: the config file's path, the test harness's variables.
                .filter(|key| {
                    let key = key.as_str().to_ascii_lowercase();
                    !(key == "config" || key == "target" || key.starts_with("test_"))
                })
                .split("__"),
        );
        let config: Config = figment.extract().map_err(|e| anyhow::anyhow!(describe(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Every problem of the configuration at once, each naming its setting.
    fn validate(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        self.validate_grpc(&mut problems);
        self.validate_database(&mut problems);
        self.validate_redis(&mut problems);
        self.validate_pipeline(&mut problems);
        self.validate_api(&mut problems);
        self.validate_webhooks(&mut problems);
        if self.log_format().is_err() {
            problems.push(format!("log.format must be auto, json or pretty, got {:?}", self.log.format));
        }
        if problems.is_empty() { Ok(()) } else { bail!("{}", problems.join("\n  ")) }
    }

    fn validate_grpc(&self, problems: &mut Vec<String>) {
        let g = &self.grpc;
        if !(1024..=64 * 1024 * 1024).contains(&g.max_message_bytes) {
            problems.push(format!(
                "grpc.max_message_bytes must be between 1024 and 67108864, got {}",
                g.max_message_bytes
            ));
        }
        if g.auth == GrpcAuth::Open && !g.listen.ip().is_loopback() {
            problems.push(format!(
                "grpc.auth is open (no caller is authenticated) but grpc.listen {} is not a loopback address: \
                 set grpc.auth to mesh (behind Istio mTLS and the chart's policies) or jwt (a bearer token on \
                 every call)",
                g.listen
            ));
        }
        if g.max_concurrent_requests == 0 {
            problems.push("grpc.max_concurrent_requests must be at least 1".to_owned());
        }
        if g.request_timeout_ms == 0 {
            problems.push("grpc.request_timeout_ms must be greater than 0".to_owned());
        }
        if g.readiness_interval_ms == 0 {
            problems.push("grpc.readiness_interval_ms must be greater than 0".to_owned());
        }
        if !(100..=300_000).contains(&g.watch_heartbeat_ms) {
            problems.push(format!(
                "grpc.watch_heartbeat_ms must be between 100 and 300000, got {}",
                g.watch_heartbeat_ms
            ));
        }
        if !(100..=3_600_000).contains(&g.watch_slow_reader_ms) {
            problems.push(format!(
                "grpc.watch_slow_reader_ms must be between 100 and 3600000, got {}",
                g.watch_slow_reader_ms
            ));
        }
    }

    /// The database and what the ledger asks of it.
    fn validate_database(&self, problems: &mut Vec<String>) {
        if self.database.max_connections == 0 {
            problems.push("database.max_connections must be at least 1".to_owned());
        }
        if self.ledger.writers == 0 || self.ledger.writers > self.database.max_connections as usize {
            problems.push(format!(
                "ledger.writers must be between 1 and database.max_connections ({}), got {}",
                self.database.max_connections, self.ledger.writers
            ));
        }
        if !(1..=1000).contains(&self.ledger.max_batch) {
            problems
                .push(format!("ledger.max_batch must be between 1 and 1000, got {}", self.ledger.max_batch));
        }
        if self.time_zone().is_err() {
            problems.push(format!(
                "ledger.time_zone {:?} is not an IANA time zone (such as \"UTC\" or \"America/Sao_Paulo\")",
                self.ledger.time_zone
            ));
        }
        if let Some(url) = &self.database.url {
            let url = secrecy::ExposeSecret::expose_secret(url);
            if !["postgres://", "postgresql://", "sqlite:"].iter().any(|p| url.starts_with(p)) {
                problems
                    .push("database.url must start with postgres://, postgresql:// or sqlite://".to_owned());
            }
        }
    }

    /// Redis and the balance cache kept in it.
    fn validate_redis(&self, problems: &mut Vec<String>) {
        for (setting, prefix) in [
            ("balance.cache_prefix", &self.balance.cache_prefix),
            ("rate_limit.key_prefix", &self.rate_limit.key_prefix),
        ] {
            if prefix.is_empty() || prefix.chars().any(char::is_whitespace) {
                problems.push(format!(
                    "{setting} must be a non-empty Redis key prefix without spaces, got {prefix:?}"
                ));
            }
        }
        if let Some(url) = &self.redis.url {
            let url = secrecy::ExposeSecret::expose_secret(url);
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                problems.push("redis.url must start with redis:// or rediss://".to_owned());
            }
            if self.redis.tls_ca_file.is_some() && !url.starts_with("rediss://") {
                problems
                    .push("redis.tls_ca_file is set but redis.url is not a rediss:// (TLS) URL".to_owned());
            }
        }
        if let Some(ca) = &self.redis.tls_ca_file
            && !ca.is_file()
        {
            problems.push(format!("redis.tls_ca_file {} is not a readable file", ca.display()));
        }
    }

    /// The relay and the consolidators.
    fn validate_pipeline(&self, problems: &mut Vec<String>) {
        let c = &self.consolidator;
        if c.stream.is_empty() || c.group.is_empty() {
            problems.push("consolidator.stream and consolidator.group must not be empty".to_owned());
        }
        if c.batch_size == 0 || self.relay.batch_size == 0 {
            problems.push("consolidator.batch_size and relay.batch_size must be at least 1".to_owned());
        }
        if c.max_deliveries == 0 {
            problems.push("consolidator.max_deliveries must be at least 1".to_owned());
        }
    }

    /// The REST API's rate limits and token keys.
    fn validate_api(&self, problems: &mut Vec<String>) {
        if !self.rate_limit.tiers.contains_key(&self.rate_limit.default_tier) {
            problems.push(format!(
                "rate_limit.default_tier {:?} is not a configured tier",
                self.rate_limit.default_tier
            ));
        }
        let r = &self.rate_limit;
        if r.tiers
            .values()
            .chain([&r.unverified, &r.unverified_shared])
            .any(|t| t.per_second == 0 || t.burst == 0)
        {
            problems.push(
                "rate_limit.tiers, rate_limit.unverified, rate_limit.unverified_shared: per_second and burst \
                 must be at least 1"
                    .to_owned(),
            );
        }
        if let Some(file) = &self.auth.jwks_file
            && !file.is_file()
        {
            problems.push(format!("auth.jwks_file {} does not exist", file.display()));
        }
    }

    /// The subscription API's settings.
    fn validate_webhooks(&self, problems: &mut Vec<String>) {
        let w = &self.webhooks;
        if let Err(problem) = w.allowed_nets() {
            problems.push(problem);
        }
        if let Some(key) = &w.secret_key
            && let Err(error) = fluxo_notifier::Sealer::from_config(key)
        {
            problems.push(error.to_string());
        }
        if w.max_subscriptions_per_merchant == 0 {
            problems.push("webhooks.max_subscriptions_per_merchant must be at least 1".to_owned());
        }
        // An attempt may take its connect and response limits; a shorter lease
        // would let a second notifier send the same delivery while the first waits.
        if w.lease_ms <= w.connect_timeout_ms + w.response_timeout_ms {
            problems.push(format!(
                "webhooks.lease_ms ({}) must exceed webhooks.connect_timeout_ms + response_timeout_ms ({})",
                w.lease_ms,
                w.connect_timeout_ms + w.response_timeout_ms
            ));
        }
        if w.retry_first_ms == 0 || w.retry_cap_ms < w.retry_first_ms {
            problems.push(
                "webhooks.retry_first_ms must be at least 1 and at most webhooks.retry_cap_ms".to_owned(),
            );
        }
        if let Some(file) = &w.ca_file
            && !file.is_file()
        {
            problems.push(format!("webhooks.ca_file {} does not exist", file.display()));
        }
    }

    pub fn time_zone(&self) -> anyhow::Result<chrono_tz::Tz> {
        self.ledger.time_zone.parse::<chrono_tz::Tz>().map_err(|e| anyhow::anyhow!("{e}"))
    }

    pub fn log_format(&self) -> anyhow::Result<fluxo_telemetry::LogFormat> {
        match self.log.format.as_str() {
            "auto" => Ok(fluxo_telemetry::LogFormat::Auto),
            "json" => Ok(fluxo_telemetry::LogFormat::Json),
            "pretty" => Ok(fluxo_telemetry::LogFormat::Pretty),
            other => bail!("unknown log format {other}"),
        }
    }

    /// The database URL: the configured one, or the embedded SQLite file.
    pub fn database_url(&self) -> SecretString {
        match &self.database.url {
            Some(url) => url.clone(),
            None => SecretString::from(format!("sqlite://{}", self.data_dir.join("fluxo.sqlite").display())),
        }
    }

    pub fn db_config(&self) -> fluxo_db::DbConfig {
        fluxo_db::DbConfig {
            url: self.database_url(),
            max_connections: self.database.max_connections,
            acquire_timeout: Duration::from_millis(self.database.acquire_timeout_ms),
        }
    }

    pub fn redis_config(&self) -> Option<fluxo_queue::RedisConfig> {
        self.redis.url.as_ref().map(|url| fluxo_queue::RedisConfig {
            url: url.clone(),
            command_timeout: Duration::from_millis(self.redis.command_timeout_ms),
            tls_ca_file: self.redis.tls_ca_file.clone(),
        })
    }

    pub fn stream_names(&self) -> StreamNames {
        StreamNames::new(&self.consolidator.stream, &self.consolidator.group)
    }

    /// The notifiers' group on the same stream, with a dead-letter stream of its own.
    pub fn notifier_stream_names(&self) -> StreamNames {
        let stream = &self.consolidator.stream;
        StreamNames {
            stream: stream.clone(),
            group: self.webhooks.group.clone(),
            dead_letters: format!("{stream}:{}:dlq", self.webhooks.group),
        }
    }

    pub fn server_config(&self) -> fluxo_server::ServerConfig {
        let g = &self.grpc;
        fluxo_server::ServerConfig {
            listen: g.listen,
            max_concurrent_requests: g.max_concurrent_requests,
            request_timeout: Duration::from_millis(g.request_timeout_ms),
            shutdown_delay: Duration::from_millis(g.shutdown_delay_ms),
            shutdown_timeout: Duration::from_millis(g.shutdown_timeout_ms),
            readiness_interval: Duration::from_millis(g.readiness_interval_ms),
        }
    }
}

/// Figment's errors name the key and where its value came from; keep that,
/// one line per problem.
fn describe(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let key = if e.path.is_empty() { String::new() } else { format!("{}: ", e.path.join(".")) };
            let source = e.metadata.as_ref().map(|m| format!(" (from {})", m.name)).unwrap_or_default();
            format!("{key}{}{source}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("\n  ")
}

/// The location of the embedded database, for the banner and errors.
pub fn context_for(config: &Config) -> String {
    fluxo_db::redacted_url(&config.database_url())
}
