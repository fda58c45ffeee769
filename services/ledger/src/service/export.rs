//! ExportEntries' use case: ListEntries' filter rules, then the store's
//! chunked read of the whole range.

use futures::{Stream, TryStreamExt};

use super::Ledger;
use crate::{
    LedgerError,
    domain::{Entry, EntryFilter, FilterFields, MerchantId, Violations},
};

/// Entries per ExportEntries message: ListEntries' largest page, so a chunk
/// costs what one page does.
pub(crate) const EXPORT_CHUNK: u64 = crate::domain::PageRequest::MAX_SIZE;

impl Ledger {
    /// A merchant's entries as `filter` selects them, in ListEntries' order,
    /// [`EXPORT_CHUNK`] at a time. A bad merchant or filter is refused here,
    /// every field at fault named, before anything is read.
    pub fn export(
        &self,
        merchant_id: &str,
        filter: &FilterFields<'_>,
    ) -> Result<impl Stream<Item = Result<Vec<Entry>, LedgerError>> + Send + 'static, LedgerError> {
        let mut v = Violations::default();
        let merchant = v.check("merchant_id", MerchantId::parse(merchant_id));
        let filter = EntryFilter::parse(filter, &mut v);
        let merchant = v.finish(|| merchant).map_err(LedgerError::Invalid)?;
        Ok(self.store.export(merchant, filter, EXPORT_CHUNK).map_err(LedgerError::from))
    }
}
