//! WatchEntries' reads: a merchant's entries in commit order after a cursor
//! (see [`WatchCursor`] for what commit order is on each backend).

use fluxo_db::statement;
use sea_orm::{ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QueryResult};

use super::{LedgerStore, StoreError, schema::entry};
use crate::domain::{Entry, MerchantId, WatchCursor};

impl LedgerStore {
    /// Where a watch of the whole ledger starts: before every entry.
    pub(crate) fn watch_origin(&self) -> WatchCursor {
        match self.backend() {
            DbBackend::Postgres => WatchCursor::Transaction { xid: 0, id: String::new() },
            _ => WatchCursor::Position(0),
        }
    }

    /// Whether `cursor` is of this store's kind.
    pub(crate) fn watch_cursor_fits(&self, cursor: &WatchCursor) -> bool {
        matches!(
            (self.backend(), cursor),
            (DbBackend::Postgres, WatchCursor::Transaction { .. })
                | (DbBackend::Sqlite, WatchCursor::Position(_))
        )
    }

    /// Where a watch starts that skips what is committed now. On PostgreSQL
    /// it is the oldest transaction still running, so an entry committed
    /// just before this call may still follow; none committed after it is
    /// skipped.
    pub(crate) async fn watch_end(&self) -> Result<WatchCursor, StoreError> {
        let backend = self.backend();
        let sql = match backend {
            DbBackend::Postgres => "SELECT pg_snapshot_xmin(pg_current_snapshot())::text",
            _ => "SELECT COALESCE(MAX(position), 0) FROM ledger_entry_positions",
        };
        let row = self.db.conn().query_one_raw(statement(backend, sql, vec![])).await?;
        let row = row.ok_or_else(|| StoreError::Internal("the watch's starting point read no row".into()))?;
        match backend {
            DbBackend::Postgres => {
                let xid: String = row.try_get_by_index(0)?;
                Ok(WatchCursor::Transaction { xid: parse_xid(&xid)?, id: String::new() })
            }
            _ => Ok(WatchCursor::Position(row.try_get_by_index(0)?)),
        }
    }

    /// Up to `limit` entries of `merchant` strictly after `after` in commit
    /// order, each with the cursor just after it. An entry is returned only
    /// once nothing can commit before it any more, so a watch that resumes
    /// from the last cursor it was given misses nothing.
    pub(crate) async fn watch_after(
        &self,
        merchant: &MerchantId,
        after: &WatchCursor,
        limit: u64,
    ) -> Result<Vec<(Entry, WatchCursor)>, StoreError> {
        let backend = self.backend();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let m = merchant.as_str().to_owned();
        let query = match after {
            // Only transactions older than the oldest one running: they are
            // all over, so no entry can appear below what is read here.
            WatchCursor::Transaction { xid, id } => statement(
                backend,
                // The text form is aliased: an output column named `commit_xid`
                // would be what ORDER BY sorts by, as text ("1000" < "999").
                "SELECT id, commit_xid::text AS xid_text FROM ledger_entries \
                 WHERE merchant_id = ? AND (commit_xid, id) > (?::text::xid8, ?) \
                   AND commit_xid < pg_snapshot_xmin(pg_current_snapshot()) \
                 ORDER BY ledger_entries.commit_xid, ledger_entries.id LIMIT ?",
                vec![m.into(), xid.to_string().into(), id.clone().into(), limit.into()],
            ),
            WatchCursor::Position(position) => statement(
                backend,
                "SELECT entry_id, position FROM ledger_entry_positions \
                 WHERE merchant_id = ? AND position > ? ORDER BY position LIMIT ?",
                vec![m.into(), (*position).into(), limit.into()],
            ),
        };
        let rows = self.db.conn().query_all_raw(query).await?;
        let order = rows.iter().map(|row| position(after, row)).collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<&str> = order.iter().map(|(id, _)| id.as_str()).collect();
        let mut models =
            entry::Entity::find().filter(entry::Column::Id.is_in(ids)).all(self.db.conn()).await?;
        // Back into commit order.
        let rank: std::collections::HashMap<&str, usize> =
            order.iter().enumerate().map(|(i, (id, _))| (id.as_str(), i)).collect();
        models.sort_by_key(|m| rank.get(m.id.as_str()).copied().unwrap_or(usize::MAX));
        if models.len() != order.len() {
            return Err(StoreError::Internal("an entry in commit order has no row".into()));
        }
        let entries = self.hydrate(models).await?;
        Ok(entries.into_iter().zip(order.into_iter().map(|(_, cursor)| cursor)).collect())
    }
}

/// An entry's id and the cursor just after it, from a row of `watch_after`.
fn position(after: &WatchCursor, row: &QueryResult) -> Result<(String, WatchCursor), StoreError> {
    let id: String = row.try_get_by_index(0)?;
    let cursor = match after {
        WatchCursor::Transaction { .. } => {
            let xid: String = row.try_get_by_index(1)?;
            WatchCursor::Transaction { xid: parse_xid(&xid)?, id: id.clone() }
        }
        WatchCursor::Position(_) => WatchCursor::Position(row.try_get_by_index(1)?),
    };
    Ok((id, cursor))
}

fn parse_xid(text: &str) -> Result<u64, StoreError> {
    text.parse()
        .map_err(|_| StoreError::Corrupt { what: "a transaction id".into(), reason: format!("{text:?}") })
}
