//! Period closes in SQL: recording a close with its figures, reopening, and
//! the lock that keeps a close and the bookings of its merchant apart.
//!
//! On PostgreSQL every booking transaction takes a *shared* advisory lock per
//! merchant it books for, before the statement that reads the closes and
//! books; a close takes the same lock *exclusively*, then computes its digest
//! and commits. Bookings never wait for each other (shared locks do not
//! conflict); a close waits for the bookings in flight, and a booking that
//! starts while a close is being recorded waits for it and then sees it. So
//! no entry can land in a period after its digest was taken. On SQLite the
//! single writer already orders them.

use chrono::{DateTime, NaiveDate, Utc};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, QueryResult, TransactionTrait, Value};

use super::{LedgerStore, StoreError, after_cursor, metadata_of, now, schema::entry, to_domain};
use crate::domain::{
    BooksDigest, CloseRefused, DayFigures, DigestBuilder, MerchantId, PageCursor, ParsedClose, PeriodClose,
    Reopened,
};

/// The advisory lock class of merchants' books ("flux").
const BOOKS_LOCK_CLASS: i32 = 0x666c_7578;
/// Entries read per query while computing a digest.
const DIGEST_CHUNK: u64 = 2_000;

/// Takes the shared lock of each merchant's books (PostgreSQL), in order, for
/// the rest of `txn`: a close of one of them waits for this transaction, and
/// this one waits for a close being recorded.
pub(super) async fn lock_books_shared(
    txn: &DatabaseTransaction,
    merchants: &[&str],
) -> Result<(), StoreError> {
    if txn.get_database_backend() != DbBackend::Postgres || merchants.is_empty() {
        return Ok(());
    }
    let mut sorted: Vec<String> = merchants.iter().map(|m| (*m).to_owned()).collect();
    sorted.sort();
    sorted.dedup();
    txn.execute_raw(sea_orm::Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_advisory_xact_lock_shared($1, hashtext(m)) FROM unnest($2::text[]) WITH ORDINALITY AS t(m, n) \
         ORDER BY n",
        [Value::from(BOOKS_LOCK_CLASS), Value::from(sorted)],
    ))
    .await?;
    Ok(())
}

/// Takes the exclusive lock of a merchant's books (PostgreSQL) for the rest
/// of `txn`: waits for the bookings in flight, and holds new ones until it ends.
async fn lock_books_exclusive(txn: &DatabaseTransaction, merchant: &str) -> Result<(), StoreError> {
    if txn.get_database_backend() == DbBackend::Postgres {
        txn.execute_raw(sea_orm::Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            [Value::from(BOOKS_LOCK_CLASS), Value::from(merchant)],
        ))
        .await?;
    }
    Ok(())
}

/// The closed-through date in force for each of `merchants` that has one.
pub(super) async fn closed_through(
    conn: &impl ConnectionTrait,
    merchants: &[&str],
) -> Result<std::collections::HashMap<String, NaiveDate>, StoreError> {
    if merchants.is_empty() {
        return Ok(Default::default());
    }
    let marks = vec!["?"; merchants.len()].join(", ");
    let sql = format!(
        "SELECT merchant_id, MAX(closed_through) FROM ledger_period_closes \
         WHERE reopened_at IS NULL AND merchant_id IN ({marks}) GROUP BY merchant_id"
    );
    let values = merchants.iter().map(|m| Value::from(*m)).collect();
    let rows = conn.query_all_raw(fluxo_db::statement(conn.get_database_backend(), &sql, values)).await?;
    rows.iter()
        .map(|r| Ok((r.try_get_by_index::<String>(0)?, r.try_get_by_index::<NaiveDate>(1)?)))
        .collect::<Result<_, sea_orm::DbErr>>()
        .map_err(StoreError::from)
}

impl LedgerStore {
    /// The date a merchant's books are closed through, if they are.
    pub async fn closed_through(&self, merchant: &MerchantId) -> Result<Option<NaiveDate>, StoreError> {
        Ok(closed_through(self.db.conn(), &[merchant.as_str()]).await?.remove(merchant.as_str()))
    }

    /// Closes `close.merchant_id`'s books through `close.closed_through`,
    /// recording `by` and the digest of every entry on or before it.
    pub async fn close_period(
        &self,
        close: &ParsedClose,
        by: &str,
    ) -> Result<Result<PeriodClose, CloseRefused>, StoreError> {
        let merchant = close.merchant_id.as_str();
        let _writer = self.db.write_guard().await;
        let txn = self.db.conn().begin().await?;
        lock_books_exclusive(&txn, merchant).await?;
        let current = closed_through(&txn, &[merchant]).await?.remove(merchant);
        if let Some(current) = current
            && close.closed_through <= current
        {
            txn.rollback().await?;
            return Ok(Err(CloseRefused::AlreadyClosed { current }));
        }
        let books = books_digest(&txn, &close.merchant_id, close.closed_through).await?;
        let id = ulid::Ulid::new().to_string();
        let backend = txn.get_database_backend();
        txn.execute_raw(fluxo_db::statement(
            backend,
            "INSERT INTO ledger_period_closes (id, merchant_id, closed_through, previous_closed_through, note, \
             closed_by, closed_at, entry_count, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            vec![
                id.clone().into(),
                merchant.into(),
                close.closed_through.into(),
                current.into(),
                close.note.as_str().into(),
                by.into(),
                now().into(),
                books.entry_count.into(),
                books.digest.clone().into(),
            ],
        ))
        .await?;
        // 8 parameters a row: well under PostgreSQL's 65,535 per statement.
        for days in books.days.chunks(1_000) {
            let rows = vec!["(?, ?, ?, ?, ?, ?, ?, ?)"; days.len()].join(", ");
            let values = days
                .iter()
                .flat_map(|d| {
                    [
                        Value::from(id.clone()),
                        d.date.into(),
                        d.currency.clone().into(),
                        d.entry_count.into(),
                        d.credits.into(),
                        d.debits.into(),
                        d.closing.into(),
                        d.digest.clone().into(),
                    ]
                })
                .collect();
            txn.execute_raw(fluxo_db::statement(
                backend,
                &format!(
                    "INSERT INTO ledger_period_close_days (close_id, booking_date, currency_code, entry_count, \
                     credits_minor, debits_minor, closing_minor, digest) VALUES {rows}"
                ),
                values,
            ))
            .await?;
        }
        let recorded = load_close(&txn, &id).await?;
        txn.commit().await?;
        recorded.map(Ok).ok_or_else(|| StoreError::Internal(format!("period close {id} vanished")))
    }

    /// Reopens the latest close in force, recording who, when and why.
    pub async fn reopen_period(
        &self,
        merchant: &MerchantId,
        reason: &str,
        by: &str,
    ) -> Result<Result<PeriodClose, CloseRefused>, StoreError> {
        let _writer = self.db.write_guard().await;
        let txn = self.db.conn().begin().await?;
        let backend = txn.get_database_backend();
        lock_books_exclusive(&txn, merchant.as_str()).await?;
        let latest = txn
            .query_one_raw(fluxo_db::statement(
                backend,
                "SELECT id FROM ledger_period_closes WHERE merchant_id = ? AND reopened_at IS NULL \
                 ORDER BY closed_through DESC LIMIT 1",
                vec![merchant.as_str().into()],
            ))
            .await?;
        let Some(latest) = latest else {
            txn.rollback().await?;
            return Ok(Err(CloseRefused::NotClosed { merchant: merchant.as_str().to_owned() }));
        };
        let id: String = latest.try_get_by_index(0)?;
        txn.execute_raw(fluxo_db::statement(
            backend,
            "UPDATE ledger_period_closes SET reopened_at = ?, reopened_by = ?, reopen_reason = ? WHERE id = ?",
            vec![now().into(), by.into(), reason.into(), id.clone().into()],
        ))
        .await?;
        let recorded = load_close(&txn, &id).await?;
        txn.commit().await?;
        recorded.map(Ok).ok_or_else(|| StoreError::Internal(format!("period close {id} vanished")))
    }

    /// A merchant's closes, newest first, reopened ones included.
    pub async fn period_closes(&self, merchant: &MerchantId) -> Result<Vec<PeriodClose>, StoreError> {
        let conn = self.db.conn();
        let rows = conn
            .query_all_raw(fluxo_db::statement(
                conn.get_database_backend(),
                &format!("{CLOSE_SELECT} WHERE merchant_id = ? ORDER BY closed_at DESC, id DESC"),
                vec![merchant.as_str().into()],
            ))
            .await?;
        let mut closes = Vec::with_capacity(rows.len());
        for row in rows {
            closes.push(close_from_row(conn, &row).await?);
        }
        Ok(closes)
    }

    /// One close, reopened or not.
    pub async fn period_close(&self, id: &str) -> Result<Option<PeriodClose>, StoreError> {
        load_close(self.db.conn(), id).await
    }

    /// The figures a close recorded, by (date, currency).
    pub async fn close_days(&self, close_id: &str) -> Result<Vec<DayFigures>, StoreError> {
        let conn = self.db.conn();
        let rows = conn
            .query_all_raw(fluxo_db::statement(
                conn.get_database_backend(),
                "SELECT booking_date, currency_code, entry_count, credits_minor, debits_minor, closing_minor, \
                 digest FROM ledger_period_close_days WHERE close_id = ? ORDER BY booking_date, currency_code",
                vec![close_id.into()],
            ))
            .await?;
        rows.iter()
            .map(|r| {
                Ok(DayFigures {
                    date: r.try_get_by_index(0)?,
                    currency: r.try_get_by_index(1)?,
                    entry_count: r.try_get_by_index(2)?,
                    credits: r.try_get_by_index(3)?,
                    debits: r.try_get_by_index(4)?,
                    closing: r.try_get_by_index(5)?,
                    digest: r.try_get_by_index(6)?,
                })
            })
            .collect::<Result<_, sea_orm::DbErr>>()
            .map_err(StoreError::from)
    }

    /// The digest of a merchant's entries on or before `through`, recomputed
    /// from the rows as they are now (what `fluxo ledger verify` compares).
    pub async fn books_digest(
        &self,
        merchant: &MerchantId,
        through: NaiveDate,
    ) -> Result<BooksDigest, StoreError> {
        books_digest(self.db.conn(), merchant, through).await
    }
}

const CLOSE_SELECT: &str = "SELECT id, merchant_id, closed_through, previous_closed_through, note, closed_by, \
                            closed_at, entry_count, digest, reopened_at, reopened_by, reopen_reason \
                            FROM ledger_period_closes";

async fn load_close(conn: &impl ConnectionTrait, id: &str) -> Result<Option<PeriodClose>, StoreError> {
    let row = conn
        .query_one_raw(fluxo_db::statement(
            conn.get_database_backend(),
            &format!("{CLOSE_SELECT} WHERE id = ?"),
            vec![id.into()],
        ))
        .await?;
    match row {
        Some(row) => close_from_row(conn, &row).await.map(Some),
        None => Ok(None),
    }
}

async fn close_from_row(conn: &impl ConnectionTrait, r: &QueryResult) -> Result<PeriodClose, StoreError> {
    let id: String = r.try_get_by_index(0)?;
    let reopened_at: Option<DateTime<Utc>> = r.try_get_by_index(9)?;
    let reopened = match reopened_at {
        Some(at) => Some(Reopened {
            at,
            by: r.try_get_by_index::<Option<String>>(10)?.unwrap_or_default(),
            reason: r.try_get_by_index::<Option<String>>(11)?.unwrap_or_default(),
        }),
        None => None,
    };
    // The last day of each currency carries its closing balance.
    let balances = conn
        .query_all_raw(fluxo_db::statement(
            conn.get_database_backend(),
            "SELECT d.currency_code, d.closing_minor FROM ledger_period_close_days d \
             WHERE d.close_id = ? AND d.booking_date = (SELECT MAX(e.booking_date) FROM ledger_period_close_days e \
               WHERE e.close_id = d.close_id AND e.currency_code = d.currency_code) \
             ORDER BY d.currency_code",
            vec![id.clone().into()],
        ))
        .await?;
    let closing_balances = balances
        .iter()
        .map(|b| Ok((b.try_get_by_index(0)?, b.try_get_by_index(1)?)))
        .collect::<Result<_, sea_orm::DbErr>>()?;
    Ok(PeriodClose {
        id,
        merchant_id: r.try_get_by_index(1)?,
        closed_through: r.try_get_by_index(2)?,
        previous_closed_through: r.try_get_by_index(3)?,
        note: r.try_get_by_index(4)?,
        closed_by: r.try_get_by_index(5)?,
        closed_at: r.try_get_by_index(6)?,
        entry_count: r.try_get_by_index(7)?,
        digest: r.try_get_by_index(8)?,
        closing_balances,
        reopened,
    })
}

/// Reads `merchant`'s entries on or before `through` in (date, id) order, a
/// chunk at a time, into their digest.
async fn books_digest(
    conn: &impl ConnectionTrait,
    merchant: &MerchantId,
    through: NaiveDate,
) -> Result<BooksDigest, StoreError> {
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
    let mut builder = DigestBuilder::default();
    let mut after: Option<PageCursor> = None;
    loop {
        let mut query = entry::Entity::find()
            .filter(entry::Column::MerchantId.eq(merchant.as_str()))
            .filter(entry::Column::BookingDate.lte(through));
        if let Some(after) = &after {
            query = query.filter(after_cursor(
                (entry::Entity, entry::Column::BookingDate),
                (entry::Entity, entry::Column::Id),
                after,
            ));
        }
        let rows = query
            .order_by_asc(entry::Column::BookingDate)
            .order_by_asc(entry::Column::Id)
            .limit(DIGEST_CHUNK)
            .all(conn)
            .await?;
        let Some(last) = rows.last() else { break };
        let cursor_id = crate::domain::EntryId::parse(&last.id)
            .map_err(|e| StoreError::Corrupt { what: format!("entry {}", last.id), reason: e.to_string() })?;
        after = Some(PageCursor { booking_date: last.booking_date, id: cursor_id });
        let full = rows.len() as u64 == DIGEST_CHUNK;
        let mut labels = metadata_of(conn, rows.iter().map(|r| r.id.clone()).collect()).await?;
        for row in rows {
            let metadata = labels.remove(&row.id).unwrap_or_default();
            let entry = to_domain(row, None, metadata)?;
            builder.push(&entry).map_err(|e| StoreError::Corrupt {
                what: format!("the books of merchant {}", merchant.as_str()),
                reason: e.to_string(),
            })?;
        }
        if !full {
            break;
        }
    }
    builder.finish().map_err(|e| StoreError::Corrupt {
        what: format!("the books of merchant {}", merchant.as_str()),
        reason: e.to_string(),
    })
}
