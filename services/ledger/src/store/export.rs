//! ExportEntries' reads: ListEntries' query (its filters, order and keyset
//! cursor, written once in [`LedgerStore::list`]) run a chunk at a time until
//! the range is exhausted, so an export of any size holds one chunk in memory.

use futures::Stream;

use super::{LedgerStore, StoreError};
use crate::domain::{Entry, EntryFilter, MerchantId, PageCursor, PageRequest};

/// Where an export stands between two chunks.
enum Position {
    /// Nothing read yet.
    Start,
    /// Resume after this entry.
    After(PageCursor),
    /// The last chunk has been read.
    Done,
}

impl LedgerStore {
    /// Every entry of `merchant` that `filter` selects, in (booking date, id)
    /// order, `chunk` entries at a time (the last chunk may be shorter; no
    /// chunk is empty). Lazy: a chunk is read when the stream is polled, and
    /// no connection is held between chunks, so a consumer that stops
    /// polling costs no database resources.
    ///
    /// Each chunk resumes strictly after the previous one's last (date, id):
    /// every entry committed before the export began is read exactly once;
    /// one committed during it appears when it sorts after the position the
    /// export has reached.
    pub fn export(
        &self,
        merchant: MerchantId,
        filter: EntryFilter,
        chunk: u64,
    ) -> impl Stream<Item = Result<Vec<Entry>, StoreError>> + Send + 'static {
        let store = self.clone();
        let size = chunk.clamp(1, PageRequest::MAX_SIZE);
        futures::stream::try_unfold(Position::Start, move |position| {
            let (store, merchant, filter) = (store.clone(), merchant.clone(), filter.clone());
            async move {
                let after = match position {
                    Position::Start => None,
                    Position::After(cursor) => Some(cursor),
                    Position::Done => return Ok(None),
                };
                let (entries, next) = store.list(&merchant, &filter, &PageRequest { size, after }).await?;
                if entries.is_empty() {
                    return Ok(None);
                }
                Ok(Some((entries, next.map_or(Position::Done, Position::After))))
            }
        })
    }
}
