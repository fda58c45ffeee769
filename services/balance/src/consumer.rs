//! The consolidator as a Redis Streams consumer-group member.
//!
//! Any number of these run at once and come and go at any moment (KEDA scales
//! them to zero, Karpenter drains nodes, processes crash). What keeps the
//! balances exact through all of that:
//! - an event and its "applied" record commit in one transaction, so a
//!   redelivered event is skipped ([`crate::store::BalanceStore::apply`]);
//! - a message is acknowledged only after that commit;
//! - messages left pending by a consumer that died are claimed by a live one
//!   once idle long enough (XAUTOCLAIM);
//! - a message that keeps failing moves to a dead-letter stream, with its
//!   reason, after `max_deliveries`, without blocking the rest;
//! - on shutdown the consumer stops reading, finishes the batch in hand, and exits.
//!
//! Every consumer also keeps the stream gauges current, from XINFO GROUPS and
//! XLEN: `fluxo.stream.lag` and `fluxo.stream.pending` per consumer group, and
//! `fluxo.stream.dead_letters`.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, LazyLock, Mutex},
    time::Duration,
};

use fluxo_queue::{StreamEvent, StreamNames};
use fred::{
    prelude::{Client, HashesInterface, StreamsInterface, TransactionInterface},
    types::{Value, streams::XPendingArgs},
};
use futures::{StreamExt, stream::FuturesUnordered};

use fluxo_telemetry::opentelemetry::{KeyValue, metrics::ObservableGauge};

use crate::consolidator::{ApplyError, Consolidator};

/// How often a consumer measures the stream for its gauges.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);
/// Batches a consumer applies at once (see [`StreamConsumer::run`]).
pub const BATCHES_IN_FLIGHT: usize = 2;
/// How long past its `block` time a read in flight at shutdown is awaited
/// before the consumer gives up on Redis and exits.
const READ_GRACE: Duration = Duration::from_secs(2);

/// How long the consumer lets messages gather after a read that found fewer
/// than a full batch (batches in flight keep committing meanwhile). A read
/// returns as soon as one message is there, so under a steady trickle every
/// batch was a message or two — each a transaction, an acknowledgement and a
/// cache invalidation of its own.
const LINGER: Duration = Duration::from_millis(5);

/// The stream as last measured.
#[derive(Debug, Clone, Default)]
struct StreamState {
    /// (stream, group, lag, pending) for every group of the stream.
    groups: Vec<(String, String, i64, i64)>,
    /// (dead-letter stream, length).
    dead_letters: Option<(String, i64)>,
}

struct StreamGauges {
    state: Arc<Mutex<StreamState>>,
    _instruments: [ObservableGauge<i64>; 3],
}

fn group_attributes(stream: &str, group: &str) -> [KeyValue; 2] {
    [
        KeyValue::new("messaging.destination.name", stream.to_owned()),
        KeyValue::new("messaging.consumer.group.name", group.to_owned()),
    ]
}

static GAUGES: LazyLock<StreamGauges> = LazyLock::new(|| {
    let meter = fluxo_telemetry::meter();
    let state = Arc::new(Mutex::new(StreamState::default()));
    let read = |state: &Arc<Mutex<StreamState>>| {
        state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    };
    let (s1, s2, s3) = (state.clone(), state.clone(), state.clone());
    let lag = meter
        .i64_observable_gauge("fluxo.stream.lag")
        .with_unit("{message}")
        .with_description("Stream entries not yet delivered to the consumer group (XINFO GROUPS lag)")
        .with_callback(move |o| {
            for (stream, group, lag, _) in read(&s1).groups {
                o.observe(lag, &group_attributes(&stream, &group));
            }
        })
        .build();
    let pending = meter
        .i64_observable_gauge("fluxo.stream.pending")
        .with_unit("{message}")
        .with_description("Messages delivered to the consumer group but not yet acknowledged")
        .with_callback(move |o| {
            for (stream, group, _, pending) in read(&s2).groups {
                o.observe(pending, &group_attributes(&stream, &group));
            }
        })
        .build();
    let dead = meter
        .i64_observable_gauge("fluxo.stream.dead_letters")
        .with_unit("{message}")
        .with_description("Messages parked in the dead-letter stream")
        .with_callback(move |o| {
            if let Some((stream, len)) = read(&s3).dead_letters {
                o.observe(len, &[KeyValue::new("messaging.destination.name", stream)]);
            }
        })
        .build();
    StreamGauges { state, _instruments: [lag, pending, dead] }
});

/// Settings of one consumer.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Stream, group and dead-letter stream.
    pub names: StreamNames,
    /// This consumer's name in the group; unique per process.
    pub consumer: String,
    /// Messages read per batch.
    pub batch_size: u64,
    /// How long one blocking read waits for new messages.
    pub block: Duration,
    /// A pending message idle this long is claimed from whoever holds it.
    pub claim_idle: Duration,
    /// Deliveries after which a failing message goes to the dead-letter stream.
    pub max_deliveries: u64,
    /// How often acknowledged messages are trimmed from the stream.
    pub trim_interval: Duration,
}

/// Why the consumer stopped or an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// Redis refused or is unreachable.
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// The read model failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A message that is not in the stream.
    #[error("no message {0}")]
    NotFound(String),
    /// A replayed message still fails.
    #[error("message {id} still fails: {reason}")]
    StillFailing {
        /// Its id.
        id: String,
        /// Why.
        reason: String,
    },
}

/// Creates the consumer group (and the stream) if missing. Safe to repeat.
pub async fn ensure_group(client: &Client, names: &StreamNames) -> Result<(), ConsumerError> {
    let created: Result<(), fred::error::Error> =
        client.xgroup_create(&names.stream, &names.group, "0", true).await;
    match created {
        Ok(()) => Ok(()),
        Err(e) if e.details().contains("BUSYGROUP") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

type Message = (String, HashMap<String, Value>);

/// One consumer-group member.
#[derive(Debug, Clone)]
pub struct StreamConsumer {
    // Blocking reads hold a connection for their whole wait; they get their own.
    reader: Client,
    client: Client,
    consolidator: Consolidator,
    config: ConsumerConfig,
}

impl StreamConsumer {
    /// A consumer reading with `reader` (dedicated to blocking reads) and
    /// acknowledging, claiming and dead-lettering with `client`.
    pub fn new(reader: Client, client: Client, consolidator: Consolidator, config: ConsumerConfig) -> Self {
        Self { reader, client, consolidator, config }
    }

    fn failures_key(&self) -> String {
        format!("{}:failures", self.config.names.stream)
    }

    /// Consumes until `stop` resolves; the batches in hand are always finished.
    ///
    /// Up to [`BATCHES_IN_FLIGHT`] batches are applied at once: the next batch
    /// is read while the last one commits, so a commit's wait for the disk does
    /// not stall the stream. Order between batches does not matter to the read
    /// model (it adds; every entry is applied once whichever commits first).
    pub async fn run(&self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut last_claim = tokio::time::Instant::now();
        let mut last_trim = tokio::time::Instant::now();
        let mut last_gauges: Option<tokio::time::Instant> = None;
        let mut failures = 0u32;
        let mut in_flight = FuturesUnordered::new();
        loop {
            if last_gauges.is_none_or(|t| t.elapsed() >= GAUGE_INTERVAL) {
                last_gauges = Some(tokio::time::Instant::now());
                if let Err(error) = self.measure().await {
                    tracing::debug!(%error, "cannot measure the stream");
                }
            }
            if last_claim.elapsed() >= self.claim_interval() {
                last_claim = tokio::time::Instant::now();
                if let Err(error) = self.reclaim().await {
                    tracing::warn!(%error, "claiming idle messages failed");
                }
            }
            if last_trim.elapsed() >= self.config.trim_interval {
                last_trim = tokio::time::Instant::now();
                if let Err(error) = self.trim().await {
                    tracing::warn!(%error, "trimming the stream failed");
                }
            }
            while in_flight.len() >= BATCHES_IN_FLIGHT {
                in_flight.next().await;
            }
            // A read is never abandoned: once XREADGROUP is sent, Redis may already
            // have delivered a batch to this consumer, and dropping the reply would
            // leave that batch pending until another consumer claims it. On stop the
            // read in flight (bounded by `block`) is awaited and its batch finished.
            let read = self.read_new();
            tokio::pin!(read);
            let mut stopping = false;
            let read = loop {
                tokio::select! {
                    () = &mut stop, if !stopping => {
                        stopping = true;
                        let bound = self.config.block + READ_GRACE;
                        match tokio::time::timeout(bound, &mut read).await {
                            Ok(read) => break Some(read),
                            Err(_) => break None,
                        }
                    }
                    read = &mut read => break Some(read),
                    // Batches in flight keep committing while the read waits.
                    Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                }
            };
            let Some(read) = read else { break };
            match read {
                Ok(batch) => {
                    failures = 0;
                    let full = batch.len() as u64 >= self.config.batch_size;
                    if !batch.is_empty() {
                        in_flight.push(self.process(batch));
                        if !full && !stopping {
                            let linger = tokio::time::sleep(LINGER);
                            tokio::pin!(linger);
                            loop {
                                tokio::select! {
                                    () = &mut stop => { stopping = true; break; }
                                    () = &mut linger => break,
                                    Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                                }
                            }
                        }
                    }
                }
                Err(error) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(%error, failures, "reading the stream failed; retrying");
                    }
                    // Redis came back empty (restarted without persistence): recreate
                    // the group; what was lost is found by `fluxo balances reconcile`.
                    if error.details().contains("NOGROUP") {
                        match ensure_group(&self.client, &self.config.names).await {
                            Ok(()) => {
                                tracing::warn!("consumer group was missing and has been recreated")
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot recreate the consumer group yet")
                            }
                        }
                    }
                    if !stopping {
                        let pause = Duration::from_millis(100 * u64::from(failures.min(30)));
                        tokio::select! {
                            () = &mut stop => stopping = true,
                            () = tokio::time::sleep(pause) => {}
                        }
                    }
                }
            }
            if stopping {
                break;
            }
        }
        // Whatever was read is applied and acknowledged before the consumer stops.
        while in_flight.next().await.is_some() {}
        tracing::info!(consumer = %self.config.consumer, "consumer stopped");
    }

    /// Updates the stream gauges from XINFO GROUPS and XLEN.
    pub async fn measure(&self) -> Result<(), ConsumerError> {
        let names = &self.config.names;
        let groups: Vec<HashMap<String, Value>> = self.client.xinfo_groups(&names.stream).await?;
        let number = |g: &HashMap<String, Value>, key: &str| g.get(key).and_then(Value::as_i64);
        let groups = groups
            .iter()
            .filter_map(|g| {
                let name = g.get("name").and_then(Value::as_string)?;
                // `lag` is unknown (nil) for a while after some XDEL/XTRIM; report 0 then
                // rather than dropping the series.
                let lag = number(g, "lag").unwrap_or(0);
                Some((names.stream.clone(), name, lag, number(g, "pending").unwrap_or(0)))
            })
            .collect();
        let dead: u64 = self.client.xlen(&names.dead_letters).await?;
        let mut state = GAUGES.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.groups = groups;
        state.dead_letters = Some((names.dead_letters.clone(), i64::try_from(dead).unwrap_or(i64::MAX)));
        Ok(())
    }

    fn claim_interval(&self) -> Duration {
        (self.config.claim_idle / 2).max(Duration::from_millis(100))
    }

    async fn read_new(&self) -> Result<Vec<Message>, fred::error::Error> {
        let names = &self.config.names;
        let block = u64::try_from(self.config.block.as_millis()).unwrap_or(u64::MAX);
        let reply: Value = self
            .reader
            .xreadgroup(
                &names.group,
                &self.config.consumer,
                Some(self.config.batch_size),
                Some(block),
                false,
                &names.stream,
                ">",
            )
            .await?;
        messages(reply)
    }

    /// Applies a batch, acknowledges what is in the read model, and records
    /// why the rest failed (they stay pending and are retried).
    pub async fn process(&self, batch: Vec<Message>) {
        let mut ids = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        let mut results: Vec<Option<Result<(), ApplyError>>> = Vec::with_capacity(batch.len());
        let mut messages = Vec::with_capacity(batch.len());
        // Which event each message became, if it could be read.
        let mut decoded = Vec::with_capacity(batch.len());
        for (id, fields) in batch {
            match StreamEvent::from_fields(&fields) {
                Ok(event) => {
                    decoded.push(Some(events.len()));
                    events.push(event);
                    results.push(None);
                }
                Err(e) => {
                    decoded.push(None);
                    results.push(Some(Err(ApplyError::Malformed(e.to_string()))));
                }
            }
            ids.push(id);
            messages.push(fields);
        }
        let mut applied = self.consolidator.apply(&events).await.into_iter();
        let results: Vec<Result<(), ApplyError>> =
            results.into_iter().map(|r| r.unwrap_or_else(|| applied.next().unwrap_or(Ok(())))).collect();

        let acked: Vec<&String> =
            ids.iter().zip(&results).filter(|(_, r)| r.is_ok()).map(|(id, _)| id).collect();
        if !acked.is_empty() {
            let ack: Vec<String> = acked.iter().map(|s| (*s).clone()).collect();
            let result: Result<i64, _> =
                self.client.xack(&self.config.names.stream, &self.config.names.group, ack).await;
            if let Err(error) = result {
                // Not acknowledged means redelivered later and skipped as a duplicate.
                tracing::warn!(%error, "acknowledging failed; the messages will be redelivered and deduplicated");
            }
        }
        for (((id, result), fields), index) in ids.iter().zip(&results).zip(messages).zip(decoded) {
            let event = index.map(|i| &events[i]);
            match result {
                Ok(()) => {}
                // The database is away: the message stays pending and is retried.
                Err(reason @ ApplyError::Unavailable(_)) => {
                    tracing::warn!(message_id = %id, %reason, "event not applied; it stays pending for a retry");
                    let _: Result<i64, _> =
                        self.client.hset(self.failures_key(), (id.as_str(), reason.to_string())).await;
                }
                // Refused for what it is: another delivery would be refused the same
                // way, so it is parked at once instead of after every redelivery.
                Err(reason) => {
                    if let Some(event) = event
                        && let Err(error) = self.consolidator.park(event, reason).await
                    {
                        tracing::warn!(%error, message_id = %id, "recording the parked event in the read model failed");
                    }
                    if let Err(error) = self.dead_letter(id, fields, 1, Some(reason.to_string())).await {
                        tracing::warn!(%error, message_id = %id, "dead-lettering failed; the message stays pending");
                    }
                }
            }
        }
    }

    /// Claims messages idle past `claim_idle` (from dead consumers, or this
    /// one's own failures), dead-letters those delivered too often, and
    /// processes the rest.
    pub async fn reclaim(&self) -> Result<usize, ConsumerError> {
        let names = &self.config.names;
        let idle = u64::try_from(self.config.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let (_, claimed): (String, Vec<Message>) = self
            .client
            .xautoclaim_values(
                &names.stream,
                &names.group,
                &self.config.consumer,
                idle,
                "0-0",
                Some(self.config.batch_size),
                false,
            )
            .await?;
        if claimed.is_empty() {
            return Ok(0);
        }
        let deliveries = self.deliveries(&claimed).await?;
        let mut retry = Vec::new();
        for (id, fields) in claimed {
            let count = deliveries.get(&id).copied().unwrap_or(1);
            if count > self.config.max_deliveries {
                self.dead_letter(&id, fields, count, None).await?;
            } else {
                retry.push((id, fields));
            }
        }
        let n = retry.len();
        if n > 0 {
            tracing::info!(messages = n, "processing claimed messages");
            self.process(retry).await;
        }
        Ok(n)
    }

    async fn deliveries(&self, claimed: &[Message]) -> Result<HashMap<String, u64>, ConsumerError> {
        let (Some(first), Some(last)) = (claimed.first(), claimed.last()) else {
            return Ok(HashMap::new());
        };
        let args = XPendingArgs {
            idle: None,
            start: Some(first.0.as_str().into()),
            end: Some(last.0.as_str().into()),
            count: Some(self.config.batch_size.max(claimed.len() as u64)),
            consumer: Some(self.config.consumer.as_str().into()),
        };
        let pending: Vec<(String, String, u64, u64)> =
            self.client.xpending(&self.config.names.stream, &self.config.names.group, args).await?;
        Ok(pending.into_iter().map(|(id, _, _, count)| (id, count)).collect())
    }

    async fn dead_letter(
        &self,
        id: &str,
        fields: HashMap<String, Value>,
        deliveries: u64,
        reason: Option<String>,
    ) -> Result<(), ConsumerError> {
        let names = &self.config.names;
        let reason = match reason {
            Some(reason) => reason,
            None => {
                let recorded: Option<String> = self.client.hget(self.failures_key(), id).await?;
                recorded.unwrap_or_else(|| "failed repeatedly".to_owned())
            }
        };
        tracing::error!(message_id = %id, deliveries, %reason, dead_letters = %names.dead_letters, "moving a failing message to the dead-letter stream");
        let mut entry: Vec<(String, Value)> = fields.into_iter().collect();
        entry.sort_by(|a, b| a.0.cmp(&b.0));
        entry.extend([
            ("dlq_reason".to_owned(), Value::from(reason)),
            ("dlq_original_id".to_owned(), Value::from(id)),
            ("dlq_deliveries".to_owned(), Value::from(i64::try_from(deliveries).unwrap_or(i64::MAX))),
            ("dlq_consumer".to_owned(), Value::from(self.config.consumer.as_str())),
        ]);
        // Parking and acknowledging happen together, or not at all.
        let tx = self.client.multi();
        let _: () = tx.xadd(&names.dead_letters, false, None, "*", entry).await?;
        let _: () = tx.xack(&names.stream, &names.group, id).await?;
        let _: () = tx.hdel(self.failures_key(), id).await?;
        let _: Value = tx.exec(true).await?;
        Ok(())
    }

    /// Trims the stream below what the group has acknowledged: below the
    /// oldest pending message, and never past the last delivered one, so
    /// nothing unconsumed is dropped and the group's lag stays meaningful.
    pub async fn trim(&self) -> Result<(), ConsumerError> {
        let names = &self.config.names;
        let groups: Vec<HashMap<String, Value>> = self.client.xinfo_groups(&names.stream).await?;
        let Some(group) = groups
            .iter()
            .find(|g| g.get("name").and_then(Value::as_string).as_deref() == Some(names.group.as_str()))
        else {
            return Ok(());
        };
        let Some(last_delivered) = group.get("last-delivered-id").and_then(Value::as_string) else {
            return Ok(());
        };
        let summary: Vec<Value> = self.client.xpending(&names.stream, &names.group, ()).await?;
        let oldest_pending = summary.get(1).and_then(Value::as_string);
        let floor = match oldest_pending {
            Some(p) if stream_id_lt(&p, &last_delivered) => p,
            _ => last_delivered,
        };
        if floor != "0-0" {
            let _: i64 = self.client.xtrim(&names.stream, ("MINID", "~", floor.as_str())).await?;
        }
        Ok(())
    }
}

fn stream_id_lt(a: &str, b: &str) -> bool {
    let parse = |s: &str| {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        (ms.parse::<u64>().unwrap_or(0), seq.parse::<u64>().unwrap_or(0))
    };
    parse(a) < parse(b)
}

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

    /// Applies a parked message again (after its cause was fixed) and removes
    /// it when it is in the read model. Applying is idempotent: a message
    /// already applied is not counted twice.
    pub async fn replay(&self, id: &str, consolidator: &Consolidator) -> Result<(), ConsumerError> {
        let letter = self.show(id).await?;
        let event = letter.event.ok_or_else(|| ConsumerError::StillFailing {
            id: id.to_owned(),
            reason: "the message is malformed and can only be dropped".into(),
        })?;
        match consolidator.apply(std::slice::from_ref(&event)).await.pop() {
            Some(Ok(())) => {
                let _: i64 = self.client.xdel(&self.names.dead_letters, id).await?;
                consolidator.store().unpark(&event.event_id).await?;
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

/// The messages of an XREADGROUP reply. A read that waited its `block` time
/// without news is answered with nil: no messages, not an error (treated as
/// one, every idle wait would count as a failure and lengthen the pause before
/// the next read, delaying the first events after a quiet spell by seconds).
fn messages(reply: Value) -> Result<Vec<Message>, fred::error::Error> {
    if reply.is_null() {
        return Ok(Vec::new());
    }
    let streams: HashMap<String, Vec<Message>> = reply.into_xread_response()?;
    Ok(streams.into_values().flatten().collect())
}

#[cfg(test)]
mod tests {
    use fred::prelude::*;

    use super::*;

    /// Real XREADGROUP replies from the suite's Redis, read as the consumer reads them.
    #[tokio::test]
    async fn a_read_that_waited_in_vain_is_an_empty_batch_and_news_are_read() {
        let url = std::env::var("FLUXO_TEST_REDIS_URL")
            .expect("FLUXO_TEST_REDIS_URL is not set: run the suite with ./scripts/test.sh");
        let redis = fluxo_queue::client(&fluxo_queue::RedisConfig {
            url: url.into(),
            command_timeout: Duration::from_secs(5),
            tls_ca_file: None,
        })
        .unwrap();
        redis.wait_for_connect().await.unwrap();
        let stream = format!("test:idle-read:{}", ulid::Ulid::new());
        let _: () = redis.xgroup_create(&stream, "g", "$", true).await.unwrap();
        let read = || async {
            let reply: Value =
                redis.xreadgroup("g", "c", Some(10), Some(50), false, &stream, ">").await.unwrap();
            messages(reply)
        };

        let idle = read().await.expect("waiting without news is not a failure");
        assert!(idle.is_empty());

        let id: String = redis.xadd(&stream, false, None, "*", vec![("event_id", "e-1")]).await.unwrap();
        let batch = read().await.unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].0, id);
        assert_eq!(batch[0].1.get("event_id").and_then(Value::as_string).as_deref(), Some("e-1"));
        let _: () = redis.del(&stream).await.unwrap();
    }
}
