//! Redis cache-aside for balance answers, shared by every balance replica.
//!
//! Freshness: every (merchant, currency) has a generation counter. The
//! consolidator bumps it and drops the cached answers *after* each commit. A
//! reader notes the generation before it reads the database and stores its
//! answer only if the generation is unchanged — atomically, in one script — so
//! an answer computed before a commit can never be cached after it. Once a
//! change is committed and invalidated, no older balance is served.
//!
//! Availability: the last answer per key is also kept, longer, beside the
//! cache; when PostgreSQL is down it is served marked `possibly_stale`.
//!
//! Metrics: `fluxo.balance.cache.hits` and `fluxo.balance.cache.misses`
//! (lookups), whose ratio is the hit ratio; the invalidation after a commit is
//! the `balance.cache.invalidate` span, a child of the consolidator's span.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use fluxo_telemetry::opentelemetry::metrics::Counter;
use fred::{
    prelude::{Client, KeysInterface, TransactionInterface},
    types::{Value, scripts::Script},
};
use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use tracing::Instrument;

use crate::{consolidator::OnApplied, store::Applied};

/// Where one answer lives: a (merchant, currency) and a field for the question.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// Merchant (validated).
    pub merchant: String,
    /// Currency asked for, or `*` when the caller left it to the merchant's only one.
    pub currency: String,
    /// The question: `d:<date>` or `r:<start>:<end>`.
    pub field: String,
}

impl CacheKey {
    // The merchant is a hash tag so a script's keys share one cluster slot.
    fn answers(&self, prefix: &str) -> String {
        format!("{prefix}:{{{}}}:{}", self.merchant, self.currency)
    }
    fn generation(&self, prefix: &str) -> String {
        format!("{prefix}:{{{}}}:{}:gen", self.merchant, self.currency)
    }
    fn last_known(&self, prefix: &str) -> String {
        format!("{prefix}:{{{}}}:{}:last", self.merchant, self.currency)
    }
}

/// The key prefix of the cache unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "fluxo:balance";

const GET: &str = "return {redis.call('HGET', KEYS[1], ARGV[1]), redis.call('GET', KEYS[2]) or '0'}";
const PUT: &str = "if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end \
    redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) redis.call('PEXPIRE', KEYS[1], ARGV[4]) \
    redis.call('HSET', KEYS[3], ARGV[2], ARGV[3]) redis.call('PEXPIRE', KEYS[3], ARGV[5]) return 1";

// Run with EVALSHA: Redis executes its cached copy instead of receiving and
// hashing the script's text on every lookup (reloaded if Redis lost it).
static GET_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::from_lua(GET));
static PUT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::from_lua(PUT));

/// Lookups that found a fresh answer, and those that did not.
static LOOKUPS: LazyLock<(Counter<u64>, Counter<u64>)> = LazyLock::new(|| {
    let meter = fluxo_telemetry::meter();
    let counter = |name: &'static str, description: &'static str| {
        meter.u64_counter(name).with_unit("{lookup}").with_description(description).build()
    };
    (
        counter("fluxo.balance.cache.hits", "Balance cache lookups answered from Redis"),
        counter("fluxo.balance.cache.misses", "Balance cache lookups that went to the database"),
    )
});

/// What a cache lookup found.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// A fresh answer.
    Hit(Bytes),
    /// Nothing; store an answer under this generation.
    Miss(String),
}

// Every fred command is a future of kilobytes. Awaited in place it makes every
// enclosing future (down to the one tonic boxes per call) as large, and each is
// moved — copied — on its way. Boxed, it is copied once and its callers stay small.

/// The shared balance cache.
#[derive(Clone)]
pub struct BalanceCache {
    client: Client,
    // Namespace of every key, so installations sharing a Redis stay apart.
    prefix: Arc<str>,
    ttl_ms: u64,
    stale_ttl_ms: u64,
    // Keyed by the generation too: a caller that saw a newer generation never
    // joins a load that may have read the database before the change.
    flights: Arc<Mutex<HashMap<(CacheKey, String), Flight>>>,
    loads: Arc<AtomicU64>,
}

/// A load in progress, awaited by every caller of the same key and generation.
type Flight = Shared<BoxFuture<'static, Loaded>>;

/// A loaded answer shared by every caller waiting on the same key.
pub type Loaded = Result<Bytes, Arc<crate::query::QueryError>>;

impl std::fmt::Debug for BalanceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalanceCache").field("ttl_ms", &self.ttl_ms).finish_non_exhaustive()
    }
}

impl BalanceCache {
    /// A cache in Redis through `client`.
    pub fn new(client: Client, ttl_ms: u64, stale_ttl_ms: u64) -> Self {
        Self {
            client,
            prefix: Arc::from(DEFAULT_PREFIX),
            ttl_ms,
            stale_ttl_ms,
            flights: Arc::default(),
            loads: Arc::default(),
        }
    }

    /// Puts every key under `prefix` instead of [`DEFAULT_PREFIX`].
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = Arc::from(prefix);
        self
    }

    /// Database loads performed on misses (concurrent misses of one key count once).
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// The cached answer, or the generation to store a new one under.
    pub async fn get(&self, key: &CacheKey) -> Result<Lookup, fred::error::Error> {
        let keys = vec![key.answers(&self.prefix), key.generation(&self.prefix)];
        let (value, generation): (Option<Bytes>, String) =
            Box::pin(GET_SCRIPT.evalsha_with_reload(&self.client, keys, vec![key.field.clone()])).await?;
        Ok(match value {
            Some(bytes) => {
                LOOKUPS.0.add(1, &[]);
                Lookup::Hit(bytes)
            }
            None => {
                LOOKUPS.1.add(1, &[]);
                Lookup::Miss(generation)
            }
        })
    }

    /// Stores `answer` unless the balance changed since `generation` was read.
    pub async fn put(
        &self,
        key: &CacheKey,
        generation: &str,
        answer: Bytes,
    ) -> Result<bool, fred::error::Error> {
        let stored: i64 = Box::pin(PUT_SCRIPT.evalsha_with_reload(
            &self.client,
            vec![key.answers(&self.prefix), key.generation(&self.prefix), key.last_known(&self.prefix)],
            vec![
                Value::from(generation),
                Value::from(key.field.as_str()),
                Value::Bytes(answer),
                Value::from(i64::try_from(self.ttl_ms).unwrap_or(i64::MAX)),
                Value::from(i64::try_from(self.stale_ttl_ms).unwrap_or(i64::MAX)),
            ],
        ))
        .await?;
        Ok(stored == 1)
    }

    /// The last answer ever stored for `key`, for when the database is down.
    pub async fn last_known(&self, key: &CacheKey) -> Result<Option<Bytes>, fred::error::Error> {
        Box::pin(fred::prelude::HashesInterface::hget(
            &self.client,
            key.last_known(&self.prefix),
            key.field.as_str(),
        ))
        .await
    }

    /// Drops every cached answer about these balances and bumps their generations.
    pub async fn invalidate(
        &self,
        balances: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), fred::error::Error> {
        let tx = self.client.multi();
        for (merchant, currency) in balances {
            for c in [currency.as_str(), "*"] {
                let key =
                    CacheKey { merchant: merchant.clone(), currency: c.to_owned(), field: String::new() };
                let _: () = tx.incr(key.generation(&self.prefix)).await?;
                let _: () = tx.del(key.answers(&self.prefix)).await?;
            }
        }
        let _: Value = tx.exec(true).await?;
        Ok(())
    }

    /// Runs `load` once for all concurrent callers of the same key that saw
    /// the same generation, and caches its answer under that generation.
    pub async fn load_once<F, Fut>(&self, key: &CacheKey, generation: &str, load: F) -> Loaded
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Loaded> + Send + 'static,
    {
        let flight_key = (key.clone(), generation.to_owned());
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let cache = self.clone();
            let (key, generation) = flight_key.clone();
            flights
                .entry(flight_key.clone())
                .or_insert_with(|| {
                    self.loads.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let loaded = load().await;
                        if let Ok(answer) = &loaded
                            && let Err(error) = cache.put(&key, &generation, answer.clone()).await
                        {
                            tracing::warn!(%error, "could not cache a balance");
                        }
                        loaded
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        let result = flight.await;
        let mut flights = self.flights.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        flights.remove(&flight_key);
        result
    }
}

/// Drops cached balances after the consolidator commits a change to them.
#[derive(Debug, Clone)]
pub struct Invalidator(pub BalanceCache);

#[async_trait::async_trait]
impl OnApplied for Invalidator {
    async fn applied(&self, applied: &Applied) {
        let span = tracing::info_span!("balance.cache.invalidate", balances = applied.touched.len());
        if let Err(error) = self.0.invalidate(applied.touched.iter().cloned()).instrument(span).await {
            // The TTL bounds how long a cached answer can outlive this failure.
            tracing::warn!(%error, "could not invalidate cached balances");
        }
    }
}
