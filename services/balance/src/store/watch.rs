//! WatchDailyBalances' reads: the days of a merchant in the order their
//! stored figures changed, after a cursor.

use chrono::NaiveDate;
use fluxo_types::{Currency, MerchantId};
use sea_orm::{DbBackend, Value};

use super::{BalanceStore, StoreError};
use crate::query::ChangeCursor;

impl BalanceStore {
    /// Whether `cursor` is of this store's kind.
    pub(crate) fn change_cursor_fits(&self, cursor: &ChangeCursor) -> bool {
        matches!(
            (self.db.backend(), cursor),
            (_, ChangeCursor::Start)
                | (DbBackend::Postgres, ChangeCursor::Transaction { .. })
                | (DbBackend::Sqlite, ChangeCursor::Sequence { .. })
        )
    }

    /// Where a watch starts that skips what is stored now (on PostgreSQL a
    /// day changed just before may still follow; none changed after is skipped).
    pub(crate) async fn changes_end(&self) -> Result<ChangeCursor, StoreError> {
        let postgres = self.db.backend() == DbBackend::Postgres;
        let sql = if postgres {
            // Transactions from the oldest one still running on.
            "SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::numeric - 1)::text"
        } else {
            "SELECT CAST(COALESCE(MAX(change_seq), 0) AS TEXT) FROM balance_daily"
        };
        let row = self.query_one(sql, vec![]).await?;
        let text: String = row.ok_or_else(|| StoreError::Internal("no row".into()))?.try_get_by_index(0)?;
        let bad = || StoreError::Corrupt { what: "a change order".into(), reason: text.clone() };
        Ok(if postgres {
            ChangeCursor::Transaction { xid: text.parse().map_err(|_| bad())?, day: None }
        } else {
            ChangeCursor::Sequence { seq: text.parse().map_err(|_| bad())?, day: None }
        })
    }

    /// Up to `limit` days of `merchant` changed after `after`, in change
    /// order, each with the cursor just after it. On PostgreSQL only days of
    /// transactions older than the oldest one running, so nothing can later
    /// change below what is handed out.
    pub(crate) async fn changes_after(
        &self,
        merchant: &MerchantId,
        after: &ChangeCursor,
        limit: u64,
    ) -> Result<Vec<(Currency, NaiveDate, ChangeCursor)>, StoreError> {
        let postgres = self.db.backend() == DbBackend::Postgres;
        let (order, cast) = if postgres { ("change_xid", "::text::xid8") } else { ("change_seq", "") };
        let mut values: Vec<Value> = vec![merchant.as_str().into()];
        let mut sql = format!(
            // Aliased: an output column named like `{order}` would be what ORDER BY
            // sorts by, as text ("1000" < "999").
            "SELECT currency_code, booking_date, CAST({order} AS TEXT) AS order_text FROM balance_daily \
             WHERE merchant_id = ?"
        );
        let (position, day): (Option<Value>, _) = match after {
            ChangeCursor::Start => (None, None),
            ChangeCursor::Transaction { xid, day } => (Some(xid.to_string().into()), day.as_ref()),
            ChangeCursor::Sequence { seq, day } => (Some((*seq).into()), day.as_ref()),
        };
        match (position, day) {
            (None, _) => {}
            (Some(position), None) => {
                sql.push_str(&format!(" AND {order} > ?{cast}"));
                values.push(position);
            }
            (Some(position), Some((currency, date))) => {
                sql.push_str(&format!(" AND ({order}, currency_code, booking_date) > (?{cast}, ?, ?)"));
                values.extend([position, currency.clone().into(), (*date).into()]);
            }
        }
        if postgres {
            sql.push_str(" AND change_xid < pg_snapshot_xmin(pg_current_snapshot())");
        }
        sql.push_str(&format!(
            " ORDER BY balance_daily.{order}, balance_daily.currency_code, balance_daily.booking_date LIMIT ?"
        ));
        values.push(i64::try_from(limit).unwrap_or(i64::MAX).into());
        let rows = self.query_all(&sql, values).await?;
        rows.iter()
            .map(|row| {
                let code: String = row.try_get_by_index(0)?;
                let date: NaiveDate = row.try_get_by_index(1)?;
                let order: String = row.try_get_by_index(2)?;
                let bad =
                    |what: &str| StoreError::Corrupt { what: what.into(), reason: format!("{code} {order}") };
                let currency = Currency::parse(code.trim()).map_err(|_| bad("a currency code"))?;
                let day = Some((currency.code().to_owned(), date));
                let next = if postgres {
                    ChangeCursor::Transaction { xid: order.parse().map_err(|_| bad("a change order"))?, day }
                } else {
                    ChangeCursor::Sequence { seq: order.parse().map_err(|_| bad("a change order"))?, day }
                };
                Ok((currency, date, next))
            })
            .collect()
    }
}
