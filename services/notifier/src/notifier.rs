//! The notifier: ledger events in, signed webhook deliveries out.
//!
//! Two halves, one process:
//! - **fan-out** ([`Handler`]): each event read from the stream (its own
//!   consumer group) — or handed over in process on the embedded default —
//!   becomes one delivery per subscription that asked for its type, in one
//!   transaction; a redelivered event makes nothing new, so the event is
//!   acknowledged only once its deliveries are on record and none is lost;
//! - **delivery** ([`Notifier::run`]): due deliveries are claimed under a
//!   lease (a notifier killed mid-attempt leaves them to be claimed again
//!   once it runs out: at least once), signed per Standard Webhooks with every
//!   secret in force, sent by [`Sender`], and rescheduled by [`Retries`] or
//!   dead-lettered. An endpoint that has failed for `disable_after`, or that
//!   answers 410 Gone, disables its subscription, which says why.

use std::{
    sync::{Arc, LazyLock},
    time::Duration,
};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use fluxo_db::StoreError;
use fluxo_proto::ledger_v1 as pb;
use fluxo_queue::{
    EventSink, PublishError, StreamEvent,
    consumer::{HandleError, Handler},
};
use fluxo_telemetry::opentelemetry::{
    KeyValue,
    metrics::{Counter, Histogram},
};
use fluxo_webhooks::{Attempt, Outcome, Retries, Sender, subscription::EventType};
use prost::Message;
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::Instrument;

use crate::{
    store::{AttemptRecord, Due, Event, Next, SubscriptionStore},
    subscriptions::Subscriptions,
};

/// How the delivery half behaves.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// Deliveries claimed at once.
    pub batch: u32,
    /// Attempts in flight at once.
    pub concurrency: usize,
    /// How long a claim holds a delivery: longer than one attempt can take.
    pub lease: Duration,
    /// How often to look for due deliveries when nothing wakes the notifier.
    pub poll: Duration,
    /// An endpoint failing without a break for this long disables its subscription.
    pub disable_after: Duration,
    /// When to retry.
    pub retries: Retries,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            batch: 64,
            concurrency: 64,
            lease: Duration::from_secs(60),
            poll: Duration::from_millis(500),
            disable_after: Duration::from_secs(5 * 24 * 3600),
            retries: Retries::default(),
        }
    }
}

/// The notifier.
#[derive(Debug, Clone)]
pub struct Notifier {
    subscriptions: Subscriptions,
    sender: Sender,
    settings: DeliverySettings,
    wake: Arc<Notify>,
    /// The daily balances, whose changed days become `balance.changed` events.
    balances: Option<fluxo_balance::Balances>,
    /// The ledger, whose period closes become `period.closed` events.
    ledger: Option<fluxo_ledger::LedgerStore>,
}

/// The least time between two looks at the feeds of changed days and closes
/// (each look is a query or two; deliveries are claimed as slots free, a batch at a time).
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// Attempts recorded in one transaction at most.
const RECORDS_PER_COMMIT: usize = 256;

/// An attempt's record on its way to the recorder, and where it answers.
type Recording = ((Due, AttemptRecord, Next), oneshot::Sender<Result<(), StoreError>>);

/// Records attempts as they finish, as many per transaction as finished
/// while the one before committed: a commit per attempt bounded what one
/// notifier delivered. An attempt waits for its record, as before.
#[derive(Debug, Clone)]
struct Recorder {
    jobs: mpsc::Sender<Recording>,
}

impl Recorder {
    fn start(store: SubscriptionStore, depth: usize) -> (Self, tokio::task::JoinHandle<()>) {
        let (jobs, mut queue) = mpsc::channel::<Recording>(depth.max(1));
        let task = tokio::spawn(async move {
            let mut batch = Vec::new();
            while queue.recv_many(&mut batch, RECORDS_PER_COMMIT).await > 0 {
                let items: Vec<_> = batch.iter().map(|((d, a, n), _)| (d, a, n)).collect();
                let result = store.record_many(&items).await;
                drop(items);
                match result {
                    Ok(()) => batch.drain(..).for_each(|(_, reply)| drop(reply.send(Ok(())))),
                    // One row that cannot be written fails only its own attempt.
                    Err(_) if batch.len() > 1 => {
                        for ((due, attempt, next), reply) in batch.drain(..) {
                            let _ = reply.send(store.record(&due, &attempt, &next).await);
                        }
                    }
                    Err(error) => batch.drain(..).for_each(|(_, reply)| drop(reply.send(Err(error.clone())))),
                }
            }
        });
        (Self { jobs }, task)
    }

    async fn record(&self, due: &Due, attempt: AttemptRecord, next: Next) -> Result<(), StoreError> {
        let stopped = || StoreError::Internal("the attempt recorder stopped".into());
        let (reply, answer) = oneshot::channel();
        self.jobs.send(((due.clone(), attempt, next), reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Days read from one merchant's feed per look.
const BALANCE_DAYS_PER_LOOK: u64 = 500;

/// A stable event id for the change of a day at `cursor`: the same however
/// often it is read, so making its deliveries again makes nothing new.
fn balance_event_id(merchant: &str, cursor: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("balance.changed|{merchant}|{cursor}"));
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    ulid::Ulid::from_bytes(bytes).to_string()
}

struct Metrics {
    delay: Histogram<f64>,
    attempts: Counter<u64>,
    failures: Counter<u64>,
    events: Counter<u64>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let meter = fluxo_telemetry::meter();
    Metrics {
        delay: meter
            .f64_histogram("fluxo.webhooks.delivery.delay")
            .with_unit("s")
            .with_description("Time from the notifier reading an event to its endpoint's 2xx answer")
            .with_boundaries(fluxo_telemetry::LATENCY_BUCKETS.to_vec())
            .build(),
        attempts: meter
            .u64_counter("fluxo.webhooks.attempts")
            .with_description("Delivery attempts, by outcome (delivered, failed, dead)")
            .build(),
        failures: meter
            .u64_counter("fluxo.webhooks.failures")
            .with_description("Failed delivery attempts, by subscription")
            .build(),
        events: meter
            .u64_counter("fluxo.webhooks.deliveries.made")
            .with_description("Deliveries made from events (one per event and subscription)")
            .build(),
    }
});

/// The dead-letter count last measured, observed by the gauge below.
static DEAD_LETTERS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

static DEAD_LETTERS_GAUGE: LazyLock<fluxo_telemetry::opentelemetry::metrics::ObservableGauge<i64>> =
    LazyLock::new(|| {
        fluxo_telemetry::meter()
            .i64_observable_gauge("fluxo.webhooks.dead_letters")
            .with_unit("{delivery}")
            .with_description("Deliveries given up on, waiting for `fluxo webhooks deliveries replay`")
            .with_callback(|o| o.observe(DEAD_LETTERS.load(std::sync::atomic::Ordering::Relaxed), &[]))
            .build()
    });

fn set_dead_letters(count: i64) {
    LazyLock::force(&DEAD_LETTERS_GAUGE);
    DEAD_LETTERS.store(count, std::sync::atomic::Ordering::Relaxed);
}

/// The event a stream message carries, as webhooks describe it.
pub fn event_of(message: &StreamEvent) -> Result<Event, HandleError> {
    let malformed = |what: String| HandleError::Malformed(format!("event {}: {what}", message.event_id));
    let recorded =
        pb::EntryRecorded::decode(message.payload.as_ref()).map_err(|e| malformed(e.to_string()))?;
    let entry = recorded.entry.ok_or_else(|| malformed("no entry".into()))?;
    let event_type =
        if entry.reverses_entry_id.is_empty() { EventType::EntryRecorded } else { EventType::EntryReversed };
    let occurred_at = recorded
        .occurred_at
        .as_ref()
        .and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .unwrap_or_else(Utc::now);
    let data =
        fluxo_proto::json::to_value("fluxo.ledger.v1.Entry", &entry).map_err(|e| malformed(e.to_string()))?;
    Ok(Event {
        id: message.event_id.clone(),
        merchant_id: entry.merchant_id,
        event_type,
        occurred_at,
        data,
        traceparent: message.traceparent.clone(),
        tracestate: message.tracestate.clone(),
    })
}

#[async_trait::async_trait]
impl Handler for Notifier {
    /// All or nothing per batch: the deliveries of every readable event are
    /// made in one transaction (a store failure leaves the batch pending, to
    /// be read again); an unreadable event is refused on its own.
    async fn handle(&self, events: &[StreamEvent]) -> Vec<Result<(), HandleError>> {
        let read: Vec<Result<Event, HandleError>> = events.iter().map(event_of).collect();
        let good: Vec<Event> = read.iter().filter_map(|r| r.as_ref().ok().cloned()).collect();
        let stored = self.subscriptions.store().fan_out(&good).await;
        match stored {
            Ok(done) => {
                if done.made > 0 {
                    METRICS.events.add(done.made as u64, &[]);
                    self.wake.notify_one();
                }
                read.into_iter().map(|r| r.map(|_| ())).collect()
            }
            Err(error) => {
                let reason = HandleError::Unavailable(error.to_string());
                read.into_iter().map(|r| r.and(Err(reason.clone()))).collect()
            }
        }
    }
}

/// The embedded default's hand-off: the relay publishes to the notifier in
/// process (beside the consolidator), and a failure makes it retry.
#[async_trait::async_trait]
impl EventSink for Notifier {
    async fn publish(&self, events: &[StreamEvent]) -> Result<(), PublishError> {
        for (event, result) in events.iter().zip(self.handle(events).await) {
            match result {
                Ok(()) => {}
                Err(HandleError::Unavailable(reason)) => return Err(PublishError::Consumer(reason)),
                // Unreadable for the notifier means unreadable for everyone: the
                // consolidator parks it; webhooks have nothing to send for it.
                Err(refused) => {
                    tracing::warn!(event_id = %event.event_id, %refused, "no webhook for an unreadable event")
                }
            }
        }
        Ok(())
    }
}

fn balance_error(error: fluxo_balance::query::QueryError) -> crate::SubscriptionError {
    match error {
        fluxo_balance::query::QueryError::Store(e) => crate::SubscriptionError::Store(e),
        other => crate::SubscriptionError::Store(StoreError::Internal(other.to_string())),
    }
}

fn jitter() -> u16 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 2];
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    u16::from_le_bytes(bytes) % 1000
}

fn chrono_of(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl Notifier {
    /// A notifier over `subscriptions`, sending with `sender`.
    pub fn new(subscriptions: Subscriptions, sender: Sender, settings: DeliverySettings) -> Self {
        Self { subscriptions, sender, settings, wake: Arc::new(Notify::new()), balances: None, ledger: None }
    }

    /// Also turns the changed days of `balances` into `balance.changed` events.
    pub fn with_balances(mut self, balances: fluxo_balance::Balances) -> Self {
        self.balances = Some(balances);
        self
    }

    /// Also turns the period closes of `ledger` into `period.closed` events.
    pub fn with_ledger(mut self, ledger: fluxo_ledger::LedgerStore) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// Makes the deliveries of every close not yet notified (made since its
    /// merchant first subscribed to `period.closed`), then records it as
    /// notified: the close's id is the event's, so a crash in between makes
    /// nothing new. The number of deliveries made.
    pub async fn follow_closes(&self) -> Result<usize, crate::SubscriptionError> {
        let Some(ledger) = &self.ledger else { return Ok(0) };
        let store = self.subscriptions.store();
        let mut made = 0;
        for (id, merchant) in store.closes_to_notify().await? {
            let Some(close) = ledger.period_close(&id).await? else { continue };
            let data = fluxo_proto::json::to_value(
                "fluxo.ledger.v1.PeriodClose",
                &fluxo_ledger::period_close_message(&close),
            )
            .map_err(|e| crate::SubscriptionError::Store(StoreError::Internal(e.to_string())))?;
            let event = Event {
                id: close.id.clone(),
                merchant_id: merchant,
                event_type: EventType::PeriodClosed,
                occurred_at: close.closed_at,
                data,
                traceparent: None,
                tracestate: None,
            };
            made += store.fan_out(std::slice::from_ref(&event)).await?.made;
            store.close_notified(&id).await?;
        }
        if made > 0 {
            METRICS.events.add(made as u64, &[]);
            self.wake.notify_one();
        }
        Ok(made)
    }

    /// Reads every `balance.changed` subscriber's changed days after its
    /// merchant's cursor and makes their deliveries; the cursor moves only
    /// once they are on record (a crash in between makes the same events,
    /// with the same ids, again: nothing new). A merchant seen for the first
    /// time starts at the end of its feed. The number of events made.
    pub async fn follow_balances(&self) -> Result<usize, crate::SubscriptionError> {
        let Some(balances) = &self.balances else { return Ok(0) };
        let store = self.subscriptions.store();
        let mut made = 0;
        for merchant in store.balance_subscribers().await? {
            let Ok(id) = fluxo_types::MerchantId::parse(&merchant) else { continue };
            let stored = store.balance_cursor(&merchant).await?;
            let cursor = match stored.as_deref().map(fluxo_balance::query::ChangeCursor::parse) {
                Some(Ok(cursor)) => cursor,
                _ => {
                    let end = balances.changes_end().await.map_err(balance_error)?;
                    store.set_balance_cursor(&merchant, &end.encode(), false).await?;
                    continue;
                }
            };
            let (days, next) = balances
                .changed_days(&id, cursor.clone(), BALANCE_DAYS_PER_LOOK)
                .await
                .map_err(balance_error)?;
            if days.is_empty() {
                continue;
            }
            let mut events = Vec::with_capacity(days.len());
            for (view, at) in &days {
                let data = fluxo_proto::json::to_value(
                    "fluxo.balance.v1.DailyBalance",
                    &fluxo_balance::grpc::message(view),
                )
                .map_err(|e| crate::SubscriptionError::Store(StoreError::Internal(e.to_string())))?;
                events.push(Event {
                    id: balance_event_id(&merchant, &at.encode()),
                    merchant_id: merchant.clone(),
                    event_type: EventType::BalanceChanged,
                    occurred_at: view
                        .as_of_micros
                        .and_then(DateTime::<Utc>::from_timestamp_micros)
                        .unwrap_or_else(Utc::now),
                    data,
                    traceparent: None,
                    tracestate: None,
                });
            }
            let done = store.fan_out(&events).await?;
            store.set_balance_cursor(&merchant, &next.encode(), false).await?;
            made += done.made;
        }
        if made > 0 {
            METRICS.events.add(made as u64, &[]);
            self.wake.notify_one();
        }
        Ok(made)
    }

    /// Delivers until `stop` resolves; attempts in flight are finished.
    pub async fn run(&self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut failures = 0u32;
        let mut last_count = None::<tokio::time::Instant>;
        let mut last_follow = None::<tokio::time::Instant>;
        // Attempts in flight, each a task of its own (it must progress while
        // this loop waits on the database: on SQLite an attempt holds the one
        // writer while it records). Freed slots are filled a batch at a time
        // (`wants_claim`), so a slow endpoint holds its own slots, not the next claim.
        let mut in_flight = tokio::task::JoinSet::new();
        let (recorder, recording) =
            Recorder::start(self.subscriptions.store().clone(), self.settings.concurrency);
        let mut stopping = false;
        loop {
            if stopping {
                while in_flight.join_next().await.is_some() {}
                drop(recorder);
                let _ = recording.await;
                break;
            }
            if last_count.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                last_count = Some(tokio::time::Instant::now());
                if let Ok(count) = self.subscriptions.store().dead_count().await {
                    set_dead_letters(count);
                }
            }
            if last_follow.is_none_or(|t| t.elapsed() >= FOLLOW_EVERY) {
                last_follow = Some(tokio::time::Instant::now());
                if let Err(error) = self.follow_balances().await {
                    tracing::warn!(%error, "reading the changed days failed; retrying");
                }
                if let Err(error) = self.follow_closes().await {
                    tracing::warn!(%error, "reading the period closes failed; retrying");
                }
            }
            if self.wants_claim(in_flight.len()) {
                let room = self.settings.concurrency.saturating_sub(in_flight.len());
                let limit = u32::try_from(room).unwrap_or(u32::MAX).min(self.settings.batch);
                match self.subscriptions.store().claim(limit, chrono_of(self.settings.lease)).await {
                    Ok(due) => {
                        failures = 0;
                        for d in due {
                            let (notifier, recorder) = (self.clone(), recorder.clone());
                            in_flight.spawn(async move { notifier.attempt(d, &recorder).await });
                        }
                    }
                    Err(error) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(10) {
                            tracing::warn!(%error, failures, "claiming deliveries failed; retrying");
                        }
                    }
                }
            }
            let hungry = self.wants_claim(in_flight.len());
            tokio::select! {
                () = stop.as_mut() => stopping = true,
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                () = self.wake.notified(), if hungry => {}
                () = tokio::time::sleep(self.settings.poll), if hungry => {}
            }
        }
        tracing::info!("notifier stopped");
    }

    /// Whether to claim with `in_flight` attempts running: when idle, or when
    /// a quarter of the slots (at most a batch) are free. A claim per freed
    /// slot would cost two queries per delivery; a slow endpoint still holds
    /// only its own slots.
    fn wants_claim(&self, in_flight: usize) -> bool {
        let concurrency = self.settings.concurrency;
        let threshold =
            (concurrency / 4).clamp(1, usize::try_from(self.settings.batch).unwrap_or(usize::MAX).max(1));
        in_flight == 0 || concurrency.saturating_sub(in_flight) >= threshold
    }

    /// One attempt on one claimed delivery, recorded.
    async fn attempt(&self, due: Due, recorder: &Recorder) {
        let span = tracing::info_span!(
            "webhook.deliver",
            otel.kind = "producer",
            delivery.id = %due.id,
            subscription.id = %due.subscription_id,
            event.id = %due.event_id,
            event.type = %due.event_type,
            attempt = due.attempts + 1,
        );
        fluxo_telemetry::link_to(
            &span,
            due.traceparent.as_deref(),
            due.tracestate.as_deref(),
            vec![KeyValue::new("messaging.message.id", due.event_id.clone())],
        );
        if let Err(error) = self.try_attempt(&due, recorder).instrument(span).await {
            // Left claimed: the lease runs out and the delivery is tried again.
            tracing::warn!(%error, delivery = %due.id, "delivery attempt not recorded; it will be retried");
        }
    }

    async fn try_attempt(&self, due: &Due, recorder: &Recorder) -> Result<(), crate::SubscriptionError> {
        let store = self.subscriptions.store();
        let now = Utc::now();
        let Some(sealed) = &due.sealed else {
            // Deleted since it was claimed: nothing is sent.
            let record = AttemptRecord {
                at: now,
                duration_ms: 0,
                status: None,
                error: "the subscription was deleted".into(),
                response: String::new(),
            };
            recorder.record(due, record, Next::Dead).await?;
            return Ok(());
        };
        let secrets = self.subscriptions.open_secrets(&due.subscription_id, sealed, now)?;
        let signing = secrets.signing(now.timestamp());
        let body = Bytes::from(due.payload.clone());
        let started = std::time::Instant::now();
        let outcome = match url::Url::parse(&due.endpoint_url) {
            Ok(url) => {
                self.sender
                    .send(Attempt {
                        url: &url,
                        event_id: &due.event_id,
                        body: &body,
                        secrets: &signing,
                        timestamp: now.timestamp(),
                    })
                    .await
            }
            Err(_) => Outcome::Failed {
                failure: fluxo_webhooks::Failure::Refused(fluxo_webhooks::DestinationError::NotAUrl),
                retry: false,
            },
        };
        let duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let subscription = KeyValue::new("subscription.id", due.subscription_id.clone());
        match outcome {
            Outcome::Delivered { status, excerpt } => {
                let record = AttemptRecord {
                    at: now,
                    duration_ms,
                    status: Some(status),
                    error: String::new(),
                    response: excerpt,
                };
                recorder.record(due, record, Next::Delivered).await?;
                METRICS.attempts.add(1, &[KeyValue::new("outcome", "delivered")]);
                let delay = (Utc::now() - due.created_at).to_std().unwrap_or_default();
                METRICS.delay.record(fluxo_telemetry::seconds(delay), &[]);
                tracing::debug!(status, "delivered");
            }
            Outcome::Failed { failure, retry } => {
                let status = match &failure {
                    fluxo_webhooks::Failure::Status { status, .. } => Some(*status),
                    _ => None,
                };
                let response = match &failure {
                    fluxo_webhooks::Failure::Status { excerpt, .. } => excerpt.clone(),
                    _ => String::new(),
                };
                let since_first = (now - due.first_attempt_at.unwrap_or(now)).to_std().unwrap_or_default();
                let wait = if retry {
                    self.settings.retries.next(due.attempts + 1, since_first, jitter())
                } else {
                    None
                };
                let next = match wait {
                    Some(wait) => Next::RetryAt(now + chrono_of(wait)),
                    None => Next::Dead,
                };
                let record =
                    AttemptRecord { at: now, duration_ms, status, error: failure.to_string(), response };
                let dead = matches!(next, Next::Dead);
                recorder.record(due, record, next).await?;
                METRICS.failures.add(1, std::slice::from_ref(&subscription));
                let outcome = if dead { "dead" } else { "failed" };
                METRICS.attempts.add(1, &[KeyValue::new("outcome", outcome)]);
                tracing::info!(%failure, outcome, "delivery attempt failed");
                if !retry {
                    store
                        .disable(
                            &due.subscription_id,
                            &format!("the endpoint {failure}: it asked for no more events"),
                        )
                        .await?;
                } else if let Some(since) = store.failing_since(&due.subscription_id).await?
                    && (now - since).to_std().unwrap_or_default() >= self.settings.disable_after
                {
                    let reason = format!(
                        "the endpoint has failed every attempt since {}: {failure}",
                        since.to_rfc3339()
                    );
                    tracing::warn!(subscription = %due.subscription_id, %reason, "disabling a subscription");
                    store.disable(&due.subscription_id, &reason).await?;
                }
            }
        }
        Ok(())
    }
}
