//! Deliveries in SQL: made from events (once per event and subscription,
//! however often the event is read), claimed by notifiers under a lease,
//! recorded attempt by attempt, dead-lettered, replayed.

use chrono::{DateTime, Utc};
use fluxo_db::{StoreError, statement};
use fluxo_webhooks::subscription::EventType;
use sea_orm::{ConnectionTrait, DbBackend, QueryResult, TransactionTrait, Value};

use super::{SealedSecrets, SubscriptionStore, now};

/// An event to deliver to every subscription that asked for it.
#[derive(Debug, Clone)]
pub struct Event {
    /// Its stable id (`webhook-id`).
    pub id: String,
    /// The merchant it belongs to.
    pub merchant_id: String,
    /// Its type.
    pub event_type: EventType,
    /// When it happened (the body's `timestamp`).
    pub occurred_at: DateTime<Utc>,
    /// The body's `data`.
    pub data: serde_json::Value,
    /// W3C trace context of the request that caused it.
    pub traceparent: Option<String>,
    /// W3C trace state.
    pub tracestate: Option<String>,
}

/// The body of a delivery: Standard Webhooks' `type`, `timestamp` and
/// `data`, plus the subscription's `sequence` number for the event.
pub fn body(event: &Event, sequence: i64) -> String {
    serde_json::json!({
        "type": event.event_type.name(),
        "timestamp": event.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "sequence": sequence,
        "data": event.data,
    })
    .to_string()
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Waiting for its next attempt.
    Pending,
    /// Made while its subscription is paused: due once it is resumed.
    Held,
    /// A 2xx answer was received.
    Delivered,
    /// Given up on (retries exhausted, 410 Gone, or the subscription was
    /// disabled); `fluxo webhooks deliveries replay` sends it again.
    Dead,
}

impl DeliveryState {
    /// The stored name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Held => "HELD",
            Self::Delivered => "DELIVERED",
            Self::Dead => "DEAD",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [Self::Pending, Self::Held, Self::Delivered, Self::Dead].into_iter().find(|s| s.name() == text)
    }
}

/// A delivery due now, claimed by this notifier until its lease ends.
#[derive(Debug, Clone)]
pub struct Due {
    /// The delivery.
    pub id: String,
    /// Its subscription.
    pub subscription_id: String,
    /// Where to send it.
    pub endpoint_url: String,
    /// What signs it, as its subscription stood at the claim (none: deleted since).
    pub sealed: Option<SealedSecrets>,
    /// `webhook-id`.
    pub event_id: String,
    /// The event's type.
    pub event_type: String,
    /// The body.
    pub payload: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the first attempt was made.
    pub first_attempt_at: Option<DateTime<Utc>>,
    /// When the delivery was made (the event read).
    pub created_at: DateTime<Utc>,
    /// Trace context of the request behind the event.
    pub traceparent: Option<String>,
    /// Trace state.
    pub tracestate: Option<String>,
}

/// What one attempt came to, as recorded.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    /// When it started.
    pub at: DateTime<Utc>,
    /// How long it took.
    pub duration_ms: i64,
    /// The HTTP status, when there was an answer.
    pub status: Option<u16>,
    /// Why it failed (empty when delivered).
    pub error: String,
    /// The start of the answer's body.
    pub response: String,
}

/// What happens to a delivery after an attempt.
#[derive(Debug, Clone)]
pub enum Next {
    /// Delivered.
    Delivered,
    /// Tried again at this time.
    RetryAt(DateTime<Utc>),
    /// Given up on.
    Dead,
}

/// Which deliveries to list: every condition given must hold.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub merchant: Option<String>,
    pub subscription: Option<String>,
    pub state: Option<DeliveryState>,
}

/// A delivery as listed and shown.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Its id.
    pub id: String,
    /// Its subscription.
    pub subscription_id: String,
    /// The merchant.
    pub merchant_id: String,
    /// The event's id.
    pub event_id: String,
    /// The event's type.
    pub event_type: String,
    /// The subscription's number for it.
    pub sequence: i64,
    /// Where it stands.
    pub state: DeliveryState,
    /// Attempts made.
    pub attempts: i64,
    /// When the next attempt is due (pending ones).
    pub next_attempt_at: DateTime<Utc>,
    /// The last answer's status.
    pub last_status: Option<i64>,
    /// Why the last attempt failed.
    pub last_error: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it was delivered.
    pub delivered_at: Option<DateTime<Utc>>,
    /// The body.
    pub payload: String,
}

const DELIVERY_COLUMNS: &str = "id, subscription_id, merchant_id, event_id, event_type, sequence, state, attempts, \
                                next_attempt_at, last_status, last_error, created_at, delivered_at, payload";

fn delivery(row: &QueryResult) -> Result<Delivery, StoreError> {
    let text = |i| row.try_get_by_index::<String>(i);
    let id = text(0)?;
    let state_text = text(6)?;
    let state = DeliveryState::parse(&state_text).ok_or_else(|| StoreError::Corrupt {
        what: format!("delivery {id}"),
        reason: format!("state {state_text:?}"),
    })?;
    Ok(Delivery {
        subscription_id: text(1)?,
        merchant_id: text(2)?,
        event_id: text(3)?,
        event_type: text(4)?,
        sequence: row.try_get_by_index(5)?,
        state,
        attempts: row.try_get_by_index::<i32>(7).map(i64::from)?,
        next_attempt_at: row.try_get_by_index(8)?,
        last_status: row.try_get_by_index::<Option<i32>>(9)?.map(i64::from),
        last_error: text(10)?,
        created_at: row.try_get_by_index(11)?,
        delivered_at: row.try_get_by_index(12)?,
        payload: text(13)?,
        id,
    })
}

/// Rows one statement carries at most (11 values each: well inside both
/// backends' limits on bound parameters).
const ROWS_PER_STATEMENT: usize = 500;

fn excerpt(text: &str, chars: usize) -> String {
    text.chars().take(chars).collect()
}

/// What `fan_out` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FannedOut {
    /// Deliveries made.
    pub made: usize,
    /// (event, subscription) pairs that already had one (a redelivered event).
    pub existing: usize,
}

impl SubscriptionStore {
    fn backend_of(&self) -> DbBackend {
        self.db.backend()
    }

    /// Makes one delivery per (event, live subscription of its merchant that
    /// asked for its type), numbered per subscription, in one transaction.
    /// A pair that already has a delivery is left alone, so handling an event
    /// again changes nothing. Disabled subscriptions get nothing (until
    /// resumed); paused ones accrue.
    pub async fn fan_out(&self, events: &[Event]) -> Result<FannedOut, StoreError> {
        let mut done = FannedOut::default();
        if events.is_empty() {
            return Ok(done);
        }
        let backend = self.backend_of();
        let mut merchants: Vec<&str> = events.iter().map(|e| e.merchant_id.as_str()).collect();
        merchants.sort_unstable();
        merchants.dedup();
        let marks = vec!["?"; merchants.len()].join(", ");
        let _writer = self.db.write_guard().await;
        let txn = self.db.conn().begin().await?;
        let subscriptions = txn
            .query_all_raw(statement(
                backend,
                &format!(
                    "SELECT id, merchant_id, event_types, state FROM webhook_subscriptions \
                     WHERE merchant_id IN ({marks}) AND deleted_at IS NULL AND state IN ('ACTIVE', 'PAUSED') \
                     ORDER BY id"
                ),
                merchants.iter().map(|m| Value::from(*m)).collect(),
            ))
            .await?;
        let at = now();
        for row in &subscriptions {
            let id: String = row.try_get_by_index(0)?;
            let merchant: String = row.try_get_by_index(1)?;
            let types: String = row.try_get_by_index(2)?;
            let held = row.try_get_by_index::<String>(3)? == "PAUSED";
            let mut wanted: Vec<&Event> = events
                .iter()
                .filter(|e| e.merchant_id == merchant && types.split(',').any(|t| t == e.event_type.name()))
                .collect();
            let asked = wanted.len();
            // Three statements per subscription and batch, however many events:
            // which it has already, its numbers, its rows.
            let mut have = std::collections::HashSet::new();
            for chunk in wanted.chunks(ROWS_PER_STATEMENT) {
                let marks = vec!["?"; chunk.len()].join(", ");
                let mut values: Vec<Value> = vec![id.clone().into()];
                values.extend(chunk.iter().map(|e| Value::from(e.id.clone())));
                for found in txn
                    .query_all_raw(statement(
                        backend,
                        &format!(
                            "SELECT event_id FROM webhook_deliveries WHERE subscription_id = ? \
                             AND event_id IN ({marks})"
                        ),
                        values,
                    ))
                    .await?
                {
                    have.insert(found.try_get_by_index::<String>(0)?);
                }
            }
            // An event read twice in one batch is made once.
            wanted.retain(|e| have.insert(e.id.clone()));
            done.existing += asked - wanted.len();
            if wanted.is_empty() {
                continue;
            }
            let count = i64::try_from(wanted.len()).map_err(|e| StoreError::Internal(e.to_string()))?;
            let first: i64 = txn
                .query_one_raw(statement(
                    backend,
                    "UPDATE webhook_subscriptions SET next_sequence = next_sequence + ? WHERE id = ? \
                     RETURNING next_sequence - ?",
                    vec![count.into(), id.clone().into(), count.into()],
                ))
                .await?
                .ok_or_else(|| StoreError::Internal(format!("subscription {id} vanished")))?
                .try_get_by_index(0)?;
            for (n, chunk) in wanted.chunks(ROWS_PER_STATEMENT).enumerate() {
                let marks = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)"; chunk.len()].join(", ");
                let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 11);
                for (i, event) in chunk.iter().enumerate() {
                    let sequence = first + i64::try_from(n * ROWS_PER_STATEMENT + i).unwrap_or(i64::MAX);
                    values.extend([
                        ulid::Ulid::new().to_string().into(),
                        id.clone().into(),
                        merchant.clone().into(),
                        event.id.clone().into(),
                        event.event_type.name().into(),
                        sequence.into(),
                        body(event, sequence).into(),
                        event.traceparent.clone().into(),
                        event.tracestate.clone().into(),
                        if held { "HELD" } else { "PENDING" }.into(),
                        at.into(),
                        at.into(),
                    ]);
                }
                txn.execute_raw(statement(
                    backend,
                    &format!(
                        "INSERT INTO webhook_deliveries (id, subscription_id, merchant_id, event_id, event_type, \
                         sequence, payload, traceparent, tracestate, state, attempts, next_attempt_at, created_at) \
                         VALUES {marks}"
                    ),
                    values,
                ))
                .await?;
            }
            done.made += wanted.len();
        }
        txn.commit().await?;
        Ok(done)
    }

    /// Claims up to `limit` deliveries due at `now` for `lease`: pending (a
    /// paused subscription's are held, a disabled or deleted one's dead), not
    /// leased to another notifier. One range of the due index, read in order,
    /// whatever the planner knows of the tables: a claim that joined the
    /// subscriptions was planned, before statistics or right after a backlog
    /// formed, as a sort of every pending row (34 ms for 44,000 against 1.6).
    /// PostgreSQL skips rows another notifier is claiming; SQLite has one writer.
    pub async fn claim(&self, limit: u32, lease: chrono::Duration) -> Result<Vec<Due>, StoreError> {
        let backend = self.backend_of();
        let at = now();
        let lock = if backend == DbBackend::Postgres { "FOR UPDATE SKIP LOCKED" } else { "" };
        let sql = format!(
            "UPDATE webhook_deliveries SET lease_until = ? WHERE id IN (\
               SELECT id FROM webhook_deliveries \
               WHERE state = 'PENDING' AND next_attempt_at <= ? AND (lease_until IS NULL OR lease_until < ?) \
               ORDER BY next_attempt_at LIMIT ? {lock}) \
             RETURNING id, subscription_id, event_id, event_type, payload, attempts, first_attempt_at, created_at, \
                       traceparent, tracestate"
        );
        let _writer = self.db.write_guard().await;
        let rows = self
            .db
            .conn()
            .query_all_raw(statement(
                backend,
                &sql,
                vec![(at + lease).into(), at.into(), at.into(), i64::from(limit).into()],
            ))
            .await?;
        drop(_writer);
        // One look at the subscriptions the batch belongs to: where to send and
        // what signs (a deleted one since the claim has neither).
        let mut ids: Vec<String> =
            rows.iter().map(|r| r.try_get_by_index::<String>(1)).collect::<Result<_, _>>()?;
        ids.sort_unstable();
        ids.dedup();
        let mut targets = std::collections::HashMap::new();
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let marks = vec!["?"; chunk.len()].join(", ");
            for row in self
                .db
                .conn()
                .query_all_raw(statement(
                    backend,
                    &format!(
                        "SELECT id, endpoint_url, secret_sealed, previous_secret_sealed, \
                         previous_secret_expires_at FROM webhook_subscriptions \
                         WHERE id IN ({marks}) AND deleted_at IS NULL"
                    ),
                    chunk.iter().map(|id| Value::from(id.clone())).collect(),
                ))
                .await?
            {
                let previous = row.try_get_by_index::<Option<Vec<u8>>>(3)?;
                let until = row.try_get_by_index::<Option<DateTime<Utc>>>(4)?;
                let sealed =
                    SealedSecrets { current: row.try_get_by_index(2)?, previous: previous.zip(until) };
                targets
                    .insert(row.try_get_by_index::<String>(0)?, (row.try_get_by_index::<String>(1)?, sealed));
            }
        }
        let mut due = Vec::with_capacity(rows.len());
        for row in rows {
            let subscription_id: String = row.try_get_by_index(1)?;
            let (endpoint_url, sealed) = match targets.get(&subscription_id) {
                Some((url, sealed)) => (url.clone(), Some(sealed.clone())),
                None => (String::new(), None),
            };
            due.push(Due {
                id: row.try_get_by_index(0)?,
                endpoint_url,
                sealed,
                subscription_id,
                event_id: row.try_get_by_index(2)?,
                event_type: row.try_get_by_index(3)?,
                payload: row.try_get_by_index(4)?,
                attempts: u32::try_from(row.try_get_by_index::<i32>(5)?).unwrap_or(0),
                first_attempt_at: row.try_get_by_index(6)?,
                created_at: row.try_get_by_index(7)?,
                traceparent: row.try_get_by_index(8)?,
                tracestate: row.try_get_by_index(9)?,
            });
        }
        Ok(due)
    }

    /// Records an attempt on `due` and what comes next; a failure starts (or
    /// continues) its subscription's failing streak, a delivery ends it.
    pub async fn record(&self, due: &Due, attempt: &AttemptRecord, next: &Next) -> Result<(), StoreError> {
        self.record_many(&[(due, attempt, next)]).await
    }

    /// Records attempts, in order, in one transaction: one statement per
    /// delivery, one for all their attempt rows, and one per change of
    /// streak of a subscription (none while its attempts keep succeeding).
    pub async fn record_many(&self, attempts: &[(&Due, &AttemptRecord, &Next)]) -> Result<(), StoreError> {
        if attempts.is_empty() {
            return Ok(());
        }
        let backend = self.backend_of();
        let delivered_at = now();
        let _writer = self.db.write_guard().await;
        let txn = self.db.conn().begin().await?;
        for (due, attempt, next) in attempts {
            let (state, next_at, delivered_at) = match next {
                Next::Delivered => (DeliveryState::Delivered, attempt.at, Some(delivered_at)),
                Next::RetryAt(at) => (DeliveryState::Pending, *at, None),
                Next::Dead => (DeliveryState::Dead, attempt.at, None),
            };
            txn.execute_raw(statement(
                backend,
                "UPDATE webhook_deliveries SET state = ?, attempts = ?, next_attempt_at = ?, lease_until = NULL, \
                 first_attempt_at = ?, last_attempt_at = ?, last_status = ?, last_error = ?, delivered_at = ? \
                 WHERE id = ? AND state = 'PENDING'",
                vec![
                    state.name().into(),
                    (i64::from(due.attempts) + 1).into(),
                    next_at.into(),
                    due.first_attempt_at.unwrap_or(attempt.at).into(),
                    attempt.at.into(),
                    attempt.status.map(i32::from).into(),
                    excerpt(&attempt.error, 500).into(),
                    delivered_at.into(),
                    due.id.clone().into(),
                ],
            ))
            .await?;
        }
        for chunk in attempts.chunks(ROWS_PER_STATEMENT) {
            let marks = vec!["(?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
            let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 7);
            for (due, attempt, _) in chunk {
                values.extend([
                    due.id.clone().into(),
                    (i64::from(due.attempts) + 1).into(),
                    attempt.at.into(),
                    attempt.duration_ms.into(),
                    attempt.status.map(i32::from).into(),
                    excerpt(&attempt.error, 500).into(),
                    excerpt(&attempt.response, 1024).into(),
                ]);
            }
            txn.execute_raw(statement(
                backend,
                &format!(
                    "INSERT INTO webhook_delivery_attempts (delivery_id, attempt, at, duration_ms, status, error, \
                     response) VALUES {marks} ON CONFLICT (delivery_id, attempt) DO NOTHING"
                ),
                values,
            ))
            .await?;
        }
        // Only a change of streak touches a subscription's row: updating it on
        // every attempt would lock it, and every attempt and fan-out of that
        // subscription would queue behind each commit. Within the batch, an
        // attempt that ends as the one before it did changes nothing.
        let mut last = std::collections::HashMap::new();
        for (due, attempt, next) in attempts {
            let delivered = matches!(next, Next::Delivered);
            if last.insert(due.subscription_id.as_str(), delivered) == Some(delivered) {
                continue;
            }
            let (sql, values) = if delivered {
                (
                    "UPDATE webhook_subscriptions SET failing_since = NULL WHERE id = ? AND failing_since IS NOT NULL",
                    vec![due.subscription_id.clone().into()],
                )
            } else {
                (
                    "UPDATE webhook_subscriptions SET failing_since = ? WHERE id = ? AND failing_since IS NULL",
                    vec![attempt.at.into(), due.subscription_id.clone().into()],
                )
            };
            txn.execute_raw(statement(backend, sql, values)).await?;
        }
        txn.commit().await?;
        Ok(())
    }

    /// Since when a subscription's endpoint has been failing, if it is.
    pub async fn failing_since(&self, subscription_id: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let row = self
            .db
            .conn()
            .query_one_raw(statement(
                self.backend_of(),
                "SELECT failing_since FROM webhook_subscriptions WHERE id = ?",
                vec![subscription_id.into()],
            ))
            .await?;
        Ok(row.map(|r| r.try_get_by_index::<Option<DateTime<Utc>>>(0)).transpose()?.flatten())
    }

    /// Disables a subscription, saying why; its pending deliveries are dead-lettered.
    pub async fn disable(&self, subscription_id: &str, reason: &str) -> Result<(), StoreError> {
        let backend = self.backend_of();
        let at = now();
        let reason: String = reason.chars().take(500).collect();
        let _writer = self.db.write_guard().await;
        let txn = self.db.conn().begin().await?;
        txn.execute_raw(statement(
            backend,
            "UPDATE webhook_subscriptions SET state = 'DISABLED', disabled_reason = ?, updated_at = ? \
             WHERE id = ? AND deleted_at IS NULL",
            vec![reason.clone().into(), at.into(), subscription_id.into()],
        ))
        .await?;
        txn.execute_raw(statement(
            backend,
            "UPDATE webhook_deliveries SET state = 'DEAD', lease_until = NULL, last_error = ? \
             WHERE subscription_id = ? AND state IN ('PENDING', 'HELD')",
            vec![
                format!("subscription disabled: {reason}").chars().take(500).collect::<String>().into(),
                subscription_id.into(),
            ],
        ))
        .await?;
        txn.commit().await?;
        Ok(())
    }

    /// Deliveries, newest first: of one merchant or all, in one state or any.
    pub async fn deliveries(&self, filter: &DeliveryFilter, limit: u32) -> Result<Vec<Delivery>, StoreError> {
        let mut conditions = vec!["1 = 1"];
        let mut values: Vec<Value> = Vec::new();
        if let Some(m) = &filter.merchant {
            conditions.push("merchant_id = ?");
            values.push(m.as_str().into());
        }
        if let Some(s) = &filter.subscription {
            conditions.push("subscription_id = ?");
            values.push(s.as_str().into());
        }
        if let Some(s) = filter.state {
            conditions.push("state = ?");
            values.push(s.name().into());
        }
        values.push(i64::from(limit).into());
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE {} ORDER BY id DESC LIMIT ?",
            conditions.join(" AND ")
        );
        let rows = self.db.conn().query_all_raw(statement(self.backend_of(), &sql, values)).await?;
        rows.iter().map(delivery).collect()
    }

    /// One delivery and its attempts, oldest first.
    pub async fn delivery(&self, id: &str) -> Result<Option<(Delivery, Vec<AttemptRecord>)>, StoreError> {
        let backend = self.backend_of();
        let sql = format!("SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = ?");
        let Some(row) = self.db.conn().query_one_raw(statement(backend, &sql, vec![id.into()])).await? else {
            return Ok(None);
        };
        let found = delivery(&row)?;
        let rows = self
            .db
            .conn()
            .query_all_raw(statement(
                backend,
                "SELECT at, duration_ms, status, error, response FROM webhook_delivery_attempts \
                 WHERE delivery_id = ? ORDER BY attempt",
                vec![id.into()],
            ))
            .await?;
        let attempts = rows
            .iter()
            .map(|r| {
                Ok(AttemptRecord {
                    at: r.try_get_by_index(0)?,
                    duration_ms: r.try_get_by_index(1)?,
                    status: r.try_get_by_index::<Option<i32>>(2)?.and_then(|s| u16::try_from(s).ok()),
                    error: r.try_get_by_index(3)?,
                    response: r.try_get_by_index(4)?,
                })
            })
            .collect::<Result<Vec<_>, sea_orm::DbErr>>()?;
        Ok(Some((found, attempts)))
    }

    /// Sends a dead-lettered delivery again: pending now (held while its
    /// subscription is paused), with a fresh retry window. False when it is not dead.
    pub async fn replay(&self, id: &str) -> Result<bool, StoreError> {
        let at = now();
        let _writer = self.db.write_guard().await;
        let done = self
            .db
            .conn()
            .execute_raw(statement(
                self.backend_of(),
                "UPDATE webhook_deliveries SET state = CASE WHEN EXISTS (SELECT 1 FROM webhook_subscriptions s \
                   WHERE s.id = webhook_deliveries.subscription_id AND s.state = 'PAUSED') THEN 'HELD' ELSE 'PENDING' END, \
                 next_attempt_at = ?, first_attempt_at = NULL, lease_until = NULL WHERE id = ? AND state = 'DEAD'",
                vec![at.into(), id.into()],
            ))
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// How many deliveries are dead-lettered.
    pub async fn dead_count(&self) -> Result<i64, StoreError> {
        let row = self
            .db
            .conn()
            .query_one_raw(statement(
                self.backend_of(),
                "SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'DEAD'",
                vec![],
            ))
            .await?;
        Ok(row.map(|r| r.try_get_by_index::<i64>(0)).transpose()?.unwrap_or(0))
    }
}

impl SubscriptionStore {
    /// Merchants with a live subscription to `balance.changed`.
    pub async fn balance_subscribers(&self) -> Result<Vec<String>, StoreError> {
        let rows = self
            .db
            .conn()
            .query_all_raw(statement(
                self.backend_of(),
                "SELECT DISTINCT merchant_id FROM webhook_subscriptions WHERE deleted_at IS NULL \
                 AND state IN ('ACTIVE', 'PAUSED') AND event_types LIKE '%balance.changed%' ORDER BY merchant_id",
                vec![],
            ))
            .await?;
        rows.iter().map(|r| r.try_get_by_index::<String>(0).map_err(StoreError::from)).collect()
    }

    /// Where the notifier is in `merchant`'s feed of changed days.
    pub async fn balance_cursor(&self, merchant: &str) -> Result<Option<String>, StoreError> {
        let row = self
            .db
            .conn()
            .query_one_raw(statement(
                self.backend_of(),
                "SELECT cursor FROM webhook_balance_cursors WHERE merchant_id = ?",
                vec![merchant.into()],
            ))
            .await?;
        Ok(row.map(|r| r.try_get_by_index::<String>(0)).transpose()?)
    }

    /// Sets `merchant`'s cursor; with `only_if_missing`, keeps one already there.
    pub async fn set_balance_cursor(
        &self,
        merchant: &str,
        cursor: &str,
        only_if_missing: bool,
    ) -> Result<(), StoreError> {
        let conflict = if only_if_missing {
            "DO NOTHING"
        } else {
            "DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at"
        };
        let _writer = self.db.write_guard().await;
        self.db
            .conn()
            .execute_raw(statement(
                self.backend_of(),
                &format!(
                    "INSERT INTO webhook_balance_cursors (merchant_id, cursor, updated_at) VALUES (?, ?, ?) \
                     ON CONFLICT (merchant_id) {conflict}"
                ),
                vec![merchant.into(), cursor.into(), now().into()],
            ))
            .await?;
        Ok(())
    }
}

impl SubscriptionStore {
    /// Closes of merchants subscribed to `period.closed`, made since their
    /// first such subscription, not yet turned into events: (close id, merchant).
    /// Reads the ledger's table of closes (the same database).
    pub async fn closes_to_notify(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = self
            .db
            .conn()
            .query_all_raw(statement(
                self.backend_of(),
                "SELECT c.id, c.merchant_id FROM ledger_period_closes c \
                 WHERE c.closed_at >= (SELECT MIN(s.created_at) FROM webhook_subscriptions s \
                     WHERE s.merchant_id = c.merchant_id AND s.deleted_at IS NULL \
                       AND s.state IN ('ACTIVE', 'PAUSED') AND s.event_types LIKE '%period.closed%') \
                   AND NOT EXISTS (SELECT 1 FROM webhook_notified_closes n WHERE n.close_id = c.id) \
                 ORDER BY c.id",
                vec![],
            ))
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get_by_index::<String>(0)?, r.try_get_by_index::<String>(1)?)))
            .collect::<Result<_, sea_orm::DbErr>>()
            .map_err(StoreError::from)
    }

    /// Records that a close's events are made.
    pub async fn close_notified(&self, close_id: &str) -> Result<(), StoreError> {
        let _writer = self.db.write_guard().await;
        self.db
            .conn()
            .execute_raw(statement(
                self.backend_of(),
                "INSERT INTO webhook_notified_closes (close_id, notified_at) VALUES (?, ?) \
                 ON CONFLICT (close_id) DO NOTHING",
                vec![close_id.into(), now().into()],
            ))
            .await?;
        Ok(())
    }
}
