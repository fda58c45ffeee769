use chrono::{NaiveDate, Utc};
use chrono_tz::Tz;

use crate::{
    domain::{
        Entry, EntryFilter, EntryId, FilterFields, MerchantId, PageRequest, RecordCommand, ReverseCommand,
        Violations, decide_reversal,
    },
    error::LedgerError,
    store::{Booking, LedgerStore, Reversal},
};

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
        }
    }
}

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
