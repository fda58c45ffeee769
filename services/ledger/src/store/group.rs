//! Group commit: concurrent RecordEntry calls share transactions.
//!
//! Each call hands its entry to a queue and waits for its answer. A few writer
//! tasks (`writers`) each take everything queued (up to `max_batch`) and book
//! it in one transaction: the idempotency keys are claimed with `ON CONFLICT DO
//! NOTHING` (what comes back says which were claimed), the entries, their labels and outbox
//! events of the claimed keys inserted and added to their merchants' totals
//! (which refuse what the daily balances could not hold), and the whole
//! committed once — so a
//! busy ledger pays one commit (and one WAL flush) per batch instead of per
//! entry. An idle ledger sees batches of one and the latency of a single
//! transaction. On PostgreSQL that is BEGIN, one statement and COMMIT
//! ([`PG_BOOK`]); on SQLite one statement per table.
//!
//! Nothing is answered before its batch committed. Within a batch the keys are
//! inserted in (merchant, key) order, so two writers claiming the same keys
//! lock them in the same order and cannot deadlock; a key repeated inside one
//! batch is booked once and the repeats are answered as replays after the
//! commit. When a batch fails for a reason other than the database being
//! unreachable, its entries are booked again one per transaction, so one
//! refused entry cannot fail the others.
//!
//! A caller that goes away (deadline, cancelled RPC) before its batch commits
//! gets nothing written: it is dropped from the queue, or — when it left while
//! its key was being claimed — the batch is booked without it (PostgreSQL: the
//! transaction is rolled back and the batch booked again; SQLite: its key is
//! released in the same transaction). Past the claim it is booked like any
//! other, and the retry with the same key replays it (the window any RPC has
//! between COMMIT and its answer reaching the caller).

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
use tokio::sync::{Mutex, mpsc, oneshot};

use super::periods::{closed_through, lock_books_shared};
use super::{
    EventRow, StoreError, add_to_totals, booked_entry, entry_rows, is_overflow, limit_exceeded,
    metadata_rows, now,
    schema::{entry, entry_metadata, idempotency_key, outbox},
};
use crate::domain::{Entry, Fingerprint, NewEntry, PeriodClosed, check_open};

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
    Booked(Box<Entry>),
    /// Its key was held by an earlier request (committed before this answer).
    KeyTaken,
    /// Dated in its merchant's closed period: nothing written, key not claimed.
    Closed(PeriodClosed),
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
    committed: Arc<super::Commits>,
    config: GroupCommit,
    queue: OnceLock<mpsc::Sender<Pending>>,
}

impl Writers {
    pub(super) fn new(db: Db, committed: Arc<super::Commits>, config: GroupCommit) -> Self {
        let writers = if db.backend() == DbBackend::Postgres { config.writers.max(1) } else { 1 };
        let config = GroupCommit { writers, max_batch: config.max_batch.clamp(1, 1_000) };
        Self { db, committed, config, queue: OnceLock::new() }
    }

    /// Books `new` (which carries its idempotency key) in the next batch.
    pub(super) async fn book(&self, new: NewEntry, fingerprint: &Fingerprint) -> Result<Outcome, StoreError> {
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
            .map_err(|_| StoreError::Internal("the ledger's writers have stopped".into()))?;
        answer.await.map_err(|_| StoreError::Internal("a ledger writer stopped mid-batch".into()))?
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
    committed: Arc<super::Commits>,
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

async fn commit(db: &Db, committed: &super::Commits, mut batch: Vec<Pending>) {
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
        Ok(outcomes) => {
            committed.committed(first.iter().map(|p| &p.new.merchant_id));
            for (pending, outcome) in first.into_iter().zip(outcomes) {
                let _ = pending.reply.send(Ok(outcome));
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
                    committed.committed([&pending.new.merchant_id]);
                }
                let outcome = result.map(|mut outcomes| outcomes.pop().unwrap_or(Outcome::KeyTaken));
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

/// Books `batch` in one transaction; per entry, what became of it.
async fn write(db: &Db, batch: &[Pending]) -> Result<Vec<Outcome>, StoreError> {
    if db.backend() == DbBackend::Postgres {
        return write_postgres(db, batch).await;
    }
    let _writer = db.write_guard().await;
    let txn = db.conn().begin().await?;
    let created_at = now();
    let mut claimed = claim_keys(&txn, batch, created_at).await?;
    let merchants: Vec<&str> = batch.iter().map(|p| p.key().0).collect();
    let closes = closed_through(&txn, &merchants).await?;
    let closed = |p: &Pending| check_open(p.new.booking_date.date(), closes.get(p.key().0).copied()).err();
    // A caller that gave up (deadline, cancellation) while its key was being
    // claimed gets nothing written, nor does an entry dated in a closed
    // period: their keys are released in this transaction.
    let abandoned: Vec<(String, String)> = batch
        .iter()
        .filter(|p| p.reply.is_closed() || closed(p).is_some())
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
    let abandoned: HashSet<(String, String)> = abandoned.into_iter().collect();
    if !entries.is_empty() {
        entry::Entity::insert_many(entries).exec_without_returning(&txn).await?;
        let labels: Vec<_> = booked.iter().flatten().flat_map(metadata_rows).collect();
        if !labels.is_empty() {
            entry_metadata::Entity::insert_many(labels).exec_without_returning(&txn).await?;
        }
        outbox::Entity::insert_many(events).exec_without_returning(&txn).await?;
        add_to_totals(&txn, booked.iter().flatten().map(|e| &e.booked)).await?;
    }
    txn.commit().await?;
    Ok(batch
        .iter()
        .zip(booked)
        .map(|(p, booked)| match (booked, closed(p)) {
            (Some(entry), _) => Outcome::Booked(Box::new(entry)),
            (None, Some(refused)) if abandoned.contains(&(p.key().0.to_owned(), p.key().1.to_owned())) => {
                Outcome::Closed(refused)
            }
            (None, _) => Outcome::KeyTaken,
        })
        .collect())
}

/// Claims the batch's keys, in the batch's order; returns those claimed now.
async fn claim_keys(
    txn: &DatabaseTransaction,
    batch: &[Pending],
    created_at: DateTime<Utc>,
) -> Result<HashSet<(String, String)>, StoreError> {
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
        Query::returning().columns([idempotency_key::Column::MerchantId, idempotency_key::Column::RequestId]),
    );
    txn.query_all(&keys)
        .await?
        .iter()
        .map(|row| Ok((row.try_get_by_index(0)?, row.try_get_by_index(1)?)))
        .collect::<Result<_, DbErr>>()
        .map_err(StoreError::from)
}

/// PostgreSQL books a batch with one statement: its keys are claimed (in the
/// batch's order) and, for each key claimed, the entry and its outbox event
/// inserted. The rows travel as one array per column, so the statement has one
/// shape whatever the batch size and each connection parses and plans it once
/// (statements that grew with the batch were prepared anew for nearly every
/// batch). Empty text stands for NULL (`NULLIF`): the arrays hold no NULLs.
const PG_BOOK: &str = "WITH input AS ( \
       SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
                            $7::int8[], $8::date[], $9::text[], $10::text[], $11::text[], $12::bytea[], \
                            $13::text[], $14::text[]) \
         WITH ORDINALITY AS i(merchant, key, fingerprint, id, kind, currency, amount, day, description, \
                              reverses, event, payload, parent, state, n)), \
     claimed AS ( \
       INSERT INTO ledger_idempotency_keys (merchant_id, request_id, fingerprint, entry_id, created_at) \
       SELECT merchant, key, fingerprint, id, $15::timestamptz FROM input ORDER BY n \
       ON CONFLICT (merchant_id, request_id) DO NOTHING RETURNING entry_id), \
     entries AS ( \
       INSERT INTO ledger_entries (id, merchant_id, kind, currency_code, amount_minor, booking_date, \
                                   description, request_id, reverses_entry_id, created_at) \
       SELECT i.id, i.merchant, i.kind, i.currency, i.amount, i.day, i.description, i.key, \
              NULLIF(i.reverses, ''), $15::timestamptz \
       FROM input i JOIN claimed c ON c.entry_id = i.id ORDER BY i.n), \
     events AS ( \
       INSERT INTO ledger_outbox (event_id, entry_id, merchant_id, payload, traceparent, tracestate, \
                                  created_at) \
       SELECT i.event, i.id, i.merchant, i.payload, NULLIF(i.parent, ''), NULLIF(i.state, ''), \
              $15::timestamptz \
       FROM input i JOIN claimed c ON c.entry_id = i.id ORDER BY i.n), \
     labels AS ( \
       INSERT INTO ledger_entry_metadata (entry_id, key, value, merchant_id, booking_date) \
       SELECT l.id, l.key, l.value, i.merchant, i.day \
       FROM unnest($16::text[], $17::text[], $18::text[]) AS l(id, key, value) \
       JOIN input i ON i.id = l.id JOIN claimed c ON c.entry_id = l.id), \
     totals AS ( \
       INSERT INTO ledger_totals (merchant_id, currency_code, credits_minor, debits_minor) \
       SELECT i.merchant, i.currency, \
              COALESCE(SUM(i.amount) FILTER (WHERE i.kind = 'CREDIT'), 0), \
              COALESCE(SUM(i.amount) FILTER (WHERE i.kind = 'DEBIT'), 0) \
       FROM input i JOIN claimed c ON c.entry_id = i.id \
       GROUP BY i.merchant, i.currency ORDER BY i.merchant, i.currency \
       ON CONFLICT (merchant_id, currency_code) DO UPDATE SET \
         credits_minor = ledger_totals.credits_minor + excluded.credits_minor, \
         debits_minor = ledger_totals.debits_minor + excluded.debits_minor), \
     closes AS ( \
       SELECT merchant_id, MAX(closed_through) AS through FROM ledger_period_closes \
       WHERE reopened_at IS NULL AND merchant_id = ANY($1::text[]) GROUP BY merchant_id) \
     SELECT c.entry_id, s.through FROM claimed c JOIN input i ON i.id = c.entry_id \
     LEFT JOIN closes s ON s.merchant_id = i.merchant AND i.day <= s.through";

/// Books `batch` on PostgreSQL: BEGIN, the books' shared locks, one
/// statement, COMMIT.
///
/// A key held by a transaction still open makes the statement wait for it,
/// then skip the key if it committed. A caller that gave up (deadline,
/// cancellation) during that wait must get nothing written, and entries are
/// never deleted: so when one did, the transaction is rolled back and the
/// batch booked again without it. The same for an entry the statement found
/// dated in its merchant's closed period (it answers the closed-through date
/// of each entry it claimed), which is refused.
async fn write_postgres(db: &Db, batch: &[Pending]) -> Result<Vec<Outcome>, StoreError> {
    let created_at = now();
    // The entry and its event (the rows travel as arrays of their fields).
    let rows: Vec<_> =
        batch.iter().map(|p| booked_entry(p.new.clone(), created_at, p.trace.clone())).collect();
    // Left out of the batch: `None` when the caller went away, else why refused.
    let mut gone: std::collections::HashMap<usize, Option<PeriodClosed>> = Default::default();
    let merchants: Vec<&str> = batch.iter().map(|p| p.key().0).collect();
    loop {
        let live: Vec<usize> = (0..batch.len()).filter(|i| !gone.contains_key(i)).collect();
        if live.is_empty() {
            return Ok(outcomes(batch, &rows, &gone, &HashSet::new()));
        }
        let txn = db.conn().begin().await?;
        lock_books_shared(&txn, &merchants).await?;
        let booked = txn
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                PG_BOOK,
                book_values(batch, &rows, &live, created_at),
            ))
            .await;
        let booked = match booked {
            Ok(booked) => booked,
            // A total passed 64 bits. Told apart from other failures so that a
            // batch of one (how a refused batch is retried) names its entry.
            Err(error) if is_overflow(&error) => {
                let new = &batch[live[0]].new;
                return Err(limit_exceeded(new.merchant_id.as_str(), new.amount.currency().code(), new.kind));
            }
            Err(error) => return Err(error.into()),
        };
        let claimed: std::collections::HashMap<String, Option<chrono::NaiveDate>> = booked
            .iter()
            .map(|row| Ok((row.try_get_by_index::<String>(0)?, row.try_get_by_index(1)?)))
            .collect::<Result<_, DbErr>>()?;
        let claim = |i: usize| claimed.get(&rows[i].0.booked.id.to_string());
        let mut left = Vec::new();
        for &i in &live {
            match claim(i) {
                Some(Some(through)) => left.push((
                    i,
                    Some(PeriodClosed { closed_through: *through, date: batch[i].new.booking_date.date() }),
                )),
                Some(None) if batch[i].reply.is_closed() => left.push((i, None)),
                _ => {}
            }
        }
        if !left.is_empty() {
            txn.rollback().await?;
            gone.extend(left);
            continue;
        }
        txn.commit().await?;
        let claimed: HashSet<usize> = live.iter().copied().filter(|&i| claim(i).is_some()).collect();
        return Ok(outcomes(batch, &rows, &gone, &claimed));
    }
}

/// Per entry of `batch`: booked when `claimed`, refused when `gone` says so,
/// else its key was taken.
fn outcomes(
    batch: &[Pending],
    rows: &[(Entry, EventRow)],
    gone: &std::collections::HashMap<usize, Option<PeriodClosed>>,
    claimed: &HashSet<usize>,
) -> Vec<Outcome> {
    (0..batch.len())
        .map(|i| match gone.get(&i) {
            Some(Some(refused)) => Outcome::Closed(*refused),
            Some(None) => Outcome::KeyTaken,
            None if claimed.contains(&i) => Outcome::Booked(Box::new(rows[i].0.clone())),
            None => Outcome::KeyTaken,
        })
        .collect()
}

/// The parameters of [`PG_BOOK`] for the rows at `live`.
fn book_values(
    batch: &[Pending],
    rows: &[(Entry, EventRow)],
    live: &[usize],
    created_at: DateTime<Utc>,
) -> Vec<Value> {
    let text = |f: &dyn Fn(usize) -> String| Value::from(live.iter().map(|&i| f(i)).collect::<Vec<_>>());
    let entry = |i: usize| &rows[i].0.booked;
    let event = |i: usize| &rows[i].1;
    let labels = |f: &dyn Fn(&str, &str, &str) -> String| {
        let mut out = Vec::new();
        for &i in live {
            let id = entry(i).id.to_string();
            out.extend(entry(i).metadata.iter().map(|(k, v)| f(&id, k, v)));
        }
        Value::from(out)
    };
    vec![
        text(&|i| entry(i).merchant_id.as_str().to_owned()),
        text(&|i| batch[i].key().1.to_owned()),
        text(&|i| batch[i].fingerprint.clone()),
        text(&|i| entry(i).id.to_string()),
        text(&|i| entry(i).kind.as_str().to_owned()),
        text(&|i| entry(i).amount.currency().code().to_owned()),
        Value::from(live.iter().map(|&i| entry(i).amount.minor_units()).collect::<Vec<_>>()),
        Value::from(live.iter().map(|&i| entry(i).booking_date.date()).collect::<Vec<_>>()),
        text(&|i| entry(i).description.as_str().to_owned()),
        text(&|i| entry(i).reverses.map(|id| id.to_string()).unwrap_or_default()),
        text(&|i| event(i).event_id.clone()),
        Value::from(live.iter().map(|&i| event(i).payload.clone()).collect::<Vec<_>>()),
        text(&|i| event(i).traceparent.clone().unwrap_or_default()),
        text(&|i| event(i).tracestate.clone().unwrap_or_default()),
        created_at.into(),
        // The labels, one element per (entry, key).
        labels(&|id, _, _| id.to_owned()),
        labels(&|_, key, _| key.to_owned()),
        labels(&|_, _, value| value.to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use sea_orm::{EntityName, IdenStatic, Iterable};

    use super::*;

    /// The columns `PG_BOOK` inserts into `table`, as written in the statement.
    fn inserted_columns(table: &str) -> Vec<String> {
        let start = PG_BOOK.find(&format!("INSERT INTO {table} (")).expect("an INSERT into the table");
        let list = &PG_BOOK[start + table.len() + 14..];
        let list = &list[..list.find(')').unwrap()];
        list.split(',').map(|c| c.trim().to_owned()).collect()
    }

    fn columns<E: EntityTrait>(except: &[&str]) -> Vec<String> {
        E::Column::iter().map(|c| c.as_str().to_owned()).filter(|c| !except.contains(&c.as_str())).collect()
    }

    /// The hand-written PostgreSQL batch statement writes the same rows as the
    /// entities every other write path uses: a column added to a table (and
    /// its entity) without it fails here.
    #[test]
    fn the_postgres_batch_writes_every_column_of_the_entities() {
        assert_eq!(inserted_columns(entry::Entity.table_name()), columns::<entry::Entity>(&[]));
        assert_eq!(
            inserted_columns(idempotency_key::Entity.table_name()),
            columns::<idempotency_key::Entity>(&[])
        );
        assert_eq!(
            inserted_columns(entry_metadata::Entity.table_name()),
            columns::<entry_metadata::Entity>(&[])
        );
        // The database assigns the position; a new event is unpublished.
        assert_eq!(
            inserted_columns(outbox::Entity.table_name()),
            columns::<outbox::Entity>(&["position", "published_at"])
        );
    }
}
