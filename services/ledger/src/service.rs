mod export;
mod watch;

use chrono::{NaiveDate, Utc};
use chrono_tz::Tz;

use crate::{
    domain::{
        CloseCommand, Entry, EntryFilter, EntryId, FilterFields, MerchantId, PageRequest, PeriodClose,
        RecordCommand, ReopenCommand, ReverseCommand, Violations, decide_reversal,
    },
    error::LedgerError,
    store::{Booking, LedgerStore, Reversal},
};

pub use watch::{WatchBatch, WatchFrom};

/// What booking a request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Booked {
    /// A new entry was committed.
    New(Entry),
    /// The key had booked this entry already, for the same request.
    Replayed(Entry),
}

impl Booked {
    /// The entry, new or original.
    pub fn entry(&self) -> &Entry {
        match self {
            Self::New(e) | Self::Replayed(e) => e,
        }
    }

    /// The answer to a booking: the store's outcome, or why the request is refused.
    fn from_store(booking: Booking) -> Result<Self, LedgerError> {
        match booking {
            Booking::New(entry) => Ok(Self::New(entry)),
            Booking::Replayed(entry) => Ok(Self::Replayed(entry)),
            Booking::KeyReused { request_id, entry_id } => {
                Err(LedgerError::KeyReused { request_id, entry_id })
            }
            Booking::KeyReleased => {
                Err(LedgerError::Contention("the idempotency key was released concurrently; retry".into()))
            }
            Booking::Closed(refused) => Err(LedgerError::PeriodClosed(refused)),
        }
    }
}

/// The most entries one BatchRecordEntries call books.
pub const MAX_BATCH: usize = 1_000;

/// The ledger's use cases: parse the command, apply the rules, store the result.
#[derive(Debug, Clone)]
pub struct Ledger {
    store: LedgerStore,
    zone: Tz,
}

/// A page of entries and the token of the next one (empty on the last page).
#[derive(Debug, Clone)]
pub struct EntryPage {
    /// The entries, by booking date then id.
    pub entries: Vec<Entry>,
    /// Token for the next page; empty when none follows.
    pub next_page_token: String,
}

impl Ledger {
    /// A ledger over `store` whose default booking date is today in `zone`.
    pub fn new(store: LedgerStore, zone: Tz) -> Self {
        Self { store, zone }
    }

    /// Today's business date in the configured time zone.
    pub fn today(&self) -> NaiveDate {
        Utc::now().with_timezone(&self.zone).date_naive()
    }

    /// Books an entry, or replays the one its key booked before.
    pub async fn record(&self, command: RecordCommand<'_>) -> Result<Booked, LedgerError> {
        let (entry, fingerprint) = command.parse(self.today()).map_err(LedgerError::Invalid)?;
        Booked::from_store(self.store.record(entry, &fingerprint).await?)
    }

    /// Books a batch of entries for `merchant_id`, each on its own: one
    /// answer per command, in order. The entries go to the writers together,
    /// so they share the group commit's transactions. Fails as a whole only
    /// when the batch itself is malformed (merchant, count).
    pub async fn record_batch(
        &self,
        merchant_id: &str,
        commands: Vec<RecordCommand<'_>>,
    ) -> Result<Vec<Result<Booked, LedgerError>>, LedgerError> {
        let mut v = Violations::default();
        let merchant = v.check("merchant_id", MerchantId::parse(merchant_id));
        if commands.is_empty() {
            v.add("requests", "is required: 1 to 1000 entries");
        } else if commands.len() > MAX_BATCH {
            v.add("requests", format!("holds {} entries: at most {MAX_BATCH} per call", commands.len()));
        }
        let merchant = v.finish(|| merchant).map_err(LedgerError::Invalid)?;
        let today = self.today();
        let name = merchant.as_str();
        let bookings = commands.into_iter().enumerate().map(|(i, command)| {
            let store = &self.store;
            async move {
                if !command.merchant_id.is_empty() && command.merchant_id != name {
                    let mut v = Violations::default();
                    v.add(
                        format!("requests[{i}].merchant_id"),
                        format!("must be empty or the batch's merchant ({name})"),
                    );
                    return Err(LedgerError::Invalid(v));
                }
                let command = RecordCommand { merchant_id: name, ..command };
                let (entry, fingerprint) = command
                    .parse(today)
                    .map_err(|v| LedgerError::Invalid(v.prefixed(&format!("requests[{i}]."))))?;
                Booked::from_store(store.record(entry, &fingerprint).await?)
            }
        });
        Ok(futures::future::join_all(bookings).await)
    }

    /// Closes a merchant's books (see `ClosePeriod`), recording `by`.
    pub async fn close_period(
        &self,
        command: CloseCommand<'_>,
        by: &str,
    ) -> Result<PeriodClose, LedgerError> {
        let close = command.parse(self.today()).map_err(LedgerError::Invalid)?;
        Ok(self.store.close_period(&close, by).await??)
    }

    /// Reopens a merchant's latest close (see `ReopenPeriod`), recording `by` and the reason.
    pub async fn reopen_period(
        &self,
        command: ReopenCommand<'_>,
        by: &str,
    ) -> Result<PeriodClose, LedgerError> {
        let (merchant, reason) = command.parse().map_err(LedgerError::Invalid)?;
        Ok(self.store.reopen_period(&merchant, reason.as_str(), by).await??)
    }

    /// A merchant's closes, newest first.
    pub async fn period_closes(&self, merchant_id: &str) -> Result<Vec<PeriodClose>, LedgerError> {
        let mut v = Violations::default();
        let merchant = v.check("merchant_id", MerchantId::parse(merchant_id));
        let merchant = v.finish(|| merchant).map_err(LedgerError::Invalid)?;
        Ok(self.store.period_closes(&merchant).await?)
    }

    /// Books the reversal of an entry, or replays the one its key booked before.
    pub async fn reverse(&self, command: ReverseCommand<'_>) -> Result<Booked, LedgerError> {
        let request = command.parse(self.today()).map_err(LedgerError::Invalid)?;
        let idempotency = request.idempotency.as_ref().map(|(key, fp)| (key, fp));
        let reversal = self
            .store
            .reverse(&request.merchant_id, request.entry_id, idempotency, |original| {
                decide_reversal(original, &request)
            })
            .await?;
        match reversal {
            Reversal::Booked(booking) => Booked::from_store(booking),
            Reversal::NotFound => Err(LedgerError::NotFound { entry_id: request.entry_id }),
            Reversal::Refused(refused) => Err(LedgerError::Refused(refused)),
        }
    }

    /// One entry.
    pub async fn get(&self, merchant_id: &str, entry_id: &str) -> Result<Entry, LedgerError> {
        let mut v = Violations::default();
        let merchant = v.check("merchant_id", MerchantId::parse(merchant_id));
        let id = v.check("entry_id", EntryId::parse(entry_id));
        let (merchant, id) = v.finish(|| Some((merchant?, id?))).map_err(LedgerError::Invalid)?;
        self.store.get(&merchant, id).await?.ok_or(LedgerError::NotFound { entry_id: id })
    }

    /// One page of a merchant's entries.
    pub async fn list(
        &self,
        merchant_id: &str,
        filter: &FilterFields<'_>,
        page_size: i32,
        page_token: &str,
    ) -> Result<EntryPage, LedgerError> {
        let mut v = Violations::default();
        let merchant = v.check("merchant_id", MerchantId::parse(merchant_id));
        let filter = EntryFilter::parse(filter, &mut v);
        let page = PageRequest::parse(page_size, page_token, merchant.as_ref(), &filter, &mut v);
        let merchant = v.finish(|| merchant).map_err(LedgerError::Invalid)?;
        let (entries, next) = self.store.list(&merchant, &filter, &page).await?;
        Ok(EntryPage {
            entries,
            next_page_token: next.map(|c| c.encode(&merchant, &filter)).unwrap_or_default(),
        })
    }
}
