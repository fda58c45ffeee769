//! Group commit: concurrent RecordEntry calls share transactions.
//!
//! Each call hands its entry to a queue and waits for its answer. A few writer
//! tasks (`writers`) each take everything queued (up to `max_batch`) and book
//! it in one transaction: one multi-row INSERT of the idempotency keys
//! (`ON CONFLICT DO NOTHING RETURNING` says which were claimed), one of the
//! entries and one of the outbox events, and one COMMIT — so a busy ledger pays
//! one commit (and one WAL flush) per batch instead of per entry. An idle
//! ledger sees batches of one and the latency of a single transaction.
//!
//! Nothing is answered before its batch committed. Within a batch the keys are
//! inserted in (merchant, key) order, so two writers claiming the same keys
//! lock them in the same order and cannot deadlock; a key repeated inside one
//! batch is booked once and the repeats are answered as replays after the
//! commit. When a batch fails for a reason other than the database being
//! unreachable, its entries are booked again one per transaction, so one
//! refused entry cannot fail the others.
//!
//! A caller that goes away (deadline, cancelled RPC) before its key is claimed
//! gets nothing written: it is dropped from the queue, or its key released in
//! the same transaction. Past that point it is booked like any other, and the
//! retry with the same key replays it (the window any RPC has between COMMIT
//! and its answer reaching the caller).

use std::{
    collections::HashSet,
    sync::{Arc, LazyLock, OnceLock},
};

use chrono::{DateTime, Utc};
use fluxo_db::{Db, statement};
use fluxo_telemetry::opentelemetry::metrics::Histogram;
use sea_orm::{
    ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, EntityTrait, Statement, TransactionTrait, Value,
    sea_query::{OnConflict, Query},
};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};

use super::{
    StoreError, entry_rows, now,
    schema::{entry, idempotency_key, outbox},
};
use crate::{
    domain::{Entry, Fingerprint, NewEntry},
    error::LedgerError,
};

/// How booking is batched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommit {
    /// Transactions writing at once (forced to 1 on SQLite, which has one writer).
    pub writers: usize,
    /// Most entries in one transaction.
    pub max_batch: usize,
}

impl Default for GroupCommit {
    fn default() -> Self {
        Self { writers: 4, max_batch: 256 }
    }
}

/// What became of one entry handed to the writers.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Booked under its key, committed.
    Booked(Entry),
    /// Its key was held by an earlier request (committed before this answer).
    KeyTaken,
}

struct Pending {
    new: NewEntry,
    fingerprint: String,
    trace: (Option<String>, Option<String>),
    reply: oneshot::Sender<Result<Outcome, StoreError>>,
}

impl Pending {
    fn key(&self) -> (&str, &str) {
        (self.new.merchant_id.as_str(), self.new.request_id.as_ref().map_or("", |k| k.as_str()))
    }
}

static BATCH_SIZE: LazyLock<Histogram<u64>> = LazyLock::new(|| {
    fluxo_telemetry::meter()
        .u64_histogram("fluxo.ledger.commit.entries")
        .with_unit("{entry}")
        .with_description("Entries booked per ledger transaction (group commit)")
        .with_boundaries(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0])
        .build()
});

/// The queue in front of the writer tasks, started on first use.
#[derive(Debug)]
pub(super) struct Writers {
    db: Db,
    committed: Arc<Notify>,
    config: GroupCommit,
    queue: OnceLock<mpsc::Sender<Pending>>,
}

impl Writers {
    pub(super) fn new(db: Db, committed: Arc<Notify>, config: GroupCommit) -> Self {
        let writers = if db.backend() == DbBackend::Postgres { config.writers.max(1) } else { 1 };
        let config = GroupCommit { writers, max_batch: config.max_batch.clamp(1, 1_000) };
        Self { db, committed, config, queue: OnceLock::new() }
    }

    /// Books `new` (which carries its idempotency key) in the next batch.
    pub(super) async fn book(
        &self,
        new: NewEntry,
        fingerprint: &Fingerprint,
    ) -> Result<Outcome, LedgerError> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            new,
            fingerprint: fingerprint.to_hex(),
            // Captured here, in the caller's span: the event carries the caller's trace.
            trace: fluxo_telemetry::current_trace_context(),
            reply,
        };
        self.queue()
            .send(pending)
            .await
            .map_err(|_| LedgerError::Internal("the ledger's writers have stopped".into()))?;
        let outcome =
            answer.await.map_err(|_| LedgerError::Internal("a ledger writer stopped mid-batch".into()))?;
        Ok(outcome?)
    }

    fn queue(&self) -> &mpsc::Sender<Pending> {
        self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(self.config.writers * self.config.max_batch * 2);
            let rx = Arc::new(Mutex::new(rx));
            for _ in 0..self.config.writers {
                tokio::spawn(write_loop(
                    rx.clone(),
                    self.db.clone(),
                    self.committed.clone(),
                    self.config.max_batch,
                ));
            }
            tx
        })
    }
}

/// One writer: takes what is queued, books it, answers; ends when the queue closes.
async fn write_loop(
    queue: Arc<Mutex<mpsc::Receiver<Pending>>>,
    db: Db,
    committed: Arc<Notify>,
    max_batch: usize,
) {
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        {
            let mut queue = queue.lock().await;
            if queue.recv_many(&mut batch, max_batch).await == 0 {
                return;
            }
        }
        commit(&db, &committed, std::mem::take(&mut batch)).await;
    }
}

async fn commit(db: &Db, committed: &Notify, mut batch: Vec<Pending>) {
    // Callers that gave up while queued are not booked.
    batch.retain(|p| !p.reply.is_closed());
    if batch.is_empty() {
        return;
    }
    BATCH_SIZE.record(batch.len() as u64, &[]);
    batch.sort_by(|a, b| a.key().cmp(&b.key()));
    // The first request for a key is booked; repeats inside the batch replay it.
    let mut seen = HashSet::new();
    let (first, repeats): (Vec<Pending>, Vec<Pending>) = batch.into_iter().partition(|p| {
        let (m, k) = p.key();
        seen.insert((m.to_owned(), k.to_owned()))
    });
    match write(db, &first).await {
        Ok(claimed) => {
            committed.notify_one();
            for (pending, booked) in first.into_iter().zip(claimed) {
                let _ = pending.reply.send(Ok(booked.map_or(Outcome::KeyTaken, Outcome::Booked)));
            }
        }
        Err(error @ StoreError::Unavailable(_)) => {
            for pending in first {
                let _ = pending.reply.send(Err(error.clone()));
            }
        }
        Err(error) if first.len() > 1 => {
            tracing::warn!(%error, entries = first.len(), "batch refused; booking its entries one by one");
            for pending in first {
                let one = std::slice::from_ref(&pending);
                let result = write(db, one).await;
                if result.is_ok() {
                    committed.notify_one();
                }
                let outcome = result
                    .map(|mut claimed| claimed.pop().flatten().map_or(Outcome::KeyTaken, Outcome::Booked));
                let _ = pending.reply.send(outcome);
            }
        }
        Err(error) => {
            for pending in first {
                let _ = pending.reply.send(Err(error.clone()));
            }
        }
    }
    for pending in repeats {
        let _ = pending.reply.send(Ok(Outcome::KeyTaken));
    }
}

/// Books `batch` in one transaction; per entry, `Some` when its key was
/// claimed (and the entry booked), `None` when the key was held already.
async fn write(db: &Db, batch: &[Pending]) -> Result<Vec<Option<Entry>>, StoreError> {
    let _writer = db.write_guard().await;
    let txn = db.conn().begin().await?;
    let created_at = now();
    let mut claimed = claim_keys(&txn, db.backend(), batch, created_at).await?;
    // A caller that gave up (deadline, cancellation) while its key was being
    // claimed gets nothing written: its key is released in this transaction.
    let abandoned: Vec<(String, String)> = batch
        .iter()
        .filter(|p| p.reply.is_closed())
        .map(|p| (p.key().0.to_owned(), p.key().1.to_owned()))
        .filter(|k| claimed.contains(k))
        .collect();
    if !abandoned.is_empty() {
        let condition = vec!["(merchant_id = ? AND request_id = ?)"; abandoned.len()].join(" OR ");
        let values = abandoned.iter().flat_map(|(m, k)| [m.clone().into(), k.clone().into()]).collect();
        txn.execute_raw(statement(
            db.backend(),
            &format!("DELETE FROM ledger_idempotency_keys WHERE {condition}"),
            values,
        ))
        .await?;
        for key in &abandoned {
            claimed.remove(key);
        }
    }

    let mut entries = Vec::new();
    let mut events = Vec::new();
    let booked: Vec<Option<Entry>> = batch
        .iter()
        .map(|p| {
            let (merchant, key) = p.key();
            if !claimed.contains(&(merchant.to_owned(), key.to_owned())) {
                return None;
            }
            let (entry_row, event_row, entry) = entry_rows(p.new.clone(), created_at, p.trace.clone());
            entries.push(entry_row);
            events.push(event_row);
            Some(entry)
        })
        .collect();
    if !entries.is_empty() {
        insert_booked(&txn, db.backend(), entries, events).await?;
    }
    txn.commit().await?;
    Ok(booked)
}

// On PostgreSQL each of the batch's statements has one shape whatever the
// batch size — the rows travel as one array per column and are `unnest`ed —
// so a connection parses and plans it once and keeps it prepared. Statements
// whose text grew with the batch were parsed, planned and prepared anew for
// nearly every batch (sqlx keeps 100 statements per connection). Empty text
// stands for NULL in the arrays (`NULLIF`), which bind no NULL elements.

const PG_CLAIM_KEYS: &str = "INSERT INTO ledger_idempotency_keys \
     (merchant_id, request_id, fingerprint, entry_id, created_at) \
     SELECT m, k, f, e, $5::timestamptz \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS t(m, k, f, e, n) \
     ORDER BY n \
     ON CONFLICT (merchant_id, request_id) DO NOTHING RETURNING merchant_id, request_id";

const PG_INSERT_ENTRIES: &str = "INSERT INTO ledger_entries \
     (id, merchant_id, kind, currency_code, amount_minor, booking_date, description, request_id, \
      reverses_entry_id, created_at) \
     SELECT i, m, k, c, a, d, t, NULLIF(r, ''), NULLIF(v, ''), $10::timestamptz \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::date[], $7::text[], \
                 $8::text[], $9::text[]) WITH ORDINALITY AS u(i, m, k, c, a, d, t, r, v, n) \
     ORDER BY n";

const PG_INSERT_EVENTS: &str = "INSERT INTO ledger_outbox \
     (event_id, entry_id, merchant_id, payload, traceparent, tracestate, created_at) \
     SELECT e, i, m, p, NULLIF(tp, ''), NULLIF(ts, ''), $7::timestamptz \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::text[]) \
          WITH ORDINALITY AS u(e, i, m, p, tp, ts, n) \
     ORDER BY n";

/// Claims the batch's keys, in the batch's order; returns those claimed now.
async fn claim_keys(
    txn: &DatabaseTransaction,
    backend: DbBackend,
    batch: &[Pending],
    created_at: DateTime<Utc>,
) -> Result<HashSet<(String, String)>, StoreError> {
    // On PostgreSQL a key claimed by a transaction still open waits here for
    // it to end, then does nothing if it committed.
    let rows = if backend == DbBackend::Postgres {
        let column = |f: &dyn Fn(&Pending) -> String| Value::from(batch.iter().map(f).collect::<Vec<_>>());
        let values = vec![
            column(&|p| p.key().0.to_owned()),
            column(&|p| p.key().1.to_owned()),
            column(&|p| p.fingerprint.clone()),
            column(&|p| p.new.id.to_string()),
            created_at.into(),
        ];
        txn.query_all_raw(Statement::from_sql_and_values(backend, PG_CLAIM_KEYS, values)).await?
    } else {
        let mut keys = Query::insert();
        keys.into_table(idempotency_key::Entity).columns([
            idempotency_key::Column::MerchantId,
            idempotency_key::Column::RequestId,
            idempotency_key::Column::Fingerprint,
            idempotency_key::Column::EntryId,
            idempotency_key::Column::CreatedAt,
        ]);
        for p in batch {
            let (merchant, key) = p.key();
            keys.values_panic([
                merchant.into(),
                key.into(),
                p.fingerprint.clone().into(),
                p.new.id.to_string().into(),
                created_at.into(),
            ]);
        }
        keys.on_conflict(
            OnConflict::columns([idempotency_key::Column::MerchantId, idempotency_key::Column::RequestId])
                .do_nothing()
                .to_owned(),
        )
        .returning(
            Query::returning()
                .columns([idempotency_key::Column::MerchantId, idempotency_key::Column::RequestId]),
        );
        txn.query_all(&keys).await?
    };
    rows.iter()
        .map(|row| Ok((row.try_get_by_index(0)?, row.try_get_by_index(1)?)))
        .collect::<Result<_, DbErr>>()
        .map_err(StoreError::from)
}

/// Inserts the booked entries and their outbox events (same order, one each).
async fn insert_booked(
    txn: &DatabaseTransaction,
    backend: DbBackend,
    entries: Vec<entry::ActiveModel>,
    events: Vec<outbox::ActiveModel>,
) -> Result<(), DbErr> {
    if backend != DbBackend::Postgres {
        entry::Entity::insert_many(entries).exec_without_returning(txn).await?;
        outbox::Entity::insert_many(events).exec_without_returning(txn).await?;
        return Ok(());
    }
    let created_at = entries.first().map(|e| e.created_at.clone().unwrap()).unwrap_or_else(now);
    let (mut ids, mut merchants, mut kinds, mut currencies) = (vec![], vec![], vec![], vec![]);
    let (mut amounts, mut dates, mut descriptions, mut keys, mut reverses) =
        (vec![], vec![], vec![], vec![], vec![]);
    for row in entries {
        ids.push(row.id.unwrap());
        merchants.push(row.merchant_id.unwrap());
        kinds.push(row.kind.unwrap());
        currencies.push(row.currency_code.unwrap());
        amounts.push(row.amount_minor.unwrap());
        dates.push(row.booking_date.unwrap());
        descriptions.push(row.description.unwrap());
        keys.push(row.request_id.unwrap().unwrap_or_default());
        reverses.push(row.reverses_entry_id.unwrap().unwrap_or_default());
    }
    let values: Vec<Value> = vec![
        ids.into(),
        merchants.into(),
        kinds.into(),
        currencies.into(),
        amounts.into(),
        dates.into(),
        descriptions.into(),
        keys.into(),
        reverses.into(),
        created_at.into(),
    ];
    txn.execute_raw(Statement::from_sql_and_values(backend, PG_INSERT_ENTRIES, values)).await?;

    let (mut event_ids, mut entry_ids, mut merchants, mut payloads) = (vec![], vec![], vec![], vec![]);
    let (mut parents, mut states) = (vec![], vec![]);
    for row in events {
        event_ids.push(row.event_id.unwrap());
        entry_ids.push(row.entry_id.unwrap());
        merchants.push(row.merchant_id.unwrap());
        payloads.push(row.payload.unwrap());
        parents.push(row.traceparent.unwrap().unwrap_or_default());
        states.push(row.tracestate.unwrap().unwrap_or_default());
    }
    let values: Vec<Value> = vec![
        event_ids.into(),
        entry_ids.into(),
        merchants.into(),
        payloads.into(),
        parents.into(),
        states.into(),
        created_at.into(),
    ];
    txn.execute_raw(Statement::from_sql_and_values(backend, PG_INSERT_EVENTS, values)).await?;
    Ok(())
}
