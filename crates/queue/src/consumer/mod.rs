//! A Redis Streams consumer-group member, for any [`Handler`] of the ledger's
//! events: the consolidators (which apply them to the daily balances) and the
//! notifiers (which turn them into webhook deliveries), each group on its own.
//!
//! Any number of these run at once and come and go at any moment (KEDA scales
//! them to zero, Karpenter drains nodes, processes crash). What keeps every
//! event handled through all of that:
//! - a handler records an event and its effect in one transaction, so a
//!   redelivered event is skipped (see each [`Handler`]);
//! - a message is acknowledged only after that commit;
//! - messages left pending by a consumer that died are claimed by a live one
//!   once idle long enough (XAUTOCLAIM);
//! - a message that keeps failing moves to a dead-letter stream, with its
//!   reason, after `max_deliveries`, without blocking the rest;
//! - on shutdown the consumer stops reading, finishes the batch in hand, and exits.
//!
//! The jobs, one module each: reading and applying (here), the stream gauges
//! ([`gauges`]), claiming, dead-lettering and trimming ([`maintenance`]), and
//! the operators' dead-letter commands ([`dead_letters`]).

mod dead_letters;
mod gauges;
mod maintenance;

use std::{collections::HashMap, future::Future, pin::Pin, time::Duration};

pub use crate::ensure_group;
use crate::{StreamEvent, StreamNames};
use fred::{
    prelude::{Client, HashesInterface, StreamsInterface},
    types::Value,
};
use futures::{StreamExt, stream::FuturesUnordered};
use tokio::time::Instant;

pub use dead_letters::{DeadLetter, DeadLetters};

/// Why a handler did not handle an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    /// The event cannot be read: retrying will not help.
    #[error("undecodable event: {0}")]
    Malformed(String),
    /// The handler's store refused it (a constraint, an overflow, a trigger).
    #[error("rejected: {0}")]
    Rejected(String),
    /// The handler's store is unreachable: retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// What a consumer does with the events it reads.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles `events`: one result per event, in order. Handling an event
    /// twice must have the effect of handling it once (redeliveries happen).
    async fn handle(&self, events: &[StreamEvent]) -> Vec<Result<(), HandleError>>;

    /// Records that `event` was moved to the dead-letter stream for `reason`.
    async fn park(&self, _event: &StreamEvent, _reason: &HandleError) -> Result<(), String> {
        Ok(())
    }

    /// Forgets that record, once a replay handled the event.
    async fn unpark(&self, _event_id: &str) -> Result<(), String> {
        Ok(())
    }
}

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
/// batch would be a message or two — each a transaction, an acknowledgement
/// and a cache invalidation of its own.
const LINGER: Duration = Duration::from_millis(5);

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

impl ConsumerConfig {
    /// The consumer `consumer` of `names`, with the default batching, claiming,
    /// dead-lettering and trimming.
    pub fn new(names: StreamNames, consumer: String) -> Self {
        Self {
            names,
            consumer,
            batch_size: 500,
            block: Duration::from_secs(1),
            claim_idle: Duration::from_secs(30),
            max_deliveries: 5,
            trim_interval: Duration::from_secs(30),
        }
    }
}

/// Why the consumer stopped or an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// Redis refused or is unreachable.
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// The handler failed.
    #[error("{0}")]
    Handler(String),
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

type Message = (String, HashMap<String, Value>);

/// One consumer-group member.
#[derive(Debug, Clone)]
pub struct StreamConsumer<H> {
    // Blocking reads hold a connection for their whole wait; they get their own.
    reader: Client,
    client: Client,
    handler: H,
    config: ConsumerConfig,
}

impl<H: Handler> StreamConsumer<H> {
    /// A consumer reading with `reader` (dedicated to blocking reads) and
    /// acknowledging, claiming and dead-lettering with `client`.
    pub fn new(reader: Client, client: Client, handler: H, config: ConsumerConfig) -> Self {
        Self { reader, client, handler, config }
    }

    /// Why messages of this group last failed, by message id: one hash per
    /// group, so groups on one stream do not overwrite each other's reasons.
    pub(super) fn failures_key(&self) -> String {
        format!("{}:{}:failures", self.config.names.stream, self.config.names.group)
    }

    /// Consumes until `stop` resolves; the batches in hand are always finished.
    ///
    /// Up to [`BATCHES_IN_FLIGHT`] batches are applied at once: the next batch
    /// is read while the last one commits, so a commit's wait for the disk does
    /// not stall the stream. Order between batches does not matter to the read
    /// model (it adds; every entry is applied once whichever commits first).
    pub async fn run(&self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut chores = Chores::default();
        let mut failures = 0u32;
        let mut in_flight = FuturesUnordered::new();
        let mut stopping = false;
        while !stopping {
            chores.run_due(self).await;
            while in_flight.len() >= BATCHES_IN_FLIGHT {
                in_flight.next().await;
            }
            let read = self.read_new();
            let Some(read) = self.await_read(read, &mut stop, &mut stopping, &mut in_flight).await else {
                break;
            };
            match read {
                Ok(batch) => {
                    failures = 0;
                    let full = batch.len() as u64 >= self.config.batch_size;
                    if !batch.is_empty() {
                        in_flight.push(self.process(batch));
                        if !full && !stopping {
                            stopping =
                                wait_or_stop(tokio::time::sleep(LINGER), &mut stop, &mut in_flight).await;
                        }
                    }
                }
                Err(error) => {
                    failures += 1;
                    self.read_failed(&error, failures).await;
                    if !stopping {
                        let pause = Duration::from_millis(100 * u64::from(failures.min(30)));
                        stopping = wait_or_stop(tokio::time::sleep(pause), &mut stop, &mut in_flight).await;
                    }
                }
            }
        }
        // Whatever was read is applied and acknowledged before the consumer stops.
        while in_flight.next().await.is_some() {}
        tracing::info!(consumer = %self.config.consumer, "consumer stopped");
    }

    /// Awaits `read` while the batches in flight keep committing. A read is
    /// never abandoned: once XREADGROUP is sent, Redis may already have
    /// delivered a batch to this consumer, and dropping the reply would leave
    /// that batch pending until another consumer claims it. So when `stop`
    /// resolves the read (bounded by `block`) is still awaited, up to
    /// [`READ_GRACE`] longer; `None` when Redis did not answer by then.
    async fn await_read<R: Future, S: Future<Output = ()>, B: Future<Output = ()>>(
        &self,
        read: R,
        stop: &mut Pin<&mut S>,
        stopping: &mut bool,
        in_flight: &mut FuturesUnordered<B>,
    ) -> Option<R::Output> {
        tokio::pin!(read);
        loop {
            tokio::select! {
                () = stop.as_mut(), if !*stopping => {
                    *stopping = true;
                    let bound = self.config.block + READ_GRACE;
                    return tokio::time::timeout(bound, &mut read).await.ok();
                }
                read = &mut read => return Some(read),
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            }
        }
    }

    /// Logs a failed read (the first, then every tenth in a row) and, when
    /// Redis came back empty (restarted without persistence), recreates the
    /// group; what was lost is found by `fluxo balances reconcile`.
    async fn read_failed(&self, error: &fred::error::Error, failures: u32) {
        if failures == 1 || failures.is_multiple_of(10) {
            tracing::warn!(%error, failures, "reading the stream failed; retrying");
        }
        if error.details().contains("NOGROUP") {
            match ensure_group(&self.client, &self.config.names).await {
                Ok(()) => tracing::warn!("consumer group was missing and has been recreated"),
                Err(e) => tracing::warn!(error = %e, "cannot recreate the consumer group yet"),
            }
        }
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
        let mut results: Vec<Option<Result<(), HandleError>>> = Vec::with_capacity(batch.len());
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
                    results.push(Some(Err(HandleError::Malformed(e.to_string()))));
                }
            }
            ids.push(id);
            messages.push(fields);
        }
        let mut applied = self.handler.handle(&events).await.into_iter();
        let results: Vec<Result<(), HandleError>> =
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
                Err(reason @ HandleError::Unavailable(_)) => {
                    tracing::warn!(message_id = %id, %reason, "event not applied; it stays pending for a retry");
                    let _: Result<i64, _> =
                        self.client.hset(self.failures_key(), (id.as_str(), reason.to_string())).await;
                }
                // Refused for what it is: another delivery would be refused the same
                // way, so it is parked at once instead of after every redelivery.
                Err(reason) => {
                    if let Some(event) = event
                        && let Err(error) = self.handler.park(event, reason).await
                    {
                        tracing::warn!(%error, message_id = %id, "recording the parked event failed");
                    }
                    if let Err(error) = self.dead_letter(id, fields, 1, Some(reason.to_string())).await {
                        tracing::warn!(%error, message_id = %id, "dead-lettering failed; the message stays pending");
                    }
                }
            }
        }
    }
}

/// When the consumer last did each of its chores.
#[derive(Debug, Default)]
struct Chores {
    gauges: Option<Instant>,
    claim: Option<Instant>,
    trim: Option<Instant>,
}

impl Chores {
    /// Does the chores that are due: gauges every [`GAUGE_INTERVAL`], claiming
    /// every half `claim_idle`, trimming every `trim_interval`. Claiming and
    /// trimming wait one interval after start; gauges are measured at once.
    async fn run_due<H: Handler>(&mut self, consumer: &StreamConsumer<H>) {
        let now = Instant::now();
        let due = |last: &mut Option<Instant>, every: Duration, at_start: bool| {
            let due = match *last {
                None => at_start,
                Some(t) => t.elapsed() >= every,
            };
            if due || last.is_none() {
                *last = Some(now);
            }
            due
        };
        if due(&mut self.gauges, GAUGE_INTERVAL, true)
            && let Err(error) = consumer.measure().await
        {
            tracing::debug!(%error, "cannot measure the stream");
        }
        if due(&mut self.claim, consumer.claim_interval(), false)
            && let Err(error) = consumer.reclaim().await
        {
            tracing::warn!(%error, "claiming idle messages failed");
        }
        if due(&mut self.trim, consumer.config.trim_interval, false)
            && let Err(error) = consumer.trim().await
        {
            tracing::warn!(%error, "trimming the stream failed");
        }
    }
}

/// Waits for `wait` while the batches in flight keep committing; true when
/// `stop` resolved first.
async fn wait_or_stop<S: Future<Output = ()>, B: Future<Output = ()>>(
    wait: impl Future<Output = ()>,
    stop: &mut Pin<&mut S>,
    in_flight: &mut FuturesUnordered<B>,
) -> bool {
    tokio::pin!(wait);
    loop {
        tokio::select! {
            () = stop.as_mut() => return true,
            () = &mut wait => return false,
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
        }
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
        let redis = crate::client(&crate::RedisConfig {
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

    struct Nothing;

    #[async_trait::async_trait]
    impl Handler for Nothing {
        async fn handle(&self, events: &[StreamEvent]) -> Vec<Result<(), HandleError>> {
            vec![Ok(()); events.len()]
        }
    }

    /// Two groups on one stream (consolidators and notifiers): a trim by the
    /// group that is ahead never drops what the one behind has not read.
    #[tokio::test]
    async fn a_trim_keeps_what_any_group_has_not_consumed() {
        let url = std::env::var("FLUXO_TEST_REDIS_URL")
            .expect("FLUXO_TEST_REDIS_URL is not set: run the suite with ./scripts/test.sh");
        let redis = crate::client(&crate::RedisConfig {
            url: url.into(),
            command_timeout: Duration::from_secs(5),
            tls_ca_file: None,
        })
        .unwrap();
        redis.wait_for_connect().await.unwrap();
        let stream = format!("test:trim:{}", ulid::Ulid::new());
        let ahead = StreamNames::new(&stream, "ahead");
        let behind = StreamNames::new(&stream, "behind");
        ensure_group(&redis, &ahead).await.unwrap();
        ensure_group(&redis, &behind).await.unwrap();
        // More than one stream node (100 entries), so an approximate trim can drop something.
        for i in 0..1000 {
            let _: String =
                redis.xadd(&stream, false, None, "*", vec![("event_id", format!("e-{i}"))]).await.unwrap();
        }
        let consumer = |names: &StreamNames| {
            StreamConsumer::new(
                redis.clone(),
                redis.clone(),
                Nothing,
                ConsumerConfig::new(names.clone(), "c".into()),
            )
        };
        let read_all = |group: &'static str, count: u64| {
            let redis = redis.clone();
            let stream = stream.clone();
            async move {
                let reply: Value =
                    redis.xreadgroup(group, "c", Some(count), None, false, &stream, ">").await.unwrap();
                let ids: Vec<String> = messages(reply).unwrap().into_iter().map(|(id, _)| id).collect();
                let _: i64 = redis.xack(&stream, group, ids).await.unwrap();
            }
        };
        read_all("ahead", 1000).await;
        consumer(&ahead).trim().await.unwrap();
        let len: u64 = redis.xlen(&stream).await.unwrap();
        assert_eq!(len, 1000, "the group behind has read nothing: nothing may go");

        read_all("behind", 600).await;
        consumer(&ahead).trim().await.unwrap();
        let len: u64 = redis.xlen(&stream).await.unwrap();
        assert!((400..1000).contains(&len), "trimmed to what both consumed, keeping the 400 unread: {len}");
        let _: () = redis.del(&stream).await.unwrap();
    }

    /// What a consumer holds (its pod-deletion cost) is its own share of the
    /// group's pending entries, read from the suite's Redis.
    #[tokio::test]
    async fn a_consumer_holds_what_it_read_and_did_not_acknowledge() {
        let url = std::env::var("FLUXO_TEST_REDIS_URL")
            .expect("FLUXO_TEST_REDIS_URL is not set: run the suite with ./scripts/test.sh");
        let redis = crate::client(&crate::RedisConfig {
            url: url.into(),
            command_timeout: Duration::from_secs(5),
            tls_ca_file: None,
        })
        .unwrap();
        redis.wait_for_connect().await.unwrap();
        let stream = format!("test:held:{}", ulid::Ulid::new());
        let names = StreamNames::new(&stream, "g");
        ensure_group(&redis, &names).await.unwrap();
        for i in 0..3 {
            let _: String =
                redis.xadd(&stream, false, None, "*", vec![("event_id", format!("e-{i}"))]).await.unwrap();
        }
        let reply: Value = redis.xreadgroup("g", "busy", Some(3), None, false, &stream, ">").await.unwrap();
        let read = messages(reply).unwrap();
        assert_eq!(read.len(), 3);
        let held = |consumer: &'static str| {
            let (redis, names) = (redis.clone(), names.clone());
            async move { crate::consumer_pending(&redis, &names, consumer).await.unwrap() }
        };
        assert_eq!(held("busy").await, 3);
        assert_eq!(held("idle").await, 0, "a consumer the group does not know holds nothing");
        let _: i64 = redis.xack(&stream, "g", read[0].0.clone()).await.unwrap();
        assert_eq!(held("busy").await, 2);
        let _: () = redis.del(&stream).await.unwrap();
    }
}
