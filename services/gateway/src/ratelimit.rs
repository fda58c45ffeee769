//! Rate limiting shared by every gateway replica: GCRA (the generic cell rate
//! algorithm) evaluated in Redis by one Lua script, one round trip per request.
//!
//! Each client has its own allowance from its tier. Clients of non-priority
//! tiers also draw from one shared pool, so a flood by any of them is capped
//! as a whole while priority clients keep the capacity reserved for them.
//! When Redis is unreachable the configured fallback applies (by default a
//! per-process limiter with the same algorithm, and a log line).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fred::{prelude::Client, types::scripts::Script};

/// A rate: `per_second` sustained, bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Sustained requests per second.
    pub per_second: u32,
    /// Requests allowed at once after a quiet period.
    pub burst: u32,
}

impl Rate {
    fn interval_micros(self) -> i64 {
        1_000_000 / i64::from(self.per_second.max(1))
    }
    fn tolerance_micros(self) -> i64 {
        self.interval_micros() * i64::from(self.burst.max(1))
    }
}

/// What to do when Redis cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Limit per process with the same rates (the default), and log it.
    Local,
    /// Let requests through.
    Allow,
    /// Refuse requests.
    Deny,
}

/// Limits for a deployment.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Rates by tier name.
    pub tiers: HashMap<String, Rate>,
    /// Tier of clients whose token names none.
    pub default_tier: String,
    /// Tiers exempt from the shared pool (their share is reserved).
    pub priority_tiers: Vec<String>,
    /// The shared pool of every non-priority client together.
    pub shared: Rate,
    /// Requests whose token must still be verified (not seen lately, forged or
    /// missing), per client address...
    pub unverified: Rate,
    /// ...and of every client address together, apart from the shared pool.
    pub unverified_pool: Rate,
    /// When Redis is unreachable.
    pub fallback: Fallback,
    /// Prefix of every bucket's Redis key (installations sharing a Redis need their own).
    pub key_prefix: String,
}

/// The default [`Limits::key_prefix`].
pub const DEFAULT_KEY_PREFIX: &str = "fluxo:rl";

/// A decision with what the RateLimit headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// The client's limit (its burst).
    pub limit: u32,
    /// Requests left right now.
    pub remaining: u32,
    /// When the allowance is whole again.
    pub reset: Duration,
    /// When to retry, if refused.
    pub retry_after: Duration,
}

// KEYS[1]: the client's bucket; KEYS[2]: the shared pool ('' for priority).
// ARGV: client interval µs, client tolerance µs, pool interval µs, pool tolerance µs.
// Returns {allowed, remaining, reset µs, retry µs}. TIME comes from Redis so
// every replica shares one clock.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function check(key, interval, tolerance)
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - tolerance
  if now < allow_at then return false, tat, allow_at - now end
  return true, new_tat, 0
end
local ok, tat, retry = check(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if not ok then
  return {0, 0, tat - now, retry}
end
if KEYS[2] ~= '' then
  local pool_ok, pool_tat, pool_retry = check(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
  if not pool_ok then return {0, 0, tat - now, pool_retry} end
  redis.call('SET', KEYS[2], pool_tat, 'PX', math.ceil(tonumber(ARGV[4]) / 1000) + 1000)
end
redis.call('SET', KEYS[1], tat, 'PX', math.ceil(tonumber(ARGV[2]) / 1000) + 1000)
local remaining = math.floor((now + tonumber(ARGV[2]) - tat) / tonumber(ARGV[1]))
return {1, remaining, tat - now, 0}
"#;

static GCRA_SCRIPT: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| Script::from_lua(GCRA));

/// The limiter.
#[derive(Clone)]
pub struct RateLimiter {
    client: Option<Client>,
    limits: Arc<Limits>,
    local: Arc<Mutex<HashMap<String, i64>>>,
    started: Instant,
    warned: Arc<Mutex<Option<Instant>>>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter").field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// Limits shared through Redis (`client`), or per process when `None`.
    pub fn new(client: Option<Client>, limits: Limits) -> Self {
        Self {
            client,
            limits: Arc::new(limits),
            local: Arc::default(),
            started: Instant::now(),
            warned: Arc::default(),
        }
    }

    fn rate(&self, tier: &str) -> Rate {
        self.limits
            .tiers
            .get(tier)
            .or_else(|| self.limits.tiers.get(&self.limits.default_tier))
            .copied()
            .unwrap_or(Rate { per_second: 100, burst: 100 })
    }

    /// Decides for `client` in `tier` (None: the default tier).
    pub async fn check(&self, client_id: &str, tier: Option<&str>) -> Decision {
        let tier = tier.unwrap_or(&self.limits.default_tier).to_owned();
        let rate = self.rate(&tier);
        let priority = self.limits.priority_tiers.contains(&tier);
        let prefix = &self.limits.key_prefix;
        let bucket = format!("{prefix}:{{all}}:client:{client_id}");
        let pool = (!priority).then(|| (format!("{prefix}:{{all}}:shared"), self.limits.shared));
        self.decide(bucket, rate, pool).await
    }

    /// Decides for a request from `address` whose token is still to be verified.
    pub async fn check_unverified(&self, address: &str) -> Decision {
        let prefix = &self.limits.key_prefix;
        let bucket = format!("{prefix}:{{all}}:unverified:{address}");
        let pool = Some((format!("{prefix}:{{all}}:unverified"), self.limits.unverified_pool));
        self.decide(bucket, self.limits.unverified, pool).await
    }

    /// Draws one request from `bucket` at `rate` and from `pool`, if any.
    async fn decide(&self, bucket: String, rate: Rate, pool: Option<(String, Rate)>) -> Decision {
        let (pool, pool_rate) = pool.unwrap_or((String::new(), rate));
        if let Some(redis) = &self.client {
            let args = vec![
                rate.interval_micros(),
                rate.tolerance_micros(),
                pool_rate.interval_micros(),
                pool_rate.tolerance_micros(),
            ];
            // EVALSHA: Redis runs the cached script without receiving and hashing
            // its text on every request (loaded again if Redis lost it).
            // Boxed: fred's futures are kilobytes, and in place this one would make
            // every request's future as large.
            let answer: Result<Vec<i64>, _> =
                Box::pin(GCRA_SCRIPT.evalsha_with_reload(redis, vec![bucket.clone(), pool.clone()], args))
                    .await;
            match answer {
                Ok(v) if v.len() == 4 => return decision(rate, v[0] == 1, v[1], v[2], v[3]),
                Ok(_) => self.warn("unexpected answer from the rate-limit script"),
                Err(error) => self.warn(&error.to_string()),
            }
            match self.limits.fallback {
                Fallback::Allow => return decision(rate, true, i64::from(rate.burst), 0, 0),
                Fallback::Deny => return decision(rate, false, 0, 0, 1_000_000),
                Fallback::Local => {}
            }
        }
        self.check_local(&bucket, &pool, rate, pool_rate)
    }

    fn warn(&self, reason: &str) {
        let mut last = self.warned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
            tracing::warn!(%reason, fallback = ?self.limits.fallback, "rate limiter cannot reach Redis; using the fallback");
            *last = Some(Instant::now());
        }
    }

    /// The same algorithm in this process's memory.
    fn check_local(&self, bucket: &str, pool: &str, rate: Rate, pool_rate: Rate) -> Decision {
        let now = i64::try_from(self.started.elapsed().as_micros()).unwrap_or(i64::MAX);
        let mut state = self.local.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let step = |state: &HashMap<String, i64>, key: &str, r: Rate| {
            let tat = state.get(key).copied().unwrap_or(now).max(now);
            let new_tat = tat + r.interval_micros();
            let allow_at = new_tat - r.tolerance_micros();
            if now < allow_at { Err((tat, allow_at - now)) } else { Ok(new_tat) }
        };
        match step(&state, bucket, rate) {
            Err((tat, retry)) => decision(rate, false, 0, tat - now, retry),
            Ok(tat) => {
                if !pool.is_empty() {
                    match step(&state, pool, pool_rate) {
                        Err((_, retry)) => return decision(rate, false, 0, tat - now, retry),
                        Ok(pool_tat) => {
                            state.insert(pool.to_owned(), pool_tat);
                        }
                    }
                }
                state.insert(bucket.to_owned(), tat);
                let remaining = (now + rate.tolerance_micros() - tat) / rate.interval_micros();
                decision(rate, true, remaining, tat - now, 0)
            }
        }
    }
}

fn decision(rate: Rate, allowed: bool, remaining: i64, reset_micros: i64, retry_micros: i64) -> Decision {
    let micros = |v: i64| Duration::from_micros(u64::try_from(v.max(0)).unwrap_or(0));
    Decision {
        allowed,
        limit: rate.burst,
        remaining: u32::try_from(remaining.max(0)).unwrap_or(u32::MAX),
        reset: micros(reset_micros),
        retry_after: micros(retry_micros),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            tiers: HashMap::from([
                ("standard".into(), Rate { per_second: 10, burst: 5 }),
                ("priority".into(), Rate { per_second: 10, burst: 5 }),
            ]),
            default_tier: "standard".into(),
            priority_tiers: vec!["priority".into()],
            shared: Rate { per_second: 10, burst: 8 },
            unverified: Rate { per_second: 10, burst: 3 },
            unverified_pool: Rate { per_second: 10, burst: 4 },
            fallback: Fallback::Local,
            key_prefix: DEFAULT_KEY_PREFIX.into(),
        }
    }

    #[tokio::test]
    async fn a_burst_is_allowed_then_refused_with_a_retry_time() {
        let limiter = RateLimiter::new(None, limits());
        let allowed = futures::future::join_all((0..5).map(|_| limiter.check("a", None))).await;
        assert!(allowed.iter().all(|d| d.allowed));
        let refused = limiter.check("a", None).await;
        assert!(!refused.allowed);
        assert!(refused.retry_after > Duration::ZERO && refused.retry_after <= Duration::from_millis(100));
    }

    fn unreachable_redis() -> Client {
        // Nothing listens on port 1: every command fails fast.
        fluxo_queue::client(&fluxo_queue::RedisConfig {
            url: "redis://127.0.0.1:1".to_owned().into(),
            command_timeout: Duration::from_millis(200),
            tls_ca_file: None,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn without_redis_the_configured_fallback_applies() {
        let local = RateLimiter::new(Some(unreachable_redis()), limits());
        let decisions = futures::future::join_all((0..6).map(|_| local.check("a", None))).await;
        assert_eq!(decisions.iter().filter(|d| d.allowed).count(), 5, "per-process limits still hold");
        let open =
            RateLimiter::new(Some(unreachable_redis()), Limits { fallback: Fallback::Allow, ..limits() });
        assert!(
            futures::future::join_all((0..20).map(|_| open.check("a", None))).await.iter().all(|d| d.allowed)
        );
        let closed =
            RateLimiter::new(Some(unreachable_redis()), Limits { fallback: Fallback::Deny, ..limits() });
        assert!(!closed.check("a", None).await.allowed);
    }

    #[tokio::test]
    async fn the_shared_pool_caps_standard_clients_but_not_priority_ones() {
        let limiter = RateLimiter::new(None, limits());
        // Two standard clients together exhaust the pool of 8 before their own bursts of 5.
        let mut allowed = 0;
        for i in 0..10 {
            if limiter.check(if i % 2 == 0 { "a" } else { "b" }, None).await.allowed {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 8);
        assert!(!limiter.check("c", None).await.allowed, "the pool is empty for standard clients");
        assert!(limiter.check("vip", Some("priority")).await.allowed, "priority keeps its reserve");
    }

    #[tokio::test]
    async fn unverified_requests_have_their_own_limits_per_address_and_together() {
        let limiter = RateLimiter::new(None, limits());
        let from = |address: &'static str| limiter.check_unverified(address);
        let first: Vec<bool> = futures::future::join_all((0..4).map(|_| from("10.0.0.1")))
            .await
            .iter()
            .map(|d| d.allowed)
            .collect();
        assert_eq!(first, [true, true, true, false], "a burst of 3 per address");
        assert!(from("10.0.0.2").await.allowed, "another address has its own allowance");
        assert!(!from("10.0.0.3").await.allowed, "the unverified pool of 4 is spent");
        assert!(limiter.check("a", None).await.allowed, "verified clients do not draw from it");
    }

    /// On the suite's real Redis: limiters with different key prefixes (two
    /// installations sharing a Redis) keep apart buckets; the same prefix shares them.
    #[tokio::test]
    async fn installations_with_their_own_key_prefix_do_not_share_buckets() {
        let url = std::env::var("FLUXO_TEST_REDIS_URL")
            .expect("FLUXO_TEST_REDIS_URL is not set: run the suite with ./scripts/test.sh");
        let redis = fluxo_queue::client(&fluxo_queue::RedisConfig {
            url: url.into(),
            command_timeout: Duration::from_secs(5),
            tls_ca_file: None,
        })
        .unwrap();
        fred::prelude::ClientLike::wait_for_connect(&redis).await.unwrap();
        let run = ulid::Ulid::new();
        // One token a second: none comes back between the calls below.
        let slow = Rate { per_second: 1, burst: 5 };
        let with_prefix = |prefix: String| {
            let tiers = HashMap::from([("standard".into(), slow)]);
            let shared = Rate { per_second: 1, burst: 100 };
            RateLimiter::new(Some(redis.clone()), Limits { key_prefix: prefix, tiers, shared, ..limits() })
        };
        let first = with_prefix(format!("test:{run}:a"));
        let spent = futures::future::join_all((0..6).map(|_| first.check("client", None))).await;
        assert_eq!(spent.iter().filter(|d| d.allowed).count(), 5, "a burst of 5 in Redis");
        let same = with_prefix(format!("test:{run}:a"));
        assert!(!same.check("client", None).await.allowed, "the same prefix shares the bucket");
        let other = with_prefix(format!("test:{run}:b"));
        assert!(other.check("client", None).await.allowed, "another prefix has buckets of its own");
    }
}
