//! WatchEntries' use case: a merchant's entries in commit order, caught up
//! from a cursor and then followed as they are committed.

use std::time::Duration;

use futures::Stream;
use tokio::time::Instant;

use super::Ledger;
use crate::{
    LedgerError,
    domain::{Entry, MerchantId, Violations, WatchCursor},
    store::LedgerStore,
};

/// How a watch paces itself.
#[derive(Debug, Clone, Copy)]
pub struct WatchPace {
    /// With nothing new, a heartbeat (no entries, the same cursor) this often.
    pub heartbeat: Duration,
    /// With nothing new, the store is read again at least this often: entries
    /// booked by another replica wake no watch here.
    pub poll: Duration,
}

impl Default for WatchPace {
    fn default() -> Self {
        Self { heartbeat: Duration::from_secs(15), poll: Duration::from_secs(1) }
    }
}

/// Entries per read of a watch (the same as an export chunk).
const WATCH_CHUNK: u64 = super::export::EXPORT_CHUNK;

/// After a commit that a read did not see yet (on PostgreSQL, while an older
/// transaction is still open), the first re-read waits this long, doubling
/// up to [`WatchPace::poll`].
const FIRST_RETRY: Duration = Duration::from_millis(5);

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

/// A running watch between two messages.
struct Watching {
    store: LedgerStore,
    merchant: MerchantId,
    cursor: WatchCursor,
    commits: tokio::sync::watch::Receiver<u64>,
    pace: WatchPace,
    /// When the last message went out (the first one goes at once).
    sent: Option<Instant>,
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
                .ok_or(crate::domain::CursorError);
            let cursor = v.check("cursor", parsed);
            if from.start_at_end {
                v.add("start_at_end", "must not be set with a cursor: the cursor says where to start");
            }
            cursor
        };
        let merchant = v.finish(|| merchant).map_err(LedgerError::Invalid)?;
        // Taken before the starting point is read: a commit after it wakes the watch.
        let commits = self.store.watch_commits();
        let cursor = match cursor {
            Some(c) => c,
            None if from.start_at_end => self.store.watch_end().await?,
            None => self.store.watch_origin(),
        };
        let state = Watching { store: self.store.clone(), merchant, cursor, commits, pace, sent: None };
        Ok(futures::stream::try_unfold(state, |mut w| async move {
            let batch = w.next().await?;
            Ok(Some((batch, w)))
        }))
    }
}

impl Watching {
    /// The next message: new entries as soon as there are some, else a
    /// heartbeat when one is due.
    async fn next(&mut self) -> Result<WatchBatch, LedgerError> {
        let mut retry = self.pace.poll;
        loop {
            // Marked seen before reading: a commit from here on wakes the wait below.
            self.commits.borrow_and_update();
            let entries = self.store.watch_after(&self.merchant, &self.cursor, WATCH_CHUNK).await?;
            let now = Instant::now();
            let heartbeat_due = self.sent.is_none_or(|at| now >= at + self.pace.heartbeat);
            if let Some((_, last)) = entries.last() {
                self.cursor = last.clone();
            }
            if !entries.is_empty() || heartbeat_due {
                self.sent = Some(now);
                return Ok(WatchBatch { entries, cursor: self.cursor.clone() });
            }
            let heartbeat_at = self.sent.map_or(now, |at| at + self.pace.heartbeat);
            let wake_at = (now + retry).min(heartbeat_at);
            tokio::select! {
                changed = self.commits.changed() => {
                    retry = FIRST_RETRY;
                    if changed.is_err() {
                        // The store is gone (shutting down): poll until the stream is dropped.
                        tokio::time::sleep_until(wake_at).await;
                    }
                }
                () = tokio::time::sleep_until(wake_at) => {
                    retry = (retry * 2).min(self.pace.poll);
                }
            }
        }
    }
}
