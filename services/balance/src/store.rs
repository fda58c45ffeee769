//! The read model's SQL: applying postings exactly once, and the queries the
//! balance service answers from.

mod migrations;
mod watch;

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::NaiveDate;
use fluxo_db::{Db, statement};
use fluxo_types::{Currency, MerchantId};
use sea_orm::{ConnectionTrait, DbErr, QueryResult, Statement, TransactionTrait, Value};

pub use migrations::Migrator;

use crate::domain::{DayKey, DayTotals, Delta, Overflow, Posting, fold};

pub use fluxo_db::StoreError;

impl From<Overflow> for StoreError {
    fn from(overflow: Overflow) -> Self {
        Self::OutOfRange { message: overflow.to_string(), field: None }
    }
}

/// An event the read model refused, kept aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    /// The event.
    pub event_id: String,
    /// Its merchant and business date, when it could be read.
    pub merchant_id: Option<String>,
    /// See `merchant_id`.
    pub date: Option<NaiveDate>,
    /// Why it was refused.
    pub reason: String,
    /// The event as delivered (an `EntryRecorded`).
    pub payload: Vec<u8>,
}

/// What applying a batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Postings applied now.
    pub applied: usize,
    /// Postings whose event had been applied before (redeliveries).
    pub duplicates: usize,
    /// The (merchant, currency) balances that changed, for cache invalidation.
    pub touched: BTreeSet<(String, String)>,
    /// Ledger commit times (µs since the epoch) of the postings applied now,
    /// for the end-to-end consolidation delay.
    pub committed_at_micros: Vec<i64>,
}

/// The read model tables.
#[derive(Debug, Clone)]
pub struct BalanceStore {
    db: Db,
}

/// Micro-seconds since the epoch, now.
pub(crate) fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

impl BalanceStore {
    /// Wraps an open database whose balance schema is current.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// One row of `sql` (`?` placeholders) on the pool.
    async fn query_one(&self, sql: &str, values: Vec<Value>) -> Result<Option<QueryResult>, DbErr> {
        self.db.conn().query_one_raw(statement(self.db.backend(), sql, values)).await
    }

    /// Every row of `sql` (`?` placeholders) on the pool.
    async fn query_all(&self, sql: &str, values: Vec<Value>) -> Result<Vec<QueryResult>, DbErr> {
        self.db.conn().query_all_raw(statement(self.db.backend(), sql, values)).await
    }

    /// Creates or upgrades the read model's tables.
    pub async fn migrate(db: &Db) -> Result<(), DbErr> {
        fluxo_db::migration::migrate::<Migrator>(db).await
    }

    /// True when every read-model migration has been applied.
    pub async fn schema_is_current(db: &Db) -> Result<bool, DbErr> {
        fluxo_db::migration::schema_is_current::<Migrator>(db).await
    }

    /// Applies `postings` in one transaction: each event is recorded as
    /// applied and its amount added to its day, or — when it was applied
    /// before — skipped. Either the whole batch commits or none of it.
    pub async fn apply(&self, postings: &[Posting]) -> Result<Applied, StoreError> {
        let mut seen = HashSet::new();
        let mut unique: Vec<&Posting> =
            postings.iter().filter(|p| seen.insert(p.entry_id.as_str())).collect();
        // Rows are locked in entry order, so consolidators (and one consolidator's
        // batches in flight) claiming the same entries cannot deadlock.
        unique.sort_unstable_by(|a, b| a.entry_id.cmp(&b.entry_id));
        if unique.is_empty() {
            return Ok(Applied::default());
        }
        let backend = self.db.backend();
        let _writer = self.db.write_guard().await;
        let txn = self.db.conn().begin().await?;

        let mut fresh: HashSet<String> = HashSet::new();
        for chunk in unique.chunks(500) {
            fresh.extend(insert_applied(&txn, backend, chunk).await?);
        }
        let to_apply: Vec<Posting> =
            unique.iter().filter(|p| fresh.contains(&p.entry_id)).map(|p| (*p).clone()).collect();

        let deltas = fold(&to_apply)?;
        add_to_days(&txn, backend, &deltas).await?;
        txn.commit().await?;
        Ok(Applied {
            applied: to_apply.len(),
            duplicates: unique.len() - to_apply.len(),
            touched: deltas.keys().map(|k| (k.merchant_id.clone(), k.currency.clone())).collect(),
            committed_at_micros: to_apply.iter().map(|p| p.committed_at_micros).collect(),
        })
    }

    /// Parks an event the read model refused (kept once, whatever the retries).
    pub async fn park(&self, parked: &Parked) -> Result<(), StoreError> {
        let _writer = self.db.write_guard().await;
        self.db
            .conn()
            .execute_raw(statement(
                self.db.backend(),
                "INSERT INTO balance_parked_events \
                   (event_id, merchant_id, booking_date, reason, payload, parked_at_micros) \
                 VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
                vec![
                    parked.event_id.clone().into(),
                    parked.merchant_id.clone().into(),
                    parked.date.into(),
                    parked.reason.clone().into(),
                    parked.payload.clone().into(),
                    now_micros().into(),
                ],
            ))
            .await?;
        Ok(())
    }

    /// Parked events, oldest first.
    pub async fn parked(&self, count: u64) -> Result<Vec<Parked>, StoreError> {
        let rows = self
            .query_all(
                "SELECT event_id, merchant_id, booking_date, reason, payload FROM balance_parked_events \
                 ORDER BY parked_at_micros, event_id LIMIT ?",
                vec![i64::try_from(count).unwrap_or(i64::MAX).into()],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Parked {
                    event_id: r.try_get_by_index(0)?,
                    merchant_id: r.try_get_by_index(1)?,
                    date: r.try_get_by_index(2)?,
                    reason: r.try_get_by_index(3)?,
                    payload: r.try_get_by_index(4)?,
                })
            })
            .collect::<Result<_, DbErr>>()
            .map_err(StoreError::from)
    }

    /// How many events are parked.
    pub async fn parked_count(&self) -> Result<u64, StoreError> {
        let row = self.query_one("SELECT COUNT(*) FROM balance_parked_events", vec![]).await?;
        let n: i64 = row.map(|r| r.try_get_by_index(0)).transpose()?.unwrap_or(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Forgets a parked event (replayed, or dropped by an operator).
    pub async fn unpark(&self, event_id: &str) -> Result<bool, StoreError> {
        let _writer = self.db.write_guard().await;
        let done = self
            .db
            .conn()
            .execute_raw(statement(
                self.db.backend(),
                "DELETE FROM balance_parked_events WHERE event_id = ?",
                vec![event_id.into()],
            ))
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The earliest business date of the merchant's parked events: its
    /// balances from that day on may be missing them.
    pub async fn parked_since(&self, merchant: &MerchantId) -> Result<Option<NaiveDate>, StoreError> {
        let row = self
            .query_one(
                "SELECT MIN(booking_date) FROM balance_parked_events WHERE merchant_id = ?",
                vec![merchant.as_str().into()],
            )
            .await?;
        Ok(row.map(|r| r.try_get_by_index::<Option<NaiveDate>>(0)).transpose()?.flatten())
    }

    /// The currencies a merchant has balances in.
    pub async fn currencies(&self, merchant: &MerchantId) -> Result<Vec<Currency>, StoreError> {
        let rows = self.query_all("SELECT DISTINCT currency_code FROM balance_daily WHERE merchant_id = ? ORDER BY currency_code", vec![merchant.as_str().into()]).await?;
        rows.iter()
            .map(|r| {
                let code = r.try_get_by_index::<String>(0)?;
                Currency::parse(&code).map_err(|e| StoreError::Corrupt {
                    what: format!("currency of merchant {}", merchant.as_str()),
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    /// The balance carried into `start` and the newest commit reflected in
    /// this merchant's balance in this currency.
    pub async fn opening(
        &self,
        merchant: &MerchantId,
        currency: &Currency,
        start: NaiveDate,
    ) -> Result<(i64, Option<i64>), StoreError> {
        let row = self.query_one("SELECT CAST(COALESCE(SUM(CASE WHEN booking_date < ? THEN credits_minor - debits_minor ELSE 0 END), 0) AS BIGINT), \
                 MAX(as_of_micros) FROM balance_daily WHERE merchant_id = ? AND currency_code = ?", vec![start.into(), merchant.as_str().into(), currency.code().into()]).await?;
        match row {
            Some(row) => Ok((row.try_get_by_index::<i64>(0)?, row.try_get_by_index::<Option<i64>>(1)?)),
            None => Ok((0, None)),
        }
    }

    /// Stored totals for each day with entries between `start` and `end`.
    pub async fn days(
        &self,
        merchant: &MerchantId,
        currency: &Currency,
        start: NaiveDate,
        end: NaiveDate,
    ) -> Result<BTreeMap<NaiveDate, DayTotals>, StoreError> {
        let rows = self
            .query_all(
                "SELECT booking_date, credits_minor, debits_minor, entry_count FROM balance_daily \
                 WHERE merchant_id = ? AND currency_code = ? AND booking_date >= ? AND booking_date <= ? \
                 ORDER BY booking_date",
                vec![merchant.as_str().into(), currency.code().into(), start.into(), end.into()],
            )
            .await?;
        rows.iter().map(|r| Ok((r.try_get_by_index::<NaiveDate>(0)?, day_totals(r, 1)?))).collect()
    }

    /// Every stored day, for reconciliation.
    pub async fn all_days(
        &self,
        merchant_id: Option<&str>,
    ) -> Result<BTreeMap<DayKey, DayTotals>, StoreError> {
        let (sql, values): (&str, Vec<Value>) = match merchant_id {
            Some(m) => (
                "SELECT merchant_id, currency_code, booking_date, credits_minor, debits_minor, entry_count \
                 FROM balance_daily WHERE merchant_id = ?",
                vec![m.into()],
            ),
            None => (
                "SELECT merchant_id, currency_code, booking_date, credits_minor, debits_minor, entry_count FROM balance_daily",
                vec![],
            ),
        };
        let rows = self.query_all(sql, values).await?;
        rows.iter()
            .map(|r| {
                Ok((
                    DayKey {
                        merchant_id: r.try_get_by_index(0)?,
                        currency: r.try_get_by_index(1)?,
                        date: r.try_get_by_index(2)?,
                    },
                    day_totals(r, 3)?,
                ))
            })
            .collect()
    }

    /// Recomputes a merchant's days from `start` to `end` from `postings`
    /// (every ledger entry of that merchant in that range), in one
    /// transaction: the days and their applied-entry records are replaced.
    /// Events delivered afterwards for these entries are recognised and skipped.
    pub async fn rebuild(
        &self,
        merchant_id: &str,
        start: NaiveDate,
        end: NaiveDate,
        postings: &[Posting],
    ) -> Result<usize, StoreError> {
        let backend = self.db.backend();
        let _writer = self.db.write_guard().await;
        let txn = self.db.conn().begin().await?;
        let range = || -> Vec<Value> { vec![merchant_id.into(), start.into(), end.into()] };
        txn.execute_raw(statement(
            backend,
            "DELETE FROM balance_daily WHERE merchant_id = ? AND booking_date >= ? AND booking_date <= ?",
            range(),
        ))
        .await?;
        let ids: Vec<Value> = postings.iter().map(|p| Value::from(p.entry_id.clone())).collect();
        for chunk in ids.chunks(500) {
            let placeholders = vec!["?"; chunk.len()].join(", ");
            txn.execute_raw(statement(
                backend,
                &format!("DELETE FROM balance_applied_events WHERE entry_id IN ({placeholders})"),
                chunk.to_vec(),
            ))
            .await?;
        }
        for chunk in postings.chunks(500) {
            insert_applied(&txn, backend, chunk).await?;
        }
        let deltas = fold(postings)?;
        add_to_days(&txn, backend, &deltas).await?;
        txn.commit().await?;
        Ok(postings.len())
    }

    /// The entries of a merchant already in the read model.
    pub async fn applied_entries(&self, merchant_id: &str) -> Result<HashSet<String>, StoreError> {
        let rows = self
            .query_all(
                "SELECT entry_id FROM balance_applied_events WHERE merchant_id = ?",
                vec![merchant_id.into()],
            )
            .await?;
        Ok(rows.iter().map(|r| r.try_get_by_index::<String>(0)).collect::<Result<_, _>>()?)
    }
}

/// Records entries as applied; returns those not recorded before.
async fn insert_applied<P: std::borrow::Borrow<Posting>>(
    conn: &impl ConnectionTrait,
    backend: sea_orm::DbBackend,
    postings: &[P],
) -> Result<Vec<String>, DbErr> {
    let now = now_micros();
    let insert = if backend == sea_orm::DbBackend::Postgres {
        // One statement shape whatever the batch size (one array per column),
        // so PostgreSQL parses and plans it once per connection.
        let column = |f: fn(&Posting) -> &String| {
            Value::from(postings.iter().map(|p| f(p.borrow()).clone()).collect::<Vec<_>>())
        };
        Statement::from_sql_and_values(
            backend,
            "INSERT INTO balance_applied_events (event_id, entry_id, merchant_id, applied_at_micros) \
             SELECT e, i, m, $4::int8 FROM unnest($1::text[], $2::text[], $3::text[]) \
                  WITH ORDINALITY AS u(e, i, m, n) ORDER BY n \
             ON CONFLICT (entry_id) DO NOTHING RETURNING entry_id",
            vec![column(|p| &p.event_id), column(|p| &p.entry_id), column(|p| &p.merchant_id), now.into()],
        )
    } else {
        let mut sql = String::from(
            "INSERT INTO balance_applied_events (event_id, entry_id, merchant_id, applied_at_micros) VALUES ",
        );
        let mut values: Vec<Value> = Vec::with_capacity(postings.len() * 4);
        for (i, p) in postings.iter().enumerate() {
            let p = p.borrow();
            sql.push_str(if i == 0 { "(?, ?, ?, ?)" } else { ", (?, ?, ?, ?)" });
            values.extend([
                p.event_id.clone().into(),
                p.entry_id.clone().into(),
                p.merchant_id.clone().into(),
                now.into(),
            ]);
        }
        sql.push_str(" ON CONFLICT (entry_id) DO NOTHING RETURNING entry_id");
        statement(backend, &sql, values)
    };
    let rows = conn.query_all_raw(insert).await?;
    rows.iter().map(|r| r.try_get_by_index::<String>(0)).collect()
}

/// A day's credits, debits and entry count from columns `first`, `first + 1`, `first + 2`.
fn day_totals(row: &QueryResult, first: usize) -> Result<DayTotals, DbErr> {
    Ok(DayTotals {
        credits: row.try_get_by_index(first)?,
        debits: row.try_get_by_index(first + 1)?,
        count: row.try_get_by_index(first + 2)?,
    })
}

/// Adds each delta to its day, creating the days that are absent, in one
/// statement. The database does the addition, so concurrent consolidators
/// never lose an update; an overflow fails the statement (PostgreSQL's bigint
/// range, SQLite's integer checks). `deltas` comes sorted by day key, so
/// concurrent consolidators lock rows in the same order and cannot deadlock.
async fn add_to_days(
    conn: &impl ConnectionTrait,
    backend: sea_orm::DbBackend,
    deltas: &BTreeMap<DayKey, Delta>,
) -> Result<(), DbErr> {
    let sorted: Vec<(&DayKey, &Delta)> = deltas.iter().collect();
    for chunk in sorted.chunks(500) {
        upsert_days(conn, backend, chunk).await?;
    }
    Ok(())
}

/// Adds to an existing day; the database does the addition.
const ADD_TO_EXISTING_DAY: &str = " ON CONFLICT (merchant_id, currency_code, booking_date) DO UPDATE SET \
       credits_minor = balance_daily.credits_minor + excluded.credits_minor, \
       debits_minor = balance_daily.debits_minor + excluded.debits_minor, \
       entry_count = balance_daily.entry_count + excluded.entry_count, \
       as_of_micros = CASE WHEN excluded.as_of_micros > balance_daily.as_of_micros \
                           THEN excluded.as_of_micros ELSE balance_daily.as_of_micros END";

/// Where a day that changes moves in the change order (see the
/// `change_order` migration): the current transaction on PostgreSQL (a new
/// day takes it by default), one past the largest on SQLite.
const CHANGE_XID: &str = ", change_xid = pg_current_xact_id()";
const CHANGE_SEQ: &str = ", change_seq = excluded.change_seq";
const NEXT_SEQ: &str = "(SELECT COALESCE(MAX(change_seq), 0) + 1 FROM balance_daily)";

async fn upsert_days(
    conn: &impl ConnectionTrait,
    backend: sea_orm::DbBackend,
    deltas: &[(&DayKey, &Delta)],
) -> Result<(), DbErr> {
    let insert = "INSERT INTO balance_daily \
        (merchant_id, currency_code, booking_date, credits_minor, debits_minor, entry_count, as_of_micros) ";
    let upsert = if backend == sea_orm::DbBackend::Postgres {
        // One shape whatever the number of days: parsed and planned once per connection.
        let text = |f: fn(&DayKey) -> &String| {
            Value::from(deltas.iter().map(|(k, _)| f(k).clone()).collect::<Vec<_>>())
        };
        let number = |f: fn(&Delta) -> i64| Value::from(deltas.iter().map(|(_, d)| f(d)).collect::<Vec<_>>());
        Statement::from_sql_and_values(
            backend,
            format!(
                "{insert}SELECT m, c, d, cr, de, n, a \
                 FROM unnest($1::text[], $2::text[], $3::date[], $4::int8[], $5::int8[], $6::int8[], $7::int8[]) \
                      WITH ORDINALITY AS u(m, c, d, cr, de, n, a, o) ORDER BY o{ADD_TO_EXISTING_DAY}{CHANGE_XID}"
            ),
            vec![
                text(|k| &k.merchant_id),
                text(|k| &k.currency),
                Value::from(deltas.iter().map(|(k, _)| k.date).collect::<Vec<_>>()),
                number(|d| d.credits),
                number(|d| d.debits),
                number(|d| d.count),
                number(|d| d.as_of_micros),
            ],
        )
    } else {
        let insert = insert.replace("as_of_micros) ", "as_of_micros, change_seq) ");
        let mut sql = format!("{insert}VALUES ");
        let mut values: Vec<Value> = Vec::with_capacity(deltas.len() * 7);
        for (i, (key, delta)) in deltas.iter().enumerate() {
            sql.push_str(if i == 0 { "(" } else { ", (" });
            sql.push_str("?, ?, ?, ?, ?, ?, ?, ");
            sql.push_str(NEXT_SEQ);
            sql.push(')');
            values.extend([
                key.merchant_id.clone().into(),
                key.currency.clone().into(),
                key.date.into(),
                delta.credits.into(),
                delta.debits.into(),
                delta.count.into(),
                delta.as_of_micros.into(),
            ]);
        }
        sql.push_str(ADD_TO_EXISTING_DAY);
        sql.push_str(CHANGE_SEQ);
        statement(backend, &sql, values)
    };
    conn.execute_raw(upsert).await?;
    Ok(())
}
