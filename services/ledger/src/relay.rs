//! The outbox relay: publishes committed `EntryRecorded` events, in batches,
//! to an [`EventSink`] (a Redis Stream, or the in-process consolidator) and
//! marks them published. On PostgreSQL each batch is claimed with
//! `FOR UPDATE SKIP LOCKED`, so any number of relays run side by side without
//! publishing the same event twice; if a relay dies after publishing but
//! before marking, the events go out again and consumers deduplicate them.
//!
//! Each non-empty batch is an `outbox.publish` span (kind producer) with a
//! span link to the trace of every event in it. The relay also keeps the
//! `fluxo.outbox.backlog` and `fluxo.outbox.oldest_age` gauges current.

use std::{
    sync::{
        Arc, LazyLock,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use fluxo_db::{Db, statement};
use fluxo_queue::{EventSink, StreamEvent};
use fluxo_telemetry::opentelemetry::metrics::ObservableGauge;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    TransactionTrait, sea_query::Expr,
};
use tokio::sync::Notify;
use tracing::Instrument;

use crate::store::schema::outbox;

/// How often the relay measures the backlog for its gauges.
const BACKLOG_INTERVAL: Duration = Duration::from_secs(5);

/// How long the relay lets commits gather after it is woken, unless its last
/// pass found a full batch. Each pass is a transaction (and a WAL flush); on a
/// busy ledger that commits every millisecond or two, passing at once after
/// each commit made the relay's transactions as many as the ledger's.
const LINGER: Duration = Duration::from_millis(5);

/// The last measured backlog, read by the gauges whenever metrics are collected.
struct BacklogGauges {
    events: Arc<AtomicI64>,
    oldest_micros: Arc<AtomicU64>,
    _instruments: (ObservableGauge<i64>, ObservableGauge<f64>),
}

static BACKLOG: LazyLock<BacklogGauges> = LazyLock::new(|| {
    let meter = fluxo_telemetry::meter();
    let events = Arc::new(AtomicI64::new(0));
    let oldest_micros = Arc::new(AtomicU64::new(0));
    let (e, o) = (events.clone(), oldest_micros.clone());
    let count = meter
        .i64_observable_gauge("fluxo.outbox.backlog")
        .with_unit("{event}")
        .with_description("Ledger events committed but not yet published to the stream")
        .with_callback(move |observer| observer.observe(e.load(Ordering::Relaxed), &[]))
        .build();
    let age = meter
        .f64_observable_gauge("fluxo.outbox.oldest_age")
        .with_unit("s")
        .with_description("Age of the oldest unpublished ledger event (0 when none)")
        .with_callback(move |observer| {
            let age = Duration::from_micros(o.load(Ordering::Relaxed));
            observer.observe(fluxo_telemetry::seconds(age), &[]);
        })
        .build();
    BacklogGauges { events, oldest_micros, _instruments: (count, age) }
});

/// The span of one batch, linked to the trace each event was produced in.
fn batch_span(events: &[StreamEvent]) -> tracing::Span {
    let span = tracing::info_span!(
        "outbox.publish",
        otel.kind = "producer",
        messaging.operation.type = "send",
        messaging.batch.message_count = events.len(),
    );
    fluxo_queue::link_to_events(&span, events);
    span
}

/// Settings of the relay loop.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Events per batch.
    pub batch_size: u32,
    /// Longest pause between polls when idle.
    pub max_idle: Duration,
    /// Published events older than this are deleted from the outbox.
    pub retention: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            max_idle: Duration::from_millis(200),
            retention: Duration::from_secs(24 * 3600),
        }
    }
}

/// Why a relay pass failed; the loop backs off and tries again.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The outbox could not be read or marked.
    #[error("outbox: {0}")]
    Db(#[from] DbErr),
    /// The sink refused the batch.
    #[error("publish: {0}")]
    Publish(#[from] fluxo_queue::PublishError),
}

/// How much is waiting to be published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Unpublished events.
    pub events: i64,
    /// Age of the oldest unpublished event.
    pub oldest_age: Duration,
}

/// Publishes the outbox.
#[derive(Clone)]
pub struct Relay {
    db: Db,
    sink: Arc<dyn EventSink>,
    config: RelayConfig,
    wake: Arc<Notify>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay from `db`'s outbox to `sink`; `wake` is notified by the ledger after each commit.
    pub fn new(db: Db, sink: Arc<dyn EventSink>, config: RelayConfig, wake: Arc<Notify>) -> Self {
        Self { db, sink, config, wake }
    }

    /// Publishes until `stop` resolves, then finishes the batch in hand.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut idle = Duration::from_millis(5);
        let mut failures = 0u32;
        let mut last_cleanup = tokio::time::Instant::now();
        let mut last_backlog: Option<tokio::time::Instant> = None;
        loop {
            match self.publish_batch().await {
                Ok(n) if n >= self.config.batch_size as usize => {
                    failures = 0;
                    continue;
                }
                Ok(n) => {
                    if failures > 0 {
                        tracing::info!("outbox relay recovered");
                    }
                    failures = 0;
                    idle =
                        if n > 0 { Duration::from_millis(5) } else { (idle * 2).min(self.config.max_idle) };
                }
                Err(error) => {
                    failures += 1;
                    // Log the first failure and then every tenth, not every retry.
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(%error, failures, "outbox relay cannot publish; retrying with backoff");
                    }
                    idle = Duration::from_millis(100 * u64::from(failures.min(50)));
                }
            }
            if last_backlog.is_none_or(|t| t.elapsed() >= BACKLOG_INTERVAL) {
                last_backlog = Some(tokio::time::Instant::now());
                self.measure_backlog().await;
            }
            if last_cleanup.elapsed() > Duration::from_secs(60) {
                last_cleanup = tokio::time::Instant::now();
                if let Err(error) = self.delete_published().await {
                    tracing::warn!(%error, "could not trim the outbox");
                }
            }
            tokio::select! {
                () = &mut stop => return,
                () = self.wake.notified() => {
                    tokio::select! {
                        () = &mut stop => return,
                        () = tokio::time::sleep(LINGER) => {}
                    }
                }
                () = tokio::time::sleep(idle) => {}
            }
        }
    }

    /// Updates the backlog gauges; on failure they keep their last value.
    async fn measure_backlog(&self) {
        match backlog(&self.db).await {
            Ok(b) => {
                BACKLOG.events.store(b.events, Ordering::Relaxed);
                let micros = u64::try_from(b.oldest_age.as_micros()).unwrap_or(u64::MAX);
                BACKLOG.oldest_micros.store(micros, Ordering::Relaxed);
            }
            Err(error) => tracing::debug!(%error, "cannot measure the outbox backlog"),
        }
    }

    /// Publishes one batch of unpublished events; returns how many.
    pub async fn publish_batch(&self) -> Result<usize, RelayError> {
        match self.db.backend() {
            DbBackend::Postgres => self.publish_postgres().await,
            _ => self.publish_sqlite().await,
        }
    }

    /// Claims and marks a batch in one statement, publishes it, then commits
    /// (SQL by hand: the query builder has no `UPDATE … FROM` a locking subquery):
    /// the rows stay locked (other relays skip them) until the commit, and a
    /// failed publish rolls the marks back. One statement instead of a locking
    /// read and an update per pass: each row is written once, not locked and
    /// then rewritten.
    async fn publish_postgres(&self) -> Result<usize, RelayError> {
        let txn = self.db.conn().begin().await?;
        let rows = txn
            .query_all_raw(statement(
                DbBackend::Postgres,
                "UPDATE ledger_outbox AS o SET published_at = ? \
                 FROM (SELECT position FROM ledger_outbox WHERE published_at IS NULL \
                       ORDER BY position LIMIT ? FOR UPDATE SKIP LOCKED) AS claimed \
                 WHERE o.position = claimed.position \
                 RETURNING o.position, o.event_id, o.payload, o.traceparent, o.tracestate",
                vec![Utc::now().into(), i64::from(self.config.batch_size).into()],
            ))
            .await?;
        let mut events = decode(&rows)?;
        if events.is_empty() {
            txn.commit().await?;
            return Ok(0);
        }
        // RETURNING follows no order; the stream gets the events in commit-position order.
        events.sort_unstable_by_key(|e| e.position);
        async {
            self.sink.publish(&events).await?;
            txn.commit().await?;
            Ok(events.len())
        }
        .instrument(batch_span(&events))
        .await
    }

    async fn publish_sqlite(&self) -> Result<usize, RelayError> {
        // One process owns an SQLite file, so one relay: no claim needed. No
        // transaction is held while publishing, because the in-process sink
        // writes the read model in the same file.
        let rows = outbox::Entity::find()
            .filter(outbox::Column::PublishedAt.is_null())
            .order_by_asc(outbox::Column::Position)
            .limit(u64::from(self.config.batch_size))
            .all(self.db.conn())
            .await?;
        let events: Vec<StreamEvent> = rows.into_iter().map(stream_event).collect();
        if events.is_empty() {
            return Ok(0);
        }
        async {
            self.sink.publish(&events).await?;
            let _writer = self.db.write_guard().await;
            let txn = self.db.conn().begin().await?;
            mark_published(&txn, &events).await?;
            txn.commit().await?;
            Ok(events.len())
        }
        .instrument(batch_span(&events))
        .await
    }

    async fn delete_published(&self) -> Result<u64, DbErr> {
        let cutoff = Utc::now() - chrono::Duration::from_std(self.config.retention).unwrap_or_default();
        let _writer = self.db.write_guard().await;
        let result = outbox::Entity::delete_many()
            .filter(outbox::Column::PublishedAt.is_not_null())
            .filter(outbox::Column::PublishedAt.lt(cutoff))
            .exec(self.db.conn())
            .await?;
        Ok(result.rows_affected)
    }
}

/// Unpublished events and the age of the oldest, for operators and metrics.
pub async fn backlog(db: &Db) -> Result<Backlog, DbErr> {
    let (events, oldest): (i64, Option<DateTime<Utc>>) = outbox::Entity::find()
        .select_only()
        .column_as(outbox::Column::Position.count(), "events")
        .column_as(outbox::Column::CreatedAt.min(), "oldest")
        .filter(outbox::Column::PublishedAt.is_null())
        .into_tuple()
        .one(db.conn())
        .await?
        .unwrap_or_default();
    let oldest_age = oldest.map(|t| (Utc::now() - t).to_std().unwrap_or_default()).unwrap_or_default();
    Ok(Backlog { events, oldest_age })
}

fn decode(rows: &[sea_orm::QueryResult]) -> Result<Vec<StreamEvent>, DbErr> {
    rows.iter()
        .map(|r| {
            Ok(StreamEvent {
                position: r.try_get_by_index(0)?,
                event_id: r.try_get_by_index(1)?,
                payload: Bytes::from(r.try_get_by_index::<Vec<u8>>(2)?),
                traceparent: r.try_get_by_index(3)?,
                tracestate: r.try_get_by_index(4)?,
            })
        })
        .collect()
}

/// Marks `events` published (SQLite; PostgreSQL marks them as it claims them).
async fn mark_published(txn: &sea_orm::DatabaseTransaction, events: &[StreamEvent]) -> Result<(), DbErr> {
    outbox::Entity::update_many()
        .col_expr(outbox::Column::PublishedAt, Expr::value(Utc::now()))
        .filter(outbox::Column::Position.is_in(events.iter().map(|e| e.position)))
        .exec(txn)
        .await?;
    Ok(())
}

/// An outbox row as the stream carries it.
fn stream_event(row: outbox::Model) -> StreamEvent {
    StreamEvent {
        position: row.position,
        event_id: row.event_id,
        payload: Bytes::from(row.payload),
        traceparent: row.traceparent,
        tracestate: row.tracestate,
    }
}
