//! Starting targets: connect, migrate when asked, wire the pipeline, serve, drain.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, bail};
use fluxo_balance::{
    BalanceStore, Balances, Consolidator, InProcessSink,
    cache::{BalanceCache, Invalidator},
    consumer::{StreamConsumer, ensure_group},
};
use fluxo_db::{Db, backend_name};
use fluxo_ledger::{GroupCommit, Ledger, LedgerStore, relay::Relay};
use fluxo_queue::{EventSink, RedisSink, StreamNames};
use fluxo_server::{AllReady, GrpcServer, Readiness, identity::CallerAuth};
use sea_orm::DbBackend;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    Target,
    config::{Config, GrpcAuth},
};

pub fn telemetry(config: &Config, target: &str) -> anyhow::Result<fluxo_telemetry::Telemetry> {
    Ok(fluxo_telemetry::init(&fluxo_telemetry::TelemetryConfig {
        service_name: format!("fluxo-{target}"),
        log_format: config.log_format()?,
        log_filter: std::env::var("RUST_LOG").unwrap_or_else(|_| config.log.level.clone()),
    })?)
}

/// Applies every pending migration of every service.
pub async fn migrate_all(db: &Db) -> anyhow::Result<()> {
    LedgerStore::migrate(db).await.context("applying ledger migrations")?;
    BalanceStore::migrate(db).await.context("applying balance migrations")?;
    fluxo_notifier::SubscriptionStore::migrate(db).await.context("applying notifier migrations")?;
    Ok(())
}

/// A Redis client for a consumer's blocking reads, which hold their
/// connection for their whole wait: one of their own.
fn reader_client(config: &Config) -> anyhow::Result<fred::prelude::Client> {
    let settings = config.redis_config().context("redis settings")?;
    Ok(fluxo_queue::client(&fluxo_queue::RedisConfig {
        command_timeout: Duration::from_millis(config.consolidator.block_ms) + settings.command_timeout,
        ..settings
    })?)
}

/// Creates `names`' group (Redis may be down, or the group missing: it keeps
/// trying), then consumes until `stop`.
async fn consume<H: fluxo_queue::consumer::Handler>(
    client: fred::prelude::Client,
    names: StreamNames,
    consumer: fluxo_queue::consumer::StreamConsumer<H>,
    stop: watch::Receiver<bool>,
) {
    let mut attempt = 0u32;
    while let Err(error) = ensure_group(&client, &names).await {
        attempt += 1;
        if attempt == 1 || attempt.is_multiple_of(10) {
            tracing::warn!(%error, group = %names.group, "cannot create the consumer group yet; retrying");
        }
        tokio::select! {
            () = stopped(stop.clone()) => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    tracing::info!(group = %names.group, "consuming the ledger stream");
    consumer.run(stopped(stop)).await;
}

/// A unique consumer name: the pod (or host) name and a random suffix, so a
/// restarted process never inherits a dead one's pending messages by name.
fn consumer_name(config: &Config) -> String {
    if let Some(name) = &config.consolidator.consumer_name {
        return name.clone();
    }
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "fluxo".to_owned());
    let suffix = ulid::Ulid::new().to_string();
    format!("{host}-{}", &suffix[suffix.len() - 6..])
}

/// Waits until the shared stop signal fires.
/// How often a consolidator measures the messages it holds (its pod-deletion cost).
const HELD_INTERVAL: Duration = Duration::from_secs(2);

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// What every target opens first: the database (migrated when configured
/// to be) and, when configured, the Redis client.
async fn open_stores(config: &Config) -> anyhow::Result<(Db, Option<fred::prelude::Client>)> {
    let db = open_for_serving(config).await?;
    if config.database.migrate_on_start.unwrap_or(db.backend() == DbBackend::Sqlite) {
        migrate_all(&db).await?;
        tracing::info!("schema is current");
    }
    let redis = match config.redis_config() {
        Some(settings) => Some(fluxo_queue::client(&settings).context("configuring Redis")?),
        None => None,
    };
    Ok((db, redis))
}

/// Where a started process answers, written to `--ready-file` once it serves
/// (JSON), so scripts and tests need not read the banner.
#[derive(Debug, serde::Serialize)]
struct Ready<'a> {
    target: &'a str,
    grpc: std::net::SocketAddr,
    rest: Option<std::net::SocketAddr>,
    /// The development token, when one was minted (embedded default only).
    token: Option<&'a str>,
}

/// Writes `ready` to `path` whole: to a temporary file first, then renamed,
/// so a reader never sees half of it.
fn write_ready_file(path: &std::path::Path, ready: &Ready<'_>) -> anyhow::Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, serde_json::to_vec(ready)?)
        .with_context(|| format!("cannot write the ready file {}", partial.display()))?;
    std::fs::rename(&partial, path)
        .with_context(|| format!("cannot write the ready file {}", path.display()))?;
    Ok(())
}

/// Runs `target` until SIGTERM or Ctrl-C; writes `ready_file`, when given,
/// once every part serves.
pub async fn serve(
    config: Config,
    target: Target,
    ready_file: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let name = format!("{target:?}").to_lowercase();
    let runs = |t: Target| target == Target::All || target == t;
    let telemetry = telemetry(&config, &name)?;
    let (db, redis) = open_stores(&config).await?;
    if target == Target::Consolidator && redis.is_none() {
        bail!("the consolidator target reads the Redis stream: set redis.url (FLUXO_REDIS__URL)");
    }
    if target == Target::Notifier && redis.is_none() {
        bail!("the notifier target reads the Redis stream: set redis.url (FLUXO_REDIS__URL)");
    }

    // Shutdown runs front to back: the REST gateway drains first (its calls go
    // to the gRPC services, in this process under --target all), then gRPC,
    // then the background work (relay, consumers) finishes its batch in hand.
    let (front_tx, front_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = GrpcServer::bind(config.server_config()).await?;
    let addr = server.local_addr()?;
    // Tokens are verified by the gateway, and by gRPC itself under grpc.auth = jwt.
    let serves_api = runs(Target::Ledger) || runs(Target::Balance);
    let callers = if runs(Target::Gateway) || (config.grpc.auth == GrpcAuth::Jwt && serves_api) {
        Some(keys(&config, &db).await?)
    } else {
        None
    };
    let mut process = Process::new(&config, db.clone(), redis.clone(), server, stop_rx);
    if runs(Target::Notifier) {
        // Before the ledger: without Redis its relay hands events to the notifier in process.
        process.notifier = Some(process.notifier()?);
    }
    if let (GrpcAuth::Jwt, Some(callers)) = (config.grpc.auth, &callers) {
        process.server.authenticate(CallerAuth::Jwt(callers.verifier.clone()));
    }
    if runs(Target::Ledger) {
        process.add_ledger().await?;
    }
    if runs(Target::Balance) {
        process.add_balance().await;
    }
    if runs(Target::Consolidator) {
        process.add_consolidator().await?;
    }
    if runs(Target::Notifier) {
        process.add_notifier().await;
    }
    let mut rest = None;
    if let (true, Some(callers)) = (runs(Target::Gateway), &callers) {
        rest = Some((
            process.add_gateway(addr, callers.verifier.clone(), front_rx).await?,
            callers.token.clone(),
        ));
    }
    let (mut server, checks, tasks) = process.finish();
    server.add_reflection(fluxo_proto::FILE_DESCRIPTOR_SET)?;
    tracing::info!(%addr, targets = %name, otlp = telemetry.exporting(), redis = redis.is_some(), "listening");
    banner(&config, &db, &name, addr, redis.is_some(), rest.as_ref());
    if let Some(path) = &ready_file {
        let (rest_addr, token) = rest.as_ref().map_or((None, None), |(a, t)| (Some(*a), t.as_deref()));
        write_ready_file(path, &Ready { target: &name, grpc: addr, rest: rest_addr, token })?;
    }

    let signal = async move {
        fluxo_server::shutdown_signal().await;
        let _ = front_tx.send(true);
    };
    let result = server.serve(Arc::new(AllReady(checks)), signal).await;
    // The server has drained; background work finishes its batch in hand.
    let _ = stop_tx.send(true);
    let drain = Duration::from_millis(config.grpc.shutdown_timeout_ms);
    for task in tasks {
        if tokio::time::timeout(drain, task).await.is_err() {
            tracing::warn!("a background task did not stop within the shutdown deadline");
        }
    }
    if let Err(error) = db.close().await {
        tracing::warn!(%error, "closing the database pool");
    }
    telemetry.shutdown();
    Ok(result?)
}

/// One process being wired: what its targets share (database, Redis, the
/// gRPC server, the read model and its cache) and what they add to it (gRPC
/// services, readiness checks, background tasks). One `add_*` per target.
struct Process<'a> {
    config: &'a Config,
    db: Db,
    redis: Option<fred::prelude::Client>,
    server: GrpcServer,
    checks: Vec<Arc<dyn Readiness>>,
    // A part of this process reads or writes the read model: its readiness
    // check is registered once, however many do.
    needs_read_model: bool,
    tasks: Vec<JoinHandle<()>>,
    stop: watch::Receiver<bool>,
    cache: Option<BalanceCache>,
    consolidator: Consolidator,
    /// The read model's changes made in this process, for the balance watches.
    changes: Arc<fluxo_server::stream::Signals>,
    /// The notifier, when this process runs it.
    notifier: Option<fluxo_notifier::Notifier>,
}

impl<'a> Process<'a> {
    fn new(
        config: &'a Config,
        db: Db,
        redis: Option<fred::prelude::Client>,
        server: GrpcServer,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let cache = redis.as_ref().map(|client| {
            BalanceCache::new(client.clone(), config.balance.cache_ttl_ms, config.balance.stale_ttl_ms)
                .with_prefix(&config.balance.cache_prefix)
        });
        let mut consolidator = Consolidator::new(BalanceStore::new(db.clone()));
        if let Some(cache) = &cache {
            // Every commit to the read model drops the cached answers it changed.
            consolidator = consolidator.with_listener(Arc::new(Invalidator(cache.clone())));
        }
        // ... and wakes this process's balance watches of the merchants it changed.
        let changes = Arc::new(fluxo_server::stream::Signals::default());
        consolidator = consolidator.with_listener(Arc::new(fluxo_balance::ChangeNotifier(changes.clone())));
        Self {
            config,
            db,
            redis,
            server,
            checks: Vec::new(),
            needs_read_model: false,
            tasks: Vec::new(),
            stop,
            cache,
            consolidator,
            changes,
            notifier: None,
        }
    }

    /// The ledger's gRPC service and, unless switched off, its outbox relay:
    /// to the Redis stream, or without Redis straight into the read model.
    async fn add_ledger(&mut self) -> anyhow::Result<()> {
        let config = self.config;
        let store = LedgerStore::with_group_commit(
            self.db.clone(),
            GroupCommit { writers: config.ledger.writers, max_batch: config.ledger.max_batch },
        );
        let commits = store.commits();
        let ledger = Ledger::new(store, config.time_zone()?);
        self.server
            .add_service(fluxo_ledger::grpc::server_with(
                ledger,
                config.grpc.max_message_bytes,
                config.grpc.watch_settings(self.server.draining()),
            ))
            .await;
        self.checks.push(Arc::new(fluxo_ledger::readiness(self.db.clone())));
        self.server.add_service(fluxo_notifier::grpc::server(self.subscriptions()?)).await;
        self.checks.push(Arc::new(fluxo_notifier::readiness(self.db.clone())));
        if config.relay.enabled {
            let sink: Arc<dyn EventSink> = match &self.redis {
                Some(client) => Arc::new(RedisSink::new(client.clone(), &config.consolidator.stream)),
                None => {
                    self.needs_read_model = true;
                    let consolidator: Arc<dyn EventSink> =
                        Arc::new(InProcessSink::new(self.consolidator.clone()));
                    match &self.notifier {
                        Some(notifier) => {
                            Arc::new(fluxo_queue::Tee(vec![consolidator, Arc::new(notifier.clone())]))
                        }
                        None => consolidator,
                    }
                }
            };
            let relay = Relay::new(self.db.clone(), sink, config.relay.relay_config(), commits);
            self.tasks.push(tokio::spawn(relay.run(stopped(self.stop.clone()))));
        }
        Ok(())
    }

    /// The webhook subscription API (served beside the ledger, whose
    /// database holds the subscriptions the notifier delivers to).
    fn subscriptions(&self) -> anyhow::Result<fluxo_notifier::Subscriptions> {
        let w = &self.config.webhooks;
        let key = match &w.secret_key {
            Some(key) => Some(key.clone()),
            None if self.db.backend() == DbBackend::Sqlite => Some(
                fluxo_notifier::dev_key(&self.config.data_dir)
                    .context("creating the development webhook key")?,
            ),
            None => {
                tracing::warn!("webhooks.secret_key is unset: registering webhook subscriptions is refused");
                None
            }
        };
        let sealer = key.map(|k| fluxo_notifier::Sealer::from_config(&k)).transpose()?;
        let settings = fluxo_notifier::Settings {
            policy: w.policy().map_err(anyhow::Error::msg)?,
            max_per_merchant: w.max_subscriptions_per_merchant,
            ..fluxo_notifier::Settings::default()
        };
        Ok(fluxo_notifier::Subscriptions::new(
            fluxo_notifier::SubscriptionStore::new(self.db.clone()),
            sealer,
            settings,
        )
        .with_balances(Balances::new(self.consolidator.store().clone())))
    }

    /// The notifier: subscriptions, the sender (trusting `webhooks.ca_file`
    /// or Mozilla's roots) and the delivery settings.
    fn notifier(&self) -> anyhow::Result<fluxo_notifier::Notifier> {
        let w = &self.config.webhooks;
        let sender = fluxo_webhooks::Sender::new(
            w.policy().map_err(anyhow::Error::msg)?,
            w.ca_file.as_deref(),
            w.limits(),
        )
        .context("webhooks.ca_file")?;
        Ok(fluxo_notifier::Notifier::new(self.subscriptions()?, sender, w.delivery_settings())
            .with_balances(Balances::new(self.consolidator.store().clone()))
            .with_ledger(LedgerStore::new(self.db.clone())))
    }

    /// The notifier's delivery loop and, with Redis, its member of the
    /// notifiers' consumer group (without Redis the relay hands it events).
    async fn add_notifier(&mut self) {
        let Some(notifier) = self.notifier.clone() else { return };
        self.checks.push(Arc::new(fluxo_notifier::readiness(self.db.clone())));
        let delivering = notifier.clone();
        let stop = self.stop.clone();
        self.tasks.push(tokio::spawn(async move { delivering.run(stopped(stop)).await }));
        let Some(client) = self.redis.clone() else { return };
        let config = self.config;
        let reader = match reader_client(config) {
            Ok(reader) => reader,
            Err(error) => {
                tracing::error!(%error, "cannot configure the notifier's Redis reader");
                return;
            }
        };
        let names = config.notifier_stream_names();
        let consumer = fluxo_queue::consumer::StreamConsumer::new(
            reader,
            client.clone(),
            notifier,
            config.consolidator.consumer_config(names.clone(), consumer_name(config)),
        );
        self.tasks.push(tokio::spawn(consume(client, names, consumer, self.stop.clone())));
    }

    /// The balance queries' gRPC service, over the shared cache.
    async fn add_balance(&mut self) {
        let balances = Balances::new(self.consolidator.store().clone()).with_changes(self.changes.clone());
        let service = fluxo_balance::grpc::server_with(
            balances,
            self.cache.clone(),
            self.config.grpc.max_message_bytes,
            self.config.grpc.watch_settings(self.server.draining()),
        );
        self.server.add_service(service).await;
        self.needs_read_model = true;
    }

    /// A consumer of the Redis stream applying events to the read model
    /// (nothing to add without Redis: the relay delivers in process then).
    async fn add_consolidator(&mut self) -> anyhow::Result<()> {
        let Some(client) = self.redis.clone() else { return Ok(()) };
        let config = self.config;
        let reader = reader_client(config)?;
        let names = config.stream_names();
        let name = consumer_name(config);
        let consumer = StreamConsumer::new(
            reader,
            client.clone(),
            self.consolidator.clone(),
            config.consolidator.consumer_config(names.clone(), name.clone()),
        );
        self.add_deletion_cost(client.clone(), names.clone(), name).await;
        self.needs_read_model = true;
        self.tasks.push(tokio::spawn(consume(client, names, consumer, self.stop.clone())));
        Ok(())
    }

    /// In a pod, keeps its deletion cost at the messages consumer `name` holds
    /// (see [`fluxo_kube::DeletionCost`]). Measured by a task of its own, so a
    /// consumer stuck on its database still reports the work it holds.
    async fn add_deletion_cost(&mut self, client: fred::prelude::Client, names: StreamNames, name: String) {
        let settings = &self.config.consolidator;
        if !settings.pod_deletion_cost || fluxo_kube::own_pod().is_none() {
            return;
        }
        let Some(reporter) = fluxo_kube::DeletionCost::for_own_pod().await else { return };
        let reporter = reporter.min_interval(Duration::from_millis(settings.pod_deletion_cost_interval_ms));
        let (held, watched) = watch::channel(0);
        self.tasks.push(tokio::spawn(reporter.run(watched, stopped(self.stop.clone()))));
        let stop = self.stop.clone();
        self.tasks.push(tokio::spawn(async move {
            loop {
                match fluxo_queue::consumer_pending(&client, &names, &name).await {
                    Ok(pending) => {
                        if held.send_if_modified(|last| std::mem::replace(last, pending) != pending) {
                            tracing::debug!(pending, "messages this consumer holds");
                        }
                    }
                    Err(error) => tracing::debug!(%error, "cannot measure the messages this consumer holds"),
                }
                tokio::select! {
                    () = stopped(stop.clone()) => return,
                    () = tokio::time::sleep(HELD_INTERVAL) => {}
                }
            }
        }));
    }

    /// The REST gateway, calling the gRPC services at `grpc` unless
    /// configured elsewhere; drains when `front` fires. Its address.
    async fn add_gateway(
        &mut self,
        grpc: std::net::SocketAddr,
        verifier: fluxo_gateway::auth::Verifier,
        front: watch::Receiver<bool>,
    ) -> anyhow::Result<std::net::SocketAddr> {
        let config = self.config;
        let gateway = gateway(config, self.redis.clone(), grpc, verifier)?;
        let router = gateway.clone().router(cors(config)?);
        let listener = tokio::net::TcpListener::bind(config.gateway.listen)
            .await
            .with_context(|| format!("cannot listen on {} (gateway.listen)", config.gateway.listen))?;
        let rest_addr = listener.local_addr()?;
        let settings = fluxo_gateway::server::HttpSettings {
            header_read_timeout: Duration::from_millis(config.gateway.header_read_timeout_ms),
            drain_timeout: Duration::from_millis(config.grpc.shutdown_timeout_ms),
        };
        let delay = Duration::from_millis(config.grpc.shutdown_delay_ms);
        let shutdown = async move {
            stopped(front).await;
            // /readyz answers 503 at once; requests are still served for the
            // delay, while load balancers drop this endpoint.
            gateway.drain();
            tokio::time::sleep(delay).await;
        };
        let served = tokio::spawn(async move {
            if let Err(error) = fluxo_gateway::server::serve(listener, router, settings, shutdown).await {
                tracing::error!(%error, "the REST gateway stopped");
            }
        });
        // The gRPC services keep accepting until the gateway has answered every
        // REST request it took (under --target all it calls them on loopback).
        self.server.keep_accepting_until(async move {
            let _ = served.await;
        });
        Ok(rest_addr)
    }

    /// The server, every readiness check and the background tasks.
    fn finish(mut self) -> (GrpcServer, Vec<Arc<dyn Readiness>>, Vec<JoinHandle<()>>) {
        if self.needs_read_model {
            self.checks.push(Arc::new(fluxo_balance::readiness(self.db.clone())));
        }
        (self.server, self.checks, self.tasks)
    }
}

/// The keys tokens are verified with (REST, and gRPC under `grpc.auth = jwt`),
/// and the development token to print when one was minted.
struct Callers {
    verifier: fluxo_gateway::auth::Verifier,
    token: Option<String>,
}

async fn keys(config: &Config, db: &Db) -> anyhow::Result<Callers> {
    use fluxo_gateway::auth::{Keys, TokenSpec, Verifier, dev_secret, fetch_jwks, read_jwks, refresh_jwks};
    let a = &config.auth;
    let mut token = None;
    let keys = if let Some(secret) = &a.hs256_secret {
        Keys::Hs256(secret.clone())
    } else if let Some(file) = &a.jwks_file {
        Keys::jwks(read_jwks(file).map_err(|e| anyhow::anyhow!("auth.jwks_file: {e}"))?)
    } else if let Some(url) = &a.jwks_url {
        let keys = Keys::jwks(fetch_jwks(url).await.map_err(|e| anyhow::anyhow!("auth.jwks_url: {e}"))?);
        refresh_jwks(url.clone(), &keys, Duration::from_secs(a.jwks_refresh_secs.max(10)));
        keys
    } else if db.backend() == DbBackend::Sqlite {
        // The embedded default is never an open API: a development key and a token for it.
        let secret = dev_secret(&config.data_dir).context("creating the development JWT secret")?;
        let developer = TokenSpec { valid_for_secs: 30 * 24 * 3600, ..TokenSpec::admin("developer") };
        token = Some(developer.sign_hs256(&secret, &a.issuer, &a.audience)?);
        Keys::Hs256(secret)
    } else {
        bail!("verifying tokens needs keys: set auth.jwks_url, auth.jwks_file or auth.hs256_secret")
    };
    Ok(Callers { verifier: Verifier::new(keys, &a.issuer, &a.audience, a.leeway_secs), token })
}

/// The REST gateway.
fn gateway(
    config: &Config,
    redis: Option<fred::prelude::Client>,
    grpc: std::net::SocketAddr,
    verifier: fluxo_gateway::auth::Verifier,
) -> anyhow::Result<fluxo_gateway::Gateway> {
    use fluxo_gateway::ratelimit::{Limits, Rate, RateLimiter};
    let g = &config.gateway;
    // Under --target all the services are in this process: call them on loopback.
    let local = format!("http://127.0.0.1:{}", grpc.port());
    let channel = |url: &Option<String>, setting: &str| -> anyhow::Result<tonic::transport::Channel> {
        let url = url.clone().unwrap_or_else(|| local.clone());
        Ok(tonic::transport::Channel::from_shared(url)
            .with_context(|| format!("{setting} is not a URL"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy())
    };
    let r = &config.rate_limit;
    let rate = |t: &crate::config::TierSettings| Rate { per_second: t.per_second, burst: t.burst };
    let limiter = r.enabled.then(|| {
        RateLimiter::new(
            redis,
            Limits {
                tiers: r.tiers.iter().map(|(name, t)| (name.clone(), rate(t))).collect(),
                default_tier: r.default_tier.clone(),
                priority_tiers: r.priority_tiers.clone(),
                shared: Rate { per_second: r.shared_per_second, burst: r.shared_burst },
                unverified: rate(&r.unverified),
                unverified_pool: rate(&r.unverified_shared),
                fallback: r.on_redis_error.into(),
                key_prefix: r.key_prefix.clone(),
            },
        )
    });
    let backends = fluxo_gateway::Backends {
        ledger: channel(&g.ledger_url, "gateway.ledger_url")?,
        balance: channel(&g.balance_url, "gateway.balance_url")?,
        timeout: Duration::from_millis(g.request_timeout_ms),
        // With tokens on gRPC the caller's own token travels on; in the mesh (or
        // open on loopback) the identity it granted does.
        forward_token: config.grpc.auth == GrpcAuth::Jwt,
    };
    let limits = fluxo_gateway::RequestLimits {
        max_body_bytes: g.max_body_bytes,
        body_timeout: Duration::from_millis(g.request_timeout_ms),
    };
    Ok(fluxo_gateway::Gateway::new(backends, verifier, limiter, limits)?)
}

/// CORS for the configured origins; none configured, no CORS headers.
fn cors(config: &Config) -> anyhow::Result<Option<tower_http::cors::CorsLayer>> {
    let origins = &config.gateway.cors_allowed_origins;
    if origins.is_empty() {
        return Ok(None);
    }
    let origins = origins
        .iter()
        .map(|o| o.parse::<http::HeaderValue>().with_context(|| format!("gateway.cors_allowed_origins: {o}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Some(
        tower_http::cors::CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([http::Method::GET, http::Method::POST])
            .allow_headers([
                http::header::AUTHORIZATION,
                http::header::CONTENT_TYPE,
                http::HeaderName::from_static("idempotency-key"),
                http::HeaderName::from_static("x-request-id"),
            ]),
    ))
}

/// Applies every pending migration, retrying while the database is unreachable.
pub async fn migrate(config: Config, wait_secs: u64) -> anyhow::Result<()> {
    let telemetry = telemetry(&config, "migrate")?;
    let db = connect_waiting(&config, wait_secs).await?;
    migrate_all(&db).await?;
    tracing::info!(database = backend_name(db.backend()), "schema is current");
    eprintln!("fluxo: schema is current ({})", crate::config::context_for(&config));
    db.close().await.ok();
    telemetry.shutdown();
    Ok(())
}

/// Opens the database for serving. A PostgreSQL that does not answer yet (an outage, a pod
/// started before the database) is not fatal: the pool connects on first use, the server starts
/// and reports NOT_SERVING with the reason in the log, and turns SERVING once the database
/// answers. Migrating on start needs the database now, so then it must answer.
async fn open_for_serving(config: &Config) -> anyhow::Result<Db> {
    let settings = config.db_config();
    let postgres = !secrecy::ExposeSecret::expose_secret(&settings.url).starts_with("sqlite:");
    if !postgres || config.database.migrate_on_start == Some(true) {
        return Ok(Db::connect(&settings).await?);
    }
    let db = Db::connect_lazy(&settings).await?;
    // Say once, loudly, why the server is not ready yet (readiness then repeats it at info).
    let probe = db.clone();
    tokio::spawn(async move {
        if let Err(error) = probe.ping().await {
            tracing::warn!(reason = %error, "the database does not answer: reporting NOT_SERVING until it does");
        }
    });
    Ok(db)
}

/// Connects, retrying for up to `wait_secs` while the database is unreachable.
pub async fn connect_waiting(config: &Config, wait_secs: u64) -> anyhow::Result<Db> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_secs);
    loop {
        let attempt = Db::connect(&config.db_config()).await;
        let retry = tokio::time::Instant::now() < deadline;
        match attempt {
            Ok(db) => match db.ping().await {
                Ok(()) => return Ok(db),
                Err(error) if !retry => return Err(error).context("database unreachable"),
                Err(_) => {}
            },
            Err(fluxo_db::DbError::Connect { .. }) if retry => {}
            Err(error) => return Err(error.into()),
        }
        tracing::info!("database not reachable yet; retrying");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Tells a newcomer where fluxo is and how to call it. On stderr: stdout
/// carries the JSON log lines.
fn banner(
    config: &Config,
    db: &Db,
    target: &str,
    addr: std::net::SocketAddr,
    redis: bool,
    rest: Option<&(std::net::SocketAddr, Option<String>)>,
) {
    let version = env!("CARGO_PKG_VERSION");
    let database = crate::config::context_for(config);
    let backend = backend_name(db.backend());
    let delivery = if redis { "Redis stream" } else { "in process (no Redis configured)" };
    let rest_lines = match rest {
        Some((rest, Some(token))) => format!(
            "\x20 REST      http://{rest}  (OpenAPI at /openapi.json)\n\
             \x20 token     a development token (admin, 30 days), for Authorization: Bearer …\n\
             \x20           export FLUXO_TOKEN={token}\n\
             \x20   curl -H \"Authorization: Bearer $FLUXO_TOKEN\" http://{rest}/v1/merchants/m-1/entries\n"
        ),
        Some((rest, None)) => format!("\x20 REST      http://{rest}  (OpenAPI at /openapi.json)\n"),
        None => String::new(),
    };
    // With tokens on gRPC, the examples carry the development token.
    let auth =
        if config.grpc.auth == GrpcAuth::Jwt { "-H \"authorization: Bearer $FLUXO_TOKEN\" " } else { "" };
    eprintln!(
        "\nfluxo {version} is ready (target: {target})\n{rest_lines}\
         \x20 gRPC      {addr}  (server reflection on)\n\
         \x20 database  {backend} {database}\n\
         \x20 events    {delivery}\n\
         \x20 try it:\n\
         \x20   grpcurl -plaintext {addr} list\n\
         \x20   grpcurl -plaintext {auth}-d '{{\"merchantId\":\"m-1\",\"type\":\"CREDIT\",\"amount\":{{\"currencyCode\":\"BRL\",\"minorUnits\":\"1050\"}},\"description\":\"sale 1\",\"requestId\":\"k-1\"}}' {addr} fluxo.ledger.v1.LedgerService/RecordEntry\n\
         \x20   grpcurl -plaintext {auth}-d '{{\"merchantId\":\"m-1\",\"date\":\"<today>\"}}' {addr} fluxo.balance.v1.BalanceService/GetDailyBalance\n\
         \x20 stop with Ctrl-C\n"
    );
}
