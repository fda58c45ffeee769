//! The subscription API's rules over the store: every field checked (each bad
//! one named), the endpoint resolved and checked by the destination policy,
//! the secret generated, sealed and shown once, a rotation's grace period,
//! the per-merchant limit.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use fluxo_db::StoreError;
use fluxo_types::{MerchantId, RequestId, Violations};
use fluxo_webhooks::{
    DestinationPolicy, Secret,
    subscription::{self, Change, EventType, Registration},
};
use sha2::{Digest, Sha256};

use crate::{
    sealing::{SealError, Sealer},
    store::{Changes, Created, NewSubscription, Stored, SubscriptionStore},
};

/// The longest endpoint URL kept.
pub const MAX_ENDPOINT_URL: usize = 2048;
/// A rotation's grace period when none is asked for.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
/// The longest grace period a rotation may ask for.
pub const MAX_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

/// How the API behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where endpoints may point.
    pub policy: DestinationPolicy,
    /// The most subscriptions a merchant may hold.
    pub max_per_merchant: u32,
    /// How long resolving an endpoint's host may take when it is registered.
    pub resolve_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            policy: DestinationPolicy::strict(),
            max_per_merchant: 20,
            resolve_timeout: Duration::from_secs(3),
        }
    }
}

/// The subscription API.
#[derive(Debug, Clone)]
pub struct Subscriptions {
    store: SubscriptionStore,
    /// `None` when no `webhooks.secret_key` is configured: nothing can be
    /// registered, since its secret could not be kept.
    sealer: Option<Arc<Sealer>>,
    settings: Settings,
    /// The daily balances, to start a new `balance.changed` subscriber's feed
    /// where it stands when it subscribes.
    balances: Option<fluxo_balance::Balances>,
}

/// Why a call was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    /// Fields at fault, each named.
    #[error("invalid subscription request")]
    Invalid(Violations),
    /// No such subscription for this merchant.
    #[error("subscription {0} not found")]
    NotFound(String),
    /// The idempotency key created another subscription before.
    #[error(
        "request_id was already used for a different subscription request (subscription {0}); use a new request_id"
    )]
    KeyReused(String),
    /// The merchant holds as many subscriptions as allowed.
    #[error("merchant already holds {0} subscriptions, the most allowed; delete one first")]
    Full(u32),
    /// No key to seal secrets with.
    #[error("webhook subscriptions need webhooks.secret_key to be set on this install")]
    NotConfigured,
    /// A secret could not be sealed or opened.
    #[error("signing secret: {0}")]
    Sealing(#[from] SealError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A subscription as answered, and the secret when this answer shows it.
#[derive(Debug)]
pub struct WithSecret {
    /// The subscription.
    pub subscription: Stored,
    /// Its current secret, when shown.
    pub secret: Option<Secret>,
}

/// A create request, as sent.
#[derive(Debug, Clone, Copy)]
pub struct CreateRequest<'a> {
    /// What to register.
    pub registration: Registration<'a>,
    /// The idempotency key.
    pub request_id: &'a str,
}

/// An update, as sent: empty text and lists leave a field as it is.
#[derive(Debug, Clone, Copy)]
pub struct UpdateRequest<'a> {
    /// The merchant.
    pub merchant_id: &'a str,
    /// The subscription.
    pub subscription_id: &'a str,
    /// A new endpoint, or empty.
    pub endpoint_url: &'a str,
    /// New event types, or none.
    pub event_types: &'a [String],
    /// A new description, when `Some`.
    pub description: Option<&'a str>,
}

fn fingerprint(endpoint: &str, events: &BTreeSet<EventType>, description: &str) -> String {
    let mut hash = Sha256::new();
    for part in [endpoint, &subscription_events(events), description] {
        hash.update(part.len().to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn subscription_events(events: &BTreeSet<EventType>) -> String {
    events.iter().map(|e| e.name()).collect::<Vec<_>>().join(",")
}

/// The merchant and subscription ids of a call on one subscription.
fn target(merchant_id: &str, subscription_id: &str, v: &mut Violations) -> Option<(MerchantId, String)> {
    let merchant = v.check("merchant_id", MerchantId::parse(merchant_id));
    let id = v.check(
        "subscription_id",
        subscription_id.parse::<ulid::Ulid>().map_err(|_| "must be a subscription id (a ULID)"),
    );
    Some((merchant?, id?.to_string()))
}

impl Subscriptions {
    /// The API over `store`, sealing secrets with `sealer` when there is one.
    pub fn new(store: SubscriptionStore, sealer: Option<Sealer>, settings: Settings) -> Self {
        Self { store, sealer: sealer.map(Arc::new), settings, balances: None }
    }

    /// Starts the feed of changed days of each new `balance.changed`
    /// subscriber at the end of `balances` when it subscribes, so a change
    /// made after the subscription is answered is never skipped.
    pub fn with_balances(mut self, balances: fluxo_balance::Balances) -> Self {
        self.balances = Some(balances);
        self
    }

    async fn start_balance_feed(
        &self,
        merchant: &str,
        events: &BTreeSet<EventType>,
    ) -> Result<(), SubscriptionError> {
        let Some(balances) = &self.balances else { return Ok(()) };
        if !events.contains(&EventType::BalanceChanged) {
            return Ok(());
        }
        let end = balances.changes_end().await.map_err(|e| match e {
            fluxo_balance::query::QueryError::Store(e) => SubscriptionError::Store(e),
            other => SubscriptionError::Store(StoreError::Internal(other.to_string())),
        })?;
        self.store.set_balance_cursor(merchant, &end.encode(), true).await?;
        Ok(())
    }

    /// The store underneath.
    pub fn store(&self) -> &SubscriptionStore {
        &self.store
    }

    fn sealer(&self) -> Result<&Sealer, SubscriptionError> {
        self.sealer.as_deref().ok_or(SubscriptionError::NotConfigured)
    }

    /// Checks an endpoint's text and every address its host resolves to.
    async fn endpoint(&self, text: &str, v: &mut Violations) -> Option<url::Url> {
        if text.len() > MAX_ENDPOINT_URL {
            v.add("endpoint_url", format!("must be at most {MAX_ENDPOINT_URL} bytes"));
            return None;
        }
        let url = v.check("endpoint_url", self.settings.policy.check_url(text))?;
        let resolved =
            tokio::time::timeout(self.settings.resolve_timeout, self.settings.policy.resolve(&url)).await;
        match resolved {
            Ok(Ok(_)) => Some(url),
            Ok(Err(error)) => {
                v.add("endpoint_url", error.to_string());
                None
            }
            Err(_) => {
                v.add(
                    "endpoint_url",
                    format!("the host {} did not resolve in time", url.host_str().unwrap_or("")),
                );
                None
            }
        }
    }

    /// Registers a subscription; the answer shows its secret.
    pub async fn create(&self, request: CreateRequest<'_>) -> Result<WithSecret, SubscriptionError> {
        let mut v = Violations::default();
        let request_id = v.check("request_id", RequestId::parse(request.request_id));
        let valid = match subscription::validate(request.registration, &self.settings.policy) {
            Ok(valid) => Some(valid),
            Err(found) => {
                for f in found.list() {
                    v.add(f.field.clone(), f.description.clone());
                }
                None
            }
        };
        let endpoint = match &valid {
            Some(_) => self.endpoint(request.registration.endpoint_url, &mut v).await,
            None => None,
        };
        let (Some(valid), Some(endpoint), Some(request_id)) = (valid, endpoint, request_id) else {
            return Err(SubscriptionError::Invalid(v));
        };
        let sealer = self.sealer()?;
        let id = ulid::Ulid::new().to_string();
        let secret = Secret::generate().map_err(|_| SealError::Random)?;
        let new = NewSubscription {
            secret_sealed: sealer.seal(&secret, &id)?,
            fingerprint: fingerprint(endpoint.as_str(), &valid.events, &valid.description),
            id,
            merchant_id: valid.merchant.as_str().to_owned(),
            endpoint_url: endpoint.to_string(),
            events: valid.events,
            description: valid.description,
            request_id: request_id.as_str().to_owned(),
        };
        match self.store.create(new, self.settings.max_per_merchant).await? {
            Created::New(subscription) => {
                self.start_balance_feed(&subscription.merchant_id, &subscription.events).await?;
                Ok(WithSecret { subscription, secret: Some(secret) })
            }
            Created::Replayed(subscription, sealed) => {
                let secret = sealed.map(|s| sealer.open(&s, &subscription.id)).transpose()?;
                Ok(WithSecret { subscription, secret })
            }
            Created::KeyReused { id } => Err(SubscriptionError::KeyReused(id)),
            Created::Full { limit } => Err(SubscriptionError::Full(limit)),
        }
    }

    /// One subscription.
    pub async fn get(&self, merchant_id: &str, subscription_id: &str) -> Result<Stored, SubscriptionError> {
        let mut v = Violations::default();
        let (merchant, id) =
            target(merchant_id, subscription_id, &mut v).ok_or(SubscriptionError::Invalid(v))?;
        self.store.get(merchant.as_str(), &id).await?.ok_or(SubscriptionError::NotFound(id))
    }

    /// A merchant's subscriptions.
    pub async fn list(&self, merchant_id: &str) -> Result<Vec<Stored>, SubscriptionError> {
        let mut v = Violations::default();
        let merchant =
            v.check("merchant_id", MerchantId::parse(merchant_id)).ok_or(SubscriptionError::Invalid(v))?;
        Ok(self.store.list(merchant.as_str()).await?)
    }

    /// Changes endpoint, event types or description.
    pub async fn update(&self, request: UpdateRequest<'_>) -> Result<Stored, SubscriptionError> {
        let mut v = Violations::default();
        let target = target(request.merchant_id, request.subscription_id, &mut v);
        let mut changes = Changes::default();
        if !request.event_types.is_empty() {
            changes.events = Some(subscription::event_types(request.event_types, &mut v));
        }
        if let Some(description) = request.description {
            if description.chars().count() > subscription::MAX_DESCRIPTION {
                v.add("description", format!("must be at most {} characters", subscription::MAX_DESCRIPTION));
            }
            changes.description = Some(description.to_owned());
        }
        if !request.endpoint_url.is_empty() {
            changes.endpoint_url = self.endpoint(request.endpoint_url, &mut v).await.map(|u| u.to_string());
        }
        let (Some((merchant, id)), true) = (target, v.is_empty()) else {
            return Err(SubscriptionError::Invalid(v));
        };
        let updated = self
            .store
            .update(merchant.as_str(), &id, &changes)
            .await?
            .ok_or(SubscriptionError::NotFound(id))?;
        self.start_balance_feed(&updated.merchant_id, &updated.events).await?;
        Ok(updated)
    }

    /// Pauses or resumes.
    pub async fn change(
        &self,
        merchant_id: &str,
        subscription_id: &str,
        change: Change,
    ) -> Result<Stored, SubscriptionError> {
        let current = self.get(merchant_id, subscription_id).await?;
        let next = subscription::apply(&current.state, change);
        if next == current.state {
            return Ok(current);
        }
        let changes = Changes { state: Some(next), ..Changes::default() };
        let id = current.id.clone();
        self.store.update(&current.merchant_id, &id, &changes).await?.ok_or(SubscriptionError::NotFound(id))
    }

    /// Issues a new secret; the current one keeps signing for `grace_seconds`
    /// (0: [`DEFAULT_GRACE`]).
    pub async fn rotate(
        &self,
        merchant_id: &str,
        subscription_id: &str,
        grace_seconds: i64,
    ) -> Result<WithSecret, SubscriptionError> {
        let mut v = Violations::default();
        let target = target(merchant_id, subscription_id, &mut v);
        let grace = match u64::try_from(grace_seconds) {
            Ok(0) => Some(DEFAULT_GRACE),
            Ok(secs) if secs <= MAX_GRACE.as_secs() => Some(Duration::from_secs(secs)),
            _ => {
                v.add("grace_period_seconds", format!("must be 0 (a day) to {}", MAX_GRACE.as_secs()));
                None
            }
        };
        let (Some((merchant, id)), Some(grace)) = (target, grace) else {
            return Err(SubscriptionError::Invalid(v));
        };
        let sealer = self.sealer()?;
        let secret = Secret::generate().map_err(|_| SealError::Random)?;
        let sealed = sealer.seal(&secret, &id)?;
        let until: DateTime<Utc> = crate::store::now()
            + chrono::Duration::from_std(grace).map_err(|_| StoreError::Internal("grace period".into()))?;
        let subscription = self
            .store
            .rotate(merchant.as_str(), &id, sealed, until)
            .await?
            .ok_or(SubscriptionError::NotFound(id))?;
        Ok(WithSecret { subscription, secret: Some(secret) })
    }

    /// Deletes a subscription.
    pub async fn delete(&self, merchant_id: &str, subscription_id: &str) -> Result<(), SubscriptionError> {
        let mut v = Violations::default();
        let (merchant, id) =
            target(merchant_id, subscription_id, &mut v).ok_or(SubscriptionError::Invalid(v))?;
        if self.store.delete(merchant.as_str(), &id).await? {
            Ok(())
        } else {
            Err(SubscriptionError::NotFound(id))
        }
    }

    /// The secrets that sign a delivery to `subscription_id` at `now`.
    pub async fn signing_secrets(
        &self,
        subscription_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<subscription::Secrets>, SubscriptionError> {
        let Some(sealed) = self.store.secrets(subscription_id).await? else { return Ok(None) };
        self.open_secrets(subscription_id, &sealed, now).map(Some)
    }

    /// The secrets that sign for a subscription at `now`, opened from what
    /// its row holds (a claimed delivery carries them).
    pub fn open_secrets(
        &self,
        subscription_id: &str,
        sealed: &crate::store::SealedSecrets,
        now: DateTime<Utc>,
    ) -> Result<subscription::Secrets, SubscriptionError> {
        let sealer = self.sealer()?;
        let mut secrets = subscription::Secrets::new(sealer.open(&sealed.current, subscription_id)?);
        if let Some((previous, until)) = &sealed.previous
            && now < *until
        {
            secrets.previous = Some((sealer.open(previous, subscription_id)?, until.timestamp()));
        }
        Ok(secrets)
    }
}
