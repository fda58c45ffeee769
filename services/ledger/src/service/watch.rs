//! WatchEntries' use case: a merchant's entries in commit order, caught up
//! from a cursor and then followed as they are committed.

use fluxo_server::stream::WatchPace;
use futures::{Stream, TryStreamExt};

use super::Ledger;
use crate::{
    LedgerError,
    domain::{CursorError, Entry, MerchantId, Violations, WatchCursor},
};

/// Entries per read of a watch (the same as an export chunk).
const WATCH_CHUNK: u64 = super::export::EXPORT_CHUNK;

/// One message of a watch: entries, each with the cursor after it, then the
/// cursor after the message; no entries is a heartbeat.
#[derive(Debug, Clone)]
pub struct WatchBatch {
    /// The entries, in commit order.
    pub entries: Vec<(Entry, WatchCursor)>,
    /// Where the watch stands after this message.
    pub cursor: WatchCursor,
}

/// Where a watch starts, as sent.
#[derive(Debug, Clone, Copy)]
pub struct WatchFrom<'a> {
    /// A cursor of an earlier watch, or empty.
    pub cursor: &'a str,
    /// Without a cursor, skip what is committed now.
    pub start_at_end: bool,
}

impl Ledger {
    /// Watches `merchant_id`'s entries. The first message is sent at once
    /// (entries, or a heartbeat carrying the starting cursor); the stream
    /// ends only with an error. A bad merchant or cursor is refused here,
    /// each field at fault named, before anything is read.
    pub async fn watch(
        &self,
        merchant_id: &str,
        from: WatchFrom<'_>,
        pace: WatchPace,
    ) -> Result<impl Stream<Item = Result<WatchBatch, LedgerError>> + Send + 'static, LedgerError> {
        let mut v = Violations::default();
        let merchant = v.check("merchant_id", MerchantId::parse(merchant_id));
        let cursor = if from.cursor.is_empty() {
            None
        } else {
            let parsed = WatchCursor::parse(from.cursor)
                .ok()
                .filter(|c| self.store.watch_cursor_fits(c))
                .ok_or(CursorError);
            if from.start_at_end {
                v.add("start_at_end", "must not be set with a cursor: the cursor says where to start");
            }
            v.check("cursor", parsed)
        };
        let merchant = v.finish(|| merchant).map_err(LedgerError::Invalid)?;
        // Taken before the starting point is read: a commit after it wakes the watch.
        let commits = self.store.watch_commits(&merchant);
        let cursor = match cursor {
            Some(c) => c,
            None if from.start_at_end => self.store.watch_end().await?,
            None => self.store.watch_origin(),
        };
        let store = self.store.clone();
        let read = move |after: WatchCursor| {
            let (store, merchant) = (store.clone(), merchant.clone());
            async move {
                let entries = store.watch_after(&merchant, &after, WATCH_CHUNK).await?;
                let next = entries.last().map_or(after, |(_, c)| c.clone());
                Ok::<_, LedgerError>((entries, next))
            }
        };
        Ok(fluxo_server::stream::follow(cursor, pace, Some(commits), read)
            .map_ok(|(entries, cursor)| WatchBatch { entries, cursor }))
    }
}
